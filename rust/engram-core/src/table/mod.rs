//! Host embedding tables: rows of f32/f16/bf16, or FP8 E4M3 with UE8M0 block scales, in a
//! memory-mapped safetensors file, in resident (huge-page advised, prefaulted) memory, or in a
//! caller's buffer.
//!
//! A file-backed table keeps the descriptor it parsed the header from (the header, the map and
//! any write-back all go through it, so a path replaced meanwhile is never touched) and holds an
//! advisory `flock` on it: shared when read-only, exclusive when writable. A writable map has
//! its blocks allocated first, so a full disk is an error at open, not a SIGBUS at a write.
//! What the lock cannot stop: a process that ignores it and truncates the file while a map of
//! it is in use makes the next read of a vanished page fault with SIGBUS (as with any mmap).

use crate::buffer::AlignedBuf;
use crate::dtype::{DType, FP8_BLOCK};
use crate::error::{EngramError, Result};
use crate::safetensors::{self, TensorInfo};

mod create;
pub mod shared;
pub use create::Init;
use memmap2::{MmapOptions, MmapRaw};
use rayon::prelude::*;
pub use shared::{Lease, SharedTable};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where a table's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A shared map of the file: lazy, served from the page cache, larger-than-RAM capable.
    Mmap,
    /// A private copy in anonymous memory, advised for huge pages and prefaulted.
    Resident,
    /// A caller-owned buffer (numpy array, torch tensor) wrapped without copying.
    External,
    /// Hot rows resident, the others read from the file by the gathers that need them.
    Tiered,
}

impl Mode {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "mmap" => Ok(Mode::Mmap),
            "resident" => Ok(Mode::Resident),
            "tiered" => Ok(Mode::Tiered),
            other => Err(EngramError::Invalid(format!(
                "unknown mode {other:?}: use \"mmap\" (page cache, tables larger than RAM), \
                 \"resident\" (copied into huge-page memory) or \"tiered\" (hot rows in \
                 memory, the others read from disk)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Mmap => "mmap",
            Mode::Resident => "resident",
            Mode::External => "external",
            Mode::Tiered => "tiered",
        }
    }
}

/// Owns the memory `HostTable`'s pointers point into (read through those pointers only).
enum Storage {
    Mmap(MmapRaw),
    Resident(AlignedBuf),
    External,
    Tiered(Box<tiered::Tiered>),
}

/// The open (and locked) file of a file-backed table, and where its tensors lie in it.
#[derive(Debug)]
struct Backing {
    path: PathBuf,
    /// The descriptor the header was read from; its lock lasts as long as the table.
    file: File,
    values: (usize, usize),
    scales: Option<(usize, usize)>,
}

/// A table of `rows` rows of `dim` values.
pub struct HostTable {
    storage: Storage,
    values: *mut u8,
    scales: *mut u8,
    pub rows: usize,
    pub dim: usize,
    pub dtype: DType,
    pub mode: Mode,
    writable: bool,
    file: Option<Backing>,
}

impl std::fmt::Debug for HostTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTable")
            .field("rows", &self.rows)
            .field("dim", &self.dim)
            .field("dtype", &self.dtype)
            .field("mode", &self.mode)
            .field("writable", &self.writable)
            .field("path", &self.path())
            .finish()
    }
}

// SAFETY: the table only hands out its pointers to kernels that read rows, or write them
// through `&mut self`; the memory is owned by `storage` (or, for `External`, kept alive by the
// caller of `from_raw` for the table's whole life).
unsafe impl Send for HostTable {}
// SAFETY: see `Send`; shared access only reads.
unsafe impl Sync for HostTable {}

mod file;
mod layout;
mod open;
pub mod tiered;
use file::lock;
pub use layout::{ranges_overlap, table_bytes};
pub use tiered::TierStats;

impl HostTable {
    /// Bytes of one row's values.
    pub fn row_bytes(&self) -> usize {
        self.dim * self.dtype.size()
    }

    /// Scale bytes per row (FP8 only, else 0).
    pub fn scale_bytes(&self) -> usize {
        if self.dtype == DType::F8E4M3 {
            self.dim / FP8_BLOCK
        } else {
            0
        }
    }

    /// The stored bytes of rows `start..start + count`: their values and (FP8) their scales,
    /// exactly as in the table (a checkpoint copies them).
    pub fn raw_rows(&self, start: usize, count: usize) -> Result<(&[u8], &[u8])> {
        self.refuse_tiered("reading raw rows")?;
        let end = start
            .checked_add(count)
            .filter(|&e| e <= self.rows)
            .ok_or_else(|| {
                EngramError::Invalid(format!(
                    "rows {start}..{start}+{count} are outside the table's {} rows",
                    self.rows
                ))
            })?;
        let (rb, sb) = (self.row_bytes(), self.scale_bytes());
        self.will_need(start, end);
        // SAFETY: `values` holds `rows * row_bytes` bytes and `scales` `rows * scale_bytes`
        // (checked when the table was made), and `start..end` lies within `0..rows`; writers
        // need `&mut self`, so nothing writes these bytes while the slices live.
        let values =
            unsafe { std::slice::from_raw_parts(self.values.add(start * rb), (end - start) * rb) };
        let scales = if sb == 0 {
            &[][..]
        } else {
            // SAFETY: as above, for the scales.
            unsafe { std::slice::from_raw_parts(self.scales.add(start * sb), (end - start) * sb) }
        };
        Ok((values, scales))
    }

    /// Bytes of values and scales.
    pub fn nbytes(&self) -> usize {
        self.rows * (self.row_bytes() + self.scale_bytes())
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Row `r`'s value bytes.
    ///
    /// # Safety
    /// `r < self.rows`.
    #[inline(always)]
    pub unsafe fn row_ptr(&self, r: usize) -> *const u8 {
        // SAFETY: `r < rows` (the caller's contract), so the offset stays inside the values.
        unsafe { self.values.add(r * self.row_bytes()) }
    }

    /// Row `r`'s scale bytes (FP8 tables).
    ///
    /// # Safety
    /// `r < self.rows` and the table is FP8.
    #[inline(always)]
    pub unsafe fn scale_ptr(&self, r: usize) -> *const u8 {
        // SAFETY: `r < rows` of an FP8 table (the caller's contract): inside the scales.
        unsafe { self.scales.add(r * self.scale_bytes()) }
    }

    /// Whether `len` bytes at `ptr` share any byte with this table's values or scales.
    pub fn overlaps(&self, ptr: *const u8, len: usize) -> bool {
        if let Some(t) = self.tiered() {
            return t.hot.overlaps(ptr, len);
        }
        ranges_overlap(ptr, len, self.values, self.rows * self.row_bytes())
            || ranges_overlap(ptr, len, self.scales, self.rows * self.scale_bytes())
    }

    /// Wraps caller memory without copying.
    ///
    /// # Safety
    /// `values` must hold `rows * dim * dtype.size()` bytes (and `scales`, for FP8,
    /// `rows * dim / 32`) that stay valid, and are not written by anyone else while a gather
    /// runs, for the table's whole life; `writable` only if that memory may be written.
    pub unsafe fn from_raw(
        values: *mut u8,
        scales: *mut u8,
        rows: usize,
        dim: usize,
        dtype: DType,
        writable: bool,
    ) -> Result<Self> {
        table_bytes(dtype, rows, dim)?;
        Ok(Self {
            storage: Storage::External,
            values,
            scales,
            rows,
            dim,
            dtype,
            mode: Mode::External,
            writable,
            file: None,
        })
    }

    /// Asks the kernel to read rows `start..end` of a mapped table ahead (the map is advised
    /// random: a sequential copy would otherwise fault in one page at a time).
    fn will_need(&self, start: usize, end: usize) {
        if !matches!(self.storage, Storage::Mmap(_)) || start >= end {
            return;
        }
        let page = 4096usize;
        for (base, unit) in [
            (self.values as usize, self.row_bytes()),
            (self.scales as usize, self.scale_bytes()),
        ] {
            if base == 0 || unit == 0 {
                continue;
            }
            let (a, b) = (base + start * unit, base + end * unit);
            let lo = a / page * page;
            // SAFETY: the range covers pages of the map that hold rows `start..end` (inside the
            // table); madvise is only a hint.
            unsafe { libc::madvise(lo as *mut libc::c_void, b - lo, libc::MADV_WILLNEED) };
        }
    }

    /// Overwrites rows `idx[i]` with `values[i]` (`dim` values of the table's dtype, and
    /// `scales[i]` for FP8). Indices are all checked before anything is written. Sources that
    /// overlap the table's own memory are copied first, so the result is as if every source row
    /// had been read before any row was written (numpy's rule for `a[idx] = a[...]`).
    pub fn write_rows(&mut self, idx: &[i64], values: &[u8], scales: &[u8]) -> Result<()> {
        self.refuse_tiered("writing rows")?;
        if !self.writable {
            return Err(EngramError::ReadOnly(format!(
                "this {} table is read-only: open it writable (and a writable file or \
                 array) to write rows",
                self.mode.name()
            )));
        }
        let (rb, sb) = (self.row_bytes(), self.scale_bytes());
        let want = |per_row: usize| idx.len().checked_mul(per_row);
        if want(rb) != Some(values.len()) || want(sb) != Some(scales.len()) {
            return Err(EngramError::Invalid(format!(
                "write_rows needs {} rows of {} {} values ({rb} bytes each), got {} value bytes{}",
                idx.len(),
                self.dim,
                self.dtype.name(),
                values.len(),
                if sb > 0 {
                    format!(
                        ", and {sb} UE8M0 scale bytes per row ([n, dim // 32] uint8), got {} \
                         scale bytes",
                        scales.len()
                    )
                } else {
                    String::new()
                },
            )));
        }
        if let Some(pos) = idx.iter().position(|&r| r < 0 || r as usize >= self.rows) {
            return Err(EngramError::IndexOutOfRange {
                value: idx[pos] as i128,
                index: pos,
                rows: self.rows,
            });
        }
        // Dense writes (a checkpoint's blocks of rows): their pages read ahead.
        if let (Some(&lo), Some(&hi)) = (idx.iter().min(), idx.iter().max()) {
            if ((hi - lo) as usize) < 4 * idx.len() {
                self.will_need(lo as usize, hi as usize + 1);
            }
        }
        if self.overlaps(values.as_ptr(), values.len())
            || self.overlaps(scales.as_ptr(), scales.len())
        {
            let copy = |src: &[u8]| -> Result<Vec<u8>> {
                let mut v = Vec::new();
                v.try_reserve_exact(src.len())
                    .map_err(|_| EngramError::OutOfMemory {
                        bytes: src.len(),
                        what: "a copy of rows that overlap the table".into(),
                        hint: "write fewer rows at a time".into(),
                    })?;
                v.extend_from_slice(src);
                Ok(v)
            };
            let (values, scales) = (copy(values)?, copy(scales)?);
            return self.write_rows(idx, &values, &scales);
        }
        for (i, &r) in idx.iter().enumerate() {
            // SAFETY: r < rows (checked above) and the table is writable, so its memory may be
            // written; `&mut self` excludes concurrent gathers through this table. The sources
            // do not overlap the table (checked above), but `copy` is used anyway.
            unsafe {
                std::ptr::copy(
                    values.as_ptr().add(i * rb),
                    self.values.add(r as usize * rb),
                    rb,
                );
                if sb > 0 {
                    std::ptr::copy(
                        scales.as_ptr().add(i * sb),
                        self.scales.add(r as usize * sb),
                        sb,
                    );
                }
            }
        }
        Ok(())
    }

    /// Makes written rows durable: msync for a mapped file, a write-back of the copy for a
    /// resident table opened writable (through the descriptor opened at `open`, so a file
    /// that replaced the path meanwhile is never written), the journaled write-back of the
    /// rows changed since the last flush for a tiered one; nothing for external memory.
    pub fn flush(&self) -> Result<()> {
        match (&self.storage, &self.file) {
            (Storage::Mmap(map), Some(f)) if self.writable => {
                map.flush().map_err(|e| EngramError::io(&f.path, e))
            }
            (Storage::Resident(copy), Some(f)) if self.writable => {
                // The copy holds the values, then the scales, back to back.
                let put = |(start, end): (usize, usize), at: usize| -> Result<()> {
                    // SAFETY: the resident copy holds the values' and the scales' bytes; the
                    // range [at, at + end - start) is one of them.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(copy.as_ptr().add(at), end - start) };
                    f.file
                        .write_all_at(bytes, start as u64)
                        .map_err(|e| EngramError::io(&f.path, e))
                };
                put(f.values, 0)?;
                if let Some(s) = f.scales {
                    put(s, f.values.1 - f.values.0)?;
                }
                f.file.sync_data().map_err(|e| EngramError::io(&f.path, e))
            }
            (Storage::Tiered(t), _) => t.flush(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
