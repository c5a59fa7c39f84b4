//! Configuration: the ZF1-style INI file (`ini`), the normalised accounts (`account`) and the
//! encrypted secrets (`secrets`). `Settings::load` is the one entry point the manager uses.

pub mod account;
pub mod dsn;
pub mod files;
pub mod ini;
mod normalise;
mod rows;
pub mod secrets;

pub use account::*;
pub use rows::{account_from_row, accounts_from_rows, tenant_rows, FailedAccount, TenantRows};

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{ConfigLocation, Result};
use normalise::{Field, Fields, Identity};

/// Defaults every account takes when its own row does not say otherwise (the INI's `email.*`
/// values for these keys, or the built-in defaults of SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountDefaults {
    pub file_path: PathBuf,
    pub sendmail_path: PathBuf,
    pub timeout: Duration,
    pub incoming_folder: String,
    pub processed_action: ProcessedAction,
    pub max_messages: usize,
    pub max_message_bytes: u64,
    pub tls: TlsSettings,
}

/// Everything one environment of the INI file says about email.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_file: PathBuf,
    pub environment: String,
    /// `constants.SEND_EMAIL` (default true).
    pub send_email: bool,
    /// `constants.DISABLE_EMAIL` (default false).
    pub disable_email: bool,
    /// The `email.*` account, when the section has one: any of `email.EMAIL`,
    /// `email.OUTGOING_TRANSPORT_TYPE` or `email.INCOMING_MAILBOX_TYPE` is set.
    pub master: Option<Account>,
    /// The `email.*` account when the section has one but it cannot be used (a bad value of
    /// one of its own keys, a password that does not decrypt, ...). Like a broken tenant row
    /// it fails on its own (SPEC §3): every use of it gives its error, the tenant accounts
    /// work as usual, and its mail is never sent through another account. `master` is then
    /// `None`.
    pub master_failed: Option<FailedAccount>,
    /// Notices about how the file reads, for the log (e.g. a quoted `"false"` that PHP, and
    /// so PCR-360, reads as true); each names the file and line.
    pub warnings: Vec<String>,
    pub state_dir: PathBuf,
    /// `email.STATE_DSN`: the state lives in this MariaDB/MySQL database instead of SQLite
    /// under `state_dir`. Every store of these settings is opened with it
    /// (`StateStore::open(&settings.state_dir, settings.state_dsn.as_ref())`).
    pub state_dsn: Option<dsn::Dsn>,
    pub key_file: PathBuf,
    pub log_file: Option<PathBuf>,
    /// `email.SYSADMIN`: alerted when incoming mail cannot be processed.
    pub sysadmin: Option<String>,
    /// `email.SD_NUMBER_PATTERN` (a regex), already checked to compile.
    pub sd_number_pattern: String,
    /// `email.MAILBOX_THREADS`: how many mailboxes a run reads at once (the rest wait for a
    /// free thread), default [`DEFAULT_MAILBOX_THREADS`].
    pub mailbox_threads: usize,
    pub defaults: AccountDefaults,
}

/// `email.MAILBOX_THREADS` default: mailboxes read at once by one run.
pub const DEFAULT_MAILBOX_THREADS: usize = 8;
/// The most `email.MAILBOX_THREADS` may say.
pub const MAX_MAILBOX_THREADS: u64 = 64;

/// The default SD Number pattern: a type prefix, an optional date part (YY up to YYYYMMDD),
/// then a 5-digit sequence, e.g. `SO201700043`.
pub const DEFAULT_SD_NUMBER_PATTERN: &str =
    r"\b(?:IQ|SO|IN|ES|PR|PB|SR|IR|WO|CR|RQ|TK)(?:\d{2}|\d{4}|\d{6}|\d{8})?\d{5}\b";

pub const DEFAULT_CONFIG_FILE: &str = "/var/www/pcr360/configs/pcr360.ini";

pub fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `/usr/sbin/sendmail`, the SENDMAIL transport's default program.
pub const DEFAULT_SENDMAIL_PATH: &str = "/usr/sbin/sendmail";
/// `email.MAX_MESSAGES` default: messages read per mailbox per run.
pub const DEFAULT_MAX_MESSAGES: usize = 500;
/// `email.MAX_MESSAGE_BYTES` default: 50 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 50 * 1024 * 1024;
/// The key file's name when `email.KEY_FILE` is not set (beside the INI file).
pub const DEFAULT_KEY_FILE_NAME: &str = "pcr360-email.key";

/// The directory relative paths of `config_file` resolve against (absolute when possible).
pub(crate) fn ini_dir(config_file: &Path) -> PathBuf {
    let absolute = std::path::absolute(config_file).unwrap_or_else(|_| config_file.to_path_buf());
    match absolute.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A sibling of the INI file's directory: `/var/www/pcr360/configs/pcr360.ini` → `/var/www/pcr360/<name>`.
fn beside_ini_dir(dir: &Path, name: &str) -> PathBuf {
    match dir.parent() {
        Some(parent) => parent.join(name),
        None => dir.join(name),
    }
}

impl AccountDefaults {
    /// The built-in defaults of SPEC §2 for an INI file in `ini_dir`.
    pub fn builtin(ini_dir: &Path) -> AccountDefaults {
        AccountDefaults {
            file_path: beside_ini_dir(ini_dir, "email"),
            sendmail_path: PathBuf::from(DEFAULT_SENDMAIL_PATH),
            timeout: default_timeout(),
            incoming_folder: "INBOX".to_string(),
            processed_action: ProcessedAction::Seen,
            max_messages: DEFAULT_MAX_MESSAGES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            tls: TlsSettings::default(),
        }
    }
}

/// The `email.*` keys this extension reads besides the account keys.
const SETTINGS_KEYS: &[&str] = &[
    "STATE_DIR",
    "STATE_DSN",
    "KEY_FILE",
    "LOG_FILE",
    "SD_NUMBER_PATTERN",
    "MAILBOX_THREADS",
];

impl Settings {
    /// Reads `file` and resolves `environment` (with `[child : parent]` inheritance).
    ///
    /// - `constants.SEND_EMAIL` (default true) and `constants.DISABLE_EMAIL` (default false),
    ///   read as PCR-360 reads them: PHP's truthiness of what `parse_ini_file` returns (`""`
    ///   and `"0"` are false, anything else true, so a quoted `"false"` is true; such a value
    ///   adds a line to `warnings`).
    /// - The master account exists when any of `email.EMAIL`, `email.OUTGOING_TRANSPORT_TYPE`
    ///   or `email.INCOMING_MAILBOX_TYPE` is set; it is then checked like a tenant account
    ///   (EMAIL required, SMTP/IMAP/POP3 need a host, MAILDIR a path, ...). OFFICE365 / GMAIL
    ///   are refused here (tenant accounts only). A master account that fails these checks is
    ///   not an error of the file: it is `master_failed`, and only its own uses fail.
    /// - Errors of the file itself and of the settings every account shares (`STATE_DIR`,
    ///   `KEY_FILE`, `LOG_FILE`, `SD_NUMBER_PATTERN`, `MAILBOX_THREADS`, and the operational
    ///   defaults `FILE_PATH`, `SENDMAIL_PATH`, `TIMEOUT`, `VERIFY_CERT`, `CA_FILE`,
    ///   `INCOMING_FOLDER`, `PROCESSED_ACTION`, `MAX_MESSAGES`, `MAX_MESSAGE_BYTES`, and
    ///   `SYSADMIN`'s form) are errors of the whole configuration, as before.
    /// - Relative paths are relative to the INI file's directory. Defaults: `FILE_PATH` =
    ///   `email/` and `STATE_DIR` = `email-state/` beside that directory, `KEY_FILE` =
    ///   `pcr360-email.key` in it.
    /// - The master password: an `ENC:v1:` value is decrypted here, which opens the existing
    ///   key file (a missing one fails the master account); a plain value never touches the key file (so a
    ///   configuration without encrypted values never creates one) and is reported once by
    ///   `secrets::take_cleartext_warnings`.
    /// - `email.*` keys are case-sensitive, as in PHP; a known key written in another case
    ///   (`email.password`) is an error rather than silently ignored (of the master account
    ///   for its own keys, of the file for the shared ones). Unknown `email.*` keys are
    ///   ignored (the application may have its own).
    pub fn load(file: &Path, environment: &str) -> Result<Settings> {
        let ini = ini::IniFile::load(file)?;
        let section = ini.section(environment)?;
        // Absolute, so relative paths in tenant rows resolve the same later whatever the
        // process's working directory has become.
        let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        Settings::from_section(&section, &file, environment)
    }

    /// The settings an environment with no `email.*` and no `constants.*` keys has.
    pub fn without_file(config_file: &Path, environment: &str) -> Settings {
        let dir = ini_dir(config_file);
        Settings {
            config_file: config_file.to_path_buf(),
            environment: environment.to_string(),
            send_email: true,
            disable_email: false,
            master: None,
            master_failed: None,
            warnings: Vec::new(),
            state_dir: beside_ini_dir(&dir, "email-state"),
            state_dsn: None,
            key_file: dir.join(DEFAULT_KEY_FILE_NAME),
            log_file: None,
            sysadmin: None,
            sd_number_pattern: DEFAULT_SD_NUMBER_PATTERN.to_string(),
            mailbox_threads: DEFAULT_MAILBOX_THREADS,
            defaults: AccountDefaults::builtin(&dir),
        }
    }

    /// Only the key file environment `environment` of `file` names (for encrypting a value
    /// while the rest of the configuration may still be incomplete).
    pub fn key_file_for(file: &Path, environment: &str) -> Result<PathBuf> {
        let ini = ini::IniFile::load(file)?;
        let section = ini.section(environment)?;
        let email = email_fields(&section);
        let fields = email.shared()?;
        let dir = ini_dir(file);
        Ok(fields
            .path("KEY_FILE", &dir)?
            .unwrap_or_else(|| dir.join(DEFAULT_KEY_FILE_NAME)))
    }

    fn from_section(section: &ini::Section, file: &Path, environment: &str) -> Result<Settings> {
        let dir = ini_dir(file);
        let mut settings = Settings::without_file(file, environment);

        settings.send_email = php_constant(section, "SEND_EMAIL", true, &mut settings.warnings);
        settings.disable_email =
            php_constant(section, "DISABLE_EMAIL", false, &mut settings.warnings);

        let email = email_fields(section);
        let fields = email.shared()?;
        if let Some(dir_path) = fields.path("STATE_DIR", &dir)? {
            settings.state_dir = dir_path;
        }
        if let Some(key_file) = fields.path("KEY_FILE", &dir)? {
            settings.key_file = key_file;
        }
        settings.log_file = fields.path("LOG_FILE", &dir)?;
        if let Some(dsn) = fields.get("STATE_DSN").filter(|v| !v.trim().is_empty()) {
            let key_file = settings.key_file.clone();
            let parsed = dsn::Dsn::parse(dsn, |password| {
                secrets::KeyStore::open_existing(&key_file)
                    .and_then(|keys| keys.decrypt(password))
                    .map_err(|e| {
                        crate::Error::message(format!(
                            "cannot be decrypted with the key file {}: {e}",
                            key_file.display()
                        ))
                    })
            })
            .map_err(|e| fields.err("STATE_DSN", e))?;
            if !dsn.contains(":ENC:v1:") {
                secrets::note_cleartext("state", "STATE_DSN", parsed.password.expose());
            }
            settings.state_dsn = Some(parsed);
        }
        if let Some(pattern) = fields.get("SD_NUMBER_PATTERN") {
            if let Err(e) = regex::Regex::new(pattern) {
                let detail = e.to_string();
                let last = detail
                    .lines()
                    .last()
                    .unwrap_or("invalid")
                    .trim()
                    .to_string();
                return Err(fields.err(
                    "SD_NUMBER_PATTERN",
                    format!("is not a valid regular expression: {last}"),
                ));
            }
            settings.sd_number_pattern = pattern.to_string();
        }
        if let Some(n) = fields.number("MAILBOX_THREADS", 1, MAX_MAILBOX_THREADS, "threads")? {
            settings.mailbox_threads = n as usize;
        }
        settings.defaults = normalise::operational(fields, &settings.defaults, &dir)?;

        let present = ["EMAIL", "OUTGOING_TRANSPORT_TYPE", "INCOMING_MAILBOX_TYPE"]
            .iter()
            .any(|k| fields.get(k).is_some())
            || email.misspelled_account_key.is_some();
        let sysadmin_only = fields.line("SYSADMIN")?.map(str::to_string);
        if present {
            match master_account(&email, &settings, &dir) {
                Ok(master) => settings.master = Some(master),
                Err(error) => {
                    // Read leniently, in any letter case: the problem may be the spelling.
                    let set = |name: &str| {
                        section.with_prefix("email.").any(|(k, v)| {
                            k["email.".len()..].eq_ignore_ascii_case(name)
                                && !v.text().trim().is_empty()
                        })
                    };
                    settings.master_failed = Some(FailedAccount {
                        id: AccountId::Master,
                        tenants_recid: fields
                            .get("TENANTS_RECID")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0),
                        account_type: AccountType::Master,
                        sends: set("OUTGOING_TRANSPORT_TYPE"),
                        receives: set("INCOMING_MAILBOX_TYPE"),
                        email: fields.get("EMAIL").unwrap_or("").to_string(),
                        mailbox: None,
                        error,
                    });
                }
            }
        }
        settings.sysadmin = sysadmin_only;
        Ok(settings)
    }

    /// The master account: `Ok(None)` when the INI has none, its error when it is broken.
    pub fn master_account(&self) -> Result<Option<&Account>> {
        match &self.master_failed {
            Some(failed) => Err(failed.error.clone()),
            None => Ok(self.master.as_ref()),
        }
    }
}

/// The `email.*` account (the master) from the section's `email.*` keys; any error is the
/// account's own (see `Settings::master_failed`).
fn master_account(email: &EmailFields, settings: &Settings, dir: &Path) -> Result<Account> {
    if let Some(e) = &email.misspelled_account_key {
        return Err(e.clone());
    }
    let fields = &email.fields;
    let tenants_recid = match fields.get("TENANTS_RECID") {
        None => 0,
        Some(v) => v.parse::<i64>().map_err(|_| {
            fields.err(
                "TENANTS_RECID",
                format!("`{}` is not a whole number", normalise::printable(v)),
            )
        })?,
    };
    if let Some(kind) = fields.get("ACCOUNT_TYPE") {
        if !matches!(
            AccountType::parse(kind),
            Some(AccountType::Master | AccountType::Default)
        ) {
            return Err(fields.err(
                "ACCOUNT_TYPE",
                format!(
                    "the INI account is the master account; `{}` is not allowed here \
                     (write master, or leave it out)",
                    normalise::printable(kind)
                ),
            ));
        }
    }
    let key_file = settings.key_file.clone();
    let mut store: Option<secrets::KeyStore> = None;
    let mut reveal = |value: &str, key: &str, location: ConfigLocation| {
        if secrets::is_encrypted(value) {
            if store.is_none() {
                let opened = secrets::KeyStore::open_existing(&key_file).map_err(|e| {
                    let detail = match &e {
                        crate::Error::Config { message, .. } => message.clone(),
                        other => other.to_string(),
                    };
                    crate::Error::config(
                        location.clone(),
                        format!(
                            "cannot decrypt this value: {detail} (key file {})",
                            key_file.display()
                        ),
                    )
                })?;
                store = Some(opened);
            }
            store.as_ref().expect("opened").decrypt_at(value, location)
        } else {
            secrets::note_cleartext("master", key, value);
            Ok(Secret::new(value))
        }
    };
    let oauth = rows::oauth_settings(fields, dir, &mut reveal)?;
    normalise::build_account(
        fields,
        Identity {
            id: AccountId::Master,
            account_type: AccountType::Master,
            tenants_recid,
            allow_cloud: false,
        },
        settings.defaults.clone(),
        oauth,
        dir,
        &mut reveal,
    )
}

/// `constants.<name>` as PCR-360 reads it: PHP's truthiness of what `parse_ini_file` returns
/// (`""` and `"0"` are false, anything else is true). A bare `false/off/no/none` is `""`
/// there, but a quoted `"false"` stays the text `false`, which PHP takes as true: such a value
/// (anything true that does not say true) is read as PHP reads it, with a warning naming the
/// file and line.
fn php_constant(
    section: &ini::Section,
    name: &str,
    default: bool,
    warnings: &mut Vec<String>,
) -> bool {
    let key = format!("constants.{name}");
    let Some(value) = section.get(&key) else {
        return default;
    };
    let text = value.text();
    let truthy = !(text.is_empty() || text == "0");
    if truthy && parse_bool(text) != Some(true) {
        let written = normalise::printable(&value.raw);
        let (shown, hint) = if value.quoted {
            (
                format!("\"{written}\""),
                format!(
                    "; a quoted value is text to PHP, not a boolean: to mean false, write \
                     {key} = false without quotes"
                ),
            )
        } else {
            (written, String::new())
        };
        warnings.push(format!(
            "{key} = {shown} ({}:{}) reads as TRUE, as PCR-360 itself reads it (PHP takes \
             every value but \"\", \"0\" and a bare false/off/no/none as true){hint}",
            section.file, value.line
        ));
    }
    truthy
}

/// The section's `email.*` keys (see [`email_fields`]).
struct EmailFields {
    fields: Fields,
    /// A key of the settings every account shares written in the wrong letter case: an error
    /// of the whole configuration.
    misspelled_shared_key: Option<crate::Error>,
    /// A key of the master account itself written in the wrong letter case: the master
    /// account's error.
    misspelled_account_key: Option<crate::Error>,
}

impl EmailFields {
    /// The fields, unless a shared setting's key is misspelled.
    fn shared(&self) -> Result<&Fields> {
        match &self.misspelled_shared_key {
            Some(e) => Err(e.clone()),
            None => Ok(&self.fields),
        }
    }
}

/// The section's `email.*` keys, by unprefixed name. A known key in the wrong letter case is
/// an error (PHP keys are case-sensitive, so it would otherwise be silently ignored).
fn email_fields(section: &ini::Section) -> EmailFields {
    let mut fields = Fields::new(
        ConfigLocation {
            file: Some(section.file.clone()),
            line: Some(section.line),
            account: Some("master".to_string()),
            key: None,
        },
        "email.",
    );
    let (mut misspelled_shared_key, mut misspelled_account_key) = (None, None);
    let known = normalise::GENERAL_KEYS
        .iter()
        .chain(normalise::INCOMING_KEYS)
        .chain(normalise::OAUTH_KEYS)
        .chain(SETTINGS_KEYS);
    let known: Vec<&str> = known.copied().collect();
    for (full_key, value) in section.with_prefix("email.") {
        let name = &full_key["email.".len()..];
        if !known.contains(&name) {
            if let Some(proper) = known.iter().find(|k| k.eq_ignore_ascii_case(name)) {
                let shared = SETTINGS_KEYS.contains(proper)
                    || normalise::OPERATIONAL_KEYS.contains(proper)
                    || *proper == "SYSADMIN";
                let slot = if shared {
                    &mut misspelled_shared_key
                } else {
                    &mut misspelled_account_key
                };
                if slot.is_none() {
                    let mut error = section.error(
                        full_key,
                        format!(
                            "unknown key {full_key}: did you mean email.{proper}? \
                             (INI keys are case-sensitive)"
                        ),
                    );
                    if let (false, crate::Error::Config { location, .. }) = (shared, &mut error) {
                        location.account = Some("master".to_string());
                    }
                    *slot = Some(error);
                }
            }
            continue;
        }
        // A bare `false` reads as "" in PHP, which would mean "not set": a boolean key keeps
        // what was written, and a present but empty one is false.
        let text = if normalise::BOOLEAN_KEYS.contains(&name) {
            if value.raw.trim().is_empty() {
                "0".to_string()
            } else {
                value.raw.clone()
            }
        } else {
            value.text().to_string()
        };
        fields.insert(
            name,
            Field {
                value: text,
                location: ConfigLocation {
                    file: Some(section.file.clone()),
                    line: Some(value.line),
                    account: Some("master".to_string()),
                    key: Some(full_key.to_string()),
                },
                constant: value.constant.clone(),
            },
        );
    }
    EmailFields {
        fields,
        misspelled_shared_key,
        misspelled_account_key,
    }
}
