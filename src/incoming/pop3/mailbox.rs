//! The POP3 mailbox: the [`Mailbox`] trait over our POP3 client ([`super`]).
//!
//! - `list` = `UIDL` + `LIST`, minus the UIDLs recorded as done for this account, login and
//!   server in the state store (namespace [`done_namespace`]): skipped and quarantined
//!   messages, which stay on the server because POP3 has no flags or folders. A server that
//!   gives two messages the same UIDL (which it must not) has the first processed as usual;
//!   the other is left on the server and reported through `take_notices` on every run.
//! - `fetch_each` = pipelined `RETR` (when the server offers PIPELINING), one continuous
//!   pipeline with at most [`IN_FLIGHT_BYTES`] asked for and not yet read, so that a `Flow::Stop`
//!   takes effect soon and the round trips do not grow with the mailbox.
//! - `mark_processed` = `DELE` of exactly those messages; only `QUIT`, sent by `finish`,
//!   makes the server remove them. Any failure drops the connection WITHOUT `QUIT`, so no
//!   `DELE` of this session takes effect; the next run lists those messages again and the
//!   Message-ID ledger re-applies only the `DELE`.
//! - `quarantine` records the UIDLs as done and returns false (POP3 has no place to move
//!   them; the ledger tells the rest).

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Account, MailboxType};
use crate::error::{Error, Result};
use crate::incoming::pop3::{self, Pop3Session, TokenLogin, Transaction};
use crate::incoming::{Fetched, Flow, Listed, Mailbox};
use crate::net::{self, MaybeTls};
use crate::sasl::{Credentials, TokenSignIn};
use crate::state::StateStore;

/// At most this many bytes of messages (by LIST size) are asked for and not yet read (or one
/// larger message): as much as IMAP keeps in flight (two fetches of 8 MB).
pub const IN_FLIGHT_BYTES: u64 = 16 * 1024 * 1024;
/// Slack over the announced size allowed when reading a message.
const SIZE_SLACK: u64 = 64 * 1024;

/// The state store namespace of the UIDLs `account` has finished on `login@host`.
pub fn done_namespace(account: &str, login: &str, host: &str) -> String {
    format!("pop3-done:{account}:{login}@{}", host.to_ascii_lowercase())
}

/// The notice for a UIDL the server gives message `first` and message `again` alike.
fn duplicate_uidl_notice(uid: &str, first: u32, again: u32) -> String {
    let shown: String = uid
        .chars()
        .take(80)
        .collect::<String>()
        .escape_default()
        .to_string();
    format!(
        "the POP3 server lists UIDL {shown} for messages {first} and {again}; message {again} \
         is not downloaded (delete the duplicate on the server)"
    )
}

/// One POP3 maildrop, logged in (and therefore locked by the server until `finish`).
pub struct Pop3Mailbox {
    account: String,
    server: String,
    session: Option<Pop3Session<MaybeTls, Transaction>>,
    poisoned: Option<String>,
    namespace: String,
    max_message_bytes: u64,
    /// UIDL → (message number in this session, size), from `list`.
    listed: HashMap<String, (u32, u64)>,
    /// What `list` found wrong with the server's listing, for `take_notices`.
    notices: Vec<String>,
    state: StateStore,
}

impl std::fmt::Debug for Pop3Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pop3Mailbox")
            .field("account", &self.account)
            .field("server", &self.server)
            .field("connected", &self.session.is_some())
            .finish()
    }
}

impl Pop3Mailbox {
    /// Connects as the account says (SSL, STLS required for TLS, or plain) and logs in with
    /// its LOGIN and PASSWORD.
    pub fn connect(account: &Account, state: StateStore) -> Result<Pop3Mailbox> {
        let (id, incoming) = crate::incoming::settings_of(account, MailboxType::Pop3)?;
        let (_, password) = crate::incoming::server_and_password(account, &id, incoming)?;
        let credentials = Credentials::Password {
            user: account.login_name().to_string(),
            password,
        };
        Pop3Mailbox::connect_with(account, state, credentials)
    }

    /// [`Pop3Mailbox::connect`] signing in with `credentials`: with
    /// [`Credentials::Bearer`], `AUTH XOAUTH2` (else OAUTHBEARER) with the token source's
    /// access token ([`Pop3Session::login_token`]); a token refused as invalid or expired
    /// gets one fresh token and one more attempt, on a new connection if the server closed
    /// this one. A final refusal is an `Error::Auth`.
    pub fn connect_with(
        account: &Account,
        state: StateStore,
        credentials: Credentials,
    ) -> Result<Pop3Mailbox> {
        let (id, incoming) = crate::incoming::settings_of(account, MailboxType::Pop3)?;
        let host = crate::incoming::server_of(&id, incoming)?;
        let login = credentials.user();
        let connect = || {
            pop3::connect(
                &id,
                host,
                incoming.port,
                incoming.ssl,
                &account.tls,
                account.timeout,
            )
        };
        let session = match &credentials {
            Credentials::Password { user, password } => connect()?.login(user, password)?,
            Credentials::Bearer { user, tokens } => {
                let mut signin = TokenSignIn::new(Arc::clone(tokens));
                let mut reconnected = false;
                loop {
                    match connect()?.login_token(user, &mut signin, host, incoming.port)? {
                        TokenLogin::LoggedIn(session) => break session,
                        TokenLogin::Reconnect(_) if !reconnected => reconnected = true,
                        TokenLogin::Reconnect(err) => return Err(err),
                    }
                }
            }
        };
        Ok(Pop3Mailbox {
            account: id.clone(),
            server: net::server_label(host, incoming.port),
            session: Some(session),
            poisoned: None,
            namespace: done_namespace(&id, login, host),
            max_message_bytes: incoming.max_message_bytes,
            listed: HashMap::new(),
            notices: Vec::new(),
            state,
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::mailbox(&self.account, &self.server, message)
    }

    /// Runs one client call; any error drops the connection (no QUIT: nothing is committed).
    fn run<T>(
        &mut self,
        op: impl FnOnce(&mut Pop3Session<MaybeTls, Transaction>) -> Result<T>,
    ) -> Result<T> {
        let Some(session) = self.session.as_mut() else {
            return Err(self.error(format!(
                "the connection was dropped after an earlier error ({}); nothing marked in \
                 this session was committed",
                self.poisoned.as_deref().unwrap_or("closed")
            )));
        };
        match op(session) {
            Ok(value) => Ok(value),
            Err(e) => {
                self.session = None;
                if self.poisoned.is_none() {
                    self.poisoned = Some(match &e {
                        Error::Mailbox(m) => m.message.clone(),
                        other => other.to_string(),
                    });
                }
                Err(e)
            }
        }
    }

    fn numbers(&self, ids: &[String]) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> = ids
            .iter()
            .filter_map(|id| self.listed.get(id).map(|(n, _)| (*n, id.clone())))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    fn record_done(&self, ids: &[String], what: &str) -> Result<()> {
        for id in ids {
            self.state.set_kv(&self.namespace, id, what)?;
        }
        Ok(())
    }
}

impl Mailbox for Pop3Mailbox {
    fn protocol(&self) -> &'static str {
        "POP3"
    }

    fn list(&mut self) -> Result<Vec<Listed>> {
        let (mut uidls, sizes) = self.run(|s| s.uidl_and_list())?;
        let sizes: HashMap<u32, u64> = sizes.into_iter().map(|e| (e.number, e.size)).collect();
        uidls.sort_by_key(|e| e.number);
        self.listed.clear();
        let mut listed = Vec::new();
        // UIDL → the first message number that has it.
        let mut first_of: HashMap<String, u32> = HashMap::new();
        for entry in uidls {
            if let Some(&first) = first_of.get(&entry.uid) {
                // A server must not repeat a UIDL. The first message with it is processed as
                // usual; the other cannot be told apart from it by its UIDL (a DELE, a ledger
                // record would hit both), so it stays on the server and is reported each run
                // until someone removes it.
                self.notices
                    .push(duplicate_uidl_notice(&entry.uid, first, entry.number));
                continue;
            }
            first_of.insert(entry.uid.clone(), entry.number);
            let size = sizes.get(&entry.number).copied().unwrap_or(0);
            if self.state.get_kv(&self.namespace, &entry.uid)?.is_some() {
                continue;
            }
            self.listed.insert(entry.uid.clone(), (entry.number, size));
            listed.push(Listed {
                id: entry.uid,
                size,
            });
        }
        Ok(listed)
    }

    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()> {
        let wanted = self.numbers(ids);
        if wanted.is_empty() {
            return Ok(());
        }
        let uidl_of: HashMap<u32, String> = wanted.iter().cloned().collect();
        let numbers: Vec<u32> = wanted.iter().map(|(n, _)| *n).collect();
        let size_of: HashMap<u32, u64> = wanted
            .iter()
            .filter_map(|(n, id)| self.listed.get(id).map(|(_, size)| (*n, *size)))
            .collect();
        let largest = size_of.values().copied().max().unwrap_or(0);
        let max_bytes = self
            .max_message_bytes
            .max(largest)
            .saturating_add(SIZE_SLACK);
        // One continuous pipeline of at most IN_FLIGHT_BYTES in flight: the round trips stay the
        // same however large the mailbox.
        let size = |n: u32| size_of.get(&n).copied().unwrap_or(0);
        self.run(|s| {
            s.retr_stream(
                &numbers,
                max_bytes,
                &size,
                IN_FLIGHT_BYTES,
                |number, result| {
                    // `-ERR` for one message (gone meanwhile): nothing to hand over.
                    match (result, uidl_of.get(&number)) {
                        (Ok(raw), Some(id)) => sink(Fetched {
                            id: id.clone(),
                            raw,
                        }),
                        _ => Flow::Continue,
                    }
                },
            )
        })
    }

    fn mark_processed(&mut self, ids: &[String]) -> Result<()> {
        let wanted = self.numbers(ids);
        let unknown = ids.len() - wanted.len();
        if wanted.is_empty() && unknown == 0 {
            return Ok(());
        }
        let numbers: Vec<u32> = wanted.iter().map(|(n, _)| *n).collect();
        let results = self.run(|s| s.dele_many(&numbers))?;
        let refused: Vec<String> = results
            .into_iter()
            .filter_map(|(n, r)| r.err().map(|text| format!("message {n}: {text}")))
            .collect();
        if !refused.is_empty() {
            return Err(self.error(format!(
                "the server refused to delete {} message(s): {}",
                refused.len(),
                refused.join("; ")
            )));
        }
        if unknown > 0 {
            return Err(self.error(format!(
                "{unknown} message(s) to delete were not listed in this session"
            )));
        }
        Ok(())
    }

    fn mark_skipped(&mut self, ids: &[String]) -> Result<()> {
        self.record_done(ids, "skipped")
    }

    fn quarantine(&mut self, ids: &[String]) -> Result<bool> {
        self.record_done(ids, "quarantined")?;
        Ok(false)
    }

    fn count(&mut self) -> Result<usize> {
        Ok(self.run(|s| s.stat())?.count as usize)
    }

    fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        match self.session.take() {
            Some(session) => session.quit(),
            None => Err(self.error(format!(
                "the connection was dropped after an earlier error ({}); nothing marked in \
                 this session was committed",
                self.poisoned.as_deref().unwrap_or("closed")
            ))),
        }
    }
}
