"""`run` with ControlNets and masks from the command line: bad input is refused with one clear error
before any model loads, inpainting writes what it did into the PNG, and a controlled Unet without
ControlNets is the plain Unet."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.cli import run_cli
from coreml_hub.testing import factory
from coreml_hub.testing.tiny import INPAINT_STYLE

pytestmark = [pytest.mark.slow, pytest.mark.runtime]


@pytest.fixture(scope="module")
def controlled() -> Path:
    return factory.converted("sd1", "original", "fp32", controlnets=("sd1", "sd1-b", "sd1-inpaint"))


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The components each run loads, in order: a refused run must load none."""
    import coreml_hub.pipeline.generate as generate

    seen: list[str] = []
    real = generate.load_components

    def spy(found, names, *args, **kwargs):  # type: ignore[no-untyped-def]
        names = list(names)
        seen.extend(names)
        return real(found, names, *args, **kwargs)

    monkeypatch.setattr(generate, "load_components", spy)
    return seen


def _png(path: Path, size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Path:
    from PIL import Image

    channels = {"RGB": 3, "RGBA": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array, mode).save(path)
    return path


def _run(capsys, model: Path, tmp_path: Path, *extra: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    code = run_cli(["run", str(model), "a lighthouse", "--steps", "2", "--seed", "4", "--backend", "torch",
                    "--device", "cpu", "--disable-safety", "-o", str(tmp_path / "out"), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_input_is_refused_before_anything_loads(controlled: Path, tmp_path: Path, capsys, loads) -> None:  # type: ignore[no-untyped-def]
    image = _png(tmp_path / "a.png", (64, 64))
    wide = _png(tmp_path / "wide.png", (96, 64))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")

    code, _, err = _run(capsys, controlled, tmp_path, "--controlnet", "TinyControlnetSd1", "--control-image",
                        str(image), "--control-image", str(image))
    assert code == 2 and "2 control images but 1 ControlNet" in err

    code, _, err = _run(capsys, controlled, tmp_path, "--controlnet", "TinyControlnetSd1", "--control-image",
                        str(broken))
    assert code == 1 and f"Cannot read {broken} as an image" in err and "--control-image" in err

    code, _, err = _run(capsys, controlled, tmp_path, "--image", str(image), "--mask", str(wide))
    assert code == 1 and "aspect ratio" in err

    code, _, err = _run(capsys, controlled, tmp_path, "--mask", str(image))
    assert code == 2 and "--mask needs --image" in err

    code, _, err = _run(capsys, controlled, tmp_path, "--image", str(image), "--mask", str(image), "--refiner",
                        str(controlled))
    assert code == 2 and "refiner does not run with ControlNets or a mask" in err

    code, _, err = _run(capsys, controlled, tmp_path, "--controlnet", "NoSuchNet", "--control-image", str(image))
    assert code == 1 and "tiny-controlnet-sd1-b" in err  # names the ControlNets it has

    variant = tmp_path / "other-base"  # a ControlNet made for SD 2.x dropped beside the SD 1.x pipeline
    shutil.copytree(controlled / "original" / "packages", variant, copy_function=os.link)
    shutil.copytree(factory.controlnet_package("sd2", "original", "fp32"),
                    variant / "ControlNet_tiny-controlnet-sd2.mlpackage", copy_function=os.link)
    code, _, err = _run(capsys, variant, tmp_path, "--controlnet", "tiny-controlnet-sd2", "--control-image", str(image))
    assert code == 1 and "another base model" in err and "64-wide" in err

    plain = factory.converted("sd1", "original", "fp32")
    code, _, err = _run(capsys, plain, tmp_path, "--controlnet", str(variant / "ControlNet_tiny-controlnet-sd2.mlpackage"),
                        "--control-image", str(image))
    assert code == 1 and "no Unet that takes ControlNet residuals" in err
    assert loads == []


def test_two_controlnets_and_an_inpaint_controlnet_from_the_cli(controlled: Path, tmp_path: Path, capsys, loads) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from coreml_hub.pipeline.controlnet import sha256_file

    edges, depth = _png(tmp_path / "edges.png", (128, 128), 1), _png(tmp_path / "depth.png", (64, 64), 2)
    code, out, err = _run(capsys, controlled, tmp_path, "--controlnet", "TinyControlnetSd1", "--control-image",
                          str(edges), "--controlnet", "tiny-controlnet-sd1-b", "--control-image", str(depth),
                          "--control-scale", "0.5", "--control-scale", "1.5", "--json")
    assert code == 0, err
    units = json.loads(out)["images"][0]["parameters"]["controlnets"]
    assert [(u["controlnet"], u["scale"], u["image_sha256"]) for u in units] == [
        ("tiny-controlnet-sd1", 0.5, sha256_file(edges)), ("tiny-controlnet-sd1-b", 1.5, sha256_file(depth))]
    assert "ControlledUnet" in " ".join(loads) or "controlled_unet" in loads

    # the inpaint ControlNet without a control image: the init image with the masked pixels punched out
    init = _png(tmp_path / "init.png", (64, 64), 3)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, out, err = _run(capsys, controlled, tmp_path, "--image", str(init), "--mask", str(tmp_path / "mask.png"),
                          "--controlnet", "TinyControlnetSd1Inpaint", "--json")
    assert code == 0, err
    params = json.loads(out)["images"][0]["parameters"]
    assert params["strength"] == 1.0 and params["mask_image"] == str(tmp_path / "mask.png")
    assert params["controlnets"][0]["image"].startswith("init image")
    result = np.asarray(Image.open(json.loads(out)["images"][0]["path"]).convert("RGB"), dtype=np.float32)
    kept = np.asarray(Image.open(init).convert("RGB"), dtype=np.float32)
    # outside the mask the init image comes back (through the VAE), inside it is repainted
    outside = np.abs(result - kept)[np.asarray(mask) == 0].mean()
    inside = np.abs(result - kept)[np.asarray(mask) == 255].mean()
    assert outside < inside


def test_inpainting_model_from_the_cli_with_a_transparent_mask(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    out_dir = factory.converted(INPAINT_STYLE, "original", "fp32")
    init = _png(tmp_path / "init.png", (128, 128), 5)  # twice the model's size: resized with the mask
    rgba = np.full((128, 128, 4), 255, dtype=np.uint8)
    rgba[32:96, 32:96, 3] = 0  # transparent = repaint (Mochi's and Apple's convention)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "hole.png")
    code, out, err = _run(capsys, out_dir, tmp_path, "--image", str(init), "--mask", str(tmp_path / "hole.png"),
                          "--strength", "0.9", "--json")
    assert code == 0, err
    params = json.loads(out)["images"][0]["parameters"]
    assert params["strength"] == 0.9 and "Inpaint: mask" in Image.open(json.loads(out)["images"][0]["path"]).text[
        "parameters"]
    code, _, err = _run(capsys, out_dir, tmp_path)
    assert code == 2 and "inpainting Unet" in err and "--mask" in err


    # --fit crops the mask as it crops the init image: the same image as both cut to the middle beforehand
    wide = _png(tmp_path / "wide.png", (128, 64), 6)
    wide_mask = np.zeros((64, 128), dtype=np.uint8)
    wide_mask[16:48, 40:72] = 255
    Image.fromarray(wide_mask).save(tmp_path / "wide-mask.png")
    Image.open(wide).crop((32, 0, 96, 64)).save(tmp_path / "cut.png")
    Image.fromarray(wide_mask[:, 32:96]).save(tmp_path / "cut-mask.png")
    made = []
    for args in (("--image", str(wide), "--mask", str(tmp_path / "wide-mask.png"), "--fit", "crop"),
                 ("--image", str(tmp_path / "cut.png"), "--mask", str(tmp_path / "cut-mask.png"))):
        code, out, err = _run(capsys, out_dir, tmp_path, *args, "--json")
        assert code == 0, err
        made.append(np.asarray(Image.open(json.loads(out)["images"][0]["path"]).convert("RGB")))
    assert np.array_equal(made[0], made[1])


def test_a_controlled_unet_without_controlnets_is_the_plain_unet(controlled: Path) -> None:
    import torch

    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local

    ours = load_pipeline(resolve_local(controlled), backend="torch", device="cpu", safety=False).pipeline
    plain = load_pipeline(resolve_local(factory.converted("sd1", "original", "fp32")), backend="torch",
                          device="cpu", safety=False).pipeline
    assert ours.geometry.residuals == 5 and plain.geometry.residuals == 0
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    a = ours.generate(prompt="a cat", steps=3, seed=1, latents=latents.clone()).image
    b = plain.generate(prompt="a cat", steps=3, seed=1, latents=latents.clone()).image
    assert float(np.abs(a - b).max()) < 1e-4
