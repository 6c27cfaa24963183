"""A variant folder (or one bundle) as components, and `verify`: is it complete, well formed, consistent?

A variant folder holds Core ML bundles named the Apple way (`TextEncoder.mlmodelc`, ...),
the package way (`Stable_Diffusion_version_<model>_text_encoder.mlpackage`, ...) or any
other way (`*.mlmodelc`, `*.mlpackage`), plus tokenizer files. `verify` runs the checks in
`coreml_hub.validate` on each bundle and on the pipeline contract between them, merges the
problems plugins report through the `validate_bundle` hook, and optionally re-hashes every
file against the manifest written at pull time.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CoremlHubError
from .layouts import COMPILED_FILE_OF, CONTROLNET_DIR, TOKENIZER_FILES, component_of_stem, component_order
from .store import MANIFEST_NAME, tree_size

if TYPE_CHECKING:
    from .mil.program import Program

ERROR = "error"
WARNING = "warning"
BUNDLE_SUFFIXES = (".mlmodelc", ".mlpackage")
REPULL_HINT = "Re-pull the model with `coreml-hub pull MODEL --variant VARIANT --force`."  # see repair_hint
LOCAL_REPAIR_HINT = ("It is not a pulled model, so `coreml-hub pull --force` cannot mend it: convert it again "
                     "or copy it again from where it came from.")


@dataclass(frozen=True)
class Problem:
    """One thing wrong (error) or worth knowing (warning) about a file of a variant."""

    severity: str  # "error" | "warning"
    path: str  # the file or folder concerned, relative to what was verified
    message: str
    hint: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "path": self.path, "message": self.message, "hint": self.hint}


@dataclass(frozen=True)
class Port:
    """A model input or output: name, MIL dtype, shape (ints, or strings for unknown dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape) if self.shape is not None else None}


@dataclass
class Component:
    """One bundle of a variant. `name` is a component name (`unet`, ...) or the bundle's stem."""

    name: str
    path: Path
    format: str  # "compiled" (.mlmodelc) or "packages" (.mlpackage)
    known: bool = True  # a pipeline component coreml-hub knows the contract of
    program: "Program | None" = field(default=None, repr=False)  # set once the checks have read it

    @property
    def display_name(self) -> str:
        if self.name == "controlnet":
            return self.path.stem
        if self.known and self.format == "compiled":
            return COMPILED_FILE_OF.get(self.name, self.name)
        return self.name

    def inputs(self) -> tuple[Port, ...]:
        if self.program is None or "main" not in self.program.functions:
            return ()
        return _input_ports(self.program.main)

    def outputs(self) -> tuple[Port, ...]:
        if self.program is None or "main" not in self.program.functions:
            return ()
        return _output_ports(self.program.main)

    def port(self, name: str, output: bool = False) -> Port | None:
        for port in self.outputs() if output else self.inputs():
            if port.name == name:
                return port
        return None

    def op_histogram(self) -> dict[str, int]:
        return dict(self.program.op_histogram()) if self.program is not None else {}


def _port(name: str, vtype: Any) -> Port:
    from .mil.program import TensorType

    if isinstance(vtype, TensorType):
        return Port(name, vtype.dtype, vtype.shape)
    return Port(name, type(vtype).__name__, None)


def _input_ports(function: Any) -> tuple[Port, ...]:
    return tuple(_port(v.name, v.type) for v in function.inputs)


def _output_ports(function: Any) -> tuple[Port, ...]:
    return tuple(_port(name, t) for name, t in function.output_types().items())


@dataclass
class Bundle:
    """What `verify` and plugins see: a variant folder (or a single bundle) and its components."""

    path: Path
    components: list[Component]
    is_variant: bool
    attention: str | None = None  # as the variant declares it (pull manifest), when known
    manifest: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """`model` for a single-model variant (plain Core ML repos), else `pipeline`, as the pull manifest says."""
        variant = (self.manifest or {}).get("variant")
        declared = variant.get("kind") if isinstance(variant, dict) else None
        return "model" if declared == "model" else "pipeline"

    def get(self, name: str) -> Component | None:
        """The first component of that name (compiled before packages when a folder has both)."""
        for component in self.components:
            if component.name == name:
                return component
        return None

    @property
    def format(self) -> str | None:
        formats = {c.format for c in self.components}
        return formats.pop() if len(formats) == 1 else ("mixed" if formats else None)

    def relative(self, path: Path) -> str:
        """A path as problems show it: relative to the verified folder when inside it."""
        base = self.path if self.is_variant else self.path.parent
        try:
            return path.relative_to(base).as_posix() or "."
        except ValueError:
            return str(path)

    def tokenizer_dir(self) -> Path | None:
        for folder in (self.path, self.path / "tokenizer"):
            if all((folder / name).is_file() for name in TOKENIZER_FILES):
                return folder
        return None


def component_name(bundle_name: str) -> tuple[str, bool]:
    """`Unet.mlmodelc` -> ("unet", True); `..._vae_decoder.mlpackage` -> ("vae_decoder", True)."""
    stem = bundle_name
    for suffix in BUNDLE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    found = component_of_stem(stem)
    return (found, True) if found is not None else (stem, False)


def is_bundle(path: Path) -> bool:
    return path.suffix in BUNDLE_SUFFIXES or (path / "Manifest.json").is_file() or (path / "model.mil").is_file()


def _bundle_format(path: Path) -> str:
    if path.suffix == ".mlpackage" or (path / "Manifest.json").exists():
        return "packages"
    return "compiled"


def find_bundles(folder: Path) -> list[Path]:
    """Bundles directly in `folder` (and its `controlnet/` folder), else one level down (an extracted
    archive's `compiled/`)."""
    found = sorted(p for p in folder.iterdir() if p.is_dir() and p.suffix in BUNDLE_SUFFIXES)
    if found:
        controlnets = folder / CONTROLNET_DIR
        if controlnets.is_dir():
            found += sorted(p for p in controlnets.iterdir() if p.is_dir() and p.suffix in BUNDLE_SUFFIXES)
        return found
    deeper: list[Path] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        deeper.extend(sorted(p for p in sub.iterdir() if p.is_dir() and p.suffix in BUNDLE_SUFFIXES))
    return deeper


def variant_folders(root: Path, depth: int = 3) -> list[Path]:
    """Folders under `root` (itself included, `depth` levels down) that hold a variant's bundles."""
    found: list[Path] = []
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        if any(e.suffix in BUNDLE_SUFFIXES for e in entries):
            if any(c.known for c in open_bundle(folder).components):
                found.append(folder)
            continue
        if level < depth:
            stack.extend((e, level + 1) for e in reversed(entries) if e.is_dir() and not e.name.startswith("."))
    return sorted(found)


def one_variant(path: Path, command: str) -> Path | None:
    """The variant folder under `path` (such as the `-o` folder of `convert`), None when there is none.

    `run` and `verify` take the same folders: several variants under `path` is a usage error naming them.
    """
    from .errors import UsageError

    folders = variant_folders(path)
    if len(folders) > 1:
        listing = "\n  ".join(str(f) for f in folders)
        example = f"coreml-hub {command} {folders[0]}" + (' "PROMPT"' if command == "run" else "")
        raise UsageError(f"{path} holds several variants; name one:\n  {listing}", hint=f"For example: {example}")
    return folders[0] if folders else None


def open_bundle(path: str | os.PathLike[str], attention: str | None = None) -> Bundle:
    """A variant folder or a single bundle, with its components (nothing is read yet)."""
    from .errors import InvalidBundle

    path = Path(path)
    if not path.exists():
        raise InvalidBundle(f"{path} does not exist.", hint="Give a bundle (.mlmodelc/.mlpackage) or a variant folder.")
    if not path.is_dir():
        raise InvalidBundle(f"{path} is a file; a Core ML bundle is a folder (.mlmodelc or .mlpackage).",
                            hint="Give the bundle folder or the variant folder that holds it.")
    manifest = _read_manifest(path)
    if is_bundle(path):
        name, known = component_name(path.name)
        component = Component(name=name, path=path, format=_bundle_format(path), known=known)
        return Bundle(path=path, components=[component], is_variant=False, attention=attention, manifest=manifest)
    components = []
    for bundle_path in find_bundles(path):
        name, known = component_name(bundle_path.name)
        if bundle_path.parent.name == CONTROLNET_DIR and bundle_path.parent != path:
            name, known = "controlnet", True  # Apple names them after the ControlNet (LllyasvielSdControlnetCanny)
        components.append(Component(name=name, path=bundle_path, format=_bundle_format(bundle_path), known=known))
    # compiled first: when a folder holds both forms of a component, the contract reads the compiled one
    components.sort(key=lambda c: (c.format != "compiled", component_order(c.name), c.path.name))
    if attention is None and manifest is not None:
        declared = (manifest.get("variant") or {}).get("attention") if isinstance(manifest.get("variant"), dict) else None
        attention = declared if isinstance(declared, str) else None
    return Bundle(path=path, components=components, is_variant=True, attention=attention, manifest=manifest)


def pulled_ref(manifest: dict[str, Any] | None) -> str | None:
    """`REPO:VARIANT` of a pull manifest (with ` --chunked` for the chunked Unet form), else None."""
    if not isinstance(manifest, dict):
        return None
    variant = manifest.get("variant")
    repo, vid = manifest.get("repo"), variant.get("id") if isinstance(variant, dict) else None
    if not isinstance(repo, str) or not isinstance(vid, str):
        return None
    chunked = manifest.get("unet_form") == "chunked"
    return f"{repo}:{vid}" + (" --chunked" if chunked else "")


def repair_hint(path: str | os.PathLike[str]) -> str:
    """How to mend a damaged file of the variant or bundle at `path`: pull it again when it was
    pulled, else make it again (a local folder has nothing `pull --force` could fetch)."""
    ref = pulled_ref(_read_manifest(Path(path)))
    if ref is None:
        return LOCAL_REPAIR_HINT
    return f"Pull it again with `coreml-hub pull {ref} --force`."


def _read_manifest(path: Path) -> dict[str, Any] | None:
    for folder in (path, path.parent):
        file = folder / MANIFEST_NAME
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {"_unreadable": str(file)}
            return data if isinstance(data, dict) else {"_unreadable": str(file)}
    return None


# -- verify ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify`: every problem found; `ok` when none is an error."""

    path: Path
    kind: str  # "variant" or "bundle"
    components: tuple[str, ...]
    problems: tuple[Problem, ...]
    hashed_files: int | None = None  # files re-hashed with --hashes
    attention: str | None = None  # as read from the bundles (einsum => split_einsum)

    @property
    def ok(self) -> bool:
        return not any(p.is_error for p in self.problems)

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.is_error)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if not p.is_error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "ok": self.ok,
            "components": list(self.components),
            "attention": self.attention,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "hashed_files": self.hashed_files,
            "problems": [p.to_dict() for p in self.problems],
        }


def verify(target: str | os.PathLike[str], *, hashes: bool = False, attention: str | None = None,
           progress: bool = False, plugins: bool = True, chunked: bool | None = None) -> VerifyReport:
    """Check a variant folder, a single bundle, or a pulled `MODEL[:VARIANT]` (`chunked` picks its Unet form).

    Structural checks always run; `hashes=True` also re-hashes every file against the pull
    manifest. Bad input never raises: every finding is a `Problem` in the report.
    """
    path = resolve_target(target, chunked=chunked)
    if path.is_dir() and not is_bundle(path) and not find_bundles(path):
        path = one_variant(path, "verify") or path  # OUT of `convert`: OUT/<attention>/packages
    bundle = open_bundle(path, attention=attention)
    return verify_bundle(bundle, hashes=hashes, progress=progress, plugins=plugins)


def verify_variant(path: str | os.PathLike[str], kind: str | None = None) -> VerifyReport:
    """The structural checks `pull` runs before marking a variant complete (no hashing).

    `kind="model"` checks a single-model variant (its bundle only, no pipeline contract)
    before its manifest exists.
    """
    return verify_bundle(open_bundle(Path(path)), hashes=False, kind=kind)


def verify_bundle(bundle: Bundle, *, hashes: bool = False, progress: bool = False,
                  plugins: bool = True, kind: str | None = None) -> VerifyReport:
    from . import validate

    problems: list[Problem] = []
    problems.extend(validate.check_components(bundle))
    # a single-model variant is valid when its bundle is: the diffusion contract is not its own
    if bundle.is_variant and (kind or bundle.kind) != "model":
        problems.extend(validate.guarded(validate.check_contract, bundle, where="."))
    if plugins:
        problems.extend(_plugin_problems(bundle))
    hashed = None
    if hashes:
        hash_problems, hashed = validate.check_hashes(bundle, progress=progress)
        problems.extend(hash_problems)
    mend = repair_hint(bundle.path)
    problems = [replace(p, hint=mend) if p.hint == REPULL_HINT else p for p in problems]
    return VerifyReport(
        path=bundle.path,
        kind="variant" if bundle.is_variant else "bundle",
        components=tuple(bundle.relative(c.path) for c in bundle.components),
        problems=tuple(problems),
        hashed_files=hashed,
        attention=validate.attention_from_bundles(bundle),
    )


def _plugin_problems(bundle: Bundle) -> list[Problem]:
    from .plugins import load_plugins, pm

    load_plugins()
    found: list[Problem] = []
    for impl in pm.hook.validate_bundle.get_hookimpls():
        try:
            result = impl.function(bundle=bundle)
        except Exception as exc:  # a plugin's failure is reported, never fatal
            found.append(Problem(WARNING, ".", f"plugin {impl.plugin_name!r} failed while validating: "
                                               f"{type(exc).__name__}: {exc}"))
            continue
        for item in result or ():
            if isinstance(item, Problem):
                found.append(item)
            else:
                found.append(Problem(ERROR, ".", f"{impl.plugin_name}: {item}"))
    return found


def resolve_target(target: str | os.PathLike[str], *, chunked: bool | None = None) -> Path:
    """A path as given, or the store folder of a pulled `MODEL[@REV][:VARIANT]` (`chunked`: its Unet form)."""
    if isinstance(target, os.PathLike) or Path(str(target)).exists():
        if chunked is not None:
            from .errors import UsageError

            raise UsageError(f"--chunked/--no-chunked picks the Unet form of a pulled model; {target} is a path.",
                             hint="Drop the flag, or name the model as ORG/NAME[:VARIANT].")
        return Path(target)
    text = str(target)
    if text.startswith(("/", "./", "../", "~")) or text.rstrip("/").endswith(BUNDLE_SUFFIXES):
        from .errors import InvalidBundle

        raise InvalidBundle(f"{text} does not exist.",
                            hint="Give a variant folder or a bundle, or a pulled model as ORG/NAME[:VARIANT].")
    from .store import find_pulled

    return find_pulled(text, chunked=chunked).path


# -- inspect -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Inspection:
    """What `inspect` shows about one bundle."""

    path: Path
    format: str
    program_version: str
    functions: tuple[tuple[str, str], ...]  # (name, opset)
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    ops: dict[str, int]  # op type -> count, most frequent first
    weights: dict[str, int]  # dtype -> bytes stored in weight files
    weight_count: int
    size_bytes: int  # the bundle on disk
    mil: str | None = None
    problems: tuple[Problem, ...] = ()  # weights the files cannot give (a truncated or damaged weight file)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "path": str(self.path),
            "format": self.format,
            "program_version": self.program_version,
            "functions": [{"name": n, "opset": o} for n, o in self.functions],
            "inputs": [p.to_dict() for p in self.inputs],
            "outputs": [p.to_dict() for p in self.outputs],
            "ops": self.ops,
            "op_count": sum(self.ops.values()),
            "weights": self.weights,
            "weight_bytes": sum(self.weights.values()),
            "weight_count": self.weight_count,
            "size_bytes": self.size_bytes,
            "problems": [p.to_dict() for p in self.problems],
        }
        if self.mil is not None:
            data["mil"] = self.mil
        return data


def _single_model_bundle(path: Path) -> Path | None:
    """The one bundle of a single-model variant folder (plain Core ML repos, as its pull manifest
    says), else None."""
    manifest = _read_manifest(path)
    variant = (manifest or {}).get("variant")
    if isinstance(variant, dict) and variant.get("kind") == "model":
        found = find_bundles(path)
        if len(found) == 1:
            return found[0]
    return None


def declared_shape(path: str | os.PathLike[str], name: str | None = None, *,
                   output: bool = False) -> tuple[int, ...] | None:
    """An input's (or output's) shape as a bundle's description declares it: `metadata.json` of a
    `.mlmodelc`, the model spec of a `.mlpackage`. Quick (the program is not read); `name` None
    takes the first; None when the description cannot tell."""
    path = Path(path)
    try:
        if _bundle_format(path) == "compiled":
            from .validate import parse_shape_string

            meta = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
            meta = meta[0] if isinstance(meta, list) else meta
            entries = meta["outputSchema" if output else "inputSchema"]
            entry = next(e for e in entries if name is None or e.get("name") == name)
            return parse_shape_string(entry.get("shape"))
        from .mil.proto import load_spec

        description = load_spec(path).description
        features = description.output if output else description.input
        feature = next(f for f in features if name is None or f.name == name)
        shape = tuple(int(d) for d in feature.type.multiArrayType.shape)
        return shape or None
    except (OSError, ValueError, KeyError, IndexError, TypeError, StopIteration, CoremlHubError):
        return None


def load_bundle_program(path: str | os.PathLike[str]) -> "Program":
    """The ML Program of a `.mlmodelc` (model.mil) or `.mlpackage` (protobuf spec)."""
    from .errors import InvalidBundle

    path = Path(path)
    if not path.is_dir() or not is_bundle(path):
        raise InvalidBundle(f"{path} is not a Core ML bundle (.mlmodelc or .mlpackage folder).",
                            hint="Give one bundle, e.g. `Unet.mlmodelc`; `coreml-hub verify` takes a variant folder.")
    if _bundle_format(path) == "compiled":
        from .mil.text import load

        return load(path / "model.mil")
    from .mil.proto import load_program

    return load_program(path)


def component_path(target: str | os.PathLike[str], component: str | None = None, *,
                   chunked: bool | None = None) -> Path:
    """The bundle `inspect` shows: TARGET itself when it is a bundle, else the bundle named `component`
    (`unet`, `vae_decoder`, `Unet.mlmodelc`...) of the variant TARGET is: a folder, or a pulled `MODEL[:VARIANT]`.
    A single-model variant (plain Core ML repos) needs no `component`: its one bundle is meant."""
    from .errors import InvalidBundle, UsageError

    path = resolve_target(target, chunked=chunked)
    if is_bundle(path) and path.is_dir():
        if component is not None:
            raise UsageError(f"{target} is a bundle already; --component picks a bundle of a variant.",
                             hint="Drop --component.")
        return path
    if not path.is_dir():
        raise InvalidBundle(f"{path} is not a Core ML bundle (.mlmodelc or .mlpackage folder).",
                            hint="Give one bundle, e.g. `Unet.mlmodelc`, or a variant with --component.")
    if not find_bundles(path):
        path = one_variant(path, "inspect") or path
    single = _single_model_bundle(path) if component is None else None
    if single is not None:  # a pulled single model (plain Core ML repos) names its one bundle
        return single
    components = open_bundle(path).components
    names = ", ".join(dict.fromkeys(c.name for c in components)) or "none"
    if component is None:
        example = components[0].name if components else "unet"
        raise UsageError(f"{target} is not a Core ML bundle but a variant; name one of its bundles with --component "
                         f"({names}).", hint=f"For example: coreml-hub inspect {target} --component {example}")
    wanted = component.strip().lower()
    for c in components:
        if wanted in (c.name.lower(), c.display_name.lower(), c.path.name.lower()):
            return c.path
    raise UsageError(f"{target} has no {component!r} bundle; it has: {names}.",
                     hint="Name one of those with --component.")


def inspect_bundle(path: str | os.PathLike[str], mil: bool = False) -> Inspection:
    """Inputs, outputs, op histogram and weight bytes by dtype of one bundle (and its MIL text)."""
    from .mil.blob import packed_size
    from .mil.text import dumps

    path = Path(path)
    program = load_bundle_program(path)
    main = program.functions.get("main") or next(iter(program.functions.values()), None)
    inputs = _input_ports(main) if main else ()
    outputs = _output_ports(main) if main else ()
    weights: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for _op, _key, value in program.blob_values():
        ref = value.data
        if (ref.path, ref.offset) in seen:
            continue
        seen.add((ref.path, ref.offset))
        dtype = value.type.dtype
        try:
            nbytes = packed_size(dtype, math.prod(value.type.static_shape or ()))
        except KeyError:
            continue
        weights[dtype] = weights.get(dtype, 0) + nbytes
    histogram = program.op_histogram()
    from . import validate

    opened = open_bundle(path)
    problems = validate.check_blobs(opened, opened.components[0], program)
    mend = repair_hint(path)
    return Inspection(
        path=path,
        format=_bundle_format(path),
        program_version=program.version,
        functions=tuple((f.name, f.opset) for f in program.functions.values()),
        inputs=inputs,
        outputs=outputs,
        ops=dict(histogram.most_common()),
        weights=dict(sorted(weights.items(), key=lambda kv: -kv[1])),
        weight_count=len(seen),
        size_bytes=tree_size(path),
        mil=dumps(program) if mil else None,
        problems=tuple(replace(p, hint=mend) if p.hint == REPULL_HINT else p for p in problems),
    )
