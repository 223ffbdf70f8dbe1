"""``torch.library`` custom ops over host tables (registered on import as ``torch.ops.engram_rs``).

* ``engram_rs::host_gather(anchor, rows, handle) -> Tensor``: rows of the host table behind
  ``handle`` as float32 ``[n, dim]`` (the Rust gather; the output is pinned where CUDA is
  there, so the copy to the GPU can run asynchronously). ``anchor`` is a zero-size parameter of
  the module: it makes the output require grad, so autograd calls the backward.
* ``engram_rs::attach_copy(host, device_rows) -> Tensor``: rows a prefetch already copied to
  the GPU, made the differentiable result of the host rows (the gradient goes back to them).
* ``engram_rs::host_sparse_step(rows, grad, handle) -> Tensor``: the backward: applies the
  table's fused sparse optimizer to the touched rows (duplicate rows summed first) and returns
  the anchor's (empty) gradient. So ``loss.backward()`` itself updates the table: no
  ``.step()``, no table-sized gradient or temporary.

Both have fake (meta) implementations, so they trace under ``torch.compile`` and pass
``torch.library.opcheck``. A table is referred to by an integer handle (tables are not
tensors); :func:`register` makes one (kept until :func:`unregister`); a module holds its own
binding (:func:`bind`), so a deleted module releases its table, memory and file lock at once.
Row ids must be an integer tensor: a float or bool tensor is refused (a ``TypeError``), never
truncated.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from typing import Any

import torch

from .. import _engram_rs
from ..table import HostTable, Prefetch
from .optim import SparseOptimizer

__all__ = [
    "attach_copy",
    "hash_id_error",
    "host_embedding",
    "host_gather",
    "host_prefetch",
    "host_sparse_step",
    "prefetch",
    "register",
    "unregister",
]


@dataclasses.dataclass
class _DeviceCopy:
    """The copy of prefetched host rows to a GPU, started by a thread once the gather is done
    (on a side stream): ``result`` is ``[rows on the GPU, the event after the copy]``, or
    ``[the exception]``."""

    src: torch.Tensor
    thread: threading.Thread
    result: list[Any]


@dataclasses.dataclass(eq=False)
class _Binding:
    table: HostTable
    optimizer: SparseOptimizer | None
    handle: int = 0
    #: A prefetch in flight: (the rows it gathers, its ticket, its output).
    pending: tuple[torch.Tensor, Prefetch, torch.Tensor] | None = None
    #: Its copy to the GPU, when the rows are for a CUDA device.
    device_copy: _DeviceCopy | None = None


#: Every live binding, by handle. Weak: a module holds its own binding (so a deleted module
#: frees its table, its memory and its file lock at once); ``register`` holds the ones it makes
#: in ``_HELD`` until ``unregister``.
_BINDINGS: weakref.WeakValueDictionary[int, _Binding] = weakref.WeakValueDictionary()
_HELD: dict[int, _Binding] = {}
_COUNTER = itertools.count(1)

#: The dtypes row ids may have (anything else is refused: a float would be truncated, a bool
#: read as rows 0 and 1).
_ROW_DTYPES = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))


def hash_id_error(layer_id: int, position: tuple[int, ...], value: int, rows: int) -> IndexError:
    """The error of a hash id outside its head's table (one message, whoever finds it)."""
    b, t, c = position
    return IndexError(
        f"hash id {value} in column {c} at position ({b}, {t}) is outside layer {layer_id}'s "
        f"table: that column's head has {rows} rows [0, {rows}); hash with the same config "
        "and layer (and flat=False: the module adds the offsets)"
    )


def _check_rows(rows: torch.Tensor) -> None:
    """Refuses row ids that are not an integer tensor (a dtype check only: no data read)."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"row ids must be a torch tensor, got {type(rows).__name__}")
    if rows.dtype not in _ROW_DTYPES:
        raise TypeError(
            f"row ids must be an integer tensor (int64, int32, int16, int8 or uint8), got dtype "
            f"{rows.dtype}: they index table rows, so convert integral values with rows.long() "
            "(a float or bool tensor is not truncated or reinterpreted silently)"
        )


def bind(table: HostTable, optimizer: SparseOptimizer | None) -> _Binding:
    """A binding of ``table`` (trained by ``optimizer``, or inference-only when None) that
    lives as long as the caller keeps it: its ``handle`` stops working once it is freed."""
    if not isinstance(table, HostTable):
        raise TypeError(f"table must be a HostTable, got {type(table).__name__}")
    if optimizer is not None and not isinstance(optimizer, SparseOptimizer):
        raise TypeError(
            "optimizer must be SparseSGD, SparseRowwiseAdagrad or SparseAdam (from "
            f"engram_rs.torch), got {type(optimizer).__name__}"
        )
    b = _Binding(table, optimizer, next(_COUNTER))
    _BINDINGS[b.handle] = b
    return b


def register(table: HostTable, optimizer: SparseOptimizer | None) -> int:
    """A handle for ``table`` (trained by ``optimizer``, or inference-only when None), valid
    (and keeping the table open) until :func:`unregister`. The modules hold theirs themselves,
    so a deleted module releases its table."""
    b = bind(table, optimizer)
    _HELD[b.handle] = b
    return b.handle


def unregister(handle: int) -> None:
    """Forgets a handle made by :func:`register` (the table is freed once nothing else holds
    it)."""
    if _HELD.pop(handle, None) is None:
        raise ValueError(f"no host table registered under handle {handle}")


def binding(handle: int) -> _Binding:
    b = _BINDINGS.get(handle)
    if b is None:
        raise ValueError(
            f"no host table registered under handle {handle} (its module was deleted, or the "
            "handle unregistered)"
        )
    return b


def _pinned() -> bool:
    return torch.cuda.is_available()


def _new_rows(n: int, dim: int) -> torch.Tensor:
    return torch.empty((n, dim), dtype=torch.float32, pin_memory=_pinned())


def prefetch(handle: int, rows: torch.Tensor, device: torch.device | None = None) -> None:
    """Starts gathering ``rows`` now (on the background pool); the next ``host_gather`` of the
    same rows waits for it instead of gathering again. With a CUDA ``device``, the copy of the
    (pinned) rows to it also starts as soon as the gather is done, on a side stream."""
    _check_rows(rows)
    b = binding(handle)
    flat = rows.detach().reshape(-1).to("cpu", torch.int64).contiguous()
    out = _new_rows(flat.numel(), b.table.dim)
    ticket = b.table.prefetch(flat, out=out)
    b.pending = (flat, ticket, out)
    b.device_copy = None
    if device is not None and device.type == "cuda":
        result: list[Any] = []

        def copy() -> None:
            try:
                ticket.wait()
                stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                with torch.cuda.stream(stream):
                    on_device = out.to(device, non_blocking=True)
                    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    done.record(stream)
                result.extend([on_device, done])
            except BaseException as e:  # handed to the forward, which falls back to a copy
                result.append(e)

        thread = threading.Thread(target=copy, name="engram_rs-device-copy", daemon=True)
        thread.start()
        b.device_copy = _DeviceCopy(out, thread, result)


@torch.library.custom_op("engram_rs::host_gather", mutates_args=())
def host_gather(anchor: torch.Tensor, rows: torch.Tensor, handle: int) -> torch.Tensor:
    _check_rows(rows)
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
    _check_rows(rows)
    return rows.new_empty((rows.numel(), binding(handle).table.dim), dtype=torch.float32)


@torch.library.custom_op("engram_rs::host_sparse_step", mutates_args=())
def host_sparse_step(rows: torch.Tensor, grad: torch.Tensor, handle: int) -> torch.Tensor:
    _check_rows(rows)
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


def layer_rows(emb: Any, hash_ids: torch.Tensor) -> torch.Tensor:
    """Flat table rows of per-head hash ids: ``hash_ids + offsets``, int64 on the CPU.

    Eagerly, the core makes them in one pass that also checks each id against its head's rows
    (no torch op, so no OpenMP threads left spinning beside the gather's); under
    ``torch.compile``, torch ops the graph can hold (the module checked nothing then)."""
    if torch.compiler.is_compiling():
        offsets: torch.Tensor = emb.offsets
        return (hash_ids.to(torch.int64) + offsets.to(hash_ids.device)).reshape(-1).cpu()
    ids = hash_ids.detach().cpu().contiguous().numpy()
    offsets_list, bounds = emb._layout
    try:
        rows = _engram_rs.head_rows(ids, offsets_list, bounds)
    except _engram_rs.OutOfRangeError as e:
        raise hash_id_error(emb.layer_id, e.position, e.value, e.bound) from None
    return torch.from_numpy(rows).reshape(-1)


def host_embedding(emb: Any, hash_ids: torch.Tensor) -> torch.Tensor:
    """The rows of an ``EngramEmbedding`` over a host table, ``[B * L * cols, dim]`` float32 on
    ``hash_ids``' device (copied asynchronously from pinned memory where CUDA is there, or
    taken from a prefetch's copy already on the GPU)."""
    handle = emb._host_handle
    out: torch.Tensor = torch.ops.engram_rs.host_gather(
        emb._anchor, layer_rows(emb, hash_ids), handle
    )
    if hash_ids.device.type != "cuda":
        return out.to(hash_ids.device)
    b = binding(handle)
    copy, b.device_copy = b.device_copy, None
    if copy is not None and copy.src.data_ptr() == out.data_ptr():
        copy.thread.join()
        if len(copy.result) == 2:
            on_device, done = copy.result
            current = torch.cuda.current_stream(hash_ids.device)
            current.wait_event(done)
            on_device.record_stream(current)  # made on the side stream, read on this one
            attached: torch.Tensor = torch.ops.engram_rs.attach_copy(out, on_device)
            return attached
    return out.to(hash_ids.device, non_blocking=True)


def host_prefetch(emb: Any, hash_ids: torch.Tensor) -> None:
    """Starts the host gather of ``hash_ids`` now (and, for ids on a GPU, the copy of the rows
    there); the next forward with them waits for it."""
    prefetch(emb._host_handle, layer_rows(emb, hash_ids), hash_ids.device)


@torch.library.custom_op("engram_rs::attach_copy", mutates_args=())
def attach_copy(host: torch.Tensor, device_rows: torch.Tensor) -> torch.Tensor:
    """``device_rows`` (a copy of ``host`` made ahead, on another device) as the differentiable
    result of ``host``: the backward hands the gradient back to ``host``'s device."""
    return device_rows.clone()


@attach_copy.register_fake
def _(host: torch.Tensor, device_rows: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(device_rows)


def _setup_attach(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.host_device = inputs[0].device


def _backward_attach(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    return grad.to(ctx.host_device), None


attach_copy.register_autograd(_backward_attach, setup_context=_setup_attach)
