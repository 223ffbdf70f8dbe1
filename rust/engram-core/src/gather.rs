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
use crate::error::{EngramError, Result};
use crate::hashing::{Backend, IdElem};
use crate::table::{ranges_overlap, HostTable};
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
fn changed() -> EngramError {
    EngramError::Invalid(
        "the index array changed during the gather (another thread wrote it), which stopped \
         with out partly written: do not modify the indices until the call returns"
            .into(),
    )
}

/// Checks every index against `rows`; the error names the first bad one.
pub fn check_indices<I: IdElem>(idx: &[I], rows: usize) -> Result<()> {
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
                let ok = unsafe { avx512::stream_piece(table, idx, out, ahead) };
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
                unsafe { avx512::sfence() };
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

/// Reads every cache line of rows `idx` (and of their scales), prefetched and split over
/// threads the way [`gather`] does, but writes nothing: how fast this machine reads the rows.
/// Returns a fold of the bytes read (so the reads cannot be optimized away).
pub fn read_rows<I: IdElem>(table: &HostTable, idx: &[I]) -> Result<u64> {
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{HostTable, IdElem, RowOp};
    use std::arch::x86_64::*;

    /// Copies same-dtype rows of one piece into `out` with streaming stores for every whole,
    /// aligned cache line of `out`: a line shared by two rows is assembled in a register (the
    /// end of one row, then the start of the next, masked loads) and streamed once complete.
    /// The partial lines at the piece's two ends (whose other bytes belong to another piece, or
    /// to memory outside `out`) get ordinary masked stores. Returns false as [`super::walk`].
    ///
    /// # Safety
    /// AVX-512F/BW available; `out` holds one table row per index.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn stream_piece<I: IdElem>(
        table: &HostTable,
        idx: &[I],
        out: &mut [u8],
        ahead: usize,
    ) -> bool {
        // SAFETY: the caller upholds this function's safety contract (documented above or
        // on the trait method): CPU features, bounds and aliasing as stated there.
        unsafe {
            let (row, off) = (table.row_bytes(), out.as_ptr() as usize % 64);
            let ok = if row.is_multiple_of(64) && off.is_multiple_of(2) {
                // Whole-line rows, every one `off` bytes past a line (0 included; a numpy output
                // is usually 16 bytes off): a short path, a few instructions a row.
                let mut op = Shifted {
                    values: table.row_ptr(0),
                    out: out.as_mut_ptr(),
                    row,
                    off,
                    window: _mm512_add_epi16(
                        _mm512_loadu_si512(IOTA16.as_ptr() as *const _),
                        _mm512_set1_epi16((32 - off / 2) as i16),
                    ),
                    prev_last: _mm512_setzero_si512(),
                    done: 0,
                };
                let ok = super::walk(table, idx, ahead, &mut op);
                if op.done > 0 {
                    // The last row's end: the first `off` bytes of the line after the piece.
                    let v =
                        _mm512_permutex2var_epi16(op.prev_last, op.window, _mm512_setzero_si512());
                    let at = op.out.add(op.done * row).sub(off);
                    _mm512_mask_storeu_epi8(at as *mut _, (1u64 << off) - 1, v);
                }
                ok
            } else {
                let mut op = Stream {
                    values: table.row_ptr(0),
                    out: out.as_mut_ptr(),
                    row,
                    line: _mm512_setzero_si512(),
                    line_at: out.as_mut_ptr(),
                    have: 0,
                };
                let ok = super::walk(table, idx, ahead, &mut op);
                if op.have != 0 {
                    _mm512_mask_storeu_epi8(op.line_at as *mut _, op.have, op.line);
                }
                ok
            };
            // Streaming stores are weakly ordered: fence them before rayon reports the piece done.
            _mm_sfence();
            ok
        }
    }

    /// The state of [`stream_piece`] (`values`: the table's row 0): `line` holds the bytes
    /// (mask `have`) of the output line at `line_at` that the rows written so far have filled.
    struct Stream {
        values: *const u8,
        out: *mut u8,
        row: usize,
        line: __m512i,
        line_at: *mut u8,
        have: u64,
    }

    /// [`stream_piece`] for rows of whole lines into an output `off` (even) bytes past a line:
    /// output line 0 of a row is the previous row's last `off` bytes then the row's
    /// first `64 - off` (one two-register permute, `window`: lane `j` takes lane
    /// `j + 32 - off / 2` of `prev_last` then the row's first 64 bytes); its other lines are
    /// single unaligned loads inside the row. The piece's first and last partial lines get
    /// masked ordinary stores.
    struct Shifted {
        values: *const u8,
        out: *mut u8,
        row: usize,
        off: usize,
        window: __m512i,
        /// The last 64 bytes of the previous row.
        prev_last: __m512i,
        /// Rows written.
        done: usize,
    }

    impl RowOp for Shifted {
        #[inline(always)]
        unsafe fn row(&mut self, i: usize, r: usize) {
            // SAFETY: the caller upholds this function's safety contract (documented above or
            // on the trait method): CPU features, bounds and aliasing as stated there.
            unsafe {
                let (s, row, off) = (self.values.add(r * self.row), self.row, self.off);
                // The line holding the row's first byte; for the piece's first row it starts
                // before `out`, so only masked stores use it.
                let line0 = self.out.add(i * row).wrapping_sub(off);
                let first = _mm512_loadu_si512(s as *const _);
                let v = _mm512_permutex2var_epi16(self.prev_last, self.window, first);
                if i == 0 {
                    _mm512_mask_storeu_epi8(line0 as *mut _, u64::MAX << off, v);
                } else {
                    _mm512_stream_si512(line0 as *mut _, v);
                }
                let mut k = 64;
                while k < row {
                    _mm512_stream_si512(
                        line0.wrapping_add(k) as *mut _,
                        _mm512_loadu_si512(s.add(k - off) as *const _),
                    );
                    k += 64;
                }
                self.prev_last = _mm512_loadu_si512(s.add(row - 64) as *const _);
                self.done = i + 1;
            }
        }
    }

    /// 0, 1, ..., 31 as 16-bit lanes.
    static IOTA16: [u16; 32] = {
        let mut v = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            v[i] = i as u16;
            i += 1;
        }
        v
    };

    impl RowOp for Stream {
        #[inline(always)]
        unsafe fn row(&mut self, i: usize, r: usize) {
            // SAFETY: the caller upholds this function's safety contract (documented above or
            // on the trait method): CPU features, bounds and aliasing as stated there.
            unsafe {
                let (s, d, row) = (
                    self.values.add(r * self.row),
                    self.out.add(i * self.row),
                    self.row,
                );
                let mut k = 0;
                let off = d as usize & 63;
                if off != 0 {
                    // The row starts inside a line: its first bytes join the pending line (begun by
                    // the previous row, or empty at the piece's start). The load is shifted back by
                    // `off` so bytes land at their line positions; masked-off bytes are not read.
                    if self.have == 0 {
                        // May lie before `out` (the piece's first line): only masked stores use it.
                        self.line_at = d.wrapping_sub(off);
                    }
                    let n = (64 - off).min(row);
                    let mask = ((1u64 << n) - 1) << off;
                    let head = if off.is_multiple_of(2) {
                        // Load the row's first bytes where they are and move them up by `off` bytes
                        // (16-bit lanes): no byte outside the row is touched, where a shifted load
                        // would reach into the line before the row (another row, not prefetched).
                        let from = _mm512_sub_epi16(
                            _mm512_loadu_si512(IOTA16.as_ptr() as *const _),
                            _mm512_set1_epi16((off / 2) as i16),
                        );
                        let bytes = _mm512_maskz_loadu_epi8((1u64 << n) - 1, s as *const _);
                        _mm512_permutexvar_epi16(from, bytes)
                    } else {
                        // Odd offsets (byte outputs from Rust only): a load shifted back by `off`,
                        // whose masked-off bytes are not read.
                        _mm512_maskz_loadu_epi8(mask, s.wrapping_sub(off) as *const _)
                    };
                    self.line = _mm512_mask_mov_epi8(self.line, mask, head);
                    self.have |= mask;
                    k = n;
                    if off + n == 64 {
                        if self.have == u64::MAX {
                            _mm512_stream_si512(self.line_at as *mut _, self.line);
                        } else {
                            _mm512_mask_storeu_epi8(self.line_at as *mut _, self.have, self.line);
                        }
                        self.have = 0;
                    }
                }
                // `d + k` is line-aligned from here on (or the row is done).
                while k + 64 <= row {
                    _mm512_stream_si512(
                        d.add(k) as *mut _,
                        _mm512_loadu_si512(s.add(k) as *const _),
                    );
                    k += 64;
                }
                if k < row {
                    let mask = (1u64 << (row - k)) - 1;
                    self.line = _mm512_maskz_loadu_epi8(mask, s.add(k) as *const _);
                    self.line_at = d.add(k);
                    self.have = mask;
                }
            }
        }
    }

    /// Fences the streaming stores of one piece before it is reported done.
    ///
    /// # Safety
    /// AVX-512F available (SSE's fence; only the target feature makes it unsafe).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sfence() {
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
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
        storage[..start].iter().all(|&b| b == 0xA5)
            && storage[start + len..].iter().all(|&b| b == 0xA5)
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
                        assert!(unsafe { avx512::stream_piece(&table, &idx, out, 5) });
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
                            assert!(unsafe { avx512::stream_piece(&table, i, o, 3) });
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
                assert!(!unsafe { avx512::stream_piece(&table, &idx, &mut out, 4) });
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
        assert!(
            check_separate(&table, other.as_ptr(), 8, other.as_ptr().wrapping_add(8), 8).is_ok()
        );
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
}
