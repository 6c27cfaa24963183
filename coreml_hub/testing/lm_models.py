"""Tiny causal language models exported to Core ML the way the Hub's LLM repos are, cached on disk.

- `stateful_lm(weights)`: Apple's Mistral export (apple/mistral-coreml, swift-transformers'
  `Examples/Mistral7B/export.py`): `inputIds` int32 [1, 1..CONTEXT] and `causalMask` fp16
  [1, 1, 1..CONTEXT, 1..CONTEXT] in, `logits` fp16 out; the KV cache lives in two iOS18
  states, `keyCache` and `valueCache` [layers, 1, kv_heads, CONTEXT, head_dim]: the new
  tokens' keys and values are written at [end - q, end), where `end` is the mask's last
  dimension, and attention reads [0, end). `weights="int4"` quantizes the weights block-wise
  to int4 (linear symmetric, blocks of 32), as the Int4 package is; `"fp16"` keeps fp16.
  Metadata `co.huggingface.exporters.name` names the tokenizer's repo (`MISTRAL_SOURCE`).
- `exporters_lm()`: the `exporters` text-generation export (coreml-projects/Llama-2-7b-chat-coreml):
  `input_ids` and `attention_mask` int32 [1, SEQ] in, `logits` [1, SEQ, vocab] out, no cache,
  with the `co.huggingface.exporters.*` metadata.

The models are a tiny `MistralForCausalLM` and `LlamaForCausalLM` from transformers with
random weights from a seed; `reference(package)` gives that transformers model holding the
very weights the package holds (fp16-rounded; int4 ones as the package dequantizes them), so
`generate` on it is the reference for the tokens. `tokenizer_folder()` is a small BPE tokenizer
(`tokenizer.json`, `tokenizer_config.json` with a chat template, `special_tokens_map.json`) whose
vocabulary is the models'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import factory

CODE = ("testing/lm_models.py",)
CONTEXT = 64  # the stateful model's KV cache length (Mistral: 2048)
SEQ = 32  # the exporters model's fixed sequence length (Llama 2: 64)
MISTRAL_SOURCE = "mistralai/Mistral-7B-Instruct-v0.3"  # what Apple's export names as the tokenizer's repo
LLAMA_SOURCE = "meta-llama/Llama-2-7b-chat-hf"
VOCAB = 192
SPECIALS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
_CORPUS = (
    "the quick brown fox jumps over the lazy dog . what is core ml ? core ml runs models on apple devices . "
    "a model takes inputs and gives outputs . hello , how are you today ? i am fine , thank you . "
    "tell me a story about a cat and a dog who live in a small house near the sea . "
    "once upon a time there was a little robot that wanted to learn to paint the sky . "
    "[INST] question [/INST] answer"
)


def tokenizer_folder() -> Path:
    """The tiny tokenizer's files (cached): what a Mistral or Llama repo ships, on a small scale."""

    def build(tmp: Path) -> None:
        import string

        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = list(string.ascii_letters + string.digits + string.punctuation) + ["\u2581"]
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIALS), initial_alphabet=alphabet,
                                      show_progress=False)
        tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        if tok.get_vocab_size() != VOCAB:
            raise ValueError(f"the tiny tokenizer has {tok.get_vocab_size()} tokens, not {VOCAB}")
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        fast.save_pretrained(str(tmp))
        # as Mistral's and Llama's repos have it: a fast-tokenizer class any transformers version knows,
        # the chat template inside tokenizer_config.json
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE, model_max_length=CONTEXT)
        config.pop("backend", None)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "chat_template.jinja").unlink(missing_ok=True)
        (tmp / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")

    return factory.cached("lm-tokenizer", build, CODE, vocab=VOCAB)


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_folder()))


def causal_lm(kind: str) -> Any:
    """The tiny transformers model (`mistral` or `llama`) with random weights from a fixed seed."""
    import torch

    if kind == "mistral":
        from transformers import MistralConfig as Config, MistralForCausalLM as Model
    elif kind == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    else:
        raise ValueError(f"kind must be mistral or llama, not {kind!r}")
    config = Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "mistral":
        config.sliding_window = None
    torch.manual_seed(14 if kind == "mistral" else 15)
    model = Model(config).eval()
    with torch.no_grad():  # larger logits than the default init: clear margins between the top tokens
        model.lm_head.weight.mul_(8.0)
    return model


class _Decoder:
    """The decoder stack of a transformers Llama/Mistral, run on given positions, mask and cache slices."""

    @staticmethod
    def forward(module: Any, input_ids: Any, mask: Any, positions: Any, cache: Any = None, past: Any = None,
                end: Any = None) -> Any:
        import torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        hf = module.hf
        model = hf.model
        q_len = input_ids.shape[-1]
        head_dim = hf.config.hidden_size // hf.config.num_attention_heads
        h = model.embed_tokens(input_ids)
        cos, sin = model.rotary_emb(h, positions)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, q_len, -1, head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, q_len, -1, head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, q_len, -1, head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if cache is not None:  # write the new keys and values into the state, read everything so far
                keys, values = cache
                keys[i, :, :, past:end, :] = k
                values[i, :, :, past:end, :] = v
                k, v = keys[i, :, :, :end, :], values[i, :, :, :end, :]
            k = repeat_kv(k, attn.num_key_value_groups)
            v = repeat_kv(v, attn.num_key_value_groups)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(1, q_len, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return hf.lm_head(model.norm(h))


def _stateful_module(hf: Any) -> Any:
    import torch

    class StatefulCausalLM(torch.nn.Module):
        """Apple's stateful wrapper: the KV cache as registered buffers, updated in place."""

        def __init__(self) -> None:
            super().__init__()
            self.hf = hf
            c = hf.config
            shape = (c.num_hidden_layers, 1, c.num_key_value_heads, CONTEXT, c.hidden_size // c.num_attention_heads)
            self.register_buffer("keyCache", torch.zeros(shape))
            self.register_buffer("valueCache", torch.zeros(shape))

        def forward(self, input_ids: Any, causal_mask: Any) -> Any:
            end = causal_mask.shape[-1]
            past = end - input_ids.shape[-1]
            positions = torch.arange(past, end).unsqueeze(0)
            return _Decoder.forward(self, input_ids, causal_mask, positions, (self.keyCache, self.valueCache),
                                    past, end)

    return StatefulCausalLM().eval()


def _fixed_module(hf: Any) -> Any:
    import torch

    class FixedLengthCausalLM(torch.nn.Module):
        """The exporters wrapper: the whole padded sequence every call, causal and padding mask."""

        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            n = input_ids.shape[-1]
            allowed = torch.tril(torch.ones(n, n)) * attention_mask.view(1, 1, 1, n).float()
            mask = (1.0 - allowed) * -1e4
            positions = torch.arange(n).unsqueeze(0)
            return _Decoder.forward(self, input_ids, mask, positions)

    return FixedLengthCausalLM().eval()


def _held_weights(hf: Any, program: Any) -> dict[str, Any]:
    """The transformers state dict with the weights a converted program holds: every float tensor
    rounded to fp16, and each block-quantized weight replaced by its dequantized value."""
    import numpy as np
    import torch

    state = {k: v.detach().clone().half().float() if v.is_floating_point() else v.clone()
             for k, v in hf.state_dict().items()}
    if program is None:
        return state
    dequantized = []
    for op in program.functions["main"].find_ops(op_type="constexpr_blockwise_shift_scale"):
        # in float32, as the runtime dequantizes on a CPU (int4 times an fp16 scale is exact there)
        offset = None if op.offset is None else op.offset.val.astype(np.float32)
        dequantized.append(op.decompress(op.data.val, op.scale.val.astype(np.float32), offset))
    for name, tensor in list(state.items()):
        if tensor.ndim != 2 or not tensor.is_floating_point():
            continue
        same = [d for d in dequantized if d.shape == tuple(tensor.shape)]
        if not same:
            continue
        errors = [float(np.abs(d - tensor.numpy()).max()) for d in same]
        best = int(np.argmin(errors))
        state[name] = torch.from_numpy(same[best].copy())
        dequantized = [d for d in dequantized if d is not same[best]]
    if dequantized:
        raise ValueError(f"{len(dequantized)} quantized weight(s) matched no transformers weight")
    return state


def stateful_lm(weights: str = "int4") -> Path:
    """`StatefulMistral7BInstruct<Int4|FP16>.mlpackage`-shaped model (cached); returns the package."""
    if weights not in ("int4", "fp16"):
        raise ValueError(f"weights must be int4 or fp16, not {weights!r}")

    def build(tmp: Path) -> None:
        import coremltools as ct
        import numpy as np
        import torch

        hf = causal_lm("mistral")
        module = _stateful_module(hf)
        with torch.no_grad():
            traced = torch.jit.trace(module, [torch.zeros((1, 2), dtype=torch.int32), torch.zeros((1, 1, 2, 5))])
        query = ct.RangeDim(lower_bound=1, upper_bound=CONTEXT, default=1)
        end = ct.RangeDim(lower_bound=1, upper_bound=CONTEXT, default=1)
        cache = ct.TensorType(shape=tuple(module.keyCache.shape), dtype=np.float16)
        with factory._quiet_loading():
            model = ct.convert(
                traced,
                inputs=[ct.TensorType(shape=(1, query), dtype=np.int32, name="inputIds"),
                        ct.TensorType(shape=(1, 1, query, end), dtype=np.float16, name="causalMask")],
                outputs=[ct.TensorType(dtype=np.float16, name="logits")],
                states=[ct.StateType(wrapped_type=cache, name="keyCache"),
                        ct.StateType(wrapped_type=cache, name="valueCache")],
                minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
            program = None
            if weights == "int4":
                config = ct.optimize.coreml.OptimizationConfig(global_config=ct.optimize.coreml.OpLinearQuantizerConfig(
                    mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32))
                model = ct.optimize.coreml.linear_quantize_weights(model, config=config)
                program = model._mil_program
        model.user_defined_metadata["co.huggingface.exporters.name"] = MISTRAL_SOURCE
        model.save(str(tmp / "model.mlpackage"))
        torch.save(_held_weights(hf, program), tmp / "weights.pt")

    return factory.cached("lm-stateful", build, CODE, weights=weights, context=CONTEXT) / "model.mlpackage"


def exporters_lm() -> Path:
    """`llama-2-7b-chat.mlpackage`-shaped model (cached): exporters' text-generation I/O and metadata."""

    def build(tmp: Path) -> None:
        import coremltools as ct
        import numpy as np
        import torch

        hf = causal_lm("llama")
        ids = torch.zeros((1, SEQ), dtype=torch.int32)
        mask = torch.ones((1, SEQ), dtype=torch.int32)
        with torch.no_grad():
            traced = torch.jit.trace(_fixed_module(hf), (ids, mask))
        with factory._quiet_loading():
            model = ct.convert(
                traced,
                inputs=[ct.TensorType(name="input_ids", shape=(1, SEQ), dtype=np.int32),
                        ct.TensorType(name="attention_mask", shape=(1, SEQ), dtype=np.int32)],
                outputs=[ct.TensorType(name="logits")],
                minimum_deployment_target=ct.target.macOS13, compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram", skip_model_load=True)
        model.user_defined_metadata.update({
            "co.huggingface.exporters.name": LLAMA_SOURCE,
            "co.huggingface.exporters.task": "text-generation",
            "co.huggingface.exporters.architecture": "LlamaForCausalLM",
            "co.huggingface.exporters.framework": "pytorch",
            "co.huggingface.exporters.precision": "float16",
        })
        model.save(str(tmp / "model.mlpackage"))
        torch.save(_held_weights(hf, None), tmp / "weights.pt")

    return factory.cached("lm-exporters", build, CODE, seq=SEQ) / "model.mlpackage"


def reference(package: Path) -> Any:
    """The transformers model holding the weights `package` holds (see `_held_weights`)."""
    import torch

    kind = "mistral" if "lm-stateful" in str(package) else "llama"
    hf = causal_lm(kind)
    hf.load_state_dict(torch.load(Path(package).parent / "weights.pt", weights_only=True), strict=False)
    for name, buffer in hf.named_buffers():  # rotary frequencies, as the fp16 program holds them
        buffer.copy_(buffer.half().float())
    return hf.eval()


__all__ = ["CHAT_TEMPLATE", "CONTEXT", "LLAMA_SOURCE", "MISTRAL_SOURCE", "SEQ", "VOCAB", "causal_lm",
           "exporters_lm", "load_tokenizer", "reference", "stateful_lm", "tokenizer_folder"]
