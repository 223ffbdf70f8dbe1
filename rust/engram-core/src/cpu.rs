//! One cached CPU-feature detection for every kernel, and the switch that forces scalar paths.
//!
//! `ENGRAM_RS_FORCE_SCALAR=1` (read once, at the first kernel call) makes every kernel take its
//! scalar reference path, so a test run can check that the scalar paths alone give the golden
//! results and that "fast equals scalar" comparisons are not between two scalar runs.

use std::sync::atomic::{AtomicU8, Ordering};

/// What the kernels may use on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// AVX-512 F, DQ, BW and VL: every AVX-512 kernel of the crate (hashing reduction, gathers,
    /// bf16/f16 widening, FP8 dequantization) needs no more than these.
    pub avx512: bool,
    /// AVX2 (the optimizer's row engine on CPUs without AVX-512).
    pub avx2: bool,
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
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    Features {
        avx512: avx512 && !forced_scalar,
        avx2: avx2 && !forced_scalar,
        forced_scalar,
    }
}

/// A value computed at most a few times and cached in one atomic byte: threads that race compute
/// it each (the computation is pure), and none ever waits for another. A `OnceLock` would not do:
/// a process forked while one of its threads ran the initialisation keeps the lock "running"
/// forever, and the child's first kernel call would block (issue 15, point 13).
pub(crate) struct RaceByte(AtomicU8);

impl RaceByte {
    const UNSET: u8 = 0;

    pub(crate) const fn new() -> Self {
        Self(AtomicU8::new(Self::UNSET))
    }

    /// The cached value, or `init()` (which must never return 0) stored and returned.
    pub(crate) fn get_or_init(&self, init: impl FnOnce() -> u8) -> u8 {
        match self.0.load(Ordering::Relaxed) {
            Self::UNSET => {
                let value = init();
                debug_assert_ne!(value, Self::UNSET);
                self.0.store(value, Ordering::Relaxed);
                value
            }
            value => value,
        }
    }
}

/// The features of this CPU, detected once per process (or once per racing thread).
pub fn features() -> Features {
    const KNOWN: u8 = 1;
    const AVX512: u8 = 2;
    const FORCED_SCALAR: u8 = 4;
    const AVX2: u8 = 8;
    static FEATURES: RaceByte = RaceByte::new();
    let bits = FEATURES.get_or_init(|| {
        let f = detect();
        KNOWN
            | if f.avx512 { AVX512 } else { 0 }
            | if f.avx2 { AVX2 } else { 0 }
            | if f.forced_scalar { FORCED_SCALAR } else { 0 }
    });
    Features {
        avx512: bits & AVX512 != 0,
        avx2: bits & AVX2 != 0,
        forced_scalar: bits & FORCED_SCALAR != 0,
    }
}

/// Whether the AVX-512 kernels run (the CPU has them and they are not forced off).
#[inline]
pub fn avx512() -> bool {
    features().avx512
}

/// Whether the AVX2 kernels run (the CPU has them and they are not forced off).
#[inline]
pub fn avx2() -> bool {
    features().avx2
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A child forked while another thread is inside the initialisation gets its value at once
    /// (a `OnceLock` here blocks the child forever).
    #[test]
    fn a_child_forked_during_the_initialisation_never_waits() {
        static CELL: RaceByte = RaceByte::new();
        static ENTERED: AtomicU8 = AtomicU8::new(0);
        let slow = std::thread::spawn(|| {
            CELL.get_or_init(|| {
                ENTERED.store(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(500));
                7
            })
        });
        while ENTERED.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // SAFETY: the child only touches atomics and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let got = CELL.get_or_init(|| 9);
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(if got == 9 { 0 } else { 3 }) };
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child.
            let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if done == pid {
                break;
            }
            if Instant::now() > deadline {
                // SAFETY: kills our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                panic!("the forked child blocked in the initialisation");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status}"
        );
        assert_eq!(slow.join().unwrap(), 7);
        assert_eq!(CELL.get_or_init(|| 11), 7);
    }
}
