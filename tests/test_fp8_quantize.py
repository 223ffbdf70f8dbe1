"""FP8 E4M3 quantization with UE8M0 block scales against torch's float8_e4m3fn, over sweeps."""

from __future__ import annotations

import numpy as np
import pytest
from engram_rs import _engram_rs

torch = pytest.importorskip("torch")


def torch_quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's scheme in torch ops: per block of 32, scale = 2**ceil(log2(amax / 448)) (a
    UE8M0 byte; 127 = 1.0 for an all-zero block), codes = (x / scale).to(float8_e4m3fn)."""
    x = torch.from_numpy(values).reshape(values.shape[0], -1, 32)
    amax = x.abs().amax(-1, keepdim=True)
    exponent = torch.ceil(torch.log2(amax / 448.0))
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent)).clamp(-126, 127)
    scale = torch.pow(2.0, exponent)
    codes = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8).reshape(values.shape)
    scale_bytes = (exponent + 127).to(torch.uint8).reshape(values.shape[0], -1)
    return codes.numpy(), scale_bytes.numpy()


def check(values: np.ndarray) -> None:
    codes, scales = _engram_rs.quantize_fp8(np.ascontiguousarray(values, dtype=np.float32))
    want_codes, want_scales = torch_quantize(values.astype(np.float32))
    np.testing.assert_array_equal(scales.reshape(want_scales.shape), want_scales)
    mismatch = np.flatnonzero(codes != want_codes.reshape(-1))
    assert mismatch.size == 0, (
        f"{mismatch.size} codes differ, first at {mismatch[0]}: value "
        f"{values.reshape(-1)[mismatch[0]]!r} -> {codes[mismatch[0]]:#x}, torch "
        f"{want_codes.reshape(-1)[mismatch[0]]:#x}"
    )


def test_every_code_boundary_at_unit_scale() -> None:
    """Each block holds 448 (so its scale is 1.0) and 31 values of a dense sweep of float32
    magnitudes from 2**-12 to 448: every rounding boundary, tie and subnormal of E4M3."""
    lo, hi = np.float32(2.0**-12).view(np.uint32), np.float32(448.0).view(np.uint32)
    bits = np.arange(lo, hi, 97, dtype=np.uint32)
    sweep = bits.view(np.float32)
    sweep = np.concatenate([sweep, -sweep, [0.0, -0.0]]).astype(np.float32)
    # Exact midpoints between neighbouring codes (ties to even) and their float32 neighbours.
    grid = np.array(
        [
            torch.tensor([c], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
            for c in range(0x7F)
        ],
        dtype=np.float64,
    )
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    near = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, 1000)])
    sweep = np.concatenate([sweep, near, -near]).astype(np.float32)
    pad = (-sweep.size) % 31
    body = np.concatenate([sweep, np.zeros(pad, np.float32)]).reshape(-1, 31)
    blocks = np.concatenate([np.full((body.shape[0], 1), 448.0, np.float32), body], axis=1)
    check(blocks.reshape(-1, 64) if blocks.shape[0] % 2 == 0 else blocks[:-1].reshape(-1, 64))


@pytest.mark.parametrize("seed", range(4))
def test_random_blocks_over_the_exponent_range(seed: int) -> None:
    """Blocks whose largest magnitude spans 2**-100 .. 2**100 (scale bytes 27 .. 227), normal,
    log-uniform and sparse values, zero blocks."""
    rng = np.random.default_rng(seed)
    rows, dim = 2048, 128
    exponent = rng.uniform(-100, 100, size=(rows, dim // 32, 1))
    kind = rng.integers(0, 3, size=(rows, dim // 32, 1))
    normal = rng.standard_normal((rows, dim // 32, 32))
    loguni = np.sign(normal) * np.exp2(rng.uniform(-12, 0, (rows, dim // 32, 32)))
    sparse = normal * (rng.random((rows, dim // 32, 32)) < 0.1)
    base = np.where(kind == 0, normal, np.where(kind == 1, loguni, sparse))
    values = (base * np.exp2(exponent)).astype(np.float32)
    values[rng.random((rows, dim // 32)) < 0.02] = 0.0
    check(values.reshape(rows, dim))
