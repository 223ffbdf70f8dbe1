"""DeepSeek-V4.1-Flash checkpoints (SPEC 8.1): open a checkpoint directory's Engram layers, and
write trained ones back in the checkpoint's own layout.

:func:`open_checkpoint` reads ``config.json`` (:meth:`~engram_rs.EngramConfig.from_hf`), the
tokenizer (``tokenizer.json`` beside it, or a given one) and ``model.safetensors.index.json``
(or one ``model.safetensors``), and builds the hasher and one :class:`~.v41.EngramV41` per Engram
layer. Each layer's table opens zero-copy as a :class:`~engram_rs.HostTable` over its tensor
inside its shard (``layers.L.engram.embed.weight`` with ``.scale``; the shard holds other
tensors, nothing is copied); the dense tensors (``wkv.weight``, ``wkv.scale``, ``q_weight``,
``k_weight``) load into the module. Every tensor is checked (present, its dtype, its shape)
before a module is made, and a shard the index names outside the directory is refused.

:func:`save_checkpoint` writes the layers' tensors back under the same names, dtypes and shapes
(``wkv`` re-quantized from a trained bf16 weight; the table's FP8 rows and scales as stored),
one shard per layer plus ``model.safetensors.index.json``, each file written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from .. import _engram_rs, dtypes
from ..atomic import write_atomically
from ..compress import CompressedTokenizer
from ..config import EngramConfig, hf_engram_fields, read_hf_config
from ..hashing import NgramHasher
from ..table import HostTable
from .optim import SparseOptimizer
from .v41 import BLOCK, EngramV41, quantize_blocks

__all__ = [
    "INDEX",
    "V41Checkpoint",
    "open_checkpoint",
    "save_checkpoint",
    "write_tiny_checkpoint",
]

#: The index of a sharded checkpoint.
INDEX = "model.safetensors.index.json"
#: Rows of a table copied per write when saving.
_CHUNK_ROWS = 1 << 16
#: safetensors dtype -> torch dtype of a checkpoint's tensors: the table dtypes of the core's
#: registry, and the UE8M0 scales.
_TORCH = {d.safetensors: d.torch() for d in dtypes.DTYPES.values()} | {
    "F8_E8M0": torch.float8_e8m0fnu
}
_SAFETENSORS = {v: k for k, v in _TORCH.items()}


@dataclasses.dataclass
class V41Checkpoint:
    """An opened checkpoint: its config, tokenizer, hasher and Engram layers by layer id."""

    path: str
    config: EngramConfig
    tokenizer: CompressedTokenizer
    hasher: NgramHasher
    layers: dict[int, EngramV41]
    tokenizer_path: str


def _prefix(layer: int) -> str:
    return f"layers.{layer}.engram."


def _shards(root: str) -> dict[str, str]:
    """Tensor name -> the path of its shard, inside ``root`` (links resolved)."""
    index = os.path.join(root, INDEX)
    if not os.path.exists(index):
        single = os.path.join(root, "model.safetensors")
        if not os.path.isfile(single):
            raise FileNotFoundError(
                f"{root} holds neither {INDEX} nor model.safetensors: is it a checkpoint directory?"
            )
        f = _engram_rs.SafetensorsFile(single, "checkpoint shard")
        f.close()
        return {t[0]: single for t in f.tensors}
    try:
        with open(index, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index} is not a JSON index: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map object (tensor name -> shard file)")
    real_root = os.path.realpath(root)
    out = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index}: tensor {name!r} names the shard {shard!r}")
        path = os.path.realpath(os.path.join(real_root, shard))
        if os.path.isabs(shard) or os.path.commonpath([real_root, path]) != real_root:
            raise ValueError(
                f"{index}: tensor {name!r} names the shard {shard!r}, outside the checkpoint "
                f"directory {root}: refused (shards must be files of the directory)"
            )
        out[name] = path
    return out


class _Shard:
    """The tensors of one shard, by name: (dtype, shape, index)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = _engram_rs.SafetensorsFile(path, "checkpoint shard")
        self.tensors = {t[0]: (t[1], list(t[2]), i) for i, t in enumerate(self.file.tensors)}

    def expect(self, name: str, dtype: str, shape: list[int], what: str) -> int:
        found = self.tensors.get(name)
        if found is None:
            raise ValueError(f"{self.path}: no tensor {name!r} ({what})")
        if found[0] != dtype or found[1] != shape:
            raise ValueError(
                f"{self.path}: tensor {name!r} ({what}) is {found[0]} {found[1]}, expected "
                f"{dtype} {shape}"
            )
        return found[2]

    def tensor(self, name: str, dtype: str, shape: list[int], what: str) -> torch.Tensor:
        i = self.expect(name, dtype, shape, what)
        n = int(np.prod(shape)) * _TORCH[dtype].itemsize
        raw = self.file.read(i, 0, n)
        return torch.from_numpy(np.array(raw, dtype=np.uint8)).view(_TORCH[dtype]).reshape(shape)


def open_checkpoint(
    path: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    mode: Literal["mmap", "resident"] = "mmap",
    writable: bool = False,
    optimizer: SparseOptimizer | None = None,
    wkv_mode: Literal["fp8", "bf16"] = "bf16",
    compute_dtype: torch.dtype = torch.bfloat16,
) -> V41Checkpoint:
    """Opens the Engram layers of the DeepSeek-V4.1-Flash checkpoint directory ``path``.

    ``tokenizer``: the model's ``tokenizer.json`` (default: the one in ``path``). ``mode``,
    ``writable``: how the tables open (``writable=True`` trains them in the shard files in
    place: copy the checkpoint first). ``optimizer`` trains the tables in backward;
    ``wkv_mode``, ``compute_dtype``: as :class:`~.v41.EngramV41`.
    """
    root = os.fspath(path)
    data = read_hf_config(root)  # read once: the config and the fields it is made from
    cfg = EngramConfig.from_hf(data)
    hf = hf_engram_fields(data)
    tok = os.fspath(tokenizer) if tokenizer is not None else os.path.join(root, "tokenizer.json")
    if not os.path.isfile(tok):
        raise FileNotFoundError(f"no tokenizer {tok}: pass tokenizer= (the model's tokenizer.json)")
    comp = CompressedTokenizer.from_file(tok)
    want_c = hf.get("engram_compressed_vocab_size")
    if want_c is not None and want_c != len(comp):
        raise ValueError(
            f"{root}: engram_compressed_vocab_size is {want_c} but {tok} compresses to "
            f"{len(comp)} ids: the tokenizer is not this model's"
        )
    hasher = NgramHasher.from_tokenizer(cfg, comp)
    shards = _shards(root)
    g, d, cols, dim = cfg.hc_mult, cfg.hidden_size, cfg.cols, cfg.head_dim
    opened: dict[str, _Shard] = {}

    def shard_of(name: str) -> _Shard:
        if name not in shards:
            raise ValueError(f"{root}: the checkpoint has no tensor {name!r}")
        p = shards[name]
        if p not in opened:
            opened[p] = _Shard(p)
        return opened[p]

    plans = []
    for layer in cfg.layer_ids:  # every tensor checked before a module is made
        pre = _prefix(layer)
        rows = hasher.table_rows[layer]
        emb = shard_of(pre + "embed.weight")
        emb.expect(pre + "embed.weight", "F8_E4M3", [rows, dim], f"layer {layer}'s table")
        scale_shard = shard_of(pre + "embed.scale")
        if scale_shard is not emb:
            raise ValueError(
                f"{root}: layer {layer}'s table and its scales are in different shards "
                f"({emb.path}, {scale_shard.path}): a table opens over one file"
            )
        emb.expect(pre + "embed.scale", "F8_E8M0", [rows, dim // BLOCK], f"layer {layer}'s scales")
        wkv_shape = [d * (g + 1), cols * dim]
        dense = {
            "wkv.weight": shard_of(pre + "wkv.weight").tensor(
                pre + "wkv.weight", "F8_E4M3", wkv_shape, "wkv"
            ),
            "wkv.scale": shard_of(pre + "wkv.scale").tensor(
                pre + "wkv.scale", "F8_E8M0", [s // BLOCK for s in wkv_shape], "wkv's scales"
            ),
            "q_weight": shard_of(pre + "q_weight").tensor(pre + "q_weight", "BF16", [g, d], "q"),
            "k_weight": shard_of(pre + "k_weight").tensor(pre + "k_weight", "BF16", [g, d], "k"),
        }
        plans.append((layer, emb.path, dense))
    for s in opened.values():
        s.file.close()
    layers = {}
    for layer, shard_path, dense in plans:
        pre = _prefix(layer)
        table = HostTable.open(
            shard_path,
            name=pre + "embed.weight",
            scales=pre + "embed.scale",
            mode=mode,
            writable=writable,
        )
        module = EngramV41(
            hasher,
            layer,
            table=table,
            optimizer=optimizer,
            wkv=(dense["wkv.weight"], dense["wkv.scale"]),
            wkv_mode=wkv_mode,
            compute_dtype=compute_dtype,
        )
        with torch.no_grad():
            module.q_weight.copy_(dense["q_weight"])
            module.k_weight.copy_(dense["k_weight"])
        layers[layer] = module
    return V41Checkpoint(root, cfg, comp, hasher, layers, tok)


def save_checkpoint(out: str | os.PathLike[str], checkpoint: V41Checkpoint) -> list[str]:
    """Writes the Engram layers of ``checkpoint`` (modules over FP8 HostTables, trained or not)
    to the directory ``out`` in the checkpoint's names, dtypes and shapes: one shard
    ``model-engram-L<id>.safetensors`` per layer, ``model.safetensors.index.json``, and the
    source's ``config.json`` and tokenizer, so that :func:`open_checkpoint` opens ``out``
    (and an engine reads its Engram tensors as the original's). Each file is written
    atomically. Returns the shard paths."""
    root = os.fspath(out)
    if os.path.realpath(root) == os.path.realpath(checkpoint.path):
        raise ValueError(
            f"{root} is the checkpoint's own directory: save to another one (its tables are "
            "the shards being read)"
        )
    os.makedirs(root, exist_ok=True)
    layers = checkpoint.layers
    weight_map: dict[str, str] = {}
    written = []
    for layer, module in sorted(layers.items()):
        table = module.embed.table
        if table is None or table.dtype != "float8_e4m3":
            raise ValueError(
                f"layer {layer}: save_checkpoint writes FP8 host tables (the checkpoint's "
                f"layout); this one is {'a parameter' if table is None else table.dtype}"
            )
        pre = _prefix(layer)
        dense = module.checkpoint_tensors(pre)
        rows, dim = table.rows, table.dim
        entries = [
            (pre + "embed.weight", "F8_E4M3", [rows, dim]),
            (pre + "embed.scale", "F8_E8M0", [rows, dim // BLOCK]),
        ] + [(name, _SAFETENSORS[t.dtype], list(t.shape)) for name, t in sorted(dense.items())]
        name = f"model-engram-L{layer}.safetensors"
        path = os.path.join(root, name)
        table.flush()

        def pieces(
            table: HostTable = table,
            entries: list[Any] = entries,
            dense: dict[str, torch.Tensor] = dense,
        ) -> Iterator[Any]:
            for scales in (False, True):  # the rows, then their scales, a chunk at a time
                for start in range(0, table.rows, _CHUNK_ROWS):
                    n = min(_CHUNK_ROWS, table.rows - start)
                    yield int(scales), table.read_raw(start, n, scales=scales)
            for i, (tname, _, _) in enumerate(entries[2:], start=2):
                yield i, _tensor_bytes(dense[tname])

        _write_shard(path, entries, pieces())
        weight_map.update(dict.fromkeys((e[0] for e in entries), name))
        written.append(path)
    _write_index(root, weight_map)
    for name, src in (
        ("config.json", os.path.join(checkpoint.path, "config.json")),
        ("tokenizer.json", checkpoint.tokenizer_path),
    ):
        _copy_atomically(src, os.path.join(root, name))
    return written


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as stored (uint8, C order)."""
    return np.ascontiguousarray(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def _write_shard(path: str, entries: list[Any], pieces: Iterable[tuple[int, np.ndarray]]) -> None:
    """A shard of ``entries`` (name, dtype, shape) written atomically from ``pieces`` (tensor
    index, bytes), in order: nothing is left behind by a failure."""
    writer = _engram_rs.SafetensorsWriter(path, entries, {"format": "pt"}, "checkpoint shard")
    try:
        for i, data in pieces:
            writer.write(i, data)
        writer.commit()
    except BaseException:
        writer.discard()
        raise


def _write_index(root: str, weight_map: dict[str, str]) -> None:
    index = json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2).encode()
    write_atomically(os.path.join(root, INDEX), lambda f: f.write(index))


def _copy_atomically(src: str, dst: str) -> None:
    with open(src, "rb") as fh:
        data = fh.read()
    write_atomically(dst, lambda f: f.write(data))


def write_tiny_checkpoint(
    out: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str],
    *,
    layers: tuple[int, ...] = (1, 3),
    hidden: int = 64,
    hc_mult: int = 4,
    heads: int = 2,
    head_dim: int = 32,
    vocab: int = 1009,
    seed: int = 0,
) -> str:
    """A small DeepSeek-V4.1-Flash checkpoint in the real layout, for demos and tests: its
    ``config.json`` (the engram fields under ``text_config``, ``engram_num_embeddings`` the sums
    of the primes), ``tokenizer`` copied as ``tokenizer.json``, and shards with the real names
    and dtypes (F8_E4M3 tables with F8_E8M0 scales per 32, an FP8 ``wkv`` with 32x32 block
    scales, bf16 ``q_weight``/``k_weight``; each layer's table in its own shard beside another
    tensor, the dense tensors in a last shard) listed in ``model.safetensors.index.json``.
    Random values (``seed``). Returns the directory."""
    root = os.fspath(out)
    os.makedirs(root, exist_ok=True)
    comp = CompressedTokenizer.from_file(tokenizer)
    fields: dict[str, Any] = {
        "engram_layer_ids": list(layers),
        "engram_max_ngram_size": 4,
        "engram_vocab_size": vocab,
        "engram_n_heads": heads,
        "engram_head_dim": head_dim,
        "engram_pad_token_id": 2,
        "engram_compressed_vocab_size": len(comp),
        "hidden_size": hidden,
        "hc_mult": hc_mult,
        "rms_norm_eps": 1e-20,
    }
    cfg = EngramConfig.from_hf(fields)
    rows = NgramHasher(cfg, len(comp), compressed_pad_id=0).table_rows
    fields["engram_num_embeddings"] = [rows[x] for x in layers]
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    last = f"model-{len(layers) + 1:05d}-of-{len(layers) + 1:05d}.safetensors"
    for i, layer in enumerate(layers):
        pre = _prefix(layer)
        codes, scale = quantize_blocks(
            torch.randn(rows[layer], head_dim, generator=gen) * 0.05, (1, BLOCK)
        )
        name = f"model-{i + 1:05d}-of-{len(layers) + 1:05d}.safetensors"
        shards[name] = {
            pre + "embed.weight": codes,
            pre + "embed.scale": scale,
            f"layers.{layer}.attn_norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }
        w = torch.randn(hidden * (hc_mult + 1), cfg.cols * head_dim, generator=gen) * 0.05
        wkv, wkv_scale = quantize_blocks(w)
        shards.setdefault(last, {}).update(
            {
                pre + "wkv.weight": wkv,
                pre + "wkv.scale": wkv_scale,
                pre + "q_weight": torch.randn(hc_mult, hidden, generator=gen).to(torch.bfloat16),
                pre + "k_weight": torch.randn(hc_mult, hidden, generator=gen).to(torch.bfloat16),
            }
        )
    weight_map = {}
    for name, tensors in shards.items():
        entries = [(k, _SAFETENSORS[t.dtype], list(t.shape)) for k, t in tensors.items()]
        data = ((i, _tensor_bytes(tensors[k])) for i, (k, _, _) in enumerate(entries))
        _write_shard(os.path.join(root, name), entries, data)
        weight_map.update(dict.fromkeys(tensors, name))
    _write_index(root, weight_map)
    config = json.dumps({"architectures": ["DeepseekV4ForCausalLM"], "text_config": fields})
    write_atomically(os.path.join(root, "config.json"), lambda f: f.write(config.encode()))
    _copy_atomically(os.fspath(tokenizer), os.path.join(root, "tokenizer.json"))
    return root
