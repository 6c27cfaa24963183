"""`convert --controlnet` and the ControlNet contract: Apple's names, inputs and shapes; every converted
component equal to its PyTorch module through the portable runtime; `verify` on ControlNet variants;
ControlNets made for another base refused before anything converts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.bundle import verify
from coreml_hub.cli import run_cli
from coreml_hub.testing import factory
from coreml_hub.testing.tiny import INPAINT_STYLE

pytestmark = [pytest.mark.slow]

RELATIVE = 1e-4  # of the reference output's largest magnitude


def _packages(out: Path) -> Path:
    return next(out.glob("*/packages"))


def _close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert scale > 0 and err <= RELATIVE * scale, f"{what}: max error {err:.3g} against output scale {scale:.3g}"


def _inputs(model, rng: np.random.Generator) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    feed = {d.name: rng.standard_normal(d.shape).astype(np.float32) for d in model.input_description}
    feed["timestep"] = np.full(feed["timestep"].shape, 601.0, dtype=np.float32)
    if "controlnet_cond" in feed:
        feed["controlnet_cond"] = rng.uniform(0, 1, feed["controlnet_cond"].shape).astype(np.float32)
    if "time_ids" in feed:
        feed["time_ids"] = np.tile(np.array([64, 64, 0, 0, 64, 64], np.float32), (feed["time_ids"].shape[0], 1))
    return feed


def _context(feed: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    import torch

    return torch.from_numpy(feed["encoder_hidden_states"]).squeeze(2).transpose(1, 2)


def _added(feed: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    import torch

    if "time_ids" not in feed:
        return None
    return {"time_ids": torch.from_numpy(feed["time_ids"]), "text_embeds": torch.from_numpy(feed["text_embeds"])}


@pytest.mark.parametrize("style,controlnet", [("sd1", "sd1"), ("sdxl", "sdxl")])
def test_controlnet_and_controlled_unet_match_their_modules(style: str, controlnet: str) -> None:
    import torch

    from coreml_hub.mil import load_model

    out = factory.converted(style, "original", "fp32", controlnets=(controlnet,))
    packages = _packages(out)
    version = factory.model_version(style).replace("/", "_")
    assert sorted(p.name for p in packages.glob("*control*")) == [
        f"ControlNet_{factory.controlnet_id(controlnet)}.mlpackage",
        f"Stable_Diffusion_version_{version}_control-unet.mlpackage"]
    assert not list(packages.glob("*_unet.mlpackage"))  # the controlled Unet replaces the plain one (as Apple's)
    rng = np.random.default_rng(7)

    net = load_model(packages / f"ControlNet_{factory.controlnet_id(controlnet)}.mlpackage", device="cpu")
    names = [d.name for d in net.input_description]
    assert names[:4] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert names[4:] == (["time_ids", "text_embeds"] if style == "sdxl" else [])
    cond = dict((d.name, d.shape) for d in net.input_description)["controlnet_cond"]
    assert cond == (2, 3, 64, 64)  # the image size, batch 2 for guidance
    feed = _inputs(net, rng)
    got = net.predict(feed)
    ref_net, _ = factory.tiny_controlnet(controlnet)
    with torch.no_grad():
        down, mid = ref_net(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]), _context(feed),
                            torch.from_numpy(feed["controlnet_cond"]), added_cond_kwargs=_added(feed),
                            return_dict=False)
    refs = [*down, mid]
    assert sorted(got, key=lambda n: int(n.rsplit("_", 1)[1])) == [f"additional_residual_{i}" for i in range(len(refs))]
    for i, ref in enumerate(refs):
        _close(got[f"additional_residual_{i}"], ref.numpy(), f"{style} ControlNet residual {i}")

    unet = load_model(packages / f"Stable_Diffusion_version_{version}_control-unet.mlpackage", device="cpu")
    names = [d.name for d in unet.input_description]
    usual = ["sample", "timestep", "encoder_hidden_states"] + (["time_ids", "text_embeds"] if style == "sdxl" else [])
    assert names == usual + [f"additional_residual_{i}" for i in range(len(refs))]
    shapes = dict((d.name, d.shape) for d in unet.input_description)
    assert [shapes[f"additional_residual_{i}"] for i in range(len(refs))] == [tuple(r.shape) for r in refs]
    feed = _inputs(unet, rng)
    pipe, _ = factory.tiny_pipeline(style)
    residuals = [torch.from_numpy(feed[f"additional_residual_{i}"]) for i in range(len(refs))]
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]), _context(feed),
                        added_cond_kwargs=_added(feed), down_block_additional_residuals=residuals[:-1],
                        mid_block_additional_residual=residuals[-1], return_dict=False)[0]
    _close(unet.predict(feed)["noise_pred"], ref.numpy(), f"{style} controlled Unet")


def test_inpainting_unet_matches_its_module() -> None:
    import torch

    from coreml_hub.mil import load_model

    out = factory.converted(INPAINT_STYLE, "original", "fp32")
    unet = load_model(next(_packages(out).glob("*_unet.mlpackage")), device="cpu")
    shapes = dict((d.name, d.shape) for d in unet.input_description)
    assert shapes["sample"] == (2, 9, 8, 8)
    feed = _inputs(unet, np.random.default_rng(2))
    pipe, _ = factory.tiny_pipeline(INPAINT_STYLE)
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]), _context(feed),
                        return_dict=False)[0]
    got = unet.predict(feed)["noise_pred"]
    assert got.shape == (2, 4, 8, 8)
    _close(got, ref.numpy(), "inpainting Unet")
    report = verify(out / "original" / "packages")
    assert report.ok, [str(p) for p in report.errors]


def test_split_einsum_controlnet_matches_its_module() -> None:
    import torch

    from coreml_hub.mil import load_model

    package = factory.controlnet_package("sd1-b", "split_einsum", "fp32")
    net = load_model(package, device="cpu")
    feed = _inputs(net, np.random.default_rng(5))
    ref_net, _ = factory.tiny_controlnet("sd1-b")
    with torch.no_grad():
        down, mid = ref_net(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]), _context(feed),
                            torch.from_numpy(feed["controlnet_cond"]), return_dict=False)
    got = net.predict(feed)
    for i, ref in enumerate([*down, mid]):
        _close(got[f"additional_residual_{i}"], ref.numpy(), f"split_einsum residual {i}")


def test_verify_checks_the_controlnet_contract(tmp_path: Path) -> None:
    """A compiled variant with ControlledUnet and controlnet/, then a ControlNet of another base dropped in."""
    out = factory.converted("sd1", "original", "fp16", controlnets=("sd1", "sd1-b"), compiled=True)
    compiled = out / "original" / "compiled"
    assert (compiled / "ControlledUnet.mlmodelc").is_dir()
    assert sorted(p.name for p in (compiled / "controlnet").iterdir()) == [
        "TinyControlnetSd1.mlmodelc", "TinyControlnetSd1B.mlmodelc"]
    report = verify(compiled)
    assert report.ok, [str(p) for p in report.problems]
    assert "controlnet/TinyControlnetSd1B.mlmodelc" in report.components

    variant = tmp_path / "variant"
    shutil.copytree(compiled, variant, copy_function=os.link)
    from coreml_hub.testing.compiled import build_mlmodelc

    build_mlmodelc(factory.controlnet_package("sd2", "original", "fp16"), variant / "controlnet" / "Sd2Net.mlmodelc")
    report = verify(variant)
    assert not report.ok
    bad = [p for p in report.errors if p.path == "controlnet/Sd2Net.mlmodelc"]
    assert bad and "another base model" in bad[0].message and "64-wide" in bad[0].message


def test_convert_components_controlnet_for_an_existing_conversion(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    shutil.copytree(factory.converted("sd1", "original", "fp32"), out, copy_function=os.link)
    code = run_cli(["convert", str(factory.pipeline_folder("sd1")), "-o", str(out), "--attention", "original",
                    "--precision", "fp32", "--components", "controlnet", "--controlnet",
                    str(factory.controlnet_folder("sd1-b")), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert [c["name"] for c in result["components"]] == ["controlnet"]
    assert Path(result["components"][0]["path"]).name == "ControlNet_tiny-controlnet-sd1-b.mlpackage"
    assert result["notes"] and "control-unet" in captured.err  # this conversion has no controlled Unet yet
    report = verify(out / "original" / "packages")
    assert report.ok and any("no Unet that takes their residuals" in p.message for p in report.warnings)


def test_convert_refuses_a_controlnet_of_another_base_before_converting(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code = run_cli(["convert", str(factory.pipeline_folder("sd1")), "-o", str(out), "--controlnet",
                    str(factory.controlnet_folder("sd2"))])
    err = capsys.readouterr().err
    assert code == 1 and "another base model" in err and "64-wide" in err
    assert not list(out.rglob("*.mlpackage"))

    code = run_cli(["convert", str(factory.pipeline_folder("sd1")), "-o", str(out), "--components", "controlnet"])
    assert code == 2 and "--controlnet" in capsys.readouterr().err


def test_chunked_controlled_unet_runs_like_the_whole_one(tmp_path: Path) -> None:
    """`--chunk-unet` with ControlNets: `..._control-unet_chunk1/2`, the residuals fed to the chunk that reads them."""
    import torch
    from PIL import Image

    from coreml_hub.pipeline.controlnet import control_tensor, find_controlnets
    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local

    out = factory.converted("sd1", "original", "fp32", chunk=True, controlnets=("sd1",))
    packages = _packages(out)
    chunked = tmp_path / "out" / "original" / "packages"
    chunked.mkdir(parents=True)
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(out / sub, tmp_path / "out" / sub)
    for pkg in packages.glob("*.mlpackage"):
        if not pkg.name.endswith("_control-unet.mlpackage"):  # leave only the chunks
            shutil.copytree(pkg, chunked / pkg.name, copy_function=os.link)
    assert sorted(p.name.split("_tiny-sd1_")[-1] for p in chunked.glob("*control-unet*")) == [
        "control-unet_chunk1.mlpackage", "control-unet_chunk2.mlpackage"]
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    images = []
    for folder in (packages, chunked):
        variant = resolve_local(folder)
        (path,) = find_controlnets(variant.path).values()
        loaded = load_pipeline(variant, backend="torch", device="cpu", safety=False, controlnets=(path,))
        assert [p.name for p in loaded.pipeline.unet_parts] == (
            ["controlled_unet"] if folder == packages else ["controlled_unet_chunk1", "controlled_unet_chunk2"])
        control = [(loaded.controlnets[0], control_tensor(picture, 64, 64), 1.0)]
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
        images.append(loaded.pipeline.generate(prompt="a cat", steps=2, seed=2, latents=latents,
                                               control=control).image)
    assert float(np.abs(images[0] - images[1]).max()) < 1e-4
