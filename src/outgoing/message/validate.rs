//! The rules of a well-formed message ([`MessageRequest::validate`]): recipients, header text
//! without line breaks or control characters, header names we do not own, content ids,
//! Message-IDs, attachment sizes.

use lettre::message::header::ContentType;
use lettre::Address;

use super::{MailKind, MessageRequest, MAX_ATTACHMENT_BYTES};
use crate::error::{Error, Result};
use crate::threading;

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

pub(super) fn is_forbidden_header_char(c: char) -> bool {
    c.is_control() && c != '\t'
}

/// Rejects CR, LF, NUL and other control characters in anything that becomes a header.
pub(super) fn check_header_text(text: &str, field: &str) -> Result<()> {
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

pub(super) fn parse_address(text: &str, field: &str) -> Result<Address> {
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
pub(super) fn normalize_msg_id(id: &str) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use crate::outgoing::message::fixtures::*;
    use serde_json::json;

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
}
