//! The fingerprint of a tokenizer: a hash of every id's token and of the decoder, which a saved
//! table must match.

use super::vocabulary::Vocabulary;
use rayon::prelude::*;

/// Bumped whenever the table a tokenizer yields could change, so old saved tables stop matching.
const FINGERPRINT_VERSION: &[u8] = b"engram_rs compress v1";

/// A 64-bit FNV-1a hash; fingerprints only need to tell tokenizers apart by accident.
fn fnv(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Hash of one id's token (distinguishes an unused id from an empty token).
fn token_hash(token: Option<&str>) -> u64 {
    match token {
        Some(t) => fnv(
            fnv(FNV_OFFSET, &(t.len() as u64).to_le_bytes()),
            t.as_bytes(),
        ),
        None => fnv(FNV_OFFSET, &u64::MAX.to_le_bytes()),
    }
}

/// A hash of what the table is computed from: every id's token string and the decoder.
///
/// A saved table is valid for a tokenizer exactly when the fingerprints agree.
pub fn fingerprint(vocab: &Vocabulary) -> String {
    let token_hashes: Vec<u64> = (0..vocab.len())
        .into_par_iter()
        .map(|id| token_hash(vocab.token(id)))
        .collect();
    let decoder = serde_json::to_string(&vocab.decoder).expect("a decoder serializes");
    let mut parts = vec![
        FINGERPRINT_VERSION.to_vec(),
        (token_hashes.len() as u64).to_le_bytes().to_vec(),
        decoder.into_bytes(),
    ];
    parts.push(token_hashes.iter().flat_map(|h| h.to_le_bytes()).collect());
    let [a, b] = [FNV_OFFSET, FNV_OFFSET ^ 0x9e37_79b9_7f4a_7c15].map(|seed| {
        parts
            .iter()
            .fold(seed, |h, p| fnv(fnv(h, &(p.len() as u64).to_le_bytes()), p))
    });
    format!("{a:016x}{b:016x}")
}
