"""Initial noise drawn the way each Stable Diffusion tool draws it, so a seed means the same image.

Three sources, named as Apple's Swift CLI names them (`--rng numpy|torch|nvidia`):

- ``torch``: `torch.randn` on the CPU with a `torch.Generator` seeded once (diffusers' CPU
  generator, and Apple's Swift `TorchRandomSource`). The init image's latent sample is drawn
  before the noise, as diffusers does.
- ``numpy``: `np.random.RandomState(seed)` normals (Mersenne Twister, polar Box-Muller with
  the second value kept for the next draw): Apple's Python pipeline, the Swift
  `NumPyRandomSource`, and therefore Mochi Diffusion. Values are scaled by the scheduler's
  initial sigma in double precision, then rounded to float32, as the Swift pipeline does.
  Image-to-image follows the Swift order: the noise first, then one normal per latent value
  for the init image's latent sample.
- ``nvidia``: Philox4x32-10 normals as `torch.randn(device="cuda")` draws them (the Swift
  `NvRandomSource`): value i of a draw comes from the Philox block with counter
  (draw number, 0, i, 0) and key (seed low word, seed high word), Box-Muller over its first
  two words, sine branch. Computed on the CPU, so it runs anywhere. Like the Swift source,
  it computes in double precision and rounds to float32: bit-identical to NvRandomSource,
  within a few float32 ulps of CUDA's own single-precision arithmetic. CUDA launches one
  thread per value only while the tensor fits the device's resident threads (270,336 values
  on an H100, e.g. 16x128x128 latents); beyond that the device stream differs.

Only numpy is needed (torch for the torch source). Ancestral schedulers draw their step
noise from a CPU torch generator seeded with the same seed, whatever the source.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import UsageError

RNGS = ("torch", "numpy", "nvidia")
DEFAULT_RNG = "torch"
# How the seeds of a multi-image run advance: `increment` makes image i from seed + i (Mochi
# Diffusion, and coreml-hub's default: any image can be made again alone); `stream` draws
# every image from one source seeded once (the Swift CLI's --image-count).
SEED_MODES = ("increment", "stream")
DEFAULT_SEED_MODE = "increment"

# Seeds each source accepts: Mersenne Twister state from a 32-bit seed; Philox takes a 64-bit key.
SEED_LIMITS = {"torch": 2**64, "numpy": 2**32, "nvidia": 2**64}

_MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule (Weyl) increments
PHILOX_ROUNDS = 10


def check_rng(rng: str) -> None:
    if rng not in RNGS:
        raise UsageError(f"Unknown RNG {rng!r}.", hint=f"Choose one of: {', '.join(RNGS)}.")


def check_seeds(rng: str, first: int, count: int = 1) -> None:
    """Every seed a run will use must fit the source (numpy seeds are 32-bit, as in the Swift CLI)."""
    check_rng(rng)
    limit = SEED_LIMITS[rng]
    last = first + count - 1
    if first < 0 or last >= limit:
        what = f"seeds {first}..{last}" if count > 1 else f"seed {first}"
        raise UsageError(f"The {rng} RNG takes seeds from 0 to {limit - 1}; this run would use {what}.",
                         hint="Pass a smaller --seed (or fewer --num-images).")


def check_latent_dtype(rng: str, dtype: str) -> None:
    """`nvidia` reproduces CUDA's float32 draws; a model whose latents are another dtype cannot show them."""
    if rng == "nvidia" and dtype != "float32":
        raise UsageError(
            f"--rng nvidia reproduces torch.randn(device='cuda') in float32, but this model takes {dtype} "
            "latents, which would round the noise before the first step.",
            hint="Use --rng torch or --rng numpy with this model, or a conversion with float32 inputs "
                 "(`coreml-hub convert --precision fp32`).")


# ---- Philox4x32-10 -----------------------------------------------------------------------

def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Philox4x32 over counters [4, N] (uint32) with one 64-bit key as two words -> [4, N] uint32."""
    c0, c1, c2, c3 = (np.asarray(counter[i], dtype=np.uint64) for i in range(4))
    k0, k1 = np.uint64(key[0] & _MASK32), np.uint64(key[1] & _MASK32)
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    w0, w1 = np.uint64(PHILOX_W[0]), np.uint64(PHILOX_W[1])
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0, p1 = c0 * m0, c2 * m1  # 32 x 32 -> 64 bits: no overflow in uint64
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def _box_muller_sine(x: np.ndarray, y: np.ndarray, mean: Any, stdev: Any) -> np.ndarray:
    """curand's Box-Muller (first output, the sine branch) in double precision, as NvRandomSource."""
    u = x.astype(np.float64) / 4294967296.0 + 1.0 / 8589934592.0
    v = y.astype(np.float64) * (math.pi / 2147483648.0) + math.pi / 4294967296.0
    radius = stdev * np.sqrt(-2.0 * np.log(u))
    return radius * np.sin(v) + mean


def philox_normal(seed: int, offset: int, count: int, mean: Any = 0.0, stdev: Any = 1.0) -> np.ndarray:
    """Draw number `offset` of `count` normals (float64) from the Philox stream of `seed`."""
    counter = np.zeros((4, count), dtype=np.uint32)
    counter[0] = offset & _MASK32
    counter[2] = np.arange(count, dtype=np.uint64).astype(np.uint32)
    out = philox4x32(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    return _box_muller_sine(out[0], out[1], mean, stdev)


def philox_scalars(seed: int, first_offset: int, mean: np.ndarray, stdev: np.ndarray) -> np.ndarray:
    """One normal per value, each its own draw (NvRandomSource.nextNormal): counters (offset + k, 0, 0, 0)."""
    n = mean.size
    counter = np.zeros((4, n), dtype=np.uint32)
    counter[0] = (np.arange(n, dtype=np.uint64) + np.uint64(first_offset)).astype(np.uint32)
    out = philox4x32(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    return _box_muller_sine(out[0], out[1], mean.ravel(), stdev.ravel()).reshape(mean.shape)


# ---- sources -------------------------------------------------------------------------------

class NoiseSource:
    """Draws a run's initial latents and its init-image latent sample from one seeded stream."""

    name = ""
    noise_first = False  # image-to-image: draw the noise before the init image's latent sample

    def __init__(self, seed: int) -> None:
        import torch

        self.seed = int(seed)
        # ancestral schedulers' step noise (a CPU generator, whatever the source)
        self.step_generator = torch.Generator("cpu").manual_seed(self.seed)

    def latents(self, shape: tuple[int, ...], sigma: float = 1.0) -> Any:
        """Float32 torch tensor of `shape`: standard normals times `sigma`."""
        raise NotImplementedError

    def gaussian(self, mean: Any, std: Any) -> Any:
        """A float32 sample of N(mean, std**2), one value per element (torch tensors in, on mean's device out)."""
        raise NotImplementedError


class TorchNoise(NoiseSource):
    """torch.randn on the CPU: diffusers' CPU generator and the Swift TorchRandomSource."""

    name = "torch"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.generator = self.step_generator  # one generator for everything, in diffusers' order

    def latents(self, shape: tuple[int, ...], sigma: float = 1.0) -> Any:
        import torch

        noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        return noise * sigma if sigma != 1.0 else noise

    def gaussian(self, mean: Any, std: Any) -> Any:
        import torch

        noise = torch.randn(mean.shape, generator=self.generator, dtype=torch.float32).to(mean.device)
        return mean + std * noise


class _DoubleNoise(NoiseSource):
    """Sources that draw doubles, scale them in double precision and round to float32 (the Swift way)."""

    noise_first = True

    def _normals(self, count: int, mean: Any, stdev: Any) -> np.ndarray:
        raise NotImplementedError

    def _scalars(self, mean: np.ndarray, stdev: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def latents(self, shape: tuple[int, ...], sigma: float = 1.0) -> Any:
        import torch

        values = self._normals(math.prod(shape), 0.0, float(sigma))
        return torch.from_numpy(values.astype(np.float32).reshape(shape))

    def gaussian(self, mean: Any, std: Any) -> Any:
        import torch

        m = mean.detach().float().cpu().numpy().astype(np.float64)
        s = std.detach().float().cpu().numpy().astype(np.float64)
        return torch.from_numpy(self._scalars(m, s).astype(np.float32)).to(mean.device)


class NumpyNoise(_DoubleNoise):
    """np.random.RandomState(seed): Apple's Python pipeline, the Swift NumPyRandomSource, Mochi Diffusion."""

    name = "numpy"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.state = np.random.RandomState(self.seed)

    def _normals(self, count: int, mean: Any, stdev: Any) -> np.ndarray:
        return self.state.standard_normal(count) * stdev + mean

    def _scalars(self, mean: np.ndarray, stdev: np.ndarray) -> np.ndarray:
        return self._normals(mean.size, 0.0, 1.0).reshape(mean.shape) * stdev + mean


class NvidiaNoise(_DoubleNoise):
    """Philox4x32-10 as torch.randn(device='cuda') draws it (the Swift NvRandomSource), on the CPU."""

    name = "nvidia"

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.offset = 0  # draws so far: the first counter word of the next draw

    def _normals(self, count: int, mean: Any, stdev: Any) -> np.ndarray:
        values = philox_normal(self.seed, self.offset, count, mean, stdev)
        self.offset += 1
        return values

    def _scalars(self, mean: np.ndarray, stdev: np.ndarray) -> np.ndarray:
        values = philox_scalars(self.seed, self.offset, mean, stdev)
        self.offset += mean.size
        return values


SOURCES: dict[str, type[NoiseSource]] = {"torch": TorchNoise, "numpy": NumpyNoise, "nvidia": NvidiaNoise}


def make_noise(rng: str, seed: int) -> NoiseSource:
    """The noise source `rng` seeded with `seed`."""
    check_seeds(rng, int(seed))
    return SOURCES[rng](int(seed))


def initial_latents(rng: str, seed: int, shape: tuple[int, ...], sigma: float = 1.0) -> np.ndarray:
    """The first draw of a run as a float32 array: what `run --rng RNG --seed SEED` starts from."""
    return make_noise(rng, seed).latents(tuple(shape), sigma).numpy()
