//! The sending service behind `send()`, `sendBatch()` and `resolveAccount()`: validation, the
//! SEND_EMAIL / DISABLE_EMAIL switches, routing (SPEC §4), one transport per account kept alive
//! between calls, building, delivery, recording the Message-IDs sent for SD items and logging
//! send failures once. The transports themselves are in `crate::outgoing`.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Account, AccountId, PublicAccount, Settings};
use crate::context::{Context, TenantAccounts};
use crate::error::{Error, Result};
use crate::host::{Host, InAppAddress, InAppAttachment, InAppMessage};
use crate::outgoing::{self, build, BuiltMessage, DeliveryStatus, MessageRequest, Transport};
use crate::routing::{self, MailKind, Route, TenantAccount};
use crate::state::StateStore;

// ----- The PHP contract of this side (SPEC §5), converted to arrays at the boundary -----

/// `account` as the PHP arrays name it: the tenant RECID as an int, or `'master'`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AccountRef {
    Recid(i64),
    Name(String),
}

impl AccountRef {
    pub fn of(id: &AccountId) -> AccountRef {
        match id {
            AccountId::Master => AccountRef::Name("master".to_string()),
            AccountId::Tenant(id) => AccountRef::Recid(*id),
        }
    }

    /// From the text an error carries (`master` or the RECID).
    pub fn parse(account: &str) -> AccountRef {
        match account.parse::<i64>() {
            Ok(recid) => AccountRef::Recid(recid),
            Err(_) => AccountRef::Name(account.to_string()),
        }
    }
}

/// What happened to a message that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SendStatus {
    /// Accepted by the server (SMTP, sendmail, the cloud APIs).
    Sent,
    /// Written as an `.eml` file (FILE).
    Written,
    /// DISABLE_EMAIL (or routing's disabled): nothing done.
    Disabled,
    /// SEND_EMAIL false: handed to the host's `deliverMessage()`.
    Redirected,
    /// No account would send it; `reason` says why.
    Skipped,
}

/// The result of `send()`, and of a `sendBatch()` message that did not fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SendResult {
    pub status: SendStatus,
    /// Null unless the message was delivered.
    pub account: Option<AccountRef>,
    pub transport: Option<&'static str>,
    pub from: Option<String>,
    pub message_id: Option<String>,
    /// The `.eml` file written (FILE only); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Why a message was skipped; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl SendResult {
    /// A message finished without a transport (disabled, redirected, skipped).
    fn status(status: SendStatus) -> SendResult {
        SendResult {
            status,
            account: None,
            transport: None,
            from: None,
            message_id: None,
            path: None,
            reason: None,
        }
    }

    fn sent(account: &Account, built: &BuiltMessage, delivery: &outgoing::Delivery) -> SendResult {
        SendResult {
            status: match delivery.status {
                DeliveryStatus::Sent => SendStatus::Sent,
                DeliveryStatus::Written => SendStatus::Written,
            },
            account: Some(AccountRef::of(&account.id)),
            transport: account.outgoing.as_ref().map(|o| o.transport.as_str()),
            from: Some(delivery.from.as_deref().unwrap_or(&built.from).to_string()),
            message_id: Some(built.message_id.clone()),
            path: delivery.path.as_ref().map(|p| p.display().to_string()),
            reason: None,
        }
    }
}

/// A `sendBatch()` entry for a message that was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchFailure {
    /// Always `failed`.
    pub status: &'static str,
    pub error: String,
    /// The class `send()` would have thrown ([`Error::exception_class`]).
    pub exception: &'static str,
    /// For a transport failure: which account and server, and how.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub transport: Option<BatchTransportFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchTransportFailure {
    /// As a sent result names it: the tenant RECID as an int, or 'master'.
    pub account: AccountRef,
    pub server: String,
    pub smtp_code: Option<u16>,
    pub transient: bool,
}

impl BatchFailure {
    pub fn of(error: &Error) -> BatchFailure {
        BatchFailure {
            status: "failed",
            error: error.to_string(),
            exception: error.exception_class(),
            transport: match error {
                Error::Transport(t) => Some(BatchTransportFailure {
                    account: AccountRef::parse(&t.account),
                    server: t.server.clone(),
                    smtp_code: t.code,
                    transient: t.transient,
                }),
                _ => None,
            },
        }
    }
}

/// One `sendBatch()` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BatchEntry {
    Done(SendResult),
    Failed(BatchFailure),
}

// ----- The service -----

/// The transports of one manager object: one per account (and configuration), so SMTP
/// connections are reused across `send()` calls for the life of the PHP object.
#[derive(Default)]
pub struct Outbound {
    /// Each kept with the account it was built for: a changed row (new password, new server,
    /// another AUTH_TYPE or EMAIL) gets a new transport. Compared by value, not by any text.
    transports: HashMap<String, (Box<Account>, Box<dyn Transport>)>,
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
    Done(SendResult),
}

impl Outbound {
    pub fn new() -> Outbound {
        Outbound::default()
    }

    /// `send()`: validates, routes (SPEC §4) and delivers one message, given as the `send()`
    /// array (as JSON). Also how the check-mail event sends its alerts.
    pub fn send(
        &mut self,
        ctx: &mut Context<'_>,
        host: &mut dyn Host,
        message: &Value,
    ) -> Result<SendResult> {
        match prepare(ctx, host, message)? {
            Prepared::Done(result) => Ok(result),
            Prepared::Deliver(Job {
                key,
                account,
                built,
                sd_number,
            }) => {
                let transport = self.transport(ctx, &key, &account)?;
                match transport.send(&built) {
                    Ok(delivery) => {
                        record_sent(ctx, host, &account, &built, sd_number.as_deref());
                        Ok(SendResult::sent(&account, &built, &delivery))
                    }
                    Err(e) => {
                        log_send_failure(ctx, host, &account, &built, &e);
                        Err(e)
                    }
                }
            }
        }
    }

    /// `sendBatch()`: one result per message, in order; a bad message is a `failed` result,
    /// never an exception. Messages of one account share its connections and go out
    /// concurrently.
    pub fn send_batch(
        &mut self,
        ctx: &mut Context<'_>,
        host: &mut dyn Host,
        messages: &[Value],
    ) -> Vec<BatchEntry> {
        let mut results: Vec<Option<BatchEntry>> = vec![None; messages.len()];
        let mut pending: Vec<(usize, Job)> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            match prepare(ctx, host, message) {
                Ok(Prepared::Done(result)) => results[i] = Some(BatchEntry::Done(result)),
                Ok(Prepared::Deliver(job)) => match self.transport(ctx, &job.key, &job.account) {
                    Ok(_) => pending.push((i, job)),
                    Err(e) => results[i] = Some(BatchEntry::Failed(BatchFailure::of(&e))),
                },
                Err(e) => results[i] = Some(BatchEntry::Failed(BatchFailure::of(&e))),
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
                        BatchEntry::Done(SendResult::sent(&job.account, &job.built, &delivery))
                    }
                    Err(e) => {
                        let result = BatchEntry::Failed(BatchFailure::of(&e));
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
                log_send_failure(ctx, host, &job.account, &job.built, &e);
            }
            for i in sent {
                let job = job(i);
                record_sent(
                    ctx,
                    host,
                    &job.account,
                    &job.built,
                    job.sd_number.as_deref(),
                );
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    BatchEntry::Failed(BatchFailure::of(&Error::message("not processed")))
                })
            })
            .collect()
    }

    /// The transport of `account`, built on first use or when the account changed.
    fn transport(
        &mut self,
        ctx: &Context<'_>,
        key: &str,
        account: &Account,
    ) -> Result<&dyn Transport> {
        let stale = self
            .transports
            .get(key)
            .is_none_or(|(built_for, _)| **built_for != *account);
        if stale {
            let transport = outgoing::transport_for(account, &ctx.oauth_env())?;
            self.transports
                .insert(key.to_string(), (Box::new(account.clone()), transport));
        }
        Ok(self.transports[key].1.as_ref())
    }
}

/// `resolveAccount()`: the account routing picks, secret-free; `None` when none would send.
pub fn resolve_account(
    ctx: &mut Context<'_>,
    host: &mut dyn Host,
    kind: &str,
    tenant: i64,
) -> Result<Option<PublicAccount>> {
    let kind = MailKind::parse(kind)?;
    let tenants = ctx.tenant_accounts(host);
    Ok(match route(ctx.settings, kind, &tenants, tenant) {
        Route::Send(account) => Some(account.public()),
        // The account that would send is broken: its error, as send() would throw it.
        Route::Failed(failed) => return Err(failed.error.clone()),
        _ => None,
    })
}

/// SPEC §4 for this INI environment and these tenant accounts (the usable ones and the
/// failed ones, whose mail fails rather than going out another way).
pub fn route<'a>(
    settings: &'a Settings,
    kind: MailKind,
    tenants: &'a TenantAccounts,
    tenant: i64,
) -> Route<'a> {
    let (default, service_desk) =
        routing::select_tenant_accounts(&tenants.accounts, &tenants.failed, tenant);
    // A broken master stays in routing as failed: mail that would reach it fails with its
    // error instead of being skipped or sent another way.
    let master = match (&settings.master, &settings.master_failed) {
        (Some(master), _) => Some(TenantAccount::Usable(master)),
        (None, Some(failed)) => Some(TenantAccount::Failed(failed)),
        (None, None) => None,
    };
    routing::route(
        kind,
        default,
        service_desk,
        master,
        settings.send_email,
        settings.disable_email,
    )
}

/// Validation, the SEND_EMAIL / DISABLE_EMAIL switches, routing and building.
fn prepare(ctx: &mut Context<'_>, host: &mut dyn Host, message: &Value) -> Result<Prepared> {
    // A malformed message is an error whatever the switches say: the caller has a bug.
    let request = MessageRequest::from_json(message)?;
    let kind = request.kind;
    if ctx.settings.disable_email {
        return Ok(Prepared::Done(SendResult::status(SendStatus::Disabled)));
    }
    if !ctx.settings.send_email {
        deliver_in_app(host, &request)?;
        return Ok(Prepared::Done(SendResult::status(SendStatus::Redirected)));
    }
    let tenants = ctx.tenant_accounts(host);
    let account = match route(ctx.settings, kind, &tenants, request.tenant) {
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
            ctx.logger.error(host, &text, &context);
            return Err(error);
        }
        Route::Disabled => return Ok(Prepared::Done(SendResult::status(SendStatus::Disabled))),
        Route::Redirect => {
            deliver_in_app(host, &request)?;
            return Ok(Prepared::Done(SendResult::status(SendStatus::Redirected)));
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
            ctx.logger.error(host, &text, &context);
            let mut result = SendResult::status(SendStatus::Skipped);
            result.reason = Some(reason.to_string());
            return Ok(Prepared::Done(result));
        }
    };
    let thread_key = if request.sd_number.is_some() || request.in_reply_to.is_some() {
        match ctx.thread_key() {
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
                ctx.logger.error(host, &text, &context);
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

/// Remembers the Message-ID sent for an SD item (SPEC §8). Threading itself relies on the
/// keyed hash in the id, so a state store that cannot be written only costs a log line.
fn record_sent(
    ctx: &mut Context<'_>,
    host: &mut dyn Host,
    account: &Account,
    built: &BuiltMessage,
    sd_number: Option<&str>,
) {
    let Some(sd) = sd_number else {
        return;
    };
    let recorded = StateStore::open(&ctx.settings.state_dir, ctx.settings.state_dsn.as_ref())
        .and_then(|s| s.record_sent(&built.message_id, sd, &account.id.to_string()));
    if let Err(e) = recorded {
        let text = format!("pcr_email: the sent Message-ID could not be recorded: {e}");
        ctx.logger.once(host, "record_sent", &text, &Value::Null);
    }
}

fn log_send_failure(
    ctx: &mut Context<'_>,
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
    ctx.logger
        .error(host, &format!("pcr_email: {error}"), &context);
}

/// SEND_EMAIL false: the message goes to the host's `deliverMessage()` instead.
fn deliver_in_app(host: &mut dyn Host, request: &MessageRequest) -> Result<()> {
    host.deliver_message(&in_app_message(request))
}

/// The in-app Message handed to `deliverMessage()` when SEND_EMAIL is false: recipients,
/// subject, content and attachments (SPEC §4; facts: Messages).
pub fn in_app_message(request: &MessageRequest) -> InAppMessage {
    use base64::Engine;
    let list = |v: &[outgoing::message::EmailAddress]| -> Vec<InAppAddress> {
        v.iter()
            .map(|a| InAppAddress {
                email: a.email.clone(),
                name: a.name.clone(),
            })
            .collect()
    };
    let mut subject = request.subject.clone();
    if let Some(sd) = &request.sd_number {
        if !subject.contains(sd.as_str()) {
            subject = format!("[{sd}] {subject}");
        }
    }
    InAppMessage {
        to: list(&request.to),
        cc: list(&request.cc),
        bcc: list(&request.bcc),
        reply_to: list(&request.reply_to),
        subject,
        text: request.text.clone(),
        html: request.html.clone(),
        attachments: request
            .attachments
            .iter()
            .map(|a| InAppAttachment {
                filename: a.filename.clone(),
                content_type: a.content_type.clone(),
                size: a.data.len(),
                inline: a.inline,
                content_id: a.content_id.clone(),
                content_base64: base64::engine::general_purpose::STANDARD.encode(&a.data),
            })
            .collect(),
        kind: request.kind.as_str(),
        tenant: request.tenant,
        sd_number: request.sd_number.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn php(value: &impl Serialize) -> Value {
        serde_json::to_value(value).unwrap()
    }

    /// Routing decides from the failed accounts it is given: a tenant whose Default row is
    /// broken has its mail fail, where without that row the INI master would send it.
    #[test]
    fn routing_takes_the_failed_accounts_as_a_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let ini = dir.path().join("pcr360.ini");
        let out = dir.path().join("out");
        std::fs::write(
            &ini,
            format!(
                "[prod]\nemail.EMAIL = m@example.edu\nemail.OUTGOING_TRANSPORT_TYPE = FILE\n\
                 email.FILE_PATH = {}\n",
                out.display()
            ),
        )
        .unwrap();
        let settings = Settings::load(&ini, "prod").unwrap();
        let row = |recid: i64, tenant: i64, email: &str| {
            json!({"RECID": recid, "TENANTS_RECID": tenant, "ACCOUNT_TYPE": "default",
                   "EMAIL": email, "OUTGOING_TRANSPORT_TYPE": "FILE",
                   "FILE_PATH": out.display().to_string()})
        };
        let rows = json!([row(7, 2, "d7@t2.example.edu"), row(9, 3, "bad")]);
        let keys = crate::config::secrets::KeyStore::from_key([7; 32]);
        let sorted = crate::config::tenant_rows(&rows, &settings, Ok(&keys));
        let tenants = TenantAccounts {
            accounts: sorted.accounts,
            failed: sorted.failed,
            row_errors: sorted.errors.iter().map(|e| e.to_string()).collect(),
        };
        assert_eq!(tenants.row_errors.len(), 1, "{:?}", tenants.row_errors);
        let sender = |tenants: &TenantAccounts, tenant: i64| match route(
            &settings,
            MailKind::General,
            tenants,
            tenant,
        ) {
            Route::Send(account) => Ok(account.id.clone()),
            Route::Failed(failed) => Err(failed.id.clone()),
            _ => panic!("neither sent nor failed"),
        };
        assert_eq!(sender(&tenants, 2), Ok(AccountId::Tenant(7)));
        assert_eq!(sender(&tenants, 3), Err(AccountId::Tenant(9)));
        let without_failed = TenantAccounts {
            accounts: tenants.accounts.clone(),
            ..TenantAccounts::default()
        };
        assert_eq!(sender(&without_failed, 3), Ok(AccountId::Master));
    }

    #[test]
    fn a_result_without_delivery_has_null_keys_and_no_path() {
        assert_eq!(
            php(&SendResult::status(SendStatus::Redirected)),
            json!({"status": "redirected", "account": null, "transport": null, "from": null,
                   "message_id": null})
        );
        let mut skipped = SendResult::status(SendStatus::Skipped);
        skipped.reason = Some("no account".into());
        assert_eq!(php(&skipped)["reason"], "no account");
        assert_eq!(php(&skipped)["status"], "skipped");
    }

    #[test]
    fn a_failed_batch_entry_names_the_account_as_send_results_do() {
        let tenant = Error::transport("12", "mail.example.edu:587", None, true, "refused");
        assert_eq!(
            php(&BatchFailure::of(&tenant)),
            json!({"status": "failed", "error": tenant.to_string(),
                   "exception": "PCR_Utility_EmailTransportException", "account": 12,
                   "server": "mail.example.edu:587", "smtp_code": null, "transient": true})
        );
        let master = Error::transport("master", "/usr/sbin/sendmail", Some(550), false, "no");
        assert_eq!(php(&BatchFailure::of(&master))["account"], "master");
        assert_eq!(php(&BatchFailure::of(&master))["smtp_code"], 550);
        // Other errors: no transport keys at all.
        let bad = Error::message("to: missing");
        assert_eq!(
            php(&BatchFailure::of(&bad)),
            json!({"status": "failed", "error": "to: missing",
                   "exception": "PCR_Utility_EmailException"})
        );
    }
}
