//! The checksum of precomputed index files and their inputs: XXH3-128 over the file's bytes,
//! written as 32 lowercase hex digits prefixed `xxh3-128:` (fast enough to run beside the
//! writes: tens of GB/s, against a disk's one or two).

use crate::error::{EngramError, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use xxhash_rust::xxh3::Xxh3;

/// A streaming checksum: [`Checksum::update`] with consecutive pieces, then [`Checksum::hex`].
#[derive(Clone, Default)]
pub struct Checksum(Xxh3);

impl Checksum {
    /// An empty checksum.
    pub fn new() -> Self {
        Self(Xxh3::new())
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The checksum of everything added so far, as 16 bytes (little-endian).
    pub fn digest(&self) -> [u8; 16] {
        self.0.digest128().to_le_bytes()
    }

    /// The checksum of everything added so far, as `xxh3-128:<32 hex digits>`.
    pub fn hex(&self) -> String {
        format!("xxh3-128:{:032x}", self.0.digest128())
    }

    /// Adds `limit` bytes of the file at `path` from byte `offset` on (to the end when `None`);
    /// fails if the file is shorter.
    pub fn update_from_file(
        &mut self,
        path: &Path,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<u64> {
        let io = |e: std::io::Error| EngramError::Io {
            path: path.display().to_string(),
            kind: e.kind(),
            message: format!("cannot read it for its checksum: {e}"),
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut reader = file.take(limit.unwrap_or(u64::MAX));
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            self.update(&buf[..n]);
            done += n as u64;
        }
        if let Some(want) = limit.filter(|&w| w != done) {
            return Err(EngramError::Io {
                path: path.display().to_string(),
                kind: std::io::ErrorKind::UnexpectedEof,
                message: format!("holds {done} bytes, expected at least {want}"),
            });
        }
        Ok(done)
    }
}

/// The checksum of a whole file.
pub fn file_checksum(path: &Path) -> Result<String> {
    let mut sum = Checksum::new();
    sum.update_from_file(path, 0, None)?;
    Ok(sum.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_equal_the_whole_and_files_equal_memory() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = Checksum::new();
        whole.update(&data);
        let mut pieces = Checksum::new();
        for part in data.chunks(12_345) {
            pieces.update(part);
        }
        assert_eq!(whole.hex(), pieces.hex());
        assert_eq!(whole.hex().len(), "xxh3-128:".len() + 32);
        // The empty input's XXH3-128 (the reference implementation's published value).
        assert_eq!(
            Checksum::new().hex(),
            "xxh3-128:99aa06d3014798d86001c324468d497f"
        );
        let path = std::env::temp_dir().join(format!("engram-sum-{}", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        assert_eq!(file_checksum(&path).unwrap(), whole.hex());
        let mut head = Checksum::new();
        head.update_from_file(&path, 0, Some(1000)).unwrap();
        head.update_from_file(&path, 5000, Some(10)).unwrap();
        let mut want = Checksum::new();
        want.update(&data[..1000]);
        want.update(&data[5000..5010]);
        assert_eq!(head.hex(), want.hex());
        assert!(head.update_from_file(&path, 0, Some(1 << 30)).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
