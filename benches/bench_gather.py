"""pytest-benchmark view of gathers: engram_rs, numpy.take and torch.index_select, same rows."""

from __future__ import annotations

import engram_rs as er
import numpy as np
import pytest
import torch

ROWS, DIM, BATCH = 1 << 20, 64, 1 << 16


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    return table, rng.integers(0, ROWS, size=BATCH)


@pytest.mark.benchmark(group="gather-f32-dim64")
def test_engram_rs(benchmark, data) -> None:
    table, idx = data
    t = er.HostTable.from_numpy(table)
    out = np.empty((BATCH, DIM), np.float32)
    benchmark(t.gather, idx, out=out)
    np.testing.assert_array_equal(out, table[idx])


@pytest.mark.benchmark(group="gather-f32-dim64")
def test_numpy_take(benchmark, data) -> None:
    table, idx = data
    benchmark(np.take, table, idx, axis=0)


@pytest.mark.benchmark(group="gather-f32-dim64")
def test_torch_index_select(benchmark, data) -> None:
    table, idx = data
    t, i = torch.from_numpy(table), torch.from_numpy(idx)
    benchmark(torch.index_select, t, 0, i)
