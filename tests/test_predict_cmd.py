"""`coreml-hub predict`: every model-level feature from the command line, against the torch modules;
the errors a user meets for bad inputs; bundles in folders and pulled variants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coreml_hub.cli import run_cli
from coreml_hub.testing import feature_models as fm

pytest.importorskip("coremltools", reason="coremltools converts the test models")
torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slow


def predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    code, out, err = predict(capsys, *args)
    assert code == 0, err
    return out, err


def failure(capsys: pytest.CaptureFixture[str], code: int, *args: str) -> str:
    got, out, err = predict(capsys, *args)
    lines = err.strip().splitlines()
    assert got == code, err
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in err and out == "", err
    return err


def reference(name: str, *args: Any) -> Any:
    with torch.no_grad():
        out = fm.reference(name)(*(torch.as_tensor(a) for a in args))
    return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()


def rows(out: str) -> dict[str, list[str]]:
    """The table's rows by output name (columns split on runs of 3+ spaces)."""
    import re

    lines = out.strip().splitlines()
    return {cells[0]: cells for cells in (re.split(r"\s{3,}", line.strip()) for line in lines[1:])}


def test_classifier_prints_the_label_and_top_five(capsys: pytest.CaptureFixture[str]) -> None:
    features = np.random.default_rng(0).standard_normal(10).astype(np.float32)
    out, err = ok(capsys, str(fm.package("classifier")), "--input", f"features={json.dumps(features.tolist())}")
    probs = reference("classifier", features[None])[0]
    order = np.argsort(-probs)
    table = rows(out)
    assert out.splitlines()[0].split() == ["OUTPUT", "DTYPE", "SHAPE", "SUMMARY"]
    assert table["classLabel"][3] == fm.CLASS_LABELS[order[0]]
    summary = table["classLabel_probs"][3]
    assert summary.startswith("top 5: ") and table["classLabel_probs"][2] == "6 classes"
    named = [part.rsplit(" ", 1) for part in summary.removeprefix("top 5: ").split(", ")]
    assert [label for label, _ in named] == [fm.CLASS_LABELS[i] for i in order[:5]]
    np.testing.assert_allclose([float(p) for _, p in named], probs[order[:5]], atol=6e-4)
    assert "Ran classifier.mlpackage on " in err and "predicted in" in err


def test_image_input_from_a_file_and_outputs_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout, scale, bias = fm.IMAGE_LAYOUTS["image_rgb"]
    pixels = np.random.default_rng(1).integers(0, 256, (*fm.IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "picture.png")
    out, _ = ok(capsys, str(fm.compiled("image_rgb")), "-i", f"image={tmp_path / 'picture.png'}",
                "--output-dir", str(tmp_path / "out"), "--device", "cpu")
    tensor = pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(scale) + np.float32(bias)[:, None, None]
    saved = np.load(tmp_path / "out" / "features.npy")
    np.testing.assert_allclose(saved, reference("image_rgb", tensor[None]), rtol=1e-5, atol=1e-4)
    assert rows(out)["features"][1:3] == ["float32", "[1, 4]"]
    assert rows(out)["features"][-1] == str(tmp_path / "out" / "features.npy")


def test_image_outputs_become_png_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(2).standard_normal((1, 3, *fm.IMAGE_SIZE)).astype(np.float32) * 6
    np.save(tmp_path / "x.npy", x)
    out, _ = ok(capsys, str(fm.package("image_outputs")), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(tmp_path))
    color, _, gray, gray16 = reference("image_outputs", x)
    rgb = np.asarray(Image.open(tmp_path / "rgb.png"), np.float32)
    np.testing.assert_allclose(rgb, np.clip(np.rint(color[0]), 0, 255).transpose(1, 2, 0), atol=1)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bgr.png")), rgb.astype(np.uint8))
    assert Image.open(tmp_path / "gray.png").mode == "L"
    np.testing.assert_allclose(np.load(tmp_path / "gray16.npy"), gray16[0, 0], rtol=1e-3, atol=1e-3)
    table = rows(out)
    assert table["rgb"][1:4] == ["RGB", "8x8", "RGB image 8x8"] and table["gray16"][1] == "F"


def test_flexible_shapes_npz_inputs_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(3).standard_normal((1, 5, 8)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x, other=np.zeros(3))
    out, _ = ok(capsys, str(fm.package("range_dim")), "--input", f"x={tmp_path / 'inputs.npz'}", "--json",
                "-o", str(tmp_path / "o"))
    data = json.loads(out)
    assert data["function"] == "main" and data["outputs"][0]["shape"] == [1, 5, 4]
    np.testing.assert_allclose(np.load(data["outputs"][0]["path"]), reference("range_dim", x), atol=1e-5)
    out, _ = ok(capsys, str(fm.package("enumerated_shapes")), "--input", f"x={tmp_path / 'inputs.npz'}")
    assert rows(out)["y"][2] == "[1, 5, 4]"
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 8), np.float32))
    err = failure(capsys, 1, str(fm.package("enumerated_shapes")), "--input", f"x={tmp_path / 'x.npy'}")
    assert "'x' has shape [1, 4, 8], the model takes one of [1, 3, 8], [1, 5, 8], [2, 4, 8]" in err


def test_multifunction_optional_inputs_and_flat_json(capsys: pytest.CaptureFixture[str]) -> None:
    out, err = ok(capsys, str(fm.package("multifunction")), "--function", "double", "--input", "x=[1,2,3,4,5,6]")
    assert rows(out)["y"][1:4] == ["float32", "[2, 3]", "values [ 2.,  4.,  6.,  8., 10., 12.]"]
    assert "function double" in err
    out, _ = ok(capsys, str(fm.package("multifunction")), "--input", "x=[[0, 0, 0, 0]]")
    np.testing.assert_allclose(
        [float(v) for v in rows(out)["y"][3].removeprefix("values [").rstrip("]").split(",")],
        _shift(np.zeros((1, 4), np.float32))[0],
        atol=1e-4)
    out, _ = ok(capsys, str(fm.package("optional")), "--input", "x=[0,1,2,3,4,5]")  # scale, offset: defaults
    assert rows(out)["y"][3] == "values [3. , 3.5, 4. , 4.5, 5. , 5.5]"


def _shift(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return fm.reference("multifunction").shifter(torch.from_numpy(x)).numpy()


def test_state_files_carry_the_state_between_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(fm.package("kv_cache"))
    module = fm.reference("kv_cache")
    state = tmp_path / "cache.npz"
    for pos in range(3):
        x = np.random.default_rng(pos).standard_normal((1, 1, fm.KV_WIDTH)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        args = [model, "-i", f"x={tmp_path / 'x.npy'}", "-i", f"pos=[{pos}]", "--state-out", str(state),
                "-o", str(tmp_path / "out")]
        if pos:
            args += ["--state-in", str(state)]
        _, err = ok(capsys, *args)
        assert f"States written to {state}" in err
        with torch.no_grad():
            expected = module(torch.from_numpy(x), torch.tensor([pos], dtype=torch.int32)).numpy()
        np.testing.assert_allclose(np.load(tmp_path / "out" / "y.npy").astype(np.float32), expected,
                                   rtol=1e-2, atol=5e-3)
    with np.load(state) as saved:
        assert sorted(saved.files) == ["k_cache", "v_cache"]
        np.testing.assert_allclose(saved["k_cache"].astype(np.float32), module.k_cache.numpy(), rtol=1e-2, atol=5e-3)
    err = failure(capsys, 2, str(fm.package("optional")), "-i", "x=[1,2,3,4,5,6]", "--state-out", str(state))
    assert "declares no state" in err


@pytest.mark.parametrize("args,needles", [
    (["-i", "x=[1,2,3,4,5,6]", "-i", "y=[1]"], ["unknown input(s): y", "Hint: The model takes: x fp32[2, 3]"]),
    (["-i", "x=[1,2,3]"], ["'x' has shape [3], the model takes [2, 3]"]),
    (["-i", "x=[1,2,3,4,5,6]", "-i", "offset=[0.5,0.5,0.5,0.5,0.5,0.5]"],
     ["'offset' has a float type, the model takes int32"]),
    (["-i", "scale=[1,1,1,1,1,1]"], ["missing input(s): x"]),
    (["-i", "x=hello"], ["Input 'x': 'hello' is neither a file nor a JSON number or list"]),
    (["-i", "x=missing.npy"], ["Input 'x': no such file missing.npy"]),
])
def test_bad_inputs_name_the_input_and_the_declaration(args: list[str], needles: list[str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    err = failure(capsys, 1, str(fm.package("optional")), *args)
    for needle in needles:
        assert needle in err, err


def test_usage_errors_and_images_of_the_wrong_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = failure(capsys, 2, str(fm.package("optional")), "-i", "x")
    assert "is not NAME=VALUE" in err
    Image.new("L", (5, 8)).save(tmp_path / "small.png")
    err = failure(capsys, 1, str(fm.package("image_gray")), "-i", f"image={tmp_path / 'small.png'}")
    assert "image 'image' is 5x8; the model takes GRAYSCALE 8x8 images" in err
    err = failure(capsys, 1, str(fm.package("neural_network")), "-i", "x=[0]")
    assert "'neuralNetwork' model; the portable runtime runs ML Programs" in err and "Hint: Convert the model" in err


def test_bundles_in_folders_and_pulled_variants(tmp_path: Path, hub_server: Any, store_home: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from coreml_hub import pull
    from coreml_hub.mil import load_model
    from coreml_hub.testing.publish import publish

    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("optional", "range_dim"):
        shutil.copytree(fm.package(name), folder / f"{name}.mlpackage")
    err = failure(capsys, 2, str(folder), "-i", "x=[1,2,3,4,5,6]")
    assert "holds 2 bundles (optional, range_dim); name one with --component" in err
    out, _ = ok(capsys, str(folder), "--component", "optional", "-i", "x=[1,2,3,4,5,6]")
    assert "y" in rows(out)
    err = failure(capsys, 2, str(folder), "--component", "unet", "-i", "x=[1]")
    assert "has no component 'unet'; it has: optional, range_dim" in err

    publish(hub_server.root, "tiny/coreml-sd", style="sd1", layout="apple", attentions=("original",),
            formats=("compiled",))
    pulled = pull("tiny/coreml-sd:original/compiled")
    z = np.random.default_rng(4).standard_normal(load_model(pulled.path / "VAEDecoder.mlmodelc").input_description[0]
                                                 .shape).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    out, _ = ok(capsys, "tiny/coreml-sd:original/compiled", "--component", "vae_decoder", "-i", f"z={tmp_path / 'z.npy'}",
                "-o", str(tmp_path / "decoded"), "--device", "cpu")
    expected = load_model(pulled.path / "VAEDecoder.mlmodelc").predict({"z": z})["image"]
    np.testing.assert_allclose(np.load(tmp_path / "decoded" / "image.npy"), expected, rtol=1e-6, atol=1e-6)
    err = failure(capsys, 1, "tiny/other:original/compiled", "-i", "z=[0]")
    assert "pull" in err
