//! The System Check Email event: every Service Desk mailbox into Inquiries and thread entries
//! (SPEC §5, §6, §8).
//!
//! Each mailbox is read in its own thread (listing, size checks, batched download), and every
//! downloaded message is handed over a small bounded channel to the calling thread — PHP's —
//! which alone talks to the host. Per message, in this order:
//! 1. parse (never fails), claim its key (Message-ID, else a hash of the bytes) in the state
//!    store: a message already done, or being processed by another run, is never given to the
//!    host again;
//! 2. decide: our own mail, blocked senders and auto-replies/bounces that name no item are
//!    skipped; an SD number in the subject, or a reference to a Message-ID we sent for an item
//!    (with a valid keyed hash), goes to `addToThread`; anything else (or `false` from it) to
//!    `createInquiry`;
//! 3. record the outcome in the state store, and only then tell the mailbox thread to apply
//!    PROCESSED_ACTION. A host failure leaves the message where it is; the third failed run
//!    quarantines it and alerts SYSADMIN once.
//!
//! The mailbox threads apply the actions in one batch after their download is complete, then
//! commit (`finish`). A crash anywhere leaves either an unclaimed message (retried), a claimed
//! one whose owner is dead (taken over, counted as an attempt), or a done one whose mailbox
//! action is re-applied by the next run — never a second Inquiry from our side.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use regex::Regex;
use serde_json::{json, Value};

use crate::config::{Account, AccountId, MailboxType, SslMode};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::incoming::{self, gate, Fetched, Flow, Listed};
use crate::manager::Manager;
use crate::mime::{self, AutoKind, ParsedMail};
use crate::oauth::OAuthEnv;
use crate::state::{Claim, LedgerOutcome, Owner, Settled, StateStore, MAX_ATTEMPTS};
use crate::threading;

/// Messages in flight between the mailbox threads and PHP's thread: memory stays bounded (a
/// large message also waits for the run's gate, see `incoming::gate`), and the threads seldom
/// wait for each other (with 2, waking each other up cost ~25 ms of CPU in the benchmark's
/// 2,000-message run; 16 is no better than 8).
const CHANNEL_CAPACITY: usize = 8;
/// How often a run checkpoints the state database's WAL (in a helper thread).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// What a mailbox thread tells PHP's thread.
enum Event {
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
enum Decision {
    /// The host accepted it (or it was already done): PROCESSED_ACTION.
    Processed(String),
    /// Skipped on purpose: left in place, but needs nothing more.
    Skipped(String),
    /// Failed three runs: out of the way.
    Quarantine(String),
}

#[derive(Debug, Default)]
struct MailboxSummary {
    account: String,
    email: String,
    protocol: String,
    fetched: u64,
    inquiries: u64,
    threaded: u64,
    skipped: u64,
    skip_reasons: BTreeMap<String, u64>,
    duplicates: u64,
    failed: u64,
    quarantined: u64,
    deferred: u64,
    errors: Vec<String>,
}

impl MailboxSummary {
    fn skip(&mut self, reason: &str) {
        self.skipped += 1;
        *self.skip_reasons.entry(reason.to_string()).or_default() += 1;
    }

    fn to_json(&self) -> Value {
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

fn account_value(id: &str) -> Value {
    id.parse::<i64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(id))
}

/// `host` from the event's Data: a JSON string, an array/object, or a bare host name.
pub fn event_host(data: &Value) -> Result<String> {
    const HOW: &str = "the System Check Email event's Data must name the virtual host that \
                       receives the mail, e.g. {\"host\":\"pcr360.example.edu\"}";
    let object = match data {
        Value::Object(_) => data.clone(),
        Value::String(text) if text.trim_start().starts_with('{') => serde_json::from_str(text)
            .map_err(|e| Error::message(format!("{HOW}; the Data is not valid JSON ({e})")))?,
        Value::String(text) if host_name_of(text).is_some() => json!({ "host": text.trim() }),
        _ => return Err(Error::message(format!("{HOW}; no host was given"))),
    };
    match object.get("host").and_then(Value::as_str) {
        Some(host) => host_name_of(host)
            .ok_or_else(|| Error::message(format!("{HOW}; 'host' is not a host name"))),
        None => Err(Error::message(format!("{HOW}; 'host' is missing"))),
    }
}

/// The host name in `text`: the text itself when it is one, or the host of a URL
/// (`https://pcr360.example.edu/`, with or without port and path), which is how an
/// administrator copies it from the browser.
fn host_name_of(text: &str) -> Option<String> {
    let text = text.trim();
    if is_host_name(text) {
        return Some(text.to_string());
    }
    if !text.contains("://") {
        return None;
    }
    let url = oauth2::url::Url::parse(text).ok()?;
    let host = url.host_str()?;
    is_host_name(host).then(|| host.to_ascii_lowercase())
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// The Blocked Emails list: `*` wildcards on the sender address, or `/regex/flags` on the
/// sender address and the subject (PCRE-style, lookarounds included).
pub struct Blocklist {
    wildcards: Vec<Regex>,
    patterns: Vec<fancy_regex::Regex>,
}

impl Blocklist {
    /// Compiles the host's patterns; a pattern that does not compile is returned as an error
    /// text (and ignored) so one typo does not unblock everything else.
    pub fn new(patterns: &[String]) -> (Blocklist, Vec<String>) {
        let mut list = Blocklist {
            wildcards: Vec::new(),
            patterns: Vec::new(),
        };
        let mut errors = Vec::new();
        for pattern in patterns {
            let p = pattern.trim();
            if p.len() >= 2 && p.starts_with('/') && p.rfind('/').is_some_and(|i| i > 0) {
                let end = p.rfind('/').unwrap_or(0);
                let body = &p[1..end];
                let mut flags = String::new();
                for f in p[end + 1..].chars() {
                    match f {
                        'i' | 'm' | 's' | 'x' => flags.push(f),
                        'u' | 'D' | 'U' => {}
                        _ => {}
                    }
                }
                let source = if flags.is_empty() {
                    body.to_string()
                } else {
                    format!("(?{flags}){body}")
                };
                match fancy_regex::RegexBuilder::new(&source)
                    .backtrack_limit(100_000)
                    .build()
                {
                    Ok(re) => list.patterns.push(re),
                    Err(e) => errors.push(format!(
                        "Blocked Emails pattern {p:?} is not a valid regular expression ({e}); ignored"
                    )),
                }
            } else if !p.is_empty() {
                let source = format!(
                    "(?i)^{}$",
                    p.split('*')
                        .map(regex::escape)
                        .collect::<Vec<_>>()
                        .join(".*")
                );
                match Regex::new(&source) {
                    Ok(re) => list.wildcards.push(re),
                    Err(e) => errors.push(format!("Blocked Emails pattern {p:?}: {e}; ignored")),
                }
            }
        }
        (list, errors)
    }

    /// True when the sender or the subject is blocked.
    pub fn blocks(&self, sender: &str, subject: &str) -> bool {
        self.wildcards.iter().any(|re| re.is_match(sender))
            || self.patterns.iter().any(|re| {
                re.is_match(sender).unwrap_or(false) || re.is_match(subject).unwrap_or(false)
            })
    }
}

/// Everything PHP's thread needs while processing one run.
struct Run<'a> {
    manager: &'a mut Manager,
    host: &'a mut dyn Host,
    vhost: String,
    state: StateStore,
    owner: Owner,
    sd_pattern: Regex,
    thread_key: Option<[u8; 32]>,
    blocklist: Blocklist,
    own_addresses: HashSet<String>,
    attachments_dir: PathBuf,
    /// Messages with attachments so far: message `n` writes its files into the directory
    /// `n` under `attachments_dir`, so no two messages of a run ever share a `path` (a host
    /// that stores `fread($fh, filesize($path))` would otherwise read the first file's size
    /// from PHP's stat cache and store a truncated second one).
    attachment_messages: usize,
    /// Per mailbox, where its decisions go; `None` once its channel is closed.
    decisions: Vec<Option<Sender<Decision>>>,
    /// The last message the host accepted (or that was skipped), not yet recorded: committed
    /// together with the next claim when another message is already waiting, else at once.
    pending: Option<Pending>,
}

/// A settled message waiting for its commit, and the mailbox decision that must follow it.
struct Pending {
    mailbox: usize,
    settled: Settled,
    decision: Decision,
}

pub fn event_check_mail(manager: &mut Manager, host: &mut dyn Host, data: &Value) -> Result<Value> {
    let started = Instant::now();
    let vhost = event_host(data)?;
    let settings = manager.settings.clone();
    // What the INI file itself warns of (a quoted "false" that reads as true, ...) shows on
    // the Events screen too.
    let base = json!({
        "host": vhost,
        "environment": settings.environment,
        "errors": [],
        "warnings": settings.warnings,
    });
    if settings.disable_email {
        return Ok(finish_summary(base, "disabled", &[], started));
    }
    if !settings.send_email {
        return Ok(finish_summary(base, "send_email_off", &[], started));
    }
    let tenant_accounts = manager.tenant_accounts(host);
    // Rows that could not be used show on the Events screen, not only in the Error Log.
    let mut base = base;
    base["errors"] = json!(manager.row_errors);
    let failed_accounts = std::mem::take(&mut manager.failed_accounts);
    let (mut readers, duplicates) = crate::routing::incoming_readers_checked(
        &tenant_accounts,
        &failed_accounts,
        settings.master.as_ref(),
        settings.send_email,
        settings.disable_email,
    );
    // A broken INI master that would receive: its mailbox is read by nobody, and the run
    // reports its error in its place (the tenants' mailboxes are read as usual).
    if let Some(master) = settings.master_failed.as_ref().filter(|m| m.receives) {
        readers.push(crate::routing::Reader::Failed(master));
    }
    let mut mailboxes: Vec<Account> = Vec::new();
    // Service Desk rows that are broken: their mailbox is read by nobody (never through
    // another account's login); each is a mailbox entry with its error.
    let mut broken: Vec<MailboxSummary> = Vec::new();
    for reader in readers {
        match reader {
            crate::routing::Reader::Read(account) => mailboxes.push(account.clone()),
            crate::routing::Reader::Failed(f) => broken.push(MailboxSummary {
                account: f.id.to_string(),
                email: f.email.clone(),
                protocol: f
                    .mailbox
                    .as_ref()
                    .map(|(i, _)| i.mailbox.as_str().to_string())
                    .unwrap_or_default(),
                errors: vec![f.error.to_string()],
                ..Default::default()
            }),
        }
    }
    // One mailbox configured twice (the INI master and a tenant row naming the same Maildir by
    // another spelling, the same IMAP login twice) is read once; the summary says so.
    let mut warnings: Vec<Value> = settings.warnings.iter().map(|w| json!(w)).collect();
    for (left_out, reader) in duplicates {
        let text = format!(
            "account {} ({}) is configured with the same mailbox as account {} ({}): the mailbox \
             is read once, as account {}",
            left_out.id, left_out.email, reader.id, reader.email, reader.id
        );
        manager.logger().once(
            host,
            &format!("duplicate-mailbox:{}:{}", left_out.id, reader.id),
            &format!("pcr_email: {text}"),
            &json!({"account": left_out.id.to_string()}),
        );
        warnings.push(Value::from(text));
    }
    base["warnings"] = Value::Array(warnings);
    manager.failed_accounts = failed_accounts;
    if mailboxes.is_empty() {
        let status = if manager.row_errors.is_empty() && broken.is_empty() {
            "ok"
        } else {
            "errors"
        };
        return Ok(finish_summary(base, status, &broken, started));
    }

    // The TLS connectors are built (CA_FILE, the system roots) while the state store opens and
    // the mailbox threads connect.
    let mut tls_seen = Vec::new();
    for account in &mailboxes {
        let tls_mailbox = account.incoming.as_ref().is_some_and(|i| {
            matches!(i.mailbox, MailboxType::Imap | MailboxType::Pop3) && i.ssl != SslMode::None
        });
        if tls_mailbox && !tls_seen.contains(&&account.tls) {
            tls_seen.push(&account.tls);
            crate::net::prewarm_tls_connector(&account.tls);
        }
    }
    let state = match StateStore::open(&settings.state_dir) {
        Ok(state) => state,
        Err(e) => {
            // E.g. a state directory another user created: the Error Log says why no
            // mailbox was read, not only the event's exception.
            manager.logger().error(
                host,
                &format!("pcr_email: no mailbox was read: {e}"),
                &Value::Null,
            );
            return Err(e);
        }
    };
    let sd_pattern = Regex::new(&settings.sd_number_pattern).map_err(|e| {
        Error::account_key("master", "SD_NUMBER_PATTERN", format!("not a regex: {e}"))
    })?;
    let thread_key = match manager.thread_key() {
        Ok(k) => Some(k),
        Err(e) => {
            manager.logger().error(
                host,
                &format!("pcr_email: replies cannot be matched by Message-ID: {e}"),
                &Value::Null,
            );
            None
        }
    };
    let blocked = match host.blocked_emails() {
        Ok(list) => list,
        Err(e) => {
            manager.logger().error(
                host,
                &format!("pcr_email: cannot read the Blocked Emails list: {e}"),
                &Value::Null,
            );
            Vec::new()
        }
    };
    let (blocklist, pattern_errors) = Blocklist::new(&blocked);
    for e in pattern_errors {
        manager.logger().once(host, &e.clone(), &e, &Value::Null);
    }
    // Our sending addresses only: SYSADMIN is a person, whose requests are ordinary mail.
    let own_addresses: HashSet<String> = tenant_accounts
        .iter()
        .chain(settings.master.as_ref())
        .map(|a| a.email.trim().to_ascii_lowercase())
        .chain(
            settings
                .master_failed
                .iter()
                .map(|m| m.email.to_ascii_lowercase()),
        )
        .filter(|e| !e.is_empty())
        .collect();
    let owner = Owner::new_run();
    let attachments_root = settings.state_dir.join("attachments");
    remove_dead_runs_attachments(&attachments_root, &owner);
    let attachments_dir = attachments_root.join(format!(
        "run-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));

    let mut summaries: Vec<MailboxSummary> = mailboxes
        .iter()
        .map(|a| MailboxSummary {
            account: a.id.to_string(),
            email: a.email.clone(),
            protocol: a
                .incoming
                .as_ref()
                .map(|i| i.mailbox.as_str().to_string())
                .unwrap_or_default(),
            ..Default::default()
        })
        .collect();

    let env = manager.oauth_env();
    let mut run = Run {
        manager,
        host,
        vhost: vhost.clone(),
        state,
        owner,
        sd_pattern,
        thread_key,
        blocklist,
        own_addresses,
        attachments_dir,
        attachment_messages: 0,
        decisions: Vec::new(),
        pending: None,
    };

    let shared = MailboxShared {
        env: env.clone(),
        state_dir: settings.state_dir.clone(),
        sd_pattern: run.sd_pattern.clone(),
        large_gate: gate::Gate::new(),
        owner: run.owner.clone(),
    };
    // A bounded pool reads the mailboxes, each thread taking the next one not yet taken:
    // any number of mailboxes, a bounded number of threads.
    let mut decisions: Vec<Sender<Decision>> = Vec::new();
    let mut receivers = Vec::new();
    for _ in &mailboxes {
        let (tx, rx) = channel::<Decision>();
        decisions.push(tx);
        receivers.push(std::sync::Mutex::new(Some(rx)));
    }
    let queue = MailboxQueue {
        mailboxes: &mailboxes,
        receivers,
        next: std::sync::atomic::AtomicUsize::new(0),
    };
    let mut unstarted = Vec::new();
    std::thread::scope(|scope| {
        let (events_tx, events_rx) = sync_channel::<Event>(CHANNEL_CAPACITY);
        let wanted = settings.mailbox_threads.clamp(1, mailboxes.len());
        let started = start_pool(wanted, |n| {
            let events = events_tx.clone();
            let (queue, shared) = (&queue, &shared);
            std::thread::Builder::new()
                .name(format!("pcr-email-mailbox-{n}"))
                .spawn_scoped(scope, move || queue.work(shared, &events))
                .map(drop)
        });
        if let Err(e) = started {
            // Not even one thread: every mailbox waits for the next run, and the summary
            // says why.
            while let Some(i) = queue.take() {
                unstarted.push((i, e.to_string()));
            }
        }
        drop(events_tx);
        // The claims of this run stay ours while a slow host works (a claim whose lease ran
        // out could be taken over by the next run, which would call the host again).
        // The same thread checkpoints the WAL, so PHP's thread, which commits once per
        // message, never waits for a checkpoint's fsyncs.
        let (stop_renewing, renew_rx) = channel::<()>();
        let renew_every = run.state.lease() / 3;
        let (owner, state_dir) = (run.owner.clone(), &settings.state_dir);
        // Automatic checkpoints stop only once the helper's connection is open. (The run's
        // own connection is closed at its end: nothing to restore.)
        let helper_store = StateStore::open(state_dir);
        let checkpoints = helper_store.is_ok() && run.state.set_autocheckpoint(0).is_ok();
        let helper = std::thread::Builder::new()
            .name("pcr-email-leases".into())
            .spawn_scoped(scope, move || {
                let Ok(store) = helper_store else {
                    return;
                };
                let tick = if checkpoints {
                    CHECKPOINT_EVERY.min(renew_every)
                } else {
                    renew_every
                };
                let mut renewed = Instant::now();
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    renew_rx.recv_timeout(tick)
                {
                    if renewed.elapsed() >= renew_every {
                        let _ = store.renew_lease(&owner);
                        renewed = Instant::now();
                    }
                    if checkpoints {
                        let _ = store.checkpoint();
                    }
                }
            });
        if helper.is_err() {
            // No lease renewal: a claim can only be taken over by another run once its lease
            // ran out (minutes); and the WAL is checkpointed by the commits themselves again.
            let _ = run.state.set_autocheckpoint(1000);
        }
        run.process_events(&mailboxes, &mut summaries, events_rx, decisions);
        drop(stop_renewing);
    });

    for (i, why) in unstarted {
        let account = &mailboxes[i];
        let error = Error::mailbox(
            &account.id.to_string(),
            &account.email,
            format!("no thread could be started to read the mailbox ({why}); it is read by the next run"),
        );
        run.mailbox_failed(account, &mut summaries[i], error);
    }
    let _ = run.state.release_owned(&run.owner);
    let _ = std::fs::remove_dir_all(&run.attachments_dir);
    crate::alloc::release_cached();
    summaries.extend(broken);
    // "errors": some mailbox or account could not be read completely (see each entry).
    let failed = summaries.iter().any(|m| !m.errors.is_empty())
        || base["errors"].as_array().is_some_and(|e| !e.is_empty());
    let status = if failed { "errors" } else { "ok" };
    Ok(finish_summary(base, status, &summaries, started))
}

fn finish_summary(
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

/// What every mailbox thread of a run reads.
struct MailboxShared {
    env: OAuthEnv,
    state_dir: PathBuf,
    sd_pattern: Regex,
    /// One large message in memory at a time (see `incoming::gate`).
    large_gate: Arc<gate::Gate>,
    /// The run, which takes each mailbox's lease (`StateStore::take_mailbox`).
    owner: Owner,
}

/// The mailboxes of a run, handed out one at a time to the pool's threads.
struct MailboxQueue<'a> {
    mailboxes: &'a [Account],
    /// Each mailbox's decisions, taken by the thread that reads it.
    receivers: Vec<std::sync::Mutex<Option<Receiver<Decision>>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl MailboxQueue<'_> {
    /// The next mailbox nobody has taken yet.
    fn take(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (i < self.mailboxes.len()).then_some(i)
    }

    /// A pool thread: reads mailboxes until none is left.
    fn work(&self, shared: &MailboxShared, events: &SyncSender<Event>) {
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
fn start_pool(
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
fn read_mailbox(
    index: usize,
    account: &Account,
    shared: &MailboxShared,
    events: &SyncSender<Event>,
    decisions: Receiver<Decision>,
) -> Result<()> {
    let MailboxShared {
        env,
        state_dir,
        sd_pattern,
        large_gate,
        owner,
    } = shared;
    let incoming = account
        .incoming
        .as_ref()
        .ok_or_else(|| Error::message("the account has no incoming settings"))?;
    let state = StateStore::open(state_dir)?;
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
        let parsed = Box::new(mime::parse(&raw, sd_pattern));
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

/// How one message ended for the summary.
enum Outcome {
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
    fn process_events(
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

    /// A message over MAX_MESSAGE_BYTES: not downloaded, and not recorded as done either, so it
    /// is counted in every run's summary while it waits and becomes an ordinary message once the
    /// limit allows it. Logged and alerted once (per mailbox and message).
    fn oversized(&mut self, account: &Account, scope: &str, listed: &Listed) {
        let id = account.id.to_string();
        let once = format!("oversized:{scope}:{}", listed.id);
        match self.state.alert_once(&format!("log:{once}")) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.log(&format!("pcr_email: {e}"), json!({"account": id}));
                return;
            }
        }
        let limit = account
            .incoming
            .as_ref()
            .map(|i| i.max_message_bytes)
            .unwrap_or(0);
        let text = format!(
            "pcr_email: a message of {} bytes in the mailbox of account {id} ({}) is larger than \
             MAX_MESSAGE_BYTES ({limit}); it is not downloaded and stays in the mailbox, counted \
             as skipped (oversized) in every run until MAX_MESSAGE_BYTES allows it",
            listed.size, account.email
        );
        self.log(
            &text,
            json!({"account": id, "message": listed.id, "size": listed.size}),
        );
        self.alert(
            account,
            &once,
            "An incoming email is too large to process",
            &text,
        );
    }

    /// A message that could not be read: a failure of that message like a host failure
    /// (logged, retried by the next runs, quarantined after the third), keyed by its place in
    /// the mailbox since its Message-ID is unknown.
    fn unreadable(
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
        match self.state.fail(scope, &key, &error.to_string()) {
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
    fn process(
        &mut self,
        account: &Account,
        scope: &str,
        mailbox_ref: &str,
        mut parsed: ParsedMail,
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
        let verdict = self.deliver(account, &mut parsed, attempt);
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
                match self.state.fail(scope, &key, &error.to_string()) {
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
    fn next_event(&mut self, events: &Receiver<Event>) -> Option<Event> {
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

    fn flush_pending(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.commit_pending(pending);
        }
    }

    /// Records a settled message on its own, then lets its mailbox act on it. The host has it
    /// either way: when the record fails, the mailbox still acts (no second Inquiry).
    fn commit_pending(&mut self, pending: Pending) {
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

    fn send_decision(&self, mailbox: usize, decision: Decision) {
        if let Some(channel) = &self.decisions[mailbox] {
            // A mailbox thread that stopped early no longer listens: nothing to do.
            let _ = channel.send(decision);
        }
    }

    /// Quarantines the message `what` describes (see [`describe`]).
    fn quarantine(
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

    /// The decision of SPEC §6 and the host call.
    /// Hands the message's text and HTML over to `$mail` (not copied: only the headers,
    /// subject and sender are used afterwards, for logging).
    fn deliver(
        &mut self,
        account: &Account,
        parsed: &mut ParsedMail,
        attempt: u32,
    ) -> Result<Delivered> {
        let from = parsed
            .from
            .as_ref()
            .map(|f| f.email.trim().to_ascii_lowercase())
            .unwrap_or_default();
        if !from.is_empty() && self.own_addresses.contains(&from) {
            return Ok(Delivered::Skipped("own mail"));
        }
        if self.blocklist.blocks(&from, &parsed.subject) {
            return Ok(Delivered::Skipped("blocked"));
        }
        let item = parsed.sd_number.clone().or_else(|| {
            let key = self.thread_key?;
            let ids = parsed
                .in_reply_to
                .iter()
                .chain(parsed.references.iter())
                .map(String::as_str);
            threading::verify_any(ids, &key)
        });
        let mail = self.mail_array(account, parsed, item.as_deref(), attempt)?;
        let result = (|| {
            if let Some(sd) = &item {
                if self.host.add_to_thread(sd, &mail)? {
                    return Ok(Delivered::Thread(sd.clone()));
                }
            }
            match parsed.auto {
                Some(AutoKind::AutoReply) => return Ok(Delivered::Skipped("auto-reply")),
                Some(AutoKind::Bounce) => return Ok(Delivered::Skipped("bounce")),
                None => {}
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
        self.remove_attachments(&mail);
        result
    }

    /// `$mail` (SPEC §5): the parsed message plus the account, the host and the attachment
    /// files.
    fn mail_array(
        &mut self,
        account: &Account,
        parsed: &mut ParsedMail,
        item: Option<&str>,
        attempt: u32,
    ) -> Result<Value> {
        // The bodies are most of the bytes: moved into `$mail`, not serialised as copies.
        let text = std::mem::take(&mut parsed.text);
        let html = parsed.html.take();
        let mut mail = serde_json::to_value(&*parsed)
            .map_err(|e| Error::message(format!("cannot represent the message: {e}")))?;
        mail["text"] = Value::String(text);
        mail["html"] = html.map_or(Value::Null, Value::String);
        mail["account"] = json!({
            "RECID": match account.id {
                AccountId::Master => Value::from("master"),
                AccountId::Tenant(id) => Value::from(id),
            },
            "EMAIL": account.email,
            "TENANTS_RECID": account.tenants_recid,
        });
        mail["host"] = Value::from(self.vhost.clone());
        mail["sd_number"] = item.map(Value::from).unwrap_or(Value::Null);
        mail["attempt"] = Value::from(attempt);
        if !parsed.attachments.is_empty() {
            if self.attachment_messages == 0 {
                write_run_owner(&self.attachments_dir, &self.owner)?;
            }
            self.attachment_messages += 1;
            let dir = self
                .attachments_dir
                .join(self.attachment_messages.to_string());
            let list = mail["attachments"]
                .as_array_mut()
                .expect("attachments is a list");
            let mut written: Vec<PathBuf> = Vec::new();
            if let Err(e) = write_attachments(&dir, list, &parsed.attachments, &mut written) {
                for done in &written {
                    let _ = std::fs::remove_file(done);
                }
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        }
        Ok(mail)
    }

    /// Removes a message's attachment files and their directory once the host has returned.
    fn remove_attachments(&self, mail: &Value) {
        let mut dir = None;
        if let Some(list) = mail["attachments"].as_array() {
            for entry in list {
                if let Some(path) = entry["path"].as_str() {
                    let _ = std::fs::remove_file(path);
                    dir = Path::new(path).parent().map(Path::to_path_buf);
                }
            }
        }
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir(dir);
        }
    }

    fn mailbox_failed(&mut self, account: &Account, summary: &mut MailboxSummary, error: Error) {
        let id = account.id.to_string();
        let text = format!(
            "pcr_email: mailbox of account {id} ({}): {error}",
            account.email
        );
        summary.errors.push(error.to_string());
        self.log(&text, json!({"account": id}));
        if matches!(error, Error::Auth { .. }) {
            self.alert(
                account,
                &auth_alert_key(account),
                "An email account cannot sign in",
                &text,
            );
        }
    }

    fn log(&mut self, text: &str, context: Value) {
        self.manager.logger().error(self.host, text, &context);
    }

    /// Emails SYSADMIN (the account's, else the INI's) once per `key` across runs and
    /// processes, through the ordinary routing of that account's tenant.
    fn alert(&mut self, account: &Account, key: &str, subject: &str, text: &str) {
        let Some(to) = account
            .sysadmin
            .clone()
            .or_else(|| self.manager.settings.sysadmin.clone())
            .filter(|s| !s.trim().is_empty())
        else {
            return;
        };
        match self.state.alert_once(key) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.log(&format!("pcr_email: {e}"), Value::Null);
                return;
            }
        }
        let message = json!({
            "to": to,
            "subject": format!("[PCR-360] {subject}"),
            "text": format!(
                "{text}\n\nHost: {}\nEnvironment: {}\n\nThis alert is sent once per problem.",
                self.vhost, self.manager.settings.environment
            ),
            "tenant": account.tenants_recid,
            "headers": {"Auto-Submitted": "auto-generated"},
        });
        if let Err(e) = self.manager.send(self.host, &message) {
            // Not marked as told: the next run tries again.
            let _ = self.state.clear_alert(key);
            let line = format!("pcr_email: the SYSADMIN alert to {to} could not be sent: {e}");
            self.manager.logger().to_file("error", &line, &Value::Null);
        }
    }
}

/// What the host did with a message.
enum Delivered {
    Inquiry(String),
    Thread(String),
    Skipped(&'static str),
}

/// The ledger's "account": the mailbox itself (type, server, port, login, folder; for MAILDIR
/// and MBOX the resolved path alone), not the account's RECID — so one mailbox read through
/// another account (the INI master when the tenant rows could not be read, a recreated tenant
/// row, the same directory written `../Maildir` in the INI and by its absolute path in a row)
/// never hands its messages to the host a second time.
fn ledger_scope(account: &Account) -> String {
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
fn legacy_ledger_scope(account: &Account) -> String {
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

/// The alert-once key of an account's login failure; cleared by its next successful read.
fn auth_alert_key(account: &Account) -> String {
    format!("auth:{}", account.id)
}

/// "incoming email "subject" from a@b (Message-ID x)", for log lines and alerts.
fn describe(parsed: &ParsedMail) -> String {
    format!(
        "incoming email {:?} from {} (Message-ID {})",
        parsed.subject,
        sender(parsed),
        parsed.message_id.as_deref().unwrap_or("none"),
    )
}

fn sender(parsed: &ParsedMail) -> String {
    parsed
        .from
        .as_ref()
        .map(|f| f.email.clone())
        .unwrap_or_else(|| "an unknown sender".into())
}

/// Writes a message's attachments into `dir` (created here; the names are unique within a
/// message) and sets each one's `path`; `written` lists the files written so far (the caller
/// removes them when this fails halfway).
fn write_attachments(
    dir: &Path,
    list: &mut [Value],
    attachments: &[crate::mime::Attachment],
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    create_private_dir(dir)?;
    for (entry, attachment) in list.iter_mut().zip(attachments) {
        let path = dir.join(&attachment.filename);
        crate::perms::write_file(&path, &attachment.data, crate::perms::FILE_MODE).map_err(
            |e| {
                Error::message(format!(
                    "cannot write attachment {} to {}: {e}",
                    attachment.filename,
                    dir.display()
                ))
            },
        )?;
        entry["path"] = Value::from(path.display().to_string());
        written.push(path);
    }
    Ok(())
}

/// The file in a run's attachment directory naming its owner (see [`remove_dead_runs_attachments`]).
const RUN_OWNER_FILE: &str = "owner";

/// Creates the run's attachment directory with the file naming its owner.
fn write_run_owner(dir: &Path, owner: &Owner) -> Result<()> {
    create_private_dir(dir)?;
    let text = [
        owner.run_id().to_string(),
        owner.host().to_string(),
        owner.machine_id().to_string(),
        owner.boot_id().to_string(),
        owner.pid_ns().to_string(),
        owner.pid().to_string(),
        owner.start_ticks().to_string(),
    ]
    .join("\n");
    crate::perms::write_file(
        &dir.join(RUN_OWNER_FILE),
        text.as_bytes(),
        crate::perms::FILE_MODE,
    )
    .map_err(|e| Error::message(format!("cannot write into {}: {e}", dir.display())))
}

/// Removes the attachment files of runs that died during a host call (kill -9): nobody else
/// would. Runs still alive, of another machine, or of unknown owner are left alone.
fn remove_dead_runs_attachments(root: &Path, me: &Owner) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(text) = std::fs::read_to_string(dir.join(RUN_OWNER_FILE)) else {
            continue;
        };
        let f: Vec<&str> = text.lines().collect();
        let (Some(pid), Some(ticks)) = (
            f.get(5).and_then(|v| v.parse().ok()),
            f.get(6).and_then(|v| v.parse().ok()),
        ) else {
            continue;
        };
        let other = Owner::from_parts(f[0], f[1], f[2], f[3], f[4], pid, ticks);
        if me.sees_dead(&other) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Creates an attachment directory: its parent's group, group read/write and setgid (so a run
/// as the web server's user can remove what a dead run as root left, and the other way round),
/// nothing for others.
fn create_private_dir(dir: &Path) -> Result<()> {
    crate::perms::create_dir_all(dir, crate::perms::DIR_MODE)
        .map_err(|e| Error::message(format!("cannot create {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_host_comes_from_every_documented_form() {
        assert_eq!(
            event_host(&json!({"host": "pcr360.example.edu"})).unwrap(),
            "pcr360.example.edu"
        );
        assert_eq!(
            event_host(&json!("{\"host\":\"pcr360.example.edu\"}")).unwrap(),
            "pcr360.example.edu"
        );
        assert_eq!(
            event_host(&json!("pcr360.example.edu")).unwrap(),
            "pcr360.example.edu"
        );
        // Copied from the browser's address bar: the URL's host name.
        for url in [
            "https://pcr360.example.edu/",
            "https://pcr360.example.edu",
            " http://PCR360.example.edu:8443/pcr360/index.php?x=1 ",
        ] {
            assert_eq!(
                event_host(&json!({ "host": url })).unwrap(),
                "pcr360.example.edu"
            );
            assert_eq!(event_host(&json!(url)).unwrap(), "pcr360.example.edu");
        }
        for bad in [
            json!(null),
            json!({}),
            json!("{not json"),
            json!({"host": "a b"}),
            json!({"host": "https://"}),
            json!({"host": "file:///etc/passwd"}),
            json!(5),
        ] {
            let err = event_host(&bad).unwrap_err().to_string();
            assert!(err.contains("host"), "{bad}: {err}");
        }
    }

    /// Records what the event asked of the application.
    #[derive(Default)]
    struct RecordingHost {
        calls: Vec<String>,
        rows: Vec<Value>,
        /// Removes each attachment's directory after reading the file (a cleanup job).
        remove_attachment_dirs: bool,
    }

    impl Host for RecordingHost {
        fn email_accounts(&mut self) -> Result<Value> {
            Ok(Value::Array(self.rows.clone()))
        }
        fn blocked_emails(&mut self) -> Result<Vec<String>> {
            Ok(Vec::new())
        }
        fn create_inquiry(&mut self, mail: &Value) -> Result<String> {
            self.calls
                .push(format!("createInquiry {}", mail["message_id"]));
            for a in mail["attachments"].as_array().into_iter().flatten() {
                let path = Path::new(a["path"].as_str().unwrap());
                let bytes = std::fs::read(path).unwrap();
                self.calls.push(format!("attachment {}", bytes.len()));
                if self.remove_attachment_dirs {
                    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
                }
            }
            Ok("IQ00001".into())
        }
        fn add_to_thread(&mut self, sd_number: &str, _mail: &Value) -> Result<bool> {
            self.calls.push(format!("addToThread {sd_number}"));
            Ok(false)
        }
        fn deliver_message(&mut self, _message: &Value) -> Result<()> {
            Ok(())
        }
        fn log_error(&mut self, _message: &str, _context: &Value) {}
    }

    /// A master account reading a Maildir (PROCESSED_ACTION delete) in a temporary directory,
    /// with `extra` INI lines: (directory, Maildir, INI file, state directory).
    fn maildir_master(extra: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("Maildir");
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        let state = dir.path().join("state");
        std::fs::create_dir_all(dir.path().join("configs")).unwrap();
        let ini = dir.path().join("configs").join("pcr360.ini");
        std::fs::write(
            &ini,
            format!(
                "[prod]\nemail.EMAIL = \"desk@example.edu\"\n\
                 email.INCOMING_MAILBOX_TYPE = \"MAILDIR\"\nemail.INCOMING_PATH = \"{}\"\n\
                 email.PROCESSED_ACTION = \"delete\"\nemail.STATE_DIR = \"{}\"\n{extra}",
                maildir.display(),
                state.display()
            ),
        )
        .unwrap();
        (dir, maildir, ini, state)
    }

    fn run_event(ini: &Path, host: &mut RecordingHost) -> Value {
        let mut manager = Manager::open(ini, "prod").unwrap();
        event_check_mail(&mut manager, host, &json!({"host": "pcr360.example.edu"})).unwrap()
    }

    #[test]
    fn an_attachment_directory_removed_by_someone_else_is_made_again() {
        let (_dir, maildir, ini, _state) = maildir_master("");
        for n in 1..=2 {
            let raw = format!(
                "From: a@example.org\r\nTo: desk@example.edu\r\nSubject: file {n}\r\n\
                 Message-ID: <att{n}@example.org>\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\
                 Content-Type: text/plain\r\n\r\nSee the file.\r\n--b\r\n\
                 Content-Type: application/octet-stream; name=\"f.bin\"\r\n\
                 Content-Disposition: attachment; filename=\"f.bin\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--b--\r\n"
            );
            let file = maildir.join("new").join(format!("170000000{n}.M1P1.test"));
            std::fs::write(file, raw).unwrap();
        }
        let mut host = RecordingHost {
            remove_attachment_dirs: true,
            ..Default::default()
        };
        let summary = run_event(&ini, &mut host);
        assert_eq!(summary["totals"]["inquiries"], 2, "{summary}");
        assert_eq!(summary["totals"]["failed"], 0, "{summary}");
        assert_eq!(
            host.calls.iter().filter(|c| *c == "attachment 4").count(),
            2,
            "{:?}",
            host.calls
        );
    }

    #[test]
    fn a_message_skipped_by_a_run_that_died_never_gets_the_processed_action() {
        let (_dir, maildir, ini, state_dir) = maildir_master("");
        let file = maildir.join("new").join("1700000000.M1P1.test");
        std::fs::write(
            &file,
            "From: someone@example.org\r\nTo: desk@example.edu\r\nSubject: Out of office\r\n\
             Auto-Submitted: auto-replied\r\nMessage-ID: <ooo@example.org>\r\n\r\nAway.\r\n",
        )
        .unwrap();
        // What a run leaves when it dies after recording the skip, before its mailbox actions.
        let state = StateStore::open(&state_dir).unwrap();
        let dead = Owner::new_run();
        let key = "ooo@example.org";
        let master = crate::config::Settings::load(&ini, "prod")
            .unwrap()
            .master
            .unwrap();
        let scope = ledger_scope(&master);
        assert_eq!(
            state
                .claim(&scope, key, Some("1700000000.M1P1.test"), &dead)
                .unwrap(),
            Claim::New
        );
        state.skip(&scope, key, "auto-reply").unwrap();
        drop(state);

        let mut host = RecordingHost::default();
        let summary = run_event(&ini, &mut host);
        assert_eq!(summary["totals"]["duplicates"], 1, "{summary}");
        assert_eq!(summary["totals"]["errors"], 0, "{summary}");
        assert!(host.calls.is_empty(), "{:?}", host.calls);
        assert!(
            file.exists(),
            "the skipped message never reached the host: it must not be deleted"
        );
    }

    #[test]
    fn one_mailbox_read_through_another_account_never_reaches_the_host_twice() {
        let (_dir, maildir, ini, _) = maildir_master("email.PROCESSED_ACTION = \"seen\"\n");
        std::fs::write(
            maildir.join("new").join("1.M1P1.a"),
            "From: user@example.org\r\nSubject: Help\r\nMessage-ID: <help@example.org>\r\n\r\nHi\r\n",
        )
        .unwrap();
        // Run 1: the tenant's Service Desk account reads the Maildir (the master is left out
        // as the same mailbox).
        let mut host = RecordingHost {
            rows: vec![json!({
                "RECID": 7, "TENANTS_RECID": 1, "ACCOUNT_TYPE": "service_desk",
                "EMAIL": "desk@example.edu", "INCOMING_MAILBOX_TYPE": "MAILDIR",
                "INCOMING_PATH": maildir.display().to_string(), "PROCESSED_ACTION": "seen",
            })],
            ..Default::default()
        };
        let first = run_event(&ini, &mut host);
        assert_eq!(first["mailboxes"][0]["account"], 7, "{first}");
        assert_eq!(host.calls.len(), 1, "{:?}", host.calls);
        // Run 2: the tenant rows are gone (host trouble, a recreated row): the master reads
        // the same Maildir, where the message still is (seen).
        let mut host = RecordingHost::default();
        let second = run_event(&ini, &mut host);
        assert_eq!(second["mailboxes"][0]["account"], "master", "{second}");
        assert_eq!(second["totals"]["fetched"], 1, "{second}");
        assert_eq!(second["totals"]["duplicates"], 1, "{second}");
        assert!(host.calls.is_empty(), "{:?}", host.calls);
    }

    #[test]
    fn mail_from_sysadmin_is_a_request_and_mail_from_our_accounts_is_not() {
        let (_dir, maildir, ini, _) = maildir_master("email.SYSADMIN = \"admin@example.edu\"\n");
        for (name, from) in [
            ("1.M1P1.a", "Admin <ADMIN@example.edu>"),
            ("2.M1P1.b", "desk@example.edu"),
        ] {
            std::fs::write(
                maildir.join("new").join(name),
                format!("From: {from}\r\nSubject: {name}\r\nMessage-ID: <{name}@x>\r\n\r\nHi\r\n"),
            )
            .unwrap();
        }
        let mut host = RecordingHost::default();
        let summary = run_event(&ini, &mut host);
        assert_eq!(host.calls, ["createInquiry \"1.M1P1.a@x\""], "{summary}");
        assert_eq!(
            summary["mailboxes"][0]["skip_reasons"]["own mail"], 1,
            "{summary}"
        );
    }

    #[test]
    fn a_successful_read_ends_the_login_failure_alert() {
        let (_dir, _maildir, ini, state_dir) = maildir_master("");
        let state = StateStore::open(&state_dir).unwrap();
        assert!(state.alert_once("auth:master").unwrap());
        assert!(!state.alert_once("auth:master").unwrap(), "alerted once");
        run_event(&ini, &mut RecordingHost::default());
        assert!(
            state.alert_once("auth:master").unwrap(),
            "after a good read, the next login failure is alerted again"
        );
    }

    #[test]
    fn only_the_attachment_directories_of_dead_runs_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let me = Owner::new_run();
        let pid = std::process::id();
        let live = me.sibling(
            "live-run",
            pid,
            crate::state::process_start_ticks(pid).unwrap(),
        );
        // A pid that no longer exists (or was recycled: another start time).
        let gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        let mut gone = gone;
        gone.wait().unwrap();
        let dead = me.sibling("dead-run", gone_pid, 1);
        let remote = Owner::from_parts("far-run", "elsewhere", "m2", "b2", "ns2", gone_pid, 1);
        for (name, owner) in [("live", &live), ("dead", &dead), ("remote", &remote)] {
            let dir = root.path().join(name);
            write_run_owner(&dir, owner).unwrap();
            std::fs::write(dir.join("report.pdf"), b"customer data").unwrap();
        }
        std::fs::create_dir_all(root.path().join("unknown")).unwrap();
        remove_dead_runs_attachments(root.path(), &me);
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["live", "remote", "unknown"]);
    }

    #[test]
    fn blocked_emails_follow_the_product_rules() {
        let (list, errors) = Blocklist::new(&[
            "*@spam.example".into(),
            "exact@block.example".into(),
            "/^\\[SPAM\\]/i".into(),
            "/@(?!pcr\\.com)/".into(),
            "/(unclosed/".into(),
        ]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(list.blocks("x@SPAM.example", "hello"));
        assert!(list.blocks("exact@block.example", "hello"));
        assert!(list.blocks("a@pcr.com", "[spam] buy now"));
        // The whitelist form: everything not from pcr.com is blocked.
        assert!(list.blocks("someone@gmail.com", "hello"));
        let (whitelist, _) = Blocklist::new(&["/@(?!pcr\\.com)/".into()]);
        assert!(!whitelist.blocks("staff@pcr.com", "hello"));
        assert!(whitelist.blocks("someone@gmail.com", "hello"));
        let (wild, _) = Blocklist::new(&["*@spam.example".into()]);
        assert!(!wild.blocks("spam.example@good.example", "x"));
        assert!(!wild.blocks("a@good.example", "from *@spam.example"));
    }
}
