//! GMAIL transport: the Gmail API's `users.messages.send`. Messages up to
//! [`GMAIL_RAW_MAX_BYTES`] go as `{"raw": base64url(MIME)}`; larger ones (up to Gmail's 35 MB)
//! through the documented media upload (`/upload/gmail/v1/.../send?uploadType=media`,
//! `Content-Type: message/rfc822`). Either way the MIME is sent byte for byte; envelope-only
//! (Bcc) recipients are written into a `Bcc` header, which Gmail removes on delivery. Gmail
//! itself decides the From: the signed-in mailbox or one of its verified "send as" aliases.
//! A service account sends as `users/{IMPERSONATE}`.

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;

use super::graph::with_bcc;
use super::{BuiltMessage, CheckReport, Delivery, DeliveryStatus, Transport};
use crate::config::{Account, TransportType};
use crate::error::{Error, Result};
use crate::http::{percent_encode, Body, HttpClient, Method, Request, Role};
use crate::oauth::{self, ApiClient, OAuthEnv};

/// Above this size a message is sent with the media upload instead of the JSON `raw` field.
pub const GMAIL_RAW_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Gmail's largest message (the upload limit of `messages.send`).
pub const GMAIL_MAX_BYTES: usize = 35 * 1024 * 1024;

/// Sends through the Gmail API.
#[derive(Debug)]
pub struct GmailTransport {
    api: ApiClient,
    /// `me`, or the impersonated mailbox of a service account (path-encoded).
    user: String,
}

impl GmailTransport {
    /// The transport of a GMAIL account; tokens and the state live in `env`.
    pub fn new(account: &Account, env: &OAuthEnv) -> Result<GmailTransport> {
        let api = ApiClient::new(account, env, Role::Send)?;
        let user = user_path(&api);
        Ok(GmailTransport { api, user })
    }

    /// The same transport with another HTTP client (e.g. another retry policy).
    pub fn with_http(mut self, http: HttpClient) -> GmailTransport {
        self.api = self.api.with_http(http);
        self
    }

    /// The mailbox Gmail sends as (remembered from the sign-in, else `GET .../profile`).
    pub fn mailbox(&self) -> Result<String> {
        oauth::mailbox_address(&self.api).map_err(|e| self.api.error(e))
    }

    fn fail(&self, code: Option<u16>, message: String) -> Error {
        Error::transport(self.api.account(), self.api.base(), code, false, message)
    }
}

/// `me`, or the service account's IMPERSONATE mailbox, as a path segment.
pub(crate) fn user_path(api: &ApiClient) -> String {
    api.tokens()
        .impersonated()
        .map_or_else(|| "me".to_string(), percent_encode)
}

impl Transport for GmailTransport {
    fn send(&self, msg: &BuiltMessage) -> Result<Delivery> {
        let raw = with_bcc(&msg.raw, &msg.recipients)
            .map_err(|m| self.fail(None, format!("cannot prepare the message: {m}")))?;
        if raw.len() > GMAIL_MAX_BYTES {
            return Err(self.fail(
                Some(413),
                format!(
                    "the message is {:.1} MB; Gmail accepts at most 35 MB: send large files as \
                     links",
                    raw.len() as f64 / 1_048_576.0
                ),
            ));
        }
        let result = if raw.len() <= GMAIL_RAW_MAX_BYTES {
            let url = self
                .api
                .url(&format!("/gmail/v1/users/{}/messages/send", self.user));
            let body = serde_json::json!({ "raw": URL_SAFE.encode(&raw) });
            self.api
                .send(Request::new(Method::Post, &url).with_body(Body::Json(&body)))
        } else {
            let url = self.api.url(&format!(
                "/upload/gmail/v1/users/{}/messages/send?uploadType=media",
                self.user
            ));
            self.api
                .send(Request::new(Method::Post, &url).with_body(Body::Raw {
                    content_type: "message/rfc822",
                    bytes: &raw,
                }))
        };
        // A 2xx reply means Gmail accepted it; its body (the new message's id) is not needed,
        // and a damaged body must not make a sent message look failed.
        result.map_err(|e| self.api.error(e))?;
        Ok(Delivery {
            status: DeliveryStatus::Sent,
            path: None,
            server: self.api.base().to_string(),
            from: None,
        })
    }

    fn check(&self) -> Result<CheckReport> {
        let mut steps = Vec::new();
        self.api.tokens().access_token()?;
        steps.push(if self.api.tokens().is_service_account() {
            "the service account obtained an access token (domain-wide delegation works)"
                .to_string()
        } else {
            "an access token was obtained".to_string()
        });
        let url = self
            .api
            .url(&format!("/gmail/v1/users/{}/profile", self.user));
        let profile: serde_json::Value = self.api.json(Request::new(Method::Get, &url))?;
        let mailbox = profile
            .get("emailAddress")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        steps.push(format!("signed in as {mailbox}"));
        Ok(CheckReport {
            transport: "GMAIL",
            server: self.api.base().to_string(),
            steps,
        })
    }

    fn describe(&self) -> String {
        format!("GMAIL {} (account {})", self.api.base(), self.api.account())
    }

    fn kind(&self) -> TransportType {
        TransportType::Gmail
    }
}
