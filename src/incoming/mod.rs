//! Mailboxes: one module per mailbox type behind one trait. Each mailbox runs in its own
//! thread during `eventCheckMail`; the PHP host is only ever called from PHP's thread, by
//! `crate::checkmail`, which drives this trait.
//!
//! The contract that keeps mail from being lost or doubled:
//! - `list` and `fetch_each` never change the mailbox (IMAP `BODY.PEEK[]`, POP3 RETR without
//!   DELE, Maildir reads);
//! - `mark_processed` is only called for messages the host has accepted (or that were
//!   skipped on purpose), after the state store has recorded them as done;
//! - `finish` commits (IMAP EXPUNGE as needed / LOGOUT, POP3 QUIT); dropping a mailbox without
//!   `finish` commits nothing (POP3: no QUIT, so no DELE takes effect).

mod cloud;
pub mod gate;
pub mod gmail;
pub mod graph;
pub mod imap;
pub mod maildir;
pub mod mbox;
pub mod pop3;

use crate::config::{Account, AuthType, Incoming, MailboxType, Secret};
use crate::error::{Error, Result};
use crate::state::StateStore;

/// One message as the listing sees it, before download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The mailbox's stable id: IMAP UID (decimal), POP3 UIDL, Maildir file name (unique part),
    /// mbox: a hash of the stored message.
    pub id: String,
    /// The size the server reports (bytes), used to refuse oversized messages before download.
    pub size: u64,
}

/// A downloaded message: the raw bytes, exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub id: String,
    pub raw: Vec<u8>,
}

/// What the consumer of `fetch_each` wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop downloading (the run's time budget is spent, or the consumer is gone).
    Stop,
}

pub trait Mailbox: Send {
    /// The protocol name for summaries: `IMAP`, `POP3`, `MAILDIR`, `MBOX`, `OFFICE365`,
    /// `GMAIL`.
    fn protocol(&self) -> &'static str;

    /// Messages that may be new: everything after the mailbox's cursor (IMAP: UIDs above the
    /// stored high-water mark for the current UIDVALIDITY; POP3: UIDLs not in the ledger;
    /// Maildir: files not in the ledger). In mailbox order, oldest first.
    fn list(&mut self) -> Result<Vec<Listed>>;

    /// Downloads `ids` in as few round trips as possible (one pipelined/batched request, not
    /// one per message), handing each message to `sink` as soon as it is complete so memory
    /// stays bounded. Stops early when `sink` returns `Flow::Stop`.
    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()>;

    /// Applies PROCESSED_ACTION (`seen`, `delete`, `move:<folder>`) to messages the host
    /// accepted, in one batch where the protocol allows.
    fn mark_processed(&mut self, ids: &[String]) -> Result<()>;

    /// Records that these need nothing more (skipped on purpose: blocked sender, auto-reply,
    /// our own mail, oversized, already processed elsewhere) WITHOUT changing them in the
    /// mailbox — nothing is deleted or moved that did not become an Inquiry or thread entry.
    /// Cursors (the IMAP high-water mark) may advance past them.
    fn mark_skipped(&mut self, ids: &[String]) -> Result<()>;

    /// Moves messages that failed three runs out of the way (IMAP: folder `PCR-Failed`).
    /// Returns false where the protocol has no such place (POP3, Maildir: the ledger does it).
    fn quarantine(&mut self, ids: &[String]) -> Result<bool>;

    /// The messages `fetch_each` could not read although the mailbox could (a Maildir file
    /// without read permission, not a regular file, ...), each with why. The run treats each
    /// as a failed message (retried, quarantined after three runs); the others go on.
    /// Drained by the caller after `fetch_each`.
    fn take_unreadable(&mut self) -> Vec<(String, Error)> {
        Vec::new()
    }

    /// The number of messages in the folder, for `checkAccount` (no side effects).
    fn count(&mut self) -> Result<usize>;

    /// Problems found while listing that the run must report (e.g. a POP3 server that gives
    /// two messages one UIDL: the second is not downloaded); drained by the caller. Each is
    /// a complete sentence without secrets.
    fn take_notices(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Commits what was marked and closes the connection cleanly.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Opens the account's incoming mailbox (connected and logged in for IMAP/POP3). The mailbox
/// keeps `state` (its own connection to the state store) for its cursors and marks.
/// OFFICE365 and GMAIL mailboxes keep their tokens in `env` (STATE_DIR, KEY_FILE).
pub fn open(
    account: &Account,
    env: &crate::oauth::OAuthEnv,
    state: StateStore,
) -> Result<Box<dyn Mailbox>> {
    let (_, incoming) = settings(account)?;
    match incoming.mailbox {
        MailboxType::Imap | MailboxType::Pop3 if account.auth_type == AuthType::XOAuth2 => {
            let credentials =
                crate::oauth::bearer_credentials(account, env, crate::http::Role::Receive)?;
            if incoming.mailbox == MailboxType::Imap {
                Ok(Box::new(imap::ImapMailbox::connect_with(
                    account,
                    state,
                    credentials,
                )?))
            } else {
                Ok(Box::new(pop3::Pop3Mailbox::connect_with(
                    account,
                    state,
                    credentials,
                )?))
            }
        }
        MailboxType::Imap => Ok(Box::new(imap::ImapMailbox::connect(account, state)?)),
        MailboxType::Pop3 => Ok(Box::new(pop3::Pop3Mailbox::connect(account, state)?)),
        MailboxType::Maildir => Ok(Box::new(maildir::MaildirMailbox::open(account, state)?)),
        MailboxType::Mbox => Ok(Box::new(mbox::MboxMailbox::open(account, state)?)),
        MailboxType::Office365 => Ok(Box::new(graph::GraphMailbox::open(account, env, state)?)),
        MailboxType::Gmail => Ok(Box::new(gmail::GmailMailbox::open(account, env, state)?)),
    }
}

/// Failures in a row after which a one-by-one download gives up (the server is gone, not
/// one message).
const MAX_FAILURES_IN_A_ROW: usize = 3;

/// What a one-by-one download got for one message.
#[derive(Debug)]
pub(crate) enum Download {
    /// The message, as stored.
    Got(Vec<u8>),
    /// Gone since the listing (or left out on purpose): nothing to hand over.
    Gone,
    /// This one message cannot be read, though the mailbox can: see
    /// [`Mailbox::take_unreadable`].
    Unreadable(Error),
}

/// Downloads messages one by one for mailboxes that have no batched fetch: each message
/// `download` returns goes to `sink`, until it says stop; a message that cannot be read is
/// added to `unreadable` and the others go on. An `Err` from `download` (the server or the
/// directory, not one message) passes that message over and is returned at the end; after a
/// few such failures in a row the download stops.
pub(crate) fn fetch_one_by_one(
    ids: &[String],
    sink: &mut dyn FnMut(Fetched) -> Flow,
    unreadable: &mut Vec<(String, Error)>,
    mut download: impl FnMut(&String) -> Result<Download>,
) -> Result<()> {
    let mut first_error = None;
    let mut in_a_row = 0;
    for id in ids {
        match download(id) {
            Ok(Download::Got(raw)) => {
                in_a_row = 0;
                if sink(Fetched {
                    id: id.clone(),
                    raw,
                }) == Flow::Stop
                {
                    break;
                }
            }
            Ok(Download::Gone) => in_a_row = 0,
            Ok(Download::Unreadable(e)) => {
                in_a_row = 0;
                unreadable.push((id.clone(), e));
            }
            Err(e) => {
                in_a_row += 1;
                first_error.get_or_insert(e);
                if in_a_row >= MAX_FAILURES_IN_A_ROW {
                    break;
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The account's id (as errors name it) and its incoming settings, which it must have.
fn settings(account: &Account) -> Result<(String, &Incoming)> {
    let id = account.id.to_string();
    match account.incoming.as_ref() {
        Some(incoming) => Ok((id, incoming)),
        None => Err(Error::account_key(
            &id,
            "INCOMING_MAILBOX_TYPE",
            "the account has no incoming mailbox",
        )),
    }
}

/// [`settings`] for the mailbox of type `expected`: a mailbox refuses another type's settings.
pub(crate) fn settings_of(account: &Account, expected: MailboxType) -> Result<(String, &Incoming)> {
    let (id, incoming) = settings(account)?;
    if incoming.mailbox != expected {
        return Err(Error::account_key(
            &id,
            "INCOMING_MAILBOX_TYPE",
            format!(
                "is {}, not {}",
                incoming.mailbox.as_str(),
                expected.as_str()
            ),
        ));
    }
    Ok((id, incoming))
}

/// "an IMAP mailbox", "a POP3 mailbox": the subject of the settings errors.
fn a_mailbox(mailbox: MailboxType) -> String {
    let article = match mailbox {
        MailboxType::Imap | MailboxType::Office365 | MailboxType::Mbox => "an",
        _ => "a",
    };
    format!("{article} {} mailbox", mailbox.as_str())
}

/// INCOMING_HOST of a server mailbox (IMAP, POP3): required.
pub(crate) fn server_of<'a>(id: &str, incoming: &'a Incoming) -> Result<&'a str> {
    incoming
        .host
        .as_deref()
        .filter(|h| !h.trim().is_empty())
        .ok_or_else(|| {
            Error::account_key(
                id,
                "INCOMING_HOST",
                format!("{} needs a server name", a_mailbox(incoming.mailbox)),
            )
        })
}

/// INCOMING_HOST and PASSWORD of a server mailbox (IMAP, POP3): both are required.
pub(crate) fn server_and_password<'a>(
    account: &Account,
    id: &str,
    incoming: &'a Incoming,
) -> Result<(&'a str, Secret)> {
    let host = server_of(id, incoming)?;
    let password = account
        .password
        .clone()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            Error::account_key(
                id,
                "PASSWORD",
                format!("{} needs a password", a_mailbox(incoming.mailbox)),
            )
        })?;
    Ok((host, password))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(results: &[Result<Option<&str>>]) -> (Vec<String>, Result<()>) {
        let ids: Vec<String> = (0..results.len()).map(|i| i.to_string()).collect();
        let mut got = Vec::new();
        let outcome = fetch_one_by_one(
            &ids,
            &mut |f| {
                got.push(f.id);
                Flow::Continue
            },
            &mut Vec::new(),
            |id| {
                let i: usize = id.parse().unwrap();
                results[i].clone().map(|o| match o {
                    Some(s) => Download::Got(s.as_bytes().to_vec()),
                    None => Download::Gone,
                })
            },
        );
        (got, outcome)
    }

    #[test]
    fn unreadable_messages_are_reported_one_by_one_and_never_stop_the_download() {
        let ids: Vec<String> = (0..6).map(|i| i.to_string()).collect();
        let mut got = Vec::new();
        let mut unreadable = Vec::new();
        let outcome = fetch_one_by_one(
            &ids,
            &mut |f| {
                got.push(f.id);
                Flow::Continue
            },
            &mut unreadable,
            |id| {
                Ok(if id.as_str() < "4" {
                    Download::Unreadable(Error::message("Permission denied"))
                } else {
                    Download::Got(b"x".to_vec())
                })
            },
        );
        assert!(outcome.is_ok());
        assert_eq!(got, ["4", "5"]);
        let ids: Vec<&str> = unreadable.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["0", "1", "2", "3"]);
    }

    #[test]
    fn one_unreadable_message_does_not_hold_back_the_others() {
        let bad = || Err(Error::message("permission denied"));
        let (got, outcome) = run(&[Ok(Some("a")), bad(), Ok(Some("c")), Ok(None), Ok(Some("e"))]);
        assert_eq!(got, ["0", "2", "4"]);
        assert!(outcome
            .unwrap_err()
            .to_string()
            .contains("permission denied"));
    }

    #[test]
    fn a_server_that_keeps_failing_stops_the_download() {
        let bad = || Err(Error::message("timed out"));
        let (got, outcome) = run(&[Ok(Some("a")), bad(), bad(), bad(), Ok(Some("e"))]);
        assert_eq!(got, ["0"]);
        assert!(outcome.is_err());
    }
}
