//! The hasher's plan of each layer (multipliers, primes, column offsets, reductions) and its
//! accessors.

use super::*;

impl NgramHasher {
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
}
