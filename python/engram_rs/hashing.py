"""Multi-head n-gram hashing (SPEC section 3): batches, ragged batches and streaming decode."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from . import _engram_rs
from .compress import CompressedTokenizer
from .config import EngramConfig

#: The dtypes hash ids come in: int64 (always fits) or int32 (half the bytes, when ids fit).
IndexDType: TypeAlias = (
    type[np.int64]
    | type[np.int32]
    | np.dtype[np.int64]
    | np.dtype[np.int32]
    | Literal["int64", "int32"]
)
#: Layers to hash: one layer id, several, or None for all of the config's layers.
Layers: TypeAlias = int | Sequence[int] | None
#: Hash ids per layer id.
HashIds: TypeAlias = dict[int, npt.NDArray[np.int64] | npt.NDArray[np.int32]]

__all__ = [
    "HashState",
    "NgramHasher",
    "cu_seqlens_of",
    "layer_multipliers",
    "locate",
    "pack_sequences",
]


def cu_seqlens_of(lengths: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """``cu_seqlens`` of sequences of ``lengths``: ``[0, len0, len0 + len1, ...]`` (int64)."""
    counts = np.asarray(lengths, dtype=np.int64).reshape(-1)
    cu = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=cu[1:])
    return cu


def locate(cu_seqlens: npt.NDArray[np.int64], index: int) -> tuple[int, int]:
    """(sequence, position in it) of token ``index`` of sequences packed by ``cu_seqlens``: the
    caller's coordinates of a position the core reports in the flat ids."""
    seq = int(np.searchsorted(cu_seqlens, index, side="right")) - 1
    return seq, index - int(cu_seqlens[seq])


def layer_multipliers(
    config: EngramConfig, compressed_vocab_size: int
) -> dict[int, npt.NDArray[np.int64]]:
    """Odd multipliers per layer, drawn exactly as the demo's numpy PCG64 stream (in Rust)."""
    return {
        layer: np.asarray(
            _engram_rs.layer_multipliers(
                config.seed, layer, config.max_ngram_size, compressed_vocab_size
            ),
            dtype=np.int64,
        )
        for layer in config.layer_ids
    }


def pack_sequences(
    sequences: Iterable[npt.ArrayLike],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Concatenates token lists of any lengths: ``(ids, cu_seqlens)`` for ``hash``/``hash_tokens``
    with ``cu_seqlens=``. Split a result per sequence with ``np.split(out, cu_seqlens[1:-1])``.
    """
    arrays = [np.asarray(s).reshape(-1) for s in sequences]
    for i, a in enumerate(arrays):
        if a.size and a.dtype.kind not in "iu":
            raise TypeError(f"sequence {i} holds {a.dtype} values, not token ids (integers)")
    cu = cu_seqlens_of([a.size for a in arrays])
    ids = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    return ids, cu


class HashState:
    """Per-sequence history (the last ``max_ngram_size - 1`` compressed ids) for decoding.

    ``history`` is a read-only view: the state changes only through ``hash_step`` (which
    leaves it untouched when a step fails) and ``reset``.
    """

    def __init__(self, batch_size: int, history_len: int, pad_id: int) -> None:
        self.pad_id = pad_id
        self._history = np.full((batch_size, history_len), pad_id, dtype=np.int64)

    @property
    def history(self) -> np.ndarray:
        """``[batch_size, max_ngram_size - 1]`` int64, oldest id first (read-only)."""
        view: np.ndarray = self._history.view()
        view.flags.writeable = False
        return view

    @property
    def batch_size(self) -> int:
        return int(self._history.shape[0])

    def reset(self, rows: npt.ArrayLike | None = None) -> None:
        """Starts the given rows (all rows if None) over as fresh sequences."""
        if rows is None:
            self._history[:] = self.pad_id
            return
        idx = np.asarray(rows)
        if idx.dtype.kind not in "iub" or idx.ndim > 1:
            raise TypeError(f"rows must be sequence indices (ints) or a boolean mask, got {rows!r}")
        if (
            idx.dtype.kind != "b"
            and idx.size
            and (idx.min() < -self.batch_size or idx.max() >= self.batch_size)
        ):
            raise IndexError(
                f"rows {idx.tolist()} are outside the state's {self.batch_size} sequences"
            )
        self._history[idx] = self.pad_id

    def __repr__(self) -> str:
        return f"HashState(batch_size={self.batch_size}, history_len={self._history.shape[1]})"


def _frozen(values: list[int]) -> npt.NDArray[np.int64]:
    arr = np.asarray(values, dtype=np.int64)
    arr.flags.writeable = False
    return arr


def _check_blocked(blocked: npt.ArrayLike | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``blocked`` as the core's flags (uint8, one per id, C order) of a bool mask of the ids'
    ``shape``, or a clear error."""
    if blocked is None:
        return None
    mask = np.asarray(blocked)
    if mask.dtype != np.bool_:
        raise TypeError(
            f"blocked must be a bool mask (True at blocked positions), got a {mask.dtype} array"
        )
    if mask.shape != tuple(shape):
        raise ValueError(f"blocked must have the ids' shape {tuple(shape)}, got {mask.shape}")
    return np.ascontiguousarray(mask).reshape(-1).view(np.uint8)


def _check_dead_id(dead_id: int | None) -> int | None:
    """A raw token id that marks blocked positions, or a clear error."""
    if dead_id is None:
        return None
    if isinstance(dead_id, bool) or not isinstance(dead_id, (int, np.integer)) or dead_id < 0:
        raise ValueError(f"dead_id must be a raw token id (an int >= 0), got {dead_id!r}")
    return int(dead_id)


def _row_bounds(rows: int, length: int) -> list[int]:
    """Sequence bounds of a [rows, length] batch: each row is its own sequence."""
    return list(range(0, rows * length + 1, length)) if length else [0] * (rows + 1)


def _packed_bounds(arr: np.ndarray, cu_seqlens: npt.ArrayLike) -> list[int]:
    """Checks packed ``cu_seqlens`` against ``arr`` and returns them as segment bounds."""
    if arr.ndim != 1:
        raise ValueError(
            f"with cu_seqlens, ids must be 1-D (the concatenated sequences), got shape "
            f"{arr.shape}: pass ids.reshape(-1), or pack lists with pack_sequences()"
        )
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.dtype.kind not in "iu" or cu.size < 1:
        raise ValueError(f"cu_seqlens must be a 1-D integer array [0, ..., {arr.size}], got {cu!r}")
    out_of_range = (cu < 0) | (cu > arr.size)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise ValueError(
            f"cu_seqlens[{i}] = {int(cu[i])} is outside [0, len(ids) = {arr.size}]: "
            "cu_seqlens holds the offsets of each sequence in ids"
        )
    # Start, end and order are checked by the core.
    return [int(b) for b in cu.astype(np.int64)]


def _as_ids(ids: Any) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"ids must be integers, got dtype {arr.dtype}: convert with ids.astype(numpy.int64)"
        )
    if not arr.dtype.isnative:
        # A big-endian (byte-swapped) array, e.g. read from a file written elsewhere.
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


class NgramHasher:
    """Computes Engram hash ids from compressed token ids, bit for bit as the official demo.

    For each Engram layer, every token gets ``cols = (max_ngram_size - 1) * n_head_per_ngram``
    hash ids, column ``(order - 2) * n_head_per_ngram + head``: the row of that head's table,
    in ``[0, primes[layer][order - 2][head])``. The demo stores the heads of a layer as ONE
    flat table of ``table_rows[layer]`` rows; ``offsets[layer]`` (per column) is where each
    head's rows start in it, and ``hash(..., flat=True)`` adds them: its ids index the flat
    table directly (``HostTable.create(path, rows=h.table_rows[layer], dim=cfg.head_dim)``).
    """

    def __init__(
        self,
        config: EngramConfig,
        compressed_vocab_size: int,
        pad_id: int | None = None,
        *,
        compressed_pad_id: int | None = None,
        tokenizer: CompressedTokenizer | None = None,
    ) -> None:
        """A hasher of ``compressed_vocab_size`` compressed ids.

        The pad (the id that positions before a sequence's start read as) is a COMPRESSED id
        here, while ``config.pad_id`` is a RAW token id: give the tokenizer (``tokenizer=comp``
        or ``NgramHasher.from_tokenizer``), which maps it, or ``compressed_pad_id=`` (``pad_id``
        is its older name). Without either, only ``config.pad_id == 0`` is taken as it is (raw
        id 0 always compresses to 0); any other value raises, so that ids never silently
        differ from the demo's.
        """
        if not isinstance(config, EngramConfig):
            raise TypeError(f"config must be an EngramConfig, got {type(config).__name__}")
        if isinstance(compressed_vocab_size, bool) or not isinstance(compressed_vocab_size, int):
            raise TypeError(f"compressed_vocab_size must be an int, got {compressed_vocab_size!r}")
        if not 1 <= compressed_vocab_size < 2**63:
            raise ValueError(
                f"compressed_vocab_size must be in [1, 2**63), got {compressed_vocab_size}: pass "
                "len(comp) of the CompressedTokenizer the ids come from"
            )
        if pad_id is not None and compressed_pad_id is not None and pad_id != compressed_pad_id:
            raise ValueError(
                f"pad_id={pad_id!r} and compressed_pad_id={compressed_pad_id!r} disagree: pass "
                "one (pad_id is the older name of compressed_pad_id)"
            )
        explicit = compressed_pad_id if compressed_pad_id is not None else pad_id
        if tokenizer is not None:
            if not isinstance(tokenizer, CompressedTokenizer):
                raise TypeError(
                    f"tokenizer must be a CompressedTokenizer, got {type(tokenizer).__name__}"
                )
            if len(tokenizer) != compressed_vocab_size:
                raise ValueError(
                    f"compressed_vocab_size={compressed_vocab_size} but the tokenizer has "
                    f"{len(tokenizer)} compressed ids: pass len(comp)"
                )
            if config.pad_id >= tokenizer.vocab_size:
                raise ValueError(
                    f"config.pad_id {config.pad_id} (a raw token id) is outside the tokenizer's "
                    f"vocabulary [0, {tokenizer.vocab_size}): this config is not for this "
                    "tokenizer"
                )
            mapped = int(tokenizer.lookup_table[config.pad_id])
            if explicit is not None and explicit != mapped:
                raise ValueError(
                    f"compressed_pad_id={explicit!r} but the tokenizer maps config.pad_id "
                    f"{config.pad_id} to {mapped}: drop compressed_pad_id"
                )
            explicit = mapped
        if explicit is None:
            if config.pad_id != 0:
                raise ValueError(
                    f"NgramHasher(config, {compressed_vocab_size}) needs the pad's COMPRESSED "
                    f"id: config.pad_id = {config.pad_id} is a raw token id, and its compressed "
                    "id depends on the tokenizer. Pass the tokenizer "
                    "(NgramHasher.from_tokenizer(config, comp), or tokenizer=comp), or "
                    "compressed_pad_id=int(comp.lookup_table[config.pad_id]) (or "
                    "compressed_pad_id=config.pad_id when the ids are not compressed or the pad "
                    "maps to itself)"
                )
            explicit = 0
        pad = explicit
        if isinstance(pad, bool) or not isinstance(pad, int) or not -(2**63) <= pad < 2**63:
            raise TypeError(f"compressed_pad_id must be an int64, got {pad!r}")
        self.config = config
        self.compressed_vocab_size = compressed_vocab_size
        self.pad_id = pad
        n, h = config.max_ngram_size, config.n_head_per_ngram
        self.layer_ids: list[int] = list(config.layer_ids)
        # The core checks the pad id and derives multipliers and primes from the config
        # (without the GIL; Ctrl-C stops an absurd config's prime search).
        self._core = _engram_rs.HasherCore(
            list(config.engram_vocab_size),
            n,
            h,
            self.layer_ids,
            config.seed,
            compressed_vocab_size,
            pad,
        )
        self._index = {layer: i for i, layer in enumerate(self.layer_ids)}
        self._multipliers = {
            layer: _frozen(self._core.multipliers(i)) for layer, i in self._index.items()
        }
        self._primes = {
            layer: [flat[k * h : (k + 1) * h] for k in range(n - 1)]
            for layer, i in self._index.items()
            for flat in [self._core.primes(i)]
        }
        self._table_rows = {layer: self._core.table_rows(i) for layer, i in self._index.items()}
        too_big = {layer: rows for layer, rows in self._table_rows.items() if rows >= 2**63}
        if too_big:
            raise ValueError(
                f"the flat tables of layers {too_big} have 2**63 rows or more (row ids are "
                "int64): use a smaller engram_vocab_size or fewer heads"
            )
        self._offsets = {layer: _frozen(self._core.offsets(i)) for layer, i in self._index.items()}
        #: Raw vocabulary size when built with ``from_tokenizer`` (raw ids accepted), else None.
        self.vocab_size: int | None = None
        self._lookup: np.ndarray | None = None  # the raw -> compressed table, for pickling
        if tokenizer is not None:
            self._set_lookup(tokenizer.lookup_table)

    @property
    def cols(self) -> int:
        """Hash ids per token and layer: ``(max_ngram_size - 1) * n_head_per_ngram``."""
        return self.config.cols

    @property
    def multipliers(self) -> dict[int, npt.NDArray[np.int64]]:
        """Per layer id: the ``max_ngram_size`` odd multipliers (read-only int64)."""
        return dict(self._multipliers)

    @property
    def primes(self) -> dict[int, list[list[int]]]:
        """Per layer id: ``[order - 2][head]`` table sizes, distinct primes."""
        return {layer: [list(p) for p in orders] for layer, orders in self._primes.items()}

    @property
    def offsets(self) -> dict[int, npt.NDArray[np.int64]]:
        """Per layer id: ``[cols]`` start of each head's rows in the flat table (read-only)."""
        return dict(self._offsets)

    @property
    def table_rows(self) -> dict[int, int]:
        """Per layer id: rows of the layer's flat table (the sum of its primes)."""
        return dict(self._table_rows)

    @classmethod
    def from_tokenizer(cls, config: EngramConfig, comp: CompressedTokenizer) -> NgramHasher:
        """A hasher for ``comp``'s compressed vocabulary that also hashes raw ids (``hash_tokens``).

        The pad id is ``config.pad_id`` (a raw token id) mapped through ``comp``.
        """
        if not isinstance(comp, CompressedTokenizer):
            raise TypeError(f"comp must be a CompressedTokenizer, got {type(comp).__name__}")
        if not isinstance(config, EngramConfig):
            raise TypeError(f"config must be an EngramConfig, got {type(config).__name__}")
        return cls(config, len(comp), tokenizer=comp)

    def _set_lookup(self, table: np.ndarray) -> None:
        self._core.set_lookup(table.tolist())
        self._lookup = table
        self.vocab_size = int(table.size)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles (DataLoader workers under spawn/forkserver) as what rebuilds it: the core is
        # derived again from the config, the lookup table (from_tokenizer) installed again.
        args = (self.config, self.compressed_vocab_size, self.pad_id, self._lookup)
        return (_unpickle_hasher, args)

    def __repr__(self) -> str:
        return (
            f"NgramHasher(layers={self.layer_ids}, max_ngram_size={self.config.max_ngram_size}, "
            f"heads={self.config.n_head_per_ngram}, compressed_vocab_size="
            f"{self.compressed_vocab_size}, compressed_pad_id={self.pad_id})"
        )

    def check_layers(self, layer_ids: Layers) -> list[int]:
        """The Engram layers ``layer_ids`` names (None: all of them, an int: that one), or a
        ValueError naming those that are not layers of this config."""
        if layer_ids is None:
            return list(self.layer_ids)
        if isinstance(layer_ids, int):
            layer_ids = [layer_ids]
        bad = [
            x
            for x in layer_ids
            if isinstance(x, bool) or not isinstance(x, int) or x not in self._index
        ]
        if bad:
            raise ValueError(
                f"layer_ids {bad} are not Engram layers of this config {self.layer_ids}"
            )
        return list(layer_ids)

    def _run(
        self,
        ids: np.ndarray,
        bounds: list[int],
        layer_ids: Layers,
        dtype: IndexDType,
        flat: bool,
        history: np.ndarray | None = None,
        shape: tuple[int, ...] | None = None,
        raw: bool = False,
        scalar: bool = False,
        blocked: np.ndarray | None = None,
        dead_id: int | None = None,
    ) -> HashIds:
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.int64), np.dtype(np.int32)):
            raise ValueError(f"dtype must be numpy.int64 or numpy.int32, got {dt}")
        layers = self.check_layers(layer_ids)
        int32 = dt == np.int32  # whether the ids fit is checked by the core
        rows = [self._index[x] for x in layers]
        outs = self._core.hash(
            ids,
            bounds,
            rows,
            int32,
            bool(flat),
            history,
            scalar=bool(scalar),
            raw=raw,
            blocked=blocked,
            dead_id=dead_id,
        )
        out_shape = (*(ids.shape if shape is None else shape), self.cols)
        return {layer: out.reshape(out_shape) for layer, out in zip(layers, outs, strict=True)}

    def hash(
        self,
        ids: npt.ArrayLike,
        layer_ids: Layers = None,
        dtype: IndexDType = np.int64,
        flat: bool = False,
        cu_seqlens: npt.ArrayLike | None = None,
        *,
        blocked: npt.ArrayLike | None = None,
        scalar: bool = False,
    ) -> HashIds:
        """Hash compressed token ids -> ``{layer_id: hash ids}``.

        ``ids`` ``[B, T]`` (or ``[T]``): each row is its own sequence, starting with pad history;
        the result per layer is ``[B, T, cols]`` (``cols = (max_ngram_size - 1) *
        n_head_per_ngram``, column ``(order - 2) * n_head_per_ngram + head``). Right-padded rows
        are fine: hashing is causal, so the ids of real tokens do not depend on the padding
        after them. With ``cu_seqlens`` (``[0, len0, len0 + len1, ..., len(ids)]``), ``ids`` is
        1-D, the concatenation of sequences of any lengths, and the result ``[len(ids), cols]``.
        ``flat=True`` adds ``offsets[layer_id]``: rows of the layer's single flat table.
        ``blocked``: a bool mask of ``ids``' shape marking blocked positions (image tokens, in
        DeepSeek-V4.1-Flash): walking back from a position, once a lookback meets a blocked
        position (or leaves the sequence) that shift and every older one read the pad id; a
        blocked position itself hashes as all pad (SPEC 8.3, the DEAD rule).
        ``scalar=True`` runs the one-thread scalar kernel that the SIMD path is tested against
        (the same ids, slower: for tests and benchmarks).
        """
        return self._hash(
            ids, cu_seqlens, layer_ids, dtype, flat, raw=False, scalar=scalar, blocked=blocked
        )

    def hash_tokens(
        self,
        raw_ids: npt.ArrayLike,
        layer_ids: Layers = None,
        dtype: IndexDType = np.int64,
        flat: bool = False,
        cu_seqlens: npt.ArrayLike | None = None,
        *,
        dead_id: int | None = None,
        blocked: npt.ArrayLike | None = None,
        scalar: bool = False,
    ) -> HashIds:
        """``hash(comp(raw_ids))`` in one pass, for raw token ids (same shapes and options).

        Needs a hasher built with ``from_tokenizer``; the ids are mapped through its lookup table
        inside the hashing kernel, no compressed array is made. ``dead_id``: a raw token id that
        marks blocked positions (``blocked = raw_ids == dead_id``; both may be given).
        """
        self._require_lookup()
        return self._hash(
            raw_ids,
            cu_seqlens,
            layer_ids,
            dtype,
            flat,
            raw=True,
            scalar=scalar,
            blocked=blocked,
            dead_id=_check_dead_id(dead_id),
        )

    def hash_ragged(
        self,
        ids: npt.ArrayLike,
        cu_seqlens: npt.ArrayLike,
        layer_ids: Layers = None,
        dtype: IndexDType = np.int64,
        flat: bool = False,
        *,
        blocked: npt.ArrayLike | None = None,
    ) -> HashIds:
        """``hash(ids, cu_seqlens=cu_seqlens)``: concatenated sequences of any lengths."""
        return self._hash(ids, cu_seqlens, layer_ids, dtype, flat, raw=False, blocked=blocked)

    def _require_lookup(self) -> None:
        if self.vocab_size is None:
            raise ValueError(
                "this hasher has no lookup table: build it with "
                "NgramHasher.from_tokenizer(config, comp) to hash raw token ids"
            )

    def _hash(
        self,
        ids: npt.ArrayLike,
        cu_seqlens: npt.ArrayLike | None,
        layer_ids: Layers,
        dtype: IndexDType,
        flat: bool,
        raw: bool,
        scalar: bool = False,
        blocked: npt.ArrayLike | None = None,
        dead_id: int | None = None,
    ) -> HashIds:
        arr = _as_ids(ids)
        flags = _check_blocked(blocked, arr.shape)
        if cu_seqlens is None:
            if arr.ndim not in (1, 2):
                raise ValueError(f"ids must be 1-D [T] or 2-D [B, T], got shape {arr.shape}")
            rows, length = (1, arr.shape[0]) if arr.ndim == 1 else arr.shape
            bounds = _row_bounds(rows, length)
        else:
            bounds = _packed_bounds(arr, cu_seqlens)
        return self._run(
            arr,
            bounds,
            layer_ids,
            dtype,
            flat,
            raw=raw,
            scalar=scalar,
            blocked=flags,
            dead_id=dead_id,
        )

    def new_state(self, batch_size: int) -> HashState:
        """A decode state for ``batch_size`` fresh sequences (pad history)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        return HashState(batch_size, self.config.max_ngram_size - 1, self.pad_id)

    def hash_step(
        self,
        new_ids: npt.ArrayLike,
        state: HashState,
        layer_ids: Layers = None,
        dtype: IndexDType = np.int64,
        flat: bool = False,
        *,
        blocked: npt.ArrayLike | None = None,
    ) -> HashIds:
        """Hash the next ``k`` tokens of each sequence, ``[B, k]`` (or ``[B]`` for one token).

        Equals hashing each whole history at once; ``state`` is advanced past the new ids.
        ``blocked``: a bool mask of ``new_ids``' shape (the DEAD rule, as ``hash``): after a
        blocked position the state holds only pad ids.
        """
        return self._step(new_ids, state, layer_ids, dtype, flat, raw=False, blocked=blocked)

    def hash_tokens_step(
        self,
        raw_ids: npt.ArrayLike,
        state: HashState,
        layer_ids: Layers = None,
        dtype: IndexDType = np.int64,
        flat: bool = False,
        *,
        dead_id: int | None = None,
        blocked: npt.ArrayLike | None = None,
    ) -> HashIds:
        """``hash_step`` on raw token ids (a hasher from ``from_tokenizer``), mapped in one pass.

        The state keeps compressed ids, so raw and compressed steps may be mixed. ``dead_id``,
        ``blocked``: blocked positions, as ``hash_tokens``.
        """
        self._require_lookup()
        return self._step(
            raw_ids,
            state,
            layer_ids,
            dtype,
            flat,
            raw=True,
            blocked=blocked,
            dead_id=_check_dead_id(dead_id),
        )

    def _step(
        self,
        new_ids: npt.ArrayLike,
        state: HashState,
        layer_ids: Layers,
        dtype: IndexDType,
        flat: bool,
        raw: bool,
        blocked: npt.ArrayLike | None = None,
        dead_id: int | None = None,
    ) -> HashIds:
        if not isinstance(state, HashState):
            raise TypeError(f"state must come from new_state(), got {type(state).__name__}")
        hist = state._history
        if (
            not isinstance(hist, np.ndarray)
            or hist.dtype != np.int64
            or hist.ndim != 2
            or not hist.flags.c_contiguous
            or not hist.flags.writeable
        ):
            raise ValueError(
                "state.history must be a writable C-contiguous int64 [batch_size, "
                f"{self.config.max_ngram_size - 1}] array, got "
                f"{getattr(hist, 'dtype', type(hist).__name__)} {getattr(hist, 'shape', '')}: "
                "create the state with new_state() and change it only through hash_step/reset"
            )
        if hist.shape[1] != self.config.max_ngram_size - 1:
            raise ValueError(
                f"state holds {hist.shape[1]} ids per sequence but this hasher needs "
                f"{self.config.max_ngram_size - 1}: create it with this hasher's new_state()"
            )
        arr = _as_ids(new_ids)
        if arr.ndim not in (1, 2) or arr.shape[0] != state.batch_size:
            raise ValueError(
                f"new_ids must be [B, k] or [B] with B = state.batch_size = {state.batch_size}, "
                f"got shape {arr.shape}"
            )
        rows, k = (arr.shape[0], 1) if arr.ndim == 1 else arr.shape
        flags = _check_blocked(blocked, arr.shape)
        return self._run(
            arr,
            _row_bounds(rows, k),
            layer_ids,
            dtype,
            flat,
            history=hist,
            raw=raw,
            blocked=flags,
            dead_id=dead_id,
        )


def _unpickle_hasher(
    config: EngramConfig, compressed_vocab_size: int, pad_id: int, lookup: np.ndarray | None
) -> NgramHasher:
    h = NgramHasher(config, compressed_vocab_size, compressed_pad_id=pad_id)
    if lookup is not None:
        h._set_lookup(lookup)
    return h
