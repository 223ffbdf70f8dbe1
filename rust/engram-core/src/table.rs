//! Host embedding tables: rows of f32/f16/bf16, or FP8 E4M3 with UE8M0 block scales, in a
//! memory-mapped safetensors file, in resident (huge-page advised, prefaulted) memory, or in a
//! caller's buffer.

use crate::buffer::AlignedBuf;
use crate::dtype::{self, DType, FP8_BLOCK};
use crate::error::{EngramError, Result};
use crate::safetensors::{self, TensorInfo};
use memmap2::{MmapOptions, MmapRaw};
use rayon::prelude::*;
use serde_json::Map;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
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
#[allow(dead_code)]
enum Storage {
    Mmap(MmapRaw),
    Resident(AlignedBuf),
    External,
}

/// Where the values and scales of a file-backed table live in the file, to write back.
#[derive(Clone, Debug)]
struct FileRanges {
    path: PathBuf,
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
    file: Option<FileRanges>,
}

// SAFETY: the table only hands out its pointers to kernels that read rows, or write them
// through `&mut self`; the memory is owned by `storage` (or, for `External`, kept alive by the
// caller of `from_raw` for the table's whole life).
unsafe impl Send for HostTable {}
// SAFETY: see `Send`; shared access only reads.
unsafe impl Sync for HostTable {}

/// How a new table's values are initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    /// Normal(0, std), reproducible from `seed` whatever the thread count.
    Normal {
        std: f32,
        seed: u64,
    },
}

fn check_shape(dtype: DType, rows: usize, dim: usize) -> Result<()> {
    if dim == 0 {
        return Err(EngramError::Invalid("dim must be at least 1".into()));
    }
    if dtype == DType::F8E4M3 && !dim.is_multiple_of(FP8_BLOCK) {
        return Err(EngramError::Invalid(format!(
            "an FP8 table needs dim to be a multiple of {FP8_BLOCK} (one UE8M0 scale per block), \
             got {dim}"
        )));
    }
    rows.checked_mul(dim)
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| EngramError::Invalid(format!("{rows} x {dim} table is too large")))?;
    Ok(())
}

/// SplitMix64: a tiny, well-mixed generator seeded per row, so parallel init is deterministic.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

fn init_row(init: Init, row: usize, vals: &mut [f32]) {
    match init {
        Init::Zeros => vals.fill(0.0),
        Init::Normal { std, seed } => {
            let mut rng = SplitMix(seed ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            for pair in vals.chunks_mut(2) {
                // Box-Muller: two normals from two uniforms.
                let (u, v) = (rng.unit(), rng.unit());
                let r = (-2.0 * u.ln()).sqrt();
                let t = std::f64::consts::TAU * v;
                pair[0] = (r * t.cos()) as f32 * std;
                if pair.len() > 1 {
                    pair[1] = (r * t.sin()) as f32 * std;
                }
            }
        }
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
        self.values.add(r * self.row_bytes())
    }

    /// Row `r`'s scale bytes (FP8 tables).
    ///
    /// # Safety
    /// `r < self.rows` and the table is FP8.
    #[inline(always)]
    pub unsafe fn scale_ptr(&self, r: usize) -> *const u8 {
        self.scales.add(r * self.scale_bytes())
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
        check_shape(dtype, rows, dim)?;
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
    pub fn open(
        path: &Path,
        name: Option<&str>,
        scales: Option<&str>,
        mode: Mode,
        writable: bool,
    ) -> Result<Self> {
        let (tensors, _) = safetensors::read_header(path)?;
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
        check_shape(dtype, rows, dim)?;
        let scale_info = match (dtype, scales) {
            (DType::F8E4M3, None) => {
                let hint: Vec<&str> = tensors
                    .iter()
                    .filter(|t| t.shape == [rows, dim / FP8_BLOCK])
                    .map(|t| t.name.as_str())
                    .collect();
                return Err(EngramError::Invalid(format!(
                    "tensor {:?} is FP8: pass scales=<name of its UE8M0 [{rows}, {}] tensor> \
                     (candidates: {hint:?})",
                    values.name,
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
        let file = File::options()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| EngramError::io(path, e))?;
        // SAFETY: the map is kept in `storage` for the table's life; other processes writing
        // the same file concurrently is outside what a table can guard against (as with numpy's
        // memmap).
        let map = if writable && mode == Mode::Mmap {
            MmapOptions::new().map_raw(&file)
        } else {
            MmapOptions::new().map_raw_read_only(&file)
        }
        .map_err(|e| EngramError::io(path, e))?;
        let ranges = FileRanges {
            path: path.to_path_buf(),
            values: (values.start, values.end),
            scales: scale_info.as_ref().map(|t| (t.start, t.end)),
        };
        let base = map.as_mut_ptr();
        let mut table = Self {
            storage: Storage::Mmap(map),
            // SAFETY: the header parser checked that both ranges lie inside the file.
            values: unsafe { base.add(values.start) },
            scales: scale_info.map_or(std::ptr::null_mut(), |t| unsafe { base.add(t.start) }),
            rows,
            dim,
            dtype,
            mode: Mode::Mmap,
            writable,
            file: Some(ranges),
        };
        if mode == Mode::Resident {
            table.make_resident();
        }
        Ok(table)
    }

    /// Copies the rows (and scales) into anonymous, huge-page advised memory; the copy runs in
    /// parallel and so also prefaults every page.
    fn make_resident(&mut self) {
        let (vbytes, sbytes) = (self.rows * self.row_bytes(), self.rows * self.scale_bytes());
        let buf = AlignedBuf::new(vbytes + sbytes);
        let dst = buf.as_ptr() as usize;
        for (src, at, len) in [
            (self.values as usize, 0, vbytes),
            (self.scales as usize, vbytes, sbytes),
        ] {
            const PIECE: usize = 4 << 20;
            (0..len.div_ceil(PIECE)).into_par_iter().for_each(|i| {
                let (a, b) = (i * PIECE, ((i + 1) * PIECE).min(len));
                // SAFETY: [a, b) lies inside the source range (values or scales, inside the map)
                // and inside its place in the new buffer; pieces are disjoint.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (src + a) as *const u8,
                        (dst + at + a) as *mut u8,
                        b - a,
                    )
                };
            });
        }
        self.values = buf.as_ptr();
        // SAFETY: the scales follow the values inside `buf`.
        self.scales = if sbytes > 0 {
            unsafe { buf.as_ptr().add(vbytes) }
        } else {
            std::ptr::null_mut()
        };
        self.storage = Storage::Resident(buf);
        self.mode = Mode::Resident;
    }

    /// Creates a table file atomically (written to a temporary file, synced, renamed over
    /// `path`) and opens it. `progress` is called with the rows initialised so far.
    pub fn create(
        path: &Path,
        rows: usize,
        dim: usize,
        dtype: DType,
        init: Init,
        name: &str,
        progress: Option<&(dyn Fn(usize) + Sync)>,
    ) -> Result<Self> {
        check_shape(dtype, rows, dim)?;
        let scale_name = format!("{name}_scale");
        let mut tensors = vec![(name, dtype.safetensors_name(), vec![rows, dim])];
        if dtype == DType::F8E4M3 {
            tensors.push((scale_name.as_str(), "F8_E8M0", vec![rows, dim / FP8_BLOCK]));
        }
        let mut meta = Map::new();
        meta.insert("format".into(), "engram_rs".into());
        let (header, offsets) = safetensors::build_header(&tensors, &meta)?;
        let (row_bytes, scale_bytes) = (
            dim * dtype.size(),
            if dtype == DType::F8E4M3 {
                dim / FP8_BLOCK
            } else {
                0
            },
        );
        let data_len = rows * (row_bytes + scale_bytes);
        let tmp = tmp_path(path);
        let result = (|| {
            let file = safetensors::create_sized(&tmp, &header, data_len)?;
            if data_len > 0 {
                // The map is private to this function and dropped before the rename.
                let map = MmapOptions::new()
                    .map_raw(&file)
                    .map_err(|e| EngramError::io(&tmp, e))?;
                let base = map.as_mut_ptr() as usize + header.len();
                let scales_at = base + offsets.get(1).copied().unwrap_or(0);
                const ROWS: usize = 4096;
                let done = std::sync::atomic::AtomicUsize::new(0);
                (0..rows.div_ceil(ROWS)).into_par_iter().for_each(|block| {
                    let mut vals = vec![0f32; dim];
                    let (a, b) = (block * ROWS, ((block + 1) * ROWS).min(rows));
                    for r in a..b {
                        init_row(init, r, &mut vals);
                        // SAFETY: row r's bytes lie inside the map; blocks are disjoint.
                        let out = unsafe {
                            std::slice::from_raw_parts_mut(
                                (base + r * row_bytes) as *mut u8,
                                row_bytes,
                            )
                        };
                        if dtype == DType::F8E4M3 {
                            let sc = unsafe {
                                std::slice::from_raw_parts_mut(
                                    (scales_at + r * scale_bytes) as *mut u8,
                                    scale_bytes,
                                )
                            };
                            dtype::quantize_row(&vals, out, sc);
                        } else {
                            dtype::f32_to_row(dtype, &vals, out);
                        }
                    }
                    let total = done.fetch_add(b - a, std::sync::atomic::Ordering::Relaxed) + b - a;
                    if let Some(p) = progress {
                        p(total);
                    }
                });
                map.flush().map_err(|e| EngramError::io(&tmp, e))?;
            }
            file.sync_all().map_err(|e| EngramError::io(&tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| EngramError::io(path, e))?;
            sync_parent(path);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        let scales = (dtype == DType::F8E4M3).then_some(scale_name.as_str());
        Self::open(path, Some(name), scales, Mode::Mmap, true)
    }

    /// Overwrites rows `idx[i]` with `values[i]` (`dim` values of the table's dtype, and
    /// `scales[i]` for FP8). Indices are all checked before anything is written.
    pub fn write_rows(&mut self, idx: &[i64], values: &[u8], scales: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(EngramError::ReadOnly(format!(
                "this {} table is read-only: open it with writable=True (and a writable file or \
                 array) to write rows",
                self.mode.name()
            )));
        }
        let (rb, sb) = (self.row_bytes(), self.scale_bytes());
        if values.len() != idx.len() * rb || scales.len() != idx.len() * sb {
            return Err(EngramError::Invalid(format!(
                "write_rows needs {} rows of {} {} values{}, got {} value bytes",
                idx.len(),
                self.dim,
                self.dtype.name(),
                if sb > 0 {
                    format!(" and {sb} scale bytes each")
                } else {
                    String::new()
                },
                values.len()
            )));
        }
        if let Some(pos) = idx.iter().position(|&r| r < 0 || r as usize >= self.rows) {
            return Err(EngramError::IndexOutOfRange {
                value: idx[pos] as i128,
                index: pos,
                rows: self.rows,
            });
        }
        for (i, &r) in idx.iter().enumerate() {
            // SAFETY: r < rows (checked above) and the table is writable, so its memory may be
            // written; `&mut self` excludes concurrent gathers through this table.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    values[i * rb..].as_ptr(),
                    self.values.add(r as usize * rb),
                    rb,
                );
                if sb > 0 {
                    std::ptr::copy_nonoverlapping(
                        scales[i * sb..].as_ptr(),
                        self.scales.add(r as usize * sb),
                        sb,
                    );
                }
            }
        }
        Ok(())
    }

    /// Makes written rows durable: msync for a mapped file, a write-back of the copy for a
    /// resident table opened writable; nothing for external memory.
    pub fn flush(&self) -> Result<()> {
        match (&self.storage, &self.file) {
            (Storage::Mmap(map), Some(f)) if self.writable => {
                map.flush().map_err(|e| EngramError::io(&f.path, e))
            }
            (Storage::Resident(_), Some(f)) if self.writable => {
                let mut file = File::options()
                    .write(true)
                    .open(&f.path)
                    .map_err(|e| EngramError::io(&f.path, e))?;
                let mut put = |(start, end): (usize, usize), src: *const u8| -> Result<()> {
                    // SAFETY: the resident copy holds exactly end - start bytes at `src`.
                    let bytes = unsafe { std::slice::from_raw_parts(src, end - start) };
                    file.seek(SeekFrom::Start(start as u64))
                        .and_then(|_| file.write_all(bytes))
                        .map_err(|e| EngramError::io(&f.path, e))
                };
                put(f.values, self.values)?;
                if let Some(s) = f.scales {
                    put(s, self.scales)?;
                }
                file.sync_all().map_err(|e| EngramError::io(&f.path, e))
            }
            _ => Ok(()),
        }
    }
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

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn sync_parent(path: &Path) {
    // Persist the rename itself; a failure here leaves a complete file, so it is not an error.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
