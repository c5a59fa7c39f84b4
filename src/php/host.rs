//! `PCR_Utility_EmailHost`: the PHP interface, and the core `Host` implemented over a PHP object.

use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendHashTable, Zval};
use ext_php_rs::zend::ExecutorGlobals;
use serde_json::Value;

use super::convert::{json_to_table, zval_to_json};
use crate::error::{Error, Result};
use crate::host::{Host, Mail};

pub const HOST_INTERFACE: &str = "PCR_Utility_EmailHost";

/// The application's side of the contract: the extension calls these from PHP's thread.
#[php_interface]
#[php(name = "PCR_Utility_EmailHost")]
// Only its generated PHP interface is used: PHP classes implement it, Rust calls them by name.
#[allow(non_snake_case, dead_code)]
pub trait EmailHost {
    /// Tenant email account rows (same keys as the INI, plus RECID, TENANTS_RECID,
    /// ACCOUNT_TYPE, SYSADMIN and OAUTH).
    fn email_accounts(&self) -> Vec<Zval>;
    /// Blocked Emails patterns: `*` wildcards, or `/regex/` matched on address and subject.
    fn blocked_emails(&self) -> Vec<Zval>;
    /// Creates an Inquiry from `$mail`; returns its SD number.
    fn create_inquiry(&self, mail: &ZendHashTable) -> String;
    /// Adds `$mail` to the thread of `$sdNumber`; false when there is no such item.
    fn add_to_thread(&self, sdNumber: String, mail: &ZendHashTable) -> bool;
    /// Delivers a message in-app (SEND_EMAIL = false).
    fn deliver_message(&self, message: &ZendHashTable);
    /// Writes to the application's Error Log.
    fn log_error(&self, message: String, context: &ZendHashTable);
}

/// The core `Host` over a PHP object. A PHP exception thrown by a host method is taken off the
/// engine here (so it does not escape into the caller's PHP code) and becomes `Error::Host`:
/// the core decides what a failure means (a mail stays in its mailbox and is retried).
pub struct PhpHost {
    object: Zval,
    /// PHP stopped inside a host method (a fatal error, or `exit()`): nothing more may enter
    /// PHP, and the caller must let PHP finish stopping once the Rust side has wound down.
    stopped: std::cell::Cell<Option<Stop>>,
}

/// How PHP stopped inside a host callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A fatal error longjmp'd out of the callback: re-raised with `bailout()`.
    Bailout,
    /// `exit()`: its unwind "exception" is left pending, so PHP exits when we return.
    Exit,
}

impl PhpHost {
    pub fn new(object: Zval) -> Self {
        PhpHost {
            object,
            stopped: std::cell::Cell::new(None),
        }
    }

    /// Set when PHP stopped inside a callback (see [`Stop`]).
    pub fn stopped(&self) -> Option<Stop> {
        self.stopped.get()
    }

    fn call(&self, method: &str, args: Vec<&dyn ext_php_rs::convert::IntoZvalDyn>) -> Result<Zval> {
        if self.stopped.get().is_some() {
            return Err(Error::Host(format!(
                "PHP is stopping (fatal error or exit in an earlier callback): \
                 {HOST_INTERFACE}::{method}() was not called"
            )));
        }
        let object = &self.object;
        let caught = ext_php_rs::zend::try_catch(std::panic::AssertUnwindSafe(|| {
            object.try_call_method(method, args)
        }));
        let result = match caught {
            Ok(result) => result,
            Err(_) => {
                // A fatal error in the host: its message is already PHP's own output.
                self.stopped.set(Some(Stop::Bailout));
                return Err(Error::Host(format!(
                    "{HOST_INTERFACE}::{method}() stopped PHP with a fatal error"
                )));
            }
        };
        if ExecutorGlobals::pending_exception_class().as_deref() == Some("UnwindExit") {
            // exit() in the callback: left pending, so PHP exits once we return.
            self.stopped.set(Some(Stop::Exit));
            return Err(Error::Host(format!(
                "{HOST_INTERFACE}::{method}() called exit()"
            )));
        }
        if let Some(exception) = ExecutorGlobals::take_exception() {
            let class = exception
                .get_class_name()
                .unwrap_or_else(|_| "Exception".into());
            let message = exception
                .try_call_method("getMessage", vec![])
                .ok()
                .and_then(|m| m.string())
                .unwrap_or_default();
            return Err(Error::Host(format!(
                "{HOST_INTERFACE}::{method}() threw {class}: {message}"
            )));
        }
        result.map_err(|e| {
            Error::Host(format!(
                "{HOST_INTERFACE}::{method}() could not be called: {e}"
            ))
        })
    }

    fn table(value: &Value, what: &str) -> Result<ext_php_rs::boxed::ZBox<ZendHashTable>> {
        json_to_table(value).map_err(|e| Error::Host(format!("cannot pass {what} to PHP: {e}")))
    }

    /// `$mail` as the PHP array the host methods receive.
    fn mail_table(mail: &Mail<'_>) -> Result<ext_php_rs::boxed::ZBox<ZendHashTable>> {
        let value = serde_json::to_value(mail)
            .map_err(|e| Error::Host(format!("cannot pass $mail to PHP: {e}")))?;
        Self::table(&value, "$mail")
    }

    fn list(&self, method: &str) -> Result<Value> {
        let value = self.call(method, vec![])?;
        if value.array().is_none() {
            return Err(Error::Host(format!(
                "{HOST_INTERFACE}::{method}() must return an array"
            )));
        }
        zval_to_json(&value).map_err(|e| Error::Host(format!("{method}(): {e}")))
    }
}

impl Host for PhpHost {
    fn is_alive(&self) -> bool {
        self.stopped.get().is_none()
    }

    fn email_accounts(&mut self) -> Result<Value> {
        let value = self.list("emailAccounts")?;
        Ok(match value {
            // An associative array of rows keyed by RECID is accepted too.
            Value::Object(map) => Value::Array(map.into_iter().map(|(_, row)| row).collect()),
            other => other,
        })
    }

    fn blocked_emails(&mut self) -> Result<Vec<String>> {
        let value = self.list("blockedEmails")?;
        let items: Vec<Value> = match value {
            Value::Object(map) => map.into_iter().map(|(_, v)| v).collect(),
            Value::Array(items) => items,
            _ => Vec::new(),
        };
        Ok(items
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                _ => None,
            })
            .collect())
    }

    fn create_inquiry(&mut self, mail: &Mail<'_>) -> Result<String> {
        let table = Self::mail_table(mail)?;
        let value = self.call("createInquiry", vec![&table])?;
        // The host returned normally, so it has stored the Inquiry: whatever it returned, the
        // message is never handed over again. An empty (or non-string) return is a contract
        // violation that the core logs; it is not a failure to retry.
        Ok(value
            .string()
            .map(|sd| sd.trim().to_string())
            .unwrap_or_default())
    }

    fn add_to_thread(&mut self, sd_number: &str, mail: &Mail<'_>) -> Result<bool> {
        let table = Self::mail_table(mail)?;
        let value = self.call("addToThread", vec![&sd_number, &table])?;
        Ok(value.bool().unwrap_or(false))
    }

    fn deliver_message(&mut self, message: &Value) -> Result<()> {
        let table = Self::table(message, "the message")?;
        self.call("deliverMessage", vec![&table])?;
        Ok(())
    }

    fn log_error(&mut self, message: &str, context: &Value) {
        // The Error Log must never make things worse: a failing logger is ignored.
        if let Ok(table) = Self::table(context, "the context") {
            let _ = self.call("logError", vec![&message, &table]);
        }
    }
}

/// The host of a manager constructed without one (and with no default host): nothing to read
/// or hand over, and its Error Log is PHP's own (`error_log()`, the `error_log` ini setting),
/// so a failure is never left without a trace.
pub struct PhpErrorLog;

impl Host for PhpErrorLog {
    fn email_accounts(&mut self) -> Result<Value> {
        crate::host::NoHost.email_accounts()
    }
    fn blocked_emails(&mut self) -> Result<Vec<String>> {
        crate::host::NoHost.blocked_emails()
    }
    fn create_inquiry(&mut self, mail: &Mail<'_>) -> Result<String> {
        crate::host::NoHost.create_inquiry(mail)
    }
    fn add_to_thread(&mut self, sd_number: &str, mail: &Mail<'_>) -> Result<bool> {
        crate::host::NoHost.add_to_thread(sd_number, mail)
    }
    fn deliver_message(&mut self, message: &Value) -> Result<()> {
        crate::host::NoHost.deliver_message(message)
    }
    fn log_error(&mut self, message: &str, context: &Value) {
        // One entry, one line: a hostile header value cannot forge a second entry.
        let line = crate::log::entry(message, context);
        // Logging must never make things worse: a failing error_log() is ignored, whether it
        // fails, raises an exception through an error handler, or bails out.
        if let Ok(error_log) = ext_php_rs::types::ZendCallable::try_from_name("error_log") {
            let _ = ext_php_rs::zend::try_catch(std::panic::AssertUnwindSafe(|| {
                error_log.try_call(vec![&line])
            }));
            let _ = ExecutorGlobals::take_exception();
        }
    }
}
