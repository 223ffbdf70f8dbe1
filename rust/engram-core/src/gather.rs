//! Row gathers from host tables: `out[i] = table[idx[i]]`, converted to the output dtype.
//!
//! Rows are split over rayon threads; each thread prefetches the rows it will need a few
//! iterations ahead (random rows miss every cache level, so overlapping the misses is what sets
//! the throughput), then copies or converts with AVX-512 where the CPU has it. Indices are all
//! checked before anything is written. A scalar path, selected with `Backend::Scalar`, is the
//! reference the SIMD path is tested against.

use crate::dtype::{self, DType, FP8_BLOCK};
use crate::error::{EngramError, Result};
use crate::hashing::{Backend, IdElem};
use crate::table::HostTable;
use rayon::prelude::*;

/// Rows per unit of parallel work.
const CHUNK: usize = 512;
/// Cache lines a thread keeps in flight through prefetches (about what its fill buffers and the
/// L2 queue hold); the rows-ahead distance follows from the row size.
const LINES_IN_FLIGHT: usize = 64;
/// Outputs at least this large are written with streaming stores when the layout allows.
const STREAM_MIN_BYTES: usize = 8 << 20;

fn simd() -> bool {
    crate::cpu::avx512()
}

/// Checks every index against `rows`; the error names the first bad one.
pub fn check_indices<I: IdElem>(idx: &[I], rows: usize) -> Result<()> {
    let bad = idx
        .par_chunks(1 << 16)
        .any(|c| c.iter().any(|v| v.bits() >= rows as u64));
    if bad {
        let index = idx
            .iter()
            .position(|v| v.bits() >= rows as u64)
            .expect("a bad index");
        return Err(EngramError::IndexOutOfRange {
            value: idx[index].wide(),
            index,
            rows,
        });
    }
    Ok(())
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
    check_indices(idx, table.rows)?;
    if idx.is_empty() {
        return Ok(());
    }
    let fast = backend == Backend::Auto && simd();
    // Same-dtype rows of whole cache lines into a large, 64-byte aligned output go out with
    // streaming stores: no read-for-ownership of output lines that will not be read back soon.
    let stream = fast
        && table.dtype == out_dtype
        && out_row.is_multiple_of(64)
        && out.len() >= STREAM_MIN_BYTES
        && (out.as_ptr() as usize).is_multiple_of(64);
    let ahead = rows_ahead(table);
    out.par_chunks_mut(CHUNK * out_row)
        .zip(idx.par_chunks(CHUNK))
        .for_each(|(out, idx)| {
            #[cfg(target_arch = "x86_64")]
            if stream {
                // SAFETY: indices checked above; `stream` implies AVX-512 and 64-byte aligned
                // whole-line rows of the table's own dtype.
                unsafe { avx512::gather_lines(table, idx, out, ahead) };
                return;
            }
            let mut scratch = vec![0f32; table.dim];
            let mut rows_out = out.chunks_exact_mut(out_row);
            for_each_prefetched(table, idx, ahead, |r| {
                let dst = rows_out.next().expect("one output row per index");
                // SAFETY: every index was checked against `table.rows` above.
                unsafe { copy_row(table, r, dst, out_dtype, fast, &mut scratch) };
            });
        });
    Ok(())
}

/// Reads every cache line of rows `idx` (and of their scales) the way [`gather`] does, prefetched
/// as far ahead, on the same threads, but writes nothing: the random-read rate this machine gives,
/// the ceiling any gather of these rows approaches. Returns a fold of the bytes read (so the
/// reads cannot be optimized away).
pub fn read_rows<I: IdElem>(table: &HostTable, idx: &[I]) -> Result<u64> {
    check_indices(idx, table.rows)?;
    let ahead = rows_ahead(table);
    let fold = idx
        .par_chunks(CHUNK)
        .map(|idx| {
            let mut acc = 0u64;
            for_each_prefetched(table, idx, ahead, |r| {
                // SAFETY: every index was checked against `table.rows` above; each read stays
                // inside the row (or its scales).
                unsafe {
                    let p = table.row_ptr(r);
                    for off in (0..table.row_bytes()).step_by(64) {
                        acc = acc.rotate_left(1) ^ std::ptr::read_volatile(p.add(off)) as u64;
                    }
                    if table.scale_bytes() > 0 {
                        acc ^= std::ptr::read_volatile(table.scale_ptr(r)) as u64;
                    }
                }
            });
            acc
        })
        .reduce(|| 0, |a, b| a ^ b);
    Ok(fold)
}

/// Rows to prefetch ahead so that about [`LINES_IN_FLIGHT`] cache lines are in flight.
fn rows_ahead(table: &HostTable) -> usize {
    let lines = table.row_bytes().div_ceil(64) + usize::from(table.scale_bytes() > 0);
    (LINES_IN_FLIGHT / lines).clamp(2, 16)
}

/// Calls `f(row)` for each row of `idx` in order, each after prefetching the row `ahead`
/// indices further on.
#[inline(always)]
fn for_each_prefetched<I: IdElem>(
    table: &HostTable,
    idx: &[I],
    ahead: usize,
    mut f: impl FnMut(usize),
) {
    for &r in idx.iter().take(ahead) {
        prefetch_row(table, r.bits() as usize);
    }
    for (i, &r) in idx.iter().enumerate() {
        if let Some(&next) = idx.get(i + ahead) {
            prefetch_row(table, next.bits() as usize);
        }
        f(r.bits() as usize);
    }
}

#[inline(always)]
fn prefetch_row(table: &HostTable, r: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: `r` was checked against `table.rows`; prefetching never faults anyway.
        unsafe {
            let p = table.row_ptr(r);
            for off in (0..table.row_bytes()).step_by(64) {
                _mm_prefetch(p.add(off) as *const i8, _MM_HINT_T0);
            }
            if table.scale_bytes() > 0 {
                _mm_prefetch(table.scale_ptr(r) as *const i8, _MM_HINT_T0);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (table, r);
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
    let src = std::slice::from_raw_parts(table.row_ptr(r), table.row_bytes());
    let scales: &[u8] = if table.scale_bytes() > 0 {
        std::slice::from_raw_parts(table.scale_ptr(r), table.scale_bytes())
    } else {
        &[]
    };
    #[cfg(target_arch = "x86_64")]
    if fast && avx512::convert(table.dtype, src, scales, out, dst) {
        return;
    }
    let _ = fast;
    if table.dtype == out {
        dst.copy_from_slice(src);
    } else {
        dtype::row_to_f32(table.dtype, src, scales, scratch);
        dtype::f32_to_row(out, scratch, dst);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{DType, HostTable, IdElem, FP8_BLOCK};
    use std::arch::x86_64::*;

    /// Converts one row with AVX-512 when the pair of dtypes has a kernel; false otherwise.
    ///
    /// # Safety
    /// AVX-512F/BW available; `src`/`scales` hold one row of the table dtype, `dst` one row of
    /// `out`.
    #[inline(always)]
    pub(super) unsafe fn convert(
        dt: DType,
        src: &[u8],
        scales: &[u8],
        out: DType,
        dst: &mut [u8],
    ) -> bool {
        match (dt, out) {
            (a, b) if a == b => copy(src, dst),
            (DType::BF16, DType::F32) => widen::<false>(src, dst),
            (DType::F16, DType::F32) => widen::<true>(src, dst),
            (DType::F8E4M3, _) => fp8(src, scales, out, dst),
            _ => return false,
        }
        true
    }

    /// Same-dtype rows of whole cache lines into a 64-byte aligned `out`: prefetch `ahead` rows
    /// in advance, copy with streaming stores (no read-for-ownership of output lines), fence.
    ///
    /// # Safety
    /// AVX-512F available; indices checked against `table.rows`; `out` 64-byte aligned, one
    /// table row per index, rows a multiple of 64 bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn gather_lines<I: IdElem>(
        table: &HostTable,
        idx: &[I],
        out: &mut [u8],
        ahead: usize,
    ) {
        let row = table.row_bytes();
        let prefetch = |r: I| {
            let p = table.row_ptr(r.bits() as usize);
            for off in (0..row).step_by(64) {
                _mm_prefetch(p.add(off) as *const i8, _MM_HINT_T0);
            }
        };
        for &r in idx.iter().take(ahead) {
            prefetch(r);
        }
        let d = out.as_mut_ptr();
        for (i, &r) in idx.iter().enumerate() {
            if let Some(&next) = idx.get(i + ahead) {
                prefetch(next);
            }
            let (src, dst) = (table.row_ptr(r.bits() as usize), d.add(i * row));
            for off in (0..row).step_by(64) {
                _mm512_stream_si512(
                    dst.add(off) as *mut _,
                    _mm512_loadu_si512(src.add(off) as *const _),
                );
            }
        }
        // Streaming stores are weakly ordered: fence them before rayon reports the chunk done.
        _mm_sfence();
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn copy(src: &[u8], dst: &mut [u8]) {
        let n = src.len();
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 64 <= n {
            _mm512_storeu_si512(d.add(i) as *mut _, _mm512_loadu_si512(s.add(i) as *const _));
            i += 64;
        }
        if i < n {
            let mask = (1u64 << (n - i)) - 1;
            _mm512_mask_storeu_epi8(
                d.add(i) as *mut _,
                mask,
                _mm512_maskz_loadu_epi8(mask, s.add(i) as *const _),
            );
        }
    }

    /// 16-bit floats (IEEE half with `HALF`, else bfloat16) -> f32, 16 at a time.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn widen<const HALF: bool>(src: &[u8], dst: &mut [u8]) {
        let n = src.len() / 2;
        let (s, d) = (src.as_ptr() as *const u16, dst.as_mut_ptr() as *mut f32);
        let mut i = 0;
        while i < n {
            let k = (n - i).min(16);
            let mask = ((1u32 << k) - 1) as u16;
            let v = _mm256_maskz_loadu_epi16(mask, s.add(i) as *const _);
            let w = if HALF {
                _mm512_cvtph_ps(v)
            } else {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
            };
            _mm512_mask_storeu_ps(d.add(i), mask, w);
            i += 16;
        }
    }

    /// 16 E4M3 bytes -> f32 times `scale`. Normal codes are rebiased with integer arithmetic
    /// (`(e + 120) << 23 | m << 20`), subnormal ones converted as `m * 2**-9`: no floating-point
    /// operation ever sees a subnormal input, which would cost a microcode assist per vector.
    /// `S.1111.111` is NaN.
    #[inline(always)]
    unsafe fn dequant16(bytes: __m128i, scale: __m512) -> __m512 {
        let b = _mm512_cvtepu8_epi32(bytes);
        let mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
        let normal = _mm512_add_epi32(_mm512_slli_epi32::<20>(mag), _mm512_set1_epi32(120 << 23));
        let sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0 / 512.0));
        let is_sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
        let v = _mm512_mask_mov_ps(_mm512_castsi512_ps(normal), is_sub, sub);
        let nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F));
        let v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(f32::NAN));
        let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(b, _mm512_set1_epi32(0x80)));
        let v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
        // NaN codes stay themselves (see `dtype::dequant`).
        _mm512_mask_mov_ps(_mm512_mul_ps(v, scale), nan, v)
    }

    /// f32 -> bf16 bits, round to nearest even, NaN quietened (as `dtype::f32_to_bf16`).
    #[inline(always)]
    unsafe fn to_bf16(v: __m512) -> __m256i {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            bits,
            _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)),
        ));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet))
    }

    /// bfloat16 bits of each E4M3 magnitude code (scale 1); 0x7F (NaN) is patched later.
    const BF16_OF_E4M3: [u16; 128] = {
        let mut lut = [0u16; 128];
        let mut code = 1;
        while code < 127 {
            let (e, m) = (code >> 3, (code & 7) as u16);
            lut[code] = if e > 0 {
                ((e as u16 + 120) << 7) | (m << 4)
            } else {
                // m * 2**-9: normalise the 3-bit mantissa.
                let top = 15 - m.leading_zeros() as u16; // 0..=2
                ((118 + top) << 7) | (((m << (3 - top)) & 7) << 4)
            };
            code += 1;
        }
        lut
    };

    /// One block of 32 E4M3 values straight to bfloat16: e4m3 * 2**k is exact in bfloat16, so
    /// the result is the table entry with `k = s - 127` added to its exponent field (zero codes
    /// excepted). Valid while every exponent stays normal: 118 + k >= 1 and 135 + k <= 254.
    #[inline(always)]
    unsafe fn fp8_block_bf16(src: *const u8, s: u8, lut: &[__m512i; 4], dst: *mut u8) -> bool {
        if !(10..=246).contains(&s) {
            return false;
        }
        let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(src as *const _));
        let mag = _mm512_and_si512(w, _mm512_set1_epi16(0x7F));
        let lo = _mm512_permutex2var_epi16(lut[0], mag, lut[1]);
        let hi = _mm512_permutex2var_epi16(lut[2], mag, lut[3]);
        let v =
            _mm512_mask_blend_epi16(_mm512_test_epi16_mask(mag, _mm512_set1_epi16(0x40)), lo, hi);
        let nonzero = _mm512_test_epi16_mask(mag, mag);
        let v = _mm512_mask_add_epi16(v, nonzero, v, _mm512_set1_epi16(((s as i16) - 127) << 7));
        let nan = _mm512_cmpeq_epi16_mask(mag, _mm512_set1_epi16(0x7F));
        let v = _mm512_mask_mov_epi16(v, nan, _mm512_set1_epi16(0x7FC0));
        let sign = _mm512_slli_epi16::<8>(_mm512_and_si512(w, _mm512_set1_epi16(0x80)));
        _mm512_storeu_si512(dst as *mut _, _mm512_or_si512(v, sign));
        true
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fp8(src: &[u8], scales: &[u8], out: DType, dst: &mut [u8]) {
        let lut: [__m512i; 4] = std::array::from_fn(|i| {
            _mm512_loadu_si512(BF16_OF_E4M3.as_ptr().add(32 * i) as *const _)
        });
        for (block, &s) in scales.iter().enumerate() {
            let i = block * FP8_BLOCK;
            if out == DType::BF16
                && fp8_block_bf16(src.as_ptr().add(i), s, &lut, dst.as_mut_ptr().add(i * 2))
            {
                continue;
            }
            let scale = _mm512_set1_ps(crate::dtype::ue8m0_to_f32(s));
            for half in 0..FP8_BLOCK / 16 {
                let i = i + half * 16;
                let v = dequant16(_mm_loadu_si128(src.as_ptr().add(i) as *const _), scale);
                match out {
                    DType::F32 => _mm512_storeu_ps(dst.as_mut_ptr().add(i * 4) as *mut f32, v),
                    DType::BF16 => {
                        _mm256_storeu_si256(dst.as_mut_ptr().add(i * 2) as *mut _, to_bf16(v))
                    }
                    _ => _mm256_storeu_si256(
                        dst.as_mut_ptr().add(i * 2) as *mut _,
                        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn large_aligned_outputs_take_the_streaming_path_exactly() {
        // Copies (streaming stores) and every conversion, against the scalar path.
        let (rows, dim) = (5000, 64);
        let mut bytes: Vec<u8> = (0..rows * dim * 4).map(|i| (i * 131 % 251) as u8).collect();
        // Every scale byte, so FP8 blocks take both the table path and the f32 path.
        let mut scales: Vec<u8> = (0..rows * dim / FP8_BLOCK)
            .map(|i| (i % 256) as u8)
            .collect();
        for dt in [DType::F32, DType::F16, DType::BF16, DType::F8E4M3] {
            let table = table_of(dt, rows, dim, &mut bytes, &mut scales);
            for out in [DType::F32, DType::F16, DType::BF16] {
                let row = dim * out.size();
                let n = STREAM_MIN_BYTES / row + 1000;
                let idx: Vec<i32> = (0..n).map(|i| (i * 7919 % rows) as i32).collect();
                let buf = crate::buffer::AlignedBuf::new(n * row).unwrap();
                // SAFETY: the buffer holds n * row bytes and lives to the end of the iteration.
                let fast = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), n * row) };
                let mut slow = vec![0u8; n * row];
                gather(&table, &idx, fast, out, Backend::Auto).unwrap();
                gather(&table, &idx, &mut slow, out, Backend::Scalar).unwrap();
                assert!(fast[..] == slow[..], "{dt:?} -> {out:?}");
            }
        }
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
