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

use crate::error::{EngramError, Result};
use rayon::prelude::*;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::path::Path;
use std::str::FromStr;
use tokenizers::models::{bpe::BPE, wordlevel::WordLevel, wordpiece::WordPiece};
use tokenizers::{
    AddedToken, Decoder, DecoderWrapper, NormalizedString, Normalizer, NormalizerWrapper, Tokenizer,
};
use unicode_normalization_alignments::char::is_combining_mark;
use unicode_normalization_alignments::UnicodeNormalization;

/// Stands in for a lone space while the string is stripped (SPEC section 1).
const SENTINEL: char = '\u{E000}';

/// Model types the `tokenizers` crate deserializes.
const MODEL_TYPES: [&str; 4] = ["BPE", "WordPiece", "WordLevel", "Unigram"];

/// Bumped whenever the table a tokenizer yields could change, so old saved tables stop matching.
const FINGERPRINT_VERSION: &[u8] = b"engram_rs compress v1";

/// Chars every normalization step leaves alone: ASCII (but for lowercasing and whitespace) and
/// the CJK Unified Ideographs block (no decomposition, no case, not a mark, and no canonical
/// composition starts or ends with one).
fn nfkc_nfd_stable(c: char) -> bool {
    c.is_ascii() || ('\u{4E00}'..='\u{9FFF}').contains(&c)
}

/// The SPEC section 1 normalizer: NFKC, NFD, no marks, lowercase, one space per whitespace run,
/// stripped (a lone space survives).
///
/// The steps of the `tokenizers` normalizers the reference chains (`NFKC`, `NFD`,
/// `StripAccents`, `Lowercase`, `Replace`, `Strip`) fused into one pass over the chars, with the
/// same Unicode tables; the tests check it against that chain.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    normalize_into(text, &mut String::new(), &mut out);
    out
}

/// Appends `normalize(text)` to `out`; `scratch` is working space (its content is overwritten).
fn normalize_into(text: &str, scratch: &mut String, out: &mut String) {
    scratch.clear();
    let mut in_run = false;
    let mut push = |c: char| {
        // No char lowercases to whitespace, so collapsing after lowercasing each char is the
        // same as collapsing the lowercased string.
        if matches!(c, ' ' | '\t' | '\r' | '\n') {
            if !in_run {
                scratch.push(' ');
            }
            in_run = true;
        } else {
            scratch.push(c);
            in_run = false;
        }
    };
    if text.chars().all(nfkc_nfd_stable) {
        // Both normalizations are the identity on these chars and none is a mark.
        text.chars().for_each(|c| push(c.to_ascii_lowercase()));
    } else {
        let nfkc: String = text.nfkc().map(|(c, _)| c).collect();
        for (c, _) in nfkc.nfd() {
            if !is_combining_mark(c) {
                c.to_lowercase().for_each(&mut push);
            }
        }
    }
    if scratch == " " {
        out.push(' ');
        return;
    }
    let stripped = scratch.trim_matches(char::is_whitespace);
    // The reference turns every U+E000, not just its own sentinel, back into a space.
    for part in stripped.split_inclusive(SENTINEL) {
        match part.strip_suffix(SENTINEL) {
            Some(head) => {
                out.push_str(head);
                out.push(' ');
            }
            None => out.push_str(part),
        }
    }
}

/// Every id's token string (what `Tokenizer::id_to_token` returns) and the decoder: all that
/// decoding one id reads.
pub struct Vocabulary {
    /// The token strings back to back.
    text: String,
    /// `spans[id]` = start and end of the token of `id` in `text`; [`NO_TOKEN`] for an unused id.
    spans: Vec<(u32, u32)>,
    decoder: Option<DecoderWrapper>,
}

const NO_TOKEN: (u32, u32) = (u32::MAX, u32::MAX);

impl Vocabulary {
    fn build<'a>(
        len: usize,
        token: impl Fn(usize) -> Option<Cow<'a, str>>,
        decoder: Option<DecoderWrapper>,
    ) -> Result<Self> {
        let too_big = || {
            EngramError::Invalid(format!(
                "tokenizer vocabulary of {len} ids holds more than 4 GiB of token text"
            ))
        };
        if u32::try_from(len).is_err() {
            return Err(EngramError::Invalid(format!(
                "tokenizer has {len} ids, more than u32 token ids can address"
            )));
        }
        let mut text = String::new();
        let mut spans = Vec::with_capacity(len);
        for id in 0..len {
            spans.push(match token(id) {
                Some(t) => {
                    let start = u32::try_from(text.len()).map_err(|_| too_big())?;
                    text.push_str(&t);
                    let end = u32::try_from(text.len()).map_err(|_| too_big())?;
                    (start, end)
                }
                None => NO_TOKEN,
            });
        }
        Ok(Vocabulary {
            text,
            spans,
            decoder,
        })
    }

    /// Reads the vocabulary of a tokenizer loaded by the `tokenizers` crate.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let len = tok.get_vocab_size(true);
        Self::build(
            len,
            |id| tok.id_to_token(id as u32).map(Cow::Owned),
            tok.get_decoder().cloned(),
        )
    }

    /// Loads an HF `tokenizer.json` from disk.
    pub fn from_file(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| EngramError::io(path, e))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| EngramError::Tokenizer {
            origin: shown.clone(),
            reason: format!("not UTF-8 text ({e}): expected an HF tokenizer.json"),
        })?;
        parse_vocabulary(text, &shown)
    }

    /// Loads a tokenizer from the text of its `tokenizer.json` (what `Tokenizer.to_str()`
    /// returns).
    pub fn from_json(json: &str) -> Result<Self> {
        parse_vocabulary(json, "tokenizer JSON")
    }

    /// Number of ids, added and special tokens included (`len(tokenizer)`).
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the tokenizer has no ids at all.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The token string of `id` (`Tokenizer::id_to_token`): `None` for an unused or unknown id.
    pub fn token(&self, id: usize) -> Option<&str> {
        match *self.spans.get(id)? {
            NO_TOKEN => None,
            (start, end) => Some(&self.text[start as usize..end as usize]),
        }
    }

    /// Appends `Tokenizer::decode(&[id], false)` to `out`: the token through the crate's
    /// decoder (`Decoder::decode` is its `decode_chain` joined), the token itself without one.
    fn decode_into(&self, id: usize, out: &mut String) -> Result<()> {
        let token = self.token(id);
        match &self.decoder {
            None => out.push_str(token.unwrap_or("")),
            Some(decoder) => {
                let tokens = token.map(str::to_owned).into_iter().collect();
                let parts = decoder
                    .decode_chain(tokens)
                    .map_err(|e| EngramError::Tokenizer {
                        origin: "tokenizer".into(),
                        reason: format!("decoding id {id} failed: {e}"),
                    })?;
                parts.iter().for_each(|p| out.push_str(p));
            }
        }
        Ok(())
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

/// The fields of a `tokenizer.json` that decoding reads, left unparsed.
#[derive(Deserialize)]
struct TokenizerParts<'a> {
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

/// A token string of the JSON, borrowed unless it has escapes.
#[derive(Deserialize)]
struct JsonStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// The `"vocab": {token: id, ...}` object of a BPE, WordPiece or WordLevel model, in file order
/// (duplicates kept, so they can be told apart from a map that dropped them).
struct VocabEntries<'a>(Vec<(Cow<'a, str>, u32)>);

impl<'de> Deserialize<'de> for VocabEntries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = VocabEntries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of token -> id")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(JsonStr(token)) = map.next_key()? {
                    entries.push((token, map.next_value()?));
                }
                Ok(VocabEntries(entries))
            }
        }
        d.deserialize_map(V)
    }
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

/// The model's fields but its vocabulary and merges (they are read apart), as JSON.
fn model_without_vocab(model: &HashMap<String, &RawValue>) -> String {
    let fields: Vec<String> = model
        .iter()
        .map(|(k, v)| {
            let key = serde_json::to_string(k).expect("a string serializes");
            let value = match k.as_str() {
                "vocab" => "{}",
                "merges" => "[]",
                _ => v.get(),
            };
            format!("{key}:{value}")
        })
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// An optional field of the JSON, parsed: `None` when it does not parse, `Some(None)` when absent.
fn parse_field<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<Option<T>> {
    raw.map(|r| serde_json::from_str(r.get())).transpose().ok()
}

/// Reads a BPE, WordPiece or WordLevel tokenizer's vocabulary straight from its JSON, replaying
/// what the crate's deserializer and `AddedVocabulary::add_tokens` do with it; `None` for
/// anything else or unusual (other models, duplicate tokens or ids, invalid fields), which the
/// caller loads with the crate instead.
fn read_vocabulary(json: &str) -> Option<Vocabulary> {
    let parts: TokenizerParts<'_> = serde_json::from_str(json).ok()?;
    if let Some(v) = parts.version {
        if serde_json::from_str::<&str>(v.get()).ok()? != "1.0" {
            return None;
        }
    }
    // The crate checks every other model field: let it, on the model minus its big parts.
    let kind: &str = serde_json::from_str(parts.model.get("type")?.get()).ok()?;
    let stub = model_without_vocab(&parts.model);
    match kind {
        "BPE" => serde_json::from_str::<BPE>(&stub).map(drop),
        "WordPiece" => serde_json::from_str::<WordPiece>(&stub).map(drop),
        "WordLevel" => serde_json::from_str::<WordLevel>(&stub).map(drop),
        _ => return None,
    }
    .ok()?;
    let VocabEntries(entries) = serde_json::from_str(parts.model.get("vocab")?.get()).ok()?;
    let normalizer: Option<NormalizerWrapper> = parse_field(parts.normalizer)?.flatten();
    let decoder: Option<DecoderWrapper> = parse_field(parts.decoder)?.flatten();
    let added: Vec<AddedToken> = parse_field(parts.added_tokens)?.unwrap_or_default();

    // The model: token -> id must be one to one (the crate keeps the last of two equal tokens
    // and an arbitrary token of two equal ids). Entries sorted by (keyed hash, token) put equal
    // tokens side by side and let a token be found by binary search.
    u32::try_from(entries.len()).ok()?;
    let state = RandomState::new();
    let mut by_hash: Vec<(u64, u32)> = entries
        .par_iter()
        .enumerate()
        .map(|(i, (t, _))| (state.hash_one(&**t), i as u32))
        .collect();
    let token_at = |i: u32| -> &str { &entries[i as usize].0 };
    by_hash
        .par_sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| token_at(a.1).cmp(token_at(b.1))));
    if by_hash
        .par_windows(2)
        .any(|w| w[0].0 == w[1].0 && token_at(w[0].1) == token_at(w[1].1))
    {
        return None;
    }
    let model_id = |token: &str| {
        let hash = state.hash_one(token);
        let start = by_hash.partition_point(|e| e.0 < hash);
        by_hash[start..]
            .iter()
            .take_while(|e| e.0 == hash)
            .find(|e| token_at(e.1) == token)
            .map(|e| entries[e.1 as usize].1)
    };
    // Ids past every model and added id are never looked up.
    let max_len = entries.len() + added.len();
    let mut model_token: Vec<Option<usize>> = vec![None; max_len];
    for (i, (_, id)) in entries.iter().enumerate() {
        if let Some(slot) = model_token.get_mut(*id as usize) {
            if slot.replace(i).is_some() {
                return None;
            }
        }
    }

    // `AddedVocabulary::add_tokens`, as the deserializer calls it (normalizer set, all tokens
    // in one call).
    let mut added_ids: HashMap<&str, u32> = HashMap::new();
    let mut added_by_id: HashMap<u32, &AddedToken> = HashMap::new();
    let mut normalized: HashMap<u32, String> = HashMap::new();
    let mut next_id = u32::try_from(entries.len()).ok()?;
    for token in &added {
        let content = token.content.as_str();
        if content.is_empty() {
            continue;
        }
        let known = added_ids.get(content).copied();
        if known.is_some_and(|id| added_by_id.get(&id) == Some(&token)) {
            continue;
        }
        let id = match known.or_else(|| model_id(content)) {
            Some(id) => id,
            None => {
                next_id = next_id.checked_add(1)?;
                next_id - 1
            }
        };
        if let (true, Some(n)) = (token.normalized, &normalizer) {
            let mut s = NormalizedString::from(content);
            n.normalize(&mut s).ok()?;
            if s.get() != content {
                normalized.insert(id, s.get().to_owned());
            }
        }
        added_ids.insert(content, id);
        added_by_id.insert(id, token);
    }
    let overlapping = added_ids.keys().filter(|t| model_id(t).is_some()).count();
    let len = entries.len() + added_ids.len() - overlapping;
    let token = |id: usize| -> Option<Cow<'_, str>> {
        let id32 = id as u32;
        if let Some(t) = added_by_id.get(&id32) {
            let text = normalized.get(&id32).unwrap_or(&t.content);
            return Some(Cow::Borrowed(text.as_str()));
        }
        let i = (*model_token.get(id)?)?;
        Some(Cow::Borrowed(&*entries[i].0))
    };
    Vocabulary::build(len, token, decoder).ok()
}

fn parse_vocabulary(json: &str, origin: &str) -> Result<Vocabulary> {
    if let Some(vocab) = read_vocabulary(json) {
        return Ok(vocab);
    }
    let load_err = match Tokenizer::from_str(json) {
        Ok(tok) => return Vocabulary::from_tokenizer(&tok),
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
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;
    use tokenizers::normalizers::replace::ReplacePattern;
    use tokenizers::normalizers::{Lowercase, Replace, Sequence, Strip, StripAccents, NFD, NFKC};

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
            ("\u{E000}a\u{E000}\u{E000}", " a  "),
            (" 中文 Ab ", "中文 ab"),
            ("\u{2F00}\u{F900}", "一豈"),
        ] {
            assert_eq!(normalize(input), expected, "{input:?}");
            assert_eq!(normalize_reference(input), expected, "{input:?}");
        }
    }

    /// Chars where the normalization steps do something: spaces of every kind, marks of the three
    /// categories, compatibility forms, case mappings that grow or depend on context, the
    /// sentinel itself, CJK ideographs next to compatibility and radical forms, and a few plain
    /// letters.
    const TRICKY: &[char] = &[
        ' ', '\t', '\r', '\n', '\x0b', '\x0c', '\u{85}', '\u{a0}', '\u{1680}', '\u{2009}',
        '\u{2028}', '\u{3000}', '\u{200b}', '\u{200d}', '\u{feff}', '\u{301}', '\u{327}',
        '\u{903}', '\u{94d}', '\u{20dd}', '\u{488}', 'Σ', 'σ', 'ς', 'İ', 'ı', 'ǅ', 'ß', 'ẞ', 'ﬁ',
        'Å', 'Å', 'Ａ', 'ｶ', '゙', 'が', '가', '\u{1100}', '\u{1161}', '①', '²', '㎏', 'ℌ',
        '\u{E000}', '\u{FFFD}', 'a', 'Z', '0', '.', 'é', 'ñ', '中', '\u{4E00}', '\u{9FFF}',
        '\u{F900}', '\u{2F00}', '\u{3400}', '😀',
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn fused_normalizer_matches_the_chain(
            tricky in prop::collection::vec(prop::sample::select(TRICKY), 0..10),
            any_text in "\\PC{0,6}",
            ascii in "[ -~\t\r\n\x0b\x0c\x1c-\x1f]{0,12}",
            cjk in "[ A-Za-z\u{4E00}-\u{9FFF}\u{E000}]{0,8}",
        ) {
            let tricky: String = tricky.into_iter().collect();
            for s in [&tricky, &any_text, &ascii, &cjk, &format!("{tricky}{any_text}")] {
                prop_assert_eq!(normalize(s), normalize_reference(s), "{:?}", s);
            }
        }
    }

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
