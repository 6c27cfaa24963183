"""Layout plugins against real Hub file lists (tests/data/layouts), through the real entry points."""

from __future__ import annotations

import fnmatch
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreml_hub.errors import CoremlHubError, EntryNotFound, InvalidBundle, UnsafeArchive, VariantNotFound
from coreml_hub.layouts import RepoFile, Variant, find_variants
from coreml_hub.plugins import get_layouts
from coreml_hub_plugins._common import bundle_role, decode_model_version, find_bundles, glob_escape, tags_in
from coreml_hub_plugins.apple import find_apple_variants
from coreml_hub_plugins.archives import find_archive_variants
from coreml_hub_plugins.flat import find_flat_variants

DATA = Path(__file__).parent / "data" / "layouts"
LISTS = sorted(p.stem for p in DATA.glob("*.txt"))
FINDERS = (find_apple_variants, find_archive_variants, find_flat_variants)


def load(name: str) -> list[RepoFile]:
    rows = (line.rstrip("\n").split("\t") for line in (DATA / f"{name}.txt").read_text().splitlines(True))
    return [RepoFile(path, int(size)) for path, size in rows]


def by_id(name: str) -> dict[str, Variant]:
    return {v.id: v for v in find_variants(load(name))}


def layouts() -> dict[str, object]:
    return {layout.name: layout for layout in get_layouts()}


def bundles_in(variant: Variant) -> set[str]:
    """Top-level bundle names (relative to the root) a variant fetches."""
    out = set()
    for path in variant.files:
        rel = path[len(variant.root) + 1:] if variant.root else path
        first = rel.split("/")[0]
        if first.endswith((".mlmodelc", ".mlpackage")):
            out.add(first)
    return out


UNET_FAMILIES = {  # family -> (full bundle names, chunk bundle name markers)
    "unet": (("Unet.mlmodelc", "Unet.mlpackage"), "_unet.mlpackage", ("UnetChunk", "_unet_chunk")),
    "controlled": (("ControlledUnet.mlmodelc",), "_control-unet.mlpackage", ("ControlledUnetChunk", "_control-unet_chunk")),
    "refiner": (("UnetRefiner.mlmodelc",), "_refiner.mlpackage", ("UnetRefinerChunk", "_refiner_chunk")),
}


def both_unet_forms(names: set[str]) -> bool:
    """Whether any one Unet (plain, controlled, refiner) is fetched both whole and chunked."""
    for fulls, package_suffix, chunk_markers in UNET_FAMILIES.values():
        full = any(n in fulls or n.endswith(package_suffix) for n in names)
        chunks = any(n.startswith(chunk_markers[0]) or chunk_markers[1] in n for n in names)
        if full and chunks:
            return True
    return False


def folder_total(files: list[RepoFile], root: str) -> int:
    return sum(f.size for f in files if f.path.startswith(root + "/"))


# ---------------------------------------------------------------- expected ids per real repo

SD_FOLDERS = {"original/compiled", "original/packages", "split_einsum/compiled", "split_einsum/packages"}
EXPECTED_IDS = {
    "apple__coreml-stable-diffusion-v1-4": SD_FOLDERS,
    "apple__coreml-stable-diffusion-v1-5": SD_FOLDERS,
    "apple__coreml-stable-diffusion-2-base": SD_FOLDERS,
    "apple__coreml-stable-diffusion-2-1-base": SD_FOLDERS,
    "apple__coreml-stable-diffusion-xl-base": {"original/compiled", "original/packages", "original/compiled+zip"},
    "apple__coreml-stable-diffusion-xl-base-with-refiner": {"original/compiled", "original/packages"},
    "apple__coreml-stable-diffusion-v1-5-palettized": {
        "original/compiled", "original/packages", "split_einsum_v2/compiled", "split_einsum_v2/packages",
        "original/compiled+zip", "split_einsum_v2/compiled+zip",
    },
    "apple__coreml-stable-diffusion-2-1-base-palettized": {
        "original/compiled", "original/packages", "split_einsum_v2/compiled", "split_einsum_v2/packages",
        "original/compiled+zip", "split_einsum_v2/compiled+zip",
    },
    "apple__coreml-stable-diffusion-mixed-bit-palettization": {
        "original/compiled+mbp-4.50+palettized",
        "original/packages+mbp-4.50+palettized",
        "original/compiled+mbp-4.50+palettized+unet-only",
        "original/packages+mbp-4.50+palettized+unet-only",
        "original/compiled+mbp-4.50+palettized+zip",
    },
    "pcuenq__coreml-stable-diffusion-v1-5": {"original/compiled", "split_einsum/compiled"},
    "coreml-community__coreml-stable-diffusion-v1-5": {
        "original/compiled", "original/compiled@512x768", "original/compiled@768x512", "split_einsum/compiled",
    },
    "coreml-community__coreml-stable-diffusion-2-1-base": {
        "original/compiled@512x768+no-i2i", "original/compiled@768x768", "original/compiled+no-i2i",
        "split_einsum/compiled+no-i2i",
    },
    "coreml-community__coreml-animagine-xl-3.1": {
        "split_einsum/compiled@1024x1024+6bit", "split_einsum/compiled@1024x768+6bit",
        "split_einsum/compiled@768x1024+6bit", "split_einsum/compiled@768x768+6bit",
    },
    "coreml-community__coreml-AnythingXL": {"split_einsum/compiled@1024x1024+6bit"},
    "coreml-community__coreml-MeinaMix": {"original/compiled@512x512+cn", "split_einsum/compiled+cn"},
    "coreml-community__coreml-stable-diffusion-v1-5_cn": {"original/compiled+cn", "split_einsum/compiled+cn"},
    "coreml-community__coreml-URPM-v13": {"original/compiled", "split_einsum/compiled"},
    "flat__root-compiled": {"original/compiled"},
    "flat__mlpackages-folder": {"original/compiled"},
    "flat__packages-folder": {"original/packages"},
    "flat__torch2coreml-controlnet": {"original/compiled", "original/packages"},
    "coreml-community__ControlNet-Models-For-Core-ML": set(),  # ControlNets only: no pipeline variant
    "runwayml__stable-diffusion-v1-5-diffusers": set(),
    "argmaxinc__coreml-stable-diffusion-3-medium": {"original/compiled", "original/compiled+partial"},
    "argmaxinc__coreml-stable-diffusion-3-medium-1024-t5": {"original/compiled"},
    # plain Core ML repos (the plain layout): one variant per bundle, named by its path
    "apple__coreml-depth-anything-v2-small": {
        "DepthAnythingV2SmallF32", "DepthAnythingV2SmallF16", "DepthAnythingV2SmallF16INT8",
        "DepthAnythingV2SmallF16P6", "DepthAnythingV2SmallF16P8",
    },
    "apple__coreml-depth-anything-small": {"DepthAnythingSmallF32", "DepthAnythingSmallF16", "DepthAnythingSmallF16P6"},
    "apple__coreml-FastViT-T8": {"FastViTT8F16"},
    "apple__coreml-FastViT-MA36": {"FastViTMA36F16"},
    "apple__coreml-detr-semantic-segmentation": {
        "DETRResnet50SemanticSegmentationF32", "DETRResnet50SemanticSegmentationF16",
        "DETRResnet50SemanticSegmentationF16P8",
    },
    "apple__coreml-mobileclip": {f"mobileclip_{size}_{part}" for size in ("s0", "s1", "s2", "blt")
                                 for part in ("image", "text")},
    "apple__mistral-coreml": {"StatefulMistral7BInstructInt4", "StatefulMistral7BInstructFP16"},
    "coreml-projects__Llama-2-7b-chat-coreml": {"llama-2-7b-chat"},
    "apple__coreml-sam2.1-tiny": {"SAM2_1TinyImageEncoderFLOAT16", "SAM2_1TinyPromptEncoderFLOAT16",
                                  "SAM2_1TinyMaskDecoderFLOAT16"},
    "apple__coreml-resnet-50": set(),  # neural-network `.mlmodel` files only: no ML Program bundle
}


def test_every_list_has_expectations() -> None:
    assert set(LISTS) == set(EXPECTED_IDS)


@pytest.mark.parametrize("name", LISTS)
def test_variant_ids_through_entry_points(name: str) -> None:
    assert {layout for layout in layouts()} >= {"apple", "archives", "flat"}
    assert set(by_id(name)) == EXPECTED_IDS[name]


@pytest.mark.parametrize("name", LISTS)
def test_one_layout_claims_each_variant(name: str) -> None:
    files = load(name)
    ids = [v.id for finder in FINDERS for v in finder(files)]
    assert len(ids) == len(set(ids)), "two layouts produced the same id"


@pytest.mark.parametrize("name", LISTS)
def test_invariants(name: str) -> None:
    from huggingface_hub.utils import filter_repo_objects

    files = load(name)
    sizes = {f.path: f.size for f in files}
    variants = find_variants(files)
    by_layout = layouts()
    seen: dict[str, str] = {}
    for v in variants:
        assert v.files and set(v.files) <= set(sizes)
        assert v.size_bytes == sum(sizes[p] for p in v.files)
        assert not both_unet_forms(bundles_in(v)), f"{v.id} fetches both Unet forms"
        shared = set(v.extra.get("shared_files") or ())  # a plain repo's companions go with every variant
        for path in v.files:
            if path in shared:
                continue
            assert path not in seen, f"{path} is in {seen.get(path)} and {v.id}"
            seen[path] = v.id
        # the patterns the store hands to huggingface_hub select exactly the variant's files
        patterns = by_layout[v.layout].allow_patterns(v)
        assert sorted(filter_repo_objects(list(sizes), allow_patterns=patterns)) == sorted(v.files)
        assert v.to_dict()["id"] == v.id


# ---------------------------------------------------------------- Apple SD 1.x / 2.x

SD1_COMPILED = {"TextEncoder.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc"}


@pytest.mark.parametrize(
    ("name", "model", "safety"),
    [
        ("apple__coreml-stable-diffusion-v1-4", "CompVis/stable-diffusion-v1-4", True),
        ("apple__coreml-stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5", True),
        ("apple__coreml-stable-diffusion-2-base", "stabilityai/stable-diffusion-2-base", False),
        ("apple__coreml-stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base", False),
    ],
)
def test_apple_sd(name: str, model: str, safety: bool) -> None:
    variants = by_id(name)
    expected_components = ("text_encoder", "unet", "vae_decoder", "vae_encoder") + (("safety_checker",) if safety else ())
    for vid, v in variants.items():
        attention, fmt = vid.split("/")
        assert (v.layout, v.attention, v.format, v.root, v.archive) == ("apple", attention, fmt, vid, False)
        assert v.unet_forms == ("full", "chunked") and v.unet_form == "full"
        assert v.components == expected_components
        assert not v.partial and v.tags == () and v.resolution is None
        if fmt == "compiled":
            assert bundles_in(v) == SD1_COMPILED | ({"SafetyChecker.mlmodelc"} if safety else set())
            assert v.tokenizer_files == ("merges.txt", "vocab.json")
            assert f"{vid}/merges.txt" in v.files and f"{vid}/vocab.json" in v.files
            assert v.model_version is None
        else:
            slug = model.replace("/", "_")
            comps = ["text_encoder", "unet", "vae_decoder", "vae_encoder"] + (["safety_checker"] if safety else [])
            assert bundles_in(v) == {f"Stable_Diffusion_version_{slug}_{c}.mlpackage" for c in comps}
            assert v.tokenizer_files == ()
            assert v.model_version == model


def test_v1_5_sizes_and_exact_file_set() -> None:
    files = load("apple__coreml-stable-diffusion-v1-5")
    v = by_id("apple__coreml-stable-diffusion-v1-5")["split_einsum/compiled"]
    total = folder_total(files, "split_einsum/compiled")
    assert 4.465e9 <= total < 4.475e9  # ARCHITECTURE.md: about 4.47 GB with both Unet forms
    assert 4.455e9 <= folder_total(files, "original/compiled") < 4.465e9
    chunks = sum(f.size for f in files if f.path.startswith("split_einsum/compiled/UnetChunk"))
    unet = sum(f.size for f in files if f.path.startswith("split_einsum/compiled/Unet.mlmodelc/"))
    assert v.size_bytes == total - chunks
    assert chunks > 1.7e9  # what a pull that took both forms would waste
    expected = [
        f"split_einsum/compiled/{bundle}.mlmodelc/{inner}"
        for bundle in ("SafetyChecker", "TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")
        for inner in ("analytics/coremldata.bin", "coremldata.bin", "metadata.json", "model.mil", "weights/weight.bin")
    ] + ["split_einsum/compiled/merges.txt", "split_einsum/compiled/vocab.json"]
    assert list(v.files) == sorted(expected)

    chunked = v.with_unet_form("chunked")
    assert chunked.id == v.id and chunked.unet_form == "chunked"
    assert bundles_in(chunked) == {"SafetyChecker.mlmodelc", "TextEncoder.mlmodelc", "UnetChunk1.mlmodelc",
                                   "UnetChunk2.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc"}
    assert chunked.components == ("text_encoder", "unet_chunk1", "unet_chunk2", "vae_decoder", "vae_encoder",
                                  "safety_checker")
    assert chunked.size_bytes == total - unet
    assert chunked.with_unet_form("full").files == v.files


def test_packages_forms() -> None:
    v = by_id("apple__coreml-stable-diffusion-v1-5")["original/packages"]
    full = {p.split("/")[2] for p in v.files}
    chunked = {p.split("/")[2] for p in v.with_unet_form("chunked").files}
    slug = "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5"
    assert f"{slug}_unet.mlpackage" in full and not any("chunk" in n for n in full)
    assert {f"{slug}_unet_chunk1.mlpackage", f"{slug}_unet_chunk2.mlpackage"} <= chunked
    assert f"{slug}_unet.mlpackage" not in chunked


# ---------------------------------------------------------------- SDXL, palettized, mixed-bit

def test_sdxl() -> None:
    variants = by_id("apple__coreml-stable-diffusion-xl-base")
    comps = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
    compiled, packages, zipped = (variants[k] for k in ("original/compiled", "original/packages", "original/compiled+zip"))
    assert compiled.root == "compiled" and packages.root == "packages"
    for v in (compiled, packages):
        assert v.attention == "original" and v.extra["attention_from"] == "default"
        assert v.components == comps and v.unet_forms == ("full",)
    assert "TextEncoder2.mlmodelc" in bundles_in(compiled)
    assert packages.model_version == "stabilityai/stable-diffusion-xl-base-1.0"
    assert zipped.archive and zipped.files == ("coreml-stable-diffusion-xl-base_original_compiled.zip",)
    assert zipped.layout == "archives" and zipped.components == comps
    assert zipped.extra["components_from"] == "folder:compiled" and zipped.extra["mirror_of"] == "original/compiled"


def test_sdxl_with_refiner() -> None:
    variants = by_id("apple__coreml-stable-diffusion-xl-base-with-refiner")
    for v in variants.values():
        assert v.components == ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "refiner")
    assert "UnetRefiner.mlmodelc" in bundles_in(variants["original/compiled"])
    assert ("Stable_Diffusion_version_stabilityai_stable-diffusion-xl-base-1.0_refiner.mlpackage"
            in bundles_in(variants["original/packages"]))


def test_sd3_argmax_zips_and_the_separate_t5() -> None:
    """argmaxinc's SD3 repos: a root zip of the Swift resources; the 512 repo keeps T5 beside it, on its own."""
    variants = by_id("argmaxinc__coreml-stable-diffusion-3-medium")
    main = variants["original/compiled"]
    assert main.layout == "archives" and main.archive and not main.partial
    assert main.components == ("text_encoder", "text_encoder_2", "mmdit", "vae_decoder")
    assert main.files == ("coreml-stable-diffusion-3-medium_original_compiled.zip",)  # the 9.5 GB T5 stays out
    t5 = variants["original/compiled+partial"]
    assert t5.partial and t5.components == ("text_encoder_t5",)
    assert bundles_in(t5) == {"TextEncoderT5.mlmodelc"}
    with_t5 = by_id("argmaxinc__coreml-stable-diffusion-3-medium-1024-t5")["original/compiled"]
    assert with_t5.components == ("text_encoder", "text_encoder_2", "text_encoder_t5", "mmdit", "vae_decoder")


def test_sd3_bundle_roles_and_folder_variant() -> None:
    """Converted SD3 folders (compiled or packages) are complete variants with Apple's names."""
    compiled = [RepoFile(f"Resources/{name}.mlmodelc/model.mil", 10) for name in
                ("TextEncoder", "TextEncoder2", "TextEncoderT5", "MultiModalDiffusionTransformer", "VAEDecoder")]
    compiled += [RepoFile(f"Resources/{name}", 10) for name in ("vocab.json", "merges.txt", "tokenizer.json")]
    prefix = "original/packages/Stable_Diffusion_version_stabilityai_stable-diffusion-3-medium-diffusers"
    packages = [RepoFile(f"{prefix}_{c}.mlpackage/Manifest.json", 10)
                for c in ("text_encoder", "text_encoder_2", "text_encoder_t5", "mmdit", "vae_decoder", "vae_encoder")]
    (flat,) = find_flat_variants(compiled)
    assert not flat.partial and "tokenizer.json" in flat.tokenizer_files
    assert flat.components == ("text_encoder", "text_encoder_2", "text_encoder_t5", "mmdit", "vae_decoder")
    (apple,) = find_apple_variants(packages)
    assert not apple.partial and apple.model_version == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert "mmdit" in apple.components and "text_encoder_t5" in apple.components


@pytest.mark.parametrize("name", ["apple__coreml-stable-diffusion-v1-5-palettized",
                                  "apple__coreml-stable-diffusion-2-1-base-palettized"])
def test_palettized(name: str) -> None:
    variants = by_id(name)
    repo = name.split("__")[1]
    v2 = variants["split_einsum_v2/compiled+zip"]
    assert v2.files == (f"{repo}_split_einsum_v2_compiled.zip",)
    assert v2.attention == "split_einsum_v2" and v2.archive and v2.unet_form is None
    assert v2.components == variants["split_einsum_v2/compiled"].components
    assert variants["original/compiled+zip"].extra["mirror_of"] == "original/compiled"
    assert variants["split_einsum_v2/compiled"].unet_forms == ("full",)


def test_mixed_bit() -> None:
    files = load("apple__coreml-stable-diffusion-mixed-bit-palettization")
    variants = by_id("apple__coreml-stable-diffusion-mixed-bit-palettization")
    everything = {p for v in variants.values() for p in v.files}
    assert not any(p.startswith("recipes/") for p in everything)

    pipe = variants["original/compiled+mbp-4.50+palettized"]
    assert pipe.root == "coreml-stable-diffusion-xl-base_mbp_4_50_palettized/compiled" and not pipe.partial
    assert pipe.components == ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
    assert variants["original/packages+mbp-4.50+palettized"].model_version == "stabilityai/stable-diffusion-xl-base-1.0"

    lone = variants["original/compiled+mbp-4.50+palettized+unet-only"]
    assert lone.partial and lone.components == ("unet",) and lone.to_dict()["partial"] is True
    assert lone.root == "unet-mbp-sdxl-1-base/recipe_4_50_bit_mixedpalette"
    assert bundles_in(lone) == {"Unet.mlmodelc"}
    assert bundles_in(variants["original/packages+mbp-4.50+palettized+unet-only"]) == {"Unet.mlpackage"}

    zipped = variants["original/compiled+mbp-4.50+palettized+zip"]
    assert zipped.size_bytes == 6_711_666_087
    assert zipped.extra["mirror_of"] == pipe.id
    assert everything == {f.path for f in files} - {".gitattributes", "README.md"} - {
        f.path for f in files if f.path.startswith("recipes/")}


# ---------------------------------------------------------------- zip mirrors and community zips

def test_pcuenq_mirror() -> None:
    variants = by_id("pcuenq__coreml-stable-diffusion-v1-5")
    v = variants["split_einsum/compiled"]
    assert v.files == ("coreml-stable-diffusion-v1-5_split_einsum_compiled.zip",)
    assert v.extra["components_from"] == "archive-name"
    assert v.components == ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    assert v.tokenizer_files == ("merges.txt", "vocab.json")


@pytest.mark.parametrize(
    ("name", "vid", "path", "resolution", "tags", "components"),
    [
        ("coreml-community__coreml-stable-diffusion-v1-5", "split_einsum/compiled",
         "split_einsum/stable-diffusion-v1-5_split-einsum_compiled.zip", None, (),
         ("text_encoder", "unet", "vae_decoder", "vae_encoder")),
        ("coreml-community__coreml-stable-diffusion-v1-5", "original/compiled@512x768",
         "original/512x768/stable-diffusion-v1-5_original_512x768_compiled.zip", "512x768", (),
         ("text_encoder", "unet", "vae_decoder", "vae_encoder")),
        ("coreml-community__coreml-stable-diffusion-2-1-base", "original/compiled@512x768+no-i2i",
         "original/512x768/stable-diffusion-v2.1-base_no-i2i_original_512x768.zip", "512x768", ("no-i2i",),
         ("text_encoder", "unet", "vae_decoder")),
        ("coreml-community__coreml-animagine-xl-3.1", "split_einsum/compiled@768x1024+6bit",
         "split-einsum/768x1024/animagine-xl-3.1_split-einsum_6bit_768x1024.zip", "768x1024", ("6bit",),
         ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")),
        ("coreml-community__coreml-AnythingXL", "split_einsum/compiled@1024x1024+6bit",
         "split-einsum/1024x1024/AnythingX_split-einsum_6bit_1024x1024.zip", "1024x1024", ("6bit",),
         ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")),
        ("coreml-community__coreml-MeinaMix", "original/compiled@512x512+cn",
         "original/512x512/MeinaMix v9.0 Original 512x512 For ControlNet.zip", "512x512", ("cn",),
         ("text_encoder", "unet", "vae_decoder", "vae_encoder", "controlnet")),
        ("coreml-community__coreml-stable-diffusion-v1-5_cn", "split_einsum/compiled+cn",
         "split_einsum/stable-diffusion-_v1-5_split-einsum_cn.zip", None, ("cn",),
         ("text_encoder", "unet", "vae_decoder", "vae_encoder", "controlnet")),
    ],
)
def test_community(name, vid, path, resolution, tags, components) -> None:  # type: ignore[no-untyped-def]
    files = load(name)
    v = by_id(name)[vid]
    assert (v.layout, v.archive, v.root, v.files) == ("archives", True, path, (path,))
    assert v.resolution == resolution and v.tags == tags and v.format == "compiled"
    assert v.components == components and v.extra["components_from"] == "archive-name"
    assert v.size_bytes == next(f.size for f in files if f.path == path)
    assert v.unet_form is None and v.unet_forms == ()
    with pytest.raises(VariantNotFound):
        v.with_unet_form("chunked")


# ---------------------------------------------------------------- flat and unknown

def test_flat_root() -> None:
    v = by_id("flat__root-compiled")["original/compiled"]
    assert v.layout == "flat" and v.root == "" and v.extra["attention_from"] == "default"
    assert bundles_in(v) == SD1_COMPILED
    assert "README.md" not in v.files and "sample.png" not in v.files and ".gitattributes" not in v.files
    assert v.tokenizer_files == ("merges.txt", "vocab.json")


def test_flat_folder_detected_by_content() -> None:
    v = by_id("flat__mlpackages-folder")["original/compiled"]
    assert v.root == "mlpackages" and v.format == "compiled" and v.extra["format_from"] == "content"
    assert bundles_in(v) == SD1_COMPILED


def test_flat_packages_chunked_only() -> None:
    v = by_id("flat__packages-folder")["original/packages"]
    assert v.unet_forms == ("chunked",) and v.unet_form == "chunked"
    assert v.model_version == "prompthero/openjourney-v4"
    assert "unet_chunk1" in v.components and "unet" not in v.components


def test_layouts_stay_in_their_lane() -> None:
    apple = load("apple__coreml-stable-diffusion-v1-5")
    assert find_flat_variants(apple) == []
    assert find_archive_variants(apple) == []  # no zip in that repo
    community = load("coreml-community__coreml-stable-diffusion-v1-5")
    assert find_apple_variants(community) == [] and find_flat_variants(community) == []
    flat = load("flat__root-compiled")
    assert find_apple_variants(flat) == [] and find_archive_variants(flat) == []


@pytest.mark.parametrize(("files", "plain_ids"), [
    ([], []),
    ([RepoFile("README.md", 10)], []),
    (load("runwayml__stable-diffusion-v1-5-diffusers"), []),
    # no attention/format in the name; a zipped bundle is a plain model, not a pipeline
    ([RepoFile("data.zip", 100), RepoFile("weights/model.mlmodelc.zip", 100)], ["weights/model"]),
    ([RepoFile("Resnet50.mlmodelc/model.mil", 10), RepoFile("Resnet50.mlmodelc/coremldata.bin", 10)],
     ["Resnet50"]),  # not SD: a plain model
    ([RepoFile("compiled/notes.txt", 1)], []),
])
def test_unknown_layouts_give_nothing(files: list[RepoFile], plain_ids: list[str]) -> None:
    for finder in FINDERS:
        assert finder(files) == []
    found = find_variants(files)
    assert [v.id for v in found] == plain_ids and all(v.layout == "plain" for v in found)


def test_dedupe_of_colliding_flat_folders() -> None:
    def bundle_set(folder: str) -> list[RepoFile]:
        return [RepoFile(f"{folder}/{n}.mlmodelc/model.mil", 5) for n in ("TextEncoder", "Unet", "VAEDecoder")]

    variants = find_flat_variants(bundle_set("a-model") + bundle_set("b-model"))
    assert sorted(v.id for v in variants) == ["original/compiled+a-model", "original/compiled+b-model"]


def test_controlled_unet_and_controlnet_folder() -> None:
    names = ["TextEncoder", "ControlledUnet", "VAEDecoder"]
    files = [RepoFile(f"original/compiled/{n}.mlmodelc/model.mil", 5) for n in names]
    files.append(RepoFile("original/compiled/controlnet/LllyasvielSdControlnetCanny.mlmodelc/model.mil", 7))
    (v,) = find_apple_variants(files)
    assert v.components == ("text_encoder", "unet", "vae_decoder", "controlnet")
    # ControlNets are named by the variant but fetched only when asked (`pull --controlnet`)
    assert v.controlnets == ("LllyasvielSdControlnetCanny",)
    assert not any("/controlnet/" in path for path in v.files)


def test_both_forms_checker_bites() -> None:
    assert both_unet_forms({"Unet.mlmodelc", "UnetChunk1.mlmodelc"})
    assert both_unet_forms({"ControlledUnet.mlmodelc", "ControlledUnetChunk2.mlmodelc"})
    assert not both_unet_forms({"UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc", "ControlledUnet.mlmodelc"})


def test_secondary_unets_follow_the_form() -> None:
    names = ["TextEncoder", "Unet", "UnetChunk1", "UnetChunk2", "ControlledUnet", "ControlledUnetChunk1",
             "ControlledUnetChunk2", "UnetRefiner", "VAEDecoder"]
    (v,) = find_apple_variants([RepoFile(f"compiled/{n}.mlmodelc/model.mil", 1) for n in names])
    assert bundles_in(v) == {"TextEncoder.mlmodelc", "Unet.mlmodelc", "ControlledUnet.mlmodelc",
                             "UnetRefiner.mlmodelc", "VAEDecoder.mlmodelc"}
    assert bundles_in(v.with_unet_form("chunked")) == {
        "TextEncoder.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc", "ControlledUnetChunk1.mlmodelc",
        "ControlledUnetChunk2.mlmodelc", "UnetRefiner.mlmodelc", "VAEDecoder.mlmodelc"}
    assert v.components == ("text_encoder", "unet", "vae_decoder", "controlnet", "refiner")


def test_partial_tags() -> None:
    only_controlnet = find_flat_variants([RepoFile("ControlNet_lllyasviel_sd-controlnet-canny.mlpackage/Manifest.json", 1)])
    assert [(v.id, v.partial, v.components) for v in only_controlnet] == [
        ("original/packages+partial", True, ("controlnet",))]
    no_vae = find_flat_variants([RepoFile(f"{n}.mlmodelc/model.mil", 1) for n in ("TextEncoder", "Unet")])
    assert [v.id for v in no_vae] == ["original/compiled+partial"]


def test_lone_chunk_is_not_fetched() -> None:
    files = [RepoFile(f"split_einsum/compiled/{n}.mlmodelc/model.mil", 5)
             for n in ("TextEncoder", "Unet", "UnetChunk1", "VAEDecoder")]
    (v,) = find_apple_variants(files)
    assert v.unet_forms == ("full",)
    assert not any("UnetChunk1" in p for p in v.files)
    assert v.extra["ignored"] == ["split_einsum/compiled/UnetChunk1.mlmodelc"]


# ---------------------------------------------------------------- naming rules

@pytest.mark.parametrize(("slug", "model"), [
    ("runwayml_stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    ("CompVis_stable-diffusion-v1-4", "CompVis/stable-diffusion-v1-4"),
    ("stabilityai_stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base"),
    ("stabilityai_stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("my-org_model_with_underscores", "my-org/model_with_underscores"),
    ("._local_diffusers", None),
    ("nounderscore", None),
])
def test_decode_model_version(slug: str, model: str | None) -> None:
    assert decode_model_version(slug) == model


@pytest.mark.parametrize(("name", "role", "model"), [
    ("Stable_Diffusion_version_stabilityai_stable-diffusion-xl-base-1.0_text_encoder_2", "text_encoder_2",
     "stabilityai/stable-diffusion-xl-base-1.0"),
    ("Stable_Diffusion_version_stabilityai_stable-diffusion-xl-base-1.0_text_encoder", "text_encoder",
     "stabilityai/stable-diffusion-xl-base-1.0"),
    ("Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_unet_chunk2", "unet_chunk2",
     "runwayml/stable-diffusion-v1-5"),
    ("Stable_Diffusion_version_my-org_a_vae_model_vae_encoder", "vae_encoder", "my-org/a_vae_model"),
    ("Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_control-unet", "controlled_unet",
     "runwayml/stable-diffusion-v1-5"),
    ("UnetChunk1", "unet_chunk1", None),
    ("Stable_Diffusion_version_unet", None, None),
])
def test_bundle_roles(name: str, role: str | None, model: str | None) -> None:
    (bundle,), _ = find_bundles([RepoFile(f"{name}.mlpackage/Manifest.json", 1)])
    assert bundle.kind == "packages"
    assert bundle_role(bundle) == (role, model)


@pytest.mark.parametrize(("text", "tags"), [
    ("AnythingX_split-einsum_6bit_1024x1024", ["6bit"]),
    ("crystalClearXL_original_SDXL_8-bit", ["8bit"]),
    ("unet-mbp-sdxl-1-base/recipe_4_50_bit_mixedpalette", ["mbp-4.50", "palettized"]),
    ("coreml-stable-diffusion-xl-base_mbp_4_50_palettized", ["mbp-4.50", "palettized"]),
    ("stable-diffusion-v2.1-base_no-i2i_original_512x768", ["no-i2i"]),
    ("MeinaMix v9.0 Original 512x512 For ControlNet", ["cn"]),
    ("stable-diffusion-_v1-5_split-einsum_cn", ["cn"]),
    ("coreml-stable-diffusion-v1-5", []),
])
def test_tags(text: str, tags: list[str]) -> None:
    assert tags_in(text) == tags


def test_glob_escape_is_exact() -> None:
    paths = ["a[1]/x*.zip", "a1/xy.zip", "a[1]/x?.zip", "a[1]/xa.zip"]
    for path in paths:
        assert [p for p in paths if fnmatch.fnmatch(p, glob_escape(path))] == [path]


# ---------------------------------------------------------------- never raises

garbage_files = st.lists(
    st.builds(RepoFile, st.text(max_size=60), st.one_of(st.integers(-5, 10**12), st.none())),
    max_size=40,
)

SEGMENTS = st.sampled_from([
    "original", "split_einsum", "split-einsum", "split_einsum_v2", "compiled", "packages", "mlpackages",
    "controlnet", "512x768", "Resources", "analytics", "weights", "Data", "com.apple.CoreML", "__MACOSX", "..", "",
    "TextEncoder.mlmodelc", "TextEncoder2.mlmodelc", "Unet.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc",
    "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc", "SafetyChecker.mlmodelc", "ControlledUnet.mlmodelc",
    "UnetRefiner.mlmodelc", "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_unet.mlpackage",
    "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_unet_chunk1.mlpackage",
    "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_unet_chunk2.mlpackage",
    "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_text_encoder.mlpackage",
    "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_vae_decoder.mlpackage",
    "model.mil", "coremldata.bin", "metadata.json", "weight.bin", "Manifest.json", "model.mlmodel",
    "merges.txt", "vocab.json", "README.md", "x_original_compiled.zip", "y_split-einsum_6bit_768x768.zip",
    "z_split_einsum_compiled.zip", "Name With Spaces Original 512x512 For ControlNet.zip", "a.mlmodelc.zip",
])
structured_files = st.lists(
    st.builds(RepoFile, st.lists(SEGMENTS, min_size=1, max_size=5).map("/".join), st.integers(0, 10**10)),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage_files)
def test_garbage_never_raises(files: list[RepoFile]) -> None:
    # the unguarded finders: the guard in `variants()` must not be what keeps this green
    for finder in FINDERS:
        for variant in finder(files):
            assert variant.size_bytes >= 0 and variant.to_dict()["files"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structured_files)
def test_structured_lists_keep_invariants(files: list[RepoFile]) -> None:
    variants = [v for finder in FINDERS for v in finder(files)]
    ids = [v.id for v in variants]
    assert len(ids) == len(set(ids))
    listed = {f.path for f in files}
    owners: dict[str, str] = {}
    for v in variants:
        assert set(v.files) <= listed
        for path in v.files:
            assert path not in owners
            owners[path] = v.id
        for form in v.unet_forms:
            assert not both_unet_forms(bundles_in(v.with_unet_form(form)))


# ---------------------------------------------------------------- materialize

def write_tree(root: Path, paths: list[str]) -> None:
    for path in paths:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.encode())


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("form", ["full", "chunked"])
def test_materialize_folder_variant(tmp_path: Path, form: str) -> None:
    files = load("apple__coreml-stable-diffusion-v1-5")
    downloaded = tmp_path / "download"
    variant = by_id("apple__coreml-stable-diffusion-v1-5")["split_einsum/compiled"].with_unet_form(form)
    write_tree(downloaded, list(variant.files))
    dest = tmp_path / "models" / "variant"
    layouts()["apple"].materialize(downloaded, variant, dest)

    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == sorted(p[len("split_einsum/compiled/"):] for p in variant.files)
    assert {p.name for p in dest.iterdir()} == {b for b in bundles_in(variant)} | {"merges.txt", "vocab.json"}
    assert (dest / "VAEDecoder.mlmodelc/weights/weight.bin").read_bytes() == \
        b"split_einsum/compiled/VAEDecoder.mlmodelc/weights/weight.bin"
    assert not any(p.is_file() for p in downloaded.rglob("*")), "files were copied, not moved"
    assert leftovers(dest.parent) == []
    assert len(files) > len(variant.files)


def test_materialize_copies_symlinked_sources(tmp_path: Path) -> None:
    variant = by_id("flat__root-compiled")["original/compiled"]
    blobs, downloaded = tmp_path / "blobs", tmp_path / "download"
    for i, path in enumerate(variant.files):
        blob = blobs / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(path.encode())
        link = downloaded / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    dest = tmp_path / "dest"
    layouts()["flat"].materialize(downloaded, variant, dest)
    for path in variant.files:
        assert not (dest / path).is_symlink() and (dest / path).read_bytes() == path.encode()
    assert len(list(blobs.iterdir())) == len(variant.files)  # the cache's blobs are left alone


def test_materialize_missing_file(tmp_path: Path) -> None:
    variant = by_id("flat__root-compiled")["original/compiled"]
    write_tree(tmp_path / "download", list(variant.files)[1:])
    with pytest.raises(EntryNotFound):
        layouts()["flat"].materialize(tmp_path / "download", variant, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and leftovers(tmp_path) == []


def test_materialize_refuses_non_empty_dest(tmp_path: Path) -> None:
    variant = by_id("flat__root-compiled")["original/compiled"]
    write_tree(tmp_path / "download", list(variant.files))
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep.txt").write_text("x")
    with pytest.raises(CoremlHubError):
        layouts()["flat"].materialize(tmp_path / "download", variant, tmp_path / "dest")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["keep.txt"]


def make_zip(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            if name.endswith("/"):
                zf.writestr(name, b"")
            else:
                zf.writestr(name, name.encode() * 3)


SDXL_COMPILED = ["TextEncoder", "TextEncoder2", "Unet", "VAEDecoder", "VAEEncoder"]
INNER = ["model.mil", "coremldata.bin", "metadata.json", "analytics/coremldata.bin", "weights/weight.bin"]


def test_materialize_mixed_bit_zip_picks_compiled(tmp_path: Path) -> None:
    variant = by_id("apple__coreml-stable-diffusion-mixed-bit-palettization")["original/compiled+mbp-4.50+palettized+zip"]
    top = "coreml-stable-diffusion-mixed-bit-palettization_original_compiled/"
    names = [f"{top}compiled/{b}.mlmodelc/{i}" for b in SDXL_COMPILED for i in INNER]
    names += [f"{top}compiled/merges.txt", f"{top}compiled/vocab.json"]
    slug = "Stable_Diffusion_version_stabilityai_stable-diffusion-xl-base-1.0"
    names += [f"{top}packages/{slug}_{c}.mlpackage/Manifest.json" for c in ("text_encoder", "unet", "vae_decoder")]
    names += ["__MACOSX/._junk", f"{top}compiled/.DS_Store"]
    make_zip(tmp_path / "download" / variant.root, names)

    seen: list[tuple[int, int]] = []
    dest = tmp_path / "models" / "v"
    layouts()["archives"].materialize(tmp_path / "download", variant, dest, progress=lambda d, t: seen.append((d, t)))
    assert sorted(p.name for p in dest.iterdir()) == sorted([f"{b}.mlmodelc" for b in SDXL_COMPILED]
                                                            + ["merges.txt", "vocab.json"])
    assert (dest / "Unet.mlmodelc/weights/weight.bin").read_bytes() == \
        f"{top}compiled/Unet.mlmodelc/weights/weight.bin".encode() * 3
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert leftovers(dest.parent) == []
    assert (tmp_path / "download" / variant.root).is_file()  # the store decides when the zip goes


def test_materialize_community_zip_with_spaces(tmp_path: Path) -> None:
    variant = by_id("coreml-community__coreml-MeinaMix")["original/compiled@512x512+cn"]
    top = "MeinaMix v9.0 Original 512x512 For ControlNet/"
    names = [f"{top}{b}.mlmodelc/{i}" for b in ("TextEncoder", "ControlledUnet", "Unet", "VAEDecoder") for i in INNER]
    names += [f"{top}merges.txt", f"{top}vocab.json"]
    make_zip(tmp_path / "dl" / variant.root, names)
    dest = tmp_path / "dest"
    layouts()["archives"].materialize(tmp_path / "dl", variant, dest)
    assert {p.name for p in dest.iterdir()} == {"TextEncoder.mlmodelc", "ControlledUnet.mlmodelc", "Unet.mlmodelc",
                                                 "VAEDecoder.mlmodelc", "merges.txt", "vocab.json"}


def test_materialize_flat_zip(tmp_path: Path) -> None:
    variant = by_id("pcuenq__coreml-stable-diffusion-v1-5")["original/compiled"]
    names = [f"{b}.mlmodelc/{i}" for b in ("TextEncoder", "Unet", "VAEDecoder") for i in INNER] + ["vocab.json"]
    make_zip(tmp_path / "dl" / variant.root, names)
    layouts()["archives"].materialize(tmp_path / "dl", variant, tmp_path / "dest")
    assert {p.name for p in (tmp_path / "dest").iterdir()} == {"TextEncoder.mlmodelc", "Unet.mlmodelc",
                                                                "VAEDecoder.mlmodelc", "vocab.json"}


def test_materialize_zip_without_the_format(tmp_path: Path) -> None:
    variant = by_id("pcuenq__coreml-stable-diffusion-v1-5")["original/compiled"]
    make_zip(tmp_path / "dl" / variant.root, ["x/Stable_Diffusion_version_a_b_unet.mlpackage/Manifest.json"])
    with pytest.raises(InvalidBundle):
        layouts()["archives"].materialize(tmp_path / "dl", variant, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and leftovers(tmp_path) == []


def test_materialize_unsafe_zip_leaves_nothing(tmp_path: Path) -> None:
    variant = by_id("pcuenq__coreml-stable-diffusion-v1-5")["original/compiled"]
    make_zip(tmp_path / "dl" / variant.root, ["Unet.mlmodelc/model.mil", "../escape.txt"])
    with pytest.raises(UnsafeArchive):
        layouts()["archives"].materialize(tmp_path / "dl", variant, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dl" / "escape.txt").exists()

