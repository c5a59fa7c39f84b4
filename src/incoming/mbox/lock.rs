//! The locks every access takes, as the delivery agents take them and in their order: the
//! dot-lock `<file>.lock`, then an `fcntl` lock on the whole file (see "Reading" in the module
//! docs).

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{with_suffix, MboxMailbox, DOTLOCK_STALE};
use crate::error::Result;

/// A dot-lock held longer than this is touched, so nobody takes it for stale (Dovecot's
/// default is 2 minutes without a change).
const DOTLOCK_REFRESH: Duration = Duration::from_secs(30);

/// Why a lock was not obtained.
pub(super) enum LockFailure {
    /// Someone else holds it past the deadline.
    Busy,
    Io(io::Error),
}

/// The dot-lock `<file>.lock`, removed when dropped (if it is still ours).
pub(super) struct DotLock {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// What we wrote into it: our pid and a token no other lock has.
    content: String,
    touched: Instant,
}

/// Which file a path named when looked at: a file that is removed and replaced by another can
/// get the same inode number, but not also the same modification time to the nanosecond.
fn same_file(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev()
        && a.ino() == b.ino()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
        && a.len() == b.len()
}

/// A name no other process or thread uses at the same time: pid, a counter and the clock.
fn unique_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}.{}.{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl DotLock {
    pub(super) fn acquire(
        path: PathBuf,
        deadline: Instant,
    ) -> std::result::Result<DotLock, LockFailure> {
        let mut pause = Duration::from_millis(20);
        loop {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
            {
                Ok(mut file) => {
                    // liblockfile writes the pid (and reads only the number); the token after
                    // it tells our lock from one another holder made at the same inode.
                    let content = format!("{} {}\n", std::process::id(), unique_token());
                    let written = file.write_all(content.as_bytes());
                    let meta = file.metadata();
                    let (dev, ino) = match (written, meta) {
                        (Ok(()), Ok(m)) => (m.dev(), m.ino()),
                        (Err(e), _) | (_, Err(e)) => {
                            let _ = fs::remove_file(&path);
                            return Err(LockFailure::Io(e));
                        }
                    };
                    return Ok(DotLock {
                        path,
                        dev,
                        ino,
                        content,
                        touched: Instant::now(),
                    });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => match fs::metadata(&path) {
                    Ok(meta) => {
                        let age = meta
                            .modified()
                            .ok()
                            .and_then(|m| SystemTime::now().duration_since(m).ok())
                            .unwrap_or_default();
                        if age > DOTLOCK_STALE && remove_stale(&path, &meta) {
                            continue;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(LockFailure::Io(e)),
                },
                Err(e) => return Err(LockFailure::Io(e)),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LockFailure::Busy);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Touches the lock when it has been held a while (long rewrites).
    pub(super) fn keep_fresh(&mut self) {
        if self.touched.elapsed() >= DOTLOCK_REFRESH {
            if let Ok(file) = OpenOptions::new().write(true).open(&self.path) {
                let _ = file.set_modified(SystemTime::now());
            }
            self.touched = Instant::now();
        }
    }

    /// Whether the file at the lock's path is still the one we created and wrote.
    fn still_ours(&self) -> bool {
        let Ok(mut file) = File::open(&self.path) else {
            return false;
        };
        let Ok(meta) = file.metadata() else {
            return false;
        };
        if meta.dev() != self.dev || meta.ino() != self.ino {
            return false;
        }
        let mut found = Vec::new();
        let limit = self.content.len() as u64 + 1;
        (&mut file).take(limit).read_to_end(&mut found).is_ok() && found == self.content.as_bytes()
    }
}

/// Removes the stale dot-lock `meta` describes, and only that one: two waiters can both find
/// it stale, and the first one's fresh lock must survive the second. The lock is first moved
/// aside under a name of our own (atomically: whatever is at `path` then is ours alone), then
/// checked to be the stale file; a fresh lock moved aside by mistake is put back. False when
/// nothing could be moved (then the caller waits as for a live lock).
fn remove_stale(path: &Path, meta: &Metadata) -> bool {
    let aside = with_suffix(path, &format!(".stale-{}", unique_token()));
    match fs::rename(path, &aside) {
        Ok(()) => {}
        // Removed by someone else meanwhile.
        Err(e) if e.kind() == ErrorKind::NotFound => return true,
        Err(_) => return false,
    }
    if fs::symlink_metadata(&aside).is_ok_and(|m| same_file(&m, meta)) {
        let _ = fs::remove_file(&aside);
        return true;
    }
    // Someone's live lock: back in place, unless yet another lock was taken meanwhile (then
    // that one stays; a hard link never replaces a file).
    let _ = fs::hard_link(&aside, path);
    let _ = fs::remove_file(&aside);
    true
}

impl Drop for DotLock {
    fn drop(&mut self) {
        if self.still_ours() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Takes an fcntl lock on the whole of `file`, waiting with a growing pause (capped at the
/// deadline) while someone else holds a conflicting one; false when the deadline passed.
pub(super) fn wait_fcntl_lock(file: &File, write: bool, deadline: Instant) -> io::Result<bool> {
    let mut pause = Duration::from_millis(10);
    loop {
        if try_fcntl_lock(file, write)? {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Tries once to take an fcntl lock on the whole of `file`; false when someone else holds a
/// conflicting one.
fn try_fcntl_lock(file: &File, write: bool) -> io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value (l_pid must be 0 for
    // open-file-description locks).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = (if write { libc::F_WRLCK } else { libc::F_RDLCK }) as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // Open-file-description locks: they conflict with the delivery agents' POSIX locks like
    // those do, but belong to this open file, so another thread of this process reading the
    // same file is locked out too and closing some other descriptor releases nothing.
    #[cfg(target_os = "linux")]
    let command = libc::F_OFD_SETLK;
    #[cfg(not(target_os = "linux"))]
    let command = libc::F_SETLK;
    // SAFETY: a valid descriptor and a pointer to a live `flock`.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), command, &lock as *const libc::flock) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) | Some(libc::EINTR) => Ok(false),
        _ => Err(e),
    }
}

/// The mbox under both locks. Dropping it releases the fcntl lock (closing the file), then
/// the dot-lock.
pub(super) struct Locked {
    /// None: the file does not exist.
    pub(super) file: Option<File>,
    pub(super) dot: DotLock,
}

impl MboxMailbox {
    /// Takes the dot-lock and the fcntl lock (a write lock and a read-write file for
    /// `write`), waiting up to the account's TIMEOUT in all.
    pub(super) fn lock(&self, write: bool) -> Result<Locked> {
        let deadline = Instant::now() + self.wait;
        let lock_path = with_suffix(&self.path, ".lock");
        let busy = |what: &str| {
            self.error(format!(
                "the mbox is locked by another program ({what}) for longer than TIMEOUT ({} s); \
                 it is read again by the next run",
                self.wait.as_secs()
            ))
        };
        let dot = match DotLock::acquire(lock_path.clone(), deadline) {
            Ok(dot) => dot,
            Err(LockFailure::Busy) => {
                return Err(busy(&format!("its lock file {}", lock_path.display())))
            }
            Err(LockFailure::Io(e)) => {
                return Err(self.error(format!(
                    "cannot create the lock file {}: {e} (the user running PHP needs write \
                     access to the mbox's directory, as mail delivery agents have; for \
                     /var/mail: the group mail)",
                    lock_path.display()
                )))
            }
        };
        let opened = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path);
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Ok(Locked { file: None, dot });
            }
            Err(e) => return Err(self.io_error("open the mbox", e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| self.io_error("read the mbox", e))?;
        if !meta.is_file() {
            return Err(self.error("not an mbox file (not a regular file)"));
        }
        match wait_fcntl_lock(&file, write, deadline) {
            Ok(true) => {}
            Ok(false) => return Err(busy("an fcntl lock on the file")),
            Err(e) => return Err(self.io_error("lock the mbox", e)),
        }
        Ok(Locked {
            file: Some(file),
            dot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dot_lock_another_holder_replaced_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desk.lock");
        let deadline = Instant::now() + Duration::from_secs(2);
        // Ours: removed when dropped.
        drop(DotLock::acquire(path.clone(), deadline).ok().unwrap());
        assert!(!path.exists());
        // Replaced meanwhile by another holder's lock at the same inode (as after a stale lock
        // was broken and the new one reused the number): that one stays.
        let ours = DotLock::acquire(path.clone(), deadline).ok().unwrap();
        fs::write(&path, "4242\n").unwrap();
        drop(ours);
        assert_eq!(fs::read_to_string(&path).unwrap(), "4242\n");
        // A stale lock is broken, and nothing is left beside it.
        let old = SystemTime::now() - DOTLOCK_STALE - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let taken = DotLock::acquire(path.clone(), deadline).ok().unwrap();
        assert_ne!(fs::read_to_string(&path).unwrap(), "4242\n");
        drop(taken);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
