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
//! cannot be seen dying, nor told apart from this one by host name or machine id) or at once
//! when the holder was a process of this machine's running boot that is gone.
//! A mailbox is leased the same way (`pcr_email_mailbox_leases`, see
//! [`super::StateStore::take_mailbox`]): one run at a time reads it.
//!
//! # A database that goes away
//! An operation that cannot reach the database fails with an error naming the database (never
//! its password). A message the host already took but whose done record could not be written
//! because the connection was lost is written to a journal under `STATE_DIR`
//! (`pcr_email-unrecorded.jsonl`) and recorded in the database before anything else by the
//! next store of this server that reaches it: the next run of this server finds it done
//! instead of handing it over again (see [`journal`] for what the database refuses for good).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Conn, Row, Transaction, TxOpts, Value};
use sha2::{Digest, Sha256};

use super::NO_ACCOUNT;
use crate::config::dsn::Dsn;
use crate::error::{Error, Result};

/// The schema version of the `pcr_email_*` tables this code writes.
pub const MYSQL_SCHEMA_VERSION: i64 = 2;
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

// ---- The store --------------------------------------------------------------------------

/// One connection to the database, opened when needed.
pub(crate) struct MysqlStore {
    dsn: Dsn,
    conn: RefCell<Option<Conn>>,
    journal: PathBuf,
    /// Whether the last operation that failed lost its connection (rather than being refused).
    lost: std::cell::Cell<bool>,
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

/// The database's clock in milliseconds: leases are written and compared on it, so that a
/// server whose own clock runs ahead does not take over the live claims of another.
fn db_now(tx: Tx<'_, '_>) -> mysql::Result<i64> {
    let now: Option<i64> =
        tx.query_first("SELECT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)")?;
    now.ok_or(mysql::Error::FromValueError(Value::NULL))
}

macro_rules! p {
    ($($v:expr),* $(,)?) => { vec![$(Value::from($v)),*] };
}

// The operations by concern, declared after `p!` (which they use).
mod alerts;
mod conn;
mod copy;
mod journal;
mod kv;
mod lease;
mod ledger;
mod lock;
mod schema;
mod tokens;

use conn::{connect, is_connection_lost, is_retryable, redact};
use journal::replay_journal;
pub use lock::{database_lock, DatabaseLock};
use schema::migrate;
pub use schema::TABLES;

impl MysqlStore {
    /// Connects, creates or upgrades the tables (once per process and database), and records
    /// what the journal under `state_dir` holds.
    pub(crate) fn open(dsn: &Dsn, state_dir: &Path) -> Result<MysqlStore> {
        let store = MysqlStore {
            dsn: dsn.clone(),
            conn: RefCell::new(None),
            journal: state_dir.join(JOURNAL_FILE),
            lost: std::cell::Cell::new(false),
        };
        store.connection().map_err(|e| store.open_error(e))?;
        Ok(store)
    }

    /// The database this store lives in.
    pub(crate) fn dsn(&self) -> &Dsn {
        &self.dsn
    }

    pub(crate) fn label(&self) -> String {
        self.dsn.label()
    }

    /// The journal's path (inside `STATE_DIR`).
    pub(crate) fn journal(&self) -> &Path {
        &self.journal
    }

    /// Whether the last failed operation failed because the database could not be reached
    /// (a record then goes to the journal; one the database refused would be refused again).
    pub(crate) fn lost_connection(&self) -> bool {
        self.lost.get()
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
        f: impl FnMut(Tx<'_, '_>) -> mysql::Result<T>,
    ) -> Result<T> {
        self.run_with(TxOpts::default(), account, what, f)
    }

    /// [`Self::run`] with these transaction options (an isolation level).
    fn run_with<T>(
        &self,
        opts: TxOpts,
        account: &str,
        what: &str,
        mut f: impl FnMut(Tx<'_, '_>) -> mysql::Result<T>,
    ) -> Result<T> {
        let mut reconnected = false;
        let mut attempt = 0;
        loop {
            let result = (|| {
                let mut conn = self.connection()?;
                let mut tx = conn.start_transaction(opts)?;
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
                    self.lost.set(is_connection_lost(&e));
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
