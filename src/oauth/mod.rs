//! OAuth 2.0 for the cloud accounts: OFFICE365 (Microsoft identity platform: a delegated
//! sign-in, or app-only access with client credentials acting on the mailbox EMAIL) and GMAIL
//! (Google: a signed-in personal account, or a service account with domain-wide delegation),
//! and for SMTP/IMAP/POP3 accounts with `AUTH_TYPE = XOAUTH2`.
//!
//! The protocol is the `oauth2` crate's (version 5, without its HTTP clients): the
//! authorization URL with PKCE S256 and a random `state`, and the token requests for the
//! authorization code (with the PKCE verifier), the refresh token and client credentials, with
//! its typed error replies. Its requests are sent by a small adapter over our own
//! [`crate::http::HttpClient`] (the one ureq stack: the account's TLS trust and timeouts,
//! redirects refused, 429/503 `Retry-After` waited out): see `client.rs`. What `oauth2` does not
//! cover stays here: the JWT bearer grant of a Gmail service account (RFC 7523, `jwt.rs`); the
//! endpoints and scopes from each account's configuration; the pending sign-ins in the state
//! store; the token cache, the per-account lock and the compare-and-swap saving of rotated
//! refresh tokens ([`tokens`]); and the mapping of a refused grant to what the administrator
//! must do.
//!
//! The flow the PHP side drives:
//! 1. [`authorization_url`]: the administrator clicks "Click to Authenticate"; a random `state`
//!    and the PKCE verifier are kept (encrypted, 10 minutes) in the state store.
//! 2. The provider redirects to `https://<host>/core/oauth2/validated?code=..&state=..`;
//!    [`complete_authorization`] exchanges the code, stores the refresh token encrypted and
//!    returns the signed-in mailbox.
//! 3. From then on [`TokenManager`] hands out access tokens, refreshing them before expiry and
//!    saving every rotated refresh token at once; [`status`] reports on it without network.

pub mod api;
mod client;
mod jwt;
pub mod tokens;

use std::path::PathBuf;
use std::time::Duration;

use oauth2::{
    AuthUrl, AuthorizationCode, CsrfToken, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use api::{ApiClient, ApiError};
pub use tokens::TokenManager;

use crate::config::secrets::KeyStore;
use crate::config::{
    Account, AccountId, AuthType, MailboxType, OAuthGrant, Settings, TransportType,
};
use crate::error::{Error, Result};
use crate::http::{HttpClient, Method, Request, Role};
use crate::state::{PendingAuth, StateStore};
use client::{oauth_scopes, token_client, Transport};
use tokens::{grant_error, now_secs, AccountLock, ACCESS, KV_ERROR, KV_MAILBOX, REFRESH};

pub const MICROSOFT_AUTHORITY: &str = "https://login.microsoftonline.com/common";
pub const MICROSOFT_AUTHORIZE_PATH: &str = "/oauth2/v2.0/authorize";
pub const MICROSOFT_TOKEN_PATH: &str = "/oauth2/v2.0/token";
/// Delegated Graph permissions the product needs (Mail.ReadWrite to mark, move and delete).
pub const MICROSOFT_DEFAULT_SCOPES: &str =
    "openid profile offline_access User.Read Mail.ReadWrite Mail.Send";
pub const GRAPH_BASE: &str = "https://graph.microsoft.com/v1.0";
pub const GOOGLE_AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// Google's scope for the Gmail API and for IMAP, POP3 and SMTP with XOAUTH2 alike.
pub const GOOGLE_DEFAULT_SCOPES: &str = "https://mail.google.com/";
/// Microsoft app-only (client credentials) scope for Graph (OFFICE365).
pub const GRAPH_APP_SCOPE: &str = "https://graph.microsoft.com/.default";
/// Microsoft app-only scope for IMAP, POP3 and SMTP.
pub const EXCHANGE_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Microsoft delegated scopes for IMAP, POP3 and SMTP (with `offline_access`).
pub const EXCHANGE_IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
pub const EXCHANGE_POP_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All";
pub const EXCHANGE_SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
pub const GMAIL_BASE: &str = "https://gmail.googleapis.com";
/// How long a sign-in may take between `authorization_url` and `complete_authorization`.
pub const PENDING_AUTH_TTL: Duration = Duration::from_secs(600);
/// kv namespace remembering consumed `state` values (hashed), to tell "used" from "unknown".
const KV_USED_STATE: &str = "oauth-state-used";
/// Random bytes of a PKCE verifier (86 characters in base64url; RFC 7636 allows 43 to 128).
const PKCE_VERIFIER_BYTES: u32 = 64;
/// Random bytes of a `state` value.
const STATE_BYTES: u32 = 32;

/// The identity provider of a cloud account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// OFFICE365: Microsoft identity platform and Graph.
    Microsoft,
    /// GMAIL: Google OAuth and the Gmail API.
    Google,
}

impl Provider {
    /// The provider of an account whose outgoing or incoming type is OFFICE365 or GMAIL; any
    /// other account is a configuration error.
    pub fn of(account: &Account) -> Result<Provider> {
        let out = account.outgoing.as_ref().map(|o| o.transport);
        let inc = account.incoming.as_ref().map(|i| i.mailbox);
        if out == Some(TransportType::Office365) || inc == Some(MailboxType::Office365) {
            Ok(Provider::Microsoft)
        } else if out == Some(TransportType::Gmail) || inc == Some(MailboxType::Gmail) {
            Ok(Provider::Google)
        } else if account.auth_type == AuthType::XOAuth2 {
            Provider::of_xoauth2(account)
        } else {
            Err(Error::account_key(
                &account.id.to_string(),
                "OUTGOING_TRANSPORT_TYPE",
                "OAuth2 sign-in is only for OFFICE365 and GMAIL accounts, and for SMTP, IMAP \
                 and POP3 accounts with AUTH_TYPE = XOAUTH2",
            ))
        }
    }

    /// The provider of an SMTP/IMAP/POP3 account with `AUTH_TYPE = XOAUTH2`: `OAUTH.PROVIDER`
    /// when given, else what the grant, the endpoints or the servers' names say.
    fn of_xoauth2(account: &Account) -> Result<Provider> {
        let oauth = account.oauth.as_ref();
        match oauth.and_then(|o| o.provider.as_deref()) {
            Some("microsoft") => return Ok(Provider::Microsoft),
            Some("google") => return Ok(Provider::Google),
            _ => {}
        }
        if let Some(o) = oauth {
            match o.grant {
                OAuthGrant::ClientCredentials => return Ok(Provider::Microsoft),
                OAuthGrant::ServiceAccount => return Ok(Provider::Google),
                OAuthGrant::AuthorizationCode => {}
            }
            if !o.authority_url.trim().is_empty() {
                return Ok(Provider::Microsoft);
            }
            let endpoints = format!("{} {}", o.token_endpoint, o.authorization_endpoint);
            if endpoints.contains("microsoftonline.") {
                return Ok(Provider::Microsoft);
            }
            if endpoints.contains("google") {
                return Ok(Provider::Google);
            }
        }
        let hosts = [
            account.outgoing.as_ref().and_then(|o| o.host.as_deref()),
            account.incoming.as_ref().and_then(|i| i.host.as_deref()),
        ];
        for host in hosts.into_iter().flatten() {
            let host = host.trim().to_ascii_lowercase();
            if host.ends_with("office365.com") || host.ends_with("outlook.com") {
                return Ok(Provider::Microsoft);
            }
            if host.ends_with("gmail.com") || host.ends_with("googlemail.com") {
                return Ok(Provider::Google);
            }
        }
        Err(Error::account_key(
            &account.id.to_string(),
            "OAUTH.PROVIDER",
            "cannot tell whether the account signs in with Microsoft or Google: set \
             OAUTH.PROVIDER (microsoft or google), or OAUTH.AUTHORITY_URL for Microsoft",
        ))
    }

    /// `OFFICE365` or `GMAIL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Microsoft => "OFFICE365",
            Provider::Google => "GMAIL",
        }
    }

    /// The service's name for messages.
    pub fn service(self) -> &'static str {
        match self {
            Provider::Microsoft => "Microsoft 365",
            Provider::Google => "Google",
        }
    }
}

/// Where the OAuth state lives: the state store directory, the shared database when there is
/// one, and the key file that encrypts the tokens (from the INI: `STATE_DIR`, `STATE_DSN`,
/// `KEY_FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthEnv {
    pub state_dir: PathBuf,
    /// `email.STATE_DSN` of the same INI file: the tokens and their refresh lock live there.
    pub state_dsn: Option<crate::config::dsn::Dsn>,
    pub key_file: PathBuf,
}

impl OAuthEnv {
    pub fn from_settings(settings: &Settings) -> OAuthEnv {
        OAuthEnv {
            state_dir: settings.state_dir.clone(),
            state_dsn: settings.state_dsn.clone(),
            key_file: settings.key_file.clone(),
        }
    }

    /// A new connection to the state store.
    pub fn open_store(&self) -> Result<StateStore> {
        StateStore::open(&self.state_dir, self.state_dsn.as_ref())
    }

    /// The key store (the key file is created on first use).
    pub fn open_keys(&self) -> Result<KeyStore> {
        KeyStore::open(&self.key_file)
    }
}

/// One account's resolved OAuth endpoints and scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub authorize: String,
    pub token: String,
    pub api_base: String,
    pub scopes: Vec<String>,
}

/// The account's endpoints: `AUTHORITY_URL` + the (relative or absolute) endpoint paths, or
/// the provider's public defaults; the scopes (Microsoft always with `offline_access`, without
/// which there is no refresh token); `API_BASE_URL` or the public API. Plain `http://` is
/// accepted only for loopback addresses (local emulators).
pub fn endpoints(account: &Account, provider: Provider) -> Result<Endpoints> {
    let id = account.id.to_string();
    let Some(oauth) = &account.oauth else {
        return Err(Error::account_key(
            &id,
            "OAUTH",
            format!("{} needs the account's OAuth2 settings", provider.as_str()),
        ));
    };
    let trim = |s: &str| s.trim().trim_end_matches('/').to_string();
    let authority = trim(&oauth.authority_url);
    let join = |key: &str, value: &str, default: &str| -> Result<String> {
        let value = value.trim();
        let url = if value.is_empty() {
            match provider {
                Provider::Microsoft => format!(
                    "{}{default}",
                    if authority.is_empty() {
                        MICROSOFT_AUTHORITY
                    } else {
                        &authority
                    }
                ),
                Provider::Google => default.to_string(),
            }
        } else if value.starts_with("https://") || value.starts_with("http://") {
            value.to_string()
        } else if !authority.is_empty() {
            format!("{authority}/{}", value.trim_start_matches('/'))
        } else if provider == Provider::Microsoft {
            format!("{MICROSOFT_AUTHORITY}/{}", value.trim_start_matches('/'))
        } else {
            return Err(Error::account_key(
                &id,
                key,
                "a path needs the Authentication Authority URL (or give the full URL)",
            ));
        };
        check_url(&id, key, &url)?;
        Ok(url)
    };
    let (authorize, token) = match provider {
        Provider::Microsoft => (
            join(
                "OAUTH.AUTHORIZATION_ENDPOINT",
                &oauth.authorization_endpoint,
                MICROSOFT_AUTHORIZE_PATH,
            )?,
            join(
                "OAUTH.TOKEN_ENDPOINT",
                &oauth.token_endpoint,
                MICROSOFT_TOKEN_PATH,
            )?,
        ),
        Provider::Google => (
            join(
                "OAUTH.AUTHORIZATION_ENDPOINT",
                &oauth.authorization_endpoint,
                GOOGLE_AUTHORIZE_URL,
            )?,
            join(
                "OAUTH.TOKEN_ENDPOINT",
                &oauth.token_endpoint,
                GOOGLE_TOKEN_URL,
            )?,
        ),
    };
    let mut scopes: Vec<String> = oauth.scopes.iter().map(|s| s.trim().to_string()).collect();
    scopes.retain(|s| !s.is_empty());
    if scopes.is_empty() {
        scopes = default_scopes(account, provider, oauth.grant);
    }
    // A delegated Microsoft sign-in needs offline_access for its refresh token; app-only
    // tokens take exactly one `<resource>/.default` scope.
    if provider == Provider::Microsoft
        && oauth.grant == OAuthGrant::AuthorizationCode
        && !scopes
            .iter()
            .any(|s| s.eq_ignore_ascii_case("offline_access"))
    {
        scopes.push("offline_access".to_string());
    }
    let api_base = match oauth.api_base_url.as_deref().map(trim) {
        Some(base) if !base.is_empty() => base,
        _ => match provider {
            Provider::Microsoft => GRAPH_BASE.to_string(),
            Provider::Google => GMAIL_BASE.to_string(),
        },
    };
    check_url(&id, "OAUTH.API_BASE_URL", &api_base)?;
    Ok(Endpoints {
        authorize,
        token,
        api_base,
        scopes,
    })
}

/// The scopes an account asks for when `SCOPES` says nothing (SPEC §3a).
fn default_scopes(account: &Account, provider: Provider, grant: OAuthGrant) -> Vec<String> {
    let split = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
    match (provider, grant, account.is_cloud()) {
        (Provider::Google, _, _) => split(GOOGLE_DEFAULT_SCOPES),
        (Provider::Microsoft, OAuthGrant::ClientCredentials, true) => split(GRAPH_APP_SCOPE),
        (Provider::Microsoft, OAuthGrant::ClientCredentials, false) => split(EXCHANGE_APP_SCOPE),
        (Provider::Microsoft, _, true) => split(MICROSOFT_DEFAULT_SCOPES),
        (Provider::Microsoft, _, false) => {
            let mut scopes = Vec::new();
            match account.incoming.as_ref().map(|i| i.mailbox) {
                Some(MailboxType::Imap) => scopes.push(EXCHANGE_IMAP_SCOPE.to_string()),
                Some(MailboxType::Pop3) => scopes.push(EXCHANGE_POP_SCOPE.to_string()),
                _ => {}
            }
            if account
                .outgoing
                .as_ref()
                .is_some_and(|o| o.transport == TransportType::Smtp)
            {
                scopes.push(EXCHANGE_SMTP_SCOPE.to_string());
            }
            scopes
        }
    }
}

/// An `https://` URL, or `http://` to a loopback host only (tokens and secrets never travel
/// in clear over a network).
pub(crate) fn check_url(account: &str, key: &str, url: &str) -> Result<()> {
    let bad = |m: &str| Error::account_key(account, key, m.to_string());
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("the URL contains spaces or control characters"));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("not a URL (https://...)"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("the URL has no host (or carries user info)"));
    }
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Ok(()),
        "http" => {
            let host = authority
                .rsplit_once(':')
                .filter(|(h, p)| !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .map_or(authority, |(h, _)| h);
            if matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
                Ok(())
            } else {
                Err(bad(
                    "plain http:// is only allowed for a local test server; use https://",
                ))
            }
        }
        _ => Err(bad("not an http(s) URL")),
    }
}

/// The application (client) id, required for a sign-in.
pub(crate) fn client_id(account: &Account) -> Result<String> {
    let id = account
        .oauth
        .as_ref()
        .map(|o| o.application_id.trim().to_string())
        .unwrap_or_default();
    if id.is_empty() {
        return Err(Error::account_key(
            &account.id.to_string(),
            "OAUTH.APPLICATION_ID",
            "the Application ID (client id) is missing",
        ));
    }
    Ok(id)
}

/// True for Microsoft app-only access (`GRANT = client_credentials`): no person signs in, the
/// app acts on the mailbox EMAIL (Graph `/users/{EMAIL}`) with its client secret.
pub fn is_client_credentials(account: &Account, provider: Provider) -> bool {
    provider == Provider::Microsoft
        && account
            .oauth
            .as_ref()
            .is_some_and(|o| o.grant == OAuthGrant::ClientCredentials)
}

fn is_service_account(account: &Account, provider: Provider) -> bool {
    provider == Provider::Google
        && account
            .oauth
            .as_ref()
            .is_some_and(|o| o.service_account_json.is_some())
}

/// What a pending sign-in remembers (encrypted in the state store).
#[derive(Serialize, Deserialize)]
struct Pending {
    recid: i64,
    provider: String,
    client_id: String,
    redirect_uri: String,
    verifier: String,
}

fn state_key(state: &str) -> String {
    let digest = Sha256::digest(state.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the redirect URI PHP passes (`https://<host>/core/oauth2/validated`).
fn check_redirect_uri(uri: &str) -> Result<()> {
    let ok = (uri.starts_with("https://") || uri.starts_with("http://"))
        && !uri.contains('#')
        && !uri.chars().any(|c| c.is_control() || c.is_whitespace())
        && uri.len() <= 2000
        && uri
            .split_once("://")
            .is_some_and(|(_, r)| !r.is_empty() && !r.starts_with('/'));
    if ok {
        Ok(())
    } else {
        Err(bad_redirect_uri())
    }
}

fn bad_redirect_uri() -> Error {
    Error::message(
        "the redirect URI must be an absolute http(s) URL without a fragment, e.g. \
         https://pcr360.example.edu/core/oauth2/validated",
    )
}

/// The authorization-code URL to send the administrator's browser to ("Click to
/// Authenticate"): PKCE S256, a random `state` kept with the verifier, the account and the
/// redirect URI for [`PENDING_AUTH_TTL`]. Microsoft: `response_mode=query` and
/// `prompt=select_account`; Google: `access_type=offline` and `prompt=consent` (so a refresh
/// token is issued on every sign-in). The account's EMAIL is passed as `login_hint`.
pub fn authorization_url(
    account: &Account,
    redirect_uri: &str,
    store: &StateStore,
    keys: &KeyStore,
) -> Result<String> {
    let provider = Provider::of(account)?;
    let id = account.id.to_string();
    let AccountId::Tenant(recid) = account.id else {
        return Err(Error::auth(
            &id,
            "OAuth2 sign-in is for tenant accounts only",
        ));
    };
    if is_service_account(account, provider) {
        return Err(Error::auth(
            &id,
            "a Gmail service account needs no sign-in: it signs its own requests with its key \
             (SERVICE_ACCOUNT_JSON) and acts as IMPERSONATE",
        ));
    }
    if is_client_credentials(account, provider) {
        return Err(Error::auth(
            &id,
            format!(
                "the account uses app-only access (GRANT client_credentials): there is nothing \
                 to sign in; it obtains its tokens with the Application ID and the Secret KEY \
                 and acts on the mailbox {}",
                account.email
            ),
        ));
    }
    check_redirect_uri(redirect_uri)?;
    let ep = endpoints(account, provider)?;
    let client_id = client_id(account)?;
    let auth_url = AuthUrl::new(ep.authorize.clone()).map_err(|e| {
        Error::account_key(
            &id,
            "OAUTH.AUTHORIZATION_ENDPOINT",
            format!("not a valid URL ({e})"),
        )
    })?;
    let redirect = RedirectUrl::new(redirect_uri.to_string()).map_err(|_| bad_redirect_uri())?;
    let client = token_client(&id, &client_id, None, &ep.token)?
        .set_auth_uri(auth_url)
        .set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256_len(PKCE_VERIFIER_BYTES);
    let mut request = client
        .authorize_url(|| CsrfToken::new_random_len(STATE_BYTES))
        .add_scopes(oauth_scopes(&ep.scopes))
        .set_pkce_challenge(challenge);
    let extra: &[(&str, &str)] = match provider {
        Provider::Microsoft => &[("response_mode", "query"), ("prompt", "select_account")],
        Provider::Google => &[("access_type", "offline"), ("prompt", "consent")],
    };
    for (name, value) in extra {
        request = request.add_extra_param(*name, *value);
    }
    if crate::config::address_problem(&account.email).is_none() {
        request = request.add_extra_param("login_hint", account.email.as_str());
    }
    let (url, state) = request.url();
    let pending = Pending {
        recid,
        provider: provider.as_str().to_string(),
        client_id,
        redirect_uri: redirect_uri.to_string(),
        verifier: verifier.secret().to_string(),
    };
    let sealed = keys.encrypt(&serde_json::to_string(&pending).expect("plain struct"));
    store.put_pending_auth(
        state.secret(),
        &sealed,
        now_secs() + PENDING_AUTH_TTL.as_secs() as i64,
    )?;
    Ok(url.into())
}

/// A completed sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    pub recid: i64,
    pub provider: Provider,
    /// The signed-in mailbox (Graph `mail`, else `userPrincipalName`; Gmail `emailAddress`).
    pub mailbox: String,
    /// True when the mailbox is not the account's EMAIL (OFFICE365 then sends as `mailbox`).
    pub differs_from_email: bool,
}

/// Finishes a sign-in from the redirect's `state` and `code`: the state must be pending
/// (unknown, already used and expired states are distinct `Auth` errors), the account
/// (looked up in `accounts` by the RECID kept with the state) must still be the same OAuth
/// application; the code is exchanged with the client secret and the PKCE verifier, the
/// refresh token stored encrypted, and the signed-in mailbox looked up and returned.
pub fn complete_authorization(
    state: &str,
    code: &str,
    accounts: &[Account],
    store: &StateStore,
    keys: &KeyStore,
) -> Result<Authorized> {
    const NOBODY: &str = "unknown";
    let state = state.trim();
    let restart = "click \"Click to Authenticate\" on the tenant email's OAuth2 tab again";
    if state.is_empty() {
        return Err(Error::auth(
            NOBODY,
            format!("the sign-in reply has no state parameter; {restart}"),
        ));
    }
    let used_key = state_key(state);
    let pending = match store.take_pending_auth(state)? {
        PendingAuth::Valid(data) => {
            store.set_kv(KV_USED_STATE, &used_key, "used")?;
            data
        }
        PendingAuth::Expired => {
            store.set_kv(KV_USED_STATE, &used_key, "expired")?;
            return Err(Error::auth(
                NOBODY,
                format!(
                    "this sign-in took longer than {} minutes and expired; {restart}",
                    PENDING_AUTH_TTL.as_secs() / 60
                ),
            ));
        }
        PendingAuth::Unknown => {
            let message = match store.get_kv(KV_USED_STATE, &used_key)?.as_deref() {
                Some("used") => format!(
                    "this sign-in reply was already used (a reply can complete only one \
                     sign-in; was the page reloaded?); {restart} if the account is not signed in"
                ),
                Some(_) => format!("this sign-in expired; {restart}"),
                None => format!(
                    "this sign-in reply is unknown (it was not started by this PCR-360 server, \
                     or its state parameter was altered); {restart}"
                ),
            };
            return Err(Error::auth(NOBODY, message));
        }
    };
    let pending: Pending = serde_json::from_str(keys.decrypt(pending.expose())?.expose())
        .map_err(|_| Error::auth(NOBODY, format!("the pending sign-in is damaged; {restart}")))?;
    let id = pending.recid.to_string();
    let account = accounts
        .iter()
        .find(|a| a.id == AccountId::Tenant(pending.recid))
        .ok_or_else(|| {
            Error::auth(
                &id,
                "the email account this sign-in was started for no longer exists",
            )
        })?;
    let provider = Provider::of(account)?;
    if provider.as_str() != pending.provider
        || client_id(account)? != pending.client_id
        || is_client_credentials(account, provider)
        || is_service_account(account, provider)
    {
        return Err(Error::auth(
            &id,
            format!("the account's OAuth2 settings changed during the sign-in; {restart}"),
        ));
    }
    let code = code.trim();
    if code.is_empty() {
        return Err(Error::auth(
            &id,
            format!(
                "the sign-in reply has no authorization code (was the sign-in cancelled or \
                 consent refused?); {restart}"
            ),
        ));
    }
    let ep = endpoints(account, provider)?;
    let http = HttpClient::new(&account.tls, account.timeout)?;
    let secret = account.oauth.as_ref().and_then(|o| o.secret_key.as_ref());
    let client = token_client(&id, &pending.client_id, secret, &ep.token)?;
    let redirect = RedirectUrl::new(pending.redirect_uri.clone())
        .map_err(|_| Error::auth(&id, format!("the pending sign-in is damaged; {restart}")))?;
    let scope = ep.scopes.join(" ");
    let mut request = client
        .exchange_code(AuthorizationCode::new(code.to_string()))
        .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.clone()))
        .set_redirect_uri(std::borrow::Cow::Owned(redirect));
    if provider == Provider::Microsoft {
        // Microsoft wants the scopes on the code exchange too; `oauth2` has no setter for it.
        request = request.add_extra_param("scope", scope);
    }
    let now = now_secs();
    let transport = Transport::new(&http);
    let reply = request
        .request(&transport)
        .map_err(|e| transport.error(e, &ep.token))
        .map_err(|e| {
            if e.has_code("invalid_grant") {
                Error::auth(
                    &id,
                    format!(
                        "{} refused the authorization code ({}): it expired, was already used, \
                         or the redirect URI differs from the one registered; {restart}",
                        provider.service(),
                        e.detail
                    ),
                )
            } else {
                grant_error(e, provider, false, &id, &ep.token, Role::Authorize)
            }
        })?;
    let Some(refresh) = reply.refresh_token().map(str::to_string) else {
        return Err(Error::auth(
            &id,
            match provider {
                Provider::Microsoft => "Microsoft issued no refresh token: add offline_access to \
                                        the Scopes and sign in again"
                    .to_string(),
                Provider::Google => "Google issued no refresh token: remove the app's access in \
                                     the Google account's security settings and sign in again"
                    .to_string(),
            },
        ));
    };
    let access = crate::config::Secret::new(reply.access_token().to_string());
    // An IMAP/POP3/SMTP account's token is for the mail servers, not for an API that could say
    // whose it is: its mailbox is LOGIN, and the servers check the token against it.
    let mailbox = if account.auth_type == AuthType::XOAuth2 && !account.is_cloud() {
        account.login_name().to_string()
    } else {
        signed_in_mailbox(&http, provider, &ep.api_base, &access, &id)?
    };
    {
        let _lock = AccountLock::acquire(
            &tokens::lock_dir(store),
            store.dsn(),
            &id,
            account.timeout * 2,
        )?;
        store.save_token(&id, REFRESH, &keys.encrypt(&refresh), None)?;
        store.save_token(
            &id,
            &tokens::access_kind(account, &ep.scopes),
            &keys.encrypt(reply.access_token()),
            Some(reply.use_until(now)),
        )?;
    }
    store.set_kv(KV_MAILBOX, &id, &mailbox)?;
    store.delete_kv(KV_ERROR, &id)?;
    Ok(Authorized {
        recid: pending.recid,
        provider,
        differs_from_email: !mailbox.eq_ignore_ascii_case(&account.email),
        mailbox,
    })
}

/// The mailbox an access token belongs to: Graph `GET /me` (`mail`, else
/// `userPrincipalName`) or Gmail `GET /gmail/v1/users/{user}/profile` (`emailAddress`).
pub(crate) fn signed_in_mailbox(
    http: &HttpClient,
    provider: Provider,
    api_base: &str,
    token: &crate::config::Secret,
    account: &str,
) -> Result<String> {
    let url = match provider {
        Provider::Microsoft => format!("{api_base}/me?$select=mail,userPrincipalName"),
        Provider::Google => format!("{api_base}/gmail/v1/users/me/profile"),
    };
    let value: serde_json::Value = http
        .execute(&Request::new(Method::Get, &url).with_bearer(token))
        .and_then(|r| r.json())
        .map_err(|e| {
            Error::auth(
                account,
                format!("cannot look up the signed-in mailbox: {e}"),
            )
        })?;
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let mailbox = match provider {
        Provider::Microsoft => field("mail").or_else(|| field("userPrincipalName")),
        Provider::Google => field("emailAddress"),
    };
    match mailbox {
        Some(m) if crate::config::address_problem(m).is_none() => Ok(m.to_string()),
        _ => Err(Error::auth(
            account,
            format!(
                "{}: the reply names no mailbox address",
                crate::http::endpoint_label(Method::Get, &url)
            ),
        )),
    }
}

/// What `checkAccount()` shows about an account's OAuth state, from the state store only (no
/// network, no side effects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthStatus {
    pub provider: Provider,
    /// `authorization_code`, `client_credentials` or `service_account`.
    pub grant: &'static str,
    pub service_account: bool,
    /// A refresh token is stored (or, for app-only access, none is needed: a service account
    /// signs with its key, client credentials use the client secret).
    pub authorized: bool,
    /// The cached access token is usable until then (Unix seconds).
    pub access_token_valid_until: Option<i64>,
    /// When the refresh token was last saved (Unix seconds).
    pub refresh_token_saved_at: Option<i64>,
    /// The signed-in mailbox (service accounts: IMPERSONATE; client credentials: EMAIL).
    pub mailbox: Option<String>,
    /// The last token error (e.g. the refresh token was revoked), cleared by a success.
    pub last_error: Option<String>,
}

impl OAuthStatus {
    /// As `checkAccount()`'s `oauth` shows it, with whether the access token is valid now.
    pub fn view(&self) -> OAuthStatusView {
        let now = now_secs();
        OAuthStatusView {
            provider: self.provider.as_str(),
            grant: self.grant,
            service_account: self.service_account,
            authorized: self.authorized,
            access_token_valid: self.access_token_valid_until.is_some_and(|t| t > now),
            access_token_valid_until: self.access_token_valid_until,
            refresh_token_saved_at: self.refresh_token_saved_at,
            mailbox: self.mailbox.clone(),
            last_error: self.last_error.clone(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.view()).unwrap_or_default()
    }
}

/// [`OAuthStatus`] as the PHP array of `checkAccount()`'s `oauth` gives it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OAuthStatusView {
    /// `microsoft` or `google`.
    pub provider: &'static str,
    pub grant: &'static str,
    pub service_account: bool,
    pub authorized: bool,
    pub access_token_valid: bool,
    /// Unix seconds.
    pub access_token_valid_until: Option<i64>,
    /// Unix seconds.
    pub refresh_token_saved_at: Option<i64>,
    pub mailbox: Option<String>,
    pub last_error: Option<String>,
}

/// The account's OAuth state, read from the store.
pub fn status(account: &Account, store: &StateStore) -> Result<OAuthStatus> {
    let provider = Provider::of(account)?;
    let id = account.id.to_string();
    let service_account = is_service_account(account, provider);
    let client_credentials = is_client_credentials(account, provider);
    let refresh = store.load_token(&id, REFRESH)?;
    let access = store.load_token(&id, ACCESS)?;
    let mailbox = if service_account {
        account
            .oauth
            .as_ref()
            .and_then(|o| o.impersonate.clone())
            .or_else(|| Some(account.email.clone()))
    } else if client_credentials {
        Some(account.email.clone())
    } else {
        store.get_kv(KV_MAILBOX, &id)?
    };
    let grant = if service_account {
        OAuthGrant::ServiceAccount
    } else if client_credentials {
        OAuthGrant::ClientCredentials
    } else {
        OAuthGrant::AuthorizationCode
    };
    Ok(OAuthStatus {
        provider,
        grant: grant.as_str(),
        service_account,
        authorized: service_account || client_credentials || refresh.is_some(),
        access_token_valid_until: access.and_then(|a| a.expires_at),
        refresh_token_saved_at: refresh.map(|r| r.version / 1000),
        mailbox,
        last_error: store.get_kv(KV_ERROR, &id)?,
    })
}

/// The signed-in mailbox of an account: remembered from the sign-in, else looked up with a
/// token (and remembered). Service accounts act as IMPERSONATE, Microsoft app-only access as
/// EMAIL (there is no signed-in user).
pub fn mailbox_address(api: &ApiClient) -> std::result::Result<String, ApiError> {
    if let Some(subject) = api.tokens().impersonated() {
        return Ok(subject.to_string());
    }
    if let Some(mailbox) = api.app_mailbox() {
        return Ok(mailbox.to_string());
    }
    let account = api.account().to_string();
    if let Some(known) = api.tokens().store().get_kv(KV_MAILBOX, &account)? {
        return Ok(known);
    }
    let url = match api.tokens().provider() {
        Provider::Microsoft => api.graph_url("?$select=mail,userPrincipalName"),
        Provider::Google => api.url("/gmail/v1/users/me/profile"),
    };
    let value: serde_json::Value = api
        .send(Request::new(Method::Get, &url))?
        .json()
        .map_err(ApiError::Http)?;
    let pick = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::trim)
            .filter(|v| crate::config::address_problem(v).is_none())
            .map(str::to_string)
    };
    let mailbox = match api.tokens().provider() {
        Provider::Microsoft => pick("mail").or_else(|| pick("userPrincipalName")),
        Provider::Google => pick("emailAddress"),
    }
    .ok_or_else(|| {
        Error::auth(
            &account,
            format!(
                "{}: the reply names no mailbox address",
                crate::http::endpoint_label(Method::Get, &url)
            ),
        )
    })?;
    api.tokens()
        .store()
        .set_kv(KV_MAILBOX, &account, &mailbox)?;
    Ok(mailbox)
}

/// Checks that a Microsoft app-only account may open its mailbox (EMAIL) without reading,
/// sending or changing mail: `GET /users/{EMAIL}/mailFolders/{folder}` (a mail request, so the
/// mailbox grant applies; looking the user up would need a directory permission the app does
/// not need otherwise). Returns the mailbox; a refusal is the [`ApiClient::error`] of an app
/// not granted the mailbox.
pub fn check_app_mailbox(api: &ApiClient, folder: &str) -> std::result::Result<String, ApiError> {
    let Some(mailbox) = api.app_mailbox() else {
        return mailbox_address(api);
    };
    let url = api.graph_url(&format!(
        "/mailFolders/{}?$select=id",
        crate::http::percent_encode(folder)
    ));
    api.send(Request::new(Method::Get, &url))?;
    Ok(mailbox.to_string())
}

/// What an SMTP, IMAP or POP3 account with `AUTH_TYPE = XOAUTH2` signs in with: its `LOGIN`
/// and the access tokens of its grant. `role` decides how a network failure at the token
/// endpoint is reported.
pub fn bearer_credentials(
    account: &Account,
    env: &OAuthEnv,
    role: Role,
) -> Result<crate::sasl::Credentials> {
    let tokens = TokenManager::new(account, env, role)?;
    Ok(crate::sasl::Credentials::Bearer {
        user: account.login_name().to_string(),
        tokens: std::sync::Arc::new(tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OAuthSettings, Outgoing, SslMode, TlsSettings};

    pub(crate) fn account(provider: Provider, oauth: OAuthSettings) -> Account {
        Account {
            id: AccountId::Tenant(7),
            tenants_recid: 1,
            account_type: crate::config::AccountType::ServiceDesk,
            email: "sd@pcr.example.edu".into(),
            display_name: Some("Service Desk".into()),
            login: None,
            password: None,
            outgoing: Some(Outgoing {
                transport: match provider {
                    Provider::Microsoft => TransportType::Office365,
                    Provider::Google => TransportType::Gmail,
                },
                host: None,
                port: 443,
                ssl: SslMode::Ssl,
            }),
            incoming: None,
            sysadmin: None,
            tls: TlsSettings::default(),
            file_path: "/tmp".into(),
            sendmail_path: "/usr/sbin/sendmail".into(),
            timeout: Duration::from_secs(5),
            auth_type: Default::default(),
            oauth: Some(oauth),
        }
    }

    #[test]
    fn microsoft_endpoints_from_authority_and_paths() {
        let a = account(
            Provider::Microsoft,
            OAuthSettings {
                application_id: "app".into(),
                authority_url: "https://login.microsoftonline.com/contoso.onmicrosoft.com/".into(),
                authorization_endpoint: "/oauth2/v2.0/authorize".into(),
                token_endpoint: "oauth2/v2.0/token".into(),
                scopes: vec!["openid".into(), "mail.send".into()],
                ..Default::default()
            },
        );
        let ep = endpoints(&a, Provider::Microsoft).unwrap();
        assert_eq!(
            ep.authorize,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize"
        );
        assert_eq!(
            ep.token,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(ep.scopes, ["openid", "mail.send", "offline_access"]);
        assert_eq!(ep.api_base, GRAPH_BASE);
    }

    #[test]
    fn defaults_when_fields_are_empty() {
        let a = account(Provider::Google, OAuthSettings::default());
        let ep = endpoints(&a, Provider::Google).unwrap();
        assert_eq!(ep.authorize, GOOGLE_AUTHORIZE_URL);
        assert_eq!(ep.token, GOOGLE_TOKEN_URL);
        assert_eq!(ep.scopes, [GOOGLE_DEFAULT_SCOPES]);
        assert_eq!(ep.api_base, GMAIL_BASE);
        let m = account(Provider::Microsoft, OAuthSettings::default());
        let ep = endpoints(&m, Provider::Microsoft).unwrap();
        assert_eq!(
            ep.token,
            format!("{MICROSOFT_AUTHORITY}{MICROSOFT_TOKEN_PATH}")
        );
        assert!(ep.scopes.iter().any(|s| s == "Mail.ReadWrite"));
    }

    #[test]
    fn clear_text_http_only_to_loopback() {
        assert!(check_url("7", "K", "http://127.0.0.1:24880/x").is_ok());
        assert!(check_url("7", "K", "http://localhost/x").is_ok());
        assert!(check_url("7", "K", "https://graph.microsoft.com/v1.0").is_ok());
        let err = check_url(
            "7",
            "OAUTH.TOKEN_ENDPOINT",
            "http://login.example.com/token",
        )
        .unwrap_err();
        assert!(err.to_string().contains("OAUTH.TOKEN_ENDPOINT"), "{err}");
        assert!(check_url("7", "K", "http://127.0.0.1.evil.com/x").is_err());
        assert!(check_url("7", "K", "https://user:pw@host/x").is_err());
        assert!(check_url("7", "K", "ftp://host/x").is_err());
    }

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        let verifier = PkceCodeVerifier::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into());
        assert_eq!(
            PkceCodeChallenge::from_code_verifier_sha256(&verifier).as_str(),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    /// A state store in a temporary directory (kept while the first value lives) and a key.
    fn store_and_keys() -> (tempfile::TempDir, StateStore, KeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s"), None).unwrap();
        (dir, store, KeyStore::from_key([7; 32]))
    }

    #[test]
    fn authorization_urls_carry_pkce_and_provider_specifics() {
        let (_dir, store, keys) = store_and_keys();
        let a = account(
            Provider::Google,
            OAuthSettings {
                application_id: "cid.apps.googleusercontent.com".into(),
                ..Default::default()
            },
        );
        let url = authorization_url(
            &a,
            "https://pcr.example.edu/core/oauth2/validated",
            &store,
            &keys,
        )
        .unwrap();
        assert!(url.starts_with("https://accounts.google.com/o/oauth2/v2/auth?"));
        for part in [
            "client_id=cid.apps.googleusercontent.com",
            "response_type=code",
            "code_challenge_method=S256",
            "access_type=offline",
            "prompt=consent",
            "redirect_uri=https%3A%2F%2Fpcr.example.edu%2Fcore%2Foauth2%2Fvalidated",
            "scope=https%3A%2F%2Fmail.google.com%2F",
            "login_hint=sd%40pcr.example.edu",
        ] {
            assert!(url.contains(part), "{part} missing in {url}");
        }
        // The state is pending with the PKCE verifier whose S256 hash is the challenge sent.
        let query: std::collections::HashMap<String, String> = oauth2::url::Url::parse(&url)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        assert_eq!(query["state"].len(), 43, "{url}");
        let PendingAuth::Valid(sealed) = store.take_pending_auth(&query["state"]).unwrap() else {
            panic!("the state is not pending");
        };
        let pending: Pending =
            serde_json::from_str(keys.decrypt(sealed.expose()).unwrap().expose()).unwrap();
        assert_eq!(pending.verifier.len(), 86);
        assert_eq!(pending.redirect_uri, query["redirect_uri"]);
        assert_eq!(
            PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(pending.verifier))
                .as_str(),
            query["code_challenge"]
        );
        let bad = authorization_url(&a, "/core/oauth2/validated", &store, &keys).unwrap_err();
        assert!(bad.to_string().contains("redirect URI"), "{bad}");
    }

    #[test]
    fn microsoft_authorization_urls_keep_their_query_and_add_the_specifics() {
        let (_dir, store, keys) = store_and_keys();
        let a = account(
            Provider::Microsoft,
            OAuthSettings {
                application_id: "app".into(),
                authorization_endpoint: "https://login.example.com/t/authorize?domain_hint=x"
                    .into(),
                ..Default::default()
            },
        );
        let url = authorization_url(&a, "https://h/core/oauth2/validated", &store, &keys).unwrap();
        let query: Vec<(String, String)> = oauth2::url::Url::parse(&url)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        let get = |name: &str| {
            let values: Vec<&str> = query
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(values.len(), 1, "{name} in {url}");
            values[0].to_string()
        };
        assert!(url.starts_with("https://login.example.com/t/authorize?domain_hint=x&"));
        assert_eq!(get("response_mode"), "query");
        assert_eq!(get("prompt"), "select_account");
        assert_eq!(get("login_hint"), "sd@pcr.example.edu");
        assert_eq!(get("code_challenge_method"), "S256");
        assert_eq!(get("client_id"), "app");
        assert_eq!(get("scope"), MICROSOFT_DEFAULT_SCOPES);
        assert!(!url.contains("access_type"), "{url}");
    }

    #[test]
    fn states_unknown_reused_and_expired_are_told_apart() {
        let (_dir, store, keys) = store_and_keys();
        let err = complete_authorization("nope", "code", &[], &store, &keys).unwrap_err();
        assert!(err.to_string().contains("unknown"), "{err}");
        // A pending state whose account vanished is consumed: its replay says "already used".
        let a = account(
            Provider::Microsoft,
            OAuthSettings {
                application_id: "app".into(),
                ..Default::default()
            },
        );
        let url = authorization_url(&a, "https://h/core/oauth2/validated", &store, &keys).unwrap();
        let state = url
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("state="))
            .unwrap()
            .to_string();
        let err = complete_authorization(&state, "code", &[], &store, &keys).unwrap_err();
        assert!(err.to_string().contains("no longer exists"), "{err}");
        let err = complete_authorization(&state, "code", &[], &store, &keys).unwrap_err();
        assert!(err.to_string().contains("already used"), "{err}");
        store
            .put_pending_auth("old-state", &keys.encrypt("{}"), now_secs() - 5)
            .unwrap();
        let err = complete_authorization("old-state", "code", &[], &store, &keys).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        let err = complete_authorization("old-state", "code", &[], &store, &keys).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(matches!(err, Error::Auth { .. }));
    }

    #[test]
    fn client_credentials_need_no_sign_in_and_act_on_the_mailbox_email() {
        let (dir, store, keys) = store_and_keys();
        let app_only = OAuthSettings {
            grant: OAuthGrant::ClientCredentials,
            application_id: "app".into(),
            secret_key: Some(crate::config::Secret::new("s3cret")),
            ..Default::default()
        };
        let a = account(Provider::Microsoft, app_only.clone());
        let err =
            authorization_url(&a, "https://h/core/oauth2/validated", &store, &keys).unwrap_err();
        assert!(matches!(err, Error::Auth { .. }), "{err}");
        assert!(err.to_string().contains("nothing to sign in"), "{err}");
        let st = status(&a, &store).unwrap();
        assert!(st.authorized && !st.service_account);
        assert_eq!(st.grant, "client_credentials");
        assert_eq!(st.mailbox.as_deref(), Some("sd@pcr.example.edu"));

        let env = OAuthEnv {
            state_dir: dir.path().join("s"),
            state_dsn: None,
            key_file: dir.path().join("k.key"),
        };
        let api = ApiClient::new(&a, &env, Role::Send).unwrap();
        assert_eq!(api.app_mailbox(), Some("sd@pcr.example.edu"));
        assert_eq!(
            api.graph_url("/sendMail"),
            format!("{GRAPH_BASE}/users/sd%40pcr.example.edu/sendMail")
        );
        let delegated = account(
            Provider::Microsoft,
            OAuthSettings {
                grant: OAuthGrant::AuthorizationCode,
                ..app_only
            },
        );
        let api = ApiClient::new(&delegated, &env, Role::Send).unwrap();
        assert_eq!(api.app_mailbox(), None);
        assert_eq!(
            api.graph_url("/sendMail"),
            format!("{GRAPH_BASE}/me/sendMail")
        );
        assert_eq!(
            status(&delegated, &store).unwrap().grant,
            "authorization_code"
        );
    }

    #[test]
    fn service_accounts_need_no_sign_in() {
        let (_dir, store, keys) = store_and_keys();
        let a = account(
            Provider::Google,
            OAuthSettings {
                service_account_json: Some(crate::config::Secret::new("{}")),
                impersonate: Some("box@corp.example".into()),
                ..Default::default()
            },
        );
        let err =
            authorization_url(&a, "https://h/core/oauth2/validated", &store, &keys).unwrap_err();
        assert!(err.to_string().contains("needs no sign-in"), "{err}");
        let st = status(&a, &store).unwrap();
        assert!(st.service_account && st.authorized);
        assert_eq!(st.mailbox.as_deref(), Some("box@corp.example"));
    }
}
