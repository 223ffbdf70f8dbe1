//! Multi-head n-gram hashing, exact to SPEC section 3.
//!
//! One kernel serves batches, ragged batches and streaming decode: the input is a flat run of
//! compressed ids cut into segments, each segment starting from a history of `N - 1` ids (the pad
//! id for a fresh sequence, the tail of earlier tokens when decoding). The work is split into
//! chunks of tokens over rayon threads; each chunk copies its ids (with the history in front) into
//! a small `i64` scratch, checking the range on the way, then every requested layer is hashed from
//! the scratch. The per-head modulo never uses a hardware division: a Barrett reduction in the
//! scalar path, and on AVX-512 CPUs eight heads at once through a float estimate of the quotient
//! corrected with exact integer arithmetic.

use crate::error::{EngramError, Result};
use rayon::prelude::*;

/// Tokens per unit of parallel work: large enough to amortise scheduling, small enough that the
/// scratch copy stays in L1 and both threads get work on small batches.
const CHUNK: usize = 2048;

/// The float-quotient SIMD reduction is exact when `mix / p < 2**50` (see `reduce8`): every prime
/// must be at least `2**13` since mixes are below `2**63`.
const SIMD_MIN_PRIME: u64 = 1 << 13;

/// Which implementation runs the per-head reduction; `Auto` picks the fastest the CPU supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Auto,
    Scalar,
}

/// An integer id element the kernels accept (numpy's signed and unsigned integer dtypes).
pub trait IdElem: Copy + Send + Sync {
    /// The value as `u64` bits: sign-extended for signed types, so negatives land above any vocab.
    fn bits(self) -> u64;
    /// The exact value, for error messages.
    fn wide(self) -> i128;
}

macro_rules! id_elem {
    (signed: $($t:ty),*; unsigned: $($u:ty),*) => {
        $(impl IdElem for $t {
            #[inline(always)]
            fn bits(self) -> u64 { self as i64 as u64 }
            fn wide(self) -> i128 { self as i128 }
        })*
        $(impl IdElem for $u {
            #[inline(always)]
            fn bits(self) -> u64 { self as u64 }
            fn wide(self) -> i128 { self as i128 }
        })*
    };
}
id_elem!(signed: i8, i16, i32, i64; unsigned: u8, u16, u32, u64);

/// An output element: `i64` always fits, `i32` when the largest id written does.
pub trait OutElem: Copy + Send + Sync + Default + 'static {
    const MAX: u64;
    const IS_I32: bool;
    fn from_u64(v: u64) -> Self;
}

impl OutElem for i64 {
    const MAX: u64 = i64::MAX as u64;
    const IS_I32: bool = false;
    #[inline(always)]
    fn from_u64(v: u64) -> Self {
        v as i64
    }
}

impl OutElem for i32 {
    const MAX: u64 = i32::MAX as u64;
    const IS_I32: bool = true;
    #[inline(always)]
    fn from_u64(v: u64) -> Self {
        v as i32
    }
}

/// Multipliers and primes of one layer, as produced by the config (SPEC section 2).
#[derive(Clone, Debug)]
pub struct LayerSpec {
    /// `max_ngram_size` odd multipliers.
    pub multipliers: Vec<i64>,
    /// `(N - 1) * H` primes in column order (order 2 heads 0..H-1, order 3 heads 0..H-1, ...).
    pub primes: Vec<u64>,
}

#[derive(Clone, Debug)]
struct LayerPlan {
    multipliers: Vec<i64>,
    primes: Vec<u64>,
    /// `floor(2**64 / p)` per column, for the Barrett reduction.
    barrett: Vec<u64>,
    /// `1.0 / p` per column, for the SIMD quotient estimate.
    inverse: Vec<f64>,
    offsets: Vec<u64>,
    table_rows: u64,
    simd_ok: bool,
}

/// A validated hasher for one config and one compressed vocabulary.
#[derive(Clone, Debug)]
pub struct NgramHasher {
    max_ngram: usize,
    n_head: usize,
    vocab: u64,
    pad: i64,
    layers: Vec<LayerPlan>,
}

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

impl NgramHasher {
    /// Builds the hasher; `vocab` is the compressed vocabulary size and `pad` the compressed pad id.
    pub fn new(
        max_ngram: usize,
        n_head: usize,
        vocab: u64,
        pad: i64,
        layers: Vec<LayerSpec>,
    ) -> Result<Self> {
        let config_err = |field, value: String, reason: &str| EngramError::Config {
            field,
            value,
            reason: reason.into(),
        };
        if max_ngram < 2 {
            return Err(config_err(
                "max_ngram_size",
                max_ngram.to_string(),
                "must be at least 2",
            ));
        }
        if n_head < 1 {
            return Err(config_err(
                "n_head_per_ngram",
                n_head.to_string(),
                "must be at least 1",
            ));
        }
        if vocab < 1 || vocab > i64::MAX as u64 {
            return Err(config_err(
                "compressed_vocab_size",
                vocab.to_string(),
                "must be in [1, 2**63)",
            ));
        }
        if pad < 0 || pad as u64 >= vocab {
            return Err(config_err(
                "pad_id",
                pad.to_string(),
                &format!("the compressed pad id must be in [0, {vocab})"),
            ));
        }
        let cols = (max_ngram - 1) * n_head;
        let mut plans = Vec::with_capacity(layers.len());
        for spec in layers {
            if spec.multipliers.len() != max_ngram || spec.primes.len() != cols {
                return Err(EngramError::Invalid(format!(
                    "a layer needs {max_ngram} multipliers and {cols} primes, got {} and {}",
                    spec.multipliers.len(),
                    spec.primes.len()
                )));
            }
            // Products of ids below `vocab` and these multipliers must stay below 2**63 (SPEC 2).
            let bound = i64::MAX as u64 / vocab;
            if let Some(&m) = spec
                .multipliers
                .iter()
                .find(|&&m| m < 0 || m as u64 > bound)
            {
                return Err(config_err(
                    "multipliers",
                    m.to_string(),
                    &format!("must be in [0, {bound}] so that id * multiplier cannot overflow"),
                ));
            }
            if let Some(&p) = spec.primes.iter().find(|&&p| !(2..1 << 62).contains(&p)) {
                return Err(config_err("primes", p.to_string(), "must be in [2, 2**62)"));
            }
            let mut offsets = Vec::with_capacity(cols);
            let mut running = 0u64;
            for &p in &spec.primes {
                offsets.push(running);
                running += p;
            }
            plans.push(LayerPlan {
                barrett: spec
                    .primes
                    .iter()
                    .map(|&p| ((1u128 << 64) / p as u128) as u64)
                    .collect(),
                inverse: spec.primes.iter().map(|&p| 1.0 / p as f64).collect(),
                simd_ok: n_head.is_multiple_of(8)
                    && spec.primes.iter().all(|&p| p >= SIMD_MIN_PRIME),
                multipliers: spec.multipliers,
                primes: spec.primes,
                offsets,
                table_rows: running,
            });
        }
        Ok(Self {
            max_ngram,
            n_head,
            vocab,
            pad,
            layers: plans,
        })
    }

    /// Hash columns per token and layer, `(N - 1) * H`.
    pub fn cols(&self) -> usize {
        (self.max_ngram - 1) * self.n_head
    }

    pub fn max_ngram(&self) -> usize {
        self.max_ngram
    }

    pub fn pad(&self) -> i64 {
        self.pad
    }

    pub fn vocab(&self) -> u64 {
        self.vocab
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Offsets of each column in a flat table (running sum of the primes).
    pub fn offsets(&self, layer: usize) -> &[u64] {
        &self.layers[layer].offsets
    }

    /// Rows of a layer's flat table (sum of its primes).
    pub fn table_rows(&self, layer: usize) -> u64 {
        self.layers[layer].table_rows
    }

    /// Largest value written for `layer`, to check that an output dtype can hold it.
    pub fn max_value(&self, layer: usize, flat: bool) -> u64 {
        let plan = &self.layers[layer];
        if flat {
            plan.table_rows - 1
        } else {
            plan.primes.iter().max().map_or(0, |p| p - 1)
        }
    }

    /// Hashes `ids`, cut into segments by `bounds` (`bounds[0] == 0`, non-decreasing, last
    /// `== ids.len()`), into one `[ids.len(), cols]` row-major output per entry of `layers`.
    /// `history`, if given, holds `N - 1` ids per segment (oldest first) that precede it;
    /// otherwise each segment starts with pad history. `flat` adds the column offsets.
    #[allow(clippy::too_many_arguments)]
    pub fn hash_segments<I: IdElem, O: OutElem>(
        &self,
        ids: &[I],
        bounds: &[usize],
        history: Option<&[i64]>,
        layers: &[usize],
        flat: bool,
        outs: &mut [&mut [O]],
        backend: Backend,
    ) -> Result<()> {
        let cols = self.cols();
        let hist_len = self.max_ngram - 1;
        self.check_bounds(ids.len(), bounds)?;
        let segments = bounds.len() - 1;
        if let Some(h) = history {
            if h.len() != segments * hist_len {
                return Err(EngramError::Invalid(format!(
                    "history holds {} ids, expected {} ({segments} sequences x {hist_len})",
                    h.len(),
                    segments * hist_len
                )));
            }
            if let Some(&v) = h.iter().find(|&&v| v < 0 || v as u64 >= self.vocab) {
                return Err(EngramError::Invalid(format!(
                    "decode state holds id {v}, outside [0, {}): create it with new_state()",
                    self.vocab
                )));
            }
        }
        if layers.len() != outs.len() {
            return Err(EngramError::Invalid(format!(
                "{} layers requested but {} outputs given",
                layers.len(),
                outs.len()
            )));
        }
        for (&layer, out) in layers.iter().zip(outs.iter()) {
            if layer >= self.layers.len() {
                return Err(EngramError::Invalid(format!(
                    "layer index {layer} out of range (hasher has {} layers)",
                    self.layers.len()
                )));
            }
            if out.len() != ids.len() * cols {
                return Err(EngramError::Invalid(format!(
                    "output holds {} values, expected {} x {cols}",
                    out.len(),
                    ids.len()
                )));
            }
            let max = self.max_value(layer, flat);
            if max > O::MAX {
                return Err(EngramError::Invalid(format!(
                    "ids up to {max} do not fit the output dtype (max {}): use int64 output",
                    O::MAX
                )));
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let use_simd = backend == Backend::Auto && simd_available();

        // Split every layer's output at the same token boundaries, then regroup per chunk.
        let mut per_chunk: Vec<Vec<&mut [O]>> = Vec::new();
        for out in outs.iter_mut() {
            for (c, piece) in out.chunks_mut(CHUNK * cols).enumerate() {
                if c == per_chunk.len() {
                    per_chunk.push(Vec::with_capacity(layers.len()));
                }
                per_chunk[c].push(piece);
            }
        }
        let ok = per_chunk
            .into_par_iter()
            .enumerate()
            .map(|(c, mut chunk_outs)| {
                let start = c * CHUNK;
                let end = (start + CHUNK).min(ids.len());
                self.hash_chunk(
                    ids,
                    bounds,
                    history,
                    layers,
                    flat,
                    start..end,
                    &mut chunk_outs,
                    use_simd,
                )
            })
            .all(|ok| ok);
        if ok {
            Ok(())
        } else {
            Err(self.first_bad_id(ids))
        }
    }

    fn check_bounds(&self, n: usize, bounds: &[usize]) -> Result<()> {
        if bounds.first() != Some(&0) || bounds.last() != Some(&n) {
            return Err(EngramError::Invalid(format!(
                "cu_seqlens must start at 0 and end at the number of ids ({n}), got {:?}..{:?}",
                bounds.first(),
                bounds.last()
            )));
        }
        if let Some(i) = bounds.windows(2).position(|w| w[1] < w[0]) {
            return Err(EngramError::Invalid(format!(
                "cu_seqlens must be non-decreasing: cu_seqlens[{}] = {} > cu_seqlens[{}] = {}",
                i,
                bounds[i],
                i + 1,
                bounds[i + 1]
            )));
        }
        Ok(())
    }

    fn first_bad_id<I: IdElem>(&self, ids: &[I]) -> EngramError {
        let index = ids
            .iter()
            .position(|v| v.bits() >= self.vocab)
            .expect("a chunk reported an out-of-range id");
        EngramError::IdOutOfRange {
            value: ids[index].wide(),
            index,
            vocab: self.vocab,
        }
    }

    /// Hashes tokens `range` (all segments overlapping it); returns false on an out-of-range id.
    #[allow(clippy::too_many_arguments)]
    fn hash_chunk<I: IdElem, O: OutElem>(
        &self,
        ids: &[I],
        bounds: &[usize],
        history: Option<&[i64]>,
        layers: &[usize],
        flat: bool,
        range: std::ops::Range<usize>,
        outs: &mut [&mut [O]],
        use_simd: bool,
    ) -> bool {
        let hist_len = self.max_ngram - 1;
        let cols = self.cols();
        let mut scratch: Vec<i64> = Vec::with_capacity(CHUNK + hist_len);
        // The last segment whose start is <= range.start (skips empty segments).
        let mut seg = bounds.partition_point(|&b| b <= range.start) - 1;
        let mut pos = range.start;
        let mut valid = true;
        while pos < range.end {
            while bounds[seg + 1] <= pos {
                seg += 1;
            }
            let seg_start = bounds[seg];
            let piece_end = bounds[seg + 1].min(range.end);
            scratch.clear();
            for back in (1..=hist_len).rev() {
                let v = if pos >= seg_start + back {
                    ids[pos - back].bits() as i64
                } else {
                    match history {
                        Some(h) => h[seg * hist_len + hist_len - (seg_start + back - pos)],
                        None => self.pad,
                    }
                };
                scratch.push(v);
            }
            let mut bad = false;
            scratch.extend(ids[pos..piece_end].iter().map(|&v| {
                let b = v.bits();
                bad |= b >= self.vocab;
                b as i64
            }));
            if bad {
                // Never hash an out-of-range id: its product could overflow.
                valid = false;
                break;
            }
            let rows = (pos - range.start) * cols..(piece_end - range.start) * cols;
            for (&layer, out) in layers.iter().zip(outs.iter_mut()) {
                let plan = &self.layers[layer];
                let out = &mut out[rows.clone()];
                #[cfg(target_arch = "x86_64")]
                if use_simd && plan.simd_ok {
                    // SAFETY: `use_simd` is only true when `simd_available()` detected AVX-512F
                    // and AVX-512DQ at run time; `out` holds `cols` values per scratch token.
                    unsafe {
                        avx512::hash_layer(plan, self.max_ngram, self.n_head, &scratch, out, flat)
                    };
                    continue;
                }
                let _ = use_simd;
                hash_layer_scalar(plan, self.max_ngram, self.n_head, &scratch, out, flat);
            }
            pos = piece_end;
        }
        valid
    }
}

/// After hashing a decode step, keeps the last `hist_len` ids of each segment's full history
/// (`history` row followed by the segment's new ids) in `history`. Ids must have been validated
/// by a successful [`NgramHasher::hash_segments`] call on the same arguments.
pub fn advance_history<I: IdElem>(
    history: &mut [i64],
    hist_len: usize,
    ids: &[I],
    bounds: &[usize],
) {
    for (row, w) in history.chunks_exact_mut(hist_len).zip(bounds.windows(2)) {
        let new = &ids[w[0]..w[1]];
        let keep = new.len().min(hist_len);
        row.rotate_left(keep);
        for (dst, src) in row[hist_len - keep..]
            .iter_mut()
            .zip(&new[new.len() - keep..])
        {
            *dst = src.bits() as i64;
        }
    }
}

/// Whether the AVX-512 reduction can run on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Scalar kernel: `scratch` holds `N - 1` history ids followed by one id per output row.
fn hash_layer_scalar<O: OutElem>(
    plan: &LayerPlan,
    n: usize,
    h: usize,
    scratch: &[i64],
    out: &mut [O],
    flat: bool,
) {
    let cols = (n - 1) * h;
    for (t, row) in out.chunks_exact_mut(cols).enumerate() {
        let window = &scratch[t..t + n];
        // Ids and multipliers are validated so that products stay below 2**63 (no overflow).
        let mut mix = window[n - 1] * plan.multipliers[0];
        for k in 1..n {
            mix ^= window[n - 1 - k] * plan.multipliers[k];
            let heads = (k - 1) * h..k * h;
            let columns = plan.primes[heads.clone()]
                .iter()
                .zip(&plan.barrett[heads.clone()])
                .zip(&plan.offsets[heads.clone()]);
            for (dst, ((&p, &m), &offset)) in row[heads].iter_mut().zip(columns) {
                let r = barrett(mix as u64, p, m);
                *dst = O::from_u64(if flat { r + offset } else { r });
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{LayerPlan, OutElem};
    use std::arch::x86_64::*;

    /// Eight heads at once. `q = trunc(mix * (1/p))` in f64 has a relative error below
    /// `4 * 2**-53`; with `mix < 2**63` and `p >= 2**13` the quotient is below `2**50`, so the
    /// estimate is off by less than one and `r = mix - q*p` (exact in wrapping i64) lies in
    /// `[-p, 2p)`; one conditional add and one conditional subtract make it exact.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn hash_layer<O: OutElem>(
        plan: &LayerPlan,
        n: usize,
        h: usize,
        scratch: &[i64],
        out: &mut [O],
        flat: bool,
    ) {
        let cols = (n - 1) * h;
        let zero = _mm512_setzero_si512();
        for (t, row) in out.chunks_exact_mut(cols).enumerate() {
            let window = &scratch[t..t + n];
            let mut mix = window[n - 1] * plan.multipliers[0];
            for k in 1..n {
                mix ^= window[n - 1 - k] * plan.multipliers[k];
                let vmix = _mm512_set1_epi64(mix);
                let fmix = _mm512_set1_pd(mix as f64);
                for c in ((k - 1) * h..k * h).step_by(8) {
                    // SAFETY: `c + 8 <= cols` because `h % 8 == 0` (checked in `simd_ok`), and the
                    // per-column vectors and `row` hold `cols` elements.
                    let p = _mm512_loadu_si512(plan.primes.as_ptr().add(c) as *const _);
                    let inv = _mm512_loadu_pd(plan.inverse.as_ptr().add(c));
                    let q = _mm512_cvttpd_epi64(_mm512_mul_pd(fmix, inv));
                    let mut r = _mm512_sub_epi64(vmix, _mm512_mullo_epi64(q, p));
                    r = _mm512_mask_add_epi64(r, _mm512_cmplt_epi64_mask(r, zero), r, p);
                    r = _mm512_mask_sub_epi64(r, _mm512_cmpge_epi64_mask(r, p), r, p);
                    if flat {
                        let off = _mm512_loadu_si512(plan.offsets.as_ptr().add(c) as *const _);
                        r = _mm512_add_epi64(r, off);
                    }
                    let dst = row.as_mut_ptr().add(c);
                    if O::IS_I32 {
                        _mm256_storeu_si256(dst as *mut __m256i, _mm512_cvtepi64_epi32(r));
                    } else {
                        _mm512_storeu_si512(dst as *mut _, r);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primes::layer_primes;
    use proptest::prelude::*;

    /// The SPEC written literally: Python-style floor modulo on i128, no shortcuts.
    fn reference(spec: &LayerSpec, n: usize, h: usize, pad: i64, row: &[i64]) -> Vec<u64> {
        let mut out = Vec::new();
        for t in 0..row.len() {
            let shift = |k: usize| if t >= k { row[t - k] } else { pad } as i128;
            for order in 2..=n {
                let mut mix = shift(0) * spec.multipliers[0] as i128;
                for k in 1..order {
                    mix ^= shift(k) * spec.multipliers[k] as i128;
                }
                for j in 0..h {
                    out.push(mix.rem_euclid(spec.primes[(order - 2) * h + j] as i128) as u64);
                }
            }
        }
        out
    }

    fn specs(sizes: &[u64], n_head: usize, vocab: u64, seed: u64, layers: usize) -> Vec<LayerSpec> {
        let bound = (i64::MAX as u64 / vocab / 2).max(1);
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        layer_primes(sizes, n_head, layers)
            .unwrap()
            .into_iter()
            .map(|orders| LayerSpec {
                multipliers: (0..=sizes.len())
                    .map(|_| (2 * (next() % bound) + 1) as i64)
                    .collect(),
                primes: orders.into_iter().flatten().collect(),
            })
            .collect()
    }

    fn run<O: OutElem + Into<i64>>(
        hasher: &NgramHasher,
        ids: &[i64],
        bounds: &[usize],
        flat: bool,
        backend: Backend,
    ) -> Result<Vec<Vec<i64>>> {
        let cols = hasher.cols();
        let layers: Vec<usize> = (0..hasher.num_layers()).collect();
        let mut bufs: Vec<Vec<O>> = layers
            .iter()
            .map(|_| vec![O::default(); ids.len() * cols])
            .collect();
        let mut outs: Vec<&mut [O]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        hasher.hash_segments(ids, bounds, None, &layers, flat, &mut outs, backend)?;
        Ok(bufs
            .into_iter()
            .map(|b| b.into_iter().map(Into::into).collect())
            .collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn fast_paths_match_reference(
            n in 2usize..5,
            h in prop::sample::select(vec![1usize, 3, 8, 16]),
            base in prop::sample::select(vec![2u64, 50, 9000, 646_400, 16_000_000]),
            vocab in 1u64..200_000,
            seed in any::<u64>(),
            rows in prop::collection::vec(prop::collection::vec(any::<u64>(), 0..40), 1..4),
            flat in any::<bool>(),
        ) {
            let specs = specs(&vec![base; n - 1], h, vocab, seed, 2);
            let pad = (seed % vocab) as i64;
            let hasher = NgramHasher::new(n, h, vocab, pad, specs.clone()).unwrap();
            let rows: Vec<Vec<i64>> =
                rows.iter().map(|r| r.iter().map(|&v| (v % vocab) as i64).collect()).collect();
            let ids: Vec<i64> = rows.concat();
            let mut bounds = vec![0];
            for r in &rows {
                bounds.push(bounds.last().unwrap() + r.len());
            }
            let auto = run::<i64>(&hasher, &ids, &bounds, flat, Backend::Auto).unwrap();
            let scalar = run::<i64>(&hasher, &ids, &bounds, flat, Backend::Scalar).unwrap();
            prop_assert_eq!(&auto, &scalar);
            for (l, spec) in specs.iter().enumerate() {
                let mut expected = Vec::new();
                for r in &rows {
                    expected.extend(reference(spec, n, h, pad, r));
                }
                let offsets = hasher.offsets(l);
                let expected: Vec<i64> = expected
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (v + if flat { offsets[i % hasher.cols()] } else { 0 }) as i64)
                    .collect();
                prop_assert_eq!(&auto[l], &expected);
            }
            if hasher.max_value(0, flat) <= i32::MAX as u64 && hasher.max_value(1, flat) <= i32::MAX as u64 {
                let narrow = run::<i32>(&hasher, &ids, &bounds, flat, Backend::Auto).unwrap();
                prop_assert_eq!(&narrow, &auto);
            }
        }

        #[test]
        fn history_continues_a_sequence(
            row in prop::collection::vec(0i64..99_092, 1..3000),
            split in 0usize..3000,
        ) {
            let specs = specs(&[16_000_000; 3], 8, 99_092, 7, 1);
            let hasher = NgramHasher::new(4, 8, 99_092, 2, specs).unwrap();
            let split = split.min(row.len());
            let cols = hasher.cols();
            let whole = run::<i64>(&hasher, &row, &[0, row.len()], false, Backend::Auto).unwrap();
            let mut history = vec![2i64; 3];
            history.extend_from_slice(&row[..split]);
            let history = history[history.len() - 3..].to_vec();
            let tail = &row[split..];
            let mut out = vec![0i64; tail.len() * cols];
            hasher
                .hash_segments(tail, &[0, tail.len()], Some(&history), &[0], false, &mut [&mut out[..]], Backend::Auto)
                .unwrap();
            prop_assert_eq!(&out[..], &whole[0][split * cols..]);
        }
    }

    #[test]
    fn out_of_range_ids_name_the_first_one() {
        let hasher = NgramHasher::new(3, 8, 1000, 2, specs(&[646_400; 2], 8, 1000, 1, 1)).unwrap();
        let mut ids = vec![5i64; 10_000];
        ids[7000] = 1000;
        ids[9000] = -1;
        let err = run::<i64>(&hasher, &ids, &[0, 10_000], false, Backend::Auto).unwrap_err();
        assert_eq!(
            err,
            EngramError::IdOutOfRange {
                value: 1000,
                index: 7000,
                vocab: 1000
            }
        );
        let ids = vec![u64::MAX; 3];
        let mut out = vec![0i64; 3 * 16];
        let err = hasher
            .hash_segments(
                &ids,
                &[0, 3],
                None,
                &[0],
                false,
                &mut [&mut out[..]],
                Backend::Auto,
            )
            .unwrap_err();
        assert_eq!(
            err,
            EngramError::IdOutOfRange {
                value: u64::MAX as i128,
                index: 0,
                vocab: 1000
            }
        );
    }

    #[test]
    fn int32_output_is_refused_when_ids_do_not_fit() {
        // 24 primes above 2e8 sum past 2**31: flat ids need int64, per-head ids fit int32.
        let hasher =
            NgramHasher::new(4, 8, 99_092, 2, specs(&[200_000_000; 3], 8, 99_092, 1, 1)).unwrap();
        let mut out = vec![0i32; 16 * 24];
        let err = hasher
            .hash_segments(
                &[1i64; 16],
                &[0, 16],
                None,
                &[0],
                true,
                &mut [&mut out[..]],
                Backend::Auto,
            )
            .unwrap_err();
        assert!(err.to_string().contains("use int64 output"), "{err}");
        hasher
            .hash_segments(
                &[1i64; 16],
                &[0, 16],
                None,
                &[0],
                false,
                &mut [&mut out[..]],
                Backend::Auto,
            )
            .unwrap();
    }

    #[test]
    fn bad_bounds_and_config_are_rejected() {
        let specs = specs(&[100; 2], 2, 50, 1, 1);
        let hasher = NgramHasher::new(3, 2, 50, 2, specs.clone()).unwrap();
        let mut out = [0i64; 4 * 4];
        for bounds in [&[0usize, 3][..], &[1, 4], &[0, 3, 2, 4]] {
            assert!(hasher
                .hash_segments(
                    &[1i64; 4],
                    bounds,
                    None,
                    &[0],
                    false,
                    &mut [&mut out[..]],
                    Backend::Auto
                )
                .is_err());
        }
        assert!(NgramHasher::new(1, 2, 50, 2, specs.clone()).is_err());
        assert!(NgramHasher::new(3, 2, 50, 50, specs.clone()).is_err());
        assert!(NgramHasher::new(3, 2, 0, 0, specs.clone()).is_err());
        let mut overflowing = specs[0].clone();
        overflowing.multipliers[1] = i64::MAX;
        assert!(NgramHasher::new(3, 2, 50, 2, vec![overflowing]).is_err());
    }
}
