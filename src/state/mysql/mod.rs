//! The state store in a MariaDB/MySQL database (`email.STATE_DSN`), shared by several
//! application servers.
//!
//! # Tables
//! Everything lives in tables named `pcr_email_*`, created and upgraded by the extension (a row
//! of `pcr_email_schema` holds the schema version); no other table is read or written. Keys
//! that SQLite holds as text (an account scope may be a Maildir path, a dedupe key a long
//! Message-ID) are kept whole in `TEXT` columns and looked up through a SHA-256 of them
//! (`BINARY(32)`), so any length fits InnoDB's index limits and comparisons are exact bytes, as
//! in SQLite. Values that can be large (the cloud listing marks, about half a megabyte for a
//! big mailbox) are `LONGTEXT`.
//!
//! # Concurrency
//! Each operation is one InnoDB transaction (READ COMMITTED) that locks the rows it reads
//! before changing them (`SELECT ... FOR UPDATE`): two processes, on one server or on
//! several, cannot both claim a message. A deadlock or a lock wait timeout re-runs the
//! transaction (a few times); a lost connection is opened again once. The ledger's claim
//! protocol is the SQLite one (see [`super::ledger`]): a claim is a lease, renewed while its
//! run goes on, that another process takes over once it ran out (a process on another server
//! cannot be seen dying) or at once when the holder was a process of this machine that is gone.
//! A mailbox is leased the same way (`pcr_email_mailbox_leases`, see
//! [`super::StateStore::take_mailbox`]): one run at a time reads it.
//!
//! # A database that goes away
//! An operation that cannot reach the database fails with an error naming the database (never
//! its password). A message the host already took but whose record the database refused is
//! written to a journal under `STATE_DIR` (`pcr_email-unrecorded.jsonl`) and recorded in the
//! database before anything else by the next store of this server that reaches it: the next run
//! finds it done instead of handing it over again.

use std::cell::RefCell;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder, Row, SslOpts, Transaction, TxOpts, Value};
use rusqlite::Connection;
use sha2::{Digest, Sha256};

use super::ledger::{
    entry_parts, takeover, truncate, Claim, LedgerCounts, LedgerEntry, LedgerOutcome, LedgerState,
    Settled, StoredOwner, SKIPPED_PREFIX,
};
use super::{now_ms, now_secs, Owner, PendingAuth, StoredToken, PENDING_AUTH_GRACE_SECS};
use crate::config::dsn::Dsn;
use crate::config::Secret;
use crate::error::{Error, Result};

/// The schema version of the `pcr_email_*` tables this code writes.
pub const MYSQL_SCHEMA_VERSION: i64 = 1;
/// The journal of records the database refused, inside `STATE_DIR`.
pub const JOURNAL_FILE: &str = "pcr_email-unrecorded.jsonl";
/// How long one statement waits for a row another process holds.
const LOCK_WAIT_SECS: u64 = 30;
/// The connect timeout: a database that does not answer is an error, not a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Read and write timeouts of a statement: longer than the lock wait a statement may spend.
const NET_TIMEOUT: Duration = Duration::from_secs(LOCK_WAIT_SECS + 30);
/// Deadlocks and lock wait timeouts are retried this many times.
const RETRIES: usize = 5;

/// Opens a connection to `dsn`'s database.
fn connect(dsn: &Dsn, io_timeout: Duration) -> mysql::Result<Conn> {
    let mut opts = OptsBuilder::new()
        .ip_or_hostname(Some(dsn.host.clone()))
        .tcp_port(dsn.port)
        .user(Some(dsn.user.clone()))
        .pass(Some(dsn.password.expose().to_string()))
        .db_name(Some(dsn.database.clone()))
        .prefer_socket(false)
        .tcp_connect_timeout(Some(CONNECT_TIMEOUT))
        .read_timeout(Some(io_timeout))
        .write_timeout(Some(io_timeout))
        .init(vec![
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_string(),
            format!("SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_SECS}"),
            "SET SESSION sql_mode = 'STRICT_TRANS_TABLES,NO_ENGINE_SUBSTITUTION'".to_string(),
        ]);
    if dsn.ssl {
        let mut tls = SslOpts::default();
        if let Some(ca) = &dsn.ca {
            tls = tls.with_root_cert_path(Some(ca.clone()));
        }
        opts = opts.ssl_opts(Some(tls));
    }
    Conn::new(opts)
}

/// The databases whose tables this process already checked (created or upgraded).
static MIGRATED: Mutex<Vec<String>> = Mutex::new(Vec::new());

// ---- Keys -------------------------------------------------------------------------------

/// The SHA-256 of `parts` (each with its length), the key rows are found by.
pub(crate) fn id(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

// ---- Errors -----------------------------------------------------------------------------

fn is_retryable(e: &mysql::Error) -> bool {
    // Deadlock, lock wait timeout, a duplicate key from a concurrent first insert.
    matches!(e, mysql::Error::MySqlError(m) if matches!(m.code, 1213 | 1205 | 1062))
}

fn is_connection_lost(e: &mysql::Error) -> bool {
    match e {
        mysql::Error::IoError(_) | mysql::Error::CodecError(_) | mysql::Error::DriverError(_) => {
            true
        }
        // Server shutdown, connection killed, server gone away / lost.
        mysql::Error::MySqlError(m) => matches!(m.code, 1053 | 1927 | 2006 | 2013 | 4031),
        _ => false,
    }
}

// ---- The store --------------------------------------------------------------------------

/// One connection to the database, opened when needed.
pub(crate) struct MysqlStore {
    dsn: Dsn,
    conn: RefCell<Option<Conn>>,
    journal: PathBuf,
}

type Tx<'a, 'b> = &'a mut Transaction<'b>;

fn get<T: mysql::prelude::FromValue>(row: &mut Row, i: usize) -> mysql::Result<T> {
    match row.take_opt::<T, usize>(i) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(mysql::Error::FromValueError(e.0)),
        None => Err(mysql::Error::FromValueError(Value::NULL)),
    }
}

fn first(tx: Tx<'_, '_>, sql: &str, params: Vec<Value>) -> mysql::Result<Option<Row>> {
    tx.exec_first(sql, params)
}

fn exec(tx: Tx<'_, '_>, sql: &str, params: Vec<Value>) -> mysql::Result<u64> {
    tx.exec_drop(sql, params)?;
    Ok(tx.affected_rows())
}

macro_rules! p {
    ($($v:expr),* $(,)?) => { vec![$(Value::from($v)),*] };
}

const SCHEMA_V1: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS pcr_email_ledger (
        id BINARY(32) NOT NULL PRIMARY KEY,
        account_id BINARY(32) NOT NULL,
        account TEXT NOT NULL,
        msg_key TEXT NOT NULL,
        mailbox_ref TEXT NULL,
        ref_id BINARY(32) NULL,
        state VARCHAR(16) NOT NULL,
        outcome TEXT NULL,
        sd_number VARCHAR(255) NULL,
        attempts INT UNSIGNED NOT NULL DEFAULT 0,
        last_error TEXT NULL,
        owner_run VARCHAR(255) NULL,
        owner_host VARCHAR(255) NULL,
        owner_machine VARCHAR(255) NULL,
        owner_boot VARCHAR(255) NULL,
        owner_pidns VARCHAR(255) NULL,
        owner_pid INT UNSIGNED NULL,
        owner_start BIGINT NULL,
        lease_until BIGINT NULL,
        first_seen BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        KEY pcr_email_ledger_account (account_id, state),
        KEY pcr_email_ledger_ref (account_id, ref_id),
        KEY pcr_email_ledger_owner (owner_run)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS pcr_email_imap_marks (
        id BINARY(32) NOT NULL PRIMARY KEY,
        account TEXT NOT NULL,
        folder TEXT NOT NULL,
        uidvalidity INT UNSIGNED NOT NULL,
        low_water_uid INT UNSIGNED NOT NULL,
        updated_at BIGINT NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS pcr_email_kv (
        id BINARY(32) NOT NULL PRIMARY KEY,
        namespace TEXT NOT NULL,
        kv_key TEXT NOT NULL,
        value LONGTEXT NOT NULL,
        updated_at BIGINT NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS pcr_email_sent (
        id BINARY(32) NOT NULL PRIMARY KEY,
        message_id TEXT NOT NULL,
        sd_number VARCHAR(255) NOT NULL,
        account TEXT NOT NULL,
        sent_at BIGINT NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS pcr_email_tokens (
        id BINARY(32) NOT NULL PRIMARY KEY,
        account TEXT NOT NULL,
        kind TEXT NOT NULL,
        value MEDIUMTEXT NOT NULL,
        expires_at BIGINT NULL,
        version BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS pcr_email_pending_auth (
        id BINARY(32) NOT NULL PRIMARY KEY,
        state TEXT NOT NULL,
        data MEDIUMTEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        KEY pcr_email_pending_auth_expiry (expires_at)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS pcr_email_mailbox_leases (
        id BINARY(32) NOT NULL PRIMARY KEY,
        scope TEXT NOT NULL,
        owner_run VARCHAR(255) NOT NULL,
        owner_host VARCHAR(255) NULL,
        owner_machine VARCHAR(255) NULL,
        owner_boot VARCHAR(255) NULL,
        owner_pidns VARCHAR(255) NULL,
        owner_pid INT UNSIGNED NULL,
        owner_start BIGINT NULL,
        lease_until BIGINT NOT NULL,
        KEY pcr_email_mailbox_leases_owner (owner_run)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS pcr_email_alerts (
        id BINARY(32) NOT NULL PRIMARY KEY,
        alert_key TEXT NOT NULL,
        daily TINYINT NOT NULL DEFAULT 0,
        first_at BIGINT NOT NULL,
        KEY pcr_email_alerts_daily (daily, first_at)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
];

/// The tables of schema version 1, for the migration tool's emptiness check.
pub const TABLES: &[&str] = &[
    "pcr_email_ledger",
    "pcr_email_imap_marks",
    "pcr_email_kv",
    "pcr_email_sent",
    "pcr_email_tokens",
    "pcr_email_pending_auth",
    "pcr_email_alerts",
    "pcr_email_mailbox_leases",
];

const LEDGER_ENTRY: &str = "account, msg_key, mailbox_ref, state, outcome, sd_number, attempts, \
                            last_error, owner_run, first_seen, updated_at";

fn entry_from(mut r: Row) -> mysql::Result<LedgerEntry> {
    let state: String = get(&mut r, 3)?;
    let state = LedgerState::parse(&state).ok_or_else(|| {
        mysql::Error::FromValueError(Value::from(format!("unknown ledger state {state:?}")))
    })?;
    Ok(entry_parts(
        get(&mut r, 0)?,
        get(&mut r, 1)?,
        get(&mut r, 2)?,
        state,
        get(&mut r, 4)?,
        get(&mut r, 5)?,
        get(&mut r, 6)?,
        get(&mut r, 7)?,
        get(&mut r, 8)?,
        get(&mut r, 9)?,
        get(&mut r, 10)?,
    ))
}

/// A settled message as kept in the journal.
#[derive(serde::Serialize, serde::Deserialize)]
struct Journaled {
    account: String,
    key: String,
    outcome: String,
    sd_number: Option<String>,
}

impl MysqlStore {
    /// Connects, creates or upgrades the tables (once per process and database), and records
    /// what the journal under `state_dir` holds.
    pub(crate) fn open(dsn: &Dsn, state_dir: &Path) -> Result<MysqlStore> {
        let store = MysqlStore {
            dsn: dsn.clone(),
            conn: RefCell::new(None),
            journal: state_dir.join(JOURNAL_FILE),
        };
        store.connection().map_err(|e| store.open_error(e))?;
        Ok(store)
    }

    pub(crate) fn label(&self) -> String {
        self.dsn.label()
    }

    /// The journal's path (inside `STATE_DIR`).
    pub(crate) fn journal(&self) -> &Path {
        &self.journal
    }

    fn open_error(&self, e: mysql::Error) -> Error {
        crate::error::Error::config(
            crate::error::ConfigLocation {
                key: Some("STATE_DSN".to_string()),
                ..Default::default()
            },
            format!(
                "cannot use the state database {}: {}",
                self.dsn.label(),
                redact(&e)
            ),
        )
    }

    /// The open connection, opened (and the tables checked, the journal replayed) when there
    /// is none.
    fn connection(&self) -> mysql::Result<std::cell::RefMut<'_, Conn>> {
        let mut slot = self.conn.borrow_mut();
        if slot.is_none() {
            let mut conn = connect(&self.dsn, NET_TIMEOUT)?;
            migrate(&mut conn, &self.dsn)?;
            replay_journal(&mut conn, &self.journal)?;
            *slot = Some(conn);
        }
        Ok(std::cell::RefMut::map(slot, |c| {
            c.as_mut().expect("just opened")
        }))
    }

    /// Runs `f` in one transaction and commits it: a deadlock or lock wait timeout runs it
    /// again, a lost connection is opened again once.
    fn run<T>(
        &self,
        account: &str,
        what: &str,
        mut f: impl FnMut(Tx<'_, '_>) -> mysql::Result<T>,
    ) -> Result<T> {
        let mut reconnected = false;
        let mut attempt = 0;
        loop {
            let result = (|| {
                let mut conn = self.connection()?;
                let mut tx = conn.start_transaction(TxOpts::default())?;
                let value = f(&mut tx)?;
                tx.commit()?;
                Ok(value)
            })();
            match result {
                Ok(v) => return Ok(v),
                Err(e) if is_retryable(&e) && attempt < RETRIES => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(
                        rand::random::<u64>() % (20 * attempt as u64) + 1,
                    ));
                }
                Err(e) if is_connection_lost(&e) && !reconnected => {
                    reconnected = true;
                    *self.conn.borrow_mut() = None;
                }
                Err(e) => {
                    if is_connection_lost(&e) {
                        *self.conn.borrow_mut() = None;
                    }
                    return Err(Error::mailbox(
                        account,
                        &self.dsn.label(),
                        format!("state database: cannot {what}: {}", redact(&e)),
                    ));
                }
            }
        }
    }

    // ---- Ledger -----------------------------------------------------------------------

    pub(crate) fn claim(
        &self,
        account: &str,
        key: &str,
        mailbox_ref: Option<&str>,
        owner: &Owner,
        lease_until: i64,
        renew: bool,
    ) -> Result<Claim> {
        self.run(account, "claim a message", |tx| {
            claim_in(tx, account, key, mailbox_ref, owner, lease_until, renew)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn settle_then_claim(
        &self,
        settled: &Settled,
        account: &str,
        key: &str,
        mailbox_ref: Option<&str>,
        owner: &Owner,
        lease_until: i64,
        renew: bool,
    ) -> Result<Claim> {
        self.run(account, "record a message and claim the next", |tx| {
            settle_in(
                tx,
                &settled.account,
                &settled.key,
                LedgerState::Done,
                &settled.outcome.to_db(),
                settled.sd_number.as_deref(),
                None,
            )?;
            claim_in(tx, account, key, mailbox_ref, owner, lease_until, renew)
        })
    }

    /// Records a message as settled; a done record the database refused goes to the journal.
    pub(crate) fn settle(
        &self,
        account: &str,
        key: &str,
        state: LedgerState,
        outcome: &str,
        sd_number: Option<&str>,
        error: Option<&str>,
    ) -> Result<()> {
        let result = self.run(account, "record a processed message", |tx| {
            settle_in(tx, account, key, state, outcome, sd_number, error)
        });
        if let Err(Error::Mailbox(failure)) = &result {
            if state == LedgerState::Done {
                let entry = Journaled {
                    account: account.to_string(),
                    key: key.to_string(),
                    outcome: outcome.to_string(),
                    sd_number: sd_number.map(str::to_string),
                };
                let kept = match append_journal(&self.journal, &entry) {
                    Ok(()) => format!(
                        "kept in {} and recorded when the database is back",
                        self.journal.display()
                    ),
                    Err(j) => format!(
                        "and it could not be kept in {}: {j}",
                        self.journal.display()
                    ),
                };
                return Err(Error::mailbox(
                    account,
                    &self.dsn.label(),
                    format!("{}; {kept}", failure.message),
                ));
            }
        }
        result
    }

    pub(crate) fn fail(&self, account: &str, key: &str, error: &str) -> Result<u32> {
        let (now, error) = (now_ms(), truncate(error));
        let rid = id(&[account, key]);
        self.run(account, "record a failed message", |tx| {
            let row = first(
                tx,
                "SELECT state, attempts FROM pcr_email_ledger WHERE id=? FOR UPDATE",
                p![rid],
            )?;
            match row {
                None => {
                    exec(
                        tx,
                        "INSERT INTO pcr_email_ledger (id, account_id, account, msg_key, state,
                           attempts, last_error, first_seen, updated_at)
                         VALUES (?, ?, ?, ?, 'failed', 1, ?, ?, ?)",
                        p![rid, id(&[account]), account, key, error.as_str(), now, now],
                    )?;
                    Ok(1)
                }
                Some(mut r) => {
                    let state: String = get(&mut r, 0)?;
                    let attempts: u32 = get(&mut r, 1)?;
                    if state == "done" || state == "quarantined" {
                        return Ok(attempts);
                    }
                    let attempts = attempts.saturating_add(1);
                    exec(
                        tx,
                        &format!(
                            "UPDATE pcr_email_ledger SET state='failed', attempts=?,
                               last_error=?, updated_at=?, {CLEAR_OWNER} WHERE id=?"
                        ),
                        p![attempts, error.as_str(), now, rid],
                    )?;
                    Ok(attempts)
                }
            }
        })
    }

    pub(crate) fn release(&self, account: &str, key: &str, owner: &Owner) -> Result<bool> {
        let rid = id(&[account, key]);
        self.run(account, "release a message", |tx| {
            release_where(tx, owner.run_id(), Some(rid)).map(|n| n > 0)
        })
    }

    pub(crate) fn release_owned(&self, owner: &Owner) -> Result<usize> {
        self.run(super::NO_ACCOUNT, "release the run's messages", |tx| {
            exec(
                tx,
                "DELETE FROM pcr_email_mailbox_leases WHERE owner_run=?",
                p![owner.run_id()],
            )?;
            release_where(tx, owner.run_id(), None).map(|n| n as usize)
        })
    }

    pub(crate) fn renew_lease(&self, owner: &Owner, lease_until: i64) -> Result<usize> {
        self.run(super::NO_ACCOUNT, "renew the run's lease", |tx| {
            exec(
                tx,
                "UPDATE pcr_email_mailbox_leases SET lease_until=? WHERE owner_run=?",
                p![lease_until, owner.run_id()],
            )?;
            exec(
                tx,
                "UPDATE pcr_email_ledger SET lease_until=?
                 WHERE owner_run=? AND state='in_progress'",
                p![lease_until, owner.run_id()],
            )
            .map(|n| n as usize)
        })
    }

    /// Takes the lease of mailbox `scope` for `owner` (see [`super::StateStore::take_mailbox`]):
    /// `None` when it is now `owner`'s, else the holder that keeps it.
    pub(crate) fn take_mailbox(
        &self,
        scope: &str,
        owner: &Owner,
        lease_until: i64,
    ) -> Result<Option<String>> {
        let rid = id(&[scope]);
        let start = i64::try_from(owner.start_ticks()).unwrap_or(i64::MAX);
        self.run(scope, "take the mailbox's lease", |tx| {
            let inserted = exec(
                tx,
                "INSERT INTO pcr_email_mailbox_leases (id, scope, owner_run, owner_host,
                   owner_machine, owner_boot, owner_pidns, owner_pid, owner_start, lease_until)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE id=id",
                p![
                    rid,
                    scope,
                    owner.run_id(),
                    owner.host(),
                    owner.machine_id(),
                    owner.boot_id(),
                    owner.pid_ns(),
                    owner.pid(),
                    start,
                    lease_until
                ],
            )?;
            if inserted == 1 {
                return Ok(None);
            }
            let Some(mut r) = first(
                tx,
                "SELECT owner_run, owner_host, owner_machine, owner_boot, owner_pidns, owner_pid,
                   owner_start, lease_until FROM pcr_email_mailbox_leases WHERE id=? FOR UPDATE",
                p![rid],
            )?
            else {
                return Err(mysql::Error::MySqlError(mysql::MySqlError {
                    state: "40001".into(),
                    message: "the lease went away while it was taken".into(),
                    code: 1213,
                }));
            };
            let held = StoredOwner {
                state: "in_progress".into(),
                outcome: None,
                attempts: 0,
                run: get(&mut r, 0)?,
                host: get(&mut r, 1)?,
                machine: get(&mut r, 2)?,
                boot: get(&mut r, 3)?,
                pidns: get(&mut r, 4)?,
                pid: get(&mut r, 5)?,
                start: get(&mut r, 6)?,
                lease_until: get(&mut r, 7)?,
                mailbox_ref: None,
            };
            let ours = held.run.as_deref() == Some(owner.run_id());
            if !ours && takeover(&held, owner, now_ms()).is_none() {
                return Ok(Some(held.run.unwrap_or_default()));
            }
            exec(
                tx,
                "UPDATE pcr_email_mailbox_leases SET owner_run=?, owner_host=?, owner_machine=?,
                   owner_boot=?, owner_pidns=?, owner_pid=?, owner_start=?, lease_until=?
                 WHERE id=?",
                p![
                    owner.run_id(),
                    owner.host(),
                    owner.machine_id(),
                    owner.boot_id(),
                    owner.pid_ns(),
                    owner.pid(),
                    start,
                    lease_until,
                    rid
                ],
            )?;
            Ok(None)
        })
    }

    pub(crate) fn move_ledger_scope(&self, from: &str, to: &str) -> Result<()> {
        let from_id = id(&[from]);
        let any = self.run(to, "look up an earlier ledger", |tx| {
            first(
                tx,
                "SELECT 1 FROM pcr_email_ledger WHERE account_id=? LIMIT 1",
                p![from_id],
            )
            .map(|r| r.is_some())
        })?;
        if !any {
            return Ok(());
        }
        self.run(to, "move an earlier ledger", |tx| {
            let rows: Vec<(Vec<u8>, String)> = tx.exec(
                "SELECT id, msg_key FROM pcr_email_ledger WHERE account_id=? FOR UPDATE",
                p![from_id],
            )?;
            for (old, key) in rows {
                let new = id(&[to, &key]);
                exec(
                    tx,
                    "UPDATE IGNORE pcr_email_ledger SET id=?, account_id=?, account=? WHERE id=?",
                    p![new, id(&[to]), to, old],
                )?;
            }
            exec(
                tx,
                "DELETE FROM pcr_email_ledger WHERE account_id=?",
                p![from_id],
            )
            .map(drop)
        })
    }

    pub(crate) fn entry(&self, account: &str, key: &str) -> Result<Option<LedgerEntry>> {
        let rid = id(&[account, key]);
        self.run(account, "read the ledger", |tx| {
            first(
                tx,
                &format!("SELECT {LEDGER_ENTRY} FROM pcr_email_ledger WHERE id=?"),
                p![rid],
            )?
            .map(entry_from)
            .transpose()
        })
    }

    pub(crate) fn entry_by_ref(
        &self,
        account: &str,
        mailbox_ref: &str,
    ) -> Result<Option<LedgerEntry>> {
        let (aid, rid) = (id(&[account]), id(&[mailbox_ref]));
        self.run(account, "read the ledger", |tx| {
            first(
                tx,
                &format!(
                    "SELECT {LEDGER_ENTRY} FROM pcr_email_ledger WHERE account_id=? AND ref_id=?
                     ORDER BY updated_at DESC LIMIT 1"
                ),
                p![aid, rid],
            )?
            .map(entry_from)
            .transpose()
        })
    }

    pub(crate) fn quarantined(&self, account: &str) -> Result<Vec<LedgerEntry>> {
        let aid = id(&[account]);
        self.run(account, "read the ledger", |tx| {
            let rows: Vec<Row> = tx.exec(
                format!(
                    "SELECT {LEDGER_ENTRY} FROM pcr_email_ledger
                     WHERE account_id=? AND state='quarantined' ORDER BY first_seen"
                ),
                p![aid],
            )?;
            rows.into_iter().map(entry_from).collect()
        })
    }

    pub(crate) fn counts(&self, account: &str) -> Result<LedgerCounts> {
        let aid = id(&[account]);
        self.run(account, "count the ledger", |tx| {
            let rows: Vec<(String, i64, u64)> = tx.exec(
                "SELECT state, LEFT(COALESCE(outcome, ''), ?) = ?, COUNT(*)
                 FROM pcr_email_ledger WHERE account_id=? GROUP BY 1, 2",
                p![SKIPPED_PREFIX.len() as u64, SKIPPED_PREFIX, aid],
            )?;
            let mut counts = LedgerCounts::default();
            for (state, skipped, n) in rows {
                match LedgerState::parse(&state) {
                    Some(LedgerState::InProgress) => counts.in_progress += n,
                    Some(LedgerState::Failed) => counts.failed += n,
                    Some(LedgerState::Done) if skipped != 0 => counts.skipped += n,
                    Some(LedgerState::Done) => counts.done += n,
                    Some(LedgerState::Quarantined) => counts.quarantined += n,
                    None => {}
                }
            }
            Ok(counts)
        })
    }

    pub(crate) fn forget(&self, account: &str, key: &str) -> Result<bool> {
        let rid = id(&[account, key]);
        self.run(account, "forget a message", |tx| {
            exec(tx, "DELETE FROM pcr_email_ledger WHERE id=?", p![rid]).map(|n| n > 0)
        })
    }

    // ---- Marks and cursors ------------------------------------------------------------

    pub(crate) fn imap_mark(&self, account: &str, folder: &str) -> Result<Option<(u32, u32)>> {
        let rid = id(&[account, folder]);
        self.run(account, "read the IMAP mark", |tx| {
            tx.exec_first(
                "SELECT uidvalidity, low_water_uid FROM pcr_email_imap_marks WHERE id=?",
                p![rid],
            )
        })
    }

    pub(crate) fn set_imap_mark(
        &self,
        account: &str,
        folder: &str,
        uidvalidity: u32,
        low_water_uid: u32,
    ) -> Result<()> {
        let rid = id(&[account, folder]);
        self.run(account, "save the IMAP mark", |tx| {
            exec(
                tx,
                "INSERT INTO pcr_email_imap_marks (id, account, folder, uidvalidity,
                   low_water_uid, updated_at) VALUES (?, ?, ?, ?, ?, ?)
                 ON DUPLICATE KEY UPDATE uidvalidity=VALUES(uidvalidity),
                   low_water_uid=VALUES(low_water_uid), updated_at=VALUES(updated_at)",
                p![rid, account, folder, uidvalidity, low_water_uid, now_ms()],
            )
            .map(drop)
        })
    }

    pub(crate) fn get_kv(&self, namespace: &str, key: &str) -> Result<Option<String>> {
        let rid = id(&[namespace, key]);
        self.run(super::NO_ACCOUNT, "read a saved cursor", |tx| {
            tx.exec_first("SELECT value FROM pcr_email_kv WHERE id=?", p![rid])
        })
    }

    pub(crate) fn set_kv(&self, namespace: &str, key: &str, value: &str) -> Result<()> {
        let rid = id(&[namespace, key]);
        self.run(super::NO_ACCOUNT, "save a cursor", |tx| {
            exec(
                tx,
                "INSERT INTO pcr_email_kv (id, namespace, kv_key, value, updated_at)
                 VALUES (?, ?, ?, ?, ?)
                 ON DUPLICATE KEY UPDATE value=VALUES(value), updated_at=VALUES(updated_at)",
                p![rid, namespace, key, value, now_ms()],
            )
            .map(drop)
        })
    }

    pub(crate) fn delete_kv(&self, namespace: &str, key: &str) -> Result<bool> {
        let rid = id(&[namespace, key]);
        self.run(super::NO_ACCOUNT, "delete a cursor", |tx| {
            exec(tx, "DELETE FROM pcr_email_kv WHERE id=?", p![rid]).map(|n| n > 0)
        })
    }

    // ---- Sent Message-IDs -------------------------------------------------------------

    pub(crate) fn record_sent(&self, id_text: &str, sd_number: &str, account: &str) -> Result<()> {
        let rid = id(&[id_text]);
        self.run(account, "record a sent Message-ID", |tx| {
            exec(
                tx,
                "INSERT INTO pcr_email_sent (id, message_id, sd_number, account, sent_at)
                 VALUES (?, ?, ?, ?, ?)
                 ON DUPLICATE KEY UPDATE sd_number=VALUES(sd_number), account=VALUES(account),
                   sent_at=VALUES(sent_at)",
                p![rid, id_text, sd_number, account, now_ms()],
            )
            .map(drop)
        })
    }

    pub(crate) fn sent_sd_number(&self, id_text: &str) -> Result<Option<String>> {
        let rid = id(&[id_text]);
        self.run(super::NO_ACCOUNT, "look up a sent Message-ID", |tx| {
            tx.exec_first("SELECT sd_number FROM pcr_email_sent WHERE id=?", p![rid])
        })
    }

    // ---- Tokens -----------------------------------------------------------------------

    pub(crate) fn load_token(&self, account: &str, kind: &str) -> Result<Option<StoredToken>> {
        let rid = id(&[account, kind]);
        self.run(account, "read a stored token", |tx| {
            let row: Option<(String, Option<i64>, i64)> = tx.exec_first(
                "SELECT value, expires_at, version FROM pcr_email_tokens WHERE id=?",
                p![rid],
            )?;
            Ok(row.map(|(value, expires_at, version)| StoredToken {
                value: Secret::new(value),
                expires_at,
                version,
            }))
        })
    }

    /// `decide(stored version)`: `Some(new version)` to store the token, `None` to leave it.
    pub(crate) fn put_token(
        &self,
        account: &str,
        kind: &str,
        value: &str,
        expires_at: Option<i64>,
        mut decide: impl FnMut(Option<i64>) -> Option<i64>,
    ) -> Result<Option<i64>> {
        let rid = id(&[account, kind]);
        self.run(account, "save a token", |tx| {
            let current: Option<i64> = tx.exec_first(
                "SELECT version FROM pcr_email_tokens WHERE id=? FOR UPDATE",
                p![rid],
            )?;
            let Some(version) = decide(current) else {
                return Ok(None);
            };
            exec(
                tx,
                "INSERT INTO pcr_email_tokens (id, account, kind, value, expires_at, version,
                   updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)
                 ON DUPLICATE KEY UPDATE value=VALUES(value), expires_at=VALUES(expires_at),
                   version=VALUES(version), updated_at=VALUES(updated_at)",
                p![rid, account, kind, value, expires_at, version, now_ms()],
            )?;
            Ok(Some(version))
        })
    }

    pub(crate) fn delete_token(&self, account: &str, kind: &str) -> Result<bool> {
        let rid = id(&[account, kind]);
        self.run(account, "delete a token", |tx| {
            exec(tx, "DELETE FROM pcr_email_tokens WHERE id=?", p![rid]).map(|n| n > 0)
        })
    }

    // ---- Pending authorizations -------------------------------------------------------

    pub(crate) fn put_pending_auth(
        &self,
        state: &str,
        data: &str,
        expires_at: i64,
    ) -> Result<bool> {
        let (now, rid) = (now_secs(), id(&[state]));
        self.run(super::NO_ACCOUNT, "save a pending authorization", |tx| {
            exec(
                tx,
                "DELETE FROM pcr_email_pending_auth WHERE expires_at < ?",
                p![now - PENDING_AUTH_GRACE_SECS],
            )?;
            exec(
                tx,
                "INSERT INTO pcr_email_pending_auth (id, state, data, expires_at, created_at)
                 VALUES (?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE id=id",
                p![rid, state, data, expires_at, now],
            )
            .map(|n| n == 1)
        })
    }

    pub(crate) fn take_pending_auth(&self, state: &str) -> Result<PendingAuth> {
        let (now, rid) = (now_secs(), id(&[state]));
        self.run(super::NO_ACCOUNT, "take a pending authorization", |tx| {
            let row: Option<(String, i64)> = tx.exec_first(
                "SELECT data, expires_at FROM pcr_email_pending_auth WHERE id=? FOR UPDATE",
                p![rid],
            )?;
            let Some((data, expires_at)) = row else {
                return Ok(PendingAuth::Unknown);
            };
            exec(tx, "DELETE FROM pcr_email_pending_auth WHERE id=?", p![rid])?;
            Ok(if expires_at <= now {
                PendingAuth::Expired
            } else {
                PendingAuth::Valid(Secret::new(data))
            })
        })
    }

    // ---- Alerts -----------------------------------------------------------------------

    pub(crate) fn alert_once(&self, key: &str, daily: bool) -> Result<bool> {
        let now = now_ms();
        let full = if daily {
            format!("daily:{}:{key}", now / 86_400_000)
        } else {
            key.to_string()
        };
        let rid = id(&[&full]);
        self.run(super::NO_ACCOUNT, "record an alert", |tx| {
            if daily {
                exec(
                    tx,
                    "DELETE FROM pcr_email_alerts WHERE daily=1 AND first_at < ?",
                    p![now - 2 * 86_400_000],
                )?;
            }
            exec(
                tx,
                "INSERT INTO pcr_email_alerts (id, alert_key, daily, first_at)
                 VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE id=id",
                p![rid, full.as_str(), i32::from(daily), now],
            )
            .map(|n| n == 1)
        })
    }

    pub(crate) fn clear_alert(&self, key: &str) -> Result<bool> {
        let rid = id(&[key]);
        self.run(super::NO_ACCOUNT, "clear an alert", |tx| {
            exec(tx, "DELETE FROM pcr_email_alerts WHERE id=?", p![rid]).map(|n| n > 0)
        })
    }

    // ---- Copying a store (pcr-email-state migrate) ------------------------------------

    /// Copies every row of the SQLite store `from` into this database, in one transaction,
    /// refusing a database whose `pcr_email_` tables already hold a row. Returns how many rows
    /// each table received.
    pub(crate) fn copy_from(&self, from: &Connection) -> Result<Vec<(&'static str, u64)>> {
        let fail = |what: &str, e: rusqlite::Error| {
            Error::message(format!("cannot read the SQLite state store ({what}): {e}"))
        };
        let rows = read_sqlite(from).map_err(|e| fail("its rows", e))?;
        let mut refused = false;
        let copied = self.run(super::NO_ACCOUNT, "copy the state store", |tx| {
            for table in TABLES {
                if first(
                    tx,
                    &format!("SELECT 1 FROM {table} LIMIT 1 FOR UPDATE"),
                    vec![],
                )?
                .is_some()
                {
                    refused = true;
                    return Ok(Vec::new());
                }
            }
            let mut counts = Vec::new();
            for (table, sql, list) in &rows {
                for params in list {
                    exec(tx, sql, params.clone())?;
                }
                counts.push((*table, list.len() as u64));
            }
            Ok(counts)
        })?;
        if refused {
            return Err(Error::message(format!(
                "the database {} already holds pcr_email_ state: nothing was copied (migrate \
                 only into a database whose pcr_email_ tables are empty)",
                self.dsn.label()
            )));
        }
        Ok(copied)
    }
}

type CopyRows = Vec<(&'static str, &'static str, Vec<Vec<Value>>)>;

/// Every row of a SQLite store as the inserts of the database's tables.
fn read_sqlite(c: &Connection) -> rusqlite::Result<CopyRows> {
    let text = |r: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<Option<String>> { r.get(i) };
    let int = |r: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<Option<i64>> { r.get(i) };
    let val = |v: Option<String>| v.map_or(Value::NULL, Value::from);
    let num = |v: Option<i64>| v.map_or(Value::NULL, Value::from);
    let mut out: CopyRows = Vec::new();

    let mut stmt = c.prepare(
        "SELECT account, key, mailbox_ref, state, outcome, sd_number, attempts, last_error,
           owner_run, owner_host, owner_machine, owner_boot, owner_pidns, owner_pid,
           owner_start, lease_until, first_seen, updated_at FROM ledger",
    )?;
    let ledger = stmt
        .query_map([], |r| {
            let account: String = r.get(0)?;
            let key: String = r.get(1)?;
            let mref = text(r, 2)?;
            let mut row = p![
                id(&[&account, &key]),
                id(&[&account]),
                account.as_str(),
                key.as_str()
            ];
            row.push(
                mref.as_deref()
                    .map(|m| id(&[m]))
                    .map_or(Value::NULL, Value::from),
            );
            row.push(val(mref));
            row.push(Value::from(r.get::<_, String>(3)?));
            row.push(val(text(r, 4)?));
            row.push(val(text(r, 5)?));
            row.push(num(int(r, 6)?));
            for i in 7..=12 {
                row.push(val(text(r, i)?));
            }
            for i in 13..=17 {
                row.push(num(int(r, i)?));
            }
            Ok(row)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    out.push((
        "ledger",
        "INSERT INTO pcr_email_ledger (id, account_id, account, msg_key, ref_id, mailbox_ref,
           state, outcome, sd_number, attempts, last_error, owner_run, owner_host,
           owner_machine, owner_boot, owner_pidns, owner_pid, owner_start, lease_until,
           first_seen, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ledger,
    ));

    let mut stmt = c.prepare(
        "SELECT account, folder, uidvalidity, low_water_uid, updated_at FROM imap_marks",
    )?;
    let marks = stmt
        .query_map([], |r| {
            let (a, f): (String, String) = (r.get(0)?, r.get(1)?);
            Ok(p![
                id(&[&a, &f]),
                a.as_str(),
                f.as_str(),
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?
            ])
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    out.push((
        "imap_marks",
        "INSERT INTO pcr_email_imap_marks (id, account, folder, uidvalidity, low_water_uid,
           updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        marks,
    ));

    let mut stmt = c.prepare("SELECT namespace, key, value, updated_at FROM kv")?;
    let kv = stmt
        .query_map([], |r| {
            let (n, k): (String, String) = (r.get(0)?, r.get(1)?);
            Ok(p![
                id(&[&n, &k]),
                n.as_str(),
                k.as_str(),
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?
            ])
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    out.push((
        "kv",
        "INSERT INTO pcr_email_kv (id, namespace, kv_key, value, updated_at)
         VALUES (?, ?, ?, ?, ?)",
        kv,
    ));

    let mut stmt = c.prepare("SELECT message_id, sd_number, account, sent_at FROM sent")?;
    let sent = stmt
        .query_map([], |r| {
            let m: String = r.get(0)?;
            Ok(p![
                id(&[&m]),
                m.as_str(),
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?
            ])
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    out.push((
        "sent",
        "INSERT INTO pcr_email_sent (id, message_id, sd_number, account, sent_at)
         VALUES (?, ?, ?, ?, ?)",
        sent,
    ));

    let mut stmt =
        c.prepare("SELECT account, kind, value, expires_at, version, updated_at FROM tokens")?;
    let tokens = stmt
        .query_map([], |r| {
            let (a, k): (String, String) = (r.get(0)?, r.get(1)?);
            Ok(p![
                id(&[&a, &k]),
                a.as_str(),
                k.as_str(),
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?
            ])
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    out.push((
        "tokens",
        "INSERT INTO pcr_email_tokens (id, account, kind, value, expires_at, version,
           updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        tokens,
    ));

    let mut stmt = c.prepare("SELECT state, data, expires_at, created_at FROM pending_auth")?;
    let pending = stmt
        .query_map([], |r| {
            let st: String = r.get(0)?;
            Ok(p![
                id(&[&st]),
                st.as_str(),
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?
            ])
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    out.push((
        "pending_auth",
        "INSERT INTO pcr_email_pending_auth (id, state, data, expires_at, created_at)
         VALUES (?, ?, ?, ?, ?)",
        pending,
    ));

    let mut stmt = c.prepare("SELECT key, first_at FROM alerts")?;
    let alerts = stmt
        .query_map([], |r| {
            let k: String = r.get(0)?;
            Ok(p![
                id(&[&k]),
                k.as_str(),
                i32::from(k.starts_with("daily:")),
                r.get::<_, i64>(1)?
            ])
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    out.push((
        "alerts",
        "INSERT INTO pcr_email_alerts (id, alert_key, daily, first_at) VALUES (?, ?, ?, ?)",
        alerts,
    ));
    Ok(out)
}

const CLEAR_OWNER: &str =
    "owner_run=NULL, owner_host=NULL, owner_machine=NULL, owner_boot=NULL, owner_pidns=NULL, \
     owner_pid=NULL, owner_start=NULL, lease_until=NULL";

#[allow(clippy::too_many_arguments)]
fn claim_in(
    tx: Tx<'_, '_>,
    account: &str,
    key: &str,
    mailbox_ref: Option<&str>,
    owner: &Owner,
    lease_until: i64,
    renew: bool,
) -> mysql::Result<Claim> {
    let now = now_ms();
    if renew {
        exec(
            tx,
            "UPDATE pcr_email_ledger SET lease_until=? WHERE owner_run=? AND state='in_progress'",
            p![lease_until, owner.run_id()],
        )?;
    }
    let rid = id(&[account, key]);
    let ref_id = mailbox_ref.map(|r| id(&[r]).to_vec());
    let start = i64::try_from(owner.start_ticks()).unwrap_or(i64::MAX);
    let inserted = exec(
        tx,
        "INSERT INTO pcr_email_ledger (id, account_id, account, msg_key, mailbox_ref, ref_id,
           state, attempts, owner_run, owner_host, owner_machine, owner_boot, owner_pidns,
           owner_pid, owner_start, lease_until, first_seen, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, 'in_progress', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE id=id",
        p![
            rid,
            id(&[account]),
            account,
            key,
            mailbox_ref,
            ref_id.clone(),
            owner.run_id(),
            owner.host(),
            owner.machine_id(),
            owner.boot_id(),
            owner.pid_ns(),
            owner.pid(),
            start,
            lease_until,
            now,
            now
        ],
    )?;
    if inserted == 1 {
        return Ok(Claim::New);
    }
    let Some(mut r) = first(
        tx,
        "SELECT state, outcome, attempts, owner_run, owner_host, owner_machine, owner_boot,
           owner_pidns, owner_pid, owner_start, lease_until, mailbox_ref
         FROM pcr_email_ledger WHERE id=? FOR UPDATE",
        p![rid],
    )?
    else {
        // Removed between the insert and the read (a release): a deadlock-like retry.
        return Err(mysql::Error::MySqlError(mysql::MySqlError {
            state: "40001".into(),
            message: "the row went away during the claim".into(),
            code: 1213,
        }));
    };
    let row = StoredOwner {
        state: get(&mut r, 0)?,
        outcome: get(&mut r, 1)?,
        attempts: get(&mut r, 2)?,
        run: get(&mut r, 3)?,
        host: get(&mut r, 4)?,
        machine: get(&mut r, 5)?,
        boot: get(&mut r, 6)?,
        pidns: get(&mut r, 7)?,
        pid: get(&mut r, 8)?,
        start: get(&mut r, 9)?,
        lease_until: get(&mut r, 10)?,
        mailbox_ref: get(&mut r, 11)?,
    };
    if let Some(given) = mailbox_ref.filter(|_| row.state != "done") {
        if row.mailbox_ref.as_deref() != Some(given) {
            exec(
                tx,
                "UPDATE pcr_email_ledger SET mailbox_ref=?, ref_id=? WHERE id=?",
                p![given, ref_id, rid],
            )?;
        }
    }
    let set_owner = |tx: Tx<'_, '_>, attempts: u32, why: Option<&str>| {
        exec(
            tx,
            "UPDATE pcr_email_ledger SET state='in_progress', attempts=?,
               last_error=COALESCE(?, last_error), owner_run=?, owner_host=?, owner_machine=?,
               owner_boot=?, owner_pidns=?, owner_pid=?, owner_start=?, lease_until=?,
               updated_at=?
             WHERE id=?",
            p![
                attempts,
                why,
                owner.run_id(),
                owner.host(),
                owner.machine_id(),
                owner.boot_id(),
                owner.pid_ns(),
                owner.pid(),
                start,
                lease_until,
                now_ms(),
                rid
            ],
        )
    };
    match LedgerState::parse(&row.state) {
        Some(LedgerState::Done) => Ok(Claim::Done {
            outcome: LedgerOutcome::from_db(row.outcome.as_deref().unwrap_or_default()),
            same_copy: match (&row.mailbox_ref, mailbox_ref) {
                (Some(stored), Some(given)) => stored == given,
                _ => true,
            },
        }),
        Some(LedgerState::Quarantined) => Ok(Claim::Quarantined),
        Some(LedgerState::Failed) => {
            set_owner(tx, row.attempts, None)?;
            Ok(Claim::Retry {
                attempts: row.attempts,
            })
        }
        Some(LedgerState::InProgress) | None => match takeover(&row, owner, now) {
            None => Ok(Claim::Busy),
            Some((attempts, why)) => {
                set_owner(tx, attempts, Some(&why))?;
                Ok(Claim::Retry { attempts })
            }
        },
    }
}

fn settle_in(
    tx: Tx<'_, '_>,
    account: &str,
    key: &str,
    state: LedgerState,
    outcome: &str,
    sd_number: Option<&str>,
    error: Option<&str>,
) -> mysql::Result<()> {
    let (now, rid) = (now_ms(), id(&[account, key]));
    let error = error.map(truncate);
    let current: Option<String> = tx.exec_first(
        "SELECT state FROM pcr_email_ledger WHERE id=? FOR UPDATE",
        p![rid],
    )?;
    match current.as_deref() {
        Some("done") => Ok(()),
        Some(_) => exec(
            tx,
            &format!(
                "UPDATE pcr_email_ledger SET state=?, outcome=?, sd_number=?,
                   last_error=COALESCE(?, last_error), updated_at=?, {CLEAR_OWNER}
                 WHERE id=?"
            ),
            p![state.as_str(), outcome, sd_number, error, now, rid],
        )
        .map(drop),
        None => exec(
            tx,
            "INSERT INTO pcr_email_ledger (id, account_id, account, msg_key, state, outcome,
               sd_number, attempts, last_error, first_seen, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
            p![
                rid,
                id(&[account]),
                account,
                key,
                state.as_str(),
                outcome,
                sd_number,
                error,
                now,
                now
            ],
        )
        .map(drop),
    }
}

/// Releases the in-progress rows of `run` (only row `only` when given): rows without a failed
/// attempt are removed, the others go back to `failed`.
fn release_where(tx: Tx<'_, '_>, run: &str, only: Option<[u8; 32]>) -> mysql::Result<u64> {
    let (filter, extra) = match only {
        Some(rid) => (" AND id=?", vec![Value::from(rid)]),
        None => ("", vec![]),
    };
    let mut params = p![run];
    params.extend(extra.clone());
    let removed = exec(
        tx,
        &format!(
            "DELETE FROM pcr_email_ledger WHERE owner_run=? AND state='in_progress'
             AND attempts=0{filter}"
        ),
        params.clone(),
    )?;
    let returned = exec(
        tx,
        &format!(
            "UPDATE pcr_email_ledger SET state='failed', {CLEAR_OWNER}
             WHERE owner_run=? AND state='in_progress'{filter}"
        ),
        params,
    )?;
    Ok(removed + returned)
}

/// Creates or upgrades the tables, once per process and database, under a named lock so
/// that two servers starting at once do not both upgrade.
fn migrate(conn: &mut Conn, dsn: &Dsn) -> mysql::Result<()> {
    let label = dsn.label();
    if MIGRATED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&label)
    {
        return Ok(());
    }
    let lock = lock_name("migrate", &dsn.database);
    let got: Option<Option<i64>> = conn.exec_first("SELECT GET_LOCK(?, ?)", (&lock, 60))?;
    if got.flatten() != Some(1) {
        return Err(mysql::Error::MySqlError(mysql::MySqlError {
            state: "HY000".into(),
            message: "another process has been creating the pcr_email_ tables for 60 s".into(),
            code: 1205,
        }));
    }
    let result = (|| {
        conn.query_drop(
            "CREATE TABLE IF NOT EXISTS pcr_email_schema (
                name VARCHAR(64) NOT NULL PRIMARY KEY,
                version INT NOT NULL,
                updated_at BIGINT NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        )?;
        let version: Option<i64> = conn.exec_first(
            "SELECT version FROM pcr_email_schema WHERE name='state'",
            (),
        )?;
        let version = version.unwrap_or(0);
        if version > MYSQL_SCHEMA_VERSION {
            return Err(mysql::Error::MySqlError(mysql::MySqlError {
                state: "HY000".into(),
                message: format!(
                    "the pcr_email_ tables have schema version {version}, newer than this \
                     extension's {MYSQL_SCHEMA_VERSION}; upgrade the extension"
                ),
                code: 0,
            }));
        }
        if version < 1 {
            for sql in SCHEMA_V1 {
                conn.query_drop(sql)?;
            }
        }
        conn.exec_drop(
            "INSERT INTO pcr_email_schema (name, version, updated_at) VALUES ('state', ?, ?)
             ON DUPLICATE KEY UPDATE version=VALUES(version), updated_at=VALUES(updated_at)",
            (MYSQL_SCHEMA_VERSION, now_ms()),
        )?;
        Ok(())
    })();
    let _ = conn.exec_drop("DO RELEASE_LOCK(?)", (&lock,));
    result?;
    MIGRATED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(label);
    Ok(())
}

/// A server-wide lock name (GET_LOCK names are at most 64 characters) for `what` in `database`.
fn lock_name(what: &str, database: &str) -> String {
    let digest = id(&[database, what]);
    let hex: String = digest[..20].iter().map(|b| format!("{b:02x}")).collect();
    format!("pcr_email:{hex}")
}

/// The driver's error for a message: it names the user and host at most, never the password.
fn redact(e: &mysql::Error) -> String {
    match e {
        mysql::Error::DriverError(d) => format!("the database cannot be reached: {d}"),
        mysql::Error::IoError(io) => format!("the connection to the database failed: {io}"),
        other => other.to_string(),
    }
}

// ---- The journal of records the database refused ------------------------------------------

fn append_journal(path: &Path, entry: &Journaled) -> std::io::Result<()> {
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
fn replay_journal(conn: &mut Conn, path: &Path) -> mysql::Result<()> {
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

// ---- Named locks (OAuth refresh) ----------------------------------------------------------

/// A lock held in the database (`GET_LOCK`) on a connection of its own, so that processes on
/// several servers exclude each other; released when dropped (or when the connection ends,
/// which a killed process's does).
pub struct DatabaseLock {
    conn: Conn,
    name: String,
}

impl Drop for DatabaseLock {
    fn drop(&mut self) {
        let _ = self.conn.exec_drop("DO RELEASE_LOCK(?)", (&self.name,));
    }
}

/// Takes the lock `what` in `dsn`'s database, waiting at most `wait`.
pub fn database_lock(
    dsn: &Dsn,
    what: &str,
    wait: Duration,
) -> std::result::Result<DatabaseLock, String> {
    let mut conn = connect(dsn, wait + NET_TIMEOUT)
        .map_err(|e| format!("cannot reach the state database {}: {e}", dsn.label()))?;
    let name = lock_name(what, &dsn.database);
    let secs = wait.as_secs().max(1);
    let got: Option<Option<i64>> = conn
        .exec_first("SELECT GET_LOCK(?, ?)", (&name, secs))
        .map_err(|e| format!("cannot lock in the state database {}: {e}", dsn.label()))?;
    match got.flatten() {
        Some(1) => Ok(DatabaseLock { conn, name }),
        _ => Err(format!(
            "another process has been holding it in the state database for over {secs} s"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous() {
        assert_ne!(id(&["a", "bc"]), id(&["ab", "c"]));
        assert_eq!(id(&["a", "b"]), id(&["a", "b"]));
    }
}
