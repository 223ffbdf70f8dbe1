//! Thread pools that survive `fork`. A forked child (a PyTorch DataLoader worker, a
//! multiprocessing pool) keeps only the thread that forked: every pool made before the fork has no
//! threads in it, and a job sent there would wait forever. Kernels therefore run through [`run`]
//! (the parent process uses rayon's global pool; a forked child builds its own on first use), and
//! background work goes to a [`ProcessPool`], which is rebuilt in each new process.

use crate::error::{EngramError, Result};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Threads wanted for the kernels' pools (0 = rayon's default: `RAYON_NUM_THREADS`, else one per
/// CPU).
static THREADS: AtomicUsize = AtomicUsize::new(0);
/// The process that built rayon's global pool (the first to run a kernel).
static GLOBAL_OWNER: OnceLock<u32> = OnceLock::new();
/// The kernels' pool of a forked child.
static CHILD: ProcessPool = ProcessPool::new("engram-kernel");

struct Entry {
    pid: u32,
    pool: rayon::ThreadPool,
}

/// A rayon pool that belongs to one process: the first use in another process (after a fork)
/// builds a new one there. Entries are never freed (a child cannot join the parent's threads),
/// which makes the returned references `'static`.
pub struct ProcessPool {
    slot: AtomicPtr<Entry>,
    name: &'static str,
}

impl ProcessPool {
    /// A pool whose threads are named `{name}-{i}`, built on first use.
    pub const fn new(name: &'static str) -> Self {
        Self {
            slot: AtomicPtr::new(std::ptr::null_mut()),
            name,
        }
    }

    /// This process's pool.
    pub fn get(&'static self) -> &'static rayon::ThreadPool {
        let pid = std::process::id();
        loop {
            let current = self.slot.load(Ordering::Acquire);
            if !current.is_null() {
                // SAFETY: a non-null slot points to an Entry leaked by `Box::into_raw` below and
                // never freed, so it is valid for 'static.
                let entry: &'static Entry = unsafe { &*current };
                if entry.pid == pid {
                    return &entry.pool;
                }
            }
            let name = self.name;
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(THREADS.load(Ordering::Relaxed))
                .thread_name(move |i| format!("{name}-{i}"))
                .build()
                .unwrap_or_else(|e| panic!("cannot start the {name} threads: {e}"));
            let fresh = Box::into_raw(Box::new(Entry { pid, pool }));
            match self
                .slot
                .compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                // The entry of the parent process, if any, is left as it is: its threads do not
                // exist here and its memory is never reused.
                // SAFETY: `fresh` came from `Box::into_raw` just above and is now the slot's
                // value, never freed.
                Ok(_) => return unsafe { &(*fresh).pool },
                Err(_) => {
                    // Another thread installed a pool first: ours was never shared, drop it.
                    // SAFETY: `fresh` came from `Box::into_raw` above and nobody else saw it.
                    drop(unsafe { Box::from_raw(fresh) });
                }
            }
        }
    }
}

fn global_owner() -> u32 {
    *GLOBAL_OWNER.get_or_init(|| {
        // Fails only if this library's rayon already built its global pool, in this process.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(THREADS.load(Ordering::Relaxed))
            .build_global();
        std::process::id()
    })
}

/// Runs a kernel: on rayon's global pool in the process that first ran one, on a pool of its own
/// in a forked child (where the global pool's threads do not exist).
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if std::process::id() == global_owner() {
        f()
    } else {
        CHILD.get().install(f)
    }
}

/// Sets the kernels' thread count (0 = one per CPU). Only before the first kernel runs, or to the
/// count the pool already has; returns the count in use.
pub fn set_threads(threads: usize) -> Result<usize> {
    if GLOBAL_OWNER.get().is_none() {
        THREADS.store(threads, Ordering::Relaxed);
    }
    let now = run(rayon::current_num_threads);
    if threads != 0 && threads != now {
        return Err(EngramError::Invalid(format!(
            "threads = {threads}: the kernels' thread pool already runs with {now} threads in this \
             process; set the thread count before the first hashing or gather call, or start \
             Python with RAYON_NUM_THREADS={threads}"
        )));
    }
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    static TEST_POOL: ProcessPool = ProcessPool::new("engram-test");

    #[test]
    fn a_process_pool_is_built_once_and_runs_work() {
        let a = TEST_POOL.get() as *const _;
        assert_eq!(a, TEST_POOL.get() as *const _);
        let sum: u64 = TEST_POOL
            .get()
            .install(|| (0..1000u64).into_par_iter().sum());
        assert_eq!(sum, 499_500);
        assert_eq!(run(|| (0..10u64).into_par_iter().sum::<u64>()), 45);
    }
}
