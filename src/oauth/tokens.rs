//! Access tokens for one OFFICE365 / GMAIL account: cached (encrypted) in the state store,
//! refreshed shortly before they expire, with every rotated refresh token saved at once.
//!
//! The refresh and client-credentials grants are `oauth2`'s requests
//! ([`super::client::OAuthClient`]) sent over the account's [`HttpClient`]; the JWT bearer grant
//! of a Gmail service account (RFC 7523, which `oauth2` does not offer) is built here.
//!
//! Several PHP processes (and the mailbox threads of one process) may need a token at the same
//! moment. A refresh is therefore done under an exclusive lock file per account
//! (`STATE_DIR/oauth-locks/<account>.lock`, shared by the installation's users: see
//! [`crate::perms`]; `flock`, released by the kernel even after
//! `kill -9`): whoever waited re-reads the store and uses the token just obtained instead of
//! refreshing again. That matters with providers that invalidate a refresh token once it is
//! used: two concurrent refreshes with the same token would make one of them fail. The refresh
//! token itself is saved with compare-and-swap on its version, so a refresh can never replace a
//! token stored meanwhile by a new authorization.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use oauth2::RefreshToken;

use super::client::{oauth_scopes, token_client, OAuthClient, TokenReply, Transport};
use super::jwt::ServiceAccountKey;
use super::{endpoints, OAuthEnv, Provider};
use crate::config::secrets::KeyStore;
use crate::config::{Account, OAuthGrant, Secret};
use crate::error::{Error, Result};
use crate::http::{Body, HttpClient, HttpError, Method, Request, Role};
use crate::state::StateStore;

/// Token kind of the (encrypted) refresh token in the state store.
pub const REFRESH: &str = "oauth_refresh";
/// Token kind of the (encrypted) cached access token; its `expires_at` is the time we stop
/// using it (a little before the provider's expiry).
pub const ACCESS: &str = "oauth_access";
/// kv namespace: the signed-in mailbox address per account.
pub const KV_MAILBOX: &str = "oauth-mailbox";
/// kv namespace: the SASL mechanism an account's tokens were last sent with (`checkAccount`).
pub const KV_MECHANISM: &str = "oauth-sasl-mechanism";
/// kv namespace: the last token error per account (no secret in it), cleared on success.
pub const KV_ERROR: &str = "oauth-error";
/// `grant_type` of RFC 7523.
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// How the account gets a new access token.
enum Grant {
    /// A refresh token from the authorization-code sign-in.
    Refresh {
        client: OAuthClient,
        token_url: String,
        /// Microsoft wants the scopes again on refresh; Google does not.
        scopes: Option<Vec<String>>,
    },
    /// Microsoft app-only access: the application's client secret, no refresh token.
    ClientCredentials {
        client: OAuthClient,
        token_url: String,
        scopes: Vec<String>,
    },
    /// A Gmail service account: a JWT assertion signed with its key.
    ServiceAccount {
        key: Box<ServiceAccountKey>,
        subject: String,
        scope: String,
        token_url: String,
    },
}

/// The access tokens of one account. `Sync`: a transport shares it between sending threads.
pub struct TokenManager {
    account: String,
    provider: Provider,
    grant: Grant,
    /// Token kind of the cached access token: [`ACCESS`] for the cloud accounts, with the
    /// scope for SMTP/IMAP/POP3 ones (cached per account and scope).
    access_kind: String,
    http: HttpClient,
    store: Mutex<StateStore>,
    keys: KeyStore,
    lock_dir: PathBuf,
    /// The shared database the store lives in: the refresh lock is taken there too.
    lock_dsn: Option<crate::state::Dsn>,
    lock_wait: Duration,
    role: Role,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("account", &self.account)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl TokenManager {
    /// The token source of `account` (an OFFICE365 or GMAIL account). `role` decides how a
    /// network failure at the token endpoint is reported (`Transport`, `Mailbox` or `Auth`).
    pub fn new(account: &Account, env: &OAuthEnv, role: Role) -> Result<TokenManager> {
        let provider = Provider::of(account)?;
        let id = account.id.to_string();
        let ep = endpoints(account, provider)?;
        let oauth = account.oauth.as_ref().expect("endpoints() checked OAUTH");
        let grant = match (&oauth.service_account_json, provider) {
            _ if oauth.grant == OAuthGrant::ClientCredentials => {
                let secret = oauth.secret_key.as_ref().ok_or_else(|| {
                    Error::account_key(
                        &id,
                        "OAUTH.SECRET_KEY",
                        "client_credentials needs the application's client secret",
                    )
                })?;
                Grant::ClientCredentials {
                    client: token_client(
                        &id,
                        &super::client_id(account)?,
                        Some(secret),
                        &ep.token,
                    )?,
                    token_url: ep.token.clone(),
                    scopes: ep.scopes.clone(),
                }
            }
            (Some(json), Provider::Google) => {
                let key = ServiceAccountKey::parse(json.expose(), &id)?;
                let token_url = if oauth.token_endpoint.trim().is_empty() {
                    key.token_uri
                        .clone()
                        .unwrap_or_else(|| super::GOOGLE_TOKEN_URL.to_string())
                } else {
                    ep.token.clone()
                };
                super::check_url(&id, "OAUTH.TOKEN_ENDPOINT", &token_url)?;
                Grant::ServiceAccount {
                    key: Box::new(key),
                    // SPEC §3a: IMPERSONATE, default LOGIN (which defaults to EMAIL).
                    subject: oauth
                        .impersonate
                        .clone()
                        .unwrap_or_else(|| account.login_name().to_string()),
                    scope: ep.scopes.join(" "),
                    token_url,
                }
            }
            _ => Grant::Refresh {
                client: token_client(
                    &id,
                    &super::client_id(account)?,
                    oauth.secret_key.as_ref(),
                    &ep.token,
                )?,
                token_url: ep.token.clone(),
                scopes: (provider == Provider::Microsoft).then(|| ep.scopes.clone()),
            },
        };
        let store = env.open_store()?;
        let access_kind = access_kind(account, &ep.scopes);
        Ok(TokenManager {
            account: id,
            provider,
            grant,
            access_kind,
            http: HttpClient::new(&account.tls, account.timeout)?,
            lock_dir: lock_dir(&store),
            lock_dsn: store.dsn().cloned(),
            store: Mutex::new(store),
            keys: env.open_keys()?,
            lock_wait: account.timeout.max(Duration::from_secs(5)) * 2,
            role,
        })
    }

    /// The same manager with another HTTP client (e.g. another retry policy).
    pub fn with_http(mut self, http: HttpClient) -> TokenManager {
        self.http = http;
        self
    }

    /// `master` or the RECID, as errors name it.
    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// True for a Gmail service account (no sign-in, no refresh token).
    pub fn is_service_account(&self) -> bool {
        matches!(self.grant, Grant::ServiceAccount { .. })
    }

    /// True when a usable access token is cached (the last request for one succeeded).
    pub fn has_fresh_token(&self) -> bool {
        matches!(self.cached(None), Ok(Some(_)))
    }

    /// The grant's name, for reports.
    pub fn grant_name(&self) -> &'static str {
        match self.grant {
            Grant::Refresh { .. } => "authorization_code",
            Grant::ClientCredentials { .. } => "client_credentials",
            Grant::ServiceAccount { .. } => "service_account",
        }
    }

    /// The mailbox a service account acts as (`IMPERSONATE`).
    pub fn impersonated(&self) -> Option<&str> {
        match &self.grant {
            Grant::ServiceAccount { subject, .. } => Some(subject),
            Grant::Refresh { .. } | Grant::ClientCredentials { .. } => None,
        }
    }

    /// The state store this manager uses (also for the callers' own bookkeeping).
    pub fn store(&self) -> MutexGuard<'_, StateStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A usable access token: the cached one while it is fresh, else a new one.
    pub fn access_token(&self) -> Result<Secret> {
        if let Some(token) = self.cached(None)? {
            return Ok(token);
        }
        self.renew(None)
    }

    /// A new access token after the API rejected `rejected` (401): another process's newer
    /// token when there is one, else a refresh.
    pub fn refresh_after_rejection(&self, rejected: &Secret) -> Result<Secret> {
        self.renew(Some(rejected))
    }

    /// The cached access token when it is still fresh and is not `rejected`.
    fn cached(&self, rejected: Option<&Secret>) -> Result<Option<Secret>> {
        let Some(stored) = self.store().load_token(&self.account, &self.access_kind)? else {
            return Ok(None);
        };
        let fresh = stored.expires_at.is_some_and(|until| until > now_secs());
        if !fresh {
            return Ok(None);
        }
        let token = self.keys.decrypt(stored.value.expose())?;
        Ok((rejected != Some(&token)).then_some(token))
    }

    fn renew(&self, rejected: Option<&Secret>) -> Result<Secret> {
        let _lock = AccountLock::acquire(
            &self.lock_dir,
            self.lock_dsn.as_ref(),
            &self.account,
            self.lock_wait,
        )?;
        // Someone else may have refreshed while we waited for the lock.
        if let Some(token) = self.cached(rejected)? {
            return Ok(token);
        }
        let result = match &self.grant {
            Grant::Refresh { .. } => self.refresh_grant(),
            Grant::ClientCredentials { .. } => self.client_credentials_grant(),
            Grant::ServiceAccount { .. } => self.jwt_grant(),
        };
        match &result {
            Ok(_) => {
                let _ = self.store().delete_kv(KV_ERROR, &self.account);
            }
            Err(e @ (Error::Auth { .. } | Error::Config { .. })) => {
                let _ = self.store().set_kv(KV_ERROR, &self.account, &e.to_string());
            }
            Err(_) => {}
        }
        result
    }

    fn refresh_grant(&self) -> Result<Secret> {
        let Grant::Refresh {
            client,
            token_url,
            scopes,
        } = &self.grant
        else {
            unreachable!("refresh_grant on a service account")
        };
        let Some(stored) = self.store().load_token(&self.account, REFRESH)? else {
            return Err(Error::auth(
                &self.account,
                format!(
                    "the account is not signed in to {} yet: open the tenant email's OAuth2 tab \
                     and click \"Click to Authenticate\"",
                    self.provider.service()
                ),
            ));
        };
        let refresh_token = self.keys.decrypt(stored.value.expose())?;
        let sent = RefreshToken::new(refresh_token.expose().to_string());
        let now = now_secs();
        let transport = Transport::new(&self.http);
        let request = client
            .exchange_refresh_token(&sent)
            .add_scopes(scopes.iter().flat_map(|s| oauth_scopes(s)));
        let reply = match request.request(&transport) {
            Ok(reply) => reply,
            Err(e) => return Err(self.grant_error(transport.error(e, token_url), token_url)),
        };
        // Save a rotated refresh token before anything else can fail.
        if let Some(new_refresh) = reply.refresh_token() {
            if new_refresh != refresh_token.expose() {
                let sealed = self.keys.encrypt(new_refresh);
                // `None`: a new sign-in stored another token meanwhile; it wins.
                let _ = self.store().replace_token(
                    &self.account,
                    REFRESH,
                    Some(stored.version),
                    &sealed,
                    None,
                )?;
            }
        }
        self.cache_access(&reply, now)
    }

    fn client_credentials_grant(&self) -> Result<Secret> {
        let Grant::ClientCredentials {
            client,
            token_url,
            scopes,
        } = &self.grant
        else {
            unreachable!("client_credentials_grant without client credentials")
        };
        let now = now_secs();
        let transport = Transport::new(&self.http);
        let reply = client
            .exchange_client_credentials()
            .add_scopes(oauth_scopes(scopes))
            .request(&transport);
        match reply {
            Ok(reply) => self.cache_access(&reply, now),
            Err(e) => Err(self.grant_error(transport.error(e, token_url), token_url)),
        }
    }

    fn jwt_grant(&self) -> Result<Secret> {
        let Grant::ServiceAccount {
            key,
            subject,
            scope,
            token_url,
        } = &self.grant
        else {
            unreachable!("jwt_grant without a service account")
        };
        let now = now_secs();
        let assertion = key.assertion(subject, scope, token_url, now, &self.account)?;
        let form = [
            ("grant_type", JWT_BEARER),
            ("assertion", assertion.as_str()),
        ];
        let reply = self
            .http
            .execute(&Request::new(Method::Post, token_url).with_body(Body::Form(&form)))
            .and_then(|r| r.json::<TokenReply>());
        match reply {
            Ok(reply) => self.cache_access(&reply, now),
            Err(e) => Err(self.grant_error(e, token_url)),
        }
    }

    fn cache_access(&self, reply: &TokenReply, now: i64) -> Result<Secret> {
        if reply.access_token().is_empty() {
            return Err(Error::auth(
                &self.account,
                "the token endpoint returned an empty access token",
            ));
        }
        let sealed = self.keys.encrypt(reply.access_token());
        self.store().save_token(
            &self.account,
            &self.access_kind,
            &sealed,
            Some(reply.use_until(now)),
        )?;
        Ok(Secret::new(reply.access_token().to_string()))
    }

    /// The error for a failed token request: `Auth` when the grant itself was refused (the
    /// administrator must act), else by role.
    fn grant_error(&self, e: HttpError, token_url: &str) -> Error {
        grant_error(
            e,
            self.provider,
            self.is_service_account(),
            &self.account,
            token_url,
            self.role,
        )
    }
}

/// The token kind an account's access token is cached under (see `TokenManager::access_kind`).
pub(crate) fn access_kind(account: &Account, scopes: &[String]) -> String {
    if account.is_cloud() {
        ACCESS.to_string()
    } else {
        format!("{ACCESS} {}", scopes.join(" "))
    }
}

impl crate::sasl::TokenSource for TokenManager {
    fn access_token(&self) -> Result<Secret> {
        TokenManager::access_token(self)
    }
    fn refresh_after_rejection(&self, rejected: &Secret) -> Result<Secret> {
        TokenManager::refresh_after_rejection(self, rejected)
    }
    fn grant(&self) -> &'static str {
        self.grant_name()
    }
    fn note_mechanism(&self, mechanism: crate::sasl::Mechanism) {
        let _ = self
            .store()
            .set_kv(KV_MECHANISM, &self.account, mechanism.name());
    }
}

/// Maps a token endpoint failure: refused grants and clients are `Auth` errors telling the
/// administrator what to do; network trouble follows `role`.
pub(crate) fn grant_error(
    e: HttpError,
    provider: Provider,
    service_account: bool,
    account: &str,
    token_url: &str,
    role: Role,
) -> Error {
    let service = provider.service();
    if e.has_code("invalid_grant") && service_account {
        return Error::auth(
            account,
            format!(
                "Google refused the service account's signed request ({}): check the key file, \
                 the IMPERSONATE mailbox and the server clock",
                e.detail
            ),
        );
    }
    if e.has_code("invalid_grant") {
        return Error::auth(
            account,
            format!(
                "the {service} refresh token was revoked or has expired ({}); an administrator \
                 must sign in again: open the tenant email's OAuth2 tab and click \"Click to RE \
                 Authenticate\"",
                e.detail
            ),
        );
    }
    if e.has_code("invalid_client") || e.has_code("unauthorized_client") {
        let what = if service_account {
            "the service account is not allowed to act for the mailbox: grant it domain-wide \
             delegation for the scopes in the Google Workspace admin console"
        } else {
            "check the Application ID and the Secret KEY (a client secret expires; create a new \
             one and save it on the OAuth2 tab, or as email.OAUTH.SECRET_KEY in the INI)"
        };
        return Error::auth(
            account,
            format!("{service} rejected the application ({}): {what}", e.detail),
        );
    }
    if e.has_code("invalid_scope") {
        return Error::auth(
            account,
            format!(
                "{service} refused the Scopes ({}): check the OAuth2 tab",
                e.detail
            ),
        );
    }
    let server = crate::http::endpoint_label(Method::Post, token_url);
    let server = server.trim_start_matches("POST ").to_string();
    e.into_error(role, account, &server)
}

/// The directory of the per-account lock files, beside the state database.
pub(crate) fn lock_dir(store: &StateStore) -> PathBuf {
    store
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
        .join("oauth-locks")
}

/// An exclusive `flock` on one account's lock file, held until dropped; with
/// `email.STATE_DSN` (`dsn`: the database of the store the token is in) also a lock in the
/// shared database, so that servers exclude each other.
pub(crate) struct AccountLock {
    _file: File,
    _database: Option<crate::state::DatabaseLock>,
}

impl AccountLock {
    pub(crate) fn acquire(
        dir: &Path,
        dsn: Option<&crate::state::Dsn>,
        account: &str,
        wait: Duration,
    ) -> Result<AccountLock> {
        let fail = |what: String| {
            Error::auth(
                account,
                format!("cannot lock the OAuth token of the account ({what})"),
            )
        };
        if !dir.is_dir() {
            crate::perms::create_dir_all(dir, crate::perms::DIR_MODE)
                .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        }
        let name: String = account
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("{name}.lock"));
        // Shared by cron's user and the web server's user: the directory's group, 0660.
        let (file, _) = crate::perms::open_or_create(&path, crate::perms::FILE_MODE, false)
            .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    let database = match dsn {
                        Some(dsn) => Some(
                            crate::state::database_lock(
                                dsn,
                                &format!("oauth:{account}"),
                                deadline.saturating_duration_since(Instant::now()),
                            )
                            .map_err(fail)?,
                        ),
                        None => None,
                    };
                    return Ok(AccountLock {
                        _file: file,
                        _database: database,
                    });
                }
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(fail(format!(
                        "another process has been renewing it for over {} s",
                        wait.as_secs()
                    )))
                }
                Err(TryLockError::Error(e)) => {
                    return Err(fail(format!("{}: {e}", path.display())))
                }
            }
        }
    }
}

pub(crate) fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = AccountLock::acquire(dir.path(), None, "7", Duration::from_secs(1)).unwrap();
        let err = AccountLock::acquire(dir.path(), None, "7", Duration::from_millis(100))
            .err()
            .unwrap();
        assert!(err.to_string().contains("renewing"), "{err}");
        let other = AccountLock::acquire(dir.path(), None, "8", Duration::from_millis(100));
        assert!(other.is_ok());
        drop(first);
        assert!(AccountLock::acquire(dir.path(), None, "7", Duration::from_millis(100)).is_ok());
    }
}
