//! The hashing fields of an Engram config, their rules, and the hasher derived from them.

use super::{LayerSpec, NgramHasher};
use crate::error::{EngramError, Result};

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
}
