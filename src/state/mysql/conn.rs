//! Connecting to the database, and what its errors mean: retried, reconnected, redacted.

use std::time::Duration;

use mysql::{Conn, OptsBuilder, SslOpts};

use super::{CONNECT_TIMEOUT, LOCK_WAIT_SECS};
use crate::config::dsn::Dsn;

/// Opens a connection to `dsn`'s database.
pub(super) fn connect(dsn: &Dsn, io_timeout: Duration) -> mysql::Result<Conn> {
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

// ---- Errors -----------------------------------------------------------------------------

pub(super) fn is_retryable(e: &mysql::Error) -> bool {
    // Deadlock, lock wait timeout, a duplicate key from a concurrent first insert.
    matches!(e, mysql::Error::MySqlError(m) if matches!(m.code, 1213 | 1205 | 1062))
}

pub(super) fn is_connection_lost(e: &mysql::Error) -> bool {
    match e {
        mysql::Error::IoError(_) | mysql::Error::CodecError(_) | mysql::Error::DriverError(_) => {
            true
        }
        // Server shutdown, connection killed, server gone away / lost.
        mysql::Error::MySqlError(m) => matches!(m.code, 1053 | 1927 | 2006 | 2013 | 4031),
        _ => false,
    }
}

/// The driver's error for a message: it names the user and host at most, never the password.
pub(super) fn redact(e: &mysql::Error) -> String {
    match e {
        mysql::Error::DriverError(d) => format!("the database cannot be reached: {d}"),
        mysql::Error::IoError(io) => format!("the connection to the database failed: {io}"),
        other => other.to_string(),
    }
}
