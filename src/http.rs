//! The small HTTP layer of the cloud accounts (Microsoft identity platform and Graph, Google
//! OAuth and the Gmail API), over ureq 3 with native-tls.
//!
//! - One [`HttpClient`] per account: its `TIMEOUT` bounds connecting, every read and every
//!   write (a stalled server is an error, never a hang); `VERIFY_CERT` and `CA_FILE` are
//!   honoured as by the in-house clients (one [`crate::net::TlsPolicy`]). Redirects are never followed (a bearer token is
//!   never sent anywhere the caller did not name).
//! - 429 and 503 replies are retried after their `Retry-After` (seconds or an HTTP date), or a
//!   short backoff when it is absent, at most [`RetryPolicy::max_retries`] times and within
//!   [`RetryPolicy::budget`]; a wait longer than the budget fails at once.
//! - A non-2xx reply is an [`HttpError`] carrying the status and the service's own error code
//!   (`invalid_grant`, `InvalidAuthenticationToken`, `UNAUTHENTICATED`, ...). A reply that is
//!   not the expected JSON is an error naming the endpoint, never a panic.
//! - No token, secret or authorization code ever appears in an error: errors name the method
//!   and the URL without its query, and service messages are scrubbed of the values sent.

use std::fmt;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::config::{Secret, TlsSettings};
use crate::error::{Error, Result};

/// The biggest reply body read by default (JSON replies); downloads set their own limit.
pub const DEFAULT_MAX_BODY: u64 = 16 * 1024 * 1024;
/// Longest service error text kept in an error message.
const MAX_DETAIL_CHARS: usize = 300;
const USER_AGENT: &str = concat!("pcr_email/", env!("CARGO_PKG_VERSION"));

/// How throttled requests (429, 503) are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Total time spent waiting between attempts.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 4,
            budget: Duration::from_secs(60),
        }
    }
}

/// Which side of the product a request serves; decides the error variant it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sending (`Error::Transport`).
    Send,
    /// Reading a mailbox (`Error::Mailbox`).
    Receive,
    /// Signing in an account or checking it (`Error::Auth`).
    Authorize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Patch,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// A request body.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    Empty,
    /// `application/x-www-form-urlencoded`.
    Form(&'a [(&'a str, &'a str)]),
    Json(&'a serde_json::Value),
    Raw {
        content_type: &'a str,
        bytes: &'a [u8],
    },
}

/// One request. Build with [`Request::new`] and the `with_*` methods.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: Method,
    pub url: &'a str,
    pub bearer: Option<&'a Secret>,
    pub body: Body<'a>,
    pub headers: &'a [(&'a str, &'a str)],
    /// Replies longer than this are refused ([`HttpErrorKind::TooLarge`]).
    pub max_body: u64,
    /// Form fields and the like whose values must never appear in an error (the bearer token
    /// and every form value are scrubbed already).
    pub secrets: &'a [&'a str],
}

impl<'a> Request<'a> {
    pub fn new(method: Method, url: &'a str) -> Request<'a> {
        Request {
            method,
            url,
            bearer: None,
            body: Body::Empty,
            headers: &[],
            max_body: DEFAULT_MAX_BODY,
            secrets: &[],
        }
    }
    pub fn with_bearer(mut self, token: &'a Secret) -> Self {
        self.bearer = Some(token);
        self
    }
    pub fn with_body(mut self, body: Body<'a>) -> Self {
        self.body = body;
        self
    }
    pub fn with_headers(mut self, headers: &'a [(&'a str, &'a str)]) -> Self {
        self.headers = headers;
        self
    }
    pub fn with_max_body(mut self, max: u64) -> Self {
        self.max_body = max;
        self
    }
}

/// A 2xx reply, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// `METHOD url-without-query`, for error messages.
    pub endpoint: String,
}

impl Response {
    /// The body as JSON of type `T`; anything else is an error naming the endpoint (and never
    /// quoting the body, which may hold a token).
    pub fn json<T: DeserializeOwned>(&self) -> std::result::Result<T, HttpError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| HttpError::malformed(&self.endpoint, self.status, &e))
    }
}

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpErrorKind {
    /// DNS, connection refused or reset before a reply.
    Connect,
    Timeout,
    Tls,
    Io,
    /// The server replied with a non-2xx status.
    Status,
    /// The reply was not what the API documents (bad JSON, missing field).
    Malformed,
    /// The reply was longer than the request allowed.
    TooLarge,
    /// The URL or a header could not be used (a configuration problem).
    BadRequest,
}

/// A failed request. Its `Display` names the endpoint and never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// `METHOD url-without-query`.
    pub endpoint: String,
    pub kind: HttpErrorKind,
    pub status: Option<u16>,
    /// The service's error code: OAuth `error`, Graph `error.code`, Gmail `error.status`.
    pub code: Option<String>,
    /// Gmail's `error.errors[0].reason` (e.g. `rateLimitExceeded`).
    pub reason: Option<String>,
    /// Human text (the service's description, scrubbed and shortened).
    pub detail: String,
    /// The server's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.endpoint)?;
        if let Some(status) = self.status {
            write!(f, "HTTP {status}")?;
            if let Some(code) = &self.code {
                write!(f, " {code}")?;
            }
            if !self.detail.is_empty() {
                f.write_str(": ")?;
            }
        }
        f.write_str(&self.detail)
    }
}

impl std::error::Error for HttpError {}

impl HttpError {
    /// The error for a reply (of `status`, from `endpoint`) that is not the JSON expected;
    /// the body is never quoted (it may hold a token).
    pub(crate) fn malformed(endpoint: &str, status: u16, e: &serde_json::Error) -> HttpError {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "is not valid JSON"
            }
            serde_json::error::Category::Data => "does not have the expected fields",
            serde_json::error::Category::Io => "could not be read",
        };
        HttpError {
            endpoint: endpoint.to_string(),
            kind: HttpErrorKind::Malformed,
            status: Some(status),
            code: None,
            reason: None,
            detail: format!(
                "the reply {what} (line {}, column {})",
                e.line(),
                e.column()
            ),
            retry_after: None,
        }
    }

    /// The error for a non-2xx reply: the service's error code, reason and description from
    /// `body` in any of the documented shapes, with every value in `secrets` scrubbed.
    pub(crate) fn from_reply(
        endpoint: &str,
        status: u16,
        body: &[u8],
        retry_after: Option<Duration>,
        secrets: &[&str],
    ) -> HttpError {
        let (code, reason, detail) = service_error(status, body);
        HttpError {
            endpoint: endpoint.to_string(),
            kind: HttpErrorKind::Status,
            status: Some(status),
            code: code.map(|c| scrub_secrets(&c, secrets)),
            reason,
            detail: scrub_secrets(&detail, secrets),
            retry_after,
        }
    }

    /// The error for a non-2xx OAuth reply (RFC 6749 §5.2) whose `error` and
    /// `error_description` the caller has parsed itself: what [`HttpError::from_reply`] makes
    /// of the same body.
    pub(crate) fn from_oauth_reply(
        endpoint: &str,
        status: u16,
        code: &str,
        description: Option<&str>,
        secrets: &[&str],
    ) -> HttpError {
        let detail = description.map_or_else(|| status_reason(status), str::to_string);
        HttpError {
            endpoint: endpoint.to_string(),
            kind: HttpErrorKind::Status,
            status: Some(status),
            code: Some(scrub_secrets(code, secrets)),
            reason: None,
            detail: scrub_secrets(&shorten(&first_line(&detail)), secrets),
            retry_after: None,
        }
    }

    /// True when the same request may succeed later: network trouble, 408, 429, 5xx.
    pub fn transient(&self) -> bool {
        match self.kind {
            HttpErrorKind::Connect | HttpErrorKind::Timeout | HttpErrorKind::Io => true,
            HttpErrorKind::Status => matches!(self.status, Some(408 | 429 | 500..=599)),
            HttpErrorKind::Tls
            | HttpErrorKind::Malformed
            | HttpErrorKind::TooLarge
            | HttpErrorKind::BadRequest => false,
        }
    }

    pub fn is_status(&self, status: u16) -> bool {
        self.kind == HttpErrorKind::Status && self.status == Some(status)
    }

    /// The service error code, compared case-insensitively.
    pub fn has_code(&self, code: &str) -> bool {
        self.code
            .as_deref()
            .is_some_and(|c| c.eq_ignore_ascii_case(code))
    }

    /// Throttling the API asks us to wait out: 429, 503, and Gmail's 403 rate limits.
    pub fn throttled(&self) -> bool {
        self.is_status(429)
            || self.is_status(503)
            || (self.is_status(403)
                && self.reason.as_deref().is_some_and(|r| {
                    r.eq_ignore_ascii_case("rateLimitExceeded")
                        || r.eq_ignore_ascii_case("userRateLimitExceeded")
                }))
    }

    /// The crate error for `role`: `Transport` (with the HTTP status as the code),
    /// `Mailbox` or `Auth`.
    pub fn into_error(self, role: Role, account: &str, server: &str) -> Error {
        match role {
            Role::Send => {
                let transient = self.transient();
                Error::transport(account, server, self.status, transient, self.to_string())
            }
            Role::Receive => Error::mailbox(account, server, self.to_string()),
            Role::Authorize => Error::auth(account, self.to_string()),
        }
    }
}

/// An HTTP client for one account's servers.
#[derive(Clone)]
pub struct HttpClient {
    agent: ureq::Agent,
    retry: RetryPolicy,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client with `timeout` for connecting and for every read and write, and the
    /// account's certificate settings. A zero timeout means 30 s.
    pub fn new(tls: &TlsSettings, timeout: Duration) -> Result<HttpClient> {
        let timeout = if timeout.is_zero() {
            crate::net::FALLBACK_TIMEOUT
        } else {
            timeout
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(USER_AGENT)
            .timeout_resolve(Some(timeout))
            .timeout_connect(Some(timeout))
            .timeout_send_request(Some(timeout))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(timeout))
            .timeout_per_write(Some(timeout))
            .tls_config(crate::net::TlsPolicy::new(tls)?.ureq_config())
            .build();
        Ok(HttpClient {
            agent: ureq::Agent::new_with_config(config),
            retry: RetryPolicy::default(),
        })
    }

    /// The same client with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> HttpClient {
        self.retry = retry;
        self
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Sends `req`, waiting out throttling (429/503 with `Retry-After`) within the retry
    /// policy. A 2xx reply is `Ok`; anything else is an [`HttpError`].
    pub fn execute(&self, req: &Request<'_>) -> std::result::Result<Response, HttpError> {
        self.run(req, false)
    }

    /// Like [`HttpClient::execute`], but a non-2xx reply is returned as it came (status and
    /// body) to a caller that reads the service's error itself: the `oauth2` client, which
    /// parses RFC 6749 error replies. Throttling is still waited out (and a throttled reply
    /// given up on is still an [`HttpError`]), and so is every network failure.
    pub fn execute_any(&self, req: &Request<'_>) -> std::result::Result<Response, HttpError> {
        self.run(req, true)
    }

    fn run(&self, req: &Request<'_>, any_status: bool) -> std::result::Result<Response, HttpError> {
        let started = Instant::now();
        let mut retries = 0;
        loop {
            let (resp, retry_after) = self.once(req)?;
            if (200..300).contains(&resp.status) {
                return Ok(resp);
            }
            let err = HttpError::from_reply(
                &resp.endpoint,
                resp.status,
                &resp.body,
                retry_after,
                &request_secrets(req),
            );
            if !err.throttled() || retries >= self.retry.max_retries {
                return if any_status && !err.throttled() {
                    Ok(resp)
                } else {
                    Err(err)
                };
            }
            let wait = err
                .retry_after
                .unwrap_or_else(|| Duration::from_secs(1u64 << retries.min(5)));
            let spent = started.elapsed();
            if spent + wait > self.retry.budget {
                let mut err = err;
                err.detail = format!(
                    "{}{}the server asks to wait {} s, beyond the {} s retry budget",
                    err.detail,
                    if err.detail.is_empty() { "" } else { "; " },
                    wait.as_secs(),
                    self.retry.budget.as_secs()
                );
                return Err(err);
            }
            std::thread::sleep(wait);
            retries += 1;
        }
    }

    /// One attempt: the reply whatever its status, with its `Retry-After`.
    fn once(
        &self,
        req: &Request<'_>,
    ) -> std::result::Result<(Response, Option<Duration>), HttpError> {
        let endpoint = endpoint_label(req.method, req.url);
        let fail = |kind: HttpErrorKind, detail: String| HttpError {
            endpoint: endpoint.clone(),
            kind,
            status: None,
            code: None,
            reason: None,
            detail,
            retry_after: None,
        };
        let mut builder = ureq::http::Request::builder()
            .method(req.method.as_str())
            .uri(req.url);
        if !req
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("accept"))
        {
            builder = builder.header("Accept", "application/json");
        }
        if let Some(token) = req.bearer {
            builder = builder.header("Authorization", format!("Bearer {}", token.expose()));
        }
        for (name, value) in req.headers {
            builder = builder.header(*name, *value);
        }
        let (content_type, bytes): (Option<&str>, Vec<u8>) = match req.body {
            Body::Empty => (None, Vec::new()),
            Body::Form(fields) => (
                Some("application/x-www-form-urlencoded"),
                form_encode(fields).into_bytes(),
            ),
            Body::Json(value) => (Some("application/json"), value.to_string().into_bytes()),
            Body::Raw {
                content_type,
                bytes,
            } => (Some(content_type), bytes.to_vec()),
        };
        if let Some(ct) = content_type {
            builder = builder.header("Content-Type", ct);
        }
        let request = builder.body(bytes).map_err(|e| {
            fail(
                HttpErrorKind::BadRequest,
                format!("the request cannot be built: {e}"),
            )
        })?;
        let response = self.agent.run(request).map_err(|e| {
            let (kind, detail) = describe_ureq_error(&e);
            fail(kind, detail)
        })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response
            .into_body()
            .with_config()
            .limit(req.max_body)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(limit) => fail(
                    HttpErrorKind::TooLarge,
                    format!("the reply is larger than {limit} bytes"),
                ),
                other => {
                    let (kind, detail) = describe_ureq_error(&other);
                    fail(kind, format!("reading the reply: {detail}"))
                }
            })?;
        Ok((
            Response {
                status,
                body,
                endpoint,
            },
            retry_after,
        ))
    }
}

/// The values of `req` never to be quoted in an error: its bearer token, every form value and
/// its own `secrets`.
fn request_secrets<'a>(req: &Request<'a>) -> Vec<&'a str> {
    let mut scrub: Vec<&str> = req.secrets.to_vec();
    if let Some(token) = req.bearer {
        scrub.push(token.expose());
    }
    if let Body::Form(fields) = req.body {
        scrub.extend(fields.iter().map(|(_, v)| *v));
    }
    scrub
}

/// `METHOD scheme://host/path`: the URL without user info, query or fragment.
pub fn endpoint_label(method: Method, url: &str) -> String {
    let cut = url.find(['?', '#']).map_or(url, |i| &url[..i]);
    let cut = match cut.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => cut.to_string(),
    };
    format!("{} {cut}", method.as_str())
}

fn describe_ureq_error(e: &ureq::Error) -> (HttpErrorKind, String) {
    use ureq::Error as E;
    match e {
        E::Timeout(t) => (HttpErrorKind::Timeout, format!("timed out ({t})")),
        E::HostNotFound => (HttpErrorKind::Connect, "host not found".to_string()),
        E::ConnectionFailed => (HttpErrorKind::Connect, "connection failed".to_string()),
        E::Io(io) => {
            let kind = match io.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                    HttpErrorKind::Timeout
                }
                std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::NotConnected
                | std::io::ErrorKind::AddrNotAvailable => HttpErrorKind::Connect,
                _ => HttpErrorKind::Io,
            };
            (kind, crate::net::describe_io_error(io))
        }
        E::Tls(msg) => (HttpErrorKind::Tls, format!("TLS: {msg}")),
        E::NativeTls(t) => (
            HttpErrorKind::Tls,
            crate::net::describe_tls_error(&t.to_string()),
        ),
        E::BadUri(_) | E::Http(_) => (HttpErrorKind::BadRequest, "invalid URL".to_string()),
        E::BodyExceedsLimit(limit) => (
            HttpErrorKind::TooLarge,
            format!("the reply is larger than {limit} bytes"),
        ),
        E::Protocol(p) => (HttpErrorKind::Io, format!("HTTP protocol error: {p}")),
        other => (HttpErrorKind::Io, other.to_string()),
    }
}

/// The service's error code, Gmail reason and description from an error body in any of the
/// documented shapes; a non-JSON body gives only the status line.
fn service_error(status: u16, body: &[u8]) -> (Option<String>, Option<String>, String) {
    let fallback = || status_reason(status);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None, fallback());
    };
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    match value.get("error") {
        // OAuth 2.0 (RFC 6749 §5.2): {"error": "invalid_grant", "error_description": ...}
        Some(serde_json::Value::String(code)) => {
            let detail = text(value.get("error_description")).unwrap_or_else(fallback);
            (Some(code.clone()), None, shorten(&first_line(&detail)))
        }
        // Graph {"error": {"code": "...", "message": ...}}; Gmail {"error": {"code": 401,
        // "message": ..., "status": "UNAUTHENTICATED", "errors": [{"reason": ...}]}}
        Some(obj @ serde_json::Value::Object(_)) => {
            let code = text(obj.get("code")).or_else(|| text(obj.get("status")));
            let reason = obj
                .get("errors")
                .and_then(|e| e.get(0))
                .and_then(|e| text(e.get("reason")));
            let detail = text(obj.get("message")).unwrap_or_else(fallback);
            (code, reason, shorten(&first_line(&detail)))
        }
        _ => (None, None, fallback()),
    }
}

/// The status line's reason phrase ("Bad Request"), or "error".
fn status_reason(status: u16) -> String {
    ureq::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
        .to_string()
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_string()
}

fn shorten(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= MAX_DETAIL_CHARS {
        clean
    } else {
        let mut cut: String = clean.chars().take(MAX_DETAIL_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// Replaces every occurrence of a secret value (8+ characters) by `<redacted>`.
pub fn scrub_secrets(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        if secret.len() >= 8 && out.contains(secret) {
            out = out.replace(secret, "<redacted>");
        }
    }
    out
}

/// `Retry-After`: delay-seconds or an HTTP date (IMF-fixdate, RFC 850 or asctime).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value)
        .map(|d| d.with_timezone(&chrono::Utc))
        .ok()
        .or_else(|| {
            ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
                .iter()
                .find_map(|f| chrono::NaiveDateTime::parse_from_str(value, f).ok())
                .map(|n| n.and_utc())
        })?;
    let now = chrono::Utc::now();
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

/// `application/x-www-form-urlencoded` (spaces as `+`).
pub fn form_encode(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                percent_encode(k).replace("%20", "+"),
                percent_encode(v).replace("%20", "+")
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but RFC 3986 unreserved characters: safe for a query value and
/// for one path segment.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string from pairs (each name and value percent-encoded).
pub fn query(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
pub(crate) mod test_server {
    //! A loopback HTTP server for unit tests (this module's and the OAuth client's).
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A one-shot HTTP server on loopback answering each connection with the next of
    /// `replies`; returns its base URL and a handle giving the raw requests it received.
    pub(crate) fn serve(replies: Vec<String>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in replies {
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = conn.read(&mut chunk).unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                seen.push(String::from_utf8_lossy(&buf).to_string());
                conn.write_all(reply.as_bytes()).unwrap();
            }
            seen
        });
        (url, handle)
    }

    pub(crate) fn reply(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
            body.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_server::{reply, serve};
    use super::*;
    use std::net::TcpListener;

    fn client() -> HttpClient {
        HttpClient::new(&TlsSettings::default(), Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let wait = parse_retry_after(&later).unwrap();
        assert!((Duration::from_secs(27)..=Duration::from_secs(30)).contains(&wait));
        assert!(parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT").is_some());
        assert!(parse_retry_after("Sun Nov  6 08:49:37 1994").is_some());
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn endpoints_hide_query_and_user_info() {
        assert_eq!(
            endpoint_label(Method::Get, "https://u:p@h.example/a/b?code=SECRET#x"),
            "GET https://h.example/a/b"
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(percent_encode("a b/c?=&é"), "a%20b%2Fc%3F%3D%26%C3%A9");
        assert_eq!(
            form_encode(&[("scope", "openid mail.send"), ("x", "a+b")]),
            "scope=openid+mail.send&x=a%2Bb"
        );
    }

    #[test]
    fn throttled_requests_wait_out_retry_after() {
        let (url, server) = serve(vec![
            reply("429 Too Many Requests", "Retry-After: 1\r\n", ""),
            reply("503 Service Unavailable", "Retry-After: 0\r\n", ""),
            reply(
                "200 OK",
                "Content-Type: application/json\r\n",
                r#"{"ok":true}"#,
            ),
        ]);
        let started = Instant::now();
        let resp = client()
            .execute(&Request::new(Method::Get, &format!("{url}/x")))
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(950));
        assert_eq!(resp.json::<serde_json::Value>().unwrap()["ok"], true);
        assert_eq!(server.join().unwrap().len(), 3);
    }

    #[test]
    fn a_wait_beyond_the_budget_fails_at_once() {
        let (url, server) = serve(vec![reply(
            "429 Too Many Requests",
            "Retry-After: 120\r\n",
            r#"{"error":{"code":"TooManyRequests","message":"slow down"}}"#,
        )]);
        let started = Instant::now();
        let err = client()
            .with_retry(RetryPolicy {
                max_retries: 3,
                budget: Duration::from_secs(10),
            })
            .execute(&Request::new(Method::Get, &format!("{url}/x")))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.is_status(429) && err.transient(), "{err}");
        assert_eq!(err.retry_after, Some(Duration::from_secs(120)));
        assert!(err.to_string().contains("retry budget"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn error_bodies_give_codes_and_never_echo_secrets() {
        let (url, server) = serve(vec![reply(
            "400 Bad Request",
            "Content-Type: application/json\r\n",
            r#"{"error":"invalid_grant","error_description":"refresh token rt-SECRET-123456 was revoked\r\nTrace ID: 1"}"#,
        )]);
        let err = client()
            .execute(
                &Request::new(Method::Post, &format!("{url}/token?x=1")).with_body(Body::Form(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", "rt-SECRET-123456"),
                ])),
            )
            .unwrap_err();
        let text = err.to_string();
        assert!(err.has_code("invalid_grant"), "{text}");
        assert!(!text.contains("rt-SECRET-123456"), "{text}");
        assert!(!text.contains("Trace ID"), "{text}");
        assert!(
            text.starts_with(&format!("POST {url}/token: HTTP 400")),
            "{text}"
        );
        assert!(!err.transient());
        let requests = server.join().unwrap();
        assert!(requests[0].contains("grant_type=refresh_token&refresh_token=rt-SECRET-123456"));
    }

    #[test]
    fn execute_any_returns_error_replies_but_still_waits_out_throttling() {
        let (url, server) = serve(vec![
            reply("429 Too Many Requests", "Retry-After: 0\r\n", ""),
            reply(
                "400 Bad Request",
                "Content-Type: application/json\r\n",
                r#"{"error":"invalid_grant"}"#,
            ),
            reply("503 Service Unavailable", "Retry-After: 0\r\n", ""),
        ]);
        let resp = client()
            .execute_any(&Request::new(Method::Post, &format!("{url}/token")))
            .unwrap();
        assert_eq!(resp.status, 400);
        assert_eq!(resp.body, br#"{"error":"invalid_grant"}"#);
        // A throttled reply given up on is an error, as with `execute`.
        let no_retries = RetryPolicy {
            max_retries: 0,
            budget: Duration::from_secs(10),
        };
        let err = client()
            .with_retry(no_retries)
            .execute_any(&Request::new(Method::Post, &format!("{url}/token")))
            .unwrap_err();
        assert!(err.is_status(503) && err.transient(), "{err}");
        assert_eq!(server.join().unwrap().len(), 3);
    }

    #[test]
    fn malformed_json_names_the_endpoint() {
        let (url, server) = serve(vec![reply("200 OK", "", "{\"access_token\": \"abc\"")]);
        let resp = client()
            .execute(&Request::new(Method::Get, &format!("{url}/me")))
            .unwrap();
        let err = resp.json::<serde_json::Value>().unwrap_err();
        assert_eq!(err.kind, HttpErrorKind::Malformed);
        let text = err.to_string();
        assert!(text.contains(&format!("GET {url}/me")), "{text}");
        assert!(!text.contains("abc"), "{text}");
        server.join().unwrap();
    }

    #[test]
    fn oversized_replies_are_refused() {
        let (url, server) = serve(vec![reply("200 OK", "", &"x".repeat(5000))]);
        let err = client()
            .execute(&Request::new(Method::Get, &format!("{url}/big")).with_max_body(1000))
            .unwrap_err();
        assert_eq!(err.kind, HttpErrorKind::TooLarge, "{err}");
        server.join().unwrap();
    }

    #[test]
    fn a_dead_server_is_a_transient_connect_error() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = client()
            .execute(&Request::new(
                Method::Get,
                &format!("http://127.0.0.1:{port}/x"),
            ))
            .unwrap_err();
        assert_eq!(err.kind, HttpErrorKind::Connect, "{err}");
        assert!(err.transient());
        let e = err.into_error(Role::Send, "7", "http://x");
        assert!(matches!(e, Error::Transport(ref f) if f.transient && f.code.is_none()));
    }

    #[test]
    fn a_missing_ca_file_is_a_config_error() {
        let tls = TlsSettings {
            verify_cert: true,
            ca_file: Some("/nonexistent/ca.pem".into()),
        };
        let err = HttpClient::new(&tls, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("CA_FILE"), "{err}");
    }
}
