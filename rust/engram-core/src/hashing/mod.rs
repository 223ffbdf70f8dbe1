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

/// The float-quotient SIMD reduction is exact when `mix / p < 2**49` (see `avx512::reduce8`):
/// every prime must be at least `2**14` since mixes are below `2**63`.
const SIMD_MIN_PRIME: u64 = 1 << 14;

/// Outputs at least this large are written with streaming (non-temporal) stores.
const STREAM_MIN_BYTES: usize = 8 << 20;

pub use crate::elem::{Backend, IdElem, OutElem};

/// One hashing call: which ids, how they are cut into sequences, and what to produce.
#[derive(Clone, Copy, Debug)]
pub struct HashRequest<'a, I> {
    /// Flat ids of all sequences.
    pub ids: &'a [I],
    /// Sequence bounds: `bounds[0] == 0`, non-decreasing, last `== ids.len()`.
    pub bounds: &'a [usize],
    /// `N - 1` ids per sequence (oldest first) that precede it; `None` means pad history.
    pub history: Option<&'a [i64]>,
    /// Indices (into the hasher's layers) of the layers to hash, one output each.
    pub layers: &'a [usize],
    /// Add the column offsets (rows of one flat table per layer).
    pub flat: bool,
    /// `ids` are raw token ids, mapped through the hasher's lookup table on the fly.
    pub raw: bool,
    /// Blocked positions (SPEC 8.3, the DEAD rule): one flag per id, nonzero where blocked.
    /// Walking back from a position, once a lookback leaves the sequence or meets a blocked
    /// position, that shift and every older one read the pad id; a blocked position's own id
    /// is never read (nor checked).
    pub blocked: Option<&'a [u8]>,
    /// A caller id value (raw when `raw` is set) that marks blocked positions, or-ed with
    /// `blocked`.
    pub dead_id: Option<u64>,
    pub backend: Backend,
}

impl<'a, I> HashRequest<'a, I> {
    /// A request for fresh sequences (pad history) of compressed ids, all given layers.
    pub fn new(ids: &'a [I], bounds: &'a [usize], layers: &'a [usize]) -> Self {
        Self {
            ids,
            bounds,
            history: None,
            layers,
            flat: false,
            raw: false,
            blocked: None,
            dead_id: None,
            backend: Backend::Auto,
        }
    }

    /// Whether any position can be blocked (a mask or a dead id is given).
    fn blocking(&self) -> bool {
        self.blocked.is_some() || self.dead_id.is_some()
    }
}

impl<I: IdElem> HashRequest<'_, I> {
    /// Whether position `i` is blocked. The mask and the ids are caller memory: a flag or id
    /// that changes meanwhile changes only which rule applies, never what is read unchecked.
    #[inline]
    fn is_blocked(&self, i: usize) -> bool {
        self.blocked.is_some_and(|m| m[i] != 0)
            || self.dead_id.is_some_and(|d| self.ids[i].bits() == d)
    }

    /// The first position in `range` whose blocked flag is `flag` (or `range.end`).
    fn next_with(&self, range: std::ops::Range<usize>, flag: bool) -> usize {
        let end = range.end;
        range
            .into_iter()
            .find(|&i| self.is_blocked(i) == flag)
            .unwrap_or(end)
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
    /// `1/p` rounded below (so quotient estimates never exceed the true quotient), `p` and the
    /// offsets, as f64 per column, for the SIMD reduction.
    inverse: Vec<f64>,
    primes_f: Vec<f64>,
    offsets_f: Vec<f64>,
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
    /// Raw token id -> compressed id, for hashing raw ids in one pass.
    lookup: Option<Vec<i64>>,
    /// The model's layer id of each layer (its index when built from specs), for messages.
    layer_ids: Vec<u64>,
}

#[cfg(target_arch = "x86_64")]
mod avx512;
mod config;
mod plan;
mod scalar;
mod step;

pub use config::HashConfig;
use scalar::{for_each_mix, hash_layer_scalar};

impl NgramHasher {
    /// Hashes a request into one `[ids.len(), cols]` row-major output per requested layer.
    pub fn hash_segments<I: IdElem, O: OutElem>(
        &self,
        req: &HashRequest<'_, I>,
        outs: &mut [&mut [O]],
    ) -> Result<()> {
        let HashRequest {
            ids,
            bounds,
            history,
            layers,
            flat,
            raw,
            blocked,
            backend,
            ..
        } = *req;
        if raw && self.lookup.is_none() {
            return Err(EngramError::Invalid(
                "raw token ids need a lookup table: build the hasher from a tokenizer".into(),
            ));
        }
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
        if let Some(m) = blocked {
            if m.len() != ids.len() {
                return Err(EngramError::Invalid(format!(
                    "the blocked mask holds {} flags, expected one per id ({})",
                    m.len(),
                    ids.len()
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
                    "layer {} has ids up to {max}, which do not fit int32{}: use int64 output",
                    self.layer_ids[layer],
                    if flat { " with flat=True" } else { "" },
                )));
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let use_simd = backend == Backend::Auto && simd_available();
        let map = if raw { self.lookup.as_deref() } else { None };
        // Streaming stores pay off for outputs far larger than the caches; every 8-head group
        // store must then be aligned, which a 64-byte aligned output guarantees (cols % 8 == 0
        // on the SIMD path).
        let out_bytes: usize = outs.iter().map(|o| std::mem::size_of_val(&**o)).sum();
        let stream = use_simd
            && out_bytes >= STREAM_MIN_BYTES
            && outs
                .iter()
                .all(|o| (o.as_ptr() as usize).is_multiple_of(64));

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
        let kernel = Kernel {
            simd: use_simd,
            stream,
        };
        let ok = per_chunk
            .into_par_iter()
            .enumerate()
            .map(|(c, mut chunk_outs)| {
                let start = c * CHUNK;
                let end = (start + CHUNK).min(ids.len());
                self.hash_chunk(req, map, start..end, &mut chunk_outs, kernel)
            })
            .all(|ok| ok);
        if ok {
            Ok(())
        } else {
            Err(self.first_bad_id(req, map))
        }
    }

    fn check_bounds(&self, n: usize, bounds: &[usize]) -> Result<()> {
        match (bounds.first(), bounds.last()) {
            (Some(&0), Some(&last)) if last == n => {}
            (Some(&first), Some(&last)) => {
                return Err(EngramError::Invalid(format!(
                    "cu_seqlens must start at 0 and end at len(ids) = {n}, got {first} .. {last}"
                )))
            }
            _ => {
                return Err(EngramError::Invalid(format!(
                    "cu_seqlens must hold at least one offset: [0, ..., {n}]"
                )))
            }
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

    /// The error for an out-of-range id found while hashing: the first one in `ids`, or, when a
    /// rescan finds none (another thread rewrote the ids meanwhile), an error saying so.
    /// Blocked positions are skipped: their ids are never read as ids.
    fn first_bad_id<I: IdElem>(
        &self,
        req: &HashRequest<'_, I>,
        map: Option<&[i64]>,
    ) -> EngramError {
        let ids = req.ids;
        let vocab = map.map_or(self.vocab, |m| m.len() as u64);
        match (0..ids.len()).find(|&i| ids[i].bits() >= vocab && !req.is_blocked(i)) {
            Some(index) => EngramError::IdOutOfRange {
                value: ids[index].wide(),
                index,
                vocab,
                raw: map.is_some(),
            },
            None => ids_changed(),
        }
    }

    /// Hashes tokens `range` (all segments overlapping it); returns false on an out-of-range id.
    fn hash_chunk<I: IdElem, O: OutElem>(
        &self,
        req: &HashRequest<'_, I>,
        map: Option<&[i64]>,
        range: std::ops::Range<usize>,
        outs: &mut [&mut [O]],
        kernel: Kernel,
    ) -> bool {
        let HashRequest {
            ids,
            bounds,
            history,
            ..
        } = *req;
        let hist_len = self.max_ngram - 1;
        let blocking = req.blocking();
        let mut scratch: Vec<i64> = Vec::with_capacity(CHUNK + hist_len);
        // The last segment whose start is <= range.start (skips empty segments).
        let mut seg = bounds.partition_point(|&b| b <= range.start) - 1;
        let mut pos = range.start;
        let mut valid = true;
        while valid && pos < range.end {
            while bounds[seg + 1] <= pos {
                seg += 1;
            }
            let seg_start = bounds[seg];
            let piece_end = bounds[seg + 1].min(range.end);
            // The newest blocked position the first window looks back at: it and every older
            // position read the pad id (the DEAD rule).
            let last_blocked = if blocking {
                (seg_start.max(pos.saturating_sub(hist_len))..pos)
                    .rev()
                    .find(|&i| req.is_blocked(i))
            } else {
                None
            };
            scratch.clear();
            for back in (1..=hist_len).rev() {
                let v = if last_blocked.is_some_and(|b| pos <= b + back) {
                    self.pad
                } else if pos >= seg_start + back {
                    // Read again (the ids are caller memory another thread may write), so
                    // checked again: an id is never hashed unchecked.
                    self.compressed(ids[pos - back].bits(), map)
                        .unwrap_or_else(|| {
                            valid = false;
                            self.pad
                        })
                } else {
                    match history {
                        Some(h) => h[seg * hist_len + hist_len - (seg_start + back - pos)],
                        None => self.pad,
                    }
                };
                scratch.push(v);
            }
            if !valid {
                break;
            }
            let piece = pos..piece_end;
            valid = if blocking {
                self.hash_blocked_piece(req, map, range.start, piece, &mut scratch, outs, kernel)
            } else if self.extend_checked(&mut scratch, &ids[piece], map) {
                self.hash_rows(req, &scratch, pos - range.start, outs, kernel);
                true
            } else {
                false
            };
            pos = piece_end;
        }
        if kernel.stream {
            // SAFETY: SSE2 is baseline on x86_64. Streaming stores are weakly ordered: fence them
            // before rayon reports this chunk done to the thread that returns the output.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                std::arch::x86_64::_mm_sfence()
            };
        }
        valid
    }

    /// One piece of a segment with blocked positions, `scratch` holding its history: runs of
    /// open positions are hashed from the ids, runs of blocked ones from pad ids only, and
    /// the run after a blocked one starts from a pad history.
    #[allow(clippy::too_many_arguments)]
    fn hash_blocked_piece<I: IdElem, O: OutElem>(
        &self,
        req: &HashRequest<'_, I>,
        map: Option<&[i64]>,
        chunk_start: usize,
        piece: std::ops::Range<usize>,
        scratch: &mut Vec<i64>,
        outs: &mut [&mut [O]],
        kernel: Kernel,
    ) -> bool {
        let hist_len = self.max_ngram - 1;
        let mut s = piece.start;
        while s < piece.end {
            let blocked = req.is_blocked(s);
            let e = req.next_with(s + 1..piece.end, !blocked);
            if blocked {
                scratch.clear();
                scratch.resize(hist_len + (e - s), self.pad);
            } else if !self.extend_checked(scratch, &req.ids[s..e], map) {
                return false;
            }
            self.hash_rows(req, scratch, s - chunk_start, outs, kernel);
            scratch.clear();
            scratch.resize(hist_len, self.pad);
            s = e;
        }
        true
    }

    /// Appends the compressed ids of `new` to `scratch`; false (nothing to hash) when one is
    /// out of range: never hash an out-of-range id, its product could overflow.
    fn extend_checked<I: IdElem>(
        &self,
        scratch: &mut Vec<i64>,
        new: &[I],
        map: Option<&[i64]>,
    ) -> bool {
        let mut bad = false;
        match map {
            None => scratch.extend(new.iter().map(|&v| {
                let b = v.bits();
                bad |= b >= self.vocab;
                b as i64
            })),
            Some(m) => scratch.extend(new.iter().map(|&v| match m.get(v.bits() as usize) {
                Some(&c) => c,
                None => {
                    bad = true;
                    self.pad
                }
            })),
        }
        !bad
    }

    /// Hashes every requested layer of `scratch` (`N - 1` history ids, then one id per row)
    /// into rows `first_row..` of this chunk's outputs.
    fn hash_rows<I, O: OutElem>(
        &self,
        req: &HashRequest<'_, I>,
        scratch: &[i64],
        first_row: usize,
        outs: &mut [&mut [O]],
        kernel: Kernel,
    ) {
        let cols = self.cols();
        let n_rows = scratch.len() + 1 - self.max_ngram;
        let rows = first_row * cols..(first_row + n_rows) * cols;
        for (&layer, out) in req.layers.iter().zip(outs.iter_mut()) {
            let plan = &self.layers[layer];
            let out = &mut out[rows.clone()];
            if kernel.simd && plan.simd_ok {
                // SAFETY: `kernel.simd` is only true when `simd_available()` detected AVX-512
                // at run time; `plan.simd_ok` holds; `out` holds `cols` values per scratch
                // token; `kernel.stream` is only set for 64-byte aligned outputs.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::hash_layer(
                        plan,
                        self.max_ngram,
                        self.n_head,
                        scratch,
                        out,
                        req.flat,
                        kernel.stream,
                    );
                    continue;
                }
            }
            hash_layer_scalar(plan, self.max_ngram, self.n_head, scratch, out, req.flat);
        }
    }
}

/// Which kernel a call runs: AVX-512 or scalar, and streaming stores or not.
#[derive(Clone, Copy, Debug)]
struct Kernel {
    simd: bool,
    stream: bool,
}

/// The error of an id array that changed while a call read it.
fn ids_changed() -> EngramError {
    EngramError::Invalid(
        "the ids changed while they were being hashed (another thread wrote the array): \
         do not write an array that a hashing call is reading, or pass a copy"
            .into(),
    )
}

/// Whether the AVX-512 reduction runs (see [`crate::cpu`]).
pub fn simd_available() -> bool {
    crate::cpu::avx512()
}

#[cfg(test)]
mod tests;
