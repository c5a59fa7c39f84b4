//! `Settings::load`: the seed configuration, defaults, relative paths, encrypted passwords and
//! every kind of bad value, each with the exact file:line and key in the message.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcr_email::config::secrets::KeyStore;
use pcr_email::config::*;
use pcr_email::Error;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

/// A `<root>/configs/pcr360.ini` holding `text`; returns (tempdir, ini path).
fn write_ini(text: &str) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let configs = root.path().join("configs");
    std::fs::create_dir(&configs).unwrap();
    let ini = configs.join("pcr360.ini");
    std::fs::write(&ini, text).unwrap();
    (root, ini)
}

/// `Settings::load`, with a broken master account's error as the result: the cases below
/// check each error's text. (That a broken master leaves the settings usable is checked in
/// `a_broken_master_is_an_account_that_fails`.)
fn strict(ini: &Path, env: &str) -> Result<Settings, Error> {
    let settings = Settings::load(ini, env)?;
    settings.master_account()?;
    Ok(settings)
}

fn load(text: &str) -> (tempfile::TempDir, PathBuf, Result<Settings, Error>) {
    let (root, ini) = write_ini(text);
    let result = strict(&ini, "prod");
    (root, ini, result)
}

/// The error message for `text`, with the INI path replaced by `INI`.
fn error_of(text: &str) -> String {
    let (_root, ini, result) = load(text);
    let e = result.expect_err("must fail");
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    e.to_string().replace(&ini.display().to_string(), "INI")
}

const SMTP: &str = "[prod]\nemail.EMAIL = \"a@pcr.com\"\nemail.OUTGOING_TRANSPORT_TYPE = SMTP\n";

#[test]
fn seed_configuration_loads_every_value() {
    let root = tempfile::tempdir().unwrap();
    let configs = root.path().join("configs");
    std::fs::create_dir(&configs).unwrap();
    let ini = configs.join("pcr360.ini");
    std::fs::copy(fixture("seed.ini"), &ini).unwrap();
    let root = std::fs::canonicalize(root.path()).unwrap();
    let ini = root.join("configs/pcr360.ini");

    let s = Settings::load(&ini, "prod").unwrap();
    assert_eq!(s.config_file, ini);
    assert_eq!(s.environment, "prod");
    assert!(s.send_email);
    assert!(!s.disable_email);
    assert_eq!(s.state_dir, root.join("email-state"));
    assert_eq!(s.key_file, root.join("configs/pcr360-email.key"));
    assert_eq!(s.log_file, None);
    assert_eq!(s.sysadmin, None);
    assert_eq!(s.sd_number_pattern, DEFAULT_SD_NUMBER_PATTERN);
    assert_eq!(
        s.defaults,
        AccountDefaults {
            file_path: root.join("email"),
            sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
            timeout: Duration::from_secs(30),
            incoming_folder: "INBOX".into(),
            processed_action: ProcessedAction::Seen,
            max_messages: 500,
            max_message_bytes: 50 * 1024 * 1024,
            tls: TlsSettings {
                verify_cert: true,
                ca_file: None
            },
        }
    );
    let m = s.master.as_ref().expect("master account");
    let expected = Account {
        id: AccountId::Master,
        tenants_recid: 0,
        account_type: AccountType::Master,
        email: "testtest@pcr.com".into(),
        display_name: Some("PCR-360 Master (team360)".into()),
        login: Some("testtest@pcr.com".into()),
        password: Some(Secret::new("testPassword23455")),
        outgoing: Some(Outgoing {
            transport: TransportType::Smtp,
            host: Some("mail.pcr.com".into()),
            port: 465,
            ssl: SslMode::Ssl,
        }),
        incoming: Some(Incoming {
            mailbox: MailboxType::Imap,
            host: Some("mail.pcr.com".into()),
            port: 993,
            ssl: SslMode::Ssl,
            folder: "INBOX".into(),
            path: None,
            processed_action: ProcessedAction::Seen,
            max_messages: 500,
            max_message_bytes: 50 * 1024 * 1024,
        }),
        sysadmin: None,
        tls: TlsSettings::default(),
        file_path: root.join("email"),
        sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
        timeout: Duration::from_secs(30),
        auth_type: Default::default(),
        oauth: None,
    };
    assert_eq!(*m, expected);
    // A plain password never creates the key file.
    assert!(!s.key_file.exists());

    // [test : prod]: SEND_EMAIL off, FILE transport into a relative directory.
    let t = Settings::load(&ini, "test").unwrap();
    assert!(!t.send_email);
    assert!(!t.disable_email);
    let out = t.master.as_ref().unwrap().outgoing.as_ref().unwrap();
    assert_eq!(out.transport, TransportType::File);
    assert_eq!(out.host, None);
    assert_eq!(t.defaults.file_path, root.join("configs/../email-test"));
    assert_eq!(
        t.master.as_ref().unwrap().file_path,
        root.join("configs/../email-test")
    );
    // Inherited values are kept.
    assert_eq!(t.master.as_ref().unwrap().incoming, expected.incoming);

    // [dev : test] : prod.
    let d = Settings::load(&ini, "dev").unwrap();
    assert!(d.disable_email);
    assert_eq!(d.sysadmin.as_deref(), Some("admin@pcr.com"));
    assert_eq!(d.master.unwrap().sysadmin.as_deref(), Some("admin@pcr.com"));
}

#[test]
fn an_mbox_master_reads_the_file_named_by_incoming_path() {
    let (root, ini, result) = load(concat!(
        "[prod]\n",
        "email.EMAIL = sd@pcr.edu\n",
        "email.INCOMING_MAILBOX_TYPE = \"MBOX\"\n",
        "email.INCOMING_PATH = ../mail/servicedesk\n",
        "email.PROCESSED_ACTION = delete\n",
    ));
    let inc = result.unwrap().master.unwrap().incoming.unwrap();
    assert_eq!(inc.mailbox, MailboxType::Mbox);
    assert_eq!(
        inc.path,
        Some(ini.parent().unwrap().join("../mail/servicedesk"))
    );
    assert_eq!(inc.processed_action, ProcessedAction::Delete);
    assert_eq!(inc.port, 0);
    drop(root);
}

#[test]
fn our_keys_and_relative_paths() {
    let (root, ini, result) = load(concat!(
        "[prod]\n",
        "email.EMAIL = sd@pcr.edu\n",
        "email.INCOMING_MAILBOX_TYPE = MAILDIR\n",
        "email.INCOMING_PATH = ../mail/Maildir\n",
        "email.STATE_DIR = /var/lib/pcr-email\n",
        "email.KEY_FILE = secret/email.key\n",
        "email.LOG_FILE = ../logs/email.log\n",
        "email.SENDMAIL_PATH = /usr/local/bin/msmtp\n",
        "email.INCOMING_FOLDER = Support\n",
        "email.PROCESSED_ACTION = move:Done\n",
        "email.TIMEOUT = 12\n",
        "email.MAX_MESSAGES = 20\n",
        "email.MAX_MESSAGE_BYTES = 2M\n",
        "email.SD_NUMBER_PATTERN = \"\\bSD\\d{5}\\b\"\n",
        "email.VERIFY_CERT = off\n",
        "email.SYSADMIN = \"ops@pcr.edu, boss@pcr.edu\"\n",
    ));
    let s = result.unwrap();
    let dir = ini.parent().unwrap();
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/pcr-email"));
    assert_eq!(s.key_file, dir.join("secret/email.key"));
    assert_eq!(s.log_file, Some(dir.join("../logs/email.log")));
    assert_eq!(s.sd_number_pattern, r"\bSD\d{5}\b");
    assert_eq!(s.sysadmin.as_deref(), Some("ops@pcr.edu, boss@pcr.edu"));
    assert_eq!(
        s.defaults.sendmail_path,
        PathBuf::from("/usr/local/bin/msmtp")
    );
    assert_eq!(s.defaults.timeout, Duration::from_secs(12));
    assert!(!s.defaults.tls.verify_cert);
    let m = s.master.unwrap();
    assert_eq!(m.outgoing, None);
    assert_eq!(m.timeout, Duration::from_secs(12));
    assert!(!m.tls.verify_cert);
    let inc = m.incoming.unwrap();
    assert_eq!(inc.mailbox, MailboxType::Maildir);
    assert_eq!(inc.path, Some(dir.join("../mail/Maildir")));
    assert_eq!(inc.folder, "Support");
    assert_eq!(inc.processed_action, ProcessedAction::Move("Done".into()));
    assert_eq!(inc.max_messages, 20);
    assert_eq!(inc.max_message_bytes, 2 * 1024 * 1024);
    drop(root);
}

#[test]
fn default_ports_follow_the_ssl_setting() {
    let cases = [
        ("SMTP", "SSL", "OUTGOING", 465),
        ("SMTP", "TLS", "OUTGOING", 587),
        ("SMTP", "", "OUTGOING", 25),
        ("IMAP", "SSL", "INCOMING", 993),
        ("IMAP", "TLS", "INCOMING", 143),
        ("IMAP", "", "INCOMING", 143),
        ("POP3", "SSL", "INCOMING", 995),
        ("POP3", "", "INCOMING", 110),
    ];
    for (kind, ssl, side, port) in cases {
        let type_key = if side == "OUTGOING" {
            "OUTGOING_TRANSPORT_TYPE"
        } else {
            "INCOMING_MAILBOX_TYPE"
        };
        let text = format!(
            "[prod]\nemail.EMAIL = a@b.c\nemail.{type_key} = {kind}\nemail.{side}_HOST = h\nemail.{side}_SSL = \"{ssl}\"\n"
        );
        let (_r, _i, result) = load(&text);
        let m = result.unwrap().master.unwrap();
        let got = if side == "OUTGOING" {
            m.outgoing.unwrap().port
        } else {
            m.incoming.unwrap().port
        };
        assert_eq!(got, port, "{kind} {ssl}");
    }
}

#[test]
fn constants_read_as_php_reads_them() {
    // PHP's truthiness of what parse_ini_file returns: "" and "0" are false, anything else is
    // true. A bare false/off/no/none is "" there; a quoted one stays text, and so is true.
    let cases = [
        ("true", true, false),
        ("on", true, false),
        ("yes", true, false),
        ("1", true, false),
        ("\"TRUE\"", true, false),
        ("false", false, false),
        ("off", false, false),
        ("no", false, false),
        ("none", false, false),
        ("0", false, false),
        ("\"0\"", false, false),
        ("\"\"", false, false),
        ("", false, false),
        ("'No'", true, true),
        ("\"false\"", true, true),
        ("\"off\"", true, true),
        ("\"no\"", true, true),
        ("sometimes", true, true),
    ];
    for (text, value, warned) in cases {
        let (_r, ini, result) = load(&format!(
            "[prod]\nconstants.SEND_EMAIL = {text}\nconstants.DISABLE_EMAIL = {text}\n"
        ));
        let s = result.unwrap();
        assert_eq!(s.send_email, value, "{text}");
        assert_eq!(s.disable_email, value, "{text}");
        assert!(s.master.is_none());
        if warned {
            assert_eq!(s.warnings.len(), 2, "{text}: {:?}", s.warnings);
            let w = &s.warnings[0];
            assert!(
                w.starts_with(&format!(
                    "constants.SEND_EMAIL = {text} ({}:2) reads as TRUE",
                    ini.display()
                )) || w.starts_with(&format!(
                    "constants.SEND_EMAIL = \"{}\" ({}:2) reads as TRUE",
                    text.trim_matches(['\'', '"']),
                    ini.display()
                )),
                "{w}"
            );
            assert!(
                s.warnings[1].contains(":3) reads as TRUE"),
                "{:?}",
                s.warnings
            );
        } else {
            assert_eq!(s.warnings, Vec::<String>::new(), "{text}");
        }
    }
    let (_r, _i, result) = load("[prod]\nconstants.SEND_EMAIL = \"false\"\n");
    let w = &result.unwrap().warnings[0];
    assert!(
        w.contains("a quoted value is text to PHP, not a boolean")
            && w.contains("write constants.SEND_EMAIL = false without quotes"),
        "{w}"
    );
    let (_r, _i, result) = load("[prod]\n");
    let s = result.unwrap();
    assert!(s.send_email && !s.disable_email && s.master.is_none());
}

#[test]
fn values_the_product_writes() {
    // SSL as a boolean; no port where the transport uses none.
    let (_r, _i, result) = load(&format!(
        "{SMTP}email.OUTGOING_HOST = h\nemail.OUTGOING_SSL = true\n\
         email.INCOMING_MAILBOX_TYPE = IMAP\nemail.INCOMING_HOST = i\nemail.INCOMING_SSL = 1\n"
    ));
    let m = result.unwrap().master.unwrap();
    let out = m.outgoing.unwrap();
    assert_eq!((out.ssl, out.port), (SslMode::Ssl, 465));
    let inc = m.incoming.unwrap();
    assert_eq!((inc.ssl, inc.port), (SslMode::Ssl, 993));
    for (ssl, want) in [
        ("yes", SslMode::Ssl),
        ("on", SslMode::Ssl),
        ("\"true\"", SslMode::Ssl),
        ("false", SslMode::None),
        ("off", SslMode::None),
        ("0", SslMode::None),
        ("\"no\"", SslMode::None),
        ("\"\"", SslMode::None),
    ] {
        let (_r, _i, result) = load(&format!(
            "{SMTP}email.OUTGOING_HOST = h\nemail.OUTGOING_SSL = {ssl}\n"
        ));
        assert_eq!(
            result.unwrap().master.unwrap().outgoing.unwrap().ssl,
            want,
            "{ssl}"
        );
    }
    for port in ["0", "\"\"", "\"0\"", "25"] {
        let (_r, _i, result) = load(&format!(
            "[prod]\nemail.EMAIL = a@b.c\nemail.OUTGOING_TRANSPORT_TYPE = FILE\n\
             email.OUTGOING_PORT = {port}\nemail.INCOMING_MAILBOX_TYPE = MAILDIR\n\
             email.INCOMING_PATH = Maildir\nemail.INCOMING_PORT = {port}\n"
        ));
        let m = result.unwrap().master.unwrap();
        assert_eq!(m.outgoing.unwrap().port, 0, "{port}");
        assert_eq!(m.incoming.unwrap().port, 0, "{port}");
    }
    // SMTP does use its port: 0 is still refused there.
    let e = error_of(&format!(
        "{SMTP}email.OUTGOING_HOST = h\nemail.OUTGOING_PORT = 0\n"
    ));
    assert!(e.contains("`0` is not a port number"), "{e}");
}

#[test]
fn a_broken_master_is_an_account_that_fails() {
    for (tail, key) in [
        (
            "email.OUTGOING_HOST = h\nemail.OUTGOING_SSL = maybe\n",
            "email.OUTGOING_SSL",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.password = x\n",
            "email.password",
        ),
        ("", "email.OUTGOING_HOST"),
    ] {
        let (_r, ini) = write_ini(&format!("{SMTP}{tail}"));
        let s = Settings::load(&ini, "prod").expect("the settings themselves load");
        assert!(s.master.is_none());
        let failed = s.master_failed.as_ref().expect("a failed master");
        assert_eq!(failed.id, AccountId::Master);
        assert_eq!(failed.account_type, AccountType::Master);
        assert!(failed.sends && !failed.receives);
        assert_eq!(failed.email, "a@pcr.com");
        let e = s.master_account().unwrap_err().to_string();
        assert!(e.contains(&format!("account master, key {key})")), "{e}");
    }
    // The shared settings are still the whole file's errors.
    for tail in [
        "email.STATE_DIR = APPLICATION_PATH \"/x\"\n",
        "email.TIMEOUT = 0\n",
        "email.timeout = 5\n",
    ] {
        let (_r, ini) = write_ini(&format!("{SMTP}{tail}"));
        assert!(Settings::load(&ini, "prod").is_err(), "{tail}");
    }
    // A misspelled master key alone still names a (failed) master account.
    let (_r, ini) = write_ini("[prod]\nemail.Email = a@b.c\n");
    let s = Settings::load(&ini, "prod").unwrap();
    assert!(s.master_failed.is_some());
}

#[test]
fn master_exists_only_when_named() {
    // Operational keys alone do not make a master account, but still set the defaults.
    let (_r, _i, result) = load("[prod]\nemail.TIMEOUT = 5\nemail.PASSWORD = x\n");
    let s = result.unwrap();
    assert!(s.master.is_none());
    assert_eq!(s.defaults.timeout, Duration::from_secs(5));
    // Any one of the three keys does.
    for key in [
        "OUTGOING_TRANSPORT_TYPE = FILE",
        "INCOMING_MAILBOX_TYPE = POP3",
    ] {
        let e = error_of(&format!("[prod]\nemail.{key}\n"));
        assert_eq!(
            e,
            "email configuration error (INI:1, account master, key email.EMAIL): \
             email.EMAIL is required (the account's address, used as From)"
        );
    }
    let (_r, _i, result) = load("[prod]\nemail.EMAIL = a@b.c\n");
    let m = result.unwrap().master.unwrap();
    assert_eq!((m.outgoing, m.incoming), (None, None));
}

#[test]
fn bad_values_name_file_line_and_key() {
    let cases: &[(&str, &str)] = &[
        (
            "email.OUTGOING_HOST = h\nemail.OUTGOING_PORT = abc\n",
            "(INI:5, account master, key email.OUTGOING_PORT): `abc` is not a port number (1 to 65535)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.OUTGOING_PORT = 0\n",
            "(INI:5, account master, key email.OUTGOING_PORT): `0` is not a port number (1 to 65535)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.OUTGOING_PORT = 65536\n",
            "(INI:5, account master, key email.OUTGOING_PORT): `65536` is not a port number (1 to 65535)",
        ),
        (
            "",
            "(INI:1, account master, key email.OUTGOING_HOST): email.OUTGOING_HOST is required for SMTP",
        ),
        (
            "email.OUTGOING_HOST = \"mail.pcr.com:587\"\n",
            "(INI:4, account master, key email.OUTGOING_HOST): `mail.pcr.com:587` must be a host name only (the port goes in the PORT key)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.OUTGOING_SSL = maybe\n",
            "(INI:5, account master, key email.OUTGOING_SSL): `maybe` is not an SSL setting (expected SSL, TLS or empty, or a boolean: true/1/yes/on = SSL, false/0/no/off = none)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.OUTGOING_SSL = \"STARTSSL\"\n",
            "(INI:5, account master, key email.OUTGOING_SSL): `STARTSSL` is not an SSL setting (expected SSL, TLS or empty, or a boolean: true/1/yes/on = SSL, false/0/no/off = none)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.INCOMING_MAILBOX_TYPE = IMAP\n",
            "(INI:1, account master, key email.INCOMING_HOST): email.INCOMING_HOST is required for IMAP",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.INCOMING_MAILBOX_TYPE = pop3\nemail.INCOMING_HOST = p\nemail.INCOMING_PORT = 99999\n",
            "(INI:7, account master, key email.INCOMING_PORT): `99999` is not a port number (1 to 65535)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.INCOMING_MAILBOX_TYPE = MAILDIR\n",
            "(INI:1, account master, key email.INCOMING_PATH): email.INCOMING_PATH is required for MAILDIR (the Maildir directory)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.INCOMING_MAILBOX_TYPE = MBOX\n",
            "(INI:1, account master, key email.INCOMING_PATH): email.INCOMING_PATH is required for MBOX (the mbox file)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.INCOMING_MAILBOX_TYPE = EXCHANGE\n",
            "(INI:5, account master, key email.INCOMING_MAILBOX_TYPE): unknown incoming mailbox type `EXCHANGE` (expected IMAP, POP3, MAILDIR or MBOX)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.INCOMING_MAILBOX_TYPE = OFFICE365\n",
            "(INI:5, account master, key email.INCOMING_MAILBOX_TYPE): OFFICE365 can only be configured on a tenant email account, not in the INI file",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.TIMEOUT = 0\n",
            "(INI:5, account master, key email.TIMEOUT): `0` is not a whole number of seconds from 1 to 3600",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.MAX_MESSAGES = many\n",
            "(INI:5, account master, key email.MAX_MESSAGES): `many` is not a whole number of messages from 1 to 100000",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.MAX_MESSAGE_BYTES = 10X\n",
            "(INI:5, account master, key email.MAX_MESSAGE_BYTES): `10X` is not a size of at least 1K (bytes, or a number with K, M or G)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.PROCESSED_ACTION = archive\n",
            "(INI:5, account master, key email.PROCESSED_ACTION): `archive` is not seen, delete or move:<folder>",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.VERIFY_CERT = maybe\n",
            "(INI:5, account master, key email.VERIFY_CERT): `maybe` is not a boolean (true/false, on/off, yes/no, 1/0)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.CA_FILE = missing-ca.pem\n",
            "(INI:5, account master, key email.CA_FILE): the CA file INIDIR/missing-ca.pem does not exist or is not a file",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.SD_NUMBER_PATTERN = \"(IQ\\d+\"\n",
            "(INI:5, account master, key email.SD_NUMBER_PATTERN): is not a valid regular expression: error: unclosed group",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.FILE_PATH = APPLICATION_PATH \"/../email\"\n",
            "(INI:5, account master, key email.FILE_PATH): uses the PHP constant APPLICATION_PATH, which the email extension cannot resolve; write the path itself (relative paths are relative to the INI file's directory)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.SENDMAIL_PATH = \"/usr/sbin/sendmail -t -i\"\n",
            "(INI:5, account master, key email.SENDMAIL_PATH): must be the sendmail program's path only, without options",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.password = x\n",
            "(INI:5, account master, key email.password): unknown key email.password: did you mean email.PASSWORD? (INI keys are case-sensitive)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.SYSADMIN = \"ops@pcr.edu, nobody\"\n",
            "(INI:5, account master, key email.SYSADMIN): `nobody` is not an email address (expected name@domain)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.ACCOUNT_TYPE = service_desk\n",
            "(INI:5, account master, key email.ACCOUNT_TYPE): the INI account is the master account; `service_desk` is not allowed here (write master, or leave it out)",
        ),
        (
            "email.OUTGOING_HOST = h\nemail.TENANTS_RECID = one\n",
            "(INI:5, account master, key email.TENANTS_RECID): `one` is not a whole number",
        ),
    ];
    for (extra, expected) in cases {
        let (_root, ini, result) = load(&format!("{SMTP}{extra}"));
        let e = result.expect_err(extra).to_string();
        let dir = ini.parent().unwrap().display().to_string();
        let e = e
            .replace(&ini.display().to_string(), "INI")
            .replace(&dir, "INIDIR");
        assert_eq!(
            e,
            format!("email configuration error {expected}"),
            "for {extra:?}"
        );
    }
}

#[test]
fn cloud_transports_are_refused_in_the_ini() {
    for kind in ["OFFICE365", "GMAIL", "gmail"] {
        let e = error_of(&format!(
            "[prod]\nemail.EMAIL = a@pcr.com\nemail.OUTGOING_TRANSPORT_TYPE = {kind}\n"
        ));
        assert_eq!(
            e,
            format!(
                "email configuration error (INI:3, account master, key \
                 email.OUTGOING_TRANSPORT_TYPE): {} can only be configured on a tenant email \
                 account, not in the INI file",
                kind.to_uppercase()
            )
        );
    }
    let e = error_of("[prod]\nemail.EMAIL = a@pcr.com\nemail.OUTGOING_TRANSPORT_TYPE = MAPI\n");
    assert!(
        e.ends_with("unknown outgoing transport type `MAPI` (expected FILE, SENDMAIL or SMTP)"),
        "{e}"
    );
}

#[test]
fn hostile_values_are_refused() {
    // A quoted value may span lines in PHP; an address must not.
    let e = error_of("[prod]\nemail.EMAIL = \"a@pcr.com\nBcc: victim@x.y\"\n");
    assert_eq!(
        e,
        "email configuration error (INI:2, account master, key email.EMAIL): \
         `a@pcr.com\\nBcc: victim@x.y` contains a line break or control character"
    );
    let e = error_of(&format!(
        "{SMTP}email.OUTGOING_HOST = h\nemail.DISPLAY_NAME = \"PCR\nBcc: x@y.z\"\n"
    ));
    assert!(
        e.contains("(INI:5, account master, key email.DISPLAY_NAME): contains a line break"),
        "{e}"
    );
    let e = error_of(&format!(
        "{SMTP}email.OUTGOING_HOST = h\nemail.PASSWORD = \"pw\nQUIT\"\n"
    ));
    assert!(
        e.contains("key email.PASSWORD): the password contains a line break"),
        "{e}"
    );
    assert!(!e.contains("QUIT"));
    let e = error_of(&format!(
        "{SMTP}email.OUTGOING_HOST = \"ssl://mail.pcr.com\"\n"
    ));
    assert!(
        e.contains("must be a host name only (the encryption goes in the SSL key)"),
        "{e}"
    );
}

#[test]
fn inherited_errors_point_at_the_parent_line() {
    let (_root, ini, _) = load("");
    std::fs::write(
        &ini,
        "[prod]\nemail.EMAIL = a@b.c\nemail.OUTGOING_TRANSPORT_TYPE = SMTP\nemail.OUTGOING_HOST = h\nemail.OUTGOING_PORT = x25\n[test : prod]\nconstants.SEND_EMAIL = 0\n",
    )
    .unwrap();
    let e = strict(&ini, "test").unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "{}:5, account master, key email.OUTGOING_PORT",
            ini.display()
        )),
        "{e}"
    );
    // Overriding the bad key in the child fixes the child.
    std::fs::write(
        &ini,
        "[prod]\nemail.EMAIL = a@b.c\nemail.OUTGOING_TRANSPORT_TYPE = SMTP\nemail.OUTGOING_HOST = h\nemail.OUTGOING_PORT = x25\n[test : prod]\nemail.OUTGOING_PORT = 2525\n",
    )
    .unwrap();
    assert_eq!(
        Settings::load(&ini, "test")
            .unwrap()
            .master
            .unwrap()
            .outgoing
            .unwrap()
            .port,
        2525
    );
}

#[test]
fn file_and_section_errors() {
    let (_root, ini, _) = load("");
    let missing = ini.with_file_name("nope.ini");
    let e = Settings::load(&missing, "prod").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "email configuration error ({}): cannot read",
            missing.display()
        )),
        "{e}"
    );

    assert_eq!(
        error_of("[production]\n"),
        "email configuration error (INI): environment [prod] is not defined (sections: production)"
    );
    assert_eq!(
        error_of("[prod : base]\n"),
        "email configuration error (INI:1): section [prod] extends [base], which is not defined"
    );
    assert_eq!(
        error_of("[base : prod]\n[prod : base]\n"),
        "email configuration error (INI:1): sections extend each other in a cycle: prod : base : prod"
    );
    assert_eq!(
        error_of("[prod]\nemail.EMAIL = \"a@b.c\n"),
        "email configuration error (INI:2): unterminated double-quoted value"
    );
    assert_eq!(
        error_of("[prod]\nemail.EMAIL a@b.c\n"),
        "email configuration error (INI:2): line is not `key = value`, a [section] or a comment"
    );
}

#[test]
fn encrypted_master_password() {
    let (root, ini) = write_ini("");
    let key_file = ini.parent().unwrap().join("pcr360-email.key");
    let store = KeyStore::open(&key_file).unwrap();
    let enc = store.encrypt("s3cret-master");
    std::fs::write(
        &ini,
        format!("{SMTP}email.OUTGOING_HOST = h\nemail.PASSWORD = \"{enc}\"\n"),
    )
    .unwrap();
    let m = Settings::load(&ini, "prod").unwrap().master.unwrap();
    assert_eq!(m.password.as_ref().unwrap().expose(), "s3cret-master");

    // Another installation's key: a clear error at the line, naming both key ids.
    let other = KeyStore::from_key([3; 32]).encrypt("s3cret-master");
    std::fs::write(
        &ini,
        format!("{SMTP}email.OUTGOING_HOST = h\nemail.PASSWORD = \"{other}\"\n"),
    )
    .unwrap();
    let e = strict(&ini, "prod").unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "{}:5, account master, key email.PASSWORD",
            ini.display()
        )),
        "{e}"
    );
    assert!(
        e.contains("encrypted with another key") && e.contains(store.key_id()),
        "{e}"
    );

    // Tampered.
    let mut bad = enc.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == 'A' { 'B' } else { 'A' });
    std::fs::write(
        &ini,
        format!("{SMTP}email.OUTGOING_HOST = h\nemail.PASSWORD = {bad}\n"),
    )
    .unwrap();
    let e = strict(&ini, "prod").unwrap_err().to_string();
    assert!(
        e.contains("cannot be decrypted (tampered or wrong key)") || e.contains("malformed"),
        "{e}"
    );

    // The key file gone: the error says so instead of creating a new key.
    std::fs::remove_file(&key_file).unwrap();
    std::fs::write(
        &ini,
        format!("{SMTP}email.OUTGOING_HOST = h\nemail.PASSWORD = \"{enc}\"\n"),
    )
    .unwrap();
    let e = strict(&ini, "prod").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "email configuration error ({}:5, account master, key email.PASSWORD): cannot \
             decrypt this value: the key file does not exist",
            ini.display()
        )),
        "{e}"
    );
    assert!(
        e.ends_with(&format!("(key file {})", key_file.display())),
        "{e}"
    );
    assert!(!key_file.exists());

    // A key file others can read is refused.
    let store = KeyStore::open(&key_file).unwrap();
    let enc = store.encrypt("pw");
    std::fs::write(
        &ini,
        format!("{SMTP}email.OUTGOING_HOST = h\nemail.PASSWORD = \"{enc}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = strict(&ini, "prod").unwrap_err().to_string();
    assert!(e.contains("key email.PASSWORD): cannot decrypt this value: the key file is open to others (mode 0644)"), "{e}");
    drop(root);
}

#[test]
fn no_secret_in_any_error_or_debug() {
    let secret = "Zq9-TopSecret-Value";
    let bad_tails = [
        "email.OUTGOING_PORT = 99999\n",
        "email.OUTGOING_SSL = nope\n",
        "email.INCOMING_MAILBOX_TYPE = IMAP\n",
        "email.TIMEOUT = -1\n",
        "email.PASSWORD = \"ENC:v1:00000000:AAAA\"\n",
        "email.EMAIL = \"bad address\"\n",
        "broken line\n",
        "x = \"unterminated\n",
    ];
    for tail in bad_tails {
        let text = format!(
            "{SMTP}email.OUTGOING_HOST = h\nemail.PASSWORD = '{secret}'\nemail.LOGIN = u\n{tail}"
        );
        let (_r, _i, result) = load(&text);
        let e = result.expect_err(tail);
        assert!(!e.to_string().contains(secret), "{e}");
        assert!(!format!("{e:?}").contains(secret), "{e:?}");
    }
    let (_r, _i, result) = load(&format!(
        "{SMTP}email.OUTGOING_HOST = h\nemail.PASSWORD = '{secret}'\n"
    ));
    let s = result.unwrap();
    assert!(!format!("{s:?}").contains(secret));
    let view = s.master.as_ref().unwrap().public_view().to_string();
    assert!(!view.contains(secret), "{view}");
}

#[test]
fn key_file_for_needs_only_the_key_setting() {
    // The rest of the configuration may be broken: encrypting a password still works.
    let (_root, ini, _) = load("[prod]\nemail.OUTGOING_PORT = bad\nemail.KEY_FILE = keys/k\n");
    assert_eq!(
        Settings::key_file_for(&ini, "prod").unwrap(),
        ini.parent().unwrap().join("keys/k")
    );
    let (_root, ini, _) = load("[prod]\n");
    assert_eq!(
        Settings::key_file_for(&ini, "prod").unwrap(),
        ini.parent().unwrap().join("pcr360-email.key")
    );
}
