"""Atomic file writes: a uniquely named temporary file beside the target, renamed into place."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import IO


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Calls ``write(f)`` on a new temporary file in ``path``'s directory, syncs it and renames it
    over ``path``. On any error (a full disk, an exception in ``write``, Ctrl-C) the temporary
    file is removed and ``path`` is untouched; only a killed process can leave one behind, named
    ``.<name>.<random>.tmp`` next to ``path``.
    """
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{target}: the directory {directory!r} does not exist: create it first (os.makedirs)"
        )
    fd, tmp = _create_temporary(target, directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        fsync_path(directory)
    except OSError:  # pragma: no cover - the file is complete; only the rename's durability waits
        return


def _create_temporary(target: str, directory: str) -> tuple[int, str]:
    """A new file ``.<name>.<random>.tmp`` beside ``target``, created exclusively (never through a
    link) with mode 0o666 less the umask, as ``open()`` and numpy make files (``mkstemp`` makes
    them 0o600, so a shared checkpoint or manifest would not be readable by the group)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: could not create a temporary file beside {target}")


def fsync_path(path: str | os.PathLike[str]) -> None:
    """``fsync`` of a file or directory by its path (a directory: its entries, after renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
