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
            backend: Backend::Auto,
        }
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

/// The hashing fields of an Engram config (SPEC section 2; names follow the official demo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashConfig {
    /// One base table size per n-gram order 2..=N.
    pub engram_vocab_size: Vec<u64>,
    pub max_ngram_size: usize,
    pub n_head_per_ngram: usize,
    /// The model's layer ids that hold an Engram (they seed the multipliers).
    pub layer_ids: Vec<u64>,
    pub seed: u64,
}

impl HashConfig {
    /// Checks every field (the one home of these rules; the Python `EngramConfig` calls it):
    /// `max_ngram_size >= 2`, `n_head_per_ngram >= 1`, one base size >= 1 per n-gram order,
    /// distinct layer ids and `seed + 10007 * layer_id` below 2**63 (numpy's seeds).
    pub fn validate(&self) -> Result<()> {
        let err = |field, value: String, reason: String| EngramError::Config {
            field,
            value,
            reason,
        };
        let n = self.max_ngram_size;
        if n < 2 {
            return Err(err(
                "max_ngram_size",
                n.to_string(),
                "must be at least 2".into(),
            ));
        }
        if self.n_head_per_ngram < 1 {
            let h = self.n_head_per_ngram.to_string();
            return Err(err("n_head_per_ngram", h, "must be at least 1".into()));
        }
        if self.engram_vocab_size.len() + 1 != n {
            return Err(err(
                "engram_vocab_size",
                format!("{:?}", self.engram_vocab_size),
                format!(
                    "needs max_ngram_size - 1 = {} entries (one per n-gram order 2..{n}), got {}",
                    n - 1,
                    self.engram_vocab_size.len()
                ),
            ));
        }
        if let Some(i) = self.engram_vocab_size.iter().position(|&v| v < 1) {
            return Err(err(
                "engram_vocab_size",
                format!("{:?}", self.engram_vocab_size),
                format!("entry {i} (n-gram order {}) must be at least 1", i + 2),
            ));
        }
        if self.layer_ids.is_empty() {
            return Err(err(
                "layer_ids",
                "[]".into(),
                "must name at least one layer".into(),
            ));
        }
        if let Some(i) =
            (1..self.layer_ids.len()).find(|&i| self.layer_ids[..i].contains(&self.layer_ids[i]))
        {
            return Err(err(
                "layer_ids",
                format!("{:?}", self.layer_ids),
                format!("must be distinct ({} repeats)", self.layer_ids[i]),
            ));
        }
        let top = self.layer_ids.iter().copied().max().unwrap_or(0);
        if top
            .checked_mul(10_007)
            .and_then(|l| l.checked_add(self.seed))
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(err(
                "seed",
                self.seed.to_string(),
                format!(
                    "seed + 10007 * layer_id must stay below 2**63 (the demo's numpy seeds); \
                     the largest layer id is {top}"
                ),
            ));
        }
        Ok(())
    }
}

impl NgramHasher {
    /// The hasher of `config` for a compressed vocabulary of `vocab` ids with compressed pad id
    /// `pad`: multipliers and primes are derived here, exactly as the official demo derives
    /// them. `interrupt` is called now and then during the prime search (an absurd config can
    /// take minutes); an error from it stops the build.
    pub fn from_config(
        config: &HashConfig,
        vocab: u64,
        pad: i64,
        interrupt: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Self> {
        config.validate()?;
        let n = config.max_ngram_size;
        let primes = crate::primes::layer_primes_interruptible(
            &config.engram_vocab_size,
            config.n_head_per_ngram,
            config.layer_ids.len(),
            interrupt,
        )?;
        let specs = config
            .layer_ids
            .iter()
            .zip(primes)
            .map(|(&layer, orders)| {
                Ok(LayerSpec {
                    multipliers: crate::multipliers::layer_multipliers(
                        config.seed,
                        layer,
                        n,
                        vocab,
                    )?,
                    primes: orders.into_iter().flatten().collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut hasher = Self::new(n, config.n_head_per_ngram, vocab, pad, specs)?;
        hasher.layer_ids = config.layer_ids.clone();
        Ok(hasher)
    }

    /// Layer `layer`'s multipliers (one per token of the n-gram window, oldest first).
    pub fn multipliers(&self, layer: usize) -> &[i64] {
        &self.layers[layer].multipliers
    }

    /// Layer `layer`'s primes in column order (order 2 heads 0..H-1, order 3 heads ...).
    pub fn primes(&self, layer: usize) -> &[u64] {
        &self.layers[layer].primes
    }

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
                &format!(
                    "outside the compressed vocabulary [0, {vocab}): pass the compressed pad id \
                     (comp.lookup_table[raw_pad_id])"
                ),
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
                inverse: spec
                    .primes
                    .iter()
                    .map(|&p| 1.0 / p as f64 * (1.0 - 4.0 * f64::EPSILON))
                    .collect(),
                primes_f: spec.primes.iter().map(|&p| p as f64).collect(),
                offsets_f: offsets.iter().map(|&o| o as f64).collect(),
                // f64 lanes hold every prime, offset and table row exactly below 2**53.
                simd_ok: n_head.is_multiple_of(8)
                    && spec.primes.iter().all(|&p| p >= SIMD_MIN_PRIME)
                    && running < 1 << 53,
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
            layer_ids: (0..plans.len() as u64).collect(),
            layers: plans,
            lookup: None,
        })
    }

    /// Installs the raw -> compressed id table used by requests with `raw` set; every entry
    /// must be a compressed id in `[0, vocab)`.
    pub fn set_lookup(&mut self, table: Vec<i64>) -> Result<()> {
        if let Some(i) = table.iter().position(|&v| v < 0 || v as u64 >= self.vocab) {
            return Err(EngramError::Invalid(format!(
                "lookup table maps raw id {i} to {}, outside the compressed vocabulary [0, {})",
                table[i], self.vocab
            )));
        }
        self.lookup = Some(table);
        Ok(())
    }

    /// The raw -> compressed table, if one was installed.
    pub fn lookup(&self) -> Option<&[i64]> {
        self.lookup.as_deref()
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
            backend,
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
                    "layer {} has ids up to {max}, which do not fit int32{}: use int64 output \
                     (dtype=numpy.int64)",
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
        let ok = per_chunk
            .into_par_iter()
            .enumerate()
            .map(|(c, mut chunk_outs)| {
                let start = c * CHUNK;
                let end = (start + CHUNK).min(ids.len());
                self.hash_chunk(req, map, start..end, &mut chunk_outs, use_simd, stream)
            })
            .all(|ok| ok);
        if ok {
            Ok(())
        } else {
            Err(self.first_bad_id(ids, map))
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
    fn first_bad_id<I: IdElem>(&self, ids: &[I], map: Option<&[i64]>) -> EngramError {
        let vocab = map.map_or(self.vocab, |m| m.len() as u64);
        match ids.iter().position(|v| v.bits() >= vocab) {
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
        use_simd: bool,
        stream: bool,
    ) -> bool {
        let HashRequest {
            ids,
            bounds,
            history,
            layers,
            flat,
            ..
        } = *req;
        let hist_len = self.max_ngram - 1;
        let cols = self.cols();
        let mut scratch: Vec<i64> = Vec::with_capacity(CHUNK + hist_len);
        // The last segment whose start is <= range.start (skips empty segments).
        let mut seg = bounds.partition_point(|&b| b <= range.start) - 1;
        let mut pos = range.start;
        let mut valid = true;
        'pieces: while pos < range.end {
            while bounds[seg + 1] <= pos {
                seg += 1;
            }
            let seg_start = bounds[seg];
            let piece_end = bounds[seg + 1].min(range.end);
            scratch.clear();
            for back in (1..=hist_len).rev() {
                let v = if pos >= seg_start + back {
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
                break 'pieces;
            }
            let mut bad = false;
            let new = &ids[pos..piece_end];
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
            if bad {
                // Never hash an out-of-range id: its product could overflow.
                valid = false;
                break;
            }
            let rows = (pos - range.start) * cols..(piece_end - range.start) * cols;
            for (&layer, out) in layers.iter().zip(outs.iter_mut()) {
                let plan = &self.layers[layer];
                let out = &mut out[rows.clone()];
                if use_simd && plan.simd_ok {
                    // SAFETY: `use_simd` is only true when `simd_available()` detected AVX-512
                    // at run time; `plan.simd_ok` holds; `out` holds `cols` values per scratch
                    // token; `stream` is only set for 64-byte aligned outputs.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::hash_layer(
                            plan,
                            self.max_ngram,
                            self.n_head,
                            &scratch,
                            out,
                            flat,
                            stream,
                        );
                        continue;
                    }
                }
                hash_layer_scalar(plan, self.max_ngram, self.n_head, &scratch, out, flat);
            }
            pos = piece_end;
        }
        if stream {
            // SAFETY: SSE2 is baseline on x86_64. Streaming stores are weakly ordered: fence them
            // before rayon reports this chunk done to the thread that returns the output.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                std::arch::x86_64::_mm_sfence()
            };
        }
        valid
    }
}

/// The error of an id array that changed while a call read it.
fn ids_changed() -> EngramError {
    EngramError::Invalid(
        "the ids changed while they were being hashed (another thread wrote the array): \
         do not write an array that a hashing call is reading, or pass a copy"
            .into(),
    )
}

impl NgramHasher {
    /// One decode step: hashes `req` (whose `history` is ignored) with `history` as each
    /// sequence's past, then advances `history` past the new ids. On any error `history` is left
    /// as it was (the next history is built apart and copied in last). The `&mut` borrow keeps
    /// anyone else from writing `history` meanwhile; the Python binding passes its own copy.
    pub fn hash_step<I: IdElem, O: OutElem>(
        &self,
        req: &HashRequest<'_, I>,
        history: &mut [i64],
        outs: &mut [&mut [O]],
    ) -> Result<()> {
        let step = HashRequest {
            history: Some(&*history),
            ..*req
        };
        self.hash_segments(&step, outs)?;
        let next = self.advanced_history(history, req.ids, req.bounds, req.raw)?;
        history.copy_from_slice(&next);
        Ok(())
    }

    /// The compressed id of caller id `b` (mapped through `map` when the ids are raw), or `None`
    /// when it is out of range: the check of every id read outside the vectorised main loop.
    #[inline]
    fn compressed(&self, b: u64, map: Option<&[i64]>) -> Option<i64> {
        match map {
            Some(m) => m.get(b as usize).copied(),
            None => (b < self.vocab).then_some(b as i64),
        }
    }

    /// The last `N - 1` compressed ids of each segment's full history (`past` row followed by
    /// the segment's new ids); every id is checked again, since the caller's array may have
    /// changed since it was hashed.
    fn advanced_history<I: IdElem>(
        &self,
        past: &[i64],
        ids: &[I],
        bounds: &[usize],
        raw: bool,
    ) -> Result<Vec<i64>> {
        let hist_len = self.max_ngram - 1;
        let map = if raw { self.lookup.as_deref() } else { None };
        let mut next = past.to_vec();
        for (row, w) in next.chunks_exact_mut(hist_len).zip(bounds.windows(2)) {
            let new = &ids[w[0]..w[1]];
            let keep = new.len().min(hist_len);
            row.rotate_left(keep);
            for (dst, src) in row[hist_len - keep..]
                .iter_mut()
                .zip(&new[new.len() - keep..])
            {
                *dst = self.compressed(src.bits(), map).ok_or_else(ids_changed)?;
            }
        }
        Ok(next)
    }
}

/// Whether the AVX-512 reduction runs (see [`crate::cpu`]).
pub fn simd_available() -> bool {
    crate::cpu::avx512()
}

/// Scalar kernel: `scratch` holds `N - 1` history ids followed by one id per output row.
/// The window/mix loop every kernel shares (SPEC section 3): for the `n` ids of `window`
/// (oldest first), calls `f(k, mix)` for each n-gram order `k + 1` (k = 1..n), where `mix` is
/// the XOR of `window[n - 1 - j] * multipliers[j]` over j <= k. Ids and multipliers are
/// validated so that every product stays below 2**63 (no overflow).
#[inline(always)]
fn for_each_mix(window: &[i64], multipliers: &[i64], mut f: impl FnMut(usize, i64)) {
    let n = window.len();
    let mut mix = window[n - 1] * multipliers[0];
    for k in 1..n {
        mix ^= window[n - 1 - k] * multipliers[k];
        f(k, mix);
    }
}

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

#[cfg(target_arch = "x86_64")]
mod avx512;

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
        let req = HashRequest {
            flat,
            backend,
            ..HashRequest::new(ids, bounds, &layers)
        };
        hasher.hash_segments(&req, &mut outs)?;
        Ok(bufs
            .into_iter()
            .map(|b| b.into_iter().map(Into::into).collect())
            .collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn fast_paths_match_reference(
            // 2..=4 have specialised AVX-512 kernels, larger orders the generic one.
            n in 2usize..9,
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
        fn extreme_mixes_reduce_exactly(
            vocab in 2u64..8,
            base in prop::sample::select(vec![16_384u64, 16_385, 646_400, 16_000_000, 1 << 40]),
            slack in prop::collection::vec(0u64..1000, 4),
            ids in prop::collection::vec(0u64..8, 1..200),
        ) {
            // Multipliers at the top of their range push mixes towards 2**63, where f64 rounds.
            let bound = i64::MAX as u64 / vocab;
            let multipliers: Vec<i64> = slack.iter().map(|&s| (bound - s) as i64).collect();
            let primes = layer_primes(&[base; 3], 8, 1).unwrap().remove(0).concat();
            let spec = LayerSpec { multipliers, primes };
            let hasher = NgramHasher::new(4, 8, vocab, 0, vec![spec.clone()]).unwrap();
            let ids: Vec<i64> = ids.iter().map(|&v| (v % vocab) as i64).collect();
            let auto = run::<i64>(&hasher, &ids, &[0, ids.len()], false, Backend::Auto).unwrap();
            let expected: Vec<i64> =
                reference(&spec, 4, 8, 0, &ids).into_iter().map(|v| v as i64).collect();
            prop_assert_eq!(&auto[0], &expected);
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
            let bounds = [0, tail.len()];
            let req = HashRequest { history: Some(&history), ..HashRequest::new(tail, &bounds, &[0]) };
            hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap();
            prop_assert_eq!(&out[..], &whole[0][split * cols..]);
        }
    }

    /// A 64-byte aligned `&mut [O]` of `n` values inside `storage` (a `Vec` is only 8-aligned).
    fn aligned<O: OutElem>(storage: &mut Vec<O>, n: usize) -> &mut [O] {
        storage.resize(n + 64, O::default());
        let skip = storage.as_ptr().align_offset(64);
        &mut storage[skip..skip + n]
    }

    #[test]
    fn streaming_stores_match_the_scalar_path() {
        // Outputs of 8 MiB or more, 64-byte aligned, take the streaming-store path; every order
        // with a specialised kernel, int64 and int32, plain and flat.
        if !simd_available() {
            eprintln!("skipped: no AVX-512 (or ENGRAM_RS_FORCE_SCALAR set), nothing to compare");
            return;
        }
        for n in 2..=5 {
            let vocab = 99_092;
            let specs = specs(&vec![646_400; n - 1], 8, vocab, n as u64, 2);
            let hasher = NgramHasher::new(n, 8, vocab, 2, specs).unwrap();
            let cols = hasher.cols();
            let tokens = (STREAM_MIN_BYTES / 4 / cols).max(CHUNK * 3 + 17);
            let ids: Vec<i64> = (0..tokens as i64)
                .map(|i| i * 7919 % vocab as i64)
                .collect();
            let bounds = [0, 1000, tokens / 2, tokens];
            let layers = [0usize, 1];
            for flat in [false, true] {
                let req = HashRequest {
                    flat,
                    ..HashRequest::new(&ids[..], &bounds[..], &layers[..])
                };
                let (mut a, mut b) = (Vec::<i64>::new(), Vec::<i64>::new());
                let mut fast = [
                    aligned(&mut a, tokens * cols),
                    aligned(&mut b, tokens * cols),
                ];
                hasher.hash_segments(&req, &mut fast).unwrap();
                let scalar = run::<i64>(&hasher, &ids, &bounds, flat, Backend::Scalar).unwrap();
                assert!(
                    fast[0][..] == scalar[0][..] && fast[1][..] == scalar[1][..],
                    "n={n}"
                );
                let (mut c, mut d) = (Vec::<i32>::new(), Vec::<i32>::new());
                let mut narrow = [
                    aligned(&mut c, tokens * cols),
                    aligned(&mut d, tokens * cols),
                ];
                hasher.hash_segments(&req, &mut narrow).unwrap();
                let widened: Vec<i64> = narrow[1].iter().map(|&v| v as i64).collect();
                assert!(widened == scalar[1], "int32 n={n}");
            }
        }
    }

    #[test]
    fn golden_vectors_from_the_config_alone() {
        // The core alone (no Python, no numpy) reproduces the independent implementation's ids:
        // multipliers, primes and hashes from the config, every case of both presets.
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../../../../tests/data/hash_vectors.json")).unwrap();
        let nums = |v: &serde_json::Value| -> Vec<u64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        };
        for preset in ["demo", "deepseek-v4.1-flash"] {
            let g = &golden["presets"][preset];
            let c = &g["config"];
            let config = HashConfig {
                engram_vocab_size: nums(&c["engram_vocab_size"]),
                max_ngram_size: c["max_ngram_size"].as_u64().unwrap() as usize,
                n_head_per_ngram: c["n_head_per_ngram"].as_u64().unwrap() as usize,
                layer_ids: nums(&c["layer_ids"]),
                seed: c["seed"].as_u64().unwrap(),
            };
            let vocab = c["compressed_vocab_size"].as_u64().unwrap();
            let pad = c["pad_id"].as_i64().unwrap();
            let hasher = NgramHasher::from_config(&config, vocab, pad, &mut || Ok(())).unwrap();
            let layers: Vec<usize> = (0..config.layer_ids.len()).collect();
            for case in g["cases"].as_array().unwrap() {
                let rows = case["input"].as_array().unwrap();
                let ids: Vec<i64> = rows.iter().flat_map(&nums).map(|v| v as i64).collect();
                let t = rows[0].as_array().unwrap().len();
                let bounds: Vec<usize> = (0..=rows.len()).map(|r| r * t).collect();
                for backend in [Backend::Auto, Backend::Scalar] {
                    let req = HashRequest {
                        backend,
                        ..HashRequest::new(&ids[..], &bounds[..], &layers[..])
                    };
                    let mut bufs = vec![vec![0i64; ids.len() * hasher.cols()]; layers.len()];
                    let mut outs: Vec<&mut [i64]> =
                        bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                    hasher.hash_segments(&req, &mut outs).unwrap();
                    for (l, layer_id) in config.layer_ids.iter().enumerate() {
                        let want: Vec<i64> = case["expected"][layer_id.to_string()]
                            .as_array()
                            .unwrap()
                            .iter()
                            .flat_map(|row| row.as_array().unwrap())
                            .flat_map(&nums)
                            .map(|v| v as i64)
                            .collect();
                        assert_eq!(bufs[l], want, "{preset} layer {layer_id} {backend:?}");
                    }
                }
            }
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
                vocab: 1000,
                raw: false,
            }
        );
        let ids = vec![u64::MAX; 3];
        let mut out = vec![0i64; 3 * 16];
        let err = hasher
            .hash_segments(&HashRequest::new(&ids, &[0, 3], &[0]), &mut [&mut out[..]])
            .unwrap_err();
        assert_eq!(
            err,
            EngramError::IdOutOfRange {
                value: u64::MAX as i128,
                index: 0,
                vocab: 1000,
                raw: false,
            }
        );
    }

    #[test]
    fn raw_ids_go_through_the_lookup_table() {
        let mut hasher =
            NgramHasher::new(3, 8, 1000, 2, specs(&[646_400; 2], 8, 1000, 3, 1)).unwrap();
        let raw: Vec<u32> = (0..5000).map(|i| (i * 7919) % 1500).collect();
        let lookup: Vec<i64> = (0..1500).map(|i| (i * 31) % 1000).collect();
        let mapped: Vec<i64> = raw.iter().map(|&r| lookup[r as usize]).collect();
        let bounds = [0, 1234, 1234, 5000];
        let req = HashRequest {
            raw: true,
            ..HashRequest::new(&raw[..], &bounds, &[0])
        };
        let mut out = vec![0i64; 5000 * 16];
        let err = hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap_err();
        assert!(err.to_string().contains("lookup table"), "{err}");
        assert!(
            hasher.set_lookup(vec![0, 1000]).is_err(),
            "entries must be compressed ids"
        );
        hasher.set_lookup(lookup).unwrap();
        hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap();
        let expected = run::<i64>(&hasher, &mapped, &bounds, false, Backend::Auto).unwrap();
        assert_eq!(out, expected[0]);
        let mut bad = raw.clone();
        bad[3000] = 1500;
        let req = HashRequest {
            raw: true,
            ..HashRequest::new(&bad[..], &bounds, &[0])
        };
        let err = hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap_err();
        assert_eq!(
            err,
            EngramError::IdOutOfRange {
                value: 1500,
                index: 3000,
                vocab: 1500,
                raw: true
            }
        );
    }

    #[test]
    fn int32_output_is_refused_when_ids_do_not_fit() {
        // 24 primes above 2e8 sum past 2**31: flat ids need int64, per-head ids fit int32.
        let hasher =
            NgramHasher::new(4, 8, 99_092, 2, specs(&[200_000_000; 3], 8, 99_092, 1, 1)).unwrap();
        let mut out = vec![0i32; 16 * 24];
        let req = HashRequest::new(&[1i64; 16], &[0, 16], &[0]);
        let flat = HashRequest { flat: true, ..req };
        let err = hasher
            .hash_segments(&flat, &mut [&mut out[..]])
            .unwrap_err();
        assert!(err.to_string().contains("use int64 output"), "{err}");
        hasher.hash_segments(&req, &mut [&mut out[..]]).unwrap();
    }

    #[test]
    fn bad_bounds_and_config_are_rejected() {
        let specs = specs(&[100; 2], 2, 50, 1, 1);
        let hasher = NgramHasher::new(3, 2, 50, 2, specs.clone()).unwrap();
        let mut out = [0i64; 4 * 4];
        for bounds in [&[0usize, 3][..], &[1, 4], &[0, 3, 2, 4]] {
            let req = HashRequest::new(&[1i64; 4], bounds, &[0]);
            assert!(hasher.hash_segments(&req, &mut [&mut out[..]]).is_err());
        }
        assert!(NgramHasher::new(1, 2, 50, 2, specs.clone()).is_err());
        assert!(NgramHasher::new(3, 2, 50, 50, specs.clone()).is_err());
        assert!(NgramHasher::new(3, 2, 0, 0, specs.clone()).is_err());
        let mut overflowing = specs[0].clone();
        overflowing.multipliers[1] = i64::MAX;
        assert!(NgramHasher::new(3, 2, 50, 2, vec![overflowing]).is_err());
    }

    #[test]
    fn config_rules_live_in_validate() {
        let good = HashConfig {
            engram_vocab_size: vec![646_400, 646_400],
            max_ngram_size: 3,
            n_head_per_ngram: 8,
            layer_ids: vec![1, 15],
            seed: 0,
        };
        assert_eq!(good.validate(), Ok(()));
        let field = |c: HashConfig| match c.validate() {
            Err(EngramError::Config { field, reason, .. }) => format!("{field}: {reason}"),
            other => panic!("{other:?}"),
        };
        let with = |f: &dyn Fn(&mut HashConfig)| {
            let mut c = good.clone();
            f(&mut c);
            field(c)
        };
        assert!(with(&|c| c.max_ngram_size = 1).starts_with("max_ngram_size"));
        assert!(with(&|c| c.n_head_per_ngram = 0).starts_with("n_head_per_ngram"));
        assert!(with(&|c| c.engram_vocab_size = vec![9]).contains("needs max_ngram_size - 1 = 2"));
        assert!(with(&|c| c.engram_vocab_size[1] = 0).contains("entry 1 (n-gram order 3)"));
        assert!(with(&|c| c.layer_ids.clear()).contains("at least one layer"));
        assert!(with(&|c| c.layer_ids = vec![3, 3]).contains("distinct (3 repeats)"));
        assert!(with(&|c| c.seed = i64::MAX as u64).starts_with("seed"));
        assert!(with(&|c| c.layer_ids = vec![u64::MAX]).starts_with("seed"));
        // from_config refuses the same configs before any prime search.
        let mut bad = good.clone();
        bad.layer_ids = vec![2, 2];
        assert!(NgramHasher::from_config(&bad, 1000, 2, &mut || Ok(())).is_err());
    }
}
