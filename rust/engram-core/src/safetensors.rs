//! The one reader and writer of the safetensors format: the checked header every table and
//! checkpoint is opened through, and the atomic writer both are created with.
//!
//! Layout: 8 bytes little-endian header length `n`, `n` bytes of JSON (`{name: {dtype, shape,
//! data_offsets: [begin, end]}, "__metadata__": {key: string}}`), then the data; offsets are
//! relative to the end of the header. Nothing in a header is trusted: its size is capped, its
//! JSON may not repeat a key or nest deeper than the parser's limit, every offset must lie inside
//! the file, the byte length must equal shape x dtype size, and no two tensors share a byte.

use crate::atomic::AtomicFile;
use crate::error::{EngramError, Result};
use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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

/// The dtype names of the format, with their bytes per element.
const DTYPES: [(&str, usize); 17] = [
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E4M3", 1),
    ("F8_E5M2", 1),
    ("F8_E8M0", 1),
    ("E8M0", 1),
    ("U16", 2),
    ("I16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("U32", 4),
    ("I32", 4),
    ("F32", 4),
    ("U64", 8),
    ("I64", 8),
    ("F64", 8),
];

/// Bytes per element of a safetensors dtype name, if known.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    DTYPES.iter().find(|(n, _)| *n == dtype).map(|&(_, s)| s)
}

/// A string as Python's `repr` writes it (the messages name tensors as Python code would).
fn py_str(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::from(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

/// A JSON value as Python's `reprlib.repr` writes the value `json.loads` gives: a long string
/// or list is cut, so a crafted header cannot make a message of megabytes.
fn py_short(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(b) => (if *b { "True" } else { "False" }).into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() > 30 => {
            let head: String = s.chars().take(13).collect();
            let tail: String = s.chars().skip(s.chars().count() - 14).collect();
            let (h, t) = (py_str(&head), py_str(&tail));
            format!("{}...{}", &h[..h.len() - 1], &t[1..])
        }
        Value::String(s) => py_str(s),
        Value::Array(a) => {
            let mut parts: Vec<String> = a.iter().take(6).map(py_short).collect();
            if a.len() > 6 {
                parts.push("...".into());
            }
            format!("[{}]", parts.join(", "))
        }
        Value::Object(m) => {
            let mut parts: Vec<String> = m
                .iter()
                .take(4)
                .map(|(k, v)| format!("{}: {}", py_short(&Value::String(k.clone())), py_short(v)))
                .collect();
            if m.len() > 4 {
                parts.push("...".into());
            }
            format!("{{{}}}", parts.join(", "))
        }
    }
}

/// The Python type name of the value `json.loads` gives for `v` ("object" for a dict).
fn py_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// A JSON value parsed as `serde_json::Value`, refusing a repeated key at any depth (which
/// `Value` would silently keep the last of); the key is left in the cell.
#[derive(Clone, Copy)]
struct Strict<'a>(&'a RefCell<Option<String>>);

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                *self.0.borrow_mut() = Some(key);
                return Err(A::Error::custom("a repeated key"));
            }
            let value = map.next_value_seed(self)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Parses untrusted header bytes; the error is the message's detail.
fn parse_json(raw: &[u8]) -> std::result::Result<Value, String> {
    let repeated = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(raw);
    let parsed = Strict(&repeated)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| {
        if let Some(key) = repeated.borrow().as_ref() {
            format!(
                "the header repeats the key {}",
                py_short(&Value::String(key.clone()))
            )
        } else if e.to_string().starts_with("recursion limit exceeded") {
            "the header is nested too deeply".into()
        } else {
            format!("header: {e}")
        }
    })
}

/// The checked header of a safetensors file: its tensors (sorted by where their bytes begin)
/// and its metadata.
pub type Header = (Vec<TensorInfo>, BTreeMap<String, String>);

/// Reads and validates the header of an open safetensors file (`path` only names it in
/// messages). The length is taken from the descriptor, so the header and a later map of the
/// same descriptor describe one file even if the path is replaced meanwhile.
pub fn read_header(file: &File, path: &Path) -> Result<Header> {
    read_header_as(file, path, "safetensors file")
}

/// [`read_header`], naming the file a `what` ("checkpoint") in the messages of a file that is
/// not one.
pub fn read_header_as(file: &File, path: &Path, what: &str) -> Result<Header> {
    let file_len = file.metadata().map_err(|e| EngramError::io(path, e))?.len();
    parse_header(path, what, file_len, |at, buf| file.read_exact_at(buf, at))
}

/// Validates a header read through `read_at(offset, buf)` from a file of `file_len` bytes:
/// every size is computed with checked arithmetic, every tensor must lie inside the file, and
/// no two non-empty tensors may share a byte. A file that is not one names itself a `what`.
pub fn parse_header(
    path: &Path,
    what: &str,
    file_len: u64,
    mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Header> {
    let not_a = |detail: String| {
        EngramError::Format(format!("{}: not a {what} ({detail})", path.display()))
    };
    if file_len < 8 {
        return Err(not_a(format!(
            "{file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut len = [0u8; 8];
    read_at(0, &mut len).map_err(|e| EngramError::io(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER {
        return Err(not_a(format!(
            "header length {header_len}, over the limit of {MAX_HEADER} bytes"
        )));
    }
    // header_len <= MAX_HEADER, so neither sum can wrap.
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(not_a(format!(
            "header length {header_len}, the file has {file_len} bytes"
        )));
    }
    let mut raw = vec![0u8; header_len as usize];
    read_at(8, &mut raw).map_err(|e| EngramError::io(path, e))?;
    let header = parse_json(&raw).map_err(not_a)?;
    let Value::Object(entries) = header else {
        return Err(not_a(format!(
            "the header is a JSON {}, not an object",
            py_kind(&header)
        )));
    };
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            let Value::Object(m) = entry else {
                return Err(not_a(format!(
                    "__metadata__ is a {}, not an object",
                    py_kind(&entry)
                )));
            };
            for (k, v) in m {
                let Value::String(v) = v else {
                    return Err(not_a(format!(
                        "__metadata__[{}] is a {}, not a string",
                        py_str(&k),
                        py_kind(&v)
                    )));
                };
                metadata.insert(k, v);
            }
            continue;
        }
        tensors.push(check_entry(path, &name, &entry, data_start, file_len)?);
    }
    tensors.sort_by_key(|t| (t.start, std::cmp::Reverse(t.end)));
    let mut reach: Option<&TensorInfo> = None;
    let rel = |t: &TensorInfo| (t.start as u64 - data_start, t.end as u64 - data_start);
    for t in tensors.iter().filter(|t| t.end > t.start) {
        if let Some(prev) = reach.filter(|p| p.end > t.start) {
            let ((a, b), (c, d)) = (rel(t), rel(prev));
            return Err(EngramError::Format(format!(
                "{}: tensor {} (bytes {a}..{b}) overlaps tensor {} (bytes {c}..{d}): the file is \
                 damaged",
                path.display(),
                py_str(&t.name),
                py_str(&prev.name),
            )));
        }
        if reach.is_none_or(|p| t.end > p.end) {
            reach = Some(t);
        }
    }
    Ok((tensors, metadata))
}

/// Checks one tensor's header entry against a file of `file_len` bytes whose data begins at
/// `data_start`.
fn check_entry(
    path: &Path,
    name: &str,
    entry: &Value,
    data_start: u64,
    file_len: u64,
) -> Result<TensorInfo> {
    let p = format!("{}: tensor {}", path.display(), py_str(name));
    let bad = |detail: String| EngramError::Format(format!("{p}{detail}"));
    if !entry.is_object() {
        return Err(bad(format!(
            ": its header entry is a {}, not an object",
            py_kind(entry)
        )));
    }
    let field = |key: &str| entry.get(key).unwrap_or(&Value::Null);
    let dtype = field("dtype")
        .as_str()
        .filter(|d| dtype_size(d).is_some())
        .ok_or_else(|| {
            let names: Vec<&str> = DTYPES.iter().map(|(n, _)| *n).collect();
            bad(format!(
                " has dtype {}, not one of {}",
                py_short(field("dtype")),
                names.join(", ")
            ))
        })?;
    let size = dtype_size(dtype).unwrap_or(1);
    let shape = field("shape")
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            bad(format!(
                ": shape must be a list of non-negative ints, got {}",
                py_short(field("shape"))
            ))
        })?;
    let (begin, end) = field("data_offsets")
        .as_array()
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
        .ok_or_else(|| {
            bad(format!(
                ": data_offsets must be two ints [begin, end], got {}",
                py_short(field("data_offsets"))
            ))
        })?;
    if begin > end {
        return Err(bad(format!(
            " (bytes {begin}..{end}) ends before it begins: the file is damaged"
        )));
    }
    let (start, stop) = match (data_start.checked_add(begin), data_start.checked_add(end)) {
        (Some(a), Some(b)) if b <= file_len => (a, b),
        _ => {
            return Err(bad(format!(
                " (bytes {begin}..{end}) ends beyond the file ({} bytes of data): the file is \
                 truncated or damaged",
                file_len - data_start
            )))
        }
    };
    let nbytes = shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| {
            bad(format!(
                " is {dtype} {shape:?}, whose size overflows 64 bits: the file is damaged"
            ))
        })?;
    if end - begin != nbytes {
        return Err(bad(format!(
            " is {dtype} {shape:?} ({nbytes} bytes), its data_offsets span {}: the file is \
             damaged",
            end - begin
        )));
    }
    // Both are at most file_len, the size of a file this process can map.
    let (Ok(start), Ok(stop)) = (usize::try_from(start), usize::try_from(stop)) else {
        return Err(bad(
            ": its data lies beyond this platform's address space".into()
        ));
    };
    Ok(TensorInfo {
        name: name.to_string(),
        dtype: dtype.to_string(),
        shape,
        start,
        end: stop,
    })
}

/// An open safetensors file with its checked header: tensors are read from the descriptor the
/// header was read from, with `pread` (a file cut short later is an error, not a SIGBUS).
#[derive(Debug)]
pub struct Reader {
    file: File,
    path: PathBuf,
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

impl Reader {
    /// Opens and checks `path`; anything but a regular file (a FIFO, a directory) is refused
    /// without blocking. A file that is not one names itself a `what` ("checkpoint").
    pub fn open(path: &Path, what: &str) -> Result<Self> {
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| EngramError::io(path, e))?;
        if !file
            .metadata()
            .map_err(|e| EngramError::io(path, e))?
            .is_file()
        {
            return Err(EngramError::Format(format!(
                "{}: not a {what} (not a regular file)",
                path.display()
            )));
        }
        let (tensors, metadata) = read_header_as(&file, path, what)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    /// `count` bytes of tensor `index` from byte `offset` of its data (allocated once the range
    /// is known to lie inside the tensor, so inside the file).
    pub fn read_vec(&self, index: usize, offset: usize, count: usize) -> Result<Vec<u8>> {
        self.tensor_range(index, offset, count)?;
        let mut buf = vec![0u8; count];
        self.read(index, offset, &mut buf)?;
        Ok(buf)
    }

    /// Reads `buf.len()` bytes of tensor `index` from byte `offset` of its data.
    pub fn read(&self, index: usize, offset: usize, buf: &mut [u8]) -> Result<()> {
        let t = self.tensor_range(index, offset, buf.len())?;
        self.file
            .read_exact_at(buf, (t.start + offset) as u64)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => EngramError::Format(format!(
                    "{}: tensor {} ends beyond the file: it was cut short while it was read \
                     (another process writing it?)",
                    self.path.display(),
                    py_str(&t.name)
                )),
                _ => EngramError::io(&self.path, e),
            })
    }

    /// Tensor `index`, if bytes `offset..offset + count` of its data exist.
    fn tensor_range(&self, index: usize, offset: usize, count: usize) -> Result<&TensorInfo> {
        let t = self.tensors.get(index).ok_or_else(|| {
            EngramError::Invalid(format!(
                "tensor index {index} is out of range: {} holds {} tensors",
                self.path.display(),
                self.tensors.len()
            ))
        })?;
        let size = t.end - t.start;
        if offset.checked_add(count).is_none_or(|e| e > size) {
            return Err(EngramError::Invalid(format!(
                "{}: bytes {offset}..+{count} of tensor {} are beyond its {size} bytes",
                self.path.display(),
                py_str(&t.name)
            )));
        }
        Ok(t)
    }
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
        if *name == "__metadata__" || map.contains_key(*name) {
            return Err(EngramError::Invalid(format!(
                "tensor name {name:?} is {}: each tensor needs its own name, and \
                 \"__metadata__\" is the header's",
                if *name == "__metadata__" {
                    "reserved"
                } else {
                    "repeated"
                }
            )));
        }
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
    reserve_for(file, path, len, "table")
}

/// [`reserve`] of the file of a `what` ("table", "checkpoint"), which its message names.
pub fn reserve_for(file: &File, path: &Path, len: u64, what: &str) -> Result<()> {
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
                "cannot reserve {len} bytes of disk for the {what} ({err}): free disk space \
                 (or raise the file-size limit), or use a smaller {what}"
            ),
        });
    }
    Ok(())
}

/// Writes `header` into the new file `out` and reserves room for `data_len` bytes after it
/// (blocks allocated, so filling them through a map cannot fault). An I/O error (a full disk,
/// say) names the file of the `what` being written, and its temporary file.
pub fn start_file(out: &AtomicFile, header: &[u8], data_len: usize, what: &str) -> Result<()> {
    let tmp = out.path();
    let total = header
        .len()
        .checked_add(data_len)
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            EngramError::Invalid(format!(
                "{}: a {} + {data_len} byte file is too large",
                out.target().display(),
                header.len()
            ))
        })?;
    let mut file = out.file();
    let written = file
        .write_all(header)
        .map_err(|e| EngramError::io(tmp, e))
        .and_then(|()| reserve_for(file, tmp, total as u64, what))
        .and_then(|()| {
            file.set_len(total as u64)
                .map_err(|e| EngramError::io(tmp, e))
        });
    written.map_err(|e| in_temporary(e, out))
}

/// An I/O error on the temporary file of `out`, said of its target.
fn in_temporary(err: EngramError, out: &AtomicFile) -> EngramError {
    match err {
        EngramError::Io { kind, message, .. } => EngramError::Io {
            path: out.target().display().to_string(),
            kind,
            message: format!(
                "{message} (while writing the temporary file {})",
                out.path().display()
            ),
        },
        e => e,
    }
}

/// One tensor being written: where its bytes go and how many have come.
#[derive(Debug)]
struct Slot {
    name: String,
    at: u64,
    len: u64,
    written: u64,
}

/// A safetensors file being written atomically: the header is written and the data's blocks
/// reserved when it is created; each tensor's bytes then come in order ([`Writer::write`]), and
/// [`Writer::commit`] puts the file in place once every byte has come. Dropped before, it
/// leaves nothing.
#[derive(Debug)]
pub struct Writer {
    out: AtomicFile,
    slots: Vec<Slot>,
}

impl Writer {
    /// Starts the file `target` holding `tensors` (name, dtype, shape) back to back and
    /// `metadata`; a `what` ("checkpoint") names it in the messages of a full disk.
    pub fn create(
        target: &Path,
        tensors: &[(&str, &str, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
        what: &str,
    ) -> Result<Self> {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let (header, offsets) = build_header(tensors, &meta)?;
        let mut slots = Vec::with_capacity(tensors.len());
        let mut data_len = 0usize;
        for ((name, dtype, shape), &offset) in tensors.iter().zip(&offsets) {
            // build_header checked that every size and their sum fit in usize.
            let len = shape.iter().product::<usize>() * dtype_size(dtype).unwrap_or(1);
            slots.push(Slot {
                name: (*name).to_string(),
                at: (header.len() + offset) as u64,
                len: len as u64,
                written: 0,
            });
            data_len = offset + len;
        }
        let out = AtomicFile::create(target)?;
        start_file(&out, &header, data_len, what)?;
        Ok(Self { out, slots })
    }

    /// Appends `bytes` to tensor `index` (its bytes come in order, in any number of pieces).
    pub fn write(&mut self, index: usize, bytes: &[u8]) -> Result<()> {
        let target = self.out.target().display().to_string();
        let n = self.slots.len();
        let slot = self.slots.get_mut(index).ok_or_else(|| {
            EngramError::Invalid(format!(
                "{target}: tensor index {index} is out of range: the file holds {n} tensors"
            ))
        })?;
        let left = slot.len - slot.written;
        if bytes.len() as u64 > left {
            return Err(EngramError::Invalid(format!(
                "{target}: tensor {}: {} bytes given, {left} of its {} left to write",
                py_str(&slot.name),
                bytes.len(),
                slot.len
            )));
        }
        let wrote = self
            .out
            .file()
            .write_all_at(bytes, slot.at + slot.written)
            .map_err(|e| in_temporary(EngramError::io(self.out.path(), e), &self.out));
        wrote?;
        slot.written += bytes.len() as u64;
        Ok(())
    }

    /// Checks that every tensor's bytes have come, then syncs the file and renames it over
    /// the target.
    pub fn commit(self) -> Result<()> {
        if let Some(s) = self.slots.iter().find(|s| s.written != s.len) {
            return Err(EngramError::Invalid(format!(
                "{}: tensor {} got {} of its {} bytes: write every tensor before committing \
                 (nothing was written)",
                self.out.target().display(),
                py_str(&s.name),
                s.written,
                s.len
            )));
        }
        self.out.commit().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atomic::test_dirs::{dir, names};

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn read_header(path: &Path) -> Result<Header> {
        super::read_header(&File::open(path).unwrap(), path)
    }

    /// Parses in-memory file bytes, as `read_header` would parse the same file.
    fn parse_bytes(bytes: &[u8]) -> Result<Header> {
        parse_header(
            Path::new("mem"),
            "safetensors file",
            bytes.len() as u64,
            |at, buf| {
                let at = at as usize;
                buf.copy_from_slice(
                    bytes
                        .get(at..at + buf.len())
                        .ok_or(std::io::ErrorKind::UnexpectedEof)?,
                );
                Ok(())
            },
        )
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
        assert!(err.contains("ends beyond the file"), "{err}");
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
        assert!(err.contains("the file has"), "{err}");
        let err = read_header(&write(&dir, "s.safetensors", b"abc"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("shorter than"), "{err}");
        let mut garbage = bytes.clone();
        garbage[8] = b'#';
        let err = read_header(&write(&dir, "g.safetensors", &garbage))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a safetensors file (header: "), "{err}");
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
            err.contains("ends beyond the file") && err.contains("truncated"),
            "{err}"
        );
        let h = format!(
            r#"{{"w":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}}}}"#,
            u64::MAX,
            u64::MAX
        );
        let err = parse_bytes(&file_of(&h, 64)).unwrap_err().to_string();
        assert!(err.contains("ends beyond the file"), "{err}");
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
            err.contains("tensor 's' (bytes 120..124) overlaps tensor 'w' (bytes 0..128)"),
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

    /// The message of the header `h` (padded, with `data` zero bytes) refused.
    fn refusal(h: &str, data: usize) -> String {
        parse_bytes(&file_of(h, data)).unwrap_err().to_string()
    }

    #[test]
    fn header_json_is_checked_as_the_python_reader_did() {
        let cases = [
            (r#"{"a": 1, "a": 2}"#, "(the header repeats the key 'a')"),
            (
                r#"{"w": {"dtype": "U8", "dtype": "U8"}}"#,
                "repeats the key 'dtype'",
            ),
            ("[1, 2]", "(the header is a JSON list, not an object)"),
            (
                r#"{"__metadata__": "x"}"#,
                "(__metadata__ is a str, not an object)",
            ),
            (
                r#"{"__metadata__": {"format": 1}}"#,
                "(__metadata__['format'] is a int, not",
            ),
            ("{nope}", "not a safetensors file (header: "),
            (
                r#"{"w": [1]}"#,
                "tensor 'w': its header entry is a list, not an object",
            ),
            (
                r#"{"w": {"dtype": "C64"}}"#,
                "tensor 'w' has dtype 'C64', not one of BOOL, U8",
            ),
            (
                r#"{"w": {"shape": [1]}}"#,
                "tensor 'w' has dtype None, not one of",
            ),
            (
                r#"{"w": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 0]}}"#,
                "tensor 'w': shape must be a list of non-negative ints, got [-4]",
            ),
            (
                r#"{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0.5, 8]}}"#,
                "tensor 'w': data_offsets must be two ints [begin, end], got [0.5, 8]",
            ),
            (
                r#"{"w": {"dtype": "U8", "shape": [4], "data_offsets": [8, 4]}}"#,
                "tensor 'w' (bytes 8..4) ends before it begins",
            ),
            (
                r#"{"w": {"dtype": "F32", "shape": [4, 7], "data_offsets": [0, 128]}}"#,
                "tensor 'w' is F32 [4, 7] (112 bytes), its data_offsets span 128",
            ),
            (
                r#"{"it's": {"dtype": "U8", "shape": [4], "data_offsets": [0, 400]}}"#,
                "tensor \"it's\" (bytes 0..400) ends beyond the file (128 bytes of data)",
            ),
        ];
        for (h, want) in cases {
            let err = refusal(h, 128);
            assert!(err.contains(want), "{h}: {err}");
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(refusal(&deep, 0).contains("(the header is nested too deeply)"));
        let deep = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
        assert!(refusal(&deep, 0).contains("(the header is nested too deeply)"));
        let long = format!(r#"{{"w": {{"dtype": "{}"}}}}"#, "X".repeat(10_000));
        let err = refusal(&long, 0);
        assert!(
            err.len() < 300 && err.contains("'XXXXXXXXXXXXX...XXXXXXXXXXXXXX'"),
            "{err}"
        );
        let ok = r#"{"__metadata__": {"format": "x"}, "w": {"dtype": "U8", "shape": [2],
                    "data_offsets": [0, 2]}}"#;
        let (t, meta) = parse_bytes(&file_of(ok, 2)).unwrap();
        assert_eq!((t.len(), meta["format"].as_str()), (1, "x"));
    }

    #[test]
    fn the_writer_commits_only_complete_files() {
        let d = dir("st-writer");
        let target = d.join("ck.safetensors");
        let meta = BTreeMap::from([("format".to_string(), "x".to_string())]);
        let tensors = [
            ("b", "F32", vec![2, 2]),
            ("a", "U8", vec![3]),
            ("e", "I64", vec![0]),
        ];
        let mut w = Writer::create(&target, &tensors, &meta, "checkpoint").unwrap();
        assert_eq!(names(&d).len(), 1, "only the temporary file exists");
        w.write(0, &[1; 10]).unwrap();
        let err = w.write(0, &[1; 7]).unwrap_err().to_string();
        assert!(err.contains("7 bytes given, 6 of its 16 left"), "{err}");
        w.write(0, &[2; 6]).unwrap();
        let err = w.write(3, &[]).unwrap_err().to_string();
        assert!(err.contains("tensor index 3 is out of range"), "{err}");
        // Tensor "a" never came: nothing is committed, nothing is left.
        let err = w.commit().unwrap_err().to_string();
        assert!(err.contains("tensor 'a' got 0 of its 3 bytes"), "{err}");
        assert!(names(&d).is_empty());

        let mut w = Writer::create(&target, &tensors, &meta, "checkpoint").unwrap();
        w.write(0, &[9; 16]).unwrap();
        w.write(1, &[1, 2, 3]).unwrap();
        w.commit().unwrap();
        assert_eq!(names(&d), ["ck.safetensors"]);
        let r = Reader::open(&target, "checkpoint").unwrap();
        assert_eq!(r.metadata, meta);
        let order: Vec<_> = r.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, ["b", "a", "e"]);
        let mut buf = [0u8; 2];
        r.read(1, 1, &mut buf).unwrap();
        assert_eq!(buf, [2, 3]);
        let err = r.read(1, 2, &mut buf).unwrap_err().to_string();
        assert!(err.contains("beyond its 3 bytes"), "{err}");
        // A count beyond the tensor is refused before anything of that size is allocated.
        let err = r.read_vec(1, 0, usize::MAX).unwrap_err().to_string();
        assert!(err.contains("beyond its 3 bytes"), "{err}");
        assert_eq!(r.read_vec(0, 14, 2).unwrap(), [9, 9]);

        // Cut short after the header was checked: an error, not a short read.
        let len = std::fs::metadata(&target).unwrap().len();
        File::options()
            .write(true)
            .open(&target)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let mut buf = [0u8; 3];
        let err = r.read(1, 0, &mut buf).unwrap_err().to_string();
        assert!(
            err.contains("tensor 'a' ends beyond the file: it was cut short"),
            "{err}"
        );

        for bad in [("__metadata__", "U8", vec![1]), ("b", "U8", vec![1])] {
            let err = Writer::create(&target, &[tensors[0].clone(), bad], &meta, "checkpoint")
                .unwrap_err()
                .to_string();
            assert!(err.contains("each tensor needs its own name"), "{err}");
        }
        let err = Writer::create(&d.join("no/such"), &tensors, &meta, "checkpoint")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist: create it first"), "{err}");
        assert_eq!(names(&d), ["ck.safetensors"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_regular_files_are_opened() {
        let d = dir("st-fifo");
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain system call on a NUL-terminated path that outlives it.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for p in [&fifo, &d] {
            let err = Reader::open(p, "checkpoint").unwrap_err().to_string();
            assert!(
                err.ends_with(": not a checkpoint (not a regular file)"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
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
        fn written_files_read_back_as_written(
            specs in proptest::collection::vec(
                (0usize..17, proptest::collection::vec(0usize..5, 0..3)), 0..6),
            fill in any::<u8>(),
        ) {
            let d = std::env::temp_dir().join(format!("engram-st-prop-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            let target = d.join("p.safetensors");
            let names: Vec<String> = (0..specs.len()).map(|i| format!("t{i}")).collect();
            let tensors: Vec<(&str, &str, Vec<usize>)> = specs
                .iter()
                .zip(&names)
                .map(|((k, shape), n)| (n.as_str(), DTYPES[*k].0, shape.clone()))
                .collect();
            let mut w = Writer::create(&target, &tensors, &BTreeMap::new(), "file").unwrap();
            let mut want = Vec::new();
            for (i, (_, dtype, shape)) in tensors.iter().enumerate() {
                let n = shape.iter().product::<usize>() * dtype_size(dtype).unwrap();
                let bytes: Vec<u8> = (0..n).map(|j| fill.wrapping_add((i * 31 + j) as u8)).collect();
                // In two pieces, as a chunked writer gives them.
                w.write(i, &bytes[..n / 2]).unwrap();
                w.write(i, &bytes[n / 2..]).unwrap();
                want.push(bytes);
            }
            w.commit().unwrap();
            let r = Reader::open(&target, "file").unwrap();
            prop_assert_eq!(r.tensors.len(), tensors.len());
            let bytes = std::fs::read(&target).unwrap();
            check_accepted(&bytes, &r.tensors);
            for (i, t) in r.tensors.iter().enumerate() {
                let k: usize = t.name[1..].parse().unwrap();
                prop_assert_eq!((t.dtype.as_str(), &t.shape), (tensors[k].1, &tensors[k].2));
                let mut got = vec![0u8; t.end - t.start];
                r.read(i, 0, &mut got).unwrap();
                prop_assert_eq!(&got, &want[k]);
            }
            std::fs::remove_file(&target).unwrap();
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
