"""The `torch` backend: runs Core ML files with coreml-hub's portable ML Program runtime.

Works wherever PyTorch does: CPU, CUDA, Apple's MPS. On a GPU an fp16 model (what Apple's
converter writes) runs in fp16; on the CPU everything runs in fp32, where fp16 math is slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coreml_hub.hookspecs import hookimpl

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str | None) -> str:
    """`auto` -> the best device this machine has; an explicit one must exist."""
    import torch

    from coreml_hub.errors import BackendUnavailable, UsageError
    from coreml_hub.mil.model import best_device, mps_available

    device = (device or "auto").lower()
    if device not in DEVICES and not device.startswith("cuda:"):
        raise UsageError(f"Unknown device {device!r}.", hint=f"Choose one of: {', '.join(DEVICES)}.")
    if device == "auto":
        return best_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(
            "--device cuda was asked for, but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA).",
            hint="Use --device cpu, or install a CUDA build of PyTorch on a machine with an NVIDIA GPU.",
        )
    if device == "mps" and not mps_available():
        raise BackendUnavailable("--device mps was asked for, but MPS is not available on this machine.",
                                 hint="Use --device cpu (MPS needs Apple silicon and a PyTorch build with MPS).")
    return device


class TorchBackend:
    """Loads components with `coreml_hub.mil.load_model`."""

    name = "torch"
    formats = ("packages", "compiled")
    description = "portable ML Program runtime on PyTorch (cpu, cuda, mps)"
    dtypes = ("fp32", "fp16", "bf16")  # what `run --dtype` may ask for

    def available(self) -> tuple[bool, str]:
        # find_spec, not import: `coreml-hub plugins` asks every backend and must stay fast.
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False, "PyTorch is not installed (pip install torch)"
        return True, "runs everywhere PyTorch does"

    def resolve_device(self, device: str | None) -> str:
        return resolve_device(device)

    def load(self, component_path: Path | str, *, device: str | None = "auto", compute_unit: str | None = None,
             dtype: str | None = None) -> Any:
        """A Model for one `.mlpackage` / `.mlmodelc`. `compute_unit` is a Core ML notion and is ignored.

        `dtype` None lets the runtime choose: fp32 on the CPU, the model's own precision on a GPU.
        """
        from coreml_hub.mil import load_model

        return load_model(Path(component_path), device=resolve_device(device), dtype=dtype)


@hookimpl
def register_backends(register: Any) -> None:
    register(TorchBackend())
