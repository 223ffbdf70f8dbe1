//! One cached CPU-feature detection for every kernel, and the switch that forces scalar paths.
//!
//! `ENGRAM_RS_FORCE_SCALAR=1` (read once, at the first kernel call) makes every kernel take its
//! scalar reference path, so a test run can check that the scalar paths alone give the golden
//! results and that "fast equals scalar" comparisons are not between two scalar runs.

use std::sync::OnceLock;

/// What the kernels may use on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// AVX-512 F, DQ, BW and VL: every AVX-512 kernel of the crate (hashing reduction, gathers,
    /// bf16/f16 widening, FP8 dequantization) needs no more than these.
    pub avx512: bool,
    /// Whether `ENGRAM_RS_FORCE_SCALAR` turned the SIMD paths off.
    pub forced_scalar: bool,
}

fn detect() -> Features {
    let forced_scalar =
        std::env::var_os("ENGRAM_RS_FORCE_SCALAR").is_some_and(|v| !v.is_empty() && v != "0");
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    Features {
        avx512: avx512 && !forced_scalar,
        forced_scalar,
    }
}

/// The features of this CPU, detected once per process.
pub fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(detect)
}

/// Whether the AVX-512 kernels run (the CPU has them and they are not forced off).
#[inline]
pub fn avx512() -> bool {
    features().avx512
}

/// Asks for the cache line at `p` (any address: a prefetch never faults).
#[inline(always)]
pub(crate) fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::hint::black_box(p);
}
