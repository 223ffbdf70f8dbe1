//! The hot set's index: row id -> slot in the packed hot rows, in O(1) and about 0.19 bytes per
//! table row (a bit per row and a 32-bit rank per 64 rows), where a hash map would take tens of
//! bytes per hot row and a sorted list a binary search.

use crate::buffer::AlignedBuf;
use crate::error::{EngramError, Result};

/// Which rows are hot, and where each sits among the packed hot rows (in row order).
pub(crate) struct HotIndex {
    /// Per 64 rows: the bits of the hot ones (bit `r % 64`), and the hot rows before them: one
    /// 16-byte entry, so a lookup misses on one cache line. In huge pages: every gathered id
    /// looks one up at random, and 4 KiB pages would make most of those a TLB miss too.
    buf: AlignedBuf,
    len: usize,
}

// SAFETY: the index owns its buffer, written only while it is built (`new`), then read.
unsafe impl Send for HotIndex {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for HotIndex {}

impl HotIndex {
    /// The index of `hot` (strictly increasing row ids below `rows`: checked by the caller).
    pub(crate) fn new(rows: usize, hot: &[u64]) -> Result<Self> {
        if hot.len() > u32::MAX as usize {
            return Err(EngramError::Invalid(format!(
                "{} hot rows: a tiered table holds at most {} in memory",
                hot.len(),
                u32::MAX
            )));
        }
        let len = rows.div_ceil(64);
        let buf = AlignedBuf::new(len * 16)?;
        // SAFETY: the buffer holds `len` entries of 16 bytes, 64-byte aligned (an entry's
        // alignment is 8); written here before anything reads them.
        let words = unsafe {
            std::ptr::write_bytes(buf.as_ptr(), 0, len * 16);
            std::slice::from_raw_parts_mut(buf.as_ptr().cast::<[u64; 2]>(), len)
        };
        for &r in hot {
            words[(r / 64) as usize][0] |= 1 << (r % 64);
        }
        let mut seen = 0u64;
        for w in words.iter_mut() {
            w[1] = seen;
            seen += u64::from(w[0].count_ones());
        }
        Ok(Self { buf, len })
    }

    /// The entries.
    #[inline(always)]
    fn words(&self) -> &[[u64; 2]] {
        // SAFETY: `len` entries, initialised in `new`, only read since.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<[u64; 2]>(), self.len) }
    }

    /// The slot of row `r` (`r` below the table's rows) among the hot rows, if it is hot.
    #[inline(always)]
    pub(crate) fn slot(&self, r: u64) -> Option<u64> {
        let [word, rank] = self.words()[(r / 64) as usize];
        let bit = 1u64 << (r % 64);
        (word & bit != 0).then(|| rank + u64::from((word & (bit - 1)).count_ones()))
    }

    /// Prefetches the entry of row `r` (any value: the address wraps, a prefetch never faults).
    #[inline(always)]
    pub(crate) fn prefetch(&self, r: u64) {
        let p = self.buf.as_ptr().wrapping_add((r / 64) as usize * 16) as *const u8;
        crate::cpu::prefetch_line(p);
    }

    /// Calls `f(row, slot)` for every hot row, in row order.
    pub(crate) fn for_each_hot(&self, mut f: impl FnMut(u64, usize)) {
        for (k, &[word, rank]) in self.words().iter().enumerate() {
            let (mut bits, mut slot) = (word, rank as usize);
            while bits != 0 {
                f(k as u64 * 64 + u64::from(bits.trailing_zeros()), slot);
                bits &= bits - 1;
                slot += 1;
            }
        }
    }

    /// Bytes the index takes.
    pub(crate) fn nbytes(&self) -> usize {
        self.len * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_ranks_among_the_hot_rows() {
        let hot = [0u64, 5, 63, 64, 65, 200, 999];
        let index = HotIndex::new(1000, &hot).unwrap();
        for r in 0..1000u64 {
            assert_eq!(
                index.slot(r),
                hot.iter().position(|&h| h == r).map(|p| p as u64)
            );
        }
        assert!(HotIndex::new(10, &[]).unwrap().slot(9).is_none());
    }
}
