"""Checkpoints of a model with host tables: the dense parameters, the host tables, their fused
optimizers' state and step counts, and a dense torch optimizer's state, in one safetensors file
(no pickle). The file is read and written only through the core's safetensors reader and atomic
writer (``engram_core::safetensors``); this module decides what goes in and checks it against the
model.

Loading refuses a checkpoint of another Engram config or tokenizer, naming the mismatch, and
restores everything in place, so that resuming gives exactly the steps of an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import reprlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .. import dtypes
from .._engram_rs import SafetensorsFile, SafetensorsWriter
from ..config import EngramConfig
from ..table import HostTable
from .optim import SparseOptimizer

__all__ = ["host_tables", "load_checkpoint", "save_checkpoint"]

FORMAT = "engram_rs.checkpoint/1"
#: Rows per chunk when a host table is streamed into or out of a checkpoint.
_CHUNK_BYTES = 64 << 20

#: The torch dtype of every safetensors dtype a checkpoint may hold: the table dtypes (the
#: core's registry, ``engram_rs.dtypes``) and the other dtypes of dense parameters and buffers.
_TORCH_OF = {
    **{d.safetensors: d.torch() for d in dtypes.DTYPES.values()},
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


#: Where an entry puts its bytes, piece by piece, in order (``SafetensorsWriter.write``).
_Put = Callable[[np.ndarray], None]


class _Entry:
    """One tensor of the file: its header entry and how to write its bytes."""

    def __init__(self, dtype: str, shape: list[int], write: Callable[[_Put], None]):
        self.dtype, self.shape, self.write = dtype, shape, write


def _tensor_entry(t: torch.Tensor) -> _Entry:
    if t.dtype not in _ST_OF_TORCH:
        raise ValueError(f"cannot checkpoint a {t.dtype} tensor")
    raw = (
        t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
    )
    return _Entry(_ST_OF_TORCH[t.dtype], list(t.shape), lambda put: put(raw))


def _table_chunks(table: HostTable) -> Iterator[tuple[int, int]]:
    per = max(1, _CHUNK_BYTES // max(1, table.nbytes // max(1, table.rows)))
    for start in range(0, table.rows, per):
        yield start, min(per, table.rows - start)


def _table_entries(key: str, table: HostTable) -> dict[str, _Entry]:
    """The tensors of a host table's stored bytes: ``key`` (values) and, for FP8, its UE8M0
    scales as ``{key}_scale``; streamed chunk by chunk when the file is written."""
    sb = table.scale_bytes

    def part(scales: bool) -> Callable[[_Put], None]:
        def write(put: _Put) -> None:
            for start, count in _table_chunks(table):
                put(table.read_raw(start, count, scales).reshape(-1))

        return write

    shape = [table.rows, table.dim]
    out = {key: _Entry(dtypes.DTYPES[table.dtype].safetensors, shape, part(False))}
    if sb:
        out[f"{key}_scale"] = _Entry("U8", [table.rows, sb], part(True))
    return out


def _refuse_own_files(path: str, model: torch.nn.Module) -> None:
    """Refuses ``path`` when it is the file of one of the model's host tables or of their
    optimizer state: the rename would replace the table the checkpoint is read from."""
    if not os.path.exists(path):
        return
    for name, mod in host_tables(model).items():
        opt: SparseOptimizer | None = mod.optimizer
        owned = [(mod.table, f"host table {name!r}")]
        if opt is not None:
            what = f"the {opt.kind} optimizer state of host table {name!r}"
            owned += [(st, what) for st in opt.state_tables(mod.table)]
        for table, what in owned:
            if table.path is not None and os.path.exists(table.path):
                if os.path.samefile(path, table.path):
                    raise ValueError(
                        f"{path} is the file of {what}: save the checkpoint elsewhere (the "
                        "table would be replaced by the checkpoint)"
                    )


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
    _refuse_own_files(os.fsdecode(path), model)
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
            for (sname, _), state in zip(opt.state_shapes, opt.state_tables(table), strict=True):
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
    out = SafetensorsWriter(
        os.fsdecode(path), [(k, e.dtype, e.shape) for k, e in entries.items()], meta, "checkpoint"
    )
    try:
        for i, e in enumerate(entries.values()):
            e.write(functools.partial(out.write, i))
        out.commit()
    except BaseException:
        out.discard()
        raise


class _Reader:
    """A checkpoint's file opened through the core's checked reader (every tensor's dtype,
    shape and byte range checked: inside the file, sized by its shape, not overlapping); tensors
    are then read from the same descriptor (a file cut short later is an error, not a
    SIGBUS)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = SafetensorsFile(path, "checkpoint")
        try:
            self.meta: dict[str, str] = self.file.metadata
            fmt = self.meta.get("format")
            if fmt != FORMAT:
                raise ValueError(f"{path}: not an engram_rs checkpoint (format {_short(fmt)})")
            self.entries: dict[str, _Stored] = {}
            for i, (key, dt, shape, begin, end) in enumerate(self.file.tensors):
                if dt not in _TORCH_OF:
                    holds = ", ".join(_TORCH_OF)
                    raise ValueError(f"{path}: tensor {key!r} has dtype {dt!r}, not one of {holds}")
                self.entries[key] = _Stored(i, key, dt, shape, begin, end)
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def json(self, key: str) -> Any:
        return _loads(
            self.meta.get(key, "null").encode(),
            "",
            lambda w: ValueError(f"{self.path}: __metadata__[{key!r}] is not valid JSON ({w})"),
        )

    def get(self, key: str, what: str) -> _Stored:
        e = self.entries.get(key)
        if e is None:
            raise ValueError(f"{self.path}: the checkpoint has no tensor {key!r} ({what})")
        return e

    def read(self, e: _Stored, start: int = 0, n: int | None = None) -> np.ndarray:
        n = e.end - e.begin - start if n is None else n
        return self.file.read(e.index, start, n)

    def tensor(self, e: _Stored) -> torch.Tensor:
        raw = self.read(e)
        if e.dtype == "BOOL" and raw.size and int(raw.max()) > 1:
            raise ValueError(
                f"{self.path}: tensor {e.key!r} is BOOL and holds bytes other than 0 and 1: the "
                "file is damaged"
            )
        if not raw.size:
            return torch.empty(e.shape, dtype=_TORCH_OF[e.dtype])
        return torch.from_numpy(raw).view(_TORCH_OF[e.dtype]).reshape(e.shape)


class _Stored:
    """One tensor's checked header entry: its index in the file and its bytes' range."""

    def __init__(
        self, index: int, key: str, dtype: str, shape: list[int], begin: int, end: int
    ) -> None:
        self.index, self.key, self.dtype, self.shape = index, key, dtype, shape
        self.begin, self.end = begin, end


def _finite(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    names: dict[type, str] = {dict: "object", list: "list", str: "str"}
    return names.get(type(v), type(v).__name__)


def _short(v: Any) -> str:
    return reprlib.repr(v)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _loads(raw: bytes | bytearray, what: str, bad: Callable[[str], ValueError]) -> Any:
    """``json.loads`` of untrusted bytes: every failure (bad UTF-8 or JSON, a repeated key, a
    nesting deeper than the interpreter's recursion limit) is ``bad(message)``."""
    try:
        return json.loads(bytes(raw), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise bad(f"{what + ' is ' if what else ''}nested too deeply".strip()) from None
    except _Duplicate as e:
        raise bad(f"{what or 'it'} repeats the key {_short(e.args[0])}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise bad(f"{what.replace('the ', '') if what else 'JSON'}: {_short(str(e))}") from None


def _check_json_table(r: _Reader, key: str) -> dict[str, Any]:
    v = r.json(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{r.path}: __metadata__[{key!r}] is a {_kind(v)}, not an object")
    return v


class _HostPlan:
    """What loading one host table writes, all checked."""

    def __init__(self, name: str, mod: Any) -> None:
        self.name, self.mod = name, mod
        self.copies: list[tuple[_Stored, _Stored | None, HostTable | None]] = []
        self.step: int | None = None


def _expect(r: _Reader, key: str, dtype: str, shape: list[int], what: str, needs: str) -> _Stored:
    e = r.get(key, what)
    if e.dtype != dtype or e.shape != shape:
        raise ValueError(
            f"{r.path}: tensor {key!r} is {e.dtype} {e.shape}, {needs} needs {dtype} {shape}"
        )
    return e


def _plan_host(r: _Reader, name: str, mod: Any, info: Any, claimed: set[str]) -> _HostPlan:
    plan = _HostPlan(name, mod)
    table: HostTable = mod.table
    if not isinstance(info, dict):
        raise ValueError(
            f"{r.path}: host table {name!r}: its entry in __metadata__['host_tables'] is a "
            f"{_kind(info)}, not an object"
        )
    if table.closed:
        raise ValueError(f"host table {name!r} of the model is closed: reopen it first")
    got = (table.dtype, [table.rows, table.dim])
    want = (info.get("dtype"), [info.get("rows"), info.get("dim")])
    if got != want:
        there = f"{want[0]} {_short(want[1])}" if isinstance(want[0], str) else _short(info)
        raise ValueError(f"{r.path}: host table {name!r} is {there} there, {got[0]} {got[1]} here")
    if not table.writable:
        raise ValueError(
            f"host table {name!r} ({table.path or 'in memory'}) is read-only: open it with "
            "HostTable.open(path, writable=True) to load a checkpoint into it"
        )
    needs = f"host table {name!r} ({table.dtype})"
    shape = [table.rows, table.dim]
    wkey = f"host.{name}.weight"
    weight = _expect(
        r,
        wkey,
        dtypes.DTYPES[table.dtype].safetensors,
        shape,
        f"the rows of host table {name!r}",
        needs,
    )
    claimed.add(wkey)
    scale = None
    sb = table.scale_bytes
    if sb:
        scale = _expect(
            r,
            f"{wkey}_scale",
            "U8",
            [table.rows, sb],
            f"the UE8M0 scales of host table {name!r}",
            needs,
        )
        claimed.add(scale.key)
    plan.copies.append((weight, scale, None))
    opt: SparseOptimizer | None = mod.optimizer
    saved = info.get("optimizer")
    if opt is None:  # the saved optimizer state is not used
        claimed.update(k for k in r.entries if k.startswith(f"host.{name}."))
        return plan
    if saved is None:
        raise ValueError(
            f"{r.path}: host table {name!r} was saved without its optimizer state, the model's "
            f"optimizer is {opt.kind}: load it into a model without a fused optimizer, or "
            "start from another checkpoint"
        )
    if not isinstance(saved, dict):
        raise ValueError(f"{r.path}: host table {name!r}: its optimizer entry is {_short(saved)}")
    if saved.get("kind") != opt.kind:
        kind = saved.get("kind")
        there = kind if isinstance(kind, str) else _short(kind)
        raise ValueError(
            f"{r.path}: host table {name!r} was trained with {there}, the model's optimizer "
            f"is {opt.kind}"
        )
    hp = sorted(k for k in saved if k != "kind")
    mine = sorted(opt.hyperparameters())
    if hp != mine:
        raise ValueError(
            f"{r.path}: host table {name!r} was trained with {opt.kind} ({', '.join(hp)}), the "
            f"model's optimizer has {', '.join(mine)}"
        )
    for k in hp:
        v = saved[k]
        if not (v is None or isinstance(v, (str, bool, int)) or _finite(v)):
            raise ValueError(
                f"{r.path}: host table {name!r}: optimizer hyper-parameter {k} is {_short(v)}"
            )
    step = info.get("step", 0)
    if not _is_int(step) or step < 0 or step >= 1 << 63:
        raise ValueError(
            f"{r.path}: host table {name!r}: step must be a non-negative int, got {_short(step)}"
        )
    plan.step = step
    what = f"the {opt.kind} optimizer state of host table {name!r}"
    for sname, width in opt.state_shapes:
        key = f"host.{name}.{sname}"
        e = _expect(r, key, "F32", [table.rows, table.dim if width is None else width], what, what)
        claimed.add(key)
        plan.copies.append((e, None, None))
    return plan


def _plan_dense_optimizer(
    r: _Reader, optimizer: torch.optim.Optimizer, claimed: set[str]
) -> dict[str, Any]:
    meta = r.json("dense_optimizer")
    if meta is None:
        raise ValueError(f"{r.path} holds no dense optimizer state")
    p = f"{r.path}: dense optimizer state"
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    plain = meta.get("plain") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not isinstance(plain, dict):
        raise ValueError(f"{p} is damaged ({_short(meta)})")
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{p}: the checkpoint has {len(groups)} parameter groups, the optimizer "
            f"{len(optimizer.param_groups)}"
        )
    ids: set[int] = set()
    for i, (g, mine) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        params = g.get("params") if isinstance(g, dict) else None
        if not isinstance(params, list) or not all(_is_int(x) for x in params):
            raise ValueError(f"{p}: group {i} is damaged ({_short(g)})")
        if len(params) != len(mine["params"]):
            raise ValueError(
                f"{p}: group {i} has {len(params)} parameters there, {len(mine['params'])} in "
                "the optimizer"
            )
        ids.update(params)
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in plain.items():
        if not idx.isdigit() or int(idx) not in ids or not isinstance(entry, dict):
            raise ValueError(f"{p}: the state of parameter {_short(idx)} is damaged")
        state[int(idx)] = dict(entry)
    for k, e in r.entries.items():
        if k.startswith("dense_optimizer."):
            parts = k.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) not in ids:
                raise ValueError(f"{p}: tensor {k!r} names no parameter of the saved groups")
            state.setdefault(int(parts[1]), {})[parts[2]] = r.tensor(e)
            claimed.add(k)
    return {"state": state, "param_groups": groups}


def load_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    config: EngramConfig | None = None,
    tokenizer_fingerprint: str | None = None,
) -> Any:
    """Restores what :func:`save_checkpoint` wrote into ``model`` and ``optimizer`` (in place:
    host tables are overwritten row by row) and returns its ``extra``.

    The whole file is checked before anything is written: its header (bounds, types, every
    tensor's dtype, shape and byte range, inside the file and not overlapping), the config and
    tokenizer, the host tables (dtype, shape, writable), their optimizers (kind, hyper-parameter
    names, step counts, state tensors) and the dense state against the model and ``optimizer``.
    A refused checkpoint (a ``ValueError`` naming the file, the tensor and the mismatch) leaves
    the model, its tables and files and ``optimizer`` exactly as they were. Only an I/O error
    while the tables are copied (the file cut short by another process, say) can stop a load
    midway; it says which table is partly overwritten.
    """
    r = _Reader(os.fsdecode(path))
    try:
        return _load(r, model, optimizer, config, tokenizer_fingerprint)
    finally:
        r.close()


def _load(
    r: _Reader,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: EngramConfig | None,
    tokenizer_fingerprint: str | None,
) -> Any:
    # ---- check everything ----
    saved_cfg = r.json("config")
    if config is not None and saved_cfg is not None and saved_cfg != config.to_dict():
        mine = config.to_dict()
        if not isinstance(saved_cfg, dict):
            raise ValueError(f"{r.path}: __metadata__['config'] is {_short(saved_cfg)}")
        diff = sorted(k for k in set(saved_cfg) | set(mine) if saved_cfg.get(k) != mine.get(k))
        raise ValueError(
            f"{r.path} is a checkpoint of another Engram config ({', '.join(diff)} differ: "
            f"{', '.join(f'{k}={_short(saved_cfg.get(k))} there' for k in diff)})"
        )
    saved_tok = r.json("tokenizer_fingerprint")
    if tokenizer_fingerprint is not None and saved_tok not in (None, tokenizer_fingerprint):
        raise ValueError(
            f"{r.path} is a checkpoint of another tokenizer (fingerprint {_short(saved_tok)}, "
            f"this model's tokenizer is {tokenizer_fingerprint})"
        )
    extra = r.json("extra")
    hosts_saved = _check_json_table(r, "host_tables")
    hosts = host_tables(model)
    if sorted(hosts_saved) != sorted(hosts):
        raise ValueError(
            f"{r.path} holds host tables {sorted(hosts_saved)}, the model has {sorted(hosts)}"
        )
    claimed: set[str] = set()
    plans = [_plan_host(r, n, mod, hosts_saved[n], claimed) for n, mod in hosts.items()]
    dense_entries = {k[len("model.") :]: e for k, e in r.entries.items() if k.startswith("model.")}
    claimed.update(f"model.{k}" for k in dense_entries)
    if optimizer is None:
        claimed.update(k for k in r.entries if k.startswith("dense_optimizer."))
    for k in r.entries:
        if k not in claimed and not k.startswith("dense_optimizer."):
            raise ValueError(
                f"{r.path}: tensor {k!r} is not part of an engram_rs checkpoint (a damaged or "
                "crafted file)"
            )
    mine_sd = model.state_dict()
    lacks = sorted(set(mine_sd) - set(dense_entries))
    if lacks:
        raise ValueError(
            f"{r.path}: the model's state has {', '.join(lacks)} that the checkpoint lacks"
        )
    more = sorted(set(dense_entries) - set(mine_sd))
    if more:
        raise ValueError(
            f"{r.path}: the checkpoint has dense tensors {', '.join(more)} that the model lacks"
        )
    for k, e in dense_entries.items():
        if list(mine_sd[k].shape) != e.shape:
            raise ValueError(
                f"{r.path}: dense tensor {k!r} is {e.shape} there, {list(mine_sd[k].shape)} in "
                "the model"
            )
    dense = {k: r.tensor(e) for k, e in dense_entries.items()}
    opt_sd = None if optimizer is None else _plan_dense_optimizer(r, optimizer, claimed)
    for plan in plans:  # the state tables last: made beside the table on first use
        opt: SparseOptimizer | None = plan.mod.optimizer
        if opt is None or plan.step is None:
            continue
        states = opt.state_tables(plan.mod.table)
        for (stored, _, _), st in zip(plan.copies[1:], states, strict=True):
            if not st.writable or [st.rows, st.dim] != stored.shape or st.dtype != "float32":
                raise ValueError(
                    f"the {opt.kind} optimizer state of host table {plan.name!r} is "
                    f"{st.dtype} [{st.rows}, {st.dim}]{'' if st.writable else ' read-only'}, "
                    f"the checkpoint's is float32 {stored.shape}"
                )
        plan.copies[1:] = [(c[0], None, st) for c, st in zip(plan.copies[1:], states, strict=True)]

    # ---- write: the dense optimizer (torch checks it, atomically), the module, the tables ----
    before = None
    if optimizer is not None and opt_sd is not None:
        before = optimizer.state_dict()
        optimizer.load_state_dict(opt_sd)
    try:
        model.load_state_dict(dense, strict=True)
    except BaseException:
        if before is not None and optimizer is not None:
            optimizer.load_state_dict(before)
        raise
    for plan in plans:
        try:
            for values, scales, target in plan.copies:
                _copy_in(r, values, scales, plan.mod.table if target is None else target)
        except OSError as e:
            raise OSError(
                e.errno,
                f"{r.path}: loading stopped while host table {plan.name!r} was written ({e}): "
                "it is partly overwritten and the dense state is the checkpoint's; load a "
                "checkpoint again before training",
            ) from e
    for plan in plans:
        if plan.step is not None and plan.mod.optimizer is not None:
            plan.mod.optimizer.set_step_count(plan.mod.table, plan.step)
    return extra


def _copy_in(r: _Reader, values: _Stored, scales: _Stored | None, table: HostTable) -> None:
    """Writes the checked tensors ``values`` (and FP8 ``scales``) into ``table``, chunk by chunk
    (no table-sized temporary)."""
    rb, sb = table.row_bytes, table.scale_bytes
    for start, count in _table_chunks(table):
        idx = np.arange(start, start + count, dtype=np.int64)
        v = r.read(values, start * rb, count * rb)
        s = None
        if scales is not None:
            s = r.read(scales, start * sb, count * sb)
        table.write_raw(idx, v, s)
