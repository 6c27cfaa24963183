"""`run`'s pipeline against diffusers on the same weights.

The tiny SD1-, SD2- and SDXL-style pipelines are converted to Core ML (fp32, original attention)
and run with the torch backend (the portable ML Program runtime). diffusers runs the
PyTorch pipeline they were converted from with the same initial latents (text-to-image)
or the same generator (image-to-image) and the same scheduler. Mean absolute pixel
difference must stay within 2/255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coreml_hub.pipeline.generate import load_pipeline
from coreml_hub.pipeline.resolve import resolve_local
from coreml_hub.pipeline.schedulers import make_scheduler
from coreml_hub.testing import factory

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

TOLERANCE = 2.0 / 255.0
PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    style = request.param
    pipe, _ = factory.tiny_pipeline(style)
    pipe.safety_checker = None  # the checker is compared on its own in test_run; here: pixels
    pipe.set_progress_bar_config(disable=True)
    out = factory.converted(style, attention="original", precision="fp32")
    ours = load_pipeline(resolve_local(out), backend="torch", device="cpu", safety=False,
                         img2img=True).pipeline
    return style, pipe, ours


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a", "dpmpp"])
def test_text_to_image_matches_diffusers(pair, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    style, pipe, ours = pair
    g = ours.geometry
    latents = torch.randn((1, 4, g.latent_height, g.latent_width), generator=torch.Generator().manual_seed(11))
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, guidance_scale=7.5, seed=5,
                        scheduler=scheduler, latents=latents.clone())
    pipe.scheduler = make_scheduler(scheduler, ours.scheduler_config)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
               latents=latents.clone(), generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    assert got.image.shape == ref.shape == (g.image_height, g.image_width, 3)
    diff = float(np.abs(got.image - ref).mean())
    assert diff <= TOLERANCE, f"{style}/{scheduler}: mean abs difference {diff * 255:.3f}/255"
    assert float(ref.std()) > 0.01  # a real image, not a constant one


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
def test_image_to_image_matches_diffusers(pair, scheduler: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import diffusers
    import torch
    from PIL import Image

    style, pipe, ours = pair
    g = ours.geometry
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, (g.image_height, g.image_width, 3), dtype=np.uint8))
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=10, guidance_scale=6.0, seed=9,
                        scheduler=scheduler, init_image=init, strength=0.6)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**{k: v for k, v in pipe.components.items()})
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = make_scheduler(scheduler, ours.scheduler_config)
    ref = img2img(PROMPT, image=init, negative_prompt=NEGATIVE, strength=0.6, num_inference_steps=10,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(9), output_type="np").images[0]
    diff = float(np.abs(got.image - ref).mean())
    assert diff <= TOLERANCE, f"{style}/{scheduler} img2img: mean abs difference {diff * 255:.3f}/255"
    # The init image shows through: far closer to it than an unrelated image would be.
    init_unit = np.asarray(init, dtype=np.float32) / 255.0
    assert float(np.abs(got.image - init_unit).mean()) < 0.5


@pytest.mark.parametrize("negative", ["", NEGATIVE])
def test_sdxl_text_to_image_matches_diffusers(negative: str) -> None:
    """Two text encoders (penultimate states), pooled embeds, time ids, zeros for an empty negative."""
    import torch

    pipe, _ = factory.tiny_pipeline("sdxl")
    pipe.set_progress_bar_config(disable=True)
    ours = load_pipeline(resolve_local(factory.converted("sdxl", attention="original", precision="fp32")),
                         backend="torch", device="cpu", safety=False).pipeline
    assert ours.geometry.sdxl
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    got = ours.generate(prompt=PROMPT, negative_prompt=negative, steps=8, guidance_scale=7.5, seed=5,
                        scheduler="euler", latents=latents.clone())
    pipe.scheduler = make_scheduler("euler", ours.scheduler_config)
    ref = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=8, guidance_scale=7.5,
               latents=latents.clone(), generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    diff = float(np.abs(got.image - ref).mean())
    assert diff <= TOLERANCE, f"sdxl: mean abs difference {diff * 255:.3f}/255"


def test_sdxl_image_to_image_matches_diffusers() -> None:
    """SDXL image-to-image: the VAE encoder, strength -> start step, time ids of the init image's size."""
    import diffusers
    import torch
    from PIL import Image

    pipe, _ = factory.tiny_pipeline("sdxl")
    ours = load_pipeline(resolve_local(factory.converted("sdxl", attention="original", precision="fp32")),
                         backend="torch", device="cpu", safety=False, img2img=True).pipeline
    g = ours.geometry
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (g.image_height, g.image_width, 3),
                                                             dtype=np.uint8))
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=10, guidance_scale=6.0, seed=9,
                        scheduler="euler", init_image=init, strength=0.6)
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = make_scheduler("euler", ours.scheduler_config)
    ref = img2img(PROMPT, image=init, negative_prompt=NEGATIVE, strength=0.6, num_inference_steps=10,
                  guidance_scale=6.0, generator=torch.Generator().manual_seed(9), output_type="np").images[0]
    diff = float(np.abs(got.image - ref).mean())
    assert diff <= TOLERANCE, f"sdxl img2img: mean abs difference {diff * 255:.3f}/255"
    assert float(np.abs(got.image - np.asarray(init, dtype=np.float32) / 255.0).mean()) < 0.5


def test_run_command_png_matches_diffusers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole command, PNG on disk included, against diffusers' 8-bit output."""
    import torch
    from PIL import Image

    from coreml_hub.cli import run_cli

    pipe, _ = factory.tiny_pipeline("sd1")
    pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    out = factory.converted("sd1", attention="original", precision="fp32")
    code = run_cli(["run", str(out), PROMPT, "--seed", "21", "--steps", "6", "--scheduler", "ddim",
                    "--backend", "torch", "--device", "cpu", "--disable-safety", "-o", str(tmp_path), "-q"])
    assert code == 0, capsys.readouterr().err
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    pipe.scheduler = make_scheduler("ddim", load_pipeline(resolve_local(out), backend="torch", device="cpu",
                                                          safety=False).pipeline.scheduler_config)
    ref = pipe(PROMPT, num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(21),
               output_type="pil").images[0]
    with Image.open(path) as img:
        ours = np.asarray(img.convert("RGB"), dtype=np.float32)
    diff = float(np.abs(ours - np.asarray(ref, dtype=np.float32)).mean())
    assert diff <= 2.0, f"mean abs difference {diff:.3f}/255"
