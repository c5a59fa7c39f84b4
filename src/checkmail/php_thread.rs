//! PHP's thread during a run: takes each message from the mailbox threads, claims it in the
//! ledger, carries out the decision for it (the host calls), settles the outcome and only then
//! sends the mailbox its action.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

use regex::Regex;
use serde_json::{json, Value};

use super::alerts::auth_alert_key;
use super::blocklist::Blocklist;
use super::decide::{decide, Otherwise, Plan, Rules};
use super::mail::{mail, remove_attachments};
use super::summary::MailboxSummary;
use super::worker::{ledger_scope, Decision, Event};
use super::Services;
use crate::config::{Account, Settings};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::mime::ParsedMail;
use crate::state::{Claim, LedgerOutcome, Owner, Settled, StateStore, MAX_ATTEMPTS};

/// Everything PHP's thread needs while processing one run.
pub(super) struct Run<'a> {
    pub(super) services: &'a mut dyn Services,
    pub(super) settings: &'a Settings,
    pub(super) host: &'a mut dyn Host,
    pub(super) vhost: String,
    pub(super) state: StateStore,
    pub(super) owner: Owner,
    pub(super) sd_pattern: Regex,
    pub(super) thread_key: Option<[u8; 32]>,
    pub(super) blocklist: Blocklist,
    pub(super) own_addresses: HashSet<String>,
    pub(super) attachments_dir: PathBuf,
    /// Messages with attachments so far: message `n` writes its files into the directory
    /// `n` under `attachments_dir`, so no two messages of a run ever share a `path` (a host
    /// that stores `fread($fh, filesize($path))` would otherwise read the first file's size
    /// from PHP's stat cache and store a truncated second one).
    pub(super) attachment_messages: usize,
    /// Per mailbox, where its decisions go; `None` once its channel is closed.
    pub(super) decisions: Vec<Option<Sender<Decision>>>,
    /// The last message the host accepted (or that was skipped), not yet recorded: committed
    /// together with the next claim when another message is already waiting, else at once.
    pub(super) pending: Option<Pending>,
}

/// A settled message waiting for its commit, and the mailbox decision that must follow it.
pub(super) struct Pending {
    pub(super) mailbox: usize,
    pub(super) settled: Settled,
    pub(super) decision: Decision,
}

/// How one message ended for the summary.
pub(super) enum Outcome {
    Inquiry(Settled),
    Threaded(Settled),
    Skipped(&'static str, Settled),
    Duplicate,
    /// Skipped by an earlier run (or copy): left in place again, counted as a duplicate.
    SkippedBefore,
    /// A different message with a Message-ID already processed: left in place, counted as a
    /// duplicate (never deleted as if it had become an Inquiry).
    DuplicateCopy,
    /// Another live run is on it: nothing to do this run.
    Busy,
    Failed,
    Quarantined,
    /// Quarantined by an earlier run but still in the folder: moved again, not counted.
    StillQuarantined,
}

impl Run<'_> {
    pub(super) fn process_events(
        &mut self,
        mailboxes: &[Account],
        summaries: &mut [MailboxSummary],
        events: Receiver<Event>,
        decisions: Vec<Sender<Decision>>,
    ) {
        // Owned here: dropping a mailbox's sender is what lets its thread commit.
        self.decisions = decisions.into_iter().map(Some).collect();
        // Each mailbox's ledger scope, worked out once (MAILDIR/MBOX resolve their path).
        let scopes: Vec<String> = mailboxes.iter().map(ledger_scope).collect();
        while let Some(event) = self.next_event(&events) {
            match event {
                Event::Listed { mailbox, deferred } => {
                    summaries[mailbox].deferred += deferred as u64;
                }
                Event::Oversized { mailbox, listed } => {
                    // No decision: the mailbox leaves it where it is, as a candidate.
                    summaries[mailbox].skip("oversized");
                    self.oversized(&mailboxes[mailbox], &scopes[mailbox], &listed);
                }
                Event::Message {
                    mailbox,
                    id,
                    parsed,
                    pass,
                } => {
                    summaries[mailbox].fetched += 1;
                    if !self.host.is_alive() {
                        // PHP is stopping: nothing more is handed over or recorded; the
                        // message stays where it is for the next run.
                        summaries[mailbox].deferred += 1;
                        continue;
                    }
                    let account = &mailboxes[mailbox];
                    let outcome = self.process(account, &scopes[mailbox], &id, *parsed);
                    // The host has returned and the message is gone: the next large one may
                    // be downloaded.
                    drop(pass);
                    let summary = &mut summaries[mailbox];
                    // Recorded with the next claim (or alone, see `next_event`); its decision
                    // reaches the mailbox only after that commit.
                    let mut settled = None;
                    let decision = match outcome {
                        Outcome::Inquiry(done) => {
                            summary.inquiries += 1;
                            settled = Some(done);
                            Some(Decision::Processed(id))
                        }
                        Outcome::Threaded(done) => {
                            summary.threaded += 1;
                            settled = Some(done);
                            Some(Decision::Processed(id))
                        }
                        Outcome::Skipped(reason, done) => {
                            summary.skip(reason);
                            settled = Some(done);
                            Some(Decision::Skipped(id))
                        }
                        Outcome::Duplicate => {
                            summary.duplicates += 1;
                            Some(Decision::Processed(id))
                        }
                        Outcome::SkippedBefore | Outcome::DuplicateCopy => {
                            summary.duplicates += 1;
                            Some(Decision::Skipped(id))
                        }
                        Outcome::Busy => {
                            summary.deferred += 1;
                            None
                        }
                        Outcome::Failed => {
                            summary.failed += 1;
                            None
                        }
                        Outcome::Quarantined => {
                            summary.failed += 1;
                            summary.quarantined += 1;
                            Some(Decision::Quarantine(id))
                        }
                        Outcome::StillQuarantined => Some(Decision::Quarantine(id)),
                    };
                    match (decision, settled) {
                        (Some(decision), Some(settled)) => {
                            self.pending = Some(Pending {
                                mailbox,
                                settled,
                                decision,
                            })
                        }
                        (Some(decision), None) => self.send_decision(mailbox, decision),
                        (None, _) => {}
                    }
                }
                Event::Unreadable { mailbox, id, error } => {
                    let summary = &mut summaries[mailbox];
                    match self.unreadable(&mailboxes[mailbox], &scopes[mailbox], &id, &error) {
                        Outcome::Busy => summary.deferred += 1,
                        Outcome::Quarantined => {
                            summary.failed += 1;
                            summary.quarantined += 1;
                            self.send_decision(mailbox, Decision::Quarantine(id));
                        }
                        Outcome::StillQuarantined => {
                            self.send_decision(mailbox, Decision::Quarantine(id))
                        }
                        _ => summary.failed += 1,
                    }
                }
                Event::Notice { mailbox, text } => {
                    let account = &mailboxes[mailbox];
                    let id = account.id.to_string();
                    self.log(
                        &format!(
                            "pcr_email: mailbox of account {id} ({}): {text}",
                            account.email
                        ),
                        json!({"account": id}),
                    );
                    summaries[mailbox].errors.push(text);
                }
                Event::Downloaded { mailbox } => {
                    // Every decision for it is sent: closing the channel lets it commit.
                    self.decisions[mailbox] = None;
                }
                Event::Finished { mailbox, error } => {
                    self.decisions[mailbox] = None;
                    match error {
                        Some(error) => {
                            self.mailbox_failed(&mailboxes[mailbox], &mut summaries[mailbox], error)
                        }
                        // Read fine: a later login failure is a new outage, alerted again.
                        None => {
                            let _ = self.state.clear_alert(&auth_alert_key(&mailboxes[mailbox]));
                        }
                    }
                }
            }
        }
        self.flush_pending();
        self.decisions.clear();
    }

    /// A message that could not be read: a failure of that message like a host failure
    /// (logged, retried by the next runs, quarantined after the third), keyed by its place in
    /// the mailbox since its Message-ID is unknown.
    pub(super) fn unreadable(
        &mut self,
        account: &Account,
        scope: &str,
        mailbox_ref: &str,
        error: &Error,
    ) -> Outcome {
        self.flush_pending();
        let id = account.id.to_string();
        let key = format!("unreadable:{mailbox_ref}");
        let what = format!("the message {mailbox_ref} (it cannot be read)");
        match self
            .state
            .claim(scope, &key, Some(mailbox_ref), &self.owner)
        {
            Ok(Claim::Busy) => return Outcome::Busy,
            Ok(Claim::Quarantined) | Ok(Claim::Done { .. }) => return Outcome::StillQuarantined,
            Ok(Claim::Retry { attempts }) if attempts >= MAX_ATTEMPTS => {
                let reason = format!("failed {attempts} times; last error: {error}");
                return self.quarantine(account, scope, &key, &what, &reason);
            }
            Ok(Claim::New) | Ok(Claim::Retry { .. }) => {}
            Err(e) => {
                self.log(&format!("pcr_email: {e}"), json!({"account": id}));
                return Outcome::Busy;
            }
        }
        self.log(
            &format!(
                "pcr_email: an incoming email in the mailbox of account {id} ({}) was not \
                 processed and stays in the mailbox: {error}",
                account.email
            ),
            json!({"account": id, "message": mailbox_ref}),
        );
        match self
            .state
            .fail(scope, &key, &self.owner, &error.to_string())
        {
            Ok(attempts) if attempts >= MAX_ATTEMPTS => {
                let reason = format!("failed {attempts} times; last error: {error}");
                self.quarantine(account, scope, &key, &what, &reason)
            }
            Ok(_) => Outcome::Failed,
            Err(e) => {
                self.log(&format!("pcr_email: {e}"), json!({"account": id}));
                Outcome::Failed
            }
        }
    }

    /// One downloaded message, start to end.
    pub(super) fn process(
        &mut self,
        account: &Account,
        scope: &str,
        mailbox_ref: &str,
        parsed: ParsedMail,
    ) -> Outcome {
        let id = account.id.to_string();
        let key = parsed.message_key.clone();
        let claim = match self.pending.take() {
            Some(pending) => match self.state.settle_then_claim(
                &pending.settled,
                scope,
                &key,
                Some(mailbox_ref),
                &self.owner,
            ) {
                Ok(claim) => {
                    self.send_decision(pending.mailbox, pending.decision);
                    Ok(claim)
                }
                // Nothing of it was recorded: one at a time, each with its own error.
                Err(_) => {
                    self.commit_pending(pending);
                    self.state
                        .claim(scope, &key, Some(mailbox_ref), &self.owner)
                }
            },
            None => self
                .state
                .claim(scope, &key, Some(mailbox_ref), &self.owner),
        };
        let claim = match claim {
            Ok(claim) => claim,
            Err(e) => {
                self.log(&format!("pcr_email: {e}"), json!({"account": id}));
                return Outcome::Busy;
            }
        };
        match claim {
            // Skipped earlier (a run that died before its mailbox actions, a second copy):
            // it never reached the host, so it must not get PROCESSED_ACTION (delete, move).
            Claim::Done { .. } if claim.is_skipped() => return Outcome::SkippedBefore,
            // Another message reusing a Message-ID already processed: counted, left in place.
            Claim::Done {
                same_copy: false, ..
            } => return Outcome::DuplicateCopy,
            Claim::Done { .. } => return Outcome::Duplicate,
            Claim::Busy => return Outcome::Busy,
            Claim::Quarantined => return Outcome::StillQuarantined,
            Claim::Retry { attempts } if attempts >= MAX_ATTEMPTS => {
                let reason = format!("failed {attempts} times");
                return self.quarantine(account, scope, &key, &describe(&parsed), &reason);
            }
            Claim::New | Claim::Retry { .. } => {}
        }
        // `$mail['attempt']`: 1 the first time; a message handed over again (its last run
        // failed or died, perhaps after the host had stored it) says so.
        let attempt = match claim {
            Claim::Retry { attempts } => attempts.saturating_add(1),
            _ => 1,
        };
        let verdict = self.deliver(account, &parsed, attempt);
        match verdict {
            Ok(Delivered::Inquiry(sd)) => Outcome::Inquiry(Settled {
                account: scope.to_string(),
                key,
                outcome: LedgerOutcome::Inquiry,
                sd_number: (!sd.is_empty()).then_some(sd),
            }),
            Ok(Delivered::Thread(sd)) => Outcome::Threaded(Settled {
                account: scope.to_string(),
                key,
                outcome: LedgerOutcome::Threaded,
                sd_number: Some(sd),
            }),
            Ok(Delivered::Skipped(reason)) => {
                Outcome::Skipped(reason, Settled::skipped(scope, &key, reason))
            }
            Err(error) => {
                let text = format!(
                    "pcr_email: incoming email {:?} from {} in the mailbox of account {id} was not \
                     processed and stays in the mailbox: {error}",
                    parsed.subject,
                    sender(&parsed),
                );
                self.log(
                    &text,
                    json!({"account": id, "message_id": parsed.message_id, "key": key}),
                );
                match self
                    .state
                    .fail(scope, &key, &self.owner, &error.to_string())
                {
                    Ok(attempts) if attempts >= MAX_ATTEMPTS => {
                        let reason = format!("failed {attempts} times; last error: {error}");
                        self.quarantine(account, scope, &key, &describe(&parsed), &reason)
                    }
                    Ok(_) => Outcome::Failed,
                    Err(e) => {
                        self.log(&format!("pcr_email: {e}"), json!({"account": id}));
                        Outcome::Failed
                    }
                }
            }
        }
    }

    /// The next event; first commits the pending record unless the next event is a message,
    /// whose claim then commits it.
    pub(super) fn next_event(&mut self, events: &Receiver<Event>) -> Option<Event> {
        if self.pending.is_some() {
            match events.try_recv() {
                Ok(event @ Event::Message { .. }) => return Some(event),
                Ok(event) => {
                    self.flush_pending();
                    return Some(event);
                }
                Err(TryRecvError::Empty) => self.flush_pending(),
                Err(TryRecvError::Disconnected) => {
                    self.flush_pending();
                    return None;
                }
            }
        }
        events.recv().ok()
    }

    pub(super) fn flush_pending(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.commit_pending(pending);
        }
    }

    /// Records a settled message on its own, then lets its mailbox act on it. The host has it
    /// either way: when the record fails, the mailbox still acts (no second Inquiry).
    pub(super) fn commit_pending(&mut self, pending: Pending) {
        if let Err(e) = self.state.settle_done(&pending.settled) {
            self.log(
                &format!(
                    "pcr_email: the outcome of {} could not be recorded: {e}",
                    pending.settled.key
                ),
                json!({"account": pending.settled.account}),
            );
        }
        self.send_decision(pending.mailbox, pending.decision);
    }

    pub(super) fn send_decision(&self, mailbox: usize, decision: Decision) {
        if let Some(channel) = &self.decisions[mailbox] {
            // A mailbox thread that stopped early no longer listens: nothing to do.
            let _ = channel.send(decision);
        }
    }

    /// Quarantines the message `what` describes (see [`describe`]).
    pub(super) fn quarantine(
        &mut self,
        account: &Account,
        scope: &str,
        key: &str,
        what: &str,
        reason: &str,
    ) -> Outcome {
        let id = account.id.to_string();
        if let Err(e) = self.state.quarantine(scope, key, reason) {
            self.log(&format!("pcr_email: {e}"), json!({"account": id}));
        }
        let text = format!(
            "pcr_email: {what} in the mailbox of account {id} ({}) was quarantined ({reason}); it \
             is kept in the folder PCR-Failed (IMAP, Maildir, Microsoft 365, Gmail; for an mbox \
             the mbox file PCR-Failed beside it) or left on the POP3 server, and will not be \
             retried",
            account.email,
        );
        self.log(&text, json!({"account": id, "key": key}));
        self.alert(
            account,
            &format!("quarantine:{id}:{key}"),
            "An incoming email could not be processed",
            &text,
        );
        Outcome::Quarantined
    }

    /// Carries out the decision for one message (`decide.rs`): the host calls, with `$mail`
    /// borrowing the parsed message (its bodies are not copied before the PHP boundary).
    pub(super) fn deliver(
        &mut self,
        account: &Account,
        parsed: &ParsedMail,
        attempt: u32,
    ) -> Result<Delivered> {
        let rules = Rules {
            own_addresses: &self.own_addresses,
            blocklist: &self.blocklist,
            thread_key: self.thread_key.as_ref(),
            sd_pattern: &self.sd_pattern,
        };
        let (item, otherwise, auto) = match decide(parsed, &rules) {
            Plan::Skip(reason) => return Ok(Delivered::Skipped(reason)),
            Plan::Hand {
                item,
                otherwise,
                auto,
            } => (item, otherwise, auto),
        };
        let attachments = self.attachment_files(parsed)?;
        let vhost = self.vhost.clone();
        let mail = mail(
            parsed,
            account,
            &vhost,
            item.as_deref(),
            auto,
            attempt,
            attachments,
        );
        let result = (|| {
            if let Some(sd) = &item {
                if self.host.add_to_thread(sd, &mail)? {
                    return Ok(Delivered::Thread(sd.clone()));
                }
            }
            if let Otherwise::Skip(reason) = otherwise {
                return Ok(Delivered::Skipped(reason));
            }
            // The named item does not exist (addToThread said so): a new Inquiry. `$mail`
            // keeps the number that was matched, so the host knows which item the sender
            // named (SPEC §5: "matched, or null").
            let sd = self.host.create_inquiry(&mail)?;
            Ok(Delivered::Inquiry(sd))
        })();
        if let Ok(Delivered::Inquiry(sd)) = &result {
            if sd.is_empty() {
                // Stored all the same (the host returned normally): recorded without a number.
                let id = account.id.to_string();
                self.log(
                    &format!(
                        "pcr_email: {} returned no SD number for incoming email {:?} from {} \
                         (account {id}); it is taken as created and will not be handed over again",
                        "PCR_Utility_EmailHost::createInquiry()",
                        parsed.subject,
                        sender(parsed)
                    ),
                    json!({"account": id, "message_id": parsed.message_id, "key": parsed.message_key}),
                );
            }
        }
        remove_attachments(&mail);
        result
    }

    pub(super) fn log(&mut self, text: &str, context: Value) {
        self.services.logger().error(self.host, text, &context);
    }
}

/// What the host did with a message.
pub(super) enum Delivered {
    Inquiry(String),
    Thread(String),
    Skipped(&'static str),
}

/// "incoming email "subject" from a@b (Message-ID x)", for log lines and alerts.
pub(super) fn describe(parsed: &ParsedMail) -> String {
    format!(
        "incoming email {:?} from {} (Message-ID {})",
        parsed.subject,
        sender(parsed),
        parsed.message_id.as_deref().unwrap_or("none"),
    )
}

pub(super) fn sender(parsed: &ParsedMail) -> String {
    parsed
        .from
        .as_ref()
        .map(|f| f.email.clone())
        .unwrap_or_else(|| "an unknown sender".into())
}
