//! Tenant email accounts as PHP hands them over (`PCR_Utility_EmailHost::emailAccounts()`,
//! converted to JSON): one object per account, keys case-insensitive, values strings, numbers,
//! booleans or null (null and `""` mean "not set").

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use super::account::*;
use super::files;
use super::normalise::{self, Field, Fields, Identity};
use super::secrets::{is_encrypted, KeyStore};
use super::Settings;
use crate::error::{ConfigLocation, Error, Result};

/// One tenant row → a checked [`Account`]. Errors name the account (`account 12`) and the key.
/// Operational keys the row leaves out come from `settings.defaults`; a Default account's
/// incoming settings are dropped unread (it never receives); passwords and OAuth secrets go
/// through [`KeyStore::reveal`].
pub fn account_from_row(row: &Value, settings: &Settings, keys: &KeyStore) -> Result<Account> {
    let mut reveal = |value: &str, account: &str, key: &str| keys.reveal(value, account, key);
    account_from_row_at(row, settings, &mut reveal, None)
}

/// A tenant row that is recognisably an account of one tenant and kind — its `RECID`,
/// `TENANTS_RECID` (absent: 0, as for a good row) and `ACCOUNT_TYPE` read — but is otherwise
/// broken (a password that does not decrypt, an unknown transport, a bad port, ...).
///
/// It stays in routing (SPEC §3: a bad account fails on its own, and its mail is never routed
/// to another account): mail routed to it fails with [`FailedAccount::error`], and
/// `eventCheckMail` must not read its mailbox through another account. It holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAccount {
    /// `AccountId::Tenant(RECID)`; `AccountId::Master` for a broken INI master account
    /// (`Settings::master_failed`).
    pub id: AccountId,
    pub tenants_recid: i64,
    /// `Default` or `ServiceDesk` (`Master` for the INI's).
    pub account_type: AccountType,
    /// The row sets `OUTGOING_TRANSPORT_TYPE`: the account would send, so routing picks it
    /// (and fails) where it would have picked the good account.
    pub sends: bool,
    /// A Service Desk row that sets `INCOMING_MAILBOX_TYPE`: `eventCheckMail` would read it.
    pub receives: bool,
    /// `EMAIL` as the row gives it (trimmed; may be empty or invalid), for summaries.
    pub email: String,
    /// The mailbox it would read, when its mailbox settings could be read in spite of the
    /// error (e.g. only its password is broken): its incoming settings and login name. Used to
    /// keep another account (the INI master) from reading the same mailbox.
    pub mailbox: Option<(Incoming, String)>,
    /// Why it cannot be used: an [`Error::Config`] naming the account and the key.
    pub error: Error,
}

/// Every tenant row sorted out: the good accounts, the broken ones that still belong to a
/// tenant and kind ([`FailedAccount`]), and one error per bad row (the broken accounts'
/// included, so every problem is reported).
#[derive(Debug, Default)]
pub struct TenantRows {
    pub accounts: Vec<Account>,
    pub failed: Vec<FailedAccount>,
    pub errors: Vec<Error>,
}

/// Every row of `rows` (a list, or an object keyed by anything) → the good accounts and one
/// error per bad row, so one bad row never hides the others. A RECID given twice keeps the
/// first row. ([`tenant_rows`] gives the broken accounts as well.)
pub fn accounts_from_rows(
    rows: &Value,
    settings: &Settings,
    keys: &KeyStore,
) -> (Vec<Account>, Vec<Error>) {
    let sorted = tenant_rows(rows, settings, Ok(keys));
    (sorted.accounts, sorted.errors)
}

/// Every row of `rows` (a list, or an object keyed by anything) sorted out (see
/// [`TenantRows`]). One bad row never hides the others; a RECID given twice keeps the first
/// row. `keys` is the key store, or why it could not be opened: then each encrypted value is
/// an error of its own account (whose row becomes a [`FailedAccount`]) and rows without
/// encrypted values still work.
pub fn tenant_rows(
    rows: &Value,
    settings: &Settings,
    keys: std::result::Result<&KeyStore, &Error>,
) -> TenantRows {
    let items: Vec<(String, &Value)> = match rows {
        Value::Null => Vec::new(),
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, row)| (format!("row {i}"), row))
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, row)| (format!("row {k}"), row))
            .collect(),
        _ => {
            return TenantRows {
                errors: vec![Error::config(
                    ConfigLocation {
                        account: Some("(all tenant accounts)".into()),
                        ..Default::default()
                    },
                    "the tenant email accounts must be a list of rows",
                )],
                ..Default::default()
            }
        }
    };
    // Without a key store a plain value is still usable (and reported as plain as usual).
    let no_key = KeyStore::from_key([0; 32]);
    let mut reveal = |value: &str, account: &str, key: &str| -> Result<Secret> {
        match keys {
            Ok(store) => store.reveal(value, account, key),
            Err(e) if is_encrypted(value) => {
                let detail = match e {
                    Error::Config { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                Err(Error::account_key(
                    account,
                    key,
                    format!("cannot decrypt this value: {detail}"),
                ))
            }
            Err(_) => no_key.reveal(value, account, key),
        }
    };
    let mut sorted = TenantRows::default();
    let mut seen = HashSet::new();
    for (label, row) in items {
        match account_from_row_at(row, settings, &mut reveal, Some(&label)) {
            Ok(account) => {
                if seen.insert(account.id.clone()) {
                    sorted.accounts.push(account);
                } else {
                    sorted.errors.push(duplicate(&account.id));
                }
            }
            Err(e) => {
                if let Some(failed) = failed_account(row, settings, &e) {
                    if seen.insert(failed.id.clone()) {
                        sorted.failed.push(failed);
                    } else {
                        sorted.errors.push(duplicate(&failed.id));
                    }
                }
                sorted.errors.push(e);
            }
        }
    }
    sorted
}

fn duplicate(id: &AccountId) -> Error {
    Error::account_key(
        &id.to_string(),
        "RECID",
        "the same RECID appears in more than one row; the first row is used",
    )
}

/// The broken row as a [`FailedAccount`] when it is recognisably an account of a tenant and
/// kind; `None` when it is not (no usable RECID, TENANTS_RECID or ACCOUNT_TYPE).
fn failed_account(row: &Value, settings: &Settings, error: &Error) -> Option<FailedAccount> {
    let Value::Object(object) = row else {
        return None;
    };
    // Read leniently (the first spelling of each key, in any letter case): the row's problem
    // may be in how its keys are written.
    let text = |name: &str| -> Option<String> {
        let value = object
            .iter()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v)?;
        match value {
            Value::Null => None,
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => Some(s.trim().to_string()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(false) => None,
            _ => Some(String::from("?")),
        }
    };
    let recid = parse_int(&text("RECID")?)?;
    let tenants_recid = match text("TENANTS_RECID") {
        None => 0,
        Some(v) => parse_int(&v)?,
    };
    let account_type = match AccountType::parse(&text("ACCOUNT_TYPE")?)? {
        t @ (AccountType::Default | AccountType::ServiceDesk) => t,
        AccountType::Master => return None,
    };
    let sends = text("OUTGOING_TRANSPORT_TYPE").is_some();
    let receives =
        account_type == AccountType::ServiceDesk && text("INCOMING_MAILBOX_TYPE").is_some();
    // The mailbox it would read: the row built again with each encrypted value replaced by a
    // stand-in; only the incoming settings and the login name are kept.
    let mailbox = if receives {
        let mut stand_in = |value: &str, _: &str, key: &str| -> Result<Secret> {
            Ok(if !is_encrypted(value) {
                Secret::new(value)
            } else if key == "OAUTH.SERVICE_ACCOUNT_JSON" {
                Secret::new("{}")
            } else {
                Secret::new("x")
            })
        };
        account_from_row_at(row, settings, &mut stand_in, None)
            .ok()
            .and_then(|a| {
                let login = a.login_name().to_string();
                a.incoming.map(|incoming| (incoming, login))
            })
    } else {
        None
    };
    Some(FailedAccount {
        id: AccountId::Tenant(recid),
        tenants_recid,
        account_type,
        sends,
        receives,
        email: text("EMAIL").unwrap_or_default(),
        mailbox,
        error: error.clone(),
    })
}

/// Turns a stored secret (`value`) of `account`'s `key` into its usable value.
type RowReveal<'a> = dyn FnMut(&str, &str, &str) -> Result<Secret> + 'a;

fn account_from_row_at(
    row: &Value,
    settings: &Settings,
    reveal_as: &mut RowReveal<'_>,
    label: Option<&str>,
) -> Result<Account> {
    let fallback_label = label.unwrap_or("(no RECID)");
    let Value::Object(object) = row else {
        return Err(Error::account_key(
            fallback_label,
            "RECID",
            "a tenant email account must be an array of settings",
        ));
    };
    // RECID first: every later message names the account by it.
    let recid_value = object
        .iter()
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("RECID"))
        .map(|(_, v)| v);
    let recid_text = match recid_value {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let recid = match recid_text {
        None => {
            return Err(Error::account_key(
                fallback_label,
                "RECID",
                "the account has no RECID",
            ))
        }
        Some(v) => parse_int(&v).ok_or_else(|| {
            Error::account_key(
                fallback_label,
                "RECID",
                format!("`{}` is not a whole number", normalise::printable(&v)),
            )
        })?,
    };
    let account = recid.to_string();
    let flat = flatten(object, &account, "")?;
    let base = ConfigLocation {
        account: Some(account.clone()),
        ..Default::default()
    };
    let mut fields = Fields::new(base, "");
    for (key, value) in &flat {
        if let Some(value) = value {
            fields.insert(
                key,
                Field {
                    value: value.clone(),
                    location: ConfigLocation {
                        account: Some(account.clone()),
                        key: Some(key.clone()),
                        ..Default::default()
                    },
                    constant: None,
                },
            );
        }
    }
    let tenants_recid = match fields.get("TENANTS_RECID") {
        None => 0,
        Some(v) => parse_int(v).ok_or_else(|| {
            fields.err(
                "TENANTS_RECID",
                format!("`{}` is not a whole number", normalise::printable(v)),
            )
        })?,
    };
    let type_text = fields.required("ACCOUNT_TYPE", "(default or service_desk)")?;
    let account_type = match AccountType::parse(type_text) {
        Some(t @ (AccountType::Default | AccountType::ServiceDesk)) => t,
        Some(AccountType::Master) => {
            return Err(fields.err(
                "ACCOUNT_TYPE",
                "a tenant account cannot be the master account (that one is in the INI file)",
            ))
        }
        None => {
            return Err(fields.err(
                "ACCOUNT_TYPE",
                format!(
                    "unknown account type `{}` (expected default or service_desk)",
                    normalise::printable(type_text)
                ),
            ))
        }
    };
    if account_type == AccountType::Default {
        for key in normalise::INCOMING_KEYS {
            fields.remove(key);
        }
    }

    let base_dir = settings_dir(settings);
    let mut reveal =
        |value: &str, key: &str, _location: ConfigLocation| reveal_as(value, &account, key);
    let oauth = oauth_settings(&fields, &base_dir, &mut reveal)?;
    let ops = normalise::operational(&fields, &settings.defaults, &base_dir)?;
    normalise::build_account(
        &fields,
        Identity {
            id: AccountId::Tenant(recid),
            account_type,
            tenants_recid,
            allow_cloud: true,
        },
        ops,
        oauth,
        &base_dir,
        &mut reveal,
    )
}

/// The directory relative paths in rows are resolved against: the INI file's.
fn settings_dir(settings: &Settings) -> std::path::PathBuf {
    super::ini_dir(&settings.config_file)
}

/// Upper-cased keys → string values (`None` for null). `OAUTH` (an object, or a JSON string of
/// one) is flattened to `OAUTH.KEY`. Two spellings of one key with different values are an
/// error.
fn flatten(
    object: &serde_json::Map<String, Value>,
    account: &str,
    prefix: &str,
) -> Result<Vec<(String, Option<String>)>> {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for (key, value) in object {
        let upper = format!("{prefix}{}", key.trim().to_ascii_uppercase());
        if prefix.is_empty() && upper == "OAUTH" {
            let nested = match value {
                Value::Null => continue,
                Value::String(s) if s.trim().is_empty() => continue,
                Value::Object(map) => map.clone(),
                Value::String(s) => match serde_json::from_str::<Value>(s) {
                    Ok(Value::Object(map)) => map,
                    _ => {
                        return Err(Error::account_key(
                            account,
                            "OAUTH",
                            "the OAuth2 settings must be an array (or a JSON object)",
                        ))
                    }
                },
                Value::Array(list) if list.is_empty() => continue,
                _ => {
                    return Err(Error::account_key(
                        account,
                        "OAUTH",
                        "the OAuth2 settings must be an array of settings",
                    ))
                }
            };
            out.extend(flatten(&nested, account, "OAUTH.")?);
            continue;
        }
        let text = match value {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            // PHP's (string)false is "", which would read as "not set": a boolean key keeps it.
            Value::Bool(b) if normalise::BOOLEAN_KEYS.contains(&upper.as_str()) => {
                Some(if *b { "1".into() } else { "0".into() })
            }
            Value::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
            Value::Array(list) if upper == "OAUTH.SCOPES" => {
                let mut scopes = Vec::new();
                for item in list {
                    match item {
                        Value::String(s) => scopes.push(s.trim().to_string()),
                        _ => {
                            return Err(Error::account_key(
                                account,
                                &upper,
                                "the scopes must be strings",
                            ))
                        }
                    }
                }
                Some(scopes.join(" "))
            }
            Value::Array(_) | Value::Object(_) => {
                return Err(Error::account_key(
                    account,
                    &upper,
                    "must be a single value, not a list",
                ))
            }
        };
        if let Some((_, previous)) = out.iter().find(|(k, _)| *k == upper) {
            if *previous != text {
                return Err(Error::account_key(
                    account,
                    &upper,
                    "is given twice (in different letter case) with different values",
                ));
            }
            continue;
        }
        out.push((upper, text));
    }
    Ok(out)
}

fn parse_int(value: &str) -> Option<i64> {
    value.trim().parse::<i64>().ok()
}

pub(crate) fn oauth_settings(
    f: &Fields,
    base_dir: &Path,
    reveal: &mut normalise::Reveal<'_>,
) -> Result<Option<OAuthSettings>> {
    if !normalise::OAUTH_KEYS.iter().any(|k| f.raw(k).is_some()) {
        return Ok(None);
    }
    let text = |key: &str| -> Result<String> { Ok(f.line(key)?.unwrap_or("").to_string()) };
    let url = |key: &str, relative_ok: bool| -> Result<String> {
        let value = text(key)?;
        let ok = value.is_empty()
            || value.starts_with("https://")
            || value.starts_with("http://")
            || (relative_ok && value.starts_with('/'));
        if !ok {
            return Err(f.err(
                key,
                format!(
                    "`{}` is not a URL (http:// or https://{})",
                    normalise::printable(&value),
                    if relative_ok {
                        ", or a path under the authority URL"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(value)
    };
    let secret_key = match f.raw("OAUTH.SECRET_KEY") {
        None => None,
        Some(stored) => Some(reveal(
            stored,
            "OAUTH.SECRET_KEY",
            f.location("OAUTH.SECRET_KEY"),
        )?)
        .filter(|s| !s.is_empty()),
    };
    let service_account_json = match f.raw("OAUTH.SERVICE_ACCOUNT_JSON") {
        None => None,
        Some(stored) => {
            let key = "OAUTH.SERVICE_ACCOUNT_JSON";
            let revealed = reveal(stored, key, f.location(key))?;
            let value = revealed.expose().trim();
            let contents = if value.starts_with('{') {
                Secret::new(value)
            } else {
                let path = normalise::resolve(base_dir, value);
                let cannot = |e: &dyn std::fmt::Display| {
                    f.err(
                        key,
                        format!(
                            "cannot read the service account key file {}: {e}",
                            path.display()
                        ),
                    )
                };
                let bytes = files::read_limited(&path, files::SERVICE_ACCOUNT_JSON_LIMIT)
                    .map_err(|e| cannot(&e))?;
                let read = String::from_utf8(bytes).map_err(|_| cannot(&"it is not UTF-8 text"))?;
                Secret::new(read)
            };
            match serde_json::from_str::<Value>(contents.expose()) {
                Ok(Value::Object(_)) => {}
                Ok(_) => return Err(f.err(key, "the service account key is not a JSON object")),
                Err(e) => {
                    return Err(f.err(
                        key,
                        format!(
                            "the service account key is not valid JSON (line {}, column {})",
                            e.line(),
                            e.column()
                        ),
                    ))
                }
            }
            Some(contents)
        }
    };
    let impersonate = match f.line("OAUTH.IMPERSONATE")? {
        None => None,
        Some(v) => {
            if let Some(problem) = address_problem(v) {
                return Err(f.err(
                    "OAUTH.IMPERSONATE",
                    format!("`{}` {problem}", normalise::printable(v)),
                ));
            }
            Some(v.to_string())
        }
    };
    let scopes = f
        .line("OAUTH.SCOPES")?
        .unwrap_or("")
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let api_base_url = Some(url("OAUTH.API_BASE_URL", false)?).filter(|u| !u.is_empty());
    let grant = match f
        .line("OAUTH.GRANT")?
        .map(str::trim)
        .filter(|g| !g.is_empty())
    {
        None if service_account_json.is_some() => OAuthGrant::ServiceAccount,
        None => OAuthGrant::AuthorizationCode,
        Some(g) => OAuthGrant::parse(g).ok_or_else(|| {
            f.err(
                "OAUTH.GRANT",
                format!(
                    "`{}` is not a grant (authorization_code, client_credentials or \
                     service_account)",
                    normalise::printable(g)
                ),
            )
        })?,
    };
    let provider = match f
        .line("OAUTH.PROVIDER")?
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        None => None,
        Some(p) if p.eq_ignore_ascii_case("microsoft") || p.eq_ignore_ascii_case("google") => {
            Some(p.to_ascii_lowercase())
        }
        Some(p) => {
            return Err(f.err(
                "OAUTH.PROVIDER",
                format!(
                    "`{}` is not a provider (microsoft or google)",
                    normalise::printable(p)
                ),
            ))
        }
    };
    Ok(Some(OAuthSettings {
        grant,
        provider,
        application_id: text("OAUTH.APPLICATION_ID")?,
        secret_key,
        authority_url: url("OAUTH.AUTHORITY_URL", false)?,
        authorization_endpoint: url("OAUTH.AUTHORIZATION_ENDPOINT", true)?,
        token_endpoint: url("OAUTH.TOKEN_ENDPOINT", true)?,
        scopes,
        service_account_json,
        impersonate,
        api_base_url,
    }))
}
