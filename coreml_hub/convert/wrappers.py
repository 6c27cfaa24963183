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
