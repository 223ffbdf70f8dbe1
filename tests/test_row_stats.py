"""Row access statistics: ``precompute(..., row_counts=True)`` counts against a numpy count of
the hashed rows (both presets' shapes, scaled down; flat or not; a resumed run), ``row_stats`` on
hand-made counts against figures computed by hand, bad directories, and the corpus function's
error without apt-get."""

from __future__ import annotations

import os
import subprocess
import sys

import engram_rs as er
import numpy as np
import pytest
from engram_rs import _engram_rs
from engram_rs.bench import deepseek_v4_tokenizer_json
from engram_rs.bench.corpus import Corpus, linux_doc_tokens
from engram_rs.precompute import counts as counts_mod
from engram_rs.precompute import local_engine
from engram_rs.stats import _part, format_stats, plot_rank_frequency, row_stats

VOCAB = 129280

SMALL = {
    "demo": er.EngramConfig.preset("demo").replace(engram_vocab_size=(1009, 2003)),
    "deepseek-v4.1-flash": er.EngramConfig.preset("deepseek-v4.1-flash").replace(
        engram_vocab_size=(1009, 2003, 3001)
    ),
}


@pytest.fixture(scope="module")
def tok() -> str:
    return deepseek_v4_tokenizer_json()


@pytest.fixture(scope="module")
def comp(tok: str) -> er.CompressedTokenizer:
    return er.CompressedTokenizer.from_file(tok)


def zipf_ids(n: int, seed: int = 0) -> np.ndarray:
    """Skewed raw ids (as text is), so that rows repeat."""
    return (np.random.default_rng(seed).zipf(1.2, size=n) % VOCAB).astype(np.uint32)


def reference_counts(
    stream: np.ndarray, seq_len: int, hasher: er.NgramHasher, layer: int
) -> np.ndarray:
    """np.bincount of the flat rows hash_tokens gives for each window of the stream."""
    rows = []
    for a in range(0, stream.shape[0], seq_len):
        out = hasher.hash_tokens(stream[a : a + seq_len], layer_ids=[layer], flat=True)
        rows.append(out[layer].reshape(-1))
    return np.bincount(np.concatenate(rows), minlength=hasher.table_rows[layer])


@pytest.mark.parametrize("preset", sorted(SMALL))
@pytest.mark.parametrize("flat", [False, True])
def test_counts_equal_a_numpy_count_of_the_hashed_rows(tmp_path, tok, comp, preset, flat) -> None:
    cfg = SMALL[preset]
    stream = zipf_ids(20_000, seed=3)
    stream.tofile(tmp_path / "a.bin")
    idx = er.precompute(
        tmp_path / "a.bin", tmp_path / "out", cfg, tok, seq_len=700, flat=flat,
        index_dtype="int64" if flat else "int32", row_counts=True, chunk_tokens=3000,
    )  # fmt: skip
    hasher = er.NgramHasher.from_tokenizer(cfg, comp)
    entries = idx.manifest["row_counts"]
    assert idx.manifest["job"]["row_counts"] is True
    for layer in cfg.layer_ids:
        got = np.load(tmp_path / "out" / f"row_counts_{layer}.npy")
        want = reference_counts(stream, 700, hasher, layer)
        assert got.dtype == np.uint32 and np.array_equal(got, want), layer
        e = entries[str(layer)]
        assert e["rows"] == hasher.table_rows[layer] == got.shape[0]
        assert e["lookups"] == int(want.sum()) == 20_000 * cfg.cols
        assert e["distinct_rows"] == int(np.count_nonzero(want))
        # Each order's heads own one contiguous range of rows: its lookups are tokens x heads.
        for n, (a, b) in e["orders"].items():
            assert int(got[a:b].sum()) == 20_000 * cfg.n_head_per_ngram, n
    assert er.verify(tmp_path / "out")["tokens"] == 20_000


def test_an_interrupted_run_resumed_counts_each_token_once(tmp_path, tok, monkeypatch) -> None:
    cfg = SMALL["deepseek-v4.1-flash"]
    zipf_ids(30_000, seed=5).tofile(tmp_path / "a.bin")
    args = dict(seq_len=500, row_counts=True, chunk_tokens=2000, commit_seconds=0, progress=False)
    whole = er.precompute(tmp_path / "a.bin", tmp_path / "whole", cfg, tok, **args)
    real, calls = local_engine.hash_block, []

    def stop_at_the_fifth(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(local_engine, "hash_block", stop_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        er.precompute(tmp_path / "a.bin", tmp_path / "cut", cfg, tok, **args)
    monkeypatch.setattr(local_engine, "hash_block", real)
    # Killed while counting: the count file of the killed run is never claimed complete.
    real_write = counts_mod.write_counts

    def half_written(fd, path, counts):
        os.write(fd, b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(counts_mod, "write_counts", half_written)
    with pytest.raises(KeyboardInterrupt):
        er.precompute(tmp_path / "a.bin", tmp_path / "cut", cfg, tok, resume=True, **args)
    assert not (tmp_path / "cut").exists()
    monkeypatch.setattr(counts_mod, "write_counts", real_write)
    cut = er.precompute(tmp_path / "a.bin", tmp_path / "cut", cfg, tok, resume=True, **args)
    assert cut.manifest["row_counts"] == whole.manifest["row_counts"]  # checksums included
    for layer in cfg.layer_ids:
        name = f"row_counts_{layer}.npy"
        assert np.array_equal(np.load(tmp_path / "cut" / name), np.load(tmp_path / "whole" / name))


def test_count_rows_refuses_an_id_outside_its_head() -> None:
    counts = np.zeros(8, np.uint32)
    with pytest.raises(ValueError, match="hash id 5 of token 0, column 1 is not a row of its head"):
        _engram_rs.count_rows(np.array([[0, 5]], np.int32), [0, 3], [0, 3], [3, 8], counts)
    with pytest.raises(ValueError, match=r"a \[tokens, 2\] array is needed"):
        _engram_rs.count_rows(np.zeros(4, np.int32), [0, 3], [0, 3], [3, 8], counts)
    with pytest.raises(TypeError, match="int32 or int64"):
        _engram_rs.count_rows(np.zeros((2, 2), np.float32), [0, 3], [0, 3], [3, 8], counts)


def test_figures_of_hand_made_counts_equal_the_hand_computed_ones() -> None:
    # 20 rows of 1024 bytes (4 a page: 5 pages); lookups 40.
    counts = np.zeros(20, np.uint32)
    counts[[0, 1, 5, 9, 10, 19]] = [10, 2, 20, 1, 4, 3]
    p = _part(7, None, counts, 0, 20, 10, 4, 1024, 4096, (10.0, 50.0))
    assert (p.rows, p.pages, p.lookups, p.distinct) == (20, 5, 40, 6)
    assert p.distinct_share == 6 / 20
    # Hottest 10 % of 20 rows = 2 rows: 20 + 10 = 30 of 40; 50 % = 10 rows: all 40.
    assert p.hot_rows == {10.0: 30 / 40, 50.0: 1.0}
    # Pages: {0: 12, 1: 20, 2: 5, 3: 0, 4: 3}; 10 % of 5 pages = 1 page: 20; 50 % = 2: 32.
    assert p.hot_pages == {10.0: 20 / 40, 50.0: 32 / 40}
    assert p.ranks.tolist()[0] == 1 and p.frequencies.tolist()[0] == 20
    # An order's part, rows [5, 20) of 264-byte rows: first byte 1320 (page 0), last 5279
    # (page 1): 2 pages, rows 5..15 start on page 0, 16..19 on page 1.
    q = _part(7, 3, counts, 5, 20, 10, 2, 264, 4096, (50.0,))
    assert (q.rows, q.pages, q.lookups, q.distinct) == (15, 2, 20, 4)
    assert q.hot_pages == {50.0: (20 + 1 + 4) / 20}
    assert q.hot_rows == {50.0: (20 + 4 + 3 + 1) / 20}


def test_batch_distinct_equals_hand_counts() -> None:
    # Two columns (one order each): heads of 3 and 5 rows at offsets 0 and 3.
    ids = np.array([[0, 0], [0, 1], [2, 1], [2, 1], [1, 1]], np.int64)
    got = _engram_rs.batch_distinct(ids, [0, 3], [0, 3], [3, 8], [0, 1, 2], [0, 2, 5], 8)
    assert got.tolist() == [1, 2, 2, 1]  # batch 0: {0} {3, 4}; batch 1: {2, 1} {4}


def test_row_stats_of_a_precompute_against_numpy(tmp_path, tok, comp) -> None:
    cfg = SMALL["demo"]
    stream = zipf_ids(12_000, seed=9)
    stream.tofile(tmp_path / "a.bin")
    er.precompute(tmp_path / "a.bin", tmp_path / "out", cfg, tok, seq_len=100, row_counts=True)
    s = row_stats(tmp_path / "out", batch_sizes=(1, 64, 4096))
    hasher = er.NgramHasher.from_tokenizer(cfg, comp)
    layer = cfg.layer_ids[0]
    flat = [
        hasher.hash_tokens(stream[a : a + 100], layer_ids=[layer], flat=True)[layer]
        for a in range(0, 12_000, 100)
    ]
    whole = s.part(layer)
    assert whole.tokens == 12_000 and whole.lookups == 12_000 * cfg.cols
    assert whole.distinct == np.unique(np.concatenate(flat)).size
    assert whole.batch_count == {1: 120, 64: 1, 4096: 0}
    one = np.mean([np.unique(f).size / f.size for f in flat])
    assert whole.batch_unique[1] == pytest.approx(one)
    first64 = np.concatenate(flat[:64])
    assert whole.batch_unique[64] == pytest.approx(np.unique(first64).size / first64.size)
    everything = np.concatenate(flat)
    assert whole.batch_unique[4096] == pytest.approx(np.unique(everything).size / everything.size)
    order3 = s.part(layer, 3)
    cols = slice(cfg.n_head_per_ngram, 2 * cfg.n_head_per_ngram)
    assert order3.distinct == np.unique(np.concatenate([f[:, cols] for f in flat])).size
    text = format_stats(s)
    assert "| 15 | 3 | 12,000 | 96,000 |" in text and "one batch of all of them" in text
    png = plot_rank_frequency([("demo", s)], tmp_path / "zipf.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _stats_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engram_rs", "stats", *args], capture_output=True, text=True
    )


def test_stats_refuses_a_directory_without_counts_and_a_truncated_file(tmp_path, tok) -> None:
    cfg = SMALL["demo"]
    zipf_ids(2000).tofile(tmp_path / "a.bin")
    er.precompute(tmp_path / "a.bin", tmp_path / "plain", cfg, tok, seq_len=100)
    with pytest.raises(ValueError, match="made without --row-counts; run engram-rs precompute"):
        row_stats(tmp_path / "plain")
    res = _stats_cli(str(tmp_path / "plain"), "--no-plot")
    assert res.returncode == 1 and res.stderr.startswith("engram-rs stats: error: ")
    assert "holds no row counts" in res.stderr and "Traceback" not in res.stderr
    er.precompute(tmp_path / "a.bin", tmp_path / "c", cfg, tok, seq_len=100, row_counts=True)
    path = tmp_path / "c" / "row_counts_1.npy"
    size = path.stat().st_size
    os.truncate(path, size - 4)
    rows = (size - 128) // 4
    with pytest.raises(
        ValueError, match=rf"{size - 132} data bytes, the manifest's shape \({rows},\)"
    ):
        row_stats(tmp_path / "c")
    res = _stats_cli(str(tmp_path / "c"), "--no-plot")
    assert res.returncode == 1 and "rerun the precompute" in res.stderr
    path.unlink()
    with pytest.raises(FileNotFoundError, match="row_counts_1.npy is missing"):
        row_stats(tmp_path / "c")
    with pytest.raises(ValueError, match="row_bytes must be an int >= 1, got 0"):
        row_stats(tmp_path / "c", row_bytes=0)


def test_the_corpus_names_the_missing_tool(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither apt-get nor dpkg-deb
    with pytest.raises(FileNotFoundError, match="apt-get is not on PATH: linux_doc_tokens"):
        linux_doc_tokens(tmp_path / "cache")


def test_corpus_split_is_deterministic_and_streams_documents(tmp_path) -> None:
    ids = np.arange(10, dtype=np.uint32)
    ids.tofile(tmp_path / "t.bin")
    c = Corpus(
        str(tmp_path / "t.bin"), np.array([0, 3, 3, 10]), ["a.rst", "b.txt", "c/d.rst"],
        "pkg", "1", 99, "tok",
    )  # fmt: skip
    train, held = c.split(0.5)
    assert sorted(train + held) == [0, 1, 2] and c.split(0.5) == (train, held)
    assert c.split(0.0) == ([0, 1, 2], []) and c.split(1.0) == ([], [0, 1, 2])
    assert c.write_stream(tmp_path / "s.bin", [2, 0]) == 7 + 3 + 2
    assert np.fromfile(tmp_path / "s.bin", np.uint32).tolist() == [
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        99,
        0,
        1,
        2,
        99,
    ]
    with pytest.raises(ValueError, match="held_out must be a share in"):
        c.split(1.5)
