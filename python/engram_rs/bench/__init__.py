"""Throughput benchmarks that measure engram_rs against its baseline in the same run: one module a
family (``hashing``, ``compress``, ``gather``, ``precompute``, ``train``, ``v41``) and
``common``, what they share. ``engram-rs bench ...`` runs them."""

from __future__ import annotations

from ..samples import deepseek_v4_tokenizer_json
from .common import best_of, environment, format_table, huge_page_share, interleaved_best
from .compress import bench_compress, bench_hash_tokens
from .gather import GATHER_DTYPES, bench_gather, gather_table_info
from .hashing import PRESET_VOCAB, bench_hashing
from .precompute import PrecomputeBench, bench_precompute
from .train import TrainBench, bench_train
from .v41 import V41Bench, bench_v41

__all__ = [
    "GATHER_DTYPES",
    "PRESET_VOCAB",
    "PrecomputeBench",
    "TrainBench",
    "V41Bench",
    "bench_compress",
    "bench_gather",
    "bench_hash_tokens",
    "bench_hashing",
    "bench_precompute",
    "bench_train",
    "bench_v41",
    "best_of",
    "deepseek_v4_tokenizer_json",
    "environment",
    "format_table",
    "gather_table_info",
    "huge_page_share",
    "interleaved_best",
]
