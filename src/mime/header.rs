//! The header block of one MIME entity: where it ends, its fields as mail-parser reads them
//! (addresses, Message-IDs, parameters, dates), and header text made safe for the host.

use mail_parser::{Address as MpAddress, ContentType, Header, HeaderName, HeaderValue as MpValue};

use super::decode::rfc2231_param;
use super::{slice, MailAddress};

/// The parsed header block of one MIME entity. `bytes` is the block as parsed (raw 8-bit
/// fields already converted to UTF-8); the headers' offsets point into it.
pub(super) struct HeaderBlock {
    pub(super) bytes: Vec<u8>,
    pub(super) headers: Vec<Header<'static>>,
}

impl HeaderBlock {
    pub(super) fn get(&self, name: &HeaderName<'_>) -> Option<&Header<'static>> {
        self.headers.iter().find(|h| &h.name == name)
    }

    pub(super) fn value(&self, name: &HeaderName<'_>) -> Option<&MpValue<'static>> {
        self.get(name).map(|h| &h.value)
    }

    pub(super) fn raw(&self, h: &Header<'_>) -> &[u8] {
        slice(&self.bytes, h.offset_start as usize, h.offset_end as usize)
    }

    fn content_type(&self) -> Option<&ContentType<'static>> {
        self.value(&HeaderName::ContentType)
            .and_then(|v| v.as_content_type())
    }

    /// `(type, subtype)`, lower case, when a Content-Type is given.
    pub(super) fn mime(&self) -> Option<(String, String)> {
        self.content_type().map(|ct| {
            (
                ct.ctype().trim().to_ascii_lowercase(),
                ct.subtype().unwrap_or("").trim().to_ascii_lowercase(),
            )
        })
    }

    /// A parameter of Content-Type or Content-Disposition; RFC 2231 forms are decoded here
    /// (mail-parser decodes only the first segment of a continuation in its charset).
    pub(super) fn param(&self, header: &HeaderName<'_>, name: &str) -> Option<String> {
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

    pub(super) fn disposition(&self) -> Option<String> {
        self.value(&HeaderName::ContentDisposition)
            .and_then(|v| v.as_content_type())
            .map(|d| d.ctype().trim().to_ascii_lowercase())
    }

    pub(super) fn text(&self, name: &HeaderName<'_>) -> Option<String> {
        match self.value(name)? {
            MpValue::Text(t) => Some(clean_header_text(t)),
            MpValue::TextList(l) => l.first().map(|t| clean_header_text(t)),
            _ => None,
        }
        .filter(|s| !s.is_empty())
    }

    pub(super) fn ids(&self, name: &HeaderName<'_>) -> Vec<String> {
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

    pub(super) fn addresses(&self, name: &HeaderName<'_>) -> Vec<MailAddress> {
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
pub(super) fn header_extent(entity: &[u8]) -> (usize, usize) {
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

/// Splits raw bytes into the header block and the body (after the first blank line).
pub(super) fn split_head_body(raw: &[u8]) -> (&[u8], &[u8]) {
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
pub(super) fn header_fields(head: &[u8]) -> Vec<&[u8]> {
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

pub(super) fn trim_end_ws(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && b[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    &b[..end]
}

/// Header text safe to hand to the host: every run of white space that holds a control
/// character (CR, LF, NUL, tab, other C0/C1 controls, U+2028/U+2029) becomes one space, so a
/// value can neither break a line nor carry a NUL; other spaces are kept. Trimmed.
pub(super) fn clean_header_text(s: &str) -> String {
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

pub(super) fn strip_brackets(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix('<').unwrap_or(s);
    let s = s.strip_suffix('>').unwrap_or(s);
    s.trim().to_string()
}

pub(super) fn rfc3339(dt: &mail_parser::DateTime) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mime::tests::{p, pb};

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
}
