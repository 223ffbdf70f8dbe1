//! Reads of rows from a table's file: sorted distinct rows become block-aligned extents (rows
//! that share or neighbour a 4 KiB block are read together, up to [`MAX_EXTENT`]), read by a
//! pool of [`READS_IN_FLIGHT`] threads with `pread`, through an `O_DIRECT` descriptor where the
//! file system takes one (cold rows then do not fill the page cache). Nothing is mapped: a file
//! truncated under the table is a short read, an error naming the file and the offset, never a
//! SIGBUS; a row is only ever copied out of bytes that were read.

use crate::buffer::AlignedBuf;
use crate::error::{EngramError, Result};
use crate::pool::ProcessPool;
use rayon::prelude::*;
use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The block size reads are aligned to (O_DIRECT's unit on the common file systems).
pub(crate) const BLOCK: usize = 4096;
/// The longest read: rows closer together than this are read in one go.
pub(crate) const MAX_EXTENT: usize = 256 << 10;
/// Reads in flight at once (the pool's threads): NVMe and cloud disks need dozens to reach
/// their random-read rate.
pub const READS_IN_FLIGHT: usize = 64;

static IO_POOL: ProcessPool = ProcessPool::with_threads("engram-io", READS_IN_FLIGHT);

thread_local! {
    /// Each I/O thread's read buffer (block-aligned for O_DIRECT), made on first use.
    static BUFFER: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// One read: `len` bytes (whole blocks) at `at`, of which the first `need` must arrive (the
/// last block may run past the end of the file); it serves rows `first..end` of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) at: u64,
    pub(crate) len: usize,
    pub(crate) need: usize,
    pub(crate) first: usize,
    pub(crate) end: usize,
}

/// The extents covering `unit`-byte records `rows` (sorted, distinct) of a region at `base`.
pub(crate) fn extents(rows: &[u64], base: u64, unit: usize) -> Vec<Extent> {
    let block = BLOCK as u64;
    let mut out: Vec<Extent> = Vec::new();
    for (pos, &r) in rows.iter().enumerate() {
        let a = base + r * unit as u64;
        let b = a + unit as u64;
        let (lo, hi) = (a / block * block, b.div_ceil(block) * block);
        match out.last_mut() {
            Some(e) if lo <= e.at + e.len as u64 && hi - e.at <= MAX_EXTENT as u64 => {
                e.len = e.len.max((hi - e.at) as usize);
                e.need = (b - e.at) as usize;
                e.end = pos + 1;
            }
            _ => out.push(Extent {
                at: lo,
                len: (hi - lo) as usize,
                need: (b - lo) as usize,
                first: pos,
                end: pos + 1,
            }),
        }
    }
    out
}

/// What the reads of a table have done (for `stats()` and the benchmark).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) reads: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

/// Where one kind of record (row values, or FP8 scales) lies in the file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    pub(crate) base: u64,
    pub(crate) unit: usize,
}

/// Reads records of a table's file.
pub(crate) struct RowReader {
    path: PathBuf,
    /// The table's descriptor (a duplicate of it), for buffered reads.
    file: File,
    /// The same file opened with O_DIRECT, where the file system supports it and it was wanted.
    direct: Option<File>,
    pub(crate) counters: Counters,
}

impl RowReader {
    /// A reader of `file` (the table's locked descriptor, duplicated). `direct`: `Some(true)`
    /// insists on O_DIRECT (an error where the file system refuses it), `Some(false)` reads
    /// through the page cache, `None` uses O_DIRECT where it works.
    pub(crate) fn new(file: &File, path: &Path, direct: Option<bool>) -> Result<Self> {
        let file = file.try_clone().map_err(|e| EngramError::io(path, e))?;
        let direct = match direct {
            Some(false) => None,
            want => match open_direct(&file) {
                Ok(f) => Some(f),
                Err(e) if want == Some(true) => {
                    return Err(EngramError::Io {
                        path: path.display().to_string(),
                        kind: e.kind(),
                        message: format!(
                            "cannot read it with O_DIRECT ({e}): this file system does not \
                             support direct I/O (tmpfs, some overlays); pass direct=False to \
                             read through the page cache"
                        ),
                    })
                }
                Err(_) => None,
            },
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            direct,
            counters: Counters::default(),
        })
    }

    /// Whether reads bypass the page cache.
    pub(crate) fn direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Reads records `rows` (sorted, distinct) of each region into its output
    /// (`rows.len() * unit` bytes, in the order of `rows`), many reads in flight.
    pub(crate) fn read(&self, rows: &[u64], parts: &mut [(Region, &mut [u8])]) -> Result<()> {
        let mut jobs: Vec<(usize, Extent)> = Vec::new();
        for (k, (region, out)) in parts.iter().enumerate() {
            if region.unit == 0 {
                continue;
            }
            debug_assert_eq!(out.len(), rows.len() * region.unit);
            jobs.extend(
                extents(rows, region.base, region.unit)
                    .into_iter()
                    .map(|e| (k, e)),
            );
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let outs: Vec<(Region, usize)> = parts
            .iter_mut()
            .map(|(region, out)| (*region, out.as_mut_ptr() as usize))
            .collect();
        let one = |&(k, e): &(usize, Extent)| -> Result<()> {
            let (region, out) = outs[k];
            BUFFER.with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(AlignedBuf::new(MAX_EXTENT + BLOCK)?);
                }
                let buf = cell.as_ref().expect("made above");
                // Block-aligned inside the buffer (O_DIRECT needs an aligned address).
                let skew = (BLOCK - buf.as_ptr() as usize % BLOCK) % BLOCK;
                // SAFETY: the buffer holds MAX_EXTENT + BLOCK bytes, so MAX_EXTENT of them from
                // `skew` (< BLOCK) on; this thread alone uses its buffer.
                let buf = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr().add(skew), e.len) };
                self.read_extent(e, buf)?;
                for (pos, &r) in rows.iter().enumerate().take(e.end).skip(e.first) {
                    let from = (region.base + r * region.unit as u64 - e.at) as usize;
                    // SAFETY: each position of each region is written by the one extent that
                    // covers it (extents split `rows` into disjoint ranges), so no two threads
                    // write the same bytes; `out` holds rows.len() * unit bytes (the caller's
                    // slice, borrowed for this call), and `from + unit <= need <= e.len`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            buf.as_ptr().add(from),
                            (out as *mut u8).add(pos * region.unit),
                            region.unit,
                        );
                    }
                }
                Ok(())
            })
        };
        if jobs.len() == 1 {
            return one(&jobs[0]);
        }
        IO_POOL
            .get()?
            .install(|| jobs.par_iter().with_max_len(1).try_for_each(one))
    }

    /// Reads extent `e` into `buf` (`e.len` bytes, block-aligned); at least `e.need` bytes must
    /// arrive.
    fn read_extent(&self, e: Extent, buf: &mut [u8]) -> Result<()> {
        let (file, direct) = match &self.direct {
            Some(d) => (d, true),
            None => (&self.file, false),
        };
        let mut got = 0;
        while got < e.len {
            match file.read_at(&mut buf[got..], e.at + got as u64) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    // A direct read that stops inside a block has reached the end of the file.
                    if direct && !got.is_multiple_of(BLOCK) {
                        break;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => {
                    return Err(EngramError::Io {
                        path: self.path.display().to_string(),
                        kind: err.kind(),
                        message: format!(
                            "reading {} bytes at offset {}: {err}",
                            e.len - got,
                            e.at + got as u64
                        ),
                    })
                }
            }
        }
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(got as u64, Ordering::Relaxed);
        if got < e.need {
            return Err(EngramError::Io {
                path: self.path.display().to_string(),
                kind: std::io::ErrorKind::UnexpectedEof,
                message: format!(
                    "short read at offset {}: {got} of the {} bytes the rows there need: the \
                     file was truncated or replaced while the table was open; open the table \
                     again",
                    e.at, e.need
                ),
            });
        }
        Ok(())
    }
}

/// The benchmark's ceiling of cold reads: a plain loop of `threads` threads, each taking the
/// next span and reading it with one `pread` (O_DIRECT with `direct`) into a buffer of its own,
/// nothing else. `spans` are (offset, length) pairs, block-aligned for O_DIRECT, each at most
/// [`MAX_EXTENT`] bytes. Returns the bytes read.
pub fn probe_reads(
    path: &Path,
    spans: &[(u64, usize)],
    threads: usize,
    direct: bool,
) -> Result<u64> {
    if let Some(&(at, len)) = spans.iter().find(|(at, len)| {
        *len > MAX_EXTENT
            || (direct && (!at.is_multiple_of(BLOCK as u64) || !len.is_multiple_of(BLOCK)))
    }) {
        return Err(EngramError::Invalid(format!(
            "probe span ({at}, {len}): spans are at most {MAX_EXTENT} bytes, block-aligned \
             ({BLOCK}) for O_DIRECT"
        )));
    }
    let file = File::open(path).map_err(|e| EngramError::io(path, e))?;
    let file = if direct {
        open_direct(&file).map_err(|e| EngramError::io(path, e))?
    } else {
        file
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let total = AtomicU64::new(0);
    let threads = threads
        .clamp(1, crate::pool::MAX_THREADS)
        .min(spans.len().max(1));
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let buf = AlignedBuf::new(MAX_EXTENT + BLOCK)?;
                    let skew = (BLOCK - buf.as_ptr() as usize % BLOCK) % BLOCK;
                    // SAFETY: MAX_EXTENT bytes from `skew` (< BLOCK) lie inside the buffer,
                    // which only this thread uses.
                    let buf = unsafe {
                        std::slice::from_raw_parts_mut(buf.as_ptr().add(skew), MAX_EXTENT)
                    };
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(at, len)) = spans.get(i) else {
                            return Ok(());
                        };
                        let n = file
                            .read_at(&mut buf[..len], at)
                            .map_err(|e| EngramError::io(path, e))?;
                        total.fetch_add(n as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|p| EngramError::from_panic(&*p))??;
        }
        Ok(())
    })?;
    Ok(total.into_inner())
}

/// The table's file opened again with O_DIRECT, through /proc/self/fd (the same file, even if
/// its path was replaced since), and one block read to be sure the file system takes it.
fn open_direct(file: &File) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let buf = AlignedBuf::new(2 * BLOCK).map_err(std::io::Error::other)?;
    let skew = (BLOCK - buf.as_ptr() as usize % BLOCK) % BLOCK;
    // SAFETY: 2 * BLOCK bytes from the buffer's start, so BLOCK from `skew` (< BLOCK) on.
    let probe = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr().add(skew), BLOCK) };
    direct.read_at(probe, 0)?;
    Ok(direct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_that_share_or_neighbour_blocks_are_one_read() {
        // 264-byte rows from byte 100: rows 0 and 1 share block 0, row 15 ends in block 0 too
        // (100 + 16 * 264 = 4324 > 4096: it spans blocks 0 and 1), row 1000 is far away.
        let e = extents(&[0, 1, 15, 1000], 100, 264);
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].at, e[0].len, e[0].first, e[0].end), (0, 8192, 0, 3));
        assert_eq!(e[0].need, 100 + 16 * 264);
        let a = 100 + 1000 * 264u64;
        assert_eq!(e[1].at, a / 4096 * 4096);
        assert_eq!((e[1].first, e[1].end), (3, 4));
        // Extents stop growing at MAX_EXTENT.
        let many: Vec<u64> = (0..10_000).collect();
        let e = extents(&many, 0, 256);
        assert!(e.iter().all(|x| x.len <= MAX_EXTENT));
        assert_eq!(e.len(), (10_000usize * 256).div_ceil(MAX_EXTENT));
        assert_eq!(e.last().unwrap().end, 10_000);
    }
}
