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

    pub fn is_bearer(&self) -> bool {
        matches!(self, Credentials::Bearer { .. })
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
        let raw = match self {
            Mechanism::XOAuth2 => {
                format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose())
            }
            Mechanism::OAuthBearer => format!(
                "n,a={},\x01host={host}\x01port={port}\x01auth=Bearer {}\x01\x01",
                gs2_name(user),
                token.expose()
            ),
        };
        STANDARD.encode(raw)
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
        let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
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

/// `text` (a server's reply) with `secret` (a password or token) taken out, in case a server
/// echoes what it was sent.
pub fn redact(text: &str, secret: &Secret) -> String {
    let clear = secret.expose();
    if clear.is_empty() {
        return text.to_string();
    }
    text.replace(clear, "<redacted>")
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

    #[test]
    fn credentials_never_show_their_secret() {
        let c = Credentials::Password {
            user: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            redact("echo hunter2!", &Secret::new("hunter2")),
            "echo <redacted>!"
        );
    }
}
