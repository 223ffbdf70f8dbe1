//! The step's gradients: finiteness, the overflow-free bound of their sums, and the coalesced
//! squares the global norm clip needs.

use super::*;

/// The bits of `f32::INFINITY`: an `|x|` bit pattern at or above it is an infinity or a NaN.
pub(super) const F32_INF_BITS: u32 = 0x7f80_0000;

/// Refuses a gradient multiplier or a clipping norm that is not a finite number above 0.
pub(super) fn validate_options(opt: &Optimizer, opts: &StepOptions) -> Result<()> {
    let g = opts.grad_scale;
    if !(g > 0.0 && g.is_finite() && (g as f32).is_finite() && g as f32 > 0.0) {
        return Err(EngramError::Invalid(format!(
            "{}: grad_scale = {g} is invalid: it must be a finite number above 0 (in float32)",
            opt.name()
        )));
    }
    if let Some(m) = opts.max_grad_norm {
        if !(m > 0.0 && m.is_finite()) {
            return Err(EngramError::Invalid(format!(
                "{}: max_grad_norm = {m} is invalid: it must be a finite number above 0 (or \
                 None for no clipping)",
                opt.name()
            )));
        }
    }
    Ok(())
}

/// The largest `|x|` of `grads` as bits (sign cleared): a NaN or an infinity gives
/// [`F32_INF_BITS`] or more. Integer lanes, so a NaN cannot be skipped by a float `max`.
pub(super) fn max_abs_bits(grads: &[f32], simd: Simd) -> u32 {
    grads
        .par_chunks(1 << 16)
        .map(|c| match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F is there (`Simd::detect`, or a test that checked it).
            Simd::Avx512 => unsafe { max_abs_bits_avx512(c) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is there (as above).
            Simd::Avx2 => unsafe { max_abs_bits_avx2(c) },
            _ => max_abs_bits_body(c),
        })
        .max()
        .unwrap_or(0)
}

/// [`max_abs_bits_body`] compiled for AVX-512 F.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn max_abs_bits_avx512(c: &[f32]) -> u32 {
    max_abs_bits_body(c)
}

/// [`max_abs_bits_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn max_abs_bits_avx2(c: &[f32]) -> u32 {
    max_abs_bits_body(c)
}

/// The largest `|x|` bit pattern of `c`, in 16 integer lanes.
#[inline(always)]
pub(super) fn max_abs_bits_body(c: &[f32]) -> u32 {
    let mut lanes = [0u32; 16];
    let mut chunks = c.chunks_exact(16);
    for ch in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(ch) {
            *l = (*l).max(x.to_bits() & 0x7fff_ffff);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u32, |m, &x| m.max(x.to_bits() & 0x7fff_ffff));
    lanes.iter().fold(tail, |m, &l| m.max(l))
}

/// Whether every sum of up to `n` gradient values of magnitude at most `top` (summed in
/// float32, then multiplied by `inv`) is certainly finite: `|fl(sum)| <= n top (1 + u)^n`
/// (`u = 2^-24`), bounded by `n top e^(n u)`, with a factor 2 to spare.
pub(super) fn sums_cannot_overflow(top: f32, n: usize, inv: f32) -> bool {
    let n = n as f64;
    let bound = top as f64 * n * ((n + 1.0) * (-24f64).exp2()).exp() * (inv as f64).max(1.0);
    bound < f32::MAX as f64 / 2.0
}

/// The sum of squares (f64) of every unique row's gradient, summed over its lookups as the
/// update sums it and multiplied by `inv` when that is not 1, with the first unique row (and
/// value) that is not finite. Rows are summed in order within a piece and the pieces in order:
/// the result does not depend on the thread count.
pub(super) fn coalesced_squares(
    groups: &Groups,
    grads: &[f32],
    dim: usize,
    inv: f32,
    simd: Simd,
) -> (f64, Option<(usize, f32)>) {
    let unique = groups.len();
    let parts: Vec<(f64, Option<(usize, f32)>)> = (0..unique.div_ceil(PIECE))
        .into_par_iter()
        .map(|piece| {
            let (lo, hi) = (piece * PIECE, ((piece + 1) * PIECE).min(unique));
            match simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512 F is there (`Simd::detect`, or a test that checked it).
                Simd::Avx512 => unsafe { squares_avx512(groups, grads, dim, inv, lo..hi) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 is there (as above).
                Simd::Avx2 => unsafe { squares_avx2(groups, grads, dim, inv, lo..hi) },
                _ => squares_body(groups, grads, dim, inv, lo..hi),
            }
        })
        .collect();
    let mut total = 0f64;
    let mut bad = None;
    for (sq, b) in parts {
        total += sq;
        bad = bad.or(b);
    }
    (total, bad)
}

/// [`squares_body`] compiled for AVX-512 F.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn squares_avx512(
    groups: &Groups,
    grads: &[f32],
    dim: usize,
    inv: f32,
    range: Range<usize>,
) -> (f64, Option<(usize, f32)>) {
    squares_body(groups, grads, dim, inv, range)
}

/// [`squares_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn squares_avx2(
    groups: &Groups,
    grads: &[f32],
    dim: usize,
    inv: f32,
    range: Range<usize>,
) -> (f64, Option<(usize, f32)>) {
    squares_body(groups, grads, dim, inv, range)
}

/// [`coalesced_squares`] over unique rows `range`.
#[inline(always)]
pub(super) fn squares_body(
    groups: &Groups,
    grads: &[f32],
    dim: usize,
    inv: f32,
    range: Range<usize>,
) -> (f64, Option<(usize, f32)>) {
    let mut buf = vec![0f32; dim];
    let mut total = 0f64;
    let mut bad = None;
    for j in range {
        let g = coalesce(groups, grads, dim, j, &mut buf, inv, 1.0);
        let mut sq = 0f64;
        for &x in g {
            sq += x as f64 * x as f64;
        }
        if !sq.is_finite() && bad.is_none() {
            let value = g
                .iter()
                .copied()
                .find(|x| !x.is_finite())
                .unwrap_or(f32::NAN);
            bad = Some((j, value));
        }
        total += sq;
    }
    (total, bad)
}

/// Unique row `j`'s gradient: its only gradient row as it is when it appears once and
/// `inv == clip == 1`, else in `buf`: the sum of its gradient rows in position order, times
/// `inv`, then times `clip` (each multiplication only when it is not 1). The update and the
/// checks take gradients from here, so they see the same values.
#[inline(always)]
pub(super) fn coalesce<'g>(
    groups: &Groups,
    grads: &'g [f32],
    dim: usize,
    j: usize,
    buf: &'g mut [f32],
    inv: f32,
    clip: f32,
) -> &'g [f32] {
    let positions = groups.positions(j);
    let first = &grads[positions[0] as usize * dim..][..dim];
    if positions.len() == 1 && inv == 1.0 && clip == 1.0 {
        return first;
    }
    buf.copy_from_slice(first);
    for &p in &positions[1..] {
        let row = &grads[p as usize * dim..][..dim];
        for (a, &b) in buf.iter_mut().zip(row) {
            *a += b;
        }
    }
    if inv != 1.0 {
        for a in buf.iter_mut() {
            *a *= inv;
        }
    }
    if clip != 1.0 {
        for a in buf.iter_mut() {
            *a *= clip;
        }
    }
    buf
}
