"""`generate`: resolve a model, load it with a backend, make images, write PNGs."""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UsageError
from . import images as imaging
from .components import (BACKEND_CHOICES, find_components, load_components, require_vae_encoder, select_backend,
                         unet_names)
from .diffusion import StableDiffusion
from .memory import PeakMemory
from .png import ImageMetadata, save_png, slug
from .resolve import ResolvedModel, resolve_model
from .refiner import DEFAULT_REFINER_START, check_refiner_start
from .rng import (DEFAULT_RNG, DEFAULT_SEED_MODE, SEED_MODES, NoiseSource, check_latent_dtype, check_rng,
                  check_seeds, make_noise)
from .schedulers import PREDICTION_TYPES, SCHEDULERS, scheduler_config
from .tokenizer import load_tokenizer

Notify = Callable[[str], None]


@dataclass(frozen=True)
class StepProgress:
    """One finished denoising step, as `generate(on_step=...)` reports it."""

    image_index: int  # from 0
    num_images: int
    seed: int
    step: int  # from 1
    total: int
    preview: Callable[[], Any]  # the current latents decoded to a PIL image (one VAE decode: call sparingly)


StepHook = Callable[[StepProgress], None]


@dataclass(frozen=True)
class SavedImage:
    path: Path
    seed: int
    flagged: bool
    seconds: float
    metadata: ImageMetadata
    intermediates: tuple[Path, ...] = ()
    unet_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "seed": self.seed, "nsfw_flagged": self.flagged,
                "seconds": round(self.seconds, 3), "intermediates": [str(p) for p in self.intermediates],
                "parameters": self.metadata.to_dict()}


@dataclass(frozen=True)
class RunResult:
    """What `run` made and how long it took."""

    model: ResolvedModel
    backend: str
    device: str | None
    size: str
    load_seconds: float
    generate_seconds: float
    unet_steps: int  # denoising steps run, all images together
    images: tuple[SavedImage, ...] = field(default_factory=tuple)
    wall_seconds: float = 0.0  # all of it: imports, finding (or pulling) the model, loading, generating, saving
    peak_memory: PeakMemory = field(default_factory=PeakMemory)
    reduce_memory: bool = False

    @property
    def unet_steps_per_second(self) -> float:
        return self.unet_steps / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "backend": self.backend,
            "device": self.device,
            "size": self.size,
            "load_seconds": round(self.load_seconds, 3),
            "generate_seconds": round(self.generate_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "unet_steps": self.unet_steps,
            "steps_per_second": round(self.unet_steps_per_second, 3),
            "images": [i.to_dict() for i in self.images],
            "peak_memory": self.peak_memory.to_dict(),
            "reduce_memory": self.reduce_memory,
        }


@dataclass(frozen=True)
class LoadedPipeline:
    pipeline: StableDiffusion
    model: ResolvedModel
    backend: str
    device: str | None
    load_seconds: float
    controlnets: tuple[Any, ...] = ()  # loaded ControlNet components, in the order asked
    controlnet_paths: tuple[Path, ...] = ()  # their bundles


def load_pipeline(model: ResolvedModel, *, backend: str = "auto", device: str | None = "auto",
                  compute_unit: str | None = None, img2img: bool = False, safety: bool = True,
                  progress: bool = False, prediction_type: str | None = None, t5: bool = True,
                  shift: float | None = None, refiner: bool = True, refiner_model: ResolvedModel | None = None,
                  refiner_start: float = DEFAULT_REFINER_START, on_message: Notify | None = None,
                  controlnets: tuple[Path, ...] = (), reduce_memory: bool = False,
                  dtype: str | None = None) -> LoadedPipeline:
    """Load the components a run needs (the VAE encoder only for image-to-image).

    `reduce_memory` (the Swift CLI's --reduce-memory) loads each component when the run needs it
    and releases it after, so peak memory is the largest component's instead of the sum; every
    image then loads its Unet and VAE again. `dtype` (fp32, fp16, bf16; None: the backend's
    choice) is the float type the torch backend computes in: bf16 is about twice as fast as fp32
    on CPUs with bf16 instructions (AVX512-BF16, AMX), at bf16's precision.

    `prediction_type` overrides the scheduler config's (Apple's compiled repos ship no config).
    `compute_unit` (None: all) is a Core ML setting; a backend that ignores it is named once.
    SD3 variants (a MultiModalDiffusionTransformer): `t5=False` leaves TextEncoderT5 out (zeros in
    its place), `shift` overrides the flow-matching shift. SDXL: the variant's refiner (or
    `refiner_model`'s) takes over at `refiner_start` of the schedule unless `refiner=False`.
    `controlnets` (bundle paths) are loaded after the Unet that takes their residuals; without them the
    plain Unet is used, or the controlled one with zero residuals when the variant has no other.
    """
    from ..errors import InvalidBundle
    from .controlnet import controlled_unet_names

    chosen = select_backend(backend)
    if compute_unit is not None and not getattr(chosen, "compute_units", None) and on_message is not None:
        on_message(f"Warning: --compute-unit {compute_unit} is a Core ML setting; the {chosen.name} backend "
                   "ignores it.")
    found = find_components(model.path)
    if refiner_model is not None and not refiner:
        raise UsageError("--refiner and --no-refiner contradict each other.", hint="Pass one of them.")
    if "mmdit" in found:
        from .sd3 import load_sd3

        if refiner_model is not None:
            raise UsageError("A refiner continues an SDXL model's latents; this model is SD3.",
                             hint="Drop --refiner.")

        if prediction_type is not None:
            raise UsageError("--prediction-type is for Unets; SD3's transformer predicts the flow's velocity.",
                             hint="Drop --prediction-type.")
        with _mend_hint(model):
            sd3, loaded = load_sd3(model, found, chosen, device=device, compute_unit=compute_unit, img2img=img2img,
                                   progress=progress, use_t5=t5, shift=shift, reduce_memory=reduce_memory,
                                   dtype=dtype)
        return LoadedPipeline(sd3, model, loaded.backend, loaded.device, loaded.seconds)
    if shift is not None:
        raise UsageError("--shift sets SD3's flow-matching schedule; this model is not SD3.", hint="Drop --shift.")
    unet = unet_names(found)
    if controlnets or not unet:
        unet = controlled_unet_names(found) or (() if controlnets else unet)
    if not unet:
        what = "a Unet that takes ControlNet residuals (ControlledUnet)" if controlnets else \
            "a Unet (neither Unet nor both UnetChunk1 and UnetChunk2)"
        raise InvalidBundle(f"{model.path} has no {what}.",
                            hint="Re-pull the variant, or run `coreml-hub verify` on the folder.")
    names = ["text_encoder", *unet, "vae_decoder"]
    if "text_encoder_2" in found:
        names.insert(1, "text_encoder_2")
    if img2img:
        names.append(require_vae_encoder(found, model.path))
    if safety and "safety_checker" in found:
        names.append("safety_checker")
    missing = [n for n in names if n not in found]
    if missing:
        raise InvalidBundle(f"{model.path} lacks component(s): {', '.join(missing)}.",
                            hint="Re-pull the variant, or run `coreml-hub verify` on the folder.")
    beside = (found["text_encoder"].parent,)  # an extracted archive keeps them beside the bundles
    tokenizers = [load_tokenizer(model.path, 1, also=beside)]
    if "text_encoder_2" in names:
        tokenizers.append(load_tokenizer(model.path, 2, default_pad="!", also=beside))
    paths = dict(found)
    for i, path in enumerate(controlnets):
        paths[f"controlnet:{i}"] = Path(path)
        names.append(f"controlnet:{i}")
    with _mend_hint(model):
        # ControlNets run beside the Unet at every step: on demand they would reload each step
        loaded = load_components(paths, names, chosen, device=device, compute_unit=compute_unit, progress=progress,
                                 reduce_memory=reduce_memory and not controlnets, dtype=dtype)
    config = scheduler_config(model.path, prediction_type=prediction_type, also=beside)
    nets = tuple(loaded.components.pop(f"controlnet:{i}") for i in range(len(controlnets)))
    pipe = StableDiffusion(loaded.components, tokenizers, config)
    seconds = loaded.seconds
    if refiner:
        from .refiner import attach_refiner

        seconds += attach_refiner(pipe, found, chosen, refiner_model=refiner_model, start=refiner_start,
                                  device=device, compute_unit=compute_unit, progress=progress)
    return LoadedPipeline(pipe, model, loaded.backend, loaded.device, seconds, nets, tuple(Path(p) for p in controlnets))


@contextlib.contextmanager
def _mend_hint(model: ResolvedModel) -> Iterator[None]:
    """A damaged bundle met while loading gets a hint that fits where the model came from."""
    from ..errors import InvalidBundle
    from ..mil.blob import BlobError
    from ..mil.text import MILSyntaxError

    try:
        yield
    except (InvalidBundle, BlobError, MILSyntaxError) as exc:
        from ..bundle import repair_hint

        where = f"{model.repo}:{model.variant}" if model.repo and model.variant else str(model.path)
        exc.hint = f"`coreml-hub verify {where}` lists every problem. {repair_hint(model.path)}"
        raise


def _validate(steps: int, guidance_scale: float, num_images: int, strength: float, save_every: int | None,
              scheduler: str | None, backend: str, prediction_type: str | None, rng: str = DEFAULT_RNG,
              seed_mode: str = DEFAULT_SEED_MODE, seed: int | None = None) -> None:
    if steps < 1:
        raise UsageError("--steps must be at least 1.")
    if guidance_scale < 0:
        raise UsageError("--guidance-scale must not be negative.")
    if num_images < 1:
        raise UsageError("--num-images must be at least 1.")
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {strength}.")
    if save_every is not None and save_every < 1:
        raise UsageError("--save-every must be at least 1.")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise UsageError(f"Unknown scheduler {scheduler!r}.", hint=f"Choose one of: {', '.join(SCHEDULERS)}.")
    if backend not in BACKEND_CHOICES:
        raise UsageError(f"Unknown backend {backend!r}.", hint=f"Choose one of: {', '.join(BACKEND_CHOICES)}.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"Unknown prediction type {prediction_type!r}.",
                         hint=f"Choose one of: {', '.join(PREDICTION_TYPES)}.")
    check_rng(rng)
    if seed_mode not in SEED_MODES:
        raise UsageError(f"Unknown seed mode {seed_mode!r}.", hint=f"Choose one of: {', '.join(SEED_MODES)}.")
    if seed is not None:
        check_seeds(rng, int(seed), num_images if seed_mode == "increment" else 1)


def generate(model: str | Path, prompt: str, *, negative_prompt: str = "", steps: int = 25,
             guidance_scale: float = 7.5, seed: int | None = None, scheduler: str | None = None,
             image: str | Path | None = None, strength: float | None = None, num_images: int = 1,
             output_dir: str | Path | None = None, backend: str = "auto", device: str | None = "auto",
             compute_unit: str | None = None, disable_safety: bool = False, save_every: int | None = None,
             pull: bool = True, progress: bool = False, on_message: Notify | None = None,
             prediction_type: str | None = None, rng: str = DEFAULT_RNG,
             seed_mode: str = DEFAULT_SEED_MODE, t5: bool = True, shift: float | None = None,
             refiner: str | Path | bool = True, refiner_start: float = DEFAULT_REFINER_START,
             loaded: LoadedPipeline | None = None, on_step: StepHook | None = None, chunked: bool | None = None,
             fit: str | None = None, started: float | None = None, mask: str | Path | None = None,
             controlnets: tuple[str, ...] | list[str] = (), control_images: tuple[str | Path, ...] | list[Any] = (),
             control_scales: tuple[float, ...] | list[float] = (), reduce_memory: bool = False,
             dtype: str | None = None) -> RunResult:
    """Generate `num_images` images from `prompt` with `model` and save them as PNGs.

    MODEL is a repo id (pulled first unless `pull=False`), `REPO:VARIANT`, or a local folder.
    `rng` (torch, numpy, nvidia) draws the initial noise as diffusers, Apple's pipelines and
    Mochi Diffusion do. With `seed_mode="increment"` image i uses seed `seed + i`, so each file
    can be made again on its own; `"stream"` draws every image from one source seeded once.
    `prediction_type` (epsilon, v_prediction) overrides the model's scheduler config.
    `scheduler` defaults to the model family's (pndm; SD3: flow_euler). SD3: `t5=False` runs
    without TextEncoderT5, `shift` overrides the flow-matching shift. SDXL: `refiner` is True (the
    variant's refiner when it has one), False (none), or a MODEL[:VARIANT]/folder holding one;
    it takes over at `refiner_start` of the schedule.
    `chunked` picks a pulled model's Unet form (the two chunks, or the full Unet) when both are pulled.
    `fit` (crop, pad, stretch) makes an init image of another aspect ratio fit (and its mask alike);
    without it such an image is refused before any model loads.
    `mask` (with `image`; white = repaint) inpaints; `strength` defaults to 0.75 for image-to-image and
    1.0 for inpainting, as in diffusers. `controlnets` (names of the variant's ControlNets, or bundle
    paths) pair in order with `control_images` and `control_scales` (default 1); with a mask, a
    ControlNet without an image gets the init image with the masked pixels punched out (-1), the
    input of inpaint ControlNets. Every input is checked before a model loads. Neither runs with a
    refiner: a variant's own refiner is left out, and one named with `refiner` is refused.
    `loaded` is a pipeline already in memory (from `load_pipeline`): `model` and the load options
    are then not used, and the ControlNets asked for must be those it was loaded with. `on_step` is
    called after every denoising step; an exception it raises
    stops the run there and propagates (how a caller cancels; no file of that image is written).
    `started` (a `time.perf_counter()` value) is when the caller began, for `wall_seconds`; by
    default, this call. `reduce_memory` loads each component when needed and releases it after
    (see `load_pipeline`), `dtype` picks the torch backend's float type (fp32, fp16, bf16). The
    result reports the process's peak memory.
    """
    from .. import paths
    from . import controlnet as cn
    from .inpaint import check_same_aspect, mask_array, open_mask
    from .sd3 import StableDiffusion3, check_scheduler

    started = time.perf_counter() if started is None else started
    if strength is None:
        strength = 1.0 if mask is not None else 0.75
    _validate(steps, guidance_scale, num_images, strength, save_every, scheduler, backend, prediction_type,
              rng, seed_mode, seed)
    check_refiner_start(refiner_start)
    requests = cn.pair_requests(controlnets, control_images, control_scales)
    if mask is not None and image is None:
        raise UsageError("--mask needs --image: the image whose masked part is repainted.")
    if fit is not None and image is None:
        raise UsageError(f"--fit {fit} needs --image: it fits an init image (and its mask) to the model's size.",
                         hint="Drop --fit, or give the init image with --image.")
    for request in requests:
        if request.image is None and mask is None:
            raise UsageError(f"--controlnet {request.controlnet} has no --control-image.",
                             hint="Give one --control-image per --controlnet, in the same order.")
    if (requests or mask is not None) and not isinstance(refiner, bool):
        raise UsageError("A refiner does not run with ControlNets or a mask.",
                         hint="Drop --refiner, or the ControlNets and the mask.")
    say = on_message or (lambda _msg: None)
    init = imaging.open_init_image(image) if image is not None else None
    mask_image = open_mask(mask) if mask is not None else None
    if init is not None and mask_image is not None:
        check_same_aspect(init, mask_image)
    pictures = [cn.open_control_image(r.image) if r.image is not None else None for r in requests]
    warm = loaded is not None
    if loaded is None:
        resolved = model if isinstance(model, ResolvedModel) else resolve_model(
            str(model), pull=pull, progress=progress, on_message=say, chunked=chunked)
        if init is not None:  # a wrong shape is refused before seconds of loading
            size = _image_size(resolved.path)
            if size is not None:
                imaging.check_aspect(init.size, *size, fit)
        cn_paths = resolve_controlnets(resolved, requests, pull=pull, progress=progress, on_message=say)
        refiner_model = None
        if not isinstance(refiner, bool):
            refiner_model = refiner if isinstance(refiner, ResolvedModel) else resolve_model(
                str(refiner), pull=pull, progress=progress, on_message=say)
        loaded = load_pipeline(resolved, backend=backend, device=device, compute_unit=compute_unit,
                               img2img=init is not None, safety=not disable_safety, progress=progress,
                               prediction_type=prediction_type, t5=t5, shift=shift,
                               refiner=refiner is not False and not requests and mask is None,
                               refiner_model=refiner_model, refiner_start=refiner_start, on_message=say,
                               controlnets=tuple(cn_paths), reduce_memory=reduce_memory, dtype=dtype)
    else:
        cn_paths = resolve_controlnets(loaded.model, requests, pull=False)
        if tuple(cn_paths) != loaded.controlnet_paths:
            raise UsageError("The pipeline in memory was loaded with other ControlNets than the ones asked for.",
                             hint="Load it with `load_pipeline(..., controlnets=...)` for these ControlNets.")
    resolved = loaded.model
    load_seconds = 0.0 if warm else loaded.load_seconds
    pipe = loaded.pipeline
    g = pipe.geometry
    check_latent_dtype(rng, g.latent_dtype)
    sd3 = isinstance(pipe, StableDiffusion3)
    check_scheduler(scheduler, flow=sd3)
    scheduler = scheduler or pipe.default_scheduler
    extra = {"t5": "yes" if pipe.uses_t5 else "no", "shift": f"{pipe.scheduler_config['shift']:g}"} if sd3 else {}
    if pipe.refiner is not None:
        extra.update(refiner=pipe.refiner.name or "UnetRefiner", refiner_start=f"{pipe.refiner.start:g}")
        if not warm:
            say(f"The refiner takes over at {pipe.refiner.start:g} of the schedule (--refiner-start).")
    if dtype == "bf16" and not warm and loaded.device == "cpu" and not _cpu_has_bf16():
        say("Warning: this CPU has no bf16 instructions; --dtype bf16 runs slower than fp32 here.")
    if not warm:
        say(f"Loaded {resolved.name} ({g.size}) with the {loaded.backend} backend"
            f"{f' on {loaded.device}' if loaded.device else ''} in {loaded.load_seconds:.1f} s.")
    if init is not None:
        before = "x".join(map(str, init.size))
        init, resized = imaging.fit_init_image(init, g.image_width, g.image_height, fit)
        if resized:
            how = {"crop": "Cropped", "pad": "Padded", "stretch": "Stretched"}.get(fit or "", "Resized")
            say(f"{how} the init image from {before} to {g.size}, the model's size.")
    if mask_image is not None and fit is not None:  # the mask frames the init image: fit it alike
        mask_image = imaging.fit_init_image(mask_image.convert("RGB"), g.image_width, g.image_height, fit)[0]
        mask_image = mask_image.convert("L")
    mask_arr = mask_array(mask_image, g.image_width, g.image_height) if mask_image is not None else None
    controls, control_records = [], []
    for request, picture, component, path in zip(requests, pictures, loaded.controlnets, cn_paths):
        if picture is None:
            tensor = cn.inpaint_control_tensor(init, mask_arr)
            source, digest = "init image, masked pixels -1", ""
        else:
            tensor = cn.control_tensor(picture, g.image_width, g.image_height)
            source, digest = str(request.image), cn.sha256_file(request.image)
        controls.append((component, tensor, request.scale))
        control_records.append({"controlnet": path.stem.removeprefix("ControlNet_"), "image": source,
                                "image_sha256": digest, "scale": request.scale})
    folder = Path(output_dir) if output_dir is not None else paths.outputs_dir()
    base_seed = secrets.randbelow(2**32 - num_images) if seed is None else int(seed)  # every source takes it
    if seed is None:
        say(f"Seed {base_seed} (chosen at random; `--seed {base_seed}` makes the same image again).")
    for text, what in ((prompt, "prompt"), (negative_prompt, "negative prompt")):
        if pipe.tokenizers[0].truncated(text):
            say(f"Warning: the {what} is longer than the text encoder's {pipe.geometry.text_length} tokens; "
                "the rest is ignored.")
    cond = pipe.condition(prompt, negative_prompt)
    stream = make_noise(rng, base_seed) if seed_mode == "stream" else None
    saved: list[SavedImage] = []
    start = time.perf_counter()
    for index in range(num_images):
        meta = ImageMetadata(
            prompt=prompt, negative_prompt=negative_prompt, seed=base_seed + (index if stream is None else 0),
            steps=steps, scheduler=scheduler, guidance_scale=guidance_scale, width=g.image_width,
            height=g.image_height, model=resolved.name, variant=resolved.variant, revision=resolved.revision,
            backend=loaded.backend, prediction_type=None if sd3 else pipe.scheduler_config.get("prediction_type"),
            strength=strength if init is not None else None, init_image=str(image) if image is not None else None,
            rng=rng, seed_mode=seed_mode if stream is not None else None,
            image_index=index if stream is not None else None, extra=dict(extra),
            mask_image=str(mask) if mask is not None else None, controlnets=tuple(control_records))
        report = None if on_step is None else functools.partial(_report_step, on_step, pipe, index, num_images,
                                                                meta.seed)
        saved.append(_make_image(pipe, meta, cond, init, folder, save_every, progress,
                                 f"Image {index + 1}/{num_images}", not disable_safety, say, stream, report,
                                 mask=mask_arr, control=controls))
    elapsed = time.perf_counter() - start
    wall = time.perf_counter() - started
    from .memory import peak_memory

    result_obj = RunResult(resolved, loaded.backend, loaded.device, g.size, load_seconds, elapsed,
                           sum(i.unet_steps for i in saved), tuple(saved), wall, peak_memory(loaded.device),
                           reduce_memory and not warm)
    say(f"Generated {num_images} image{'s' if num_images != 1 else ''} in {elapsed:.1f} s "
        f"({result_obj.unet_steps_per_second:.2f} steps/s).")
    rest = max(wall - load_seconds - elapsed, 0.0)
    say(f"Took {wall:.1f} s in all: {rest:.1f} s starting up (imports, finding the model), "
        f"{load_seconds:.1f} s loading, {elapsed:.1f} s generating.")
    if result_obj.peak_memory.rss_bytes:
        say(f"Peak memory: {result_obj.peak_memory.describe()}.")
    return result_obj


def _cpu_has_bf16() -> bool:
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def resolve_controlnets(model: ResolvedModel, requests: list[Any], *, pull: bool = True, progress: bool = False,
                        on_message: Notify | None = None) -> list[Path]:
    """The bundle of each requested ControlNet, checked against the variant's Unet from the bundles'
    descriptions (nothing is loaded): a Unet with residual inputs, the same base, sizes and residuals.
    A name the variant lacks is pulled into its store entry when the model came from the store."""
    from ..errors import InvalidBundle
    from . import controlnet as cn

    if not requests:
        return []
    found = find_components(model.path)
    controlled = cn.controlled_unet_names(found)
    if not controlled:
        raise InvalidBundle(f"{model.name}{f':{model.variant}' if model.variant else ''} has no Unet that takes "
                            "ControlNet residuals (no ControlledUnet), so it cannot run a ControlNet.",
                            hint=_controlled_variant_hint(model))
    from ..controlnets import pull_controlnets, split_request

    paths: list[Path] = []
    for request in requests:
        _, name = split_request(request.controlnet, model.repo or "")  # REPO:NAME is NAME once pulled
        path = cn.resolve_controlnet(model.path, request.controlnet) or cn.resolve_controlnet(model.path, name)
        if path is None and pull and model.repo:
            if on_message:
                on_message(f"ControlNet {request.controlnet} is not pulled yet; pulling it.")
            path = pull_controlnets(model.path, [request.controlnet], progress=progress)[0].path
        if path is None:
            have = ", ".join(sorted(cn.find_controlnets(model.path))) or "none"
            raise InvalidBundle(f"No ControlNet {request.controlnet!r} in {model.path} (it has: {have}).",
                                hint=f"Pull one with `coreml-hub pull {model.repo or 'MODEL'} --controlnet NAME`, or "
                                     "pass the path of a ControlNet bundle.")
        paths.append(path)
    unet = cn.unet_io([found[n] for n in controlled])
    decoder = cn.bundle_io(found["vae_decoder"]) if "vae_decoder" in found else None
    image = decoder.outputs.get("image") if decoder else None
    sample = unet.inputs.get("sample", (0, 0, 0, 0))
    height, width = (image[2], image[3]) if image and len(image) == 4 else (sample[2] * 8, sample[3] * 8)
    for request, path in zip(requests, paths):
        cn.check_controlnet(cn.bundle_io(path), unet, (width, height), request.controlnet)
    return paths


def _controlled_variant_hint(model: ResolvedModel) -> str:
    """Name a variant of the same repo whose Unet takes ControlNet residuals, when one is known."""
    if model.repo:
        try:
            from ..hub import repo_variants

            _, variants = repo_variants(model.repo, model.revision)
            with_cn = [v.id for v in variants if "controlnet" in v.components and v.id != model.variant]
            if with_cn:
                return f"Use a variant that has one: `coreml-hub run {model.repo}:{with_cn[0]} ...`."
        except Exception:  # offline or unreachable: the generic hint below
            pass
    return ("Use a variant converted for ControlNets (a ControlledUnet; `+cn` in its id), or convert one with "
            "`coreml-hub convert SRC -o OUT --controlnet CN_SRC`.")


def _report_step(hook: StepHook, pipe: StableDiffusion, index: int, count: int, seed: int, step: int, total: int,
                 latents: Any) -> None:
    hook(StepProgress(index, count, seed, step, total, lambda: imaging.unit_to_pil(pipe.decode(latents))))


def _image_size(variant: Path) -> tuple[int, int] | None:
    """(width, height) of the images a variant makes, from its VAE decoder's description (no loading)."""
    from ..bundle import declared_shape

    decoder = find_components(variant).get("vae_decoder")
    shape = declared_shape(decoder, output=True) if decoder is not None else None
    return (shape[3], shape[2]) if shape is not None and len(shape) == 4 and min(shape) > 0 else None


def _make_image(pipe: StableDiffusion, meta: ImageMetadata, cond: Any, init: Any, folder: Path,
                save_every: int | None, progress: bool, desc: str, check_safety: bool, say: Notify,
                stream: NoiseSource | None = None, report: Callable[[int, int, Any], None] | None = None,
                mask: Any = None, control: list[Any] | None = None) -> SavedImage:
    """Denoise one image (saving intermediate decodes when asked), then write its PNG."""
    stem = f"{slug(meta.prompt)}-{meta.seed}" + (f"-{meta.image_index}" if meta.image_index else "")
    intermediates: list[Path] = []

    def on_step(step: int, total: int, latents: Any) -> None:
        if save_every and step % save_every == 0 and step < total:
            picture = imaging.unit_to_pil(pipe.decode(latents))
            intermediates.append(save_png(picture, folder, f"{stem}-step{step:03d}", replace(meta, step=step)))
        if report is not None:
            report(step, total, latents)

    t0 = time.perf_counter()
    result = pipe.generate(prompt=meta.prompt, negative_prompt=meta.negative_prompt, steps=meta.steps,
                           guidance_scale=meta.guidance_scale, seed=meta.seed, scheduler=meta.scheduler,
                           init_image=init, strength=meta.strength or 0.0, conditioning=cond, on_step=on_step,
                           progress=progress, desc=desc, check_safety=check_safety, rng=meta.rng or DEFAULT_RNG,
                           noise=stream, mask=mask, control=control)
    if result.flagged:
        say(f"Warning: the safety checker flagged the image with seed {meta.seed}; it was replaced by a black "
            "image. Use --disable-safety to keep such images.")
    path = save_png(imaging.unit_to_pil(result.image), folder, stem, meta)
    return SavedImage(path, meta.seed, result.flagged, time.perf_counter() - t0, meta, tuple(intermediates),
                      result.unet_steps)
