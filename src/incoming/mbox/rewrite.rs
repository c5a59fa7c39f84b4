//! Changing the mbox: removing messages through the rewrite journal `<file>.pcr-rewrite`
//! (and completing a rewrite a dead run left), and appending messages to a sibling mbox
//! (`move:<folder>`, quarantine). See "PROCESSED_ACTION" in the module docs.

use std::collections::HashSet;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, BufRead, ErrorKind, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use super::lock::{wait_fcntl_lock, DotLock, LockFailure, Locked};
use super::scan::{hash_range, read_range, reader_at, Region};
use super::{
    folder_file_name, moved_namespace, with_suffix, Crash, MboxMailbox, SEGMENT, TAIL_CHECK,
};
use crate::error::Result;

/// The first line of a rewrite journal.
const JOURNAL_MAGIC: &[u8] = b"PCR-EMAIL MBOX REWRITE 1\n";

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

impl MboxMailbox {
    pub(super) fn journal_path(&self) -> PathBuf {
        with_suffix(&self.path, ".pcr-rewrite")
    }

    /// Completes a rewrite a dead run left (see the module documentation), under the write
    /// lock. A journal that no longer fits the file (replaced, rewritten by someone else) is
    /// set aside, not applied, and reported.
    pub(super) fn recover(&self, locked: &mut Locked) -> Result<Option<String>> {
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
    pub(super) fn remove(&mut self, ids: &[String], copy_to: Option<&str>) -> Result<()> {
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
    pub(super) fn copy_out(&mut self, ids: &[String], folder: &str) -> Result<()> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProcessedAction;
    use crate::incoming::mbox::fixtures::{entry, listed_ids, Box_};
    use crate::incoming::Mailbox;

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
}
