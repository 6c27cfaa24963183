"""Run `.mlpackage` and `.mlmodelc` models on PyTorch: `load_model(path).predict(inputs)`.

Both formats load into the same program model (`.mlpackage` through the protobuf
spec, `.mlmodelc` through `model.mil`) and run through the same executor. What the model
declares about itself (`mil.spec`: image inputs and outputs, flexible shapes, optional
inputs, states, functions, metadata) shapes the interface, as it does coremltools' MLModel:

    model = load_model("Classifier.mlpackage")
    model.predict({"image": PIL.Image.open("cat.png")})  # {"classLabel": "cat", "classLabel_probs": {...}}
    state = kv_model.make_state()                        # stateful models: state persists across calls
    kv_model.predict({"x": x}, state=state); state.read_state("k_cache")
    load_model("Multi.mlpackage", function_name="decode") # multifunction models

Numerics: an fp32 program runs in float32. An fp16 program runs in float16 on a GPU
(CUDA, MPS) and in float32 on the CPU, where float16 arithmetic is slow and less exact;
`dtype=` overrides both ("fp32", "fp16" or a torch dtype). Integer and boolean values
keep their types. Weights are read from the weight file's memory map and placed on the
device once, in the type they run in.

`predict` takes numpy arrays (or torch tensors, lists, PIL images for image inputs) and
returns numpy arrays in the types the model declares, PIL images for image outputs and a
label and a probability dictionary for a classifier, like coremltools' `MLModel.predict`;
`predict_torch` takes and returns torch tensors and leaves outputs on the device in the type
they were computed in, for callers that chain models.

The function runs through an `executor.FunctionRunner`: compiled once, or, for inputs with
flexible dimensions, once per distinct input shape (kept in a small cache). A stateful
function's state inputs are the `State`'s own tensors, which its state ops update in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InvalidBundle, ModelInputError, UnsupportedOperation
from .features import ClassifierHead, array_to_image, check_array, prepare_inputs, strip_classifiers
from .program import FLOAT_DTYPES, Function, Program, TensorType
from .spec import FeatureDescription, Metadata, ModelSpec, choose_function, describe_function, is_compiled, read_spec
from .state import State

__all__ = ["DEVICES", "FeatureDescription", "Model", "State", "load_model", "read_program"]

DEVICES = ("cpu", "cuda", "mps", "auto")


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


def _read(path: Path) -> tuple[ModelSpec, Program]:
    """The declared interface and the program, the spec checked first (a NeuralNetwork model fails
    there, by name) and a package's protobuf parsed once for both."""
    if is_compiled(path):
        return read_spec(path), read_program(path)
    from .proto import load_spec, program_from_proto, spec_file

    file = spec_file(path)
    message = load_spec(file)
    spec = read_spec(path, message)
    return spec, program_from_proto(message.mlProgram, base_dir=file.parent)


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
    """A loaded model; mirrors coremltools' MLModel (`predict`, `make_state`, descriptions, metadata).

    `function_name` picks a function of a multifunction model (default: the one the model
    names as its default, else `main`).
    """

    def __init__(
        self,
        path: str | Path,
        device: str | Any = "cpu",
        dtype: Any = None,
        compile: bool | None = None,
        fuse: bool = True,
        function_name: str | None = None,
    ) -> None:
        import torch

        from .executor import FunctionRunner, unsupported_ops
        from .ops import Context

        self.path = Path(path)
        self.spec, self.program = _read(self.path)
        self.function_name = choose_function(self.spec, list(self.program.functions), function_name)
        function = self.program.functions[self.function_name]
        interface = describe_function(function, self.spec.function(self.function_name))
        self.input_description: tuple[FeatureDescription, ...] = interface.inputs
        self.output_description: tuple[FeatureDescription, ...] = interface.outputs
        self.state_description: tuple[FeatureDescription, ...] = interface.states
        self._inputs = {d.name: d for d in self.input_description}

        runnable, self._classifiers = strip_classifiers(function)
        missing = unsupported_ops([runnable])
        if missing:
            total = sum(missing.values())
            listed = ", ".join(f"{name} ({count})" for name, count in sorted(missing.items(), key=lambda kv: -kv[1]))
            raise UnsupportedOperation(
                f"{self.path.name}: {total} op(s) of {len(missing)} type(s) the portable runtime "
                f"does not implement: {listed}"
            )
        self.device = resolve_device(device)
        self.fp16_program = program_is_fp16(runnable)
        floats = float_types(self.fp16_program, self.device, dtype)
        self.ctx = Context.create(self.device, floats)
        self.dtype = floats["fp16" if self.fp16_program else "fp32"]
        if compile is None:
            compile = os.environ.get("COREML_HUB_COMPILE", "") not in ("", "0")
        with torch.inference_mode():
            # compiles once, or once per distinct input shape for flexible inputs
            self._fn = FunctionRunner(runnable, self.ctx, fuse=fuse, torch_compile=compile, model_name=self.path.name)
        self._heads = {name: head for head in self._classifiers
                       for name in (head.label_output, head.probabilities_output)}

    @property
    def stats(self) -> Any:
        """What compilation did: steps per call, folded ops, fused patterns, constant bytes."""
        return self._fn.stats

    def __repr__(self) -> str:
        function = f", function_name={self.function_name!r}" if len(self.program.functions) > 1 else ""
        return f"Model({str(self.path)!r}, device={self.device.type!r}, dtype={self.dtype}{function})"

    # -- what the model declares -----------------------------------------------------

    @property
    def metadata(self) -> Metadata:
        """Author, license, version, short description and user-defined entries of the model."""
        return self.spec.metadata

    @property
    def author(self) -> str:
        return self.spec.metadata.author

    @property
    def license(self) -> str:
        return self.spec.metadata.license

    @property
    def version(self) -> str:
        return self.spec.metadata.version

    @property
    def short_description(self) -> str:
        return self.spec.metadata.short_description

    @property
    def user_defined_metadata(self) -> dict[str, str]:
        return dict(self.spec.metadata.user_defined)

    @property
    def functions(self) -> tuple[str, ...]:
        """The program's function names (several for a multifunction model)."""
        return tuple(self.program.functions)

    @property
    def classifier(self) -> ClassifierHead | None:
        """The classifier head (output names and class labels), for a classifier model."""
        return self._classifiers[0] if self._classifiers else None

    @property
    def class_labels(self) -> tuple[Any, ...]:
        return self._classifiers[0].classes if self._classifiers else ()

    @property
    def is_stateful(self) -> bool:
        return bool(self._fn.states)

    # -- state -----------------------------------------------------------------------

    def make_state(self) -> State:
        """A new state for a stateful model (zeros), to pass as `predict(..., state=)`."""
        if not self.is_stateful:
            raise ModelInputError(f"{self.path.name} declares no state, so it has none to make.",
                                  hint="make_state() is for stateful models (iOS 18 state inputs).")
        return State(self, self.state_description, self._fn.new_states())

    # -- prediction ------------------------------------------------------------------

    def predict(self, inputs: Mapping[str, Any], state: State | None = None) -> dict[str, Any]:
        """Run on numpy inputs (PIL images for image inputs); numpy, PIL or label outputs.

        Missing optional inputs take their declared defaults. A stateful model reads and
        updates `state` (from `make_state()`); without one it starts from a fresh zero state.
        """
        import torch

        arrays = prepare_inputs(inputs, self.input_description, self.path.name)
        # np.ascontiguousarray would turn a 0-d input into shape (1,)
        tensors = {name: torch.from_numpy(a if a.flags.c_contiguous else a.copy()) for name, a in arrays.items()}
        values = self._run(tensors, state)
        result: dict[str, Any] = {}
        for desc in self.output_description:
            head = self._heads.get(desc.name)
            if head is not None:
                result[desc.name] = head.outputs(values[head.probabilities_var].detach().float().cpu().numpy())[desc.name]
                continue
            t = values[desc.name].detach()
            if t.dtype == torch.bfloat16:
                t = t.float()
            array = t.cpu().numpy().astype(desc.numpy_dtype, copy=False)
            if desc.kind == "image" and desc.image is not None:
                result[desc.name] = array_to_image(array, desc.image, desc.name)
            else:
                result[desc.name] = array
        return result

    def predict_torch(self, inputs: Mapping[str, Any], state: State | None = None, _checked: bool = False
                      ) -> dict[str, Any]:
        """Run on torch tensors; outputs stay on the model's device in the type computed.

        Image outputs stay tensors; a classifier's label and probabilities are Python values.
        """
        if not _checked:
            self._check_tensors(inputs)
        values = self._run(inputs, state)
        result: dict[str, Any] = {}
        for desc in self.output_description:
            head = self._heads.get(desc.name)
            if head is not None:
                result[desc.name] = head.outputs(values[head.probabilities_var].detach().float().cpu().numpy())[desc.name]
            else:
                result[desc.name] = values[desc.name]
        return result

    __call__ = predict_torch

    def _run(self, inputs: Mapping[str, Any], state: State | None) -> dict[str, Any]:
        import torch

        states: dict[str, Any] = {}
        if self.is_stateful:
            states = (state if state is not None else self.make_state()).tensors_for(self)
        elif state is not None:
            raise ModelInputError(f"{self.path.name} declares no state; call predict without state=.")
        args = []
        for name, dtype in zip(self._fn.input_names, self._fn.input_dtypes):
            if name in states:  # the state's own tensor: the program updates it in place
                args.append(states[name])
                continue
            t = inputs[name]
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(np.asarray(t))
            args.append(t.to(device=self.device, dtype=dtype, non_blocking=True))
        return dict(zip(self._fn.output_names, self._fn(*args)))

    def _check_tensors(self, inputs: Mapping[str, Any]) -> None:
        given, expected = set(inputs), set(self._inputs)
        problems = []
        if expected - given:
            problems.append(f"missing input(s): {', '.join(sorted(expected - given))}")
        if given - expected:
            problems.append(f"unknown input(s): {', '.join(sorted(given - expected))}")
        for name in sorted(given & expected):
            value = inputs[name]
            problem = check_array(value, self._inputs[name], tuple(value.shape), _torch_kind(value))
            if problem:
                problems.append(problem)
        if problems:
            names = "; ".join(f"{d.name} {d.declared()}" for d in self.input_description)
            raise ModelInputError(f"{self.path.name}: " + "; ".join(problems), hint=f"The model takes: {names}.")


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


def load_model(
    path: str | Path, device: str | Any = "cpu", dtype: Any = None, compile: bool | None = None, fuse: bool = True,
    function_name: str | None = None,
) -> Model:
    """Load a `.mlpackage` or `.mlmodelc` for prediction with PyTorch on `device`.

    `device`: "cpu", "cuda", "mps" or "auto" (the best available). `dtype`: None for the
    default numerics (module docstring), or "fp32"/"fp16"/a torch dtype for every float.
    `compile`: wrap the executor in torch.compile (default: the COREML_HUB_COMPILE
    environment variable, off when unset). `fuse`: the attention and group-norm fusions
    (on by default; off only to compare results). `function_name`: which function of a
    multifunction model (default: the model's default function).

    Raises UnsupportedModel for a model that is not an ML Program (NeuralNetwork models,
    pipelines), and UnsupportedOperation, naming every op type the runtime lacks and how
    often it occurs, before any weight is read.
    """
    return Model(path, device=device, dtype=dtype, compile=compile, fuse=fuse, function_name=function_name)
