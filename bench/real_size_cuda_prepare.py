"""Build what bench/real_size_cuda.sh needs on a GPU machine (run here, where coremltools converts).

Writes into OUT (default bench-carry/), small enough to travel with the checkout (64 MiB in all):

- `cuda-fixtures.tar.gz`: the tiny compiled SD1/SDXL components and the source modules' outputs
  that the CUDA parity tests read (bench/runtime_cuda_prepare.py makes them)
- `sd15-512-original.carry.tar.gz` (and `-split_einsum` with `--split-einsum`): the real-size
  conversion with its weights zeroed plus the map that regenerates them from the seed
  (bench/real_size.py --carry); the GPU machine rebuilds the diffusers source from the same seed
- `sdxl-1024-original.carry.tar.gz` with `--sdxl`: needs a machine that can convert SDXL's Unet
  (about 28 GB of memory for the conversion; the 24 GB box here cannot)

    python bench/real_size_cuda_prepare.py [OUT] [--split-einsum] [--sdxl] [--tiny]
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


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(args[0] if args else ROOT / "bench-carry")
    out.mkdir(parents=True, exist_ok=True)
    fixtures = out / "cuda-fixtures.tar.gz"
    if not fixtures.is_file():
        import runtime_cuda_prepare

        print("tiny CUDA fixtures ...", file=sys.stderr, flush=True)
        runtime_cuda_prepare.tiny_fixtures(fixtures)
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
