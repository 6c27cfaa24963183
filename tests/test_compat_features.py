"""coremltools' own API on Linux through `coreml_hub.coremltools_compat`: the model-level features.

`ct.models.MLModel(...).predict`, `.make_state()` and `ct.models.CompiledMLModel(...).predict`
with coremltools' conventions (dict of numpy / torch / PIL in, numpy / PIL / label and
probabilities out), checked against the torch modules the models were converted from; and
the three ways to switch it on: `install()`, COREML_HUB_COREMLTOOLS=1, the pytest plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from coreml_hub import coremltools_compat as compat
from coreml_hub.errors import ModelInputError, UnsupportedModel
from coreml_hub.testing import feature_models as fm

ct = pytest.importorskip("coremltools", reason="the drop-in patches coremltools")
torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slow
NATIVE = sys.platform == "darwin"


@pytest.fixture(autouse=True)
def installed() -> Iterator[None]:
    was = compat.installed()
    compat.install(force=True)  # also on a Mac, so that these tests check the portable runtime
    yield
    if not was:
        compat.uninstall()


def mlmodel(name: str, **kwargs: Any) -> Any:
    return ct.models.MLModel(str(fm.package(name)), **kwargs)


def reference(name: str, *args: Any) -> Any:
    with torch.no_grad():
        out = fm.reference(name)(*(torch.as_tensor(a) for a in args))
    return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()


def test_image_input_and_classifier_through_mlmodel_predict() -> None:
    layout, scale, bias = fm.IMAGE_LAYOUTS["image_bgr"]
    pixels = np.random.default_rng(0).integers(0, 256, (*fm.IMAGE_SIZE, 3), dtype=np.uint8)
    tensor = pixels.transpose(2, 0, 1)[::-1].astype(np.float32) * np.float32(scale) + np.float32(bias)[:, None, None]
    out = mlmodel("image_bgr").predict({"image": Image.fromarray(pixels, "RGB")})
    np.testing.assert_allclose(out["features"], reference("image_bgr", tensor[None]), rtol=1e-5, atol=1e-4)

    features = np.random.default_rng(1).standard_normal((1, 10)).astype(np.float32)
    probs = reference("classifier", features)[0]
    result = mlmodel("classifier").predict({"features": torch.from_numpy(features)})  # torch tensors too
    assert result["classLabel"] == fm.CLASS_LABELS[int(np.argmax(probs))]
    np.testing.assert_allclose([result["classLabel_probs"][k] for k in fm.CLASS_LABELS], probs, rtol=1e-5, atol=1e-6)


def test_image_outputs_and_flexible_shapes_through_mlmodel_predict() -> None:
    x = np.random.default_rng(2).standard_normal((1, 3, *fm.IMAGE_SIZE)).astype(np.float32) * 6
    out = mlmodel("image_outputs").predict({"x": x})
    color, _, gray, gray16 = reference("image_outputs", x)
    assert isinstance(out["rgb"], Image.Image) and out["gray16"].mode == "F"
    np.testing.assert_allclose(np.asarray(out["rgb"], np.float32), np.clip(np.rint(color[0]), 0, 255).transpose(1, 2, 0),
                               atol=1)
    np.testing.assert_allclose(np.asarray(out["gray16"]), gray16[0, 0], rtol=1e-3, atol=1e-3)

    ranged = mlmodel("range_dim")
    for n in (2, 11):
        value = np.random.default_rng(n).standard_normal((1, n, 8)).astype(np.float32)
        np.testing.assert_allclose(ranged.predict({"x": value})["y"], reference("range_dim", value), atol=1e-5)
    with pytest.raises(ModelInputError, match=r"'x' has shape \[1, 20, 8\], the model takes \[1, 1\.\.16, 8\]"):
        ranged.predict({"x": np.zeros((1, 20, 8), np.float32)})
    enumerated = mlmodel("enumerated_shapes")
    value = np.ones((2, 4, 8), np.float32)
    np.testing.assert_allclose(enumerated.predict({"x": value})["y"], reference("enumerated_shapes", value), atol=1e-5)


def test_multifunction_and_optional_inputs_through_mlmodel() -> None:
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(mlmodel("multifunction").predict({"x": x})["y"], _shift(x), atol=1e-5)
    doubled = mlmodel("multifunction", function_name="double").predict({"x": np.full((2, 3), 4.0, np.float32)})
    np.testing.assert_allclose(doubled["y"], np.full((2, 3), 8.0))
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(mlmodel("optional").predict({"x": y})["y"], y * 0.5 + 3)


def _shift(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return fm.reference("multifunction").shifter(torch.from_numpy(x)).numpy()


def test_make_state_and_mlstate_read_write() -> None:
    model = mlmodel("accumulator")
    state = model.make_state()
    assert isinstance(state, ct.models.model.MLState)
    xs = np.random.default_rng(3).random((3, 1, 4)).astype(np.float32)
    for i, x in enumerate(xs):
        out = model.predict({"x": x}, state=state)
    np.testing.assert_allclose(out["total_out"], xs.sum(0), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(state.read_state("total"), out["total_out"])
    state.write_state("total", np.zeros((1, 4), np.float16))
    np.testing.assert_allclose(model.predict({"x": xs[0]}, state=state)["total_out"], xs[0], rtol=1e-3)

    kv = mlmodel("kv_cache")
    kv_state = kv.make_state()
    module = fm.reference("kv_cache")
    for pos in range(3):
        x = np.random.default_rng(pos).standard_normal((1, 1, fm.KV_WIDTH)).astype(np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(x), torch.tensor([pos], dtype=torch.int32)).numpy()
        got = kv.predict({"x": x, "pos": np.array([pos], np.int32)}, state=kv_state)["y"]
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=1e-2, atol=5e-3)


def test_compiled_mlmodel_predict_and_state() -> None:
    compiled = ct.models.CompiledMLModel(str(fm.compiled("classifier")), compute_units=ct.ComputeUnit.CPU_ONLY)
    features = np.zeros((1, 10), np.float32)
    out = compiled.predict({"features": features})
    assert out["classLabel"] in fm.CLASS_LABELS and len(out["classLabel_probs"]) == len(fm.CLASS_LABELS)
    stateful = ct.models.CompiledMLModel(str(fm.compiled("accumulator")))
    state = stateful.make_state()
    for _ in range(2):
        result = stateful.predict({"x": np.ones((1, 4), np.float32)}, state=state)
    np.testing.assert_allclose(result["total_out"], np.full((1, 4), 2.0))
    double = ct.models.CompiledMLModel(str(fm.compiled("multifunction")), function_name="double")
    np.testing.assert_allclose(double.predict({"x": np.ones((2, 3), np.float32)})["y"], np.full((2, 3), 2.0))


def test_batches_compute_units_and_converted_models(tmp_path: Path) -> None:
    model = mlmodel("range_dim", compute_units=ct.ComputeUnit.CPU_ONLY)
    batch = [{"x": np.full((1, n, 8), 0.1 * n, np.float32)} for n in (1, 4)]
    results = model.predict(batch)
    assert [r["y"].shape for r in results] == [(1, 1, 4), (1, 4, 4)]
    assert compat.to_model(model).device.type == "cpu"
    assert compat.device_for(ct.ComputeUnit.CPU_ONLY) == "cpu"
    assert compat.device_for(ct.ComputeUnit.CPU_AND_NE) == "cpu"
    assert compat.device_for(ct.ComputeUnit.ALL) == compat.device_for(ct.ComputeUnit.CPU_AND_GPU) == "auto"

    # the CI use: convert, then predict right away, without saving
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(3,))], opset_version=ct.target.iOS16)
    def program(x: Any) -> Any:
        return mb.relu(x=mb.sub(x=x, y=1.0), name="y")

    converted = ct.convert(program, minimum_deployment_target=ct.target.iOS16, compute_precision=ct.precision.FLOAT32)
    np.testing.assert_allclose(converted.predict({"x": np.array([0.5, 1.5, 3.0], np.float32)})["y"], [0, 0.5, 2.0])


def test_neural_network_models_fail_by_name() -> None:
    model = ct.models.MLModel(str(fm.package("neural_network")), skip_model_load=True)
    with pytest.raises(UnsupportedModel, match="'neuralNetwork' model; the portable runtime runs ML Programs"):
        model.predict({"x": np.zeros((1, 3, 8), np.float32)})


@pytest.mark.skipif(NATIVE, reason="on macOS coremltools predicts natively once the drop-in is uninstalled")
def test_uninstall_restores_coremltools() -> None:
    model = mlmodel("optional")
    compat.uninstall()
    try:
        with pytest.raises(Exception, match="Unable to load CoreML.framework|macOS"):
            model.predict({"x": np.ones((2, 3), np.float32)})
        with pytest.raises(Exception, match="compiled models|macOS"):
            ct.models.CompiledMLModel(str(fm.compiled("optional")))
    finally:
        compat.install(force=True)
    assert model.predict({"x": np.ones((2, 3), np.float32)})["y"].shape == (2, 3)


# -- switching it on --------------------------------------------------------------------------

_USER_TEST = """
import numpy as np
import coremltools as ct

def test_predict_on_linux():
    model = ct.models.MLModel({path!r})
    out = model.predict({{"x": np.ones((2, 3), np.float32)}})
    np.testing.assert_allclose(out["y"], np.full((2, 3), 3.5))
"""


def _run(args: list[str], cwd: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != compat.ENV_VAR}
    env.update(env_extra)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.extended  # extended tier: a pytest run in a subprocess
def test_environment_variable_switches_it_on_for_a_user_suite(tmp_path: Path) -> None:
    """A user's suite, untouched: the plugin pytest loads from the entry point arms the drop-in,
    and it installs when the test imports coremltools."""
    (tmp_path / "test_user.py").write_text(_USER_TEST.format(path=str(fm.package("optional"))))
    result = _run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", "-o", "addopts=",
                   "--rootdir", str(tmp_path), "test_user.py"], tmp_path, {compat.ENV_VAR: "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "coreml-hub: coremltools' MLModel.predict runs on the portable ML Program runtime" in result.stdout


class _Config:
    """What the plugin reads of pytest's config: the command line and the -p plugins."""

    def __init__(self, args: list[str], plugins: list[str]) -> None:
        self.invocation_params = type("Params", (), {"args": tuple(args)})()
        self.option = type("Options", (), {"plugins": plugins})()

    def getoption(self, name: str, default: Any = None) -> Any:
        return default


def test_pytest_plugin_installs_with_p_and_stays_inert_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from coreml_hub import pytest_plugin

    compat.uninstall()
    monkeypatch.delenv(compat.ENV_VAR, raising=False)
    pytest_plugin.pytest_configure(_Config(["tests"], []))  # loaded from the entry point only
    assert not compat.installed() and not compat.armed()
    assert pytest_plugin.pytest_report_header(_Config([], [])) is None
    pytest_plugin.pytest_configure(_Config(["-p", "coreml_hub.pytest_plugin", "tests"], ["coreml_hub.pytest_plugin"]))
    assert compat.installed()  # coremltools is imported here, so it installs at once
    assert "portable ML Program runtime" in pytest_plugin.pytest_report_header(_Config([], []))
    compat.uninstall()
    monkeypatch.setenv(compat.ENV_VAR, "1")
    pytest_plugin.pytest_configure(_Config(["tests"], []))
    assert compat.installed()


def test_environment_variable_at_import_waits_for_coremltools(tmp_path: Path) -> None:
    script = ("import sys, coreml_hub\n"
              "from coreml_hub import coremltools_compat as c\n"
              "print('coremltools' in sys.modules, 'torch' in sys.modules, c.armed(), c.installed())\n")
    result = _run([sys.executable, "-c", script], tmp_path, {compat.ENV_VAR: "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True", "False"]  # armed, nothing heavy imported
    result = _run([sys.executable, "-c", script], tmp_path, {})
    assert result.stdout.split() == ["False", "False", "False", "False"]
