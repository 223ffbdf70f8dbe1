//! The odd per-layer multipliers of SPEC section 2, drawn exactly as the official demo draws
//! them: `numpy.random.default_rng(seed + 10007 * layer).integers(0, bound, size=N,
//! dtype=int64) * 2 + 1` with `bound = max(1, (2**63 - 1) // vocab // 2)`.
//!
//! That is numpy's `SeedSequence` (entropy pool of four 32-bit words), its PCG64 bit generator
//! (128-bit LCG, XSL-RR output) and its bounded integer draw (Lemire's rejection, 32-bit when
//! the range fits 32 bits). Tests compare every piece with numpy itself.

use crate::error::{EngramError, Result};

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL_SIZE: usize = 4;

/// numpy's `SeedSequence(entropy)` (no spawn key): the mixed entropy pool.
struct SeedSequence {
    pool: [u32; POOL_SIZE],
}

impl SeedSequence {
    fn new(entropy: u64) -> Self {
        // numpy splits an int into 32-bit words, least significant first; 0 is one word.
        let words: Vec<u32> = if entropy >> 32 == 0 {
            vec![entropy as u32]
        } else {
            vec![entropy as u32, (entropy >> 32) as u32]
        };
        let mut hash_const = INIT_A;
        let mut hashmix = |value: u32| {
            let mut v = value ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_A);
            v = v.wrapping_mul(hash_const);
            v ^ (v >> XSHIFT)
        };
        let mix = |x: u32, y: u32| {
            let r = MIX_MULT_L
                .wrapping_mul(x)
                .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
            r ^ (r >> XSHIFT)
        };
        let mut pool = [0u32; POOL_SIZE];
        for (i, slot) in pool.iter_mut().enumerate() {
            *slot = hashmix(words.get(i).copied().unwrap_or(0));
        }
        for src in 0..POOL_SIZE {
            for dst in 0..POOL_SIZE {
                if src != dst {
                    pool[dst] = mix(pool[dst], hashmix(pool[src]));
                }
            }
        }
        for &word in words.iter().skip(POOL_SIZE) {
            for slot in pool.iter_mut() {
                *slot = mix(*slot, hashmix(word));
            }
        }
        Self { pool }
    }

    /// `generate_state(n, numpy.uint64)`: pairs of 32-bit words, low word first.
    fn generate_u64(&self, n: usize) -> Vec<u64> {
        let mut hash_const = INIT_B;
        let mut words = self.pool.iter().cycle().map(|&w| {
            let mut v = w ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hash_const);
            v ^ (v >> XSHIFT)
        });
        (0..n)
            .map(|_| {
                let lo = words.next().expect("cycle") as u64;
                let hi = words.next().expect("cycle") as u64;
                lo | (hi << 32)
            })
            .collect()
    }
}

/// numpy's PCG64 (XSL-RR 128/64) with its buffered 32-bit draws.
struct Pcg64 {
    state: u128,
    inc: u128,
    /// The high half of the last 64-bit output, not yet used by a 32-bit draw.
    spare: Option<u32>,
}

const PCG_MULT: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341;

impl Pcg64 {
    /// `numpy.random.default_rng(seed)`'s bit generator.
    fn from_seed(seed: u64) -> Self {
        let s = SeedSequence::new(seed).generate_u64(4);
        let init_state = ((s[0] as u128) << 64) | s[1] as u128;
        let init_seq = ((s[2] as u128) << 64) | s[3] as u128;
        let mut rng = Self {
            state: 0,
            inc: (init_seq << 1) | 1,
            spare: None,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(init_state);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    fn next_u64(&mut self) -> u64 {
        self.step();
        let folded = ((self.state >> 64) as u64) ^ (self.state as u64);
        folded.rotate_right((self.state >> 122) as u32)
    }

    fn next_u32(&mut self) -> u32 {
        if let Some(hi) = self.spare.take() {
            return hi;
        }
        let next = self.next_u64();
        self.spare = Some((next >> 32) as u32);
        next as u32
    }

    /// A draw in `[0, rng]` (inclusive), as numpy's `random_bounded_uint64_fill` without masking.
    fn bounded(&mut self, rng: u64) -> u64 {
        if rng == 0 {
            0
        } else if rng <= u32::MAX as u64 {
            // Lemire with 32-bit draws; numpy wraps `rng + 1` to 0 for rng = 2**32 - 1, and so
            // does this.
            let excl = (rng as u32).wrapping_add(1);
            let mut m = self.next_u32() as u64 * excl as u64;
            if (m as u32) < excl {
                let threshold = (u32::MAX - rng as u32) % excl.max(1);
                while (m as u32) < threshold {
                    m = self.next_u32() as u64 * excl as u64;
                }
            }
            m >> 32
        } else if rng == u64::MAX {
            self.next_u64()
        } else {
            let excl = rng + 1;
            let mut m = self.next_u64() as u128 * excl as u128;
            if (m as u64) < excl {
                let threshold = (u64::MAX - rng) % excl;
                while (m as u64) < threshold {
                    m = self.next_u64() as u128 * excl as u128;
                }
            }
            (m >> 64) as u64
        }
    }
}

/// The `max_ngram` odd multipliers of Engram layer `layer` (its id in the model, not its index).
pub fn layer_multipliers(seed: u64, layer: u64, max_ngram: usize, vocab: u64) -> Result<Vec<i64>> {
    if vocab == 0 || vocab > i64::MAX as u64 {
        return Err(EngramError::Config {
            field: "compressed_vocab_size",
            value: vocab.to_string(),
            reason: "must be in [1, 2**63)".into(),
        });
    }
    let entropy = layer
        .checked_mul(10_007)
        .and_then(|l| l.checked_add(seed))
        .filter(|&e| e <= i64::MAX as u64)
        .ok_or_else(|| EngramError::Config {
            field: "seed",
            value: seed.to_string(),
            reason: format!("seed + 10007 * layer ({layer}) must stay below 2**63"),
        })?;
    let bound = (i64::MAX as u64 / vocab / 2).max(1);
    let mut rng = Pcg64::from_seed(entropy);
    Ok((0..max_ngram)
        .map(|_| (rng.bounded(bound - 1) * 2 + 1) as i64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_multipliers_are_the_published_ones() {
        // From the golden vectors (an independent implementation): demo, vocab 98627, layer 1.
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/data/hash_vectors.json")).unwrap();
        for (preset, layers) in [("demo", [1u64, 15]), ("deepseek-v4.1-flash", [1, 14])] {
            let g = &golden["presets"][preset];
            let vocab = g["config"]["compressed_vocab_size"].as_u64().unwrap();
            let n = g["config"]["max_ngram_size"].as_u64().unwrap() as usize;
            for layer in layers {
                let want: Vec<i64> = g["multipliers"][layer.to_string()]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect();
                assert_eq!(
                    layer_multipliers(0, layer, n, vocab).unwrap(),
                    want,
                    "{preset}"
                );
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(layer_multipliers(0, 1, 3, 0).is_err());
        assert!(layer_multipliers(0, 1, 3, 1 << 63).is_err());
        let err = layer_multipliers(i64::MAX as u64, 1, 3, 10).unwrap_err();
        assert!(err.to_string().contains("must stay below 2**63"), "{err}");
    }
}
