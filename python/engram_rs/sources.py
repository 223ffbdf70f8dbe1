"""The precompute's input readers, now in :mod:`engram_rs.precompute.sources` (``Block`` in
:mod:`engram_rs.precompute.blocks`)."""

from __future__ import annotations

from .precompute.blocks import Block
from .precompute.sources import FORMATS, Source, detect_format, max_line_bytes

__all__ = ["FORMATS", "Block", "Source", "detect_format", "max_line_bytes"]
