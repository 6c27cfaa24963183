"""Run `.mlpackage` and `.mlmodelc` models on PyTorch: `load_model(path).predict(inputs)`.

Both formats load into the same program model (`.mlpackage` through the protobuf
spec, `.mlmodelc` through `model.mil`) and run through the same executor.

Numerics: an fp32 program runs in float32. An fp16 program runs in float16 on a GPU
(CUDA, MPS) and in float32 on the CPU, where float16 arithmetic is slow and less exact;
`dtype=` overrides both ("fp32", "fp16" or a torch dtype). Integer and boolean values
keep their types. Weights are read from the weight file's memory map and placed on the
device once, in the type they run in.

`predict` takes and returns numpy arrays (outputs in the types the model declares), like
coremltools' `MLModel.predict`; `predict_torch` takes and returns torch tensors and leaves
outputs on the device in the type they were computed in, for callers that chain models.

Both take `states=`: for a stateful program, a dict of state tensors (`model._fn.new_states()`
makes zero-filled ones) that the prediction reads and updates in place; without it each
prediction starts from fresh zero states. The main function runs through an
`executor.FunctionRunner`, which compiles inputs with flexible dimensions per distinct shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, MutableMapping

import numpy as np

from ..errors import InvalidBundle, ModelInputError, UnsupportedOperation
from .program import FLOAT_DTYPES, Function, Program, StateType, TensorType

DEVICES = ("cpu", "cuda", "mps", "auto")

_NUMPY_TYPES = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class FeatureDescription:
    """One model input or output: name, shape (None where a dimension is flexible), MIL dtype."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str  # "fp16", "fp32", "int32", ...

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_NUMPY_TYPES.get(self.dtype, np.float32))


def read_program(path: str | Path) -> Program:
    """The ML Program of a `.mlpackage`, `.mlmodel` file or `.mlmodelc` folder."""
    path = Path(path)
    if path.is_dir() and (path / "model.mil").is_file():
        from . import text

        program = text.load(path / "model.mil")
        if program.base_dir is None:
            program.base_dir = path
        return program
    if path.suffix == ".mlmodelc":
        raise InvalidBundle(f"{path} is not a compiled Core ML model (no model.mil)")
    from .proto import load_program

    return load_program(path)


def program_is_fp16(fn: Function) -> bool:
    """Whether a function computes in float16 (Core ML's FLOAT16 conversions)."""
    for op in fn.block.walk():
        if op.type == "const":
            continue
        for out in op.outputs:
            if isinstance(out.type, TensorType) and out.type.dtype == "fp16":
                return True
    return False


def mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def best_device() -> str:
    """What `auto` means: a CUDA GPU, else Apple's MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if mps_available() else "cpu"


def resolve_device(device: str | Any) -> Any:
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device)
    if name == "auto":
        return torch.device(best_device())
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedOperation("CUDA was requested but torch sees no CUDA device", hint="Use device='cpu' or 'auto'.")
    return torch.device(name)


def float_types(fp16_program: bool, device: Any, dtype: Any = None) -> dict[str, Any]:
    """The torch dtype each MIL float type runs as (see the module docstring)."""
    import torch

    if dtype is not None:
        wanted = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                  "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}.get(str(dtype).replace("torch.", ""), dtype)
        if wanted not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype!r}; use 'fp32', 'fp16' or a torch float dtype")
        return dict.fromkeys(FLOAT_DTYPES, wanted)
    if device.type == "cpu" or not fp16_program:
        return dict.fromkeys(FLOAT_DTYPES, torch.float32)
    return {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float32, "bf16": torch.float16}


class Model:
    """A loaded model; mirrors coremltools' MLModel (`predict`, `input_description`, `output_description`)."""

    def __init__(
        self,
        path: str | Path,
        device: str | Any = "cpu",
        dtype: Any = None,
        compile: bool | None = None,
        fuse: bool = True,
    ) -> None:
        import torch

        from .executor import FunctionRunner, unsupported_ops
        from .ops import Context

        self.path = Path(path)
        self.program = read_program(self.path)
        if "main" not in self.program.functions:
            raise InvalidBundle(f"{self.path}: the ML Program has no 'main' function")
        main = self.program.main
        missing = unsupported_ops([main])
        if missing:
            total = sum(missing.values())
            listed = ", ".join(f"{name} ({count})" for name, count in sorted(missing.items(), key=lambda kv: -kv[1]))
            raise UnsupportedOperation(
                f"{self.path.name}: {total} op(s) of {len(missing)} type(s) the portable runtime "
                f"does not implement: {listed}"
            )
        self.device = resolve_device(device)
        self.fp16_program = program_is_fp16(main)
        floats = float_types(self.fp16_program, self.device, dtype)
        self.ctx = Context.create(self.device, floats)
        self.dtype = floats["fp16" if self.fp16_program else "fp32"]
        if compile is None:
            compile = os.environ.get("COREML_HUB_COMPILE", "") not in ("", "0")
        with torch.inference_mode():
            self._fn = FunctionRunner(main, self.ctx, fuse=fuse, torch_compile=compile, model_name=self.path.name)
        types = main.output_types()
        self.input_description = tuple(_describe(v.name, v.type) for v in main.inputs
                                       if not isinstance(v.type, StateType))
        self.output_description = tuple(_describe(name, types.get(name)) for name in main.outputs)
        self._inputs = {d.name: d for d in self.input_description}
        self._input_dtypes = tuple((name, dtype) for name, dtype in zip(self._fn.input_names, self._fn.input_dtypes)
                                   if name in self._inputs)

    @property
    def stats(self) -> Any:
        """What compilation did: steps per call, folded ops, fused patterns, constant bytes."""
        return self._fn.stats

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, device={self.device.type!r}, dtype={self.dtype})"

    # -- prediction ------------------------------------------------------------------

    def predict(
        self, inputs: Mapping[str, Any], states: MutableMapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Run on numpy inputs; returns numpy outputs in the model's declared output types."""
        import torch

        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        self._check(arrays, lambda a: a.dtype.kind, lambda a: tuple(a.shape))
        # np.ascontiguousarray would turn a 0-d input into shape (1,)
        tensors = {name: torch.from_numpy(a if a.flags.c_contiguous else a.copy()) for name, a in arrays.items()}
        outputs = self.predict_torch(tensors, _checked=True, states=states)
        result = {}
        for desc in self.output_description:
            t = outputs[desc.name]
            if not isinstance(t, torch.Tensor):  # a classifier's label and probabilities
                result[desc.name] = t
                continue
            t = t.detach()
            if t.dtype == torch.bfloat16:
                t = t.float()
            result[desc.name] = t.cpu().numpy().astype(desc.numpy_dtype, copy=False)
        return result

    def predict_torch(
        self, inputs: Mapping[str, Any], _checked: bool = False, states: MutableMapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run on torch tensors; outputs stay on the model's device in the type computed."""
        import torch

        if not _checked:
            self._check(inputs, _torch_kind, lambda t: tuple(t.shape))
        args = {}
        for name, dtype in self._input_dtypes:
            t = inputs[name]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(np.asarray(t))
            args[name] = t.to(device=self.device, dtype=dtype, non_blocking=True)
        return self._fn.run(args, states)

    __call__ = predict_torch

    def _check(self, inputs: Mapping[str, Any], kind_of: Any, shape_of: Any) -> None:
        given, expected = set(inputs), set(self._inputs)
        problems = []
        if expected - given:
            problems.append(f"missing input(s): {', '.join(sorted(expected - given))}")
        if given - expected:
            problems.append(f"unknown input(s): {', '.join(sorted(given - expected))}")
        for name in sorted(given & expected):
            desc = self._inputs[name]
            shape = shape_of(inputs[name])
            if desc.shape is not None and shape != desc.shape:
                problems.append(f"'{name}' has shape {list(shape)}, the model takes {list(desc.shape)}")
            kind = kind_of(inputs[name])
            if kind not in _ACCEPTS.get(desc.dtype, "biuf"):
                problems.append(f"'{name}' has a {_KIND_NAMES.get(kind, kind)} type, the model takes {desc.dtype}")
        if problems:
            names = ", ".join(f"{d.name} {d.dtype}{list(d.shape) if d.shape is not None else '[?]'}" for d in self.input_description)
            raise ModelInputError(f"{self.path.name}: " + "; ".join(problems), hint=f"The model takes: {names}.")


# numpy dtype kinds each MIL input type accepts without losing meaning
_ACCEPTS = {"fp16": "biuf", "fp32": "biuf", "fp64": "biuf", "int32": "biu", "int16": "biu", "int8": "biu",
            "uint8": "bu", "uint16": "bu", "int64": "biu", "bool": "b"}
_KIND_NAMES = {"f": "float", "i": "signed integer", "u": "unsigned integer", "b": "boolean", "c": "complex",
               "U": "string", "O": "object"}


def _torch_kind(t: Any) -> str:
    import torch

    if isinstance(t, torch.Tensor):
        if t.dtype == torch.bool:
            return "b"
        if t.is_floating_point():
            return "f"
        if t.is_complex():
            return "c"
        return "u" if t.dtype == torch.uint8 else "i"
    return np.asarray(t).dtype.kind


def _describe(name: str, t: Any) -> FeatureDescription:
    if isinstance(t, TensorType):
        return FeatureDescription(name, t.static_shape, t.dtype)
    return FeatureDescription(name, None, "unknown")


def load_model(
    path: str | Path, device: str | Any = "cpu", dtype: Any = None, compile: bool | None = None, fuse: bool = True
) -> Model:
    """Load a `.mlpackage` or `.mlmodelc` for prediction with PyTorch on `device`.

    `device`: "cpu", "cuda", "mps" or "auto" (the best available). `dtype`: None for the
    default numerics (module docstring), or "fp32"/"fp16"/a torch dtype for every float.
    `compile`: wrap the executor in torch.compile (default: the COREML_HUB_COMPILE
    environment variable, off when unset). `fuse`: the attention and group-norm fusions
    (on by default; off only to compare results).

    Raises UnsupportedOperation, naming every op type the runtime lacks and how often it
    occurs, before any weight is read.
    """
    return Model(path, device=device, dtype=dtype, compile=compile, fuse=fuse)
