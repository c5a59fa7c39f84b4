//! The POP3 client against our own Dovecot (`scripts/test-servers.sh start`): POP3S and STLS
//! logins with certificate checks, a wrong password, UIDL/LIST, 50 messages fetched pipelined
//! byte-exact, DELE committed only by QUIT, timeouts. The tests share one mailbox
//! (`pop3user`), so they run one at a time.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use pcr_email::config::{Secret, SslMode, TlsSettings};
use pcr_email::incoming::pop3::{self, Pop3Session, Transaction};
use pcr_email::net::MaybeTls;
use pcr_email::Error;

const ACCOUNT: &str = "pop3-test";
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX: u64 = 10 * 1024 * 1024;

/// One test at a time on the shared mailbox; a failed test must not block the others.
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn user() -> MailUser {
    mail_user(&env("PCR_POP3_USER"))
}

fn trusted() -> TlsSettings {
    TlsSettings {
        verify_cert: true,
        ca_file: Some(ca_file()),
    }
}

fn open(port_var: &str, ssl: SslMode) -> Pop3Session<MaybeTls, Transaction> {
    let session = pop3::connect(
        ACCOUNT,
        &tls_host(),
        port(port_var),
        ssl,
        &trusted(),
        TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("connect {port_var}: {e}"));
    let user = user();
    session
        .login(&user.email, &Secret::new(user.password))
        .unwrap_or_else(|e| panic!("login: {e}"))
}

/// A message with what makes POP3 hard: dot lines (stuffed on the wire), 8-bit bytes, a folded
/// header, a long line, CRLF line ends.
fn message(seq: usize, token: &str) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(
        format!(
            "From: Sender {seq} <sender{seq}@example.org>\r\n\
             To: {}\r\n\
             Subject: POP3 test {seq}\r\n\
             \tfolded onto a second line\r\n\
             Message-ID: <{token}.{seq}@example.org>\r\n\
             X-Seq: {seq}\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=iso-8859-1\r\n\
             Content-Transfer-Encoding: 8bit\r\n\
             \r\n",
            user().email
        )
        .as_bytes(),
    );
    m.extend_from_slice(b"Caf\xe9 cr\xe8me br\xfbl\xe9e\r\n");
    m.extend_from_slice(b".\r\n..\r\n.leading dot\r\n");
    m.extend_from_slice(&vec![b'x'; 100 + seq * 997]);
    m.extend_from_slice(b"\r\nlast line\r\n");
    m
}

fn reset_with(messages: &[Vec<u8>]) {
    let email = user().email;
    mailbox_reset(&email);
    for raw in messages {
        maildir_drop(&email, raw);
    }
}

fn seq_of(raw: &[u8]) -> usize {
    let text = String::from_utf8_lossy(raw);
    let line = text
        .lines()
        .find(|l| l.starts_with("X-Seq: "))
        .unwrap_or_else(|| panic!("no X-Seq header in {text:.200}"));
    line["X-Seq: ".len()..].trim().parse().unwrap()
}

#[test]
fn pop3s_login_lists_and_uidls() {
    let _guard = exclusive();
    let token = unique_token("pop3s");
    let messages: Vec<Vec<u8>> = (0..3).map(|i| message(i, &token)).collect();
    reset_with(&messages);

    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    assert!(s.stream().is_tls());
    let caps = s.capabilities().clone();
    assert!(caps.known && caps.uidl() && caps.pipelining(), "{caps:?}");

    let stat = s.stat().unwrap();
    assert_eq!(stat.count, 3);
    let list = s.list().unwrap();
    assert_eq!(list.iter().map(|e| e.number).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(list.iter().map(|e| e.size).sum::<u64>(), stat.size);
    let mut sizes: Vec<u64> = list.iter().map(|e| e.size).collect();
    let mut expected: Vec<u64> = messages.iter().map(|m| m.len() as u64).collect();
    sizes.sort();
    expected.sort();
    assert_eq!(
        sizes, expected,
        "LIST sizes are the CRLF sizes of what was delivered"
    );

    let uidl = s.uidl().unwrap();
    assert_eq!(uidl.len(), 3);
    let unique: HashSet<&str> = uidl.iter().map(|u| u.uid.as_str()).collect();
    assert_eq!(unique.len(), 3, "{uidl:?}");
    s.quit().unwrap();

    // UIDs are stable across sessions (what the POP3 ledger relies on).
    let mut again = open("PCR_POP3S_PORT", SslMode::Ssl);
    assert_eq!(again.uidl().unwrap(), uidl);
    again.quit().unwrap();
}

#[test]
fn stls_login_works_over_tls() {
    let _guard = exclusive();
    let token = unique_token("stls");
    reset_with(&[message(1, &token)]);
    let session = pop3::connect(
        ACCOUNT,
        &tls_host(),
        port("PCR_POP3_PORT"),
        SslMode::StartTls,
        &trusted(),
        TIMEOUT,
    )
    .unwrap();
    assert!(
        session.stream().is_tls(),
        "STLS must have upgraded the stream"
    );
    assert!(
        !session.capabilities().stls(),
        "capabilities are re-read after STLS"
    );
    let user = user();
    let mut s = session
        .login(&user.email, &Secret::new(user.password))
        .unwrap();
    assert_eq!(s.stat().unwrap().count, 1);
    let body = s.retr(1, MAX).unwrap();
    assert_eq!(body, message(1, &token));
    s.quit().unwrap();
}

#[test]
fn plain_login_without_tls_when_configured_so() {
    let _guard = exclusive();
    reset_with(&[]);
    let session = pop3::connect(
        ACCOUNT,
        &host(),
        port("PCR_POP3_PORT"),
        SslMode::None,
        &TlsSettings::default(),
        TIMEOUT,
    )
    .unwrap();
    assert!(!session.stream().is_tls());
    let user = user();
    let mut s = session
        .login(&user.email, &Secret::new(user.password))
        .unwrap();
    assert_eq!(s.stat().unwrap().count, 0);
    s.quit().unwrap();
}

#[test]
fn wrong_password_is_an_auth_error_without_the_password() {
    let _guard = exclusive();
    let wrong = "Wr0ng-pa55word-XYZ";
    let user = user();
    for (port_var, ssl) in [
        ("PCR_POP3S_PORT", SslMode::Ssl),
        ("PCR_POP3_PORT", SslMode::StartTls),
    ] {
        let session = pop3::connect(
            ACCOUNT,
            &tls_host(),
            port(port_var),
            ssl,
            &trusted(),
            TIMEOUT,
        )
        .unwrap();
        let err = session.login(&user.email, &Secret::new(wrong)).unwrap_err();
        let shown = format!("{err} / {err:?}");
        match &err {
            Error::Auth { account, message } => {
                assert_eq!(account, ACCOUNT);
                assert!(message.contains(&user.email), "{message}");
                assert!(message.contains("rejected the login"), "{message}");
            }
            other => panic!("expected an auth error, got {other:?}"),
        }
        assert!(!shown.contains(wrong), "{shown}");
        assert!(!shown.contains(&user.password), "{shown}");
    }
}

#[test]
fn fifty_messages_pipelined_byte_exact() {
    let _guard = exclusive();
    let token = unique_token("pipe");
    let messages: Vec<Vec<u8>> = (0..50).map(|i| message(i, &token)).collect();
    reset_with(&messages);

    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    assert!(s.capabilities().pipelining());
    let list = s.list().unwrap();
    assert_eq!(list.len(), 50);
    let numbers: Vec<u32> = list.iter().map(|e| e.number).collect();
    let mut got = BTreeMap::new();
    let mut order = Vec::new();
    s.retr_each(&numbers, MAX, |number, fetched| {
        let raw = fetched.unwrap_or_else(|e| panic!("RETR {number}: {e}"));
        let size = list[number as usize - 1].size;
        assert_eq!(raw.len() as u64, size, "message {number} vs its LIST size");
        order.push(number);
        assert!(got.insert(seq_of(&raw), raw).is_none());
    })
    .unwrap();
    assert_eq!(order, numbers, "replies come back in command order");
    assert_eq!(got.len(), 50);
    for (seq, raw) in got {
        assert!(
            raw == messages[seq],
            "message X-Seq {seq} differs from what was delivered"
        );
    }
    // The session is still in sync after the batch.
    s.noop().unwrap();
    s.quit().unwrap();
}

#[test]
fn pipelining_saves_round_trips_on_a_slow_link() {
    let _guard = exclusive();
    let token = unique_token("slow");
    let messages: Vec<Vec<u8>> = (0..50).map(|i| message(i % 3, &token)).collect();
    reset_with(&messages);
    // The delay proxy adds PCR_DELAY_MS each way: one-by-one RETRs would need 50 round trips.
    let rtt = Duration::from_millis(2 * env("PCR_DELAY_MS").parse::<u64>().unwrap());
    let session = pop3::connect(
        ACCOUNT,
        &tls_host(),
        port("PCR_DELAY_POP3S_PORT"),
        SslMode::Ssl,
        &trusted(),
        TIMEOUT,
    )
    .unwrap();
    let user = user();
    let mut s = session
        .login(&user.email, &Secret::new(user.password))
        .unwrap();
    let numbers: Vec<u32> = (1..=50).collect();
    let started = Instant::now();
    let fetched = s.retr_many(&numbers, MAX).unwrap();
    let elapsed = started.elapsed();
    assert!(fetched.iter().all(|(_, r)| r.is_ok()));
    assert!(
        elapsed < rtt * 50 / 2,
        "50 pipelined RETRs took {elapsed:?}; one by one would take at least {:?}",
        rtt * 50
    );
    s.quit().unwrap();
}

#[test]
fn top_zero_gives_headers_only() {
    let _guard = exclusive();
    let token = unique_token("top");
    let raw = message(7, &token);
    reset_with(std::slice::from_ref(&raw));
    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    let headers = s.top(1, 0, MAX).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(headers, raw[..end].to_vec());
    let many = s.top_many(&[1, 99], MAX).unwrap();
    assert_eq!(many[0], (1, Ok(raw[..end].to_vec())));
    assert!(many[1].1.is_err(), "TOP of a message that does not exist");
    s.quit().unwrap();
}

#[test]
fn dele_then_quit_removes_the_message() {
    let _guard = exclusive();
    let token = unique_token("dele");
    reset_with(&[message(1, &token), message(2, &token)]);
    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    let first = s.retr(1, MAX).unwrap();
    s.dele(1).unwrap();
    s.quit().unwrap();

    let left = mailbox_messages(&user().email, "INBOX");
    assert_eq!(left.len(), 1, "{left:?}");
    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    assert_eq!(s.stat().unwrap().count, 1);
    let remaining = s.retr(1, MAX).unwrap();
    assert_ne!(seq_of(&remaining), seq_of(&first));
    s.quit().unwrap();
}

#[test]
fn dele_then_drop_keeps_the_messages() {
    let _guard = exclusive();
    let token = unique_token("drop");
    reset_with(&[message(1, &token), message(2, &token)]);
    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    let deleted = s.dele_many(&[1, 2]).unwrap();
    assert!(deleted.iter().all(|(_, r)| r.is_ok()), "{deleted:?}");
    drop(s); // no QUIT: the server must not commit the DELEs

    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    assert_eq!(s.stat().unwrap().count, 2);
    s.quit().unwrap();
    assert_eq!(mailbox_messages(&user().email, "INBOX").len(), 2);
}

#[test]
fn rset_undoes_dele_before_quit() {
    let _guard = exclusive();
    let token = unique_token("rset");
    reset_with(&[message(1, &token)]);
    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    s.dele(1).unwrap();
    assert!(
        s.retr(1, MAX).is_err(),
        "a deleted message cannot be fetched"
    );
    s.rset().unwrap();
    s.quit().unwrap();
    assert_eq!(mailbox_messages(&user().email, "INBOX").len(), 1);
}

#[test]
fn oversized_message_is_refused_by_max_bytes() {
    let _guard = exclusive();
    let token = unique_token("big");
    let raw = message(40, &token); // ~40 KB
    reset_with(std::slice::from_ref(&raw));
    let mut s = open("PCR_POP3S_PORT", SslMode::Ssl);
    let err = s.retr(1, 4096).unwrap_err();
    assert!(err.to_string().contains("limit of 4096 bytes"), "{err}");
    // Poisoned: no QUIT goes out, and nothing is deleted.
    assert!(s.quit().is_err());
    assert_eq!(mailbox_messages(&user().email, "INBOX").len(), 1);
}

#[test]
fn untrusted_certificate_is_refused_unless_verification_is_off() {
    let _guard = exclusive();
    let err = pop3::connect(
        ACCOUNT,
        &tls_host(),
        port("PCR_POP3S_PORT"),
        SslMode::Ssl,
        &TlsSettings::default(),
        TIMEOUT,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Mailbox(_)), "{err:?}");
    assert!(text.contains("certificate verification failed"), "{text}");
    assert!(text.contains("CA_FILE"), "{text}");

    let insecure = TlsSettings {
        verify_cert: false,
        ca_file: None,
    };
    let session = pop3::connect(
        ACCOUNT,
        &tls_host(),
        port("PCR_POP3_PORT"),
        SslMode::StartTls,
        &insecure,
        TIMEOUT,
    )
    .unwrap();
    assert!(session.stream().is_tls());
}

#[test]
fn certificate_for_another_host_is_refused() {
    // A TLS POP3 server whose certificate (signed by the trusted test CA) names only
    // other.example, reached as 127.0.0.1.
    let identity = native_tls::Identity::from_pkcs8(
        &std::fs::read(env("PCR_TEST_OTHER_CERT")).unwrap(),
        &std::fs::read(env("PCR_TEST_OTHER_KEY")).unwrap(),
    )
    .unwrap();
    let acceptor = native_tls::TlsAcceptor::new(identity).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        // The client aborts the handshake; only a completed one would be a failure.
        if let Ok(mut tls) = acceptor.accept(tcp) {
            use std::io::Write;
            let _ = tls.write_all(b"+OK wrong host\r\n");
            return true;
        }
        false
    });
    let err = pop3::connect(
        ACCOUNT,
        "127.0.0.1",
        port,
        SslMode::Ssl,
        &trusted(),
        TIMEOUT,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("does not match the server name"), "{text}");
    assert!(!server.join().unwrap(), "the handshake must not complete");
}

#[test]
fn silent_server_times_out() {
    let _guard = exclusive();
    for ssl in [SslMode::None, SslMode::Ssl] {
        let started = Instant::now();
        let err = pop3::connect(
            ACCOUNT,
            &host(),
            port("PCR_SILENT_PORT"),
            ssl,
            &trusted(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("timed out"), "{ssl:?}: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{ssl:?}: took {:?}",
            started.elapsed()
        );
    }
}
