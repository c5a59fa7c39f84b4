//! The eventCheckMail summary (SPEC §5): per mailbox and in total, as the PHP caller gets it.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Serialize, Serializer};

/// What `eventCheckMail()` returns.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The virtual host that receives the mail (the event's Data).
    pub host: String,
    pub environment: String,
    /// `disabled`, `send_email_off`, `ok`, or `errors` (some mailbox or account could not be
    /// read completely: see each entry, and `errors`).
    pub status: &'static str,
    /// The tenant rows that could not be used.
    pub errors: Vec<String>,
    /// What the INI file warns of, and mailboxes configured twice.
    pub warnings: Vec<String>,
    pub mailboxes: Vec<MailboxSummary>,
    pub totals: Totals,
    pub duration_ms: u64,
}

/// One mailbox's entry in the summary.
#[derive(Debug, Default, Serialize)]
pub struct MailboxSummary {
    /// The tenant RECID (a number), or `master`.
    #[serde(serialize_with = "account_value")]
    pub account: String,
    pub email: String,
    pub protocol: String,
    pub fetched: u64,
    pub inquiries: u64,
    pub threaded: u64,
    pub skipped: u64,
    pub skip_reasons: BTreeMap<String, u64>,
    pub duplicates: u64,
    pub failed: u64,
    pub quarantined: u64,
    pub deferred: u64,
    pub errors: Vec<String>,
}

/// The mailboxes' counts added up; `errors` counts their errors.
#[derive(Debug, Serialize)]
pub struct Totals {
    pub mailboxes: usize,
    pub fetched: u64,
    pub inquiries: u64,
    pub threaded: u64,
    pub skipped: u64,
    pub duplicates: u64,
    pub failed: u64,
    pub quarantined: u64,
    pub deferred: u64,
    pub errors: u64,
}

impl MailboxSummary {
    pub(super) fn skip(&mut self, reason: &str) {
        self.skipped += 1;
        *self.skip_reasons.entry(reason.to_string()).or_default() += 1;
    }
}

/// A RECID as a number, `master` as it is.
fn account_value<S: Serializer>(id: &str, serializer: S) -> Result<S::Ok, S::Error> {
    match id.parse::<i64>() {
        Ok(recid) => serializer.serialize_i64(recid),
        Err(_) => serializer.serialize_str(id),
    }
}

/// What the run knows before it reads anything: its host, environment, the rows' errors and
/// the warnings.
pub(super) struct Base {
    pub(super) host: String,
    pub(super) environment: String,
    pub(super) errors: Vec<String>,
    pub(super) warnings: Vec<String>,
}

/// The summary of a run that ends with `status` after reading `mailboxes`.
pub(super) fn finish_summary(
    base: Base,
    status: &'static str,
    mailboxes: Vec<MailboxSummary>,
    started: Instant,
) -> Summary {
    let total = |f: fn(&MailboxSummary) -> u64| -> u64 { mailboxes.iter().map(f).sum() };
    let totals = Totals {
        mailboxes: mailboxes.len(),
        fetched: total(|m| m.fetched),
        inquiries: total(|m| m.inquiries),
        threaded: total(|m| m.threaded),
        skipped: total(|m| m.skipped),
        duplicates: total(|m| m.duplicates),
        failed: total(|m| m.failed),
        quarantined: total(|m| m.quarantined),
        deferred: total(|m| m.deferred),
        errors: total(|m| m.errors.len() as u64),
    };
    Summary {
        host: base.host,
        environment: base.environment,
        status,
        errors: base.errors,
        warnings: base.warnings,
        mailboxes,
        totals,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}
