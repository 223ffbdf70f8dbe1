//! PyO3 bindings of engram-core: type conversion, error mapping and GIL release only. This
//! file registers the module; each binding lives in the file of its job.

use pyo3::prelude::*;

mod cachesim;
mod compress;
mod convert;
mod dtype;
mod errors;
mod hashing;
mod optim;
mod precompute;
mod safetensors;
mod stats;
mod table;

pub(crate) use convert::{detached, pooled_array};
pub(crate) use errors::{to_pyerr, Raised};

/// The compiled core of engram_rs.
#[pymodule]
fn _engram_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Installs the fork handler now, before any table, job or pool exists to go stale.
    engram_core::pool::fork_generation();
    m.add_function(wrap_pyfunction!(hashing::layer_multipliers, m)?)?;
    m.add_function(wrap_pyfunction!(hashing::check_hash_config, m)?)?;
    m.add_function(wrap_pyfunction!(hashing::py_simd_available, m)?)?;
    m.add_function(wrap_pyfunction!(convert::clear_buffer_pool, m)?)?;
    m.add_function(wrap_pyfunction!(hashing::head_rows, m)?)?;
    m.add(
        "OutOfRangeError",
        m.py().get_type::<errors::OutOfRangeError>(),
    )?;
    m.add_class::<convert::PooledBuffer>()?;
    m.add_class::<table::TableCore>()?;
    m.add_function(wrap_pyfunction!(table::probe_reads, m)?)?;
    m.add_function(wrap_pyfunction!(dtype::cast_f32, m)?)?;
    m.add_function(wrap_pyfunction!(dtype::dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(dtype::quantize_fp8, m)?)?;
    m.add_class::<table::PrefetchCore>()?;
    m.add_class::<hashing::HasherCore>()?;
    cachesim::register(m)?;
    compress::register(m)?;
    optim::register(m)?;
    precompute::register(m)?;
    safetensors::register(m)?;
    stats::register(m)?;
    Ok(())
}
