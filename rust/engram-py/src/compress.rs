//! Bindings of `engram_core::compress`: tokenizer compression with the GIL released.

use crate::to_pyerr;
use engram_core::compress::{self, Compression, Vocabulary};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use std::path::PathBuf;

/// `(lookup_table, compressed_size, fingerprint)` as Python objects; the table is not copied.
type PyCompression<'py> = (Bound<'py, PyArray1<i64>>, usize, String);

fn to_python(py: Python<'_>, c: Compression) -> PyCompression<'_> {
    let table = PyArray1::from_vec(py, c.lookup);
    table.readwrite().make_nonwriteable();
    (table, c.compressed_size, c.fingerprint)
}

/// Builds the raw -> compressed id table of an HF `tokenizer.json` file.
#[pyfunction]
fn compress_file(py: Python<'_>, path: PathBuf) -> PyResult<PyCompression<'_>> {
    let c = crate::detached(py, || compress::compress(&Vocabulary::from_file(&path)?))
        .map_err(|e| to_pyerr(e, &[]))?;
    Ok(to_python(py, c))
}

/// Builds the raw -> compressed id table of a tokenizer given as its JSON text.
#[pyfunction]
fn compress_json(py: Python<'_>, json: String) -> PyResult<PyCompression<'_>> {
    let c = crate::detached(py, || compress::compress(&Vocabulary::from_json(&json)?))
        .map_err(|e| to_pyerr(e, &[]))?;
    Ok(to_python(py, c))
}

/// The fingerprint of an HF `tokenizer.json` file (what a saved table is checked against).
#[pyfunction]
fn fingerprint_file(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    crate::detached(py, || {
        Vocabulary::from_file(&path).map(|v| compress::fingerprint(&v))
    })
    .map_err(|e| to_pyerr(e, &[]))
}

/// The fingerprint of a tokenizer given as its JSON text.
#[pyfunction]
fn fingerprint_json(py: Python<'_>, json: String) -> PyResult<String> {
    crate::detached(py, || {
        Vocabulary::from_json(&json).map(|v| compress::fingerprint(&v))
    })
    .map_err(|e| to_pyerr(e, &[]))
}

/// The SPEC section 1 normalizer (NFKC, NFD, no marks, lowercase, collapsed and stripped spaces).
#[pyfunction]
fn normalize(text: &str) -> String {
    compress::normalize(text)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compress_file, m)?)?;
    m.add_function(wrap_pyfunction!(compress_json, m)?)?;
    m.add_function(wrap_pyfunction!(fingerprint_file, m)?)?;
    m.add_function(wrap_pyfunction!(fingerprint_json, m)?)?;
    m.add_function(wrap_pyfunction!(normalize, m)?)?;
    Ok(())
}
