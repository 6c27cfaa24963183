"""The `text-to-image` task: Stable Diffusion variants, through `coreml_hub.pipeline.generate`.

A thin adapter: every `run` option named like a keyword of `generate` reaches it unchanged
(so an option the pipeline gains needs no change here), `--image` becomes `image=` (the init
image), and the pipeline's result is what `run` prints and `--json` shows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from coreml_hub.errors import UsageError
from coreml_hub.hookspecs import hookimpl
from coreml_hub.tasks import KNOWN, ModelInfo, Rendering, TaskRequest, one_input

# Keywords of `generate` that `run` fills itself rather than from an option of the same name.
_FILLED = {"model", "prompt", "image", "output_dir", "backend", "device", "pull", "progress", "on_message",
           "started"}
# Options spelled as the command line says them, which `generate` takes as another keyword.
_RENAMED = ("no_t5", "refiner_model", "no_refiner")


@lru_cache(maxsize=1)
def _generate_keywords() -> frozenset[str]:
    from coreml_hub.pipeline.generate import generate

    return frozenset(inspect.signature(generate).parameters) - _FILLED


@dataclass(frozen=True)
class TextToImageResult:
    """The pipeline's RunResult, printed as image paths."""

    result: Any  # coreml_hub.pipeline.generate.RunResult

    def to_dict(self) -> dict[str, Any]:
        return {"task": TextToImage.name, **self.result.to_dict()}

    def render(self) -> Rendering:
        lines = tuple(str(p) for saved in self.result.images for p in (*saved.intermediates, saved.path))
        return Rendering(lines=lines, quiet=lines)


class TextToImage:
    name = "text-to-image"
    description = "Images from a prompt (or an init image) with a Stable Diffusion variant; PNGs with settings."

    @property
    def options(self) -> frozenset[str]:
        return _generate_keywords() | set(_RENAMED)

    def recognize(self, model: ModelInfo) -> float:
        # A diffusion variant is known by its components (Unet, MMDiT, text encoders, VAE); a
        # partial one still belongs here, so that running it says what is missing.
        if not model.components:
            return 0.0
        return KNOWN + model.tag_bonus("text-to-image", "image-to-image")

    def run(self, model: ModelInfo, request: TaskRequest) -> TextToImageResult:
        from coreml_hub.pipeline.generate import generate

        prompt = one_input(request, "PROMPT", f'coreml-hub run {model.ref} "a photo of a red fox"')
        if len(request.images) > 1:
            raise UsageError("text-to-image takes one --image (the init image).")
        kwargs = generate_keywords(request.options)
        result = generate(model.resolved or str(model.path), prompt,
                          image=request.images[0] if request.images else None, output_dir=request.output_dir,
                          backend=request.backend, device=request.device, pull=request.pull,
                          progress=request.progress, on_message=request.on_message, started=request.started,
                          **kwargs)
        return TextToImageResult(result)


def generate_keywords(options: dict[str, Any] | Any) -> dict[str, Any]:
    """`generate`'s keywords from run's options: same names pass unchanged, a few are spelled otherwise."""
    keywords = _generate_keywords()
    kwargs = {k: v for k, v in options.items() if k in keywords}
    if isinstance(kwargs.get("compute_unit"), str):
        kwargs["compute_unit"] = kwargs["compute_unit"].upper()
    if "no_t5" in options:
        kwargs["t5"] = not options["no_t5"]
    refiner_model, no_refiner = options.get("refiner_model"), options.get("no_refiner")
    if refiner_model and no_refiner:
        raise UsageError("--refiner and --no-refiner contradict each other.", hint="Pass one of them.")
    if refiner_model or no_refiner is not None:
        kwargs["refiner"] = refiner_model if refiner_model else not no_refiner
    return kwargs


@hookimpl
def register_tasks(register: Any) -> None:
    register(TextToImage())
