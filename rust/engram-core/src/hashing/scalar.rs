//! The scalar kernel: Barrett reductions, and the window/mix loop every kernel shares.

use super::{LayerPlan, OutElem};

/// `x mod p` for `x < 2**64`, `p >= 2`, with `m = floor(2**64 / p)`: the estimate `q` is the true
/// quotient or one less, so one conditional subtraction finishes it.
#[inline(always)]
fn barrett(x: u64, p: u64, m: u64) -> u64 {
    let q = ((x as u128 * m as u128) >> 64) as u64;
    let r = x - q * p;
    if r >= p {
        r - p
    } else {
        r
    }
}

/// The window/mix loop every kernel shares (SPEC section 3): for the `n` ids of `window`
/// (oldest first), calls `f(k, mix)` for each n-gram order `k + 1` (k = 1..n), where `mix` is
/// the XOR of `window[n - 1 - j] * multipliers[j]` over j <= k. Ids and multipliers are
/// validated so that every product stays below 2**63 (no overflow).
#[inline(always)]
pub(super) fn for_each_mix(window: &[i64], multipliers: &[i64], mut f: impl FnMut(usize, i64)) {
    let n = window.len();
    let mut mix = window[n - 1] * multipliers[0];
    for k in 1..n {
        mix ^= window[n - 1 - k] * multipliers[k];
        f(k, mix);
    }
}

/// Scalar kernel: `scratch` holds `N - 1` history ids followed by one id per output row.
pub(super) fn hash_layer_scalar<O: OutElem>(
    plan: &LayerPlan,
    n: usize,
    h: usize,
    scratch: &[i64],
    out: &mut [O],
    flat: bool,
) {
    let cols = (n - 1) * h;
    for (t, row) in out.chunks_exact_mut(cols).enumerate() {
        for_each_mix(&scratch[t..t + n], &plan.multipliers, |k, mix| {
            let heads = (k - 1) * h..k * h;
            let columns = plan.primes[heads.clone()]
                .iter()
                .zip(&plan.barrett[heads.clone()])
                .zip(&plan.offsets[heads.clone()]);
            for (dst, ((&p, &m), &offset)) in row[heads].iter_mut().zip(columns) {
                let r = barrett(mix as u64, p, m);
                *dst = O::from_u64(if flat { r + offset } else { r });
            }
        });
    }
}
