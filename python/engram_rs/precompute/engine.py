"""The contract between the precompute job and its engines.

The job (:mod:`.job`) checks the arguments, reads the inputs' description, makes and locks
``DIR.partial``, opens the output files and hands an :class:`EngineRun` to an engine. The engine
hashes every block of the inputs (:func:`.blocks.hash_block`, reading them with the readers of
:mod:`.sources`) and appends the results in input order to the open files
(:func:`.files.output_arrays`); it returns the :data:`Counts`. The job then finalizes: the
manifest, the input checksums, the rename to ``DIR``. Two engines implement :class:`Engine`:
:mod:`.local_engine` (this process, resumable) and :mod:`.ray_engine` (Ray Data actors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from ..hashing import NgramHasher
from ..progress import progress_bar
from .blocks import Boundary
from .files import OutFile
from .sources import Source

__all__ = ["Counts", "Engine", "EngineRun"]

#: What an engine returns: ``{"tokens": ..., "sequences": ...}`` it appended.
Counts = dict[str, int]


@dataclasses.dataclass
class EngineRun:
    """What an engine needs to run a precompute job: the inputs, the hasher, the boundary
    rule, the job's description, the open output files in ``partial`` and its options.

    ``state``: the checked resume state of an interrupted run (None: from the start).
    ``written(cursor)``: to call once the results of the inputs up to ``cursor`` are written (the
    job checksums the inputs as they are read). ``summed(i, checksum)``: an engine that reads
    the inputs elsewhere (in Ray tasks) hands in the checksum of input ``i``
    (:class:`engram_rs._engram_rs.Checksum` of its bytes) instead; an input neither reports is
    summed whole at the end.
    """

    source: Source
    hasher: NgramHasher
    boundary: Boundary
    job: dict[str, Any]
    files: dict[str, OutFile]
    partial: str
    progress: bool | None
    chunk_tokens: int
    state: dict[str, Any] | None = None
    commit_seconds: float = 30.0
    written: Callable[[dict[str, int]], None] | None = None
    summed: Callable[[int, str], None] | None = None

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.job["layers"]]

    def progress_bar(self) -> Any:
        """The run's progress bar over the inputs' units (None without one)."""
        return progress_bar(
            sum(self.source.totals),
            self.source.unit,
            self.progress,
            "engram_rs precompute",
            unit_scale=True,
        )


class Engine(Protocol):
    """An engine: a module with these two functions."""

    def check(self) -> None:
        """Raises (an ImportError naming what to install) when the engine cannot run here;
        called before any file is made."""

    def run(self, run: EngineRun) -> Counts:
        """Hashes ``run.source`` and appends the results in input order to ``run.files``."""
