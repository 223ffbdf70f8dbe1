"""The offline precompute: hash a whole tokenized corpus to memory-mapped index files.

Modules, from the inputs to a result read back:

* :mod:`.sources`: the input readers (``Source``: ``.npy``, ``.bin``, Parquet, Arrow IPC, JSONL,
  text), in bounded memory; the Ray engine calls the same readers on the bytes of whole files;
* :mod:`.blocks`: a block of the inputs, the boundary rule and ``hash_block``, shared by both
  engines;
* :mod:`.files`: the directory's file names, the .npy header, the output files and the writer
  thread;
* :mod:`.engine`: the contract between the job and an engine (``EngineRun``, ``Engine``);
* :mod:`.local_engine` and :mod:`.ray_engine`: the two engines (``HashBatches`` for your own
  Ray Data pipelines is in the latter);
* :mod:`.job`: ``precompute()``: ``DIR.partial`` (its marker, lock and never-followed files),
  the resume state, the input checksums, the manifest and the rename to ``DIR``;
* :mod:`.reader`: ``PrecomputedIndices`` and ``verify``.

``engram_rs.precompute`` as an attribute of the package is the function :func:`precompute`
(``import engram_rs as er; er.precompute(...)``): import a module of this package as
``from engram_rs.precompute import job``. ``engram_rs.offline`` and ``engram_rs.ray`` are
the former homes of these names and still export them.
"""

from __future__ import annotations

from .blocks import Block, Boundary, hash_block, segment
from .files import HEADER, MANIFEST, MARKER, layer_file
from .job import precompute
from .reader import PrecomputedIndices, verify
from .sources import FORMATS, Source

__all__ = [
    "FORMATS",
    "HEADER",
    "MANIFEST",
    "MARKER",
    "Block",
    "Boundary",
    "PrecomputedIndices",
    "Source",
    "hash_block",
    "layer_file",
    "precompute",
    "segment",
    "verify",
]
