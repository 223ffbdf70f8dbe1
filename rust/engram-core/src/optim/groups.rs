//! Grouping of a step's ids: the positions of each unique row (radix sort, or a comparison
//! sort as the fallback).

use super::*;

/// The lookups grouped by row: `order` holds the positions sorted by (row, position), `starts`
/// where each row's run begins in `order` (and `order.len()` at the end), `rows` each run's row
/// (increasing).
pub(super) struct Groups {
    pub(super) order: Vec<u32>,
    pub(super) starts: Vec<u32>,
    pub(super) rows: Vec<u64>,
}

impl Groups {
    /// Reads each id once (the caller's memory is read exactly once per position), checks it
    /// against `rows` and groups the positions by id.
    pub(super) fn new(ids: &[i64], rows: usize, comparison_sort: bool) -> Result<Self> {
        let n = ids.len();
        if n >= u32::MAX as usize {
            return Err(EngramError::Invalid(format!(
                "a sparse step takes fewer than {} lookups, got {n}: split the batch",
                u32::MAX
            )));
        }
        let oom = |what: &str| EngramError::OutOfMemory {
            bytes: n * 8,
            what: format!("{what} of a sparse step's ids"),
            hint: "take fewer lookups per step".into(),
        };
        // Each id read once, then checked and used from this copy only.
        let mut checked: Vec<u64> = Vec::new();
        checked.try_reserve_exact(n).map_err(|_| oom("a copy"))?;
        checked.extend(ids.iter().map(|&id| id as u64));
        let top = checked
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |m, &k| m.max(k)))
            .max()
            .unwrap_or(0);
        if top >= rows as u64 {
            let index = checked.iter().position(|&k| k >= rows as u64).unwrap_or(0);
            return Err(EngramError::IndexOutOfRange {
                value: checked[index] as i64 as i128,
                index,
                rows,
            });
        }
        let pos_bits = bits(n.saturating_sub(1) as u64);
        let id_bits = bits(rows.saturating_sub(1) as u64);
        let (order, sorted): (Vec<u32>, Vec<u64>) = if !comparison_sort && pos_bits + id_bits <= 64
        {
            // `(id << pos_bits) | position`, sorted stably by id: equal ids stay in position
            // order.
            let mut keys: Vec<u64> = Vec::new();
            let mut tmp: Vec<u64> = Vec::new();
            keys.try_reserve_exact(n).map_err(|_| oom("the sort"))?;
            tmp.try_reserve_exact(n).map_err(|_| oom("the sort"))?;
            keys.extend(
                checked
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| (id << pos_bits) | i as u64),
            );
            tmp.resize(n, 0);
            radix_sort(&mut keys, &mut tmp, pos_bits, id_bits);
            let mask = (1u64 << pos_bits) - 1;
            (
                keys.iter().map(|&k| (k & mask) as u32).collect(),
                keys.iter().map(|&k| k >> pos_bits).collect(),
            )
        } else {
            let mut pairs: Vec<(u64, u32)> = checked
                .iter()
                .enumerate()
                .map(|(i, &id)| (id, i as u32))
                .collect();
            pairs.par_sort_unstable();
            (
                pairs.iter().map(|&(_, p)| p).collect(),
                pairs.iter().map(|&(id, _)| id).collect(),
            )
        };
        drop(checked);
        let mut starts = Vec::new();
        let mut rows_of = Vec::new();
        for (i, &id) in sorted.iter().enumerate() {
            if i == 0 || id != sorted[i - 1] {
                starts.push(i as u32);
                rows_of.push(id);
            }
        }
        starts.push(n as u32);
        Ok(Self {
            order,
            starts,
            rows: rows_of,
        })
    }

    /// The number of unique rows.
    pub(super) fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// The positions of unique row `j`'s lookups, in increasing order (never empty).
    pub(super) fn positions(&self, j: usize) -> &[u32] {
        &self.order[self.starts[j] as usize..self.starts[j + 1] as usize]
    }

    /// Unique row `j`'s table row.
    pub(super) fn row(&self, j: usize) -> usize {
        self.rows[j] as usize
    }
}

/// Bits needed to hold `x` (0 for 0).
pub(super) fn bits(x: u64) -> u32 {
    64 - x.leading_zeros()
}

/// Sorts `keys` stably by their bits `[shift, shift + id_bits)` (an LSD radix sort, one histogram
/// pass for all digits); `tmp` has the length of `keys`.
pub(super) fn radix_sort(keys: &mut Vec<u64>, tmp: &mut Vec<u64>, shift: u32, id_bits: u32) {
    if id_bits == 0 {
        return;
    }
    let passes = id_bits.div_ceil(11);
    let digit = id_bits.div_ceil(passes);
    let buckets = 1usize << digit;
    let mask = (buckets - 1) as u64;
    let mut hist = vec![0usize; buckets * passes as usize];
    for &k in keys.iter() {
        for p in 0..passes {
            let d = ((k >> (shift + p * digit)) & mask) as usize;
            hist[p as usize * buckets + d] += 1;
        }
    }
    for p in 0..passes {
        let h = &mut hist[p as usize * buckets..][..buckets];
        if h.contains(&keys.len()) {
            continue; // every key has the same digit: nothing moves
        }
        let mut sum = 0;
        for c in h.iter_mut() {
            let here = *c;
            *c = sum;
            sum += here;
        }
        let s = shift + p * digit;
        for &k in keys.iter() {
            let d = ((k >> s) & mask) as usize;
            tmp[h[d]] = k;
            h[d] += 1;
        }
        std::mem::swap(keys, tmp);
    }
}
