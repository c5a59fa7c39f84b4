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

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::{BuiltMessage, CheckReport, Delivery, DeliveryStatus, Transport};
use crate::config::{Account, Secret, SslMode, TransportType};
use crate::error::{Error, Result};
use crate::net::{self, MaybeTls, TlsConnector};
use crate::sasl::{self, Credentials, Mechanism, TokenFailure, TokenSignIn, TokenSource};

/// Longest reply line accepted from a server (RFC 5321 says 512; be lenient).
const MAX_REPLY_LINE: usize = 8192;
/// Most lines in one multi-line reply.
const MAX_REPLY_LINES: usize = 512;
/// Idle connections older than this are closed instead of reused (servers drop idle clients,
/// typically after 60 s to 5 min).
const IDLE_REUSE_LIMIT: Duration = Duration::from_secs(50);
/// Most idle connections kept per account.
const MAX_IDLE: usize = 16;
/// Longest server text kept in an error message.
const MAX_TEXT_IN_ERROR: usize = 400;
/// RFC 4954 §4 keeps AUTH within SMTP's command line limit (RFC 5321: 512 octets, CRLF
/// included): a longer initial response (any real access token) goes after the server's 334.
const AUTH_LINE_LIMIT: usize = 512;
/// Challenges answered in one AUTH exchange before the client cancels it.
const MAX_CHALLENGES: usize = 3;

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

struct Idle {
    conn: Conn,
    since: Instant,
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

    /// Closes every idle connection (QUIT). Later sends open new ones.
    pub fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.lock_idle());
        for i in idle {
            i.conn.quit_quietly();
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkout(&self) -> Result<(Conn, bool), Fail> {
        loop {
            let idle = self.lock_idle().pop();
            match idle {
                Some(i) if i.since.elapsed() < IDLE_REUSE_LIMIT && i.conn.looks_alive() => {
                    return Ok((i.conn, true))
                }
                Some(i) => i.conn.quit_quietly(),
                None => return Ok((self.open(None)?, false)),
            }
        }
    }

    fn checkin(&self, mut conn: Conn) {
        self.counters
            .round_trips
            .fetch_add(std::mem::take(&mut conn.round_trips), Ordering::Relaxed);
        let mut idle = self.lock_idle();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        } else {
            drop(idle);
            conn.quit_quietly();
        }
    }

    fn discard(&self, mut conn: Conn) {
        self.counters
            .round_trips
            .fetch_add(std::mem::take(&mut conn.round_trips), Ordering::Relaxed);
        conn.abort();
    }

    /// Connects, reads the greeting, says EHLO, secures and authenticates a new connection;
    /// a second connection when the server closed the first after refusing a token (the
    /// fresh token goes on the new one).
    fn open(&self, mut steps: Option<&mut Vec<String>>) -> Result<Conn, Fail> {
        let mut signin = self
            .cfg
            .tokens
            .as_ref()
            .map(|t| TokenSignIn::new(Arc::clone(t)));
        let mut redialed = false;
        loop {
            match self.open_once(steps.as_deref_mut(), signin.as_mut()) {
                Err(fail)
                    if !redialed
                        && signin.as_ref().is_some_and(TokenSignIn::refreshed)
                        && fail.stale_connection() =>
                {
                    redialed = true;
                }
                other => return other,
            }
        }
    }

    fn open_once(
        &self,
        mut steps: Option<&mut Vec<String>>,
        signin: Option<&mut TokenSignIn>,
    ) -> Result<Conn, Fail> {
        let cfg = &self.cfg;
        let mut note = |s: String| {
            if let Some(steps) = steps.as_deref_mut() {
                steps.push(s);
            }
        };
        let tcp = net::connect_tcp(&cfg.host, cfg.port, cfg.timeout).map_err(|e| Fail::Io {
            stage: "connect",
            err: e,
        })?;
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        note(format!("connected to {}", cfg.server));
        let stream = match (cfg.ssl, &cfg.connector) {
            (SslMode::Ssl, Some(connector)) => {
                let tls = MaybeTls::start_tls(connector, &cfg.host, tcp).map_err(Fail::tls)?;
                note("TLS established (implicit TLS), certificate accepted".to_string());
                tls
            }
            _ => MaybeTls::Plain(tcp),
        };
        let mut conn = Conn::new(stream);
        conn.expect_write_turn();
        let greeting = conn.read_reply("greeting")?;
        if greeting.code != 220 {
            return Err(Fail::Reply {
                what: "server greeting".into(),
                reply: greeting,
            });
        }
        conn.ehlo(&cfg.hello)?;
        if cfg.ssl == SslMode::StartTls {
            if !conn.caps.starttls {
                return Err(Fail::Local {
                    message: "the server does not offer STARTTLS, which OUTGOING_SSL = TLS \
                              requires (use SSL for implicit TLS, or \"\" for none)"
                        .into(),
                    transient: false,
                });
            }
            let reply = conn.command("STARTTLS", "STARTTLS")?;
            if reply.code != 220 {
                return Err(Fail::Reply {
                    what: "STARTTLS".into(),
                    reply,
                });
            }
            let connector = cfg.connector.as_ref().expect("TLS modes have a connector");
            conn = conn.upgrade(connector, &cfg.host)?;
            note("STARTTLS done, certificate accepted".to_string());
            conn.ehlo(&cfg.hello)?;
        }
        note(format!("EHLO: {}", conn.caps.summary()));
        if let Some(password) = &cfg.password {
            let mechanism = conn.auth(&cfg.login, password, cfg.ssl)?;
            note(format!("authenticated as {} ({mechanism})", cfg.login));
        } else if let Some(signin) = signin {
            let mechanism = conn.auth_token(cfg, signin)?;
            let fresh = if signin.refreshed() {
                ", with a fresh token after the first was refused"
            } else {
                ""
            };
            note(format!(
                "authenticated as {} ({mechanism} access token{fresh})",
                cfg.login
            ));
        }
        Ok(conn)
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

impl Drop for SmtpTransport {
    fn drop(&mut self) {
        self.close_idle();
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

/// The message for DATA: CRLF line ends, leading dots doubled, ending with `.` on its own line.
fn dot_stuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 64 + 8);
    let mut line_start = true;
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if line_start && b == b'.' {
            out.push(b'.');
        }
        match b {
            b'\r' if raw.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                line_start = true;
                continue;
            }
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
            }
            _ => {
                out.push(b);
                line_start = false;
            }
        }
        i += 1;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// One SMTP reply: the code and its text lines.
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The reply as one line, without control characters, bounded.
    fn text(&self) -> String {
        let joined: String = self
            .lines
            .iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        let joined = joined.trim();
        if joined.len() <= MAX_TEXT_IN_ERROR {
            return format!("{} {joined}", self.code).trim_end().to_string();
        }
        let mut end = MAX_TEXT_IN_ERROR;
        while !joined.is_char_boundary(end) {
            end -= 1;
        }
        format!("{} {}...", self.code, &joined[..end])
    }
}

/// What the server supports, from its EHLO reply.
#[derive(Debug, Clone, Default)]
struct Caps {
    starttls: bool,
    pipelining: bool,
    eight_bit: bool,
    smtputf8: bool,
    /// `SIZE n` (0 = no limit announced).
    size: Option<u64>,
    auth: Vec<String>,
}

impl Caps {
    fn parse(reply: &Reply) -> Caps {
        let mut caps = Caps::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => caps.auth.extend(words.map(|w| w.to_ascii_uppercase())),
                _ => {
                    if let Some(list) = keyword.strip_prefix("AUTH=") {
                        caps.auth.push(list.to_string());
                        caps.auth.extend(words.map(|w| w.to_ascii_uppercase()));
                    }
                }
            }
        }
        caps.auth.dedup();
        caps
    }

    fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.pipelining {
            parts.push("PIPELINING".to_string());
        }
        if self.eight_bit {
            parts.push("8BITMIME".to_string());
        }
        if self.smtputf8 {
            parts.push("SMTPUTF8".to_string());
        }
        if let Some(size) = self.size {
            parts.push(format!("SIZE {size}"));
        }
        if !self.auth.is_empty() {
            parts.push(format!("AUTH {}", self.auth.join(" ")));
        }
        if parts.is_empty() {
            "no extensions".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// Why an SMTP exchange failed (converted to [`Error::Transport`] with the account).
#[derive(Debug)]
enum Fail {
    /// A network error (connect, read, write, timeout) at `stage`.
    Io { stage: &'static str, err: io::Error },
    /// No reply after the whole message was sent: it may or may not have been accepted.
    NoReplyAfterData { err: Option<io::Error> },
    /// The TLS handshake failed.
    Tls(io::Error),
    /// The server closed the connection at `stage`.
    Closed { stage: &'static str },
    /// A negative reply.
    Reply { what: String, reply: Reply },
    /// One or more recipients refused: `(address, reply)`.
    Recipients(Vec<(String, Reply)>),
    /// The server said something that is not SMTP.
    Protocol {
        stage: &'static str,
        message: String,
    },
    /// A problem found on our side (missing extension, size, ...).
    Local { message: String, transient: bool },
    /// The whole error, already phrased (a refused token, the token source's own error).
    Fatal(Error),
}

impl Fail {
    fn tls(err: io::Error) -> Fail {
        Fail::Tls(err)
    }

    /// True when the failure looks like a pooled connection the server had closed (so the
    /// message was certainly not accepted and a new connection may succeed).
    fn stale_connection(&self) -> bool {
        match self {
            Fail::Io { stage, .. } | Fail::Closed { stage } => *stage != "connect",
            Fail::Reply { reply, .. } => reply.code == 421,
            _ => false,
        }
    }

    /// `(code, transient, message)`.
    fn describe(self, timeout: Duration, ssl: SslMode) -> (Option<u16>, bool, String) {
        let io_text = |err: &io::Error| {
            if matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) {
                format!("timed out after {} s", timeout.as_secs_f32())
            } else {
                net::describe_io_error(err)
            }
        };
        match self {
            Fail::Io {
                stage: "connect",
                err,
            } => (None, true, format!("cannot connect: {}", io_text(&err))),
            Fail::Io { stage, err } => {
                let mut text = format!("{} at the {stage}", io_text(&err));
                if stage == "greeting"
                    && ssl != SslMode::Ssl
                    && matches!(
                        err.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    )
                {
                    text.push_str(
                        " (the server sent nothing; if it expects TLS from the start, set \
                         OUTGOING_SSL = SSL)",
                    );
                }
                (None, true, text)
            }
            Fail::NoReplyAfterData { err } => {
                let why = err
                    .as_ref()
                    .map(io_text)
                    .unwrap_or_else(|| "the server closed the connection".to_string());
                (
                    None,
                    true,
                    format!(
                        "no reply after the message was sent ({why}); the server may or may \
                         not have accepted it"
                    ),
                )
            }
            Fail::Tls(err) => {
                let timed_out = matches!(
                    err.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                );
                if timed_out {
                    let text = format!("TLS handshake {}", io_text(&err));
                    (None, true, text)
                } else {
                    (None, false, net::describe_io_error(&err))
                }
            }
            Fail::Closed { stage } => (
                None,
                true,
                format!("the server closed the connection at the {stage}"),
            ),
            Fail::Reply { what, reply } => {
                let transient = (400..500).contains(&reply.code);
                (
                    Some(reply.code),
                    transient,
                    format!("{what}: {}", reply.text()),
                )
            }
            Fail::Recipients(refused) => {
                let code = refused.first().map(|(_, r)| r.code);
                let transient = refused.iter().all(|(_, r)| (400..500).contains(&r.code));
                let list: Vec<String> = refused
                    .iter()
                    .map(|(addr, r)| format!("<{addr}> {}", r.text()))
                    .collect();
                (
                    code,
                    transient,
                    format!(
                        "recipient refused, message not sent to anyone: {}",
                        list.join("; ")
                    ),
                )
            }
            Fail::Protocol { stage, message } => (
                None,
                false,
                format!("unexpected answer at the {stage}: {message} (is this an SMTP server?)"),
            ),
            Fail::Local { message, transient } => (None, transient, message),
            Fail::Fatal(err) => (None, false, err.to_string()),
        }
    }
}

/// One connection, after greeting/EHLO/TLS/AUTH.
struct Conn {
    stream: BufReader<MaybeTls>,
    caps: Caps,
    /// Set by a write; the next read then counts one round trip.
    wrote: bool,
    round_trips: u64,
}

impl Conn {
    fn new(stream: MaybeTls) -> Conn {
        Conn {
            stream: BufReader::with_capacity(16 * 1024, stream),
            caps: Caps::default(),
            wrote: false,
            round_trips: 0,
        }
    }

    fn expect_write_turn(&mut self) {
        self.wrote = true;
    }

    fn write(&mut self, data: &[u8], stage: &'static str) -> Result<(), Fail> {
        let stream = self.stream.get_mut();
        stream
            .write_all(data)
            .and_then(|_| stream.flush())
            .map_err(|err| Fail::Io { stage, err })?;
        self.wrote = true;
        Ok(())
    }

    fn command(&mut self, line: &str, stage: &'static str) -> Result<Reply, Fail> {
        self.write(format!("{line}\r\n").as_bytes(), stage)?;
        self.read_reply(stage)
    }

    fn read_line(&mut self, stage: &'static str) -> Result<String, Fail> {
        let mut line = Vec::new();
        loop {
            let available = match self.stream.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(Fail::Io { stage, err }),
            };
            if available.is_empty() {
                return Err(Fail::Closed { stage });
            }
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            line.extend_from_slice(&available[..take]);
            self.stream.consume(take);
            if line.len() > MAX_REPLY_LINE {
                return Err(Fail::Protocol {
                    stage,
                    message: format!("a reply line longer than {MAX_REPLY_LINE} bytes"),
                });
            }
            if done {
                break;
            }
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    fn read_reply(&mut self, stage: &'static str) -> Result<Reply, Fail> {
        if std::mem::take(&mut self.wrote) {
            self.round_trips += 1;
        }
        let mut lines = Vec::new();
        loop {
            let line = self.read_line(stage)?;
            let bytes = line.as_bytes();
            let code = (bytes.len() >= 3 && bytes[..3].iter().all(u8::is_ascii_digit))
                .then(|| line[..3].parse::<u16>().ok())
                .flatten()
                .filter(|c| (200..600).contains(c));
            let Some(code) = code else {
                let shown: String = line.chars().take(80).filter(|c| !c.is_control()).collect();
                return Err(Fail::Protocol {
                    stage,
                    message: format!("{shown:?}"),
                });
            };
            lines.push(line.get(4..).unwrap_or("").to_string());
            match bytes.get(3) {
                Some(b'-') if lines.len() < MAX_REPLY_LINES => continue,
                Some(b'-') => {
                    return Err(Fail::Protocol {
                        stage,
                        message: format!("a reply of more than {MAX_REPLY_LINES} lines"),
                    })
                }
                None | Some(b' ') => return Ok(Reply { code, lines }),
                Some(_) => {
                    return Err(Fail::Protocol {
                        stage,
                        message: format!("{:?}", line.chars().take(80).collect::<String>()),
                    })
                }
            }
        }
    }

    fn ehlo(&mut self, hello: &str) -> Result<(), Fail> {
        let reply = self.command(&format!("EHLO {hello}"), "EHLO")?;
        if reply.positive() {
            self.caps = Caps::parse(&reply);
            return Ok(());
        }
        // Pre-ESMTP servers: HELO, no extensions.
        if matches!(reply.code, 500 | 502) {
            let helo = self.command(&format!("HELO {hello}"), "HELO")?;
            if helo.positive() {
                self.caps = Caps::default();
                return Ok(());
            }
            return Err(Fail::Reply {
                what: "HELO".into(),
                reply: helo,
            });
        }
        Err(Fail::Reply {
            what: "EHLO".into(),
            reply,
        })
    }

    /// Switches to TLS after `220` to STARTTLS. Bytes the server sent before the handshake
    /// would be an injection attempt: refused.
    fn upgrade(self, connector: &TlsConnector, host: &str) -> Result<Conn, Fail> {
        if !self.stream.buffer().is_empty() {
            return Err(Fail::Protocol {
                stage: "STARTTLS",
                message: "the server sent data before the TLS handshake".into(),
            });
        }
        let round_trips = self.round_trips;
        let stream = self
            .stream
            .into_inner()
            .upgrade(connector, host)
            .map_err(Fail::tls)?;
        let mut conn = Conn::new(stream);
        conn.round_trips = round_trips;
        Ok(conn)
    }

    /// AUTH PLAIN (one round trip) when offered, else AUTH LOGIN. Returns the mechanism.
    fn auth(&mut self, login: &str, password: &Secret, ssl: SslMode) -> Result<&'static str, Fail> {
        let what = || format!("authentication as {login}");
        if self.caps.auth.is_empty() {
            let hint = if ssl == SslMode::None {
                " (many servers offer it only over TLS: check OUTGOING_SSL)"
            } else {
                ""
            };
            return Err(Fail::Local {
                message: format!(
                    "the server does not offer AUTH, but the account has a password{hint}"
                ),
                transient: false,
            });
        }
        let offers = |m: &str| self.caps.auth.iter().any(|a| a == m);
        let (mechanism, reply) = if offers("PLAIN") {
            let token = B64.encode(format!("\0{login}\0{}", password.expose()));
            let mut reply = self.command(&format!("AUTH PLAIN {token}"), "AUTH")?;
            if reply.code == 334 {
                reply = self.command(&token, "AUTH")?;
            }
            ("PLAIN", reply)
        } else if offers("LOGIN") {
            let mut reply = self.command("AUTH LOGIN", "AUTH")?;
            if reply.code == 334 {
                reply = self.command(&B64.encode(login), "AUTH")?;
            }
            if reply.code == 334 {
                reply = self.command(&B64.encode(password.expose()), "AUTH")?;
            }
            ("LOGIN", reply)
        } else {
            return Err(Fail::Local {
                message: format!(
                    "the server offers AUTH {} but not PLAIN or LOGIN",
                    self.caps.auth.join(" ")
                ),
                transient: false,
            });
        };
        match reply.code {
            235 => Ok(mechanism),
            334 => {
                let _ = self.command("*", "AUTH");
                Err(Fail::Protocol {
                    stage: "AUTH",
                    message: "the server kept asking for more authentication data".into(),
                })
            }
            _ => Err(Fail::Reply {
                what: what(),
                reply,
            }),
        }
    }

    /// AUTH XOAUTH2 (else OAUTHBEARER) with the sign-in's token; after a refusal, the retry
    /// decided by the sign-in. Returns the mechanism.
    fn auth_token(&mut self, cfg: &Config, signin: &mut TokenSignIn) -> Result<&'static str, Fail> {
        let offers = |m: &str| self.caps.auth.iter().any(|a| a == m);
        let Some(mechanism) = Mechanism::choose(offers) else {
            let hint = if cfg.ssl == SslMode::None && self.caps.auth.is_empty() {
                " (many servers offer AUTH only over TLS: check OUTGOING_SSL)"
            } else {
                ""
            };
            return Err(Fail::Local {
                message: format!(
                    "{}{hint}",
                    sasl::no_token_mechanism("SMTP", &self.caps.auth.join(" "))
                ),
                transient: false,
            });
        };
        let name = mechanism.name();
        signin.using(mechanism);
        loop {
            let response = signin
                .initial_response(mechanism, &cfg.login, &cfg.host, cfg.port)
                .map_err(Fail::Fatal)?;
            let mut failure = None;
            let result = self.token_exchange(mechanism, &response, &mut failure);
            let refused = |signin: &TokenSignIn, text: &str| {
                Fail::Fatal(sasl::token_refused(
                    &cfg.account,
                    "SMTP",
                    &cfg.server,
                    &cfg.login,
                    mechanism,
                    failure.as_ref(),
                    signin.refreshed(),
                    &signin.redact(text),
                ))
            };
            match result {
                Ok(reply) if reply.code == 235 => return Ok(name),
                Ok(reply) if reply.code == 535 || (failure.is_some() && reply.code >= 500) => {
                    if signin.retry_after(failure.as_ref()).map_err(Fail::Fatal)? {
                        continue;
                    }
                    return Err(refused(signin, &reply.text()));
                }
                Ok(mut reply) => {
                    for line in &mut reply.lines {
                        *line = signin.redact(line);
                    }
                    return Err(Fail::Reply {
                        what: format!("authentication as {} ({name})", cfg.login),
                        reply,
                    });
                }
                // Refused (the failure challenge came), then cut off: when a retry is due,
                // `open` makes it on a new connection.
                Err(fail @ (Fail::Io { .. } | Fail::Closed { .. }))
                    if failure.is_some() && !signin.refreshed() =>
                {
                    if signin.retry_after(failure.as_ref()).map_err(Fail::Fatal)? {
                        return Err(fail);
                    }
                    return Err(refused(signin, "the server closed the connection"));
                }
                Err(Fail::Protocol { stage, message }) => {
                    return Err(Fail::Protocol {
                        stage,
                        message: signin.redact(&message),
                    })
                }
                Err(fail) => return Err(fail),
            }
        }
    }

    /// One AUTH exchange with the base64 initial `response`, up to the server's final reply;
    /// a failure challenge on the way is decoded into `failure`.
    fn token_exchange(
        &mut self,
        mechanism: Mechanism,
        response: &str,
        failure: &mut Option<TokenFailure>,
    ) -> Result<Reply, Fail> {
        let name = mechanism.name();
        let inline = format!("AUTH {name} {response}");
        let mut reply = if inline.len() + 2 <= AUTH_LINE_LIMIT {
            self.command(&inline, "AUTH")?
        } else {
            let reply = self.command(&format!("AUTH {name}"), "AUTH")?;
            if reply.code != 334 {
                return Ok(reply);
            }
            self.command(response, "AUTH")?
        };
        let mut challenges = 0;
        while reply.code == 334 {
            challenges += 1;
            if challenges >= MAX_CHALLENGES {
                let _ = self.command("*", "AUTH");
                return Err(Fail::Protocol {
                    stage: "AUTH",
                    message: "the server kept asking for more authentication data".into(),
                });
            }
            if let Some(found) = reply
                .lines
                .first()
                .and_then(|l| TokenFailure::from_challenge(l))
            {
                *failure = Some(found);
            }
            reply = self.command(sasl::failure_ack(mechanism), "AUTH")?;
        }
        Ok(reply)
    }

    /// One mail transaction. On failure, says whether the connection can be reused (the
    /// transaction was reset cleanly) or must be dropped.
    fn transaction(&mut self, msg: &BuiltMessage, data: &[u8]) -> Result<(), (Fail, bool)> {
        let caps = self.caps.clone();
        let mut mail = format!("MAIL FROM:<{}>", msg.envelope_from);
        if let Some(limit) = caps.size {
            if limit > 0 && msg.raw.len() as u64 > limit {
                return Err((
                    Fail::Local {
                        message: format!(
                            "the message is {} bytes; the server accepts at most {limit} (SIZE)",
                            msg.raw.len()
                        ),
                        transient: false,
                    },
                    true,
                ));
            }
            mail.push_str(&format!(" SIZE={}", msg.raw.len()));
        }
        if !msg.raw.is_ascii() {
            if !caps.eight_bit {
                return Err((
                    Fail::Local {
                        message: "the message has 8-bit content but the server does not offer \
                                  8BITMIME"
                            .into(),
                        transient: false,
                    },
                    true,
                ));
            }
            mail.push_str(" BODY=8BITMIME");
        }
        let non_ascii = std::iter::once(&msg.envelope_from)
            .chain(&msg.recipients)
            .find(|a| !a.is_ascii());
        if let Some(addr) = non_ascii {
            if !caps.smtputf8 {
                return Err((
                    Fail::Local {
                        message: format!(
                            "<{addr}> is not ASCII and the server does not offer SMTPUTF8"
                        ),
                        transient: false,
                    },
                    true,
                ));
            }
            mail.push_str(" SMTPUTF8");
        }

        let mut refused: Vec<(String, Reply)> = Vec::new();
        if caps.pipelining {
            let mut batch = format!("{mail}\r\n");
            for rcpt in &msg.recipients {
                batch.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes(), "MAIL FROM")
                .map_err(|f| (f, false))?;
            // 421 means the server is closing the connection: stop reading there.
            let closing = |what: String, reply: Reply| (Fail::Reply { what, reply }, false);
            let mail_reply = self.read_reply("MAIL FROM").map_err(|f| (f, false))?;
            if mail_reply.code == 421 {
                return Err(closing("MAIL FROM".into(), mail_reply));
            }
            for rcpt in &msg.recipients {
                let reply = self.read_reply("RCPT TO").map_err(|f| (f, false))?;
                if reply.code == 421 {
                    return Err(closing(format!("recipient <{rcpt}>"), reply));
                }
                if !reply.positive() {
                    refused.push((rcpt.clone(), reply));
                }
            }
            let data_reply = self.read_reply("DATA").map_err(|f| (f, false))?;
            if data_reply.code == 421 {
                return Err(closing("DATA".into(), data_reply));
            }
            let failure = if !mail_reply.positive() {
                Some(Fail::Reply {
                    what: format!("sender <{}> refused", msg.envelope_from),
                    reply: mail_reply,
                })
            } else if !refused.is_empty() {
                Some(Fail::Recipients(refused))
            } else if data_reply.code != 354 {
                Some(Fail::Reply {
                    what: "DATA refused".into(),
                    reply: data_reply.clone(),
                })
            } else {
                None
            };
            if let Some(fail) = failure {
                // Already in DATA: the only way out without sending a message is to hang up.
                if data_reply.code == 354 {
                    return Err((fail, false));
                }
                let usable = self.reset();
                return Err((fail, usable));
            }
        } else {
            let reply = self.command(&mail, "MAIL FROM").map_err(|f| (f, false))?;
            if !reply.positive() {
                let usable = reply.code != 421 && self.reset();
                return Err((
                    Fail::Reply {
                        what: format!("sender <{}> refused", msg.envelope_from),
                        reply,
                    },
                    usable,
                ));
            }
            for rcpt in &msg.recipients {
                let reply = self
                    .command(&format!("RCPT TO:<{rcpt}>"), "RCPT TO")
                    .map_err(|f| (f, false))?;
                if reply.code == 421 {
                    let what = format!("recipient <{rcpt}>");
                    return Err((Fail::Reply { what, reply }, false));
                }
                if !reply.positive() {
                    refused.push((rcpt.clone(), reply));
                }
            }
            if !refused.is_empty() {
                let usable = self.reset();
                return Err((Fail::Recipients(refused), usable));
            }
            let reply = self.command("DATA", "DATA").map_err(|f| (f, false))?;
            if reply.code != 354 {
                let usable = self.reset();
                return Err((
                    Fail::Reply {
                        what: "DATA refused".into(),
                        reply,
                    },
                    usable,
                ));
            }
        }

        // A failed write never delivered the final "." line: the message was not accepted.
        self.write(data, "message data").map_err(|f| (f, false))?;
        let reply = match self.read_reply("end of data") {
            Ok(reply) => reply,
            Err(Fail::Io { err, .. }) => {
                return Err((Fail::NoReplyAfterData { err: Some(err) }, false))
            }
            Err(Fail::Closed { .. }) => return Err((Fail::NoReplyAfterData { err: None }, false)),
            Err(other) => return Err((other, false)),
        };
        if reply.positive() {
            Ok(())
        } else {
            let usable = reply.code != 421;
            Err((
                Fail::Reply {
                    what: "message refused".into(),
                    reply,
                },
                usable,
            ))
        }
    }

    /// RSET; true when the connection is clean for another transaction.
    fn reset(&mut self) -> bool {
        matches!(self.command("RSET", "RSET"), Ok(r) if r.positive())
    }

    /// True when nothing is waiting on the socket and it is not closed (no round trip).
    fn looks_alive(&self) -> bool {
        if !self.stream.buffer().is_empty() {
            return false;
        }
        let tcp = self.stream.get_ref().tcp();
        if tcp.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let alive = matches!(tcp.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        tcp.set_nonblocking(false).is_ok() && alive
    }

    /// Sends QUIT without waiting for the answer, then closes.
    fn quit_quietly(mut self) {
        let _ = self.write(b"QUIT\r\n", "QUIT");
        self.abort();
    }

    fn abort(&mut self) {
        match self.stream.get_mut() {
            MaybeTls::Tls(tls) => {
                let _ = tls.shutdown();
            }
            MaybeTls::Plain(tcp) => {
                let _ = tcp.shutdown(std::net::Shutdown::Both);
            }
        }
    }
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

    #[test]
    fn dot_stuffing_and_line_ends() {
        assert_eq!(
            dot_stuff(b"a\r\n.b\r\n..c\r\n"),
            b"a\r\n..b\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b".\r\nx"), b"..\r\nx\r\n.\r\n");
        assert_eq!(dot_stuff(b"bare\nlf\rcr"), b"bare\r\nlf\r\ncr\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }

    #[test]
    fn ehlo_capabilities_are_parsed() {
        let reply = Reply {
            code: 250,
            lines: vec![
                "mail.example.edu Hello".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "8bitmime".into(),
                "AUTH PLAIN login".into(),
                "AUTH=LOGIN".into(),
                "STARTTLS".into(),
            ],
        };
        let caps = Caps::parse(&reply);
        assert!(caps.pipelining && caps.eight_bit && caps.starttls && !caps.smtputf8);
        assert_eq!(caps.size, Some(1000));
        assert!(caps.auth.contains(&"PLAIN".to_string()));
        assert!(caps.auth.contains(&"LOGIN".to_string()));
    }

    #[test]
    fn reply_text_is_bounded_and_clean() {
        let r = Reply {
            code: 550,
            lines: vec!["5.1.1 a\u{7}b".into(), "x".repeat(1000)],
        };
        let t = r.text();
        assert!(t.starts_with("550 5.1.1 ab x"), "{t}");
        assert!(t.len() < MAX_TEXT_IN_ERROR + 10);
    }
}
