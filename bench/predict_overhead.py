"""Per-call overhead of `predict` against running the same torch module eagerly.

Two models, each converted with coremltools from a torch module (fp32 ML Program):

  one-op     y = relu(x) on a [1, 64] input: nearly all of a call is overhead
  small CNN  two convolutions, a mean and a linear layer on a [1, 3, 32, 32] input

Each is called four ways, alternating call by call after warm-up, medians of `--runs`:

  torch              the torch module, eager, under torch.no_grad()      (the anchor)
  predict            coreml_hub Model.predict (numpy in, numpy out, inputs checked)
  predict_torch      coreml_hub Model.predict_torch (tensors in, tensors out)
  MLModel.predict    coremltools' MLModel.predict through coreml_hub.coremltools_compat

Prints microseconds per call and each side's ratio to the anchor.

    python bench/predict_overhead.py --runs 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class OneOp(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def convert(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Any:
    import coremltools as ct

    traced = torch.jit.trace(module, example)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=tuple(example.shape))],
                         outputs=[ct.TensorType(name="y")], convert_to="mlprogram",
                         compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    mlmodel.save(str(path))
    return ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)


def measure(sides: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each side, calls alternating between sides."""
    for _ in range(warmup):
        for call in sides.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, call in sides.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from coreml_hub import coremltools_compat
    from coreml_hub.mil import load_model

    coremltools_compat.install()
    torch.manual_seed(0)
    cases = {"one-op": (OneOp().eval(), torch.rand(1, 64)), "small CNN": (SmallCNN().eval(), torch.rand(1, 3, 32, 32))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} alternating calls per side")
    print(f"{'model':<10} {'side':<16} {'us/call':>9} {'x torch':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (module, example) in cases.items():
            path = Path(tmp) / f"{label.replace(' ', '_')}.mlpackage"
            mlmodel = convert(module, example, path)
            model = load_model(path)
            x_np, x_t = example.numpy(), example.clone()
            with torch.no_grad():
                reference = module(x_t).numpy()
            np.testing.assert_allclose(model.predict({"x": x_np})["y"], reference, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(mlmodel.predict({"x": x_np})["y"], reference, rtol=1e-4, atol=1e-5)

            def eager(module: torch.nn.Module = module, x: torch.Tensor = x_t) -> Any:
                with torch.no_grad():
                    return module(x)

            sides = {
                "torch": eager,
                "predict": lambda model=model, x=x_np: model.predict({"x": x}),
                "predict_torch": lambda model=model, x=x_t: model.predict_torch({"x": x}),
                "MLModel.predict": lambda mlmodel=mlmodel, x=x_np: mlmodel.predict({"x": x}),
            }
            medians = measure(sides, args.runs, args.warmup)
            for side, seconds in medians.items():
                print(f"{label:<10} {side:<16} {seconds * 1e6:9.1f} {seconds / medians['torch']:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
