"""The offline precompute: every input format and boundary rule against ``hash_tokens``, resume
after a kill, atomic finalization, bounded memory, and bad input with its message."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import engram_rs as er
import numpy as np
import pytest
from engram_rs.bench import deepseek_v4_tokenizer_json
from engram_rs.cli import main
from engram_rs.offline import PrecomputedIndices, precompute, verify
from isolated import run_in_small_tmpfs, run_isolated

VOCAB = 129280  # the DeepSeek-V4 tokenizer's ids


@pytest.fixture(scope="module")
def tok() -> str:
    return deepseek_v4_tokenizer_json()


@pytest.fixture(scope="module")
def hasher(tok: str) -> er.NgramHasher:
    return er.NgramHasher.from_tokenizer(
        er.EngramConfig.preset("demo"), er.CompressedTokenizer.from_file(tok)
    )


def expect_sequences(
    idx: PrecomputedIndices,
    seqs: list[np.ndarray],
    hasher: er.NgramHasher,
    dtype: str = "int32",
    flat: bool = False,
    layers: list[int] | None = None,
) -> None:
    """The result holds exactly ``seqs``, hashed as ``hash_tokens`` hashes each on its own."""
    lengths = [len(s) for s in seqs]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([np.asarray(s, np.int64) for s in seqs]) if seqs else np.zeros(0)
    assert idx.offsets.tolist() == cu.tolist()
    assert idx.num_sequences == len(seqs) and idx.num_tokens == ids.size
    assert np.array_equal(idx.tokens, ids)
    want = hasher.hash_tokens(ids, layer_ids=layers, dtype=dtype, flat=flat, cu_seqlens=cu)
    assert sorted(idx.layer_ids) == sorted(want)
    for layer, arr in want.items():
        got = idx.layer(layer)
        assert got.dtype == np.dtype(dtype) and got.shape == arr.shape
        assert np.array_equal(got, arr), layer
    # Each sequence on its own, as the reference treats each row of a batch.
    for i in (0, len(seqs) // 2, len(seqs) - 1) if seqs else ():
        toks, per = idx.sequence(i)
        if len(toks):
            alone = hasher.hash_tokens(toks, layer_ids=layers, dtype=dtype, flat=flat)
            for layer in per:
                assert np.array_equal(per[layer], alone[layer])


def windows(stream: np.ndarray, t: int) -> list[np.ndarray]:
    return [stream[i : i + t] for i in range(0, len(stream), t)]


def split_after(stream: np.ndarray, eos: int) -> list[np.ndarray]:
    cuts = (np.flatnonzero(stream[:-1] == eos) + 1).tolist()
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def random_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.uint32)


# ---- formats and boundary rules -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [37, 1000, 1 << 18])
def test_bin_windows_with_a_final_partial_one(tmp_path, tok, hasher, chunk) -> None:
    stream = random_ids(5003)
    stream.tofile(tmp_path / "a.bin")
    idx = precompute(
        tmp_path / "a.bin", tmp_path / "out", "demo", tok, seq_len=100, chunk_tokens=chunk
    )
    assert idx.manifest["boundary"] == {"rule": "seq_len", "seq_len": 100}
    expect_sequences(idx, windows(stream, 100), hasher)
    assert len(idx.sequence(50)[0]) == 3  # the last window is shorter


def test_eos_split_with_one_token_sequences_and_a_final_eos(tmp_path, tok, hasher) -> None:
    stream = random_ids(3000, seed=1)
    stream[stream == 7] = 8
    stream[[0, 5, 6, 7, 100, 1500, 2999]] = 7  # eos first, eos runs (one-token sequences), last
    np.save(tmp_path / "s.npy", stream)
    idx = precompute(tmp_path / "s.npy", tmp_path / "out", "demo", tok, eos_id=7, chunk_tokens=6)
    seqs = split_after(stream, 7)
    assert [len(s) for s in seqs[:4]] == [1, 5, 1, 1]
    expect_sequences(idx, seqs, hasher)


def test_several_files_form_one_stream(tmp_path, tok, hasher) -> None:
    parts = [random_ids(n, seed=n) for n in (250, 1, 399)]
    for i, p in enumerate(parts):
        p.tofile(tmp_path / f"p{i}.bin")
    files = [tmp_path / f"p{i}.bin" for i in range(3)]
    idx = precompute(files, tmp_path / "out", "demo", tok, seq_len=64, chunk_tokens=100)
    expect_sequences(idx, windows(np.concatenate(parts), 64), hasher)
    assert [d["bytes"] for d in idx.manifest["inputs"]] == [1000, 4, 1596]


def test_uint16_bin_flat_int64_and_one_layer(tmp_path, tok, hasher) -> None:
    stream = (random_ids(2000, seed=2) % 65536).astype(np.uint16)
    stream.tofile(tmp_path / "a.bin")
    idx = precompute(
        tmp_path / "a.bin",
        tmp_path / "out",
        "demo",
        tok,
        token_dtype="uint16",
        seq_len=300,
        index_dtype="int64",
        flat=True,
        layers=[15],
    )
    assert idx.layer_ids == [15]
    expect_sequences(idx, windows(stream, 300), hasher, dtype="int64", flat=True, layers=[15])


def test_2d_npy_rows_are_sequences(tmp_path, tok, hasher) -> None:
    batch = random_ids(7 * 50, seed=3).reshape(7, 50).astype(np.int64)
    np.save(tmp_path / "b.npy", batch)
    idx = precompute(tmp_path / "b.npy", tmp_path / "out", "demo", tok, chunk_tokens=120)
    assert idx.manifest["boundary"] == {"rule": "rows"}
    expect_sequences(idx, list(batch), hasher)


def ragged_rows(seed: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = [0, 1, 17, 0, 300, 2, 1, 90, 5000, 3]
    return [rng.integers(0, VOCAB, size=n).astype(np.int64) for n in lengths]


def test_parquet_ragged_rows_with_empty_and_one_token_rows(tmp_path, tok, hasher) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = ragged_rows()
    table = pa.table({"input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int32()))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3)
    idx = precompute(tmp_path / "d.parquet", tmp_path / "out", "demo", tok, chunk_tokens=50)
    expect_sequences(idx, rows, hasher)


def test_arrow_ipc_stream_as_hf_datasets_write_it(tmp_path, tok, hasher) -> None:
    pa = pytest.importorskip("pyarrow")
    rows = ragged_rows(seed=5)
    table = pa.table(
        {
            "text": [str(i) for i in range(len(rows))],
            "ids": pa.array([r.tolist() for r in rows], pa.large_list(pa.int64())),
        }
    )
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=4)
    idx = precompute(
        tmp_path / "data-00000-of-00001.arrow", tmp_path / "out", "demo", tok, column="ids"
    )
    expect_sequences(idx, rows, hasher)


def test_jsonl_records_are_tokenized_sequences(tmp_path, tok, hasher) -> None:
    from tokenizers import Tokenizer

    texts = ["Only Alexander the Great could tame the horse Bucephalus.", "", "a", "ünïcödé 漢字"]
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
        f.write("\n")  # blank lines are skipped
    idx = precompute(tmp_path / "d.jsonl", tmp_path / "out", "demo", tok)
    ref = Tokenizer.from_file(tok)  # the Python package, independent of our Rust tokenizing
    seqs = [np.array(e.ids, np.int64) for e in ref.encode_batch(texts, add_special_tokens=True)]
    expect_sequences(idx, seqs, hasher)


def test_text_is_a_stream_of_tokenized_lines(tmp_path, tok, hasher) -> None:
    from tokenizers import Tokenizer

    path = os.path.join(os.path.dirname(er.__file__), "data", "tinyshakespeare.txt")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()[:400]
    (tmp_path / "s.txt").write_text("".join(lines), encoding="utf-8")
    idx = precompute(
        tmp_path / "s.txt", tmp_path / "out", "demo", tok, seq_len=128, chunk_tokens=500
    )
    ref = Tokenizer.from_file(tok)
    stream = np.concatenate(
        [np.array(e.ids, np.int64) for e in ref.encode_batch(lines, add_special_tokens=False)]
    )
    expect_sequences(idx, windows(stream, 128), hasher)


def test_windows_dataset_and_dataloader(tmp_path, tok, hasher) -> None:
    stream = random_ids(1000, seed=6)
    stream.tofile(tmp_path / "a.bin")
    precompute(tmp_path / "a.bin", tmp_path / "out", "demo", tok, seq_len=256)
    idx = PrecomputedIndices(tmp_path / "out", window=256)
    assert len(idx) == 3
    assert len(PrecomputedIndices(tmp_path / "out", window=256, drop_last=False)) == 4
    toks, per = idx[1]
    assert np.array_equal(toks, stream[256:512])
    assert np.array_equal(per[1], np.asarray(idx.layer(1))[256:512])
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(idx, batch_size=2)
    first = next(iter(loader))
    assert first[0].shape == (2, 256) and first[1][15].shape == (2, 256, 16)
    with pytest.raises(IndexError, match="item 3 out of range for 3 items"):
        idx[3]
    with pytest.raises(KeyError, match=r"layer 2 is not in this precompute \(layers \[1, 15\]\)"):
        idx.layer(2)


# ---- the directory: atomic, resumable, never mixed -------------------------------------------


def test_a_finished_job_is_reused_another_refused_and_overwrite_replaces(tmp_path, tok) -> None:
    random_ids(500).tofile(tmp_path / "a.bin")
    out = tmp_path / "out"
    first = precompute(tmp_path / "a.bin", out, "demo", tok, seq_len=50)
    again = precompute(tmp_path / "a.bin", out, "demo", tok, seq_len=50)
    assert again.manifest == first.manifest
    small = er.EngramConfig.preset("demo").replace(engram_vocab_size=[1009, 1013])
    with pytest.raises(FileExistsError, match=r"holds a precompute of another job \(config: "):
        precompute(tmp_path / "a.bin", out, small, tok, seq_len=50)
    with pytest.raises(FileExistsError, match=r"another job \(boundary: "):
        precompute(tmp_path / "a.bin", out, "demo", tok, seq_len=60)
    replaced = precompute(tmp_path / "a.bin", out, small, tok, seq_len=50, overwrite=True)
    assert replaced.config == small
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "out"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a precompute output"):
        precompute(tmp_path / "a.bin", tmp_path / "mine", "demo", tok, seq_len=50, overwrite=True)


def _cli(tmp_path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engram_rs", "precompute", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def _run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engram_rs", "precompute", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def test_a_killed_run_leaves_no_final_file_and_resume_gives_the_same_files(tmp_path, tok) -> None:
    random_ids(3_000_000, seed=7).tofile(tmp_path / "a.bin")
    common = ["a.bin", "--tokenizer", tok, "--seq-len", "1000", "--no-progress"]
    proc = _cli(
        tmp_path, *common, "--out", "killed", "--chunk-tokens", "2000", "--commit-seconds", "0"
    )
    state = tmp_path / "killed.partial" / "state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["tokens"] >= 20_000:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "killed").exists()  # nothing under the final name
    done = json.loads(state.read_text())["tokens"]
    assert 0 < done < 3_000_000
    # Without --resume the interrupted run is not silently thrown away or mixed in.
    again = _run_cli(tmp_path, *common, "--out", "killed")
    assert again.returncode == 1
    assert "holds an interrupted run: pass --resume" in again.stderr
    resumed = _run_cli(tmp_path, *common, "--out", "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path}/killed.partial at token {done} " in resumed.stderr
    assert not (tmp_path / "killed.partial").exists()
    whole = _run_cli(tmp_path, *common, "--out", "whole")
    assert whole.returncode == 0, whole.stderr
    a, b = PrecomputedIndices(tmp_path / "killed"), PrecomputedIndices(tmp_path / "whole")
    assert a.manifest["files"] == b.manifest["files"]  # shapes and checksums
    for name in a.manifest["files"]:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert verify(tmp_path / "killed")["rehashed_sequences"] == 64


def test_memory_stays_bounded_on_an_input_larger_than_the_chunk(tmp_path, tok) -> None:
    random_ids(4_000_000, seed=8).tofile(tmp_path / "big.bin")
    random_ids(1000, seed=8).tofile(tmp_path / "small.bin")
    code = """
        import resource, sys, engram_rs.offline as p
        p.precompute(sys.argv[1], sys.argv[2], "demo", sys.argv[3], seq_len=4096,
                     chunk_tokens=1 << 16)
        print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """

    def peak(name: str) -> int:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(code),
                str(tmp_path / f"{name}.bin"),
                str(tmp_path / name),
                tok,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(proc.stdout.split("RSS")[1]) * 1024

    base, big = peak("small"), peak("big")
    out_bytes = sum(os.path.getsize(tmp_path / "big" / f) for f in os.listdir(tmp_path / "big"))
    assert out_bytes > 500e6  # 4 M tokens x 132 bytes
    # The bound: about 3 chunks of (4 + 128) bytes a token in flight (26 MB here) plus the
    # input's mapped pages (16 MB); far below the 528 MB written.
    assert big - base < 100e6, (base, big)


# ---- bad input --------------------------------------------------------------------------------


def cli_error(tmp_path, capsys, *args: str) -> str:
    assert main(["precompute", *args]) == 1
    return capsys.readouterr().err


def test_bad_inputs_get_clear_messages(tmp_path, tok, capsys) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03\x04\x05")
    bad = random_ids(100)
    bad[42] = VOCAB + 5
    bad.tofile(tmp_path / "bad.bin")
    random_ids(100).tofile(tmp_path / "ok.bin")
    out = str(tmp_path / "out")
    cases = [
        (["missing.bin"], "input .*missing.bin does not exist"),
        (["empty.bin"], r"input .*empty.bin is empty \(0 bytes\)"),
        (["odd.bin", "--seq-len", "8"], r"5 bytes is not a multiple of the token size \(4 bytes"),
        (
            ["bad.bin", "--seq-len", "8"],
            r"bad.bin, token 42: token id 129285 is outside the tokenizer's vocabulary "
            r"\[0, 129280\)",
        ),
        (["ok.bin"], r"is a flat token stream: say where sequences start with --seq-len T"),
        (["ok.bin", "--seq-len", "8", "--config", "nope"], "unknown preset 'nope'"),
        (["ok.bin", "--seq-len", "8", "--layers", "1,2"], r"layers \[1, 2\] must be a non-empty"),
        (["ok.bin", "--seq-len", "8", "--layers", "x"], "--layers takes comma-separated ints"),
        (["data.csv", "--seq-len", "8"], "cannot tell the format from the suffix '.csv'"),
    ]
    (tmp_path / "data.csv").write_text("1,2\n")
    for args, pattern in cases:
        paths = [str(tmp_path / args[0]), *args[1:]]
        err = cli_error(tmp_path, capsys, *paths, "--out", out, "--tokenizer", tok)
        assert err.startswith("engram-rs precompute: error: "), err
        assert re.search(pattern, err), (pattern, err)
        assert not os.path.exists(out)


def test_bad_parquet_and_rows_options(tmp_path, tok) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"ids": [[1, 2], [3]]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"input_ids": [1.5, 2.5]}), tmp_path / "f.parquet")
    pq.write_table(pa.table({"input_ids": [[1, 2], None]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"no column 'input_ids' \(columns: ids\): pass --column"):
        precompute(tmp_path / "a.parquet", tmp_path / "o", "demo", tok)
    with pytest.raises(ValueError, match="column 'input_ids' must be a list of ints .*got double"):
        precompute(tmp_path / "f.parquet", tmp_path / "o", "demo", tok)
    with pytest.raises(ValueError, match=r"n.parquet, row 1: column 'input_ids' is null"):
        precompute(tmp_path / "n.parquet", tmp_path / "o", "demo", tok)
    with pytest.raises(ValueError, match="the rows of these inputs are the sequences; --seq-len"):
        precompute(tmp_path / "a.parquet", tmp_path / "o", "demo", tok, column="ids", seq_len=4)
    with pytest.raises(ValueError, match=r"a.parquet, row 1, position 0: token id 3000000 "):
        pq.write_table(pa.table({"ids": [[1, 2], [3_000_000]]}), tmp_path / "a.parquet")
        precompute(tmp_path / "a.parquet", tmp_path / "o", "demo", tok, column="ids")
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"j.jsonl, line 2: a record needs a string field 'text'"):
        precompute(tmp_path / "j.jsonl", tmp_path / "o", "demo", tok)
    assert not (tmp_path / "o").exists()


def test_a_full_disk_is_a_clear_error_and_nothing_final_is_left(tmp_path, tok) -> None:
    random_ids(200_000).tofile(tmp_path / "a.bin")
    out = run_in_small_tmpfs(
        tmp_path,
        f"""
        import os, engram_rs.offline as p
        try:
            p.precompute({str(tmp_path / "a.bin")!r}, DISK + "/out", "demo", {tok!r},
                         seq_len=4096, chunk_tokens=10000)
        finally:
            print("LEFT", sorted(os.listdir(DISK)))
        """,
        size="8m",
    )
    assert out.exc_type == "OSError", out
    assert "out.partial/layer_" in out.message and "No space left on device" in out.message
    assert "free space on that disk or choose another --out, then run again with --resume" in (
        out.message
    )
    assert "LEFT ['out.partial']" in out.stdout  # no final directory


def test_past_a_file_size_limit(tmp_path, tok) -> None:
    random_ids(100_000).tofile(tmp_path / "a.bin")
    out = run_isolated(
        f"""
        import resource, signal, engram_rs.offline as p
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            p.precompute({str(tmp_path / "a.bin")!r}, {str(tmp_path / "out")!r}, "demo",
                         {tok!r}, seq_len=512, chunk_tokens=5000)
        except BaseException as e:
            _report(e)
        """
    )
    assert out.exc_type == "OSError" and "File too large" in out.message, out
    assert not (tmp_path / "out").exists()


def test_verify_finds_a_damaged_file(tmp_path, tok, capsys) -> None:
    random_ids(5000).tofile(tmp_path / "a.bin")
    precompute(tmp_path / "a.bin", tmp_path / "out", "demo", tok, seq_len=100)
    assert main(["verify", str(tmp_path / "out")]) == 0
    assert "OK: 4 files match" in capsys.readouterr().out
    with open(tmp_path / "out" / "layer_15.npy", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    assert main(["verify", str(tmp_path / "out")]) == 1
    assert "layer_15.npy: checksum xxh3-128:" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no manifest.json, not a precompute output"):
        PrecomputedIndices(tmp_path)


def test_progress_shows_the_rate_and_an_eta(tmp_path, tok, capsys) -> None:
    random_ids(50_000).tofile(tmp_path / "a.bin")
    precompute(
        tmp_path / "a.bin",
        tmp_path / "out",
        "demo",
        tok,
        seq_len=512,
        chunk_tokens=5000,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "engram_rs precompute: 100%" in err and "50.0k/50.0k" in err, err
    assert "M tok/s" in err and "<00:00" in err  # the rate and the time left


def test_threads_are_set_before_the_first_kernel(tmp_path, tok) -> None:
    random_ids(5000).tofile(tmp_path / "a.bin")
    out = run_isolated(
        f"""
        import engram_rs.offline as p
        a, tok = {str(tmp_path / "a.bin")!r}, {tok!r}
        p.precompute(a, {str(tmp_path / "one")!r}, "demo", tok, seq_len=64, threads=1)
        try:
            p.precompute(a, {str(tmp_path / "two")!r}, "demo", tok, seq_len=64, threads=2)
        except BaseException as e:
            _report(e)
        """
    )
    assert out.exc_type == "ValueError", out
    assert "threads = 2: the kernels' thread pool already runs with 1 threads" in out.message
    assert (tmp_path / "one" / "manifest.json").exists() and not (tmp_path / "two").exists()
