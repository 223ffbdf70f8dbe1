"""Fused sparse row-wise optimizers for host tables: applied inside ``loss.backward()`` to the
rows a batch touched (duplicate ids summed first), in Rust, multi-threaded, without the GIL.

Their state lives beside the table, in the same kind of memory: float32 tables next to the
table's file (``<table>.<kind>-<name>.safetensors``, memory-mapped) for a file table, in host
memory for a table made from an array. bfloat16 and FP8 tables train with float32 state and
round the touched rows (FP8: re-quantized with their UE8M0 block scales).
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

from .. import _engram_rs
from ..table import HostTable

__all__ = ["SparseAdam", "SparseOptimizer", "SparseRowwiseAdagrad", "SparseSGD"]


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (v >= 0 if allow_zero else v > 0) or not np.isfinite(v):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


class SparseOptimizer:
    """Base of the fused optimizers: hyper-parameters, per-table state and step counts."""

    kind: ClassVar[str]
    #: Names of the float32 state tables and their width (None: the table's dim).
    state_shapes: ClassVar[tuple[tuple[str, int | None], ...]] = ()

    def __init__(self, lr: float) -> None:
        self.lr = _positive("lr", lr, allow_zero=True)
        self._state: dict[int, list[HostTable]] = {}
        self._steps: dict[int, int] = {}

    # -- state -------------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}

    def state(self, table: HostTable) -> list[HostTable]:
        """The state tables of ``table`` (made on first use: zeros)."""
        key = id(table)
        if key not in self._state:
            self._state[key] = [self._make_state(table, n, w) for n, w in self.state_shapes]
        return self._state[key]

    def _make_state(self, table: HostTable, name: str, width: int | None) -> HostTable:
        cols = table.dim if width is None else width
        if table.path is not None and table.mode == "mmap":
            stem = (
                table.path[: -len(".safetensors")]
                if table.path.endswith(".safetensors")
                else (table.path)
            )
            path = f"{stem}.{self.kind}-{name}.safetensors"
            if os.path.exists(path):
                state = HostTable.open(path, mode="mmap", writable=True)
                if (state.rows, state.dim, state.dtype) != (table.rows, cols, "float32"):
                    raise ValueError(
                        f"{path}: optimizer state of shape [{state.rows}, {state.dim}] "
                        f"{state.dtype}, the table needs [{table.rows}, {cols}] float32: it "
                        "belongs to another table; remove it or move the table"
                    )
                return state
            HostTable.create(path, table.rows, cols, dtype="float32", init="zeros")
            return HostTable.open(path, mode="mmap", writable=True)
        return HostTable.from_numpy(np.zeros((table.rows, cols), np.float32))

    def step_count(self, table: HostTable) -> int:
        """Steps applied to ``table`` so far."""
        return self._steps.get(id(table), 0)

    def set_step_count(self, table: HostTable, step: int) -> None:
        self._steps[id(table)] = int(step)

    # -- the update ----------------------------------------------------------------------------

    def apply(self, table: HostTable, rows: np.ndarray, grads: np.ndarray) -> int:
        """One step on the rows ``rows`` (flat table rows, int64 ``[n]``) with gradient rows
        ``grads`` (float32 ``[n, dim]``); returns the number of distinct rows updated."""
        if not table.writable:
            raise PermissionError(
                "backward through a read-only table: open it with HostTable.open(path, "
                "writable=True) to train it, or run the forward under torch.no_grad()"
            )
        step = self.step_count(table) + 1
        hp = {"eps": 0.0, "beta1": 0.0, "beta2": 0.0, **self.hyperparameters()}
        touched: int = _engram_rs.sparse_step(
            table._core,
            np.ascontiguousarray(rows, dtype=np.int64).reshape(-1),
            np.ascontiguousarray(grads, dtype=np.float32).reshape(-1, table.dim),
            self.kind,
            hp["lr"],
            hp["eps"],
            hp["beta1"],
            hp["beta2"],
            [s._core for s in self.state(table)],
            step,
        )
        self._steps[id(table)] = step
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
    state_shapes = (("acc", 1),)

    def __init__(self, lr: float = 0.01, eps: float = 1e-10) -> None:
        super().__init__(lr)
        self.eps = _positive("eps", eps, allow_zero=True)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "eps": self.eps}


class SparseAdam(SparseOptimizer):
    """``torch.optim.SparseAdam`` on the touched rows (the same formula, float32 state)."""

    kind = "adam"
    state_shapes = (("exp_avg", None), ("exp_avg_sq", None))

    def __init__(
        self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _positive("eps", eps, allow_zero=True)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.betas[0], "beta2": self.betas[1], "eps": self.eps}
