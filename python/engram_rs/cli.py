"""The ``engram-rs`` command: ``demo``, ``precompute``, ``verify``, ``train-demo`` and ``bench``
sub-commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from .bench import (
    GATHER_DTYPES,
    PRESET_VOCAB,
    bench_compress,
    bench_gather,
    bench_hash_tokens,
    bench_hashing,
    bench_precompute,
    bench_train,
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
        h = NgramHasher(cfg, PRESET_VOCAB[name], compressed_pad_id=cfg.pad_id)
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
    print()
    return _demo_precompute(args.out)


def sample_text() -> str:
    """The path of the sample text that ships with the package (213 KB of Shakespeare)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tinyshakespeare.txt")


def _demo_precompute(out: str) -> int:
    """Precomputes the shipped sample text with the demo preset, then verifies the result."""
    steps = [
        [
            "precompute",
            sample_text(),
            "--out",
            out,
            "--config",
            "demo",
            "--tokenizer",
            deepseek_v4_tokenizer_json(),
            "--seq-len",
            "512",
            "--overwrite",
        ],
        ["verify", out],
    ]
    for step in steps:
        print("$ engram-rs " + " ".join(step))
        code = main(step)
        if code:
            return code
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


def _precompute(args: argparse.Namespace) -> int:
    from .offline import precompute

    layers = None
    if args.layers is not None:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers takes comma-separated ints, got {args.layers!r}") from None
    logging.basicConfig(level=logging.INFO, format="engram-rs precompute: %(message)s")
    started = time.monotonic()
    idx = precompute(
        args.inputs,
        args.out,
        config=args.config,
        tokenizer=args.tokenizer,
        format=args.format,
        column=args.column,
        token_dtype=args.token_dtype,
        text_field=args.text_field,
        seq_len=args.seq_len,
        eos_id=args.eos_id,
        layers=layers,
        index_dtype=args.index_dtype,
        flat=args.flat,
        threads=args.threads,
        resume=args.resume,
        overwrite=args.overwrite,
        engine=args.engine,
        progress=None if not args.no_progress else False,
        chunk_tokens=args.chunk_tokens,
        commit_seconds=args.commit_seconds,
    )
    elapsed = time.monotonic() - started
    files = idx.manifest["files"]
    size = sum(os.path.getsize(os.path.join(idx.path, f)) for f in files)
    rate = idx.num_tokens / elapsed if elapsed > 0 else 0.0
    print(
        f"{idx.path}: {idx.num_tokens} tokens in {idx.num_sequences} sequences, layers "
        f"{idx.layer_ids}, {size / 1e9:.3f} GB ({size / max(idx.num_tokens, 1):.1f} bytes/token) "
        f"in {elapsed:.2f} s ({rate / 1e6:.2f} M tokens/s)"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .offline import verify

    report = verify(args.dir, tokenizer=args.tokenizer, sample=args.sample)
    print(
        f"{report['path']}: OK: {len(report['files'])} files match the manifest's sizes and "
        f"checksums; {report['rehashed_sequences']} of {report['sequences']} sequences re-hashed "
        "equal"
    )
    return 0


def _add_precompute(sub: Any) -> argparse.ArgumentParser:
    from .sources import FORMATS

    p: argparse.ArgumentParser = sub.add_parser(
        "precompute",
        help="hash a tokenized dataset to memory-mapped index files",
        description="Hash every token of INPUT... (one dataset, in order) with the Engram "
        "config and write DIR/manifest.json, DIR/layer_<id>.npy, DIR/tokens.npy and "
        "DIR/offsets.npy. Works in DIR.partial until complete; --resume continues a killed run.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help=".npy/.bin/.parquet/.arrow/.jsonl/.txt"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--config",
        default="demo",
        help=f"a preset ({', '.join(PRESETS)}) or a config JSON file (demo)",
    )
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer.json")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto")
    p.add_argument("--column", default="input_ids", help="Parquet/Arrow list-of-int column")
    p.add_argument("--token-dtype", choices=["uint16", "uint32"], default="uint32", help=".bin ids")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--seq-len", type=_positive, help="flat streams: windows of T tokens")
    rule.add_argument("--eos-id", type=int, help="flat streams: a sequence ends after each ID")
    p.add_argument("--layers", help="comma-separated Engram layer ids (all of the config's)")
    p.add_argument("--index-dtype", choices=["int32", "int64"], default="int32")
    p.add_argument("--flat", action="store_true", help="add the layers' offsets (flat table rows)")
    p.add_argument("--threads", type=int, default=0, help="hashing threads (0: all cores)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace DIR (or DIR.partial)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--chunk-tokens", type=_positive, default=1 << 18, help="tokens per chunk")
    p.add_argument(
        "--commit-seconds", type=float, default=30.0, help="seconds between resume points"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_precompute)
    v = sub.add_parser(
        "verify", help="check a precompute: sizes, checksums, a re-hash of random sequences"
    )
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--tokenizer", help="tokenizer.json (the manifest's path if not given)")
    v.add_argument("--sample", type=_positive, default=64, help="sequences re-hashed (64)")
    v.set_defaults(func=_verify)
    return p


def _train_demo(args: argparse.Namespace) -> int:
    try:
        from .torch.train_demo import check_sizes, train_demo
    except ImportError as e:
        raise ImportError(f"train-demo needs PyTorch ({e}): pip install torch") from None
    try:
        check_sizes(
            steps=args.steps,
            batch=args.batch,
            seq_len=args.seq_len,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
        )
    except ValueError as e:
        args.train_parser.error(str(e))  # sizes that cannot work: a usage error (exit status 2)
    try:
        losses = train_demo(
            args.out,
            deepseek_v4_tokenizer_json(),
            sample_text(),
            steps=args.steps,
            batch=args.batch,
            seq_len=args.seq_len,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            seed=args.seed,
            progress=None if not args.no_progress else False,
        )
    except (ValueError, OSError) as e:
        # Too few windows in the text for the sizes, a checkpoint refused: one line, status 1.
        print(f"engram-rs train-demo: error: {e}", file=sys.stderr)
        return 1
    return 0 if losses else 1


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
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,precompute,verify,train-demo,bench}"
    )
    demo = sub.add_parser(
        "demo", help="compress the DeepSeek-V4 tokenizer, hash, time it, precompute a sample"
    )
    _sizes(demo)
    demo.add_argument(
        "--out", default="demo-precompute", help="where the sample's precompute goes (%(default)s)"
    )
    demo.set_defaults(func=_demo)
    precompute = _add_precompute(sub)
    train = sub.add_parser(
        "train-demo",
        help="train a tiny LM with an Engram layer on a host table (CPU, about a minute)",
    )
    train.add_argument("--out", default="train-demo", help="checkpoints, tables (%(default)s)")
    train.add_argument("--steps", type=_positive, default=100)
    train.add_argument("--batch", type=_positive, default=16)
    train.add_argument("--seq-len", type=_positive, default=128)
    train.add_argument("--checkpoint-every", type=_positive, default=25)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train_demo, train_parser=train)
    bench = sub.add_parser("bench", help="throughput against baselines, in the same process")
    what = bench.add_subparsers(
        dest="what", required=True, metavar="{hash,gather,compress,precompute,train}"
    )
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
    bench_pre = what.add_parser(
        "precompute",
        help="the precompute end to end against a numpy pipeline, the hashing and I/O ceilings",
    )
    bench_pre.add_argument(
        "--tokens", type=_positive, default=20_000_000, help="corpus tokens (%(default)s)"
    )
    bench_pre.add_argument(
        "--repeats", type=_positive, default=3, help="interleaved rounds, best kept (3)"
    )
    bench_pre.add_argument(
        "--dir",
        default=None,
        help="where the corpus and outputs go, in a temporary directory removed at the end "
        "(the current directory)",
    )
    bench_pre.add_argument(
        "--seq-len", type=_positive, default=4096, help="tokens a sequence (%(default)s)"
    )
    bench_pre.set_defaults(func=_bench_precompute)
    bench_train_ = what.add_parser(
        "train",
        help="a training step (gather, backward, fused optimizer) against torch sparse embeddings",
    )
    bench_train_.add_argument(
        "--rows", type=_positive, default=10_000_000, help="table rows (%(default)s)"
    )
    bench_train_.add_argument("--dim", type=_positive, default=64, help="values per row (64)")
    bench_train_.add_argument(
        "--lookups",
        type=_positive,
        default=32 * 1024 * 8,
        help="ids a step: 32 x 1024 tokens x 8 columns (%(default)s)",
    )
    bench_train_.add_argument(
        "--steps", type=_positive, default=5, help="timed steps after the warm-up (5)"
    )
    bench_train_.set_defaults(func=_bench_train)
    args = parser.parse_args(argv)
    if args.func is _bench_gather:
        _check_gather_args(gather, args)
    if args.func is _precompute and args.threads < 0:
        precompute.error(f"--threads must be >= 0, got {args.threads}")
    try:
        result: int = args.func(args)
    except (ValueError, OSError, KeyError, ImportError) as e:
        if args.func is _bench_gather:
            gather.error(str(e))
        if args.func in (_precompute, _verify):
            # A clear one-line message (what, the value, what to do), exit status 1.
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            print(f"engram-rs {args.command}: error: {msg}", file=sys.stderr)
            return 1
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
