"""On-the-fly hashing for DataLoaders (engram_rs.loader): same ids as reading a precompute."""

from __future__ import annotations

import pathlib
import pickle

import engram_rs as er
import numpy as np
import pytest
from engram_rs.bench import deepseek_v4_tokenizer_json
from engram_rs.offline import PrecomputedIndices, precompute
from isolated import run_isolated

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

PRESETS = ["demo", "deepseek-v4.1-flash"]
VOCAB = 129280  # the DeepSeek-V4 tokenizer's raw ids
# An empty and a one-token sequence, short ones, and ones longer than a kernel chunk (2048).
LENGTHS = [0, 1, 5, 2500, 3, 64, 4100, 2]


@pytest.fixture(scope="module")
def tokenizer() -> str:
    return deepseek_v4_tokenizer_json()


@pytest.fixture(scope="module")
def comp(tokenizer: str) -> er.CompressedTokenizer:
    return er.CompressedTokenizer.from_file(tokenizer)


@pytest.fixture(scope="module")
def hashers(comp: er.CompressedTokenizer) -> dict[str, er.NgramHasher]:
    return {p: er.NgramHasher.from_tokenizer(er.EngramConfig.preset(p), comp) for p in PRESETS}


@pytest.fixture(scope="module")
def samples() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, VOCAB, n, dtype=np.int64) for n in LENGTHS]


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory, samples: list[np.ndarray]) -> pathlib.Path:
    path = tmp_path_factory.mktemp("loader") / "seqs.parquet"
    column = pa.array([s.tolist() for s in samples], pa.list_(pa.int64()))
    pq.write_table(pa.table({"input_ids": column}), path)
    return path


@pytest.fixture(scope="module", params=[(p, flat) for p in PRESETS for flat in (False, True)])
def stored(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    parquet: pathlib.Path,
    tokenizer: str,
) -> tuple[str, bool, PrecomputedIndices]:
    preset, flat = request.param
    out = tmp_path_factory.mktemp("pre") / "out"
    idx = precompute(parquet, out, config=preset, tokenizer=tokenizer, flat=flat, progress=False)
    return preset, flat, idx


def test_collate_equals_precompute(
    stored: tuple[str, bool, PrecomputedIndices],
    hashers: dict[str, er.NgramHasher],
    samples: list[np.ndarray],
) -> None:
    preset, flat, idx = stored
    h = hashers[preset]
    assert idx.num_sequences == len(samples)
    batch = er.HashCollate(h, flat=flat, pad_token_id=7, return_tensors="np")(samples)
    width = max(LENGTHS)
    assert batch["input_ids"].shape == (len(samples), width)
    assert batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].dtype == np.int64
    assert sorted(batch["hash_ids"]) == idx.layer_ids == h.layer_ids
    for b, n in enumerate(LENGTHS):
        tokens, ids = idx.sequence(b)
        assert batch["input_ids"][b, :n].tolist() == tokens.tolist()
        assert (batch["input_ids"][b, n:] == 7).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        for layer in idx.layer_ids:
            got = batch["hash_ids"][layer]
            assert got.shape == (len(samples), width, h.cols) and got.dtype == np.int32
            np.testing.assert_array_equal(got[b, :n], ids[layer])
            assert not got[b, n:].any()
    # HashedTokens yields the precompute's items, sample by sample (batches of 3 inside).
    items = list(er.HashedTokens(samples, h, flat=flat, batch_size=3))
    assert len(items) == len(samples)
    for (tokens, ids), (want_tokens, want_ids) in zip(items, idx, strict=True):
        assert tokens.dtype == np.int64 and tokens.tolist() == want_tokens.tolist()
        assert sorted(ids) == idx.layer_ids
        for layer in idx.layer_ids:
            assert ids[layer].dtype == np.int32
            np.testing.assert_array_equal(ids[layer], want_ids[layer])


def test_sample_kinds_and_tensors(hashers: dict[str, er.NgramHasher]) -> None:
    h = hashers["deepseek-v4.1-flash"]
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, VOCAB, n) for n in (6, 1, 4)]
    want = er.HashCollate(h, return_tensors="np")(rows)
    kinds = [
        [r.tolist() for r in rows],
        [r.astype(np.uint32) for r in rows],
        [torch.from_numpy(r) for r in rows],
        [{"input_ids": r.tolist(), "labels": 0} for r in rows],
        [{"input_ids": torch.from_numpy(r)} for r in rows],
    ]
    for kind in kinds:
        got = er.torch_collate(h)(kind)
        assert isinstance(got["input_ids"], torch.Tensor)
        assert got["input_ids"].dtype == torch.int64
        assert got["attention_mask"].dtype == torch.int64
        np.testing.assert_array_equal(got["input_ids"].numpy(), want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"].numpy(), want["attention_mask"])
        for layer, ids in got["hash_ids"].items():
            assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int32
            np.testing.assert_array_equal(ids.numpy(), want["hash_ids"][layer])
    # Equal lengths (no padding), one layer, int64.
    rows = [rng.integers(0, VOCAB, 9) for _ in range(4)]
    got = er.HashCollate(h, layer_ids=14, dtype=np.int64, return_tensors="np")(rows)
    assert list(got["hash_ids"]) == [14]
    assert got["hash_ids"][14].dtype == np.int64 and got["attention_mask"].all()
    np.testing.assert_array_equal(got["hash_ids"][14], h.hash_tokens(np.stack(rows))[14])
    # No samples, and only empty ones.
    for rows in ([], [[], np.zeros(0, np.int64)]):
        got = er.HashCollate(h, return_tensors="np")(rows)
        assert got["input_ids"].shape == (len(rows), 0)
        assert got["hash_ids"][1].shape == (len(rows), 0, h.cols)


def test_every_kernel_runs_in_a_forked_child(tmp_path) -> None:
    """A fork keeps only the forking thread: the kernels build a pool of their own in the child
    (before, a child's first parallel call waited forever for the parent's threads)."""
    out = run_isolated(
        f"""
        import os, numpy as np, engram_rs as er
        from engram_rs.bench import deepseek_v4_tokenizer_json
        comp = er.CompressedTokenizer.from_file(deepseek_v4_tokenizer_json())  # uses the pool
        h = er.NgramHasher.from_tokenizer(er.EngramConfig.preset("demo"), comp)
        ids = np.random.default_rng(0).integers(0, comp.vocab_size, 200_000)
        want = h.hash_tokens(ids)[1]
        t = er.HostTable.create({str(tmp_path / "t.safetensors")!r}, 100_000, 64)
        rows = np.random.default_rng(1).integers(0, 100_000, 300_000)
        g = t.gather(rows)
        pid = os.fork()
        if pid == 0:
            ok = np.array_equal(h.hash_tokens(ids)[1], want)
            ok &= np.array_equal(t.gather(rows), g)
            ok &= np.array_equal(t.prefetch(rows).wait(), g)
            ok &= len(er.CompressedTokenizer.from_file(deepseek_v4_tokenizer_json())) == len(comp)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print("CHILD", os.waitstatus_to_exitcode(status))
        """,
        timeout=120,
    )
    assert "CHILD 0" in out.stdout, out


def _run_loader(dataset: object, collate: object, context: str | None) -> list[dict]:
    dl = torch.utils.data.DataLoader(
        dataset,
        batch_size=3 if collate is not None else None,
        num_workers=2 if context else 0,
        multiprocessing_context=context,
        collate_fn=collate,
        timeout=120 if context else 0,
    )
    return list(dl)


def test_dataloader_workers(hashers: dict[str, er.NgramHasher], samples: list[np.ndarray]) -> None:
    h = hashers["deepseek-v4.1-flash"]
    h.hash_tokens(samples[-2])  # the kernels' pool runs here before the workers fork
    collate = er.HashCollate(h)
    want = _run_loader(samples, collate, None)
    assert len(want) == 3
    for context in ("spawn", "fork"):
        got = _run_loader(samples, collate, context)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g["input_ids"], w["input_ids"])
            assert torch.equal(g["attention_mask"], w["attention_mask"])
            for layer in h.layer_ids:
                assert torch.equal(g["hash_ids"][layer], w["hash_ids"][layer])
    # HashedTokens in forked workers: each sample once, hashed like in process.
    ds = er.HashedTokens(samples, h, batch_size=2)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    assert isinstance(pickle.loads(pickle.dumps(ds)), torch.utils.data.IterableDataset)
    want_items = {tuple(t.tolist()): ids for t, ids in ds}
    got_items = _run_loader(ds, None, "fork")
    assert len(got_items) == len(samples)
    for tokens, ids in got_items:
        ref = want_items[tuple(tokens.tolist())]
        for layer in h.layer_ids:
            np.testing.assert_array_equal(ids[layer].numpy(), ref[layer])


def test_pickle_round_trip(hashers: dict[str, er.NgramHasher], samples: list[np.ndarray]) -> None:
    for h in hashers.values():
        back = pickle.loads(pickle.dumps(h))
        assert repr(back) == repr(h) and back.vocab_size == h.vocab_size == VOCAB
        packed, cu = er.pack_sequences(samples)
        want = h.hash_tokens(packed, cu_seqlens=cu)
        got = back.hash_tokens(packed, cu_seqlens=cu)
        for layer in h.layer_ids:
            np.testing.assert_array_equal(got[layer], want[layer])
        collate = pickle.loads(pickle.dumps(er.HashCollate(h, return_tensors="np")))
        assert collate.hasher.vocab_size == VOCAB
    # A hasher of compressed ids only pickles as such.
    plain = er.NgramHasher(er.EngramConfig.preset("demo"), 1000, compressed_pad_id=2)
    back = pickle.loads(pickle.dumps(plain))
    np.testing.assert_array_equal(back.hash([1, 2, 3])[1], plain.hash([1, 2, 3])[1])
    with pytest.raises(ValueError, match="from_tokenizer"):
        back.hash_tokens([1, 2, 3])


def test_bad_inputs(hashers: dict[str, er.NgramHasher]) -> None:
    h = hashers["demo"]
    collate = er.HashCollate(h, return_tensors="np")
    ok = [1, 2, 3]
    with pytest.raises(ValueError, match=r"sample 1 has shape \(2, 3\).*1-D sequence"):
        collate([ok, [[1, 2, 3], [4, 5, 6]]])
    with pytest.raises(ValueError, match="sample 0 has shape"):
        collate([5])
    with pytest.raises(ValueError, match="sample 1 holds float64 values, not token ids"):
        collate([ok, [1.0, 2.0]])
    with pytest.raises(ValueError, match="sample 0 holds bool"):
        collate([np.array([True])])
    with pytest.raises(
        ValueError, match=r"sample 1, position 2: token id 129280 is outside .*129280"
    ):
        collate([ok, [0, 1, VOCAB, 5]])
    with pytest.raises(ValueError, match="sample 2, position 0: token id -1 is outside"):
        collate([ok, [], [-1]])
    with pytest.raises(ValueError, match=f"token id {2**64 - 1} is outside"):
        collate([np.array([3, 2**64 - 1], np.uint64)])
    with pytest.raises(ValueError, match="without an 'input_ids' key"):
        collate([{"ids": ok}])
    with pytest.raises(ValueError, match="outside"):
        list(er.HashedTokens([ok, [VOCAB + 5]], h))
    with pytest.raises(ValueError, match="from_tokenizer"):
        er.HashCollate(er.NgramHasher(er.EngramConfig.preset("demo"), 1000, compressed_pad_id=2))
    with pytest.raises(ValueError, match="return_tensors"):
        er.HashCollate(h, return_tensors="tf")
    with pytest.raises(ValueError, match="dtype must be 'int32' or 'int64'"):
        er.HashCollate(h, dtype="float32")
    with pytest.raises(ValueError, match="not Engram layers"):
        er.HashCollate(h, layer_ids=[3])
    with pytest.raises(ValueError, match="batch_size"):
        er.HashedTokens([ok], h, batch_size=0)
    with pytest.raises(TypeError, match="NgramHasher"):
        er.HashCollate("demo")  # type: ignore[arg-type]
