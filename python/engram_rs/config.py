"""Engram hash configuration (SPEC section 2) and the built-in presets (SPEC section 4)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from . import _engram_rs
from .atomic import write_atomically

__all__ = ["PRESETS", "EngramConfig", "hf_engram_fields", "read_hf_config"]

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "engram_vocab_size": [646400, 646400],
        "max_ngram_size": 3,
        "n_embed_per_ngram": 512,
        "n_head_per_ngram": 8,
        "layer_ids": [1, 15],
        "pad_id": 2,
        "seed": 0,
        "kernel_size": 4,
        "hidden_size": 1024,
        "hc_mult": 4,
        "short_conv": True,
    },
    "deepseek-v4.1-flash": {
        "engram_vocab_size": [16000000, 16000000, 16000000],
        "max_ngram_size": 4,
        "n_embed_per_ngram": 2048,
        "n_head_per_ngram": 8,
        "layer_ids": [1, 14],
        "pad_id": 2,
        "seed": 0,
        "kernel_size": 4,
        "hidden_size": 5120,
        "hc_mult": 4,
        "short_conv": False,
    },
}


_MISSING = object()


def read_hf_config(config: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """The parsed HF config: a dict as given, or the JSON of a file or of ``DIR/config.json``."""
    if isinstance(config, dict):
        return config
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an HF config object")
    return data


def hf_engram_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Where a parsed HF config holds its ``engram_*`` fields: ``text_config`` (the released
    DeepSeek-V4.1-Flash) when it has them, else the top level."""
    text = data.get("text_config")
    return text if isinstance(text, dict) and "engram_layer_ids" in text else data


def _check_int(name: str, value: object, minimum: int = 0) -> int:
    """Type and range conversion only (an int in [minimum, 2**64)); the hashing rules themselves
    are the core's (``HashConfig::validate``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value >= 2**64:
        raise ValueError(f"{name} must be below 2**64, got {value}")
    return value


@dataclass(frozen=True)
class EngramConfig:
    """Hash and module sizes of one Engram model; field names follow the official demo.

    Frozen and hashable (list fields are stored as tuples). ``cfg.replace(...)`` makes a
    changed copy, validated like the original.

    Fields:
        engram_vocab_size: base size of the hash tables of each n-gram order 2..N (one entry per
            order); each head's table is the next unused prime above it.
        max_ngram_size: N, the longest n-gram hashed (orders 2..N).
        n_embed_per_ngram: embedding width of one n-gram order (all its heads together).
        n_head_per_ngram: hash heads per order; each has its own prime-sized table.
        layer_ids: the transformer layers that hold an Engram (they also seed the multipliers).
        pad_id: the RAW pad token id (NgramHasher.from_tokenizer maps it to its compressed id;
            without the tokenizer, NgramHasher needs ``compressed_pad_id=`` unless it is 0);
            positions before a sequence's start read as this token.
        seed: base seed of the multipliers (layer ``l`` draws from ``seed + 10007 * l``).
        kernel_size: ShortConv kernel size (the module, not the hashing).
        hidden_size: the model's hidden size (the module).
        hc_mult: hyper-connection branches (the module).
        short_conv: whether the module has the ShortConv.
        norm_eps: the model's RMS norm epsilon (``rms_norm_eps``; 1e-20 in DeepSeek-V4.1-Flash),
            None where the module uses torch's default (the demo). Left out of ``to_dict``
            when None, so configs without it read and compare as before.
    """

    engram_vocab_size: tuple[int, ...] = (646400, 646400)
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: tuple[int, ...] = (1, 15)
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    hidden_size: int = 1024
    hc_mult: int = 4
    short_conv: bool = True
    norm_eps: float | None = None

    def __post_init__(self) -> None:
        n = _check_int("max_ngram_size", self.max_ngram_size)
        h = _check_int("n_head_per_ngram", self.n_head_per_ngram)
        sizes = self.engram_vocab_size
        if not isinstance(sizes, (list, tuple)):
            raise TypeError(f"engram_vocab_size must be a list of ints, got {sizes!r}")
        for i, size in enumerate(sizes):
            _check_int(f"engram_vocab_size[{i}]", size)
        layers = self.layer_ids
        if not isinstance(layers, (list, tuple)):
            raise TypeError(f"layer_ids must be a list of ints, got {layers!r}")
        for i, layer in enumerate(layers):
            _check_int(f"layer_ids[{i}]", layer)
        seed = _check_int("seed", self.seed)
        # The hashing rules (orders, heads, sizes, distinct layers, numpy's seed range) live in
        # the Rust core, once.
        _engram_rs.check_hash_config(list(sizes), n, h, list(layers), seed)
        # A layer's flat table stacks h prime-sized tables per order; its row ids are int64
        # (with room for the primes above each size), so the sum must stay below 2**62.
        flat = h * sum(sizes)
        if flat >= 2**62:
            raise ValueError(
                f"engram_vocab_size {list(sizes)} with n_head_per_ngram={h} gives each layer a "
                f"flat table of about {flat} rows (n_head_per_ngram * sum(engram_vocab_size)); "
                "it must stay below 2**62 (row ids are int64): use smaller sizes or fewer heads"
            )
        embed = _check_int("n_embed_per_ngram", self.n_embed_per_ngram, 1)
        if embed % h:
            raise ValueError(
                f"n_embed_per_ngram ({embed}) must be a multiple of n_head_per_ngram ({h})"
            )
        _check_int("pad_id", self.pad_id)
        _check_int("kernel_size", self.kernel_size, 1)
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("hc_mult", self.hc_mult, 1)
        if not isinstance(self.short_conv, bool):
            raise TypeError(f"short_conv must be a bool, got {self.short_conv!r}")
        eps = self.norm_eps
        if eps is not None and (
            isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1
        ):
            raise ValueError(f"norm_eps must be a number in [0, 1) or None, got {eps!r}")
        # Tuples: the config is hashable and cannot be changed through the caller's list.
        object.__setattr__(self, "engram_vocab_size", tuple(sizes))
        object.__setattr__(self, "layer_ids", tuple(layers))

    @property
    def head_dim(self) -> int:
        """Embedding width of one hash head: ``n_embed_per_ngram // n_head_per_ngram``."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def cols(self) -> int:
        """Hash ids per token and layer: ``(max_ngram_size - 1) * n_head_per_ngram``."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def replace(self, **changes: Any) -> EngramConfig:
        """A copy with ``changes`` applied (and validated), e.g. a small config for tests:
        ``cfg.replace(engram_vocab_size=(1009, 1009), layer_ids=(1,))``."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(
                f"unknown config field(s) {unknown}; known fields: "
                f"{', '.join(f.name for f in fields(self))}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> EngramConfig:
        """A built-in config: "demo" (the official demo) or "deepseek-v4.1-flash"."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tuples as lists; ``norm_eps`` only when set)."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if not (k == "norm_eps" and v is None)
        }

    @classmethod
    def from_hf(cls, config: str | os.PathLike[str] | dict[str, Any]) -> EngramConfig:
        """The Engram config of a Hugging Face model's ``config.json`` (a path, the model's
        directory or the parsed dict), as DeepSeek-V4.1-Flash writes it (SPEC 8.1): the
        ``engram_*`` fields of ``text_config``, or of the top level, with the hidden size,
        ``hc_mult`` and the norm epsilon. ``engram_num_embeddings`` (each layer's table rows),
        when present, must equal the sum of the primes this config derives: a mismatch names
        both numbers."""
        data = read_hf_config(config)
        fields_at = hf_engram_fields(data)
        where = "text_config" if fields_at is not data else "the top level"

        def get(*names: str, default: Any = _MISSING) -> Any:
            for name in names:
                if name in fields_at:
                    return fields_at[name]
            if default is not _MISSING:
                return default
            raise ValueError(
                f"the HF config has no {' / '.join(names)} (looked in {where}): is it an "
                "Engram model's config.json (DeepSeek-V4.1-Flash)?"
            )

        n = get("engram_max_ngram_size")
        base = get("engram_vocab_size")
        if isinstance(base, int) and not isinstance(base, bool) and isinstance(n, int):
            base = [base] * max(0, n - 1)  # one base size for every order
        heads = get("engram_n_heads")
        head_dim = get("engram_head_dim")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (heads, head_dim)):
            raise ValueError(
                f"engram_n_heads and engram_head_dim must be ints, got {heads!r}, {head_dim!r}"
            )
        cfg = cls(
            engram_vocab_size=base,
            max_ngram_size=n,
            n_embed_per_ngram=heads * head_dim,
            n_head_per_ngram=heads,
            layer_ids=get("engram_layer_ids"),
            pad_id=get("engram_pad_token_id", "engram_pad_id"),
            seed=get("engram_seed", default=0),
            hidden_size=get("hidden_size", "dim"),
            hc_mult=get("hc_mult", default=1),
            short_conv=False,
            norm_eps=get("rms_norm_eps", "norm_eps", default=None),
        )
        rows = get("engram_num_embeddings", default=None)
        if rows is not None:
            from .hashing import NgramHasher  # hashing imports this module

            derived = NgramHasher(cfg, 1, compressed_pad_id=0).table_rows
            if not isinstance(rows, list) or len(rows) != len(cfg.layer_ids):
                raise ValueError(
                    f"engram_num_embeddings must list one table size per Engram layer "
                    f"{list(cfg.layer_ids)}, got {rows!r}"
                )
            for layer, want in zip(cfg.layer_ids, rows, strict=True):
                if want != derived[layer]:
                    raise ValueError(
                        f"engram_num_embeddings says layer {layer}'s table has {want} rows, but "
                        f"the primes of this config sum to {derived[layer]}: the config's "
                        "engram_vocab_size, engram_n_heads or engram_layer_ids do not match "
                        "its tables"
                    )
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngramConfig:
        """Builds a config from a dict, rejecting unknown keys; missing keys take demo defaults."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown config field(s) {unknown}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> EngramConfig:
        """Reads a config from a JSON file (an object of config fields)."""
        name = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{name!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}): "
                "a config file is a UTF-8 JSON object of config fields"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name!r} is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError(
                f"{name!r} nests JSON too deeply to be a config: a config file is one flat "
                "object of config fields"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{name!r} holds a JSON {type(data).__name__}, expected an object of config "
                "fields (see EngramConfig.to_json)"
            )
        return cls.from_dict(data)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Writes the config as JSON, atomically (a temporary file renamed into place)."""
        text = json.dumps(self.to_dict(), indent=2).encode("utf-8")
        write_atomically(path, lambda f: f.write(text))
