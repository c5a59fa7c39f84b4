//! The ledger in `pcr_email_ledger`: claims, settled messages, releases, entries and counts
//! (the protocol is [`crate::state::ledger`]'s).

use mysql::prelude::Queryable;
use mysql::{Row, Value};

use super::journal::{append_journal, Journaled};
use super::{db_now, exec, first, get, id, MysqlStore, Tx};
use crate::error::{Error, Result};
use crate::state::ledger::{
    claim_step, entry_parts, may_fail, truncate, Claim, ClaimStep, LedgerCounts, LedgerEntry,
    LedgerState, Settled, StoredOwner, SKIPPED_PREFIX,
};
use crate::state::{now_ms, Owner};

const LEDGER_ENTRY: &str = "account, msg_key, mailbox_ref, state, outcome, sd_number, attempts, \
                            last_error, owner_run, first_seen, updated_at";

fn entry_from(mut r: Row) -> mysql::Result<LedgerEntry> {
    let state: String = get(&mut r, 3)?;
    let state = LedgerState::parse(&state).ok_or_else(|| {
        mysql::Error::FromValueError(Value::from(format!("unknown ledger state {state:?}")))
    })?;
    Ok(entry_parts(
        get(&mut r, 0)?,
        get(&mut r, 1)?,
        get(&mut r, 2)?,
        state,
        get(&mut r, 4)?,
        get(&mut r, 5)?,
        get(&mut r, 6)?,
        get(&mut r, 7)?,
        get(&mut r, 8)?,
        get(&mut r, 9)?,
        get(&mut r, 10)?,
    ))
}

impl MysqlStore {
    // ---- Ledger -----------------------------------------------------------------------

    pub(crate) fn claim(
        &self,
        account: &str,
        key: &str,
        mailbox_ref: Option<&str>,
        owner: &Owner,
        lease_ms: i64,
        renew: bool,
    ) -> Result<Claim> {
        self.run(account, "claim a message", |tx| {
            claim_in(tx, account, key, mailbox_ref, owner, lease_ms, renew)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn settle_then_claim(
        &self,
        settled: &Settled,
        account: &str,
        key: &str,
        mailbox_ref: Option<&str>,
        owner: &Owner,
        lease_ms: i64,
        renew: bool,
    ) -> Result<Claim> {
        self.run(account, "record a message and claim the next", |tx| {
            settle_in(
                tx,
                &settled.account,
                &settled.key,
                LedgerState::Done,
                &settled.outcome.to_db(),
                settled.sd_number.as_deref(),
                None,
            )?;
            claim_in(tx, account, key, mailbox_ref, owner, lease_ms, renew)
        })
    }

    /// Records a message as settled; a done record the database refused goes to the journal.
    pub(crate) fn settle(
        &self,
        account: &str,
        key: &str,
        state: LedgerState,
        outcome: &str,
        sd_number: Option<&str>,
        error: Option<&str>,
    ) -> Result<()> {
        let result = self.run(account, "record a processed message", |tx| {
            settle_in(tx, account, key, state, outcome, sd_number, error)
        });
        if let Err(Error::Mailbox(failure)) = &result {
            if state == LedgerState::Done && self.lost_connection() {
                let entry = Journaled {
                    account: account.to_string(),
                    key: key.to_string(),
                    outcome: outcome.to_string(),
                    sd_number: sd_number.map(str::to_string),
                };
                let kept = match append_journal(&self.journal, &entry) {
                    Ok(()) => format!(
                        "kept in {} and recorded when the database is back",
                        self.journal.display()
                    ),
                    Err(j) => format!(
                        "and it could not be kept in {}: {j}",
                        self.journal.display()
                    ),
                };
                return Err(Error::mailbox(
                    account,
                    &self.dsn.label(),
                    format!("{}; {kept}", failure.message),
                ));
            }
        }
        result
    }

    pub(crate) fn fail(&self, account: &str, key: &str, owner: &Owner, error: &str) -> Result<u32> {
        let (now, error) = (now_ms(), truncate(error));
        let rid = id(&[account, key]);
        self.run(account, "record a failed message", |tx| {
            let row = first(
                tx,
                "SELECT state, attempts, owner_run FROM pcr_email_ledger WHERE id=? FOR UPDATE",
                p![rid],
            )?;
            match row {
                None => {
                    exec(
                        tx,
                        "INSERT INTO pcr_email_ledger (id, account_id, account, msg_key, state,
                           attempts, last_error, first_seen, updated_at)
                         VALUES (?, ?, ?, ?, 'failed', 1, ?, ?, ?)",
                        p![rid, id(&[account]), account, key, error.as_str(), now, now],
                    )?;
                    Ok(1)
                }
                Some(mut r) => {
                    let state: String = get(&mut r, 0)?;
                    let attempts: u32 = get(&mut r, 1)?;
                    let run: Option<String> = get(&mut r, 2)?;
                    if !may_fail(&state, run.as_deref(), owner) {
                        return Ok(attempts);
                    }
                    let attempts = attempts.saturating_add(1);
                    exec(
                        tx,
                        &format!(
                            "UPDATE pcr_email_ledger SET state='failed', attempts=?,
                               last_error=?, updated_at=?, {CLEAR_OWNER} WHERE id=?"
                        ),
                        p![attempts, error.as_str(), now, rid],
                    )?;
                    Ok(attempts)
                }
            }
        })
    }

    pub(crate) fn release(&self, account: &str, key: &str, owner: &Owner) -> Result<bool> {
        let rid = id(&[account, key]);
        self.run(account, "release a message", |tx| {
            release_where(tx, owner.run_id(), Some(rid)).map(|n| n > 0)
        })
    }

    pub(crate) fn release_owned(&self, owner: &Owner) -> Result<usize> {
        self.run(super::NO_ACCOUNT, "release the run's messages", |tx| {
            exec(
                tx,
                "DELETE FROM pcr_email_mailbox_leases WHERE owner_run=?",
                p![owner.run_id()],
            )?;
            release_where(tx, owner.run_id(), None).map(|n| n as usize)
        })
    }

    pub(crate) fn renew_lease(&self, owner: &Owner, lease_ms: i64) -> Result<usize> {
        self.run(super::NO_ACCOUNT, "renew the run's lease", |tx| {
            let lease_until = db_now(tx)?.saturating_add(lease_ms);
            exec(
                tx,
                "UPDATE pcr_email_mailbox_leases SET lease_until=? WHERE owner_run=?",
                p![lease_until, owner.run_id()],
            )?;
            exec(
                tx,
                "UPDATE pcr_email_ledger SET lease_until=?
                 WHERE owner_run=? AND state='in_progress'",
                p![lease_until, owner.run_id()],
            )
            .map(|n| n as usize)
        })
    }

    pub(crate) fn move_ledger_scope(&self, from: &str, to: &str) -> Result<()> {
        let from_id = id(&[from]);
        let any = self.run(to, "look up an earlier ledger", |tx| {
            first(
                tx,
                "SELECT 1 FROM pcr_email_ledger WHERE account_id=? LIMIT 1",
                p![from_id],
            )
            .map(|r| r.is_some())
        })?;
        if !any {
            return Ok(());
        }
        self.run(to, "move an earlier ledger", |tx| {
            let rows: Vec<(Vec<u8>, String)> = tx.exec(
                "SELECT id, msg_key FROM pcr_email_ledger WHERE account_id=? FOR UPDATE",
                p![from_id],
            )?;
            for (old, key) in rows {
                let new = id(&[to, &key]);
                exec(
                    tx,
                    "UPDATE IGNORE pcr_email_ledger SET id=?, account_id=?, account=? WHERE id=?",
                    p![new, id(&[to]), to, old],
                )?;
            }
            exec(
                tx,
                "DELETE FROM pcr_email_ledger WHERE account_id=?",
                p![from_id],
            )
            .map(drop)
        })
    }

    pub(crate) fn entry(&self, account: &str, key: &str) -> Result<Option<LedgerEntry>> {
        let rid = id(&[account, key]);
        self.run(account, "read the ledger", |tx| {
            first(
                tx,
                &format!("SELECT {LEDGER_ENTRY} FROM pcr_email_ledger WHERE id=?"),
                p![rid],
            )?
            .map(entry_from)
            .transpose()
        })
    }

    pub(crate) fn entry_by_ref(
        &self,
        account: &str,
        mailbox_ref: &str,
    ) -> Result<Option<LedgerEntry>> {
        let (aid, rid) = (id(&[account]), id(&[mailbox_ref]));
        self.run(account, "read the ledger", |tx| {
            first(
                tx,
                &format!(
                    "SELECT {LEDGER_ENTRY} FROM pcr_email_ledger WHERE account_id=? AND ref_id=?
                     ORDER BY updated_at DESC LIMIT 1"
                ),
                p![aid, rid],
            )?
            .map(entry_from)
            .transpose()
        })
    }

    pub(crate) fn quarantined(&self, account: &str) -> Result<Vec<LedgerEntry>> {
        let aid = id(&[account]);
        self.run(account, "read the ledger", |tx| {
            let rows: Vec<Row> = tx.exec(
                format!(
                    "SELECT {LEDGER_ENTRY} FROM pcr_email_ledger
                     WHERE account_id=? AND state='quarantined' ORDER BY first_seen"
                ),
                p![aid],
            )?;
            rows.into_iter().map(entry_from).collect()
        })
    }

    pub(crate) fn counts(&self, account: &str) -> Result<LedgerCounts> {
        let aid = id(&[account]);
        self.run(account, "count the ledger", |tx| {
            let rows: Vec<(String, i64, u64)> = tx.exec(
                "SELECT state, LEFT(COALESCE(outcome, ''), ?) = ?, COUNT(*)
                 FROM pcr_email_ledger WHERE account_id=? GROUP BY 1, 2",
                p![SKIPPED_PREFIX.len() as u64, SKIPPED_PREFIX, aid],
            )?;
            let mut counts = LedgerCounts::default();
            for (state, skipped, n) in rows {
                match LedgerState::parse(&state) {
                    Some(LedgerState::InProgress) => counts.in_progress += n,
                    Some(LedgerState::Failed) => counts.failed += n,
                    Some(LedgerState::Done) if skipped != 0 => counts.skipped += n,
                    Some(LedgerState::Done) => counts.done += n,
                    Some(LedgerState::Quarantined) => counts.quarantined += n,
                    None => {}
                }
            }
            Ok(counts)
        })
    }

    pub(crate) fn forget(&self, account: &str, key: &str) -> Result<bool> {
        let rid = id(&[account, key]);
        self.run(account, "forget a message", |tx| {
            exec(tx, "DELETE FROM pcr_email_ledger WHERE id=?", p![rid]).map(|n| n > 0)
        })
    }
}

const CLEAR_OWNER: &str =
    "owner_run=NULL, owner_host=NULL, owner_machine=NULL, owner_boot=NULL, owner_pidns=NULL, \
     owner_pid=NULL, owner_start=NULL, lease_until=NULL";

#[allow(clippy::too_many_arguments)]
fn claim_in(
    tx: Tx<'_, '_>,
    account: &str,
    key: &str,
    mailbox_ref: Option<&str>,
    owner: &Owner,
    lease_ms: i64,
    renew: bool,
) -> mysql::Result<Claim> {
    let now = db_now(tx)?;
    let lease_until = now.saturating_add(lease_ms);
    if renew {
        exec(
            tx,
            "UPDATE pcr_email_ledger SET lease_until=? WHERE owner_run=? AND state='in_progress'",
            p![lease_until, owner.run_id()],
        )?;
    }
    let rid = id(&[account, key]);
    let ref_id = mailbox_ref.map(|r| id(&[r]).to_vec());
    let start = i64::try_from(owner.start_ticks()).unwrap_or(i64::MAX);
    let inserted = exec(
        tx,
        "INSERT INTO pcr_email_ledger (id, account_id, account, msg_key, mailbox_ref, ref_id,
           state, attempts, owner_run, owner_host, owner_machine, owner_boot, owner_pidns,
           owner_pid, owner_start, lease_until, first_seen, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, 'in_progress', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE id=id",
        p![
            rid,
            id(&[account]),
            account,
            key,
            mailbox_ref,
            ref_id.clone(),
            owner.run_id(),
            owner.host(),
            owner.machine_id(),
            owner.boot_id(),
            owner.pid_ns(),
            owner.pid(),
            start,
            lease_until,
            now,
            now
        ],
    )?;
    if inserted == 1 {
        return Ok(Claim::New);
    }
    let Some(mut r) = first(
        tx,
        "SELECT state, outcome, attempts, owner_run, owner_host, owner_machine, owner_boot,
           owner_pidns, owner_pid, owner_start, lease_until, mailbox_ref
         FROM pcr_email_ledger WHERE id=? FOR UPDATE",
        p![rid],
    )?
    else {
        // Removed between the insert and the read (a release): a deadlock-like retry.
        return Err(mysql::Error::MySqlError(mysql::MySqlError {
            state: "40001".into(),
            message: "the row went away during the claim".into(),
            code: 1213,
        }));
    };
    let row = StoredOwner {
        state: get(&mut r, 0)?,
        outcome: get(&mut r, 1)?,
        attempts: get(&mut r, 2)?,
        run: get(&mut r, 3)?,
        host: get(&mut r, 4)?,
        machine: get(&mut r, 5)?,
        boot: get(&mut r, 6)?,
        pidns: get(&mut r, 7)?,
        pid: get(&mut r, 8)?,
        start: get(&mut r, 9)?,
        lease_until: get(&mut r, 10)?,
        mailbox_ref: get(&mut r, 11)?,
    };
    if let Some(given) = mailbox_ref.filter(|_| row.state != "done") {
        if row.mailbox_ref.as_deref() != Some(given) {
            exec(
                tx,
                "UPDATE pcr_email_ledger SET mailbox_ref=?, ref_id=? WHERE id=?",
                p![given, ref_id, rid],
            )?;
        }
    }
    let set_owner = |tx: Tx<'_, '_>, attempts: u32, why: Option<&str>| {
        exec(
            tx,
            "UPDATE pcr_email_ledger SET state='in_progress', attempts=?,
               last_error=COALESCE(?, last_error), owner_run=?, owner_host=?, owner_machine=?,
               owner_boot=?, owner_pidns=?, owner_pid=?, owner_start=?, lease_until=?,
               updated_at=?
             WHERE id=?",
            p![
                attempts,
                why,
                owner.run_id(),
                owner.host(),
                owner.machine_id(),
                owner.boot_id(),
                owner.pid_ns(),
                owner.pid(),
                start,
                lease_until,
                now,
                rid
            ],
        )
    };
    match claim_step(&row, mailbox_ref, owner, now, false) {
        ClaimStep::Answer(claim) => Ok(claim),
        ClaimStep::Own { attempts, why } => {
            set_owner(tx, attempts, why.as_deref())?;
            Ok(Claim::Retry { attempts })
        }
    }
}

pub(super) fn settle_in(
    tx: Tx<'_, '_>,
    account: &str,
    key: &str,
    state: LedgerState,
    outcome: &str,
    sd_number: Option<&str>,
    error: Option<&str>,
) -> mysql::Result<()> {
    let (now, rid) = (now_ms(), id(&[account, key]));
    let error = error.map(truncate);
    let current: Option<String> = tx.exec_first(
        "SELECT state FROM pcr_email_ledger WHERE id=? FOR UPDATE",
        p![rid],
    )?;
    match current.as_deref() {
        Some("done") => Ok(()),
        Some(_) => exec(
            tx,
            &format!(
                "UPDATE pcr_email_ledger SET state=?, outcome=?, sd_number=?,
                   last_error=COALESCE(?, last_error), updated_at=?, {CLEAR_OWNER}
                 WHERE id=?"
            ),
            p![state.as_str(), outcome, sd_number, error, now, rid],
        )
        .map(drop),
        None => exec(
            tx,
            "INSERT INTO pcr_email_ledger (id, account_id, account, msg_key, state, outcome,
               sd_number, attempts, last_error, first_seen, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
            p![
                rid,
                id(&[account]),
                account,
                key,
                state.as_str(),
                outcome,
                sd_number,
                error,
                now,
                now
            ],
        )
        .map(drop),
    }
}

/// Releases the in-progress rows of `run` (only row `only` when given): rows without a failed
/// attempt are removed, the others go back to `failed`.
fn release_where(tx: Tx<'_, '_>, run: &str, only: Option<[u8; 32]>) -> mysql::Result<u64> {
    let (filter, extra) = match only {
        Some(rid) => (" AND id=?", vec![Value::from(rid)]),
        None => ("", vec![]),
    };
    let mut params = p![run];
    params.extend(extra.clone());
    let removed = exec(
        tx,
        &format!(
            "DELETE FROM pcr_email_ledger WHERE owner_run=? AND state='in_progress'
             AND attempts=0{filter}"
        ),
        params.clone(),
    )?;
    let returned = exec(
        tx,
        &format!(
            "UPDATE pcr_email_ledger SET state='failed', {CLEAR_OWNER}
             WHERE owner_run=? AND state='in_progress'{filter}"
        ),
        params,
    )?;
    Ok(removed + returned)
}
