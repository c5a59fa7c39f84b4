//! An in-house POP3 client: RFC 1939, CAPA (RFC 2449), STLS (RFC 2595), AUTH PLAIN (RFC 5034),
//! AUTH XOAUTH2 / OAUTHBEARER with an access token (RFC 7628).
//!
//! It works on bytes and is generic over any `Read + Write` stream. A session is typed by its
//! state: [`Pop3Session<S, Authorization>`] after the greeting, [`Pop3Session<S, Transaction>`]
//! after [`login`](Pop3Session::login).
//!
//! # QUIT commits, nothing else does
//!
//! A POP3 server only removes the messages marked with `DELE` when the client sends `QUIT`.
//! Therefore:
//! - [`quit`](Pop3Session::quit) is the ONLY way `QUIT` is ever sent. It consumes the session.
//! - Dropping a session just closes the connection: pending `DELE`s are NOT committed. There
//!   is no `Drop` impl that sends anything.
//! - Any I/O or protocol error poisons the session: every later call (including `quit`) fails
//!   at once without touching the wire, so a half-done batch of `DELE`s is never committed. A
//!   plain `-ERR` reply (e.g. "no such message") does not poison.
//! - After an error the caller either calls [`rset`](Pop3Session::rset) (if the session is
//!   not poisoned) or simply drops the session.

pub mod mailbox;
mod wire;

pub use mailbox::Pop3Mailbox;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod token_tests;

use std::fmt;
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::time::Duration;

use base64::Engine as _;

use crate::config::{Secret, SslMode, TlsSettings};
use crate::incoming::Flow;
use crate::net::{self, MaybeTls};
use crate::sasl::{self, Mechanism, TokenFailure, TokenSignIn};
use wire::{listing_lines, sanitize, Conn, Fail, SaslReply, Status, LISTING_LIMIT};

/// RFC 5034 §4: an `AUTH` command with its initial response may be at most this long
/// (CRLF included); a longer response goes after the server's `+` instead.
const AUTH_LINE_LIMIT: usize = 255;
/// Challenges answered in one AUTH exchange before the client gives up (the token
/// mechanisms need at most two: the empty one and the failure).
const MAX_CHALLENGES: usize = 3;

/// Commands kept in flight when the server offers PIPELINING (refilled when half are
/// answered). Commands are tiny (~16 bytes): 1024 of them are 16 KiB, which the socket buffers
/// hold, so neither side can block on a write while the other waits for it — and a mailbox of
/// a few hundred messages costs one round trip, not one per 16 messages.
pub const PIPELINE_WINDOW: usize = 1024;

/// Typestate: greeted, not logged in.
#[derive(Debug)]
pub struct Authorization;
/// Typestate: logged in, the maildrop is locked.
#[derive(Debug)]
pub struct Transaction;

/// The states a [`Pop3Session`] can be in.
pub trait SessionState: sealed::Sealed {
    const NAME: &'static str;
}
impl SessionState for Authorization {
    const NAME: &'static str = "authorization";
}
impl SessionState for Transaction {
    const NAME: &'static str = "transaction";
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Authorization {}
    impl Sealed for super::Transaction {}
}

/// What the server announced in reply to `CAPA`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// False when `CAPA` was not asked yet or the server does not support it.
    pub known: bool,
    /// The capability lines as sent (sanitized), e.g. `SASL PLAIN LOGIN`.
    pub lines: Vec<String>,
}

impl Capabilities {
    fn parse(body: &[u8]) -> Capabilities {
        Capabilities {
            known: true,
            lines: listing_lines(body).map(sanitize).collect(),
        }
    }

    fn words(&self, name: &str) -> Option<Vec<&str>> {
        self.lines.iter().find_map(|line| {
            let mut words = line.split_whitespace();
            match words.next() {
                Some(first) if first.eq_ignore_ascii_case(name) => Some(words.collect()),
                _ => None,
            }
        })
    }

    /// Whether the capability `name` (case-insensitive) was announced.
    pub fn has(&self, name: &str) -> bool {
        self.words(name).is_some()
    }
    pub fn pipelining(&self) -> bool {
        self.has("PIPELINING")
    }
    pub fn uidl(&self) -> bool {
        self.has("UIDL")
    }
    pub fn stls(&self) -> bool {
        self.has("STLS")
    }
    pub fn user(&self) -> bool {
        self.has("USER")
    }
    pub fn top(&self) -> bool {
        self.has("TOP")
    }
    /// The SASL mechanisms, upper-cased (empty when `SASL` was not announced).
    pub fn sasl(&self) -> Vec<String> {
        self.words("SASL")
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.to_ascii_uppercase())
            .collect()
    }
    /// The `IMPLEMENTATION` text, if any.
    pub fn implementation(&self) -> Option<String> {
        self.words("IMPLEMENTATION").map(|w| w.join(" "))
    }
}

/// `STAT`: how many messages and how many octets the maildrop holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub count: u32,
    pub size: u64,
}

/// One line of `LIST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListEntry {
    pub number: u32,
    pub size: u64,
}

/// One line of `UIDL`: the message number in this session and its unique id (stable across
/// sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidlEntry {
    pub number: u32,
    pub uid: String,
}

/// What signing in with a token on one connection came to.
pub enum TokenLogin<S> {
    LoggedIn(Pop3Session<S, Transaction>),
    /// The server closed the connection after refusing the token: the fresh token waits in
    /// the sign-in, to be sent on a new connection. The error is what ended this one.
    Reconnect(crate::Error),
}

impl<S> fmt::Debug for TokenLogin<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenLogin::LoggedIn(_) => f.write_str("LoggedIn"),
            TokenLogin::Reconnect(e) => f.debug_tuple("Reconnect").field(e).finish(),
        }
    }
}

/// One AUTH exchange with a token: the failure challenge if the server sent one, and how it
/// ended (`Ok(None)` signed in, `Ok(Some(text))` refused with `-ERR text`).
type TokenAttempt = (Option<TokenFailure>, Result<Option<String>, Fail>);

/// The outcome of one command of a pipelined batch: the data, or the server's `-ERR` text.
pub type Fetched = Result<Vec<u8>, String>;

/// A POP3 session over the stream `S`, in state `St`. See the module docs: only
/// [`quit`](Pop3Session::quit) sends `QUIT`; drop never does.
pub struct Pop3Session<S, St = Authorization> {
    conn: Conn<S>,
    account: String,
    server: String,
    greeting: String,
    caps: Capabilities,
    /// Set by the first error that left the stream in an unknown state.
    poisoned: Option<String>,
    _state: PhantomData<St>,
}

impl<S, St: SessionState> fmt::Debug for Pop3Session<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pop3Session")
            .field("account", &self.account)
            .field("server", &self.server)
            .field("state", &St::NAME)
            .field("poisoned", &self.poisoned.is_some())
            .finish()
    }
}

/// Connects to a POP3 server the way an account's `INCOMING_SSL` says and returns the
/// session ready for [`login`](Pop3Session::login), capabilities read:
/// - `SSL`: implicit TLS from the first byte (usually port 995);
/// - `TLS`: plain connect, then `STLS` — required: if the server does not offer it, this
///   fails rather than let the password travel in clear;
/// - none: plain text.
///
/// `account` (`master` or the RECID) and `host:port` go into every error.
pub fn connect(
    account: &str,
    host: &str,
    port: u16,
    ssl: SslMode,
    tls: &TlsSettings,
    timeout: Duration,
) -> crate::Result<Pop3Session<MaybeTls>> {
    let server = net::server_label(host, port);
    let fail = |f: Fail| f.into_error(account, &server);
    // Connected first: the TCP handshake overlaps the building of the TLS connector.
    let connector = || match ssl {
        SslMode::None => Ok(None),
        SslMode::Ssl | SslMode::StartTls => net::tls_connector(tls)
            .map(Some)
            .map_err(|e| fail(Fail::Other(e))),
    };
    let tcp = match net::connect_tcp(host, port, timeout) {
        Ok(tcp) => tcp,
        Err(e) => {
            // A broken CA_FILE is the thing to fix first, even with the server down.
            connector()?;
            return Err(fail(Fail::io("connecting", e)));
        }
    };
    let connector = connector()?;
    let stream = match (&connector, ssl) {
        (Some(connector), SslMode::Ssl) => MaybeTls::start_tls(connector, host, tcp)
            .map_err(|e| fail(Fail::io("starting TLS", e)))?,
        _ => MaybeTls::Plain(tcp),
    };
    let mut session = Pop3Session::start(stream, account, &server)?;
    session.capa()?;
    match (connector, ssl) {
        (Some(connector), SslMode::StartTls) => {
            if session.capabilities().known && !session.capabilities().stls() {
                return Err(fail(Fail::Protocol(
                    "the server does not offer STLS; refusing to log in without TLS \
                     (INCOMING_SSL is TLS)"
                        .to_string(),
                )));
            }
            session.stls(|plain| plain.upgrade(&connector, host))
        }
        _ => Ok(session),
    }
}

impl<S: Read + Write, St: SessionState> Pop3Session<S, St> {
    fn into_state<T>(self) -> Pop3Session<S, T> {
        Pop3Session {
            conn: self.conn,
            account: self.account,
            server: self.server,
            greeting: self.greeting,
            caps: self.caps,
            poisoned: self.poisoned,
            _state: PhantomData,
        }
    }

    /// Fails fast when poisoned; otherwise runs `op` and poisons the session if `op` left the
    /// stream in an unknown state.
    fn run<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T, Fail>) -> crate::Result<T> {
        if let Some(first) = &self.poisoned {
            return Err(self.error(Fail::Protocol(format!(
                "the session is unusable after an earlier error ({first})"
            ))));
        }
        match op(self) {
            Ok(value) => Ok(value),
            Err(fail) => {
                if fail.poisons() {
                    self.poisoned = Some(fail.describe());
                }
                Err(self.error(fail))
            }
        }
    }

    fn error(&self, fail: Fail) -> crate::Error {
        fail.into_error(&self.account, &self.server)
    }

    /// Sends a one-line command and reads its status; `-ERR` becomes `Fail::Refused`.
    fn simple(&mut self, command: &str) -> Result<Status, Fail> {
        self.conn
            .send(format!("{command}\r\n").as_bytes(), command)?;
        let status = self
            .conn
            .read_status(&format!("waiting for the reply to {command}"))?;
        if status.ok {
            Ok(status)
        } else {
            Err(Fail::Refused {
                command: command.to_string(),
                text: status.text(),
            })
        }
    }

    /// A one-line command followed by a multi-line body (when `+OK`).
    fn multi(&mut self, command: &str, max_bytes: u64) -> Result<Vec<u8>, Fail> {
        self.simple(command)?;
        let mut body = Vec::new();
        self.conn.read_multiline(
            &mut body,
            max_bytes,
            &format!("reading the reply to {command}"),
        )?;
        Ok(body)
    }

    /// The greeting's text (after `+OK`).
    pub fn greeting(&self) -> &str {
        &self.greeting
    }

    /// The capabilities read by the last [`capa`](Self::capa).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// `master` or the account's RECID, as given when the session started.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// `host:port`, as given when the session started.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The first error that made the session unusable, if any.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// The underlying stream (e.g. to check `MaybeTls::is_tls`).
    pub fn stream(&self) -> &S {
        self.conn.get_ref()
    }

    /// Sends `CAPA` and stores the answer. A server without CAPA (`-ERR`) leaves the
    /// capabilities unknown, which is not an error.
    pub fn capa(&mut self) -> crate::Result<&Capabilities> {
        self.run(|s| {
            s.caps = match s.multi("CAPA", LISTING_LIMIT) {
                Ok(body) => Capabilities::parse(&body),
                Err(Fail::Refused { .. }) => Capabilities::default(),
                Err(other) => return Err(other),
            };
            Ok(())
        })?;
        Ok(&self.caps)
    }

    /// `NOOP`: keeps the connection alive / checks it still works.
    pub fn noop(&mut self) -> crate::Result<()> {
        self.run(|s| s.simple("NOOP").map(drop))
    }

    /// Sends `QUIT` and closes: in the transaction state this is what makes the server remove
    /// the messages marked with `DELE`. Refused (nothing sent) when the session is poisoned.
    /// A `-ERR` reply means the server could not remove all of them.
    pub fn quit(mut self) -> crate::Result<()> {
        self.run(|s| match s.simple("QUIT") {
            Ok(_) => Ok(()),
            Err(Fail::Refused { text, .. }) => Err(Fail::Protocol(format!(
                "QUIT failed, the marked messages may not have been removed: {text}"
            ))),
            Err(other) => Err(other),
        })
    }
}

impl<S: Read + Write> Pop3Session<S, Authorization> {
    /// Reads the greeting from a freshly connected `stream`. `account` and `server` label
    /// every error of the session.
    pub fn start(stream: S, account: &str, server: &str) -> crate::Result<Self> {
        let mut session = Pop3Session {
            conn: Conn::new(stream),
            account: account.to_string(),
            server: server.to_string(),
            greeting: String::new(),
            caps: Capabilities::default(),
            poisoned: None,
            _state: PhantomData,
        };
        session.run(|s| {
            let status = s.conn.read_status("waiting for the greeting")?;
            if !status.ok {
                return Err(Fail::Protocol(format!(
                    "the server refused the session: {}",
                    status.text()
                )));
            }
            s.greeting = status.text();
            Ok(())
        })?;
        Ok(session)
    }

    /// `STLS`: asks for TLS, hands the raw stream to `upgrade` (which runs the handshake),
    /// then re-reads the capabilities over TLS. A server that refuses, or sends anything after
    /// its `+OK` before the handshake (a command-injection attempt), is an error.
    pub fn stls<T, F>(mut self, upgrade: F) -> crate::Result<Pop3Session<T, Authorization>>
    where
        T: Read + Write,
        F: FnOnce(S) -> io::Result<T>,
    {
        self.run(|s| {
            match s.simple("STLS") {
                Ok(_) => {}
                Err(Fail::Refused { text, .. }) => {
                    return Err(Fail::Protocol(format!(
                        "the server refused STLS ({text}); not logging in without TLS"
                    )))
                }
                Err(other) => return Err(other),
            }
            if s.conn.has_buffered() {
                return Err(Fail::Protocol(
                    "the server sent data after agreeing to STLS, before the TLS handshake; \
                     refusing to continue"
                        .to_string(),
                ));
            }
            Ok(())
        })?;
        let Pop3Session {
            conn,
            account,
            server,
            greeting,
            ..
        } = self;
        let stream = upgrade(conn.into_stream())
            .map_err(|e| Fail::io("starting TLS (STLS)", e).into_error(&account, &server))?;
        let mut upgraded = Pop3Session {
            conn: Conn::new(stream),
            account,
            server,
            greeting,
            caps: Capabilities::default(),
            poisoned: None,
            _state: PhantomData,
        };
        upgraded.capa()?;
        Ok(upgraded)
    }

    /// Logs in: `USER`/`PASS`, or `AUTH PLAIN` when the server announced SASL PLAIN but not
    /// USER. A rejected login is an `Error::Auth` (a `[IN-USE]`/`[SYS/…]`/`[LOGIN-DELAY]`
    /// refusal, which is no password problem, an `Error::Mailbox`). The password never
    /// appears in any error. Capabilities are read again after login (they may change).
    pub fn login(
        mut self,
        user: &str,
        password: &Secret,
    ) -> crate::Result<Pop3Session<S, Transaction>> {
        if user.is_empty() || user.contains(['\r', '\n', '\0']) {
            return Err(crate::Error::account_key(
                &self.account,
                "LOGIN",
                "the POP3 login name is empty or contains a line break",
            ));
        }
        if password.expose().contains(['\r', '\n', '\0']) {
            return Err(crate::Error::account_key(
                &self.account,
                "PASSWORD",
                "the password contains a line break or NUL, which POP3 cannot send",
            ));
        }
        let use_sasl =
            self.caps.known && !self.caps.user() && self.caps.sasl().iter().any(|m| m == "PLAIN");
        let server = self.server.clone();
        // With PIPELINING, USER, PASS and the CAPA that follows a login go in one write: one
        // round trip instead of three. Every reply is read, in order, whatever they say.
        let pipelined = !use_sasl && self.caps.pipelining();
        let mut refreshed = None;
        self.run(|s| {
            if pipelined {
                let mut commands = format!("USER {user}\r\nPASS ").into_bytes();
                commands.extend_from_slice(password.expose().as_bytes());
                commands.extend_from_slice(b"\r\nCAPA\r\n");
                s.conn.send(&commands, "USER")?;
                // A refused login ends here: the session is dropped (no QUIT), so the CAPA
                // reply need not be read — some servers close the connection at once.
                for command in ["USER", "PASS"] {
                    let status = s
                        .conn
                        .read_status(&format!("waiting for the reply to {command}"))?;
                    if !status.ok {
                        return Err(login_refused(&server, user, &status, &[password.expose()]));
                    }
                }
                let capa_status = s.conn.read_status("waiting for the reply to CAPA")?;
                if capa_status.ok {
                    let mut body = Vec::new();
                    s.conn
                        .read_multiline(&mut body, LISTING_LIMIT, "reading the reply to CAPA")?;
                    refreshed = Some(Capabilities::parse(&body));
                }
                if refreshed.is_none() {
                    refreshed = Some(Capabilities::default());
                }
            } else if use_sasl {
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("\0{user}\0{}", password.expose()));
                s.conn
                    .send(format!("AUTH PLAIN {token}\r\n").as_bytes(), "AUTH PLAIN")?;
                let status = s.conn.read_status("waiting for the reply to AUTH PLAIN")?;
                if !status.ok {
                    return Err(login_refused(
                        &server,
                        user,
                        &status,
                        &[password.expose(), &token],
                    ));
                }
            } else {
                s.conn.send(format!("USER {user}\r\n").as_bytes(), "USER")?;
                let status = s.conn.read_status("waiting for the reply to USER")?;
                if !status.ok {
                    return Err(login_refused(&server, user, &status, &[password.expose()]));
                }
                let mut pass = Vec::with_capacity(password.expose().len() + 7);
                pass.extend_from_slice(b"PASS ");
                pass.extend_from_slice(password.expose().as_bytes());
                pass.extend_from_slice(b"\r\n");
                s.conn.send(&pass, "PASS")?;
                let status = s.conn.read_status("waiting for the reply to PASS")?;
                if !status.ok {
                    return Err(login_refused(&server, user, &status, &[password.expose()]));
                }
            }
            Ok(())
        })?;
        let mut session = self.into_state::<Transaction>();
        match refreshed {
            Some(caps) => session.caps = caps,
            None if session.caps.known => {
                session.capa()?;
            }
            None => {}
        }
        Ok(session)
    }
}

impl<S: Read + Write> Pop3Session<S, Authorization> {
    /// Signs in with an access token: `AUTH XOAUTH2` (else OAUTHBEARER, as the `SASL`
    /// capability offers), the initial response on the command line when the line stays
    /// within 255 octets, else after the server's `+`. A refusal whose failure challenge
    /// says the token is invalid or expired (or that gives no reason) gets one fresh token
    /// and one more attempt on this connection; when the server closed it meanwhile, the
    /// caller gets [`TokenLogin::Reconnect`] and sends the fresh token on a new one (with the
    /// same `signin`). A final refusal is an `Error::Auth` that names the server and user,
    /// never the token. `host` and `port` are the server's, for OAUTHBEARER.
    pub fn login_token(
        mut self,
        user: &str,
        signin: &mut TokenSignIn,
        host: &str,
        port: u16,
    ) -> crate::Result<TokenLogin<S>> {
        if user.is_empty() || user.contains(['\r', '\n', '\0']) {
            return Err(crate::Error::account_key(
                &self.account,
                "LOGIN",
                "the POP3 login name is empty or contains a line break",
            ));
        }
        if let Some(first) = &self.poisoned {
            return Err(self.error(Fail::Protocol(format!(
                "the session is unusable after an earlier error ({first})"
            ))));
        }
        let offered = self.caps.sasl();
        let Some(mechanism) = Mechanism::choose(|m| offered.iter().any(|o| o == m)) else {
            return Err(self.error(Fail::Protocol(sasl::no_token_mechanism(
                "POP3",
                &offered.join(" "),
            ))));
        };
        signin.using(mechanism);
        loop {
            let response = signin
                .initial_response(mechanism, user, host, port)
                .map_err(|e| self.error(Fail::Other(e)))?;
            let (failure, outcome) = self.token_attempt(mechanism, &response);
            let refused = |signin: &TokenSignIn, text: &str, retried: bool| {
                sasl::token_refused(
                    &self.account,
                    "POP3",
                    &self.server,
                    user,
                    mechanism,
                    failure.as_ref(),
                    retried,
                    &sanitize(signin.redact(text).as_bytes()),
                )
            };
            match outcome {
                Ok(None) => break,
                Ok(Some(text)) => {
                    if not_about_credentials(&text) {
                        let text = sanitize(signin.redact(&text).as_bytes());
                        return Err(self.error(Fail::Protocol(format!(
                            "the server refused the login for '{user}' for a reason other than \
                             the token: {text}"
                        ))));
                    }
                    if signin.retry_after(failure.as_ref())? {
                        continue;
                    }
                    return Err(refused(signin, &text, signin.refreshed()));
                }
                Err(fail) => {
                    let message = signin.redact(&fail.describe());
                    if fail.poisons() {
                        self.poisoned = Some(message.clone());
                    }
                    let error = self.error(Fail::Protocol(message));
                    let gone = matches!(fail, Fail::Io { .. });
                    if gone && signin.refreshed() {
                        // Cut off during the retry: the fresh token goes on a new connection.
                        return Ok(TokenLogin::Reconnect(error));
                    }
                    if gone && failure.is_some() {
                        // Refused, then cut off: the retry goes on a new connection.
                        if signin.retry_after(failure.as_ref())? {
                            return Ok(TokenLogin::Reconnect(error));
                        }
                        return Err(refused(signin, "the server closed the connection", false));
                    }
                    return Err(error);
                }
            }
        }
        let mut session = self.into_state::<Transaction>();
        if session.caps.known {
            session.capa()?;
        }
        Ok(TokenLogin::LoggedIn(session))
    }

    /// One `AUTH` exchange with the base64 initial `response`.
    fn token_attempt(&mut self, mechanism: Mechanism, response: &str) -> TokenAttempt {
        let mut failure = None;
        let name = mechanism.name();
        let command = format!("AUTH {name}");
        let doing = format!("waiting for the reply to {command}");
        let outcome = (|| {
            let inline = format!("{command} {response}\r\n");
            let mut reply = if inline.len() <= AUTH_LINE_LIMIT {
                self.conn.send(inline.as_bytes(), &command)?;
                self.conn.read_sasl_reply(&doing)?
            } else {
                self.conn
                    .send(format!("{command}\r\n").as_bytes(), &command)?;
                match self.conn.read_sasl_reply(&doing)? {
                    SaslReply::Challenge(_) => {
                        self.conn
                            .send(format!("{response}\r\n").as_bytes(), &command)?;
                        self.conn.read_sasl_reply(&doing)?
                    }
                    status => status,
                }
            };
            let mut challenges = 0;
            loop {
                match reply {
                    SaslReply::Status(status) if status.ok => return Ok(None),
                    SaslReply::Status(status) => {
                        return Ok(Some(String::from_utf8_lossy(&status.text).into_owned()))
                    }
                    SaslReply::Challenge(text) => {
                        challenges += 1;
                        if challenges >= MAX_CHALLENGES {
                            // Cancel (RFC 5034 §4); the session is not trusted afterwards.
                            let _ = self.conn.send(b"*\r\n", &command);
                            return Err(Fail::Protocol(format!(
                                "the server kept sending {name} challenges"
                            )));
                        }
                        if let Some(f) = TokenFailure::from_challenge(&text) {
                            failure = Some(f);
                        }
                        let ack = sasl::failure_ack(mechanism);
                        self.conn.send(format!("{ack}\r\n").as_bytes(), &command)?;
                        reply = self.conn.read_sasl_reply(&doing)?;
                    }
                }
            }
        })();
        (failure, outcome)
    }
}

/// True when a refusal's response code (RFC 2449 / RFC 3206) says it has nothing to do with
/// the credentials: the maildrop is in use, logins are rate-limited, the server has trouble.
fn not_about_credentials(text: &str) -> bool {
    let upper = text.trim_start().to_ascii_uppercase();
    ["[IN-USE]", "[LOGIN-DELAY]", "[SYS/"]
        .iter()
        .any(|code| upper.starts_with(code))
}

/// The error for a refused login: `Auth`, unless the response code says the refusal has
/// nothing to do with the credentials (RFC 2449 / RFC 3206).
fn login_refused(server: &str, user: &str, status: &Status, secrets: &[&str]) -> Fail {
    let mut text = status.text();
    for secret in secrets {
        if secret.len() >= 3 && text.contains(secret) {
            text = text.replace(secret, "<redacted>");
        }
    }
    let upper = text.to_ascii_uppercase();
    if ["[IN-USE]", "[LOGIN-DELAY]", "[SYS/"]
        .iter()
        .any(|code| upper.starts_with(code))
    {
        Fail::Protocol(format!(
            "the server refused the login for '{user}' for a reason other than the password: \
             {text}"
        ))
    } else {
        Fail::Auth(format!(
            "the POP3 server {server} rejected the login for '{user}': {text}"
        ))
    }
}

impl<S: Read + Write> Pop3Session<S, Transaction> {
    /// `STAT`: message count and total size.
    pub fn stat(&mut self) -> crate::Result<Stat> {
        self.run(|s| {
            let status = s.simple("STAT")?;
            let mut words = status.text.split(|&b| b == b' ').filter(|w| !w.is_empty());
            let count = words.next().and_then(parse_num::<u32>);
            let size = words.next().and_then(parse_num::<u64>);
            match (count, size) {
                (Some(count), Some(size)) => Ok(Stat { count, size }),
                _ => Err(Fail::Protocol(format!(
                    "unreadable STAT reply: \"{}\"",
                    status.text()
                ))),
            }
        })
    }

    /// `LIST`: every message's number and size.
    pub fn list(&mut self) -> crate::Result<Vec<ListEntry>> {
        self.run(|s| {
            let body = s.multi("LIST", LISTING_LIMIT)?;
            list_lines(&body)
        })
    }

    /// `UIDL`: every message's unique id. A server without UIDL gives a `Mailbox` error (the
    /// session stays usable).
    pub fn uidl(&mut self) -> crate::Result<Vec<UidlEntry>> {
        self.run(|s| {
            let body = s.multi("UIDL", LISTING_LIMIT)?;
            uidl_lines(&body)
        })
    }

    /// `UIDL` and `LIST` (in one write when the server pipelines): every message's unique id
    /// and size. A server without UIDL gives a `Mailbox` error (the session stays usable).
    pub fn uidl_and_list(&mut self) -> crate::Result<(Vec<UidlEntry>, Vec<ListEntry>)> {
        if !self.caps.pipelining() {
            let uidls = self.uidl()?;
            return Ok((uidls, self.list()?));
        }
        let mut refused = None;
        let (uidl_body, list_body) = self.run(|s| {
            s.conn.send(b"UIDL\r\nLIST\r\n", "UIDL")?;
            let mut bodies = [Vec::new(), Vec::new()];
            for (command, body) in ["UIDL", "LIST"].into_iter().zip(bodies.iter_mut()) {
                let status = s
                    .conn
                    .read_status(&format!("waiting for the reply to {command}"))?;
                if status.ok {
                    s.conn.read_multiline(
                        body,
                        LISTING_LIMIT,
                        &format!("reading the reply to {command}"),
                    )?;
                } else if refused.is_none() {
                    refused = Some(Fail::Refused {
                        command: command.to_string(),
                        text: status.text(),
                    });
                }
            }
            match refused.take() {
                Some(fail) => Err(fail),
                None => Ok((
                    std::mem::take(&mut bodies[0]),
                    std::mem::take(&mut bodies[1]),
                )),
            }
        })?;
        let uidls = uidl_lines(&uidl_body).map_err(|f| self.error(f))?;
        let sizes = list_lines(&list_body).map_err(|f| self.error(f))?;
        Ok((uidls, sizes))
    }

    /// `RETR n`: the whole message, byte-exact (dot-stuffing removed). More than `max_bytes`
    /// is an error that poisons the session; a `-ERR` (no such message) does not.
    pub fn retr(&mut self, number: u32, max_bytes: u64) -> crate::Result<Vec<u8>> {
        self.run(|s| s.multi(&format!("RETR {number}"), max_bytes))
    }

    /// `TOP n lines`: the headers and the first `lines` body lines (`TOP n 0` = headers only,
    /// for messages too big to download).
    pub fn top(&mut self, number: u32, lines: u32, max_bytes: u64) -> crate::Result<Vec<u8>> {
        self.run(|s| s.multi(&format!("TOP {number} {lines}"), max_bytes))
    }

    /// `RETR` of many messages, pipelined when the server offers PIPELINING (in windows of
    /// [`PIPELINE_WINDOW`] commands), one by one otherwise. `on_message` is called in the
    /// order of `numbers` with each message or the server's `-ERR` text, as soon as it is
    /// read, so only one message is held in memory at a time. A message over `max_bytes`
    /// stops the batch and poisons the session.
    pub fn retr_each<F>(
        &mut self,
        numbers: &[u32],
        max_bytes: u64,
        on_message: F,
    ) -> crate::Result<()>
    where
        F: FnMut(u32, Fetched),
    {
        self.run(|s| s.batch_all(numbers, "RETR", "", Some(max_bytes), on_message))
    }

    /// `RETR` of many messages as one continuous pipeline when the server offers PIPELINING:
    /// at most `byte_window` bytes of messages (by `size_of`, from LIST) are asked for and not
    /// yet read, and more are asked for whenever half of that has arrived, so the round trips
    /// do not grow with the mailbox. When `on_message` says [`Flow::Stop`], nothing more is
    /// asked for and what is already on its way (at most the window) is read and dropped.
    pub fn retr_stream<F>(
        &mut self,
        numbers: &[u32],
        max_bytes: u64,
        size_of: &dyn Fn(u32) -> u64,
        byte_window: u64,
        on_message: F,
    ) -> crate::Result<()>
    where
        F: FnMut(u32, Fetched) -> Flow,
    {
        self.run(|s| {
            s.batch(
                numbers,
                "RETR",
                "",
                Some(max_bytes),
                size_of,
                byte_window,
                on_message,
            )
        })
    }

    /// [`retr_each`](Self::retr_each), collected: `(number, message or -ERR text)` in order.
    pub fn retr_many(
        &mut self,
        numbers: &[u32],
        max_bytes: u64,
    ) -> crate::Result<Vec<(u32, Fetched)>> {
        let mut out = Vec::with_capacity(numbers.len());
        self.retr_each(numbers, max_bytes, |n, r| out.push((n, r)))?;
        Ok(out)
    }

    /// `TOP n 0` of many messages (pipelined like [`retr_each`](Self::retr_each)).
    pub fn top_many(
        &mut self,
        numbers: &[u32],
        max_bytes: u64,
    ) -> crate::Result<Vec<(u32, Fetched)>> {
        let mut out = Vec::with_capacity(numbers.len());
        self.run(|s| {
            s.batch_all(numbers, "TOP", " 0", Some(max_bytes), |n, r| {
                out.push((n, r))
            })
        })?;
        Ok(out)
    }

    /// `DELE n`: marks a message; it is removed only by [`quit`](Pop3Session::quit).
    pub fn dele(&mut self, number: u32) -> crate::Result<()> {
        self.run(|s| s.simple(&format!("DELE {number}")).map(drop))
    }

    /// `DELE` of many messages, pipelined when possible: `(number, Ok or -ERR text)` in order.
    pub fn dele_many(&mut self, numbers: &[u32]) -> crate::Result<Vec<(u32, Result<(), String>)>> {
        let mut out = Vec::with_capacity(numbers.len());
        self.run(|s| s.batch_all(numbers, "DELE", "", None, |n, r| out.push((n, r.map(drop)))))?;
        Ok(out)
    }

    /// `RSET`: unmarks every message marked with `DELE` in this session.
    pub fn rset(&mut self) -> crate::Result<()> {
        self.run(|s| s.simple("RSET").map(drop))
    }

    /// [`batch`](Self::batch) of every number, bounded by the command window only.
    fn batch_all<F>(
        &mut self,
        numbers: &[u32],
        verb: &str,
        suffix: &str,
        max_bytes: Option<u64>,
        mut each: F,
    ) -> Result<(), Fail>
    where
        F: FnMut(u32, Fetched),
    {
        self.batch(
            numbers,
            verb,
            suffix,
            max_bytes,
            &|_| 0,
            u64::MAX,
            |n, r| {
                each(n, r);
                Flow::Continue
            },
        )
    }

    /// Runs `VERB n SUFFIX` for each number, reading a multi-line body (capped at
    /// `max_bytes`) when given. If the server pipelines, up to PIPELINE_WINDOW commands and
    /// `byte_window` bytes (by `size_of`) are in flight, refilled when half has been answered;
    /// else strictly one at a time. After `each` says Stop, nothing more is sent and the
    /// replies still due are read and dropped, so the session stays in step.
    #[allow(clippy::too_many_arguments)]
    fn batch<F>(
        &mut self,
        numbers: &[u32],
        verb: &str,
        suffix: &str,
        max_bytes: Option<u64>,
        size_of: &dyn Fn(u32) -> u64,
        byte_window: u64,
        mut each: F,
    ) -> Result<(), Fail>
    where
        F: FnMut(u32, Fetched) -> Flow,
    {
        let window = if self.caps.pipelining() {
            PIPELINE_WINDOW
        } else {
            1
        };
        let total = numbers.len();
        let (mut sent, mut received) = (0usize, 0usize);
        let mut in_flight_bytes = 0u64;
        let mut stopped = false;
        loop {
            let refill = !stopped
                && sent < total
                && sent - received <= window / 2
                && in_flight_bytes <= byte_window / 2;
            if refill {
                let mut commands = Vec::new();
                while sent < total && sent - received < window {
                    let size = size_of(numbers[sent]);
                    // Always at least one command when nothing is in flight.
                    if sent > received && in_flight_bytes.saturating_add(size) > byte_window {
                        break;
                    }
                    commands.extend_from_slice(
                        format!("{verb} {}{suffix}\r\n", numbers[sent]).as_bytes(),
                    );
                    in_flight_bytes = in_flight_bytes.saturating_add(size);
                    sent += 1;
                }
                self.conn.send(&commands, verb)?;
            }
            if received == sent {
                return Ok(());
            }
            let number = numbers[received];
            let command = format!("{verb} {number}{suffix}");
            let status = self
                .conn
                .read_status(&format!("waiting for the reply to {command}"))?;
            let result = if !status.ok {
                Err(status.text())
            } else if let Some(max) = max_bytes {
                // Sized by LIST (the body is at most that once unstuffed, give or take a
                // server's rounding); a large message waits for the run's gate.
                let listed = size_of(number).min(max);
                let mut body = crate::incoming::gate::buffer(listed as usize);
                self.conn.read_multiline(
                    &mut body,
                    max,
                    &format!("reading the reply to {command}"),
                )?;
                Ok(body)
            } else {
                Ok(Vec::new())
            };
            received += 1;
            in_flight_bytes = in_flight_bytes.saturating_sub(size_of(number));
            if !stopped && each(number, result) == Flow::Stop {
                stopped = true;
            }
        }
    }
}

fn list_lines(body: &[u8]) -> Result<Vec<ListEntry>, Fail> {
    listing_lines(body)
        .map(|line| {
            let (number, size) = two_fields(line, "LIST")?;
            let size = parse_num::<u64>(size).ok_or_else(|| bad_line("LIST", line))?;
            Ok(ListEntry { number, size })
        })
        .collect()
}

fn uidl_lines(body: &[u8]) -> Result<Vec<UidlEntry>, Fail> {
    listing_lines(body)
        .map(|line| {
            let (number, uid) = two_fields(line, "UIDL")?;
            if uid.len() > 512 || !uid.iter().all(|b| (0x21..=0x7e).contains(b)) {
                return Err(bad_line("UIDL", line));
            }
            let uid = String::from_utf8_lossy(uid).into_owned();
            Ok(UidlEntry { number, uid })
        })
        .collect()
}

fn parse_num<T: std::str::FromStr>(bytes: &[u8]) -> Option<T> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn bad_line(command: &str, line: &[u8]) -> Fail {
    Fail::Protocol(format!(
        "unreadable line in the {command} listing: \"{}\"",
        sanitize(line)
    ))
}

/// `number rest` of a LIST/UIDL line (extra fields after the second are ignored).
fn two_fields<'a>(line: &'a [u8], command: &str) -> Result<(u32, &'a [u8]), Fail> {
    let mut words = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty());
    let number = words.next().and_then(parse_num::<u32>);
    let second = words.next();
    match (number, second) {
        (Some(number), Some(second)) => Ok((number, second)),
        _ => Err(bad_line(command, line)),
    }
}
