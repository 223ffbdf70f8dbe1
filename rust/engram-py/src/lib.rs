//! PyO3 bindings of engram-core: type conversion, error mapping and GIL release only.

use engram_core::hashing::{
    advance_history, simd_available, Backend, IdElem, LayerSpec, NgramHasher, OutElem,
};
use engram_core::EngramError;
use numpy::{
    Element, PyArray2, PyArrayDyn, PyArrayMethods, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Maps a core error to the Python exception users expect; `shape` unravels flat id positions.
fn to_pyerr(err: EngramError, shape: &[usize]) -> PyErr {
    match err {
        EngramError::IdOutOfRange {
            value,
            index,
            vocab,
        } => {
            let mut pos = Vec::with_capacity(shape.len());
            let mut rest = index;
            for &dim in shape.iter().rev() {
                pos.push(rest % dim.max(1));
                rest /= dim.max(1);
            }
            pos.reverse();
            let pos = pos
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            PyIndexError::new_err(format!(
                "id {value} at position ({pos}{}) is out of range [0, {vocab}): \
                 pass compressed token ids (map raw ids through CompressedTokenizer first)",
                if shape.len() == 1 { "," } else { "" }
            ))
        }
        other => PyValueError::new_err(other.to_string()),
    }
}

/// Distinct primes per layer, order and head (SPEC section 2).
#[pyfunction]
fn layer_primes(
    engram_vocab_size: Vec<u64>,
    n_head: usize,
    num_layers: usize,
) -> PyResult<Vec<Vec<Vec<u64>>>> {
    engram_core::primes::layer_primes(&engram_vocab_size, n_head, num_layers)
        .map_err(|e| to_pyerr(e, &[]))
}

/// Whether the AVX-512 hashing path is used on this CPU.
#[pyfunction(name = "simd_available")]
fn py_simd_available() -> bool {
    simd_available()
}

/// The Rust hasher behind `engram_rs.NgramHasher` (which validates config and shapes).
#[pyclass(module = "engram_rs._engram_rs", frozen)]
struct HasherCore {
    inner: NgramHasher,
}

impl HasherCore {
    #[allow(clippy::too_many_arguments)]
    fn run<'py, I: IdElem, O: OutElem + Element>(
        &self,
        py: Python<'py>,
        ids: &[I],
        shape: &[usize],
        bounds: &[usize],
        mut history: Option<PyReadwriteArray2<'py, i64>>,
        layers: &[usize],
        flat: bool,
        backend: Backend,
    ) -> PyResult<Vec<Bound<'py, PyArray2<O>>>> {
        let cols = self.inner.cols();
        // SAFETY: the arrays are fresh and every element is written by `hash_segments` before
        // they are returned; on error they are dropped unread.
        let arrays: Vec<Bound<'py, PyArray2<O>>> = layers
            .iter()
            .map(|_| unsafe { PyArray2::<O>::new(py, [ids.len(), cols], false) })
            .collect();
        let mut guards = arrays
            .iter()
            .map(|a| a.try_readwrite())
            .collect::<Result<Vec<_>, _>>()?;
        let mut outs = guards
            .iter_mut()
            .map(|g| g.as_slice_mut())
            .collect::<Result<Vec<_>, _>>()?;
        let hist = history.as_mut().map(|h| h.as_slice_mut()).transpose()?;
        let hist_len = self.inner.max_ngram() - 1;
        py.detach(|| {
            self.inner.hash_segments(
                ids,
                bounds,
                hist.as_deref(),
                layers,
                flat,
                &mut outs,
                backend,
            )?;
            if let Some(h) = hist {
                advance_history(h, hist_len, ids, bounds);
            }
            Ok(())
        })
        .map_err(|e| to_pyerr(e, shape))?;
        drop(guards);
        Ok(arrays)
    }
}

macro_rules! dispatch_ids {
    ($ids:expr, |$slice:ident| $body:expr, $($t:ty),*) => {{
        $(if let Ok(a) = $ids.cast::<PyArrayDyn<$t>>() {
            let ro = a.try_readonly()?;
            let $slice = ro.as_slice()?;
            return $body;
        })*
        Err(PyTypeError::new_err(format!(
            "ids must be an integer numpy array, got {}: convert with ids.astype(numpy.int64)",
            $ids.get_type().name()?
        )))
    }};
}

#[pymethods]
impl HasherCore {
    #[new]
    fn new(
        max_ngram: usize,
        n_head: usize,
        vocab: u64,
        pad: i64,
        multipliers: Vec<Vec<i64>>,
        primes: Vec<Vec<u64>>,
    ) -> PyResult<Self> {
        if multipliers.len() != primes.len() {
            return Err(PyValueError::new_err(
                "multipliers and primes need one entry per layer",
            ));
        }
        let specs = multipliers
            .into_iter()
            .zip(primes)
            .map(|(multipliers, primes)| LayerSpec {
                multipliers,
                primes,
            });
        Ok(Self {
            inner: NgramHasher::new(max_ngram, n_head, vocab, pad, specs.collect())
                .map_err(|e| to_pyerr(e, &[]))?,
        })
    }

    /// Hashes a C-contiguous integer array cut into segments by `bounds`; returns one
    /// `[ids.size, cols]` array per entry of `layers`. `history` ([segments, N-1] int64) is read
    /// as each segment's past and then advanced past the new ids.
    #[pyo3(signature = (ids, bounds, layers, int32=false, flat=false, history=None, scalar=false))]
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
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let backend = if scalar {
            Backend::Scalar
        } else {
            Backend::Auto
        };
        let shape: Vec<usize> = ids
            .cast::<numpy::PyUntypedArray>()
            .map_err(|_| PyTypeError::new_err("ids must be a numpy array"))?
            .shape()
            .to_vec();
        fn erase<'py, O>(v: Vec<Bound<'py, PyArray2<O>>>) -> Vec<Bound<'py, PyAny>> {
            v.into_iter().map(|a| a.into_any()).collect()
        }
        dispatch_ids!(
            ids,
            |slice| if int32 {
                self.run::<_, i32>(py, slice, &shape, &bounds, history, &layers, flat, backend)
                    .map(erase)
            } else {
                self.run::<_, i64>(py, slice, &shape, &bounds, history, &layers, flat, backend)
                    .map(erase)
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

    fn offsets(&self, layer: usize) -> PyResult<Vec<u64>> {
        self.check_layer(layer)?;
        Ok(self.inner.offsets(layer).to_vec())
    }

    fn table_rows(&self, layer: usize) -> PyResult<u64> {
        self.check_layer(layer)?;
        Ok(self.inner.table_rows(layer))
    }

    fn max_value(&self, layer: usize, flat: bool) -> PyResult<u64> {
        self.check_layer(layer)?;
        Ok(self.inner.max_value(layer, flat))
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
    m.add_function(wrap_pyfunction!(layer_primes, m)?)?;
    m.add_function(wrap_pyfunction!(py_simd_available, m)?)?;
    m.add_class::<HasherCore>()?;
    Ok(())
}
