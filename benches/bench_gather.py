"""pytest-benchmark view of gathers on equal terms: engram_rs, numpy.take and torch.index_select
read the same table array; ``out=`` contenders write the same preallocated output."""

from __future__ import annotations

import engram_rs as er
import numpy as np
import pytest
import torch

ROWS, DIM, BATCH = 1 << 20, 64, 1 << 16


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    out = torch.empty((BATCH, DIM), dtype=torch.float32)
    return table, rng.integers(0, ROWS, size=BATCH), out


@pytest.mark.benchmark(group="gather-f32-dim64-out")
def test_engram_rs_out(benchmark, data) -> None:
    table, idx, out = data
    t = er.HostTable.from_numpy(table)
    benchmark(t.gather, idx, out=out)
    np.testing.assert_array_equal(out.numpy(), table[idx])


@pytest.mark.benchmark(group="gather-f32-dim64-out")
def test_torch_index_select_out(benchmark, data) -> None:
    table, idx, out = data
    t, i = torch.from_numpy(table), torch.from_numpy(idx)
    benchmark(torch.index_select, t, 0, i, out=out)


@pytest.mark.benchmark(group="gather-f32-dim64-out")
def test_numpy_take_out(benchmark, data) -> None:
    table, idx, out = data
    benchmark(np.take, table, idx, axis=0, out=out.numpy())


@pytest.mark.benchmark(group="gather-f32-dim64-new")
def test_engram_rs_new(benchmark, data) -> None:
    table, idx, _ = data
    t = er.HostTable.from_numpy(table)
    benchmark(t.gather, idx)


@pytest.mark.benchmark(group="gather-f32-dim64-new")
def test_numpy_take(benchmark, data) -> None:
    table, idx, _ = data
    benchmark(np.take, table, idx, axis=0)


@pytest.mark.benchmark(group="gather-f32-dim64-new")
def test_torch_index_select(benchmark, data) -> None:
    table, idx, _ = data
    t, i = torch.from_numpy(table), torch.from_numpy(idx)
    benchmark(torch.index_select, t, 0, i)
