"""The files of a precompute directory: their names, the fixed .npy header, the output files the
engines append to, and the writer thread of the local engine.

``DIR/manifest.json`` describes them all; ``DIR/layer_<id>.npy`` holds the ``[tokens, cols]``
hash ids of an Engram layer, ``DIR/tokens.npy`` the uint32 tokens, ``DIR/offsets.npy`` the int64
sequence starts (cu_seqlens). Every .npy file starts with a header of exactly :data:`HEADER`
bytes, rewritten with the final shape when the run is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _engram_rs
from ..atomic import write_atomically

__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "MANIFEST",
    "MARKER",
    "STATE",
    "OutFile",
    "Writer",
    "fd_path",
    "file_kind",
    "json_kind",
    "layer_file",
    "npy_header",
    "output_arrays",
    "output_files",
    "write_all",
    "write_json",
]

MANIFEST = "manifest.json"
STATE = "state.json"
#: Written in ``DIR.partial`` when the precompute creates it (and so also in the finished
#: ``DIR``): only a directory holding it is ever removed or replaced by a run.
MARKER = ".engram_rs-precompute"
FORMAT_VERSION = 1
#: Bytes of the fixed .npy header of every output file (rewritten with the shape at the end).
HEADER = 128


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded to exactly HEADER bytes."""
    text = f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body = text.encode("latin1")
    pad = HEADER - 10 - len(body) - 1
    if pad < 0:  # pragma: no cover - shapes have at most 2 dims of < 2**64
        raise ValueError(f"npy header too long for {shape}")
    return b"\x93NUMPY\x01\x00" + (HEADER - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


@dataclasses.dataclass
class OutFile:
    """One output file of the job: appended in order, checksummed as it is prepared, its header
    rewritten with the final shape by :meth:`finish`."""

    name: str
    dtype: np.dtype[Any]
    cols: int | None  # None: 1-D
    fd: int = -1
    bytes: int = 0  # data bytes written (after the header)
    checksum: Any = None

    def shape(self) -> tuple[int, ...]:
        n = self.bytes // (self.dtype.itemsize * (self.cols or 1))
        return (n,) if self.cols is None else (n, self.cols)

    def open(self, fd: int, directory: str, resume_bytes: int | None) -> None:
        """Takes ``fd``, this file in the job's ``directory`` opened read-write: a new file
        gets its header; a resumed one (the job checked it is its own) is cut to the committed
        bytes, which the checksum reads again."""
        path = os.path.join(directory, self.name)
        self.fd = fd
        self.checksum = _engram_rs.Checksum()
        if resume_bytes is None:
            write_all(self.fd, npy_header(self.dtype, self.shape()), path)
            self.bytes = 0
        else:
            os.ftruncate(self.fd, HEADER + resume_bytes)
            self.checksum.update_from_file(fd_path(self.fd, path), HEADER, resume_bytes)
            self.bytes = resume_bytes
        os.lseek(self.fd, HEADER + self.bytes, os.SEEK_SET)

    def prepare(self, arr: np.ndarray) -> np.ndarray:
        """The bytes to append for ``arr``, added to the checksum (in file order: one thread
        prepares, in order)."""
        data = np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1).view(np.uint8)
        self.checksum.update(data)
        return data

    def write(self, data: np.ndarray, directory: str) -> None:
        """Appends prepared bytes and starts their writeback (the final fsync then has little
        left to do)."""
        write_all(self.fd, data.data, os.path.join(directory, self.name))
        if data.nbytes >= 1 << 20:
            _engram_rs.start_writeback(self.fd, HEADER + self.bytes, data.nbytes)
        self.bytes += data.nbytes

    def append(self, arr: np.ndarray, directory: str) -> None:
        self.write(self.prepare(arr), directory)

    def finish(self) -> None:
        os.pwrite(self.fd, npy_header(self.dtype, self.shape()), 0)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_all(fd: int, data: bytes | memoryview, path: str) -> None:
    view = memoryview(data)
    while view.nbytes:
        try:
            n = os.write(fd, view)
        except OSError as e:
            raise OSError(
                e.errno,
                f"{path}: cannot write {view.nbytes} more bytes ({e.strerror}): free space on that "
                "disk or choose another --out, then run again with --resume",
            ) from None
        view = view[n:]


class Writer:
    """Appends prepared chunks to the output files on its own thread (os.write releases the
    GIL), one chunk behind the hashing; commits (fsync, then state.json) every
    ``commit_seconds``. ``written(cursor)``, when given, is called on that thread once a chunk
    is written, with the input cursor after it (the job checksums the inputs up to there)."""

    def __init__(
        self,
        directory: str,
        files: dict[str, OutFile],
        commit_seconds: float,
        written: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.directory = directory
        self.files = files
        self.written = written
        self.commit_seconds = commit_seconds
        self.queue: queue.Queue[tuple[dict[str, np.ndarray], dict[str, Any]] | None] = queue.Queue(
            maxsize=1
        )
        self.error: BaseException | None = None
        self.last_commit = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="engram_rs-writer", daemon=True)
        self.thread.start()

    def put(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        while True:
            self._raise()
            try:
                self.queue.put((arrays, state), timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                arrays, state = item
                for name, data in arrays.items():
                    self.files[name].write(data, self.directory)
                if self.written is not None:  # the bytes just read, from the page cache
                    self.written(state["cursor"])
                if time.monotonic() - self.last_commit >= self.commit_seconds:
                    self.commit(state)
        except BaseException as e:
            self.error = e
            while True:  # let put() see the error instead of blocking
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def commit(self, state: dict[str, Any]) -> None:
        for f in self.files.values():
            os.fsync(f.fd)
        state = dict(state, bytes={name: f.bytes for name, f in self.files.items()})
        write_json(os.path.join(self.directory, STATE), state)
        self.last_commit = time.monotonic()

    def close(self) -> None:
        """Waits for the writes in flight; raises the writer's error if it had one."""
        if self.thread.is_alive():
            while self.error is None:
                try:
                    self.queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self.thread.join()
        self._raise()


def write_json(path: str, data: dict[str, Any]) -> None:
    """Writes ``data`` to ``path`` atomically (``state.json``, the manifest)."""
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    write_atomically(path, lambda f: f.write(text))


def layer_file(layer: int) -> str:
    """The file of one Engram layer's hash ids in a precompute directory."""
    return f"layer_{layer}.npy"


def output_files(layers: list[int], index_dtype: str, cols: int) -> dict[str, OutFile]:
    """The output files of a job over ``layers``, by name, not yet open."""
    dt = np.dtype(index_dtype)
    files = {layer_file(x): OutFile(layer_file(x), dt, cols) for x in layers}
    files["tokens.npy"] = OutFile("tokens.npy", np.dtype(np.uint32), None)
    files["offsets.npy"] = OutFile("offsets.npy", np.dtype(np.int64), None)
    return files


def output_arrays(
    out: dict[int, np.ndarray], tokens: np.ndarray, starts: np.ndarray, layers: list[int]
) -> dict[str, np.ndarray]:
    """What one hashed block appends to each output file (both engines append these)."""
    arrays = {layer_file(x): out[x] for x in layers}
    arrays["tokens.npy"] = tokens
    arrays["offsets.npy"] = starts
    return arrays


def fd_path(fd: int, path: str) -> str:
    """A name of the file open as ``fd`` that reaches that very file (``/proc/self/fd``), so a
    path swapped meanwhile is never read; ``path`` where there is no such name."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else path


def file_kind(mode: int) -> str:
    """What a file of ``mode`` is, for messages: "a directory", "a FIFO", ..."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def json_kind(value: object) -> str:
    """What a JSON value is, for messages: "a list", "null", ..."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"
