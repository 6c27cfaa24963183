"""Control flow, lists, state and flexible shapes: MIL builder programs converted with real
coremltools, run on the portable runtime and compared with numpy or torch references."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from coreml_hub.errors import ModelInputError
from coreml_hub.mil import load_model
from coreml_hub.mil.executor import FunctionRunner
from coreml_hub.mil.model import Model, read_program
from coreml_hub.mil.ops import Context

ct = pytest.importorskip("coremltools", reason="coremltools converts the test programs")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

pytestmark = pytest.mark.slow

IOS17 = ct.target.iOS17
IOS18 = ct.target.iOS18


def convert(prog: Any, path: Path, target: Any = IOS17, **kwargs: Any) -> Path:
    """Save a builder program as an ML Program package (fp32, coremltools' default passes)."""
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True, **kwargs)
    model.save(str(path))
    return path


def program(specs: list[Any], target: Any = IOS17) -> Callable[[Callable[..., Any]], Any]:
    return mb.program(input_specs=specs, opset_version=target)


def runner_for(path: Path) -> FunctionRunner:
    """The executor's runner for a package's main function, on the CPU in float32."""
    ctx = Context.create("cpu", dict.fromkeys(("fp16", "fp32", "fp64", "bf16"), torch.float32))
    return FunctionRunner(read_program(path).main, ctx, model_name=path.name)


def tensors(**arrays: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).float() if v.dtype.kind == "f" else torch.from_numpy(v)
            for k, v in arrays.items()}


# -- cond ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cond_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """if sum(x) > 0: (x * 2 if max(x) > 3 else x + 10) else x - 1 -- a cond nested in a cond branch."""

    @program([mb.TensorSpec((2, 3))])
    def prog(x):  # noqa: ANN001, ANN202
        total = mb.reduce_sum(x=x)
        big = mb.reduce_max(x=x)

        def positive():  # noqa: ANN202
            return mb.cond(pred=mb.greater(x=big, y=3.0), _true_fn=lambda: mb.mul(x=x, y=2.0),
                           _false_fn=lambda: mb.add(x=x, y=10.0))

        return mb.cond(pred=mb.greater(x=total, y=0.0), _true_fn=positive, _false_fn=lambda: mb.sub(x=x, y=1.0))

    return load_model(convert(prog, tmp_path_factory.mktemp("cond") / "cond.mlpackage"))


@pytest.mark.parametrize("x", [np.full((2, 3), 5.0), np.full((2, 3), 0.5), np.full((2, 3), -2.0)])
def test_cond_takes_the_branch_the_predicate_names(cond_model: Any, x: np.ndarray) -> None:
    expected = (x * 2 if x.max() > 3 else x + 10) if x.sum() > 0 else x - 1
    out = cond_model.predict({"x": x.astype(np.float32)})
    np.testing.assert_allclose(next(iter(out.values())), expected, rtol=1e-6)


# -- while_loop ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two nested loops: for i < n: acc = acc * scale + (for j < i: t += 1 -> t); loop-carried i and acc.

    `scale` is read from the enclosing scope inside the body; n comes from an input.
    """

    @program([mb.TensorSpec((3,)), mb.TensorSpec((1,), dtype=types.int32)])
    def prog(x, n):  # noqa: ANN001, ANN202
        scale = mb.mul(x=mb.reduce_mean(x=x), y=0.0)
        scale = mb.add(x=scale, y=1.5)
        limit = mb.squeeze(x=n)

        def outer_cond(i, acc):  # noqa: ANN001, ANN202
            return mb.less(x=i, y=limit)

        def outer_body(i, acc):  # noqa: ANN001, ANN202
            def inner_cond(j, t):  # noqa: ANN001, ANN202
                return mb.less(x=j, y=i)

            def inner_body(j, t):  # noqa: ANN001, ANN202
                return mb.add(x=j, y=1), mb.add(x=t, y=1.0)

            _, steps = mb.while_loop(_cond=inner_cond, _body=inner_body, loop_vars=(mb.mul(x=i, y=0), 0.0))
            return mb.add(x=i, y=1), mb.add(x=mb.mul(x=acc, y=scale), y=steps)

        return mb.while_loop(_cond=outer_cond, _body=outer_body, loop_vars=(0, x))[1]

    return load_model(convert(prog, tmp_path_factory.mktemp("loop") / "loop.mlpackage"))


@pytest.mark.parametrize("n", [0, 1, 4])
def test_while_loop_carries_values_through_nested_loops(loop_model: Any, n: int) -> None:
    x = np.array([1.0, -2.0, 0.5], np.float32)
    acc = x.astype(np.float64)
    for i in range(n):
        acc = acc * 1.5 + i
    out = loop_model.predict({"x": x, "n": np.array([n], np.int32)})
    np.testing.assert_allclose(next(iter(out.values())), acc, rtol=1e-6)


# -- lists ---------------------------------------------------------------------------


def test_list_built_in_a_loop_then_gathered(tmp_path: Path) -> None:
    """A dynamic list written once per iteration (row i = x * i), read back with list_length and list_gather."""

    @program([mb.TensorSpec((2,)), mb.TensorSpec((1,), dtype=types.int32)])
    def prog(x, n):  # noqa: ANN001, ANN202
        limit = mb.squeeze(x=n)
        ls = mb.make_list(init_length=1, elem_shape=(2,), dynamic_length=True)

        def body(i, ls):  # noqa: ANN001, ANN202
            row = mb.mul(x=x, y=mb.cast(x=i, dtype="fp32"))
            return mb.add(x=i, y=1), mb.list_write(ls=ls, index=i, value=row)

        _, ls = mb.while_loop(_cond=lambda i, ls: mb.less(x=i, y=limit), _body=body, loop_vars=(0, ls))
        length = mb.list_length(ls=ls)
        rows = mb.list_gather(ls=ls, indices=mb.range_1d(start=0, end=length, step=1))
        first = mb.list_read(ls=ls, index=0)
        return rows, first

    model = load_model(convert(prog, tmp_path / "list.mlpackage"))
    x = np.array([1.0, 3.0], np.float32)
    rows_name, first_name = (d.name for d in model.output_description)
    out = model.predict({"x": x, "n": np.array([4], np.int32)})
    np.testing.assert_allclose(out[rows_name], np.stack([x * i for i in range(4)]))
    np.testing.assert_allclose(out[first_name], x * 0)


# -- state ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accumulator(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """acc += x, returned; a second output reads the state before the update (a copy must be kept)."""

    @program([mb.StateTensorSpec((2, 3), dtype=types.fp16), mb.TensorSpec((2, 3), dtype=types.fp16)], IOS18)
    def prog(acc, x):  # noqa: ANN001, ANN202
        before = mb.read_state(input=acc)
        total = mb.coreml_update_state(state=acc, value=mb.add(x=before, y=x))
        return mb.mul(x=total, y=np.float16(1)), mb.mul(x=before, y=np.float16(1))

    return load_model(convert(prog, tmp_path_factory.mktemp("acc") / "acc.mlpackage", IOS18))


def test_state_accumulates_across_calls_in_place(accumulator: Model) -> None:
    state = accumulator.make_state()
    assert state.names == ("acc",) and not state.read_state("acc").any()
    held = state.tensors_for(accumulator)["acc"]
    total, before = (d.name for d in accumulator.output_description)
    running = np.zeros((2, 3))
    for step in range(1, 4):
        out = accumulator.predict({"x": np.full((2, 3), step, np.float16)}, state=state)
        np.testing.assert_allclose(out[before], running)  # read before the update: kept as it was
        running = running + step
        np.testing.assert_allclose(out[total], running)
        np.testing.assert_allclose(state.read_state("acc"), running)
    assert state.tensors_for(accumulator)["acc"] is held  # updated in place
    assert state.read_state("acc").dtype == np.float16
    # without a state every call starts from zeros
    out = accumulator.predict({"x": np.ones((2, 3), np.float16)})
    np.testing.assert_allclose(out[total], 1.0)


def test_state_written_from_outside(accumulator: Model) -> None:
    state = accumulator.make_state()
    state.write_state("acc", np.full((2, 3), 7, np.float16))
    total = accumulator.output_description[0].name
    assert float(accumulator.predict({"x": np.ones((2, 3), np.float16)}, state=state)[total][0, 0]) == 8.0
    with pytest.raises(ModelInputError, match=r"'acc' has shape \[3\]"):
        state.write_state("acc", np.zeros((3,), np.float16))


def test_state_written_inside_a_cond_branch(tmp_path: Path) -> None:
    """acc += x only when sum(x) > 0: the write happens inside a block; the value read before it is kept."""

    @program([mb.StateTensorSpec((3,), dtype=types.fp16), mb.TensorSpec((3,), dtype=types.fp16)], IOS18)
    def prog(acc, x):  # noqa: ANN001, ANN202
        before = mb.read_state(input=acc)

        def add() -> Any:
            return mb.coreml_update_state(state=acc, value=mb.add(x=before, y=x))

        def keep() -> Any:
            return mb.identity(x=before)

        out = mb.cond(pred=mb.greater(x=mb.reduce_sum(x=x), y=np.float16(0)), _true_fn=add, _false_fn=keep)
        return mb.mul(x=out, y=np.float16(1)), mb.mul(x=before, y=np.float16(1))

    model = load_model(convert(prog, tmp_path / "cond_state.mlpackage", IOS18))
    state = model.make_state()
    result, seen = (d.name for d in model.output_description)
    running = np.zeros(3)
    for x in ([1, 2, 3], [-5, -5, -5], [1, 1, 1]):
        out = model.predict({"x": np.array(x, np.float16)}, state=state)
        np.testing.assert_allclose(out[seen], running)
        if sum(x) > 0:
            running = running + x
        np.testing.assert_allclose(out[result], running)
        np.testing.assert_allclose(state.read_state("acc"), running)


class _KVCache(torch.nn.Module):
    """One attention step over a key/value cache kept in state buffers (coremltools' stateful pattern)."""

    def __init__(self, heads: int, length: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, heads, length, dim, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(1, heads, length, dim, dtype=torch.float16))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                pos: torch.Tensor) -> torch.Tensor:
        end = pos + 1
        self.k_cache[:, :, pos:end] = k
        self.v_cache[:, :, pos:end] = v
        return torch.nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)


def test_kv_cache_attention_block(tmp_path: Path) -> None:
    """A torch module with key/value cache buffers, converted with ct.StateType: each call writes one
    position (slice_update into the state) and attends over the cache; compared with torch step by step."""
    heads, length, dim = 2, 4, 8
    module = _KVCache(heads, length, dim).eval()
    example = (torch.zeros(1, heads, 1, dim, dtype=torch.float16),) * 3 + (
        torch.zeros(1, 1, 1, length, dtype=torch.float16), torch.tensor([0], dtype=torch.int32))
    traced = torch.jit.trace(module, example)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=(1, heads, length, dim), dtype=np.float16), name=name)
              for name in ("k_cache", "v_cache")]
    inputs = [ct.TensorType(name=n, shape=(1, heads, 1, dim), dtype=np.float16) for n in ("q", "k", "v")]
    inputs += [ct.TensorType(name="mask", shape=(1, 1, 1, length), dtype=np.float16),
               ct.TensorType(name="pos", shape=(1,), dtype=np.int32)]
    mlmodel = ct.convert(traced, inputs=inputs, states=states, convert_to="mlprogram", minimum_deployment_target=IOS18,
                         compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    mlmodel.save(str(tmp_path / "kv.mlpackage"))
    model = load_model(tmp_path / "kv.mlpackage")
    state = model.make_state()
    assert sorted(state.names) == ["k_cache", "v_cache"]
    reference = _KVCache(heads, length, dim).float().eval()
    rng = np.random.default_rng(3)
    for pos in range(length):
        q, k, v = (rng.standard_normal((1, heads, 1, dim)).astype(np.float16) for _ in range(3))
        mask = np.where(np.arange(length) <= pos, 0.0, -1e4).astype(np.float16).reshape(1, 1, 1, length)
        feeds = {"q": q, "k": k, "v": v, "mask": mask, "pos": np.array([pos], np.int32)}
        out = model.predict(feeds, state=state)
        with torch.no_grad():
            expected = reference(*(torch.from_numpy(a).float() if a.dtype == np.float16 else torch.from_numpy(a)
                                   for a in feeds.values()))
        np.testing.assert_allclose(next(iter(out.values())), expected.numpy(), atol=3e-3)
    np.testing.assert_allclose(state.read_state("k_cache"),
                               reference.k_cache.float().numpy(), atol=1e-3)


# -- flexible shapes -------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return y.flatten(2).mean(-1) + y.shape[-1]


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


@pytest.mark.parametrize("kind", ["range", "enumerated"])
def test_flexible_input_shapes_compile_once_per_shape(net: torch.nn.Module, kind: str, tmp_path: Path) -> None:
    example = torch.rand(1, 3, 8, 8)
    if kind == "range":
        shape: Any = ct.Shape((1, 3, ct.RangeDim(4, 32, default=8), ct.RangeDim(4, 32, default=8)))
    else:
        shape = ct.EnumeratedShapes([(1, 3, 8, 8), (1, 3, 16, 12), (2, 3, 6, 6)], default=(1, 3, 8, 8))
    traced = torch.jit.trace(net, example)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=shape)], convert_to="mlprogram",
                         compute_precision=ct.precision.FLOAT32, minimum_deployment_target=IOS17,
                         skip_model_load=True)
    mlmodel.save(str(tmp_path / "flex.mlpackage"))
    model = load_model(tmp_path / "flex.mlpackage")
    runner = runner_for(tmp_path / "flex.mlpackage")
    shapes = [(1, 3, 8, 8), (1, 3, 16, 12), (1, 3, 8, 8)] if kind == "range" else [(1, 3, 16, 12), (2, 3, 6, 6)]
    for size in shapes:
        x = torch.rand(size)
        with torch.no_grad():
            expected = net(x).numpy()
        np.testing.assert_allclose(next(iter(model.predict({"x": x.numpy()}).values())), expected, rtol=1e-4, atol=1e-4)
        for _ in range(3):  # the first call with a shape runs generically, the second specializes, the third runs it
            got = next(iter(runner.run({"x": x}).values()))
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert len(runner._cache) == len(set(shapes))
    # the shape arithmetic (y.shape[-1]) folds once the input shape is known
    compiled = runner.compiled_for({"x": (1, 3, 16, 12)})
    assert compiled is not None and compiled.stats.steps < runner.generic.stats.steps


def test_flexible_shape_cache_is_bounded(tmp_path: Path) -> None:
    @program([mb.TensorSpec((1, ct.converters.mil.mil.get_new_symbol()))])
    def prog(x):  # noqa: ANN001, ANN202
        return mb.mul(x=x, y=2.0)

    runner = runner_for(convert(prog, tmp_path / "flex.mlpackage"))
    runner.cache_size = 3
    for n in range(1, 7):  # each shape once, as a decoder's growing mask: nothing is worth compiling
        out = runner.run({"x": torch.ones((1, n))})
        np.testing.assert_allclose(next(iter(out.values())).numpy(), np.full((1, n), 2.0))
    assert not runner._cache
    for n in range(1, 7):  # each shape a second time: specialized, the last three kept
        out = runner.run({"x": torch.ones((1, n))})
        np.testing.assert_allclose(next(iter(out.values())).numpy(), np.full((1, n), 2.0))
    assert [key[0][1] for key in runner._cache] == [4, 5, 6]
    kept = dict(runner._cache)
    for n in range(1, 7):  # again: the three let go run generically, never compiled a second time
        out = runner.run({"x": torch.ones((1, n))})
        np.testing.assert_allclose(next(iter(out.values())).numpy(), np.full((1, n), 2.0))
    assert list(runner._let_go) == [((1, 1),), ((1, 2),), ((1, 3),)]
    assert list(runner._cache) == list(kept) and all(runner._cache[k] is v for k, v in kept.items())
