"""The SPEC's hashing written literally with Python ints (arbitrary precision, floor modulo).

Independent of both the Rust path and engram_rs.reference: slow, for small inputs only.
"""

from __future__ import annotations


def spec_hash(
    rows: list[list[int]], multipliers: list[int], primes: list[list[int]], pad: int
) -> list[list[list[int]]]:
    """``rows`` [B][T] compressed ids -> [B][T][(N-1)*H] hash ids of one layer."""
    n = len(multipliers)
    out = []
    for row in rows:
        out_row = []
        for t in range(len(row)):
            cols = []
            for order in range(2, n + 1):
                mix = row[t] * multipliers[0]
                for k in range(1, order):
                    mix ^= (row[t - k] if t >= k else pad) * multipliers[k]
                assert 0 <= mix < 2**63, "int64 products must never overflow for valid ids"
                cols.extend(mix % p for p in primes[order - 2])
            out_row.append(cols)
        out.append(out_row)
    return out


def spec_hash_blocked(
    rows: list[list[int]],
    blocked: list[list[bool]],
    multipliers: list[int],
    primes: list[list[int]],
    pad: int,
) -> list[list[list[int]]]:
    """SPEC 8.3 (the DEAD rule) literally: for position t, walk k = 0..N-1 upward with
    ``dead |= t - k < 0 or blocked[t - k]``; the value at shift k is the pad where dead, else
    the id at t - k."""
    n = len(multipliers)
    out = []
    for row, mask in zip(rows, blocked, strict=True):
        out_row = []
        for t in range(len(row)):
            values, dead = [], False
            for k in range(n):
                dead = dead or t - k < 0 or mask[t - k]
                values.append(pad if dead else row[t - k])
            cols = []
            for order in range(2, n + 1):
                mix = values[0] * multipliers[0]
                for k in range(1, order):
                    mix ^= values[k] * multipliers[k]
                cols.extend(mix % p for p in primes[order - 2])
            out_row.append(cols)
        out.append(out_row)
    return out
