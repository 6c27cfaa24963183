"""Task plugins end to end: tiny coremltools models with the real repos' I/O, published by `coreml-hub serve`
in the real repos' layouts (tests/data/layouts), listed, shown, pulled, verified and run; outputs compared
with the torch modules (and, for the language models, with transformers' own `generate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coreml_hub import pulling, tasks
from coreml_hub.errors import AmbiguousTask, NoTaskFound

from _cli_helpers import cli, fetched, repo_files

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

DATA = Path(__file__).parent / "data" / "layouts"
FASTVIT = "apple/coreml-FastViT-T8"
DEPTH = "apple/coreml-depth-anything-v2-small"
DETR = "apple/coreml-detr-semantic-segmentation"
CLIP = "apple/coreml-mobileclip"
CLIP_TOKENIZER = "openai/clip-vit-base-patch32"
MISTRAL = "apple/mistral-coreml"
LLAMA = "coreml-projects/Llama-2-7b-chat-coreml"
TWO_HEADS = "test/two-heads"
TOKEN = "hf_tasks_test_token"


def listing(name: str) -> list[tuple[str, int]]:
    rows = (line.split("\t") for line in (DATA / f"{name}.txt").read_text().splitlines())
    return [(path, int(size)) for path, size in rows]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory):
    """Every task's repo in its real layout, plus the tokenizer repos they name, served once for the module."""
    from coreml_hub.testing import lm_models as lm
    from coreml_hub.testing import models, task_models as tm, tiny
    from coreml_hub.testing.hubrepo import make_repo
    from coreml_hub.testing.hubserver import HubServer
    from coreml_hub.testing.publish import publish_plain
    from coreml_hub.testing.tokenizer import write_tokenizer_config, write_tokenizer_files

    root = tmp_path_factory.mktemp("tasks-hub")
    publish_plain(root, FASTVIT, listing("apple__coreml-FastViT-T8"), {"FastViTT8F16.mlpackage": tm.classifier()},
                  meta={"pipeline_tag": "image-classification"})
    publish_plain(root, DEPTH, listing("apple__coreml-depth-anything-v2-small"),
                  {"DepthAnythingV2SmallF16.mlpackage": models.depth("fp16"),
                   "DepthAnythingV2SmallF32.mlpackage": models.depth("fp32")}, meta={"pipeline_tag": "depth-estimation"})
    publish_plain(root, DETR, listing("apple__coreml-detr-semantic-segmentation"),
                  {"DETRResnet50SemanticSegmentationF16.mlpackage": tm.segmenter("fp16"),
                   "DETRResnet50SemanticSegmentationF32.mlpackage": tm.segmenter("fp32")},
                  meta={"pipeline_tag": "image-segmentation"})
    publish_plain(root, CLIP, listing("apple__coreml-mobileclip"),
                  {"mobileclip_s0_image.mlpackage": tm.clip_image(), "mobileclip_s0_text.mlpackage": tm.clip_text()})
    clip_tok = root / ".clip-tokenizer"
    write_tokenizer_files(clip_tok, tiny.VOCAB_SIZE)
    write_tokenizer_config(clip_tok)
    make_repo(root, CLIP_TOKENIZER, {**{p.name: p.read_bytes() for p in sorted(clip_tok.iterdir())},
                                     "pytorch_model.bin": 300_000})
    publish_plain(root, MISTRAL, listing("apple__mistral-coreml"),
                  {"StatefulMistral7BInstructInt4.mlpackage": lm.stateful_lm("int4"),
                   "StatefulMistral7BInstructFP16.mlpackage": lm.stateful_lm("fp16")},
                  meta={"pipeline_tag": "text-generation"})
    tokenizer = {p.name: p.read_bytes() for p in sorted(lm.tokenizer_folder().iterdir())}
    make_repo(root, lm.MISTRAL_SOURCE, {**tokenizer, "consolidated.safetensors": 400_000, "README.md": "# tiny\n"},
              meta={"gated": True, "pipeline_tag": "text-generation"})
    (root / ".tokens").write_text(TOKEN + "\n")
    publish_plain(root, LLAMA, listing("coreml-projects__Llama-2-7b-chat-coreml"),
                  {"llama-2-7b-chat.mlpackage": lm.exporters_lm()},
                  files={"tokenizer.json": tokenizer["tokenizer.json"],
                         "tokenizer_config.json": tokenizer["tokenizer_config.json"],
                         "config.json": json.dumps({"model_type": "llama", "vocab_size": lm.VOCAB})},
                  meta={"pipeline_tag": "text-generation"})
    make_repo(root, TWO_HEADS, models.bundle_files(tm.ambiguous(), "TwoHeads.mlpackage"),
              meta={"library_name": "coreml", "pipeline_tag": "depth-estimation"})
    server = HubServer(root, tmp_path_factory.mktemp("tasks-log") / "requests.jsonl").start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", server.url)
        mp.setenv("COREML_HUB_HOME", str(tmp_path_factory.mktemp("tasks-store")))
        mp.delenv("HF_TOKEN", raising=False)
        mp.setattr(pulling, "_accelerator_here", lambda: None)  # the CPU rule, whatever this machine has
        try:
            yield server
        finally:
            server.stop()


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    code, out, err = cli(capsys, *args)
    assert code == 0, f"exit {code}\n{out}\n{err}"
    return out, err


def pull_only(server: Any, capsys: pytest.CaptureFixture[str], repo: str, variant: str, bundle: str,
              *extra: str) -> Path:
    """Pull a variant (default when `variant` is empty), check that only its files came, verify it."""
    server.clear_log()
    out, err = ok(capsys, "pull", f"{repo}:{variant}" if variant else repo)
    assert fetched(server, repo) == sorted(repo_files(server, repo, f"{bundle}/") + list(extra))
    entry = Path(out.strip().splitlines()[-1])
    code, out, err = cli(capsys, "verify", str(entry), "--hashes")
    assert code == 0, out + err
    return entry


def image(path: Path, width: int, height: int, seed: int) -> np.ndarray:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def torch_input(pixels: np.ndarray, scale: float = 1 / 255) -> Any:
    import torch

    return torch.from_numpy(pixels.astype(np.float32) * scale).permute(2, 0, 1).unsqueeze(0)


# ---------------------------------------------------------------- the hook and choosing a task


def test_built_in_tasks_register_through_the_hook(capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = ok(capsys, "plugins", "--json")
    provided = {r["name"]: r["tasks"] for r in json.loads(out)}
    assert provided["text-to-image"] == ["text-to-image"] and provided["text-generation"] == ["text-generation"]
    names = [t.name for t in tasks.available_tasks()]
    assert sorted(names) == ["depth-estimation", "feature-extraction", "image-classification", "image-segmentation",
                             "text-generation", "text-to-image"]
    assert all(isinstance(t, tasks.Task) for t in tasks.available_tasks())
    assert "register_tasks" in {h for r in json.loads(out) for h in r["hooks"]}


def test_each_model_is_recognized_by_its_task() -> None:
    from coreml_hub.testing import lm_models as lm
    from coreml_hub.testing import models, task_models as tm

    expected = {tm.classifier(): "image-classification", models.depth("fp32"): "depth-estimation",
                tm.segmenter(): "image-segmentation", tm.clip_image(): "feature-extraction",
                tm.clip_text(): "feature-extraction", lm.stateful_lm("int4"): "text-generation",
                lm.exporters_lm(): "text-generation"}
    for bundle, name in expected.items():
        info = tasks.describe_model(tasks.resolve(bundle))
        assert tasks.choose_task(info).name == name, bundle


def test_ambiguous_and_unknown_models_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.testing import feature_models, task_models as tm

    info = tasks.describe_model(tasks.resolve(tm.ambiguous()))
    with pytest.raises(AmbiguousTask) as exc:
        tasks.choose_task(info)
    assert "depth-estimation" in exc.value.message and "image-segmentation" in exc.value.message
    image(tmp_path / "a.png", 8, 8, 1)
    code, out, err = cli(capsys, "run", str(tm.ambiguous()), str(tmp_path / "a.png"), "-o", str(tmp_path))
    assert code == 2 and "fits 2 tasks equally well" in err and "Hint: Name one with --task" in err
    out, _ = ok(capsys, "run", str(tm.ambiguous()), str(tmp_path / "a.png"), "--task", "image-segmentation",
                "-o", str(tmp_path), "-q")
    assert out.split() == [str(tmp_path / "a-classes.png"), str(tmp_path / "a-overlay.png")]

    plain = feature_models.package("range_dim")  # x -> y arrays: nothing a task knows
    with pytest.raises(NoTaskFound):
        tasks.choose_task(tasks.describe_model(tasks.resolve(plain)))
    code, out, err = cli(capsys, "run", str(plain), "x.npy")
    assert code == 1 and "No task knows what to do with" in err
    assert "takes x (fp32[1, 1..16, 8]); gives y (" in err and "coreml-hub predict" in err
    code, out, err = cli(capsys, "run", str(plain), "x.npy", "--task", "no-such-task")
    assert code == 2 and "No task named 'no-such-task'" in err


def test_options_of_another_task_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.testing import task_models as tm

    image(tmp_path / "a.png", 32, 32, 2)
    code, out, err = cli(capsys, "run", str(tm.classifier()), str(tmp_path / "a.png"), "--steps", "3",
                         "--max-new-tokens", "4")
    assert code == 2 and "--steps, --max-new-tokens are not used by the image-classification task" in err
    assert "Options of image-classification: --fit, --top-k" in err
    (tmp_path / "photo.jpg").write_text("not a picture")  # an image file that is not an image
    code, out, err = cli(capsys, "run", str(tm.classifier()), str(tmp_path / "photo.jpg"))
    assert code == 1 and f"Error: Cannot read {tmp_path / 'photo.jpg'} as an image" in err and "Hint:" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- the tasks, from the mirror


def test_listed_and_shown(mirror: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = ok(capsys, "list", "--json")
    found = {r["repo_id"]: r["variants"] for r in json.loads(out)}
    assert found[FASTVIT] == ["FastViTT8F16"]
    assert found[CLIP] == ["mobileclip_s0_image", "mobileclip_s0_text"]
    assert found[MISTRAL] == ["StatefulMistral7BInstructFP16", "StatefulMistral7BInstructInt4"]
    assert found[LLAMA] == ["llama-2-7b-chat"]
    for repo in (FASTVIT, DEPTH, DETR, CLIP, MISTRAL, LLAMA):
        out, _ = ok(capsys, "show", repo)
        assert out.splitlines()[2].split()[:6] == ["VARIANT", "SIZE", "FORMAT", "TAGS", "BUNDLE", "WITH"], out


def test_image_classification(mirror: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from coreml_hub.testing import task_models as tm

    pull_only(mirror, capsys, FASTVIT, "", "FastViTT8F16.mlpackage")
    pixels = image(tmp_path / "photo.png", tm.CLASSIFIER_SIZE, tm.CLASSIFIER_SIZE, 3)
    reference = tm.classifier_module().half().float()  # the weights the F16 package holds
    with torch.no_grad():
        probs = reference(torch_input(pixels))[0].numpy()
    order = [tm.CLASS_LABELS[i] for i in np.argsort(-probs)]
    out, err = ok(capsys, "run", FASTVIT, str(tmp_path / "photo.png"), "--json")
    (result,) = json.loads(out)["images"]
    assert [t["label"] for t in result["top"]] == order[:5]
    np.testing.assert_allclose([t["probability"] for t in result["top"]], np.sort(probs)[::-1][:5], atol=1e-4)
    out, err = ok(capsys, "run", FASTVIT, str(tmp_path / "photo.png"), "--top-k", "3")
    lines = out.splitlines()
    assert lines[0].split() == ["LABEL", "PROBABILITY"] and len(lines) == 4
    assert lines[1].startswith(order[0]) and "Classified 1 image" in err
    out, _ = ok(capsys, "run", FASTVIT, str(tmp_path / "photo.png"), "-q")
    assert out.strip() == order[0]
    # --fit pad: a 2:1 image sits on black bars at the model's square shape (here no resize is left)
    size = tm.CLASSIFIER_SIZE
    wide = image(tmp_path / "wide.png", size, size // 2, 6)
    padded = np.zeros((size, size, 3), dtype=np.uint8)
    padded[(size - size // 2) // 2:][:size // 2] = wide
    with torch.no_grad():
        probs = reference(torch_input(padded))[0].numpy()
    out, _ = ok(capsys, "run", FASTVIT, str(tmp_path / "wide.png"), "--fit", "pad", "--top-k", "3", "--json")
    (result,) = json.loads(out)["images"]
    assert [t["label"] for t in result["top"]] == [tm.CLASS_LABELS[i] for i in np.argsort(-probs)][:3]
    np.testing.assert_allclose([t["probability"] for t in result["top"]], np.sort(probs)[::-1][:3], atol=1e-4)


def test_depth_estimation(mirror: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from PIL import Image

    from coreml_hub.testing import models

    pull_only(mirror, capsys, DEPTH, "", "DepthAnythingV2SmallF32.mlpackage")  # full precision on a CPU
    width, height = models.DEPTH_SIZE
    pixels = image(tmp_path / "room.png", width, height, 4)
    image(tmp_path / "wide.jpg", 90, 40, 5)
    with torch.no_grad():
        expected = models.depth_module()(torch_input(pixels, 1.0))[0, 0].numpy()
    out, err = ok(capsys, "run", DEPTH, str(tmp_path / "room.png"), str(tmp_path / "wide.jpg"), "-o",
                  str(tmp_path / "out"), "--json")
    first, second = json.loads(out)["images"]
    with Image.open(first["depth_png"]) as png:
        assert png.mode == "I;16" and png.size == (width, height) and png.text["depth_scale"] == "value / 65535"
        depth = np.asarray(png, dtype=np.float64) / 65535
    # the model's output is a GRAYSCALE_FLOAT16 image (as Apple's F32 package's is): the torch depth in fp16
    np.testing.assert_allclose(depth, expected.astype(np.float16), atol=1e-4)
    with Image.open(first["color_png"]) as color:
        assert color.mode == "RGB" and color.size == (width, height)
    for key in ("depth_png", "color_png"):  # every output at the input image's own size
        with Image.open(second[key]) as png:
            assert png.size == (90, 40)
    out, _ = ok(capsys, "run", DEPTH, str(tmp_path / "room.png"), "-o", str(tmp_path / "out"))
    assert out.splitlines()[0].split() == ["IMAGE", "SIZE", "DEPTH", "(16-BIT)", "COLORIZED"]
    assert str(tmp_path / "out" / "room-depth-1.png") in out  # never overwrites


def test_image_segmentation(mirror: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from PIL import Image

    from coreml_hub.testing import task_models as tm

    pull_only(mirror, capsys, DETR, "", "DETRResnet50SemanticSegmentationF32.mlpackage")
    pixels = image(tmp_path / "street.png", tm.SEGMENTER_SIZE, tm.SEGMENTER_SIZE, 6)
    with torch.no_grad():
        expected = tm.segmenter_module()(torch_input(pixels)).numpy()
    out, err = ok(capsys, "run", DETR, str(tmp_path / "street.png"), "-o", str(tmp_path), "--json")
    (result,) = json.loads(out)["images"]
    with Image.open(result["classes_png"]) as png:
        assert png.mode == "L" and np.array_equal(np.asarray(png), expected)
    ids, counts = np.unique(expected, return_counts=True)
    labels = {c["id"]: c["label"] for c in result["classes"]}
    assert sorted(labels) == ids.tolist()
    for class_id in ids:  # names from the model's metadata; "--" ids have no name
        name = tm.SEGMENT_LABELS[class_id]
        assert labels[class_id] == (name if name != "--" else f"class {class_id}")
    assert [c["share"] for c in result["classes"]] == sorted((c["share"] for c in result["classes"]), reverse=True)
    with Image.open(result["overlay_png"]) as overlay:  # the legend lies below the image, one line per class
        assert overlay.mode == "RGB" and overlay.size[1] == tm.SEGMENTER_SIZE + 6 + 16 * len(ids)
    out, _ = ok(capsys, "run", DETR, str(tmp_path / "street.png"), "-o", str(tmp_path))
    assert out.splitlines()[0].split() == ["ID", "CLASS", "PIXELS"]


def test_feature_extraction_pairs_the_encoders(mirror: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from transformers import CLIPTokenizer

    from coreml_hub.testing import task_models as tm

    pull_only(mirror, capsys, CLIP, "mobileclip_s0_image", "mobileclip_s0_image.mlpackage")
    pixels = image(tmp_path / "a.png", tm.CLIP_SIZE, tm.CLIP_SIZE, 7)
    texts = ["a photo of a dog", "a red car at night"]
    mirror.clear_log()
    out, err = ok(capsys, "run", f"{CLIP}:mobileclip_s0_image", "--image", str(tmp_path / "a.png"),
                  "--text", texts[0], "--text", texts[1], "-o", str(tmp_path), "--json")
    assert f"Pulling {CLIP}:mobileclip_s0_text, the text encoder paired with mobileclip_s0_image" in err
    # the partner's bundle and CLIP's tokenizer files came, never the tokenizer repo's weights
    assert fetched(mirror, CLIP) == repo_files(mirror, CLIP, "mobileclip_s0_text.mlpackage/")
    assert fetched(mirror, CLIP_TOKENIZER) == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                                               "vocab.json"]
    result = json.loads(out)
    assert result["tokenizer"]["origin"] == "default" and result["tokenizer"]["repo"] == CLIP_TOKENIZER
    # independent of coreml-hub's own BPE: transformers' CLIPTokenizer, then zeros as MobileCLIP pads
    clip = CLIPTokenizer.from_pretrained(result["tokenizer"]["folder"])
    ids = np.zeros((len(texts), tm.CLIP_LENGTH), dtype=np.int64)
    for n, text in enumerate(texts):
        encoded = clip(text)["input_ids"]
        assert encoded[0] == clip.bos_token_id and encoded[-1] == clip.eos_token_id
        ids[n, :len(encoded)] = encoded
    with torch.no_grad():
        image_ref = tm.clip_image_module()(torch_input(pixels)).numpy()
        text_ref = tm.clip_text_module()(torch.from_numpy(ids)).numpy()
    image_emb, text_emb = np.load(result["image_embeddings"]), np.load(result["text_embeddings"])
    np.testing.assert_allclose(image_emb, image_ref, atol=1e-4)
    np.testing.assert_allclose(text_emb, text_ref, atol=1e-4)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(result["similarities"], unit(image_ref) @ unit(text_ref).T, atol=1e-4)
    out, _ = ok(capsys, "run", f"{CLIP}:mobileclip_s0_text", "--image", str(tmp_path / "a.png"), "--text", texts[0],
                "-o", str(tmp_path))  # from the other side: the pair is pulled already
    assert out.splitlines()[0].split() == ["IMAGE", "TEXT", "SIMILARITY"]


def _greedy(package: Path, prompt_ids: list[int], new: int) -> list[int]:
    """transformers' own greedy generate on the very weights the package holds, up to the end token;
    the logits rounded to fp16, the type both exports declare for their `logits` output."""
    import torch
    from transformers import LogitsProcessorList

    from coreml_hub.testing import lm_models as lm

    model = lm.reference(package)
    as_fp16 = LogitsProcessorList([lambda _ids, scores: scores.half().float()])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new, do_sample=False,
                             logits_processor=as_fp16)[0, len(prompt_ids):]
    tokens = out.tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


def test_stateful_lm_needs_the_gated_tokenizer_and_matches_transformers(mirror: Any, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub.constants

    from coreml_hub.testing import lm_models as lm

    # an empty Hugging Face cache: another test of the session may have fetched this tokenizer with a token
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    entry = pull_only(mirror, capsys, MISTRAL, "StatefulMistral7BInstructInt4",
                      "StatefulMistral7BInstructInt4.mlpackage")
    assert (entry / "StatefulMistral7BInstructInt4.mlpackage").is_dir()
    prompt = "tell me a story about a cat"
    code, out, err = cli(capsys, "run", f"{MISTRAL}:StatefulMistral7BInstructInt4", prompt)
    assert code == 1 and out == ""
    assert (f"Error: The tokenizer of {MISTRAL} comes from {lm.MISTRAL_SOURCE} (named by its metadata "
            "(co.huggingface.exporters.name)), which is gated") in err
    assert "Hint: Accept its terms on the Hub and set HF_TOKEN" in err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    mirror.clear_log()
    tokenizer = lm.load_tokenizer()
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
    for variant in ("StatefulMistral7BInstructInt4", "StatefulMistral7BInstructFP16"):
        out, err = ok(capsys, "run", f"{MISTRAL}:{variant}", prompt, "--max-new-tokens", "24", "--json")
        result = json.loads(out)
        assert result["prompt_tokens"] == len(chat_ids) and result["contract"] == "stateful"
        expected = _greedy(lm.stateful_lm("int4" if variant.endswith("Int4") else "fp16"), chat_ids, 24)
        assert result["tokens"] == expected, variant
        assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    # only the tokenizer's files came from its repo (once: then from the cache), never its weights
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert set(fetched(mirror, lm.MISTRAL_SOURCE)) <= tokenizer_files
    folder = Path(result["tokenizer"]["folder"])
    assert result["tokenizer"]["repo"] == lm.MISTRAL_SOURCE and {p.name for p in folder.iterdir()} == tokenizer_files
    out, err = ok(capsys, "run", f"{MISTRAL}:StatefulMistral7BInstructFP16", prompt, "--max-new-tokens", "5")
    assert out.endswith("\n") and "Generated" in err and "tokens/s" in err and "gated" not in err


def test_exporters_lm_with_its_own_tokenizer(mirror: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.testing import lm_models as lm

    pull_only(mirror, capsys, LLAMA, "", "llama-2-7b-chat.mlpackage", "config.json", "tokenizer.json",
              "tokenizer_config.json")
    tokenizer = lm.load_tokenizer()
    prompt = "once upon a time"
    ids = tokenizer(prompt)["input_ids"]
    out, err = ok(capsys, "run", LLAMA, prompt, "--no-chat", "--max-new-tokens", "40", "--json")
    result = json.loads(out)
    assert result["contract"] == "fixed-length" and result["tokenizer"]["origin"] == "model folder"
    expected = _greedy(lm.exporters_lm(), ids, lm.SEQ + 1 - len(ids))
    assert result["tokens"] == expected and len(ids) + len(expected) <= lm.SEQ + 1
    assert result["stop"] in ("context", "eos")
    if result["stop"] == "context":
        assert "stopped at the model's context of 32 tokens" in err


def test_sampling_is_seeded_and_long_prompts_are_refused(mirror: Any, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.testing import lm_models as lm

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = f"{MISTRAL}:StatefulMistral7BInstructInt4"
    ok(capsys, "pull", model)
    args = ["run", model, "hello", "--max-new-tokens", "12", "--temperature", "0.9", "--top-p", "0.95", "--json"]
    first = json.loads(ok(capsys, *args, "--seed", "5")[0])
    again = json.loads(ok(capsys, *args, "--seed", "5")[0])
    other = json.loads(ok(capsys, *args, "--seed", "6")[0])
    greedy = json.loads(ok(capsys, "run", model, "hello", "--max-new-tokens", "12", "--json")[0])
    assert first["tokens"] == again["tokens"] and first["seed"] == 5
    assert first["tokens"] != other["tokens"] or first["tokens"] != greedy["tokens"]
    code, out, err = cli(capsys, "run", model, "tell me a story " * 20)
    assert code == 1 and f"holds at most {lm.CONTEXT} tokens" in err and "Shorten the prompt" in err


def test_pick_samples_from_the_top_p_set() -> None:
    from coreml_hub_plugins.text_generation import pick

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    assert pick(logits, 0.0, 1.0, rng) == 0
    draws = [pick(logits, 1.0, 0.8, rng) for _ in range(2000)]  # 0.5 + 0.3 reach 0.8: only ids 0 and 1
    assert set(draws) == {0, 1} and abs(draws.count(0) / len(draws) - 0.5 / 0.8) < 0.04


def test_pipeline_tag_settles_a_tie(mirror: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image(tmp_path / "a.png", 8, 8, 8)
    out, err = ok(capsys, "run", TWO_HEADS, str(tmp_path / "a.png"), "-o", str(tmp_path), "-q")
    assert out.split() == [str(tmp_path / "a-depth.png"), str(tmp_path / "a-depth-color.png")]


def test_batch_run_jobs_go_to_their_tasks(mirror: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.batch import run_batch
    from coreml_hub.testing import task_models as tm

    image(tmp_path / "photo.png", tm.CLASSIFIER_SIZE, tm.CLASSIFIER_SIZE, 9)
    image(tmp_path / "street.png", tm.SEGMENTER_SIZE, tm.SEGMENTER_SIZE, 10)
    jobs = [{"id": "labels", "model": FASTVIT, "images": ["photo.png"], "top_k": 2},
            {"id": "segments", "model": DETR, "images": ["street.png"]},
            {"id": "wrong", "model": FASTVIT, "images": ["photo.png"], "max_new_tokens": 3}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    result = run_batch(tmp_path / "jobs.jsonl", tmp_path / "out")
    records = {r.id: r for r in result.results}
    assert records["labels"].ok and records["segments"].ok and not records["wrong"].ok
    assert "not used by the image-classification task" in records["wrong"].error["message"]
    expected = json.loads(ok(capsys, "run", FASTVIT, str(tmp_path / "photo.png"), "--top-k", "2", "--json")[0])
    assert records["labels"].details["images"][0]["top"] == expected["images"][0]["top"]
    assert sorted(records["segments"].paths) == ["segments/street-classes.png", "segments/street-overlay.png"]
    assert records["segments"].details["images"][0]["classes_png"] == "street-classes.png"
    assert (tmp_path / "out" / "segments" / "street-overlay.png").is_file()
