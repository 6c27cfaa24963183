"""The SDXL refiner: a second Unet that denoises the last part of the schedule.

A variant carries it as `UnetRefiner.mlmodelc` (or `UnetRefinerChunk1/2`) or
`..._refiner.mlpackage` (Apple's layout), or it comes from another pulled variant
(`--refiner MODEL[:VARIANT]`: its refiner bundle, or its Unet when that Unet is a refiner).
It reads only the second text encoder (the base's TextEncoder2: its states before the last
layer and its pooled output) and five time ids: height, width, crop top, crop left and an
aesthetic score (6 for the prompt, 2.5 for the negative prompt, as diffusers and Apple's
pipeline use); an empty negative prompt is encoded, not zeroed, as the refiner's config says.

The split is diffusers' base+refiner ensemble: with `--refiner-start F` (default 0.8, Apple's
`refinerStart`) the base runs the timesteps at or above `round(1000 (1 - F))` and the refiner the
rest, with a fresh scheduler started at that step (diffusers' `denoising_end` / `denoising_start`).
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import InvalidBundle, UnsupportedSize, UsageError
from .components import Component, unet_names
from .diffusion import SCALE_SDXL, Conditioning, StableDiffusion, StepCallback
from .tokenizer import ClipTokenizer

DEFAULT_REFINER_START = 0.8  # Apple's PipelineConfiguration.refinerStart
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
REFINER_TIME_IDS = 5
HINT = "Pass a refiner made for this model (an SDXL refiner), or drop --refiner."


def refiner_names(found: Iterable[str]) -> tuple[str, ...]:
    """A variant's refiner bundles: UnetRefiner, else both chunks; () when it has none."""
    names = set(found)
    if "refiner" in names:
        return ("refiner",)
    if {"refiner_chunk1", "refiner_chunk2"} <= names:
        return ("refiner_chunk1", "refiner_chunk2")
    return ()


def check_refiner_start(start: float) -> None:
    if not 0.0 < start < 1.0:
        raise UsageError(f"--refiner-start must be between 0 and 1 (exclusive), got {start}.",
                         hint=f"It is the fraction of the schedule the base Unet runs; Apple's default is "
                              f"{DEFAULT_REFINER_START}.")


class SDXLRefiner(StableDiffusion):
    """The refiner Unet with its own conditioning; the denoising loop is StableDiffusion's."""

    def __init__(self, unet: list[Component], text_encoder_2: Component, tokenizer_2: ClipTokenizer,
                 vae_decoder: Component, scheduler_config: dict[str, Any], *, start: float = DEFAULT_REFINER_START,
                 name: str = "") -> None:
        keys = ("unet",) if len(unet) == 1 else ("unet_chunk1", "unet_chunk2")
        self.components = {**dict(zip(keys, unet)), "text_encoder_2": text_encoder_2, "vae_decoder": vae_decoder}
        self.tokenizers = [tokenizer_2]
        self.scheduler_config = scheduler_config
        self.unet_parts = [self.components[n] for n in unet_names(self.components)]
        self.name = name
        where = name or unet[0].path.name
        self.geometry = self._read_geometry()
        time_ids = self.unet_inputs().get("time_ids")
        if not self.geometry.sdxl or time_ids is None or time_ids.shape[-1] != REFINER_TIME_IDS:
            got = "no time ids" if time_ids is None else f"time ids {list(time_ids.shape)}"
            raise InvalidBundle(f"{where} is not an SDXL refiner: its Unet takes {got}, not "
                                f"[B, {REFINER_TIME_IDS}] (sizes, crop, aesthetic score).", hint=HINT)
        width = text_encoder_2.outputs.get("hidden_embeds")
        width = width.shape[-1] if width is not None and width.shape else None
        if width is not None and width != self.geometry.hidden_size:
            raise InvalidBundle(f"{where} belongs to another model family: it reads {self.geometry.hidden_size}-wide "
                                f"text states, this model's TextEncoder2 makes {width}.", hint=HINT)
        self.scale_factor = SCALE_SDXL
        self.zero_empty_negative = False
        self.start = start
        self._conditioning: dict[tuple[str, str], Conditioning] = {}

    def check_matches(self, base: StableDiffusion) -> None:
        """The refiner continues the base's latents: same channels and size."""
        g, r = base.geometry, self.geometry
        if (g.latent_channels, g.latent_height, g.latent_width) != (r.latent_channels, r.latent_height, r.latent_width):
            raise UnsupportedSize(f"The refiner takes {r.latent_channels}x{r.latent_height}x{r.latent_width} latents, "
                                  f"the model makes {g.latent_channels}x{g.latent_height}x{g.latent_width}.",
                                  hint="Use a refiner converted at the model's resolution.")

    # ---- conditioning: the second text encoder alone, aesthetic-score time ids ----------------
    def _encode(self, text: str, score: float) -> tuple[Any, dict[str, Any]]:
        import torch

        hidden, pooled = self._encode_one(self.components["text_encoder_2"], self.tokenizers[0], text)
        g = self.geometry
        time_ids = torch.tensor([[g.image_height, g.image_width, 0, 0, score]], dtype=torch.float32,
                                device=hidden.device)
        return hidden.permute(0, 2, 1).unsqueeze(2), {"text_embeds": pooled, "time_ids": time_ids}

    def condition(self, prompt: str, negative_prompt: str) -> Conditioning:
        key = (prompt, negative_prompt)
        if key not in self._conditioning:
            cond, cond_extras = self._encode(prompt, AESTHETIC_SCORE)
            uncond, uncond_extras = self._encode(negative_prompt, NEGATIVE_AESTHETIC_SCORE)
            self._conditioning = {key: Conditioning((uncond, cond), (uncond_extras, cond_extras))}
        return self._conditioning[key]

    # ---- the ensemble --------------------------------------------------------------------------
    def finish(self, base: StableDiffusion, sched: Any, scheduler: str, steps: int, timesteps: Any, current: Any,
               cond: Conditioning, guidance_scale: float, generator: Any, *, prompt: str, negative_prompt: str,
               on_step: StepCallback | None = None, progress: bool = False, desc: str = "Generating") -> Any:
        """Run `timesteps` with the base Unet above the cutoff and this refiner below it."""
        from .schedulers import make_scheduler

        train = int(getattr(sched.config, "num_train_timesteps", 1000))
        cutoff = int(round(train - self.start * train))
        n_base = int((timesteps >= cutoff).sum())
        offset = len(sched.timesteps) - len(timesteps)  # image-to-image starts later in the schedule
        total = len(timesteps)
        current = base.denoise(sched, timesteps[:n_base], current, cond, guidance_scale, generator, on_step=on_step,
                               progress=progress, desc=desc, done=0, total=total)
        if n_base == total:
            return current
        fresh = make_scheduler(scheduler, base.scheduler_config)  # diffusers' refiner starts its own scheduler
        fresh.set_timesteps(steps)
        begin = (offset + n_base) * fresh.order
        if hasattr(fresh, "set_begin_index"):
            fresh.set_begin_index(begin)
        return self.denoise(fresh, fresh.timesteps[begin:], current, self.condition(prompt, negative_prompt),
                            guidance_scale, generator, on_step=on_step, progress=progress, desc=desc,
                            done=n_base, total=total)


def attach_refiner(pipe: StableDiffusion, found: dict[str, Any], backend: Any, *, refiner_model: Any = None,
                   start: float = DEFAULT_REFINER_START, device: str | None = "auto",
                   compute_unit: str | None = "ALL", progress: bool = False) -> float:
    """Load the variant's refiner (or `refiner_model`'s) onto an SDXL `pipe`; returns the seconds it took.

    Without `refiner_model` a variant that has no refiner is left as it is.
    """
    from .components import find_components, load_components

    check_refiner_start(start)
    if refiner_model is not None:
        found = find_components(refiner_model.path)
        names = refiner_names(found) or unet_names(found)  # a refiner pipeline's own Unet is the refiner
        label = refiner_model.name + (f":{refiner_model.variant}" if refiner_model.variant else "")
        if not names:
            raise InvalidBundle(f"{label} has no refiner (UnetRefiner) and no Unet.", hint=HINT)
    else:
        names = refiner_names(found)
        label = ""
        if not names:
            return 0.0
    if not pipe.geometry.sdxl or "text_encoder_2" not in pipe.components:
        raise UsageError("A refiner continues an SDXL model's latents; this model is not SDXL.",
                         hint="Drop --refiner, or run an SDXL model.")
    loaded = load_components(found, names, backend, device=device, compute_unit=compute_unit, progress=progress)
    refiner = SDXLRefiner([loaded.components[n] for n in names], pipe.components["text_encoder_2"], pipe.tokenizers[1],
                          pipe.components["vae_decoder"], pipe.scheduler_config, start=start, name=label)
    refiner.check_matches(pipe)
    pipe.refiner = refiner
    return loaded.seconds
