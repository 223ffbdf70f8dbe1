//! PyO3 bindings of engram-core: type conversion, error mapping and GIL release only.

use engram_core::buffer::{AlignedBuf, OUTPUT_POOL};
use engram_core::hashing::{
    simd_available, Backend, HashConfig, HashRequest, IdElem, NgramHasher, OutElem,
};
use engram_core::EngramError;
use numpy::ndarray::ArrayView2;
use numpy::{
    Element, PyArray2, PyArrayDyn, PyArrayMethods, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{
    PyFileNotFoundError, PyIndexError, PyMemoryError, PyOSError, PyPermissionError, PyRuntimeError,
    PyTypeError, PyValueError,
};
use pyo3::prelude::*;

mod compress;
mod optim;
mod precompute;
mod safetensors;
mod table;

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

/// Maps a core error to the Python exception users expect; `shape` unravels flat id positions.
pub(crate) fn to_pyerr(err: EngramError, shape: &[usize]) -> PyErr {
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
        EngramError::FileNotFound { .. } => PyFileNotFoundError::new_err(err.to_string()),
        EngramError::Io { kind, .. } if *kind == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(err.to_string())
        }
        EngramError::Io { kind, .. } if *kind == std::io::ErrorKind::PermissionDenied => {
            PyPermissionError::new_err(err.to_string())
        }
        EngramError::Io { .. } => PyOSError::new_err(err.to_string()),
        EngramError::ReadOnly(msg) => PyPermissionError::new_err(msg.clone()),
        EngramError::OutOfMemory { .. } => PyMemoryError::new_err(err.to_string()),
        EngramError::Internal(_) | EngramError::Threads(_) => {
            PyRuntimeError::new_err(err.to_string())
        }
        _ => PyValueError::new_err(err.to_string()),
    }
}

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
struct PooledBuffer {
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

/// The flat table rows of per-head hash ids `[..., cols]` (int32 or int64, C-contiguous):
/// `ids + offsets` per column, each id checked against its head's rows `bounds` in the same
/// pass (an `OutOfRangeError` naming the position in `hash_ids`' shape, the column, the value
/// and the bound). Returns int64 `[n / cols, cols]` on a pooled buffer.
#[pyfunction]
fn head_rows<'py>(
    py: Python<'py>,
    hash_ids: &Bound<'py, PyAny>,
    offsets: Vec<i64>,
    bounds: Vec<u64>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let arr = hash_ids.cast::<numpy::PyUntypedArray>()?;
    let shape = arr.shape().to_vec();
    let cols = offsets.len().max(1);
    if shape.last() != Some(&offsets.len()) {
        return Err(PyValueError::new_err(format!(
            "hash ids of shape {shape:?}: the last axis must hold one id per head ({} heads)",
            offsets.len()
        )));
    }
    let n = arr.len();
    // SAFETY: `head_rows` writes every element (or the array is dropped with the error).
    let out = unsafe { pooled_array::<i64>(py, n / cols, cols)? };
    {
        let mut rw = out.readwrite();
        let dst = rw.as_slice_mut()?;
        macro_rules! run {
            ($t:ty) => {
                if let Ok(a) = hash_ids.cast::<PyArrayDyn<$t>>() {
                    let ro = a.try_readonly()?;
                    let ids = ro.as_slice()?;
                    return detached(py, || {
                        engram_core::gather::head_rows(ids, &offsets, &bounds, dst)
                    })
                    .map_err(|e| to_pyerr(e, &shape))
                    .map(|()| out.clone());
                }
            };
        }
        run!(i64);
        run!(i32);
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "hash ids must be an int32 or int64 numpy array",
    ))
}

/// Frees the idle pooled output buffers; returns how many bytes they held.
#[pyfunction]
fn clear_buffer_pool() -> usize {
    let idle = OUTPUT_POOL.idle_bytes();
    OUTPUT_POOL.clear();
    idle
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

/// Runs `f` without the GIL, handing it an interrupt check that raises Ctrl-C (and any other
/// pending signal's exception) from the long loop it runs.
fn interruptible<T: Send>(
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

/// The odd multipliers of one Engram layer (SPEC section 2), as numpy's default_rng draws them.
#[pyfunction]
fn layer_multipliers(seed: u64, layer: u64, max_ngram: usize, vocab: u64) -> PyResult<Vec<i64>> {
    engram_core::multipliers::layer_multipliers(seed, layer, max_ngram, vocab)
        .map_err(|e| to_pyerr(e, &[]))
}

/// Validates a hashing config by the core's rules (`HashConfig::validate`); `EngramConfig` calls
/// it so that the rules live in one place.
#[pyfunction]
fn check_hash_config(
    engram_vocab_size: Vec<u64>,
    max_ngram_size: usize,
    n_head_per_ngram: usize,
    layer_ids: Vec<u64>,
    seed: u64,
) -> PyResult<()> {
    HashConfig {
        engram_vocab_size,
        max_ngram_size,
        n_head_per_ngram,
        layer_ids,
        seed,
    }
    .validate()
    .map_err(|e| to_pyerr(e, &[]))
}

/// Whether the AVX-512 hashing path is used on this CPU.
#[pyfunction(name = "simd_available")]
fn py_simd_available() -> bool {
    simd_available()
}

/// The Rust hasher behind `engram_rs.NgramHasher` (which validates config and shapes).
#[pyclass(module = "engram_rs._engram_rs")]
struct HasherCore {
    inner: NgramHasher,
}

/// Per-call options of `HasherCore.hash`, forwarded to the core request.
struct CallOptions<'a> {
    shape: &'a [usize],
    bounds: &'a [usize],
    layers: &'a [usize],
    flat: bool,
    raw: bool,
    backend: Backend,
}

impl HasherCore {
    fn run<'py, I: IdElem, O: OutElem + Element>(
        &self,
        py: Python<'py>,
        ids: &[I],
        opts: &CallOptions<'_>,
        mut history: Option<PyReadwriteArray2<'py, i64>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let cols = self.inner.cols();
        // SAFETY: every element is written by `hash_segments` before the arrays are returned;
        // on error they are dropped unread.
        let arrays = opts
            .layers
            .iter()
            .map(|_| unsafe { pooled_array::<O>(py, ids.len(), cols) })
            .collect::<PyResult<Vec<_>>>()?;
        let mut guards = arrays
            .iter()
            .map(|a| a.try_readwrite())
            .collect::<Result<Vec<_>, _>>()?;
        let mut outs = guards
            .iter_mut()
            .map(|g| g.as_slice_mut())
            .collect::<Result<Vec<_>, _>>()?;
        // The state is copied in and written back with the GIL held: the kernel never reads
        // memory another Python thread may write, and a failed step leaves the state unchanged.
        let mut state = match history.as_ref() {
            Some(h) => {
                if !h.as_array().is_standard_layout() {
                    return Err(PyValueError::new_err(
                        "state.history must be a C-contiguous int64 array: create the state with \
                         new_state() and do not replace its history",
                    ));
                }
                Some(h.as_slice()?.to_vec())
            }
            None => None,
        };
        detached(py, || {
            let req = HashRequest {
                ids,
                bounds: opts.bounds,
                history: None,
                layers: opts.layers,
                flat: opts.flat,
                raw: opts.raw,
                backend: opts.backend,
            };
            match state.as_mut() {
                Some(h) => self.inner.hash_step(&req, h, &mut outs),
                None => self.inner.hash_segments(&req, &mut outs),
            }
        })
        .map_err(|e| to_pyerr(e, opts.shape))?;
        if let (Some(h), Some(new)) = (history.as_mut(), state) {
            h.as_slice_mut()?.copy_from_slice(&new);
        }
        drop(guards);
        Ok(arrays.into_iter().map(|a| a.into_any()).collect())
    }
}

macro_rules! dispatch_ids {
    ($ids:expr, |$slice:ident| $body:expr, $($t:ty),*) => {{
        $(if let Ok(a) = $ids.cast::<PyArrayDyn<$t>>() {
            if !a.is_c_contiguous() {
                return Err(PyValueError::new_err(
                    "ids must be C-contiguous: pass numpy.ascontiguousarray(ids)",
                ));
            }
            let ro = a.try_readonly()?;
            let $slice = ro.as_slice()?;
            return $body;
        })*
        let dtype = $ids
            .cast::<numpy::PyUntypedArray>()
            .map(|a| a.dtype().to_string())
            .unwrap_or_else(|_| "not an array".into());
        Err(PyTypeError::new_err(format!(
            "ids must be a native-endian integer numpy array, got {} ({dtype}): convert with \
             ids.astype(numpy.int64)",
            $ids.get_type().name()?
        )))
    }};
}

#[pymethods]
impl HasherCore {
    /// Builds the hasher of a config (multipliers and primes derived in the core) without the
    /// GIL; Ctrl-C stops an absurd config's prime search.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        engram_vocab_size: Vec<u64>,
        max_ngram_size: usize,
        n_head_per_ngram: usize,
        layer_ids: Vec<u64>,
        seed: u64,
        vocab: u64,
        pad: i64,
    ) -> PyResult<Self> {
        let config = HashConfig {
            engram_vocab_size,
            max_ngram_size,
            n_head_per_ngram,
            layer_ids,
            seed,
        };
        let inner = interruptible(py, |check| {
            NgramHasher::from_config(&config, vocab, pad, check)
        })?;
        Ok(Self { inner })
    }

    fn multipliers(&self, layer: usize) -> PyResult<Vec<i64>> {
        self.check_layer(layer)?;
        Ok(self.inner.multipliers(layer).to_vec())
    }

    fn primes(&self, layer: usize) -> PyResult<Vec<u64>> {
        self.check_layer(layer)?;
        Ok(self.inner.primes(layer).to_vec())
    }

    /// Hashes a C-contiguous integer array cut into segments by `bounds`; returns one
    /// `[ids.size, cols]` array per entry of `layers`. `history` ([segments, N-1] int64) is read
    /// as each segment's past and then advanced past the new ids. `raw` maps the ids through
    /// the lookup table installed by `set_lookup`.
    #[pyo3(signature = (ids, bounds, layers, int32=false, flat=false, history=None, scalar=false, raw=false))]
    #[allow(clippy::too_many_arguments)]
    fn hash<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        bounds: Vec<usize>,
        layers: Vec<usize>,
        int32: bool,
        flat: bool,
        history: Option<PyReadwriteArray2<'py, i64>>,
        scalar: bool,
        raw: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let shape: Vec<usize> = ids
            .cast::<numpy::PyUntypedArray>()
            .map_err(|_| PyTypeError::new_err("ids must be a numpy array"))?
            .shape()
            .to_vec();
        let opts = CallOptions {
            shape: &shape,
            bounds: &bounds,
            layers: &layers,
            flat,
            raw,
            backend: if scalar {
                Backend::Scalar
            } else {
                Backend::Auto
            },
        };
        dispatch_ids!(
            ids,
            |slice| if int32 {
                self.run::<_, i32>(py, slice, &opts, history)
            } else {
                self.run::<_, i64>(py, slice, &opts, history)
            },
            i64,
            i32,
            u32,
            u16,
            u8,
            i16,
            i8,
            u64
        )
    }

    /// Installs the raw -> compressed id table used by `hash(..., raw=True)`.
    fn set_lookup(&mut self, table: Vec<i64>) -> PyResult<()> {
        self.inner.set_lookup(table).map_err(|e| to_pyerr(e, &[]))
    }

    fn offsets(&self, layer: usize) -> PyResult<Vec<u64>> {
        self.check_layer(layer)?;
        Ok(self.inner.offsets(layer).to_vec())
    }

    fn table_rows(&self, layer: usize) -> PyResult<u64> {
        self.check_layer(layer)?;
        Ok(self.inner.table_rows(layer))
    }
}

impl HasherCore {
    fn check_layer(&self, layer: usize) -> PyResult<()> {
        if layer >= self.inner.num_layers() {
            return Err(PyIndexError::new_err(format!(
                "layer index {layer} out of range"
            )));
        }
        Ok(())
    }
}

/// The compiled core of engram_rs.
#[pymodule]
fn _engram_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Installs the fork handler now, before any table, job or pool exists to go stale.
    engram_core::pool::fork_generation();
    m.add_function(wrap_pyfunction!(layer_multipliers, m)?)?;
    m.add_function(wrap_pyfunction!(check_hash_config, m)?)?;
    m.add_function(wrap_pyfunction!(py_simd_available, m)?)?;
    m.add_function(wrap_pyfunction!(clear_buffer_pool, m)?)?;
    m.add_function(wrap_pyfunction!(head_rows, m)?)?;
    m.add("OutOfRangeError", m.py().get_type::<OutOfRangeError>())?;
    m.add_class::<PooledBuffer>()?;
    m.add_class::<table::TableCore>()?;
    m.add_function(wrap_pyfunction!(table::cast_f32, m)?)?;
    m.add_function(wrap_pyfunction!(table::dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(table::quantize_fp8, m)?)?;
    m.add_class::<table::PrefetchCore>()?;
    m.add_class::<HasherCore>()?;
    compress::register(m)?;
    optim::register(m)?;
    precompute::register(m)?;
    safetensors::register(m)?;
    Ok(())
}
