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
pub use create::Init;
use memmap2::{MmapOptions, MmapRaw};
use rayon::prelude::*;
use std::fs::File;
use std::os::fd::AsRawFd;
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
}

impl Mode {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "mmap" => Ok(Mode::Mmap),
            "resident" => Ok(Mode::Resident),
            other => Err(EngramError::Invalid(format!(
                "unknown mode {other:?}: use \"mmap\" (page cache, tables larger than RAM) or \
                 \"resident\" (copied into huge-page memory)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Mmap => "mmap",
            Mode::Resident => "resident",
            Mode::External => "external",
        }
    }
}

/// Owns the memory `HostTable`'s pointers point into (read through those pointers only).
enum Storage {
    Mmap(MmapRaw),
    Resident(AlignedBuf),
    External,
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

/// Whether byte ranges `[a, a + a_len)` and `[b, b + b_len)` share a byte (pointers are only
/// compared, never read).
pub fn ranges_overlap(a: *const u8, a_len: usize, b: *const u8, b_len: usize) -> bool {
    let (a, b) = (a as usize, b as usize);
    a_len > 0 && b_len > 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// Bytes of a table's values and of its scales, or why the shape is refused: a zero `dim`, an
/// FP8 `dim` that is not a multiple of the block, or a size beyond `isize::MAX` in total.
pub fn table_bytes(dtype: DType, rows: usize, dim: usize) -> Result<(usize, usize)> {
    if dim == 0 {
        return Err(EngramError::Invalid("dim must be at least 1".into()));
    }
    if dtype == DType::F8E4M3 && !dim.is_multiple_of(FP8_BLOCK) {
        return Err(EngramError::Invalid(format!(
            "an FP8 table needs dim to be a multiple of {FP8_BLOCK} (one UE8M0 scale byte per \
             block of {FP8_BLOCK} values), got dim={dim}: pad the rows or use another dtype"
        )));
    }
    let scale_per_row = if dtype == DType::F8E4M3 {
        dim / FP8_BLOCK
    } else {
        0
    };
    let values = rows
        .checked_mul(dim)
        .and_then(|n| n.checked_mul(dtype.size()));
    let scales = rows.checked_mul(scale_per_row);
    match (values, scales) {
        (Some(v), Some(s)) if v.checked_add(s).is_some_and(|n| n <= isize::MAX as usize) => {
            Ok((v, s))
        }
        _ => Err(EngramError::Invalid(format!(
            "a {rows} x {dim} {} table is too large: its values{} exceed the largest possible \
             allocation or file (isize::MAX = {} bytes); use fewer rows or a smaller dim",
            dtype.name(),
            if scale_per_row > 0 { " and scales" } else { "" },
            isize::MAX
        ))),
    }
}

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

    /// Opens a table stored in a safetensors file. `name` picks the values tensor (needed when
    /// the file has several candidates), `scales` the UE8M0 tensor of an FP8 table.
    ///
    /// The file stays open and locked (shared, or exclusive when `writable`) until the table
    /// is dropped; a conflicting lock is an error, not a wait.
    pub fn open(
        path: &Path,
        name: Option<&str>,
        scales: Option<&str>,
        mode: Mode,
        writable: bool,
    ) -> Result<Self> {
        let file = File::options()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| EngramError::io(path, e))?;
        lock(&file, path, writable)?;
        Self::open_file(file, path, name, scales, mode, writable)
    }

    /// Opens a table from a descriptor already opened (and locked) by the caller.
    fn open_file(
        file: File,
        path: &Path,
        name: Option<&str>,
        scales: Option<&str>,
        mode: Mode,
        writable: bool,
    ) -> Result<Self> {
        let (tensors, _) = safetensors::read_header(&file, path)?;
        let values = pick_values(path, &tensors, name)?;
        let dtype = DType::parse(&values.dtype).map_err(|_| {
            EngramError::Format(format!(
                "tensor {:?} of {} has dtype {}: tables must be F32, F16, BF16 or F8_E4M3",
                values.name,
                path.display(),
                values.dtype
            ))
        })?;
        let (rows, dim) = (values.shape[0], values.shape[1]);
        let (vbytes, sbytes) = table_bytes(dtype, rows, dim)?;
        // An FP8 table's scales are found by name when not given: `{name}_scale` (what `create`
        // writes) or `{name}_scale_inv` (DeepSeek's checkpoints), if exactly one exists.
        let found: Vec<String> = ["_scale", "_scale_inv"]
            .iter()
            .map(|suffix| format!("{}{suffix}", values.name))
            .filter(|n| tensors.iter().any(|t| &t.name == n))
            .collect();
        let scales = match (dtype, scales, found.as_slice()) {
            (DType::F8E4M3, None, [one]) => Some(one.as_str()),
            _ => scales,
        };
        let scale_info = match (dtype, scales) {
            (DType::F8E4M3, None) => {
                let hint: Vec<&str> = tensors
                    .iter()
                    .filter(|t| t.shape == [rows, dim / FP8_BLOCK])
                    .map(|t| t.name.as_str())
                    .collect();
                let n = &values.name;
                return Err(EngramError::Invalid(format!(
                    "tensor {n:?} is FP8 and no single tensor {n}_scale or {n}_scale_inv holds \
                     its scales: pass scales=<name of its UE8M0 [{rows}, {}] tensor> \
                     (candidates: {hint:?})",
                    dim / FP8_BLOCK
                )));
            }
            (DType::F8E4M3, Some(s)) => {
                let t = tensors.iter().find(|t| t.name == s).ok_or_else(|| {
                    EngramError::Invalid(format!(
                        "no tensor named {s:?} in {} (tensors: {:?})",
                        path.display(),
                        tensors.iter().map(|t| &t.name).collect::<Vec<_>>()
                    ))
                })?;
                if t.shape != [rows, dim / FP8_BLOCK]
                    || safetensors::dtype_size(&t.dtype) != Some(1)
                {
                    return Err(EngramError::Format(format!(
                        "scales tensor {s:?} is {} {:?}, expected one byte per block: \
                         [{rows}, {}] of U8/F8_E8M0",
                        t.dtype,
                        t.shape,
                        dim / FP8_BLOCK
                    )));
                }
                Some(t.clone())
            }
            (_, Some(s)) => {
                return Err(EngramError::Invalid(format!(
                    "scales={s:?} given but tensor {:?} is {}, not FP8",
                    values.name,
                    dtype.name()
                )))
            }
            (_, None) => None,
        };
        // The parser guarantees these; a table relies on them for every pointer it hands out.
        if values.end - values.start != vbytes
            || scale_info.as_ref().map_or(0, |t| t.end - t.start) != sbytes
        {
            return Err(EngramError::Internal(format!(
                "tensor sizes of {} disagree with the table shape",
                path.display()
            )));
        }
        let backing = Backing {
            path: path.to_path_buf(),
            values: (values.start, values.end),
            scales: scale_info.as_ref().map(|t| (t.start, t.end)),
            file,
        };
        if mode == Mode::Resident {
            return Self::read_resident(backing, rows, dim, dtype, writable);
        }
        let file = &backing.file;
        let file_len = file.metadata().map_err(|e| EngramError::io(path, e))?.len();
        if writable {
            // Pages of a sparse file would be allocated at the first write through the map,
            // which on a full disk is a SIGBUS; allocate them all now instead.
            safetensors::reserve(file, path, file_len)?;
        }
        // SAFETY: the map is kept in `storage` for the table's life. Writers of the same file
        // are excluded by the advisory lock held on `file` (shared, or exclusive if writable);
        // a process that ignores the lock is outside what a table can guard against (as with
        // numpy's memmap), which the module docs say.
        let map = if writable {
            MmapOptions::new().map_raw(file)
        } else {
            MmapOptions::new().map_raw_read_only(file)
        }
        .map_err(|e| EngramError::io(path, e))?;
        let ends = [Some(backing.values), backing.scales];
        if let Some((_, end)) = ends.iter().flatten().find(|(_, end)| *end > map.len()) {
            return Err(EngramError::Format(format!(
                "{} changed while it was opened: a tensor ends at byte {end} but the map has {} \
                 bytes; open it again",
                path.display(),
                map.len()
            )));
        }
        let base = map.as_mut_ptr();
        // SAFETY: both ranges lie inside the map (checked just above).
        let (values_ptr, scales_ptr) = unsafe {
            (
                base.add(backing.values.0),
                backing
                    .scales
                    .map_or(std::ptr::null_mut(), |s| base.add(s.0)),
            )
        };
        Ok(Self {
            storage: Storage::Mmap(map),
            values: values_ptr,
            scales: scales_ptr,
            rows,
            dim,
            dtype,
            mode: Mode::Mmap,
            writable,
            file: Some(backing),
        })
    }

    /// Reads the rows (and scales) into anonymous, huge-page advised memory, in parallel pieces
    /// (which also prefaults every page). Reads go through the descriptor, not a map, so a file
    /// truncated meanwhile is an I/O error rather than a SIGBUS.
    fn read_resident(
        backing: Backing,
        rows: usize,
        dim: usize,
        dtype: DType,
        writable: bool,
    ) -> Result<Self> {
        let (vbytes, sbytes) = table_bytes(dtype, rows, dim)?;
        let total = vbytes + sbytes;
        let path = backing.path.clone();
        let too_big = |hint: String| EngramError::OutOfMemory {
            bytes: total,
            what: format!("a resident copy of {}", path.display()),
            hint,
        };
        if let Some(avail) = mem_available() {
            if total as u64 > avail {
                return Err(too_big(format!(
                    "only {avail} bytes of memory are available (MemAvailable): open it with \
                     mode=\"mmap\" (served from the page cache, larger than RAM)"
                )));
            }
        }
        let buf = AlignedBuf::new(total).map_err(|_| {
            too_big("the system refused the allocation: open it with mode=\"mmap\"".into())
        })?;
        let dst = buf.as_ptr() as usize;
        let file = &backing.file;
        for ((start, _), at, len) in [
            (backing.values, 0, vbytes),
            (backing.scales.unwrap_or((0, 0)), vbytes, sbytes),
        ] {
            const PIECE: usize = 4 << 20;
            (0..len.div_ceil(PIECE))
                .into_par_iter()
                .try_for_each(|i| {
                    let (a, b) = (i * PIECE, ((i + 1) * PIECE).min(len));
                    // SAFETY: [at + a, at + b) lies inside `buf` (at + len <= total); pieces
                    // are disjoint, so no two threads write the same byte.
                    let out =
                        unsafe { std::slice::from_raw_parts_mut((dst + at + a) as *mut u8, b - a) };
                    file.read_exact_at(out, (start + a) as u64)
                })
                .map_err(|e| EngramError::io(&path, e))?;
        }
        let values = buf.as_ptr();
        let scales = if sbytes > 0 {
            // SAFETY: the scales follow the values inside `buf`.
            unsafe { buf.as_ptr().add(vbytes) }
        } else {
            std::ptr::null_mut()
        };
        Ok(Self {
            storage: Storage::Resident(buf),
            values,
            scales,
            rows,
            dim,
            dtype,
            mode: Mode::Resident,
            writable,
            file: Some(backing),
        })
    }

    /// Overwrites rows `idx[i]` with `values[i]` (`dim` values of the table's dtype, and
    /// `scales[i]` for FP8). Indices are all checked before anything is written. Sources that
    /// overlap the table's own memory are copied first, so the result is as if every source row
    /// had been read before any row was written (numpy's rule for `a[idx] = a[...]`).
    pub fn write_rows(&mut self, idx: &[i64], values: &[u8], scales: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(EngramError::ReadOnly(format!(
                "this {} table is read-only: open it with writable=True (and a writable file or \
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
    /// that replaced the path meanwhile is never written); nothing for external memory.
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
            _ => Ok(()),
        }
    }
}

/// Takes an advisory lock on `file` (exclusive for writers), without waiting.
fn lock(file: &File, path: &Path, exclusive: bool) -> Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: a plain system call on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Err(EngramError::Io {
            path: path.display().to_string(),
            kind: err.kind(),
            message: if exclusive {
                "cannot open it writable: another table (in this or another process) has it \
                 open and holds its lock; close that table first, or open this one read-only"
                    .into()
            } else {
                "cannot open it: a writable table (in this or another process) has it open and \
                 holds its exclusive lock; close that table first"
                    .into()
            },
        }),
        // File systems without flock (some network mounts): go on unlocked.
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => Ok(()),
        _ => Err(EngramError::io(path, err)),
    }
}

/// MemAvailable from /proc/meminfo, in bytes (None where it cannot be read).
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn pick_values<'a>(
    path: &Path,
    tensors: &'a [TensorInfo],
    name: Option<&str>,
) -> Result<&'a TensorInfo> {
    let names = || tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>();
    let t = match name {
        Some(n) => tensors.iter().find(|t| t.name == n).ok_or_else(|| {
            EngramError::Invalid(format!(
                "no tensor named {n:?} in {} (tensors: {:?})",
                path.display(),
                names()
            ))
        })?,
        None => {
            let candidates: Vec<&TensorInfo> = tensors
                .iter()
                .filter(|t| t.shape.len() == 2 && DType::parse(&t.dtype).is_ok())
                .collect();
            match candidates.as_slice() {
                [one] => *one,
                [] => {
                    return Err(EngramError::Format(format!(
                        "{} holds no 2-D F32/F16/BF16/F8_E4M3 tensor (tensors: {:?})",
                        path.display(),
                        names()
                    )))
                }
                _ => {
                    return Err(EngramError::Invalid(format!(
                        "{} holds several tables: pass name= one of {:?}",
                        path.display(),
                        candidates.iter().map(|t| &t.name).collect::<Vec<_>>()
                    )))
                }
            }
        }
    };
    if t.shape.len() != 2 {
        return Err(EngramError::Format(format!(
            "tensor {:?} has shape {:?}: a table must be 2-D [rows, dim]",
            t.name, t.shape
        )));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test.
    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("engram-table-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn create_with_a_reserved_name_leaves_the_existing_file() {
        let d = dir("reserved-name");
        let path = d.join("t.safetensors");
        drop(HostTable::create(&path, 4, 8, DType::F32, Init::Zeros, "weight", None).unwrap());
        let before = std::fs::read(&path).unwrap();
        for name in ["__metadata__", ""] {
            let Err(err) = HostTable::create(&path, 4, 8, DType::F32, Init::Zeros, name, None)
            else {
                panic!("{name:?} was accepted");
            };
            assert!(err.to_string().contains("cannot name a table"), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), before);
        }
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Row `r`'s value and scale bytes.
    fn row(t: &HostTable, r: usize) -> (Vec<u8>, Vec<u8>) {
        assert!(r < t.rows);
        // SAFETY: r < rows; the scales pointer is only read for FP8 tables.
        unsafe {
            let v = std::slice::from_raw_parts(t.row_ptr(r), t.row_bytes()).to_vec();
            let s = if t.scale_bytes() > 0 {
                std::slice::from_raw_parts(t.scale_ptr(r), t.scale_bytes()).to_vec()
            } else {
                Vec::new()
            };
            (v, s)
        }
    }

    fn scales_name(dt: DType) -> Option<&'static str> {
        (dt == DType::F8E4M3).then_some("weight_scale")
    }

    const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F8E4M3];

    #[test]
    fn create_open_round_trips_per_dtype_and_mode() {
        let d = dir("roundtrip");
        for dt in DTYPES {
            let path = d.join(format!("{}.safetensors", dt.name()));
            let init = Init::Normal { std: 0.02, seed: 7 };
            let t = HostTable::create(&path, 50, 64, dt, init, "weight", None).unwrap();
            assert_eq!((t.rows, t.dim, t.dtype, t.mode), (50, 64, dt, Mode::Mmap));
            assert!(t.writable());
            let rows: Vec<_> = (0..50).map(|r| row(&t, r)).collect();
            assert!(rows.iter().any(|(v, _)| v.iter().any(|&b| b != 0)));
            drop(t);
            for mode in [Mode::Mmap, Mode::Resident] {
                let r = HostTable::open(&path, None, scales_name(dt), mode, false).unwrap();
                assert_eq!((r.mode, r.writable()), (mode, false));
                for (i, expected) in rows.iter().enumerate() {
                    assert_eq!(&row(&r, i), expected, "{dt:?} {mode:?} row {i}");
                }
            }
            // The same seed gives the same table.
            let again = d.join("again.safetensors");
            let t2 = HostTable::create(&again, 50, 64, dt, init, "weight", None).unwrap();
            assert_eq!(row(&t2, 49), rows[49]);
        }
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn write_rows_flush_and_reopen() {
        let d = dir("write");
        for dt in DTYPES {
            for mode in [Mode::Mmap, Mode::Resident] {
                let path = d.join("w.safetensors");
                HostTable::create(&path, 20, 32, dt, Init::Zeros, "weight", None).unwrap();
                let mut w = HostTable::open(&path, None, scales_name(dt), mode, true).unwrap();
                let (rb, sb) = (w.row_bytes(), w.scale_bytes());
                let values: Vec<u8> = (0..2 * rb).map(|i| (i % 97) as u8 + 1).collect();
                let scales: Vec<u8> = (0..2 * sb).map(|i| 120 + i as u8).collect();
                w.write_rows(&[3, 17], &values, &scales).unwrap();
                w.flush().unwrap();
                drop(w);
                let r = HostTable::open(&path, None, scales_name(dt), Mode::Mmap, false).unwrap();
                assert_eq!(row(&r, 3), (values[..rb].to_vec(), scales[..sb].to_vec()));
                assert_eq!(row(&r, 17), (values[rb..].to_vec(), scales[sb..].to_vec()));
                assert!(row(&r, 4).0.iter().all(|&b| b == 0), "{dt:?} {mode:?}");
            }
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_writes_change_nothing() {
        let d = dir("badwrite");
        let path = d.join("t.safetensors");
        HostTable::create(&path, 4, 32, DType::F8E4M3, Init::Zeros, "weight", None).unwrap();
        let mut ro =
            HostTable::open(&path, None, scales_name(DType::F8E4M3), Mode::Mmap, false).unwrap();
        let err = ro.write_rows(&[0], &[1; 32], &[1]).unwrap_err();
        assert!(matches!(err, EngramError::ReadOnly(_)), "{err:?}");
        drop(ro);
        let mut w =
            HostTable::open(&path, None, scales_name(DType::F8E4M3), Mode::Mmap, true).unwrap();
        let err = w.write_rows(&[0], &[1; 32], &[]).unwrap_err().to_string();
        assert!(
            err.contains("1 UE8M0 scale bytes per row") && err.contains("got 0 scale bytes"),
            "{err}"
        );
        let err = w
            .write_rows(&[0, 1], &[1; 32], &[1, 1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("got 32 value bytes"), "{err}");
        let err = w.write_rows(&[1, 4], &[1; 64], &[1, 1]).unwrap_err();
        assert_eq!(
            err,
            EngramError::IndexOutOfRange {
                value: 4,
                index: 1,
                rows: 4
            }
        );
        assert!(row(&w, 1).0.iter().all(|&b| b == 0), "nothing written");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overlapping_sources_are_read_before_any_write() {
        // The numpy rule for a[[1, 2, 3]] = a[0:3]: rows 1..4 become the old rows 0..3.
        let mut mem: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let expected: Vec<f32> = [&mem[..4], &mem[..12], &mem[16..]].concat();
        let base = mem.as_mut_ptr().cast::<u8>();
        // SAFETY: `mem` holds 10 x 4 f32 and outlives the table.
        let mut t =
            unsafe { HostTable::from_raw(base, std::ptr::null_mut(), 10, 4, DType::F32, true) }
                .unwrap();
        // SAFETY: the first 3 rows of `mem`, which the table also covers.
        let src = unsafe { std::slice::from_raw_parts(base.cast_const(), 48) };
        assert!(t.overlaps(src.as_ptr(), src.len()));
        assert!(!t.overlaps(expected.as_ptr().cast(), 16));
        t.write_rows(&[1, 2, 3], src, &[]).unwrap();
        drop(t);
        assert_eq!(mem, expected);
    }

    #[test]
    fn sizes_are_checked_values_scales_and_all() {
        // Values fit in 64 bits, values + scales do not (issue: a segfault at create).
        let rows = 558_992_244_657_865_201usize;
        let err = table_bytes(DType::F8E4M3, rows, 32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("too large") && err.contains("values and scales"),
            "{err}"
        );
        let d = dir("sizes");
        let err = HostTable::create(
            &d.join("x"),
            rows,
            32,
            DType::F8E4M3,
            Init::Zeros,
            "w",
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        assert!(table_bytes(DType::F32, usize::MAX / 4, 2).is_err());
        assert!(table_bytes(DType::F32, isize::MAX as usize / 4 + 1, 1).is_err());
        assert_eq!(table_bytes(DType::F8E4M3, 3, 64).unwrap(), (192, 6));
        let err = table_bytes(DType::F8E4M3, 3, 48).unwrap_err().to_string();
        assert!(
            err.contains("multiple of 32") && err.contains("dim=48"),
            "{err}"
        );
        assert!(table_bytes(DType::BF16, 3, 0).is_err());
        // SAFETY: rows * dim overflows, so the shape is refused before any pointer is used.
        let wrapped = unsafe {
            HostTable::from_raw(
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                1 << 62,
                8,
                DType::F16,
                false,
            )
        };
        assert!(wrapped.is_err());
        assert!(
            std::fs::read_dir(&d).unwrap().next().is_none(),
            "no file left"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_headers_are_refused_at_open() {
        let d = dir("corrupt");
        let good = d.join("good.safetensors");
        HostTable::create(&good, 4, 32, DType::F8E4M3, Init::Zeros, "weight", None).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let text = String::from_utf8_lossy(&bytes[8..]).into_owned();
        // Scales that overlap the values: same length, so the header size is unchanged.
        let overlap = text.replace("\"data_offsets\":[128,132]", "\"data_offsets\":[124,128]");
        assert_ne!(overlap, text);
        let p = d.join("overlap.safetensors");
        std::fs::write(&p, [&bytes[..8], overlap.as_bytes()].concat()).unwrap();
        let err = HostTable::open(&p, None, Some("weight_scale"), Mode::Mmap, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlap"), "{err}");
        // Truncated data.
        let p = d.join("short.safetensors");
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        for mode in [Mode::Mmap, Mode::Resident] {
            let err = HostTable::open(&p, None, Some("weight_scale"), mode, false)
                .unwrap_err()
                .to_string();
            assert!(err.contains("truncated"), "{err}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn locks_exclude_writers_from_readers_and_each_other() {
        let d = dir("locks");
        let path = d.join("t.safetensors");
        let w = HostTable::create(&path, 4, 8, DType::F32, Init::Zeros, "weight", None).unwrap();
        let err = HostTable::open(&path, None, None, Mode::Mmap, false).unwrap_err();
        assert!(
            err.to_string().contains("a writable table") && err.to_string().contains("close"),
            "{err}"
        );
        drop(w);
        let r1 = HostTable::open(&path, None, None, Mode::Mmap, false).unwrap();
        let r2 = HostTable::open(&path, None, None, Mode::Resident, false).unwrap();
        let err = HostTable::open(&path, None, None, Mode::Resident, true).unwrap_err();
        assert!(err.to_string().contains("cannot open it writable"), "{err}");
        drop((r1, r2));
        HostTable::open(&path, None, None, Mode::Mmap, true).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resident_flush_writes_the_file_it_opened() {
        let d = dir("flush");
        let path = d.join("t.safetensors");
        HostTable::create(&path, 4, 8, DType::F32, Init::Zeros, "weight", None).unwrap();
        let mut w = HostTable::open(&path, None, None, Mode::Resident, true).unwrap();
        let old_inode = File::open(&path).unwrap();
        // Another writer replaces the path by rename while the table is open.
        let other = d.join("other.safetensors");
        HostTable::create(&other, 4, 8, DType::F32, Init::Zeros, "weight", None).unwrap();
        let replacement = std::fs::read(&other).unwrap();
        std::fs::rename(&other, &path).unwrap();
        w.write_rows(&[2], &[9u8; 32], &[]).unwrap();
        w.flush().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            replacement,
            "the new file is untouched"
        );
        let at = w.file.as_ref().unwrap().values.0 + 2 * 32;
        let mut got = [0u8; 32];
        old_inode.read_exact_at(&mut got, at as u64).unwrap();
        assert_eq!(got, [9u8; 32], "the rows went to the file the table opened");
        drop(w);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_creates_of_one_path_both_succeed() {
        let d = dir("concurrent");
        let path = d.join("t.safetensors");
        std::thread::scope(|s| {
            let jobs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        HostTable::create(&path, 300, 16, DType::BF16, Init::Zeros, "w", None)
                    })
                })
                .collect();
            for j in jobs {
                j.join().unwrap().unwrap();
            }
        });
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["t.safetensors"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn create_in_a_missing_directory_says_so() {
        let d = dir("missing");
        let err = HostTable::create(
            &d.join("nope/t.safetensors"),
            4,
            8,
            DType::F32,
            Init::Zeros,
            "weight",
            None,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("directory")
                && msg.contains("does not exist")
                && msg.contains("create it"),
            "{msg}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resident_open_larger_than_memory_is_refused() {
        let Some(avail) = mem_available() else {
            return; // no /proc/meminfo: nothing to compare against
        };
        let d = dir("huge");
        let path = d.join("huge.safetensors");
        let rows = (avail / 4096 + 1) as usize * 2;
        let (header, _) =
            safetensors::build_header(&[("w", "F32", vec![rows, 1024])], &serde_json::Map::new())
                .unwrap();
        let f = File::create(&path).unwrap();
        f.write_all_at(&header, 0).unwrap();
        f.set_len((header.len() + rows * 4096) as u64).unwrap(); // sparse
        drop(f);
        let err = HostTable::open(&path, None, None, Mode::Resident, false).unwrap_err();
        match &err {
            EngramError::OutOfMemory { hint, .. } => {
                assert!(hint.contains("mode=\"mmap\""), "{hint}")
            }
            other => panic!("{other:?}"),
        }
        let t = HostTable::open(&path, None, None, Mode::Mmap, false).unwrap();
        assert_eq!(t.rows, rows);
        drop(t);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
