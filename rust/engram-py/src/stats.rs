//! Bindings of the row access statistics (`engram_core::stats`): lookups per row of a layer's
//! flat table, and distinct rows per batch of sequences.

use crate::{detached, to_pyerr};
use engram_core::stats::{self, Columns};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The `[tokens, cols]` shape of per-head ids, checked against the column layout.
fn id_shape(ids: &Bound<'_, PyAny>, cols: usize) -> PyResult<Vec<usize>> {
    let arr = ids.cast::<numpy::PyUntypedArray>()?;
    let shape = arr.shape().to_vec();
    if shape.len() != 2 || shape[1] != cols {
        return Err(PyValueError::new_err(format!(
            "hash ids of shape {shape:?}: a [tokens, {cols}] array is needed (one id per column)"
        )));
    }
    Ok(shape)
}

/// Adds one to `counts[ids[t, c] + add[c]]` for every id (int32 or int64, C-contiguous
/// `[tokens, cols]`), each row checked to lie in `[lo[c], hi[c])`, without the GIL; `counts` is a
/// writable C-contiguous uint32 array, saturating at 2**32 - 1. Returns how many increments
/// saturated.
#[pyfunction]
fn count_rows(
    py: Python<'_>,
    ids: &Bound<'_, PyAny>,
    add: Vec<i64>,
    lo: Vec<u64>,
    hi: Vec<u64>,
    counts: &Bound<'_, PyArray1<u32>>,
) -> PyResult<u64> {
    let shape = id_shape(ids, add.len())?;
    let cols = Columns {
        add: &add,
        lo: &lo,
        hi: &hi,
    };
    let mut rw = counts.try_readwrite()?;
    let counts = rw.as_slice_mut()?;
    macro_rules! run {
        ($t:ty) => {
            if let Ok(a) = ids.cast::<PyArrayDyn<$t>>() {
                let ro = a.try_readonly()?;
                let ids = ro.as_slice()?;
                return detached(py, || stats::count_rows(ids, cols, counts))
                    .map_err(|e| to_pyerr(e, &shape));
            }
        };
    }
    run!(i32);
    run!(i64);
    Err(PyTypeError::new_err(
        "count_rows takes int32 or int64 hash ids",
    ))
}

/// Distinct rows per batch (tokens `[starts[b], starts[b + 1])`) and column group (columns
/// `[groups[g], groups[g + 1])`) of `ids`, as `batch_distinct` of the core; `rows`: the table's
/// rows. Returns uint64 `[batches * groups]`, batch-major.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn batch_distinct<'py>(
    py: Python<'py>,
    ids: &Bound<'py, PyAny>,
    add: Vec<i64>,
    lo: Vec<u64>,
    hi: Vec<u64>,
    groups: Vec<usize>,
    starts: Vec<u64>,
    rows: usize,
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    let shape = id_shape(ids, add.len())?;
    let cols = Columns {
        add: &add,
        lo: &lo,
        hi: &hi,
    };
    macro_rules! run {
        ($t:ty) => {
            if let Ok(a) = ids.cast::<PyArrayDyn<$t>>() {
                let ro = a.try_readonly()?;
                let ids = ro.as_slice()?;
                let out = detached(py, || {
                    stats::batch_distinct(ids, cols, &groups, &starts, rows)
                })
                .map_err(|e| to_pyerr(e, &shape))?;
                return Ok(PyArray1::from_vec(py, out));
            }
        };
    }
    run!(i32);
    run!(i64);
    Err(PyTypeError::new_err(
        "batch_distinct takes int32 or int64 hash ids",
    ))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(count_rows, m)?)?;
    m.add_function(wrap_pyfunction!(batch_distinct, m)?)?;
    Ok(())
}
