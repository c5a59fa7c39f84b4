//! The SQLite backend's file and schema: creating `pcr_email.sqlite` (mode, group, access
//! checks), waiting out a busy database while it is set up, and upgrading its schema.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::SCHEMA_VERSION;
use crate::error::{ConfigLocation, Error, Result};

pub(super) fn open_error(path: &Path, message: String) -> Error {
    Error::config(
        ConfigLocation {
            file: Some(path.display().to_string()),
            key: Some("STATE_DIR".to_string()),
            ..Default::default()
        },
        message,
    )
}

/// "; this process runs as ..." with the fix, when `e` is a permission problem in `dir`.
pub(super) fn access_hint(e: &std::io::Error, dir: &Path) -> String {
    if crate::perms::is_access_error(e) {
        format!("; {}", crate::perms::access_hint(dir))
    } else {
        String::new()
    }
}

/// Creates the database file (mode 0660, its directory's group) when missing, takes the
/// others' access from a looser one, and checks that this process can write the file, its
/// `-wal`/`-shm` companions and the directory (SQLite creates and removes them there): another
/// user's store that this one may not write is an error saying how to share it, not a
/// "readonly database" in the middle of a run.
///
/// Nothing here opens the database file (or its companions) once it exists: closing any
/// descriptor of a file drops every POSIX lock this process holds on it, and another thread's
/// connection may be holding SQLite's. A new file is therefore prepared under a temporary name,
/// closed, and only then linked into place.
pub(super) fn prepare_file(path: &Path) -> Result<()> {
    let dir = crate::perms::parent_of(path);
    match create_closed(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let meta = fs::metadata(path)
                .map_err(|e| open_error(path, format!("cannot read the state database: {e}")))?;
            if !meta.is_file() {
                return Err(open_error(path, "the state database is not a file".into()));
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o770)).map_err(
                    |e| {
                        open_error(
                            path,
                            format!(
                                "the state database is open to others (mode {mode:04o}) and \
                                 cannot be made private: {e}; run: chmod o-rwx {}",
                                path.display()
                            ),
                        )
                    },
                )?;
            }
        }
        Err(e) => {
            return Err(open_error(
                path,
                format!(
                    "cannot create the state database: {e}{}",
                    access_hint(&e, &dir)
                ),
            ))
        }
    }
    let mut companions = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        companions.push(PathBuf::from(name));
    }
    for file in &companions {
        if file.as_path() != path && fs::symlink_metadata(file).is_err() {
            continue;
        }
        if !crate::perms::accessible(file, libc::R_OK | libc::W_OK) {
            let e = std::io::Error::from(ErrorKind::PermissionDenied);
            return Err(open_error(
                file,
                format!(
                    "cannot open the state database for writing: {e}{}",
                    access_hint(&e, &dir)
                ),
            ));
        }
    }
    if !crate::perms::accessible(&dir, libc::W_OK | libc::X_OK) {
        let e = std::io::Error::from(ErrorKind::PermissionDenied);
        return Err(open_error(
            &dir,
            format!(
                "cannot create files in the state directory (STATE_DIR), which SQLite needs \
                 beside the database: {e}{}",
                access_hint(&e, &dir)
            ),
        ));
    }
    Ok(())
}

/// Creates `path` (mode 0660, its directory's group) without leaving a descriptor of it open
/// once it is visible: prepared as a temporary file, closed, then hard-linked into place.
/// `AlreadyExists` when it exists.
fn create_closed(path: &Path) -> std::io::Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        return Err(ErrorKind::AlreadyExists.into());
    }
    let dir = crate::perms::parent_of(path);
    let tmp = dir.join(format!(
        ".{}.new.{}.{:016x}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id(),
        rand::random::<u64>()
    ));
    drop(crate::perms::create_new(
        &tmp,
        crate::perms::FILE_MODE,
        false,
    )?);
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(e),
        // A file system without hard links: create it in place (a thread of this process that
        // opens it in the moment before the descriptor is closed is the price).
        Err(_) => crate::perms::create_new(path, crate::perms::FILE_MODE, false).map(drop),
    }
}

/// Runs `f` again while SQLite reports the database busy or locked, until `deadline`.
pub(super) fn retry_busy<T>(
    deadline: Instant,
    mut f: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 20 + 1));
            }
            other => return other,
        }
    }
}

pub(super) enum MigrateError {
    Sql(rusqlite::Error),
    TooNew(i64),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sql(e)
    }
}

/// Opens the SQLite store at `path` read-only, to be copied (`pcr-email-state migrate`): no
/// file is created, no schema upgraded, no pragma written, so the file is left as it was. A
/// store of another schema version is refused with what to do (an older one is upgraded by
/// one run of this release with the SQLite store, then copied).
pub(super) fn open_source(path: &Path) -> Result<Connection> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
        | rusqlite::OpenFlags::SQLITE_OPEN_URI;
    let fail =
        |e: rusqlite::Error| open_error(path, format!("cannot read the state database: {e}"));
    let conn = Connection::open_with_flags(path, flags).map_err(fail)?;
    conn.busy_timeout(Duration::from_secs(30)).map_err(fail)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(fail)?;
    if version < SCHEMA_VERSION {
        return Err(open_error(
            path,
            format!(
                "its schema version {version} is older than this pcr_email's {SCHEMA_VERSION}, \
                 and migrate leaves the SQLite file as it is: run one check of mail with \
                 this release and without STATE_DSN to upgrade it, then migrate"
            ),
        ));
    }
    if version > SCHEMA_VERSION {
        return Err(open_error(
            path,
            format!(
                "its schema version {version} is newer than this pcr_email's {SCHEMA_VERSION}: \
                 migrate with the release that wrote it"
            ),
        ));
    }
    Ok(conn)
}

/// Brings the schema from its `user_version` up to [`SCHEMA_VERSION`], one step at a time,
/// inside one write transaction (a concurrent opener waits, then finds it done).
pub(super) fn migrate(conn: &Connection) -> std::result::Result<(), MigrateError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current == SCHEMA_VERSION {
        return Ok(());
    }
    if current > SCHEMA_VERSION {
        return Err(MigrateError::TooNew(current));
    }
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let mut version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(MigrateError::TooNew(version));
    }
    while version < SCHEMA_VERSION {
        match version {
            0 => tx.execute_batch(SCHEMA_V1)?,
            1 => tx.execute_batch(SCHEMA_V2)?,
            _ => unreachable!("every version below SCHEMA_VERSION has a step"),
        }
        version += 1;
    }
    tx.pragma_update(None, "user_version", version)?;
    tx.commit()?;
    Ok(())
}

const SCHEMA_V1: &str = "
CREATE TABLE ledger (
    account      TEXT NOT NULL,
    key          TEXT NOT NULL,
    mailbox_ref  TEXT,
    state        TEXT NOT NULL CHECK (state IN ('in_progress', 'failed', 'done', 'quarantined')),
    outcome      TEXT,
    sd_number    TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    owner_run    TEXT,
    owner_host   TEXT,
    owner_machine TEXT,
    owner_boot   TEXT,
    owner_pidns  TEXT,
    owner_pid    INTEGER,
    owner_start  INTEGER,
    lease_until  INTEGER,
    first_seen   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (account, key)
) WITHOUT ROWID;
CREATE INDEX ledger_owner ON ledger (owner_run) WHERE owner_run IS NOT NULL;
CREATE INDEX ledger_ref ON ledger (account, mailbox_ref) WHERE mailbox_ref IS NOT NULL;
CREATE INDEX ledger_state ON ledger (account, state);

CREATE TABLE imap_marks (
    account       TEXT NOT NULL,
    folder        TEXT NOT NULL,
    uidvalidity   INTEGER NOT NULL,
    low_water_uid INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (account, folder)
) WITHOUT ROWID;

CREATE TABLE kv (
    namespace  TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;

CREATE TABLE sent (
    message_id TEXT PRIMARY KEY NOT NULL,
    sd_number  TEXT NOT NULL,
    account    TEXT NOT NULL,
    sent_at    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE tokens (
    account    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    value      TEXT NOT NULL,
    expires_at INTEGER,
    version    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (account, kind)
) WITHOUT ROWID;

CREATE TABLE pending_auth (
    state      TEXT PRIMARY KEY NOT NULL,
    data       TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE alerts (
    key      TEXT PRIMARY KEY NOT NULL,
    first_at INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Version 2: the ledger is a rowid table (rows in the order messages were first seen, with a
/// unique index on `(account, key)`), and the index of rows by state is gone. Every message
/// is written twice in a row (claimed, then done with the next one's claim); keyed by
/// Message-ID, each write landed in another random page of the table and of the state index,
/// two thirds of the state database's work during `eventCheckMail`. Now both writes of a
/// message land in the table's last page. The only readers of the state index, the
/// per-account counts and the quarantine list, read one account's rows through the unique
/// index just as well.
const SCHEMA_V2: &str = "
CREATE TABLE ledger_v2 (
    account      TEXT NOT NULL,
    key          TEXT NOT NULL,
    mailbox_ref  TEXT,
    state        TEXT NOT NULL CHECK (state IN ('in_progress', 'failed', 'done', 'quarantined')),
    outcome      TEXT,
    sd_number    TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    owner_run    TEXT,
    owner_host   TEXT,
    owner_machine TEXT,
    owner_boot   TEXT,
    owner_pidns  TEXT,
    owner_pid    INTEGER,
    owner_start  INTEGER,
    lease_until  INTEGER,
    first_seen   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    UNIQUE (account, key)
);
INSERT INTO ledger_v2 (account, key, mailbox_ref, state, outcome, sd_number, attempts,
    last_error, owner_run, owner_host, owner_machine, owner_boot, owner_pidns, owner_pid,
    owner_start, lease_until, first_seen, updated_at)
  SELECT account, key, mailbox_ref, state, outcome, sd_number, attempts, last_error,
    owner_run, owner_host, owner_machine, owner_boot, owner_pidns, owner_pid, owner_start,
    lease_until, first_seen, updated_at
  FROM ledger ORDER BY first_seen;
DROP TABLE ledger;
ALTER TABLE ledger_v2 RENAME TO ledger;
CREATE INDEX ledger_owner ON ledger (owner_run) WHERE owner_run IS NOT NULL;
CREATE INDEX ledger_ref ON ledger (account, mailbox_ref) WHERE mailbox_ref IS NOT NULL;
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Claim, Owner, StateStore, DB_FILE};

    #[test]
    fn a_version_1_database_is_upgraded_and_keeps_its_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute(
            "INSERT INTO ledger (account, key, state, outcome, sd_number, first_seen, updated_at)
             VALUES ('7', '<a@b>', 'done', 'inquiry', 'SD1', 1, 1)",
            [],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);

        let store = StateStore::open(dir.path(), None).unwrap();
        let version: i64 = store
            .sqlite()
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let indexes: Vec<String> = store
            .sqlite()
            .unwrap()
            .prepare("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='ledger'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(!indexes.iter().any(|n| n == "ledger_state"), "{indexes:?}");
        assert!(indexes.iter().any(|n| n == "ledger_owner"), "{indexes:?}");
        // The message recorded before the upgrade is still done: never handed over again.
        let owner = Owner::new_run();
        assert!(matches!(
            store.claim("7", "<a@b>", None, &owner).unwrap(),
            Claim::Done { .. }
        ));
        assert_eq!(store.counts("7").unwrap().done, 1);
    }
}
