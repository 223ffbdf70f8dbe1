"""The Engram module in torch (SPEC section 6): the demo's parameters and math, host tables."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import EngramConfig
from ..hashing import NgramHasher
from ..table import HostTable
from . import ops
from .ops import hash_id_error

if TYPE_CHECKING:
    from .optim import SparseOptimizer

__all__ = ["Engram", "EngramEmbedding", "MultiHeadEmbedding", "ShortConv", "check_no_optimizer"]

_ID_DTYPES = (torch.int64, torch.int32)


def _layer_layout(hasher: NgramHasher, layer_id: int) -> tuple[list[int], list[int], int]:
    """``(offsets, head_rows, table_rows)`` of one layer's flat table, or a clear error."""
    if not isinstance(hasher, NgramHasher):
        raise TypeError(f"hasher must be an NgramHasher, got {type(hasher).__name__}")
    if layer_id not in hasher.table_rows:
        raise ValueError(
            f"layer_id {layer_id!r} is not an Engram layer of this config {hasher.layer_ids}"
        )
    offsets = [int(x) for x in hasher.offsets[layer_id]]
    head_rows = [int(p) for order in hasher.primes[layer_id] for p in order]
    return offsets, head_rows, hasher.table_rows[layer_id]


def _set_layout(module: nn.Module, layout: tuple[list[int], list[int]]) -> None:
    """Registers the buffers ``offsets`` (saved, as the demo's) and ``head_rows`` (the range
    check's bound, derived from the config: not saved), or refills them (after ``to_empty``)."""
    with torch.no_grad():
        for name, values in zip(("offsets", "head_rows"), layout, strict=True):
            value = torch.tensor(values, dtype=torch.int64)
            if name in module._buffers:
                getattr(module, name).copy_(value)
            else:
                module.register_buffer(name, value, persistent=name == "offsets")


def _check_embed_dim(embed_dim: int) -> None:
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")


def check_no_optimizer(optimizer: SparseOptimizer | None, rows: str) -> None:
    """Refuses a sparse optimizer for rows that are not in a HostTable (``rows``: what they
    are instead, for the message)."""
    if optimizer is not None:
        raise ValueError(
            f"optimizer is for rows in a HostTable (pass table=...): without one the rows are "
            f"{rows}, trained by the model's torch optimizer"
        )


def _check_hash_ids(
    hash_ids: torch.Tensor, head_rows: torch.Tensor, layer_id: int, range_check: bool = True
) -> None:
    """Hash ids must be ``[B, L, cols]`` int64/int32 and inside each column's head table.

    The range check reads the ids (a device sync), so it runs in eager mode only: a compiled
    graph keeps no data-dependent branch. Host tables pass ``range_check=False``: their rows
    are made by the core, which checks each id in the same pass (``ops.layer_rows``).
    """
    cols = head_rows.shape[0]
    if not isinstance(hash_ids, torch.Tensor):
        raise TypeError(
            f"hash_ids must be a torch tensor, got {type(hash_ids).__name__}: "
            "wrap the hasher's output with torch.from_numpy"
        )
    if hash_ids.dtype not in _ID_DTYPES:
        raise TypeError(
            f"hash ids of wrong dtype {hash_ids.dtype}: expected torch.int64 or torch.int32 "
            "(convert with hash_ids.long())"
        )
    if hash_ids.dim() != 3 or hash_ids.shape[-1] != cols:
        raise ValueError(
            f"hash ids of wrong rank or column count: expected [batch, length, {cols}] for "
            f"layer {layer_id} ((max_ngram_size - 1) * n_head_per_ngram columns), got shape "
            f"{tuple(hash_ids.shape)}"
        )
    if not range_check or torch.compiler.is_compiling():
        return
    bad = (hash_ids < 0) | (hash_ids >= head_rows)
    if bool(bad.any()):
        b, t, c = (int(i) for i in bad.nonzero()[0])
        raise hash_id_error(layer_id, (b, t, c), int(hash_ids[b, t, c]), int(head_rows[c]))


class MultiHeadEmbedding(nn.Module):
    """The demo's flat table of one layer: ``weight[hash_ids + offsets]``, one row per column.

    ``embedding.weight`` is ``[hasher.table_rows[layer_id], embed_dim]``; the buffer ``offsets``
    (int64 ``[cols]``) is where each head's rows start in it.
    """

    offsets: torch.Tensor
    head_rows: torch.Tensor

    def __init__(self, hasher: NgramHasher, layer_id: int, embed_dim: int) -> None:
        super().__init__()
        offsets, head_rows, rows = _layer_layout(hasher, layer_id)
        _check_embed_dim(embed_dim)
        self.layer_id = layer_id
        self._layout = (offsets, head_rows)
        self.embedding = nn.Embedding(rows, embed_dim)
        _set_layout(self, self._layout)

    def reset_parameters(self) -> None:
        """Re-initialises the rows (as ``nn.Embedding``) and refills the buffers (after
        ``to_empty``)."""
        self.embedding.reset_parameters()
        _set_layout(self, self._layout)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, cols]`` per-head hash ids -> ``[B, L, cols, embed_dim]`` rows."""
        _check_hash_ids(hash_ids, self.head_rows, self.layer_id)
        out: torch.Tensor = self.embedding(hash_ids + self.offsets)
        return out


class EngramEmbedding(nn.Module):
    """One layer's Engram rows, concatenated per token: ``[B, L, cols * embed_dim]``.

    With ``table=None`` the rows are a trainable ``MultiHeadEmbedding`` (state_dict keys
    ``multi_head_embedding.embedding.weight``, ``multi_head_embedding.offsets``). With a
    ``HostTable`` of ``hasher.table_rows[layer_id]`` rows of ``embed_dim`` values, the rows stay
    in host memory and ``optimizer`` trains them (``engram_rs.torch.ops``); only the buffer
    ``offsets`` is in the state_dict.
    """

    offsets: torch.Tensor
    head_rows: torch.Tensor

    def __init__(
        self,
        hasher: NgramHasher,
        layer_id: int,
        embed_dim: int,
        table: HostTable | None = None,
        optimizer: SparseOptimizer | None = None,
    ) -> None:
        super().__init__()
        offsets, head_rows, rows = _layer_layout(hasher, layer_id)
        _check_embed_dim(embed_dim)
        self.layer_id = layer_id
        self.embed_dim = embed_dim
        self.cols = len(offsets)
        self.table = table
        self.optimizer = optimizer
        self.multi_head_embedding: MultiHeadEmbedding | None = None
        if table is None:
            check_no_optimizer(optimizer, "a parameter")
            self.multi_head_embedding = MultiHeadEmbedding(hasher, layer_id, embed_dim)
            return
        if not isinstance(table, HostTable):
            raise TypeError(f"table must be an engram_rs.HostTable or None, got {table!r}")
        if table.rows != rows or table.dim != embed_dim:
            raise ValueError(
                f"the HostTable is [{table.rows}, {table.dim}] (rows, dim), but layer "
                f"{layer_id}'s table is [{rows}, {embed_dim}] (hasher.table_rows[{layer_id}], "
                "embed_dim): create it with HostTable.create(path, rows=hasher.table_rows"
                f"[{layer_id}], dim=config.head_dim)"
            )
        self._layout = (offsets, head_rows)
        _set_layout(self, self._layout)
        # The host gather's backward applies `optimizer` to the table; the zero-size anchor
        # makes the gathered rows require grad (it is left out of the state_dict). The module
        # alone holds its binding (weakly registered), so deleting it releases the table.
        self._host_binding = ops.bind(table, optimizer)
        self._host_handle = self._host_binding.handle
        self._anchor = nn.Parameter(torch.empty(0))
        self._register_state_dict_hook(_drop_anchor)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_post_hook(_anchor_not_missing)  # type: ignore[no-untyped-call]

    def reset_parameters(self) -> None:
        """Refills a host table's buffers (after ``to_empty``); its rows are the table's."""
        if self.multi_head_embedding is None:
            _set_layout(self, self._layout)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, cols]`` per-head hash ids -> ``[B, L, cols * embed_dim]``."""
        if self.multi_head_embedding is not None:
            dense: torch.Tensor = self.multi_head_embedding(hash_ids)
            return dense.flatten(-2)
        _check_hash_ids(hash_ids, self.head_rows, self.layer_id, range_check=False)
        if self._anchor.dtype != torch.float32:
            raise _cast_error(self)
        rows: torch.Tensor = ops.host_embedding(self, hash_ids)
        return rows.reshape(*hash_ids.shape[:2], self.cols * self.embed_dim)

    def prefetch(self, hash_ids: torch.Tensor) -> Any:
        """Starts reading the rows of ``hash_ids`` from a host table (None for a dense one)."""
        if self.multi_head_embedding is not None:
            return None
        _check_hash_ids(hash_ids, self.head_rows, self.layer_id, range_check=False)
        return ops.host_prefetch(self, hash_ids)

    # A host table is a file held under a lock: a copy cannot share it (an exclusive lock) or
    # own a copy of it, so deepcopy, pickle and torch.save(module) (which all reduce the module
    # with __reduce_ex__) say what to do instead.
    def __reduce_ex__(self, protocol: Any) -> Any:
        if getattr(self, "table", None) is not None:
            raise _copy_error(self)
        return super().__reduce_ex__(protocol)

    def __copy__(self) -> EngramEmbedding:
        """A shallow copy (as ``copy.copy`` makes of any module): it shares the table."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new


def _table_name(emb: EngramEmbedding) -> str:
    table = emb.table
    assert table is not None
    return (
        f"the HostTable {table.path}" if table.path else f"a HostTable [{table.rows}, {table.dim}]"
    )


def _copy_error(emb: EngramEmbedding) -> TypeError:
    return TypeError(
        f"an EngramEmbedding over {_table_name(emb)} cannot be copied or pickled "
        "(copy.deepcopy, pickle, torch.save(module)): its rows live in the table, whose file "
        "it holds under a lock, and a copy can neither share nor duplicate it. Save a "
        "checkpoint instead with engram_rs.torch.checkpoint.save_checkpoint(path, model, "
        "optimizer, config=...) (the table's rows, its optimizer state and the dense "
        "parameters) and restore it with load_checkpoint, or torch.save(model.state_dict()) "
        "for the dense parameters only (the rows stay in the table's file: table.flush(), then "
        "copy the file to snapshot them)"
    )


def _cast_error(emb: EngramEmbedding) -> TypeError:
    table = emb.table
    assert table is not None
    dt = str(emb._anchor.dtype)
    return TypeError(
        f"this EngramEmbedding gathers float32 rows from {_table_name(emb)} (stored as "
        f"{table.dtype}, gathered as float32 whatever the storage), but the module was cast to "
        f"{dt} (module.to / .half() / .bfloat16()): keep the Engram module in float32 "
        f"(model.to({dt}), then model.engram.float()) and cast around it (engram(h.float(), "
        f"ids).to({dt})), or keep the model in float32 and run it under "
        f"torch.autocast(device_type, dtype={dt}); a standalone EngramEmbedding: .float() it "
        f"and cast its output, emb(ids).to({dt})"
    )


def _drop_anchor(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    state.pop(prefix + "_anchor", None)


def _anchor_not_missing(module: nn.Module, keys: Any) -> None:
    keys.missing_keys[:] = [k for k in keys.missing_keys if not k.endswith("_anchor")]


class ShortConv(nn.Module):
    """The demo's ShortConv: per-branch RMSNorm, causal depthwise conv (dilation N), SiLU."""

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int) -> None:
        super().__init__()
        channels = hidden_size * hc_mult
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            bias=False,
            dilation=dilation,
            padding=(kernel_size - 1) * dilation,
        )
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=1e-5) for _ in range(hc_mult))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        """``[B, L, G, D]`` -> ``[B, L, G, D]``."""
        b, length, g, d = value.shape
        x = torch.cat([norm(value[:, :, i]) for i, norm in enumerate(self.norms)], dim=-1)
        # Padding on both sides; the first L outputs are the causal ones.
        y = self.conv(x.transpose(1, 2))[..., :length]
        return nn.functional.silu(y).transpose(1, 2).reshape(b, length, g, d)


class Engram(nn.Module):
    """The demo's Engram module for one layer (SPEC section 6), parameters named as its state_dict.

    ``forward(hidden_states [B, L, hc_mult, hidden_size], hash_ids [B, L, cols])`` returns
    ``[B, L, hc_mult, hidden_size]``, which the block adds to ``hidden_states``. ``hash_ids``
    are the hasher's per-head ids for this layer (``flat=False``). ``compressed_vocab_size``
    is the one the ids were hashed with (``len(comp)``). With ``table`` (a ``HostTable``) the
    rows live in host memory, trained by ``optimizer``, and ``multi_head_embedding`` is an
    ``EngramEmbedding``.
    """

    def __init__(
        self,
        cfg: EngramConfig,
        layer_id: int,
        hidden_size: int | None = None,
        hc_mult: int | None = None,
        *,
        compressed_vocab_size: int,
        table: HostTable | None = None,
        optimizer: SparseOptimizer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(cfg, EngramConfig):
            raise TypeError(f"cfg must be an EngramConfig, got {type(cfg).__name__}")
        # Checked as the config checks them.
        cfg = cfg.replace(
            hidden_size=cfg.hidden_size if hidden_size is None else hidden_size,
            hc_mult=cfg.hc_mult if hc_mult is None else hc_mult,
        )
        # Only the layout (table rows, offsets, primes) is used here, and it does not depend
        # on the pad: any compressed pad id will do.
        hasher = NgramHasher(cfg, compressed_vocab_size, pad_id=0)
        self.layer_id = layer_id
        self.hidden_size = d = cfg.hidden_size
        self.hc_mult = g = cfg.hc_mult
        self.cols = cfg.cols
        self.multi_head_embedding: MultiHeadEmbedding | EngramEmbedding
        if table is None:
            self.multi_head_embedding = MultiHeadEmbedding(hasher, layer_id, cfg.head_dim)
        else:
            self.multi_head_embedding = EngramEmbedding(
                hasher, layer_id, cfg.head_dim, table, optimizer
            )
        self.short_conv = (
            ShortConv(d, cfg.kernel_size, cfg.max_ngram_size, g) if cfg.short_conv else None
        )
        e = (cfg.max_ngram_size - 1) * cfg.n_embed_per_ngram
        self.value_proj = nn.Linear(e, d)
        self.key_projs = nn.ModuleList(nn.Linear(e, d) for _ in range(g))
        self.norm1 = nn.ModuleList(nn.RMSNorm(d) for _ in range(g))
        self.norm2 = nn.ModuleList(nn.RMSNorm(d) for _ in range(g))

    def prefetch(self, hash_ids: torch.Tensor) -> Any:
        """Starts reading the rows of ``hash_ids`` from a host table (None for a dense one)."""
        if isinstance(self.multi_head_embedding, EngramEmbedding):
            return self.multi_head_embedding.prefetch(hash_ids)
        return None

    def forward(self, hidden_states: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, hc_mult, hidden_size]`` states and ``[B, L, cols]`` ids -> the Engram
        output, ``[B, L, hc_mult, hidden_size]``."""
        self._check_hidden(hidden_states)
        rows: torch.Tensor = self.multi_head_embedding(hash_ids)  # checks the hash ids
        if rows.shape[:2] != hidden_states.shape[:2]:
            raise ValueError(
                f"hidden_states {tuple(hidden_states.shape)} and hash_ids "
                f"{tuple(hash_ids.shape)} differ in batch or length: both are [batch, length, "
                "...] of the same tokens"
            )
        e = rows.reshape(*hidden_states.shape[:2], -1)
        gates = []
        for g, (key_proj, norm1, norm2) in enumerate(
            zip(self.key_projs, self.norm1, self.norm2, strict=True)
        ):
            k: torch.Tensor = norm1(key_proj(e))
            q: torch.Tensor = norm2(hidden_states[:, :, g])
            s = (k * q).sum(dim=-1) / math.sqrt(self.hidden_size)
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
            gates.append(s.sigmoid())
        v: torch.Tensor = self.value_proj(e)
        value = torch.stack(gates, dim=2).unsqueeze(-1) * v.unsqueeze(2)
        if self.short_conv is None:
            return value
        y: torch.Tensor = self.short_conv(value)
        return value + y

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        want = f"[batch, length, hc_mult={self.hc_mult}, hidden_size={self.hidden_size}]"
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 4:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)
            raise ValueError(f"hidden_states must be {want}, got {got}")
        if hidden.shape[3] != self.hidden_size:
            raise ValueError(
                f"hidden_states has hidden size {hidden.shape[3]}, expected {self.hidden_size} "
                f"(shape {tuple(hidden.shape)}, expected {want})"
            )
        if hidden.shape[2] != self.hc_mult:
            raise ValueError(
                f"hidden_states has {hidden.shape[2]} hyper-connection branches, expected "
                f"hc_mult={self.hc_mult} (shape {tuple(hidden.shape)}, expected {want})"
            )
