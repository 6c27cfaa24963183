"""`verify --hashes` hashing throughput against `sha256sum` on the same files.

    python bench/hash_bench.py [--size-mb 1024] [--runs 5] [--dir DIR]

Writes a variant-like folder (a few weight-sized files, ~1 GB in all, plus the pull
manifest `verify` compares with), then alternates, for each run: `sha256sum` over every
file (one process, files in turn, as a shell user would check them) and the hashing step
of `verify --hashes` (`coreml_hub.validate.check_hashes`: parallel threads, 8 MiB reads).
For context it also times the same hashing on one thread and `openssl dgst -sha256`
(hashlib is OpenSSL's sha256, which uses the CPU's SHA instructions; coreutils' does not).
Both read the same files from the same (warm) page cache; the median of the runs is
printed with the ratio sha256sum_time / verify_time (above 1: verify is faster).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_variant(root: Path, total_mb: int) -> list[Path]:
    """Files shaped like a compiled variant's weights: one big Unet, smaller others."""
    shares = {"Unet.mlmodelc/weights/weight.bin": 0.55, "TextEncoder.mlmodelc/weights/weight.bin": 0.2,
              "VAEDecoder.mlmodelc/weights/weight.bin": 0.1, "VAEEncoder.mlmodelc/weights/weight.bin": 0.1,
              "Unet.mlmodelc/model.mil": 0.03, "TextEncoder.mlmodelc/model.mil": 0.02}
    rng = np.random.default_rng(0)
    files, entries = [], []
    for rel, share in shares.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        size = int(total_mb * share * (1 << 20))
        digest = hashlib.sha256()
        with open(path, "wb") as fh:
            left = size
            while left:
                block = rng.integers(0, 256, min(left, 16 << 20), dtype=np.uint8).tobytes()
                fh.write(block)
                digest.update(block)
                left -= len(block)
        files.append(path)
        entries.append({"path": rel, "size": size, "sha256": digest.hexdigest()})
    (root / "coreml-hub.json").write_text(json.dumps({"format_version": 1, "files": entries}))
    return files


def time_sha256sum(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_openssl(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_one_thread(files: list[Path]) -> float:
    from coreml_hub.validate import hash_files

    start = time.perf_counter()
    hash_files(files, workers=1)
    return time.perf_counter() - start


def time_verify(root: Path) -> float:
    from coreml_hub.bundle import open_bundle
    from coreml_hub.validate import check_hashes

    start = time.perf_counter()
    problems, hashed = check_hashes(open_bundle(root))
    elapsed = time.perf_counter() - start
    errors = [p for p in problems if p.is_error]
    if errors or hashed != 6:
        raise SystemExit(f"hash check failed: {errors} ({hashed} files)")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("sha256sum") is None:
        raise SystemExit("sha256sum is not installed")
    base = Path(tempfile.mkdtemp(prefix="hash-bench-", dir=args.dir))
    try:
        files = make_variant(base / "variant", args.size_mb)
        total = sum(f.stat().st_size for f in files)
        time_sha256sum(files)  # warm the page cache once for both sides
        openssl = shutil.which("openssl") is not None
        ours, theirs, single, ossl = [], [], [], []
        for _ in range(args.runs):
            theirs.append(time_sha256sum(files))
            ours.append(time_verify(base / "variant"))
            single.append(time_one_thread(files))
            if openssl:
                ossl.append(time_openssl(files))
        t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
        mb = total / 1e6
        print(f"files: {len(files)}, {mb:.0f} MB; runs: {args.runs}; CPUs: {os.cpu_count()}")
        print(f"sha256sum                 median {t_theirs:.3f} s  ({mb / t_theirs:.0f} MB/s)")
        print(f"verify --hashes           median {t_ours:.3f} s  ({mb / t_ours:.0f} MB/s)")
        t_single = statistics.median(single)
        print(f"  same hashing, 1 thread  median {t_single:.3f} s  ({mb / t_single:.0f} MB/s)")
        if ossl:
            t_ossl = statistics.median(ossl)
            print(f"openssl dgst -sha256      median {t_ossl:.3f} s  ({mb / t_ossl:.0f} MB/s)")
        print(f"ratio sha256sum/verify: {t_theirs / t_ours:.2f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
