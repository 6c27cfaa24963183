"""The `text-generation` task: causal language models, streamed token by token.

Two export contracts, read from the model's declared inputs, outputs and states:

- Apple's stateful export (apple/mistral-coreml, swift-transformers' `export.py`): `inputIds`
  int32 [1, q] and `causalMask` fp16 [1, 1, q, end] in, `logits` [1, q, vocab] out, the KV cache
  in the states `keyCache`/`valueCache` [layers, 1, kv_heads, context, head_dim]. The prompt
  goes in at once with a causal mask (0 on and below the diagonal, -inf above), then one token
  per call with a zero mask [1, 1, 1, tokens so far]; the model writes each call's keys and
  values at [end - q, end) of its state. The context is the cache length.
- The exporters' export (coreml-projects/Llama-2-7b-chat-coreml): `input_ids` (and
  `attention_mask`) int32 of a fixed length [1, SEQ] in, `logits` out; the sequence is padded
  (mask 0) and the whole of it runs every step; the next token's logits are at the last real
  position. The context is SEQ.

The tokenizer comes from the model's folder (the repo's companion files), else from the repo its
metadata names (`co.huggingface.exporters.name`), else `--tokenizer`; its chat template wraps
the prompt when it has one (`--no-chat` leaves it out, `--system` adds a system message).
Greedy by default; `--temperature` above 0 samples (`--top-p`, `--seed`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping


from coreml_hub.errors import InvalidBundle, ModelInputError, UsageError
from coreml_hub.hookspecs import hookimpl
from coreml_hub.tasks import (KNOWN, NAMED, BundleSpec, ModelInfo, Rendering, TaskRequest, load_bundle,
                              one_input)

DEFAULT_MAX_NEW_TOKENS = 128
STATEFUL = "stateful"
FIXED = "fixed-length"

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Contract:
    """How to call a language model: its input names, whether it keeps a KV cache, its context."""

    kind: str  # STATEFUL or FIXED
    ids: str
    mask: str | None
    context: int
    mask_dtype: Any = "float16"
    batched_prompt: bool = True  # the prompt may go in as one call (a flexible query length)
    logits_dtype: str = "fp16"  # what the model declares its logits as (Core ML hands them out so)


def contract_of(spec: BundleSpec) -> Contract | None:
    """The contract a model follows, or None when it is neither (or not a language model)."""
    logits = spec.output("logits")
    if logits is None:
        return None
    names = {f.name for f in spec.inputs}
    if {"inputIds", "causalMask"} <= names and spec.states:
        ids, mask = spec.input("inputIds"), spec.input("causalMask")
        assert ids is not None and mask is not None
        lengths = [s.shape[-2] for s in spec.states if s.shape and len(s.shape) >= 2]
        if ids.ranges:
            lengths.append(ids.ranges[-1][1] if ids.ranges[-1][1] > 0 else 1 << 30)
        if not lengths or ids.dtype != "int32":
            return None
        context = min(lengths)
        batched = bool(ids.ranges) and ids.ranges[-1][1] != 1
        return Contract(STATEFUL, "inputIds", "causalMask", context, mask.numpy_dtype, batched, logits.dtype)
    ids = spec.input("input_ids")
    if ids is None or ids.shape is None or len(ids.shape) != 2 or ids.dtype not in ("int32", "int64"):
        return None
    if names - {"input_ids", "attention_mask"}:
        return None  # more inputs (a past-key-values export): not a contract this task knows
    return Contract(FIXED, "input_ids", "attention_mask" if "attention_mask" in names else None, ids.shape[1],
                    logits_dtype=logits.dtype)


class Decoder:
    """Feeds a loaded model one contract's way: `start(prompt)` and `step(token)` give next-token logits."""

    def __init__(self, model: Any, contract: Contract) -> None:
        self.model = model
        self.contract = contract
        self.tokens: list[int] = []
        self.state = model.make_state() if contract.kind == STATEFUL else None

    def start(self, prompt: list[int]) -> np.ndarray:
        import numpy as np

        self.tokens = []
        if self.contract.kind == STATEFUL:
            self.state = self.model.make_state()
            if self.contract.batched_prompt:
                return self._stateful(prompt)
            logits = np.zeros(0)
            for token in prompt:
                logits = self._stateful([token])
            return logits
        self.tokens = list(prompt)
        return self._fixed()

    def step(self, token: int) -> np.ndarray:
        if self.contract.kind == STATEFUL:
            return self._stateful([token])
        self.tokens.append(token)
        return self._fixed()

    def _stateful(self, new: list[int]) -> np.ndarray:
        import numpy as np

        c = self.contract
        past = len(self.tokens)
        self.tokens.extend(new)
        n, end = len(new), len(self.tokens)
        mask = np.zeros((1, 1, n, end), dtype=c.mask_dtype)
        if n > 1:  # each new token sees the past and the new tokens up to itself
            mask[0, 0, :, past:] = np.triu(np.full((n, n), -np.inf, dtype=c.mask_dtype), k=1)
        return self._call({c.ids: np.asarray([new], dtype=np.int32), c.mask: mask}, -1)

    def _fixed(self) -> np.ndarray:
        import numpy as np

        c = self.contract
        n = len(self.tokens)
        ids = np.zeros((1, c.context), dtype=np.int32)
        ids[0, :n] = self.tokens
        inputs = {c.ids: ids}
        if c.mask is not None:
            mask = np.zeros((1, c.context), dtype=np.int32)
            mask[0, :n] = 1
            inputs[c.mask] = mask
        return self._call(inputs, n - 1)

    def _call(self, inputs: dict[str, Any], row: int) -> np.ndarray:
        """The logits at position `row` as float32 numpy; torch tensors in and out where the model takes
        them (the portable runtime), which spares a numpy copy of every output."""
        import numpy as np

        if hasattr(self.model, "predict_torch"):
            import torch

            out = self.model.predict_torch({k: torch.from_numpy(v) for k, v in inputs.items()}, state=self.state)
            logits = out["logits"][0, row]
            if self.contract.logits_dtype == "fp16":  # as Core ML gives them, whatever the device computed in
                logits = logits.half()
            return logits.float().cpu().numpy()
        out = self.model.predict(inputs, state=self.state) if self.state is not None else self.model.predict(inputs)
        return np.asarray(out["logits"], dtype=np.float32)[0, row]


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else a sample from the tempered distribution cut to its top-p mass."""
    import numpy as np

    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p - 1e-9)) + 1]  # the smallest set reaching top_p
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept / kept.sum()
    return int(rng.choice(len(p), p=p))


class TextStream:
    """Decodes the generated tokens so far and hands on only the new text (whole characters)."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.text = ""

    def update(self, tokens: list[int]) -> None:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        if new and self.emit is not None:
            self.emit(new)


@dataclass(frozen=True)
class TextGenerationResult:
    model: ModelInfo
    prompt: str
    text: str
    prompt_tokens: int
    tokens: tuple[int, ...]
    stop: str  # eos, max_new_tokens, context
    contract: str
    tokenizer: Mapping[str, Any]
    temperature: float
    top_p: float
    seed: int | None
    load_seconds: float
    prompt_seconds: float
    decode_seconds: float
    streamed: bool = field(default=False, compare=False)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: the tokens after the first (which the prompt's call gives) over their time."""
        later = len(self.tokens) - 1
        if later > 0 and self.decode_seconds > 0:
            return later / self.decode_seconds
        return len(self.tokens) / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"task": TextGeneration.name, "model": self.model.to_dict(),
                "prompt": self.prompt, "text": self.text, "prompt_tokens": self.prompt_tokens,
                "new_tokens": len(self.tokens), "tokens": list(self.tokens), "stop": self.stop,
                "contract": self.contract, "tokenizer": dict(self.tokenizer), "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "load_seconds": round(self.load_seconds, 3),
                "prompt_seconds": round(self.prompt_seconds, 4), "decode_seconds": round(self.decode_seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 2)}

    def render(self) -> Rendering:
        if self.streamed:
            return Rendering()
        return Rendering(lines=(self.text,), quiet=(self.text,))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' notices (a prompt longer than the tokenizer's max length, ...) stay off stderr:
    this task says what matters itself."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_tokenizer(folder: Path) -> Any:
    """transformers' tokenizer from a folder of tokenizer files, with a clear error when it cannot be read."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidBundle(f"Cannot read the tokenizer in {folder}: {type(exc).__name__}: {exc}") from exc


def stop_tokens(tokenizer: Any, folders: tuple[Path, ...]) -> set[int]:
    """End-of-sequence ids: the tokenizer's, and those a generation_config.json beside it names."""
    stops = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    for folder in folders:
        try:
            config = json.loads((folder / "generation_config.json").read_text())
        except (OSError, ValueError):
            continue
        eos = config.get("eos_token_id")
        stops.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    return stops


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool, system: str | None) -> list[int]:
    """Prompt ids: through the tokenizer's chat template when it has one and `chat` is on."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        return [int(i) for i in ids]
    if system:
        raise UsageError("--system needs a chat template, and this tokenizer has none (or --no-chat is set).",
                         hint="Put the instructions into the prompt instead.")
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


class TextGeneration:
    name = "text-generation"
    description = "Continues a prompt with a causal language model (stateful KV cache or fixed length), streamed."
    options = ("max_new_tokens", "temperature", "top_p", "seed", "system", "no_chat", "tokenizer")

    def recognize(self, model: ModelInfo) -> float:
        spec = model.single
        if spec is None or contract_of(spec) is None:
            return 0.0
        return (NAMED if model.names_task(self.name) else KNOWN) + model.tag_bonus(self.name)

    def run(self, model: ModelInfo, request: TaskRequest) -> TextGenerationResult:
        import numpy as np

        from coreml_hub.tokenizer_source import LM_FILES, NAME_KEY, has_lm_tokenizer, locate

        prompt = one_input(request, "PROMPT", f'coreml-hub run {model.ref} "What is Core ML?"')
        if request.images or request.texts:
            raise UsageError("text-generation takes a PROMPT, not --image or --text.")
        max_new = int(request.option("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        temperature = float(request.option("temperature", 0.0))
        top_p = float(request.option("top_p", 1.0))
        if max_new < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise UsageError("--max-new-tokens must be at least 1, --temperature at least 0, --top-p in (0, 1].")
        seed = request.option("seed")
        if temperature > 0 and seed is None:
            seed = secrets.randbelow(2**32)
        spec = model.single
        contract = contract_of(spec) if spec is not None else None
        if spec is None or contract is None:
            raise InvalidBundle(f"{model.name} is not a language model this task can run. {model.describe()}")
        source = locate(model.name, (model.folder, model.folder / "tokenizer"), present=has_lm_tokenizer,
                        files=LM_FILES, wanted=request.option("tokenizer"), named=spec.metadata.get(NAME_KEY))
        tokenizer = load_tokenizer(source.folder)
        with quiet_transformers():
            ids = encode_prompt(tokenizer, prompt, chat=not request.option("no_chat", False),
                                system=request.option("system"))
        if len(ids) > contract.context:
            raise ModelInputError(
                f"The prompt is {len(ids)} tokens, and {spec.name} holds at most {contract.context} tokens "
                "(prompt and answer together).",
                hint="Shorten the prompt" + ("" if request.option("no_chat") else
                                             " (--no-chat leaves out the chat template's tokens)") + ".")
        stops = stop_tokens(tokenizer, (source.folder, model.folder))
        request.say(f"Tokenizer from {source.describe()}; prompt of {len(ids)} tokens.")
        t0 = time.perf_counter()
        lm = load_bundle(spec.path, request)
        load_seconds = time.perf_counter() - t0
        request.say(f"Loaded {model.name} ({contract.kind}, context {contract.context}) in {load_seconds:.1f} s.")
        rng = np.random.default_rng(seed)
        stream = TextStream(tokenizer, request.on_text)
        decoder = Decoder(lm, contract)
        t0 = time.perf_counter()
        logits = decoder.start(ids)
        prompt_seconds = time.perf_counter() - t0
        generated: list[int] = []
        stop = "max_new_tokens"
        t0 = time.perf_counter()
        while True:
            token = pick(logits, temperature, top_p, rng)
            if token in stops:
                stop = "eos"
                break
            generated.append(token)
            stream.update(generated)
            if len(generated) >= max_new:
                break
            if len(ids) + len(generated) > contract.context:  # the next call would feed one token too many
                stop = "context"
                break
            logits = decoder.step(token)
        decode_seconds = time.perf_counter() - t0
        result = TextGenerationResult(model, prompt, stream.text, len(ids), tuple(generated), stop, contract.kind,
                                      source.to_dict(), temperature, top_p, seed, load_seconds, prompt_seconds,
                                      decode_seconds, streamed=request.on_text is not None)
        if stop == "context":
            request.say(f"Warning: stopped at the model's context of {contract.context} tokens.")
        request.say(f"Generated {len(generated)} tokens in {prompt_seconds + decode_seconds:.2f} s "
                    f"({result.tokens_per_second:.1f} tokens/s; the prompt took {prompt_seconds:.2f} s).")
        return result


@hookimpl
def register_tasks(register: Any) -> None:
    register(TextGeneration())
