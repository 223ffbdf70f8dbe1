"""Checkpoints of a model with host tables: the dense parameters, the host tables, their fused
optimizers' state and step counts, and a dense torch optimizer's state, in one safetensors file
(no pickle), written atomically (a temporary file renamed into place).

Loading refuses a checkpoint of another Engram config or tokenizer, naming the mismatch, and
restores everything in place, so that resuming gives exactly the steps of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np
import torch

from ..atomic import write_atomically
from ..config import EngramConfig
from ..table import HostTable
from .optim import SparseOptimizer

__all__ = ["host_tables", "load_checkpoint", "save_checkpoint"]

FORMAT = "engram_rs.checkpoint/1"
#: Rows per chunk when a host table is streamed into or out of a checkpoint.
_CHUNK_BYTES = 64 << 20

_ST_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3": "F8_E4M3",
    "uint8": "U8",
    "int64": "I64",
    "int32": "I32",
    "bool": "BOOL",
}
_TORCH_OF = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_OF_TORCH = {v: k for k, v in _TORCH_OF.items()}


def host_tables(model: torch.nn.Module) -> dict[str, Any]:
    """The modules of ``model`` that hold a host table (``EngramEmbedding`` with ``table``), by
    their module path."""
    found = {}
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "table", None), HostTable):
            found[name or "."] = mod
    return found


def _dense_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _flatten_optimizer(opt: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], Any]:
    if opt is None:
        return {}, None
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        plain[str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"dense_optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[str(idx)][key] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


class _Entry:
    """One tensor of the file: its header entry and how to write its bytes."""

    def __init__(
        self, dtype: str, shape: list[int], nbytes: int, write: Callable[[IO[bytes]], object]
    ):
        self.dtype, self.shape, self.nbytes, self.write = dtype, shape, nbytes, write


def _tensor_entry(t: torch.Tensor) -> _Entry:
    if t.dtype not in _ST_OF_TORCH:
        raise ValueError(f"cannot checkpoint a {t.dtype} tensor")
    raw = (
        t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
    )
    return _Entry(_ST_OF_TORCH[t.dtype], list(t.shape), raw.nbytes, lambda f: f.write(raw.data))


def _table_chunks(table: HostTable) -> Iterator[tuple[int, int]]:
    per = max(1, _CHUNK_BYTES // max(1, table.nbytes // max(1, table.rows)))
    for start in range(0, table.rows, per):
        yield start, min(per, table.rows - start)


def _table_entries(key: str, table: HostTable) -> dict[str, _Entry]:
    """The tensors of a host table's stored bytes: ``key`` (values) and, for FP8, its UE8M0
    scales as ``{key}_scale``; streamed chunk by chunk when the file is written."""
    core = table._core
    rb, sb = core.row_bytes, core.scale_bytes

    def part(scales: bool) -> Callable[[IO[bytes]], None]:
        def write(f: IO[bytes]) -> None:
            for start, count in _table_chunks(table):
                f.write(core.read_raw(start, count, scales).data)

        return write

    shape = [table.rows, table.dim]
    out = {key: _Entry(_ST_DTYPES[table.dtype], shape, table.rows * rb, part(False))}
    if sb:
        out[f"{key}_scale"] = _Entry("U8", [table.rows, sb], table.rows * sb, part(True))
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    config: EngramConfig | None = None,
    tokenizer_fingerprint: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Writes ``model`` (dense state_dict, every host table with its optimizer's state and step
    count), ``optimizer`` (a dense torch optimizer, or None) and ``extra`` (JSON) to ``path``."""
    entries: dict[str, _Entry] = {}
    for k, v in _dense_state(model).items():
        entries[f"model.{k}"] = _tensor_entry(v)
    dense_opt, dense_meta = _flatten_optimizer(optimizer)
    for k, v in dense_opt.items():
        entries[k] = _tensor_entry(v)
    hosts: dict[str, Any] = {}
    for name, mod in host_tables(model).items():
        table: HostTable = mod.table
        opt: SparseOptimizer | None = mod.optimizer
        entries.update(_table_entries(f"host.{name}.weight", table))
        info: dict[str, Any] = {"dtype": table.dtype, "rows": table.rows, "dim": table.dim}
        if opt is not None:
            info["optimizer"] = {"kind": opt.kind, **opt.hyperparameters()}
            info["step"] = opt.step_count(table)
            for (sname, _), state in zip(opt.state_shapes, opt.state(table), strict=True):
                entries.update(_table_entries(f"host.{name}.{sname}", state))
        hosts[name] = info
    meta = {
        "format": FORMAT,
        "config": json.dumps(config.to_dict() if config is not None else None),
        "tokenizer_fingerprint": json.dumps(tokenizer_fingerprint),
        "host_tables": json.dumps(hosts),
        "dense_optimizer": json.dumps(dense_meta),
        "extra": json.dumps(extra),
    }
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for key, e in entries.items():
        header[key] = {
            "dtype": e.dtype,
            "shape": e.shape,
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for e in entries.values():
            e.write(f)

    write_atomically(path, write)


class _Reader:
    """A checked reader of the safetensors file a checkpoint is."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a checkpoint (shorter than a safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > self.size - 8 or n > 100 << 20:
                raise ValueError(f"{path}: not a checkpoint (header length {n})")
            try:
                self.header: dict[str, Any] = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a checkpoint (header: {e})") from None
        self.base = 8 + n
        self.meta: dict[str, str] = self.header.get("__metadata__") or {}
        if self.meta.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not an engram_rs checkpoint (format {self.meta.get('format')!r})"
            )
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")

    def json(self, key: str) -> Any:
        return json.loads(self.meta.get(key, "null"))

    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def raw(self, key: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The bytes of tensor ``key`` (a view of the mapped file) and its header entry."""
        e = self.header.get(key)
        if e is None:
            raise ValueError(f"{self.path}: the checkpoint has no tensor {key!r}")
        a, b = e["data_offsets"]
        if not (0 <= a <= b and self.base + b <= self.size) or e["dtype"] not in _TORCH_OF:
            raise ValueError(f"{self.path}: tensor {key!r} is damaged ({e})")
        return self.mm[self.base + a : self.base + b], e

    def tensor(self, key: str) -> torch.Tensor:
        raw, e = self.raw(key)
        if raw.nbytes == 0:
            return torch.empty(e["shape"], dtype=_TORCH_OF[e["dtype"]])
        return torch.from_numpy(np.array(raw)).view(_TORCH_OF[e["dtype"]]).reshape(e["shape"])


def load_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    config: EngramConfig | None = None,
    tokenizer_fingerprint: str | None = None,
) -> Any:
    """Restores what :func:`save_checkpoint` wrote into ``model`` and ``optimizer`` (in place:
    host tables are overwritten row by row) and returns its ``extra``. A checkpoint of another
    config or tokenizer, or of another model shape, is refused with the mismatch named."""
    r = _Reader(os.fspath(path))
    saved_cfg = r.json("config")
    if config is not None and saved_cfg is not None and saved_cfg != config.to_dict():
        diff = sorted(k for k in saved_cfg if saved_cfg.get(k) != config.to_dict().get(k))
        raise ValueError(
            f"{r.path} is a checkpoint of another Engram config ({', '.join(diff)} differ: "
            f"{', '.join(f'{k}={saved_cfg[k]!r} there' for k in diff)})"
        )
    saved_tok = r.json("tokenizer_fingerprint")
    if tokenizer_fingerprint is not None and saved_tok not in (None, tokenizer_fingerprint):
        raise ValueError(
            f"{r.path} is a checkpoint of another tokenizer (fingerprint {saved_tok}, this "
            f"model's tokenizer is {tokenizer_fingerprint})"
        )
    hosts_saved = r.json("host_tables") or {}
    hosts = host_tables(model)
    if sorted(hosts_saved) != sorted(hosts):
        raise ValueError(
            f"{r.path} holds host tables {sorted(hosts_saved)}, the model has {sorted(hosts)}"
        )
    dense = {k[len("model.") :]: r.tensor(k) for k in r.keys() if k.startswith("model.")}
    model.load_state_dict(dense, strict=True)
    for name, mod in hosts.items():
        _load_table(r, name, mod, hosts_saved[name])
    if optimizer is not None:
        meta = r.json("dense_optimizer")
        if meta is None:
            raise ValueError(f"{r.path} holds no dense optimizer state")
        state: dict[int, dict[str, Any]] = {}
        for idx, plain in meta["plain"].items():
            state[int(idx)] = dict(plain)
        for k in r.keys():
            if k.startswith("dense_optimizer."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = r.tensor(k)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return r.json("extra")


def _load_table(r: _Reader, name: str, mod: Any, info: dict[str, Any]) -> None:
    table: HostTable = mod.table
    got = (table.dtype, table.rows, table.dim)
    want = (info["dtype"], info["rows"], info["dim"])
    if got != want:
        raise ValueError(
            f"{r.path}: host table {name!r} is {want} (dtype, rows, dim) there, {got} here"
        )
    _copy_in(r, f"host.{name}.weight", table)
    opt: SparseOptimizer | None = mod.optimizer
    saved_opt = info.get("optimizer")
    if opt is None:
        return
    if saved_opt is None or saved_opt["kind"] != opt.kind:
        raise ValueError(
            f"{r.path}: host table {name!r} was trained with "
            f"{saved_opt and saved_opt['kind']}, the model's optimizer is {opt.kind}"
        )
    for (sname, _), state in zip(opt.state_shapes, opt.state(table), strict=True):
        _copy_in(r, f"host.{name}.{sname}", state)
    opt.set_step_count(table, int(info.get("step", 0)))


def _copy_in(r: _Reader, key: str, table: HostTable) -> None:
    """Writes a table saved by :func:`_table_entries` under ``key`` into ``table``, chunk by
    chunk (no table-sized temporary)."""
    values, e = r.raw(key)
    rb, sb = table._core.row_bytes, table._core.scale_bytes
    if e["shape"] != [table.rows, table.dim] or values.nbytes != table.rows * rb:
        raise ValueError(
            f"{r.path}: {key} is {e['shape']}, the table is [{table.rows}, {table.dim}]"
        )
    scales = r.raw(f"{key}_scale")[0] if sb else None
    for start, count in _table_chunks(table):
        idx = np.arange(start, start + count, dtype=np.int64)
        v = np.array(values[start * rb : (start + count) * rb])
        s = None if scales is None else np.array(scales[start * sb : (start + count) * sb])
        table._core.write_rows(idx, v, s)
