//! OFFICE365 mailbox: Microsoft Graph.
//!
//! Every path below starts with the account's mailbox: `/me` when a person signed in,
//! `/users/{EMAIL}` with app-only access (client credentials; a shared mailbox works), see
//! [`crate::oauth::ApiClient::graph_user`].
//!
//! - `list`: a delta query on the folder, `GET /me/mailFolders/{folder}/messages/delta`
//!   (`Prefer: odata.maxpagesize=100`), following `@odata.nextLink` (only on the API's own
//!   origin) until the round ends with an `@odata.deltaLink`, which is kept in the state store
//!   with the messages found and not yet finished (`cloud::ListMark`, namespace
//!   [`mark_namespace`], one per folder of the mailbox). The first run of a folder is the
//!   delta's initial round: every message in it, read or unread (a message someone read in
//!   Outlook is still new to us). Every later run asks only the saved deltaLink, and so costs
//!   one request for what changed, whatever the folder holds. Messages this account has
//!   finished (recorded by their Graph id in [`done_namespace`] when they are marked) are
//!   passed over without a download, among them those the delta reports again because we
//!   marked them read; `@removed` entries list nothing (they only drop a waiting candidate
//!   that left the folder). A round is left unfinished once `MAX_MESSAGES` candidates (of an
//!   acceptable size) wait: its nextLink is kept instead, and the next run goes on from there.
//!   A saved link the service refuses (`410 Gone`, or the error codes `syncStateNotFound`,
//!   `syncStateInvalid`, `resyncRequired`) costs one initial round again, never lost or
//!   doubled mail: the ledger and the finished ids pass over what was done.
//!   Candidates are returned oldest first by `receivedDateTime`.
//! - Sizes: the Graph `message` resource has no size property, so the listing asks for the
//!   MAPI property `PR_MESSAGE_SIZE` (`Integer 0x0E08`) as a single-value extended property;
//!   when a server omits it the size is reported as 0 and the download itself is capped.
//! - `fetch_each`: `GET /me/messages/{id}/$value`, the MIME as stored, one request per message
//!   over a kept-alive connection. A message gone meanwhile (404) is left out.
//! - Marking: `seen` → `PATCH {"isRead": true}`; `move:<folder>` → `POST .../move` to the folder
//!   found (or created) by display name, `/` separating levels, `INBOX` and the other
//!   well-known names accepted; `delete` → `DELETE` (Exchange keeps it in Deleted Items).
//!   Quarantine moves to `PCR-Failed`.
//! - Every request asks for immutable ids (`Prefer: IdType="ImmutableId"`), so an id stays
//!   valid when a message moves between folders.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use super::cloud::{Candidate, CloudApi, CloudMailbox, ListMark};
use super::Listed;
use crate::config::{Account, MailboxType};
use crate::error::Result;
use crate::http::{percent_encode, query, Body, HttpClient, HttpError, Method, Request, Response};
use crate::oauth::{ApiError, OAuthEnv};
use crate::state::StateStore;

/// The folder quarantined messages are moved to.
pub const QUARANTINE_FOLDER: &str = "PCR-Failed";
const PREFER: [(&str, &str); 1] = [("Prefer", "IdType=\"ImmutableId\"")];
const MIME_HEADERS: [(&str, &str); 2] = [("Prefer", "IdType=\"ImmutableId\""), ("Accept", "*/*")];
/// A delta page: immutable ids, at most 100 messages (`$top` is not how delta pages).
const DELTA_HEADERS: [(&str, &str); 1] =
    [("Prefer", "IdType=\"ImmutableId\", odata.maxpagesize=100")];
/// The error codes Graph gives a delta link it can no longer continue (besides `410 Gone`).
const SYNC_STATE_LOST: &[&str] = &["syncstatenotfound", "syncstateinvalid", "resyncrequired"];
const PAGE_SIZE: &str = "100";
const MAX_PAGES: usize = 10_000;
/// `PR_MESSAGE_SIZE` as Graph names it in `singleValueExtendedProperties`.
const SIZE_PROPERTY: &str = "Integer 0x0E08";
/// Graph's well-known folder names (lower case), usable in place of a folder id.
const WELL_KNOWN: &[&str] = &[
    "inbox",
    "archive",
    "deleteditems",
    "drafts",
    "junkemail",
    "sentitems",
    "outbox",
    "clutter",
    "conversationhistory",
    "scheduled",
    "searchfolders",
];

/// The state store namespace of the Graph ids `account` has finished.
pub fn done_namespace(account: &str) -> String {
    format!("graph-done:{account}")
}

/// The state store namespace of the delta marks of `account`'s folders.
pub fn mark_namespace(account: &str) -> String {
    format!("graph-delta:{account}")
}

/// An OFFICE365 mailbox folder read through Microsoft Graph.
pub struct GraphMailbox {
    cloud: CloudMailbox,
    /// Folder path (lower case) → Graph folder id.
    folders: HashMap<String, String>,
}

impl std::fmt::Debug for GraphMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.cloud.debug("GraphMailbox", f)
    }
}

#[derive(Deserialize)]
struct Page<T> {
    #[serde(default = "Vec::new")]
    value: Vec<T>,
    #[serde(rename = "@odata.nextLink", default)]
    next: Option<String>,
}

#[derive(Deserialize)]
struct DeltaPage {
    #[serde(default = "Vec::new")]
    value: Vec<MessageItem>,
    #[serde(rename = "@odata.nextLink", default)]
    next: Option<String>,
    #[serde(rename = "@odata.deltaLink", default)]
    delta: Option<String>,
}

#[derive(Deserialize)]
struct MessageItem {
    #[serde(default)]
    id: String,
    #[serde(rename = "receivedDateTime", default)]
    received: Option<String>,
    #[serde(rename = "singleValueExtendedProperties", default)]
    properties: Vec<ExtendedProperty>,
    /// Present on a message deleted or moved out of the folder.
    #[serde(rename = "@removed", default)]
    removed: Option<serde_json::Value>,
}

impl MessageItem {
    /// `PR_MESSAGE_SIZE` when the server sent it, else 0.
    fn size(&self) -> u64 {
        self.properties
            .iter()
            .find(|p| {
                let id = p.id.to_ascii_lowercase();
                id.contains("0x0e08") || id.contains("0xe08")
            })
            .and_then(|p| p.value.as_deref())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    }
}

/// True when Graph refuses a delta or paging link for good: the round must start again.
fn sync_state_lost(e: &HttpError) -> bool {
    e.is_status(410)
        || (matches!(e.status, Some(400..=499))
            && e.code
                .as_deref()
                .is_some_and(|c| SYNC_STATE_LOST.contains(&c.to_ascii_lowercase().as_str())))
}

#[derive(Deserialize)]
struct ExtendedProperty {
    #[serde(default)]
    id: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
struct FolderItem {
    id: String,
    #[serde(rename = "displayName", default)]
    display_name: String,
}

impl GraphMailbox {
    /// The account's Graph mailbox (INCOMING_FOLDER, PROCESSED_ACTION, MAX_MESSAGES and
    /// MAX_MESSAGE_BYTES from its incoming settings); `state` keeps what was finished. No
    /// request is made until the first call.
    pub fn open(account: &Account, env: &OAuthEnv, state: StateStore) -> Result<GraphMailbox> {
        Ok(GraphMailbox {
            cloud: CloudMailbox::open(
                account,
                env,
                state,
                MailboxType::Office365,
                done_namespace,
                mark_namespace,
            )?,
            folders: HashMap::new(),
        })
    }

    /// The same mailbox with another HTTP client (e.g. another retry policy).
    pub fn with_http(mut self, http: HttpClient) -> GraphMailbox {
        self.cloud = self.cloud.with_http(http);
        self
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T> {
        self.cloud
            .json(Request::new(Method::Get, url).with_headers(&PREFER))
    }

    /// The Graph id (or well-known name) of a folder path such as `INBOX`, `Done` or
    /// `Inbox/PCR/Done`; created level by level when `create` and missing.
    fn folder_id(&mut self, path: &str, create: bool) -> Result<Option<String>> {
        let key = path.trim().to_lowercase();
        if let Some(id) = self.folders.get(&key) {
            return Ok(Some(id.clone()));
        }
        let segments: Vec<&str> = path
            .split('/')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if segments.is_empty() {
            return Err(self.cloud.error(format!("`{path}` is not a folder name")));
        }
        let mut parent: Option<String> = None;
        for (depth, segment) in segments.iter().enumerate() {
            let lower = segment.to_lowercase();
            if depth == 0 && WELL_KNOWN.contains(&lower.as_str()) {
                parent = Some(lower);
                continue;
            }
            let collection = match &parent {
                None => self.cloud.api.graph_url("/mailFolders"),
                Some(id) => self
                    .cloud
                    .api
                    .graph_url(&format!("/mailFolders/{}/childFolders", percent_encode(id))),
            };
            let found = self.find_child(&collection, segment)?;
            let id = match found {
                Some(id) => id,
                None if create => self.create_child(&collection, segment)?,
                None => return Ok(None),
            };
            parent = Some(id);
        }
        let id = parent.expect("at least one segment");
        self.folders.insert(key, id.clone());
        Ok(Some(id))
    }

    fn find_child(&self, collection: &str, name: &str) -> Result<Option<String>> {
        let mut url = format!(
            "{collection}?{}",
            query(&[("$select", "id,displayName"), ("$top", PAGE_SIZE)])
        );
        for _ in 0..MAX_PAGES {
            let page: Page<FolderItem> = self.get_json(&url)?;
            if let Some(f) = page
                .value
                .iter()
                .find(|f| f.display_name.trim().eq_ignore_ascii_case(name))
            {
                return Ok(Some(f.id.clone()));
            }
            match page.next {
                Some(next) => url = self.checked_next(next)?,
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    fn create_child(&self, collection: &str, name: &str) -> Result<String> {
        let body = serde_json::json!({ "displayName": name });
        self.cloud.create(
            Request::new(Method::Post, collection)
                .with_headers(&PREFER)
                .with_body(Body::Json(&body)),
            |f: FolderItem| f.id,
            || self.find_child(collection, name),
        )
    }

    /// A paging link, only when it stays on the API's origin (the token goes with it).
    fn checked_next(&self, next: String) -> Result<String> {
        if self.cloud.api.same_origin(&next) {
            Ok(next)
        } else {
            Err(self.cloud.error(
                "the server's paging link (@odata.nextLink) points to another host; refused"
                    .to_string(),
            ))
        }
    }

    fn incoming_folder(&mut self) -> Result<String> {
        let folder = self.cloud.folder.clone();
        self.folder_id(&folder, false)?.ok_or_else(|| {
            self.cloud.error(format!(
                "the folder `{folder}` (INCOMING_FOLDER) does not exist in the mailbox"
            ))
        })
    }

    fn message_url(&self, id: &str, suffix: &str) -> String {
        self.cloud
            .api
            .graph_url(&format!("/messages/{}{suffix}", percent_encode(id)))
    }

    /// The first request of an initial delta round on `folder`: what every page reports
    /// (Graph keeps `$select` and `$expand` in the links it returns).
    fn initial_delta_url(&self, folder: &str) -> String {
        let expand = format!("singleValueExtendedProperties($filter=id eq '{SIZE_PROPERTY}')");
        self.cloud.api.graph_url(&format!(
            "/mailFolders/{}/messages/delta?{}",
            percent_encode(folder),
            query(&[("$select", "receivedDateTime"), ("$expand", &expand)])
        ))
    }

    /// Follows a delta round from `url`, adding to `mark` the messages not finished and
    /// dropping those removed from the folder; `mark.cursor` becomes the round's deltaLink, or
    /// its nextLink when MAX_MESSAGES candidates wait. False (and `mark` unchanged) when the
    /// service refuses the link: the sync state is lost.
    fn delta_round(&self, url: &str, mark: &mut ListMark) -> Result<bool> {
        let mut url = url.to_string();
        let mut known: HashSet<String> = mark.pending.iter().map(|c| c.id.clone()).collect();
        let mut found: Vec<Candidate> = Vec::new();
        let mut removed: HashSet<String> = HashSet::new();
        // Candidates that wait for a download (an oversized one waits for a larger limit).
        let waiting = |found: &[Candidate], removed: &HashSet<String>| {
            mark.pending
                .iter()
                .chain(found)
                .filter(|c| !removed.contains(&c.id) && c.size <= self.cloud.max_bytes)
                .count()
        };
        for _ in 0..MAX_PAGES {
            let req = Request::new(Method::Get, &url).with_headers(&DELTA_HEADERS);
            let page: DeltaPage = match self.cloud.api.send(req) {
                Ok(resp) => resp
                    .json()
                    .map_err(|e| self.cloud.fail(ApiError::Http(e)))?,
                Err(ApiError::Http(e)) if sync_state_lost(&e) => return Ok(false),
                Err(e) => return Err(self.cloud.fail(e)),
            };
            for item in page.value {
                if item.id.is_empty() {
                    continue;
                }
                if item.removed.is_some() {
                    removed.insert(item.id);
                    continue;
                }
                // Back in the folder after a removal in this round.
                removed.remove(&item.id);
                if known.contains(&item.id) || self.cloud.is_done(&item.id)? {
                    continue;
                }
                known.insert(item.id.clone());
                let size = item.size();
                found.push(Candidate {
                    at: item.received.unwrap_or_default(),
                    id: item.id,
                    size,
                });
            }
            match (page.next, page.delta) {
                (Some(next), _) => {
                    url = self.checked_next(next)?;
                    if waiting(&found, &removed) >= self.cloud.max_messages {
                        break;
                    }
                }
                (None, Some(delta)) => {
                    url = self.checked_next(delta)?;
                    break;
                }
                (None, None) => {
                    return Err(self.cloud.error(format!(
                        "{}: the delta reply has neither @odata.nextLink nor @odata.deltaLink",
                        crate::http::endpoint_label(Method::Get, &url)
                    )))
                }
            }
        }
        mark.pending.extend(found);
        mark.pending.retain(|c| !removed.contains(&c.id));
        mark.cursor = url;
        Ok(true)
    }

    /// One request on message `id` (`suffix` after its URL), with a JSON `body` if any.
    fn on_message(
        &self,
        method: Method,
        id: &str,
        suffix: &str,
        body: Option<&serde_json::Value>,
    ) -> std::result::Result<(), ApiError> {
        self.cloud
            .request(method, &self.message_url(id, suffix), &PREFER, body)
    }
}

impl CloudApi for GraphMailbox {
    const PROTOCOL: &'static str = "OFFICE365";
    const QUARANTINE: &'static str = QUARANTINE_FOLDER;

    fn cloud(&self) -> &CloudMailbox {
        &self.cloud
    }

    fn list_new(&mut self) -> Result<Vec<Listed>> {
        let folder = self.incoming_folder()?;
        let key = self.cloud.mark_key(&self.cloud.api.graph_user(), &folder);
        let initial = self.initial_delta_url(&folder);
        // A saved link for another origin (the base URL changed) is not followed.
        let saved = self
            .cloud
            .load_mark(&key)?
            .filter(|m| self.cloud.api.same_origin(&m.cursor));
        let mut mark = match saved {
            Some(mut mark) => {
                self.cloud.drop_done(&mut mark)?;
                let start = mark.cursor.clone();
                if self.delta_round(&start, &mut mark)? {
                    mark
                } else {
                    // Refused: one initial round, which finds every candidate still there.
                    ListMark::default()
                }
            }
            None => ListMark::default(),
        };
        if mark.cursor.is_empty() && !self.delta_round(&initial, &mut mark)? {
            return Err(self.cloud.error(
                "the service refused a new delta query on the folder (its sync state is lost \
                 even for an initial round)"
                    .to_string(),
            ));
        }
        self.cloud.save_mark(&key, &mark)?;
        // Oldest first; the order of the delta otherwise (stable sort).
        let mut pending = mark.pending;
        pending.sort_by(|a, b| a.at.cmp(&b.at));
        Ok(pending
            .into_iter()
            .map(|c| Listed {
                id: c.id,
                size: c.size,
            })
            .collect())
    }

    fn download(&self, id: &str, limit: u64) -> std::result::Result<Response, ApiError> {
        let url = self.message_url(id, "/$value");
        self.cloud.api.send(
            Request::new(Method::Get, &url)
                .with_headers(&MIME_HEADERS)
                .with_max_body(limit),
        )
    }

    /// `$value` is the MIME as stored.
    fn decode(&self, resp: Response) -> Result<Vec<u8>> {
        Ok(resp.body)
    }

    fn mark_seen(&self, id: &str) -> std::result::Result<(), ApiError> {
        let body = serde_json::json!({ "isRead": true });
        self.on_message(Method::Patch, id, "", Some(&body))
    }

    fn delete(&self, id: &str) -> std::result::Result<(), ApiError> {
        self.on_message(Method::Delete, id, "", None)
    }

    fn move_to(&mut self, ids: &[String], folder: &str, what: &str) -> Result<()> {
        let target = self.folder_id(folder, true)?.expect("created when missing");
        let body = serde_json::json!({ "destinationId": target });
        self.cloud.for_each_message(ids, what, &|id| {
            self.on_message(Method::Post, id, "/move", Some(&body))
        })
    }

    fn folder_count(&mut self) -> Result<usize> {
        let folder = self.incoming_folder()?;
        let url = self.cloud.api.graph_url(&format!(
            "/mailFolders/{}?$select=totalItemCount",
            percent_encode(&folder)
        ));
        self.cloud.count(&url, &PREFER, "totalItemCount")
    }
}
