"""``engram-rs bench hash|gather|compress|precompute|train``: the benchmarks of
:mod:`engram_rs.bench`, each printing its table and the machine it ran on."""

from __future__ import annotations

import argparse
import os

from .. import dtypes
from ..bench import (
    GATHER_DTYPES,
    bench_compress,
    bench_gather,
    bench_hash_tokens,
    bench_hashing,
    bench_precompute,
    bench_train,
    bench_v41,
    environment,
    format_table,
    gather_table_info,
)
from ..config import PRESETS
from ..samples import deepseek_v4_tokenizer_json
from .common import positive, sizes

__all__ = ["configure"]


def configure(name: str, bench: argparse.ArgumentParser) -> None:
    """The sub-commands of ``bench`` and their arguments."""
    what = bench.add_subparsers(
        dest="what",
        required=True,
        metavar="{hash,gather,compress,precompute,train,v41,stats,tiered}",
    )
    hash_ = what.add_parser("hash", help="hashing against the numpy reference")
    hash_.add_argument(
        "--preset", action="append", choices=list(PRESETS), help="repeatable (all presets)"
    )
    sizes(hash_)
    hash_.set_defaults(func=_bench_hash)
    gather = what.add_parser(
        "gather", help="host-table gathers against torch and numpy, and the copy-loop ceiling"
    )
    gather.add_argument(
        "--dtype", choices=GATHER_DTYPES, default=None, help="table dtype (float32)"
    )
    gather.add_argument("--dim", type=int, default=None, help="values per row (64)")
    gather.add_argument("--rows", type=int, default=None, help="table rows (from --table-gib)")
    gather.add_argument("--table-gib", type=float, default=4.0, help="table size if no --rows")
    gather.add_argument("--batch-rows", type=int, default=1 << 20, help="rows per call")
    gather.add_argument("--mode", choices=["resident", "mmap"], default="resident")
    gather.add_argument("--threads", type=int, default=0, help="threads (0: all cores)")
    gather.add_argument("--repeats", type=positive, default=5, help="interleaved rounds")
    gather.add_argument("--path", default=None, help="a table file to reuse (created if missing)")
    gather.set_defaults(func=_bench_gather, parser=gather)
    compress = what.add_parser(
        "compress", help="tokenizer compression against the Python reference, and hash_tokens"
    )
    sizes(compress)
    compress.set_defaults(func=_bench_compress)
    bench_pre = what.add_parser(
        "precompute",
        help="the precompute end to end against a numpy pipeline, the hashing and I/O ceilings",
    )
    bench_pre.add_argument(
        "--tokens", type=positive, default=20_000_000, help="corpus tokens (%(default)s)"
    )
    bench_pre.add_argument(
        "--repeats", type=positive, default=3, help="interleaved rounds, best kept (3)"
    )
    bench_pre.add_argument(
        "--dir",
        default=None,
        help="where the corpus and outputs go, in a temporary directory removed at the end "
        "(the current directory)",
    )
    bench_pre.add_argument(
        "--seq-len", type=positive, default=4096, help="tokens a sequence (%(default)s)"
    )
    bench_pre.set_defaults(func=_bench_precompute)
    stats = what.add_parser(
        "stats",
        help="row access statistics of Debian's kernel documentation (apt-get download "
        "linux-doc-6.1), both presets",
    )
    stats.add_argument(
        "--preset", action="append", choices=list(PRESETS), help="repeatable (all presets)"
    )
    stats.add_argument(
        "--cache-dir", default=None, help="where the corpus is cached (~/.cache/engram_rs)"
    )
    stats.add_argument(
        "--dir",
        default=None,
        help="where the temporary precompute outputs go, removed at the end (the system's "
        "temporary directory)",
    )
    stats.add_argument(
        "--plot",
        default="row_access_zipf.png",
        metavar="FILE.png",
        help="the rank-frequency plot of all presets (%(default)s)",
    )
    stats.set_defaults(func=_bench_stats)
    bench_train_ = what.add_parser(
        "train",
        help="a training step (gather, backward, fused optimizer) against torch sparse embeddings",
    )
    bench_train_.add_argument(
        "--rows", type=positive, default=10_000_000, help="table rows (%(default)s)"
    )
    bench_train_.add_argument("--dim", type=positive, default=64, help="values per row (64)")
    bench_train_.add_argument(
        "--lookups",
        type=positive,
        default=32 * 1024 * 8,
        help="ids a step: 32 x 1024 tokens x 8 columns (%(default)s)",
    )
    bench_train_.add_argument(
        "--steps", type=positive, default=5, help="timed steps after the warm-up (5)"
    )
    bench_train_.set_defaults(func=_bench_train)
    v41 = what.add_parser(
        "v41",
        help="DeepSeek-V4.1-Flash's Engram layer on the CPU against the same math in plain torch",
    )
    v41.add_argument(
        "--rows", type=positive, default=2_000_000, help="FP8 table rows, about (%(default)s)"
    )
    v41.add_argument(
        "--tokens",
        type=positive,
        nargs="+",
        default=[1024, 8192],
        help="tokens of one forward, one run per count (1024 8192: a decode batch and a prefill "
        "chunk)",
    )
    v41.add_argument("--hidden", type=positive, default=256, help="hidden size (%(default)s)")
    v41.add_argument("--repeats", type=positive, default=7, help="interleaved rounds (7)")
    v41.set_defaults(func=_bench_v41)
    tiered = what.add_parser(
        "tiered",
        help="a table larger than memory: tiered (hot rows resident) against mmap, real held-out "
        "text, with the disk probe and resident-gather ceilings and a cache simulation",
    )
    tiered.add_argument(
        "--table-gb", type=float, default=32.0, help="table size in GB (%(default)s)"
    )
    tiered.add_argument("--hot-gb", type=float, default=4.0, help="hot tier in GB (%(default)s)")
    tiered.add_argument("--batches", type=positive, default=16, help="timed batches (16)")
    tiered.add_argument(
        "--batch-tokens", type=positive, default=4096, help="tokens a batch, 24 rows each (4096)"
    )
    tiered.add_argument(
        "--dir", default=None, help="where the table is written (a temporary directory)"
    )
    tiered.set_defaults(func=_bench_tiered)


def _bench_tiered(args: argparse.Namespace) -> int:
    from ..bench.tiered import bench_tiered

    if not 0 < args.hot_gb < args.table_gb:
        raise SystemExit(f"--hot-gb {args.hot_gb}: the hot tier is part of the table (> 0)")
    print(f"machine: {environment()}")
    r = bench_tiered(args.table_gb, args.hot_gb, args.batches, args.batch_tokens, args.dir)
    s = r.seconds
    print(
        f"{r.corpus}; a {r.table_bytes / 1e9:.1f} GB table of {r.rows} FP8 rows (264 B), "
        f"MemAvailable {r.mem_available / 2**30:.1f} GiB; hot tier {r.hot_bytes / 1e9:.2f} GB "
        f"({r.hot_rows} rows), the mmap table's page cache at the end "
        f"{r.page_cache_bytes / 1e9:.2f} GB; O_DIRECT {r.direct}"
    )
    rows = [
        {"contender": "tiered", "M rows/s": r.lookups / s["tiered"] / 1e6, "s": s["tiered"]},
        {"contender": "mmap (page cache)", "M rows/s": r.lookups / s["mmap"] / 1e6, "s": s["mmap"]},
    ]
    print(format_table(rows))
    print(
        f"{r.batches} batches, {r.lookups} ids, {r.hits / r.lookups:.1%} hot; tiered / mmap "
        f"{r.tiered_vs_mmap:.2f}x (goal >= 3x: {'met' if r.tiered_vs_mmap >= 3 else 'NOT met'})"
    )
    print(
        f"misses alone: {r.distinct_misses} distinct cold rows in {r.probe_reads} reads, tiered "
        f"{s['tiered misses']:.2f} s, the probe (64 preads in flight) {s['probe']:.2f} s: "
        f"{r.misses_vs_probe:.2f} of the probe's rate (goal >= 0.8: "
        f"{'met' if r.misses_vs_probe >= 0.8 else 'NOT met'})"
    )
    print(
        f"hits alone: tiered {s['tiered hits']:.3f} s, a resident table of as many rows "
        f"{s['resident hits']:.3f} s: {r.hits_vs_resident:.2f} of its rate (goal >= 0.85: "
        f"{'met' if r.hits_vs_resident >= 0.85 else 'NOT met'})"
    )
    print(
        f"simulation of all {r.trace_lookups} held-out ids at equal memory, batches as timed "
        "(static: the hot set of the training part's counts; the online policies start empty):"
    )
    print(format_table(r.simulation))
    return 0


def _bench_gather(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    _check_gather_args(parser, args)
    try:
        return _run_gather(args)
    except (ValueError, OSError, KeyError, ImportError) as e:
        parser.error(str(e))  # a usage error (exit status 2)


def _run_gather(args: argparse.Namespace) -> int:
    print(f"machine: {environment()}")
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    rows, where = bench_gather(
        args.rows,
        args.dim,
        args.dtype,
        args.batch_rows,
        args.mode,
        args.repeats,
        args.path,
        args.table_gib,
    )
    print(
        f"random gathers of {args.batch_rows} rows from {where}; interleaved rounds, best of "
        f"{args.repeats}; every contender reads the same table memory, out= rows write the "
        "same preallocated output"
    )
    print(format_table(rows))
    return 0


def _bench_hash(args: argparse.Namespace) -> int:
    print(f"machine: {environment()}")
    rows = bench_hashing(args.preset or list(PRESETS), args.batch, args.seqlen, args.repeats)
    print(f"hashing throughput, B={args.batch}, T={args.seqlen}, best of {args.repeats} warm runs")
    print(format_table(rows))
    return 0


def _bench_compress(args: argparse.Namespace) -> int:
    print(f"machine: {environment()}")
    path = deepseek_v4_tokenizer_json()
    print(f"compression table of the DeepSeek-V4 tokenizer, best of {args.repeats} warm runs")
    print(format_table(bench_compress(path, args.repeats)))
    print(f"\nraw ids -> hash ids, B={args.batch}, T={args.seqlen}")
    print(
        format_table(
            bench_hash_tokens(path, batch=args.batch, seqlen=args.seqlen, repeats=args.repeats)
        )
    )
    return 0


def _bench_stats(args: argparse.Namespace) -> int:
    from ..bench.stats import bench_stats
    from ..stats import format_stats

    print(environment())
    corpus, results = bench_stats(
        args.preset or list(PRESETS), cache_dir=args.cache_dir, work_dir=args.dir, plot=args.plot
    )
    print(
        f"corpus: Debian {corpus.package} {corpus.version}, {corpus.documents} .rst/.txt files "
        f"of Documentation/, {corpus.tokens} DeepSeek-V4 tokens (one sequence a document, an "
        f"end-of-sentence id {corpus.eos_id} after each), cached in {os.path.dirname(corpus.path)}"
    )
    for preset, stats, secs in results:
        print(f"\n{preset} (precompute with --row-counts: {secs:.1f} s)")
        print(format_stats(stats))
    print(f"\nrank-frequency plot: {args.plot}")
    return 0


def _bench_precompute(args: argparse.Namespace) -> int:
    print(f"machine: {environment()}")
    r = bench_precompute(args.tokens, args.repeats, args.dir, args.seq_len)
    gb = r.bytes_written / 1e9
    print(
        f"precompute of {r.tokens} uint32 tokens (.bin, sequences of {r.seq_len}), demo preset, "
        f"both layers, int32 ids: {gb:.2f} GB of output; interleaved rounds, best of "
        f"{r.repeats}; every contender's files are fsynced; GB/s: the precompute's output "
        "bytes over each contender's time"
    )
    print(format_table(r.rows))
    print(
        f"precompute vs the slower ceiling ({r.slower_ceiling}): {r.vs_ceiling:.2f} "
        f"(goal >= 0.80: {'met' if r.vs_ceiling >= 0.80 else 'NOT met'})"
    )
    print(
        f"precompute vs the numpy pipeline: {r.vs_numpy:.2f}x "
        f"(goal >= 3x: {'met' if r.vs_numpy >= 3.0 else 'NOT met'})"
    )
    if 0 < r.precompute_own_secs < float("inf"):
        own = r.precompute_own_secs
        print(
            f"precompute's own timer (after interpreter start-up and imports), best: {own:.2f} s "
            f"({r.vs_ceiling * r.precompute_secs / own:.2f} of the slower ceiling)"
        )
    print(f"peak RSS of the precompute child: {r.peak_rss / 2**20:.0f} MiB")
    print(
        f"bytes written per token: {r.bytes_written / r.tokens:.2f} "
        f"({r.bytes_written} bytes for {r.tokens} tokens)"
    )
    return 0


def _bench_v41(args: argparse.Namespace) -> int:
    if args.hidden * 5 % 32:
        raise SystemExit(f"--hidden {args.hidden}: hidden * (hc_mult + 1) must be a multiple of 32")
    print(f"machine: {environment()}")
    for tokens in args.tokens:
        _bench_v41_once(args, tokens)
    return 0


def _bench_v41_once(args: argparse.Namespace, tokens: int) -> None:
    r = bench_v41(args.rows, tokens, args.hidden, args.repeats)
    print(
        f"one EngramV41 forward (no grad) of {r.tokens} tokens x 24 rows from a {r.table_rows}-row "
        f"FP8 table resident in host memory (264 B a row), hidden {r.hidden}, hc_mult 4, bf16 "
        "wkv; torch: index_select of the same E4M3 codes and UE8M0 scales, dequantized, then the "
        "same dense ops; best of interleaved rounds, outputs checked equal bit for bit"
    )
    print(format_table(r.rows))
    parts = {row["part"].strip(): row for row in r.rows}
    gather, layer = r.rows[0]["torch / engram_rs"], r.rows[-1]["torch / engram_rs"]
    ceiling = parts["copy loop, stored bytes (ceiling)"]["engram_rs ms"]
    of_ceiling = ceiling / parts["into a preallocated out="]["engram_rs ms"]
    print(
        f"gather + dequantize: {gather:.1f}x torch (goal >= 10x: "
        f"{'met' if gather >= 10 else 'NOT met'}); into out= at {of_ceiling:.2f} of the copy "
        f"loop's rate, which writes 264 B a row where it writes 512; whole layer: {layer:.2f}x "
        f"torch (goal >= 1x, no slower: {'met' if layer >= 1 else 'NOT met'})"
    )


def _bench_train(args: argparse.Namespace) -> int:
    print(f"machine: {environment()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"one training step (gather, backward, optimizer) of {args.lookups} ids into a "
        f"{args.rows} x {args.dim} float32 host table ({args.rows * args.dim * 4 / 2**30:.2f} "
        f"GiB); each contender in its own process, one after the other, on the same values and "
        f"ids; one warm-up step, then {args.steps} timed steps on new ids (load average "
        f"{load:.2f} at the start)"
    )
    r = bench_train(args.rows, args.dim, args.lookups, args.steps)
    print(format_table(r.rows))
    print(
        f"x torch: best step against the best step of torch with the matching optimizer; min "
        f"traffic: {r.unique_rows:.0f} distinct rows a step x (row + optimizer state) read and "
        f"written, plus the {args.lookups} gathered rows read and written, over the best step; "
        f"gather ceiling (copy_rows_ceiling of the same ids, read + written): "
        f"{r.ceiling_gbps:.2f} GB/s"
    )
    for what, ratio in r.speedup.items():
        print(f"{what}: {ratio:.1f}x torch (goal >= 5x: {'met' if ratio >= 5.0 else 'NOT met'})")
    engram = {k: v for k, v in r.extra_rss.items() if k.startswith("engram_rs")}
    worst = max(engram.values())
    print(
        "peak RSS beyond the interpreter, table and state: "
        + ", ".join(f"{k} {v / 2**20:+.0f} MiB" for k, v in r.extra_rss.items())
        + f" (goal for engram_rs: no table-sized allocation, the table is "
        f"{r.table_bytes / 2**20:.0f} MiB: {'met' if worst < r.table_bytes else 'NOT met'})"
    )
    return 0


def _check_gather_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses bad ``bench gather`` arguments with a usage error (exit status 2); with
    ``--path``, takes the dtype and dim from the file (refusing a mismatch)."""
    if args.path is not None and os.path.exists(args.path):
        try:
            dtype, _, dim = gather_table_info(args.path)
        except (ValueError, OSError) as e:
            parser.error(f"--path {args.path}: {e}")
        for opt, given, real in (("dtype", args.dtype, dtype), ("dim", args.dim, dim)):
            if given is not None and given != real:
                parser.error(
                    f"--{opt} {given} does not match the table in {args.path} ({opt} {real}): "
                    f"drop --{opt} or pass --{opt} {real}"
                )
        args.dtype, args.dim = dtype, dim
    args.dtype = args.dtype or "float32"
    args.dim = 64 if args.dim is None else args.dim
    for opt in ("dim", "batch_rows", "rows"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            parser.error(f"--{opt.replace('_', '-')} must be >= 1, got {value}")
    if args.dtype == "float8_e4m3" and args.dim % dtypes.FP8_BLOCK:
        parser.error(
            f"float8_e4m3 rows need --dim to be a multiple of {dtypes.FP8_BLOCK}, got {args.dim}"
        )
    if not args.table_gib > 0:
        parser.error(f"--table-gib must be > 0, got {args.table_gib}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
