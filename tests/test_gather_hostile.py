"""Gathers given memory that overlaps, or changes under them, and the gather benchmark's CLI."""

from __future__ import annotations

import subprocess
import sys

import engram_rs as er
import numpy as np
import pytest
from isolated import expect_error, run_isolated

SETUP = """
import numpy as np, engram_rs as er
arr = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
t = er.HostTable.from_numpy(arr)
"""


def test_out_inside_the_tables_own_array_is_refused() -> None:
    for call in ("t.gather(idx, out=arr[10:13])", "t.prefetch(idx, out=arr[60:63]).wait()"):
        expect_error(
            SETUP + f"idx = np.array([0, 1, 2])\n{call}",
            "ValueError",
            r"out overlaps the table's values \(out is a view of the array the table wraps\): "
            "pass a separate output array",
        )


def test_out_overlapping_the_fp8_scales_is_refused() -> None:
    code = """
    import numpy as np, engram_rs as er
    buf = np.zeros(4096, np.uint8)
    codes = np.zeros((4, 64), np.uint8)
    scales = buf[:8].reshape(4, 2)
    t = er.HostTable.from_numpy(codes, scales, dtype="float8_e4m3")
    out = buf[:256].view(np.float32).reshape(1, 64)
    t.gather(np.array([1]), out=out)
    """
    expect_error(code, "ValueError", "out overlaps the table's scales: pass a separate output")


def test_out_overlapping_the_indices_is_refused() -> None:
    # int64 indices and a float32 output that share bytes (the output's first row holds them).
    code = SETUP + (
        "buf = np.zeros(64, np.int64)\n"
        "idx = buf[:4]\n"
        "out = buf.view(np.float32)[:32].reshape(4, 8)\n"
        "{call}\n"
    )
    for call in ("t.gather(idx, out=out)", "t.prefetch(idx, out=out).wait()"):
        expect_error(
            code.format(call=call),
            "ValueError",
            "out overlaps the index array: pass a separate output array",
        )


def test_separate_outputs_next_to_the_indices_still_work() -> None:
    arr = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    t = er.HostTable.from_numpy(arr)
    buf = np.zeros(64 + 16, np.int64)
    idx = buf[:16]
    idx[:] = np.arange(16)[::-1]
    out = buf[16:].view(np.float32).reshape(16, 8)  # the bytes right after the indices
    t.gather(idx, out=out)
    np.testing.assert_array_equal(out, arr[idx])
    out[:] = 0
    t.prefetch(idx, out=out).wait()
    np.testing.assert_array_equal(out, arr[idx])


def test_bad_indices_still_raise_index_error_before_writing() -> None:
    arr = np.ones((10, 4), np.float32)
    t = er.HostTable.from_numpy(arr)
    out = np.full((2, 3, 4), 7, np.float32)
    with pytest.raises(IndexError, match=r"row index -1 at position \(1, 2\)"):
        t.gather(np.array([[0, 1, 2], [3, 4, -1]]), out=out)
    assert (out == 7).all()


@pytest.mark.parametrize("scalar", ["0", "1"])
def test_indices_written_by_another_thread_during_gathers_never_crash(scalar: str) -> None:
    # A writer thread flips the index array between in-range and far out-of-range values while
    # gathers run with the GIL released: each gather returns, or raises IndexError (caught by the
    # check) or ValueError (caught where the index is used), and never reads out of bounds.
    code = """
    import threading, numpy as np, engram_rs as er
    rows, n = 1000, 1 << 16
    arr = np.ones((rows, 64), np.float32)
    arr_bf = np.ones((rows, 64), np.uint16)
    tables = [er.HostTable.from_numpy(arr), er.HostTable.from_numpy(arr_bf, dtype="bfloat16")]
    idx = np.zeros(n, np.int64)
    stop = False
    def writer():
        bad = np.full(n, 1 << 40, np.int64)
        good = np.zeros(n, np.int64)
        while not stop:
            idx[:] = bad
            idx[:] = good
    th = threading.Thread(target=writer)
    th.start()
    outcomes = {"ok": 0, "IndexError": 0, "ValueError": 0}
    outs = [np.empty((n, 64), np.float32), np.empty((n, 64), np.uint16)]
    try:
        for i in range(400):
            t = tables[i % 2]
            try:
                if i % 4 < 2:
                    t.gather(idx, out=outs[i % 2], out_dtype=t.dtype)
                else:
                    t.gather(idx, out_dtype="float32")
                outcomes["ok"] += 1
            except IndexError:
                outcomes["IndexError"] += 1
            except ValueError as e:
                assert "the index array changed during the gather" in str(e), e
                outcomes["ValueError"] += 1
    finally:
        stop = True
        th.join()
    print(outcomes)
    """
    out = run_isolated(code, env={"ENGRAM_RS_FORCE_SCALAR": scalar})
    assert out.returncode == 0, out
    assert "{'ok'" in out.stdout, out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engram_rs", "bench", "gather", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-rows", "0"], "--batch-rows must be >= 1, got 0"),
        (["--dim", "-3"], "--dim must be >= 1, got -3"),
        (["--rows", "0"], "--rows must be >= 1, got 0"),
        (["--dtype", "float64"], "invalid choice: 'float64'"),
        (["--dtype", "float8_e4m3", "--dim", "48"], "multiple of 32, got 48"),
        (["--table-gib", "0"], "--table-gib must be > 0"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ],
)
def test_bench_gather_refuses_bad_arguments_with_a_usage_error(
    args: list[str], message: str
) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.splitlines()[-1], proc.stderr


def test_bench_gather_takes_dtype_and_dim_from_the_file(tmp_path: object) -> None:
    path = str(tmp_path) + "/t.safetensors"  # type: ignore[operator]
    er.HostTable.create(path, 1000, 32, dtype="float32", init="zeros").close()
    proc = _cli("--path", path, "--dtype", "bfloat16")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    assert (
        "--dtype bfloat16 does not match the table in" in proc.stderr
        and "(dtype float32): drop --dtype or pass --dtype float32" in proc.stderr
    )
    proc = _cli("--path", path, "--dim", "64")
    assert proc.returncode == 2 and "(dim 32)" in proc.stderr, proc
    not_a_table = str(tmp_path) + "/junk.safetensors"  # type: ignore[operator]
    with open(not_a_table, "wb") as f:
        f.write(b"not a safetensors file")
    proc = _cli("--path", not_a_table)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    proc = _cli("--path", path, "--batch-rows", "2000", "--repeats", "1")
    assert proc.returncode == 0, proc
    assert "1000 x 32 float32" in proc.stdout and "copy loop, same rows (ceiling)" in proc.stdout


def test_bench_gather_runs_every_dtype_and_mode_on_a_small_table() -> None:
    from engram_rs.bench import bench_gather

    for dtype, dim in (("float32", 64), ("bfloat16", 64), ("float8_e4m3", 256)):
        for mode in ("resident", "mmap"):
            rows, where = bench_gather(4096, dim, dtype, 3000, mode, repeats=1)
            assert f"4096 x {dim} {dtype}" in where and mode in where
            names = [r["what"] for r in rows]
            assert "copy loop, same rows (ceiling)" in names
            assert all(r["GB/s"] > 0 for r in rows)


def test_each_benchmark_lists_only_its_own_options() -> None:
    def helptext(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "engram_rs", *args, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc
        return proc.stdout

    gather = helptext("bench", "gather")
    assert "--batch-rows" in gather and "{float32,float16,bfloat16,float8_e4m3}" in gather
    assert "--preset" not in gather and "--seqlen" not in gather
    hashing = helptext("bench", "hash")
    assert "--preset" in hashing and "--dtype" not in hashing and "--batch-rows" not in hashing
    assert "{hash,gather,compress,precompute,train,v41,stats,tiered}" in helptext("bench")
