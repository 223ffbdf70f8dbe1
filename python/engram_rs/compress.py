"""Tokenizer compression (SPEC section 1): raw token ids -> compressed ids, built in Rust."""

from __future__ import annotations

import hashlib
import os
import zipfile
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _engram_rs
from .atomic import write_atomically

__all__ = ["CompressedTokenizer", "normalize"]

#: Version of the file layout written by ``CompressedTokenizer.save`` (2: with a checksum).
_FORMAT = 2


def _checksum(table: np.ndarray, num_compressed: int) -> str:
    """SHA-256 of the table (little-endian int64) and the compressed vocabulary size."""
    digest = hashlib.sha256(np.ascontiguousarray(table, dtype="<i8").tobytes())
    digest.update(int(num_compressed).to_bytes(8, "little"))
    return digest.hexdigest()


#: The most raw ids a saved table may hold (1 GiB of int64; real vocabularies have < 2**21).
_MAX_VOCAB = 2**27
#: The most bytes a saved string (fingerprint, checksum) may take.
_MAX_TEXT = 1 << 16


class _Corrupt(ValueError):
    """A member of a saved table that is missing or not what ``save()`` writes."""


def _member(z: zipfile.ZipFile, key: str, kind: str, archive_bytes: int) -> np.ndarray:
    """Reads member ``key`` of a saved table after checking what it declares: the zip entry's
    uncompressed size and the .npy header's dtype and shape, before anything is inflated or
    allocated. ``kind``: "int" (an int64 scalar), "text" (a str scalar), "table" (1-D int64)."""
    name = f"{key}.npy"
    try:
        info = z.getinfo(name)
    except KeyError:
        raise _Corrupt(f"it has no member {name!r}") from None
    declared = info.file_size
    # save() stores members uncompressed; a deflated one cannot inflate beyond ~1032:1.
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else 1032
    limit = {"int": 1 << 12, "text": _MAX_TEXT, "table": 8 * _MAX_VOCAB + (1 << 16)}[kind]
    if declared > limit or declared > ratio * max(info.compress_size, 1) + 1024:
        raise _Corrupt(
            f"its member {name!r} declares {declared} uncompressed bytes from "
            f"{info.compress_size} stored (the file has {archive_bytes}); a {kind} member of a "
            f"saved table holds at most {limit}"
        )
    with z.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version}")
        except ValueError as e:
            raise _Corrupt(f"its member {name!r} has no valid .npy header ({e})") from None
        header = f.tell()
        if kind == "text":
            ok = dtype.kind == "U" and shape == () and dtype.itemsize <= _MAX_TEXT
        elif kind == "int":
            ok = dtype == np.dtype("<i8") and shape == ()
        else:
            ok = (
                dtype == np.dtype("<i8")
                and len(shape) == 1
                and 0 <= shape[0] <= _MAX_VOCAB
                and not fortran
            )
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        if not ok or header + nbytes != declared:
            raise _Corrupt(
                f"its member {name!r} declares a {dtype} array of shape {shape} "
                f"({nbytes} bytes after a {header}-byte header, {declared} in the zip entry); "
                f"save() writes {'a str scalar' if kind == 'text' else 'int64'}"
                f"{' [vocab_size], at most ' + str(_MAX_VOCAB) if kind == 'table' else ''}"
            )
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise _Corrupt(f"its member {name!r} is truncated ({len(data)} of {nbytes} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _describe(head: bytes) -> str:
    """What a file that is not an .npz archive looks like, from its first bytes."""
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array, not the .npz archive that save() writes"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text (a tokenizer.json? build the table with CompressedTokenizer.from_file)"
    return f"not a .npz archive (it starts with {head[:8]!r})"


def normalize(text: str) -> str:
    """The SPEC normalizer: NFKC, NFD, no marks, lowercase, collapsed and stripped whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _engram_rs.normalize(text)


def _tokenizer_json(tokenizer: Any) -> str:
    """The ``tokenizer.json`` text of a tokenizers.Tokenizer or a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    to_str = getattr(backend, "to_str", None)
    if not callable(to_str):
        raise TypeError(
            f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got "
            f"{type(tokenizer).__name__}: for a slow tokenizer, load the fast one "
            "(use_fast=True) or pass its tokenizer.json to CompressedTokenizer.from_file"
        )
    json = to_str()
    if not isinstance(json, str):
        raise TypeError(f"{type(backend).__name__}.to_str() returned {type(json).__name__}")
    return json


def _path(path: Any, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _fingerprint(tokenizer: Any) -> str:
    """Fingerprint of a tokenizer given as a tokenizer.json path or a tokenizer object."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return _engram_rs.fingerprint_file(os.fspath(tokenizer))
    return _engram_rs.fingerprint_json(_tokenizer_json(tokenizer))


class CompressedTokenizer:
    """The raw -> compressed id table of one tokenizer (Engram's vocabulary projection).

    Build it with ``from_file`` or ``from_tokenizer``; ``comp(ids)`` maps raw ids.
    """

    def __init__(self, lookup_table: npt.ArrayLike, num_compressed: int, fingerprint: str) -> None:
        table = np.array(lookup_table, dtype=np.int64, copy=True)
        if table.ndim != 1 or table.size == 0:
            raise ValueError(f"lookup_table must be a non-empty 1-D array, got shape {table.shape}")
        if isinstance(num_compressed, bool) or not isinstance(num_compressed, int):
            raise TypeError(f"num_compressed must be an int, got {num_compressed!r}")
        bad = (table < 0) | (table >= num_compressed)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"lookup_table[{i}] = {int(table[i])} is outside the compressed vocabulary "
                f"[0, {num_compressed})"
            )
        table.flags.writeable = False
        self._table = table
        self._num_compressed = num_compressed
        self.fingerprint = str(fingerprint)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CompressedTokenizer:
        """Builds the table of an HF ``tokenizer.json`` (in parallel, the GIL released)."""
        table, size, fingerprint = _engram_rs.compress_file(_path(path, "path"))
        return cls(table, size, fingerprint)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> CompressedTokenizer:
        """Builds the table of a ``tokenizers.Tokenizer`` or a transformers fast tokenizer."""
        table, size, fingerprint = _engram_rs.compress_json(_tokenizer_json(tokenizer))
        return cls(table, size, fingerprint)

    @property
    def lookup_table(self) -> np.ndarray:
        """Read-only int64 ``[vocab_size]``: raw id -> compressed id."""
        return self._table

    @property
    def vocab_size(self) -> int:
        """Number of raw ids, added and special tokens included."""
        return int(self._table.size)

    def __len__(self) -> int:
        """The compressed vocabulary size."""
        return self._num_compressed

    def __repr__(self) -> str:
        return (
            f"CompressedTokenizer(vocab_size={self.vocab_size}, compressed={len(self)}, "
            f"fingerprint={self.fingerprint!r})"
        )

    def __call__(self, ids: npt.ArrayLike) -> np.ndarray:
        """Maps raw ids (any shape) to compressed ids, int64; negative ids pass through."""
        arr = np.asarray(ids)
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)  # numpy's dtype for [] is float64
        if arr.dtype.kind not in "iu":
            raise TypeError(
                f"ids must be integers, got dtype {arr.dtype}: convert with ids.astype(numpy.int64)"
            )
        vocab = self.vocab_size
        bad = arr >= vocab
        if bad.any():
            pos = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), arr.shape))
            raise IndexError(
                f"token id {int(arr[pos])} at position {pos} is out of range [0, {vocab}) of "
                "this tokenizer's vocabulary: ids must come from the tokenizer the table was "
                "built from"
            )
        mapped: np.ndarray = self._table[np.clip(arr, 0, None)]
        if arr.dtype.kind == "i":
            mapped = np.where(arr < 0, arr.astype(np.int64), mapped)
        return mapped

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the table, its checksum and its tokenizer's fingerprint atomically."""
        target = _path(path, "path")

        def write(f: Any) -> None:
            np.savez(
                f,
                format=np.int64(_FORMAT),
                lookup_table=self._table,
                num_compressed=np.int64(self._num_compressed),
                fingerprint=np.str_(self.fingerprint),
                checksum=np.str_(_checksum(self._table, self._num_compressed)),
            )

        write_atomically(target, write)

    @classmethod
    def load(cls, path: str | os.PathLike[str], tokenizer: Any = None) -> CompressedTokenizer:
        """Reads a table written by ``save``; its checksum is always verified.

        ``tokenizer`` (a tokenizer.json path or a tokenizer object), when given, must be the
        tokenizer the table was built from: its fingerprint is checked.
        """
        source = _path(path, "path")
        if not os.path.exists(source):
            raise FileNotFoundError(f"{source}: no such file: pass the path given to save()")
        rebuild = "build it again with from_file or from_tokenizer and save it"
        with open(source, "rb") as f:
            head = f.read(16)
        if not head.startswith(b"PK\x03\x04"):
            raise ValueError(
                f"{source} is not a table written by CompressedTokenizer.save: it is "
                f"{_describe(head)}"
            )
        try:
            # Each member's declared size, dtype and shape are checked before it is inflated:
            # a small file claiming gigabytes is refused without allocating them.
            with zipfile.ZipFile(source) as z:
                size = os.path.getsize(source)
                fmt = int(_member(z, "format", "int", size)[()])
                if fmt != _FORMAT:
                    raise ValueError(
                        f"format version {fmt}, this engram_rs reads {_FORMAT} (tables without "
                        "a checksum are no longer read)"
                    )
                table = _member(z, "lookup_table", "table", size).astype(np.int64)
                num = int(_member(z, "num_compressed", "int", size)[()])
                stored = str(_member(z, "checksum", "text", size)[()])
                fingerprint = str(_member(z, "fingerprint", "text", size)[()])
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(
                f"{source} is not a table written by CompressedTokenizer.save ({e}): {rebuild}"
            ) from None
        if table.dtype != np.int64 or table.ndim != 1 or _checksum(table, num) != stored:
            raise ValueError(
                f"{source} is corrupt: its lookup table does not match the checksum stored with "
                f"it (the file was changed after save()): {rebuild}"
            )
        comp = cls(table, num, fingerprint)
        if tokenizer is not None:
            expected = _fingerprint(tokenizer)
            if expected != comp.fingerprint:
                raise ValueError(
                    f"{source} was built from a different tokenizer (its fingerprint "
                    f"{comp.fingerprint}, this tokenizer's {expected}): build the table from "
                    "this tokenizer with from_file or from_tokenizer and save it again"
                )
        return comp
