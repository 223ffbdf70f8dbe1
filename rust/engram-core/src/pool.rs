//! Thread pools that survive `fork`. A forked child (a PyTorch DataLoader worker, a
//! multiprocessing pool) keeps only the thread that forked: every pool made before the fork has no
//! threads in it, and a job sent there would wait forever. Kernels therefore run through [`run`]
//! (the parent process uses rayon's global pool; a forked child builds its own on first use), and
//! background work goes to a [`ProcessPool`], which is rebuilt in each new process.

use crate::error::{EngramError, Result};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// The most threads a pool may have: a larger count is an error at once (spawning a million
/// threads would take minutes before the OS refused them).
pub const MAX_THREADS: usize = 4096;

/// Threads wanted for the kernels' pools (0 = rayon's default: `RAYON_NUM_THREADS`, else one per
/// CPU).
static THREADS: AtomicUsize = AtomicUsize::new(0);
/// The process that built rayon's global pool (the first to run a kernel), or `None` when the
/// OS refused its threads: rayon never retries, so that process's kernels use [`CHILD`] too.
static GLOBAL_OWNER: OnceLock<Option<u32>> = OnceLock::new();
/// The kernels' pool of a forked child (or of a process whose global pool failed to start).
static CHILD: ProcessPool = ProcessPool::new("engram-kernel");
/// Forks this process has been through (its own copy, incremented in each child): state made
/// before a fork (a running job, a held lock) is known stale when this has changed.
static FORKS: AtomicU64 = AtomicU64::new(0);
static FORK_HANDLER: Once = Once::new();

extern "C" fn after_fork_in_child() {
    // Only an atomic add: async-signal-safe, as a pthread_atfork child handler must be.
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// The fork generation of this process: 0 in the process that loaded the library, one more in
/// each forked child. Installs the fork handler on first call (the extension calls it at import).
pub fn fork_generation() -> u64 {
    FORK_HANDLER.call_once(|| {
        // SAFETY: registers a handler that only increments an atomic; no other state.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
    FORKS.load(Ordering::Relaxed)
}

/// The thread count a pool gets: the one set, else `RAYON_NUM_THREADS`, else 0 (one per CPU);
/// counts over [`MAX_THREADS`] are an error.
fn wanted_threads() -> Result<usize> {
    let set = THREADS.load(Ordering::Relaxed);
    if set != 0 {
        return Ok(set);
    }
    match std::env::var("RAYON_NUM_THREADS").map(|v| v.trim().parse::<u64>()) {
        Ok(Ok(n)) if n > MAX_THREADS as u64 => Err(EngramError::Invalid(format!(
            "RAYON_NUM_THREADS = {n} is more threads than engram_rs runs (at most \
             {MAX_THREADS}): set it to 0 (one per CPU) or a smaller count"
        ))),
        Ok(Ok(n)) => Ok(n as usize),
        _ => Ok(0),
    }
}

/// The error of a pool whose threads the OS refused.
fn refused(name: &str, threads: usize, err: &dyn std::fmt::Display) -> EngramError {
    let count = if threads == 0 {
        "one per CPU".to_string()
    } else {
        threads.to_string()
    };
    EngramError::Threads(format!(
        "cannot start the {name} threads ({count}): {err}: the process or user is at its \
         thread limit (ulimit -u / RLIMIT_NPROC, a container's pids.max) or out of memory; \
         lower the thread count (engram_rs set_num_threads, --threads, RAYON_NUM_THREADS) or \
         raise the limit, then try again"
    ))
}

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
    /// Its own thread count (0: the kernels' count).
    threads: usize,
}

impl ProcessPool {
    /// A pool whose threads are named `{name}-{i}`, built on first use.
    pub const fn new(name: &'static str) -> Self {
        Self::with_threads(name, 0)
    }

    /// A pool of its own `threads` (0: the kernels' count), for work that waits rather than
    /// computes (reads in flight).
    pub const fn with_threads(name: &'static str, threads: usize) -> Self {
        Self {
            slot: AtomicPtr::new(std::ptr::null_mut()),
            name,
            threads,
        }
    }

    /// Whether this process has built its pool.
    fn built_here(&self) -> bool {
        let current = self.slot.load(Ordering::Acquire);
        // SAFETY: as in `get`: a non-null slot is a leaked Entry, valid for 'static.
        !current.is_null() && unsafe { &*current }.pid == std::process::id()
    }

    /// This process's pool; an error (never a panic) when the OS refuses its threads, and the
    /// next call tries again.
    pub fn get(&'static self) -> Result<&'static rayon::ThreadPool> {
        let pid = std::process::id();
        loop {
            let current = self.slot.load(Ordering::Acquire);
            if !current.is_null() {
                // SAFETY: a non-null slot points to an Entry leaked by `Box::into_raw` below and
                // never freed, so it is valid for 'static.
                let entry: &'static Entry = unsafe { &*current };
                if entry.pid == pid {
                    return Ok(&entry.pool);
                }
            }
            let name = self.name;
            let threads = match self.threads {
                0 => wanted_threads()?,
                n => n,
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("{name}-{i}"))
                .build()
                .map_err(|e| refused(name, threads, &e))?;
            let fresh = Box::into_raw(Box::new(Entry { pid, pool }));
            match self
                .slot
                .compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                // The entry of the parent process, if any, is left as it is: its threads do not
                // exist here and its memory is never reused.
                // SAFETY: `fresh` came from `Box::into_raw` just above and is now the slot's
                // value, never freed.
                Ok(_) => return Ok(unsafe { &(*fresh).pool }),
                Err(_) => {
                    // Another thread installed a pool first: ours was never shared, drop it.
                    // SAFETY: `fresh` came from `Box::into_raw` above and nobody else saw it.
                    drop(unsafe { Box::from_raw(fresh) });
                }
            }
        }
    }
}

/// Whether this process was forked from the one that loaded the library.
fn forked() -> bool {
    fork_generation() != 0
}

/// The process whose rayon global pool runs the kernels (`None`: it could not start).
fn global_owner() -> Result<Option<u32>> {
    if let Some(owner) = GLOBAL_OWNER.get() {
        return Ok(*owner);
    }
    let threads = wanted_threads()?;
    Ok(*GLOBAL_OWNER.get_or_init(|| {
        match rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
        {
            Ok(()) => Some(std::process::id()),
            // An I/O error: the OS refused the threads, and rayon will never build its global
            // pool in this process. Without a source: it was already built, which is fine.
            Err(e) if std::error::Error::source(&e).is_some() => None,
            Err(_) => Some(std::process::id()),
        }
    }))
}

/// Runs a kernel: on rayon's global pool in the process that first ran one, on a pool of its own
/// in a forked child (where the global pool's threads do not exist). An error when the OS
/// refuses the pool's threads.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> Result<R> {
    // A forked child never touches rayon's global pool nor `GLOBAL_OWNER`: a thread of the parent
    // may have been building either at the fork, and their `Once` would block here forever.
    if !forked() && global_owner()? == Some(std::process::id()) {
        Ok(f())
    } else {
        Ok(CHILD.get()?.install(f))
    }
}

/// Sets the kernels' thread count (0 = one per CPU, at most [`MAX_THREADS`]). Only before the
/// first kernel runs, or to the count the pool already has; returns the count in use.
pub fn set_threads(threads: usize) -> Result<usize> {
    if threads > MAX_THREADS {
        return Err(EngramError::Invalid(format!(
            "threads = {threads} is more than engram_rs runs (at most {MAX_THREADS}, this \
             machine has {} CPUs): pass 0 for one thread per CPU, or a smaller count",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        )));
    }
    // Until a pool runs the kernels here (none did, or the OS refused their threads), the
    // count can still change.
    let fixed = match GLOBAL_OWNER.get() {
        _ if forked() => CHILD.built_here(),
        None => false,
        Some(Some(pid)) if *pid == std::process::id() => true,
        Some(_) => CHILD.built_here(),
    };
    if !fixed {
        THREADS.store(threads, Ordering::Relaxed);
    }
    let now = run(rayon::current_num_threads)?;
    if threads != 0 && threads != now {
        return Err(EngramError::Invalid(format!(
            "threads = {threads}: the kernels' thread pool already runs with {now} threads in this \
             process; set the thread count before the first hashing or gather call, or start \
             the process with RAYON_NUM_THREADS={threads}"
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
        let a = TEST_POOL.get().unwrap() as *const _;
        assert_eq!(a, TEST_POOL.get().unwrap() as *const _);
        let sum: u64 = TEST_POOL
            .get()
            .unwrap()
            .install(|| (0..1000u64).into_par_iter().sum());
        assert_eq!(sum, 499_500);
        assert_eq!(run(|| (0..10u64).into_par_iter().sum::<u64>()).unwrap(), 45);
    }

    #[test]
    fn huge_thread_counts_are_refused_at_once() {
        let err = set_threads(1_000_000).unwrap_err().to_string();
        assert!(
            err.contains("threads = 1000000 is more than engram_rs runs"),
            "{err}"
        );
        assert!(fork_generation() == fork_generation());
    }
}
