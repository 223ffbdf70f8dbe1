"""``engram-rs demo``: the DeepSeek-V4 tokenizer compressed, a sentence hashed, the hashing timed
(the benchmarks' hashing table) and a precompute of the shipped sample text, verified."""

from __future__ import annotations

import argparse

import numpy as np

from ..bench import PRESET_VOCAB, bench_hashing, environment, format_table
from ..compress import CompressedTokenizer
from ..config import PRESETS, EngramConfig
from ..hashing import NgramHasher
from ..samples import deepseek_v4_tokenizer_json, sample_text
from .common import sizes
from .precompute import run_command

__all__ = ["configure"]


def configure(name: str, demo: argparse.ArgumentParser) -> None:
    """The arguments of ``demo``."""
    sizes(demo)
    demo.add_argument(
        "--out", default="demo-precompute", help="where the sample's precompute goes (%(default)s)"
    )
    demo.set_defaults(func=_demo)


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
        code = run_command(step)
        if code:
            return code
    return 0
