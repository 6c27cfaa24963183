"""A VAE that downsamples by 2 (two blocks) instead of 8: `verify`, `pull` and `run` agree it is valid.

The scale factor is read from the bundles (the VAE decoder's `image` against its `z`, the VAE
encoder's `x` against the Unet's `sample`), never assumed to be 8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from coreml_hub.bundle import verify
from coreml_hub.cli import run_cli
from coreml_hub.testing import factory, tiny

pytestmark = [pytest.mark.slow]

VAE2 = dict(tiny.style_config("sd1")["vae"], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], sample_size=tiny.LATENT * 2)


def _vae2_packages() -> Path:
    """The tiny SD1 pipeline with a two-block VAE, its VAE decoder and encoder converted (cached)."""

    def build(tmp: Path) -> None:
        import diffusers
        import torch

        from coreml_hub.convert import convert

        pipe = tmp / "pipeline"
        shutil.copytree(factory.pipeline_folder("sd1"), pipe)
        shutil.rmtree(pipe / "vae")
        torch.manual_seed(tiny.SEED)
        diffusers.AutoencoderKL(**VAE2).eval().save_pretrained(pipe / "vae", safe_serialization=True)
        convert(pipe, tmp / "out", attention="original", precision="fp16", components=("vae_decoder", "vae_encoder"),
                model_version=factory.model_version("sd1"), progress=False)

    return factory.cached("vae2", build, vae=VAE2) / "out" / "original" / "packages"


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`convert -o OUT` of the tiny SD1 model whose VAE scales by 2: 8x8 latents make 16x16 images."""
    folder = tmp_path_factory.mktemp("vae2") / "tiny-vae2"
    shutil.copytree(factory.converted("sd1", "original", "fp16"), folder)
    for package in _vae2_packages().glob("*.mlpackage"):
        target = folder / "original" / "packages" / package.name
        shutil.rmtree(target)
        shutil.copytree(package, target)
    return folder


def test_verify_reads_the_scale_from_the_bundles(out: Path) -> None:
    report = verify(out / "original" / "packages")
    assert report.ok, [str(p) for p in report.errors]


def test_a_vae_encoder_of_another_scale_is_still_caught(out: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "packages"
    shutil.copytree(out / "original" / "packages", mixed)
    encoder = factory.package(factory.converted("sd1", "original", "fp16"), "vae_encoder")  # scales by 8
    shutil.rmtree(mixed / encoder.name)
    shutil.copytree(encoder, mixed / encoder.name)
    report = verify(mixed)
    assert not report.ok
    assert any("x is [1, 3, 64, 64]" in p.message and "16x16" in p.message for p in report.errors), report.errors


def test_pull_accepts_what_convert_wrote_and_run_makes_its_size(out: Path, hub_server, store_home: Path,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.testing.publish import publish_source

    shutil.copytree(out, hub_server.root / "acme" / "tiny-vae2")
    publish_source(hub_server.root, "sd1")  # the model the packages name: pull takes its tokenizer
    assert run_cli(["pull", "acme/tiny-vae2", "--json"]) == 0, capsys.readouterr().err
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["validation"] == "ok"
    for model in ("acme/tiny-vae2", str(out)):
        code = run_cli(["run", model, "a red fox", "--steps", "2", "--seed", "1", "--disable-safety",
                        "--backend", "torch", "--device", "cpu", "--no-pull", "-o", str(tmp_path), "--json"])
        result = capsys.readouterr()
        assert code == 0, result.err
        assert json.loads(result.out)["size"] == "16x16"
