"""Trace-driven cache simulation: the hit rate a memory budget buys for a table's row lookups,
for row-granular caches and for the kernel's page cache at the same memory.

A trace is the global row ids a table is asked for, in access order, cut into batches (one
gather call each). :func:`simulate` runs, at each budget in bytes:

- ``static``: the ``budget // row_bytes`` rows with the highest counts (ties: smaller row id;
  rows never counted are never hot), fixed: counts of a training trace (``train=``) or given
  (``counts=``); with neither, the trace's own counts (in-sample: the best a static set can do).
  :func:`static_hot_set` is that rule, the one the tiered table uses;
- ``lru``, ``clock`` (second chance: a hit sets the slot's bit, a miss sweeps the hand over set
  bits, clearing them, and replaces the first clear slot; new rows enter with the bit clear) and
  ``tinylfu_clock`` (CLOCK whose misses replace the victim only when the new row was looked up
  more often than the victim; counts are exact and all halved every ``10 * capacity`` lookups,
  TinyLFU's reset): online row caches of ``budget // row_bytes`` rows;
- ``page_lru``: an LRU cache of ``budget // page_bytes`` pages (4 KiB) of the table's file, where
  row ``r`` is bytes ``[r * row_bytes, (r + 1) * row_bytes)``: a row spanning two pages needs both
  (two page accesses), and a lookup hits only when all its pages do. That is what
  ``HostTable(mode="mmap")`` gets from the kernel (whose reclaim approximates LRU).

Each policy runs over two streams, reported separately:

- ``all``: every lookup, duplicates included: ``hits / lookups``, the rate a lookup is served
  from memory (what the page cache of a memory mapping sees);
- ``distinct``: each distinct row of a batch once, in the order of its first lookup there:
  ``hits / distinct lookups``. A tiered table deduplicates each call, so this is what its cache
  sees, and its misses are the rows it reads from disk.

The simulation is exact (the tests hold every policy to a plain Python reference) and runs in
the Rust core with the GIL released, one thread per (budget, policy, stream).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _engram_rs

__all__ = [
    "POLICIES",
    "CacheOutcome",
    "CacheSimReport",
    "Tally",
    "bench_cachesim",
    "simulate",
    "static_hot_set",
    "zipf_trace",
]

#: The policies :func:`simulate` runs, in the order it reports them.
POLICIES: tuple[str, ...] = ("static", "lru", "clock", "tinylfu_clock", "page_lru")


@dataclass(frozen=True)
class Tally:
    """The counts of one stream: row ``lookups`` and their ``hits``; for ``page_lru`` also the
    ``page_accesses`` (a row spanning two pages counts two) and ``page_hits`` (0 otherwise)."""

    lookups: int
    hits: int
    page_accesses: int
    page_hits: int

    @property
    def hit_rate(self) -> float:
        """``hits / lookups`` (0.0 for an empty stream)."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def page_hit_rate(self) -> float:
        """``page_hits / page_accesses`` (0.0 when no page was accessed)."""
        return self.page_hits / self.page_accesses if self.page_accesses else 0.0


@dataclass(frozen=True)
class CacheOutcome:
    """One policy at one budget: ``capacity`` is the rows (pages for ``page_lru``) the budget
    holds, ``held`` the static hot set's size (only counted rows are hot) or what the online
    cache held at the end of the ``all`` stream; ``all`` counts every lookup, ``distinct`` each
    distinct row of a batch once; ``seconds`` the wall time of the policy's two runs (one after
    the other on one thread, preparation excluded; not compared)."""

    policy: str
    budget: int
    capacity: int
    held: int
    all: Tally
    distinct: Tally
    seconds: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class CacheSimReport:
    """What :func:`simulate` measured: the trace's ``lookups``, ``distinct_lookups`` (distinct
    rows summed over batches), ``distinct_rows`` and ``distinct_pages`` of the whole trace,
    ``batches``; ``hot_source`` says where the static hot set came from ("in-sample", "train"
    or "counts"); ``seconds`` the simulation's wall time, ``prepare_seconds`` the part spent
    numbering rows and pages, deduplicating batches and ranking the hot set; ``outcomes``,
    budgets outer."""

    lookups: int
    distinct_lookups: int
    distinct_rows: int
    distinct_pages: int
    batches: int
    row_bytes: int
    page_bytes: int
    hot_source: str
    seconds: float
    prepare_seconds: float
    outcomes: tuple[CacheOutcome, ...]

    def get(self, policy: str, budget: int) -> CacheOutcome:
        """The outcome of ``policy`` at ``budget`` (a KeyError when it was not simulated)."""
        for o in self.outcomes:
            if o.policy == policy and o.budget == budget:
                return o
        raise KeyError(f"no outcome for policy {policy!r} at budget {budget}")

    def rows(self, stream: str = "all") -> list[dict[str, Any]]:
        """One table row a budget: the budget (MiB and % of the touched rows' bytes) and each
        policy's hit rate in % over ``stream`` ("all" or "distinct"); ``page_lru`` also its page
        hit rate."""
        if stream not in ("all", "distinct"):
            raise ValueError(f"stream must be 'all' or 'distinct', not {stream!r}")
        touched = self.distinct_rows * self.row_bytes
        out: list[dict[str, Any]] = []
        for budget in dict.fromkeys(o.budget for o in self.outcomes):
            row: dict[str, Any] = {
                "budget MiB": budget / 2**20,
                "% touched": 100.0 * budget / touched if touched else 0.0,
            }
            for o in self.outcomes:
                if o.budget == budget:
                    t = o.all if stream == "all" else o.distinct
                    row[f"{o.policy} %"] = 100.0 * t.hit_rate
                    if o.policy == "page_lru":
                        row["pages hit %"] = 100.0 * t.page_hit_rate
            out.append(row)
        return out


def _ids(a: Any, what: str) -> np.ndarray[Any, Any]:
    """``a`` as a 1-D int64 or uint64 array (a ValueError for any other dtype or shape)."""
    arr = np.asarray(a)
    if arr.dtype not in (np.dtype(np.int64), np.dtype(np.uint64)):
        raise ValueError(
            f"{what} must be int64 or uint64, not {arr.dtype}: cast it with .astype(numpy.int64)"
        )
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, not of shape {arr.shape}")
    return arr


def _int(v: Any, what: str) -> int:
    """``v`` as a Python int (a ValueError for a float, a bool or anything else)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, not {v!r}")
    return int(v)


def _counts(counts: Any, rows: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(rows, counts): ``counts`` dense (index = row id) when ``rows`` is None, else per row."""
    c = _ids(counts, "counts")
    if rows is None:
        r = np.flatnonzero(c).astype(np.int64)
        return r, np.ascontiguousarray(c[r])
    r = _ids(rows, "rows")
    if r.shape != c.shape:
        raise ValueError(f"{r.size} rows but {c.size} counts: pass one count per row")
    return r, c


def static_hot_set(counts: Any, row_bytes: int, budget: int, *, rows: Any = None) -> Any:
    """The static hot set of ``budget`` bytes: the ``budget // row_bytes`` rows with the highest
    counts (ties: the smaller row id; rows counted 0 times are never hot), sorted by row id, as
    int64. ``counts`` is one count per row id (index = row id) or, with ``rows``, the count of
    each ``rows[i]`` (a row given twice has its counts summed); int64 or uint64."""
    r, c = _counts(counts, rows)
    return _engram_rs.cachesim_hot_set(r, c, _int(row_bytes, "row_bytes"), _int(budget, "budget"))


def simulate(
    trace: Any,
    row_bytes: int,
    budgets: Sequence[int],
    *,
    batch_size: int | None = None,
    offsets: Any = None,
    train: Any = None,
    counts: Any = None,
    rows: Any = None,
    policies: Sequence[str] = POLICIES,
    page_bytes: int = 4096,
) -> CacheSimReport:
    """Simulates ``policies`` (see the module) at each of ``budgets`` (bytes of memory) over
    ``trace``, the row ids (int64 or uint64) of a table's lookups in access order.

    Batches are ``batch_size`` lookups each (the last may be shorter) or cut at ``offsets``
    (cumulative: from 0, never decreasing, to ``len(trace)``); pass exactly one. ``row_bytes`` is
    the bytes of one row in the file (264 for FP8 rows of 256 values with their scales), and
    ``page_bytes`` the page cache's page. The static hot set comes from the counts of ``train``
    (another trace), or ``counts`` (with ``rows``, as :func:`static_hot_set` takes them), or else
    from the trace itself. Bad input is a ValueError that says what to pass."""
    t = _ids(trace, "trace")
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence):
        raise ValueError(f"budgets must be a sequence of byte counts, not {budgets!r}")
    bs = [_int(b, f"budget {i}") for i, b in enumerate(budgets)]
    if isinstance(policies, str):
        policies = [policies]
    pol = [str(p) for p in policies]
    off = None if offsets is None else _ids(offsets, "batch offsets")
    size = None if batch_size is None else _int(batch_size, "batch_size")
    train_ids = None if train is None else _ids(train, "train")
    hot_rows = hot_counts = None
    if counts is not None:
        if train is not None:
            raise ValueError("pass train (a trace) or counts (per-row counts), not both")
        hot_rows, hot_counts = _counts(counts, rows)
    elif rows is not None:
        raise ValueError("rows is the row ids of counts: pass counts too")
    source = "train" if train is not None else "counts" if counts is not None else "in-sample"
    t0 = time.perf_counter()
    lookups, distinct_lookups, distinct_rows, distinct_pages, batches, prep, outs = (
        _engram_rs.cachesim_run(
            t,
            _int(row_bytes, "row_bytes"),
            bs,
            pol,
            batch_size=size,
            offsets=off,
            train=train_ids,
            hot_rows=hot_rows,
            hot_counts=hot_counts,
            page_bytes=_int(page_bytes, "page_bytes"),
        )
    )
    seconds = time.perf_counter() - t0
    outcomes = tuple(
        CacheOutcome(o[0], o[1], o[2], o[3], Tally(*o[4]), Tally(*o[5]), o[6]) for o in outs
    )
    return CacheSimReport(
        lookups,
        distinct_lookups,
        distinct_rows,
        distinct_pages,
        batches,
        int(row_bytes),
        int(page_bytes),
        source,
        seconds,
        prep,
        outcomes,
    )


def zipf_trace(lookups: int, rows: int, exponent: float = 1.0, seed: int = 0) -> Any:
    """``lookups`` row ids (int64) drawn from a Zipf law of ``exponent`` over ``rows`` rows: rank
    ``k`` has probability proportional to ``k ** -exponent``. The first 2^20 ranks are drawn
    exactly, the tail from the continuous law (midpoint rule). Ranks become rows through one
    fixed bijection (``rank * 2654435761 mod rows``; tables of 2^31 rows or more keep rank
    order), as hashing spreads hot n-grams over a table: the same ``rows`` and ``exponent``
    give the same hot rows for every seed, so a trace of another seed is held-out text of the
    same law."""
    n, nrows, s = _int(lookups, "lookups"), _int(rows, "rows"), float(exponent)
    if n < 0 or nrows <= 0 or not 0 < s < 8:
        raise ValueError(
            f"lookups >= 0, rows > 0 and 0 < exponent < 8 are needed (got {n}, {nrows}, {s})"
        )
    # 2654435761 is a prime above 2^31: coprime with any smaller row count, and the products
    # stay below 2^63. Larger tables keep ranks as rows.
    mult = 2654435761 if nrows < 2**31 else 1
    rng = np.random.default_rng(seed)
    head = min(nrows, 1 << 20)
    head_w = np.arange(1, head + 1, dtype=np.float64) ** -s
    head_cdf = np.cumsum(head_w)
    lo, hi = head + 0.5, nrows + 0.5

    def integral(a: float, b: float) -> float:
        return float(np.log(b / a)) if s == 1.0 else (b ** (1 - s) - a ** (1 - s)) / (1 - s)

    tail_mass = integral(lo, hi) if nrows > head else 0.0
    total = head_cdf[-1] + tail_mass
    u = rng.random(n) * total
    ranks = np.empty(n, dtype=np.int64)
    in_head = u < head_cdf[-1]
    ranks[in_head] = np.searchsorted(head_cdf, u[in_head], side="right")
    v = u[~in_head] - head_cdf[-1]
    if s == 1.0:
        x = lo * np.exp(v)
    else:
        x = (lo ** (1 - s) + v * (1 - s)) ** (1 / (1 - s))
    ranks[~in_head] = np.clip(np.floor(x + 0.5).astype(np.int64), head + 1, nrows) - 1
    return (ranks * mult) % nrows


def bench_cachesim(
    lookups: int = 10_000_000,
    rows: int = 100_000_000,
    exponent: float = 1.0,
    row_bytes: int = 264,
    fractions: Sequence[float] = (0.01, 0.04, 0.16, 0.64),
    batch_size: int = 65_536,
    seed: int = 0,
) -> str:
    """The simulation on a synthetic Zipf trace: budgets of ``fractions`` of the touched rows'
    bytes, the static hot set from a training trace of the same law and length (another seed:
    held out), every policy; returns the report (two tables of hit rates, then the speed)."""
    t0 = time.perf_counter()
    train = zipf_trace(lookups, rows, exponent, seed + 1)
    trace = zipf_trace(lookups, rows, exponent, seed)
    gen = time.perf_counter() - t0
    touched = int(np.unique(trace).size)
    budgets = [int(f * touched * row_bytes) for f in fractions]
    rep = simulate(trace, row_bytes, budgets, batch_size=batch_size, train=train)
    from .common import format_table

    online = [p for p in POLICIES if p != "static"]
    lines = [
        f"cache simulation: Zipf s={exponent} over {rows:,} rows, {rep.lookups:,} lookups in "
        f"{rep.batches} batches of {batch_size:,}, {row_bytes}-byte rows, "
        f"{rep.distinct_rows:,} rows touched ({rep.distinct_rows * row_bytes / 2**30:.2f} GiB), "
        f"{rep.distinct_lookups:,} distinct lookups (per batch), {rep.distinct_pages:,} pages "
        f"touched; static hot set from a held-out trace (seed {seed + 1}), "
        f"page cache of {rep.page_bytes}-byte pages",
        "",
        "hit rate per lookup (hits / lookups; what a memory mapping's page cache serves):",
        format_table(rep.rows("all")),
        "",
        "hit rate per distinct row of a batch (hits / distinct rows a call; what a "
        "deduplicating tiered table serves, its misses are the rows read from disk):",
        format_table(rep.rows("distinct")),
        "",
        f"speed: one call simulating {len(budgets)} budgets x {len(POLICIES)} policies x 2 "
        f"streams on {os.cpu_count()} CPUs took {rep.seconds:.2f} s "
        f"({rep.lookups / rep.seconds / 1e6:.2f} M trace lookups/s end to end), of which "
        f"{rep.prepare_seconds:.2f} s preparing (numbering rows and pages, deduplicating "
        f"batches, ranking the hot set); trace generation {gen:.1f} s",
        "simulation proper, M accesses/s on one thread (lookups + distinct lookups, both "
        "streams, / the policy's seconds):",
    ]
    speed: list[dict[str, Any]] = []
    for p in online:
        row: dict[str, Any] = {"policy": p}
        for b in budgets:
            o = rep.get(p, b)
            row[f"{b / 2**20:.0f} MiB"] = (o.all.lookups + o.distinct.lookups) / o.seconds / 1e6
        speed.append(row)
    lines.append(format_table(speed))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m engram_rs.bench.cachesim``: prints :func:`bench_cachesim`'s report."""
    ap = argparse.ArgumentParser(description=bench_cachesim.__doc__)
    ap.add_argument("--lookups", type=int, default=10_000_000)
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--exponent", type=float, default=1.0)
    ap.add_argument("--row-bytes", type=int, default=264)
    ap.add_argument("--batch-size", type=int, default=65_536)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(
        bench_cachesim(
            a.lookups,
            a.rows,
            a.exponent,
            a.row_bytes,
            batch_size=a.batch_size,
            seed=a.seed,
        )
    )


if __name__ == "__main__":
    main()
