//! A POP3 server that gives two messages the same UIDL (RFC 1939 forbids it; broken or
//! migrated maildrops do it): the first is downloaded and processed as usual, the second is
//! left alone — and reported through `take_notices`, on every listing.
//!
//! The server is a small scripted one on a local socket (no test servers needed).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, ProcessedAction, Secret, SslMode,
    TlsSettings,
};
use pcr_email::incoming::pop3::Pop3Mailbox;
use pcr_email::incoming::{Flow, Mailbox};
use pcr_email::state::StateStore;

fn message(n: u32) -> String {
    format!("From: a@example.edu\r\nSubject: message {n}\r\nMessage-ID: <m{n}@example.edu>\r\n\r\nbody {n}\r\n")
}

/// Serves one session: messages 1..=3 with UIDLs `uid-a`, `uid-b`, `uid-a`. Returns the port
/// and the commands received.
fn serve() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut out = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream);
        out.write_all(b"+OK ready\r\n").unwrap();
        let uids = ["uid-a", "uid-b", "uid-a"];
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end().to_string();
            log.lock().unwrap().push(line.clone());
            let mut words = line.split(' ');
            let reply = match words.next().unwrap_or("").to_ascii_uppercase().as_str() {
                "CAPA" => "+OK\r\nUSER\r\nUIDL\r\n.\r\n".to_string(),
                "USER" | "PASS" | "NOOP" => "+OK\r\n".to_string(),
                "STAT" => "+OK 3 300\r\n".to_string(),
                "UIDL" => {
                    let mut r = "+OK\r\n".to_string();
                    for (i, uid) in uids.iter().enumerate() {
                        r.push_str(&format!("{} {uid}\r\n", i + 1));
                    }
                    r + ".\r\n"
                }
                "LIST" => {
                    let mut r = "+OK\r\n".to_string();
                    for n in 1..=3 {
                        r.push_str(&format!("{n} {}\r\n", message(n).len()));
                    }
                    r + ".\r\n"
                }
                "RETR" => match words.next().and_then(|n| n.parse::<u32>().ok()) {
                    Some(n @ 1..=3) => format!("+OK\r\n{}.\r\n", message(n)),
                    _ => "-ERR no such message\r\n".to_string(),
                },
                "DELE" => "+OK\r\n".to_string(),
                "QUIT" => {
                    out.write_all(b"+OK bye\r\n").unwrap();
                    return;
                }
                _ => "-ERR unknown\r\n".to_string(),
            };
            out.write_all(reply.as_bytes()).unwrap();
        }
    });
    (port, seen)
}

fn account(port: u16) -> Account {
    Account {
        id: AccountId::Tenant(9),
        tenants_recid: 2,
        account_type: AccountType::ServiceDesk,
        email: "desk@example.edu".into(),
        display_name: None,
        login: None,
        password: Some(Secret::new("pw")),
        outgoing: None,
        incoming: Some(Incoming {
            mailbox: MailboxType::Pop3,
            host: Some("127.0.0.1".into()),
            port,
            ssl: SslMode::None,
            folder: "INBOX".into(),
            path: None,
            processed_action: ProcessedAction::Delete,
            max_messages: 500,
            max_message_bytes: 1024 * 1024,
        }),
        sysadmin: None,
        tls: TlsSettings::default(),
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
        timeout: Duration::from_secs(10),
        auth_type: Default::default(),
        oauth: None,
    }
}

#[test]
fn a_repeated_uidl_is_reported_and_only_its_first_message_is_processed() {
    let (port, commands) = serve();
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), None).unwrap();
    let mut mailbox = Pop3Mailbox::connect(&account(port), state).unwrap();

    let listed: Vec<String> = mailbox.list().unwrap().into_iter().map(|l| l.id).collect();
    assert_eq!(listed, vec!["uid-a", "uid-b"]);
    let notices = mailbox.take_notices();
    assert_eq!(
        notices,
        vec![
            "the POP3 server lists UIDL uid-a for messages 1 and 3; message 3 is not \
             downloaded (delete the duplicate on the server)"
                .to_string()
        ]
    );
    assert!(mailbox.take_notices().is_empty(), "drained");

    let mut got = Vec::new();
    mailbox
        .fetch_each(&listed, &mut |m| {
            got.push((m.id, m.raw));
            Flow::Continue
        })
        .unwrap();
    assert_eq!(
        got,
        vec![
            ("uid-a".to_string(), message(1).into_bytes()),
            ("uid-b".to_string(), message(2).into_bytes())
        ]
    );
    mailbox.mark_processed(&listed[..1]).unwrap();

    // Every listing reports it again (it is still on the server).
    mailbox.list().unwrap();
    assert_eq!(mailbox.take_notices().len(), 1);
    Box::new(mailbox).finish().unwrap();

    let commands = commands.lock().unwrap().clone();
    assert!(commands.iter().any(|c| c == "RETR 1"), "{commands:?}");
    assert!(!commands.iter().any(|c| c == "RETR 3"), "{commands:?}");
    assert!(commands.iter().any(|c| c == "DELE 1"), "{commands:?}");
    assert!(!commands.iter().any(|c| c == "DELE 3"), "{commands:?}");
}
