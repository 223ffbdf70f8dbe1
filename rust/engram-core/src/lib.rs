//! engram-core: the pure-Rust algorithms of engram_rs (no Python here).
//!
//! - [`compress`]: tokenizer compression, the raw -> compressed id table (SPEC section 1).
//! - [`hashing`]: exact multi-head n-gram hashing of DeepSeek's Engram (SPEC sections 2-3).
//! - [`primes`]: the distinct per-head table sizes.

pub mod buffer;
pub mod compress;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod gather;
pub mod hashing;
pub mod multipliers;
pub mod prefetch;
pub mod primes;
pub mod safetensors;
pub mod table;

pub use error::{EngramError, Result};
pub use hashing::{Backend, IdElem, LayerSpec, NgramHasher, OutElem};
