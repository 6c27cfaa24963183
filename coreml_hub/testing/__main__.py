"""`python -m coreml_hub.testing warm`: build the test suite's tiny conversions into the cache.

Run once before `pytest -n N` so that the workers find every conversion ready, and to
see what the conversions cost:

    python -m coreml_hub.testing warm            # the standard set
    python -m coreml_hub.testing warm --list     # what it would build
    python -m coreml_hub.testing path            # the cache folder
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

# (style, attention, precision, options): what the test suite asks `converted` for.
STANDARD: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    *((s, a, "fp16", {}) for s in ("sd1", "sd2", "sdxl") for a in ("original", "split_einsum", "split_einsum_v2")),
    *((s, "original", "fp32", {}) for s in ("sd1", "sd2", "sdxl")),
    # every attention in fp32 too (the runtime parity tests), and each style's chunked Unet
    *((s, a, "fp32", {}) for s in ("sd1", "sd2", "sdxl") for a in ("split_einsum", "split_einsum_v2")),
    *((s, "split_einsum", p, {"chunk": True}) for s in ("sd1", "sd2", "sdxl") for p in ("fp16", "fp32")
      if (s, p) != ("sd1", "fp16")),
    ("sd1", "original", "fp32", {"batch_one": True}),
    ("sd1", "split_einsum", "fp16", {"chunk": True}),
    ("sd1", "split_einsum", "fp16", {"quantize": 6}),
    ("sd1", "split_einsum", "fp16", {"quantize": 4}),
    ("sd1", "split_einsum", "fp16", {"chunk": True, "quantize": 6}),
    ("sd1", "split_einsum", "fp16", {"latent_size": (8, 12)}),
    ("sd1", "original", "fp16", {"chunk": True, "compiled": True}),
    ("sd1", "split_einsum", "fp16", {"chunk": True, "compiled": True}),
    # the layouts `publish` writes (compiled bundles without chunks, community sizes)
    ("sd1", "original", "fp16", {"compiled": True}),
    ("sd1", "split_einsum", "fp16", {"compiled": True}),
    ("sd1", "split_einsum", "fp16", {"quantize": 6, "compiled": True}),
    ("sdxl", "original", "fp16", {"compiled": True}),
    ("sd2", "original", "fp16", {"compiled": True}),
    ("sdxl", "original", "fp16", {"chunk": True, "compiled": True}),
    ("sd1", "split_einsum_v2", "fp16", {"compiled": True}),
    ("sd1", "original", "fp16", {"latent_size": (24, 16), "compiled": True}),
    ("sd1", "split_einsum", "fp16", {"latent_size": (24, 16), "compiled": True}),
    # ControlNets and inpainting: parity (fp32), the Hub layouts (fp16 compiled)
    ("sd1", "original", "fp32", {"controlnets": ("sd1", "sd1-b", "sd1-inpaint")}),
    ("sdxl", "original", "fp32", {"controlnets": ("sdxl",)}),
    ("sd1-inpaint", "original", "fp32", {}),
    ("sd1", "original", "fp16", {"controlnets": ("sd1", "sd1-b"), "compiled": True}),
    ("sd3", "original", "fp32", {}),
    ("sd3", "original", "fp16", {"compiled": True}),
    ("sdxl", "original", "fp32", {"refiner": True}),
    ("sdxl", "original", "fp16", {"chunk": True, "compiled": True, "refiner": True}),
)
# (tiny ControlNet, attention, precision): ControlNets converted on their own (`controlnet_package`)
CONTROLNET_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("sd1", "original", "fp16"),
    ("sd2", "original", "fp16"),
    ("sd2", "original", "fp32"),
    ("sd1-b", "split_einsum", "fp32"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coreml_hub.testing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    warm = sub.add_parser("warm", help="build the standard conversions into the cache")
    warm.add_argument("--list", action="store_true", help="print the set and build nothing")
    sub.add_parser("path", help="print the cache folder")
    args = parser.parse_args(argv)

    from . import factory

    if args.command == "path":
        print(factory.cache_dir())
        return 0
    total = time.perf_counter()
    for style, attention, precision, options in STANDARD:
        label = f"{style} {attention} {precision} {options or ''}".strip()
        if args.list:
            print(label)
            continue
        t0 = time.perf_counter()
        out = factory.converted(style, attention, precision, **options)
        print(f"{time.perf_counter() - t0:7.1f} s  {label}  {out}", file=sys.stderr, flush=True)
    for name, attention, precision in CONTROLNET_PACKAGES:
        label = f"controlnet {name} {attention} {precision}"
        if args.list:
            print(label)
            continue
        t0 = time.perf_counter()
        out = factory.controlnet_package(name, attention, precision)
        print(f"{time.perf_counter() - t0:7.1f} s  {label}  {out}", file=sys.stderr, flush=True)
    from . import feature_models

    for name in feature_models.NAMES:  # one small model per model-level feature, both forms
        if args.list:
            print(f"feature {name}")
            continue
        t0 = time.perf_counter()
        out = feature_models.package(name)
        if out.suffix == ".mlpackage":
            feature_models.compiled(name)
        print(f"{time.perf_counter() - t0:7.1f} s  feature {name}  {out}", file=sys.stderr, flush=True)
    from . import lm_models, models, task_models

    for label, build in (("depth fp16", lambda: models.depth("fp16")), ("depth fp32", lambda: models.depth("fp32")),
                         *((f"task {name}", getattr(task_models, name)) for name in task_models.BUILDERS),
                         ("task segmenter fp16", lambda: task_models.segmenter("fp16")),
                         ("lm tokenizer", lm_models.tokenizer_folder),
                         ("lm stateful int4", lambda: lm_models.stateful_lm("int4")),
                         ("lm stateful fp16", lambda: lm_models.stateful_lm("fp16")),
                         ("lm exporters", lm_models.exporters_lm)):
        if args.list:
            print(label)
            continue
        t0 = time.perf_counter()
        out = build()
        print(f"{time.perf_counter() - t0:7.1f} s  {label}  {out}", file=sys.stderr, flush=True)
    if not args.list:
        print(f"{time.perf_counter() - total:7.1f} s  total ({factory.cache_dir()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
