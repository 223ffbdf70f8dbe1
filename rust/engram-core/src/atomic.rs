//! Atomic file creation, the one way engram_rs writes a file others may read: a new temporary
//! file beside the target (the one naming rule, [`temporary_path`]), filled by the caller,
//! synced, renamed over the target, and the directory synced. A failure at any step, or a drop
//! before [`AtomicFile::commit`], removes the temporary file and leaves the target untouched;
//! only a killed process leaves one behind.

use crate::error::{EngramError, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Tries before creating a temporary file gives up (each name is new; a clash means another
/// writer picked the same random bits, or a directory full of leftovers).
const ATTEMPTS: u32 = 100;

/// The temporary name of one write of `target`: `.<name>.<12 hex digits>.tmp` in the same
/// directory (hidden, and found by a `.<name>.*.tmp` pattern when a killed run left it).
pub fn temporary_path(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Unique per process (pid, counter) and per run (clock, stack address under ASLR).
    let seed = [
        u64::from(std::process::id()),
        n,
        nanos,
        &n as *const u64 as u64,
    ];
    let bits: Vec<u8> = seed.iter().flat_map(|v| v.to_le_bytes()).collect();
    let random = xxhash_rust::xxh3::xxh3_64(&bits) & ((1 << 48) - 1);
    let mut name = std::ffi::OsString::from(".");
    name.push(target.file_name().unwrap_or_default());
    name.push(format!(".{random:012x}.tmp"));
    target.with_file_name(name)
}

/// The directory `target` is created in (`.` for a bare file name).
pub(crate) fn parent(target: &Path) -> &Path {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A new file that becomes `target` when committed, or disappears.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    tmp: Temporary,
    target: PathBuf,
}

/// The temporary file's name, removed when dropped unless it was renamed.
#[derive(Debug)]
struct Temporary {
    path: PathBuf,
    renamed: bool,
}

impl Drop for Temporary {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl AtomicFile {
    /// Creates the temporary file of `target` (read-write, never through a link, with mode
    /// 0o666 less the umask, as `open()` and numpy make files); fails if the directory does not
    /// exist.
    pub fn create(target: &Path) -> Result<Self> {
        let dir = parent(target);
        if !dir.is_dir() {
            return Err(EngramError::Io {
                path: target.display().to_string(),
                kind: std::io::ErrorKind::NotFound,
                message: format!(
                    "the directory '{}' does not exist: create it first (os.makedirs)",
                    dir.display()
                ),
            });
        }
        for _ in 0..ATTEMPTS {
            let tmp = temporary_path(target);
            // create_new is O_CREAT | O_EXCL: a link at the name is an error, never followed.
            match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok(Self {
                        file,
                        tmp: Temporary {
                            path: tmp,
                            renamed: false,
                        },
                        target: target.to_path_buf(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(EngramError::io(&tmp, e)),
            }
        }
        Err(EngramError::Io {
            path: dir.display().to_string(),
            kind: std::io::ErrorKind::AlreadyExists,
            message: format!(
                "could not create a temporary file beside {}",
                target.display()
            ),
        })
    }

    /// The temporary file, to be filled before [`commit`](Self::commit).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary file's path (for messages).
    pub fn path(&self) -> &Path {
        &self.tmp.path
    }

    /// The path the file becomes.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Syncs the file, renames it over the target and syncs the directory; returns the file,
    /// still open (and still holding any lock taken on it).
    pub fn commit(self) -> Result<File> {
        let Self {
            file,
            mut tmp,
            target,
        } = self;
        file.sync_all().map_err(|e| EngramError::io(&tmp.path, e))?;
        std::fs::rename(&tmp.path, &target).map_err(|e| EngramError::io(&target, e))?;
        tmp.renamed = true;
        // The file is complete and in place; only the rename's durability would wait on this.
        let _ = sync_path(parent(&target));
        Ok(file)
    }
}

/// `fsync` of a file or a directory by its path (a directory: its entries, after renames).
pub fn sync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| EngramError::io(path, e))
}

/// Directories of the tests of files written atomically.
#[cfg(test)]
pub(crate) mod test_dirs {
    use std::path::{Path, PathBuf};

    /// A fresh, empty directory for one test.
    pub(crate) fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("engram-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The names in `d`, sorted.
    pub(crate) fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::test_dirs::{dir, names};
    use super::*;
    use std::io::Write;

    #[test]
    fn temporary_names_follow_the_one_scheme_and_differ() {
        let a = temporary_path(Path::new("/x/state.json"));
        let b = temporary_path(Path::new("/x/state.json"));
        assert_ne!(a, b);
        for p in [a, b] {
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            let hex = name
                .strip_prefix(".state.json.")
                .and_then(|r| r.strip_suffix(".tmp"))
                .unwrap_or_else(|| panic!("{name}"));
            assert!(
                hex.len() == 12 && hex.bytes().all(|c| c.is_ascii_hexdigit()),
                "{name}"
            );
            assert_eq!(p.parent(), Some(Path::new("/x")));
        }
        let bare = temporary_path(Path::new("t.bin"));
        assert!(bare.to_str().unwrap().starts_with(".t.bin."), "{bare:?}");
    }

    #[test]
    fn commit_replaces_the_target_and_drop_leaves_it() {
        let d = dir("atomic-commit");
        let target = d.join("f.bin");
        std::fs::write(&target, b"old").unwrap();
        let mut out = AtomicFile::create(&target).unwrap();
        assert_eq!(out.path().parent(), Some(d.as_path()));
        (&out.file).write_all(b"new").unwrap();
        drop(out);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(names(&d), ["f.bin"]);
        out = AtomicFile::create(&target).unwrap();
        (&out.file).write_all(b"new").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(names(&d), ["f.bin"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_missing_directory_is_named() {
        let err = AtomicFile::create(Path::new("/nonexistent-engram/x/f.bin")).unwrap_err();
        assert!(
            matches!(&err, EngramError::Io { kind, .. } if *kind == std::io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(err.to_string().contains("create it first"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn the_mode_follows_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("atomic-mode");
        // SAFETY: umask only swaps the process's mask; restored below (tests that create files
        // concurrently see 0o027 at worst, which still lets them read their files).
        let old = unsafe { libc::umask(0o027) };
        let out = AtomicFile::create(&d.join("f")).unwrap();
        let mode = out.file().metadata().unwrap().permissions().mode() & 0o777;
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        out.commit().unwrap();
        assert_eq!(mode, 0o640);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
