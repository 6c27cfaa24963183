"""Peak memory of this process, as `run --json` reports it."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..human import human_size


@dataclass(frozen=True)
class PeakMemory:
    """The most memory the process held: resident (RSS) and, on CUDA, allocated device memory."""

    rss_bytes: int | None = None
    cuda_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rss_bytes": self.rss_bytes, "cuda_bytes": self.cuda_bytes}

    def describe(self) -> str:
        parts = [f"{human_size(self.rss_bytes)} resident"] if self.rss_bytes else []
        if self.cuda_bytes:
            parts.append(f"{human_size(self.cuda_bytes)} CUDA")
        return ", ".join(parts)


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (VmHWM on Linux; ru_maxrss elsewhere).

    VmHWM first: ru_maxrss of a process started by fork+exec can keep the parent's high-water mark.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    except (OSError, ValueError):
        return None


def peak_cuda_bytes(device: str | None) -> int | None:
    """Peak allocated CUDA memory of this process, when it ran on CUDA (None otherwise)."""
    if not device or not str(device).startswith("cuda") or "torch" not in sys.modules:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def peak_memory(device: str | None = None) -> PeakMemory:
    return PeakMemory(peak_rss_bytes(), peak_cuda_bytes(device))
