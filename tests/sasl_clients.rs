//! The IMAP, POP3 and SMTP clients signing in with an access token (`Credentials::Bearer`,
//! SPEC §3a) against scripted servers on 127.0.0.1: XOAUTH2 preferred, OAUTHBEARER when it
//! is the only one, SASL-IR or the continuation, one fresh token after a refusal (on the
//! same connection, or a new one when the server hung up), a final refusal as `Error::Auth`
//! without the token, a server without token mechanisms named clearly.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, Outgoing, ProcessedAction, Secret,
    SslMode, TlsSettings, TransportType,
};
use pcr_email::incoming::imap::ImapMailbox;
use pcr_email::incoming::pop3::Pop3Mailbox;
use pcr_email::outgoing::smtp::SmtpTransport;
use pcr_email::outgoing::{BuiltMessage, Transport};
use pcr_email::sasl::{Credentials, Mechanism, TokenSource};
use pcr_email::state::StateStore;
use pcr_email::Error;

const USER: &str = "box@test.local";

/// Hands out `<prefix>1` until a refusal, then `<prefix>2`, ...; counts fetches and
/// refreshes. With `revoked`, a refresh fails as a revoked grant does.
struct Tokens {
    prefix: String,
    issued: Mutex<u32>,
    fetches: Mutex<u32>,
    refreshes: Mutex<u32>,
    revoked: bool,
}

impl Tokens {
    fn new(prefix: &str) -> Arc<Tokens> {
        Arc::new(Tokens {
            prefix: prefix.to_string(),
            issued: Mutex::new(1),
            fetches: Mutex::new(0),
            refreshes: Mutex::new(0),
            revoked: false,
        })
    }

    fn revoked(prefix: &str) -> Arc<Tokens> {
        Arc::new(Tokens {
            revoked: true,
            ..Arc::try_unwrap(Tokens::new(prefix)).ok().unwrap()
        })
    }

    fn token(&self, n: u32) -> String {
        format!("{}{n}", self.prefix)
    }

    /// (fetches, refreshes)
    fn counts(&self) -> (u32, u32) {
        (
            *self.fetches.lock().unwrap(),
            *self.refreshes.lock().unwrap(),
        )
    }
}

impl TokenSource for Tokens {
    fn access_token(&self) -> pcr_email::Result<Secret> {
        *self.fetches.lock().unwrap() += 1;
        Ok(Secret::new(self.token(*self.issued.lock().unwrap())))
    }
    fn refresh_after_rejection(&self, rejected: &Secret) -> pcr_email::Result<Secret> {
        if self.revoked {
            return Err(Error::auth(
                "42",
                "the token endpoint refused the grant (invalid_client)",
            ));
        }
        *self.refreshes.lock().unwrap() += 1;
        let mut n = self.issued.lock().unwrap();
        assert_eq!(rejected.expose(), self.token(*n));
        *n += 1;
        Ok(Secret::new(self.token(*n)))
    }
    fn grant(&self) -> &'static str {
        "client_credentials"
    }
}

fn bearer(tokens: &Arc<Tokens>) -> Credentials {
    Credentials::Bearer {
        user: USER.to_string(),
        tokens: tokens.clone() as Arc<dyn TokenSource>,
    }
}

/// One side of a scripted connection.
struct Peer {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    log: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    fn say(&mut self, text: &str) {
        let _ = self.writer.write_all(text.as_bytes());
    }
    /// One line from the client (logged), or None at the end.
    fn hear(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                let line = line.trim_end_matches(['\r', '\n']).to_string();
                self.log.lock().unwrap().push(line.clone());
                Some(line)
            }
        }
    }
    /// Reads until the client closes (so the script does not end the connection first).
    fn drain(&mut self) {
        while self.hear().is_some() {}
    }
}

type Script = Box<dyn FnOnce(&mut Peer) + Send>;

/// Serves `scripts[i]` on the i-th connection; the port and the log of every line heard.
fn serve(scripts: Vec<Script>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let server_log = Arc::clone(&log);
    std::thread::spawn(move || {
        for script in scripts {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut peer = Peer {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
                log: Arc::clone(&server_log),
            };
            script(&mut peer);
        }
    });
    (port, log)
}

fn lines(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// The failure challenge's payload with `status` (base64 JSON, RFC 7628 §3.2.2).
fn failure(status: &str) -> String {
    B64.encode(format!(
        r#"{{"status":"{status}","schemes":"bearer","scope":"https://mail.example/"}}"#
    ))
}

fn xoauth2(token: &str) -> String {
    Mechanism::XOAuth2.initial_response(USER, &Secret::new(token), "127.0.0.1", 0)
}

fn account(incoming: Option<(MailboxType, u16)>, outgoing: Option<u16>) -> Account {
    Account {
        id: AccountId::Tenant(42),
        tenants_recid: 3,
        account_type: AccountType::ServiceDesk,
        email: USER.to_string(),
        display_name: None,
        login: None,
        // No password: a token account needs none.
        password: None,
        outgoing: outgoing.map(|port| Outgoing {
            transport: TransportType::Smtp,
            host: Some("127.0.0.1".into()),
            port,
            ssl: SslMode::None,
        }),
        incoming: incoming.map(|(mailbox, port)| Incoming {
            mailbox,
            host: Some("127.0.0.1".to_string()),
            port,
            ssl: SslMode::None,
            folder: "INBOX".to_string(),
            path: None,
            processed_action: ProcessedAction::Seen,
            max_messages: 500,
            max_message_bytes: 1024 * 1024,
        }),
        sysadmin: None,
        tls: TlsSettings::default(),
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/nonexistent"),
        timeout: Duration::from_secs(5),
        auth_type: Default::default(),
        oauth: None,
    }
}

/// The error's every form, to check that no secret is in any.
fn all_text(err: &Error) -> String {
    format!("{err} {err:?}")
}

fn auth_message(err: &Error) -> &str {
    match err {
        Error::Auth { account, message } => {
            assert_eq!(account, "42");
            message
        }
        other => panic!("expected an authorization error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// IMAP

fn imap_account(port: u16) -> Account {
    account(Some((MailboxType::Imap, port)), None)
}

fn imap_connect(port: u16, tokens: &Arc<Tokens>) -> pcr_email::Result<ImapMailbox> {
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), None).unwrap();
    ImapMailbox::connect_with(&imap_account(port), state, bearer(tokens))
}

const IMAP_OK: &str = "OK [CAPABILITY IMAP4rev1 UIDPLUS MOVE] Logged in\r\n";

#[test]
fn imap_xoauth2_goes_on_the_command_line_with_sasl_ir() {
    let tokens = Tokens::new("imap-token-");
    let (port, log) = serve(vec![Box::new(|p: &mut Peer| {
        p.say(
            "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=OAUTHBEARER AUTH=XOAUTH2] hi\r\n",
        );
        p.hear();
        p.say(&format!("a1 {IMAP_OK}"));
        p.drain();
    })]);
    let mailbox = imap_connect(port, &tokens).unwrap();
    assert_eq!(mailbox.extensions(), (true, true));
    drop(mailbox);
    let log = lines(&log);
    assert_eq!(
        log[0],
        format!("a1 AUTHENTICATE XOAUTH2 {}", xoauth2("imap-token-1"))
    );
    assert_eq!(tokens.counts(), (1, 0));
}

#[test]
fn imap_without_sasl_ir_waits_for_the_continuation_and_takes_oauthbearer_when_alone() {
    let tokens = Tokens::new("imap-token-");
    let (port, log) = serve(vec![Box::new(|p: &mut Peer| {
        p.say("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=OAUTHBEARER] hi\r\n");
        p.hear();
        p.say("+ \r\n");
        p.hear();
        p.say(&format!("a1 {IMAP_OK}"));
        p.drain();
    })]);
    imap_connect(port, &tokens).unwrap();
    let log = lines(&log);
    assert_eq!(log[0], "a1 AUTHENTICATE OAUTHBEARER");
    let raw = B64.decode(&log[1]).unwrap();
    assert_eq!(
        String::from_utf8(raw).unwrap(),
        format!("n,a={USER},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer imap-token-1\x01\x01")
    );
}

#[test]
fn imap_an_expired_token_gets_one_fresh_token_on_the_same_connection() {
    let tokens = Tokens::new("imap-token-");
    let (port, log) = serve(vec![Box::new(|p: &mut Peer| {
        p.say("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n");
        p.hear();
        p.say(&format!("+ {}\r\n", failure("401")));
        p.hear();
        p.say("a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
        p.hear();
        p.say(&format!("a2 {IMAP_OK}"));
        p.drain();
    })]);
    imap_connect(port, &tokens).unwrap();
    let log = lines(&log);
    assert_eq!(
        log[..3],
        [
            format!("a1 AUTHENTICATE XOAUTH2 {}", xoauth2("imap-token-1")),
            String::new(),
            format!("a2 AUTHENTICATE XOAUTH2 {}", xoauth2("imap-token-2")),
        ]
    );
    assert_eq!(tokens.counts(), (1, 1));
}

#[test]
fn imap_a_fresh_token_refused_too_is_an_auth_error_without_the_token() {
    let tokens = Tokens::new("imap-token-");
    let (port, _) = serve(vec![Box::new(|p: &mut Peer| {
        p.say("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n");
        for tag in ["a1", "a2"] {
            let command = p.hear().unwrap_or_default();
            p.say(&format!("+ {}\r\n", failure("401")));
            p.hear();
            // A careless server that echoes what it was sent.
            p.say(&format!("{tag} NO refused: {command}\r\n"));
        }
        p.drain();
    })]);
    let err = imap_connect(port, &tokens).unwrap_err();
    let message = auth_message(&err);
    assert!(
        message.contains(&format!(
            "the IMAP server 127.0.0.1:{port} refused the access token for '{USER}' (XOAUTH2, \
             status 401, scope https://mail.example/) even after a fresh token was fetched"
        )),
        "{message}"
    );
    let text = all_text(&err);
    for secret in [
        "imap-token-1",
        "imap-token-2",
        &xoauth2("imap-token-1"),
        &xoauth2("imap-token-2"),
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert_eq!(tokens.counts(), (1, 1));
}

#[test]
fn imap_a_refusal_for_another_reason_is_not_retried() {
    let tokens = Tokens::new("imap-token-");
    let (port, _) = serve(vec![Box::new(|p: &mut Peer| {
        p.say("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n");
        p.hear();
        p.say(&format!("+ {}\r\n", failure("insufficient_scope")));
        p.hear();
        p.say("a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
        p.drain();
    })]);
    let err = imap_connect(port, &tokens).unwrap_err();
    assert!(
        auth_message(&err).contains("(XOAUTH2, status insufficient_scope, scope https://mail.example/): [AUTHENTICATIONFAILED]"),
        "{err}"
    );
    assert_eq!(tokens.counts(), (1, 0));
}

#[test]
fn imap_a_server_that_hangs_up_after_the_refusal_gets_the_fresh_token_on_a_new_connection() {
    let tokens = Tokens::new("imap-token-");
    let (port, log) = serve(vec![
        Box::new(|p: &mut Peer| {
            p.say("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n");
            p.hear();
            p.say(&format!("+ {}\r\n", failure("401")));
            p.hear();
            p.say("* BYE Authentication failed.\r\n");
        }),
        Box::new(|p: &mut Peer| {
            p.say("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n");
            p.hear();
            p.say(&format!("a1 {IMAP_OK}"));
            p.drain();
        }),
    ]);
    imap_connect(port, &tokens).unwrap();
    let log = lines(&log);
    assert_eq!(
        log[2],
        format!("a1 AUTHENTICATE XOAUTH2 {}", xoauth2("imap-token-2"))
    );
    assert_eq!(tokens.counts(), (1, 1));
}

#[test]
fn imap_a_revoked_grant_is_the_token_sources_auth_error() {
    let tokens = Tokens::revoked("imap-token-");
    let (port, _) = serve(vec![Box::new(|p: &mut Peer| {
        p.say("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n");
        p.hear();
        p.say(&format!("+ {}\r\n", failure("401")));
        p.hear();
        p.say("a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
        p.drain();
    })]);
    let err = imap_connect(port, &tokens).unwrap_err();
    assert!(auth_message(&err).contains("invalid_client"), "{err}");
}

#[test]
fn imap_a_server_without_token_mechanisms_is_named_clearly() {
    let tokens = Tokens::new("imap-token-");
    let (port, log) = serve(vec![Box::new(|p: &mut Peer| {
        p.say("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=LOGIN] hi\r\n");
        p.drain();
    })]);
    let err = imap_connect(port, &tokens).unwrap_err();
    match &err {
        Error::Mailbox(f) => assert!(
            f.message.contains(
                "the IMAP server does not offer OAuth sign-in (SASL XOAUTH2 or OAUTHBEARER; it \
                 offers AUTH=PLAIN AUTH=LOGIN), which AUTH_TYPE = XOAUTH2 needs"
            ),
            "{}",
            f.message
        ),
        other => panic!("expected a mailbox error, got {other:?}"),
    }
    assert!(lines(&log).is_empty(), "{:?}", lines(&log));
    assert_eq!(tokens.counts(), (0, 0));
}

// ---------------------------------------------------------------------------------------
// POP3

fn pop3_connect(port: u16, tokens: &Arc<Tokens>) -> pcr_email::Result<Pop3Mailbox> {
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), None).unwrap();
    let account = account(Some((MailboxType::Pop3, port)), None);
    Pop3Mailbox::connect_with(&account, state, bearer(tokens))
}

const POP3_CAPA: &str = "+OK\r\nUIDL\r\nUSER\r\nSASL PLAIN XOAUTH2\r\n.\r\n";

#[test]
fn pop3_an_expired_token_gets_one_fresh_token_on_the_same_connection() {
    let tokens = Tokens::new("pop-token-");
    let (port, log) = serve(vec![Box::new(|p: &mut Peer| {
        p.say("+OK ready\r\n");
        p.hear();
        p.say(POP3_CAPA);
        p.hear();
        p.say(&format!("+ {}\r\n", failure("401")));
        p.hear();
        p.say("-ERR [AUTH] Authentication failed.\r\n");
        p.hear();
        p.say("+OK Logged in.\r\n");
        p.hear();
        p.say(POP3_CAPA);
        p.drain();
    })]);
    pop3_connect(port, &tokens).unwrap();
    let log = lines(&log);
    assert_eq!(
        log[1..4],
        [
            format!("AUTH XOAUTH2 {}", xoauth2("pop-token-1")),
            String::new(),
            format!("AUTH XOAUTH2 {}", xoauth2("pop-token-2")),
        ]
    );
    assert_eq!(tokens.counts(), (1, 1));
}

#[test]
fn pop3_a_server_that_hangs_up_after_the_refusal_gets_the_fresh_token_on_a_new_connection() {
    let tokens = Tokens::new("pop-token-");
    let (port, log) = serve(vec![
        Box::new(|p: &mut Peer| {
            p.say("+OK ready\r\n");
            p.hear();
            p.say(POP3_CAPA);
            p.hear();
            p.say("-ERR [AUTH] Authentication failed.\r\n");
            // Gone before the retry is answered.
            p.hear();
        }),
        Box::new(|p: &mut Peer| {
            p.say("+OK ready\r\n");
            p.hear();
            p.say(POP3_CAPA);
            p.hear();
            p.say("+OK Logged in.\r\n");
            p.hear();
            p.say(POP3_CAPA);
            p.drain();
        }),
    ]);
    pop3_connect(port, &tokens).unwrap();
    let log = lines(&log);
    assert_eq!(log[4], format!("AUTH XOAUTH2 {}", xoauth2("pop-token-2")));
    assert_eq!(tokens.counts(), (1, 1));
}

#[test]
fn pop3_a_fresh_token_refused_too_is_an_auth_error() {
    let tokens = Tokens::new("pop-token-");
    let (port, _) = serve(vec![Box::new(|p: &mut Peer| {
        p.say("+OK ready\r\n");
        p.hear();
        p.say(POP3_CAPA);
        for _ in 0..2 {
            let command = p.hear().unwrap_or_default();
            p.say(&format!("-ERR [AUTH] refused {command}\r\n"));
        }
        p.drain();
    })]);
    let err = pop3_connect(port, &tokens).unwrap_err();
    let message = auth_message(&err);
    assert!(
        message.contains(&format!(
            "the POP3 server 127.0.0.1:{port} refused the access token for '{USER}' (XOAUTH2) \
             even after a fresh token was fetched"
        )),
        "{message}"
    );
    let text = all_text(&err);
    for secret in [
        "pop-token-",
        &xoauth2("pop-token-1"),
        &xoauth2("pop-token-2"),
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert_eq!(tokens.counts(), (1, 1));
}

// ---------------------------------------------------------------------------------------
// SMTP

fn smtp(port: u16, tokens: &Arc<Tokens>) -> SmtpTransport {
    SmtpTransport::with_credentials(&account(None, Some(port)), bearer(tokens)).unwrap()
}

fn message() -> BuiltMessage {
    BuiltMessage {
        raw: b"Subject: t\r\n\r\nbody\r\n".to_vec(),
        envelope_from: USER.into(),
        recipients: vec!["to@test.local".into()],
        message_id: "<1@test.local>".into(),
        from: USER.into(),
        subject: "t".into(),
    }
}

/// Greeting and EHLO offering `auth`.
fn ehlo(p: &mut Peer, auth: &str) {
    p.say("220 fake ESMTP\r\n");
    p.hear();
    p.say(&format!("250-fake\r\n250-{auth}\r\n250 8BITMIME\r\n"));
}

/// One message accepted.
fn accept(p: &mut Peer) {
    for _ in 0..2 {
        p.hear();
        p.say("250 ok\r\n");
    }
    p.hear();
    p.say("354 go\r\n");
    while p.hear().is_some_and(|l| l != ".") {}
    p.say("250 queued\r\n");
}

#[test]
fn smtp_xoauth2_signs_in_once_per_connection_and_asks_the_source_on_each_new_one() {
    let tokens = Tokens::new("smtp-token-");
    let script = || -> Script {
        Box::new(|p: &mut Peer| {
            ehlo(p, "AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2");
            p.hear();
            p.say("235 2.7.0 Accepted\r\n");
            accept(p);
            accept(p);
            p.drain();
        })
    };
    let (port, log) = serve(vec![script(), script()]);
    let transport = smtp(port, &tokens);
    transport.send(&message()).unwrap();
    // Pooled: signed in already, no new token.
    transport.send(&message()).unwrap();
    assert_eq!(tokens.counts(), (1, 0));
    transport.close_idle();
    transport.send(&message()).unwrap();
    assert_eq!(tokens.counts(), (2, 0));
    let log = lines(&log);
    assert_eq!(log[1], format!("AUTH XOAUTH2 {}", xoauth2("smtp-token-1")));
    assert_eq!(transport.stats().connections, 2);
}

#[test]
fn smtp_a_long_token_goes_after_the_334_and_oauthbearer_is_taken_when_alone() {
    // A real token: `AUTH ... <response>` would pass SMTP's 512-octet command line.
    let prefix = "y".repeat(600);
    let tokens = Tokens::new(&prefix);
    let (port, log) = serve(vec![Box::new(|p: &mut Peer| {
        ehlo(p, "AUTH PLAIN OAUTHBEARER");
        p.hear();
        p.say("334 \r\n");
        p.hear();
        p.say("235 2.7.0 Accepted\r\n");
        accept(p);
        p.drain();
    })]);
    let transport = smtp(port, &tokens);
    transport.send(&message()).unwrap();
    let log = lines(&log);
    assert_eq!(log[1], "AUTH OAUTHBEARER");
    let raw = String::from_utf8(B64.decode(&log[2]).unwrap()).unwrap();
    assert_eq!(
        raw,
        format!("n,a={USER},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {prefix}1\x01\x01")
    );
}

#[test]
fn smtp_an_expired_token_gets_one_fresh_token_on_the_same_connection() {
    let tokens = Tokens::new("smtp-token-");
    let (port, log) = serve(vec![Box::new(|p: &mut Peer| {
        ehlo(p, "AUTH XOAUTH2");
        p.hear();
        p.say(&format!("334 {}\r\n", failure("401")));
        p.hear();
        p.say("535 5.7.8 Username and Password not accepted\r\n");
        p.hear();
        p.say("235 2.7.0 Accepted\r\n");
        accept(p);
        p.drain();
    })]);
    let transport = smtp(port, &tokens);
    transport.send(&message()).unwrap();
    let log = lines(&log);
    assert_eq!(
        log[1..4],
        [
            format!("AUTH XOAUTH2 {}", xoauth2("smtp-token-1")),
            String::new(),
            format!("AUTH XOAUTH2 {}", xoauth2("smtp-token-2")),
        ]
    );
    assert_eq!(tokens.counts(), (1, 1));
}

#[test]
fn smtp_a_fresh_token_refused_too_is_an_auth_error_without_the_token() {
    let tokens = Tokens::new("smtp-token-");
    let (port, _) = serve(vec![Box::new(|p: &mut Peer| {
        ehlo(p, "AUTH XOAUTH2");
        for _ in 0..2 {
            let command = p.hear().unwrap_or_default();
            p.say(&format!("334 {}\r\n", failure("401")));
            p.hear();
            p.say(&format!("535 5.7.8 not accepted: {command}\r\n"));
        }
        p.drain();
    })]);
    let transport = smtp(port, &tokens);
    let err = transport.send(&message()).unwrap_err();
    let message = auth_message(&err);
    assert!(
        message.contains(&format!(
            "the SMTP server 127.0.0.1:{port} refused the access token for '{USER}' (XOAUTH2, \
             status 401, scope https://mail.example/) even after a fresh token was fetched: 535 \
             5.7.8 not accepted: AUTH XOAUTH2 <redacted>"
        )),
        "{message}"
    );
    assert!(!all_text(&err).contains("smtp-token-"), "{err:?}");
    assert_eq!(tokens.counts(), (1, 1));
}

#[test]
fn smtp_a_server_that_hangs_up_after_the_refusal_gets_the_fresh_token_on_a_new_connection() {
    let tokens = Tokens::new("smtp-token-");
    let (port, log) = serve(vec![
        Box::new(|p: &mut Peer| {
            ehlo(p, "AUTH XOAUTH2");
            p.hear();
            p.say("535 5.7.8 Authentication failed\r\n");
            // Closes without answering the retry.
            p.hear();
        }),
        Box::new(|p: &mut Peer| {
            ehlo(p, "AUTH XOAUTH2");
            p.hear();
            p.say("235 2.7.0 Accepted\r\n");
            accept(p);
            p.drain();
        }),
    ]);
    let transport = smtp(port, &tokens);
    transport.send(&message()).unwrap();
    let log = lines(&log);
    assert_eq!(log[4], format!("AUTH XOAUTH2 {}", xoauth2("smtp-token-2")));
    assert_eq!(tokens.counts(), (1, 1));
}

#[test]
fn smtp_a_server_without_token_mechanisms_is_named_clearly() {
    let tokens = Tokens::new("smtp-token-");
    let (port, _) = serve(vec![Box::new(|p: &mut Peer| {
        ehlo(p, "AUTH PLAIN LOGIN");
        p.drain();
    })]);
    let err = smtp(port, &tokens).send(&message()).unwrap_err();
    match &err {
        Error::Transport(f) => {
            assert!(!f.transient);
            assert!(
                f.message.contains(
                    "the SMTP server does not offer OAuth sign-in (SASL XOAUTH2 or OAUTHBEARER; \
                     it offers PLAIN LOGIN)"
                ),
                "{}",
                f.message
            );
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
    assert_eq!(tokens.counts(), (0, 0));
}

#[test]
fn smtp_check_reports_the_token_sign_in() {
    let tokens = Tokens::new("smtp-token-");
    let (port, _) = serve(vec![Box::new(|p: &mut Peer| {
        ehlo(p, "AUTH XOAUTH2");
        p.hear();
        p.say("235 2.7.0 Accepted\r\n");
        p.drain();
    })]);
    let report = smtp(port, &tokens).check().unwrap();
    assert!(
        report
            .steps
            .iter()
            .any(|s| s == &format!("authenticated as {USER} (XOAUTH2 access token)")),
        "{:?}",
        report.steps
    );
}

#[test]
fn password_accounts_keep_their_constructors() {
    // `new` still signs in with the account's password (AUTH PLAIN here).
    let (port, log) = serve(vec![Box::new(|p: &mut Peer| {
        ehlo(p, "AUTH PLAIN XOAUTH2");
        p.hear();
        p.say("235 ok\r\n");
        accept(p);
        p.drain();
    })]);
    let mut acc = account(None, Some(port));
    acc.password = Some(Secret::new("pw"));
    SmtpTransport::new(&acc).unwrap().send(&message()).unwrap();
    assert_eq!(
        lines(&log)[1],
        format!("AUTH PLAIN {}", B64.encode(format!("\0{USER}\0pw")))
    );
}
