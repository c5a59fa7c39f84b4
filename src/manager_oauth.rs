//! The OAuth side of `PCR_Utility_EmailManager` (OFFICE365 and GMAIL tenant accounts):
//! "Click to Authenticate" (`authorizationUrl`), the return from the sign-in page
//! (`completeAuthorization`) and what `checkAccount()` shows about a cloud account. The
//! protocol work is in `crate::oauth`; this is the wiring to the manager's accounts, state
//! store, key file and Error Log.

use serde_json::{json, Value};

use crate::config::Account;
use crate::error::Result;
use crate::host::Host;
use crate::http::{Method, Request, Role};
use crate::manager::Manager;
use crate::oauth::{self, ApiClient, ApiError, Provider};

impl Manager {
    /// `authorizationUrl()`: the sign-in URL of tenant account `recid` (PKCE, with a random
    /// state kept for ten minutes) for the browser of the administrator who clicked "Click to
    /// Authenticate". `redirect_uri` is PCR-360's `https://<host>/core/oauth2/validated`.
    pub fn authorization_url(
        &mut self,
        host: &mut dyn Host,
        recid: i64,
        redirect_uri: &str,
    ) -> Result<String> {
        let account = self.find_account(host, &recid.to_string())?;
        let store = self.oauth_env().open_store()?;
        let keys = self.keys()?;
        oauth::authorization_url(&account, redirect_uri, &store, keys)
    }

    /// `completeAuthorization()`: finishes the sign-in the redirect's `state` and `code`
    /// belong to; returns `recid`, `provider`, `mailbox` (the signed-in mailbox, which
    /// OFFICE365 sends as), `email` (the account's EMAIL) and `differs_from_email`. A failure
    /// (unknown, reused or expired state, refused code) is logged and thrown as an `Auth`
    /// error.
    pub fn complete_authorization(
        &mut self,
        host: &mut dyn Host,
        state: &str,
        code: &str,
    ) -> Result<Value> {
        let accounts = self.tenant_accounts(host);
        let outcome = (|| {
            let store = self.oauth_env().open_store()?;
            let keys = self.keys()?;
            oauth::complete_authorization(state, code, &accounts, &store, keys)
        })();
        match outcome {
            Ok(done) => {
                let mut result = done.to_json();
                if let Some(account) = accounts
                    .iter()
                    .find(|a| a.id == crate::config::AccountId::Tenant(done.recid))
                {
                    result["email"] = Value::from(account.email.clone());
                }
                Ok(result)
            }
            Err(e) => {
                let account = match &e {
                    crate::Error::Auth { account, .. } => Value::from(account.clone()),
                    _ => Value::Null,
                };
                self.logger().error(
                    host,
                    &format!("pcr_email: OAuth2 sign-in failed: {e}"),
                    &json!({ "account": account }),
                );
                Err(e)
            }
        }
    }

    /// The `oauth` part of `checkAccount()` for an OFFICE365 / GMAIL account: whether it is
    /// signed in, the signed-in mailbox, until when the access token is valid and the last
    /// token error (from the state store), after a live check that obtains a token and asks
    /// the API who it is (no mail is sent, read or changed). `ok` is false when the account
    /// is not signed in or the live check failed.
    pub fn check_cloud_account(&mut self, account: &Account) -> Value {
        let env = self.oauth_env();
        let id = account.id.to_string();
        let provider = match Provider::of(account) {
            Ok(p) => p,
            Err(e) => return json!({ "ok": false, "error": e.to_string() }),
        };
        let store = match env.open_store() {
            Ok(s) => s,
            Err(e) => {
                return json!({ "provider": provider.as_str(), "ok": false, "error": e.to_string() })
            }
        };
        let before = match oauth::status(account, &store) {
            Ok(s) => s,
            Err(e) => {
                return json!({ "provider": provider.as_str(), "ok": false, "error": e.to_string() })
            }
        };
        let api = if before.authorized {
            live_check(account, &env, provider)
        } else {
            json!({
                "ok": false,
                "error": format!(
                    "account {id} is not signed in to {}: open the tenant email's OAuth2 tab and \
                     click \"Click to Authenticate\"",
                    provider.service()
                ),
            })
        };
        // Read again: the live check may have renewed the token or recorded an error.
        let mut report = oauth::status(account, &store).unwrap_or(before).to_json();
        let ok = api["ok"].as_bool().unwrap_or(false);
        if !ok {
            report["error"] = api["error"].clone();
        }
        report["api"] = api;
        report["ok"] = Value::from(ok);
        report
    }
}

/// Obtains an access token and asks the API whose it is: Graph `GET /me`, Gmail `GET
/// users/{user}/profile`; with Microsoft app-only access, whether the app may open the mailbox
/// EMAIL (a folder of it). `{ok, server, mailbox}` or `{ok: false, server, error}`.
fn live_check(account: &Account, env: &oauth::OAuthEnv, provider: Provider) -> Value {
    let api = match ApiClient::new(account, env, Role::Authorize) {
        Ok(api) => api,
        Err(e) => return json!({ "ok": false, "error": e.to_string() }),
    };
    if let Some(mailbox) = api.app_mailbox() {
        // App-only: no signed-in user to ask about; check the grant on the mailbox EMAIL.
        let folder = if account.incoming.is_some() {
            "inbox"
        } else {
            "sentitems"
        };
        return match oauth::check_app_mailbox(&api, folder) {
            Ok(_) => json!({ "ok": true, "server": api.base(), "mailbox": mailbox }),
            Err(e) => {
                json!({ "ok": false, "server": api.base(), "error": api.error(e).to_string() })
            }
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
            json!({ "ok": true, "server": api.base(), "mailbox": mailbox })
        }
        Err(e) => json!({ "ok": false, "server": api.base(), "error": api.error(e).to_string() }),
    }
}
