//! Opening a table stored in a safetensors file: header checks, the map or the resident copy.

use super::file::{mem_available, open_locked};
use super::*;

impl HostTable {
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
        let file = open_locked(path, writable)?;
        Self::open_file(file, path, name, scales, mode, writable)
    }

    /// Opens a table from a descriptor already opened (and locked) by the caller.
    pub(super) fn open_file(
        file: File,
        path: &Path,
        name: Option<&str>,
        scales: Option<&str>,
        mode: Mode,
        writable: bool,
    ) -> Result<Self> {
        if mode == Mode::Tiered {
            return Err(EngramError::Invalid(
                "mode=\"tiered\" needs its hot rows: open it with HostTable.open_tiered".into(),
            ));
        }
        let (backing, rows, dim, dtype) = locate(file, path, name, scales)?;
        if mode == Mode::Resident {
            return Self::read_resident(backing, rows, dim, dtype, writable);
        }
        Self::map(backing, rows, dim, dtype, writable)
    }

    /// Maps the located tensors of `backing` (mode "mmap").
    fn map(
        backing: Backing,
        rows: usize,
        dim: usize,
        dtype: DType,
        writable: bool,
    ) -> Result<Self> {
        let path = backing.path.as_path();
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
        // Rows are looked up at random: a fault must read its page, not the read-ahead window
        // around it (8 MiB on some cloud disks, 32000 rows of disk traffic for one row).
        // Sequential copies (checkpoints) ask for their pages ahead with `will_need`.
        // SAFETY: the range is the map itself; madvise is only a hint.
        unsafe { libc::madvise(base.cast(), map.len(), libc::MADV_RANDOM) };
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
}

/// Reads the header of the (opened, locked) table file and finds its values tensor and, for
/// FP8, its scales: where they lie, the rows, dim and dtype, all checked.
pub(super) fn locate(
    file: File,
    path: &Path,
    name: Option<&str>,
    scales: Option<&str>,
) -> Result<(Backing, usize, usize, DType)> {
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
    // writes), `{name}_scale_inv` (DeepSeek-V3's checkpoints) or, for `X.weight`, `X.scale`
    // (DeepSeek-V4.1-Flash's), if exactly one exists.
    let found: Vec<String> = scale_names(&values.name)
        .into_iter()
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
                "tensor {n:?} is FP8 and no single tensor {} holds \
                     its scales: name its UE8M0 [{rows}, {}] scales tensor \
                     (candidates: {hint:?})",
                scale_names(n).join(" or "),
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
            if t.shape != [rows, dim / FP8_BLOCK] || safetensors::dtype_size(&t.dtype) != Some(1) {
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
    Ok((
        Backing {
            path: path.to_path_buf(),
            values: (values.start, values.end),
            scales: scale_info.as_ref().map(|t| (t.start, t.end)),
            file,
        },
        rows,
        dim,
        dtype,
    ))
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
                        "{} holds several tables: name one of {:?}",
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

/// The names an FP8 table `name`'s scales go by, in the order tried: `{name}_scale`,
/// `{name}_scale_inv`, and `X.scale` for a `name` of `X.weight`.
fn scale_names(name: &str) -> Vec<String> {
    let mut names = vec![format!("{name}_scale"), format!("{name}_scale_inv")];
    if let Some(stem) = name.strip_suffix(".weight") {
        names.push(format!("{stem}.scale"));
    }
    names
}
