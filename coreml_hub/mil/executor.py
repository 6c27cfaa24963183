"""Compile a program function into one flat Python function over torch tensors.

Lowering resolves every op to its kernel once: constant parameters become Python
values bound into the kernel, constant tensors are materialized on the device once
(and shared by every op that reads them), ops whose inputs are all constant —
weight decompression included — run once at load time. What remains is emitted as
straight-line Python source, one kernel call per op, with each intermediate deleted
after its last reader, so the hot loop has no dictionaries, no op-name dispatch and
holds no tensor longer than needed. The same function can be handed to torch.compile.

Control flow is emitted as Python control flow: `cond` as an `if`/`else` over its two
blocks, `while_loop` as a `while` whose condition and body blocks read and rebind the
loop-carried values; blocks read values of the blocks around them directly. A list value
is a Python list of tensors. A state input (`state<tensor<...>>`) is a tensor the caller
owns: `read_state` reads it and `write_state` copies a new value into it, in place.

`FunctionRunner` is what a model runs: a static program is compiled once; a program with
flexible (symbolic) input dimensions is compiled once per distinct set of concrete input
shapes, its symbols bound to the sizes seen, and the last few compilations are kept.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, MutableMapping

import numpy as np
import torch

from ..errors import CoremlHubError, ModelInputError, UnsupportedOperation
from . import passes
from .ops import CONSTEXPR, KERNELS, Context, Kernel, to_python
from .program import (
    BlobRef,
    Block,
    Function,
    ListType,
    ListValue,
    Operation,
    StateType,
    TensorType,
    TensorValue,
    Var,
    ValueType,
)

# Ops whose kernel returns a tuple even when the op declares a single output.
TUPLE_RESULTS = frozenset({"split"})


@dataclass(frozen=True)
class CompileStats:
    ops_in_program: int
    steps: int  # kernel calls per prediction
    folded: int  # ops evaluated once at load time
    attention_fused: int
    group_norm_fused: int
    constant_bytes: int  # device memory held by constants


@dataclass
class ConstantPool:
    """Constants one compilation leaves for the next compilation of the same function.

    `values`: constant variables, including results of ops folded at load time from
    constants only (weight decompression); `tensors`: their device tensors. Only values
    that do not depend on input shapes are kept, so every shape specialization can reuse them.
    """

    values: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class CompiledFunction:
    """A program function lowered to `run(*inputs) -> tuple(outputs)`.

    Inputs are positional, in the function's order (state inputs included: the caller's
    state tensors, updated in place).
    """

    def __init__(
        self,
        fn: Function,
        ctx: Context,
        *,
        fuse: bool = True,
        torch_compile: bool = False,
        model_name: str = "model",
        pool: ConstantPool | None = None,
    ) -> None:
        self.ctx = ctx
        graph = passes.Graph.from_function(fn)
        ops_in_program = sum(1 for _ in fn.block.walk())
        report = passes.optimize(graph, same_float=self._same_float, fuse=fuse)
        lowering = _Lowering(graph, ctx, model_name, pool, opset=opset_number(fn.opset))
        self.source, run, self._traced = lowering.emit()
        self.pool = lowering.pool()
        self.input_names = tuple(v.name for v in graph.inputs)
        self.output_names = tuple(graph.output_names)
        self.input_dtypes = tuple(ctx.dtype(_tensor_type(v.type).dtype) if _tensor_type(v.type) else None
                                  for v in graph.inputs)
        self.stats = CompileStats(
            ops_in_program=ops_in_program,
            steps=lowering.steps,
            folded=lowering.folded,
            attention_fused=report.attention,
            group_norm_fused=report.group_norm,
            constant_bytes=lowering.constant_bytes(),
        )
        self._eager = run
        self._run: Callable[..., tuple[torch.Tensor, ...]] = run
        if torch_compile:
            self._run = torch.compile(run, dynamic=False)
        for path in lowering.blob_files:
            _drop_pages(path)

    def _same_float(self, a: str, b: str) -> bool:
        return self.ctx.dtype(a) == self.ctx.dtype(b)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.ctx.device.type == "cuda":
            with torch.inference_mode(), _ieee_fp32():
                return self._run(*inputs)
        with torch.inference_mode():
            return self._run(*inputs)

    def traced(self, shapes: dict[str, tuple[int, ...]], *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run eagerly, noting the shape of every top-level tensor value in `shapes`."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.ctx.device.type == "cuda":
                stack.enter_context(_ieee_fp32())
            return self._traced(shapes, *inputs)


def opset_number(opset: str) -> int:
    """`ios17` -> 17; an opset the runtime does not know counts as the newest it does."""
    digits = "".join(ch for ch in opset if ch.isdigit())
    return int(digits) if digits else 18


def _tensor_type(t: ValueType) -> TensorType | None:
    """The tensor type of a tensor or state value."""
    if isinstance(t, StateType):
        t = t.wrapped
    return t if isinstance(t, TensorType) else None


class FunctionRunner:
    """One program function, ready to run with named inputs (and state tensors).

    A function whose inputs all have static shapes is compiled once, at construction.
    One with flexible dimensions is compiled at construction with its symbolic types
    (which checks every op and decompresses the weights once). The first call with a new
    set of concrete input shapes runs that compilation; the second notes the shape of every
    value, and the function is compiled again with the shapes that follow from the inputs'
    (`shape_determined`), so that shape arithmetic folds to constants and the fusions see
    static shapes; later calls with those shapes run the specialized compilation. The last
    `cache_size` specializations are kept, and all of them share the constants of the first.
    A shape is specialized on its second call, not its first, and at most once: a decoder whose
    mask grows by one token per step never repeats a shape within a generation, and compiling
    for each (or again for each generation, once the cache has let it go) costs more than the
    step (measured: 16 ms a token instead of 2.5 ms for a small LM). Shapes the cache let go
    run the generic compilation.

    `states` maps each state input's name to a tensor of its shape in the run-time type
    (`new_states()` makes zero-filled ones); `write_state` ops update those tensors in place.
    """

    def __init__(
        self,
        fn: Function,
        ctx: Context,
        *,
        fuse: bool = True,
        torch_compile: bool = False,
        model_name: str = "model",
        cache_size: int = 8,
    ) -> None:
        self.function = fn
        self.ctx = ctx
        self.model_name = model_name
        self._options = {"fuse": fuse, "torch_compile": torch_compile, "model_name": model_name}
        self.inputs = tuple(v for v in fn.inputs if not isinstance(v.type, StateType))
        self.states = tuple(v for v in fn.inputs if isinstance(v.type, StateType))
        self.generic = CompiledFunction(fn, ctx, **self._options)
        self.flexible = tuple(
            v.name for v in self.inputs if isinstance(v.type, TensorType) and v.type.static_shape is None
        )
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Any, ...], CompiledFunction] = OrderedDict()
        self._seen_once: OrderedDict[tuple[Any, ...], None] = OrderedDict()  # shapes run once, generically
        self._let_go: OrderedDict[tuple[Any, ...], None] = OrderedDict()  # specialized, then evicted

    # the interface of CompiledFunction, so a runner can stand wherever one is called
    @property
    def input_names(self) -> tuple[str, ...]:
        return self.generic.input_names

    @property
    def input_dtypes(self) -> tuple[Any, ...]:
        return self.generic.input_dtypes

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.generic.output_names

    @property
    def stats(self) -> CompileStats:
        return self.generic.stats

    @property
    def source(self) -> str:
        return self.generic.source

    @property
    def _eager(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        return self.generic._eager

    @property
    def _run(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        return self.generic._run

    def compiled_for(self, shapes: Mapping[str, tuple[int, ...]]) -> CompiledFunction | None:
        """The compilation for these concrete input shapes, if made (the static one when nothing is flexible)."""
        if not self.flexible:
            return self.generic
        key = tuple(tuple(shapes[name]) for name in self.flexible)
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
        return compiled

    def __call__(self, *args: torch.Tensor) -> tuple[Any, ...]:
        """Run on tensors in `input_names` order (state tensors included), as CompiledFunction does."""
        if self._plain:
            return self.generic(*args)
        shapes = {name: tuple(args[index].shape) for name, index in self._flexible_positions}
        compiled = self.compiled_for(shapes)
        key = tuple(shapes[name] for name in self.flexible)
        if compiled is not None:
            outputs = compiled(*args)
        elif key in self._let_go:
            outputs = self.generic(*args)
        elif key not in self._seen_once:
            # first call with these shapes: the generic compilation runs it
            self._seen_once[key] = None
            while len(self._seen_once) > 8 * self.cache_size:
                self._seen_once.popitem(last=False)
            outputs = self.generic(*args)
        else:
            # second call with these shapes: run the generic compilation, noting each value's shape,
            # and compile the function again with those shapes
            del self._seen_once[key]
            recorded: dict[str, tuple[int, ...]] = {}
            outputs = self.generic.traced(recorded, *args)
            self._specialize(shapes, recorded)
        if self.states:
            # an output that is a state read must not change when the state is next written
            held = {args[index].untyped_storage().data_ptr() for index in self._state_positions}
            outputs = tuple(o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in held else o
                            for o in outputs)
        return outputs

    def run(
        self, inputs: Mapping[str, torch.Tensor], states: MutableMapping[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Run on named tensors already on the device in their run-time types; returns outputs by name.

        `states`: a tensor per state input (`new_states()`), updated in place; without it the
        call starts from fresh zero states.
        """
        if self.states:
            if states is None:
                states = self.new_states()
            missing = [v.name for v in self.states if v.name not in states]
            if missing:
                raise ModelInputError(f"{self.model_name}: no tensor given for state(s) {', '.join(missing)}",
                                      hint="Pass the tensors new_states() makes.")
            args = [states[name] if name in self._state_names else inputs[name] for name in self.input_names]
        else:
            args = [inputs[name] for name in self.input_names]
        return dict(zip(self.output_names, self(*args)))

    @functools.cached_property
    def _plain(self) -> bool:
        return not self.flexible and not self.states

    @functools.cached_property
    def _flexible_positions(self) -> tuple[tuple[str, int], ...]:
        return tuple((name, self.input_names.index(name)) for name in self.flexible)

    @functools.cached_property
    def _state_positions(self) -> tuple[int, ...]:
        return tuple(self.input_names.index(v.name) for v in self.states)

    @functools.cached_property
    def _determined(self) -> set[str]:
        return shape_determined(self.function, KERNELS)

    def _specialize(self, shapes: Mapping[str, tuple[int, ...]], recorded: Mapping[str, tuple[int, ...]]) -> None:
        fixed = {name: shape for name, shape in recorded.items() if name in self._determined}
        try:
            specialized = specialize(self.function, shapes, fixed)
            with torch.inference_mode():
                compiled = CompiledFunction(specialized, self.ctx, pool=self.generic.pool, **self._options)
        except CoremlHubError:
            compiled = self.generic  # these shapes run unspecialized, as the first call did
        self._cache[tuple(tuple(shapes[name]) for name in self.flexible)] = compiled
        while len(self._cache) > self.cache_size:
            self._let_go[self._cache.popitem(last=False)[0]] = None
        while len(self._let_go) > 64 * self.cache_size:
            self._let_go.popitem(last=False)

    @functools.cached_property
    def _state_names(self) -> frozenset[str]:
        return frozenset(v.name for v in self.states)

    # -- states ----------------------------------------------------------------------

    def state_type(self, name: str) -> TensorType:
        for var in self.states:
            if var.name == name:
                t = _tensor_type(var.type)
                if t is None or t.static_shape is None:
                    raise UnsupportedOperation(f"{self.model_name}: state {name!r} is not a tensor of static shape")
                return t
        raise KeyError(name)

    def new_states(self) -> dict[str, torch.Tensor]:
        """A zero-filled tensor for each state input (Core ML starts a new state at zeros)."""
        states = {}
        for var in self.states:
            t = self.state_type(var.name)
            states[var.name] = torch.zeros(t.static_shape, dtype=self.ctx.dtype(t.dtype), device=self.ctx.device)
        return states

# Ops whose output shapes may depend on input values, not only on input shapes and parameters.
DATA_DEPENDENT = frozenset({"non_zero", "cond", "while_loop", "make_list", "list_read", "list_write",
                            "list_gather", "list_scatter", "list_length"})


def shape_determined(fn: Function, kernels: Mapping[str, Kernel]) -> set[str]:
    """Top-level values whose shapes follow from the input shapes alone.

    A kernel's output shape depends only on its tensor inputs' shapes and its parameters (the
    inputs it takes as Python values), except for `DATA_DEPENDENT` ops. So an op's outputs have
    determined shapes when its tensor inputs do and its parameters are constants or values
    computed from shapes only (`shape`, and arithmetic on constants and such values).
    """
    known = {v.name for v in fn.inputs}
    values: set[str] = set()  # values computed from constants and shapes only
    for op in fn.block.operations:
        outs = {o.name for o in op.outputs}
        if op.type in ("const", "_const_symbolic") or op.type in CONSTEXPR:
            known |= outs
            values |= outs
            continue
        if op.type == "shape":
            if op.inputs.get("x") in known:
                known |= outs
                values |= outs
            continue
        kernel = kernels.get(op.type)
        if kernel is None or op.type in DATA_DEPENDENT or op.blocks:
            continue
        args = {k: v for k, v in op.attributes.items() if k != "name"}
        args.update(op.inputs)
        tensors_ok = all(a in known for k, v in args.items() if k in kernel.tensors
                         for a in _flat_args((v,)) if isinstance(a, str))
        params_ok = all(a in values for k, v in args.items() if k not in kernel.tensors
                        for a in _flat_args((v,)) if isinstance(a, str))
        if tensors_ok and params_ok:
            known |= outs
            if kernel.foldable and all(a in values for a in _flat_args(tuple(args.values())) if isinstance(a, str)):
                values |= outs
    return known


def specialize(
    fn: Function, shapes: Mapping[str, tuple[int, ...]], recorded: Mapping[str, tuple[int, ...]] | None = None
) -> Function:
    """A copy of `fn` with these inputs' symbolic dimensions bound to concrete sizes.

    Each symbol takes the size it has in the inputs, everywhere it appears (MIL writes one
    symbol for one size). `recorded` gives static shapes for other values (those that
    `shape_determined` vouches for, as seen in a run with these input shapes).
    """
    recorded = recorded or {}
    bound: dict[str, int] = {}
    for var in fn.inputs:
        t = var.type
        if var.name not in shapes or not isinstance(t, TensorType) or t.shape is None:
            continue
        shape = tuple(shapes[var.name])
        if len(shape) != len(t.shape):
            raise ModelInputError(f"input '{var.name}' has rank {len(shape)}, the model takes rank {len(t.shape)}")
        for dim, size in zip(t.shape, shape):
            if dim == "?":  # model.mil's anonymous dimension: any size, never shared
                continue
            if isinstance(dim, str):
                if bound.setdefault(dim, int(size)) != int(size):
                    raise ModelInputError(
                        f"input '{var.name}': dimension {dim} is {size} here and {bound[dim]} in another input"
                    )
            elif int(dim) != int(size):
                raise ModelInputError(f"input '{var.name}' has shape {list(shape)}, the model takes {list(t.shape)}")

    def bind_type(t: Any) -> Any:
        if isinstance(t, TensorType) and t.shape is not None and any(isinstance(d, str) for d in t.shape):
            return TensorType(t.dtype, tuple(bound.get(d, d) if isinstance(d, str) else d for d in t.shape))
        if isinstance(t, StateType):
            return StateType(bind_type(t.wrapped))
        if isinstance(t, ListType):
            return ListType(bind_type(t.element), bound.get(t.length, t.length) if isinstance(t.length, str) else t.length)
        return t

    def bind_var(v: Var) -> Var:
        if v.name in recorded and isinstance(v.type, TensorType):
            return Var(v.name, TensorType(v.type.dtype, tuple(int(d) for d in recorded[v.name])))
        t = bind_type(v.type)
        return v if t is v.type else Var(v.name, t)

    def bind_block(block: Block) -> Block:
        ops = [Operation(op.type, dict(op.inputs), tuple(bind_var(o) for o in op.outputs), op.attributes,
                         tuple(bind_block(b) for b in op.blocks)) for op in block.operations]
        return Block(ops, block.outputs, tuple(bind_var(v) for v in block.inputs))

    inputs = tuple(
        Var(v.name, TensorType(v.type.dtype, tuple(int(s) for s in shapes[v.name])))
        if v.name in shapes and isinstance(v.type, TensorType) else bind_var(v)
        for v in fn.inputs
    )
    return Function(fn.name, fn.opset, inputs, bind_block(fn.block), fn.attributes)


@contextlib.contextmanager
def _ieee_fp32() -> Iterator[None]:
    """float32 values stay float32 on CUDA: no TF32 in convolutions or matmuls while running."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if conv is not None and matmul is not None:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.cudnn.conv.fp32_precision = conv
            torch.backends.cuda.matmul.fp32_precision = matmul
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _note_shape(shapes: dict[str, tuple[int, ...]], name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        shapes[name] = tuple(value.shape)


def _truth(value: Any) -> bool:
    """The Python truth of a predicate tensor (a `cond` or `while_loop` condition)."""
    if isinstance(value, torch.Tensor):
        return bool(value.reshape(-1)[0]) if value.numel() else False
    return bool(value)


@dataclass
class _Stmt:
    """Generated source for one op at the function's top level (its nested blocks included)."""

    lines: list[str]
    reads: list[str]  # variables of the enclosing scopes it reads
    writes: list[str]
    states_written: set[str] = field(default_factory=set)
    state_read: str | None = None  # a top-level read_state: the state input it reads


class _Lowering:
    def __init__(
        self, graph: passes.Graph, ctx: Context, model_name: str, pool: ConstantPool | None = None, opset: int = 18
    ) -> None:
        self.graph = graph
        self.opset = opset
        self.ctx = ctx
        self.model_name = model_name
        self.consts: dict[str, Any] = dict(graph.consts)  # name -> Value | np.ndarray | torch.Tensor
        self.tensors: dict[str, torch.Tensor] = {}  # name -> materialized device tensor
        self.shared: set[str] = set(graph.consts)  # constants that do not depend on input shapes
        if pool is not None:
            self.consts.update(pool.values)
            self.tensors.update(pool.tensors)
            self.shared.update(pool.values)
        self.types: dict[str, ValueType] = dict(graph.types)
        self.globals: dict[str, Any] = {"_py": to_python, "_truth": _truth, "_note": _note_shape}
        self.const_idents: dict[str, str] = {}
        self.slots: dict[str, str] = {}
        self.steps = 0
        self.folded = 0
        self.blob_files: set[str] = set()
        self._anon = 0
        self._calls = 0
        self._shape_derived: set[str] = set()  # folded values computed from input shapes
        self._depth = 0  # nesting of the block being emitted

    def pool(self) -> ConstantPool:
        values = {k: v for k, v in self.consts.items() if k in self.shared and k not in self._shape_derived}
        tensors = {k: v for k, v in self.tensors.items() if k in values}
        return ConstantPool(values, tensors)

    # -- constants -------------------------------------------------------------------

    def _mil_dtype(self, name: str, value: Any) -> str | None:
        t = self.types.get(name)
        if isinstance(t, TensorType):
            return t.dtype
        if isinstance(value, TensorValue):
            return value.type.dtype
        return None

    def numpy_const(self, arg: Any) -> Any:
        """A constant argument as numpy (constexpr inputs and kernel parameters)."""
        value = self.consts[arg] if isinstance(arg, str) else arg
        if isinstance(value, TensorValue):
            if value.is_blob and (path := _weight_file(value)) is not None:
                self.blob_files.add(path)
            return value.array()
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            return value
        raise UnsupportedOperation(f"{self.model_name}: constant {arg!r} of kind {type(value).__name__} is not a tensor")

    def tensor_const(self, arg: Any) -> torch.Tensor:
        """A constant argument as a device tensor, materialized once per name."""
        if isinstance(arg, str):
            if arg not in self.tensors:
                value = self.consts[arg]
                if isinstance(value, torch.Tensor):
                    self.tensors[arg] = value
                else:
                    array = self.numpy_const(arg)
                    tensor = self._to_device(array, self._mil_dtype(arg, value))
                    self.tensors[arg] = tensor
                    if isinstance(value, TensorValue) and value.is_blob and not _shares_memory(tensor, array):
                        _drop_pages(_weight_file(value), value.data.offset)
            return self.tensors[arg]
        assert isinstance(arg, TensorValue)
        return self._to_device(self.numpy_const(arg), arg.type.dtype)

    def _to_device(self, array: np.ndarray, mil_dtype: str | None) -> torch.Tensor:
        if array.dtype == object:
            raise UnsupportedOperation(f"{self.model_name}: a string constant is used as a tensor")
        target = self.ctx.dtype(mil_dtype) if mil_dtype and mil_dtype != "string" else None
        if mil_dtype == "bf16":
            source = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
        else:
            if array.dtype in (np.uint16, np.uint32, np.uint64):
                array = array.astype(np.int64)
            with warnings.catch_warnings():
                # weights are read-only views of the mapped file; kernels never write to them
                warnings.simplefilter("ignore", UserWarning)
                source = torch.from_numpy(array) if array.flags.c_contiguous or array.ndim == 0 else torch.from_numpy(np.ascontiguousarray(array))
        if target is None:
            target = torch.float32 if source.is_floating_point() else source.dtype
        return source.to(device=self.ctx.device, dtype=target)

    def constant_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self.tensors.values():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    def _is_const(self, arg: Any) -> bool:
        if isinstance(arg, tuple):
            return all(self._is_const(a) for a in arg)
        return not isinstance(arg, str) or arg in self.consts

    def _const_ident(self, arg: Any) -> str:
        if isinstance(arg, str):
            if arg not in self.const_idents:
                ident = f"c{len(self.const_idents)}"
                self.const_idents[arg] = ident
                value = self.consts[arg]
                self.globals[ident] = value if isinstance(value, list) else self.tensor_const(arg)
            return self.const_idents[arg]
        self._anon += 1
        ident = f"i{self._anon}"
        self.globals[ident] = self.tensor_const(arg)
        return ident

    # -- ops -------------------------------------------------------------------------

    def _bindings(self, op: Operation) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in op.attributes.items() if k != "name"}
        merged.update(op.inputs)
        return merged

    def _fail(self, op: Operation, why: str) -> UnsupportedOperation:
        label = op.name or (op.outputs[0].name if op.outputs else "")
        return UnsupportedOperation(f"{self.model_name}: op '{op.type}' ({label}): {why}")

    def _param(self, op: Operation, arg: Any) -> Any:
        if isinstance(arg, tuple):
            return [self._param(op, a) for a in arg]
        value = self.consts[arg] if isinstance(arg, str) else arg
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, (TensorValue, np.ndarray)):
            return to_python(self.numpy_const(value))
        if isinstance(value, list):
            return value
        if isinstance(value, ListValue):
            return [self._param(op, item) for item in value.items]
        raise self._fail(op, f"parameter of kind {type(value).__name__} is not supported")

    def _mark_derived(self, op: Operation, args: Any) -> None:
        """Remember folded outputs that depend on input shapes (not reusable across shapes)."""
        names = [a for a in _flat_args(args) if isinstance(a, str)]
        if op.type == "shape" or any(n in self._shape_derived for n in names) or \
                any(n not in self.shared for n in names):
            self._shape_derived.update(o.name for o in op.outputs)
        else:
            self.shared.update(o.name for o in op.outputs)

    def _constexpr(self, op: Operation) -> None:
        args = self._bindings(op)
        values: dict[str, Any] = {}
        for key, arg in args.items():
            if not self._is_const(arg):
                raise self._fail(op, f"input '{key}' must be constant")
            array = np.asarray(self.numpy_const(arg))
            values[key] = array.item() if array.ndim == 0 else array
        try:
            result = CONSTEXPR[op.type](**values)
        except TypeError as exc:
            raise self._fail(op, str(exc)) from exc
        results = result if isinstance(result, tuple) else (result,)
        for out, array in zip(op.outputs, results):
            self.consts[out.name] = np.asarray(array)
        self._mark_derived(op, tuple(args.values()))
        self.folded += 1

    def _call_kwargs(self, op: Operation, kernel: Kernel, args: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Keyword arguments for a load-time call, and whether all of them are constant."""
        unknown = set(args) - kernel.params
        if unknown:
            raise self._fail(op, f"input(s) {', '.join(sorted(unknown))} are not supported")
        return args, kernel.foldable and all(self._is_const(a) for a in args.values())

    def _bound(self, op: Operation, kernel: Kernel, const_params: dict[str, Any]) -> Callable[..., Any]:
        extra: dict[str, Any] = dict(const_params)
        if kernel.wants_ctx:
            extra["ctx"] = self.ctx
        if kernel.wants_out_dtype:
            t = op.outputs[0].type if op.outputs else None
            if isinstance(t, ListType):
                t = t.element
            extra["out_dtype"] = self.ctx.dtype(t.dtype) if isinstance(t, TensorType) else None
        if kernel.wants_opset:
            extra["opset"] = self.opset
        if kernel.wants_out_shape:
            t = op.outputs[0].type if op.outputs else None
            extra["out_shape"] = t.shape if isinstance(t, TensorType) else None
        return functools.partial(kernel.fn, **extra) if extra else kernel.fn

    def _fold(self, op: Operation, kernel: Kernel, args: dict[str, Any]) -> None:
        params = {k: self._param(op, v) for k, v in args.items() if k not in kernel.tensors}
        tensors: dict[str, Any] = {}
        for key, arg in args.items():
            if key in kernel.tensors:
                tensors[key] = tuple(self.tensor_const(a) for a in arg) if isinstance(arg, tuple) else self.tensor_const(arg)
        with torch.inference_mode():
            result = self._bound(op, kernel, params)(**tensors)
        results = result if isinstance(result, tuple) and (len(op.outputs) > 1 or op.type in TUPLE_RESULTS) else (result,)
        for out, value in zip(op.outputs, results):
            self.consts[out.name] = value
        self._mark_derived(op, tuple(args.values()))
        self.folded += 1

    def _expr(self, arg: Any) -> str:
        if isinstance(arg, tuple):
            return "(" + "".join(self._expr(a) + ", " for a in arg) + ")"
        if isinstance(arg, str) and arg in self.slots:
            return self.slots[arg]
        if isinstance(arg, str) and arg not in self.consts:
            raise UnsupportedOperation(f"{self.model_name}: variable {arg!r} is read before it is defined")
        return self._const_ident(arg)

    def _new_slot(self, name: str) -> str:
        slot = f"v{len(self.slots)}"
        self.slots[name] = slot
        return slot

    def _fold_shape(self, op: Operation) -> bool:
        """`shape` of a value whose type is static is a constant (after shape specialization)."""
        x = op.inputs.get("x")
        t = self.types.get(x) if isinstance(x, str) else None
        if op.type != "shape" or not isinstance(t, TensorType) or t.static_shape is None:
            return False
        out = op.outputs[0]
        dtype = out.type.dtype if isinstance(out.type, TensorType) else "int32"
        array = np.asarray(t.static_shape, dtype=np.int64 if dtype == "int64" else np.int32).reshape(-1)
        self.consts[out.name] = array
        self._shape_derived.add(out.name)
        self.folded += 1
        return True

    def emit(self) -> tuple[str, Callable[..., tuple[torch.Tensor, ...]], Callable[..., tuple[torch.Tensor, ...]]]:
        """(source, run, traced): `traced(shapes, *inputs)` also notes each top-level value's shape."""
        graph = self.graph
        params = [self._new_slot(var.name) for var in graph.inputs]
        stmts = self._emit_ops(graph.ops)
        self.steps = self._calls
        self._copy_state_reads(stmts)
        source, run = self._source(params, stmts)
        _, traced = self._source(params, stmts, trace=True)
        return source, run, traced

    def _emit_ops(self, ops: list[Operation]) -> list[_Stmt]:
        stmts: list[_Stmt] = []
        for op in ops:
            stmt = self._emit_op(op)
            if isinstance(stmt, list):
                stmts.extend(stmt)
            elif stmt is not None:
                stmts.append(stmt)
        return stmts

    def _emit_op(self, op: Operation) -> _Stmt | list[_Stmt] | None:
        for out in op.outputs:
            self.types[out.name] = out.type
        if op.type in ("const", "_const_symbolic"):
            self.consts[op.outputs[0].name] = op.attributes["val"]
            self.shared.add(op.outputs[0].name)
            return None
        if op.outputs and all(out.name in self.consts for out in op.outputs):
            return None  # folded by an earlier compilation of this function
        if op.type in CONSTEXPR:
            self._constexpr(op)
            return None
        if op.type == "cond":
            return self._emit_cond(op)
        if op.type == "while_loop":
            return self._emit_while(op)
        if op.blocks:
            raise self._fail(op, "an op with nested blocks the runtime does not know")
        if self._fold_shape(op):
            return None
        kernel = KERNELS.get(op.type)
        if kernel is None:
            raise self._fail(op, "not implemented")
        args, constant = self._call_kwargs(op, kernel, self._bindings(op))
        if constant:
            self._fold(op, kernel, args)
            return None
        const_params: dict[str, Any] = {}
        parts: list[str] = []
        for key, arg in args.items():
            if key in kernel.tensors:
                parts.append(f"{key}={self._expr(arg)}")
            elif self._is_const(arg):
                const_params[key] = self._param(op, arg)
            else:
                parts.append(f"{key}=_py({self._expr(arg)})")
        ident = f"k{self._calls}"
        self._calls += 1
        self.globals[ident] = self._bound(op, kernel, const_params)
        reads = [name for name in op.input_names() if name in self.slots]
        state = op.inputs.get(passes.STATE_WRITES.get(op.type, "input")) \
            if op.type == "read_state" or op.type in passes.STATE_WRITES else None
        if op.type == "read_state" and self._depth:
            # inside a block the order of reads and writes is not known here: always copy
            self.globals[ident] = functools.partial(self.globals[ident], copy=True)
        outs = [self._new_slot(out.name) for out in op.outputs]
        call = f"{ident}({', '.join(parts)})"
        written = {state} if op.type in passes.STATE_WRITES and isinstance(state, str) else set()
        if not outs:
            return _Stmt([call], reads, [], written)
        target = ", ".join(outs) + ("," if len(outs) == 1 and op.type in TUPLE_RESULTS else "")
        read = state if op.type == "read_state" and isinstance(state, str) else None
        return _Stmt([f"{target} = {call}"], reads, [o.name for o in op.outputs], written, read)

    def _block_lines(self, block: Block, outputs: list[str]) -> tuple[list[str], set[str], set[str]]:
        """Lines of a nested block ending with `outputs = block outputs`; (lines, reads, states written)."""
        self._depth += 1
        try:
            inner = self._emit_ops(block.operations)
        finally:
            self._depth -= 1
        lines = [line for stmt in inner for line in stmt.lines]
        defined = {v.name for v in block.inputs} | {w for stmt in inner for w in stmt.writes}
        reads = {r for stmt in inner for r in stmt.reads}
        results = [self._expr(name) for name in block.outputs]
        reads.update(name for name in block.outputs if name in self.slots)
        if outputs:
            lines.append(f"{', '.join(outputs)} = {', '.join(results)}")
        if not lines:
            lines.append("pass")
        return lines, reads - defined, {w for stmt in inner for w in stmt.states_written}

    def _emit_cond(self, op: Operation) -> _Stmt | list[_Stmt]:
        pred = op.inputs.get("pred")
        if len(op.blocks) != 2:
            raise self._fail(op, f"expected two blocks, found {len(op.blocks)}")
        if self._is_const(pred):
            # a constant predicate: only the branch taken is compiled, in line
            branch = op.blocks[0] if bool(np.asarray(self.numpy_const(pred)).reshape(-1)[0]) else op.blocks[1]
            stmts = self._emit_ops(branch.operations)
            for out, name in zip(op.outputs, branch.outputs):
                if name in self.slots:
                    stmts.append(_Stmt([f"{self._new_slot(out.name)} = {self.slots[name]}"], [name], [out.name]))
                    continue
                self.consts[out.name] = self.consts[name]
                if name in self._shape_derived or name not in self.shared:
                    self._shape_derived.add(out.name)
                else:
                    self.shared.add(out.name)
            return stmts
        outs = [self._new_slot(out.name) for out in op.outputs]
        then_lines, then_reads, then_written = self._block_lines(op.blocks[0], outs)
        else_lines, else_reads, else_written = self._block_lines(op.blocks[1], outs)
        lines = [f"if _truth({self._expr(pred)}):"] + ["    " + line for line in then_lines]
        lines += ["else:"] + ["    " + line for line in else_lines]
        reads = then_reads | else_reads | ({pred} if isinstance(pred, str) and pred in self.slots else set())
        self._calls += 1
        return _Stmt(lines, sorted(reads), [o.name for o in op.outputs], then_written | else_written)

    def _emit_while(self, op: Operation) -> _Stmt:
        if len(op.blocks) != 2:
            raise self._fail(op, f"expected a condition block and a body block, found {len(op.blocks)} blocks")
        loop_vars = op.inputs.get("loop_vars")
        initial = loop_vars if isinstance(loop_vars, tuple) else (loop_vars,)
        cond_block, body_block = op.blocks
        if len(cond_block.inputs) != len(initial) or len(body_block.inputs) != len(initial):
            raise self._fail(op, "its blocks do not take one input per loop variable")
        carried = [f"w{self._anon + i}" for i in range(len(initial))]
        self._anon += len(initial)
        for block in (cond_block, body_block):
            for var, slot in zip(block.inputs, carried):
                self.slots[var.name] = slot
                self.types[var.name] = var.type
        flag = f"w{self._anon}"
        self._anon += 1
        cond_lines, cond_reads, cond_written = self._block_lines(cond_block, [flag])
        body_lines, body_reads, body_written = self._block_lines(body_block, carried)
        init = ", ".join(self._expr(a) for a in initial)
        lines = [f"{', '.join(carried)}, = {init},", "while True:"]
        lines += ["    " + line for line in cond_lines]
        lines += [f"    if not _truth({flag}):", "        break"]
        lines += ["    " + line for line in body_lines]
        outs = [self._new_slot(out.name) for out in op.outputs]
        if outs:
            lines.append(f"{', '.join(outs)}, = {', '.join(carried[:len(outs)])},")
        reads = cond_reads | body_reads | {a for a in initial if isinstance(a, str) and a in self.slots}
        self._calls += 1
        return _Stmt(lines, sorted(reads), [o.name for o in op.outputs], cond_written | body_written)

    def _copy_state_reads(self, stmts: list[_Stmt]) -> None:
        """Make a top-level `read_state` copy the state when the state is written before the
        value read is last used (or returned): otherwise the value reads the state in place."""
        for index, stmt in enumerate(stmts):
            if stmt.state_read is None:
                continue
            read = stmt.writes[0]
            write = next((i for i in range(index + 1, len(stmts)) if stmt.state_read in stmts[i].states_written),
                         None)
            if write is None:
                continue
            used_after = read in self.graph.outputs or any(read in s.reads for s in stmts[write + 1 :])
            used_by_write = read in stmts[write].reads and len(stmts[write].lines) > 1  # inside a block
            if used_after or used_by_write:
                slot = self.slots[read]
                stmt.lines[-1] += f"; {slot} = {slot}.clone()"

    def _source(
        self, params: list[str], stmts: list[_Stmt], trace: bool = False
    ) -> tuple[str, Callable[..., tuple[torch.Tensor, ...]]]:
        graph = self.graph
        last_use: dict[str, int] = {}
        for index, stmt in enumerate(stmts):
            for name in stmt.reads:
                last_use[name] = index
            for name in stmt.writes:
                last_use.setdefault(name, index)  # written and never read: free right away
        keep = set(graph.outputs) | {v.name for v in graph.inputs if isinstance(v.type, StateType)}
        lines = [f"def run({', '.join((['_shapes'] if trace else []) + params)}):"]
        for index, stmt in enumerate(stmts):
            lines.extend(f"    {line}" for line in stmt.lines)
            if trace:
                lines.extend(f"    _note(_shapes, {name!r}, {self.slots[name]})" for name in stmt.writes)
            dead = sorted(
                {self.slots[n] for n, last in last_use.items() if last == index and n not in keep and n in self.slots}
            )
            if dead:
                lines.append(f"    del {', '.join(dead)}")
        returned = [self._expr(name) for name in graph.outputs]
        lines.append(f"    return ({''.join(r + ', ' for r in returned)})")
        source = "\n".join(lines) + "\n"
        namespace = dict(self.globals)
        code = compile(source, f"<ml-program {self.model_name}>", "exec")
        exec(code, namespace)  # noqa: S102 - source generated above from the program's structure
        return source, namespace["run"]

def _flat_args(args: Any) -> Iterator[Any]:
    for arg in args:
        if isinstance(arg, tuple):
            yield from _flat_args(arg)
        else:
            yield arg


def _shares_memory(tensor: torch.Tensor, array: np.ndarray) -> bool:
    if tensor.device.type != "cpu" or array.size == 0:
        return False
    start = array.__array_interface__["data"][0]
    return tensor.untyped_storage().data_ptr() <= start < tensor.untyped_storage().data_ptr() + tensor.untyped_storage().nbytes()


def _weight_file(value: TensorValue) -> str | None:
    """The weight file of a file-backed constant; None for a bad path, which reading it reports."""
    from .blob import BlobError, resolve_blob_path

    assert isinstance(value.data, BlobRef)
    try:
        return str(resolve_blob_path(value.data.path, value.base_dir))
    except BlobError:
        return None


def _drop_pages(path: str | None, offset: int | None = None) -> None:
    """Let the kernel drop a weight file's mapped pages: those of the blob at `offset`, or all.

    Pages of a read-only file mapping come back from the page cache when read again, so this
    is safe even where a tensor still views the map (fp32 weights on the CPU). Done weight by
    weight as each reaches the device, it keeps an fp16 file from staying resident next to the
    float32 copies made from it.
    """
    if path is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    from .blob import open_blob_file

    try:
        blob = open_blob_file(path)
        if offset is None:
            blob._mm.madvise(mmap.MADV_DONTNEED)
        else:
            info = blob.info(offset)
            start = info.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
            blob._mm.madvise(mmap.MADV_DONTNEED, start, info.data_offset + info.size - start)
    except (CoremlHubError, OSError, ValueError):
        pass  # only a hint to the kernel; reading the weights reports real problems


def unsupported_ops(functions: list[Function]) -> dict[str, int]:
    """Op type -> count, for ops no kernel implements (control-flow blocks included)."""
    from .ops import supported_ops

    known = supported_ops()
    missing: dict[str, int] = {}
    for fn in functions:
        for op in fn.block.walk():
            if op.type not in known or op.type.startswith("coreml_hub."):
                missing[op.type] = missing.get(op.type, 0) + 1
    return missing

