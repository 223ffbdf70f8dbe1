#[test]
fn head_rows_add_offsets_and_name_the_first_bad_id() {
    let offsets = [0i64, 10, 30];
    let bounds = [10u64, 20, 5];
    let ids: Vec<i64> = (0..3 * 40_000).map(|i| (i % 5) as i64).collect();
    let mut out = vec![0i64; ids.len()];
    head_rows(&ids, &offsets, &bounds, &mut out).unwrap();
    for (i, (&id, &o)) in ids.iter().zip(&out).enumerate() {
        assert_eq!(o, id + offsets[i % 3]);
    }
    let mut bad = ids.clone();
    bad[70_001] = 7; // column 2, bound 5 (the first bad one)
    bad[100_000] = -1; // later, negative
    bad[2] = 4; // in range
    let err = head_rows(&bad, &offsets, &bounds, &mut out).unwrap_err();
    assert_eq!(
        err,
        EngramError::HashIdOutOfRange {
            value: 7,
            index: 70_001,
            column: 2,
            rows: 5
        }
    );
    let neg: Vec<i32> = vec![0, -3, 0];
    let mut out3 = vec![0i64; 3];
    let err = head_rows(&neg, &offsets, &bounds, &mut out3).unwrap_err();
    assert!(matches!(
        err,
        EngramError::HashIdOutOfRange {
            value: -3,
            index: 1,
            ..
        }
    ));
    assert!(head_rows(&neg[..2], &offsets, &bounds, &mut out3[..2]).is_err());
}

use super::*;
use crate::dtype::FP8_BLOCK;

fn table_of(
    dtype: DType,
    rows: usize,
    dim: usize,
    bytes: &mut [u8],
    scales: &mut [u8],
) -> HostTable {
    // SAFETY: the buffers outlive the table within each test.
    unsafe {
        HostTable::from_raw(
            bytes.as_mut_ptr(),
            scales.as_mut_ptr(),
            rows,
            dim,
            dtype,
            false,
        )
        .unwrap()
    }
}

#[test]
fn simd_gathers_match_scalar_for_every_dtype_pair() {
    let (rows, dim) = (300, 96);
    let mut state = 0x1234_5678_9ABC_DEF0u64;
    let mut bytes: Vec<u8> = (0..rows * dim * 4)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    // Scale bytes over the whole range, 0 and 254 and the NaN byte included.
    let mut scales: Vec<u8> = (0..rows * dim / FP8_BLOCK)
        .map(|i| (i * 37 % 256) as u8)
        .collect();
    let idx: Vec<i64> = (0..2000).map(|i| (i * 7919 % rows) as i64).collect();
    for dt in [DType::F32, DType::F16, DType::BF16, DType::F8E4M3] {
        let table = table_of(dt, rows, dim, &mut bytes, &mut scales);
        for out in [DType::F32, DType::F16, DType::BF16] {
            let n = idx.len() * dim * out.size();
            let (mut fast, mut slow) = (vec![0u8; n], vec![1u8; n]);
            gather(&table, &idx, &mut fast, out, Backend::Auto).unwrap();
            gather(&table, &idx, &mut slow, out, Backend::Scalar).unwrap();
            assert!(fast == slow, "{dt:?} -> {out:?}");
        }
    }
}

/// Pseudo-random bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A buffer of `len` bytes starting `offset` bytes past a 64-byte boundary, with guard bytes
/// on both sides: returns the storage and where the output starts in it.
fn offset_buf(len: usize, offset: usize) -> (Vec<u8>, usize) {
    let storage = vec![0xA5u8; len + 256];
    let start = (64 - storage.as_ptr() as usize % 64) % 64 + 64 + offset;
    (storage, start)
}

fn guards_intact(storage: &[u8], start: usize, len: usize) -> bool {
    storage[..start].iter().all(|&b| b == 0xA5) && storage[start + len..].iter().all(|&b| b == 0xA5)
}

#[test]
fn streaming_copies_match_scalar_at_every_alignment_row_size_and_edge() {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // Row sizes below, at and above a line, multiples of 64 and not (bytes: 2 .. 264).
        for (dt, dim) in [
            (DType::F32, 64),
            (DType::F32, 4),
            (DType::F32, 20),
            (DType::F32, 33),
            (DType::BF16, 64),
            (DType::BF16, 1),
            (DType::F16, 7),
            (DType::F16, 96),
            (DType::F32, 66),
        ] {
            let rows = 97;
            let mut bytes = noise(rows * dim * dt.size(), dim as u64);
            let table = table_of(dt, rows, dim, &mut bytes, &mut []);
            let row = table.row_bytes();
            // Counts around the chunk size (and the prefetch distance past it).
            for n in [1, 2, 3, 17, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 40] {
                let idx: Vec<i64> = (0..n).map(|i| (i * 31 % rows) as i64).collect();
                let mut want = vec![0u8; n * row];
                gather(&table, &idx, &mut want, dt, Backend::Scalar).unwrap();
                for offset in [0, 1, 2, 8, 16, 31, 48, 63] {
                    let (mut storage, start) = offset_buf(n * row, offset);
                    let out = &mut storage[start..start + n * row];
                    // SAFETY: AVX-512 is available; `out` holds one row per index.
                    assert!(unsafe { stream::stream_piece(&table, &idx, out, 5) });
                    assert!(
                        storage[start..start + n * row] == want[..],
                        "{dt:?} dim {dim}, {n} rows, offset {offset}"
                    );
                    assert!(guards_intact(&storage, start, n * row));
                    // The same output written as pieces of odd sizes, as threads would: the
                    // partial lines where pieces meet get masked stores from both sides.
                    let (mut storage, start) = offset_buf(n * row, offset);
                    let out = &mut storage[start..start + n * row];
                    for (o, i) in out.chunks_mut(13 * row).zip(idx.chunks(13)) {
                        // SAFETY: as above.
                        assert!(unsafe { stream::stream_piece(&table, i, o, 3) });
                    }
                    assert!(storage[start..start + n * row] == want[..]);
                    assert!(guards_intact(&storage, start, n * row));
                }
            }
        }
    }
}

#[test]
fn large_outputs_take_the_streaming_path_exactly() {
    // Through `gather` (several pieces, streaming stores) at aligned and unaligned outputs,
    // and every conversion of a large output, against the scalar path.
    let (rows, dim) = (5000, 64);
    let mut bytes = noise(rows * dim * 4, 7);
    // Every scale byte, so FP8 blocks take both the table path and the f32 path.
    let mut scales: Vec<u8> = (0..rows * dim / FP8_BLOCK)
        .map(|i| (i % 256) as u8)
        .collect();
    for dt in [DType::F32, DType::F16, DType::BF16, DType::F8E4M3] {
        let table = table_of(dt, rows, dim, &mut bytes, &mut scales);
        for out in [DType::F32, DType::F16, DType::BF16] {
            let row = dim * out.size();
            let n = STREAM_MIN_BYTES / row + PIECE + 77;
            let idx: Vec<i32> = (0..n).map(|i| (i * 7919 % rows) as i32).collect();
            let mut slow = vec![0u8; n * row];
            gather(&table, &idx, &mut slow, out, Backend::Scalar).unwrap();
            for offset in [0, 16, 40] {
                let (mut storage, start) = offset_buf(n * row, offset);
                let fast = &mut storage[start..start + n * row];
                gather(&table, &idx, fast, out, Backend::Auto).unwrap();
                assert!(fast[..] == slow[..], "{dt:?} -> {out:?} at offset {offset}");
                assert!(guards_intact(&storage, start, n * row));
            }
        }
    }
}

#[test]
fn an_index_that_changes_after_the_check_stops_the_walk() {
    // `walk` is what reads the indices during a gather: a bad one (as if another thread
    // wrote it after `check_indices`) stops it before any row of its chunk is handled.
    struct Rows(Vec<usize>);
    impl RowOp for Rows {
        unsafe fn row(&mut self, _i: usize, r: usize) {
            self.0.push(r);
        }
    }
    let mut bytes = vec![0u8; 10 * 16];
    let table = table_of(DType::F32, 10, 4, &mut bytes, &mut []);
    let mut idx = vec![3i64; CHUNK * 2 + 5];
    let mut seen = Rows(Vec::new());
    // SAFETY: `Rows` touches no memory of the table.
    assert!(unsafe { walk(&table, &idx, 4, &mut seen) });
    assert_eq!(seen.0.len(), idx.len());
    for (bad, at) in [(10i64, CHUNK + 7), (-1, 0), (i64::MIN, idx.len() - 1)] {
        idx[at] = bad;
        let mut seen = Rows(Vec::new());
        // SAFETY: as above.
        assert!(!unsafe { walk(&table, &idx, 4, &mut seen) });
        assert!(seen.0.len() <= at && seen.0.iter().all(|&r| r == 3));
        #[cfg(target_arch = "x86_64")]
        if simd() {
            let mut out = vec![0u8; idx.len() * 16];
            // SAFETY: AVX-512 available; one row per index.
            assert!(!unsafe { stream::stream_piece(&table, &idx, &mut out, 4) });
        }
        idx[at] = 3;
    }
    // Far-off rows are only prefetched, with wrapping address arithmetic.
    Prefetcher::new(&table).row(usize::MAX);
    Prefetcher::new(&table).row(1 << 60);
    assert_eq!(changed().to_string(), changed().to_string());
    assert!(changed().to_string().contains("changed during the gather"));
}

#[test]
fn outputs_overlapping_the_table_or_the_indices_are_refused() {
    let mut bytes = vec![0u8; 64 * 8 * 2];
    let mut scales = vec![0u8; 2 * 2];
    let table = table_of(DType::F8E4M3, 2, 64, &mut bytes[..128], &mut scales);
    let (v, s) = (bytes.as_ptr(), scales.as_ptr());
    let other = [0u8; 16];
    let msg = |r: Result<()>| r.unwrap_err().to_string();
    assert!(msg(check_separate(&table, v, 1, other.as_ptr(), 16))
        .contains("out overlaps the table's values"));
    // SAFETY: pointers into `bytes` for the comparison only.
    let (end, before) = unsafe { (v.add(127), v.add(128)) };
    assert!(check_separate(&table, end, 4, std::ptr::null(), 0).is_err());
    assert!(check_separate(&table, before, 4, std::ptr::null(), 0).is_ok());
    assert!(msg(check_separate(&table, s, 4, std::ptr::null(), 0))
        .contains("out overlaps the table's scales: pass a separate output array"));
    assert!(msg(check_separate(
        &table,
        other.as_ptr(),
        16,
        other.as_ptr().wrapping_add(15),
        8
    ))
    .contains("out overlaps the index array"));
    assert!(check_separate(&table, other.as_ptr(), 8, other.as_ptr().wrapping_add(8), 8).is_ok());
    assert!(check_separate(&table, v, 0, v, 8).is_ok());
    // `gather` itself refuses an output inside the table.
    let mut copy = bytes.clone();
    let t32 = table_of(DType::F32, 2, 64, &mut copy, &mut []);
    // SAFETY: `copy` holds the table; the gather refuses before writing.
    let out = unsafe { std::slice::from_raw_parts_mut(copy.as_mut_ptr(), 256) };
    assert!(gather(&t32, &[0i64], out, DType::F32, Backend::Auto).is_err());
}

#[test]
fn the_ceiling_copies_rows_and_scales() {
    let (rows, dim) = (50, 64);
    let mut bytes = noise(rows * dim, 3);
    let mut scales = noise(rows * 2, 5);
    let table = table_of(DType::F8E4M3, rows, dim, &mut bytes, &mut scales);
    let idx: Vec<i32> = (0..1000).map(|i| (i * 13 % rows) as i32).collect();
    let mut out = vec![0u8; idx.len() * (dim + 2)];
    copy_rows_ceiling(&table, &idx, &mut out).unwrap();
    for (o, &r) in out.chunks(dim + 2).zip(&idx) {
        let r = r as usize;
        assert!(o[..dim] == bytes[r * dim..][..dim] && o[dim..] == scales[r * 2..][..2]);
    }
    let mut bad = idx.clone();
    bad[777] = rows as i32;
    assert_eq!(
        copy_rows_ceiling(&table, &bad, &mut out).unwrap_err(),
        EngramError::IndexOutOfRange {
            value: rows as i128,
            index: 777,
            rows
        }
    );
    assert!(copy_rows_ceiling(&table, &idx, &mut out[1..]).is_err());
}

#[test]
fn bad_indices_write_nothing() {
    let mut bytes = vec![0u8; 10 * 4 * 4];
    let table = table_of(DType::F32, 10, 4, &mut bytes, &mut []);
    let mut out = vec![7u8; 3 * 16];
    let err = gather(&table, &[1i64, 10, -1], &mut out, DType::F32, Backend::Auto).unwrap_err();
    assert_eq!(
        err,
        EngramError::IndexOutOfRange {
            value: 10,
            index: 1,
            rows: 10
        }
    );
    assert!(out.iter().all(|&b| b == 7));
    let err = gather(&table, &[1i64, 2, -1], &mut out, DType::F32, Backend::Auto).unwrap_err();
    assert_eq!(
        err,
        EngramError::IndexOutOfRange {
            value: -1,
            index: 2,
            rows: 10
        }
    );
}
