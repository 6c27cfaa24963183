"""Every public Apple-compiled sample in shared/mil (tests/data/mil/README.md) loads and runs.

The whole bundles run as published. The single model.mil files come without their weight
files, so their weights are filled in (zeros, of each constant's declared type and shape)
before they run: what is checked is that the runtime executes every op of each real
compiler-written program, flexible shapes included, and returns outputs of the declared types.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _mil_fixtures import SAMPLES, SAMPLES_MISSING
from coreml_hub.mil import load_model, text
from coreml_hub.mil.executor import FunctionRunner
from coreml_hub.mil.ops import Context
from coreml_hub.mil.program import DTYPES, Program, TensorType, TensorValue

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=SAMPLES_MISSING)

MIL_FILES = sorted(p.name for p in SAMPLES.glob("*.mil")) if SAMPLES.is_dir() else []
BUNDLES = sorted(p.name for p in (SAMPLES / "bundles").iterdir()) if (SAMPLES / "bundles").is_dir() else []


def _fill_weights(program: Program) -> int:
    """Replace every weight-file constant by zeros of its type; returns how many were replaced."""
    count = 0
    for function in program.functions.values():
        for op in function.block.walk():
            for key, value in list(op.attributes.items()):
                if isinstance(value, TensorValue) and value.is_blob:
                    shape = value.type.static_shape
                    assert shape is not None, f"{op.name}: weight of unknown shape"
                    op.attributes[key] = TensorValue(value.type, np.zeros(shape, DTYPES[value.type.dtype]))
                    count += 1
    return count


def _example(t: TensorType, ctx: Context, size: int = 16) -> torch.Tensor:
    shape = [d if isinstance(d, int) else size for d in t.shape or ()]
    dtype = ctx.dtype(t.dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name", MIL_FILES)
def test_public_model_mil_runs(name: str) -> None:
    program = text.load(SAMPLES / name)
    _fill_weights(program)
    ctx = Context.create("cpu", dict.fromkeys(("fp16", "fp32", "fp64", "bf16"), torch.float32))
    main = program.functions["main"]
    runner = FunctionRunner(main, ctx, model_name=name)
    outputs = runner.run({v.name: _example(v.type, ctx) for v in runner.inputs})
    declared = main.output_types()
    assert list(outputs) == list(main.outputs)
    for key, value in outputs.items():
        t = declared[key]
        assert isinstance(t, TensorType) and value.dim() == len(t.shape or ()), key
        assert all(s == d for s, d in zip(value.shape, t.shape or ()) if isinstance(d, int)), (key, value.shape, t)
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_public_bundle_runs(name: str) -> None:
    model = load_model(SAMPLES / "bundles" / name)
    rng = np.random.default_rng(0)
    inputs = {d.name: (rng.standard_normal(d.shape) * 0.1).astype(d.numpy_dtype) for d in model.input_description}
    out = model.predict(inputs)
    assert {d.name for d in model.output_description} == set(out)
    assert all(np.isfinite(v).all() for v in out.values())
    probability = next(v for k, v in out.items() if "vad" in k)
    assert ((probability >= 0) & (probability <= 1)).all()
