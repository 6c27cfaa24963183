"""`coreml_hub.coremltools_compat`: coremltools' own MLModel API predicting on the portable runtime.

Every model here is converted with real coremltools; predictions go through coremltools'
`MLModel.predict` (its input checks and conversions included) and are compared with the
torch module or a numpy reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools", reason="the compatibility layer patches coremltools")

from coreml_hub import coremltools_compat  # noqa: E402
from coreml_hub.errors import ModelInputError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def installed() -> Any:
    was = coremltools_compat.installed()
    coremltools_compat.install(force=True)  # also on a Mac, so that these tests check the portable runtime
    coremltools_compat.install(force=True)  # idempotent
    yield
    if not was:
        coremltools_compat.uninstall()


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.softmax(self.fc(h.mean((2, 3))), -1)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Any, Path]:
    torch.manual_seed(0)
    module = SmallCNN().eval()
    traced = torch.jit.trace(module, torch.rand(1, 3, 16, 16))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="image", shape=(1, 3, 16, 16))],
                         outputs=[ct.TensorType(name="probs")], convert_to="mlprogram",
                         compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    path = tmp_path_factory.mktemp("cnn") / "cnn.mlpackage"
    mlmodel.save(str(path))
    return module, mlmodel, path


def test_converted_model_predicts_like_torch(cnn: Any) -> None:
    module, mlmodel, _ = cnn
    x = torch.rand(1, 3, 16, 16)
    out = mlmodel.predict({"image": x.numpy()})  # the MLModel ct.convert returned, as in a CI script
    with torch.no_grad():
        np.testing.assert_allclose(out["probs"], module(x).numpy(), rtol=1e-4, atol=1e-6)
    # torch tensors and float64 arrays are accepted, as coremltools accepts them
    again = mlmodel.predict({"image": x.double().numpy()})
    np.testing.assert_allclose(again["probs"], out["probs"], rtol=1e-6)
    assert mlmodel.predict({"image": x})["probs"].shape == (1, 5)


def test_loaded_package_compute_units_and_batches(cnn: Any) -> None:
    module, _, path = cnn
    cpu = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    xs = [torch.rand(1, 3, 16, 16) for _ in range(2)]
    batch = cpu.predict([{"image": x.numpy()} for x in xs])
    with torch.no_grad():
        for x, out in zip(xs, batch):
            np.testing.assert_allclose(out["probs"], module(x).numpy(), rtol=1e-4, atol=1e-6)
    assert coremltools_compat.to_model(cpu).device.type == "cpu"
    best = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
    assert coremltools_compat.to_model(best).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(KeyError, match="does not match any of the model input"):
        cpu.predict({"not_an_input": xs[0].numpy()})


def test_integer_inputs_get_the_declared_type(tmp_path: Path) -> None:
    """coremltools' testing utilities pass float32 for every input: Core ML converts to the declared type."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((4,)), mb.TensorSpec((2,), dtype=types.int32)],
                opset_version=ct.target.iOS16)
    def prog(x, index):  # noqa: ANN001, ANN202
        return mb.gather(x=x, indices=index, axis=0)

    mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                         compute_precision=ct.precision.FLOAT32)
    out = mlmodel.predict({"x": np.array([1, 2, 3, 4], np.float32), "index": np.array([3.0, 1.0], np.float32)})
    np.testing.assert_array_equal(next(iter(out.values())), [4, 2])


def test_make_state_and_state_reads_and_writes(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.StateTensorSpec((3,), dtype=types.fp16), mb.TensorSpec((3,), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(acc, x):  # noqa: ANN001, ANN202
        total = mb.add(x=mb.read_state(input=acc), y=x)
        return mb.mul(x=mb.coreml_update_state(state=acc, value=total), y=np.float16(2))

    mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    state = mlmodel.make_state()
    ones = np.ones(3, np.float32)
    outs = [next(iter(mlmodel.predict({"x": ones}, state=state).values())) for _ in range(3)]
    np.testing.assert_allclose(outs, [[2] * 3, [4] * 3, [6] * 3])
    np.testing.assert_allclose(state.read_state("acc"), [3, 3, 3])
    assert state.read_state("acc").dtype == np.float16
    state.write_state("acc", np.array([10, 20, 30], np.float16))
    np.testing.assert_allclose(next(iter(mlmodel.predict({"x": ones}, state=state).values())), [22, 42, 62])
    fresh = mlmodel.make_state()  # a new state starts at zeros, independent of the first
    np.testing.assert_allclose(next(iter(mlmodel.predict({"x": ones}, state=fresh).values())), [2, 2, 2])
    with pytest.raises(ModelInputError, match="no state 'nope'"):
        state.read_state("nope")


def test_coremltools_test_helpers_compare_predictions(cnn: Any) -> None:
    """compare_backend predicts (it skipped on Linux before) and fails on a wrong expectation."""
    from coremltools.converters.mil import testing_utils

    module, mlmodel, _ = cnn
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = module(x).numpy()
    pred = testing_utils.compare_backend(mlmodel, {"image": x.numpy()}, {"probs": expected}, dtype="fp32")
    assert pred is not None
    with pytest.raises(AssertionError):
        testing_utils.compare_backend(mlmodel, {"image": x.numpy()}, {"probs": expected + 1.0}, dtype="fp32")
