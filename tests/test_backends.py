"""Backend plugins: discovery through entry points, selection, the torch backend, the coreml backend.

Core ML cannot predict on Linux, so the coreml backend's own logic (dtype casting, shape
checks, compute units, which coremltools class opens which format, descriptions) is tested
with a small stand-in for the coremltools model object. That is the one place in the suite
where a stand-in replaces the real thing; its descriptions still come from real files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coreml_hub.errors import BackendUnavailable, UsageError
from coreml_hub.pipeline.components import Component, select_backend
from coreml_hub.plugins import get_backends, list_plugins
from coreml_hub_plugins import coreml_backend, torch_backend


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-input ML Program package: fp16 `x` [1, 4], fp32 `scale` [1] -> `y`."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4), dtype=types.fp16), mb.TensorSpec(shape=(1,))],
                opset_version=ct.target.iOS16)
    def prog(x, scale):  # type: ignore[no-untyped-def]
        y = mb.mul(x=mb.cast(x=x, dtype="fp32"), y=scale, name="y")
        return y

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT32)
    path = tmp_path_factory.mktemp("pkg") / "tiny_unet.mlpackage"
    model.save(str(path))
    return path


def test_builtin_backends_register_through_entry_points() -> None:
    backends = get_backends()
    assert {"torch", "coreml"} <= set(backends)
    modules = {p.name: p.module for p in list_plugins()}
    assert modules["torch"] == "coreml_hub_plugins.torch_backend"
    assert modules["coreml"] == "coreml_hub_plugins.coreml_backend"
    for backend in backends.values():
        ok, reason = backend.available()
        assert isinstance(ok, bool) and reason
        assert set(backend.formats) == {"packages", "compiled"}


def test_auto_is_torch_off_macos_and_coreml_is_refused_with_a_reason() -> None:
    if sys.platform == "darwin":
        pytest.skip("on macOS auto picks Core ML; this checks the behaviour everywhere else")
    assert select_backend("auto").name == "torch"
    ok, reason = get_backends()["coreml"].available()
    assert not ok and "macOS" in reason
    with pytest.raises(BackendUnavailable, match="macOS") as info:
        select_backend("coreml")
    assert "--backend torch" in (info.value.hint or "")
    with pytest.raises(BackendUnavailable, match="macOS"):
        coreml_backend.CoreMLBackend().load(Path("x.mlpackage"))
    with pytest.raises(BackendUnavailable, match="No backend named"):
        select_backend("onnx")


def test_torch_device_resolution() -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert torch_backend.resolve_device("auto") == expected
    assert torch_backend.resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA GPU") as info:
            torch_backend.resolve_device("cuda")
        assert "--device cpu" in (info.value.hint or "")
    with pytest.raises(UsageError):
        torch_backend.resolve_device("tpu")


@pytest.mark.runtime
def test_torch_backend_loads_and_predicts_a_real_package(tiny_package: Path) -> None:
    model = torch_backend.TorchBackend().load(tiny_package, device="cpu")
    comp = Component("unet", tiny_package, model)
    assert comp.inputs["x"].shape == (1, 4) and comp.inputs["x"].dtype == "float16"
    import torch

    out = comp({"x": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "scale": torch.tensor([0.5])})
    assert out["y"].dtype == torch.float32
    assert out["y"].tolist() == [[0.5, 1.0, 1.5, 2.0]]


# ---- the coreml backend's logic, with a stand-in for coremltools' model object -------------

class StandInModel:
    """Records what Core ML would be given; answers like an MLModel (fp16 outputs)."""

    def __init__(self, path: str, compute_units: Any = None) -> None:
        self.path = path
        self.compute_units = compute_units
        self.calls: list[dict[str, np.ndarray]] = []

    def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(feed)
        return {"y": (feed["x"].astype(np.float32) * feed["scale"]).astype(np.float16)}

    def get_spec(self) -> Any:
        import coremltools as ct

        return ct.utils.load_spec(self.path)


class StandInCoremltools:
    """Just the two classes `open_model` reaches for."""

    class models:  # noqa: N801 - mirrors coremltools.models
        MLModel = StandInModel
        CompiledMLModel = StandInModel


def test_coreml_package_opens_with_mlmodel_and_casts_inputs(tiny_package: Path) -> None:
    import coremltools as ct

    model = coreml_backend.open_model(tiny_package, "CPU_AND_NE", ct=StandInCoremltools)
    assert model._model.compute_units == ct.ComputeUnit.CPU_AND_NE
    specs = {s.name: s for s in model.input_description}
    assert specs["x"].shape == (1, 4) and specs["x"].dtype == "float16"
    assert specs["scale"].dtype == "float32"
    assert [s.name for s in model.output_description] == ["y"]
    out = model.predict({"x": np.array([[1, 2, 3, 4]], dtype=np.float64), "scale": np.array([2.0])})
    fed = model._model.calls[-1]
    assert fed["x"].dtype == np.float16 and fed["scale"].dtype == np.float32
    assert out["y"].dtype == np.float32 and out["y"].tolist() == [[2, 4, 6, 8]]
    with pytest.raises(ValueError, match="shape"):
        model.predict({"x": np.zeros((2, 4)), "scale": np.array([1.0])})
    with pytest.raises(KeyError, match="scale"):
        model.predict({"x": np.zeros((1, 4))})
    # The pipeline's calling convention works over it unchanged.
    import torch

    comp = Component("unet", tiny_package, model)
    assert comp({"x": torch.ones(1, 4), "scale": torch.tensor([3.0])})["y"].tolist() == [[3.0] * 4]


def test_coreml_compiled_opens_with_compiledmlmodel_and_reads_metadata(tmp_path: Path) -> None:
    import coremltools as ct

    bundle = tmp_path / "Unet.mlmodelc"
    bundle.mkdir()
    (bundle / "metadata.json").write_text(json.dumps([{
        "inputSchema": [
            {"name": "sample", "shape": "[2, 4, 8, 8]", "dataType": "Float16", "type": "MultiArray"},
            {"name": "timestep", "shape": "[2]", "dataType": "Float16", "type": "MultiArray"},
        ],
        "outputSchema": [{"name": "noise_pred", "shape": "[2, 4, 8, 8]", "dataType": "Float32"}],
    }]))

    class Compiled(StandInModel):
        opened: list[str] = []

        def __init__(self, path: str, compute_units: Any = None) -> None:
            super().__init__(path, compute_units)
            Compiled.opened.append(path)

    class CT:
        class models:  # noqa: N801
            MLModel = None
            CompiledMLModel = Compiled

    model = coreml_backend.open_model(bundle, None, ct=CT)
    assert Compiled.opened == [str(bundle)]
    assert model._model.compute_units == ct.ComputeUnit.ALL
    assert [(s.name, s.shape, s.dtype) for s in model.input_description] == [
        ("sample", (2, 4, 8, 8), "float16"), ("timestep", (2,), "float16")]
    assert model.output_description[0].dtype == "float32"


def test_compute_unit_names() -> None:
    import coremltools as ct

    for name in coreml_backend.COMPUTE_UNITS:
        assert coreml_backend.compute_unit(name) == ct.ComputeUnit[name]
    assert coreml_backend.compute_unit("cpu_only") == ct.ComputeUnit.CPU_ONLY
    with pytest.raises(UsageError, match="compute unit"):
        coreml_backend.compute_unit("GPU_ONLY")
