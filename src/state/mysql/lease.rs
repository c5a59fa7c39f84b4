//! Mailbox leases in `pcr_email_mailbox_leases`: one run at a time reads a mailbox.

use mysql::Value;

use super::{db_now, exec, first, get, id, MysqlStore};
use crate::error::Result;
use crate::state::ledger::{takeover, StoredOwner};
use crate::state::Owner;

impl MysqlStore {
    /// Takes the lease of mailbox `scope` for `owner` (see
    /// [`crate::state::StateStore::take_mailbox`]): `None` when it is now `owner`'s, else the
    /// holder that keeps it.
    pub(crate) fn take_mailbox(
        &self,
        scope: &str,
        owner: &Owner,
        lease_ms: i64,
    ) -> Result<Option<String>> {
        let rid = id(&[scope]);
        let start = i64::try_from(owner.start_ticks()).unwrap_or(i64::MAX);
        self.run(scope, "take the mailbox's lease", |tx| {
            let now = db_now(tx)?;
            let lease_until = now.saturating_add(lease_ms);
            let inserted = exec(
                tx,
                "INSERT INTO pcr_email_mailbox_leases (id, scope, owner_run, owner_host,
                   owner_machine, owner_boot, owner_pidns, owner_pid, owner_start, lease_until)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE id=id",
                p![
                    rid,
                    scope,
                    owner.run_id(),
                    owner.host(),
                    owner.machine_id(),
                    owner.boot_id(),
                    owner.pid_ns(),
                    owner.pid(),
                    start,
                    lease_until
                ],
            )?;
            if inserted == 1 {
                return Ok(None);
            }
            let Some(mut r) = first(
                tx,
                "SELECT owner_run, owner_host, owner_machine, owner_boot, owner_pidns, owner_pid,
                   owner_start, lease_until FROM pcr_email_mailbox_leases WHERE id=? FOR UPDATE",
                p![rid],
            )?
            else {
                return Err(mysql::Error::MySqlError(mysql::MySqlError {
                    state: "40001".into(),
                    message: "the lease went away while it was taken".into(),
                    code: 1213,
                }));
            };
            let held = StoredOwner {
                state: "in_progress".into(),
                outcome: None,
                attempts: 0,
                run: get(&mut r, 0)?,
                host: get(&mut r, 1)?,
                machine: get(&mut r, 2)?,
                boot: get(&mut r, 3)?,
                pidns: get(&mut r, 4)?,
                pid: get(&mut r, 5)?,
                start: get(&mut r, 6)?,
                lease_until: get(&mut r, 7)?,
                mailbox_ref: None,
            };
            let ours = held.run.as_deref() == Some(owner.run_id());
            if !ours && takeover(&held, owner, now, false).is_none() {
                return Ok(Some(held.run.unwrap_or_default()));
            }
            exec(
                tx,
                "UPDATE pcr_email_mailbox_leases SET owner_run=?, owner_host=?, owner_machine=?,
                   owner_boot=?, owner_pidns=?, owner_pid=?, owner_start=?, lease_until=?
                 WHERE id=?",
                p![
                    owner.run_id(),
                    owner.host(),
                    owner.machine_id(),
                    owner.boot_id(),
                    owner.pid_ns(),
                    owner.pid(),
                    start,
                    lease_until,
                    rid
                ],
            )?;
            Ok(None)
        })
    }
}
