"""`--rng torch|numpy|nvidia`: initial latents bit-identical to the implementation each one reproduces.

- numpy and torch against the libraries themselves;
- nvidia against a second Philox4x32-10 written here from the algorithm (Salmon et al., SC'11:
  two 32x32 multiplies per round, key bumped by the Weyl constants between rounds) with
  Python integers and `math`, plus the published Random123 known-answer vectors, and against
  `torch.randn(device="cuda")` when a CUDA device is present;
- then the pipeline: a run with each RNG starts from exactly that draw.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.errors import UsageError
from coreml_hub.pipeline import rng

SHAPE = (1, 4, 8, 8)


def f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


# ---- numpy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 42, 2**32 - 1])
def test_numpy_latents_are_randomstate_normals(seed: int) -> None:
    got = rng.initial_latents("numpy", seed, SHAPE)
    want = np.random.RandomState(seed).randn(*SHAPE).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == SHAPE
    assert got.tobytes() == want.tobytes()
    # scaled by the initial sigma in double precision, then rounded (the Swift pipeline's order)
    sigma = 14.614641189575195
    scaled = rng.initial_latents("numpy", seed, SHAPE, sigma)
    assert scaled.tobytes() == (np.random.RandomState(seed).randn(*SHAPE) * sigma).astype(np.float32).tobytes()


def test_numpy_matches_apples_published_values() -> None:
    """Apple's Swift test: NumPyRandomSource(seed: 12345), 10,000 normals, the last five."""
    source = rng.make_noise("numpy", 12345)
    values = source.latents((10_000,)).numpy()
    assert np.allclose(values[-5:], [-0.86285345, 2.15229409, -0.00670556, -1.21472309, 0.65498866], atol=1e-7)


def test_numpy_stream_continues_one_state() -> None:
    source = rng.make_noise("numpy", 7)
    first, second = source.latents(SHAPE).numpy(), source.latents(SHAPE).numpy()
    state = np.random.RandomState(7)
    assert first.tobytes() == state.randn(*SHAPE).astype(np.float32).tobytes()
    assert second.tobytes() == state.randn(*SHAPE).astype(np.float32).tobytes()


# ---- torch ---------------------------------------------------------------------------------

def test_torch_latents_are_cpu_randn() -> None:
    import torch

    generator = torch.Generator().manual_seed(1234)
    source = rng.make_noise("torch", 1234)
    for _ in range(2):  # a stream: the second draw continues the generator
        assert torch.equal(source.latents(SHAPE), torch.randn(SHAPE, generator=generator))


# ---- nvidia: Philox4x32-10 -------------------------------------------------------------------

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox_reference(counter: list[int], key: list[int]) -> list[int]:
    """One Philox4x32-10 block with Python integers."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for round_ in range(10):
        hi0, lo0 = divmod(M0 * x0, 2**32)
        hi1, lo1 = divmod(M1 * x2, 2**32)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return [x0, x1, x2, x3]


def normal_reference(seed: int, draw: int, index: int) -> float:
    """Value `index` of draw number `draw`: counter (draw, 0, index, 0), Box-Muller sine branch, float32."""
    x, y, _, _ = philox_reference([draw, 0, index, 0], [seed & MASK, seed >> 32])
    u = x * 2.0**-32 + 2.0**-33
    v = y * (2 * math.pi * 2.0**-32) + math.pi * 2.0**-32
    return f32(math.sqrt(-2.0 * math.log(u)) * math.sin(v))


@pytest.mark.parametrize(("counter", "key", "expected"), [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK, MASK, MASK, MASK), (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter: tuple[int, ...], key: tuple[int, int], expected: tuple[int, ...]) -> None:
    """Random123's published known-answer vectors for philox4x32-10, through both implementations."""
    assert tuple(philox_reference(list(counter), list(key))) == expected
    block = rng.philox4x32(np.array([[c] for c in counter], dtype=np.uint32), key)
    assert tuple(int(v) for v in block[:, 0]) == expected


@pytest.mark.parametrize("seed", [0, 42, 2**32 + 5])
def test_nvidia_latents_match_the_reference(seed: int) -> None:
    source = rng.make_noise("nvidia", seed)
    for draw in range(2):
        got = source.latents(SHAPE).numpy().ravel()
        want = np.array([normal_reference(seed, draw, i) for i in range(got.size)], dtype=np.float32)
        assert got.tobytes() == want.tobytes(), f"seed {seed}, draw {draw}"
    assert abs(float(got.mean())) < 0.2 and 0.8 < float(got.std()) < 1.2


def test_nvidia_per_value_samples_use_one_draw_each() -> None:
    """The init image's latent sample (Swift `nextNormal` per value): draws (offset + k, 0, 0, 0)."""
    import torch

    source = rng.make_noise("nvidia", 9)
    source.latents(SHAPE)  # the noise comes first: one draw
    mean, std = torch.full((2, 3), 0.5), torch.full((2, 3), 2.0)
    got = source.gaussian(mean, std).numpy().ravel()
    want = [f32(0.5 + 2.0 * float(np.float64(normal_reference(9, 1 + k, 0)))) for k in range(6)]
    assert np.allclose(got, want, atol=1e-6)
    assert source.offset == 7


def test_nvidia_matches_cuda_randn() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: torch.randn(device='cuda') cannot be drawn")
    generator = torch.Generator("cuda").manual_seed(42)
    source = rng.make_noise("nvidia", 42)
    for shape in ((1, 4, 64, 64), (1, 16, 128, 128)):
        cuda = torch.randn(shape, generator=generator, device="cuda").cpu().numpy()
        ours = source.latents(shape).numpy()
        # CUDA's Box-Muller runs in single precision; NvRandomSource (and this) in double
        assert np.abs(cuda - ours).max() < 1e-5, shape
        assert (cuda == ours).mean() > 0.5, shape


# ---- limits and errors ---------------------------------------------------------------------

def test_seed_limits_and_unknown_names() -> None:
    rng.check_seeds("nvidia", 2**40)
    with pytest.raises(UsageError, match="0 to 4294967295"):
        rng.check_seeds("numpy", 2**32)
    with pytest.raises(UsageError, match=r"seeds 4294967294\.\.4294967296"):
        rng.check_seeds("numpy", 2**32 - 2, 3)
    with pytest.raises(UsageError, match="Unknown RNG"):
        rng.make_noise("mt", 1)


def test_nvidia_needs_float32_latents() -> None:
    rng.check_latent_dtype("nvidia", "float32")
    rng.check_latent_dtype("numpy", "float16")
    with pytest.raises(UsageError, match="float16 latents") as info:
        rng.check_latent_dtype("nvidia", "float16")
    assert "--precision fp32" in (info.value.hint or "")


# ---- the pipeline starts from the draw -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.runtime
@pytest.mark.parametrize("name", ["numpy", "nvidia", "torch"])
def test_run_starts_from_the_rng_draw(name: str) -> None:
    """An image made with `rng=NAME, seed=S` equals one made from that source's latents passed in."""
    import torch

    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local
    from coreml_hub.testing import factory

    pipe = load_pipeline(resolve_local(factory.converted("sd1", "original", "fp32")), backend="torch",
                         device="cpu", safety=False).pipeline
    g = pipe.geometry
    shape = (1, g.latent_channels, g.latent_height, g.latent_width)
    draw = torch.from_numpy(rng.initial_latents(name, 31, shape))
    kwargs = dict(prompt="a red fox", steps=3, seed=31, scheduler="ddim", check_safety=False)
    got = pipe.generate(rng=name, **kwargs).image
    assert np.array_equal(got, pipe.generate(latents=draw, **kwargs).image)
    if name != "torch":
        assert not np.array_equal(got, pipe.generate(rng="torch", **kwargs).image)


@pytest.mark.slow
@pytest.mark.runtime
def test_run_cli_rng_seed_mode_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from PIL import Image

    from coreml_hub.cli import run_cli
    from coreml_hub.pipeline.png import parse_parameters
    from coreml_hub.testing import factory

    out = factory.converted("sd1", "original", "fp32")
    base = ["run", str(out), "a red fox", "--steps", "2", "--seed", "5", "--disable-safety", "--backend", "torch",
            "--device", "cpu", "--json", "-o"]

    def images(*extra: str) -> list[dict]:
        code = run_cli([*base, str(tmp_path / str(len(list(tmp_path.iterdir())))), *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)["images"]

    def pixels(item: dict) -> np.ndarray:
        with Image.open(item["path"]) as img:
            return np.asarray(img.convert("RGB"))

    stream = images("--rng", "numpy", "--num-images", "2", "--seed-mode", "stream")
    single = images("--rng", "numpy")
    next_seed = images("--rng", "numpy", "--seed", "6")
    # image 0 of a stream is the single image of its seed; image 1 is the stream's second draw, not seed 6
    assert np.array_equal(pixels(stream[0]), pixels(single[0]))
    assert not np.array_equal(pixels(stream[1]), pixels(next_seed[0]))
    assert [i["seed"] for i in stream] == [5, 5] and stream[1]["parameters"]["image_index"] == 1
    with Image.open(stream[1]["path"]) as img:
        params = parse_parameters(img.text["parameters"])  # type: ignore[attr-defined]
        assert img.text["rng"] == "numpy"  # type: ignore[attr-defined]
    assert params["RNG"] == "numpy" and params["Seed mode"] == "stream" and params["Image index"] == "1"
    assert Path(stream[1]["path"]).name == "a-red-fox-5-1.png"


@pytest.mark.slow
@pytest.mark.runtime
def test_nvidia_rng_refuses_float16_latents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.cli import run_cli
    from coreml_hub.testing import factory

    out = factory.converted("sd1", "original", "fp16")
    code = run_cli(["run", str(out), "a red fox", "--steps", "1", "--rng", "nvidia", "--backend", "torch",
                    "--device", "cpu", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Error: --rng nvidia reproduces torch.randn(device='cuda') in float32" in err and "Hint:" in err
    assert not list(tmp_path.glob("*.png"))
