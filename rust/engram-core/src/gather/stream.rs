//! Streaming (non-temporal) stores of same-dtype rows into large outputs (AVX-512).

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
                let v = _mm512_permutex2var_epi16(op.prev_last, op.window, _mm512_setzero_si512());
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
                _mm512_stream_si512(d.add(k) as *mut _, _mm512_loadu_si512(s.add(k) as *const _));
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
