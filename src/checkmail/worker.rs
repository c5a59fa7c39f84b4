//! The mailbox threads: a bounded pool, each thread reading one mailbox after another (list,
//! size checks, download, parse), handing every message to PHP's thread and applying the
//! decisions it sends back. They never call the host.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use crate::config::{Account, MailboxType};
use crate::error::{Error, Result};
use crate::incoming::{self, gate, Fetched, Flow, Listed};
use crate::mime::{self, ParsedMail};
use crate::oauth::OAuthEnv;
use crate::state::{Owner, StateStore};

/// Messages in flight between the mailbox threads and PHP's thread: memory stays bounded (a
/// large message also waits for the run's gate, see `incoming::gate`), and the threads seldom
/// wait for each other (with 2, waking each other up cost ~25 ms of CPU in the benchmark's
/// 2,000-message run; 16 is no better than 8).
pub(super) const CHANNEL_CAPACITY: usize = 8;

/// What a mailbox thread tells PHP's thread.
pub(super) enum Event {
    /// The listing: how many messages will be downloaded, how many wait for the next run.
    Listed { mailbox: usize, deferred: usize },
    /// A message over MAX_MESSAGE_BYTES: not downloaded.
    Oversized { mailbox: usize, listed: Listed },
    /// A downloaded message, already parsed (in the mailbox thread, so parsing overlaps the
    /// downloads and PHP's thread only decides and calls the host).
    Message {
        mailbox: usize,
        id: String,
        parsed: Box<ParsedMail>,
        /// For a large message: the run's gate, held until PHP's thread is done with it.
        pass: Option<gate::Pass>,
    },
    /// A listed message that could not be read (the mailbox could): a failed message.
    Unreadable {
        mailbox: usize,
        id: String,
        error: Error,
    },
    /// Something the run must report about this mailbox (it is read all the same).
    Notice { mailbox: usize, text: String },
    /// Every message of this mailbox has been handed over: its decisions can be closed.
    Downloaded { mailbox: usize },
    /// The thread ended; `error` when the mailbox could not be read (completely).
    Finished {
        mailbox: usize,
        error: Option<Error>,
    },
}

/// What PHP's thread decided for one message; applied by its mailbox thread.
#[derive(Debug)]
pub(super) enum Decision {
    /// The host accepted it (or it was already done): PROCESSED_ACTION.
    Processed(String),
    /// Skipped on purpose: left in place, but needs nothing more.
    Skipped(String),
    /// Failed three runs: out of the way.
    Quarantine(String),
}

/// What every mailbox thread of a run reads.
pub(super) struct MailboxShared {
    pub(super) env: OAuthEnv,
    pub(super) state_dir: PathBuf,
    /// One large message in memory at a time (see `incoming::gate`).
    pub(super) large_gate: Arc<gate::Gate>,
    /// The run, which takes each mailbox's lease (`StateStore::take_mailbox`).
    pub(super) owner: Owner,
}

/// The mailboxes of a run, handed out one at a time to the pool's threads.
pub(super) struct MailboxQueue<'a> {
    pub(super) mailboxes: &'a [Account],
    /// Each mailbox's decisions, taken by the thread that reads it.
    pub(super) receivers: Vec<std::sync::Mutex<Option<Receiver<Decision>>>>,
    pub(super) next: std::sync::atomic::AtomicUsize,
}

impl MailboxQueue<'_> {
    /// The next mailbox nobody has taken yet.
    pub(super) fn take(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (i < self.mailboxes.len()).then_some(i)
    }

    /// A pool thread: reads mailboxes until none is left.
    pub(super) fn work(&self, shared: &MailboxShared, events: &SyncSender<Event>) {
        while let Some(i) = self.take() {
            let account = &self.mailboxes[i];
            let rx = self.receivers[i]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let Some(rx) = rx else { continue };
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                read_mailbox(i, account, shared, events, rx)
            }));
            let error = match read {
                Ok(result) => result.err(),
                Err(_) => Some(Error::mailbox(
                    &account.id.to_string(),
                    &account.email,
                    "internal error while reading the mailbox; nothing was changed in it",
                )),
            };
            if events.send(Event::Finished { mailbox: i, error }).is_err() {
                return;
            }
        }
    }
}

/// Starts up to `wanted` threads with `spawn(n)`. When the system refuses a thread, the run
/// goes on with those already started; the first one is tried a few times (a short burst of
/// other threads may be ending). `Err` only when none could be started.
pub(super) fn start_pool(
    wanted: usize,
    mut spawn: impl FnMut(usize) -> std::io::Result<()>,
) -> std::result::Result<usize, std::io::Error> {
    let mut started = 0;
    let mut last = None;
    for n in 0..wanted {
        let tries = if started == 0 { 4 } else { 1 };
        for attempt in 0..tries {
            match spawn(n) {
                Ok(()) => {
                    started += 1;
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    if attempt + 1 < tries {
                        std::thread::sleep(std::time::Duration::from_millis(50 << attempt));
                    }
                }
            }
        }
        if last.is_some() {
            break;
        }
    }
    match (started, last) {
        (0, Some(e)) => Err(e),
        _ => Ok(started),
    }
}

/// One mailbox thread: list, download (handing each message over), then apply the decisions
/// and commit. Never calls the host.
pub(super) fn read_mailbox(
    index: usize,
    account: &Account,
    shared: &MailboxShared,
    events: &SyncSender<Event>,
    decisions: Receiver<Decision>,
) -> Result<()> {
    let MailboxShared {
        env,
        state_dir,
        large_gate,
        owner,
    } = shared;
    let incoming = account
        .incoming
        .as_ref()
        .ok_or_else(|| Error::message("the account has no incoming settings"))?;
    let state = StateStore::open(state_dir, env.state_dsn.as_ref())?;
    // A local mailbox's ledger moves from the configured spelling of its path to the resolved
    // one (once; a no-op read afterwards), so upgrading never hands its mail over again.
    let (legacy, scope) = (legacy_ledger_scope(account), ledger_scope(account));
    if legacy != scope {
        state.move_ledger_scope(&legacy, &scope)?;
    }
    // With STATE_DSN, a mailbox another server is reading right now is left to it (SPEC §8).
    if state.take_mailbox(&scope, owner)?.is_some() {
        return Ok(());
    }
    let mut mailbox = incoming::open(account, env, state)?;
    let listed = mailbox.list();
    // Problems the listing found that keep a message from being read (a POP3 server listing
    // one UIDL twice): reported, while the rest is read.
    for notice in mailbox.take_notices() {
        if events
            .send(Event::Notice {
                mailbox: index,
                text: notice,
            })
            .is_err()
        {
            return Ok(());
        }
    }
    let listed = listed?;
    let mut wanted = Vec::new();
    let mut deferred = 0;
    for item in listed {
        if item.size > incoming.max_message_bytes {
            if events
                .send(Event::Oversized {
                    mailbox: index,
                    listed: item,
                })
                .is_err()
            {
                return Ok(());
            }
        } else if wanted.len() < incoming.max_messages {
            wanted.push(item.id);
        } else {
            deferred += 1;
        }
    }
    if events
        .send(Event::Listed {
            mailbox: index,
            deferred,
        })
        .is_err()
    {
        return Ok(());
    }
    let installed = gate::install(large_gate);
    let download = mailbox.fetch_each(&wanted, &mut |fetched: Fetched| {
        let Fetched { id, raw } = fetched;
        let parsed = Box::new(mime::parse(&raw));
        // The raw bytes go before the hand-off, which waits while PHP's thread is busy: a
        // waiting mailbox thread holds one parsed message, not its source as well.
        drop(raw);
        let message = Event::Message {
            mailbox: index,
            id,
            parsed,
            pass: gate::take_pass(),
        };
        match events.send(message) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    });
    // A pass taken for a message that was not handed over (the download broke off).
    drop(installed);
    for (id, error) in mailbox.take_unreadable() {
        let _ = events.send(Event::Unreadable {
            mailbox: index,
            id,
            error,
        });
    }
    // Whatever was downloaded and decided is applied, even when the download broke off.
    let _ = events.send(Event::Downloaded { mailbox: index });
    let (mut processed, mut skipped, mut quarantine) = (Vec::new(), Vec::new(), Vec::new());
    // The sender side is dropped by PHP's thread once it has processed every event.
    for decision in decisions {
        match decision {
            Decision::Processed(id) => processed.push(id),
            Decision::Skipped(id) => skipped.push(id),
            Decision::Quarantine(id) => quarantine.push(id),
        }
    }
    if !processed.is_empty() {
        mailbox.mark_processed(&processed)?;
    }
    if !skipped.is_empty() {
        mailbox.mark_skipped(&skipped)?;
    }
    if !quarantine.is_empty() {
        mailbox.quarantine(&quarantine)?;
    }
    download?;
    mailbox.finish()
}

/// The ledger's "account": the mailbox itself (type, server, port, login, folder; for MAILDIR
/// and MBOX the resolved path alone), not the account's RECID — so one mailbox read through
/// another account (the INI master when the tenant rows could not be read, a recreated tenant
/// row, the same directory written `../Maildir` in the INI and by its absolute path in a row)
/// never hands its messages to the host a second time.
pub(super) fn ledger_scope(account: &Account) -> String {
    match &account.incoming {
        Some(i) if matches!(i.mailbox, MailboxType::Maildir | MailboxType::Mbox) => {
            format!(
                "mailbox:{}|{}",
                i.mailbox.as_str(),
                crate::routing::mailbox_identity(account).unwrap_or_default()
            )
        }
        _ => legacy_ledger_scope(account),
    }
}

/// The scope earlier versions gave every mailbox: the configured path as written, and the
/// login. A MAILDIR/MBOX ledger kept under it is moved to [`ledger_scope`] when the mailbox
/// is next read (see `read_mailbox`).
pub(super) fn legacy_ledger_scope(account: &Account) -> String {
    match &account.incoming {
        Some(i) => format!(
            "mailbox:{}|{}|{}|{}|{}|{}",
            i.mailbox.as_str(),
            i.host.as_deref().unwrap_or("").to_ascii_lowercase(),
            i.port,
            account.login_name().to_ascii_lowercase(),
            i.folder,
            i.path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
        None => account.id.to_string(),
    }
}
