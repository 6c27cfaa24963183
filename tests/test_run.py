"""`coreml-hub run` end to end: real conversions of the tiny models, the portable runtime, PNGs on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _cli_helpers import default_sigint
from coreml_hub.cli import run_cli
from coreml_hub.pipeline.png import parse_parameters
from coreml_hub.testing import factory

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

PROMPT = "a photo of a red fox in the snow"


@pytest.fixture(scope="module")
def sd1() -> Path:
    """The tiny SD1 model as `convert -o OUT` writes it (fp16, split_einsum, with safety checker)."""
    return factory.converted("sd1", attention="split_einsum", precision="fp16")


@pytest.fixture(scope="module")
def sd1_chunked() -> Path:
    return factory.converted("sd1", attention="split_einsum", precision="fp16", chunk=True)


def run(args: list[str], capsys: pytest.CaptureFixture[str], expect: int = 0) -> tuple[str, str]:
    code = run_cli(["run", *args])
    out, err = capsys.readouterr()
    assert code == expect, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


def run_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    out, _ = run([*args, "--json", "--backend", "torch", "--device", "cpu"], capsys)
    return json.loads(out)


def pixels(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def text_chunks(path: str | Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as img:
        return dict(img.text)  # type: ignore[attr-defined]


def copy_variant(out: Path, dest: Path) -> Path:
    """A writable copy of a cached conversion (the cache is shared and read-only)."""
    shutil.copytree(out, dest)
    return dest


# ---- basics, reproducibility, metadata -------------------------------------------------------

def test_text_to_image_writes_png_with_metadata(sd1: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, err = run([str(sd1), PROMPT, "--seed", "7", "--steps", "4", "--backend", "torch", "--device", "cpu",
                    "-o", str(tmp_path), "--disable-safety"], capsys)
    path = Path(out.strip())
    assert path.parent == tmp_path and path.name == "a-photo-of-a-red-fox-in-the-snow-7.png"
    img = pixels(path)
    assert img.shape == (64, 64, 3) and img.std() > 1
    chunks = text_chunks(path)
    params = parse_parameters(chunks["parameters"])
    assert params["prompt"] == PROMPT and params["Seed"] == "7" and params["Steps"] == "4"
    assert params["Sampler"] == "PNDM" and params["CFG scale"] == "7.5" and params["Size"] == "64x64"
    assert chunks["backend"] == "torch" and chunks["scheduler"] == "pndm" and chunks["model"] == sd1.name
    assert chunks["variant"] == "split_einsum/packages"
    # load and generation time are reported; the progress bar is on stderr
    assert "Loaded" in err and "Generated 1 image" in err and "steps/s" in err


def test_same_seed_same_image_and_never_overwrites(sd1: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(sd1), PROMPT, "--seed", "3", "--steps", "3", "-o", str(tmp_path), "--disable-safety"]
    first = run_json(args, capsys)["images"][0]["path"]
    second = run_json(args, capsys)["images"][0]["path"]
    assert first != second and Path(first).exists() and Path(second).exists()
    assert Path(second).name == "a-photo-of-a-red-fox-in-the-snow-3-1.png"
    assert np.array_equal(pixels(first), pixels(second))
    other = run_json([str(sd1), PROMPT, "--seed", "4", "--steps", "3", "-o", str(tmp_path), "--disable-safety"],
                     capsys)["images"][0]["path"]
    assert np.abs(pixels(first) - pixels(other)).mean() > 1


@pytest.mark.parametrize("scheduler", ["pndm", "dpmpp", "euler", "euler_a", "ddim", "lms"])
def test_each_scheduler(sd1: Path, scheduler: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json([str(sd1), PROMPT, "--seed", "1", "--steps", "4", "--scheduler", scheduler,
                     "-o", str(tmp_path), "--disable-safety"], capsys)
    image = data["images"][0]
    assert image["parameters"]["scheduler"] == scheduler
    assert text_chunks(image["path"])["scheduler"] == scheduler
    img = pixels(image["path"])
    assert img.shape == (64, 64, 3) and img.std() > 1
    if scheduler == "euler_a":  # draws noise at every step: from the seeded generator too
        again = run_json([str(sd1), PROMPT, "--seed", "1", "--steps", "4", "--scheduler", scheduler,
                          "-o", str(tmp_path), "--disable-safety"], capsys)
        assert np.array_equal(img, pixels(again["images"][0]["path"]))


def test_negative_prompt_changes_image_and_is_recorded(sd1: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = [str(sd1), PROMPT, "--seed", "5", "--steps", "3", "-o", str(tmp_path), "--disable-safety"]
    plain = run_json(base, capsys)["images"][0]
    negative = run_json([*base, "--negative-prompt", "blurry, dark"], capsys)["images"][0]
    assert negative["parameters"]["negative_prompt"] == "blurry, dark"
    parsed = parse_parameters(text_chunks(negative["path"])["parameters"])
    assert parsed["negative_prompt"] == "blurry, dark"
    assert np.abs(pixels(plain["path"]) - pixels(negative["path"])).mean() > 0.5


def test_batch_of_images_uses_consecutive_seeds(sd1: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json([str(sd1), PROMPT, "--seed", "10", "--steps", "3", "--num-images", "3",
                     "-o", str(tmp_path), "--disable-safety"], capsys)
    seeds = [i["seed"] for i in data["images"]]
    assert seeds == [10, 11, 12]
    paths = [i["path"] for i in data["images"]]
    assert len(set(paths)) == 3 and all(Path(p).exists() for p in paths)
    # Image 2 of the batch is exactly what a single run with its seed makes.
    single = run_json([str(sd1), PROMPT, "--seed", "11", "--steps", "3", "-o", str(tmp_path / "single"),
                       "--disable-safety"], capsys)["images"][0]
    assert np.array_equal(pixels(paths[1]), pixels(single["path"]))
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))


def test_save_every_writes_intermediate_decodes(sd1: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = run([str(sd1), PROMPT, "--seed", "2", "--steps", "5", "--save-every", "2", "-o", str(tmp_path),
                  "--disable-safety", "--backend", "torch"], capsys)
    lines = out.strip().splitlines()
    assert [Path(p).name for p in lines] == [
        "a-photo-of-a-red-fox-in-the-snow-2-step002.png",
        "a-photo-of-a-red-fox-in-the-snow-2-step004.png",
        "a-photo-of-a-red-fox-in-the-snow-2.png",
    ]
    assert text_chunks(lines[0])["step"] == "2"
    assert np.abs(pixels(lines[0]) - pixels(lines[2])).mean() > 0.5


# ---- image-to-image ------------------------------------------------------------------------

def test_image_to_image(sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    init = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(init)  # resized to 64x64
    base = [str(sd1), PROMPT, "--image", str(init), "--seed", "4", "--steps", "6", "-o", str(tmp_path / "o"),
            "--disable-safety"]
    low = run_json([*base, "--strength", "0.3"], capsys)["images"][0]
    high = run_json([*base, "--strength", "1.0"], capsys)["images"][0]
    assert low["parameters"]["strength"] == 0.3
    assert parse_parameters(text_chunks(low["path"])["parameters"])["Denoising strength"] == "0.3"
    init_small = np.asarray(Image.open(init).convert("RGB").resize((64, 64), Image.LANCZOS), dtype=np.int16)
    # Less strength keeps more of the init image.
    assert np.abs(pixels(low["path"]) - init_small).mean() < np.abs(pixels(high["path"]) - init_small).mean()


# ---- safety checker ------------------------------------------------------------------------

def test_safety_checker_on_and_off(sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever it decides, `run` honours it: flagged images are black (with a warning), others untouched."""
    flagged_seen = clean_seen = False
    for seed in range(4):
        common = [str(sd1), PROMPT, "--seed", str(seed), "--steps", "1", "--backend", "torch", "--json"]
        out, err = run([*common, "-o", str(tmp_path / "on")], capsys)
        checked = json.loads(out)["images"][0]
        out_off, _ = run([*common, "-o", str(tmp_path / "off"), "--disable-safety"], capsys)
        unchecked = json.loads(out_off)["images"][0]
        assert unchecked["nsfw_flagged"] is False
        if checked["nsfw_flagged"]:
            flagged_seen = True
            assert pixels(checked["path"]).max() == 0
            assert "safety checker flagged" in err and "--disable-safety" in err
            assert pixels(unchecked["path"]).max() > 0
        else:
            clean_seen = True
            assert np.array_equal(pixels(checked["path"]), pixels(unchecked["path"]))
        if flagged_seen and (clean_seen or seed >= 1):
            break
    assert flagged_seen, "the tiny checker flagged none of the seeds tried"


# ---- Unet forms and layouts ------------------------------------------------------------------

def test_chunked_unet_matches_full_unet(sd1_chunked: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    variant = copy_variant(sd1_chunked, tmp_path / "chunked")
    packages = variant / "split_einsum" / "packages"
    full = run_json([str(variant), PROMPT, "--seed", "8", "--steps", "3", "-o", str(tmp_path / "a"),
                     "--disable-safety"], capsys)["images"][0]
    for unet in packages.glob("*_unet.mlpackage"):
        shutil.rmtree(unet)  # only the two chunks are left
    assert len(list(packages.glob("*_unet_chunk*.mlpackage"))) == 2
    chunked = run_json([str(variant), PROMPT, "--seed", "8", "--steps", "3", "-o", str(tmp_path / "b"),
                        "--disable-safety"], capsys)["images"][0]
    assert np.abs(pixels(full["path"]) - pixels(chunked["path"])).mean() <= 1.0


def test_batch_one_unet_matches_batch_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two = factory.converted("sd1", attention="original", precision="fp32")
    one = factory.converted("sd1", attention="original", precision="fp32", batch_one=True)
    args = [PROMPT, "--seed", "6", "--steps", "3", "--disable-safety"]
    a = run_json([str(two), *args, "-o", str(tmp_path / "a")], capsys)["images"][0]
    b = run_json([str(one), *args, "-o", str(tmp_path / "b")], capsys)["images"][0]
    assert np.abs(pixels(a["path"]) - pixels(b["path"])).mean() <= 1.0


def test_sd2_and_sdxl_styles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for style in ("sd2", "sdxl"):
        out = factory.converted(style, attention="original", precision="fp16")
        image = run_json([str(out), PROMPT, "--seed", "1", "--steps", "3", "-o", str(tmp_path / style)],
                         capsys)["images"][0]
        assert pixels(image["path"]).shape == (64, 64, 3)


def test_prediction_type_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--prediction-type replaces a missing or wrong scheduler config (Apple's compiled repos ship none)."""
    out = factory.converted("sd2", attention="original", precision="fp32")  # its config says v_prediction
    args = [PROMPT, "--seed", "8", "--steps", "3", "--scheduler", "ddim", "--disable-safety"]

    def image(folder: Path, *extra: str) -> tuple[np.ndarray, str]:
        record = run_json([str(folder), *args, *extra, "-o", str(tmp_path / "png")], capsys)["images"][0]
        chunks = text_chunks(record["path"])
        assert chunks["prediction_type"] == record["parameters"]["prediction_type"]
        return pixels(record["path"]), chunks["prediction_type"]

    from_config, kind = image(out)
    assert kind == "v_prediction"
    forced_eps, kind = image(out, "--prediction-type", "epsilon")
    assert kind == "epsilon" and np.abs(from_config - forced_eps).mean() > 1
    bare = copy_variant(out, tmp_path / "no-config")
    shutil.rmtree(bare / "scheduler")
    default, kind = image(bare)
    assert kind == "epsilon" and np.array_equal(default, forced_eps)
    forced_v, kind = image(bare, "--prediction-type", "v_prediction")
    assert kind == "v_prediction" and np.array_equal(forced_v, from_config)


def test_compiled_layout_variant_matches_packages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = factory.converted("sd1", attention="split_einsum", precision="fp16", compiled=True)
    compiled = out / "split_einsum" / "compiled"
    assert (compiled / "Unet.mlmodelc" / "model.mil").is_file() and (compiled / "vocab.json").is_file()
    args = [PROMPT, "--seed", "12", "--steps", "3", "--disable-safety"]
    a = run_json([str(compiled), *args, "-o", str(tmp_path / "c")], capsys)
    b = run_json([str(out / "split_einsum" / "packages"), *args, "-o", str(tmp_path / "p")], capsys)
    assert a["model"]["variant"] == "split_einsum/compiled"
    assert np.abs(pixels(a["images"][0]["path"]) - pixels(b["images"][0]["path"])).mean() <= 1.0
    # The -o folder of convert holding two variants must be narrowed down.
    _, err = run([str(out), *args], capsys, expect=2)
    assert "several variants" in err


# ---- auto-pull from a Hub mirror ---------------------------------------------------------------

def test_auto_pull_from_mirror_then_run_offline(hub_server: Any, store_home: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from coreml_hub.testing.publish import publish

    publish(hub_server.root, "tiny/coreml-sd", style="sd1", layout="apple", attentions=("original",),
            formats=("packages", "compiled"))
    out, err = run(["tiny/coreml-sd", PROMPT, "--seed", "1", "--steps", "2", "--backend", "torch",
                    "-o", str(tmp_path), "--disable-safety"], capsys)
    assert "not pulled yet; pulling it" in err
    first = Path(out.strip())
    chunks = text_chunks(first)
    assert chunks["model"] == "tiny/coreml-sd" and chunks["variant"] == "original/compiled"
    assert len(chunks["revision"]) == 40
    # The packages variant takes its tokenizer and scheduler from the model it was converted from.
    out, err = run(["tiny/coreml-sd:original/packages", PROMPT, "--seed", "1", "--steps", "2",
                    "-o", str(tmp_path), "--disable-safety"], capsys)
    assert text_chunks(out.strip())["variant"] == "original/packages"
    assert np.abs(pixels(first) - pixels(out.strip())).mean() <= 1.0
    # Pulled models run with the Hub gone.
    hub_server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, err = run(["tiny/coreml-sd", PROMPT, "--seed", "1", "--steps", "2", "-o", str(tmp_path),
                    "--disable-safety", "--no-pull"], capsys)
    assert "pulling" not in err
    assert np.array_equal(pixels(first), pixels(out.strip()))
    # A store entry's folder is a model too, and keeps its repo, variant and commit in the metadata.
    from coreml_hub.store import find_pulled

    entry = find_pulled("tiny/coreml-sd:original/compiled").path
    out, _ = run([str(entry), PROMPT, "--seed", "1", "--steps", "2", "-o", str(tmp_path), "--disable-safety"],
                 capsys)
    by_path = text_chunks(out.strip())
    assert (by_path["model"], by_path["variant"], by_path["revision"]) == (
        "tiny/coreml-sd", "original/compiled", chunks["revision"])


def test_unknown_model_on_the_hub(hub_server: Any, store_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, err = run(["nobody/no-such-model", PROMPT, "--steps", "1"], capsys, expect=1)
    assert "Error:" in err and "nobody/no-such-model" in err and "not found" in err.lower()


# ---- errors ----------------------------------------------------------------------------------

def test_missing_component(sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    variant = copy_variant(sd1, tmp_path / "v")
    for decoder in variant.glob("*/packages/*_vae_decoder.mlpackage"):
        shutil.rmtree(decoder)
    _, err = run([str(variant), PROMPT, "--steps", "2", "-o", str(tmp_path)], capsys, expect=1)
    assert "Error:" in err and "vae_decoder" in err and "Hint:" in err
    assert not list(tmp_path.glob("*.png"))


def test_img2img_needs_a_vae_encoder(sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    variant = copy_variant(sd1, tmp_path / "v")
    for encoder in variant.glob("*/packages/*_vae_encoder.mlpackage"):
        shutil.rmtree(encoder)
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    _, err = run([str(variant), PROMPT, "--image", str(tmp_path / "init.png"), "-o", str(tmp_path)], capsys,
                 expect=1)
    assert "no VAEEncoder" in err


def test_bad_init_image(sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "init.png").write_text("this is not a png")
    _, err = run([str(sd1), PROMPT, "--image", str(tmp_path / "init.png")], capsys, expect=1)
    assert "Error: Cannot read" in err and "Hint:" in err
    _, err = run([str(sd1), PROMPT, "--image", str(tmp_path / "nope.png")], capsys, expect=1)
    assert "does not exist" in err


def test_unsupported_size(sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    Image.new("RGB", (128, 64)).save(tmp_path / "wide.png")
    _, err = run([str(sd1), PROMPT, "--image", str(tmp_path / "wide.png"), "-o", str(tmp_path)], capsys, expect=1)
    assert "128x64" in err and "64x64" in err and "aspect ratio" in err
    assert "Loaded" not in err  # refused before any model was loaded
    assert "--fit crop" in err and "--fit pad" in err and "--fit stretch" in err


def test_fit_makes_another_aspect_ratio_fit(sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(wide)
    out, err = run([str(sd1), PROMPT, "--image", str(wide), "--fit", "pad", "--seed", "2", "--steps", "2",
                    "--disable-safety", "-o", str(tmp_path)], capsys)
    assert "Padded the init image from 128x64 to 64x64, the model's size." in err
    assert pixels(out.strip()).shape == (64, 64, 3)
    _, err = run([str(sd1), PROMPT, "--image", str(wide), "--fit", "squash"], capsys, expect=2)
    assert "crop" in err and "pad" in err and "stretch" in err
    _, err = run([str(sd1), PROMPT, "--fit", "crop"], capsys, expect=2)  # nothing to fit
    assert "--fit crop needs --image" in err and "Loaded" not in err


@pytest.mark.extended  # extended tier: import timing of a fresh process
def test_random_seed_wall_time_and_what_run_imports(sd1: Path, tmp_path: Path) -> None:
    import re

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "coreml_hub", "run", str(sd1), PROMPT,
                           "--steps", "1", "--disable-safety", "-o", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "diffusers.schedulers.scheduling_pndm" in imported  # the instrument works
    assert not {m for m in imported if m.split(".")[0] == "transformers"}  # the tokenizer is coreml-hub's own
    # of diffusers only what its scheduler modules need: no pipelines, models or loaders
    assert not {m for m in imported if m.split(".")[:2] in (["diffusers", "pipelines"], ["diffusers", "models"],
                                                            ["diffusers", "loaders"])}
    data = json.loads(proc.stdout)
    seed = data["images"][0]["seed"]
    assert f"Seed {seed} (chosen at random; `--seed {seed}` makes the same image again)." in proc.stderr
    # the whole command (imports included), not only loading and generating
    found = re.search(r"Took ([\d.]+) s in all: ([\d.]+) s starting up \(imports, finding the model\), ([\d.]+) s "
                      r"loading, ([\d.]+) s generating\.", proc.stderr)
    assert found, proc.stderr
    total, rest, load, gen = map(float, found.groups())
    assert data["wall_seconds"] >= data["load_seconds"] + data["generate_seconds"]
    assert abs(total - data["wall_seconds"]) < 0.06 and rest > 0


def test_unknown_model_without_pull(store_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, err = run(["nobody/no-such-model", PROMPT, "--no-pull"], capsys, expect=1)
    assert "not pulled" in err and "coreml-hub pull nobody/no-such-model" in err


def test_bad_flags(sd1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, err = run([str(sd1), PROMPT, "--steps", "0"], capsys, expect=2)
    assert "--steps" in err
    _, err = run([str(sd1), PROMPT, "--strength", "1.5", "--image", "x.png"], capsys, expect=2)
    assert "--strength" in err
    _, err = run([str(sd1), PROMPT, "--scheduler", "heun"], capsys, expect=2)
    assert "heun" in err


def test_coreml_backend_unavailable_off_macos(sd1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if sys.platform == "darwin":
        pytest.skip("Core ML is available on macOS")
    _, err = run([str(sd1), PROMPT, "--backend", "coreml"], capsys, expect=1)
    assert "macOS" in err and "--backend torch" in err


# ---- Ctrl-C ----------------------------------------------------------------------------------

@pytest.mark.extended  # extended tier: a run in a subprocess
def test_interrupt_leaves_no_partial_file(sd1: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "80"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "coreml_hub", "run", str(sd1), PROMPT, "--steps", "400", "--seed", "1",
         "--backend", "torch", "--device", "cpu", "-o", str(out_dir), "--num-images", "3", "--disable-safety"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    deadline = time.time() + 120
    seen = b""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    while time.time() < deadline and b"Loaded" not in seen:  # no progress bars: stderr is not a terminal
        chunk = proc.stderr.read() or b""
        seen += chunk
        time.sleep(0.2)
    assert b"Loaded" in seen, seen.decode(errors="replace")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    rest = proc.stderr.read() or b""
    # ended by SIGINT, as an interrupted program should (a shell loop running it stops as well)
    assert proc.returncode == -signal.SIGINT, (seen + rest).decode(errors="replace")
    assert b"Interrupted." in seen + rest
    assert b"Traceback" not in seen + rest
    leftovers = list(out_dir.iterdir()) if out_dir.exists() else []
    assert leftovers == [], leftovers


# ---- --reduce-memory -------------------------------------------------------------------------

def _build_wide(tmp: Path) -> None:
    """Tiny SD1 with two components big enough to show in peak memory: a text encoder with a
    million-token vocabulary (128 MB in float32) and a VAE decoder of SD's own widths (~120 MB)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from coreml_hub.convert import convert

    with tempfile.TemporaryDirectory() as src_dir:
        src = Path(src_dir) / "src"
        shutil.copytree(factory.pipeline_folder("sd1"), src)
        torch.manual_seed(11)
        config = json.loads((src / "text_encoder" / "config.json").read_text())
        config["vocab_size"] = 1_000_000
        CLIPTextModel(CLIPTextConfig(**config)).eval().save_pretrained(src / "text_encoder")
        vae = json.loads((src / "vae" / "config.json").read_text())
        vae = {k: v for k, v in vae.items() if not k.startswith("_")}
        vae.update(block_out_channels=[128, 256, 512, 512], norm_num_groups=32)
        AutoencoderKL(**vae).eval().save_pretrained(src / "vae")
        convert(src, tmp, attention="original", precision="fp16", components=("text_encoder", "unet", "vae_decoder"),
                model_version="coreml-hub-test/wide-sd1", progress=False)


@pytest.fixture(scope="module")
def wide() -> Path:
    return factory.cached("wide", _build_wide, style="sd1", vocab=1_000_000, vae=[128, 256, 512, 512])


def _run_subprocess(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    """`coreml-hub run --json` in a fresh process: its own peak memory, nothing of this one's."""
    proc = subprocess.run([sys.executable, "-m", "coreml_hub", "run", str(model), PROMPT, "--seed", "3",
                           "--steps", "3", "--num-images", "2", "--backend", "torch", "--device", "cpu",
                           "--no-pull", "--json", "-o", str(out), *extra],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_reduce_memory_lowers_peak_memory_and_keeps_images(wide: Path, tmp_path: Path) -> None:
    full = _run_subprocess(wide, tmp_path / "full")
    reduced = _run_subprocess(wide, tmp_path / "reduced", "--reduce-memory")
    assert full["reduce_memory"] is False and reduced["reduce_memory"] is True
    peak_full, peak_reduced = full["peak_memory"]["rss_bytes"], reduced["peak_memory"]["rss_bytes"]
    # the text encoder (128 MB) and the VAE decoder (~120 MB) are never in memory together:
    # at least most of the smaller one is saved
    assert peak_full - peak_reduced > 64 * 2**20, (peak_full, peak_reduced)
    assert full["peak_memory"]["cuda_bytes"] is None
    for a, b in zip(full["images"], reduced["images"], strict=True):
        assert np.array_equal(pixels(a["path"]), pixels(b["path"]))


def test_dtype_bf16_makes_nearly_the_fp32_image(sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(sd1), PROMPT, "--seed", "7", "--steps", "4", "--disable-safety"]
    fp32 = run_json([*args, "-o", str(tmp_path / "fp32")], capsys)
    bf16 = run_json([*args, "-o", str(tmp_path / "bf16"), "--dtype", "bf16"], capsys)
    a, b = pixels(fp32["images"][0]["path"]), pixels(bf16["images"][0]["path"])
    difference = np.abs(a - b)
    assert 0 < difference.mean() < 2 and difference.max() < 32, (difference.mean(), difference.max())


def test_reduce_memory_keeps_one_model_loaded_at_a_time(sd1: Path, tmp_path: Path) -> None:
    from coreml_hub.pipeline.generate import generate, load_pipeline
    from coreml_hub.pipeline.resolve import resolve_model

    loaded = load_pipeline(resolve_model(str(sd1), pull=False), backend="torch", device="cpu", safety=False,
                           reduce_memory=True)
    parts = loaded.pipeline.components
    assert [n for n, c in parts.items() if c.resident] == ["text_encoder"]  # the first one needed stays
    during: list[list[str]] = []
    generate(sd1, PROMPT, seed=3, steps=2, num_images=2, output_dir=tmp_path, disable_safety=True, loaded=loaded,
             on_step=lambda _: during.append([n for n, c in parts.items() if c.resident]))
    assert len(during) >= 4 and all(resident == ["unet"] for resident in during)  # every denoising step
    assert [n for n, c in parts.items() if c.resident] == ["vae_decoder"]
    # loaded once to check it, then once per image; the text encoder, left loaded, serves both prompts
    assert {n: c.loads for n, c in parts.items()} == {"text_encoder": 1, "unet": 3, "vae_decoder": 3}
