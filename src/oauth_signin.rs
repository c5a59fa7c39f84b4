//! The OAuth sign-in of OFFICE365 and GMAIL tenant accounts: "Click to Authenticate"
//! (`authorizationUrl`) and the return from the sign-in page (`completeAuthorization`). The
//! protocol work is in `crate::oauth`; this is the wiring to the tenant accounts, state store,
//! key file and Error Log of the call's context.

use serde::Serialize;
use serde_json::json;

use crate::config::AccountId;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::host::Host;
use crate::oauth;

/// What `completeAuthorization()` returns (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompletedAuthorization {
    pub recid: i64,
    /// `microsoft` or `google`.
    pub provider: &'static str,
    /// The signed-in mailbox (which OFFICE365 sends as).
    pub mailbox: String,
    /// True when the mailbox is not the account's EMAIL.
    pub differs_from_email: bool,
    /// The account's EMAIL; absent when the account is no longer listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// `authorizationUrl()`: the sign-in URL of tenant account `recid` (PKCE, with a random
/// state kept for ten minutes) for the browser of the administrator who clicked "Click to
/// Authenticate". `redirect_uri` is PCR-360's `https://<host>/core/oauth2/validated`.
pub fn authorization_url(
    ctx: &mut Context<'_>,
    host: &mut dyn Host,
    recid: i64,
    redirect_uri: &str,
) -> Result<String> {
    let account = ctx.find_account(host, &recid.to_string())?;
    let store = ctx.oauth_env().open_store()?;
    let keys = ctx.keys()?;
    oauth::authorization_url(&account, redirect_uri, &store, keys)
}

/// `completeAuthorization()`: finishes the sign-in the redirect's `state` and `code`
/// belong to; returns `recid`, `provider`, `mailbox` (the signed-in mailbox, which
/// OFFICE365 sends as), `email` (the account's EMAIL) and `differs_from_email`. A failure
/// (unknown, reused or expired state, refused code) is logged and thrown as an `Auth`
/// error.
pub fn complete_authorization(
    ctx: &mut Context<'_>,
    host: &mut dyn Host,
    state: &str,
    code: &str,
) -> Result<CompletedAuthorization> {
    let tenants = ctx.tenant_accounts(host);
    let outcome = (|| {
        let store = ctx.oauth_env().open_store()?;
        let keys = ctx.keys()?;
        oauth::complete_authorization(state, code, &tenants.accounts, &store, keys)
    })();
    match outcome {
        Ok(done) => Ok(CompletedAuthorization {
            recid: done.recid,
            provider: done.provider.as_str(),
            mailbox: done.mailbox,
            differs_from_email: done.differs_from_email,
            email: tenants
                .accounts
                .iter()
                .find(|a| a.id == AccountId::Tenant(done.recid))
                .map(|a| a.email.clone()),
        }),
        Err(e) => {
            let account = match &e {
                Error::Auth { account, .. } => json!(account),
                _ => json!(null),
            };
            ctx.logger.error(
                host,
                &format!("pcr_email: OAuth2 sign-in failed: {e}"),
                &json!({ "account": account }),
            );
            Err(e)
        }
    }
}
