//! OFFICE365 transport: Microsoft Graph `POST /me/sendMail` (a signed-in account) or
//! `POST /users/{EMAIL}/sendMail` (app-only access with client credentials: the mailbox EMAIL,
//! a shared mailbox included) with the message as MIME (`Content-Type: text/plain`, the MIME
//! base64-encoded), Graph's documented MIME send, which saves the sent copy in that mailbox's
//! Sent Items. The message goes out byte for byte as built — attachments, inline images,
//! Message-ID, In-Reply-To/References and the `[SD number]` subject survive — with two changes:
//! - the From becomes the mailbox sent from when it names another address (SPEC §4: OFFICE365
//!   sends as the signed-in mailbox, or as EMAIL with app-only access; the display name is
//!   kept);
//! - the Bcc recipients (only in the envelope of a built message) are written into a `Bcc`
//!   header, the only way a MIME send names them; Exchange removes it on delivery.
//!
//! Graph refuses requests over 4 MB, so a message whose base64 form exceeds that is refused
//! up front with a clear, permanent error (large files should be sent as links).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::{BuiltMessage, CheckReport, Delivery, DeliveryStatus, Transport};
use crate::config::{Account, TransportType};
use crate::error::{Error, Result};
use crate::http::{Body, HttpClient, Method, Request, Role};
use crate::oauth::{self, ApiClient, OAuthEnv};

/// Graph's request size limit (the base64 MIME is the whole request body).
pub const GRAPH_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Sends through Microsoft Graph as the account's signed-in mailbox (app-only: as EMAIL).
#[derive(Debug)]
pub struct GraphTransport {
    api: ApiClient,
    email: String,
}

impl GraphTransport {
    /// The transport of an OFFICE365 account; tokens and the state live in `env`.
    pub fn new(account: &Account, env: &OAuthEnv) -> Result<GraphTransport> {
        Ok(GraphTransport {
            api: ApiClient::new(account, env, Role::Send)?,
            email: account.email.clone(),
        })
    }

    /// The same transport with another HTTP client (e.g. another retry policy).
    pub fn with_http(mut self, http: HttpClient) -> GraphTransport {
        self.api = self.api.with_http(http);
        self
    }

    /// The address messages are sent as: the signed-in mailbox (remembered from the sign-in,
    /// else looked up with `GET /me`); with app-only access the account's EMAIL.
    pub fn mailbox(&self) -> Result<String> {
        oauth::mailbox_address(&self.api).map_err(|e| self.api.error(e))
    }

    fn fail(&self, code: Option<u16>, transient: bool, message: String) -> Error {
        Error::transport(
            self.api.account(),
            self.api.base(),
            code,
            transient,
            message,
        )
    }
}

impl Transport for GraphTransport {
    fn send(&self, msg: &BuiltMessage) -> Result<Delivery> {
        let mailbox = self.mailbox()?;
        let raw = send_as(&msg.raw, &mailbox)
            .map_err(|m| self.fail(None, false, format!("cannot prepare the message: {m}")))?;
        let raw = with_bcc(&raw, &msg.recipients)
            .map_err(|m| self.fail(None, false, format!("cannot prepare the message: {m}")))?;
        let body = STANDARD.encode(&raw);
        if body.len() > GRAPH_MAX_REQUEST_BYTES {
            return Err(self.fail(
                Some(413),
                false,
                format!(
                    "the message is {:.1} MB; Microsoft Graph accepts at most 4 MB per request \
                     (about 3 MB of message with its attachments): send large files as links",
                    raw.len() as f64 / 1_048_576.0
                ),
            ));
        }
        let url = self.api.graph_url("/sendMail");
        self.api
            .send(Request::new(Method::Post, &url).with_body(Body::Raw {
                content_type: "text/plain",
                bytes: body.as_bytes(),
            }))
            .map_err(|e| self.api.error(e))?;
        Ok(Delivery {
            status: DeliveryStatus::Sent,
            path: None,
            server: self.api.base().to_string(),
            from: sent_from(&msg.from, &mailbox),
        })
    }

    fn check(&self) -> Result<CheckReport> {
        let mut steps = Vec::new();
        self.api.tokens().access_token()?;
        steps.push("an access token was obtained".to_string());
        if let Some(mailbox) = self.api.app_mailbox() {
            oauth::check_app_mailbox(&self.api, "sentitems").map_err(|e| self.api.error(e))?;
            steps.push(format!(
                "the application may use the mailbox {mailbox} (app-only access): mail is sent \
                 as {mailbox} and saved in its Sent Items"
            ));
            return Ok(CheckReport {
                transport: "OFFICE365",
                server: self.api.base().to_string(),
                steps,
            });
        }
        let url = self.api.url("/me?$select=mail,userPrincipalName");
        let me: serde_json::Value = self.api.json(Request::new(Method::Get, &url))?;
        let mailbox = me
            .get("mail")
            .and_then(|v| v.as_str())
            .filter(|m| !m.is_empty())
            .or_else(|| me.get("userPrincipalName").and_then(|v| v.as_str()))
            .unwrap_or("");
        steps.push(format!("signed in as {mailbox}"));
        if !mailbox.eq_ignore_ascii_case(&self.email) {
            steps.push(format!(
                "mail is sent as {mailbox}, not as the account's EMAIL {}",
                self.email
            ));
        }
        Ok(CheckReport {
            transport: "OFFICE365",
            server: self.api.base().to_string(),
            steps,
        })
    }

    fn describe(&self) -> String {
        format!(
            "OFFICE365 {} (account {})",
            self.api.base(),
            self.api.account()
        )
    }

    fn kind(&self) -> TransportType {
        TransportType::Office365
    }
}

/// The From a message built with `built_from` goes out with when sent as `mailbox`: `None`
/// when that is the same address, else the mailbox with the built display name.
fn sent_from(built_from: &str, mailbox: &str) -> Option<String> {
    let built: Option<lettre::message::Mailbox> = built_from.parse().ok();
    if built
        .as_ref()
        .is_some_and(|m| m.email.to_string().eq_ignore_ascii_case(mailbox))
    {
        return None;
    }
    let name = built.and_then(|m| m.name);
    Some(match mailbox.parse::<lettre::Address>() {
        Ok(address) => lettre::message::Mailbox::new(name, address).to_string(),
        Err(_) => mailbox.to_string(),
    })
}

// ---- Header surgery on a built message (shared with the Gmail transport) ----------------

/// One logical header of the top-level header block: its byte range (including the line
/// break(s)) and its name.
struct HeaderSpan<'a> {
    start: usize,
    end: usize,
    name: &'a str,
}

/// The headers of `raw` and the offset where the header block ends (the blank line).
fn headers(raw: &[u8]) -> std::result::Result<(Vec<HeaderSpan<'_>>, usize), String> {
    let mut spans: Vec<HeaderSpan<'_>> = Vec::new();
    let mut pos = 0;
    loop {
        if pos >= raw.len() {
            return Err("the message has no body separator (blank line)".into());
        }
        let line_end = raw[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| pos + i + 1);
        let line = &raw[pos..line_end];
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.is_empty() {
            return Ok((spans, pos));
        }
        if matches!(content[0], b' ' | b'\t') {
            match spans.last_mut() {
                Some(last) => last.end = line_end,
                None => return Err("the message starts with a continuation line".into()),
            }
        } else {
            let colon = content
                .iter()
                .position(|&b| b == b':')
                .ok_or_else(|| "a header line has no colon".to_string())?;
            let name = std::str::from_utf8(&content[..colon])
                .map_err(|_| "a header name is not ASCII".to_string())?
                .trim();
            spans.push(HeaderSpan {
                start: pos,
                end: line_end,
                name,
            });
        }
        pos = line_end;
    }
}

/// The line break the message uses (CRLF for built messages).
fn eol(raw: &[u8]) -> &'static str {
    match raw.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && raw[i - 1] == b'\r' => "\r\n",
        Some(_) => "\n",
        None => "\r\n",
    }
}

/// `raw` with its From header naming `mailbox` (display name kept) when it names another
/// address; unchanged otherwise. Also drops a `Sender` header, which would claim a second
/// identity the mailbox cannot send as.
pub(crate) fn send_as(raw: &[u8], mailbox: &str) -> std::result::Result<Vec<u8>, String> {
    let parsed = mail_parser::MessageParser::new()
        .parse_headers(raw)
        .ok_or_else(|| "the message headers cannot be parsed".to_string())?;
    let from = parsed.from().and_then(|a| a.first());
    let current = from.and_then(|a| a.address()).unwrap_or("");
    if current.eq_ignore_ascii_case(mailbox) {
        return Ok(raw.to_vec());
    }
    let name = from.and_then(|a| a.name()).map(str::to_string);
    let (spans, _) = headers(raw)?;
    let nl = eol(raw);
    let new_from = fold(
        &format!("From: {}", format_mailbox(name.as_deref(), mailbox)),
        nl,
    );
    let mut out = Vec::with_capacity(raw.len() + 64);
    let mut cursor = 0;
    let mut written = false;
    for span in &spans {
        let is_from = span.name.eq_ignore_ascii_case("From");
        if is_from || span.name.eq_ignore_ascii_case("Sender") {
            out.extend_from_slice(&raw[cursor..span.start]);
            if is_from && !written {
                out.extend_from_slice(new_from.as_bytes());
                out.extend_from_slice(nl.as_bytes());
                written = true;
            }
            cursor = span.end;
        }
    }
    if !written {
        out.extend_from_slice(new_from.as_bytes());
        out.extend_from_slice(nl.as_bytes());
    }
    out.extend_from_slice(&raw[cursor..]);
    Ok(out)
}

/// `raw` with a `Bcc` header naming the envelope recipients that are in no To/Cc/Bcc header
/// (an API send takes its recipients from the headers). Unchanged when there are none.
pub(crate) fn with_bcc(raw: &[u8], recipients: &[String]) -> std::result::Result<Vec<u8>, String> {
    let parsed = mail_parser::MessageParser::new()
        .parse_headers(raw)
        .ok_or_else(|| "the message headers cannot be parsed".to_string())?;
    let mut listed: Vec<String> = Vec::new();
    for field in [parsed.to(), parsed.cc(), parsed.bcc()]
        .into_iter()
        .flatten()
    {
        listed.extend(
            field
                .iter()
                .filter_map(|a| a.address())
                .map(str::to_ascii_lowercase),
        );
    }
    let hidden: Vec<&str> = recipients
        .iter()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty() && !listed.contains(&r.to_ascii_lowercase()))
        .collect();
    if hidden.is_empty() {
        return Ok(raw.to_vec());
    }
    for r in &hidden {
        if let Some(problem) = crate::config::address_problem(r) {
            return Err(format!("recipient `{r}` {problem}"));
        }
    }
    let (_, end) = headers(raw)?;
    let nl = eol(raw);
    let line = fold(&format!("Bcc: {}", hidden.join(", ")), nl);
    let mut out = Vec::with_capacity(raw.len() + line.len() + 2);
    out.extend_from_slice(&raw[..end]);
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(nl.as_bytes());
    out.extend_from_slice(&raw[end..]);
    Ok(out)
}

/// `Name <address>`: the name as is when it is a plain atom sequence, quoted when it has
/// specials, RFC 2047 encoded (UTF-8, base64) when it is not ASCII.
pub(crate) fn format_mailbox(name: Option<&str>, address: &str) -> String {
    let name: String = name
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .to_string();
    if name.is_empty() {
        return address.to_string();
    }
    if !name.is_ascii() {
        let mut words = Vec::new();
        let mut chunk = String::new();
        for c in name.chars() {
            if chunk.len() + c.len_utf8() > 45 {
                words.push(format!("=?UTF-8?B?{}?=", STANDARD.encode(&chunk)));
                chunk.clear();
            }
            chunk.push(c);
        }
        if !chunk.is_empty() {
            words.push(format!("=?UTF-8?B?{}?=", STANDARD.encode(&chunk)));
        }
        return format!("{} <{address}>", words.join(" "));
    }
    let atom = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~ ".contains(c);
    if name.chars().all(atom) {
        format!("{name} <{address}>")
    } else {
        let quoted = name.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{quoted}\" <{address}>")
    }
}

/// Folds a header line at spaces so no line exceeds 78 characters where possible.
fn fold(line: &str, nl: &str) -> String {
    let mut out = String::with_capacity(line.len() + 8);
    let mut current = 0;
    for (i, word) in line.split(' ').enumerate() {
        if i > 0 {
            if current + 1 + word.len() > 78 {
                out.push_str(nl);
                out.push(' ');
                current = 1;
            } else {
                out.push(' ');
                current += 1;
            }
        }
        out.push_str(word);
        current += word.len();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW: &str = "Date: Tue, 1 Jul 2025 10:00:00 +0000\r\n\
        From: Service Desk <sd@pcr.example.edu>\r\n\
        Sender: sd@pcr.example.edu\r\n\
        To: a@x.example,\r\n b@x.example\r\n\
        Subject: [SO201700043] Hello\r\n\
        Message-ID: <abc@pcr.example.edu>\r\n\
        \r\n\
        From: this is the body, not a header\r\n";

    #[test]
    fn from_is_replaced_by_the_mailbox_and_the_rest_is_byte_identical() {
        let out = send_as(RAW.as_bytes(), "helpdesk@tenant.onmicrosoft.com").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            RAW.replace(
                "From: Service Desk <sd@pcr.example.edu>\r\nSender: sd@pcr.example.edu\r\n",
                "From: Service Desk <helpdesk@tenant.onmicrosoft.com>\r\n"
            )
        );
        let same = send_as(RAW.as_bytes(), "SD@pcr.example.edu").unwrap();
        assert_eq!(same, RAW.as_bytes());
    }

    #[test]
    fn names_are_quoted_or_encoded() {
        assert_eq!(format_mailbox(None, "a@b.c"), "a@b.c");
        assert_eq!(
            format_mailbox(Some("Desk, IT"), "a@b.c"),
            "\"Desk, IT\" <a@b.c>"
        );
        assert_eq!(
            format_mailbox(Some("Zoë"), "a@b.c"),
            format!("=?UTF-8?B?{}?= <a@b.c>", STANDARD.encode("Zoë"))
        );
        let long = "É".repeat(40);
        let formatted = format_mailbox(Some(&long), "a@b.c");
        assert!(formatted.split(' ').all(|w| w.len() <= 75), "{formatted}");
        let header = format!("From: {formatted}\r\n\r\n");
        let parsed = mail_parser::MessageParser::new()
            .parse_headers(header.as_bytes())
            .unwrap();
        assert_eq!(
            parsed.from().unwrap().first().unwrap().name(),
            Some(long.as_str())
        );
    }

    #[test]
    fn envelope_only_recipients_become_a_bcc_header() {
        let recipients = vec![
            "a@x.example".to_string(),
            "B@x.example".to_string(),
            "hidden@y.example".to_string(),
        ];
        let out = String::from_utf8(with_bcc(RAW.as_bytes(), &recipients).unwrap()).unwrap();
        assert!(
            out.contains("Message-ID: <abc@pcr.example.edu>\r\nBcc: hidden@y.example\r\n\r\nFrom: this is the body"),
            "{out}"
        );
        let unchanged = with_bcc(RAW.as_bytes(), &recipients[..2]).unwrap();
        assert_eq!(unchanged, RAW.as_bytes());
        let bad = with_bcc(RAW.as_bytes(), &["x@y\r\nEvil: 1".to_string()]);
        assert!(bad.is_err());
    }

    #[test]
    fn the_reported_from_is_the_mailbox_with_the_built_name() {
        assert_eq!(
            sent_from("Service Desk <SD@x.example>", "sd@x.example"),
            None
        );
        assert_eq!(
            sent_from("Service Desk <sd@x.example>", "box@tenant.example").as_deref(),
            Some("Service Desk <box@tenant.example>")
        );
        assert_eq!(
            sent_from("sd@x.example", "box@tenant.example").as_deref(),
            Some("box@tenant.example")
        );
    }

    #[test]
    fn a_message_without_a_body_separator_is_refused() {
        assert!(send_as(b"From: a@b.c\r\nSubject: x", "z@y.c").is_err());
    }
}
