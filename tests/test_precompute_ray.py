"""The precompute's ``engine="ray"`` and ``engram_rs.ray.HashBatches`` on a local 2-CPU Ray:
the same bytes as the local engine, for rows and stream inputs."""

from __future__ import annotations

import importlib
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from engram_rs import CompressedTokenizer, EngramConfig, NgramHasher  # noqa: E402
from engram_rs.bench import deepseek_v4_tokenizer_json  # noqa: E402
from engram_rs.offline import hash_block, precompute  # noqa: E402
from engram_rs.precompute.job import InputSums  # noqa: E402
from engram_rs.ray import HashBatches  # noqa: E402

# The module (engram_rs.offline may also name the function in the package's namespace).
precompute_module = importlib.import_module("engram_rs.precompute.local_engine")

# Ray's own modules warn about things of theirs (deprecations, resource hints) on some versions.
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::ResourceWarning"
)

VOCAB = 129280  # DeepSeek-V4: raw ids below this are valid
CHUNK = 700  # tokens per chunk: several chunks per input, not a multiple of any window


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200_000_000,
        log_to_driver=False,
        configure_logging=False,
    )
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = bars
        ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer() -> str:
    return deepseek_v4_tokenizer_json()


def _ragged(rng: np.random.Generator, rows: int) -> list[np.ndarray]:
    out = [rng.integers(0, VOCAB, rng.integers(0, 40)) for _ in range(rows)]
    out[3] = np.zeros(0, np.int64)  # an empty row
    out[5] = np.array([7], np.int64)  # a one-token row
    return out


def _both(inputs: Any, tmp: pathlib.Path, tokenizer: str, **options: Any) -> None:
    """precompute with each engine: every output array and the manifests are identical."""
    options = {"tokenizer": tokenizer, "chunk_tokens": CHUNK, "progress": False, **options}
    tmp.mkdir(exist_ok=True)
    local = precompute(inputs, tmp / "local", engine="local", **options)

    def driver_read(self: Any, i: int, upto: int) -> None:
        raise AssertionError(f"the driver read input {i} for its checksum")

    with pytest.MonkeyPatch.context() as mp:  # Ray's tasks sum the inputs as they read them
        mp.setattr(InputSums, "_read", driver_read)
        remote = precompute(inputs, tmp / "ray", engine="ray", **options)
    assert remote.num_tokens == local.num_tokens > 0
    names = sorted(p.name for p in (tmp / "local").iterdir())
    assert names == sorted(p.name for p in (tmp / "ray").iterdir())
    for name in names:
        if name.endswith(".npy"):
            a, b = np.load(tmp / "local" / name), np.load(tmp / "ray" / name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert np.array_equal(a, b), name
            assert (tmp / "local" / name).read_bytes() == (tmp / "ray" / name).read_bytes(), name
    man_local = json.loads((tmp / "local" / "manifest.json").read_text())
    man_ray = json.loads((tmp / "ray" / "manifest.json").read_text())
    for name, entry in man_local["files"].items():
        assert man_ray["files"][name]["checksum"] == entry["checksum"], name
    assert man_ray == man_local


def test_hash_batches_equals_hash_tokens_per_row(local_ray: None, tokenizer: str) -> None:
    rng = np.random.default_rng(0)
    rows = _ragged(rng, 12)
    cfg = EngramConfig.preset("demo")
    hasher = NgramHasher.from_tokenizer(cfg, CompressedTokenizer.from_file(tokenizer))
    kwargs: dict[str, Any] = {"config": "demo", "tokenizer": tokenizer}

    # Called directly: ragged rows (an object array), and a 2-D batch; flat int64 ids too.
    objects = np.empty(len(rows), dtype=object)
    objects[:] = rows
    for flat, dtype in ((False, "int32"), (True, "int64")):
        fn = HashBatches(cfg.to_dict(), tokenizer, layers=[15], index_dtype=dtype, flat=flat)
        out = fn({"input_ids": objects, "other": np.arange(len(rows))})
        assert set(out) == {"input_ids", "other", "layer_15"}
        for r, row in enumerate(rows):
            want = hasher.hash_tokens(row, layer_ids=[15], dtype=dtype, flat=flat)[15]
            assert out["layer_15"][r].dtype == want.dtype
            assert np.array_equal(out["layer_15"][r], want)
    grid = rng.integers(0, VOCAB, (4, 9)).astype(np.uint32)
    out = HashBatches(**kwargs)({"input_ids": grid})
    for layer in cfg.layer_ids:
        assert out[f"layer_{layer}"].shape == (4, 9, cfg.cols)
        for r in range(4):
            want = hasher.hash_tokens(grid[r], dtype="int32")[layer]
            assert np.array_equal(out[f"layer_{layer}"][r], want)

    # In a Ray Data pipeline (actors, batches of 5 ragged rows).
    ds = ray.data.from_items([{"input_ids": row, "i": i} for i, row in enumerate(rows)])
    ds = ds.map_batches(
        HashBatches,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        batch_size=5,
    )
    got = sorted(ds.take_all(), key=lambda r: int(r["i"]))
    assert len(got) == len(rows)
    for item, row in zip(got, rows, strict=True):
        want = hasher.hash_tokens(row, dtype="int32")
        for layer in cfg.layer_ids:
            assert np.array_equal(
                np.asarray(item[f"layer_{layer}"]).reshape(-1, cfg.cols), want[layer]
            )


def test_parquet_ragged_rows(local_ray: None, tokenizer: str, tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    paths = []
    for name, n in (("b.parquet", 300), ("a.parquet", 150)):  # not in name order
        rows = _ragged(rng, n)
        col = pa.array([r.tolist() for r in rows], pa.list_(pa.int64()))
        pq.write_table(
            pa.table({"input_ids": col, "n": np.arange(n)}), tmp_path / name, row_group_size=64
        )
        paths.append(str(tmp_path / name))
    _both(paths, tmp_path, tokenizer, layers=[1, 15])


def test_npy_batches(local_ray: None, tokenizer: str, tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x1.npy", rng.integers(0, VOCAB, (40, 64)).astype(np.uint32))
    np.save(tmp_path / "x0.npy", rng.integers(0, VOCAB, (30, 64)).astype(np.int64))
    _both([tmp_path / "x1.npy", tmp_path / "x0.npy"], tmp_path, tokenizer, flat=True)


def test_bin_stream_seq_len(local_ray: None, tokenizer: str, tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(3)
    rng.integers(0, VOCAB, 3001).astype(np.uint32).tofile(tmp_path / "s1.bin")
    rng.integers(0, VOCAB, 2002).astype(np.uint32).tofile(tmp_path / "s0.bin")
    # 5003 tokens in windows of 128: the last window is partial, and windows span both files.
    _both([tmp_path / "s1.bin", tmp_path / "s0.bin"], tmp_path, tokenizer, seq_len=128)


def test_row_counts_equal_the_local_engine_s(
    local_ray: None, tokenizer: str, tmp_path: pathlib.Path
) -> None:
    # The counts are made by the driver from the files it wrote: the same bytes as the local run.
    rng = np.random.default_rng(8)
    (rng.zipf(1.3, 4000) % VOCAB).astype(np.uint32).tofile(tmp_path / "z.bin")
    _both(tmp_path / "z.bin", tmp_path, tokenizer, seq_len=300, row_counts=True)
    assert (tmp_path / "ray" / "row_counts_1.npy").exists()


def test_bin_stream_eos(local_ray: None, tokenizer: str, tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(4)
    eos = 1
    tokens = rng.integers(2, 65536, 4500).astype(np.uint16)
    cuts = np.concatenate([rng.integers(0, 4500, 60), [0, 1, 2, CHUNK - 1, CHUNK, CHUNK + 1]])
    tokens[cuts] = eos  # around chunk boundaries, at the start, back to back
    tokens[-1] = eos
    tokens.tofile(tmp_path / "e.bin")
    _both(tmp_path / "e.bin", tmp_path, tokenizer, eos_id=eos, token_dtype="uint16")


def test_npy_stream_and_arrow(local_ray: None, tokenizer: str, tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(5)
    np.save(tmp_path / "s.npy", rng.integers(0, VOCAB, 2500).astype(np.int64))
    _both(tmp_path / "s.npy", tmp_path / "npy", tokenizer, seq_len=96)
    rows = _ragged(rng, 200)
    table = pa.table({"input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int32()))})
    with pa.ipc.new_file(str(tmp_path / "t.arrow"), table.schema) as w:
        w.write_table(table)
    _both(tmp_path / "t.arrow", tmp_path / "arrow", tokenizer)


def test_dead_id_on_streams_and_rows(
    local_ray: None, tokenizer: str, tmp_path: pathlib.Path
) -> None:
    """Blocked positions (SPEC 8.3) across chunk edges and files, on a stream and on Parquet
    rows (Ray's own reader): both engines give the same files and manifests."""
    rng = np.random.default_rng(8)
    dead = 7
    tokens = rng.integers(10, VOCAB, 4000).astype(np.uint32)
    tokens[[0, CHUNK - 1, CHUNK, 900, 901, 902, 3999]] = dead
    tokens.tofile(tmp_path / "d.bin")
    _both(tmp_path / "d.bin", tmp_path / "bin", tokenizer, seq_len=300, dead_id=dead)
    man = json.loads((tmp_path / "bin" / "local" / "manifest.json").read_text())
    assert man["boundary"] == {"rule": "seq_len", "seq_len": 300, "dead_id": dead}
    rows = _ragged(rng, 100)
    rows[4] = np.array([dead, 11, 12, dead, 13])
    table = pa.table({"input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int64()))})
    pq.write_table(table, tmp_path / "r.parquet", row_group_size=30)
    _both(tmp_path / "r.parquet", tmp_path / "pq", tokenizer, dead_id=dead)


def test_jsonl(local_ray: None, tokenizer: str, tmp_path: pathlib.Path) -> None:
    lines = [json.dumps({"text": f"record {i}: " + "engram hashing " * (i % 7)}) for i in range(60)]
    lines[10] = "   "  # a blank line is skipped
    lines[20] = json.dumps({"text": "a line separator\u2028inside, and \u00e9"}, ensure_ascii=False)
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _both(tmp_path / "d.jsonl", tmp_path, tokenizer, chunk_tokens=64)


def test_errors(
    local_ray: None, tokenizer: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "t.txt").write_text("plain text is a stream\n")
    with pytest.raises(ValueError, match="format text.*--engine local"):
        precompute(
            tmp_path / "t.txt", tmp_path / "o1", tokenizer=tokenizer, seq_len=8, engine="ray"
        )
    col = pa.array([[1, 2, 3], [4, VOCAB + 5]], pa.list_(pa.int64()))
    pq.write_table(pa.table({"input_ids": col}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=f"bad.parquet: .*row 1 .*token id {VOCAB + 5}"):
        precompute(tmp_path / "bad.parquet", tmp_path / "o2", tokenizer=tokenizer, engine="ray")

    # A run of the local engine interrupted after some commits is refused, and kept.
    tokens = np.random.default_rng(6).integers(0, VOCAB, 3000).astype(np.uint32)
    tokens.tofile(tmp_path / "s.bin")
    options: dict[str, Any] = {"tokenizer": tokenizer, "seq_len": 64, "chunk_tokens": CHUNK}
    calls = []

    def interrupted(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return hash_block(*args)

    with monkeypatch.context() as m:
        m.setattr(precompute_module, "hash_block", interrupted)
        with pytest.raises(RuntimeError, match="killed"):
            precompute(tmp_path / "s.bin", tmp_path / "o3", commit_seconds=0, **options)
    assert (tmp_path / "o3.partial" / "state.json").exists()
    with pytest.raises(FileExistsError, match="--engine local --resume"):
        precompute(tmp_path / "s.bin", tmp_path / "o3", resume=True, engine="ray", **options)
    assert (tmp_path / "o3.partial" / "state.json").exists()
    done = precompute(tmp_path / "s.bin", tmp_path / "o3", resume=True, progress=False, **options)
    assert np.array_equal(done.tokens, tokens)
