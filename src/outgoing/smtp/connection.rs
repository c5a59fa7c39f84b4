//! One SMTP connection: dialling, implicit TLS or STARTTLS, the greeting and EHLO, AUTH
//! (PLAIN/LOGIN with a password, XOAUTH2/OAUTHBEARER with an access token), writing commands,
//! RSET and QUIT.

use std::io::{BufReader, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::replies::{Caps, Fail, Reply};
use super::{Config, SmtpTransport};
use crate::config::{Secret, SslMode};
use crate::net::{self, MaybeTls, TlsConnector};
use crate::sasl::{self, Mechanism, TokenFailure, TokenSignIn};

/// RFC 4954 §4 keeps AUTH within SMTP's command line limit (RFC 5321: 512 octets, CRLF
/// included): a longer initial response (any real access token) goes after the server's 334.
const AUTH_LINE_LIMIT: usize = 512;
/// Challenges answered in one AUTH exchange before the client cancels it.
const MAX_CHALLENGES: usize = 3;

impl SmtpTransport {
    /// Connects, reads the greeting, says EHLO, secures and authenticates a new connection;
    /// a second connection when the server closed the first after refusing a token (the
    /// fresh token goes on the new one).
    pub(super) fn open(&self, mut steps: Option<&mut Vec<String>>) -> Result<Conn, Fail> {
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
}

/// One connection, after greeting/EHLO/TLS/AUTH.
pub(super) struct Conn {
    pub(super) stream: BufReader<MaybeTls>,
    pub(super) caps: Caps,
    /// Set by a write; the next read then counts one round trip.
    pub(super) wrote: bool,
    pub(super) round_trips: u64,
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

    pub(super) fn write(&mut self, data: &[u8], stage: &'static str) -> Result<(), Fail> {
        let stream = self.stream.get_mut();
        stream
            .write_all(data)
            .and_then(|_| stream.flush())
            .map_err(|err| Fail::Io { stage, err })?;
        self.wrote = true;
        Ok(())
    }

    pub(super) fn command(&mut self, line: &str, stage: &'static str) -> Result<Reply, Fail> {
        self.write(format!("{line}\r\n").as_bytes(), stage)?;
        self.read_reply(stage)
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

    /// RSET; true when the connection is clean for another transaction.
    pub(super) fn reset(&mut self) -> bool {
        matches!(self.command("RSET", "RSET"), Ok(r) if r.positive())
    }

    /// Sends QUIT without waiting for the answer, then closes.
    pub(super) fn quit_quietly(mut self) {
        let _ = self.write(b"QUIT\r\n", "QUIT");
        self.abort();
    }

    pub(super) fn abort(&mut self) {
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
