"""Traceable modules with Apple's Core ML input/output contract around diffusers components.

Each wrapper takes exactly the tensors the Core ML model takes, in the same order and
layout, and returns the outputs in the order they are named.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TextEncoder(nn.Module):
    """`input_ids` (float, [1, 77]) -> (`last_hidden_state`, `pooled_outputs`).

    With `penultimate=True` (SDXL) the first output is the hidden states before the
    last encoder layer (`hidden_embeds`) and the second is the projected `text_embeds`
    when the encoder has a projection, else the pooled output.
    """

    def __init__(self, text_encoder: nn.Module, penultimate: bool = False) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.penultimate = penultimate

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_ids.to(torch.long)
        if not self.penultimate:
            out = self.text_encoder(ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output
        out = self.text_encoder(ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        return out.hidden_states[-2], pooled


def _unet_call(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, **kw: Any) -> torch.Tensor:
    # [B, C, 1, S] -> [B, S, C]: Apple's 4-D text layout, whatever the attention implementation
    context = states.squeeze(2).transpose(1, 2)
    return unet(sample, timestep, context, return_dict=False, **kw)[0]


class Unet(nn.Module):
    """(`sample`, `timestep`, `encoder_hidden_states` [B, C, 1, 77]) -> `noise_pred`."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return _unet_call(self.unet, sample, timestep, encoder_hidden_states)


class UnetXL(nn.Module):
    """SDXL: the Unet inputs plus `time_ids` [B, 6] and `text_embeds` [B, D] -> `noise_pred`."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        time_ids: torch.Tensor,
        text_embeds: torch.Tensor,
    ) -> torch.Tensor:
        added = {"time_ids": time_ids, "text_embeds": text_embeds}
        return _unet_call(self.unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=added)


class TextEncoderT5(nn.Module):
    """SD3's T5: (`input_ids`, `attention_mask`, both float [1, L]) -> `encoder_hidden_states` [1, C, 1, L].

    The inputs are those Apple's Swift pipeline feeds TextEncoderT5.mlmodelc. `attention_mask` is 1 at a
    padding position the encoder must ignore and 0 elsewhere (the Swift pipeline sets 1 on the padding);
    all zeros attends to every position, which is how diffusers runs SD3's T5. The output is in the
    4-D text layout of the MMDiT's `token_level_text_embeddings`.
    """

    def __init__(self, encoder: nn.Module, seq_len: int) -> None:
        super().__init__()
        # The encoder stack written out over transformers' own layers: its mask helpers do not trace
        # to Core ML. The relative position bias depends only on the (fixed) length: computed once.
        stack = encoder.encoder
        self.embed_tokens = stack.embed_tokens
        self.blocks = stack.block
        self.final_layer_norm = stack.final_layer_norm
        first = stack.block[0].layer[0].SelfAttention
        with torch.no_grad():
            bias = first.compute_bias(seq_len, seq_len, device=first.relative_attention_bias.weight.device)
        self.register_buffer("position_bias", bias.detach().clone())  # [1, heads, L, L]

    def _attend(self, attn: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        shape = (batch, seq, attn.n_heads, attn.key_value_proj_dim)
        q = attn.q(x).view(shape).transpose(1, 2)
        k = attn.k(x).view(shape).transpose(1, 2)
        v = attn.v(x).view(shape).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + bias
        out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(batch, seq, -1)
        return attn.o(out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids.to(torch.long))
        bias = self.position_bias + attention_mask[:, None, None, :] * -1e4  # masked keys drop out of softmax
        for block in self.blocks:
            attention = block.layer[0]
            hidden = hidden + self._attend(attention.SelfAttention, attention.layer_norm(hidden), bias)
            hidden = block.layer[-1](hidden)  # layer norm, gated feed-forward, residual
        hidden = self.final_layer_norm(hidden)
        return hidden.transpose(1, 2).unsqueeze(2)


class MMDiT(nn.Module):
    """SD3's transformer with the contract of Apple's MultiModalDiffusionTransformer (DiffusionKit's export):
    (`latent_image_embeddings` [B, 16, H, W], `token_level_text_embeddings` [B, C, 1, S],
    `pooled_text_embeddings` [B, P, 1, 1], `timestep` [B], the flow-matching time times 1000)
    -> `denoiser_output` [B, 16, H, W], the velocity the flow-matching scheduler steps with.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, latent_image_embeddings: torch.Tensor, token_level_text_embeddings: torch.Tensor,
                pooled_text_embeddings: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        context = token_level_text_embeddings.squeeze(2).transpose(1, 2)
        pooled = pooled_text_embeddings.flatten(1)
        return self.transformer(hidden_states=latent_image_embeddings, encoder_hidden_states=context,
                                pooled_projections=pooled, timestep=timestep, return_dict=False)[0]


class VAEDecoder(nn.Module):
    """`z` (latents already divided by the scale factor) -> `image` in [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class VAEEncoder(nn.Module):
    """`x` in [-1, 1] -> `latent`: mean and log-variance stacked on channels ([B, 8, h, w])."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments


class SafetyChecker(nn.Module):
    """(`clip_input`, `images` [B, H, W, 3], `adjustment` [1]) -> (`filtered_images`, `has_nsfw_concepts`, `concept_scores`).

    The same decision as diffusers' StableDiffusionSafetyChecker (its ONNX form), written
    without data-dependent control flow: `adjustment` biases the special-care scores,
    an image with any positive concept score is flagged and replaced by black.
    `has_nsfw_concepts` is [B, 1, 1, 1] (1.0 = flagged); `concept_scores` is [B, n_concepts].
    """

    def __init__(self, checker: nn.Module) -> None:
        super().__init__()
        self.vision_model = checker.vision_model
        self.visual_projection = checker.visual_projection
        self.register_buffer("concept_embeds", checker.concept_embeds.detach().clone())
        self.register_buffer("special_care_embeds", checker.special_care_embeds.detach().clone())
        self.register_buffer("concept_embeds_weights", checker.concept_embeds_weights.detach().clone())
        self.register_buffer("special_care_embeds_weights", checker.special_care_embeds_weights.detach().clone())

    @staticmethod
    def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.normalize(a) @ F.normalize(b).transpose(0, 1)

    def forward(
        self, clip_input: torch.Tensor, images: torch.Tensor, adjustment: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.vision_model(clip_input, return_dict=True).pooler_output
        image_embeds = self.visual_projection(pooled)
        special_scores = self._cosine(image_embeds, self.special_care_embeds) - self.special_care_embeds_weights + adjustment
        special_care = (special_scores > 0).float().sum(dim=1, keepdim=True).gt(0).float()
        concept_scores = self._cosine(image_embeds, self.concept_embeds) - self.concept_embeds_weights + 0.01 * special_care
        flagged = (concept_scores > 0).float().sum(dim=1).gt(0).float()[:, None, None, None]
        filtered = images * (1.0 - flagged)
        return filtered, flagged, concept_scores
