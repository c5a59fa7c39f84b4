//! The `pcr_email_*` tables: created and upgraded once per process and database.

use std::sync::Mutex;

use mysql::prelude::Queryable;
use mysql::Conn;

use super::lock::lock_name;
use super::MYSQL_SCHEMA_VERSION;
use crate::config::dsn::Dsn;
use crate::state::now_ms;

/// The databases whose tables this process already checked (created or upgraded).
static MIGRATED: Mutex<Vec<String>> = Mutex::new(Vec::new());

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

/// The schema version recorded in the database, or 0 when it has no `pcr_email_schema` table
/// yet (a plain read: no CREATE privilege needed, nothing written).
fn recorded_version(conn: &mut Conn) -> mysql::Result<i64> {
    match conn.exec_first::<i64, _, _>(
        "SELECT version FROM pcr_email_schema WHERE name='state'",
        (),
    ) {
        Ok(v) => Ok(v.unwrap_or(0)),
        // ER_NO_SUCH_TABLE: a database this extension has not used yet.
        Err(mysql::Error::MySqlError(e)) if e.code == 1146 => Ok(0),
        Err(e) => Err(e),
    }
}

fn schema_error(message: String) -> mysql::Error {
    mysql::Error::MySqlError(mysql::MySqlError {
        state: "HY000".into(),
        message,
        code: 0,
    })
}

/// Refuses tables made by a newer release: its code may rely on columns or rows this one
/// would not maintain (a rolling upgrade must upgrade every server, see the README).
fn check_not_newer(version: i64) -> mysql::Result<()> {
    if version > MYSQL_SCHEMA_VERSION {
        return Err(schema_error(format!(
            "this server's pcr_email is older than the database's tables (its schema version \
             {MYSQL_SCHEMA_VERSION}, the pcr_email_ tables' {version}): upgrade it"
        )));
    }
    Ok(())
}

/// Creates or upgrades the tables, once per process and database. A database already at this
/// version costs one SELECT: no CREATE, no write, no lock (the account of a running site may
/// lack CREATE once the tables exist). Creating or upgrading happens under a named lock so
/// that two servers starting at once do not both do it.
pub(super) fn migrate(conn: &mut Conn, dsn: &Dsn) -> mysql::Result<()> {
    let label = dsn.label();
    if MIGRATED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&label)
    {
        return Ok(());
    }
    let version = recorded_version(conn)?;
    check_not_newer(version)?;
    if version < MYSQL_SCHEMA_VERSION {
        create_or_upgrade(conn, dsn)?;
    }
    MIGRATED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(label);
    Ok(())
}

fn create_or_upgrade(conn: &mut Conn, dsn: &Dsn) -> mysql::Result<()> {
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
        // Another server may have done it while we waited for the lock.
        let version = recorded_version(conn)?;
        check_not_newer(version)?;
        if version >= MYSQL_SCHEMA_VERSION {
            return Ok(());
        }
        conn.query_drop(
            "CREATE TABLE IF NOT EXISTS pcr_email_schema (
                name VARCHAR(64) NOT NULL PRIMARY KEY,
                version INT NOT NULL,
                updated_at BIGINT NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        )?;
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
    result
}
