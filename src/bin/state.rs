//! `pcr-email-state`: tools for the state store. `migrate` copies a site's SQLite store
//! (`STATE_DIR/pcr_email.sqlite`) into the MariaDB/MySQL database `email.STATE_DSN` names, so a
//! site that moves to several servers keeps every ledger entry and doubles nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use pcr_email::config::secrets::KeyStore;
use pcr_email::config::{Settings, DEFAULT_CONFIG_FILE};
use pcr_email::state::{copy_to_database, Dsn};

const USAGE: &str = "\
Usage: pcr-email-state migrate [--to <dsn>] [--from <state dir>] [-e <environment>] [-i <pcr360.ini>]

Copies the SQLite state store (the ledger of processed mail, IMAP/POP3/cloud marks, OAuth
tokens, pending authorizations, sent Message-IDs, alerts) into a MariaDB/MySQL database, in one
transaction. A database whose pcr_email_ tables already hold a row is refused (nothing copied).
Stop the cron jobs (eventCheckMail) while it runs, then set email.STATE_DSN on every server.

Options:
      --to <dsn>       mysql://USER:PASSWORD@HOST:PORT/DATABASE[?ssl=required&ca=PATH]
                       (the password may be ENC:v1:...; default: the INI's email.STATE_DSN)
      --from <dir>     the SQLite store's directory (default: the INI's email.STATE_DIR)
  -e, --env <name>     INI section (default: $APPLICATION_ENV, else prod)
  -i, --ini <file>     the INI file (default: /var/www/pcr360/configs/pcr360.ini)
  -h, --help           this help

Exit status: 0 when copied, 2 on any error (the password is never printed).";

struct Options {
    to: Option<String>,
    from: Option<PathBuf>,
    env: String,
    ini: PathBuf,
}

fn parse_args(args: Vec<String>) -> Result<Option<Options>, String> {
    let mut args = args.into_iter();
    match args.next().as_deref() {
        Some("migrate") => {}
        Some("-h" | "--help") | None => return Ok(None),
        Some(_) => return Err("unknown command (see --help): only `migrate` exists".into()),
    }
    let (mut to, mut from, mut env, mut ini) = (None, None, None, None);
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
            "-h" | "--help" => return Ok(None),
            "--to" => to = Some(value("a mysql:// DSN")?),
            "--from" => from = Some(PathBuf::from(value("a directory")?)),
            "-e" | "--env" | "--environment" => env = Some(value("an environment name")?),
            "-i" | "--ini" | "--config" => ini = Some(PathBuf::from(value("a file")?)),
            // Never echo an unknown argument: it may be a misplaced DSN with its password.
            _ => return Err("unknown argument (see --help)".into()),
        }
    }
    let env = env
        .or_else(|| {
            std::env::var("APPLICATION_ENV")
                .ok()
                .filter(|e| !e.is_empty())
        })
        .unwrap_or_else(|| "prod".to_string());
    let ini = ini.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
    Ok(Some(Options { to, from, env, ini }))
}

fn run(o: Options) -> Result<String, String> {
    // The INI is needed for a default (STATE_DIR, STATE_DSN) or an encrypted password.
    let needs_ini = o.from.is_none()
        || o.to.is_none()
        || o.to.as_deref().is_some_and(|t| t.contains("ENC:v1:"));
    let settings = if needs_ini {
        Some(Settings::load(&o.ini, &o.env).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let dsn = match &o.to {
        Some(text) => Dsn::parse(text, |password| {
            let key_file = Settings::key_file_for(&o.ini, &o.env)?;
            KeyStore::open_existing(&key_file)?.decrypt(password)
        })
        .map_err(|e| format!("--to {e}"))?,
        None => settings
            .as_ref()
            .and_then(|s| s.state_dsn.clone())
            .ok_or("no --to, and the INI has no email.STATE_DSN")?,
    };
    let from = match o.from {
        Some(dir) => dir,
        None => settings.as_ref().expect("loaded").state_dir.clone(),
    };
    let copied = copy_to_database(&from, &dsn).map_err(|e| e.to_string())?;
    let total: u64 = copied.iter().map(|(_, n)| n).sum();
    let detail: Vec<String> = copied.iter().map(|(t, n)| format!("{t} {n}")).collect();
    Ok(format!(
        "copied {total} rows from {} into {} ({})",
        from.display(),
        dsn.label(),
        detail.join(", ")
    ))
}

fn main() -> ExitCode {
    let parsed = parse_args(std::env::args().skip(1).collect());
    match parsed {
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(options)) => match run(options) {
            Ok(report) => {
                println!("pcr-email-state: {report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pcr-email-state: {e}");
                ExitCode::from(2)
            }
        },
        Err(e) => {
            eprintln!("pcr-email-state: {e}");
            ExitCode::from(2)
        }
    }
}
