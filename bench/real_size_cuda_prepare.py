"""Build what bench/real_size_cuda.sh needs on a GPU machine (run here, where coremltools converts).

Writes into OUT (default bench-carry/), small enough to travel with the checkout (64 MiB in all):

- `cuda-fixtures.tar.gz`: the tiny compiled SD1/SDXL components and the source modules' outputs
  that the CUDA parity tests read (bench/runtime_cuda_prepare.py makes them)
- `sd15-512-original.carry.tar.gz` (and `-split_einsum` with `--split-einsum`): the real-size
  conversion with its weights zeroed plus the map that regenerates them from the seed
  (bench/real_size.py --carry); the GPU machine rebuilds the diffusers source from the same seed
- `sdxl-1024-original.carry.tar.gz` with `--sdxl`: needs a machine that can convert SDXL's Unet
  (about 28 GB of memory for the conversion; the 24 GB box here cannot)

- `wheels/` with `--wheels`: what the benchmark imports besides torch, for a machine without it

    python bench/real_size_cuda_prepare.py [OUT] [--split-einsum] [--sdxl] [--tiny] [--wheels]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def carry(out: Path, model: str, attention: str) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "real_size.py"), "--model", model, "--attention", attention,
           "--prepare-only", "--carry", str(out)]
    print("+ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


# What the benchmark imports besides torch and numpy, for a GPU machine that lacks them (installed
# from the carry, offline, only when an import fails). Compiled ones for CPython 3.10-3.12.
WHEELS = ("diffusers", "transformers", "tokenizers", "safetensors", "huggingface_hub", "hf_xet", "pluggy",
          "platformdirs", "filelock", "tqdm", "click", "packaging", "pytest", "iniconfig", "httpx", "httpcore",
          "h11", "anyio", "sniffio", "idna", "certifi", "typing_extensions", "fsspec", "pillow", "regex",
          "pyyaml", "requests", "urllib3", "charset_normalizer", "importlib_metadata", "zipp", "jinja2",
          "markupsafe", "sympy", "mpmath", "networkx", "typer", "shellingham", "rich", "markdown_it_py", "mdurl",
          "pygments", "annotated_doc", "safetensors", "exceptiongroup", "tomli")
BINARY = ("tokenizers", "safetensors", "hf_xet", "pillow", "regex", "pyyaml", "charset_normalizer", "markupsafe")


def wheels(dest: Path) -> None:
    """The installed versions of WHEELS as wheels (pip's cache answers most; PyPI the rest)."""
    from importlib import metadata

    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(set(WHEELS)):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        pythons = ("3.10", "3.11", "3.12") if name in BINARY else ("3.11",)
        for py in pythons:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", py, "--platform", "manylinux2014_x86_64", "--platform",
                   "manylinux_2_28_x86_64", "-d", str(dest), f"{name}=={version}"]
            if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
                print(f"  no wheel of {name}=={version} for Python {py}", file=sys.stderr)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(args[0] if args else ROOT / "bench-carry")
    out.mkdir(parents=True, exist_ok=True)
    fixtures = out / "cuda-fixtures.tar.gz"
    if not fixtures.is_file():
        import runtime_cuda_prepare

        print("tiny CUDA fixtures ...", file=sys.stderr, flush=True)
        runtime_cuda_prepare.tiny_fixtures(fixtures)
    if "--wheels" in sys.argv:
        print("wheels ...", file=sys.stderr, flush=True)
        wheels(out / "wheels")
    if "--tiny" in sys.argv:  # SD 1.5's structure at toy widths, for dry runs (DEVICE=cpu)
        carry(out, "tiny", "original")
    if "--tiny-only" in sys.argv:
        return
    carry(out, "sd15", "original")
    if "--split-einsum" in sys.argv:
        carry(out, "sd15", "split_einsum")
    if "--sdxl" in sys.argv:
        carry(out, "sdxl", "original")
    total = 0
    for path in sorted(out.rglob("*")):
        if path.is_file():
            total += path.stat().st_size
            print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")
    print(f"total {total / 2**20:.1f} MiB (the checkout and this folder must stay under 64 MiB together)")


if __name__ == "__main__":
    main()
