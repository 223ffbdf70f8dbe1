"""Host tables against hostile files, sizes, disks and threads (crash reproducers run isolated)."""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import engram_rs as er
import numpy as np
import pytest
import torch
from isolated import expect_error, run_in_small_tmpfs, run_isolated


def _file(header: dict, data: bytes, pad_to: int = 0) -> bytes:
    """A safetensors file with this header (space-padded to ``pad_to`` bytes) and data."""
    raw = json.dumps(header).encode()
    raw += b" " * max(0, pad_to - len(raw))
    return struct.pack("<Q", len(raw)) + raw + data


# ---- 2: write_rows from a view of the table's own memory --------------------------------------


def test_write_rows_from_an_overlapping_view_reads_before_writing() -> None:
    for dst, src in ((slice(1, 4), slice(0, 3)), (slice(0, 3), slice(1, 4))):
        arr = np.arange(40, dtype=np.float32).reshape(10, 4)
        expected = arr.copy()
        expected[dst] = expected[src].copy()
        t = er.HostTable.from_numpy(arr)
        t.write_rows(np.arange(10)[dst], arr[src])
        np.testing.assert_array_equal(arr, expected)
    codes = np.arange(10 * 64, dtype=np.int64).astype(np.uint8).reshape(10, 64)
    scales = np.arange(20, dtype=np.uint8).reshape(10, 2) + 100
    want_codes, want_scales = codes.copy(), scales.copy()
    want_codes[[2, 3]] = want_codes[[1, 2]].copy()
    want_scales[[2, 3]] = want_scales[[1, 2]].copy()
    t8 = er.HostTable.from_numpy(codes, scales, dtype="float8_e4m3")
    t8.write_rows([2, 3], codes[1:3], scales=scales[1:3])
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scales, want_scales)


# ---- 3: crafted headers ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mmap", "resident"])
def test_offsets_near_2_pow_64_are_refused(tmp_path, mode: str) -> None:
    pad = 256
    data_start = 8 + pad
    begin = 2**64 - data_start  # data_start + begin wraps to 0: the start of the file
    header = {"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [begin, begin + 128]}}
    path = tmp_path / "wrap.safetensors"
    path.write_bytes(_file(header, bytes(200), pad_to=pad))
    expect_error(
        f"""
        import engram_rs as er
        t = er.HostTable.open({str(path)!r}, mode={mode!r})
        print(t.gather([0, 1, 2, 3]))
        """,
        "ValueError",
        r"tensor 'w' \(bytes \d+\.\.\d+\) ends beyond the file \(200 bytes of data\)",
    )


def test_scales_that_overlap_the_values_are_refused(tmp_path) -> None:
    header = {
        "w": {"dtype": "F8_E4M3", "shape": [4, 64], "data_offsets": [0, 256]},
        "w_scale": {"dtype": "F8_E8M0", "shape": [4, 2], "data_offsets": [200, 208]},
    }
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(_file(header, bytes(256)))
    with pytest.raises(
        ValueError,
        match=r"tensor 'w_scale' \(bytes 200\.\.208\) overlaps tensor 'w' \(bytes 0\.\.256\)",
    ):
        er.HostTable.open(path, scales="w_scale")


# ---- 4 and 5: sizes that do not fit -----------------------------------------------------------


def test_gather_output_that_cannot_be_allocated_is_a_memory_error() -> None:
    # 0 rows of 2**58 float32: no table memory, but one gathered row needs 2**60 bytes.
    expect_error(
        """
        import numpy as np, engram_rs as er
        t = er.HostTable.from_numpy(np.empty((0, 2**58), np.float32))
        t.gather([0])
        """,
        "MemoryError",
        r"cannot allocate 1152921504606846976 bytes for a 64-byte aligned buffer",
    )


def test_resident_open_larger_than_available_memory(tmp_path) -> None:
    with open("/proc/meminfo") as info:
        avail = next(int(x.split()[1]) * 1024 for x in info if x.startswith("MemAvailable:"))
    rows = 2 * avail // 4096 + 1
    header = {"w": {"dtype": "F32", "shape": [rows, 1024], "data_offsets": [0, rows * 4096]}}
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(_file(header, b"", pad_to=256))
        f.truncate(8 + 256 + rows * 4096)  # sparse: no disk used
    expect_error(
        f"""
        import engram_rs as er
        er.HostTable.open({str(path)!r}, mode="resident")
        """,
        "MemoryError",
        r"cannot allocate \d+ bytes for a resident copy of .*huge.safetensors: only \d+ bytes "
        r'of memory are available \(MemAvailable\): open it with mode="mmap"',
    )
    assert er.HostTable.open(path).rows == rows  # the lazy map is fine


def test_fp8_create_whose_scales_overflow_is_refused(tmp_path) -> None:
    expect_error(
        f"""
        import engram_rs as er
        er.HostTable.create({str(tmp_path / "x.safetensors")!r}, rows=558_992_244_657_865_201,
                            dim=32, dtype="float8_e4m3")
        """,
        "ValueError",
        r"a 558992244657865201 x 32 float8_e4m3 table is too large: its values and scales exceed",
    )
    assert os.listdir(tmp_path) == []


# ---- 6: full disks, locks ---------------------------------------------------------------------


def test_create_past_a_file_size_limit_is_an_os_error_and_leaves_nothing(tmp_path) -> None:
    expect_error(
        f"""
        import resource, signal, engram_rs as er
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        er.HostTable.create({str(tmp_path / "t.safetensors")!r}, 100_000, 64, dtype="float32")
        """,
        "OSError",
        r"/t\.safetensors: cannot reserve 25600\d\d\d bytes of disk for the table \(File too "
        r"large .*\(while writing the temporary file .*/\.t\.safetensors\.[0-9a-f]{12}\.tmp\)",
    )
    assert os.listdir(tmp_path) == []


def test_full_disk_create_is_an_os_error_and_leaves_nothing(tmp_path) -> None:
    out = run_in_small_tmpfs(
        tmp_path,
        """
        import os, engram_rs as er
        try:
            er.HostTable.create(DISK + "/t.safetensors", 100_000, 64, dtype="float32")
        finally:
            print("LEFT", os.listdir(DISK))
        """,
    )
    assert out.returncode == 3 and out.exc_type == "OSError", out
    assert out.message is not None and "t.safetensors: cannot reserve 25600" in out.message, out
    assert "No space left on device" in out.message, out
    assert "LEFT []" in out.stdout, out


def test_writable_open_of_a_sparse_file_on_a_full_disk_is_an_os_error(tmp_path) -> None:
    # Before: the open succeeded and the first write into a hole died of SIGBUS.
    out = run_in_small_tmpfs(
        tmp_path,
        """
        import json, struct, numpy as np, engram_rs as er
        raw = json.dumps({"w": {"dtype": "F32", "shape": [4096, 1024],
                                "data_offsets": [0, 4096 * 4096]}}).encode()
        path = DISK + "/sparse.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + 4096 * 4096)
        assert er.HostTable.open(path).rows == 4096  # read-only needs no blocks
        w = er.HostTable.open(path, writable=True)
        w.write_rows(np.arange(4096), np.ones((4096, 1024), np.float32))
        """,
    )
    assert out.returncode == 3 and out.exc_type == "OSError", out
    assert out.message is not None and "sparse.safetensors: cannot reserve" in out.message, out


def test_conflicting_opens_get_a_clear_error(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    w = er.HostTable.create(path, 10, 8, dtype="float32")
    expect_error(
        f"""
        import engram_rs as er
        er.HostTable.open({str(path)!r})
        """,
        "OSError",
        r"t\.safetensors: cannot open it: a writable table \(in this or another process\) has it "
        r"open and holds its exclusive lock; close that table first",
    )
    w.close()
    r = er.HostTable.open(path)
    with pytest.raises(OSError, match="cannot open it writable: another table"):
        er.HostTable.open(path, writable=True)
    r2 = er.HostTable.open(path, mode="resident")  # readers share
    r.close()
    r2.close()
    er.HostTable.open(path, writable=True).close()


# ---- 7: flush never writes a file that replaced the path ---------------------------------------


def test_resident_flush_after_the_path_was_replaced(tmp_path) -> None:
    path, other = tmp_path / "t.safetensors", tmp_path / "other.safetensors"
    er.HostTable.create(path, 10, 8, dtype="float32", init="zeros").close()
    w = er.HostTable.open(path, mode="resident", writable=True)
    old = os.open(path, os.O_RDONLY)
    try:
        er.HostTable.create(other, 10, 8, dtype="float32", init="zeros").close()
        replacement = other.read_bytes()
        os.replace(other, path)
        w.write_rows([3], np.full((1, 8), 2.5, np.float32))
        w.flush()
        assert path.read_bytes() == replacement, "the file now at the path is untouched"
        data = os.pread(old, os.fstat(old).st_size, 0)
        start = len(data) - 10 * 8 * 4
        row3 = np.frombuffer(data[start + 3 * 32 : start + 4 * 32], np.float32)
        np.testing.assert_array_equal(row3, np.full(8, 2.5, np.float32))
    finally:
        os.close(old)
        w.close()


# ---- 9: FP8 scales in write_rows -------------------------------------------------------------


def test_write_rows_scales_are_ue8m0_bytes_or_a_clear_error(tmp_path) -> None:
    path = tmp_path / "f8.safetensors"
    t = er.HostTable.create(path, 8, 64, dtype="float8_e4m3", init="zeros")
    codes = np.full((2, 64), 0x38, np.uint8)  # 1.0 in E4M3
    t.write_rows([1, 2], codes, scales=np.array([[127, 128], [126, 129]], np.uint8))
    np.testing.assert_array_equal(t.gather([1, 2])[:, ::32], [[1.0, 2.0], [0.5, 4.0]])
    e8m0 = torch.tensor([[2.0, 4.0], [8.0, 0.25]]).to(torch.float8_e8m0fnu)
    t.write_rows([1, 2], torch.from_numpy(codes).view(torch.float8_e4m3fn), scales=e8m0)
    np.testing.assert_array_equal(t.gather([1, 2])[:, ::32], [[2.0, 4.0], [8.0, 0.25]])
    t.write_rows([1], codes[:1], scales=torch.tensor([[130, 131]], dtype=torch.uint8))
    np.testing.assert_array_equal(t.gather([1])[:, ::32], [[8.0, 16.0]])
    before = t.gather(np.arange(8))
    expected_shape = r"of shape \[n, dim // 32\] = \(2, 2\)"
    with pytest.raises(
        ValueError,
        match=expected_shape + r"; got a numpy float32 array \(float scale factors are not "
        r"converted: pass their bytes, log2\(scale\) \+ 127\)",
    ):
        t.write_rows([1, 2], codes, scales=np.full((2, 2), 2.0, np.float32))
    with pytest.raises(ValueError, match=expected_shape + "; got a numpy int64 array$"):
        t.write_rows([1, 2], codes, scales=np.full((2, 2), 300))
    with pytest.raises(ValueError, match="; got a torch torch.float32 tensor"):
        t.write_rows([1, 2], codes, scales=torch.full((2, 2), 2.0))
    with pytest.raises(TypeError, match="UE8M0 exponent bytes.*; got list"):
        t.write_rows([1, 2], codes, scales=[[127, 127], [127, 127]])
    with pytest.raises(ValueError, match=expected_shape + r"; got shape \(2, 1\)"):
        t.write_rows([1, 2], codes, scales=np.full((2, 1), 127, np.uint8))
    np.testing.assert_array_equal(t.gather(np.arange(8)), before)
    t.close()
    values = torch.zeros(4, 64, dtype=torch.uint8).view(torch.float8_e4m3fn)
    wrapped = er.HostTable.from_torch(values, torch.full((4, 2), 128).to(torch.float8_e8m0fnu))
    np.testing.assert_array_equal(wrapped.gather([0]), np.zeros((1, 64), np.float32))
    with pytest.raises(
        ValueError, match=r"UE8M0 exponent bytes: .* \[rows, dim // 32\], got torch.float32"
    ):
        er.HostTable.from_torch(values, torch.full((4, 2), 2.0))
    f32 = er.HostTable.from_numpy(np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="scales are only for FP8 tables, this one is float32"):
        f32.write_rows([0], np.ones((1, 8), np.float32), scales=np.zeros((1, 1), np.uint8))


# ---- 10: close from another thread -----------------------------------------------------------


@pytest.mark.parametrize("op", ["gather", "write_rows"])
def test_close_from_another_thread_waits_for_operations_in_flight(op: str) -> None:
    arr = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)
    t = er.HostTable.from_numpy(arr)
    idx = np.random.default_rng(1).integers(0, 20000, size=400_000)
    rows = np.ones((20000, 64), np.float32)
    expected = arr[idx[:100]].copy()
    started, stop = threading.Event(), threading.Event()
    done: list[object] = []

    def work() -> None:
        try:
            while not stop.is_set():
                started.set()
                if op == "gather":
                    out = t.gather(idx)
                    np.testing.assert_array_equal(out[:100], expected)
                else:
                    t.write_rows(np.arange(20000), rows)
                done.append("ok")
        except ValueError as e:
            done.append(e)

    th = threading.Thread(target=work)
    th.start()
    started.wait()
    time.sleep(0.02)
    try:
        t.close()  # before: RuntimeError: Already borrowed
    except BaseException:
        stop.set()  # the worker would never see the table closed
        raise
    finally:
        th.join()
    assert done[-1].__class__ is ValueError and "closed" in str(done[-1]), done
    assert all(d == "ok" for d in done[:-1])
    assert repr(t) == "HostTable(closed)"


# ---- 11: concurrent creates ------------------------------------------------------------------


def test_two_threads_creating_one_path_both_succeed(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    results: list[object] = []

    def create(seed: int) -> None:
        try:
            results.append(er.HostTable.create(path, 200_000, 64, dtype="bfloat16", seed=seed))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=create, args=(s,)) for s in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(isinstance(r, er.HostTable) for r in results), results
    for r in results:
        r.close()  # type: ignore[union-attr]
    assert os.listdir(tmp_path) == ["t.safetensors"]
    assert er.HostTable.open(path).rows == 200_000


# ---- 13: messages and paths ------------------------------------------------------------------


def test_fp8_dim_not_a_multiple_of_32() -> None:
    with pytest.raises(
        ValueError,
        match=r"an FP8 table needs dim to be a multiple of 32 \(one UE8M0 scale byte per block "
        r"of 32 values\), got dim=48: pad the rows or use another dtype",
    ):
        er.HostTable.from_numpy(
            np.zeros((4, 48), np.uint8), np.zeros((4, 1), np.uint8), dtype="float8_e4m3"
        )


def test_create_in_a_missing_directory(tmp_path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r".*/nope/t.safetensors: the directory '.*/nope' does not exist: "
        r"create it first \(os.makedirs\)",
    ):
        er.HostTable.create(tmp_path / "nope" / "t.safetensors", 4, 8)


def test_paths_may_be_bytes_and_nothing_else(tmp_path) -> None:
    path = os.fsencode(tmp_path / "b.safetensors")
    er.HostTable.create(path, 4, 8, dtype="float32").close()
    t = er.HostTable.open(path)
    assert t.path == os.fsdecode(path)
    t.close()
    with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike, got int"):
        er.HostTable.open(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike, got NoneType"):
        er.HostTable.create(None, 4, 8)  # type: ignore[arg-type]


def test_a_truncated_file_is_refused_at_open(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    er.HostTable.create(path, 100, 8, dtype="float32").close()
    os.truncate(path, os.path.getsize(path) - 1)
    out = run_isolated(
        f"""
        import engram_rs as er
        for mode in ("mmap", "resident"):
            try:
                er.HostTable.open({str(path)!r}, mode=mode, writable=True)
            except ValueError as e:
                print("REFUSED", mode, e)
        """
    )
    assert out.stdout.count("the file is truncated or damaged") == 2, out


def test_create_reports_progress_through_python(tmp_path) -> None:
    """Progress goes through a Python callable (or tqdm), not prints from worker threads; an
    exception from the callable stops the creation and leaves nothing behind."""
    seen: list[tuple[int, int]] = []
    er.HostTable.create(
        tmp_path / "t.safetensors", 100_000, 8, progress=lambda d, n: seen.append((d, n))
    )
    assert (100_000, 100_000) in seen
    assert all(n == 100_000 and 0 < d <= n for d, n in seen)
    assert len(seen) <= 101

    def stop(done: int, rows: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        er.HostTable.create(tmp_path / "u.safetensors", 100_000, 8, progress=stop)
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]
    with pytest.raises(TypeError, match="progress must be a bool or a callable"):
        er.HostTable.create(tmp_path / "v.safetensors", 10, 8, progress="yes")  # type: ignore[arg-type]
    out = run_isolated(
        """
import sys, engram_rs as er, tempfile, os
d = tempfile.mkdtemp()
er.HostTable.create(os.path.join(d, "t.safetensors"), 50_000, 8, progress=True)
"""
    )
    assert out.returncode == 0, out
    assert "50000" in out.stderr, out
