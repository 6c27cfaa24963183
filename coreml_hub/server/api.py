"""The JSON documents of the Hub's model API, built from repos on disk.

Shapes follow what huggingface_hub parses: `ModelInfo` for /api/models, `RepoFile` /
`RepoFolder` for tree and paths-info listings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .repos import Entry, Repo, RepoStore

# Properties `expand` may name that this mirror can answer.
EXPANDABLE = (
    "author", "cardData", "createdAt", "disabled", "downloads", "downloadsAllTime", "gated", "lastModified",
    "library_name", "likes", "pipeline_tag", "private", "sha", "siblings", "spaces", "tags", "trendingScore",
    "usedStorage",
)
# What /api/models returns per repo with neither `full` nor `expand` (as the Hub does).
DEFAULT_LIST_PROPS = ("createdAt", "downloads", "library_name", "likes", "pipeline_tag", "private", "tags",
                      "trendingScore")
FULL_LIST_PROPS = DEFAULT_LIST_PROPS + ("author", "disabled", "gated", "lastModified", "sha", "siblings", "spaces")
INFO_PROPS = FULL_LIST_PROPS + ("usedStorage", "downloadsAllTime")

SORT_KEYS: dict[str, Callable[[Repo], Any]] = {
    "likes": lambda r: r.count("likes"),
    "downloads": lambda r: r.count("downloads"),
    "downloadsAllTime": lambda r: r.count("downloadsAllTime") or r.count("downloads"),
    "trendingScore": lambda r: r.count("trendingScore"),
    "lastModified": lambda r: r.last_modified,
    "createdAt": lambda r: r.created_at,
    "id": lambda r: r.repo_id.lower(),
}


def model_document(store: RepoStore, repo: Repo, props: tuple[str, ...], *, blobs: bool = False) -> dict[str, Any]:
    """One repo as /api/models shows it, limited to `props` (plus the id fields)."""
    doc: dict[str, Any] = {"_id": _object_id(repo.repo_id), "id": repo.repo_id, "modelId": repo.repo_id}
    for prop in props:
        if prop == "author":
            doc["author"] = repo.author
        elif prop == "sha":
            doc["sha"] = store.commit(repo)
        elif prop == "lastModified":
            doc["lastModified"] = repo.last_modified
        elif prop == "createdAt":
            doc["createdAt"] = repo.created_at
        elif prop == "private":
            doc["private"] = repo.private
        elif prop == "gated":
            doc["gated"] = repo.gated
        elif prop == "disabled":
            doc["disabled"] = False
        elif prop in ("downloads", "likes", "trendingScore", "downloadsAllTime"):
            doc[prop] = repo.count(prop) if prop != "downloadsAllTime" else SORT_KEYS[prop](repo)
        elif prop == "library_name":
            if repo.library_name:
                doc["library_name"] = repo.library_name
        elif prop == "pipeline_tag":
            if repo.pipeline_tag:
                doc["pipeline_tag"] = repo.pipeline_tag
        elif prop == "tags":
            doc["tags"] = repo.tags
        elif prop == "siblings":
            doc["siblings"] = [_sibling(store, e, blobs) for e in repo.entries]
        elif prop == "spaces":
            doc["spaces"] = []
        elif prop == "usedStorage":
            doc["usedStorage"] = sum(e.size for e in repo.entries)
        elif prop == "cardData":
            card = repo.meta.get("cardData")
            if isinstance(card, dict):
                doc["cardData"] = card
    return doc


def _sibling(store: RepoStore, entry: Entry, blobs: bool) -> dict[str, Any]:
    if not blobs:
        return {"rfilename": entry.path}
    digest = store.digest(entry)
    item: dict[str, Any] = {"rfilename": entry.path, "blobId": digest.blob_id, "size": entry.size}
    if digest.sha256 is not None:
        item["lfs"] = {"sha256": digest.sha256, "size": entry.size, "pointerSize": digest.pointer_size}
    return item


def _object_id(repo_id: str) -> str:
    import hashlib

    return hashlib.sha1(repo_id.encode()).hexdigest()[:24]


def path_entry(store: RepoStore, repo: Repo, path: str, *, expand: bool, commit: str) -> dict[str, Any]:
    """A file (`RepoFile`) or folder (`RepoFolder`) of a tree or paths-info listing; `path` must exist."""
    entry = repo.entry(path)
    if entry is None:
        item: dict[str, Any] = {"type": "directory", "oid": store.tree_oid(repo, path), "size": 0, "path": path}
    else:
        digest = store.digest(entry)
        item = {"type": "file", "oid": digest.blob_id, "size": entry.size, "path": entry.path}
        if digest.sha256 is not None:
            item["lfs"] = {"oid": digest.sha256, "size": entry.size, "pointerSize": digest.pointer_size}
    if expand:
        item["lastCommit"] = {"id": commit, "title": "Mirror", "date": repo.last_modified}
    return item


def tree_paths(repo: Repo, folder: str, recursive: bool) -> list[tuple[str, str]]:
    """(kind, path) under `folder` ('' = root), folders first at each level like the Hub."""
    prefix = f"{folder}/" if folder else ""
    out: list[tuple[str, str]] = []
    for d in repo.directories():
        if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
            out.append(("directory", d))
    for e in repo.entries:
        if e.path.startswith(prefix) and (recursive or "/" not in e.path[len(prefix):]):
            out.append(("file", e.path))
    return sorted(out, key=lambda kp: (kp[1].rsplit("/", 1)[0] if "/" in kp[1] else "", kp[0] != "directory", kp[1]))


@dataclass(frozen=True)
class Query:
    """The search part of GET /api/models."""

    filters: tuple[str, ...] = ()
    author: str | None = None
    search: str | None = None
    pipeline_tag: str | None = None
    library: tuple[str, ...] = ()
    gated: bool | None = None
    sort: str | None = None
    descending: bool = True

    def matches(self, repo: Repo) -> bool:
        tags = {t.lower() for t in repo.tags}
        for wanted in self.filters:
            if wanted.lower() not in tags:
                return False
        for lib in self.library:
            if (repo.library_name or "").lower() != lib.lower() and lib.lower() not in tags:
                return False
        if self.author and repo.author.lower() != self.author.lower():
            return False
        if self.search and self.search.lower() not in repo.repo_id.lower():
            return False
        if self.pipeline_tag and (repo.pipeline_tag or "").lower() != self.pipeline_tag.lower():
            return False
        if self.gated is not None and bool(repo.gated) != self.gated:
            return False
        return True

    def order(self, repos: list[Repo]) -> list[Repo]:
        repos = sorted(repos, key=lambda r: r.repo_id.lower())
        key = SORT_KEYS.get(self.sort or "")
        if key is None:
            return repos
        return sorted(repos, key=key, reverse=self.descending)
