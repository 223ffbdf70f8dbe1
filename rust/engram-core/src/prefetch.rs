//! A background pool for gathers started ahead of use, and the tickets that report them.

use crate::error::{EngramError, Result};
use crate::pool::ProcessPool;
use std::sync::{Arc, Condvar, Mutex};

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
pub struct Ticket(Arc<State>);

impl Ticket {
    /// Whether the job has finished (successfully or not).
    pub fn done(&self) -> bool {
        self.0
            .result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Blocks until the job has finished and returns its outcome (each call returns it again).
    pub fn wait(&self) -> Result<()> {
        let mut guard = self.0.result.lock().unwrap_or_else(|e| e.into_inner());
        while guard.is_none() {
            guard = self.0.ready.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        guard.clone().expect("set above")
    }
}

/// Runs `job` on the prefetch pool; a panic inside it becomes an error at `wait()`.
pub fn spawn(job: impl FnOnce() -> Result<()> + Send + 'static) -> Ticket {
    let state = Arc::new(State::default());
    let ticket = Ticket(state.clone());
    POOL.get().spawn(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job))
            .unwrap_or_else(|p| Err(EngramError::from_panic(&*p)));
        *state.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        state.ready.notify_all();
    });
    ticket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_report_results_and_panics() {
        let ok = spawn(|| Ok(()));
        let err = spawn(|| Err(EngramError::Invalid("boom".into())));
        let panics = spawn(|| panic!("kaput"));
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
            })
            .collect();
        for (i, t) in many.iter().enumerate() {
            assert_eq!(t.wait().is_ok(), i % 2 == 0);
        }
    }
}
