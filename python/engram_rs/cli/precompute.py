"""``engram-rs precompute`` and ``engram-rs verify``: the offline precompute and its check. Neither
imports the benchmarks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable

from ..config import PRESETS
from ..precompute import precompute, verify
from ..precompute.sources import FORMATS
from .common import positive

__all__ = ["configure", "run_command"]

PRECOMPUTE_DESCRIPTION = (
    "Hash every token of INPUT... (one dataset, in order) with the Engram config and write "
    "DIR/manifest.json, DIR/layer_<id>.npy, DIR/tokens.npy and DIR/offsets.npy. Works in "
    "DIR.partial until complete; --resume continues a killed run."
)


def configure(name: str, p: argparse.ArgumentParser) -> None:
    """The arguments of ``precompute`` or ``verify`` (``name``)."""
    if name == "verify":
        p.add_argument("dir", metavar="DIR")
        p.add_argument("--tokenizer", help="tokenizer.json (the manifest's path if not given)")
        p.add_argument("--sample", type=positive, default=64, help="sequences re-hashed (64)")
        p.set_defaults(func=_reported(_verify))
        return
    p.description = PRECOMPUTE_DESCRIPTION
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
    rule.add_argument("--seq-len", type=positive, help="flat streams: windows of T tokens")
    rule.add_argument("--eos-id", type=int, help="flat streams: a sequence ends after each ID")
    p.add_argument(
        "--dead-id",
        type=int,
        help="a raw token id that marks blocked positions (image tokens, SPEC 8.3)",
    )
    p.add_argument("--layers", help="comma-separated Engram layer ids (all of the config's)")
    p.add_argument("--index-dtype", choices=["int32", "int64"], default="int32")
    p.add_argument("--flat", action="store_true", help="add the layers' offsets (flat table rows)")
    p.add_argument("--threads", type=int, default=0, help="hashing threads (0: all cores)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace DIR (or DIR.partial)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--chunk-tokens", type=positive, default=1 << 18, help="tokens per chunk")
    p.add_argument(
        "--commit-seconds", type=float, default=30.0, help="seconds between resume points"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--row-counts",
        action="store_true",
        help="also count lookups per table row (DIR/row_counts_<id>.npy, for engram-rs stats)",
    )
    p.set_defaults(func=_reported(_precompute), parser=p)


def run_command(argv: list[str]) -> int:
    """Runs ``engram-rs precompute ...`` or ``engram-rs verify ...`` (``argv[0]``) as the
    command does (the demo's steps)."""
    parser = argparse.ArgumentParser(prog=f"engram-rs {argv[0]}")
    configure(argv[0], parser)
    args = parser.parse_args(argv[1:])
    args.command = argv[0]
    result: int = args.func(args)
    return result


def _reported(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with a bad input or a damaged file reported as one line ``engram-rs COMMAND:
    error: ...`` (what, the value, what to do) and exit status 1, never a traceback."""

    def reported(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError, KeyError, ImportError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            print(f"engram-rs {args.command}: error: {msg}", file=sys.stderr)
            return 1

    return reported


def _precompute(args: argparse.Namespace) -> int:
    if args.threads < 0:
        args.parser.error(f"--threads must be >= 0, got {args.threads}")
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
        dead_id=args.dead_id,
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
        row_counts=args.row_counts,
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
    report = verify(args.dir, tokenizer=args.tokenizer, sample=args.sample)
    print(
        f"{report['path']}: OK: {len(report['files'])} files match the manifest's sizes and "
        f"checksums; {report['rehashed_sequences']} of {report['sequences']} sequences re-hashed "
        "equal"
    )
    return 0
