"""Stable Diffusion 3: convert, pull from `serve` in argmaxinc's layouts, verify and run, against diffusers.

The tiny SD3 pipeline (two CLIP encoders, T5, MMDiT, 16-channel VAE, flow-matching Euler with
shift 3) is converted with real coremltools and run with the portable runtime. Every component
matches its PyTorch module at fp32; images match diffusers' StableDiffusion3Pipeline (with and
without T5) and StableDiffusion3Img2ImgPipeline within 2/255.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.cli import run_cli
from coreml_hub.testing import factory

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

TOLERANCE = 2.0 / 255.0
PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"
REPO = "argmaxinc/coreml-stable-diffusion-3-medium"
REPO_T5 = "argmaxinc/coreml-stable-diffusion-3-medium-1024-t5"


@pytest.fixture(scope="module")
def fp32() -> Path:
    return factory.converted("sd3", "original", "fp32")


@pytest.fixture(scope="module")
def diffusers_sd3():  # type: ignore[no-untyped-def]
    pipe, _ = factory.tiny_pipeline("sd3")
    return pipe


def within_scale(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert got.shape == ref.shape, what
    assert err <= 1e-4 * scale, f"{what}: max error {err:.3g}, output scale {scale:.3g}"


# ---- conversion: the contract, and each component against its module -------------------------

def test_components_match_their_modules_at_fp32(fp32: Path, diffusers_sd3) -> None:  # type: ignore[no-untyped-def]
    import torch

    from coreml_hub.mil import load_model

    pipe = diffusers_sd3
    rng = np.random.default_rng(0)

    def model(component: str):  # type: ignore[no-untyped-def]
        return load_model(factory.package(fp32, component), device="cpu")

    mmdit = model("mmdit")
    specs = {d.name: (tuple(d.shape), d.numpy_dtype) for d in mmdit.input_description}
    assert specs == {"latent_image_embeddings": ((2, 16, 8, 8), np.float32),
                     "token_level_text_embeddings": ((2, 96, 1, 154), np.float32),
                     "pooled_text_embeddings": ((2, 80, 1, 1), np.float32), "timestep": ((2,), np.float32)}
    feed = {"latent_image_embeddings": rng.standard_normal((2, 16, 8, 8)).astype(np.float32),
            "token_level_text_embeddings": rng.standard_normal((2, 96, 1, 154)).astype(np.float32),
            "pooled_text_embeddings": rng.standard_normal((2, 80, 1, 1)).astype(np.float32),
            "timestep": np.array([812.5, 812.5], np.float32)}
    with torch.no_grad():
        ref = pipe.transformer(hidden_states=torch.from_numpy(feed["latent_image_embeddings"]),
                               encoder_hidden_states=torch.from_numpy(feed["token_level_text_embeddings"])
                               .squeeze(2).transpose(1, 2),
                               pooled_projections=torch.from_numpy(feed["pooled_text_embeddings"]).flatten(1),
                               timestep=torch.from_numpy(feed["timestep"]), return_dict=False)[0].numpy()
    within_scale(mmdit.predict(feed)["denoiser_output"], ref, "mmdit")

    ids = pipe.tokenizer_3(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = model("text_encoder_t5").predict({"input_ids": ids.numpy().astype(np.float32),
                                            "attention_mask": np.zeros((1, 77), np.float32)})["encoder_hidden_states"]
    with torch.no_grad():
        ref = pipe.text_encoder_3(ids)[0].numpy()
    within_scale(out[:, :, 0, :].transpose(0, 2, 1), ref, "text_encoder_t5")

    for component, encoder, tokenizer in (("text_encoder", pipe.text_encoder, pipe.tokenizer),
                                          ("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2)):
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = model(component).predict({"input_ids": ids.numpy().astype(np.float32)})
        with torch.no_grad():
            ref_out = encoder(ids, output_hidden_states=True)
        within_scale(out["hidden_embeds"], ref_out.hidden_states[-2].numpy(), f"{component} hidden_embeds")
        within_scale(out["pooled_outputs"], ref_out.text_embeds.numpy(), f"{component} pooled_outputs")

    z = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    within_scale(model("vae_decoder").predict({"z": z})["image"], ref, "vae_decoder")
    x = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.vae.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()
    within_scale(model("vae_encoder").predict({"x": x})["latent"], ref, "vae_encoder")


def test_t5_attention_mask_drops_padding(fp32: Path, diffusers_sd3) -> None:  # type: ignore[no-untyped-def]
    """attention_mask = 1 on padding (what Apple's Swift pipeline sends) equals T5 run with HF's mask."""
    import torch

    from coreml_hub.mil import load_model

    pipe = diffusers_sd3
    batch = pipe.tokenizer_3(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    swift_mask = (batch.attention_mask == 0).numpy().astype(np.float32)
    out = load_model(factory.package(fp32, "text_encoder_t5"), device="cpu").predict(
        {"input_ids": batch.input_ids.numpy().astype(np.float32), "attention_mask": swift_mask})["encoder_hidden_states"]
    with torch.no_grad():
        ref = pipe.text_encoder_3(batch.input_ids, attention_mask=batch.attention_mask)[0].numpy()
    keep = int(batch.attention_mask.sum())
    within_scale(out[0, :, 0, :keep].T, ref[0, :keep], "masked T5")


def test_fp16_conversion_keeps_the_transformer_in_float32() -> None:
    from coreml_hub.bundle import open_bundle
    from coreml_hub.validate import check_components

    out = factory.converted("sd3", "original", "fp16", compiled=True)
    compiled = out / "original" / "compiled"
    assert {p.name for p in compiled.iterdir()} >= {
        "TextEncoder.mlmodelc", "TextEncoder2.mlmodelc", "TextEncoderT5.mlmodelc",
        "MultiModalDiffusionTransformer.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc",
        "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"}
    bundle = open_bundle(compiled)
    assert not [p for p in check_components(bundle) if p.is_error]
    mmdit = bundle.get("mmdit")
    assert {p.name: p.dtype for p in mmdit.inputs()}["latent_image_embeddings"] == "fp32"
    assert {p.name: p.dtype for p in bundle.get("text_encoder").outputs()}.keys() == {"hidden_embeds", "pooled_outputs"}


def test_convert_refuses_what_sd3_cannot_take(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = factory.pipeline_folder("sd3")
    for extra, message in ((["--attention", "split_einsum"], "original attention only"),
                           (["--chunk-unet"], "SD3 has a transformer")):
        code = run_cli(["convert", str(folder), "-o", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Hint:" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.mlpackage"))


# ---- images against diffusers -----------------------------------------------------------------

@pytest.mark.parametrize("t5", [True, False])
def test_text_to_image_matches_diffusers(fp32: Path, diffusers_sd3, t5: bool) -> None:  # type: ignore[no-untyped-def]
    import diffusers
    import torch

    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local

    ours = load_pipeline(resolve_local(fp32), backend="torch", device="cpu", t5=t5).pipeline
    assert ours.uses_t5 is t5
    latents = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(11))
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=5.0, seed=5,
                        latents=latents.clone())
    components = dict(diffusers_sd3.components)
    if not t5:
        components.update(text_encoder_3=None, tokenizer_3=None)
    reference = diffusers.StableDiffusion3Pipeline(**components)
    reference.set_progress_bar_config(disable=True)
    ref = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0,
                    latents=latents.clone(), max_sequence_length=77, output_type="np").images[0]
    diff = float(np.abs(got.image - ref).mean())
    assert diff <= TOLERANCE, f"t5={t5}: mean abs difference {diff * 255:.3f}/255"
    assert float(ref.std()) > 0.01
    if t5:  # T5 really conditions the image: the same run without it differs
        without = load_pipeline(resolve_local(fp32), backend="torch", device="cpu", t5=False).pipeline
        other = without.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=5.0, seed=5,
                                 latents=latents.clone())
        assert float(np.abs(other.image - got.image).mean()) > 1e-3


def test_image_to_image_matches_diffusers(fp32: Path, diffusers_sd3) -> None:  # type: ignore[no-untyped-def]
    import diffusers
    import torch
    from PIL import Image

    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local

    ours = load_pipeline(resolve_local(fp32), backend="torch", device="cpu", img2img=True).pipeline
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    got = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=10, guidance_scale=5.0, seed=9,
                        init_image=init, strength=0.75)
    img2img = diffusers.StableDiffusion3Img2ImgPipeline(**diffusers_sd3.components)
    img2img.set_progress_bar_config(disable=True)
    ref = img2img(PROMPT, image=init, negative_prompt=NEGATIVE, strength=0.75, num_inference_steps=10,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(9), max_sequence_length=77,
                  output_type="np").images[0]
    diff = float(np.abs(got.image - ref).mean())
    assert diff <= TOLERANCE, f"sd3 img2img: mean abs difference {diff * 255:.3f}/255"
    assert float(np.abs(got.image - np.asarray(init, dtype=np.float32) / 255.0).mean()) < 0.5


# ---- argmaxinc's layouts through serve: pull only the variant, verify, run ----------------------

def fetched_paths(server, repo: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {r["file"] for r in server.requests()
            if r["method"] == "GET" and "/resolve/" in r["path"] and r["path"].strip("/").startswith(repo)}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = run_cli(["run", *args, "--backend", "torch", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_pull_verify_run_argmax_layouts(hub_server, hub_root: Path, store_home: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.pulling import pull
    from coreml_hub.testing.publish import publish

    publish(hub_root, REPO, style="sd3", layout="argmax", t5="root")
    publish(hub_root, REPO_T5, style="sd3", layout="argmax", t5="zip")

    code = run_cli(["show", REPO, "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert code == 0
    ids = {v["id"]: v for v in shown["variants"]}
    assert ids["original/compiled"]["components"] == ["text_encoder", "text_encoder_2", "mmdit", "vae_decoder"]
    assert ids["original/compiled+partial"]["components"] == ["text_encoder_t5"]

    hub_server.clear_log()
    plain = pull(REPO)  # the default: the zip, never the partial T5 beside it
    assert plain.variant == "original/compiled"
    assert fetched_paths(hub_server, REPO) == {"coreml-stable-diffusion-3-medium_original_compiled.zip"}
    assert (plain.path / "MultiModalDiffusionTransformer.mlmodelc").is_dir()
    assert not (plain.path / "TextEncoderT5.mlmodelc").exists()
    assert run_cli(["verify", f"{REPO}:original/compiled", "--hashes"]) == 0, capsys.readouterr().err

    hub_server.clear_log()
    with_t5 = pull(REPO_T5)
    assert fetched_paths(hub_server, REPO_T5) == {"coreml-stable-diffusion-3-medium-1024-t5_original_compiled.zip"}
    assert (with_t5.path / "TextEncoderT5.mlmodelc").is_dir() and (with_t5.path / "tokenizer.json").is_file()
    capsys.readouterr()
    assert run_cli(["verify", REPO_T5]) == 0, capsys.readouterr().err

    first = run_json(capsys, REPO, PROMPT, "--steps", "3", "--seed", "4", "-o", str(tmp_path / "a"))
    second = run_json(capsys, REPO_T5, PROMPT, "--steps", "3", "--seed", "4", "-o", str(tmp_path / "b"))
    params = [first["images"][0]["parameters"], second["images"][0]["parameters"]]
    assert [p["t5"] for p in params] == ["no", "yes"]
    assert all(p["scheduler"] == "flow_euler" and p["shift"] == "3" for p in params)
    # the compiled fp16 transformer takes float32 latents: CUDA's noise can be reproduced
    nvidia = run_json(capsys, REPO_T5, PROMPT, "--steps", "2", "--seed", "4", "--rng", "nvidia", "--no-t5",
                      "--image", str(_init_image(tmp_path)), "--strength", "0.5", "-o", str(tmp_path / "c"))
    assert nvidia["images"][0]["parameters"]["rng"] == "nvidia" and nvidia["images"][0]["parameters"]["t5"] == "no"


def test_packages_pull_takes_the_t5_tokenizer_from_the_source_model(hub_server, hub_root: Path,  # type: ignore[no-untyped-def]
                                                                     store_home: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`convert`'s layout as a repo: the packages name the PyTorch model, whose tokenizer_3/ comes along."""
    from coreml_hub.pulling import pull
    from coreml_hub.testing.publish import publish

    repo = "someone/coreml-tiny-sd3"
    publish(hub_root, repo, style="sd3", layout="apple", attentions=("original",), formats=("packages",))
    hub_server.clear_log()
    result = pull(repo)
    source = fetched_paths(hub_server, factory.model_version("sd3"))
    assert {"tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer_config.json", "tokenizer_2/vocab.json"} <= source
    assert not [p for p in source if p.endswith(".safetensors")]  # never the PyTorch weights
    assert (result.path / "tokenizer_3" / "tokenizer.json").is_file()
    image = run_json(capsys, repo, PROMPT, "--steps", "2", "--seed", "1", "-o", str(tmp_path))["images"][0]
    assert image["parameters"]["t5"] == "yes"


def _init_image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


# ---- clear errors ------------------------------------------------------------------------------

def test_missing_tokenizer_files_and_wrong_schedulers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compiled = factory.converted("sd3", "original", "fp16", compiled=True) / "original" / "compiled"
    base = ["--steps", "1", "--backend", "torch", "--device", "cpu", "-o", str(tmp_path / "png")]

    def error(folder: Path, *extra: str) -> str:
        code = run_cli(["run", str(folder), PROMPT, *base, *extra])
        err = capsys.readouterr().err
        assert code != 0 and "Error:" in err and "Hint:" in err and "Traceback" not in err, err
        return err

    no_t5_tokenizer = shutil.copytree(compiled, tmp_path / "no-t5-tok")
    (no_t5_tokenizer / "tokenizer.json").unlink()
    assert "has TextEncoderT5 but not its tokenizer" in error(no_t5_tokenizer)
    code = run_cli(["run", str(no_t5_tokenizer), PROMPT, *base, "--no-t5", "-q"])  # the hint's way out works
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert run_cli(["verify", str(no_t5_tokenizer)]) == 1
    assert "TextEncoderT5 is present but its tokenizer is not" in capsys.readouterr().out

    no_clip = shutil.copytree(compiled, tmp_path / "no-clip-tok")
    (no_clip / "vocab.json").unlink()
    assert "no CLIP tokenizer files" in error(no_clip)

    assert "flow-matching Euler scheduler, not 'pndm'" in error(compiled, "--scheduler", "pndm")
    assert "--prediction-type is for Unets" in error(compiled, "--prediction-type", "epsilon")
    sd1 = factory.converted("sd1", "original", "fp32")
    assert "SD3's flow-matching scheduler" in error(sd1, "--scheduler", "flow_euler")
    assert "--shift sets SD3's" in error(sd1, "--shift", "2")
