//! "SYSADMIN was already told about this" markers in `pcr_email_alerts`.

use mysql::Value;

use super::{exec, id, MysqlStore};
use crate::error::Result;
use crate::state::now_ms;

impl MysqlStore {
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
}
