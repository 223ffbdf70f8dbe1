"""Row access statistics of a precompute made with ``--row-counts`` (``engram-rs stats DIR``).

For every layer, and every n-gram order of it (its heads' rows are one contiguous part of the
layer's flat table), :func:`row_stats` reports: tokens, lookups (tokens x heads), the distinct
rows touched (and their share of the part's rows), the share of lookups served by the hottest
0.1 / 1 / 10 % of the part's rows, the same for the hottest 0.1 / 1 / 10 % of its bytes counted
in 4 KiB pages (what a page cache keeps: rows of ``row_bytes`` share pages), and the fraction of
unique rows in a batch of 1 / 64 / 4096 consecutive sequences (distinct rows in the batch /
lookups in the batch, the mean over the corpus's full batches; a corpus of fewer sequences than
a batch gives one batch of all of them, flagged). :func:`plot_rank_frequency` draws the
rank-frequency curves (log-log, one per order).

Pages: the table is taken as one file of ``row_bytes``-byte rows from byte 0 (FP8 rows of
DeepSeek-V4.1-Flash: 256 values + 8 scale bytes = 264; the demo's float32 rows: 4 x head_dim);
a row is counted in the page that holds its first byte (a row that straddles two pages needs
both in a real page cache, so the page figures are a slight upper bound for rows that do not
divide 4096).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _engram_rs
from .config import EngramConfig
from .hashing import NgramHasher
from .precompute.counts import COUNT_DTYPE, ColumnLayout, count_file, order_rows
from .precompute.files import MANIFEST
from .precompute.reader import PrecomputedIndices, _map_npy

__all__ = [
    "BATCH_SIZES",
    "PERCENTS",
    "PartStats",
    "RowStats",
    "default_row_bytes",
    "format_stats",
    "plot_rank_frequency",
    "row_stats",
]

#: Shares of the rows (and of the bytes) whose lookups are reported, in percent.
PERCENTS = (0.1, 1.0, 10.0)
#: Batch sizes (sequences) of the unique-row fractions.
BATCH_SIZES = (1, 64, 4096)
#: Points of a rank-frequency curve kept (log-spaced ranks).
_CURVE_POINTS = 400


def default_row_bytes(config: EngramConfig) -> int:
    """Bytes of one stored row: FP8 E4M3 values plus one UE8M0 scale per 32 for a
    DeepSeek-V4.1-Flash style config (no ShortConv: 256 + 8 = 264), float32 otherwise (the
    demo: 4 x 64 = 256)."""
    d = config.head_dim
    return d + math.ceil(d / 32) if not config.short_conv else 4 * d


@dataclasses.dataclass(frozen=True)
class PartStats:
    """The statistics of one layer (``order`` None: all its orders) or of one n-gram order."""

    layer: int
    order: int | None
    rows: int  #: rows of this part of the flat table
    pages: int  #: 4 KiB pages (``page_bytes``) the part's rows span
    tokens: int
    lookups: int  #: tokens x heads of the part
    distinct: int  #: distinct rows looked up
    hot_rows: dict[float, float]  #: percent of the rows -> share of the lookups they serve
    hot_pages: dict[float, float]  #: percent of the pages -> share of the lookups they serve
    batch_unique: dict[int, float]  #: batch size -> mean distinct rows / lookups in a batch
    batch_count: dict[int, int]  #: batch size -> full batches averaged (0: one partial batch)
    ranks: np.ndarray  #: log-spaced ranks (1 = the hottest row) of the rank-frequency curve
    frequencies: np.ndarray  #: lookups of the row at each of ``ranks``

    @property
    def distinct_share(self) -> float:
        """Distinct rows touched as a share of the part's rows."""
        return self.distinct / self.rows if self.rows else 0.0


@dataclasses.dataclass(frozen=True)
class RowStats:
    """What ``engram-rs stats DIR`` prints: one :class:`PartStats` per layer and per order."""

    path: str
    config: EngramConfig
    tokens: int
    sequences: int
    row_bytes: int
    page_bytes: int
    parts: list[PartStats]

    def part(self, layer: int, order: int | None = None) -> PartStats:
        """The statistics of ``layer`` (all orders when ``order`` is None) or one order of it."""
        for p in self.parts:
            if p.layer == layer and p.order == order:
                return p
        raise KeyError(f"no statistics of layer {layer}, order {order} in {self.path}")


def _no_counts(path: str) -> ValueError:
    return ValueError(
        f"{path} holds no row counts (its {MANIFEST} has no 'row_counts' entry): it was made "
        "without --row-counts; run engram-rs precompute again with --row-counts (and --overwrite "
        "to replace it, or another --out)"
    )


def _damaged(where: str, what: str) -> ValueError:
    return ValueError(
        f"{where}: {what}: the row counts are damaged or were not written by engram_rs; rerun "
        "engram-rs precompute with --row-counts --overwrite"
    )


def _load_counts(idx: PrecomputedIndices, layer: int, rows: int) -> np.ndarray:
    """The mapped row counts of ``layer``, checked against the manifest (entry, size, sum)."""
    man = idx.manifest
    entries = man.get("row_counts")
    if not isinstance(entries, dict):
        raise _no_counts(idx.path)
    where = os.path.join(idx.path, MANIFEST)
    entry = entries.get(str(layer))
    if not isinstance(entry, dict):
        raise _damaged(where, f"'row_counts' has no entry for layer {layer}")
    if entry.get("file") != count_file(layer) or entry.get("rows") != rows:
        raise _damaged(
            where,
            f"row_counts[{layer!r}] names {entry.get('file')!r} of {entry.get('rows')!r} rows; "
            f"this config's layer {layer} has {count_file(layer)!r} of {rows} rows",
        )
    dirfd = os.open(idx.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        counts = _map_npy(dirfd, idx.path, count_file(layer), COUNT_DTYPE, (rows,))
    finally:
        os.close(dirfd)
    return counts


def _shares(
    sorted_desc: np.ndarray, total_units: int, lookups: int, percents: Sequence[float]
) -> dict[float, float]:
    """Share of ``lookups`` served by the hottest ``p`` % of ``total_units`` (rows or pages),
    from the units' lookups sorted in descending order (units never looked up left out)."""
    cums = np.cumsum(sorted_desc, dtype=np.float64)
    out = {}
    for p in percents:
        k = max(1, int(total_units * p / 100))
        got = float(cums[min(k, cums.shape[0]) - 1]) if cums.shape[0] else 0.0
        out[float(p)] = got / lookups if lookups else 0.0
    return out


def _part(
    layer: int,
    order: int | None,
    counts: np.ndarray,
    start: int,
    end: int,
    tokens: int,
    heads: int,
    row_bytes: int,
    page_bytes: int,
    percents: Sequence[float],
) -> PartStats:
    part = np.asarray(counts[start:end])
    where = np.flatnonzero(part)
    hits = part[where]
    lookups = tokens * heads
    by_rows = np.sort(hits)[::-1]
    first_page = start * row_bytes // page_bytes
    last_page = (end * row_bytes - 1) // page_bytes if end > start else first_page - 1
    pages = last_page - first_page + 1
    page_of = (where.astype(np.int64) + start) * row_bytes // page_bytes - first_page
    per_page = np.bincount(page_of, weights=hits.astype(np.float64), minlength=0)
    by_pages = np.sort(per_page[per_page > 0])[::-1]
    n = by_rows.shape[0]
    ranks = np.unique(np.geomspace(1, max(n, 1), _CURVE_POINTS).astype(np.int64)) if n else None
    return PartStats(
        layer=layer,
        order=order,
        rows=end - start,
        pages=pages,
        tokens=tokens,
        lookups=lookups,
        distinct=int(n),
        hot_rows=_shares(by_rows, end - start, lookups, percents),
        hot_pages=_shares(by_pages, pages, lookups, percents),
        batch_unique={},
        batch_count={},
        ranks=ranks if ranks is not None else np.zeros(0, np.int64),
        frequencies=by_rows[ranks - 1].astype(np.int64)
        if ranks is not None
        else np.zeros(0, np.int64),
    )


def _batch_unique(
    idx: PrecomputedIndices, layer: int, lay: ColumnLayout, batch: int
) -> tuple[np.ndarray, int]:
    """``([groups + 1], batches)``: the mean unique fraction of each order and of the whole
    layer (last) over the full batches of ``batch`` sequences (one partial batch when there is
    none: batches = 0)."""
    offsets = np.asarray(idx.offsets)
    nseq = idx.num_sequences
    full = nseq // batch
    starts = offsets[0 : full * batch + 1 : batch] if full else np.array([0, idx.num_tokens])
    ids = idx.layer(layer)
    ng = len(lay.groups) - 1
    if idx.num_tokens == 0:
        return np.zeros(ng + 1), full
    distinct = _engram_rs.batch_distinct(
        np.asarray(ids), lay.add, lay.lo, lay.hi, lay.groups, starts.tolist(), lay.rows
    ).reshape(-1, ng)
    tokens = np.diff(starts).astype(np.float64)
    keep = tokens > 0
    heads = lay.groups[1] - lay.groups[0]
    per_order = distinct[keep] / (tokens[keep, None] * heads)
    whole = distinct[keep].sum(axis=1) / (tokens[keep] * len(lay.add))
    return np.concatenate([per_order.mean(axis=0), [whole.mean()]]), full


def row_stats(
    path: str | os.PathLike[str],
    *,
    row_bytes: int | None = None,
    page_bytes: int = 4096,
    percents: Sequence[float] = PERCENTS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> RowStats:
    """The row access statistics of the precompute ``path`` (made with ``--row-counts``).

    ``row_bytes``: bytes of a stored row for the page figures (:func:`default_row_bytes` of the
    config when None); ``page_bytes``: the page size. A directory without counts, or with a
    count file that is missing, truncated or of another size, is a ValueError naming it and
    what to run."""
    idx = PrecomputedIndices(path)
    cfg = idx.config
    if not isinstance(idx.manifest.get("row_counts"), dict):
        raise _no_counts(idx.path)
    rb = default_row_bytes(cfg) if row_bytes is None else row_bytes
    for name, v in (("row_bytes", rb), ("page_bytes", page_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be ints >= 1, got {list(batch_sizes)}")
    tok = idx.manifest.get("tokenizer", {})
    vocab = tok.get("compressed_vocab_size") if isinstance(tok, dict) else None
    hasher = NgramHasher(cfg, vocab if isinstance(vocab, int) and vocab > 0 else 1 << 20, 0)
    heads = cfg.n_head_per_ngram
    parts: list[PartStats] = []
    for layer in idx.layer_ids:
        lay = ColumnLayout(hasher, layer, bool(idx.manifest["flat"]))
        counts = _load_counts(idx, layer, lay.rows)
        layer_parts = [
            _part(
                layer, None, counts, 0, lay.rows, idx.num_tokens, cfg.cols, rb, page_bytes, percents
            )
        ]
        for n in lay.orders:
            a, b = order_rows(lay, n)
            layer_parts.append(
                _part(layer, n, counts, a, b, idx.num_tokens, heads, rb, page_bytes, percents)
            )
        for batch in batch_sizes:
            means, full = _batch_unique(idx, layer, lay, batch)
            for i, p in enumerate(layer_parts):
                # layer_parts[0] is the whole layer (the last mean), then the orders in order.
                p.batch_unique[batch] = float(means[-1] if i == 0 else means[i - 1])
                p.batch_count[batch] = full
        parts.extend(layer_parts)
    return RowStats(idx.path, cfg, idx.num_tokens, idx.num_sequences, rb, page_bytes, parts)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_stats(stats: RowStats) -> str:
    """The table ``engram-rs stats`` prints (Markdown)."""
    percents = list(next(iter(stats.parts)).hot_rows) if stats.parts else list(PERCENTS)
    batches = list(next(iter(stats.parts)).batch_unique) if stats.parts else list(BATCH_SIZES)
    pct = " / ".join(f"{p:g}" for p in percents)
    bat = " / ".join(str(b) for b in batches)
    lines = [
        f"{stats.path}: {stats.tokens} tokens in {stats.sequences} sequences; rows of "
        f"{stats.row_bytes} bytes, pages of {stats.page_bytes} bytes",
        "",
        f"| layer | order | tokens | lookups | distinct rows (% of rows) | lookups served by the "
        f"hottest {pct} % of rows | ... of {stats.page_bytes // 1024} KiB pages | unique rows in a "
        f"batch of {bat} seqs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in stats.parts:
        # *: fewer sequences than a batch, one partial batch
        flags = ["" if p.batch_count[b] else "*" for b in batches]
        order = "all" if p.order is None else p.order
        lines.append(
            f"| {p.layer} | {order} | {p.tokens:,} | {p.lookups:,} | "
            f"{p.distinct:,} ({100 * p.distinct_share:.2f} %) | "
            f"{' / '.join(_pct(p.hot_rows[x]) for x in percents)} | "
            f"{' / '.join(_pct(p.hot_pages[x]) for x in percents)} | "
            + " / ".join(
                f"{_pct(p.batch_unique[b])}{f}" for b, f in zip(batches, flags, strict=True)
            )
            + " |"
        )
    if any(not c for p in stats.parts for c in p.batch_count.values()):
        lines.append("")
        lines.append("*: fewer sequences than one batch: one batch of all of them")
    return "\n".join(lines)


def plot_rank_frequency(
    stats: RowStats | Sequence[tuple[str, RowStats]],
    path: str | os.PathLike[str],
    *,
    dpi: int = 80,
) -> str:
    """Writes a log-log rank-frequency plot (PNG) of the row lookups: one panel per layer (per
    labelled result and layer when given ``[(label, stats), ...]``), one curve per n-gram
    order. Needs matplotlib (``pip install 'engram-rs[stats]'``). Returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "the rank-frequency plot needs matplotlib: pip install 'engram-rs[stats]' (or "
            "pip install matplotlib)"
        ) from None
    labelled = [("", stats)] if isinstance(stats, RowStats) else list(stats)
    panels: list[tuple[str, list[PartStats]]] = []
    for label, s in labelled:
        for layer in dict.fromkeys(p.layer for p in s.parts):
            orders = [p for p in s.parts if p.layer == layer and p.order is not None]
            panels.append((f"{label} layer {layer}".strip(), orders))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False, sharey=True
    )
    for ax, (title, orders) in zip(axes[0], panels, strict=True):
        for p in orders:
            if p.ranks.size:
                ax.loglog(p.ranks, p.frequencies, label=f"{p.order}-grams")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("rank of row", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("lookups", fontsize=8)
    fig.tight_layout()
    out = os.fspath(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _describe(stats: RowStats) -> dict[str, Any]:
    """A JSON-ready summary (without the curves)."""
    return {
        "path": stats.path,
        "tokens": stats.tokens,
        "sequences": stats.sequences,
        "row_bytes": stats.row_bytes,
        "page_bytes": stats.page_bytes,
        "parts": [
            {k: v for k, v in dataclasses.asdict(p).items() if k not in ("ranks", "frequencies")}
            for p in stats.parts
        ],
    }
