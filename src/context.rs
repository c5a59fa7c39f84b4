//! What every API call works with, passed explicitly to the services (`outbound`,
//! `account_check`, `oauth_signin`) instead of reached through the manager: the INI settings,
//! the logger, the key file (opened on first use) and the tenant accounts the host lists,
//! returned as a value with their failed accounts and row errors.

use serde_json::{json, Value};

use crate::config::secrets::{self, KeyStore};
use crate::config::{tenant_rows, Account, AccountId, FailedAccount, Settings};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::log::Logger;
use crate::state::StateStore;

/// The label of the key derived for the keyed hash in our Message-IDs.
const THREAD_KEY_LABEL: &str = "pcr_email message-id v1";

/// The settings, logger and key store of one manager object, borrowed for one call.
pub struct Context<'a> {
    pub settings: &'a Settings,
    pub logger: &'a mut Logger,
    /// The key store (`KEY_FILE`), `None` until first used: plain configurations never
    /// create the key file.
    pub keys: &'a mut Option<KeyStore>,
}

/// The tenant accounts the host lists, sorted out (SPEC §3).
#[derive(Debug, Default)]
pub struct TenantAccounts {
    /// The usable accounts.
    pub accounts: Vec<Account>,
    /// Rows that belong to a tenant and kind but cannot be used. Routing fails their mail
    /// rather than sending it through another account, and `eventCheckMail` must not read
    /// their mailbox through another account (see `routing::incoming_readers`). Their errors
    /// are in `row_errors` too.
    pub failed: Vec<FailedAccount>,
    /// One secret-free text per row that could not be used.
    pub row_errors: Vec<String>,
}

impl Context<'_> {
    /// Where OAuth accounts keep their tokens.
    pub fn oauth_env(&self) -> crate::oauth::OAuthEnv {
        crate::oauth::OAuthEnv::from_settings(self.settings)
    }

    /// The key store (`KEY_FILE`), created on first use.
    pub fn keys(&mut self) -> Result<&KeyStore> {
        if self.keys.is_none() {
            *self.keys = Some(KeyStore::open(&self.settings.key_file)?);
        }
        Ok(self.keys.as_ref().expect("just opened"))
    }

    /// The key of the keyed hash in our Message-IDs (threading).
    pub fn thread_key(&mut self) -> Result<[u8; 32]> {
        Ok(self.keys()?.derive_key(THREAD_KEY_LABEL))
    }

    /// The tenant accounts the host lists, normalised. A bad row is logged (once) and left
    /// out; it never hides the good ones. A bad row that still belongs to a tenant and kind is
    /// returned in `failed` (see there).
    pub fn tenant_accounts(&mut self, host: &mut dyn Host) -> TenantAccounts {
        let mut sorted = TenantAccounts::default();
        let rows = match host.email_accounts() {
            Ok(rows) => rows,
            Err(e) => {
                sorted
                    .row_errors
                    .push(format!("cannot read the tenant email accounts: {e}"));
                self.logger.error(
                    host,
                    &format!("pcr_email: cannot read the tenant email accounts: {e}"),
                    &Value::Null,
                );
                return sorted;
            }
        };
        if rows.as_array().is_none_or(|r| r.is_empty()) {
            return sorted;
        }
        // Encrypted values need the key file; plain ones must not create it. Without a key
        // file, each account with an encrypted value fails on its own (the others still work).
        let needs_key = rows.to_string().contains("ENC:");
        let key_error = if needs_key { self.keys().err() } else { None };
        if let Some(e) = &key_error {
            self.logger.error(host, &e.to_string(), &Value::Null);
        }
        let ephemeral = KeyStore::from_key(rand::random());
        let keys = match (&key_error, &*self.keys) {
            (Some(e), _) => Err(e),
            (None, Some(store)) if needs_key => Ok(store),
            _ => Ok(&ephemeral),
        };
        let rows = tenant_rows(&rows, self.settings, keys);
        sorted.row_errors = rows.errors.iter().map(|e| e.to_string()).collect();
        sorted.failed = rows.failed;
        sorted.accounts = rows.accounts;
        // Once per process (a PHP worker builds a manager per request), per INI file.
        let file = self.settings.config_file.display().to_string();
        for e in rows.errors {
            let text = e.to_string();
            let key = format!("row-error:{file}:{text}");
            self.logger
                .once_per_process(host, &key, &text, &Value::Null);
        }
        sorted
    }

    /// Finds `master` or a tenant RECID.
    pub fn find_account(&mut self, host: &mut dyn Host, recid: &str) -> Result<Account> {
        let recid = recid.trim();
        if recid.eq_ignore_ascii_case("master") {
            if let Some(failed) = &self.settings.master_failed {
                return Err(failed.error.clone());
            }
            return self.settings.master.clone().ok_or_else(|| {
                Error::message(format!(
                    "the INI file {} has no email.* account in [{}]",
                    self.settings.config_file.display(),
                    self.settings.environment
                ))
            });
        }
        let id: i64 = recid.parse().map_err(|_| {
            Error::message(format!(
                "'{recid}' is not an account: use 'master' or a tenant email account's RECID"
            ))
        })?;
        let tenants = self.tenant_accounts(host);
        if let Some(failed) = tenants
            .failed
            .iter()
            .find(|f| f.id == AccountId::Tenant(id))
        {
            return Err(failed.error.clone());
        }
        tenants
            .accounts
            .into_iter()
            .find(|a| a.id == AccountId::Tenant(id))
            .ok_or_else(|| {
                Error::message(format!(
                    "no tenant email account with RECID {id} (or its row is invalid: see the Error Log)"
                ))
            })
    }

    /// What the INI file itself gives to log: its warnings (e.g. a quoted `"false"` that
    /// reads as true) and a broken master account's error, each once per process. Called at
    /// the start of every API call, so they reach the host's Error Log.
    pub fn log_config_notices(&mut self, host: &mut dyn Host) {
        let file = self.settings.config_file.display().to_string();
        for warning in &self.settings.warnings {
            let key = format!("ini-warning:{file}:{warning}");
            self.logger.once_per_process(
                host,
                &key,
                &format!("pcr_email: {warning}"),
                &Value::Null,
            );
        }
        if let Some(failed) = &self.settings.master_failed {
            let error = failed.error.to_string();
            let key = format!("master-failed:{file}:{}:{error}", self.settings.environment);
            let text = format!(
                "pcr_email: {error}; the INI master email account cannot be used until this is \
                 fixed: its mail is not sent and its mailbox is not read (the tenant email \
                 accounts work as usual)"
            );
            self.logger
                .once_per_process(host, &key, &text, &json!({"account": "master"}));
        }
    }

    /// Logs the notices gathered while the last call ran: each "stored in clear" notice once
    /// per account, key and day across all processes (remembered in the state store, so cron
    /// does not repeat it every 15 minutes), or once per process when the state store cannot
    /// be opened. When `asked` (after `checkAccount()`) they are logged whatever was logged
    /// today: the administrator asked (the pre-flight script prints them).
    pub fn log_notices(&mut self, host: &mut dyn Host, asked: bool) {
        // Each warning is taken once per process already (see `secrets::note_cleartext`).
        let warnings = secrets::take_cleartext_warnings();
        if warnings.is_empty() {
            return;
        }
        let store = match asked {
            true => None,
            false => {
                StateStore::open(&self.settings.state_dir, self.settings.state_dsn.as_ref()).ok()
            }
        };
        for warning in warnings {
            let logged_today = store
                .as_ref()
                .and_then(|s| s.once_per_day(&format!("cleartext:{warning}")).ok())
                == Some(false);
            if !logged_today {
                self.logger.error(host, &warning, &Value::Null);
            }
        }
    }
}
