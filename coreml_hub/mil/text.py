"""`model.mil`, the ML Program text inside a compiled `.mlmodelc`: parse and print.

`loads`/`load` turn the text into the shared program model (`mil.program`); `dumps` prints
a program back. `loads(dumps(p)) == p`, and a file from Apple's compiler prints back as the
same text.

Grammar, by example (both scalar spellings are accepted):

    program(1.0)
    [buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremlc-version", "3402.4.1"}})]
    {
        func main<ios16>(tensor<fp16, [1, 10]> x) [Attr = TYPE(LITERAL)] {
                tensor<int32, []> a = const()[name = tensor<string, []>("a"), val = tensor<int32, []>(-1)];
                tensor<fp16, [1, 10]> y, tensor<int32, [1]> i = op(x = x, values = (a, b))[name = ...];
            } -> (y);
    }

- Op inputs go in `(...)` (a variable, a typed value, or a tuple of them); attributes
  (`name`, `val`, the constexpr ops' data) go in `[...]`.
- A typed value is `TYPE(LITERAL)`. Inside a literal the element types are implied:
  tensors are nested `[...]`, dicts `{{k, v}, ...}`, tuples `(a, b)`, lists `[a, b]`;
  weights are `BLOBFILE(path = ..., offset = ...)`.
- Floats are C99 hex floats (`0x1.8p-3`, `-0x1p+0`) or `inf`, `-inf`, `nan`; decimals parse too.
- Older compilers spell scalars `tensor<string, []>("x")`; `program(1.3)` files (iOS 18)
  spell them `string("x")`, `uint64(64)` and use bare scalar types (`int32 x = ...`).
  `dumps` picks the spelling from `Program.version` (>= 1.3: bare), so a parsed file
  prints in its own style; `style=` overrides.
- Unknown dimensions are `?` (kept as the string "?"; each one independent); other
  symbolic dimensions print as their names. Unknown rank prints as `tensor<fp32, *>`.
- Nested blocks (cond, while_loop) print after the attributes, as
  `{ block(PARAMS) { ... } -> (outs); ... }`. No public compiler output with control flow
  was available to copy, so this spelling is ours.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CoremlHubError
from .program import (
    DTYPES,
    FLOAT_DTYPES,
    BlobRef,
    Block,
    DictType,
    DictValue,
    Function,
    ListType,
    ListValue,
    Operation,
    Program,
    StateType,
    TensorType,
    TensorValue,
    TupleType,
    Value,
    ValueType,
    Var,
    binding,
    integer_range,
)

MAX_DEPTH = 48  # nesting of types, literals and blocks; keeps recursion far from Python's limit
MAX_RANK = 32


class MILSyntaxError(CoremlHubError):
    """model.mil text that does not parse; carries line, column and an excerpt."""

    default_hint = "The model.mil file is damaged or from an unsupported compiler; re-pull the model with `--force`."

    def __init__(self, message: str, *, line: int = 0, column: int = 0, excerpt: str = "",
                 source: str | None = None, hint: str | None = None) -> None:
        where = f"{source}:" if source else ""
        full = f"{where}{line}:{column}: {message}"
        if excerpt:
            full += f" (near {excerpt!r})"
        super().__init__(full, hint=hint)
        self.reason = message
        self.line = line
        self.column = column
        self.excerpt = excerpt
        self.source = source


# -- tokens -----------------------------------------------------------------------------
# One token per match; a token's kind is read from its first character. A whole simple
# tensor type is one token, which makes the common lines cheap to parse.
_TOKEN = re.compile(
    r"""\s*(
      tensor<\s*[A-Za-z0-9_]+\s*,\s*(?:\[[^\[\]<>]*\]|\*)\s*>
    | "(?:[^"\\\n]|\\.)*"
    | -?0[xX][0-9a-fA-F]*(?:\.[0-9a-fA-F]*)?(?:[pP][-+]?[0-9]+)?
    | -?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?
    | -(?:inf|nan)\b
    | [A-Za-z_][A-Za-z0-9_.]*
    | ->
    | [(){}\[\]<>,=;?*]
    | \S
    )""",
    re.VERBOSE,
)
_EOF = "\0EOF"

_CONTAINER_TYPES = ("dict", "list", "tuple", "state", "tensor")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
# 8-bit floats are written as their raw bits (no public compiler output shows another spelling)
_INT_RANGES = {name: integer_range(name) for name in DTYPES if name not in (*FLOAT_DTYPES, "bool", "string")}
_INTS = frozenset(name for name in _INT_RANGES if name.startswith(("int", "uint")))


def _digits(text: str) -> bool:
    """ASCII digits only: `str.isdigit` also takes '²' or '٣', which `int()` then refuses."""
    return text.isascii() and text.isdigit()


class _Parser:
    def __init__(self, text: str, base_dir: Path | None, source: str | None) -> None:
        self.text = text
        self.base_dir = base_dir
        self.source = source
        self.toks: list[str] = _TOKEN.findall(text)
        self.toks.append(_EOF)
        self.i = 0
        self.types: dict[str, TensorType] = {}
        self.depth = 0

    # -- errors -------------------------------------------------------------------------

    def fail(self, message: str, at: int | None = None) -> MILSyntaxError:
        index = self.i if at is None else at
        pos = len(self.text)
        for n, match in enumerate(_TOKEN.finditer(self.text)):
            if n == index:
                pos = match.start(1)
                break
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        end = self.text.find("\n", pos)
        excerpt = self.text[pos:end if end >= 0 else len(self.text)][:48]
        return MILSyntaxError(message, line=line, column=column, excerpt=excerpt, source=self.source)

    def expect(self, tok: str) -> None:
        if self.toks[self.i] != tok:
            raise self.fail(f"expected {tok!r}, found {self.describe()}")
        self.i += 1

    def describe(self, at: int | None = None) -> str:
        tok = self.toks[self.i if at is None else at]
        return "end of file" if tok == _EOF else repr(tok[:40])

    def ident(self, what: str) -> str:
        tok = self.toks[self.i]
        if tok == _EOF or not (tok[0].isascii() and (tok[0].isalpha() or tok[0] == "_")) or tok.startswith("tensor<"):
            raise self.fail(f"expected {what}, found {self.describe()}")
        self.i += 1
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nesting deeper than {MAX_DEPTH} levels")

    # -- program structure ----------------------------------------------------------------

    def program(self) -> Program:
        if self.toks[self.i] != "program":
            raise self.fail(f"expected 'program(VERSION)', found {self.describe()}")
        self.i += 1
        self.expect("(")
        version = self.toks[self.i]
        if not _digits(version[:1]):
            raise self.fail(f"expected a program version, found {self.describe()}")
        self.i += 1
        self.expect(")")
        attributes = self.attributes() if self.toks[self.i] == "[" else {}
        self.expect("{")
        functions: dict[str, Function] = {}
        while self.toks[self.i] != "}":
            start = self.i
            function = self.function()
            if function.name in functions:
                raise self.fail(f"function {function.name!r} defined twice", at=start + 1)
            functions[function.name] = function
        self.i += 1
        if self.toks[self.i] != _EOF:
            raise self.fail(f"unexpected {self.describe()} after the program's closing brace")
        return Program(version=version, functions=functions, attributes=attributes, base_dir=self.base_dir)

    def function(self) -> Function:
        if self.toks[self.i] != "func":
            raise self.fail(f"expected 'func' or '}}', found {self.describe()}")
        self.i += 1
        name = self.ident("a function name")
        self.expect("<")
        opset = self.ident("an opset such as ios16")
        self.expect(">")
        inputs = self.params()
        attributes = self.attributes() if self.toks[self.i] == "[" else {}
        block = self.block_body(inputs=())
        return Function(name=name, opset=opset, inputs=inputs, block=block, attributes=attributes)

    def params(self) -> tuple[Var, ...]:
        self.expect("(")
        params: list[Var] = []
        if self.toks[self.i] != ")":
            while True:
                vtype = self.type()
                params.append(Var(self.ident("a parameter name"), vtype))
                if self.toks[self.i] != ",":
                    break
                self.i += 1
        self.expect(")")
        return tuple(params)

    def block_body(self, inputs: tuple[Var, ...]) -> Block:
        self.expect("{")
        self.enter()
        operations: list[Operation] = []
        toks = self.toks
        while toks[self.i] != "}":
            if toks[self.i] == _EOF:
                raise self.fail("unexpected end of file inside a block (missing '}')")
            operations.append(self.operation())
        self.i += 1
        self.expect("->")
        self.expect("(")
        outputs: list[str] = []
        if toks[self.i] != ")":
            while True:
                outputs.append(self.ident("an output name"))
                if toks[self.i] != ",":
                    break
                self.i += 1
        self.expect(")")
        self.expect(";")
        self.depth -= 1
        return Block(operations=operations, outputs=tuple(outputs), inputs=inputs)

    def operation(self) -> Operation:
        toks = self.toks
        outputs: list[Var] = []
        if not (toks[self.i + 1] == "(" and toks[self.i] not in DTYPES):
            while True:
                vtype = self.type()
                outputs.append(Var(self.ident("an output variable name"), vtype))
                if toks[self.i] != ",":
                    break
                self.i += 1
            self.expect("=")
        op_type = self.ident("an operation name")
        self.expect("(")
        inputs: dict[str, Any] = {}
        if toks[self.i] != ")":
            while True:
                key_at = self.i
                key = self.ident("an input name")
                self.expect("=")
                if key in inputs:
                    raise self.fail(f"input {key!r} given twice", at=key_at)
                if toks[self.i] == "(":
                    self.i += 1
                    args = [self.argument()]
                    while toks[self.i] == ",":
                        self.i += 1
                        args.append(self.argument())
                    self.expect(")")
                    inputs[key] = binding(op_type, key, tuple(args))
                else:
                    inputs[key] = self.argument()
                if toks[self.i] != ",":
                    break
                self.i += 1
        self.expect(")")
        attributes = self.attributes() if toks[self.i] == "[" else {}
        blocks: list[Block] = []
        if toks[self.i] == "{":
            self.i += 1
            self.enter()
            while toks[self.i] != "}":
                if toks[self.i] != "block":
                    raise self.fail(f"expected 'block(...)' or '}}', found {self.describe()}")
                self.i += 1
                params = self.params()
                blocks.append(self.block_body(inputs=params))
            self.i += 1
            self.depth -= 1
        self.expect(";")
        return Operation(type=op_type, inputs=inputs, outputs=tuple(outputs), attributes=attributes,
                         blocks=tuple(blocks))

    def argument(self) -> Any:
        tok = self.toks[self.i]
        nxt = self.toks[self.i + 1]
        if tok.startswith("tensor<") or (tok in _CONTAINER_TYPES and nxt == "<") or (tok in DTYPES and nxt == "("):
            return self.value()
        return self.ident("a variable name or a typed value")

    def attributes(self) -> dict[str, Value]:
        self.expect("[")
        attributes: dict[str, Value] = {}
        toks = self.toks
        if toks[self.i] != "]":
            while True:
                key_at = self.i
                key = self.ident("an attribute name")
                self.expect("=")
                if key in attributes:
                    raise self.fail(f"attribute {key!r} given twice", at=key_at)
                attributes[key] = self.value()
                if toks[self.i] != ",":
                    break
                self.i += 1
        self.expect("]")
        return attributes

    # -- types --------------------------------------------------------------------------

    def type(self) -> ValueType:
        tok = self.toks[self.i]
        if tok.startswith("tensor<"):
            cached = self.types.get(tok)
            if cached is None:
                cached = self.simple_tensor_type(tok)
                self.types[tok] = cached
            self.i += 1
            return cached
        if tok in DTYPES:
            self.i += 1
            return self.bare_scalar(tok)
        if tok not in _CONTAINER_TYPES or self.toks[self.i + 1] != "<":
            raise self.fail(f"expected a type, found {self.describe()}")
        self.i += 2
        self.enter()
        if tok == "tensor":  # only when the one-token form did not match: report precisely
            dtype = self.ident("a data type")
            if dtype not in DTYPES:
                raise self.fail(f"unknown data type {dtype!r}", at=self.i - 1)
            self.expect(",")
            if self.toks[self.i] == "*":
                self.i += 1
                shape = None
            else:
                self.expect("[")
                dims: list[int | str] = []
                while self.toks[self.i] != "]":
                    dims.append(self.dim_token(self.toks[self.i]))
                    self.i += 1
                    if self.toks[self.i] != ",":
                        break
                    self.i += 1
                self.expect("]")
                shape = tuple(dims)
                if len(shape) > MAX_RANK:
                    raise self.fail(f"tensor rank {len(shape)} exceeds {MAX_RANK}")
            self.expect(">")
            result: ValueType = TensorType(dtype, shape)
        elif tok == "dict":
            key = self.type()
            self.expect(",")
            value = self.type()
            self.expect(">")
            result = DictType(key, value)
        elif tok == "list":
            element = self.type()
            length: int | str | None = None
            if self.toks[self.i] == ",":
                self.i += 1
                length = self.dim_token(self.toks[self.i])
                self.i += 1
                if length == "?":
                    length = None
            self.expect(">")
            result = ListType(element, length)
        elif tok == "tuple":
            elements = [self.type()]
            while self.toks[self.i] == ",":
                self.i += 1
                elements.append(self.type())
            self.expect(">")
            result = TupleType(tuple(elements))
        else:
            wrapped = self.type()
            self.expect(">")
            result = StateType(wrapped)
        self.depth -= 1
        return result

    def bare_scalar(self, dtype: str) -> TensorType:
        cached = self.types.get(dtype)
        if cached is None:
            cached = self.types[dtype] = TensorType(dtype, ())
        return cached

    def simple_tensor_type(self, tok: str) -> TensorType:
        inner = tok[7:-1]
        dtype, _, rest = inner.partition(",")
        dtype = dtype.strip()
        if dtype not in DTYPES:
            raise self.fail(f"unknown data type {dtype!r}")
        rest = rest.strip()
        if rest == "*":
            return TensorType(dtype, None)
        body = rest[1:-1].strip()
        if not body:
            return TensorType(dtype, ())
        dims = tuple(self.dim_token(part.strip()) for part in body.split(","))
        if len(dims) > MAX_RANK:
            raise self.fail(f"tensor rank {len(dims)} exceeds {MAX_RANK}")
        return TensorType(dtype, dims)

    def dim_token(self, part: str) -> int | str:
        if _digits(part):
            value = int(part)
            if value >= 1 << 63:
                raise self.fail(f"dimension {part} is too large")
            return value
        if part == "?" or _IDENT.match(part):
            return part
        raise self.fail(f"invalid dimension {part!r}")

    # -- values -------------------------------------------------------------------------

    def value(self) -> Value:
        vtype = self.type()
        if isinstance(vtype, StateType):
            raise self.fail("a state type has no literal value", at=self.i - 1)
        self.expect("(")
        result = self.literal(vtype)
        self.expect(")")
        return result

    def literal(self, vtype: ValueType) -> Value:
        if isinstance(vtype, TensorType):
            if self.toks[self.i] == "BLOBFILE":
                return self.blobfile(vtype)
            return TensorValue(vtype, self.tensor_literal(vtype), base_dir=self.base_dir)
        self.enter()
        toks = self.toks
        if isinstance(vtype, DictType):
            self.expect("{")
            items: list[tuple[Value, Value]] = []
            while toks[self.i] == "{":
                self.i += 1
                key = self.literal(vtype.key)
                self.expect(",")
                val = self.literal(vtype.value)
                self.expect("}")
                items.append((key, val))
                if toks[self.i] != ",":
                    break
                self.i += 1
            self.expect("}")
            result: Value = DictValue(vtype, tuple(items))
        elif isinstance(vtype, TupleType):
            self.expect("(")
            elements = []
            for n, element in enumerate(vtype.elements):
                if n:
                    self.expect(",")
                elements.append(self.literal(element))
            self.expect(")")
            result = ListValue(vtype, tuple(elements))
        elif isinstance(vtype, ListType):
            self.expect("[")
            elements = []
            while toks[self.i] != "]":
                elements.append(self.literal(vtype.element))
                if toks[self.i] != ",":
                    break
                self.i += 1
            self.expect("]")
            if isinstance(vtype.length, int) and len(elements) != vtype.length:
                raise self.fail(f"list of declared length {vtype.length} holds {len(elements)} values")
            result = ListValue(vtype, tuple(elements))
        else:
            raise self.fail(f"no literal form for {vtype}")
        self.depth -= 1
        return result

    def blobfile(self, vtype: TensorType) -> TensorValue:
        self.i += 1
        self.expect("(")
        fields: dict[str, Value] = {}
        while True:
            key = self.ident("'path' or 'offset'")
            self.expect("=")
            fields[key] = self.value()
            if self.toks[self.i] != ",":
                break
            self.i += 1
        self.expect(")")
        path, offset = fields.get("path"), fields.get("offset")
        if (not isinstance(path, TensorValue) or path.type.dtype != "string" or path.type.shape != ()
                or not isinstance(offset, TensorValue) or offset.type.dtype not in _INTS or offset.type.shape != ()
                or set(fields) != {"path", "offset"}):
            raise self.fail("BLOBFILE needs exactly a string 'path' and an integer 'offset'")
        if vtype.static_shape is None:
            raise self.fail(f"a weight-file tensor needs a static shape, not {list(vtype.shape or [])}")
        return TensorValue(vtype, BlobRef(str(path.data.item()), int(offset.data)), base_dir=self.base_dir)

    def tensor_literal(self, vtype: TensorType) -> np.ndarray:
        if vtype.shape is None:
            raise self.fail("a tensor literal needs a known rank")
        rank = len(vtype.shape)
        convert = self.scalar_reader(vtype.dtype)
        if rank == 0:
            value = convert()
            if vtype.dtype == "string":
                array = np.empty((), dtype=object)
                array[()] = value
                return array
            if vtype.dtype == "bf16":
                return _bf16_bits([value]).reshape(())
            return np.array(value, dtype=DTYPES[vtype.dtype])
        flat: list[Any] = []
        sizes: list[int | None] = [None] * rank
        self.nested(0, rank, flat, sizes, convert)
        # below an empty list nothing says how long the inner lists would be: the type does
        shape = tuple(size if size is not None else (declared if isinstance(declared, int) else 0)
                      for size, declared in zip(sizes, vtype.shape))
        for declared, actual in zip(vtype.shape, shape):
            if isinstance(declared, int) and declared != actual:
                raise self.fail(f"tensor literal has shape {list(shape)}, its type declares {list(vtype.shape)}")
        if vtype.dtype == "string":
            array = np.empty(len(flat), dtype=object)
            array[:] = flat
            return array.reshape(shape)
        if vtype.dtype == "bf16":
            return _bf16_bits(flat).reshape(shape)
        return np.array(flat, dtype=DTYPES[vtype.dtype]).reshape(shape)

    def nested(self, level: int, rank: int, flat: list[Any], sizes: list[int | None], convert: Callable[[], Any]) -> None:
        toks = self.toks
        self.expect("[")
        n = 0
        if level + 1 == rank:
            if toks[self.i] != "]":
                flat.append(convert())
                n = 1
                while toks[self.i] == ",":
                    self.i += 1
                    flat.append(convert())
                    n += 1
        else:
            while toks[self.i] != "]":
                self.nested(level + 1, rank, flat, sizes, convert)
                n += 1
                if toks[self.i] != ",":
                    break
                self.i += 1
        self.expect("]")
        if sizes[level] is None:
            sizes[level] = n
        elif sizes[level] != n:
            raise self.fail(f"ragged tensor literal: {n} values where {sizes[level]} came before", at=self.i - 1)

    def scalar_reader(self, dtype: str) -> Callable[[], Any]:
        if dtype == "string":
            return self.string
        if dtype == "bool":
            return self.boolean
        if dtype in FLOAT_DTYPES:
            return self.floating
        low, high = _INT_RANGES[dtype]

        def integer() -> int:
            tok = self.toks[self.i]
            try:
                value = int(tok)
            except ValueError:
                raise self.fail(f"expected an integer, found {self.describe()}") from None
            if not low <= value <= high:
                raise self.fail(f"{value} is out of range for {dtype}")
            self.i += 1
            return value

        return integer

    def string(self) -> str:
        tok = self.toks[self.i]
        if tok[:1] != '"' or len(tok) < 2 or tok[-1] != '"':
            raise self.fail(f"expected a string, found {self.describe()}")
        self.i += 1
        body = tok[1:-1]
        return _unescape(body) if "\\" in body else body

    def boolean(self) -> bool:
        tok = self.toks[self.i]
        if tok == "true":
            self.i += 1
            return True
        if tok == "false":
            self.i += 1
            return False
        raise self.fail(f"expected true or false, found {self.describe()}")

    def floating(self) -> float:
        tok = self.toks[self.i]
        try:
            value = float.fromhex(tok) if "x" in tok or "X" in tok else float(tok)
        except ValueError:
            raise self.fail(f"expected a number, found {self.describe()}") from None
        if tok[:1] not in "-0123456789" and tok not in ("inf", "nan"):
            raise self.fail(f"expected a number, found {self.describe()}")
        self.i += 1
        return value


def _bf16_bits(values: list[float]) -> np.ndarray:
    """Floats -> bfloat16 bit patterns (round to nearest even), the storage `DTYPES` uses for bf16."""
    bits = np.array(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.array(values, dtype=np.float32))
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a NaN
    return rounded


def _bf16_float(bits: int) -> float:
    return float(np.array([int(bits) << 16], dtype=np.uint32).view(np.float32)[0])


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "0": "\0"}


def _unescape(body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\" or i + 1 == len(body):
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", body[i + 2:i + 4]):
            out.append(chr(int(body[i + 2:i + 4], 16)))
            i += 4
        else:
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


# -- public API ---------------------------------------------------------------------------


def loads(text: str, base_dir: str | Path | None = None, source: str | None = None) -> Program:
    """Parse model.mil text. `base_dir` is the folder `@model_path` names (the .mlmodelc)."""
    parser = _Parser(text, Path(base_dir) if base_dir is not None else None, source)
    # a parse allocates hundreds of thousands of acyclic objects; the cycle collector
    # scanning them over and over costs a third of the time, so it waits until the end
    collecting = gc.isenabled()
    gc.disable()
    try:
        return parser.program()
    except IndexError:  # ran past the EOF sentinel while looking ahead
        raise parser.fail("unexpected end of file", at=len(parser.toks) - 1) from None
    except RecursionError:  # pragma: no cover - depth is bounded, this is a last resort
        raise parser.fail("nesting too deep") from None
    finally:
        if collecting:
            gc.enable()


def load(path: str | Path) -> Program:
    """Parse a `model.mil` file, or the one inside a `.mlmodelc` folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.mil"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MILSyntaxError("file not found", source=str(path), hint="A compiled bundle needs model.mil.") from None
    except OSError as exc:
        raise MILSyntaxError(f"cannot read: {exc.strerror}", source=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise MILSyntaxError("not UTF-8 text", line=line, column=column, source=str(path)) from None
    return loads(text, base_dir=path.parent, source=str(path))


def dumps(program: Program, style: str | None = None) -> str:
    """Print a program as model.mil text. style: "bare" (`string("x")`), "tensor"
    (`tensor<string, []>("x")`) or None to follow the program version (1.3 and later: bare)."""
    if style is None:
        style = "bare" if _version_at_least(program.version, (1, 3)) else "tensor"
    if style not in ("bare", "tensor"):
        raise ValueError(f"style must be 'bare' or 'tensor', not {style!r}")
    printer = _Printer(bare=style == "bare")
    return printer.program(program)


def dump(program: Program, path: str | Path, style: str | None = None) -> Path:
    """Write a program to a file (via a temporary file, renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(program, style=style), encoding="utf-8")
    tmp.replace(path)
    return path


def _version_at_least(version: str, wanted: tuple[int, int]) -> bool:
    parts = []
    for part in str(version).split(".")[:2]:
        if not _digits(part):
            return False
        parts.append(int(part))
    while len(parts) < 2:
        parts.append(0)
    return tuple(parts) >= wanted


class _Printer:
    def __init__(self, bare: bool) -> None:
        self.bare = bare
        self.type_text: dict[ValueType, str] = {}

    def program(self, program: Program) -> str:
        out = [f"program({program.version})\n"]
        if program.attributes:
            out.append(self.attributes(program.attributes) + "\n")
        out.append("{\n")
        for function in program.functions.values():
            self.function(function, out)
        out.append("}")
        return "".join(out)

    def function(self, function: Function, out: list[str]) -> None:
        params = ", ".join(f"{self.type(v.type)} {_name(v.name)}" for v in function.inputs)
        head = f"    func {_name(function.name)}<{function.opset}>({params})"
        if function.attributes:
            head += " " + self.attributes(function.attributes)
        out.append(head + " {\n")
        self.block_ops(function.block, out, indent=" " * 12)
        out.append(f"        }} -> ({', '.join(_name(n) for n in function.block.outputs)});\n")

    def block_ops(self, block: Block, out: list[str], indent: str) -> None:
        for op in block.operations:
            outputs = ", ".join(f"{self.type(v.type)} {_name(v.name)}" for v in op.outputs)
            inputs = ", ".join(f"{_name(k)} = {self.binding(b)}" for k, b in op.inputs.items())
            line = f"{indent}{outputs} = " if op.outputs else indent
            line += f"{_name(op.type)}({inputs})"
            if op.attributes:
                line += self.attributes(op.attributes)
            if op.blocks:
                out.append(line + " {\n")
                inner = indent + "    "
                for block_ in op.blocks:
                    params = ", ".join(f"{self.type(v.type)} {_name(v.name)}" for v in block_.inputs)
                    out.append(f"{inner}block({params}) {{\n")
                    self.block_ops(block_, out, inner + "    ")
                    out.append(f"{inner}}} -> ({', '.join(_name(n) for n in block_.outputs)});\n")
                out.append(f"{indent}}};\n")
            else:
                out.append(line + ";\n")

    def binding(self, binding: Any) -> str:
        if isinstance(binding, tuple):
            return "(" + ", ".join(self.argument(a) for a in binding) + ")"
        return self.argument(binding)

    def argument(self, arg: Any) -> str:
        if isinstance(arg, str):
            return _name(arg)
        return self.value(arg)

    def attributes(self, attributes: dict[str, Value]) -> str:
        return "[" + ", ".join(f"{_name(k)} = {self.value(v)}" for k, v in attributes.items()) + "]"

    # -- types and values -------------------------------------------------------------

    def type(self, vtype: ValueType) -> str:
        cached = self.type_text.get(vtype)
        if cached is not None:
            return cached
        if isinstance(vtype, TensorType):
            if vtype.shape == () and self.bare:
                text = vtype.dtype
            elif vtype.shape is None:
                text = f"tensor<{vtype.dtype}, *>"
            else:
                text = f"tensor<{vtype.dtype}, [{', '.join(_dim(d) for d in vtype.shape)}]>"
        elif isinstance(vtype, DictType):
            text = f"dict<{self.type(vtype.key)}, {self.type(vtype.value)}>"
        elif isinstance(vtype, ListType):
            length = "?" if vtype.length is None else _dim(vtype.length)
            text = f"list<{self.type(vtype.element)}, {length}>"
        elif isinstance(vtype, TupleType):
            text = f"tuple<{', '.join(self.type(t) for t in vtype.elements)}>"
        elif isinstance(vtype, StateType):
            text = f"state<{self.type(vtype.wrapped)}>"
        else:
            raise TypeError(f"not a MIL type: {vtype!r}")
        self.type_text[vtype] = text
        return text

    def value(self, value: Value) -> str:
        return f"{self.type(value.type)}({self.literal(value)})"

    def literal(self, value: Value) -> str:
        if isinstance(value, TensorValue):
            if isinstance(value.data, BlobRef):
                path = self.value(_scalar("string", value.data.path))
                offset = self.value(_scalar("uint64", value.data.offset))
                return f"BLOBFILE(path = {path}, offset = {offset})"
            return _tensor_literal(value.type.dtype, np.asarray(value.data))
        if isinstance(value, DictValue):
            items = ", ".join(f"{{{self.literal(k)}, {self.literal(v)}}}" for k, v in value.items)
            return "{" + items + "}"
        if isinstance(value, ListValue):
            inner = ", ".join(self.literal(v) for v in value.items)
            return f"({inner})" if isinstance(value.type, TupleType) else f"[{inner}]"
        raise TypeError(f"not a MIL value: {value!r}")


def _scalar(dtype: str, item: Any) -> TensorValue:
    return TensorValue(TensorType(dtype, ()), np.array(item, dtype=DTYPES[dtype]))


def _name(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"{name!r} cannot be written in model.mil (names are [A-Za-z_][A-Za-z0-9_.]*)")
    return name


def _dim(dim: Any) -> str:
    if isinstance(dim, (int, np.integer)):
        return str(int(dim))
    return _name(dim) if dim != "?" else "?"


def _tensor_literal(dtype: str, array: np.ndarray) -> str:
    fmt = _formatter(dtype)
    if array.ndim == 0:
        return fmt(array.item() if dtype != "string" else array[()])
    return _nested(array, fmt)


def _nested(array: np.ndarray, fmt: Callable[[Any], str]) -> str:
    if array.ndim == 1:
        return "[" + ", ".join(fmt(x) for x in array.tolist()) + "]"
    return "[" + ", ".join(_nested(sub, fmt) for sub in array) + "]"


def _formatter(dtype: str) -> Callable[[Any], str]:
    if dtype == "string":
        return _quote
    if dtype == "bool":
        return lambda x: "true" if x else "false"
    if dtype == "bf16":
        return lambda bits: _hex_float(_bf16_float(bits))
    if dtype in FLOAT_DTYPES:
        return _hex_float
    return lambda x: str(int(x))


def _hex_float(x: float) -> str:
    x = float(x)
    if x != x:
        return "-nan" if np.signbit(x) else "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    text = x.hex()  # '-0x1.8000000000000p-3'
    mantissa, _, exponent = text.partition("p")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}p{exponent}"


_QUOTE_MAP = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _quote(s: Any) -> str:
    s = str(s)
    out = []
    for ch in s:
        if ch in _QUOTE_MAP:
            out.append(_QUOTE_MAP[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'

