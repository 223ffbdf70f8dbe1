"""``engram-rs train-demo``: the training demo (:mod:`engram_rs.train_demo`, needs PyTorch)."""

from __future__ import annotations

import argparse
import sys

from ..samples import deepseek_v4_tokenizer_json, sample_text
from .common import positive

__all__ = ["configure"]


def configure(name: str, train: argparse.ArgumentParser) -> None:
    """The arguments of ``train-demo``."""
    train.add_argument("--out", default="train-demo", help="checkpoints, tables (%(default)s)")
    train.add_argument("--steps", type=positive, default=100)
    train.add_argument("--batch", type=positive, default=16)
    train.add_argument("--seq-len", type=positive, default=128)
    train.add_argument("--checkpoint-every", type=positive, default=25)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train_demo, parser=train)


def _train_demo(args: argparse.Namespace) -> int:
    try:
        from ..train_demo import check_sizes, train_demo
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
        args.parser.error(str(e))  # sizes that cannot work: a usage error (exit status 2)
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
