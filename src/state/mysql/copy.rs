//! Copying a SQLite store into the database (`pcr-email-state migrate`).

use mysql::{IsolationLevel, TxOpts, Value};
use rusqlite::Connection;

use super::{exec, first, id, MysqlStore, TABLES};
use crate::error::{Error, Result};

impl MysqlStore {
    // ---- Copying a store (pcr-email-state migrate) ------------------------------------

    /// Copies every row of the SQLite store `from` into this database, in one transaction,
    /// refusing a database whose `pcr_email_` tables already hold a row. Returns how many rows
    /// each table received.
    pub(crate) fn copy_from(&self, from: &Connection) -> Result<Vec<(&'static str, u64)>> {
        let fail = |what: &str, e: rusqlite::Error| {
            Error::message(format!("cannot read the SQLite state store ({what}): {e}"))
        };
        // One read transaction: a cron job still writing the SQLite store cannot make the copy
        // mix rows from before and after one of its commits.
        let rows = (|| {
            let snapshot = from.unchecked_transaction()?;
            let rows = read_sqlite(&snapshot)?;
            snapshot.commit()?;
            Ok(rows)
        })()
        .map_err(|e| fail("its rows", e))?;
        let mut refused = false;
        // REPEATABLE READ whatever the server's default: there a locking read of an empty
        // table locks its whole index (the gap up to its end), so a server writing meanwhile
        // (a lease, a claim, a token) waits for the copy's commit instead of slipping a row in
        // between the emptiness check and the copy.
        let opts = TxOpts::default().set_isolation_level(Some(IsolationLevel::RepeatableRead));
        let copied = self.run_with(opts, super::NO_ACCOUNT, "copy the state store", |tx| {
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
