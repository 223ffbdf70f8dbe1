"""``engram-rs train-demo``: a tiny Transformer language model with one Engram layer whose table
is a :class:`~engram_rs.HostTable` trained in place by a fused sparse optimizer, on the sample
text that ships with the package, its hash ids read from a precompute of that text.

It prints the loss against a unigram model's (the best a model without context can do), saves
a checkpoint every ``checkpoint_every`` steps, and with ``resume=True`` continues from the last
one: the losses of a killed and resumed run equal those of one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .compress import CompressedTokenizer
from .config import EngramConfig
from .hashing import NgramHasher
from .precompute import PrecomputedIndices, precompute
from .progress import progress_bar
from .table import HostTable
from .torch import Engram, SparseAdam
from .torch.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["TinyLM", "check_sizes", "demo_config", "train_demo"]

LAYER = 1


def demo_config() -> EngramConfig:
    """The demo preset with small tables (16 heads of about 20 k rows: 82 MB of float32)."""
    return EngramConfig.preset("demo").replace(
        engram_vocab_size=[20011, 20011], layer_ids=[LAYER], hidden_size=64, hc_mult=1
    )


class TinyLM(nn.Module):
    """Token and position embeddings, ``layers`` pre-norm Transformer blocks, an Engram layer
    after the first block (its output added to the hidden states), a tied output head."""

    def __init__(
        self, vocab: int, seq_len: int, engram: Engram, dim: int = 64, layers: int = 2
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.engram = engram
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.mask: torch.Tensor
        mask = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        mask = self.mask[:t, :t]
        for i, block in enumerate(self.blocks):
            h = block(h, src_mask=mask, is_causal=True)
            if i == 0:
                h = h + self.engram(h[:, :, None, :], hash_ids)[:, :, 0, :]
        logits: torch.Tensor = self.norm(h) @ self.tok.weight.T
        return logits


#: The demo's limit on the memory of one training step (its estimate: see check_sizes).
STEP_BYTES = 4 << 30
#: The table's file in ``out``; its optimizer's state files are beside it.
TABLE = "engram-table.safetensors"


def _step_bytes(batch: int, seq_len: int) -> int:
    """About the memory of one step: float32 attention scores (2 blocks x 4 heads x seq_len^2
    per window, kept three times over for the backward) and logits (up to 8192 ids, three
    times over), for ``batch`` windows."""
    return 4 * batch * seq_len * (2 * 4 * 3 * seq_len + 3 * 8192)


def check_sizes(
    *, steps: int, batch: int, seq_len: int, checkpoint_every: int, seed: int = 0
) -> None:
    """Refuses sizes that cannot work (a ``ValueError`` saying the limit), before any file is
    touched (the limits that depend on the text are checked once it is hashed)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"--seed must be an int in [0, 2**64), got {seed!r}")
    for name, value in (
        ("steps", steps),
        ("batch", batch),
        ("seq-len", seq_len),
        ("checkpoint-every", checkpoint_every),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be an int >= 1, got {value!r}")
    need = _step_bytes(batch, seq_len)
    if need <= STEP_BYTES:
        return
    # The longest window that fits at this batch: the root of the quadratic, then exact.
    a, b = 4 * batch * 24, 4 * batch * 3 * 8192
    max_len = (-b + math.isqrt(b * b + 4 * a * STEP_BYTES)) // (2 * a)
    while _step_bytes(batch, max_len + 1) <= STEP_BYTES:
        max_len += 1
    while max_len > 0 and _step_bytes(batch, max_len) > STEP_BYTES:
        max_len -= 1
    max_batch = STEP_BYTES // _step_bytes(1, seq_len)
    hints = []
    if max_len >= 1:
        hints.append(f"at --batch {batch}, --seq-len at most {max_len}")
    if max_batch >= 1:
        hints.append(f"at --seq-len {seq_len}, --batch at most {max_batch}")
    raise ValueError(
        f"--batch {batch} --seq-len {seq_len} needs about {-(-need // (1 << 30))} GiB a step "
        "(its attention scores, 2 blocks x 4 heads x batch x seq-len^2 float32, and logits, "
        f"kept for the backward), over the demo's limit of at most {STEP_BYTES >> 30} GiB: "
        + "; ".join(hints or ["use a smaller --batch and --seq-len"])
    )


def _check_windows(tokens: int, windows: int, text: str, batch: int, seq_len: int) -> None:
    """The text must give two windows of ``seq_len + 1`` tokens (one to train on, one held
    out), and at least ``batch`` training windows."""
    if windows < 2:
        raise ValueError(
            f"--seq-len {seq_len}: the text {text} has {tokens} tokens, too few for two "
            f"windows of seq-len + 1 = {seq_len + 1} tokens (one to train on, one held out): "
            f"--seq-len at most {max(tokens // 2 - 1, 0)}"
        )
    train = windows - max(1, windows // 10)
    if batch > train:
        raise ValueError(
            f"--batch {batch}: the text gives {train} training windows of {seq_len + 1} tokens "
            f"(and {windows - train} held out), so a batch of {batch} would repeat windows in "
            f"one step: --batch at most {train} (or a smaller --seq-len for more windows)"
        )


def _unigram_loss(train: np.ndarray, held_out: np.ndarray, vocab: int) -> float:
    """Cross-entropy on ``held_out`` of the unigram model of ``train`` (add-one smoothed): the
    best a model without context does."""
    counts = np.bincount(train.reshape(-1), minlength=vocab).astype(np.float64) + 1.0
    p = counts / counts.sum()
    return float(-np.log(p[held_out.reshape(-1)]).mean())


def _loss(model: nn.Module, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1], ids)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )


def train_demo(
    out: str,
    tokenizer: str,
    text: str,
    *,
    steps: int = 100,
    batch: int = 16,
    seq_len: int = 128,
    checkpoint_every: int = 25,
    resume: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Trains the demo model for ``steps`` steps (continuing the checkpoint in ``out`` when
    ``resume``); returns the loss of every step from the first.

    Without a checkpoint to continue (no ``resume``, or a run killed before its first
    checkpoint) it starts clean: a new table, new optimizer state, the text hashed again. Sizes
    that cannot work (a step over the demo's memory limit, a window longer than half the text,
    a batch of more windows than the text has) are refused with a ``ValueError`` before the
    table is made.
    """
    check_sizes(
        steps=steps, batch=batch, seq_len=seq_len, checkpoint_every=checkpoint_every, seed=seed
    )
    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    cfg = demo_config()
    comp = CompressedTokenizer.from_file(tokenizer)
    idx_dir = os.path.join(out, "indices")
    table_path = os.path.join(out, TABLE)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    # A resume continues the checkpoint, with the table and optimizer state it restores; with
    # none (killed before the first), the run starts clean, as an uninterrupted one did.
    clean = not (resume and os.path.exists(ckpt))
    # Starting clean hashes the text again (under a second): whatever a killed run left in
    # ``indices.partial``, or a precompute of another --seq-len, is replaced.
    precompute(
        text,
        idx_dir,
        cfg,
        tokenizer,
        seq_len=seq_len + 1,
        progress=False,
        overwrite=clean,
        resume=not clean,
    )
    data = PrecomputedIndices(idx_dir, window=seq_len + 1)
    _check_windows(data.num_tokens, len(data), text, batch, seq_len)
    raw = np.stack([data[i][0] for i in range(len(data))]).astype(np.int64)
    hashes = np.stack([data[i][1][LAYER] for i in range(len(data))])
    vocab_ids, dense = np.unique(raw, return_inverse=True)
    dense = dense.reshape(raw.shape)
    # The last tenth of the windows is held out: the losses compared are on text not trained on.
    n = len(data) - max(1, len(data) // 10)
    unigram = _unigram_loss(dense[:n, 1:], dense[n:, 1:], len(vocab_ids))

    rows = NgramHasher.from_tokenizer(cfg, comp).table_rows[LAYER]
    if clean:
        # An earlier run's checkpoint first (a kill of this run before its own first one must
        # not resume that one), then the killed run's table and its optimizer's state files
        # beside it (engram-table.<kind>-<state>...): a clean start inherits none of them.
        for name in ("checkpoint.safetensors", "losses.json"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        stem = TABLE[: -len(".safetensors")] + "."
        for name in sorted(os.listdir(out)):
            path = os.path.join(out, name)
            if name.startswith(stem) and name != TABLE and not os.path.isdir(path):
                os.remove(path)
    if clean or not os.path.exists(table_path):
        HostTable.create(
            table_path, rows, cfg.head_dim, dtype="float32", init="normal", std=0.02, seed=seed
        )
    table = HostTable.open(table_path, mode="mmap", writable=True)
    sparse = SparseAdam(lr=1e-3)
    engram = Engram(cfg, LAYER, compressed_vocab_size=len(comp), table=table, optimizer=sparse)
    model = TinyLM(len(vocab_ids), seq_len, engram)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses: list[float] = []
    start = 0
    if not clean:
        extra = load_checkpoint(
            ckpt, model, opt, config=cfg, tokenizer_fingerprint=comp.fingerprint
        )
        start, losses = int(extra["step"]), list(extra["losses"])
        log(f"resumed from {ckpt} at step {start}")
    elif resume:
        log(f"no checkpoint in {out} to resume: starting from step 0 with a new table")
    log(
        f"{n} training and {len(data) - n} held-out windows of {seq_len + 1} tokens from {text} "
        f"({len(vocab_ids)} distinct "
        f"ids); Engram layer {LAYER}: a HostTable of {rows} x {cfg.head_dim} float32 "
        f"({table.nbytes / 1e6:.0f} MB) trained by {sparse}; unigram loss {unigram:.3f}"
    )
    held_tokens = torch.from_numpy(dense[n:])
    held_ids = torch.from_numpy(hashes[n:, :-1].astype(np.int64))

    def held_out() -> float:
        with torch.no_grad():
            return _loss(model, held_tokens, held_ids).item()

    bar = progress_bar(steps, "step", progress, "engram-rs train-demo", initial=start)
    for step in range(start, steps):
        pick = np.arange(step * batch, (step + 1) * batch) % n
        tokens = torch.from_numpy(dense[pick])
        ids = torch.from_numpy(hashes[pick, :-1].astype(np.int64))
        loss = _loss(model, tokens, ids)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # also applies SparseAdam to the touched rows of the host table
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {losses[-1]:.3f} (unigram {unigram:.3f})", refresh=False)
        done = step + 1
        if done % checkpoint_every == 0 or done == steps:
            log(
                f"step {done}: training loss {losses[-1]:.3f}, held-out loss {held_out():.3f} "
                f"(unigram {unigram:.3f})"
            )
            save_checkpoint(
                ckpt,
                model,
                opt,
                config=cfg,
                tokenizer_fingerprint=comp.fingerprint,
                extra={"step": done, "losses": losses},
            )
    if bar is not None:
        bar.close()
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump(losses, f)
    final = held_out()
    verdict = "below" if final < unigram else "NOT below"
    log(
        f"held-out loss {final:.3f} after {len(losses)} steps, {verdict} the unigram model's "
        f"{unigram:.3f} (before training: {math.log(len(vocab_ids)):.3f} for uniform guesses)"
    )
    return losses
