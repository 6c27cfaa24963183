"""The pipeline's parts that need no converted model: tokenizer, schedulers, PNG files, naming, lookup."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.errors import InvalidBundle, InvalidImage, UnsupportedSize, UsageError
from coreml_hub.pipeline import images as imaging
from coreml_hub.pipeline.components import TensorSpec, component_of, describe, find_components, unet_names
from coreml_hub.pipeline.png import ImageMetadata, parse_parameters, save_png, slug
from coreml_hub.pipeline.resolve import resolve_local, resolve_model
from coreml_hub.pipeline.schedulers import FLOW_DEFAULT_CONFIG, SCHEDULERS, make_scheduler, scheduler_config
from coreml_hub.pipeline.tokenizer import find_tokenizer_files, load_tokenizer
from coreml_hub.testing.tokenizer import (BOS, EOS, build_vocab, load_clip_tokenizer, write_tokenizer_config,
                                          write_tokenizer_files)

VOCAB = 1000


# ---- tokenizer ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(folder, VOCAB)
    return folder


def test_tokenizer_frames_prompt_with_bos_eos_and_pads_to_77(tok_dir: Path) -> None:
    vocab, _ = build_vocab(VOCAB)
    tok = load_tokenizer(tok_dir)
    ids = tok.encode("a photo of a cat")
    assert len(ids) == 77
    assert ids[0] == vocab[BOS]
    end = ids.index(vocab[EOS])
    assert vocab["a</w>"] == ids[1] and end > 5
    inverse = {v: k for k, v in vocab.items()}
    assert "".join(inverse[i] for i in ids[1:end]).replace("</w>", " ").strip() == "a photo of a cat"
    assert ids[end:] == [vocab[EOS]] * (77 - end)  # SD 1.x pads with <|endoftext|>


def test_tokenizer_matches_transformers_padding_and_truncation(tok_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tok_dir, tmp_path / "t")
    write_tokenizer_config(tmp_path / "t", pad_token="!")  # SD 2.x / SDXL second encoder
    ours = load_tokenizer(tmp_path / "t")
    ref = load_clip_tokenizer(tmp_path / "t", pad_token="!")
    long_prompt = "a highly detailed oil painting of a red fox in a snowy forest at sunset, " * 8
    for prompt in ("", "a photo of a cat", "Astronaut riding a HORSE, 8k!!", long_prompt, "naïve café ☕ 42"):
        expected = ref(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert ours.encode(prompt) == expected, prompt
    assert ours.pad_id == build_vocab(VOCAB)[0]["!"]
    assert ours.truncated(long_prompt) and not ours.truncated("a cat")
    assert ours.encode(long_prompt)[-1] == build_vocab(VOCAB)[0][EOS]


@pytest.mark.parametrize("pad", [EOS, "!"])
def test_tokenizer_matches_transformers_on_any_text(tok_dir: Path, tmp_path: Path, pad: str) -> None:
    """coreml-hub's own BPE against transformers' CLIPTokenizer: unicode classes, contractions,
    specials typed into the prompt, whitespace of every kind, the pad token inside the text."""
    import random

    shutil.copytree(tok_dir, tmp_path / "t")
    write_tokenizer_config(tmp_path / "t", pad_token=pad)
    ours, ref = load_tokenizer(tmp_path / "t"), load_clip_tokenizer(tmp_path / "t", pad_token=pad)
    rng = random.Random(7)
    alphabet = list("abcxyz ABC'!?.,-_019 \t\néüßİﬁ½²Ⅷ☕🚀日本\u200b\u0301<|>") + [EOS, BOS, "'re", "'ll"]
    prompts = ["it's they're we've I'm you'll he'd", "x'''re !'s", f"{EOS} a {BOS}b", "<|ENDOFTEXT|>",
               "tabs\tand\nnewlines   many   spaces", "e\u0301 combining, ÀÉÎÕÜ", "a--b__c..d", "wow!!! ok!"]
    prompts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(400)]
    for prompt in prompts:
        expected = ref(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert ours.encode(prompt) == expected, repr(prompt)


def test_tokenizer_reads_tokenizer_json_only_folder(tok_dir: Path, tmp_path: Path) -> None:
    # transformers 5 save_pretrained writes tokenizer.json only.
    load_clip_tokenizer(tok_dir).save_pretrained(tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer" / "vocab.json").exists()
    files = find_tokenizer_files(tmp_path)
    assert files.vocab is None and files.tokenizer_json is not None
    assert load_tokenizer(tmp_path).encode("a cat") == load_tokenizer(tok_dir).encode("a cat")


def test_tokenizer_found_in_tokenizer_subfolder_and_second_encoder_pad(tok_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tok_dir, tmp_path / "tokenizer")
    assert find_tokenizer_files(tmp_path).folder == tmp_path / "tokenizer"
    # Compiled SDXL variants ship one pair of files; the second encoder pads with "!".
    second = load_tokenizer(tmp_path / "tokenizer", 2, default_pad="!")
    assert second.encode("a cat")[-1] == build_vocab(VOCAB)[0]["!"]


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidBundle, match="No tokenizer files"):
        find_tokenizer_files(tmp_path)


# ---- schedulers --------------------------------------------------------------------------

def test_every_scheduler_builds_the_diffusers_class() -> None:
    expected = {"pndm": "PNDMScheduler", "dpmpp": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
                "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler", "lms": "LMSDiscreteScheduler",
                "flow_euler": "FlowMatchEulerDiscreteScheduler"}
    assert set(SCHEDULERS) == set(expected)
    for name, cls in expected.items():
        flow = name == "flow_euler"
        sched = make_scheduler(name, FLOW_DEFAULT_CONFIG if flow else None)
        assert cls in [c.__name__ for c in type(sched).__mro__], name
        sched.set_timesteps(10)
        assert len(sched.timesteps) >= 10
        if flow:  # SD3's shifted schedule: sigma' = 3 sigma / (1 + 2 sigma), from 1 down
            assert sched.config.shift == 3.0 and float(sched.timesteps[0]) == 1000.0
        else:
            assert sched.config.beta_schedule == "scaled_linear"
    with pytest.raises(UsageError, match="Unknown scheduler"):
        make_scheduler("heun")


def test_scheduler_config_from_pulled_file_wins_over_defaults(tmp_path: Path) -> None:
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "beta_end": 0.02}))
    config = scheduler_config(tmp_path)
    assert config["prediction_type"] == "v_prediction" and config["beta_end"] == 0.02
    assert "_class_name" not in config
    assert make_scheduler("euler", config).config.prediction_type == "v_prediction"
    assert scheduler_config(tmp_path / "nothing")["prediction_type"] == "epsilon"


def test_lms_coefficients_are_exact_integrals() -> None:
    sched = make_scheduler("lms")
    sched.set_timesteps(20)
    sigmas = sched.sigmas.double().numpy()
    for order, t, cur in ((1, 0, 0), (2, 5, 1), (4, 10, 2), (4, 18, 3)):
        def lagrange(tau: np.ndarray) -> np.ndarray:
            prod = np.ones_like(tau)
            for k in range(order):
                if k != cur:
                    prod *= (tau - sigmas[t - k]) / (sigmas[t - cur] - sigmas[t - k])
            return prod

        grid = np.linspace(sigmas[t], sigmas[t + 1], 200_001)
        numeric = np.trapezoid(lagrange(grid), grid)
        assert sched.get_lms_coefficient(order, t, cur) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


# ---- PNG metadata and files ----------------------------------------------------------------

def _meta(**changes: object) -> ImageMetadata:
    base = dict(prompt="a photo of an astronaut, riding a horse", negative_prompt="blurry: low quality", seed=42,
                steps=25, scheduler="dpmpp", guidance_scale=7.5, width=512, height=768, model="apple/sd",
                variant="original/compiled", revision="0123456789abcdef", backend="torch", strength=None)
    base.update(changes)
    return ImageMetadata(**base)  # type: ignore[arg-type]


def test_parameters_text_follows_the_image_tool_convention() -> None:
    text = _meta().parameters_text()
    lines = text.split("\n")
    assert lines[0] == "a photo of an astronaut, riding a horse"
    assert lines[1] == "Negative prompt: blurry: low quality"
    assert lines[2].startswith("Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x768, "
                               "Model: apple/sd, ")
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "a photo of an astronaut, riding a horse"
    assert parsed["negative_prompt"] == "blurry: low quality"
    assert parsed["Seed"] == "42" and parsed["Model hash"] == "0123456789"
    assert parsed["Backend"] == "torch" and parsed["Variant"] == "original/compiled"
    no_negative = _meta(negative_prompt="", strength=0.6).parameters_text()
    assert "Negative prompt" not in no_negative and "Denoising strength: 0.6" in no_negative


def test_png_carries_parameters_and_separate_keys(tmp_path: Path) -> None:
    from PIL import Image

    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path, "img", _meta(prompt="ünïcode prompt ☕"))
    with Image.open(path) as img:
        text = dict(img.text)  # type: ignore[attr-defined]
    assert text["prompt"] == "ünïcode prompt ☕"
    assert text["seed"] == "42" and text["scheduler"] == "dpmpp" and text["backend"] == "torch"
    assert text["revision"] == "0123456789abcdef" and text["variant"] == "original/compiled"
    assert parse_parameters(text["parameters"])["prompt"] == "ünïcode prompt ☕"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_png_names_never_collide_or_overwrite(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "img.png").write_bytes(b"precious")
    results: list[Path] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        p = save_png(Image.new("RGB", (4, 4), (i, 0, 0)), tmp_path, "img", _meta(seed=i))
        with lock:
            results.append(p)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / "img.png").read_bytes() == b"precious"
    assert len(set(results)) == 8
    assert sorted(p.name for p in results) == sorted(f"img-{n}.png" for n in range(1, 9))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_write_leaves_no_file(tmp_path: Path) -> None:
    from PIL import Image

    class Interrupting:
        """Writes half a PNG, then is interrupted as by Ctrl-C."""

        def save(self, fh, **_kw):  # type: ignore[no-untyped-def]
            Image.new("RGB", (64, 64)).save(fh, format="PNG")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_png(Interrupting(), tmp_path, "img", _meta())
    assert list(tmp_path.iterdir()) == []


def test_slug() -> None:
    assert slug("A photo of an Astronaut, riding a horse!") == "a-photo-of-an-astronaut-riding-a-horse"
    assert slug("☕☕") == "image"
    assert len(slug("word " * 50)) <= 40


# ---- init images ---------------------------------------------------------------------------

def test_init_image_errors(tmp_path: Path) -> None:
    from PIL import Image

    with pytest.raises(InvalidImage, match="does not exist"):
        imaging.open_init_image(tmp_path / "none.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(InvalidImage, match="Cannot read"):
        imaging.open_init_image(tmp_path / "bad.png")
    Image.new("RGB", (128, 128)).save(tmp_path / "big.png")
    img = imaging.open_init_image(tmp_path / "big.png")
    resized, changed = imaging.fit_init_image(img, 64, 64)
    assert changed and resized.size == (64, 64)
    with pytest.raises(UnsupportedSize, match="aspect ratio"):
        imaging.fit_init_image(Image.new("RGB", (128, 64)), 64, 64)


def test_fit_crop_pad_stretch(tmp_path: Path) -> None:
    from PIL import Image

    wide = Image.fromarray(np.arange(64 * 128 * 3, dtype=np.uint32).reshape(64, 128, 3).astype(np.uint8))
    tall = wide.transpose(Image.Transpose.TRANSPOSE)  # 64x128
    for image, middle, pad_box in ((wide, (32, 0, 96, 64), (0, 32, 128, 96)), (tall, (0, 32, 64, 96), (32, 0, 96, 128))):
        cropped, changed = imaging.fit_init_image(image, 32, 32, "crop")
        assert changed and np.array_equal(np.asarray(cropped), np.asarray(image.crop(middle).resize((32, 32),
                                                                                                 Image.LANCZOS)))
        padded, _ = imaging.fit_init_image(image, 32, 32, "pad")
        canvas = Image.new("RGB", (128, 128))
        canvas.paste(image, pad_box[:2])
        assert np.array_equal(np.asarray(padded), np.asarray(canvas.resize((32, 32), Image.LANCZOS)))
        stretched, _ = imaging.fit_init_image(image, 32, 32, "stretch")
        assert np.array_equal(np.asarray(stretched), np.asarray(image.resize((32, 32), Image.LANCZOS)))
    # a model that is not square: crop keeps its shape (2:1 from a square image)
    cropped, _ = imaging.fit_init_image(Image.new("RGB", (100, 100)), 64, 32, "crop")
    assert cropped.size == (64, 32)
    # the same aspect ratio needs no fit, and without one another ratio is refused
    assert imaging.check_aspect((128, 128), 64, 64, None) is False
    with pytest.raises(UnsupportedSize, match="aspect ratio") as refused:
        imaging.check_aspect((128, 64), 64, 64, None)
    assert "--fit crop" in (refused.value.hint or "")


def test_image_tensor_round_trip() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
    tensor = imaging.image_to_tensor(Image.fromarray(pixels))
    assert tuple(tensor.shape) == (1, 3, 16, 8) and float(tensor.min()) >= -1 and float(tensor.max()) <= 1
    back = np.asarray(imaging.unit_to_pil(imaging.tensor_to_unit(tensor)))
    assert np.array_equal(back, pixels)


# ---- bundles in a folder, descriptions, MODEL lookup ------------------------------------------

def test_component_names_from_bundle_names() -> None:
    assert component_of(Path("TextEncoder2.mlmodelc")) == "text_encoder_2"
    assert component_of(Path("UnetChunk1.mlmodelc")) == "unet_chunk1"
    pre = "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5"
    assert component_of(Path(f"{pre}_text_encoder.mlpackage")) == "text_encoder"
    assert component_of(Path(f"{pre}_text_encoder_2.mlpackage")) == "text_encoder_2"
    assert component_of(Path(f"{pre}_unet_chunk2.mlpackage")) == "unet_chunk2"
    assert component_of(Path(f"{pre}_unet.mlpackage")) == "unet"
    assert component_of(Path("README.md")) is None
    assert unet_names(["unet", "unet_chunk1", "unet_chunk2"]) == ("unet",)
    assert unet_names(["unet_chunk1", "unet_chunk2"]) == ("unet_chunk1", "unet_chunk2")
    assert unet_names(["unet_chunk1"]) == ()


def test_describe_normalizes_description_forms() -> None:
    class Desc:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: object) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    expected = {"sample": TensorSpec("sample", (2, 4, 8, 8), "float16")}
    assert describe([Desc("sample", (2, 4, 8, 8), np.float16)]) == expected
    assert describe([Desc("sample", (2, 4, 8, 8), "fp16")]) == expected
    assert describe({"sample": ((2, 4, 8, 8), "float16")}) == expected
    assert describe([{"name": "sample", "shape": "[2, 4, 8, 8]", "dataType": "Float16"}]) == expected
    import torch

    assert describe([("sample", [2, 4, 8, 8], torch.float16)]) == expected


def _fake_variant(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).mkdir()
    return folder


def test_resolve_local_folders(tmp_path: Path) -> None:
    out = tmp_path / "converted"
    v = _fake_variant(out / "original" / "packages", ["x_text_encoder.mlpackage", "x_unet.mlpackage",
                                                      "x_vae_decoder.mlpackage"])
    assert set(find_components(v)) == {"text_encoder", "unet", "vae_decoder"}
    assert resolve_local(out).path == v.resolve()  # the -o folder of convert, one variant inside
    assert resolve_local(out).variant == "original/packages"
    assert resolve_local(v).path == v.resolve()
    _fake_variant(out / "split_einsum" / "packages", ["x_text_encoder.mlpackage", "x_unet.mlpackage"])
    with pytest.raises(UsageError, match="several variants"):
        resolve_local(out)
    with pytest.raises(UsageError, match="single bundle"):
        resolve_local(v / "x_unet.mlpackage")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidBundle, match="No Core ML"):
        resolve_local(tmp_path / "empty")
    with pytest.raises(InvalidBundle, match="No such folder"):
        resolve_model(str(tmp_path / "missing" / "variant"))


def test_unknown_repo_without_pull_is_model_not_pulled(store_home: Path) -> None:
    from coreml_hub.errors import ModelNotPulled

    with pytest.raises(ModelNotPulled, match="not pulled"):
        resolve_model("someone/not-a-model", pull=False)
    assert os.environ["COREML_HUB_HOME"] == str(store_home)


def test_parameters_round_trip_for_any_prompt() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.just("\n"), max_size=60)

    @settings(max_examples=200, deadline=None)
    @given(prompt=text, negative=text, model=text.filter(lambda s: s.strip() == s and s != ""))
    def check(prompt: str, negative: str, model: str) -> None:
        if prompt.startswith("Negative prompt: ") or "\nNegative prompt: " in prompt:
            return  # the format cannot tell such a prompt from its negative prompt
        meta = _meta(prompt=prompt, negative_prompt=negative, model=model)
        parsed = parse_parameters(meta.parameters_text())
        assert parsed["prompt"] == prompt
        assert parsed["negative_prompt"] == negative
        assert parsed["Model"] == model and parsed["Seed"] == "42"

    check()
