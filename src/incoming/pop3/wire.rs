//! The POP3 wire layer: a buffered reader over bytes (status lines, multi-line responses with
//! dot-unstuffing and a size cap), command writing, and the module's private error type.

use std::io::{self, Read, Write};

use crate::net::describe_io_error;

/// Longest status line accepted (RFC 1939 allows 512 octets; servers add response codes).
pub(super) const STATUS_LINE_LIMIT: usize = 64 * 1024;
/// Cap for CAPA / LIST / UIDL listings.
pub(super) const LISTING_LIMIT: u64 = 64 * 1024 * 1024;
/// Longest server text kept in an error message.
const TEXT_LIMIT: usize = 200;

const READ_BUFFER: usize = 16 * 1024;

/// A POP3 failure before it gets its account and server (see `Fail::into_error`).
#[derive(Debug)]
pub(super) enum Fail {
    /// The connection failed while `doing` something. Poisons the session.
    Io { doing: String, err: io::Error },
    /// The server broke the protocol (or we cannot trust the stream any more). Poisons.
    Protocol(String),
    /// A response exceeded its cap. Poisons (the rest of the response was not read).
    TooBig { doing: String, limit: u64 },
    /// A clean `-ERR` reply: the session stays usable.
    Refused { command: String, text: String },
    /// The login was rejected.
    Auth(String),
    /// Anything already phrased as a crate error (configuration problems).
    Other(crate::Error),
}

impl Fail {
    pub(super) fn io(doing: impl Into<String>, err: io::Error) -> Fail {
        Fail::Io {
            doing: doing.into(),
            err,
        }
    }

    /// Whether the session can no longer be used after this failure.
    pub(super) fn poisons(&self) -> bool {
        matches!(
            self,
            Fail::Io { .. } | Fail::Protocol(_) | Fail::TooBig { .. }
        )
    }

    /// The message, without account or server.
    pub(super) fn describe(&self) -> String {
        match self {
            Fail::Io { doing, err } => format!("{doing}: {}", describe_io_error(err)),
            Fail::Protocol(message) => message.clone(),
            Fail::TooBig { doing, limit } => {
                format!("{doing}: the response exceeds the limit of {limit} bytes")
            }
            Fail::Refused { command, text } => format!("the server refused {command}: {text}"),
            Fail::Auth(message) => message.clone(),
            Fail::Other(err) => err.to_string(),
        }
    }

    /// The crate error, with the account and server filled in.
    pub(super) fn into_error(self, account: &str, server: &str) -> crate::Error {
        match self {
            Fail::Auth(message) => crate::Error::auth(account, message),
            Fail::Other(crate::Error::Config {
                mut location,
                message,
            }) => {
                if location.account.is_none() {
                    location.account = Some(account.to_string());
                }
                crate::Error::Config { location, message }
            }
            Fail::Other(err) => err,
            other => crate::Error::mailbox(account, server, format!("POP3: {}", other.describe())),
        }
    }
}

/// Server text made safe for messages and logs: lossy UTF-8, control characters replaced,
/// bounded length.
pub(super) fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == TEXT_LIMIT {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out.trim().to_string()
}

/// `+OK` or `-ERR` and the text after it.
pub(super) struct Status {
    pub ok: bool,
    pub text: Vec<u8>,
}

impl Status {
    pub(super) fn text(&self) -> String {
        sanitize(&self.text)
    }
}

/// A reply during SASL authentication.
pub(super) enum SaslReply {
    Status(Status),
    /// A server challenge (base64 text, possibly empty).
    Challenge(String),
}

enum LineError {
    Io(io::Error),
    Eof,
    TooLong,
}

/// A stream with a read buffer that the protocol layer owns (so an STLS upgrade can check that
/// nothing was buffered before it hands the raw stream to TLS).
pub(super) struct Conn<S> {
    stream: S,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl<S: Read + Write> Conn<S> {
    pub(super) fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    pub(super) fn get_ref(&self) -> &S {
        &self.stream
    }

    /// True when bytes the server sent are waiting in the buffer.
    pub(super) fn has_buffered(&self) -> bool {
        self.pos < self.end
    }

    pub(super) fn into_stream(self) -> S {
        self.stream
    }

    /// Writes one or more complete command lines and flushes.
    pub(super) fn send(&mut self, bytes: &[u8], doing: &str) -> Result<(), Fail> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| Fail::io(format!("sending {doing}"), e))
    }

    /// Refills the buffer; `Ok(false)` at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        loop {
            match self.stream.read(&mut self.buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.pos = 0;
                    self.end = n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends one line, including its `\n`, to `out`; fails when the line would exceed
    /// `limit` bytes or the stream ends first.
    fn read_line(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<(), LineError> {
        let mut taken = 0usize;
        loop {
            if self.pos == self.end && !self.fill().map_err(LineError::Io)? {
                return Err(LineError::Eof);
            }
            let available = &self.buf[self.pos..self.end];
            let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            taken += chunk.len();
            if taken > limit {
                return Err(LineError::TooLong);
            }
            out.extend_from_slice(chunk);
            self.pos += chunk.len();
            if done {
                return Ok(());
            }
        }
    }

    /// Reads a `+OK` / `-ERR` status line. Anything else breaks the protocol.
    pub(super) fn read_status(&mut self, doing: &str) -> Result<Status, Fail> {
        let mut line = Vec::new();
        self.read_line(&mut line, STATUS_LINE_LIMIT)
            .map_err(|e| line_fail(e, doing, STATUS_LINE_LIMIT as u64))?;
        let trimmed = trim_eol(&line);
        let (ok, rest) = if starts_with_word(trimmed, b"+OK") {
            (true, &trimmed[3..])
        } else if starts_with_word(trimmed, b"-ERR") {
            (false, &trimmed[4..])
        } else {
            return Err(Fail::Protocol(format!(
                "unexpected reply while {doing}: \"{}\"",
                sanitize(trimmed)
            )));
        };
        let text = rest.strip_prefix(b" ").unwrap_or(rest).to_vec();
        Ok(Status { ok, text })
    }

    /// Reads the reply to an `AUTH` command or a SASL response: a status line, or a
    /// continuation `+ <base64>` (RFC 5034), returned with its text.
    pub(super) fn read_sasl_reply(&mut self, doing: &str) -> Result<SaslReply, Fail> {
        let mut line = Vec::new();
        self.read_line(&mut line, STATUS_LINE_LIMIT)
            .map_err(|e| line_fail(e, doing, STATUS_LINE_LIMIT as u64))?;
        let trimmed = trim_eol(&line);
        if trimmed == b"+" || trimmed.starts_with(b"+ ") {
            let text = String::from_utf8_lossy(&trimmed[1..]).trim().to_string();
            return Ok(SaslReply::Challenge(text));
        }
        if starts_with_word(trimmed, b"+OK") {
            let rest = &trimmed[3..];
            let text = rest.strip_prefix(b" ").unwrap_or(rest).to_vec();
            return Ok(SaslReply::Status(Status { ok: true, text }));
        }
        if starts_with_word(trimmed, b"-ERR") {
            let rest = &trimmed[4..];
            let text = rest.strip_prefix(b" ").unwrap_or(rest).to_vec();
            return Ok(SaslReply::Status(Status { ok: false, text }));
        }
        Err(Fail::Protocol(format!(
            "unexpected reply while {doing}: \"{}\"",
            sanitize(trimmed)
        )))
    }

    /// Reads the body of a multi-line response into `out`, byte-exact as sent except for the
    /// dot-stuffing: line endings (CRLF or bare LF) and 8-bit bytes are kept. Ends at the `.`
    /// line; fails, without buffering more, once the body would exceed `max_bytes`.
    pub(super) fn read_multiline(
        &mut self,
        out: &mut Vec<u8>,
        max_bytes: u64,
        doing: &str,
    ) -> Result<(), Fail> {
        let start = out.len();
        let max = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        loop {
            let line_start = out.len();
            let body_len = line_start - start;
            // Room for the body's remainder plus a terminator or stuffing dot.
            let allowance = max.saturating_sub(body_len).saturating_add(3);
            self.read_line(out, allowance).map_err(|e| match e {
                LineError::Eof => Fail::Protocol(format!(
                    "the server closed the connection in the middle of {doing} (after {body_len} \
                     bytes); the partial data was discarded"
                )),
                other => line_fail(other, doing, max_bytes),
            })?;
            let line = &out[line_start..];
            if line == b".\r\n" || line == b".\n" {
                out.truncate(line_start);
                return Ok(());
            }
            if line[0] == b'.' {
                out.remove(line_start);
            }
            if out.len() - start > max {
                return Err(Fail::TooBig {
                    doing: doing.to_string(),
                    limit: max_bytes,
                });
            }
        }
    }
}

fn line_fail(err: LineError, doing: &str, limit: u64) -> Fail {
    match err {
        LineError::Io(e) => Fail::io(format!("reading the reply while {doing}"), e),
        LineError::Eof => Fail::Io {
            doing: format!("reading the reply while {doing}"),
            err: io::Error::from(io::ErrorKind::UnexpectedEof),
        },
        LineError::TooLong => Fail::TooBig {
            doing: doing.to_string(),
            limit,
        },
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `line` starts with `word` (ASCII case-insensitive) followed by the end or a space.
fn starts_with_word(line: &[u8], word: &[u8]) -> bool {
    line.len() >= word.len()
        && line[..word.len()].eq_ignore_ascii_case(word)
        && matches!(line.get(word.len()), None | Some(b' ') | Some(b'\t'))
}

/// Splits a listing body into its lines, without line endings, skipping empty ones.
pub(super) fn listing_lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|&b| b == b'\n')
        .map(trim_eol_cr)
        .filter(|l| !l.is_empty())
}

fn trim_eol_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}
