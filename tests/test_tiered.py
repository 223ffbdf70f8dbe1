"""Tiered tables (``HostTable.open_tiered``): the same rows as the mapped table for every dtype,
output and entry point, the hot set chosen from row counts, faults as clear errors, and training:
bit for bit the training of a resident table once flushed, a crash losing only what came after
the last flush."""

from __future__ import annotations

import os

import engram_rs as er
import numpy as np
import pytest
from engram_rs.table import hot_rows_for
from isolated import expect_error, run_isolated

torch = pytest.importorskip("torch")

ROWS, DIM = 4000, 64


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16", "float8_e4m3"])
def table_file(request, tmp_path_factory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("tiered") / f"{request.param}.safetensors"
    er.HostTable.create(path, ROWS, DIM, dtype=request.param, init="normal", std=0.5, seed=1)
    return str(path), request.param


def _zipf_ids(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).zipf(1.3, n) * 7919 % ROWS).astype(np.int64)


@pytest.mark.parametrize("hot", ["none", "some", "all"])
def test_gathers_prefetches_and_out_equal_the_mapped_table(table_file, hot) -> None:
    path, dtype = table_file
    mapped = er.HostTable.open(path)
    counts = np.bincount(_zipf_ids(20_000, 0), minlength=ROWS)
    budget = {"none": 0, "some": 300 * (mapped.nbytes // ROWS), "all": mapped.nbytes}[hot]
    t = er.HostTable.open_tiered(path, hot_bytes=budget, row_counts=counts, direct=None)
    assert (t.mode, t.rows, t.dim, t.dtype, t.writable) == ("tiered", ROWS, DIM, dtype, False)
    idx = _zipf_ids(3000, 1).reshape(30, 100)  # any shape, repeats included
    for out_dtype in ("float32", "bfloat16", "float16"):
        want = mapped.gather(idx, out_dtype=out_dtype, framework="torch")
        assert torch.equal(t.gather(idx, out_dtype=out_dtype, framework="torch"), want)
        if out_dtype != "bfloat16":  # numpy has none
            np_want = mapped.gather(idx, out_dtype=out_dtype)
            assert np.array_equal(t.gather(idx, out_dtype=out_dtype), np_want)
        out = torch.empty_like(want)
        assert t.gather(torch.from_numpy(idx), out=out) is out and torch.equal(out, want)
        out2 = torch.empty_like(want)
        t.prefetch(idx, out=out2).wait()
        assert torch.equal(out2, want)
    stats = t.tier_stats
    assert stats is not None and stats["lookups"] == 11 * idx.size  # 4 gathers a dtype, 3 in bf16
    assert stats["hot_rows"] == {"none": 0, "some": 300, "all": np.count_nonzero(counts)}[hot]
    if hot == "none":
        assert stats["hits"] == 0 and stats["misses"] > 0 and stats["reads"] > 0
    assert mapped.tier_stats is None


def test_the_v41_layer_runs_on_a_tiered_table_as_on_a_mapped_one(tmp_path) -> None:
    from engram_rs.torch import EngramV41

    cfg = er.EngramConfig.preset("deepseek-v4.1-flash").replace(
        engram_vocab_size=[211, 223, 227], hidden_size=32, layer_ids=[1]
    )
    hasher = er.NgramHasher(cfg, 1000, compressed_pad_id=2)
    path = tmp_path / "embed.safetensors"
    er.HostTable.create(path, hasher.table_rows[1], cfg.head_dim, dtype="float8_e4m3", std=0.1)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 24))
    hash_ids = torch.from_numpy(hasher.hash(ids)[1])
    flat = (hash_ids + torch.tensor(hasher.offsets[1])).reshape(-1).numpy()
    counts = np.bincount(flat, minlength=hasher.table_rows[1])
    tiered = er.HostTable.open_tiered(path, hot_bytes=100 * 264, row_counts=counts)
    h = torch.randn(2, 24, cfg.hc_mult, 32, dtype=torch.bfloat16)
    outs = []
    for table in (er.HostTable.open(path), tiered):
        torch.manual_seed(0)
        layer = EngramV41(hasher, 1, table=table, optimizer=None)
        with torch.no_grad():
            outs.append(layer(h, hash_ids))
    assert torch.equal(outs[0], outs[1])
    assert tiered.tier_stats["hits"] > 0 and tiered.tier_stats["misses"] > 0


def test_hot_rows_for_takes_the_most_counted_rows_within_the_budget() -> None:
    counts = np.array([5, 0, 9, 5, 1, 9, 0, 5])
    assert hot_rows_for(counts, 8, 10, 25).tolist() == [2, 5]  # two rows of 10 bytes
    # Ties at the k-th count go to the lower rows; rows never counted are never hot.
    assert hot_rows_for(counts, 8, 10, 30).tolist() == [0, 2, 5]
    assert hot_rows_for(counts, 8, 10, 1000).tolist() == [0, 2, 3, 4, 5, 7]
    assert hot_rows_for(counts, 8, 10, 9).size == 0
    with pytest.raises(ValueError, match="one count per row"):
        hot_rows_for(counts, 9, 10, 100)


def test_bad_hot_sets_and_training_read_only_are_refused(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    er.HostTable.create(path, 100, 32, dtype="float32")
    with pytest.raises(ValueError, match="needs its hot set"):
        er.HostTable.open_tiered(path)
    with pytest.raises(ValueError, match="row_counts="):
        er.HostTable.open_tiered(path, hot_bytes=1000)
    with pytest.raises(ValueError, match="hot_bytes = -1"):
        er.HostTable.open_tiered(path, hot_bytes=-1, row_counts=np.ones(100, np.int64))
    with pytest.raises(ValueError, match="outside the table's 100 rows"):
        er.HostTable.open_tiered(path, hot_rows=[3, 100])
    with pytest.raises(ValueError, match="row ids are >= 0"):
        er.HostTable.open_tiered(path, hot_rows=[-1])
    with pytest.raises(ValueError, match="HostTable.open_tiered"):
        er.HostTable.open(path, mode="tiered")
    t = er.HostTable.open_tiered(path, hot_rows=[5, 1, 5])  # repeats and order are fine
    assert t.tier_stats["hot_rows"] == 2
    with pytest.raises(IndexError):
        t.gather(np.array([100]))
    with pytest.raises(ValueError, match="tiered"):
        t.read_raw(0, 1)
    from engram_rs.torch import SparseSGD

    with pytest.raises(PermissionError, match="read-only"):
        SparseSGD(lr=0.1).apply(t, np.array([1]), np.ones((1, 32), np.float32))
    with pytest.raises(ValueError, match="dirty_bytes = -1"):
        er.HostTable.open_tiered(path, hot_rows=[1], writable=True, dirty_bytes=-1)


def test_a_file_truncated_under_a_tiered_table_is_an_os_error_not_a_crash(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    er.HostTable.create(path, 5000, 64, dtype="float8_e4m3", std=0.1)
    expect_error(
        f"""
        import os, numpy as np, engram_rs as er
        t = er.HostTable.open_tiered({str(path)!r}, hot_rows=[0, 1], direct=False)
        assert t.gather(np.array([1, 4999])).shape == (2, 64)
        os.truncate({str(path)!r}, 8192)       # another process cuts the file
        t.gather(np.array([1]))                # a hot row: still in memory
        t.gather(np.array([4000, 1]))
        """,
        "OSError",
        r"t\.safetensors: short read at offset \d+: 0 of the \d+ bytes",
    )


# ---- training ---------------------------------------------------------------------------------


def _twins(tmp_path, dtype: str, rows: int = ROWS) -> tuple[str, str]:
    a, b = tmp_path / f"resident-{dtype}.safetensors", tmp_path / f"tiered-{dtype}.safetensors"
    er.HostTable.create(a, rows, DIM, dtype=dtype, init="normal", std=0.5, seed=3)
    b.write_bytes(a.read_bytes())
    return str(a), str(b)


def _steps(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (_zipf_ids(500, seed + k), rng.standard_normal((500, DIM)).astype(np.float32))
        for k in range(n)
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3"])
@pytest.mark.parametrize("kind", ["SparseSGD", "SparseRowwiseAdagrad", "SparseAdam"])
def test_training_a_tiered_table_then_flushing_is_resident_training_bit_for_bit(
    tmp_path, dtype: str, kind: str
) -> None:
    import engram_rs.torch as ert

    a, b = _twins(tmp_path, dtype)
    resident = er.HostTable.open(a, mode="resident", writable=True)
    counts = np.bincount(_zipf_ids(20_000, 0), minlength=ROWS)
    row = resident.nbytes // ROWS
    # A small hot set and a store of 50 rows: steps write back, gathers meet rows held in the
    # store, read from the file and hot.
    tiered = er.HostTable.open_tiered(
        b, hot_bytes=200 * row, row_counts=counts, writable=True, dirty_bytes=50 * row
    )
    opts = [getattr(ert, kind)(lr=0.05), getattr(ert, kind)(lr=0.05)]
    everything = np.arange(ROWS)
    for k, (ids, grads) in enumerate(_steps(6, 1)):
        assert opts[0].apply(resident, ids, grads) == opts[1].apply(tiered, ids, grads)
        want = resident.gather(everything, framework="torch")
        assert torch.equal(tiered.gather(everything, framework="torch"), want), k
        if k == 2:
            tiered.flush()
    stats = tiered.tier_stats
    assert stats["flushes"] >= 2 and stats["dirty_rows"] + stats["dirty_hot_rows"] > 0, stats
    for x, y in zip(opts[0].state_tables(resident), opts[1].state_tables(tiered), strict=True):
        assert np.array_equal(x.gather(everything), y.gather(everything))
    resident.flush()
    tiered.close()  # flushes
    resident.close()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read(), "the flushed tiered file differs from resident training"


def test_the_v41_layer_trains_a_tiered_table_as_a_mapped_one(tmp_path) -> None:
    from engram_rs.torch import EngramV41, SparseRowwiseAdagrad

    cfg = er.EngramConfig.preset("deepseek-v4.1-flash").replace(
        engram_vocab_size=[211, 223, 227], hidden_size=32, layer_ids=[1]
    )
    hasher = er.NgramHasher(cfg, 1000, compressed_pad_id=2)
    rows = hasher.table_rows[1]
    a, b = tmp_path / "mapped.safetensors", tmp_path / "tiered.safetensors"
    er.HostTable.create(a, rows, cfg.head_dim, dtype="float8_e4m3", std=0.1, seed=2)
    b.write_bytes(a.read_bytes())
    original = a.read_bytes()
    tables = [
        er.HostTable.open(a, writable=True),
        er.HostTable.open_tiered(b, hot_rows=np.arange(0, rows, 5), writable=True),
    ]
    rng = np.random.default_rng(0)
    batches = [
        (
            torch.from_numpy(hasher.hash(rng.integers(0, 1000, (2, 24)))[1]),
            torch.randn(2, 24, cfg.hc_mult, 32, dtype=torch.bfloat16),
        )
        for _ in range(3)
    ]
    for table in tables:
        torch.manual_seed(0)
        layer = EngramV41(hasher, 1, table=table, optimizer=SparseRowwiseAdagrad(lr=0.1))
        for hash_ids, h in batches:
            layer(h.requires_grad_(), hash_ids).float().square().sum().backward()
        table.close()
    assert a.read_bytes() != original
    assert a.read_bytes() == b.read_bytes()


def test_a_killed_process_loses_only_the_updates_since_the_last_flush(tmp_path) -> None:
    a, b = _twins(tmp_path, "float8_e4m3")
    steps = _steps(4, 7)
    np.savez(tmp_path / "steps.npz", *[x for s in steps for x in s])
    # The child trains the tiered table, flushes after two steps, takes two more and dies
    # without closing it (its write-back store never reaches the file).
    out = run_isolated(
        f"""
        import os, numpy as np, engram_rs as er
        from engram_rs.torch import SparseSGD
        z = np.load({str(tmp_path / "steps.npz")!r})
        arrays = [z[f"arr_{{i}}"] for i in range(8)]
        t = er.HostTable.open_tiered({b!r}, hot_rows=np.arange(0, {ROWS}, 3), writable=True)
        opt = SparseSGD(lr=0.5)
        for k in range(4):
            opt.apply(t, arrays[2 * k], arrays[2 * k + 1])
            if k == 1:
                t.flush()
        assert t.tier_stats["dirty_rows"] > 0
        os._exit(0)
        """
    )
    assert out.returncode == 0, out
    from engram_rs.torch import SparseSGD

    resident = er.HostTable.open(a, mode="resident", writable=True)
    opt = SparseSGD(lr=0.5)
    for ids, grads in steps[:2]:
        opt.apply(resident, ids, grads)
    resident.flush()
    resident.close()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read(), "the file is not as of the last flush"
    assert not os.path.exists(b + ".journal")


def test_a_forked_child_never_writes_the_parents_changes_back(tmp_path) -> None:
    a, b = _twins(tmp_path, "float32")
    out = run_isolated(
        f"""
        import os, numpy as np, engram_rs as er
        from engram_rs.torch import SparseSGD
        t = er.HostTable.open_tiered({b!r}, hot_rows=[0, 1], writable=True)
        SparseSGD(lr=0.5).apply(t, np.array([1, 2, 3000]), np.ones((3, {DIM}), np.float32))
        pid = os.fork()
        if pid == 0:
            try:
                t.flush()
                print("CHILD flushed")
            except Exception as e:
                print("CHILD", type(e).__name__, str(e)[:80])
            t.close()                      # no write-back in the child
            os._exit(0)
        os.waitpid(pid, 0)
        print("PARENT", t.tier_stats["dirty_rows"], t.tier_stats["flushes"])
        t.close()
        """
    )
    assert "CHILD ValueError this tiered table was opened writable by process" in out.stdout, out
    assert "PARENT 2 0" in out.stdout, out
    resident = er.HostTable.open(a, mode="resident", writable=True)
    from engram_rs.torch import SparseSGD

    SparseSGD(lr=0.5).apply(resident, np.array([1, 2, 3000]), np.ones((3, DIM), np.float32))
    resident.flush()
    resident.close()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
