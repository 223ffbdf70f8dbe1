//! The AVX-512 row conversions, next to the scalar ones in `dtype` they are tested against:
//! same-dtype copies, bfloat16/float16 widening, FP8 E4M3 dequantization (straight to bfloat16
//! through a table when the block scale allows, else through f32).

use super::{DType, FP8_BLOCK};
use std::arch::x86_64::*;

/// Converts one row with AVX-512 when the pair of dtypes has a kernel; false otherwise.
///
/// # Safety
/// AVX-512F/BW available; `src`/`scales` hold one row of the table dtype, `dst` one row of
/// `out`.
#[inline(always)]
pub(crate) unsafe fn convert(
    dt: DType,
    src: &[u8],
    scales: &[u8],
    out: DType,
    dst: &mut [u8],
) -> bool {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
        match (dt, out) {
            (a, b) if a == b => copy(src, dst),
            (DType::BF16, DType::F32) => widen::<false>(src, dst),
            (DType::F16, DType::F32) => widen::<true>(src, dst),
            (DType::F8E4M3, _) => fp8::<false>(src, scales, out, dst),
            _ => return false,
        }
        true
    }
}

/// # Safety
/// AVX-512F/BW available; `dst` is at least as long as `src`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy(src: &[u8], dst: &mut [u8]) {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
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
}

/// 16-bit floats (IEEE half with `HALF`, else bfloat16) -> f32, 16 at a time.
///
/// # Safety
/// AVX-512F/BW available; `dst` holds `src.len() / 2` f32 values.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn widen<const HALF: bool>(src: &[u8], dst: &mut [u8]) {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
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
}

/// 16 E4M3 bytes -> f32 times `scale`. Normal codes are rebiased with integer arithmetic
/// (`(e + 120) << 23 | m << 20`), subnormal ones converted as `m * 2**-9`: no floating-point
/// operation ever sees a subnormal input, which would cost a microcode assist per vector.
/// `S.1111.111` is NaN.
///
/// # Safety
/// AVX-512F/BW available (inlined into kernels that enable them).
#[inline(always)]
unsafe fn dequant16(bytes: __m128i, scale: __m512) -> __m512 {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
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
}

/// f32 -> bf16 bits, round to nearest even, NaN quietened (as `dtype::f32_to_bf16`).
///
/// # Safety
/// AVX-512F/BW available (inlined into kernels that enable them).
#[inline(always)]
unsafe fn to_bf16(v: __m512) -> __m256i {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
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
///
/// # Safety
/// AVX-512F/BW available; `src` points at 32 readable bytes.
#[inline(always)]
unsafe fn fp8_block_bf16(src: *const u8, s: u8, lut: &[__m512i; 4]) -> Option<__m512i> {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
        if !(10..=246).contains(&s) {
            return None;
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
        Some(_mm512_or_si512(v, sign))
    }
}

/// Stores one line's worth of bytes at `p`: streaming (`p` 64-byte aligned) or ordinary.
///
/// # Safety
/// AVX-512F available; `p` points at 64 writable bytes, 64-byte aligned with `NT`.
#[inline(always)]
unsafe fn put<const NT: bool>(p: *mut u8, v: __m512i) {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
        if NT {
            _mm512_stream_si512(p as *mut _, v);
        } else {
            _mm512_storeu_si512(p as *mut _, v);
        }
    }
}

/// Two 32-byte halves as one 64-byte vector.
///
/// # Safety
/// AVX-512F available (inlined into kernels that enable it).
#[inline(always)]
unsafe fn halves(a: __m256i, b: __m256i) -> __m512i {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b) }
}

/// One FP8 row to `out`; with `NT`, `dst` is 64-byte aligned and every 64 bytes go out with
/// a streaming store (an FP8 block is 64 bytes of bfloat16 or float16, 128 of float32).
///
/// # Safety
/// AVX-512F/BW available; `src` and `scales` hold one FP8 row and its scale bytes, `dst`
/// one row of `out`, 64-byte aligned with `NT`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn fp8<const NT: bool>(src: &[u8], scales: &[u8], out: DType, dst: &mut [u8]) {
    // SAFETY: the caller upholds this function's safety contract (documented above or
    // on the trait method): CPU features, bounds and aliasing as stated there.
    unsafe {
        let lut: [__m512i; 4] = std::array::from_fn(|i| {
            _mm512_loadu_si512(BF16_OF_E4M3.as_ptr().add(32 * i) as *const _)
        });
        for (block, &s) in scales.iter().enumerate() {
            let i = block * FP8_BLOCK;
            let d = dst.as_mut_ptr().add(i * out.size());
            if out == DType::BF16 {
                if let Some(v) = fp8_block_bf16(src.as_ptr().add(i), s, &lut) {
                    put::<NT>(d, v);
                    continue;
                }
            }
            let scale = _mm512_set1_ps(crate::dtype::ue8m0_to_f32(s));
            let lo = dequant16(_mm_loadu_si128(src.as_ptr().add(i) as *const _), scale);
            let hi = dequant16(_mm_loadu_si128(src.as_ptr().add(i + 16) as *const _), scale);
            match out {
                DType::F32 => {
                    put::<NT>(d, _mm512_castps_si512(lo));
                    put::<NT>(d.add(64), _mm512_castps_si512(hi));
                }
                DType::BF16 => put::<NT>(d, halves(to_bf16(lo), to_bf16(hi))),
                _ => {
                    const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                    put::<NT>(
                        d,
                        halves(_mm512_cvtps_ph::<R>(lo), _mm512_cvtps_ph::<R>(hi)),
                    )
                }
            }
        }
    }
}
