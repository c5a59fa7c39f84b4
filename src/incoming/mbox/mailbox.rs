//! The MBOX adapter: the [`Mailbox`] trait over the mbox file ([`MboxMailbox`]), as every
//! protocol has its adapter in `mailbox.rs`.

use std::collections::HashMap;

use super::scan::{message_bytes, Mark};
use super::{cursor_namespace, Layout, MboxMailbox, QUARANTINE_FOLDER};
use crate::config::ProcessedAction;
use crate::error::Result;
use crate::incoming::{Download, Fetched, Flow, Listed, Mailbox};

impl MboxMailbox {
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
    use crate::incoming::mbox::fixtures::{entry, listed_ids, Box_};
    use crate::incoming::mbox::TAIL_CHECK;
    use std::fs;

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
}
