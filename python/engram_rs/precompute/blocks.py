"""A block of the inputs and its hashing, the same in both engines: the :class:`Block` a reader
yields, the boundary rule (where sequences start), and :func:`hash_block`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _engram_rs
from ..config import EngramConfig
from ..hashing import IndexDType, NgramHasher, cu_seqlens_of, locate

__all__ = [
    "Block",
    "Boundary",
    "hash_block",
    "resolve_config",
    "row_where",
    "segment",
    "token_where",
]


@dataclasses.dataclass
class Block:
    """Tokens of consecutive sequences (rows) or of the stream, read from one file.

    ``lengths``: each row's token count (rows inputs), None for a stream piece. ``cursor``:
    where the next block starts. ``where(i)``: the file and position of token ``i`` of this
    block, for error messages. ``units``: progress made (tokens, rows or bytes of the input).
    """

    tokens: np.ndarray
    lengths: np.ndarray | None
    cursor: dict[str, int]
    where: Callable[[int], str]
    units: int


def token_where(path: str, first: int) -> Callable[[int], str]:
    """``where`` of a stream block whose token 0 is token ``first`` of ``path``."""

    def where(k: int) -> str:
        return f"{path}, token {first + k}"

    return where


def row_where(path: str, lengths: np.ndarray, first_row: int) -> Callable[[int], str]:
    """``where`` of a block of rows of ``lengths`` tokens, the first row ``first_row``."""

    def where(k: int) -> str:
        r, col = locate(cu_seqlens_of(lengths), k)
        return f"{path}, row {first_row + r}, position {col}"

    return where


@dataclasses.dataclass(frozen=True)
class Boundary:
    """Where sequences start: each row of a rows input; in a stream, every ``seq_len`` tokens
    or after each ``eos_id``. ``dead_id``: a raw token id that marks blocked positions (SPEC
    8.3: image tokens of DeepSeek-V4.1-Flash), whatever the rule."""

    rule: str  # "rows", "seq_len" or "eos"
    seq_len: int | None = None
    eos_id: int | None = None
    dead_id: int | None = None

    @classmethod
    def make(
        cls,
        kind: str,
        seq_len: int | None,
        eos_id: int | None,
        what: str,
        dead_id: int | None = None,
    ) -> Boundary:
        if dead_id is not None and (
            isinstance(dead_id, bool) or not isinstance(dead_id, int) or dead_id < 0
        ):
            raise ValueError(f"dead_id must be a raw token id (an int >= 0), got {dead_id!r}")
        return dataclasses.replace(cls._rule(kind, seq_len, eos_id, what), dead_id=dead_id)

    @classmethod
    def _rule(cls, kind: str, seq_len: int | None, eos_id: int | None, what: str) -> Boundary:
        if seq_len is not None and eos_id is not None:
            raise ValueError("pass --seq-len or --eos-id, not both")
        if kind == "rows":
            if seq_len is not None or eos_id is not None:
                raise ValueError(
                    f"{what}: the rows of these inputs are the sequences; --seq-len and --eos-id "
                    "apply to flat token streams (.bin, 1-D .npy, text)"
                )
            return cls("rows")
        if seq_len is None and eos_id is None:
            raise ValueError(
                f"{what} is a flat token stream: say where sequences start with --seq-len T "
                "(windows of T tokens) or --eos-id ID (a sequence ends after each ID)"
            )
        if seq_len is not None:
            if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
                raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
            return cls("seq_len", seq_len=seq_len)
        if isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0:
            raise ValueError(f"eos_id must be an int >= 0, got {eos_id!r}")
        return cls("eos", eos_id=eos_id)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def segment(
    tokens: np.ndarray, n_ctx: int, start: int, boundary: Boundary
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sequence bounds of a stream piece with ``n_ctx`` tokens of left context in front.

    ``tokens[n_ctx:]`` are stream positions ``start, start + 1, ...``; the context is the
    ``n_ctx`` tokens just before (``n_ctx <= max_ngram_size - 1``). Returns ``(cu_seqlens`` over
    ``tokens``, the stream positions in ``[start, start + len)`` where a sequence starts``)``.
    """
    n = tokens.shape[0]
    first = start - n_ctx
    if boundary.rule == "seq_len":
        t = boundary.seq_len
        assert t is not None
        k0 = -(-first // t) * t  # first multiple of t at or after `first`
        starts = np.arange(k0, first + n, t, dtype=np.int64)
    else:
        assert boundary.rule == "eos"
        after = np.flatnonzero(tokens[:-1] == boundary.eos_id).astype(np.int64) + 1 + first
        starts = np.concatenate([[0] if first == 0 else [], after]).astype(np.int64)
    local = starts - first
    local = local[(local > 0) & (local < n)]
    cu = np.concatenate([[0], local, [n]]).astype(np.int64)
    new = starts[(starts >= start) & (starts < start + n - n_ctx)]
    return cu, new


def hash_block(
    hasher: NgramHasher,
    block: Block,
    ctx: np.ndarray,
    start: int,
    boundary: Boundary,
    layers: list[int],
    dtype: IndexDType,
    flat: bool,
) -> tuple[dict[int, np.ndarray], npt.NDArray[np.int64]]:
    """Hash ids of a block's tokens (``{layer: [len, cols]}``) and the stream positions where its
    sequences start. ``ctx``: the stream's tokens just before the block (streams only)."""
    tokens = block.tokens
    if block.lengths is not None:
        ids = tokens
        cu = cu_seqlens_of(block.lengths)
        new = cu[:-1] + start
        n_ctx = 0
    else:
        n_ctx = ctx.shape[0]
        # int64 context first: numpy promotes, so ids of a wider earlier file never wrap.
        ids = np.concatenate([ctx, tokens]) if n_ctx else tokens
        cu, new = segment(ids, n_ctx, start, boundary)
    try:
        out = hasher.hash_tokens(
            ids,
            layer_ids=layers,
            dtype=dtype,
            flat=flat,
            cu_seqlens=cu,
            dead_id=boundary.dead_id,
        )
    except _engram_rs.OutOfRangeError as e:
        k = e.flat_index - n_ctx  # the context was hashed (and checked) with the block before
        if k < 0:  # pragma: no cover - the context's ids passed the check with their block
            raise
        raise ValueError(
            f"{block.where(k)}: token id {int(tokens[k])} is outside the tokenizer's "
            f"vocabulary [0, {e.bound}): were these ids made with this tokenizer?"
        ) from None
    if n_ctx:
        out = {layer: a[n_ctx:] for layer, a in out.items()}
    return out, new


def resolve_config(config: EngramConfig | str | os.PathLike[str]) -> EngramConfig:
    """An :class:`EngramConfig` as given, a config JSON file or a preset name."""
    if isinstance(config, EngramConfig):
        return config
    name = os.fspath(config)
    if os.path.exists(name) or name.endswith(".json"):
        return EngramConfig.from_json(name)
    return EngramConfig.preset(name)
