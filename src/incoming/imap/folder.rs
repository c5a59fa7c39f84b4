//! The folder: opening it (SELECT/EXAMINE, with the listing pipelined behind the SELECT), and
//! the actions on its messages (flags, expunge, move, creating the target folder). See
//! "Actions" in the module docs.

use super::commands::{listed_size, read_tagged};
use super::fetch::Status;
use super::marks::uid_set;
use super::utf7;
use super::{ImapMailbox, PENDING_NAMESPACE};
use crate::error::Result;

/// UIDs per STORE/MOVE/COPY/EXPUNGE command.
const ACTION_MAX_UIDS: usize = 500;

/// `INBOX` is case-insensitive; every other name is kept as written.
pub(super) fn normalize_folder(name: &str) -> String {
    let name = name.trim();
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_string()
    } else {
        name.to_string()
    }
}

/// An IMAP quoted string.
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

impl ImapMailbox {
    /// SELECT (`write`) or EXAMINE the folder, unless it is already open that way.
    pub(super) fn open_folder(&mut self, write: bool) -> Result<()> {
        if self.selected == Some(write) || (self.selected == Some(true) && !write) {
            return Ok(());
        }
        let name = utf7::encode(&self.folder);
        let what = format!("opening the folder '{}'", self.folder);
        let mailbox = self.run(&what, |s| {
            if write {
                s.select(&name)
            } else {
                s.examine(&name)
            }
        })?;
        self.apply_selection(mailbox.uid_validity, mailbox.exists, write)
    }

    /// Records what a SELECT or EXAMINE reported; a UIDVALIDITY that changed during the run
    /// ends the session.
    fn apply_selection(
        &mut self,
        uidvalidity: Option<u32>,
        exists: u32,
        write: bool,
    ) -> Result<()> {
        let Some(uidvalidity) = uidvalidity else {
            let err = self.mailbox_error(format!(
                "the server did not report the UIDVALIDITY of '{}'",
                self.folder
            ));
            return Err(err);
        };
        if let Some(old) = self.uidvalidity {
            if old != uidvalidity {
                let err = self.mailbox_error(format!(
                    "the UIDVALIDITY of '{}' changed during the run ({old} → {uidvalidity}); \
                     nothing more is done with it this run",
                    self.folder
                ));
                self.poison(&err);
                return Err(err);
            }
        }
        self.uidvalidity = Some(uidvalidity);
        self.exists = exists;
        self.selected = Some(write);
        Ok(())
    }

    /// SELECT and `UID FETCH low:* (UID RFC822.SIZE)` sent together, one round trip for both:
    /// `low` comes from the stored mark, which the caller checks against the UIDVALIDITY
    /// the SELECT reported. Returns the `(UID, size)` pairs listed.
    pub(super) fn select_and_list(&mut self, low: u32) -> Result<Vec<(u32, u64)>> {
        if self.session.is_none() {
            return Err(self.session_gone());
        }
        let name = utf7::encode(&self.folder);
        let (select_tag, fetch_tag) = (self.next_tag(), self.next_tag());
        let what = format!("opening the folder '{}'", self.folder);
        let commands = format!(
            "{select_tag} SELECT {}\r\n{fetch_tag} UID FETCH {low}:* (UID RFC822.SIZE)\r\n",
            quoted(&name)
        );
        let wire = self.wire.clone();
        let mut selected = (None, 0u32);
        let mut listed = Vec::new();
        let read = (|| -> std::io::Result<((Status, String), (Status, String))> {
            wire.send(commands.as_bytes())?;
            let select = read_tagged(&wire, &select_tag, |line| {
                let upper = line.to_ascii_uppercase();
                if let Some(n) = upper
                    .strip_prefix("* ")
                    .and_then(|r| r.strip_suffix(" EXISTS"))
                {
                    selected.1 = n.trim().parse().unwrap_or(selected.1);
                } else if let Some(at) = upper.find("[UIDVALIDITY ") {
                    let rest = &upper[at + "[UIDVALIDITY ".len()..];
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    selected.0 = digits.parse().ok();
                }
            })?;
            let fetch = read_tagged(&wire, &fetch_tag, |line| {
                if let Some(pair) = listed_size(line) {
                    listed.push(pair);
                }
            })?;
            Ok((select, fetch))
        })();
        let ((select_status, select_text), (fetch_status, fetch_text)) = match read {
            Ok(replies) => replies,
            Err(e) => {
                let err = self.io_error(&what, &e);
                self.poison(&err);
                return Err(err);
            }
        };
        if select_status != Status::Ok {
            self.selected = None;
            return Err(self.mailbox_error(format!(
                "{what}: the server said {}: {}",
                if select_status == Status::No {
                    "NO"
                } else {
                    "BAD"
                },
                self.redact(&select_text)
            )));
        }
        self.apply_selection(selected.0, selected.1, true)?;
        // Some servers refuse `low:*` in an empty folder.
        if fetch_status != Status::Ok && self.exists > 0 {
            return Err(self.mailbox_error(format!(
                "listing the messages of '{}': the server said {}: {}",
                self.folder,
                if fetch_status == Status::No {
                    "NO"
                } else {
                    "BAD"
                },
                self.redact(&fetch_text)
            )));
        }
        self.stats.list_fetches += 1;
        Ok(listed)
    }

    pub(super) fn store_flags(&mut self, uids: &[u32], flags: &str, what: &str) -> Result<()> {
        for chunk in uids.chunks(ACTION_MAX_UIDS) {
            let set = uid_set(chunk);
            let query = format!("+FLAGS.SILENT ({flags})");
            self.run(what, |s| s.uid_store(&set, &query).map(drop))?;
        }
        Ok(())
    }

    /// Expunges exactly `uids` (already flagged `\Deleted`); see the module docs without
    /// UIDPLUS.
    pub(super) fn expunge_uids(&mut self, uids: &[u32]) -> Result<()> {
        if self.uidplus {
            for chunk in uids.chunks(ACTION_MAX_UIDS) {
                let set = uid_set(chunk);
                self.run("expunging messages", |s| s.uid_expunge(&set).map(drop))?;
            }
            return Ok(());
        }
        let deleted = self.run("looking for messages flagged \\Deleted", |s| {
            s.uid_search("DELETED")
        })?;
        let mut ours = self.remembered(PENDING_NAMESPACE)?;
        ours.extend(uids.iter().copied());
        if deleted.iter().all(|uid| ours.contains(uid)) {
            self.run("expunging messages", |s| s.expunge().map(drop))?;
            ours.clear();
        } else {
            self.stats.expunges_skipped += 1;
            // Forget what is gone already; keep ours that still wait.
            ours.retain(|uid| deleted.contains(uid));
        }
        self.remember(PENDING_NAMESPACE, &ours)
    }

    /// Makes sure `folder` exists (LIST, then CREATE when missing).
    fn ensure_folder(&mut self, folder: &str) -> Result<()> {
        if self.folders_ready.contains(folder) {
            return Ok(());
        }
        let wire_name = utf7::encode(folder);
        let pattern = quoted(&wire_name);
        let exists = |names: &imap::types::Names| {
            names.iter().any(|n| {
                n.name() == wire_name
                    || (n.name().eq_ignore_ascii_case("INBOX")
                        && wire_name.eq_ignore_ascii_case("INBOX"))
            })
        };
        let what = format!("looking for the folder '{folder}'");
        let names = self.run(&what, |s| s.list(Some(""), Some(&pattern)))?;
        if !exists(&names) {
            let what = format!("creating the folder '{folder}'");
            if let Err(e) = self.run(&what, |s| s.create(&wire_name)) {
                // Another client may have created it meanwhile.
                let again = self.run(&what, |s| s.list(Some(""), Some(&pattern)))?;
                if !exists(&again) {
                    return Err(e);
                }
            }
        }
        self.folders_ready.insert(folder.to_string());
        Ok(())
    }

    /// Moves `uids` into `folder` (MOVE, else COPY + \Deleted + expunge of those UIDs).
    pub(super) fn move_uids(&mut self, uids: &[u32], folder: &str) -> Result<()> {
        self.ensure_folder(folder)?;
        let target = utf7::encode(folder);
        for chunk in uids.chunks(ACTION_MAX_UIDS) {
            let set = uid_set(chunk);
            let what = format!("moving messages to '{folder}'");
            if self.move_ext {
                self.run(&what, |s| s.uid_mv(&set, &target))?;
            } else {
                self.run(&what, |s| s.uid_copy(&set, &target))?;
                self.store_flags(chunk, "\\Deleted", &what)?;
                self.expunge_uids(chunk)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names() {
        assert_eq!(normalize_folder(" inbox "), "INBOX");
        assert_eq!(normalize_folder("Done/PCR"), "Done/PCR");
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
