"""``engram-rs v41-demo``: DeepSeek-V4.1-Flash's Engram layers end to end on a checkpoint directory
(a tiny one in the real layout, made here, when none is given): open it, hash a prompt with an
image span (blocked positions, SPEC 8.3), run every Engram layer on random hidden states, print
what it did."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from ..samples import deepseek_v4_tokenizer_json

__all__ = ["configure"]

PROMPT = "Only Alexander the Great could tame the horse Bucephalus."


def configure(name: str, demo: argparse.ArgumentParser) -> None:
    """The arguments of ``v41-demo``."""
    demo.add_argument(
        "--checkpoint",
        default=None,
        help="a DeepSeek-V4.1-Flash checkpoint directory (default: a tiny one in the real "
        "layout, made in a temporary directory)",
    )
    demo.add_argument("--prompt", default=PROMPT, help="the text before and after the image")
    demo.add_argument(
        "--image-tokens", type=int, default=8, help="blocked positions of the image span (8)"
    )
    demo.add_argument(
        "--dead-id",
        type=int,
        default=None,
        help="the raw token id of image positions (default: the tokenizer's last id)",
    )
    demo.set_defaults(func=_v41_demo)


def _v41_demo(args: argparse.Namespace) -> int:
    if args.image_tokens < 0:
        raise SystemExit(f"--image-tokens must be >= 0, got {args.image_tokens}")
    if args.checkpoint is not None:
        return _run(args, args.checkpoint)
    from ..torch.v41_checkpoint import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="engram-v41-demo-") as tmp:
        root = write_tiny_checkpoint(os.path.join(tmp, "ckpt"), deepseek_v4_tokenizer_json())
        print(f"made a tiny DeepSeek-V4.1-Flash checkpoint in the real layout: {root}")
        return _run(args, root)


def _run(args: argparse.Namespace, root: str) -> int:
    import torch
    from tokenizers import Tokenizer

    from ..torch.v41_checkpoint import open_checkpoint

    t0 = time.perf_counter()
    ck = open_checkpoint(root)
    cfg = ck.config
    print(
        f"opened {root} in {time.perf_counter() - t0:.2f} s: Engram layers {list(cfg.layer_ids)}, "
        f"hidden {cfg.hidden_size}, hc_mult {cfg.hc_mult}, {cfg.cols} hash columns of "
        f"{cfg.head_dim} values, rms_norm_eps {cfg.norm_eps}"
    )
    tok = Tokenizer.from_file(ck.tokenizer_path)
    dead = ck.tokenizer.vocab_size - 1 if args.dead_id is None else args.dead_id
    words = np.array(tok.encode(args.prompt, add_special_tokens=False).ids, dtype=np.int64)
    half = len(words) // 2
    raw = np.concatenate([words[:half], np.full(args.image_tokens, dead), words[half:]])[None]
    image = raw == dead
    print(
        f"prompt: {len(words)} text tokens with an image span of {args.image_tokens} tokens "
        f"(raw id {dead}) after token {half}: {raw.shape[1]} positions, "
        f"{int(image.sum())} blocked"
    )
    ids = ck.hasher.hash_tokens(raw, dead_id=dead)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, raw.shape[1], cfg.hc_mult, cfg.hidden_size, generator=gen)
    h = h.to(torch.bfloat16)
    mask = torch.from_numpy(~image)
    for layer, module in ck.layers.items():
        table = module.embed.table
        assert table is not None
        hash_ids = torch.from_numpy(ids[layer])
        with torch.no_grad():
            module(h, hash_ids, mask)  # warm-up (torch's first call)
            t0 = time.perf_counter()
            out = module(h, hash_ids, mask)
        ms = (time.perf_counter() - t0) * 1e3
        delta = (out.float() - h.float()).norm(dim=-1).mean(-1)[0]  # per position
        pad_row = ids[layer][0, int(np.argmax(image[0]))] if image.any() else None
        text = float(delta[mask[0]].mean())
        img = float(delta[~mask[0]].mean()) if image.any() else 0.0
        print(
            f"layer {layer}: table {table.rows} x {table.dim} {table.dtype} ({table.mode}, "
            f"zero-copy in {os.path.basename(table.path or '')}); {raw.shape[1] * cfg.cols} "
            f"rows gathered; forward {ms:.1f} ms; mean |out - h| per position: text "
            f"{text:.4f}, image {img:.4f} (gate 0 there: the residual only)"
        )
        if pad_row is not None:
            print(f"  an image position hashes as all pad: first ids {pad_row[:4].tolist()}")
    return 0
