"""``torch.library`` custom ops over host tables (registered on import as ``torch.ops.engram_rs``).

* ``engram_rs::host_gather(anchor, rows, handle) -> Tensor``: rows of the host table behind
  ``handle`` as float32 ``[n, dim]`` (the Rust gather; the output is pinned where CUDA is
  there, so the copy to the GPU can run asynchronously). ``anchor`` is a zero-size parameter of
  the module: it makes the output require grad, so autograd calls the backward.
* ``engram_rs::host_sparse_step(rows, grad, handle) -> Tensor``: the backward: applies the
  table's fused sparse optimizer to the touched rows (duplicate rows summed first) and returns
  the anchor's (empty) gradient. So ``loss.backward()`` itself updates the table: no
  ``.step()``, no table-sized gradient or temporary.

Both have fake (meta) implementations, so they trace under ``torch.compile`` and pass
``torch.library.opcheck``. A table is referred to by an integer handle (tables are not
tensors); :func:`register` makes one.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from ..table import HostTable, Prefetch
from .optim import SparseOptimizer

__all__ = [
    "host_embedding",
    "host_gather",
    "host_prefetch",
    "host_sparse_step",
    "prefetch",
    "register",
]


@dataclasses.dataclass
class _Binding:
    table: HostTable
    optimizer: SparseOptimizer | None
    #: A prefetch in flight: (the rows it gathers, its ticket, its output).
    pending: tuple[torch.Tensor, Prefetch, torch.Tensor] | None = None


_BINDINGS: dict[int, _Binding] = {}
_COUNTER = itertools.count(1)


def register(table: HostTable, optimizer: SparseOptimizer | None) -> int:
    """A handle for ``table`` (trained by ``optimizer``, or inference-only when None)."""
    if not isinstance(table, HostTable):
        raise TypeError(f"table must be a HostTable, got {type(table).__name__}")
    if optimizer is not None and not isinstance(optimizer, SparseOptimizer):
        raise TypeError(
            "optimizer must be SparseSGD, SparseRowwiseAdagrad or SparseAdam (from "
            f"engram_rs.torch), got {type(optimizer).__name__}"
        )
    handle = next(_COUNTER)
    _BINDINGS[handle] = _Binding(table, optimizer)
    return handle


def binding(handle: int) -> _Binding:
    try:
        return _BINDINGS[handle]
    except KeyError:
        raise ValueError(f"no host table registered under handle {handle}") from None


def _pinned() -> bool:
    return torch.cuda.is_available()


def _new_rows(n: int, dim: int) -> torch.Tensor:
    return torch.empty((n, dim), dtype=torch.float32, pin_memory=_pinned())


def prefetch(handle: int, rows: torch.Tensor) -> None:
    """Starts gathering ``rows`` now (on the background pool); the next ``host_gather`` of the
    same rows waits for it instead of gathering again."""
    b = binding(handle)
    flat = rows.detach().reshape(-1).to("cpu", torch.int64).contiguous()
    out = _new_rows(flat.numel(), b.table.dim)
    b.pending = (flat, b.table.prefetch(flat, out=out), out)


@torch.library.custom_op("engram_rs::host_gather", mutates_args=())
def host_gather(anchor: torch.Tensor, rows: torch.Tensor, handle: int) -> torch.Tensor:
    b = binding(handle)
    flat = rows.reshape(-1).to(torch.int64).contiguous()
    pending, b.pending = b.pending, None
    if pending is not None:
        want, ticket, out = pending
        ticket.wait()
        if want.shape == flat.shape and torch.equal(want, flat):
            return out
    if _pinned():
        out = _new_rows(flat.numel(), b.table.dim)
        b.table.gather(flat, out=out)
        return out
    # Without CUDA: a new tensor on the library's pooled buffers (no page faults once warm).
    rows_out: torch.Tensor = b.table.gather(flat, out_dtype="float32", framework="torch")
    return rows_out.reshape(flat.numel(), b.table.dim)


@host_gather.register_fake
def _(anchor: torch.Tensor, rows: torch.Tensor, handle: int) -> torch.Tensor:
    return rows.new_empty((rows.numel(), binding(handle).table.dim), dtype=torch.float32)


@torch.library.custom_op("engram_rs::host_sparse_step", mutates_args=())
def host_sparse_step(rows: torch.Tensor, grad: torch.Tensor, handle: int) -> torch.Tensor:
    b = binding(handle)
    if b.optimizer is None:
        raise RuntimeError(
            "backward through a host table without an optimizer: pass optimizer=SparseAdam(...) "
            "(or another engram_rs.torch optimizer), or run the forward under torch.no_grad()"
        )
    b.optimizer.apply(
        b.table,
        rows.reshape(-1).to(torch.int64).contiguous().numpy(),
        grad.detach().to("cpu", torch.float32).reshape(-1, b.table.dim).contiguous().numpy(),
    )
    return grad.new_zeros(0)


@host_sparse_step.register_fake
def _(rows: torch.Tensor, grad: torch.Tensor, handle: int) -> torch.Tensor:
    return grad.new_empty(0)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    anchor, rows, handle = inputs
    ctx.save_for_backward(rows)
    ctx.handle = handle
    ctx.anchor_device = anchor.device  # the module may live on a GPU, the rows on the host


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    (rows,) = ctx.saved_tensors
    anchor_grad = torch.ops.engram_rs.host_sparse_step(rows, grad, ctx.handle)
    return anchor_grad.to(ctx.anchor_device), None, None


host_gather.register_autograd(_backward, setup_context=_setup_context)


def _rows(emb: Any, hash_ids: torch.Tensor) -> torch.Tensor:
    """Flat table rows of per-head hash ids: ``hash_ids + offsets``, on the CPU."""
    offsets: torch.Tensor = emb.offsets
    return (hash_ids.to(torch.int64) + offsets.to(hash_ids.device)).reshape(-1).cpu()


def host_embedding(emb: Any, hash_ids: torch.Tensor) -> torch.Tensor:
    """The rows of an ``EngramEmbedding`` over a host table, ``[B * L * cols, dim]`` float32 on
    ``hash_ids``' device (copied asynchronously from pinned memory where CUDA is there)."""
    out: torch.Tensor = torch.ops.engram_rs.host_gather(
        emb._anchor, _rows(emb, hash_ids), emb._host_handle
    )
    return out.to(hash_ids.device, non_blocking=True)


def host_prefetch(emb: Any, hash_ids: torch.Tensor) -> None:
    """Starts the host gather of ``hash_ids`` now; the next forward with them waits for it."""
    prefetch(emb._host_handle, _rows(emb, hash_ids))
