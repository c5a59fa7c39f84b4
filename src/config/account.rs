//! The one normalised account shape, for the INI master and the tenant rows PHP hands over.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A password, client secret, token or key. Never printed: `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The clear value, for the one place that hands it to a server.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `master` for the INI account, else the tenant row's RECID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccountId {
    Master,
    Tenant(i64),
}

/// As the PHP arrays give it: `'master'`, or the tenant RECID as an int.
impl serde::Serialize for AccountId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            AccountId::Master => serializer.serialize_str("master"),
            AccountId::Tenant(id) => serializer.serialize_i64(*id),
        }
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountId::Master => f.write_str("master"),
            AccountId::Tenant(id) => write!(f, "{id}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountType {
    /// The INI account (one per application).
    Master,
    /// Tenant Default: sends everything but SD threads, never receives.
    Default,
    /// Tenant Service Desk: sends and receives Service Desk mail.
    ServiceDesk,
}

impl AccountType {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountType::Master => "master",
            AccountType::Default => "default",
            AccountType::ServiceDesk => "service_desk",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportType {
    File,
    Sendmail,
    Smtp,
    Office365,
    Gmail,
}

impl TransportType {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportType::File => "FILE",
            TransportType::Sendmail => "SENDMAIL",
            TransportType::Smtp => "SMTP",
            TransportType::Office365 => "OFFICE365",
            TransportType::Gmail => "GMAIL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MailboxType {
    Imap,
    Pop3,
    Maildir,
    Mbox,
    Office365,
    Gmail,
}

impl MailboxType {
    pub fn as_str(self) -> &'static str {
        match self {
            MailboxType::Imap => "IMAP",
            MailboxType::Pop3 => "POP3",
            MailboxType::Maildir => "MAILDIR",
            MailboxType::Mbox => "MBOX",
            MailboxType::Office365 => "OFFICE365",
            MailboxType::Gmail => "GMAIL",
        }
    }
}

/// `SSL` = implicit TLS, `TLS` = STARTTLS (required), `""` = none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SslMode {
    None,
    Ssl,
    StartTls,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::None => "",
            SslMode::Ssl => "SSL",
            SslMode::StartTls => "TLS",
        }
    }
}

/// What happens to a message in its mailbox once the host accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProcessedAction {
    Seen,
    Delete,
    Move(String),
}

/// Certificate checking for one account's servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `VERIFY_CERT` (default true).
    pub verify_cert: bool,
    /// `CA_FILE`: a PEM file of extra trusted CAs.
    pub ca_file: Option<PathBuf>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            verify_cert: true,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub transport: TransportType,
    /// SMTP only (required there).
    pub host: Option<String>,
    /// SMTP: defaults to 465 for SSL, 587 for TLS, 25 otherwise.
    pub port: u16,
    pub ssl: SslMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub mailbox: MailboxType,
    /// IMAP / POP3 only (required there).
    pub host: Option<String>,
    /// IMAP: 993 for SSL, 143 otherwise; POP3: 995 for SSL, 110 otherwise.
    pub port: u16,
    pub ssl: SslMode,
    /// `INCOMING_FOLDER` (IMAP folder, Graph folder, Gmail label), default INBOX.
    pub folder: String,
    /// `INCOMING_PATH` for MAILDIR (the Maildir directory) and MBOX (the mbox file).
    pub path: Option<PathBuf>,
    pub processed_action: ProcessedAction,
    pub max_messages: usize,
    pub max_message_bytes: u64,
}

/// How an SMTP, IMAP or POP3 account signs in (`AUTH_TYPE`, SPEC §3a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthType {
    /// `LOGIN` and `PASSWORD` (the default).
    #[default]
    Password,
    /// SASL XOAUTH2 (or OAUTHBEARER) with an OAuth 2.0 access token from the account's
    /// `OAUTH` settings; no password.
    XOAuth2,
}

impl AuthType {
    pub fn parse(s: &str) -> Option<AuthType> {
        match s.trim().to_ascii_uppercase().as_str() {
            "" | "PASSWORD" => Some(AuthType::Password),
            "XOAUTH2" | "OAUTH2" | "OAUTH" => Some(AuthType::XOAuth2),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::Password => "PASSWORD",
            AuthType::XOAuth2 => "XOAUTH2",
        }
    }
}

/// How an account obtains its access tokens (`OAUTH.GRANT`, SPEC §3a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OAuthGrant {
    /// Delegated sign-in ("Click to Authenticate"), then refresh tokens. Tenant rows only.
    #[default]
    AuthorizationCode,
    /// Microsoft app-only access with a client secret: no sign-in step.
    ClientCredentials,
    /// A Google service account's signed JWT, impersonating `IMPERSONATE`.
    ServiceAccount,
}

impl OAuthGrant {
    pub fn parse(s: &str) -> Option<OAuthGrant> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "authorization_code" => Some(OAuthGrant::AuthorizationCode),
            "client_credentials" => Some(OAuthGrant::ClientCredentials),
            "service_account" => Some(OAuthGrant::ServiceAccount),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OAuthGrant::AuthorizationCode => "authorization_code",
            OAuthGrant::ClientCredentials => "client_credentials",
            OAuthGrant::ServiceAccount => "service_account",
        }
    }
}

/// The OAuth 2.0 settings of an account (the OAuth2 tab of a tenant account, `email.OAUTH.*`
/// in the INI).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OAuthSettings {
    /// `GRANT`; a Gmail account with `SERVICE_ACCOUNT_JSON` is `ServiceAccount` whatever it
    /// says.
    pub grant: OAuthGrant,
    /// `PROVIDER` (ours: `microsoft` or `google`), for SMTP/IMAP/POP3 accounts whose provider
    /// the grant and endpoints do not tell; `None` when not given.
    pub provider: Option<String>,
    pub application_id: String,
    pub secret_key: Option<Secret>,
    pub authority_url: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub scopes: Vec<String>,
    /// Gmail service accounts: the key file's JSON (already read if a path was given).
    pub service_account_json: Option<Secret>,
    pub impersonate: Option<String>,
    /// `API_BASE_URL`: Graph (`https://graph.microsoft.com/v1.0`) or Gmail
    /// (`https://gmail.googleapis.com`) base; configurable so tests reach local emulators.
    pub api_base_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub tenants_recid: i64,
    pub account_type: AccountType,
    /// The From address.
    pub email: String,
    pub display_name: Option<String>,
    /// One username for incoming and outgoing; defaults to `email`.
    pub login: Option<String>,
    /// Already decrypted when it was stored as `ENC:v1:`.
    pub password: Option<Secret>,
    pub outgoing: Option<Outgoing>,
    pub incoming: Option<Incoming>,
    pub sysadmin: Option<String>,
    pub tls: TlsSettings,
    /// FILE transport directory.
    pub file_path: PathBuf,
    pub sendmail_path: PathBuf,
    /// Connect and read timeout for every server of this account.
    pub timeout: Duration,
    /// `AUTH_TYPE` of its SMTP / IMAP / POP3 side.
    pub auth_type: AuthType,
    pub oauth: Option<OAuthSettings>,
}

impl Account {
    /// True for an OFFICE365 or GMAIL account (sending or receiving through an API that signs
    /// in with OAuth2), as opposed to SMTP/IMAP/POP3, which may use XOAUTH2 over SASL.
    pub fn is_cloud(&self) -> bool {
        self.outgoing
            .as_ref()
            .is_some_and(|o| o.transport.is_cloud())
            || self.incoming.as_ref().is_some_and(|i| i.mailbox.is_cloud())
    }

    /// The username to log in with: `LOGIN`, else `EMAIL`.
    pub fn login_name(&self) -> &str {
        self.login.as_deref().unwrap_or(&self.email)
    }

    /// The account as the public API shows it (`resolveAccount()`, `checkAccount()`): no
    /// password, no secret, no token.
    pub fn public(&self) -> PublicAccount {
        PublicAccount {
            recid: self.id.clone(),
            tenants_recid: self.tenants_recid,
            account_type: self.account_type.as_str(),
            email: self.email.clone(),
            display_name: self.display_name.clone(),
            login: self.login_name().to_string(),
            sysadmin: self.sysadmin.clone(),
            verify_cert: self.tls.verify_cert,
            outgoing: self.outgoing.as_ref().map(|o| PublicOutgoing {
                transport: o.transport.as_str(),
                host: o.host.clone(),
                port: o.port,
                ssl: o.ssl.as_str(),
            }),
            incoming: self.incoming.as_ref().map(|i| PublicIncoming {
                mailbox: i.mailbox.as_str(),
                host: i.host.clone(),
                port: i.port,
                ssl: i.ssl.as_str(),
                folder: i.folder.clone(),
                path: i.path.as_ref().map(|p| p.display().to_string()),
            }),
        }
    }

    /// [`Account::public`] as JSON.
    pub fn public_view(&self) -> serde_json::Value {
        serde_json::to_value(self.public()).unwrap_or_default()
    }
}

/// An account as the public API shows it: the row's keys, without any secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PublicAccount {
    /// `'master'` or the tenant RECID (an int).
    #[serde(rename = "RECID")]
    pub recid: AccountId,
    #[serde(rename = "TENANTS_RECID")]
    pub tenants_recid: i64,
    #[serde(rename = "ACCOUNT_TYPE")]
    pub account_type: &'static str,
    #[serde(rename = "EMAIL")]
    pub email: String,
    #[serde(rename = "DISPLAY_NAME")]
    pub display_name: Option<String>,
    /// `LOGIN`, else `EMAIL`.
    #[serde(rename = "LOGIN")]
    pub login: String,
    #[serde(rename = "SYSADMIN")]
    pub sysadmin: Option<String>,
    #[serde(rename = "VERIFY_CERT")]
    pub verify_cert: bool,
    /// The `OUTGOING_*` keys; absent when the account does not send.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<PublicOutgoing>,
    /// The `INCOMING_*` keys; absent when the account does not receive.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<PublicIncoming>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PublicOutgoing {
    #[serde(rename = "OUTGOING_TRANSPORT_TYPE")]
    pub transport: &'static str,
    #[serde(rename = "OUTGOING_HOST")]
    pub host: Option<String>,
    #[serde(rename = "OUTGOING_PORT")]
    pub port: u16,
    #[serde(rename = "OUTGOING_SSL")]
    pub ssl: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PublicIncoming {
    #[serde(rename = "INCOMING_MAILBOX_TYPE")]
    pub mailbox: &'static str,
    #[serde(rename = "INCOMING_HOST")]
    pub host: Option<String>,
    #[serde(rename = "INCOMING_PORT")]
    pub port: u16,
    #[serde(rename = "INCOMING_SSL")]
    pub ssl: &'static str,
    #[serde(rename = "INCOMING_FOLDER")]
    pub folder: String,
    #[serde(rename = "INCOMING_PATH")]
    pub path: Option<String>,
}

// ----- Parsing and defaults (used by the INI reader and the tenant rows) -----

impl AccountType {
    /// `default` / `service_desk` (also `Default`, `Service Desk`, `servicedesk`) and `master`,
    /// case-insensitively.
    pub fn parse(value: &str) -> Option<AccountType> {
        let norm: String = value
            .trim()
            .chars()
            .filter(|c| !matches!(c, ' ' | '_' | '-'))
            .collect::<String>()
            .to_ascii_lowercase();
        match norm.as_str() {
            "master" | "masterdefault" => Some(AccountType::Master),
            "default" | "tenantdefault" => Some(AccountType::Default),
            "servicedesk" | "sd" => Some(AccountType::ServiceDesk),
            _ => None,
        }
    }
}

impl TransportType {
    /// `FILE`, `SENDMAIL`, `SMTP`, `OFFICE365`, `GMAIL`, case-insensitively.
    pub fn parse(value: &str) -> Option<TransportType> {
        match value.trim().to_ascii_uppercase().as_str() {
            "FILE" => Some(TransportType::File),
            "SENDMAIL" => Some(TransportType::Sendmail),
            "SMTP" => Some(TransportType::Smtp),
            "OFFICE365" | "O365" => Some(TransportType::Office365),
            "GMAIL" => Some(TransportType::Gmail),
            _ => None,
        }
    }

    /// OFFICE365 and GMAIL: OAuth, tenant accounts only.
    pub fn is_cloud(self) -> bool {
        matches!(self, TransportType::Office365 | TransportType::Gmail)
    }

    /// Whether `OUTGOING_PORT` means anything: SMTP only (FILE and SENDMAIL use no server,
    /// the cloud APIs their HTTPS base URL).
    pub fn uses_port(self) -> bool {
        matches!(self, TransportType::Smtp)
    }
}

impl MailboxType {
    /// `IMAP`, `POP3`, `MAILDIR`, `MBOX`, `OFFICE365`, `GMAIL`, case-insensitively.
    pub fn parse(value: &str) -> Option<MailboxType> {
        match value.trim().to_ascii_uppercase().as_str() {
            "IMAP" => Some(MailboxType::Imap),
            "POP3" | "POP" => Some(MailboxType::Pop3),
            "MAILDIR" => Some(MailboxType::Maildir),
            "MBOX" => Some(MailboxType::Mbox),
            "OFFICE365" | "O365" => Some(MailboxType::Office365),
            "GMAIL" => Some(MailboxType::Gmail),
            _ => None,
        }
    }

    /// OFFICE365 and GMAIL: OAuth, tenant accounts only.
    pub fn is_cloud(self) -> bool {
        matches!(self, MailboxType::Office365 | MailboxType::Gmail)
    }

    /// Whether `INCOMING_PORT` means anything: IMAP and POP3 only (the local stores use no
    /// server, the cloud APIs their HTTPS base URL).
    pub fn uses_port(self) -> bool {
        matches!(self, MailboxType::Imap | MailboxType::Pop3)
    }
}

impl SslMode {
    /// `SSL`, `TLS` (also `STARTTLS`) or empty (also `NONE`), case-insensitively; or a boolean
    /// as PCR-360 writes one ("is set if the server supports SSL"): `true/1/yes/on` = `SSL`,
    /// `false/0/off/no` = none. (In the INI a bare `true` reaches here as PHP's `"1"` and a
    /// bare `false` as `""`; a tenant row's boolean the same way.)
    pub fn parse(value: &str) -> Option<SslMode> {
        match value.trim().to_ascii_uppercase().as_str() {
            "" | "NONE" | "0" | "FALSE" | "OFF" | "NO" => Some(SslMode::None),
            "SSL" | "1" | "TRUE" | "ON" | "YES" => Some(SslMode::Ssl),
            "TLS" | "STARTTLS" => Some(SslMode::StartTls),
            _ => None,
        }
    }
}

impl ProcessedAction {
    /// `seen`, `delete` or `move:<folder>` (keyword case-insensitive, folder kept as written).
    pub fn parse(value: &str) -> Option<ProcessedAction> {
        let value = value.trim();
        let lower = value.to_ascii_lowercase();
        match lower.as_str() {
            "seen" => Some(ProcessedAction::Seen),
            "delete" => Some(ProcessedAction::Delete),
            _ if lower.starts_with("move:") => {
                let folder = value[5..].trim();
                (!folder.is_empty() && !folder.chars().any(char::is_control))
                    .then(|| ProcessedAction::Move(folder.to_string()))
            }
            _ => None,
        }
    }

    pub fn as_string(&self) -> String {
        match self {
            ProcessedAction::Seen => "seen".to_string(),
            ProcessedAction::Delete => "delete".to_string(),
            ProcessedAction::Move(folder) => format!("move:{folder}"),
        }
    }
}

impl Outgoing {
    /// SMTP: 465 for SSL, 587 for TLS, 25 otherwise; the cloud APIs 443; FILE/SENDMAIL 0.
    pub fn default_port(transport: TransportType, ssl: SslMode) -> u16 {
        match (transport, ssl) {
            (TransportType::Smtp, SslMode::Ssl) => 465,
            (TransportType::Smtp, SslMode::StartTls) => 587,
            (TransportType::Smtp, SslMode::None) => 25,
            (TransportType::Office365 | TransportType::Gmail, _) => 443,
            (TransportType::File | TransportType::Sendmail, _) => 0,
        }
    }
}

impl Incoming {
    /// IMAP: 993 for SSL, 143 otherwise; POP3: 995 for SSL, 110 otherwise; the cloud APIs
    /// 443; MAILDIR and MBOX 0.
    pub fn default_port(mailbox: MailboxType, ssl: SslMode) -> u16 {
        match (mailbox, ssl) {
            (MailboxType::Imap, SslMode::Ssl) => 993,
            (MailboxType::Imap, _) => 143,
            (MailboxType::Pop3, SslMode::Ssl) => 995,
            (MailboxType::Pop3, _) => 110,
            (MailboxType::Office365 | MailboxType::Gmail, _) => 443,
            (MailboxType::Maildir | MailboxType::Mbox, _) => 0,
        }
    }
}

/// A boolean as PHP configurations write it: `true/false/on/off/yes/no/1/0` (any case) and
/// `""` (false). `None` for anything else.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "" | "0" | "false" | "off" | "no" | "none" | "null" => Some(false),
        _ => None,
    }
}

/// A TCP port, 1..=65535.
pub fn parse_port(value: &str) -> Option<u16> {
    value.trim().parse::<u16>().ok().filter(|p| *p != 0)
}

/// Why `value` is not usable as one email address (`None` when it is). Deliberately simple:
/// one `@`-separated local part and domain, no spaces, no control characters, nothing that
/// would let the value add a header or a recipient.
pub fn address_problem(value: &str) -> Option<&'static str> {
    if value.chars().any(char::is_control) {
        return Some("contains a line break or control character");
    }
    if value
        .chars()
        .any(|c| c.is_whitespace() || "<>,;\"()[]\\".contains(c))
    {
        return Some("is not a plain address (no spaces, <>, commas or quotes)");
    }
    match value.rsplit_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !domain.starts_with('.')
                && !domain.ends_with('.') =>
        {
            None
        }
        _ => Some("is not an email address (expected name@domain)"),
    }
}

/// Why `value` is not usable as a server host name (`None` when it is).
pub fn host_problem(value: &str) -> Option<&'static str> {
    if value.contains("://") {
        return Some("must be a host name only (the encryption goes in the SSL key)");
    }
    if value
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "/\\@".contains(c))
    {
        return Some("is not a host name");
    }
    let bracketed = value.starts_with('[') && value.ends_with(']');
    if value.contains(':') && !bracketed && value.parse::<std::net::Ipv6Addr>().is_err() {
        return Some("must be a host name only (the port goes in the PORT key)");
    }
    None
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn enum_parsers() {
        assert_eq!(
            AccountType::parse("Service Desk"),
            Some(AccountType::ServiceDesk)
        );
        assert_eq!(
            AccountType::parse("service_desk"),
            Some(AccountType::ServiceDesk)
        );
        assert_eq!(AccountType::parse("DEFAULT"), Some(AccountType::Default));
        assert_eq!(AccountType::parse("admin"), None);
        assert_eq!(TransportType::parse(" smtp "), Some(TransportType::Smtp));
        assert_eq!(TransportType::parse("IMAP"), None);
        assert_eq!(MailboxType::parse("Maildir"), Some(MailboxType::Maildir));
        assert_eq!(MailboxType::parse("mbox"), Some(MailboxType::Mbox));
        assert_eq!(MailboxType::parse("EXCHANGE"), None);
        assert_eq!(SslMode::parse(""), Some(SslMode::None));
        assert_eq!(SslMode::parse("tls"), Some(SslMode::StartTls));
        // Booleans as PCR-360 writes them: true = SSL, false = none.
        for yes in ["yes", "1", "TRUE", "on", " On "] {
            assert_eq!(SslMode::parse(yes), Some(SslMode::Ssl), "{yes}");
        }
        for no in ["no", "0", "false", "OFF", "none", ""] {
            assert_eq!(SslMode::parse(no), Some(SslMode::None), "{no}");
        }
        assert_eq!(SslMode::parse("maybe"), None);
        assert_eq!(SslMode::parse("STARTSSL"), None);
        assert!(TransportType::Smtp.uses_port());
        for t in ["FILE", "SENDMAIL", "OFFICE365", "GMAIL"] {
            assert!(!TransportType::parse(t).unwrap().uses_port(), "{t}");
        }
        assert!(MailboxType::Imap.uses_port() && MailboxType::Pop3.uses_port());
        for t in ["MAILDIR", "OFFICE365", "GMAIL"] {
            assert!(!MailboxType::parse(t).unwrap().uses_port(), "{t}");
        }
        assert_eq!(ProcessedAction::parse("SEEN"), Some(ProcessedAction::Seen));
        assert_eq!(
            ProcessedAction::parse("move: Done/PCR "),
            Some(ProcessedAction::Move("Done/PCR".into()))
        );
        assert_eq!(ProcessedAction::parse("move:"), None);
        assert_eq!(ProcessedAction::parse("archive"), None);
        assert_eq!(ProcessedAction::Move("X".into()).as_string(), "move:X");
    }

    #[test]
    fn default_ports() {
        assert_eq!(
            Outgoing::default_port(TransportType::Smtp, SslMode::Ssl),
            465
        );
        assert_eq!(
            Outgoing::default_port(TransportType::Smtp, SslMode::StartTls),
            587
        );
        assert_eq!(
            Outgoing::default_port(TransportType::Smtp, SslMode::None),
            25
        );
        assert_eq!(Incoming::default_port(MailboxType::Imap, SslMode::Ssl), 993);
        assert_eq!(
            Incoming::default_port(MailboxType::Imap, SslMode::StartTls),
            143
        );
        assert_eq!(Incoming::default_port(MailboxType::Pop3, SslMode::Ssl), 995);
        assert_eq!(
            Incoming::default_port(MailboxType::Pop3, SslMode::None),
            110
        );
    }

    #[test]
    fn scalar_parsers() {
        for t in ["1", "true", "On", "YES"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["", "0", "false", "Off", "no"] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        assert_eq!(parse_bool("maybe"), None);
        assert_eq!(parse_port("465"), Some(465));
        assert_eq!(parse_port("0"), None);
        assert_eq!(parse_port("65536"), None);
        assert_eq!(parse_port("-1"), None);
        assert_eq!(parse_port("25a"), None);
        assert_eq!(address_problem("a@b.c"), None);
        assert!(address_problem("a@b.c\r\nBcc: x@y").is_some());
        assert!(address_problem("Name <a@b.c>").is_some());
        assert!(address_problem("a@").is_some());
        assert!(address_problem("ab.c").is_some());
        assert_eq!(host_problem("mail.pcr.com"), None);
        assert_eq!(host_problem("::1"), None);
        assert_eq!(host_problem("127.0.0.1"), None);
        assert!(host_problem("mail.pcr.com:587").is_some());
        assert!(host_problem("ssl://mail.pcr.com").is_some());
        assert!(host_problem("mail pcr").is_some());
    }
}
