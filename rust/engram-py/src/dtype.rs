//! Bindings of the table dtypes: the registry, float casts and FP8 quantization.

use crate::to_pyerr;
use engram_core::dtype::DType;
use numpy::PyUntypedArrayMethods;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A dtype by name (any spelling the core accepts), or a ValueError.
pub(crate) fn dtype(name: &str) -> PyResult<DType> {
    DType::parse(name).map_err(|e| to_pyerr(e, &[]))
}

/// The table dtypes, the registry every Python dtype rule is built from: per dtype `(name,
/// safetensors name, numpy holder, torch name, bytes per value, whether gathers can output it,
/// spellings, FP8 block)`.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn dtypes() -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    usize,
    bool,
    Vec<&'static str>,
    usize,
)> {
    DType::ALL
        .into_iter()
        .map(|d| {
            (
                d.name(),
                d.safetensors_name(),
                d.numpy_name(),
                d.torch_name(),
                d.size(),
                d.is_output(),
                d.spellings().to_vec(),
                if d == DType::F8E4M3 {
                    engram_core::dtype::FP8_BLOCK
                } else {
                    0
                },
            )
        })
        .collect()
}

/// Rounds float32 values to `dtype` ("float16"/"bfloat16", nearest even) as raw bytes.
#[pyfunction]
pub fn cast_f32<'py>(
    py: Python<'py>,
    values: numpy::PyReadonlyArrayDyn<'py, f32>,
    dtype: &str,
) -> PyResult<Bound<'py, numpy::PyArray1<u8>>> {
    let dt = self::dtype(dtype)?;
    if !dt.is_output() {
        return Err(PyValueError::new_err("use quantize_fp8 for FP8 tables"));
    }
    let src = values.as_slice()?;
    let mut out = vec![0u8; src.len() * dt.size()];
    py.detach(|| engram_core::dtype::f32_to_row(dt, src, &mut out));
    Ok(numpy::PyArray1::from_vec(py, out))
}

/// Quantizes float32 rows [n, dim] to E4M3 codes and UE8M0 block scales (DeepSeek's scheme:
/// per block of 32, the smallest power of two that fits the block in E4M3's range).
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn quantize_fp8<'py>(
    py: Python<'py>,
    values: numpy::PyReadonlyArray2<'py, f32>,
) -> PyResult<(
    Bound<'py, numpy::PyArray1<u8>>,
    Bound<'py, numpy::PyArray1<u8>>,
)> {
    let dim = values.shape()[1];
    let src = values.as_slice()?;
    let mut codes = vec![0u8; src.len()];
    let mut scales = vec![0u8; src.len() / engram_core::dtype::FP8_BLOCK];
    py.detach(|| engram_core::dtype::quantize_rows(src, dim, &mut codes, &mut scales))
        .map_err(|e| to_pyerr(e, &[]))?;
    Ok((
        numpy::PyArray1::from_vec(py, codes),
        numpy::PyArray1::from_vec(py, scales),
    ))
}
