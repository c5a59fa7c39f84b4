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
//!
//! Layout: this file holds the mailbox's state ([`MboxMailbox`]) and opening it; `scan` reads
//! and splits the file (and keeps the mark), `lock` takes the locks, `rewrite` removes and
//! appends messages through the journal, and `mailbox` is the [`Mailbox`] adapter, as for
//! every protocol.
//!
//! [`Mailbox`]: crate::incoming::Mailbox

mod lock;
mod mailbox;
mod rewrite;
mod scan;

use std::collections::HashMap;
use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Account, MailboxType, ProcessedAction};
use crate::error::{Error, Result};
use crate::state::StateStore;

pub use scan::message_bytes;
use scan::Mark;

/// The sibling mbox quarantined messages are appended to.
pub const QUARANTINE_FOLDER: &str = "PCR-Failed";
/// A dot-lock older than this is left over by a dead process (liblockfile's 5 minutes).
pub const DOTLOCK_STALE: Duration = Duration::from_secs(300);
/// The most bytes of one line looked at (and held) at a time while scanning.
const SEGMENT: usize = 64 * 1024;
/// How much of the file before a mark is hashed to tell that it is unchanged.
const TAIL_CHECK: u64 = 4096;

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

/// What `list` found.
#[derive(Debug)]
struct Layout {
    /// Where the listing started (valid while it [`Mark::holds`]).
    start: Mark,
    /// Where the first copy of each id was.
    at: HashMap<String, (u64, u64)>,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_stay_beside_the_mbox() {
        assert_eq!(folder_file_name(" Done "), Some("Done"));
        assert_eq!(folder_file_name("PCR-Failed"), Some("PCR-Failed"));
        assert_eq!(folder_file_name("../etc/passwd"), None);
        assert_eq!(folder_file_name(".."), None);
        assert_eq!(folder_file_name(""), None);
    }
}

/// What the tests of the rewrite and the listing share: an mbox in a temporary directory.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::incoming::Mailbox;
    use std::fs::OpenOptions;
    use std::io::Write;

    pub(super) fn entry(n: u32) -> String {
        format!(
            "From a@example.edu Mon Jan  1 00:00:0{n} 2024\nSubject: m{n}\nMessage-ID: <m{n}@x>\n\nbody {n}\n\n"
        )
    }

    pub(super) struct Box_ {
        _dir: tempfile::TempDir,
        pub(super) path: PathBuf,
        pub(super) state_dir: PathBuf,
    }

    impl Box_ {
        pub(super) fn new(messages: &[u32]) -> Box_ {
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

        pub(super) fn open(&self) -> MboxMailbox {
            self.open_with(ProcessedAction::Delete)
        }

        pub(super) fn open_with(&self, action: ProcessedAction) -> MboxMailbox {
            MboxMailbox::at(
                "master",
                &self.path,
                action,
                Duration::from_secs(5),
                StateStore::open(&self.state_dir, None).unwrap(),
            )
            .unwrap()
        }

        pub(super) fn text(&self) -> String {
            String::from_utf8(fs::read(&self.path).unwrap()).unwrap()
        }

        /// A delivery after the crash (once the dead run's dot-lock went stale).
        pub(super) fn deliver(&self, n: u32) {
            let mut f = OpenOptions::new().append(true).open(&self.path).unwrap();
            f.write_all(entry(n).as_bytes()).unwrap();
        }
    }

    /// Ids of messages 1..=4 as listed (in order).
    pub(super) fn listed_ids(mailbox: &mut MboxMailbox) -> Vec<String> {
        mailbox.list().unwrap().into_iter().map(|l| l.id).collect()
    }
}
