//! A table shared by its handle and the operations in flight on it (gathers, prefetches, writes,
//! flushes, optimizer steps), and the rules that keep that sharing safe.
//!
//! - Every operation holds a [`Lease`]; [`SharedTable::close`] takes the table out and waits on
//!   a condition variable until the leases in flight end, then drops the table (its map and
//!   file lock) on the closing thread. A lease asked for after `close` is a closed-table error.
//! - The handle keeps an owner of external memory (the arrays a `from_raw` table points into):
//!   `close` hands it back only once no lease can read that memory, so the caller decides on
//!   which thread it goes. The Python binding keeps Python objects there and drops them with
//!   the GIL held: the last reference to a Python object must never go on a worker thread.
//! - Fork: a lease in flight when the process forked never ends in the child (its thread does
//!   not exist there, and may hold the table's lock). In the child, a new lease is refused with
//!   [`FORKED_BUSY`] instead of blocking, and `close` lets go without waiting (the table and
//!   the owner are leaked, never freed under an operation that may still seem to run).

use super::HostTable;
use crate::error::{EngramError, Result};
use crate::pool::fork_generation;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError,
};

/// Why a table cannot be used in a child forked while an operation ran on it.
pub const FORKED_BUSY: &str = "this HostTable was in use by another thread (a gather, prefetch, \
    write_rows, flush or optimizer step) when the process forked: that thread does not exist in \
    this child, so the table's lock and memory are never released here; open the table again in \
    the child (writable only once the parent has closed it), or fork only \
    while no table call runs";

/// The message of an operation on a closed table.
pub const CLOSED: &str = "this HostTable is closed";

/// Whether the table is open and how many leases are in flight.
struct Gate {
    open: bool,
    leases: usize,
}

/// What the handle and every lease share.
struct State {
    /// `None` once closed (taken out when the last lease had ended).
    table: RwLock<Option<HostTable>>,
    gate: Mutex<Gate>,
    /// Notified when the last lease ends.
    ended: Condvar,
    /// The fork generation in which the table was last known free of leases taken in another
    /// process: while it is the current one, `gate` is only ever held by live threads.
    generation: AtomicU64,
}

impl State {
    /// The gate; `None` in a forked child when a thread of the parent held it at the fork (it
    /// never lets go here).
    fn gate(&self) -> Option<MutexGuard<'_, Gate>> {
        if self.generation.load(Ordering::Acquire) == fork_generation() {
            return Some(self.gate.lock().unwrap_or_else(|e| e.into_inner()));
        }
        match self.gate.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// A host table shared by operations that may run on other threads, with the owner `O` of
/// the external memory it uses (`()` for a file-backed table).
pub struct SharedTable<O = ()> {
    state: Arc<State>,
    /// Taken (and handed back) by `close`, never touched by a lease.
    owner: Mutex<Option<O>>,
}

impl<O> SharedTable<O> {
    /// Shares `table`; `owner` keeps the memory of a `from_raw` table alive until `close`.
    pub fn new(table: HostTable, owner: O) -> Self {
        Self {
            state: Arc::new(State {
                table: RwLock::new(Some(table)),
                gate: Mutex::new(Gate {
                    open: true,
                    leases: 0,
                }),
                ended: Condvar::new(),
                generation: AtomicU64::new(fork_generation()),
            }),
            owner: Mutex::new(Some(owner)),
        }
    }

    /// A lease for one operation: the table stays open until it is dropped. A closed-table
    /// error (`Invalid`) after `close`; in a child forked while an operation ran on the table,
    /// a [`FORKED_BUSY`] error (`Threads`) instead of a lease that could block.
    pub fn lease(&self) -> Result<Lease> {
        let busy = || EngramError::Threads(FORKED_BUSY.into());
        let mut gate = self.state.gate().ok_or_else(busy)?;
        if !gate.open {
            return Err(EngramError::Invalid(CLOSED.into()));
        }
        let now = fork_generation();
        if self.state.generation.load(Ordering::Acquire) != now {
            if gate.leases > 0 {
                return Err(busy());
            }
            self.state.generation.store(now, Ordering::Release);
        }
        gate.leases += 1;
        Ok(Lease {
            state: self.state.clone(),
        })
    }

    /// Whether `close` has run.
    pub fn is_closed(&self) -> bool {
        self.state.gate().is_none_or(|g| !g.open)
    }

    /// Closes the table: no new lease is granted, the leases in flight are waited for (on a
    /// condition variable), then the table is dropped here and the owner handed back for the
    /// caller to drop (on a thread where that is allowed). `None` when already closed, or in a
    /// child forked while a lease was in flight: there the table and the owner are leaked, as
    /// that lease never ends.
    pub fn close(&self) -> Option<O> {
        let owner = self.owner.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut gate) = self.state.gate() else {
            std::mem::forget(owner);
            return None;
        };
        if !gate.open {
            return owner;
        }
        gate.open = false;
        if self.state.generation.load(Ordering::Acquire) != fork_generation() && gate.leases > 0 {
            std::mem::forget(owner);
            return None;
        }
        while gate.leases > 0 {
            gate = self
                .state
                .ended
                .wait(gate)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(gate);
        // No lease is left and none can be granted: the write lock is free.
        let table = self
            .state
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(table);
        owner
    }
}

impl<O> Drop for SharedTable<O> {
    /// Closes the table (waiting for the leases in flight) and drops the owner here: an owner
    /// that must go on a particular thread is taken out with `close` first.
    fn drop(&mut self) {
        drop(self.close());
    }
}

/// One operation's hold on an open table (`Send + 'static`: a background job can keep it).
pub struct Lease {
    state: Arc<State>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // In a forked child whose gate a parent thread held at the fork, the table stays busy.
        if let Some(mut gate) = self.state.gate() {
            gate.leases -= 1;
            if gate.leases == 0 {
                self.state.ended.notify_all();
            }
        }
    }
}

/// A read lock on a leased table.
pub struct TableRead<'a>(RwLockReadGuard<'a, Option<HostTable>>);

/// A write lock on a leased table.
pub struct TableWrite<'a>(RwLockWriteGuard<'a, Option<HostTable>>);

impl std::ops::Deref for TableRead<'_> {
    type Target = HostTable;
    fn deref(&self) -> &HostTable {
        self.0.as_ref().expect("a leased table is open")
    }
}

impl std::ops::Deref for TableWrite<'_> {
    type Target = HostTable;
    fn deref(&self) -> &HostTable {
        self.0.as_ref().expect("a leased table is open")
    }
}

impl std::ops::DerefMut for TableWrite<'_> {
    fn deref_mut(&mut self) -> &mut HostTable {
        self.0.as_mut().expect("a leased table is open")
    }
}

impl Lease {
    /// The table for reading; a lock poisoned by a panic elsewhere is read through.
    pub fn read(&self) -> TableRead<'_> {
        TableRead(self.state.table.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The table for writing (rows, optimizer steps).
    pub fn write(&self) -> TableWrite<'_> {
        TableWrite(self.state.table.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether both leases are of the same table.
    pub fn same_table(&self, other: &Lease) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// Write locks on `leases`, returned in their order but taken in the order of the tables'
    /// addresses, so that two calls over the same tables in different orders (other threads)
    /// cannot deadlock. The leases must be of distinct tables (a table locked twice would).
    pub fn write_all<'a>(leases: &[&'a Lease]) -> Vec<TableWrite<'a>> {
        let mut order: Vec<usize> = (0..leases.len()).collect();
        order.sort_by_key(|&i| Arc::as_ptr(&leases[i].state) as usize);
        let mut guards: Vec<Option<TableWrite<'a>>> = leases.iter().map(|_| None).collect();
        for i in order {
            guards[i] = Some(leases[i].write());
        }
        guards.into_iter().flatten().collect()
    }

    /// Overwrites rows `idx` from the bytes at `values` and `scales` (pointer, length), which
    /// may be memory the table itself uses (a view of the array a `from_raw` table wraps): such
    /// sources are copied first, before any slice of them is made.
    ///
    /// # Safety
    /// Each range must be readable for its length (a dangling pointer with length 0 is fine)
    /// and not written by anyone else during the call.
    pub unsafe fn write_rows_from(
        &self,
        idx: &[i64],
        values: (*const u8, usize),
        scales: (*const u8, usize),
    ) -> Result<()> {
        let copy = |(ptr, len): (*const u8, usize)| -> Result<Vec<u8>> {
            // SAFETY: the caller guarantees `len` readable bytes at `ptr`; nothing writes the
            // table while the read guard below is held.
            copied(
                unsafe { std::slice::from_raw_parts(ptr, len) },
                OVERLAP_WHAT,
                OVERLAP_HINT,
            )
        };
        let owned = {
            let t = self.read();
            if t.overlaps(values.0, values.1) || t.overlaps(scales.0, scales.1) {
                Some((copy(values)?, copy(scales)?))
            } else {
                None
            }
        };
        // SAFETY: as above; the ranges do not overlap the table (else they were copied), so the
        // write below never changes what the slices hold.
        let (v, s) = unsafe {
            (
                std::slice::from_raw_parts(values.0, values.1),
                std::slice::from_raw_parts(scales.0, scales.1),
            )
        };
        let (v, s) = match &owned {
            Some((v, s)) => (v.as_slice(), s.as_slice()),
            None => (v, s),
        };
        self.write().write_rows(idx, v, s)
    }
}

const OVERLAP_WHAT: &str = "a copy of rows that overlap the table";
const OVERLAP_HINT: &str = "write fewer rows at a time";

/// A copy of `src`, or an `OutOfMemory` error naming `what` and the `hint`.
pub fn copied<T: Copy>(src: &[T], what: &str, hint: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(src.len())
        .map_err(|_| EngramError::OutOfMemory {
            bytes: std::mem::size_of_val(src),
            what: what.into(),
            hint: hint.into(),
        })?;
    v.extend_from_slice(src);
    Ok(v)
}

/// `src`, or a copy of it (an `OutOfMemory` error naming `what` and the `hint` when refused)
/// when it shares memory with one of `tables`, which an operation would write while reading it.
pub fn apart_from<'s, T: Copy>(
    src: &'s [T],
    tables: &[&Lease],
    what: &str,
    hint: &str,
) -> Result<Cow<'s, [T]>> {
    let (ptr, len) = (src.as_ptr().cast::<u8>(), std::mem::size_of_val(src));
    if tables.iter().any(|t| t.read().overlaps(ptr, len)) {
        Ok(Cow::Owned(copied(src, what, hint)?))
    } else {
        Ok(Cow::Borrowed(src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use std::sync::mpsc;

    fn table(rows: usize) -> (Vec<f32>, HostTable) {
        let mut mem = vec![0f32; rows * 4];
        // SAFETY: `mem` holds rows x 4 f32 and outlives the table in each test (leaked below
        // where it must outlive a thread).
        let t = unsafe {
            HostTable::from_raw(
                mem.as_mut_ptr().cast(),
                std::ptr::null_mut(),
                rows,
                4,
                DType::F32,
                true,
            )
        }
        .unwrap();
        (mem, t)
    }

    #[test]
    fn close_waits_for_a_lease_in_flight_and_returns_after_it_ends() {
        let (mem, t) = table(8);
        let shared = Arc::new(SharedTable::new(t, mem));
        let lease = shared.lease().unwrap();
        let (closed_tx, closed_rx) = mpsc::channel();
        let closer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let owner = shared.close();
                closed_tx.send(owner.map(|m| m.len())).unwrap();
            })
        };
        // The closer waits for the lease: nothing arrives while it is held.
        while !shared.is_closed() {
            std::thread::yield_now();
        }
        assert!(closed_rx.try_recv().is_err());
        assert_eq!(lease.read().rows, 8);
        drop(lease);
        assert_eq!(closed_rx.recv().unwrap(), Some(32));
        closer.join().unwrap();
        assert_eq!(shared.close(), None);
    }

    #[test]
    fn a_lease_after_close_is_the_closed_error() {
        let (mem, t) = table(2);
        let shared = SharedTable::new(t, ());
        assert_eq!(shared.lease().unwrap().read().dim, 4);
        assert_eq!(shared.close(), Some(()));
        let err = shared.lease().err().unwrap();
        assert_eq!(err, EngramError::Invalid(CLOSED.into()));
        drop(mem);
    }

    #[test]
    fn write_locks_are_taken_in_address_order_and_handed_back_in_call_order() {
        let (m1, t1) = table(1);
        let (m2, t2) = table(2);
        let (a, b) = (SharedTable::new(t1, m1), SharedTable::new(t2, m2));
        let (la, lb) = (a.lease().unwrap(), b.lease().unwrap());
        assert!(!la.same_table(&lb));
        assert!(la.same_table(&a.lease().unwrap()));
        for (order, rows) in [([&la, &lb], [1, 2]), ([&lb, &la], [2, 1])] {
            let guards = Lease::write_all(&order);
            assert_eq!(guards.iter().map(|g| g.rows).collect::<Vec<_>>(), rows);
        }
    }

    #[test]
    fn sources_inside_the_table_are_copied_before_the_write() {
        let (mut mem, t) = table(2);
        mem[..4].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        let ptr = mem.as_ptr().cast::<u8>();
        let shared = SharedTable::new(t, mem);
        let lease = shared.lease().unwrap();
        let none = std::ptr::NonNull::<u8>::dangling().as_ptr() as *const u8;
        // SAFETY: row 0 of the table (16 bytes) is readable; nothing else writes it.
        unsafe { lease.write_rows_from(&[1], (ptr, 16), (none, 0)) }.unwrap();
        let t = lease.read();
        assert_eq!(t.raw_rows(1, 1).unwrap().0, t.raw_rows(0, 1).unwrap().0);
        drop(t);
        let v = [0i64; 3];
        assert!(matches!(
            apart_from(&v, &[&lease], "w", "h").unwrap(),
            Cow::Borrowed(_)
        ));
    }

    /// A child forked while a lease is held by another thread refuses new leases (and closes
    /// without waiting) instead of blocking.
    #[test]
    fn a_child_forked_during_a_lease_reports_busy() {
        let (mem, t) = table(2);
        let shared = Arc::new(SharedTable::new(t, mem));
        let (held_tx, held_rx) = mpsc::channel();
        let (end_tx, end_rx) = mpsc::channel::<()>();
        let holder = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let lease = shared.lease().unwrap();
                let _write = lease.write();
                held_tx.send(()).unwrap();
                end_rx.recv().unwrap();
            })
        };
        held_rx.recv().unwrap();
        // SAFETY: the child only uses the table's atomics and mutexes (never blocking, which is
        // the point of the test) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let busy = matches!(shared.lease(), Err(EngramError::Threads(m)) if m == FORKED_BUSY);
            let closed = shared.close().is_none();
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(if busy && closed { 0 } else { 3 }) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                break;
            }
            if std::time::Instant::now() > deadline {
                // SAFETY: kills our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                panic!("the forked child blocked on the table");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status}"
        );
        end_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(shared.close().is_some());
    }
}
