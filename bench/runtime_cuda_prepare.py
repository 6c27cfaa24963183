"""Build what bench/runtime_cuda.sh needs on a GPU machine that may lack coremltools.

Writes into OUT (default bench-carry/):

- `cuda-fixtures.tar.gz`: compiled (`.mlmodelc`) tiny SD1/SDXL components in both
  attention layouts and precisions, each with an `.npz` of inputs and the outputs of the
  source torch module (computed here on the CPU in float32). The runtime loads `.mlmodelc`
  with its own model.mil parser, so the GPU machine needs only torch and numpy.
- `sd15-w128-original.carry.tar.gz`: the benchmark Unet as a compiled bundle with its
  weights zeroed, plus the map that regenerates them (see bench/runtime_bench.py);
  with `--full` also `sd15-w320-original.carry.tar.gz`, SD 1.5's full widths.

    python bench/runtime_cuda_prepare.py [OUT] [--full]
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

CASES = [
    ("sd1", "original", "fp16", ("unet", "text_encoder", "vae_decoder", "vae_encoder")),
    ("sd1", "original", "fp32", ("unet", "text_encoder", "vae_decoder")),
    ("sd1", "split_einsum", "fp16", ("unet",)),
    ("sd1", "split_einsum", "fp32", ("unet",)),
    ("sdxl", "split_einsum", "fp16", ("unet", "text_encoder_2")),
]


def tiny_fixtures(dest: Path) -> Path:
    from coreml_hub.mil import load_model
    from coreml_hub.testing import factory
    from coreml_hub.testing.compiled import build_mlmodelc
    from test_runtime_parity import make_inputs, run_reference

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cuda-fixtures"
        folder.mkdir()
        for style, attention, precision, components in CASES:
            out = factory.converted(style, attention, precision)
            for component in components:
                name = f"{style}-{attention}-{precision}-{component}"
                bundle = build_mlmodelc(factory.package(out, component), folder / f"{name}.mlmodelc")
                model = load_model(bundle)
                inputs = make_inputs(model, seed=1)
                names = [d.name for d in model.output_description]
                expected = run_reference(style, component, inputs, names)
                arrays = {f"in_{k}": v for k, v in inputs.items()}
                arrays.update({f"out_{k}": v for k, v in expected.items()})
                np.savez(folder / f"{name}.npz", **arrays)
                print(f"  {name}", file=sys.stderr)
        with tarfile.open(dest, "w:gz") as tar:
            tar.add(folder, arcname="cuda-fixtures")
    return dest


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(args[0] if args else ROOT / "bench-carry")
    out.mkdir(parents=True, exist_ok=True)
    import runtime_bench

    print("tiny CUDA fixtures ...", file=sys.stderr)
    fixtures = tiny_fixtures(out / "cuda-fixtures.tar.gz")
    print("benchmark Unet ...", file=sys.stderr)
    work = Path(tempfile.gettempdir()) / "coreml-hub-runtime-bench"
    written = [fixtures]
    for widths in (runtime_bench.NARROW,) + ((runtime_bench.FULL,) if "--full" in sys.argv else ()):
        _, bundle = runtime_bench.prepare(work, widths, "original")
        written.append(runtime_bench.write_carry(bundle, widths, out / f"{bundle.stem}.carry.tar.gz"))
    for path in written:
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
