//! Running commands on the session: the `imap` crate's commands (a failure other than NO/BAD
//! drops the connection), commands written on the wire directly with their tagged replies,
//! and the errors, cleaned of secrets, that name the account and server.

use super::fetch::{self, Status};
use super::wire::Wire;
use super::{ImapMailbox, ImapSession};
use crate::error::{Error, Result};
use crate::net::{self, MaybeTls};

/// Reads replies up to the one tagged `tag`, handing every other line to `untagged`
/// (literals, which these replies do not normally have, are read and dropped).
pub(super) fn read_tagged(
    wire: &Wire<MaybeTls>,
    tag: &str,
    mut untagged: impl FnMut(&str),
) -> std::io::Result<(Status, String)> {
    loop {
        let mut line = Vec::new();
        wire.read_line(&mut line, fetch::MAX_LINE)?;
        let mut literals = 0;
        // Only untagged data can carry literals; a tagged reply's text is just text.
        while let Some(n) = line
            .starts_with(b"* ")
            .then(|| literal_length(&line))
            .flatten()
        {
            literals += 1;
            if n > fetch::MAX_LINE || literals > 64 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the server announced an unexpected literal of {n} bytes"),
                ));
            }
            let mut skipped = Vec::new();
            wire.read_exact_into(&mut skipped, n)?;
            wire.read_line(&mut line, fetch::MAX_LINE)?;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if let Some(reply) = tagged_status(text, tag) {
            return Ok(reply);
        }
        untagged(text);
    }
}

/// The status and text of `line` when it is the reply tagged `tag`.
fn tagged_status(line: &str, tag: &str) -> Option<(Status, String)> {
    let rest = line.strip_prefix(tag)?.strip_prefix(' ')?;
    let (word, info) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = match word.to_ascii_uppercase().as_str() {
        "OK" => Status::Ok,
        "NO" => Status::No,
        _ => Status::Bad,
    };
    Some((status, info.to_string()))
}

/// The length of the literal a reply line announces at its end (`{123}` or `{123+}`).
fn literal_length(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `(UID, size)` from `* 12 FETCH (UID 40 RFC822.SIZE 3012)` (items in any order).
pub(super) fn listed_size(line: &str) -> Option<(u32, u64)> {
    let rest = line.strip_prefix("* ")?;
    let (_, rest) = rest.split_once(' ')?;
    let items = rest
        .get(..5)
        .filter(|w| w.eq_ignore_ascii_case("FETCH"))
        .map(|_| &rest[5..])?;
    let items = items
        .trim()
        .strip_prefix('(')?
        .trim_end()
        .strip_suffix(')')?;
    // Each item name is followed by its value; other items (FLAGS lists) are passed over.
    let words: Vec<&str> = items.split_ascii_whitespace().collect();
    let value_of = |name: &str| {
        words
            .windows(2)
            .find(|w| w[0].eq_ignore_ascii_case(name))
            .map(|w| w[1])
    };
    let uid = value_of("UID")?.parse().ok()?;
    let size = value_of("RFC822.SIZE")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((uid, size))
}

impl ImapMailbox {
    pub(super) fn mailbox_error(&self, message: String) -> Error {
        Error::mailbox(&self.account, &self.server, message)
    }

    /// Removes the password from server text, in case a server echoes it back — as sent in
    /// LOGIN, or inside the base64 AUTHENTICATE PLAIN response — and likewise the access
    /// tokens sent and their initial responses.
    pub(super) fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if !secret.is_empty() && out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "<redacted>");
            }
        }
        out
    }

    pub(super) fn io_error(&self, what: &str, e: &std::io::Error) -> Error {
        self.mailbox_error(format!("{what}: {}", net::describe_io_error(e)))
    }

    /// One command before login, on the wire directly (the crate's client cannot send
    /// STARTTLS over a stream it did not build): the untagged lines, the status and its text.
    pub(super) fn raw_command(
        &self,
        wire: &Wire<MaybeTls>,
        tag: &str,
        command: &str,
    ) -> Result<(Vec<String>, Status, String)> {
        let what = format!("sending {command}");
        wire.send(format!("{tag} {command}\r\n").as_bytes())
            .map_err(|e| self.io_error(&what, &e))?;
        let mut lines = Vec::new();
        for _ in 0..1000 {
            let mut line = Vec::new();
            wire.read_line(&mut line, fetch::MAX_LINE)
                .map_err(|e| self.io_error(&what, &e))?;
            let text = fetch::clean_text(&line);
            if let Some((status, info)) = tagged_status(&text, tag) {
                return Ok((lines, status, info));
            }
            lines.push(text);
        }
        Err(self.mailbox_error(format!("{what}: the server sent no reply")))
    }

    pub(super) fn error(&self, what: &str, e: &imap::Error) -> Error {
        let detail = match e {
            imap::Error::Io(io) => net::describe_io_error(io),
            imap::Error::No(no) => format!("the server said NO: {}", no.information),
            imap::Error::Bad(bad) => format!("the server said BAD: {}", bad.information),
            imap::Error::Bye(bye) => {
                format!("the server closed the connection: {}", bye.information)
            }
            imap::Error::ConnectionLost => "the server closed the connection".to_string(),
            imap::Error::Parse(_) | imap::Error::Unexpected(_) => {
                "unreadable response from the server".to_string()
            }
            imap::Error::TagMismatch(_) => {
                "the server answered out of turn (tag mismatch)".to_string()
            }
            imap::Error::Validate(_) => {
                "a name or value contains a line break and cannot be sent".to_string()
            }
            other => other.to_string(),
        };
        let detail = fetch::clean_text(self.redact(&detail).as_bytes());
        self.mailbox_error(format!("{what}: {detail}"))
    }

    pub(super) fn session_gone(&self) -> Error {
        self.mailbox_error(format!(
            "the connection was dropped after an earlier error ({})",
            self.poisoned.as_deref().unwrap_or("closed")
        ))
    }

    /// Runs one crate command. A failure other than a NO/BAD reply drops the connection.
    pub(super) fn run<T>(
        &mut self,
        what: &str,
        op: impl FnOnce(&mut ImapSession) -> imap::Result<T>,
    ) -> Result<T> {
        let Some(mut session) = self.session.take() else {
            return Err(self.session_gone());
        };
        match op(&mut session) {
            Ok(value) => {
                session.take_all_unsolicited().for_each(drop);
                self.session = Some(session);
                Ok(value)
            }
            Err(e) => {
                let err = self.error(what, &e);
                if matches!(
                    e,
                    imap::Error::No(_) | imap::Error::Bad(_) | imap::Error::Validate(_)
                ) {
                    self.session = Some(session);
                } else {
                    self.poison(&err);
                }
                Err(err)
            }
        }
    }

    pub(super) fn poison(&mut self, err: &Error) {
        self.session = None;
        if self.poisoned.is_none() {
            self.poisoned = Some(match err {
                Error::Mailbox(m) => m.message.clone(),
                other => other.to_string(),
            });
        }
    }

    pub(super) fn next_tag(&mut self) -> String {
        self.raw_tag += 1;
        format!("P{}", self.raw_tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_lines_give_uid_and_size_in_any_order() {
        assert_eq!(
            listed_size("* 12 FETCH (UID 40 RFC822.SIZE 3012)"),
            Some((40, 3012))
        );
        assert_eq!(
            listed_size("* 1 fetch (FLAGS (\\Seen \\Recent) RFC822.SIZE 7 UID 3)"),
            Some((3, 7))
        );
        assert_eq!(listed_size("* 1 FETCH (FLAGS (\\Seen))"), None);
        assert_eq!(listed_size("* 3 EXISTS"), None);
        assert_eq!(listed_size("* 1 FETCH (UID x RFC822.SIZE 7)"), None);
        assert_eq!(literal_length(b"* OK [ALERT] {12}\r\n"), Some(12));
        assert_eq!(literal_length(b"* 1 FETCH (X {3+}\r\n"), Some(3));
        assert_eq!(literal_length(b"* OK done {x}\r\n"), None);
        assert_eq!(literal_length(b"* OK done\r\n"), None);
    }
}
