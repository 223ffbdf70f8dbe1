//! Tokenizer compression (vocabulary projection), exact to SPEC section 1.
//!
//! Every id of an HF `tokenizer.json` is decoded on its own with the `tokenizers` crate (the code
//! behind the Python package's `Tokenizer.decode`), normalized, and numbered by the first
//! appearance of its normalized key. Decoding and normalizing run in parallel over the
//! vocabulary; the numbering is one ordered pass, so the result never depends on scheduling.
//!
//! Only what decoding reads is loaded: the vocabulary, the added tokens, the normalizer (it
//! rewrites `normalized` added tokens) and the decoder. BPE merges, pre-tokenizer and
//! post-processor are left out of the tokenizer that is built (they shape encoding, never
//! `decode` or `id_to_token`), which makes loading faster than loading the whole tokenizer.

use crate::error::{EngramError, Result};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use tokenizers::models::{bpe::BPE, unigram::Unigram, wordlevel::WordLevel, wordpiece::WordPiece};
use tokenizers::{AddedToken, Decoder, DecoderWrapper, ModelWrapper, NormalizerWrapper, Tokenizer};
use unicode_normalization_alignments::char::is_combining_mark;
use unicode_normalization_alignments::UnicodeNormalization;

/// Stands in for a lone space while the string is stripped (SPEC section 1).
const SENTINEL: char = '\u{E000}';

/// Model types the `tokenizers` crate deserializes.
const MODEL_TYPES: [&str; 4] = ["BPE", "WordPiece", "WordLevel", "Unigram"];

/// Bumped whenever the table a tokenizer yields could change, so old saved tables stop matching.
const FINGERPRINT_VERSION: &[u8] = b"engram_rs compress v1";

/// The SPEC section 1 normalizer: NFKC, NFD, no marks, lowercase, one space per whitespace run,
/// stripped (a lone space survives).
///
/// The steps of the `tokenizers` normalizers the reference chains (`NFKC`, `NFD`,
/// `StripAccents`, `Lowercase`, `Replace`, `Strip`) fused into one pass over the chars, with the
/// same Unicode tables; the tests check it against that chain.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_run = false;
    let mut push = |c: char| {
        // No char lowercases to whitespace, so collapsing after lowercasing each char is the
        // same as collapsing the lowercased string.
        if matches!(c, ' ' | '\t' | '\r' | '\n') {
            if !in_run {
                out.push(' ');
            }
            in_run = true;
        } else {
            out.push(c);
            in_run = false;
        }
    };
    if text.is_ascii() {
        // Both normalizations are the identity on ASCII and no ASCII char is a mark.
        text.chars().for_each(|c| push(c.to_ascii_lowercase()));
    } else {
        let nfkc: String = text.nfkc().map(|(c, _)| c).collect();
        for (c, _) in nfkc.nfd() {
            if !is_combining_mark(c) {
                c.to_lowercase().for_each(&mut push);
            }
        }
    }
    if out == " " {
        return out;
    }
    let stripped = out.trim_matches(char::is_whitespace);
    if stripped.contains(SENTINEL) {
        // The reference turns every U+E000, not just its own sentinel, back into a space.
        stripped.replace(SENTINEL, " ")
    } else {
        stripped.to_owned()
    }
}

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

/// Loads the decoding part of an HF `tokenizer.json` from disk.
pub fn load_tokenizer_file(path: &Path) -> Result<Tokenizer> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| EngramError::io(path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| EngramError::Tokenizer {
        origin: shown.clone(),
        reason: format!("not UTF-8 text ({e}): expected an HF tokenizer.json"),
    })?;
    parse_tokenizer(text, &shown)
}

/// Loads the decoding part of a tokenizer from the text of a `tokenizer.json` (what
/// `Tokenizer.to_str()` returns).
pub fn load_tokenizer_json(json: &str) -> Result<Tokenizer> {
    parse_tokenizer(json, "tokenizer JSON")
}

/// The fields of a `tokenizer.json` that decoding reads, left unparsed.
#[derive(Deserialize)]
struct DecodingParts<'a> {
    #[serde(borrow)]
    version: Option<&'a RawValue>,
    #[serde(borrow)]
    added_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    decoder: Option<&'a RawValue>,
    #[serde(borrow)]
    normalizer: Option<&'a RawValue>,
    #[serde(borrow)]
    model: HashMap<String, &'a RawValue>,
}

/// Builds the decoding part of a tokenizer the way the crate's deserializer does (same model,
/// decoder and added-token code), without the generic model buffering that makes a full load
/// slow; `None` when anything is unusual, and the caller falls back to the full load.
fn load_decoding_parts(json: &str) -> Option<Tokenizer> {
    let parts: DecodingParts<'_> = serde_json::from_str(json).ok()?;
    if let Some(v) = parts.version {
        if serde_json::from_str::<&str>(v.get()).ok()? != "1.0" {
            return None;
        }
    }
    let kind: &str = serde_json::from_str(parts.model.get("type")?.get()).ok()?;
    let fields: Vec<String> = parts
        .model
        .iter()
        .map(|(k, v)| {
            let key = serde_json::to_string(k).expect("a string serializes");
            // Merges only drive encoding; a BPE model still needs the (empty) field.
            let value = if k == "merges" { "[]" } else { v.get() };
            format!("{key}:{value}")
        })
        .collect();
    let model_json = format!("{{{}}}", fields.join(","));
    let model: ModelWrapper = match kind {
        "BPE" => serde_json::from_str::<BPE>(&model_json).ok()?.into(),
        "WordPiece" => serde_json::from_str::<WordPiece>(&model_json).ok()?.into(),
        "WordLevel" => serde_json::from_str::<WordLevel>(&model_json).ok()?.into(),
        "Unigram" => serde_json::from_str::<Unigram>(&model_json).ok()?.into(),
        _ => return None,
    };
    let mut tok = Tokenizer::new(model);
    // Before the added tokens, as the crate's deserializer does: `id_to_token` returns the
    // normalized form of an added token marked `normalized`.
    if let Some(n) = parts.normalizer {
        tok.with_normalizer(serde_json::from_str::<Option<NormalizerWrapper>>(n.get()).ok()?)
            .ok()?;
    }
    if let Some(d) = parts.decoder {
        tok.with_decoder(serde_json::from_str::<Option<DecoderWrapper>>(d.get()).ok()?);
    }
    if let Some(a) = parts.added_tokens {
        tok.add_tokens(serde_json::from_str::<Vec<AddedToken>>(a.get()).ok()?)
            .ok()?;
    }
    Some(tok)
}

fn parse_tokenizer(json: &str, origin: &str) -> Result<Tokenizer> {
    if let Some(tok) = load_decoding_parts(json) {
        return Ok(tok);
    }
    let load_err = match Tokenizer::from_str(json) {
        Ok(tok) => return Ok(tok),
        Err(e) => e.to_string(),
    };
    // Loading failed: find out why, so the message says what is wrong.
    let err = |reason: String| EngramError::Tokenizer {
        origin: origin.to_owned(),
        reason,
    };
    let value: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) if e.is_eof() => {
            return Err(err(format!(
                "truncated JSON ({e}): the text ends early; download or save the tokenizer again"
            )))
        }
        Err(e) => {
            return Err(err(format!(
                "not valid JSON ({e}): expected an HF tokenizer.json"
            )))
        }
    };
    let Some(model) = value.get("model").filter(|m| m.is_object()) else {
        return Err(err(
            "valid JSON but not an HF tokenizer (no \"model\" object): pass the tokenizer.json \
             of a fast tokenizer"
                .into(),
        ));
    };
    if let Some(kind) = model.get("type").and_then(|t| t.as_str()) {
        if !MODEL_TYPES.contains(&kind) {
            return Err(err(format!(
                "unsupported tokenizer model type {kind:?}: supported types are {}",
                MODEL_TYPES.join(", ")
            )));
        }
    }
    Err(err(format!("not a loadable HF tokenizer: {load_err}")))
}

/// What decoding id `id` on its own reads: its token string (`None` for an unused id).
fn token_of(tok: &Tokenizer, id: u32) -> Option<String> {
    tok.id_to_token(id)
}

/// `Tokenizer::decode(&[id], false)` given the id's token, without looking it up again: the
/// crate decodes the ids' tokens with the decoder, or joins them with spaces when it has none.
fn decode_token(tok: &Tokenizer, id: u32, token: Option<&str>) -> Result<String> {
    let tokens: Vec<String> = token.map(str::to_owned).into_iter().collect();
    match tok.get_decoder() {
        Some(decoder) => decoder.decode(tokens).map_err(|e| EngramError::Tokenizer {
            origin: "tokenizer".into(),
            reason: format!("decoding id {id} failed: {e}"),
        }),
        None => Ok(tokens.join(" ")),
    }
}

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

/// Combines the per-id token hashes (in id order) with the decoder into the fingerprint.
fn combine_fingerprint(tok: &Tokenizer, token_hashes: &[u64]) -> String {
    let decoder = serde_json::to_string(&tok.get_decoder()).expect("a decoder serializes");
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

/// Number of ids of the tokenizer, added and special tokens included (`len(tokenizer)`).
fn vocab_size(tok: &Tokenizer) -> Result<u32> {
    let vocab = tok.get_vocab_size(true);
    u32::try_from(vocab).map_err(|_| {
        EngramError::Invalid(format!(
            "tokenizer has {vocab} ids, more than u32 token ids can address"
        ))
    })
}

/// A hash of what the table is computed from: every id's token string and the decoder.
///
/// A saved table is valid for a tokenizer exactly when the fingerprints agree.
pub fn fingerprint(tok: &Tokenizer) -> Result<String> {
    let hashes: Vec<u64> = (0..vocab_size(tok)?)
        .into_par_iter()
        .map(|id| token_hash(token_of(tok, id).as_deref()))
        .collect();
    Ok(combine_fingerprint(tok, &hashes))
}

/// The compression key of id `id` (SPEC section 1, steps 1-2) and the hash of its token.
fn key_of(tok: &Tokenizer, id: u32) -> Result<(String, u64)> {
    let token = token_of(tok, id);
    let text = decode_token(tok, id, token.as_deref())?;
    let hash = token_hash(token.as_deref());
    if text.contains('\u{FFFD}') {
        return Ok((token.unwrap_or_default(), hash));
    }
    let norm = normalize(&text);
    Ok((if norm.is_empty() { text } else { norm }, hash))
}

/// Builds the raw -> compressed table of a tokenizer, in parallel over its vocabulary.
pub fn compress(tok: &Tokenizer) -> Result<Compression> {
    let (keys, hashes): (Vec<String>, Vec<u64>) = (0..vocab_size(tok)?)
        .into_par_iter()
        .map(|id| key_of(tok, id))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let mut seen: HashMap<&str, i64> = HashMap::with_capacity(keys.len());
    let lookup = keys
        .iter()
        .map(|key| {
            let next = seen.len() as i64;
            *seen.entry(key.as_str()).or_insert(next)
        })
        .collect();
    Ok(Compression {
        lookup,
        compressed_size: seen.len(),
        fingerprint: combine_fingerprint(tok, &hashes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;
    use tokenizers::normalizers::replace::ReplacePattern;
    use tokenizers::normalizers::{Lowercase, Replace, Sequence, Strip, StripAccents, NFD, NFKC};
    use tokenizers::{NormalizedString, Normalizer, NormalizerWrapper};

    /// The reference's chain of `tokenizers` normalizers, literally.
    fn normalize_reference(text: &str) -> String {
        static CHAIN: OnceLock<Sequence> = OnceLock::new();
        let chain = CHAIN.get_or_init(|| {
            let replace = |pattern: ReplacePattern, content: &str| {
                NormalizerWrapper::from(Replace::new(pattern, content).unwrap())
            };
            Sequence::new(vec![
                NFKC.into(),
                NFD.into(),
                StripAccents.into(),
                Lowercase.into(),
                replace(ReplacePattern::Regex(r"[ \t\r\n]+".into()), " "),
                replace(ReplacePattern::Regex(r"^ $".into()), "\u{E000}"),
                Strip::new(true, true).into(),
                replace(ReplacePattern::String("\u{E000}".into()), " "),
            ])
        });
        let mut s = NormalizedString::from(text);
        chain.normalize(&mut s).unwrap();
        s.get().to_owned()
    }

    #[test]
    fn spec_examples() {
        for (input, expected) in [
            ("ΟΔΟΣ", "οδοσ"),
            ("İstanbul", "istanbul"),
            ("Ａｐｐｌｅ", "apple"),
            ("ǅ", "dz"),
            ("ना\u{0903}", "न"),
            ("\u{3000}", " "),
            (" Apple ", "apple"),
            ("\t\n", " "),
            ("ﬁ", "fi"),
            ("", ""),
            (" \u{a0}", " "),
            ("\u{a0}X\u{2009}", "x"),
            ("\u{200b}", "\u{200b}"),
            (" \u{E000}x ", " x"),
        ] {
            assert_eq!(normalize(input), expected, "{input:?}");
            assert_eq!(normalize_reference(input), expected, "{input:?}");
        }
    }

    /// Chars where the normalization steps do something: spaces of every kind, marks of the three
    /// categories, compatibility forms, case mappings that grow or depend on context, the
    /// sentinel itself, and a few plain letters.
    const TRICKY: &[char] = &[
        ' ', '\t', '\r', '\n', '\x0b', '\x0c', '\u{85}', '\u{a0}', '\u{1680}', '\u{2009}',
        '\u{2028}', '\u{3000}', '\u{200b}', '\u{200d}', '\u{feff}', '\u{301}', '\u{327}',
        '\u{903}', '\u{94d}', '\u{20dd}', '\u{488}', 'Σ', 'σ', 'ς', 'İ', 'ı', 'ǅ', 'ß', 'ẞ', 'ﬁ',
        'Å', 'Å', 'Ａ', 'ｶ', '゙', '가', '\u{1100}', '\u{1161}', '①', '²', '㎏', 'ℌ', '\u{E000}',
        '\u{FFFD}', 'a', 'Z', '0', '.', 'é', 'ñ', '中', '😀',
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn fused_normalizer_matches_the_chain(
            tricky in prop::collection::vec(prop::sample::select(TRICKY), 0..10),
            any_text in "\\PC{0,6}",
            ascii in "[ -~\t\r\n\x0b\x0c\x1c-\x1f]{0,12}",
        ) {
            let tricky: String = tricky.into_iter().collect();
            for s in [&tricky, &any_text, &ascii, &format!("{tricky}{any_text}")] {
                prop_assert_eq!(normalize(s), normalize_reference(s), "{:?}", s);
            }
        }
    }

    fn word_level(vocab: &[&str], decoder: &str) -> Tokenizer {
        let entries: Vec<String> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}: {i}", serde_json::to_string(t).unwrap()))
            .collect();
        let json = format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null,
                "added_tokens": [{{"id": 0, "content": "{}", "single_word": false,
                  "lstrip": false, "rstrip": false, "normalized": false, "special": true}}],
                "normalizer": null, "pre_tokenizer": null, "post_processor": null,
                "decoder": {decoder},
                "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "{}"}}}}"#,
            vocab[0],
            entries.join(", "),
            vocab[0]
        );
        load_tokenizer_json(&json).unwrap()
    }

    const BYTE_LEVEL: &str = r#"{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}"#;

    #[test]
    fn first_appearance_numbering() {
        let tok = word_level(
            &[
                "<s>", "Apple", " apple", "APPLE", "pear", "ǅ", "dz", "\t", "", "\u{a0}",
            ],
            "null",
        );
        let c = compress(&tok).unwrap();
        assert_eq!(c.lookup, vec![0, 1, 1, 1, 2, 3, 3, 4, 5, 4]);
        assert_eq!(c.compressed_size, 6);
        assert_eq!(c.fingerprint, fingerprint(&tok).unwrap());
        assert_eq!(c.fingerprint.len(), 32);
    }

    #[test]
    fn partial_bytes_keep_their_token() {
        // Byte-level "Ã" and "©" are the two bytes of "é": alone, each decodes to U+FFFD.
        let tok = word_level(&["<s>", "Ã", "©", "Ã©", "E", "ĠHi", "hi"], BYTE_LEVEL);
        for id in 0..7 {
            assert_eq!(
                decode_token(&tok, id, token_of(&tok, id).as_deref()).unwrap(),
                tok.decode(&[id], false).unwrap()
            );
        }
        let c = compress(&tok).unwrap();
        assert_eq!(c.lookup, vec![0, 1, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn fingerprint_follows_tokens_and_decoder() {
        let a = word_level(&["a", "b"], "null");
        let fp = |t: &Tokenizer| fingerprint(t).unwrap();
        assert_eq!(fp(&a), fp(&word_level(&["a", "b"], "null")));
        assert_ne!(fp(&a), fp(&word_level(&["a", "c"], "null")));
        assert_ne!(fp(&a), fp(&word_level(&["a", "b"], BYTE_LEVEL)));
    }

    #[test]
    fn partial_load_agrees_with_the_full_load() {
        let added = r#"[
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true},
            {"id": 9, "content": "HeLLo", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": true, "special": false},
            {"id": 2, "content": "b", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": false},
            {"id": 7, "content": "", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": false}]"#;
        let normalizer = r#"{"type": "Sequence", "normalizers": [{"type": "Lowercase"}]}"#;
        let models = [
            r#"{"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ċ": 4},
                "merges": ["a b"]}"#,
            r#"{"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0],
                ["b", -2.0], ["\u2581", -3.0]]}"#,
            r###"{"type": "WordPiece", "unk_token": "a", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100, "vocab": {"a": 0, "##b": 1, "b": 2}}"###,
        ];
        for model in models {
            for decoder in ["null", BYTE_LEVEL] {
                let json = format!(
                    r#"{{"version": "1.0", "truncation": null, "padding": null,
                        "added_tokens": {added}, "normalizer": {normalizer},
                        "pre_tokenizer": null, "post_processor": null, "decoder": {decoder},
                        "model": {model}}}"#
                );
                let full = Tokenizer::from_str(&json).unwrap();
                let part = load_decoding_parts(&json).unwrap();
                let vocab = full.get_vocab_size(true);
                assert_eq!(part.get_vocab_size(true), vocab);
                for id in 0..vocab as u32 + 2 {
                    assert_eq!(part.id_to_token(id), full.id_to_token(id), "{model} {id}");
                    assert_eq!(
                        decode_token(&part, id, token_of(&part, id).as_deref()).unwrap(),
                        full.decode(&[id], false).unwrap()
                    );
                }
                let hello = full.token_to_id("HeLLo").unwrap();
                assert_eq!(full.id_to_token(hello).as_deref(), Some("hello"), "{model}");
                assert_eq!(fingerprint(&part).unwrap(), fingerprint(&full).unwrap());
            }
        }
    }

    #[test]
    fn bad_json_says_what_is_wrong() {
        let msg = |json: &str| load_tokenizer_json(json).unwrap_err().to_string();
        assert!(msg("{\"model\": {").contains("truncated JSON"));
        assert!(msg("not json").contains("not valid JSON"));
        assert!(msg("[1, 2]").contains("not an HF tokenizer"));
        assert!(msg(r#"{"model": {"type": "Magic", "vocab": {}}}"#)
            .contains("unsupported tokenizer model type \"Magic\""));
        let err = load_tokenizer_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert_eq!(
            err,
            EngramError::FileNotFound {
                path: "/nonexistent/tokenizer.json".into()
            }
        );
    }
}
