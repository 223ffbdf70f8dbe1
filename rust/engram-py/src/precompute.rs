//! Bindings for the offline precompute: checksums of the files it writes and reads, text to
//! raw ids with a `tokenizer.json`, and the size of the kernels' thread pool.

use crate::to_pyerr;
use engram_core::checksum::{self, Checksum};
use engram_core::compress::TextTokenizer;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Mutex;

/// A streaming XXH3-128 checksum (`xxh3-128:<hex>`).
#[pyclass(module = "engram_rs._engram_rs", name = "Checksum")]
struct PyChecksum {
    inner: Mutex<Checksum>,
}

#[pymethods]
impl PyChecksum {
    #[new]
    fn new() -> Self {
        Self {
            inner: Mutex::new(Checksum::new()),
        }
    }

    /// Adds the bytes of a contiguous uint8 array, without the GIL. Only reads: a thread that
    /// writes the array meanwhile changes the checksum, nothing else (the precompute passes its
    /// own, private outputs).
    fn update(&self, py: Python<'_>, data: PyReadonlyArray1<'_, u8>) -> PyResult<()> {
        let bytes = data.as_slice().map_err(|_| {
            PyValueError::new_err("Checksum.update takes a C-contiguous 1-D uint8 array")
        })?;
        let mut sum = self.lock().clone();
        crate::detached(py, || {
            sum.update(bytes);
            Ok(())
        })
        .map_err(|e| to_pyerr(e, &[]))?;
        *self.lock() = sum;
        Ok(())
    }

    /// Adds `limit` bytes of a file from byte `offset` on (to its end when None), without the
    /// GIL; returns the number of bytes read.
    #[pyo3(signature = (path, offset=0, limit=None))]
    fn update_from_file(
        &self,
        py: Python<'_>,
        path: PathBuf,
        offset: u64,
        limit: Option<u64>,
    ) -> PyResult<u64> {
        let mut sum = self.lock().clone();
        let n = crate::detached(py, || sum.update_from_file(&path, offset, limit))
            .map_err(|e| to_pyerr(e, &[]))?;
        *self.lock() = sum;
        Ok(n)
    }

    fn hexdigest(&self) -> String {
        self.lock().hex()
    }
}

impl PyChecksum {
    fn lock(&self) -> std::sync::MutexGuard<'_, Checksum> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts writing back `len` bytes of the file `fd` from `offset` (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`: it does not wait), so that a final `fsync` has little left to do.
/// A no-op where the call is not available.
#[pyfunction]
fn start_writeback(py: Python<'_>, fd: i32, offset: i64, len: i64) -> PyResult<()> {
    #[cfg(target_os = "linux")]
    {
        let rc = crate::detached(py, || {
            // SAFETY: sync_file_range only reads its integer arguments; a bad descriptor is an
            // error return (EBADF), not undefined behaviour.
            Ok(unsafe { libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE) })
        })
        .map_err(|e| to_pyerr(e, &[]))?;
        if rc != 0 {
            return Err(pyo3::exceptions::PyOSError::new_err(format!(
                "sync_file_range on descriptor {fd}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (py, fd, offset, len);
    Ok(())
}

/// The checksum of a whole file, read without the GIL.
#[pyfunction]
fn file_checksum(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    crate::detached(py, || checksum::file_checksum(&path)).map_err(|e| to_pyerr(e, &[]))
}

/// `(ids, lengths)` of a batch of encoded texts.
type Encoded<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u64>>);

/// An HF `tokenizer.json` that encodes batches of texts to raw ids without the GIL.
#[pyclass(module = "engram_rs._engram_rs", frozen)]
struct TokenizerCore {
    inner: TextTokenizer,
}

#[pymethods]
impl TokenizerCore {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = crate::detached(py, || TextTokenizer::from_file(&path))
            .map_err(|e| to_pyerr(e, &[]))?;
        Ok(Self { inner })
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// `(ids, lengths)`: the uint32 ids of all texts end to end, and each text's count.
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        add_special_tokens: bool,
    ) -> PyResult<Encoded<'py>> {
        let (ids, lengths) =
            crate::detached(py, || self.inner.encode_batch(texts, add_special_tokens))
                .map_err(|e| to_pyerr(e, &[]))?;
        Ok((PyArray1::from_vec(py, ids), PyArray1::from_vec(py, lengths)))
    }
}

/// Sets the number of threads of the kernels' pool; only before the first kernel runs (or to
/// the size it already has). 0 = one per CPU.
#[pyfunction]
fn set_num_threads(threads: &Bound<'_, PyAny>) -> PyResult<usize> {
    let n: usize = threads.extract().map_err(|_| {
        PyValueError::new_err(format!(
            "threads = {threads} is not a thread count: pass 0 (one per CPU) or at most {}",
            engram_core::pool::MAX_THREADS
        ))
    })?;
    engram_core::pool::set_threads(n).map_err(|e| to_pyerr(e, &[]))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyChecksum>()?;
    m.add_class::<TokenizerCore>()?;
    m.add_function(wrap_pyfunction!(file_checksum, m)?)?;
    m.add_function(wrap_pyfunction!(start_writeback, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    Ok(())
}
