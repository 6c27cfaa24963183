"""Model-level features on models converted here with coremltools, in both file forms.

Each model comes from `coreml_hub.testing.feature_models` (a small torch module or MIL builder
program, converted once and cached); every result is compared with the torch module it was
converted from or a numpy reference. The compiled `.mlmodelc` form is the test fixture built
from the same package (model.mil, weights, and metadata.json with the fields Apple's compiler
writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coreml_hub.errors import InvalidBundle, ModelInputError, UnsupportedModel
from coreml_hub.mil import load_model
from coreml_hub.testing import feature_models as fm
from _mil_fixtures import SAMPLES, SAMPLES_MISSING

pytest.importorskip("coremltools", reason="coremltools converts the test models")
torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slow
FORMATS = ("package", "compiled")


def model_of(name: str, form: str, **kwargs: Any) -> Any:
    return load_model(getattr(fm, form)(name), **kwargs)


def run_reference(module: Any, *args: Any) -> Any:
    with torch.no_grad():
        out = module(*(torch.as_tensor(a) for a in args))
    return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()


# -- image inputs ---------------------------------------------------------------------------


def _image_and_tensor(layout: str, scale: float, bias: list[float], rng: np.random.Generator,
                      size: tuple[int, int] = fm.IMAGE_SIZE) -> tuple[Any, np.ndarray]:
    """A random PIL image of `layout` and the tensor Core ML's preprocessing makes of it."""
    h, w = size
    if layout in ("RGB", "BGR"):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        chw = pixels.transpose(2, 0, 1).astype(np.float32)
        if layout == "BGR":
            chw = chw[::-1]
    elif layout == "GRAYSCALE":
        pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
        image = Image.fromarray(pixels, "L")
        chw = pixels[None].astype(np.float32)
    else:
        pixels = rng.random((h, w), dtype=np.float32) * 4 - 2
        image = Image.fromarray(pixels, "F")
        chw = pixels.astype(np.float16).astype(np.float32)[None]  # the input is fp16
    tensor = chw * np.float32(scale) + np.asarray(bias, np.float32)[:, None, None]
    return image, tensor[None].astype(np.float32)


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("name", list(fm.IMAGE_LAYOUTS))
def test_image_inputs_apply_the_color_layout_scale_and_bias(name: str, form: str) -> None:
    layout, scale, bias = fm.IMAGE_LAYOUTS[name]
    model = model_of(name, form)
    (feature,) = model.input_description
    assert feature.kind == "image" and feature.image.color_layout == layout
    assert (feature.image.width, feature.image.height) == fm.IMAGE_SIZE[::-1]
    rng = np.random.default_rng(7)
    for _ in range(2):
        image, tensor = _image_and_tensor(layout, scale, bias, rng)
        got = model.predict({"image": image})["features"]
        np.testing.assert_allclose(got, run_reference(fm.reference(name), tensor), rtol=1e-5, atol=1e-4)


def test_image_inputs_convert_other_pil_modes_and_take_arrays() -> None:
    model = model_of("image_rgb", "package")
    layout, scale, bias = fm.IMAGE_LAYOUTS["image_rgb"]
    image, tensor = _image_and_tensor(layout, scale, bias, np.random.default_rng(1))
    expected = model.predict({"image": image})["features"]
    np.testing.assert_allclose(model.predict({"image": image.convert("RGBA")})["features"], expected, rtol=1e-6)
    raw = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None]  # the unprocessed [1, C, H, W] pixels
    np.testing.assert_allclose(model.predict({"image": raw})["features"], expected, rtol=1e-6)


@pytest.mark.parametrize("form", FORMATS)
def test_image_of_the_wrong_size_names_the_input_and_the_declared_size(form: str) -> None:
    model = model_of("image_bgr", form)
    with pytest.raises(ModelInputError, match=r"image 'image' is 9x8; the model takes BGR 8x8 images"):
        model.predict({"image": Image.new("RGB", (9, 8))})


@pytest.mark.parametrize("form", FORMATS)
def test_flexible_image_sizes(form: str) -> None:
    rng = np.random.default_rng(3)
    ranged = model_of("image_flexible", form)
    fmt = ranged.input_description[0].image
    assert (fmt.width_range, fmt.height_range) == ((4, 32), (4, 16))
    reference = fm.reference("image_flexible")
    for size in ((8, 8), (16, 5), (4, 32)):
        image, tensor = _image_and_tensor("RGB", 1 / 255, [0.0, -0.5, 0.5], rng, size)
        got = ranged.predict({"image": image})["features"]
        np.testing.assert_allclose(got, run_reference(reference, tensor), rtol=1e-5, atol=1e-4)
    with pytest.raises(ModelInputError, match=r"is 33x8; the model takes RGB 4\.\.32 x 4\.\.16 images"):
        ranged.predict({"image": Image.new("RGB", (33, 8))})

    enumerated = model_of("image_enumerated", form)
    assert enumerated.input_description[0].image.sizes == ((8, 8), (12, 16))
    for size in fm.FLEX_SIZES:
        image, tensor = _image_and_tensor("RGB", 1 / 255, [0.0, -0.5, 0.5], rng, size)
        got = enumerated.predict({"image": image})["features"]
        np.testing.assert_allclose(got, run_reference(fm.reference("image_enumerated"), tensor), rtol=1e-5, atol=1e-4)
    with pytest.raises(ModelInputError, match="one of 8x8, 12x16"):
        enumerated.predict({"image": Image.new("RGB", (16, 12))})


# -- image outputs --------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMATS)
def test_image_outputs_are_pil_images_of_each_layout(form: str) -> None:
    model = model_of("image_outputs", form)
    assert [(d.name, d.image.color_layout) for d in model.output_description] == [
        ("rgb", "RGB"), ("bgr", "BGR"), ("gray", "GRAYSCALE"), ("gray16", "GRAYSCALE_FLOAT16")]
    x = np.random.default_rng(5).standard_normal((1, 3, *fm.IMAGE_SIZE)).astype(np.float32) * 6
    out = model.predict({"x": x})
    color, flipped, gray, gray16 = run_reference(fm.reference("image_outputs"), x)
    assert (out["rgb"].mode, out["bgr"].mode, out["gray"].mode, out["gray16"].mode) == ("RGB", "RGB", "L", "F")
    assert out["rgb"].size == fm.IMAGE_SIZE[::-1]
    expected = np.clip(np.rint(color[0]), 0, 255).transpose(1, 2, 0)  # values beyond 0..255 are clipped
    assert (color < 0).any() and (color > 255).any(), "the reference must exercise clipping"
    np.testing.assert_allclose(np.asarray(out["rgb"], np.float32), expected, atol=1)
    # the BGR output holds the channels reversed; as an RGB image it is the same picture
    np.testing.assert_array_equal(np.asarray(out["bgr"]), np.asarray(out["rgb"]))
    np.testing.assert_allclose(np.asarray(out["gray"], np.float32), np.rint(gray[0, 0]), atol=1)
    np.testing.assert_allclose(np.asarray(out["gray16"]), gray16[0, 0], rtol=1e-3, atol=1e-3)


# -- classifiers ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("name,labels", [("classifier", fm.CLASS_LABELS), ("classifier_int", fm.INT_LABELS)])
def test_classifier_label_and_probabilities(name: str, labels: tuple[Any, ...], form: str) -> None:
    model = model_of(name, form)
    assert model.class_labels == labels
    label_name, probs_name = "classLabel", "classLabel_probs"
    assert [d.name for d in model.output_description] == [label_name, probs_name]
    reference = fm.reference(name)
    for seed in range(3):
        features = np.random.default_rng(seed).standard_normal((1, 10)).astype(np.float32) * 3
        out = model.predict({"features": features})
        expected = run_reference(reference, features)[0]
        assert set(out) == {label_name, probs_name}
        assert out[label_name] == labels[int(np.argmax(expected))]
        assert type(out[label_name]) is type(labels[0])
        assert list(out[probs_name]) == list(labels)
        np.testing.assert_allclose([out[probs_name][k] for k in labels], expected, rtol=1e-5, atol=1e-6)


def test_metadata_and_descriptions() -> None:
    model = model_of("classifier", "package")
    meta = fm.METADATA
    assert (model.author, model.license, model.version, model.short_description) == (
        meta["author"], meta["license"], meta["version"], meta["short_description"])
    for key, value in meta["user_defined"].items():
        assert model.user_defined_metadata[key] == value
    assert "com.github.apple.coremltools.version" in model.user_defined_metadata
    assert model.input_description[0].description == "Ten numbers describing an animal."
    assert model.output_description[0].description == "The most likely animal."
    compiled = model_of("classifier", "compiled")  # metadata.json carries the same
    assert compiled.metadata == model.metadata
    assert compiled.input_description[0].description == "Ten numbers describing an animal."


# -- flexible shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMATS)
def test_range_dim_inputs(form: str) -> None:
    model = model_of("range_dim", form)
    (x,) = model.input_description
    assert x.shape is None and x.ranges == ((1, 1), (1, 16), (8, 8)) and x.default_shape == (1, 3, 8)
    reference = fm.reference("range_dim")
    rng = np.random.default_rng(0)
    for n in (1, 3, 16):
        value = rng.standard_normal((1, n, 8)).astype(np.float32)
        np.testing.assert_allclose(model.predict({"x": value})["y"], run_reference(reference, value), atol=1e-5)
    for bad in ((1, 17, 8), (2, 3, 8), (1, 3)):
        with pytest.raises(ModelInputError, match=rf"'x' has shape \[{', '.join(map(str, bad))}\], "
                                                   r"the model takes \[1, 1\.\.16, 8\]"):
            model.predict({"x": np.zeros(bad, np.float32)})


@pytest.mark.parametrize("form", FORMATS)
def test_enumerated_shapes_inputs(form: str) -> None:
    model = model_of("enumerated_shapes", form)
    (x,) = model.input_description
    assert x.shapes == ((1, 3, 8), (1, 5, 8), (2, 4, 8))
    reference = fm.reference("enumerated_shapes")
    for shape in x.shapes:
        value = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(model.predict({"x": value})["y"], run_reference(reference, value), atol=1e-5)
    with pytest.raises(ModelInputError, match=r"the model takes one of \[1, 3, 8\], \[1, 5, 8\], \[2, 4, 8\]"):
        model.predict({"x": np.zeros((1, 4, 8), np.float32)})


# -- multifunction --------------------------------------------------------------------------


def test_multifunction_default_and_named_functions() -> None:
    path = fm.package("multifunction")
    reference = fm.reference("multifunction")
    default = load_model(path)
    assert default.function_name == "shift" and set(default.functions) == {"double", "shift"}
    x = np.random.default_rng(2).standard_normal((1, 4)).astype(np.float32)
    np.testing.assert_allclose(default.predict({"x": x})["y"], run_reference(reference.shifter, x), atol=1e-5)
    double = load_model(path, function_name="double")
    assert double.input_description[0].shape == (2, 3)
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(double.predict({"x": y})["y"], y * 2)
    with pytest.raises(InvalidBundle, match="has no function 'nope'; it has: .*double.*shift"):
        load_model(path, function_name="nope")


def test_compiled_multifunction_needs_a_function_name_without_a_declared_default() -> None:
    path = fm.compiled("multifunction")
    with pytest.raises(InvalidBundle, match="several functions"):
        load_model(path)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(load_model(path, function_name="shift").predict({"x": x})["y"],
                               run_reference(fm.reference("multifunction").shifter, x), atol=1e-5)


# -- state ----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMATS)
def test_stateful_accumulator(form: str) -> None:
    model = model_of("accumulator", form)
    assert model.is_stateful and [(s.name, s.shape, s.dtype) for s in model.state_description] == [
        ("total", (1, 4), "fp16")]
    state = model.make_state()
    np.testing.assert_array_equal(state.read_state("total"), np.zeros((1, 4), np.float16))
    xs = np.random.default_rng(4).random((4, 1, 4)).astype(np.float16)
    for i, x in enumerate(xs):
        out = model.predict({"x": x}, state=state)["total_out"]
        np.testing.assert_allclose(out, xs[: i + 1].astype(np.float32).sum(0), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(state.read_state("total"), out)
    out[...] = 99  # the returned array is the caller's; the state keeps its own copy
    assert state.read_state("total").max() < 99
    state.write_state("total", np.full((1, 4), 10, np.float16))
    np.testing.assert_allclose(model.predict({"x": xs[0]}, state=state)["total_out"], 10 + xs[0], rtol=1e-3)
    fresh = model.make_state()  # states are independent
    np.testing.assert_allclose(model.predict({"x": xs[0]}, state=fresh)["total_out"], xs[0], rtol=1e-3)
    np.testing.assert_allclose(model.predict({"x": xs[1]})["total_out"], xs[1], rtol=1e-3)  # no state: zeros
    with pytest.raises(ModelInputError, match="no state 'nope'; its states are: total"):
        state.read_state("nope")
    with pytest.raises(ModelInputError, match=r"'total' has shape \[2, 4\]"):
        state.write_state("total", np.zeros((2, 4)))
    with pytest.raises(ModelInputError, match="another model"):
        model_of("accumulator", form).predict({"x": xs[0]}, state=state)


@pytest.mark.parametrize("form", FORMATS)
def test_stateful_kv_cache_attention_matches_torch(form: str) -> None:
    model = model_of("kv_cache", form)
    assert [s.name for s in model.state_description] == ["k_cache", "v_cache"]
    reference = fm.reference("kv_cache")  # the module updates its own cache buffers as it runs
    state = model.make_state()
    rng = np.random.default_rng(6)
    for pos in range(fm.KV_LENGTH):
        x = rng.standard_normal((1, 1, fm.KV_WIDTH)).astype(np.float32)
        expected = run_reference(reference, x, np.array([pos], np.int32))
        got = model.predict({"x": x, "pos": np.array([pos], np.int32)}, state=state)["y"]
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=1e-2, atol=5e-3)
    np.testing.assert_allclose(state.read_state("k_cache").astype(np.float32), reference.k_cache.numpy(),
                               rtol=1e-2, atol=5e-3)


def test_stateless_model_refuses_state() -> None:
    model = model_of("range_dim", "package")
    assert not model.is_stateful
    with pytest.raises(ModelInputError, match="declares no state"):
        model.make_state()


# -- optional inputs ------------------------------------------------------------------------


def test_optional_inputs_take_their_defaults() -> None:
    model = model_of("optional", "package")
    scale, offset = model.input_description[1:]
    assert (scale.optional, scale.default, offset.optional, offset.default) == (True, 0.5, True, 3)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(model.predict({"x": x})["y"], x * 0.5 + 3)
    np.testing.assert_allclose(model.predict({"x": x, "scale": np.full((2, 3), 2, np.float32)})["y"], x * 2 + 3)
    np.testing.assert_allclose(model.predict({"x": x, "offset": np.full((2, 3), -1, np.int32)})["y"], x * 0.5 - 1)
    with pytest.raises(ModelInputError, match="missing input.*x"):
        model.predict({"scale": x})


def test_compiled_optional_input_without_a_readable_default_must_be_given() -> None:
    model = model_of("optional", "compiled")
    assert model.input_description[1].optional
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ModelInputError, match="optional, but the bundle does not say its default"):
        model.predict({"x": x})
    full = {"x": x, "scale": np.full((2, 3), 2, np.float32), "offset": np.zeros((2, 3), np.int32)}
    np.testing.assert_allclose(model.predict(full)["y"], x * 2)


# -- input checks ---------------------------------------------------------------------------


def test_input_problems_are_named_together() -> None:
    model = model_of("kv_cache", "package")
    with pytest.raises(ModelInputError) as info:
        model.predict({"x": np.zeros((1, 2, 8), np.float32), "pos": np.zeros(1, np.float32), "extra": 1})
    message = str(info.value)
    assert "unknown input(s): extra" in message
    assert "'x' has shape [1, 2, 8], the model takes [1, 1, 8]" in message
    assert "'pos' has a float type, the model takes int32" in message
    assert "x fp16[1, 1, 8]; pos int32[1]" in info.value.hint


# -- models the runtime does not run --------------------------------------------------------


def test_neural_network_models_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedModel, match="neural_network.mlmodel is a 'neuralNetwork' model; the portable "
                                               "runtime runs ML Programs"):
        load_model(fm.package("neural_network"))
    with pytest.raises(UnsupportedModel, match=r"a 'pipeline' of 2 model\(s\) \(neuralNetwork, neuralNetwork\)"):
        load_model(fm.package("nn_pipeline"))


def test_compiled_neural_network_bundle_is_refused_by_name(tmp_path: Path) -> None:
    bundle = tmp_path / "Old.mlmodelc"
    bundle.mkdir()
    meta = [{"modelType": {"name": "MLModelType_neuralNetworkClassifier"}, "inputSchema": [], "outputSchema": []}]
    (bundle / "metadata.json").write_text(json.dumps(meta))
    (bundle / "model.espresso.net").write_text("{}")
    with pytest.raises(UnsupportedModel, match="Old.mlmodelc is a 'neuralNetworkClassifier' model") as info:
        load_model(bundle)
    assert "mlprogram" in info.value.hint


# -- Apple-compiled bundles against their packages -------------------------------------------


def _speech(seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    """A voiced-speech-like signal: harmonics of a gliding pitch, syllable envelope, a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = np.random.default_rng(0).standard_normal(t.size) * 0.01
    return (0.3 * voice * envelope + noise).astype(np.float32)


@pytest.mark.parametrize("name", ["unified_int8", "unified_palette_4bit"])
def test_silero_vad_bundles_match_their_packages(name: str) -> None:
    compiled_path = SAMPLES / "bundles" / f"{name}.mlmodelc"
    package_path = SAMPLES / "bundles" / f"{name}.mlpackage"
    if not compiled_path.is_dir() or not package_path.is_dir():
        pytest.skip(SAMPLES_MISSING)
    compiled, package = load_model(compiled_path), load_model(package_path)
    assert [d.name for d in compiled.input_description] == ["audio_input", "hidden_state", "cell_state"]
    assert compiled.author == package.author and "Silero" in compiled.author
    audio = np.concatenate([_speech(), np.zeros(4000, np.float32)])
    chunk = 576
    state = {"hidden_state": np.zeros((1, 128), np.float32), "cell_state": np.zeros((1, 128), np.float32)}
    states = {"compiled": dict(state), "package": dict(state)}
    probabilities: dict[str, list[float]] = {"compiled": [], "package": []}
    for start in range(0, audio.size - chunk + 1, chunk):
        for key, model in (("compiled", compiled), ("package", package)):
            out = model.predict({"audio_input": audio[None, start:start + chunk], **states[key]})
            probabilities[key].append(float(out["vad_output"].reshape(-1)[0]))
            states[key] = {"hidden_state": out["new_hidden_state"], "cell_state": out["new_cell_state"]}
    a, b = np.array(probabilities["compiled"]), np.array(probabilities["package"])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a.max() - a.min() > 0.05, "the chunks should not all get the same probability"


def test_declared_shapes_and_sizes_in_words() -> None:
    from coreml_hub.mil.spec import FeatureDescription, ImageFormat

    unbounded = FeatureDescription("x", None, "fp32", ranges=((1, 1), (2, -1)))
    assert unbounded.accepts_shape((1, 2)) and unbounded.accepts_shape((1, 5000)) and not unbounded.accepts_shape((1, 1))
    assert unbounded.declared() == "fp32[1, 2..]"
    assert FeatureDescription("x", (2, 3), "int32").declared() == "int32[2, 3]"
    image = ImageFormat("RGB", 64, 64, width_range=(64, -1), height_range=(32, 128))
    assert image.accepts(1000, 32) and not image.accepts(63, 64) and not image.accepts(64, 129)
    assert image.describe() == "RGB 64.. x 32..128" and image.pil_mode == "RGB"
    assert ImageFormat("GRAYSCALE_FLOAT16", 4, 4).pil_mode == "F"
