//! Encoding text parts and attachments ourselves, in time linear in their size: canonical CRLF
//! line ends, `7bit` / quoted-printable / base64 chosen so the message stays 7-bit clean.

use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, SinglePart};

/// A `text/plain` or `text/html` part (UTF-8), encoded here rather than by lettre, in time
/// linear in the text: lettre's `Body::new` inserts each missing CR with `String::insert`
/// (quadratic in an LF-only text) and declares text with NUL bytes or bare CRs `7bit`.
pub(super) fn text_part(content_type: ContentType, text: &str) -> SinglePart {
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
pub(super) fn base64_lines(data: &[u8]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outgoing::message::fixtures::*;
    use mail_parser::{MessageParser, MimeHeaders};
    use serde_json::json;

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
}
