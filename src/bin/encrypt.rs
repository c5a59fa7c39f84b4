//! `pcr-email-encrypt`: encrypts an email password for `pcr360.ini` or a tenant account,
//! replacing `zfcli.php -a cron.db.encrypt-password`. Prints only the `ENC:v1:` value.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use pcr_email::config::secrets::{check_plain, KeyStore};
use pcr_email::config::{Settings, DEFAULT_CONFIG_FILE};

const USAGE: &str = "\
Usage: pcr-email-encrypt [-e <environment>] [-i <pcr360.ini>] --js '{\"encrypt\":\"<password>\"}'
       pcr-email-encrypt [-e <environment>] [-i <pcr360.ini>] --stdin

Encrypts an email password (or OAuth secret) with the installation's key and prints the value
to paste into pcr360.ini (email.PASSWORD = \"ENC:v1:...\") or a tenant email account.

Options:
  -e, --env <name>     INI section (default: $APPLICATION_ENV, else prod)
  -i, --ini <file>     the INI file (default: /var/www/pcr360/configs/pcr360.ini)
      --js <json>      {\"encrypt\":\"...\"}: the value to encrypt, as the old CLI took it
      --stdin          read the value from the first line of standard input instead
                       (keeps it out of the shell history and the process list)
  -a <action>          accepted for compatibility: cron.db.encrypt-password
  -h, --help           this help

The key file (email.KEY_FILE, default pcr360-email.key beside the INI file) is created with
mode 0640 and the group of its directory if it does not exist; the web server's user must be
able to read it (through that group: chgrp www-data <key file>). A key file others can read is
refused.
Exit status: 0 on success, 2 on any error (the value is never printed in an error).";

enum Input {
    Json(String),
    Stdin,
}

struct Options {
    env: String,
    ini: PathBuf,
    input: Input,
}

enum Parsed {
    Run(Options),
    Help,
}

fn parse_args(args: Vec<String>) -> Result<Parsed, String> {
    let mut env = None;
    let mut ini = None;
    let mut input = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs {what}"))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-e" | "--env" | "--environment" => env = Some(value("an environment name")?),
            "-i" | "--ini" | "--config" => ini = Some(PathBuf::from(value("a file")?)),
            "--js" | "--json" => {
                if input.is_some() {
                    return Err("give the value once (--js or --stdin)".into());
                }
                input = Some(Input::Json(value("a JSON object")?));
            }
            "--stdin" => {
                if input.is_some() {
                    return Err("give the value once (--js or --stdin)".into());
                }
                input = Some(Input::Stdin);
            }
            "-a" | "--action" => {
                let action = value("an action")?;
                if action != "cron.db.encrypt-password" {
                    return Err(format!(
                        "unknown action `{}` (this tool only does cron.db.encrypt-password)",
                        action.chars().take(60).collect::<String>().escape_default()
                    ));
                }
            }
            // Never echo an unknown argument: it may be a misplaced password.
            _ if arg.starts_with('-') => {
                return Err("unknown option (see --help)".to_string());
            }
            _ => return Err("unexpected argument (see --help)".to_string()),
        }
    }
    let input = input.ok_or("nothing to encrypt: give --js '{\"encrypt\":\"...\"}' or --stdin")?;
    let env = env
        .or_else(|| {
            std::env::var("APPLICATION_ENV")
                .ok()
                .filter(|e| !e.is_empty())
        })
        .unwrap_or_else(|| "prod".to_string());
    let ini = ini.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
    Ok(Parsed::Run(Options { env, ini, input }))
}

/// The value of `encrypt` in the `--js` argument. The documented command line escapes the
/// quotes inside single quotes (`'{\"encrypt\":\"...\"}'`), so the program receives the
/// backslashes: when the JSON does not parse, it is retried with PHP's `stripslashes` applied.
fn value_from_json(json: &str) -> Result<String, String> {
    let parsed = match serde_json::from_str::<serde_json::Value>(json) {
        Ok(v) => v,
        Err(first) => {
            serde_json::from_str::<serde_json::Value>(&stripslashes(json)).map_err(|_| {
                format!(
                    "--js is not valid JSON (line {}, column {}); expected {{\"encrypt\":\"...\"}}",
                    first.line(),
                    first.column()
                )
            })?
        }
    };
    let serde_json::Value::Object(map) = parsed else {
        return Err("--js must be a JSON object: {\"encrypt\":\"...\"}".into());
    };
    let value = map
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("encrypt"))
        .map(|(_, v)| v)
        .ok_or("--js has no \"encrypt\" key: {\"encrypt\":\"...\"}")?;
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        _ => Err("--js: \"encrypt\" must be a string".into()),
    }
}

/// PHP's `stripslashes`: `\x` → `x`, `\\` → `\`, `\0` → NUL.
fn stripslashes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('0') => out.push('\0'),
                Some(next) => out.push(next),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn read_stdin_line() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    let trimmed = line.strip_suffix('\n').unwrap_or(&line);
    Ok(trimmed.strip_suffix('\r').unwrap_or(trimmed).to_string())
}

fn run(options: Options) -> Result<String, String> {
    let plain = match &options.input {
        Input::Json(json) => value_from_json(json)?,
        Input::Stdin => read_stdin_line()?,
    };
    check_plain(&plain).map_err(|e| e.to_string())?;
    let key_file = Settings::key_file_for(&options.ini, &options.env).map_err(|e| e.to_string())?;
    let store = KeyStore::open(&key_file).map_err(|e| e.to_string())?;
    if store.created() {
        use std::os::unix::fs::MetadataExt;
        let group = std::fs::metadata(&key_file)
            .map(|m| pcr_email::perms::group_name(m.gid()))
            .unwrap_or_else(|_| "?".into());
        eprintln!(
            "pcr-email-encrypt: created the key file {} (mode 0640, group {group}, key id {}); \
             the web server's user must be in group {group} to read it (otherwise: chgrp \
             <the web server's group> {})",
            key_file.display(),
            store.key_id(),
            key_file.display()
        );
    }
    Ok(store.encrypt(&plain))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match parse_args(args) {
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Run(options)) => run(options),
        Err(message) => Err(message),
    };
    match result {
        Ok(value) => {
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{value}").and_then(|_| out.flush()).is_err() {
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("pcr-email-encrypt: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_forms() {
        assert_eq!(value_from_json(r#"{"encrypt":"pw"}"#).unwrap(), "pw");
        // The documented command line's escaped quotes.
        assert_eq!(
            value_from_json(r#"{\"encrypt\":\"SET_PASSWORD_HERE\"}"#).unwrap(),
            "SET_PASSWORD_HERE"
        );
        assert_eq!(value_from_json(r#"{"ENCRYPT":"a\\b"}"#).unwrap(), "a\\b");
        assert!(value_from_json(r#"{"encrypt":5}"#).is_err());
        assert!(value_from_json(r#"["pw"]"#).is_err());
        let e = value_from_json(r#"{"encrypt":"sekrit"#).unwrap_err();
        assert!(!e.contains("sekrit"), "{e}");
    }

    #[test]
    fn unknown_arguments_are_not_echoed() {
        let e = match parse_args(vec!["--js".into(), "{}".into(), "hunter2".into()]) {
            Err(e) => e,
            Ok(_) => panic!("must fail"),
        };
        assert!(!e.contains("hunter2"));
        let e = match parse_args(vec!["--pw=hunter2".into()]) {
            Err(e) => e,
            Ok(_) => panic!("must fail"),
        };
        assert!(!e.contains("hunter2"));
    }
}
