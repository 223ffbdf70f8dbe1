"""Plain Python/numpy implementations of SPEC sections 1-3, written the way the official demo
computes.

They are the baselines of the benchmarks and a cross-check for users; they share no code with the
Rust path (its own prime search, its own hashing, its own vocabulary loop over the Python
``tokenizers`` package).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import EngramConfig

__all__ = [
    "reference_hash",
    "reference_lookup_table",
    "reference_multipliers",
    "reference_normalizer",
    "reference_primes",
]

_SENTINEL = "\ue000"


def reference_normalizer() -> Any:
    """The SPEC section 1 normalizer as a ``tokenizers.normalizers.Sequence``."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def reference_lookup_table(tokenizer: Any) -> tuple[np.ndarray, int]:
    """``(raw -> compressed int64 table, compressed size)`` of a ``tokenizers.Tokenizer``, by the
    Python loop over the vocabulary that engines run today."""
    norm = reference_normalizer()
    key_to_new: dict[str, int] = {}
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    table = np.empty(vocab, dtype=np.int64)
    for t in range(vocab):
        text = tokenizer.decode([t], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.id_to_token(t)
        else:
            key = norm.normalize_str(text) or text
        table[t] = key_to_new.setdefault(key, len(key_to_new))
    return table, len(key_to_new)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0 or n % 3 == 0:
        return n in (2, 3)
    d = 5
    while d * d <= n:
        if n % d == 0 or n % (d + 2) == 0:
            return False
        d += 6
    return True


def reference_primes(config: EngramConfig) -> dict[int, list[list[int]]]:
    """Primes per layer, order and head: smallest unused prime above the previous one."""
    seen: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer in config.layer_ids:
        orders = []
        for size in config.engram_vocab_size:
            start, heads = size - 1, []
            for _ in range(config.n_head_per_ngram):
                p = start + 1
                while p in seen or not _is_prime(p):
                    p += 1
                seen.add(p)
                heads.append(p)
                start = p
            orders.append(heads)
        out[layer] = orders
    return out


def reference_multipliers(
    config: EngramConfig, compressed_vocab_size: int
) -> dict[int, np.ndarray]:
    """Odd int64 multipliers per layer from numpy's default_rng (PCG64)."""
    bound = max(1, (2**63 - 1) // compressed_vocab_size // 2)
    return {
        layer: np.random.default_rng(config.seed + 10007 * layer).integers(
            0, bound, size=config.max_ngram_size, dtype=np.int64
        )
        * 2
        + 1
        for layer in config.layer_ids
    }


def reference_hash(
    ids: np.ndarray,
    config: EngramConfig,
    compressed_vocab_size: int,
    pad_id: int | None = None,
    *,
    multipliers: dict[int, np.ndarray] | None = None,
    primes: dict[int, list[list[int]]] | None = None,
) -> dict[int, np.ndarray]:
    """Hash ids ``[B, T]`` -> ``{layer: int64 [B, T, (N-1)*H]}`` with whole-array numpy ops."""
    x = np.asarray(ids, dtype=np.int64)
    pad = config.pad_id if pad_id is None else pad_id
    n = config.max_ngram_size
    mult = (
        reference_multipliers(config, compressed_vocab_size) if multipliers is None else multipliers
    )
    primes = reference_primes(config) if primes is None else primes
    t = x.shape[1]
    shifts = [x]
    for k in range(1, n):
        shifted = np.full_like(x, pad)
        shifted[:, k:] = x[:, : max(t - k, 0)]
        shifts.append(shifted)
    out = {}
    for layer in config.layer_ids:
        m = mult[layer]
        cols = []
        for order in range(2, n + 1):
            mix = shifts[0] * m[0]
            for k in range(1, order):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            for p in primes[layer][order - 2]:
                cols.append(mix % p)
        out[layer] = np.stack(cols, axis=-1)
    return out
