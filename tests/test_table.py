from __future__ import annotations

import gc
import os
import threading

import engram_rs as er
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3"]
TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3": torch.float8_e4m3fn,
}


def torch_rows(table_t: torch.Tensor, scales: torch.Tensor | None, idx: np.ndarray) -> torch.Tensor:
    """The reference: torch indexing, then FP8 dequant as e4m3.float() * e8m0.float()."""
    flat = torch.from_numpy(idx.reshape(-1).astype(np.int64))
    rows = table_t.index_select(0, flat)
    if scales is None:
        out = rows.float()
    else:
        sc = scales.index_select(0, flat).view(torch.float8_e8m0fnu).float()
        dim = table_t.shape[1]
        out = (rows.float().view(len(flat), dim // 32, 32) * sc[..., None]).view(len(flat), dim)
    return out.view(*idx.shape, table_t.shape[1])


def random_table(dtype: str, rows: int, dim: int, seed: int = 0):
    """(values tensor, scales tensor or None) with every byte pattern likely to appear."""
    g = torch.Generator().manual_seed(seed)
    if dtype == "float8_e4m3":
        codes = torch.randint(0, 256, (rows, dim), dtype=torch.uint8, generator=g)
        scales = torch.randint(0, 256, (rows, dim // 32), dtype=torch.uint8, generator=g)
        scales[0, 0], scales[1 % rows, 0] = 0, 254  # the extremes of the scale range
        codes[0, :4] = torch.tensor([0x7F, 0xFF, 0x80, 0x00], dtype=torch.uint8)  # NaN, -NaN, -0, 0
        return codes.view(torch.float8_e4m3fn), scales
    t = (torch.randn(rows, dim, generator=g) * 3).to(TORCH[dtype])
    return t, None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality, except that any NaN matches any NaN (its sign is not meaningful)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    assert torch.equal(a[~nan_a].view(ints), b[~nan_b].view(ints))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("idx_shape", [(7,), (3, 5), (0,), (), (2, 0, 3)])
def test_gather_matches_torch(dtype: str, out_dtype: str, idx_shape: tuple[int, ...]) -> None:
    values, scales = random_table(dtype, 50, 64)
    table = er.HostTable.from_torch(values, scales)
    idx = np.random.default_rng(1).integers(0, 50, size=idx_shape)
    expected = torch_rows(values, scales, np.asarray(idx)).to(TORCH[out_dtype])
    fw = "torch" if out_dtype == "bfloat16" else None
    got = table.gather(idx, out_dtype=out_dtype, framework=fw)
    got = got if isinstance(got, torch.Tensor) else torch.from_numpy(np.asarray(got))
    same_bits(got, expected)
    for kind in ("numpy", "torch", "pinned"):
        if kind == "numpy" and out_dtype == "bfloat16":
            out = np.empty((*idx_shape, 64), dtype=np.uint16)
            table.gather(idx.astype(np.int32), out=out, out_dtype="bfloat16")
            same_bits(torch.from_numpy(out).view(torch.bfloat16), expected)
            continue
        if kind == "numpy":
            out = np.empty((*idx_shape, 64), dtype=out_dtype)
            table.gather(idx, out=out)
            same_bits(torch.from_numpy(out), expected)
            continue
        pin = kind == "pinned" and torch.cuda.is_available()
        out = torch.empty((*idx_shape, 64), dtype=TORCH[out_dtype], pin_memory=pin)
        assert table.gather(idx, out=out) is out
        same_bits(out, expected)


def test_default_output_dtypes() -> None:
    for dtype, expect in [("float32", np.float32), ("float16", np.float16)]:
        values, _ = random_table(dtype, 8, 32)
        assert er.HostTable.from_torch(values).gather([1, 2]).dtype == expect
    for dtype in ("bfloat16", "float8_e4m3"):
        values, scales = random_table(dtype, 8, 32)
        t = er.HostTable.from_torch(values, scales)
        assert t.gather([1]).dtype == np.float32
        assert t.gather([1], out_dtype="bfloat16", framework="torch").dtype == torch.bfloat16


def test_fp8_dequant_every_code_and_scale_bit_exact() -> None:
    # Every E4M3 code against every scale byte: 256 rows (one per scale), 256 codes each.
    codes = torch.arange(256, dtype=torch.uint8).repeat(256, 1)
    scales = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 8)
    table = er.HostTable.from_torch(codes.view(torch.float8_e4m3fn), scales)
    idx = np.arange(256)
    expected = torch_rows(codes.view(torch.float8_e4m3fn), scales, idx)
    same_bits(torch.from_numpy(table.gather(idx)), expected)
    same_bits(
        table.gather(idx, out_dtype="bfloat16", framework="torch"), expected.to(torch.bfloat16)
    )
    same_bits(torch.from_numpy(table.gather(idx, out_dtype="float16")), expected.to(torch.float16))
    assert torch.signbit(torch.from_numpy(table.gather(idx))[127, 0x80])  # -0 stays -0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mmap", "resident"])
def test_create_open_write_reopen(tmp_path, dtype: str, mode: str) -> None:
    path = tmp_path / "t.safetensors"
    t = er.HostTable.create(path, 300, 64, dtype=dtype, seed=3)
    assert (t.rows, t.dim, t.dtype, t.path, t.mode) == (300, 64, dtype, str(path), "mmap")
    assert t.nbytes == 300 * (
        64 * {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 1)
        + (2 if dtype == "float8_e4m3" else 0)
    )
    first = np.asarray(t.gather(np.arange(300)))
    assert 0.015 < float(np.std(first)) < 0.025, "normal init with std 0.02"
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"], "no temporary file left"
    again = er.HostTable.create(tmp_path / "u.safetensors", 300, 64, dtype=dtype, seed=3)
    np.testing.assert_array_equal(np.asarray(again.gather(np.arange(300))), first)
    t.close()
    scales = "weight_scale" if dtype == "float8_e4m3" else None
    w = er.HostTable.open(path, scales=scales, mode=mode, writable=True)
    assert w.mode == mode
    np.testing.assert_array_equal(np.asarray(w.gather(np.arange(300))), first)
    new = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    w.write_rows([5, 7], new)
    w.flush()
    w.close()
    r = er.HostTable.open(path, scales=scales)
    got = np.asarray(r.gather([5, 7, 6]))
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2, "float8_e4m3": 0.07}[dtype]
    np.testing.assert_allclose(got[:2], new, rtol=tol, atol=tol * 0.1)
    np.testing.assert_array_equal(got[2], first[6])


def test_open_real_safetensors_checkpoint(tmp_path) -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 16)).astype(np.float32)
    half = rng.standard_normal((10, 8)).astype(np.float16)
    fp8 = rng.integers(0, 256, size=(20, 64), dtype=np.uint8)
    fp8[fp8 & 0x7F == 0x7F] = 0
    sc = rng.integers(100, 140, size=(20, 2), dtype=np.uint8)
    path = tmp_path / "ckpt.safetensors"
    save_file({"model.emb": emb, "other.half": half, "bias": np.zeros(3, np.float32)}, path)
    t = er.HostTable.open(path, name="model.emb")
    np.testing.assert_array_equal(t.gather([3, 39, 0]), emb[[3, 39, 0]])
    h = er.HostTable.open(path, name="other.half", mode="resident")
    np.testing.assert_array_equal(h.gather(np.array([[9, 1]], dtype=np.int32)), half[[[9, 1]]])
    with pytest.raises(
        ValueError, match=r'holds several tables: pass name= one of \["model.emb", "other.half"\]'
    ):
        er.HostTable.open(path)
    with pytest.raises(ValueError, match=r'no tensor named "nope"'):
        er.HostTable.open(path, name="nope")
    with pytest.raises(ValueError, match=r'tensor "bias" has shape \[3\]: a table must be 2-D'):
        er.HostTable.open(path, name="bias")
    # An FP8 table with its scales, written by torch's safetensors as F8_E4M3 + F8_E8M0.
    from safetensors.torch import save_file as save_torch

    p8 = tmp_path / "fp8.safetensors"
    save_torch(
        {
            "w": torch.from_numpy(fp8).view(torch.float8_e4m3fn),
            "w_scale_inv": torch.from_numpy(sc).view(torch.float8_e8m0fnu),
        },
        p8,
    )
    odd = tmp_path / "fp8-odd-names.safetensors"
    save_torch(
        {
            "w": torch.from_numpy(fp8).view(torch.float8_e4m3fn),
            "w_s": torch.from_numpy(sc).view(torch.float8_e8m0fnu),
        },
        odd,
    )
    with pytest.raises(
        ValueError,
        match=r"pass scales=<name of its UE8M0 \[20, 2\] tensor> \(candidates: \[\"w_s\"\]\)",
    ):
        er.HostTable.open(odd, name="w")
    assert er.HostTable.open(p8, name="w").dtype == "float8_e4m3"  # w_scale_inv found by name
    t8 = er.HostTable.open(p8, name="w", scales="w_scale_inv")
    expected = torch_rows(
        torch.from_numpy(fp8).view(torch.float8_e4m3fn), torch.from_numpy(sc), np.arange(20)
    )
    same_bits(torch.from_numpy(t8.gather(np.arange(20))), expected)


def _read_fold(rows: np.ndarray, scales: np.ndarray | None, idx: np.ndarray) -> int:
    """What ``read_rows`` returns: per 512-index chunk, the first byte of each 64-byte line of
    each row (and the first scale byte) folded in order, the chunks xor-ed together."""
    mask = (1 << 64) - 1
    total = 0
    for start in range(0, idx.size, 512):
        acc = 0
        for r in idx[start : start + 512]:
            for off in range(0, rows.shape[1], 64):
                acc = (((acc << 1) | (acc >> 63)) & mask) ^ int(rows[r, off])
            if scales is not None:
                acc ^= int(scales[r, 0])
        total ^= acc
    return total


def test_read_rows_reads_the_gathered_bytes() -> None:
    """The benchmark's read ceiling touches exactly the rows (and scales) a gather reads."""
    rng = np.random.default_rng(5)
    f32 = rng.standard_normal((300, 64)).astype(np.float32)
    idx = rng.integers(0, 300, size=1500)
    t = er.HostTable.from_numpy(f32)
    assert t._core.read_rows(idx) == _read_fold(f32.view(np.uint8), None, idx)
    codes = rng.integers(0, 256, size=(300, 64), dtype=np.uint8)
    sc = rng.integers(100, 140, size=(300, 2), dtype=np.uint8)
    t8 = er.HostTable.from_numpy(codes, scales=sc, dtype="float8_e4m3")
    assert t8._core.read_rows(idx.astype(np.int32)) == _read_fold(codes, sc, idx)
    with pytest.raises(IndexError, match=r"row index 300 at position \(2,\)"):
        t._core.read_rows(np.array([0, 1, 300]))


# ---- bad input -------------------------------------------------------------------------------


def test_bad_indices_raise_and_write_nothing() -> None:
    t = er.HostTable.from_numpy(np.arange(40, dtype=np.float32).reshape(10, 4))
    out = np.full((2, 3, 4), 7.0, dtype=np.float32)
    with pytest.raises(
        IndexError,
        match=r"row index 10 at position \(1, 0\) is out of range for a table of 10 rows",
    ):
        t.gather(np.array([[1, 2, 3], [10, 1, 1]]), out=out)
    with pytest.raises(IndexError, match=r"row index -3 at position \(0, 2\) is out of range"):
        t.gather(np.array([[1, 2, -3], [0, 1, 1]]), out=out)
    assert (out == 7.0).all(), "nothing is written when an index is bad"
    for bad in (np.array([1.0, 2.0]), np.array([True, False])):
        with pytest.raises(TypeError, match=f"indices must be integers, got dtype {bad.dtype}"):
            t.gather(bad)
    with pytest.raises(IndexError, match=r"row index 10 at position \(0,\)"):
        t.prefetch(np.array([10])).wait()


def test_one_index_rule_positions_in_the_callers_shape() -> None:
    """gather, prefetch and write_rows take any integer dtype, lists and torch tensors, and name
    a bad index by its position in the caller's shape, the same for all three."""
    t = er.HostTable.from_numpy(np.arange(40, dtype=np.float32).reshape(10, 4))
    want = t.gather(np.array([[1, 2], [3, 9]]))
    for idx in (
        [[1, 2], [3, 9]],
        np.array([[1, 2], [3, 9]], dtype=np.uint8),
        np.array([[1, 2], [3, 9]], dtype=">i2"),
        np.array([[1, 2], [3, 9]], dtype=np.uint64),
        torch.tensor([[1, 2], [3, 9]]),
    ):
        np.testing.assert_array_equal(t.gather(idx), want)
        np.testing.assert_array_equal(t.prefetch(idx).wait(), want)
    bad = np.array([[1, 2], [3, 12]])
    where = r"row index 12 at position \(1, 1\) is out of range"
    with pytest.raises(IndexError, match=where):
        t.gather(bad)
    with pytest.raises(IndexError, match=where):
        t.gather(bad, out=np.empty((2, 2, 4), np.float32))
    with pytest.raises(IndexError, match=where):
        t.prefetch(bad).wait()
    with pytest.raises(IndexError, match=where):
        t.write_rows(bad, np.zeros((2, 2, 4)))
    with pytest.raises(IndexError, match=r"row index 18446744073709551615 at position \(1,\)"):
        t.gather(np.array([1, 2**64 - 1], dtype=np.uint64))
    assert t.gather([]).shape == (0, 4)


def test_gather_returns_by_one_rule() -> None:
    t = er.HostTable.from_torch(torch.randn(10, 64).to(torch.bfloat16))
    assert isinstance(t.gather([1, 2]), np.ndarray) and t.gather([1]).dtype == np.float32
    assert t.gather([1], framework="torch").dtype == torch.bfloat16
    assert t.gather([1], out_dtype="f16", framework="torch").dtype == torch.float16
    out = np.empty((1, 64), np.float32)
    assert t.gather([1], out=out) is out
    with pytest.raises(ValueError, match='numpy has no bfloat16: pass framework="torch"'):
        t.gather([1], out_dtype="bf16")
    with pytest.raises(ValueError, match="framework='torch' but out is a numpy array"):
        t.gather([1], out=out, framework="torch")
    p = t.prefetch([1, 2, 3], framework="torch")
    assert repr(p).startswith("Prefetch(3 rows -> bfloat16")
    assert p.wait().shape == (3, 64)


def test_two_prefetches_into_one_output_are_refused() -> None:
    t = er.HostTable.from_numpy(np.zeros((1 << 16, 64), np.float32))
    idx = np.random.default_rng(0).integers(0, 1 << 16, size=1 << 20)
    out = np.empty((1 << 20, 64), np.float32)
    refused = False
    for _ in range(5):  # the first prefetch must still be running when the second comes
        first = t.prefetch(idx, out=out)
        try:
            t.prefetch(idx[: 1 << 10], out=out[: 1 << 10]).wait()
        except ValueError as e:
            assert "out overlaps the output of a prefetch still running" in str(e)
            refused = True
        first.wait()
        if refused:
            break
    assert refused
    t.prefetch(idx[: 1 << 10], out=out[: 1 << 10]).wait()  # done: the memory is free again


def test_bad_outputs() -> None:
    t = er.HostTable.from_numpy(np.zeros((10, 4), dtype=np.float32))
    idx = np.array([1, 2])
    with pytest.raises(ValueError, match=r"out has shape \(3, 4\), expected \(2, 4\)"):
        t.gather(idx, out=np.empty((3, 4), np.float32))
    with pytest.raises(ValueError, match="unsupported out dtype dtype\\('float64'\\)"):
        t.gather(idx, out=np.empty((2, 4), np.float64))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        t.gather(idx, out=np.empty((4, 2), np.float32).T)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        t.gather(idx, out=torch.empty(4, 2).t())
    with pytest.raises(ValueError, match="does not match out's dtype float32"):
        t.gather(idx, out=np.empty((2, 4), np.float32), out_dtype="float16")
    with pytest.raises(ValueError, match="unsupported out_dtype 'int8'"):
        t.gather(idx, out_dtype="int8")
    ro = np.empty((2, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        t.gather(idx, out=ro)


def test_bad_files(tmp_path) -> None:
    good = tmp_path / "good.safetensors"
    er.HostTable.create(good, 100, 32, dtype="float32").close()
    data = good.read_bytes()
    with pytest.raises(FileNotFoundError):
        er.HostTable.open(tmp_path / "missing.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
    with pytest.raises(
        ValueError, match=r"tensor 'weight' \(bytes \d+\.\.\d+\) ends beyond the file \(\d+ bytes"
    ):
        er.HostTable.open(tmp_path / "trunc.safetensors")
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="shorter than the 8-byte header length"):
        er.HostTable.open(tmp_path / "short.safetensors")
    claims = bytearray(data)
    claims[:8] = (len(data) + 10).to_bytes(8, "little")
    (tmp_path / "claims.safetensors").write_bytes(bytes(claims))
    with pytest.raises(ValueError, match=r"header length \d+, the file has \d+ bytes"):
        er.HostTable.open(tmp_path / "claims.safetensors")
    corrupt = bytearray(data)
    corrupt[8:20] = b"{{{{{{{{{{{{"
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"not a safetensors file \(header: "):
        er.HostTable.open(tmp_path / "corrupt.safetensors")
    wrong = data.replace(b'"data_offsets":[0,12800]', b'"data_offsets":[0,12000]')
    assert wrong != data
    (tmp_path / "wrong.safetensors").write_bytes(wrong)
    with pytest.raises(
        ValueError, match=r"is F32 \[100, 32\] \(12800 bytes\), its data_offsets span 12000"
    ):
        er.HostTable.open(tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match='unknown mode "fast"'):
        er.HostTable.open(good, mode="fast")


def test_bad_tables_and_writes(tmp_path) -> None:
    with pytest.raises(ValueError, match="an FP8 table needs scales"):
        er.HostTable.from_numpy(np.zeros((4, 32), np.uint8), dtype="float8_e4m3")
    with pytest.raises(ValueError, match="an FP8 table needs dim to be a multiple of 32"):
        er.HostTable.create(tmp_path / "x.safetensors", 4, 48, dtype="float8_e4m3")
    with pytest.raises(
        ValueError,
        match=r"scales hold 4 bytes; an FP8 4 x 64 table needs one UE8M0 byte per 32 values",
    ):
        er.HostTable.from_numpy(
            np.zeros((4, 64), np.uint8), np.zeros((4, 1), np.uint8), dtype="float8_e4m3"
        )
    with pytest.raises(ValueError, match="a bfloat16 table needs a uint16 array, got float32"):
        er.HostTable.from_numpy(np.zeros((4, 8), np.float32), dtype="bfloat16")
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        er.HostTable.create(tmp_path / "y.safetensors", 4, 8, dtype="int8")
    path = tmp_path / "ro.safetensors"
    er.HostTable.create(path, 10, 8, dtype="float32").close()
    ro = er.HostTable.open(path)
    with pytest.raises(
        PermissionError, match="this mmap table is read-only: open it with writable=True"
    ):
        ro.write_rows([1], np.zeros((1, 8), np.float32))
    before = np.asarray(ro.gather([1])).copy()
    ro.close()  # a writable open needs the file's exclusive lock
    frozen = np.zeros((10, 8), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(PermissionError, match="read-only"):
        er.HostTable.from_numpy(frozen).write_rows([1], np.zeros((1, 8), np.float32))
    w = er.HostTable.open(path, writable=True)
    with pytest.raises(IndexError, match=r"row index 10 at position \(1,\) is out of range"):
        w.write_rows([1, 10], np.ones((2, 8), np.float32))
    assert (np.asarray(w.gather([1])) == before).all(), "nothing written"
    with pytest.raises(ValueError, match=r"values have shape \(1, 4\), expected \(1, 8\)"):
        w.write_rows([1], np.ones((1, 4), np.float32))
    w.close()
    with pytest.raises(ValueError, match="this HostTable is closed"):
        w.gather([1])


# ---- prefetch --------------------------------------------------------------------------------


def test_prefetch_from_many_threads_equals_gather() -> None:
    values, scales = random_table("float8_e4m3", 5000, 256)
    t = er.HostTable.from_torch(values, scales)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 5000, size=(64, 24)) for _ in range(16)]
    expected = [np.asarray(t.gather(b)) for b in batches]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            pending = [(i, t.prefetch(batches[i])) for i in range(k, len(batches), 4)]
            outs = {i: torch.empty((64, 24, 256), dtype=torch.bfloat16) for i in range(16)}
            pending += [(i, t.prefetch(batches[i], out=outs[i])) for i in range(k, 16, 4)]
            for i, p in pending:
                got = p.wait()
                got = got.float().numpy() if isinstance(got, torch.Tensor) else got
                ref = expected[i]
                if isinstance(p.wait(), torch.Tensor):
                    ref = torch.from_numpy(ref).to(torch.bfloat16).float().numpy()
                np.testing.assert_array_equal(got, ref)
                assert p.done()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


def test_dropped_prefetch_and_close_under_load_are_safe() -> None:
    values = torch.randn(20000, 64)
    t = er.HostTable.from_torch(values)
    idx = np.random.default_rng(0).integers(0, 20000, size=200000)
    for _ in range(8):
        t.prefetch(idx)  # dropped at once, still running
    out = np.empty((200000, 64), np.float32)
    t.prefetch(idx, out=out)
    del values
    gc.collect()
    busy = [t.prefetch(idx) for _ in range(4)]
    t.close()  # waits for the gathers in flight; the memory outlives them
    assert all(p.done() for p in busy)
    np.testing.assert_array_equal(busy[0].wait()[:3], busy[1].wait()[:3])
    with pytest.raises(ValueError, match="closed"):
        t.prefetch(idx)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 300),
    dim=st.sampled_from([1, 3, 16, 64, 100]),
    n=st.integers(0, 500),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 100),
)
def test_gather_property(rows: int, dim: int, n: int, dtype: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, dim, generator=g).to(TORCH[dtype])
    t = er.HostTable.from_torch(values)
    idx = np.random.default_rng(seed).integers(0, rows, size=n)
    for out_dtype in ("float32", "float16", "bfloat16"):
        fw = "torch" if out_dtype == "bfloat16" else None
        got = t.gather(idx, out_dtype=out_dtype, framework=fw)
        got = got if isinstance(got, torch.Tensor) else torch.from_numpy(got)
        same_bits(got, values[torch.from_numpy(idx)].float().to(TORCH[out_dtype]))


def test_table_dropped_while_prefetching_keeps_its_memory() -> None:
    arr = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)
    expected = arr[:5].copy()
    t = er.HostTable.from_numpy(arr)
    idx = np.tile(np.arange(5), 80000)
    pending = [t.prefetch(idx) for _ in range(6)]
    del t, arr  # the jobs still reference the table and the array it wraps
    gc.collect()
    for p in pending:
        np.testing.assert_array_equal(p.wait()[:5], expected)


def test_fp8_scales_are_found_by_name(tmp_path) -> None:
    """A table from create(dtype="float8_e4m3") reopens without scales=; so does a DeepSeek-style
    shard whose scales are `{name}_scale_inv`; two candidates need scales= to choose."""
    path = tmp_path / "t.safetensors"
    er.HostTable.create(path, 10, 64, dtype="float8_e4m3", seed=1).close()
    with er.HostTable.open(path) as t:
        assert t.dtype == "float8_e4m3"
        first = t.gather(np.arange(10))
    from safetensors.torch import save_file

    codes = torch.randint(0, 0x70, (10, 64), dtype=torch.uint8).view(torch.float8_e4m3fn)
    scales = torch.full((10, 2), 127, dtype=torch.uint8)
    shard = tmp_path / "model-00001.safetensors"
    save_file({"layer.weight": codes, "layer.weight_scale_inv": scales}, str(shard))
    with er.HostTable.open(shard) as t:
        np.testing.assert_array_equal(t.gather(np.arange(10)), codes.float().numpy())
    both = tmp_path / "both.safetensors"
    save_file({"w": codes, "w_scale": scales, "w_scale_inv": scales.clone()}, str(both))
    with pytest.raises(
        ValueError, match="no single tensor w_scale or w_scale_inv holds its scales"
    ):
        er.HostTable.open(both)
    with er.HostTable.open(both, scales="w_scale_inv") as t:
        assert t.rows == 10
    assert first.shape == (10, 64)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_write_rows_rounds_float64_and_lists_once(dtype: str) -> None:
    """float64 values (and lists) are rounded to the table's dtype once, exactly as torch's
    .to(dtype): values picked at and next to the midpoints between representable numbers,
    where rounding through float32 first would go the wrong way."""
    rng = np.random.default_rng(0)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    grid = torch.from_numpy(rng.standard_normal(4096).astype(np.float32)).to(tdt)
    up = torch.nextafter(grid.double(), torch.tensor(np.inf, dtype=torch.float64)).to(tdt)
    mids = (grid.double() + torch.nextafter(grid, up).double()) / 2  # ties
    eps = np.abs(mids.numpy()) * 2.0**-40
    values = np.concatenate(
        [mids.numpy(), mids.numpy() + eps, mids.numpy() - eps, rng.standard_normal(4096) * 1e5]
    ).reshape(-1, 64)
    table = er.HostTable.from_numpy(
        np.zeros((values.shape[0], 64), np.uint16 if dtype == "bfloat16" else dtype),
        dtype=dtype,
    )
    table.write_rows(np.arange(values.shape[0]), values)
    got = table.gather(np.arange(values.shape[0]), out_dtype="float32")
    want = torch.from_numpy(values).to(tdt).float().numpy()
    np.testing.assert_array_equal(np.asarray(got), want)
    table.write_rows([0], values[:1].tolist())
    np.testing.assert_array_equal(np.asarray(table.gather([0], out_dtype="float32")), want[:1])


def test_one_dtype_spelling_rule(tmp_path) -> None:
    for spelling in ("bf16", "BFloat16", torch.bfloat16):
        t = er.HostTable.create(tmp_path / "t.safetensors", 4, 32, dtype=spelling)
        assert t.dtype == "bfloat16"
        t.close()
    for spelling in ("fp8", "float8_e4m3fn", torch.float8_e4m3fn):
        with er.HostTable.create(tmp_path / "t.safetensors", 4, 32, dtype=spelling) as t:
            assert t.dtype == "float8_e4m3"
    for spelling in ("f32", np.float32, np.dtype("float32"), torch.float32):
        with er.HostTable.create(tmp_path / "t.safetensors", 4, 32, dtype=spelling) as t:
            assert t.gather([1], out_dtype="f16").dtype == np.float16
    with pytest.raises(ValueError, match=r"bfloat16 bits in uint16: pass dtype=\"bfloat16\""):
        er.HostTable.create(tmp_path / "t.safetensors", 4, 32, dtype=np.uint16)
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        er.HostTable.create(tmp_path / "t.safetensors", 4, 32, dtype="int8")


def test_the_constructor_points_to_open() -> None:
    with pytest.raises(TypeError, match=r"HostTable\('x.safetensors'\) is not how tables are made"):
        er.HostTable("x.safetensors")


def test_create_refuses_unknown_init_and_bad_std(tmp_path) -> None:
    with pytest.raises(ValueError, match=r'unknown init "uniform": use "normal"'):
        er.HostTable.create(tmp_path / "t.safetensors", 4, 32, init="uniform")
    for std in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="std must be a finite number >= 0"):
            er.HostTable.create(tmp_path / "t.safetensors", 4, 32, std=std)
    assert os.listdir(tmp_path) == []
