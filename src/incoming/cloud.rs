//! What the OFFICE365 (Microsoft Graph) and GMAIL (Gmail API) mailboxes share: the account's
//! incoming settings, the API client, the state store record of the message ids the account has
//! finished, the listing mark (where the next incremental listing starts, and the candidates
//! found but not finished), the one-request-per-message loops of downloading and marking, and
//! so the whole [`Mailbox`] trait; each API supplies its own requests through [`CloudApi`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Download, Fetched, Flow, Listed, Mailbox};
use crate::config::{Account, MailboxType, ProcessedAction};
use crate::error::{Error, Result};
use crate::http::{
    endpoint_label, Body, HttpClient, HttpErrorKind, Method, Request, Response, Role,
};
use crate::oauth::{ApiClient, ApiError, OAuthEnv};
use crate::state::StateStore;

/// The provider-independent part of a cloud mailbox.
pub(super) struct CloudMailbox {
    pub api: ApiClient,
    state: StateStore,
    pub account: String,
    /// The state store namespace of the finished message ids.
    namespace: String,
    /// The state store namespace of the listing marks ([`ListMark`]), one per folder.
    marks: String,
    /// The account's EMAIL (lower case): part of a mark's key, so a mark is never followed
    /// for another mailbox.
    email: String,
    /// INCOMING_FOLDER: a Graph folder or a Gmail label.
    pub folder: String,
    pub action: ProcessedAction,
    /// MAX_MESSAGES, at least 1.
    pub max_messages: usize,
    pub max_bytes: u64,
    /// The sizes of the last listing, by id: a large message waits for the run's gate.
    listed_sizes: std::cell::RefCell<std::collections::HashMap<String, u64>>,
}

impl CloudMailbox {
    /// The account's settings for a mailbox of type `mailbox`; `namespace` and `marks` name
    /// the state store namespaces of an account's finished ids and of its listing marks. No
    /// request is made.
    pub fn open(
        account: &Account,
        env: &OAuthEnv,
        state: StateStore,
        mailbox: MailboxType,
        namespace: fn(&str) -> String,
        marks: fn(&str) -> String,
    ) -> Result<CloudMailbox> {
        let (id, incoming) = super::settings_of(account, mailbox)?;
        Ok(CloudMailbox {
            api: ApiClient::new(account, env, Role::Receive)?,
            state,
            namespace: namespace(&id),
            marks: marks(&id),
            email: account.email.trim().to_lowercase(),
            account: id,
            folder: incoming.folder.clone(),
            action: incoming.processed_action.clone(),
            max_messages: incoming.max_messages.max(1),
            max_bytes: incoming.max_message_bytes,
            listed_sizes: Default::default(),
        })
    }

    /// The same mailbox with another HTTP client (e.g. another retry policy).
    pub fn with_http(mut self, http: HttpClient) -> CloudMailbox {
        self.api = self.api.with_http(http);
        self
    }

    /// The Debug output of the mailbox type `name`: the account and folder, nothing secret.
    pub fn debug(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(name)
            .field("account", &self.account)
            .field("folder", &self.folder)
            .finish_non_exhaustive()
    }

    /// The crate error for a failed API call.
    pub fn fail(&self, e: ApiError) -> Error {
        self.api.error(e)
    }

    /// A mailbox error of this account at the API's base URL.
    pub fn error(&self, message: String) -> Error {
        Error::mailbox(&self.account, self.api.base(), message)
    }

    /// Sends `req` and reads the reply as JSON.
    pub fn json<T: DeserializeOwned>(&self, req: Request<'_>) -> Result<T> {
        self.api.json(req)
    }

    /// One request to `url` (with a JSON `body` if any) whose reply body is not needed.
    pub fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> std::result::Result<(), ApiError> {
        let mut req = Request::new(method, url).with_headers(headers);
        if let Some(body) = body {
            req = req.with_body(Body::Json(body));
        }
        self.api.send(req).map(|_| ())
    }

    /// The number `field` of the JSON object at `url` (a folder's or label's message count).
    pub fn count(&self, url: &str, headers: &[(&str, &str)], field: &str) -> Result<usize> {
        let value: serde_json::Value =
            self.json(Request::new(Method::Get, url).with_headers(headers))?;
        value
            .get(field)
            .and_then(|v| v.as_u64())
            .map(|n| n as usize)
            .ok_or_else(|| {
                self.error(format!(
                    "{}: the reply has no {field}",
                    endpoint_label(Method::Get, url)
                ))
            })
    }

    /// Creates a folder or label with `req` and returns its id (`id_of` the reply); when
    /// someone created it meanwhile (409), `find` looks it up.
    pub fn create<T: DeserializeOwned>(
        &self,
        req: Request<'_>,
        id_of: impl FnOnce(T) -> String,
        find: impl FnOnce() -> Result<Option<String>>,
    ) -> Result<String> {
        match self.api.send(req) {
            Ok(resp) => resp
                .json::<T>()
                .map(id_of)
                .map_err(|e| self.fail(ApiError::Http(e))),
            Err(ApiError::Http(e)) if e.is_status(409) => {
                find()?.ok_or_else(|| self.fail(ApiError::Http(e)))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// True when the account has finished the message `id`.
    pub fn is_done(&self, id: &str) -> Result<bool> {
        Ok(self.state.get_kv(&self.namespace, id)?.is_some())
    }

    fn record(&self, id: &str, what: &str) -> Result<()> {
        self.state.set_kv(&self.namespace, id, what)
    }

    /// The key of the mark of `folder` (a Graph folder id, a Gmail label id) in the mailbox
    /// at `user` (the API's path of the mailbox: `/me`, `/users/x`, `me`, an address).
    pub fn mark_key(&self, user: &str, folder: &str) -> String {
        format!("{}|{user}|{folder}", self.email)
    }

    /// The saved mark under `key`, if any; one that cannot be read counts as none (the next
    /// listing is then a full one, which loses nothing).
    pub fn load_mark(&self, key: &str) -> Result<Option<ListMark>> {
        Ok(self
            .state
            .get_kv(&self.marks, key)?
            .and_then(|v| serde_json::from_str::<ListMark>(&v).ok())
            .filter(|m| !m.cursor.is_empty()))
    }

    /// Saves the mark under `key`: cursor and candidates in one value, so a run that stops
    /// anywhere leaves the previous pair or the new one, each complete.
    pub fn save_mark(&self, key: &str, mark: &ListMark) -> Result<()> {
        let value = serde_json::to_string(mark)
            .map_err(|e| self.error(format!("cannot encode the listing mark: {e}")))?;
        self.state.set_kv(&self.marks, key, &value)
    }

    /// Drops the candidates the account has finished since they were found.
    pub fn drop_done(&self, mark: &mut ListMark) -> Result<()> {
        let mut kept = Vec::with_capacity(mark.pending.len());
        for c in mark.pending.drain(..) {
            if !self.is_done(&c.id)? {
                kept.push(c);
            }
        }
        mark.pending = kept;
        Ok(())
    }

    /// Applies one request per message; a message already gone (404) counts as done. Each
    /// success is recorded at once; the first failure is reported after all were tried.
    pub fn for_each_message(
        &self,
        ids: &[String],
        what: &str,
        request: &dyn Fn(&str) -> std::result::Result<(), ApiError>,
    ) -> Result<()> {
        let mut failed = 0;
        let mut first: Option<Error> = None;
        for id in ids {
            match request(id) {
                Ok(()) => self.record(id, what)?,
                Err(e) if e.status() == Some(404) => self.record(id, what)?,
                Err(e) => {
                    failed += 1;
                    first.get_or_insert(self.fail(e));
                }
            }
        }
        match first {
            None => Ok(()),
            Some(Error::Mailbox(mut f)) => {
                f.message = format!(
                    "{failed} of {} messages not {what}: {}",
                    ids.len(),
                    f.message
                );
                Err(Error::Mailbox(f))
            }
            Some(other) => Err(other),
        }
    }
}

/// What a cloud mailbox keeps between runs for one folder (SPEC §8: "Cloud mailboxes list
/// incrementally (Graph delta, Gmail history) from marks kept here").
///
/// `cursor` is where the next listing starts: Graph's `@odata.deltaLink` (or the
/// `@odata.nextLink` of a round left unfinished at MAX_MESSAGES), Gmail's `historyId`.
/// `pending` holds the messages a listing found in the folder that were not finished then
/// (failed, waiting behind MAX_MESSAGES, oversized, being read by another run): an incremental
/// listing reports only what changed, so these would otherwise never be seen again. They are
/// dropped once finished (the state store's record of finished ids), or when the API says they
/// left the folder.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct ListMark {
    pub cursor: String,
    #[serde(default)]
    pub pending: Vec<Candidate>,
}

/// A message found in the folder and not finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Candidate {
    pub id: String,
    /// When it arrived, as the API says it (Graph: `receivedDateTime`, Gmail: `internalDate`
    /// in ms), for the oldest-first order; empty when not known yet.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub at: String,
    /// Its size in bytes; 0 when not known.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
}

impl Candidate {
    /// A candidate known by its id only.
    pub fn new(id: String) -> Candidate {
        Candidate {
            id,
            at: String::new(),
            size: 0,
        }
    }

    pub fn listed(&self) -> Listed {
        Listed {
            id: self.id.clone(),
            size: self.size,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What each cloud API does its own way.
pub(super) trait CloudApi: Send {
    /// The protocol name for summaries.
    const PROTOCOL: &'static str;
    /// The folder or label quarantined messages go to.
    const QUARANTINE: &'static str;

    fn cloud(&self) -> &CloudMailbox;

    /// The messages of INCOMING_FOLDER not yet finished, oldest first, at most MAX_MESSAGES.
    fn list_new(&mut self) -> Result<Vec<Listed>>;

    /// Requests message `id`'s MIME, the reply at most `limit` bytes.
    fn download(&self, id: &str, limit: u64) -> std::result::Result<Response, ApiError>;

    /// The MIME bytes of a [`CloudApi::download`] reply.
    fn decode(&self, resp: Response) -> Result<Vec<u8>>;

    /// Marks message `id` as read.
    fn mark_seen(&self, id: &str) -> std::result::Result<(), ApiError>;

    /// Deletes message `id` (recoverably, where the API allows).
    fn delete(&self, id: &str) -> std::result::Result<(), ApiError>;

    /// Moves messages out of INCOMING_FOLDER into `folder` (created when missing), recording
    /// them as `what`.
    fn move_to(&mut self, ids: &[String], folder: &str, what: &str) -> Result<()>;

    /// The number of messages in INCOMING_FOLDER.
    fn folder_count(&mut self) -> Result<usize>;
}

impl<T: CloudApi> Mailbox for T {
    fn protocol(&self) -> &'static str {
        T::PROTOCOL
    }

    fn list(&mut self) -> Result<Vec<Listed>> {
        let listed = self.list_new()?;
        let sizes = listed.iter().map(|l| (l.id.clone(), l.size)).collect();
        *self.cloud().listed_sizes.borrow_mut() = sizes;
        Ok(listed)
    }

    /// One request per message over a kept-alive connection. A message gone since the listing
    /// (404) or larger than MAX_MESSAGE_BYTES allows is left out (never handed on whole).
    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()> {
        // The MIME may be larger than the stored size (base64 attachments), and an API may
        // wrap it in base64url and JSON (4/3 more).
        let limit = self.cloud().max_bytes.saturating_mul(3) / 2 + 1024 * 1024;
        let sizes = self.cloud().listed_sizes.borrow();
        super::fetch_one_by_one(ids, sink, &mut Vec::new(), |id| {
            // A large message waits for the run's gate (by its listed size: the reply is read
            // by the HTTP client).
            let size = sizes.get(id).copied().unwrap_or(0);
            super::gate::admit(usize::try_from(size).unwrap_or(usize::MAX));
            match self.download(id, limit) {
                Ok(resp) => self.decode(resp).map(Download::Got),
                Err(e) if e.status() == Some(404) => Ok(Download::Gone),
                Err(ApiError::Http(e)) if e.kind == HttpErrorKind::TooLarge => Ok(Download::Gone),
                Err(e) => Err(self.cloud().fail(e)),
            }
        })
    }

    fn mark_processed(&mut self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match self.cloud().action.clone() {
            ProcessedAction::Seen => self
                .cloud()
                .for_each_message(ids, "processed", &|id| self.mark_seen(id)),
            ProcessedAction::Delete => self
                .cloud()
                .for_each_message(ids, "processed", &|id| self.delete(id)),
            ProcessedAction::Move(folder) => self.move_to(ids, &folder, "processed"),
        }
    }

    /// Records the messages as finished without touching them in the mailbox.
    fn mark_skipped(&mut self, ids: &[String]) -> Result<()> {
        for id in ids {
            self.cloud().record(id, "skipped")?;
        }
        Ok(())
    }

    fn quarantine(&mut self, ids: &[String]) -> Result<bool> {
        if !ids.is_empty() {
            self.move_to(ids, T::QUARANTINE, "quarantined")?;
        }
        Ok(true)
    }

    fn count(&mut self) -> Result<usize> {
        self.folder_count()
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
