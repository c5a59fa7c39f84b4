//! What a mail protocol client signs in with (SPEC §3a): a password, or an OAuth 2.0 access
//! token sent with SASL XOAUTH2 (Google's and Microsoft's mechanism) or OAUTHBEARER (RFC 7628).
//!
//! The protocol clients (IMAP, POP3, SMTP) take [`Credentials`]; where a token comes from
//! (client credentials, a service account's JWT, a delegated refresh token) is the business of
//! the [`TokenSource`] behind it, built by the `oauth` module. A token the server refuses gets
//! one fresh token and one retry ([`TokenSource::refresh_after_rejection`]); a second refusal
//! is the account's authorization error.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::config::Secret;
use crate::error::Result;

/// Hands out access tokens for one account and one scope.
pub trait TokenSource: Send + Sync {
    /// A token valid for a while yet (cached; renewed shortly before it expires).
    fn access_token(&self) -> Result<Secret>;
    /// A new token after the server refused `rejected` (expired early, revoked): the cache
    /// is bypassed unless another process has renewed it meanwhile. `Err` (an
    /// `Error::Auth`) when the grant itself is refused: the administrator must act.
    fn refresh_after_rejection(&self, rejected: &Secret) -> Result<Secret>;
    /// The grant, for reports: `client_credentials`, `service_account`, `authorization_code`.
    fn grant(&self) -> &'static str;
    /// A client chose `mechanism` for this source's tokens (remembered for `checkAccount`).
    fn note_mechanism(&self, _mechanism: Mechanism) {}
}

/// How a client signs in.
#[derive(Clone)]
pub enum Credentials {
    /// `LOGIN` with `PASSWORD` (IMAP LOGIN / AUTHENTICATE PLAIN, POP3 USER/PASS, SMTP AUTH
    /// PLAIN/LOGIN).
    Password { user: String, password: Secret },
    /// `LOGIN` with an access token (SASL XOAUTH2, else OAUTHBEARER).
    Bearer {
        user: String,
        tokens: Arc<dyn TokenSource>,
    },
}

impl Credentials {
    /// The mailbox user.
    pub fn user(&self) -> &str {
        match self {
            Credentials::Password { user, .. } | Credentials::Bearer { user, .. } => user,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Password { user, .. } => f
                .debug_struct("Password")
                .field("user", user)
                .finish_non_exhaustive(),
            Credentials::Bearer { user, tokens } => f
                .debug_struct("Bearer")
                .field("user", user)
                .field("grant", &tokens.grant())
                .finish_non_exhaustive(),
        }
    }
}

/// A token mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    XOAuth2,
    OAuthBearer,
}

impl Mechanism {
    /// The SASL name, as servers list it (`AUTH=XOAUTH2`, `SASL XOAUTH2`, `AUTH XOAUTH2`).
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// XOAUTH2 when the server offers it (what Microsoft 365 and Gmail document), else
    /// OAUTHBEARER; `None` when it offers neither. `offers` is asked with a mechanism name.
    pub fn choose(offers: impl Fn(&str) -> bool) -> Option<Mechanism> {
        [Mechanism::XOAuth2, Mechanism::OAuthBearer]
            .into_iter()
            .find(|m| offers(m.name()))
    }

    /// The client's initial response, base64-encoded (as sent after the mechanism name, or
    /// after an empty `+` challenge). `host` and `port` are the server's (OAUTHBEARER only).
    pub fn initial_response(self, user: &str, token: &Secret, host: &str, port: u16) -> String {
        STANDARD.encode(self.initial_bytes(user, token, host, port))
    }

    /// The initial response before base64 (for clients, such as the `imap` crate's
    /// authenticator, that encode what they are given).
    pub fn initial_bytes(self, user: &str, token: &Secret, host: &str, port: u16) -> Vec<u8> {
        match self {
            Mechanism::XOAuth2 => {
                format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose())
            }
            Mechanism::OAuthBearer => format!(
                "n,a={},\x01host={host}\x01port={port}\x01auth=Bearer {}\x01\x01",
                gs2_name(user),
                token.expose()
            ),
        }
        .into_bytes()
    }
}

/// A `user` as a GS2 authzid (RFC 5801): `,` and `=` escaped.
fn gs2_name(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// What a server said when it refused a token: the JSON status of RFC 7628 §3.2.2 (also what
/// XOAUTH2 servers send), base64-encoded in the challenge that precedes the failure.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenFailure {
    /// `401` (invalid or expired token), `400` (bad request), `403` (insufficient scope).
    pub status: String,
    pub scope: Option<String>,
}

impl TokenFailure {
    /// Reads a failure challenge (base64 JSON, surrounding spaces allowed); `None` when it is
    /// not one.
    pub fn from_challenge(challenge: &str) -> Option<TokenFailure> {
        let bytes = STANDARD.decode(challenge.trim()).ok()?;
        TokenFailure::from_json(&bytes)
    }

    /// Reads a failure challenge already decoded from base64; `None` when it is not one.
    pub fn from_json(bytes: &[u8]) -> Option<TokenFailure> {
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let status = value.get("status")?;
        let status = match status {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some(TokenFailure {
            status,
            scope: value
                .get("scope")
                .and_then(|s| s.as_str())
                .map(str::to_string),
        })
    }

    /// True when a fresh token may help (the token was invalid or expired).
    pub fn token_rejected(&self) -> bool {
        self.status == "401" || self.status.eq_ignore_ascii_case("invalid_token")
    }
}

/// The client's answer to a failure challenge, after which the server sends its final
/// failure: an empty line for XOAUTH2 (Google's and Microsoft's documentation), `\x01`
/// (base64 `AQ==`) for OAUTHBEARER (RFC 7628 §3.2.3).
pub fn failure_ack(mechanism: Mechanism) -> &'static str {
    match mechanism {
        Mechanism::XOAuth2 => "",
        Mechanism::OAuthBearer => "AQ==",
    }
}

/// [`failure_ack`] before base64.
pub fn failure_ack_bytes(mechanism: Mechanism) -> &'static [u8] {
    match mechanism {
        Mechanism::XOAuth2 => b"",
        Mechanism::OAuthBearer => b"\x01",
    }
}

/// One sign-in with an access token, across the attempts it may take: the source's current
/// token first; after a refusal that says the token is invalid or expired (or gives no
/// reason), one fresh token from [`TokenSource::refresh_after_rejection`] and one more
/// attempt (on the same connection, or on a new one when the server closed it); then the
/// refusal is final. Also remembers every token it handed out, so that server texts can be
/// cleaned of them ([`TokenSignIn::redact`]).
pub struct TokenSignIn {
    tokens: Arc<dyn TokenSource>,
    current: Option<Secret>,
    refreshed: bool,
    /// Tokens handed out, and the initial responses built from them.
    sent: Vec<String>,
}

impl fmt::Debug for TokenSignIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSignIn")
            .field("grant", &self.tokens.grant())
            .field("refreshed", &self.refreshed)
            .finish_non_exhaustive()
    }
}

impl TokenSignIn {
    pub fn new(tokens: Arc<dyn TokenSource>) -> TokenSignIn {
        TokenSignIn {
            tokens,
            current: None,
            refreshed: false,
            sent: Vec::new(),
        }
    }

    /// The token to send now: the source's current one, or the fresh one after a refusal.
    /// An error is the source's (the grant refused, the token endpoint unreachable).
    pub fn token(&mut self) -> Result<Secret> {
        if let Some(token) = &self.current {
            return Ok(token.clone());
        }
        let token = self.tokens.access_token()?;
        self.remember(&token);
        self.current = Some(token.clone());
        Ok(token)
    }

    /// The client signs in with `mechanism` (told to the token source, for reports).
    pub fn using(&self, mechanism: Mechanism) {
        self.tokens.note_mechanism(mechanism);
    }

    /// The initial response of `mechanism` with [`TokenSignIn::token`], base64-encoded.
    pub fn initial_response(
        &mut self,
        mechanism: Mechanism,
        user: &str,
        host: &str,
        port: u16,
    ) -> Result<String> {
        let token = self.token()?;
        let response = mechanism.initial_response(user, &token, host, port);
        self.sent.push(response.clone());
        Ok(response)
    }

    /// After the server refused the token: `Ok(true)` when a fresh token was fetched and one
    /// more attempt is due, `Ok(false)` when the refusal is final (the fresh token was
    /// refused too, or the server's reason is not the token's validity: a missing scope, a
    /// malformed request). `Err` when no fresh token can be had (the grant is refused).
    pub fn retry_after(&mut self, failure: Option<&TokenFailure>) -> Result<bool> {
        if self.refreshed || failure.is_some_and(|f| !f.token_rejected()) {
            return Ok(false);
        }
        let rejected = match self.current.take() {
            Some(token) => token,
            None => return Ok(false),
        };
        let fresh = self.tokens.refresh_after_rejection(&rejected)?;
        self.refreshed = true;
        self.remember(&fresh);
        self.current = Some(fresh);
        Ok(true)
    }

    /// The tokens handed out and the initial responses built from them (for a client that
    /// keeps its own list of what to redact).
    pub(crate) fn sent(&self) -> &[String] {
        &self.sent
    }

    /// True once a fresh token was fetched after a refusal.
    pub fn refreshed(&self) -> bool {
        self.refreshed
    }

    /// `text` with every token handed out (and every initial response built from one) taken
    /// out.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        // Longest first: an initial response is not spoiled by replacing its token inside.
        let mut sent: Vec<&String> = self.sent.iter().collect();
        sent.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in sent {
            if !secret.is_empty() && out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "<redacted>");
            }
        }
        out
    }

    fn remember(&mut self, token: &Secret) {
        if !token.is_empty() {
            self.sent.push(token.expose().to_string());
        }
    }
}

/// The account's error when a server refused its access token: `Error::Auth`, naming the
/// protocol, server, user and mechanism, with the server's (already redacted) `text`.
#[allow(clippy::too_many_arguments)]
pub fn token_refused(
    account: &str,
    protocol: &str,
    server: &str,
    user: &str,
    mechanism: Mechanism,
    failure: Option<&TokenFailure>,
    retried: bool,
    text: &str,
) -> crate::Error {
    let mut why = String::new();
    if let Some(failure) = failure {
        why.push_str(&format!(", status {}", failure.status));
        if let Some(scope) = &failure.scope {
            why.push_str(&format!(", scope {scope}"));
        }
    }
    let when = if retried {
        " even after a fresh token was fetched"
    } else {
        ""
    };
    let text = text.trim().trim_end_matches('.');
    let said = if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    };
    crate::Error::auth(
        account,
        format!(
            "the {protocol} server {server} refused the access token for '{user}' ({}{why}){when}{said}; \
             check that the application is allowed {protocol} access to this mailbox and that \
             LOGIN names it",
            mechanism.name()
        ),
    )
}

/// The message when a server offers no token mechanism: `offered` lists what it does offer.
pub fn no_token_mechanism(protocol: &str, offered: &str) -> String {
    let offered = offered.trim();
    let offered = if offered.is_empty() {
        "no SASL mechanism".to_string()
    } else {
        offered.to_string()
    };
    format!(
        "the {protocol} server does not offer OAuth sign-in (SASL XOAUTH2 or OAUTHBEARER; it \
         offers {offered}), which AUTH_TYPE = XOAUTH2 needs"
    )
}

#[cfg(test)]
pub(crate) mod testing {
    //! A token source for the protocol clients' unit tests.
    use super::*;
    use std::sync::Mutex;

    /// Hands out `t1` until a refusal, then `t2`, `t3`, ...; counts the calls. With
    /// `refuse_refresh`, a refresh is an `Error::Auth` (the grant was revoked).
    pub struct Counting {
        prefix: String,
        issued: Mutex<u32>,
        fetches: Mutex<u32>,
        refreshes: Mutex<u32>,
        refuse_refresh: bool,
    }

    impl Counting {
        pub fn new(refuse_refresh: bool) -> Arc<Counting> {
            Counting::with_prefix("t", refuse_refresh)
        }

        /// Tokens `<prefix>1`, `<prefix>2`, ...
        pub fn with_prefix(prefix: &str, refuse_refresh: bool) -> Arc<Counting> {
            Arc::new(Counting {
                prefix: prefix.to_string(),
                issued: Mutex::new(1),
                fetches: Mutex::new(0),
                refreshes: Mutex::new(0),
                refuse_refresh,
            })
        }

        pub fn refreshes(&self) -> u32 {
            *self.refreshes.lock().unwrap()
        }

        pub fn fetches(&self) -> u32 {
            *self.fetches.lock().unwrap()
        }
    }

    impl TokenSource for Counting {
        fn access_token(&self) -> Result<Secret> {
            *self.fetches.lock().unwrap() += 1;
            let n = *self.issued.lock().unwrap();
            Ok(Secret::new(format!("{}{n}", self.prefix)))
        }
        fn refresh_after_rejection(&self, rejected: &Secret) -> Result<Secret> {
            if self.refuse_refresh {
                return Err(crate::Error::auth(
                    "7",
                    "the token endpoint refused the grant (invalid_client)",
                ));
            }
            *self.refreshes.lock().unwrap() += 1;
            let mut n = self.issued.lock().unwrap();
            assert_eq!(
                rejected.expose(),
                format!("{}{n}", self.prefix),
                "refreshed an old token"
            );
            *n += 1;
            Ok(Secret::new(format!("{}{n}", self.prefix)))
        }
        fn grant(&self) -> &'static str {
            "client_credentials"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoauth2_initial_response_is_googles_format() {
        let r = Mechanism::XOAuth2.initial_response(
            "someuser@example.com",
            &Secret::new("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"),
            "imap.gmail.com",
            993,
        );
        // The example of Google's XOAUTH2 protocol page.
        assert_eq!(
            r,
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn oauthbearer_initial_response_follows_rfc_7628() {
        let r = Mechanism::OAuthBearer.initial_response(
            "user@example.com",
            &Secret::new("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="),
            "server.example.com",
            143,
        );
        let raw = String::from_utf8(STANDARD.decode(r).unwrap()).unwrap();
        assert_eq!(
            raw,
            "n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer \
             vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        let odd = Mechanism::OAuthBearer.initial_response("a,b=c", &Secret::new("t"), "h", 1);
        let raw = String::from_utf8(STANDARD.decode(odd).unwrap()).unwrap();
        assert!(raw.starts_with("n,a=a=2Cb=3Dc,\x01"), "{raw}");
    }

    #[test]
    fn xoauth2_is_preferred_and_oauthbearer_taken_when_alone() {
        let offers = |list: &'static [&'static str]| move |m: &str| list.contains(&m);
        assert_eq!(
            Mechanism::choose(offers(&["PLAIN", "OAUTHBEARER", "XOAUTH2"])),
            Some(Mechanism::XOAuth2)
        );
        assert_eq!(
            Mechanism::choose(offers(&["OAUTHBEARER"])),
            Some(Mechanism::OAuthBearer)
        );
        assert_eq!(Mechanism::choose(offers(&["PLAIN", "LOGIN"])), None);
    }

    #[test]
    fn failure_challenges_tell_an_invalid_token_from_other_refusals() {
        // Google's documented failure challenge.
        let google = "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIG1hYyIsInNjb3BlIjoiaHR0cHM6Ly9tYWlsLmdvb2dsZS5jb20vIn0K";
        let f = TokenFailure::from_challenge(google).unwrap();
        assert_eq!(f.status, "401");
        assert_eq!(f.scope.as_deref(), Some("https://mail.google.com/"));
        assert!(f.token_rejected());
        let scope = STANDARD.encode(r#"{"status":"insufficient_scope","scope":"x"}"#);
        assert!(!TokenFailure::from_challenge(&scope)
            .unwrap()
            .token_rejected());
        let number = STANDARD.encode(r#"{"status":401}"#);
        assert!(TokenFailure::from_challenge(&number)
            .unwrap()
            .token_rejected());
        assert_eq!(TokenFailure::from_challenge("not base64 !"), None);
        assert_eq!(
            TokenFailure::from_challenge(&STANDARD.encode("plain text")),
            None
        );
    }

    use testing::Counting;

    fn counting(refuse_refresh: bool) -> Arc<Counting> {
        Counting::new(refuse_refresh)
    }

    #[test]
    fn a_rejected_token_gets_one_fresh_token_and_one_retry() {
        let source = counting(false);
        let mut signin = TokenSignIn::new(source.clone());
        assert_eq!(signin.token().unwrap().expose(), "t1");
        assert_eq!(signin.token().unwrap().expose(), "t1");
        let expired = TokenFailure {
            status: "401".into(),
            scope: None,
        };
        assert!(signin.retry_after(Some(&expired)).unwrap());
        assert!(signin.refreshed());
        assert_eq!(signin.token().unwrap().expose(), "t2");
        // The fresh token refused too: final, no third token.
        assert!(!signin.retry_after(Some(&expired)).unwrap());
        assert!(!signin.retry_after(None).unwrap());
        assert_eq!(source.refreshes(), 1);

        // No reason given: one retry as well.
        let mut signin = TokenSignIn::new(counting(false));
        signin.token().unwrap();
        assert!(signin.retry_after(None).unwrap());

        // A reason other than the token's validity: final at once.
        let source = counting(false);
        let mut signin = TokenSignIn::new(source.clone());
        signin.token().unwrap();
        let scope = TokenFailure {
            status: "403".into(),
            scope: Some("x".into()),
        };
        assert!(!signin.retry_after(Some(&scope)).unwrap());
        assert_eq!(source.refreshes(), 0);

        // The source cannot refresh: its error.
        let mut signin = TokenSignIn::new(counting(true));
        signin.token().unwrap();
        let err = signin.retry_after(Some(&expired)).unwrap_err();
        assert!(matches!(err, crate::Error::Auth { .. }), "{err:?}");
    }

    #[test]
    fn sign_in_texts_lose_every_token_sent() {
        let mut signin = TokenSignIn::new(counting(false));
        let ir = signin
            .initial_response(Mechanism::XOAuth2, "u@x", "h", 1)
            .unwrap();
        signin.retry_after(None).unwrap();
        signin.token().unwrap();
        let text = format!("NO bad {ir} t1 and t2");
        assert_eq!(
            signin.redact(&text),
            "NO bad <redacted> <redacted> and <redacted>"
        );
        let err = token_refused(
            "9",
            "IMAP",
            "imap.x:993",
            "u@x",
            Mechanism::OAuthBearer,
            Some(&TokenFailure {
                status: "401".into(),
                scope: Some("s".into()),
            }),
            true,
            " AUTHENTICATE failed ",
        );
        let text = err.to_string();
        assert!(matches!(err, crate::Error::Auth { .. }));
        assert!(
            text.contains(
                "the IMAP server imap.x:993 refused the access token for 'u@x' (OAUTHBEARER, \
                 status 401, scope s) even after a fresh token was fetched: AUTHENTICATE failed;"
            ),
            "{text}"
        );
        assert!(no_token_mechanism("POP3", "PLAIN LOGIN").contains("offers PLAIN LOGIN"));
        assert_eq!(
            failure_ack_bytes(Mechanism::OAuthBearer),
            &STANDARD.decode("AQ==").unwrap()[..]
        );
        assert_eq!(STANDARD.encode(failure_ack_bytes(Mechanism::XOAuth2)), "");
    }

    #[test]
    fn credentials_never_show_their_secret() {
        let c = Credentials::Password {
            user: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
