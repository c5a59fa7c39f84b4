//! `PCR_Utility_EmailManager` behind the PHP class: one short function per PHP method, each
//! handing the call's [`Context`] (settings, logger, key store) to the service that does the
//! work: `crate::outbound` (sending, routing), `crate::account_check` (`checkAccount`),
//! `crate::oauth_signin` (the OAuth sign-in) and `crate::checkmail` (`eventCheckMail`).

use std::path::Path;

use serde_json::Value;

use crate::account_check::{self, AccountReport};
use crate::checkmail::{self, Summary};
use crate::config::secrets::{self, KeyStore};
use crate::config::{PublicAccount, Settings};
use crate::context::{Context, TenantAccounts};
use crate::error::Result;
use crate::host::Host;
use crate::log::Logger;
use crate::oauth_signin::{self, CompletedAuthorization};
use crate::outbound::{self, BatchEntry, Outbound, SendResult};

pub struct Manager {
    pub settings: Settings,
    logger: Logger,
    /// The key store (`KEY_FILE`), opened on first use.
    keys: Option<KeyStore>,
    /// The transports kept alive between `send()` calls for the life of the PHP object.
    outbound: Outbound,
    /// Set by `checkAccount()`: the administrator asked, so the notices of that call are
    /// logged even if today's were logged already (see [`Manager::log_notices`]).
    notices_asked: bool,
}

impl Manager {
    pub fn open(config_file: &Path, environment: &str) -> Result<Manager> {
        let settings = Settings::load(config_file, environment)?;
        Ok(Manager::with_settings(settings))
    }

    pub fn with_settings(settings: Settings) -> Manager {
        Manager {
            logger: Logger::new(settings.log_file.clone()),
            settings,
            keys: None,
            outbound: Outbound::new(),
            notices_asked: false,
        }
    }

    /// The context of one call.
    fn context(&mut self) -> Context<'_> {
        Context {
            settings: &self.settings,
            logger: &mut self.logger,
            keys: &mut self.keys,
        }
    }

    /// The context of one call, and the sending service beside it.
    fn sending(&mut self) -> (Context<'_>, &mut Outbound) {
        let ctx = Context {
            settings: &self.settings,
            logger: &mut self.logger,
            keys: &mut self.keys,
        };
        (ctx, &mut self.outbound)
    }

    /// What the INI file itself gives to log (its warnings, a broken master account), each
    /// once per process; the PHP boundary calls it at the start of every method.
    pub fn log_config_notices(&mut self, host: &mut dyn Host) {
        self.context().log_config_notices(host);
    }

    /// The notices gathered while the last call ran (see `Context::log_notices`); the PHP
    /// boundary calls it after every method.
    pub fn log_notices(&mut self, host: &mut dyn Host) {
        let asked = std::mem::take(&mut self.notices_asked);
        self.context().log_notices(host, asked);
    }

    /// `send()`: validates, routes (SPEC §4) and delivers one message.
    pub fn send(&mut self, host: &mut dyn Host, message: &Value) -> Result<SendResult> {
        let (mut ctx, outbound) = self.sending();
        outbound.send(&mut ctx, host, message)
    }

    /// `sendBatch()`: one result per message, in order; a bad message is a `failed` entry.
    pub fn send_batch(&mut self, host: &mut dyn Host, messages: &[Value]) -> Vec<BatchEntry> {
        let (mut ctx, outbound) = self.sending();
        outbound.send_batch(&mut ctx, host, messages)
    }

    /// `resolveAccount()`: the account routing picks, secret-free; null when none would send.
    pub fn resolve_account(
        &mut self,
        host: &mut dyn Host,
        kind: &str,
        tenant: i64,
    ) -> Result<Option<PublicAccount>> {
        outbound::resolve_account(&mut self.context(), host, kind, tenant)
    }

    /// `checkAccount()`: checks the account's servers without sending; reports, never throws
    /// for a failed check.
    pub fn check_account(&mut self, host: &mut dyn Host, recid: &str) -> Result<AccountReport> {
        self.notices_asked = true;
        account_check::check_account(&mut self.context(), host, recid)
    }

    /// `authorizationUrl()`: the sign-in URL of an OFFICE365 / GMAIL tenant account.
    pub fn authorization_url(
        &mut self,
        host: &mut dyn Host,
        recid: i64,
        redirect_uri: &str,
    ) -> Result<String> {
        oauth_signin::authorization_url(&mut self.context(), host, recid, redirect_uri)
    }

    /// `completeAuthorization()`: finishes the sign-in the redirect's `state` and `code`
    /// belong to.
    pub fn complete_authorization(
        &mut self,
        host: &mut dyn Host,
        state: &str,
        code: &str,
    ) -> Result<CompletedAuthorization> {
        oauth_signin::complete_authorization(&mut self.context(), host, state, code)
    }

    /// `eventCheckMail()`: reads the Service Desk mailboxes into Inquiries and threads.
    pub fn event_check_mail(&mut self, host: &mut dyn Host, data: &Value) -> Result<Summary> {
        let (ctx, outbound) = self.sending();
        let settings = ctx.settings;
        let oauth = ctx.oauth_env();
        let mut services = CheckMailServices { ctx, outbound };
        let context = checkmail::EventContext {
            settings,
            oauth,
            services: &mut services,
        };
        checkmail::event_check_mail(context, host, data)
    }

    /// `encryptPassword()`: `ENC:v1:` with the key file of that INI file and environment.
    pub fn encrypt_password(plain: &str, config_file: &Path, environment: &str) -> Result<String> {
        secrets::encrypt_for_config(plain, config_file, environment)
    }
}

/// What `eventCheckMail` borrows from the manager (see `checkmail::Services`): the call's
/// context and the sending service, for the run's tenant accounts, thread key, logger and
/// SYSADMIN alerts.
struct CheckMailServices<'a> {
    ctx: Context<'a>,
    outbound: &'a mut Outbound,
}

impl checkmail::Services for CheckMailServices<'_> {
    fn tenant_accounts(&mut self, host: &mut dyn Host) -> TenantAccounts {
        self.ctx.tenant_accounts(host)
    }

    fn thread_key(&mut self) -> Result<[u8; 32]> {
        self.ctx.thread_key()
    }

    fn logger(&mut self) -> &mut Logger {
        self.ctx.logger
    }

    fn send(&mut self, host: &mut dyn Host, message: &Value) -> Result<()> {
        self.outbound.send(&mut self.ctx, host, message).map(drop)
    }
}
