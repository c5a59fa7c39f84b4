//! `PCR_Utility_EmailManager`: argument conversion and nothing else; the work is in
//! `crate::manager`.

// Parameter names are PHP's (`$configFile`): the macro takes them from the Rust names.
#![allow(non_snake_case)]

use std::cell::RefCell;
use std::path::PathBuf;

use ext_php_rs::exception::PhpResult;
use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendHashTable, Zval};
use serde_json::Value;

use super::convert::{zval_to_json, PhpJson};
use super::exceptions::to_php;
use super::host::{PhpErrorLog, PhpHost, Stop};
use super::params::{
    AnyParam, ArrayParam, HostParam, IntDefaultParam, IntOrStrParam, IntParam, NullableHostParam,
    NullableStrParam, StrDefaultParam, StrParam,
};
use super::settings;
use crate::error::Error;
use crate::host::Host;
use crate::manager::Manager;

thread_local! {
    /// `setDefaultHost()`: PHP is single-threaded here (NTS); cleared at request shutdown so no
    /// object outlives its request.
    static DEFAULT_HOST: RefCell<Option<Zval>> = const { RefCell::new(None) };
}

pub fn clear_default_host() {
    DEFAULT_HOST.with(|h| h.borrow_mut().take());
}

fn json(table: &ZendHashTable, what: &str) -> PhpResult<Value> {
    let mut z = Zval::new();
    z.set_hashtable(table.to_owned());
    zval_to_json(&z).map_err(|e| to_php(Error::message(format!("{what}: {e}"))))
}

/// The INI file and environment a method was given, each defaulting (when missing or empty)
/// to `pcr_email.config` and to `pcr_email.environment` / `APPLICATION_ENV` / `prod`.
fn config_and_environment(
    config_file: Option<String>,
    environment: Option<String>,
) -> (PathBuf, String) {
    let file = config_file
        .filter(|f| !f.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(settings::config_file);
    let env = environment
        .filter(|e| !e.is_empty())
        .unwrap_or_else(settings::environment);
    (file, env)
}

#[php_class]
#[php(name = "PCR_Utility_EmailManager")]
pub struct EmailManager {
    core: Manager,
    host: Option<Zval>,
    /// Set while a call runs: a host callback that calls back into the same object (e.g.
    /// `send()` from `createInquiry()`) is refused instead of touching state in use.
    busy: std::cell::Cell<bool>,
}

impl EmailManager {
    /// The host for this call: the constructor's, else `setDefaultHost()`'s, else none.
    fn with_host<T>(
        &mut self,
        f: impl FnOnce(&mut Manager, &mut dyn Host) -> crate::Result<T>,
    ) -> crate::Result<T> {
        if self.busy.replace(true) {
            return Err(Error::message(
                "this PCR_Utility_EmailManager is busy with another call (a host callback called \
                 it again): use a second PCR_Utility_EmailManager for that",
            ));
        }
        let (result, stopped) = self.with_host_inner(f);
        self.busy.set(false);
        if stopped == Some(Stop::Bailout) {
            // A fatal error happened in a host callback. The mailbox threads have wound down
            // and every message is either recorded or left in its mailbox: let PHP finish
            // the fatal error it started.
            drop(result);
            // SAFETY: no Rust frame below ours holds anything that needs dropping for
            // correctness (the run is over); PHP's bailout unwinds to its own handler.
            unsafe { ext_php_rs::zend::bailout() };
        }
        result
    }

    fn with_host_inner<T>(
        &mut self,
        f: impl FnOnce(&mut Manager, &mut dyn Host) -> crate::Result<T>,
    ) -> (crate::Result<T>, Option<Stop>) {
        let object = self
            .host
            .as_ref()
            .map(Zval::shallow_clone)
            .or_else(|| DEFAULT_HOST.with(|h| h.borrow().as_ref().map(Zval::shallow_clone)));
        match object {
            Some(object) => {
                let mut host = PhpHost::new(object);
                self.core.log_config_notices(&mut host);
                let result = f(&mut self.core, &mut host);
                if host.stopped().is_none() {
                    self.core.log_notices(&mut host);
                }
                (result, host.stopped())
            }
            None => {
                self.core.log_config_notices(&mut PhpErrorLog);
                let result = f(&mut self.core, &mut PhpErrorLog);
                self.core.log_notices(&mut PhpErrorLog);
                (result, None)
            }
        }
    }

    fn has_host(&self) -> bool {
        self.host.is_some() || DEFAULT_HOST.with(|h| h.borrow().is_some())
    }

    /// Tenant accounts come from the host: without one, `method` cannot find any.
    fn require_host(&self, method: &str) -> PhpResult<()> {
        if self.has_host() {
            return Ok(());
        }
        Err(to_php(Error::message(format!(
            "{method} needs a PCR_Utility_EmailHost (the tenant email accounts come from it): \
             pass one to the constructor or call PCR_Utility_EmailManager::setDefaultHost()"
        ))))
    }
}

#[php_impl]
impl EmailManager {
    /// Reads the INI file (`pcr_email.config` by default) for the environment
    /// (`pcr_email.environment`, else `APPLICATION_ENV`, else `prod`).
    pub fn __construct(
        configFile: NullableStrParam,
        environment: NullableStrParam,
        host: NullableHostParam,
    ) -> PhpResult<Self> {
        let config_file = configFile.string(1)?;
        let environment = environment.string(2)?;
        let host = host.host(3)?;
        let (file, env) = config_and_environment(config_file, environment);
        let core = Manager::open(&file, &env).map_err(to_php)?;
        Ok(EmailManager {
            core,
            host,
            busy: std::cell::Cell::new(false),
        })
    }

    /// The host used by managers constructed without one (e.g. by the event system).
    pub fn set_default_host(host: HostParam) -> PhpResult<()> {
        let host = host.host(1)?;
        DEFAULT_HOST.with(|h| *h.borrow_mut() = Some(host));
        Ok(())
    }

    /// The System Check Email event: reads every Service Desk mailbox and returns the summary.
    pub fn event_check_mail(&mut self, data: AnyParam) -> PhpResult<PhpJson> {
        let data = match data.value(1)? {
            Some(z) => zval_to_json(&z)
                .map_err(|e| to_php(Error::message(format!("eventCheckMail(): {e}"))))?,
            None => Value::Null,
        };
        if !self.has_host() {
            return Err(to_php(Error::message(
                "eventCheckMail needs a PCR_Utility_EmailHost: pass one to the constructor or call PCR_Utility_EmailManager::setDefaultHost()",
            )));
        }
        self.with_host(|core, host| core.event_check_mail(host, &data))
            .and_then(|summary| PhpJson::of(&summary))
            .map_err(to_php)
    }

    /// Sends one message; see the README for the keys.
    pub fn send(&mut self, message: ArrayParam) -> PhpResult<PhpJson> {
        let mut message = message;
        let message = json(message.array(1)?, "send()")?;
        self.with_host(|core, host| core.send(host, &message))
            .and_then(|result| PhpJson::of(&result))
            .map_err(to_php)
    }

    /// Sends many messages over shared connections; one result per message, never throws for
    /// one bad message.
    pub fn send_batch(&mut self, messages: ArrayParam) -> PhpResult<PhpJson> {
        let mut messages = messages;
        let messages = json(messages.array(1)?, "sendBatch()")?;
        let list: Vec<Value> = match messages {
            Value::Array(items) => items,
            Value::Object(map) => map.into_iter().map(|(_, v)| v).collect(),
            _ => Vec::new(),
        };
        self.with_host(|core, host| Ok(core.send_batch(host, &list)))
            .and_then(|results| PhpJson::of(&results))
            .map_err(to_php)
    }

    /// The account routing picks for this kind of mail and tenant, without secrets.
    /// `$kind` defaults to `'general'` and `$tenant` to 0 (their arginfo says so: see
    /// `super::arginfo`).
    pub fn resolve_account(
        &mut self,
        kind: StrDefaultParam,
        tenant: IntDefaultParam,
    ) -> PhpResult<Option<PhpJson>> {
        let kind = kind.string_or(1, "general")?;
        let tenant = tenant.int_or(2, 0)?;
        self.with_host(|core, host| core.resolve_account(host, &kind, tenant))
            .and_then(|account| account.as_ref().map(PhpJson::of).transpose())
            .map_err(to_php)
    }

    /// Connects and authenticates to the account's servers without sending or changing mail.
    pub fn check_account(&mut self, recid: IntOrStrParam) -> PhpResult<PhpJson> {
        let recid = recid.text(1)?;
        self.with_host(|core, host| core.check_account(host, recid.trim()))
            .and_then(|report| PhpJson::of(&report))
            .map_err(to_php)
    }

    /// "Click to Authenticate" on an OFFICE365 / GMAIL tenant account: the provider's sign-in
    /// URL to send the administrator's browser to; `$redirectUri` is
    /// `https://<host>/core/oauth2/validated`.
    pub fn authorization_url(
        &mut self,
        recid: IntParam,
        redirectUri: StrParam,
    ) -> PhpResult<String> {
        let recid = recid.int(1)?;
        let redirectUri = redirectUri.string(2)?;
        self.require_host("authorizationUrl")?;
        self.with_host(|core, host| core.authorization_url(host, recid, &redirectUri))
            .map_err(to_php)
    }

    /// The sign-in page's redirect back (`state` and `code` of its query): stores the
    /// account's tokens and returns the signed-in mailbox.
    pub fn complete_authorization(
        &mut self,
        state: StrParam,
        code: StrParam,
    ) -> PhpResult<PhpJson> {
        let state = state.string(1)?;
        let code = code.string(2)?;
        self.require_host("completeAuthorization")?;
        self.with_host(|core, host| core.complete_authorization(host, &state, &code))
            .and_then(|done| PhpJson::of(&done))
            .map_err(to_php)
    }

    /// Encrypts a password for the INI file or a tenant row (`ENC:v1:...`).
    pub fn encrypt_password(
        plain: StrParam,
        configFile: NullableStrParam,
        environment: NullableStrParam,
    ) -> PhpResult<String> {
        let plain = plain.string(1)?;
        let config_file = configFile.string(2)?;
        let environment = environment.string(3)?;
        let (file, env) = config_and_environment(config_file, environment);
        Manager::encrypt_password(&plain, &file, &env).map_err(to_php)
    }
}
