//! The journal of records the database refused (`STATE_DIR/pcr_email-unrecorded.jsonl`),
//! recorded when the database is back.

use std::io::{BufRead, Write};
use std::path::Path;

use mysql::{Conn, TxOpts};

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
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

/// Records what the journal holds (each a done message), then empties it.
pub(super) fn replay_journal(conn: &mut Conn, path: &Path) -> mysql::Result<()> {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return Ok(());
    };
    if file.lock().is_err() {
        return Ok(());
    }
    let entries: Vec<Journaled> = std::io::BufReader::new(&file)
        .lines()
        .map_while(std::result::Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let mut tx = conn.start_transaction(TxOpts::default())?;
    for e in &entries {
        settle_in(
            &mut tx,
            &e.account,
            &e.key,
            LedgerState::Done,
            &e.outcome,
            e.sd_number.as_deref(),
            None,
        )?;
    }
    tx.commit()?;
    let _ = file.set_len(0);
    Ok(())
}
