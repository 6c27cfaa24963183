"""How fast `coreml-hub serve` streams a large file to huggingface_hub on loopback.

Anchor: `cat FILE > /dev/null` on the same file (page cache warm), i.e. how fast this machine
can read it at all. Measured, each as the median of --runs:

  cat        `cat FILE > /dev/null`
  socket     a bare HTTP/1.1 GET on a socket, read into one buffer: the most any client gets
  http       a plain streaming GET through httpx2 (the client's HTTP stack), bytes discarded
  download   `hf_hub_download(..., force_download=True)`: HEAD + GET + write into the HF cache

    python bench/serve_bench.py                 # 1 GiB, 3 runs
    python bench/serve_bench.py --size-mib 256 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = "bench/large-file"
NAME = "weights/model.bin"


def write_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (needs 2x the file size).")
    args = parser.parse_args()

    import httpx2
    from huggingface_hub import hf_hub_download, hf_hub_url

    from coreml_hub.testing.hubserver import HubServer

    size = args.size_mib * 1024 * 1024
    scratch = Path(tempfile.mkdtemp(prefix="serve-bench-", dir=args.dir))
    try:
        root = scratch / "root"
        source = root / REPO / NAME
        write_file(source, size)
        subprocess.run(f"cat '{source}' > /dev/null", shell=True, check=True)  # warm the page cache

        cat_times = [timed(lambda: subprocess.run(f"cat '{source}' > /dev/null", shell=True, check=True))
                     for _ in range(args.runs)]

        with HubServer(root, scratch / "requests.jsonl") as server:
            url = hf_hub_url(REPO, NAME, endpoint=server.url)
            hash_time = timed(lambda: httpx2.head(url, timeout=600).raise_for_status())  # sha256 once, then cached

            def stream() -> None:
                got = 0
                with httpx2.stream("GET", url, timeout=600) as r:
                    r.raise_for_status()
                    for chunk in r.iter_raw(1 << 20):
                        got += len(chunk)
                assert got == size, got

            http_times = [timed(stream) for _ in range(args.runs)]

            def bare_socket() -> None:
                host, port = server.url.rsplit("//", 1)[1].rsplit(":", 1)
                path = url.split(server.url, 1)[1]
                buf = bytearray(1 << 20)
                got = 0
                with socket.create_connection((host, int(port))) as conn:
                    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                    while n := conn.recv_into(buf):
                        got += n
                assert got > size, got  # body plus headers

            socket_times = [timed(bare_socket) for _ in range(args.runs)]

            cache = scratch / "hf-cache"

            def download() -> None:
                path = hf_hub_download(REPO, NAME, endpoint=server.url, cache_dir=cache, force_download=True,
                                       token=False)
                assert os.path.getsize(path) == size

            download_times = []
            for _ in range(args.runs):
                shutil.rmtree(cache, ignore_errors=True)
                download_times.append(timed(download))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    mb = size / 1e6
    cat_rate = mb / statistics.median(cat_times)
    print(f"file: {args.size_mib} MiB, runs: {args.runs}, first HEAD (sha256 of the file): {hash_time:.2f} s")
    print(f"{'what':<10} {'median s':>9} {'MB/s':>9} {'vs cat':>7}")
    rows = (("cat", cat_times), ("socket", socket_times), ("http", http_times), ("download", download_times))
    for label, times in rows:
        median = statistics.median(times)
        rate = mb / median
        print(f"{label:<10} {median:>9.3f} {rate:>9.0f} {rate / cat_rate:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
