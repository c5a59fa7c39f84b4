//! `checkAccount()`: connects and authenticates to an account's servers without sending or
//! changing mail, and reports each step (the outgoing server, the incoming mailbox, an
//! XOAUTH2 account's sign-in, a cloud account's OAuth state and API). A failed check is a
//! report with `ok` false, never an exception.

use serde::Serialize;
use serde_json::Value;

use crate::config::{Account, AuthType, PublicAccount};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::host::Host;
use crate::http::{Method, Request, Role};
use crate::oauth::{self, ApiClient, ApiError, Provider};
use crate::state::StateStore;

// ----- The report (SPEC §5), converted to an array at the PHP boundary -----

/// What `checkAccount()` returns: the account as `resolveAccount()` shows it (no secret), and
/// the checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountReport {
    /// `RECID`, `EMAIL`, `OUTGOING_*`, `INCOMING_*`, ...
    #[serde(flatten)]
    pub account: PublicAccount,
    /// Null when the account does not send.
    pub outgoing: Option<OutgoingCheck>,
    /// Null when the account does not receive.
    pub incoming: Option<IncomingCheck>,
    /// OFFICE365 / GMAIL accounts and XOAUTH2 accounts only; absent for the others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthCheck>,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OutgoingCheck {
    Passed(OutgoingPassed),
    Failed(OutgoingFailed),
}

/// The steps the transport's check went through (`ok` true).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutgoingPassed {
    pub transport: &'static str,
    /// `host:port`, the sendmail path or the FILE directory.
    pub server: String,
    pub ok: bool,
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutgoingFailed {
    pub transport: Option<&'static str>,
    pub ok: bool,
    pub error: String,
    /// For a transport failure: the server and how it failed.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub failure: Option<ServerFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerFailure {
    pub server: String,
    /// The SMTP reply code (HTTP status for the cloud APIs), when the server gave one.
    pub code: Option<u16>,
    pub transient: bool,
}

impl OutgoingCheck {
    fn ok(&self) -> bool {
        match self {
            OutgoingCheck::Passed(p) => p.ok,
            OutgoingCheck::Failed(f) => f.ok,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum IncomingCheck {
    Passed {
        protocol: Option<&'static str>,
        ok: bool,
        /// The messages in the incoming folder.
        messages: usize,
    },
    Failed {
        protocol: Option<&'static str>,
        ok: bool,
        error: String,
        /// For a mailbox failure: the server.
        #[serde(skip_serializing_if = "Option::is_none")]
        server: Option<String>,
    },
}

impl IncomingCheck {
    fn ok(&self) -> bool {
        match self {
            IncomingCheck::Passed { ok, .. } | IncomingCheck::Failed { ok, .. } => *ok,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OAuthCheck {
    Cloud(CloudCheck),
    Token(TokenSignIn),
}

/// The `oauth` part for an XOAUTH2 account (SMTP / IMAP / POP3 signing in with a token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenSignIn {
    /// Always `XOAUTH2`.
    pub auth_type: &'static str,
    /// `authorization_code`, `client_credentials` or `service_account`; null when the
    /// account's OAuth settings cannot be used.
    pub grant: Option<&'static str>,
    pub provider: Option<&'static str>,
    pub token_obtained: bool,
    /// The SASL mechanism the last sign-in used.
    pub mechanism: Option<String>,
    pub mailbox: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `oauth` part for an OFFICE365 / GMAIL account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CloudCheck {
    /// The account's provider or OAuth state could not be read.
    Unreadable {
        #[serde(skip_serializing_if = "Option::is_none")]
        provider: Option<&'static str>,
        ok: bool,
        error: String,
    },
    Checked {
        /// The OAuth state, read after the live check.
        #[serde(flatten)]
        status: oauth::OAuthStatusView,
        /// The live check's error, when it failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        api: ApiCheck,
        ok: bool,
    },
}

/// The live check of a cloud account's API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ApiCheck {
    Passed {
        ok: bool,
        server: String,
        /// The mailbox the API says the token is for.
        mailbox: Option<String>,
    },
    Failed {
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        server: Option<String>,
        error: String,
    },
}

impl ApiCheck {
    fn passed(server: &str, mailbox: Option<String>) -> ApiCheck {
        ApiCheck::Passed {
            ok: true,
            server: server.to_string(),
            mailbox,
        }
    }

    fn failed(server: Option<&str>, error: impl ToString) -> ApiCheck {
        ApiCheck::Failed {
            ok: false,
            server: server.map(str::to_string),
            error: error.to_string(),
        }
    }
}

// ----- The checks -----

/// `checkAccount()`: connects and authenticates to the account's outgoing server (or
/// checks the FILE directory / sendmail binary) without sending; reports, never throws
/// for a failed check.
pub fn check_account(
    ctx: &mut Context<'_>,
    host: &mut dyn Host,
    recid: &str,
) -> Result<AccountReport> {
    let account = ctx.find_account(host, recid)?;
    let outgoing = account.outgoing.as_ref().map(|_| {
        match outgoing_transport_check(&account, &ctx.oauth_env()) {
            Ok(report) => OutgoingCheck::Passed(OutgoingPassed {
                transport: report.transport,
                server: report.server,
                ok: true,
                steps: report.steps,
            }),
            Err(e) => OutgoingCheck::Failed(check_error(&account, &e)),
        }
    });
    let incoming = account
        .incoming
        .as_ref()
        .map(|_| check_incoming(ctx, &account));
    let mut ok = outgoing.as_ref().is_none_or(OutgoingCheck::ok)
        && incoming.as_ref().is_none_or(IncomingCheck::ok);
    let oauth = if account.is_cloud() {
        let oauth = check_cloud_account(ctx, &account);
        ok &= match &oauth {
            CloudCheck::Unreadable { ok, .. } | CloudCheck::Checked { ok, .. } => *ok,
        };
        Some(OAuthCheck::Cloud(oauth))
    } else if account.auth_type == AuthType::XOAuth2 {
        Some(OAuthCheck::Token(check_token_sign_in(ctx, &account)))
    } else {
        None
    };
    Ok(AccountReport {
        account: account.public(),
        outgoing,
        incoming,
        oauth,
        ok,
    })
}

fn outgoing_transport_check(
    account: &Account,
    env: &oauth::OAuthEnv,
) -> Result<crate::outgoing::CheckReport> {
    crate::outgoing::transport_for(account, env).and_then(|t| t.check())
}

fn check_error(account: &Account, error: &Error) -> OutgoingFailed {
    OutgoingFailed {
        transport: account.outgoing.as_ref().map(|o| o.transport.as_str()),
        ok: false,
        error: error.to_string(),
        failure: match error {
            Error::Transport(t) => Some(ServerFailure {
                server: t.server.clone(),
                code: t.code,
                transient: t.transient,
            }),
            _ => None,
        },
    }
}

/// What `checkAccount()` says of an XOAUTH2 account's sign-in, after the checks above
/// have signed in: the grant, whether a token was obtained, the SASL mechanism used and
/// the mailbox (LOGIN). Nothing is sent or changed.
pub fn check_token_sign_in(ctx: &Context<'_>, account: &Account) -> TokenSignIn {
    let env = ctx.oauth_env();
    let tokens = oauth::TokenManager::new(account, &env, Role::Authorize);
    let (grant, provider, token) = match &tokens {
        Ok(t) => (
            Some(t.grant_name()),
            Some(t.provider().service()),
            t.has_fresh_token(),
        ),
        Err(_) => (None, None, false),
    };
    let mechanism = tokens
        .as_ref()
        .ok()
        .and_then(|t| {
            t.store()
                .get_kv(oauth::tokens::KV_MECHANISM, t.account())
                .ok()
        })
        .flatten();
    TokenSignIn {
        auth_type: "XOAUTH2",
        grant,
        provider,
        token_obtained: token,
        mechanism,
        mailbox: account.login_name().to_string(),
        ok: token,
        error: tokens.err().map(|e| e.to_string()),
    }
}

/// Connects, authenticates and opens the incoming folder (IMAP read-only) or Maildir and
/// counts its messages; changes nothing in the mailbox.
pub fn check_incoming(ctx: &Context<'_>, account: &Account) -> IncomingCheck {
    let protocol = account.incoming.as_ref().map(|i| i.mailbox.as_str());
    let checked = StateStore::open(&ctx.settings.state_dir, ctx.settings.state_dsn.as_ref())
        .and_then(|state| crate::incoming::open(account, &ctx.oauth_env(), state))
        .and_then(|mut mailbox| {
            let count = mailbox.count();
            // A clean logout: nothing was listed or marked, so nothing is committed.
            let closed = mailbox.finish();
            let count = count?;
            closed?;
            Ok(count)
        });
    match checked {
        Ok(count) => IncomingCheck::Passed {
            protocol,
            ok: true,
            messages: count,
        },
        Err(e) => IncomingCheck::Failed {
            protocol,
            ok: false,
            error: e.to_string(),
            server: match &e {
                Error::Mailbox(m) => Some(m.server.clone()),
                _ => None,
            },
        },
    }
}

/// The `oauth` part of `checkAccount()` for an OFFICE365 / GMAIL account: whether it is
/// signed in, the signed-in mailbox, until when the access token is valid and the last
/// token error (from the state store), after a live check that obtains a token and asks
/// the API who it is (no mail is sent, read or changed). `ok` is false when the account
/// is not signed in or the live check failed.
pub fn check_cloud_account(ctx: &Context<'_>, account: &Account) -> CloudCheck {
    let env = ctx.oauth_env();
    let id = account.id.to_string();
    let unreadable = |provider: Option<Provider>, e: Error| CloudCheck::Unreadable {
        provider: provider.map(Provider::as_str),
        ok: false,
        error: e.to_string(),
    };
    let provider = match Provider::of(account) {
        Ok(p) => p,
        Err(e) => return unreadable(None, e),
    };
    let store = match env.open_store() {
        Ok(s) => s,
        Err(e) => return unreadable(Some(provider), e),
    };
    let before = match oauth::status(account, &store) {
        Ok(s) => s,
        Err(e) => return unreadable(Some(provider), e),
    };
    let api = if before.authorized {
        live_check(account, &env, provider)
    } else {
        ApiCheck::failed(
            None,
            format!(
                "account {id} is not signed in to {}: open the tenant email's OAuth2 tab and \
                 click \"Click to Authenticate\"",
                provider.service()
            ),
        )
    };
    // Read again: the live check may have renewed the token or recorded an error.
    let status = oauth::status(account, &store).unwrap_or(before).view();
    let (ok, error) = match &api {
        ApiCheck::Passed { ok, .. } => (*ok, None),
        ApiCheck::Failed { ok, error, .. } => (*ok, Some(error.clone())),
    };
    CloudCheck::Checked {
        status,
        error,
        api,
        ok,
    }
}

/// Obtains an access token and asks the API whose it is: Graph `GET /me`, Gmail `GET
/// users/{user}/profile`; with Microsoft app-only access, whether the app may open the mailbox
/// EMAIL (a folder of it). `{ok, server, mailbox}` or `{ok: false, server, error}`.
fn live_check(account: &Account, env: &oauth::OAuthEnv, provider: Provider) -> ApiCheck {
    let api = match ApiClient::new(account, env, Role::Authorize) {
        Ok(api) => api,
        Err(e) => return ApiCheck::failed(None, e),
    };
    if let Some(mailbox) = api.app_mailbox() {
        // App-only: no signed-in user to ask about; check the grant on the mailbox EMAIL.
        let folder = if account.incoming.is_some() {
            "inbox"
        } else {
            "sentitems"
        };
        return match oauth::check_app_mailbox(&api, folder) {
            Ok(_) => ApiCheck::passed(api.base(), Some(mailbox.to_string())),
            Err(e) => ApiCheck::failed(Some(api.base()), api.error(e)),
        };
    }
    let url = match provider {
        Provider::Microsoft => api.url("/me?$select=mail,userPrincipalName"),
        Provider::Google => api.url(&format!(
            "/gmail/v1/users/{}/profile",
            crate::outgoing::gmail::user_path(&api)
        )),
    };
    let reply = api
        .send(Request::new(Method::Get, &url))
        .and_then(|r| r.json::<Value>().map_err(ApiError::Http));
    match reply {
        Ok(me) => {
            let field = |name: &str| {
                me.get(name)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            };
            let mailbox = match provider {
                Provider::Microsoft => field("mail").or_else(|| field("userPrincipalName")),
                Provider::Google => field("emailAddress"),
            };
            ApiCheck::passed(api.base(), mailbox)
        }
        Err(e) => ApiCheck::failed(Some(api.base()), api.error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_failed_check_has_server_keys_only_for_server_failures() {
        let with_server = OutgoingCheck::Failed(OutgoingFailed {
            transport: Some("SMTP"),
            ok: false,
            error: "e".into(),
            failure: Some(ServerFailure {
                server: "h:25".into(),
                code: None,
                transient: true,
            }),
        });
        assert_eq!(
            serde_json::to_value(&with_server).unwrap(),
            json!({"transport": "SMTP", "ok": false, "error": "e", "server": "h:25",
                   "code": null, "transient": true})
        );
        let without = IncomingCheck::Failed {
            protocol: None,
            ok: false,
            error: "e".into(),
            server: None,
        };
        assert_eq!(
            serde_json::to_value(&without).unwrap(),
            json!({"protocol": null, "ok": false, "error": "e"})
        );
    }
}
