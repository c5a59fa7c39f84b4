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
//!
//! # Layout
//! This file holds the mailbox's state ([`ImapMailbox`]); `connection` connects and signs in,
//! `commands` runs commands and phrases their errors, `folder` opens the folder and applies
//! the actions, `download` plans and pipelines the FETCHes (read by `fetch` from the shared
//! `wire`), `marks` keeps what is new, and `mailbox` is the [`Mailbox`] adapter, as for every
//! protocol.
//!
//! [`Mailbox`]: crate::incoming::Mailbox
//! [`Mailbox::list`]: crate::incoming::Mailbox::list
//! [`Mailbox::finish`]: crate::incoming::Mailbox::finish

mod commands;
mod connection;
mod download;
mod fetch;
mod folder;
mod mailbox;
mod marks;
pub mod utf7;
mod wire;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use imap::Session;

use crate::config::ProcessedAction;
use crate::net::MaybeTls;
use crate::sasl::Credentials;
use crate::state::StateStore;

use connection::Caps;
use wire::Wire;

pub use download::plan_batches;
pub use marks::{next_low_water, parse_uid_set, uid_set};

/// Where messages that failed three runs are moved.
pub const QUARANTINE_FOLDER: &str = "PCR-Failed";
/// A download batch holds at most this many bytes (by RFC822.SIZE), or one larger message.
pub const BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// A download batch holds at most this many messages (keeps each command line short).
pub const BATCH_MAX_UIDS: usize = 1000;
/// State store namespace: UIDs settled above the low-water mark (`<uidvalidity>:<uid set>`).
pub const SETTLED_NAMESPACE: &str = "imap-settled";
/// State store namespace: our messages flagged `\Deleted` but not yet expunged (servers
/// without UIDPLUS), as `<uidvalidity>:<uid set>`.
pub const PENDING_NAMESPACE: &str = "imap-deleted";

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

impl ImapMailbox {
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
}
