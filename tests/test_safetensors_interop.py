"""The core's one safetensors reader and writer against the `safetensors` package (PyPI):
checkpoints and tables it writes are read by `safetensors`, and files `safetensors` writes are
read by the core (a checkpoint re-written by `safetensors` loads again); the one atomic write and
its temporary names."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")
safetensors = pytest.importorskip("safetensors")

import engram_rs as er  # noqa: E402
from engram_rs._engram_rs import AtomicFile, SafetensorsFile, SafetensorsWriter  # noqa: E402
from engram_rs.atomic import write_atomically  # noqa: E402
from engram_rs.torch import SparseAdam  # noqa: E402
from engram_rs.torch.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


class Holder(torch.nn.Module):
    def __init__(self, table: er.HostTable, optimizer: SparseAdam | None) -> None:
        super().__init__()
        self.table, self.optimizer = table, optimizer
        self.lin = torch.nn.Linear(8, 4)
        self.register_buffer("mask", torch.tensor([True, False, True]))


def _model(tmp_path, name: str, dtype: str, seed: int) -> Holder:
    path = tmp_path / f"{name}.safetensors"
    er.HostTable.create(path, 64, 32, dtype=dtype, seed=seed).close()
    table = er.HostTable.open(path, writable=True)
    torch.manual_seed(seed)
    m = Holder(table, SparseAdam(lr=0.01))
    assert m.optimizer is not None
    for i, s in enumerate(m.optimizer.state(table)):
        s.write_rows(np.arange(64), np.full((64, s.dim), seed + i + 1, np.float32))
    m.optimizer.set_step_count(table, 5 + seed)
    return m


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3"])
def test_a_checkpoint_is_read_by_safetensors_and_loads_again_once_rewritten(
    tmp_path, dtype: str
) -> None:
    src = _model(tmp_path, "src", dtype, seed=1)
    ck = tmp_path / "ck.safetensors"
    save_checkpoint(ck, src, extra={"step": 3})

    with safetensors.safe_open(str(ck), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "engram_rs.checkpoint/1"
    for k, v in src.state_dict().items():
        assert torch.equal(tensors[f"model.{k}"], v), k
    raw = src.table.read_raw(0, 64)
    assert tensors["host...weight"].reshape(-1).view(torch.uint8).numpy().tobytes() == raw.tobytes()
    if dtype == "float8_e4m3":
        scales = src.table.read_raw(0, 64, True).tobytes()
        assert tensors["host...weight_scale"].numpy().tobytes() == scales

    # Re-written by safetensors (its own header layout, order and padding), it loads the same.
    again = tmp_path / "again.safetensors"
    st_torch.save_file(tensors, str(again), metadata=meta)
    assert again.read_bytes() != ck.read_bytes()
    v = _model(tmp_path, "v", dtype, seed=2)
    assert load_checkpoint(again, v) == {"step": 3}
    assert v.table.read_raw(0, 64).tobytes() == raw.tobytes()
    assert v.optimizer is not None and src.optimizer is not None
    assert v.optimizer.step_count(v.table) == 6
    for a, b in zip(v.optimizer.state(v.table), src.optimizer.state(src.table), strict=True):
        assert a.read_raw(0, 64).tobytes() == b.read_raw(0, 64).tobytes()
    for k, t in src.state_dict().items():
        assert torch.equal(v.state_dict()[k], t), k


# The safetensors dtypes torch holds, with their torch dtypes.
TORCH_OF = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, dt) in enumerate(TORCH_OF.items()):
        shape = [int(d) for d in torch.randint(0, 4, (i % 3,), generator=g)]
        raw = torch.randint(0, 2 if name == "BOOL" else 256, [*shape, dt.itemsize], generator=g)
        out[f"t.{name}"] = raw.to(torch.uint8).view(dt).reshape(shape)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_core_writer_and_safetensors_read_each_others_files(tmp_path, seed: int) -> None:
    tensors = _tensors(seed)
    meta = {"a": "1", "b": "two"}
    mine = tmp_path / "mine.safetensors"
    w = SafetensorsWriter(
        mine, [(k, k[2:], list(t.shape)) for k, t in tensors.items()], meta, "test file"
    )
    for i, t in enumerate(tensors.values()):
        w.write(i, t.reshape(-1).view(torch.uint8).numpy())
    w.commit()
    got = st_torch.load_file(str(mine))
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert (got[k].dtype, got[k].shape) == (t.dtype, t.shape), k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    with safetensors.safe_open(str(mine), framework="pt") as f:
        assert f.metadata() == meta

    theirs = tmp_path / "theirs.safetensors"
    st_torch.save_file(tensors, str(theirs), metadata=meta)
    r = SafetensorsFile(theirs)
    assert r.metadata == meta
    seen = set()
    for i, (name, dtype, shape, start, end) in enumerate(r.tensors):
        t = tensors[name]
        assert (dtype, shape) == (name[2:], list(t.shape))
        raw = r.read(i, 0, end - start)
        assert raw.tobytes() == t.reshape(-1).view(torch.uint8).numpy().tobytes()
        seen.add(name)
    r.close()
    assert seen == tensors.keys()


def test_a_refused_or_abandoned_write_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "f.safetensors"
    w = SafetensorsWriter(target, [("x", "F32", [2])], {}, "test file")
    with pytest.raises(ValueError, match=r"tensor 'x' got 0 of its 8 bytes: write every tensor"):
        w.commit()
    w = SafetensorsWriter(target, [("x", "F32", [2])], {}, "test file")
    w.discard()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r"this safetensors writer is closed"):
        w.write(0, np.zeros(8, np.uint8))
    with pytest.raises(FileNotFoundError, match=r"does not exist: create it first"):
        SafetensorsWriter(tmp_path / "no" / "f", [], {}, "test file")


def test_one_temporary_name_scheme_for_every_atomic_write(tmp_path) -> None:
    """The core's names, which JobDir.remove_temporaries and the kill tests look for."""
    for name in ("state.json", "manifest.json", "ck.safetensors"):
        out = AtomicFile(tmp_path / name)
        tmp = os.path.basename(out.path)
        assert tmp.startswith(f".{name}.") and tmp.endswith(".tmp"), tmp
        assert len(tmp) == len(name) + 18 and int(tmp[len(name) + 2 : -4], 16) >= 0, tmp
        out.discard()
    assert os.listdir(tmp_path) == []

    def fail(f: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "x.json", fail)
    assert os.listdir(tmp_path) == []
    write_atomically(tmp_path / "x.json", lambda f: f.write(b"{}"))
    assert os.listdir(tmp_path) == ["x.json"] and (tmp_path / "x.json").read_bytes() == b"{}"
