//! The MAILDIR mailbox: a Maildir on the web server itself (`INCOMING_PATH`, with `new/`,
//! `cur/` and `tmp/`).
//!
//! - A message's id is the unique part of its file name (before the `:2,` info), which stays
//!   the same when a mail client moves it from `new/` to `cur/` or changes its flags. Names are
//!   kept as bytes; the id escapes `%` and any byte that is not UTF-8 as `%XX` ([`message_id`]),
//!   so two names that differ only in such a byte are two messages.
//! - `list` = the files in `new/` and `cur/` (never `tmp/`: files there are still being
//!   written) whose id is not yet recorded as done for this account and directory in the
//!   state store (key-value namespace [`done_namespace`]); sizes come from the file metadata.
//! - Another process may take a file between `list` and `fetch_each` or the action: a file
//!   that vanished is looked for once more (it may have moved to `cur/` with new flags) and
//!   otherwise passed over without error.
//! - `seen` moves the file to `cur/` with the `S` flag added (other flags kept) and records it
//!   as done (the file stays, and being read by someone else must not hide a message);
//!   `delete` unlinks it; `move:<folder>` renames it into the Maildir++ folder
//!   `.<folder>/cur` (created when missing; `/` in the name is the hierarchy separator `.`,
//!   non-ASCII is modified UTF-7 as Dovecot writes it). Quarantine moves to `.PCR-Failed`.
//! - Skipped messages are recorded as done and left untouched.
//! - Records of files that later disappear are kept (a few bytes each): the store offers no
//!   listing to prune them by, and a stale record can only hide a file with the same unique
//!   name, which Maildir delivery never reuses.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, ErrorKind, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{Account, MailboxType, ProcessedAction};
use crate::error::{Error, Result};
use crate::incoming::imap::utf7;
use crate::incoming::{Download, Fetched, Flow, Listed, Mailbox};
use crate::state::StateStore;

/// The Maildir++ folder quarantined messages are moved to.
pub const QUARANTINE_FOLDER: &str = "PCR-Failed";

/// The state store namespace holding the ids this account has finished in `root`.
pub fn done_namespace(account: &str, root: &Path) -> String {
    format!("maildir-done:{account}:{}", root.display())
}

/// One message file.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    path: PathBuf,
    size: u64,
    modified: SystemTime,
    in_cur: bool,
}

/// One Maildir of one account.
#[derive(Debug)]
pub struct MaildirMailbox {
    account: String,
    root: PathBuf,
    label: String,
    action: ProcessedAction,
    namespace: String,
    /// Where each listed id was last seen.
    located: HashMap<String, PathBuf>,
    /// Messages the last `fetch_each` could not read (see `Mailbox::take_unreadable`).
    unreadable: Vec<(String, Error)>,
    state: StateStore,
}

/// Reads one message file. Only a regular file is opened (a FIFO or a device in the Maildir
/// would block or never end), and without blocking: it cannot be swapped for one meanwhile.
fn read_message(path: &Path) -> io::Result<Vec<u8>> {
    use crate::config::files::{open_regular, FileProblem};
    let (mut file, meta) = open_regular(path).map_err(|p| match p {
        FileProblem::Io(e) => e,
        _ => io::Error::new(ErrorKind::InvalidInput, "not a regular file"),
    })?;
    let mut raw = crate::incoming::gate::buffer(meta.len() as usize);
    file.read_to_end(&mut raw)?;
    Ok(raw)
}

/// The unique part of a Maildir file name (everything before the first `:`), as the file
/// system gives it (any bytes).
fn unique_bytes(name: &[u8]) -> &[u8] {
    name.split(|&b| b == b':').next().unwrap_or(name)
}

/// The id of a message file: the unique part of its name as text that is unique and
/// reversible for any bytes. Valid UTF-8 is kept as written except `%`, which becomes `%25`;
/// each byte that is not UTF-8 becomes `%XX` (upper-case hex). So `a\xE9` and `a\xE8` (two
/// different files) get `a%E9` and `a%E8`, never one id for both; a plain ASCII name without
/// `%` (what Maildir delivery writes) is its own id. (A file with `%` in its name recorded by
/// a version before this escaping is listed once more; the Message-ID ledger keeps it from
/// reaching the host twice, and only its PROCESSED_ACTION is applied again.)
pub fn message_id(name: &OsStr) -> String {
    let unique = unique_bytes(name.as_bytes());
    let mut id = String::with_capacity(unique.len());
    for chunk in unique.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' {
                id.push_str("%25");
            } else {
                id.push(c);
            }
        }
        for b in chunk.invalid() {
            id.push_str(&format!("%{b:02X}"));
        }
    }
    id
}

/// The file name (its bytes: a Maildir name need not be UTF-8) with flag `flag` added to its
/// `:2,` info (flags kept sorted, no repeats); a name without info (or with an unknown one)
/// gets `:2,<flag>`.
fn with_flag_bytes(name: &[u8], flag: &[u8]) -> Vec<u8> {
    let unique = unique_bytes(name);
    let info = name.get(unique.len() + 1..);
    let mut flags: Vec<&[u8]> = match info.and_then(|i| i.strip_prefix(b"2,")) {
        Some(existing) => std::str::from_utf8(existing)
            .map(|text| {
                text.char_indices()
                    .map(|(at, c)| &existing[at..at + c.len_utf8()])
                    .collect()
            })
            .unwrap_or_else(|_| existing.chunks(1).collect()),
        None => Vec::new(),
    };
    flags.push(flag);
    flags.sort_unstable();
    flags.dedup();
    let mut out = unique.to_vec();
    out.extend_from_slice(b":2,");
    for f in flags {
        out.extend_from_slice(f);
    }
    out
}

/// The file name as it must be in a `cur/` directory (with `:2,` info).
fn cur_name(name: &OsStr) -> OsString {
    let bytes = name.as_bytes();
    if bytes.contains(&b':') {
        name.to_os_string()
    } else {
        let mut named = bytes.to_vec();
        named.extend_from_slice(b":2,");
        OsString::from_vec(named)
    }
}

/// The Maildir++ directory name of `folder` (`.Done`, `.Archive.2024`).
pub fn folder_dir_name(folder: &str) -> Option<String> {
    let folder = folder.trim();
    if folder.is_empty() || folder.chars().any(char::is_control) {
        return None;
    }
    let name = format!(".{}", utf7::encode(folder).replace('/', "."));
    (name != "." && name != "..").then_some(name)
}

/// The name of a message file, as bytes (never made lossy: two names may differ only in a
/// byte that is not UTF-8).
fn file_name(path: &Path) -> OsString {
    path.file_name()
        .map(OsStr::to_os_string)
        .unwrap_or_default()
}

fn vanished(e: &io::Error) -> bool {
    e.kind() == ErrorKind::NotFound
}

impl MaildirMailbox {
    /// Opens the Maildir named by the account's `INCOMING_PATH` (it must have `cur/` and
    /// `new/`; it is not created).
    pub fn open(account: &Account, state: StateStore) -> Result<MaildirMailbox> {
        let (id, incoming) = crate::incoming::settings_of(account, MailboxType::Maildir)?;
        let root = incoming.path.clone().ok_or_else(|| {
            Error::account_key(
                &id,
                "INCOMING_PATH",
                "a MAILDIR mailbox needs INCOMING_PATH",
            )
        })?;
        if let ProcessedAction::Move(folder) = &incoming.processed_action {
            if folder_dir_name(folder).is_none() {
                return Err(Error::account_key(
                    &id,
                    "PROCESSED_ACTION",
                    format!("'{folder}' is not usable as a Maildir++ folder name"),
                ));
            }
        }
        MaildirMailbox::at(&id, &root, incoming.processed_action.clone(), state)
    }

    /// Opens the Maildir `root` for `account` (`master` or a RECID) directly.
    pub fn at(
        account: &str,
        root: &Path,
        action: ProcessedAction,
        state: StateStore,
    ) -> Result<MaildirMailbox> {
        let label = root.display().to_string();
        for sub in ["cur", "new"] {
            let dir = root.join(sub);
            match fs::metadata(&dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(Error::mailbox(
                        account,
                        &label,
                        format!("not a Maildir: {sub}/ is not a directory"),
                    ))
                }
                Err(e) => {
                    return Err(Error::mailbox(
                        account,
                        &label,
                        format!("not a usable Maildir: cannot open {sub}/: {e}"),
                    ))
                }
            }
        }
        Ok(MaildirMailbox {
            account: account.to_string(),
            root: root.to_path_buf(),
            label,
            action,
            namespace: done_namespace(account, root),
            located: HashMap::new(),
            unreadable: Vec::new(),
            state,
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::mailbox(&self.account, &self.label, message)
    }

    /// Every message file in `new/` and `cur/`, oldest first; a file that vanishes while
    /// being looked at is left out.
    fn scan(&self) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for (sub, in_cur) in [("new", false), ("cur", true)] {
            let dir = self.root.join(sub);
            let listing =
                fs::read_dir(&dir).map_err(|e| self.error(format!("cannot read {sub}/: {e}")))?;
            for item in listing {
                let item = match item {
                    Ok(item) => item,
                    Err(e) if vanished(&e) => continue,
                    Err(e) => return Err(self.error(format!("cannot read {sub}/: {e}"))),
                };
                let name = item.file_name();
                if name.as_bytes().starts_with(b".") {
                    continue;
                }
                let meta = match item.metadata() {
                    Ok(meta) => meta,
                    Err(e) if vanished(&e) => continue,
                    Err(e) => {
                        return Err(self
                            .error(format!("cannot read {sub}/{}: {e}", name.to_string_lossy())))
                    }
                };
                if !meta.is_file() {
                    continue;
                }
                entries.push(Entry {
                    id: message_id(&name),
                    path: item.path(),
                    size: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    in_cur,
                });
            }
        }
        entries.sort_by(|a, b| a.modified.cmp(&b.modified).then_with(|| a.id.cmp(&b.id)));
        Ok(entries)
    }

    /// Rescans and remembers where every id is now.
    fn relocate_all(&mut self) -> Result<()> {
        for entry in self.scan()? {
            self.located.insert(entry.id, entry.path);
        }
        Ok(())
    }

    /// Runs `op` on the file of `id`; when it vanished, looks for it once more (`rescanned`
    /// tells whether that already happened in this batch). `Ok(None)`: the file is gone.
    fn with_file<T>(
        &mut self,
        id: &str,
        rescanned: &mut bool,
        mut op: impl FnMut(&Path) -> io::Result<T>,
    ) -> Result<Option<T>> {
        for attempt in 0..2 {
            if let Some(path) = self.located.get(id).cloned() {
                match op(&path) {
                    Ok(value) => return Ok(Some(value)),
                    Err(e) if vanished(&e) => {}
                    Err(e) => {
                        return Err(self.error(format!(
                            "cannot handle {}: {e}",
                            path.strip_prefix(&self.root).unwrap_or(&path).display()
                        )))
                    }
                }
            }
            if attempt == 0 && !*rescanned {
                *rescanned = true;
                self.located.remove(id);
                self.relocate_all()?;
            } else {
                break;
            }
        }
        self.located.remove(id);
        Ok(None)
    }

    fn record_done(&self, id: &str, what: &str) -> Result<()> {
        self.state.set_kv(&self.namespace, id, what)
    }

    fn is_done(&self, id: &str) -> Result<bool> {
        Ok(self.state.get_kv(&self.namespace, id)?.is_some())
    }

    /// Creates the Maildir++ folder (`cur/`, `new/`, `tmp/`, `maildirfolder`) when missing.
    fn folder_dir(&self, folder: &str) -> Result<PathBuf> {
        let name = folder_dir_name(folder)
            .ok_or_else(|| self.error(format!("'{folder}' is not a usable folder name")))?;
        let dir = self.root.join(name);
        // Created with the Maildir's group, group read/write (crate::perms): a folder made by
        // a run as root stays usable by a run as the web server's user.
        for sub in ["cur", "new", "tmp"] {
            crate::perms::create_dir_all(&dir.join(sub), crate::perms::DIR_MODE)
                .map_err(|e| self.error(format!("cannot create the folder '{folder}': {e}")))?;
        }
        let marker = dir.join("maildirfolder");
        if !marker.exists() {
            crate::perms::write_file(&marker, b"", crate::perms::FILE_MODE)
                .map_err(|e| self.error(format!("cannot create the folder '{folder}': {e}")))?;
        }
        Ok(dir)
    }

    /// Moves each message into `folder/cur`, keeping its name and flags.
    fn move_to(&mut self, ids: &[String], folder: &str) -> Result<()> {
        let target_dir = self.folder_dir(folder)?.join("cur");
        let mut rescanned = false;
        let mut first_error = None;
        for id in ids {
            let moved = self.with_file(id, &mut rescanned, |path| {
                let target = target_dir.join(cur_name(&file_name(path)));
                if target.exists() {
                    // Moved there before (a rerun after a crash): drop this copy.
                    fs::remove_file(path)
                } else {
                    fs::rename(path, &target)
                }
            });
            match moved {
                Ok(_) => {
                    self.located.remove(id);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Mailbox for MaildirMailbox {
    fn protocol(&self) -> &'static str {
        "MAILDIR"
    }

    fn list(&mut self) -> Result<Vec<Listed>> {
        let entries = self.scan()?;
        self.located.clear();
        let mut listed: Vec<Listed> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for entry in entries {
            if let Some(&at) = index.get(&entry.id) {
                // The same message in new/ and cur/ (a client moving it right now).
                if entry.in_cur {
                    self.located.insert(entry.id.clone(), entry.path);
                    listed[at].size = entry.size;
                }
                continue;
            }
            if self.is_done(&entry.id)? {
                continue;
            }
            index.insert(entry.id.clone(), listed.len());
            listed.push(Listed {
                id: entry.id.clone(),
                size: entry.size,
            });
            self.located.insert(entry.id, entry.path);
        }
        Ok(listed)
    }

    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()> {
        let mut rescanned = false;
        let mut unreadable = std::mem::take(&mut self.unreadable);
        let result = crate::incoming::fetch_one_by_one(ids, sink, &mut unreadable, |id| {
            if !self.located.contains_key(id) && !rescanned {
                rescanned = true;
                self.relocate_all()?;
            }
            // A file that vanished is looked for again (`with_file`); one that is there but
            // cannot be read is that message's failure, not the Maildir's.
            let read = self.with_file(id, &mut rescanned, |path| match read_message(path) {
                Err(e) if vanished(&e) => Err(e),
                other => Ok(other),
            })?;
            Ok(match read {
                Some(Ok(raw)) => Download::Got(raw),
                None => Download::Gone,
                Some(Err(e)) => {
                    let name = self.located.get(id).map(|p| {
                        p.strip_prefix(&self.root)
                            .unwrap_or(p)
                            .display()
                            .to_string()
                    });
                    Download::Unreadable(self.error(format!(
                        "cannot read {}: {e}",
                        name.as_deref().unwrap_or(id)
                    )))
                }
            })
        });
        self.unreadable = unreadable;
        result
    }

    fn take_unreadable(&mut self) -> Vec<(String, Error)> {
        std::mem::take(&mut self.unreadable)
    }

    fn mark_processed(&mut self, ids: &[String]) -> Result<()> {
        match self.action.clone() {
            ProcessedAction::Seen => {
                let cur = self.root.join("cur");
                let mut rescanned = false;
                let mut first_error = None;
                for id in ids {
                    let renamed = self.with_file(id, &mut rescanned, |path| {
                        let named = with_flag_bytes(file_name(path).as_bytes(), b"S");
                        let target = cur.join(OsString::from_vec(named));
                        if target != path {
                            fs::rename(path, &target)?;
                        }
                        Ok(target)
                    });
                    match renamed {
                        Ok(Some(target)) => {
                            self.located.insert(id.clone(), target);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            first_error.get_or_insert(e);
                            continue;
                        }
                    }
                    // The file stays: remember it is done (even if someone took it).
                    if let Err(e) = self.record_done(id, "processed") {
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), Err)
            }
            ProcessedAction::Delete => {
                let mut rescanned = false;
                let mut first_error = None;
                for id in ids {
                    match self.with_file(id, &mut rescanned, |path| fs::remove_file(path)) {
                        Ok(_) => {
                            self.located.remove(id);
                        }
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                first_error.map_or(Ok(()), Err)
            }
            ProcessedAction::Move(folder) => self.move_to(ids, &folder),
        }
    }

    fn mark_skipped(&mut self, ids: &[String]) -> Result<()> {
        for id in ids {
            self.record_done(id, "skipped")?;
        }
        Ok(())
    }

    fn quarantine(&mut self, ids: &[String]) -> Result<bool> {
        self.move_to(ids, QUARANTINE_FOLDER)?;
        Ok(true)
    }

    fn count(&mut self) -> Result<usize> {
        Ok(self.scan()?.len())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_flags() {
        assert_eq!(
            unique_bytes(b"1700000000.M1P2.host:2,RS"),
            b"1700000000.M1P2.host"
        );
        assert_eq!(
            unique_bytes(b"1700000000.M1P2.host"),
            b"1700000000.M1P2.host"
        );
        assert_eq!(with_flag_bytes(b"u", b"S"), b"u:2,S");
        assert_eq!(with_flag_bytes(b"u:2,", b"S"), b"u:2,S");
        assert_eq!(with_flag_bytes(b"u:2,RT", b"S"), b"u:2,RST");
        assert_eq!(with_flag_bytes(b"u:2,FS", b"S"), b"u:2,FS");
        assert_eq!(with_flag_bytes(b"u:1,xyz", b"S"), b"u:2,S");
        assert_eq!(cur_name(OsStr::new("u")), "u:2,");
        assert_eq!(cur_name(OsStr::new("u:2,S")), "u:2,S");
        assert_eq!(
            with_flag_bytes(b"caf\xe9:2,RT", b"S"),
            b"caf\xe9:2,RST".to_vec()
        );
    }

    #[test]
    fn ids_are_unique_and_reversible_for_any_bytes() {
        let id = |b: &[u8]| message_id(OsStr::from_bytes(b));
        assert_eq!(id(b"1700000000.M1P2.host:2,S"), "1700000000.M1P2.host");
        assert_eq!(id(b"caf\xe9.host:2,"), "caf%E9.host");
        assert_eq!(id(b"caf\xe8.host"), "caf%E8.host");
        // A literal `%` is escaped, so `%E9` written out is not the byte 0xE9.
        assert_eq!(id(b"caf%E9.host"), "caf%25E9.host");
        assert_eq!(id("café".as_bytes()), "café");
    }

    #[test]
    fn folder_names_stay_inside_the_maildir() {
        assert_eq!(folder_dir_name("Done").as_deref(), Some(".Done"));
        assert_eq!(
            folder_dir_name("Archive/2024").as_deref(),
            Some(".Archive.2024")
        );
        assert_eq!(folder_dir_name("Geprüft").as_deref(), Some(".Gepr&APw-ft"));
        assert_eq!(
            folder_dir_name("PCR-Failed").as_deref(),
            Some(".PCR-Failed")
        );
        assert_eq!(folder_dir_name("."), None);
        assert_eq!(folder_dir_name(""), None);
        assert_eq!(folder_dir_name("a\nb"), None);
        // Slashes become dots, so no name can leave the Maildir.
        assert_eq!(folder_dir_name("../etc").as_deref(), Some("....etc"));
    }
}
