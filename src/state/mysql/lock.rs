//! Named locks in the database (`GET_LOCK`).

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::Conn;

use super::conn::connect;
use super::{id, NET_TIMEOUT};
use crate::config::dsn::Dsn;

/// A server-wide lock name (GET_LOCK names are at most 64 characters) for `what` in `database`.
pub(super) fn lock_name(what: &str, database: &str) -> String {
    let digest = id(&[database, what]);
    let hex: String = digest[..20].iter().map(|b| format!("{b:02x}")).collect();
    format!("pcr_email:{hex}")
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
