"""``engram-rs bench tiered``: a table larger than this machine's memory, gathered by the ids of
real held-out text, as a tiered table (hot rows resident, chosen from the row counts of the
training part of the same corpus) and as a memory-mapped one (the page cache), interleaved
batch by batch, next to the same run's ceilings: a plain Rust probe reading the same cold rows
with the same reads in flight, and a resident gather of the same hit rows. A trace-driven
simulation of the same ids explains the gap: the hit rates of row-granular caches and of an LRU
page cache of 4 KiB pages at equal memory."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from .. import _engram_rs
from ..compress import CompressedTokenizer
from ..config import EngramConfig
from ..hashing import NgramHasher
from ..table import HostTable, hot_rows_for
from .cachesim import simulate
from .corpus import Corpus, linux_doc_tokens

__all__ = ["TieredBench", "bench_tiered", "write_fp8_table"]

#: The layer of the V4.1-Flash preset the table is sized for.
_LAYER = 1
#: Bytes of one stored FP8 row: 256 E4M3 values and 8 UE8M0 scales.
_ROW = 264
#: Tokens hashed at a time (bounds the memory of the ids).
_CHUNK = 1 << 20
_BLOCK = 4096


@dataclasses.dataclass
class TieredBench:
    """What ``bench_tiered`` measured (seconds summed over the timed batches) and the sizes."""

    table_bytes: int
    rows: int
    hot_bytes: int
    hot_rows: int
    mem_available: int
    page_cache_bytes: int
    direct: bool
    batches: int
    lookups: int
    seconds: dict[str, float]
    hits: int
    distinct_misses: int
    probe_reads: int
    simulation: list[dict[str, Any]]
    trace_lookups: int
    corpus: str

    @property
    def tiered_vs_mmap(self) -> float:
        return self.seconds["mmap"] / self.seconds["tiered"]

    @property
    def misses_vs_probe(self) -> float:
        """The probe's time over the tiered table's misses-only gathers (1.0: as fast)."""
        return self.seconds["probe"] / self.seconds["tiered misses"]

    @property
    def hits_vs_resident(self) -> float:
        return self.seconds["resident hits"] / self.seconds["tiered hits"]


def write_fp8_table(path: str, rows: int, seed: int = 0) -> None:
    """Writes a safetensors FP8 table of ``rows`` rows of 256 E4M3 values (finite codes) and
    their UE8M0 scales, fast: a random 64 MiB pattern varied per piece, streamed at the disk's
    sequential rate, synced, then dropped from the page cache (a cold table)."""
    dim, sb = 256, 8
    vbytes, sbytes = rows * dim, rows * sb
    header = {
        "weight": {"dtype": "F8_E4M3", "shape": [rows, dim], "data_offsets": [0, vbytes]},
        "weight_scale": {
            "dtype": "F8_E8M0",
            "shape": [rows, sb],
            "data_offsets": [vbytes, vbytes + sbytes],
        },
        "__metadata__": {"format": "engram_rs bench tiered"},
    }
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    rng = np.random.default_rng(seed)
    piece = 64 << 20
    codes = rng.integers(0, 0x7F, piece, dtype=np.uint8)  # no NaN codes
    codes |= rng.integers(0, 2, piece, dtype=np.uint8) << 7  # signs
    scales = rng.integers(118, 128, piece, dtype=np.uint8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for total, pattern in ((vbytes, codes), (sbytes, scales)):
            done, k = 0, 0
            while done < total:
                n = min(piece, total - done)
                # A rotation per piece: no two pieces of the file are the same bytes.
                f.write(np.roll(pattern, k * 4099)[:n].tobytes())
                done, k = done + n, k + 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    drop_cache(path)


def drop_cache(path: str) -> None:
    """Drops ``path``'s clean pages from the page cache (the next reads go to the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _mapped_bytes(path: str) -> int:
    """Bytes of ``path`` this process has mapped and resident (what the page cache gave the
    mmap table): the Rss of its mappings in /proc/self/smaps."""
    total, inside = 0, False
    real = os.path.realpath(path)
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and not head[0].endswith(":"):
                inside = len(head) == 6 and head[5].strip() == real
            elif inside and head and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def _hash_docs(
    hasher: NgramHasher, corpus: Corpus, docs: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The layer's flat row ids ``[tokens, 24]`` (int64) of documents ``docs`` (each its own
    sequence), end to end, and the token offsets of the documents in them."""
    ids = corpus.token_ids()
    out, bounds, n = [], [0], 0
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            lens = [b.size for b in batch]
            cu = np.concatenate([[0], np.cumsum(lens)])
            out.append(
                hasher.hash_tokens(np.concatenate(batch), [_LAYER], flat=True, cu_seqlens=cu)[
                    _LAYER
                ]
            )
            batch.clear()

    pending = 0
    for i in docs:
        doc = np.asarray(ids[int(corpus.offsets[i]) : int(corpus.offsets[i + 1])], np.int64)
        if doc.size == 0:
            continue
        batch.append(doc)
        pending += doc.size
        n += doc.size
        bounds.append(n)
        if pending >= _CHUNK:
            flush()
            pending = 0
    flush()
    return np.concatenate(out).astype(np.int64), np.asarray(bounds)


def _cold_spans(rows: np.ndarray, values_at: int, scales_at: int) -> tuple[np.ndarray, ...]:
    """The block-aligned spans a read of rows ``rows`` (sorted, distinct) needs: each row's
    256 values and its 8 scales, rows that share a block read once."""
    spans = []
    for base, unit in ((values_at, 256), (scales_at, 8)):
        a = base + rows.astype(np.uint64) * np.uint64(unit)
        lo = a // _BLOCK * _BLOCK
        hi = (a + np.uint64(unit) + np.uint64(_BLOCK - 1)) // _BLOCK * _BLOCK
        # Rows inside the same span are one read (as the tiered table coalesces them).
        keep = np.ones(lo.size, bool)
        keep[1:] = lo[1:] >= hi[:-1]
        starts = lo[keep]
        ends = np.maximum.reduceat(hi, np.flatnonzero(keep)) if lo.size else hi
        spans.append((starts, ends - starts))
    offsets = np.concatenate([s for s, _ in spans]).astype(np.uint64)
    lengths = np.concatenate([n for _, n in spans]).astype(np.uint64)
    return offsets, lengths


def bench_tiered(
    table_gb: float = 32.0,
    hot_gb: float = 4.0,
    batches: int = 16,
    batch_tokens: int = 4096,
    directory: str | None = None,
    corpus: Corpus | None = None,
    report: Any = print,
) -> TieredBench:
    """Builds a ``table_gb`` GB FP8 table (V4.1-Flash's row layout, layer 1 of its preset sized to
    it) in ``directory`` (a temporary one by default, removed at the end), takes the hot set of
    ``hot_gb`` GB from the row counts of the corpus's training documents, and times ``batches``
    batches of ``batch_tokens`` held-out tokens' ids (24 rows a token) through every contender in
    turn. ``report`` gets progress lines."""
    corpus = corpus or linux_doc_tokens()
    train_docs, held_docs = corpus.split(0.2)
    base = max(1000, int(table_gb * 1e9 / _ROW / 24))
    cfg = EngramConfig.preset("deepseek-v4.1-flash").replace(
        engram_vocab_size=[base] * 3, layer_ids=[_LAYER]
    )
    hasher = NgramHasher.from_tokenizer(cfg, CompressedTokenizer.from_file(corpus.tokenizer))
    rows = int(hasher.table_rows[_LAYER])
    t0 = time.perf_counter()
    train, _ = _hash_docs(hasher, corpus, train_docs)
    counts = np.bincount(train.reshape(-1), minlength=rows).astype(np.uint32)
    del train
    held, _ = _hash_docs(hasher, corpus, held_docs)
    per = batch_tokens * cfg.cols
    flat_held = held.reshape(-1)
    batches = min(batches, flat_held.size // per)
    if batches < 2:
        raise ValueError(
            f"the held-out text has {held.shape[0]} tokens: too few for 2 batches of "
            f"{batch_tokens}; pass a smaller batch_tokens"
        )
    report(
        f"hashed {corpus.tokens} tokens of {corpus.package} {corpus.version} "
        f"({len(train_docs)} training and {len(held_docs)} held-out documents) into a "
        f"{rows}-row layer in {time.perf_counter() - t0:.1f} s"
    )
    tmp = tempfile.mkdtemp(prefix="engram-bench-tiered-", dir=directory)
    path = os.path.join(tmp, "table.safetensors")
    try:
        t0 = time.perf_counter()
        write_fp8_table(path, rows)
        size = os.path.getsize(path)
        report(
            f"wrote a {size / 1e9:.1f} GB table ({rows} FP8 rows) in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        mem = _mem_available()
        hot = hot_rows_for(counts, rows, _ROW, int(hot_gb * 1e9)).astype(np.int64)
        is_hot_row = np.zeros(rows, bool)
        is_hot_row[hot] = True
        t0 = time.perf_counter()
        tiered = HostTable.open_tiered(path, hot_rows=hot)
        st = tiered.tier_stats or {}
        direct = bool(st["direct"])
        report(
            f"opened the tiered table in {time.perf_counter() - t0:.1f} s: {st['hot_rows']} hot "
            f"rows ({st['hot_bytes'] / 1e9:.2f} GB, index {st['index_bytes'] / 1e6:.0f} MB), "
            f"O_DIRECT {direct}; MemAvailable before it {mem / 2**30:.1f} GiB"
        )
        mapped = HostTable.open(path)
        drop_cache(path)
        with open(path, "rb") as f:
            values_at = 8 + int.from_bytes(f.read(8), "little")
        scales_at = values_at + rows * 256
        import torch

        def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
            t = time.perf_counter()
            fn(*args, **kwargs)
            return time.perf_counter() - t

        secs = dict.fromkeys(
            ["tiered", "mmap", "tiered misses", "probe", "tiered hits", "resident hits"], 0.0
        )
        hits = misses = reads = 0
        hit_ids = []
        out = torch.empty(per, 256, dtype=torch.bfloat16)
        # The timed batches: the same ids through both tables, the order alternating.
        for b in range(batches):
            ids = flat_held[b * per : (b + 1) * per]
            is_hot = is_hot_row[ids]
            hits += int(is_hot.sum())
            hit_ids.append(ids[is_hot])
            steps = [("tiered", tiered), ("mmap", mapped)]
            for name, tab in steps if b % 2 == 0 else steps[::-1]:
                secs[name] += timed(tab.gather, ids, out=out)
            if b == 0:
                want = mapped.gather(ids, out_dtype="bfloat16", framework="torch")
                got = tiered.gather(ids, out_dtype="bfloat16", framework="torch")
                assert torch.equal(got, want), (
                    "the tiered and mapped tables gathered different rows"
                )
            report(f"batch {b + 1}/{batches}: {ids.size} ids, {is_hot.mean():.1%} hot")
        page_cache = _mapped_bytes(path)
        mapped.close()
        # Misses alone, on held-out batches not timed above (fresh rows), against the probe
        # reading the same spans with as many reads in flight, the order alternating.
        for b in range(batches, min(2 * batches, flat_held.size // per)):
            ids = flat_held[b * per : (b + 1) * per]
            cold = np.unique(ids[~is_hot_row[ids]])
            offsets, lengths = _cold_spans(cold, values_at, scales_at)
            misses += cold.size
            reads += offsets.size
            cold_out = torch.empty(cold.size, 256, dtype=torch.bfloat16)
            miss_steps: list[tuple[str, Any, tuple[Any, ...], dict[str, Any]]] = [
                ("tiered misses", tiered.gather, (cold,), {"out": cold_out}),
                ("probe", _engram_rs.probe_reads, (path, offsets, lengths, 64, direct), {}),
            ]
            for name, fn, args, kwargs in miss_steps if b % 2 == 0 else miss_steps[::-1]:
                secs[name] += timed(fn, *args, **kwargs)
        # Hits alone: the tiered table's hot rows against a resident table of as many rows.
        resident = HostTable.from_numpy(
            np.random.default_rng(1).integers(0, 0x7F, (hot.size, 256), dtype=np.uint8),
            np.full((hot.size, 8), 127, np.uint8),
            dtype="float8_e4m3",
        )
        for ids in hit_ids:
            slots = np.searchsorted(hot, ids)
            hit_out = torch.empty(ids.size, 256, dtype=torch.bfloat16)
            secs["tiered hits"] += timed(tiered.gather, ids, out=hit_out)
            secs["resident hits"] += timed(resident.gather, slots, out=hit_out)
        del resident
        # The whole held-out text (not only the timed batches, whose distinct rows fit in the
        # smallest budget: an online cache would never evict there).
        trace = flat_held
        counted = np.flatnonzero(counts).astype(np.int64)
        budgets = [int(hot_gb * 1e9 * f) for f in (0.125, 0.25, 0.5, 1.0)]
        sim = simulate(
            trace,
            _ROW,
            budgets,
            batch_size=per,
            counts=counts[counted].astype(np.int64),
            rows=counted,
        )
        simulation = [
            {
                "policy": o.policy,
                "budget GB": o.budget / 1e9,
                "hit rate (lookups)": o.all.hit_rate,
                "hit rate (distinct rows a batch)": o.distinct.hit_rate,
            }
            for o in sim.outcomes
        ]
        return TieredBench(
            table_bytes=size,
            rows=rows,
            hot_bytes=int(st["hot_bytes"]),
            hot_rows=int(st["hot_rows"]),
            mem_available=mem,
            page_cache_bytes=page_cache,
            direct=direct,
            batches=batches,
            lookups=batches * per,
            seconds=secs,
            hits=hits,
            distinct_misses=misses,
            probe_reads=reads,
            simulation=simulation,
            trace_lookups=int(trace.size),
            corpus=f"{corpus.package} {corpus.version} ({corpus.tokens} tokens)",
        )
    finally:
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
        os.rmdir(tmp)
