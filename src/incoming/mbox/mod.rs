//! The MBOX mailbox: an mbox file on the web server itself (`INCOMING_PATH`), as Debian's
//! mail delivery agents (procmail, dovecot-lda, Postfix/Exim local delivery) write it.
//!
//! Reading
//! - Messages start at lines beginning with `From ` (the first line of the file must be one);
//!   `Content-Length` headers are not trusted (never used to find the next message). Lines
//!   of `>From `, `>>From `, ... are unescaped by one `>` (mboxrd). The `From ` line and the
//!   blank line that separates messages are not part of the message handed over. A first
//!   message with an `X-IMAP` header is the folder-internal pseudo message that Dovecot and
//!   c-client keep; it is never listed, moved or removed.
//! - Every access takes the locks the delivery agents take, in their order: the dot-lock
//!   `<file>.lock` (created with `O_EXCL`; one older than [`DOTLOCK_STALE`] is stale and
//!   removed, as liblockfile does, but only that file: see `remove_stale`; refreshed while
//!   held long; released only while it still holds what we wrote), then an `fcntl` lock on the
//!   whole file (read lock to read, write lock to rewrite; open-file-description locks, which
//!   conflict with the agents' POSIX locks). They are held for one short step at a time (the
//!   listing, one message's read, one rewrite), never while the host works, so deliveries
//!   go on during a run. A lock not obtained within the account's `TIMEOUT` fails the step.
//! - The file is found by its real path (symlinks resolved), so the locks are the ones the
//!   agents use. A missing file is an empty mailbox (agents create it on first delivery); a
//!   missing directory is an error.
//! - A message's id is a hash of its `From ` line, headers and body, leaving out the headers
//!   mail programs rewrite in place (`Status`, `X-Status`, `X-Keywords`, `X-UID`,
//!   `X-IMAPbase`, `Content-Length`, `Lines`), so it survives another program's rewrite of
//!   the file and our own. Byte-identical copies (the same delivery twice, `From ` line and
//!   all) have one id: they are listed once and every copy gets the action together.
//!
//! What a run costs: a mark in the state store remembers where the file's messages are all
//! done (file identity, offset, and a hash of the 4 KiB before it); a run reads from there
//! when the mark still matches, and the whole file when the file was replaced, shrunk or
//! rewritten before the mark. The ids already done after the mark are in the state store
//! (namespace [`done_namespace`]).
//!
//! PROCESSED_ACTION
//! - `seen`: the file is never written; the message is recorded as done.
//! - `delete`: the file is rewritten in place under both locks (never replaced by a renamed
//!   copy: the agents and mail readers hold it open, and the lock would be on the old file).
//!   What follows the first removed message is first written, with a header, to the journal
//!   `<file>.pcr-rewrite` (fsync, then renamed into place), then copied back and the file cut
//!   to its new length. A run that dies in between leaves the journal; the next access
//!   completes the rewrite from it, keeping whatever was delivered after the crash (it tells
//!   whether the file had been cut already from a hash of the bytes the cut removes). A
//!   message appended while a run works is after the listed ones and is always kept.
//! - `move:<folder>`: the messages are appended to the mbox file `<folder>` beside
//!   `INCOMING_PATH` (created with the mbox's mode bits and the directory's group, see
//!   `open_folder`; its own locks taken; `<folder>` is
//!   a plain file name), fsync'd, and then removed as for `delete`. A move already appended
//!   by a run that died before the removal is not appended again.
//! - Quarantine (after three failed runs) appends to the sibling mbox `PCR-Failed` the same
//!   way; with `seen` the message also stays in the mbox (it is recorded as done), with
//!   `delete` and `move:` it is removed.
//! - Skipped messages are recorded as done and left in the file.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::config::{Account, MailboxType, ProcessedAction};
use crate::error::{Error, Result};
use crate::incoming::{Download, Fetched, Flow, Listed, Mailbox};
use crate::state::StateStore;

/// The sibling mbox quarantined messages are appended to.
pub const QUARANTINE_FOLDER: &str = "PCR-Failed";
/// A dot-lock older than this is left over by a dead process (liblockfile's 5 minutes).
pub const DOTLOCK_STALE: Duration = Duration::from_secs(300);
/// A dot-lock held longer than this is touched, so nobody takes it for stale (Dovecot's
/// default is 2 minutes without a change).
const DOTLOCK_REFRESH: Duration = Duration::from_secs(30);
/// The most bytes of one line looked at (and held) at a time while scanning.
const SEGMENT: usize = 64 * 1024;
/// How much of the file before a mark is hashed to tell that it is unchanged.
const TAIL_CHECK: u64 = 4096;
/// The first line of a rewrite journal.
const JOURNAL_MAGIC: &[u8] = b"PCR-EMAIL MBOX REWRITE 1\n";
/// Header fields mail programs add or change in place; not part of a message's id.
const VOLATILE_HEADERS: [&str; 7] = [
    "status",
    "x-status",
    "x-keywords",
    "x-uid",
    "x-imapbase",
    "content-length",
    "lines",
];

/// The state store namespace holding the ids this account has finished in the mbox `path`.
pub fn done_namespace(account: &str, path: &Path) -> String {
    format!("mbox-done:{account}:{}", path.display())
}

fn cursor_namespace(account: &str, path: &Path) -> String {
    format!("mbox-cursor:{account}:{}", path.display())
}

fn moved_namespace(account: &str, path: &Path) -> String {
    format!("mbox-moved:{account}:{}", path.display())
}

/// `<path><suffix>` (`/var/mail/desk` → `/var/mail/desk.lock`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The file name a `move:<folder>` (or quarantine) appends to, beside the mbox: a plain name.
pub fn folder_file_name(folder: &str) -> Option<&str> {
    let folder = folder.trim();
    let usable = !folder.is_empty()
        && folder != "."
        && folder != ".."
        && !folder.contains('/')
        && !folder.chars().any(char::is_control);
    usable.then_some(folder)
}

// ---- scanning ------------------------------------------------------------------------------

/// One message as stored: from its `From ` line up to the next one (or the end).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    offset: u64,
    len: u64,
    id: String,
    /// The folder-internal pseudo message (`X-IMAP`) at the start of the file.
    internal: bool,
}

impl Region {
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A message being scanned.
struct Building {
    offset: u64,
    len: u64,
    hasher: Sha256,
    in_headers: bool,
    /// The current header field is left out of the id.
    skipping: bool,
    internal: bool,
}

impl Building {
    fn new(offset: u64) -> Building {
        Building {
            offset,
            len: 0,
            hasher: Sha256::new(),
            in_headers: true,
            skipping: false,
            internal: false,
        }
    }

    /// One piece of a line: all of it, or up to [`SEGMENT`] bytes (`line_start` tells
    /// whether it begins a line).
    fn add(&mut self, segment: &[u8], line_start: bool) {
        self.len += segment.len() as u64;
        if self.len == segment.len() as u64 {
            // The `From ` line.
            self.hasher.update(segment);
            return;
        }
        if self.in_headers && line_start {
            if segment == b"\n" || segment == b"\r\n" {
                self.in_headers = false;
                self.skipping = false;
            } else if !matches!(segment[0], b' ' | b'\t') {
                let name = segment
                    .iter()
                    .position(|&b| b == b':')
                    .map(|at| &segment[..at])
                    .unwrap_or(b"");
                let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
                self.skipping = VOLATILE_HEADERS.contains(&name.as_str());
                if name == "x-imap" && self.offset == 0 {
                    self.internal = true;
                }
            }
        }
        if !(self.in_headers && self.skipping) {
            self.hasher.update(segment);
        }
    }

    fn finish(self) -> Region {
        Region {
            offset: self.offset,
            len: self.len,
            id: hex(&self.hasher.finalize()[..16]),
            internal: self.internal,
        }
    }
}

/// Reads the next piece of a line into `segment` (at most [`SEGMENT`] bytes); empty at the
/// end. Returns whether the piece ends its line.
fn next_segment(reader: &mut impl BufRead, segment: &mut Vec<u8>) -> io::Result<bool> {
    segment.clear();
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(false);
        }
        let room = SEGMENT - segment.len();
        let window = &available[..available.len().min(room)];
        if let Some(at) = memchr::memchr(b'\n', window) {
            segment.extend_from_slice(&window[..=at]);
            reader.consume(at + 1);
            return Ok(true);
        }
        let taken = window.len();
        segment.extend_from_slice(window);
        reader.consume(taken);
        if segment.len() >= SEGMENT {
            return Ok(false);
        }
    }
}

/// The messages of mbox data read from `reader`, which starts at file offset `base` (a
/// message boundary). Data that does not begin with a `From ` line is not an mbox.
fn scan(mut reader: impl BufRead, base: u64) -> io::Result<Vec<Region>> {
    let mut regions = Vec::new();
    let mut current: Option<Building> = None;
    let mut segment = Vec::with_capacity(1024);
    let mut offset = base;
    let mut line_start = true;
    loop {
        let ends_line = next_segment(&mut reader, &mut segment)?;
        if segment.is_empty() {
            break;
        }
        if line_start && segment.starts_with(b"From ") {
            if let Some(done) = current.take() {
                regions.push(done.finish());
            }
            current = Some(Building::new(offset));
        }
        match current.as_mut() {
            Some(message) => message.add(&segment, line_start),
            None => {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "not an mbox file: it does not begin with a 'From ' line",
                ))
            }
        }
        offset += segment.len() as u64;
        line_start = ends_line;
    }
    if let Some(done) = current.take() {
        regions.push(done.finish());
    }
    Ok(regions)
}

/// Reads a file from `pos` to `end` with positioned reads (the file offset is not used).
struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if max == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..max], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn reader_at(file: &File, from: u64, end: u64) -> BufReader<At<'_>> {
    BufReader::with_capacity(
        SEGMENT,
        At {
            file,
            pos: from,
            end,
        },
    )
}

/// `len` bytes of `file` at `offset` (fewer at its end).
fn read_range(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut out = crate::incoming::gate::buffer(usize::try_from(len).unwrap_or(usize::MAX));
    reader_at(file, offset, offset.saturating_add(len)).read_to_end(&mut out)?;
    Ok(out)
}

/// The hash of `file`'s bytes in `[from, to)` (hex; the empty range has one too).
fn hash_range(file: &File, from: u64, to: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut reader = reader_at(file, from, to.max(from));
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(chunk);
        let n = chunk.len();
        reader.consume(n);
    }
    Ok(hex(&hasher.finalize()))
}

/// Copies `file[from, from+len)` to `out`, keeping the dot-lock fresh.
fn copy_range(
    file: &File,
    from: u64,
    len: u64,
    out: &mut impl Write,
    dot: &mut DotLock,
) -> io::Result<()> {
    let mut reader = reader_at(file, from, from + len);
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(());
        }
        out.write_all(chunk)?;
        let n = chunk.len();
        reader.consume(n);
        dot.keep_fresh();
    }
}

/// The message as handed over: without its `From ` line and the blank separator line, with
/// `>From ` lines unescaped by one `>` (mboxrd). Works in place.
pub fn message_bytes(mut region: Vec<u8>) -> Vec<u8> {
    let n = region.len();
    let mut read = memchr::memchr(b'\n', &region).map_or(n, |at| at + 1);
    let mut write = 0;
    while read < n {
        let end = memchr::memchr(b'\n', &region[read..]).map_or(n, |at| read + at + 1);
        let line = &region[read..end];
        let quotes = line.iter().take_while(|&&b| b == b'>').count();
        let from = if quotes > 0 && line[quotes..].starts_with(b"From ") {
            read + 1
        } else {
            read
        };
        region.copy_within(from..end, write);
        write += end - from;
        read = end;
    }
    region.truncate(write);
    if region.ends_with(b"\n\n") {
        region.pop();
    }
    region
}

// ---- locks ---------------------------------------------------------------------------------

/// Why a lock was not obtained.
enum LockFailure {
    /// Someone else holds it past the deadline.
    Busy,
    Io(io::Error),
}

/// The dot-lock `<file>.lock`, removed when dropped (if it is still ours).
struct DotLock {
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
    fn acquire(path: PathBuf, deadline: Instant) -> std::result::Result<DotLock, LockFailure> {
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
    fn keep_fresh(&mut self) {
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
fn wait_fcntl_lock(file: &File, write: bool, deadline: Instant) -> io::Result<bool> {
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
struct Locked {
    /// None: the file does not exist.
    file: Option<File>,
    dot: DotLock,
}

/// A place in one version of the file: its identity, an offset, and a hash of the bytes
/// just before it (see [`Mark::holds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    dev: u64,
    ino: u64,
    offset: u64,
    tail: String,
}

impl Mark {
    fn at(file: &File, meta: &Metadata, offset: u64) -> io::Result<Mark> {
        Ok(Mark {
            dev: meta.dev(),
            ino: meta.ino(),
            offset,
            tail: hash_range(file, offset.saturating_sub(TAIL_CHECK), offset)?,
        })
    }

    fn parse(text: &str) -> Option<Mark> {
        let mut parts = text.split(' ');
        let mark = Mark {
            dev: parts.next()?.parse().ok()?,
            ino: parts.next()?.parse().ok()?,
            offset: parts.next()?.parse().ok()?,
            tail: parts.next()?.to_string(),
        };
        parts.next().is_none().then_some(mark)
    }

    fn to_text(&self) -> String {
        format!("{} {} {} {}", self.dev, self.ino, self.offset, self.tail)
    }

    /// True when the file is still the one of the mark, at least as long, unchanged just
    /// before the offset, and a message (or the end) starts there.
    fn holds(&self, file: &File, meta: &Metadata) -> io::Result<bool> {
        if self.offset == 0 {
            return Ok(true);
        }
        if meta.dev() != self.dev || meta.ino() != self.ino || meta.len() < self.offset {
            return Ok(false);
        }
        if meta.len() > self.offset {
            let mut head = [0u8; 5];
            let n = file.read_at(&mut head, self.offset)?;
            if &head[..n] != b"From " {
                return Ok(false);
            }
        }
        Ok(hash_range(file, self.offset.saturating_sub(TAIL_CHECK), self.offset)? == self.tail)
    }
}

/// What `list` found.
#[derive(Debug)]
struct Layout {
    /// Where the listing started (valid while it [`Mark::holds`]).
    start: Mark,
    /// Where the first copy of each id was.
    at: HashMap<String, (u64, u64)>,
}

// ---- the rewrite journal ---------------------------------------------------------------------

/// The header of `<file>.pcr-rewrite`: the file `[0, keep_from)` stays; `[keep_from,
/// new_len)` becomes the journal's data; the file is cut at `new_len`. `old_len` was the
/// file's length, `cut_hash` the hash of its bytes `[new_len, old_len)` (which the cut
/// removes), `prefix_hash` of the 4 KiB before `keep_from`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Journal {
    dev: u64,
    ino: u64,
    keep_from: u64,
    old_len: u64,
    new_len: u64,
    cut_hash: String,
    prefix_hash: String,
}

impl Journal {
    fn header(&self) -> Vec<u8> {
        let mut out = JOURNAL_MAGIC.to_vec();
        out.extend_from_slice(
            format!(
                "{} {} {} {} {} {} {}\n",
                self.dev,
                self.ino,
                self.keep_from,
                self.old_len,
                self.new_len,
                self.cut_hash,
                self.prefix_hash
            )
            .as_bytes(),
        );
        out
    }

    /// The header of a journal file and where its data starts.
    fn read(file: &File) -> io::Result<Option<(Journal, u64)>> {
        let mut head = vec![0u8; 512];
        let n = file.read_at(&mut head, 0)?;
        head.truncate(n);
        let Some(rest) = head.strip_prefix(JOURNAL_MAGIC) else {
            return Ok(None);
        };
        let Some(end) = memchr::memchr(b'\n', rest) else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&rest[..end]).into_owned();
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 7 {
            return Ok(None);
        }
        let num = |i: usize| f[i].parse::<u64>().ok();
        let journal = (|| {
            Some(Journal {
                dev: num(0)?,
                ino: num(1)?,
                keep_from: num(2)?,
                old_len: num(3)?,
                new_len: num(4)?,
                cut_hash: f[5].to_string(),
                prefix_hash: f[6].to_string(),
            })
        })();
        let data_at = (JOURNAL_MAGIC.len() + end + 1) as u64;
        Ok(journal
            .filter(|j| j.keep_from <= j.new_len)
            .map(|j| (j, data_at)))
    }
}

/// Creates the rewrite journal (or its temporary file) afresh: the other user of the
/// installation must be able to read it to complete a rewrite this run leaves unfinished, so
/// it takes the directory's group and mode 0660 whatever the umask (see `perms`).
fn create_journal(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    crate::perms::create_new(path, crate::perms::FILE_MODE, false)
}

/// Opens the sibling mbox `path` (a `move:` folder, `PCR-Failed`) for appending, creating it
/// when missing with the directory's group and the mode bits of the mbox (`source_mode`),
/// whatever the umask; group read-write when the mbox is group-writable, so that the other
/// user of the installation can append to what this one created (see `perms`).
fn open_folder(path: &Path, source_mode: u32) -> io::Result<File> {
    let mut mode = source_mode & 0o666;
    if mode & 0o020 != 0 {
        mode |= crate::perms::FILE_MODE;
    }
    loop {
        match OpenOptions::new()
            .read(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => return Ok(file),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let created = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path);
        match created {
            Ok(file) => {
                if let Err(e) = crate::perms::adopt(&file, &crate::perms::parent_of(path), mode) {
                    let _ = fs::remove_file(path);
                    return Err(e);
                }
                return Ok(file);
            }
            // Created by someone else between the two opens: theirs.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

// ---- the mailbox -------------------------------------------------------------------------------

/// One mbox file of one account.
#[derive(Debug)]
pub struct MboxMailbox {
    account: String,
    /// The real path (symlinks resolved): the locks are taken beside it.
    path: PathBuf,
    /// The path as configured, for messages.
    label: String,
    action: ProcessedAction,
    /// How long to wait for the locks.
    wait: Duration,
    layout: Option<Layout>,
    notices: Vec<String>,
    state: StateStore,
    /// Tests: where a rewrite stops as if the process died.
    #[cfg(test)]
    crash: Option<Crash>,
}

/// Where a test's rewrite "dies" (never outside the unit tests).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// The journal is in place; the mbox is untouched.
    JournalWritten,
    /// The data is copied back; the file is not cut.
    CopiedBack,
    /// The file is cut; the journal is still there.
    FileCut,
}

impl MboxMailbox {
    /// Opens the mbox named by the account's `INCOMING_PATH`.
    pub fn open(account: &Account, state: StateStore) -> Result<MboxMailbox> {
        let (id, incoming) = crate::incoming::settings_of(account, MailboxType::Mbox)?;
        let path = incoming.path.clone().ok_or_else(|| {
            Error::account_key(&id, "INCOMING_PATH", "an MBOX mailbox needs INCOMING_PATH")
        })?;
        if let ProcessedAction::Move(folder) = &incoming.processed_action {
            let usable = folder_file_name(folder).is_some_and(|name| {
                path.file_name()
                    .is_none_or(|own| own != std::ffi::OsStr::new(name))
            });
            if !usable {
                return Err(Error::account_key(
                    &id,
                    "PROCESSED_ACTION",
                    format!(
                        "'{folder}' is not usable as an mbox folder (a file name beside the \
                         mbox, without '/', other than the mbox itself)"
                    ),
                ));
            }
        }
        MboxMailbox::at(
            &id,
            &path,
            incoming.processed_action.clone(),
            account.timeout,
            state,
        )
    }

    /// Opens the mbox `path` for `account` (`master` or a RECID) directly; `wait` bounds each
    /// wait for the locks.
    pub fn at(
        account: &str,
        path: &Path,
        action: ProcessedAction,
        wait: Duration,
        state: StateStore,
    ) -> Result<MboxMailbox> {
        let label = path.display().to_string();
        let error = |message: String| Error::mailbox(account, &label, message);
        let real = match fs::canonicalize(path) {
            Ok(real) => real,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Not delivered to yet: the directory must exist.
                let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                    return Err(error("not a usable mbox path".into()));
                };
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                match fs::canonicalize(dir) {
                    Ok(real) if real.is_dir() => real.join(name),
                    Ok(_) => return Err(error(format!("{} is not a directory", dir.display()))),
                    Err(e) => {
                        return Err(error(format!(
                            "the mbox's directory {} is not usable: {e}",
                            dir.display()
                        )))
                    }
                }
            }
            Err(e) => return Err(error(format!("not a usable mbox path: {e}"))),
        };
        if real.is_dir() {
            return Err(error(
                "is a directory, not an mbox file (a Maildir is read with MAILDIR)".into(),
            ));
        }
        Ok(MboxMailbox {
            account: account.to_string(),
            path: real,
            label,
            action,
            wait,
            layout: None,
            notices: Vec::new(),
            state,
            #[cfg(test)]
            crash: None,
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::mailbox(&self.account, &self.label, message)
    }

    #[cfg(test)]
    fn crash_point(&self, at: Crash) -> Result<()> {
        if self.crash == Some(at) {
            return Err(Error::message(format!("test crash: {at:?}")));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn crash_point(&self, _at: Crash) -> Result<()> {
        Ok(())
    }

    fn io_error(&self, doing: &str, e: io::Error) -> Error {
        self.error(format!("cannot {doing}: {e}"))
    }

    fn journal_path(&self) -> PathBuf {
        with_suffix(&self.path, ".pcr-rewrite")
    }

    /// Takes the dot-lock and the fcntl lock (a write lock and a read-write file for
    /// `write`), waiting up to the account's TIMEOUT in all.
    fn lock(&self, write: bool) -> Result<Locked> {
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

    /// Where a scan may start: the listing's start, when it still holds, else the beginning.
    fn valid_start(&self, file: &File, meta: &Metadata, start: Option<&Mark>) -> Result<u64> {
        match start {
            Some(mark)
                if mark
                    .holds(file, meta)
                    .map_err(|e| self.io_error("read the mbox", e))? =>
            {
                Ok(mark.offset)
            }
            _ => Ok(0),
        }
    }

    fn scan_file(&self, file: &File, meta: &Metadata, from: u64) -> Result<Vec<Region>> {
        scan(reader_at(file, from, meta.len()), from).map_err(|e| {
            if e.kind() == ErrorKind::InvalidData {
                self.error(e.to_string())
            } else {
                self.io_error("read the mbox", e)
            }
        })
    }

    fn is_done(&self, id: &str) -> Result<bool> {
        Ok(self
            .state
            .get_kv(&done_namespace(&self.account, &self.path), id)?
            .is_some())
    }

    fn record_done(&self, id: &str, what: &str) -> Result<()> {
        self.state
            .set_kv(&done_namespace(&self.account, &self.path), id, what)
    }

    /// Completes a rewrite a dead run left (see the module documentation), under the write
    /// lock. A journal that no longer fits the file (replaced, rewritten by someone else) is
    /// set aside, not applied, and reported.
    fn recover(&self, locked: &mut Locked) -> Result<Option<String>> {
        let journal_path = self.journal_path();
        let tmp = with_suffix(&journal_path, ".tmp");
        // Never renamed into place: the mbox was not touched.
        let _ = fs::remove_file(&tmp);
        let jfile = match File::open(&journal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_error("read the rewrite journal", e)),
        };
        let io = |e| self.io_error("complete an interrupted rewrite", e);
        let parsed = Journal::read(&jfile).map_err(io)?;
        let jlen = jfile.metadata().map_err(io)?.len();
        let fits = match (&parsed, locked.file.as_ref()) {
            (Some((j, data_at)), Some(file)) => {
                let meta = file.metadata().map_err(io)?;
                meta.dev() == j.dev
                    && meta.ino() == j.ino
                    && jlen == data_at + (j.new_len - j.keep_from)
                    && meta.len() >= j.keep_from
                    && hash_range(file, j.keep_from.saturating_sub(TAIL_CHECK), j.keep_from)
                        .map_err(io)?
                        == j.prefix_hash
            }
            _ => false,
        };
        if !fits {
            let aside = with_suffix(
                &journal_path,
                &format!(
                    ".discarded-{}",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                ),
            );
            let _ = fs::rename(&journal_path, &aside);
            return Ok(Some(format!(
                "an interrupted rewrite of the mbox could not be completed (the file changed \
                 since); its journal is kept as {} for the administrator",
                aside.display()
            )));
        }
        let (Some((j, data_at)), Some(file)) = (parsed, locked.file.as_ref()) else {
            return Ok(None);
        };
        let size = file.metadata().map_err(io)?.len();
        // Not cut yet: the bytes the cut removes are still there, and anything delivered
        // since comes after the old end. Cut already: deliveries come after the new end.
        let cut_from = j.new_len.min(j.old_len);
        let uncut =
            size >= j.old_len && hash_range(file, cut_from, j.old_len).map_err(io)? == j.cut_hash;
        let appended_from = if uncut {
            j.old_len
        } else {
            j.new_len.min(size)
        };
        let appended = size - appended_from;
        // A new journal: the old one's data plus what was delivered since, so that this
        // recovery can itself be interrupted.
        let next = Journal {
            dev: j.dev,
            ino: j.ino,
            keep_from: j.keep_from,
            old_len: size,
            new_len: j.new_len + appended,
            cut_hash: hash_range(file, (j.new_len + appended).min(size), size).map_err(io)?,
            prefix_hash: j.prefix_hash.clone(),
        };
        let mut out = create_journal(&tmp).map_err(io)?;
        out.write_all(&next.header()).map_err(io)?;
        copy_range(
            &jfile,
            data_at,
            j.new_len - j.keep_from,
            &mut out,
            &mut locked.dot,
        )
        .map_err(io)?;
        copy_range(file, appended_from, appended, &mut out, &mut locked.dot).map_err(io)?;
        out.sync_all().map_err(io)?;
        drop(out);
        fs::rename(&tmp, &journal_path).map_err(io)?;
        sync_dir(&journal_path);
        self.apply(locked, &next)?;
        Ok(None)
    }

    /// Copies the journal's data into the mbox at `keep_from`, cuts the file at `new_len`,
    /// syncs it and removes the journal.
    fn apply(&self, locked: &mut Locked, journal: &Journal) -> Result<()> {
        let journal_path = self.journal_path();
        let io = |e| self.io_error("rewrite the mbox", e);
        let Some(file) = locked.file.as_ref() else {
            return Ok(());
        };
        let jfile = File::open(&journal_path).map_err(io)?;
        let (_, data_at) = Journal::read(&jfile)
            .map_err(io)?
            .ok_or_else(|| self.error("the rewrite journal is unreadable"))?;
        let mut writer = PositionedWriter {
            file,
            pos: journal.keep_from,
        };
        copy_range(
            &jfile,
            data_at,
            journal.new_len - journal.keep_from,
            &mut writer,
            &mut locked.dot,
        )
        .map_err(io)?;
        self.crash_point(Crash::CopiedBack)?;
        file.set_len(journal.new_len).map_err(io)?;
        file.sync_all().map_err(io)?;
        self.crash_point(Crash::FileCut)?;
        fs::remove_file(&journal_path).map_err(io)?;
        sync_dir(&journal_path);
        Ok(())
    }

    /// Under the write lock: appends every copy of `ids` to `folder` (unless an earlier run
    /// did), then removes them from the mbox through the journal.
    fn remove(&mut self, ids: &[String], copy_to: Option<&str>) -> Result<()> {
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut locked = self.lock(true)?;
        if let Some(notice) = self.recover(&mut locked)? {
            self.notices.push(notice);
        }
        let Some(file) = locked.file.as_ref() else {
            return Ok(());
        };
        let io = |e| self.io_error("rewrite the mbox", e);
        let meta = file.metadata().map_err(io)?;
        let from = self.valid_start(file, &meta, self.layout.as_ref().map(|l| &l.start))?;
        let regions = self.scan_file(file, &meta, from)?;
        let doomed: Vec<&Region> = regions
            .iter()
            .filter(|r| !r.internal && wanted.contains(r.id.as_str()))
            .collect();
        let Some(first) = doomed.first() else {
            return Ok(());
        };
        let moved_ns = moved_namespace(&self.account, &self.path);
        let mut moved = Vec::new();
        if let Some(folder) = copy_to {
            let mut copies = Vec::new();
            for region in &doomed {
                if self.state.get_kv(&moved_ns, &region.id)?.is_none() {
                    copies.push(*region);
                }
            }
            self.append_to(folder, file, &meta, &copies, &mut locked.dot)?;
            for region in copies {
                self.state.set_kv(&moved_ns, &region.id, folder)?;
                moved.push(region.id.clone());
            }
        }
        // The journal: everything after the first removed message that stays.
        let keep_from = first.offset;
        let removed: HashSet<u64> = doomed.iter().map(|r| r.offset).collect();
        let kept: Vec<&Region> = regions
            .iter()
            .filter(|r| r.offset >= keep_from && !removed.contains(&r.offset))
            .collect();
        let new_len = keep_from + kept.iter().map(|r| r.len).sum::<u64>();
        let journal = Journal {
            dev: meta.dev(),
            ino: meta.ino(),
            keep_from,
            old_len: meta.len(),
            new_len,
            cut_hash: hash_range(file, new_len, meta.len()).map_err(io)?,
            prefix_hash: hash_range(file, keep_from.saturating_sub(TAIL_CHECK), keep_from)
                .map_err(io)?,
        };
        let journal_path = self.journal_path();
        let tmp = with_suffix(&journal_path, ".tmp");
        let mut out = create_journal(&tmp)
            .map_err(|e| self.io_error("write the rewrite journal beside the mbox", e))?;
        out.write_all(&journal.header()).map_err(io)?;
        {
            let mut buffered = io::BufWriter::with_capacity(SEGMENT, &mut out);
            for region in &kept {
                copy_range(
                    file,
                    region.offset,
                    region.len,
                    &mut buffered,
                    &mut locked.dot,
                )
                .map_err(io)?;
            }
            buffered.flush().map_err(io)?;
        }
        out.sync_all().map_err(io)?;
        drop(out);
        fs::rename(&tmp, &journal_path).map_err(io)?;
        sync_dir(&journal_path);
        self.crash_point(Crash::JournalWritten)?;
        self.apply(&mut locked, &journal)?;
        drop(locked);
        for id in moved {
            let _ = self.state.delete_kv(&moved_ns, &id);
        }
        Ok(())
    }

    /// Appends `regions` of the mbox (as stored, `From ` line and all) to the mbox `folder`
    /// beside it, under that file's locks; each ends with a blank line.
    fn append_to(
        &self,
        folder: &str,
        source: &File,
        source_meta: &Metadata,
        regions: &[&Region],
        dot: &mut DotLock,
    ) -> Result<()> {
        if regions.is_empty() {
            return Ok(());
        }
        let name = folder_file_name(folder)
            .ok_or_else(|| self.error(format!("'{folder}' is not a usable mbox folder name")))?;
        let target = self.path.with_file_name(name);
        let shown = target.display().to_string();
        let io = |e: io::Error| self.error(format!("cannot append to {shown}: {e}"));
        let deadline = Instant::now() + self.wait;
        let target_dot = match DotLock::acquire(with_suffix(&target, ".lock"), deadline) {
            Ok(d) => d,
            Err(LockFailure::Busy) => {
                return Err(self.error(format!("{shown} is locked by another program")))
            }
            Err(LockFailure::Io(e)) => return Err(io(e)),
        };
        let out = open_folder(&target, source_meta.permissions().mode()).map_err(io)?;
        let meta = out.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(self.error(format!("{shown} is not a regular file")));
        }
        if !wait_fcntl_lock(&out, true, deadline).map_err(io)? {
            return Err(self.error(format!("{shown} is locked by another program")));
        }
        let before = meta.len();
        let written = (|| -> io::Result<()> {
            // The last bytes written so far: what decides the blank lines needed.
            let mut tail = b"\n\n".to_vec();
            if before > 0 {
                tail = read_range(&out, before.saturating_sub(2), 2)?;
            }
            let mut writer = io::BufWriter::with_capacity(SEGMENT, &out);
            for region in regions {
                // Each `From ` line after a blank line.
                writer.write_all(separator(&tail))?;
                copy_range(source, region.offset, region.len, &mut writer, dot)?;
                tail = read_range(source, region.end().saturating_sub(2), region.len.min(2))?;
            }
            // And the file ends with one.
            writer.write_all(separator(&tail))?;
            writer.flush()?;
            drop(writer);
            out.sync_all()
        })();
        if let Err(e) = written {
            // No half message left behind.
            let _ = out.set_len(before);
            return Err(io(e));
        }
        drop(out);
        drop(target_dot);
        Ok(())
    }

    /// Seen + quarantine: copies the messages to `folder` and leaves the mbox as it is.
    fn copy_out(&mut self, ids: &[String], folder: &str) -> Result<()> {
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut locked = self.lock(false)?;
        let Some(file) = locked.file.as_ref() else {
            return Ok(());
        };
        let meta = file
            .metadata()
            .map_err(|e| self.io_error("read the mbox", e))?;
        let from = self.valid_start(file, &meta, self.layout.as_ref().map(|l| &l.start))?;
        let regions = self.scan_file(file, &meta, from)?;
        let copies: Vec<&Region> = regions
            .iter()
            .filter(|r| !r.internal && wanted.contains(r.id.as_str()))
            .collect();
        self.append_to(folder, file, &meta, &copies, &mut locked.dot)
    }

    /// One listed message, read under the locks; `None` when it is no longer in the file.
    fn read_message(&mut self, id: &str) -> Result<Option<Vec<u8>>> {
        let Some(layout) = self.layout.as_ref() else {
            return Ok(None);
        };
        let located = layout.at.get(id).copied();
        let start = layout.start.clone();
        let locked = self.lock(false)?;
        let Some(file) = locked.file.as_ref() else {
            return Ok(None);
        };
        let io = |e| self.io_error("read the mbox", e);
        let meta = file.metadata().map_err(io)?;
        // Where the listing saw it, if it is still that message there.
        if let Some((offset, len)) = located {
            if meta.dev() == start.dev && meta.ino() == start.ino && offset + len <= meta.len() {
                let region = read_range(file, offset, len).map_err(io)?;
                let mut next = [0u8; 5];
                let n = file.read_at(&mut next, offset + len).map_err(io)?;
                let boundary = n == 0 || (region.ends_with(b"\n") && &next[..n] == b"From ");
                if boundary {
                    if let Ok(found) = scan(&region[..], offset) {
                        if found.len() == 1 && found[0].id == id {
                            return Ok(Some(region));
                        }
                    }
                }
            }
        }
        // The file changed since the listing: look for the message again.
        let from = self.valid_start(file, &meta, Some(&start))?;
        let regions = self.scan_file(file, &meta, from)?;
        let mut at = HashMap::new();
        for r in regions.iter().filter(|r| !r.internal) {
            at.entry(r.id.clone()).or_insert((r.offset, r.len));
        }
        let found = at.get(id).copied();
        let bytes = match found {
            Some((offset, len)) => Some(read_range(file, offset, len).map_err(io)?),
            None => None,
        };
        let refreshed = Mark::at(file, &meta, from).map_err(io)?;
        drop(locked);
        if let Some(layout) = self.layout.as_mut() {
            layout.at = at;
            layout.start = refreshed;
        }
        Ok(bytes)
    }

    /// Saves the mark where the file's messages are all done (see the module docs).
    fn save_mark(&mut self) -> Result<()> {
        let Some(layout) = self.layout.take() else {
            return Ok(());
        };
        let locked = self.lock(false)?;
        let Some(file) = locked.file.as_ref() else {
            return Ok(());
        };
        let io = |e| self.io_error("read the mbox", e);
        let meta = file.metadata().map_err(io)?;
        let from = self.valid_start(file, &meta, Some(&layout.start))?;
        let mut mark = from;
        for region in self.scan_file(file, &meta, from)? {
            if region.internal || self.is_done(&region.id)? {
                mark = region.end();
            } else {
                break;
            }
        }
        if mark == from && from == layout.start.offset {
            return Ok(());
        }
        let saved = Mark::at(file, &meta, mark).map_err(io)?;
        drop(locked);
        self.state.set_kv(
            &cursor_namespace(&self.account, &self.path),
            "mark",
            &saved.to_text(),
        )
    }
}

/// What must be written after `tail` (the last bytes written) to end with a blank line.
fn separator(tail: &[u8]) -> &'static [u8] {
    if tail.ends_with(b"\n\n") {
        b""
    } else if tail.ends_with(b"\n") {
        b"\n"
    } else {
        b"\n\n"
    }
}

/// Writes at a position of a file (the file offset is not used).
struct PositionedWriter<'a> {
    file: &'a File,
    pos: u64,
}

impl Write for PositionedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Mailbox for MboxMailbox {
    fn protocol(&self) -> &'static str {
        "MBOX"
    }

    fn list(&mut self) -> Result<Vec<Listed>> {
        if self.journal_path().exists() {
            let mut locked = self.lock(true)?;
            if let Some(notice) = self.recover(&mut locked)? {
                self.notices.push(notice);
            }
        }
        let saved = self
            .state
            .get_kv(&cursor_namespace(&self.account, &self.path), "mark")?
            .and_then(|text| Mark::parse(&text));
        let locked = self.lock(false)?;
        let Some(file) = locked.file.as_ref() else {
            self.layout = None;
            return Ok(Vec::new());
        };
        let io = |e| self.io_error("read the mbox", e);
        let meta = file.metadata().map_err(io)?;
        let from = self.valid_start(file, &meta, saved.as_ref())?;
        let regions = self.scan_file(file, &meta, from)?;
        let start = Mark::at(file, &meta, from).map_err(io)?;
        drop(locked);
        let mut at = HashMap::new();
        let mut listed = Vec::new();
        for region in regions {
            if region.internal || at.contains_key(&region.id) {
                continue;
            }
            at.insert(region.id.clone(), (region.offset, region.len));
            if self.is_done(&region.id)? {
                continue;
            }
            listed.push(Listed {
                id: region.id,
                size: region.len,
            });
        }
        self.layout = Some(Layout { start, at });
        Ok(listed)
    }

    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()> {
        let mut unreadable = Vec::new();
        crate::incoming::fetch_one_by_one(ids, sink, &mut unreadable, |id| {
            let size = self
                .layout
                .as_ref()
                .and_then(|l| l.at.get(id))
                .map_or(0, |&(_, len)| len);
            // Before the locks: waiting for the large-message gate never holds up delivery.
            crate::incoming::gate::admit(usize::try_from(size).unwrap_or(usize::MAX));
            Ok(match self.read_message(id)? {
                Some(region) => Download::Got(message_bytes(region)),
                None => Download::Gone,
            })
        })
    }

    fn mark_processed(&mut self, ids: &[String]) -> Result<()> {
        match self.action.clone() {
            ProcessedAction::Seen => {
                for id in ids {
                    self.record_done(id, "processed")?;
                }
                Ok(())
            }
            ProcessedAction::Delete => self.remove(ids, None),
            ProcessedAction::Move(folder) => self.remove(ids, Some(&folder)),
        }
    }

    fn mark_skipped(&mut self, ids: &[String]) -> Result<()> {
        for id in ids {
            self.record_done(id, "skipped")?;
        }
        Ok(())
    }

    fn quarantine(&mut self, ids: &[String]) -> Result<bool> {
        if self.action == ProcessedAction::Seen {
            let mut fresh = Vec::new();
            for id in ids {
                if !self.is_done(id)? {
                    fresh.push(id.clone());
                }
            }
            self.copy_out(&fresh, QUARANTINE_FOLDER)?;
            for id in &fresh {
                self.record_done(id, "quarantined")?;
            }
        } else {
            self.remove(ids, Some(QUARANTINE_FOLDER))?;
        }
        Ok(true)
    }

    fn count(&mut self) -> Result<usize> {
        let locked = self.lock(false)?;
        let Some(file) = locked.file.as_ref() else {
            return Ok(0);
        };
        let meta = file
            .metadata()
            .map_err(|e| self.io_error("read the mbox", e))?;
        Ok(self
            .scan_file(file, &meta, 0)?
            .iter()
            .filter(|r| !r.internal)
            .count())
    }

    fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        // Only a shortcut for the next run: a failure here loses nothing.
        let _ = self.save_mark();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions(data: &[u8]) -> Vec<Region> {
        scan(data, 0).unwrap()
    }

    #[test]
    fn messages_split_at_from_lines_whatever_content_length_says() {
        let data =
            b"From a@x Mon Jan  1 00:00:00 2024\nContent-Length: 3\nSubject: one\n\nbody\nmore\n\n\
                     From b@x Mon Jan  1 00:00:01 2024\nSubject: two\n\n>From quoted\n\n";
        let found = regions(data);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].offset, 0);
        assert_eq!(found[1].offset, found[0].len);
        assert_eq!(found[1].end(), data.len() as u64);
        let first = &data[..found[0].len as usize];
        assert_eq!(
            message_bytes(first.to_vec()),
            b"Content-Length: 3\nSubject: one\n\nbody\nmore\n".to_vec()
        );
    }

    #[test]
    fn from_lines_are_unescaped_by_one_quote() {
        let region = b"From a@x Mon Jan  1 00:00:00 2024\r\nSubject: s\r\n\r\n>From here\r\n>>From there\r\n> From not\r\nFrom\r\n\n".to_vec();
        assert_eq!(
            message_bytes(region),
            b"Subject: s\r\n\r\nFrom here\r\n>From there\r\n> From not\r\nFrom\r\n".to_vec()
        );
    }

    #[test]
    fn ids_ignore_the_headers_mail_programs_rewrite_and_tell_copies_apart_by_content() {
        let a = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\nMessage-ID: <1@x>\n\nbody\n\n";
        let a_read = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\nStatus: RO\nX-Status: A\nX-UID: 5\n  folded\nMessage-ID: <1@x>\n\nbody\n\n";
        let b = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\nMessage-ID: <1@x>\n\nbody!\n\n";
        assert_eq!(regions(a)[0].id, regions(a_read)[0].id);
        assert_ne!(regions(a)[0].id, regions(b)[0].id);
        // A header only mentioned in a body counts.
        let c = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\nMessage-ID: <1@x>\n\nStatus: RO\nbody\n\n";
        assert_ne!(regions(a)[0].id, regions(c)[0].id);
    }

    #[test]
    fn the_folder_internal_message_is_recognised_only_first() {
        let data = b"From MAILER_DAEMON Mon Jan  1 00:00:00 2024\nSubject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\nX-IMAP: 1700000000 0000000002\n\ntext\n\n\
                     From b@x Mon Jan  1 00:00:01 2024\nX-IMAP: 1 2\n\nbody\n\n";
        let found = regions(data);
        assert!(found[0].internal);
        assert!(!found[1].internal);
    }

    #[test]
    fn a_file_that_is_not_an_mbox_is_refused() {
        assert!(scan(&b"Subject: x\n\nbody\n"[..], 0).is_err());
        assert!(scan(&b""[..], 0).unwrap().is_empty());
    }

    #[test]
    fn long_lines_are_scanned_in_pieces() {
        let mut data = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\n\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', SEGMENT * 2 + 7));
        data.extend_from_slice(b"From not a boundary\n\nFrom b@x Mon Jan  1 00:00:01 2024\n\nb\n");
        let found = regions(&data);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].end(), data.len() as u64);
    }

    #[test]
    fn folder_names_stay_beside_the_mbox() {
        assert_eq!(folder_file_name(" Done "), Some("Done"));
        assert_eq!(folder_file_name("PCR-Failed"), Some("PCR-Failed"));
        assert_eq!(folder_file_name("../etc/passwd"), None);
        assert_eq!(folder_file_name(".."), None);
        assert_eq!(folder_file_name(""), None);
    }

    fn entry(n: u32) -> String {
        format!(
            "From a@example.edu Mon Jan  1 00:00:0{n} 2024\nSubject: m{n}\nMessage-ID: <m{n}@x>\n\nbody {n}\n\n"
        )
    }

    struct Box_ {
        _dir: tempfile::TempDir,
        path: PathBuf,
        state_dir: PathBuf,
    }

    impl Box_ {
        fn new(messages: &[u32]) -> Box_ {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("desk");
            let text: String = messages.iter().map(|&n| entry(n)).collect();
            fs::write(&path, text).unwrap();
            let state_dir = dir.path().join("state");
            Box_ {
                _dir: dir,
                path,
                state_dir,
            }
        }

        fn open(&self) -> MboxMailbox {
            self.open_with(ProcessedAction::Delete)
        }

        fn open_with(&self, action: ProcessedAction) -> MboxMailbox {
            MboxMailbox::at(
                "master",
                &self.path,
                action,
                Duration::from_secs(5),
                StateStore::open(&self.state_dir).unwrap(),
            )
            .unwrap()
        }

        fn text(&self) -> String {
            String::from_utf8(fs::read(&self.path).unwrap()).unwrap()
        }

        /// A delivery after the crash (once the dead run's dot-lock went stale).
        fn deliver(&self, n: u32) {
            let mut f = OpenOptions::new().append(true).open(&self.path).unwrap();
            f.write_all(entry(n).as_bytes()).unwrap();
        }
    }

    /// Ids of messages 1..=4 as listed (in order).
    fn listed_ids(mailbox: &mut MboxMailbox) -> Vec<String> {
        mailbox.list().unwrap().into_iter().map(|l| l.id).collect()
    }

    #[test]
    fn a_rewrite_interrupted_anywhere_is_completed_keeping_later_deliveries() {
        for crash in [Crash::JournalWritten, Crash::CopiedBack, Crash::FileCut] {
            for delivered_after in [false, true] {
                let b = Box_::new(&[1, 2, 3, 4]);
                let mut dying = b.open();
                let ids = listed_ids(&mut dying);
                dying.crash = Some(crash);
                // Messages 1 and 3 were processed; the run dies during the rewrite.
                let e = dying
                    .mark_processed(&[ids[0].clone(), ids[2].clone()])
                    .unwrap_err();
                assert!(e.to_string().contains("test crash"), "{e}");
                drop(dying);
                assert!(b.path.with_file_name("desk.pcr-rewrite").exists());
                if delivered_after {
                    b.deliver(5);
                }
                // The next run completes the rewrite before it reads anything.
                let mut next = b.open();
                let now = listed_ids(&mut next);
                let mut expected = entry(2) + &entry(4);
                if delivered_after {
                    expected += &entry(5);
                }
                assert_eq!(
                    b.text(),
                    expected,
                    "{crash:?}, delivery after: {delivered_after}"
                );
                assert_eq!(now.len(), if delivered_after { 3 } else { 2 });
                assert!(!b.path.with_file_name("desk.pcr-rewrite").exists());
                assert!(next.take_notices().is_empty());
            }
        }
    }

    #[test]
    fn a_run_reads_from_the_mark_while_it_fits_and_the_whole_file_when_not() {
        let big = format!(
            "From a@example.edu Mon Jan  1 00:00:00 2024\nSubject: big\n\n{}\n\n",
            "x".repeat(3 * TAIL_CHECK as usize)
        );
        let b = Box_::new(&[]);
        fs::write(&b.path, big.clone() + &entry(2)).unwrap();
        let mut first = b.open_with(ProcessedAction::Seen);
        let ids = listed_ids(&mut first);
        assert_eq!(ids.len(), 2);
        first.mark_processed(&ids).unwrap();
        Box::new(first).finish().unwrap();

        // Bytes far before the mark are not read again: even a start that is no longer an
        // mbox goes unnoticed, and only the new message is listed.
        let mut text = fs::read(&b.path).unwrap();
        text[..5].copy_from_slice(b"XXXX ");
        fs::write(&b.path, &text).unwrap();
        b.deliver(3);
        let mut second = b.open_with(ProcessedAction::Seen);
        let new = listed_ids(&mut second);
        assert_eq!(new.len(), 1);
        second.mark_processed(&new).unwrap();
        Box::new(second).finish().unwrap();

        // Shrunk by someone else: the mark no longer fits; the whole file is read, and only
        // what is not done is listed.
        fs::write(&b.path, entry(2) + &entry(3) + &entry(4)).unwrap();
        let mut third = b.open_with(ProcessedAction::Seen);
        assert_eq!(listed_ids(&mut third).len(), 1);
        drop(third);
        // The same length as when the mark was saved, but changed within the 4 KiB before it:
        // read whole again (and found to be no mbox any more).
        fs::write(
            &b.path,
            big.replace("From a@", "XXXX a@") + &entry(2) + &entry(5),
        )
        .unwrap();
        assert!(b.open_with(ProcessedAction::Seen).list().is_err());
        // Changed only far before it: read from the mark.
        fs::write(
            &b.path,
            big.replace("From a@", "XXXX a@") + &entry(2) + &entry(3),
        )
        .unwrap();
        assert_eq!(listed_ids(&mut b.open_with(ProcessedAction::Seen)).len(), 0);
    }

    #[test]
    fn a_journal_that_no_longer_fits_the_file_is_set_aside_and_reported() {
        let b = Box_::new(&[1, 2, 3]);
        let mut dying = b.open();
        let ids = listed_ids(&mut dying);
        dying.crash = Some(Crash::JournalWritten);
        dying.mark_processed(&ids[1..2]).unwrap_err();
        drop(dying);
        // Someone rewrote the file meanwhile (a mail reader removed message 1).
        fs::write(&b.path, entry(2) + &entry(3)).unwrap();
        let mut next = b.open();
        assert_eq!(listed_ids(&mut next).len(), 2);
        assert_eq!(b.text(), entry(2) + &entry(3));
        let notices = next.take_notices();
        assert_eq!(notices.len(), 1);
        assert!(notices[0].contains("could not be completed"), "{notices:?}");
        assert!(!b.path.with_file_name("desk.pcr-rewrite").exists());
    }

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

    #[test]
    fn files_created_beside_the_mbox_let_the_other_user_in_whatever_the_umask() {
        // SAFETY: umask only sets the process's file mode creation mask; 022 is root's usual.
        unsafe { libc::umask(0o022) };
        let b = Box_::new(&[1, 2, 3]);
        let dir = b.path.parent().unwrap().to_path_buf();
        // The installation's group on the directory (not setgid: what is created must take
        // it explicitly). Only root can give it a group it is not in.
        // SAFETY: geteuid never fails.
        let root = unsafe { libc::geteuid() } == 0;
        let group = if root {
            std::os::unix::fs::chown(&dir, None, Some(54321)).unwrap();
            54321
        } else {
            fs::metadata(&dir).unwrap().gid()
        };
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        fs::set_permissions(&b.path, fs::Permissions::from_mode(0o660)).unwrap();
        let mut mailbox = b.open_with(ProcessedAction::Move("Done".into()));
        let ids = listed_ids(&mut mailbox);
        assert!(mailbox.quarantine(&ids[..1]).unwrap());
        // A run that dies in the middle of a rewrite leaves its journal.
        mailbox.crash = Some(Crash::JournalWritten);
        mailbox.mark_processed(&ids[1..2]).unwrap_err();
        drop(mailbox);
        for name in ["PCR-Failed", "Done", "desk.pcr-rewrite"] {
            let meta = fs::metadata(dir.join(name)).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o660, "{name}");
            assert_eq!(meta.gid(), group, "{name}");
        }
        // A mbox only its owner may read gives its folders no more.
        fs::remove_file(dir.join("PCR-Failed")).unwrap();
        fs::set_permissions(&b.path, fs::Permissions::from_mode(0o600)).unwrap();
        let mut next = b.open_with(ProcessedAction::Move("Done".into()));
        let ids = listed_ids(&mut next);
        assert_eq!(ids.len(), 1);
        assert!(next.quarantine(&ids).unwrap());
        let meta = fs::metadata(dir.join("PCR-Failed")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(b.text(), "");
        assert!(!dir.join("desk.pcr-rewrite").exists());
    }

    #[test]
    fn marks_round_trip() {
        let mark = Mark {
            dev: 1,
            ino: 2,
            offset: 3,
            tail: "ab".into(),
        };
        assert_eq!(Mark::parse(&mark.to_text()), Some(mark));
        assert_eq!(Mark::parse("1 2 x ab"), None);
    }
}
