"""Per-call overhead of `Model.predict`: a one-op model and a small CNN against the same torch module run eagerly.

    python bench/predict_overhead_bench.py [--rounds 5] [--calls 300] [--threads 1]

Each model is converted with coremltools (fp32, cached in the test cache) and loaded with
`coreml_hub.mil.load_model` on the CPU. One round times `--calls` calls of `predict` (numpy
in, numpy out: checking, conversion, the compiled program) and `--calls` calls of the torch
module under `torch.inference_mode()` with `.numpy()` on the result; the two alternate, and
the medians over `--rounds` are printed with their ratio (predict / eager; 1 would be no
overhead at all).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable


def _modules() -> dict[str, tuple[Any, tuple[int, ...]]]:
    import torch
    from torch import nn

    torch.manual_seed(0)

    class OneOp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x)

    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return {"one-op (relu [1, 64])": (OneOp().eval(), (1, 64)), "small CNN (3 convs + linear, 32x32)": (cnn.eval(), (1, 3, 32, 32))}


def _convert(module: Any, shape: tuple[int, ...], folder: Path) -> None:
    import coremltools as ct
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(module, torch.rand(shape))
    model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=shape)], outputs=[ct.TensorType(name="y")],
                       compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    model.save(str(folder / "model.mlpackage"))
    torch.save(module.state_dict(), folder / "weights.pt")


def _timed(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("coremltools").setLevel(logging.ERROR)

    import numpy as np
    import torch

    from coreml_hub.mil import load_model
    from coreml_hub.testing.factory import cached

    torch.set_num_threads(args.threads)
    print(f"{'model':38} {'predict':>12} {'eager torch':>12} {'ratio':>7}")
    for label, (module, shape) in _modules().items():
        folder = cached("bench-predict", lambda tmp, m=module, s=shape: _convert(m, s, tmp),
                        code=(), label=label, source=inspect.getsource(_modules) + inspect.getsource(_convert))
        module.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
        model = load_model(folder / "model.mlpackage", device="cpu")
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        xt = torch.from_numpy(x)

        def eager() -> Any:
            with torch.inference_mode():
                return module(xt).numpy()

        def ours() -> Any:
            return model.predict({"x": x})

        np.testing.assert_allclose(ours()["y"], eager(), rtol=1e-4, atol=1e-5)
        for _ in range(max(10, args.calls // 10)):  # warm both
            ours(), eager()
        predict_times, eager_times = [], []
        for _ in range(args.rounds):
            predict_times.append(_timed(ours, args.calls))
            eager_times.append(_timed(eager, args.calls))
        p, e = statistics.median(predict_times), statistics.median(eager_times)
        print(f"{label:38} {p * 1e6:9.1f} us {e * 1e6:9.1f} us {p / e:6.2f}x")


if __name__ == "__main__":
    main()
