//! The journal of records the database refused (`STATE_DIR/pcr_email-unrecorded.jsonl`),
//! recorded when the database is back.
//!
//! Only a done record refused because the connection was lost is journaled: a record the
//! database refuses for good (a value it will never take) would be refused again at every
//! replay. Each line is one entry; an entry is appended after a newline, so a line another
//! process left half-written ends there and the next entry stays whole. Replay records the
//! entries one by one; one the database refuses for good goes to `….jsonl.rejected` (with one
//! line on stderr, the cron job's output) instead of blocking every later open.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use mysql::{Conn, TxOpts};

use super::conn::{is_connection_lost, is_retryable, redact};
use super::ledger::settle_in;
use crate::state::ledger::LedgerState;

/// A settled message as kept in the journal.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Journaled {
    pub(super) account: String,
    pub(super) key: String,
    pub(super) outcome: String,
    pub(super) sd_number: Option<String>,
}

// ---- The journal of records the database refused ------------------------------------------

pub(super) fn append_journal(path: &Path, entry: &Journaled) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.is_dir() {
            crate::perms::create_dir_all(dir, crate::perms::DIR_MODE)?;
        }
    }
    let (mut file, _) = crate::perms::open_or_create(path, crate::perms::FILE_MODE, true)?;
    file.lock()?;
    let mut line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
    line.push('\n');
    if !ends_with_newline(path, file.metadata()?.len())? {
        // A line left half-written (a process that died mid-write): end it here.
        line.insert(0, '\n');
    }
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

fn ends_with_newline(path: &Path, len: u64) -> std::io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Where entries the database refuses for good are moved.
pub(super) fn rejected_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".rejected");
    PathBuf::from(name)
}

fn journal_error(path: &Path, what: &str, e: &std::io::Error) -> mysql::Error {
    // Code 0: neither retried nor taken for a lost connection.
    mysql::Error::MySqlError(mysql::MySqlError {
        state: "HY000".into(),
        message: format!("cannot {what} the journal {}: {e}", path.display()),
        code: 0,
    })
}

/// Records what the journal holds (each a done message) one entry at a time, then empties
/// it. An entry the database refuses for good (and a line that is no entry) moves to the
/// rejected file; a lost connection stops the replay with the rest kept in the journal.
pub(super) fn replay_journal(conn: &mut Conn, path: &Path) -> mysql::Result<()> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(journal_error(path, "open", &e)),
    };
    file.lock().map_err(|e| journal_error(path, "lock", &e))?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .map_err(|e| journal_error(path, "read", &e))?;
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut rejected: Vec<(&[u8], String)> = Vec::new();
    let mut stopped: Option<(usize, mysql::Error)> = None;
    for (i, line) in lines.iter().enumerate() {
        let entry: Journaled = match serde_json::from_slice(line) {
            Ok(e) => e,
            Err(e) => {
                rejected.push((line, format!("not a journal entry: {e}")));
                continue;
            }
        };
        match record(conn, &entry) {
            Ok(()) => {}
            Err(e) if is_connection_lost(&e) || is_retryable(&e) => {
                stopped = Some((i, e));
                break;
            }
            Err(e) => rejected.push((line, redact(&e))),
        }
    }
    if !rejected.is_empty() {
        let to = rejected_path(path);
        let (mut out, _) = crate::perms::open_or_create(&to, crate::perms::FILE_MODE, true)
            .map_err(|e| journal_error(&to, "open", &e))?;
        let mut text = Vec::new();
        for (line, _) in &rejected {
            text.extend_from_slice(line);
            text.push(b'\n');
        }
        out.write_all(&text)
            .and_then(|()| out.sync_data())
            .map_err(|e| journal_error(&to, "write", &e))?;
        eprintln!(
            "pcr_email: the state database refused {} record(s) of {} for good ({}); moved to {}",
            rejected.len(),
            path.display(),
            rejected[0].1,
            to.display()
        );
    }
    // What is left: the entries from the one the replay stopped at (none when all done).
    let mut rest = Vec::new();
    if let Some((from, _)) = &stopped {
        for line in &lines[*from..] {
            rest.extend_from_slice(line);
            rest.push(b'\n');
        }
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
        .and_then(|()| file.write_all(&rest))
        .and_then(|()| file.sync_data())
        .map_err(|e| journal_error(path, "rewrite", &e))?;
    match stopped {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// Records one journaled entry in its own transaction.
fn record(conn: &mut Conn, e: &Journaled) -> mysql::Result<()> {
    let mut tx = conn.start_transaction(TxOpts::default())?;
    settle_in(
        &mut tx,
        &e.account,
        &e.key,
        LedgerState::Done,
        &e.outcome,
        e.sd_number.as_deref(),
        None,
    )?;
    tx.commit()
}
