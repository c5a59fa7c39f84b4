//! The `send()` message: parsing and validating the PHP array ([`MessageRequest::from_json`])
//! and building the RFC 5322 bytes ([`build`]).
//!
//! Everything that can be wrong with a message is found here, before any transport is
//! touched: a bad message is an [`Error::Message`] naming the field, and nothing is sent.
//! The From is always the sending account's `EMAIL` / `DISPLAY_NAME`: a `from` key is refused,
//! because routing (SPEC §4) decides who sends.
//!
//! Layout: this file holds the types; `request` reads the PHP array, `validate` holds the
//! rules of a well-formed message, `compose` builds the message and its MIME structure, and
//! `encode` encodes its text parts and attachments.
//!
//! [`Error::Message`]: crate::error::Error::Message

mod compose;
mod encode;
mod request;
mod validate;

use std::fmt;

use serde_json::Value;

pub use compose::build;
pub use request::guess_content_type;

/// Largest attachment read from a `path` (or given as content).
pub const MAX_ATTACHMENT_BYTES: u64 = 100 * 1024 * 1024;

/// The `kind` of a message, which decides the sending account (SPEC §4).
pub use crate::routing::MailKind;

/// One mailbox: an address and an optional display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress {
    pub email: String,
    pub name: Option<String>,
}

impl EmailAddress {
    /// `{email, name}` as the PHP arrays show it.
    pub fn to_json(&self) -> Value {
        serde_json::json!({ "email": self.email, "name": self.name })
    }
}

/// One attachment, already read into memory.
#[derive(Clone, PartialEq, Eq)]
pub struct AttachmentData {
    /// Required for attachments; optional for inline parts.
    pub filename: Option<String>,
    /// A MIME type such as `application/pdf` (guessed from the file name when not given).
    pub content_type: String,
    pub data: Vec<u8>,
    /// Shown in the HTML body through `cid:<content_id>`.
    pub inline: bool,
    /// Without angle brackets.
    pub content_id: Option<String>,
}

impl fmt::Debug for AttachmentData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachmentData")
            .field("filename", &self.filename)
            .field("content_type", &self.content_type)
            .field("bytes", &self.data.len())
            .field("inline", &self.inline)
            .field("content_id", &self.content_id)
            .finish()
    }
}

/// A validated `send()` message. Build one with [`MessageRequest::from_json`]; code that fills
/// the fields itself (e.g. to pass binary attachment bytes) should call
/// [`MessageRequest::validate`] — [`build`] does so too.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageRequest {
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    pub reply_to: Vec<EmailAddress>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<AttachmentData>,
    /// Extra headers, in order, names unique (case-insensitively).
    pub headers: Vec<(String, String)>,
    pub kind: MailKind,
    pub tenant: i64,
    pub sd_number: Option<String>,
    /// A Message-ID with angle brackets.
    pub in_reply_to: Option<String>,
}

/// A message ready for any transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltMessage {
    /// The RFC 5322 message, CRLF line endings, no `Bcc` header.
    pub raw: Vec<u8>,
    /// `MAIL FROM` / `sendmail -f`: the account's address.
    pub envelope_from: String,
    /// Every recipient (To, Cc and Bcc), each once, in that order.
    pub recipients: Vec<String>,
    /// With angle brackets.
    pub message_id: String,
    /// The From header as written (`Name <address>` or `address`).
    pub from: String,
    /// The subject as sent (with `[SD_NUMBER]` when it was added).
    pub subject: String,
}

/// The key the PHP boundary uses for a PHP string that is not valid UTF-8:
/// `{"$binary": "<base64 of the bytes>"}` (see `crate::php::convert`).
pub const BINARY_KEY: &str = "$binary";

/// What the tests of the parts share: an account, and a request or message from JSON.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::config::{Account, AccountId, AccountType, TlsSettings};
    use crate::error::{Error, Result};
    use std::path::PathBuf;
    use std::time::Duration;

    pub(super) const KEY: [u8; 32] = [3u8; 32];

    pub(super) fn account() -> Account {
        Account {
            id: AccountId::Tenant(12),
            tenants_recid: 1,
            account_type: AccountType::ServiceDesk,
            email: "help@pcr.example.edu".into(),
            display_name: Some("PCR-360 Help Désk".into()),
            login: None,
            password: None,
            outgoing: None,
            incoming: None,
            sysadmin: None,
            tls: TlsSettings::default(),
            file_path: PathBuf::from("/tmp"),
            sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
            timeout: Duration::from_secs(5),
            auth_type: Default::default(),
            oauth: None,
        }
    }

    pub(super) fn req(value: Value) -> Result<MessageRequest> {
        MessageRequest::from_json(&value)
    }

    pub(super) fn built(value: Value) -> BuiltMessage {
        build(&req(value).unwrap(), &account(), &KEY).unwrap()
    }

    pub(super) fn err_text(value: Value) -> String {
        let err = req(value).unwrap_err();
        assert!(matches!(err, Error::Message(_)), "{err:?}");
        err.to_string()
    }
}
