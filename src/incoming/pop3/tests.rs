//! Protocol tests against the scripted in-memory server of `mock.rs`.

use std::io;

use base64::Engine as _;

use super::mock::MockStream;
use super::*;
use crate::config::Secret;
use crate::incoming::Flow;
use crate::Error;

const PASSWORD: &str = "s3cret-Pa55";
const GREETING: &str = "+OK Dovecot ready.\r\n";
const CAPS_PIPE: &str =
    "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";
const CAPS_NO_PIPE: &str = "+OK\r\nTOP\r\nUIDL\r\nUSER\r\n.\r\n";

type Steps = Vec<(Vec<u8>, Vec<u8>)>;

fn step(send: &str, reply: impl AsRef<[u8]>) -> (Vec<u8>, Vec<u8>) {
    (send.as_bytes().to_vec(), reply.as_ref().to_vec())
}

/// Greeting, CAPA, USER/PASS, CAPA again.
fn login_steps(caps: &str) -> Steps {
    vec![
        step("", GREETING),
        step("CAPA\r\n", caps),
        step("USER alice@test.local\r\n", "+OK\r\n"),
        step(&format!("PASS {PASSWORD}\r\n"), "+OK Logged in.\r\n"),
        step("CAPA\r\n", caps),
    ]
}

fn secret() -> Secret {
    Secret::new(PASSWORD)
}

fn started(mock: &MockStream) -> Pop3Session<MockStream> {
    let mut session = Pop3Session::start(mock.clone(), "7", "pop.test:110").unwrap();
    session.capa().unwrap();
    session
}

/// A logged-in session over `steps` (which must start with a login script).
fn logged_in(mock: &MockStream) -> Pop3Session<MockStream, Transaction> {
    started(mock).login("alice@test.local", &secret()).unwrap()
}

fn mailbox_message(err: &Error) -> String {
    match err {
        Error::Mailbox(f) => {
            assert_eq!(f.account, "7");
            assert_eq!(f.server, "pop.test:110");
            f.message.clone()
        }
        other => panic!("expected a mailbox error, got {other:?}"),
    }
}

#[test]
fn greeting_err_is_a_mailbox_error_with_the_server_text() {
    let mock = MockStream::new(&[step("", "-ERR [SYS/TEMP] too many connections\r\n")]);
    let err = Pop3Session::start(mock.clone(), "7", "pop.test:110").unwrap_err();
    let msg = mailbox_message(&err);
    assert!(msg.contains("refused the session"), "{msg}");
    assert!(msg.contains("[SYS/TEMP] too many connections"), "{msg}");
    mock.assert_sent_only("");
}

#[test]
fn garbage_greeting_is_a_protocol_error() {
    let mock = MockStream::new(&[step("", "220 smtp.example.com ESMTP\r\n")]);
    let err = Pop3Session::start(mock, "7", "pop.test:110").unwrap_err();
    let msg = mailbox_message(&err);
    assert!(msg.contains("unexpected reply"), "{msg}");
    assert!(msg.contains("220 smtp.example.com ESMTP"), "{msg}");
}

#[test]
fn server_text_in_errors_is_sanitized_and_bounded() {
    let long = "x".repeat(5000);
    let mock = MockStream::new(&[step("", format!("-ERR bad\x1b[31m\x07 thing {long}\r\n"))]);
    let msg = mailbox_message(&Pop3Session::start(mock, "7", "pop.test:110").unwrap_err());
    assert!(!msg.chars().any(|c| c.is_control()), "{msg:?}");
    assert!(msg.len() < 400, "{} bytes", msg.len());
    assert!(msg.ends_with('…'), "{msg}");
}

#[test]
fn greeting_closed_immediately_is_an_error() {
    let mock = MockStream::new::<&str, &str>(&[]);
    let msg = mailbox_message(&Pop3Session::start(mock, "7", "pop.test:110").unwrap_err());
    assert!(msg.contains("greeting"), "{msg}");
    assert!(msg.contains("closed the connection"), "{msg}");
}

#[test]
fn capa_is_parsed() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step(
            "CAPA\r\n",
            "+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN login\r\nSTLS\r\n\
             PIPELINING\r\nUIDL\r\nIMPLEMENTATION Test Server 1.0\r\n.\r\n",
        ),
    ]);
    let session = started(&mock);
    let caps = session.capabilities();
    assert!(caps.known);
    assert!(caps.pipelining() && caps.uidl() && caps.stls() && caps.user() && caps.top());
    assert_eq!(caps.sasl(), vec!["PLAIN", "LOGIN"]);
    assert_eq!(caps.implementation().as_deref(), Some("Test Server 1.0"));
    assert_eq!(session.greeting(), "Dovecot ready.");
    mock.assert_done();
}

#[test]
fn capa_unsupported_leaves_capabilities_unknown() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", "-ERR unknown command\r\n"),
        step("USER alice@test.local\r\n", "+OK\r\n"),
        step(&format!("PASS {PASSWORD}\r\n"), "+OK\r\n"),
        step("STAT\r\n", "+OK 2 320\r\n"),
    ]);
    let mut session = logged_in(&mock);
    assert!(!session.capabilities().known);
    assert!(!session.capabilities().pipelining());
    assert_eq!(
        session.stat().unwrap(),
        Stat {
            count: 2,
            size: 320
        }
    );
    mock.assert_done();
}

#[test]
fn status_keywords_are_case_insensitive() {
    let mock = MockStream::new(&[step("", "+ok hello\r\n"), step("NOOP\r\n", "+Ok\r\n")]);
    let mut session = Pop3Session::start(mock.clone(), "7", "pop.test:110").unwrap();
    session.noop().unwrap();
    mock.assert_done();
}

#[test]
fn stls_upgrades_then_rereads_capabilities() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", "+OK\r\nSTLS\r\nUSER\r\n.\r\n"),
        step("STLS\r\n", "+OK Begin TLS negotiation now.\r\n"),
        step("CAPA\r\n", "+OK\r\nUSER\r\nUIDL\r\nPIPELINING\r\n.\r\n"),
        step("USER alice@test.local\r\n", "+OK\r\n"),
        step(&format!("PASS {PASSWORD}\r\n"), "+OK\r\n"),
        step("CAPA\r\n", "+OK\r\nUSER\r\nUIDL\r\nPIPELINING\r\n.\r\n"),
    ]);
    let session = started(&mock);
    let mut upgrader_ran = false;
    let session = session
        .stls(|plain: MockStream| {
            upgrader_ran = true;
            plain.mark_upgraded();
            Ok(plain)
        })
        .unwrap();
    assert!(upgrader_ran);
    assert_eq!(
        mock.upgraded_at(),
        Some("CAPA\r\nSTLS\r\n".len()),
        "TLS must start right after STLS, before anything else is sent"
    );
    assert!(!session.capabilities().stls());
    assert!(session.capabilities().pipelining());
    let session = session.login("alice@test.local", &secret()).unwrap();
    assert!(session.capabilities().uidl());
    mock.assert_done();
}

/// The mock and the error message of STLS answered with `reply`; the upgrader must not run.
fn stls_refused(reply: &str) -> (MockStream, String) {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", "+OK\r\nSTLS\r\n.\r\n"),
        step("STLS\r\n", reply),
    ]);
    let err = started(&mock)
        .stls(|_plain: MockStream| -> io::Result<MockStream> {
            panic!("the upgrader must not run")
        })
        .unwrap_err();
    let msg = mailbox_message(&err);
    (mock, msg)
}

#[test]
fn stls_refused_is_an_error_and_the_upgrader_never_runs() {
    let (mock, msg) = stls_refused("-ERR TLS not available right now\r\n");
    assert!(msg.contains("refused STLS"), "{msg}");
    assert!(msg.contains("TLS not available right now"), "{msg}");
    mock.assert_done();
}

#[test]
fn stls_with_injected_data_after_ok_is_refused() {
    let (_, msg) = stls_refused("+OK Begin TLS\r\n+OK injected\r\n");
    assert!(msg.contains("sent data after agreeing to STLS"), "{msg}");
}

#[test]
fn stls_handshake_failure_is_reported() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", "+OK\r\nSTLS\r\n.\r\n"),
        step("STLS\r\n", "+OK\r\n"),
    ]);
    let err = started(&mock)
        .stls(|_plain: MockStream| -> io::Result<MockStream> {
            Err(io::Error::new(io::ErrorKind::TimedOut, "handshake"))
        })
        .unwrap_err();
    let msg = mailbox_message(&err);
    assert!(msg.contains("starting TLS"), "{msg}");
}

#[test]
fn pass_failure_is_an_auth_error_without_the_password_and_no_quit() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_PIPE),
        step("USER alice@test.local\r\n", "+OK\r\n"),
        step(
            &format!("PASS {PASSWORD}\r\n"),
            format!("-ERR [AUTH] Authentication failed for PASS {PASSWORD}\r\n"),
        ),
        // Pipelined with USER and PASS; after the refusal its reply is not waited for (the
        // session is dropped: some servers close the connection at once).
        step("CAPA\r\n", ""),
    ]);
    let err = started(&mock)
        .login("alice@test.local", &secret())
        .unwrap_err();
    let text = err.to_string();
    let debug = format!("{err:?}");
    match &err {
        Error::Auth { account, message } => {
            assert_eq!(account, "7");
            assert!(message.contains("alice@test.local"), "{message}");
            assert!(message.contains("pop.test:110"), "{message}");
            assert!(
                message.contains("[AUTH] Authentication failed"),
                "{message}"
            );
        }
        other => panic!("expected an auth error, got {other:?}"),
    }
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(!debug.contains(PASSWORD), "{debug}");
    // Nothing after the failed login: no QUIT, no retry.
    mock.assert_done();
}

#[test]
fn user_rejected_is_an_auth_error() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_NO_PIPE),
        step("USER nobody\r\n", "-ERR no such user\r\n"),
    ]);
    let err = started(&mock).login("nobody", &secret()).unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    mock.assert_done();
}

#[test]
fn in_use_on_pass_is_a_mailbox_error_not_a_password_error() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_NO_PIPE),
        step("USER alice@test.local\r\n", "+OK\r\n"),
        step(
            &format!("PASS {PASSWORD}\r\n"),
            "-ERR [IN-USE] Mailbox is locked by another session\r\n",
        ),
    ]);
    let err = started(&mock)
        .login("alice@test.local", &secret())
        .unwrap_err();
    let msg = mailbox_message(&err);
    assert!(msg.contains("[IN-USE]"), "{msg}");
    assert!(!msg.contains(PASSWORD), "{msg}");
}

#[test]
fn auth_plain_is_used_when_user_is_not_offered() {
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("\0alice@test.local\0{PASSWORD}"));
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", "+OK\r\nSASL PLAIN\r\nUIDL\r\n.\r\n"),
        step(&format!("AUTH PLAIN {token}\r\n"), "+OK Logged in\r\n"),
        step("CAPA\r\n", "+OK\r\nSASL PLAIN\r\nUIDL\r\n.\r\n"),
    ]);
    logged_in(&mock);
    mock.assert_done();
}

#[test]
fn auth_plain_failure_hides_password_and_token() {
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("\0alice@test.local\0{PASSWORD}"));
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", "+OK\r\nSASL PLAIN\r\n.\r\n"),
        step(
            &format!("AUTH PLAIN {token}\r\n"),
            format!("-ERR [AUTH] bad credentials {token}\r\n"),
        ),
    ]);
    let err = started(&mock)
        .login("alice@test.local", &secret())
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(!text.contains(PASSWORD) && !text.contains(&token), "{text}");
}

#[test]
fn line_breaks_in_credentials_are_refused_before_sending() {
    let mock = MockStream::new(&[step("", GREETING), step("CAPA\r\n", CAPS_NO_PIPE)]);
    let err = started(&mock)
        .login("alice@test.local", &Secret::new("pw\r\nDELE 1"))
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(!err.to_string().contains("DELE 1"), "{err}");
    let err = started(&MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_NO_PIPE),
    ]))
    .login("alice\r\nDELE 1", &secret())
    .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    mock.assert_done();
}

#[test]
fn stat_list_uidl_are_parsed() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("STAT\r\n", "+OK 3 4567\r\n"));
    steps.push(step(
        "LIST\r\n",
        "+OK 3 messages\r\n1 120\r\n2 4000 extra\r\n3 447\r\n.\r\n",
    ));
    steps.push(step(
        "UIDL\r\n",
        "+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n3 000000015a4b1c3d\r\n.\r\n",
    ));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    assert_eq!(
        s.stat().unwrap(),
        Stat {
            count: 3,
            size: 4567
        }
    );
    assert_eq!(
        s.list().unwrap(),
        vec![
            ListEntry {
                number: 1,
                size: 120
            },
            ListEntry {
                number: 2,
                size: 4000
            },
            ListEntry {
                number: 3,
                size: 447
            },
        ]
    );
    let uidl = s.uidl().unwrap();
    assert_eq!(uidl.len(), 3);
    assert_eq!(uidl[1].number, 2);
    assert_eq!(uidl[1].uid, "QhdPYR:00WBw1Ph7x7");
    mock.assert_done();
}

#[test]
fn with_pipelining_login_and_listing_take_one_write_each() {
    let mut steps = login_steps(CAPS_PIPE);
    steps.push(step(
        "UIDL\r\nLIST\r\n",
        "+OK\r\n1 aaa\r\n2 bbb\r\n.\r\n+OK 2 messages\r\n1 120\r\n2 4000\r\n.\r\n",
    ));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    // USER, PASS and CAPA were in flight together.
    assert_eq!(mock.max_in_flight(), 3);
    let (uidls, sizes) = s.uidl_and_list().unwrap();
    assert_eq!(
        uidls.iter().map(|u| u.uid.as_str()).collect::<Vec<_>>(),
        ["aaa", "bbb"]
    );
    assert_eq!(
        sizes.iter().map(|e| e.size).collect::<Vec<_>>(),
        [120, 4000]
    );
    mock.assert_done();
}

#[test]
fn a_refused_uidl_is_an_error_after_both_replies_were_read() {
    let mut steps = login_steps(CAPS_PIPE);
    steps.push(step(
        "UIDL\r\nLIST\r\n",
        "-ERR no UIDL here\r\n+OK 1 message\r\n1 120\r\n.\r\n",
    ));
    steps.push(step("NOOP\r\n", "+OK\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let msg = mailbox_message(&s.uidl_and_list().unwrap_err());
    assert!(msg.contains("no UIDL here"), "{msg}");
    // In step with the server: the session goes on.
    s.noop().unwrap();
    mock.assert_done();
}

#[test]
fn without_pipelining_login_is_one_command_at_a_time() {
    let steps = login_steps(CAPS_NO_PIPE);
    let mock = MockStream::new(&steps).lockstep();
    logged_in(&mock);
    mock.assert_done();
}

#[test]
fn empty_maildrop_lists_nothing() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("LIST\r\n", "+OK 0 messages\r\n.\r\n"));
    steps.push(step("UIDL\r\n", "+OK\r\n.\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    assert!(s.list().unwrap().is_empty());
    assert!(s.uidl().unwrap().is_empty());
    s.retr_many(&[], 1000).unwrap();
    mock.assert_done();
}

#[test]
fn malformed_uidl_line_is_a_protocol_error() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("UIDL\r\n", "+OK\r\n1 good\r\nbroken-line\r\n.\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let msg = mailbox_message(&s.uidl().unwrap_err());
    assert!(msg.contains("UIDL") && msg.contains("broken-line"), "{msg}");
}

/// A message with folded headers, 8-bit bytes (Latin-1 and UTF-8), dot lines and a trailing
/// space; `wire` is what the server sends, `exact` what must come back.
fn tricky_message() -> (Vec<u8>, Vec<u8>) {
    let mut exact = Vec::new();
    exact.extend_from_slice(b"Received: from mx.example.org\r\n\tby pop.test with ESMTP;\r\n");
    exact.extend_from_slice(b"Subject: =?UTF-8?Q?Caf=C3=A9?=\r\n  continued subject \r\n");
    exact.extend_from_slice(b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n");
    exact.extend_from_slice(b"Caf\xe9 cr\xe8me \xc3\xa9\r\n");
    exact.extend_from_slice(b".\r\n");
    exact.extend_from_slice(b"..two dots\r\n");
    exact.extend_from_slice(b".leading dot\r\n");
    exact.extend_from_slice(b"\r\n");
    exact.extend_from_slice(b"end with NUL \x00 and CR\r inside\r\n");
    let mut wire = Vec::new();
    for line in exact.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    (wire, exact)
}

#[test]
fn retr_unstuffs_dots_and_keeps_8bit_and_folding_byte_exact() {
    let (wire, exact) = tricky_message();
    let mut reply = b"+OK 300 octets\r\n".to_vec();
    reply.extend_from_slice(&wire);
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("RETR 1\r\n", &reply));
    steps.push(step("NOOP\r\n", "+OK\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let body = s.retr(1, 10_000).unwrap();
    assert_eq!(body, exact);
    // The stream is still in sync after the message.
    s.noop().unwrap();
    mock.assert_done();
}

#[test]
fn whole_session_works_with_one_byte_reads() {
    let (wire, exact) = tricky_message();
    let mut reply = b"+OK\r\n".to_vec();
    reply.extend_from_slice(&wire);
    let mut steps = login_steps(CAPS_PIPE);
    steps.push(step("UIDL\r\n", "+OK\r\n1 a1\r\n2 b2\r\n.\r\n"));
    steps.push(step("RETR 1\r\n", &reply));
    steps.push(step("RETR 2\r\n", &reply));
    steps.push(step("QUIT\r\n", "+OK Logging out.\r\n"));
    let mock = MockStream::new(&steps).chunked(1);
    let mut s = logged_in(&mock);
    assert_eq!(s.uidl().unwrap().len(), 2);
    let got = s.retr_many(&[1, 2], 10_000).unwrap();
    assert_eq!(got, vec![(1, Ok(exact.clone())), (2, Ok(exact))]);
    s.quit().unwrap();
    mock.assert_done();
}

#[test]
fn bare_lf_is_tolerated_and_kept() {
    let wire = b"Subject: lf only\nX-Mixed: yes\r\n\n.stuffed\nbody\n.\n";
    let exact = b"Subject: lf only\nX-Mixed: yes\r\n\nstuffed\nbody\n";
    let mut reply = b"+OK\n".to_vec();
    reply.extend_from_slice(wire);
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("RETR 4\r\n", &reply));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    assert_eq!(s.retr(4, 10_000).unwrap(), exact.to_vec());
    mock.assert_done();
}

#[test]
fn very_long_lines_are_fine_within_max_bytes() {
    let line = vec![b'a'; 200_000];
    let mut exact = b"Subject: long\r\n\r\n".to_vec();
    exact.extend_from_slice(&line);
    exact.extend_from_slice(b"\r\n");
    let mut reply = b"+OK\r\n".to_vec();
    reply.extend_from_slice(&exact);
    reply.extend_from_slice(b".\r\n");
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("RETR 1\r\n", &reply));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    assert_eq!(s.retr(1, exact.len() as u64).unwrap(), exact);
    mock.assert_done();
}

#[test]
fn max_bytes_exceeded_is_an_error_without_buffering_everything() {
    // 20 MB on one line, no terminator in sight.
    let mut reply = b"+OK\r\n".to_vec();
    reply.extend(std::iter::repeat_n(b'x', 20_000_000));
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("RETR 1\r\n", &reply));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let msg = mailbox_message(&s.retr(1, 1000).unwrap_err());
    assert!(
        msg.contains("RETR 1") && msg.contains("limit of 1000 bytes"),
        "{msg}"
    );
    assert!(
        mock.bytes_read() < 1_000_000,
        "read {} bytes of an oversized message",
        mock.bytes_read()
    );
    assert!(s.poisoned().is_some());
}

#[test]
fn max_bytes_is_checked_after_unstuffing_at_the_boundary() {
    let exact = b"0123456789\r\n.x\r\n".to_vec(); // 16 bytes
    let mut reply = b"+OK\r\n0123456789\r\n..x\r\n.\r\n".to_vec();
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("RETR 1\r\n", &reply));
    reply = b"+OK\r\n0123456789\r\n..xy\r\n.\r\n".to_vec();
    steps.push(step("RETR 2\r\n", &reply));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    assert_eq!(s.retr(1, 16).unwrap(), exact);
    let err = s.retr(2, 16).unwrap_err();
    assert!(mailbox_message(&err).contains("limit of 16 bytes"));
}

#[test]
fn connection_closed_mid_message_is_an_error_not_a_truncated_mail() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step(
        "RETR 1\r\n",
        "+OK\r\nSubject: cut\r\n\r\nfirst half of the bo",
    ));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let msg = mailbox_message(&s.retr(1, 10_000).unwrap_err());
    assert!(msg.contains("closed the connection in the middle"), "{msg}");
    // Poisoned: QUIT refused without touching the wire.
    assert!(s.poisoned().is_some());
    let err = s.quit().unwrap_err();
    assert!(mailbox_message(&err).contains("unusable"), "{err}");
    mock.assert_done();
}

#[test]
fn closed_mid_message_in_a_pipelined_batch_reports_the_earlier_ones() {
    let mut steps = login_steps(CAPS_PIPE);
    steps.push(step("RETR 1\r\n", "+OK\r\none\r\n.\r\n"));
    steps.push(step("RETR 2\r\n", "+OK\r\ntwo, cut"));
    steps.push(step("RETR 3\r\n", ""));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let mut seen = Vec::new();
    let err = s
        .retr_each(&[1, 2, 3], 1000, |n, r| seen.push((n, r)))
        .unwrap_err();
    assert_eq!(seen, vec![(1, Ok(b"one\r\n".to_vec()))]);
    assert!(mailbox_message(&err).contains("RETR 2"), "{err}");
}

#[test]
fn read_timeout_mid_response_says_timed_out() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("RETR 1\r\n", "+OK\r\nSubject: slow\r\n"));
    let mock = MockStream::new(&steps).then_error(io::ErrorKind::WouldBlock);
    let mut s = logged_in(&mock);
    let msg = mailbox_message(&s.retr(1, 10_000).unwrap_err());
    assert!(msg.contains("timed out") && msg.contains("RETR 1"), "{msg}");
}

#[test]
fn pipelined_retr_keeps_order_with_mixed_ok_and_err() {
    let mut steps = login_steps(CAPS_PIPE);
    steps.push(step("RETR 3\r\n", "+OK\r\nmsg three\r\n.\r\n"));
    steps.push(step("RETR 1\r\n", "-ERR [SYS/TEMP] message 1 is gone\r\n"));
    steps.push(step("RETR 2\r\n", "+OK\r\n..msg two\r\n.\r\n"));
    steps.push(step("RETR 9\r\n", "-ERR no such message\r\n"));
    steps.push(step("NOOP\r\n", "+OK\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let got = s.retr_many(&[3, 1, 2, 9], 1000).unwrap();
    assert_eq!(
        got,
        vec![
            (3, Ok(b"msg three\r\n".to_vec())),
            (1, Err("[SYS/TEMP] message 1 is gone".to_string())),
            (2, Ok(b".msg two\r\n".to_vec())),
            (9, Err("no such message".to_string())),
        ]
    );
    assert_eq!(
        mock.max_in_flight(),
        4,
        "all four RETRs go out before any reply is read"
    );
    s.noop().unwrap();
    mock.assert_done();
}

#[test]
fn pipelining_is_bounded_by_the_window() {
    let numbers: Vec<u32> = (1..=(PIPELINE_WINDOW as u32 * 2 + 7)).collect();
    let mut steps = login_steps(CAPS_PIPE);
    for n in &numbers {
        steps.push(step(
            &format!("RETR {n}\r\n"),
            format!("+OK\r\nSubject: {n}\r\n\r\nbody {n}\r\n.\r\n"),
        ));
    }
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let mut order = Vec::new();
    s.retr_each(&numbers, 1000, |n, r| {
        let body = r.unwrap();
        assert_eq!(
            body,
            format!("Subject: {n}\r\n\r\nbody {n}\r\n").into_bytes()
        );
        order.push(n);
    })
    .unwrap();
    assert_eq!(order, numbers);
    assert_eq!(mock.max_in_flight(), PIPELINE_WINDOW);
    mock.assert_done();
}

#[test]
fn the_byte_window_bounds_what_is_asked_for_and_refills_without_a_stall() {
    let mut steps = login_steps(CAPS_PIPE);
    for n in 1..=6 {
        steps.push(step(
            &format!("RETR {n}\r\n"),
            format!("+OK\r\nm{n}\r\n.\r\n"),
        ));
    }
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    mock.reset_max_in_flight();
    let mut order = Vec::new();
    // 100 bytes each, 250 in flight at most: 2 at a time, refilled when half has arrived.
    s.retr_stream(&[1, 2, 3, 4, 5, 6], 1000, &|_| 100, 250, |n, r| {
        assert!(r.is_ok());
        order.push(n);
        Flow::Continue
    })
    .unwrap();
    assert_eq!(order, [1, 2, 3, 4, 5, 6]);
    assert_eq!(mock.max_in_flight(), 2);
    mock.assert_done();
}

#[test]
fn a_stop_asks_for_nothing_more_and_reads_what_was_on_its_way() {
    let mut steps = login_steps(CAPS_PIPE);
    steps.push(step(
        "RETR 1\r\nRETR 2\r\n",
        "+OK\r\nm1\r\n.\r\n+OK\r\nm2\r\n.\r\n",
    ));
    steps.push(step("NOOP\r\n", "+OK\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let mut seen = Vec::new();
    s.retr_stream(&[1, 2, 3, 4], 1000, &|_| 100, 250, |n, _| {
        seen.push(n);
        Flow::Stop
    })
    .unwrap();
    assert_eq!(seen, [1]);
    // RETR 3 and 4 were never sent, RETR 2's reply was drained: the session is in step.
    s.noop().unwrap();
    mock.assert_done();
}

#[test]
fn without_pipelining_commands_go_one_by_one() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    for n in 1..=5 {
        steps.push(step(
            &format!("RETR {n}\r\n"),
            format!("+OK\r\nm{n}\r\n.\r\n"),
        ));
    }
    for n in 1..=5 {
        steps.push(step(&format!("DELE {n}\r\n"), "+OK\r\n"));
    }
    let mock = MockStream::new(&steps).lockstep();
    let mut s = logged_in(&mock);
    let got = s.retr_many(&[1, 2, 3, 4, 5], 100).unwrap();
    assert!(got.iter().all(|(_, r)| r.is_ok()));
    let deleted = s.dele_many(&[1, 2, 3, 4, 5]).unwrap();
    assert!(deleted.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(mock.max_in_flight(), 1);
    mock.assert_done();
}

#[test]
fn top_many_fetches_headers_only() {
    let mut steps = login_steps(CAPS_PIPE);
    steps.push(step("TOP 1 0\r\n", "+OK\r\nSubject: big\r\n\r\n.\r\n"));
    steps.push(step("TOP 2 0\r\n", "-ERR no such message\r\n"));
    steps.push(step("TOP 5 0\r\n", "+OK\r\nSubject: huge\r\n\r\n.\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let got = s.top(1, 0, 1000);
    assert_eq!(got.unwrap(), b"Subject: big\r\n\r\n".to_vec());
    let got = s.top_many(&[2, 5], 1000).unwrap();
    assert_eq!(got[0], (2, Err("no such message".to_string())));
    assert_eq!(got[1], (5, Ok(b"Subject: huge\r\n\r\n".to_vec())));
    mock.assert_done();
}

#[test]
fn err_reply_does_not_poison_the_session() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("RETR 42\r\n", "-ERR There's no message 42.\r\n"));
    steps.push(step("DELE 42\r\n", "-ERR There's no message 42.\r\n"));
    steps.push(step("RETR 1\r\n", "+OK\r\nok\r\n.\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let msg = mailbox_message(&s.retr(42, 100).unwrap_err());
    assert!(
        msg.contains("refused RETR 42") && msg.contains("no message 42"),
        "{msg}"
    );
    assert!(s.dele(42).is_err());
    assert!(s.poisoned().is_none());
    assert_eq!(s.retr(1, 100).unwrap(), b"ok\r\n");
    mock.assert_done();
}

#[test]
fn garbage_reply_poisons_and_later_calls_fail_fast() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("DELE 1\r\n", "* OK this is IMAP\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    let msg = mailbox_message(&s.dele(1).unwrap_err());
    assert!(msg.contains("unexpected reply"), "{msg}");
    // Nothing more reaches the wire: no RSET, no NOOP, no QUIT.
    assert!(s.rset().is_err());
    assert!(s.noop().is_err());
    assert!(s.quit().is_err());
    mock.assert_done();
}

#[test]
fn dropping_a_session_never_sends_quit() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("DELE 1\r\n", "+OK Marked to be deleted.\r\n"));
    steps.push(step("DELE 2\r\n", "+OK Marked to be deleted.\r\n"));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    s.dele(1).unwrap();
    s.dele(2).unwrap();
    drop(s);
    mock.assert_done();
    assert!(!mock.written_str().contains("QUIT"));
}

#[test]
fn dropping_an_unauthenticated_session_never_sends_quit() {
    let mock = MockStream::new(&[step("", GREETING), step("CAPA\r\n", CAPS_NO_PIPE)]);
    drop(started(&mock));
    mock.assert_done();
}

#[test]
fn quit_commits_and_reports_a_failed_update() {
    let mut steps = login_steps(CAPS_NO_PIPE);
    steps.push(step("DELE 1\r\n", "+OK\r\n"));
    steps.push(step("RSET\r\n", "+OK\r\n"));
    steps.push(step("DELE 2\r\n", "+OK\r\n"));
    steps.push(step(
        "QUIT\r\n",
        "-ERR some deleted messages not removed\r\n",
    ));
    let mock = MockStream::new(&steps);
    let mut s = logged_in(&mock);
    s.dele(1).unwrap();
    s.rset().unwrap();
    s.dele(2).unwrap();
    let msg = mailbox_message(&s.quit().unwrap_err());
    assert!(
        msg.contains("QUIT failed") && msg.contains("not removed"),
        "{msg}"
    );
    mock.assert_done();
}

#[test]
fn debug_output_names_no_secret() {
    let mock = MockStream::new(&login_steps(CAPS_NO_PIPE));
    let s = logged_in(&mock);
    let debug = format!("{s:?}");
    assert!(
        debug.contains("transaction") && debug.contains("pop.test:110"),
        "{debug}"
    );
    assert!(!debug.contains(PASSWORD));
}

#[test]
fn connect_with_tls_refuses_a_server_without_stls() {
    use std::io::BufRead;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = io::BufReader::new(stream);
        writer.write_all(b"+OK plain-only server\r\n").unwrap();
        let mut received = Vec::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if line == "CAPA\r\n" {
                writer.write_all(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n").unwrap();
            } else {
                writer.write_all(b"-ERR what?\r\n").unwrap();
            }
            received.push(std::mem::take(&mut line));
        }
        received
    });
    let err = connect(
        "master",
        "127.0.0.1",
        port,
        SslMode::StartTls,
        &TlsSettings::default(),
        Duration::from_secs(5),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("does not offer STLS"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert_eq!(server.join().unwrap(), vec!["CAPA\r\n".to_string()]);
}

#[test]
fn connect_to_a_closed_port_says_connection_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = connect(
        "12",
        "127.0.0.1",
        port,
        SslMode::None,
        &TlsSettings::default(),
        Duration::from_secs(5),
    )
    .unwrap_err();
    let msg = match &err {
        Error::Mailbox(f) => {
            assert_eq!(f.account, "12");
            f.message.clone()
        }
        other => panic!("{other:?}"),
    };
    assert!(msg.contains("connection refused"), "{msg}");
}

#[test]
fn connect_with_unreadable_ca_file_names_account_and_key() {
    let tls = TlsSettings {
        verify_cert: true,
        ca_file: Some("/nonexistent/ca.pem".into()),
    };
    let err = connect(
        "12",
        "127.0.0.1",
        1,
        SslMode::Ssl,
        &tls,
        Duration::from_secs(1),
    )
    .unwrap_err();
    match err {
        Error::Config { location, .. } => {
            assert_eq!(location.account.as_deref(), Some("12"));
            assert_eq!(location.key.as_deref(), Some("CA_FILE"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sessions_can_move_to_worker_threads() {
    // Mailboxes are read concurrently: a session over a real connection must be `Send`.
    fn assert_send<T: Send>() {}
    assert_send::<Pop3Session<MaybeTls, Authorization>>();
    assert_send::<Pop3Session<MaybeTls, Transaction>>();
}
