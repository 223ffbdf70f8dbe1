//! Row gathers from host tables: `out[i] = table[idx[i]]`, converted to the output dtype.
//!
//! Rows are split over rayon threads in pieces; each thread prefetches the rows it will need a
//! few iterations ahead (random rows miss every cache level, so overlapping the misses is what
//! sets the throughput), then copies or converts with AVX-512 where the CPU has it. Indices are
//! all checked before anything is written (the error names the first bad one). The index memory
//! belongs to the caller, who may change it meanwhile (another Python thread), so the loop never
//! trusts it: each chunk of indices is read once into a local buffer and checked there, and the
//! rows are addressed from that copy only. A scalar path, selected with `Backend::Scalar`, is
//! the reference the SIMD paths are tested against.

use crate::cpu::prefetch_line;
use crate::dtype::{self, DType};
use crate::elem::{Backend, IdElem};
use crate::error::{EngramError, Result};
use crate::table::HostTable;
use rayon::prelude::*;

/// Rows per unit of parallel work (the prefetch ramp-up is paid once per piece).
const PIECE: usize = 4096;
/// Indices copied and checked at a time, on the stack.
const CHUNK: usize = 256;
/// The largest prefetch distance, in rows.
const MAX_AHEAD: usize = 16;
/// Cache lines a thread keeps in flight through prefetches (about what its fill buffers and the
/// L2 queue hold); the rows-ahead distance follows from the row size.
const LINES_IN_FLIGHT: usize = 64;
/// Same-dtype outputs at least this large are written with streaming stores: they do not fit in
/// the caches anyway, and streaming skips the read-for-ownership of every output line.
const STREAM_MIN_BYTES: usize = 8 << 20;

fn simd() -> bool {
    crate::cpu::avx512()
}

/// The error of an index that passed [`check_indices`] and was out of range when the gather
/// read it again: the caller's index memory changed during the call.
pub(crate) fn changed() -> EngramError {
    EngramError::Invalid(
        "the index array changed during the gather (another thread wrote it), which stopped \
         with out partly written: do not modify the indices until the call returns"
            .into(),
    )
}

mod ceiling;
mod check;
mod split;
#[cfg(target_arch = "x86_64")]
mod stream;

pub use ceiling::{copy_rows_ceiling, read_rows};
pub use check::{check_indices, check_separate, head_rows};
pub(crate) use split::gather_split;

/// What a gather does with each row: `row(i, r)` handles output row `i` from table row `r`.
trait RowOp {
    /// # Safety
    /// `r < table.rows`; `i` indexes the piece's output rows, each once, in increasing order.
    unsafe fn row(&mut self, i: usize, r: usize);
}

/// Gathers rows `idx` of `table` into `out` (`idx.len() * dim` values of `out_dtype`, as bytes).
pub fn gather<I: IdElem>(
    table: &HostTable,
    idx: &[I],
    out: &mut [u8],
    out_dtype: DType,
    backend: Backend,
) -> Result<()> {
    if !out_dtype.is_output() {
        return Err(EngramError::Invalid(
            "gathers write float32, float16 or bfloat16, not FP8".into(),
        ));
    }
    let out_row = table.dim * out_dtype.size();
    if out.len() != idx.len() * out_row {
        return Err(EngramError::Invalid(format!(
            "output holds {} bytes, expected {} rows x {} {} values",
            out.len(),
            idx.len(),
            table.dim,
            out_dtype.name()
        )));
    }
    check_separate(table, out.as_ptr(), out.len(), std::ptr::null(), 0)?;
    check_indices(idx, table.rows)?;
    if let Some(t) = table.tiered() {
        return t.gather(idx, table.rows, out, out_dtype, backend);
    }
    if idx.is_empty() {
        return Ok(());
    }
    let fast = backend == Backend::Auto && simd();
    // Same-dtype rows into a large output go out with streaming stores, whatever the output's
    // alignment (numpy arrays are usually 16 bytes off a cache line).
    let stream = fast && table.dtype == out_dtype && out.len() >= STREAM_MIN_BYTES;
    // FP8 rows convert to whole lines (64 bytes per block of 32 bf16/f16 values): into a large,
    // aligned output they go out with streaming stores too.
    let fp8_stream = fast
        && table.dtype == DType::F8E4M3
        && out.len() >= STREAM_MIN_BYTES
        && (out.as_ptr() as usize).is_multiple_of(64);
    let ahead = rows_ahead(table);
    let all_in_range = out
        .par_chunks_mut(PIECE * out_row)
        .zip(idx.par_chunks(PIECE))
        .try_for_each(|(out, idx)| {
            #[cfg(target_arch = "x86_64")]
            if stream {
                // SAFETY: `stream` implies AVX-512F/BW; `out` holds one table row per index.
                let ok = unsafe { stream::stream_piece(table, idx, out, ahead) };
                return ok.then_some(()).ok_or(());
            }
            let mut op = Convert {
                table,
                out: out.as_mut_ptr(),
                out_row,
                out_dtype,
                fast,
                nt: fp8_stream,
                scratch: vec![0f32; table.dim],
            };
            // SAFETY: `out` holds one output row per index of `idx`; `nt` implies AVX-512.
            let ok = unsafe { walk(table, idx, ahead, &mut op) };
            #[cfg(target_arch = "x86_64")]
            if fp8_stream {
                // SAFETY: `fp8_stream` implies AVX-512.
                unsafe { stream::sfence() };
            }
            ok.then_some(()).ok_or(())
        })
        .is_ok();
    if all_in_range {
        Ok(())
    } else {
        Err(changed())
    }
}

/// Copies or converts rows one at a time into an output of `out_row`-byte rows.
struct Convert<'a> {
    table: &'a HostTable,
    out: *mut u8,
    out_row: usize,
    out_dtype: DType,
    fast: bool,
    /// FP8 rows into an aligned output, with streaming stores (AVX-512).
    nt: bool,
    scratch: Vec<f32>,
}

impl RowOp for Convert<'_> {
    #[inline(always)]
    unsafe fn row(&mut self, i: usize, r: usize) {
        // SAFETY: the caller upholds this function's safety contract (documented above or
        // on the trait method): CPU features, bounds and aliasing as stated there.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(self.out.add(i * self.out_row), self.out_row);
            #[cfg(target_arch = "x86_64")]
            if self.nt {
                let t = self.table;
                let src = std::slice::from_raw_parts(t.row_ptr(r), t.row_bytes());
                let scales = std::slice::from_raw_parts(t.scale_ptr(r), t.scale_bytes());
                crate::dtype::avx512::fp8::<true>(src, scales, self.out_dtype, dst);
                return;
            }
            copy_row(
                self.table,
                r,
                dst,
                self.out_dtype,
                self.fast,
                &mut self.scratch,
            );
        }
    }
}

/// Calls `op.row(i, idx[i])` for each `i` in order, each row prefetched `ahead` indices before.
/// The indices are read once each, a chunk at a time, into a local buffer, checked there against
/// `table.rows`, and used from there only. Returns false, having stopped before the first bad
/// one, if an index is out of range (the caller's memory changed since it was checked).
///
/// # Safety
/// `op` may be called for every position of `idx` with a row below `table.rows`.
#[inline(always)]
unsafe fn walk<I: IdElem, O: RowOp>(
    table: &HostTable,
    idx: &[I],
    ahead: usize,
    op: &mut O,
) -> bool {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
        let ahead = ahead.min(MAX_AHEAD);
        let prefetch = Prefetcher::new(table);
        let rows = table.rows as u64;
        let n = idx.len();
        let mut local = [0u64; CHUNK + MAX_AHEAD];
        let mut start = 0;
        while start < n {
            let end = (start + CHUNK).min(n);
            let look = (end + ahead).min(n);
            let mut top = 0;
            for (k, slot) in (start..look).zip(local.iter_mut()) {
                // A volatile read: exactly one read of each index, whatever another thread does to
                // the memory, so the value checked below is the value used.
                let r = std::ptr::read_volatile(idx.as_ptr().add(k)).bits();
                *slot = r;
                top = top.max(r);
            }
            if top >= rows {
                return false;
            }
            let local = &local[..look - start];
            if start == 0 {
                for &r in local.iter().take(ahead) {
                    prefetch.row(r as usize);
                }
            }
            for j in 0..end - start {
                if let Some(&next) = local.get(j + ahead) {
                    prefetch.row(next as usize);
                }
                op.row(start + j, local[j] as usize);
            }
            start = end;
        }
        true
    }
}

/// Rows to prefetch ahead so that about [`LINES_IN_FLIGHT`] cache lines are in flight.
fn rows_ahead(table: &HostTable) -> usize {
    let lines = table.row_bytes().div_ceil(64) + usize::from(table.scale_bytes() > 0);
    (LINES_IN_FLIGHT / lines).clamp(2, MAX_AHEAD)
}

/// Prefetches rows of a table: its addresses and sizes read once, so that a row costs the few
/// instructions of a C loop (per-row work limits how far a core runs ahead of its misses). The
/// addresses are computed with wrapping arithmetic, so an index that was never checked cannot
/// make this undefined; a prefetch never faults.
#[derive(Clone, Copy)]
struct Prefetcher {
    values: usize,
    row: usize,
    scales: usize,
    scale_bytes: usize,
}

impl Prefetcher {
    fn new(table: &HostTable) -> Self {
        // SAFETY: `row_ptr(0)`/`scale_ptr(0)` offset by 0.
        let (values, scales) = unsafe { (table.row_ptr(0), table.scale_ptr(0)) };
        Self {
            values: values as usize,
            row: table.row_bytes(),
            scales: scales as usize,
            scale_bytes: table.scale_bytes(),
        }
    }

    /// Prefetches row `r` and its scale bytes.
    #[inline(always)]
    fn row(&self, r: usize) {
        let p = (self.values as *const u8).wrapping_add(r.wrapping_mul(self.row));
        let mut off = 0;
        while off < self.row {
            prefetch_line(p.wrapping_add(off));
            off += 64;
        }
        if self.scale_bytes > 0 {
            prefetch_line(
                (self.scales as *const u8).wrapping_add(r.wrapping_mul(self.scale_bytes)),
            );
        }
    }
}

/// Copies or converts row `r` into `dst`.
///
/// # Safety
/// `r < table.rows`; `dst` holds one output row; with `fast`, AVX-512F/BW are available.
#[inline(always)]
unsafe fn copy_row(
    table: &HostTable,
    r: usize,
    dst: &mut [u8],
    out: DType,
    fast: bool,
    scratch: &mut [f32],
) {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
        let src = std::slice::from_raw_parts(table.row_ptr(r), table.row_bytes());
        let scales: &[u8] = if table.scale_bytes() > 0 {
            std::slice::from_raw_parts(table.scale_ptr(r), table.scale_bytes())
        } else {
            &[]
        };
        if fast {
            #[cfg(target_arch = "x86_64")]
            if crate::dtype::avx512::convert(table.dtype, src, scales, out, dst) {
                return;
            }
        }
        if table.dtype == out {
            dst.copy_from_slice(src);
        } else {
            dtype::row_to_f32(table.dtype, src, scales, scratch);
            dtype::f32_to_row(out, scratch, dst);
        }
    }
}

#[cfg(test)]
mod tests;
