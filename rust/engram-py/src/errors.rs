//! The one mapping of core errors to Python exceptions (`to_pyerr`), `OutOfRangeError`, and
//! the carrier of exceptions raised by callbacks inside kernels.

use engram_core::EngramError;
use pyo3::exceptions::{
    PyFileNotFoundError, PyMemoryError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;

/// Formats flat position `index` as a tuple over `shape` ("(1, 5)", "(7,)").
fn unravel(index: usize, shape: &[usize]) -> String {
    let pos = position(index, shape)
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!("({pos}{})", if shape.len() == 1 { "," } else { "" })
}

pyo3::create_exception!(
    _engram_rs,
    OutOfRangeError,
    pyo3::exceptions::PyIndexError,
    "An id or row index outside its range (an IndexError). Attributes: `what` (\"id\", \"raw \
     token id\", \"row index\" or \"hash id\"), `value`, `bound` (the range is [0, bound)), \
     `position` (a tuple, in the caller's array shape), `flat_index` and `column` (the head of \
     a hash id, else None): callers map the position instead of scanning the ids again."
);

/// The position of flat `index` in `shape`, as a tuple of ints.
fn position(index: usize, shape: &[usize]) -> Vec<usize> {
    let mut pos = Vec::with_capacity(shape.len());
    let mut rest = index;
    for &dim in shape.iter().rev() {
        pos.push(rest % dim.max(1));
        rest /= dim.max(1);
    }
    pos.reverse();
    pos
}

/// An [`OutOfRangeError`] with its attributes set.
fn out_of_range(
    message: String,
    what: &str,
    value: i128,
    bound: u64,
    index: usize,
    shape: &[usize],
    column: Option<usize>,
) -> PyErr {
    let err = OutOfRangeError::new_err(message);
    Python::attach(|py| {
        let e = err.value(py);
        let pos = pyo3::types::PyTuple::new(py, position(index, shape))?;
        e.setattr("what", what)?;
        e.setattr("value", value)?;
        e.setattr("bound", bound)?;
        e.setattr("position", pos)?;
        e.setattr("flat_index", index)?;
        e.setattr("column", column)?;
        PyResult::Ok(())
    })
    .ok();
    err
}

/// The core's neutral advice in Python's words: (the core's phrase, what a Python user types).
/// The core's messages name no Python API; the binding says how to do it from Python.
const IN_PYTHON: &[(&str, &str)] = &[
    (
        "open it writable (and a writable",
        "open it with writable=True (and a writable",
    ),
    (
        "open it writable to train",
        "open it with writable=True to train",
    ),
    ("use int64 output", "use int64 output (dtype=numpy.int64)"),
    ("start the process with RAYON", "start Python with RAYON"),
    (
        "gather the rows (or prefetch them again) here",
        "call gather() (or prefetch() again) here",
    ),
    (
        "its scales: name its UE8M0 ",
        "its scales: pass scales=<name of its UE8M0 ",
    ),
    (" scales tensor (candidates", " tensor> (candidates"),
    (
        "holds several tables: name one of",
        "holds several tables: pass name= one of",
    ),
    (
        "open the table again in the child (writable",
        "open the table again in the child (HostTable.open(path); writable",
    ),
];

/// `message` with the core's advice said as a Python user does it ([`IN_PYTHON`]).
pub(crate) fn in_python(message: String) -> String {
    IN_PYTHON
        .iter()
        .fold(message, |m, (core, python)| m.replacen(core, python, 1))
}

/// Maps a core error to the Python exception users expect; `shape` unravels flat id positions.
pub(crate) fn to_pyerr(err: EngramError, shape: &[usize]) -> PyErr {
    let text = || in_python(err.to_string());
    match &err {
        EngramError::IdOutOfRange {
            value,
            index,
            vocab,
            raw,
        } => {
            let hint = if *raw {
                "raw token ids must be below the tokenizer's vocab_size"
            } else {
                "pass compressed token ids (map raw ids through CompressedTokenizer first)"
            };
            out_of_range(
                format!(
                    "{}id {value} at position {} is out of range [0, {vocab}): {hint}",
                    if *raw { "raw token " } else { "" },
                    unravel(*index, shape)
                ),
                if *raw { "raw token id" } else { "id" },
                *value,
                *vocab,
                *index,
                shape,
                None,
            )
        }
        EngramError::IndexOutOfRange { value, index, rows } => out_of_range(
            format!(
                "row index {value} at position {} is out of range for a table of {rows} rows",
                unravel(*index, shape)
            ),
            "row index",
            *value,
            *rows as u64,
            *index,
            shape,
            None,
        ),
        EngramError::HashIdOutOfRange {
            value,
            index,
            column,
            rows,
        } => out_of_range(
            format!(
                "hash id {value} in column {column} at position {} is out of range [0, {rows}) \
                 (its head's rows)",
                unravel(*index, shape)
            ),
            "hash id",
            *value,
            *rows,
            *index,
            shape,
            Some(*column),
        ),
        EngramError::FileNotFound { .. } => PyFileNotFoundError::new_err(text()),
        EngramError::Io { kind, .. } if *kind == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(text())
        }
        EngramError::Io { kind, .. } if *kind == std::io::ErrorKind::PermissionDenied => {
            PyPermissionError::new_err(text())
        }
        EngramError::Io { .. } => PyOSError::new_err(text()),
        EngramError::ReadOnly(_) => PyPermissionError::new_err(text()),
        EngramError::OutOfMemory { .. } => PyMemoryError::new_err(text()),
        EngramError::Internal(_) | EngramError::Threads(_) => PyRuntimeError::new_err(text()),
        _ => PyValueError::new_err(text()),
    }
}
/// Carries a Python exception raised by a callback (a progress report, a signal check) out of
/// a kernel that runs without the GIL: the callback stashes it and stops the kernel with an
/// error; once the kernel returns, the stashed exception is what the caller sees.
#[derive(Default)]
pub(crate) struct Raised(std::sync::Mutex<Option<PyErr>>);

impl Raised {
    /// Keeps `err` (the first one raised) and returns the error that stops the kernel.
    pub(crate) fn stash(&self, err: PyErr, why: &str) -> EngramError {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(err);
        EngramError::Invalid(why.into())
    }

    /// The kernel's outcome: the stashed exception if a callback raised one, else `result`.
    pub(crate) fn outcome<T>(self, result: Result<T, EngramError>) -> PyResult<T> {
        match self.0.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => result.map_err(|e| to_pyerr(e, &[])),
        }
    }
}
