//! Tokenizer compression (vocabulary projection), exact to SPEC section 1.
//!
//! Every id of an HF `tokenizer.json` is decoded on its own the way the `tokenizers` crate (the
//! code behind the Python package's `Tokenizer.decode`) decodes it, normalized, and numbered by
//! the first appearance of its normalized key. Decoding and normalizing run in parallel over the
//! vocabulary; the numbering is one ordered pass, so the result never depends on scheduling.
//!
//! Decoding one id reads only the id's token string and the decoder, so a [`Vocabulary`] holds
//! exactly those. For the common models (BPE, WordPiece, WordLevel) it is read straight from the
//! JSON, replaying the crate's rules for added tokens, without building the crate's model (its
//! vocabulary maps and merges cost more than the whole compression); anything unusual falls back
//! to a full load with the crate and reads the tokens from it. The tests hold both loads equal.
//! Every id is decoded by the crate's own decoder, as `Tokenizer::decode` does.

mod encode;
mod fingerprint;
mod normalize;
mod vocabulary;

pub use encode::TextTokenizer;
pub use fingerprint::fingerprint;
pub use normalize::normalize;
pub use vocabulary::Vocabulary;

use crate::error::Result;
use normalize::normalize_into;
use rayon::prelude::*;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};

/// The table of one tokenizer: raw id -> compressed id, plus what identifies its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compression {
    /// `lookup[t]` = compressed id of raw id `t`, for every id of the tokenizer.
    pub lookup: Vec<i64>,
    /// Number of distinct compressed ids.
    pub compressed_size: usize,
    /// [`fingerprint`] of the source tokenizer.
    pub fingerprint: String,
}

/// A hasher that passes through a hash computed beforehand (see [`Prehashed`]).
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is ever called; fold anything else in rather than lose it.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, h: u64) {
        self.0 = h;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A string with its hash (from one keyed [`RandomState`]), so that the
/// hashing runs in parallel and the map inserts in order.
struct Prehashed<'a> {
    hash: u64,
    text: &'a str,
}

impl Hash for Prehashed<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Prehashed<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.text == other.text
    }
}

impl Eq for Prehashed<'_> {}

type PrehashedMap<'a, V> = HashMap<Prehashed<'a>, V, BuildHasherDefault<PassThrough>>;

/// Ids per parallel task of [`compress`].
const CHUNK: usize = 2048;

/// The compression keys of a run of ids, back to back, with their hashes.
struct Keys {
    text: String,
    ends: Vec<usize>,
    hashes: Vec<u64>,
}

/// The compression keys (SPEC section 1, steps 1-2) of `ids`.
fn keys_of(vocab: &Vocabulary, ids: std::ops::Range<usize>, state: &RandomState) -> Result<Keys> {
    let n = ids.len();
    let mut keys = Keys {
        text: String::with_capacity(n * 8),
        ends: Vec::with_capacity(n),
        hashes: Vec::with_capacity(n),
    };
    let (mut text, mut scratch) = (String::new(), String::new());
    for id in ids {
        let start = keys.text.len();
        text.clear();
        vocab.decode_into(id, &mut text)?;
        if text.contains('\u{FFFD}') {
            keys.text.push_str(vocab.token(id).unwrap_or(""));
        } else {
            normalize_into(&text, &mut scratch, &mut keys.text);
            if keys.text.len() == start {
                keys.text.push_str(&text);
            }
        }
        keys.ends.push(keys.text.len());
        keys.hashes.push(state.hash_one(&keys.text[start..]));
    }
    Ok(keys)
}

/// Builds the raw -> compressed table of a tokenizer, in parallel over its vocabulary.
pub fn compress(vocab: &Vocabulary) -> Result<Compression> {
    let len = vocab.len();
    let state = RandomState::new();
    let starts: Vec<usize> = (0..len).step_by(CHUNK).collect();
    let chunks: Vec<Keys> = starts
        .into_par_iter()
        .map(|s| keys_of(vocab, s..len.min(s + CHUNK), &state))
        .collect::<Result<_>>()?;
    let mut seen: PrehashedMap<'_, i64> = HashMap::default();
    seen.reserve(len);
    let mut lookup = Vec::with_capacity(len);
    for chunk in &chunks {
        let mut start = 0;
        for (&end, &hash) in chunk.ends.iter().zip(&chunk.hashes) {
            let key = Prehashed {
                hash,
                text: &chunk.text[start..end],
            };
            let next = seen.len() as i64;
            lookup.push(*seen.entry(key).or_insert(next));
            start = end;
        }
    }
    Ok(Compression {
        lookup,
        compressed_size: seen.len(),
        fingerprint: fingerprint(vocab),
    })
}

#[cfg(test)]
mod tests {
    use super::vocabulary::read_vocabulary;
    use super::*;
    use crate::error::EngramError;
    use std::path::Path;
    use std::str::FromStr;
    use tokenizers::Tokenizer;

    /// `Tokenizer::decode(&[id], false)` the way [`compress`] computes it.
    fn decoded(vocab: &Vocabulary, id: usize) -> String {
        let mut text = String::new();
        vocab.decode_into(id, &mut text).unwrap();
        text
    }

    fn tokenizer_json(added: &str, normalizer: &str, decoder: &str, model: &str) -> String {
        format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null,
                "added_tokens": {added}, "normalizer": {normalizer},
                "pre_tokenizer": null, "post_processor": null, "decoder": {decoder},
                "model": {model}}}"#
        )
    }

    fn word_level_json(vocab: &[&str], decoder: &str) -> String {
        let entries: Vec<String> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}: {i}", serde_json::to_string(t).unwrap()))
            .collect();
        let added = format!(
            r#"[{{"id": 0, "content": {}, "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}}]"#,
            serde_json::to_string(vocab[0]).unwrap()
        );
        let model = format!(
            r#"{{"type": "WordLevel", "vocab": {{{}}}, "unk_token": {}}}"#,
            entries.join(", "),
            serde_json::to_string(vocab[0]).unwrap()
        );
        tokenizer_json(&added, "null", decoder, &model)
    }

    fn word_level(vocab: &[&str], decoder: &str) -> Vocabulary {
        Vocabulary::from_json(&word_level_json(vocab, decoder)).unwrap()
    }

    const BYTE_LEVEL: &str = r#"{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}"#;

    /// Reading the JSON directly gives what the crate's full load gives: the same ids, tokens,
    /// decoded strings, table and fingerprint. `direct` says whether the direct read applies.
    fn assert_same_as_crate(json: &str, direct: bool) {
        let full = Tokenizer::from_str(json).unwrap();
        let ours = read_vocabulary(json);
        assert_eq!(ours.is_some(), direct, "{json}");
        let ours = ours.unwrap_or_else(|| Vocabulary::from_json(json).unwrap());
        let crate_vocab = Vocabulary::from_tokenizer(&full).unwrap();
        let len = full.get_vocab_size(true);
        assert_eq!(ours.len(), len, "{json}");
        for id in 0..len + 2 {
            let token = full.id_to_token(id as u32);
            assert_eq!(ours.token(id), token.as_deref(), "{json} {id}");
            if id < len {
                assert_eq!(
                    decoded(&ours, id),
                    full.decode(&[id as u32], false).unwrap(),
                    "{json} {id}"
                );
            }
        }
        assert_eq!(compress(&ours).unwrap(), compress(&crate_vocab).unwrap());
        assert_eq!(fingerprint(&ours), fingerprint(&crate_vocab));
    }

    #[test]
    fn first_appearance_numbering() {
        let vocab = word_level(
            &[
                "<s>", "Apple", " apple", "APPLE", "pear", "ǅ", "dz", "\t", "", "\u{a0}",
            ],
            "null",
        );
        let c = compress(&vocab).unwrap();
        assert_eq!(c.lookup, vec![0, 1, 1, 1, 2, 3, 3, 4, 5, 4]);
        assert_eq!(c.compressed_size, 6);
        assert_eq!(c.fingerprint, fingerprint(&vocab));
        assert_eq!(c.fingerprint.len(), 32);
    }

    #[test]
    fn partial_bytes_keep_their_token() {
        // Byte-level "Ã" and "©" are the two bytes of "é": alone, each decodes to U+FFFD.
        let tokens = ["<s>", "Ã", "©", "Ã©", "E", "ĠHi", "hi", "é", "Ġ\u{4E00}"];
        let json = word_level_json(&tokens, BYTE_LEVEL);
        assert_same_as_crate(&json, true);
        let c = compress(&Vocabulary::from_json(&json).unwrap()).unwrap();
        // A lone "é" is byte 0xE9 (U+FFFD again); "中" is outside the byte alphabet, so the token's
        // own bytes are kept.
        assert_eq!(c.lookup, vec![0, 1, 2, 3, 3, 4, 4, 5, 6]);
    }

    #[test]
    fn fingerprint_follows_tokens_and_decoder() {
        let a = word_level(&["a", "b"], "null");
        assert_eq!(
            fingerprint(&a),
            fingerprint(&word_level(&["a", "b"], "null"))
        );
        assert_ne!(
            fingerprint(&a),
            fingerprint(&word_level(&["a", "c"], "null"))
        );
        assert_ne!(
            fingerprint(&a),
            fingerprint(&word_level(&["a", "b"], BYTE_LEVEL))
        );
    }

    #[test]
    fn direct_read_agrees_with_the_crate() {
        // Added tokens: special, normalized (rewritten by the normalizer), one already in the
        // model (keeps the model's id), an empty one (ignored), one added twice with other
        // flags, one with an id the file gets wrong.
        let added = r#"[
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true},
            {"id": 9, "content": "HeLLo", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": true, "special": false},
            {"id": 2, "content": "b", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": false},
            {"id": 7, "content": "", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": false},
            {"id": 10, "content": "HeLLo", "single_word": true, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true},
            {"id": 3, "content": "Ġ<|x|>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": true, "special": false}]"#;
        let normalizers = [
            "null",
            r#"{"type": "Sequence", "normalizers": [{"type": "Lowercase"}]}"#,
            r#"{"type": "Sequence", "normalizers": []}"#,
        ];
        let maps = [
            r#"{"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ċ": 4, "Ã": 5, "©": 6}"#,
            r#"{"a": 0, "b": 1, "ab": 5, "Ġ": 2, "Ċ": 7}"#, // ids with gaps
            r#"{}"#,
        ];
        let decoders = [
            "null",
            BYTE_LEVEL,
            r#"{"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}"#,
            r###"{"type": "WordPiece", "prefix": "##", "cleanup": true}"###,
        ];
        for map in maps {
            let models = [
                format!(
                    r#"{{"type": "BPE", "dropout": null, "unk_token": null,
                        "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": false, "byte_fallback": false, "vocab": {map},
                        "merges": []}}"#
                ),
                format!(
                    r###"{{"type": "WordPiece", "unk_token": "a",
                        "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                        "vocab": {map}}}"###
                ),
                format!(r#"{{"type": "WordLevel", "unk_token": "a", "vocab": {map}}}"#),
            ];
            for model in &models {
                for normalizer in normalizers {
                    for decoder in decoders {
                        let json = tokenizer_json(added, normalizer, decoder, model);
                        assert_same_as_crate(&json, true);
                    }
                }
            }
        }
        // Read by the crate instead: Unigram, a vocab with a token twice or an id twice.
        let unigram = r#"{"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0],
            ["a", -1.0], ["b", -2.0], ["\u2581", -3.0]]}"#;
        let twice = r#"{"type": "WordLevel", "unk_token": "a", "vocab": {"a": 0, "b": 1, "a": 2}}"#;
        let id_twice = r#"{"type": "WordLevel", "unk_token": "a", "vocab": {"a": 0, "b": 0}}"#;
        for model in [unigram, twice] {
            assert_same_as_crate(&tokenizer_json(added, "null", BYTE_LEVEL, model), false);
        }
        let json = tokenizer_json("[]", "null", "null", id_twice);
        assert!(read_vocabulary(&json).is_none());
        // Two tokens, one id: the crate counts both and keeps either for the id.
        let vocab = Vocabulary::from_json(&json).unwrap();
        assert_eq!(vocab.len(), 2);
        assert!(matches!(vocab.token(0), Some("a" | "b")));
    }

    #[test]
    fn the_reader_replays_a_pinned_tokenizers_version() {
        // `read_vocabulary` replays the deserializer and `AddedVocabulary::add_tokens` rules of
        // this exact tokenizers release; `direct_read_agrees_with_the_crate` holds them equal.
        // A new release may change those rules: re-run that test against it, then move the pin
        // (here and in Cargo.toml).
        let lock = include_str!("../../../../Cargo.lock");
        let version = lock
            .split("[[package]]")
            .find(|p| p.contains("name = \"tokenizers\""))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
            .expect("tokenizers in Cargo.lock");
        assert_eq!(version, "\"0.23.2\"");
    }

    #[test]
    fn bad_json_says_what_is_wrong() {
        let msg = |json: &str| Vocabulary::from_json(json).err().unwrap().to_string();
        assert!(msg("{\"model\": {").contains("truncated JSON"));
        assert!(msg("not json").contains("not valid JSON"));
        assert!(msg("[1, 2]").contains("not an HF tokenizer"));
        assert!(msg(r#"{"model": {"type": "Magic", "vocab": {}}}"#)
            .contains("unsupported tokenizer model type \"Magic\""));
        let bad_field = tokenizer_json(
            "[]",
            "null",
            "null",
            r#"{"type": "WordPiece", "vocab": {"a": 0}}"#,
        );
        assert!(msg(&bad_field).contains("not a loadable HF tokenizer"));
        let err = Vocabulary::from_file(Path::new("/nonexistent/tokenizer.json"))
            .err()
            .unwrap();
        assert_eq!(
            err,
            EngramError::FileNotFound {
                path: "/nonexistent/tokenizer.json".into()
            }
        );
    }
}
