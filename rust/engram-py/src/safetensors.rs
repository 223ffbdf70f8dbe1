//! Bindings of `engram_core::safetensors` and `engram_core::atomic`: the one reader and writer
//! of safetensors files and the one atomic write, with the GIL released around file I/O.

use crate::{detached, to_pyerr};
use engram_core::atomic;
use engram_core::safetensors::{Reader, Writer};
use engram_core::EngramError;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// The value in `slot`, or the error of an object already closed or committed.
fn open_slot<'a, T>(
    slot: &'a Mutex<Option<T>>,
    what: &str,
) -> Result<MutexGuard<'a, Option<T>>, EngramError> {
    let guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        return Err(EngramError::Invalid(format!(
            "this {what} is closed: open a new one"
        )));
    }
    Ok(guard)
}

/// (name, dtype, shape, start, end) of one tensor, its bytes' absolute range in the file.
type TensorTuple = (String, String, Vec<usize>, usize, usize);

/// A safetensors file opened with its header checked (``engram_core::safetensors::Reader``).
#[pyclass(module = "engram_rs._engram_rs", frozen)]
pub(crate) struct SafetensorsFile {
    inner: Mutex<Option<Reader>>,
    tensors: Vec<TensorTuple>,
    metadata: BTreeMap<String, String>,
}

#[pymethods]
impl SafetensorsFile {
    /// Opens and checks ``path``; a file that is not one calls itself a ``what``.
    #[new]
    #[pyo3(signature = (path, what = "safetensors file"))]
    fn new(py: Python<'_>, path: PathBuf, what: &str) -> PyResult<Self> {
        let reader = detached(py, || Reader::open(&path, what)).map_err(|e| to_pyerr(e, &[]))?;
        let tensors = reader
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.dtype.clone(),
                    t.shape.clone(),
                    t.start,
                    t.end,
                )
            })
            .collect();
        let metadata = reader.metadata.clone();
        Ok(Self {
            inner: Mutex::new(Some(reader)),
            tensors,
            metadata,
        })
    }

    /// The tensors, sorted by where their bytes begin.
    #[getter]
    fn tensors(&self) -> Vec<TensorTuple> {
        self.tensors.clone()
    }

    #[getter]
    fn metadata(&self) -> BTreeMap<String, String> {
        self.metadata.clone()
    }

    /// ``count`` bytes of tensor ``index`` from byte ``offset`` of its data (uint8).
    fn read<'py>(
        &self,
        py: Python<'py>,
        index: usize,
        offset: usize,
        count: usize,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let bytes = detached(py, || {
            let guard = open_slot(&self.inner, "safetensors file")?;
            guard
                .as_ref()
                .expect("checked by open_slot")
                .read_vec(index, offset, count)
        })
        .map_err(|e| to_pyerr(e, &[]))?;
        Ok(PyArray1::from_vec(py, bytes))
    }

    fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// A safetensors file being written atomically (``engram_core::safetensors::Writer``).
#[pyclass(module = "engram_rs._engram_rs", frozen)]
pub(crate) struct SafetensorsWriter {
    inner: Mutex<Option<Writer>>,
}

#[pymethods]
impl SafetensorsWriter {
    /// Starts ``path`` holding ``tensors`` (name, dtype, shape) back to back and ``metadata``.
    #[new]
    #[pyo3(signature = (path, tensors, metadata, what = "safetensors file"))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        tensors: Vec<(String, String, Vec<usize>)>,
        metadata: BTreeMap<String, String>,
        what: &str,
    ) -> PyResult<Self> {
        let specs: Vec<(&str, &str, Vec<usize>)> = tensors
            .iter()
            .map(|(n, d, s)| (n.as_str(), d.as_str(), s.clone()))
            .collect();
        let writer = detached(py, || Writer::create(&path, &specs, &metadata, what))
            .map_err(|e| to_pyerr(e, &[]))?;
        Ok(Self {
            inner: Mutex::new(Some(writer)),
        })
    }

    /// Appends the bytes of ``data`` (uint8, C-contiguous) to tensor ``index``.
    fn write(&self, py: Python<'_>, index: usize, data: PyReadonlyArray1<'_, u8>) -> PyResult<()> {
        let bytes = data.as_slice()?;
        detached(py, || {
            let mut guard = open_slot(&self.inner, "safetensors writer")?;
            guard
                .as_mut()
                .expect("checked by open_slot")
                .write(index, bytes)
        })
        .map_err(|e| to_pyerr(e, &[]))
    }

    /// Puts the file in place once every tensor's bytes have come.
    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        let writer = open_slot(&self.inner, "safetensors writer")
            .map_err(|e| to_pyerr(e, &[]))?
            .take();
        detached(py, || writer.expect("checked by open_slot").commit())
            .map_err(|e| to_pyerr(e, &[]))
    }

    /// Removes the temporary file (the target is left as it was).
    fn discard(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// A new temporary file that becomes ``path`` when committed (``engram_core::atomic``).
#[pyclass(module = "engram_rs._engram_rs", frozen)]
pub(crate) struct AtomicFile {
    inner: Mutex<Option<atomic::AtomicFile>>,
    fd: i32,
    tmp: PathBuf,
}

#[pymethods]
impl AtomicFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let out =
            detached(py, || atomic::AtomicFile::create(&path)).map_err(|e| to_pyerr(e, &[]))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(out.file());
        Ok(Self {
            fd,
            tmp: out.path().to_path_buf(),
            inner: Mutex::new(Some(out)),
        })
    }

    /// The temporary file's descriptor (valid until ``commit`` or ``discard``).
    fn fileno(&self) -> i32 {
        self.fd
    }

    /// The temporary file's path.
    #[getter]
    fn path(&self) -> String {
        self.tmp.to_string_lossy().into_owned()
    }

    /// Syncs the file, renames it over the target and syncs the directory.
    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        let out = open_slot(&self.inner, "atomic file")
            .map_err(|e| to_pyerr(e, &[]))?
            .take();
        detached(py, || out.expect("checked by open_slot").commit().map(drop))
            .map_err(|e| to_pyerr(e, &[]))
    }

    /// Removes the temporary file (the target is left as it was).
    fn discard(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// ``fsync`` of a file or a directory by its path (a directory: its entries, after renames).
#[pyfunction]
fn fsync_path(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    detached(py, || atomic::sync_path(&path)).map_err(|e| to_pyerr(e, &[]))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SafetensorsFile>()?;
    m.add_class::<SafetensorsWriter>()?;
    m.add_class::<AtomicFile>()?;
    m.add_function(wrap_pyfunction!(fsync_path, m)?)?;
    Ok(())
}
