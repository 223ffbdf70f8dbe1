"""``engram-rs bench stats``: the row access statistics of a real corpus (Debian's kernel
documentation, :func:`.corpus.linux_doc_tokens`), for each preset: a precompute with
``row_counts=True`` in a temporary directory (removed at the end), then
:func:`engram_rs.stats.row_stats` and one rank-frequency plot of all presets."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

from ..precompute import precompute
from ..stats import RowStats, plot_rank_frequency, row_stats
from .corpus import Corpus, linux_doc_tokens

__all__ = ["bench_stats"]


def bench_stats(
    presets: Sequence[str] = ("demo", "deepseek-v4.1-flash"),
    *,
    cache_dir: str | None = None,
    work_dir: str | None = None,
    plot: str | None = None,
) -> tuple[Corpus, list[tuple[str, RowStats, float]]]:
    """``(corpus, [(preset, stats, seconds of its precompute), ...])``: every document of the
    corpus is one sequence (``--eos-id`` after each), hashed with each preset; ``plot``: where
    the rank-frequency plot of all presets goes (None: no plot)."""
    corpus = linux_doc_tokens(cache_dir)
    results = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="engram-rs-bench-stats-") as tmp:
        stream = os.path.join(tmp, "corpus.bin")
        corpus.write_stream(stream)
        for preset in presets:
            out = os.path.join(tmp, preset)
            started = time.monotonic()
            precompute(
                stream,
                out,
                config=preset,
                tokenizer=corpus.tokenizer,
                eos_id=corpus.eos_id,
                row_counts=True,
                progress=False,
            )
            secs = time.monotonic() - started
            results.append((preset, row_stats(out), secs))
    if plot is not None:
        plot_rank_frequency([(p, s) for p, s, _ in results], plot)
    return corpus, results
