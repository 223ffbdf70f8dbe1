//! Training a tiered table: the rows a step changes stay in memory until a flush writes them
//! back to the file, crash-safe.
//!
//! A step updates hot rows in place, in the packed hot buffer, and cold rows in the write-back
//! store: each cold row a step touches is read from the file once (unless the store holds it
//! already) and stays in the store, where gathers find it, until [`HostTable::flush`] writes
//! back every row changed since the last flush (hot and cold, in row order, runs of
//! neighbouring rows as one write). The step flushes by itself once the store holds more than
//! its budget, so memory stays bounded however long training runs.
//!
//! A flush cannot tear the table: the changed rows' bytes go first to a journal beside the
//! table (`<table>.journal`: a temporary file, synced, renamed into place, the directory
//! synced), then into the table file (synced), then the journal is removed. A process killed
//! before the rename leaves the table as of the previous flush; one killed after it leaves a
//! journal that the next writable open of the file replays (all of it: replaying is
//! idempotent), so the table is then as of this flush. A read-only open of a file with a
//! journal is refused, never served rows of half a flush. What a crash loses is the updates
//! since the last completed flush, nothing else.

use super::*;
use crate::atomic::{parent, sync_path, AtomicFile};
use crate::checksum::Checksum;
use std::collections::HashMap;
use std::io::{BufWriter, Read, Seek, Write};

/// The journal's first bytes (its format's version).
const MAGIC: &[u8; 8] = b"ENGRAMJ1";
/// The most rows one write of a run covers.
const RUN: usize = 1024;
/// The write-back store's default budget (bytes of cold rows held before a step flushes).
pub const DEFAULT_DIRTY_BYTES: usize = 1 << 30;

/// Where the journal of a flush of the table at `path` lies.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    path.with_file_name(name)
}

/// The rows changed since the last flush.
#[derive(Default)]
pub(crate) struct Dirty {
    /// Cold row -> its slot in `values`/`scales`.
    pub(crate) slots: HashMap<u64, u32>,
    /// Slot -> cold row.
    pub(crate) rows: Vec<u64>,
    pub(crate) values: Vec<u8>,
    pub(crate) scales: Vec<u8>,
    /// A bit per hot slot: changed since the last flush.
    pub(crate) hot: Vec<u64>,
    pub(crate) hot_changed: usize,
}

impl Dirty {
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.hot_changed == 0
    }

    pub(crate) fn bytes(&self) -> usize {
        self.values.len() + self.scales.len()
    }
}

/// What a tiered table needs to be trained: the descriptor writes go through and the budget.
pub(crate) struct Writer {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) budget: usize,
    pub(crate) flushes: AtomicU64,
    /// The process that opened the table: a forked child's copy never writes it back.
    pub(crate) pid: u32,
}

/// Where one changed row's bytes are now.
#[derive(Clone, Copy)]
enum Src {
    Hot(usize),
    Cold(usize),
}

impl Tiered {
    /// The places (value and scale addresses) of unique rows `rows` (sorted, distinct, below
    /// the table's rows) for a step to update: hot rows in the hot buffer (marked changed),
    /// cold rows in the write-back store, those it does not hold yet read from the file first
    /// (all of them before anything is written: a failed read changes nothing).
    pub(crate) fn prepare_step(
        &mut self,
        rows: impl Iterator<Item = u64> + Clone,
    ) -> Result<Vec<(usize, usize)>> {
        if self.writer.is_none() {
            return Err(EngramError::ReadOnly(
                "this tiered table was opened read-only: open it with writable=True to train \
                 it"
                .into(),
            ));
        }
        let (rb, sb) = (self.values.unit, self.scales.unit);
        let d = self.dirty.get_mut().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<u64> = rows
            .clone()
            .filter(|&r| self.index.slot(r).is_none() && !d.slots.contains_key(&r))
            .collect();
        if !missing.is_empty() {
            let first = d.rows.len();
            if first + missing.len() > u32::MAX as usize {
                return Err(EngramError::Invalid(format!(
                    "the write-back store would hold {} rows: flush() more often (a smaller \
                     dirty_bytes)",
                    first + missing.len()
                )));
            }
            d.values.resize((first + missing.len()) * rb, 0);
            d.scales.resize((first + missing.len()) * sb, 0);
            let (v, s) = (&mut d.values[first * rb..], &mut d.scales[first * sb..]);
            if let Err(e) = self
                .reader
                .read(&missing, &mut [(self.values, v), (self.scales, s)])
            {
                d.values.truncate(first * rb);
                d.scales.truncate(first * sb);
                return Err(e);
            }
            for (k, &r) in missing.iter().enumerate() {
                d.slots.insert(r, (first + k) as u32);
            }
            d.rows.extend_from_slice(&missing);
        }
        let (hv, hs) = (self.hot.values as usize, self.hot.scales as usize);
        let (cv, cs) = (
            d.values.as_mut_ptr() as usize,
            d.scales.as_mut_ptr() as usize,
        );
        Ok(rows
            .map(|r| match self.index.slot(r) {
                Some(slot) => {
                    let slot = slot as usize;
                    let word = &mut d.hot[slot / 64];
                    if *word & (1 << (slot % 64)) == 0 {
                        *word |= 1 << (slot % 64);
                        d.hot_changed += 1;
                    }
                    (hv + slot * rb, hs + slot * sb)
                }
                None => {
                    let slot = d.slots[&r] as usize;
                    (cv + slot * rb, cs + slot * sb)
                }
            })
            .collect())
    }

    /// Whether the write-back store holds more than its budget (the step then flushes).
    pub(crate) fn over_budget(&mut self) -> bool {
        let d = self.dirty.get_mut().unwrap_or_else(|e| e.into_inner());
        self.writer.as_ref().is_some_and(|w| d.bytes() > w.budget)
    }

    /// Writes every row changed since the last flush back to the file (journal first, see the
    /// module docs); nothing for a read-only table.
    pub(crate) fn flush(&self) -> Result<()> {
        self.flush_with(false)
    }

    /// Forgets the changes since the last flush, as a killed process would (tests).
    #[cfg(test)]
    pub(crate) fn discard(&self) {
        let mut d = self.dirty.write().unwrap_or_else(|e| e.into_inner());
        let hot = d.hot.len();
        *d = Dirty {
            hot: vec![0; hot],
            ..Dirty::default()
        };
    }

    /// [`Tiered::flush`]; `journal_only` stops after the journal is in place, as a process
    /// killed there would (tests).
    pub(crate) fn flush_with(&self, journal_only: bool) -> Result<()> {
        let Some(w) = &self.writer else {
            return Ok(());
        };
        if w.pid != std::process::id() {
            return Err(EngramError::Invalid(format!(
                "this tiered table was opened writable by process {}: a forked child cannot \
                 write its changes back (they are a copy of the parent's); open the file again \
                 in the child once the parent has closed it",
                w.pid
            )));
        }
        let mut d = self.dirty.write().unwrap_or_else(|e| e.into_inner());
        if d.is_empty() {
            return Ok(());
        }
        let (rb, sb) = (self.values.unit, self.scales.unit);
        // Every changed row, in row order, and where its bytes are.
        let mut changed: Vec<(u64, Src)> = Vec::with_capacity(d.rows.len() + d.hot_changed);
        changed.extend(d.rows.iter().enumerate().map(|(s, &r)| (r, Src::Cold(s))));
        self.index.for_each_hot(|r, slot| {
            if d.hot[slot / 64] & (1 << (slot % 64)) != 0 {
                changed.push((r, Src::Hot(slot)));
            }
        });
        changed.sort_unstable_by_key(|c| c.0);
        let bytes = |src: Src| -> (&[u8], &[u8]) {
            match src {
                // SAFETY: `slot` is below the hot rows (from the index), whose values and
                // scales the hot buffer holds; steps (which write them) need `&mut self`,
                // excluded while this `&self` call runs.
                Src::Hot(slot) => unsafe {
                    (
                        std::slice::from_raw_parts(self.hot.values.add(slot * rb), rb),
                        if sb > 0 {
                            std::slice::from_raw_parts(self.hot.scales.add(slot * sb), sb)
                        } else {
                            &[][..]
                        },
                    )
                },
                Src::Cold(slot) => (&d.values[slot * rb..][..rb], &d.scales[slot * sb..][..sb]),
            }
        };
        // Runs of neighbouring rows: one extent of values and one of scales each.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, &(r, _)) in changed.iter().enumerate() {
            match runs.last_mut() {
                Some((first, n)) if changed[*first].0 + *n as u64 == r && *n < RUN => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
        let mut extents: Vec<(u64, u64)> = Vec::with_capacity(2 * runs.len());
        for &(first, n) in &runs {
            let r = changed[first].0;
            extents.push((self.values.base + r * rb as u64, (n * rb) as u64));
            if sb > 0 {
                extents.push((self.scales.base + r * sb as u64, (n * sb) as u64));
            }
        }
        let run_bytes = |first: usize, n: usize, scales: bool, out: &mut Vec<u8>| {
            out.clear();
            for &(_, src) in &changed[first..first + n] {
                let (v, s) = bytes(src);
                out.extend_from_slice(if scales { s } else { v });
            }
        };
        // The journal: written whole and synced before the table is touched.
        let journal = journal_path(&w.path);
        let total: u64 = extents.iter().map(|e| e.1).sum();
        let atomic = AtomicFile::create(&journal)?;
        {
            let io = |e: std::io::Error| EngramError::io(&journal, e);
            let mut out = JournalWriter {
                file: BufWriter::with_capacity(1 << 20, atomic.file()),
                sum: Checksum::new(),
            };
            out.put(MAGIC).map_err(io)?;
            let (dev, ino) = identity(&w.file, &w.path)?;
            out.put(&dev.to_le_bytes()).map_err(io)?;
            out.put(&ino.to_le_bytes()).map_err(io)?;
            out.put(&(extents.len() as u64).to_le_bytes()).map_err(io)?;
            out.put(&total.to_le_bytes()).map_err(io)?;
            for &(at, len) in &extents {
                out.put(&at.to_le_bytes()).map_err(io)?;
                out.put(&len.to_le_bytes()).map_err(io)?;
            }
            let mut buf = Vec::new();
            for &(first, n) in &runs {
                run_bytes(first, n, false, &mut buf);
                out.put(&buf).map_err(io)?;
                if sb > 0 {
                    run_bytes(first, n, true, &mut buf);
                    out.put(&buf).map_err(io)?;
                }
            }
            let digest = out.sum.digest();
            out.file.write_all(&digest).map_err(io)?;
            out.file.flush().map_err(io)?;
        }
        atomic.commit()?;
        if journal_only {
            return Ok(());
        }
        // The table: each run written in place, then synced, then the journal removed.
        let io = |e: std::io::Error| EngramError::io(&w.path, e);
        let mut buf = Vec::new();
        let mut k = 0;
        for &(first, n) in &runs {
            for scales in [false, true] {
                if scales && sb == 0 {
                    continue;
                }
                run_bytes(first, n, scales, &mut buf);
                w.file.write_all_at(&buf, extents[k].0).map_err(io)?;
                k += 1;
            }
        }
        w.file.sync_data().map_err(io)?;
        finish_journal(&journal)?;
        // The rows just written are on disk: drop them from the page cache (cold rows are read
        // with O_DIRECT and must not fill it).
        drop_cached(&w.file);
        d.slots.clear();
        d.rows.clear();
        d.values.clear();
        d.scales.clear();
        d.hot.iter_mut().for_each(|b| *b = 0);
        d.hot_changed = 0;
        w.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The journal's bytes, checksummed as they are written.
struct JournalWriter<W: Write> {
    file: W,
    sum: Checksum,
}

impl<W: Write> JournalWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sum.update(bytes);
        self.file.write_all(bytes)
    }
}

/// The file's device and inode: a journal belongs to one file, not to whatever file later
/// takes its path (a table created again, a backup restored), and is never replayed into
/// another.
fn identity(file: &File, path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().map_err(|e| EngramError::io(path, e))?;
    Ok((m.dev(), m.ino()))
}

/// The journal's header: magic, device, inode, writes, data bytes.
const HEAD: usize = 40;

/// Removes a journal whose writes are in the table (synced), and syncs its directory.
fn finish_journal(journal: &Path) -> Result<()> {
    std::fs::remove_file(journal).map_err(|e| EngramError::io(journal, e))?;
    sync_path(parent(journal))
}

/// Drops a file's clean pages from the page cache (advice: failures are ignored).
fn drop_cached(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor this table owns.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Finishes a flush that a killed process left behind: if the table at `path` has a journal,
/// a writable open (`file` opened for writing and locked exclusively) replays it into the
/// file, syncs it and removes the journal; a read-only open is refused (the file may hold
/// part of the flush). A journal that fails its checksum is an error, and nothing is written.
/// A journal of another file (another inode: the path was given to a new file since) is
/// stale: removed by a writable open, ignored by a read-only one.
pub(crate) fn recover(file: &File, path: &Path, writable: bool) -> Result<()> {
    let journal = journal_path(path);
    let mut j = match File::open(&journal) {
        Ok(j) => j,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(EngramError::io(&journal, e)),
    };
    let io = |e: std::io::Error| EngramError::io(&journal, e);
    let mut head = [0u8; HEAD];
    let whole = j.read_exact(&mut head).is_ok() && &head[..8] == MAGIC;
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    if whole && (word(&head[8..16]), word(&head[16..24])) != identity(file, path)? {
        if writable {
            finish_journal(&journal)?;
        }
        return Ok(());
    }
    if !writable {
        return Err(EngramError::Invalid(format!(
            "{} has a journal ({}): a flush of a tiered table was interrupted and the file may \
             hold part of it; open it once with writable=True (or open_tiered(..., \
             writable=True)) to finish that flush",
            path.display(),
            journal.display()
        )));
    }
    let damaged = |why: String| {
        EngramError::Format(format!(
            "{}: the journal of an interrupted flush is damaged ({why}); nothing was written \
             to {}. Restore the table from a checkpoint, or remove the journal if the table \
             is known to be whole",
            journal.display(),
            path.display()
        ))
    };
    let len = j.metadata().map_err(io)?.len();
    let (n, total) = (word(&head[24..32]), word(&head[32..40]));
    if !whole
        || n.checked_mul(16)
            .and_then(|x| x.checked_add(total))
            .and_then(|x| x.checked_add(HEAD as u64 + 16))
            != Some(len)
    {
        return Err(damaged(format!(
            "its header does not match its {len} bytes"
        )));
    }
    // First pass: the checksum over everything, before anything is written.
    let mut sum = Checksum::new();
    sum.update(&head);
    let mut rest = len - HEAD as u64 - 16;
    let mut buf = vec![0u8; 1 << 20];
    while rest > 0 {
        let k = rest.min(buf.len() as u64) as usize;
        j.read_exact(&mut buf[..k]).map_err(io)?;
        sum.update(&buf[..k]);
        rest -= k as u64;
    }
    let mut digest = [0u8; 16];
    j.read_exact(&mut digest).map_err(io)?;
    if digest != sum.digest() {
        return Err(damaged("its checksum does not match".into()));
    }
    // Second pass: the writes, in order, each checked inside the table first.
    j.seek(std::io::SeekFrom::Start(HEAD as u64)).map_err(io)?;
    let mut table = vec![0u8; (n * 16) as usize];
    j.read_exact(&mut table).map_err(io)?;
    let file_len = file.metadata().map_err(|e| EngramError::io(path, e))?.len();
    let writes: Vec<(u64, u64)> = table
        .chunks_exact(16)
        .map(|e| (word(&e[..8]), word(&e[8..])))
        .collect();
    if let Some((at, len)) = writes
        .iter()
        .find(|(at, len)| at.checked_add(*len).is_none_or(|end| end > file_len))
    {
        return Err(damaged(format!(
            "a write of {len} bytes at {at} runs past the table's {file_len} bytes"
        )));
    }
    for (at, len) in writes {
        let mut done = 0;
        while done < len {
            let k = (len - done).min(buf.len() as u64) as usize;
            j.read_exact(&mut buf[..k]).map_err(io)?;
            file.write_all_at(&buf[..k], at + done)
                .map_err(|e| EngramError::io(path, e))?;
            done += k as u64;
        }
    }
    file.sync_data().map_err(|e| EngramError::io(path, e))?;
    finish_journal(&journal)
}
