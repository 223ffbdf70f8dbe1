//! Aligned output buffers and the pool that recycles them.
//!
//! Fresh multi-megabyte allocations are page-faulted and zeroed by the kernel on first touch,
//! which costs as much as the hashing itself. Buffers handed out by [`BufferPool::take`] are
//! 64-byte aligned (so kernels may use streaming stores), advised for transparent huge pages when
//! large, and come back to the pool when their owner drops them, already faulted in.

use crate::error::{EngramError, Result};
use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{LazyLock, Mutex};

const ALIGN: usize = 64;
const HUGE_PAGE: usize = 2 << 20;
/// Buffers smaller than this are not worth pooling (malloc recycles them well).
const MIN_POOLED: usize = 1 << 20;

/// An uninitialised, 64-byte aligned allocation of `len` bytes.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation, like `Box<[u8]>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only expose the pointer value; writes need `&mut`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes (at least one), huge-page aligned and advised when large.
    ///
    /// A size beyond `isize::MAX` or an allocation the system refuses is an
    /// [`EngramError::OutOfMemory`] (Python's `MemoryError`), never an abort.
    pub fn new(len: usize) -> Result<Self> {
        let align = if len >= HUGE_PAGE { HUGE_PAGE } else { ALIGN };
        let oom = |hint: &str| EngramError::OutOfMemory {
            bytes: len,
            what: "a 64-byte aligned buffer".into(),
            hint: hint.into(),
        };
        // `Layout` refuses sizes that, rounded up to `align`, exceed isize::MAX.
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|_| oom("the size exceeds the largest possible allocation (isize::MAX)"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            return Err(oom(
                "the system refused the allocation: free memory or process smaller batches",
            ));
        };
        #[cfg(target_os = "linux")]
        if align == HUGE_PAGE {
            // SAFETY: the range is our own fresh allocation; madvise is only a hint.
            unsafe {
                libc::madvise(ptr.as_ptr().cast(), layout.size(), libc::MADV_HUGEPAGE);
            }
        }
        Ok(Self { ptr, layout })
    }

    /// Capacity in bytes (at least one).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A bounded pool of large buffers, shared by every call of the process.
pub struct BufferPool {
    free: Mutex<Vec<AlignedBuf>>,
    limit: usize,
}

/// The pool behind hashing (and gather) outputs: keeps at most 1 GiB of idle buffers.
pub static OUTPUT_POOL: LazyLock<BufferPool> = LazyLock::new(|| BufferPool::new(1 << 30));

impl BufferPool {
    pub const fn new(limit: usize) -> Self {
        Self {
            free: Mutex::new(Vec::new()),
            limit,
        }
    }

    /// A buffer of at least `len` bytes: a pooled one no more than twice as large, or a new one
    /// (an [`EngramError::OutOfMemory`] when it cannot be allocated).
    pub fn take(&self, len: usize) -> Result<AlignedBuf> {
        if len >= MIN_POOLED {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = (0..free.len())
                .filter(|&i| (len..=len.saturating_mul(2)).contains(&free[i].capacity()))
                .min_by_key(|&i| free[i].capacity());
            if let Some(i) = best {
                return Ok(free.swap_remove(i));
            }
        }
        if len > 0 && self.idle_bytes() > 0 {
            // Before failing, give the idle buffers back to the system and try once more.
            if let Ok(buf) = AlignedBuf::new(len) {
                return Ok(buf);
            }
            self.clear();
        }
        AlignedBuf::new(len)
    }

    /// Returns a buffer for reuse; the oldest idle buffers are freed beyond the pool's limit.
    pub fn give(&self, buf: AlignedBuf) {
        if buf.capacity() < MIN_POOLED || buf.capacity() > self.limit {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(buf);
        let mut held: usize = free.iter().map(AlignedBuf::capacity).sum();
        while held > self.limit {
            held -= free.remove(0).capacity();
        }
    }

    /// Bytes held by idle buffers.
    pub fn idle_bytes(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.iter().map(AlignedBuf::capacity).sum()
    }

    /// Frees every idle buffer.
    pub fn clear(&self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_recycled_within_limits() {
        let pool = BufferPool::new(8 << 20);
        let a = pool.take(3 << 20).unwrap();
        assert_eq!(a.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(AlignedBuf::new(100).unwrap().as_ptr() as usize % ALIGN, 0);
        let addr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.idle_bytes(), 3 << 20);
        // Too small a request for this buffer (it would waste more than half): a new one.
        let small = pool.take(1 << 20).unwrap();
        assert_ne!(small.as_ptr(), addr);
        let again = pool.take(2 << 20).unwrap();
        assert_eq!(
            again.as_ptr(),
            addr,
            "a buffer up to twice the request is reused"
        );
        pool.give(again);
        pool.give(pool.take(5 << 20).unwrap());
        pool.give(pool.take(4 << 20).unwrap());
        assert!(pool.idle_bytes() <= 8 << 20);
        pool.give(AlignedBuf::new(1000).unwrap());
        assert!(pool.idle_bytes() <= 8 << 20);
        pool.clear();
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn impossible_sizes_are_out_of_memory_errors_not_aborts() {
        for len in [
            usize::MAX,
            isize::MAX as usize,
            isize::MAX as usize + 1,
            1 << 62,
        ] {
            match AlignedBuf::new(len) {
                Err(EngramError::OutOfMemory { bytes, what, hint }) => {
                    assert_eq!(bytes, len);
                    assert!(what.contains("buffer"), "{what}");
                    assert!(!hint.is_empty());
                }
                Err(other) => panic!("{len}: wrong error {other:?}"),
                Ok(_) => panic!("{len} bytes were allocated"),
            }
            let pool = BufferPool::new(8 << 20);
            pool.give(AlignedBuf::new(2 << 20).unwrap());
            assert!(matches!(
                pool.take(len),
                Err(EngramError::OutOfMemory { .. })
            ));
            assert_eq!(
                pool.idle_bytes(),
                0,
                "idle buffers are freed before giving up"
            );
        }
    }
}
