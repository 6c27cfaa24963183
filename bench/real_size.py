"""Real-size Stable Diffusion models on the portable runtime against diffusers, both in one run.

The models are built from the real diffusers configs (written below: nothing is downloaded)
with random weights generated from a seed (each parameter from its name alone, numpy PCG64
streams scaled like a default init), saved as a diffusers pipeline folder and converted by
coreml-hub's `convert` to fp16 packages as Apple ships them (original or split_einsum
attention). Conversions are cached on disk (`--work`): the SD 1.5 Unet alone takes minutes
and ~7.4 GB of memory to convert.

  runtime   the variant folder loaded with coreml-hub's torch backend (`load_pipeline`): on the
            CPU the fp16 program runs in float32, on CUDA in float16
  anchor    diffusers on the same weights: float32 eager on the CPU; on CUDA float16 with SDPA,
            eager and (`--compile`) with torch.compile of the Unet

Measured, A/B alternating in one process after warm-up, medians: Unet step (batch 2, the
classifier-free-guidance batch), VAE decode, text encoder, whole images (s/image, `--steps`,
default 20; fewer on a CPU). Then each side again in a fresh process (`--no-fresh` skips it):
import, load, first image, peak RSS (VmHWM) and on CUDA `max_memory_allocated`; the runtime
also with `--reduce-memory` (each component loaded when needed and released after).

    python bench/real_size.py --model sd15 --size 512 --attention original --steps 3 --runs 3
    python bench/real_size.py --model sd15 --parts unet --runs 5      # one part only
    python bench/real_size.py --model sd15 --prepare-only             # convert (cached) and stop
    python bench/real_size.py --model sd15 --carry out/               # + a weightless carry archive
    python bench/real_size.py --variant DIR --source DIR --device cuda --compile   # on a GPU machine

A carry archive holds the converted packages with every weight blob that a parameter
regenerates zeroed (so it compresses to almost nothing) plus `weights-map.json`; on the
other machine `--carried DIR` rebuilds the diffusers source folder from the seed and
refills the blobs (each checked against its recorded digest) before measuring.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 1234
PROMPT = "a photo of an astronaut riding a horse on mars"

# -- the real diffusers configs ------------------------------------------------------

_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
           "layer_norm_eps": 1e-5, "projection_dim": 768}
_CLIP_H = {**_CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
           "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
_CLIP_BIGG = {**_CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
              "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}

_UNET_SD15 = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_UNET_SD21 = {**_UNET_SD15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
              "use_linear_projection": True, "upcast_attention": False}
_UNET_SDXL = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                                   "UpBlock2D"],
    "use_linear_projection": True,
}
_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
_PNDM = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
         "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}
_EULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
          "timestep_spacing": "leading", "interpolation_type": "linear", "prediction_type": "epsilon"}

# name -> (repo it stands for, native image size, unet, vae, text encoders, scheduler, coreml-hub scheduler)
MODELS: dict[str, dict[str, Any]] = {
    "sd15": {"repo": "runwayml/stable-diffusion-v1-5", "size": 512, "unet": _UNET_SD15, "vae": _VAE,
             "text": [("text_encoder", "CLIPTextModel", _CLIP_L)], "scheduler": _PNDM, "run_scheduler": "pndm",
             "pipeline": "StableDiffusionPipeline"},
    "sd21-base": {"repo": "stabilityai/stable-diffusion-2-1-base", "size": 512, "unet": _UNET_SD21, "vae": _VAE,
                  "text": [("text_encoder", "CLIPTextModel", _CLIP_H)], "scheduler": _PNDM,
                  "run_scheduler": "pndm", "pipeline": "StableDiffusionPipeline"},
    "sd21-768v": {"repo": "stabilityai/stable-diffusion-2-1", "size": 768,
                  "unet": {**_UNET_SD21, "sample_size": 96, "upcast_attention": True},
                  "vae": {**_VAE, "sample_size": 768}, "text": [("text_encoder", "CLIPTextModel", _CLIP_H)],
                  "scheduler": {**_PNDM, "prediction_type": "v_prediction"}, "run_scheduler": "pndm",
                  "pipeline": "StableDiffusionPipeline"},
    "sdxl": {"repo": "stabilityai/stable-diffusion-xl-base-1.0", "size": 1024, "unet": _UNET_SDXL,
             "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
             "text": [("text_encoder", "CLIPTextModel", _CLIP_L),
                      ("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_BIGG)],
             "scheduler": _EULER, "run_scheduler": "euler", "pipeline": "StableDiffusionXLPipeline"},
    # SD 1.5's structure at toy widths: dry runs of the scripts (DEVICE=cpu), not a measurement
    "tiny": {"repo": "coreml-hub-bench/tiny-sd15", "size": 64,
             "unet": {**_UNET_SD15, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64,
                      "sample_size": 8, "layers_per_block": 1},
             "vae": {**_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64},
             "text": [("text_encoder", "CLIPTextModel",
                       {**_CLIP_L, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 64})],
             "scheduler": _PNDM, "run_scheduler": "pndm", "pipeline": "StableDiffusionPipeline"},
}


# -- deterministic weights -----------------------------------------------------------


def weight_for(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A parameter's values from its (component-qualified) name alone, scaled like a default init."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) <= 1:
        if "norm" in name and name.endswith("weight"):
            return 1.0 + 0.05 * values
        return 0.02 * values
    fan_in = int(np.prod(shape[1:]))
    return values * np.float32(1.0 / np.sqrt(fan_in))


def _modules(model: str) -> list[tuple[str, Callable[[], Any]]]:
    """(component, constructor) for every component of `model`, weights left at their default init."""
    import diffusers
    import transformers

    spec = MODELS[model]
    out: list[tuple[str, Callable[[], Any]]] = [
        ("unet", lambda: diffusers.UNet2DConditionModel(**spec["unet"])),
        ("vae", lambda: diffusers.AutoencoderKL(**spec["vae"])),
    ]
    for name, cls, cfg in spec["text"]:
        out.append((name, lambda cls=cls, cfg=cfg: getattr(transformers, cls)(transformers.CLIPTextConfig(**cfg))))
    return out


def fill_weights(component: str, module: Any) -> Any:
    """Overwrite every float parameter of `module` with its seeded values."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.from_numpy(weight_for(f"{component}.{name}", tuple(param.shape))))
    return module.eval()


def param_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Component-qualified parameter name -> shape, without allocating any weight."""
    import torch

    shapes: dict[str, tuple[int, ...]] = {}
    for component, make in _modules(model):
        with torch.device("meta"):
            module = make()
        shapes.update({f"{component}.{n}": tuple(p.shape) for n, p in module.named_parameters()})
    return shapes


def build_source(model: str, dest: Path) -> Path:
    """The diffusers pipeline folder of `model` with seeded weights (one component in memory at a time)."""
    if (dest / "model_index.json").is_file():
        return dest
    import diffusers
    import transformers

    from coreml_hub.testing.tokenizer import write_tokenizer_config, write_tokenizer_files

    spec = MODELS[model]
    tmp = dest.with_name(dest.name + ".partial")  # components already saved there are kept
    tmp.mkdir(parents=True, exist_ok=True)
    for component, make in _modules(model):
        if (tmp / component / "config.json").is_file():
            continue
        print(f"  building {model} {component} ...", file=sys.stderr, flush=True)
        module = fill_weights(component, make())
        module.save_pretrained(tmp / component, safe_serialization=True)
        del module
        gc.collect()
    index: dict[str, Any] = {
        "_class_name": spec["pipeline"], "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", spec["scheduler"]["_class_name"]],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    # the real tokenizers' files are not at hand: a CLIP-shaped BPE vocabulary (ids < 49408) stands in
    pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    for (name, cls, _cfg), tok in zip(spec["text"], ("tokenizer", "tokenizer_2")):
        index[name] = ["transformers", cls]
        index[tok] = ["transformers", "CLIPTokenizer"]
        write_tokenizer_files(tmp / tok, 1000)
        write_tokenizer_config(tmp / tok, pad_token=pads[tok])
    if model == "sdxl":
        index.update(force_zeros_for_empty_prompt=True, add_watermarker=None)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    sched = getattr(diffusers, spec["scheduler"]["_class_name"]).from_config(
        {k: v for k, v in spec["scheduler"].items() if k != "_class_name"})
    sched.save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    del transformers
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def work_dir(args: argparse.Namespace) -> Path:
    return Path(args.work) / f"{args.model}-{args.size}"


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """(diffusers source folder, converted variant folder), each built once and cached."""
    from coreml_hub.convert import convert

    work = work_dir(args)
    source = build_source(args.model, Path(args.work) / f"{args.model}-source")
    variant = work / args.attention
    if (variant / ".done").is_file():
        return source, variant
    latent = (args.size // 8, args.size // 8)
    text = tuple(name for name, _cls, _cfg in MODELS[args.model]["text"])
    shared = work / "shared"  # text encoders and VAE decoder do not depend on the attention form
    if not (shared / ".done").is_file():
        print(f"converting {args.model} text encoder(s) and VAE decoder (fp16) ...", file=sys.stderr, flush=True)
        shutil.rmtree(shared, ignore_errors=True)
        convert(source, shared, attention="original", precision="fp16", latent_size=latent,
                components=(*text, "vae_decoder"), model_version=MODELS[args.model]["repo"], progress=False,
                on_message=lambda line: print("  " + line, file=sys.stderr, flush=True))
        (shared / ".done").write_text("ok\n")
    print(f"converting {args.model} Unet ({args.attention}, fp16, {latent[0]}x{latent[1]} latents) ...",
          file=sys.stderr, flush=True)
    unet_out = work / f"unet-{args.attention}"
    shutil.rmtree(unet_out, ignore_errors=True)
    convert(source, unet_out, attention=args.attention, precision="fp16", latent_size=latent, components=("unet",),
            model_version=MODELS[args.model]["repo"], progress=False,
            on_message=lambda line: print("  " + line, file=sys.stderr, flush=True))
    # one variant folder as `convert` lays it out: the Unet's output plus the shared packages beside it
    shutil.rmtree(variant, ignore_errors=True)
    unet_out.rename(variant)
    packages = variant / args.attention / "packages"
    for bundle in (shared / "original" / "packages").glob("*.mlpackage"):
        os.symlink(bundle.resolve(), packages / bundle.name)
    (variant / ".done").write_text("ok\n")
    return source, variant


def variant_folder(variant: Path) -> Path:
    """The folder holding the bundles (`convert`'s OUT/<attention>/packages), tokenizer beside OUT."""
    found = list(variant.glob("*/packages"))
    return found[0] if found else variant



# -- carrying a conversion to another machine without its weights --------------------


def write_carry(model: str, variant: Path, source_config: Path, dest: Path) -> Path:
    """`variant` (symlinks resolved) with every regenerable fp16 blob zeroed, + the map to refill them."""
    from coreml_hub.mil.blob import BlobFile

    digests = {}
    for name, shape in param_shapes(model).items():
        data = weight_for(name, shape).astype(np.float16).tobytes()
        digests[hashlib.sha1(data).hexdigest()] = name
    with tempfile.TemporaryDirectory(prefix=".carry-") as tmp:
        copy = Path(tmp) / "variant"
        shutil.copytree(variant, copy, symlinks=False)
        blobs_map: dict[str, list[dict[str, Any]]] = {}
        for weights in sorted(copy.rglob("weight.bin")):
            reader = BlobFile(weights)
            entries = []
            for info in reader:
                digest = hashlib.sha1(bytes(reader.raw(info.offset))).hexdigest()
                if info.dtype == "fp16" and digest in digests:
                    entries.append({"offset": info.offset, "param": digests[digest], "sha1": digest,
                                    "data_offset": info.data_offset, "size": info.size})
            reader.close()
            with open(weights, "r+b") as fh:
                for e in entries:
                    fh.seek(e["data_offset"])
                    fh.write(b"\0" * e["size"])
            blobs_map[str(weights.relative_to(copy))] = entries
        (copy / "weights-map.json").write_text(json.dumps({"model": model, "seed": SEED, "blobs": blobs_map}))
        # the diffusers configs travel too (no weights): the other side rebuilds the source from them
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w:gz") as tar:
            tar.add(copy, arcname="variant")
    return dest


def restore_carry(variant: Path) -> str:
    """Refill the zeroed blobs of a carried variant (idempotent); returns the model name."""
    spec = json.loads((variant / "weights-map.json").read_text())
    marker = variant / ".weights-restored"
    if not marker.is_file():
        shapes = param_shapes(spec["model"])
        for rel, entries in spec["blobs"].items():
            with open(variant / rel, "r+b") as fh:
                for e in entries:
                    data = weight_for(e["param"], shapes[e["param"]]).astype(np.float16).tobytes()
                    if hashlib.sha1(data).hexdigest() != e["sha1"]:
                        raise SystemExit(f"regenerated weights of {e['param']} differ from the recorded digest")
                    fh.seek(e["data_offset"])
                    fh.write(data)
        marker.write_text("ok\n")
    return str(spec["model"])


# -- the two sides ---------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak(device: str) -> dict[str, Any]:
    from coreml_hub.pipeline.memory import peak_cuda_bytes, peak_rss_bytes

    return {"peak_rss": peak_rss_bytes(), "peak_cuda": peak_cuda_bytes(device)}


def ensure_plugins() -> None:
    """Register the built-in plugins from the source tree when coreml-hub is not installed (a GPU
    machine running this from a carried checkout has no entry points)."""
    import importlib

    from coreml_hub import plugins as registry

    registry.load_plugins()
    if "torch" in registry.get_backends():
        return
    for name, module in (("apple", "apple"), ("archives", "archives"), ("flat", "flat"), ("plain", "plain"),
                         ("torch", "torch_backend")):
        if not registry.pm.has_plugin(name):
            registry.pm.register(importlib.import_module(f"plugins.{module}"), name=name)


def load_runtime(variant: Path, device: str, reduce_memory: bool = False) -> Any:
    """The coreml-hub pipeline (StableDiffusion over the torch backend's components)."""
    from coreml_hub.pipeline.generate import load_pipeline

    ensure_plugins()
    from coreml_hub.pipeline.resolve import resolve_model

    loaded = load_pipeline(resolve_model(str(variant), pull=False), backend="torch", device=device, safety=False,
                           reduce_memory=reduce_memory)
    return loaded.pipeline


def load_anchor(source: Path, model: str, device: str) -> Any:
    import diffusers
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    extra = {"add_watermarker": False} if model == "sdxl" else {"safety_checker": None}
    pipe = getattr(diffusers, MODELS[model]["pipeline"]).from_pretrained(str(source), torch_dtype=dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def runtime_image(pipe: Any, model: str, steps: int) -> Any:
    return pipe.generate(prompt=PROMPT, steps=steps, seed=1, scheduler=MODELS[model]["run_scheduler"],
                         check_safety=False).image


def anchor_image(pipe: Any, model: str, steps: int) -> Any:
    import torch

    with torch.inference_mode():
        return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(1),
                    output_type="np").images[0]


def unet_inputs(pipe: Any, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Batch-2 Unet inputs for the runtime (its declared layout) and the same values for diffusers."""
    import torch

    specs = pipe.unet_inputs()
    g = torch.Generator().manual_seed(0)
    values = {}
    for name, spec in specs.items():
        if name == "timestep":
            values[name] = torch.full(spec.shape, 981.0)
        elif name == "time_ids":
            size = float(pipe.geometry.image_height)
            values[name] = torch.tensor([[size, size, 0, 0, size, size]] * spec.shape[0])
        else:
            values[name] = torch.randn(*spec.shape, generator=g)
    rt = {k: v.to(device) for k, v in values.items()}
    an: dict[str, Any] = {"sample": values["sample"], "timestep": values["timestep"],
                          "encoder_hidden_states": values["encoder_hidden_states"].squeeze(2).transpose(1, 2)}
    if "time_ids" in values:
        an["added_cond_kwargs"] = {"time_ids": values["time_ids"], "text_embeds": values["text_embeds"]}
    return rt, an


def _to(tree: Any, device: str, dtype: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to(v, device, dtype) for k, v in tree.items()}
    return tree.to(device=device, dtype=dtype)


def parts_of(rt_pipe: Any, an_pipe: Any, device: str, model: str, steps: int, compiled: Any = None,
             bf16: Any = None) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """part name -> (runtime call, anchor call), each returning a tensor or array to compare."""
    import torch

    an_dtype = an_pipe.unet.dtype
    rt_in, an_in = unet_inputs(rt_pipe, device)
    an_in = _to(an_in, device, an_dtype)
    unet = rt_pipe.unet_parts[0]
    vae = rt_pipe.components["vae_decoder"]
    te = rt_pipe.components["text_encoder"]
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, rt_pipe.geometry.latent_height, rt_pipe.geometry.latent_width, generator=g)
    ids = torch.tensor([rt_pipe.tokenizers[0].encode(PROMPT)], dtype=torch.float32)

    def an_unet(net: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return net(an_in["sample"], an_in["timestep"], an_in["encoder_hidden_states"],
                           added_cond_kwargs=an_in.get("added_cond_kwargs"), return_dict=False)[0]
        return call

    def an_vae() -> Any:
        with torch.inference_mode():
            return an_pipe.vae.decode(z.to(device, an_dtype), return_dict=False)[0]

    def an_text() -> Any:
        with torch.inference_mode():
            return an_pipe.text_encoder(ids.long().to(device), return_dict=False)[0]

    parts: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "unet": (lambda: unet(rt_in)["noise_pred"], an_unet(an_pipe.unet)),
        "vae": (lambda: vae({"z": z.to(device)})["image"], an_vae),
        "text": (lambda: te({"input_ids": ids.to(device)})["last_hidden_state"], an_text),
        "image": (lambda: runtime_image(rt_pipe, model, steps), lambda: anchor_image(an_pipe, model, steps)),
    }
    if compiled is not None:
        rt_model, an_net = compiled
        dtypes = {d.name: d for d in rt_model.input_description}
        feed = {k: v.to(unet.model.ctx.dtype("fp16")) for k, v in rt_in.items() if k in dtypes}
        parts["unet_compiled"] = (lambda: rt_model.predict_torch(feed)["noise_pred"], an_unet(an_net))
    if bf16 is not None:  # the runtime in bf16 against the same anchor
        bf16_feed = {k: v.to(torch.bfloat16) for k, v in rt_in.items()}
        parts["unet_bf16"] = (lambda: bf16.predict_torch(bf16_feed)["noise_pred"], an_unet(an_pipe.unet))
    return parts


def rel_diff(a: Any, b: Any) -> float:
    import torch

    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float().cpu()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def ab(call_a: Callable[[], Any], call_b: Callable[[], Any], device: str, runs: int, warmup: int) -> dict[str, Any]:
    """Alternate A/B calls after warm-up; medians, fastest, CPU time, and how far the outputs differ."""
    out_a = out_b = None
    for _ in range(warmup):
        out_a = call_a()
        out_b = call_b()
    sync(device)
    times: dict[str, list[float]] = {"a": [], "b": [], "a_cpu": [], "b_cpu": []}
    for _ in range(runs):
        for side, call in (("a", call_a), ("b", call_b)):
            t, c = time.perf_counter(), time.process_time()
            out = call()
            sync(device)
            times[side].append(time.perf_counter() - t)
            times[side + "_cpu"].append(time.process_time() - c)
            if side == "a":
                out_a = out
            else:
                out_b = out
    return {
        "runtime_s": statistics.median(times["a"]), "anchor_s": statistics.median(times["b"]),
        "runtime_min_s": min(times["a"]), "anchor_min_s": min(times["b"]),
        "runtime_cpu_s": statistics.median(times["a_cpu"]), "anchor_cpu_s": statistics.median(times["b_cpu"]),
        "ratio": statistics.median(times["a"]) / statistics.median(times["b"]),
        "cpu_ratio": statistics.median(times["a_cpu"]) / max(statistics.median(times["b_cpu"]), 1e-9),
        "rel_diff": rel_diff(out_a, out_b),
        "all_s": {"runtime": times["a"], "anchor": times["b"]},
    }


# -- a fresh process per side: load, first image, peak memory --------------------------


def fresh(args: argparse.Namespace, side: str, source: Path, variant: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", side, "--model", args.model, "--size", str(args.size),
           "--device", args.device, "--source", str(source), "--variant", str(variant),
           "--steps", str(args.first_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        return {"side": side, "error": out.stderr[-2000:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def measure_child(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    if args.measure.startswith("runtime"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `coreml-hub` sets it (cli.main)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    side = args.measure
    if side.startswith("runtime"):
        import coreml_hub.pipeline.generate  # noqa: F401  (what `run` imports before loading)
    else:
        import diffusers  # noqa: F401
    imported = time.perf_counter()
    if side.startswith("runtime"):
        pipe = load_runtime(Path(args.variant), args.device, reduce_memory=side == "runtime-reduce")
    else:
        pipe = load_anchor(Path(args.source), args.model, args.device)
    sync(args.device)
    loaded = time.perf_counter()
    if side.startswith("runtime"):
        runtime_image(pipe, args.model, args.steps)
    else:
        anchor_image(pipe, args.model, args.steps)
    sync(args.device)
    done = time.perf_counter()
    return {"side": side, "import_s": imported - started, "load_s": loaded - imported, "first_image_s": done - loaded,
            "load_to_image_s": done - imported, "steps": args.steps, **peak(args.device)}


# -- main ------------------------------------------------------------------------------


def _fmt_s(v: float) -> str:
    return f"{v * 1e3:8.1f} ms" if v < 1 else f"{v:8.2f} s "


def report(result: dict[str, Any]) -> None:
    anchor = "diffusers fp16 SDPA" if result["device"].startswith("cuda") else "diffusers eager fp32"
    print(f"{result['model']} {result['size']}x{result['size']}, {result['attention']} attention, "
          f"device {result['device']}, {result['threads']} threads, anchor: {anchor}")
    for name, r in result["parts"].items():
        label = {"unet": "Unet step (batch 2)", "vae": "VAE decode", "text": "text encoder",
                 "image": f"image ({result['steps']} steps)", "unet_compiled": "Unet step, both compiled",
                 "unet_bf16": "Unet step, runtime bf16"}[name]
        print(f"  {label:26} runtime {_fmt_s(r['runtime_s'])}  anchor {_fmt_s(r['anchor_s'])}  "
              f"ratio {r['ratio']:.3f}  (CPU-time ratio {r['cpu_ratio']:.3f}; output rel. diff {r['rel_diff']:.1e})")
    fresh_runs = result.get("fresh", {})
    if fresh_runs:
        an = fresh_runs.get("anchor", {})
        for side, r in fresh_runs.items():
            if "error" in r:
                print(f"  fresh process {side}: FAILED\n{r['error']}")
                continue
            mem = f"peak RSS {r['peak_rss'] / 2**30:6.2f} GiB"
            if r.get("peak_cuda"):
                mem += f", peak CUDA {r['peak_cuda'] / 2**30:6.2f} GiB"
            print(f"  fresh {side:15} import {r['import_s']:5.1f} s  load {r['load_s']:6.1f} s  first image "
                  f"({r['steps']} steps) {r['first_image_s']:6.1f} s  {mem}")
        for side in ("runtime", "runtime-reduce"):
            r = fresh_runs.get(side, {})
            if "error" in r or "error" in an or not r or not an:
                continue
            line = (f"  {side} / anchor: peak RSS {r['peak_rss'] / an['peak_rss']:.3f}, load + first image "
                    f"{r['load_to_image_s'] / an['load_to_image_s']:.3f}, load {r['load_s'] / an['load_s']:.3f}")
            if r.get("peak_cuda") and an.get("peak_cuda"):
                line += f", peak CUDA {r['peak_cuda'] / an['peak_cuda']:.3f}"
            print(line)
        base, red = fresh_runs.get("runtime", {}), fresh_runs.get("runtime-reduce", {})
        if base and red and "error" not in base and "error" not in red:
            key = "peak_cuda" if base.get("peak_cuda") else "peak_rss"
            print(f"  --reduce-memory / default runtime: {key.replace('_', ' ')} {red[key] / base[key]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=list(MODELS))
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's own)")
    parser.add_argument("--attention", default="original", choices=["original", "split_einsum"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--parts", default="unet,vae,text,image", help="which A/B timings (unet,vae,text,image)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the timed whole images")
    parser.add_argument("--first-steps", type=int, default=None, help="steps of the fresh-process first image "
                        "(default: --steps)")
    parser.add_argument("--runs", type=int, default=3, help="A/B calls per side for each part (medians)")
    parser.add_argument("--image-runs", type=int, default=1, help="A/B whole images per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time the Unet with torch.compile on both "
                        "sides (runtime: load_model(compile=True); diffusers: torch.compile(unet))")
    parser.add_argument("--bf16", action="store_true", help="also time the runtime's Unet in bf16 (opt-in "
                        "`run --dtype bf16`) against the same anchor")
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh-process load/first-image/memory runs")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "coreml-hub-real-size"))
    parser.add_argument("--source", default=None, help="a diffusers source folder built before (skips building)")
    parser.add_argument("--variant", default=None, help="a converted variant folder (skips converting)")
    parser.add_argument("--carried", default=None, help="a carried variant folder: refill its weights, "
                        "rebuild the source from the seed")
    parser.add_argument("--prepare-only", action="store_true", help="build and convert (cached), then stop")
    parser.add_argument("--carry", default=None, help="with --prepare-only: also write DIR/<model>-<size>-"
                        "<attention>.carry.tar.gz")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size_given = args.size is not None
    args.size = args.size or MODELS[args.model]["size"]
    args.first_steps = args.first_steps or args.steps

    if args.measure:
        print(json.dumps(measure_child(args)))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.carried:
        variant = Path(args.carried)
        args.model = restore_carry(variant)
        args.size = args.size if size_given else MODELS[args.model]["size"]
        source = Path(args.source) if args.source else build_source(args.model, Path(args.work) / f"{args.model}-source")
    elif args.variant:
        variant = Path(args.variant)
        source = Path(args.source) if args.source else build_source(args.model, Path(args.work) / f"{args.model}-source")
    else:
        source, variant = prepare(args)
    if args.prepare_only:
        print(f"source  {source}\nvariant {variant}")
        if args.carry:
            dest = Path(args.carry) / f"{args.model}-{args.size}-{args.attention}.carry.tar.gz"
            write_carry(args.model, variant, source, dest)
            print(f"carry   {dest} ({dest.stat().st_size / 1e6:.2f} MB)")
        return

    result: dict[str, Any] = {"model": args.model, "size": args.size, "attention": args.attention,
                              "device": args.device, "steps": args.steps, "threads": torch.get_num_threads(),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load": os.getloadavg()}
    if not args.no_fresh:
        # first, while this process is small; one subprocess per side, warm disk cache (the A/B
        # part reads the same files, so run the anchor once before to warm it as well)
        result["fresh"] = {side: fresh(args, side, source, variant)
                           for side in ("runtime", "anchor", "runtime-reduce")}
    rt_pipe = load_runtime(variant, args.device)
    an_pipe = load_anchor(source, args.model, args.device)
    compiled = None
    if args.compile:
        from coreml_hub.mil import load_model

        rt_model = load_model(rt_pipe.unet_parts[0].path, device=args.device, compile=True)
        compiled = (rt_model, torch.compile(an_pipe.unet))
    bf16 = None
    if args.bf16:
        from coreml_hub.mil import load_model

        bf16 = load_model(rt_pipe.unet_parts[0].path, device=args.device, dtype="bf16")
    parts = parts_of(rt_pipe, an_pipe, args.device, args.model, args.steps, compiled, bf16)
    wanted = ([p for p in args.parts.split(",") if p] + (["unet_compiled"] if args.compile else [])
              + (["unet_bf16"] if args.bf16 else []))
    result["parts"] = {}
    for name in wanted:
        runs = args.image_runs if name == "image" else args.runs
        warmup = 0 if name == "image" and not args.device.startswith("cuda") else args.warmup
        if name == "unet_compiled":
            warmup = max(warmup, 2)  # compiling happens in the first calls
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        result["parts"][name] = ab(*parts[name], args.device, runs, warmup)
    result["in_process_peak"] = peak(args.device)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        report(result)


if __name__ == "__main__":
    main()
