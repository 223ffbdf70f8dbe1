"""The precompute's local engine (``engine="local"``): this process reads and hashes the
inputs, block after block, while the writer thread appends the previous block to the files.

It streams: about ``chunk_tokens`` tokens a block are read, hashed (the Rust kernel, without the
GIL) and handed to the writer thread, so memory stays near ``3 * chunk_tokens * (4 + bytes of
ids per token)`` whatever the corpus size. Every ``commit_seconds`` the writer syncs the files
and records how far it got (``state.json``); a resumed run starts from that state.
"""

from __future__ import annotations

import time

import numpy as np

from ..hashing import IndexDType
from .blocks import hash_block
from .engine import Counts, EngineRun
from .files import Writer, output_arrays

__all__ = ["check", "run"]


def check() -> None:
    """The local engine runs wherever engram_rs does."""


def run(run: EngineRun) -> Counts:
    """Hashes ``run.source`` from ``run.state`` (or the start) and appends the results to
    ``run.files``; returns the counts of the whole job."""
    source, hasher, job, files, state = run.source, run.hasher, run.job, run.files, run.state
    history = hasher.config.max_ngram_size - 1
    if state is None:
        cursor, tokens, sequences, done = {"file": 0, "pos": 0}, 0, 0, 0
        ctx = np.zeros(0, np.int64)
    else:
        cursor, tokens, sequences = state["cursor"], state["tokens"], state["sequences"]
        done = state["units"]
        ctx = np.asarray(state["ctx"], dtype=np.int64)
    bar = run.progress_bar()
    if bar is not None and done:
        bar.update(done)
    layers = run.layers
    dtype: IndexDType = job["index_dtype"]
    writer = Writer(run.partial, files, run.commit_seconds, run.written)
    started = time.monotonic()
    try:
        for block in source.blocks(cursor, run.chunk_tokens):
            out, starts = hash_block(
                hasher, block, ctx, tokens, run.boundary, layers, dtype, job["flat"]
            )
            if block.lengths is None:
                joined = np.concatenate([ctx, block.tokens.astype(np.int64)])
                ctx = joined[max(0, joined.shape[0] - history) :]
            # Checksums here, beside the writer thread's writes of the previous chunk.
            arrays = {
                name: files[name].prepare(arr)
                for name, arr in output_arrays(out, block.tokens, starts, layers).items()
            }
            tokens += block.tokens.shape[0]
            sequences += starts.shape[0]
            done += block.units
            writer.put(
                arrays,
                {
                    "job": job,
                    "cursor": block.cursor,
                    "tokens": tokens,
                    "sequences": sequences,
                    "units": done,
                    "ctx": ctx.tolist(),
                },
            )
            if bar is not None:
                bar.update(block.units)
                elapsed = max(time.monotonic() - started, 1e-9)
                bar.set_postfix_str(f"{tokens / elapsed / 1e6:.1f} M tok/s", refresh=False)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return {"tokens": tokens, "sequences": sequences}
