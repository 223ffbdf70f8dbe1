//! The checks before a gather: indices against the table's rows, per-head hash ids against
//! their heads (as they become table rows), and outputs apart from the table and the indices.

use super::changed;
use crate::elem::IdElem;
use crate::error::{EngramError, Result};
use crate::table::{ranges_overlap, HostTable};
use rayon::prelude::*;

/// Checks every index against `rows`; the error names the first bad one.
pub fn check_indices<I: IdElem>(idx: &[I], rows: usize) -> Result<()> {
    if idx.is_empty() {
        // Nothing to check, even in a table of no rows.
        return Ok(());
    }
    // A max reduction (no early exit) vectorizes; the rare error path then finds the position.
    let top = idx
        .par_chunks(1 << 16)
        .map(|c| c.iter().fold(0u64, |m, v| m.max(v.bits())))
        .max()
        .unwrap_or(0);
    if top < rows as u64 {
        return Ok(());
    }
    match idx
        .iter()
        .enumerate()
        .find(|(_, v)| v.bits() >= rows as u64)
    {
        Some((index, v)) => Err(EngramError::IndexOutOfRange {
            value: v.wide(),
            index,
            rows,
        }),
        None => Err(changed()),
    }
}

/// The flat table rows of per-head hash ids, in one pass that checks each id: for `cols =
/// offsets.len()` heads, `out[i] = ids[i] + offsets[i % cols]` where `ids[i]` must be in
/// `[0, bounds[i % cols])` (its head's rows). The error ([`EngramError::HashIdOutOfRange`])
/// names the first bad id, its flat position and its column, so callers map the position
/// instead of scanning the ids again. Each id is read once (a concurrent write to `ids` can
/// only change which in-range row is produced).
pub fn head_rows<I: IdElem>(
    ids: &[I],
    offsets: &[i64],
    bounds: &[u64],
    out: &mut [i64],
) -> Result<()> {
    let cols = offsets.len();
    if cols == 0
        || bounds.len() != cols
        || ids.len() != out.len()
        || !ids.len().is_multiple_of(cols)
    {
        return Err(EngramError::Invalid(format!(
            "head rows: {} ids, {} out, {} offsets and {} bounds: the ids must be whole rows of \
             one id per head (a multiple of the head count), out as long as the ids",
            ids.len(),
            out.len(),
            offsets.len(),
            bounds.len()
        )));
    }
    // Whole rows of `cols` ids per piece (so the column of `ids[i]` is `i % cols` in each).
    let piece = cols * (1 << 14);
    let first_bad = ids
        .par_chunks(piece)
        .zip(out.par_chunks_mut(piece))
        .enumerate()
        .map(|(p, (ids, out))| {
            let mut bad = None;
            for (r, (ids, out)) in ids
                .chunks_exact(cols)
                .zip(out.chunks_exact_mut(cols))
                .enumerate()
            {
                for (c, ((&id, o), (&off, &bound))) in ids
                    .iter()
                    .zip(out.iter_mut())
                    .zip(offsets.iter().zip(bounds))
                    .enumerate()
                {
                    let v = id.bits();
                    if v >= bound && bad.is_none() {
                        bad = Some((p * piece + r * cols + c, id.wide(), c));
                    }
                    *o = off.wrapping_add(v as i64);
                }
            }
            bad
        })
        .reduce(
            || None,
            |a, b| match (a, b) {
                (Some(x), Some(y)) => Some(if x.0 <= y.0 { x } else { y }),
                (x, None) => x,
                (None, y) => y,
            },
        );
    match first_bad {
        None => Ok(()),
        Some((index, value, column)) => Err(EngramError::HashIdOutOfRange {
            value,
            index,
            column,
            rows: bounds[column],
        }),
    }
}

/// Refuses an output `out` (`out_len` bytes) that shares memory with the table's values or
/// scales, or with the index array `idx` (`idx_len` bytes): the gather would read what it
/// writes. The bindings call this before they make slices of the three.
pub fn check_separate(
    table: &HostTable,
    out: *const u8,
    out_len: usize,
    idx: *const u8,
    idx_len: usize,
) -> Result<()> {
    if let Some(t) = table.tiered() {
        // A tiered table's memory is its hot rows (cold rows are read into its own buffers).
        return check_separate(&t.hot, out, out_len, idx, idx_len);
    }
    // SAFETY: `row_ptr(0)`/`scale_ptr(0)` only offset by 0; the pointers are compared, not read.
    let (values, scales) = unsafe { (table.row_ptr(0), table.scale_ptr(0)) };
    let what = if ranges_overlap(out, out_len, values, table.rows * table.row_bytes()) {
        "the table's values (out is a view of the array the table wraps)"
    } else if ranges_overlap(out, out_len, scales, table.rows * table.scale_bytes()) {
        "the table's scales"
    } else if ranges_overlap(out, out_len, idx, idx_len) {
        "the index array"
    } else {
        return Ok(());
    };
    Err(EngramError::Invalid(format!(
        "out overlaps {what}: pass a separate output array"
    )))
}
