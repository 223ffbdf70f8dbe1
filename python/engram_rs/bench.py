"""Throughput benchmarks that measure engram_rs against its baseline in the same process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import simd_available
from .config import EngramConfig
from .hashing import NgramHasher
from .reference import reference_hash

__all__ = ["PRESET_VOCAB", "bench_hashing", "best_of", "format_table"]

#: Compressed vocabulary sizes the presets are used with (SPEC section 4).
PRESET_VOCAB = {"demo": 98627, "deepseek-v4.1-flash": 99092}


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` warm runs (one untimed warm-up run first)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _time_hashing(name: str, batch: int, seqlen: int, repeats: int, seed: int) -> dict[str, float]:
    cfg = EngramConfig.preset(name)
    vocab = PRESET_VOCAB[name]
    h = NgramHasher(cfg, vocab)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seqlen), dtype=np.int64)
    bounds = list(range(0, ids.size + 1, seqlen))
    layers = list(range(len(cfg.layer_ids)))
    return {
        "numpy reference": best_of(
            lambda: reference_hash(ids, cfg, vocab, multipliers=h.multipliers, primes=h.primes),
            repeats,
        ),
        "engram_rs int64": best_of(lambda: h.hash(ids), repeats),
        "engram_rs int32": best_of(lambda: h.hash(ids, dtype=np.int32), repeats),
        "engram_rs int64, scalar path": best_of(
            lambda: h._core.hash(ids, bounds, layers, scalar=True), repeats
        ),
    }


def bench_hashing(
    presets: list[str], batch: int = 16, seqlen: int = 8192, repeats: int = 5, seed: int = 0
) -> list[dict[str, Any]]:
    """Tokens/s of engram_rs (int64, int32, scalar path) and of the numpy reference, per preset."""
    rows = []
    tokens = batch * seqlen
    for name in presets:
        timings = _time_hashing(name, batch, seqlen, repeats, seed)
        base = tokens / timings["numpy reference"]
        for what, secs in timings.items():
            rate = tokens / secs
            rows.append(
                {
                    "preset": name,
                    "what": what,
                    "Mtok/s": rate / 1e6,
                    "x numpy": rate / base,
                    "x int64": timings["engram_rs int64"] / secs,
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of benchmark rows (floats with 2 decimals)."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    cells = [[f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = "  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, "-" * len(line), *body])


def environment() -> str:
    """One line naming the CPU, the core count and the hashing path in use."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    path = "AVX-512" if simd_available() else "scalar"
    return f"{cpu}, {os.cpu_count()} cores, hashing path: {path}"
