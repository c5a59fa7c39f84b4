//! PCR-360's rules applied to a parsed mail (SPEC §6): the SD Number its subject names and
//! whether it is an auto-reply or a bounce, which never creates an Inquiry. [`crate::mime`]
//! only parses; these are worked out from what it gives (the subject, the headers, the sender,
//! the message's own Content-Type) when the incoming mail is decided, and are `$mail`'s
//! `sd_number` (when the subject names the item) and `auto`.
//!
//! - **`sd_number`** ([`sd_number_in`]): what `SD_NUMBER_PATTERN` matches in the subject
//!   (its capture group 1 when it has one).
//! - **`auto`** ([`auto_kind`]): `bounce` for a DSN (`multipart/report` other than read
//!   receipts), mail from `mailer-daemon`/`postmaster`, or an `X-Failed-Recipients` header;
//!   `auto-reply` for `Auto-Submitted` other than `no`, `X-Autoreply`, `X-Autorespond`,
//!   `X-Autoresponse`, `Precedence: bulk|junk|list|auto_reply` and read receipts (MDN); then
//!   `bounce` for an empty `Return-Path: <>` (after the auto-reply checks, because
//!   out-of-office replies are also sent with a null sender). `X-Auto-Response-Suppress` is
//!   deliberately **not** a signal: it asks the *receiver* not to auto-reply, and Exchange,
//!   Outlook add-ins and many ticketing and CRM tools put it on ordinary human mail; counting
//!   it would silently drop real requests. Genuine Exchange out-of-office replies carry
//!   `Auto-Submitted` anyway. A message whose header block could not be parsed
//!   ([`ParsedMail::structured`]) is not classified: it goes to a person.

use regex::Regex;
use serde::Serialize;

use crate::mime::ParsedMail;

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

/// The SD Number in a subject: capture group 1 of `pattern` when it has one, else the match.
pub fn sd_number_in(subject: &str, pattern: &Regex) -> Option<String> {
    let caps = pattern.captures(subject)?;
    caps.get(1)
        .or_else(|| caps.get(0))
        .map(|m| m.as_str().to_string())
        .filter(|s| !s.is_empty())
}

/// Whether `mail` is an auto-reply or a bounce (see the module docs); `None` for a human's mail.
pub fn auto_kind(mail: &ParsedMail) -> Option<AutoKind> {
    if !mail.structured {
        return None;
    }
    let headers = &mail.headers;
    let value = |name: &str| {
        headers
            .get(name)
            .map(|f| f.first().trim().to_ascii_lowercase())
    };
    let root = mail.root_type.as_ref();
    let is_report = root.is_some_and(|t| t.main == "multipart" && t.sub == "report");
    let is_mdn = is_report
        && root.and_then(|t| t.report_type.as_deref()) == Some("disposition-notification");

    if is_report && !is_mdn {
        return Some(AutoKind::Bounce);
    }
    if let Some(from) = &mail.from {
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

    if mail.return_path.as_deref() == Some("") {
        return Some(AutoKind::Bounce);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_SD_NUMBER_PATTERN;
    use crate::mime;

    fn pattern() -> Regex {
        Regex::new(DEFAULT_SD_NUMBER_PATTERN).unwrap()
    }

    fn auto_of(headers: &str) -> Option<AutoKind> {
        auto_kind(&mime::parse(
            format!("{headers}Subject: s\r\n\r\nbody\r\n").as_bytes(),
        ))
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
    fn mail_without_a_parsable_header_block_is_not_classified() {
        // Its header lines are read by hand, and the mail goes to a person.
        let mail = mime::parse(b"not a header\r\nX-Autoreply: yes\r\n\r\nbody\r\n");
        assert!(!mail.structured);
        assert_eq!(mail.header("x-autoreply"), Some("yes"));
        assert_eq!(auto_kind(&mail), None);
        let mail = mime::parse(b"From: a@b.c\r\nX-Autoreply: yes\r\n\r\nbody\r\n");
        assert!(mail.structured);
        assert_eq!(auto_kind(&mail), Some(AutoKind::AutoReply));
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
        let mail = mime::parse(b"From: a@b.c\r\nSubject: Re: [IQ00031] x\r\n\r\n.\r\n");
        assert_eq!(sd_number_in(&mail.subject, &re).as_deref(), Some("IQ00031"));
    }
}
