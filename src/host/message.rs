//! The in-app Message of the contract (SPEC §4): what `Host::deliver_message` hands to the
//! host's `deliverMessage()` when SEND_EMAIL is false.

use serde::Serialize;

/// The in-app Message `deliverMessage()` receives when SEND_EMAIL is false (SPEC §4): the
/// recipients, subject (with `[SD_NUMBER]` when the message has one), content and attachments
/// of a `send()` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InAppMessage {
    pub to: Vec<InAppAddress>,
    pub cc: Vec<InAppAddress>,
    pub bcc: Vec<InAppAddress>,
    pub reply_to: Vec<InAppAddress>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<InAppAttachment>,
    /// `general`, `service_desk`, ...
    pub kind: &'static str,
    pub tenant: i64,
    pub sd_number: Option<String>,
}

/// `{email, name}`; `name` is null when the address has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InAppAddress {
    pub email: String,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InAppAttachment {
    pub filename: Option<String>,
    pub content_type: String,
    /// In bytes.
    pub size: usize,
    pub inline: bool,
    /// Without angle brackets.
    pub content_id: Option<String>,
    pub content_base64: String,
}
