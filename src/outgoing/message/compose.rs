//! Composing the RFC 5322 message ([`build`]): From, recipients and envelope, subject and
//! threading headers, and the MIME structure of text, HTML, inline images and attachments.

use lettre::address::Envelope;
use lettre::message::header::{
    self, ContentDisposition, ContentTransferEncoding, ContentType, HeaderName, HeaderValue,
};
use lettre::message::{Body, Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};

use super::encode::{base64_lines, text_part};
use super::validate::{is_forbidden_header_char, parse_address};
use super::{AttachmentData, BuiltMessage, EmailAddress, MessageRequest};
use crate::config::Account;
use crate::error::{Error, Result};
use crate::threading;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outgoing::message::fixtures::*;
    use mail_parser::{MessageParser, MimeHeaders};
    use serde_json::json;

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
}
