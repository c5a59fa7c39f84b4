//! Decoding: transfer encodings (leniently when the data is damaged), charsets of bodies and
//! of raw 8-bit headers, RFC 2047 encoded words, RFC 2231 parameters and `format=flowed`.

use std::borrow::Cow;

use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::parsers::MessageStream;
use mail_parser::HeaderValue as MpValue;

use super::header::clean_header_text;
use super::Problems;

pub(super) type HeaderDecoder = (String, fn(&[u8]) -> String);

/// Longest charset label looked at (IANA's longest are under 50 characters).
const MAX_CHARSET_LABEL: usize = 64;

/// The charset to read raw 8-bit header bytes in: the first 8-bit `charset=` the message
/// declares (near its top), if any.
pub(super) fn charset_hint(raw: &[u8]) -> Option<HeaderDecoder> {
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

/// Where `needle` (lower-case ASCII) first occurs in `hay`, ignoring ASCII case. Jumps between
/// candidates of its first letter with `memchr`: these scans cover every byte of every message.
fn find_ascii_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), &hay[..=last_start])
        .find(|&i| hay[i + 1..i + needle.len()].eq_ignore_ascii_case(rest))
}

/// Converts one header field to UTF-8 when it is not: raw ISO-2022-JP escapes, or 8-bit
/// bytes read in the message's charset (else Windows-1252).
pub(super) fn transcode_field<'f, 'h>(
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

/// Decodes one raw header value (folded, possibly RFC 2047-encoded) into a trimmed string
/// without control characters ([`clean_header_text`]).
pub(super) fn decode_header_bytes(bytes: &[u8]) -> String {
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

/// An RFC 2231 parameter (`name*=charset'lang'%xx`, or `name*0*=`, `name*1=`, ...),
/// decoded; `None` when the header has no RFC 2231 form of `param`.
pub(super) fn rfc2231_param(header_value: &str, param: &str) -> Option<String> {
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

/// Joins the soft line breaks of `format=flowed` text (RFC 3676): a line ending in a space
/// continues on the next line of the same quote depth; space-stuffing is undone.
pub(super) fn unflow(text: &str, delsp: bool) -> String {
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

/// CRLF and lone CR become LF, in place and in one pass (bodies are most of every message).
pub(super) fn normalize_newlines(s: String) -> String {
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

pub(super) fn is_utf8_name(charset: &str) -> bool {
    let c = charset.to_ascii_lowercase();
    matches!(
        c.as_str(),
        "utf-8" | "utf8" | "unicode-1-1-utf-8" | "x-unicode20utf8"
    )
}

/// Decodes body bytes: in `charset` when known; otherwise as UTF-8 when valid, else
/// Windows-1252. Declared UTF-8 stays UTF-8 with U+FFFD for the bad bytes.
pub(super) fn decode_text(bytes: &[u8], charset: Option<&str>) -> String {
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
pub(super) fn lenient_base64(input: &[u8]) -> Vec<u8> {
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
pub(super) fn lenient_qp(input: &[u8]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mime::tests::{p, pb};

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
    fn format_flowed_is_unwrapped() {
        assert_eq!(
            unflow("one \ntwo\n\n> a \n> b\n-- \nsig\n", false),
            "one two\n\n> a b\n-- \nsig\n"
        );
        assert_eq!(unflow("ab \ncd", true), "abcd");
        assert_eq!(unflow(" From stuffed\n", false), "From stuffed\n");
    }
}
