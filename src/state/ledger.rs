//! The incoming ledger: the protocol that turns each incoming message into exactly one
//! Inquiry (or thread entry) per account.
//!
//! For each message, the incoming code:
//! 1. [`StateStore::claim`]s its dedupe key (one `BEGIN IMMEDIATE` transaction), right before
//!    handling it (not in bulk: see "attempts" below), and acts on the [`Claim`]:
//!    `New`/`Retry` → process it (`Retry` with `attempts >= MAX_ATTEMPTS` → quarantine it
//!    instead); `Done` → only re-apply the mailbox action (the host is never called again);
//!    `Busy` → leave it for this run; `Quarantined` → only re-apply the quarantine action.
//! 2. after the host returned, [`StateStore::complete`]s it (committed before the mailbox is
//!    touched; when the next message is already waiting, in the same transaction as its claim,
//!    [`StateStore::settle_then_claim`], so a busy run commits once per message), or [`StateStore::fail`]s it when the host or the parser failed (the returned
//!    attempt count reaching [`MAX_ATTEMPTS`] → [`StateStore::quarantine`]), or
//!    [`StateStore::skip`]s it (blocked, own mail, auto-reply, oversized: done, counted once).
//! 3. on a clean end of the run, [`StateStore::release_owned`] gives back what it claimed but
//!    never handled.
//!
//! A row is `in_progress` while a run owns it. Another run may take it over when the owner is
//! dead: its lease ran out (the lease is renewed by the owner's claims, at most once per tenth
//! of the lease, and by [`StateStore::renew_lease`]), or it ran on this machine since its
//! last boot and its process is gone (so after a `kill -9` the next run takes over at once,
//! see [`Owner::sees_dead`]; a run of an earlier boot is dead at once only in SQLite, which
//! one server alone uses: in a shared database it may be another server's). A takeover counts as a failed
//! attempt, since nobody knows whether the dead run had already called the host: a message
//! that crashes PHP every time is quarantined after three runs instead of blocking the mailbox
//! forever.
//!
//! The same key claimed again by the run that owns it is `Busy` (two copies of one message in
//! one mailbox are handled once). A row that is `done` is never changed again: a second
//! `complete` (possible only after a lease ran out under a slow host) keeps the first outcome.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{exec, now_ms, one, Owner, StateStore};
use crate::error::Result;

/// A message to record as done (what [`StateStore::complete`] or [`StateStore::skip`] would
/// record), kept by the caller until it can be committed together with the next claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub account: String,
    pub key: String,
    pub outcome: LedgerOutcome,
    pub sd_number: Option<String>,
}

impl Settled {
    /// Its row, done, in the caller's transaction.
    fn record(&self, tx: &Connection) -> rusqlite::Result<()> {
        settle_in(
            tx,
            &self.account,
            &self.key,
            LedgerState::Done,
            &self.outcome.to_db(),
            self.sd_number.as_deref(),
            None,
        )
    }

    /// The record of [`StateStore::skip`].
    pub fn skipped(account: &str, key: &str, reason: &str) -> Settled {
        Settled {
            account: account.to_string(),
            key: key.to_string(),
            outcome: LedgerOutcome::Skipped(reason.to_string()),
            sd_number: None,
        }
    }
}

/// What became of a message the ledger holds as done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerOutcome {
    /// The host created an Inquiry for it.
    Inquiry,
    /// The host added it to an item's thread.
    Threaded,
    /// Never given to the host (blocked sender, our own mail, auto-reply without SD item,
    /// oversized): the reason. Such a message is left in the mailbox.
    Skipped(String),
    /// Any other text in the `outcome` column (written by a test or another version): kept.
    Other(String),
}

impl LedgerOutcome {
    /// Its text in the `outcome` column: `inquiry`, `threaded`, `skipped: <reason>`.
    pub fn to_db(&self) -> String {
        match self {
            LedgerOutcome::Inquiry => "inquiry".to_string(),
            LedgerOutcome::Threaded => "threaded".to_string(),
            LedgerOutcome::Skipped(reason) => format!("{SKIPPED_PREFIX}{reason}"),
            LedgerOutcome::Other(text) => text.clone(),
        }
    }

    /// The outcome a column text stands for (the inverse of [`LedgerOutcome::to_db`]).
    pub fn from_db(text: &str) -> LedgerOutcome {
        match text {
            "inquiry" => LedgerOutcome::Inquiry,
            "threaded" => LedgerOutcome::Threaded,
            _ => match text.strip_prefix(SKIPPED_PREFIX) {
                Some(reason) => LedgerOutcome::Skipped(reason.to_string()),
                None => LedgerOutcome::Other(text.to_string()),
            },
        }
    }
}

impl From<&str> for LedgerOutcome {
    fn from(text: &str) -> LedgerOutcome {
        LedgerOutcome::from_db(text)
    }
}

/// After this many failed attempts a message is quarantined.
pub const MAX_ATTEMPTS: u32 = 3;
/// The prefix of the outcome [`StateStore::skip`] records (`skipped: <reason>`).
pub const SKIPPED_PREFIX: &str = "skipped: ";
/// Stored error texts are cut to this many characters.
const MAX_ERROR_CHARS: usize = 2000;

/// What [`StateStore::claim`] decided for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Never seen: now in progress, owned by the caller.
    New,
    /// Already handled: the caller only re-applies the mailbox action (never the host).
    /// A skipped message's outcome is [`LedgerOutcome::Skipped`]; see [`Claim::is_skipped`].
    /// `same_copy` is false when the row was recorded for another mailbox copy (another
    /// `mailbox_ref`): a second message with a Message-ID already seen, which must be left
    /// where it is rather than deleted as if it had been processed.
    Done {
        outcome: LedgerOutcome,
        same_copy: bool,
    },
    /// A live run owns it (possibly the caller's own run): leave it alone this run.
    Busy,
    /// An earlier attempt failed or its run died: now owned by the caller. `attempts` counts
    /// the failed attempts so far; at [`MAX_ATTEMPTS`] or more, quarantine it.
    Retry { attempts: u32 },
    /// Given up on: the caller only re-applies the quarantine action.
    Quarantined,
}

impl Claim {
    /// True for a `Done` whose outcome was recorded by [`StateStore::skip`] (the message never
    /// reached the host, so it must not be deleted from the mailbox).
    pub fn is_skipped(&self) -> bool {
        matches!(
            self,
            Claim::Done {
                outcome: LedgerOutcome::Skipped(_),
                ..
            }
        )
    }
}

/// Where a ledger row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LedgerState {
    InProgress,
    Failed,
    Done,
    Quarantined,
}

impl LedgerState {
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerState::InProgress => "in_progress",
            LedgerState::Failed => "failed",
            LedgerState::Done => "done",
            LedgerState::Quarantined => "quarantined",
        }
    }

    pub(super) fn parse(text: &str) -> Option<LedgerState> {
        Some(match text {
            "in_progress" => LedgerState::InProgress,
            "failed" => LedgerState::Failed,
            "done" => LedgerState::Done,
            "quarantined" => LedgerState::Quarantined,
            _ => return None,
        })
    }
}

/// One ledger row, for reports and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub account: String,
    pub key: String,
    pub mailbox_ref: Option<String>,
    pub state: LedgerState,
    pub outcome: Option<String>,
    pub sd_number: Option<String>,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The run id of the owner while in progress.
    pub owner: Option<String>,
    /// Unix milliseconds.
    pub first_seen_ms: i64,
    pub updated_ms: i64,
}

/// How many ledger rows of one account are in each state (skipped ones apart from done).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerCounts {
    pub in_progress: u64,
    pub failed: u64,
    pub done: u64,
    pub skipped: u64,
    pub quarantined: u64,
}

const ENTRY_COLUMNS: &str = "account, key, mailbox_ref, state, outcome, sd_number, attempts, \
                             last_error, owner_run, first_seen, updated_at";

fn entry_from_row(r: &Row<'_>) -> rusqlite::Result<LedgerEntry> {
    let state: String = r.get(3)?;
    Ok(LedgerEntry {
        account: r.get(0)?,
        key: r.get(1)?,
        mailbox_ref: r.get(2)?,
        state: LedgerState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Text,
                format!("unknown ledger state {state:?}").into(),
            )
        })?,
        outcome: r.get(4)?,
        sd_number: r.get(5)?,
        attempts: r.get(6)?,
        last_error: r.get(7)?,
        owner: r.get(8)?,
        first_seen_ms: r.get(9)?,
        updated_ms: r.get(10)?,
    })
}

pub(super) fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// The columns of a row's owner as stored.
pub(super) struct StoredOwner {
    pub(super) state: String,
    pub(super) outcome: Option<String>,
    pub(super) attempts: u32,
    pub(super) run: Option<String>,
    pub(super) host: Option<String>,
    pub(super) machine: Option<String>,
    pub(super) boot: Option<String>,
    pub(super) pidns: Option<String>,
    pub(super) pid: Option<u32>,
    pub(super) start: Option<i64>,
    pub(super) lease_until: Option<i64>,
    pub(super) mailbox_ref: Option<String>,
}

/// For a row in progress: `None` while its owner may still be working on it (the caller
/// gets `Busy`), else the attempt count the takeover gives it and why (see the module
/// documentation). The same decision for both backends; `local_store` as in
/// [`Owner::sees_dead`] (true for SQLite, false for a database shared by several servers).
pub(super) fn takeover(
    row: &StoredOwner,
    owner: &Owner,
    now: i64,
    local_store: bool,
) -> Option<(u32, String)> {
    let previous = row.owner();
    let ours = previous
        .as_ref()
        .is_some_and(|p| p.run_id() == owner.run_id());
    let expired = row.lease_until.is_none_or(|until| until <= now);
    let dead = previous
        .as_ref()
        .is_none_or(|p| owner.sees_dead(p, local_store));
    if ours || !(expired || dead) {
        return None;
    }
    let why = match &previous {
        Some(p) if expired => format!("the lease of {p} ran out before it finished"),
        Some(p) => format!("{p} stopped before it finished"),
        None => "its previous run is unknown".to_string(),
    };
    Some((row.attempts.saturating_add(1), why))
}

/// What a claim does with the row it found (the same decision for both backends).
pub(super) enum ClaimStep {
    /// The answer as it is (done, quarantined, or busy with a live owner).
    Answer(Claim),
    /// The claim becomes `owner`'s with this attempt count (and the reason kept as the last
    /// error, when a run was taken over); the answer is then `Claim::Retry`.
    Own { attempts: u32, why: Option<String> },
}

/// The decision for a claim that found `row` (see [`takeover`] for rows in progress).
pub(super) fn claim_step(
    row: &StoredOwner,
    mailbox_ref: Option<&str>,
    owner: &Owner,
    now: i64,
    local_store: bool,
) -> ClaimStep {
    match LedgerState::parse(&row.state) {
        Some(LedgerState::Done) => ClaimStep::Answer(Claim::Done {
            outcome: LedgerOutcome::from_db(row.outcome.as_deref().unwrap_or_default()),
            same_copy: match (&row.mailbox_ref, mailbox_ref) {
                (Some(stored), Some(given)) => stored == given,
                _ => true,
            },
        }),
        Some(LedgerState::Quarantined) => ClaimStep::Answer(Claim::Quarantined),
        Some(LedgerState::Failed) => ClaimStep::Own {
            attempts: row.attempts,
            why: None,
        },
        Some(LedgerState::InProgress) | None => match takeover(row, owner, now, local_store) {
            None => ClaimStep::Answer(Claim::Busy),
            Some((attempts, why)) => ClaimStep::Own {
                attempts,
                why: Some(why),
            },
        },
    }
}

/// Whether a run `owner` may record a failure on a row in `state` held by `run`: not when it
/// is settled, nor when another run holds it (it took the claim over and is working on it).
pub(super) fn may_fail(state: &str, run: Option<&str>, owner: &Owner) -> bool {
    match state {
        "done" | "quarantined" => false,
        "in_progress" => run.is_none_or(|r| r == owner.run_id()),
        _ => true,
    }
}

/// A [`LedgerEntry`] from its columns (the database backend's reader).
#[allow(clippy::too_many_arguments)]
pub(super) fn entry_parts(
    account: String,
    key: String,
    mailbox_ref: Option<String>,
    state: LedgerState,
    outcome: Option<String>,
    sd_number: Option<String>,
    attempts: u32,
    last_error: Option<String>,
    owner: Option<String>,
    first_seen_ms: i64,
    updated_ms: i64,
) -> LedgerEntry {
    LedgerEntry {
        account,
        key,
        mailbox_ref,
        state,
        outcome,
        sd_number,
        attempts,
        last_error,
        owner,
        first_seen_ms,
        updated_ms,
    }
}

impl StoredOwner {
    fn owner(&self) -> Option<Owner> {
        Some(Owner::from_parts(
            self.run.clone()?,
            self.host.clone().unwrap_or_default(),
            self.machine.clone().unwrap_or_default(),
            self.boot.clone().unwrap_or_default(),
            self.pidns.clone().unwrap_or_default(),
            self.pid.unwrap_or(0),
            self.start.map_or(0, |s| u64::try_from(s).unwrap_or(0)),
        ))
    }
}

fn set_owner(
    tx: &Connection,
    account: &str,
    key: &str,
    owner: &Owner,
    lease_until: i64,
    attempts: u32,
    last_error: Option<&str>,
) -> rusqlite::Result<()> {
    exec(
        tx,
        "UPDATE ledger SET state='in_progress', attempts=?3,
           last_error=COALESCE(?4, last_error), owner_run=?5, owner_host=?6, owner_machine=?7,
           owner_boot=?8, owner_pidns=?9, owner_pid=?10, owner_start=?11, lease_until=?12,
           updated_at=?13
         WHERE account=?1 AND key=?2",
        params![
            account,
            key,
            attempts,
            last_error,
            owner.run_id(),
            owner.host(),
            owner.machine_id(),
            owner.boot_id(),
            owner.pid_ns(),
            owner.pid(),
            i64::try_from(owner.start_ticks()).unwrap_or(i64::MAX),
            lease_until,
            now_ms(),
        ],
    )
    .map(|_| ())
}

const CLEAR_OWNER: &str =
    "owner_run=NULL, owner_host=NULL, owner_machine=NULL, owner_boot=NULL, owner_pidns=NULL, \
     owner_pid=NULL, owner_start=NULL, lease_until=NULL";

/// The statement of [`StateStore::settle`] (also clears the owner).
const SETTLE_SQL: &str = "INSERT INTO ledger (account, key, state, outcome, sd_number, attempts,
       last_error, first_seen, updated_at)
     VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?7)
     ON CONFLICT (account, key) DO UPDATE SET state=excluded.state,
       outcome=excluded.outcome, sd_number=excluded.sd_number,
       last_error=COALESCE(excluded.last_error, ledger.last_error),
       updated_at=excluded.updated_at, owner_run=NULL, owner_host=NULL, owner_machine=NULL,
       owner_boot=NULL, owner_pidns=NULL, owner_pid=NULL, owner_start=NULL, lease_until=NULL
     WHERE ledger.state != 'done'";

/// The statement of [`StateStore::fail`] for a row seen before (also clears the owner).
const FAIL_SQL: &str =
    "UPDATE ledger SET state='failed', attempts=?3, last_error=?4, updated_at=?5,
       owner_run=NULL, owner_host=NULL, owner_machine=NULL, owner_boot=NULL, owner_pidns=NULL,
       owner_pid=NULL, owner_start=NULL, lease_until=NULL
     WHERE account=?1 AND key=?2";

impl StateStore {
    fn lease_until(&self, now: i64) -> i64 {
        now.saturating_add(self.lease_ms())
    }

    /// The lease in milliseconds: the database backend adds it to the database's clock.
    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease().as_millis()).unwrap_or(i64::MAX)
    }

    /// Decides, in one write transaction, who handles the message `key` of `account` (see the
    /// module documentation). `mailbox_ref` (IMAP `folder/uidvalidity/uid`, POP3 UIDL, Maildir
    /// file name) is recorded for [`StateStore::entry_by_ref`]. Also renews `owner`'s lease.
    pub fn claim(
        &self,
        account: &str,
        key: &str,
        mailbox_ref: Option<&str>,
        owner: &Owner,
    ) -> Result<Claim> {
        if let Some(db) = self.database() {
            let renew = self.lease_renewal_due(owner);
            let lease = self.lease_ms();
            return db.claim(account, key, mailbox_ref, owner, lease, renew);
        }
        self.write(account, "claim a message", |tx| {
            self.claim_in(tx, account, key, mailbox_ref, owner)
        })
    }

    /// Takes mailbox `scope` for `owner`'s run, so that one process at a time reads it. With
    /// `email.STATE_DSN` a lease in the database (renewed with the run's claims by
    /// [`StateStore::renew_lease`], given back by [`StateStore::release_owned`], lost like a
    /// claim when its run died): `Some(holder)` when another live run holds it, and the caller
    /// leaves the mailbox to it. With SQLite always `None`: the claims of its messages keep
    /// overlapping runs of one server apart, as before.
    pub fn take_mailbox(&self, scope: &str, owner: &Owner) -> Result<Option<String>> {
        match self.database() {
            Some(db) => db.take_mailbox(scope, owner, self.lease_ms()),
            None => Ok(None),
        }
    }

    /// Moves the ledger rows of scope `from` to scope `to` (a mailbox's scope changed its
    /// spelling); a message recorded under both keeps its row under `to`. Only reads when
    /// `from` has no rows.
    pub fn move_ledger_scope(&self, from: &str, to: &str) -> Result<()> {
        if let Some(db) = self.database() {
            return db.move_ledger_scope(from, to);
        }
        let any = self.read(to, "look up an earlier ledger", |c| {
            c.prepare_cached("SELECT 1 FROM ledger WHERE account=?1 LIMIT 1")?
                .exists(params![from])
        })?;
        if !any {
            return Ok(());
        }
        self.write(to, "move an earlier ledger", |tx| {
            exec(
                tx,
                "UPDATE OR IGNORE ledger SET account=?2 WHERE account=?1",
                params![from, to],
            )?;
            exec(tx, "DELETE FROM ledger WHERE account=?1", params![from]).map(|_| ())
        })
    }

    /// Records `settled` (a message the host accepted or that was skipped, see
    /// [`Settled`]) and claims the next message, in one transaction: one commit per message
    /// instead of two while messages are waiting. Nothing is recorded when it fails (the
    /// caller then records them one at a time).
    pub fn settle_then_claim(
        &self,
        settled: &Settled,
        account: &str,
        key: &str,
        mailbox_ref: Option<&str>,
        owner: &Owner,
    ) -> Result<Claim> {
        if let Some(db) = self.database() {
            let renew = self.lease_renewal_due(owner);
            let lease = self.lease_ms();
            return db.settle_then_claim(settled, account, key, mailbox_ref, owner, lease, renew);
        }
        self.write(account, "record a message and claim the next", |tx| {
            settled.record(tx)?;
            self.claim_in(tx, account, key, mailbox_ref, owner)
        })
    }

    /// Records `settled` on its own (see [`StateStore::settle_then_claim`]).
    pub fn settle_done(&self, settled: &Settled) -> Result<()> {
        if let Some(db) = self.database() {
            return db.settle(
                &settled.account,
                &settled.key,
                LedgerState::Done,
                &settled.outcome.to_db(),
                settled.sd_number.as_deref(),
                None,
            );
        }
        self.write(&settled.account, "record a processed message", |tx| {
            settled.record(tx)
        })
    }

    fn claim_in(
        &self,
        tx: &Connection,
        account: &str,
        key: &str,
        mailbox_ref: Option<&str>,
        owner: &Owner,
    ) -> rusqlite::Result<Claim> {
        let now = now_ms();
        let lease_until = self.lease_until(now);
        if self.lease_renewal_due(owner) {
            exec(
                tx,
                "UPDATE ledger SET lease_until=?2 WHERE owner_run=?1 AND state='in_progress'",
                params![owner.run_id(), lease_until],
            )?;
        }
        let row = one(
            tx,
            "SELECT state, outcome, attempts, owner_run, owner_host, owner_machine,
                        owner_boot, owner_pidns, owner_pid, owner_start, lease_until,
                        mailbox_ref
                 FROM ledger WHERE account=?1 AND key=?2",
            params![account, key],
            |r| {
                Ok(StoredOwner {
                    state: r.get(0)?,
                    outcome: r.get(1)?,
                    attempts: r.get(2)?,
                    run: r.get(3)?,
                    host: r.get(4)?,
                    machine: r.get(5)?,
                    boot: r.get(6)?,
                    pidns: r.get(7)?,
                    pid: r.get(8)?,
                    start: r.get(9)?,
                    lease_until: r.get(10)?,
                    mailbox_ref: r.get(11)?,
                })
            },
        )
        .optional()?;
        let Some(row) = row else {
            exec(
                tx,
                "INSERT INTO ledger (account, key, mailbox_ref, state, attempts, owner_run,
                   owner_host, owner_machine, owner_boot, owner_pidns, owner_pid, owner_start,
                   lease_until, first_seen, updated_at)
                 VALUES (?1, ?2, ?3, 'in_progress', 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
                params![
                    account,
                    key,
                    mailbox_ref,
                    owner.run_id(),
                    owner.host(),
                    owner.machine_id(),
                    owner.boot_id(),
                    owner.pid_ns(),
                    owner.pid(),
                    i64::try_from(owner.start_ticks()).unwrap_or(i64::MAX),
                    lease_until,
                    now,
                ],
            )?;
            return Ok(Claim::New);
        };
        // A done row keeps the copy it was recorded for (see `Claim::Done::same_copy`).
        if let Some(r) = mailbox_ref.filter(|_| row.state != "done") {
            exec(
                tx,
                "UPDATE ledger SET mailbox_ref=?3
                 WHERE account=?1 AND key=?2 AND mailbox_ref IS NOT ?3",
                params![account, key, r],
            )?;
        }
        match claim_step(&row, mailbox_ref, owner, now, true) {
            ClaimStep::Answer(claim) => Ok(claim),
            ClaimStep::Own { attempts, why } => {
                set_owner(
                    tx,
                    account,
                    key,
                    owner,
                    lease_until,
                    attempts,
                    why.as_deref(),
                )?;
                Ok(Claim::Retry { attempts })
            }
        }
    }

    /// Records that the host accepted the message (`outcome` such as `inquiry` or `threaded`,
    /// the SD number it returned): done for good. Commit this before touching the mailbox.
    /// A row already done keeps its first outcome.
    pub fn complete(
        &self,
        account: &str,
        key: &str,
        outcome: impl Into<LedgerOutcome>,
        sd_number: Option<&str>,
    ) -> Result<()> {
        let outcome = outcome.into().to_db();
        self.settle(account, key, LedgerState::Done, &outcome, sd_number, None)
    }

    /// Records a skipped message (blocked sender, our own mail, auto-reply without SD item,
    /// oversized) as done with outcome `skipped: <reason>`: counted once, never reconsidered.
    pub fn skip(&self, account: &str, key: &str, reason: &str) -> Result<()> {
        let outcome = LedgerOutcome::Skipped(reason.to_string()).to_db();
        self.settle(account, key, LedgerState::Done, &outcome, None, None)
    }

    /// Gives up on a message (after [`MAX_ATTEMPTS`] failures): it is never retried; `reason`
    /// is kept as its last error. A message already done stays done.
    pub fn quarantine(&self, account: &str, key: &str, reason: &str) -> Result<()> {
        self.settle(
            account,
            key,
            LedgerState::Quarantined,
            "quarantined",
            None,
            Some(reason),
        )
    }

    fn settle(
        &self,
        account: &str,
        key: &str,
        state: LedgerState,
        outcome: &str,
        sd_number: Option<&str>,
        error: Option<&str>,
    ) -> Result<()> {
        if let Some(db) = self.database() {
            return db.settle(account, key, state, outcome, sd_number, error);
        }
        self.write(account, "record a processed message", |tx| {
            settle_in(tx, account, key, state, outcome, sd_number, error)
        })
    }

    /// Records a failed attempt (the host threw, parsing failed): the row is released for the
    /// next run and the number of failed attempts so far is returned; at [`MAX_ATTEMPTS`] the
    /// caller quarantines it. A row already done or quarantined is left as it is, and so is
    /// a row another run took over from `owner` (its attempts are returned unchanged).
    pub fn fail(&self, account: &str, key: &str, owner: &Owner, error: &str) -> Result<u32> {
        if let Some(db) = self.database() {
            return db.fail(account, key, owner, error);
        }
        let now = now_ms();
        let error = truncate(error);
        self.write(account, "record a failed message", |tx| {
            let row: Option<(String, u32, Option<String>)> = one(
                tx,
                "SELECT state, attempts, owner_run FROM ledger WHERE account=?1 AND key=?2",
                params![account, key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
            match row {
                None => {
                    exec(
                        tx,
                        "INSERT INTO ledger (account, key, state, attempts, last_error,
                           first_seen, updated_at) VALUES (?1, ?2, 'failed', 1, ?3, ?4, ?4)",
                        params![account, key, error, now],
                    )?;
                    Ok(1)
                }
                Some((state, attempts, run)) if !may_fail(&state, run.as_deref(), owner) => {
                    Ok(attempts)
                }
                Some((_, attempts, _)) => {
                    let attempts = attempts.saturating_add(1);
                    exec(tx, FAIL_SQL, params![account, key, attempts, error, now])?;
                    Ok(attempts)
                }
            }
        })
    }

    /// Gives back one message `owner` claimed but did not hand to the host (not counted as an
    /// attempt). True when `owner` held it.
    pub fn release(&self, account: &str, key: &str, owner: &Owner) -> Result<bool> {
        if let Some(db) = self.database() {
            return db.release(account, key, owner);
        }
        self.write(account, "release a message", |tx| {
            release_where(
                tx,
                "account=?2 AND key=?3",
                params![owner.run_id(), account, key],
            )
            .map(|n| n > 0)
        })
    }

    /// On a clean end of a run: gives back every message `owner` still holds (claimed but never
    /// handed to the host). Returns how many.
    pub fn release_owned(&self, owner: &Owner) -> Result<usize> {
        if let Some(db) = self.database() {
            return db.release_owned(owner);
        }
        self.write(super::NO_ACCOUNT, "release the run's messages", |tx| {
            release_where(tx, "1=1", params![owner.run_id()])
        })
    }

    /// Extends the lease of every message `owner` holds (call it during long host calls).
    pub fn renew_lease(&self, owner: &Owner) -> Result<usize> {
        if let Some(db) = self.database() {
            return db.renew_lease(owner, self.lease_ms());
        }
        let lease_until = self.lease_until(now_ms());
        self.write(super::NO_ACCOUNT, "renew the run's lease", |tx| {
            exec(
                tx,
                "UPDATE ledger SET lease_until=?2 WHERE owner_run=?1 AND state='in_progress'",
                params![owner.run_id(), lease_until],
            )
        })
    }

    /// The ledger row of one message.
    pub fn entry(&self, account: &str, key: &str) -> Result<Option<LedgerEntry>> {
        if let Some(db) = self.database() {
            return db.entry(account, key);
        }
        self.read(account, "read the ledger", |c| {
            one(
                c,
                &format!("SELECT {ENTRY_COLUMNS} FROM ledger WHERE account=?1 AND key=?2"),
                params![account, key],
                entry_from_row,
            )
            .optional()
        })
    }

    /// The most recent ledger row recorded for a mailbox reference (e.g. a POP3 UIDL), so a
    /// message already settled need not be downloaded again.
    pub fn entry_by_ref(&self, account: &str, mailbox_ref: &str) -> Result<Option<LedgerEntry>> {
        if let Some(db) = self.database() {
            return db.entry_by_ref(account, mailbox_ref);
        }
        self.read(account, "read the ledger", |c| {
            one(
                c,
                &format!(
                    "SELECT {ENTRY_COLUMNS} FROM ledger WHERE account=?1 AND mailbox_ref=?2
                     ORDER BY updated_at DESC LIMIT 1"
                ),
                params![account, mailbox_ref],
                entry_from_row,
            )
            .optional()
        })
    }

    /// The quarantined messages of `account`, oldest first.
    pub fn quarantined(&self, account: &str) -> Result<Vec<LedgerEntry>> {
        if let Some(db) = self.database() {
            return db.quarantined(account);
        }
        self.read(account, "read the ledger", |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {ENTRY_COLUMNS} FROM ledger WHERE account=?1 AND state='quarantined'
                 ORDER BY first_seen"
            ))?;
            let rows = stmt.query_map(params![account], entry_from_row)?;
            rows.collect()
        })
    }

    /// How many messages of `account` are in each state.
    pub fn counts(&self, account: &str) -> Result<LedgerCounts> {
        if let Some(db) = self.database() {
            return db.counts(account);
        }
        self.read(account, "count the ledger", |c| {
            let mut stmt = c.prepare(
                "SELECT state, substr(COALESCE(outcome, ''), 1, ?2) = ?3, count(*)
                 FROM ledger WHERE account=?1 GROUP BY 1, 2",
            )?;
            let mut counts = LedgerCounts::default();
            let mut rows = stmt.query(params![account, SKIPPED_PREFIX.len(), SKIPPED_PREFIX])?;
            while let Some(r) = rows.next()? {
                let state: String = r.get(0)?;
                let skipped: bool = r.get(1)?;
                let n: u64 = r.get(2)?;
                match LedgerState::parse(&state) {
                    Some(LedgerState::InProgress) => counts.in_progress += n,
                    Some(LedgerState::Failed) => counts.failed += n,
                    Some(LedgerState::Done) if skipped => counts.skipped += n,
                    Some(LedgerState::Done) => counts.done += n,
                    Some(LedgerState::Quarantined) => counts.quarantined += n,
                    None => {}
                }
            }
            Ok(counts)
        })
    }

    /// Forgets a message (an administrator wants a quarantined one tried again): the next run
    /// treats it as new. True when there was a row.
    pub fn forget(&self, account: &str, key: &str) -> Result<bool> {
        if let Some(db) = self.database() {
            return db.forget(account, key);
        }
        self.write(account, "forget a message", |tx| {
            exec(
                tx,
                "DELETE FROM ledger WHERE account=?1 AND key=?2",
                params![account, key],
            )
            .map(|n| n > 0)
        })
    }
}

fn settle_in(
    tx: &Connection,
    account: &str,
    key: &str,
    state: LedgerState,
    outcome: &str,
    sd_number: Option<&str>,
    error: Option<&str>,
) -> rusqlite::Result<()> {
    let error = error.map(truncate);
    exec(
        tx,
        SETTLE_SQL,
        params![
            account,
            key,
            state.as_str(),
            outcome,
            sd_number,
            error,
            now_ms()
        ],
    )
    .map(|_| ())
}

/// Releases the in-progress rows of owner `?1` matching `filter`: rows with no failed attempt
/// are removed (as if never claimed), the others go back to `failed`.
fn release_where(
    tx: &Connection,
    filter: &str,
    params: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<usize> {
    let removed = exec(
        tx,
        &format!(
            "DELETE FROM ledger WHERE owner_run=?1 AND state='in_progress' AND attempts=0
             AND {filter}"
        ),
        params,
    )?;
    let returned = exec(
        tx,
        &format!(
            "UPDATE ledger SET state='failed', {CLEAR_OWNER}
             WHERE owner_run=?1 AND state='in_progress' AND {filter}"
        ),
        params,
    )?;
    Ok(removed + returned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, StateStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), None).unwrap();
        (dir, store)
    }

    #[test]
    fn a_second_copy_with_a_processed_message_id_is_told_apart() {
        let (_dir, s) = store();
        let run = Owner::new_run();
        assert_eq!(
            s.claim("7", "<a@x>", Some("uid:1"), &run).unwrap(),
            Claim::New
        );
        s.complete("7", "<a@x>", "inquiry", None).unwrap();
        let next = Owner::new_run();
        let other = s.claim("7", "<a@x>", Some("uid:2"), &next).unwrap();
        assert!(
            matches!(
                other,
                Claim::Done {
                    same_copy: false,
                    ..
                }
            ),
            "{other:?}"
        );
        // The row still names the copy it was done for: that one is re-listed as itself.
        let again = s.claim("7", "<a@x>", Some("uid:1"), &next).unwrap();
        assert!(
            matches!(
                again,
                Claim::Done {
                    same_copy: true,
                    ..
                }
            ),
            "{again:?}"
        );
    }

    #[test]
    fn a_settled_message_and_the_next_claim_commit_together() {
        let (_dir, s) = store();
        let run = Owner::new_run();
        assert_eq!(s.claim("7", "<a@x>", Some("u1"), &run).unwrap(), Claim::New);
        let done = Settled {
            account: "7".into(),
            key: "<a@x>".into(),
            outcome: "inquiry".into(),
            sd_number: Some("SO1".into()),
        };
        assert_eq!(
            s.settle_then_claim(&done, "7", "<b@x>", Some("u2"), &run)
                .unwrap(),
            Claim::New
        );
        let a = s.entry("7", "<a@x>").unwrap().unwrap();
        assert_eq!(
            (a.state, a.outcome.as_deref(), a.owner.is_none()),
            (LedgerState::Done, Some("inquiry"), true)
        );
        let b = s.entry("7", "<b@x>").unwrap().unwrap();
        assert_eq!(b.state, LedgerState::InProgress);
        // A skipped message recorded the same way is done, and counted as skipped.
        let skipped = Settled::skipped("7", "<b@x>", "blocked");
        assert_eq!(
            s.settle_then_claim(&skipped, "7", "<a@x>", Some("u1"), &run)
                .unwrap(),
            Claim::Done {
                outcome: "inquiry".into(),
                same_copy: true
            }
        );
        let counts = s.counts("7").unwrap();
        assert_eq!((counts.done, counts.skipped, counts.in_progress), (1, 1, 0));
        // Alone, when no other message is waiting.
        s.settle_done(&done).unwrap();
        assert_eq!(s.counts("7").unwrap().done, 1);
    }

    #[test]
    fn the_claim_protocol_from_new_to_done() {
        let (_dir, s) = store();
        let run = Owner::new_run();
        assert_eq!(s.claim("7", "<a@x>", Some("u1"), &run).unwrap(), Claim::New);
        // The same run meeting a second copy of the message leaves it alone.
        assert_eq!(
            s.claim("7", "<a@x>", Some("u2"), &run).unwrap(),
            Claim::Busy
        );
        // Another account has its own ledger.
        assert_eq!(s.claim("8", "<a@x>", None, &run).unwrap(), Claim::New);
        s.complete("7", "<a@x>", "inquiry", Some("SO201700043"))
            .unwrap();
        let next = Owner::new_run();
        assert_eq!(
            s.claim("7", "<a@x>", None, &next).unwrap(),
            Claim::Done {
                outcome: "inquiry".into(),
                same_copy: true
            }
        );
        let e = s.entry("7", "<a@x>").unwrap().unwrap();
        assert_eq!(e.state, LedgerState::Done);
        assert_eq!(e.sd_number.as_deref(), Some("SO201700043"));
        assert_eq!(e.owner, None);
        assert_eq!(e.mailbox_ref.as_deref(), Some("u2"));
        // A late second completion does not replace the first.
        s.complete("7", "<a@x>", "threaded", Some("SO1")).unwrap();
        let e = s.entry("7", "<a@x>").unwrap().unwrap();
        assert_eq!(e.outcome.as_deref(), Some("inquiry"));
        assert_eq!(e.sd_number.as_deref(), Some("SO201700043"));
    }

    #[test]
    fn failures_count_up_to_quarantine() {
        let (_dir, s) = store();
        for attempt in 1..=MAX_ATTEMPTS {
            let run = Owner::new_run();
            let claim = s.claim("m", "k", None, &run).unwrap();
            if attempt == 1 {
                assert_eq!(claim, Claim::New);
            } else {
                assert_eq!(
                    claim,
                    Claim::Retry {
                        attempts: attempt - 1
                    }
                );
            }
            assert_eq!(s.fail("m", "k", &run, "host threw: boom").unwrap(), attempt);
        }
        s.quarantine("m", "k", "failed 3 times: host threw: boom")
            .unwrap();
        let run = Owner::new_run();
        assert_eq!(s.claim("m", "k", None, &run).unwrap(), Claim::Quarantined);
        let q = s.quarantined("m").unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].attempts, MAX_ATTEMPTS);
        assert!(q[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("failed 3 times"));
        // Once done, failing or quarantining changes nothing.
        assert_eq!(s.claim("m", "d", None, &run).unwrap(), Claim::New);
        s.complete("m", "d", "inquiry", None).unwrap();
        assert_eq!(s.fail("m", "d", &run, "late").unwrap(), 0);
        s.quarantine("m", "d", "late").unwrap();
        assert_eq!(s.entry("m", "d").unwrap().unwrap().state, LedgerState::Done);
        // An administrator can let it be tried again.
        assert!(s.forget("m", "k").unwrap());
        assert_eq!(s.claim("m", "k", None, &run).unwrap(), Claim::New);
    }

    #[test]
    fn skipped_messages_are_done_and_counted_apart() {
        let (_dir, s) = store();
        let run = Owner::new_run();
        for k in ["a", "b", "c", "d", "e"] {
            assert_eq!(s.claim("m", k, None, &run).unwrap(), Claim::New);
        }
        s.skip("m", "a", "blocked sender").unwrap();
        s.complete("m", "b", "inquiry", Some("IQ00001")).unwrap();
        s.fail("m", "c", &run, "parse error").unwrap();
        s.quarantine("m", "d", "too many failures").unwrap();
        let claim = s.claim("m", "a", None, &Owner::new_run()).unwrap();
        assert!(claim.is_skipped(), "{claim:?}");
        assert_eq!(
            claim,
            Claim::Done {
                outcome: "skipped: blocked sender".into(),
                same_copy: true
            }
        );
        assert!(!s.claim("m", "b", None, &run).unwrap().is_skipped());
        assert_eq!(
            s.counts("m").unwrap(),
            LedgerCounts {
                in_progress: 1,
                failed: 1,
                done: 1,
                skipped: 1,
                quarantined: 1
            }
        );
    }

    #[test]
    fn release_gives_back_unhandled_claims_without_counting_an_attempt() {
        let (_dir, s) = store();
        let run = Owner::new_run();
        assert_eq!(s.claim("m", "fresh", None, &run).unwrap(), Claim::New);
        assert_eq!(s.claim("m", "done", None, &run).unwrap(), Claim::New);
        s.complete("m", "done", "inquiry", None).unwrap();
        s.fail("m", "retried", &run, "x").unwrap();
        assert_eq!(
            s.claim("m", "retried", None, &run).unwrap(),
            Claim::Retry { attempts: 1 }
        );
        let other = Owner::new_run();
        assert_eq!(s.claim("m", "theirs", None, &other).unwrap(), Claim::New);

        assert!(!s.release("m", "theirs", &run).unwrap());
        assert_eq!(s.release_owned(&run).unwrap(), 2);
        assert_eq!(s.entry("m", "fresh").unwrap(), None);
        let e = s.entry("m", "retried").unwrap().unwrap();
        assert_eq!((e.state, e.attempts), (LedgerState::Failed, 1));
        assert_eq!(
            s.entry("m", "done").unwrap().unwrap().state,
            LedgerState::Done
        );
        assert_eq!(
            s.entry("m", "theirs").unwrap().unwrap().state,
            LedgerState::InProgress
        );
        let next = Owner::new_run();
        assert_eq!(s.claim("m", "fresh", None, &next).unwrap(), Claim::New);
        assert_eq!(
            s.claim("m", "retried", None, &next).unwrap(),
            Claim::Retry { attempts: 1 }
        );
        assert!(s.release("m", "fresh", &next).unwrap());
        assert_eq!(s.entry("m", "fresh").unwrap(), None);
    }

    #[test]
    fn entry_by_ref_finds_a_settled_uidl() {
        let (_dir, s) = store();
        let run = Owner::new_run();
        s.claim("pop", "<m1@x>", Some("UIDL-1"), &run).unwrap();
        s.complete("pop", "<m1@x>", "inquiry", Some("IQ00002"))
            .unwrap();
        let e = s.entry_by_ref("pop", "UIDL-1").unwrap().unwrap();
        assert_eq!(e.key, "<m1@x>");
        assert_eq!(e.state, LedgerState::Done);
        assert_eq!(s.entry_by_ref("pop", "UIDL-2").unwrap(), None);
        assert_eq!(s.entry_by_ref("other", "UIDL-1").unwrap(), None);
    }

    #[test]
    fn a_run_whose_claim_was_taken_over_cannot_fail_the_new_owners_message() {
        let (_dir, s) = store();
        let me = Owner::new_run();
        let stale = me.sibling("stale-run", 0, 1);
        assert_eq!(s.claim("m", "k", None, &stale).unwrap(), Claim::New);
        assert_eq!(
            s.claim("m", "k", None, &me).unwrap(),
            Claim::Retry { attempts: 1 }
        );
        assert_eq!(s.fail("m", "k", &stale, "host threw").unwrap(), 1);
        let entry = s.entry("m", "k").unwrap().unwrap();
        assert_eq!(entry.state, LedgerState::InProgress);
        assert_eq!(entry.owner.as_deref(), Some(me.run_id()));
        assert_eq!(s.fail("m", "k", &me, "host threw").unwrap(), 2);
    }

    #[test]
    fn long_errors_are_cut() {
        let (_dir, s) = store();
        let long = "é".repeat(MAX_ERROR_CHARS + 50);
        s.fail("m", "k", &Owner::new_run(), &long).unwrap();
        let stored = s.entry("m", "k").unwrap().unwrap().last_error.unwrap();
        assert_eq!(stored.chars().count(), MAX_ERROR_CHARS + 1);
    }
}
