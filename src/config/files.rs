//! Reading the files the configuration names (the INI file, KEY_FILE, CA_FILE, a
//! SERVICE_ACCOUNT_JSON path): only regular files, and never more than a limit per kind.
//!
//! A path may name something that reports size 0 but never ends (`/dev/zero`,
//! `/proc/self/pagemap`) or that blocks when opened (a FIFO with no writer). So:
//! - the type is checked with `stat` (following symlinks) BEFORE opening, and a FIFO, device,
//!   socket or directory is refused;
//! - the open is non-blocking (a path swapped for a FIFO after the check cannot block it either)
//!   and the opened file is checked again with `fstat`;
//! - the content is read in fixed chunks and refused as soon as it passes `limit` bytes,
//!   whatever size it reported (so at most `limit` plus one chunk is read).
//!
//! Callers turn a [`FileProblem`] into their own configuration error (naming the key and
//! the file); its text never quotes the file's content.

use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The INI file (`pcr360.ini`): 16 MiB, far above any real configuration.
pub const INI_FILE_LIMIT: u64 = 16 * 1024 * 1024;
/// The key file (`KEY_FILE`): one line of 44 (base64) or 64 (hex) characters; 4 KiB leaves
/// room for blanks and a comment-free editor's additions.
pub const KEY_FILE_LIMIT: u64 = 4 * 1024;
/// A PEM file of extra CAs (`CA_FILE`): 4 MiB (a whole system bundle is about 220 KiB).
pub const CA_FILE_LIMIT: u64 = 4 * 1024 * 1024;
/// A Google service account key file (`OAUTH.SERVICE_ACCOUNT_JSON` given as a path): 1 MiB (a
/// real one is about 2.3 KiB).
pub const SERVICE_ACCOUNT_JSON_LIMIT: u64 = 1024 * 1024;

/// Why a configured file could not be read.
#[derive(Debug)]
pub enum FileProblem {
    /// `stat`, `open` or `read` failed (missing file, no permission, ...).
    Io(io::Error),
    /// Not a regular file (after following symlinks): what it is instead.
    NotRegular(&'static str),
    /// It holds more than this many bytes.
    TooLarge(u64),
}

impl FileProblem {
    /// The I/O error kind, when the problem is an I/O error (`NotFound`, ...).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            FileProblem::Io(e) => Some(e.kind()),
            _ => None,
        }
    }
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileProblem::Io(e) => write!(f, "{e}"),
            FileProblem::NotRegular(what) => {
                write!(f, "it is not a regular file (it is {what})")
            }
            FileProblem::TooLarge(limit) => {
                write!(f, "it is larger than {} (refused)", describe_size(*limit))
            }
        }
    }
}

fn describe_size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 && bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

fn kind_of(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

/// Opens `path` for reading if it is a regular file (symlinks followed), without ever
/// blocking at the open; returns the file and its metadata (from the open file).
pub fn open_regular(path: &Path) -> Result<(File, Metadata), FileProblem> {
    let before = std::fs::metadata(path).map_err(FileProblem::Io)?;
    if let Some(what) = kind_of(&before) {
        return Err(FileProblem::NotRegular(what));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(FileProblem::Io)?;
    let meta = file.metadata().map_err(FileProblem::Io)?;
    if let Some(what) = kind_of(&meta) {
        return Err(FileProblem::NotRegular(what));
    }
    Ok((file, meta))
}

/// The size of each read: whole blocks, because some kernel files refuse reads of other sizes
/// (`/proc/self/pagemap` wants multiples of 8 bytes and says EINVAL otherwise).
const CHUNK: usize = 64 * 1024;

/// Reads `file` to its end through `keep`, refusing it as soon as more than `limit` bytes came
/// (so at most `limit` plus one chunk is ever read). Returns the number of bytes read.
fn read_chunks(
    file: &mut File,
    limit: u64,
    mut keep: impl FnMut(&[u8]),
) -> Result<u64, FileProblem> {
    let mut chunk = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = match file.read(&mut chunk) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FileProblem::Io(e)),
        };
        total += n as u64;
        if total > limit {
            return Err(FileProblem::TooLarge(limit));
        }
        keep(&chunk[..n]);
    }
}

/// Reads an open file to its end, refusing it once it exceeds `limit` bytes.
pub fn read_open_limited(file: &mut File, limit: u64) -> Result<Vec<u8>, FileProblem> {
    let mut bytes = Vec::new();
    read_chunks(file, limit, |chunk| bytes.extend_from_slice(chunk))?;
    Ok(bytes)
}

/// The whole content of the regular file `path`, at most `limit` bytes (see the module docs).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, FileProblem> {
    let (mut file, _) = open_regular(path)?;
    read_open_limited(&mut file, limit)
}

/// Checks that `path` is a regular file that ends within `limit` bytes, reading it through
/// without keeping what was read.
pub fn check_limited(path: &Path, limit: u64) -> Result<(), FileProblem> {
    let (mut file, _) = open_regular(path)?;
    read_chunks(&mut file, limit, |_| {})?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_limited(&path, 5).unwrap(), b"12345");
        assert!(check_limited(&path, 5).is_ok());
        let e = read_limited(&path, 4).unwrap_err();
        assert!(matches!(e, FileProblem::TooLarge(4)), "{e}");
        assert!(matches!(
            check_limited(&path, 4),
            Err(FileProblem::TooLarge(4))
        ));
    }

    #[test]
    fn endless_and_special_files_are_refused() {
        let e = read_limited(Path::new("/dev/zero"), 1024).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is not a regular file (it is a character device)"
        );
        let e = read_limited(Path::new("/"), 1024).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        // Reports size 0, yet never ends within the limit.
        if Path::new("/proc/self/pagemap").exists() {
            let e = read_limited(Path::new("/proc/self/pagemap"), 1024).unwrap_err();
            assert!(matches!(e, FileProblem::TooLarge(1024)), "{e}");
        }
        let e = read_limited(Path::new("/nonexistent/x"), 1024).unwrap_err();
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_limited(&fifo, 1024).unwrap_err();
        assert_eq!(e.to_string(), "it is not a regular file (it is a FIFO)");
        // A symlink to it is followed and refused too.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(matches!(
            check_limited(&link, 1024),
            Err(FileProblem::NotRegular("a FIFO"))
        ));
    }
}
