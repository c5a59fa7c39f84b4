//! Parsing of incoming mail into the `$mail` array of SPEC §5 (the only user of mail-parser).
//! Parsing only: `sd_number` and `auto` are PCR-360's rules, applied to the result in
//! `src/rules.rs` (which depends on this module, not the other way round).
//!
//! [`parse`] never fails and never panics: whatever the bytes, it returns a [`ParsedMail`] and
//! lists what was wrong in [`ParsedMail::problems`]. Decisions that other modules rely on:
//!
//! - **Message-IDs** (`message_id`, `in_reply_to`, `references`, `message_key`) are always given
//!   *without* their angle brackets (`abc@host`, not `<abc@host>`). `in_reply_to` is the first
//!   id of the header. The `headers` map keeps the raw (decoded) values, brackets included.
//! - **`message_key`** is the Message-ID, or `sha256:<hex>` of the raw message (line endings
//!   normalised to LF, trailing whitespace ignored) when the message has none. It is the
//!   per-account dedupe key.
//! - **Addresses** are `{email, name}`; `name` is `null` when the header gives none. Group
//!   syntax is flattened, entries without an address (`undisclosed-recipients:;`) are dropped,
//!   repeated headers are merged. `from` falls back to `Sender` when there is no `From`.
//! - **`date`** is RFC 3339 with the sender's own UTC offset (`2024-03-05T14:22:01-05:00`), or
//!   null when absent or unparsable (then a problem says so).
//! - **`text`** joins the text/plain body parts (`format=flowed` unwrapped); when there is none
//!   it is derived from the HTML ([`html_to_text`]). `html` joins the text/html body parts, or
//!   is null. Line endings are normalised to `\n`. In `multipart/alternative` the first plain
//!   and the last HTML alternative are used.
//! - **Attachments** keep their original bytes (`data`, not serialized; transfer encoding
//!   undone, charset untouched). File names come from RFC 2231 (continuations and charsets
//!   included) or RFC 2047 parameters, are sanitised ([`sanitize_filename`]) and made unique
//!   within the message, ignoring case: a name already given gets the first free number
//!   (`a.pdf`, `a-2.pdf`, `A-3.PDF`), never one a real part of the message already has; at
//!   [`MAX_FILENAME_BYTES`] the number replaces the end of the stem. Naming is linear in the
//!   number of attachments (one counter per name). Nameless parts get `attachment-N.<ext>` (N is
//!   the attachment's position); a nameless `text/calendar` part (an invitation) becomes
//!   `invite.ics`; a forwarded `message/rfc822` becomes `<its subject>.eml` holding the whole
//!   forwarded message, so it opens in any mail client (its text is *not* merged into
//!   `text`); DSN parts become `delivery-status.txt` / `original-headers.txt`. Parts of a
//!   `multipart/related` other than its root are attachments (usually `inline` with a
//!   `content_id`). TNEF (`winmail.dat`) is passed on as it is.
//! - **`headers`**: lower-case name → decoded string, or a list of strings when the header
//!   occurs more than once (like PHP's mailparse).
//! - **Control characters**: in `subject`, display names, `headers` values, Message-IDs and
//!   Content-IDs, every run of white space holding a control character (CR, LF, NUL, tab, ...,
//!   raw or produced by RFC 2047 decoding) becomes one space, so no header value the host sees
//!   can break a line or carry a NUL. File names get the same treatment (RFC 2231 included) in
//!   [`sanitize_filename`].
//! - **Charsets**: everything encoding_rs knows (ISO-8859-x, Windows-125x, GB2312/GBK/GB18030,
//!   Big5, Shift_JIS, EUC-JP, ISO-2022-JP, KOI8-R/U, ...). Undecodable bytes become U+FFFD.
//!   Raw 8-bit headers are read as UTF-8 when valid, else in the first 8-bit charset the
//!   message declares, else Windows-1252. A body part without a (known) charset that is not
//!   valid UTF-8 is read as Windows-1252.
//! - **Robustness**: the MIME structure is walked here, over the raw bytes, with mail-parser
//!   used for what it is good at (header fields, RFC 2047/2231, charsets). Delimiters must
//!   start a line (RFC 2046); every delimiter is found through one index built in a single
//!   pass, so the work is linear in the message size however deep the nesting. Structure is
//!   followed [`MAX_MIME_DEPTH`] levels deep; deeper parts are still collected, flat, so
//!   nothing is lost. Forwarded messages are never parsed recursively. A multipart without a
//!   `boundary` parameter gets the boundary its body uses; a missing closing delimiter
//!   (a truncated message) keeps what arrived; bad base64/quoted-printable is decoded
//!   leniently. Each of these is noted in `problems`.
//! - **Bounds**: at most [`MAX_MIME_PARTS`] entities (the message itself, multiparts and text
//!   parts count) and [`MAX_DECODED_BYTES`] of decoded content are collected; beyond either
//!   the message is still returned with what was collected, and `problems` names the bound
//!   ("the message has more than 10000 MIME parts; the rest were not collected").
//!   `problems` holds at most [`MAX_PROBLEMS`] entries: the bounds and the header problems are
//!   always listed, and the last entry counts what was left out. Every step is linear in the
//!   message size, so a hostile message costs time in proportion to its bytes, not more.

mod decode;
mod header;
mod html;
mod names;
mod walk;

use std::collections::BTreeMap;
use std::fmt;

use mail_parser::{HeaderName, HeaderValue as MpValue};
use serde::Serialize;
use sha2::{Digest, Sha256};

use decode::{decode_header_bytes, decode_text, normalize_newlines};
use header::{clean_header_text, header_fields, rfc3339, split_head_body, strip_brackets};
use names::finish_attachments;
use walk::{Collected, DelimiterIndex, Opened, Walker};

pub use html::html_to_text;
pub use names::{extension_for, sanitize_filename};

/// How deep MIME multiparts are walked structurally; deeper parts are collected flat.
pub const MAX_MIME_DEPTH: usize = 64;

/// Most MIME entities collected from one message: the message itself, every multipart and
/// every text part count. Parts beyond it are not collected (a problem says so).
pub const MAX_MIME_PARTS: usize = 10_000;

/// Most decoded content collected from one message, in bytes (body text, HTML and attachment
/// data together): over ten times the default `MAX_MESSAGE_BYTES`, so only a message that an
/// account with a raised size limit let through can reach it. Parts beyond it are not collected.
pub const MAX_DECODED_BYTES: usize = 512 * 1024 * 1024;

/// Most entries in [`ParsedMail::problems`]; the last one says how many more were found.
pub const MAX_PROBLEMS: usize = 100;

/// Longest attachment file name we produce, in bytes (file systems allow 255).
pub const MAX_FILENAME_BYTES: usize = 180;

/// One mailbox of an address header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailAddress {
    pub email: String,
    /// The display name, decoded; `None` when the header has none.
    pub name: Option<String>,
}

/// One attachment (or inline part) of an incoming message.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Attachment {
    /// Safe to use as a file name: no path separators, no `..`, no control characters,
    /// at most [`MAX_FILENAME_BYTES`] bytes, unique within the message.
    pub filename: String,
    /// `type/subtype`, lower case, without parameters.
    pub content_type: String,
    /// Size of `data` in bytes.
    pub size: usize,
    /// The Content-ID without angle brackets (what `cid:` URLs in the HTML refer to).
    pub content_id: Option<String>,
    /// True for `Content-Disposition: inline`, or no disposition but a Content-ID.
    pub inline: bool,
    /// The decoded content (base64 / quoted-printable undone, charset untouched).
    #[serde(skip)]
    pub data: Vec<u8>,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("filename", &self.filename)
            .field("content_type", &self.content_type)
            .field("size", &self.size)
            .field("content_id", &self.content_id)
            .field("inline", &self.inline)
            .finish_non_exhaustive()
    }
}

/// A header's decoded value(s): a string when it occurs once, a list when repeated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum HeaderField {
    One(String),
    Many(Vec<String>),
}

impl HeaderField {
    /// The first (topmost) value.
    pub fn first(&self) -> &str {
        match self {
            HeaderField::One(v) => v,
            HeaderField::Many(v) => v.first().map(String::as_str).unwrap_or(""),
        }
    }

    /// All values, in message order.
    pub fn all(&self) -> Vec<&str> {
        match self {
            HeaderField::One(v) => vec![v.as_str()],
            HeaderField::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }

    fn push(&mut self, value: String) {
        match self {
            HeaderField::One(first) => {
                *self = HeaderField::Many(vec![std::mem::take(first), value]);
            }
            HeaderField::Many(list) => list.push(value),
        }
    }
}

/// An incoming message as the host sees it (`$mail`, SPEC §5, typed as `host::Mail`), minus
/// `account`, `host`, `attempt` and the attachment `path`s, which the checkmail code adds
/// (`src/checkmail/mail.rs`), and `sd_number` and `auto`, which PCR-360's rules
/// (`src/rules.rs`) give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParsedMail {
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub from: Option<MailAddress>,
    pub to: Vec<MailAddress>,
    pub cc: Vec<MailAddress>,
    pub reply_to: Vec<MailAddress>,
    pub subject: String,
    pub date: Option<String>,
    pub text: String,
    pub html: Option<String>,
    pub attachments: Vec<Attachment>,
    pub headers: BTreeMap<String, HeaderField>,
    /// The envelope sender from `Return-Path`, without brackets; `Some("")` for `<>`.
    pub return_path: Option<String>,
    /// The dedupe key: the Message-ID, else `sha256:<hex>` of the raw message.
    pub message_key: String,
    /// What was wrong with the message (broken MIME, bad encodings, ...); empty when clean.
    pub problems: Vec<String>,
    /// The message's own Content-Type, when it has one. Not part of `$mail`.
    #[serde(skip)]
    pub root_type: Option<RootType>,
    /// False when no header block could be parsed (an empty message, text without headers, a
    /// failure of the parser): the header lines were then read by hand and the rest kept as
    /// text, and the first problem says why. Not part of `$mail`.
    #[serde(skip)]
    pub structured: bool,
}

impl ParsedMail {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(HeaderField::first)
    }
}

/// The Content-Type of the message itself (the root of its MIME tree), lower case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootType {
    /// The type: `multipart`, `text`, ...
    pub main: String,
    /// The subtype: `report`, `plain`, ...
    pub sub: String,
    /// The `report-type` parameter of a `multipart/report` (RFC 6522: `delivery-status`,
    /// `disposition-notification`), when the header has one.
    pub report_type: Option<String>,
}

/// Parses one raw RFC 5322 message. Never fails, never panics; see the module docs for the
/// rules. A header-only input (e.g. from IMAP `BODY.PEEK[HEADER]`) is fine and gives an empty
/// body.
pub fn parse(raw: &[u8]) -> ParsedMail {
    parse_within(raw, LIMITS)
}

/// What one message may make the parser collect (see the module docs).
#[derive(Clone, Copy)]
struct Limits {
    parts: usize,
    decoded_bytes: usize,
}

const LIMITS: Limits = Limits {
    parts: MAX_MIME_PARTS,
    decoded_bytes: MAX_DECODED_BYTES,
};

/// [`parse`] with other bounds (the tests use small ones).
fn parse_within(raw: &[u8], limits: Limits) -> ParsedMail {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse_inner(raw, limits)))
        .unwrap_or_else(|_| fallback(raw, "the MIME parser failed on this message".into()))
}

/// `sha256:<hex>` of a raw message with line endings normalised, the dedupe key of a message
/// without a Message-ID.
pub fn raw_message_key(raw: &[u8]) -> String {
    let mut hasher = Sha256::new();
    let mut end = raw.len();
    while end > 0 && raw[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    let body = &raw[..end];
    let mut start = 0;
    for (i, &b) in body.iter().enumerate() {
        if b == b'\r' && body.get(i + 1) == Some(&b'\n') {
            hasher.update(&body[start..i]);
            start = i + 1;
        }
    }
    hasher.update(&body[start..]);
    format!("sha256:{}", hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn parse_inner(raw: &[u8], limits: Limits) -> ParsedMail {
    // A byte-order mark (Windows tools) or an mbox "From " line is not part of the message.
    let bom = if raw.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    let top_start = if raw[bom..].starts_with(b"From ") {
        raw[bom..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |p| bom + p + 1)
    } else {
        bom
    };
    let index = DelimiterIndex::build(raw);
    let mut walker = Walker {
        raw,
        index: &index,
        hint: std::cell::OnceCell::new(),
        problems: Problems::default(),
        flattened: false,
        guesses: 0,
        limits,
        // The message itself is the first part.
        parts: 1,
        decoded: 0,
        parts_full: false,
        bytes_full: false,
    };
    let (top, body_start) = walker.open(top_start, raw.len());
    if top.headers.is_empty() {
        let what = if raw.iter().all(u8::is_ascii_whitespace) {
            "the message is empty"
        } else {
            "no message headers found"
        };
        let mut mail = fallback(raw, what.to_string());
        walker
            .problems
            .push_always(std::mem::take(&mut mail.problems));
        mail.problems = walker.problems.into_list();
        return mail;
    }

    // Headers map (decoded) -------------------------------------------------------------
    let mut headers: BTreeMap<String, HeaderField> = BTreeMap::new();
    for h in &top.headers {
        let name = h.name().trim().to_ascii_lowercase();
        if name.is_empty() {
            continue;
        }
        let value = decode_header_bytes(top.raw(h));
        match headers.get_mut(&name) {
            Some(field) => field.push(value),
            None => {
                headers.insert(name, HeaderField::One(value));
            }
        }
    }

    // Identity and threading -------------------------------------------------------------
    let message_id = top.ids(&HeaderName::MessageId).into_iter().next();
    let in_reply_to = top.ids(&HeaderName::InReplyTo).into_iter().next();
    let references = top.ids(&HeaderName::References);
    // Few and always listed, after those of the MIME walk.
    let mut problems: Vec<String> = Vec::new();
    if headers.contains_key("message-id") && message_id.is_none() {
        problems.push("the Message-ID header is empty or unreadable".into());
    }
    let message_key = match &message_id {
        Some(id) => id.clone(),
        None => raw_message_key(raw),
    };

    // Addresses ----------------------------------------------------------------------------
    let from = top
        .addresses(&HeaderName::From)
        .into_iter()
        .next()
        .or_else(|| top.addresses(&HeaderName::Sender).into_iter().next());
    if from.is_none() {
        problems.push(if headers.contains_key("from") {
            "the From header has no readable address".into()
        } else {
            "the message has no From header".into()
        });
    }
    let to = top.addresses(&HeaderName::To);
    let cc = top.addresses(&HeaderName::Cc);
    let reply_to = top.addresses(&HeaderName::ReplyTo);
    let return_path = headers.get("return-path").map(|f| {
        let v = f.first().trim();
        let v = v.strip_prefix('<').unwrap_or(v);
        let v = v.split('>').next().unwrap_or(v);
        v.trim().to_string()
    });

    // Subject and date ---------------------------------------------------------------------
    let subject = match top.value(&HeaderName::Subject) {
        Some(MpValue::Text(t)) => clean_header_text(t),
        Some(MpValue::TextList(l)) => clean_header_text(&l.join(" ")),
        _ => String::new(),
    };
    let date = match top.get(&HeaderName::Date) {
        Some(h) => {
            let iso = match &h.value {
                MpValue::DateTime(dt) => rfc3339(dt),
                _ => None,
            };
            if iso.is_none() {
                let shown: String = headers
                    .get("date")
                    .map(|f| f.first().chars().take(80).collect())
                    .unwrap_or_default();
                problems.push(format!("the Date header could not be read: {shown:?}"));
            }
            iso
        }
        None => None,
    };

    // Body and attachments -------------------------------------------------------------
    let root_type = top.mime();
    let report_type = top.param(&HeaderName::ContentType, "report-type");
    let mut collected = Collected::default();
    walker.walk_opened(
        Opened {
            block: top,
            body_start,
            end: raw.len(),
            path: String::new(),
            in_digest: false,
        },
        0,
        &mut collected,
        false,
    );
    walker.problems.push_always(problems);
    let problems = std::mem::take(&mut walker.problems).into_list();

    let texts: Vec<String> = collected
        .texts
        .into_iter()
        .map(normalize_newlines)
        .filter(|t| !t.trim().is_empty())
        .collect();
    let htmls: Vec<String> = collected
        .htmls
        .into_iter()
        .map(normalize_newlines)
        .filter(|t| !t.trim().is_empty())
        .collect();
    let html = if htmls.is_empty() {
        None
    } else {
        Some(htmls.join("\n"))
    };
    let text = if !texts.is_empty() {
        texts.join("\n")
    } else if let Some(h) = &html {
        html_to_text(h)
    } else {
        String::new()
    };
    let attachments = finish_attachments(collected.attachments);

    let root_type = root_type.map(|(main, sub)| RootType {
        main,
        sub,
        report_type: report_type.map(|r| r.to_ascii_lowercase()),
    });

    ParsedMail {
        message_id,
        in_reply_to,
        references,
        from,
        to,
        cc,
        reply_to,
        subject,
        date,
        text,
        html,
        attachments,
        headers,
        return_path,
        message_key,
        problems,
        root_type,
        structured: true,
    }
}

/// The problems of one message: at most [`MAX_PROBLEMS`] listed, so a hostile message (a
/// million damaged header lines) cannot make a huge list.
#[derive(Default)]
struct Problems {
    /// In the order found; `true` marks the ones always listed.
    entries: Vec<(bool, String)>,
    /// Entries that may be left out.
    ordinary: usize,
    /// Problems found but not listed.
    unlisted: usize,
}

impl Problems {
    fn push(&mut self, problem: String) {
        if self.ordinary < MAX_PROBLEMS {
            self.ordinary += 1;
            self.entries.push((false, problem));
        } else {
            self.unlisted += 1;
        }
    }

    /// Problems always listed: the bounds and the message's header problems, each of which
    /// a message can have once.
    fn push_always(&mut self, problems: impl IntoIterator<Item = String>) {
        self.entries
            .extend(problems.into_iter().map(|problem| (true, problem)));
    }

    /// The list: the always-listed problems and, in the room left, the first others; the
    /// last entry counts those left out.
    fn into_list(mut self) -> Vec<String> {
        loop {
            let room = MAX_PROBLEMS - usize::from(self.unlisted > 0);
            if self.entries.len() <= room {
                break;
            }
            let Some(last) = self.entries.iter().rposition(|e| !e.0) else {
                break;
            };
            self.entries.remove(last);
            self.unlisted += 1;
        }
        let mut list: Vec<String> = self.entries.into_iter().map(|e| e.1).collect();
        if self.unlisted > 0 {
            list.push(format!(
                "{} more problems were found but are not listed",
                self.unlisted
            ));
        }
        list
    }
}

/// The result when mail-parser could not be used at all: headers we can read by hand, the
/// rest as text, so nothing is lost.
fn fallback(raw: &[u8], problem: String) -> ParsedMail {
    let (head, body) = split_head_body(raw);
    let mut headers: BTreeMap<String, HeaderField> = BTreeMap::new();
    for field in header_fields(head) {
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = String::from_utf8_lossy(&field[..colon])
            .trim()
            .to_ascii_lowercase();
        if name.is_empty() || name.contains(char::is_whitespace) {
            continue;
        }
        let value = decode_header_bytes(&field[colon + 1..]);
        match headers.get_mut(&name) {
            Some(f) => f.push(value),
            None => {
                headers.insert(name, HeaderField::One(value));
            }
        }
    }
    let message_id = headers
        .get("message-id")
        .map(|f| strip_brackets(f.first()))
        .filter(|s| !s.is_empty());
    let subject = headers
        .get("subject")
        .map(|f| f.first().to_string())
        .unwrap_or_default();
    let text = if headers.is_empty() { raw } else { body };
    ParsedMail {
        message_key: message_id.clone().unwrap_or_else(|| raw_message_key(raw)),
        message_id,
        in_reply_to: None,
        references: Vec::new(),
        from: None,
        to: Vec::new(),
        cc: Vec::new(),
        reply_to: Vec::new(),
        subject,
        date: None,
        text: normalize_newlines(decode_text(text, None)),
        html: None,
        attachments: Vec::new(),
        headers,
        return_path: None,
        problems: vec![problem],
        root_type: None,
        structured: false,
    }
}

fn slice(bytes: &[u8], start: usize, end: usize) -> &[u8] {
    let end = end.min(bytes.len());
    bytes.get(start.min(end)..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn p(raw: &str) -> ParsedMail {
        parse(raw.as_bytes())
    }

    pub(super) fn pb(raw: &[u8]) -> ParsedMail {
        parse(raw)
    }

    pub(super) fn nested_multipart(depth: usize) -> String {
        let mut s = String::from("From: a@b.c\r\nSubject: deep\r\nContent-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n");
        for i in 0..depth {
            s.push_str(&format!(
                "--b{i}\r\nContent-Type: multipart/mixed; boundary=\"b{}\"\r\n\r\n",
                i + 1
            ));
        }
        s.push_str(&format!(
            "--b{depth}\r\nContent-Type: text/plain\r\n\r\ndeepest text\r\n"
        ));
        s.push_str(&format!(
            "--b{depth}\r\nContent-Type: application/pdf; name=\"x.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"
        ));
        for i in (0..=depth).rev() {
            s.push_str(&format!("--b{i}--\r\n"));
        }
        s
    }

    #[test]
    fn simple_message() {
        let m = p("From: \"Ann Lee\" <ann@example.edu>\r\nTo: help@example.edu, Bob <bob@example.edu>\r\n\
                   Subject: Printer broken\r\nMessage-ID: <a1@example.edu>\r\n\
                   Date: Tue, 5 Mar 2024 14:22:01 -0500\r\n\r\nIt jams.\r\n");
        assert_eq!(m.message_id.as_deref(), Some("a1@example.edu"));
        assert_eq!(m.message_key, "a1@example.edu");
        assert_eq!(
            m.from,
            Some(MailAddress {
                email: "ann@example.edu".into(),
                name: Some("Ann Lee".into())
            })
        );
        assert_eq!(m.to.len(), 2);
        assert_eq!(m.to[0].name, None);
        assert_eq!(m.subject, "Printer broken");
        assert_eq!(m.date.as_deref(), Some("2024-03-05T14:22:01-05:00"));
        assert_eq!(m.text, "It jams.\n");
        assert_eq!(m.html, None);
        assert_eq!(m.header("SUBJECT"), Some("Printer broken"));
        assert!(m.problems.is_empty(), "{:?}", m.problems);
    }

    #[test]
    fn serializes_with_spec_field_names() {
        let m = p("From: a@b.c\r\nSubject: x\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\nbody\r\n");
        let v = serde_json::to_value(&m).unwrap();
        for key in [
            "message_id",
            "in_reply_to",
            "references",
            "from",
            "to",
            "cc",
            "reply_to",
            "subject",
            "date",
            "text",
            "html",
            "attachments",
            "headers",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["headers"]["x-dup"], serde_json::json!(["1", "2"]));
        assert_eq!(v["headers"]["subject"], serde_json::json!("x"));
        assert_eq!(
            v["from"],
            serde_json::json!({"email": "a@b.c", "name": null})
        );
    }

    #[test]
    fn message_key_without_message_id_ignores_line_endings() {
        let crlf = pb(b"From: a@b.c\r\nSubject: s\r\n\r\nbody\r\n");
        let lf = pb(b"From: a@b.c\nSubject: s\n\nbody\n\n");
        assert!(crlf.message_key.starts_with("sha256:"));
        assert_eq!(crlf.message_key.len(), "sha256:".len() + 64);
        assert_eq!(crlf.message_key, lf.message_key);
        let other = pb(b"From: a@b.c\nSubject: s\n\nbody2\n");
        assert_ne!(crlf.message_key, other.message_key);
    }

    #[test]
    fn attachment_debug_hides_the_bytes() {
        let a = Attachment {
            filename: "secret.bin".into(),
            content_type: "application/octet-stream".into(),
            size: 4,
            content_id: None,
            inline: false,
            data: b"\x01\x02\x03\x04".to_vec(),
        };
        let shown = format!("{a:?}");
        assert!(
            shown.contains("secret.bin") && !shown.contains("data"),
            "{shown}"
        );
    }

    #[test]
    fn header_only_input_and_empty_input() {
        let m = pb(b"From: a@b.c\r\nSubject: only headers\r\nMessage-ID: <h@x>");
        assert_eq!(m.subject, "only headers");
        assert_eq!(m.message_id.as_deref(), Some("h@x"));
        assert_eq!(m.text, "");
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        let empty = pb(b"");
        assert_eq!(empty.text, "");
        assert!(empty.message_key.starts_with("sha256:"));
        assert!(!empty.problems.is_empty());
    }

    #[test]
    fn text_without_headers_is_kept() {
        let m = pb(b"just some words without any header\r\nsecond line\r\n");
        assert!(m.text.contains("just some words"), "{:?}", m.text);
        assert!(m.text.contains("second line"));
    }

    fn damaged_parts(n: usize) -> String {
        let mut raw =
            String::from("From: a@b.c\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n");
        for _ in 0..n {
            raw.push_str(
                "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n!!\r\n",
            );
        }
        raw.push_str("--b--\r\n");
        raw
    }

    #[test]
    fn problems_are_capped() {
        let m = p(&damaged_parts(500));
        assert_eq!(m.attachments.len(), 500);
        assert_eq!(m.problems.len(), MAX_PROBLEMS);
        assert_eq!(
            m.problems[0],
            "MIME part 1 has damaged base64 data; decoded what was readable"
        );
        assert_eq!(
            m.problems[MAX_PROBLEMS - 1],
            "401 more problems were found but are not listed"
        );
        // The header problems and the bounds are always listed.
        let raw = damaged_parts(500).replacen("From: a@b.c", "Date: soon", 1);
        let m = parse_within(
            raw.as_bytes(),
            Limits {
                parts: 300,
                decoded_bytes: MAX_DECODED_BYTES,
            },
        );
        assert_eq!(m.problems.len(), MAX_PROBLEMS);
        assert_eq!(
            m.problems[0],
            "the message has more than 300 MIME parts; the rest were not collected"
        );
        assert_eq!(
            m.problems[MAX_PROBLEMS - 3..],
            [
                "the message has no From header",
                "the Date header could not be read: \"soon\"",
                "203 more problems were found but are not listed",
            ]
        );
        // A million raw 8-bit header lines: still a hundred entries.
        let mut raw = b"From: a@b.c\r\n".to_vec();
        for _ in 0..100_000 {
            raw.extend_from_slice(b"X-A: \xff\r\n");
        }
        raw.extend_from_slice(b"\r\nbody\r\n");
        let m = pb(&raw);
        assert_eq!(m.problems.len(), MAX_PROBLEMS);
        assert_eq!(m.text, "body\n");
    }

    /// A tiny deterministic generator (no dependency needed for pseudo-random bytes).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn never_panics_on_random_or_truncated_input() {
        let sample = nested_multipart(3)
            + "--x\r\nContent-Type: message/rfc822\r\n\r\nSubject: =?utf-8?B?w6k=?=\r\n";
        let sample = format!(
            "Return-Path: <>\r\nContent-Type: multipart/alternative; boundary=\"x\"\r\n\r\n--x\r\n\
             Content-Type: text/html; charset=gb2312\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
             <p>=C4=E3=BA=C3</p>\r\n--x\r\nContent-Disposition: attachment; filename*0*=utf-8''%C3; filename*1*=%A9\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n{sample}"
        );
        let bytes = sample.as_bytes();
        for cut in 0..bytes.len() {
            let m = parse(&bytes[..cut]);
            assert!(!m.message_key.is_empty());
        }
        let alphabet: &[u8] =
            b"\r\n\r\n:;=-\"<>@ \t?BQ*'%\x00\x80\xff\xe9abcontent-typemultipart/boundary--";
        let mut rng = Lcg(0x5eed);
        for _ in 0..2000 {
            let len = (rng.next() % 600) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[(rng.next() as usize) % alphabet.len()])
                .collect();
            let m = parse(&input);
            assert!(!m.message_key.is_empty());
            let mut mutated = bytes.to_vec();
            for _ in 0..8 {
                let at = (rng.next() as usize) % mutated.len();
                mutated[at] = alphabet[(rng.next() as usize) % alphabet.len()];
            }
            let m = parse(&mutated);
            assert!(!m.message_key.is_empty());
        }
    }
}
