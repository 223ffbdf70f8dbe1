"""The offline precompute's former module: its names now live in :mod:`engram_rs.precompute`
(``precompute``, ``PrecomputedIndices``, ``verify``, the boundary rule and ``hash_block``)."""

from __future__ import annotations

from .precompute import (
    HEADER,
    MANIFEST,
    MARKER,
    Block,
    Boundary,
    PrecomputedIndices,
    hash_block,
    layer_file,
    precompute,
    segment,
    verify,
)

__all__ = [
    "HEADER",
    "MANIFEST",
    "MARKER",
    "Block",
    "Boundary",
    "PrecomputedIndices",
    "hash_block",
    "layer_file",
    "precompute",
    "segment",
    "verify",
]
