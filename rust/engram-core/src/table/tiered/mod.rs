//! Tiered tables (mode "tiered"): a table larger than memory, whose hot rows are resident and
//! whose other rows are read from its file when a gather needs them.
//!
//! The hot rows (chosen by the caller, typically the most looked-up rows of real text within a
//! memory budget) are read once at open into one huge-page buffer, packed in row order, and
//! found through a bit-per-row rank index ([`index::HotIndex`]), so a hit costs what a resident
//! gather's row does. A gather first splits its ids into hits and misses, reads each distinct
//! missed row once (sorted, coalesced by block, [`io::READS_IN_FLIGHT`] reads in flight, O_DIRECT
//! where the file system takes it: see [`io`]), then converts every row into the output from
//! the hot buffer or the rows just read, with the same kernels as every other gather. No part
//! of the file is mapped: a page fault never happens on the gather's path, and a truncated
//! file is an error, not a SIGBUS. Opened writable, the fused optimizers train it: changed rows
//! stay in memory until a flush writes them back, crash-safe (see [`write`]).

use super::file::open_locked;
use super::*;
use crate::elem::{Backend, IdElem};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

mod index;
pub mod io;
pub mod write;

use index::HotIndex;
use io::{Region, RowReader};
pub use write::{journal_path, DEFAULT_DIRTY_BYTES};
use write::{Dirty, Writer};

/// The rows of an id that is not hot, tagged among the slots of a split gather.
pub(crate) const COLD: u64 = 1 << 63;

/// What a tiered table keeps besides the `HostTable` fields.
pub(crate) struct Tiered {
    /// The hot rows, packed (a table of `hot_rows` rows over `_hot_buf`).
    pub(crate) hot: HostTable,
    _hot_buf: AlignedBuf,
    index: HotIndex,
    reader: RowReader,
    values: Region,
    scales: Region,
    lookups: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// The rows changed since the last flush (gathers read it, steps and flushes write it).
    dirty: RwLock<Dirty>,
    /// Where and when changed rows are written back (`None`: read-only).
    writer: Option<Writer>,
}

impl Drop for Tiered {
    fn drop(&mut self) {
        // A table dropped without a flush (close() flushes, and says when that fails); never
        // in a forked child.
        if self
            .writer
            .as_ref()
            .is_none_or(|w| w.pid != std::process::id())
        {
            return;
        }
        if let Err(e) = self.flush() {
            eprintln!("engram_rs: the tiered table's last write-back failed: {e}");
        }
    }
}

/// A tiered table's counters since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Rows in memory, and the bytes they and their index take.
    pub hot_rows: u64,
    pub hot_bytes: u64,
    pub index_bytes: u64,
    /// Ids gathered, and how many of them were hot.
    pub lookups: u64,
    pub hits: u64,
    /// Distinct cold rows read (each once per gather), the reads that fetched them and their
    /// bytes.
    pub misses: u64,
    pub reads: u64,
    pub read_bytes: u64,
    /// Whether cold reads bypass the page cache (O_DIRECT).
    pub direct: bool,
    /// Rows changed since the last flush (cold ones held in the write-back store, hot ones),
    /// the store's bytes, and the flushes so far.
    pub dirty_rows: u64,
    pub dirty_hot_rows: u64,
    pub dirty_bytes: u64,
    pub flushes: u64,
}

impl HostTable {
    /// Opens a tiered table: rows `hot` (strictly increasing row ids) are read into memory
    /// now, every other row is read from the file by the gathers that need it. `direct`:
    /// O_DIRECT for those reads (`None`: where the file system supports it). `writable`: the
    /// optimizers may train it, holding changed cold rows in memory up to `dirty_bytes` before
    /// a step writes them back (see [`write`]).
    #[allow(clippy::too_many_arguments)]
    pub fn open_tiered(
        path: &Path,
        name: Option<&str>,
        scales: Option<&str>,
        hot: &[u64],
        direct: Option<bool>,
        writable: bool,
        dirty_bytes: usize,
    ) -> Result<Self> {
        let file = open_locked(path, writable)?;
        let (backing, rows, dim, dtype) = open::locate(file, path, name, scales)?;
        if let Some(pos) = hot
            .iter()
            .enumerate()
            .position(|(i, &r)| r >= rows as u64 || (i > 0 && r <= hot[i - 1]))
        {
            let r = hot[pos];
            return Err(EngramError::Invalid(if r >= rows as u64 {
                format!(
                    "hot row {r} (position {pos}) is outside the table's {rows} rows: the hot \
                     set must be rows of this table"
                )
            } else {
                format!(
                    "hot rows must be strictly increasing (sorted, no repeats): position {pos} \
                     holds {r} after {}; pass numpy.unique(rows)",
                    hot[pos - 1]
                )
            }));
        }
        let reader = RowReader::new(&backing.file, path, direct)?;
        let (rb, sb) = (dim * dtype.size(), dim / FP8_BLOCK);
        let sb = if dtype == DType::F8E4M3 { sb } else { 0 };
        let values = Region {
            base: backing.values.0 as u64,
            unit: rb,
        };
        let scales = Region {
            base: backing.scales.map_or(0, |s| s.0 as u64),
            unit: sb,
        };
        let (hot_buf, hot_table) =
            read_packed(&reader, hot, 0, |_, _| {}, values, scales, dim, dtype)?;
        // The counters count the gathers' reads, not these.
        reader.counters.reads.store(0, Ordering::Relaxed);
        reader.counters.bytes.store(0, Ordering::Relaxed);
        let writer = if writable {
            Some(Writer {
                file: backing
                    .file
                    .try_clone()
                    .map_err(|e| EngramError::io(path, e))?,
                path: path.to_path_buf(),
                budget: dirty_bytes,
                flushes: AtomicU64::new(0),
                pid: std::process::id(),
            })
        } else {
            None
        };
        let dirty = Dirty {
            hot: vec![0; hot.len().div_ceil(64)],
            ..Dirty::default()
        };
        let tiered = Tiered {
            hot: hot_table,
            _hot_buf: hot_buf,
            index: HotIndex::new(rows, hot)?,
            reader,
            values,
            scales,
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            dirty: RwLock::new(dirty),
            writer,
        };
        Ok(Self {
            storage: Storage::Tiered(Box::new(tiered)),
            values: std::ptr::null_mut(),
            scales: std::ptr::null_mut(),
            rows,
            dim,
            dtype,
            mode: Mode::Tiered,
            writable,
            file: Some(backing),
        })
    }

    /// The tiered part of a tiered table.
    pub(crate) fn tiered(&self) -> Option<&Tiered> {
        match &self.storage {
            Storage::Tiered(t) => Some(t),
            _ => None,
        }
    }

    /// The same, to train it.
    pub(crate) fn tiered_mut(&mut self) -> Option<&mut Tiered> {
        match &mut self.storage {
            Storage::Tiered(t) => Some(t),
            _ => None,
        }
    }

    /// A tiered table's counters (`None` for other modes).
    pub fn tier_stats(&self) -> Option<TierStats> {
        let t = self.tiered()?;
        let c = &t.reader.counters;
        let d = t.dirty.read().unwrap_or_else(|e| e.into_inner());
        Some(TierStats {
            hot_rows: t.hot.rows as u64,
            hot_bytes: t.hot.nbytes() as u64,
            index_bytes: t.index.nbytes() as u64,
            lookups: t.lookups.load(Ordering::Relaxed),
            hits: t.hits.load(Ordering::Relaxed),
            misses: t.misses.load(Ordering::Relaxed),
            reads: c.reads.load(Ordering::Relaxed),
            read_bytes: c.bytes.load(Ordering::Relaxed),
            direct: t.reader.direct(),
            dirty_rows: d.rows.len() as u64,
            dirty_hot_rows: d.hot_changed as u64,
            dirty_bytes: d.bytes() as u64,
            flushes: t
                .writer
                .as_ref()
                .map_or(0, |w| w.flushes.load(Ordering::Relaxed)),
        })
    }

    /// The error of an operation that needs every row in memory, on a tiered table.
    pub(crate) fn refuse_tiered(&self, what: &str) -> Result<()> {
        if self.mode != Mode::Tiered {
            return Ok(());
        }
        Err(EngramError::Invalid(format!(
            "{what} needs every row in memory, and this table is tiered (most rows stay on \
             disk): open the file with mode=\"mmap\" or \"resident\" for it"
        )))
    }
}

/// Reads rows `rows` (sorted, distinct) into one buffer, values then scales, and a table over
/// it; `extra` more rows follow them, filled by `fill(values, scales)` (their bytes).
#[allow(clippy::too_many_arguments)]
fn read_packed(
    reader: &RowReader,
    rows: &[u64],
    extra: usize,
    fill: impl FnOnce(&mut [u8], &mut [u8]),
    values: Region,
    scales: Region,
    dim: usize,
    dtype: DType,
) -> Result<(AlignedBuf, HostTable)> {
    let n = rows.len() + extra;
    let (vb, sb) = (n * values.unit, n * scales.unit);
    let buf = AlignedBuf::new(vb + sb)?;
    // SAFETY: the buffer holds vb + sb bytes, split into two disjoint slices; nothing else
    // refers to it yet.
    let (v, s) = unsafe {
        (
            std::slice::from_raw_parts_mut(buf.as_ptr(), vb),
            std::slice::from_raw_parts_mut(buf.as_ptr().add(vb), sb),
        )
    };
    let (v, v_extra) = v.split_at_mut(rows.len() * values.unit);
    let (s, s_extra) = s.split_at_mut(rows.len() * scales.unit);
    fill(v_extra, s_extra);
    reader.read(rows, &mut [(values, v), (scales, s)])?;
    let scale_ptr = if sb > 0 {
        // SAFETY: the scales follow the values inside the buffer.
        unsafe { buf.as_ptr().add(vb) }
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: the buffer holds rows.len() rows of values and scales, lives as long as the
    // table (both are kept together, the table dropped first: field order in `Tiered`, or the
    // caller's scope), and is written by no one after this.
    let table = unsafe { HostTable::from_raw(buf.as_ptr(), scale_ptr, n, dim, dtype, false) }?;
    Ok((buf, table))
}

thread_local! {
    /// The slots of the calling thread's last tiered gather, kept for the next one (a gather of
    /// 100k ids would otherwise fault in a fresh 800 KB vector every call).
    static SLOTS: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Tiered {
    /// Gathers rows `idx` (checked below the table's rows by the caller; each read again here
    /// exactly once, since the caller's memory may change meanwhile) into `out`.
    pub(crate) fn gather<I: IdElem>(
        &self,
        idx: &[I],
        rows: usize,
        out: &mut [u8],
        out_dtype: DType,
        backend: Backend,
    ) -> Result<()> {
        let mut slots = SLOTS.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let outcome = self.gather_with(idx, rows, &mut slots, out, out_dtype, backend);
        SLOTS.with(|s| *s.borrow_mut() = slots);
        outcome
    }

    fn gather_with<I: IdElem>(
        &self,
        idx: &[I],
        rows: usize,
        slots: &mut Vec<u64>,
        out: &mut [u8],
        out_dtype: DType,
        backend: Backend,
    ) -> Result<()> {
        const PIECE: usize = 1 << 14;
        slots.clear();
        slots.resize(idx.len(), 0);
        // One pass: each id read once (volatile), checked, and made a hot slot or a cold row.
        let split: Option<Vec<u64>> = slots
            .par_chunks_mut(PIECE)
            .zip(idx.par_chunks(PIECE))
            .map(|(slots, idx)| {
                let mut cold = Vec::new();
                const AHEAD: usize = 16;
                // A hint read of id `k` (volatile, like every read of the caller's memory): its
                // value only picks an address to prefetch, which is never dereferenced.
                let hint = |k: usize| {
                    if k < idx.len() {
                        // SAFETY: `k < idx.len()`.
                        let r = unsafe { std::ptr::read_volatile(idx.as_ptr().add(k)) };
                        self.index.prefetch(r.bits());
                    }
                };
                (0..AHEAD).for_each(hint);
                for (k, s) in slots.iter_mut().enumerate() {
                    hint(k + AHEAD);
                    // SAFETY: `k < idx.len()`; the one read of this id that is used (volatile:
                    // the caller's memory may change meanwhile).
                    let r = unsafe { std::ptr::read_volatile(idx.as_ptr().add(k)) }.bits();
                    if r >= rows as u64 {
                        return None;
                    }
                    *s = match self.index.slot(r) {
                        Some(slot) => slot,
                        None => {
                            cold.push(r);
                            COLD | r
                        }
                    };
                }
                Some(cold)
            })
            .try_reduce(Vec::new, |mut a, mut b| {
                a.append(&mut b);
                Some(a)
            });
        let mut cold = split.ok_or_else(crate::gather::changed)?;
        let misses = cold.len();
        self.lookups.fetch_add(idx.len() as u64, Ordering::Relaxed);
        self.hits
            .fetch_add((idx.len() - misses) as u64, Ordering::Relaxed);
        if cold.is_empty() {
            return crate::gather::gather(&self.hot, slots, out, out_dtype, backend);
        }
        cold.par_sort_unstable();
        cold.dedup();
        // Cold rows that steps changed since the last flush come from the write-back store,
        // the others from the file.
        let dirty = self.dirty.read().unwrap_or_else(|e| e.into_inner());
        let mut held: Vec<(u64, usize)> = Vec::new();
        if !dirty.slots.is_empty() {
            cold.retain(|r| match dirty.slots.get(r) {
                Some(&slot) => {
                    held.push((*r, slot as usize));
                    false
                }
                None => true,
            });
        }
        self.misses.fetch_add(cold.len() as u64, Ordering::Relaxed);
        let (rb, sb) = (self.values.unit, self.scales.unit);
        let fill = |v: &mut [u8], s: &mut [u8]| {
            for (k, &(_, slot)) in held.iter().enumerate() {
                v[k * rb..][..rb].copy_from_slice(&dirty.values[slot * rb..][..rb]);
                s[k * sb..][..sb].copy_from_slice(&dirty.scales[slot * sb..][..sb]);
            }
        };
        let (_buf, staged) = read_packed(
            &self.reader,
            &cold,
            held.len(),
            fill,
            self.values,
            self.scales,
            self.hot.dim,
            self.hot.dtype,
        )?;
        drop(dirty);
        slots.par_chunks_mut(PIECE).for_each(|slots| {
            for s in slots.iter_mut().filter(|s| **s & COLD != 0) {
                let r = *s & !COLD;
                let at = match cold.binary_search(&r) {
                    Ok(at) => at,
                    Err(_) => {
                        cold.len()
                            + held
                                .binary_search_by_key(&r, |h| h.0)
                                .expect("every cold row was read or held")
                    }
                };
                *s = COLD | at as u64;
            }
        });
        crate::gather::gather_split(&self.hot, &staged, slots, out, out_dtype, backend)
    }
}

#[cfg(test)]
mod tests;
