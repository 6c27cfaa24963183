"""Where ControlNets live on the Hub, from real repo file lists (tests/data/layouts): Apple's
`controlnet/<Name>.mlmodelc` beside compiled bundles, `ControlNet_*.mlpackage` beside packages (both as
torch2coreml writes them), and coreml-community's collection of zips under `CN/`."""

from __future__ import annotations

from pathlib import Path

import pytest

from coreml_hub.controlnets import ControlNetNotFound, choose_entry, split_request
from coreml_hub.errors import UsageError
from coreml_hub.layouts import RepoFile, controlnet_base_key, controlnet_bundle_name, controlnet_key, \
    find_controlnets, find_variants

DATA = Path(__file__).parent / "data" / "layouts"


def load(name: str) -> list[RepoFile]:
    rows = (line.split("\t") for line in (DATA / f"{name}.txt").read_text().splitlines() if line.strip())
    return [RepoFile(path, int(size)) for path, size in rows]


def test_apple_names_and_keys() -> None:
    assert controlnet_bundle_name("lllyasviel/sd-controlnet-canny") == "LllyasvielSdControlnetCanny"
    assert controlnet_bundle_name("lllyasviel/control_v11p_sd15_inpaint") == "LllyasvielControlV11PSd15Inpaint"
    same = {controlnet_key(n) for n in ("LllyasvielSdControlnetCanny", "lllyasviel_sd-controlnet-canny",
                                        "ControlNet_lllyasviel_sd-controlnet-canny.mlpackage",
                                        "lllyasviel/sd-controlnet-canny")}
    assert len(same) == 1
    assert controlnet_base_key("Canny_split-einsum_512x512") == controlnet_base_key("Canny") == "canny"


def test_torch2coreml_output_keeps_controlnets_out_of_the_variants() -> None:
    files = load("flat__torch2coreml-controlnet")
    variants = {v.id: v for v in find_variants(files)}
    compiled, packages = variants["original/compiled"], variants["original/packages"]
    assert compiled.controlnets == ("LllyasvielSdControlnetCanny", "LllyasvielSdControlnetDepth")
    assert packages.controlnets == ("lllyasviel_sd-controlnet-canny", "lllyasviel_sd-controlnet-depth")
    for v in (compiled, packages):
        assert "controlnet" in v.components  # the controlled Unet rides with the variant
        assert not any("controlnet/" in f or "/ControlNet_" in f or f.startswith("ControlNet_") for f in v.files)
    assert any("ControlledUnet.mlmodelc" in f for f in compiled.files)
    entries = {(e.name, e.folder, e.format) for e in find_controlnets(files)}
    assert entries == {("LllyasvielSdControlnetCanny", "Resources", "compiled"),
                       ("LllyasvielSdControlnetDepth", "Resources", "compiled"),
                       ("lllyasviel_sd-controlnet-canny", "", "packages"),
                       ("lllyasviel_sd-controlnet-depth", "", "packages")}
    canny = next(e for e in find_controlnets(files) if e.name == "LllyasvielSdControlnetCanny")
    assert all(f.path.startswith("Resources/controlnet/LllyasvielSdControlnetCanny.mlmodelc/") for f in canny.files)
    assert len(canny.files) == 5 and canny.size_bytes > 700_000_000


def test_community_controlnet_collection() -> None:
    files = load("coreml-community__ControlNet-Models-For-Core-ML")
    assert find_variants(files) == []  # no zip of it is taken for a pipeline
    entries = find_controlnets(files)
    assert len(entries) == 56 and all(e.archive and e.format == "compiled" for e in entries)
    kinds = {controlnet_base_key(e.name) for e in entries}
    assert {"canny", "depth", "inpaint", "openpose", "tile"} <= kinds and len(kinds) == 14

    def pick(name: str, attention: str, resolution: str | None) -> str:
        return choose_entry(entries, name, folder=None, fmt="compiled", attention=attention, resolution=resolution,
                            repo="coreml-community/ControlNet-Models-For-Core-ML").root

    assert pick("Canny", "split_einsum", None) == "CN/split-einsum/512x512/Canny_split-einsum_512x512.zip"
    assert pick("canny", "original", "512x768") == "CN/original/512x768/Canny_original_512x768.zip"
    assert pick("Canny_original_768x512", "split_einsum", None) == "CN/original/768x512/Canny_original_768x512.zip"
    with pytest.raises(ControlNetNotFound, match="has no ControlNet named 'Sketch'.*Canny"):
        pick("Sketch", "original", None)


def test_controlnet_requests() -> None:
    assert split_request("Canny", "apple/x") == ("apple/x", "Canny")
    assert split_request("coreml-community/ControlNet-Models-For-Core-ML:Canny", "apple/x") == (
        "coreml-community/ControlNet-Models-For-Core-ML", "Canny")
    with pytest.raises(UsageError):
        split_request(":Canny", "apple/x")
