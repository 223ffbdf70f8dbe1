//! The AVX-512 hashing kernels: eight heads reduced at once in f64 lanes (see `reduce8`), eight
//! tokens' mixes per vector, one kernel per n-gram size 2..=4 and a generic one above.

use super::{for_each_mix, LayerPlan, OutElem};
use std::arch::x86_64::*;

/// Dispatches to a kernel specialised for the n-gram size, so that the orders of one token
/// are unrolled into independent instruction streams.
///
/// # Safety
/// AVX-512F/DQ available; `h % 8 == 0`; `scratch` holds `n - 1` history ids then one id per
/// output row of `(n - 1) * h` values in `out`; with `stream`, `out` is 64-byte aligned.
#[target_feature(enable = "avx512f,avx512dq")]
pub(super) unsafe fn hash_layer<O: OutElem>(
    plan: &LayerPlan,
    n: usize,
    h: usize,
    scratch: &[i64],
    out: &mut [O],
    flat: bool,
    stream: bool,
) {
    macro_rules! arms {
        ($($n:literal),*) => {
            match (n, flat, stream) {
                $(
                    ($n, false, false) => hash_layer_n::<$n, false, false, O>(plan, h, scratch, out),
                    ($n, true, false) => hash_layer_n::<$n, true, false, O>(plan, h, scratch, out),
                    ($n, false, true) => hash_layer_n::<$n, false, true, O>(plan, h, scratch, out),
                    ($n, true, true) => hash_layer_n::<$n, true, true, O>(plan, h, scratch, out),
                )*
                _ => hash_layer_any(plan, n, h, scratch, out, flat),
            }
        };
    }
    // SAFETY: every arm has this function's contract, forwarded unchanged.
    unsafe { arms!(2, 3, 4) }
}

/// Eight heads at once, entirely in f64 lanes (no 64-bit integer multiply, whose latency
/// dominated). `mix = hi + lo` with `hi` its bits above 32 and `lo` the 32 below, both exact
/// in f64; `x = fl(mix)` estimates the quotient `q = trunc(x * inv)` with `inv` rounded
/// *below* `1/p` (see `LayerPlan::inverse`): the relative error stays within
/// `[-2**-49, 0)`, so with `mix < 2**63` and `p >= 2**14` (quotient `< 2**49`) `q` is
/// `floor(mix / p)` or one less. `hi - q*p` is an integer below `2**53` in magnitude, which
/// the fused multiply-add gives exactly; adding `lo` gives `mix - q*p` in `[0, 2p)`, and one
/// conditional subtraction makes it exact.
///
/// # Safety
/// AVX-512F/DQ available; `c + 8 <= cols`; `dst` points at 8 writable outputs (aligned to
/// their size times 8 with `STREAM`).
#[inline(always)]
unsafe fn reduce8<const FLAT: bool, const STREAM: bool, O: OutElem>(
    plan: &LayerPlan,
    c: usize,
    mix: i64,
    dst: *mut O,
) {
    let hi = (mix & !0xFFFF_FFFF) as f64;
    let lo = (mix & 0xFFFF_FFFF) as f64;
    // SAFETY: this function's contract, forwarded unchanged.
    unsafe { reduce8_parts::<FLAT, STREAM, O>(plan, c, hi + lo, hi, lo, dst) };
}

/// `reduce8` with the f64 parts of `mix` already computed (`x = hi + lo` rounded).
///
/// # Safety
/// As [`reduce8`].
#[inline(always)]
unsafe fn reduce8_parts<const FLAT: bool, const STREAM: bool, O: OutElem>(
    plan: &LayerPlan,
    c: usize,
    x: f64,
    hi: f64,
    lo: f64,
    dst: *mut O,
) {
    // SAFETY: AVX-512F/DQ are available (this function is inlined into `#[target_feature]`
    // kernels and its contract requires them); the caller guarantees `c + 8 <= cols` (`h % 8
    // == 0`, checked in `simd_ok`), so the per-column vectors, which hold `cols` elements, have
    // 8 values at `c`; `dst` points at 8 writable outputs, aligned for the streaming stores
    // when `STREAM` is set.
    unsafe {
        let p = _mm512_loadu_pd(plan.primes_f.as_ptr().add(c));
        let inv = _mm512_loadu_pd(plan.inverse.as_ptr().add(c));
        let q = _mm512_roundscale_pd::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm512_mul_pd(
            _mm512_set1_pd(x),
            inv,
        ));
        let r = _mm512_fnmadd_pd(q, p, _mm512_set1_pd(hi));
        let mut r = _mm512_add_pd(r, _mm512_set1_pd(lo));
        r = _mm512_mask_sub_pd(r, _mm512_cmp_pd_mask::<_CMP_GE_OQ>(r, p), r, p);
        if FLAT {
            r = _mm512_add_pd(r, _mm512_loadu_pd(plan.offsets_f.as_ptr().add(c)));
        }
        // Streaming stores skip the read-for-ownership of output lines that will not be read
        // back soon; `STREAM` is only set when `dst` is 32 (i32) or 64 (i64) byte aligned.
        match (O::IS_I32, STREAM) {
            (true, false) => _mm256_storeu_si256(dst as *mut __m256i, _mm512_cvttpd_epi32(r)),
            (true, true) => _mm256_stream_si256(dst as *mut __m256i, _mm512_cvttpd_epi32(r)),
            (false, false) => _mm512_storeu_si512(dst as *mut _, _mm512_cvttpd_epi64(r)),
            (false, true) => _mm512_stream_si512(dst as *mut _, _mm512_cvttpd_epi64(r)),
        }
    }
}

/// `scratch` holds `N - 1` history ids then one id per output row of `(N - 1) * h` values.
///
/// # Safety
/// As [`hash_layer`] with `n = N`.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn hash_layer_n<const N: usize, const FLAT: bool, const STREAM: bool, O: OutElem>(
    plan: &LayerPlan,
    h: usize,
    scratch: &[i64],
    out: &mut [O],
) {
    const LANES: usize = 8;
    let cols = (N - 1) * h;
    let mut m = [0i64; N];
    m.copy_from_slice(&plan.multipliers[..N]);
    // Eight tokens per step: their mixes and f64 parts are computed in one vector each (ids
    // and multipliers keep every product below 2**63, so the low 64 bits are the product;
    // `hi` and `lo` convert exactly, `x = hi + lo` rounds as the scalar sum does). The
    // reductions of different tokens are independent chains the core overlaps.
    let mv: [__m512i; N] = std::array::from_fn(|k| _mm512_set1_epi64(m[k]));
    let (hi_mask, lo_mask) = (
        _mm512_set1_epi64(!0xFFFF_FFFF),
        _mm512_set1_epi64(0xFFFF_FFFF),
    );
    let mut blocks = out.chunks_exact_mut(cols * LANES);
    let mut t = 0;
    for block in &mut blocks {
        // SAFETY: token t + i reads scratch[t + i .. t + i + N], inside the scratch, which
        // holds N - 1 ids more than there are output rows.
        let window = |k: usize| unsafe {
            _mm512_loadu_si512(scratch.as_ptr().add(t + N - 1 - k) as *const _)
        };
        let mut mix = _mm512_mullo_epi64(window(0), mv[0]);
        let (mut xs, mut his, mut los) =
            ([[0f64; LANES]; N], [[0f64; LANES]; N], [[0f64; LANES]; N]);
        for k in 1..N {
            mix = _mm512_xor_si512(mix, _mm512_mullo_epi64(window(k), mv[k]));
            let hi = _mm512_cvtepi64_pd(_mm512_and_si512(mix, hi_mask));
            let lo = _mm512_cvtepi64_pd(_mm512_and_si512(mix, lo_mask));
            // SAFETY: each destination is a local array of 8 f64.
            unsafe {
                _mm512_storeu_pd(his[k].as_mut_ptr(), hi);
                _mm512_storeu_pd(los[k].as_mut_ptr(), lo);
                _mm512_storeu_pd(xs[k].as_mut_ptr(), _mm512_add_pd(hi, lo));
            }
        }
        let dst = block.as_mut_ptr();
        for i in 0..LANES {
            for k in 1..N {
                for c in ((k - 1) * h..k * h).step_by(8) {
                    // SAFETY: `c + 8 <= cols` columns of row `i` of this block of 8 rows;
                    // alignment as this function's contract says.
                    unsafe {
                        reduce8_parts::<FLAT, STREAM, O>(
                            plan,
                            c,
                            xs[k][i],
                            his[k][i],
                            los[k][i],
                            dst.add(i * cols + c),
                        )
                    };
                }
            }
        }
        t += LANES;
    }
    for row in blocks.into_remainder().chunks_exact_mut(cols) {
        let dst = row.as_mut_ptr();
        for_each_mix(&scratch[t..t + N], &m, |k, mix| {
            for c in ((k - 1) * h..k * h).step_by(8) {
                // SAFETY: as in the vector loop: `c + 8 <= cols` columns of this row.
                unsafe { reduce8::<FLAT, STREAM, O>(plan, c, mix, dst.add(c)) };
            }
        });
        t += 1;
    }
}

/// Any n-gram size, one token at a time.
///
/// # Safety
/// As [`hash_layer`] without streaming.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn hash_layer_any<O: OutElem>(
    plan: &LayerPlan,
    n: usize,
    h: usize,
    scratch: &[i64],
    out: &mut [O],
    flat: bool,
) {
    let cols = (n - 1) * h;
    for (t, row) in out.chunks_exact_mut(cols).enumerate() {
        let dst = row.as_mut_ptr();
        for_each_mix(&scratch[t..t + n], &plan.multipliers, |k, mix| {
            for c in ((k - 1) * h..k * h).step_by(8) {
                // SAFETY: `c + 8 <= cols` (h % 8 == 0) columns of this row.
                unsafe {
                    if flat {
                        reduce8::<true, false, O>(plan, c, mix, dst.add(c));
                    } else {
                        reduce8::<false, false, O>(plan, c, mix, dst.add(c));
                    }
                }
            }
        });
    }
}
