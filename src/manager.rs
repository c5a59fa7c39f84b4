//! The orchestration behind `PCR_Utility_EmailManager`: routing a message to its account,
//! keeping one transport per account alive between calls, logging failures once, and the
//! account checks. Incoming mail is in `crate::inbound`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::config::secrets::{self, KeyStore};
use crate::config::{tenant_rows, Account, AccountId, FailedAccount, Settings};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::log::Logger;
use crate::outgoing::{self, build, BuiltMessage, MessageRequest, Transport};
use crate::routing::{self, MailKind, Route, TenantAccount};
use crate::state::StateStore;

/// The label of the key derived for the keyed hash in our Message-IDs.
const THREAD_KEY_LABEL: &str = "pcr_email message-id v1";

pub struct Manager {
    pub settings: Settings,
    logger: Logger,
    keys: Option<KeyStore>,
    /// One transport per account (and configuration): SMTP connections are reused across
    /// `send()` calls for the life of the PHP object.
    /// Each kept with the account it was built for: a changed row (new password, new server,
    /// another AUTH_TYPE or EMAIL) gets a new transport. Compared by value, not by any text.
    transports: HashMap<String, (Box<Account>, Box<dyn Transport>)>,
    /// The tenant rows that could not be used at the last `tenant_accounts()` (secret-free).
    pub row_errors: Vec<String>,
    /// The broken tenant accounts of the last `tenant_accounts()`: rows that belong to a
    /// tenant and kind but cannot be used. Routing fails their mail rather than sending it
    /// through another account, and `eventCheckMail` must not read their mailbox through
    /// another account (see `routing::incoming_readers`). Their errors are in `row_errors` too.
    pub failed_accounts: Vec<FailedAccount>,
    /// Set by `checkAccount()`: the administrator asked, so the notices of that call are
    /// logged even if today's were logged already (see [`Manager::log_notices`]).
    notices_asked: bool,
}

/// A message routed and built, ready for the transport keyed `key`.
struct Job {
    key: String,
    account: Box<Account>,
    built: BuiltMessage,
    sd_number: Option<String>,
}

/// The outcome of routing one message.
enum Prepared {
    Deliver(Job),
    /// Finished without a transport (disabled, redirected, skipped).
    Done(Value),
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
            transports: HashMap::new(),
            row_errors: Vec::new(),
            failed_accounts: Vec::new(),
            notices_asked: false,
        }
    }

    pub fn logger(&mut self) -> &mut Logger {
        &mut self.logger
    }

    /// Where OAuth accounts keep their tokens.
    pub fn oauth_env(&self) -> crate::oauth::OAuthEnv {
        crate::oauth::OAuthEnv::from_settings(&self.settings)
    }

    /// The key store (`KEY_FILE`), created on first use.
    pub fn keys(&mut self) -> Result<&KeyStore> {
        if self.keys.is_none() {
            self.keys = Some(KeyStore::open(&self.settings.key_file)?);
        }
        Ok(self.keys.as_ref().expect("just opened"))
    }

    /// The key of the keyed hash in our Message-IDs (threading).
    pub fn thread_key(&mut self) -> Result<[u8; 32]> {
        Ok(self.keys()?.derive_key(THREAD_KEY_LABEL))
    }

    /// The tenant accounts the host lists, normalised. A bad row is logged (once) and left
    /// out; it never hides the good ones. A bad row that still belongs to a tenant and kind is
    /// kept in `failed_accounts` (see there).
    pub fn tenant_accounts(&mut self, host: &mut dyn Host) -> Vec<Account> {
        self.row_errors.clear();
        self.failed_accounts.clear();
        let rows = match host.email_accounts() {
            Ok(rows) => rows,
            Err(e) => {
                self.row_errors
                    .push(format!("cannot read the tenant email accounts: {e}"));
                self.logger.error(
                    host,
                    &format!("pcr_email: cannot read the tenant email accounts: {e}"),
                    &Value::Null,
                );
                return Vec::new();
            }
        };
        if rows.as_array().is_none_or(|r| r.is_empty()) {
            return Vec::new();
        }
        // Encrypted values need the key file; plain ones must not create it. Without a key
        // file, each account with an encrypted value fails on its own (the others still work).
        let needs_key = rows.to_string().contains("ENC:");
        let key_error = if needs_key { self.keys().err() } else { None };
        if let Some(e) = &key_error {
            self.logger.error(host, &e.to_string(), &Value::Null);
        }
        let ephemeral = KeyStore::from_key(rand::random());
        let keys = match (&key_error, &self.keys) {
            (Some(e), _) => Err(e),
            (None, Some(store)) if needs_key => Ok(store),
            _ => Ok(&ephemeral),
        };
        let sorted = tenant_rows(&rows, &self.settings, keys);
        self.row_errors = sorted.errors.iter().map(|e| e.to_string()).collect();
        self.failed_accounts = sorted.failed;
        // Once per process (a PHP worker builds a manager per request), per INI file.
        let file = self.settings.config_file.display().to_string();
        for e in sorted.errors {
            let text = e.to_string();
            let key = format!("row-error:{file}:{text}");
            self.logger
                .once_per_process(host, &key, &text, &Value::Null);
        }
        sorted.accounts
    }

    /// What the INI file itself gives to log: its warnings (e.g. a quoted `"false"` that
    /// reads as true) and a broken master account's error, each once per process. Called at
    /// the start of every API call, so they reach the host's Error Log.
    pub fn log_config_notices(&mut self, host: &mut dyn Host) {
        let file = self.settings.config_file.display().to_string();
        for warning in self.settings.warnings.clone() {
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
    /// be opened. After `checkAccount()` they are logged whatever was logged today: the
    /// administrator asked (the pre-flight script prints them). The PHP boundary calls it
    /// after every method.
    pub fn log_notices(&mut self, host: &mut dyn Host) {
        let asked = std::mem::take(&mut self.notices_asked);
        // Each warning is taken once per process already (see `secrets::note_cleartext`).
        let warnings = secrets::take_cleartext_warnings();
        if warnings.is_empty() {
            return;
        }
        let store = match asked {
            true => None,
            false => StateStore::open(&self.settings.state_dir).ok(),
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

    /// `send()`: validates, routes (SPEC §4) and delivers one message.
    pub fn send(&mut self, host: &mut dyn Host, message: &Value) -> Result<Value> {
        match self.prepare(host, message)? {
            Prepared::Done(result) => Ok(result),
            Prepared::Deliver(Job {
                key,
                account,
                built,
                sd_number,
            }) => {
                let transport = self.transport(&key, &account)?;
                let outcome = transport.send(&built);
                match outcome {
                    Ok(delivery) => {
                        self.record_sent(host, &account, &built, sd_number.as_deref());
                        Ok(sent_result(&account, &built, &delivery))
                    }
                    Err(e) => {
                        self.log_send_failure(host, &account, &built, &e);
                        Err(e)
                    }
                }
            }
        }
    }

    /// `sendBatch()`: one result per message, in order; a bad message is a `failed` result,
    /// never an exception. Messages of one account share its connections and go out
    /// concurrently.
    pub fn send_batch(&mut self, host: &mut dyn Host, messages: &[Value]) -> Vec<Value> {
        let mut results: Vec<Option<Value>> = vec![None; messages.len()];
        let mut pending: Vec<(usize, Job)> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            match self.prepare(host, message) {
                Ok(Prepared::Done(result)) => results[i] = Some(result),
                Ok(Prepared::Deliver(job)) => match self.transport(&job.key, &job.account) {
                    Ok(_) => pending.push((i, job)),
                    Err(e) => results[i] = Some(failed_result(&e)),
                },
                Err(e) => results[i] = Some(failed_result(&e)),
            }
        }
        if !pending.is_empty() {
            let keys: Vec<&String> = {
                let mut keys: Vec<&String> = pending.iter().map(|(_, job)| &job.key).collect();
                keys.sort();
                keys.dedup();
                keys
            };
            let transports: Vec<&dyn Transport> = keys
                .iter()
                .map(|k| self.transports[*k].1.as_ref())
                .collect();
            let jobs: Vec<outgoing::BatchJob<'_>> = pending
                .iter()
                .map(|(_, job)| outgoing::BatchJob {
                    message: &job.built,
                    transport: keys
                        .iter()
                        .position(|k| **k == job.key)
                        .expect("transport key"),
                })
                .collect();
            let outcomes =
                outgoing::send_batch(&jobs, &transports, outgoing::DEFAULT_BATCH_PARALLELISM);
            let mut failures = Vec::new();
            let mut sent = Vec::new();
            for ((i, job), outcome) in pending.iter().zip(outcomes) {
                results[*i] = Some(match outcome {
                    Ok(delivery) => {
                        sent.push(*i);
                        sent_result(&job.account, &job.built, &delivery)
                    }
                    Err(e) => {
                        let result = failed_result(&e);
                        failures.push((*i, e));
                        result
                    }
                });
            }
            let job = |i: usize| {
                &pending
                    .iter()
                    .find(|(j, _)| *j == i)
                    .expect("pending job")
                    .1
            };
            for (i, e) in failures {
                let job = job(i);
                self.log_send_failure(host, &job.account, &job.built, &e);
            }
            for i in sent {
                let job = job(i);
                self.record_sent(host, &job.account, &job.built, job.sd_number.as_deref());
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| failed_result(&Error::message("not processed"))))
            .collect()
    }

    /// Validation, the SEND_EMAIL / DISABLE_EMAIL switches, routing and building.
    fn prepare(&mut self, host: &mut dyn Host, message: &Value) -> Result<Prepared> {
        // A malformed message is an error whatever the switches say: the caller has a bug.
        let request = MessageRequest::from_json(message)?;
        let kind = request.kind;
        if self.settings.disable_email {
            return Ok(Prepared::Done(status_result("disabled")));
        }
        if !self.settings.send_email {
            host.deliver_message(&in_app_message(&request))?;
            return Ok(Prepared::Done(status_result("redirected")));
        }
        let accounts = self.tenant_accounts(host);
        let account = match self.route(kind, &accounts, request.tenant) {
            Route::Send(account) => Box::new(account.clone()),
            Route::Failed(failed) => {
                // SPEC §3: the tenant's broken account fails on its own; its mail never goes
                // out through another account.
                let error = failed.error.clone();
                let text = format!(
                    "pcr_email: {} mail for tenant {} was not sent: {error}",
                    kind.as_str(),
                    request.tenant
                );
                let context = json!({
                    "kind": kind.as_str(),
                    "tenant": request.tenant,
                    "account": failed.id.to_string(),
                    "subject": request.subject,
                });
                self.logger.error(host, &text, &context);
                return Err(error);
            }
            Route::Disabled => return Ok(Prepared::Done(status_result("disabled"))),
            Route::Redirect => {
                host.deliver_message(&in_app_message(&request))?;
                return Ok(Prepared::Done(status_result("redirected")));
            }
            Route::Skipped(reason) => {
                let text = format!(
                    "pcr_email: {} mail for tenant {} was not sent: {reason}",
                    kind.as_str(),
                    request.tenant
                );
                let context = json!({
                    "kind": kind.as_str(),
                    "tenant": request.tenant,
                    "subject": request.subject,
                });
                self.logger.error(host, &text, &context);
                let mut result = status_result("skipped");
                result["reason"] = Value::from(reason);
                return Ok(Prepared::Done(result));
            }
        };
        let thread_key = if request.sd_number.is_some() || request.in_reply_to.is_some() {
            match self.thread_key() {
                Ok(key) => key,
                Err(e) => {
                    // The key file another user created and this one may not read: the
                    // Error Log says so, not only the caller's exception.
                    let text = format!(
                        "pcr_email: {} mail for tenant {} was not sent: {e}",
                        kind.as_str(),
                        request.tenant
                    );
                    let context = json!({
                        "kind": kind.as_str(),
                        "tenant": request.tenant,
                        "account": account.id.to_string(),
                        "subject": request.subject,
                    });
                    self.logger.error(host, &text, &context);
                    return Err(e);
                }
            }
        } else {
            // Without an SD item nothing refers back to this message: no key file needed.
            rand::random()
        };
        let built = build(&request, &account, &thread_key)?;
        let key = account.id.to_string();
        Ok(Prepared::Deliver(Job {
            key,
            account,
            built,
            sd_number: request.sd_number.clone(),
        }))
    }

    /// SPEC §4 for this INI environment and these tenant accounts.
    fn route<'a>(&'a self, kind: MailKind, accounts: &'a [Account], tenant: i64) -> Route<'a> {
        let (default, service_desk) =
            routing::select_tenant_accounts(accounts, &self.failed_accounts, tenant);
        // A broken master stays in routing as failed: mail that would reach it fails with its
        // error instead of being skipped or sent another way.
        let master = match (&self.settings.master, &self.settings.master_failed) {
            (Some(master), _) => Some(TenantAccount::Usable(master)),
            (None, Some(failed)) => Some(TenantAccount::Failed(failed)),
            (None, None) => None,
        };
        routing::route(
            kind,
            default,
            service_desk,
            master,
            self.settings.send_email,
            self.settings.disable_email,
        )
    }

    fn transport(&mut self, key: &str, account: &Account) -> Result<&dyn Transport> {
        let stale = self
            .transports
            .get(key)
            .is_none_or(|(built_for, _)| **built_for != *account);
        if stale {
            let transport = outgoing::transport_for(account, &self.oauth_env())?;
            self.transports
                .insert(key.to_string(), (Box::new(account.clone()), transport));
        }
        Ok(self.transports[key].1.as_ref())
    }

    /// Remembers the Message-ID sent for an SD item (SPEC §8). Threading itself relies on the
    /// keyed hash in the id, so a state store that cannot be written only costs a log line.
    fn record_sent(
        &mut self,
        host: &mut dyn Host,
        account: &Account,
        built: &BuiltMessage,
        sd_number: Option<&str>,
    ) {
        let Some(sd) = sd_number else {
            return;
        };
        let recorded = StateStore::open(&self.settings.state_dir)
            .and_then(|s| s.record_sent(&built.message_id, sd, &account.id.to_string()));
        if let Err(e) = recorded {
            let text = format!("pcr_email: the sent Message-ID could not be recorded: {e}");
            self.logger.once(host, "record_sent", &text, &Value::Null);
        }
    }

    fn log_send_failure(
        &mut self,
        host: &mut dyn Host,
        account: &Account,
        built: &BuiltMessage,
        error: &Error,
    ) {
        let mut context = json!({
            "account": account.id.to_string(),
            "message_id": built.message_id,
            "recipients": built.recipients.len(),
        });
        if let Error::Transport(t) = error {
            context["server"] = Value::from(t.server.clone());
            context["code"] = json!(t.code);
            context["transient"] = Value::from(t.transient);
        }
        self.logger
            .error(host, &format!("pcr_email: {error}"), &context);
    }

    /// `resolveAccount()`: the account routing picks, secret-free; null when none would send.
    pub fn resolve_account(
        &mut self,
        host: &mut dyn Host,
        kind: &str,
        tenant: i64,
    ) -> Result<Option<Value>> {
        let kind = MailKind::parse(kind)?;
        let accounts = self.tenant_accounts(host);
        Ok(match self.route(kind, &accounts, tenant) {
            Route::Send(account) => Some(account.public_view()),
            // The account that would send is broken: its error, as send() would throw it.
            Route::Failed(failed) => return Err(failed.error.clone()),
            _ => None,
        })
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
        let accounts = self.tenant_accounts(host);
        if let Some(failed) = self
            .failed_accounts
            .iter()
            .find(|f| f.id == AccountId::Tenant(id))
        {
            return Err(failed.error.clone());
        }
        accounts
            .into_iter()
            .find(|a| a.id == AccountId::Tenant(id))
            .ok_or_else(|| {
                Error::message(format!(
                    "no tenant email account with RECID {id} (or its row is invalid: see the Error Log)"
                ))
            })
    }

    /// `checkAccount()`: connects and authenticates to the account's outgoing server (or
    /// checks the FILE directory / sendmail binary) without sending; reports, never throws
    /// for a failed check.
    pub fn check_account(&mut self, host: &mut dyn Host, recid: &str) -> Result<Value> {
        self.notices_asked = true;
        let account = self.find_account(host, recid)?;
        let outgoing = match &account.outgoing {
            None => Value::Null,
            Some(_) => {
                match outgoing::transport_for(&account, &self.oauth_env()).and_then(|t| t.check()) {
                    Ok(report) => report.to_json(),
                    Err(e) => check_error(&account, &e),
                }
            }
        };
        let incoming = match &account.incoming {
            None => Value::Null,
            Some(_) => self.check_incoming(&account),
        };
        let mut ok = outgoing.get("ok").and_then(Value::as_bool).unwrap_or(true)
            && incoming.get("ok").and_then(Value::as_bool).unwrap_or(true);
        let mut view = account.public_view();
        view["outgoing"] = outgoing;
        view["incoming"] = incoming;
        if account.is_cloud() {
            let oauth = self.check_cloud_account(&account);
            ok &= oauth["ok"].as_bool().unwrap_or(false);
            view["oauth"] = oauth;
        } else if account.auth_type == crate::config::AuthType::XOAuth2 {
            view["oauth"] = self.check_token_sign_in(&account);
        }
        view["ok"] = Value::from(ok);
        Ok(view)
    }

    /// What `checkAccount()` says of an XOAUTH2 account's sign-in, after the checks above
    /// have signed in: the grant, whether a token was obtained, the SASL mechanism used and
    /// the mailbox (LOGIN). Nothing is sent or changed.
    fn check_token_sign_in(&self, account: &Account) -> Value {
        let env = self.oauth_env();
        let tokens = crate::oauth::TokenManager::new(account, &env, crate::http::Role::Authorize);
        let (grant, provider, token) = match &tokens {
            Ok(t) => (
                Value::from(t.grant_name()),
                Value::from(t.provider().service()),
                t.has_fresh_token(),
            ),
            Err(_) => (Value::Null, Value::Null, false),
        };
        let mechanism = tokens
            .as_ref()
            .ok()
            .and_then(|t| {
                t.store()
                    .get_kv(crate::oauth::tokens::KV_MECHANISM, t.account())
                    .ok()
            })
            .flatten();
        let mut report = json!({
            "auth_type": "XOAUTH2",
            "grant": grant,
            "provider": provider,
            "token_obtained": token,
            "mechanism": mechanism,
            "mailbox": account.login_name(),
            "ok": token,
        });
        if let Err(e) = tokens {
            report["error"] = Value::from(e.to_string());
        }
        report
    }

    /// Connects, authenticates and opens the incoming folder (IMAP read-only) or Maildir and
    /// counts its messages; changes nothing in the mailbox.
    fn check_incoming(&mut self, account: &Account) -> Value {
        let protocol = account.incoming.as_ref().map(|i| i.mailbox.as_str());
        let checked = StateStore::open(&self.settings.state_dir)
            .and_then(|state| crate::incoming::open(account, &self.oauth_env(), state))
            .and_then(|mut mailbox| {
                let count = mailbox.count();
                // A clean logout: nothing was listed or marked, so nothing is committed.
                let closed = mailbox.finish();
                let count = count?;
                closed?;
                Ok(count)
            });
        match checked {
            Ok(count) => json!({"protocol": protocol, "ok": true, "messages": count}),
            Err(e) => {
                let mut report = json!({"protocol": protocol, "ok": false, "error": e.to_string()});
                if let Error::Mailbox(m) = &e {
                    report["server"] = Value::from(m.server.clone());
                }
                report
            }
        }
    }

    pub fn event_check_mail(&mut self, host: &mut dyn Host, data: &Value) -> Result<Value> {
        let settings = self.settings.clone();
        let context = crate::checkmail::Context {
            oauth: self.oauth_env(),
            settings: &settings,
            services: self,
        };
        let summary = crate::checkmail::event_check_mail(context, host, data)?;
        serde_json::to_value(summary)
            .map_err(|e| Error::message(format!("cannot represent the summary: {e}")))
    }

    /// `encryptPassword()`: `ENC:v1:` with the key file of that INI file and environment.
    pub fn encrypt_password(plain: &str, config_file: &Path, environment: &str) -> Result<String> {
        secrets::encrypt_for_config(plain, config_file, environment)
    }
}

fn account_json(account: &Account) -> Value {
    match account.id {
        AccountId::Master => Value::from("master"),
        AccountId::Tenant(id) => Value::from(id),
    }
}

fn status_result(status: &str) -> Value {
    json!({
        "status": status,
        "account": null,
        "transport": null,
        "from": null,
        "message_id": null,
    })
}

fn sent_result(account: &Account, built: &BuiltMessage, delivery: &outgoing::Delivery) -> Value {
    let mut result = json!({
        "status": delivery.status.as_str(),
        "account": account_json(account),
        "transport": account.outgoing.as_ref().map(|o| o.transport.as_str()),
        "from": delivery.from.as_deref().unwrap_or(&built.from),
        "message_id": built.message_id,
    });
    if let Some(path) = &delivery.path {
        result["path"] = Value::from(path.display().to_string());
    }
    result
}

/// A `sendBatch()` entry for a message that was not delivered.
fn failed_result(error: &Error) -> Value {
    let mut result = json!({
        "status": "failed",
        "error": error.to_string(),
        "exception": error.exception_class(),
    });
    if let Error::Transport(t) = error {
        // As a sent result names it: the tenant RECID as an int, or 'master'.
        result["account"] = match t.account.parse::<i64>() {
            Ok(recid) => Value::from(recid),
            Err(_) => Value::from(t.account.clone()),
        };
        result["server"] = Value::from(t.server.clone());
        result["smtp_code"] = json!(t.code);
        result["transient"] = Value::from(t.transient);
    }
    result
}

fn check_error(account: &Account, error: &Error) -> Value {
    let mut report = json!({
        "transport": account.outgoing.as_ref().map(|o| o.transport.as_str()),
        "ok": false,
        "error": error.to_string(),
    });
    if let Error::Transport(t) = error {
        report["server"] = Value::from(t.server.clone());
        report["code"] = json!(t.code);
        report["transient"] = Value::from(t.transient);
    }
    report
}

/// The in-app Message handed to `deliverMessage()` when SEND_EMAIL is false: recipients,
/// subject, content and attachments (SPEC §4; facts: Messages).
fn in_app_message(request: &MessageRequest) -> Value {
    use base64::Engine;
    let list = |v: &[outgoing::message::EmailAddress]| -> Value {
        Value::Array(v.iter().map(|a| a.to_json()).collect())
    };
    let mut subject = request.subject.clone();
    if let Some(sd) = &request.sd_number {
        if !subject.contains(sd.as_str()) {
            subject = format!("[{sd}] {subject}");
        }
    }
    json!({
        "to": list(&request.to),
        "cc": list(&request.cc),
        "bcc": list(&request.bcc),
        "reply_to": list(&request.reply_to),
        "subject": subject,
        "text": request.text,
        "html": request.html,
        "attachments": request.attachments.iter().map(|a| json!({
            "filename": a.filename,
            "content_type": a.content_type,
            "size": a.data.len(),
            "inline": a.inline,
            "content_id": a.content_id,
            "content_base64": base64::engine::general_purpose::STANDARD.encode(&a.data),
        })).collect::<Vec<_>>(),
        "kind": request.kind.as_str(),
        "tenant": request.tenant,
        "sd_number": request.sd_number,
    })
}

/// What `eventCheckMail` borrows from the manager (see `checkmail::Services`).
impl crate::checkmail::Services for Manager {
    fn tenant_accounts(&mut self, host: &mut dyn Host) -> crate::checkmail::TenantAccounts {
        let accounts = Manager::tenant_accounts(self, host);
        crate::checkmail::TenantAccounts {
            accounts,
            failed: self.failed_accounts.clone(),
            row_errors: self.row_errors.clone(),
        }
    }

    fn thread_key(&mut self) -> Result<[u8; 32]> {
        Manager::thread_key(self)
    }

    fn logger(&mut self) -> &mut Logger {
        &mut self.logger
    }

    fn send(&mut self, host: &mut dyn Host, message: &Value) -> Result<()> {
        Manager::send(self, host, message).map(drop)
    }
}
