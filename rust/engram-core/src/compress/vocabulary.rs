//! What decoding one id reads: every id's token string and the decoder, read from a
//! `tokenizer.json` (straight from the JSON for BPE, WordPiece and WordLevel, replaying the
//! `tokenizers` crate's rules; through the crate's full load otherwise).

use crate::error::{EngramError, Result};
use rayon::prelude::*;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::str::FromStr;
use tokenizers::models::{bpe::BPE, wordlevel::WordLevel, wordpiece::WordPiece};
use tokenizers::{
    AddedToken, Decoder, DecoderWrapper, NormalizedString, Normalizer, NormalizerWrapper, Tokenizer,
};

/// Model types the `tokenizers` crate deserializes.
const MODEL_TYPES: [&str; 4] = ["BPE", "WordPiece", "WordLevel", "Unigram"];

/// Every id's token string (what `Tokenizer::id_to_token` returns) and the decoder: all that
/// decoding one id reads.
pub struct Vocabulary {
    /// The token strings back to back.
    text: String,
    /// `spans[id]` = start and end of the token of `id` in `text`; [`NO_TOKEN`] for an unused id.
    spans: Vec<(u32, u32)>,
    pub(super) decoder: Option<DecoderWrapper>,
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
    pub(super) fn decode_into(&self, id: usize, out: &mut String) -> Result<()> {
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
pub(super) fn read_vocabulary(json: &str) -> Option<Vocabulary> {
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
