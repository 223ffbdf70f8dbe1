//! A defensive reader and an atomic writer of the safetensors format.
//!
//! Layout: 8 bytes little-endian header length `n`, `n` bytes of JSON (`{name: {dtype, shape,
//! data_offsets: [begin, end]}, "__metadata__": {...}}`), then the data; offsets are relative to
//! the end of the header. Nothing in a header is trusted: its size is capped, every offset must
//! lie inside the file, and the byte length must equal shape x dtype size.

use crate::error::{EngramError, Result};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{Read, Write};
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

/// Reads and validates the header of a safetensors file of `file_len` bytes.
pub fn read_header(path: &Path) -> Result<(Vec<TensorInfo>, Map<String, Value>)> {
    let mut file = File::open(path).map_err(|e| EngramError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| EngramError::io(path, e))?.len();
    if file_len < 8 {
        return Err(corrupt(
            path,
            format!("{file_len} bytes, shorter than the 8-byte header length"),
        ));
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| EngramError::io(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER {
        return Err(corrupt(
            path,
            format!("header claims {header_len} bytes (limit {MAX_HEADER})"),
        ));
    }
    if 8 + header_len > file_len {
        return Err(corrupt(
            path,
            format!("header claims {header_len} bytes but the file has {file_len} (truncated?)"),
        ));
    }
    let mut raw = vec![0u8; header_len as usize];
    file.read_exact(&mut raw)
        .map_err(|e| EngramError::io(path, e))?;
    let header: Value = serde_json::from_slice(&raw)
        .map_err(|e| corrupt(path, format!("header is not valid JSON ({e})")))?;
    let Value::Object(entries) = header else {
        return Err(corrupt(path, "header is not a JSON object".into()));
    };
    let data_start = 8 + header_len as usize;
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
            .map(|d| d.as_u64().map(|d| d as usize))
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
            .ok_or_else(|| bad("shape overflows"))?;
        if begin > end || end - begin != nbytes {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] do not hold {nbytes} bytes of {dtype} {shape:?}"
            )));
        }
        if data_start as u64 + end > file_len {
            return Err(bad(&format!(
                "data ends at byte {} but the file has {file_len} (truncated?)",
                data_start as u64 + end
            )));
        }
        tensors.push(TensorInfo {
            name,
            dtype: dtype.to_string(),
            shape,
            start: data_start + begin as usize,
            end: data_start + end as usize,
        });
    }
    tensors.sort_by_key(|t| t.start);
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
        let n = shape.iter().product::<usize>() * size;
        map.insert(
            (*name).to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offsets.push(offset);
        offset += n;
    }
    let mut header = serde_json::to_vec(&Value::Object(map)).expect("JSON of plain values");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    Ok((out, offsets))
}

/// Writes `header` then leaves room for `data_len` bytes in `tmp` (a sparse file, filled by
/// the caller through a map) and returns the file.
pub fn create_sized(tmp: &Path, header: &[u8], data_len: usize) -> Result<File> {
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| EngramError::io(tmp, e))?;
    file.write_all(header)
        .map_err(|e| EngramError::io(tmp, e))?;
    file.set_len((header.len() + data_len) as u64)
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
}
