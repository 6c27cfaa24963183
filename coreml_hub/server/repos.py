"""A folder of repos as the Hub sees them: `ROOT/<org>/<name>/` plain files plus optional `.hub.json`.

Paths with a component starting with "." (`.hub.json`, `.git`, editor droppings) are not part
of a repo, and neither is anything whose real path is outside ROOT (see coreml_hub/safeserve.py). The commit sha is a real git commit id over the files' git trees, so it changes
exactly when the content does.

A pinned repo is what the pull-through mirror (server/upstream.py) writes, in the Hugging Face
cache layout: ROOT/models--<org>--<name>/snapshots/<commit>/.hub.json is upstream's model info
at that commit (its `sha` and every file's size, blob id and LFS sha256), refs/<branch> names
a commit, and the files fetched so far link to blobs/. Its commit is upstream's, its listing is
upstream's, and a file not fetched yet is listed but not `present`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from ..safeserve import clean_parts, links_out_of, resolve_under, walk_under
from .hashing import Digest, DigestCache, is_lfs, lfs_pointer

META_FILE = ".hub.json"
TOKENS_FILE = ".tokens"
DIGESTS_FILE = ".coreml-hub-digests.json"  # in ROOT; remembered file hashes


@dataclass(frozen=True)
class Entry:
    """One file of a repo on disk."""

    path: str  # posix path inside the repo
    abs_path: Path
    size: int
    mtime_ns: int
    digest: Digest | None = None  # known without hashing (a pinned repo's listing)
    present: bool = True  # False: listed by a pinned repo, not fetched yet

    @property
    def lfs(self) -> bool:
        if self.digest is not None:
            return self.digest.sha256 is not None
        return is_lfs(self.path, self.size)


@dataclass(frozen=True)
class Repo:
    repo_id: str
    folder: Path
    entries: tuple[Entry, ...]
    meta: dict[str, Any] = field(compare=False, hash=False)
    commit: str | None = None  # pinned: upstream's commit, not one computed from the content
    revisions: tuple[str, ...] = ()  # pinned: the names that lead to this commit (itself, refs)

    @property
    def author(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @cached_property
    def _by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}

    def entry(self, path: str) -> Entry | None:
        return self._by_path.get(path)

    def directories(self) -> list[str]:
        dirs: set[str] = set()
        for item in self.entries:
            parts = item.path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return sorted(dirs)

    @property
    def gated(self) -> bool | str:
        value = self.meta.get("gated", False)
        if value is True:
            return "auto"
        if isinstance(value, str) and value in ("auto", "manual"):
            return value
        return False

    @property
    def private(self) -> bool:
        return bool(self.meta.get("private", False))

    @property
    def library_name(self) -> str | None:
        return self.meta.get("library_name")

    @property
    def pipeline_tag(self) -> str | None:
        return self.meta.get("pipeline_tag")

    @property
    def tags(self) -> list[str]:
        """Declared tags plus library and pipeline tag, as the Hub reports them."""
        out: list[str] = []
        for tag in [*(self.meta.get("tags") or []), self.library_name, self.pipeline_tag]:
            if isinstance(tag, str) and tag and tag not in out:
                out.append(tag)
        return out

    def count(self, key: str) -> int:
        try:
            return int(self.meta.get(key, 0) or 0)
        except (TypeError, ValueError):
            return 0

    @property
    def last_modified(self) -> str:
        """As `.hub.json` declares it, else the newest file's mtime."""
        return self._time("lastModified", max)

    @property
    def created_at(self) -> str:
        """As `.hub.json` declares it, else the oldest file's mtime."""
        return self._time("createdAt", min)

    def _time(self, key: str, pick: Callable[..., int]) -> str:
        declared = self.meta.get(key)
        if isinstance(declared, str) and declared:
            return declared
        return iso_time(pick((e.mtime_ns for e in self.entries), default=0))


def iso_time(ns: int) -> str:
    """Hub-style timestamp: `2024-01-31T12:00:00.000Z`."""
    stamp = datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def valid_repo_path(path: str) -> bool:
    """A repo-relative path that names something a listing could show (the rules of `safeserve.clean_parts`)."""
    return bool(path) and clean_parts(path) is not None


def cache_repo_id(name: str) -> str | None:
    """`models--org--name` (a Hugging Face cache folder) -> `org/name`; None for anything else."""
    kind, _, rest = name.partition("--")
    org, sep, repo = rest.partition("--")
    if kind != "models" or not sep or not org or not repo or "--" in repo:
        return None
    return f"{org}/{repo}"


class RepoStore:
    """Reads repos from ROOT on every request (cheap: a walk and stats); caches digests and commits.

    A repo is ROOT/<org>/<name>/, or, when ROOT is a Hugging Face cache folder (`~/.cache/huggingface/hub`),
    ROOT/models--<org>--<name>/snapshots/<refs/main>/. Files and folders are found by
    `safeserve.walk_under`: nothing whose real path is outside ROOT is listed or served.
    """

    def __init__(self, root: Path, *, remember_digests: bool = True) -> None:
        self.root = Path(root)
        self.digests = DigestCache(self.root / DIGESTS_FILE if remember_digests else None)
        self._commits: dict[tuple[Any, ...], tuple[str, dict[str, str]]] = {}
        self._commit_lock = threading.Lock()
        self._bad_meta_warned: set[str] = set()

    # -- discovery ---------------------------------------------------------------------------

    def repo_ids(self) -> list[str]:
        ids: set[str] = set()
        for top in self._names(""):
            if "--" in top:  # no Hub org has "--" in its name: a cache folder (datasets and spaces are skipped)
                repo_id = cache_repo_id(top)
                if repo_id is not None and self._cache_snapshot(top) is not None:
                    ids.add(repo_id)
                continue
            if not self._is_dir(top):
                continue
            for name in self._names(top):
                if self._is_dir(f"{top}/{name}"):
                    ids.add(f"{top}/{name}")
        return sorted(ids)

    def get(self, repo_id: str, revision: str = "main") -> Repo | None:
        """The repo as `revision` finds it: a pinned repo's branch or commit; other repos have one revision."""
        if repo_id.count("/") != 1 or not valid_repo_path(repo_id) or "--" in repo_id:  # the Hub forbids "--"
            return None
        rel = self._folder(repo_id, revision)
        if rel is None:
            return None
        folder = resolve_under(self.root, rel)
        if folder is None:
            return None
        found = walk_under(self.root, rel)
        meta = self._meta(rel, repo_id)
        listing = pinned_listing(meta, folder.name)
        if listing is None:
            entries = tuple(Entry(path=f.path, abs_path=f.real, size=f.size, mtime_ns=f.mtime_ns) for f in found)
            return Repo(repo_id=repo_id, folder=folder, entries=entries, meta=meta)
        on_disk = {f.path: f for f in found}
        pinned: list[Entry] = []
        for path, size, digest in listing:
            have = on_disk.get(path)
            if have is not None and have.size == size:
                pinned.append(Entry(path, have.real, size, have.mtime_ns, digest))
            else:
                pinned.append(Entry(path, folder / path, size, 0, digest, present=False))
        cache = rel.split("/", 1)[0]
        names = (folder.name, *self._refs_to(cache, folder.name))
        return Repo(repo_id=repo_id, folder=folder, entries=tuple(pinned), meta=meta, commit=folder.name,
                    revisions=names)

    def is_plain(self, repo_id: str) -> bool:
        """Whether the repo is a plain folder ROOT/<org>/<name> (one revision, served as it is)."""
        return repo_id.count("/") == 1 and valid_repo_path(repo_id) and self._is_dir(repo_id)

    def repos(self) -> Iterable[Repo]:
        for repo_id in self.repo_ids():
            repo = self.get(repo_id)
            if repo is not None:
                yield repo

    def links_out(self) -> list[tuple[str, str]]:
        """(path in ROOT, link text) of every link that leads out of ROOT: never served, named at start."""
        return links_out_of(self.root)

    def _names(self, rel: str) -> list[str]:
        folder = resolve_under(self.root, rel)
        if folder is None:
            return []
        try:
            with os.scandir(folder) as it:
                return sorted(e.name for e in it if clean_parts(e.name) is not None)
        except OSError:
            return []

    def _is_dir(self, rel: str) -> bool:
        found = resolve_under(self.root, rel)
        return found is not None and found.is_dir()

    def _folder(self, repo_id: str, revision: str = "main") -> str | None:
        """Where the repo's files are, relative to ROOT: a plain folder first, else a cache snapshot."""
        if self._is_dir(repo_id):
            return repo_id
        return self._cache_snapshot(cache_folder(repo_id), revision)

    def ref(self, repo_id: str, revision: str) -> str | None:
        """The commit ROOT's refs/<revision> of a cache-layout repo names, when its snapshot is there."""
        return self._ref(cache_folder(repo_id), revision)

    def _ref(self, cache_name: str, revision: str) -> str | None:
        ref = resolve_under(self.root, f"{cache_name}/refs/{revision}")
        if ref is None or not ref.is_file():
            return None
        try:
            commit = ref.read_text(errors="replace").strip()
        except OSError:
            return None
        if "/" not in commit and clean_parts(commit) is not None and self._is_dir(f"{cache_name}/snapshots/{commit}"):
            return commit
        return None

    def _refs_to(self, cache_name: str, commit: str) -> list[str]:
        """Every ref (branch) of a cache-layout repo that names `commit`."""
        refs = resolve_under(self.root, f"{cache_name}/refs")
        if refs is None or not refs.is_dir():
            return []
        return [f.path for f in walk_under(self.root, f"{cache_name}/refs")
                if self._ref(cache_name, f.path) == commit]

    def _cache_snapshot(self, cache_name: str, revision: str = "main") -> str | None:
        """The snapshot `revision` names (a ref, or a snapshot's own name); else the one of `refs/main`,
        else the newest (such a repo's commit is then checked against its content)."""
        snapshots = f"{cache_name}/snapshots"
        if revision != "main":
            commit = self._ref(cache_name, revision)
            if commit is None and clean_parts(revision) is not None and "/" not in revision \
                    and self._is_dir(f"{snapshots}/{revision}"):
                commit = revision
            if commit is not None:
                return f"{snapshots}/{commit}"
        commit = self._ref(cache_name, "main")
        if commit is not None:
            return f"{snapshots}/{commit}"
        newest: tuple[int, str] | None = None
        for name in self._names(snapshots):
            found = resolve_under(self.root, f"{snapshots}/{name}")
            if found is not None and found.is_dir():
                stamp = found.stat().st_mtime_ns
                if newest is None or stamp > newest[0]:
                    newest = (stamp, f"{snapshots}/{name}")
        return newest[1] if newest else None

    def _meta(self, rel: str, repo_id: str) -> dict[str, Any]:
        meta_path = resolve_under(self.root, f"{rel}/{META_FILE}", allow_hidden=True)
        if meta_path is None or not meta_path.is_file():
            return {}
        try:
            data = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            if repo_id not in self._bad_meta_warned:
                self._bad_meta_warned.add(repo_id)
                print(f"Warning: ignoring unreadable {self.root / rel / META_FILE}: {exc}", file=sys.stderr,
                      flush=True)
            return {}
        return data if isinstance(data, dict) else {}

    # -- content ids ---------------------------------------------------------------------------

    def digest(self, entry: Entry) -> Digest:
        if entry.digest is not None:
            return entry.digest
        return self.digests.get(entry.abs_path, entry.size, entry.mtime_ns, entry.lfs)

    def commit(self, repo: Repo) -> str:
        return repo.commit or self._commit_and_trees(repo)[0]

    def tree_oid(self, repo: Repo, directory: str) -> str:
        return self._commit_and_trees(repo)[1][directory]

    def _commit_and_trees(self, repo: Repo) -> tuple[str, dict[str, str]]:
        key = (repo.repo_id, repo.commit, tuple((e.path, e.size, e.mtime_ns) for e in repo.entries))
        cached = self._commits.get(key)
        if cached is not None:
            return cached
        blobs = {e.path: self.digest(e).blob_id for e in repo.entries}
        trees = git_trees(blobs)
        if repo.commit is not None:  # upstream's commit; its trees hold the same blobs, so the same ids
            with self._commit_lock:
                self._commits[key] = (repo.commit, trees)
            return repo.commit, trees
        body = (
            f"tree {trees['']}\n"
            "author coreml-hub <mirror@localhost> 0 +0000\n"
            "committer coreml-hub <mirror@localhost> 0 +0000\n\n"
            f"Mirror of {repo.repo_id}\n"
        ).encode()
        commit = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
        with self._commit_lock:
            self._commits[key] = (commit, trees)
        return commit, trees

    def warm(self) -> None:
        """Hash every file of every repo (run in a background thread at startup)."""
        for repo in self.repos():
            try:
                self.commit(repo)
            except OSError:
                continue
        self.digests.save()


def cache_folder(repo_id: str) -> str:
    """`org/name` -> `models--org--name`, the Hugging Face cache's folder for a model repo."""
    return "models--" + repo_id.replace("/", "--")


def pinned_listing(meta: dict[str, Any], commit: str) -> list[tuple[str, int, Digest]] | None:
    """A pinned snapshot's files (path, size, digest) from its `.hub.json`, when it is upstream's info at
    `commit` with every file's size and blob id; None otherwise. Paths a request could not name are dropped."""
    siblings = meta.get("siblings")
    if meta.get("sha") != commit or not isinstance(siblings, list):
        return None
    files: list[tuple[str, int, Digest]] = []
    for item in siblings:
        if not isinstance(item, dict):
            return None
        path, size, blob_id = item.get("rfilename"), item.get("size"), item.get("blobId")
        if not isinstance(path, str) or not isinstance(size, int) or not isinstance(blob_id, str):
            return None
        if not valid_repo_path(path):
            continue
        lfs = item.get("lfs")
        if isinstance(lfs, dict) and isinstance(lfs.get("sha256"), str):
            pointer = lfs.get("pointerSize")
            digest = Digest(blob_id, lfs["sha256"], pointer if isinstance(pointer, int) else
                            len(lfs_pointer(lfs["sha256"], size)))
        else:
            digest = Digest(blob_id, None, None)
        files.append((path, size, digest))
    return sorted(files)


def git_trees(blobs: dict[str, str]) -> dict[str, str]:
    """Git tree ids for every folder ('' is the root) given each file's blob id."""
    children: dict[str, dict[str, tuple[str, str]]] = {"": {}}
    for path in blobs:
        parts = path.split("/")
        for i in range(1, len(parts)):
            children.setdefault("/".join(parts[:i]), {})
    for path, blob in blobs.items():
        parent, _, name = path.rpartition("/")
        children[parent][name] = ("100644", blob)
    trees: dict[str, str] = {}
    for folder in sorted(children, key=lambda p: p.count("/") if p else -1, reverse=True):
        if folder:
            parent, _, name = folder.rpartition("/")
        entries = children[folder]
        body = b""
        # git orders tree entries by name, comparing folders as if they ended with "/"
        for name_, (mode, oid) in sorted(entries.items(), key=lambda kv: kv[0] + ("/" if kv[1][0] == "40000" else "")):
            body += f"{mode} {name_}".encode() + b"\0" + bytes.fromhex(oid)
        oid = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        trees[folder] = oid
        if folder:
            children[parent][name] = ("40000", oid)
    return trees
