"""Argument types and options that several sub-commands share."""

from __future__ import annotations

import argparse

__all__ = ["positive", "sizes"]


def positive(value: str) -> int:
    """An argparse type: an int >= 1, or a usage error naming the value."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def sizes(parser: argparse.ArgumentParser, batch: int = 16) -> None:
    """The ``--batch``, ``--seqlen`` and ``--repeats`` of the hashing measurements."""
    parser.add_argument("--batch", type=positive, default=batch, help="sequences (%(default)s)")
    parser.add_argument("--seqlen", type=positive, default=8192, help="tokens a sequence")
    parser.add_argument("--repeats", type=positive, default=5, help="timed runs, best kept")
