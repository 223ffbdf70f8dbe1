//! The hot set's index: row id -> slot in the packed hot rows, in O(1) and about 0.19 bytes per
//! table row (a bit per row and a 32-bit rank per 64 rows), where a hash map would take tens of
//! bytes per hot row and a sorted list a binary search.

use crate::error::{EngramError, Result};

/// Which rows are hot, and where each sits among the packed hot rows (in row order).
pub(crate) struct HotIndex {
    /// Bit `r % 64` of word `r / 64`: row `r` is hot.
    bits: Vec<u64>,
    /// Hot rows before word `w`.
    rank: Vec<u32>,
}

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
        let words = rows.div_ceil(64);
        let mut bits = vec![0u64; words];
        for &r in hot {
            bits[(r / 64) as usize] |= 1 << (r % 64);
        }
        let mut rank = Vec::with_capacity(words);
        let mut seen = 0u32;
        for &w in &bits {
            rank.push(seen);
            seen += w.count_ones();
        }
        Ok(Self { bits, rank })
    }

    /// The slot of row `r` (`r` below the table's rows) among the hot rows, if it is hot.
    #[inline(always)]
    pub(crate) fn slot(&self, r: u64) -> Option<u64> {
        let w = (r / 64) as usize;
        let word = self.bits[w];
        let bit = 1u64 << (r % 64);
        (word & bit != 0).then(|| self.rank[w] as u64 + (word & (bit - 1)).count_ones() as u64)
    }

    /// Bytes the index takes.
    pub(crate) fn nbytes(&self) -> usize {
        self.bits.len() * 8 + self.rank.len() * 4
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
