//! A defensive reader and an atomic writer of the safetensors format.
//!
//! Layout: 8 bytes little-endian header length `n`, `n` bytes of JSON (`{name: {dtype, shape,
//! data_offsets: [begin, end]}, "__metadata__": {...}}`), then the data; offsets are relative to
//! the end of the header. Nothing in a header is trusted: its size is capped, every offset must
//! lie inside the file, and the byte length must equal shape x dtype size.

use crate::error::{EngramError, Result};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::Write;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest header accepted (the format's reference implementation uses the same cap).
pub const MAX_HEADER: u64 = 100 << 20;

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// Bytes per element of a safetensors dtype name, if known.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

fn corrupt(path: &Path, what: String) -> EngramError {
    EngramError::Format(format!(
        "{} is not a valid safetensors file: {what}",
        path.display()
    ))
}

/// Reads and validates the header of an open safetensors file (`path` only names it in
/// messages). The length is taken from the descriptor, so the header and a later map of the
/// same descriptor describe one file even if the path is replaced meanwhile.
pub fn read_header(file: &File, path: &Path) -> Result<(Vec<TensorInfo>, Map<String, Value>)> {
    let file_len = file.metadata().map_err(|e| EngramError::io(path, e))?.len();
    parse_header(path, file_len, |at, buf| file.read_exact_at(buf, at))
}

/// Validates a header read through `read_at(offset, buf)` from a file of `file_len` bytes:
/// every size is computed with checked arithmetic, every tensor must lie inside the file, and
/// no two non-empty tensors may share a byte.
pub fn parse_header(
    path: &Path,
    file_len: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<(Vec<TensorInfo>, Map<String, Value>)> {
    if file_len < 8 {
        return Err(corrupt(
            path,
            format!("{file_len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let mut len = [0u8; 8];
    read_at(0, &mut len).map_err(|e| EngramError::io(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER {
        return Err(corrupt(
            path,
            format!("header claims {header_len} bytes (limit {MAX_HEADER})"),
        ));
    }
    // header_len <= MAX_HEADER, so neither sum can wrap.
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(corrupt(
            path,
            format!("header claims {header_len} bytes but the file has {file_len} (truncated?)"),
        ));
    }
    let mut raw = vec![0u8; header_len as usize];
    read_at(8, &mut raw).map_err(|e| EngramError::io(path, e))?;
    let header: Value = serde_json::from_slice(&raw)
        .map_err(|e| corrupt(path, format!("header is not valid JSON ({e})")))?;
    let Value::Object(entries) = header else {
        return Err(corrupt(path, "header is not a JSON object".into()));
    };
    let mut metadata = Map::new();
    let mut tensors = Vec::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            if let Value::Object(m) = entry {
                metadata = m;
            }
            continue;
        }
        let bad = |what: &str| corrupt(path, format!("tensor {name:?}: {what}"));
        let dtype = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype"))?;
        let size = dtype_size(dtype).ok_or_else(|| bad(&format!("unknown dtype {dtype:?}")))?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("data_offsets must be [begin, end]"))?;
        let (begin, end) = offsets;
        let nbytes = shape
            .iter()
            .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(&format!("shape {shape:?} of {dtype} overflows 64 bits")))?;
        if begin > end || end - begin != nbytes {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] do not hold {nbytes} bytes of {dtype} {shape:?}"
            )));
        }
        let (start, stop) = match (data_start.checked_add(begin), data_start.checked_add(end)) {
            (Some(a), Some(b)) if b <= file_len => (a, b),
            _ => {
                return Err(bad(&format!(
                    "data ends at byte {} but the file has {file_len} (truncated?)",
                    data_start as u128 + end as u128
                )))
            }
        };
        // Both are at most file_len, the size of a file this process can map.
        let (Ok(start), Ok(stop)) = (usize::try_from(start), usize::try_from(stop)) else {
            return Err(bad("data lies beyond this platform's address space"));
        };
        tensors.push(TensorInfo {
            name,
            dtype: dtype.to_string(),
            shape,
            start,
            end: stop,
        });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut reach: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.end > t.start) {
        if let Some(prev) = reach.filter(|p| p.end > t.start) {
            return Err(corrupt(
                path,
                format!(
                    "tensors {:?} (bytes {}..{}) and {:?} (bytes {}..{}) overlap: each tensor \
                     needs its own bytes",
                    prev.name, prev.start, prev.end, t.name, t.start, t.end
                ),
            ));
        }
        if reach.is_none_or(|p| t.end > p.end) {
            reach = Some(t);
        }
    }
    Ok((tensors, metadata))
}

/// Serialized header (padded with spaces to a multiple of 8, as the reference writer does) for
/// tensors laid out back to back in the given order; returns it with each tensor's data offset.
pub fn build_header(
    tensors: &[(&str, &str, Vec<usize>)],
    metadata: &Map<String, Value>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), Value::Object(metadata.clone()));
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for (name, dtype, shape) in tensors {
        let size = dtype_size(dtype)
            .ok_or_else(|| EngramError::Invalid(format!("unknown safetensors dtype {dtype:?}")))?;
        let too_large = || {
            EngramError::Invalid(format!(
                "tensor {name:?} of shape {shape:?} ({dtype}) is too large to address: use \
                 fewer rows or a smaller dim"
            ))
        };
        let n = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(too_large)?;
        let next = offset.checked_add(n).ok_or_else(too_large)?;
        map.insert(
            (*name).to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, next]}),
        );
        offsets.push(offset);
        offset = next;
    }
    let mut header = serde_json::to_vec(&Value::Object(map)).expect("JSON of plain values");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    Ok((out, offsets))
}

/// Reserves the disk blocks of `file`'s first `len` bytes (extending it if shorter), so that
/// later writes through a map cannot fault on a full disk; a full disk (or a file-size limit)
/// becomes an error naming `path` and the size.
pub fn reserve(file: &File, path: &Path, len: u64) -> Result<()> {
    let Ok(len_off) = libc::off_t::try_from(len) else {
        return Err(EngramError::Invalid(format!(
            "{}: {len} bytes exceed the largest file size",
            path.display()
        )));
    };
    if len_off == 0 {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    // SAFETY: a plain system call on a descriptor this function borrows; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len_off) };
    // Elsewhere (macOS has no posix_fallocate) only the size is set; a full disk may then
    // still fault at a write through the map.
    #[cfg(not(target_os = "linux"))]
    let rc = match file.metadata().map(|m| m.len()) {
        Ok(have) if have >= len => 0,
        _ => file
            .set_len(len)
            .err()
            .map_or(0, |e| e.raw_os_error().unwrap_or(libc::EIO)),
    };
    if rc != 0 {
        let err = std::io::Error::from_raw_os_error(rc);
        return Err(EngramError::Io {
            path: path.display().to_string(),
            kind: err.kind(),
            message: format!(
                "cannot reserve {len} bytes of disk for the table ({err}): free disk space \
                 (or raise the file-size limit), or use a smaller table"
            ),
        });
    }
    Ok(())
}

/// Writes `header` into a new file `tmp` and reserves room for `data_len` bytes after it
/// (blocks allocated, so filling them through a map cannot fault); returns the file.
pub fn create_reserved(tmp: &Path, header: &[u8], data_len: usize) -> Result<File> {
    let total = header
        .len()
        .checked_add(data_len)
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            EngramError::Invalid(format!(
                "{}: a {} + {data_len} byte file is too large",
                tmp.display(),
                header.len()
            ))
        })?;
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| EngramError::io(tmp, e))?;
    file.write_all(header)
        .map_err(|e| EngramError::io(tmp, e))?;
    reserve(&file, tmp, total as u64)?;
    file.set_len(total as u64)
        .map_err(|e| EngramError::io(tmp, e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn read_header(path: &Path) -> Result<(Vec<TensorInfo>, Map<String, Value>)> {
        super::read_header(&File::open(path).unwrap(), path)
    }

    /// Parses in-memory file bytes, as `read_header` would parse the same file.
    fn parse_bytes(bytes: &[u8]) -> Result<(Vec<TensorInfo>, Map<String, Value>)> {
        parse_header(Path::new("mem"), bytes.len() as u64, |at, buf| {
            let at = at as usize;
            buf.copy_from_slice(
                bytes
                    .get(at..at + buf.len())
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        })
    }

    #[test]
    fn header_round_trip_and_defences() {
        let dir = std::env::temp_dir().join(format!("engram-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (header, offsets) = build_header(
            &[("w", "BF16", vec![3, 4]), ("s", "U8", vec![3, 1])],
            &Map::new(),
        )
        .unwrap();
        assert_eq!(offsets, [0, 24]);
        let mut bytes = header.clone();
        bytes.extend(std::iter::repeat_n(7u8, 27));
        let ok = write(&dir, "ok.safetensors", &bytes);
        let (tensors, _) = read_header(&ok).unwrap();
        assert_eq!(tensors[0].name, "w");
        assert_eq!(
            (tensors[0].start, tensors[0].end),
            (header.len(), header.len() + 24)
        );
        assert_eq!(tensors[1].shape, [3, 1]);

        let truncated = write(&dir, "t.safetensors", &bytes[..bytes.len() - 1]);
        let err = read_header(&truncated).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = read_header(&write(&dir, "h.safetensors", &huge))
            .unwrap_err()
            .to_string();
        assert!(err.contains("limit"), "{err}");
        let mut longer = bytes.clone();
        longer[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        let err = read_header(&write(&dir, "l.safetensors", &longer))
            .unwrap_err()
            .to_string();
        assert!(err.contains("but the file has"), "{err}");
        let err = read_header(&write(&dir, "s.safetensors", b"abc"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("shorter than"), "{err}");
        let mut garbage = bytes.clone();
        garbage[8] = b'#';
        let err = read_header(&write(&dir, "g.safetensors", &garbage))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file with the given header JSON (padded to a multiple of 8) and `data` zero bytes.
    fn file_of(header: &str, data: usize) -> Vec<u8> {
        let mut h = header.as_bytes().to_vec();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.resize(out.len() + data, 0);
        out
    }

    #[test]
    fn offsets_near_2_pow_64_are_refused_not_wrapped() {
        // begin + 2**64 - 8 - header wraps to a small number in unchecked arithmetic.
        let big = u64::MAX - 100;
        let h = format!(
            r#"{{"w":{{"dtype":"U8","shape":[16],"data_offsets":[{},{}]}}}}"#,
            big,
            big + 16
        );
        let err = parse_bytes(&file_of(&h, 64)).unwrap_err().to_string();
        assert!(
            err.contains("data ends at byte") && err.contains("truncated"),
            "{err}"
        );
        let h = format!(
            r#"{{"w":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}}}}"#,
            u64::MAX,
            u64::MAX
        );
        let err = parse_bytes(&file_of(&h, 64)).unwrap_err().to_string();
        assert!(err.contains("data ends at byte"), "{err}");
        let h = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{},4],"data_offsets":[0,16]}}}}"#,
            u64::MAX / 2
        );
        let err = parse_bytes(&file_of(&h, 64)).unwrap_err().to_string();
        assert!(err.contains("overflows 64 bits"), "{err}");
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let h = r#"{"w":{"dtype":"U8","shape":[4,32],"data_offsets":[0,128]},
                    "s":{"dtype":"U8","shape":[4,1],"data_offsets":[120,124]}}"#;
        let err = parse_bytes(&file_of(h, 128)).unwrap_err().to_string();
        assert!(
            err.contains(r#"tensors "w" (bytes"#) && err.contains("overlap"),
            "{err}"
        );
        // A tensor inside a larger earlier one, past a third that ends sooner.
        let h = r#"{"a":{"dtype":"U8","shape":[100],"data_offsets":[0,100]},
                    "b":{"dtype":"U8","shape":[10],"data_offsets":[10,20]},
                    "c":{"dtype":"U8","shape":[10],"data_offsets":[50,60]}}"#;
        let err = parse_bytes(&file_of(h, 100)).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
        // Empty tensors take no bytes; adjacent tensors are fine.
        let h = r#"{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},
                    "e":{"dtype":"F32","shape":[0,4],"data_offsets":[5,5]},
                    "b":{"dtype":"U8","shape":[10],"data_offsets":[10,20]}}"#;
        let (t, _) = parse_bytes(&file_of(h, 20)).unwrap();
        assert_eq!(t.len(), 3);
    }

    /// Everything an accepted header promises: ranges inside the file, sized by their shape,
    /// and disjoint.
    fn check_accepted(bytes: &[u8], tensors: &[TensorInfo]) {
        let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for t in tensors {
            assert!(data_start <= t.start, "{t:?} starts inside the header");
            assert!(t.start <= t.end && t.end <= bytes.len(), "{t:?}");
            let n = t.shape.iter().product::<usize>() * dtype_size(&t.dtype).unwrap();
            assert_eq!(t.end - t.start, n, "{t:?}");
        }
        let mut live: Vec<&TensorInfo> = tensors.iter().filter(|t| t.end > t.start).collect();
        live.sort_by_key(|t| t.start);
        for w in live.windows(2) {
            assert!(w[0].end <= w[1].start, "{:?} overlaps {:?}", w[0], w[1]);
        }
    }

    fn edgy_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..300,
            Just(u64::MAX),
            (0u64..1000).prop_map(|d| u64::MAX - d),
            (0u64..1000).prop_map(|d| (1u64 << 63) - d),
            any::<u64>(),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((t, _)) = parse_bytes(&bytes) {
                check_accepted(&bytes, &t);
            }
        }

        #[test]
        fn arbitrary_header_text_never_panics(
            text in "[{}\\[\\],:\"a-z0-9_ .-]{0,120}",
            data in 0usize..64,
        ) {
            let bytes = file_of(&text, data);
            if let Ok((t, _)) = parse_bytes(&bytes) {
                check_accepted(&bytes, &t);
            }
        }

        #[test]
        fn crafted_offsets_and_shapes_are_checked(
            dims in proptest::collection::vec(prop_oneof![3 => 0u64..20, 1 => edgy_u64()], 0..3),
            (a, b, consistent) in (edgy_u64(), edgy_u64(), any::<bool>()),
            (c, len) in (edgy_u64(), 0u64..40),
            dtypes in (0usize..4, 0usize..4),
            data in 0usize..300,
        ) {
            let names = ["U8", "F32", "BF16", "F8_E4M3"];
            let size = dtype_size(names[dtypes.0]).unwrap() as u64;
            let nbytes = dims.iter().fold(size, |acc, &d| acc.wrapping_mul(d));
            // Offsets that agree with the shape get past the size check and exercise the
            // range arithmetic.
            let b = if consistent { a.wrapping_add(nbytes) } else { b };
            let h = format!(
                r#"{{"w":{{"dtype":"{}","shape":{dims:?},"data_offsets":[{a},{b}]}},
                    "s":{{"dtype":"U8","shape":[{len}],"data_offsets":[{c},{}]}}}}"#,
                names[dtypes.0],
                if dtypes.1 == 0 { c } else { c.wrapping_add(len) },
            );
            let bytes = file_of(&h, data);
            if let Ok((t, _)) = parse_bytes(&bytes) {
                check_accepted(&bytes, &t);
            }
        }

        #[test]
        fn mutated_valid_files_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let (header, _) = build_header(
                &[("w", "F8_E4M3", vec![4, 64]), ("w_scale", "F8_E8M0", vec![4, 2])],
                &Map::new(),
            )
            .unwrap();
            let mut bytes = header;
            bytes.resize(bytes.len() + 4 * 66, 1);
            for (at, v) in edits {
                let at = at % bytes.len();
                bytes[at] = v;
            }
            if let Ok((t, _)) = parse_bytes(&bytes) {
                check_accepted(&bytes, &t);
            }
        }
    }
}
