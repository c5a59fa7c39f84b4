//! Our own reader of IMAP responses, for the pipelined `UID FETCH <set> (UID BODY.PEEK[])`
//! the `imap` crate cannot do: it hands over one response at a time, reading each message's
//! literal straight into its own buffer, so memory holds one message, not a whole batch.
//!
//! A response is read as line segments; a segment ending in `{n}` is followed by an n-byte
//! literal, after which the response goes on. The segments are joined with a NUL byte in the
//! literal's place (NUL cannot occur in IMAP text) and then tokenized.

use std::io;

use super::wire::{Transport, Wire};

/// The longest line segment accepted (a FETCH response line without its literals).
pub const MAX_LINE: usize = 1 << 20;
/// More literals than this in one response is not a FETCH we asked for.
const MAX_LITERALS: usize = 64;
const LITERAL: u8 = 0;

/// A tagged reply's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
}

/// One server response, reduced to what the FETCH loop needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// `* <seq> FETCH (...)`: the UID and the whole message when the response carries them
    /// (a response without `BODY[]` is a flag update; `BODY[] NIL` a vanished message).
    Fetch {
        seq: u32,
        uid: Option<u32>,
        body: Option<Vec<u8>>,
    },
    Tagged {
        tag: String,
        status: Status,
        text: String,
    },
    /// `* BYE`: the server is closing the connection.
    Bye(String),
    /// `+ ...`: not expected during FETCH.
    Continuation(String),
    /// Any other untagged response (EXISTS, EXPUNGE, RECENT, OK, ...).
    Untagged,
}

/// Why a response could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Protocol(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Reads one complete response. A literal larger than `max_literal` is refused before any of
/// it is read (the connection is then unusable).
pub fn read_response<S: Transport>(
    wire: &Wire<S>,
    max_literal: usize,
) -> Result<Response, ReadError> {
    let mut text = Vec::new();
    let mut literals: Vec<Option<Vec<u8>>> = Vec::new();
    loop {
        let mut segment = Vec::new();
        wire.read_line(&mut segment, MAX_LINE)?;
        strip_line_end(&mut segment);
        if segment.contains(&LITERAL) {
            return Err(ReadError::Protocol(
                "the server sent a NUL byte in a response line".to_string(),
            ));
        }
        match literal_marker(&segment) {
            Some((prefix, size)) => {
                if size > max_literal as u64 {
                    return Err(ReadError::Protocol(format!(
                        "the server announced a {size}-byte item, more than the {max_literal} \
                         bytes allowed"
                    )));
                }
                if literals.len() >= MAX_LITERALS {
                    return Err(ReadError::Protocol(
                        "the server sent a response with too many literals".to_string(),
                    ));
                }
                let size = size as usize;
                text.extend_from_slice(&segment[..prefix]);
                text.push(LITERAL);
                let mut data = crate::incoming::gate::buffer(size);
                wire.read_exact_into(&mut data, size)?;
                literals.push(Some(data));
            }
            None => {
                text.extend_from_slice(&segment);
                break;
            }
        }
    }
    parse(&text, literals)
}

fn strip_line_end(line: &mut Vec<u8>) {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
}

/// `(prefix length, size)` when the segment ends with `{size}` (or `{size+}`).
fn literal_marker(segment: &[u8]) -> Option<(usize, u64)> {
    let body = segment.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((open, size))
}

#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    Open,
    Close,
    Atom(&'a [u8]),
    Quoted(Vec<u8>),
    Literal(usize),
    End,
}

struct Tokens<'a> {
    text: &'a [u8],
    pos: usize,
    literal: usize,
}

impl<'a> Tokens<'a> {
    fn new(text: &'a [u8]) -> Self {
        Tokens {
            text,
            pos: 0,
            literal: 0,
        }
    }

    fn rest(&self) -> &'a [u8] {
        &self.text[self.pos.min(self.text.len())..]
    }

    fn next(&mut self) -> Result<Token<'a>, ReadError> {
        let text = self.text;
        while self.pos < text.len() && text[self.pos] == b' ' {
            self.pos += 1;
        }
        let Some(&first) = text.get(self.pos) else {
            return Ok(Token::End);
        };
        match first {
            b'(' => {
                self.pos += 1;
                Ok(Token::Open)
            }
            b')' => {
                self.pos += 1;
                Ok(Token::Close)
            }
            LITERAL => {
                self.pos += 1;
                self.literal += 1;
                Ok(Token::Literal(self.literal - 1))
            }
            b'"' => {
                let mut out = Vec::new();
                let mut i = self.pos + 1;
                loop {
                    match text.get(i) {
                        None => {
                            return Err(ReadError::Protocol(
                                "unterminated quoted string in a response".to_string(),
                            ))
                        }
                        Some(b'"') => break,
                        Some(b'\\') if i + 1 < text.len() => {
                            out.push(text[i + 1]);
                            i += 2;
                        }
                        Some(&b) => {
                            out.push(b);
                            i += 1;
                        }
                    }
                }
                self.pos = i + 1;
                Ok(Token::Quoted(out))
            }
            _ => {
                let start = self.pos;
                let mut i = start;
                while let Some(&b) = text.get(i) {
                    match b {
                        b'[' => {
                            // A section (`BODY[HEADER.FIELDS (A B)]`) may hold spaces and
                            // parentheses; it ends at its `]`.
                            match text[i..].iter().position(|&c| c == b']') {
                                Some(len) => i += len + 1,
                                None => i = text.len(),
                            }
                        }
                        b' ' | b'(' | b')' | b'"' | LITERAL => break,
                        _ => i += 1,
                    }
                }
                self.pos = i;
                Ok(Token::Atom(&text[start..i]))
            }
        }
    }

    /// Skips one value (an atom, string, literal or a whole parenthesized list).
    fn skip_value(&mut self) -> Result<(), ReadError> {
        match self.next()? {
            Token::Open => {
                let mut depth = 1usize;
                while depth > 0 {
                    match self.next()? {
                        Token::Open => depth += 1,
                        Token::Close => depth -= 1,
                        Token::End => return Err(unreadable_fetch()),
                        _ => {}
                    }
                }
                Ok(())
            }
            Token::Atom(_) | Token::Quoted(_) | Token::Literal(_) => Ok(()),
            Token::Close | Token::End => Err(unreadable_fetch()),
        }
    }
}

fn unreadable_fetch() -> ReadError {
    ReadError::Protocol("unreadable FETCH response from the server".to_string())
}

fn number(bytes: &[u8]) -> Option<u32> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Server text for humans: printable, bounded.
pub fn clean_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if text.chars().count() > 300 {
        out.push('…');
    }
    out.trim().to_string()
}

fn parse(text: &[u8], mut literals: Vec<Option<Vec<u8>>>) -> Result<Response, ReadError> {
    if let Some(rest) = text.strip_prefix(b"+") {
        return Ok(Response::Continuation(clean_text(rest)));
    }
    let mut tokens = Tokens::new(text);
    let Token::Atom(first) = tokens.next()? else {
        return Err(ReadError::Protocol(format!(
            "unreadable response from the server: \"{}\"",
            clean_text(text)
        )));
    };
    if first != b"*" {
        let tag = String::from_utf8_lossy(first).into_owned();
        let status = match tokens.next()? {
            Token::Atom(s) if s.eq_ignore_ascii_case(b"OK") => Status::Ok,
            Token::Atom(s) if s.eq_ignore_ascii_case(b"NO") => Status::No,
            Token::Atom(s) if s.eq_ignore_ascii_case(b"BAD") => Status::Bad,
            _ => {
                return Err(ReadError::Protocol(format!(
                    "unreadable reply from the server: \"{}\"",
                    clean_text(text)
                )))
            }
        };
        return Ok(Response::Tagged {
            tag,
            status,
            text: clean_text(tokens.rest()),
        });
    }
    let kind = match tokens.next()? {
        Token::Atom(a) => a,
        _ => return Ok(Response::Untagged),
    };
    if kind.eq_ignore_ascii_case(b"BYE") {
        return Ok(Response::Bye(clean_text(tokens.rest())));
    }
    let Some(seq) = number(kind) else {
        return Ok(Response::Untagged);
    };
    match tokens.next()? {
        Token::Atom(a) if a.eq_ignore_ascii_case(b"FETCH") => {}
        _ => return Ok(Response::Untagged),
    }
    if tokens.next()? != Token::Open {
        return Err(unreadable_fetch());
    }
    let (mut uid, mut body) = (None, None);
    loop {
        let name = match tokens.next()? {
            Token::Close => break,
            Token::Atom(name) => name.to_ascii_uppercase(),
            _ => return Err(unreadable_fetch()),
        };
        match name.as_slice() {
            b"UID" => match tokens.next()? {
                Token::Atom(n) => uid = Some(number(n).ok_or_else(unreadable_fetch)?),
                _ => return Err(unreadable_fetch()),
            },
            b"BODY[]" | b"RFC822" | b"BINARY[]" => match tokens.next()? {
                Token::Literal(i) => {
                    body = literals.get_mut(i).and_then(Option::take);
                    if body.is_none() {
                        return Err(unreadable_fetch());
                    }
                }
                Token::Quoted(q) => body = Some(q),
                // NIL: expunged by another session meanwhile (what Dovecot sends).
                Token::Atom(a) if a.eq_ignore_ascii_case(b"NIL") => body = None,
                _ => return Err(unreadable_fetch()),
            },
            _ => tokens.skip_value()?,
        }
    }
    Ok(Response::Fetch { seq, uid, body })
}

#[cfg(test)]
mod tests {
    use super::super::wire::mock::MockStream;
    use super::*;
    use std::time::Duration;

    fn responses(input: &[u8], chunk: usize) -> Vec<Response> {
        let wire = Wire::new(MockStream::new(input, chunk), Duration::from_secs(1));
        let mut out = Vec::new();
        while wire.buffered() > 0 || out.is_empty() || wire.bytes_in() < input.len() as u64 {
            out.push(read_response(&wire, 1 << 20).unwrap());
        }
        out
    }

    #[test]
    fn fetch_responses_with_literals_in_any_attribute_order() {
        let body = b"Subject: x\r\n\r\nline one\r\n)\r\n* 9 FETCH (not a response)\r\n\xff\xfe";
        let mut input = Vec::new();
        input.extend_from_slice(b"* 3 FETCH (UID 17 FLAGS (\\Seen $Label) BODY[] {");
        input.extend_from_slice(body.len().to_string().as_bytes());
        input.extend_from_slice(b"}\r\n");
        input.extend_from_slice(body);
        input.extend_from_slice(b")\r\n");
        input.extend_from_slice(b"* 4 FETCH (BODY[] {3}\r\nabc UID 18)\r\n");
        input.extend_from_slice(b"* 5 FETCH (FLAGS (\\Deleted))\r\n");
        input.extend_from_slice(b"* 22 EXISTS\r\n");
        input.extend_from_slice(b"* 6 FETCH (UID 20 BODY[] \"q\\\"x\")\r\n");
        input.extend_from_slice(b"P1 OK Fetch completed (0.001 + 0.000 secs).\r\n");
        for chunk in [1, 7, 4096] {
            let got = responses(&input, chunk);
            assert_eq!(
                got,
                vec![
                    Response::Fetch {
                        seq: 3,
                        uid: Some(17),
                        body: Some(body.to_vec())
                    },
                    Response::Fetch {
                        seq: 4,
                        uid: Some(18),
                        body: Some(b"abc".to_vec())
                    },
                    Response::Fetch {
                        seq: 5,
                        uid: None,
                        body: None
                    },
                    Response::Untagged,
                    Response::Fetch {
                        seq: 6,
                        uid: Some(20),
                        body: Some(b"q\"x".to_vec())
                    },
                    Response::Tagged {
                        tag: "P1".into(),
                        status: Status::Ok,
                        text: "Fetch completed (0.001 + 0.000 secs).".into()
                    },
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn other_attributes_and_sections_are_skipped() {
        let input = b"* 1 FETCH (UID 5 BODY[HEADER.FIELDS (SUBJECT FROM)] {4}\r\nab\r\n \
                      INTERNALDATE \"17-Jul-1996 02:44:25 -0700\" MODSEQ (12) BODY[] {2}\r\nhi)\r\n\
                      a1 NO [EXPUNGEISSUED] Some messages were expunged\r\n";
        let got = responses(input, 3);
        assert_eq!(
            got[0],
            Response::Fetch {
                seq: 1,
                uid: Some(5),
                body: Some(b"hi".to_vec())
            }
        );
        assert_eq!(
            got[1],
            Response::Tagged {
                tag: "a1".into(),
                status: Status::No,
                text: "[EXPUNGEISSUED] Some messages were expunged".into()
            }
        );
    }

    #[test]
    fn vanished_bye_continuation_and_bare_lf() {
        let mut got = responses(
            b"* 1 FETCH (UID 1 BODY[] NIL)\r\n* BYE Server shutting down\n+ go on\r\n",
            5,
        );
        assert_eq!(
            got.remove(0),
            Response::Fetch {
                seq: 1,
                uid: Some(1),
                body: None
            }
        );
        assert_eq!(got[0], Response::Bye("Server shutting down".into()));
        assert_eq!(got[1], Response::Continuation("go on".into()));
    }

    #[test]
    fn oversized_literal_is_refused_before_reading_it() {
        let wire = Wire::new(
            MockStream::new(b"* 1 FETCH (UID 1 BODY[] {999999}\r\nxx", 4096),
            Duration::from_secs(1),
        );
        match read_response(&wire, 1000) {
            Err(ReadError::Protocol(m)) => assert!(m.contains("999999"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_message_is_an_error_not_a_short_message() {
        let wire = Wire::new(
            MockStream::new(b"* 1 FETCH (UID 1 BODY[] {100}\r\nonly a part", 4096),
            Duration::from_secs(1),
        );
        match read_response(&wire, 1000) {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        for bad in [
            &b"* 1 FETCH (UID x)\r\n"[..],
            b"* 1 FETCH UID 1\r\n",
            b"* 1 FETCH (UID 1 BODY[] )\r\n",
            b"* 1 FETCH (UID 1 FLAGS (\\Seen\r\n",
            b"a1 MAYBE\r\n",
            b"* 1 FETCH (a\x00b)\r\n",
        ] {
            let wire = Wire::new(MockStream::new(bad, 4096), Duration::from_secs(1));
            assert!(
                matches!(read_response(&wire, 1000), Err(ReadError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn literal_markers() {
        assert_eq!(literal_marker(b"* 1 FETCH (BODY[] {12}"), Some((18, 12)));
        assert_eq!(literal_marker(b"x {3+}"), Some((2, 3)));
        assert_eq!(literal_marker(b"a1 OK done"), None);
        assert_eq!(literal_marker(b"text {}"), None);
        assert_eq!(literal_marker(b"text {1x}"), None);
    }
}
