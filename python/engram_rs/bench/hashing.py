"""``engram-rs bench hash``: hashing against the numpy reference, per preset."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import EngramConfig
from ..hashing import NgramHasher
from ..reference import reference_hash
from .common import best_of

__all__ = ["PRESET_VOCAB", "bench_hashing"]

#: Compressed vocabulary sizes the presets are used with (SPEC section 4).
PRESET_VOCAB = {"demo": 98627, "deepseek-v4.1-flash": 99092}


def _time_hashing(name: str, batch: int, seqlen: int, repeats: int, seed: int) -> dict[str, float]:
    cfg = EngramConfig.preset(name)
    vocab = PRESET_VOCAB[name]
    h = NgramHasher(cfg, vocab, compressed_pad_id=cfg.pad_id)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seqlen), dtype=np.int64)
    return {
        "numpy reference": best_of(
            lambda: reference_hash(ids, cfg, vocab, multipliers=h.multipliers, primes=h.primes),
            repeats,
        ),
        "engram_rs int64": best_of(lambda: h.hash(ids), repeats),
        "engram_rs int32": best_of(lambda: h.hash(ids, dtype=np.int32), repeats),
        "engram_rs int64, scalar path": best_of(lambda: h.hash(ids, scalar=True), repeats),
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
