"""Fused sparse row-wise optimizers for host tables: applied inside ``loss.backward()`` to the
rows a batch touched (duplicate ids summed first), in Rust, multi-threaded, without the GIL.

Their state belongs to the table, and lives in the same kind of memory: for a table file opened
with ``mode="mmap"`` (or a writable tiered one), float32 tables beside the table's file
(``<table>.<kind>-<name>.safetensors``, memory-mapped, found by the file's absolute path) and
the step count beside them (``<table>.<kind>-step.safetensors``), so a reopened table continues
exactly where it stopped; for a table made from an array (or a resident one), in host memory.
Every optimizer of one kind on one table object shares that state; a new table object never
inherits another's (a table that is garbage-collected takes its state with it). The state is
made once, under a lock, and each step (the update and the step count) holds the table's own
lock, so steps from several threads on one table are applied one after the other and none is
lost. bfloat16 and FP8 tables train with float32 state and round the touched rows (FP8:
re-quantized with their UE8M0 block scales).

Non-finite gradients never reach the table: before writing anything, the fused step checks the
gradient of every touched row (one vectorized pass; clipping adds one over the unique rows) and
then either skips the step, writing no row (``nonfinite="skip"``, the default: counted in
``skipped_steps``), or raises ``FloatingPointError`` (``nonfinite="raise"``).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from .. import _engram_rs
from ..table import HostTable

__all__ = ["SparseAdam", "SparseOptimizer", "SparseRowwiseAdagrad", "SparseSGD"]

#: The largest step count the step file holds exactly (two float32 integers below 2**24).
_MAX_STEP = (1 << 48) - 1

#: The core's registry of optimizer kinds: kind -> (class name, hyperparameters, state tables).
KINDS: dict[str, tuple[str, tuple[str, ...], tuple[tuple[str, int | None], ...]]] = {
    kind: (cls, tuple(hyper), tuple(state))
    for kind, cls, hyper, state in _engram_rs.optimizer_kinds()
}


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None


def _positive(name: str, value: object) -> float:
    v = _number(name, value)
    if not v > 0 or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number above 0, got {value!r}")
    return v


def _betas(betas: object) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    return (_number("betas[0]", betas[0]), _number("betas[1]", betas[1]))


class _State(dict[Any, Any]):
    """``torch.optim.Optimizer.state`` (per-parameter state: empty, the rows' state belongs to
    the tables), also callable: ``opt.state(table)`` is ``opt.state_tables(table)``."""

    def __init__(self, owner: SparseOptimizer, items: Any = ()) -> None:
        super().__init__(items)
        self._owner = weakref.ref(owner)

    def __missing__(self, key: Any) -> dict[Any, Any]:  # as torch's defaultdict(dict)
        value: dict[Any, Any] = {}
        self[key] = value
        return value

    def __call__(self, table: HostTable) -> list[HostTable]:
        owner = self._owner()
        assert owner is not None
        return owner.state_tables(table)


class _Hyper:
    """A hyperparameter as an attribute: read from the optimizer's parameter group (where an
    lr_scheduler writes it), checked by the core when set."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, opt: Any, owner: Any = None) -> Any:
        if opt is None:
            return self
        return float(opt.param_groups[0][self.name])

    def __set__(self, opt: Any, value: float) -> None:
        opt._set(self.name, _number(self.name, value))


class _TableState:
    """One table's state for one optimizer kind: the state tables, the step count (persisted
    beside the table's file when it has one) and the lock each step holds."""

    def __init__(
        self, tables: list[HostTable], step: int, counter: HostTable | None, key: Any
    ) -> None:
        self.tables = tables
        self.step = step
        self.counter = counter
        self.key = key
        self.lock = threading.Lock()

    def set_step(self, step: int) -> None:
        if self.counter is not None:
            hi, lo = divmod(step, 1 << 24)
            self.counter.write_rows(np.zeros(1, np.int64), np.array([[hi, lo]], np.float32))
        self.step = step

    def close(self) -> None:
        for t in [*self.tables, *([self.counter] if self.counter is not None else [])]:
            try:
                t.close()
            except Exception:  # a state already closed or gone
                pass


#: The state of each live table: table -> {kind: state}. Weak: a table that is freed takes its
#: state with it, so a new table (even one at the same address) starts from its own.
_STATES: weakref.WeakKeyDictionary[HostTable, dict[str, _TableState]] = weakref.WeakKeyDictionary()
#: File-backed states by (absolute state stem, kind) -> (owner table, state), to hand a file's
#: state over from a closed table object to the one that reopened the file.
_BY_FILE: dict[tuple[str, str], tuple[weakref.ref[HostTable], _TableState]] = {}
#: Guards both maps (reentrant: a table's finalizer may run while it is held).
_LOCK = threading.RLock()


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: a lock another thread held at the fork
    (a step in flight) would never be released there, and the child's next step would block.
    The locks start over unlocked; the tables themselves refuse a call that was in flight at
    the fork (RuntimeError), so a half-done step is never built on."""
    global _LOCK
    _LOCK = threading.RLock()
    for states in list(_STATES.values()):
        for entry in states.values():
            entry.lock = threading.Lock()
    for _, entry in list(_BY_FILE.values()):
        entry.lock = threading.Lock()
    for opt in list(_OPTIMIZERS):
        opt._count_lock = threading.Lock()


#: Every live optimizer (for the fork handler).
_OPTIMIZERS: weakref.WeakSet[SparseOptimizer] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _release(key: tuple[str, str], entry: _TableState) -> None:
    """A file table was freed: close its state files (releasing their locks) at once."""
    with _LOCK:
        if _BY_FILE.get(key, (None, None))[1] is entry:
            del _BY_FILE[key]
    entry.close()


def _closed(table: HostTable) -> bool:
    return table.closed


class SparseOptimizer(torch.optim.Optimizer):
    """Base of the fused optimizers: hyper-parameters, the per-table state and step counts, and
    the safety options every step applies.

    ``nonfinite``: what a step does when the gradient of a touched row (the sum of its gradient
    rows) holds a NaN or an infinity: ``"skip"`` (the default) writes no row of the table or of
    its state, leaves the step count alone and adds 1 to ``skipped_steps``
    (``last_step_skipped`` is then True); ``"raise"`` raises ``FloatingPointError`` (naming the
    row, the lookup and the value), also having written nothing.

    ``max_grad_norm``: clip, inside the fused step, the summed gradient of the rows this step
    touches (of this table) to that global L2 norm, as ``torch.nn.utils.clip_grad_norm_`` does
    (every row times ``max_grad_norm / (norm + 1e-6)`` when that is below 1). None: no clipping.
    Clipping costs one more pass over the touched rows' gradients.

    ``grad_scaler``: a ``torch.amp.GradScaler`` (or a fixed loss scale, a float). The fused step
    runs inside ``loss.backward()``, before ``scaler.unscale_`` or ``scaler.step`` can see the
    gradients, so with a scaler the step sees ``scale x`` the true gradients. Pass the scaler
    here: each step reads ``scaler.get_scale()`` (the scale this backward's loss was multiplied
    by; 1 when the scaler is disabled) and multiplies the summed gradients by its reciprocal
    (rounded to float32, as ``unscale_`` does) before the finiteness check, the clipping and the
    update. A step whose scaled gradient overflowed is then skipped (``nonfinite="skip"``), as
    ``scaler.step`` skips the dense optimizer's step; the same overflow shows in the dense
    gradients of that loss, so ``scaler.update()`` lowers the scale as usual. Without a scaler
    (or a float32/bfloat16 autocast, which needs none) the gradients are used as they come.
    """

    kind: ClassVar[str]
    #: The hyperparameters of the kind, from the core (``betas``: ``beta1`` and ``beta2``).
    hyperparameter_names: ClassVar[tuple[str, ...]] = ("lr",)
    #: Names of the float32 state tables and their width (None: the table's dim), from the core.
    state_shapes: ClassVar[tuple[tuple[str, int | None], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "kind", None) in KINDS:
            _, cls.hyperparameter_names, cls.state_shapes = KINDS[cls.kind]

    def __init__(
        self,
        lr: float,
        *,
        nonfinite: Literal["skip", "raise"] = "skip",
        max_grad_norm: float | None = None,
        grad_scaler: Any = None,
        **hyperparameters: Any,
    ) -> None:
        defaults = {"lr": _number("lr", lr), **hyperparameters}
        self._check(defaults)
        if nonfinite not in ("skip", "raise"):
            raise ValueError(
                f"nonfinite must be 'skip' (skip and count a step whose gradient is not finite) "
                f"or 'raise' (raise FloatingPointError), got {nonfinite!r}"
            )
        # torch.optim.Optimizer wants parameters: the rows are not tensors, so the one group
        # holds a zero-size placeholder (it never has a gradient) and the hyperparameters.
        super().__init__([torch.empty(0, requires_grad=True)], defaults)
        self.nonfinite: Literal["skip", "raise"] = nonfinite
        self.max_grad_norm = (
            None if max_grad_norm is None else _positive("max_grad_norm", max_grad_norm)
        )
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            _positive("grad_scaler (a fixed loss scale)", grad_scaler)
        self.grad_scaler = grad_scaler
        #: Steps skipped because the gradient of a touched row was not finite.
        self.skipped_steps = 0
        #: Whether the last step of this optimizer was skipped.
        self.last_step_skipped = False
        self._count_lock = threading.Lock()
        _OPTIMIZERS.add(self)

    def _check(self, group: dict[str, Any]) -> None:
        """The core's check of a group's hyperparameters (a ValueError in the step's words)."""
        beta1, beta2 = group.get("betas", (0.0, 0.0))
        _engram_rs.check_optimizer(
            self.kind, group["lr"], group.get("eps", 0.0), float(beta1), float(beta2)
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "param_groups", None):
            raise ValueError(
                f"{type(self).__name__} has one parameter group (its hyperparameters): it trains "
                "host tables, not tensors; make another optimizer for other hyperparameters"
            )
        super().add_param_group(param_group)

    @property  # type: ignore[override]
    def state(self) -> _State:
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        # torch.optim.Optimizer sets and reloads it; it stays callable as state_tables().
        self._state = _State(self, value)

    def step(self, closure: Any = None) -> Any:
        """Does nothing (the update ran in ``loss.backward()``); returns ``closure()`` if given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the host rows' gradients never outlive their backward."""

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["engram_rs"] = {
            "kind": self.kind,
            "skipped_steps": self.skipped_steps,
            "nonfinite": self.nonfinite,
            "max_grad_norm": self.max_grad_norm,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("engram_rs")
        if not isinstance(extra, dict) or extra.get("kind") != self.kind:
            got = extra.get("kind") if isinstance(extra, dict) else None
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this state_dict is not of a "
                f"{type(self).__name__} (its kind is {got!r}, expected {self.kind!r})"
            )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: expected one parameter group, got "
                f"{groups!r}"
            )
        group = {k: v for k, v in groups[0].items() if k != "params"}
        if not set(self.defaults) <= set(group):  # (a scheduler adds initial_lr and the like)
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: its hyperparameters are "
                f"{sorted(group)}, expected {sorted(self.defaults)}"
            )
        self._check(group)
        skipped = extra.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"skipped_steps must be an int >= 0, got {skipped!r}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "engram_rs"})
        self.skipped_steps = skipped
        nonfinite = extra.get("nonfinite", self.nonfinite)
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        mgn = extra.get("max_grad_norm")
        self.max_grad_norm = None if mgn is None else _positive("max_grad_norm", mgn)

    def _set(self, name: str, value: Any) -> None:
        group = dict(self.param_groups[0], **{name: value})
        self._check(group)
        self.param_groups[0][name] = value

    lr = _Hyper("lr")

    # -- state -------------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, float]:
        """The hyperparameters the next step uses (``betas`` as ``beta1``, ``beta2``)."""
        group = self.param_groups[0]
        hp = {}
        for name in self.hyperparameter_names:
            if name == "betas":
                hp["beta1"], hp["beta2"] = (float(b) for b in group["betas"])
            else:
                hp[name] = float(group[name])
        return hp

    def state_tables(self, table: HostTable) -> list[HostTable]:
        """The state tables of ``table`` (made on first use: zeros, or read back from the files
        beside the table's file). ``opt.state(table)`` is the same."""
        return self._entry(table).tables

    def _entry(self, table: HostTable) -> _TableState:
        if not isinstance(table, HostTable):
            raise TypeError(f"table must be a HostTable, got {type(table).__name__}")
        with _LOCK:
            kinds = _STATES.setdefault(table, {})
            entry = kinds.get(self.kind)
            if entry is None:
                entry = self._make_entry(table)
                kinds[self.kind] = entry
            return entry

    def _stem(self, table: HostTable) -> str | None:
        if table.path is None or table.mode not in ("mmap", "tiered"):
            return None
        path = os.path.abspath(table.path)
        return path[: -len(".safetensors")] if path.endswith(".safetensors") else path

    def _make_entry(self, table: HostTable) -> _TableState:
        stem = self._stem(table)
        if stem is None:
            zeros = [
                HostTable.from_numpy(np.zeros((table.rows, table.dim if w is None else w), "f4"))
                for _, w in self.state_shapes
            ]
            return _TableState(zeros, 0, None, None)
        key = (stem, self.kind)
        old = _BY_FILE.get(key)
        if old is not None:
            owner, state = old
            alive = owner()
            if alive is not None and alive is not table and not _closed(alive):
                raise RuntimeError(
                    f"{stem}.{self.kind}-*.safetensors: this optimizer state is in use by another "
                    "open table object on the same file: train one table object per file"
                )
            # The file's previous table object was closed (or freed): its state moves here.
            state.close()
            if alive is not None:
                _STATES.get(alive, {}).pop(self.kind, None)
            del _BY_FILE[key]
        paths = [(f"{stem}.{self.kind}-{n}.safetensors", w) for n, w in self.state_shapes]
        had_state = any(os.path.exists(p) for p, _ in paths)
        tables: list[HostTable] = []
        try:
            for p, w in paths:
                tables.append(self._state_file(table, p, w))
            counter, step = self._step_file(f"{stem}.{self.kind}-step.safetensors", had_state)
        except BaseException:
            _TableState(tables, 0, None, None).close()
            raise
        entry = _TableState(tables, step, counter, key)
        _BY_FILE[key] = (weakref.ref(table), entry)
        weakref.finalize(table, _release, key, entry)
        return entry

    def _state_file(self, table: HostTable, path: str, width: int | None) -> HostTable:
        cols = table.dim if width is None else width
        if not os.path.exists(path):
            HostTable.create(path, table.rows, cols, dtype="float32", init="zeros").close()
        state = HostTable.open(path, mode="mmap", writable=True)
        if (state.rows, state.dim, state.dtype) != (table.rows, cols, "float32"):
            shape = f"[{state.rows}, {state.dim}] {state.dtype}"
            state.close()
            raise ValueError(
                f"{path}: optimizer state of shape {shape}, the table needs [{table.rows}, "
                f"{cols}] float32: it belongs to another table; remove it or move the table"
            )
        return state

    def _step_file(self, path: str, had_state: bool) -> tuple[HostTable, int]:
        if not os.path.exists(path):
            if had_state:
                warnings.warn(
                    f"{path} is missing: the {self.kind} state beside it has no step count "
                    "(written by an older engram_rs?); counting steps from 0",
                    RuntimeWarning,
                    stacklevel=4,
                )
            HostTable.create(path, 1, 2, dtype="float32", init="zeros").close()
        counter = HostTable.open(path, mode="mmap", writable=True)
        if (counter.rows, counter.dim, counter.dtype) != (1, 2, "float32"):
            counter.close()
            raise ValueError(
                f"{path}: not an optimizer step count (float32 [1, 2]): remove or move it"
            )
        hi, lo = (float(x) for x in counter.gather(np.zeros(1, np.int64))[0])
        if not all(x >= 0 and x < 1 << 24 and x == int(x) for x in (hi, lo)):
            counter.close()
            raise ValueError(
                f"{path}: the step count is damaged ({hi!r}, {lo!r}): restore it, or load the "
                "table's checkpoint"
            )
        return counter, int(hi) * (1 << 24) + int(lo)

    def step_count(self, table: HostTable) -> int:
        """Steps applied to ``table`` so far (skipped steps not counted)."""
        return self._entry(table).step

    def set_step_count(self, table: HostTable, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {step!r}")
        if not 0 <= int(step) <= _MAX_STEP:
            raise ValueError(f"step must be in [0, 2**48), got {step}")
        entry = self._entry(table)
        with entry.lock:
            entry.set_step(int(step))

    # -- the update ----------------------------------------------------------------------------

    def _inverse_scale(self) -> float:
        scaler = self.grad_scaler
        if scaler is None:
            return 1.0
        if callable(getattr(scaler, "get_scale", None)):
            scale = float(scaler.get_scale())
        else:
            scale = float(scaler)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"{type(self).__name__}: the grad scaler's scale is {scale!r}: it must be a "
                "finite number above 0"
            )
        # As GradScaler.unscale_: the reciprocal in float64, rounded to float32.
        return float(np.float32(1.0 / scale))

    def apply(self, table: HostTable, rows: np.ndarray, grads: np.ndarray) -> int:
        """One step on the rows ``rows`` (flat table rows, int64 ``[n]``) with gradient rows
        ``grads`` (float32 ``[n, dim]``); returns the number of distinct rows updated (0 for a
        skipped step)."""
        if not table.writable:
            raise PermissionError(
                "backward through a read-only table: open it with HostTable.open(path, "
                "writable=True) to train it, or run the forward under torch.no_grad()"
            )
        hp = {"eps": 0.0, "beta1": 0.0, "beta2": 0.0, **self.hyperparameters()}
        inv = self._inverse_scale()
        ids = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        g = np.ascontiguousarray(grads, dtype=np.float32).reshape(-1, table.dim)
        entry = self._entry(table)
        with entry.lock:
            step = entry.step + 1
            if step > _MAX_STEP:
                raise OverflowError(f"{type(self).__name__}: more than 2**48 steps")
            try:
                touched: int = _engram_rs.sparse_step(
                    table.binding,
                    ids,
                    g,
                    self.kind,
                    hp["lr"],
                    hp["eps"],
                    hp["beta1"],
                    hp["beta2"],
                    [s.binding for s in entry.tables],
                    step,
                    check_finite=True,
                    grad_scale=inv,
                    max_grad_norm=self.max_grad_norm,
                )
            except FloatingPointError as e:
                self.last_step_skipped = True
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"{e} (nonfinite='raise'; pass nonfinite='skip' to skip such steps, or "
                        "find where the loss overflows: a lower learning rate, a GradScaler)"
                    ) from None
                with self._count_lock:
                    self.skipped_steps += 1
                return 0
            entry.set_step(step)
        self.last_step_skipped = False
        return touched

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


class SparseSGD(SparseOptimizer):
    """``w -= lr * g`` on the touched rows."""

    kind = "sgd"


class SparseRowwiseAdagrad(SparseOptimizer):
    """One accumulator per row: ``acc += mean(g**2)``, ``w -= lr * g / (sqrt(acc) + eps)``."""

    kind = "rowwise_adagrad"

    def __init__(
        self,
        lr: float = 0.01,
        eps: float = 1e-10,
        *,
        nonfinite: Literal["skip", "raise"] = "skip",
        max_grad_norm: float | None = None,
        grad_scaler: Any = None,
    ) -> None:
        super().__init__(
            lr,
            nonfinite=nonfinite,
            max_grad_norm=max_grad_norm,
            grad_scaler=grad_scaler,
            eps=_number("eps", eps),
        )

    eps = _Hyper("eps")


class SparseAdam(SparseOptimizer):
    """``torch.optim.SparseAdam`` on the touched rows (the same formula, float32 state)."""

    kind = "adam"

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        nonfinite: Literal["skip", "raise"] = "skip",
        max_grad_norm: float | None = None,
        grad_scaler: Any = None,
    ) -> None:
        super().__init__(
            lr,
            nonfinite=nonfinite,
            max_grad_norm=max_grad_norm,
            grad_scaler=grad_scaler,
            betas=_betas(betas),
            eps=_number("eps", eps),
        )

    @property
    def betas(self) -> tuple[float, float]:
        b1, b2 = self.param_groups[0]["betas"]
        return (float(b1), float(b2))

    @betas.setter
    def betas(self, value: tuple[float, float]) -> None:
        self._set("betas", _betas(value))

    eps = _Hyper("eps")
