//! A background pool for gathers started ahead of use, and the tickets that report them.

use crate::dtype::DType;
use crate::elem::Backend;
use crate::error::{EngramError, Result};
use crate::gather::gather;
use crate::pool::{fork_generation, ProcessPool};
use crate::table::Lease;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};

/// The library's own pool: prefetches never queue behind the caller's rayon work (rebuilt in a
/// forked child, where the parent's threads do not exist).
static POOL: ProcessPool = ProcessPool::new("engram-prefetch");

#[derive(Default)]
struct State {
    result: Mutex<Option<Result<()>>>,
    ready: Condvar,
}

/// The handle of one background job; cloning it shares the job.
#[derive(Clone)]
pub struct Ticket {
    state: Arc<State>,
    /// The fork generation the job was started in: in a child forked since, the job's thread
    /// does not exist, and a job not finished at the fork never will be.
    generation: u64,
}

impl Ticket {
    /// The job's result slot; `None` in a forked child when the job's thread held the lock at
    /// the fork (it never releases it here).
    fn slot(&self) -> Option<MutexGuard<'_, Option<Result<()>>>> {
        if self.generation == fork_generation() {
            return Some(self.state.result.lock().unwrap_or_else(|e| e.into_inner()));
        }
        match self.state.result.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Whether the job has finished (successfully or not).
    pub fn done(&self) -> bool {
        self.slot().is_some_and(|g| g.is_some())
    }

    /// Blocks until the job has finished and returns its outcome (each call returns it again).
    /// In a process forked while the job ran, an error at once: it never finishes there.
    pub fn wait(&self) -> Result<()> {
        if self.generation != fork_generation() {
            return match self.slot().and_then(|g| g.clone()) {
                Some(outcome) => outcome,
                None => Err(EngramError::Threads(
                    "this prefetch was still running when the process forked: it runs in the \
                     parent process, so its rows never arrive in this child; gather the \
                     rows (or prefetch them again) here"
                        .into(),
                )),
            };
        }
        let mut guard = self.state.result.lock().unwrap_or_else(|e| e.into_inner());
        while guard.is_none() {
            guard = self
                .state
                .ready
                .wait(guard)
                .unwrap_or_else(|e| e.into_inner());
        }
        guard.clone().expect("set above")
    }
}

/// Runs `job` on the prefetch pool; a panic inside it becomes an error at `wait()`. An error
/// (and `job` dropped unrun) when the OS refuses the pool's threads.
pub fn spawn(job: impl FnOnce() -> Result<()> + Send + 'static) -> Result<Ticket> {
    let pool = POOL.get()?;
    let state = Arc::new(State::default());
    let ticket = Ticket {
        state: state.clone(),
        generation: fork_generation(),
    };
    pool.spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
            .unwrap_or_else(|p| Err(EngramError::from_panic(&*p)));
        *state.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        state.ready.notify_all();
    });
    Ok(ticket)
}

/// Starts a gather of rows `idx` of the leased table into `out` (`len` bytes of `out_dtype`
/// values) on the prefetch pool; the lease keeps the table open until the job ends.
///
/// # Safety
/// `out` must stay valid for writes of `len` bytes, and be neither read nor written by anyone
/// else, until the job has ended (`Ticket::wait` returned or `Ticket::done` is true); it must
/// not overlap the table or `idx` (see `gather::check_separate`).
pub unsafe fn gather_ahead(
    lease: Lease,
    idx: Vec<i64>,
    out: *mut u8,
    len: usize,
    out_dtype: DType,
) -> Result<Ticket> {
    let addr = out as usize;
    spawn(move || {
        // SAFETY: the caller keeps `out` valid and unshared until the job ends.
        let out = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
        gather(&lease.read(), &idx, out, out_dtype, Backend::Auto)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_report_results_and_panics() {
        let ok = spawn(|| Ok(())).unwrap();
        let err = spawn(|| Err(EngramError::Invalid("boom".into()))).unwrap();
        let panics = spawn(|| panic!("kaput")).unwrap();
        assert!(ok.wait().is_ok());
        assert!(ok.done());
        assert_eq!(err.wait().unwrap_err().to_string(), "boom");
        assert!(panics.wait().unwrap_err().to_string().contains("kaput"));
        let many: Vec<Ticket> = (0..100)
            .map(|i| {
                spawn(move || {
                    if i % 2 == 0 {
                        Ok(())
                    } else {
                        Err(EngramError::Invalid(i.to_string()))
                    }
                })
                .unwrap()
            })
            .collect();
        for (i, t) in many.iter().enumerate() {
            assert_eq!(t.wait().is_ok(), i % 2 == 0);
        }
    }
}
