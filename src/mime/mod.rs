//! Parsing of incoming mail into the `$mail` array of SPEC §5 (the only user of mail-parser).
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
//! - **`auto`**: `bounce` for a DSN (`multipart/report` other than read receipts), mail from
//!   `mailer-daemon`/`postmaster`, or an `X-Failed-Recipients` header; `auto-reply` for
//!   `Auto-Submitted` other than `no`, `X-Autoreply`, `X-Autorespond`, `X-Autoresponse`,
//!   `Precedence: bulk|junk|list|auto_reply` and read receipts (MDN); then `bounce` for an empty
//!   `Return-Path: <>` (after the auto-reply checks, because out-of-office replies are also
//!   sent with a null sender). `X-Auto-Response-Suppress` is deliberately **not** a signal: it
//!   asks the *receiver* not to auto-reply, and Exchange, Outlook add-ins and many ticketing
//!   and CRM tools put it on ordinary human mail; counting it would silently drop real
//!   requests. Genuine Exchange out-of-office replies carry `Auto-Submitted` anyway.
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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::html::add_html_token;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::parsers::MessageStream;
use mail_parser::{
    Address as MpAddress, ContentType, Header, HeaderName, HeaderValue as MpValue, MessageParser,
};
use regex::Regex;
use serde::Serialize;
use sha2::{Digest, Sha256};

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

/// Longest file name extension kept apart when a name is shortened or numbered (`.pdf`,
/// `.docx`); anything after a later dot is part of the name.
const MAX_EXTENSION_BYTES: usize = 16;

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

/// Why a message is not a human's mail (SPEC §6): such mail never creates an Inquiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AutoKind {
    #[serde(rename = "auto-reply")]
    AutoReply,
    #[serde(rename = "bounce")]
    Bounce,
}

impl AutoKind {
    /// The value of `$mail['auto']`.
    pub fn as_str(self) -> &'static str {
        match self {
            AutoKind::AutoReply => "auto-reply",
            AutoKind::Bounce => "bounce",
        }
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

/// An incoming message as the host sees it (`$mail`, SPEC §5), minus `account`, `host` and
/// the attachment `path`s, which the inbound code adds.
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
    pub sd_number: Option<String>,
    pub auto: Option<AutoKind>,
    pub headers: BTreeMap<String, HeaderField>,
    /// The envelope sender from `Return-Path`, without brackets; `Some("")` for `<>`.
    pub return_path: Option<String>,
    /// The dedupe key: the Message-ID, else `sha256:<hex>` of the raw message.
    pub message_key: String,
    /// What was wrong with the message (broken MIME, bad encodings, ...); empty when clean.
    pub problems: Vec<String>,
}

impl ParsedMail {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(HeaderField::first)
    }
}

/// Parses one raw RFC 5322 message. Never fails, never panics; see the module docs for the
/// rules. `sd_pattern` finds the SD Number in the subject (capture group 1 when the pattern
/// has one, else the whole match). A header-only input (e.g. from IMAP `BODY.PEEK[HEADER]`)
/// is fine and gives an empty body.
pub fn parse(raw: &[u8], sd_pattern: &Regex) -> ParsedMail {
    parse_within(raw, sd_pattern, LIMITS)
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
fn parse_within(raw: &[u8], sd_pattern: &Regex, limits: Limits) -> ParsedMail {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_inner(raw, sd_pattern, limits)
    }))
    .unwrap_or_else(|_| {
        fallback(
            raw,
            sd_pattern,
            "the MIME parser failed on this message".into(),
        )
    })
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

/// The SD Number in a subject: capture group 1 of `pattern` when it has one, else the match.
pub fn sd_number_in(subject: &str, pattern: &Regex) -> Option<String> {
    let caps = pattern.captures(subject)?;
    caps.get(1)
        .or_else(|| caps.get(0))
        .map(|m| m.as_str().to_string())
        .filter(|s| !s.is_empty())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The parse proper
// ---------------------------------------------------------------------------------------------

fn parse_inner(raw: &[u8], sd_pattern: &Regex, limits: Limits) -> ParsedMail {
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
        let mut mail = fallback(raw, sd_pattern, what.to_string());
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

    // Classification -------------------------------------------------------------------
    let root_type = root_type.map(|(t, s)| (t, s, report_type.map(|r| r.to_ascii_lowercase())));
    let auto = classify(
        &headers,
        &root_type.unwrap_or_default(),
        from.as_ref(),
        return_path.as_deref(),
    );
    let sd_number = sd_number_in(&subject, sd_pattern);

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
        sd_number,
        auto,
        headers,
        return_path,
        message_key,
        problems,
    }
}

/// Longest charset label looked at (IANA's longest are under 50 characters).
const MAX_CHARSET_LABEL: usize = 64;

/// The charset to read raw 8-bit header bytes in: the first 8-bit `charset=` the message
/// declares (near its top), if any.
fn charset_hint(raw: &[u8]) -> Option<HeaderDecoder> {
    let window = &raw[..raw.len().min(256 * 1024)];
    let needle = b"charset=";
    let mut at = 0;
    while at + needle.len() <= window.len() {
        let Some(pos) = find_ascii_ci(&window[at..], needle) else {
            break;
        };
        let start = at + pos + needle.len();
        at = start;
        let rest = &window[start..];
        // Read a label's length at most: `charset=charset=...` must not be read to its end
        // at every match.
        let value: Vec<u8> = match rest.first() {
            Some(b'"') => rest[1..]
                .iter()
                .take(MAX_CHARSET_LABEL + 1)
                .take_while(|&&b| b != b'"' && b != b'\n')
                .copied()
                .collect(),
            _ => rest
                .iter()
                .take(MAX_CHARSET_LABEL + 1)
                .take_while(|&&b| !b.is_ascii_whitespace() && b != b';' && b != b'"' && b != b'>')
                .copied()
                .collect(),
        };
        if value.len() > MAX_CHARSET_LABEL {
            continue;
        }
        let label = String::from_utf8_lossy(&value).trim().to_string();
        let lower = label.to_ascii_lowercase();
        if label.is_empty()
            || is_utf8_name(&label)
            || lower == "us-ascii"
            || lower.starts_with("iso-2022")
            || lower.starts_with("utf-")
        {
            continue;
        }
        if let Some(decoder) = charset_decoder(label.as_bytes()) {
            return Some((label, decoder));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Header blocks
// ---------------------------------------------------------------------------------------------

type HeaderDecoder = (String, fn(&[u8]) -> String);

/// The parsed header block of one MIME entity. `bytes` is the block as parsed (raw 8-bit
/// fields already converted to UTF-8); the headers' offsets point into it.
struct HeaderBlock {
    bytes: Vec<u8>,
    headers: Vec<Header<'static>>,
}

impl HeaderBlock {
    fn get(&self, name: &HeaderName<'_>) -> Option<&Header<'static>> {
        self.headers.iter().find(|h| &h.name == name)
    }

    fn value(&self, name: &HeaderName<'_>) -> Option<&MpValue<'static>> {
        self.get(name).map(|h| &h.value)
    }

    fn raw(&self, h: &Header<'_>) -> &[u8] {
        slice(&self.bytes, h.offset_start as usize, h.offset_end as usize)
    }

    fn content_type(&self) -> Option<&ContentType<'static>> {
        self.value(&HeaderName::ContentType)
            .and_then(|v| v.as_content_type())
    }

    /// `(type, subtype)`, lower case, when a Content-Type is given.
    fn mime(&self) -> Option<(String, String)> {
        self.content_type().map(|ct| {
            (
                ct.ctype().trim().to_ascii_lowercase(),
                ct.subtype().unwrap_or("").trim().to_ascii_lowercase(),
            )
        })
    }

    /// A parameter of Content-Type or Content-Disposition; RFC 2231 forms are decoded here
    /// (mail-parser decodes only the first segment of a continuation in its charset).
    fn param(&self, header: &HeaderName<'_>, name: &str) -> Option<String> {
        let h = self.get(header)?;
        if let Some(v) = rfc2231_param(&String::from_utf8_lossy(self.raw(h)), name) {
            return Some(v);
        }
        h.value
            .as_content_type()
            .and_then(|ct| ct.attribute(name))
            .map(str::to_string)
            .filter(|v| !v.trim().is_empty())
    }

    fn disposition(&self) -> Option<String> {
        self.value(&HeaderName::ContentDisposition)
            .and_then(|v| v.as_content_type())
            .map(|d| d.ctype().trim().to_ascii_lowercase())
    }

    fn text(&self, name: &HeaderName<'_>) -> Option<String> {
        match self.value(name)? {
            MpValue::Text(t) => Some(clean_header_text(t)),
            MpValue::TextList(l) => l.first().map(|t| clean_header_text(t)),
            _ => None,
        }
        .filter(|s| !s.is_empty())
    }

    fn ids(&self, name: &HeaderName<'_>) -> Vec<String> {
        let mut out = Vec::new();
        for h in self.headers.iter().filter(|h| &h.name == name) {
            match &h.value {
                MpValue::Text(t) => out.push(strip_brackets(&clean_header_text(t))),
                MpValue::TextList(l) => {
                    out.extend(l.iter().map(|t| strip_brackets(&clean_header_text(t))))
                }
                _ => {}
            }
        }
        out.retain(|s| !s.is_empty());
        out
    }

    fn addresses(&self, name: &HeaderName<'_>) -> Vec<MailAddress> {
        let mut out = Vec::new();
        let mut push = |addr: &mail_parser::Addr<'_>| {
            let email = clean_header_text(addr.address().unwrap_or(""));
            if email.is_empty() {
                return;
            }
            let name = addr
                .name()
                .map(|n| {
                    clean_header_text(n)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .filter(|n| !n.is_empty());
            out.push(MailAddress { email, name });
        };
        for h in self.headers.iter().filter(|h| &h.name == name) {
            match &h.value {
                MpValue::Address(MpAddress::List(list)) => list.iter().for_each(&mut push),
                MpValue::Address(MpAddress::Group(groups)) => groups
                    .iter()
                    .flat_map(|g| g.addresses.iter())
                    .for_each(&mut push),
                _ => {}
            }
        }
        out
    }
}

/// Where the header block of an entity ends: `(header_end, body_start)`. The block ends at
/// the first blank line, or at the first line that is neither a header field nor a
/// continuation (a part that forgot its blank line keeps its text).
fn header_extent(entity: &[u8]) -> (usize, usize) {
    let mut pos = 0;
    for line in entity.split_inclusive(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            return (pos, pos + line.len());
        }
        let continuation = pos > 0 && matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation && !looks_like_field(line) {
            return (pos, pos);
        }
        pos += line.len();
    }
    (entity.len(), entity.len())
}

fn looks_like_field(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let name = trim_end_ws(&line[..colon]);
    !name.is_empty() && name.len() <= 100 && name.iter().all(|&b| (33..=126).contains(&b))
}

/// Converts one header field to UTF-8 when it is not: raw ISO-2022-JP escapes, or 8-bit
/// bytes read in the message's charset (else Windows-1252).
fn transcode_field<'f, 'h>(
    field: &'f [u8],
    hint: impl FnOnce() -> Option<&'h HeaderDecoder>,
    problems: &mut Problems,
) -> Cow<'f, [u8]> {
    let name = || {
        let n = field
            .iter()
            .position(|&b| b == b':')
            .map(|p| String::from_utf8_lossy(&field[..p]).trim().to_string())
            .unwrap_or_default();
        if n.is_empty() {
            "a header line".to_string()
        } else {
            format!("the {n} header")
        }
    };
    match std::str::from_utf8(field) {
        Ok(s) if !s.contains("\x1b$") && !s.contains("\x1b(") => Cow::Borrowed(field),
        Ok(_) => match charset_decoder(b"iso-2022-jp") {
            Some(decode) => {
                problems.push(format!("{} has raw ISO-2022-JP text", name()));
                Cow::Owned(decode(field).into_bytes())
            }
            None => Cow::Borrowed(field),
        },
        Err(_) => {
            let (label, decoded) = match hint() {
                Some((label, decode)) => (label.as_str(), decode(field)),
                None => ("Windows-1252", windows_1252(field)),
            };
            problems.push(format!("{} has raw 8-bit bytes; read as {label}", name()));
            Cow::Owned(decoded.into_bytes())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Delimiters
// ---------------------------------------------------------------------------------------------

/// One line starting with `--token`.
#[derive(Clone, Copy)]
struct Delimiter {
    line_start: usize,
    next_line: usize,
    close: bool,
}

/// Every delimiter line of every boundary the message declares, found in one pass.
/// Longer `--` lines are not delimiters (RFC 2046 allows 70 characters; some mailers exceed it).
const MAX_BOUNDARY: usize = 200;

struct DelimiterIndex {
    by_boundary: HashMap<Vec<u8>, Vec<Delimiter>>,
}

impl DelimiterIndex {
    /// Every line that starts with `--`, by the boundary it would delimit (a superset of the
    /// real delimiters, which is all the lookups by declared boundary need). Lines are found
    /// with a vectorised search for `\n--`: base64 bodies have none, so this costs little
    /// more than one pass of `memmem` over the message.
    fn build(raw: &[u8]) -> DelimiterIndex {
        let mut by_boundary: HashMap<Vec<u8>, Vec<Delimiter>> = HashMap::new();
        let starts = raw
            .starts_with(b"--")
            .then_some(0)
            .into_iter()
            .chain(memchr::memmem::find_iter(raw, b"\n--").map(|p| p + 1));
        for line_start in starts {
            let next_line =
                memchr::memchr(b'\n', &raw[line_start..]).map_or(raw.len(), |p| line_start + p + 1);
            let token = trim_end_ws(&raw[line_start + 2..next_line]);
            if token.is_empty() {
                continue;
            }
            if token.len() <= MAX_BOUNDARY {
                by_boundary
                    .entry(token.to_vec())
                    .or_default()
                    .push(Delimiter {
                        line_start,
                        next_line,
                        close: false,
                    });
            }
            if let Some(b) = token
                .strip_suffix(b"--")
                .filter(|b| !b.is_empty() && b.len() <= MAX_BOUNDARY)
            {
                by_boundary.entry(b.to_vec()).or_default().push(Delimiter {
                    line_start,
                    next_line,
                    close: true,
                });
            }
        }
        DelimiterIndex { by_boundary }
    }

    /// The delimiters of `boundary` within `start..end`.
    fn within(&self, boundary: &[u8], start: usize, end: usize) -> &[Delimiter] {
        let Some(list) = self.by_boundary.get(boundary) else {
            return &[];
        };
        let from = list.partition_point(|d| d.line_start < start);
        let to = list.partition_point(|d| d.line_start < end);
        &list[from..to.max(from)]
    }
}

/// Where `needle` (lower-case ASCII) first occurs in `hay`, ignoring ASCII case. Jumps between
/// candidates of its first letter with `memchr`: these scans cover every byte of every message.
fn find_ascii_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), &hay[..=last_start])
        .find(|&i| hay[i + 1..i + needle.len()].eq_ignore_ascii_case(rest))
}

// ---------------------------------------------------------------------------------------------
// Walking the MIME tree
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Collected {
    texts: Vec<String>,
    htmls: Vec<String>,
    attachments: Vec<RawAttachment>,
}

struct RawAttachment {
    name: Option<String>,
    content_type: String,
    content_id: Option<String>,
    inline: bool,
    data: Vec<u8>,
}

/// An entity whose header block has been read.
struct Opened {
    block: HeaderBlock,
    body_start: usize,
    end: usize,
    /// IMAP-style part number (`1.2`), empty for the message itself; used in problems.
    path: String,
    /// A part of a `multipart/digest`: `message/rfc822` unless it says otherwise.
    in_digest: bool,
}

impl Opened {
    fn describe(&self) -> String {
        if self.path.is_empty() {
            "the message body".to_string()
        } else {
            format!("MIME part {}", self.path)
        }
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

/// Boundaries we will guess for multiparts that lack one (each guess scans the body).
const MAX_BOUNDARY_GUESSES: usize = 8;

struct Walker<'a> {
    raw: &'a [u8],
    index: &'a DelimiterIndex,
    /// The message's charset for raw 8-bit header bytes, looked for only when a header has
    /// some (most have none, and the search reads up to 256 KB of the message).
    hint: std::cell::OnceCell<Option<HeaderDecoder>>,
    problems: Problems,
    flattened: bool,
    guesses: usize,
    limits: Limits,
    /// Entities opened so far (the message itself included).
    parts: usize,
    /// Decoded bytes collected so far.
    decoded: usize,
    /// A bound was reached: nothing more is collected.
    parts_full: bool,
    bytes_full: bool,
}

impl Walker<'_> {
    /// Reads the header block of the entity `start..end`; returns it and where the body starts.
    fn open(&mut self, start: usize, end: usize) -> (HeaderBlock, usize) {
        let entity = slice(self.raw, start, end);
        let (header_end, body_start) = header_extent(entity);
        let mut bytes = Vec::with_capacity(header_end + 4);
        for field in header_fields(&entity[..header_end]) {
            let (raw, hint) = (self.raw, &self.hint);
            let hint = || hint.get_or_init(|| charset_hint(raw)).as_ref();
            bytes.extend_from_slice(&transcode_field(field, hint, &mut self.problems));
        }
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        bytes.push(b'\n');
        let mut headers = Vec::new();
        MessageStream::new(&bytes).parse_headers(&MessageParser::new(), &mut headers);
        let headers = headers.into_iter().map(Header::into_owned).collect();
        (HeaderBlock { bytes, headers }, start + body_start)
    }

    fn open_child(&mut self, start: usize, end: usize, path: String, in_digest: bool) -> Opened {
        let (block, body_start) = self.open(start, end);
        Opened {
            block,
            body_start,
            end,
            path,
            in_digest,
        }
    }

    /// The effective `(type, subtype)` of an entity (defaults per RFC 2046).
    fn mime(e: &Opened) -> (String, String) {
        e.block.mime().unwrap_or_else(|| {
            if e.in_digest {
                ("message".into(), "rfc822".into())
            } else {
                ("text".into(), "plain".into())
            }
        })
    }

    /// Walks an entity, adding its body text/HTML and attachments to `out`.
    fn walk_opened(
        &mut self,
        e: Opened,
        depth: usize,
        out: &mut Collected,
        force_attachment: bool,
    ) {
        let (ctype, subtype) = Self::mime(&e);
        if ctype != "multipart" {
            self.leaf(&e, &ctype, &subtype, out, force_attachment);
            return;
        }
        let Some(children) = self.split(&e, &subtype) else {
            // No usable structure: keep the body as readable text.
            self.leaf(&e, "text", "plain", out, force_attachment);
            return;
        };
        if depth >= MAX_MIME_DEPTH {
            self.flatten(children, out);
            return;
        }
        match subtype.as_str() {
            "alternative" => {
                let mut subs: Vec<Collected> = Vec::with_capacity(children.len());
                for child in children {
                    let mut sub = Collected::default();
                    self.walk_opened(child, depth + 1, &mut sub, false);
                    subs.push(sub);
                }
                let text_src = subs.iter().position(|s| !s.texts.is_empty());
                let html_src = subs.iter().rposition(|s| !s.htmls.is_empty());
                for (i, sub) in subs.into_iter().enumerate() {
                    if Some(i) == text_src {
                        out.texts.extend(sub.texts);
                    }
                    if Some(i) == html_src {
                        out.htmls.extend(sub.htmls);
                    }
                    out.attachments.extend(sub.attachments);
                }
            }
            "related" => {
                let start = e
                    .block
                    .param(&HeaderName::ContentType, "start")
                    .map(|s| strip_brackets(&s));
                let root = start
                    .and_then(|cid| {
                        children.iter().position(|c| {
                            c.block
                                .text(&HeaderName::ContentId)
                                .is_some_and(|id| strip_brackets(&id) == cid)
                        })
                    })
                    .unwrap_or(0);
                for (i, child) in children.into_iter().enumerate() {
                    self.walk_opened(child, depth + 1, out, i != root);
                }
            }
            _ => {
                for child in children {
                    self.walk_opened(child, depth + 1, out, false);
                }
            }
        }
    }

    /// Collects the leaves below over-deep multiparts without recursion.
    fn flatten(&mut self, children: Vec<Opened>, out: &mut Collected) {
        if !self.flattened {
            self.flattened = true;
            self.problems.push_always([format!(
                "MIME parts are nested more than {MAX_MIME_DEPTH} levels deep; the deeper parts \
                 were collected without their structure"
            )]);
        }
        let mut stack: Vec<Opened> = children;
        stack.reverse();
        while let Some(e) = stack.pop() {
            let (ctype, subtype) = Self::mime(&e);
            if ctype == "multipart" {
                if let Some(mut kids) = self.split(&e, &subtype) {
                    kids.reverse();
                    stack.extend(kids);
                    continue;
                }
                self.leaf(&e, "text", "plain", out, false);
            } else {
                self.leaf(&e, &ctype, &subtype, out, false);
            }
        }
    }

    /// The parts of a multipart entity, or `None` when it has no usable boundary.
    fn split(&mut self, e: &Opened, subtype: &str) -> Option<Vec<Opened>> {
        let index = self.index;
        let declared = e
            .block
            .param(&HeaderName::ContentType, "boundary")
            .filter(|b| !b.is_empty());
        let guessed_list;
        let (boundary, delimiters): (Vec<u8>, &[Delimiter]) = match declared {
            Some(b) => {
                let list = index.within(b.as_bytes(), e.body_start, e.end);
                (b.into_bytes(), list)
            }
            None => {
                let guess = if self.guesses < MAX_BOUNDARY_GUESSES {
                    self.guesses += 1;
                    guess_boundary(slice(self.raw, e.body_start, e.end))
                } else {
                    None
                };
                let Some(b) = guess else {
                    self.problems.push(format!(
                        "{} is multipart/{subtype} without a boundary parameter; kept as text",
                        e.describe()
                    ));
                    return None;
                };
                self.problems.push(format!(
                    "{} is multipart/{subtype} without a boundary parameter; used the \
                     boundary its body uses ({:?})",
                    e.describe(),
                    String::from_utf8_lossy(&b[..b.len().min(80)])
                ));
                guessed_list = scan_delimiters(self.raw, &b, e.body_start, e.end);
                (b, &guessed_list[..])
            }
        };

        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut current: Option<usize> = None;
        let mut closed = false;
        for d in delimiters {
            if let Some(start) = current.take() {
                spans.push((start, content_end(self.raw, start, d.line_start)));
            }
            if d.close {
                closed = true;
                break;
            }
            current = Some(d.next_line);
        }
        if spans.is_empty() && current.is_none() {
            self.problems.push(format!(
                "{} (multipart/{subtype}) has no part delimiters for boundary {:?}; kept as text",
                e.describe(),
                String::from_utf8_lossy(&boundary[..boundary.len().min(80)])
            ));
            return None;
        }
        if let Some(start) = current {
            spans.push((start, e.end.max(start)));
        }
        if !closed {
            self.problems.push(format!(
                "the MIME boundary {:?} is never closed; the message may be truncated",
                String::from_utf8_lossy(&boundary[..boundary.len().min(80)])
            ));
        }
        let room = self.limits.parts.saturating_sub(self.parts);
        if spans.len() > room {
            spans.truncate(room);
            if !self.parts_full {
                self.parts_full = true;
                self.problems.push_always([format!(
                    "the message has more than {} MIME parts; the rest were not collected",
                    self.limits.parts
                )]);
            }
        }
        self.parts += spans.len();
        let in_digest = subtype == "digest";
        let prefix = if e.path.is_empty() {
            String::new()
        } else {
            format!("{}.", e.path)
        };
        Some(
            spans
                .into_iter()
                .enumerate()
                .map(|(i, (s, t))| self.open_child(s, t, format!("{prefix}{}", i + 1), in_digest))
                .collect(),
        )
    }

    fn leaf(
        &mut self,
        e: &Opened,
        ctype: &str,
        subtype: &str,
        out: &mut Collected,
        force_attachment: bool,
    ) {
        if self.bytes_full {
            return;
        }
        let name = e
            .block
            .param(&HeaderName::ContentDisposition, "filename")
            .or_else(|| e.block.param(&HeaderName::ContentType, "name"));
        let disposition = e.block.disposition();
        let is_body_text = !force_attachment
            && disposition.as_deref() != Some("attachment")
            && name.is_none()
            && ctype == "text"
            && (subtype == "plain" || subtype == "html");
        let data = self.body_bytes(e, name.as_deref());

        if is_body_text {
            let mut text = self.text_of(e, &data);
            let param = |p: &str| {
                e.block
                    .param(&HeaderName::ContentType, p)
                    .map(|v| v.trim().to_ascii_lowercase())
            };
            if subtype == "plain" && param("format").as_deref() == Some("flowed") {
                text = unflow(&text, param("delsp").as_deref() == Some("yes"));
            }
            if !self.take_bytes(text.len()) {
                return;
            }
            if subtype == "html" {
                out.htmls.push(text);
            } else {
                out.texts.push(text);
            }
            return;
        }

        let content_type = if subtype.is_empty() {
            ctype.to_string()
        } else {
            format!("{ctype}/{subtype}")
        };
        let content_id = e
            .block
            .text(&HeaderName::ContentId)
            .map(|s| strip_brackets(&s))
            .filter(|s| !s.is_empty());
        let inline = match disposition.as_deref() {
            Some("inline") => true,
            Some(_) => false,
            None => content_id.is_some(),
        };
        if !self.take_bytes(data.len()) {
            return;
        }
        let name = name.or_else(|| {
            if ctype == "message" && (subtype == "rfc822" || subtype == "global") {
                nested_subject(&data).map(|s| format!("{s}.eml"))
            } else {
                None
            }
        });
        out.attachments.push(RawAttachment {
            name,
            content_type,
            content_id,
            inline,
            data,
        });
    }

    /// Counts `len` decoded bytes against [`MAX_DECODED_BYTES`]; false (and nothing more is
    /// collected) when they do not fit.
    fn take_bytes(&mut self, len: usize) -> bool {
        if self.bytes_full {
            return false;
        }
        if len <= self.limits.decoded_bytes.saturating_sub(self.decoded) {
            self.decoded += len;
            return true;
        }
        self.bytes_full = true;
        let limit = self.limits.decoded_bytes;
        let shown = if limit.is_multiple_of(1 << 20) {
            format!("{} MiB", limit >> 20)
        } else {
            format!("{limit} bytes")
        };
        self.problems.push_always([format!(
            "the message's content decodes to more than {shown}; the rest was not collected"
        )]);
        false
    }

    /// The body of a leaf with its transfer encoding undone (leniently when it is damaged).
    fn body_bytes(&mut self, e: &Opened, name: Option<&str>) -> Vec<u8> {
        let body = slice(self.raw, e.body_start, e.end);
        let encoding = e
            .block
            .text(&HeaderName::ContentTransferEncoding)
            .map(|s| s.to_ascii_lowercase());
        let (strict, lenient): (Option<Vec<u8>>, ByteDecoder) = match encoding.as_deref() {
            Some("base64") => (base64_decode(body), lenient_base64),
            Some("quoted-printable") => (quoted_printable_decode(body), lenient_qp),
            _ => return body.to_vec(),
        };
        match strict {
            Some(decoded) => decoded,
            None => {
                let name_note = name
                    .map(|n| {
                        format!(
                            " \"{}\"",
                            clean_header_text(n).chars().take(80).collect::<String>()
                        )
                    })
                    .unwrap_or_default();
                self.problems.push(format!(
                    "{}{name_note} has damaged {} data; decoded what was readable",
                    e.describe(),
                    encoding.as_deref().unwrap_or_default()
                ));
                lenient(body)
            }
        }
    }

    /// A text body in UTF-8, by its declared charset (see [`decode_text`]).
    fn text_of(&mut self, e: &Opened, data: &[u8]) -> String {
        let charset = e
            .block
            .param(&HeaderName::ContentType, "charset")
            .map(|c| c.trim().trim_matches('"').to_string())
            .filter(|c| !c.is_empty());
        let known = charset
            .as_deref()
            .filter(|c| is_utf8_name(c) || charset_decoder(c.as_bytes()).is_some());
        if let (Some(c), None) = (charset.as_deref(), known) {
            self.problems.push(format!(
                "{} has the unknown charset {:?}; read as UTF-8 or Windows-1252",
                e.describe(),
                c.chars().take(40).collect::<String>()
            ));
        }
        decode_text(data, known)
    }
}

type ByteDecoder = fn(&[u8]) -> Vec<u8>;

/// Where a part's content ends: before the line break that precedes its closing delimiter.
fn content_end(raw: &[u8], start: usize, delimiter_line: usize) -> usize {
    let mut end = delimiter_line;
    if end > start && raw.get(end - 1) == Some(&b'\n') {
        end -= 1;
        if end > start && raw.get(end - 1) == Some(&b'\r') {
            end -= 1;
        }
    }
    end.max(start)
}

/// The delimiter lines of `boundary` in `start..end` (for a boundary we had to guess).
fn scan_delimiters(raw: &[u8], boundary: &[u8], start: usize, end: usize) -> Vec<Delimiter> {
    let mut out = Vec::new();
    let mut pos = start;
    for line in slice(raw, start, end).split_inclusive(|&b| b == b'\n') {
        let line_start = pos;
        pos += line.len();
        let Some(token) = line.strip_prefix(b"--").map(trim_end_ws) else {
            continue;
        };
        let close = match token.strip_prefix(boundary) {
            Some(b"") => false,
            Some(b"--") => true,
            _ => continue,
        };
        out.push(Delimiter {
            line_start,
            next_line: pos,
            close,
        });
    }
    out
}

/// The first `--xyz` line of a body that could be a boundary delimiter.
fn guess_boundary(body: &[u8]) -> Option<Vec<u8>> {
    for line in body.split_inclusive(|&b| b == b'\n') {
        let Some(rest) = line.strip_prefix(b"--") else {
            continue;
        };
        let cand = trim_end_ws(rest);
        if cand.is_empty()
            || cand.len() > 200
            || cand.iter().all(|&b| b == b'-')
            || cand.iter().any(|b| !b.is_ascii_graphic())
        {
            continue;
        }
        let cand = cand.strip_suffix(b"--").unwrap_or(cand);
        return Some(cand.to_vec());
    }
    None
}

/// The subject of a forwarded message, cleaned up for use in a file name.
fn nested_subject(data: &[u8]) -> Option<String> {
    let (header_end, _) = header_extent(data);
    let mut bytes = data[..header_end].to_vec();
    bytes.extend_from_slice(b"\n\n");
    let mut headers = Vec::new();
    MessageStream::new(&bytes).parse_headers(&MessageParser::new(), &mut headers);
    let subject = headers
        .iter()
        .find(|h| h.name == HeaderName::Subject)
        .and_then(|h| match &h.value {
            MpValue::Text(t) => Some(t.to_string()),
            _ => None,
        })?;
    let subject: String = subject
        .chars()
        .filter(|&c| c != ':')
        .map(|c| if c == '/' || c == '\\' { '-' } else { c })
        .collect();
    Some(subject.trim().to_string()).filter(|s| !s.is_empty())
}

/// The result when mail-parser could not be used at all: headers we can read by hand, the
/// rest as text, so nothing is lost.
fn fallback(raw: &[u8], sd_pattern: &Regex, problem: String) -> ParsedMail {
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
    let sd_number = sd_number_in(&subject, sd_pattern);
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
        sd_number,
        auto: None,
        headers,
        return_path: None,
        problems: vec![problem],
    }
}

fn strip_brackets(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix('<').unwrap_or(s);
    let s = s.strip_suffix('>').unwrap_or(s);
    s.trim().to_string()
}

fn slice(bytes: &[u8], start: usize, end: usize) -> &[u8] {
    let end = end.min(bytes.len());
    bytes.get(start.min(end)..end).unwrap_or_default()
}

/// CRLF and lone CR become LF, in place and in one pass (bodies are most of every message).
fn normalize_newlines(s: String) -> String {
    if memchr::memchr(b'\r', s.as_bytes()).is_none() {
        return s;
    }
    let mut bytes = s.into_bytes();
    let (mut read, mut write) = (0, 0);
    while let Some(at) = memchr::memchr(b'\r', &bytes[read..]) {
        bytes.copy_within(read..read + at, write);
        write += at;
        bytes[write] = b'\n';
        write += 1;
        read += at + 1;
        if bytes.get(read) == Some(&b'\n') {
            read += 1;
        }
    }
    let rest = bytes.len() - read;
    bytes.copy_within(read.., write);
    bytes.truncate(write + rest);
    // Only ASCII bytes were replaced or dropped: still UTF-8.
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Header text safe to hand to the host: every run of white space that holds a control
/// character (CR, LF, NUL, tab, other C0/C1 controls, U+2028/U+2029) becomes one space, so a
/// value can neither break a line nor carry a NUL; other spaces are kept. Trimmed.
fn clean_header_text(s: &str) -> String {
    let breaks = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !s.contains(breaks) {
        return s.trim().to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    let mut run_breaks = false;
    for c in s.chars() {
        if breaks(c) || c.is_whitespace() {
            run_breaks |= breaks(c);
            run.push(c);
            continue;
        }
        if run_breaks {
            out.push(' ');
        } else {
            out.push_str(&run);
        }
        run.clear();
        run_breaks = false;
        out.push(c);
    }
    if !run_breaks {
        out.push_str(&run);
    }
    out.trim().to_string()
}

/// Decodes one raw header value (folded, possibly RFC 2047-encoded) into a trimmed string
/// without control characters ([`clean_header_text`]).
fn decode_header_bytes(bytes: &[u8]) -> String {
    let with_newline: Cow<'_, [u8]> = if bytes.ends_with(b"\n") {
        Cow::Borrowed(bytes)
    } else {
        let mut v = bytes.to_vec();
        v.push(b'\n');
        Cow::Owned(v)
    };
    match MessageStream::new(&with_newline).parse_unstructured() {
        MpValue::Text(t) => clean_header_text(&t),
        MpValue::TextList(l) => clean_header_text(&l.join(" ")),
        _ => clean_header_text(&String::from_utf8_lossy(bytes)),
    }
}

fn rfc3339(dt: &mail_parser::DateTime) -> Option<String> {
    use chrono::{FixedOffset, NaiveDate, SecondsFormat, TimeZone};
    let offset_secs = i32::from(dt.tz_hour) * 3600 + i32::from(dt.tz_minute) * 60;
    let offset = FixedOffset::east_opt(if dt.tz_before_gmt {
        -offset_secs
    } else {
        offset_secs
    })?;
    let naive =
        NaiveDate::from_ymd_opt(i32::from(dt.year), u32::from(dt.month), u32::from(dt.day))?
            .and_hms_opt(
                u32::from(dt.hour),
                u32::from(dt.minute),
                u32::from(dt.second.min(59)),
            )?;
    if dt.year < 1970 {
        return None;
    }
    let local = offset.from_local_datetime(&naive).single()?;
    Some(local.to_rfc3339_opts(SecondsFormat::Secs, false))
}

fn classify(
    headers: &BTreeMap<String, HeaderField>,
    root_type: &(String, String, Option<String>),
    from: Option<&MailAddress>,
    return_path: Option<&str>,
) -> Option<AutoKind> {
    let value = |name: &str| {
        headers
            .get(name)
            .map(|f| f.first().trim().to_ascii_lowercase())
    };
    let is_report = root_type.0 == "multipart" && root_type.1 == "report";
    let is_mdn = is_report && root_type.2.as_deref() == Some("disposition-notification");

    if is_report && !is_mdn {
        return Some(AutoKind::Bounce);
    }
    if let Some(from) = from {
        let local = from
            .email
            .split('@')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if local == "mailer-daemon" || local == "postmaster" {
            return Some(AutoKind::Bounce);
        }
    }
    if headers.contains_key("x-failed-recipients") {
        return Some(AutoKind::Bounce);
    }

    if is_mdn {
        return Some(AutoKind::AutoReply);
    }
    if let Some(v) = value("auto-submitted") {
        let token = v.split(';').next().unwrap_or("").trim();
        if !token.is_empty() && token != "no" {
            return Some(AutoKind::AutoReply);
        }
    }
    for name in ["x-autoreply", "x-autorespond", "x-autoresponse"] {
        if let Some(v) = value(name) {
            if !matches!(v.as_str(), "no" | "false" | "0" | "off") {
                return Some(AutoKind::AutoReply);
            }
        }
    }
    if let Some(v) = value("precedence") {
        if matches!(
            v.as_str(),
            "bulk" | "junk" | "list" | "auto_reply" | "auto-reply"
        ) {
            return Some(AutoKind::AutoReply);
        }
    }

    if return_path == Some("") {
        return Some(AutoKind::Bounce);
    }
    None
}

/// An RFC 2231 parameter (`name*=charset'lang'%xx`, or `name*0*=`, `name*1=`, ...),
/// decoded; `None` when the header has no RFC 2231 form of `param`.
fn rfc2231_param(header_value: &str, param: &str) -> Option<String> {
    let unfolded: String = header_value
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    let mut segments: Vec<(u32, bool, String)> = Vec::new();
    for p in split_params(&unfolded).into_iter().skip(1) {
        let Some((key, value)) = p.split_once('=') else {
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        let Some(rest) = key.strip_prefix(param).and_then(|r| r.strip_prefix('*')) else {
            continue;
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .map(|v| v.strip_suffix('"').unwrap_or(v))
            .unwrap_or(value)
            .to_string();
        let (index, encoded) = if rest.is_empty() {
            (0, true)
        } else {
            let (num, star) = match rest.strip_suffix('*') {
                Some(num) => (num, true),
                None => (rest, false),
            };
            match num.parse::<u32>() {
                Ok(n) if n < 1000 => (n, star),
                _ => continue,
            }
        };
        segments.push((index, encoded, value));
    }
    if segments.is_empty() {
        return None;
    }
    segments.sort_by_key(|s| s.0);
    segments.dedup_by_key(|s| s.0);
    let mut charset: Option<String> = None;
    let mut bytes: Vec<u8> = Vec::new();
    for (k, (_, encoded, value)) in segments.iter().enumerate() {
        let mut value = value.as_str();
        if k == 0 && *encoded {
            let mut pieces = value.splitn(3, '\'');
            if let (Some(cs), Some(_lang), Some(rest)) =
                (pieces.next(), pieces.next(), pieces.next())
            {
                charset = Some(cs.trim().to_string()).filter(|c| !c.is_empty());
                value = rest;
            }
        }
        if *encoded {
            bytes.extend(percent_decode(value));
        } else {
            bytes.extend_from_slice(value.as_bytes());
        }
    }
    let known = charset
        .as_deref()
        .filter(|c| is_utf8_name(c) || charset_decoder(c.as_bytes()).is_some());
    Some(decode_text(&bytes, known)).filter(|s| !s.trim().is_empty())
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Joins the soft line breaks of `format=flowed` text (RFC 3676): a line ending in a space
/// continues on the next line of the same quote depth; space-stuffing is undone.
fn unflow(text: &str, delsp: bool) -> String {
    let text = normalize_newlines(text.to_string());
    let (body, final_newline) = match text.strip_suffix('\n') {
        Some(b) => (b, true),
        None => (text.as_str(), false),
    };
    let mut out = String::with_capacity(text.len());
    let mut para = String::new();
    let mut para_depth: Option<usize> = None;
    let flush = |out: &mut String, para: &mut String, depth: usize| {
        if depth > 0 {
            out.push_str(&">".repeat(depth));
            out.push(' ');
        }
        out.push_str(para);
        out.push('\n');
        para.clear();
    };
    for line in body.split('\n') {
        let depth = line.bytes().take_while(|&b| b == b'>').count();
        let mut content = &line[depth..];
        if let Some(unstuffed) = content.strip_prefix(' ') {
            content = unstuffed;
        }
        if let Some(d) = para_depth.filter(|&d| d != depth) {
            flush(&mut out, &mut para, d);
        }
        let is_signature = content == "-- ";
        let flowed = content.ends_with(' ') && !is_signature;
        para.push_str(if flowed && delsp {
            &content[..content.len() - 1]
        } else {
            content
        });
        if flowed {
            para_depth = Some(depth);
        } else {
            flush(&mut out, &mut para, depth);
            para_depth = None;
        }
    }
    if let Some(d) = para_depth {
        flush(&mut out, &mut para, d);
    }
    if !final_newline {
        out.pop();
    }
    out
}

fn is_utf8_name(charset: &str) -> bool {
    let c = charset.to_ascii_lowercase();
    matches!(
        c.as_str(),
        "utf-8" | "utf8" | "unicode-1-1-utf-8" | "x-unicode20utf8"
    )
}

/// Decodes body bytes: in `charset` when known; otherwise as UTF-8 when valid, else
/// Windows-1252. Declared UTF-8 stays UTF-8 with U+FFFD for the bad bytes.
fn decode_text(bytes: &[u8], charset: Option<&str>) -> String {
    if let Some(c) = charset {
        if is_utf8_name(c) {
            // Valid UTF-8 (nearly always) is checked by the fast validator, not char by char.
            return match std::str::from_utf8(bytes) {
                Ok(s) => s.to_owned(),
                Err(_) => String::from_utf8_lossy(bytes).into_owned(),
            };
        }
        if let Some(decoder) = charset_decoder(c.as_bytes()) {
            return decoder(bytes);
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => windows_1252(bytes),
    }
}

fn windows_1252(bytes: &[u8]) -> String {
    match charset_decoder(b"windows-1252") {
        Some(decoder) => decoder(bytes),
        None => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Decodes base64, skipping anything outside the alphabet (line noise, stray characters).
fn lenient_base64(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &c in input {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Decodes quoted-printable, keeping malformed `=` sequences as they are.
fn lenient_qp(input: &[u8]) -> Vec<u8> {
    fn hexval(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'A'..=b'F' => Some(c - b'A' + 10),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let c = input[i];
        if c == b'=' {
            match (input.get(i + 1), input.get(i + 2)) {
                (Some(b'\r'), Some(b'\n')) => {
                    i += 3;
                    continue;
                }
                (Some(b'\n'), _) => {
                    i += 2;
                    continue;
                }
                (Some(&a), Some(&b)) => {
                    if let (Some(h), Some(l)) = (hexval(a), hexval(b)) {
                        out.push(h << 4 | l);
                        i += 3;
                        continue;
                    }
                }
                (None, _) => {
                    // A soft line break cut off at the end of the data.
                    break;
                }
                _ => {}
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Splits raw bytes into the header block and the body (after the first blank line).
fn split_head_body(raw: &[u8]) -> (&[u8], &[u8]) {
    let mut pos = 0;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) && line.ends_with(b"\n") {
            return (&raw[..pos], &raw[pos + line.len()..]);
        }
        pos += line.len();
    }
    (raw, &[])
}

/// The fields of a header block (each with its continuation lines).
fn header_fields(head: &[u8]) -> Vec<&[u8]> {
    let mut fields: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0;
    for line in head.split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        match fields.last_mut() {
            Some(last) if continuation => last.1 = pos + line.len(),
            _ => fields.push((pos, pos + line.len())),
        }
        pos += line.len();
    }
    fields.into_iter().map(|(a, b)| &head[a..b]).collect()
}

fn trim_end_ws(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && b[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    &b[..end]
}

fn split_params(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => {
                cur.push(c);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ';' if !quoted => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

// ---------------------------------------------------------------------------------------------
// Attachment names
// ---------------------------------------------------------------------------------------------

fn finish_attachments(raw: Vec<RawAttachment>) -> Vec<Attachment> {
    let mut names = UniqueNames::default();
    let mut out = Vec::with_capacity(raw.len());
    for (i, a) in raw.into_iter().enumerate() {
        let content_type = clean_header_text(&a.content_type);
        let base = a
            .name
            .as_deref()
            .and_then(sanitize_filename)
            .unwrap_or_else(|| generated_name(&content_type, i + 1));
        let filename = names.claim(&base);
        out.push(Attachment {
            filename,
            size: a.data.len(),
            content_type,
            content_id: a.content_id,
            inline: a.inline,
            data: a.data,
        });
    }
    out
}

fn generated_name(content_type: &str, n: usize) -> String {
    match content_type {
        "text/calendar" | "application/ics" => "invite.ics".into(),
        "message/rfc822" | "message/global" => "forwarded-message.eml".into(),
        "message/delivery-status" | "message/global-delivery-status" => {
            "delivery-status.txt".into()
        }
        "message/disposition-notification" => "disposition-notification.txt".into(),
        "text/rfc822-headers" | "message/global-headers" => "original-headers.txt".into(),
        _ => format!("attachment-{n}.{}", extension_for(content_type)),
    }
}

/// A file extension for a content type (`bin` when unknown).
pub fn extension_for(content_type: &str) -> &'static str {
    match content_type {
        "text/plain" => "txt",
        "text/html" => "html",
        "text/csv" => "csv",
        "text/calendar" | "application/ics" => "ics",
        "text/xml" | "application/xml" => "xml",
        "text/vcard" | "text/x-vcard" => "vcf",
        "application/json" => "json",
        "application/pdf" => "pdf",
        "application/zip" | "application/x-zip-compressed" => "zip",
        "application/gzip" | "application/x-gzip" => "gz",
        "application/msword" => "doc",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => "docx",
        "application/vnd.ms-excel" => "xls",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" => "xlsx",
        "application/vnd.ms-powerpoint" => "ppt",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation" => "pptx",
        "application/vnd.ms-outlook" => "msg",
        "application/ms-tnef" | "application/vnd.ms-tnef" => "dat",
        "application/pkcs7-signature" | "application/x-pkcs7-signature" => "p7s",
        "application/pkcs7-mime" | "application/x-pkcs7-mime" => "p7m",
        "application/pgp-signature" => "asc",
        "message/rfc822" | "message/global" => "eml",
        "image/png" => "png",
        "image/jpeg" | "image/jpg" | "image/pjpeg" => "jpg",
        "image/gif" => "gif",
        "image/bmp" => "bmp",
        "image/webp" => "webp",
        "image/tiff" => "tif",
        "image/svg+xml" => "svg",
        "image/heic" => "heic",
        "audio/mpeg" => "mp3",
        "audio/wav" | "audio/x-wav" => "wav",
        "video/mp4" => "mp4",
        "video/quicktime" => "mov",
        _ => "bin",
    }
}

/// Makes an attachment name safe to use as a file name: keeps the last path component,
/// drops control and bidi-override characters, replaces characters Windows forbids, strips
/// leading/trailing dots and spaces (no hidden files, no `..`), avoids Windows device names
/// and bounds the length (keeping the extension). `None` when nothing usable is left.
pub fn sanitize_filename(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut cleaned = String::with_capacity(base.len());
    let mut last_space = false;
    for c in base.chars() {
        if matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{FFFD}')
        {
            continue;
        }
        let c = match c {
            '<' | '>' | ':' | '"' | '|' | '?' | '*' => '_',
            c if c.is_whitespace() || c.is_control() => ' ',
            c => c,
        };
        if c == ' ' {
            if last_space {
                continue;
            }
            last_space = true;
        } else {
            last_space = false;
        }
        cleaned.push(c);
    }
    let trimmed = cleaned.trim_matches(|c| c == ' ' || c == '.');
    if trimmed.is_empty() {
        return None;
    }
    let mut name = trimmed.to_string();
    let stem_upper = name
        .split('.')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_uppercase();
    let reserved = matches!(stem_upper.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((stem_upper.starts_with("COM") || stem_upper.starts_with("LPT"))
            && stem_upper.len() == 4
            && stem_upper.as_bytes()[3].is_ascii_digit());
    if reserved {
        name.insert(0, '_');
    }
    if name.len() > MAX_FILENAME_BYTES {
        let (stem, ext) = split_ext(&name);
        let ext = if ext.len() <= MAX_EXTENSION_BYTES {
            ext
        } else {
            ""
        };
        let keep = MAX_FILENAME_BYTES - ext.len();
        let stem = truncate_bytes(stem, keep).trim_end_matches([' ', '.']);
        name = format!("{stem}{ext}");
    }
    Some(name)
}

/// Splits `report.final.pdf` into (`report.final`, `.pdf`).
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(pos) if pos > 0 => name.split_at(pos),
        _ => (name, ""),
    }
}

fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The attachment names given in one message, compared ignoring case.
#[derive(Default)]
struct UniqueNames {
    /// Every name given, lower case.
    given: HashSet<String>,
    /// The next number to try for each numbered form (`report-{n}.pdf`), by its lower-case
    /// stem and extension. Numbers only go up, so each numbered name is tried at most once:
    /// naming stays linear in the number of attachments.
    next: HashMap<(String, String), usize>,
}

impl UniqueNames {
    /// `base` when no attachment has that name yet, else the first free numbered form
    /// (`a.pdf`, `a-2.pdf`, `a-3.pdf`). Real parts named like numbered forms are never
    /// collided with: a taken number is skipped. At [`MAX_FILENAME_BYTES`] the number replaces
    /// the end of the stem.
    fn claim(&mut self, base: &str) -> String {
        if self.given.insert(base.to_lowercase()) {
            return base.to_string();
        }
        let (stem, ext) = match split_ext(base) {
            (stem, ext) if ext.len() <= MAX_EXTENSION_BYTES => (stem, ext),
            _ => (base, ""),
        };
        let mut n: usize = 2;
        loop {
            // Numbers of one width share a (possibly shortened) stem, and so a counter.
            let width = n.to_string().len();
            let room = MAX_FILENAME_BYTES.saturating_sub(1 + width + ext.len());
            let stem = truncate_bytes(stem, room);
            let key = (stem.to_lowercase(), ext.to_lowercase());
            let next = self.next.entry(key).or_insert(2);
            if *next > n {
                n = *next;
                if n.to_string().len() != width {
                    continue;
                }
            }
            let first_of_next_width = u32::try_from(width)
                .ok()
                .and_then(|w| 10usize.checked_pow(w))
                .unwrap_or(usize::MAX);
            while n < first_of_next_width {
                let candidate = format!("{stem}-{n}{ext}");
                n += 1;
                if self.given.insert(candidate.to_lowercase()) {
                    *next = n;
                    return candidate;
                }
            }
            *next = n;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTML to text
// ---------------------------------------------------------------------------------------------

/// Plain text from an HTML body, for mail that has no text part: block elements become line
/// breaks, list items get `- `, links keep their URL, entities are decoded, `<head>`,
/// `<style>` and `<script>` are dropped.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut skip_until: Option<&'static str> = None;
    let mut pending_href: Vec<Option<String>> = Vec::new();
    let mut link_text_start: Vec<usize> = Vec::new();
    let mut pre = 0usize;
    let mut light_p = false;
    let bytes = html.as_bytes();
    let mut i = 0;
    let mut text_start = 0;

    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        // Flush text before the tag.
        if skip_until.is_none() {
            push_text(&mut out, &html[text_start..i], pre > 0);
        }
        // Comments and declarations.
        if html[i..].starts_with("<!--") {
            i = html[i + 4..]
                .find("-->")
                .map_or(bytes.len(), |p| i + 4 + p + 3);
            text_start = i;
            continue;
        }
        let Some(end) = tag_end(bytes, i + 1) else {
            // A stray '<' that never closes: treat the rest as text.
            if skip_until.is_none() {
                push_text(&mut out, &html[i..], pre > 0);
            }
            text_start = bytes.len();
            break;
        };
        let tag = &html[i + 1..end];
        i = end + 1;
        text_start = i;
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(until) = skip_until {
            if closing && name == until {
                skip_until = None;
            }
            continue;
        }
        match name.as_str() {
            "head" | "style" | "script" | "title" | "template" if !closing => {
                skip_until = Some(match name.as_str() {
                    "head" => "head",
                    "style" => "style",
                    "script" => "script",
                    "title" => "title",
                    _ => "template",
                });
            }
            "br" => newline(&mut out, 1),
            "p" | "div" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "table" | "tr" | "ul"
            | "ol" | "blockquote" | "section" | "article" | "header" | "footer" | "address"
            | "dl" | "dt" | "dd" | "center" | "form" | "fieldset" => {
                // Outlook writes every line as a margin-less `<p class=MsoNormal>`.
                if name == "p" && !closing {
                    light_p = tag.to_ascii_lowercase().contains("msonormal");
                }
                let heavy = matches!(name.as_str(), "p" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6")
                    && !(name == "p" && light_p);
                newline(&mut out, if heavy { 2 } else { 1 });
            }
            "pre" => {
                newline(&mut out, 1);
                if closing {
                    pre = pre.saturating_sub(1);
                } else {
                    pre += 1;
                }
            }
            "hr" => {
                newline(&mut out, 1);
                out.push_str("----");
                newline(&mut out, 1);
            }
            "li" if !closing => {
                newline(&mut out, 1);
                out.push_str("- ");
            }
            "li" => newline(&mut out, 1),
            "td" | "th" if !closing && !out.ends_with('\n') && !out.is_empty() => {
                out.push('\t');
            }
            "a" if closing => {
                let href = pending_href.pop().flatten();
                let start = link_text_start.pop().unwrap_or(out.len());
                if let Some(href) = href.filter(|_| out.len().saturating_sub(start) <= 4096) {
                    let shown = out.get(start..).unwrap_or("").trim().to_string();
                    let web = href.starts_with("http://") || href.starts_with("https://");
                    if web && shown != href && !shown.contains(href.as_str()) {
                        out.push_str(&format!(" <{href}>"));
                    }
                }
            }
            // Bounded: a page of unclosed links must not make this quadratic.
            "a" if !closing && pending_href.len() < 64 => {
                pending_href.push(attribute(tag, "href"));
                link_text_start.push(out.len());
            }
            _ => {}
        }
    }
    if skip_until.is_none() && text_start < bytes.len() {
        push_text(&mut out, &html[text_start..], pre > 0);
    }
    tidy_lines(&out)
}

/// Index of the `>` closing a tag that starts at `from` (quotes respected).
fn tag_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut quote: Option<u8> = None;
    for (j, &b) in bytes.iter().enumerate().skip(from) {
        match (quote, b) {
            (Some(q), b) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(b),
            (None, b'>') => return Some(j),
            _ => {}
        }
    }
    None
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut search = 0;
    while let Some(pos) = lower[search..].find(name) {
        let at = search + pos;
        search = at + name.len();
        let before_ok = at == 0 || lower.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = lower[search..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value_start = tag.len() - rest.len() + 1;
        let value = tag[value_start..].trim_start();
        let v = match value.chars().next() {
            Some(q @ ('"' | '\'')) => value[1..].split(q).next().unwrap_or(""),
            _ => value
                .split(|c: char| c.is_whitespace() || c == '>')
                .next()
                .unwrap_or(""),
        };
        return Some(decode_entities(v).trim().to_string());
    }
    None
}

fn push_text(out: &mut String, raw: &str, pre: bool) {
    let text = decode_entities(raw);
    if pre {
        out.push_str(&text);
        return;
    }
    for (k, word) in text
        .split(|c: char| c.is_whitespace() && c != '\u{A0}')
        .enumerate()
    {
        if k > 0 && !out.is_empty() && !out.ends_with([' ', '\n', '\t']) {
            out.push(' ');
        }
        // Non-breaking spaces stay until `tidy_lines`, so a `&nbsp;`-only line survives
        // `newline` (which drops trailing spaces) and becomes a blank line.
        out.push_str(word);
    }
}

fn newline(out: &mut String, count: usize) {
    if out.is_empty() {
        return;
    }
    while out.ends_with(' ') || out.ends_with('\t') {
        out.pop();
    }
    // Only the last `count` characters matter: after a `<pre>` of many blank lines, every
    // `<br>` must not count them all again.
    let have = out
        .chars()
        .rev()
        .take(count)
        .take_while(|&c| c == '\n')
        .count();
    for _ in have..count {
        out.push('\n');
    }
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let end = after
            .char_indices()
            .take(34)
            .skip(1)
            .find(|&(_, c)| c == ';' || c == '&' || c.is_whitespace())
            .filter(|&(_, c)| c == ';')
            .map(|(k, _)| k);
        match end {
            Some(end) if end > 1 => {
                add_html_token(&mut out, &after.as_bytes()[..=end], false);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn tidy_lines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank_run = 0;
    for line in s.split('\n') {
        let line = line.trim_end().replace('\u{A0}', " ");
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_SD_NUMBER_PATTERN;
    use std::time::{Duration, Instant};

    fn pattern() -> Regex {
        Regex::new(DEFAULT_SD_NUMBER_PATTERN).unwrap()
    }

    fn p(raw: &str) -> ParsedMail {
        parse(raw.as_bytes(), &pattern())
    }

    #[test]
    fn newlines_become_lf_in_one_pass() {
        let n = |s: &str| normalize_newlines(s.to_string());
        assert_eq!(n("a\r\nb\rc\nd\r"), "a\nb\nc\nd\n");
        assert_eq!(n("\r\r\n\n"), "\n\n\n");
        assert_eq!(n("Grüße\r\n日本\r"), "Grüße\n日本\n");
        assert_eq!(n("no breaks"), "no breaks");
        assert_eq!(n(""), "");
    }

    #[test]
    fn the_case_blind_search_finds_the_first_match_in_any_case() {
        assert_eq!(
            find_ascii_ci(b"xx Charset=a charset=b", b"charset="),
            Some(3)
        );
        assert_eq!(find_ascii_ci(b"CHARSET=", b"charset="), Some(0));
        assert_eq!(find_ascii_ci(b"cccharset", b"charset"), Some(2));
        assert_eq!(find_ascii_ci(b"charse", b"charset"), None);
        assert_eq!(find_ascii_ci(b"", b"charset"), None);
        assert_eq!(find_ascii_ci(b"no match here, c", b"charset"), None);
    }

    fn pb(raw: &[u8]) -> ParsedMail {
        parse(raw, &pattern())
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
        assert_eq!(m.auto, None);
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
            "sd_number",
            "auto",
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
    fn message_ids_lose_their_brackets() {
        let m = p(
            "From: a@b.c\r\nMessage-ID: <x1@h>\r\nIn-Reply-To: <x0@h> <y0@h>\r\n\
                   References: <r1@h>\r\n <r2@h>\r\n\r\nhi\r\n",
        );
        assert_eq!(m.message_id.as_deref(), Some("x1@h"));
        assert_eq!(m.in_reply_to.as_deref(), Some("x0@h"));
        assert_eq!(m.references, vec!["r1@h".to_string(), "r2@h".to_string()]);
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
    fn rfc2047_subjects_in_many_charsets() {
        let cases: [(&str, &str); 8] = [
            ("=?ISO-8859-1?Q?Caf=E9?=", "Café"),
            ("=?iso-8859-2?Q?Zg=B3oszenie?=", "Zgłoszenie"),
            ("=?windows-1251?B?z/Do4uXy?=", "Привет"),
            ("=?KOI8-R?B?8NLJ18XU?=", "Привет"),
            ("=?GB2312?B?xOO6ww==?=", "你好"),
            ("=?Big5?B?p0Gmbg==?=", "你好"),
            ("=?Shift_JIS?B?g2WDWINn?=", "テスト"),
            ("=?ISO-2022-JP?B?GyRCJUYlOSVIGyhC?=", "テスト"),
        ];
        for (encoded, expected) in cases {
            let m = p(&format!("From: a@b.c\r\nSubject: {encoded}\r\n\r\nx\r\n"));
            assert_eq!(m.subject, expected, "{encoded}");
        }
    }

    #[test]
    fn body_charsets_and_fallbacks() {
        let euc = b"From: a@b.c\r\nContent-Type: text/plain; charset=EUC-JP\r\n\r\n\xa5\xc6\xa5\xb9\xa5\xc8\r\n";
        assert_eq!(pb(euc).text, "テスト\n");
        // No charset and not UTF-8: Windows-1252.
        let legacy = b"From: a@b.c\r\n\r\n31\xb0C \x96 \x80 5\r\n";
        assert_eq!(pb(legacy).text, "31°C – € 5\n");
        // Declared UTF-8 but a bad byte: replaced, never fatal.
        let bad = b"From: a@b.c\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nok \xff ok\r\n";
        assert_eq!(pb(bad).text, "ok \u{FFFD} ok\n");
        assert_eq!(decode_text(b"\xe9t\xe9", None), "été");
        assert_eq!(decode_text("été".as_bytes(), None), "été");
        assert_eq!(decode_text(b"\xbf\xe0", Some("iso-8859-5")), "Пр");
    }

    #[test]
    fn raw_8bit_headers() {
        let latin1 = b"From: J\xfcrgen <j@x.de>\r\nSubject: B\xfcro\r\n\r\nx\r\n";
        let m = pb(latin1);
        assert_eq!(m.subject, "Büro");
        assert_eq!(m.from.unwrap().name.as_deref(), Some("Jürgen"));
        assert!(m.problems.iter().any(|p| p.contains("Windows-1252")));
        let utf8 = "From: Jürgen <j@x.de>\r\nSubject: Büro\r\n\r\nx\r\n";
        let m = p(utf8);
        assert_eq!(m.subject, "Büro");
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        // The declared charset is the better guess for raw header bytes.
        let sjis = b"From: a@b.c\r\nSubject: \x83e\x83X\x83g\r\nContent-Type: text/plain; charset=Shift_JIS\r\n\r\nx\r\n";
        assert_eq!(pb(sjis).subject, "テスト");
    }

    fn auto_of(headers: &str) -> Option<AutoKind> {
        p(&format!("{headers}Subject: s\r\n\r\nbody\r\n")).auto
    }

    #[test]
    fn auto_reply_and_bounce_classification() {
        let human = "From: Ann <ann@example.edu>\r\n";
        assert_eq!(auto_of(human), None);
        assert_eq!(auto_of(&format!("{human}Auto-Submitted: no\r\n")), None);
        assert_eq!(
            auto_of(&format!(
                "{human}Auto-Submitted: auto-replied (vacation)\r\n"
            )),
            Some(AutoKind::AutoReply)
        );
        assert_eq!(
            auto_of(&format!("{human}Auto-Submitted: auto-generated\r\n")),
            Some(AutoKind::AutoReply)
        );
        assert_eq!(
            auto_of(&format!("{human}X-Autoreply: yes\r\n")),
            Some(AutoKind::AutoReply)
        );
        assert_eq!(
            auto_of(&format!("{human}X-Autorespond: hi\r\n")),
            Some(AutoKind::AutoReply)
        );
        for prec in ["bulk", "junk", "list", "Bulk"] {
            assert_eq!(
                auto_of(&format!("{human}Precedence: {prec}\r\n")),
                Some(AutoKind::AutoReply),
                "{prec}"
            );
        }
        assert_eq!(
            auto_of(&format!("{human}Precedence: first-class\r\n")),
            None
        );
        // Outlook puts this on ordinary mail: it must not hide a real request.
        assert_eq!(
            auto_of(&format!("{human}X-Auto-Response-Suppress: All\r\n")),
            None
        );
        assert_eq!(
            auto_of("From: MAILER-DAEMON@mx.example.edu (Mail Delivery System)\r\n"),
            Some(AutoKind::Bounce)
        );
        assert_eq!(
            auto_of("From: postmaster@example.edu\r\n"),
            Some(AutoKind::Bounce)
        );
        assert_eq!(
            auto_of(&format!("{human}X-Failed-Recipients: x@y.z\r\n")),
            Some(AutoKind::Bounce)
        );
        assert_eq!(
            auto_of(&format!("Return-Path: <>\r\n{human}")),
            Some(AutoKind::Bounce)
        );
        // An out-of-office reply from a null sender is an auto-reply, not a bounce.
        assert_eq!(
            auto_of(&format!(
                "Return-Path: <>\r\n{human}Auto-Submitted: auto-replied\r\n"
            )),
            Some(AutoKind::AutoReply)
        );
        let dsn = format!(
            "{human}Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n"
        );
        assert_eq!(auto_of(&dsn), Some(AutoKind::Bounce));
        let mdn = format!(
            "{human}Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n"
        );
        assert_eq!(auto_of(&mdn), Some(AutoKind::AutoReply));
        assert_eq!(AutoKind::Bounce.as_str(), "bounce");
        assert_eq!(
            serde_json::to_value(AutoKind::AutoReply).unwrap(),
            serde_json::json!("auto-reply")
        );
    }

    #[test]
    fn sd_number_from_subject() {
        let re = pattern();
        assert_eq!(
            sd_number_in("RE: [SO201700043] Phone", &re).as_deref(),
            Some("SO201700043")
        );
        assert_eq!(sd_number_in("RE: IQ00012", &re).as_deref(), Some("IQ00012"));
        assert_eq!(
            sd_number_in("Fwd: SR2024011212345 and IQ00012", &re).as_deref(),
            Some("SR2024011212345")
        );
        assert_eq!(sd_number_in("Order SO2017 and IQ0001", &re), None);
        assert_eq!(sd_number_in("ABCSO201700043", &re), None);
        assert_eq!(sd_number_in("", &re), None);
        // A custom pattern with a capture group gives the group.
        let custom = Regex::new(r"Ticket #(\d+)").unwrap();
        assert_eq!(
            sd_number_in("Re: Ticket #4711 done", &custom).as_deref(),
            Some("4711")
        );
        assert_eq!(
            p("From: a@b.c\r\nSubject: Re: [IQ00031] x\r\n\r\n.\r\n")
                .sd_number
                .as_deref(),
            Some("IQ00031")
        );
    }

    #[test]
    fn filenames_are_sanitised() {
        let cases: [(&str, Option<&str>); 14] = [
            ("report.pdf", Some("report.pdf")),
            ("../../etc/passwd", Some("passwd")),
            ("..\\..\\boot.ini", Some("boot.ini")),
            ("C:\\Users\\x\\a.doc", Some("a.doc")),
            ("..", None),
            ("...", None),
            ("", None),
            ("   ", None),
            (".htaccess", Some("htaccess")),
            ("a\u{0}b\tc\nd.txt", Some("a b c d.txt")),
            ("invoice\u{202E}fdp.exe", Some("invoicefdp.exe")),
            ("what?<now>|*\".txt", Some("what__now____.txt")),
            ("CON.txt", Some("_CON.txt")),
            ("lpt1", Some("_lpt1")),
        ];
        for (input, expected) in cases {
            assert_eq!(sanitize_filename(input).as_deref(), expected, "{input:?}");
        }
        let long = format!("{}.pdf", "é".repeat(300));
        let cut = sanitize_filename(&long).unwrap();
        assert!(cut.len() <= MAX_FILENAME_BYTES, "{}", cut.len());
        assert!(cut.ends_with("é.pdf"));
        for name in ["a/b", "x\\y", "../z"] {
            let s = sanitize_filename(name).unwrap();
            assert!(
                !s.contains('/') && !s.contains('\\') && !s.contains(".."),
                "{s}"
            );
        }
    }

    #[test]
    fn attachment_names_are_unique_and_generated() {
        let mut names = UniqueNames::default();
        assert_eq!(names.claim("a.txt"), "a.txt");
        assert_eq!(names.claim("A.TXT"), "A-2.TXT");
        assert_eq!(names.claim("a.txt"), "a-3.txt");
        assert_eq!(names.claim("a-4.txt"), "a-4.txt");
        assert_eq!(names.claim("a.txt"), "a-5.txt");
        assert_eq!(names.claim("a-4.txt"), "a-4-2.txt");
        assert_eq!(names.claim("noext"), "noext");
        assert_eq!(names.claim("noext"), "noext-2");
        // From -9 to -10 the number is one byte longer: at the length bound the stem gives
        // way, and the name stays unique and within the bound.
        let long = format!("{}.pdf", "é".repeat(88));
        let mut got = HashSet::new();
        for _ in 0..12 {
            let name = names.claim(&long);
            assert!(name.len() <= MAX_FILENAME_BYTES, "{name}");
            assert!(name.ends_with(".pdf"), "{name}");
            assert!(got.insert(name));
        }
        assert!(got.iter().any(|n| n.ends_with("é-9.pdf")), "{got:?}");
        assert!(got.iter().any(|n| n.ends_with("-11.pdf")), "{got:?}");
        assert_eq!(generated_name("application/pdf", 4), "attachment-4.pdf");
        assert_eq!(generated_name("text/calendar", 1), "invite.ics");
        assert_eq!(
            generated_name("application/x-whatever", 2),
            "attachment-2.bin"
        );
    }

    #[test]
    fn rfc2231_parameters() {
        let v = "attachment;\r\n filename*0*=iso-8859-1''b%E2t;\r\n filename*1*=%E9.txt";
        assert_eq!(rfc2231_param(v, "filename").as_deref(), Some("bâté.txt"));
        let v = "attachment; filename*=UTF-8''%E2%82%AC%20rates.pdf";
        assert_eq!(rfc2231_param(v, "filename").as_deref(), Some("€ rates.pdf"));
        let v = "attachment; filename*0=\"long-\"; filename*1=\"name.txt\"";
        assert_eq!(
            rfc2231_param(v, "filename").as_deref(),
            Some("long-name.txt")
        );
        assert_eq!(
            rfc2231_param("attachment; filename=\"plain.txt\"", "filename"),
            None
        );
        // A multi-byte character split across two segments survives.
        let v = "attachment; filename*0*=utf-8''%C3; filename*1*=%A9.txt";
        assert_eq!(rfc2231_param(v, "filename").as_deref(), Some("é.txt"));
    }

    #[test]
    fn lenient_decoders() {
        assert_eq!(lenient_base64(b"SGVs\r\nbG8=\r\n"), b"Hello");
        assert_eq!(lenient_base64(b"SG!!Vs*bG8"), b"Hello");
        assert_eq!(lenient_qp(b"caf=C3=A9 =\r\nok"), "café ok".as_bytes());
        assert_eq!(lenient_qp(b"a=ZZb"), b"a=ZZb");
        assert_eq!(lenient_qp(b"cut="), b"cut");
    }

    #[test]
    fn html_is_turned_into_readable_text() {
        let html = "<html><head><title>T</title><style>p{x:y}</style></head><body>\
                    <p>Hello&nbsp;there,</p><div>line&amp;two</div>\
                    <ul><li>one</li><li>two</li></ul>\
                    <p>See <a href=\"https://x.example/a?b=1&amp;c=2\">this</a>.</p>\
                    <script>alert(1)</script><!-- hidden --><br>end &#8212; &euro;5</body></html>";
        assert_eq!(
            html_to_text(html),
            "Hello there,\n\nline&two\n- one\n- two\n\nSee this <https://x.example/a?b=1&c=2>.\n\nend — €5"
        );
        assert_eq!(html_to_text("a < b and c"), "a < b and c");
        let outlook = "<p class=MsoNormal>Thanks,<o:p></o:p></p><p class=MsoNormal>John<o:p></o:p></p>\
                       <p class=MsoNormal><o:p>&nbsp;</o:p></p><p class=MsoNormal>PS<o:p></o:p></p>";
        assert_eq!(html_to_text(outlook), "Thanks,\nJohn\n\nPS");
        assert_eq!(html_to_text("<pre>  keep\n  this</pre>"), "keep\n  this");
        let m = p("From: a@b.c\r\nContent-Type: text/html\r\n\r\n<p>Only&nbsp;HTML</p>\r\n");
        assert_eq!(m.text, "Only HTML");
        assert_eq!(m.html.as_deref(), Some("<p>Only&nbsp;HTML</p>\n"));
    }

    #[test]
    fn format_flowed_is_unwrapped() {
        assert_eq!(
            unflow("one \ntwo\n\n> a \n> b\n-- \nsig\n", false),
            "one two\n\n> a b\n-- \nsig\n"
        );
        assert_eq!(unflow("ab \ncd", true), "abcd");
        assert_eq!(unflow(" From stuffed\n", false), "From stuffed\n");
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

    fn nested_multipart(depth: usize) -> String {
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
    fn deep_nesting_loses_nothing_and_stays_fast() {
        let start = Instant::now();
        let m = p(&nested_multipart(MAX_MIME_DEPTH * 3));
        assert_eq!(m.text, "deepest text");
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].filename, "x.pdf");
        assert_eq!(m.attachments[0].data, b"%PDF-");
        assert!(
            m.problems.iter().any(|p| p.contains("nested more than")),
            "{:?}",
            m.problems
        );

        // Thousands of levels, and forwarded messages inside forwarded messages: no stack
        // exhaustion, no quadratic blow-up.
        let m = p(&nested_multipart(3000));
        assert_eq!(m.text, "deepest text");
        let mut rfc822 = String::from("From: a@b.c\r\nSubject: outer\r\n");
        for _ in 0..20_000 {
            rfc822.push_str("Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n");
        }
        rfc822.push_str("\r\nend\r\n");
        let m = p(&rfc822);
        assert_eq!(m.subject, "outer");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn nested_message_becomes_an_eml_attachment() {
        let raw = "From: a@b.c\r\nSubject: FW: x\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n\
                   --o\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
                   --o\r\nContent-Type: message/rfc822\r\n\r\n\
                   From: v@w.x\r\nSubject: Re: Invoice 5/2024\r\nContent-Type: multipart/mixed; boundary=i\r\n\r\n\
                   --i\r\nContent-Type: text/plain\r\n\r\ninner body\r\n--i--\r\n\
                   --o--\r\n";
        let m = p(raw);
        assert_eq!(m.text, "see attached");
        assert_eq!(m.attachments.len(), 1);
        let a = &m.attachments[0];
        assert_eq!(a.content_type, "message/rfc822");
        assert_eq!(a.filename, "Re Invoice 5-2024.eml");
        let data = String::from_utf8(a.data.clone()).unwrap();
        assert!(
            data.starts_with("From: v@w.x\r\n") && data.ends_with("--i--"),
            "{data:?}"
        );
    }

    #[test]
    fn hostile_nesting_of_forwarded_messages_is_harmless() {
        // A delimiter that does not start a line is not a delimiter (RFC 2046), so the
        // chain below is text, however long; the same chain base64-encoded is one attachment.
        let mut chain = String::new();
        for _ in 0..200_000 {
            chain.push_str("Content-Type: message/rfc822\r\n\r\n");
        }
        let start = Instant::now();
        let raw = format!(
            "From: a@b.c\r\nSubject: outer\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
             junk--b\r\nContent-Type: message/rfc822\r\n\r\n{chain}end\r\n--b--\r\n"
        );
        let m = p(&raw);
        assert_eq!(m.subject, "outer");
        assert!(m.text.starts_with("junk--b") && m.text.contains("\nend\n"));
        let encoded = b64_for_test(chain.as_bytes());
        let raw = format!(
            "From: a@b.c\r\nSubject: outer\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
             --b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n--b--\r\n"
        );
        let m = p(&raw);
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].data, chain.as_bytes());
        assert_eq!(m.attachments[0].filename, "forwarded-message.eml");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    fn b64_for_test(data: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    #[test]
    fn lenient_structure() {
        // A part that forgot the blank line after its headers keeps its text.
        let m = p(
            "From: a@b.c\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n\
                   --x\r\nContent-Type: text/plain\r\nHello there\r\n--x--\r\n",
        );
        assert_eq!(m.text, "Hello there");
        // Parts of a digest are messages unless they say otherwise.
        let m = p("From: a@b.c\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n\
                   --d\r\n\r\nSubject: first\r\n\r\none\r\n--d\r\n\r\nSubject: second\r\n\r\ntwo\r\n--d--\r\n");
        let names: Vec<&str> = m.attachments.iter().map(|a| a.filename.as_str()).collect();
        assert_eq!(names, ["first.eml", "second.eml"]);
        let m = pb(b"\xEF\xBB\xBFFrom: a@b.c\r\nSubject: bom\r\n\r\nx\r\n");
        assert_eq!(m.subject, "bom");
        // An mbox separator line is not a header.
        let m = p("From someone@example.com Mon Apr  1 10:00:00 2024\nFrom: a@b.c\nSubject: mbox\n\nbody\n");
        assert_eq!(m.subject, "mbox");
        assert_eq!(m.from.unwrap().email, "a@b.c");
        // A multipart whose boundary never appears is kept as text.
        let m = p(
            "From: a@b.c\r\nContent-Type: multipart/mixed; boundary=nope\r\n\r\nplain words\r\n",
        );
        assert_eq!(m.text, "plain words\n");
        assert!(
            m.problems.iter().any(|p| p.contains("no part delimiters")),
            "{:?}",
            m.problems
        );
    }

    #[test]
    fn html_line_breaks_after_a_long_pre_block_stay_linear() {
        // Each `<br>` used to count every line break before it.
        let n = 200_000;
        let html = format!("<pre>a{}</pre>{}b", "\n".repeat(n), "<br>".repeat(n));
        assert_eq!(html_to_text(&html), "a\n\nb");
    }

    #[test]
    fn the_charset_hint_reads_short_labels_only() {
        // `charset=` repeated: each match used to read the rest of the window as its label.
        let mut raw = b"From: a@b.c\r\nSubject: B\xfcro\r\n\r\n".to_vec();
        raw.extend_from_slice("charset=".repeat(40_000).as_bytes());
        raw.extend_from_slice(b"\r\nContent-Type: text/plain; charset=iso-8859-2\r\n");
        assert_eq!(pb(&raw).subject, "B\u{fc}ro");
        // A label of ordinary length after long junk is still found.
        let mut raw = b"From: a@b.c\r\nSubject: \xb3\r\n\r\n".to_vec();
        raw.extend_from_slice(format!("charset={}\r\n", "x".repeat(5000)).as_bytes());
        raw.extend_from_slice(b"charset=\"iso-8859-2\"\r\n");
        assert_eq!(pb(&raw).subject, "\u{142}");
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
            &pattern(),
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

    #[test]
    fn the_part_bound_counts_every_entity_and_keeps_what_came_first() {
        // message (1) > mixed (2) > text (3), alternative (4) > text (5), html (6); pdf (7)
        let raw = "From: a@b.c\r\nSubject: s\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n\
                   --o\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n\
                   --m\r\nContent-Type: text/plain\r\n\r\none\r\n\
                   --m\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n\
                   --a\r\nContent-Type: text/plain\r\n\r\ntwo\r\n\
                   --a\r\nContent-Type: text/html\r\n\r\n<p>two</p>\r\n--a--\r\n--m--\r\n\
                   --o\r\nContent-Type: application/pdf; name=x.pdf\r\n\r\n%PDF\r\n--o--\r\n";
        let within = |parts| {
            let limits = Limits {
                parts,
                decoded_bytes: MAX_DECODED_BYTES,
            };
            parse_within(raw.as_bytes(), &pattern(), limits)
        };
        let all = within(7);
        assert_eq!(all.text, "one\ntwo");
        assert_eq!(all.attachments.len(), 1);
        assert!(all.problems.is_empty(), "{:?}", all.problems);
        let bounded = within(5);
        assert_eq!(bounded.text, "one");
        assert_eq!(bounded.html, None);
        // Both children of the top were opened before the bound was reached.
        assert_eq!(bounded.attachments.len(), 1);
        assert_eq!(
            bounded.problems,
            ["the message has more than 5 MIME parts; the rest were not collected"]
        );
        assert_eq!(bounded.subject, "s");
        // A hundred thousand nested multiparts, each with an attachment: bounded too.
        let mut deep =
            String::from("From: a@b.c\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n");
        for i in 0..100_000 {
            deep.push_str(&format!(
                "--b{i}\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n\
                 --b{i}\r\nContent-Type: multipart/mixed; boundary=b{}\r\n\r\n",
                i + 1
            ));
        }
        let m = p(&deep);
        assert_eq!(m.attachments.len(), MAX_MIME_PARTS / 2);
        assert!(
            m.problems
                .iter()
                .any(|p| p.contains("more than 10000 MIME parts")),
            "{:?}",
            m.problems
        );
    }

    #[test]
    fn the_decoded_bytes_bound_keeps_what_fits() {
        let raw = "From: a@b.c\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
                   --b\r\nContent-Type: text/plain\r\n\r\n0123456789\r\n\
                   --b\r\nContent-Type: application/pdf; name=a.pdf\r\n\
                   Content-Transfer-Encoding: base64\r\n\r\nYWFhYWFhYWFhYQ==\r\n\
                   --b\r\nContent-Type: application/pdf; name=b.pdf\r\n\r\nbbbbbbbbbbbbbbbbbbbb\r\n\
                   --b\r\nContent-Type: application/pdf; name=c.pdf\r\n\r\nc\r\n--b--\r\n";
        let within = |decoded_bytes| {
            let limits = Limits {
                parts: MAX_MIME_PARTS,
                decoded_bytes,
            };
            parse_within(raw.as_bytes(), &pattern(), limits)
        };
        let all = within(41);
        assert_eq!(all.attachments.len(), 3);
        assert!(all.problems.is_empty(), "{:?}", all.problems);
        // Text (10) and a.pdf (10 decoded bytes) fit in 25; b.pdf does not, and c.pdf
        // after it is not collected either.
        let m = within(25);
        assert_eq!(m.text, "0123456789");
        let names: Vec<&str> = m.attachments.iter().map(|a| a.filename.as_str()).collect();
        assert_eq!(names, ["a.pdf"]);
        assert_eq!(
            m.problems,
            ["the message's content decodes to more than 25 bytes; the rest was not collected"]
        );
        assert!(within(5).text.is_empty());
        assert_eq!(
            within(2 << 20).problems,
            Vec::<String>::new(),
            "a bound in MiB"
        );
        assert!(MAX_DECODED_BYTES >= 10 * crate::config::DEFAULT_MAX_MESSAGE_BYTES as usize);
    }

    #[test]
    fn control_characters_in_headers_become_single_spaces() {
        assert_eq!(clean_header_text("a\r\nb"), "a b");
        assert_eq!(clean_header_text("a \r\n\t b\0c"), "a b c");
        assert_eq!(clean_header_text("keep  two spaces"), "keep  two spaces");
        assert_eq!(clean_header_text("\u{1}x\u{85}y\u{2028}z\u{7f}"), "x y z");
        assert_eq!(clean_header_text("  trimmed\t"), "trimmed");
        let m = pb(
            b"From: \"Ann\x01\x02Lee\" <a@b.c>\r\nSubject: one\x00two\x0bthree\r\n\
              Message-ID: <id\x00x@h>\r\nX-Tab: a\tb\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
              --b\r\nContent-Type: image/png\x07\r\nContent-ID: <c\x00d@h>\r\n\r\npng\r\n--b--\r\n",
        );
        assert_eq!(m.subject, "one two three");
        assert_eq!(m.header("subject"), Some("one two three"));
        assert_eq!(m.header("x-tab"), Some("a b"));
        assert_eq!(m.from.as_ref().unwrap().name.as_deref(), Some("Ann Lee"));
        assert_eq!(m.message_id.as_deref(), Some("id x@h"));
        let a = &m.attachments[0];
        assert_eq!(a.content_id.as_deref(), Some("c d@h"));
        assert!(!a.content_type.contains(char::is_control), "{a:?}");
        // Folding is not a control character's doing: the value reads as one line.
        let m = p("From: a@b.c\r\nSubject: long\r\n\tsubject\r\n\r\nx\r\n");
        assert_eq!(m.subject, "long subject");
        assert_eq!(m.header("subject"), Some("long subject"));
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
        let re = pattern();
        for cut in 0..bytes.len() {
            let m = parse(&bytes[..cut], &re);
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
            let m = parse(&input, &re);
            assert!(!m.message_key.is_empty());
            let mut mutated = bytes.to_vec();
            for _ in 0..8 {
                let at = (rng.next() as usize) % mutated.len();
                mutated[at] = alphabet[(rng.next() as usize) % alphabet.len()];
            }
            let m = parse(&mutated, &re);
            assert!(!m.message_key.is_empty());
        }
    }
}
