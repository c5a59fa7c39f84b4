//! The sending side: building a message (`message`), the transports that deliver it (`file`,
//! `sendmail`, `smtp`) behind one [`Transport`] trait, and [`send_batch`] for many messages.
//!
//! A transport is made once per account ([`transport_for`]) and kept for the life of the
//! manager: the SMTP transport keeps its authenticated connections open between `send()`s.

pub mod file;
pub mod gmail;
pub mod graph;
pub mod message;
pub mod sendmail;
pub mod smtp;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::config::{Account, AuthType, Outgoing, TransportType};
use crate::error::{Error, Result};

pub use message::{build, BuiltMessage, MailKind, MessageRequest};

/// What a successful delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Handed to a server (SMTP, sendmail) that accepted it.
    Sent,
    /// Written to a file (FILE transport).
    Written,
}

impl DeliveryStatus {
    /// `sent` or `written`, as `send()` returns it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Written => "written",
        }
    }
}

/// The outcome of one accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub status: DeliveryStatus,
    /// The `.eml` file written (FILE only).
    pub path: Option<PathBuf>,
    /// Where it went: `host:port`, the sendmail path or the FILE directory.
    pub server: String,
    /// The From the message went out with when the transport changed it (OFFICE365 sends as
    /// the signed-in mailbox); `None`: as built.
    pub from: Option<String>,
}

/// What `check()` verified, step by step, for `checkAccount()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// `FILE`, `SENDMAIL`, `SMTP`, ...
    pub transport: &'static str,
    /// `host:port`, the sendmail path or the FILE directory.
    pub server: String,
    /// Human-readable steps that succeeded, in order (no secret in any of them).
    pub steps: Vec<String>,
}

/// One way of delivering built messages for one account. Implementations are shared between
/// threads by [`send_batch`].
pub trait Transport: Send + Sync {
    /// Delivers one message to every envelope recipient, or fails without a partial delivery
    /// that the caller could not know about.
    fn send(&self, msg: &BuiltMessage) -> Result<Delivery>;
    /// Verifies the configuration without sending anything (connect, TLS, AUTH; or the binary;
    /// or the directory).
    fn check(&self) -> Result<CheckReport>;
    /// The transport type and server for logs, e.g. `SMTP mail.example.edu:587 (TLS)`; never
    /// a secret.
    fn describe(&self) -> String;
    /// The transport type it implements (for the `transport` key of `send()`'s result).
    fn kind(&self) -> TransportType;
}

/// The transport for an account's outgoing settings; OFFICE365 and GMAIL keep their tokens in
/// `env` (STATE_DIR, KEY_FILE). An account without outgoing settings is a configuration error.
pub fn transport_for(
    account: &Account,
    env: &crate::oauth::OAuthEnv,
) -> Result<Box<dyn Transport>> {
    let (_, outgoing) = settings(account)?;
    match outgoing.transport {
        TransportType::File => Ok(Box::new(file::FileTransport::new(account))),
        TransportType::Sendmail => Ok(Box::new(sendmail::SendmailTransport::new(account))),
        TransportType::Smtp if account.auth_type == AuthType::XOAuth2 => {
            let credentials =
                crate::oauth::bearer_credentials(account, env, crate::http::Role::Send)?;
            Ok(Box::new(smtp::SmtpTransport::with_credentials(
                account,
                credentials,
            )?))
        }
        TransportType::Smtp => Ok(Box::new(smtp::SmtpTransport::new(account)?)),
        TransportType::Office365 => Ok(Box::new(graph::GraphTransport::new(account, env)?)),
        TransportType::Gmail => Ok(Box::new(gmail::GmailTransport::new(account, env)?)),
    }
}

/// The account's id (as errors name it) and its outgoing settings, which it must have.
pub(crate) fn settings(account: &Account) -> Result<(String, &Outgoing)> {
    let id = account.id.to_string();
    match account.outgoing.as_ref() {
        Some(outgoing) => Ok((id, outgoing)),
        None => Err(Error::account_key(
            &id,
            "OUTGOING_TRANSPORT_TYPE",
            "the account has no outgoing transport",
        )),
    }
}

/// One message of a batch and the index (into `transports`) of the transport that sends it.
#[derive(Debug, Clone, Copy)]
pub struct BatchJob<'a> {
    pub message: &'a BuiltMessage,
    pub transport: usize,
}

/// Default number of messages in flight in [`send_batch`].
pub const DEFAULT_BATCH_PARALLELISM: usize = 4;
/// Upper bound on the batch parallelism (and so on connections per SMTP account).
pub const MAX_BATCH_PARALLELISM: usize = 16;

/// Sends every job with up to `parallelism` messages in flight (clamped to 1..=16). Jobs that
/// share a transport share its connections (an SMTP account opens at most `parallelism`
/// connections). Returns one result per job, in input order; a failing (or even panicking)
/// message never affects the others.
pub fn send_batch(
    jobs: &[BatchJob<'_>],
    transports: &[&dyn Transport],
    parallelism: usize,
) -> Vec<Result<Delivery>> {
    let threads = parallelism.clamp(1, MAX_BATCH_PARALLELISM).min(jobs.len());
    let results: Vec<Mutex<Option<Result<Delivery>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(job) = jobs.get(i) else { break };
        let result = send_one(job, transports);
        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
    };
    if threads <= 1 {
        work();
    } else {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(work);
            }
        });
    }
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(Error::message("the message was not processed")))
        })
        .collect()
}

fn send_one(job: &BatchJob<'_>, transports: &[&dyn Transport]) -> Result<Delivery> {
    let Some(transport) = transports.get(job.transport) else {
        return Err(Error::message(format!(
            "batch job names transport {} but only {} exist",
            job.transport,
            transports.len()
        )));
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| transport.send(job.message)))
        .unwrap_or_else(|_| {
            Err(Error::message(format!(
                "internal error while sending {} via {}",
                job.message.message_id,
                transport.describe()
            )))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    struct Fake {
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
    }

    impl Transport for Fake {
        fn send(&self, msg: &BuiltMessage) -> Result<Delivery> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            match msg.recipients[0].as_str() {
                "panic@x.example" => panic!("boom"),
                "fail@x.example" => Err(Error::transport("master", "fake", Some(550), false, "no")),
                _ => Ok(Delivery {
                    status: DeliveryStatus::Sent,
                    path: None,
                    server: msg.message_id.clone(),
                    from: None,
                }),
            }
        }
        fn check(&self) -> Result<CheckReport> {
            unreachable!()
        }
        fn describe(&self) -> String {
            "FAKE".into()
        }
        fn kind(&self) -> TransportType {
            TransportType::File
        }
    }

    fn msg(i: usize, rcpt: &str) -> BuiltMessage {
        BuiltMessage {
            raw: Vec::new(),
            envelope_from: "a@x.example".into(),
            recipients: vec![rcpt.into()],
            message_id: format!("<{i}@x>"),
            from: "a@x.example".into(),
            subject: String::new(),
        }
    }

    #[test]
    fn results_keep_input_order_and_failures_stay_isolated() {
        let fake = Fake {
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        };
        let messages: Vec<BuiltMessage> = (0..20)
            .map(|i| match i {
                3 => msg(i, "fail@x.example"),
                7 => msg(i, "panic@x.example"),
                _ => msg(i, "ok@x.example"),
            })
            .collect();
        let mut jobs: Vec<BatchJob> = messages
            .iter()
            .map(|m| BatchJob {
                message: m,
                transport: 0,
            })
            .collect();
        jobs[11].transport = 5;
        let results = send_batch(&jobs, &[&fake], 4);
        assert_eq!(results.len(), 20);
        for (i, r) in results.iter().enumerate() {
            match i {
                3 => assert!(matches!(r, Err(Error::Transport(f)) if f.code == Some(550))),
                7 => assert!(r
                    .as_ref()
                    .unwrap_err()
                    .to_string()
                    .contains("internal error")),
                11 => assert!(r.as_ref().unwrap_err().to_string().contains("transport 5")),
                _ => assert_eq!(r.as_ref().unwrap().server, format!("<{i}@x>")),
            }
        }
        let max = fake.max_in_flight.load(Ordering::SeqCst);
        assert!((2..=4).contains(&max), "max in flight {max}");
    }

    #[test]
    fn empty_batch_is_empty() {
        assert!(send_batch(&[], &[], 4).is_empty());
    }
}
