"""Random ops: each call draws new values, unless the op has a seed (>= 0), in which case every
call returns the same values (the op definitions' "reproducible sequence across invokes").

Values are drawn on the CPU with torch's generator and moved to the device, so a seeded op
gives the same values on every device.
"""

from __future__ import annotations

from typing import Any

import torch

from . import Context, kernel


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is not None and int(seed) >= 0:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    return generator


def _shape(shape: Any) -> list[int]:
    return [int(s) for s in (shape if isinstance(shape, (list, tuple)) else [shape])]


@kernel("random_uniform", tensors=(), foldable=False)
def random_uniform(ctx: Context, out_dtype: torch.dtype, shape: Any, low: float = 0.0, high: float = 1.0,
                   seed: int = -1) -> torch.Tensor:
    values = torch.rand(_shape(shape), generator=_generator(seed), dtype=torch.float64)
    return (low + (high - low) * values).to(device=ctx.device, dtype=out_dtype)


@kernel("random_normal", tensors=(), foldable=False)
def random_normal(ctx: Context, out_dtype: torch.dtype, shape: Any, mean: float = 0.0, stddev: float = 1.0,
                  seed: int = -1) -> torch.Tensor:
    values = torch.randn(_shape(shape), generator=_generator(seed), dtype=torch.float64)
    return (mean + stddev * values).to(device=ctx.device, dtype=out_dtype)


@kernel("random_bernoulli", tensors=(), foldable=False)
def random_bernoulli(ctx: Context, out_dtype: torch.dtype, shape: Any, prob: float = 0.5,
                     seed: int = -1) -> torch.Tensor:
    values = torch.rand(_shape(shape), generator=_generator(seed), dtype=torch.float64) < prob
    return values.to(device=ctx.device, dtype=out_dtype)


@kernel("random_categorical", foldable=False)
def random_categorical(out_dtype: torch.dtype, x: torch.Tensor, mode: str = "logits", size: int = 1,
                       seed: int = -1) -> torch.Tensor:
    """`size` class indices per distribution (the last axis), drawn with replacement."""
    rows = x.detach().to("cpu", torch.float64).reshape(-1, x.shape[-1])
    probs = torch.softmax(rows, -1) if mode == "logits" else rows / rows.sum(-1, keepdim=True)
    drawn = torch.multinomial(probs, int(size), replacement=True, generator=_generator(seed))
    return drawn.reshape(tuple(x.shape[:-1]) + (int(size),)).to(device=x.device, dtype=out_dtype)
