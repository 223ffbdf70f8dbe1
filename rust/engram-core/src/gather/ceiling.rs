//! The benchmark's ceilings of a gather on this machine: reading the rows only, and a plain
//! copy of them with no conversion.

use super::{changed, check_indices, check_separate, rows_ahead, walk, Prefetcher, RowOp};
use crate::elem::IdElem;
use crate::error::{EngramError, Result};
use crate::table::HostTable;
use rayon::prelude::*;

/// Reads every cache line of rows `idx` (and of their scales), prefetched and split over
/// threads the way [`gather`] does, but writes nothing: how fast this machine reads the rows.
/// Returns a fold of the bytes read (so the reads cannot be optimized away).
pub fn read_rows<I: IdElem>(table: &HostTable, idx: &[I]) -> Result<u64> {
    table.refuse_tiered("the read ceiling")?;
    check_indices(idx, table.rows)?;
    let ahead = rows_ahead(table);
    struct Read<'a> {
        table: &'a HostTable,
        acc: u64,
    }
    impl RowOp for Read<'_> {
        #[inline(always)]
        unsafe fn row(&mut self, _i: usize, r: usize) {
            // SAFETY: the caller upholds this function's safety contract (documented above or
            // on the trait method): CPU features, bounds and aliasing as stated there.
            unsafe {
                let p = self.table.row_ptr(r);
                for off in (0..self.table.row_bytes()).step_by(64) {
                    self.acc = self.acc.rotate_left(1) ^ std::ptr::read_volatile(p.add(off)) as u64;
                }
                if self.table.scale_bytes() > 0 {
                    self.acc ^= std::ptr::read_volatile(self.table.scale_ptr(r)) as u64;
                }
            }
        }
    }
    // Folds of 512-row pieces, xor-ed: the result tests pin down.
    idx.par_chunks(512)
        .map(|idx| {
            let mut op = Read { table, acc: 0 };
            // SAFETY: `Read` only reads rows below `table.rows`.
            if unsafe { walk(table, idx, ahead, &mut op) } {
                Ok(op.acc)
            } else {
                Err(changed())
            }
        })
        .try_reduce(|| 0, |a, b| Ok(a ^ b))
}

/// The ceiling of a gather on this machine: a plain loop that copies the same rows (values,
/// then scale bytes) into `out` (`idx.len() * (row_bytes + scale_bytes)` bytes), one contiguous
/// share of the rows per thread, each row prefetched as far ahead as [`gather`] does, with
/// `copy_from_slice`. No conversion, no separate index pass (each index is checked where it is
/// used, and the slicing is bounds-checked).
pub fn copy_rows_ceiling<I: IdElem>(table: &HostTable, idx: &[I], out: &mut [u8]) -> Result<()> {
    table.refuse_tiered("the copy ceiling")?;
    let (row, sc) = (table.row_bytes(), table.scale_bytes());
    let unit = row + sc;
    if out.len() != idx.len() * unit {
        return Err(EngramError::Invalid(format!(
            "output holds {} bytes, expected {} rows x {unit} bytes",
            out.len(),
            idx.len()
        )));
    }
    check_separate(table, out.as_ptr(), out.len(), std::ptr::null(), 0)?;
    if idx.is_empty() {
        return Ok(());
    }
    // SAFETY: a table's values are `rows * row_bytes` bytes (and its scales `rows * scale_bytes`)
    // that stay valid while the table is borrowed; `out` does not overlap them (checked above).
    let values = unsafe { std::slice::from_raw_parts(table.row_ptr(0), table.rows * row) };
    let scales: &[u8] = if sc > 0 {
        // SAFETY: as above, for an FP8 table's scales.
        unsafe { std::slice::from_raw_parts(table.scale_ptr(0), table.rows * sc) }
    } else {
        &[]
    };
    let (ahead, prefetch) = (rows_ahead(table), Prefetcher::new(table));
    let share = idx.len().div_ceil(rayon::current_num_threads());
    let rows = table.rows as u64;
    // Indexed like the C loop it stands for: a few instructions a row beyond the copy.
    let one = |part: usize, out: &mut [u8], idx: &[I]| -> std::result::Result<(), usize> {
        let n = idx.len();
        for i in 0..n {
            if i + ahead < n {
                prefetch.row(idx[i + ahead].bits() as usize);
            }
            let r = idx[i].bits();
            if r >= rows {
                return Err(part * share + i);
            }
            let (r, dst) = (r as usize, &mut out[i * unit..][..unit]);
            dst[..row].copy_from_slice(&values[r * row..][..row]);
            if sc > 0 {
                dst[row..].copy_from_slice(&scales[r * sc..][..sc]);
            }
        }
        Ok(())
    };
    let bad = out
        .par_chunks_mut(share * unit)
        .zip(idx.par_chunks(share))
        .enumerate()
        .try_for_each(|(part, (out, idx))| one(part, out, idx));
    match bad {
        Ok(()) => Ok(()),
        Err(index) => Err(EngramError::IndexOutOfRange {
            value: idx[index].wide(),
            index,
            rows: table.rows,
        }),
    }
}
