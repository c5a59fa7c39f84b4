//! The `send()` message: parsing and validating the PHP array ([`MessageRequest::from_json`])
//! and building the RFC 5322 bytes ([`build`]).
//!
//! Everything that can be wrong with a message is found here, before any transport is
//! touched: a bad message is an [`Error::Message`] naming the field, and nothing is sent.
//! The From is always the sending account's `EMAIL` / `DISPLAY_NAME`: a `from` key is refused,
//! because routing (SPEC §4) decides who sends.

use std::fmt;
use std::path::Path;

use lettre::address::Envelope;
use lettre::message::header::{
    self, ContentDisposition, ContentTransferEncoding, ContentType, HeaderName, HeaderValue,
};
use lettre::message::{Body, Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};
use serde_json::{Map, Value};

use crate::config::Account;
use crate::error::{Error, Result};
use crate::threading;

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

/// The keys `send()` accepts.
const KEYS: &[&str] = &[
    "to",
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "text",
    "html",
    "attachments",
    "headers",
    "kind",
    "tenant",
    "sd_number",
    "in_reply_to",
];

/// Headers that we write ourselves: a caller may not set them through `headers`.
const OWNED_HEADERS: &[&str] = &[
    "from",
    "sender",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-id",
    "return-path",
];

impl MessageRequest {
    /// Parses and validates the `send()` array (as JSON). Attachments given by `path` are read
    /// here, so an unreadable file stops the message before anything is sent. Every error is
    /// an [`Error::Message`] naming the key (and the list index) that is wrong.
    pub fn from_json(value: &Value) -> Result<MessageRequest> {
        let Value::Object(map) = value else {
            return Err(Error::message(
                "the message must be an array with at least 'to' and 'text' or 'html'",
            ));
        };
        for key in map.keys() {
            if key == "from" {
                return Err(Error::message(
                    "from: not accepted; the From address is the sending account's EMAIL and \
                     DISPLAY_NAME (chosen by kind and tenant)",
                ));
            }
            if !KEYS.contains(&key.as_str()) {
                return Err(Error::message(format!(
                    "unknown key '{key}' (accepted: {})",
                    KEYS.join(", ")
                )));
            }
        }
        check_utf8(map)?;
        let get = |key: &str| map.get(key).filter(|v| !v.is_null());
        let req = MessageRequest {
            to: addresses_field(get("to"), "to")?,
            cc: addresses_field(get("cc"), "cc")?,
            bcc: addresses_field(get("bcc"), "bcc")?,
            reply_to: addresses_field(get("reply_to"), "reply_to")?,
            subject: optional_string(get("subject"), "subject")?.unwrap_or_default(),
            text: optional_string(get("text"), "text")?,
            html: optional_string(get("html"), "html")?,
            attachments: attachments_field(get("attachments"))?,
            headers: headers_field(get("headers"))?,
            kind: match optional_string(get("kind"), "kind")? {
                None => MailKind::General,
                Some(k) if k.trim().is_empty() => MailKind::General,
                Some(k) => MailKind::parse(&k)?,
            },
            tenant: tenant_field(get("tenant"))?,
            sd_number: optional_string(get("sd_number"), "sd_number")?
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
            in_reply_to: match optional_string(get("in_reply_to"), "in_reply_to")? {
                Some(id) if !id.trim().is_empty() => Some(normalize_msg_id(&id)?),
                _ => None,
            },
        };
        req.validate()?;
        Ok(req)
    }

    /// Checks every rule of a well-formed message (see [`MessageRequest::from_json`]).
    pub fn validate(&self) -> Result<()> {
        if self.to.is_empty() && self.cc.is_empty() && self.bcc.is_empty() {
            return Err(Error::message("to: at least one recipient is required"));
        }
        if self.to.is_empty() {
            return Err(Error::message(
                "to: at least one To recipient is required (cc and bcc alone are not enough)",
            ));
        }
        for (field, list) in [
            ("to", &self.to),
            ("cc", &self.cc),
            ("bcc", &self.bcc),
            ("reply_to", &self.reply_to),
        ] {
            for (i, addr) in list.iter().enumerate() {
                let at = format!("{field}[{i}]");
                parse_address(&addr.email, &at)?;
                if let Some(name) = &addr.name {
                    check_header_text(name, &format!("{at}.name"))?;
                }
            }
        }
        check_header_text(&self.subject, "subject")?;
        if self.text.is_none() && self.html.is_none() {
            return Err(Error::message("text or html: one of them is required"));
        }
        if self.kind == MailKind::SdThread && self.sd_number.is_none() {
            return Err(Error::message("sd_number: required when kind is sd_thread"));
        }
        if let Some(sd) = &self.sd_number {
            if !threading::valid_sd_number(sd) {
                return Err(Error::message(format!(
                    "sd_number: {sd:?} must be 1 to {} letters, digits or '-'",
                    threading::MAX_SD_NUMBER_LEN
                )));
            }
        }
        if self.tenant < 0 {
            return Err(Error::message(format!(
                "tenant: {} is not a tenant id",
                self.tenant
            )));
        }
        if let Some(id) = &self.in_reply_to {
            normalize_msg_id(id)?;
        }
        let mut names: Vec<String> = Vec::new();
        for (name, value) in &self.headers {
            check_header_name(name)?;
            let lower = name.to_ascii_lowercase();
            if names.contains(&lower) {
                return Err(Error::message(format!(
                    "headers: {name} is given more than once"
                )));
            }
            names.push(lower);
            check_header_text(value, &format!("headers[{name}]"))?;
        }
        let mut cids: Vec<&str> = Vec::new();
        for (i, a) in self.attachments.iter().enumerate() {
            let at = format!("attachments[{i}]");
            if let Some(name) = &a.filename {
                if name.trim().is_empty() {
                    return Err(Error::message(format!("{at}.filename: empty")));
                }
                check_header_text(name, &format!("{at}.filename"))?;
            } else if !a.inline {
                return Err(Error::message(format!("{at}.filename: required")));
            }
            ContentType::parse(&a.content_type).map_err(|_| {
                Error::message(format!(
                    "{at}.content_type: {:?} is not a MIME type",
                    a.content_type
                ))
            })?;
            if a.data.len() as u64 > MAX_ATTACHMENT_BYTES {
                return Err(Error::message(format!(
                    "{at}: {} bytes is over the {} MiB limit",
                    a.data.len(),
                    MAX_ATTACHMENT_BYTES >> 20
                )));
            }
            match &a.content_id {
                Some(cid) => {
                    check_content_id(cid, &at)?;
                    if cids.contains(&cid.as_str()) {
                        return Err(Error::message(format!(
                            "{at}.content_id: {cid:?} is used twice"
                        )));
                    }
                    cids.push(cid);
                }
                None if a.inline => {
                    return Err(Error::message(format!(
                        "{at}.content_id: required for an inline attachment"
                    )))
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// Builds the message as `from` sends it. Message-ID (at the From domain) and Date are always
/// ours; with an SD number the subject gains `[SD_NUMBER]` (unless it already names the item)
/// and In-Reply-To/References point at the item's thread root, so replies find their way back.
pub fn build(req: &MessageRequest, from: &Account, thread_key: &[u8; 32]) -> Result<BuiltMessage> {
    req.validate()?;
    let account_id = from.id.to_string();
    let from_addr: Address = from.email.trim().parse().map_err(|_| {
        Error::account_key(
            &account_id,
            "EMAIL",
            format!("{:?} is not a valid email address", from.email),
        )
    })?;
    let display = from
        .display_name
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if let Some(name) = display {
        if name.chars().any(is_forbidden_header_char) {
            return Err(Error::account_key(
                &account_id,
                "DISPLAY_NAME",
                "contains a line break or a control character",
            ));
        }
    }
    let from_mailbox = Mailbox::new(display.map(str::to_string), from_addr.clone());
    let domain = threading::id_domain(from_addr.as_ref());

    let subject = match &req.sd_number {
        Some(sd) if !names_sd_number(&req.subject, sd) => {
            if req.subject.trim().is_empty() {
                format!("[{sd}]")
            } else {
                format!("[{sd}] {}", req.subject)
            }
        }
        _ => req.subject.clone(),
    };
    let message_id = threading::message_id(req.sd_number.as_deref(), thread_key, &domain)?;
    let (in_reply_to, references) = match &req.sd_number {
        Some(sd) => {
            let root = threading::thread_root_id(sd, thread_key, &domain)?;
            match &req.in_reply_to {
                Some(parent) if *parent != root => (parent.clone(), vec![root, parent.clone()]),
                _ => (root.clone(), vec![root]),
            }
        }
        None => match &req.in_reply_to {
            Some(parent) => (parent.clone(), vec![parent.clone()]),
            None => (String::new(), Vec::new()),
        },
    };

    let mut builder = Message::builder()
        .from(from_mailbox.clone())
        .subject(subject.clone())
        .date_now()
        .message_id(Some(message_id.clone()));
    for addr in &req.to {
        builder = builder.to(mailbox(addr)?);
    }
    for addr in &req.cc {
        builder = builder.cc(mailbox(addr)?);
    }
    for addr in &req.reply_to {
        builder = builder.reply_to(mailbox(addr)?);
    }
    if !in_reply_to.is_empty() {
        builder = builder
            .in_reply_to(in_reply_to)
            .references(references.join(" "));
    }
    for (name, value) in &req.headers {
        let header_name = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| Error::message(format!("headers: {name:?} is not a valid header name")))?;
        builder = builder.raw_header(HeaderValue::new(header_name, value.clone()));
    }

    let mut recipients: Vec<String> = Vec::new();
    let mut envelope_to: Vec<Address> = Vec::new();
    for addr in req.to.iter().chain(&req.cc).chain(&req.bcc) {
        let parsed: Address = parse_address(&addr.email, "recipient")?;
        let text = parsed.to_string();
        if !recipients.iter().any(|r| r.eq_ignore_ascii_case(&text)) {
            recipients.push(text);
            envelope_to.push(parsed);
        }
    }
    let envelope = Envelope::new(Some(from_addr.clone()), envelope_to)
        .map_err(|e| Error::message(format!("cannot build the envelope: {e}")))?;
    builder = builder.envelope(envelope);

    let message = match body(req)? {
        Part::Single(part) => builder.singlepart(part),
        Part::Multi(part) => builder.multipart(part),
    }
    .map_err(|e| Error::message(format!("cannot build the message: {e}")))?;

    Ok(BuiltMessage {
        raw: message.formatted(),
        envelope_from: from_addr.to_string(),
        recipients,
        message_id,
        from: from_mailbox.to_string(),
        subject,
    })
}

enum Part {
    Single(SinglePart),
    Multi(MultiPart),
}

fn body(req: &MessageRequest) -> Result<Part> {
    let has_html = req.html.is_some();
    let (related, attached): (Vec<&AttachmentData>, Vec<&AttachmentData>) =
        req.attachments.iter().partition(|a| a.inline && has_html);

    let html = match &req.html {
        Some(html) if !related.is_empty() => {
            let mut multi =
                MultiPart::related().singlepart(text_part(ContentType::TEXT_HTML, html));
            for a in &related {
                multi = multi.singlepart(attachment_part(a)?);
            }
            Some(Part::Multi(multi))
        }
        Some(html) => Some(Part::Single(text_part(ContentType::TEXT_HTML, html))),
        None => None,
    };
    let text = req
        .text
        .as_deref()
        .map(|text| text_part(ContentType::TEXT_PLAIN, text));
    let main = match (text, html) {
        (Some(text), Some(html)) => {
            let alt = MultiPart::alternative().singlepart(text);
            Part::Multi(match html {
                Part::Single(p) => alt.singlepart(p),
                Part::Multi(p) => alt.multipart(p),
            })
        }
        (Some(text), None) => Part::Single(text),
        (None, Some(html)) => html,
        (None, None) => return Err(Error::message("text or html: one of them is required")),
    };
    if attached.is_empty() {
        return Ok(main);
    }
    let mut mixed = match main {
        Part::Single(p) => MultiPart::mixed().singlepart(p),
        Part::Multi(p) => MultiPart::mixed().multipart(p),
    };
    for a in attached {
        mixed = mixed.singlepart(attachment_part(a)?);
    }
    Ok(Part::Multi(mixed))
}

/// A `text/plain` or `text/html` part (UTF-8), encoded here rather than by lettre, in time
/// linear in the text: lettre's `Body::new` inserts each missing CR with `String::insert`
/// (quadratic in an LF-only text) and declares text with NUL bytes or bare CRs `7bit`.
fn text_part(content_type: ContentType, text: &str) -> SinglePart {
    let canonical = crlf_line_ends(text);
    let encoding = text_encoding(&canonical);
    let encoded = match encoding {
        ContentTransferEncoding::SevenBit => canonical,
        ContentTransferEncoding::QuotedPrintable => quoted_printable(&canonical),
        _ => base64_lines(&canonical),
    };
    SinglePart::builder()
        .header(content_type)
        .body(Body::dangerous_pre_encoded(encoded, encoding))
}

/// The text with every line end (CRLF, a lone LF or a lone CR) written as CRLF, the canonical
/// form of a text part (RFC 2045 §2.10). One pass; no CR or LF is left on its own.
fn crlf_line_ends(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let breaks = memchr::memchr2_iter(b'\r', b'\n', bytes).count();
    let mut out = Vec::with_capacity(bytes.len() + breaks);
    let mut start = 0;
    let mut positions = memchr::memchr2_iter(b'\r', b'\n', bytes).peekable();
    while let Some(i) = positions.next() {
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(b"\r\n");
        start = i + 1;
        if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            positions.next();
            start = i + 2;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out
}

/// Lines up to this many octets (without the CRLF) may go out unencoded; RFC 5322 §2.1.1 asks
/// for at most 78 (and requires at most 998).
const MAX_7BIT_LINE: usize = 78;

/// How to send a text already in canonical CRLF form: `7bit` only when it is ASCII without
/// NUL and every line is short; otherwise quoted-printable (mostly ASCII, stays readable) or
/// base64 (when more than a third of the bytes would need escaping). Never 8bit: the message
/// stays 7-bit clean for any relay.
fn text_encoding(canonical: &[u8]) -> ContentTransferEncoding {
    let mut escaped = 0usize;
    let mut line_start = 0usize;
    let mut long_line = false;
    for (i, &b) in canonical.iter().enumerate() {
        match b {
            b'\n' => {
                // Always preceded by CR here: the line is canonical[line_start..i - 1].
                long_line |= i - 1 - line_start > MAX_7BIT_LINE;
                line_start = i + 1;
            }
            b'\r' | b'\t' | b' '..=b'~' => {}
            _ => escaped += 1,
        }
    }
    long_line |= canonical.len() - line_start > MAX_7BIT_LINE;
    if escaped == 0 && !long_line {
        ContentTransferEncoding::SevenBit
    } else if escaped <= canonical.len() / 3 {
        ContentTransferEncoding::QuotedPrintable
    } else {
        ContentTransferEncoding::Base64
    }
}

/// Quoted-printable (RFC 2045 §6.7) of a text in canonical CRLF form: CRLF stays a hard line
/// break, lines are cut with soft breaks (`=` CRLF) at 76 characters, `=`, bytes outside
/// printable ASCII and whitespace at the end of a line are escaped as `=XX`.
fn quoted_printable(canonical: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    const MAX_LINE: usize = 76;
    let mut out = Vec::with_capacity(canonical.len() + canonical.len() / 8 + 16);
    for (n, line) in canonical.split(|&b| b == b'\n').enumerate() {
        if n > 0 {
            out.extend_from_slice(b"\r\n");
        }
        // Every LF follows a CR in canonical text; the CR belongs to the line break.
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut width = 0usize;
        for (i, &b) in line.iter().enumerate() {
            let last = i + 1 == line.len();
            let literal = match b {
                b'=' => false,
                b' ' | b'\t' => !last,
                b'!'..=b'~' => true,
                _ => false,
            };
            let len = if literal { 1 } else { 3 };
            // Room for a soft break's `=` unless this is the line's last character.
            let limit = if last { MAX_LINE } else { MAX_LINE - 1 };
            if width + len > limit {
                out.extend_from_slice(b"=\r\n");
                width = 0;
            }
            if literal {
                out.push(b);
            } else {
                out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            width += len;
        }
    }
    out
}

/// Base64 in lines of 76 characters separated by CRLF.
fn base64_lines(data: &[u8]) -> Vec<u8> {
    use base64::Engine;
    const CHUNK: usize = 57; // 76 characters of base64
    let mut out = Vec::with_capacity(data.len().div_ceil(CHUNK) * 78);
    let mut line = [0u8; 76];
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(chunk, &mut line)
            .expect("76 bytes hold the base64 of 57");
        out.extend_from_slice(&line[..n]);
    }
    out
}

fn attachment_part(a: &AttachmentData) -> Result<SinglePart> {
    let content_type = ContentType::parse(&a.content_type)
        .map_err(|_| Error::message(format!("{:?} is not a MIME type", a.content_type)))?;
    // Base64 always: the bytes come back exactly as given (no line-ending rewriting).
    let body = Body::dangerous_pre_encoded(base64_lines(&a.data), ContentTransferEncoding::Base64);
    let disposition = match (&a.filename, a.inline) {
        (Some(name), false) => ContentDisposition::attachment(name),
        (Some(name), true) => ContentDisposition::inline_with_name(name),
        (None, _) => ContentDisposition::inline(),
    };
    let mut part = SinglePart::builder()
        .header(content_type)
        .header(disposition);
    if let Some(cid) = &a.content_id {
        part = part.header(header::ContentId::from(format!("<{cid}>")));
    }
    Ok(part.body(body))
}

fn mailbox(addr: &EmailAddress) -> Result<Mailbox> {
    let email = parse_address(&addr.email, "address")?;
    let name = addr
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    Ok(Mailbox::new(name, email))
}

/// True when `subject` already names `sd` as a whole word (case-insensitive).
fn names_sd_number(subject: &str, sd: &str) -> bool {
    let hay = subject.to_ascii_lowercase();
    let needle = sd.to_ascii_lowercase();
    let bytes = hay.as_bytes();
    let mut from = 0;
    while let Some(pos) = hay[from..].find(&needle) {
        let start = from + pos;
        let end = start + needle.len();
        let before_ok = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        let after_ok = end == bytes.len() || !bytes[end].is_ascii_alphanumeric();
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
    }
    false
}

fn is_forbidden_header_char(c: char) -> bool {
    c.is_control() && c != '\t'
}

/// Rejects CR, LF, NUL and other control characters in anything that becomes a header.
fn check_header_text(text: &str, field: &str) -> Result<()> {
    if text.contains(['\r', '\n']) {
        return Err(Error::message(format!(
            "{field}: contains a line break (CR or LF), which is not allowed in a header"
        )));
    }
    if text.chars().any(is_forbidden_header_char) {
        return Err(Error::message(format!(
            "{field}: contains a control character, which is not allowed in a header"
        )));
    }
    Ok(())
}

fn check_header_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 76
        && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
    if !valid {
        return Err(Error::message(format!(
            "headers: {name:?} is not a valid header field name (printable ASCII without ':' or \
             spaces, at most 76 characters)"
        )));
    }
    if OWNED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(Error::message(format!(
            "headers: {name} is set by the extension and cannot be given (use the message's own \
             keys for recipients, subject and threading)"
        )));
    }
    Ok(())
}

fn check_content_id(cid: &str, at: &str) -> Result<()> {
    let valid = !cid.is_empty()
        && cid.len() <= 250
        && cid
            .bytes()
            .all(|b| (33..=126).contains(&b) && !matches!(b, b'<' | b'>' | b'"' | b'\\'));
    if valid {
        Ok(())
    } else {
        Err(Error::message(format!(
            "{at}.content_id: {cid:?} is not a valid content id (printable ASCII, no spaces, \
             quotes or angle brackets)"
        )))
    }
}

fn parse_address(text: &str, field: &str) -> Result<Address> {
    if text.chars().any(|c| c.is_control()) {
        return Err(Error::message(format!(
            "{field}: the address contains a line break or control character"
        )));
    }
    text.trim()
        .parse::<Address>()
        .map_err(|_| Error::message(format!("{field}: {text:?} is not a valid email address")))
}

/// `<id>` from `id` or `<id>`, refusing whitespace, brackets inside and control characters.
fn normalize_msg_id(id: &str) -> Result<String> {
    let trimmed = id.trim();
    let inner = trimmed
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(trimmed);
    let valid = !inner.is_empty()
        && inner.len() <= 900
        && inner
            .bytes()
            .all(|b| (33..=126).contains(&b) && b != b'<' && b != b'>');
    if valid {
        Ok(format!("<{inner}>"))
    } else {
        Err(Error::message(format!(
            "in_reply_to: {id:?} is not a Message-ID (expected <local@domain>)"
        )))
    }
}

/// The key the PHP boundary uses for a PHP string that is not valid UTF-8:
/// `{"$binary": "<base64 of the bytes>"}` (see `crate::php::convert`).
pub const BINARY_KEY: &str = "$binary";

/// Refuses a non-UTF-8 string anywhere in the message (subject, text, html, an address, a
/// header, an attachment's filename...), naming where it is; only an attachment's `content`
/// holds bytes, and keeps any.
fn check_utf8(map: &Map<String, Value>) -> Result<()> {
    for (key, value) in map {
        let found = match (key.as_str(), value) {
            ("attachments", Value::Array(items)) => {
                items.iter().enumerate().find_map(|(i, item)| match item {
                    Value::Object(obj) if binary_content(item).is_none() => obj
                        .iter()
                        .filter(|(k, _)| k.as_str() != "content")
                        .find_map(|(k, v)| binary_at(v, format!("attachments[{i}].{k}"), false)),
                    other => binary_at(other, format!("attachments[{i}]"), false),
                })
            }
            ("headers", _) => binary_at(value, key.clone(), true),
            _ => binary_at(value, key.clone(), false),
        };
        if let Some(at) = found {
            return Err(Error::message(format!(
                "{at}: not valid UTF-8; send() takes UTF-8 strings (convert others first, e.g. \
                 mb_convert_encoding($s, 'UTF-8', 'ISO-8859-1')); only an attachment's 'content' \
                 may hold other bytes"
            )));
        }
    }
    Ok(())
}

/// Where (`at`, then `[i]` / `.key`, or `[key]` for header names) a binary string is.
fn binary_at(value: &Value, at: String, keyed_by_name: bool) -> Option<String> {
    if binary_content(value).is_some() {
        return Some(at);
    }
    match value {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| binary_at(v, format!("{at}[{i}]"), false)),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let child = if keyed_by_name {
                format!("{at}[{k}]")
            } else {
                format!("{at}.{k}")
            };
            binary_at(v, child, false)
        }),
        _ => None,
    }
}

fn optional_string(value: Option<&Value>, field: &str) -> Result<Option<String>> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(Error::message(format!(
            "{field}: expected a string, got {}",
            json_type(other)
        ))),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an array with keys",
    }
}

fn tenant_field(value: Option<&Value>) -> Result<i64> {
    let bad = |v: &Value| Error::message(format!("tenant: {v} is not a tenant id"));
    match value {
        None => Ok(0),
        Some(v @ Value::Number(n)) => n.as_i64().ok_or_else(|| bad(v)),
        Some(v @ Value::String(s)) if s.trim().is_empty() => Err(bad(v)),
        Some(v @ Value::String(s)) => s.trim().parse().map_err(|_| bad(v)),
        Some(v) => Err(bad(v)),
    }
}

/// A recipient field: a string (one address or a `,`/`;` separated list), an `{email, name}`
/// object, or a list of those.
fn addresses_field(value: Option<&Value>, field: &str) -> Result<Vec<EmailAddress>> {
    let mut out = Vec::new();
    match value {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("{field}[{i}]");
                match item {
                    Value::String(s) => out.extend(parse_address_list(s, &at)?),
                    Value::Object(obj) => out.push(address_object(obj, &at)?),
                    other => {
                        return Err(Error::message(format!(
                            "{at}: expected an address string or an array with 'email' and \
                             'name', got {}",
                            json_type(other)
                        )))
                    }
                }
            }
        }
        Some(Value::String(s)) => out.extend(parse_address_list(s, field)?),
        Some(Value::Object(obj)) => out.push(address_object(obj, field)?),
        Some(other) => {
            return Err(Error::message(format!(
                "{field}: expected an address string, a list, or an array with 'email' and \
                 'name', got {}",
                json_type(other)
            )))
        }
    }
    Ok(out)
}

fn address_object(obj: &Map<String, Value>, at: &str) -> Result<EmailAddress> {
    for key in obj.keys() {
        if key != "email" && key != "name" {
            return Err(Error::message(format!(
                "{at}: unknown key '{key}' (expected 'email' and 'name')"
            )));
        }
    }
    let email = match obj.get("email") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => return Err(Error::message(format!("{at}.email: required"))),
    };
    check_header_text(&email, &format!("{at}.email"))?;
    parse_address(&email, at)?;
    let name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            check_header_text(s, &format!("{at}.name"))?;
            Some(s.trim().to_string()).filter(|s| !s.is_empty())
        }
        Some(other) => {
            return Err(Error::message(format!(
                "{at}.name: expected a string, got {}",
                json_type(other)
            )))
        }
    };
    Ok(EmailAddress { email, name })
}

/// Parses `a@b`, `Name <a@b>`, `"Last, First" <a@b>` and lists of them separated by `,` or
/// `;` (separators inside quotes or angle brackets do not count).
fn parse_address_list(text: &str, field: &str) -> Result<Vec<EmailAddress>> {
    check_header_text(text, field)?;
    let mut out = Vec::new();
    for piece in split_address_list(text) {
        let piece = piece.trim();
        if piece.is_empty() {
            continue;
        }
        out.push(parse_one_address(piece, field)?);
    }
    Ok(out)
}

fn split_address_list(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut in_quotes, mut in_angle, mut escaped) = (false, false, false);
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quotes => escaped = true,
            '"' if !in_angle => in_quotes = !in_quotes,
            '<' if !in_quotes => in_angle = true,
            '>' if !in_quotes => in_angle = false,
            ',' | ';' if !in_quotes && !in_angle => {
                pieces.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&text[start..]);
    pieces
}

fn parse_one_address(piece: &str, field: &str) -> Result<EmailAddress> {
    let invalid = || Error::message(format!("{field}: {piece:?} is not a valid email address"));
    let (name, email) = match piece.rfind('<') {
        Some(open) => {
            let rest = &piece[open + 1..];
            let close = rest.find('>').ok_or_else(invalid)?;
            if !rest[close + 1..].trim().is_empty() {
                return Err(invalid());
            }
            let name = unquote(piece[..open].trim());
            (Some(name).filter(|n| !n.is_empty()), rest[..close].trim())
        }
        None => (None, piece),
    };
    let address: Address = email.parse().map_err(|_| invalid())?;
    Ok(EmailAddress {
        email: address.to_string(),
        name,
    })
}

fn unquote(name: &str) -> String {
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        out.push(next);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => name.to_string(),
    }
}

/// `headers`: an object name => value, or a list of `[name, value]` pairs or `"Name: value"`.
fn headers_field(value: Option<&Value>) -> Result<Vec<(String, String)>> {
    let scalar = |v: &Value, at: &str| -> Result<String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(Error::message(format!(
                "{at}: expected a string, got {}",
                json_type(other)
            ))),
        }
    };
    let mut out = Vec::new();
    match value {
        None => {}
        Some(Value::Object(map)) => {
            for (name, v) in map {
                out.push((
                    name.trim().to_string(),
                    scalar(v, &format!("headers[{name}]"))?,
                ));
            }
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("headers[{i}]");
                match item {
                    Value::Array(pair) if pair.len() == 2 => {
                        let name = scalar(&pair[0], &at)?;
                        out.push((name.trim().to_string(), scalar(&pair[1], &at)?));
                    }
                    Value::String(line) => {
                        let (name, v) = line.split_once(':').ok_or_else(|| {
                            Error::message(format!("{at}: expected \"Name: value\""))
                        })?;
                        out.push((name.trim().to_string(), v.trim().to_string()));
                    }
                    _ => {
                        return Err(Error::message(format!(
                            "{at}: expected [name, value] or \"Name: value\""
                        )))
                    }
                }
            }
        }
        Some(other) => {
            return Err(Error::message(format!(
                "headers: expected an array of name => value, got {}",
                json_type(other)
            )))
        }
    }
    Ok(out)
}

fn attachments_field(value: Option<&Value>) -> Result<Vec<AttachmentData>> {
    let items = match value {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(Error::message(format!(
                "attachments: expected a list, got {}",
                json_type(other)
            )))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| attachment(item, &format!("attachments[{i}]")))
        .collect()
}

const ATTACHMENT_KEYS: &[&str] = &[
    "path",
    "content",
    "content_base64",
    "filename",
    "content_type",
    "inline",
    "content_id",
];

fn attachment(item: &Value, at: &str) -> Result<AttachmentData> {
    let Value::Object(obj) = item else {
        return Err(Error::message(format!(
            "{at}: expected an array with 'path' or 'content' and 'filename'"
        )));
    };
    for key in obj.keys() {
        if !ATTACHMENT_KEYS.contains(&key.as_str()) {
            return Err(Error::message(format!(
                "{at}: unknown key '{key}' (accepted: {})",
                ATTACHMENT_KEYS.join(", ")
            )));
        }
    }
    let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
    let text = |key: &str| optional_string(get(key), &format!("{at}.{key}"));
    let mut filename = text("filename")?.filter(|f| !f.trim().is_empty());
    let sources = ["path", "content", "content_base64"]
        .iter()
        .filter(|k| get(k).is_some())
        .count();
    if sources != 1 {
        return Err(Error::message(format!(
            "{at}: give exactly one of 'path', 'content' or 'content_base64'"
        )));
    }
    let data = if let Some(path) = text("path")? {
        let data = read_attachment(Path::new(&path), at)?;
        if filename.is_none() {
            filename = Path::new(&path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
        }
        data
    } else if let Some(encoded) = get("content").and_then(binary_content) {
        // A PHP string that is not UTF-8 (binary content) arrives from the PHP boundary as
        // `{"$binary": "<base64>"}`.
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map_err(|e| Error::message(format!("{at}.content: not valid binary data ({e})")))?
    } else if let Some(content) = text("content")? {
        content.into_bytes()
    } else {
        use base64::Engine;
        let encoded = text("content_base64")?.unwrap_or_default();
        let compact: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| Error::message(format!("{at}.content_base64: not valid base64 ({e})")))?
    };
    let inline = match get("inline") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) if n.as_i64() == Some(0) || n.as_i64() == Some(1) => {
            n.as_i64() == Some(1)
        }
        Some(other) => {
            return Err(Error::message(format!(
                "{at}.inline: expected true or false, got {}",
                json_type(other)
            )))
        }
    };
    let content_id = text("content_id")?.map(|cid| {
        let cid = cid.trim();
        cid.strip_prefix('<')
            .and_then(|c| c.strip_suffix('>'))
            .unwrap_or(cid)
            .to_string()
    });
    let content_type = match text("content_type")? {
        Some(ct) if !ct.trim().is_empty() => ct.trim().to_string(),
        _ => guess_content_type(filename.as_deref().unwrap_or("")).to_string(),
    };
    Ok(AttachmentData {
        filename,
        content_type,
        data,
        inline,
        content_id,
    })
}

/// Reads an attachment file, refusing anything but a regular file (a FIFO, a device such as
/// `/dev/zero`, a directory) before opening it, and reading at most [`MAX_ATTACHMENT_BYTES`]
/// whatever size the file reports (`/proc` files report 0; a file may grow while read).
fn read_attachment(path: &Path, at: &str) -> Result<Vec<u8>> {
    use crate::config::files::{self, FileProblem};

    let fail =
        |why: String| Error::message(format!("{at}.path: cannot read {}: {why}", path.display()));
    let over_limit = |bytes: String| {
        fail(format!(
            "{bytes} is over the {} MiB attachment limit",
            MAX_ATTACHMENT_BYTES >> 20
        ))
    };
    let problem = |p: FileProblem| match p {
        FileProblem::NotRegular(what) => fail(format!("not a regular file ({what})")),
        other => fail(other.to_string()),
    };
    // Follows symlinks: a link to a regular file is fine, a link to a FIFO is not.
    let (mut file, meta) = files::open_regular(path).map_err(problem)?;
    if meta.len() > MAX_ATTACHMENT_BYTES {
        return Err(over_limit(format!("{} bytes", meta.len())));
    }
    files::read_open_limited(&mut file, MAX_ATTACHMENT_BYTES).map_err(|p| match p {
        FileProblem::TooLarge(_) => over_limit(format!(
            "more than {MAX_ATTACHMENT_BYTES} bytes (the file reported {})",
            meta.len()
        )),
        other => problem(other),
    })
}

/// The base64 of a binary PHP string, as `crate::php` passes it: `{"$binary": "..."}`.
fn binary_content(value: &Value) -> Option<&str> {
    match value {
        Value::Object(map) if map.len() == 1 => map.get(BINARY_KEY).and_then(Value::as_str),
        _ => None,
    }
}

/// A MIME type from a file name's extension; `application/octet-stream` when unknown.
pub fn guess_content_type(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "htm" | "html" => "text/html",
        "ics" => "text/calendar",
        "xml" => "application/xml",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "ppt" => "application/vnd.ms-powerpoint",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "eml" => "message/rfc822",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccountId, AccountType, TlsSettings};
    use mail_parser::{MessageParser, MimeHeaders};
    use serde_json::json;
    use std::path::PathBuf;
    use std::time::Duration;

    const KEY: [u8; 32] = [3u8; 32];

    fn account() -> Account {
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

    fn req(value: Value) -> Result<MessageRequest> {
        MessageRequest::from_json(&value)
    }

    fn built(value: Value) -> BuiltMessage {
        build(&req(value).unwrap(), &account(), &KEY).unwrap()
    }

    fn err_text(value: Value) -> String {
        let err = req(value).unwrap_err();
        assert!(matches!(err, Error::Message(_)), "{err:?}");
        err.to_string()
    }

    #[test]
    fn address_forms_are_all_accepted() {
        let r = req(json!({
            "to": "a@x.example, \"Last, First\" <b@x.example>; Plain Name <c@x.example>",
            "cc": [{"email": "d@x.example", "name": "Dee"}, "e@x.example"],
            "bcc": {"email": "f@x.example"},
            "reply_to": "Name With Comma <g@x.example>",
            "text": "hi",
        }))
        .unwrap();
        let emails: Vec<&str> = r.to.iter().map(|a| a.email.as_str()).collect();
        assert_eq!(emails, ["a@x.example", "b@x.example", "c@x.example"]);
        assert_eq!(r.to[1].name.as_deref(), Some("Last, First"));
        assert_eq!(r.to[2].name.as_deref(), Some("Plain Name"));
        assert_eq!(r.cc[0].name.as_deref(), Some("Dee"));
        assert_eq!(r.cc[1].email, "e@x.example");
        assert_eq!(r.bcc[0].email, "f@x.example");
        assert_eq!(r.reply_to[0].email, "g@x.example");
    }

    #[test]
    fn bad_input_names_the_field() {
        assert!(err_text(json!({"text": "x"})).contains("to:"));
        assert!(err_text(json!({"to": "", "text": "x"})).contains("recipient"));
        assert!(err_text(json!({"to": "a@x.example"})).contains("text or html"));
        let t = err_text(json!({"to": ["a@x.example", "not an address"], "text": "x"}));
        assert!(t.contains("to[1]") && t.contains("not an address"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "cc": "ok@x.example, broken@", "text": "x"}));
        assert!(t.contains("cc") && t.contains("broken@"), "{t}");
        let t = err_text(
            json!({"to": "a@x.example", "text": "x", "subject": "Hi\r\nBcc: evil@x.example"}),
        );
        assert!(t.contains("subject") && t.contains("line break"), "{t}");
        let t = err_text(json!({"to": [{"email": "a@x.example", "name": "A\nB"}], "text": "x"}));
        assert!(t.contains("to[0].name"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "subject": "nul\u{0}"}));
        assert!(t.contains("control character"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "from": "boss@x.example"}));
        assert!(t.starts_with("from:"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "atachments": []}));
        assert!(t.contains("unknown key 'atachments'"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "kind": "sd_thread"}));
        assert!(t.contains("sd_number"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "kind": "urgent"}));
        assert!(t.contains("kind"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "sd_number": "SO 1"}));
        assert!(t.contains("sd_number"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "in_reply_to": "<a b@c>"}));
        assert!(t.contains("in_reply_to"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "tenant": "abc"}));
        assert!(t.contains("tenant"), "{t}");
    }

    #[test]
    fn headers_are_checked() {
        let ok = req(json!({"to": "a@x.example", "text": "x",
            "headers": {"X-PCR-Ticket": "42", "List-Unsubscribe": "<mailto:u@x.example>"}}))
        .unwrap();
        assert_eq!(ok.headers.len(), 2);
        let pairs = req(json!({"to": "a@x.example", "text": "x",
            "headers": [["X-A", "1"], "X-B: two"]}))
        .unwrap();
        assert_eq!(
            pairs.headers,
            vec![("X-A".into(), "1".into()), ("X-B".into(), "two".into())]
        );
        for (headers, needle) in [
            (json!({"X-Bad": "a\r\nBcc: evil@x.example"}), "line break"),
            (json!({"Bad Name": "v"}), "not a valid header field name"),
            (json!({"X-Colon:": "v"}), "not a valid header field name"),
            (json!({"Bcc": "evil@x.example"}), "set by the extension"),
            (json!({"message-id": "<x@y>"}), "set by the extension"),
            (json!({"Content-Type": "text/html"}), "set by the extension"),
            (json!([["X-A", "1"], ["x-a", "2"]]), "more than once"),
        ] {
            let t = err_text(json!({"to": "a@x.example", "text": "x", "headers": headers}));
            assert!(t.contains(needle) && t.starts_with("headers"), "{t}");
        }
    }

    #[test]
    fn attachments_from_path_are_read_at_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.pdf");
        std::fs::write(&path, b"%PDF-1.4 binary \x00\xff").unwrap();
        let r = req(json!({"to": "a@x.example", "text": "x",
            "attachments": [{"path": path.to_str().unwrap()}]}))
        .unwrap();
        assert_eq!(r.attachments[0].filename.as_deref(), Some("report.pdf"));
        assert_eq!(r.attachments[0].content_type, "application/pdf");
        assert_eq!(r.attachments[0].data, b"%PDF-1.4 binary \x00\xff");

        let missing = dir.path().join("missing.pdf");
        let t = err_text(json!({"to": "a@x.example", "text": "x",
            "attachments": [{"path": missing.to_str().unwrap()}]}));
        assert!(
            t.contains("attachments[0].path") && t.contains("missing.pdf"),
            "{t}"
        );
        let t = err_text(json!({"to": "a@x.example", "text": "x",
            "attachments": [{"path": dir.path().to_str().unwrap()}]}));
        assert!(t.contains("not a regular file"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x",
            "attachments": [{"content": "abc"}]}));
        assert!(t.contains("attachments[0].filename"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "html": "x",
            "attachments": [{"content": "abc", "filename": "a\r\n.txt"}]}));
        assert!(
            t.contains("attachments[0].filename") && t.contains("line break"),
            "{t}"
        );
        let t = err_text(json!({"to": "a@x.example", "html": "x",
            "attachments": [{"content": "abc", "filename": "a.png", "inline": true}]}));
        assert!(t.contains("content_id"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "html": "x",
            "attachments": [{"content": "abc", "filename": "a.png", "content_type": "nonsense"}]}));
        assert!(t.contains("content_type"), "{t}");
    }

    #[test]
    fn utf8_subject_and_names_round_trip() {
        let m = built(json!({
            "to": [{"email": "a@x.example", "name": "Zoë Ångström"}],
            "subject": "Grüße — ticket update ✓",
            "text": "Hello\nworld ✓",
        }));
        assert!(m.raw.is_ascii(), "raw message must be 7-bit");
        let parsed = MessageParser::default().parse(&m.raw).unwrap();
        assert_eq!(parsed.subject(), Some("Grüße — ticket update ✓"));
        let to = parsed.to().unwrap().first().unwrap();
        assert_eq!(to.name(), Some("Zoë Ångström"));
        let from = parsed.from().unwrap().first().unwrap();
        assert_eq!(from.name(), Some("PCR-360 Help Désk"));
        assert_eq!(from.address(), Some("help@pcr.example.edu"));
        assert_eq!(parsed.body_text(0).unwrap().trim_end(), "Hello\r\nworld ✓");
        assert_eq!(m.envelope_from, "help@pcr.example.edu");
        assert!(m.message_id.ends_with("@pcr.example.edu>"));
        assert_eq!(
            parsed.message_id().map(|s| format!("<{s}>")),
            Some(m.message_id.clone())
        );
        assert!(parsed.date().is_some());
    }

    #[test]
    fn bcc_is_in_the_envelope_only_and_recipients_are_unique() {
        let m = built(json!({
            "to": "a@x.example, A@x.example",
            "cc": "c@x.example",
            "bcc": ["secret@x.example", "c@x.example"],
            "text": "x",
        }));
        assert_eq!(
            m.recipients,
            ["a@x.example", "c@x.example", "secret@x.example"]
        );
        let raw = String::from_utf8(m.raw).unwrap();
        assert!(!raw.to_ascii_lowercase().contains("bcc"), "{raw}");
        assert!(!raw.contains("secret@x.example"), "{raw}");
    }

    #[test]
    fn text_html_attachments_and_inline_images_have_the_right_structure() {
        let png = vec![0x89, b'P', b'N', b'G', 0, 1, 2, 255, b'\n', b'\r'];
        let r = MessageRequest {
            to: vec![EmailAddress {
                email: "a@x.example".into(),
                name: None,
            }],
            subject: "s".into(),
            text: Some("plain".into()),
            html: Some("<p>hi <img src=\"cid:logo@pcr\"></p>".into()),
            attachments: vec![
                AttachmentData {
                    filename: Some("logo.png".into()),
                    content_type: "image/png".into(),
                    data: png.clone(),
                    inline: true,
                    content_id: Some("logo@pcr".into()),
                },
                AttachmentData {
                    filename: Some("Übersicht März.txt".into()),
                    content_type: "text/plain".into(),
                    data: b"line1\nline2\n".to_vec(),
                    inline: false,
                    content_id: None,
                },
            ],
            ..Default::default()
        };
        let m = build(&r, &account(), &KEY).unwrap();
        let raw = String::from_utf8(m.raw.clone()).unwrap();
        assert!(raw.contains("multipart/mixed"), "{raw}");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("multipart/related"), "{raw}");
        assert!(
            raw.contains("filename*"),
            "RFC 2231 filename expected: {raw}"
        );
        let parsed = MessageParser::default().parse(&m.raw).unwrap();
        assert_eq!(parsed.body_text(0).as_deref(), Some("plain"));
        assert!(parsed.body_html(0).unwrap().contains("cid:logo@pcr"));
        let atts: Vec<_> = parsed.attachments().collect();
        assert_eq!(atts.len(), 2);
        let logo = atts
            .iter()
            .find(|a| a.content_id() == Some("logo@pcr"))
            .unwrap();
        assert_eq!(logo.contents(), &png[..]);
        let txt = atts
            .iter()
            .find(|a| a.attachment_name() == Some("Übersicht März.txt"))
            .unwrap();
        assert_eq!(txt.contents(), b"line1\nline2\n");
    }

    #[test]
    fn html_only_and_text_only() {
        let html = built(json!({"to": "a@x.example", "html": "<b>x</b>"}));
        let raw = String::from_utf8(html.raw).unwrap();
        assert!(
            raw.contains("text/html") && !raw.contains("multipart"),
            "{raw}"
        );
        let text = built(json!({"to": "a@x.example", "text": "x", "subject": ""}));
        let raw = String::from_utf8(text.raw).unwrap();
        assert!(
            raw.contains("text/plain") && !raw.contains("multipart"),
            "{raw}"
        );
    }

    #[test]
    fn sd_number_tags_the_subject_and_threads_the_message() {
        let m = built(
            json!({"to": "a@x.example", "text": "x", "subject": "Your request",
            "kind": "sd_thread", "sd_number": "SO201700043"}),
        );
        assert_eq!(m.subject, "[SO201700043] Your request");
        let parsed = MessageParser::default().parse(&m.raw).unwrap();
        assert_eq!(parsed.subject(), Some("[SO201700043] Your request"));
        assert_eq!(
            threading::verify(&m.message_id, &KEY).as_deref(),
            Some("SO201700043")
        );
        let root = threading::thread_root_id("SO201700043", &KEY, "pcr.example.edu").unwrap();
        let raw = String::from_utf8(m.raw.clone()).unwrap();
        assert!(raw.contains(&format!("In-Reply-To: {root}")), "{raw}");
        assert!(raw.contains(&format!("References: {root}")), "{raw}");

        // Already named (any case, as a word): unchanged.
        let m = built(
            json!({"to": "a@x.example", "text": "x", "subject": "RE: so201700043 done",
            "sd_number": "SO201700043"}),
        );
        assert_eq!(m.subject, "RE: so201700043 done");
        // A longer number that merely starts with it does not count.
        let m = built(
            json!({"to": "a@x.example", "text": "x", "subject": "SO2017000431",
            "sd_number": "SO201700043"}),
        );
        assert_eq!(m.subject, "[SO201700043] SO2017000431");
        let m = built(json!({"to": "a@x.example", "text": "x", "sd_number": "SO201700043"}));
        assert_eq!(m.subject, "[SO201700043]");
    }

    #[test]
    fn in_reply_to_is_kept_with_the_thread_root() {
        let m = built(
            json!({"to": "a@x.example", "text": "x", "sd_number": "IN00001",
            "in_reply_to": "CAF=abc@mail.example.com"}),
        );
        let raw = String::from_utf8(m.raw).unwrap();
        let root = threading::thread_root_id("IN00001", &KEY, "pcr.example.edu").unwrap();
        assert!(
            raw.contains("In-Reply-To: <CAF=abc@mail.example.com>"),
            "{raw}"
        );
        let parsed = MessageParser::default().parse(raw.as_bytes()).unwrap();
        let refs: Vec<String> = parsed
            .references()
            .as_text_list()
            .unwrap()
            .iter()
            .map(|r| format!("<{r}>"))
            .collect();
        assert_eq!(refs, vec![root, "<CAF=abc@mail.example.com>".to_string()]);
        let plain =
            built(json!({"to": "a@x.example", "text": "x", "in_reply_to": "<p@q.example>"}));
        let raw = String::from_utf8(plain.raw).unwrap();
        assert!(raw.contains("In-Reply-To: <p@q.example>"), "{raw}");
        assert_eq!(threading::verify(&plain.message_id, &KEY), None);
    }

    #[test]
    fn extra_headers_are_written_and_encoded() {
        let m = built(json!({"to": "a@x.example", "text": "x",
            "headers": {"X-PCR-Note": "naïve", "X-Priority": 1}}));
        let parsed = MessageParser::default().parse(&m.raw).unwrap();
        // Unknown headers come back raw: decode the RFC 2047 words through a Subject.
        let note = parsed.header_raw("X-PCR-Note").unwrap();
        assert!(note.is_ascii(), "{note}");
        let probe = format!("Subject:{note}\r\n\r\n");
        let decoded = MessageParser::default().parse(probe.as_bytes()).unwrap();
        assert_eq!(decoded.subject(), Some("naïve"));
        assert_eq!(
            parsed.header("X-Priority").and_then(|h| h.as_text()),
            Some("1")
        );
    }

    #[test]
    fn a_broken_account_address_is_a_config_error() {
        let mut acc = account();
        acc.email = "not-an-address".into();
        let r = req(json!({"to": "a@x.example", "text": "x"})).unwrap();
        let err = build(&r, &acc, &KEY).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(err.to_string().contains("EMAIL"));
        let mut acc = account();
        acc.display_name = Some("Evil\r\nBcc: x@y".into());
        let err = build(&r, &acc, &KEY).unwrap_err();
        assert!(err.to_string().contains("DISPLAY_NAME"), "{err}");
    }

    #[test]
    fn hostile_filenames_and_names_stay_inside_their_parameter() {
        let evil = "evil\"; filename=\"x.exe; a\\b.txt";
        let m = built(
            json!({"to": [{"email": "a@x.example", "name": "Eve\" <x@evil.example>"}],
            "text": "x",
            "attachments": [{"content": "data", "filename": evil}]}),
        );
        let parsed = MessageParser::default().parse(&m.raw).unwrap();
        let names: Vec<_> = parsed.attachments().map(|a| a.attachment_name()).collect();
        assert_eq!(names, vec![Some(evil)]);
        let to: Vec<_> = parsed.to().unwrap().iter().map(|a| a.address()).collect();
        assert_eq!(to, vec![Some("a@x.example")]);
        assert_eq!(m.recipients, ["a@x.example"]);
    }

    #[test]
    fn content_base64_and_unknown_attachment_keys() {
        let r = req(json!({"to": "a@x.example", "text": "x", "attachments": [
            {"content_base64": "AAEC/w==", "filename": "b.bin"}]}))
        .unwrap();
        assert_eq!(r.attachments[0].data, vec![0, 1, 2, 255]);
        assert_eq!(r.attachments[0].content_type, "application/octet-stream");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "attachments": [
            {"content": "x", "filename": "a", "size": 3}]}));
        assert!(t.contains("unknown key 'size'"), "{t}");
        let t = err_text(json!({"to": "a@x.example", "text": "x", "attachments": [
            {"content": "x", "path": "/etc/hostname", "filename": "a"}]}));
        assert!(t.contains("exactly one"), "{t}");
    }

    /// Every text part of `m`: its Content-Transfer-Encoding and its body as sent.
    fn text_parts(raw: &[u8]) -> Vec<(String, Vec<u8>)> {
        let parsed = MessageParser::default().parse(raw).unwrap();
        parsed
            .parts
            .iter()
            .filter(|p| p.is_text())
            .map(|p| {
                let cte = p
                    .content_transfer_encoding()
                    .unwrap_or("7bit")
                    .to_ascii_lowercase();
                let body = raw[p.offset_body as usize..p.offset_end as usize].to_vec();
                (cte, body)
            })
            .collect()
    }

    /// What a 7bit part may hold (RFC 2045 §2.7 and RFC 5322 §2.1.1).
    fn assert_7bit_clean(body: &[u8], what: &str) {
        assert!(body.is_ascii(), "{what}: non-ASCII in a 7bit part");
        assert!(!body.contains(&0), "{what}: NUL in a 7bit part");
        for (i, &b) in body.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(body.get(i + 1), Some(&b'\n'), "{what}: bare CR at {i}");
            }
            if b == b'\n' {
                assert!(i > 0 && body[i - 1] == b'\r', "{what}: bare LF at {i}");
            }
        }
        for line in body.split(|&b| b == b'\n') {
            assert!(line.len() <= 999, "{what}: a line of {} octets", line.len());
        }
    }

    #[test]
    fn text_parts_are_never_7bit_with_nul_bare_cr_or_long_lines() {
        let long = "x".repeat(1500);
        let cases: Vec<(&str, String)> = vec![
            ("plain", "Hello\nworld\n".into()),
            ("nul", "before\u{0}after\nline two\u{0}\n".into()),
            ("bare cr", "one\rtwo\rthree".into()),
            ("mixed", "a\r\nb\nc\rd\r\r\ne\n\rf".into()),
            ("long line", format!("short\n{long}\nend")),
            ("long line no break", long.clone()),
            ("utf-8", "Grüße\nZoë ✓\r".into()),
            ("trailing space", "ends with space \nand tab\t\n".into()),
            ("equals and dots", "a=b\n.\n..dot\n=\n".into()),
            ("mostly binary", "\u{0}\u{1}\u{2}é\u{3}".repeat(50)),
            ("empty", String::new()),
            ("only breaks", "\n\r\r\n\n".into()),
        ];
        for (what, text) in cases {
            for html in [false, true] {
                let key = if html { "html" } else { "text" };
                let m = built(json!({"to": "a@x.example", key: text.clone()}));
                assert!(m.raw.is_ascii(), "{what}: raw message must be 7-bit");
                let parts = text_parts(&m.raw);
                assert_eq!(parts.len(), 1, "{what}");
                let (cte, body) = &parts[0];
                match cte.as_str() {
                    "7bit" => assert_7bit_clean(body, what),
                    "quoted-printable" | "base64" => {
                        for line in body.split(|&b| b == b'\n') {
                            assert!(line.len() <= 77, "{what}: encoded line {}", line.len());
                        }
                    }
                    other => panic!("{what}: {other}"),
                }
                // The text comes back with every line end as CRLF.
                let canonical = text
                    .replace("\r\n", "\n")
                    .replace('\r', "\n")
                    .replace('\n', "\r\n");
                let parsed = MessageParser::default().parse(&m.raw).unwrap();
                let got = if html {
                    parsed.body_html(0)
                } else {
                    parsed.body_text(0)
                }
                .unwrap_or_default()
                .into_owned();
                // A single part is followed by the CRLF that ends the message, which the
                // parser keeps unless base64 decoding drops it.
                let got = match cte.as_str() {
                    "base64" => got,
                    _ => got.strip_suffix("\r\n").unwrap_or(&got).to_string(),
                };
                assert_eq!(got, canonical, "{what} ({cte})");
            }
        }
    }

    #[test]
    fn a_nul_byte_is_quoted_printable() {
        let m = built(json!({"to": "a@x.example", "text": "a\u{0}b"}));
        let parts = text_parts(&m.raw);
        assert_eq!(parts[0].0, "quoted-printable");
        assert!(
            String::from_utf8_lossy(&parts[0].1).contains("a=00b"),
            "{parts:?}"
        );
    }

    #[test]
    fn line_ends_become_crlf_in_one_pass() {
        assert_eq!(crlf_line_ends("a\nb\rc\r\nd"), b"a\r\nb\r\nc\r\nd");
        assert_eq!(crlf_line_ends("\r\r\n\n\r"), b"\r\n\r\n\r\n\r\n");
        assert_eq!(crlf_line_ends(""), b"");
        assert_eq!(crlf_line_ends("no breaks"), b"no breaks");
        // Large LF-only text: a single pass (lettre's per-line insert took minutes for this).
        let text = "line\n".repeat(4 << 20);
        let out = crlf_line_ends(&text);
        assert_eq!(out.len(), text.len() + (4 << 20));
        assert!(out.ends_with(b"line\r\n"));
    }

    #[test]
    fn quoted_printable_lines_and_escapes() {
        let qp = |s: &str| String::from_utf8(quoted_printable(s.as_bytes())).unwrap();
        assert_eq!(qp("a=b"), "a=3Db");
        assert_eq!(qp("end \r\nx\t"), "end=20\r\nx=09");
        assert_eq!(qp("é"), "=C3=A9");
        // 76 characters fit on a line; the 77th needs a soft break.
        let exact = "y".repeat(76);
        assert_eq!(qp(&exact), exact);
        let over = "y".repeat(77);
        assert_eq!(qp(&over), format!("{}=\r\n{}", "y".repeat(75), "yy"));
        // An escape is never split by a soft break.
        let text = format!("{}é", "z".repeat(74));
        for line in qp(&text).split("\r\n") {
            assert!(line.len() <= 76, "{line}");
            assert!(!line.trim_end_matches('=').ends_with("=C"), "{line}");
        }
    }

    #[test]
    fn non_utf8_strings_are_refused_naming_the_key() {
        let bin = || json!({"$binary": "6Q=="}); // "\xe9": Latin-1 é
        for (message, key) in [
            (
                json!({"to": "a@x.example", "text": "x", "subject": bin()}),
                "subject",
            ),
            (json!({"to": "a@x.example", "text": bin()}), "text"),
            (json!({"to": "a@x.example", "html": bin()}), "html"),
            (json!({"to": bin(), "text": "x"}), "to"),
            (json!({"to": ["a@x.example", bin()], "text": "x"}), "to[1]"),
            (
                json!({"to": [{"email": "a@x.example", "name": bin()}], "text": "x"}),
                "to[0].name",
            ),
            (
                json!({"to": "a@x.example", "cc": {"email": bin()}, "text": "x"}),
                "cc.email",
            ),
            (
                json!({"to": "a@x.example", "text": "x", "headers": {"X-A": bin()}}),
                "headers[X-A]",
            ),
            (
                json!({"to": "a@x.example", "text": "x", "headers": [["X-A", bin()]]}),
                "headers[0][1]",
            ),
            (
                json!({"to": "a@x.example", "text": "x",
                    "attachments": [{"content": "x", "filename": bin()}]}),
                "attachments[0].filename",
            ),
            (
                json!({"to": "a@x.example", "text": "x", "attachments": [{"path": bin()}]}),
                "attachments[0].path",
            ),
            (
                json!({"to": "a@x.example", "text": "x", "attachments": [bin()]}),
                "attachments[0]",
            ),
        ] {
            let t = err_text(message);
            assert!(
                t.starts_with(&format!("{key}: not valid UTF-8")),
                "{key}: {t}"
            );
        }
        // An attachment's content is bytes: anything goes.
        let r = req(json!({"to": "a@x.example", "text": "x",
            "attachments": [{"content": {"$binary": "AOn/"}, "filename": "l1.txt"}]}))
        .unwrap();
        assert_eq!(r.attachments[0].data, vec![0, 0xe9, 0xff]);
    }

    #[test]
    fn attachment_paths_that_are_not_regular_files_are_refused_before_opening() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.path().join("link-to-pipe");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (link.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            // A FIFO without a writer would block an open() forever: this returns at once.
            let t = err_text(json!({"to": "a@x.example", "text": "x",
                "attachments": [{"path": path.to_str().unwrap()}]}));
            assert!(
                t.starts_with("attachments[0].path")
                    && t.contains(path.to_str().unwrap())
                    && t.contains(&format!("not a regular file ({kind})")),
                "{t}"
            );
        }
        // A symlink to a regular file is read through.
        let file = dir.path().join("real.txt");
        std::fs::write(&file, b"abc").unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let r = req(json!({"to": "a@x.example", "text": "x",
            "attachments": [{"path": link.to_str().unwrap()}]}))
        .unwrap();
        assert_eq!(r.attachments[0].data, b"abc");
    }

    #[test]
    fn a_file_that_reports_size_0_is_read_only_up_to_the_limit() {
        // /proc/self/pagemap says 0 bytes but has gigabytes to read.
        let t = err_text(json!({"to": "a@x.example", "text": "x",
            "attachments": [{"path": "/proc/self/pagemap"}]}));
        assert!(
            t.starts_with("attachments[0].path")
                && t.contains("/proc/self/pagemap")
                && t.contains("over the 100 MiB attachment limit"),
            "{t}"
        );
    }
}
