"""The typed boundary (issue 16, point 1): out-of-range ids and row indices are one structured
IndexError subclass that carries the position in the caller's shape, the value and the bound, so
callers map positions instead of scanning the ids again."""

from __future__ import annotations

import engram_rs as er
import numpy as np
import pytest
from engram_rs import _engram_rs


def test_a_bad_row_index_carries_its_position_value_and_bound() -> None:
    t = er.HostTable.from_numpy(np.zeros((10, 4), np.float32))
    idx = np.array([[0, 1, 2], [3, 4, 99]])
    with pytest.raises(_engram_rs.OutOfRangeError) as e:
        t.gather(idx)
    err = e.value
    assert isinstance(err, IndexError)
    assert (err.what, err.value, err.bound, err.position, err.flat_index, err.column) == (
        "row index",
        99,
        10,
        (1, 2),
        5,
        None,
    )
    assert "row index 99 at position (1, 2) is out of range for a table of 10 rows" in str(err)


def test_a_bad_token_id_carries_its_position() -> None:
    cfg = er.EngramConfig.preset("demo")
    h = er.NgramHasher(cfg, 1000, compressed_pad_id=2)
    ids = np.zeros((2, 7), np.int64)
    ids[1, 5] = 1000
    with pytest.raises(_engram_rs.OutOfRangeError) as e:
        h.hash(ids)
    assert (e.value.what, e.value.value, e.value.bound, e.value.position) == (
        "id",
        1000,
        1000,
        (1, 5),
    )


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_head_rows_add_offsets_and_check_each_head_once(dtype) -> None:
    offsets, bounds = [0, 7, 20], [7, 13, 5]
    ids = np.array([[[0, 12, 4], [6, 0, 0]]], dtype)
    rows = _engram_rs.head_rows(ids, offsets, bounds)
    np.testing.assert_array_equal(rows.reshape(ids.shape), ids.astype(np.int64) + offsets)
    bad = ids.copy()
    bad[0, 1, 2] = 5  # column 2 has 5 rows
    with pytest.raises(_engram_rs.OutOfRangeError) as e:
        _engram_rs.head_rows(bad, offsets, bounds)
    assert (e.value.what, e.value.value, e.value.bound, e.value.column) == ("hash id", 5, 5, 2)
    assert e.value.position == (0, 1, 2)
    bad[0, 0, 0] = -1
    with pytest.raises(_engram_rs.OutOfRangeError) as e:
        _engram_rs.head_rows(bad, offsets, bounds)
    assert (e.value.value, e.value.position) == (-1, (0, 0, 0))
    with pytest.raises(ValueError, match="one id per head"):
        _engram_rs.head_rows(ids[..., :2].copy(), offsets, bounds)
