"""Graph passes that make a converted program run well on PyTorch without changing its results.

They work on a `Graph`: the main function's ops with constants split out. Each pass is
a plain function `Graph -> None` and is verified by running models with and without it.

- `drop_noops`: casts between float types that run as the same torch dtype, identity ops,
  reshapes/transposes/squeezes that keep the shape and order.
- `fuse_attention`: scores = Q·Kᵀ (matmul or einsum) [· scale] [+ mask] -> softmax over the
  key axis -> · V becomes one `torch.nn.functional.scaled_dot_product_attention`.
- `merge_heads`: per-head attentions over slices of the same Q, K, V joined by a concat (the
  split_einsum form) become one fused attention over all heads.
- `fuse_group_norm`: the converter's decomposed group norm (reshape to groups, mean,
  variance, normalize, reshape back [, · gamma + beta]) becomes `F.group_norm`.
- `drop_zero_bias`: all-zero constant biases of linear/conv (the converter adds them).
- `eliminate_dead_code`: ops nothing reads (state writes are always kept).

Passes rewrite the function's top-level ops; an op with nested blocks (`cond`,
`while_loop`) counts as reading every outer variable its blocks read, and renames
reach into its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .program import FLOAT_DTYPES, Block, Function, Operation, TensorType, TensorValue, Value, ValueType, Var

ATTENTION = "coreml_hub.attention"
GROUP_NORM = "coreml_hub.group_norm"
# Ops that write a state input, with the input naming the state: run for their effect,
# so never removed as dead code.
STATE_WRITES = {"write_state": "input", "coreml_update_state": "state"}
SIDE_EFFECTS = frozenset(STATE_WRITES)


def reads(op: Operation) -> set[str]:
    """Variables `op` reads: its inputs and what its nested blocks read from outside them."""
    names = set(op.input_names())
    for block in op.blocks:
        names |= block_reads(block)
    return names


def block_reads(block: Block) -> set[str]:
    """Variables a block reads that are defined outside it."""
    defined = {v.name for v in block.inputs}
    found: set[str] = set()
    for op in block.operations:
        found |= reads(op) - defined
        defined.update(out.name for out in op.outputs)
    found |= set(block.outputs) - defined
    return found


def _copy_op(op: Operation) -> Operation:
    """A copy passes may rewrite without touching the program the op came from."""
    return Operation(op.type, dict(op.inputs), op.outputs, op.attributes,
                     tuple(Block([_copy_op(o) for o in b.operations], b.outputs, b.inputs) for b in op.blocks))


@dataclass
class Graph:
    inputs: list[Var]
    ops: list[Operation]
    outputs: list[str]  # the variables holding the function outputs (after renames)
    output_names: list[str]  # the names the outputs are returned under
    consts: dict[str, Value]  # variable -> constant value (from `const` ops)
    types: dict[str, ValueType] = field(default_factory=dict)

    @classmethod
    def from_function(cls, fn: Function) -> "Graph":
        consts: dict[str, Value] = {}
        ops: list[Operation] = []
        types: dict[str, ValueType] = {v.name: v.type for v in fn.inputs}
        for op in fn.block.operations:
            for out in op.outputs:
                types[out.name] = out.type
            if op.type in ("const", "_const_symbolic"):
                consts[op.outputs[0].name] = op.attributes["val"]
            else:
                ops.append(_copy_op(op))
        outputs = list(fn.block.outputs)
        return cls(list(fn.inputs), ops, list(outputs), list(outputs), consts, types)

    # -- queries ---------------------------------------------------------------------

    def producers(self) -> dict[str, Operation]:
        return {out.name: op for op in self.ops for out in op.outputs}

    def consumers(self) -> dict[str, list[Operation]]:
        users: dict[str, list[Operation]] = {}
        for op in self.ops:
            for name in reads(op):
                users.setdefault(name, []).append(op)
        return users

    def const_value(self, arg: Any) -> np.ndarray | None:
        """The numpy value of an argument when it is a constant tensor, else None."""
        value = self.consts.get(arg) if isinstance(arg, str) else arg
        if isinstance(value, TensorValue):
            return value.array()
        return None

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self.types.get(name)
        return t.static_shape if isinstance(t, TensorType) else None

    def dtype(self, name: str) -> str | None:
        t = self.types.get(name)
        return t.dtype if isinstance(t, TensorType) else None

    # -- edits -----------------------------------------------------------------------

    def rename_uses(self, renames: dict[str, str]) -> None:
        """Make every reader of a renamed variable read its replacement instead."""
        if not renames:
            return

        def resolve(name: str) -> str:
            seen = 0
            while name in renames and seen < len(renames) + 1:
                name = renames[name]
                seen += 1
            return name

        def fix(binding: Any) -> Any:
            if isinstance(binding, tuple):
                return tuple(fix(b) for b in binding)
            return resolve(binding) if isinstance(binding, str) else binding

        def fix_ops(ops: list[Operation]) -> None:
            for op in ops:
                op.inputs = {k: fix(v) for k, v in op.inputs.items()}
                for block in op.blocks:
                    fix_ops(block.operations)
                    block.outputs = tuple(resolve(n) for n in block.outputs)

        fix_ops(self.ops)
        self.outputs = [resolve(n) for n in self.outputs]


def scalar(value: float | int | bool | str | list[Any], dtype: str) -> TensorValue:
    """An immediate argument for the fused ops."""
    array = np.asarray(value, dtype=object if dtype == "string" else None)
    if dtype != "string":
        array = array.astype({"fp32": np.float32, "int32": np.int32, "bool": np.bool_}[dtype])
    return TensorValue(TensorType(dtype, tuple(array.shape)), array)


# -- no-op removal -------------------------------------------------------------------


def drop_noops(graph: Graph, same_float: Callable[[str, str], bool]) -> None:
    """Remove ops that return their input unchanged under this run's dtype mapping."""
    renames: dict[str, str] = {}
    kept: list[Operation] = []
    for op in graph.ops:
        source = _noop_source(graph, op, same_float)
        if source is not None and op.outputs[0].name not in graph.outputs:
            renames[op.outputs[0].name] = source
        else:
            kept.append(op)
    graph.ops = kept
    graph.rename_uses(renames)


def _noop_source(graph: Graph, op: Operation, same_float: Callable[[str, str], bool]) -> str | None:
    values = op.inputs.get("values")
    if op.type == "concat" and isinstance(values, tuple) and len(values) == 1 and isinstance(values[0], str):
        # one tensor concatenated with nothing (split_einsum's per-head query chunks when the
        # sequence fits one chunk): a copy the runtime can skip
        return values[0] if values[0] not in graph.consts else None
    x = op.inputs.get("x")
    if not isinstance(x, str) or len(op.outputs) != 1 or x in graph.consts:
        return None
    out = op.outputs[0].name
    if op.type == "identity":
        return x
    if op.type == "cast":
        target = graph.const_value(op.inputs.get("dtype"))
        source = graph.dtype(x)
        if target is not None and source in FLOAT_DTYPES and str(target.item()) in FLOAT_DTYPES:
            return x if same_float(source, str(target.item())) else None
        return x if source is not None and target is not None and source == str(target.item()) else None
    if op.type in ("reshape", "squeeze", "expand_dims"):
        shape_in, shape_out = graph.shape(x), graph.shape(out)
        return x if shape_in is not None and shape_in == shape_out else None
    if op.type == "transpose":
        perm = graph.const_value(op.inputs.get("perm"))
        if perm is not None:
            rank = perm.size
            if [int(p) % rank for p in perm.reshape(-1)] == list(range(rank)):
                return x
    return None


def drop_zero_bias(graph: Graph) -> int:
    """Remove all-zero constant biases of linear and conv: adding zeros costs a pass over the output."""
    dropped = 0
    for op in graph.ops:
        if op.type in ("linear", "conv", "conv_transpose") and "bias" in op.inputs:
            value = graph.const_value(op.inputs["bias"])
            if value is not None and value.dtype.kind == "f" and not np.any(value):
                op.inputs = {k: v for k, v in op.inputs.items() if k != "bias"}
                dropped += 1
    return dropped


# -- dead code -----------------------------------------------------------------------


def eliminate_dead_code(graph: Graph) -> None:
    live = set(graph.outputs)
    kept: list[Operation] = []
    for op in reversed(graph.ops):
        if op.type in SIDE_EFFECTS or any(out.name in live for out in op.outputs) or _writes_state(op):
            kept.append(op)
            live.update(reads(op))
    graph.ops = list(reversed(kept))
    graph.consts = {k: v for k, v in graph.consts.items() if k in live}


def _writes_state(op: Operation) -> bool:
    return any(inner.type in SIDE_EFFECTS for block in op.blocks for inner in block.walk())


# -- attention -----------------------------------------------------------------------


def _matmul_labels(graph: Graph, op: Operation) -> tuple[list[str], list[str], str] | None:
    """A rank-matched matmul as einsum labels: (x labels, y labels, output labels)."""
    x, y = op.inputs.get("x"), op.inputs.get("y")
    if not isinstance(x, str) or not isinstance(y, str):
        return None
    sx, sy = graph.shape(x), graph.shape(y)
    if sx is None or sy is None or len(sx) != len(sy) or len(sx) < 2:
        return None
    tx = graph.const_value(op.inputs.get("transpose_x"))
    ty = graph.const_value(op.inputs.get("transpose_y"))
    batch = "abcdefgh"[: len(sx) - 2]
    a = batch + ("ki" if tx is not None and bool(tx) else "ik")
    b = batch + ("jk" if ty is not None and bool(ty) else "kj")
    return [x, y], [a, b], batch + "ij"


def _einsum_labels(graph: Graph, op: Operation) -> tuple[list[str], list[str], str] | None:
    values = op.inputs.get("values")
    equation = graph.const_value(op.inputs.get("equation"))
    if not isinstance(values, tuple) or len(values) != 2 or equation is None:
        return None
    if not all(isinstance(v, str) for v in values):
        return None
    text = str(equation.item()).replace(" ", "")
    if "..." in text or "->" not in text:
        return None
    lhs, out = text.split("->")
    labels = lhs.split(",")
    if len(labels) != 2 or any(len(set(s)) != len(s) for s in labels + [out]):
        return None
    for name, spec in zip(values, labels):
        shape = graph.shape(name)
        if shape is None or len(shape) != len(spec):
            return None
    return list(values), labels, out


def _as_contraction(graph: Graph, op: Operation) -> tuple[list[str], list[str], str] | None:
    if op.type == "matmul":
        return _matmul_labels(graph, op)
    if op.type == "einsum":
        return _einsum_labels(graph, op)
    return None


def _single_user(users: dict[str, list[Operation]], graph: Graph, name: str) -> Operation | None:
    readers = users.get(name, [])
    if len(readers) != 1 or name in graph.outputs:
        return None
    return readers[0]


def _is_float_cast(graph: Graph, op: Operation) -> bool:
    if op.type != "cast":
        return False
    target = graph.const_value(op.inputs.get("dtype"))
    return target is not None and str(target.item()) in FLOAT_DTYPES and graph.dtype(op.inputs["x"]) in FLOAT_DTYPES


def _scalar_const(graph: Graph, arg: Any) -> float | None:
    value = graph.const_value(arg)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


Match = tuple[list[Operation], Operation, Operation]  # ops replaced, the fused op, the op it takes the place of


def _fuse_each(graph: Graph, at: Callable[[Graph, dict[str, Operation], dict[str, list[Operation]], Operation],
                                          Match | None], candidate: Callable[[Operation], bool]) -> int:
    """Replace every match of a pattern; returns how many.

    The graph's producer and reader maps are built once and every candidate op is tried on
    them (rebuilding them after each replacement made loading a real Unet take seconds). That
    holds because a match replaces only ops private to it (their outputs have no other
    readers) by one op with the anchor's outputs: what other candidates see is unchanged.
    Matches that would share an op are taken one at a time.
    """
    fused = 0
    while True:
        producers, users = graph.producers(), graph.consumers()
        claimed: set[int] = set()
        replace: dict[int, Operation] = {}
        for op in graph.ops:
            if id(op) in claimed or not candidate(op):
                continue
            match = at(graph, producers, users, op)
            if match is None:
                continue
            removed, fused_op, anchor = match
            ids = {id(o) for o in removed} | {id(anchor)}
            if ids & claimed:
                continue
            claimed |= ids
            replace[id(anchor)] = fused_op
        if not replace:
            return fused
        graph.ops = [replace.get(id(op), op) for op in graph.ops if id(op) not in claimed or id(op) in replace]
        fused += len(replace)


def fuse_attention(graph: Graph) -> int:
    """Replace each softmax-attention pattern by one fused op; returns how many were fused."""
    return _fuse_each(graph, _attention_at, lambda op: op.type == "softmax" and isinstance(op.inputs.get("x"), str))


def _attention_at(
    graph: Graph, producers: dict[str, Operation], users: dict[str, list[Operation]], softmax: Operation
) -> Match | None:
    chain: list[Operation] = [softmax]
    scale, mask = 1.0, None
    # walk back from the softmax input: [cast] [add mask] [cast] [scale] [cast] <- contraction
    current = softmax.inputs["x"]
    seen_mask = seen_scale = False
    while True:
        op = producers.get(current)
        if op is None or _single_user(users, graph, current) is None:
            return None
        if _is_float_cast(graph, op):
            chain.append(op)
            current = op.inputs["x"]
            continue
        if op.type == "add" and not seen_mask and not seen_scale:
            x, y = op.inputs.get("x"), op.inputs.get("y")
            score_side = x if isinstance(x, str) and x in producers and _leads_to_contraction(graph, producers, x) else y
            other = y if score_side is x else x
            if not isinstance(score_side, str) or not isinstance(other, str):
                return None
            mask, seen_mask = other, True
            chain.append(op)
            current = score_side
            continue
        if op.type in ("mul", "real_div") and not seen_scale:
            x, y = op.inputs.get("x"), op.inputs.get("y")
            constant = _scalar_const(graph, y)
            side = x
            if constant is None and op.type == "mul":
                constant, side = _scalar_const(graph, x), y
            if constant is None or not isinstance(side, str) or (op.type == "real_div" and constant == 0.0):
                return None
            scale = constant if op.type == "mul" else 1.0 / constant
            seen_scale = True
            chain.append(op)
            current = side
            continue
        break
    first = producers.get(current)
    if first is None:
        return None
    scores = _as_contraction(graph, first)
    if scores is None:
        return None
    chain.append(first)

    # after the softmax: [cast] -> contraction with V
    current = softmax.outputs[0].name
    second = _single_user(users, graph, current)
    while second is not None and _is_float_cast(graph, second):
        chain.append(second)
        current = second.outputs[0].name
        second = _single_user(users, graph, current)
    if second is None:
        return None
    values = _as_contraction(graph, second)
    if values is None:
        return None
    chain.append(second)

    rank_axis = graph.shape(softmax.inputs["x"])
    if rank_axis is None:
        return None
    axis_value = graph.const_value(softmax.inputs.get("axis"))
    axis = int(axis_value.item()) if axis_value is not None else -1
    layout = _attention_layout(scores, values, current, axis % len(rank_axis))
    if layout is None:
        return None
    query, key, value, perms, out_perm, out1 = layout
    mask_perm = None
    if mask is not None:
        mask_shape = graph.shape(mask)
        if mask_shape is None or len(mask_shape) > len(out1):
            return None
        mask_perm = perms["mask"]
    inputs: dict[str, Any] = {"query": query, "key": key, "value": value, "scale": scalar(scale, "fp32")}
    if mask is not None:
        inputs["mask"] = mask
        if mask_perm is not None:
            inputs["mask_perm"] = scalar(mask_perm, "int32")
    for name in ("query", "key", "value"):
        if perms[name] is not None:
            inputs[f"{name}_perm"] = scalar(perms[name], "int32")
    if out_perm is not None:
        inputs["out_perm"] = scalar(out_perm, "int32")
    fused = Operation(
        type=ATTENTION,
        inputs=inputs,
        outputs=second.outputs,
        attributes={"name": scalar(f"{second.name or second.outputs[0].name}_attention", "string")},
    )
    return chain, fused, second


def _leads_to_contraction(graph: Graph, producers: dict[str, Operation], name: str) -> bool:
    """Whether `name` is the scores side of an add: a contraction, through casts and a scale."""
    for _ in range(4):
        op = producers.get(name)
        if op is None:
            return False
        if op.type in ("matmul", "einsum"):
            return True
        if op.type == "cast" or op.type in ("mul", "real_div"):
            nxt = op.inputs.get("x")
            if op.type == "mul" and _scalar_const(graph, nxt) is not None:
                nxt = op.inputs.get("y")
            if not isinstance(nxt, str):
                return False
            name = nxt
            continue
        return False
    return False


def _identity_or(perm: list[int]) -> list[int] | None:
    return None if perm == list(range(len(perm))) else perm


def _attention_layout(
    scores: tuple[list[str], list[str], str],
    values: tuple[list[str], list[str], str],
    weights_name: str,
    softmax_axis: int,
) -> tuple[str, str, str, dict[str, list[int] | None], list[int] | None, str] | None:
    """Operands and permutations of softmax(Q·Kᵀ) V from the two contractions' labels."""
    (a, b), (la, lb), out1 = scores
    contracted = (set(la) & set(lb)) - set(out1)
    if len(contracted) != 1 or softmax_axis >= len(out1):
        return None
    c = contracted.pop()
    key_label = out1[softmax_axis]
    if (key_label in la) == (key_label in lb):
        return None
    key, lk, query, lq = (a, la, b, lb) if key_label in la else (b, lb, a, la)
    query_only = [x for x in lq if x not in lk]
    if len(query_only) != 1:
        return None
    query_label = query_only[0]
    batch = [x for x in out1 if x not in (key_label, query_label)]
    if sorted(lq) != sorted(batch + [query_label, c]) or sorted(lk) != sorted(batch + [key_label, c]):
        return None
    if sorted(out1) != sorted(batch + [query_label, key_label]):
        return None

    # second contraction: weights (softmax output, in out1's layout) with V
    (x, y), (lx, ly), out2 = values
    if x == weights_name and y != weights_name:
        lw, value, lv = lx, y, ly
    elif y == weights_name and x != weights_name:
        lw, value, lv = ly, x, lx
    else:
        return None
    if len(lw) != len(out1):
        return None
    role = dict(zip(lw, out1))  # label in the second equation -> label in the first
    back = {v: k for k, v in role.items()}
    contracted2 = (set(lw) & set(lv)) - set(out2)
    if contracted2 != {back[key_label]}:
        return None
    value_channels = [x for x in lv if x not in lw]
    if len(value_channels) != 1:
        return None
    cv = value_channels[0]
    batch2 = [back[x] for x in batch]
    if sorted(lv) != sorted(batch2 + [back[key_label], cv]):
        return None
    canonical_out = batch2 + [back[query_label], cv]
    if sorted(out2) != sorted(canonical_out):
        return None
    perms: dict[str, list[int] | None] = {
        "query": _identity_or([lq.index(x) for x in batch + [query_label, c]]),
        "key": _identity_or([lk.index(x) for x in batch + [key_label, c]]),
        "value": _identity_or([lv.index(x) for x in batch2 + [back[key_label], cv]]),
        "mask": _identity_or([out1.index(x) for x in batch + [query_label, key_label]]),
    }
    out_perm = _identity_or([canonical_out.index(x) for x in out2])
    return query, key, value, perms, out_perm, out1


def merge_heads(graph: Graph) -> int:
    """Merge per-head attentions whose outputs are concatenated into one attention over all heads.

    split_einsum programs compute attention head by head: Q, K and V are sliced along their
    channel axis into equal, consecutive ranges, each slice goes through its own (fused)
    attention, and a concat joins the results along the output's channel axis. One fused op
    with `heads` set splits the channel axes into (heads, channels) views, runs every head in
    one scaled_dot_product_attention call and joins them again. Returns how many were merged.
    """
    return _fuse_each(graph, _heads_at, lambda op: op.type == "concat" and isinstance(op.inputs.get("values"), tuple)
                      and len(op.inputs["values"]) > 1)


def _head_slice(graph: Graph, producers: dict[str, Operation], name: str) -> tuple[str, int, int, int] | None:
    """(sliced variable, axis, begin, size) when `name` is one plain range along one axis of a variable."""
    op = producers.get(name)
    if op is None or op.type != "slice_by_index" or not isinstance(op.inputs.get("x"), str):
        return None
    source = op.inputs["x"]
    shape_in, shape_out = graph.shape(source), graph.shape(name)
    if shape_in is None or shape_out is None or len(shape_in) != len(shape_out):
        return None
    for key in ("stride", "squeeze_mask"):
        if key in op.inputs:
            value = graph.const_value(op.inputs[key])
            if value is None or (key == "stride" and np.any(value != 1)) or (key == "squeeze_mask" and np.any(value)):
                return None
    axes = [i for i, (a, b) in enumerate(zip(shape_in, shape_out)) if a != b]
    if len(axes) != 1:
        return None
    axis = axes[0]
    begin = graph.const_value(op.inputs.get("begin"))
    begin_mask = graph.const_value(op.inputs["begin_mask"]) if "begin_mask" in op.inputs else None
    if begin is None or (begin_mask is None and "begin_mask" in op.inputs):
        return None
    start = 0 if begin_mask is not None and bool(begin_mask.reshape(-1)[axis]) else int(begin.reshape(-1)[axis])
    if start < 0:
        start += shape_in[axis]
    return source, axis, start, shape_out[axis]


def _heads_at(
    graph: Graph, producers: dict[str, Operation], users: dict[str, list[Operation]], concat: Operation
) -> Match | None:
    names = concat.inputs["values"]
    axis_value = graph.const_value(concat.inputs.get("axis"))
    interleave = graph.const_value(concat.inputs.get("interleave")) if "interleave" in concat.inputs else None
    out_shape = graph.shape(concat.outputs[0].name)
    if axis_value is None or out_shape is None or (interleave is not None and bool(interleave)):
        return None
    rank = len(out_shape)
    cat_axis = int(axis_value.item()) % rank
    heads: list[Operation] = []
    for name in names:
        att = producers.get(name) if isinstance(name, str) else None
        if att is None or att.type != ATTENTION or _single_user(users, graph, name) is not concat or "mask" in att.inputs:
            return None
        heads.append(att)
    first = heads[0]
    params = ("scale", "query_perm", "key_perm", "value_perm", "out_perm")
    for att in heads[1:]:
        for key in params:
            a, b = first.inputs.get(key), att.inputs.get(key)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(graph.const_value(a), graph.const_value(b))):
                return None
    operands: dict[str, tuple[str, int]] = {}
    removed: list[Operation] = []
    for role in ("query", "key", "value"):
        slices = [_head_slice(graph, producers, att.inputs[role]) if isinstance(att.inputs[role], str) else None
                  for att in heads]
        if any(s is None for s in slices):
            return None
        source, axis, _, size = slices[0]  # type: ignore[misc]
        full = graph.shape(source)
        if full is None or full[axis] != size * len(heads):
            return None
        for i, sl in enumerate(slices):
            if sl is None or sl[0] != source or sl[1] != axis or sl[2] != i * size or sl[3] != size:
                return None
        # the sliced axis must be the operand's channel axis (last after its permutation)
        perm = graph.const_value(first.inputs[f"{role}_perm"]) if f"{role}_perm" in first.inputs else None
        channel = int(perm.reshape(-1)[-1]) if perm is not None else len(full) - 1
        if channel != axis:
            return None
        operands[role] = (source, axis)
        for att in heads:
            producer = producers[att.inputs[role]]
            if _single_user(users, graph, att.inputs[role]) is att:
                removed.append(producer)
    out_perm = graph.const_value(first.inputs["out_perm"]) if "out_perm" in first.inputs else None
    out_channel = int(out_perm.reshape(-1)[cat_axis]) if out_perm is not None else cat_axis
    if out_channel != rank - 1:  # the heads must be joined along the output's channel axis
        return None
    inputs: dict[str, Any] = {role: operands[role][0] for role in ("query", "key", "value")}
    for key in params:
        if key in first.inputs:
            inputs[key] = first.inputs[key]
    inputs["heads"] = scalar([len(heads), operands["query"][1], operands["key"][1], operands["value"][1], cat_axis],
                             "int32")
    fused = Operation(
        type=ATTENTION,
        inputs=inputs,
        outputs=concat.outputs,
        attributes={"name": scalar(f"{concat.name or concat.outputs[0].name}_heads", "string")},
    )
    return [*heads, *removed, concat], fused, concat


# -- group norm ----------------------------------------------------------------------


def fuse_group_norm(graph: Graph) -> int:
    """Replace each decomposed group normalization by one fused op; returns how many."""
    return _fuse_each(graph, _group_norm_at, lambda op: op.type == "reshape")


def _only(users: dict[str, list[Operation]], graph: Graph, name: str, kind: Iterable[str]) -> Operation | None:
    op = _single_user(users, graph, name)
    return op if op is not None and op.type in tuple(kind) else None


def _axes(graph: Graph, op: Operation, rank: int) -> list[int] | None:
    value = graph.const_value(op.inputs.get("axes"))
    keep = graph.const_value(op.inputs.get("keep_dims"))
    if value is None or keep is None or not bool(keep):
        return None
    return sorted(int(a) % rank for a in value.reshape(-1))


def _group_norm_at(
    graph: Graph, producers: dict[str, Operation], users: dict[str, list[Operation]], split: Operation
) -> Match | None:
    x = split.inputs.get("x")
    grouped = split.outputs[0].name
    if not isinstance(x, str):
        return None
    shape_x, shape_g = graph.shape(x), graph.shape(grouped)
    if shape_x is None or shape_g is None or len(shape_x) < 3 or len(shape_g) != len(shape_x) + 1:
        return None
    if shape_g[0] != shape_x[0] or shape_g[1] * shape_g[2] != shape_x[1] or shape_g[3:] != shape_x[2:]:
        return None
    groups, rank = shape_g[1], len(shape_g)
    normalized_axes = list(range(2, rank))

    readers = users.get(grouped, [])
    if grouped in graph.outputs or len(readers) != 2:
        return None
    mean = next((o for o in readers if o.type == "reduce_mean"), None)
    centered = next((o for o in readers if o.type == "sub"), None)
    if mean is None or centered is None or _axes(graph, mean, rank) != normalized_axes:
        return None
    if centered.inputs.get("x") != grouped or centered.inputs.get("y") != mean.outputs[0].name:
        return None
    if _single_user(users, graph, mean.outputs[0].name) is None:
        return None
    d = centered.outputs[0].name
    d_readers = users.get(d, [])
    if d in graph.outputs or len(d_readers) != 2:
        return None
    square = next((o for o in d_readers if o.type == "square"), None)
    if square is None:
        return None
    variance = _only(users, graph, square.outputs[0].name, ["reduce_mean"])
    if variance is None or _axes(graph, variance, rank) != normalized_axes:
        return None
    shifted = _only(users, graph, variance.outputs[0].name, ["add"])
    if shifted is None:
        return None
    other = shifted.inputs.get("y") if shifted.inputs.get("x") == variance.outputs[0].name else shifted.inputs.get("x")
    eps = _scalar_const(graph, other)
    if eps is None:
        return None
    root = _only(users, graph, shifted.outputs[0].name, ["sqrt", "rsqrt"])
    if root is None:
        return None
    if root.type == "rsqrt":
        extra = _scalar_const(graph, root.inputs.get("epsilon")) if "epsilon" in root.inputs else 1e-12
        if extra is None:
            return None
        eps += extra
    normalize = next((o for o in d_readers if o is not square), None)
    if normalize is None:
        return None
    r = root.outputs[0].name
    if root.type == "sqrt":
        if normalize.type != "real_div" or normalize.inputs.get("x") != d or normalize.inputs.get("y") != r:
            return None
    elif normalize.type != "mul" or {normalize.inputs.get("x"), normalize.inputs.get("y")} != {d, r}:
        return None
    if _single_user(users, graph, r) is None:
        return None
    merge = _only(users, graph, normalize.outputs[0].name, ["reshape"])
    if merge is None or graph.shape(merge.outputs[0].name) != shape_x:
        return None
    removed = [split, mean, centered, square, variance, shifted, root, normalize, merge]
    last = merge
    inputs: dict[str, Any] = {"x": x, "num_groups": scalar(groups, "int32"), "epsilon": scalar(eps, "fp32")}
    affine = _channel_affine(graph, users, merge.outputs[0].name, shape_x)
    if affine is not None:
        ops, gamma, beta = affine
        removed += ops
        last = ops[-1]
        if gamma is not None:
            inputs["gamma"] = gamma
        if beta is not None:
            inputs["beta"] = beta
    fused = Operation(
        type=GROUP_NORM,
        inputs=inputs,
        outputs=last.outputs,
        attributes={"name": scalar(f"{last.name or last.outputs[0].name}_group_norm", "string")},
    )
    return removed, fused, last


def _per_channel(graph: Graph, arg: Any, shape_x: tuple[int, ...]) -> bool:
    """A constant that broadcasts along the channel axis only: [C, 1, ...] or [1, C, 1, ...]."""
    if not isinstance(arg, str) or arg not in graph.consts:
        return False
    shape = graph.shape(arg)
    if shape is None:
        return False
    channels = shape_x[1]
    trailing = len(shape_x) - 2
    return shape in ((channels,) + (1,) * trailing, (1, channels) + (1,) * trailing)


def _batch_norm_affine(graph: Graph, op: Operation, channels: int) -> tuple[TensorValue, TensorValue] | None:
    """A batch_norm with constant statistics is a per-channel affine: its scale and shift (float32)."""
    values = {}
    for key in ("mean", "variance", "gamma", "beta"):
        if key in op.inputs:
            value = graph.const_value(op.inputs[key])
            if value is None or value.size != channels:
                return None
            values[key] = value.reshape(-1).astype(np.float64)
    if "mean" not in values or "variance" not in values:
        return None
    eps = _scalar_const(graph, op.inputs["epsilon"]) if "epsilon" in op.inputs else 1e-5
    if eps is None:
        return None
    scale = values.get("gamma", np.ones(channels)) / np.sqrt(values["variance"] + eps)
    shift = values.get("beta", np.zeros(channels)) - values["mean"] * scale
    return scalar(scale.astype(np.float32).tolist(), "fp32"), scalar(shift.astype(np.float32).tolist(), "fp32")


def _channel_affine(
    graph: Graph, users: dict[str, list[Operation]], name: str, shape_x: tuple[int, ...]
) -> tuple[list[Operation], Any, Any] | None:
    """The `· gamma + beta` that follows a normalization, when both are per-channel constants
    (as mul/add, or as the constant-statistics batch_norm the converter folds them into)."""
    ops: list[Operation] = []
    gamma = beta = None
    op = _single_user(users, graph, name)
    if op is not None and op.type == "batch_norm" and op.inputs.get("x") == name:
        affine = _batch_norm_affine(graph, op, shape_x[1])
        if affine is not None and graph.shape(op.outputs[0].name) == shape_x:
            return [op], affine[0], affine[1]
    if op is not None and op.type == "mul":
        other = op.inputs.get("y") if op.inputs.get("x") == name else op.inputs.get("x")
        if _per_channel(graph, other, shape_x) and graph.shape(op.outputs[0].name) == shape_x:
            gamma = other
            ops.append(op)
            name = op.outputs[0].name
            op = _single_user(users, graph, name)
    if op is not None and op.type == "add":
        other = op.inputs.get("y") if op.inputs.get("x") == name else op.inputs.get("x")
        if _per_channel(graph, other, shape_x) and graph.shape(op.outputs[0].name) == shape_x:
            beta = other
            ops.append(op)
    if not ops:
        return None
    return ops, gamma, beta


# -- all together --------------------------------------------------------------------


@dataclass(frozen=True)
class PassReport:
    attention: int
    group_norm: int
    ops_before: int
    ops_after: int


def optimize(graph: Graph, same_float: Callable[[str, str], bool], fuse: bool = True) -> PassReport:
    """Run the passes in order; `fuse=False` keeps only the no-op and dead-code removal."""
    before = len(graph.ops)
    drop_noops(graph, same_float)
    drop_zero_bias(graph)
    attention = group_norm = 0
    if fuse:
        group_norm = fuse_group_norm(graph)
        attention = fuse_attention(graph)
        merge_heads(graph)
    eliminate_dead_code(graph)
    return PassReport(attention, group_norm, before, len(graph.ops))
