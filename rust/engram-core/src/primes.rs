//! Table sizes: the distinct primes of SPEC section 2 (one per layer, n-gram order and head).

use crate::error::{EngramError, Result};
use std::collections::HashSet;

fn mul_mod(a: u64, b: u64, m: u64) -> u64 {
    ((a as u128 * b as u128) % m as u128) as u64
}

fn pow_mod(mut base: u64, mut exp: u64, m: u64) -> u64 {
    let mut acc = 1 % m;
    base %= m;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul_mod(acc, base, m);
        }
        base = mul_mod(base, base, m);
        exp >>= 1;
    }
    acc
}

/// Deterministic Miller-Rabin, exact for every `u64` (these bases cover all n < 3.3e24).
pub fn is_prime(n: u64) -> bool {
    const BASES: [u64; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    if n < 2 {
        return false;
    }
    for &p in &BASES {
        if n.is_multiple_of(p) {
            return n == p;
        }
    }
    let (mut d, mut s) = (n - 1, 0u32);
    while d.is_multiple_of(2) {
        d /= 2;
        s += 1;
    }
    'witness: for &a in &BASES {
        let mut x = pow_mod(a, d, n);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = mul_mod(x, x, n);
            if x == n - 1 {
                continue 'witness;
            }
        }
        return false;
    }
    true
}

/// Primes for `num_layers` layers, indexed `[layer][order - 2][head]`, drawn in SPEC order from one
/// shared `seen` set so that every prime is distinct.
pub fn layer_primes(
    engram_vocab_size: &[u64],
    n_head: usize,
    num_layers: usize,
) -> Result<Vec<Vec<Vec<u64>>>> {
    layer_primes_interruptible(engram_vocab_size, n_head, num_layers, &mut || Ok(()))
}

/// Candidates tested between two calls of the `interrupt` check.
const CHECK_EVERY: u32 = 1 << 14;

/// [`layer_primes`], calling `interrupt` every few thousand candidates: an absurd config (a
/// million heads) takes minutes, and a caller can stop it there (Ctrl-C from Python).
pub fn layer_primes_interruptible(
    engram_vocab_size: &[u64],
    n_head: usize,
    num_layers: usize,
    interrupt: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<Vec<Vec<u64>>>> {
    if let Some(&bad) = engram_vocab_size.iter().find(|&&v| v == 0) {
        return Err(EngramError::Config {
            field: "engram_vocab_size",
            value: bad.to_string(),
            reason: "every size must be positive".into(),
        });
    }
    let mut seen = HashSet::new();
    let mut tested = 0u32;
    let mut layers = Vec::with_capacity(num_layers);
    for _ in 0..num_layers {
        let mut orders = Vec::with_capacity(engram_vocab_size.len());
        for &size in engram_vocab_size {
            let mut start = size - 1;
            let mut heads = Vec::with_capacity(n_head);
            for _ in 0..n_head {
                let mut candidate = start.checked_add(1);
                while let Some(c) = candidate {
                    tested = tested.wrapping_add(1);
                    if tested.is_multiple_of(CHECK_EVERY) {
                        interrupt()?;
                    }
                    if is_prime(c) && !seen.contains(&c) {
                        break;
                    }
                    candidate = c.checked_add(1);
                }
                let p =
                    candidate
                        .filter(|&c| c < (1u64 << 62))
                        .ok_or_else(|| EngramError::Config {
                            field: "engram_vocab_size",
                            value: size.to_string(),
                            reason: "table sizes must stay below 2**62".into(),
                        })?;
                seen.insert(p);
                heads.push(p);
                start = p;
            }
            orders.push(heads);
        }
        layers.push(orders);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial_division(n: u64) -> bool {
        n >= 2
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    }

    #[test]
    fn miller_rabin_matches_trial_division() {
        for n in 0..20_000u64 {
            assert_eq!(is_prime(n), trial_division(n), "n = {n}");
        }
        for n in 16_000_000..16_001_000u64 {
            assert_eq!(is_prime(n), trial_division(n), "n = {n}");
        }
        assert!(is_prime(18_446_744_073_709_551_557)); // largest u64 prime
        assert!(!is_prime(3_215_031_751)); // strong pseudoprime to bases 2, 3, 5, 7
    }

    #[test]
    fn demo_primes_are_the_published_ones() {
        let p = layer_primes(&[646_400, 646_400], 8, 2).unwrap();
        assert_eq!(
            p[0][0],
            [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523]
        );
        assert_eq!(p[1][1][7], 646879);
        let rows: u64 = p[0].iter().flatten().sum();
        assert_eq!(rows, 10_344_164);
    }

    #[test]
    fn an_interrupt_stops_the_search() {
        let mut calls = 0;
        let err = layer_primes_interruptible(&[646_400; 2], 100_000, 2, &mut || {
            calls += 1;
            if calls == 3 {
                Err(EngramError::Invalid("stop".into()))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err, EngramError::Invalid("stop".into()));
        assert_eq!(calls, 3);
    }

    #[test]
    fn zero_size_is_rejected() {
        let err = layer_primes(&[10, 0], 2, 1).unwrap_err();
        assert!(err.to_string().contains("engram_vocab_size = 0"), "{err}");
    }
}
