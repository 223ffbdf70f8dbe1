"""On-the-fly hashing for training: hash raw token ids in the DataLoader workers.

The alternative to reading an offline precompute (:mod:`engram_rs.offline`): the hash ids
are computed from the raw ids of each batch, with the same result as reading them back.

* :class:`HashCollate` (or ``torch_collate(hasher, ...)``) is a ``collate_fn``: a list of
  samples in, a right-padded batch with its hash ids out.
* :class:`HashedTokens` wraps an iterable of samples as an ``IterableDataset`` that yields
  ``(input_ids, {layer_id: hash_ids})`` per sample, like a ``PrecomputedIndices`` item.

Workers: an :class:`~engram_rs.NgramHasher` pickles (spawn/forkserver workers rebuild it);
forked workers (the Linux default) inherit it, and the kernels build their own thread pool in a
forked child (the parent's threads do not survive a fork).
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import _engram_rs
from .hashing import HashIds, IndexDType, Layers, NgramHasher, cu_seqlens_of, locate

__all__ = ["HashCollate", "HashedTokens", "torch_collate"]


def _has_torch() -> bool:
    """Whether torch can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except ValueError:  # sys.modules["torch"] is None or has no spec
        return sys.modules.get("torch") is not None


def _check_hasher(hasher: Any) -> NgramHasher:
    if not isinstance(hasher, NgramHasher):
        raise TypeError(f"hasher must be an NgramHasher, got {type(hasher).__name__}")
    if hasher.vocab_size is None:
        raise ValueError(
            "the hasher has no lookup table for raw token ids: build it with "
            "NgramHasher.from_tokenizer(config, comp)"
        )
    return hasher


def _check_dtype(dtype: IndexDType) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise ValueError(f"dtype must be 'int32' or 'int64', got {dtype!r}")
    assert dt is not None
    return dt


def _sample_ids(sample: Any, i: int) -> np.ndarray:
    """The 1-D integer token ids of one sample (a sequence, an array, a tensor, or a dict)."""
    if isinstance(sample, Mapping):
        if "input_ids" not in sample:
            raise ValueError(
                f"sample {i} is a mapping without an 'input_ids' key (keys: {sorted(sample)})"
            )
        sample = sample["input_ids"]
    try:
        arr = np.asarray(sample)
    except ValueError as e:
        raise ValueError(f"sample {i} is not a 1-D sequence of token ids: {e}") from None
    if arr.ndim != 1:
        raise ValueError(
            f"sample {i} has shape {arr.shape}: each sample must be a 1-D sequence of token ids "
            "(pass the rows of a [B, T] batch as separate samples)"
        )
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"sample {i} holds {arr.dtype} values, not token ids: token ids must be integers"
        )
    return arr


def _hash_samples(
    hasher: NgramHasher,
    samples: Sequence[Any],
    layers: list[int],
    dtype: np.dtype[Any],
    flat: bool,
    dead_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, HashIds]:
    """Packs the samples and hashes them in one call: ``(ids, cu_seqlens, {layer: [n, cols]})``;
    ``dead_id`` marks blocked positions (SPEC 8.3)."""
    arrays = [_sample_ids(s, i) for i, s in enumerate(samples)]
    cu = cu_seqlens_of([a.shape[0] for a in arrays])
    ids = np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64)
    try:
        out = hasher.hash_tokens(
            ids, layer_ids=layers, dtype=dtype, flat=flat, cu_seqlens=cu, dead_id=dead_id
        )
    except _engram_rs.OutOfRangeError as e:
        # The core's position is in the flat ids: map it to its sample. (uint64 ids of 2**63 and
        # above became negative int64, which the core refuses too: show the sample's value.)
        b, pos = locate(cu, e.flat_index)
        raise ValueError(
            f"sample {b}, position {pos}: token id {int(arrays[b][pos])} is outside the "
            f"tokenizer's vocabulary [0, {e.bound}): were these ids made with this tokenizer?"
        ) from None
    return ids, cu, out


class HashCollate:
    """A ``collate_fn`` that hashes raw token ids: the on-the-fly alternative to a precompute.

    Called on a list of samples (each a 1-D sequence of raw token ids: a list, a numpy array, a
    torch tensor, or a mapping with an ``"input_ids"`` key, as HF datasets give; other keys
    are dropped), it returns a dict of:

    * ``"input_ids"``: ``[B, T]`` int64, right-padded with ``pad_token_id`` (``T``: the longest
      sample),
    * ``"attention_mask"``: ``[B, T]`` int64, 1 on the sample's tokens, 0 on the padding,
    * ``"hash_ids"``: ``{layer_id: [B, T, cols]}`` of ``dtype``; row ``b``'s first ``len_b``
      positions are ``hasher.hash_tokens(sample_b, ...)[layer_id]`` (what a precompute of
      ``sample_b`` as one sequence holds), the padded positions 0.

    All samples are hashed in one kernel call. ``return_tensors="pt"`` gives torch tensors
    (torch is imported on the first call), ``"np"`` numpy arrays. ``hasher`` must come from
    ``NgramHasher.from_tokenizer``; ``layer_ids`` (default: all), ``dtype``, ``flat`` and
    ``dead_id`` (a raw token id that marks blocked positions, image tokens in
    DeepSeek-V4.1-Flash) are those of ``hash_tokens``. Picklable, so it works with any
    DataLoader start method.
    """

    def __init__(
        self,
        hasher: NgramHasher,
        layer_ids: Layers = None,
        dtype: IndexDType = "int32",
        flat: bool = False,
        pad_token_id: int = 0,
        return_tensors: str = "pt",
        dead_id: int | None = None,
    ) -> None:
        self.hasher = _check_hasher(hasher)
        self.layer_ids = hasher.check_layers(layer_ids)
        self.dtype = _check_dtype(dtype)
        self.flat = bool(flat)
        self.dead_id = dead_id
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
        if not -(2**63) <= pad_token_id < 2**63:
            raise ValueError(f"pad_token_id must fit in int64, got {pad_token_id}")
        self.pad_token_id = pad_token_id
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if return_tensors == "pt" and not _has_torch():
            raise ImportError(
                "return_tensors='pt' needs torch: install it, or pass return_tensors='np'"
            )
        self.return_tensors = return_tensors

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        samples = list(samples)
        ids, cu, out = _hash_samples(
            self.hasher, samples, self.layer_ids, self.dtype, self.flat, self.dead_id
        )
        lengths = np.diff(cu)
        batch = len(samples)
        width = int(lengths.max()) if batch else 0
        cols = self.hasher.cols
        if batch and (lengths == width).all():  # all the same length: reshape, no copies
            input_ids = ids.reshape(batch, width)
            mask = np.ones((batch, width), np.int64)
            hash_ids = {x: a.reshape(batch, width, cols) for x, a in out.items()}
        else:
            input_ids = np.full((batch, width), self.pad_token_id, np.int64)
            mask = np.zeros((batch, width), np.int64)
            hash_ids = {x: np.zeros((batch, width, cols), self.dtype) for x in out}
            for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
                n = e - s
                input_ids[b, :n] = ids[s:e]
                mask[b, :n] = 1
                for x, a in out.items():
                    hash_ids[x][b, :n] = a[s:e]
        if self.return_tensors == "np":
            return {"input_ids": input_ids, "attention_mask": mask, "hash_ids": hash_ids}
        import torch

        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "hash_ids": {x: torch.from_numpy(a) for x, a in hash_ids.items()},
        }

    def __repr__(self) -> str:
        return (
            f"HashCollate(layer_ids={self.layer_ids}, dtype={self.dtype.name}, flat={self.flat}, "
            f"pad_token_id={self.pad_token_id}, return_tensors={self.return_tensors!r}, "
            f"dead_id={self.dead_id})"
        )


def torch_collate(hasher: NgramHasher, **kwargs: Any) -> HashCollate:
    """``HashCollate(hasher, **kwargs)``: a DataLoader ``collate_fn`` that hashes raw ids."""
    return HashCollate(hasher, **kwargs)


_torch_class: type[HashedTokens] | None = None


def _torch_hashed_tokens() -> type[HashedTokens] | None:
    """HashedTokens with torch's IterableDataset as a base too; None without torch."""
    global _torch_class
    if _torch_class is None:
        try:
            from torch.utils.data import IterableDataset
        except ImportError:
            return None
        _torch_class = type("HashedTokens", (HashedTokens, IterableDataset), {})
    return _torch_class


class HashedTokens:
    """Hashes an iterable of samples on the fly: yields ``(input_ids, {layer_id: hash_ids})``.

    Per sample, as a ``PrecomputedIndices`` item: ``input_ids`` the sample's ``[len]`` int64
    ids, ``hash_ids[layer_id]`` its ``[len, cols]`` hash ids (``hash_tokens`` of the sample as
    one sequence). ``samples`` are as for :class:`HashCollate` (sequences, arrays, tensors or
    dicts with ``"input_ids"``); they are hashed ``batch_size`` at a time, in one call each.

    When torch is installed, instances are ``torch.utils.data.IterableDataset`` s (torch is
    imported when the first one is made). In DataLoader workers each worker takes every
    ``num_workers``-th sample (``shard_workers=True``); pass ``shard_workers=False`` when
    ``samples`` already splits itself across workers (e.g. an HF ``IterableDataset``).
    ``dead_id``: blocked positions, as :class:`HashCollate`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> HashedTokens:
        if cls is HashedTokens:
            torch_cls = _torch_hashed_tokens()
            if torch_cls is not None:
                cls = torch_cls
        return object.__new__(cls)

    def __init__(
        self,
        samples: Iterable[Any],
        hasher: NgramHasher,
        layer_ids: Layers = None,
        dtype: IndexDType = "int32",
        flat: bool = False,
        batch_size: int = 64,
        shard_workers: bool = True,
        dead_id: int | None = None,
    ) -> None:
        if not isinstance(samples, Iterable):
            raise TypeError(f"samples must be iterable, got {type(samples).__name__}")
        self.samples = samples
        self.hasher = _check_hasher(hasher)
        self.layer_ids = hasher.check_layers(layer_ids)
        self.dtype = _check_dtype(dtype)
        self.flat = bool(flat)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.shard_workers = bool(shard_workers)
        self.dead_id = dead_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through HashedTokens(...), so a worker gets its torch flavour too.
        return (
            _unpickle_hashed_tokens,
            (
                self.samples,
                self.hasher,
                self.layer_ids,
                self.dtype.name,
                self.flat,
                self.batch_size,
                self.shard_workers,
                self.dead_id,
            ),
        )

    def _worker_samples(self) -> Iterator[Any]:
        it = iter(self.samples)
        data = sys.modules.get("torch.utils.data")
        info = data.get_worker_info() if data is not None and self.shard_workers else None
        if info is not None and info.num_workers > 1:
            return itertools.islice(it, info.id, None, info.num_workers)
        return it

    def __iter__(self) -> Iterator[tuple[np.ndarray, HashIds]]:
        it = self._worker_samples()
        while True:
            batch = list(itertools.islice(it, self.batch_size))
            if not batch:
                return
            ids, cu, out = _hash_samples(
                self.hasher, batch, self.layer_ids, self.dtype, self.flat, self.dead_id
            )
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
                yield ids[s:e], {x: a[s:e] for x, a in out.items()}

    def __repr__(self) -> str:
        return (
            f"HashedTokens({type(self.samples).__name__}, layer_ids={self.layer_ids}, "
            f"dtype={self.dtype.name}, flat={self.flat}, batch_size={self.batch_size})"
        )


def _unpickle_hashed_tokens(
    samples: Iterable[Any],
    hasher: NgramHasher,
    layer_ids: list[int],
    dtype: IndexDType,
    flat: bool,
    batch_size: int,
    shard_workers: bool,
    dead_id: int | None = None,
) -> HashedTokens:
    return HashedTokens(samples, hasher, layer_ids, dtype, flat, batch_size, shard_workers, dead_id)
