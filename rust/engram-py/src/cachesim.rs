//! Binding of `engram_core::cachesim`: the trace-driven cache simulation and the static hot set,
//! with the GIL released; ids and counts come as int64 or uint64 numpy arrays, checked here.

use crate::to_pyerr;
use engram_core::cachesim::{self, Batches, HotCounts, Policy, SimConfig, Tally};
use numpy::{
    Element, PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A 1-D int64 or uint64 array of non-negative values below 2^63, as `u64`s: in place when it
/// is C-contiguous, else copied.
enum Ids<'py> {
    I64(PyReadonlyArray1<'py, i64>),
    U64(PyReadonlyArray1<'py, u64>),
    Owned(Vec<u64>),
}

impl Ids<'_> {
    fn get(&self) -> &[u64] {
        match self {
            Ids::I64(a) => {
                let s = a.as_slice().expect("checked contiguous");
                // SAFETY: i64 and u64 have the same size and alignment, every bit pattern is a
                // valid u64, and the slice's values were checked non-negative (so equal as u64).
                unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u64>(), s.len()) }
            }
            Ids::U64(a) => a.as_slice().expect("checked contiguous"),
            Ids::Owned(v) => v,
        }
    }
}

/// `arr` checked: a 1-D int64 or uint64 numpy array whose values are in `[0, 2^63)`; `what`
/// names it in errors ("trace", "batch offsets", ...).
fn ids<'py>(arr: &Bound<'py, PyAny>, what: &str) -> PyResult<Ids<'py>> {
    let Ok(u) = arr.cast::<PyUntypedArray>() else {
        return Err(PyValueError::new_err(format!(
            "{what} must be a numpy array of int64 or uint64, not {}",
            arr.get_type().name()?
        )));
    };
    if u.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{what} must be 1-D, not of shape {:?}",
            u.shape()
        )));
    }
    let dt = u.dtype();
    let py = arr.py();
    if dt.is_equiv_to(&numpy::dtype::<i64>(py)) {
        checked(
            arr,
            what,
            |v: i64| v < 0,
            "non-negative",
            Ids::I64,
            |v| v as u64,
        )
    } else if dt.is_equiv_to(&numpy::dtype::<u64>(py)) {
        let big = |v: u64| v > i64::MAX as u64;
        checked(
            arr,
            what,
            big,
            "below 2^63 (int64 row ids)",
            Ids::U64,
            |v| v,
        )
    } else {
        Err(PyValueError::new_err(format!(
            "{what} must be int64 or uint64, not {}: cast it with .astype(numpy.int64)",
            dt.str()?
        )))
    }
}

/// `arr` (of element `T`) as [`Ids`]: a ValueError naming the first value that is `bad` (the
/// values must be `rule`); in place (`wrap`) when C-contiguous, else copied (`widen`).
fn checked<'py, T: Element + Copy + std::fmt::Display>(
    arr: &Bound<'py, PyAny>,
    what: &str,
    bad: impl Fn(T) -> bool,
    rule: &str,
    wrap: fn(PyReadonlyArray1<'py, T>) -> Ids<'py>,
    widen: fn(T) -> u64,
) -> PyResult<Ids<'py>> {
    let a = arr.cast::<PyArray1<T>>()?.readonly();
    if let Some((i, v)) = a.as_array().iter().enumerate().find(|(_, &v)| bad(v)) {
        return Err(PyValueError::new_err(format!(
            "{what} holds {v} at position {i}: its values must be {rule}"
        )));
    }
    Ok(if a.as_slice().is_ok() {
        wrap(a)
    } else {
        Ids::Owned(a.as_array().iter().map(|&v| widen(v)).collect())
    })
}

/// `value` as a `u64`: a ValueError naming `what` when it is negative or too large.
fn non_negative(value: i128, what: &str) -> PyResult<u64> {
    if value < 0 {
        return Err(PyValueError::new_err(format!(
            "{what} = {value} is negative: it must be >= 0"
        )));
    }
    u64::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{what} = {value} is beyond 2^64")))
}

/// `(lookups, hits, page_accesses, page_hits)` of one stream.
type PyTally = (u64, u64, u64, u64);

/// One outcome: `(policy, budget, capacity, held, all, distinct, seconds)`.
type PyOutcome = (&'static str, u64, u64, u64, PyTally, PyTally, f64);

/// The report: `(lookups, distinct_lookups, distinct_rows, distinct_pages, batches,
/// prepare_seconds, outcomes)`.
type PyReport = (u64, u64, u64, u64, u64, f64, Vec<PyOutcome>);

/// Simulates the cache `policies` at each of `budgets` (bytes) over `trace` (row ids in access
/// order), cut into batches of `batch_size` lookups or at `offsets` (cumulative, from 0 to
/// `len(trace)`). The static hot set comes from the row ids of `train`, or from `hot_rows` with
/// `hot_counts`, or else from the trace itself.
#[pyfunction]
#[pyo3(signature = (
    trace, row_bytes, budgets, policies, batch_size=None, offsets=None, train=None,
    hot_rows=None, hot_counts=None, page_bytes=4096
))]
#[allow(clippy::too_many_arguments)]
fn cachesim_run(
    py: Python<'_>,
    trace: &Bound<'_, PyAny>,
    row_bytes: i128,
    budgets: Vec<i128>,
    policies: Vec<String>,
    batch_size: Option<i128>,
    offsets: Option<&Bound<'_, PyAny>>,
    train: Option<&Bound<'_, PyAny>>,
    hot_rows: Option<&Bound<'_, PyAny>>,
    hot_counts: Option<&Bound<'_, PyAny>>,
    page_bytes: i128,
) -> PyResult<PyReport> {
    let trace = ids(trace, "trace")?;
    let row_bytes = non_negative(row_bytes, "row_bytes")?;
    let page_bytes = non_negative(page_bytes, "page_bytes")?;
    let budgets = budgets
        .iter()
        .enumerate()
        .map(|(i, &b)| non_negative(b, &format!("budget {i}")))
        .collect::<PyResult<Vec<u64>>>()?;
    let policies = policies
        .iter()
        .map(|p| Policy::parse(p).map_err(|e| to_pyerr(e, &[])))
        .collect::<PyResult<Vec<Policy>>>()?;
    let offsets = offsets.map(|o| ids(o, "batch offsets")).transpose()?;
    let batches =
        match (batch_size, &offsets) {
            (Some(n), None) => Batches::Every(non_negative(n, "batch_size")?),
            (None, Some(o)) => Batches::Offsets(o.get()),
            _ => return Err(PyValueError::new_err(
                "pass exactly one of batch_size (lookups a batch) and offsets (cumulative batch \
                 bounds)",
            )),
        };
    let train = train.map(|t| ids(t, "train")).transpose()?;
    let hot_rows = hot_rows.map(|t| ids(t, "hot_rows")).transpose()?;
    let hot_counts = hot_counts.map(|t| ids(t, "hot_counts")).transpose()?;
    let hot = match (&train, &hot_rows, &hot_counts) {
        (None, None, None) => HotCounts::InSample,
        (Some(t), None, None) => HotCounts::Trace(t.get()),
        (None, Some(r), Some(c)) => HotCounts::Counts {
            rows: r.get(),
            counts: c.get(),
        },
        _ => {
            return Err(PyValueError::new_err(
                "pass either train (a trace) or hot_rows with hot_counts (per-row counts), or \
                 neither (the trace's own counts)",
            ))
        }
    };
    let cfg = SimConfig {
        row_bytes,
        page_bytes,
        budgets: &budgets,
        policies: &policies,
        hot,
    };
    let trace = trace.get();
    let report = crate::detached(py, || cachesim::simulate(trace, batches, &cfg))
        .map_err(|e| to_pyerr(e, &[]))?;
    let t = |t: &Tally| (t.lookups, t.hits, t.page_accesses, t.page_hits);
    let outcomes = report
        .outcomes
        .iter()
        .map(|o| {
            (
                o.policy.name(),
                o.budget,
                o.capacity,
                o.held,
                t(&o.all),
                t(&o.distinct),
                o.seconds,
            )
        })
        .collect();
    Ok((
        report.lookups,
        report.distinct_lookups,
        report.distinct_rows,
        report.distinct_pages,
        report.batches,
        report.prepare_seconds,
        outcomes,
    ))
}

/// The static hot set of a budget of `budget` bytes at `row_bytes` a row: the rows of `rows`
/// with the highest `counts` (ties: smaller row id; counts of a row given twice are summed;
/// uncounted rows are never hot), sorted by row id, as int64.
#[pyfunction]
fn cachesim_hot_set<'py>(
    py: Python<'py>,
    rows: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    row_bytes: i128,
    budget: i128,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let (rows, counts) = (ids(rows, "rows")?, ids(counts, "counts")?);
    let row_bytes = non_negative(row_bytes, "row_bytes")?;
    let budget = non_negative(budget, "budget")?;
    let (r, c) = (rows.get(), counts.get());
    let hot = crate::detached(py, || cachesim::static_hot_set(r, c, row_bytes, budget))
        .map_err(|e| to_pyerr(e, &[]))?;
    // Row ids were checked below 2^63.
    Ok(PyArray1::from_vec(
        py,
        hot.into_iter().map(|r| r as i64).collect(),
    ))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cachesim_run, m)?)?;
    m.add_function(wrap_pyfunction!(cachesim_hot_set, m)?)?;
    Ok(())
}
