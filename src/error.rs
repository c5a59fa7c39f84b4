//! The one error type of the core, and the one mapping of its variants to the PHP exception
//! classes ([`Error::exception_class`]; `src/php` throws that class, `sendBatch` names it):
//!
//! | variant     | PHP class                              |
//! |-------------|----------------------------------------|
//! | `Config`    | `PCR_Utility_EmailConfigException`     |
//! | `Transport` | `PCR_Utility_EmailTransportException`  |
//! | `Mailbox`   | `PCR_Utility_EmailMailboxException`    |
//! | `Auth`      | `PCR_Utility_EmailAuthException`       |
//! | `Message`   | `PCR_Utility_EmailException` (a malformed message, bad argument) |
//! | `Host`      | `PCR_Utility_EmailException` (the PHP host failed)               |
//!
//! No variant ever carries a password, token or key: messages are built from names,
//! addresses, servers and codes only.

use std::fmt;

/// Where a configuration problem is: the file and line of the INI, or the account and key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigLocation {
    pub file: Option<String>,
    pub line: Option<usize>,
    pub account: Option<String>,
    pub key: Option<String>,
}

impl fmt::Display for ConfigLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(file) = &self.file {
            match self.line {
                Some(line) => parts.push(format!("{file}:{line}")),
                None => parts.push(file.clone()),
            }
        }
        if let Some(account) = &self.account {
            parts.push(format!("account {account}"));
        }
        if let Some(key) = &self.key {
            parts.push(format!("key {key}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// A failure talking to an outgoing server (SMTP, sendmail, Graph, Gmail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportFailure {
    /// `master` or the tenant account's RECID.
    pub account: String,
    /// `host:port`, the sendmail path, the FILE directory or the API base URL.
    pub server: String,
    /// The SMTP reply code (or HTTP status for the cloud APIs) when the server gave one.
    pub code: Option<u16>,
    /// True when trying again later may succeed (4xx, timeouts, connection refused).
    pub transient: bool,
    pub message: String,
}

/// A failure reading a mailbox (IMAP, POP3, Maildir, Graph, Gmail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxFailure {
    pub account: String,
    pub server: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("email configuration error ({location}): {message}")]
    Config {
        location: ConfigLocation,
        message: String,
    },
    #[error("sending failed for account {} via {}{}: {}", .0.account, .0.server,
        .0.code.map(|c| format!(" (code {c})")).unwrap_or_default(), .0.message)]
    Transport(TransportFailure),
    #[error("mailbox error for account {} at {}: {}", .0.account, .0.server, .0.message)]
    Mailbox(MailboxFailure),
    #[error("authorization error for account {account}: {message}")]
    Auth { account: String, message: String },
    #[error("{0}")]
    Message(String),
    #[error("the PHP host failed: {0}")]
    Host(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The names of the PHP exception classes (SPEC §5): `src/php` registers these, and
/// [`Error::exception_class`] is the one mapping of the core's errors to them.
pub mod exception_class {
    pub const BASE: &str = "PCR_Utility_EmailException";
    pub const CONFIG: &str = "PCR_Utility_EmailConfigException";
    pub const TRANSPORT: &str = "PCR_Utility_EmailTransportException";
    pub const MAILBOX: &str = "PCR_Utility_EmailMailboxException";
    pub const AUTH: &str = "PCR_Utility_EmailAuthException";
}

impl Error {
    /// The PHP exception class of this error (the table above): what `src/php` throws, and
    /// what a failed `sendBatch` entry names.
    pub fn exception_class(&self) -> &'static str {
        match self {
            Error::Config { .. } => exception_class::CONFIG,
            Error::Transport(_) => exception_class::TRANSPORT,
            Error::Mailbox(_) => exception_class::MAILBOX,
            Error::Auth { .. } => exception_class::AUTH,
            Error::Message(_) | Error::Host(_) => exception_class::BASE,
        }
    }

    pub fn config(location: ConfigLocation, message: impl Into<String>) -> Self {
        Error::Config {
            location,
            message: message.into(),
        }
    }

    /// A configuration error about one key of one account.
    pub fn account_key(account: &str, key: &str, message: impl Into<String>) -> Self {
        Error::config(
            ConfigLocation {
                account: Some(account.to_string()),
                key: Some(key.to_string()),
                ..Default::default()
            },
            message,
        )
    }

    /// A configuration error at a file and line.
    pub fn at_line(file: &str, line: usize, message: impl Into<String>) -> Self {
        Error::config(
            ConfigLocation {
                file: Some(file.to_string()),
                line: Some(line),
                ..Default::default()
            },
            message,
        )
    }

    pub fn message(message: impl Into<String>) -> Self {
        Error::Message(message.into())
    }

    pub fn auth(account: &str, message: impl Into<String>) -> Self {
        Error::Auth {
            account: account.to_string(),
            message: message.into(),
        }
    }

    pub fn mailbox(account: &str, server: &str, message: impl Into<String>) -> Self {
        Error::Mailbox(MailboxFailure {
            account: account.to_string(),
            server: server.to_string(),
            message: message.into(),
        })
    }

    pub fn transport(
        account: &str,
        server: &str,
        code: Option<u16>,
        transient: bool,
        message: impl Into<String>,
    ) -> Self {
        Error::Transport(TransportFailure {
            account: account.to_string(),
            server: server.to_string(),
            code,
            transient,
            message: message.into(),
        })
    }
}
