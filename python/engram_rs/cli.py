"""The ``engram-rs`` command: ``demo`` and ``bench`` sub-commands."""

from __future__ import annotations

import argparse
import os

import numpy as np

from .bench import (
    GATHER_DTYPES,
    PRESET_VOCAB,
    bench_compress,
    bench_gather,
    bench_hash_tokens,
    bench_hashing,
    deepseek_v4_tokenizer_json,
    environment,
    format_table,
    gather_table_info,
)
from .compress import CompressedTokenizer
from .config import PRESETS, EngramConfig
from .hashing import NgramHasher

SENTENCE = "Only Alexander the Great could tame the horse Bucephalus."


def _demo_tokenizer() -> None:
    from tokenizers import Tokenizer

    path = deepseek_v4_tokenizer_json()
    comp = CompressedTokenizer.from_file(path)
    saved = 1 - len(comp) / comp.vocab_size
    print(
        f"DeepSeek-V4 tokenizer: {comp.vocab_size} ids -> {len(comp)} compressed ids "
        f"({saved:.1%} fewer)"
    )
    tok = Tokenizer.from_file(path)
    enc = tok.encode(SENTENCE, add_special_tokens=False)
    raw = np.array(enc.ids, dtype=np.int64)
    cfg = EngramConfig.preset("deepseek-v4.1-flash")
    h = NgramHasher.from_tokenizer(cfg, comp)
    layer = cfg.layer_ids[0]
    hashed = h.hash_tokens(raw, layer_ids=layer)[layer]
    print(f"{SENTENCE!r}, deepseek-v4.1-flash layer {layer}, first 4 of {h.cols} hash ids:")
    rows = [
        {
            "token": repr(tok.decode([int(r)])),
            "raw id": int(r),
            "compressed id": int(c),
            "hash ids": " ".join(str(int(x)) for x in hashed[i, :4]),
        }
        for i, (r, c) in enumerate(zip(raw, comp(raw), strict=True))
    ]
    print(format_table(rows))


def _demo(args: argparse.Namespace) -> int:
    print(f"engram_rs demo on {environment()}\n")
    _demo_tokenizer()
    print()
    for name in PRESETS:
        cfg = EngramConfig.preset(name)
        h = NgramHasher(cfg, PRESET_VOCAB[name])
        ids = np.random.default_rng(0).integers(0, PRESET_VOCAB[name], size=(2, 6))
        out = h.hash(ids)
        layer = cfg.layer_ids[0]
        print(f"{name}: layers {cfg.layer_ids}, table rows {h.table_rows}")
        print(f"  compressed ids[0]      {ids[0].tolist()}")
        print(f"  layer {layer} hash ids[0, -1] {out[layer][0, -1].tolist()}")
    print()
    rows = bench_hashing(list(PRESETS), args.batch, args.seqlen, args.repeats)
    print(f"hashing throughput, B={args.batch}, T={args.seqlen}, best of {args.repeats} warm runs")
    print(format_table(rows))
    return 0


def _bench_gather(args: argparse.Namespace) -> int:
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


def _positive(value: str) -> int:
    """An argparse type: an int >= 1, or a usage error naming the value."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _sizes(parser: argparse.ArgumentParser, batch: int = 16) -> None:
    parser.add_argument("--batch", type=_positive, default=batch, help="sequences (%(default)s)")
    parser.add_argument("--seqlen", type=_positive, default=8192, help="tokens a sequence")
    parser.add_argument("--repeats", type=_positive, default=5, help="timed runs, best kept")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``engram-rs`` command."""
    parser = argparse.ArgumentParser(prog="engram-rs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench}")
    demo = sub.add_parser("demo", help="compress the DeepSeek-V4 tokenizer, hash, time it")
    _sizes(demo)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="throughput against baselines, in the same process")
    what = bench.add_subparsers(dest="what", required=True, metavar="{hash,gather,compress}")
    hash_ = what.add_parser("hash", help="hashing against the numpy reference")
    hash_.add_argument(
        "--preset", action="append", choices=list(PRESETS), help="repeatable (all presets)"
    )
    _sizes(hash_)
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
    gather.add_argument("--repeats", type=_positive, default=5, help="interleaved rounds")
    gather.add_argument("--path", default=None, help="a table file to reuse (created if missing)")
    gather.set_defaults(func=_bench_gather)
    compress = what.add_parser(
        "compress", help="tokenizer compression against the Python reference, and hash_tokens"
    )
    _sizes(compress)
    compress.set_defaults(func=_bench_compress)
    args = parser.parse_args(argv)
    if args.func is _bench_gather:
        _check_gather_args(gather, args)
    try:
        result: int = args.func(args)
    except (ValueError, OSError) as e:
        if args.func is _bench_gather:
            gather.error(str(e))
        raise
    return result


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
    if args.dtype == "float8_e4m3" and args.dim % 32:
        parser.error(f"float8_e4m3 rows need --dim to be a multiple of 32, got {args.dim}")
    if not args.table_gib > 0:
        parser.error(f"--table-gib must be > 0, got {args.table_gib}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
