"""Atomic file writes through the core's one atomic write (``engram_core::atomic``): a temporary
file ``.<name>.<random>.tmp`` beside the target, synced, renamed into place, the directory
synced."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO

from ._engram_rs import AtomicFile, fsync_path

__all__ = ["fsync_path", "write_atomically"]


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Calls ``write(f)`` on a new temporary file in ``path``'s directory (mode 0o666 less the
    umask, as ``open()`` and numpy make files), syncs it and renames it over ``path``. On any
    error (a full disk, an exception in ``write``, Ctrl-C) the temporary file is removed and
    ``path`` is untouched; only a killed process can leave one behind, named
    ``.<name>.<random>.tmp`` next to ``path``.
    """
    out = AtomicFile(os.fsdecode(path))
    try:
        with os.fdopen(os.dup(out.fileno()), "wb") as f:
            write(f)
        out.commit()
    except BaseException:
        out.discard()
        raise
