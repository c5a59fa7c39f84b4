//! OFFICE365 mailbox: Microsoft Graph.
//!
//! - `list`: `GET /me/mailFolders/{folder}/messages` oldest first (`$orderby=receivedDateTime`),
//!   100 per page, following `@odata.nextLink` (only on the API's own origin). Read and unread
//!   messages alike: a message someone read in Outlook is still new to us. Messages this
//!   account has finished are excluded by their Graph id, recorded in the state store
//!   ([`done_namespace`]) when they are marked; the listing stops once `MAX_MESSAGES` new ones
//!   are found (the rest come next run).
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

use std::collections::HashMap;

use serde::Deserialize;

use super::{Fetched, Flow, Listed, Mailbox};
use crate::config::{Account, ProcessedAction};
use crate::error::{Error, Result};
use crate::http::{percent_encode, query, Body, HttpClient, HttpErrorKind, Method, Request, Role};
use crate::oauth::{ApiClient, ApiError, OAuthEnv};
use crate::state::StateStore;

/// The folder quarantined messages are moved to.
pub const QUARANTINE_FOLDER: &str = "PCR-Failed";
const PREFER: [(&str, &str); 1] = [("Prefer", "IdType=\"ImmutableId\"")];
const MIME_HEADERS: [(&str, &str); 2] = [("Prefer", "IdType=\"ImmutableId\""), ("Accept", "*/*")];
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

/// An OFFICE365 mailbox folder read through Microsoft Graph.
pub struct GraphMailbox {
    api: ApiClient,
    state: StateStore,
    account: String,
    namespace: String,
    folder: String,
    action: ProcessedAction,
    max_messages: usize,
    max_bytes: u64,
    /// Folder path (lower case) → Graph folder id.
    folders: HashMap<String, String>,
}

impl std::fmt::Debug for GraphMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphMailbox")
            .field("account", &self.account)
            .field("folder", &self.folder)
            .finish_non_exhaustive()
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
struct MessageItem {
    id: String,
    #[serde(rename = "singleValueExtendedProperties", default)]
    properties: Vec<ExtendedProperty>,
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
        let id = account.id.to_string();
        let incoming = account.incoming.as_ref().ok_or_else(|| {
            Error::account_key(
                &id,
                "INCOMING_MAILBOX_TYPE",
                "the account has no incoming mailbox",
            )
        })?;
        Ok(GraphMailbox {
            api: ApiClient::new(account, env, Role::Receive)?,
            state,
            namespace: done_namespace(&id),
            account: id,
            folder: incoming.folder.clone(),
            action: incoming.processed_action.clone(),
            max_messages: incoming.max_messages.max(1),
            max_bytes: incoming.max_message_bytes,
            folders: HashMap::new(),
        })
    }

    /// The same mailbox with another HTTP client (e.g. another retry policy).
    pub fn with_http(mut self, http: HttpClient) -> GraphMailbox {
        self.api = self.api.with_http(http);
        self
    }

    fn fail(&self, e: ApiError) -> Error {
        self.api.error(e)
    }

    fn mailbox_error(&self, message: String) -> Error {
        Error::mailbox(&self.account, self.api.base(), message)
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T> {
        self.api
            .send(Request::new(Method::Get, url).with_headers(&PREFER))
            .and_then(|r| r.json().map_err(ApiError::Http))
            .map_err(|e| self.fail(e))
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
            return Err(self.mailbox_error(format!("`{path}` is not a folder name")));
        }
        let mut parent: Option<String> = None;
        for (depth, segment) in segments.iter().enumerate() {
            let lower = segment.to_lowercase();
            if depth == 0 && WELL_KNOWN.contains(&lower.as_str()) {
                parent = Some(lower);
                continue;
            }
            let collection = match &parent {
                None => self.api.url("/me/mailFolders"),
                Some(id) => self.api.url(&format!(
                    "/me/mailFolders/{}/childFolders",
                    percent_encode(id)
                )),
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
        match self.api.send(
            Request::new(Method::Post, collection)
                .with_headers(&PREFER)
                .with_body(Body::Json(&body)),
        ) {
            Ok(resp) => resp
                .json::<FolderItem>()
                .map(|f| f.id)
                .map_err(|e| self.fail(ApiError::Http(e))),
            // Created meanwhile by someone else.
            Err(ApiError::Http(e)) if e.is_status(409) => self
                .find_child(collection, name)?
                .ok_or_else(|| self.fail(ApiError::Http(e))),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// A paging link, only when it stays on the API's origin (the token goes with it).
    fn checked_next(&self, next: String) -> Result<String> {
        if self.api.same_origin(&next) {
            Ok(next)
        } else {
            Err(self.mailbox_error(
                "the server's paging link (@odata.nextLink) points to another host; refused"
                    .to_string(),
            ))
        }
    }

    fn incoming_folder(&mut self) -> Result<String> {
        let folder = self.folder.clone();
        self.folder_id(&folder, false)?.ok_or_else(|| {
            self.mailbox_error(format!(
                "the folder `{folder}` (INCOMING_FOLDER) does not exist in the mailbox"
            ))
        })
    }

    fn is_done(&self, id: &str) -> Result<bool> {
        Ok(self.state.get_kv(&self.namespace, id)?.is_some())
    }

    fn record(&self, id: &str, what: &str) -> Result<()> {
        self.state.set_kv(&self.namespace, id, what)
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

    fn message_url(&self, id: &str, suffix: &str) -> String {
        self.api
            .url(&format!("/me/messages/{}{suffix}", percent_encode(id)))
    }

    fn move_to(&mut self, ids: &[String], folder: &str, what: &str) -> Result<()> {
        let target = self.folder_id(folder, true)?.expect("created when missing");
        let body = serde_json::json!({ "destinationId": target });
        self.for_each_message(ids, what, &|id| {
            let url = self.message_url(id, "/move");
            self.api
                .send(
                    Request::new(Method::Post, &url)
                        .with_headers(&PREFER)
                        .with_body(Body::Json(&body)),
                )
                .map(|_| ())
        })
    }
}

impl Mailbox for GraphMailbox {
    fn protocol(&self) -> &'static str {
        "OFFICE365"
    }

    fn list(&mut self) -> Result<Vec<Listed>> {
        let folder = self.incoming_folder()?;
        let expand = format!("singleValueExtendedProperties($filter=id eq '{SIZE_PROPERTY}')");
        let mut url = self.api.url(&format!(
            "/me/mailFolders/{}/messages?{}",
            percent_encode(&folder),
            query(&[
                ("$select", "id,internetMessageId,isRead,receivedDateTime"),
                ("$top", PAGE_SIZE),
                ("$orderby", "receivedDateTime asc"),
                ("$expand", &expand),
            ])
        ));
        let mut listed = Vec::new();
        for _ in 0..MAX_PAGES {
            let page: Page<MessageItem> = self.get_json(&url)?;
            for item in page.value {
                if item.id.is_empty() || self.is_done(&item.id)? {
                    continue;
                }
                let size = item
                    .properties
                    .iter()
                    .find(|p| {
                        let id = p.id.to_ascii_lowercase();
                        id.contains("0x0e08") || id.contains("0xe08")
                    })
                    .and_then(|p| p.value.as_deref())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                listed.push(Listed { id: item.id, size });
            }
            if listed.len() >= self.max_messages {
                break;
            }
            match page.next {
                Some(next) => url = self.checked_next(next)?,
                None => break,
            }
        }
        Ok(listed)
    }

    fn fetch_each(&mut self, ids: &[String], sink: &mut dyn FnMut(Fetched) -> Flow) -> Result<()> {
        // The MIME may be larger than the stored size (base64 attachments).
        let limit = self.max_bytes.saturating_mul(3) / 2 + 1024 * 1024;
        for id in ids {
            let url = self.message_url(id, "/$value");
            let reply = self.api.send(
                Request::new(Method::Get, &url)
                    .with_headers(&MIME_HEADERS)
                    .with_max_body(limit),
            );
            let raw = match reply {
                Ok(resp) => resp.body,
                // Deleted or moved away since the listing.
                Err(e) if e.status() == Some(404) => continue,
                // Larger than MAX_MESSAGE_BYTES allows: never handed on whole.
                Err(ApiError::Http(e)) if e.kind == HttpErrorKind::TooLarge => continue,
                Err(e) => return Err(self.fail(e)),
            };
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
            ProcessedAction::Seen => {
                let body = serde_json::json!({ "isRead": true });
                self.for_each_message(ids, "processed", &|id| {
                    let url = self.message_url(id, "");
                    self.api
                        .send(
                            Request::new(Method::Patch, &url)
                                .with_headers(&PREFER)
                                .with_body(Body::Json(&body)),
                        )
                        .map(|_| ())
                })
            }
            ProcessedAction::Delete => self.for_each_message(ids, "processed", &|id| {
                let url = self.message_url(id, "");
                self.api
                    .send(Request::new(Method::Delete, &url).with_headers(&PREFER))
                    .map(|_| ())
            }),
            ProcessedAction::Move(folder) => self.move_to(ids, &folder, "processed"),
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
            self.move_to(ids, QUARANTINE_FOLDER, "quarantined")?;
        }
        Ok(true)
    }

    fn count(&mut self) -> Result<usize> {
        let folder = self.incoming_folder()?;
        let url = self.api.url(&format!(
            "/me/mailFolders/{}?$select=totalItemCount",
            percent_encode(&folder)
        ));
        let value: serde_json::Value = self.get_json(&url)?;
        value
            .get("totalItemCount")
            .and_then(|v| v.as_u64())
            .map(|n| n as usize)
            .ok_or_else(|| {
                self.mailbox_error(format!(
                    "{}: the reply has no totalItemCount",
                    crate::http::endpoint_label(Method::Get, &url)
                ))
            })
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
