//! The walk of the MIME tree over the raw bytes: every delimiter found in one pass, each part
//! opened, body text and HTML and attachments collected, within the bounds of [`Limits`].

use std::collections::HashMap;

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::parsers::MessageStream;
use mail_parser::{Header, HeaderName, MessageParser};

use super::decode::{
    charset_hint, decode_text, is_utf8_name, lenient_base64, lenient_qp, transcode_field, unflow,
    HeaderDecoder,
};
use super::header::{
    clean_header_text, header_extent, header_fields, strip_brackets, trim_end_ws, HeaderBlock,
};
use super::names::nested_subject;
use super::{slice, Limits, Problems, MAX_MIME_DEPTH};

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

pub(super) struct DelimiterIndex {
    by_boundary: HashMap<Vec<u8>, Vec<Delimiter>>,
}

impl DelimiterIndex {
    /// Every line that starts with `--`, by the boundary it would delimit (a superset of the
    /// real delimiters, which is all the lookups by declared boundary need). Lines are found
    /// with a vectorised search for `\n--`: base64 bodies have none, so this costs little
    /// more than one pass of `memmem` over the message.
    pub(super) fn build(raw: &[u8]) -> DelimiterIndex {
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

/// Boundaries we will guess for multiparts that lack one (each guess scans the body).
const MAX_BOUNDARY_GUESSES: usize = 8;

#[derive(Default)]
pub(super) struct Collected {
    pub(super) texts: Vec<String>,
    pub(super) htmls: Vec<String>,
    pub(super) attachments: Vec<RawAttachment>,
}

pub(super) struct RawAttachment {
    pub(super) name: Option<String>,
    pub(super) content_type: String,
    pub(super) content_id: Option<String>,
    pub(super) inline: bool,
    pub(super) data: Vec<u8>,
}

/// An entity whose header block has been read.
pub(super) struct Opened {
    pub(super) block: HeaderBlock,
    pub(super) body_start: usize,
    pub(super) end: usize,
    /// IMAP-style part number (`1.2`), empty for the message itself; used in problems.
    pub(super) path: String,
    /// A part of a `multipart/digest`: `message/rfc822` unless it says otherwise.
    pub(super) in_digest: bool,
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

pub(super) struct Walker<'a> {
    pub(super) raw: &'a [u8],
    pub(super) index: &'a DelimiterIndex,
    /// The message's charset for raw 8-bit header bytes, looked for only when a header has
    /// some (most have none, and the search reads up to 256 KB of the message).
    pub(super) hint: std::cell::OnceCell<Option<HeaderDecoder>>,
    pub(super) problems: Problems,
    pub(super) flattened: bool,
    pub(super) guesses: usize,
    pub(super) limits: Limits,
    /// Entities opened so far (the message itself included).
    pub(super) parts: usize,
    /// Decoded bytes collected so far.
    pub(super) decoded: usize,
    /// A bound was reached: nothing more is collected.
    pub(super) parts_full: bool,
    pub(super) bytes_full: bool,
}

impl Walker<'_> {
    /// Reads the header block of the entity `start..end`; returns it and where the body starts.
    pub(super) fn open(&mut self, start: usize, end: usize) -> (HeaderBlock, usize) {
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
    pub(super) fn walk_opened(
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

    /// Counts `len` decoded bytes against [`MAX_DECODED_BYTES`](super::MAX_DECODED_BYTES);
    /// false (and nothing more is collected) when they do not fit.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mime::tests::{nested_multipart, p, pb};
    use crate::mime::{parse_within, MAX_DECODED_BYTES, MAX_MIME_PARTS};
    use std::time::{Duration, Instant};

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
            parse_within(raw.as_bytes(), limits)
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
            parse_within(raw.as_bytes(), limits)
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
}
