//! The AUTHORIZATION state (RFC 1939 §4): the greeting, STLS, and signing in with USER/PASS,
//! AUTH PLAIN, or an access token (AUTH XOAUTH2 / OAUTHBEARER).

use std::io::{self, Read, Write};
use std::marker::PhantomData;

use base64::Engine as _;

use super::wire::{sanitize, Conn, Fail, SaslReply, Status, LISTING_LIMIT};
use super::{Authorization, Capabilities, Pop3Session, TokenLogin, Transaction};
use crate::config::Secret;
use crate::sasl::{self, Mechanism, TokenFailure, TokenSignIn};

/// RFC 5034 §4: an `AUTH` command with its initial response may be at most this long
/// (CRLF included); a longer response goes after the server's `+` instead.
const AUTH_LINE_LIMIT: usize = 255;
/// Challenges answered in one AUTH exchange before the client gives up (the token
/// mechanisms need at most two: the empty one and the failure).
const MAX_CHALLENGES: usize = 3;

/// One AUTH exchange with a token: the failure challenge if the server sent one, and how it
/// ended (`Ok(None)` signed in, `Ok(Some(text))` refused with `-ERR text`).
type TokenAttempt = (Option<TokenFailure>, Result<Option<String>, Fail>);

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
