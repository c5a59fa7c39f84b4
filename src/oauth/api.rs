//! Calls to Microsoft Graph and the Gmail API with the account's access token: a 401 gets one
//! token refresh and one retry, throttling is waited out by [`crate::http`].

use super::tokens::TokenManager;
use super::{endpoints, OAuthEnv, Provider};
use crate::config::Account;
use crate::error::{Error, Result};
use crate::http::{percent_encode, HttpClient, HttpError, Request, Response, Role};

/// Why an API call failed: the HTTP reply (inspect it: 404, 409, ...) or a failure that is
/// already the crate's error (no token, re-authentication needed, ...).
#[derive(Debug)]
pub enum ApiError {
    Http(HttpError),
    Fatal(Error),
}

impl ApiError {
    /// The HTTP status of the reply, if the server gave one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Http(e) => e.status,
            ApiError::Fatal(_) => None,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::Fatal(e)
    }
}

/// An authenticated client of one account's API (Graph or Gmail).
#[derive(Debug)]
pub struct ApiClient {
    http: HttpClient,
    tokens: TokenManager,
    base: String,
    role: Role,
    /// Microsoft app-only (client credentials): the mailbox the app acts on, the account's
    /// EMAIL. `None` for a signed-in (delegated) account and for Google.
    app_mailbox: Option<String>,
}

impl ApiClient {
    /// The API client of an OFFICE365 or GMAIL account; `API_BASE_URL` or the provider's
    /// default base.
    pub fn new(account: &Account, env: &OAuthEnv, role: Role) -> Result<ApiClient> {
        let provider = Provider::of(account)?;
        let base = endpoints(account, provider)?.api_base;
        let tokens = TokenManager::new(account, env, role)?;
        let app_mailbox = super::is_client_credentials(account, provider)
            .then(|| account.email.trim().to_string());
        Ok(ApiClient {
            http: HttpClient::new(&account.tls, account.timeout)?,
            tokens,
            base,
            role,
            app_mailbox,
        })
    }

    /// The same client with another HTTP client for the API and the token endpoint.
    pub fn with_http(mut self, http: HttpClient) -> ApiClient {
        self.tokens = self.tokens.with_http(http.clone());
        self.http = http;
        self
    }

    /// The API base URL (no trailing slash), e.g. `https://graph.microsoft.com/v1.0`.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn tokens(&self) -> &TokenManager {
        &self.tokens
    }

    pub fn account(&self) -> &str {
        self.tokens.account()
    }

    /// The mailbox a Microsoft app-only account (client credentials) acts on: its EMAIL.
    /// `None` when a person signed in (the mailbox is then whoever signed in).
    pub fn app_mailbox(&self) -> Option<&str> {
        self.app_mailbox.as_deref()
    }

    /// The Graph path of the account's mailbox, which every mail request starts with: `/me`
    /// for a signed-in account, `/users/{EMAIL}` (percent-encoded) for app-only access, which
    /// has no signed-in user (`/me` is refused) and may open any mailbox it is granted, a
    /// shared mailbox included.
    pub fn graph_user(&self) -> String {
        match &self.app_mailbox {
            Some(mailbox) => format!("/users/{}", percent_encode(mailbox)),
            None => "/me".to_string(),
        }
    }

    /// `base` + [`ApiClient::graph_user`] + `path` (which starts with `/`, or is empty).
    pub fn graph_url(&self, path: &str) -> String {
        format!("{}{}{path}", self.base, self.graph_user())
    }

    /// `base` + `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// True when `url` is on the API's own origin (paging links are followed only there, so a
    /// token never leaves for another host).
    pub fn same_origin(&self, url: &str) -> bool {
        fn origin(u: &str) -> Option<String> {
            let (scheme, rest) = u.split_once("://")?;
            let host = rest.split(['/', '?', '#']).next()?;
            Some(format!(
                "{}://{}",
                scheme.to_ascii_lowercase(),
                host.to_ascii_lowercase()
            ))
        }
        origin(url).is_some_and(|o| Some(o) == origin(&self.base))
    }

    /// Sends `req` with the access token; after a 401, refreshes once and retries once.
    pub fn send(&self, req: Request<'_>) -> std::result::Result<Response, ApiError> {
        let token = self.tokens.access_token()?;
        match self.http.execute(&req.with_bearer(&token)) {
            Err(e) if e.is_status(401) => {
                let fresh = self.tokens.refresh_after_rejection(&token)?;
                self.http.execute(&req.with_bearer(&fresh)).map_err(|e| {
                    if !e.is_status(401) {
                        ApiError::Http(e)
                    } else if self.app_mailbox.is_some() {
                        ApiError::Fatal(Error::auth(
                            self.account(),
                            format!(
                                "Microsoft Graph rejected a freshly issued app-only access token \
                                 ({e}): leave OAUTH.SCOPES empty (or \
                                 https://graph.microsoft.com/.default) and give the app \
                                 registration the Microsoft Graph application permissions \
                                 Mail.ReadWrite and Mail.Send with admin consent"
                            ),
                        ))
                    } else {
                        ApiError::Fatal(Error::auth(
                            self.account(),
                            format!(
                                "{} rejected a freshly issued access token ({e}); an administrator \
                                 must sign in again on the tenant email's OAuth2 tab (\"Click to \
                                 RE Authenticate\")",
                                self.tokens.provider().service()
                            ),
                        ))
                    }
                })
            }
            other => other.map_err(ApiError::Http),
        }
    }

    /// Sends `req` and reads the reply as JSON of type `T`; any failure is the crate error
    /// ([`ApiClient::error`]).
    pub fn json<T: serde::de::DeserializeOwned>(&self, req: Request<'_>) -> Result<T> {
        self.send(req)
            .and_then(|r| r.json().map_err(ApiError::Http))
            .map_err(|e| self.error(e))
    }

    /// The crate error for a failed call, by role (server = the API base URL). A 403 says
    /// which permission is likely missing.
    pub fn error(&self, e: ApiError) -> Error {
        match e {
            ApiError::Fatal(e) => e,
            ApiError::Http(e)
                if e.is_status(403) && !e.throttled() && self.app_mailbox.is_some() =>
            {
                self.not_granted(&e)
            }
            ApiError::Http(mut e) => {
                if e.is_status(403) && !e.throttled() {
                    e.detail = format!(
                        "{}{}the signed-in mailbox lacks a permission: {}",
                        e.detail,
                        if e.detail.is_empty() { "" } else { "; " },
                        match self.tokens.provider() {
                            Provider::Microsoft =>
                                "grant Mail.ReadWrite and Mail.Send (delegated) to the app and sign in again",
                            Provider::Google =>
                                "check the Scopes (https://mail.google.com/) and sign in again",
                        }
                    );
                }
                e.into_error(self.role, self.account(), &self.base)
            }
        }
    }

    /// The error of an app-only account refused its mailbox (Graph 403 `ErrorAccessDenied`,
    /// e.g. "Blocked by tenant configured AppOnly AccessPolicy settings"): the app is not
    /// granted that mailbox, or lacks the Mail permissions. An administrator must act, so it
    /// is an `Auth` error whatever the call was.
    fn not_granted(&self, e: &HttpError) -> Error {
        let mailbox = self.app_mailbox.as_deref().unwrap_or("");
        let policy = e.detail.to_ascii_lowercase().contains("accesspolicy");
        Error::auth(
            self.account(),
            format!(
                "Microsoft 365 refused the application access to the mailbox {mailbox} ({e}): \
                 {}the app must be granted this mailbox: either the Microsoft Graph application \
                 permissions Mail.ReadWrite and Mail.Send (with admin consent) and an application \
                 access policy that includes the mailbox (New-ApplicationAccessPolicy), or, with \
                 Exchange RBAC for Applications, the roles \"Application Mail.ReadWrite\" and \
                 \"Application Mail.Send\" assigned to the app with a scope holding the mailbox \
                 (New-ManagementRoleAssignment)",
                if policy {
                    "an application access policy of the tenant excludes it; "
                } else {
                    ""
                }
            ),
        )
    }
}
