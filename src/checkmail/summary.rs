//! The eventCheckMail summary (SPEC §5): per mailbox and in total.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};

#[derive(Debug, Default)]
pub(super) struct MailboxSummary {
    pub(super) account: String,
    pub(super) email: String,
    pub(super) protocol: String,
    pub(super) fetched: u64,
    pub(super) inquiries: u64,
    pub(super) threaded: u64,
    pub(super) skipped: u64,
    pub(super) skip_reasons: BTreeMap<String, u64>,
    pub(super) duplicates: u64,
    pub(super) failed: u64,
    pub(super) quarantined: u64,
    pub(super) deferred: u64,
    pub(super) errors: Vec<String>,
}

impl MailboxSummary {
    pub(super) fn skip(&mut self, reason: &str) {
        self.skipped += 1;
        *self.skip_reasons.entry(reason.to_string()).or_default() += 1;
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "account": account_value(&self.account),
            "email": self.email,
            "protocol": self.protocol,
            "fetched": self.fetched,
            "inquiries": self.inquiries,
            "threaded": self.threaded,
            "skipped": self.skipped,
            "skip_reasons": self.skip_reasons,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "quarantined": self.quarantined,
            "deferred": self.deferred,
            "errors": self.errors,
        })
    }
}

pub(super) fn account_value(id: &str) -> Value {
    id.parse::<i64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(id))
}

pub(super) fn finish_summary(
    mut base: Value,
    status: &str,
    mailboxes: &[MailboxSummary],
    started: Instant,
) -> Value {
    let total = |f: fn(&MailboxSummary) -> u64| -> u64 { mailboxes.iter().map(f).sum() };
    base["status"] = Value::from(status);
    base["mailboxes"] = Value::Array(mailboxes.iter().map(MailboxSummary::to_json).collect());
    base["totals"] = json!({
        "mailboxes": mailboxes.len(),
        "fetched": total(|m| m.fetched),
        "inquiries": total(|m| m.inquiries),
        "threaded": total(|m| m.threaded),
        "skipped": total(|m| m.skipped),
        "duplicates": total(|m| m.duplicates),
        "failed": total(|m| m.failed),
        "quarantined": total(|m| m.quarantined),
        "deferred": total(|m| m.deferred),
        "errors": total(|m| m.errors.len() as u64),
    });
    base["duration_ms"] = Value::from(started.elapsed().as_millis() as u64);
    base
}
