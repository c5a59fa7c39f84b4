//! GMAIL mailbox: the Gmail API.
//!
//! - `list`: `GET /gmail/v1/users/{user}/messages?labelIds=<label>` (500 per page, following
//!   `nextPageToken`), read and unread alike. INCOMING_FOLDER is a label: `INBOX` (or another
//!   system label id) or a user label by name. Messages this account has finished are excluded
//!   by their Gmail id, recorded in the state store ([`done_namespace`]) when they are marked.
//!   The list carries no size, so each NEW message (at most `MAX_MESSAGES`) gets one
//!   `format=minimal` request for its `sizeEstimate` and `internalDate`; they are returned
//!   oldest first.
//! - `fetch_each`: `GET .../messages/{id}?format=raw`, the base64url MIME decoded. A message
//!   gone meanwhile (404) is left out.
//! - Marking, per message: `seen` → `modify` removing `UNREAD`; `move:<label>` → `modify`
//!   adding the label (created when missing) and removing the folder's label; `delete` →
//!   `trash` (recoverable for 30 days). Quarantine labels `PCR-Failed` and removes the folder's
//!   label.
//! - A service account reads `users/{IMPERSONATE}`.

use std::collections::HashMap;

use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::Deserialize;

use super::{Fetched, Flow, Listed, Mailbox};
use crate::config::{Account, ProcessedAction};
use crate::error::{Error, Result};
use crate::http::{percent_encode, query, Body, HttpClient, HttpErrorKind, Method, Request, Role};
use crate::oauth::{ApiClient, ApiError, OAuthEnv};
use crate::outgoing::gmail::user_path;
use crate::state::StateStore;

/// The label quarantined messages get.
pub const QUARANTINE_LABEL: &str = "PCR-Failed";
const PAGE_SIZE: &str = "500";
const MAX_PAGES: usize = 2_000;
/// Gmail's system labels, usable by id.
const SYSTEM_LABELS: &[&str] = &[
    "INBOX",
    "SPAM",
    "TRASH",
    "UNREAD",
    "STARRED",
    "IMPORTANT",
    "SENT",
    "DRAFT",
    "CATEGORY_PERSONAL",
    "CATEGORY_SOCIAL",
    "CATEGORY_PROMOTIONS",
    "CATEGORY_UPDATES",
    "CATEGORY_FORUMS",
];
/// base64url with or without padding (Gmail sends it padded; be lenient).
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The state store namespace of the Gmail ids `account` has finished.
pub fn done_namespace(account: &str) -> String {
    format!("gmail-done:{account}")
}

/// A Gmail label read through the Gmail API.
pub struct GmailMailbox {
    api: ApiClient,
    state: StateStore,
    account: String,
    namespace: String,
    user: String,
    folder: String,
    action: ProcessedAction,
    max_messages: usize,
    max_bytes: u64,
    /// Label name (lower case) → label id.
    labels: HashMap<String, String>,
}

impl std::fmt::Debug for GmailMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmailMailbox")
            .field("account", &self.account)
            .field("folder", &self.folder)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ListPage {
    #[serde(default)]
    messages: Vec<IdOnly>,
    #[serde(rename = "nextPageToken", default)]
    next: Option<String>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

#[derive(Deserialize)]
struct Minimal {
    #[serde(rename = "sizeEstimate", default)]
    size: Option<u64>,
    #[serde(rename = "internalDate", default)]
    internal_date: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    raw: String,
}

#[derive(Deserialize)]
struct Labels {
    #[serde(default)]
    labels: Vec<Label>,
}

#[derive(Deserialize)]
struct Label {
    id: String,
    #[serde(default)]
    name: String,
}

impl GmailMailbox {
    /// The account's Gmail mailbox (INCOMING_FOLDER as a label, PROCESSED_ACTION,
    /// MAX_MESSAGES, MAX_MESSAGE_BYTES); `state` keeps what was finished. No request is made
    /// until the first call.
    pub fn open(account: &Account, env: &OAuthEnv, state: StateStore) -> Result<GmailMailbox> {
        let id = account.id.to_string();
        let incoming = account.incoming.as_ref().ok_or_else(|| {
            Error::account_key(
                &id,
                "INCOMING_MAILBOX_TYPE",
                "the account has no incoming mailbox",
            )
        })?;
        let api = ApiClient::new(account, env, Role::Receive)?;
        Ok(GmailMailbox {
            user: user_path(&api),
            api,
            state,
            namespace: done_namespace(&id),
            account: id,
            folder: incoming.folder.clone(),
            action: incoming.processed_action.clone(),
            max_messages: incoming.max_messages.max(1),
            max_bytes: incoming.max_message_bytes,
            labels: HashMap::new(),
        })
    }

    /// The same mailbox with another HTTP client (e.g. another retry policy).
    pub fn with_http(mut self, http: HttpClient) -> GmailMailbox {
        self.api = self.api.with_http(http);
        self
    }

    fn fail(&self, e: ApiError) -> Error {
        self.api.error(e)
    }

    fn mailbox_error(&self, message: String) -> Error {
        Error::mailbox(&self.account, self.api.base(), message)
    }

    fn user_url(&self, path: &str) -> String {
        self.api
            .url(&format!("/gmail/v1/users/{}{path}", self.user))
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T> {
        self.api
            .send(Request::new(Method::Get, url))
            .and_then(|r| r.json().map_err(ApiError::Http))
            .map_err(|e| self.fail(e))
    }

    /// The id of a label given by system id or by name; created when `create` and missing.
    fn label_id(&mut self, name: &str, create: bool) -> Result<Option<String>> {
        let name = name.trim();
        let upper = name.to_ascii_uppercase();
        if SYSTEM_LABELS.contains(&upper.as_str()) {
            return Ok(Some(upper));
        }
        let key = name.to_lowercase();
        if let Some(id) = self.labels.get(&key) {
            return Ok(Some(id.clone()));
        }
        let found = self.find_label(name)?;
        let id = match found {
            Some(id) => id,
            None if create => self.create_label(name)?,
            None => return Ok(None),
        };
        self.labels.insert(key, id.clone());
        Ok(Some(id))
    }

    fn find_label(&self, name: &str) -> Result<Option<String>> {
        let labels: Labels = self.get_json(&self.user_url("/labels"))?;
        Ok(labels
            .labels
            .into_iter()
            .find(|l| l.name.trim().eq_ignore_ascii_case(name) || l.id == name)
            .map(|l| l.id))
    }

    fn create_label(&self, name: &str) -> Result<String> {
        let body = serde_json::json!({
            "name": name,
            "labelListVisibility": "labelShow",
            "messageListVisibility": "show",
        });
        let url = self.user_url("/labels");
        match self
            .api
            .send(Request::new(Method::Post, &url).with_body(Body::Json(&body)))
        {
            Ok(resp) => resp
                .json::<Label>()
                .map(|l| l.id)
                .map_err(|e| self.fail(ApiError::Http(e))),
            // Created meanwhile by someone else.
            Err(ApiError::Http(e)) if e.is_status(409) => self
                .find_label(name)?
                .ok_or_else(|| self.fail(ApiError::Http(e))),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn folder_label(&mut self) -> Result<String> {
        let folder = self.folder.clone();
        self.label_id(&folder, false)?.ok_or_else(|| {
            self.mailbox_error(format!(
                "the label `{folder}` (INCOMING_FOLDER) does not exist in the mailbox"
            ))
        })
    }

    fn is_done(&self, id: &str) -> Result<bool> {
        Ok(self.state.get_kv(&self.namespace, id)?.is_some())
    }

    fn record(&self, id: &str, what: &str) -> Result<()> {
        self.state.set_kv(&self.namespace, id, what)
    }

    fn message_url(&self, id: &str, suffix: &str) -> String {
        self.user_url(&format!("/messages/{}{suffix}", percent_encode(id)))
    }

    /// Applies one request per message; a message already gone (404) counts as done. Each
    /// success is recorded at once; the first failure is reported after all were tried.
    fn for_each_message(
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

    fn modify(&self, ids: &[String], add: &[String], remove: &[String], what: &str) -> Result<()> {
        let body = serde_json::json!({ "addLabelIds": add, "removeLabelIds": remove });
        self.for_each_message(ids, what, &|id| {
            let url = self.message_url(id, "/modify");
            self.api
                .send(Request::new(Method::Post, &url).with_body(Body::Json(&body)))
                .map(|_| ())
        })
    }

    fn relabel(&mut self, ids: &[String], target: &str, what: &str) -> Result<()> {
        let folder = self.folder_label()?;
        let target = self.label_id(target, true)?.expect("created when missing");
        let remove = if target == folder {
            vec![]
        } else {
            vec![folder]
        };
        self.modify(ids, &[target], &remove, what)
    }
}

impl Mailbox for GmailMailbox {
    fn protocol(&self) -> &'static str {
        "GMAIL"
    }

    fn list(&mut self) -> Result<Vec<Listed>> {
        let label = self.folder_label()?;
        let mut ids: Vec<String> = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params = vec![("labelIds", label.as_str()), ("maxResults", PAGE_SIZE)];
            if let Some(t) = &token {
                params.push(("pageToken", t));
            }
            let url = format!("{}?{}", self.user_url("/messages"), query(&params));
            let page: ListPage = self.get_json(&url)?;
            for m in page.messages {
                if !m.id.is_empty() && !self.is_done(&m.id)? {
                    ids.push(m.id);
                }
            }
            match page.next.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        // The API lists newest first; the oldest new messages go first.
        ids.reverse();
        ids.truncate(self.max_messages);
        let mut listed: Vec<(i64, Listed)> = Vec::with_capacity(ids.len());
        for id in ids {
            let url = format!("{}?format=minimal", self.message_url(&id, ""));
            let meta = match self.api.send(Request::new(Method::Get, &url)) {
                Ok(resp) => resp
                    .json::<Minimal>()
                    .map_err(|e| self.fail(ApiError::Http(e)))?,
                Err(e) if e.status() == Some(404) => continue,
                Err(e) => return Err(self.fail(e)),
            };
            let date = meta
                .internal_date
                .and_then(|d| d.trim().parse::<i64>().ok())
                .unwrap_or(0);
            listed.push((
                date,
                Listed {
                    id,
                    size: meta.size.unwrap_or(0),
                },
            ));
        }
        listed.sort_by_key(|(date, _)| *date);
        Ok(listed.into_iter().map(|(_, l)| l).collect())
    }

    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()> {
        // base64url inflates by 4/3, plus the JSON around it.
        let limit = self.max_bytes.saturating_mul(3) / 2 + 1024 * 1024;
        for id in ids {
            let url = format!("{}?format=raw", self.message_url(id, ""));
            let reply = self
                .api
                .send(Request::new(Method::Get, &url).with_max_body(limit));
            let resp = match reply {
                Ok(resp) => resp,
                Err(e) if e.status() == Some(404) => continue,
                Err(ApiError::Http(e)) if e.kind == HttpErrorKind::TooLarge => continue,
                Err(e) => return Err(self.fail(e)),
            };
            let body: Raw = resp.json().map_err(|e| self.fail(ApiError::Http(e)))?;
            let raw = B64URL.decode(body.raw.trim()).map_err(|_| {
                self.mailbox_error(format!(
                    "{}: the message's `raw` field is not base64url",
                    resp.endpoint
                ))
            })?;
            if sink(Fetched {
                id: id.clone(),
                raw,
            }) == Flow::Stop
            {
                break;
            }
        }
        Ok(())
    }

    fn mark_processed(&mut self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        match self.action.clone() {
            ProcessedAction::Seen => self.modify(ids, &[], &["UNREAD".to_string()], "processed"),
            ProcessedAction::Delete => self.for_each_message(ids, "processed", &|id| {
                let url = self.message_url(id, "/trash");
                self.api.send(Request::new(Method::Post, &url)).map(|_| ())
            }),
            ProcessedAction::Move(label) => self.relabel(ids, &label, "processed"),
        }
    }

    fn mark_skipped(&mut self, ids: &[String]) -> Result<()> {
        for id in ids {
            self.record(id, "skipped")?;
        }
        Ok(())
    }

    fn quarantine(&mut self, ids: &[String]) -> Result<bool> {
        if !ids.is_empty() {
            self.relabel(ids, QUARANTINE_LABEL, "quarantined")?;
        }
        Ok(true)
    }

    fn count(&mut self) -> Result<usize> {
        let label = self.folder_label()?;
        let url = self.user_url(&format!("/labels/{}", percent_encode(&label)));
        let value: serde_json::Value = self.get_json(&url)?;
        value
            .get("messagesTotal")
            .and_then(|v| v.as_u64())
            .map(|n| n as usize)
            .ok_or_else(|| {
                self.mailbox_error(format!(
                    "{}: the reply has no messagesTotal",
                    crate::http::endpoint_label(Method::Get, &url)
                ))
            })
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
