//! The SMTP transport against the local aiosmtpd servers (`scripts/test-servers.sh start`):
//! STARTTLS+AUTH, implicit TLS+AUTH, plain, a wrong-host certificate and a silent port.
//! What the server saved is compared byte for byte with what was built.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use mail_parser::{MessageParser, MimeHeaders};
use pcr_email::config::{
    Account, AccountId, AccountType, Outgoing, Secret, SslMode, TlsSettings, TransportType,
};
use pcr_email::outgoing::message::{build, BuiltMessage, MessageRequest};
use pcr_email::outgoing::smtp::SmtpTransport;
use pcr_email::outgoing::{send_batch, transport_for, BatchJob, Transport};
use pcr_email::Error;
use serde_json::json;

const KEY: [u8; 32] = [42u8; 32];
const WAIT: Duration = Duration::from_secs(10);

struct Opts {
    port: u16,
    ssl: SslMode,
    host: String,
    password: Option<String>,
    ca: bool,
    verify: bool,
    timeout: Duration,
}

fn opts(port_var: &str, ssl: SslMode) -> Opts {
    Opts {
        port: port(port_var),
        ssl,
        host: tls_host(),
        password: Some(env("PCR_SMTP_PASS")),
        ca: true,
        verify: true,
        timeout: Duration::from_secs(10),
    }
}

fn account(o: &Opts) -> Account {
    Account {
        id: AccountId::Tenant(77),
        tenants_recid: 3,
        account_type: AccountType::ServiceDesk,
        email: "helpdesk@test.local".into(),
        display_name: Some("Help Désk".into()),
        login: Some(env("PCR_SMTP_USER")),
        password: o.password.clone().map(Secret::new),
        outgoing: Some(Outgoing {
            transport: TransportType::Smtp,
            host: Some(o.host.clone()),
            port: o.port,
            ssl: o.ssl,
        }),
        incoming: None,
        sysadmin: None,
        tls: TlsSettings {
            verify_cert: o.verify,
            ca_file: o.ca.then(ca_file),
        },
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/nonexistent"),
        timeout: o.timeout,
        auth_type: Default::default(),
        oauth: None,
    }
}

fn message(to: serde_json::Value, token: &str) -> BuiltMessage {
    let req = MessageRequest::from_json(&json!({
        "to": to,
        "subject": format!("Grüße {token}"),
        "text": format!("body {token}\n.leading dot line\n"),
    }))
    .unwrap();
    build(
        &req,
        &account(&opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls)),
        &KEY,
    )
    .unwrap()
}

fn transport_error(err: Error) -> pcr_email::error::TransportFailure {
    match err {
        Error::Transport(f) => f,
        other => panic!("expected a transport error, got {other:?}"),
    }
}

/// The server saves the DATA as received; our raw message always ends with CRLF.
fn assert_same_bytes(received: &ReceivedMail, built: &BuiltMessage) {
    assert!(built.raw.ends_with(b"\r\n"));
    assert!(
        received.raw == built.raw,
        "delivered bytes differ:\n--- built\n{}\n--- received\n{}",
        String::from_utf8_lossy(&built.raw),
        received.text()
    );
}

fn peer_port(m: &ReceivedMail) -> u64 {
    let json = std::fs::read_to_string(m.eml_path.with_extension("json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&json).unwrap();
    meta["peer"][1]
        .as_u64()
        .expect("peer port in the server's record")
}

#[test]
fn starttls_auth_delivers_the_exact_message_with_attachments() {
    let o = opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls);
    let token = unique_token("starttls");
    let png: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let tmp = tempfile::tempdir().unwrap();
    let pdf = tmp.path().join("Bericht März.pdf");
    std::fs::write(&pdf, b"%PDF-1.4\n\x00\x01\xfe\xff binary\r\n.\r\n").unwrap();
    use base64::Engine;
    let req = MessageRequest::from_json(&json!({
        "to": ["\"Doe, Jane\" <jane@test.local>", {"email": "joe@test.local", "name": "Jöe"}],
        "cc": "copy@test.local",
        "bcc": "hidden@test.local",
        "reply_to": "replies@test.local",
        "subject": format!("Ticket ✓ Grüße {token}"),
        "text": format!("Plain {token}\n.starts with a dot\n"),
        "html": format!("<p>HTML {token} <img src=\"cid:logo@pcr\"></p>"),
        "attachments": [
            {"path": pdf.to_str().unwrap()},
            {"content_base64": base64::engine::general_purpose::STANDARD.encode(&png),
             "filename": "logo.png", "content_type": "image/png",
             "inline": true, "content_id": "logo@pcr"},
        ],
        "headers": {"X-PCR-Test": token.clone()},
    }))
    .unwrap();
    let acc = account(&o);
    let built = build(&req, &acc, &KEY).unwrap();
    let transport = SmtpTransport::new(&acc).unwrap();
    let delivery = transport.send(&built).unwrap();
    assert_eq!(delivery.status.as_str(), "sent");
    assert_eq!(delivery.server, format!("{}:{}", o.host, o.port));

    let got = smtp_wait_containing(o.port, &token, WAIT);
    assert_same_bytes(&got, &built);
    assert!(got.tls, "delivered over TLS");
    assert_eq!(
        got.auth_user.as_deref(),
        Some(env("PCR_SMTP_USER").as_str())
    );
    assert_eq!(got.mail_from, "helpdesk@test.local");
    let rcpts: HashSet<&str> = got.rcpt_tos.iter().map(String::as_str).collect();
    let want: HashSet<&str> = [
        "jane@test.local",
        "joe@test.local",
        "copy@test.local",
        "hidden@test.local",
    ]
    .into();
    assert_eq!(rcpts, want);
    assert!(got.header("Bcc").is_none());
    assert!(!got.text().contains("hidden@test.local"));

    let parsed = MessageParser::default().parse(&got.raw).unwrap();
    assert_eq!(
        parsed.subject(),
        Some(format!("Ticket ✓ Grüße {token}").as_str())
    );
    let from = parsed.from().unwrap().first().unwrap();
    assert_eq!(
        (from.name(), from.address()),
        (Some("Help Désk"), Some("helpdesk@test.local"))
    );
    let to: Vec<(Option<&str>, Option<&str>)> = parsed
        .to()
        .unwrap()
        .iter()
        .map(|a| (a.name(), a.address()))
        .collect();
    assert_eq!(
        to,
        vec![
            (Some("Doe, Jane"), Some("jane@test.local")),
            (Some("Jöe"), Some("joe@test.local"))
        ]
    );
    assert_eq!(
        parsed.reply_to().unwrap().first().unwrap().address(),
        Some("replies@test.local")
    );
    assert!(parsed.body_text(0).unwrap().contains(".starts with a dot"));
    assert!(parsed.body_html(0).unwrap().contains("cid:logo@pcr"));
    let attachment = parsed
        .attachments()
        .find(|a| a.attachment_name() == Some("Bericht März.pdf"))
        .expect("the PDF");
    assert_eq!(
        attachment.contents(),
        std::fs::read(&pdf).unwrap().as_slice()
    );
    let inline = parsed
        .attachments()
        .find(|a| a.content_id() == Some("logo@pcr"))
        .expect("the inline image");
    assert_eq!(inline.contents(), png.as_slice());
    assert_eq!(got.header("X-PCR-Test").as_deref(), Some(token.as_str()));
    assert_eq!(
        got.header("Message-ID").as_deref(),
        Some(built.message_id.as_str())
    );
}

#[test]
fn implicit_tls_auth_delivers() {
    let o = opts("PCR_SMTP_TLS_PORT", SslMode::Ssl);
    let token = unique_token("implicit");
    let built = message(json!("dest@test.local"), &token);
    let transport = transport_for(&account(&o), &no_oauth()).unwrap();
    assert_eq!(
        transport.describe(),
        format!("SMTP {}:{} (SSL)", o.host, o.port)
    );
    transport.send(&built).unwrap();
    let got = smtp_wait_containing(o.port, &token, WAIT);
    assert_same_bytes(&got, &built);
    assert!(got.tls);
    assert_eq!(got.rcpt_tos, vec!["dest@test.local".to_string()]);
    let parsed = MessageParser::default().parse(&got.raw).unwrap();
    assert_eq!(parsed.subject(), Some(format!("Grüße {token}").as_str()));
}

#[test]
fn plain_relay_and_plain_auth_ports() {
    let mut o = opts("PCR_SMTP_PLAIN_PORT", SslMode::None);
    o.password = None;
    let token = unique_token("plain");
    let built = message(json!("dest@test.local"), &token);
    SmtpTransport::new(&account(&o))
        .unwrap()
        .send(&built)
        .unwrap();
    let got = smtp_wait_containing(o.port, &token, WAIT);
    assert_same_bytes(&got, &built);
    assert!(!got.tls && got.auth_user.is_none());

    let o = opts("PCR_SMTP_PLAINAUTH_PORT", SslMode::None);
    let token = unique_token("plainauth");
    let built = message(json!("dest@test.local"), &token);
    SmtpTransport::new(&account(&o))
        .unwrap()
        .send(&built)
        .unwrap();
    let got = smtp_wait_containing(o.port, &token, WAIT);
    assert_eq!(
        got.auth_user.as_deref(),
        Some(env("PCR_SMTP_USER").as_str())
    );
}

#[test]
fn wrong_password_is_permanent_535_and_never_shows_the_password() {
    for (var, ssl) in [
        ("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls),
        ("PCR_SMTP_TLS_PORT", SslMode::Ssl),
    ] {
        let mut o = opts(var, ssl);
        let wrong = "Wr0ng-Passw0rd-xyzzy";
        o.password = Some(wrong.into());
        let acc = account(&o);
        let transport = SmtpTransport::new(&acc).unwrap();
        let token = unique_token("wrongpw");
        let err = transport
            .send(&message(json!("dest@test.local"), &token))
            .unwrap_err();
        let shown = format!("{err} {err:?} {transport:?}");
        let f = transport_error(err.clone());
        assert_eq!(f.code, Some(535), "{err}");
        assert!(!f.transient, "{err}");
        assert_eq!(f.account, "77");
        assert_eq!(f.server, format!("{}:{}", o.host, o.port));
        assert!(
            f.message.contains("authentication as user@test.local"),
            "{err}"
        );
        use base64::Engine;
        for secret in [
            wrong.to_string(),
            base64::engine::general_purpose::STANDARD.encode(wrong),
            base64::engine::general_purpose::STANDARD
                .encode(format!("\0{}\0{wrong}", env("PCR_SMTP_USER"))),
        ] {
            assert!(!shown.contains(&secret), "secret leaked: {shown}");
        }
        let check = transport.check().unwrap_err();
        assert!(check.to_string().contains("535"), "{check}");
        assert!(!format!("{check} {check:?}").contains(wrong));
    }
}

#[test]
fn refused_recipient_is_permanent_550_and_nobody_gets_the_message() {
    let o = opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls);
    let transport = SmtpTransport::new(&account(&o)).unwrap();
    let token = unique_token("reject");
    let err = transport
        .send(&message(json!("reject-me@test.local"), &token))
        .unwrap_err();
    let f = transport_error(err);
    assert_eq!(f.code, Some(550));
    assert!(!f.transient);
    assert!(f.message.contains("reject-me@test.local"), "{}", f.message);

    // One good and one refused recipient: all or nothing, and the transport still works.
    let token2 = unique_token("reject-mixed");
    let err = transport
        .send(&message(
            json!(["good@test.local", "reject-2@test.local"]),
            &token2,
        ))
        .unwrap_err();
    assert_eq!(transport_error(err).code, Some(550));
    let token3 = unique_token("after-reject");
    transport
        .send(&message(json!("good@test.local"), &token3))
        .unwrap();
    smtp_wait_containing(o.port, &token3, WAIT);
    assert!(smtp_containing(o.port, &token).is_empty());
    assert!(
        smtp_containing(o.port, &token2).is_empty(),
        "partial delivery"
    );
}

#[test]
fn temporary_failures_are_transient_451() {
    let o = opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls);
    let transport = SmtpTransport::new(&account(&o)).unwrap();
    let err = transport
        .send(&message(
            json!("tempfail-1@test.local"),
            &unique_token("t1"),
        ))
        .unwrap_err();
    let f = transport_error(err);
    assert_eq!((f.code, f.transient), (Some(451), true), "{f:?}");

    let err = transport
        .send(&message(
            json!("datatempfail-1@test.local"),
            &unique_token("t2"),
        ))
        .unwrap_err();
    let f = transport_error(err);
    assert_eq!((f.code, f.transient), (Some(451), true), "{f:?}");
    assert!(f.message.contains("message refused"), "{}", f.message);

    let err = transport
        .send(&message(
            json!("datafail-1@test.local"),
            &unique_token("t3"),
        ))
        .unwrap_err();
    let f = transport_error(err);
    assert_eq!((f.code, f.transient), (Some(554), false), "{f:?}");
}

#[test]
fn silent_server_times_out_within_the_account_timeout() {
    for ssl in [SslMode::StartTls, SslMode::Ssl, SslMode::None] {
        let mut o = opts("PCR_SILENT_PORT", ssl);
        o.timeout = Duration::from_secs(2);
        let transport = SmtpTransport::new(&account(&o)).unwrap();
        let started = Instant::now();
        let err = transport
            .send(&message(json!("dest@test.local"), &unique_token("silent")))
            .unwrap_err();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(5),
            "{ssl:?}: {elapsed:?}"
        );
        let f = transport_error(err);
        assert!(f.transient, "{f:?}");
        let expected = match ssl {
            SslMode::Ssl => "TLS handshake timed out after 2 s",
            _ => "timed out after 2 s at the greeting",
        };
        assert!(f.message.contains(expected), "{ssl:?}: {}", f.message);
    }
}

#[test]
fn certificate_for_another_host_fails_unless_verification_is_off() {
    let o = opts("PCR_SMTP_WRONGHOST_PORT", SslMode::Ssl);
    let err = SmtpTransport::new(&account(&o))
        .unwrap()
        .send(&message(
            json!("dest@test.local"),
            &unique_token("wronghost"),
        ))
        .unwrap_err();
    let f = transport_error(err);
    assert!(!f.transient, "{f:?}");
    assert!(f.message.contains("does not match"), "{}", f.message);

    let mut o = opts("PCR_SMTP_WRONGHOST_PORT", SslMode::Ssl);
    o.verify = false;
    o.ca = false;
    let token = unique_token("wronghost-ok");
    SmtpTransport::new(&account(&o))
        .unwrap()
        .send(&message(json!("dest@test.local"), &token))
        .unwrap();
    smtp_wait_containing(o.port, &token, WAIT);
}

#[test]
fn untrusted_certificate_without_ca_file_is_refused() {
    for (var, ssl) in [
        ("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls),
        ("PCR_SMTP_TLS_PORT", SslMode::Ssl),
    ] {
        let mut o = opts(var, ssl);
        o.ca = false;
        let err = SmtpTransport::new(&account(&o))
            .unwrap()
            .send(&message(json!("dest@test.local"), &unique_token("noca")))
            .unwrap_err();
        let f = transport_error(err);
        assert!(!f.transient, "{f:?}");
        assert!(
            f.message.contains("certificate verification failed"),
            "{}",
            f.message
        );
        assert!(f.message.contains("CA_FILE"), "{}", f.message);
    }
}

#[test]
fn starttls_required_but_not_offered() {
    let mut o = opts("PCR_SMTP_PLAIN_PORT", SslMode::StartTls);
    o.password = None;
    let err = SmtpTransport::new(&account(&o))
        .unwrap()
        .send(&message(
            json!("dest@test.local"),
            &unique_token("nostarttls"),
        ))
        .unwrap_err();
    let f = transport_error(err);
    assert!(!f.transient);
    assert!(
        f.message.contains("does not offer STARTTLS"),
        "{}",
        f.message
    );
}

#[test]
fn refused_connection_is_transient() {
    let mut o = opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls);
    o.port = spare_port(49);
    let err = SmtpTransport::new(&account(&o))
        .unwrap()
        .send(&message(json!("dest@test.local"), &unique_token("refused")))
        .unwrap_err();
    let f = transport_error(err);
    assert!(f.transient);
    assert!(f.message.contains("connection refused"), "{}", f.message);
}

#[test]
fn a_loop_of_sends_reuses_one_connection() {
    let o = opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls);
    let transport = SmtpTransport::new(&account(&o)).unwrap();
    let tokens: Vec<String> = (0..6).map(|i| unique_token(&format!("reuse{i}"))).collect();
    for t in &tokens {
        transport
            .send(&message(json!("dest@test.local"), t))
            .unwrap();
    }
    let peers: HashSet<u64> = tokens
        .iter()
        .map(|t| peer_port(&smtp_wait_containing(o.port, t, WAIT)))
        .collect();
    assert_eq!(
        peers.len(),
        1,
        "one TCP connection at the server for 6 messages"
    );
    let stats = transport.stats();
    assert_eq!((stats.connections, stats.messages), (1, 6), "{stats:?}");
    // Pipelined: greeting, EHLO, STARTTLS, EHLO, AUTH, then two per message.
    assert_eq!(stats.round_trips, 5 + 2 * 6, "{stats:?}");
}

#[test]
fn closing_idle_connections_then_sending_reconnects() {
    let o = opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls);
    let transport = SmtpTransport::new(&account(&o)).unwrap();
    let first = unique_token("idle1");
    transport
        .send(&message(json!("dest@test.local"), &first))
        .unwrap();
    transport.close_idle();
    let second = unique_token("idle2");
    transport
        .send(&message(json!("dest@test.local"), &second))
        .unwrap();
    let a = peer_port(&smtp_wait_containing(o.port, &first, WAIT));
    let b = peer_port(&smtp_wait_containing(o.port, &second, WAIT));
    assert_ne!(a, b);
    assert_eq!(transport.stats().connections, 2);
}

#[test]
fn check_connects_authenticates_and_sends_nothing() {
    for (var, ssl) in [
        ("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls),
        ("PCR_SMTP_TLS_PORT", SslMode::Ssl),
    ] {
        let o = opts(var, ssl);
        let transport = SmtpTransport::new(&account(&o)).unwrap();
        let before = smtp_received(o.port).len();
        let report = transport.check().unwrap();
        assert_eq!(report.transport, "SMTP");
        let steps = report.steps.join(" | ");
        assert!(
            steps.contains("authenticated as user@test.local"),
            "{steps}"
        );
        assert!(steps.contains("certificate accepted"), "{steps}");
        assert!(!steps.contains(&env("PCR_SMTP_PASS")));
        assert_eq!(transport.stats().messages, 0);
        // Other tests deliver to the same port concurrently: only check no mail of ours.
        assert!(smtp_received(o.port).len() >= before);
    }
}

#[test]
fn send_batch_shares_connections_and_keeps_order() {
    let o = opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls);
    let transport = SmtpTransport::new(&account(&o)).unwrap();
    let tokens: Vec<String> = (0..24)
        .map(|i| unique_token(&format!("batch{i}")))
        .collect();
    let mut messages: Vec<BuiltMessage> = tokens
        .iter()
        .map(|t| message(json!("dest@test.local"), t))
        .collect();
    messages[5] = message(json!("reject-batch@test.local"), &tokens[5]);
    let jobs: Vec<BatchJob> = messages
        .iter()
        .map(|m| BatchJob {
            message: m,
            transport: 0,
        })
        .collect();
    let results = send_batch(&jobs, &[&transport], 4);
    assert_eq!(results.len(), 24);
    for (i, r) in results.iter().enumerate() {
        if i == 5 {
            assert_eq!(transport_error(r.clone().unwrap_err()).code, Some(550));
        } else {
            assert!(r.is_ok(), "{i}: {r:?}");
        }
    }
    let peers: HashSet<u64> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, t)| peer_port(&smtp_wait_containing(o.port, t, WAIT)))
        .collect();
    // Up to 4 parallel connections (+1: the rejected recipient's connection was dropped).
    assert!(peers.len() <= 5, "{} connections", peers.len());
    assert!(
        transport.stats().connections <= 5,
        "{:?}",
        transport.stats()
    );
}

#[test]
fn office365_and_gmail_accounts_need_their_oauth_settings() {
    // The dispatcher hands cloud accounts to the OAuth transports, which refuse an account
    // without its OAuth2 tab instead of falling back to SMTP.
    for t in [TransportType::Office365, TransportType::Gmail] {
        let mut acc = account(&opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls));
        acc.outgoing.as_mut().unwrap().transport = t;
        let err = transport_for(&acc, &no_oauth())
            .err()
            .expect("no OAuth settings");
        assert!(err.to_string().contains("account 77"), "{err}");
        assert!(!err.to_string().contains("not supported"), "{err}");
    }
}

#[test]
fn a_reply_slower_than_the_timeout_after_data_is_reported_as_uncertain() {
    // "slow*" recipients get their end-of-data reply after PCR_SMTP_SLOW_SECONDS (10 s).
    let mut o = opts("PCR_SMTP_STARTTLS_PORT", SslMode::StartTls);
    o.timeout = Duration::from_secs(2);
    let transport = SmtpTransport::new(&account(&o)).unwrap();
    let started = Instant::now();
    let err = transport
        .send(&message(json!("slow-1@test.local"), &unique_token("slow")))
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let f = transport_error(err);
    assert!(f.transient, "{f:?}");
    assert!(f.message.contains("timed out after 2 s"), "{}", f.message);
    assert!(
        f.message.contains("may or may not have accepted"),
        "{}",
        f.message
    );
    // The connection in doubt is not reused: the next message opens a new one.
    let token = unique_token("after-slow");
    transport
        .send(&message(json!("dest@test.local"), &token))
        .unwrap();
    smtp_wait_containing(o.port, &token, WAIT);
    assert_eq!(transport.stats().connections, 2);
}

/// These transports keep no tokens: the OAuth environment is never touched.
fn no_oauth() -> pcr_email::oauth::OAuthEnv {
    pcr_email::oauth::OAuthEnv {
        state_dir: std::env::temp_dir().join("pcr-email-unused-state"),
        state_dsn: None,
        key_file: std::env::temp_dir().join("pcr-email-unused.key"),
    }
}
