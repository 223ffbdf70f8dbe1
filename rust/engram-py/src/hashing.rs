//! Bindings of the n-gram hasher (`HasherCore`), its config check and multipliers, and the
//! table rows of per-head hash ids (`head_rows`).

use crate::convert::{detached, interruptible, pooled_array};
use crate::errors::to_pyerr;
use engram_core::hashing::{
    simd_available, Backend, HashConfig, HashRequest, IdElem, NgramHasher, OutElem,
};
use numpy::{
    Element, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArray2,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The flat table rows of per-head hash ids `[..., cols]` (int32 or int64, C-contiguous):
/// `ids + offsets` per column, each id checked against its head's rows `bounds` in the same
/// pass (an `OutOfRangeError` naming the position in `hash_ids`' shape, the column, the value
/// and the bound). Returns int64 `[n / cols, cols]` on a pooled buffer.
#[pyfunction]
pub(crate) fn head_rows<'py>(
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
/// The odd multipliers of one Engram layer (SPEC section 2), as numpy's default_rng draws them.
#[pyfunction]
pub(crate) fn layer_multipliers(
    seed: u64,
    layer: u64,
    max_ngram: usize,
    vocab: u64,
) -> PyResult<Vec<i64>> {
    engram_core::multipliers::layer_multipliers(seed, layer, max_ngram, vocab)
        .map_err(|e| to_pyerr(e, &[]))
}

/// Validates a hashing config by the core's rules (`HashConfig::validate`); `EngramConfig` calls
/// it so that the rules live in one place.
#[pyfunction]
pub(crate) fn check_hash_config(
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
pub(crate) fn py_simd_available() -> bool {
    simd_available()
}

/// The Rust hasher behind `engram_rs.NgramHasher` (which validates config and shapes).
#[pyclass(module = "engram_rs._engram_rs")]
pub(crate) struct HasherCore {
    inner: NgramHasher,
}

/// Per-call options of `HasherCore.hash`, forwarded to the core request.
struct CallOptions<'a> {
    shape: &'a [usize],
    bounds: &'a [usize],
    layers: &'a [usize],
    flat: bool,
    raw: bool,
    blocked: Option<&'a [u8]>,
    dead_id: Option<u64>,
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
                blocked: opts.blocked,
                dead_id: opts.dead_id,
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
    /// the lookup table installed by `set_lookup`. `blocked` (uint8, one flag per id, nonzero
    /// where blocked) and `dead_id` (an id value) mark blocked positions (SPEC 8.3).
    #[pyo3(signature = (ids, bounds, layers, int32=false, flat=false, history=None, scalar=false, raw=false, blocked=None, dead_id=None))]
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
        blocked: Option<PyReadonlyArrayDyn<'py, u8>>,
        dead_id: Option<u64>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let flags = match blocked.as_ref() {
            Some(m) => Some(m.as_slice().map_err(|_| {
                PyValueError::new_err(
                    "the blocked mask must be C-contiguous: pass numpy.ascontiguousarray(blocked)",
                )
            })?),
            None => None,
        };
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
            blocked: flags,
            dead_id,
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
