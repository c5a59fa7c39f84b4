//! FILE and SENDMAIL transports end to end: `.eml` files written concurrently, and the msmtp
//! wrapper of the test environment as a real sendmail relaying to the STARTTLS test server.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pcr_email::config::{
    Account, AccountId, AccountType, Outgoing, SslMode, TlsSettings, TransportType,
};
use pcr_email::outgoing::message::{build, BuiltMessage, MessageRequest};
use pcr_email::outgoing::{send_batch, transport_for, BatchJob, DeliveryStatus, Transport};
use pcr_email::Error;
use serde_json::json;

const KEY: [u8; 32] = [9u8; 32];

fn account(transport: TransportType, file_path: &Path, sendmail: PathBuf) -> Account {
    Account {
        id: AccountId::Master,
        tenants_recid: 0,
        account_type: AccountType::Master,
        email: "sender@test.local".into(),
        display_name: Some("PCR-360 Master".into()),
        login: None,
        password: None,
        outgoing: Some(Outgoing {
            transport,
            host: None,
            port: 25,
            ssl: SslMode::None,
        }),
        incoming: None,
        sysadmin: None,
        tls: TlsSettings::default(),
        file_path: file_path.to_path_buf(),
        sendmail_path: sendmail,
        timeout: Duration::from_secs(20),
        auth_type: Default::default(),
        oauth: None,
    }
}

fn built(acc: &Account, to: serde_json::Value, token: &str) -> BuiltMessage {
    let req = MessageRequest::from_json(&json!({
        "to": to,
        "bcc": "blind@test.local",
        "subject": format!("Réponse {token}"),
        "text": format!("hello {token}\n.dot\n"),
    }))
    .unwrap();
    build(&req, acc, &KEY).unwrap()
}

#[test]
fn file_transport_writes_every_message_once_from_many_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("email");
    let acc = account(TransportType::File, &dir, PathBuf::new());
    let transport: Arc<dyn Transport> = Arc::from(transport_for(&acc, &no_oauth()).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let transport = Arc::clone(&transport);
            let acc = acc.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|i| {
                        let token = format!("t{t}-m{i}-end");
                        let msg = built(&acc, json!("a@test.local"), &token);
                        let d = transport.send(&msg).unwrap();
                        assert_eq!(d.status, DeliveryStatus::Written);
                        (d.path.unwrap(), msg.raw)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let written: Vec<(PathBuf, Vec<u8>)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(written.len(), 200);
    let paths: HashSet<&PathBuf> = written.iter().map(|(p, _)| p).collect();
    assert_eq!(paths.len(), 200, "every message has its own file");
    for (path, raw) in &written {
        assert_eq!(&std::fs::read(path).unwrap(), raw, "{}", path.display());
        assert_eq!(path.extension().unwrap(), "eml");
    }
    let on_disk = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(on_disk, 200, "no temporary files left behind");
}

#[test]
fn file_transport_through_send_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let acc = account(TransportType::File, tmp.path(), PathBuf::new());
    let transport = transport_for(&acc, &no_oauth()).unwrap();
    let messages: Vec<BuiltMessage> = (0..30)
        .map(|i| built(&acc, json!("a@test.local"), &format!("b{i}")))
        .collect();
    let jobs: Vec<BatchJob> = messages
        .iter()
        .map(|m| BatchJob {
            message: m,
            transport: 0,
        })
        .collect();
    let results = send_batch(&jobs, &[transport.as_ref()], 8);
    for (r, m) in results.iter().zip(&messages) {
        let path = r.as_ref().unwrap().path.clone().unwrap();
        assert_eq!(std::fs::read(path).unwrap(), m.raw);
    }
    assert!(transport.check().is_ok());
}

/// A large LF-only text (lettre inserted each CR with `String::insert`: minutes for this size,
/// hours at 100 MB), a CR-only HTML with a line far over 998 octets and a text attachment
/// given by content, written by the FILE transport: every part decodes back, the text with
/// CRLF line ends, the attachment byte for byte, and the file is 7-bit with short lines.
#[test]
fn a_large_lf_only_body_is_written_and_decodes_back_with_crlf() {
    let tmp = tempfile::tempdir().unwrap();
    let acc = account(TransportType::File, tmp.path(), PathBuf::new());
    let transport = transport_for(&acc, &no_oauth()).unwrap();
    let line = "Ticket update: the quick brown fox jumps over the lazy dog. Grüße\n";
    let text = line.repeat((32 << 20) / line.len());
    let html = format!(
        "<p>{}</p>\r<p>{}</p>\r",
        "long line ".repeat(50_000),
        "x\r".repeat(100_000)
    );
    let attachment = "col1,col2\nä,b\n".repeat(100_000);
    let req = MessageRequest::from_json(&json!({
        "to": "a@test.local",
        "subject": "large",
        "text": text,
        "html": html,
        "attachments": [{"content": attachment, "filename": "data.csv"}],
    }))
    .unwrap();
    let msg = build(&req, &acc, &KEY).unwrap();
    let d = transport.send(&msg).unwrap();
    let raw = std::fs::read(d.path.unwrap()).unwrap();
    assert_eq!(raw, msg.raw);
    assert!(raw.is_ascii());
    let longest = raw.split(|&b| b == b'\n').map(<[u8]>::len).max().unwrap();
    assert!(longest <= 78, "a line of {longest} octets");

    let parsed = mail_parser::MessageParser::default().parse(&raw).unwrap();
    let crlf = |s: &str| {
        s.replace("\r\n", "\n")
            .replace('\r', "\n")
            .replace('\n', "\r\n")
    };
    assert!(parsed.body_text(0).unwrap() == crlf(&text), "text differs");
    assert!(parsed.body_html(0).unwrap() == crlf(&html), "html differs");
    let att = mail_parser::MimeHeaders::attachment_name(parsed.attachment(0).unwrap());
    assert_eq!(att, Some("data.csv"));
    assert!(parsed.attachment(0).unwrap().contents() == attachment.as_bytes());
}

#[test]
fn sendmail_via_msmtp_reaches_the_smtp_server() {
    let tmp = tempfile::tempdir().unwrap();
    let acc = account(TransportType::Sendmail, tmp.path(), sendmail_path());
    let transport = transport_for(&acc, &no_oauth()).unwrap();
    assert_eq!(transport.check().unwrap().transport, "SENDMAIL");
    let token = unique_token("sendmail");
    let msg = built(
        &acc,
        json!(["first@test.local", "Second <second@test.local>"]),
        &token,
    );
    let d = transport.send(&msg).unwrap();
    assert_eq!(d.status, DeliveryStatus::Sent);
    let port = port("PCR_SMTP_STARTTLS_PORT");
    let got = smtp_wait_containing(port, &token, Duration::from_secs(15));
    assert_eq!(got.mail_from, "sender@test.local");
    let rcpts: HashSet<&str> = got.rcpt_tos.iter().map(String::as_str).collect();
    assert_eq!(
        rcpts,
        ["first@test.local", "second@test.local", "blind@test.local"].into()
    );
    // msmtp turns our LF lines back into CRLF: the message arrives unchanged.
    assert_eq!(got.raw, msg.raw);
    assert!(got.header("Bcc").is_none());
}

#[test]
fn sendmail_reports_a_refused_recipient_with_its_code() {
    let tmp = tempfile::tempdir().unwrap();
    let acc = account(TransportType::Sendmail, tmp.path(), sendmail_path());
    let transport = transport_for(&acc, &no_oauth()).unwrap();
    let err = transport
        .send(&built(
            &acc,
            json!("reject-sm@test.local"),
            &unique_token("smrej"),
        ))
        .unwrap_err();
    let Error::Transport(f) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(f.account, "master");
    assert_eq!(f.server, sendmail_path().display().to_string());
    assert_eq!(f.code, Some(550), "{err}");
    assert!(!f.transient, "{err}");
    assert!(f.message.contains("exited with status"), "{err}");
}

#[test]
fn missing_sendmail_binary_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("sbin/sendmail");
    let acc = account(TransportType::Sendmail, tmp.path(), missing.clone());
    let transport = transport_for(&acc, &no_oauth()).unwrap();
    let err = transport
        .send(&built(&acc, json!("a@test.local"), "x"))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(
        text.contains("not found") && text.contains("SENDMAIL_PATH"),
        "{text}"
    );
    assert!(transport.check().is_err());
}

/// These transports keep no tokens: the OAuth environment is never touched.
fn no_oauth() -> pcr_email::oauth::OAuthEnv {
    pcr_email::oauth::OAuthEnv {
        state_dir: std::env::temp_dir().join("pcr-email-unused-state"),
        state_dsn: None,
        key_file: std::env::temp_dir().join("pcr-email-unused.key"),
    }
}
