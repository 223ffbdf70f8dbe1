"""Row counts of a precompute (``--row-counts``): how often each row of each layer's flat table
is looked up, in ``DIR/row_counts_<id>.npy``.

Representation: exact counts, one uint32 per row of the layer's flat table (the global row
``hash id + offset of its column``, as the table is gathered), ``[table_rows]``, saturating at
2**32 - 1 (the manifest counts saturated increments). Exact counts fit: DeepSeek-V4.1-Flash's
largest layer has 384 M rows, 1.5 GB of counters, counted one layer at a time; a top-K sketch
would lose exactly the long tail whose size the statistics measure. The file is written sparse:
blocks of the counts that are all zero are not written (holes), so a small corpus leaves most
of a 1.5 GB file off the disk. The n-gram orders need no file of their own: the columns of one
order are contiguous, and so are their rows in the flat table (:func:`order_rows`).

When: the counts are made from the finished index files in ``DIR.partial``, after the last
block and before the manifest is written, one layer at a time (the core's ``count_rows``, one
pass of increments: 61 M random lookups/s into 384 M rows on the 2-vCPU test VM, 16x
``numpy.add.at`` and 9x ``numpy.bincount`` of the same rows). So they are exact for a resumed run
(its files are cut to the committed bytes and hold each token once) and for the Ray engine (the
driver wrote the same files), at the cost of one more read of the index files, mostly from the
page cache. A run killed while counting leaves ``DIR.partial`` without a manifest; its
``--resume`` recounts from the start, so no count file is ever claimed complete half-written.
The counts are written with ``pwrite`` (a full disk is an ``OSError``, not the ``SIGBUS`` of a
mapping), synced before the manifest names them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import _engram_rs
from ..hashing import NgramHasher
from .files import HEADER, fd_path, npy_header, write_all

__all__ = [
    "COUNT_DTYPE",
    "ColumnLayout",
    "count_all",
    "count_file",
    "count_layer",
    "order_rows",
    "write_counts",
]

#: The dtype of the counters.
COUNT_DTYPE = np.dtype("<u4")
#: Tokens of a layer's ids counted per call (bounds the memory of a view of a mapped file).
_CHUNK_TOKENS = 1 << 20
#: Counters per sparse block: a block of zeros is left as a hole.
_BLOCK = 1 << 18


def count_file(layer: int) -> str:
    """The file of one layer's row counts in a precompute directory."""
    return f"row_counts_{layer}.npy"


class ColumnLayout:
    """Where the ids of each column of a layer land in its flat table: ``add`` (the column's
    offset, 0 for ``flat`` ids), the rows ``[lo, hi)`` of its head, the table's ``rows`` and the
    first column of each n-gram order (``groups``, ending with ``cols``)."""

    def __init__(self, hasher: NgramHasher, layer: int, flat: bool) -> None:
        offsets = [int(x) for x in hasher.offsets[layer]]
        sizes = [int(p) for order in hasher.primes[layer] for p in order]
        self.lo = offsets
        self.hi = [a + p for a, p in zip(offsets, sizes, strict=True)]
        self.add = [0] * len(offsets) if flat else offsets
        self.rows = int(hasher.table_rows[layer])
        heads = hasher.config.n_head_per_ngram
        self.groups = list(range(0, len(offsets) + 1, heads))
        self.orders = list(range(2, hasher.config.max_ngram_size + 1))


def order_rows(lay: ColumnLayout, order: int) -> tuple[int, int]:
    """The rows ``[start, end)`` of the flat table that order ``order``'s heads own."""
    g = lay.orders.index(order)
    return lay.lo[lay.groups[g]], lay.hi[lay.groups[g + 1] - 1]


def count_layer(ids: np.ndarray, lay: ColumnLayout) -> tuple[np.ndarray, int]:
    """``(counts, saturated)``: lookups per row of the layer's flat table over the
    ``[tokens, cols]`` ids (a mapped file is read ``_CHUNK_TOKENS`` tokens at a time)."""
    counts = np.zeros(lay.rows, COUNT_DTYPE)  # pages untouched by any lookup stay unallocated
    saturated = 0
    for a in range(0, ids.shape[0], _CHUNK_TOKENS):
        part = np.ascontiguousarray(ids[a : a + _CHUNK_TOKENS])
        saturated += _engram_rs.count_rows(part, lay.add, lay.lo, lay.hi, counts)
    return counts, saturated


def write_counts(fd: int, path: str, counts: np.ndarray) -> str:
    """Writes ``counts`` as a .npy file (the precompute's fixed header) to the new, empty file
    open as ``fd``: the non-zero blocks only (the rest stays a hole), synced. Returns its
    checksum (XXH3-128 of the data bytes, holes included)."""
    write_all(fd, npy_header(COUNT_DTYPE, counts.shape), path)
    data = counts.view(np.uint8)
    block = _BLOCK * COUNT_DTYPE.itemsize
    checksum = _engram_rs.Checksum()
    for a in range(0, data.shape[0], block):
        piece = data[a : a + block]
        checksum.update(piece)
        if piece.any():
            os.lseek(fd, HEADER + a, os.SEEK_SET)
            write_all(fd, piece.data, path)
    os.ftruncate(fd, HEADER + data.shape[0])
    os.fsync(fd)
    return str(checksum.hexdigest())


def count_all(
    hasher: NgramHasher,
    layers: list[int],
    flat: bool,
    index_dtype: str,
    tokens: int,
    layer_fds: dict[int, int],
    directory: str,
    open_new: Any,
) -> dict[str, Any]:
    """Counts every layer from its finished index file (open as ``layer_fds[layer]``) and
    writes ``row_counts_<id>.npy`` through ``open_new(name)`` (a new file's descriptor in the
    job's directory); returns the manifest's ``row_counts`` entry."""
    entries: dict[str, Any] = {}
    for layer in layers:
        lay = ColumnLayout(hasher, layer, flat)
        fd = layer_fds[layer]
        cols = len(lay.add)
        dtype = np.dtype(index_dtype)
        ids: np.ndarray
        if tokens:
            src = fd_path(fd, os.path.join(directory, f"layer_{layer}.npy"))
            ids = np.memmap(src, dtype=dtype, mode="r", offset=HEADER, shape=(tokens, cols))
        else:
            ids = np.zeros((0, cols), dtype)
        counts, saturated = count_layer(ids, lay)
        del ids
        name = count_file(layer)
        out = open_new(name)
        try:
            checksum = write_counts(out, os.path.join(directory, name), counts)
        finally:
            os.close(out)
        entries[str(layer)] = {
            "file": name,
            "rows": lay.rows,
            "dtype": "uint32",
            "lookups": tokens * cols,
            "distinct_rows": int(np.count_nonzero(counts)),
            "saturated_increments": int(saturated),
            "checksum": checksum,
            "orders": {str(n): list(order_rows(lay, n)) for n in lay.orders},
        }
    return entries
