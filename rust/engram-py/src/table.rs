//! Bindings of host tables: `TableCore` (open/create/wrap, gather, write) and `PrefetchCore`.

use crate::dtype::dtype;
use crate::{pooled_array, to_pyerr};
use engram_core::dtype::DType;
use engram_core::elem::{Backend, IdElem};
use engram_core::gather::gather;
use engram_core::prefetch::{gather_ahead, Ticket};
use engram_core::table::{HostTable, Init, Lease, Mode, SharedTable};
use engram_core::EngramError;
use numpy::{
    PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;

/// The Python objects whose memory a `from_buffers` table uses. `SharedTable::close` hands
/// them back once no operation can read that memory, and `TableCore` drops them with the GIL
/// held: the last reference to a Python object never goes on a worker thread.
type Owners = Vec<Py<PyAny>>;

/// A C-contiguous numpy array's data pointer and byte length.
fn raw_bytes(arr: &Bound<'_, PyUntypedArray>, what: &str) -> PyResult<(*mut u8, usize, bool)> {
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} must be C-contiguous: pass numpy.ascontiguousarray(...) / tensor.contiguous()"
        )));
    }
    let nbytes = arr.len() * arr.dtype().itemsize();
    // SAFETY: reading the numpy struct fields of a live array (GIL held).
    let (ptr, flags) = unsafe {
        let raw = arr.as_array_ptr();
        ((*raw).fields.data as *mut u8, (*raw).fields.flags)
    };
    Ok((ptr, nbytes, flags & numpy::npyffi::NPY_ARRAY_WRITEABLE != 0))
}

/// Indices as a slice of i32 or i64, or a TypeError.
macro_rules! with_indices {
    ($idx:expr, |$slice:ident| $body:expr) => {{
        if let Ok(a) = $idx.cast::<PyArrayDyn<i64>>() {
            let ro = a.try_readonly()?;
            let $slice = ro.as_slice()?;
            $body
        } else if let Ok(a) = $idx.cast::<PyArrayDyn<i32>>() {
            let ro = a.try_readonly()?;
            let $slice = ro.as_slice()?;
            $body
        } else {
            Err(PyTypeError::new_err(
                "indices must be an int32 or int64 numpy array",
            ))
        }
    }};
}

/// A table shared by the Python object and every operation in flight (the core's
/// `SharedTable`: each operation holds a lease; `close` waits for them). The class is frozen (no
/// PyO3 borrow flag), so `close` from one thread never fails on an operation running in
/// another.
#[pyclass(module = "engram_rs._engram_rs", frozen)]
pub struct TableCore {
    shared: SharedTable<Owners>,
}

impl TableCore {
    /// A lease on the open table (held by one operation until it ends), or the core's
    /// closed-table (ValueError) or forked-busy (RuntimeError) error.
    pub(crate) fn lease(&self) -> PyResult<Lease> {
        self.shared.lease().map_err(|e| to_pyerr(e, &[]))
    }

    fn wrap(table: HostTable, owners: Owners) -> Self {
        Self {
            shared: SharedTable::new(table, owners),
        }
    }

    fn with_table<R>(&self, f: impl FnOnce(&HostTable) -> R) -> PyResult<R> {
        Ok(f(&self.lease()?.read()))
    }
}

/// A Python path (str, bytes or os.PathLike, as `os.fspath` takes) as a `PathBuf`.
fn fs_path(path: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    let fspath = path.py().import("os")?.getattr("fspath")?.call1((path,))?;
    if let Ok(b) = fspath.cast::<PyBytes>() {
        use std::os::unix::ffi::OsStrExt;
        return Ok(PathBuf::from(std::ffi::OsStr::from_bytes(b.as_bytes())));
    }
    fspath.extract::<PathBuf>()
}

/// Refuses an `out` (`len` bytes at `ptr`) that overlaps the table or the indices; called while
/// attached, before any slice of `out` is made.
fn check_out<I: IdElem>(lease: &Lease, ptr: *mut u8, len: usize, idx: &[I]) -> PyResult<()> {
    engram_core::gather::check_separate(
        &lease.read(),
        ptr,
        len,
        idx.as_ptr() as *const u8,
        std::mem::size_of_val(idx),
    )
    .map_err(|e| to_pyerr(e, &[]))
}

#[pymethods]
impl TableCore {
    #[staticmethod]
    #[pyo3(signature = (path, name=None, scales=None, mode="mmap", writable=false))]
    fn open(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        name: Option<String>,
        scales: Option<String>,
        mode: &str,
        writable: bool,
    ) -> PyResult<Self> {
        let path = fs_path(path)?;
        let mode = Mode::parse(mode).map_err(|e| to_pyerr(e, &[]))?;
        let table = crate::detached(py, || {
            HostTable::open(&path, name.as_deref(), scales.as_deref(), mode, writable)
        })
        .map_err(|e| to_pyerr(e, &[]))?;
        Ok(Self::wrap(table, Vec::new()))
    }

    /// Opens a tiered table: rows `hot` (uint64, strictly increasing) resident, the others
    /// read from the file when gathered (O_DIRECT where `direct` allows it; None: where the file
    /// system supports it); `writable`: trained by the optimizers, changed cold rows held up
    /// to `dirty_bytes` before a step writes them back.
    #[staticmethod]
    #[pyo3(signature = (path, hot, name=None, scales=None, direct=None, writable=false,
                        dirty_bytes=engram_core::table::tiered::DEFAULT_DIRTY_BYTES))]
    #[allow(clippy::too_many_arguments)]
    fn open_tiered(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        hot: &Bound<'_, PyArray1<u64>>,
        name: Option<String>,
        scales: Option<String>,
        direct: Option<bool>,
        writable: bool,
        dirty_bytes: usize,
    ) -> PyResult<Self> {
        let path = fs_path(path)?;
        // A copy: the array is not ours, and the open reads it without the GIL.
        let hot: Vec<u64> = hot.try_readonly()?.as_slice()?.to_vec();
        let table = crate::detached(py, || {
            HostTable::open_tiered(
                &path,
                name.as_deref(),
                scales.as_deref(),
                &hot,
                direct,
                writable,
                dirty_bytes,
            )
        })
        .map_err(|e| to_pyerr(e, &[]))?;
        Ok(Self::wrap(table, Vec::new()))
    }

    /// A tiered table's counters as a dict (None for other modes).
    #[getter]
    fn tier_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(s) = self.with_table(|t| t.tier_stats())? else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        for (k, v) in [
            ("hot_rows", s.hot_rows),
            ("hot_bytes", s.hot_bytes),
            ("index_bytes", s.index_bytes),
            ("lookups", s.lookups),
            ("hits", s.hits),
            ("misses", s.misses),
            ("reads", s.reads),
            ("read_bytes", s.read_bytes),
            ("dirty_rows", s.dirty_rows),
            ("dirty_hot_rows", s.dirty_hot_rows),
            ("dirty_bytes", s.dirty_bytes),
            ("flushes", s.flushes),
        ] {
            d.set_item(k, v)?;
        }
        d.set_item("direct", s.direct)?;
        Ok(Some(d))
    }

    #[staticmethod]
    #[pyo3(signature = (path, rows, dim, dtype, init, std, seed, name, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        rows: usize,
        dim: usize,
        dtype: &str,
        init: &str,
        std: f32,
        seed: u64,
        name: &str,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let path = fs_path(path)?;
        let dt = crate::dtype::dtype(dtype)?;
        let init = Init::parse(init, std, seed).map_err(|e| to_pyerr(e, &[]))?;
        // `progress(done, rows)` is called from the worker threads (attaching to Python) when
        // the core reports (each percent and the end); an exception it raises stops the
        // creation and is re-raised.
        let raised = crate::Raised::default();
        let report = |done: usize| -> Result<(), EngramError> {
            let Some(callback) = progress.as_ref() else {
                return Ok(());
            };
            Python::attach(|py| callback.call1(py, (done, rows)).map(drop))
                .map_err(|e| raised.stash(e, "stopped by the progress callback"))
        };
        let result = crate::detached(py, || {
            HostTable::create(&path, rows, dim, dt, init, name, Some(&report))
        });
        let table = raised.outcome(result)?;
        Ok(Self::wrap(table, Vec::new()))
    }

    /// Wraps `values` (and `scales`) without copying; the arrays stay referenced by the table.
    #[staticmethod]
    #[pyo3(signature = (values, scales, rows, dim, dtype))]
    fn from_buffers(
        values: &Bound<'_, PyUntypedArray>,
        scales: Option<&Bound<'_, PyUntypedArray>>,
        rows: usize,
        dim: usize,
        dtype: &str,
    ) -> PyResult<Self> {
        let dt = crate::dtype::dtype(dtype)?;
        let (need_values, need_scales) =
            engram_core::table::table_bytes(dt, rows, dim).map_err(|e| to_pyerr(e, &[]))?;
        let (vptr, vlen, vw) = raw_bytes(values, "values")?;
        if vlen != need_values {
            return Err(PyValueError::new_err(format!(
                "values hold {vlen} bytes, a {rows} x {dim} {} table needs {need_values}",
                dt.name(),
            )));
        }
        let mut owners = vec![values.clone().into_any().unbind()];
        let (sptr, sw) = match (dt, scales) {
            (DType::F8E4M3, Some(s)) => {
                let (p, len, w) = raw_bytes(s, "scales")?;
                if len != need_scales {
                    return Err(PyValueError::new_err(format!(
                        "scales hold {len} bytes; an FP8 {rows} x {dim} table needs one UE8M0 byte \
                         per 32 values: [{rows}, {}] uint8",
                        dim / engram_core::dtype::FP8_BLOCK
                    )));
                }
                owners.push(s.clone().into_any().unbind());
                (p, w)
            }
            (DType::F8E4M3, None) => {
                return Err(PyValueError::new_err(
                    "an FP8 table needs scales: uint8 [rows, dim // 32] UE8M0 bytes",
                ))
            }
            (_, Some(_)) => {
                return Err(PyValueError::new_err(format!(
                    "scales are only for FP8 tables, this one is {}",
                    dt.name()
                )))
            }
            (_, None) => (std::ptr::null_mut(), true),
        };
        // SAFETY: the arrays' memory holds the checked byte counts and stays alive as long as
        // the table, because `owners` keeps the arrays referenced inside `Shared`.
        let table = unsafe { HostTable::from_raw(vptr, sptr, rows, dim, dt, vw && sw) }
            .map_err(|e| to_pyerr(e, &[]))?;
        Ok(Self::wrap(table, owners))
    }

    #[getter]
    fn rows(&self) -> PyResult<usize> {
        self.with_table(|t| t.rows)
    }

    #[getter]
    fn dim(&self) -> PyResult<usize> {
        self.with_table(|t| t.dim)
    }

    #[getter]
    fn dtype(&self) -> PyResult<&'static str> {
        self.with_table(|t| t.dtype.name())
    }

    #[getter]
    fn nbytes(&self) -> PyResult<usize> {
        self.with_table(|t| t.nbytes())
    }

    #[getter]
    fn mode(&self) -> PyResult<&'static str> {
        self.with_table(|t| t.mode.name())
    }

    #[getter]
    fn writable(&self) -> PyResult<bool> {
        self.with_table(|t| t.writable())
    }

    #[getter]
    fn path(&self) -> PyResult<Option<PathBuf>> {
        self.with_table(|t| t.path().map(|p| p.to_path_buf()))
    }

    #[getter]
    fn closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Gathers rows `idx` (int32/int64, C-contiguous, any shape) into `out`, a C-contiguous
    /// array of `idx.size * dim` values of `out_dtype` (viewed as bytes).
    #[pyo3(signature = (idx, out, out_dtype, scalar=false))]
    fn gather(
        &self,
        py: Python<'_>,
        idx: &Bound<'_, PyAny>,
        out: &Bound<'_, PyUntypedArray>,
        out_dtype: &str,
        scalar: bool,
    ) -> PyResult<()> {
        let lease = self.lease()?;
        let od = dtype(out_dtype)?;
        let (ptr, len, writable) = raw_bytes(out, "out")?;
        if !writable {
            return Err(PyValueError::new_err("out is read-only"));
        }
        let shape = idx.cast::<PyUntypedArray>()?.shape().to_vec();
        let backend = if scalar {
            Backend::Scalar
        } else {
            Backend::Auto
        };
        with_indices!(idx, |slice| {
            check_out(&lease, ptr, len, slice)?;
            // SAFETY: `out` is a live, writable, C-contiguous array of `len` bytes, borrowed for
            // this call (callers must not use it from another thread meanwhile), that overlaps
            // neither the table nor the indices (checked above).
            let out = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            crate::detached(py, || gather(&lease.read(), slice, out, od, backend))
                .map_err(|e| to_pyerr(e, &shape))
        })
    }

    /// The benchmark's ceiling: copies the bytes of rows `idx` (values, then FP8 scales) into
    /// `out` (`idx.size * (row_bytes + scale_bytes)` bytes) with a plain prefetching loop.
    fn copy_rows_ceiling(
        &self,
        py: Python<'_>,
        idx: &Bound<'_, PyAny>,
        out: &Bound<'_, PyUntypedArray>,
    ) -> PyResult<()> {
        let lease = self.lease()?;
        let (ptr, len, writable) = raw_bytes(out, "out")?;
        if !writable {
            return Err(PyValueError::new_err("out is read-only"));
        }
        let shape = idx.cast::<PyUntypedArray>()?.shape().to_vec();
        with_indices!(idx, |slice| {
            check_out(&lease, ptr, len, slice)?;
            // SAFETY: as in `gather`.
            let out = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            crate::detached(py, || {
                engram_core::gather::copy_rows_ceiling(&lease.read(), slice, out)
            })
            .map_err(|e| to_pyerr(e, &shape))
        })
    }

    /// Bytes of one row's values.
    #[getter]
    fn row_bytes(&self) -> PyResult<usize> {
        self.with_table(|t| t.row_bytes())
    }

    /// UE8M0 scale bytes per row (FP8 tables), else 0.
    #[getter]
    fn scale_bytes(&self) -> PyResult<usize> {
        self.with_table(|t| t.scale_bytes())
    }

    /// A copy of the stored bytes of rows `start..start + count`, as a flat uint8 array: their
    /// values, or with `scales=True` their UE8M0 scales (empty unless FP8).
    #[pyo3(signature = (start, count, scales=false))]
    fn read_raw<'py>(
        &self,
        py: Python<'py>,
        start: usize,
        count: usize,
        scales: bool,
    ) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let lease = self.lease()?;
        let bytes = crate::detached(py, || {
            let t = lease.read();
            let (v, s) = t.raw_rows(start, count)?;
            Ok(if scales { s.to_vec() } else { v.to_vec() })
        })
        .map_err(|e| to_pyerr(e, &[]))?;
        Ok(PyArray1::from_vec(py, bytes))
    }

    /// Reads the rows a gather of `idx` would read, writing nothing (the benchmark's random-read
    /// ceiling); returns a fold of the bytes read.
    fn read_rows(&self, py: Python<'_>, idx: &Bound<'_, PyAny>) -> PyResult<u64> {
        let lease = self.lease()?;
        let shape = idx.cast::<PyUntypedArray>()?.shape().to_vec();
        with_indices!(idx, |slice| {
            crate::detached(py, || engram_core::gather::read_rows(&lease.read(), slice))
                .map_err(|e| to_pyerr(e, &shape))
        })
    }

    /// Gathers into a new pooled `[idx.size, dim * itemsize]` uint8 array (view it as needed).
    fn gather_new<'py>(
        &self,
        py: Python<'py>,
        idx: &Bound<'py, PyAny>,
        out_dtype: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let od = dtype(out_dtype)?;
        let (n, row) = (idx.cast::<PyUntypedArray>()?.len(), self.dim()? * od.size());
        // SAFETY: `gather` writes every byte before the array is returned; on error it is dropped.
        let out = unsafe { pooled_array::<u8>(py, n, row)? };
        self.gather(py, idx, out.as_untyped(), out_dtype, false)?;
        Ok(out.into_any())
    }

    /// Starts a gather on the library's background pool and returns at once. `out`, if given,
    /// must not be read or written until `wait()`; otherwise a pooled array is allocated.
    #[pyo3(signature = (idx, out_dtype, out=None))]
    fn prefetch(
        &self,
        py: Python<'_>,
        idx: &Bound<'_, PyAny>,
        out_dtype: &str,
        out: Option<&Bound<'_, PyUntypedArray>>,
    ) -> PyResult<PrefetchCore> {
        let lease = self.lease()?;
        let od = dtype(out_dtype)?;
        let idx_arr = idx.cast::<PyUntypedArray>()?;
        let shape = idx_arr.shape().to_vec();
        let out: Option<(Bound<'_, PyUntypedArray>, *mut u8, usize)> = match out {
            Some(o) => {
                let (ptr, len, writable) = raw_bytes(o, "out")?;
                if !writable {
                    return Err(PyValueError::new_err("out is read-only"));
                }
                Some((o.clone(), ptr, len))
            }
            None => None,
        };
        // The indices are copied: the caller may reuse its array as soon as this returns.
        let indices: Vec<i64> = with_indices!(idx, |slice| {
            if let Some((_, ptr, len)) = &out {
                check_out(&lease, *ptr, *len, slice)?;
            }
            Ok(slice.iter().map(|v| v.wide() as i64).collect())
        })?;
        let (out, ptr, len) = match out {
            Some(o) => o,
            None => {
                // SAFETY: the job writes every byte before `wait()` hands the array out.
                let out =
                    unsafe { pooled_array::<u8>(py, indices.len(), self.dim()? * od.size())? }
                        .as_untyped()
                        .clone();
                let (ptr, len, _) = raw_bytes(&out, "out")?;
                (out, ptr, len)
            }
        };
        // The job holds no Python object: one released on its thread, without the GIL, would
        // go through PyO3's deferred-decref queue, whose mutex a fork can leave locked. The
        // output stays alive because the `PrefetchCore` owns it and, when dropped early, waits
        // for the job first.
        // SAFETY: the PrefetchCore keeps the output array alive until the job ends (its Drop
        // waits); callers must not touch it before `wait()`; it overlaps neither the table nor
        // the indices (checked above, or a fresh array).
        let ticket =
            unsafe { gather_ahead(lease, indices, ptr, len, od) }.map_err(|e| to_pyerr(e, &[]))?;
        Ok(PrefetchCore {
            ticket,
            out: out.into_any().unbind(),
            shape,
        })
    }

    /// Overwrites rows `idx` (int64) with `values` (bytes of `dim` table-dtype values per row)
    /// and, for FP8, `scales`.
    #[pyo3(signature = (idx, values, scales=None))]
    fn write_rows(
        &self,
        py: Python<'_>,
        idx: &Bound<'_, PyArrayDyn<i64>>,
        values: &Bound<'_, PyUntypedArray>,
        scales: Option<&Bound<'_, PyUntypedArray>>,
    ) -> PyResult<()> {
        let lease = self.lease()?;
        let shape = idx.shape().to_vec();
        let idx = idx.try_readonly()?;
        let idx = idx.as_slice()?;
        let (vp, vl, _) = raw_bytes(values, "values")?;
        let (sp, sl) = match scales {
            Some(s) => {
                let (p, l, _) = raw_bytes(s, "scales")?;
                (p as *const u8, l)
            }
            None => (std::ptr::NonNull::<u8>::dangling().as_ptr() as *const u8, 0),
        };
        // Addresses, to cross into the detached closure.
        let (va, sa) = (vp as usize, sp as usize);
        // Sources that share memory with the table (a view of the array a from_numpy table
        // wraps) are copied by the core first: the table writes that memory while reading them.
        crate::detached(py, || {
            // SAFETY: both arrays are live and C-contiguous with the given byte lengths,
            // borrowed for this call.
            unsafe { lease.write_rows_from(idx, (va as *const u8, vl), (sa as *const u8, sl)) }
        })
        .map_err(|e| to_pyerr(e, &shape))
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let lease = self.lease()?;
        crate::detached(py, || lease.read().flush()).map_err(|e| to_pyerr(e, &[]))
    }

    /// Releases the table; waits (without the GIL) for every operation still running on it:
    /// gathers, prefetches, writes and flushes.
    fn close(&self, py: Python<'_>) {
        self.release(py)
    }
}

impl TableCore {
    /// Lets go of the table: waits (without the GIL) for the operations in flight, then drops
    /// the Python objects whose memory the table used here, with the GIL held.
    fn release(&self, py: Python<'_>) {
        let owners = py.detach(|| self.shared.close());
        drop(owners);
    }
}

impl Drop for TableCore {
    fn drop(&mut self) {
        // A table dropped without close() while a prefetch runs on it.
        Python::attach(|py| self.release(py));
    }
}

/// A gather running in the background.
#[pyclass(module = "engram_rs._engram_rs")]
pub struct PrefetchCore {
    ticket: Ticket,
    out: Py<PyAny>,
    shape: Vec<usize>,
}

impl Drop for PrefetchCore {
    fn drop(&mut self) {
        // The job writes into `out`: dropped before it ends, the Prefetch waits for it (without
        // the GIL) before the array can go. In a child forked while it ran, `wait` returns at
        // once (the job never runs there).
        if !self.ticket.done() {
            let ticket = self.ticket.clone();
            Python::attach(|py| py.detach(|| ticket.wait()).ok());
        }
    }
}

#[pymethods]
impl PrefetchCore {
    fn done(&self) -> bool {
        self.ticket.done()
    }

    /// Waits (without the GIL) and returns the output array; raises the gather's error.
    fn wait(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let ticket = self.ticket.clone();
        crate::detached(py, || ticket.wait()).map_err(|e| to_pyerr(e, &self.shape))?;
        Ok(self.out.clone_ref(py))
    }
}

/// The benchmark's ceiling of cold reads (see `engram_core::table::tiered::io::probe_reads`):
/// `threads` threads of plain `pread`s of the spans (`offsets[i]`, `lengths[i]`), O_DIRECT with
/// `direct`; returns the bytes read.
#[pyfunction]
#[pyo3(signature = (path, offsets, lengths, threads, direct))]
pub(crate) fn probe_reads(
    py: Python<'_>,
    path: &Bound<'_, PyAny>,
    offsets: &Bound<'_, PyArray1<u64>>,
    lengths: &Bound<'_, PyArray1<u64>>,
    threads: usize,
    direct: bool,
) -> PyResult<u64> {
    let path = fs_path(path)?;
    let (o, l) = (offsets.try_readonly()?, lengths.try_readonly()?);
    let (o, l) = (o.as_slice()?, l.as_slice()?);
    if o.len() != l.len() {
        return Err(PyValueError::new_err(format!(
            "{} offsets but {} lengths: pass one length per offset",
            o.len(),
            l.len()
        )));
    }
    let spans: Vec<(u64, usize)> = o.iter().zip(l).map(|(&a, &n)| (a, n as usize)).collect();
    crate::detached(py, || {
        engram_core::table::tiered::io::probe_reads(&path, &spans, threads, direct)
    })
    .map_err(|e| to_pyerr(e, &[]))
}
