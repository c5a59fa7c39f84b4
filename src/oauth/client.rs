//! The `oauth2` crate over our one HTTP stack.
//!
//! [`OAuthClient`] is `oauth2`'s typed client with our [`TokenReply`] as its token response;
//! it builds the authorization URL (PKCE S256, `state`) and the token requests (authorization
//! code with the PKCE verifier, refresh token, client credentials). [`Transport`] is the
//! synchronous HTTP client `oauth2` sends them with: every request goes through the account's
//! [`HttpClient`] (ureq with our TLS trust, timeouts, redirects refused, 429/503 waited out),
//! and [`Transport::error`] turns `oauth2`'s [`RequestTokenError`] back into the
//! [`HttpError`] the rest of the module maps (`grant_error`), with the same texts as before:
//! the service's `error` code and description, no value sent ever quoted.

use std::cell::RefCell;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AccessToken, AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, HttpRequest,
    HttpResponse, RefreshToken, RequestTokenError, Scope, StandardRevocableToken, SyncHttpClient,
    TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::error::{Error, Result};
use crate::http::{endpoint_label, Body, HttpClient, HttpError, HttpErrorKind, Method, Request};

/// A token is renewed this long before it expires (at most a quarter of its lifetime).
const RENEW_BEFORE_SECS: i64 = 60;

/// `oauth2`'s client with our token reply; `HasAuthUrl` is [`EndpointSet`] for the sign-in
/// (authorization URL), the token endpoint is always set.
pub(crate) type OAuthClient<HasAuthUrl = EndpointNotSet> = oauth2::Client<
    BasicErrorResponse,
    TokenReply,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    HasAuthUrl,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// The client of one application at one token endpoint. The client id and secret travel in
/// the form (`client_secret_post`), as Microsoft and Google document it.
pub(crate) fn token_client(
    account: &str,
    client_id: &str,
    client_secret: Option<&Secret>,
    token_url: &str,
) -> Result<OAuthClient> {
    let token_url = TokenUrl::new(token_url.to_string()).map_err(|e| {
        Error::account_key(
            account,
            "OAUTH.TOKEN_ENDPOINT",
            format!("not a valid URL ({e})"),
        )
    })?;
    let client = oauth2::Client::<
        BasicErrorResponse,
        TokenReply,
        BasicTokenIntrospectionResponse,
        StandardRevocableToken,
        BasicRevocationErrorResponse,
    >::new(ClientId::new(client_id.to_string()))
    .set_auth_type(AuthType::RequestBody)
    .set_token_uri(token_url);
    Ok(match client_secret {
        Some(secret) => client.set_client_secret(ClientSecret::new(secret.expose().to_string())),
        None => client,
    })
}

/// The scopes as `oauth2` sends them (joined with spaces).
pub(crate) fn oauth_scopes(scopes: &[String]) -> impl Iterator<Item = Scope> + '_ {
    scopes.iter().map(|s| Scope::new(s.clone()))
}

/// The token endpoint's success reply (RFC 6749 §5.1), as lenient as the hand-written one it
/// replaces: `expires_in` may be a number or a numeric string (`oauth2`'s stock reply refuses
/// a string), and a missing or odd `token_type` or `scope` is no reason to drop a token.
/// Its `Debug` shows no token (`oauth2`'s secret types print `[redacted]`).
#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct TokenReply {
    access_token: AccessToken,
    #[serde(default = "bearer", deserialize_with = "token_type")]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<i64>,
    #[serde(default)]
    refresh_token: Option<RefreshToken>,
    #[serde(default, rename = "scope", deserialize_with = "space_delimited")]
    scopes: Option<Vec<Scope>>,
}

fn bearer() -> BasicTokenType {
    BasicTokenType::Bearer
}

/// `token_type`, case-insensitive (RFC 6749 §5.1); Bearer unless it names another.
fn token_type<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BasicTokenType, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(t) if t.eq_ignore_ascii_case("mac") => BasicTokenType::Mac,
        serde_json::Value::String(t) if !t.eq_ignore_ascii_case("bearer") && !t.is_empty() => {
            BasicTokenType::Extension(t)
        }
        _ => BasicTokenType::Bearer,
    })
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        N(i64),
        S(String),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        Some(Either::N(n)) => Some(n),
        Some(Either::S(s)) => s.trim().parse().ok(),
        None => None,
    })
}

/// `scope`: space-delimited (RFC 6749 §3.3); anything else is taken as not given.
fn space_delimited<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<Scope>>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(
            s.split_whitespace()
                .map(|scope| Scope::new(scope.to_string()))
                .collect(),
        ),
        _ => None,
    })
}

impl TokenResponse for TokenReply {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

impl TokenReply {
    /// When to stop using the access token (Unix seconds): its expiry minus a margin; one
    /// hour when the reply says nothing.
    pub fn use_until(&self, now: i64) -> i64 {
        let lifetime = self.expires_in.unwrap_or(3600).max(1);
        now + lifetime - RENEW_BEFORE_SECS.min(lifetime / 4)
    }

    pub fn access_token(&self) -> &str {
        self.access_token.secret()
    }

    /// The refresh token, when the reply carries a non-empty one.
    pub fn refresh_token(&self) -> Option<&str> {
        self.refresh_token
            .as_ref()
            .map(|t| t.secret().as_str())
            .filter(|t| !t.is_empty())
    }
}

/// What `oauth2` reports for a failed token request.
pub(crate) type TokenError = RequestTokenError<HttpError, BasicErrorResponse>;

/// `oauth2`'s synchronous HTTP client: one account's [`HttpClient`]. Remembers the last
/// exchange (endpoint, status, the values sent) so that [`Transport::error`] can report a
/// failure exactly as [`HttpClient::execute`] would.
pub(crate) struct Transport<'h> {
    http: &'h HttpClient,
    last: RefCell<Option<Exchange>>,
}

struct Exchange {
    endpoint: String,
    status: u16,
    /// The form values sent (tokens, codes, the client secret): scrubbed from error texts.
    sent: Vec<String>,
}

impl<'h> Transport<'h> {
    pub(crate) fn new(http: &'h HttpClient) -> Transport<'h> {
        Transport {
            http,
            last: RefCell::new(None),
        }
    }

    /// The [`HttpError`] for a failed `oauth2` request to `token_url`: network failures and
    /// throttling given up on as they came; an RFC 6749 error reply (`ServerResponse`) with
    /// its `error` as the code and its `error_description` as the detail; an unreadable reply
    /// as malformed (2xx) or by its status and body.
    pub(crate) fn error(&self, e: TokenError, token_url: &str) -> HttpError {
        let last = self.last.borrow();
        let endpoint = last.as_ref().map_or_else(
            || endpoint_label(Method::Post, token_url),
            |x| x.endpoint.clone(),
        );
        let sent: Vec<&str> = last
            .as_ref()
            .map(|x| x.sent.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let status = last.as_ref().map(|x| x.status);
        let success = status.is_some_and(|s| (200..300).contains(&s));
        match (e, status) {
            (RequestTokenError::Request(e), _) => e,
            (RequestTokenError::ServerResponse(reply), status) => HttpError::from_oauth_reply(
                &endpoint,
                status.unwrap_or(400),
                reply.error().as_ref(),
                reply.error_description().map(String::as_str),
                &sent,
            ),
            (RequestTokenError::Parse(e, _), Some(status)) if success => {
                HttpError::malformed(&endpoint, status, e.inner())
            }
            (RequestTokenError::Parse(_, body), Some(status)) => {
                HttpError::from_reply(&endpoint, status, &body, None, &sent)
            }
            (RequestTokenError::Other(_), Some(status)) if !success => {
                HttpError::from_reply(&endpoint, status, b"", None, &sent)
            }
            (RequestTokenError::Other(what), Some(status)) => HttpError {
                endpoint,
                kind: HttpErrorKind::Malformed,
                status: Some(status),
                code: None,
                reason: None,
                detail: format!("the reply is not usable ({})", what.trim()),
                retry_after: None,
            },
            (RequestTokenError::Parse(..) | RequestTokenError::Other(_), None) => HttpError {
                endpoint,
                kind: HttpErrorKind::BadRequest,
                status: None,
                code: None,
                reason: None,
                detail: "the token request cannot be built".to_string(),
                retry_after: None,
            },
        }
    }
}

impl SyncHttpClient for Transport<'_> {
    type Error = HttpError;

    fn call(&self, request: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        let url = request.uri().to_string();
        let method = match request.method().as_str() {
            "POST" => Method::Post,
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            other => {
                return Err(HttpError {
                    endpoint: endpoint_label(Method::Post, &url),
                    kind: HttpErrorKind::BadRequest,
                    status: None,
                    code: None,
                    reason: None,
                    detail: format!("unsupported method {other}"),
                    retry_after: None,
                })
            }
        };
        let endpoint = endpoint_label(method, &url);
        let header = |value: &oauth2::http::HeaderValue| {
            value.to_str().map(str::to_string).map_err(|_| HttpError {
                endpoint: endpoint.clone(),
                kind: HttpErrorKind::BadRequest,
                status: None,
                code: None,
                reason: None,
                detail: "a header is not text".to_string(),
                retry_after: None,
            })
        };
        let mut content_type = None;
        let mut headers: Vec<(String, String)> = Vec::new();
        for (name, value) in request.headers() {
            if *name == oauth2::http::header::CONTENT_TYPE {
                content_type = Some(header(value)?);
            } else {
                headers.push((name.as_str().to_string(), header(value)?));
            }
        }
        let body = request.body();
        let form = content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
        let sent: Vec<String> = if form {
            oauth2::url::form_urlencoded::parse(body)
                .map(|(_, value)| value.into_owned())
                .collect()
        } else {
            Vec::new()
        };
        let header_refs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let sent_refs: Vec<&str> = sent.iter().map(String::as_str).collect();
        let mut req = Request::new(method, &url).with_headers(&header_refs);
        req.secrets = &sent_refs;
        if let Some(content_type) = content_type.as_deref() {
            req = req.with_body(Body::Raw {
                content_type,
                bytes: body,
            });
        }
        let resp = self.http.execute_any(&req)?;
        let reply = oauth2::http::Response::builder()
            .status(resp.status)
            .body(resp.body)
            .map_err(|_| HttpError {
                endpoint: resp.endpoint.clone(),
                kind: HttpErrorKind::Malformed,
                status: Some(resp.status),
                code: None,
                reason: None,
                detail: "the reply has an invalid status".to_string(),
                retry_after: None,
            })?;
        *self.last.borrow_mut() = Some(Exchange {
            endpoint: resp.endpoint,
            status: resp.status,
            sent,
        });
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsSettings;
    use crate::http::test_server::reply;
    use crate::http::Role;
    use oauth2::basic::BasicTokenResponse;
    use std::net::TcpListener;

    /// The shared loopback server, its URL ending in `/token`.
    fn serve(replies: Vec<String>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let (base, handle) = crate::http::test_server::serve(replies);
        (format!("{base}/token"), handle)
    }

    fn http() -> HttpClient {
        HttpClient::new(&TlsSettings::default(), Duration::from_secs(5)).unwrap()
    }

    const REFRESH: &str = "rt-SECRET-123456";
    const CLIENT_SECRET: &str = "cs-SECRET-abcdef";

    /// A refresh grant with scopes through the adapter.
    fn refresh(url: &str, http: &HttpClient) -> std::result::Result<TokenReply, HttpError> {
        let secret = Secret::new(CLIENT_SECRET);
        let client = token_client("7", "app-id", Some(&secret), url).unwrap();
        let token = RefreshToken::new(REFRESH.to_string());
        let transport = Transport::new(http);
        client
            .exchange_refresh_token(&token)
            .add_scopes(oauth_scopes(&[
                "openid".to_string(),
                "offline_access".to_string(),
            ]))
            .request(&transport)
            .map_err(|e| transport.error(e, url))
    }

    #[test]
    fn a_refresh_goes_through_our_client_and_a_string_expires_in_is_read() {
        let (url, server) = serve(vec![reply(
            "200 OK",
            "Content-Type: application/json; charset=utf-8\r\n",
            r#"{"access_token":"at-1","expires_in":"3599","refresh_token":"rt-2","scope":"openid offline_access"}"#,
        )]);
        let reply = refresh(&url, &http()).unwrap();
        assert_eq!(reply.access_token(), "at-1");
        assert_eq!(reply.refresh_token(), Some("rt-2"));
        assert_eq!(reply.use_until(1000), 1000 + 3599 - 60);
        assert_eq!(
            TokenResponse::expires_in(&reply),
            Some(Duration::from_secs(3599))
        );
        assert_eq!(reply.scopes().map(Vec::len), Some(2));
        assert_eq!(reply.token_type(), &BasicTokenType::Bearer);
        let debug = format!("{reply:?}");
        assert!(
            !debug.contains("at-1") && !debug.contains("rt-2"),
            "{debug}"
        );
        let request = &server.join().unwrap()[0];
        assert!(request.starts_with("POST /token HTTP/1.1\r\n"), "{request}");
        let lower = request.to_ascii_lowercase();
        assert!(lower.contains("user-agent: pcr_email/"), "{request}");
        assert!(lower.contains("accept: application/json"), "{request}");
        assert!(!lower.contains("authorization:"), "{request}");
        let body = request.split("\r\n\r\n").nth(1).unwrap();
        let form: Vec<(String, String)> = oauth2::url::form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        for (name, value) in [
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH),
            ("client_id", "app-id"),
            ("client_secret", CLIENT_SECRET),
            ("scope", "openid offline_access"),
        ] {
            assert!(
                form.contains(&(name.to_string(), value.to_string())),
                "{name} missing: {body}"
            );
        }
    }

    #[test]
    fn expires_in_may_be_a_string_where_oauth2s_stock_reply_refuses_it() {
        // Why the client has its own TokenReply: providers that send "3600" must still work.
        let body = r#"{"access_token":"a","token_type":"Bearer","expires_in":"3600"}"#;
        assert!(serde_json::from_str::<BasicTokenResponse>(body).is_err());
        let ours: TokenReply = serde_json::from_str(body).unwrap();
        assert_eq!(ours.use_until(0), 3600 - 60);
        let ours: TokenReply = serde_json::from_str(r#"{"access_token":"a"}"#).unwrap();
        assert_eq!(ours.use_until(0), 3600 - 60);
        let ours: TokenReply =
            serde_json::from_str(r#"{"access_token":"a","expires_in":8}"#).unwrap();
        assert_eq!(ours.use_until(1000), 1000 + 8 - 2);
        // token_type is case-insensitive; an odd scope or token_type loses no token.
        let ours: TokenReply = serde_json::from_str(
            r#"{"access_token":"a","token_type":"Bearer","scope":["x"],"expires_in":"soon"}"#,
        )
        .unwrap();
        assert_eq!(ours.token_type(), &BasicTokenType::Bearer);
        assert_eq!(ours.scopes(), None);
        assert_eq!(ours.use_until(0), 3600 - 60);
        let ours: TokenReply =
            serde_json::from_str(r#"{"access_token":"a","token_type":"N_A"}"#).unwrap();
        assert_eq!(ours.token_type(), &BasicTokenType::Extension("N_A".into()));
    }

    #[test]
    fn an_oauth_error_reply_is_reported_as_our_client_reports_it() {
        let body = r#"{"error":"invalid_grant","error_description":"AADSTS70000: token rt-SECRET-123456 was revoked\r\nTrace ID: 1"}"#;
        let (url, server) = serve(vec![
            reply(
                "400 Bad Request",
                "Content-Type: application/json\r\n",
                body,
            ),
            reply(
                "400 Bad Request",
                "Content-Type: application/json\r\n",
                body,
            ),
        ]);
        let via_oauth2 = refresh(&url, &http()).unwrap_err();
        let direct = http()
            .execute(&Request::new(Method::Post, &url).with_body(Body::Form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", REFRESH),
            ])))
            .unwrap_err();
        server.join().unwrap();
        assert_eq!(via_oauth2, direct);
        assert!(via_oauth2.has_code("invalid_grant"));
        assert_eq!(via_oauth2.status, Some(400));
        let text = via_oauth2.to_string();
        assert!(text.contains("AADSTS70000"), "{text}");
        assert!(
            !text.contains(REFRESH) && !text.contains("Trace ID"),
            "{text}"
        );
    }

    #[test]
    fn throttling_is_waited_out_and_server_failures_keep_their_status() {
        let (url, server) = serve(vec![
            reply("503 Service Unavailable", "Retry-After: 0\r\n", ""),
            reply(
                "500 Internal Server Error",
                "Content-Type: application/json\r\n",
                r#"{"error":"server_error","error_description":"try later"}"#,
            ),
            reply(
                "502 Bad Gateway",
                "Content-Type: text/html\r\n",
                "<html>down</html>",
            ),
            reply("400 Bad Request", "", ""),
            reply(
                "200 OK",
                "Content-Type: application/json\r\n",
                r#"{"access_token": "#,
            ),
            reply(
                "200 OK",
                "Content-Type: application/json\r\n",
                r#"{"expires_in": 5}"#,
            ),
            reply(
                "200 OK",
                "Content-Type: text/html\r\n",
                r#"{"access_token":"at"}"#,
            ),
        ]);
        let http = http();
        // 503 waited out, then an RFC 6749 error with a 5xx status: transient for sending.
        let err = refresh(&url, &http).unwrap_err();
        assert_eq!(
            (err.status, err.code.as_deref()),
            (Some(500), Some("server_error"))
        );
        assert!(err.transient(), "{err}");
        let mail = err.into_error(Role::Send, "7", "login");
        assert!(matches!(mail, Error::Transport(ref f) if f.transient && f.code == Some(500)));
        // Not OAuth's error format: the status and its reason, as for any request.
        let err = refresh(&url, &http).unwrap_err();
        assert_eq!((err.status, err.code.as_deref()), (Some(502), None));
        assert_eq!(err.detail, "Bad Gateway");
        let err = refresh(&url, &http).unwrap_err();
        assert_eq!(
            (err.status, err.detail.as_str()),
            (Some(400), "Bad Request")
        );
        // A 2xx reply that is not a token reply names the endpoint and quotes nothing.
        let err = refresh(&url, &http).unwrap_err();
        assert_eq!(err.kind, HttpErrorKind::Malformed);
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert!(
            err.to_string().starts_with(&format!("POST {url}: ")),
            "{err}"
        );
        let err = refresh(&url, &http).unwrap_err();
        assert!(err.to_string().contains("expected fields"), "{err}");
        // Our adapter does not pass the Content-Type on: a JSON body is read whatever it says.
        assert_eq!(refresh(&url, &http).unwrap().access_token(), "at");
        assert_eq!(server.join().unwrap().len(), 7);
    }

    #[test]
    fn a_dead_token_endpoint_is_a_network_error() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = refresh(&format!("http://127.0.0.1:{port}/token"), &http()).unwrap_err();
        assert_eq!(err.kind, HttpErrorKind::Connect, "{err}");
        assert!(err.transient());
    }
}
