//! The gather of a tiered table: each output row from one of two tables, the hot rows or the
//! cold rows just read, by a slot the tiered table computed (its own memory, not the caller's).

use super::{copy_row, rows_ahead, simd, Prefetcher, PIECE};
use crate::dtype::DType;
use crate::elem::Backend;
use crate::error::Result;
use crate::table::tiered::COLD;
use crate::table::HostTable;
use rayon::prelude::*;

/// `out[i]` = row `slots[i]` of `hot`, or row `slots[i] & !COLD` of `cold` where the `COLD` bit
/// is set, converted to `out_dtype` (`out` holds one output row per slot).
pub(crate) fn gather_split(
    hot: &HostTable,
    cold: &HostTable,
    slots: &[u64],
    out: &mut [u8],
    out_dtype: DType,
    backend: Backend,
) -> Result<()> {
    let out_row = hot.dim * out_dtype.size();
    debug_assert_eq!(out.len(), slots.len() * out_row);
    let fast = backend == Backend::Auto && simd();
    let ahead = rows_ahead(hot);
    let (ph, pc) = (Prefetcher::new(hot), Prefetcher::new(cold));
    let place = |s: u64| {
        if s & COLD != 0 {
            (cold, (s & !COLD) as usize, &pc)
        } else {
            (hot, s as usize, &ph)
        }
    };
    // Slots come from the tiered table: every one is below its table's rows.
    assert!(slots.iter().all(|&s| { place(s).1 < place(s).0.rows }));
    out.par_chunks_mut(PIECE * out_row)
        .zip(slots.par_chunks(PIECE))
        .for_each(|(out, slots)| {
            let mut scratch = vec![0f32; hot.dim];
            for &s in slots.iter().take(ahead) {
                let (_, r, p) = place(s);
                p.row(r);
            }
            for (j, (&s, dst)) in slots.iter().zip(out.chunks_exact_mut(out_row)).enumerate() {
                if let Some(&next) = slots.get(j + ahead) {
                    let (_, r, p) = place(next);
                    p.row(r);
                }
                let (table, r, _) = place(s);
                // SAFETY: `r < table.rows` (asserted above); `dst` is one output row; `fast`
                // only where the CPU has AVX-512.
                unsafe { copy_row(table, r, dst, out_dtype, fast, &mut scratch) };
            }
        });
    Ok(())
}
