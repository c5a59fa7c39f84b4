//! OAuth tokens and pending OAuth authorizations.

use mysql::prelude::Queryable;
use mysql::Value;

use super::{exec, id, MysqlStore};
use crate::config::Secret;
use crate::error::Result;
use crate::state::{now_ms, now_secs, PendingAuth, StoredToken, PENDING_AUTH_GRACE_SECS};

impl MysqlStore {
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
            if current.is_some() {
                exec(
                    tx,
                    "UPDATE pcr_email_tokens SET value=?, expires_at=?, version=?, updated_at=?
                     WHERE id=?",
                    p![value, expires_at, version, now_ms(), rid],
                )?;
            } else {
                // No row to lock yet: a plain insert, so that of two first writes the second
                // meets the first's row (a duplicate key, retried: it then sees its version)
                // instead of overwriting it.
                exec(
                    tx,
                    "INSERT INTO pcr_email_tokens (id, account, kind, value, expires_at, version,
                       updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    p![rid, account, kind, value, expires_at, version, now_ms()],
                )?;
            }
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
}
