"""Tasks: what `coreml-hub run` does with a model, recognized from the model itself.

A task is an object a plugin registers through the `register_tasks` hook (the built-in
ones too, exactly as a third party would):

    class DepthEstimation:
        name = "depth-estimation"
        description = "Depth map of an image, as 16-bit and colorized PNGs."
        options = ("fit",)                                  # the run options it reads
        def recognize(self, model: ModelInfo) -> float: ...   # 0: not mine ... 1: certainly mine
        def run(self, model: ModelInfo, request: TaskRequest) -> TaskResult: ...

`run(model, inputs, ...)` is the one library call behind `coreml-hub run`: it resolves MODEL
(a repo id, pulled when missing; REPO:VARIANT; a pulled model; a folder; one bundle),
describes it (`ModelInfo`: each bundle's declared inputs, outputs, states and metadata, the
diffusion components found, the repo's `pipeline_tag`), asks every task how well it
recognizes it and runs the best one, or the one `task=` names.

Scores, so that tasks from different plugins compare: `NAMED` (1.0) where the model's own
metadata names the task, `KNOWN` (0.9) for the exact contract of a known export, `SHAPED`
(0.5) for a structural match; the repo's `pipeline_tag` adds `TAG_BONUS` to the task it
names. A tie at the top is an error that asks for `--task`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

from .errors import AmbiguousTask, CoremlHubError, InvalidBundle, NoTaskFound, UsageError

if TYPE_CHECKING:
    from .mil.spec import FeatureDescription
    from .pipeline.resolve import ResolvedModel

Notify = Callable[[str], None]

NAMED = 1.0
KNOWN = 0.9
SHAPED = 0.5
TAG_BONUS = 0.1

# Metadata keys exporters write that name a model's task (Hugging Face exporters, Apple's previews).
TASK_KEY = "co.huggingface.exporters.task"
PREVIEW_KEY = "com.apple.coreml.model.preview.type"
PREVIEW_TASKS = {"depthEstimation": "depth-estimation", "imageClassifier": "image-classification",
                 "imageSegmenter": "image-segmentation", "textGenerator": "text-generation"}


@dataclass(frozen=True)
class BundleSpec:
    """One Core ML bundle as a task sees it: what its default function takes and gives, and its metadata."""

    path: Path
    inputs: tuple[FeatureDescription, ...]
    outputs: tuple[FeatureDescription, ...]
    states: tuple[FeatureDescription, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)  # user-defined entries
    description: str = ""
    classifier: bool = False

    @property
    def name(self) -> str:
        return self.path.stem

    def input(self, name: str) -> FeatureDescription | None:
        return next((f for f in self.inputs if f.name == name), None)

    def output(self, name: str) -> FeatureDescription | None:
        return next((f for f in self.outputs if f.name == name), None)

    @property
    def image_inputs(self) -> tuple[FeatureDescription, ...]:
        return tuple(f for f in self.inputs if f.kind == "image" and f.image is not None)

    def describe(self) -> str:
        """`takes image (RGB 42x28 image); gives depth (GRAYSCALE_FLOAT16 42x28 image)`."""
        def features(items: Iterable[FeatureDescription]) -> str:
            return ", ".join(f"{f.name} ({f.declared()})" for f in items) or "nothing"

        text = f"takes {features(self.inputs)}; gives {features(self.outputs)}"
        if self.states:
            text += f"; keeps state {features(self.states)}"
        return text


def read_bundle_spec(path: Path) -> BundleSpec:
    """The declared interface of a bundle's default function (no weights are read)."""
    from .mil.spec import choose_function, read_spec

    spec = read_spec(path)
    function = spec.function(choose_function(spec, [f.name for f in spec.functions], None))
    if function is None:  # pragma: no cover - choose_function picks a declared one
        raise InvalidBundle(f"{path.name} declares no function.")
    return BundleSpec(path=path, inputs=function.inputs, outputs=function.outputs, states=function.states,
                      metadata=dict(spec.metadata.user_defined), description=spec.metadata.short_description,
                      classifier=bool(function.predicted_feature))


@dataclass(frozen=True)
class ModelInfo:
    """What tasks recognize a model by, and where its files are.

    `bundles` are the Core ML bundles of the variant (one for a plain repo's model);
    `components` the diffusion components among them (text_encoder, unet, ...);
    `pipeline_tag` and `tags` come from the repo, as recorded when it was pulled.
    """

    name: str
    path: Path  # the variant folder, or the bundle itself
    bundles: tuple[Path, ...]
    components: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    tags: tuple[str, ...] = ()
    repo: str | None = None
    variant: str | None = None
    revision: str | None = None
    resolved: ResolvedModel | None = field(default=None, compare=False, repr=False)
    _specs: dict[Path, BundleSpec] = field(default_factory=dict, compare=False, repr=False)

    @property
    def diffusion(self) -> bool:
        """A diffusion pipeline's variant (its bundles are named as components)."""
        return bool(self.components)

    @property
    def folder(self) -> Path:
        """The folder holding the bundles and their companion files (tokenizer, config)."""
        return self.path.parent if self.path in self.bundles else self.path

    @property
    def ref(self) -> str:
        """How to name the model to other commands: `REPO:VARIANT`, or its path."""
        if self.repo and self.variant:
            return f"{self.repo}:{self.variant}"
        return str(self.path)

    def spec(self, bundle: Path) -> BundleSpec:
        """The declared interface of one of the bundles (read once)."""
        if bundle not in self._specs:
            self._specs[bundle] = read_bundle_spec(bundle)
        return self._specs[bundle]

    def specs(self) -> tuple[BundleSpec, ...]:
        return tuple(self.spec(b) for b in self.bundles)

    @property
    def single(self) -> BundleSpec | None:
        """The bundle's interface when the model is one bundle (and no diffusion pipeline)."""
        if self.diffusion or len(self.bundles) != 1:
            return None
        return self.spec(self.bundles[0])

    def names_task(self, task: str) -> bool:
        """Whether a bundle's own metadata names `task` (exporters' task key or Apple's preview type)."""
        if self.diffusion:
            return False
        for spec in self.specs():
            meta = spec.metadata
            if meta.get(TASK_KEY) == task or PREVIEW_TASKS.get(meta.get(PREVIEW_KEY, "")) == task:
                return True
        return False

    def tag_bonus(self, *tags: str) -> float:
        """`TAG_BONUS` when the repo's pipeline_tag is one of `tags`."""
        return TAG_BONUS if self.pipeline_tag and self.pipeline_tag in tags else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The model as --json shows it: where it is and what it is called."""
        if self.resolved is not None:
            return self.resolved.to_dict()
        return {"path": str(self.path), "name": self.name, "repo": self.repo, "variant": self.variant,
                "revision": self.revision}

    def describe(self) -> str:
        """Each bundle's inputs and outputs, in words (for messages)."""
        if self.diffusion:
            return "It is a diffusion pipeline of " + ", ".join(self.components) + "."
        specs = self.specs()
        if len(specs) == 1:
            return f"It {specs[0].describe()}."
        return " ".join(f"{s.path.name} {s.describe()}." for s in specs)


@dataclass(frozen=True)
class TaskRequest:
    """What `run` was asked: positional inputs, images, texts and every other option by name."""

    inputs: tuple[str, ...] = ()  # PROMPT, or image files
    images: tuple[Path, ...] = ()  # --image
    texts: tuple[str, ...] = ()  # --text
    options: Mapping[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None  # None: the default outputs folder
    backend: str = "auto"
    device: str = "auto"
    pull: bool = True
    progress: bool = False
    on_message: Notify | None = field(default=None, compare=False)
    on_text: Callable[[str], None] | None = field(default=None, compare=False)  # streamed text
    started: float | None = None  # time.perf_counter() when the caller began (for wall times); None: run's call

    def option(self, name: str, default: Any = None) -> Any:
        """An option's value, `default` when it was not given or is None."""
        value = self.options.get(name)
        return default if value is None else value

    def say(self, message: str) -> None:
        if self.on_message is not None:
            self.on_message(message)

    def files(self) -> tuple[Path, ...]:
        """Positional inputs and --image together, as files."""
        return tuple(Path(p) for p in self.inputs) + tuple(self.images)

    def folder(self) -> Path:
        from . import paths

        return Path(self.output_dir) if self.output_dir is not None else paths.outputs_dir()


@dataclass(frozen=True)
class Rendering:
    """What `run` prints on stdout for a result: a table, then lines; `-q` prints only `quiet`."""

    rows: tuple[Mapping[str, Any], ...] = ()
    columns: tuple[tuple[str, str], ...] = ()  # (key, HEADER)
    lines: tuple[str, ...] = ()
    quiet: tuple[str, ...] = ()


@runtime_checkable
class TaskResult(Protocol):
    """What a task's run returns: the data for --json and what to print."""

    def to_dict(self) -> dict[str, Any]: ...

    def render(self) -> Rendering: ...


@runtime_checkable
class Task(Protocol):
    """A task plugin object (see the module docstring)."""

    name: str
    description: str
    options: Iterable[str]

    def recognize(self, model: ModelInfo) -> float | bool: ...

    def run(self, model: ModelInfo, request: TaskRequest) -> TaskResult: ...


# -- finding the model ------------------------------------------------------------------------


def resolve(model: str | Path | ResolvedModel, *, pull: bool = True, progress: bool = False,
            on_message: Notify | None = None, chunked: bool | None = None) -> ResolvedModel:
    """MODEL as `run` takes it: a pulled (or now pulled) repo, a variant folder, a folder of bundles, a bundle.

    `chunked` picks a pulled diffusion model's Unet form (see `pipeline.resolve.resolve_model`)."""
    from .bundle import find_bundles, is_bundle
    from .pipeline.resolve import ResolvedModel, resolve_local, resolve_model

    if isinstance(model, ResolvedModel):
        return model
    path = Path(str(model)).expanduser()
    if not path.exists() or chunked is not None:  # a folder with a Unet form asked for: resolve_model's error
        return resolve_model(str(model), pull=pull, progress=progress, on_message=on_message, chunked=chunked)
    path = path.resolve()
    if is_bundle(path):
        return ResolvedModel(path=path, name=path.stem)
    if path.is_file():
        raise InvalidBundle(f"{path} is a file; a Core ML model is a .mlpackage or .mlmodelc folder.",
                            hint="Pass the bundle, the folder holding it, or a repo id.")
    if not find_bundles(path):
        return resolve_local(path)  # a diffusion variant deeper down (`convert -o OUT`), or its clear error
    entry = _store_entry(path)
    if entry is not None:  # a pulled model's store folder keeps its repo, variant and commit
        return ResolvedModel(path=path, name=entry.repo, repo=entry.repo, variant=entry.variant,
                             revision=entry.commit)
    try:
        return resolve_local(path)
    except InvalidBundle:  # bundles, but no diffusion components: a folder of single models
        return ResolvedModel(path=path, name=path.name)


def _store_entry(folder: Path) -> Any:
    from .store import MANIFEST_NAME, load_entry

    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        return load_entry(folder)
    except (OSError, ValueError):
        return None


def describe_model(resolved: ResolvedModel) -> ModelInfo:
    """The `ModelInfo` tasks recognize: bundles, diffusion components, the repo's card data."""
    from .bundle import find_bundles, is_bundle
    from .pipeline.components import find_components

    path = Path(resolved.path)
    if is_bundle(path):
        bundles: tuple[Path, ...] = (path,)
        components: tuple[str, ...] = ()
    else:
        bundles = tuple(find_bundles(path))
        components = tuple(find_components(path))
    card = _repo_card(path if not is_bundle(path) else path.parent)
    return ModelInfo(name=resolved.name, path=path, bundles=bundles, components=components,
                     pipeline_tag=card.get("pipeline_tag"), tags=tuple(card.get("tags") or ()),
                     repo=resolved.repo, variant=resolved.variant, revision=resolved.revision, resolved=resolved)


def _repo_card(folder: Path) -> dict[str, Any]:
    """The repo's pipeline_tag and tags as the pull recorded them (empty for a local folder)."""
    from .store import MANIFEST_NAME

    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    card = manifest.get("repo_card") if isinstance(manifest, dict) else None
    return card if isinstance(card, dict) else {}


# -- choosing the task ------------------------------------------------------------------------


def available_tasks() -> list[Task]:
    """Every registered task, in registration order."""
    from .plugins import get_tasks

    return list(get_tasks())


def _score(task: Task, model: ModelInfo, say: Notify) -> float:
    try:
        return float(task.recognize(model))
    except CoremlHubError:  # the model itself is the problem (unreadable, not an ML Program): say so
        raise
    except Exception as exc:  # a broken plugin must not stop other tasks from running the model
        say(f"Warning: task {getattr(task, 'name', '?')!r} failed to look at the model "
            f"({type(exc).__name__}: {exc}); skipped.")
        return 0.0


def choose_task(model: ModelInfo, name: str | None = None, *, tasks: Iterable[Task] | None = None,
                on_message: Notify | None = None) -> Task:
    """The task `name` names, else the one that recognizes `model` best (a tie is an error)."""
    known = list(tasks) if tasks is not None else available_tasks()
    names = ", ".join(t.name for t in known) or "none"
    if name:
        for task in known:
            if task.name == name:
                return task
        raise UsageError(f"No task named {name!r} is installed (installed: {names}).",
                         hint="`coreml-hub plugins` lists the tasks and the plugins that provide them.")
    say = on_message or (lambda _m: None)
    scored = [(_score(task, model, say), task) for task in known]
    best = max((s for s, _t in scored), default=0.0)
    if best <= 0:
        from .plugins import excluded, restriction

        left_out = excluded()  # a task whose plugin COREML_HUB_PLUGINS filtered out is not missing
        if left_out:
            raise NoTaskFound(f"No loaded task knows what to do with {model.name} ({restriction()} leaves out "
                              f"{', '.join(left_out)}). {model.describe()}",
                              hint=f"Add the task's plugin to {restriction()}, or unset COREML_HUB_PLUGINS.")
        raise NoTaskFound(
            f"No task knows what to do with {model.name}. {model.describe()}",
            hint=f"Run it once with `coreml-hub predict {model.ref} -i NAME=VALUE` for each input, "
                 f"or name a task with --task (installed: {names}).")
    tied = [t for s, t in scored if abs(s - best) < 1e-9]
    if len(tied) > 1:
        listed = ", ".join(t.name for t in tied)
        raise AmbiguousTask(f"{model.name} fits {len(tied)} tasks equally well: {listed}. {model.describe()}",
                            hint=f"Name one with --task, e.g. `--task {tied[0].name}`.")
    return tied[0]


def check_options(task: Task, given: Iterable[str], flags: Mapping[str, str] | None = None) -> None:
    """Refuse options the user set that the chosen task does not read (they would be silently ignored)."""
    takes = set(task.options)
    unused = [n for n in given if n not in takes]
    if not unused:
        return
    def flag(name: str) -> str:
        if flags is None:
            return "--" + name.replace("_", "-")
        return flags.get(name) or f"--option {name}=VALUE"  # a plugin's option has no flag of its own

    listed = ", ".join(flag(n) for n in unused)
    own = ", ".join(sorted(flag(n) for n in takes)) or "none"
    raise UsageError(f"{listed} {'is' if len(unused) == 1 else 'are'} not used by the {task.name} task.",
                     hint=f"Options of {task.name}: {own}.")


def run(model: str | Path | ResolvedModel, inputs: Iterable[str] = (), *, task: str | None = None,
        images: Iterable[str | Path] = (), texts: Iterable[str] = (), options: Mapping[str, Any] | None = None,
        given: Iterable[str] | None = None, flags: Mapping[str, str] | None = None,
        output_dir: str | Path | None = None, backend: str = "auto", device: str = "auto", pull: bool = True,
        progress: bool = False, on_message: Notify | None = None,
        on_text: Callable[[str], None] | None = None, started: float | None = None) -> TaskResult:
    """Run MODEL on `inputs` with the task it is for (or `task`): what `coreml-hub run` does.

    `options` are the task's options by name (`steps`, `top_k`, `max_new_tokens`, ...);
    `given` names those set explicitly, and each must be one the task reads (default: every
    key of `options`). `on_text` receives generated text as it comes. `started` (a
    `time.perf_counter()` value) is when the caller began, for the wall time a task reports.
    """
    import time

    started = time.perf_counter() if started is None else started
    options = dict(options or {})
    given = list(options) if given is None else list(given)
    resolved = resolve(model, pull=pull, progress=progress, on_message=on_message, chunked=options.get("chunked"))
    info = describe_model(resolved)
    chosen = choose_task(info, task, on_message=on_message)
    check_options(chosen, given, flags)
    request = TaskRequest(inputs=tuple(str(i) for i in inputs), images=tuple(Path(p) for p in images),
                          texts=tuple(texts), options=options,
                          output_dir=Path(output_dir) if output_dir is not None else None, backend=backend,
                          device=device, pull=pull, progress=progress, on_message=on_message, on_text=on_text,
                          started=started)
    return chosen.run(info, request)


# -- helpers for single-model tasks -----------------------------------------------------------


def load_bundle(path: Path, request: TaskRequest) -> Any:
    """Load one bundle for a single-model task with the portable runtime (the torch backend).

    Single-model tasks use what the runtime gives beyond arrays (PIL images in and out,
    classifier labels, state), which Core ML through coremltools' array wrapper does not.
    """
    from .errors import BackendUnavailable
    from .pipeline.components import select_backend

    wanted = (request.backend or "auto").lower()
    if wanted not in ("auto", "torch"):
        raise BackendUnavailable(f"The {wanted} backend cannot run this task; it runs on the torch backend "
                                 "(the portable runtime).", hint="Drop --backend, or pass --backend torch.")
    backend = select_backend("torch")
    try:
        return backend.load(path, device=request.device)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidBundle(f"Cannot load {path.name}: {type(exc).__name__}: {exc}") from exc


def read_images(request: TaskRequest, example: str) -> list[tuple[Path, Any]]:
    """The IMAGE arguments and --image files as (path, RGB image), read before any model loads, so a
    file that is not an image fails at once."""
    from .pipeline.images import open_image

    if request.texts:
        raise UsageError("This task takes images, not --text.", hint=f"For example: {example}")
    files = request.files()
    if not files:
        raise UsageError("This task takes one or more IMAGE files after MODEL (or --image).",
                         hint=f"For example: {example}")
    return [(path, open_image(path, what="Image", option="IMAGE")) for path in files]


def image_input(spec: BundleSpec) -> FeatureDescription | None:
    """The model's one image input, when it takes exactly one input and that is an image."""
    images = spec.image_inputs
    return images[0] if len(images) == 1 and len(spec.inputs) == 1 else None


@dataclass(frozen=True)
class LoadedImageModel:
    """A single-bundle model with one image input, loaded: what image tasks run."""

    spec: BundleSpec
    image: FeatureDescription  # the image input (its `image` format gives the size)
    model: Any
    load_seconds: float

    def predict(self, picture: Any, fit: str = "stretch") -> dict[str, Any]:
        """Outputs for one RGB PIL image, fitted to the input's size (`stretch`, `crop` its middle, or `pad`)."""
        from .pipeline.images import fit_image

        assert self.image.image is not None
        fitted = fit_image(picture, self.image.image.width, self.image.image.height, fit)
        return self.model.predict({self.image.name: fitted})


def load_image_model(model: ModelInfo, request: TaskRequest, what: str) -> LoadedImageModel:
    """Load a single-bundle model that takes one image, or fail saying it is not `what`."""
    import time

    spec = model.single
    feature = image_input(spec) if spec is not None else None
    if spec is None or feature is None or feature.image is None:
        raise UsageError(f"{model.name} is not {what}. {model.describe()}")
    started = time.perf_counter()
    loaded = load_bundle(spec.path, request)
    return LoadedImageModel(spec, feature, loaded, time.perf_counter() - started)


def one_input(request: TaskRequest, what: str, example: str) -> str:
    """The one positional input a task takes (a prompt), with a clear error otherwise."""
    if len(request.inputs) != 1:
        got = "none" if not request.inputs else f"{len(request.inputs)}: " + ", ".join(map(repr, request.inputs))
        raise UsageError(f"This task takes one {what} after MODEL (got {got}).", hint=f"For example: {example}")
    return request.inputs[0]


__all__ = ["AmbiguousTask", "BundleSpec", "KNOWN", "LoadedImageModel", "ModelInfo", "NAMED", "NoTaskFound",
           "Rendering", "SHAPED", "TAG_BONUS", "Task", "TaskRequest", "TaskResult", "available_tasks", "check_options",
           "choose_task", "describe_model", "image_input", "load_bundle", "load_image_model", "one_input",
           "read_bundle_spec", "read_images", "resolve", "run"]
