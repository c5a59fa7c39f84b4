//! SMTP replies: reading one (multi-line, bounded) from the connection, the EHLO
//! capabilities, and the failures of an exchange phrased for the caller.

use std::io::{self, BufRead};
use std::time::Duration;

use super::connection::Conn;
use crate::config::SslMode;
use crate::error::Error;
use crate::net;

/// Longest reply line accepted from a server (RFC 5321 says 512; be lenient).
const MAX_REPLY_LINE: usize = 8192;
/// Most lines in one multi-line reply.
const MAX_REPLY_LINES: usize = 512;
/// Longest server text kept in an error message.
const MAX_TEXT_IN_ERROR: usize = 400;

/// One SMTP reply: the code and its text lines.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub(super) code: u16,
    pub(super) lines: Vec<String>,
}

impl Reply {
    pub(super) fn positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The reply as one line, without control characters, bounded.
    pub(super) fn text(&self) -> String {
        let joined: String = self
            .lines
            .iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        let joined = joined.trim();
        if joined.len() <= MAX_TEXT_IN_ERROR {
            return format!("{} {joined}", self.code).trim_end().to_string();
        }
        let mut end = MAX_TEXT_IN_ERROR;
        while !joined.is_char_boundary(end) {
            end -= 1;
        }
        format!("{} {}...", self.code, &joined[..end])
    }
}

/// What the server supports, from its EHLO reply.
#[derive(Debug, Clone, Default)]
pub(super) struct Caps {
    pub(super) starttls: bool,
    pub(super) pipelining: bool,
    pub(super) eight_bit: bool,
    pub(super) smtputf8: bool,
    /// `SIZE n` (0 = no limit announced).
    pub(super) size: Option<u64>,
    pub(super) auth: Vec<String>,
}

impl Caps {
    pub(super) fn parse(reply: &Reply) -> Caps {
        let mut caps = Caps::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => caps.auth.extend(words.map(|w| w.to_ascii_uppercase())),
                _ => {
                    if let Some(list) = keyword.strip_prefix("AUTH=") {
                        caps.auth.push(list.to_string());
                        caps.auth.extend(words.map(|w| w.to_ascii_uppercase()));
                    }
                }
            }
        }
        caps.auth.dedup();
        caps
    }

    pub(super) fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.pipelining {
            parts.push("PIPELINING".to_string());
        }
        if self.eight_bit {
            parts.push("8BITMIME".to_string());
        }
        if self.smtputf8 {
            parts.push("SMTPUTF8".to_string());
        }
        if let Some(size) = self.size {
            parts.push(format!("SIZE {size}"));
        }
        if !self.auth.is_empty() {
            parts.push(format!("AUTH {}", self.auth.join(" ")));
        }
        if parts.is_empty() {
            "no extensions".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// Why an SMTP exchange failed (converted to [`Error::Transport`] with the account).
#[derive(Debug)]
pub(super) enum Fail {
    /// A network error (connect, read, write, timeout) at `stage`.
    Io { stage: &'static str, err: io::Error },
    /// No reply after the whole message was sent: it may or may not have been accepted.
    NoReplyAfterData { err: Option<io::Error> },
    /// The TLS handshake failed.
    Tls(io::Error),
    /// The server closed the connection at `stage`.
    Closed { stage: &'static str },
    /// A negative reply.
    Reply { what: String, reply: Reply },
    /// One or more recipients refused: `(address, reply)`.
    Recipients(Vec<(String, Reply)>),
    /// The server said something that is not SMTP.
    Protocol {
        stage: &'static str,
        message: String,
    },
    /// A problem found on our side (missing extension, size, ...).
    Local { message: String, transient: bool },
    /// The whole error, already phrased (a refused token, the token source's own error).
    Fatal(Error),
}

impl Fail {
    pub(super) fn tls(err: io::Error) -> Fail {
        Fail::Tls(err)
    }

    /// True when the failure looks like a pooled connection the server had closed (so the
    /// message was certainly not accepted and a new connection may succeed).
    pub(super) fn stale_connection(&self) -> bool {
        match self {
            Fail::Io { stage, .. } | Fail::Closed { stage } => *stage != "connect",
            Fail::Reply { reply, .. } => reply.code == 421,
            _ => false,
        }
    }

    /// `(code, transient, message)`.
    pub(super) fn describe(self, timeout: Duration, ssl: SslMode) -> (Option<u16>, bool, String) {
        let io_text = |err: &io::Error| {
            if matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) {
                format!("timed out after {} s", timeout.as_secs_f32())
            } else {
                net::describe_io_error(err)
            }
        };
        match self {
            Fail::Io {
                stage: "connect",
                err,
            } => (None, true, format!("cannot connect: {}", io_text(&err))),
            Fail::Io { stage, err } => {
                let mut text = format!("{} at the {stage}", io_text(&err));
                if stage == "greeting"
                    && ssl != SslMode::Ssl
                    && matches!(
                        err.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    )
                {
                    text.push_str(
                        " (the server sent nothing; if it expects TLS from the start, set \
                         OUTGOING_SSL = SSL)",
                    );
                }
                (None, true, text)
            }
            Fail::NoReplyAfterData { err } => {
                let why = err
                    .as_ref()
                    .map(io_text)
                    .unwrap_or_else(|| "the server closed the connection".to_string());
                (
                    None,
                    true,
                    format!(
                        "no reply after the message was sent ({why}); the server may or may \
                         not have accepted it"
                    ),
                )
            }
            Fail::Tls(err) => {
                let timed_out = matches!(
                    err.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                );
                if timed_out {
                    let text = format!("TLS handshake {}", io_text(&err));
                    (None, true, text)
                } else {
                    (None, false, net::describe_io_error(&err))
                }
            }
            Fail::Closed { stage } => (
                None,
                true,
                format!("the server closed the connection at the {stage}"),
            ),
            Fail::Reply { what, reply } => {
                let transient = (400..500).contains(&reply.code);
                (
                    Some(reply.code),
                    transient,
                    format!("{what}: {}", reply.text()),
                )
            }
            Fail::Recipients(refused) => {
                let code = refused.first().map(|(_, r)| r.code);
                let transient = refused.iter().all(|(_, r)| (400..500).contains(&r.code));
                let list: Vec<String> = refused
                    .iter()
                    .map(|(addr, r)| format!("<{addr}> {}", r.text()))
                    .collect();
                (
                    code,
                    transient,
                    format!(
                        "recipient refused, message not sent to anyone: {}",
                        list.join("; ")
                    ),
                )
            }
            Fail::Protocol { stage, message } => (
                None,
                false,
                format!("unexpected answer at the {stage}: {message} (is this an SMTP server?)"),
            ),
            Fail::Local { message, transient } => (None, transient, message),
            Fail::Fatal(err) => (None, false, err.to_string()),
        }
    }
}

impl Conn {
    fn read_line(&mut self, stage: &'static str) -> Result<String, Fail> {
        let mut line = Vec::new();
        loop {
            let available = match self.stream.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(Fail::Io { stage, err }),
            };
            if available.is_empty() {
                return Err(Fail::Closed { stage });
            }
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            line.extend_from_slice(&available[..take]);
            self.stream.consume(take);
            if line.len() > MAX_REPLY_LINE {
                return Err(Fail::Protocol {
                    stage,
                    message: format!("a reply line longer than {MAX_REPLY_LINE} bytes"),
                });
            }
            if done {
                break;
            }
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    pub(super) fn read_reply(&mut self, stage: &'static str) -> Result<Reply, Fail> {
        if std::mem::take(&mut self.wrote) {
            self.round_trips += 1;
        }
        let mut lines = Vec::new();
        loop {
            let line = self.read_line(stage)?;
            let bytes = line.as_bytes();
            let code = (bytes.len() >= 3 && bytes[..3].iter().all(u8::is_ascii_digit))
                .then(|| line[..3].parse::<u16>().ok())
                .flatten()
                .filter(|c| (200..600).contains(c));
            let Some(code) = code else {
                let shown: String = line.chars().take(80).filter(|c| !c.is_control()).collect();
                return Err(Fail::Protocol {
                    stage,
                    message: format!("{shown:?}"),
                });
            };
            lines.push(line.get(4..).unwrap_or("").to_string());
            match bytes.get(3) {
                Some(b'-') if lines.len() < MAX_REPLY_LINES => continue,
                Some(b'-') => {
                    return Err(Fail::Protocol {
                        stage,
                        message: format!("a reply of more than {MAX_REPLY_LINES} lines"),
                    })
                }
                None | Some(b' ') => return Ok(Reply { code, lines }),
                Some(_) => {
                    return Err(Fail::Protocol {
                        stage,
                        message: format!("{:?}", line.chars().take(80).collect::<String>()),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_capabilities_are_parsed() {
        let reply = Reply {
            code: 250,
            lines: vec![
                "mail.example.edu Hello".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "8bitmime".into(),
                "AUTH PLAIN login".into(),
                "AUTH=LOGIN".into(),
                "STARTTLS".into(),
            ],
        };
        let caps = Caps::parse(&reply);
        assert!(caps.pipelining && caps.eight_bit && caps.starttls && !caps.smtputf8);
        assert_eq!(caps.size, Some(1000));
        assert!(caps.auth.contains(&"PLAIN".to_string()));
        assert!(caps.auth.contains(&"LOGIN".to_string()));
    }

    #[test]
    fn reply_text_is_bounded_and_clean() {
        let r = Reply {
            code: 550,
            lines: vec!["5.1.1 a\u{7}b".into(), "x".repeat(1000)],
        };
        let t = r.text();
        assert!(t.starts_with("550 5.1.1 ab x"), "{t}");
        assert!(t.len() < MAX_TEXT_IN_ERROR + 10);
    }
}
