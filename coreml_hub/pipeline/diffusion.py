"""The denoising loop over Core ML components, independent of the backend that runs them.

Everything the pipeline needs to know about sizes is read from the components' input
descriptions: latent size and Unet batch from `sample`, text length and hidden size from
`encoder_hidden_states` ([B, C, 1, L]), image size from the VAE decoder. Random draws come
from a CPU noise source (`rng`: torch in diffusers' order, numpy or nvidia as Apple's and
Mochi's pipelines draw them), so a seed means the same image on every backend and device.
Latents stay on the Unet's device from the first draw to the decoded image.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InvalidBundle, UnsupportedSize, UsageError
from . import images as imaging
from .components import Component, unet_names
from .controlnet import controlled_unet_names
from .rng import DEFAULT_RNG, NoiseSource, check_latent_dtype, make_noise
from .schedulers import DEFAULT_SCHEDULER, make_scheduler
from .tokenizer import ClipTokenizer

SCALE_SD = 0.18215
SCALE_SDXL = 0.13025


@dataclass(frozen=True)
class Geometry:
    """Sizes read from the components."""

    unet_batch: int
    latent_channels: int  # the VAE's latent channels (what is denoised)
    latent_height: int
    latent_width: int
    text_length: int
    hidden_size: int
    image_height: int
    image_width: int
    sdxl: bool
    unet_channels: int = 4  # the Unet's sample channels: latent_channels, or 2 * latent_channels + 1 for inpainting
    residuals: int = 0  # ControlNet residual inputs the Unet takes (a controlled Unet)
    latent_dtype: str = "float32"  # the dtype the denoiser takes its latents in

    @property
    def size(self) -> str:
        return f"{self.image_width}x{self.image_height}"

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting Unet: latents, then the mask, then the masked image's latents."""
        return self.unet_channels == 2 * self.latent_channels + 1


@dataclass(frozen=True)
class Conditioning:
    """Unet text inputs for the negative (index 0) and positive (index 1) prompts."""

    hidden: tuple[Any, ...]  # each [1, C, 1, L]
    extras: tuple[dict[str, Any], ...]  # per prompt: SDXL text_embeds / time_ids


@dataclass(frozen=True)
class Generated:
    """One finished image: float [H, W, 3] in [0, 1], and whether the safety checker flagged it."""

    image: Any
    seed: int
    flagged: bool
    unet_steps: int  # denoising steps run (Unet evaluations, each for both guidance branches)


StepCallback = Callable[[int, int, Any], None]  # (step number from 1, total steps, latents)


def _first_output(outputs: dict[str, Any], preferred: tuple[str, ...], rank: int | None = None) -> Any:
    for name in preferred:
        if name in outputs:
            return outputs[name]
    for value in outputs.values():
        if rank is None or value.dim() == rank:
            return value
    raise InvalidBundle(f"Expected an output named {' or '.join(preferred)}.")


class StableDiffusion:
    """Text-to-image and image-to-image over loaded components."""

    # The denoiser's contract; SD3's transformer names these differently (pipeline.sd3).
    sample_input = "sample"
    context_input = "encoder_hidden_states"
    prediction_output = "noise_pred"
    default_scheduler = DEFAULT_SCHEDULER
    shift_factor = 0.0  # latents = (VAE sample - shift) * scale; only SD3's VAE shifts
    refiner: Any = None  # an SDXL refiner (pipeline.refiner) that takes over the last part of the schedule

    def __init__(self, components: dict[str, Component], tokenizers: list[ClipTokenizer],
                 scheduler_config: dict[str, Any], *, scale_factor: float | None = None,
                 zero_empty_negative: bool | None = None) -> None:
        self.components = components
        self.tokenizers = tokenizers
        self.scheduler_config = scheduler_config
        self.unet_parts = [components[n] for n in unet_names(components) or controlled_unet_names(components)]
        if not self.unet_parts:
            raise InvalidBundle("The variant has no Unet (neither Unet nor UnetChunk1 + UnetChunk2).")
        for required in ("text_encoder", "vae_decoder"):
            if required not in components:
                raise InvalidBundle(f"The variant has no {required}.")
        self.geometry = self._read_geometry()
        if self.geometry.sdxl and ("text_encoder_2" not in components or len(tokenizers) < 2):
            raise InvalidBundle("This SDXL Unet needs a second text encoder (TextEncoder2) and its tokenizer.")
        for tokenizer, name in zip(tokenizers, ("text_encoder", "text_encoder_2")):
            if name in components:  # the token count is the text encoder's input length
                tokenizer.length = components[name].input_shape("input_ids")[-1]
        self.scale_factor = scale_factor or (SCALE_SDXL if self.geometry.sdxl else SCALE_SD)
        self.zero_empty_negative = self.geometry.sdxl if zero_empty_negative is None else zero_empty_negative
        # one scheduler built now imports diffusers and checks the config while loading, so neither
        # is counted in the first image's time (or fails after the Unet is loaded and a run started)
        make_scheduler(self.default_scheduler, scheduler_config)

    # ---- sizes ------------------------------------------------------------------------
    def unet_inputs(self) -> dict[str, Any]:
        """Inputs of the whole Unet: chunk 1's, plus chunk 2's that chunk 1 does not produce."""
        specs: dict[str, Any] = {}
        produced: set[str] = set()
        for part in self.unet_parts:
            for name, spec in part.inputs.items():
                if name not in produced:
                    specs.setdefault(name, spec)
            produced |= set(part.outputs)
        return specs

    def _read_geometry(self) -> Geometry:
        specs = self.unet_inputs()
        for name in ("sample", "timestep", "encoder_hidden_states"):
            if name not in specs:
                raise InvalidBundle(f"The Unet has no {name!r} input (inputs: {', '.join(specs)}).")
        sample = specs["sample"].shape
        hidden = specs["encoder_hidden_states"].shape
        if len(sample) != 4 or any(d <= 0 for d in sample) or len(hidden) != 4:
            raise UnsupportedSize(f"The Unet's input shapes are not fixed 4-D shapes (sample {sample}, "
                                  f"encoder_hidden_states {hidden}); only fixed-size models can run.",
                                  hint="Use a variant converted for a fixed resolution.")
        batch, channels, lh, lw = sample
        if batch not in (1, 2):
            raise UnsupportedSize(f"The Unet takes a batch of {batch}; only 1 or 2 are supported.")
        decoder = self.components["vae_decoder"]
        z = decoder.input_shape(next(iter(decoder.inputs)))
        latent_channels = z[1] if len(z) == 4 and z[1] > 0 else channels
        if channels not in (latent_channels, 2 * latent_channels + 1):
            raise UnsupportedSize(f"The Unet takes {channels}-channel samples but the VAE makes {latent_channels}-channel "
                                  "latents.", hint="The components come from different conversions; re-pull the variant.")
        if tuple(z[-2:]) != (lh, lw):
            raise UnsupportedSize(f"The VAE decoder takes {z[-2]}x{z[-1]} latents but the Unet makes {lh}x{lw}.",
                                  hint="The components come from different conversions; re-pull the variant.")
        out = next(iter(decoder.outputs.values()), None)
        if out is not None and len(out.shape) == 4 and all(d > 0 for d in out.shape):
            ih, iw = out.shape[2], out.shape[3]
            from ..validate import vae_scale_factor  # the rule `verify` and `pull` check

            if vae_scale_factor((lh, lw), (ih, iw)) is None:
                raise UnsupportedSize(f"The VAE decoder makes {iw}x{ih} images from {lw}x{lh} latents: not one "
                                      "whole scale factor for both sides.",
                                      hint="Run `coreml-hub verify` on the variant.")
        else:
            ih, iw = lh * 8, lw * 8
        return Geometry(unet_batch=batch, latent_channels=latent_channels, latent_height=lh, latent_width=lw,
                        text_length=hidden[3], hidden_size=hidden[1], image_height=ih, image_width=iw,
                        sdxl="time_ids" in specs and "text_embeds" in specs, unet_channels=channels,
                        residuals=sum(1 for n in specs if n.startswith("additional_residual_")),
                        latent_dtype=specs["sample"].dtype)

    # ---- text -------------------------------------------------------------------------
    def _encode_one(self, encoder: Component, tokenizer: ClipTokenizer, text: str) -> tuple[Any, Any]:
        import torch

        ids = torch.tensor([tokenizer.encode(text)], dtype=torch.float32)
        out = encoder({"input_ids": ids})
        hidden = _first_output(out, ("hidden_embeds", "last_hidden_state"), rank=3)
        pooled = out.get("pooled_outputs")
        return hidden, pooled

    def encode_prompt(self, text: str) -> tuple[Any, dict[str, Any]]:
        """One prompt -> Unet `encoder_hidden_states` [1, C, 1, L] plus SDXL extras."""
        import torch

        hidden, pooled = self._encode_one(self.components["text_encoder"], self.tokenizers[0], text)
        extras: dict[str, Any] = {}
        if self.geometry.sdxl:
            hidden2, pooled2 = self._encode_one(self.components["text_encoder_2"], self.tokenizers[1], text)
            hidden = torch.cat([hidden, hidden2], dim=-1)
            extras["text_embeds"] = pooled2
            g = self.geometry
            extras["time_ids"] = torch.tensor(
                [[g.image_height, g.image_width, 0, 0, g.image_height, g.image_width]], dtype=torch.float32,
                device=hidden.device)
        if hidden.shape[-1] != self.geometry.hidden_size:
            raise InvalidBundle(f"The text encoder makes {hidden.shape[-1]}-wide states but the Unet takes "
                                f"{self.geometry.hidden_size}.")
        return hidden.permute(0, 2, 1).unsqueeze(2), extras

    def condition(self, prompt: str, negative_prompt: str) -> Conditioning:
        import torch

        cond, cond_extras = self.encode_prompt(prompt)
        if self.zero_empty_negative and not negative_prompt:
            uncond = torch.zeros_like(cond)
            uncond_extras = {k: (torch.zeros_like(v) if k == "text_embeds" else v) for k, v in cond_extras.items()}
        else:
            uncond, uncond_extras = self.encode_prompt(negative_prompt)
        return Conditioning((uncond, cond), (uncond_extras, cond_extras))

    # ---- Unet -------------------------------------------------------------------------
    def _unet_call(self, feed: dict[str, Any]) -> Any:
        values = dict(feed)
        out: dict[str, Any] = {}
        for part in self.unet_parts:
            out = part(values)
            values.update(out)
        return _first_output(out, (self.prediction_output,), rank=4)

    def predict_noise(self, sample: Any, t: Any, cond: Conditioning, which: tuple[int, ...], *,
                      extra: Any = None, control: list[tuple[Any, Any, float]] | None = None) -> Any:
        """Noise predictions for `sample` under each conditioning index in `which`, batched as the Unet takes.

        `extra` ([1, C, h, w]) is concatenated to the sample on channels (an inpainting Unet's mask and
        masked-image latents); `control` holds (ControlNet, control image, scale) for a controlled Unet.
        """
        import torch

        from .controlnet import residuals

        batch = self.geometry.unet_batch
        preds = []
        for start in range(0, len(which), batch):
            group = list(which[start:start + batch])
            padded = group + [group[-1]] * (batch - len(group))
            latents = torch.cat([sample] * batch)
            feed: dict[str, Any] = {
                self.sample_input: latents if extra is None else torch.cat([latents, torch.cat([extra] * batch)], dim=1),
                "timestep": torch.full((batch,), float(t), dtype=torch.float32, device=sample.device),
                self.context_input: torch.cat([cond.hidden[i] for i in padded]),
            }
            for key in cond.extras[1]:
                feed[key] = torch.cat([cond.extras[i][key] for i in padded])
            if self.geometry.residuals:
                feed.update(residuals(control or [], self.unet_inputs(), latents, feed["timestep"],
                                      feed["encoder_hidden_states"], feed))
            preds.append(self._unet_call(feed)[: len(group)])
        return torch.cat(preds)

    # ---- VAE --------------------------------------------------------------------------
    def decode(self, latents: Any) -> Any:
        """Latents -> float numpy [H, W, 3] in [0, 1]."""
        decoder = self.components["vae_decoder"]
        out = decoder({next(iter(decoder.inputs)): latents / self.scale_factor + self.shift_factor})
        return imaging.tensor_to_unit(_first_output(out, ("image",), rank=4))

    def encode_image(self, image: Any, noise: NoiseSource) -> Any:
        """Init image tensor [1, 3, H, W] -> scaled latents, sampled from the encoder's distribution."""
        import torch

        encoder = self.components.get("vae_encoder")
        if encoder is None:
            raise InvalidBundle("This variant has no VAEEncoder, so it cannot do image-to-image.",
                                hint="Pull a variant with a VAE encoder (not `no-i2i`), or drop --image.")
        moments = _first_output(encoder({next(iter(encoder.inputs)): image}), ("latent",), rank=4)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (noise.gaussian(mean, std) - self.shift_factor) * self.scale_factor

    def img2img_start(self, steps: int, strength: float) -> int:
        """The first of `steps` steps an image-to-image run denoises (diffusers' rounding)."""
        return max(steps - min(int(steps * strength), steps), 0)

    def noised(self, sched: Any, init: Any, noise: Any, t: Any) -> Any:
        """The init image's latents noised to timestep `t`."""
        return sched.add_noise(init, noise, t)

    # ---- the loop ---------------------------------------------------------------------
    def generate(self, *, prompt: str, negative_prompt: str = "", steps: int = 25, guidance_scale: float = 7.5,
                 seed: int = 0, scheduler: str | None = None, init_image: Any = None, strength: float = 0.75,
                 conditioning: Conditioning | None = None, on_step: StepCallback | None = None,
                 progress: bool = False, desc: str = "Generating", check_safety: bool = True,
                 latents: Any = None, rng: str = DEFAULT_RNG, noise: NoiseSource | None = None, mask: Any = None,
                 control: list[tuple[Any, Any, float]] | None = None) -> Generated:
        """Make one image. `init_image` (PIL, model size) switches to image-to-image; with `mask` (float
        [H, W], 1 = repaint) to inpainting, as diffusers' StableDiffusionInpaintPipeline does it: a 9-channel
        Unet sees the mask and the masked image's latents, a 4-channel Unet's latents are pasted back
        outside the mask after every step. `control`: (ControlNet, control image [1, 3, H, W], scale).

        The initial noise comes from `noise` when given (a source shared by several images),
        else from a fresh `rng` source seeded with `seed`; `latents` overrides the draw.
        """
        import torch

        if steps < 1:
            raise UsageError("--steps must be at least 1.")
        g = self.geometry
        if g.inpainting and mask is None:
            raise UsageError("This model's Unet is an inpainting Unet: it needs --image and --mask.",
                             hint="Pass the image to repaint with --image and a mask (white = repaint) with --mask.")
        if mask is not None and init_image is None:
            raise UsageError("--mask needs --image: the image whose masked part is repainted.")
        if control and not g.residuals:
            raise InvalidBundle("This model's Unet takes no ControlNet residuals.",
                                hint="Use a variant with a ControlledUnet (converted with --controlnet).")
        if self.refiner is not None and (control or mask is not None):
            raise UsageError("A refiner does not run with ControlNets or a mask.",
                             hint="Load the pipeline without its refiner (--no-refiner).")
        cond = conditioning or self.condition(prompt, negative_prompt)
        scheduler = scheduler or self.default_scheduler
        sched = make_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(steps)
        if noise is None:
            check_latent_dtype(rng, g.latent_dtype)
            noise = make_noise(rng, seed)
        generator = noise.step_generator
        shape = (1, g.latent_channels, g.latent_height, g.latent_width)
        timesteps = sched.timesteps
        extra = blend = None
        if init_image is not None:
            if not 0.0 < strength <= 1.0:
                raise UsageError(f"--strength must be in (0, 1], got {strength}.")
            t_start = self.img2img_start(steps, strength)
            timesteps = sched.timesteps[t_start * sched.order:]
            if len(timesteps) == 0:
                raise UsageError(f"--strength {strength} with --steps {steps} leaves no denoising step.",
                                 hint="Raise --strength or --steps.")
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            pixels = imaging.image_to_tensor(init_image)
            if mask is None:
                first = noise.latents(shape) if noise.noise_first else None  # the Swift order: noise, then sample
                init = self.encode_image(pixels, noise)
                added = (first if first is not None else noise.latents(tuple(init.shape))).to(init.device)
                current = self.noised(sched, init, added, timesteps[:1])
            else:
                current, extra, blend = self._inpaint_start(pixels, mask, noise, sched, timesteps, strength)
        else:
            sigma = getattr(sched, "init_noise_sigma", 1.0)  # flow matching starts from plain noise
            if latents is not None:
                current = (latents.to(torch.float32) * sigma).to(self.unet_parts[0].device)
            else:
                current = noise.latents(shape, float(sigma)).to(self.unet_parts[0].device)
        total = len(timesteps)
        if self.refiner is not None:
            current = self.refiner.finish(self, sched, scheduler, steps, timesteps, current, cond, guidance_scale,
                                          generator, prompt=prompt, negative_prompt=negative_prompt,
                                          on_step=on_step, progress=progress, desc=desc)
        else:
            current = self.denoise(sched, timesteps, current, cond, guidance_scale, generator, on_step=on_step,
                                   progress=progress, desc=desc, extra=extra, control=control, blend=blend)
        image = self.decode(current)
        flagged = False
        if check_safety and "safety_checker" in self.components:
            from .safety import blacked_out, is_flagged

            flagged = is_flagged(self.components["safety_checker"], image, imaging.unit_to_pil(image))
            if flagged:
                image = blacked_out(image)
        return Generated(image=image, seed=int(seed), flagged=flagged, unet_steps=total)

    def denoise(self, sched: Any, timesteps: Any, current: Any, cond: Conditioning, guidance_scale: float,
                generator: Any, *, on_step: StepCallback | None = None, progress: bool = False,
                desc: str = "Generating", done: int = 0, total: int | None = None, extra: Any = None,
                control: list[tuple[Any, Any, float]] | None = None, blend: tuple[Any, Any, Any] | None = None) -> Any:
        """Step `current` through `timesteps` with this pipeline's denoiser; returns the last latents.

        `done` steps of `total` were run before (by another denoiser), for the progress callback.
        `extra`, `control`: see `predict_noise`; `blend` (init latents, noise, latent mask): a 4-channel
        Unet inpaints by keeping the init image's latents, noised to the next step, outside the mask.
        """
        from tqdm import tqdm

        step_params = inspect.signature(sched.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "generator" in step_params:
            step_kwargs["generator"] = generator
        if "eta" in step_params:
            step_kwargs["eta"] = 0.0
        guided = guidance_scale > 1.0
        total = total or done + len(timesteps)
        bar = tqdm(total=total, initial=done, desc=desc, unit="step", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True, leave=False)
        scale_input = getattr(sched, "scale_model_input", None)  # flow matching has none
        try:
            for j, t in enumerate(timesteps):
                i = done + j
                model_in = scale_input(current, t) if scale_input is not None else current
                if guided:
                    uncond, text = self.predict_noise(model_in, t, cond, (0, 1), extra=extra,
                                                      control=control).chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                else:
                    noise_pred = self.predict_noise(model_in, t, cond, (1,), extra=extra, control=control)
                current = sched.step(noise_pred, t, current, **step_kwargs).prev_sample
                if blend is not None:  # a 4-channel Unet inpaints by keeping the unmasked latents
                    image_latents, noise, mask_latent = blend
                    proper = image_latents
                    if j < len(timesteps) - 1:
                        proper = self.noised(sched, image_latents, noise, timesteps[j + 1:j + 2])
                    current = (1 - mask_latent) * proper + mask_latent * current
                bar.update(1)
                if on_step is not None:
                    on_step(i + 1, total, current)
        finally:
            bar.close()
        return current

    def _inpaint_start(self, image: Any, mask: Any, noise_source: NoiseSource, sched: Any, timesteps: Any,
                       strength: float) -> tuple[Any, Any, Any]:
        """Initial latents, the 9-channel Unet's extra inputs, and what a 4-channel Unet blends with.

        The random draws come in diffusers' order: the init image's latents (when they are needed),
        the noise, then the masked image's latents (whose draw a 4-channel Unet takes without using it).
        """
        import torch
        import torch.nn.functional as F

        g = self.geometry
        mask_t = torch.as_tensor(mask, dtype=torch.float32)[None, None]
        strength_max = strength == 1.0
        image_latents = None
        if not g.inpainting or not strength_max:
            image_latents = self.encode_image(image, noise_source)
        shape = (1, g.latent_channels, g.latent_height, g.latent_width)
        noise = noise_source.latents(shape)
        device = self.unet_parts[0].device
        noise = noise.to(image_latents.device if image_latents is not None else device)
        if strength_max:
            current = noise * sched.init_noise_sigma
        else:
            current = self.noised(sched, image_latents, noise, timesteps[:1])
        mask_latent = F.interpolate(mask_t, size=(g.latent_height, g.latent_width)).to(current.device)
        if g.inpainting:
            masked = image * (mask_t < 0.5)
            masked_latents = self.encode_image(masked, noise_source).to(current.device)
            return current, torch.cat([mask_latent, masked_latents], dim=1), None
        noise_source.latents(shape)  # the masked image's draw
        return current, None, (image_latents.to(current.device), noise.to(current.device), mask_latent)
