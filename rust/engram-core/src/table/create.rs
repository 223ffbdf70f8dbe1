//! Creating a table file: the initial values (reproducible whatever the thread count), the
//! atomic write through a uniquely named temporary file, and what is left on failure (nothing).

use super::{lock, table_bytes, HostTable, Mode};
use crate::dtype::{self, DType, FP8_BLOCK};
use crate::error::{EngramError, Result};
use crate::safetensors;
use memmap2::MmapOptions;
use rayon::prelude::*;
use serde_json::Map;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

impl Init {
    /// The init called `name` ("normal" with `std` and `seed`, or "zeros").
    pub fn parse(name: &str, std: f32, seed: u64) -> Result<Self> {
        match name {
            "zeros" => Ok(Init::Zeros),
            "normal" if std.is_finite() && std >= 0.0 => Ok(Init::Normal { std, seed }),
            "normal" => Err(EngramError::Invalid(format!(
                "std must be a finite number >= 0, got {std}"
            ))),
            other => Err(EngramError::Invalid(format!(
                "unknown init {other:?}: use \"normal\" (with std, seed) or \"zeros\""
            ))),
        }
    }
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
    /// Creates a table file atomically and opens it (writable, mmap). The file is written as
    /// `<path>.tmp-<pid>-<n>-<hex>` in the same directory (blocks reserved first, so a full
    /// disk is an error, not a SIGBUS), synced, and renamed over `path`; the temporary file is
    /// removed on every error, and is left behind only if the process is killed meanwhile.
    /// `progress` is called now and then, from the worker threads, with the rows initialised so
    /// far; an error from it stops the creation (nothing is left behind) and is returned.
    pub fn create(
        path: &Path,
        rows: usize,
        dim: usize,
        dtype: DType,
        init: Init,
        name: &str,
        progress: Option<&(dyn Fn(usize) -> Result<()> + Sync)>,
    ) -> Result<Self> {
        // Every argument is checked before the temporary file exists; `path` is only replaced
        // by a complete, readable table.
        check_tensor_name(name)?;
        let (vbytes, sbytes) = table_bytes(dtype, rows, dim)?;
        let scale_name = format!("{name}_scale");
        let mut tensors = vec![(name, dtype.safetensors_name(), vec![rows, dim])];
        if dtype == DType::F8E4M3 {
            tensors.push((scale_name.as_str(), "F8_E8M0", vec![rows, dim / FP8_BLOCK]));
        }
        let mut meta = Map::new();
        meta.insert("format".into(), "engram_rs".into());
        let (header, offsets) = safetensors::build_header(&tensors, &meta)?;
        let (row_bytes, scale_bytes) = (dim * dtype.size(), sbytes / rows.max(1));
        let data_len = vbytes + sbytes;
        let tmp = TempFile::new(path)?;
        let file = match safetensors::create_reserved(&tmp.path, &header, data_len) {
            Ok(f) => f,
            Err(EngramError::Io { kind, .. }) if kind == std::io::ErrorKind::AlreadyExists => {
                let message = format!(
                    "the temporary file {} already exists: try again",
                    tmp.path.display()
                );
                tmp.renamed(); // not ours: leave it alone
                return Err(EngramError::Io {
                    path: path.display().to_string(),
                    kind,
                    message,
                });
            }
            // Name the table the caller asked for (a full disk, say), and the temporary file.
            Err(EngramError::Io { kind, message, .. }) => {
                return Err(EngramError::Io {
                    path: path.display().to_string(),
                    kind,
                    message: format!(
                        "{message} (while writing the temporary file {})",
                        tmp.path.display()
                    ),
                })
            }
            Err(e) => return Err(e),
        };
        // Nobody else knows the temporary name, so this cannot conflict; the lock carries over
        // to the table, which keeps this descriptor.
        lock(&file, &tmp.path, true)?;
        if data_len > 0 {
            // The map is private to this function and dropped before the rename; every page
            // of it has its blocks reserved, so writes cannot fault on a full disk.
            let map = MmapOptions::new()
                .map_raw(&file)
                .map_err(|e| EngramError::io(&tmp.path, e))?;
            if map.len() < header.len() + data_len {
                return Err(EngramError::Internal(format!(
                    "{} maps {} bytes, {} expected",
                    tmp.path.display(),
                    map.len(),
                    header.len() + data_len
                )));
            }
            let base = map.as_mut_ptr() as usize + header.len();
            let scales_at = base + offsets.get(1).copied().unwrap_or(0);
            const ROWS: usize = 4096;
            let done = AtomicU64::new(0);
            let stopped: std::sync::Mutex<Option<EngramError>> = std::sync::Mutex::new(None);
            (0..rows.div_ceil(ROWS)).into_par_iter().for_each(|block| {
                if stopped.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                    return;
                }
                let mut vals = vec![0f32; dim];
                let (a, b) = (block * ROWS, ((block + 1) * ROWS).min(rows));
                for r in a..b {
                    init_row(init, r, &mut vals);
                    // SAFETY: row r's bytes lie inside the map (its length is checked above);
                    // blocks of rows are disjoint.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut((base + r * row_bytes) as *mut u8, row_bytes)
                    };
                    if dtype == DType::F8E4M3 {
                        // SAFETY: as for the values: row r's scales, inside the map, disjoint.
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
                let total = done.fetch_add((b - a) as u64, Ordering::Relaxed) as usize + b - a;
                if let Some(Err(e)) = progress.map(|p| p(total)) {
                    stopped
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
            });
            if let Some(e) = stopped.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(e);
            }
            map.flush().map_err(|e| EngramError::io(&tmp.path, e))?;
        }
        file.sync_all().map_err(|e| EngramError::io(&tmp.path, e))?;
        std::fs::rename(&tmp.path, path).map_err(|e| EngramError::io(path, e))?;
        tmp.renamed();
        sync_parent(path);
        let scales = (dtype == DType::F8E4M3).then_some(scale_name.as_str());
        Self::open_file(file, path, Some(name), scales, Mode::Mmap, true)
    }
}

/// A tensor name a safetensors file can hold: not empty and not the header's reserved
/// `__metadata__` key (a table of that name could never be opened again).
fn check_tensor_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "__metadata__" {
        return Err(EngramError::Invalid(format!(
            "name = {name:?} cannot name a table: safetensors reserves \"__metadata__\" and \
             needs a non-empty name; pass another name (the default is \"weight\")"
        )));
    }
    Ok(())
}

/// A temporary file beside the target, removed when dropped unless it was renamed.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    /// A name no other thread or process uses: `<name>.tmp-<pid>-<counter>-<time and address
    /// bits>`; fails if the directory does not exist.
    fn new(path: &Path) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(EngramError::Io {
                path: path.display().to_string(),
                kind: std::io::ErrorKind::NotFound,
                message: format!(
                    "the directory '{}' does not exist: create it first (os.makedirs)",
                    dir.display()
                ),
            });
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let bits = nanos ^ ((&n as *const u64 as u64).rotate_left(32));
        let mut name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(format!(
            ".tmp-{}-{n}-{:08x}",
            std::process::id(),
            bits as u32
        ));
        Ok(Self {
            path: path.with_file_name(name),
            keep: false,
        })
    }

    fn renamed(mut self) {
        self.keep = true;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn sync_parent(path: &Path) {
    // Persist the rename itself; a failure here leaves a complete file, so it is not an error.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
