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
//!
//! The steps, one file each: this file runs the event (accounts, mailboxes, threads, summary);
//! `event.rs` reads its Data, `blocklist.rs` the Blocked Emails; `worker.rs` is a mailbox
//! thread; `php_thread.rs` the loop on PHP's thread (claims, host calls, ledger settlement);
//! `decide.rs` the decision for one mail; `mail.rs` builds `$mail` and its attachment files;
//! `alerts.rs` what goes to the Error Log and SYSADMIN; `summary.rs` the summary.

use std::collections::HashSet;
use std::sync::mpsc::{channel, sync_channel, Sender};
use std::time::Instant;

use regex::Regex;
use serde_json::{json, Value};

use crate::config::{Account, MailboxType, Settings, SslMode};
pub use crate::context::TenantAccounts;
use crate::error::{Error, Result};
use crate::host::Host;
use crate::incoming::gate;
use crate::log::Logger;
use crate::oauth::OAuthEnv;
use crate::state::{Owner, StateStore};

use mail::remove_dead_runs_attachments;
use php_thread::Run;
use summary::{finish_summary, Base};
pub use summary::{MailboxSummary, Summary, Totals};
use worker::{start_pool, Decision, Event, MailboxQueue, MailboxShared, CHANNEL_CAPACITY};

mod alerts;
mod blocklist;
mod decide;
mod event;
mod mail;
mod php_thread;
mod summary;
mod worker;

pub use blocklist::Blocklist;
pub use event::event_host;

/// What one run is given: the INI settings and the OAuth environment as values, and the
/// services of the object that owns the accounts (the PHP manager's core), borrowed.
pub struct EventContext<'a> {
    pub settings: &'a Settings,
    /// Where OAuth accounts keep their tokens.
    pub oauth: OAuthEnv,
    pub services: &'a mut dyn Services,
}

/// What the run asks of the object that owns the accounts, each when the run gets there: the
/// tenant rows are read through the host only once the Data and the switches allow a run, the
/// key file is opened (or created) only when a mailbox is read, the logger's once-only notices
/// last as long as that object, and an alert goes out through its ordinary sending (routing,
/// transports), which logs through the same logger.
pub trait Services {
    /// The tenant accounts the host lists, with the broken ones and the rows' errors
    /// (secret-free), as a value: nothing of them is kept for the run's caller.
    fn tenant_accounts(&mut self, host: &mut dyn Host) -> TenantAccounts;
    /// The key of the keyed hash in our Message-IDs (threading).
    fn thread_key(&mut self) -> Result<[u8; 32]>;
    fn logger(&mut self) -> &mut Logger;
    /// Sends a SYSADMIN alert (a `send()` message) through the ordinary routing.
    fn send(&mut self, host: &mut dyn Host, message: &Value) -> Result<()>;
}

/// How often a run checkpoints the state database's WAL (in a helper thread).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

pub fn event_check_mail(
    context: EventContext<'_>,
    host: &mut dyn Host,
    data: &Value,
) -> Result<Summary> {
    let started = Instant::now();
    let vhost = event_host(data)?;
    let EventContext {
        settings,
        oauth: env,
        services,
    } = context;
    // What the INI file itself warns of (a quoted "false" that reads as true, ...) shows on
    // the Events screen too.
    let mut base = Base {
        host: vhost.clone(),
        environment: settings.environment.clone(),
        errors: Vec::new(),
        warnings: settings.warnings.clone(),
    };
    if settings.disable_email {
        return Ok(finish_summary(base, "disabled", Vec::new(), started));
    }
    if !settings.send_email {
        return Ok(finish_summary(base, "send_email_off", Vec::new(), started));
    }
    let TenantAccounts {
        accounts: tenant_accounts,
        failed: failed_accounts,
        row_errors,
    } = services.tenant_accounts(host);
    // Rows that could not be used show on the Events screen, not only in the Error Log.
    base.errors = row_errors;
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
    for (left_out, reader) in duplicates {
        let text = format!(
            "account {} ({}) is configured with the same mailbox as account {} ({}): the mailbox \
             is read once, as account {}",
            left_out.id, left_out.email, reader.id, reader.email, reader.id
        );
        services.logger().once(
            host,
            &format!("duplicate-mailbox:{}:{}", left_out.id, reader.id),
            &format!("pcr_email: {text}"),
            &json!({"account": left_out.id.to_string()}),
        );
        base.warnings.push(text);
    }
    if mailboxes.is_empty() {
        let status = if base.errors.is_empty() && broken.is_empty() {
            "ok"
        } else {
            "errors"
        };
        return Ok(finish_summary(base, status, broken, started));
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
    let state = match StateStore::open(&settings.state_dir, settings.state_dsn.as_ref()) {
        Ok(state) => state,
        Err(e) => {
            // E.g. a state directory another user created: the Error Log says why no
            // mailbox was read, not only the event's exception.
            services.logger().error(
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
    let thread_key = match services.thread_key() {
        Ok(k) => Some(k),
        Err(e) => {
            services.logger().error(
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
            services.logger().error(
                host,
                &format!("pcr_email: cannot read the Blocked Emails list: {e}"),
                &Value::Null,
            );
            Vec::new()
        }
    };
    let (blocklist, pattern_errors) = Blocklist::new(&blocked);
    for e in pattern_errors {
        services.logger().once(host, &e.clone(), &e, &Value::Null);
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

    let mut run = Run {
        services,
        settings,
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
        state_errors: Vec::new(),
    };

    let shared = MailboxShared {
        env: env.clone(),
        state_dir: settings.state_dir.clone(),
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
        let helper_store = StateStore::open(state_dir, settings.state_dsn.as_ref());
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
    summaries.extend(broken);
    // "errors": some mailbox or account could not be read completely (see each entry).
    let failed = summaries.iter().any(|m| !m.errors.is_empty()) || !base.errors.is_empty();
    let status = if failed { "errors" } else { "ok" };
    Ok(finish_summary(base, status, summaries, started))
}

#[cfg(test)]
mod tests {
    use super::worker::ledger_scope;
    use super::*;
    use crate::host::Mail;
    use crate::state::Claim;
    use std::path::{Path, PathBuf};

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
        fn create_inquiry(&mut self, mail: &Mail<'_>) -> Result<String> {
            self.calls
                .push(format!("createInquiry {}", json!(mail.message_id)));
            for a in &mail.attachments {
                let path = Path::new(&a.path);
                let bytes = std::fs::read(path).unwrap();
                self.calls.push(format!("attachment {}", bytes.len()));
                if self.remove_attachment_dirs {
                    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
                }
            }
            Ok("IQ00001".into())
        }
        fn add_to_thread(&mut self, sd_number: &str, _mail: &Mail<'_>) -> Result<bool> {
            self.calls.push(format!("addToThread {sd_number}"));
            Ok(false)
        }
        fn deliver_message(&mut self, _message: &crate::host::InAppMessage) -> Result<()> {
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

    /// What a manager lends a run, without one: the tenant rows the host lists (plain values;
    /// an `ENC:` value fails as with a wrong key), a fixed thread key, and alerts recorded.
    struct TestServices {
        settings: Settings,
        logger: Logger,
        alerts: Vec<Value>,
    }

    impl Services for TestServices {
        fn tenant_accounts(&mut self, host: &mut dyn Host) -> TenantAccounts {
            let rows = host.email_accounts().unwrap();
            let keys = crate::config::secrets::KeyStore::from_key([7; 32]);
            let sorted = crate::config::tenant_rows(&rows, &self.settings, Ok(&keys));
            TenantAccounts {
                accounts: sorted.accounts,
                failed: sorted.failed,
                row_errors: sorted.errors.iter().map(|e| e.to_string()).collect(),
            }
        }
        fn thread_key(&mut self) -> Result<[u8; 32]> {
            Ok([7; 32])
        }
        fn logger(&mut self) -> &mut Logger {
            &mut self.logger
        }
        fn send(&mut self, _host: &mut dyn Host, message: &Value) -> Result<()> {
            self.alerts.push(message.clone());
            Ok(())
        }
    }

    fn run_event(ini: &Path, host: &mut RecordingHost) -> Value {
        run_event_alerting(ini, host).0
    }

    /// The summary, and the alerts the run sent.
    fn run_event_alerting(ini: &Path, host: &mut RecordingHost) -> (Value, Vec<Value>) {
        let settings = Settings::load(ini, "prod").unwrap();
        let mut services = TestServices {
            settings: settings.clone(),
            logger: Logger::new(None),
            alerts: Vec::new(),
        };
        let context = EventContext {
            settings: &settings,
            oauth: OAuthEnv::from_settings(&settings),
            services: &mut services,
        };
        let summary = event_check_mail(context, host, &json!({"host": "pcr360.example.edu"}));
        (
            serde_json::to_value(summary.unwrap()).unwrap(),
            services.alerts,
        )
    }

    #[test]
    fn a_message_too_large_is_left_in_place_and_alerted_once_across_runs() {
        let (_dir, maildir, ini, _) = maildir_master(
            "email.MAX_MESSAGE_BYTES = \"1K\"\nemail.SYSADMIN = \"admin@example.edu\"\n",
        );
        let file = maildir.join("new").join("1.M1P1.big");
        let body = "x".repeat(2000);
        std::fs::write(
            &file,
            format!("From: a@example.org\r\nSubject: big\r\n\r\n{body}\r\n"),
        )
        .unwrap();
        let mut host = RecordingHost::default();
        let (summary, alerts) = run_event_alerting(&ini, &mut host);
        assert_eq!(summary["totals"]["skipped"], 1, "{summary}");
        assert_eq!(
            summary["mailboxes"][0]["skip_reasons"]["oversized"], 1,
            "{summary}"
        );
        assert!(host.calls.is_empty(), "{:?}", host.calls);
        assert!(file.exists());
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0]["to"], "admin@example.edu");
        assert_eq!(
            alerts[0]["subject"],
            "[PCR-360] An incoming email is too large to process"
        );
        assert_eq!(alerts[0]["headers"]["Auto-Submitted"], "auto-generated");
        let (summary, alerts) = run_event_alerting(&ini, &mut RecordingHost::default());
        assert_eq!(summary["totals"]["skipped"], 1, "{summary}");
        assert!(alerts.is_empty(), "alerted once: {alerts:?}");
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
        let state = StateStore::open(&state_dir, None).unwrap();
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
        let state = StateStore::open(&state_dir, None).unwrap();
        assert!(state.alert_once("auth:master").unwrap());
        assert!(!state.alert_once("auth:master").unwrap(), "alerted once");
        run_event(&ini, &mut RecordingHost::default());
        assert!(
            state.alert_once("auth:master").unwrap(),
            "after a good read, the next login failure is alerted again"
        );
    }
}
