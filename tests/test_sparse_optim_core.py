"""The fused sparse row-wise optimizers of the core (``_engram_rs.sparse_step``) against torch.

Set ENGRAM_RS_BENCH_OPTIM=1 to also time one step of 262,144 lookups (32 x 1024 tokens x 8
columns) into a 10 M x 64 float32 table against torch's SparseAdam and sparse Adagrad (run with
``-s`` to see the times; about 16 GB of memory).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
from engram_rs import HostTable
from engram_rs import _engram_rs as E

torch = pytest.importorskip("torch")

ROWS, DIM = 50, 64


def f32_table(w: np.ndarray) -> HostTable:
    t = HostTable.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    assert t.writable
    return t


def zeros_state(rows: int, cols: int) -> HostTable:
    return HostTable.from_numpy(np.zeros((rows, cols), np.float32))


def rows_f32(t: HostTable) -> np.ndarray:
    """The table's rows as float32 (dequantized / widened)."""
    return np.asarray(t.gather(np.arange(t.rows), out_dtype="float32"))


def step_ids(rng: np.random.Generator, n: int = 96) -> np.ndarray:
    """Ids with plenty of repeats (and row 3 always several times)."""
    ids = rng.integers(0, ROWS, n, dtype=np.int64)
    ids[::7] = 3
    return ids


def adam(
    t: HostTable,
    state: list[HostTable],
    ids: np.ndarray,
    g: np.ndarray,
    step: int,
    lr: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> int:
    return int(
        E.sparse_step(
            t._core, ids, g, "adam", lr, eps, betas[0], betas[1], [s._core for s in state], step
        )
    )


def dyadic_grads(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gradients in multiples of 2**-10 below 4: their sums are exact in float32 in any order.
    torch's coalesce sums a row's duplicates in the order of an unstable sort (not position
    order, which engram_rs uses), so with general floats the two sums of a repeated row can
    differ by an ulp of the summands, which cancellation can make a large relative difference."""
    return (rng.integers(-4096, 4096, shape) / 1024).astype(np.float32)


def numpy_sparse_adam(
    w: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    ids: np.ndarray,
    g: np.ndarray,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """torch/optim/_functional.py ``sparse_adam``, op for op in float32 numpy (whose sqrt is
    correctly rounded)."""
    f = np.float32
    rows, inv = np.unique(ids, return_inverse=True)
    gs = np.zeros((len(rows), w.shape[1]), np.float32)
    np.add.at(gs, inv, g)
    b1, b2 = betas
    old_m, old_v = m[rows], v[rows]
    upd1 = (gs - old_m) * f(1 - b1)
    upd2 = (gs * gs - old_v) * f(1 - b2)
    m[rows] = old_m + upd1
    v[rows] = old_v + upd2
    numer = upd1 + old_m
    denom = np.sqrt(upd2 + old_v) + f(eps)
    step_size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
    w[rows] = w[rows] + (numer / denom) * f(-step_size)


@pytest.mark.parametrize("grads", ["dyadic", "normal"])
def test_sparse_adam_equals_torch_sparse_adam(grads: str) -> None:
    """Five steps with repeated ids against ``torch.optim.SparseAdam`` on an
    ``nn.Embedding(sparse=True)``, and bit for bit against its formula in numpy.

    Two things differ from torch at the last bit, neither a formula difference: torch's float32
    ``sqrt`` on the CPU (MKL's vector sqrt here) is within one ulp but not correctly rounded,
    which engram_rs's is (so the weights can differ by an ulp of the values involved); and
    torch's coalesce sums a row's duplicates in the order of an unstable sort, engram_rs in
    position order (so with general floats the moments of a repeated row can differ by an ulp of
    the summands). With dyadic gradients (exact sums) the moments equal torch's bit for bit."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    lr, betas, eps = 0.01, (0.9, 0.999), 1e-8
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=lr, betas=betas, eps=eps)
    w = emb.weight.detach().numpy().copy()
    t = f32_table(w.copy())
    m, v = zeros_state(ROWS, DIM), zeros_state(ROWS, DIM)
    ref_m, ref_v = np.zeros_like(w), np.zeros_like(w)
    for step in range(1, 6):
        ids = step_ids(rng).reshape(8, 12)
        if grads == "dyadic":
            g = dyadic_grads(rng, (8, 12, DIM))
        else:
            g = rng.standard_normal((8, 12, DIM), dtype=np.float32)
        opt.zero_grad()
        (emb(torch.from_numpy(ids)) * torch.from_numpy(g)).sum().backward()
        opt.step()
        unique = adam(t, [m, v], ids.reshape(-1), g.reshape(-1, DIM), step, lr, betas, eps)
        assert unique == len(np.unique(ids))
        numpy_sparse_adam(
            w, ref_m, ref_v, ids.reshape(-1), g.reshape(-1, DIM), step, lr, betas, eps
        )
        st = opt.state[emb.weight]
        tw, tm, tv = (x.detach().numpy() for x in (emb.weight, st["exp_avg"], st["exp_avg_sq"]))
        np.testing.assert_array_equal(rows_f32(m), ref_m, f"step {step}")
        np.testing.assert_array_equal(rows_f32(v), ref_v, f"step {step}")
        if grads == "dyadic":
            np.testing.assert_array_equal(rows_f32(t), w, f"step {step}")
            np.testing.assert_array_equal(rows_f32(m), tm, f"step {step}")
            np.testing.assert_array_equal(rows_f32(v), tv, f"step {step}")
            scale = np.abs(w).max()
            np.testing.assert_allclose(rows_f32(t), tw, rtol=1e-6, atol=1e-6 * scale)
        else:
            for ours, theirs in [(t, tw), (m, tm), (v, tv)]:
                np.testing.assert_allclose(
                    rows_f32(ours),
                    theirs,
                    rtol=1e-6,
                    atol=1e-6 * np.abs(theirs).max(),
                    err_msg=f"{step}",
                )


def torch_rowwise_adagrad(
    w: torch.Tensor, acc: torch.Tensor, ids: np.ndarray, g: np.ndarray, lr: float, eps: float
) -> None:
    """Row-wise Adagrad in a few lines of torch: duplicates summed, one accumulator per row."""
    uniq, inv = torch.unique(torch.from_numpy(ids), return_inverse=True)
    gs = torch.zeros(len(uniq), w.shape[1]).index_add_(0, inv, torch.from_numpy(g))
    acc[uniq] += (gs * gs).mean(1)
    w[uniq] -= lr * gs / (acc[uniq].sqrt() + eps)[:, None]


def test_rowwise_adagrad_equals_torch() -> None:
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    t, acc = f32_table(w0.copy()), zeros_state(ROWS, 1)
    tw, tacc = torch.from_numpy(w0.copy()), torch.zeros(ROWS)
    for _ in range(5):
        ids = step_ids(rng)
        g = rng.standard_normal((len(ids), DIM), dtype=np.float32)
        n = E.sparse_step(t._core, ids, g, "rowwise_adagrad", 0.05, 1e-10, 0.0, 0.0, [acc._core], 1)
        assert n == len(np.unique(ids))
        torch_rowwise_adagrad(tw, tacc, ids, g, 0.05, 1e-10)
        np.testing.assert_allclose(rows_f32(acc)[:, 0], tacc.numpy(), rtol=1e-6)
        np.testing.assert_allclose(rows_f32(t), tw.numpy(), rtol=1e-6, atol=1e-7)


def test_sgd_equals_torch_sgd_on_a_sparse_embedding() -> None:
    """Against ``torch.optim.SGD`` on an ``nn.Embedding(sparse=True)``: equal to 1e-6 of the
    weights' scale, not bit for bit, because torch does not coalesce for SGD: it adds each
    lookup's ``-lr * g`` to its row one at a time, with a fused multiply-add, where engram_rs
    sums a row's gradients first (as the issue asks) and computes ``w - lr * g``. Bit for bit
    against that formula in numpy."""
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    w = emb.weight.detach().numpy().copy()
    t = f32_table(w.copy())
    for _ in range(5):
        ids = step_ids(rng)
        g = rng.standard_normal((len(ids), DIM), dtype=np.float32)
        opt.zero_grad()
        (emb(torch.from_numpy(ids)) * torch.from_numpy(g)).sum().backward()
        opt.step()
        E.sparse_step(t._core, ids, g, "sgd", 0.1, 0.0, 0.0, 0.0, [], 1)
        rows, inv = np.unique(ids, return_inverse=True)
        gs = np.zeros((len(rows), DIM), np.float32)
        for p, j in enumerate(inv):  # position order, as engram_rs sums
            gs[j] += g[p]
        w[rows] -= np.float32(0.1) * gs
        np.testing.assert_array_equal(rows_f32(t), w)
        tw = emb.weight.detach().numpy()
        np.testing.assert_allclose(rows_f32(t), tw, rtol=1e-6, atol=1e-6 * np.abs(tw).max())


def test_untouched_rows_and_state_are_left_alone() -> None:
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    t, m, v = f32_table(w0.copy()), zeros_state(ROWS, DIM), zeros_state(ROWS, DIM)
    ids = np.array([5, 9, 5, 40], np.int64)
    adam(t, [m, v], ids, rng.standard_normal((4, DIM), dtype=np.float32), 1)
    other = np.setdiff1d(np.arange(ROWS), ids)
    np.testing.assert_array_equal(rows_f32(t)[other], w0[other])
    assert not rows_f32(m)[other].any() and not rows_f32(v)[other].any()
    assert (rows_f32(t)[[5, 9, 40]] != w0[[5, 9, 40]]).all()


@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad", "adam"])
def test_bfloat16_table_rounds_the_float32_update(kind: str) -> None:
    """A bf16 table trains with float32 state: each step is the float32 update of the bf16
    values, rounded to nearest even (checked against a float32 table reset to those values)."""
    rng = np.random.default_rng(5)
    w0 = torch.randn(ROWS, DIM).to(torch.bfloat16)
    t = HostTable.from_numpy(w0.view(torch.uint16).numpy().copy(), dtype="bfloat16")
    ref_w = w0.float().numpy().copy()
    ref = f32_table(ref_w)
    cols = 1 if kind == "rowwise_adagrad" else DIM
    count = {"sgd": 0, "rowwise_adagrad": 1, "adam": 2}[kind]
    state = [zeros_state(ROWS, cols) for _ in range(count)]
    ref_state = [zeros_state(ROWS, cols) for _ in range(count)]
    for step in range(1, 4):
        ids = step_ids(rng)
        g = rng.standard_normal((len(ids), DIM), dtype=np.float32)
        for table, st in [(t, state), (ref, ref_state)]:
            E.sparse_step(
                table._core, ids, g, kind, 0.01, 1e-8, 0.9, 0.999, [s._core for s in st], step
            )
        want = torch.from_numpy(rows_f32(ref)).to(torch.bfloat16)
        got = torch.from_numpy(rows_f32(t)).to(torch.bfloat16)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), step
        for a, b in zip(state, ref_state, strict=True):
            np.testing.assert_array_equal(rows_f32(a), rows_f32(b))
        ref_w[:] = want.float().numpy()  # the reference goes on from the rounded rows


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_fp8_table_requantizes_touched_rows_with_their_block_scales(kind: str) -> None:
    rng = np.random.default_rng(6)
    w0 = rng.standard_normal((ROWS, DIM), dtype=np.float32) * np.float32(3.0)
    codes, scales = E.quantize_fp8(w0)
    codes = np.asarray(codes).reshape(ROWS, DIM).copy()
    scales = np.asarray(scales).reshape(ROWS, DIM // 32).copy()
    t = HostTable.from_numpy(codes, scales, dtype="float8_e4m3")
    before_codes, before_scales = codes.copy(), scales.copy()
    ref = f32_table(rows_f32(t))
    count = 2 if kind == "adam" else 0
    state = [zeros_state(ROWS, DIM) for _ in range(count)]
    ref_state = [zeros_state(ROWS, DIM) for _ in range(count)]
    ids = np.array([1, 7, 1, 30, 7, 7], np.int64)
    g = rng.standard_normal((len(ids), DIM), dtype=np.float32) * np.float32(50.0)
    for table, st in [(t, state), (ref, ref_state)]:
        E.sparse_step(table._core, ids, g, kind, 0.5, 1e-8, 0.9, 0.999, [s._core for s in st], 1)
    touched = [1, 7, 30]
    want_codes, want_scales = E.quantize_fp8(rows_f32(ref)[touched])
    np.testing.assert_array_equal(codes[touched].reshape(-1), np.asarray(want_codes))
    np.testing.assert_array_equal(scales[touched].reshape(-1), np.asarray(want_scales))
    for a, b in zip(state, ref_state, strict=True):
        np.testing.assert_array_equal(rows_f32(a), rows_f32(b))
    other = np.setdiff1d(np.arange(ROWS), touched)
    np.testing.assert_array_equal(codes[other], before_codes[other])
    assert (codes[touched] != before_codes[touched]).any()
    assert (scales != before_scales).any(), "large updates move the block scales"


def test_a_file_table_opened_writable_trains_and_saves(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    HostTable.create(path, 16, 32, dtype="float32", init="zeros").close()
    t = HostTable.open(path, writable=True)
    g = np.ones((2, 32), np.float32)
    E.sparse_step(t._core, np.array([3, 3], np.int64), g, "sgd", 0.5, 0.0, 0.0, 0.0, [], 1)
    t.flush()
    t.close()
    r = HostTable.open(path)
    np.testing.assert_array_equal(rows_f32(r)[3], np.full(32, -1.0, np.float32))
    assert not rows_f32(r)[[0, 1, 2, 4]].any()


def test_a_read_only_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    HostTable.create(path, 8, 32, dtype="bfloat16").close()
    ro = HostTable.open(path)
    before = rows_f32(ro)
    with pytest.raises(PermissionError, match=r"opened read-only: open it with writable=True"):
        E.sparse_step(
            ro._core,
            np.array([1], np.int64),
            np.ones((1, 32), np.float32),
            "sgd",
            0.1,
            0.0,
            0.0,
            0.0,
            [],
            1,
        )
    np.testing.assert_array_equal(rows_f32(ro), before)
    frozen = np.zeros((8, 32), np.float32)
    frozen.setflags(write=False)
    with pytest.raises(PermissionError, match="read-only"):
        E.sparse_step(
            HostTable.from_numpy(frozen)._core,
            np.array([1], np.int64),
            np.ones((1, 32), np.float32),
            "sgd",
            0.1,
            0.0,
            0.0,
            0.0,
            [],
            1,
        )


def test_bad_ids_are_named_with_their_position() -> None:
    t = f32_table(np.zeros((8, 32), np.float32))
    g = np.ones((3, 32), np.float32)
    with pytest.raises(
        IndexError,
        match=r"row index 8 at position \(1,\) is out of range for a "
        r"table of 8 rows",
    ):
        E.sparse_step(t._core, np.array([0, 8, 2], np.int64), g, "sgd", 0.1, 0, 0, 0, [], 1)
    with pytest.raises(IndexError, match=r"row index -1 at position \(2,\)"):
        E.sparse_step(t._core, np.array([0, 1, -1], np.int64), g, "sgd", 0.1, 0, 0, 0, [], 1)
    assert not rows_f32(t).any(), "nothing written"


def test_bad_arguments_are_value_errors() -> None:
    t = f32_table(np.zeros((8, 32), np.float32))
    ids, g = np.array([1, 2], np.int64), np.ones((2, 32), np.float32)
    m, v = zeros_state(8, 32), zeros_state(8, 32)
    cases = [
        (dict(grads=np.ones((2, 16), np.float32)), r"grads must be float32 \[2, 32\]"),
        (dict(kind="adamw"), "unknown optimizer kind"),
        (dict(kind="adam", state=[]), "needs 2 state tables"),
        (dict(kind="adam", state=[m, m]), "state tables 0 and 1 are the same table"),
        (dict(kind="adam", state=[m, t]), "state table 1 is the table it trains"),
        (dict(kind="adam", state=[m, zeros_state(8, 16)]), r"state table 1 is float32 \[8, 16\]"),
        (dict(kind="rowwise_adagrad", state=[m]), r"expected float32 \[8, 1\]"),
        (dict(kind="adam", state=[m, v], step=0), "step = 0"),
        # One wording for the core's check, whoever calls it (issue 16): torch's names.
        (dict(kind="adam", state=[m, v], beta1=1.0), r"betas\[0\] must be in \[0, 1\), got 1"),
        (dict(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
    ]
    for change, message in cases:
        args = dict(grads=g, kind="sgd", lr=0.1, eps=1e-8, beta1=0.9, beta2=0.999, state=[], step=1)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            E.sparse_step(
                t._core,
                ids,
                args["grads"],
                args["kind"],
                args["lr"],
                args["eps"],
                args["beta1"],
                args["beta2"],
                [s._core for s in args["state"]],
                args["step"],
            )
    # A state that shares the table's memory (two tables over one array).
    w = np.zeros((8, 32), np.float32)
    with pytest.raises(ValueError, match="shares memory with the table"):
        E.sparse_step(
            HostTable.from_numpy(w)._core,
            ids,
            g,
            "adam",
            0.1,
            1e-8,
            0.9,
            0.999,
            [HostTable.from_numpy(w)._core, m._core],
            1,
        )
    assert not rows_f32(t).any() and not rows_f32(m).any()


def test_gradients_that_alias_the_table_are_read_before_the_update() -> None:
    """grads given as a view of the array the table wraps are copied first."""
    w = np.arange(4 * 32, dtype=np.float32).reshape(4, 32)
    want = w.copy()
    want[[0, 1]] -= np.float32(0.5) * w[[2, 3]]
    t = HostTable.from_numpy(w)
    E.sparse_step(t._core, np.array([0, 1], np.int64), w[2:4], "sgd", 0.5, 0.0, 0.0, 0.0, [], 1)
    np.testing.assert_array_equal(w, want)


def test_results_do_not_depend_on_the_order_of_repeats() -> None:
    """Repeated ids: the step sums their gradient rows once (the same as one summed row, up to
    float32 rounding) and updates the row once."""
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((8, 32), dtype=np.float32)
    g = rng.standard_normal((3, 32), dtype=np.float32)
    a, b = f32_table(w0.copy()), f32_table(w0.copy())
    sa, sb = [zeros_state(8, 32), zeros_state(8, 32)], [zeros_state(8, 32), zeros_state(8, 32)]
    assert adam(a, sa, np.array([2, 2, 2], np.int64), g, 1) == 1
    assert adam(b, sb, np.array([2], np.int64), g.sum(0, keepdims=True, dtype=np.float32), 1) == 1
    np.testing.assert_allclose(rows_f32(a), rows_f32(b), rtol=1e-6)


def test_the_step_releases_the_gil() -> None:
    from gil import assert_releases_gil

    rows, n = 400_000, 200_000
    rng = np.random.default_rng(8)
    t = f32_table(np.zeros((rows, DIM), np.float32))
    m, v = zeros_state(rows, DIM), zeros_state(rows, DIM)
    ids = rng.integers(0, rows, n, dtype=np.int64)
    g = rng.standard_normal((n, DIM), dtype=np.float32)
    steps = iter(range(1, 1000))
    assert_releases_gil(lambda: adam(t, [m, v], ids, g, next(steps)))


@pytest.mark.skipif(
    not os.environ.get("ENGRAM_RS_BENCH_OPTIM"),
    reason="a 10 M x 64 timing against torch: set ENGRAM_RS_BENCH_OPTIM=1 (about 16 GB)",
)
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_time_one_step_of_262144_lookups_into_10m_rows() -> None:
    rows, dim, n = 10_000_000, 64, 32 * 1024 * 8
    rng = np.random.default_rng(0)
    # Hash lookups: uniform over the rows, so some ids repeat.
    steps = [
        (rng.integers(0, rows, n, dtype=np.int64), rng.standard_normal((n, dim), dtype=np.float32))
        for _ in range(4)
    ]
    report = []

    def best(times: list[float]) -> str:
        return f"{1e3 * min(times):.1f} ms (median {1e3 * float(np.median(times)):.1f})"

    w = np.empty((rows, dim), np.float32)
    w[:] = 0.01  # resident: every page written (as torch's init writes its weights)
    t = HostTable.from_numpy(w)
    assert t.writable and t.rows == rows
    m, v, acc = np.zeros_like(w), np.zeros_like(w), np.zeros((rows, 1), np.float32)
    for s in (m, v, acc):
        s.fill(0.0)  # prefaulted, as torch's zeros_like state is
    sm, sv, sa = HostTable.from_numpy(m), HostTable.from_numpy(v), HostTable.from_numpy(acc)
    for kind, state in [("adam", [sm, sv]), ("rowwise_adagrad", [sa])]:
        step_t, full_t = [], []
        for i, (ids, g) in enumerate(steps):
            t0 = time.perf_counter()
            out = t.gather(ids)  # the forward's lookup
            t1 = time.perf_counter()
            unique = E.sparse_step(
                t._core, ids, g, kind, 1e-3, 1e-8, 0.9, 0.999, [s._core for s in state], i + 1
            )
            t2 = time.perf_counter()
            step_t.append(t2 - t1)
            full_t.append(t2 - t0)
            del out
        report.append(
            f"engram_rs {kind}: sparse_step {best(step_t)}, gather + step "
            f"{best(full_t)} ({unique} unique rows of {n})"
        )
    del t, sm, sv, sa, w, m, v, acc

    torch.manual_seed(0)
    emb = torch.nn.Embedding(rows, dim, sparse=True)
    for name, make in [
        ("SparseAdam", lambda p: torch.optim.SparseAdam(p, lr=1e-3)),
        ("Adagrad (sparse)", lambda p: torch.optim.Adagrad(p, lr=1e-2)),
    ]:
        opt = make(emb.parameters())
        step_t, full_t = [], []
        for ids, g in steps:
            ti, tg = torch.from_numpy(ids), torch.from_numpy(g)
            t0 = time.perf_counter()
            opt.zero_grad()
            (emb(ti) * tg).sum().backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            step_t.append(t2 - t1)
            full_t.append(t2 - t0)
        # The first step allocates the state (zeros_like, table-sized): left out of "best".
        report.append(
            f"torch {name}: optimizer.step {best(step_t[1:])}, forward + backward + "
            f"step {best(full_t[1:])} (first step {1e3 * full_t[0]:.0f} ms)"
        )
        del opt
    print("\n" + "\n".join(report))
