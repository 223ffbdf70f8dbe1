//! What every binding shares: the one GIL release (`detached`, `interruptible`) and pooled
//! output arrays.

use crate::errors::{to_pyerr, Raised};
use engram_core::buffer::{AlignedBuf, OUTPUT_POOL};
use engram_core::EngramError;
use numpy::ndarray::ArrayView2;
use numpy::{Element, PyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Runs a kernel with the GIL released (the one place the bindings detach). A panic inside it
/// becomes `EngramError::Internal` (a `RuntimeError`), never a `PanicException`.
pub(crate) fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, EngramError> + Send,
) -> Result<T, EngramError> {
    py.detach(|| {
        engram_core::pool::run(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|p| Err(EngramError::from_panic(&*p)))
        })
        .and_then(|r| r)
    })
}

/// Owner of a pooled output buffer: numpy arrays keep it as their base, and when the last one
/// goes away the (already page-faulted) memory returns to the pool for the next call.
#[pyclass(module = "engram_rs._engram_rs", frozen)]
pub(crate) struct PooledBuffer {
    buf: Option<AlignedBuf>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            OUTPUT_POOL.give(buf);
        }
    }
}

/// A new, uninitialised C-contiguous `[rows, cols]` array on a 64-byte aligned pooled buffer.
///
/// # Safety
/// The caller must write every element before Python code can read the array.
pub(crate) unsafe fn pooled_array<'py, T: Element>(
    py: Python<'py>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    // As numpy: a size beyond isize::MAX is a ValueError, an allocation refused a MemoryError.
    let bytes = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(std::mem::size_of::<T>()))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "an output of {rows} x {cols} elements is too large: it exceeds the largest \
                 possible array (isize::MAX bytes); process fewer rows at a time"
            ))
        })?;
    let buf = OUTPUT_POOL.take(bytes).map_err(|e| to_pyerr(e, &[]))?;
    let ptr = buf.as_ptr() as *const T;
    let owner = Bound::new(py, PooledBuffer { buf: Some(buf) })?;
    // SAFETY: the buffer holds `rows * cols` elements of `T`, is aligned for `T` (64 bytes), and
    // lives as long as `owner`, which numpy keeps as the array's base object.
    unsafe {
        let view = ArrayView2::from_shape_ptr((rows, cols), ptr);
        Ok(PyArray2::borrow_from_array(&view, owner.into_any()))
    }
}
/// Frees the idle pooled output buffers; returns how many bytes they held.
#[pyfunction]
pub(crate) fn clear_buffer_pool() -> usize {
    let idle = OUTPUT_POOL.idle_bytes();
    OUTPUT_POOL.clear();
    idle
}
/// Runs `f` without the GIL, handing it an interrupt check that raises Ctrl-C (and any other
/// pending signal's exception) from the long loop it runs.
pub(crate) fn interruptible<T: Send>(
    py: Python<'_>,
    f: impl FnOnce(&mut dyn FnMut() -> Result<(), EngramError>) -> Result<T, EngramError> + Send,
) -> PyResult<T> {
    let raised = Raised::default();
    let result = detached(py, || {
        f(&mut || {
            Python::attach(|py| py.check_signals()).map_err(|e| raised.stash(e, "interrupted"))
        })
    });
    raised.outcome(result)
}
