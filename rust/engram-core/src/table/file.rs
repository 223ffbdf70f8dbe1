//! What a file-backed table asks of the system: advisory locks, and the memory available for
//! a resident copy.

use crate::error::{EngramError, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Takes an advisory lock on `file` (exclusive for writers), without waiting.
/// Opens a table's file for reading (and writing when `writable`), locks it (shared, or
/// exclusive when `writable`), and finishes a flush a killed process left behind (see
/// [`super::tiered::write`]).
pub(super) fn open_locked(path: &Path, writable: bool) -> Result<File> {
    let file = File::options()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| EngramError::io(path, e))?;
    lock(&file, path, writable)?;
    super::tiered::write::recover(&file, path, writable)?;
    Ok(file)
}

pub(super) fn lock(file: &File, path: &Path, exclusive: bool) -> Result<()> {
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
pub(super) fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
