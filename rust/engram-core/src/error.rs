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
    /// A table row index outside `[0, rows)` at flat position `index` (maps to `IndexError`).
    #[error("row index {value} at flat position {index} is out of range [0, {rows})")]
    IndexOutOfRange {
        value: i128,
        index: usize,
        rows: usize,
    },
    /// A per-head hash id outside its head's table `[0, rows)` at flat position `index`, in
    /// column `column` (maps to `IndexError`).
    #[error(
        "hash id {value} at flat position {index} (column {column}) is out of range [0, {rows})"
    )]
    HashIdOutOfRange {
        value: i128,
        index: usize,
        column: usize,
        rows: u64,
    },
    /// A file that exists but cannot be read or written (maps to `PermissionError` or
    /// `OSError` by `kind`).
    #[error("{path}: {message}")]
    Io {
        path: String,
        kind: std::io::ErrorKind,
        message: String,
    },
    /// A file's content is corrupt or not what was expected (maps to `ValueError`).
    #[error("{0}")]
    Format(String),
    /// A write to a read-only table (maps to `PermissionError`).
    #[error("{0}")]
    ReadOnly(String),
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
    /// A tokenizer that cannot be loaded or decoded; `origin` names where it came from (maps to
    /// `ValueError`).
    #[error("{origin}: {reason}")]
    Tokenizer { origin: String, reason: String },
    /// An allocation of `bytes` for `what` failed (maps to `MemoryError`).
    #[error("cannot allocate {bytes} bytes for {what}: {hint}")]
    OutOfMemory {
        bytes: usize,
        what: String,
        hint: String,
    },
    /// The OS refused to start a pool's threads, or state made before a `fork` cannot be used
    /// in the child (maps to `RuntimeError`).
    #[error("{0}")]
    Threads(String),
    /// A panic inside a kernel, caught before it reached the caller (maps to `RuntimeError`).
    #[error("internal error in engram_rs: {0} (please report this)")]
    Internal(String),
}

impl EngramError {
    /// An I/O error on `path`: `FileNotFound` for a missing file, else `Io` with its kind.
    pub fn io(path: &std::path::Path, err: std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::NotFound {
            return EngramError::FileNotFound {
                path: path.display().to_string(),
            };
        }
        EngramError::Io {
            path: path.display().to_string(),
            kind: err.kind(),
            message: err.to_string(),
        }
    }
}

impl EngramError {
    /// The error of a caught panic, with the panic's message.
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        EngramError::Internal(msg)
    }
}

pub type Result<T> = std::result::Result<T, EngramError>;
