//! Connecting to the IMAP server and signing in: TCP, implicit TLS or STARTTLS, the greeting,
//! the capabilities, LOGIN or AUTHENTICATE PLAIN with a password, AUTHENTICATE XOAUTH2 /
//! OAUTHBEARER with an access token (one fresh token, on a new connection when the server
//! hung up). See "Connecting" in the module docs.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::fetch::{self, Status};
use super::folder::normalize_folder;
use super::wire::Wire;
use super::{ImapMailbox, ImapSession, ImapStats};
use crate::config::{Account, MailboxType, ProcessedAction, Secret, SslMode};
use crate::error::{Error, Result};
use crate::net::{self, MaybeTls};
use crate::sasl::{self, Credentials, Mechanism, TokenFailure, TokenSignIn};
use crate::state::StateStore;

/// AUTHENTICATE PLAIN (RFC 4616), for credentials LOGIN cannot carry or servers that refuse it.
struct PlainAuth<'a> {
    user: &'a str,
    password: &'a Secret,
}

impl imap::Authenticator for PlainAuth<'_> {
    type Response = Vec<u8>;
    fn process(&self, _challenge: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(0);
        out.extend_from_slice(self.user.as_bytes());
        out.push(0);
        out.extend_from_slice(self.password.expose().as_bytes());
        out
    }
}

/// AUTHENTICATE XOAUTH2 / OAUTHBEARER: the initial response (answering the server's empty
/// challenge, when it was not sent on the command line with SASL-IR), then the failure
/// acknowledgement for any further challenge, which is the server's JSON reason for refusing
/// the token (kept for the retry decision).
struct TokenAuth {
    initial: Vec<u8>,
    ack: &'static [u8],
    initial_sent: Cell<bool>,
    failure: RefCell<Option<TokenFailure>>,
}

impl imap::Authenticator for TokenAuth {
    type Response = Vec<u8>;
    fn process(&self, challenge: &[u8]) -> Vec<u8> {
        if !self.initial_sent.replace(true) {
            return self.initial.clone();
        }
        if let Some(failure) = TokenFailure::from_json(challenge) {
            *self.failure.borrow_mut() = Some(failure);
        }
        self.ack.to_vec()
    }
}

/// What signing in on one connection came to.
enum Opened {
    Session(ImapSession),
    /// The server closed the connection after refusing a token; the fresh one waits in the
    /// sign-in, for a new connection. The error is what ended the old one.
    Redial(Error),
}

/// Capabilities as a server announced them.
pub(super) enum Caps {
    /// Named in a reply (upper case).
    Listed(Vec<String>),
    /// Asked for with CAPABILITY.
    Crate(imap::types::Capabilities),
}

impl Caps {
    fn has(&self, name: &str) -> bool {
        match self {
            Caps::Listed(list) => list.iter().any(|c| c.eq_ignore_ascii_case(name)),
            Caps::Crate(caps) => caps.has_str(name),
        }
    }

    /// The capabilities a server's reply names, in a `[CAPABILITY ...]` response code (a
    /// greeting, a LOGIN reply) or an untagged `* CAPABILITY` line; `None` when it names none.
    fn in_reply(reply: &[u8]) -> Option<Caps> {
        let text = String::from_utf8_lossy(reply);
        let mut found = None;
        for line in text.lines() {
            let upper = line.to_ascii_uppercase();
            let list = match upper.find("[CAPABILITY ") {
                Some(at) => {
                    let rest = &upper[at + "[CAPABILITY ".len()..];
                    rest.find(']').map(|end| &rest[..end])
                }
                None => upper.strip_prefix("* CAPABILITY "),
            };
            let Some(list) = list else { continue };
            let caps: Vec<String> = list.split_ascii_whitespace().map(str::to_string).collect();
            if caps.iter().any(|c| c.starts_with("IMAP4")) {
                found = Some(Caps::Listed(caps));
            }
        }
        found
    }
}

impl ImapMailbox {
    /// Connects, starts TLS as the account says, logs in with the account's LOGIN and
    /// PASSWORD and reads the capabilities. The folder is opened by the first operation that
    /// needs it.
    pub fn connect(account: &Account, state: StateStore) -> Result<ImapMailbox> {
        let (id, incoming) = crate::incoming::settings_of(account, MailboxType::Imap)?;
        let (_, password) = crate::incoming::server_and_password(account, &id, incoming)?;
        let credentials = Credentials::Password {
            user: account.login_name().to_string(),
            password,
        };
        ImapMailbox::connect_with(account, state, credentials)
    }

    /// [`ImapMailbox::connect`] signing in with `credentials` instead of the account's
    /// password: with [`Credentials::Bearer`], `AUTHENTICATE XOAUTH2` (else OAUTHBEARER) with
    /// the token source's access token, on the command line when the server offers SASL-IR;
    /// a token refused as invalid or expired gets one fresh token and one more attempt (on a
    /// new connection if the server closed this one). A final refusal is an `Error::Auth`
    /// naming the server and user, never the token.
    pub fn connect_with(
        account: &Account,
        state: StateStore,
        credentials: Credentials,
    ) -> Result<ImapMailbox> {
        let (id, incoming) = crate::incoming::settings_of(account, MailboxType::Imap)?;
        let host = crate::incoming::server_of(&id, incoming)?;
        let user = credentials.user().to_string();
        if user.is_empty() || user.contains(['\r', '\n', '\0']) {
            return Err(Error::account_key(
                &id,
                "LOGIN",
                "the login name is empty or contains a line break",
            ));
        }
        let mut secrets = Vec::new();
        if let Credentials::Password { password, .. } = &credentials {
            if password.expose().contains(['\r', '\n', '\0']) {
                return Err(Error::account_key(
                    &id,
                    "PASSWORD",
                    "the password contains a line break or NUL character",
                ));
            }
            if !password.is_empty() {
                use base64::Engine;
                secrets.push(
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("\0{user}\0{}", password.expose())),
                );
                secrets.push(password.expose().to_string());
            }
        }
        let folder = normalize_folder(&incoming.folder);
        if folder.is_empty() || folder.chars().any(char::is_control) {
            return Err(Error::account_key(
                &id,
                "INCOMING_FOLDER",
                "is empty or contains a control character",
            ));
        }
        if let ProcessedAction::Move(target) = &incoming.processed_action {
            if normalize_folder(target) == folder {
                return Err(Error::account_key(
                    &id,
                    "PROCESSED_ACTION",
                    format!("moves messages into '{folder}', the folder being read"),
                ));
            }
        }
        let port = incoming.port;
        let server = net::server_label(host, port);
        let timeout = if account.timeout.is_zero() {
            net::FALLBACK_TIMEOUT
        } else {
            account.timeout
        };
        let deadline = Instant::now() + timeout;
        let mailbox_err = |message: String| Error::mailbox(&id, &server, message);
        // Connected first: the TCP handshake overlaps the building of the TLS connector
        // (started by `net::prewarm_tls_connector`, or by the first connection of the process).
        let connector = || match incoming.ssl {
            SslMode::None => Ok(None),
            SslMode::Ssl | SslMode::StartTls => net::tls_connector(&account.tls).map(Some),
        };
        let tcp = match net::connect_tcp(host, port, timeout) {
            Ok(tcp) => tcp,
            Err(e) => {
                // A broken CA_FILE is the thing to fix first, even with the server down.
                connector()?;
                let text = format!("cannot connect: {}", net::describe_io_error(&e));
                return Err(mailbox_err(text));
            }
        };
        let connector = connector()?;
        let stream = match (&connector, incoming.ssl) {
            (Some(connector), SslMode::Ssl) => {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(std::time::Duration::from_millis(1));
                let _ = tcp.set_read_timeout(Some(left));
                let _ = tcp.set_write_timeout(Some(left));
                let tls = MaybeTls::start_tls(connector, host, tcp).map_err(|e| {
                    mailbox_err(format!("cannot start TLS: {}", net::describe_io_error(&e)))
                })?;
                let _ = tls.tcp().set_write_timeout(Some(timeout));
                tls
            }
            _ => MaybeTls::Plain(tcp),
        };
        let wire = Wire::new(stream, timeout);
        wire.set_deadline(Some(deadline));
        // A second connection, when a server closed the first after refusing a token.
        let redial = |connector: &Option<net::TlsConnector>| -> Result<Wire<MaybeTls>> {
            let tcp = net::connect_tcp(host, port, timeout).map_err(|e| {
                mailbox_err(format!("cannot connect: {}", net::describe_io_error(&e)))
            })?;
            let _ = tcp.set_write_timeout(Some(timeout));
            let stream = match (connector, incoming.ssl) {
                (Some(connector), SslMode::Ssl) => {
                    let _ = tcp.set_read_timeout(Some(timeout));
                    MaybeTls::start_tls(connector, host, tcp).map_err(|e| {
                        mailbox_err(format!("cannot start TLS: {}", net::describe_io_error(&e)))
                    })?
                }
                _ => MaybeTls::Plain(tcp),
            };
            let wire = Wire::new(stream, timeout);
            wire.set_deadline(Some(Instant::now() + timeout));
            Ok(wire)
        };

        let mut signin = match &credentials {
            Credentials::Bearer { tokens, .. } => Some(TokenSignIn::new(Arc::clone(tokens))),
            Credentials::Password { .. } => None,
        };
        let mut mailbox = ImapMailbox {
            account: id.clone(),
            server: server.clone(),
            user: user.clone(),
            credentials,
            secrets,
            folder: folder.clone(),
            mark_key: format!("{user}@{}/{folder}", host.to_ascii_lowercase()),
            action: incoming.processed_action.clone(),
            max_message_bytes: incoming.max_message_bytes,
            wire: wire.clone(),
            session: None,
            poisoned: None,
            uidplus: false,
            move_ext: false,
            login_caps: None,
            selected: None,
            exists: 0,
            uidvalidity: None,
            listed_under: None,
            stored_mark: None,
            listed: BTreeMap::new(),
            settled: HashSet::new(),
            settled_before: BTreeSet::new(),
            folders_ready: HashSet::new(),
            raw_tag: 0,
            stats: ImapStats::default(),
            state,
        };
        let mut redialed = false;
        let session = loop {
            let opened = mailbox.open_session(
                mailbox.wire.clone(),
                host,
                port,
                incoming.ssl,
                connector.clone(),
                signin.as_mut(),
            );
            for sent in signin.iter().flat_map(|s| s.sent()) {
                if !mailbox.secrets.contains(sent) {
                    mailbox.secrets.push(sent.clone());
                }
            }
            match opened? {
                Opened::Session(session) => break session,
                Opened::Redial(_) if !redialed => {
                    redialed = true;
                    mailbox.wire = redial(&connector)?;
                }
                Opened::Redial(err) => return Err(err),
            }
        };
        mailbox.session = Some(session);
        mailbox.wire.set_deadline(None);
        // Servers such as Dovecot name them in their reply to LOGIN: no round trip then.
        let caps = match mailbox.login_caps.take() {
            Some(caps) => caps,
            None => Caps::Crate(mailbox.run("reading the capabilities", |s| s.capabilities())?),
        };
        mailbox.uidplus = caps.has("UIDPLUS");
        mailbox.move_ext = caps.has("MOVE");
        Ok(mailbox)
    }

    /// Greeting, STARTTLS when asked for, login (or AUTHENTICATE with a token, through
    /// `signin`, which the caller keeps across connections).
    fn open_session(
        &mut self,
        wire: Wire<MaybeTls>,
        host: &str,
        port: u16,
        ssl: SslMode,
        connector: Option<net::TlsConnector>,
        signin: Option<&mut TokenSignIn>,
    ) -> Result<Opened> {
        let mut greeting = Vec::new();
        wire.read_line(&mut greeting, fetch::MAX_LINE)
            .map_err(|e| self.io_error("waiting for the server's greeting", &e))?;
        let greeting_text = fetch::clean_text(&greeting);
        let upper = greeting_text.to_ascii_uppercase();
        if upper.starts_with("* BYE") {
            return Err(self.mailbox_error(format!(
                "the server refused the connection: {}",
                self.redact(&greeting_text)
            )));
        }
        if upper.starts_with("* PREAUTH") {
            return Err(self.mailbox_error(
                "the server greeted with PREAUTH (a pre-authenticated session); such servers \
                 are not supported"
                    .to_string(),
            ));
        }
        if !upper.starts_with("* OK") {
            return Err(self.mailbox_error(format!(
                "this does not look like an IMAP server (greeting: \"{}\"); check the port",
                self.redact(&greeting_text)
            )));
        }
        if let (SslMode::StartTls, Some(connector)) = (ssl, connector) {
            let (lines, status, text) = self.raw_command(&wire, "S1", "CAPABILITY")?;
            let offered = status == Status::Ok
                && lines.iter().any(|l| {
                    l.to_ascii_uppercase().starts_with("* CAPABILITY")
                        && l.split_ascii_whitespace()
                            .any(|w| w.eq_ignore_ascii_case("STARTTLS"))
                });
            if !offered {
                let why = if status == Status::Ok {
                    String::new()
                } else {
                    format!(" ({text})")
                };
                return Err(self.mailbox_error(format!(
                    "the server does not offer STARTTLS{why}; refusing to log in without TLS \
                     (INCOMING_SSL is TLS)"
                )));
            }
            let (_, status, text) = self.raw_command(&wire, "S2", "STARTTLS")?;
            if status != Status::Ok {
                return Err(self.mailbox_error(format!(
                    "the server refused STARTTLS: {}",
                    self.redact(&text)
                )));
            }
            wire.replace(|plain| plain.upgrade(&connector, host))
                .map_err(|e| self.io_error("starting TLS", &e))?;
        }
        let mut client = imap::Client::new(wire.clone());
        // The greeting's `[CAPABILITY ...]` saves a round trip, except after STARTTLS, where
        // they are read afresh (RFC 3501 §6.2.1).
        let caps = match Caps::in_reply(&greeting).filter(|_| ssl != SslMode::StartTls) {
            Some(caps) => caps,
            None => Caps::Crate(
                client
                    .capabilities()
                    .map_err(|e| self.error("reading the capabilities", &e))?,
            ),
        };
        let password = match (&self.credentials, signin) {
            (Credentials::Bearer { .. }, Some(signin)) => {
                return self.authenticate_token(client, &caps, &wire, host, port, signin);
            }
            (Credentials::Password { password, .. }, _) => password.clone(),
            (Credentials::Bearer { .. }, None) => {
                return Err(Error::message(
                    "a token sign-in was started without its state",
                ))
            }
        };
        let plain_ascii = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
        let needs_sasl = caps.has("LOGINDISABLED")
            || !plain_ascii(&self.user)
            || !plain_ascii(password.expose());
        if needs_sasl && !caps.has("AUTH=PLAIN") {
            return Err(self.mailbox_error(if caps.has("LOGINDISABLED") {
                "the server does not allow logging in on this connection (LOGINDISABLED); \
                 use INCOMING_SSL = SSL or TLS"
                    .to_string()
            } else {
                "the login name or password has characters LOGIN cannot send, and the \
                 server does not offer AUTHENTICATE PLAIN"
                    .to_string()
            }));
        }
        wire.start_capture();
        let result = if needs_sasl {
            let auth = PlainAuth {
                user: &self.user,
                password: &password,
            };
            client.authenticate("PLAIN", &auth).map_err(|(e, _)| e)
        } else {
            client
                .login(&self.user, password.expose())
                .map_err(|(e, _)| e)
        };
        self.login_caps = Caps::in_reply(&wire.take_capture());
        result.map(Opened::Session).map_err(|e| match e {
            imap::Error::No(no) => Error::auth(
                &self.account,
                format!(
                    "the IMAP server {} rejected the login for '{}': {}",
                    self.server,
                    self.user,
                    self.redact(&no.information)
                ),
            ),
            other => self.error("logging in", &other),
        })
    }

    /// `AUTHENTICATE XOAUTH2` (else OAUTHBEARER) with the sign-in's token; see
    /// [`ImapMailbox::connect_with`].
    fn authenticate_token(
        &mut self,
        mut client: imap::Client<Wire<MaybeTls>>,
        caps: &Caps,
        wire: &Wire<MaybeTls>,
        host: &str,
        port: u16,
        signin: &mut TokenSignIn,
    ) -> Result<Opened> {
        let Some(mechanism) = Mechanism::choose(|m| caps.has(&format!("AUTH={m}"))) else {
            let offered = match caps {
                Caps::Listed(list) => list
                    .iter()
                    .filter(|c| c.to_ascii_uppercase().starts_with("AUTH="))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" "),
                Caps::Crate(caps) => {
                    let mut list: Vec<String> = caps
                        .iter()
                        // The crate does not export its capability type; its Debug form is
                        // `Auth("PLAIN")`.
                        .filter_map(|c| {
                            let debug = format!("{c:?}");
                            let name = debug.strip_prefix("Auth(\"")?.strip_suffix("\")")?;
                            Some(format!("AUTH={name}"))
                        })
                        .collect();
                    list.sort();
                    list.join(" ")
                }
            };
            return Err(self.mailbox_error(sasl::no_token_mechanism("IMAP", &offered)));
        };
        signin.using(mechanism);
        let sasl_ir = caps.has("SASL-IR");
        loop {
            // Recorded by the sign-in for redaction whether it goes on the command line or not.
            let response = signin.initial_response(mechanism, &self.user, host, port)?;
            let token = signin.token()?;
            let initial = mechanism.initial_bytes(&self.user, &token, host, port);
            let auth = TokenAuth {
                initial,
                ack: sasl::failure_ack_bytes(mechanism),
                initial_sent: Cell::new(sasl_ir),
                failure: RefCell::new(None),
            };
            let command = if sasl_ir {
                format!("{} {response}", mechanism.name())
            } else {
                mechanism.name().to_string()
            };
            wire.start_capture();
            let result = client.authenticate(&command, &auth);
            let captured = wire.take_capture();
            let failure = auth.failure.into_inner();
            let (err, back) = match result {
                Ok(session) => {
                    self.login_caps = Caps::in_reply(&captured);
                    return Ok(Opened::Session(session));
                }
                Err(e) => e,
            };
            let refusal = match &err {
                imap::Error::No(no) => Some(no.information.to_string()),
                _ => None,
            };
            match refusal {
                Some(text) => {
                    if signin.retry_after(failure.as_ref())? {
                        client = back;
                        continue;
                    }
                    let text = fetch::clean_text(signin.redact(&text).as_bytes());
                    return Err(sasl::token_refused(
                        &self.account,
                        "IMAP",
                        &self.server,
                        &self.user,
                        mechanism,
                        failure.as_ref(),
                        signin.refreshed(),
                        &text,
                    ));
                }
                None => {
                    let gone = matches!(
                        err,
                        imap::Error::Io(_) | imap::Error::ConnectionLost | imap::Error::Bye(_)
                    );
                    let what = format!("signing in with {}", mechanism.name());
                    let detail = self.error(&what, &err);
                    let error = match detail {
                        Error::Mailbox(mut m) => {
                            m.message = signin.redact(&m.message);
                            Error::Mailbox(m)
                        }
                        other => other,
                    };
                    if !gone {
                        return Err(error);
                    }
                    // Cut off during the retry with a fresh token: the caller sends it again on
                    // a new connection (once).
                    if signin.refreshed() {
                        return Ok(Opened::Redial(error));
                    }
                    // Refused (the failure challenge came), then cut off: the retry goes on a
                    // new connection.
                    if failure.is_some() {
                        if signin.retry_after(failure.as_ref())? {
                            return Ok(Opened::Redial(error));
                        }
                        return Err(sasl::token_refused(
                            &self.account,
                            "IMAP",
                            &self.server,
                            &self.user,
                            mechanism,
                            failure.as_ref(),
                            false,
                            "the server closed the connection",
                        ));
                    }
                    return Err(error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_greetings_and_login_replies() {
        let greeting =
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n";
        let caps = Caps::in_reply(greeting).unwrap();
        assert!(caps.has("AUTH=PLAIN") && caps.has("auth=plain") && !caps.has("MOVE"));
        let login = b"a1 OK [CAPABILITY IMAP4rev1 UIDPLUS MOVE IDLE] Logged in\r\n";
        let caps = Caps::in_reply(login).unwrap();
        assert!(caps.has("UIDPLUS") && caps.has("MOVE"));
        let untagged = b"* CAPABILITY IMAP4rev1 UIDPLUS\r\na1 OK Logged in\r\n";
        assert!(Caps::in_reply(untagged).unwrap().has("UIDPLUS"));
        // No list, or not an IMAP capability list: the client asks with CAPABILITY.
        assert!(Caps::in_reply(b"* OK IMAP ready\r\n").is_none());
        assert!(Caps::in_reply(b"a1 OK [CAPABILITY MOVE] Logged in\r\n").is_none());
        assert!(Caps::in_reply(b"* OK [CAPABILITY IMAP4rev1 MOVE\r\n").is_none());
    }

    #[test]
    fn plain_auth_response_layout() {
        use imap::Authenticator;
        let secret = Secret::new("pw");
        let auth = PlainAuth {
            user: "u@x",
            password: &secret,
        };
        assert_eq!(auth.process(b""), b"\0u@x\0pw");
    }
}
