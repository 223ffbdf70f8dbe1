"""The ``engram-rs`` command: ``demo``, ``precompute``, ``verify``, ``stats``, ``train-demo``,
``bench`` and ``v41-demo`` sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "main"]

#: Each sub-command: the module of this package that defines its arguments and runs it (imported
#: only when that sub-command runs, so that ``precompute`` never imports the benchmarks), and its
#: one-line help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "compress the DeepSeek-V4 tokenizer, hash, time it, precompute a sample"),
    "precompute": ("precompute", "hash a tokenized dataset to memory-mapped index files"),
    "verify": (
        "precompute",
        "check a precompute: sizes, checksums, a re-hash of random sequences",
    ),
    "train-demo": (
        "train",
        "train a tiny LM with an Engram layer on a host table (CPU, about a minute)",
    ),
    "stats": (
        "stats",
        "row access statistics of a precompute made with --row-counts, and a rank-frequency plot",
    ),
    "bench": ("bench", "throughput against baselines, in the same process"),
    "v41-demo": (
        "v41",
        "DeepSeek-V4.1-Flash's Engram layers on a checkpoint directory (a tiny one by default)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``engram-rs`` command."""
    args_in = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="engram-rs", description=__doc__)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{demo,precompute,verify,stats,train-demo,bench,v41-demo}",
    )
    # The sub-command named first (the command has no options of its own but -h).
    chosen = next((a for a in args_in if not a.startswith("-")), None)
    for name, (module, summary) in COMMANDS.items():
        command = sub.add_parser(name, help=summary)
        if name == chosen:
            importlib.import_module(f"{__name__}.{module}").configure(name, command)
    args = parser.parse_args(args_in)
    result: int = args.func(args)
    return result
