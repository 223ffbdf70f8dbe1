"""The ``engram-rs`` command: ``demo`` and ``bench`` sub-commands."""

from __future__ import annotations

import argparse

import numpy as np

from .bench import (
    PRESET_VOCAB,
    bench_compress,
    bench_gather,
    bench_hash_tokens,
    bench_hashing,
    deepseek_v4_tokenizer_json,
    environment,
    format_table,
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


def _bench(args: argparse.Namespace) -> int:
    print(f"machine: {environment()}")
    if args.what == "gather":
        import os

        if args.threads:
            os.environ["RAYON_NUM_THREADS"] = str(args.threads)
        rows = bench_gather(
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
            f"random gathers of {args.batch_rows} rows, {args.dtype} dim {args.dim}, "
            f"{args.mode} table of >= {args.table_gib} GiB, best of {args.repeats}"
        )
        print(format_table(rows))
    if args.what == "hash":
        rows = bench_hashing(args.preset or list(PRESETS), args.batch, args.seqlen, args.repeats)
        print(
            f"hashing throughput, B={args.batch}, T={args.seqlen}, best of {args.repeats} warm runs"
        )
        print(format_table(rows))
    if args.what == "compress":
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``engram-rs`` command."""
    parser = argparse.ArgumentParser(prog="engram-rs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="hash a generated batch with both presets and time it")
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--seqlen", type=int, default=8192)
    demo.add_argument("--repeats", type=int, default=5)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="throughput benchmarks against baselines")
    bench.add_argument("what", choices=["hash", "gather", "compress"])
    bench.add_argument("--preset", action="append", choices=list(PRESETS))
    bench.add_argument("--batch", type=int, default=16)
    bench.add_argument("--seqlen", type=int, default=8192)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--dtype", default="float32", help="gather: table dtype")
    bench.add_argument("--dim", type=int, default=64, help="gather: values per row")
    bench.add_argument("--rows", type=int, default=None, help="gather: table rows")
    bench.add_argument("--table-gib", type=float, default=4.0, help="gather: size if no --rows")
    bench.add_argument("--batch-rows", type=int, default=1 << 20, help="gather: rows per call")
    bench.add_argument("--mode", choices=["resident", "mmap"], default="resident")
    bench.add_argument("--threads", type=int, default=0, help="gather: threads (0: all cores)")
    bench.add_argument("--path", default=None, help="gather: reuse this table file")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    for opt in ("batch", "seqlen", "repeats"):
        if getattr(args, opt) < 1:
            parser.error(f"--{opt} must be >= 1, got {getattr(args, opt)}")
    result: int = args.func(args)
    return result
