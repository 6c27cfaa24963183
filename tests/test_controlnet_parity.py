"""ControlNets and inpainting in `run`'s pipeline against diffusers on the same tiny weights.

The tiny SD1 and SDXL pipelines are converted with their tiny ControlNets (the Unet that takes
residuals, `..._control-unet.mlpackage`, and `ControlNet_*.mlpackage`; fp32, original attention)
and run with the torch backend. diffusers runs StableDiffusionControlNetPipeline (one and two
ControlNets), StableDiffusionControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline,
StableDiffusionInpaintPipeline (a 9-channel Unet) and StableDiffusionControlNetInpaintPipeline
on the PyTorch modules they were converted from. Mean absolute pixel difference must stay within
2/255, and each ControlNet must visibly change the image (so a pipeline ignoring it would fail).
"""

from __future__ import annotations

import numpy as np
import pytest

from coreml_hub.pipeline.controlnet import control_tensor, find_controlnets, inpaint_control_tensor
from coreml_hub.pipeline.generate import load_pipeline
from coreml_hub.pipeline.inpaint import mask_array
from coreml_hub.pipeline.resolve import resolve_local
from coreml_hub.pipeline.schedulers import make_scheduler
from coreml_hub.testing import factory
from coreml_hub.testing.tiny import INPAINT_STYLE

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

TOLERANCE = 2.0 / 255.0
PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"
SD1_CONTROLNETS = ("sd1", "sd1-b", "sd1-inpaint")


def _image(seed: int, size: tuple[int, int] = (96, 96)):  # type: ignore[no-untyped-def]
    """Blocky random pictures (edges and flat areas, like edge maps), larger than the model: they get resized."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, resample=Image.NEAREST)


def _mask(size: int = 64):  # type: ignore[no-untyped-def]
    from PIL import Image

    array = np.zeros((size, size), dtype=np.uint8)
    array[size // 4: size * 3 // 4, size // 8: size * 5 // 8] = 255
    return Image.fromarray(array)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).mean())


def _loaded(out, names: tuple[str, ...], **kwargs):  # type: ignore[no-untyped-def]
    found = find_controlnets(resolve_local(out).path)
    paths = tuple(found[factory.controlnet_id(n)] for n in names)
    loaded = load_pipeline(resolve_local(out), backend="torch", device="cpu", safety=False, controlnets=paths,
                           **kwargs)
    return loaded.pipeline, loaded.controlnets


@pytest.fixture(scope="module")
def sd1():  # type: ignore[no-untyped-def]
    """diffusers' modules, the tiny ControlNets, and our pipeline loaded once with all three ControlNets."""
    pipe, _ = factory.tiny_pipeline("sd1")
    nets = {name: factory.tiny_controlnet(name)[0] for name in SD1_CONTROLNETS}
    out = factory.converted("sd1", attention="original", precision="fp32", controlnets=SD1_CONTROLNETS)
    ours, components = _loaded(out, SD1_CONTROLNETS, img2img=True)
    return pipe, nets, ours, dict(zip(SD1_CONTROLNETS, components))


def _sd_controlnet_pipe(pipe, controlnet, cls_name: str = "StableDiffusionControlNetPipeline"):  # type: ignore[no-untyped-def]
    import diffusers

    cls = getattr(diffusers, cls_name)
    made = cls(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
               controlnet=controlnet, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    made.set_progress_bar_config(disable=True)
    return made


@pytest.mark.parametrize("names,scales,scheduler", [
    (("sd1",), (0.8,), "pndm"),
    (("sd1", "sd1-b"), (1.0, 0.6), "euler_a"),  # MultiControlNet: residuals summed, each scaled
])
def test_controlnet_text_to_image_matches_diffusers(sd1, names, scales, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    import torch
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    pipe, nets, ours, loaded = sd1
    components = [loaded[n] for n in names]
    g = ours.geometry
    images = [_image(10 + i) for i in range(len(names))]
    control = [(c, control_tensor(img, g.image_width, g.image_height), s)
               for c, img, s in zip(components, images, scales)]
    latents = torch.randn((1, 4, g.latent_height, g.latent_width), generator=torch.Generator().manual_seed(11))
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, guidance_scale=7.5, seed=5,
                        scheduler=scheduler, latents=latents.clone(), control=control)
    models = [nets[n] for n in names]
    ref_pipe = _sd_controlnet_pipe(pipe, models[0] if len(models) == 1 else MultiControlNetModel(models))
    ref_pipe.scheduler = make_scheduler(scheduler, ours.scheduler_config)
    ref = ref_pipe(PROMPT, image=images[0] if len(images) == 1 else images, negative_prompt=NEGATIVE,
                   num_inference_steps=8, guidance_scale=7.5, latents=latents.clone(),
                   controlnet_conditioning_scale=list(scales) if len(scales) > 1 else scales[0],
                   generator=torch.Generator().manual_seed(5), height=g.image_height, width=g.image_width,
                   output_type="np").images[0]
    diff = _diff(got.image, ref)
    assert diff <= TOLERANCE, f"{names}: mean abs difference {diff * 255:.3f}/255"
    if len(names) == 1:
        plain = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, guidance_scale=7.5, seed=5,
                              scheduler=scheduler, latents=latents.clone())
        assert _diff(got.image, plain.image) > 4 * TOLERANCE, "the ControlNet barely changed the image"


def test_controlnet_image_to_image_matches_diffusers(sd1) -> None:  # type: ignore[no-untyped-def]
    import torch

    pipe, nets, ours, loaded = sd1
    components = [loaded["sd1"]]
    g = ours.geometry
    init = _image(3, (g.image_width, g.image_height))
    picture = _image(12)
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=10, guidance_scale=6.0, seed=9,
                        scheduler="ddim", init_image=init, strength=0.6,
                        control=[(components[0], control_tensor(picture, g.image_width, g.image_height), 0.9)])
    ref_pipe = _sd_controlnet_pipe(pipe, nets["sd1"], "StableDiffusionControlNetImg2ImgPipeline")
    ref_pipe.scheduler = make_scheduler("ddim", ours.scheduler_config)
    ref = ref_pipe(PROMPT, image=init, control_image=picture, negative_prompt=NEGATIVE, strength=0.6,
                   num_inference_steps=10, guidance_scale=6.0, controlnet_conditioning_scale=0.9,
                   generator=torch.Generator().manual_seed(9), height=g.image_height, width=g.image_width,
                   output_type="np").images[0]
    diff = _diff(got.image, ref)
    assert diff <= TOLERANCE, f"img2img: mean abs difference {diff * 255:.3f}/255"


def test_controlnet_inpaint_matches_diffusers(sd1) -> None:  # type: ignore[no-untyped-def]
    """A 4-channel Unet with the inpaint ControlNet: hole-punched control image, latents kept outside the mask."""
    import torch

    pipe, nets, ours, loaded = sd1
    components = [loaded["sd1-inpaint"]]
    g = ours.geometry
    init, mask = _image(4, (g.image_width, g.image_height)), _mask(g.image_width)
    repaint = mask_array(mask, g.image_width, g.image_height)
    control = inpaint_control_tensor(init, repaint)
    assert float(control.min()) == -1.0
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, guidance_scale=7.5, seed=3,
                        scheduler="euler_a", init_image=init, strength=1.0, mask=repaint,
                        control=[(components[0], control, 1.0)])
    ref_pipe = _sd_controlnet_pipe(pipe, nets["sd1-inpaint"], "StableDiffusionControlNetInpaintPipeline")
    ref_pipe.scheduler = make_scheduler("euler_a", ours.scheduler_config)
    ref = ref_pipe(PROMPT, image=init, mask_image=mask, control_image=control, negative_prompt=NEGATIVE,
                   strength=1.0, num_inference_steps=8, guidance_scale=7.5, controlnet_conditioning_scale=1.0,
                   generator=torch.Generator().manual_seed(3),
                   height=g.image_height, width=g.image_width, output_type="np").images[0]
    diff = _diff(got.image, ref)
    assert diff <= TOLERANCE, f"controlnet inpaint: mean abs difference {diff * 255:.3f}/255"


def test_sdxl_controlnet_matches_diffusers() -> None:
    import diffusers
    import torch

    pipe, _ = factory.tiny_pipeline("sdxl")
    net, _ = factory.tiny_controlnet("sdxl")
    out = factory.converted("sdxl", attention="original", precision="fp32", controlnets=("sdxl",))
    ours, components = _loaded(out, ("sdxl",))
    g = ours.geometry
    picture = _image(21)
    latents = torch.randn((1, 4, g.latent_height, g.latent_width), generator=torch.Generator().manual_seed(11))
    control = [(components[0], control_tensor(picture, g.image_width, g.image_height), 0.7)]
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, guidance_scale=7.5, seed=5,
                        scheduler="euler", latents=latents.clone(), control=control)
    plain = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=8, guidance_scale=7.5, seed=5,
                          scheduler="euler", latents=latents.clone())
    ref_pipe = diffusers.StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=net)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = make_scheduler("euler", ours.scheduler_config)
    ref = ref_pipe(PROMPT, image=picture, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
                   latents=latents.clone(), controlnet_conditioning_scale=0.7, height=g.image_height,
                   width=g.image_width, generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    diff = _diff(got.image, ref)
    assert diff <= TOLERANCE, f"sdxl controlnet: mean abs difference {diff * 255:.3f}/255"
    assert _diff(got.image, plain.image) > 4 * TOLERANCE, "the ControlNet barely changed the image"


@pytest.fixture(scope="module")
def inpainting():  # type: ignore[no-untyped-def]
    pipe, _ = factory.tiny_pipeline(INPAINT_STYLE)
    out = factory.converted(INPAINT_STYLE, attention="original", precision="fp32")
    return pipe, load_pipeline(resolve_local(out), backend="torch", device="cpu", safety=False, img2img=True).pipeline


@pytest.mark.parametrize("strength,scheduler", [(1.0, "pndm"), (0.7, "ddim")])
def test_inpainting_unet_matches_diffusers(inpainting, strength: float, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    """A 9-channel inpainting Unet: latents, the mask and the masked image's latents on channels."""
    import torch

    pipe, ours = inpainting
    g = ours.geometry
    assert g.inpainting and g.unet_channels == 9
    init, mask = _image(6, (g.image_width, g.image_height)), _mask(g.image_width)
    repaint = mask_array(mask, g.image_width, g.image_height)
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=10, guidance_scale=7.5, seed=8,
                        scheduler=scheduler, init_image=init, strength=strength, mask=repaint)
    pipe.scheduler = make_scheduler(scheduler, ours.scheduler_config)
    ref = pipe(PROMPT, image=init, mask_image=mask, negative_prompt=NEGATIVE, strength=strength,
               num_inference_steps=10, guidance_scale=7.5, generator=torch.Generator().manual_seed(8),
               height=g.image_height, width=g.image_width, output_type="np").images[0]
    diff = _diff(got.image, ref)
    assert diff <= TOLERANCE, f"inpaint {strength}: mean abs difference {diff * 255:.3f}/255"
    assert float(ref.std()) > 0.01
