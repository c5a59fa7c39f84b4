//! The IMAP adapter: the [`Mailbox`] trait over the session ([`ImapMailbox`]), as every
//! protocol has its adapter in `mailbox.rs`.

use super::download::plan_batches;
use super::fetch;
use super::folder::normalize_folder;
use super::{ImapMailbox, BATCH_BYTES, BATCH_MAX_UIDS, QUARANTINE_FOLDER, SETTLED_NAMESPACE};
use crate::config::ProcessedAction;
use crate::error::Result;
use crate::incoming::{Fetched, Flow, Listed, Mailbox};

impl ImapMailbox {
    fn parse_ids(&self, ids: &[String]) -> Result<Vec<u32>> {
        let mut uids = Vec::with_capacity(ids.len());
        for id in ids {
            match id.trim().parse::<u32>() {
                Ok(uid) if uid > 0 => uids.push(uid),
                _ => {
                    return Err(self.mailbox_error(format!(
                        "'{}' is not an IMAP UID",
                        fetch::clean_text(id.as_bytes())
                    )))
                }
            }
        }
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }
}

impl Mailbox for ImapMailbox {
    fn protocol(&self) -> &'static str {
        "IMAP"
    }

    fn list(&mut self) -> Result<Vec<Listed>> {
        // SELECT afresh (the server shows mail that arrived since only on a new selection),
        // listing from the stored mark in the same round trip.
        self.selected = None;
        let stored = self.state.imap_mark(&self.account, &self.mark_key)?;
        let guess = stored.map_or(1, |(_, low)| low.max(1));
        let mut found = Some(self.select_and_list(guess)?);
        let uidvalidity = self.uidvalidity.unwrap_or(0);
        let low = match stored {
            Some((v, low)) if v == uidvalidity => low.max(1),
            _ => 1,
        };
        if low != guess {
            // The folder was recreated (new UIDVALIDITY): everything in it is listed.
            found = None;
        }
        self.stored_mark = stored;
        self.listed_under = Some((uidvalidity, low));
        self.listed.clear();
        self.settled_before = self
            .remembered(SETTLED_NAMESPACE)?
            .into_iter()
            .filter(|&uid| uid >= low)
            .collect();
        if self.exists > 0 {
            let found = match found {
                Some(found) => found,
                None => {
                    let what = format!("listing the messages of '{}'", self.folder);
                    let range = format!("{low}:*");
                    let found = self.run(&what, |s| {
                        let fetches = s.uid_fetch(&range, "(UID RFC822.SIZE)")?;
                        Ok(fetches
                            .iter()
                            .filter_map(|f| f.uid.map(|uid| (uid, f.size.map_or(0, u64::from))))
                            .collect::<Vec<_>>())
                    })?;
                    self.stats.list_fetches += 1;
                    found
                }
            };
            // `low:*` includes the last message even when its UID is below `low`.
            // UIDs an earlier run settled above the mark are not new either.
            let settled_before = &self.settled_before;
            // A UID can be reported twice (a flag change by another client meanwhile, without
            // its size): the size it was listed with is kept.
            for (uid, size) in found
                .into_iter()
                .filter(|(uid, _)| *uid >= low && !settled_before.contains(uid))
            {
                let listed = self.listed.entry(uid).or_insert(size);
                *listed = (*listed).max(size);
            }
        }
        Ok(self
            .listed
            .iter()
            .map(|(uid, size)| Listed {
                id: uid.to_string(),
                size: *size,
            })
            .collect())
    }

    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()> {
        let uids = self.parse_ids(ids)?;
        if uids.is_empty() {
            return Ok(());
        }
        if self.selected.is_none() {
            self.open_folder(true)?;
        }
        let listed = &self.listed;
        let batches = plan_batches(
            &uids,
            |uid| listed.get(&uid).copied(),
            BATCH_BYTES,
            BATCH_MAX_UIDS,
        );
        self.pipelined_fetch(&batches, sink)
    }

    fn mark_processed(&mut self, ids: &[String]) -> Result<()> {
        let uids = self.parse_ids(ids)?;
        if uids.is_empty() {
            return Ok(());
        }
        self.open_folder(true)?;
        match self.action.clone() {
            ProcessedAction::Seen => {
                self.store_flags(&uids, "\\Seen", "marking messages as seen")?;
            }
            ProcessedAction::Delete => {
                self.store_flags(&uids, "\\Deleted", "deleting messages")?;
                self.expunge_uids(&uids)?;
            }
            ProcessedAction::Move(folder) => {
                self.move_uids(&uids, &normalize_folder(&folder))?;
            }
        }
        self.settle(&uids);
        Ok(())
    }

    fn mark_skipped(&mut self, ids: &[String]) -> Result<()> {
        let uids = self.parse_ids(ids)?;
        self.settle(&uids);
        Ok(())
    }

    fn quarantine(&mut self, ids: &[String]) -> Result<bool> {
        let uids = self.parse_ids(ids)?;
        if uids.is_empty() {
            return Ok(true);
        }
        self.open_folder(true)?;
        self.move_uids(&uids, QUARANTINE_FOLDER)?;
        self.settle(&uids);
        Ok(true)
    }

    fn count(&mut self) -> Result<usize> {
        self.selected = None;
        self.open_folder(false)?;
        Ok(self.exists as usize)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let saved = self.save_mark();
        if let Some(session) = self.session.take() {
            // The work is done and the mark saved: LOGOUT is said, its reply not awaited (a
            // round trip less; nothing is pending that it could confirm or undo).
            let tag = self.next_tag();
            let _ = self.wire.send(format!("{tag} LOGOUT\r\n").as_bytes());
            drop(session);
        }
        saved
    }
}
