//! From raw key/value settings (the INI's `email.*` keys or one tenant row) to an [`Account`].
//! The INI master and the tenant rows go through the same checks, so the same mistake gives the
//! same message wherever it is made; only the location differs (file:line and `email.KEY` for
//! the INI, `account <RECID>` and `KEY` for a row).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::account::*;
use super::AccountDefaults;
use crate::error::{ConfigLocation, Error, Result};

/// One raw value and where it came from.
#[derive(Clone)]
pub(crate) struct Field {
    pub value: String,
    pub location: ConfigLocation,
    /// INI only: a PHP constant the value depends on (see `ini::IniValue::constant`).
    pub constant: Option<String>,
}

/// The raw settings of one account, by canonical (upper-case, unprefixed) key.
pub(crate) struct Fields {
    map: HashMap<String, Field>,
    /// Where a missing key is reported: the section header or the account.
    base: ConfigLocation,
    /// How keys are spelled in messages: `email.` for the INI, nothing for rows.
    prefix: &'static str,
}

impl Fields {
    pub fn new(base: ConfigLocation, prefix: &'static str) -> Fields {
        Fields {
            map: HashMap::new(),
            base,
            prefix,
        }
    }

    pub fn insert(&mut self, key: &str, field: Field) {
        self.map.insert(key.to_string(), field);
    }

    pub fn remove(&mut self, key: &str) {
        self.map.remove(key);
    }

    /// The value as written (not trimmed); `None` when absent or empty.
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.map
            .get(key)
            .map(|f| f.value.as_str())
            .filter(|v| !v.is_empty())
    }

    /// The trimmed value; `None` when absent or blank.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.raw(key).map(str::trim).filter(|v| !v.is_empty())
    }

    /// Where `key` is (its own line, or the section/account when it is missing).
    pub fn location(&self, key: &str) -> ConfigLocation {
        match self.map.get(key) {
            Some(field) => field.location.clone(),
            None => ConfigLocation {
                key: Some(format!("{}{key}", self.prefix)),
                ..self.base.clone()
            },
        }
    }

    pub fn err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(self.location(key), message)
    }

    pub fn required(&self, key: &str, what: &str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| self.err(key, format!("{}{key} is required {what}", self.prefix)))
    }

    pub fn port(&self, key: &str) -> Result<Option<u16>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_port(v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("`{v}` is not a port number (1 to 65535)"))),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => parse_bool(v).map(Some).ok_or_else(|| {
                self.err(
                    key,
                    format!(
                        "`{}` is not a boolean (true/false, on/off, yes/no, 1/0)",
                        v.trim()
                    ),
                )
            }),
        }
    }

    /// A whole number in `min..=max`.
    pub fn number(&self, key: &str, min: u64, max: u64, unit: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .map(Some)
                .ok_or_else(|| {
                    self.err(
                        key,
                        format!("`{v}` is not a whole number of {unit} from {min} to {max}"),
                    )
                }),
        }
    }

    /// A byte size: a number with an optional K, M or G suffix (powers of 1024).
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let upper = v.to_ascii_uppercase();
        let upper = upper.trim_end_matches('B').trim_end_matches('I');
        let (digits, factor) = match upper.chars().last() {
            Some('K') => (&upper[..upper.len() - 1], 1u64 << 10),
            Some('M') => (&upper[..upper.len() - 1], 1 << 20),
            Some('G') => (&upper[..upper.len() - 1], 1 << 30),
            _ => (upper, 1),
        };
        digits
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .filter(|n| *n >= 1024)
            .map(Some)
            .ok_or_else(|| {
                self.err(
                    key,
                    format!(
                        "`{v}` is not a size of at least 1K (bytes, or a number with K, M or G)"
                    ),
                )
            })
    }

    /// A path, resolved against `base_dir` when relative. A value built on a PHP constant
    /// (`APPLICATION_PATH "/x"`) is refused: we cannot know the constant's value.
    pub fn path(&self, key: &str, base_dir: &Path) -> Result<Option<PathBuf>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        if let Some(constant) = self.map.get(key).and_then(|f| f.constant.as_deref()) {
            return Err(self.err(
                key,
                format!(
                    "uses the PHP constant {constant}, which the email extension cannot \
                     resolve; write the path itself (relative paths are relative to the INI \
                     file's directory)"
                ),
            ));
        }
        if v.contains('\0') {
            return Err(self.err(key, "the path contains a NUL character"));
        }
        Ok(Some(resolve(base_dir, v)))
    }

    /// A single-line text value (no control characters).
    pub fn line(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            Some(v) if v.chars().any(char::is_control) => {
                Err(self.err(key, "contains a line break or control character"))
            }
            other => Ok(other),
        }
    }
}

/// `value` as a path, relative to `base_dir` unless absolute.
pub(crate) fn resolve(base_dir: &Path, value: &str) -> PathBuf {
    let path = Path::new(value);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

/// The keys an account (INI or row) may set, with [`INCOMING_KEYS`]; others are ignored.
pub(crate) const GENERAL_KEYS: &[&str] = &[
    "TENANTS_RECID",
    "ACCOUNT_TYPE",
    "EMAIL",
    "DISPLAY_NAME",
    "LOGIN",
    "PASSWORD",
    "OUTGOING_TRANSPORT_TYPE",
    "OUTGOING_HOST",
    "OUTGOING_PORT",
    "OUTGOING_SSL",
    "SYSADMIN",
    "FILE_PATH",
    "SENDMAIL_PATH",
    "TIMEOUT",
    "VERIFY_CERT",
    "CA_FILE",
    "AUTH_TYPE",
];

/// The OAuth keys (`OAUTH` array of a tenant row, `email.OAUTH.*` in the INI).
pub(crate) const OAUTH_KEYS: &[&str] = &[
    "OAUTH.GRANT",
    "OAUTH.PROVIDER",
    "OAUTH.APPLICATION_ID",
    "OAUTH.SECRET_KEY",
    "OAUTH.AUTHORITY_URL",
    "OAUTH.AUTHORIZATION_ENDPOINT",
    "OAUTH.TOKEN_ENDPOINT",
    "OAUTH.SCOPES",
    "OAUTH.SERVICE_ACCOUNT_JSON",
    "OAUTH.IMPERSONATE",
    "OAUTH.API_BASE_URL",
];

/// The keys that only matter for receiving (dropped from a Default account, which never
/// receives).
pub(crate) const INCOMING_KEYS: &[&str] = &[
    "INCOMING_MAILBOX_TYPE",
    "INCOMING_HOST",
    "INCOMING_PORT",
    "INCOMING_SSL",
    "INCOMING_PATH",
    "INCOMING_FOLDER",
    "PROCESSED_ACTION",
    "MAX_MESSAGES",
    "MAX_MESSAGE_BYTES",
];

/// The operational keys: an account's own, and (in the INI) the defaults of every account
/// (see `operational`).
pub(crate) const OPERATIONAL_KEYS: &[&str] = &[
    "FILE_PATH",
    "SENDMAIL_PATH",
    "TIMEOUT",
    "VERIFY_CERT",
    "CA_FILE",
    "INCOMING_FOLDER",
    "PROCESSED_ACTION",
    "MAX_MESSAGES",
    "MAX_MESSAGE_BYTES",
];

/// The keys read as booleans: for these an explicit false must not turn into "not set".
pub(crate) const BOOLEAN_KEYS: &[&str] = &["VERIFY_CERT"];

pub(crate) const MAX_TIMEOUT_SECS: u64 = 3600;
pub(crate) const MAX_MESSAGES_LIMIT: u64 = 100_000;

/// The operational settings of one account: its own values, else `fallback`'s.
pub(crate) fn operational(
    f: &Fields,
    fallback: &AccountDefaults,
    base_dir: &Path,
) -> Result<AccountDefaults> {
    let file_path = f
        .path("FILE_PATH", base_dir)?
        .unwrap_or_else(|| fallback.file_path.clone());
    let sendmail_path = match f.get("SENDMAIL_PATH") {
        None => fallback.sendmail_path.clone(),
        Some(v) => {
            if v.chars().any(|c| c.is_whitespace() || c.is_control()) && !Path::new(v).is_file() {
                return Err(f.err(
                    "SENDMAIL_PATH",
                    "must be the sendmail program's path only, without options",
                ));
            }
            if v.contains('/') {
                f.path("SENDMAIL_PATH", base_dir)?.expect("non-empty")
            } else {
                // A bare program name is looked up in PATH.
                PathBuf::from(v)
            }
        }
    };
    let timeout = f
        .number("TIMEOUT", 1, MAX_TIMEOUT_SECS, "seconds")?
        .map(Duration::from_secs)
        .unwrap_or(fallback.timeout);
    let incoming_folder = f
        .line("INCOMING_FOLDER")?
        .map(str::to_string)
        .unwrap_or_else(|| fallback.incoming_folder.clone());
    let processed_action = match f.get("PROCESSED_ACTION") {
        None => fallback.processed_action.clone(),
        Some(v) => ProcessedAction::parse(v).ok_or_else(|| {
            f.err(
                "PROCESSED_ACTION",
                format!("`{v}` is not seen, delete or move:<folder>"),
            )
        })?,
    };
    let max_messages = f
        .number("MAX_MESSAGES", 1, MAX_MESSAGES_LIMIT, "messages")?
        .map(|n| n as usize)
        .unwrap_or(fallback.max_messages);
    let max_message_bytes = f
        .size("MAX_MESSAGE_BYTES")?
        .unwrap_or(fallback.max_message_bytes);
    let verify_cert = f.bool("VERIFY_CERT")?.unwrap_or(fallback.tls.verify_cert);
    let ca_file = match f.path("CA_FILE", base_dir)? {
        None => fallback.tls.ca_file.clone(),
        Some(path) => {
            // Read through (bounded) rather than only looked at: a path that reports size 0
            // but never ends (`/proc/self/pagemap`) must not reach the TLS setup.
            if let Err(e) = super::files::check_limited(&path, super::files::CA_FILE_LIMIT) {
                let problem = match e.io_kind() {
                    Some(std::io::ErrorKind::NotFound) => "does not exist or is not a file".into(),
                    _ => format!("cannot be used: {e}"),
                };
                return Err(f.err(
                    "CA_FILE",
                    format!("the CA file {} {problem}", path.display()),
                ));
            }
            Some(path)
        }
    };
    Ok(AccountDefaults {
        file_path,
        sendmail_path,
        timeout,
        incoming_folder,
        processed_action,
        max_messages,
        max_message_bytes,
        tls: TlsSettings {
            verify_cert,
            ca_file,
        },
    })
}

/// Who the account is, decided by the caller (INI or row).
pub(crate) struct Identity {
    pub id: AccountId,
    pub account_type: AccountType,
    pub tenants_recid: i64,
    /// OFFICE365 / GMAIL are allowed (tenant rows only).
    pub allow_cloud: bool,
}

/// Turns a password or secret as stored into its usable value (decrypting `ENC:v1:`).
pub(crate) type Reveal<'a> = dyn FnMut(&str, &str, ConfigLocation) -> Result<Secret> + 'a;

/// Builds and checks one account. `reveal(value, key, location)` turns a stored secret into its
/// usable value.
pub(crate) fn build_account(
    f: &Fields,
    who: Identity,
    ops: AccountDefaults,
    oauth: Option<OAuthSettings>,
    base_dir: &Path,
    reveal: &mut Reveal<'_>,
) -> Result<Account> {
    let email = f.required("EMAIL", "(the account's address, used as From)")?;
    if let Some(problem) = address_problem(email) {
        return Err(f.err("EMAIL", format!("`{}` {problem}", printable(email))));
    }
    let display_name = f.line("DISPLAY_NAME")?.map(str::to_string);
    let login = f.line("LOGIN")?.map(str::to_string);
    let password = match f.raw("PASSWORD") {
        None => None,
        Some(stored) => {
            let secret = reveal(stored, "PASSWORD", f.location("PASSWORD"))?;
            if secret
                .expose()
                .chars()
                .any(|c| matches!(c, '\r' | '\n' | '\0'))
            {
                return Err(f.err(
                    "PASSWORD",
                    "the password contains a line break or NUL character",
                ));
            }
            (!secret.is_empty()).then_some(secret)
        }
    };
    let sysadmin = match f.line("SYSADMIN")? {
        None => None,
        Some(list) => {
            for part in list.split(',').map(str::trim) {
                if let Some(problem) = address_problem(part) {
                    return Err(f.err("SYSADMIN", format!("`{}` {problem}", printable(part))));
                }
            }
            Some(list.to_string())
        }
    };

    let outgoing = match TRANSPORT_TYPE.read(f, who.allow_cloud)? {
        None => None,
        Some(transport) => {
            let ssl = ssl_mode(f, "OUTGOING_SSL")?;
            // A port where the transport uses none (`0`, `''` or anything else the product
            // stores there) is ignored.
            let port = if transport.uses_port() {
                f.port("OUTGOING_PORT")?
            } else {
                None
            };
            let host = if transport == TransportType::Smtp {
                Some(host(f, "OUTGOING_HOST", "for SMTP")?)
            } else {
                None
            };
            Some(Outgoing {
                transport,
                host,
                port: port.unwrap_or_else(|| Outgoing::default_port(transport, ssl)),
                ssl,
            })
        }
    };

    let incoming = match MAILBOX_TYPE.read(f, who.allow_cloud)? {
        None => None,
        Some(mailbox) => {
            let ssl = ssl_mode(f, "INCOMING_SSL")?;
            let port = if mailbox.uses_port() {
                f.port("INCOMING_PORT")?
            } else {
                None
            };
            let host = match mailbox {
                MailboxType::Imap => Some(host(f, "INCOMING_HOST", "for IMAP")?),
                MailboxType::Pop3 => Some(host(f, "INCOMING_HOST", "for POP3")?),
                _ => None,
            };
            let path = match mailbox {
                MailboxType::Maildir | MailboxType::Mbox => {
                    let what = match mailbox {
                        MailboxType::Maildir => "for MAILDIR (the Maildir directory)",
                        _ => "for MBOX (the mbox file)",
                    };
                    f.required("INCOMING_PATH", what)?;
                    f.path("INCOMING_PATH", base_dir)?
                }
                _ => None,
            };
            Some(Incoming {
                mailbox,
                host,
                port: port.unwrap_or_else(|| Incoming::default_port(mailbox, ssl)),
                ssl,
                folder: ops.incoming_folder.clone(),
                path,
                processed_action: ops.processed_action.clone(),
                max_messages: ops.max_messages,
                max_message_bytes: ops.max_message_bytes,
            })
        }
    };

    let auth_type = match f.get("AUTH_TYPE") {
        None => AuthType::Password,
        Some(v) => AuthType::parse(v).ok_or_else(|| {
            f.err(
                "AUTH_TYPE",
                format!(
                    "`{}` is not an authentication type (PASSWORD or XOAUTH2)",
                    printable(v)
                ),
            )
        })?,
    };
    if auth_type == AuthType::XOAuth2 {
        check_xoauth2(f, &outgoing, &incoming, oauth.as_ref(), who.allow_cloud)?;
    }
    let uses_cloud = outgoing.as_ref().is_some_and(|o| o.transport.is_cloud())
        || incoming.as_ref().is_some_and(|i| i.mailbox.is_cloud());
    if uses_cloud {
        check_oauth(f, &outgoing, &incoming, oauth.as_ref())?;
    }

    Ok(Account {
        id: who.id,
        tenants_recid: who.tenants_recid,
        account_type: who.account_type,
        email: email.to_string(),
        display_name,
        login,
        password,
        outgoing,
        incoming,
        sysadmin,
        tls: ops.tls,
        file_path: ops.file_path,
        sendmail_path: ops.sendmail_path,
        timeout: ops.timeout,
        auth_type,
        oauth,
    })
}

/// `AUTH_TYPE = XOAUTH2`: an SMTP, IMAP or POP3 side to sign in to, and OAuth settings that can
/// give a token without a person (the INI) or with the tenant's sign-in.
fn check_xoauth2(
    f: &Fields,
    outgoing: &Option<Outgoing>,
    incoming: &Option<Incoming>,
    oauth: Option<&OAuthSettings>,
    tenant_row: bool,
) -> Result<()> {
    let sasl = outgoing
        .as_ref()
        .is_some_and(|o| o.transport == TransportType::Smtp)
        || incoming
            .as_ref()
            .is_some_and(|i| matches!(i.mailbox, MailboxType::Imap | MailboxType::Pop3));
    if !sasl {
        return Err(f.err(
            "AUTH_TYPE",
            "XOAUTH2 applies to SMTP, IMAP and POP3, and the account uses none of them",
        ));
    }
    let Some(oauth) = oauth else {
        return Err(f.err(
            "OAUTH",
            "XOAUTH2 needs the account's OAuth settings (OAUTH.GRANT, OAUTH.APPLICATION_ID, \
             OAUTH.SECRET_KEY, ...)",
        ));
    };
    match oauth.grant {
        OAuthGrant::ClientCredentials => {
            if oauth.application_id.trim().is_empty() {
                return Err(f.err(
                    "OAUTH.APPLICATION_ID",
                    "client_credentials needs the application (client) ID",
                ));
            }
            if oauth.secret_key.is_none() {
                return Err(f.err(
                    "OAUTH.SECRET_KEY",
                    "client_credentials needs the application's client secret",
                ));
            }
            app_only_authority(f, oauth)?;
        }
        OAuthGrant::ServiceAccount => {
            if oauth.service_account_json.is_none() {
                return Err(f.err(
                    "OAUTH.SERVICE_ACCOUNT_JSON",
                    "service_account needs the service account's key (its JSON, or the path of \
                     the key file)",
                ));
            }
        }
        OAuthGrant::AuthorizationCode => {
            if !tenant_row {
                return Err(f.err(
                    "OAUTH.GRANT",
                    "authorization_code needs a person to sign in on a tenant account's OAuth2 \
                     tab; in the INI use client_credentials (Microsoft 365) or service_account \
                     (Google Workspace)",
                ));
            }
            if oauth.application_id.trim().is_empty() {
                return Err(f.err(
                    "OAUTH.APPLICATION_ID",
                    "authorization_code needs the application (client) ID",
                ));
            }
        }
    }
    Ok(())
}

/// OUTGOING_TRANSPORT_TYPE or INCOMING_MAILBOX_TYPE: a list of types, of which the cloud ones
/// (OFFICE365, GMAIL) belong to tenant accounts only.
struct KindSetting<T> {
    key: &'static str,
    /// What the setting names, for messages.
    what: &'static str,
    /// The types it takes without / with the cloud ones, for messages.
    expected: [&'static str; 2],
    parse: fn(&str) -> Option<T>,
    name: fn(T) -> &'static str,
    is_cloud: fn(T) -> bool,
}

const TRANSPORT_TYPE: KindSetting<TransportType> = KindSetting {
    key: "OUTGOING_TRANSPORT_TYPE",
    what: "outgoing transport",
    expected: [
        "FILE, SENDMAIL or SMTP",
        "FILE, SENDMAIL, SMTP, OFFICE365 or GMAIL",
    ],
    parse: TransportType::parse,
    name: TransportType::as_str,
    is_cloud: TransportType::is_cloud,
};

const MAILBOX_TYPE: KindSetting<MailboxType> = KindSetting {
    key: "INCOMING_MAILBOX_TYPE",
    what: "incoming mailbox",
    expected: [
        "IMAP, POP3, MAILDIR or MBOX",
        "IMAP, POP3, MAILDIR, MBOX, OFFICE365 or GMAIL",
    ],
    parse: MailboxType::parse,
    name: MailboxType::as_str,
    is_cloud: MailboxType::is_cloud,
};

impl<T: Copy> KindSetting<T> {
    /// The type the setting names, if it is set: a known one, and a cloud one only where
    /// `allow_cloud` (tenant rows).
    fn read(&self, f: &Fields, allow_cloud: bool) -> Result<Option<T>> {
        let Some(value) = f.get(self.key) else {
            return Ok(None);
        };
        let kind = (self.parse)(value).ok_or_else(|| {
            f.err(
                self.key,
                format!(
                    "unknown {} type `{}` (expected {})",
                    self.what,
                    printable(value),
                    self.expected[usize::from(allow_cloud)]
                ),
            )
        })?;
        if (self.is_cloud)(kind) && !allow_cloud {
            return Err(f.err(
                self.key,
                format!(
                    "{} can only be configured on a tenant email account, not in the INI file",
                    (self.name)(kind)
                ),
            ));
        }
        Ok(Some(kind))
    }
}

fn ssl_mode(f: &Fields, key: &str) -> Result<SslMode> {
    let value = f.get(key).unwrap_or("");
    SslMode::parse(value).ok_or_else(|| {
        f.err(
            key,
            format!(
                "`{}` is not an SSL setting (expected SSL, TLS or empty, or a boolean: \
                 true/1/yes/on = SSL, false/0/no/off = none)",
                printable(value)
            ),
        )
    })
}

fn host(f: &Fields, key: &str, what: &str) -> Result<String> {
    let value = f.required(key, what)?;
    if let Some(problem) = host_problem(value) {
        return Err(f.err(key, format!("`{}` {problem}", printable(value))));
    }
    Ok(value.to_string())
}

fn check_oauth(
    f: &Fields,
    outgoing: &Option<Outgoing>,
    incoming: &Option<Incoming>,
    oauth: Option<&OAuthSettings>,
) -> Result<()> {
    let office = outgoing
        .as_ref()
        .is_some_and(|o| o.transport == TransportType::Office365)
        || incoming
            .as_ref()
            .is_some_and(|i| i.mailbox == MailboxType::Office365);
    let gmail = outgoing
        .as_ref()
        .is_some_and(|o| o.transport == TransportType::Gmail)
        || incoming
            .as_ref()
            .is_some_and(|i| i.mailbox == MailboxType::Gmail);
    let name = if office { "OFFICE365" } else { "GMAIL" };
    let Some(oauth) = oauth else {
        return Err(f.err(
            "OAUTH",
            format!("{name} needs the account's OAuth2 settings (OAUTH.APPLICATION_ID, ...)"),
        ));
    };
    if office && gmail {
        return Err(f.err(
            "OAUTH",
            "one account cannot use both OFFICE365 and GMAIL (they need different OAuth2 settings)",
        ));
    }
    let service_account = gmail && oauth.service_account_json.is_some();
    if service_account && oauth.impersonate.is_none() {
        return Err(f.err(
            "OAUTH.IMPERSONATE",
            "a Gmail service account needs IMPERSONATE (the mailbox it acts as)",
        ));
    }
    if !service_account && oauth.application_id.is_empty() {
        return Err(f.err(
            "OAUTH.APPLICATION_ID",
            format!("{name} needs the OAuth2 application (client) id"),
        ));
    }
    if office && oauth.grant == OAuthGrant::ClientCredentials {
        app_only_authority(f, oauth)?;
    }
    Ok(())
}

/// Microsoft issues app-only tokens only from the organisation's own tenant, never from
/// `common`, the default authority: a client_credentials account must name it.
fn app_only_authority(f: &Fields, oauth: &OAuthSettings) -> Result<()> {
    let token = oauth.token_endpoint.trim();
    let absolute = token.starts_with("https://") || token.starts_with("http://");
    if oauth.authority_url.trim().is_empty() && !absolute {
        return Err(f.err(
            "OAUTH.AUTHORITY_URL",
            "client_credentials needs the organisation's authority, \
             https://login.microsoftonline.com/<tenant id> (Microsoft refuses app-only tokens \
             from the default 'common')",
        ));
    }
    Ok(())
}

/// A value fit to be quoted in a message: at most 60 characters, control characters escaped.
/// Only ever used for non-secret values (types, hosts, ports, addresses).
pub(crate) fn printable(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars().take(60) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if value.chars().count() > 60 {
        out.push('…');
    }
    out
}
