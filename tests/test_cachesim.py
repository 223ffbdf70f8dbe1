"""The trace-driven cache simulation (engram_rs.bench.cachesim): every policy against a plain
Python reference written here (exact hit counts), the page cache's two-page rows, the static hot
set rule, bad input, and the Zipf property that row caches beat the page cache at equal memory."""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict

import numpy as np
import pytest
from engram_rs.bench.cachesim import POLICIES, simulate, static_hot_set, zipf_trace
from gil import assert_releases_gil

# ---- plain references: one key stream in, hits out ----


def lru_ref(stream: list[int], cap: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for k in stream:
        if k in cache:
            hits += 1
            cache.move_to_end(k)
        elif cap > 0:
            if len(cache) == cap:
                cache.popitem(last=False)
            cache[k] = None
    return hits


def clock_ref(stream: list[int], cap: int, tinylfu: bool = False) -> int:
    """CLOCK: a hit sets the bit; a miss fills an empty slot, else the hand clears set bits up
    to a clear one and replaces it (bit clear), then moves on. With ``tinylfu`` the miss
    replaces only a victim looked up fewer times; counts are halved every 10 * cap lookups."""
    keys: list[int] = []
    bits: list[bool] = []
    hand = hits = seen = 0
    freq: Counter[int] = Counter()
    for k in stream:
        if cap == 0:
            continue
        if tinylfu:
            if seen == 10 * cap:
                freq = Counter({key: c // 2 for key, c in freq.items()})
                seen = 0
            seen += 1
            freq[k] += 1
        if k in keys:
            bits[keys.index(k)] = True
            hits += 1
            continue
        if len(keys) < cap:
            keys.append(k)
            bits.append(False)
            continue
        while bits[hand]:
            bits[hand] = False
            hand = (hand + 1) % cap
        if not tinylfu or freq[k] > freq[keys[hand]]:
            keys[hand] = k
            bits[hand] = False
            hand = (hand + 1) % cap
    return hits


def page_ref(stream: list[int], row_bytes: int, cap: int, page: int = 4096) -> tuple[int, int, int]:
    """(row hits, page accesses, page hits) of an LRU page cache of ``cap`` pages."""
    cache: OrderedDict[int, None] = OrderedDict()
    row_hits = accesses = page_hits = 0
    for r in stream:
        first, last = r * row_bytes // page, ((r + 1) * row_bytes - 1) // page
        all_hit = True
        for p in range(first, last + 1):
            accesses += 1
            if p in cache:
                page_hits += 1
                cache.move_to_end(p)
            else:
                all_hit = False
                if cap > 0:
                    if len(cache) == cap:
                        cache.popitem(last=False)
                    cache[p] = None
        row_hits += all_hit
    return row_hits, accesses, page_hits


def hot_ref(counts: dict[int, int], k: int) -> list[int]:
    ranked = sorted((r for r, c in counts.items() if c > 0), key=lambda r: (-counts[r], r))
    return sorted(ranked[:k])


def distinct_stream(trace: list[int], bounds: list[int]) -> list[int]:
    out: list[int] = []
    for a, b in itertools.pairwise(bounds):
        out.extend(dict.fromkeys(trace[a:b]))
    return out


def skewed(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """A skewed trace: ids of a few hot rows and a long tail, scattered over the id space."""
    ranks = np.minimum(rng.zipf(1.3, n), rows) - 1
    return (ranks * 7919 + 11).astype(np.int64)


# ---- the policies, exactly ----


@pytest.mark.parametrize("seed", range(4))
def test_policies_match_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    trace = skewed(rng, 2000, 300)
    train = skewed(rng, 2000, 300)
    row_bytes = int(rng.choice([8, 264, 512, 5000]))
    batch = int(rng.choice([1, 7, 64, 5000]))
    caps = [0, 1, 3, 20, 90, 400]
    budgets = [c * row_bytes for c in caps]
    rep = simulate(trace, row_bytes, budgets, batch_size=batch, train=train)
    t = trace.tolist()
    bounds = [*range(0, len(t), batch), len(t)]
    streams = {"all": t, "distinct": distinct_stream(t, bounds)}
    assert rep.lookups == len(t)
    assert rep.distinct_lookups == len(streams["distinct"])
    assert rep.distinct_rows == len(set(t))
    assert rep.batches == len(bounds) - 1
    train_counts = Counter(train.tolist())
    for cap, budget in zip(caps, budgets, strict=True):
        hot = set(hot_ref(train_counts, cap))
        for name, s in streams.items():
            got = {p: getattr(rep.get(p, budget), name) for p in POLICIES}
            assert all(g.lookups == len(s) for g in got.values())
            assert got["static"].hits == sum(r in hot for r in s)
            assert got["lru"].hits == lru_ref(s, cap), (name, cap)
            assert got["clock"].hits == clock_ref(s, cap), (name, cap)
            assert got["tinylfu_clock"].hits == clock_ref(s, cap, tinylfu=True), (name, cap)
            pages = budget // 4096
            ph = (got["page_lru"].hits, got["page_lru"].page_accesses, got["page_lru"].page_hits)
            assert ph == page_ref(s, row_bytes, pages), (name, pages)
        assert rep.get("static", budget).held == len(hot)


def test_hand_made_traces() -> None:
    def hits(trace: list[int], policy: str, cap: int, batch: int = 100) -> int:
        rep = simulate(np.array(trace, np.int64), 1, [cap], batch_size=batch, policies=[policy])
        return rep.outcomes[0].all.hits

    # LRU of 2: 1 2 1 (hit) 3 (evicts 2) 2 (miss, evicts 1) 3 (hit)
    assert hits([1, 2, 1, 3, 2, 3], "lru", 2) == 2
    # LRU of 2: 1 2 3 1: a cyclic scan one larger than the cache never hits
    assert hits([1, 2, 3, 1, 2, 3], "lru", 2) == 0
    # CLOCK of 2: 1 2 1 (hit, bit) 3 (clears 1's bit, replaces 2) 1 (hit, bit) 2 (clears 1's
    # bit, replaces 3) 3 (replaces 1)
    assert hits([1, 2, 1, 3, 1, 2, 3], "clock", 2) == clock_ref([1, 2, 1, 3, 1, 2, 3], 2) == 2
    # CLOCK of 2 keeps the hot row 9 while the others pass through the second slot.
    t = [9, 9, 1, 9, 2, 9, 3, 9, 4]
    assert hits(t, "clock", 2) == clock_ref(t, 2) == 4
    # TinyLFU of 1: 1, 1 (hit), 2 (count 1 < 2: rejected), 1 (hit), 2 (2 < 3), 2 (3 = 3: ties
    # keep the victim), 2 (4 > 3: admitted), 2 (hit) -> 3 hits
    t = [1, 1, 2, 1, 2, 2, 2, 2]
    assert hits(t, "tinylfu_clock", 1) == clock_ref(t, 1, tinylfu=True) == 3
    # Halving: cache of 1, window 10: 1 x9 then 2 x 6: counts of 1 halved to 4 at lookup 11.
    t = [1] * 9 + [2] * 6
    assert hits(t, "tinylfu_clock", 1) == clock_ref(t, 1, tinylfu=True)
    # Static from the trace itself: 7 is the hottest row.
    t7 = np.array([7, 7, 1, 2, 1, 7], np.int64)
    rep = simulate(t7, 1, [1], batch_size=2, policies=["static"])
    assert rep.hot_source == "in-sample" and rep.outcomes[0].all.hits == 3


def test_distinct_counts_each_row_once_per_batch() -> None:
    trace = np.array([5, 5, 6, 5, 6, 6, 7], np.int64)
    # Batches [5 5 6 5] [6 6 7]: the distinct stream is 5 6 | 6 7.
    rep = simulate(trace, 8, [1 << 20], offsets=np.array([0, 4, 7]), policies=["lru"])
    o = rep.outcomes[0]
    assert (o.all.lookups, o.all.hits) == (7, 4)
    assert (o.distinct.lookups, o.distinct.hits) == (4, 1)
    same = simulate(trace, 8, [1 << 20], batch_size=4, policies=["lru"])
    assert same.outcomes == rep.outcomes
    # Empty batches are batches too.
    empty = simulate(trace, 8, [64], offsets=np.array([0, 0, 4, 4, 7], np.uint64))
    assert empty.batches == 4 and empty.distinct_lookups == 4


def test_page_cache_counts_a_row_across_two_pages_twice() -> None:
    # 264-byte rows: row 15 is bytes 3960..4224 of the file, pages 0 and 1; row 0 is page 0.
    trace = np.array([15, 15, 0], np.int64)
    rep = simulate(trace, 264, [2 * 4096], batch_size=10, policies=["page_lru"])
    o = rep.outcomes[0].all
    assert (o.lookups, o.page_accesses, o.page_hits, o.hits) == (3, 5, 3, 2)
    assert rep.distinct_pages == 2 and rep.outcomes[0].capacity == 2
    # One page of memory: the row's two pages evict each other, it never hits.
    rep = simulate(trace[:2], 264, [4096], batch_size=10, policies=["page_lru"])
    assert (rep.outcomes[0].all.hits, rep.outcomes[0].all.page_accesses) == (0, 4)
    # 512-byte rows never span: eight to a page.
    rep = simulate(np.arange(16, dtype=np.int64), 512, [4096], batch_size=16)
    o = rep.get("page_lru", 4096).all
    assert (o.page_accesses, o.page_hits, o.hits) == (16, 14, 14)


def test_static_hot_set() -> None:
    dense = np.array([0, 3, 5, 3, 0, 1], np.int64)  # count of row i
    assert static_hot_set(dense, 8, 24).tolist() == [1, 2, 3]  # 5, then 3 and 3 (rows 1, 3)
    assert static_hot_set(dense, 8, 23).tolist() == [1, 2]
    assert static_hot_set(dense, 8, 8 * 100).tolist() == [1, 2, 3, 5]  # uncounted rows: never
    rows = np.array([40, 7, 40, 9], np.uint64)
    counts = np.array([1, 2, 2, 3], np.uint64)  # row 40 twice: 3, tie with 9 -> 9 first
    assert static_hot_set(counts, 1, 2, rows=rows).tolist() == [9, 40]
    assert static_hot_set(counts, 1, 1, rows=rows).tolist() == [9]
    assert static_hot_set(counts, 1, 0, rows=rows).dtype == np.int64
    rng = np.random.default_rng(3)
    c = rng.integers(0, 5, 500).astype(np.int64)
    ref = hot_ref(dict(enumerate(c.tolist())), 37)
    assert static_hot_set(c, 264, 37 * 264 + 100).tolist() == ref
    # The simulation's static policy is the same rule, from counts or from a trace.
    trace = skewed(rng, 1000, 200)
    by_counts = simulate(trace, 264, [20 * 264], batch_size=32, counts=c, policies=["static"])
    hot = set(hot_ref(dict(enumerate(c.tolist())), 20))
    assert by_counts.outcomes[0].all.hits == sum(int(r) in hot for r in trace)
    assert by_counts.hot_source == "counts"


def test_bad_input_is_a_clear_value_error() -> None:
    t = np.array([1, 2, 3], np.int64)
    with pytest.raises(ValueError, match="row_bytes = 0"):
        simulate(t, 0, [64], batch_size=2)
    with pytest.raises(ValueError, match="row_bytes = -8 is negative"):
        simulate(t, -8, [64], batch_size=2)
    with pytest.raises(ValueError, match="budget 1 = -1 is negative"):
        simulate(t, 8, [64, -1], batch_size=2)
    with pytest.raises(ValueError, match="trace must be int64 or uint64, not float64"):
        simulate(t.astype(np.float64), 8, [64], batch_size=2)
    with pytest.raises(ValueError, match="trace must be int64 or uint64, not int32"):
        simulate(t.astype(np.int32), 8, [64], batch_size=2)
    with pytest.raises(ValueError, match="trace must be 1-D"):
        simulate(t.reshape(1, 3), 8, [64], batch_size=2)
    with pytest.raises(ValueError, match="trace holds -2 at position 1"):
        simulate(np.array([1, -2], np.int64), 8, [64], batch_size=2)
    with pytest.raises(ValueError, match=r"below 2\^63"):
        simulate(np.array([2**63], np.uint64), 8, [64], batch_size=2)
    with pytest.raises(ValueError, match="batch offsets decrease at position 2: 1 after 2"):
        simulate(t, 8, [64], offsets=np.array([0, 2, 1, 3]))
    with pytest.raises(ValueError, match="first offset must be 0"):
        simulate(t, 8, [64], offsets=np.array([1, 3]))
    with pytest.raises(ValueError, match="last offset must be the trace's length"):
        simulate(t, 8, [64], offsets=np.array([0, 2]))
    with pytest.raises(ValueError, match="batch offsets must be int64 or uint64"):
        simulate(t, 8, [64], offsets=np.array([0.0, 3.0]))
    with pytest.raises(ValueError, match="batch size 0"):
        simulate(t, 8, [64], batch_size=0)
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        simulate(t, 8, [64])
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        simulate(t, 8, [64], batch_size=2, offsets=np.array([0, 3]))
    with pytest.raises(ValueError, match='unknown cache policy "fifo"'):
        simulate(t, 8, [64], batch_size=2, policies=["fifo"])
    with pytest.raises(ValueError, match="page_bytes = 0"):
        simulate(t, 8, [64], batch_size=2, page_bytes=0)
    with pytest.raises(ValueError, match="budget 0 must be an integer"):
        simulate(t, 8, [64.5], batch_size=2)
    with pytest.raises(ValueError, match="not both"):
        simulate(t, 8, [64], batch_size=2, train=t, counts=t)
    with pytest.raises(ValueError, match="beyond 2\\^64"):
        simulate(np.array([2**62], np.int64), 8, [64], batch_size=2)
    with pytest.raises(ValueError, match="3 rows but 2 counts"):
        static_hot_set(np.array([1, 2], np.int64), 8, 64, rows=t)
    with pytest.raises(ValueError, match="counts holds -1 at position 0"):
        static_hot_set(np.array([-1, 2], np.int64), 8, 64)
    with pytest.raises(ValueError, match="row_bytes = 0"):
        static_hot_set(np.array([1, 2], np.int64), 0, 64)


def test_zipf_row_caches_beat_the_page_cache_at_equal_memory() -> None:
    rows, n, row_bytes = 1_000_000, 200_000, 264
    train = zipf_trace(n, rows, 1.0, seed=1)
    trace = zipf_trace(n, rows, 1.0, seed=2)
    assert trace.dtype == np.int64 and trace.min() >= 0 and trace.max() < rows
    touched = np.unique(trace).size
    budgets = [int(f * touched * row_bytes) for f in (0.01, 0.04, 0.16)]
    rep = simulate(trace, row_bytes, budgets, batch_size=4096, train=train)
    for b in budgets:
        page = rep.get("page_lru", b)
        for p in ("static", "lru", "clock", "tinylfu_clock"):
            for s in ("all", "distinct"):
                assert getattr(rep.get(p, b), s).hit_rate > getattr(page, s).hit_rate, (p, b, s)
        # Frequency beats recency on a Zipf law.
        assert rep.get("tinylfu_clock", b).all.hit_rate > rep.get("lru", b).all.hit_rate
    table = rep.rows("distinct")
    assert len(table) == 3 and "page_lru %" in table[0]


def test_releases_the_gil() -> None:
    trace = zipf_trace(400_000, 1_000_000, 1.0, seed=4)
    assert_releases_gil(
        lambda: simulate(trace, 264, [1 << 20], batch_size=4096, policies=["lru", "page_lru"])
    )
