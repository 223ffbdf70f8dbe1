//! Creating a table file: the initial values (reproducible whatever the thread count), the
//! atomic write (`crate::atomic`), and what is left on failure (nothing).

use super::{lock, table_bytes, HostTable, Mode};
use crate::atomic::AtomicFile;
use crate::dtype::{self, DType, FP8_BLOCK};
use crate::error::{EngramError, Result};
use crate::safetensors;
use memmap2::MmapOptions;
use rayon::prelude::*;
use serde_json::Map;
use std::path::Path;
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
    /// the temporary file of `path` ([`AtomicFile`]: blocks reserved first, so a full disk is
    /// an error, not a SIGBUS), synced, and renamed over `path`; the temporary file is removed
    /// on every error, and is left behind only if the process is killed meanwhile.
    /// `progress` is called from the worker threads with the rows initialised so far, at each
    /// new percent and at the end; an error from it stops the creation (nothing is left behind)
    /// and is returned.
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
        let tmp = AtomicFile::create(path)?;
        safetensors::start_file(&tmp, &header, data_len, "table")?;
        let file = tmp.file();
        // Nobody else knows the temporary name, so this cannot conflict; the lock carries over
        // to the table, which keeps this descriptor.
        lock(file, tmp.path(), true)?;
        if data_len > 0 {
            // The map is private to this function and dropped before the rename; every page
            // of it has its blocks reserved, so writes cannot fault on a full disk.
            let map = MmapOptions::new()
                .map_raw(file)
                .map_err(|e| EngramError::io(tmp.path(), e))?;
            if map.len() < header.len() + data_len {
                return Err(EngramError::Internal(format!(
                    "{} maps {} bytes, {} expected",
                    tmp.path().display(),
                    map.len(),
                    header.len() + data_len
                )));
            }
            let base = map.as_mut_ptr() as usize + header.len();
            let scales_at = base + offsets.get(1).copied().unwrap_or(0);
            const ROWS: usize = 4096;
            let done = AtomicU64::new(0);
            let reported = AtomicU64::new(u64::MAX);
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
                // Reported at each new percent and at the end, not at every block.
                let percent = (total as u128 * 100 / rows.max(1) as u128) as u64;
                let last = reported.swap(percent, Ordering::Relaxed);
                let due = last != percent || total == rows;
                if let Some(Err(e)) = progress.filter(|_| due).map(|p| p(total)) {
                    stopped
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
            });
            if let Some(e) = stopped.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(e);
            }
            map.flush().map_err(|e| EngramError::io(tmp.path(), e))?;
        }
        let file = tmp.commit()?;
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
