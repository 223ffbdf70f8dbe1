//! Binding of the fused sparse optimizers (`engram_core::optim`): `sparse_step`.

use crate::table::TableCore;
use crate::to_pyerr;
use engram_core::optim::{self, Optimizer, OptimizerKind, StepOptions, StepOutcome};
use engram_core::table::shared::apart_from;
use engram_core::table::Lease;
use numpy::ndarray::Dimension;
use numpy::{Element, PyReadonlyArray, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFloatingPointError, PyValueError};
use pyo3::prelude::*;
use std::borrow::Cow;

/// The optimizer `kind` with these hyperparameters, checked by the core (a ValueError in its
/// words).
fn optimizer(kind: &str, lr: f64, eps: f64, beta1: f64, beta2: f64) -> PyResult<Optimizer> {
    let kind = OptimizerKind::parse(kind).map_err(|e| to_pyerr(e, &[]))?;
    Optimizer::new(kind, lr, eps, (beta1, beta2)).map_err(|e| to_pyerr(e, &[]))
}

/// Checks an optimizer's hyperparameters as every step will (`SparseAdam(eps=0)` is refused
/// when made, in the words of the step): a ValueError when one is invalid.
#[pyfunction]
#[pyo3(signature = (kind, lr, eps=0.0, beta1=0.0, beta2=0.0))]
pub(crate) fn check_optimizer(
    kind: &str,
    lr: f64,
    eps: f64,
    beta1: f64,
    beta2: f64,
) -> PyResult<()> {
    optimizer(kind, lr, eps, beta1, beta2).map(|_| ())
}

/// The optimizer kinds: `{kind: (class name, hyperparameter names, [(state table, width or
/// None for the table's dim)])}`, the registry the Python classes are built from.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub(crate) fn optimizer_kinds() -> Vec<(
    &'static str,
    &'static str,
    Vec<&'static str>,
    Vec<(&'static str, Option<usize>)>,
)> {
    OptimizerKind::ALL
        .into_iter()
        .map(|k| {
            (
                k.name(),
                k.class_name(),
                k.hyperparameters().to_vec(),
                k.state_tables().iter().map(|t| (t.name, t.width)).collect(),
            )
        })
        .collect()
}

/// The elements of `arr`: in place, or a copy when it is not C-contiguous or shares memory
/// with one of `tables` (which the step writes).
fn in_place_or_copied<'a, T: Element + Copy, D: Dimension>(
    arr: &'a PyReadonlyArray<'_, T, D>,
    tables: &[&Lease],
) -> PyResult<Cow<'a, [T]>> {
    match arr.as_slice() {
        Ok(s) => apart_from(
            s,
            tables,
            "a copy of the step's ids or gradients",
            "take fewer lookups per step",
        )
        .map_err(|e| to_pyerr(e, &[])),
        Err(_) => Ok(Cow::Owned(arr.as_array().iter().copied().collect())),
    }
}

/// One fused step of a sparse row-wise optimizer on the rows `ids` of `table`, in place, with
/// the GIL released: `grads` holds one float32 gradient row per id (`[n, dim]`); duplicate ids
/// have their gradient rows summed first. `kind` is "sgd", "rowwise_adagrad" or "adam"
/// (`torch.optim.SparseAdam`); `state` the optimizer's float32 state tables (none; the
/// accumulator `[rows, 1]`; `exp_avg` and `exp_avg_sq`, `[rows, dim]` each), updated in place;
/// `step` Adam's step count after incrementing it (1 at the first step). Returns the number of
/// unique rows updated.
///
/// The ids and gradients are read in place with the GIL released (copying the 67 MB of
/// gradients of a 262,144 x 64 step took 12-17 ms here, about half of a row-wise Adagrad step
/// on a 10 M-row table). That is memory-safe whatever another
/// Python thread does to those arrays meanwhile: this call holds them (alive, and numpy refuses
/// to resize an array others reference); each id is read exactly once, into the kernel's own
/// copy, which is range-checked and the only thing rows are addressed from; each gradient value
/// is read once. A concurrent write can only change which values the step uses, as with torch's
/// own operators: do not modify the arrays until the call returns. Arrays that share memory
/// with the table or a state table (which the step writes) are copied first, as are arrays that
/// are not C-contiguous. The table and the state tables are write-locked for the step (taken
/// without the GIL, in one fixed order).
///
/// Keyword options (`engram_core::optim::StepOptions`), all checked before any row is written:
/// `check_finite` raises `FloatingPointError` (naming the lookup, the row and the value) and
/// writes nothing when the gradient of a touched row is not finite; `grad_scale` multiplies
/// every summed gradient row (a loss scaler's `1 / scale`); `max_grad_norm` clips the summed,
/// scaled gradient of the touched rows to that global L2 norm (`clip_grad_norm_`).
#[pyfunction]
#[pyo3(signature = (
    table, ids, grads, kind, lr, eps, beta1, beta2, state, step,
    *, check_finite=false, grad_scale=1.0, max_grad_norm=None
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_step(
    py: Python<'_>,
    table: &Bound<'_, TableCore>,
    ids: PyReadonlyArray1<'_, i64>,
    grads: PyReadonlyArray2<'_, f32>,
    kind: &str,
    lr: f64,
    eps: f64,
    beta1: f64,
    beta2: f64,
    state: Vec<Bound<'_, TableCore>>,
    step: u64,
    check_finite: bool,
    grad_scale: f64,
    max_grad_norm: Option<f64>,
) -> PyResult<usize> {
    let opts = StepOptions {
        check_finite,
        grad_scale,
        max_grad_norm,
    };
    let opt = optimizer(kind, lr, eps, beta1, beta2)?;
    let lease = table.get().lease()?;
    let states = state
        .iter()
        .map(|s| s.get().lease())
        .collect::<PyResult<Vec<_>>>()?;
    optim::check_state_tables(&opt, &lease, &states).map_err(|e| to_pyerr(e, &[]))?;
    let n = ids.len();
    let dim = lease.read().dim;
    if grads.shape() != [n, dim] {
        return Err(PyValueError::new_err(format!(
            "{}: grads must be float32 [{n}, {dim}] (one row of the table's dim per id), got {:?}",
            opt.name(),
            grads.shape()
        )));
    }
    // Read in place (see the docs above), except arrays that are not C-contiguous and arrays
    // that share memory with a table the step writes: those are copied first (by the core).
    let all: Vec<&Lease> = std::iter::once(&lease).chain(&states).collect();
    let ids = in_place_or_copied(&ids, &all)?;
    let grads = in_place_or_copied(&grads, &all)?;
    crate::detached(py, || {
        optim::sparse_step_leased(&lease, &ids, &grads, &opt, &states, step, &opts)
    })
    .map_err(|e| to_pyerr(e, &[n]))
    .and_then(|outcome| match outcome {
        StepOutcome::Updated { rows, .. } => Ok(rows),
        StepOutcome::NonFinite {
            position,
            row,
            value,
        } => Err(PyFloatingPointError::new_err(format!(
            "{}: the gradient is not finite ({value} in the gradient of table row {row}, \
             lookup {position}{}): the step was not applied, no row of the table or of its \
             optimizer state was written",
            opt.name(),
            if grad_scale == 1.0 {
                String::new()
            } else {
                format!(", after multiplying by grad_scale = {grad_scale}")
            }
        ))),
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sparse_step, m)?)?;
    m.add_function(wrap_pyfunction!(check_optimizer, m)?)?;
    m.add_function(wrap_pyfunction!(optimizer_kinds, m)?)?;
    Ok(())
}
