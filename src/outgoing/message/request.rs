//! Reading the `send()` array (as JSON) into a [`MessageRequest`]: the keys, the address
//! forms, headers, attachments (read from `path` here) and the check that every string is
//! UTF-8 except an attachment's bytes.

use std::path::Path;

use lettre::Address;
use serde_json::{Map, Value};

use super::validate::{check_header_text, normalize_msg_id, parse_address};
use super::{
    AttachmentData, EmailAddress, MailKind, MessageRequest, BINARY_KEY, MAX_ATTACHMENT_BYTES,
};
use crate::error::{Error, Result};

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
}

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
    use crate::outgoing::message::fixtures::*;
    use serde_json::json;

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
