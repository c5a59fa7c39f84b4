//! `$mail` (SPEC §5): what `createInquiry()` and `addToThread()` receive for one incoming
//! message. It borrows the parsed message (nothing of it is copied before the PHP boundary
//! converts it to a PHP array) and adds the account, the virtual host, the attempt and the
//! attachment files.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::mime::{HeaderField, MailAddress, ParsedMail};
use crate::rules::AutoKind;

/// `$mail`. Its keys are the PHP array's keys.
#[derive(Debug, Serialize)]
pub struct Mail<'a> {
    pub message_id: Option<&'a str>,
    pub in_reply_to: Option<&'a str>,
    pub references: &'a [String],
    pub from: Option<&'a MailAddress>,
    pub to: &'a [MailAddress],
    pub cc: &'a [MailAddress],
    pub reply_to: &'a [MailAddress],
    pub subject: &'a str,
    pub date: Option<&'a str>,
    pub text: &'a str,
    pub html: Option<&'a str>,
    pub attachments: Vec<MailAttachment<'a>>,
    /// The SD number the message names (in its subject, or through a reference to a
    /// Message-ID we sent), or null.
    pub sd_number: Option<&'a str>,
    /// `auto-reply`, `bounce`, or null.
    pub auto: Option<AutoKind>,
    /// Every header, names in lower case: a string, or a list when repeated.
    pub headers: &'a BTreeMap<String, HeaderField>,
    pub return_path: Option<&'a str>,
    /// The dedupe key: the Message-ID, else `sha256:<hex>` of the raw message.
    pub message_key: &'a str,
    pub problems: &'a [String],
    /// The account whose mailbox it came from.
    pub account: MailAccount<'a>,
    /// The virtual host that receives the mail (the event's Data).
    pub host: &'a str,
    /// 1 the first time; more when an earlier run failed or died while handing it over.
    pub attempt: u32,
}

impl<'a> Mail<'a> {
    /// `$mail` of `parsed`, without attachments (see [`Mail::attachments`]).
    pub fn new(
        parsed: &'a ParsedMail,
        sd_number: Option<&'a str>,
        auto: Option<AutoKind>,
        account: MailAccount<'a>,
        host: &'a str,
        attempt: u32,
    ) -> Mail<'a> {
        Mail {
            message_id: parsed.message_id.as_deref(),
            in_reply_to: parsed.in_reply_to.as_deref(),
            references: &parsed.references,
            from: parsed.from.as_ref(),
            to: &parsed.to,
            cc: &parsed.cc,
            reply_to: &parsed.reply_to,
            subject: &parsed.subject,
            date: parsed.date.as_deref(),
            text: &parsed.text,
            html: parsed.html.as_deref(),
            attachments: Vec::new(),
            sd_number,
            auto,
            headers: &parsed.headers,
            return_path: parsed.return_path.as_deref(),
            message_key: &parsed.message_key,
            problems: &parsed.problems,
            account,
            host,
            attempt,
        }
    }
}

/// `$mail['account']`.
#[derive(Debug, Serialize)]
pub struct MailAccount<'a> {
    #[serde(rename = "RECID")]
    pub recid: Recid,
    #[serde(rename = "EMAIL")]
    pub email: &'a str,
    #[serde(rename = "TENANTS_RECID")]
    pub tenants_recid: i64,
}

/// An account's RECID: the tenant row's number, or `master`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Recid {
    Tenant(i64),
    Master(&'static str),
}

/// One entry of `$mail['attachments']`: the file the host reads is at `path`.
#[derive(Debug, Serialize)]
pub struct MailAttachment<'a> {
    pub filename: &'a str,
    pub content_type: &'a str,
    pub size: usize,
    pub content_id: Option<&'a str>,
    pub inline: bool,
    pub path: String,
}
