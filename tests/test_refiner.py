"""The SDXL refiner: `convert --refiner`, Apple's layout through `serve`, verify, and the base+refiner run.

The tiny refiner shares the tiny SDXL base's second text encoder and VAE (as the real pair does)
and has its own Unet with five time ids. Its conversion matches its Unet at fp32; a run on a variant
that carries it matches diffusers' ensemble (StableDiffusionXLPipeline with `denoising_end`, then
StableDiffusionXLImg2ImgPipeline with `denoising_start`) within 2/255.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.cli import run_cli
from coreml_hub.errors import ConversionError
from coreml_hub.testing import factory

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

TOLERANCE = 2.0 / 255.0
PROMPT = "a photo of an astronaut riding a horse on mars"
BASE = "apple/coreml-stable-diffusion-xl-base"
WITH_REFINER = "apple/coreml-stable-diffusion-xl-base-with-refiner"


@pytest.fixture(scope="module")
def fp32() -> Path:
    return factory.converted("sdxl", "original", "fp32", refiner=True)


@pytest.fixture(scope="module")
def ours(fp32: Path):  # type: ignore[no-untyped-def]
    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local

    return load_pipeline(resolve_local(fp32), backend="torch", device="cpu", safety=False).pipeline


def test_refiner_package_matches_its_unet(fp32: Path) -> None:
    import torch

    from coreml_hub.mil import load_model

    refiner_pipe, _ = factory.tiny_pipeline("sdxl-refiner")
    model = load_model(factory.package(fp32, "refiner"), device="cpu")
    specs = {d.name: tuple(d.shape) for d in model.input_description}
    assert specs == {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 48, 1, 77),
                     "time_ids": (2, 5), "text_embeds": (2, 24)}
    rng = np.random.default_rng(1)
    feed = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
            "timestep": np.array([151.0, 151.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 48, 1, 77)).astype(np.float32),
            "time_ids": np.array([[64, 64, 0, 0, 2.5], [64, 64, 0, 0, 6.0]], np.float32),
            "text_embeds": rng.standard_normal((2, 24)).astype(np.float32)}
    with torch.no_grad():
        ref = refiner_pipe.unet(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]),
                                torch.from_numpy(feed["encoder_hidden_states"]).squeeze(2).transpose(1, 2),
                                added_cond_kwargs={"time_ids": torch.from_numpy(feed["time_ids"]),
                                                   "text_embeds": torch.from_numpy(feed["text_embeds"])},
                                return_dict=False)[0].numpy()
    got = model.predict(feed)["noise_pred"]
    assert float(np.abs(got - ref).max()) <= 1e-4 * float(np.abs(ref).max())


@pytest.mark.parametrize(("scheduler", "negative"), [("euler", ""), ("dpmpp", "blurry, low quality")])
def test_base_and_refiner_match_the_diffusers_ensemble(ours, scheduler: str, negative: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    from coreml_hub.pipeline.schedulers import make_scheduler

    assert ours.refiner is not None and ours.refiner.start == 0.8
    base, _ = factory.tiny_pipeline("sdxl")
    refiner, _ = factory.tiny_pipeline("sdxl-refiner")
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    got = ours.generate(prompt=PROMPT, negative_prompt=negative, steps=6, guidance_scale=6.0, seed=5,
                        scheduler=scheduler, latents=latents.clone())
    for pipe in (base, refiner):
        pipe.scheduler = make_scheduler(scheduler, ours.scheduler_config)
    handed_over = base(PROMPT, negative_prompt=negative or None, num_inference_steps=6, guidance_scale=6.0,
                       denoising_end=0.8, latents=latents.clone(), output_type="latent").images
    ref = refiner(PROMPT, negative_prompt=negative or None, image=handed_over, num_inference_steps=6,
                  guidance_scale=6.0, denoising_start=0.8, output_type="np").images[0]
    diff = float(np.abs(got.image - ref).mean())
    assert diff <= TOLERANCE, f"{scheduler}: mean abs difference {diff * 255:.3f}/255"
    # the refiner really ran: the base alone ends elsewhere
    refiner_obj, ours.refiner = ours.refiner, None
    try:
        alone = ours.generate(prompt=PROMPT, negative_prompt=negative, steps=6, guidance_scale=6.0, seed=5,
                              scheduler=scheduler, latents=latents.clone())
    finally:
        ours.refiner = refiner_obj
    assert float(np.abs(alone.image - got.image).mean()) > 1e-3


def test_convert_refuses_a_refiner_from_another_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.convert import convert

    sdxl, refiner = factory.pipeline_folder("sdxl"), factory.pipeline_folder("sdxl-refiner")
    with pytest.raises(ConversionError, match="is a StableDiffusionPipeline, not an SDXL refiner"):
        convert(sdxl, tmp_path / "a", refiner=factory.pipeline_folder("sd1"), progress=False)
    with pytest.raises(ConversionError, match="not a refiner: its Unet takes 6 time ids"):
        convert(sdxl, tmp_path / "b", refiner=sdxl, progress=False)
    code = run_cli(["convert", str(factory.pipeline_folder("sd1")), "-o", str(tmp_path / "c"), "--refiner", str(refiner)])
    err = capsys.readouterr().err
    assert code == 2 and "--refiner goes with an SDXL base" in err
    code = run_cli(["convert", str(sdxl), "-o", str(tmp_path / "d"), "--components", "refiner"])
    assert code == 2 and "--refiner REFINER_SOURCE" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*.mlpackage")]


# ---- Apple's layout through serve -------------------------------------------------------------

def fetched_paths(server, repo: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {r["file"] for r in server.requests()
            if r["method"] == "GET" and "/resolve/" in r["path"] and r["path"].strip("/").startswith(repo + "/")}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = run_cli(["run", *args, "--backend", "torch", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def pixels(item: dict) -> np.ndarray:
    from PIL import Image

    with Image.open(item["path"]) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_pull_verify_run_with_refiner(hub_server, hub_root: Path, store_home: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.pulling import pull
    from coreml_hub.testing.publish import publish

    repo_dir = publish(hub_root, WITH_REFINER, style="sdxl", layout="apple-sdxl", refiner=True)
    publish(hub_root, BASE, style="sdxl", layout="apple-sdxl")
    assert (repo_dir / "compiled" / "UnetRefinerChunk1.mlmodelc").is_dir()  # both forms are published

    hub_server.clear_log()
    result = pull(WITH_REFINER, variant="original/compiled")
    wanted = {p.relative_to(repo_dir).as_posix() for p in (repo_dir / "compiled").rglob("*") if p.is_file()
              and "Chunk" not in p.relative_to(repo_dir).as_posix()}
    assert fetched_paths(hub_server, WITH_REFINER) == wanted  # one Unet form, refiner included, nothing else
    assert (result.path / "UnetRefiner.mlmodelc").is_dir()
    assert run_cli(["verify", f"{WITH_REFINER}:original/compiled", "--hashes"]) == 0, capsys.readouterr().out
    capsys.readouterr()

    args = [PROMPT, "--steps", "6", "--seed", "3", "--scheduler", "euler"]  # the refiner runs the last 2
    refined = run_json(capsys, WITH_REFINER + ":original/compiled", *args, "-o", str(tmp_path / "a"))["images"][0]
    assert refined["parameters"]["refiner"] == "UnetRefiner" and refined["parameters"]["refiner_start"] == "0.8"
    plain = run_json(capsys, WITH_REFINER + ":original/compiled", *args, "--no-refiner",
                     "-o", str(tmp_path / "b"))["images"][0]
    assert "refiner" not in plain["parameters"]
    assert np.abs(pixels(refined) - pixels(plain)).mean() > 0.5
    # the same refiner, taken from the other repo's variant, onto the plain base: the same pixels
    borrowed = run_json(capsys, BASE + ":original/compiled", *args, "--refiner", f"{WITH_REFINER}:original/compiled",
                        "-o", str(tmp_path / "c"))["images"][0]
    assert borrowed["parameters"]["refiner"] == f"{WITH_REFINER}:original/compiled"
    assert np.array_equal(pixels(borrowed), pixels(refined))
    later = run_json(capsys, WITH_REFINER + ":original/compiled", *args, "--refiner-start", "0.5",
                     "-o", str(tmp_path / "d"))["images"][0]
    assert later["parameters"]["refiner_start"] == "0.5" and not np.array_equal(pixels(later), pixels(refined))


def test_refiner_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sdxl = factory.converted("sdxl", "original", "fp32", refiner=True)
    sd1 = factory.converted("sd1", "original", "fp32")
    base = ["--steps", "2", "--backend", "torch", "--device", "cpu", "-o", str(tmp_path / "png")]

    def error(*args: str, code: int = 1) -> str:
        got = run_cli(["run", *args, *base])
        err = capsys.readouterr().err
        assert got == code and "Error:" in err and "Hint:" in err and "Traceback" not in err, err
        return err

    assert "is not an SDXL refiner" in error(str(sdxl), PROMPT, "--refiner", str(sd1))
    assert "is not SDXL" in error(str(sd1), PROMPT, "--refiner", str(sdxl), code=2)
    assert "contradict" in error(str(sdxl), PROMPT, "--refiner", str(sdxl), "--no-refiner", code=2)
    assert "--refiner-start must be between 0 and 1" in error(str(sdxl), PROMPT, "--refiner-start", "1.5", code=2)

    # a refiner of another family inside the variant: verify names it, run refuses it
    mixed = shutil.copytree(sdxl / "original" / "packages", tmp_path / "mixed")
    for pkg in mixed.glob("*_refiner.mlpackage"):
        shutil.rmtree(pkg)
    shutil.copytree(factory.package(sd1, "unet"), mixed / "Stable_Diffusion_version_x_y_refiner.mlpackage")
    shutil.copytree(sdxl / "tokenizer", mixed / "tokenizer")
    shutil.copytree(sdxl / "tokenizer_2", mixed / "tokenizer_2")
    assert run_cli(["verify", str(mixed)]) == 1
    assert "an SDXL refiner takes [B, 5]" in capsys.readouterr().out
    assert "is not an SDXL refiner" in error(str(mixed), PROMPT)
