"""``engram-rs stats DIR``: the row access statistics of a precompute made with ``--row-counts``
(:mod:`engram_rs.stats`), printed as a table, with a rank-frequency plot (PNG)."""

from __future__ import annotations

import argparse
import json

from ..stats import _describe, format_stats, plot_rank_frequency, row_stats
from .common import positive
from .precompute import _reported

__all__ = ["configure"]


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """The arguments of ``stats``."""
    p.description = (
        "Per layer and n-gram order of a precompute made with --row-counts: tokens, lookups, "
        "distinct rows, the share of lookups served by the hottest 0.1/1/10 %% of rows and of "
        "4 KiB pages, the unique-row fraction of batches of 1/64/4096 sequences; writes a "
        "log-log rank-frequency plot."
    )
    p.add_argument("dir", metavar="DIR", help="a precompute output made with --row-counts")
    p.add_argument(
        "--row-bytes",
        type=positive,
        default=None,
        help="bytes of a stored row for the page figures (264 for FP8 V4.1 rows, 4 x head_dim "
        "for float32 demo rows)",
    )
    p.add_argument("--page-bytes", type=positive, default=4096, help="page size (4096)")
    p.add_argument(
        "--plot",
        default="rank_frequency.png",
        metavar="FILE.png",
        help="where the rank-frequency plot goes (%(default)s)",
    )
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_reported(_stats))


def _stats(args: argparse.Namespace) -> int:
    stats = row_stats(args.dir, row_bytes=args.row_bytes, page_bytes=args.page_bytes)
    print(format_stats(stats))
    if not args.no_plot:
        print(f"rank-frequency plot: {plot_rank_frequency(stats, args.plot)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_describe(stats), f, indent=1)
    return 0
