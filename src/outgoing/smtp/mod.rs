//! SMTP transport: an SMTP submission client (RFC 5321) over `crate::net`, with implicit TLS
//! (`SSL`), required STARTTLS (`TLS`) or no TLS (`""`), AUTH PLAIN/LOGIN or, with an access
//! token, AUTH XOAUTH2/OAUTHBEARER (RFC 7628), PIPELINING (RFC 2920) and a pool of
//! authenticated connections reused across `send()` calls.
//!
//! With a token, every new connection asks the token source for its current token (the source
//! caches it); a pooled connection stays signed in when its token expires meanwhile. A token
//! the server refuses as invalid or expired gets one fresh token and one more attempt (on a
//! new connection when the server closed this one); a second refusal is an `Error::Auth`.
//!
//! Why not lettre's `SmtpTransport`: its implicit-TLS handshake runs before any socket timeout
//! is set (a silent server hangs it forever), certificate failures come back as generic
//! connection errors, every reused connection costs a NOOP round trip, and there is no
//! PIPELINING. Here every read and write has the account's timeout, a message costs two round
//! trips on a reused connection when the server pipelines, and errors say what failed where.
//!
//! Delivery is all-or-nothing per message: when any recipient is refused the transaction is
//! abandoned (RSET, or the connection is dropped when the server already said 354), so the
//! caller can fix the list and retry without doubling mail to the others.
//!
//! Layout: this file holds the transport (settings, `send`, `check`); `connection` dials,
//! secures, greets and signs in; `replies` reads and parses the server's replies and phrases
//! failures; `transaction` is one MAIL/RCPT/DATA exchange; `pool` keeps connections for reuse.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::{BuiltMessage, CheckReport, Delivery, DeliveryStatus, Transport};
use crate::config::{Account, Secret, SslMode, TransportType};
use crate::error::{Error, Result};
use crate::net::{self, TlsConnector};
use crate::sasl::{Credentials, TokenSource};

mod connection;
mod pool;
mod replies;
mod transaction;

use pool::Idle;
use replies::Fail;
use transaction::dot_stuff;

/// Counters of one transport, for tests and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SmtpStats {
    /// TCP connections opened (each with its greeting, EHLO, TLS and AUTH).
    pub connections: u64,
    /// Messages the server accepted.
    pub messages: u64,
    /// Times the client waited for the server after writing (connect and TLS excluded).
    pub round_trips: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    messages: AtomicU64,
    round_trips: AtomicU64,
}

struct Config {
    account: String,
    host: String,
    port: u16,
    /// `host:port` for messages.
    server: String,
    ssl: SslMode,
    login: String,
    password: Option<Secret>,
    /// With [`Credentials::Bearer`]: the access tokens' source (then `password` is `None`).
    tokens: Option<Arc<dyn TokenSource>>,
    connector: Option<TlsConnector>,
    timeout: Duration,
    hello: String,
}

/// Sends through one SMTP server for one account, keeping authenticated connections open
/// between messages (up to 16 idle ones; closed with QUIT when the transport is dropped).
pub struct SmtpTransport {
    cfg: Config,
    idle: Mutex<Vec<Idle>>,
    counters: Counters,
}

impl fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("account", &self.cfg.account)
            .field("server", &self.cfg.server)
            .field("ssl", &self.cfg.ssl)
            .field("login", &self.cfg.login)
            .field("password", &self.cfg.password)
            .field("tokens", &self.cfg.tokens.as_ref().map(|t| t.grant()))
            .finish_non_exhaustive()
    }
}

impl SmtpTransport {
    /// The transport for an SMTP account: checks the host and builds the TLS settings (a bad
    /// `CA_FILE` is a configuration error naming the account). Connects only when used. It
    /// signs in with LOGIN and PASSWORD when the account has a password, else not at all.
    pub fn new(account: &Account) -> Result<SmtpTransport> {
        let credentials = account
            .password
            .clone()
            .filter(|p| !p.is_empty())
            .map(|password| Credentials::Password {
                user: account.login_name().to_string(),
                password,
            });
        SmtpTransport::build(account, credentials)
    }

    /// [`SmtpTransport::new`] signing in with `credentials`: with [`Credentials::Bearer`],
    /// AUTH XOAUTH2 (else OAUTHBEARER) with the token source's access token on every new
    /// connection. A password that is empty means no AUTH, as with `new`.
    pub fn with_credentials(account: &Account, credentials: Credentials) -> Result<SmtpTransport> {
        let credentials = match credentials {
            Credentials::Password { password, .. } if password.is_empty() => None,
            other => Some(other),
        };
        SmtpTransport::build(account, credentials)
    }

    fn build(account: &Account, credentials: Option<Credentials>) -> Result<SmtpTransport> {
        let (id, outgoing) = super::settings(account)?;
        let host = outgoing
            .host
            .as_deref()
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Error::account_key(&id, "OUTGOING_HOST", "required for SMTP"))?
            .to_string();
        if outgoing.port == 0 {
            return Err(Error::account_key(&id, "OUTGOING_PORT", "0 is not a port"));
        }
        let connector = match outgoing.ssl {
            SslMode::None => None,
            SslMode::Ssl | SslMode::StartTls => {
                Some(net::tls_connector(&account.tls).map_err(|e| with_account(e, &id))?)
            }
        };
        Ok(SmtpTransport {
            cfg: Config {
                server: net::server_label(&host, outgoing.port),
                account: id,
                host,
                port: outgoing.port,
                ssl: outgoing.ssl,
                login: credentials
                    .as_ref()
                    .map_or(account.login_name(), Credentials::user)
                    .to_string(),
                password: match &credentials {
                    Some(Credentials::Password { password, .. }) => Some(password.clone()),
                    _ => None,
                },
                tokens: match credentials {
                    Some(Credentials::Bearer { tokens, .. }) => Some(tokens),
                    _ => None,
                },
                connector,
                timeout: if account.timeout.is_zero() {
                    net::FALLBACK_TIMEOUT
                } else {
                    account.timeout
                },
                hello: hello_name(),
            },
            idle: Mutex::new(Vec::new()),
            counters: Counters::default(),
        })
    }

    /// What this transport has done so far.
    pub fn stats(&self) -> SmtpStats {
        SmtpStats {
            connections: self.counters.connections.load(Ordering::Relaxed),
            messages: self.counters.messages.load(Ordering::Relaxed),
            round_trips: self.counters.round_trips.load(Ordering::Relaxed),
        }
    }

    fn fail_to_error(&self, fail: Fail) -> Error {
        if let Fail::Fatal(err) = fail {
            return err;
        }
        let (code, transient, message) = fail.describe(self.cfg.timeout, self.cfg.ssl);
        let message = redact(&message, &self.cfg);
        Error::transport(
            &self.cfg.account,
            &self.cfg.server,
            code,
            transient,
            message,
        )
    }
}

impl Transport for SmtpTransport {
    fn send(&self, msg: &BuiltMessage) -> Result<Delivery> {
        if msg.recipients.is_empty() {
            return Err(Error::message("the message has no recipient"));
        }
        for addr in msg
            .recipients
            .iter()
            .chain(std::iter::once(&msg.envelope_from))
        {
            if addr.is_empty()
                || addr
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>')
            {
                return Err(Error::message(format!(
                    "{addr:?} cannot be used as an SMTP envelope address"
                )));
            }
        }
        let data = dot_stuff(&msg.raw);
        let mut retried = false;
        loop {
            let (mut conn, reused) = self.checkout().map_err(|f| self.fail_to_error(f))?;
            match conn.transaction(msg, &data) {
                Ok(()) => {
                    self.checkin(conn);
                    self.counters.messages.fetch_add(1, Ordering::Relaxed);
                    return Ok(Delivery {
                        status: DeliveryStatus::Sent,
                        path: None,
                        server: self.cfg.server.clone(),
                        from: None,
                    });
                }
                Err((fail, usable)) => {
                    if usable {
                        self.checkin(conn);
                    } else {
                        self.discard(conn);
                    }
                    // A connection that sat in the pool may have been closed by the server;
                    // nothing was accepted yet, so one retry on a new connection is safe.
                    if reused && !retried && fail.stale_connection() {
                        retried = true;
                        continue;
                    }
                    return Err(self.fail_to_error(fail));
                }
            }
        }
    }

    /// Connect, TLS, EHLO, AUTH and QUIT on a new connection; sends no mail.
    fn check(&self) -> Result<CheckReport> {
        let mut steps = Vec::new();
        let conn = self
            .open(Some(&mut steps))
            .map_err(|f| self.fail_to_error(f))?;
        conn.quit_quietly();
        steps.push("QUIT".to_string());
        Ok(CheckReport {
            transport: "SMTP",
            server: self.cfg.server.clone(),
            steps: steps.into_iter().map(|s| redact(&s, &self.cfg)).collect(),
        })
    }

    fn describe(&self) -> String {
        let mode = match self.cfg.ssl {
            SslMode::Ssl => "SSL",
            SslMode::StartTls => "TLS",
            SslMode::None => "no TLS",
        };
        format!("SMTP {} ({mode})", self.cfg.server)
    }

    fn kind(&self) -> TransportType {
        TransportType::Smtp
    }
}

/// Adds the account to a configuration error from `net` (which knows only the file and key).
fn with_account(err: Error, account: &str) -> Error {
    match err {
        Error::Config {
            mut location,
            message,
        } => {
            location.account.get_or_insert_with(|| account.to_string());
            Error::Config { location, message }
        }
        other => other,
    }
}

/// The EHLO name: this machine's host name when it is a plain domain, else `localhost`.
fn hello_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        name
    } else {
        "localhost".to_string()
    }
}

/// Removes the password (and the AUTH strings built from it) from text shown to anyone.
fn redact(text: &str, cfg: &Config) -> String {
    let Some(password) = &cfg.password else {
        return text.to_string();
    };
    let pw = password.expose();
    let mut out = text.to_string();
    let plain = B64.encode(format!("\0{}\0{pw}", cfg.login));
    for secret in [plain.as_str(), &B64.encode(pw), pw] {
        if secret.len() >= 3 && out.contains(secret) {
            out = out.replace(secret, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccountId, AccountType, Outgoing, TlsSettings};
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// One side of a scripted SMTP server connection.
    struct Peer {
        reader: BufReader<TcpStream>,
        writer: TcpStream,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Peer {
        fn say(&mut self, text: &str) {
            self.writer.write_all(text.as_bytes()).unwrap();
        }
        /// Reads one command line (logged) or None at EOF.
        fn hear(&mut self) -> Option<String> {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => None,
                Ok(_) => {
                    let line = line.trim_end().to_string();
                    self.log.lock().unwrap().push(line.clone());
                    Some(line)
                }
            }
        }
        /// Reads DATA up to the final dot; returns the (still dot-stuffed) lines.
        fn data(&mut self) -> Vec<String> {
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return lines;
                }
                let line = line.trim_end_matches(['\r', '\n']).to_string();
                if line == "." {
                    return lines;
                }
                lines.push(line);
            }
        }
    }

    type Script = Box<dyn FnOnce(&mut Peer) + Send>;

    /// Serves `scripts[i]` on the i-th accepted connection; returns the port and the log of
    /// every command line heard.
    fn fake_server(scripts: Vec<Script>) -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let server_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for script in scripts {
                let (stream, _) = listener.accept().unwrap();
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

    fn account(port: u16, ssl: SslMode, password: Option<&str>) -> Account {
        Account {
            id: AccountId::Master,
            tenants_recid: 0,
            account_type: AccountType::Master,
            email: "from@x.example".into(),
            display_name: None,
            login: Some("login@x.example".into()),
            password: password.map(Secret::new),
            outgoing: Some(Outgoing {
                transport: TransportType::Smtp,
                host: Some("127.0.0.1".into()),
                port,
                ssl,
            }),
            incoming: None,
            sysadmin: None,
            tls: TlsSettings::default(),
            file_path: "/nonexistent".into(),
            sendmail_path: "/nonexistent".into(),
            timeout: Duration::from_secs(5),
            auth_type: Default::default(),
            oauth: None,
        }
    }

    fn msg(rcpts: &[&str]) -> BuiltMessage {
        BuiltMessage {
            raw: b"Subject: t\r\n\r\n.dot\r\nbody\r\n".to_vec(),
            envelope_from: "from@x.example".into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            message_id: "<1@x.example>".into(),
            from: "from@x.example".into(),
            subject: "t".into(),
        }
    }

    fn failure(err: Error) -> crate::error::TransportFailure {
        match err {
            Error::Transport(f) => f,
            other => panic!("{other:?}"),
        }
    }

    /// Greeting and EHLO with the given extension lines.
    fn hello(p: &mut Peer, extensions: &[&str]) {
        p.say("220 fake ESMTP\r\n");
        p.hear();
        let mut reply = String::from("250-fake\r\n");
        for (i, e) in extensions.iter().enumerate() {
            let sep = if i + 1 == extensions.len() { ' ' } else { '-' };
            reply.push_str(&format!("250{sep}{e}\r\n"));
        }
        if extensions.is_empty() {
            reply = "250 fake\r\n".into();
        }
        p.say(&reply);
    }

    /// Answers one transaction (MAIL, RCPTs, DATA, data) positively.
    fn accept_one(p: &mut Peer, rcpts: usize) -> Vec<String> {
        p.hear();
        p.say("250 ok\r\n");
        for _ in 0..rcpts {
            p.hear();
            p.say("250 ok\r\n");
        }
        p.hear();
        p.say("354 go\r\n");
        let data = p.data();
        p.say("250 queued\r\n");
        data
    }

    #[test]
    fn without_pipelining_commands_go_one_by_one_with_auth_login() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (port, log) = fake_server(vec![Box::new(move |p: &mut Peer| {
            hello(p, &["AUTH LOGIN", "8BITMIME"]);
            p.hear();
            p.say("334 VXNlcm5hbWU6\r\n");
            p.hear();
            p.say("334 UGFzc3dvcmQ6\r\n");
            p.hear();
            p.say("235 ok\r\n");
            tx.send(accept_one(p, 2)).unwrap();
            p.hear();
        })]);
        let t = SmtpTransport::new(&account(port, SslMode::None, Some("pw"))).unwrap();
        t.send(&msg(&["a@x.example", "b@x.example"])).unwrap();
        let log = log.lock().unwrap().clone();
        assert_eq!(log[1], "AUTH LOGIN");
        assert_eq!(log[2], B64.encode("login@x.example"));
        assert_eq!(log[3], B64.encode("pw"));
        assert_eq!(log[4], "MAIL FROM:<from@x.example>");
        assert_eq!(
            log[5..8],
            ["RCPT TO:<a@x.example>", "RCPT TO:<b@x.example>", "DATA"]
        );
        let data = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(data, ["Subject: t", "", "..dot", "body"]);
        // greeting, EHLO, 3 x AUTH, MAIL, 2 x RCPT, DATA, data
        assert_eq!(t.stats().round_trips, 10);
    }

    #[test]
    fn a_pooled_connection_closed_with_421_is_replaced_and_the_message_sent_once() {
        let (port, log) = fake_server(vec![
            Box::new(|p: &mut Peer| {
                hello(p, &["PIPELINING"]);
                accept_one(p, 1);
                // The next transaction finds the server timing the client out.
                p.hear();
                p.say("421 4.4.2 idle too long, closing\r\n");
            }),
            Box::new(|p: &mut Peer| {
                hello(p, &["PIPELINING"]);
                accept_one(p, 1);
                p.hear();
            }),
        ]);
        let t = SmtpTransport::new(&account(port, SslMode::None, None)).unwrap();
        t.send(&msg(&["a@x.example"])).unwrap();
        t.send(&msg(&["a@x.example"])).unwrap();
        assert_eq!(t.stats().connections, 2);
        assert_eq!(t.stats().messages, 2);
        let log = log.lock().unwrap();
        let mails = log.iter().filter(|l| l.starts_with("MAIL FROM")).count();
        let datas = log.iter().filter(|l| *l == "DATA").count();
        // MAIL went out three times (the second on the closing connection), DATA twice.
        assert_eq!((mails, datas), (3, 2), "{log:?}");
    }

    #[test]
    fn no_reply_after_the_data_is_transient_and_not_retried() {
        let (port, _log) = fake_server(vec![Box::new(|p: &mut Peer| {
            hello(p, &["PIPELINING"]);
            p.hear();
            p.hear();
            p.hear();
            p.say("250 ok\r\n250 ok\r\n354 go\r\n");
            p.data();
            // Hang up without the final reply.
        })]);
        let t = SmtpTransport::new(&account(port, SslMode::None, None)).unwrap();
        let f = failure(t.send(&msg(&["a@x.example"])).unwrap_err());
        assert!(f.transient);
        assert!(
            f.message.contains("may or may not have accepted"),
            "{}",
            f.message
        );
        assert_eq!(t.stats().connections, 1);
    }

    #[test]
    fn data_before_the_tls_handshake_is_refused() {
        let (port, _log) = fake_server(vec![Box::new(|p: &mut Peer| {
            hello(p, &["STARTTLS"]);
            p.hear();
            p.say("220 go ahead\r\n250 injected\r\n");
            p.hear();
        })]);
        let t = SmtpTransport::new(&account(port, SslMode::StartTls, None)).unwrap();
        let f = failure(t.send(&msg(&["a@x.example"])).unwrap_err());
        assert!(!f.transient);
        assert!(
            f.message.contains("before the TLS handshake"),
            "{}",
            f.message
        );
    }

    #[test]
    fn a_server_that_is_not_smtp_is_named() {
        let (port, _log) = fake_server(vec![Box::new(|p: &mut Peer| {
            p.say("HTTP/1.1 400 Bad Request\r\n\r\n");
        })]);
        let t = SmtpTransport::new(&account(port, SslMode::None, None)).unwrap();
        let f = failure(t.send(&msg(&["a@x.example"])).unwrap_err());
        assert!(!f.transient);
        assert!(
            f.message.contains("is this an SMTP server?"),
            "{}",
            f.message
        );
        assert!(f.message.contains("HTTP/1.1 400"), "{}", f.message);
    }

    #[test]
    fn password_without_auth_offered_and_oversized_messages_are_refused_locally() {
        let (port, log) = fake_server(vec![
            Box::new(|p: &mut Peer| {
                hello(p, &["PIPELINING"]);
                p.hear();
            }),
            Box::new(|p: &mut Peer| {
                hello(p, &["PIPELINING", "SIZE 10"]);
                p.hear();
            }),
        ]);
        let t = SmtpTransport::new(&account(port, SslMode::None, Some("pw"))).unwrap();
        let f = failure(t.send(&msg(&["a@x.example"])).unwrap_err());
        assert!(f.message.contains("does not offer AUTH"), "{}", f.message);
        assert!(f.message.contains("OUTGOING_SSL"), "{}", f.message);
        let t = SmtpTransport::new(&account(port, SslMode::None, None)).unwrap();
        let f = failure(t.send(&msg(&["a@x.example"])).unwrap_err());
        assert!(f.message.contains("at most 10 (SIZE)"), "{}", f.message);
        assert!(!log.lock().unwrap().iter().any(|l| l.starts_with("MAIL")));
    }

    #[test]
    fn missing_host_is_a_config_error() {
        let mut acc = account(25, SslMode::None, None);
        acc.outgoing.as_mut().unwrap().host = Some("  ".into());
        let err = SmtpTransport::new(&acc).unwrap_err();
        assert!(matches!(err, Error::Config { .. }));
        assert!(err.to_string().contains("OUTGOING_HOST"), "{err}");
    }

    #[test]
    fn debug_output_has_no_password() {
        let t = SmtpTransport::new(&account(25, SslMode::None, Some("hunter2-secret"))).unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
