//! GMAIL mailbox: the Gmail API.
//!
//! - `list`: the first run of a label is a full listing: `GET .../profile` for the mailbox's
//!   current `historyId` FIRST (so nothing that arrives during the listing is missed), then
//!   `GET /gmail/v1/users/{user}/messages?labelIds=<label>` (500 per page, following
//!   `nextPageToken`), read and unread alike. INCOMING_FOLDER is a label: `INBOX` (or another
//!   system label id) or a user label by name. The historyId is kept in the state store with
//!   the messages found and not yet finished (`cloud::ListMark`, namespace
//!   [`mark_namespace`], one per label). Every later run asks only `GET .../history?startHistoryId=<saved>` with
//!   `labelId=<label>` and `historyTypes` `messageAdded` and `labelAdded` (a message labelled
//!   into the folder later is new to it too), following `nextPageToken`, and keeps the
//!   `historyId` of its first page; it costs one request for what changed, whatever the label
//!   holds. A `404` (the historyId is too old) costs one full listing again, never lost or
//!   doubled mail. Messages this account has finished are excluded by their Gmail id,
//!   recorded in the state store ([`done_namespace`]) when they are marked. The list carries
//!   no size, so each candidate (at most `MAX_MESSAGES`) gets one `format=minimal` request for
//!   its `sizeEstimate`, `internalDate` and `labelIds` (one no longer labelled, or gone, is
//!   dropped); they are returned oldest first.
//! - `fetch_each`: `GET .../messages/{id}?format=raw`, the base64url MIME decoded. A message
//!   gone meanwhile (404) is left out.
//! - Marking, per message: `seen` → `modify` removing `UNREAD`; `move:<label>` → `modify`
//!   adding the label (created when missing) and removing the folder's label; `delete` →
//!   `trash` (recoverable for 30 days). Quarantine labels `PCR-Failed` and removes the folder's
//!   label.
//! - A service account reads `users/{IMPERSONATE}`.

use std::collections::{HashMap, HashSet};

use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::Deserialize;

use super::cloud::{Candidate, CloudApi, CloudMailbox, ListMark};
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
/// The history kinds that bring a message into a label.
const HISTORY_TYPES: [&str; 2] = ["messageAdded", "labelAdded"];
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

/// The state store namespace of the history marks of `account`'s labels.
pub fn mark_namespace(account: &str) -> String {
    format!("gmail-history:{account}")
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
    #[serde(rename = "labelIds", default)]
    label_ids: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Profile {
    #[serde(rename = "historyId", default)]
    history_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct HistoryPage {
    #[serde(default)]
    history: Vec<HistoryRecord>,
    #[serde(rename = "nextPageToken", default)]
    next: Option<String>,
    #[serde(rename = "historyId", default)]
    history_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct HistoryRecord {
    #[serde(rename = "messagesAdded", default)]
    messages_added: Vec<HistoryMessage>,
    #[serde(rename = "labelsAdded", default)]
    labels_added: Vec<HistoryMessage>,
}

#[derive(Deserialize)]
struct HistoryMessage {
    message: HistoryMessageRef,
    /// `labelsAdded`: the labels this change added.
    #[serde(rename = "labelIds", default)]
    label_ids: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct HistoryMessageRef {
    #[serde(default)]
    id: String,
    #[serde(rename = "labelIds", default)]
    label_ids: Option<Vec<String>>,
}

/// A history id as Gmail sends it (a decimal string; a number accepted).
fn history_id(value: Option<serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
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
        let cloud = CloudMailbox::open(
            account,
            env,
            state,
            MailboxType::Gmail,
            done_namespace,
            mark_namespace,
        )?;
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

    /// Every message of `label` not finished, oldest first, and the mailbox's historyId from
    /// before the listing.
    fn full_listing(&self, label: &str) -> Result<ListMark> {
        let profile: Profile = self.get_json(&self.user_url("/profile"))?;
        let history = history_id(profile.history_id)
            .ok_or_else(|| self.cloud.error("the profile has no historyId".to_string()))?;
        let mut ids: Vec<String> = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params = vec![("labelIds", label), ("maxResults", PAGE_SIZE)];
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
        // The API lists newest first.
        ids.reverse();
        let mut seen = HashSet::new();
        ids.retain(|id| seen.insert(id.clone()));
        Ok(ListMark {
            cursor: history,
            pending: ids.into_iter().map(Candidate::new).collect(),
        })
    }

    /// Adds to `mark` the messages brought into `label` since its historyId, which becomes
    /// the mailbox's historyId of the first page. False (and `mark` unchanged) on a 404 (the
    /// historyId is too old or invalid) or when the history runs past MAX_PAGES pages: the
    /// caller then lists the label in full.
    fn history_since(&self, label: &str, mark: &mut ListMark) -> Result<bool> {
        let mut known: HashSet<String> = mark.pending.iter().map(|c| c.id.clone()).collect();
        let mut found = Vec::new();
        let mut latest: Option<String> = None;
        let mut token: Option<String> = None;
        let mut complete = false;
        for _ in 0..MAX_PAGES {
            let mut params = vec![
                ("startHistoryId", mark.cursor.as_str()),
                ("labelId", label),
                ("maxResults", PAGE_SIZE),
            ];
            for kind in HISTORY_TYPES {
                params.push(("historyTypes", kind));
            }
            if let Some(t) = &token {
                params.push(("pageToken", t));
            }
            let url = format!("{}?{}", self.user_url("/history"), query(&params));
            let page: HistoryPage = match self.cloud.api.send(Request::new(Method::Get, &url)) {
                Ok(resp) => resp
                    .json()
                    .map_err(|e| self.cloud.fail(ApiError::Http(e)))?,
                Err(e) if e.status() == Some(404) => return Ok(false),
                Err(e) => return Err(self.cloud.fail(e)),
            };
            if latest.is_none() {
                latest = history_id(page.history_id);
            }
            for record in page.history {
                let added = record.messages_added.into_iter().filter(|m| {
                    m.message
                        .label_ids
                        .as_ref()
                        .is_none_or(|l| l.iter().any(|x| x == label))
                });
                let labelled = record.labels_added.into_iter().filter(|m| {
                    m.label_ids
                        .as_ref()
                        .is_some_and(|l| l.iter().any(|x| x == label))
                });
                for m in added.chain(labelled) {
                    let id = m.message.id;
                    if id.is_empty() || known.contains(&id) || self.cloud.is_done(&id)? {
                        continue;
                    }
                    known.insert(id.clone());
                    found.push(Candidate::new(id));
                }
            }
            match page.next.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => {
                    complete = true;
                    break;
                }
            }
        }
        if !complete {
            // More history than the pages allowed: saving the newest historyId would skip the
            // pages not read, so this run lists the label in full instead.
            return Ok(false);
        }
        let latest = latest.ok_or_else(|| {
            self.cloud
                .error("the history reply has no historyId".to_string())
        })?;
        mark.pending.extend(found);
        mark.cursor = latest;
        Ok(true)
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
        let key = self.cloud.mark_key(&self.user, &label);
        let mut mark = match self.cloud.load_mark(&key)? {
            Some(mut mark) => {
                self.cloud.drop_done(&mut mark)?;
                if self.history_since(&label, &mut mark)? {
                    mark
                } else {
                    // 404: the historyId is too old; the full listing finds every candidate.
                    self.full_listing(&label)?
                }
            }
            None => self.full_listing(&label)?,
        };
        // Sizes and dates of the first MAX_MESSAGES candidates (an oversized one known from an
        // earlier run is listed again without a request, and does not count).
        let mut listed: Vec<(i64, Listed)> = Vec::new();
        let mut wanted = 0;
        let mut kept = Vec::with_capacity(mark.pending.len());
        for mut c in std::mem::take(&mut mark.pending) {
            if c.size > self.cloud.max_bytes {
                listed.push((c.at.parse().unwrap_or(0), c.listed()));
                kept.push(c);
                continue;
            }
            if wanted >= self.cloud.max_messages {
                kept.push(c);
                continue;
            }
            let url = format!("{}?format=minimal", self.message_url(&c.id, ""));
            let meta = match self.cloud.api.send(Request::new(Method::Get, &url)) {
                Ok(resp) => resp
                    .json::<Minimal>()
                    .map_err(|e| self.cloud.fail(ApiError::Http(e)))?,
                // Gone: no longer a candidate.
                Err(e) if e.status() == Some(404) => continue,
                Err(e) => return Err(self.cloud.fail(e)),
            };
            if meta
                .label_ids
                .as_ref()
                .is_some_and(|labels| !labels.contains(&label))
            {
                // Taken out of the folder before we read it.
                continue;
            }
            c.size = meta.size.unwrap_or(0);
            if let Some(date) = meta.internal_date {
                c.at = date.trim().to_string();
            }
            if c.size <= self.cloud.max_bytes {
                wanted += 1;
            }
            listed.push((c.at.parse().unwrap_or(0), c.listed()));
            kept.push(c);
        }
        mark.pending = kept;
        self.cloud.save_mark(&key, &mark)?;
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
