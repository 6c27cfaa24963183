"""Compile a program's main function into one flat Python function over torch tensors.

Lowering resolves every op to its kernel once: constant parameters become Python
values bound into the kernel, constant tensors are materialized on the device once
(and shared by every op that reads them), ops whose inputs are all constant —
weight decompression included — run once at load time. What remains is emitted as
straight-line Python source, one kernel call per op, with each intermediate deleted
after its last reader, so the hot loop has no dictionaries, no op-name dispatch and
holds no tensor longer than needed. The same function can be handed to torch.compile.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import CoremlHubError, UnsupportedOperation
from . import passes
from .ops import CONSTEXPR, KERNELS, Context, Kernel, to_python
from .program import BlobRef, Function, Operation, TensorType, TensorValue


@dataclass(frozen=True)
class CompileStats:
    ops_in_program: int
    steps: int  # kernel calls per prediction
    folded: int  # ops evaluated once at load time
    attention_fused: int
    group_norm_fused: int
    constant_bytes: int  # device memory held by constants


class CompiledFunction:
    """A program function lowered to `run(*inputs) -> tuple(outputs)`."""

    def __init__(
        self,
        fn: Function,
        ctx: Context,
        *,
        fuse: bool = True,
        torch_compile: bool = False,
        model_name: str = "model",
    ) -> None:
        self.ctx = ctx
        graph = passes.Graph.from_function(fn)
        ops_in_program = len(fn.block.operations)
        report = passes.optimize(graph, same_float=self._same_float, fuse=fuse)
        lowering = _Lowering(graph, ctx, model_name)
        self.source, run = lowering.emit()
        self.input_names = tuple(v.name for v in graph.inputs)
        self.output_names = tuple(graph.output_names)
        self.input_dtypes = tuple(ctx.dtype(v.type.dtype) for v in graph.inputs if isinstance(v.type, TensorType))
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


class _Lowering:
    def __init__(self, graph: passes.Graph, ctx: Context, model_name: str) -> None:
        self.graph = graph
        self.ctx = ctx
        self.model_name = model_name
        self.consts: dict[str, Any] = dict(graph.consts)  # name -> Value | np.ndarray | torch.Tensor
        self.tensors: dict[str, torch.Tensor] = {}  # name -> materialized device tensor
        self.globals: dict[str, Any] = {"_py": to_python}
        self.const_idents: dict[str, str] = {}
        self.slots: dict[str, str] = {}
        self.steps = 0
        self.folded = 0
        self.blob_files: set[str] = set()
        self._anon = 0

    # -- constants -------------------------------------------------------------------

    def _mil_dtype(self, name: str, value: Any) -> str | None:
        t = self.graph.types.get(name)
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
        target = self.ctx.dtype(mil_dtype) if mil_dtype else None
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
                self.globals[ident] = self.tensor_const(arg)
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
        return UnsupportedOperation(f"{self.model_name}: op '{op.type}' ({op.name or op.outputs[0].name}): {why}")

    def _param(self, op: Operation, arg: Any) -> Any:
        if isinstance(arg, tuple):
            return [self._param(op, a) for a in arg]
        value = self.consts[arg] if isinstance(arg, str) else arg
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, TensorValue):
            return to_python(self.numpy_const(value))
        raise self._fail(op, f"parameter of kind {type(value).__name__} is not supported")

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
        self.folded += 1

    def _call_kwargs(self, op: Operation, kernel: Kernel, args: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Keyword arguments for a load-time call, and whether all of them are constant."""
        unknown = set(args) - kernel.params
        if unknown:
            raise self._fail(op, f"input(s) {', '.join(sorted(unknown))} are not supported")
        return args, all(self._is_const(a) for a in args.values())

    def _bound(self, op: Operation, kernel: Kernel, const_params: dict[str, Any]) -> Callable[..., Any]:
        extra: dict[str, Any] = dict(const_params)
        if kernel.wants_ctx:
            extra["ctx"] = self.ctx
        if kernel.wants_out_dtype:
            t = op.outputs[0].type
            extra["out_dtype"] = self.ctx.dtype(t.dtype) if isinstance(t, TensorType) else None
        return functools.partial(kernel.fn, **extra) if extra else kernel.fn

    def _fold(self, op: Operation, kernel: Kernel, args: dict[str, Any]) -> None:
        params = {k: self._param(op, v) for k, v in args.items() if k not in kernel.tensors}
        tensors: dict[str, Any] = {}
        for key, arg in args.items():
            if key in kernel.tensors:
                tensors[key] = tuple(self.tensor_const(a) for a in arg) if isinstance(arg, tuple) else self.tensor_const(arg)
        with torch.inference_mode():
            result = self._bound(op, kernel, params)(**tensors)
        results = result if isinstance(result, tuple) and (len(op.outputs) > 1 or op.type == "split") else (result,)
        for out, value in zip(op.outputs, results):
            self.consts[out.name] = value
        self.folded += 1

    def _expr(self, arg: Any) -> str:
        if isinstance(arg, tuple):
            return "(" + "".join(self._expr(a) + ", " for a in arg) + ")"
        if isinstance(arg, str) and arg in self.slots:
            return self.slots[arg]
        return self._const_ident(arg)

    def emit(self) -> tuple[str, Callable[..., tuple[torch.Tensor, ...]]]:
        graph = self.graph
        params = []
        for i, var in enumerate(graph.inputs):
            self.slots[var.name] = f"a{i}"
            params.append(f"a{i}")
        calls: list[tuple[Operation, str, list[str]]] = []  # op, call source, runtime names read
        for op in graph.ops:
            if op.blocks:
                raise self._fail(op, "control flow is not supported")
            if op.type in CONSTEXPR:
                self._constexpr(op)
                continue
            kernel = KERNELS.get(op.type)
            if kernel is None:
                raise self._fail(op, "not implemented")
            args, constant = self._call_kwargs(op, kernel, self._bindings(op))
            if constant:
                self._fold(op, kernel, args)
                continue
            const_params: dict[str, Any] = {}
            parts: list[str] = []
            for key, arg in args.items():
                if key in kernel.tensors:
                    parts.append(f"{key}={self._expr(arg)}")
                elif self._is_const(arg):
                    const_params[key] = self._param(op, arg)
                else:
                    parts.append(f"{key}=_py({self._expr(arg)})")
            ident = f"k{len(calls)}"
            self.globals[ident] = self._bound(op, kernel, const_params)
            outs = []
            for out in op.outputs:
                slot = f"v{len(self.slots)}"
                self.slots[out.name] = slot
                outs.append(slot)
            target = ", ".join(outs) + ("," if len(outs) == 1 and op.type == "split" else "")
            reads = [name for name in op.input_names() if name in self.slots]
            calls.append((op, f"{target} = {ident}({', '.join(parts)})", reads))
        self.steps = len(calls)
        return self._source(params, calls)

    def _source(
        self, params: list[str], calls: list[tuple[Operation, str, list[str]]]
    ) -> tuple[str, Callable[..., tuple[torch.Tensor, ...]]]:
        graph = self.graph
        last_use: dict[str, int] = {}
        for index, (op, _, reads) in enumerate(calls):
            for name in reads:
                last_use[name] = index
            for out in op.outputs:
                last_use.setdefault(out.name, index)  # written and never read: free right away
        keep = set(graph.outputs)
        lines = [f"def run({', '.join(params)}):"]
        for index, (op, call, _) in enumerate(calls):
            lines.append(f"    {call}")
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

