//! The one error type of the core crate; the extension maps each variant to one Python exception.

use thiserror::Error;

/// Everything that can go wrong in the core, with the value at fault and what to do about it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EngramError {
    /// A configuration field has an invalid value (maps to `ValueError`).
    #[error("invalid config: {field} = {value}: {reason}")]
    Config {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// An argument is malformed: shape, dtype, lengths (maps to `ValueError`).
    #[error("{0}")]
    Invalid(String),
    /// A token id outside `[0, vocab)` at flat position `index` (maps to `IndexError`); `raw`
    /// when the ids were raw token ids and `vocab` the tokenizer's vocabulary size.
    #[error("id {value} at flat position {index} is out of range [0, {vocab})")]
    IdOutOfRange {
        value: i128,
        index: usize,
        vocab: u64,
        raw: bool,
    },
    /// A file that does not exist (maps to `FileNotFoundError`).
    #[error("{path}: no such file: pass the path of an existing file")]
    FileNotFound { path: String },
    /// A file that exists but cannot be read (maps to `OSError`).
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    /// A tokenizer that cannot be loaded or decoded; `origin` names where it came from (maps to
    /// `ValueError`).
    #[error("{origin}: {reason}")]
    Tokenizer { origin: String, reason: String },
}

pub type Result<T> = std::result::Result<T, EngramError>;
