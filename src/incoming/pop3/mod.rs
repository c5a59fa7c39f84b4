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
//!
//! Layout: this file holds the session and what every state shares; `authorization` is the
//! AUTHORIZATION state (greeting, STLS, sign-in), `transaction` the TRANSACTION state
//! (listing, downloading, DELE), `wire` reads and writes the lines, and `mailbox` is the
//! [`Mailbox`](crate::incoming::Mailbox) adapter, as for every protocol.

mod authorization;
pub mod mailbox;
mod transaction;
mod wire;

pub use mailbox::Pop3Mailbox;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod token_tests;

use std::fmt;
use std::io::{Read, Write};
use std::marker::PhantomData;
use std::time::Duration;

use crate::config::{SslMode, TlsSettings};
use crate::net::{self, MaybeTls};
use wire::{listing_lines, sanitize, Conn, Fail, Status, LISTING_LIMIT};

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
