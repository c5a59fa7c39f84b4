//! The IMAP mailbox against our own Dovecot (`scripts/test-servers.sh start`): IMAPS and
//! STARTTLS, every PROCESSED_ACTION, the UID/UIDVALIDITY mark, batched and pipelined
//! downloads, the MOVE/UIDPLUS fallbacks (through a proxy that hides those capabilities),
//! and the failure cases (wrong password, refused and silent ports, wrong certificate).
//!
//! Every test works in its own folder of `imapuser@test.local`, so they run in parallel.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::MailUser;
use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, ProcessedAction, Secret, SslMode,
    TlsSettings,
};
use pcr_email::incoming::imap::{ImapMailbox, QUARANTINE_FOLDER};
use pcr_email::incoming::{self, Fetched, Flow, Mailbox};
use pcr_email::state::StateStore;
use pcr_email::Error;

const USER: &str = "imapuser";

fn user() -> MailUser {
    common::mail_user(USER)
}

fn account(host: &str, port: u16, ssl: SslMode, folder: &str, action: ProcessedAction) -> Account {
    let user = user();
    Account {
        id: AccountId::Tenant(42),
        tenants_recid: 3,
        account_type: AccountType::ServiceDesk,
        email: user.email.clone(),
        display_name: None,
        login: None,
        password: Some(Secret::new(user.password.clone())),
        outgoing: None,
        incoming: Some(Incoming {
            mailbox: MailboxType::Imap,
            host: Some(host.to_string()),
            port,
            ssl,
            folder: folder.to_string(),
            path: None,
            processed_action: action,
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

/// IMAPS to Dovecot, verified against the test CA.
fn imaps(folder: &str, action: ProcessedAction) -> Account {
    account(
        &common::tls_host(),
        common::port("PCR_IMAPS_PORT"),
        SslMode::Ssl,
        folder,
        action,
    )
}

/// IMAP with STARTTLS to Dovecot.
fn starttls(folder: &str, action: ProcessedAction) -> Account {
    account(
        &common::tls_host(),
        common::port("PCR_IMAP_PORT"),
        SslMode::StartTls,
        folder,
        action,
    )
}

struct State {
    dir: tempfile::TempDir,
}

impl State {
    fn new() -> State {
        State {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn store(&self) -> StateStore {
        StateStore::open(self.dir.path(), None).unwrap()
    }
}

fn connect(account: &Account, state: &State) -> ImapMailbox {
    ImapMailbox::connect(account, state.store()).unwrap_or_else(|e| panic!("connect: {e}"))
}

/// A session of "another mail client", over plain IMAP.
struct Admin {
    session: imap::Session<TcpStream>,
}

impl Admin {
    fn new() -> Admin {
        let tcp = TcpStream::connect((common::host().as_str(), common::port("PCR_IMAP_PORT")))
            .expect("connect to Dovecot");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut client = imap::Client::new(tcp);
        client.read_greeting().unwrap();
        let user = user();
        let session = client
            .login(&user.email, &user.password)
            .map_err(|(e, _)| e)
            .expect("admin login");
        Admin { session }
    }

    fn create(&mut self, folder: &str) {
        self.session.create(folder).expect("create folder");
    }

    fn delete(&mut self, folder: &str) {
        self.session.delete(folder).expect("delete folder");
    }

    fn append(&mut self, folder: &str, raw: &[u8], flags: &[imap::types::Flag<'static>]) {
        self.session
            .append(folder, raw)
            .flags(flags.iter().cloned())
            .finish()
            .expect("append");
    }

    fn uids(&mut self, folder: &str) -> Vec<u32> {
        self.session.select(folder).unwrap();
        let mut uids: Vec<u32> = self
            .session
            .uid_search("ALL")
            .unwrap()
            .into_iter()
            .collect();
        uids.sort_unstable();
        uids
    }
}

/// A message with a unique Message-ID, CRLF line ends, 8-bit UTF-8 and a body of `size` bytes.
fn message(token: &str, n: usize, size: usize) -> Vec<u8> {
    let mut raw = format!(
        "From: Sender <sender@example.edu>\r\nTo: {}\r\nSubject: test {token} #{n}\r\n\
         Message-ID: <{token}.{n}@example.edu>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
         Grüße, message {n} of {token}.\r\n",
        user().email
    )
    .into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.\r\n";
    while raw.len() + line.len() <= size {
        raw.extend_from_slice(line);
    }
    raw
}

/// A fresh folder holding `count` messages; returns (folder, raws in UID order).
fn folder_with(tag: &str, count: usize, size: usize) -> (String, Vec<Vec<u8>>) {
    let token = common::unique_token(tag);
    let folder = format!("T-{token}");
    let mut admin = Admin::new();
    admin.create(&folder);
    let raws: Vec<Vec<u8>> = (0..count).map(|n| message(&token, n, size)).collect();
    for raw in &raws {
        admin.append(&folder, raw, &[]);
    }
    (folder, raws)
}

fn flags_by_uid(folder: &str) -> HashMap<u32, Vec<String>> {
    common::mailbox_messages(&user().email, folder)
        .into_iter()
        .map(|m| (m.uid, m.flags))
        .collect()
}

fn ids(listed: &[incoming::Listed]) -> Vec<String> {
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

#[test]
fn imaps_lists_new_mail_fetches_it_exactly_and_marks_it_seen() {
    let state = State::new();
    let (folder, raws) = folder_with("seen", 3, 600);
    // One of them was read in another client before the check: still new for us.
    let token = common::unique_token("read-elsewhere");
    let read_elsewhere = message(&token, 9, 300);
    Admin::new().append(&folder, &read_elsewhere, &[imap::types::Flag::Seen]);
    let mut all = raws.clone();
    all.push(read_elsewhere);

    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    assert_eq!(mailbox.count().unwrap(), 4);
    let listed = mailbox.list().unwrap();
    assert_eq!(listed.len(), 4, "{listed:?}");
    for (l, raw) in listed.iter().zip(&all) {
        assert_eq!(l.size, raw.len() as u64, "RFC822.SIZE of {}", l.id);
    }
    let got = fetch_all(&mut mailbox, &ids(&listed));
    assert_eq!(got.len(), 4);
    for (m, raw) in got.iter().zip(&all) {
        assert_eq!(&m.raw, raw, "message {} is byte-exact", m.id);
    }
    // BODY.PEEK[]: downloading did not mark anything as seen.
    let flags = flags_by_uid(&folder);
    let unseen = flags
        .values()
        .filter(|f| !f.contains(&"\\Seen".into()))
        .count();
    assert_eq!(unseen, 3, "{flags:?}");

    mailbox.mark_processed(&ids(&listed)).unwrap();
    Box::new(mailbox).finish().unwrap();
    let flags = flags_by_uid(&folder);
    assert!(
        flags.values().all(|f| f.contains(&"\\Seen".into())),
        "{flags:?}"
    );

    // Next run: nothing new, although `n:*` makes the server return the last message.
    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    assert_eq!(mailbox.list().unwrap(), vec![]);
    // New mail after the run is found.
    let late = message(&common::unique_token("late"), 1, 200);
    Admin::new().append(&folder, &late, &[imap::types::Flag::Seen]);
    let listed = mailbox.list().unwrap();
    assert_eq!(listed.len(), 1);
    let got = fetch_all(&mut mailbox, &ids(&listed));
    assert_eq!(got[0].raw, late);
    Box::new(mailbox).finish().unwrap();
}

#[test]
fn starttls_delete_expunges_only_the_processed_messages() {
    let state = State::new();
    let (folder, raws) = folder_with("delete", 3, 400);
    let mut mailbox = connect(&starttls(&folder, ProcessedAction::Delete), &state);
    assert_eq!(
        mailbox.extensions(),
        (true, true),
        "Dovecot has UIDPLUS and MOVE"
    );
    let listed = mailbox.list().unwrap();
    assert_eq!(listed.len(), 3);
    let done = ids(&listed[..2]);
    mailbox.mark_processed(&done).unwrap();
    Box::new(mailbox).finish().unwrap();
    let left = common::mailbox_messages(&user().email, &folder);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].uid.to_string(), listed[2].id);
    assert!(left[0].flags.is_empty(), "the third message is untouched");

    // The unprocessed message is still new next time, and only it.
    let mut mailbox = connect(&starttls(&folder, ProcessedAction::Delete), &state);
    let again = mailbox.list().unwrap();
    assert_eq!(ids(&again), vec![listed[2].id.clone()]);
    assert_eq!(fetch_all(&mut mailbox, &ids(&again))[0].raw, raws[2]);
}

#[test]
fn move_creates_the_target_folder_and_quarantine_goes_to_pcr_failed() {
    let state = State::new();
    let (folder, raws) = folder_with("move", 3, 300);
    let target = format!("{folder}-Done");
    let mut mailbox = connect(
        &imaps(&folder, ProcessedAction::Move(target.clone())),
        &state,
    );
    let listed = mailbox.list().unwrap();
    mailbox.mark_processed(&ids(&listed[..2])).unwrap();
    assert!(mailbox.quarantine(&ids(&listed[2..])).unwrap());
    Box::new(mailbox).finish().unwrap();

    assert!(common::mailbox_messages(&user().email, &folder).is_empty());
    let moved = common::mailbox_messages(&user().email, &target);
    assert_eq!(moved.len(), 2);
    let quarantined: Vec<_> = common::mailbox_messages(&user().email, QUARANTINE_FOLDER)
        .into_iter()
        .filter(|m| {
            m.message_id
                .as_deref()
                .is_some_and(|id| id.contains(&folder[2..]))
        })
        .collect();
    assert_eq!(
        quarantined.len(),
        1,
        "the third message is in {QUARANTINE_FOLDER}"
    );
    // Moved, not copied: the content arrived intact.
    let mut admin = Admin::new();
    admin.session.select(&target).unwrap();
    let fetched = admin.session.uid_fetch("1:*", "BODY.PEEK[]").unwrap();
    let bodies: Vec<&[u8]> = fetched.iter().filter_map(|f| f.body()).collect();
    assert_eq!(bodies, vec![&raws[0][..], &raws[1][..]]);
}

#[test]
fn a_changed_uidvalidity_makes_every_message_a_candidate_again() {
    let state = State::new();
    let (folder, _) = folder_with("uidvalidity", 4, 200);
    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    let listed = mailbox.list().unwrap();
    assert_eq!(listed.len(), 4);
    let first_validity = mailbox.uidvalidity().unwrap();
    mailbox.mark_processed(&ids(&listed)).unwrap();
    Box::new(mailbox).finish().unwrap();

    // The folder is recreated: UIDs start again at 1, below the stored mark.
    let mut admin = Admin::new();
    admin.delete(&folder);
    admin.create(&folder);
    let token = common::unique_token("recreated");
    let fresh: Vec<Vec<u8>> = (0..2).map(|n| message(&token, n, 200)).collect();
    for raw in &fresh {
        admin.append(&folder, raw, &[]);
    }
    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    let listed = mailbox.list().unwrap();
    assert_ne!(mailbox.uidvalidity().unwrap(), first_validity);
    assert_eq!(ids(&listed), vec!["1".to_string(), "2".to_string()]);
    let got = fetch_all(&mut mailbox, &ids(&listed));
    assert_eq!(got.iter().map(|m| m.raw.clone()).collect::<Vec<_>>(), fresh);
}

#[test]
fn the_mark_never_passes_an_unsettled_message_and_skipping_changes_nothing() {
    let state = State::new();
    let (folder, _) = folder_with("mark", 4, 200);
    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_skipped(&listed[0..1]).unwrap();
    mailbox.mark_processed(&listed[1..2]).unwrap();
    // listed[2] failed (left alone); listed[3] processed.
    mailbox.mark_processed(&listed[3..4]).unwrap();
    Box::new(mailbox).finish().unwrap();

    let flags = flags_by_uid(&folder);
    let uid = |i: usize| listed[i].parse::<u32>().unwrap();
    assert!(flags[&uid(0)].is_empty(), "skipped: not touched");
    assert!(flags[&uid(1)].contains(&"\\Seen".into()));
    assert!(flags[&uid(2)].is_empty());

    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    // Only the open one: the fourth, settled above the mark, is remembered.
    assert_eq!(ids(&mailbox.list().unwrap()), listed[2..3].to_vec());
    mailbox.mark_processed(&listed[2..3]).unwrap();
    Box::new(mailbox).finish().unwrap();
    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    assert_eq!(mailbox.list().unwrap(), vec![]);
}

#[test]
fn three_hundred_messages_take_one_fetch_command() {
    let state = State::new();
    let token = common::unique_token("batch");
    let folder = format!("T-{token}");
    let mut admin = Admin::new();
    admin.create(&folder);
    let raws: Vec<Vec<u8>> = (0..300).map(|n| message(&token, n, 300 + n * 13)).collect();
    for raw in &raws {
        admin.append(&folder, raw, &[]);
    }
    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    let listed = mailbox.list().unwrap();
    assert_eq!(listed.len(), 300);
    let got = fetch_all(&mut mailbox, &ids(&listed));
    assert_eq!(got.len(), 300);
    for (m, raw) in got.iter().zip(&raws) {
        assert_eq!(&m.raw, raw);
    }
    let stats = mailbox.stats();
    assert_eq!(stats.list_fetches, 1);
    assert_eq!(stats.body_fetches, 1, "{stats:?}");
    assert_eq!(stats.fetch_round_trips, 1, "{stats:?}");
    assert_eq!(stats.messages_fetched, 300);
}

#[test]
fn large_downloads_are_split_in_pipelined_batches() {
    let state = State::new();
    // 24 messages of ~1 MiB = 3 batches of 8 MiB, through the 20 ms delay proxy.
    let (folder, raws) = folder_with("pipeline", 24, 1024 * 1024);
    let account = account(
        &common::host(),
        common::port("PCR_DELAY_IMAP_PORT"),
        SslMode::None,
        &folder,
        ProcessedAction::Seen,
    );
    let mut mailbox = connect(&account, &state);
    let listed = mailbox.list().unwrap();
    let mut largest_seen = 0usize;
    let mut count = 0usize;
    mailbox
        .fetch_each(&ids(&listed), &mut |m| {
            assert_eq!(m.raw, raws[count], "message {count}");
            largest_seen = largest_seen.max(m.raw.len());
            count += 1;
            Flow::Continue
        })
        .unwrap();
    assert_eq!(count, 24);
    let stats = mailbox.stats();
    assert!(stats.body_fetches >= 3, "{stats:?}");
    assert_eq!(
        stats.fetch_round_trips, 1,
        "batches are pipelined: {stats:?}"
    );
}

#[test]
fn stop_ends_the_download_and_the_session_stays_usable() {
    let state = State::new();
    let (folder, raws) = folder_with("stop", 5, 300);
    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    let listed = ids(&mailbox.list().unwrap());
    let mut got = Vec::new();
    mailbox
        .fetch_each(&listed, &mut |m| {
            got.push(m);
            Flow::Stop
        })
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].raw, raws[0]);
    mailbox.mark_processed(&listed[..1]).unwrap();
    assert_eq!(mailbox.count().unwrap(), 5);
    // After EXAMINE (count), marking re-opens the folder read-write.
    mailbox.mark_processed(&listed[1..2]).unwrap();
    Box::new(mailbox).finish().unwrap();
    let seen = flags_by_uid(&folder)
        .values()
        .filter(|f| f.contains(&"\\Seen".into()))
        .count();
    assert_eq!(seen, 2);
}

#[test]
fn vanished_messages_are_passed_over() {
    let state = State::new();
    let (folder, raws) = folder_with("vanish", 3, 300);
    let mut mailbox = connect(&imaps(&folder, ProcessedAction::Seen), &state);
    let listed = ids(&mailbox.list().unwrap());
    // Another client deletes the middle message between listing and download.
    let mut admin = Admin::new();
    admin.session.select(&folder).unwrap();
    admin
        .session
        .uid_store(&listed[1], "+FLAGS.SILENT (\\Deleted)")
        .unwrap();
    admin.session.expunge().unwrap();
    let got = fetch_all(&mut mailbox, &listed);
    assert_eq!(
        got.iter().map(|m| m.raw.clone()).collect::<Vec<_>>(),
        vec![raws[0].clone(), raws[2].clone()]
    );
    mailbox
        .mark_processed(&[listed[0].clone(), listed[2].clone()])
        .unwrap();
    Box::new(mailbox).finish().unwrap();
}

#[test]
fn the_quoted_password_logs_in() {
    let state = State::new();
    let quoted = common::mail_user("quoted");
    let mut account = imaps("INBOX", ProcessedAction::Seen);
    account.email = quoted.email.clone();
    account.password = Some(Secret::new(quoted.password.clone()));
    let mut mailbox = connect(&account, &state);
    mailbox.count().unwrap();
}

fn assert_mailbox_error(err: &Error, needle: &str) {
    match err {
        Error::Mailbox(m) => {
            assert_eq!(m.account, "42");
            assert!(
                m.message.contains(needle),
                "expected '{needle}' in: {}",
                m.message
            );
        }
        other => panic!("expected a mailbox error with '{needle}', got {other:?}"),
    }
}

#[test]
fn a_wrong_password_is_an_auth_error_that_does_not_show_it() {
    let state = State::new();
    for mut account in [
        imaps("INBOX", ProcessedAction::Seen),
        starttls("INBOX", ProcessedAction::Seen),
    ] {
        let wrong = "Wr0ng-Secret-Value";
        account.password = Some(Secret::new(wrong));
        let err = ImapMailbox::connect(&account, state.store()).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(matches!(err, Error::Auth { .. }), "{text}");
        assert!(text.contains("imapuser@test.local"), "{text}");
        assert!(!text.contains(wrong), "{text}");
    }
}

#[test]
fn a_refused_port_is_a_clear_error() {
    let state = State::new();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let account = account(
        "127.0.0.1",
        port,
        SslMode::Ssl,
        "INBOX",
        ProcessedAction::Seen,
    );
    let err = ImapMailbox::connect(&account, state.store()).unwrap_err();
    assert_mailbox_error(&err, "connection refused");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn a_silent_server_costs_at_most_the_timeout() {
    let state = State::new();
    for ssl in [SslMode::None, SslMode::Ssl, SslMode::StartTls] {
        let mut account = account(
            &common::host(),
            common::port("PCR_SILENT_PORT"),
            ssl,
            "INBOX",
            ProcessedAction::Seen,
        );
        account.timeout = Duration::from_secs(2);
        let start = Instant::now();
        let err = ImapMailbox::connect(&account, state.store()).unwrap_err();
        let elapsed = start.elapsed();
        assert_mailbox_error(&err, "timed out");
        assert!(
            elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_millis(3500),
            "{ssl:?}: {elapsed:?}"
        );
    }
}

#[test]
fn an_untrusted_certificate_is_refused() {
    let state = State::new();
    let mut account = imaps("INBOX", ProcessedAction::Seen);
    account.tls.ca_file = None;
    let err = ImapMailbox::connect(&account, state.store()).unwrap_err();
    assert_mailbox_error(&err, "certificate");
}

#[test]
fn a_certificate_for_another_host_is_refused_unless_verify_cert_is_off() {
    let state = State::new();
    let port = tls_proxy_with_other_cert(common::port("PCR_IMAP_PORT"));
    let mut account = account(
        &common::tls_host(),
        port,
        SslMode::Ssl,
        "INBOX",
        ProcessedAction::Seen,
    );
    let err = ImapMailbox::connect(&account, state.store()).unwrap_err();
    assert_mailbox_error(&err, "does not match the server name");
    account.tls.verify_cert = false;
    let mut mailbox = connect(&account, &state);
    mailbox.count().unwrap();
}

#[test]
fn starttls_is_required_when_configured() {
    let state = State::new();
    let (port, from_client) = capability_filter_proxy(&["STARTTLS"]);
    let account = account(
        &common::host(),
        port,
        SslMode::StartTls,
        "INBOX",
        ProcessedAction::Seen,
    );
    let err = ImapMailbox::connect(&account, state.store()).unwrap_err();
    assert_mailbox_error(&err, "does not offer STARTTLS");
    let sent = String::from_utf8_lossy(&from_client.lock().unwrap()).into_owned();
    assert!(!sent.contains("LOGIN"), "nothing was sent in clear: {sent}");
    assert!(!sent.contains(&user().password), "{sent}");
}

#[test]
fn without_move_and_uidplus_the_fallbacks_touch_only_our_messages() {
    let state = State::new();
    let (port, _) = capability_filter_proxy(&["MOVE", "UIDPLUS"]);
    let plain =
        |folder: &str, action| account(&common::host(), port, SslMode::None, folder, action);

    // move: COPY + \Deleted + EXPUNGE (no other \Deleted message in the folder).
    let (folder, _) = folder_with("nomove", 3, 300);
    let target = format!("{folder}-Done");
    let mut mailbox = connect(
        &plain(&folder, ProcessedAction::Move(target.clone())),
        &state,
    );
    assert_eq!(mailbox.extensions(), (false, false));
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_processed(&listed[..2]).unwrap();
    assert_eq!(mailbox.stats().expunges_skipped, 0);
    Box::new(mailbox).finish().unwrap();
    assert_eq!(common::mailbox_messages(&user().email, &folder).len(), 1);
    assert_eq!(common::mailbox_messages(&user().email, &target).len(), 2);

    // delete while another client has a message flagged \Deleted: no EXPUNGE at all.
    let (folder, _) = folder_with("nouidplus", 3, 300);
    let mut admin = Admin::new();
    let uids = admin.uids(&folder);
    admin
        .session
        .uid_store(uids[2].to_string(), "+FLAGS.SILENT (\\Deleted)")
        .unwrap();
    let mut mailbox = connect(&plain(&folder, ProcessedAction::Delete), &state);
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_processed(&listed[..1]).unwrap();
    assert_eq!(mailbox.stats().expunges_skipped, 1);
    Box::new(mailbox).finish().unwrap();
    let left = common::mailbox_messages(&user().email, &folder);
    assert_eq!(left.len(), 3, "nothing expunged: {left:?}");
    let flags = flags_by_uid(&folder);
    assert!(flags[&uids[0]].contains(&"\\Deleted".into()));
    assert!(flags[&uids[1]].is_empty());

    // ... and once the other client's message is gone, ours are expunged.
    admin.session.select(&folder).unwrap();
    admin
        .session
        .uid_store(uids[2].to_string(), "-FLAGS.SILENT (\\Deleted)")
        .unwrap();
    let mut mailbox = connect(&plain(&folder, ProcessedAction::Delete), &state);
    let listed = ids(&mailbox.list().unwrap());
    assert_eq!(listed, vec![uids[1].to_string(), uids[2].to_string()]);
    mailbox.mark_processed(&listed[..1]).unwrap();
    Box::new(mailbox).finish().unwrap();
    let left: Vec<u32> = common::mailbox_messages(&user().email, &folder)
        .iter()
        .map(|m| m.uid)
        .collect();
    assert_eq!(
        left,
        vec![uids[2]],
        "our two flagged messages were expunged"
    );
}

#[test]
fn capabilities_come_from_the_replies_or_are_asked_for() {
    let state = State::new();
    let sent_commands = |record: &Arc<Mutex<Vec<u8>>>| -> Vec<String> {
        String::from_utf8_lossy(&record.lock().unwrap())
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_ascii_uppercase))
            .collect()
    };
    // Dovecot names them in the greeting and in the LOGIN reply: never asked for.
    let plain = |port, folder: &str| {
        let a = account(
            &common::host(),
            port,
            SslMode::None,
            folder,
            ProcessedAction::Seen,
        );
        connect(&a, &state)
    };
    let (folder, _) = folder_with("caps", 2, 300);
    let (port, record) = filter_proxy(&[], false);
    let mut mailbox = plain(port, &folder);
    assert_eq!(mailbox.extensions(), (true, true));
    assert_eq!(mailbox.list().unwrap().len(), 2);
    Box::new(mailbox).finish().unwrap();
    let commands = sent_commands(&record);
    assert!(
        !commands.contains(&"CAPABILITY".to_string()),
        "{commands:?}"
    );
    assert_eq!(commands[..3], ["LOGIN", "SELECT", "UID"], "{commands:?}");

    // A server that names them only when asked: CAPABILITY before and after the login.
    let (folder, _) = folder_with("caps-asked", 2, 300);
    let (port, record) = filter_proxy(&[], true);
    let mut mailbox = plain(port, &folder);
    assert_eq!(mailbox.extensions(), (true, true));
    let listed = ids(&mailbox.list().unwrap());
    let fetched = fetch_all(&mut mailbox, &listed);
    assert_eq!(fetched.len(), 2);
    mailbox.mark_processed(&listed).unwrap();
    Box::new(mailbox).finish().unwrap();
    let commands = sent_commands(&record);
    assert_eq!(
        commands[..3],
        ["CAPABILITY", "LOGIN", "CAPABILITY"],
        "{commands:?}"
    );
    assert!(flags_by_uid(&folder)
        .values()
        .all(|f| f.contains(&"\\Seen".to_string())));
}

#[test]
fn open_dispatches_by_mailbox_type() {
    let state = State::new();
    let (folder, _) = folder_with("open", 1, 200);
    let mut mailbox = incoming::open(
        &imaps(&folder, ProcessedAction::Seen),
        &no_oauth(),
        state.store(),
    )
    .unwrap();
    assert_eq!(mailbox.protocol(), "IMAP");
    assert_eq!(mailbox.list().unwrap().len(), 1);
    mailbox.finish().unwrap();

    let mut cloud = imaps("INBOX", ProcessedAction::Seen);
    cloud.incoming.as_mut().unwrap().mailbox = MailboxType::Office365;
    let err = incoming::open(&cloud, &no_oauth(), state.store())
        .err()
        .expect("a cloud mailbox without OAuth settings");
    // Handed to the Graph mailbox, which needs the OAuth2 tab: never read over IMAP instead.
    assert!(!err.to_string().contains("not supported"), "{err}");
}

#[test]
fn a_missing_folder_is_named_in_the_error() {
    let state = State::new();
    let mut mailbox = connect(&imaps("No-Such-Folder-Here", ProcessedAction::Seen), &state);
    let err = mailbox.list().unwrap_err();
    assert_mailbox_error(&err, "No-Such-Folder-Here");
}

// ---- proxies -------------------------------------------------------------------------

/// A proxy to Dovecot's plain IMAP port that removes `strip` from every capability list the
/// server sends; returns its port and what clients sent through it.
fn capability_filter_proxy(strip: &[&str]) -> (u16, Arc<Mutex<Vec<u8>>>) {
    filter_proxy(strip, false)
}

/// Like [`capability_filter_proxy`]; with `drop_codes`, the `[CAPABILITY ...]` response codes
/// of the greeting and the LOGIN reply are removed altogether (a server that names its
/// capabilities only when asked).
fn filter_proxy(strip: &[&str], drop_codes: bool) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let strip: Vec<String> = strip.iter().map(|s| s.to_ascii_uppercase()).collect();
    let from_client = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&from_client);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let upstream =
                TcpStream::connect((common::host().as_str(), common::port("PCR_IMAP_PORT")))
                    .unwrap();
            let strip = strip.clone();
            let record = Arc::clone(&record);
            let sent = Arc::clone(&record);
            let (mut c_read, mut u_write) =
                (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = c_read.read(&mut buf) {
                    // Recorded first: the reply may come back before this loop goes on.
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    if n == 0 || u_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = u_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut reader = BufReader::new(upstream);
                let mut client = client;
                loop {
                    let mut line = Vec::new();
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let text = String::from_utf8_lossy(&line).into_owned();
                    let upper = text.to_ascii_uppercase();
                    let code = upper
                        .find("[CAPABILITY ")
                        .and_then(|at| upper[at..].find(']').map(|end| at..at + end + 2));
                    // An untagged CAPABILITY nobody asked for (Dovecot's after LOGIN).
                    let asked = || {
                        let sent = sent.lock().unwrap();
                        let last = String::from_utf8_lossy(&sent)
                            .lines()
                            .last()
                            .map(str::to_owned);
                        last.is_some_and(|l| l.to_ascii_uppercase().ends_with(" CAPABILITY"))
                    };
                    let line = if drop_codes && upper.starts_with("* CAPABILITY") && !asked() {
                        continue;
                    } else if let (true, Some(code)) = (drop_codes, code) {
                        let mut kept = text.clone();
                        kept.replace_range(code, "");
                        kept.into_bytes()
                    } else if upper.starts_with("* CAPABILITY") || upper.contains("[CAPABILITY ") {
                        strip_words(&text, &strip).into_bytes()
                    } else {
                        line
                    };
                    if client.write_all(&line).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, from_client)
}

/// Implicit TLS with the certificate for `other.example` (signed by the test CA) in front of
/// Dovecot's plain IMAP port.
fn tls_proxy_with_other_cert(target_port: u16) -> u16 {
    let cert = std::fs::read(common::env("PCR_TEST_OTHER_CERT")).unwrap();
    let key = std::fs::read(common::env("PCR_TEST_OTHER_KEY")).unwrap();
    let identity = native_tls::Identity::from_pkcs8(&cert, &key).unwrap();
    let acceptor = native_tls::TlsAcceptor::new(identity).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let acceptor = acceptor.clone();
            std::thread::spawn(move || {
                let Ok(mut tls) = acceptor.accept(client) else {
                    return;
                };
                let mut upstream =
                    TcpStream::connect((common::host().as_str(), target_port)).unwrap();
                let tick = Some(Duration::from_millis(10));
                tls.get_ref().set_read_timeout(tick).unwrap();
                upstream.set_read_timeout(tick).unwrap();
                let mut buf = [0u8; 16384];
                let idle = |e: &std::io::Error| {
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                };
                loop {
                    match tls.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if upstream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Err(e) if idle(&e) => {}
                        Err(_) => break,
                    }
                    match upstream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Err(e) if idle(&e) => {}
                        Err(_) => break,
                    }
                }
            });
        }
    });
    port
}

/// Removes the capability names in `strip` from one response line, keeping a closing `]`
/// and the line end that were attached to a removed word.
fn strip_words(line: &str, strip: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    for word in line.split(' ') {
        let core = word.trim_end_matches(['\r', '\n']);
        let line_end = &word[core.len()..];
        let (name, bracket) = match core.strip_suffix(']') {
            Some(name) => (name, "]"),
            None => (core, ""),
        };
        if !out.is_empty() && strip.contains(&name.to_ascii_uppercase()) {
            let last = out.last_mut().expect("not empty");
            last.push_str(bracket);
            last.push_str(line_end);
        } else {
            out.push(word.to_string());
        }
    }
    out.join(" ")
}

#[test]
fn the_test_proxy_strips_capabilities_cleanly() {
    let strip = vec!["MOVE".to_string(), "UIDPLUS".to_string()];
    assert_eq!(
        strip_words("* CAPABILITY IMAP4rev1 MOVE IDLE UIDPLUS\r\n", &strip),
        "* CAPABILITY IMAP4rev1 IDLE\r\n"
    );
    assert_eq!(
        strip_words(
            "a1 OK [CAPABILITY IMAP4rev1 UIDPLUS MOVE] Logged in\r\n",
            &strip
        ),
        "a1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"
    );
}

/// These mailboxes keep no tokens: the OAuth environment is never touched.
fn no_oauth() -> pcr_email::oauth::OAuthEnv {
    pcr_email::oauth::OAuthEnv {
        state_dir: std::env::temp_dir().join("pcr-email-unused-state"),
        state_dsn: None,
        key_file: std::env::temp_dir().join("pcr-email-unused.key"),
    }
}
