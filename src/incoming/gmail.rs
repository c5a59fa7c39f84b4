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

use super::cloud::{CloudApi, CloudMailbox};
use super::Listed;
use crate::config::{Account, MailboxType};
use crate::error::Result;
use crate::http::{percent_encode, query, Body, HttpClient, Method, Request, Response};
use crate::oauth::{ApiError, OAuthEnv};
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
    cloud: CloudMailbox,
    user: String,
    /// Label name (lower case) → label id.
    labels: HashMap<String, String>,
}

impl std::fmt::Debug for GmailMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.cloud.debug("GmailMailbox", f)
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
        let cloud = CloudMailbox::open(account, env, state, MailboxType::Gmail, done_namespace)?;
        Ok(GmailMailbox {
            user: user_path(&cloud.api),
            cloud,
            labels: HashMap::new(),
        })
    }

    /// The same mailbox with another HTTP client (e.g. another retry policy).
    pub fn with_http(mut self, http: HttpClient) -> GmailMailbox {
        self.cloud = self.cloud.with_http(http);
        self
    }

    fn user_url(&self, path: &str) -> String {
        self.cloud
            .api
            .url(&format!("/gmail/v1/users/{}{path}", self.user))
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T> {
        self.cloud.json(Request::new(Method::Get, url))
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
        self.cloud.create(
            Request::new(Method::Post, &url).with_body(Body::Json(&body)),
            |l: Label| l.id,
            || self.find_label(name),
        )
    }

    fn folder_label(&mut self) -> Result<String> {
        let folder = self.cloud.folder.clone();
        self.label_id(&folder, false)?.ok_or_else(|| {
            self.cloud.error(format!(
                "the label `{folder}` (INCOMING_FOLDER) does not exist in the mailbox"
            ))
        })
    }

    fn message_url(&self, id: &str, suffix: &str) -> String {
        self.user_url(&format!("/messages/{}{suffix}", percent_encode(id)))
    }

    /// A POST on message `id` (`suffix` after its URL), with a JSON `body` if any.
    fn post(
        &self,
        id: &str,
        suffix: &str,
        body: Option<&serde_json::Value>,
    ) -> std::result::Result<(), ApiError> {
        self.cloud
            .request(Method::Post, &self.message_url(id, suffix), &[], body)
    }
}

impl CloudApi for GmailMailbox {
    const PROTOCOL: &'static str = "GMAIL";
    const QUARANTINE: &'static str = QUARANTINE_LABEL;

    fn cloud(&self) -> &CloudMailbox {
        &self.cloud
    }

    fn list_new(&mut self) -> Result<Vec<Listed>> {
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
                if !m.id.is_empty() && !self.cloud.is_done(&m.id)? {
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
        ids.truncate(self.cloud.max_messages);
        let mut listed: Vec<(i64, Listed)> = Vec::with_capacity(ids.len());
        for id in ids {
            let url = format!("{}?format=minimal", self.message_url(&id, ""));
            let meta = match self.cloud.api.send(Request::new(Method::Get, &url)) {
                Ok(resp) => resp
                    .json::<Minimal>()
                    .map_err(|e| self.cloud.fail(ApiError::Http(e)))?,
                Err(e) if e.status() == Some(404) => continue,
                Err(e) => return Err(self.cloud.fail(e)),
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

    fn download(&self, id: &str, limit: u64) -> std::result::Result<Response, ApiError> {
        let url = format!("{}?format=raw", self.message_url(id, ""));
        self.cloud
            .api
            .send(Request::new(Method::Get, &url).with_max_body(limit))
    }

    fn decode(&self, resp: Response) -> Result<Vec<u8>> {
        let body: Raw = resp
            .json()
            .map_err(|e| self.cloud.fail(ApiError::Http(e)))?;
        B64URL.decode(body.raw.trim()).map_err(|_| {
            self.cloud.error(format!(
                "{}: the message's `raw` field is not base64url",
                resp.endpoint
            ))
        })
    }

    fn mark_seen(&self, id: &str) -> std::result::Result<(), ApiError> {
        let body = serde_json::json!({ "addLabelIds": [], "removeLabelIds": ["UNREAD"] });
        self.post(id, "/modify", Some(&body))
    }

    fn delete(&self, id: &str) -> std::result::Result<(), ApiError> {
        self.post(id, "/trash", None)
    }

    /// Labels the messages `target` and removes the folder's label.
    fn move_to(&mut self, ids: &[String], target: &str, what: &str) -> Result<()> {
        let folder = self.folder_label()?;
        let target = self.label_id(target, true)?.expect("created when missing");
        let remove = if target == folder {
            vec![]
        } else {
            vec![folder]
        };
        let body = serde_json::json!({ "addLabelIds": [target], "removeLabelIds": remove });
        self.cloud
            .for_each_message(ids, what, &|id| self.post(id, "/modify", Some(&body)))
    }

    fn folder_count(&mut self) -> Result<usize> {
        let label = self.folder_label()?;
        let url = self.user_url(&format!("/labels/{}", percent_encode(&label)));
        self.cloud.count(&url, &[], "messagesTotal")
    }
}
