//! engram-core: the pure-Rust algorithms of engram_rs (no Python here).
//!
//! - `compress` (feature `compress`, on by default): tokenizer compression, the raw ->
//!   compressed id table (SPEC section 1), and text to raw ids (`TextTokenizer`).
//! - [`hashing`]: exact multi-head n-gram hashing of DeepSeek's Engram (SPEC sections 2-3);
//!   [`NgramHasher::from_config`] derives everything from the config, as the official demo does.
//! - [`multipliers`] and [`primes`]: the per-layer multipliers (numpy's PCG64 draws) and the
//!   distinct per-head table sizes.
//! - [`table`], [`gather`], [`prefetch`], [`safetensors`], [`dtype`], [`buffer`]: host embedding
//!   tables, their gathers and their file format.
//! - [`optim`]: fused sparse row-wise optimizers (SGD, row-wise Adagrad, SparseAdam) that update
//!   the touched rows of a host table in place.
//! - [`cachesim`]: trace-driven simulation of row caches and of the page cache at equal memory.
//! - [`stats`]: row access statistics (lookups per row, distinct rows per batch).
//! - [`atomic`]: the one atomic file write (temporary name, fsync, rename, directory fsync).
//! - [`checksum`]: XXH3-128 of precomputed index files and their inputs.
//! - [`pool`]: the kernels' thread pools, rebuilt in a forked child.
//! - [`cpu`]: the one CPU-feature detection (and `ENGRAM_RS_FORCE_SCALAR`).
//! - [`elem`]: the id and output element types and the kernels' [`Backend`] choice.

pub mod atomic;
pub mod buffer;
pub mod cachesim;
pub mod checksum;
#[cfg(feature = "compress")]
pub mod compress;
pub mod cpu;
pub mod dtype;
pub mod elem;
pub mod error;
pub mod gather;
pub mod hashing;
pub mod multipliers;
pub mod optim;
pub mod pool;
pub mod prefetch;
pub mod primes;
pub mod safetensors;
pub mod stats;
pub mod table;

pub use elem::{Backend, IdElem, OutElem};
pub use error::{EngramError, Result};
pub use hashing::{HashConfig, LayerSpec, NgramHasher};
