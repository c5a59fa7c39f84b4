//! IMAP marks, other cursors (`pcr_email_kv`) and the Message-IDs we sent.

use mysql::prelude::Queryable;
use mysql::Value;

use super::{exec, id, MysqlStore};
use crate::error::Result;
use crate::state::now_ms;

impl MysqlStore {
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
}
