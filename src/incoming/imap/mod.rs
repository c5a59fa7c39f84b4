//! The IMAP mailbox: the `imap` crate (3.0) for the session, our own pipelined reader for
//! downloading messages.
//!
//! # What is new
//! New means "not yet processed by this extension", not "unseen": per account, login, host
//! and folder the state store keeps the folder's UIDVALIDITY and a low-water UID below which
//! every message is settled (processed, skipped or quarantined). [`Mailbox::list`] is one
//! `UID FETCH <low>:* (UID RFC822.SIZE)`; `n:*` also returns the last message when its UID is
//! below `n`, so the answer is filtered. A changed UIDVALIDITY starts again from UID 1 (the
//! Message-ID ledger of `checkmail` keeps that from doubling anything). [`Mailbox::finish`]
//! moves the mark up to the first listed UID that is not settled (or past the last listed
//! one), never past a message that still needs work. UIDs settled above the mark (after a
//! message that failed and waits for its retry) are remembered too (key-value namespace
//! [`SETTLED_NAMESPACE`]), so they are not listed and downloaded again.
//!
//! # Downloading
//! `UID FETCH <set> (UID BODY.PEEK[])` (PEEK: no `\Seen` side effect) in batches of at most
//! [`BATCH_BYTES`] (or one message when it is larger) and [`BATCH_MAX_UIDS`] messages. The
//! batches are pipelined: the next command is already queued at the server while the current
//! one's reply streams in, so the number of round trips per mailbox does not grow with the
//! number of messages. The `imap` crate reads a command's whole reply into memory and cannot
//! pipeline, so these commands go through [`fetch`], which reads one message at a time
//! straight from the connection: memory holds one message plus a 64 KiB buffer. After the
//! sink says `Flow::Stop`, the replies already requested (at most two batches) are read and
//! dropped so the connection stays usable for the actions.
//!
//! # Actions
//! - `seen`: `UID STORE <set> +FLAGS.SILENT (\Seen)`.
//! - `delete`: `UID STORE <set> +FLAGS.SILENT (\Deleted)`, then `UID EXPUNGE <set>` (UIDPLUS).
//!   Without UIDPLUS, a plain `EXPUNGE` would also remove messages another client marked
//!   `\Deleted` but did not mean to expunge yet (clients that use the flag as "trash" and
//!   expunge later), so it is only sent when `UID SEARCH DELETED` finds nothing but ours.
//!   Otherwise our messages stay flagged `\Deleted` (hidden by most clients) and are
//!   remembered ([`PENDING_NAMESPACE`]) so that a later run expunges them together with its
//!   own once no foreign `\Deleted` message is left; they are settled either way. A client
//!   flagging a message between our SEARCH and EXPUNGE loses nothing it wanted to keep: it
//!   asked for the deletion.
//! - `move:<folder>`: `UID MOVE` (MOVE), else `UID COPY`, `UID STORE +FLAGS.SILENT
//!   (\Deleted)` and the expunge above, for those UIDs only. The folder is created when
//!   missing. Quarantine moves the same way to [`QUARANTINE_FOLDER`].
//!
//! Actions are applied at once by `mark_processed`/`quarantine`; `finish` saves the mark and
//! logs out. Dropping the mailbox without `finish` saves nothing: the next run lists those
//! messages again and the ledger re-applies only the mailbox action.
//!
//! # Connecting
//! `SSL` = implicit TLS; `TLS` = STARTTLS, required (no login in clear when the server does
//! not offer it); none = plain. Certificates are checked as for sending (`VERIFY_CERT`,
//! `CA_FILE`). Connecting, TLS, greeting and login together take at most the account
//! timeout; afterwards every read and write is bounded by it. Any I/O or protocol failure
//! drops the connection (nothing half-done can be committed); a `NO` reply does not.
//!
//! With an access token ([`ImapMailbox::connect_with`], [`Credentials::Bearer`]) the client
//! sends `AUTHENTICATE XOAUTH2` (OAUTHBEARER when the server offers only that), the initial
//! response on the command line when the server has SASL-IR. The server's failure challenge
//! (base64 JSON) is acknowledged, and a token refused as invalid or expired is replaced once
//! by a fresh one (on a new connection when the server hung up); then the refusal is the
//! account's `Error::Auth`.

mod fetch;
pub mod utf7;
mod wire;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use imap::Session;

use crate::config::{Account, MailboxType, ProcessedAction, Secret, SslMode};
use crate::error::{Error, Result};
use crate::incoming::{Fetched, Flow, Listed, Mailbox};
use crate::net::{self, MaybeTls};
use crate::sasl::{self, Credentials, Mechanism, TokenFailure, TokenSignIn};
use crate::state::StateStore;

use fetch::{ReadError, Response, Status};
use wire::Wire;

/// Where messages that failed three runs are moved.
pub const QUARANTINE_FOLDER: &str = "PCR-Failed";
/// A download batch holds at most this many bytes (by RFC822.SIZE), or one larger message.
pub const BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// A download batch holds at most this many messages (keeps each command line short).
pub const BATCH_MAX_UIDS: usize = 1000;
/// FETCH commands kept queued at the server: the one being read and the next.
const PIPELINE_DEPTH: usize = 2;
/// UIDs per STORE/MOVE/COPY/EXPUNGE command.
const ACTION_MAX_UIDS: usize = 500;
/// State store namespace: UIDs settled above the low-water mark (`<uidvalidity>:<uid set>`).
pub const SETTLED_NAMESPACE: &str = "imap-settled";
/// State store namespace: our messages flagged `\Deleted` but not yet expunged (servers
/// without UIDPLUS), as `<uidvalidity>:<uid set>`.
pub const PENDING_NAMESPACE: &str = "imap-deleted";
/// A stored UID set expanding to more than this is ignored (it is only an optimisation).
const MAX_REMEMBERED: usize = 1_000_000;

/// What the client sent and received, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImapStats {
    /// `UID FETCH <low>:* (UID RFC822.SIZE)` commands (one per `list`).
    pub list_fetches: u32,
    /// `UID FETCH <set> (UID BODY.PEEK[])` commands.
    pub body_fetches: u32,
    /// Times a body FETCH was sent with no other one outstanding, i.e. the client waited a
    /// full round trip for the first byte (one per `fetch_each` call when pipelining works).
    pub fetch_round_trips: u32,
    /// Messages handed to the sink.
    pub messages_fetched: u32,
    /// Times `delete` left our messages flagged instead of expunging (no UIDPLUS, and other
    /// messages flagged `\Deleted` were present).
    pub expunges_skipped: u32,
    /// Bytes received on the connection (TLS excluded).
    pub bytes_received: u64,
}

type ImapSession = Session<Wire<MaybeTls>>;

/// One IMAP folder of one account, logged in and ready.
pub struct ImapMailbox {
    account: String,
    server: String,
    user: String,
    credentials: Credentials,
    /// What server texts are cleaned of: the password and the AUTHENTICATE PLAIN response
    /// built from it, or the access tokens sent and their initial responses.
    secrets: Vec<String>,
    folder: String,
    mark_key: String,
    action: ProcessedAction,
    max_message_bytes: u64,
    wire: Wire<MaybeTls>,
    /// `None` once a failure dropped the connection; `poisoned` says why.
    session: Option<ImapSession>,
    poisoned: Option<String>,
    uidplus: bool,
    move_ext: bool,
    /// The capabilities the server named in its reply to LOGIN, if it did.
    login_caps: Option<Caps>,
    /// `Some(true)`: SELECTed (read-write); `Some(false)`: EXAMINEd.
    selected: Option<bool>,
    exists: u32,
    uidvalidity: Option<u32>,
    /// The UIDVALIDITY `list` worked under, the low-water UID it started from, and the mark
    /// as it was stored.
    listed_under: Option<(u32, u32)>,
    stored_mark: Option<(u32, u32)>,
    /// Listed UID → size.
    listed: BTreeMap<u32, u64>,
    settled: HashSet<u32>,
    /// UIDs above the mark that earlier runs settled (from [`SETTLED_NAMESPACE`]).
    settled_before: BTreeSet<u32>,
    folders_ready: HashSet<String>,
    raw_tag: u32,
    stats: ImapStats,
    state: StateStore,
}

impl std::fmt::Debug for ImapMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapMailbox")
            .field("account", &self.account)
            .field("server", &self.server)
            .field("user", &self.user)
            .field("folder", &self.folder)
            .field("connected", &self.session.is_some())
            .finish()
    }
}

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

/// `INBOX` is case-insensitive; every other name is kept as written.
fn normalize_folder(name: &str) -> String {
    let name = name.trim();
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_string()
    } else {
        name.to_string()
    }
}

/// An IMAP quoted string.
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Reads replies up to the one tagged `tag`, handing every other line to `untagged`
/// (literals, which these replies do not normally have, are read and dropped).
fn read_tagged(
    wire: &Wire<MaybeTls>,
    tag: &str,
    mut untagged: impl FnMut(&str),
) -> std::io::Result<(Status, String)> {
    loop {
        let mut line = Vec::new();
        wire.read_line(&mut line, fetch::MAX_LINE)?;
        let mut literals = 0;
        // Only untagged data can carry literals; a tagged reply's text is just text.
        while let Some(n) = line
            .starts_with(b"* ")
            .then(|| literal_length(&line))
            .flatten()
        {
            literals += 1;
            if n > fetch::MAX_LINE || literals > 64 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the server announced an unexpected literal of {n} bytes"),
                ));
            }
            let mut skipped = Vec::new();
            wire.read_exact_into(&mut skipped, n)?;
            wire.read_line(&mut line, fetch::MAX_LINE)?;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if let Some(reply) = tagged_status(text, tag) {
            return Ok(reply);
        }
        untagged(text);
    }
}

/// The status and text of `line` when it is the reply tagged `tag`.
fn tagged_status(line: &str, tag: &str) -> Option<(Status, String)> {
    let rest = line.strip_prefix(tag)?.strip_prefix(' ')?;
    let (word, info) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = match word.to_ascii_uppercase().as_str() {
        "OK" => Status::Ok,
        "NO" => Status::No,
        _ => Status::Bad,
    };
    Some((status, info.to_string()))
}

/// The length of the literal a reply line announces at its end (`{123}` or `{123+}`).
fn literal_length(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `(UID, size)` from `* 12 FETCH (UID 40 RFC822.SIZE 3012)` (items in any order).
fn listed_size(line: &str) -> Option<(u32, u64)> {
    let rest = line.strip_prefix("* ")?;
    let (_, rest) = rest.split_once(' ')?;
    let items = rest
        .get(..5)
        .filter(|w| w.eq_ignore_ascii_case("FETCH"))
        .map(|_| &rest[5..])?;
    let items = items
        .trim()
        .strip_prefix('(')?
        .trim_end()
        .strip_suffix(')')?;
    // Each item name is followed by its value; other items (FLAGS lists) are passed over.
    let words: Vec<&str> = items.split_ascii_whitespace().collect();
    let value_of = |name: &str| {
        words
            .windows(2)
            .find(|w| w[0].eq_ignore_ascii_case(name))
            .map(|w| w[1])
    };
    let uid = value_of("UID")?.parse().ok()?;
    let size = value_of("RFC822.SIZE")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((uid, size))
}

/// Capabilities as a server announced them.
enum Caps {
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

/// A UID set with runs compressed: `1:3,7,9:10`.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// Reads back a [`uid_set`]; `None` when malformed or larger than `cap` UIDs.
pub fn parse_uid_set(text: &str, cap: usize) -> Option<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once(':') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        let (a, b) = (a.min(b), a.max(b));
        if (b - a) as usize >= cap.saturating_sub(out.len()) {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

/// Splits ascending UIDs into download batches: at most `max_bytes` (by the known size; an
/// unknown size counts as a full batch) or a single larger message, and at most `max_uids`.
pub fn plan_batches(
    uids: &[u32],
    size_of: impl Fn(u32) -> Option<u64>,
    max_bytes: u64,
    max_uids: usize,
) -> Vec<Vec<u32>> {
    let mut batches: Vec<Vec<u32>> = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    let mut bytes = 0u64;
    for &uid in uids {
        let size = size_of(uid).unwrap_or(max_bytes);
        if !current.is_empty()
            && (bytes.saturating_add(size) > max_bytes || current.len() >= max_uids)
        {
            batches.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(uid);
        bytes = bytes.saturating_add(size);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// The low-water mark after a run: the first listed UID not settled, else one past the last
/// listed UID; never below where the run started.
pub fn next_low_water(start: u32, listed: &[u32], settled: &HashSet<u32>) -> u32 {
    let next = match listed.iter().find(|uid| !settled.contains(uid)) {
        Some(&first_open) => first_open,
        None => listed.last().map_or(start, |&last| last.saturating_add(1)),
    };
    next.max(start)
}

impl ImapMailbox {
    /// Connects, starts TLS as the account says, logs in with the account's LOGIN and
    /// PASSWORD and reads the capabilities. The folder is opened by the first operation that
    /// needs it.
    pub fn connect(account: &Account, state: StateStore) -> Result<ImapMailbox> {
        let (id, incoming) = super::settings_of(account, MailboxType::Imap)?;
        let (_, password) = super::server_and_password(account, &id, incoming)?;
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
        let (id, incoming) = super::settings_of(account, MailboxType::Imap)?;
        let host = super::server_of(&id, incoming)?;
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

    /// What this mailbox has sent and received so far.
    pub fn stats(&self) -> ImapStats {
        ImapStats {
            bytes_received: self.wire.bytes_in(),
            ..self.stats
        }
    }

    /// Whether the server offers UIDPLUS and MOVE.
    pub fn extensions(&self) -> (bool, bool) {
        (self.uidplus, self.move_ext)
    }

    /// The folder's UIDVALIDITY, once it was opened.
    pub fn uidvalidity(&self) -> Option<u32> {
        self.uidvalidity
    }

    fn mailbox_error(&self, message: String) -> Error {
        Error::mailbox(&self.account, &self.server, message)
    }

    /// Removes the password from server text, in case a server echoes it back — as sent in
    /// LOGIN, or inside the base64 AUTHENTICATE PLAIN response — and likewise the access
    /// tokens sent and their initial responses.
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if !secret.is_empty() && out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "<redacted>");
            }
        }
        out
    }

    fn io_error(&self, what: &str, e: &std::io::Error) -> Error {
        self.mailbox_error(format!("{what}: {}", net::describe_io_error(e)))
    }

    /// One command before login, on the wire directly (the crate's client cannot send
    /// STARTTLS over a stream it did not build): the untagged lines, the status and its text.
    fn raw_command(
        &self,
        wire: &Wire<MaybeTls>,
        tag: &str,
        command: &str,
    ) -> Result<(Vec<String>, Status, String)> {
        let what = format!("sending {command}");
        wire.send(format!("{tag} {command}\r\n").as_bytes())
            .map_err(|e| self.io_error(&what, &e))?;
        let mut lines = Vec::new();
        for _ in 0..1000 {
            let mut line = Vec::new();
            wire.read_line(&mut line, fetch::MAX_LINE)
                .map_err(|e| self.io_error(&what, &e))?;
            let text = fetch::clean_text(&line);
            if let Some((status, info)) = tagged_status(&text, tag) {
                return Ok((lines, status, info));
            }
            lines.push(text);
        }
        Err(self.mailbox_error(format!("{what}: the server sent no reply")))
    }

    fn error(&self, what: &str, e: &imap::Error) -> Error {
        let detail = match e {
            imap::Error::Io(io) => net::describe_io_error(io),
            imap::Error::No(no) => format!("the server said NO: {}", no.information),
            imap::Error::Bad(bad) => format!("the server said BAD: {}", bad.information),
            imap::Error::Bye(bye) => {
                format!("the server closed the connection: {}", bye.information)
            }
            imap::Error::ConnectionLost => "the server closed the connection".to_string(),
            imap::Error::Parse(_) | imap::Error::Unexpected(_) => {
                "unreadable response from the server".to_string()
            }
            imap::Error::TagMismatch(_) => {
                "the server answered out of turn (tag mismatch)".to_string()
            }
            imap::Error::Validate(_) => {
                "a name or value contains a line break and cannot be sent".to_string()
            }
            other => other.to_string(),
        };
        let detail = fetch::clean_text(self.redact(&detail).as_bytes());
        self.mailbox_error(format!("{what}: {detail}"))
    }

    fn session_gone(&self) -> Error {
        self.mailbox_error(format!(
            "the connection was dropped after an earlier error ({})",
            self.poisoned.as_deref().unwrap_or("closed")
        ))
    }

    /// Runs one crate command. A failure other than a NO/BAD reply drops the connection.
    fn run<T>(
        &mut self,
        what: &str,
        op: impl FnOnce(&mut ImapSession) -> imap::Result<T>,
    ) -> Result<T> {
        let Some(mut session) = self.session.take() else {
            return Err(self.session_gone());
        };
        match op(&mut session) {
            Ok(value) => {
                session.take_all_unsolicited().for_each(drop);
                self.session = Some(session);
                Ok(value)
            }
            Err(e) => {
                let err = self.error(what, &e);
                if matches!(
                    e,
                    imap::Error::No(_) | imap::Error::Bad(_) | imap::Error::Validate(_)
                ) {
                    self.session = Some(session);
                } else {
                    self.poison(&err);
                }
                Err(err)
            }
        }
    }

    fn poison(&mut self, err: &Error) {
        self.session = None;
        if self.poisoned.is_none() {
            self.poisoned = Some(match err {
                Error::Mailbox(m) => m.message.clone(),
                other => other.to_string(),
            });
        }
    }

    /// SELECT (`write`) or EXAMINE the folder, unless it is already open that way.
    fn open_folder(&mut self, write: bool) -> Result<()> {
        if self.selected == Some(write) || (self.selected == Some(true) && !write) {
            return Ok(());
        }
        let name = utf7::encode(&self.folder);
        let what = format!("opening the folder '{}'", self.folder);
        let mailbox = self.run(&what, |s| {
            if write {
                s.select(&name)
            } else {
                s.examine(&name)
            }
        })?;
        self.apply_selection(mailbox.uid_validity, mailbox.exists, write)
    }

    /// Records what a SELECT or EXAMINE reported; a UIDVALIDITY that changed during the run
    /// ends the session.
    fn apply_selection(
        &mut self,
        uidvalidity: Option<u32>,
        exists: u32,
        write: bool,
    ) -> Result<()> {
        let Some(uidvalidity) = uidvalidity else {
            let err = self.mailbox_error(format!(
                "the server did not report the UIDVALIDITY of '{}'",
                self.folder
            ));
            return Err(err);
        };
        if let Some(old) = self.uidvalidity {
            if old != uidvalidity {
                let err = self.mailbox_error(format!(
                    "the UIDVALIDITY of '{}' changed during the run ({old} → {uidvalidity}); \
                     nothing more is done with it this run",
                    self.folder
                ));
                self.poison(&err);
                return Err(err);
            }
        }
        self.uidvalidity = Some(uidvalidity);
        self.exists = exists;
        self.selected = Some(write);
        Ok(())
    }

    /// SELECT and `UID FETCH low:* (UID RFC822.SIZE)` sent together, one round trip for both:
    /// `low` comes from the stored mark, which the caller checks against the UIDVALIDITY
    /// the SELECT reported. Returns the `(UID, size)` pairs listed.
    fn select_and_list(&mut self, low: u32) -> Result<Vec<(u32, u64)>> {
        if self.session.is_none() {
            return Err(self.session_gone());
        }
        let name = utf7::encode(&self.folder);
        let (select_tag, fetch_tag) = (self.next_tag(), self.next_tag());
        let what = format!("opening the folder '{}'", self.folder);
        let commands = format!(
            "{select_tag} SELECT {}\r\n{fetch_tag} UID FETCH {low}:* (UID RFC822.SIZE)\r\n",
            quoted(&name)
        );
        let wire = self.wire.clone();
        let mut selected = (None, 0u32);
        let mut listed = Vec::new();
        let read = (|| -> std::io::Result<((Status, String), (Status, String))> {
            wire.send(commands.as_bytes())?;
            let select = read_tagged(&wire, &select_tag, |line| {
                let upper = line.to_ascii_uppercase();
                if let Some(n) = upper
                    .strip_prefix("* ")
                    .and_then(|r| r.strip_suffix(" EXISTS"))
                {
                    selected.1 = n.trim().parse().unwrap_or(selected.1);
                } else if let Some(at) = upper.find("[UIDVALIDITY ") {
                    let rest = &upper[at + "[UIDVALIDITY ".len()..];
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    selected.0 = digits.parse().ok();
                }
            })?;
            let fetch = read_tagged(&wire, &fetch_tag, |line| {
                if let Some(pair) = listed_size(line) {
                    listed.push(pair);
                }
            })?;
            Ok((select, fetch))
        })();
        let ((select_status, select_text), (fetch_status, fetch_text)) = match read {
            Ok(replies) => replies,
            Err(e) => {
                let err = self.io_error(&what, &e);
                self.poison(&err);
                return Err(err);
            }
        };
        if select_status != Status::Ok {
            self.selected = None;
            return Err(self.mailbox_error(format!(
                "{what}: the server said {}: {}",
                if select_status == Status::No {
                    "NO"
                } else {
                    "BAD"
                },
                self.redact(&select_text)
            )));
        }
        self.apply_selection(selected.0, selected.1, true)?;
        // Some servers refuse `low:*` in an empty folder.
        if fetch_status != Status::Ok && self.exists > 0 {
            return Err(self.mailbox_error(format!(
                "listing the messages of '{}': the server said {}: {}",
                self.folder,
                if fetch_status == Status::No {
                    "NO"
                } else {
                    "BAD"
                },
                self.redact(&fetch_text)
            )));
        }
        self.stats.list_fetches += 1;
        Ok(listed)
    }

    fn parse_ids(&self, ids: &[String]) -> Result<Vec<u32>> {
        let mut uids = Vec::with_capacity(ids.len());
        for id in ids {
            match id.trim().parse::<u32>() {
                Ok(uid) if uid > 0 => uids.push(uid),
                _ => {
                    return Err(self.mailbox_error(format!(
                        "'{}' is not an IMAP UID",
                        fetch::clean_text(id.as_bytes())
                    )))
                }
            }
        }
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    fn next_tag(&mut self) -> String {
        self.raw_tag += 1;
        format!("P{}", self.raw_tag)
    }

    /// Downloads `batches` with up to [`PIPELINE_DEPTH`] FETCH commands queued.
    fn pipelined_fetch(
        &mut self,
        batches: &[Vec<u32>],
        sink: &mut dyn FnMut(Fetched) -> Flow,
    ) -> Result<()> {
        if self.session.is_none() {
            return Err(self.session_gone());
        }
        let requested: HashSet<u32> = batches.iter().flatten().copied().collect();
        let largest_listed = requested
            .iter()
            .filter_map(|uid| self.listed.get(uid))
            .copied()
            .max()
            .unwrap_or(0);
        let limit = usize::try_from(
            self.max_message_bytes
                .max(largest_listed)
                .saturating_add(65536),
        )
        .unwrap_or(usize::MAX);
        let wire = self.wire.clone();
        let mut in_flight: VecDeque<String> = VecDeque::new();
        let mut delivered: HashSet<u32> = HashSet::new();
        let mut next = 0usize;
        let mut stopped = false;
        let mut refused: Option<String> = None;
        loop {
            while !stopped && in_flight.len() < PIPELINE_DEPTH && next < batches.len() {
                let tag = self.next_tag();
                let command = format!(
                    "{tag} UID FETCH {} (UID BODY.PEEK[])\r\n",
                    uid_set(&batches[next])
                );
                if in_flight.is_empty() {
                    self.stats.fetch_round_trips += 1;
                }
                if let Err(e) = wire.send(command.as_bytes()) {
                    let err = self.mailbox_error(format!(
                        "downloading messages: {}",
                        net::describe_io_error(&e)
                    ));
                    self.poison(&err);
                    return Err(err);
                }
                self.stats.body_fetches += 1;
                in_flight.push_back(tag);
                next += 1;
            }
            let Some(expected) = in_flight.front().cloned() else {
                break;
            };
            let response = match fetch::read_response(&wire, limit) {
                Ok(r) => r,
                Err(e) => {
                    let detail = match e {
                        ReadError::Io(io) => net::describe_io_error(&io),
                        ReadError::Protocol(p) => p,
                    };
                    let err = self.mailbox_error(format!("downloading messages: {detail}"));
                    self.poison(&err);
                    return Err(err);
                }
            };
            match response {
                Response::Fetch {
                    uid: Some(uid),
                    body: Some(raw),
                    ..
                } => {
                    // An empty body for a message listed with content: it vanished meanwhile.
                    let vanished = raw.is_empty() && self.listed.get(&uid).is_some_and(|&n| n > 0);
                    if !stopped && !vanished && requested.contains(&uid) && delivered.insert(uid) {
                        self.stats.messages_fetched += 1;
                        let id = uid.to_string();
                        if sink(Fetched { id, raw }) == Flow::Stop {
                            stopped = true;
                        }
                    }
                }
                Response::Fetch { .. } | Response::Untagged => {}
                Response::Tagged { tag, status, text } => {
                    if tag != expected {
                        let err = self.mailbox_error(format!(
                            "downloading messages: the server answered {tag} while {expected} \
                             was expected"
                        ));
                        self.poison(&err);
                        return Err(err);
                    }
                    in_flight.pop_front();
                    // NO: some messages were expunged meanwhile; the others arrived.
                    if status == Status::Bad && refused.is_none() {
                        refused = Some(text);
                    }
                }
                Response::Bye(text) => {
                    let err = self.mailbox_error(format!(
                        "downloading messages: the server closed the connection: {}",
                        self.redact(&text)
                    ));
                    self.poison(&err);
                    return Err(err);
                }
                Response::Continuation(_) => {
                    let err = self.mailbox_error(
                        "downloading messages: unexpected continuation request from the server"
                            .to_string(),
                    );
                    self.poison(&err);
                    return Err(err);
                }
            }
        }
        match refused {
            Some(text) => Err(self.mailbox_error(format!(
                "downloading messages: the server said BAD: {}",
                self.redact(&text)
            ))),
            None => Ok(()),
        }
    }

    fn store_flags(&mut self, uids: &[u32], flags: &str, what: &str) -> Result<()> {
        for chunk in uids.chunks(ACTION_MAX_UIDS) {
            let set = uid_set(chunk);
            let query = format!("+FLAGS.SILENT ({flags})");
            self.run(what, |s| s.uid_store(&set, &query).map(drop))?;
        }
        Ok(())
    }

    /// Expunges exactly `uids` (already flagged `\Deleted`); see the module docs without
    /// UIDPLUS.
    fn expunge_uids(&mut self, uids: &[u32]) -> Result<()> {
        if self.uidplus {
            for chunk in uids.chunks(ACTION_MAX_UIDS) {
                let set = uid_set(chunk);
                self.run("expunging messages", |s| s.uid_expunge(&set).map(drop))?;
            }
            return Ok(());
        }
        let deleted = self.run("looking for messages flagged \\Deleted", |s| {
            s.uid_search("DELETED")
        })?;
        let mut ours = self.remembered(PENDING_NAMESPACE)?;
        ours.extend(uids.iter().copied());
        if deleted.iter().all(|uid| ours.contains(uid)) {
            self.run("expunging messages", |s| s.expunge().map(drop))?;
            ours.clear();
        } else {
            self.stats.expunges_skipped += 1;
            // Forget what is gone already; keep ours that still wait.
            ours.retain(|uid| deleted.contains(uid));
        }
        self.remember(PENDING_NAMESPACE, &ours)
    }

    /// Makes sure `folder` exists (LIST, then CREATE when missing).
    fn ensure_folder(&mut self, folder: &str) -> Result<()> {
        if self.folders_ready.contains(folder) {
            return Ok(());
        }
        let wire_name = utf7::encode(folder);
        let pattern = quoted(&wire_name);
        let exists = |names: &imap::types::Names| {
            names.iter().any(|n| {
                n.name() == wire_name
                    || (n.name().eq_ignore_ascii_case("INBOX")
                        && wire_name.eq_ignore_ascii_case("INBOX"))
            })
        };
        let what = format!("looking for the folder '{folder}'");
        let names = self.run(&what, |s| s.list(Some(""), Some(&pattern)))?;
        if !exists(&names) {
            let what = format!("creating the folder '{folder}'");
            if let Err(e) = self.run(&what, |s| s.create(&wire_name)) {
                // Another client may have created it meanwhile.
                let again = self.run(&what, |s| s.list(Some(""), Some(&pattern)))?;
                if !exists(&again) {
                    return Err(e);
                }
            }
        }
        self.folders_ready.insert(folder.to_string());
        Ok(())
    }

    /// Moves `uids` into `folder` (MOVE, else COPY + \Deleted + expunge of those UIDs).
    fn move_uids(&mut self, uids: &[u32], folder: &str) -> Result<()> {
        self.ensure_folder(folder)?;
        let target = utf7::encode(folder);
        for chunk in uids.chunks(ACTION_MAX_UIDS) {
            let set = uid_set(chunk);
            let what = format!("moving messages to '{folder}'");
            if self.move_ext {
                self.run(&what, |s| s.uid_mv(&set, &target))?;
            } else {
                self.run(&what, |s| s.uid_copy(&set, &target))?;
                self.store_flags(chunk, "\\Deleted", &what)?;
                self.expunge_uids(chunk)?;
            }
        }
        Ok(())
    }

    fn settle(&mut self, uids: &[u32]) {
        self.settled.extend(uids.iter().copied());
    }

    fn kv_key(&self) -> String {
        format!("{}|{}", self.account, self.mark_key)
    }

    /// A UID set remembered under `namespace` for the current UIDVALIDITY (empty otherwise).
    fn remembered(&self, namespace: &str) -> Result<BTreeSet<u32>> {
        let Some(uidvalidity) = self.uidvalidity else {
            return Ok(BTreeSet::new());
        };
        let stored = self.state.get_kv(namespace, &self.kv_key())?;
        Ok(stored
            .as_deref()
            .and_then(|v| v.split_once(':'))
            .filter(|(v, _)| v.parse::<u32>().ok() == Some(uidvalidity))
            .and_then(|(_, set)| parse_uid_set(set, MAX_REMEMBERED))
            .unwrap_or_default())
    }

    fn remember(&self, namespace: &str, uids: &BTreeSet<u32>) -> Result<()> {
        let Some(uidvalidity) = self.uidvalidity else {
            return Ok(());
        };
        if uids.is_empty() {
            self.state.delete_kv(namespace, &self.kv_key())?;
            return Ok(());
        }
        let set = uid_set(&uids.iter().copied().collect::<Vec<_>>());
        self.state
            .set_kv(namespace, &self.kv_key(), &format!("{uidvalidity}:{set}"))
    }

    fn save_mark(&mut self) -> Result<()> {
        let Some((uidvalidity, start)) = self.listed_under else {
            return Ok(());
        };
        let mut settled = self.settled.clone();
        settled.extend(self.settled_before.iter().copied());
        let mut candidates: Vec<u32> = self.listed.keys().copied().collect();
        candidates.extend(self.settled_before.iter().copied());
        candidates.sort_unstable();
        candidates.dedup();
        let low = next_low_water(start, &candidates, &settled);
        if self.stored_mark != Some((uidvalidity, low)) {
            self.state
                .set_imap_mark(&self.account, &self.mark_key, uidvalidity, low)?;
            self.stored_mark = Some((uidvalidity, low));
        }
        let above: BTreeSet<u32> = settled.into_iter().filter(|&uid| uid > low).collect();
        if above != self.settled_before {
            self.remember(SETTLED_NAMESPACE, &above)?;
            self.settled_before = above;
        }
        Ok(())
    }
}

impl Mailbox for ImapMailbox {
    fn protocol(&self) -> &'static str {
        "IMAP"
    }

    fn list(&mut self) -> Result<Vec<Listed>> {
        // SELECT afresh (the server shows mail that arrived since only on a new selection),
        // listing from the stored mark in the same round trip.
        self.selected = None;
        let stored = self.state.imap_mark(&self.account, &self.mark_key)?;
        let guess = stored.map_or(1, |(_, low)| low.max(1));
        let mut found = Some(self.select_and_list(guess)?);
        let uidvalidity = self.uidvalidity.unwrap_or(0);
        let low = match stored {
            Some((v, low)) if v == uidvalidity => low.max(1),
            _ => 1,
        };
        if low != guess {
            // The folder was recreated (new UIDVALIDITY): everything in it is listed.
            found = None;
        }
        self.stored_mark = stored;
        self.listed_under = Some((uidvalidity, low));
        self.listed.clear();
        self.settled_before = self
            .remembered(SETTLED_NAMESPACE)?
            .into_iter()
            .filter(|&uid| uid >= low)
            .collect();
        if self.exists > 0 {
            let found = match found {
                Some(found) => found,
                None => {
                    let what = format!("listing the messages of '{}'", self.folder);
                    let range = format!("{low}:*");
                    let found = self.run(&what, |s| {
                        let fetches = s.uid_fetch(&range, "(UID RFC822.SIZE)")?;
                        Ok(fetches
                            .iter()
                            .filter_map(|f| f.uid.map(|uid| (uid, f.size.map_or(0, u64::from))))
                            .collect::<Vec<_>>())
                    })?;
                    self.stats.list_fetches += 1;
                    found
                }
            };
            // `low:*` includes the last message even when its UID is below `low`.
            // UIDs an earlier run settled above the mark are not new either.
            let settled_before = &self.settled_before;
            // A UID can be reported twice (a flag change by another client meanwhile, without
            // its size): the size it was listed with is kept.
            for (uid, size) in found
                .into_iter()
                .filter(|(uid, _)| *uid >= low && !settled_before.contains(uid))
            {
                let listed = self.listed.entry(uid).or_insert(size);
                *listed = (*listed).max(size);
            }
        }
        Ok(self
            .listed
            .iter()
            .map(|(uid, size)| Listed {
                id: uid.to_string(),
                size: *size,
            })
            .collect())
    }

    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()> {
        let uids = self.parse_ids(ids)?;
        if uids.is_empty() {
            return Ok(());
        }
        if self.selected.is_none() {
            self.open_folder(true)?;
        }
        let listed = &self.listed;
        let batches = plan_batches(
            &uids,
            |uid| listed.get(&uid).copied(),
            BATCH_BYTES,
            BATCH_MAX_UIDS,
        );
        self.pipelined_fetch(&batches, sink)
    }

    fn mark_processed(&mut self, ids: &[String]) -> Result<()> {
        let uids = self.parse_ids(ids)?;
        if uids.is_empty() {
            return Ok(());
        }
        self.open_folder(true)?;
        match self.action.clone() {
            ProcessedAction::Seen => {
                self.store_flags(&uids, "\\Seen", "marking messages as seen")?;
            }
            ProcessedAction::Delete => {
                self.store_flags(&uids, "\\Deleted", "deleting messages")?;
                self.expunge_uids(&uids)?;
            }
            ProcessedAction::Move(folder) => {
                self.move_uids(&uids, &normalize_folder(&folder))?;
            }
        }
        self.settle(&uids);
        Ok(())
    }

    fn mark_skipped(&mut self, ids: &[String]) -> Result<()> {
        let uids = self.parse_ids(ids)?;
        self.settle(&uids);
        Ok(())
    }

    fn quarantine(&mut self, ids: &[String]) -> Result<bool> {
        let uids = self.parse_ids(ids)?;
        if uids.is_empty() {
            return Ok(true);
        }
        self.open_folder(true)?;
        self.move_uids(&uids, QUARANTINE_FOLDER)?;
        self.settle(&uids);
        Ok(true)
    }

    fn count(&mut self) -> Result<usize> {
        self.selected = None;
        self.open_folder(false)?;
        Ok(self.exists as usize)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let saved = self.save_mark();
        if let Some(session) = self.session.take() {
            // The work is done and the mark saved: LOGOUT is said, its reply not awaited (a
            // round trip less; nothing is pending that it could confirm or undo).
            let tag = self.next_tag();
            let _ = self.wire.send(format!("{tag} LOGOUT\r\n").as_bytes());
            drop(session);
        }
        saved
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
    fn listing_lines_give_uid_and_size_in_any_order() {
        assert_eq!(
            listed_size("* 12 FETCH (UID 40 RFC822.SIZE 3012)"),
            Some((40, 3012))
        );
        assert_eq!(
            listed_size("* 1 fetch (FLAGS (\\Seen \\Recent) RFC822.SIZE 7 UID 3)"),
            Some((3, 7))
        );
        assert_eq!(listed_size("* 1 FETCH (FLAGS (\\Seen))"), None);
        assert_eq!(listed_size("* 3 EXISTS"), None);
        assert_eq!(listed_size("* 1 FETCH (UID x RFC822.SIZE 7)"), None);
        assert_eq!(literal_length(b"* OK [ALERT] {12}\r\n"), Some(12));
        assert_eq!(literal_length(b"* 1 FETCH (X {3+}\r\n"), Some(3));
        assert_eq!(literal_length(b"* OK done {x}\r\n"), None);
        assert_eq!(literal_length(b"* OK done\r\n"), None);
    }

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(uid_set(&[5]), "5");
        assert_eq!(uid_set(&[]), "");
        assert_eq!(uid_set(&[u32::MAX - 1, u32::MAX]), "4294967294:4294967295");
    }

    #[test]
    fn uid_sets_read_back() {
        let set = parse_uid_set("1:3,7,10:9", 100).unwrap();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 7, 9, 10]);
        assert_eq!(parse_uid_set("", 100), Some(BTreeSet::new()));
        assert_eq!(parse_uid_set("1:x", 100), None);
        assert_eq!(parse_uid_set("1:4000000000", 1000), None);
        assert_eq!(parse_uid_set("1:11", 10), None);
        assert_eq!(parse_uid_set("1:10", 10).map(|s| s.len()), Some(10));
        assert_eq!(parse_uid_set("1:5,7:12", 10), None);
    }

    #[test]
    fn batches_are_bounded_by_bytes_and_count() {
        let sizes = |uid: u32| Some(if uid == 5 { 30 } else { 4 });
        let uids: Vec<u32> = (1..=8).collect();
        assert_eq!(
            plan_batches(&uids, sizes, 10, 100),
            vec![vec![1, 2], vec![3, 4], vec![5], vec![6, 7], vec![8]]
        );
        assert_eq!(
            plan_batches(&uids, |_| Some(1), 1000, 3),
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8]]
        );
        // Unknown sizes travel alone.
        assert_eq!(
            plan_batches(&[1, 2], |_| None, 10, 100),
            vec![vec![1], vec![2]]
        );
        let many: Vec<u32> = (1..=300).collect();
        assert_eq!(
            plan_batches(&many, |_| Some(2000), BATCH_BYTES, BATCH_MAX_UIDS).len(),
            1
        );
    }

    #[test]
    fn low_water_stops_at_the_first_open_message() {
        let settled: HashSet<u32> = [3, 4, 9].into_iter().collect();
        assert_eq!(next_low_water(3, &[3, 4, 7, 9], &settled), 7);
        assert_eq!(next_low_water(3, &[3, 4, 9], &settled), 10);
        assert_eq!(next_low_water(3, &[], &settled), 3);
        assert_eq!(next_low_water(12, &[3], &settled), 12);
        assert_eq!(next_low_water(1, &[2, 5], &HashSet::new()), 2);
    }

    #[test]
    fn folder_names() {
        assert_eq!(normalize_folder(" inbox "), "INBOX");
        assert_eq!(normalize_folder("Done/PCR"), "Done/PCR");
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
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
