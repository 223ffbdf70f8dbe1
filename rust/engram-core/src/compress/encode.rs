//! Text to raw token ids with an HF `tokenizer.json` (the `tokenizers` crate, the code behind
//! the Python package), for the offline precompute of text and JSONL corpora.

use crate::error::{EngramError, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// A loaded tokenizer that encodes batches of texts in parallel.
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| EngramError::Io {
            path: path.display().to_string(),
            kind: if path.exists() {
                std::io::ErrorKind::InvalidData
            } else {
                std::io::ErrorKind::NotFound
            },
            message: format!("cannot load it as an HF tokenizer.json: {e}"),
        })?;
        Ok(Self { inner })
    }

    /// The number of ids of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes each text (in parallel, in order): the ids of all texts end to end and each
    /// text's number of ids. `add_special_tokens` applies the tokenizer's post-processor (a BOS
    /// id, for example), as `Tokenizer.encode(text)` does by default in Python.
    pub fn encode_batch(
        &self,
        texts: Vec<String>,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<u64>)> {
        let encodings = self
            .inner
            .encode_batch(texts, add_special_tokens)
            .map_err(|e| EngramError::Invalid(format!("the tokenizer failed: {e}")))?;
        let total = encodings.iter().map(|e| e.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut lengths = Vec::with_capacity(encodings.len());
        for enc in &encodings {
            ids.extend_from_slice(enc.get_ids());
            lengths.push(enc.len() as u64);
        }
        Ok((ids, lengths))
    }
}
