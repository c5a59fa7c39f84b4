//! The POP3 mailbox adapter against our own Dovecot (POP3S and POP3 + STLS): listing minus
//! what the state store recorded, exact pipelined downloads, DELE committed only by `finish`,
//! skipped/quarantined messages remembered, and the wrong-password error.
//!
//! POP3 reads the INBOX only, so these tests share the user `mbox6` and run one at a time.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, ProcessedAction, Secret, SslMode,
    TlsSettings,
};
use pcr_email::incoming::pop3::Pop3Mailbox;
use pcr_email::incoming::{self, Fetched, Flow, Listed, Mailbox};
use pcr_email::state::StateStore;
use pcr_email::Error;

const USER: &str = "mbox6";
static SERIAL: Mutex<()> = Mutex::new(());

fn email() -> String {
    common::mail_user(USER).email
}

fn account(ssl: SslMode) -> Account {
    let user = common::mail_user(USER);
    let port = match ssl {
        SslMode::Ssl => common::port("PCR_POP3S_PORT"),
        _ => common::port("PCR_POP3_PORT"),
    };
    Account {
        id: AccountId::Tenant(9),
        tenants_recid: 2,
        account_type: AccountType::ServiceDesk,
        email: user.email.clone(),
        display_name: None,
        login: None,
        password: Some(Secret::new(user.password.clone())),
        outgoing: None,
        incoming: Some(Incoming {
            mailbox: MailboxType::Pop3,
            host: Some(common::tls_host()),
            port,
            ssl,
            folder: "INBOX".into(),
            path: None,
            processed_action: ProcessedAction::Seen,
            max_messages: 500,
            max_message_bytes: 50 * 1024 * 1024,
        }),
        sysadmin: None,
        tls: TlsSettings {
            verify_cert: true,
            ca_file: Some(common::ca_file()),
        },
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
        timeout: Duration::from_secs(10),
        auth_type: Default::default(),
        oauth: None,
    }
}

/// Empties the INBOX and fills it with `count` messages; returns them in order.
fn inbox_with(count: usize, size: usize) -> Vec<Vec<u8>> {
    common::mailbox_reset(&email());
    let token = common::unique_token("pop3mb");
    let raws: Vec<Vec<u8>> = (0..count)
        .map(|n| {
            let mut raw = format!(
                "From: s@example.edu\r\nTo: {}\r\nSubject: {token} {n}\r\n\
                 Message-ID: <{token}.{n}@example.edu>\r\n\r\nGr\u{fc}\u{df}e {n}\r\n\
                 .a line starting with a dot\r\n",
                email()
            )
            .into_bytes();
            while raw.len() < size {
                raw.extend_from_slice(b"0123456789 abcdefghijklmnopqrstuvwxyz\r\n");
            }
            raw
        })
        .collect();
    for raw in &raws {
        common::maildir_drop(&email(), raw);
        // Distinct delivery times keep Dovecot's order equal to ours.
        std::thread::sleep(Duration::from_millis(5));
    }
    raws
}

fn state() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    (dir, path)
}

fn connect(ssl: SslMode, state_dir: &Path) -> Pop3Mailbox {
    Pop3Mailbox::connect(&account(ssl), StateStore::open(state_dir, None).unwrap())
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

fn ids(listed: &[Listed]) -> Vec<String> {
    listed.iter().map(|l| l.id.clone()).collect()
}

fn fetch_all(mailbox: &mut dyn Mailbox, ids: &[String]) -> Vec<Fetched> {
    let mut got = Vec::new();
    mailbox
        .fetch_each(ids, &mut |m| {
            got.push(m);
            Flow::Continue
        })
        .unwrap();
    got
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn pop3s_lists_fetches_exactly_and_deletes_only_on_finish() {
    let _serial = lock();
    let (_dir, state_dir) = state();
    let raws = inbox_with(60, 2000);
    let mut mailbox = connect(SslMode::Ssl, &state_dir);
    assert_eq!(mailbox.count().unwrap(), 60);
    let listed = mailbox.list().unwrap();
    assert_eq!(listed.len(), 60);
    let got = fetch_all(&mut mailbox, &ids(&listed));
    assert_eq!(got.len(), 60);
    for (m, l) in got.iter().zip(&listed) {
        assert_eq!(m.id, l.id, "in listing order");
        assert_eq!(m.raw.len() as u64, l.size, "LIST size of {}", m.id);
    }
    // Byte-exact (Dovecot may order same-second deliveries its own way).
    let mut got_raws: Vec<Vec<u8>> = got.into_iter().map(|m| m.raw).collect();
    let mut raws = raws;
    got_raws.sort();
    raws.sort();
    assert!(
        got_raws == raws,
        "the downloaded messages differ from the delivered ones"
    );
    mailbox.mark_processed(&ids(&listed[..58])).unwrap();
    // Marked, not yet committed: another look at the server still sees them all.
    assert_eq!(common::mailbox_messages(&email(), "INBOX").len(), 60);
    Box::new(mailbox).finish().unwrap();
    let left = common::mailbox_messages(&email(), "INBOX");
    assert_eq!(left.len(), 2, "{left:?}");

    let mut again = connect(SslMode::Ssl, &state_dir);
    assert_eq!(ids(&again.list().unwrap()), ids(&listed[58..]));
}

#[test]
fn stls_skipped_and_quarantined_messages_stay_but_are_not_listed_again() {
    let _serial = lock();
    let (_dir, state_dir) = state();
    inbox_with(3, 200);
    let mut mailbox = connect(SslMode::StartTls, &state_dir);
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_skipped(&listed[..1]).unwrap();
    assert!(!mailbox.quarantine(&listed[1..2]).unwrap());
    Box::new(mailbox).finish().unwrap();
    assert_eq!(common::mailbox_messages(&email(), "INBOX").len(), 3);

    let mut again = incoming::open(
        &account(SslMode::StartTls),
        &no_oauth(),
        StateStore::open(&state_dir, None).unwrap(),
    )
    .unwrap();
    assert_eq!(again.protocol(), "POP3");
    assert_eq!(ids(&again.list().unwrap()), listed[2..].to_vec());
    again.finish().unwrap();
}

#[test]
fn dropping_the_mailbox_without_finish_deletes_nothing() {
    let _serial = lock();
    let (_dir, state_dir) = state();
    inbox_with(2, 200);
    let mut mailbox = connect(SslMode::Ssl, &state_dir);
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_processed(&listed).unwrap();
    drop(mailbox);
    // Dovecot needs a moment to notice the closed connection and unlock the maildrop.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(common::mailbox_messages(&email(), "INBOX").len(), 2);
    let mut again = connect(SslMode::Ssl, &state_dir);
    assert_eq!(ids(&again.list().unwrap()), listed);
}

#[test]
fn stop_ends_the_download_early() {
    let _serial = lock();
    let (_dir, state_dir) = state();
    let raws = inbox_with(5, 200);
    let mut mailbox = connect(SslMode::Ssl, &state_dir);
    let listed = ids(&mailbox.list().unwrap());
    let mut got = Vec::new();
    mailbox
        .fetch_each(&listed, &mut |m| {
            got.push(m);
            Flow::Stop
        })
        .unwrap();
    assert_eq!(got.len(), 1);
    assert!(raws.contains(&got[0].raw));
    Box::new(mailbox).finish().unwrap();
}

#[test]
fn a_wrong_password_is_an_auth_error_that_does_not_show_it() {
    let (_dir, state_dir) = state();
    let mut account = account(SslMode::Ssl);
    let wrong = "Wr0ng-Pop3-Secret";
    account.password = Some(Secret::new(wrong));
    let err =
        Pop3Mailbox::connect(&account, StateStore::open(&state_dir, None).unwrap()).unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Auth { .. }), "{text}");
    assert!(!text.contains(wrong), "{text}");
}

/// These mailboxes keep no tokens: the OAuth environment is never touched.
fn no_oauth() -> pcr_email::oauth::OAuthEnv {
    pcr_email::oauth::OAuthEnv {
        state_dir: std::env::temp_dir().join("pcr-email-unused-state"),
        state_dsn: None,
        key_file: std::env::temp_dir().join("pcr-email-unused.key"),
    }
}
