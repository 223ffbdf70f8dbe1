"""``engram-rs bench compress``: the tokenizer's compression table against the Python reference,
and ``hash_tokens`` of raw ids against ``hash(comp(raw))``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..compress import CompressedTokenizer
from ..config import EngramConfig
from ..hashing import NgramHasher
from ..reference import reference_lookup_table
from .common import best_of

__all__ = ["bench_compress", "bench_hash_tokens"]


def _load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def bench_compress(path: str, repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds to build the compression table of ``path``: engram_rs against the Python loop.

    Two starting points: the ``tokenizer.json`` file (load + build on both sides), and a loaded
    ``tokenizers.Tokenizer`` (the reference loop alone against ``from_tokenizer``, which
    serializes the tokenizer with ``to_str`` first).
    """
    tok = _load_tokenizer(path)
    ref_table, ref_size = reference_lookup_table(tok)
    comp = CompressedTokenizer.from_file(path)
    if len(comp) != ref_size or not np.array_equal(comp.lookup_table, ref_table):
        raise AssertionError("engram_rs and the reference disagree: run the tests")
    timings = {
        "file": (
            best_of(lambda: reference_lookup_table(_load_tokenizer(path)), repeats),
            best_of(lambda: CompressedTokenizer.from_file(path), repeats),
        ),
        "loaded tokenizers.Tokenizer": (
            best_of(lambda: reference_lookup_table(tok), repeats),
            best_of(lambda: CompressedTokenizer.from_tokenizer(tok), repeats),
        ),
    }
    return [
        {
            "from": start,
            "python reference ms": ref * 1e3,
            "engram_rs ms": ours * 1e3,
            "x faster": ref / ours,
            "ids": comp.vocab_size,
            "compressed": len(comp),
        }
        for start, (ref, ours) in timings.items()
    ]


def bench_hash_tokens(
    path: str,
    preset: str = "deepseek-v4.1-flash",
    batch: int = 16,
    seqlen: int = 8192,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Tokens/s of ``hash_tokens(raw)`` (one pass) against ``hash(comp(raw))``."""
    comp = CompressedTokenizer.from_file(path)
    h = NgramHasher.from_tokenizer(EngramConfig.preset(preset), comp)
    raw = np.random.default_rng(seed).integers(0, comp.vocab_size, size=(batch, seqlen))
    tokens = raw.size
    timings = {
        "comp + hash": best_of(lambda: h.hash(comp(raw)), repeats),
        "hash_tokens": best_of(lambda: h.hash_tokens(raw), repeats),
    }
    base = timings["comp + hash"]
    return [
        {
            "preset": preset,
            "what": what,
            "Mtok/s": tokens / secs / 1e6,
            "x comp + hash": base / secs,
        }
        for what, secs in timings.items()
    ]
