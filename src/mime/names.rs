//! Attachment file names: the part's own (or a forwarded message's subject), sanitised,
//! generated for nameless parts, and made unique within the message.

use std::collections::{HashMap, HashSet};

use mail_parser::parsers::MessageStream;
use mail_parser::{HeaderName, HeaderValue as MpValue, MessageParser};

use super::header::{clean_header_text, header_extent};
use super::walk::RawAttachment;
use super::{Attachment, MAX_FILENAME_BYTES};

/// Longest file name extension kept apart when a name is shortened or numbered (`.pdf`,
/// `.docx`); anything after a later dot is part of the name.
const MAX_EXTENSION_BYTES: usize = 16;

pub(super) fn finish_attachments(raw: Vec<RawAttachment>) -> Vec<Attachment> {
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

/// The subject of a forwarded message, cleaned up for use in a file name.
pub(super) fn nested_subject(data: &[u8]) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mime::tests::p;

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
}
