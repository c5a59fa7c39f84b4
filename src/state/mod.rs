//! The state store: one SQLite database (`STATE_DIR/pcr_email.sqlite`) shared by every PHP
//! process that sends or receives mail.
//!
//! # What it holds
//! - `ledger`: one row per incoming message per account, keyed by the dedupe key (the
//!   Message-ID, or `sha256:<hex>` of the raw message). It is what makes a message become an
//!   Inquiry exactly once, across crashes, reruns and overlapping runs (see [`ledger`]).
//! - `imap_marks`: per account and folder, the UIDVALIDITY and the UID below which every
//!   message is settled; `kv`: other cursors (POP3, Graph, Gmail) by namespace and key.
//! - `sent`: the Message-IDs we sent, with the SD number and account (threading replies).
//! - `tokens`: OAuth tokens, already encrypted by the caller (opaque strings here), each with a
//!   version so that two processes refreshing at once never replace a newer token by an older.
//! - `pending_auth`: OAuth authorizations in flight (state → caller's data), taken once.
//! - `alerts`: "SYSADMIN was already told about this" markers.
//!
//! # Concurrency and crash safety
//! The database runs in WAL mode with `synchronous=NORMAL`: a committed transaction survives
//! `kill -9` of any process (SPEC §8: the WAL is written before the commit returns), and
//! readers never block the writer. Only a power loss can lose the last commits (it never
//! corrupts the file): those messages would be offered to the host again. That is the price of
//! not paying an fsync per message, which made the ledger the slowest part of a mail check. Every read-modify-write is one
//! `BEGIN IMMEDIATE` transaction: the write lock is taken up front, so two processes cannot both
//! read "not claimed" and both claim. Waiting for the lock is bounded by `busy_timeout` (30 s);
//! past that the caller gets an error naming the database, never a hang.
//!
//! Each [`StateStore`] owns one connection; it is `Send` (a mailbox thread may take or open its
//! own) but not `Sync`. The schema version is kept in `PRAGMA user_version` and upgraded by
//! [`migrate`] inside a write transaction, so two processes opening a fresh file at once
//! cannot both create it. The directory is created 02770 and the database file 0660, both with
//! the group of the directory they are created in ([`crate::perms`]), so cron's user and the
//! web server's user share one store; SQLite gives its `-wal`/`-shm` files the database file's
//! mode (and, when root creates them, its owner and group). A user that cannot write the
//! directory or the files gets an error naming the file, the user it runs as and the commands
//! that fix it. Keep `STATE_DIR` on a local disk: SQLite's locking does not work over NFS.
//!
//! Errors opening or upgrading the database are `Error::Config` naming the file; errors later
//! are `Error::Mailbox` naming the account and the file. None carries a stored value.
//!
//! # A shared database instead (`email.STATE_DSN`)
//! With `STATE_DSN` set, [`StateStore::open`] is given that DSN with the `STATE_DIR` of the
//! same INI file and opens the MariaDB/MySQL database instead (see [`mysql`]): the same
//! operations, the same guarantees, across several application servers. Every caller passes
//! the DSN of its own settings: two managers of one process with the same `STATE_DIR` but
//! different INI files each keep their state where their own file says.

pub mod ledger;
pub mod mysql;
pub mod owner;
mod sqlite;

pub use crate::config::dsn::Dsn;
pub use ledger::{
    Claim, LedgerCounts, LedgerEntry, LedgerOutcome, LedgerState, Settled, MAX_ATTEMPTS,
    SKIPPED_PREFIX,
};
pub use mysql::{database_lock, DatabaseLock};
pub use owner::{process_alive, process_start_ticks, Owner};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::config::Secret;
use crate::error::{Error, Result};
use sqlite::{access_hint, migrate, open_error, prepare_file, retry_busy, MigrateError};

/// The database's file name inside `STATE_DIR`.
pub const DB_FILE: &str = "pcr_email.sqlite";
/// The page size of a new state database (bytes).
const PAGE_SIZE: u32 = 1024;

/// The schema version this code writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;
/// How long another process waits for the write lock before giving up with an error.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a claim stays owned without being renewed before another run may take it over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);
/// Expired pending authorizations are kept this long (so a late callback is told "expired",
/// not "unknown"), then purged.
pub(crate) const PENDING_AUTH_GRACE_SECS: i64 = 24 * 3600;
/// The account name used in errors of operations that belong to no account.
pub(crate) const NO_ACCOUNT: &str = "state";

/// The state store: the embedded database, or the shared one `email.STATE_DSN` names (see
/// [`mysql`]). One connection per value; open one per thread that needs it.
pub struct StateStore {
    backend: Backend,
    path: PathBuf,
    lease: Duration,
    /// The run whose leases this connection's claims last renewed, and when.
    renewed: std::cell::RefCell<Option<(String, Instant)>>,
}

/// Where a store keeps its state.
enum Backend {
    Sqlite(Connection),
    Database(mysql::MysqlStore),
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("location", &self.location())
            .field("lease", &self.lease)
            .finish()
    }
}

/// An OAuth token as stored: the caller's (encrypted) value, its expiry and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub value: Secret,
    /// Unix seconds, as the caller gave it.
    pub expires_at: Option<i64>,
    /// Monotonic per account and kind: a save with a lower version never replaces this one.
    pub version: i64,
}

/// What `take_pending_auth` found for a state parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingAuth {
    /// The state was pending and is now consumed: the caller's data.
    Valid(Secret),
    /// The state was issued but its time ran out (now consumed).
    Expired,
    /// Never issued, already used, or expired long ago.
    Unknown,
}

/// Runs one statement, prepared once per connection (the ledger's statements run for every
/// message: parsing their SQL each time was a tenth of the PHP thread's work).
pub(crate) fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

/// Queries one row with a statement prepared once per connection.
pub(crate) fn one<T>(
    c: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(p, f)
}

impl StateStore {
    /// Opens the state of `state_dir`: in `dsn`'s database when the INI file's `STATE_DSN`
    /// gives one (`settings.state_dsn`), else (creating when missing)
    /// `state_dir/pcr_email.sqlite`; the directory is created with mode 02770 and its parent's
    /// group when it does not exist.
    pub fn open(state_dir: &Path, dsn: Option<&Dsn>) -> Result<StateStore> {
        if let Some(dsn) = dsn {
            return StateStore::open_database(dsn, state_dir);
        }
        if !state_dir.is_dir() {
            crate::perms::create_dir_all(state_dir, crate::perms::DIR_MODE).map_err(|e| {
                let at = state_dir
                    .ancestors()
                    .skip(1)
                    .find(|p| p.is_dir())
                    .unwrap_or(state_dir);
                open_error(
                    state_dir,
                    format!(
                        "cannot create the state directory (STATE_DIR): {e}{}",
                        access_hint(&e, at)
                    ),
                )
            })?;
        }
        StateStore::open_file(&state_dir.join(DB_FILE))
    }

    /// Opens the shared database `dsn` names (creating or upgrading its `pcr_email_` tables);
    /// `state_dir` keeps only the journal of records the database refused (see [`mysql`]).
    pub fn open_database(dsn: &Dsn, state_dir: &Path) -> Result<StateStore> {
        let db = mysql::MysqlStore::open(dsn, state_dir)?;
        Ok(StateStore {
            path: db.journal().to_path_buf(),
            backend: Backend::Database(db),
            lease: DEFAULT_LEASE,
            renewed: std::cell::RefCell::new(None),
        })
    }

    /// The shared database, when this store is one.
    pub(crate) fn database(&self) -> Option<&mysql::MysqlStore> {
        match &self.backend {
            Backend::Database(db) => Some(db),
            Backend::Sqlite(_) => None,
        }
    }

    /// The SQLite connection, when this store is the embedded one.
    pub(crate) fn sqlite(&self) -> Option<&Connection> {
        match &self.backend {
            Backend::Sqlite(c) => Some(c),
            Backend::Database(_) => None,
        }
    }

    /// The shared database this store lives in (`None`: SQLite).
    pub fn dsn(&self) -> Option<&Dsn> {
        self.database().map(|db| db.dsn())
    }

    /// Where the state is, for messages: the SQLite file or the database (without password).
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Sqlite(_) => self.path.display().to_string(),
            Backend::Database(db) => db.label(),
        }
    }

    /// Opens (creating when missing, mode 0660, its directory's group) the database file at
    /// `path`.
    pub fn open_file(path: &Path) -> Result<StateStore> {
        prepare_file(path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| open_error(path, format!("cannot open the state database: {e}")))?;
        let configure = |conn: &Connection| -> rusqlite::Result<String> {
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // Small pages for a new database (an existing one keeps its own): every message
            // commits a few rows, each in another B-tree, and a commit writes whole pages.
            conn.pragma_update(None, "page_size", PAGE_SIZE)?;
            let mode: String =
                conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            // A 256 KiB page cache (SQLite's default is 2 MB): a check of mail touches the
            // ledger's last pages and one path down its index per message, and the ledger only
            // grows, so a bigger cache would only make each run's memory grow with it
            // (`cargo bench --bench ledger` is no slower with 20,000 rows recorded).
            conn.pragma_update(None, "cache_size", -256)?;
            conn.set_prepared_statement_cache_capacity(64);
            Ok(mode)
        };
        // Switching a fresh file to WAL needs an exclusive lock, and SQLite answers "busy"
        // at once (without waiting) when two first openers would deadlock: retry those.
        let deadline = Instant::now() + BUSY_TIMEOUT;
        let mode = retry_busy(deadline, || configure(&conn))
            .map_err(|e| open_error(path, format!("cannot use the state database: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_error(
                path,
                format!(
                    "the state database cannot use WAL mode (got {mode}); \
                     is STATE_DIR on a local disk?"
                ),
            ));
        }
        retry_busy(deadline, || match migrate(&conn) {
            Err(MigrateError::Sql(e)) => Err(e),
            other => Ok(other),
        })
        .map_err(MigrateError::Sql)
        .and_then(|r| r)
        .map_err(|e| match e {
            MigrateError::Sql(e) => {
                open_error(path, format!("cannot set up the state database: {e}"))
            }
            MigrateError::TooNew(v) => open_error(
                path,
                format!(
                    "the state database has schema version {v}, newer than this extension's \
                     {SCHEMA_VERSION}; upgrade the extension or use another STATE_DIR"
                ),
            ),
        })?;
        Ok(StateStore {
            backend: Backend::Sqlite(conn),
            path: path.to_path_buf(),
            lease: DEFAULT_LEASE,
            renewed: std::cell::RefCell::new(None),
        })
    }

    /// The same store with another claim lease (the default is [`DEFAULT_LEASE`]).
    pub fn with_lease(mut self, lease: Duration) -> StateStore {
        self.lease = lease;
        self
    }

    /// The same store waiting at most `timeout` for another process's write lock (the
    /// default is [`BUSY_TIMEOUT`]); past it an operation fails with an error.
    pub fn with_busy_timeout(self, timeout: Duration) -> Result<StateStore> {
        let Some(conn) = self.sqlite() else {
            return Ok(self);
        };
        conn.busy_timeout(timeout)
            .map_err(|e| open_error(&self.path, format!("cannot set the busy timeout: {e}")))?;
        Ok(self)
    }

    /// Stops (0) or sets the automatic WAL checkpoint of this connection, in pages: a run
    /// leaves checkpoints (and their `fsync`s) to a helper thread, see [`StateStore::checkpoint`].
    pub fn set_autocheckpoint(&self, pages: u32) -> Result<()> {
        let Some(conn) = self.sqlite() else {
            return Ok(());
        };
        conn.pragma_update(None, "wal_autocheckpoint", pages)
            .map_err(|e| self.db_error(NO_ACCOUNT, "configure checkpoints", e))
    }

    /// Copies what it can of the WAL into the database without waiting for anyone (a
    /// passive checkpoint).
    pub fn checkpoint(&self) -> Result<()> {
        let Some(conn) = self.sqlite() else {
            return Ok(());
        };
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(|e| self.db_error(NO_ACCOUNT, "checkpoint", e))
    }

    /// Whether a claim by `owner` should renew its run's other leases now: at most once per
    /// tenth of the lease (a busy run claims a message every fraction of a millisecond, and
    /// every lease it holds was given a whole lease at most that long ago). Counts the
    /// renewal as done.
    pub(crate) fn lease_renewal_due(&self, owner: &Owner) -> bool {
        let mut renewed = self.renewed.borrow_mut();
        let due = match &*renewed {
            Some((run, at)) => run != owner.run_id() || at.elapsed() >= self.lease / 10,
            None => true,
        };
        if due {
            *renewed = Some((owner.run_id().to_string(), Instant::now()));
        }
        due
    }

    /// The lease this store gives the claims it makes.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The database file (with `STATE_DSN`: the journal file inside `STATE_DIR`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction and commits; any error rolls back.
    pub(crate) fn write<T>(
        &self,
        account: &str,
        what: &str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        // BEGIN and COMMIT as cached statements: a run commits once per message. Whatever
        // ends the transaction early (an error, a panic unwinding) rolls it back.
        struct Open<'c>(&'c Connection);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                if !self.0.is_autocommit() {
                    let _ = self.0.execute_batch("ROLLBACK");
                }
            }
        }
        let Some(conn) = self.sqlite() else {
            return Err(self.not_sqlite(account, what));
        };
        let run = || -> rusqlite::Result<T> {
            exec(conn, "BEGIN IMMEDIATE", [])?;
            let open = Open(conn);
            let value = f(conn)?;
            exec(conn, "COMMIT", [])?;
            drop(open);
            Ok(value)
        };
        run().map_err(|e| self.db_error(account, what, e))
    }

    /// Runs a read-only query on the current committed state.
    pub(crate) fn read<T>(
        &self,
        account: &str,
        what: &str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let Some(conn) = self.sqlite() else {
            return Err(self.not_sqlite(account, what));
        };
        f(conn).map_err(|e| self.db_error(account, what, e))
    }

    fn not_sqlite(&self, account: &str, what: &str) -> Error {
        Error::mailbox(
            account,
            &self.location(),
            format!("state database: cannot {what}: no SQLite operation on a shared database"),
        )
    }

    fn db_error(&self, account: &str, what: &str, e: rusqlite::Error) -> Error {
        Error::mailbox(
            account,
            &self.path.display().to_string(),
            format!("state database: cannot {what}: {e}"),
        )
    }

    // ---- IMAP marks and other cursors -------------------------------------------------

    /// The `(UIDVALIDITY, low-water UID)` recorded for `folder` of `account`: every message
    /// with a UID below the low-water mark is settled (done or quarantined).
    pub fn imap_mark(&self, account: &str, folder: &str) -> Result<Option<(u32, u32)>> {
        if let Some(db) = self.database() {
            return db.imap_mark(account, folder);
        }
        self.read(account, "read the IMAP mark", |c| {
            one(
                c,
                "SELECT uidvalidity, low_water_uid FROM imap_marks WHERE account=?1 AND folder=?2",
                params![account, folder],
                |r| Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?)),
            )
            .optional()
        })
    }

    /// Records the IMAP mark of `folder`. The caller must not move the low-water mark past a
    /// message that is not settled, or that message would never be fetched again.
    pub fn set_imap_mark(
        &self,
        account: &str,
        folder: &str,
        uidvalidity: u32,
        low_water_uid: u32,
    ) -> Result<()> {
        if let Some(db) = self.database() {
            return db.set_imap_mark(account, folder, uidvalidity, low_water_uid);
        }
        self.write(account, "save the IMAP mark", |tx| {
            exec(
                tx,
                "INSERT INTO imap_marks (account, folder, uidvalidity, low_water_uid, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (account, folder) DO UPDATE SET uidvalidity=excluded.uidvalidity,
                   low_water_uid=excluded.low_water_uid, updated_at=excluded.updated_at",
                params![account, folder, uidvalidity, low_water_uid, now_ms()],
            )
            .map(|_| ())
        })
    }

    /// A value saved with [`StateStore::set_kv`] (POP3, Graph, Gmail cursors and the like).
    pub fn get_kv(&self, namespace: &str, key: &str) -> Result<Option<String>> {
        if let Some(db) = self.database() {
            return db.get_kv(namespace, key);
        }
        self.read(NO_ACCOUNT, "read a saved cursor", |c| {
            one(
                c,
                "SELECT value FROM kv WHERE namespace=?1 AND key=?2",
                params![namespace, key],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Saves (replaces) a value under `namespace` and `key`.
    pub fn set_kv(&self, namespace: &str, key: &str, value: &str) -> Result<()> {
        if let Some(db) = self.database() {
            return db.set_kv(namespace, key, value);
        }
        self.write(NO_ACCOUNT, "save a cursor", |tx| {
            exec(
                tx,
                "INSERT INTO kv (namespace, key, value, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (namespace, key) DO UPDATE SET value=excluded.value,
                   updated_at=excluded.updated_at",
                params![namespace, key, value, now_ms()],
            )
            .map(|_| ())
        })
    }

    /// Removes a saved value; true when there was one.
    pub fn delete_kv(&self, namespace: &str, key: &str) -> Result<bool> {
        if let Some(db) = self.database() {
            return db.delete_kv(namespace, key);
        }
        self.write(NO_ACCOUNT, "delete a cursor", |tx| {
            exec(
                tx,
                "DELETE FROM kv WHERE namespace=?1 AND key=?2",
                params![namespace, key],
            )
            .map(|n| n > 0)
        })
    }

    // ---- Message-IDs we sent ----------------------------------------------------------

    /// Remembers that we sent `message_id` for SD item `sd_number` from `account`, so a reply
    /// naming it in In-Reply-To/References is threaded to that item. Angle brackets and
    /// surrounding spaces are ignored.
    pub fn record_sent(&self, message_id: &str, sd_number: &str, account: &str) -> Result<()> {
        let id = normalize_message_id(message_id);
        if id.is_empty() {
            return Err(Error::message("cannot record an empty Message-ID as sent"));
        }
        if let Some(db) = self.database() {
            return db.record_sent(&id, sd_number, account);
        }
        self.write(account, "record a sent Message-ID", |tx| {
            exec(
                tx,
                "INSERT INTO sent (message_id, sd_number, account, sent_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (message_id) DO UPDATE SET sd_number=excluded.sd_number,
                   account=excluded.account, sent_at=excluded.sent_at",
                params![id, sd_number, account, now_ms()],
            )
            .map(|_| ())
        })
    }

    /// The SD number a Message-ID we sent belongs to.
    pub fn sent_sd_number(&self, message_id: &str) -> Result<Option<String>> {
        let id = normalize_message_id(message_id);
        if let Some(db) = self.database() {
            return db.sent_sd_number(&id);
        }
        self.read(NO_ACCOUNT, "look up a sent Message-ID", |c| {
            one(
                c,
                "SELECT sd_number FROM sent WHERE message_id=?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
        })
    }

    // ---- OAuth tokens -----------------------------------------------------------------

    /// The token of `kind` (e.g. `refresh`, `access`) stored for `account`.
    pub fn load_token(&self, account: &str, kind: &str) -> Result<Option<StoredToken>> {
        if let Some(db) = self.database() {
            return db.load_token(account, kind);
        }
        self.read(account, "read a stored token", |c| {
            one(
                c,
                "SELECT value, expires_at, version FROM tokens WHERE account=?1 AND kind=?2",
                params![account, kind],
                |r| {
                    Ok(StoredToken {
                        value: Secret::new(r.get::<_, String>(0)?),
                        expires_at: r.get(1)?,
                        version: r.get(2)?,
                    })
                },
            )
            .optional()
        })
    }

    /// Stores a token unconditionally (a fresh authorization). Its version is the current time
    /// in milliseconds, or one more than the stored version when that is higher; returned.
    pub fn save_token(
        &self,
        account: &str,
        kind: &str,
        value: &str,
        expires_at: Option<i64>,
    ) -> Result<i64> {
        if let Some(db) = self.database() {
            let stored = db.put_token(account, kind, value, expires_at, |old| {
                Some(now_ms().max(old.map_or(i64::MIN, |v| v.saturating_add(1))))
            })?;
            return Ok(stored.unwrap_or_default());
        }
        self.write(account, "save a token", |tx| {
            let old: Option<i64> = one(
                tx,
                "SELECT version FROM tokens WHERE account=?1 AND kind=?2",
                params![account, kind],
                |r| r.get(0),
            )
            .optional()?;
            let version = now_ms().max(old.map_or(i64::MIN, |v| v.saturating_add(1)));
            upsert_token(tx, account, kind, value, expires_at, version)?;
            Ok(version)
        })
    }

    /// Stores a token only when `version` (e.g. the millisecond its refresh was issued) is
    /// higher than the stored one: a slower concurrent refresh never overwrites a newer
    /// token. True when it was stored.
    pub fn save_token_if_newer(
        &self,
        account: &str,
        kind: &str,
        value: &str,
        expires_at: Option<i64>,
        version: i64,
    ) -> Result<bool> {
        if let Some(db) = self.database() {
            let stored = db.put_token(account, kind, value, expires_at, |old| {
                old.is_none_or(|old| version > old).then_some(version)
            })?;
            return Ok(stored.is_some());
        }
        self.write(account, "save a token", |tx| {
            let n = exec(
                tx,
                "INSERT INTO tokens (account, kind, value, expires_at, version, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (account, kind) DO UPDATE SET value=excluded.value,
                   expires_at=excluded.expires_at, version=excluded.version,
                   updated_at=excluded.updated_at
                 WHERE excluded.version > tokens.version",
                params![account, kind, value, expires_at, version, now_ms()],
            )?;
            Ok(n > 0)
        })
    }

    /// Compare-and-swap: stores the token only when the stored version is still `expected`
    /// (`None`: no token stored yet). Returns the new version, or `None` when another process
    /// changed it first (reload and use theirs).
    pub fn replace_token(
        &self,
        account: &str,
        kind: &str,
        expected: Option<i64>,
        value: &str,
        expires_at: Option<i64>,
    ) -> Result<Option<i64>> {
        if let Some(db) = self.database() {
            return db.put_token(account, kind, value, expires_at, |current| {
                (current == expected)
                    .then(|| now_ms().max(current.map_or(i64::MIN, |v| v.saturating_add(1))))
            });
        }
        self.write(account, "save a token", |tx| {
            let current: Option<i64> = one(
                tx,
                "SELECT version FROM tokens WHERE account=?1 AND kind=?2",
                params![account, kind],
                |r| r.get(0),
            )
            .optional()?;
            if current != expected {
                return Ok(None);
            }
            let version = now_ms().max(current.map_or(i64::MIN, |v| v.saturating_add(1)));
            upsert_token(tx, account, kind, value, expires_at, version)?;
            Ok(Some(version))
        })
    }

    /// Forgets a token (the account was disconnected); true when there was one.
    pub fn delete_token(&self, account: &str, kind: &str) -> Result<bool> {
        if let Some(db) = self.database() {
            return db.delete_token(account, kind);
        }
        self.write(account, "delete a token", |tx| {
            exec(
                tx,
                "DELETE FROM tokens WHERE account=?1 AND kind=?2",
                params![account, kind],
            )
            .map(|n| n > 0)
        })
    }

    // ---- Pending OAuth authorizations -------------------------------------------------

    /// Keeps the caller's `data` (PKCE verifier, account RECID, redirect URI, ... serialized)
    /// for the authorization `state` until `expires_at` (Unix seconds). Also purges
    /// authorizations that expired more than a day ago. A state already pending is an error.
    pub fn put_pending_auth(&self, state: &str, data: &str, expires_at: i64) -> Result<()> {
        let now = now_secs();
        if let Some(db) = self.database() {
            if !db.put_pending_auth(state, data, expires_at)? {
                return Err(Error::auth(
                    NO_ACCOUNT,
                    "an authorization with this state parameter is already pending",
                ));
            }
            return Ok(());
        }
        let inserted = self.write(NO_ACCOUNT, "save a pending authorization", |tx| {
            exec(
                tx,
                "DELETE FROM pending_auth WHERE expires_at < ?1",
                params![now - PENDING_AUTH_GRACE_SECS],
            )?;
            exec(
                tx,
                "INSERT INTO pending_auth (state, data, expires_at, created_at)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (state) DO NOTHING",
                params![state, data, expires_at, now],
            )
        })?;
        if inserted == 0 {
            return Err(Error::auth(
                NO_ACCOUNT,
                "an authorization with this state parameter is already pending",
            ));
        }
        Ok(())
    }

    /// Consumes the pending authorization `state`: its data when still valid, `Expired` when
    /// its time ran out, `Unknown` when never issued or already taken (a replayed callback).
    pub fn take_pending_auth(&self, state: &str) -> Result<PendingAuth> {
        if let Some(db) = self.database() {
            return db.take_pending_auth(state);
        }
        let now = now_secs();
        self.write(NO_ACCOUNT, "take a pending authorization", |tx| {
            let row: Option<(String, i64)> = one(
                tx,
                "SELECT data, expires_at FROM pending_auth WHERE state=?1",
                params![state],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
            let Some((data, expires_at)) = row else {
                return Ok(PendingAuth::Unknown);
            };
            exec(
                tx,
                "DELETE FROM pending_auth WHERE state=?1",
                params![state],
            )?;
            Ok(if expires_at <= now {
                PendingAuth::Expired
            } else {
                PendingAuth::Valid(Secret::new(data))
            })
        })
    }

    // ---- Alerts -----------------------------------------------------------------------

    /// True the first time it is called for `key`, across all processes; false afterwards
    /// until [`StateStore::clear_alert`]. Use it to alert SYSADMIN once per problem.
    pub fn alert_once(&self, key: &str) -> Result<bool> {
        if let Some(db) = self.database() {
            return db.alert_once(key, false);
        }
        self.write(NO_ACCOUNT, "record an alert", |tx| {
            exec(
                tx,
                "INSERT INTO alerts (key, first_at) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, now_ms()],
            )
            .map(|n| n == 1)
        })
    }

    /// True the first time it is called for `key` on a given day (UTC), across all processes:
    /// for notices worth repeating daily but not every run. Keeps two days of such keys.
    pub fn once_per_day(&self, key: &str) -> Result<bool> {
        if let Some(db) = self.database() {
            return db.alert_once(key, true);
        }
        let now = now_ms();
        let day = now / 86_400_000;
        self.write(NO_ACCOUNT, "record a daily notice", |tx| {
            exec(
                tx,
                "DELETE FROM alerts WHERE key LIKE 'daily:%' AND first_at < ?1",
                params![now - 2 * 86_400_000],
            )?;
            exec(
                tx,
                "INSERT INTO alerts (key, first_at) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![format!("daily:{day}:{key}"), now],
            )
            .map(|n| n == 1)
        })
    }

    /// Forgets an alert (the problem was resolved), so the next occurrence alerts again.
    pub fn clear_alert(&self, key: &str) -> Result<bool> {
        if let Some(db) = self.database() {
            return db.clear_alert(key);
        }
        self.write(NO_ACCOUNT, "clear an alert", |tx| {
            exec(tx, "DELETE FROM alerts WHERE key=?1", params![key]).map(|n| n > 0)
        })
    }
}

fn upsert_token(
    tx: &Connection,
    account: &str,
    kind: &str,
    value: &str,
    expires_at: Option<i64>,
    version: i64,
) -> rusqlite::Result<()> {
    exec(
        tx,
        "INSERT INTO tokens (account, kind, value, expires_at, version, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (account, kind) DO UPDATE SET value=excluded.value,
           expires_at=excluded.expires_at, version=excluded.version,
           updated_at=excluded.updated_at",
        params![account, kind, value, expires_at, version, now_ms()],
    )
    .map(|_| ())
}

/// Copies the SQLite store of `state_dir` into `dsn`'s database (`pcr-email-state migrate`):
/// every ledger row, mark, cursor, token, pending authorization, sent Message-ID and alert, in
/// one transaction; a database whose `pcr_email_` tables hold any row is refused. Returns the
/// rows copied per table. The SQLite file is left as it was.
pub fn copy_to_database(state_dir: &Path, dsn: &Dsn) -> Result<Vec<(&'static str, u64)>> {
    let file = state_dir.join(DB_FILE);
    if !file.is_file() {
        return Err(open_error(
            &file,
            "there is no SQLite state store here to copy (give its STATE_DIR with --from)".into(),
        ));
    }
    // Read-only and never upgraded: the SQLite file is left exactly as it was.
    let source = sqlite::open_source(&file)?;
    let target = StateStore::open_database(dsn, state_dir)?;
    let Some(db) = target.database() else {
        unreachable!("opened as a database");
    };
    db.copy_from(&source)
}

/// `<id@host>` and ` id@host ` are the same Message-ID.
pub fn normalize_message_id(id: &str) -> String {
    let id = id.trim();
    let id = id.strip_prefix('<').unwrap_or(id);
    let id = id.strip_suffix('>').unwrap_or(id);
    id.trim().to_string()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> i64 {
    now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, StateStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("state"), None).unwrap();
        (dir, store)
    }

    #[test]
    fn a_store_can_move_to_a_mailbox_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<StateStore>();
        let (_dir, s) = store();
        let handle = std::thread::spawn(move || s.alert_once("from a thread").unwrap());
        assert!(handle.join().unwrap());
    }

    #[test]
    fn a_new_database_uses_small_pages_and_an_existing_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |path: &Path| -> i64 {
            Connection::open(path)
                .unwrap()
                .pragma_query_value(None, "page_size", |r| r.get(0))
                .unwrap()
        };
        let fresh = dir.path().join("fresh");
        drop(StateStore::open(&fresh, None).unwrap());
        assert_eq!(page_size(&fresh.join(DB_FILE)), i64::from(PAGE_SIZE));
        // A database made with 4 KB pages (an earlier version) opens and keeps them.
        let old = dir.path().join("old");
        std::fs::create_dir(&old).unwrap();
        let conn = Connection::open(old.join(DB_FILE)).unwrap();
        conn.pragma_update(None, "page_size", 4096).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (x)")
            .unwrap();
        drop(conn);
        let store = StateStore::open(&old, None).unwrap();
        store.alert_once("still works").unwrap();
        drop(store);
        assert_eq!(page_size(&old.join(DB_FILE)), 4096);
    }

    #[test]
    fn message_ids_are_compared_without_brackets() {
        let (_dir, s) = store();
        s.record_sent("<abc.1@pcr.example.edu>", "SO201700043", "7")
            .unwrap();
        assert_eq!(
            s.sent_sd_number(" abc.1@pcr.example.edu ")
                .unwrap()
                .as_deref(),
            Some("SO201700043")
        );
        assert_eq!(s.sent_sd_number("<other@x>").unwrap(), None);
        assert!(s.record_sent("<>", "SO1", "7").is_err());
    }

    #[test]
    fn kv_and_marks_round_trip_and_are_scoped() {
        let (_dir, s) = store();
        assert_eq!(s.imap_mark("master", "INBOX").unwrap(), None);
        s.set_imap_mark("master", "INBOX", 42, 100).unwrap();
        s.set_imap_mark("master", "INBOX", 43, 1).unwrap();
        assert_eq!(s.imap_mark("master", "INBOX").unwrap(), Some((43, 1)));
        assert_eq!(s.imap_mark("7", "INBOX").unwrap(), None);
        s.set_kv("pop3", "7", "uidl-cursor").unwrap();
        assert_eq!(
            s.get_kv("pop3", "7").unwrap().as_deref(),
            Some("uidl-cursor")
        );
        assert_eq!(s.get_kv("graph", "7").unwrap(), None);
        assert!(s.delete_kv("pop3", "7").unwrap());
        assert!(!s.delete_kv("pop3", "7").unwrap());
    }

    #[test]
    fn token_debug_output_hides_the_value() {
        let (_dir, s) = store();
        s.save_token("7", "refresh", "ENC:v1:k:c2VjcmV0", Some(10))
            .unwrap();
        let t = s.load_token("7", "refresh").unwrap().unwrap();
        assert_eq!(t.value.expose(), "ENC:v1:k:c2VjcmV0");
        assert!(!format!("{t:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn a_duplicate_pending_state_is_refused() {
        let (_dir, s) = store();
        s.put_pending_auth("st", "{}", now_secs() + 600).unwrap();
        let err = s
            .put_pending_auth("st", "{}", now_secs() + 600)
            .unwrap_err();
        assert!(matches!(err, Error::Auth { .. }), "{err}");
    }

    #[test]
    fn long_expired_authorizations_are_purged() {
        let (_dir, s) = store();
        s.put_pending_auth("old", "{}", now_secs() - PENDING_AUTH_GRACE_SECS - 10)
            .unwrap();
        s.put_pending_auth("new", "{}", now_secs() + 600).unwrap();
        assert_eq!(s.take_pending_auth("old").unwrap(), PendingAuth::Unknown);
        assert!(matches!(
            s.take_pending_auth("new").unwrap(),
            PendingAuth::Valid(_)
        ));
    }
}
