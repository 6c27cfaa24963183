"""Attention implementations for conversion, installed as diffusers attention processors.

All three compute the same function as diffusers' own processors; they differ in the
graph they trace to, which is what Core ML schedules on CPU, GPU or the Neural Engine:

- ``original``: one batched matmul -> softmax -> matmul over all heads. Best on GPUs.
- ``split_einsum``: the Neural Engine layout. Activations are held as [B, C, 1, S],
  projections are 1x1 convolutions, and every head is its own pair of ``einsum`` ops,
  so no tensor ever carries a head axis the Neural Engine would have to transpose.
- ``split_einsum_v2``: ``split_einsum`` with the query sequence cut into chunks, which
  keeps the [B, S_k, 1, S_q] score tensors small at high resolutions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .naming import ATTENTIONS as IMPLEMENTATIONS
from .naming import DEFAULT_QUERY_CHUNK_SIZE


class _Processor:
    """Shared pre- and post-processing around an attention core (mirrors diffusers' AttnProcessor)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channels, height * width).transpose(1, 2)
        if attention_mask is not None:
            # Stable Diffusion never masks attention; a mask would need broadcasting per layout.
            raise NotImplementedError("attention masks are not supported by the Core ML attention processors")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        hidden_states = self.attend(attn, hidden_states, context)
        hidden_states = attn.to_out[1](hidden_states)  # dropout (identity in eval)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, attn: Any, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """[B, S, C] queries and [B, S_k, C_k] context -> projected output [B, S, C_out]."""
        raise NotImplementedError


class OriginalAttnProcessor(_Processor):
    """Plain multi-head attention: matmul, softmax, matmul with a head axis."""

    def attend(self, attn: Any, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = attn.heads
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        batch, seq, inner = q.shape
        dim_head = inner // heads
        q = q.reshape(batch, seq, heads, dim_head).transpose(1, 2)
        k = k.reshape(batch, -1, heads, dim_head).transpose(1, 2)
        v = v.reshape(batch, -1, heads, dim_head).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
        if attn.upcast_softmax:
            scores = scores.float()
        weights = scores.softmax(dim=-1).to(v.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, seq, inner)
        return attn.to_out[0](out)


def _conv1x1(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """A Linear layer applied to [B, C, 1, S] as a 1x1 convolution."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def _to_ane(x: torch.Tensor) -> torch.Tensor:
    """[B, S, C] -> [B, C, 1, S]."""
    return x.transpose(1, 2).unsqueeze(2)


def _from_ane(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, S] -> [B, S, C]."""
    return x.squeeze(2).transpose(1, 2)


class SplitEinsumAttnProcessor(_Processor):
    """Per-head einsum attention in the [B, C, 1, S] layout."""

    def __init__(self, query_chunk_size: int | None = None) -> None:
        self.query_chunk_size = query_chunk_size

    def attend(self, attn: Any, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = _conv1x1(_to_ane(x), attn.to_q)  # [B, inner, 1, S_q]
        ctx = _to_ane(context)
        k = _conv1x1(ctx, attn.to_k)  # [B, inner, 1, S_k]
        v = _conv1x1(ctx, attn.to_v)
        heads = attn.heads
        dim_head = q.shape[1] // heads
        # Keys as [B, S_k, 1, C]: each head then slices its channels off the last axis.
        k_t = k.transpose(1, 3)
        outputs = []
        for h in range(heads):
            lo, hi = h * dim_head, (h + 1) * dim_head
            qh, kh, vh = q[:, lo:hi], k_t[..., lo:hi], v[:, lo:hi]
            outputs.append(torch.cat([self._head(attn, qc, kh, vh) for qc in self._chunks(qh)], dim=3))
        out = torch.cat(outputs, dim=1)  # [B, inner, 1, S_q]
        return _from_ane(_conv1x1(out, attn.to_out[0]))

    def _chunks(self, qh: torch.Tensor) -> list[torch.Tensor]:
        size = self.query_chunk_size
        seq = qh.shape[3]
        if not size or seq <= size:
            return [qh]
        return [qh[..., start : start + size] for start in range(0, seq, size)]

    @staticmethod
    def _head(attn: Any, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        # scores[b, k, 0, q]: softmax runs over the key axis (dim 1)
        scores = torch.einsum("bchq,bkhc->bkhq", qh, kh) * attn.scale
        if attn.upcast_softmax:
            scores = scores.float()
        weights = scores.softmax(dim=1).to(vh.dtype)
        return torch.einsum("bkhq,bchk->bchq", weights, vh)


def make_processor(implementation: str, query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE) -> _Processor:
    """The attention processor for an implementation name."""
    if implementation == "original":
        return OriginalAttnProcessor()
    if implementation == "split_einsum":
        return SplitEinsumAttnProcessor()
    if implementation == "split_einsum_v2":
        return SplitEinsumAttnProcessor(query_chunk_size=query_chunk_size)
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {', '.join(IMPLEMENTATIONS)}")


def install(module: torch.nn.Module, implementation: str, query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE) -> int:
    """Put `implementation` on every diffusers Attention in `module`; returns how many were set."""
    from diffusers.models.attention_processor import Attention

    processor = make_processor(implementation, query_chunk_size)
    count = 0
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.set_processor(processor)
            count += 1
    return count
