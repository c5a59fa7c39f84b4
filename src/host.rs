//! The application side of the contract (`PCR_Utility_EmailHost` in PHP), as the core sees it.
//!
//! The PHP boundary implements this trait by calling the PHP object's methods; tests implement
//! it in Rust. Every call happens on the thread that called into the extension (PHP's thread):
//! the trait is deliberately not `Send`.

use serde_json::Value;

use crate::error::Result;

pub mod mail;
pub mod message;

pub use mail::{Mail, MailAccount, MailAttachment, Recid};
pub use message::{InAppAddress, InAppAttachment, InAppMessage};

pub trait Host {
    /// Tenant email account rows (SPEC §3), as a JSON list of objects.
    fn email_accounts(&mut self) -> Result<Value>;
    /// Blocked Emails patterns (`*` wildcards, `/regex/`).
    fn blocked_emails(&mut self) -> Result<Vec<String>>;
    /// Creates an Inquiry from `$mail`; returns its SD number. `Ok` means the host stored it:
    /// an empty string is a contract violation (logged), never a reason to hand it over again.
    fn create_inquiry(&mut self, mail: &Mail<'_>) -> Result<String>;
    /// Adds `$mail` to the thread of `sd_number`; false when there is no such item.
    fn add_to_thread(&mut self, sd_number: &str, mail: &Mail<'_>) -> Result<bool>;
    /// Delivers a message in-app (SEND_EMAIL = false): an [`InAppMessage`] as JSON.
    fn deliver_message(&mut self, message: &Value) -> Result<()>;
    /// Writes to the application's Error Log. Must not fail the caller: errors are swallowed.
    fn log_error(&mut self, message: &str, context: &Value);
    /// False once the host can take no more calls (PHP is stopping: a fatal error or `exit()`
    /// in a callback). Work in progress then winds down without handing anything over.
    fn is_alive(&self) -> bool {
        true
    }
}

/// A host that has nothing and logs nowhere: used when the manager has no PHP host (sending
/// with the INI master only).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHost;

impl Host for NoHost {
    fn email_accounts(&mut self) -> Result<Value> {
        Ok(Value::Array(Vec::new()))
    }
    fn blocked_emails(&mut self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn create_inquiry(&mut self, _mail: &Mail<'_>) -> Result<String> {
        Err(crate::Error::Host(
            "no PCR_Utility_EmailHost was given (constructor or setDefaultHost)".into(),
        ))
    }
    fn add_to_thread(&mut self, _sd_number: &str, _mail: &Mail<'_>) -> Result<bool> {
        Err(crate::Error::Host(
            "no PCR_Utility_EmailHost was given (constructor or setDefaultHost)".into(),
        ))
    }
    fn deliver_message(&mut self, _message: &Value) -> Result<()> {
        Err(crate::Error::Host(
            "SEND_EMAIL is false but no PCR_Utility_EmailHost was given to deliver the message in-app"
                .into(),
        ))
    }
    fn log_error(&mut self, _message: &str, _context: &Value) {}
}
