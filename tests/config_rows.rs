//! Tenant rows (as PHP hands them over) → accounts: normalisation, fallbacks to the INI's
//! defaults, OAuth settings, and errors that name the account and key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pcr_email::config::secrets::KeyStore;
use pcr_email::config::*;
use pcr_email::Error;
use serde_json::json;

struct Env {
    _root: tempfile::TempDir,
    dir: PathBuf,
    settings: Settings,
    keys: KeyStore,
}

fn env_with(ini_text: &str) -> Env {
    let root = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(root.path()).unwrap().join("configs");
    std::fs::create_dir(&dir).unwrap();
    let ini = dir.join("pcr360.ini");
    std::fs::write(&ini, ini_text).unwrap();
    let settings = Settings::load(&ini, "prod").unwrap();
    let keys = KeyStore::open(&settings.key_file).unwrap();
    Env {
        _root: root,
        dir,
        settings,
        keys,
    }
}

fn env() -> Env {
    env_with("[prod]\nemail.TIMEOUT = 17\nemail.VERIFY_CERT = false\nemail.MAX_MESSAGES = 42\n")
}

fn row_err(env: &Env, row: serde_json::Value) -> String {
    let e = account_from_row(&row, &env.settings, &env.keys).expect_err("must fail");
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    e.to_string().replace(&env.dir.display().to_string(), "DIR")
}

fn sd_row() -> serde_json::Value {
    json!({
        "RECID": 12,
        "TENANTS_RECID": "3",
        "ACCOUNT_TYPE": "Service Desk",
        "EMAIL": "help@tenant3.edu",
        "DISPLAY_NAME": "Tenant 3 Help Desk",
        "LOGIN": "help",
        "PASSWORD": "pw-12",
        "OUTGOING_TRANSPORT_TYPE": "SMTP",
        "OUTGOING_HOST": "smtp.tenant3.edu",
        "OUTGOING_PORT": 587,
        "OUTGOING_SSL": "TLS",
        "INCOMING_MAILBOX_TYPE": "IMAP",
        "INCOMING_HOST": "imap.tenant3.edu",
        "INCOMING_PORT": "993",
        "INCOMING_SSL": "SSL",
        "SYSADMIN": "ops@tenant3.edu",
        "MODIFIED_BY": "someone",
        "CREATED_DATE": "2024-01-01 10:00:00"
    })
}

#[test]
fn a_service_desk_row_with_defaults_from_the_ini() {
    let env = env();
    let a = account_from_row(&sd_row(), &env.settings, &env.keys).unwrap();
    assert_eq!(a.id, AccountId::Tenant(12));
    assert_eq!(a.tenants_recid, 3);
    assert_eq!(a.account_type, AccountType::ServiceDesk);
    assert_eq!(a.email, "help@tenant3.edu");
    assert_eq!(a.display_name.as_deref(), Some("Tenant 3 Help Desk"));
    assert_eq!(a.login_name(), "help");
    assert_eq!(a.password.as_ref().unwrap().expose(), "pw-12");
    assert_eq!(
        a.outgoing,
        Some(Outgoing {
            transport: TransportType::Smtp,
            host: Some("smtp.tenant3.edu".into()),
            port: 587,
            ssl: SslMode::StartTls,
        })
    );
    let inc = a.incoming.as_ref().unwrap();
    assert_eq!(inc.mailbox, MailboxType::Imap);
    assert_eq!(inc.host.as_deref(), Some("imap.tenant3.edu"));
    assert_eq!(inc.port, 993);
    assert_eq!(inc.ssl, SslMode::Ssl);
    assert_eq!(inc.folder, "INBOX");
    assert_eq!(inc.processed_action, ProcessedAction::Seen);
    // From the INI's email.* operational keys.
    assert_eq!(inc.max_messages, 42);
    assert_eq!(a.timeout, Duration::from_secs(17));
    assert!(!a.tls.verify_cert);
    assert_eq!(a.file_path, env.settings.defaults.file_path);
    assert_eq!(a.sendmail_path, PathBuf::from("/usr/sbin/sendmail"));
    assert_eq!(a.sysadmin.as_deref(), Some("ops@tenant3.edu"));
    assert_eq!(a.oauth, None);
}

#[test]
fn keys_are_case_insensitive_and_null_or_empty_means_absent() {
    let env = env();
    let a = account_from_row(
        &json!({
            "recid": "7", "Account_Type": "default", "email": "d@t.edu",
            "outgoing_transport_type": "file", "FILE_PATH": "../tenant-mail",
            "TIMEOUT": 3, "VERIFY_CERT": true, "DISPLAY_NAME": null, "LOGIN": "",
            "PASSWORD": null, "OUTGOING_SSL": "", "OUTGOING_PORT": null
        }),
        &env.settings,
        &env.keys,
    )
    .unwrap();
    assert_eq!(a.id, AccountId::Tenant(7));
    assert_eq!(a.account_type, AccountType::Default);
    assert_eq!(a.tenants_recid, 0);
    assert_eq!(a.display_name, None);
    assert_eq!(a.login, None);
    assert_eq!(a.password, None);
    assert_eq!(a.outgoing.as_ref().unwrap().transport, TransportType::File);
    assert_eq!(a.file_path, env.dir.join("../tenant-mail"));
    assert_eq!(a.timeout, Duration::from_secs(3));
    assert!(a.tls.verify_cert);
}

#[test]
fn account_type_spellings() {
    let env = env();
    for (text, kind) in [
        ("default", AccountType::Default),
        ("Default", AccountType::Default),
        ("DEFAULT", AccountType::Default),
        ("service_desk", AccountType::ServiceDesk),
        ("Service Desk", AccountType::ServiceDesk),
        ("SERVICE_DESK", AccountType::ServiceDesk),
    ] {
        let row = json!({"RECID": 1, "ACCOUNT_TYPE": text, "EMAIL": "a@b.c"});
        let a = account_from_row(&row, &env.settings, &env.keys).unwrap();
        assert_eq!(a.account_type, kind, "{text}");
    }
    assert_eq!(
        row_err(
            &env,
            json!({"RECID": 1, "ACCOUNT_TYPE": "master", "EMAIL": "a@b.c"})
        ),
        "email configuration error (account 1, key ACCOUNT_TYPE): a tenant account cannot be \
         the master account (that one is in the INI file)"
    );
    assert_eq!(
        row_err(
            &env,
            json!({"RECID": 1, "ACCOUNT_TYPE": "admin", "EMAIL": "a@b.c"})
        ),
        "email configuration error (account 1, key ACCOUNT_TYPE): unknown account type `admin` \
         (expected default or service_desk)"
    );
    assert_eq!(
        row_err(&env, json!({"RECID": 1, "EMAIL": "a@b.c"})),
        "email configuration error (account 1, key ACCOUNT_TYPE): ACCOUNT_TYPE is required \
         (default or service_desk)"
    );
}

#[test]
fn a_default_account_never_receives() {
    let env = env();
    // Even broken incoming settings are dropped unread.
    let row = json!({
        "RECID": 5, "ACCOUNT_TYPE": "default", "EMAIL": "d@t.edu",
        "OUTGOING_TRANSPORT_TYPE": "SENDMAIL",
        "INCOMING_MAILBOX_TYPE": "IMAP", "INCOMING_PORT": "not a port",
        "PROCESSED_ACTION": "explode"
    });
    let a = account_from_row(&row, &env.settings, &env.keys).unwrap();
    assert_eq!(a.incoming, None);
    assert_eq!(a.outgoing.unwrap().transport, TransportType::Sendmail);
}

#[test]
fn bad_rows_name_the_account_and_key() {
    let env = env();
    let base = || {
        json!({"RECID": 12, "ACCOUNT_TYPE": "service_desk", "EMAIL": "sd@t.edu",
               "OUTGOING_TRANSPORT_TYPE": "SMTP", "OUTGOING_HOST": "smtp.t.edu"})
    };
    let with = |k: &str, v: serde_json::Value| {
        let mut row = base();
        row[k] = v;
        row
    };
    let cases = [
        (with("OUTGOING_PORT", json!("smtp")), "(account 12, key OUTGOING_PORT): `smtp` is not a port number (1 to 65535)"),
        (with("OUTGOING_PORT", json!(70000)), "(account 12, key OUTGOING_PORT): `70000` is not a port number (1 to 65535)"),
        (with("OUTGOING_PORT", json!(465.5)), "(account 12, key OUTGOING_PORT): `465.5` is not a port number (1 to 65535)"),
        (with("OUTGOING_HOST", json!(null)), "(account 12, key OUTGOING_HOST): OUTGOING_HOST is required for SMTP"),
        (with("OUTGOING_TRANSPORT_TYPE", json!("MAPI")), "(account 12, key OUTGOING_TRANSPORT_TYPE): unknown outgoing transport type `MAPI` (expected FILE, SENDMAIL, SMTP, OFFICE365 or GMAIL)"),
        (with("OUTGOING_SSL", json!("SSLv3")), "(account 12, key OUTGOING_SSL): `SSLv3` is not an SSL setting (expected SSL, TLS or empty, or a boolean: true/1/yes/on = SSL, false/0/no/off = none)"),
        (with("INCOMING_MAILBOX_TYPE", json!("POP3")), "(account 12, key INCOMING_HOST): INCOMING_HOST is required for POP3"),
        (with("INCOMING_MAILBOX_TYPE", json!("MAILDIR")), "(account 12, key INCOMING_PATH): INCOMING_PATH is required for MAILDIR (the Maildir directory)"),
        (with("INCOMING_MAILBOX_TYPE", json!("MBOX")), "(account 12, key INCOMING_PATH): INCOMING_PATH is required for MBOX (the mbox file)"),
        (with("INCOMING_MAILBOX_TYPE", json!("EXCHANGE")), "(account 12, key INCOMING_MAILBOX_TYPE): unknown incoming mailbox type `EXCHANGE` (expected IMAP, POP3, MAILDIR, MBOX, OFFICE365 or GMAIL)"),
        (with("EMAIL", json!(null)), "(account 12, key EMAIL): EMAIL is required (the account's address, used as From)"),
        (with("EMAIL", json!("sd@t.edu\r\nBcc: x@y.z")), "(account 12, key EMAIL): `sd@t.edu\\r\\nBcc: x@y.z` contains a line break or control character"),
        (with("DISPLAY_NAME", json!("Help\nBcc: x@y.z")), "(account 12, key DISPLAY_NAME): contains a line break or control character"),
        (with("TENANTS_RECID", json!("three")), "(account 12, key TENANTS_RECID): `three` is not a whole number"),
        (with("TIMEOUT", json!(0)), "(account 12, key TIMEOUT): `0` is not a whole number of seconds from 1 to 3600"),
        (with("VERIFY_CERT", json!("perhaps")), "(account 12, key VERIFY_CERT): `perhaps` is not a boolean (true/false, on/off, yes/no, 1/0)"),
        (with("CA_FILE", json!("/nonexistent/ca.pem")), "(account 12, key CA_FILE): the CA file /nonexistent/ca.pem does not exist or is not a file"),
        (with("OUTGOING_HOST", json!(["a", "b"])), "(account 12, key OUTGOING_HOST): must be a single value, not a list"),
        (with("RECID", json!("12a")), "(account (no RECID), key RECID): `12a` is not a whole number"),
    ];
    for (row, expected) in cases {
        assert_eq!(
            row_err(&env, row),
            format!("email configuration error {expected}")
        );
    }
    assert_eq!(
        row_err(&env, json!({"ACCOUNT_TYPE": "default", "EMAIL": "a@b.c"})),
        "email configuration error (account (no RECID), key RECID): the account has no RECID"
    );
    assert_eq!(
        row_err(&env, json!("not a row")),
        "email configuration error (account (no RECID), key RECID): a tenant email account must \
         be an array of settings"
    );
    let mut twice = base();
    twice["outgoing_host"] = json!("other.t.edu");
    assert_eq!(
        row_err(&env, twice),
        "email configuration error (account 12, key OUTGOING_HOST): is given twice (in \
         different letter case) with different values"
    );
}

/// A row as Zend_Db returns it: every value a string (`'993'`, `'0'`), booleans as `'1'`/`'0'`
/// or PHP's `true`/`false`; the same row with ints reads the same.
#[test]
fn rows_as_the_database_returns_them() {
    let env = env();
    let strings = json!({
        "RECID": "21", "TENANTS_RECID": "0", "ACCOUNT_TYPE": "service_desk",
        "EMAIL": "sd@t.edu", "OUTGOING_TRANSPORT_TYPE": "SMTP", "OUTGOING_HOST": "smtp.t.edu",
        "OUTGOING_PORT": "587", "OUTGOING_SSL": "0", "INCOMING_MAILBOX_TYPE": "IMAP",
        "INCOMING_HOST": "imap.t.edu", "INCOMING_PORT": "993", "INCOMING_SSL": "1",
        "TIMEOUT": "30", "VERIFY_CERT": "1",
    });
    let ints = json!({
        "RECID": 21, "TENANTS_RECID": 0, "ACCOUNT_TYPE": "service_desk",
        "EMAIL": "sd@t.edu", "OUTGOING_TRANSPORT_TYPE": "SMTP", "OUTGOING_HOST": "smtp.t.edu",
        "OUTGOING_PORT": 587, "OUTGOING_SSL": false, "INCOMING_MAILBOX_TYPE": "IMAP",
        "INCOMING_HOST": "imap.t.edu", "INCOMING_PORT": 993, "INCOMING_SSL": true,
        "TIMEOUT": 30, "VERIFY_CERT": true,
    });
    let a = account_from_row(&strings, &env.settings, &env.keys).unwrap();
    let b = account_from_row(&ints, &env.settings, &env.keys).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.id, AccountId::Tenant(21));
    let out = a.outgoing.unwrap();
    assert_eq!((out.port, out.ssl), (587, SslMode::None));
    let inc = a.incoming.unwrap();
    assert_eq!((inc.port, inc.ssl), (993, SslMode::Ssl));
    // No port where the transport uses none: '0', 0 and '' alike.
    for port in [json!("0"), json!(0), json!(""), json!(null)] {
        let row = json!({"RECID": "22", "TENANTS_RECID": "1", "ACCOUNT_TYPE": "default",
            "EMAIL": "d@t.edu", "OUTGOING_TRANSPORT_TYPE": "FILE", "OUTGOING_PORT": port,
            "OUTGOING_SSL": "0"});
        let a = account_from_row(&row, &env.settings, &env.keys).unwrap();
        assert_eq!(a.outgoing.unwrap().port, 0, "{port}");
        let mut sendmail = row.clone();
        sendmail["OUTGOING_TRANSPORT_TYPE"] = json!("SENDMAIL");
        account_from_row(&sendmail, &env.settings, &env.keys).unwrap();
    }
}

#[test]
fn mbox_rows_name_the_mbox_file() {
    let env = env();
    let a = account_from_row(
        &json!({"RECID": 5, "ACCOUNT_TYPE": "service_desk", "EMAIL": "x@t.edu",
                "INCOMING_MAILBOX_TYPE": "mbox", "INCOMING_PATH": "../mail/desk",
                "PROCESSED_ACTION": "move:Done"}),
        &env.settings,
        &env.keys,
    )
    .unwrap();
    let inc = a.incoming.unwrap();
    assert_eq!(inc.mailbox, MailboxType::Mbox);
    assert_eq!(inc.path, Some(env.dir.join("../mail/desk")));
    assert_eq!(inc.processed_action, ProcessedAction::Move("Done".into()));
}

#[test]
fn maildir_and_pop3_rows() {
    let env = env();
    let a = account_from_row(
        &json!({"RECID": 3, "ACCOUNT_TYPE": "service_desk", "EMAIL": "m@t.edu",
                "INCOMING_MAILBOX_TYPE": "maildir", "INCOMING_PATH": "../maildirs/m",
                "PROCESSED_ACTION": "delete", "MAX_MESSAGE_BYTES": "1048576"}),
        &env.settings,
        &env.keys,
    )
    .unwrap();
    let inc = a.incoming.unwrap();
    assert_eq!(inc.path, Some(env.dir.join("../maildirs/m")));
    assert_eq!(inc.processed_action, ProcessedAction::Delete);
    assert_eq!(inc.max_message_bytes, 1 << 20);
    assert_eq!(a.outgoing, None);
    let a = account_from_row(
        &json!({"RECID": 4, "ACCOUNT_TYPE": "service_desk", "EMAIL": "p@t.edu",
                "INCOMING_MAILBOX_TYPE": "POP3", "INCOMING_HOST": "pop.t.edu",
                "INCOMING_SSL": null, "INCOMING_FOLDER": "ignored-for-pop"}),
        &env.settings,
        &env.keys,
    )
    .unwrap();
    let inc = a.incoming.unwrap();
    assert_eq!((inc.port, inc.ssl), (110, SslMode::None));
}

#[test]
fn office365_rows_with_oauth() {
    let env = env();
    let enc_secret = env.keys.encrypt("azure-client-secret");
    let row = json!({
        "RECID": "31", "TENANTS_RECID": 2, "ACCOUNT_TYPE": "Service Desk",
        "EMAIL": "sd@tenant2.edu",
        "OUTGOING_TRANSPORT_TYPE": "OFFICE365", "INCOMING_MAILBOX_TYPE": "OFFICE365",
        "OAUTH": {
            "application_id": "11111111-2222-3333-4444-555555555555",
            "SECRET_KEY": enc_secret,
            "AUTHORITY_URL": "https://login.microsoftonline.com/common",
            "AUTHORIZATION_ENDPOINT": "/oauth2/v2.0/authorize",
            "TOKEN_ENDPOINT": "/oauth2/v2.0/token",
            "SCOPES": "openid profile offline_access user.read mail.read mail.send",
            "API_BASE_URL": "http://127.0.0.1:18080/v1.0"
        }
    });
    let a = account_from_row(&row, &env.settings, &env.keys).unwrap();
    assert_eq!(a.outgoing.as_ref().unwrap().port, 443);
    assert_eq!(a.outgoing.as_ref().unwrap().host, None);
    assert_eq!(a.incoming.as_ref().unwrap().mailbox, MailboxType::Office365);
    let o = a.oauth.as_ref().unwrap();
    assert_eq!(o.application_id, "11111111-2222-3333-4444-555555555555");
    assert_eq!(
        o.secret_key.as_ref().unwrap().expose(),
        "azure-client-secret"
    );
    assert_eq!(o.authority_url, "https://login.microsoftonline.com/common");
    assert_eq!(o.authorization_endpoint, "/oauth2/v2.0/authorize");
    assert_eq!(o.token_endpoint, "/oauth2/v2.0/token");
    assert_eq!(
        o.scopes,
        vec![
            "openid",
            "profile",
            "offline_access",
            "user.read",
            "mail.read",
            "mail.send"
        ]
    );
    assert_eq!(
        o.api_base_url.as_deref(),
        Some("http://127.0.0.1:18080/v1.0")
    );
    assert!(!format!("{a:?}").contains("azure-client-secret"));

    // Scopes as a list; OAUTH as a JSON string.
    let mut row2 = row.clone();
    row2["OAUTH"] = json!(serde_json::to_string(&json!({
        "APPLICATION_ID": "app", "SCOPES": ["mail.send", " mail.read "]
    }))
    .unwrap());
    let a = account_from_row(&row2, &env.settings, &env.keys).unwrap();
    assert_eq!(a.oauth.unwrap().scopes, vec!["mail.send", "mail.read"]);

    let mut no_oauth = row.clone();
    no_oauth.as_object_mut().unwrap().remove("OAUTH");
    assert_eq!(
        row_err(&env, no_oauth),
        "email configuration error (account 31, key OAUTH): OFFICE365 needs the account's \
         OAuth2 settings (OAUTH.APPLICATION_ID, ...)"
    );
    let mut no_app = row.clone();
    no_app["OAUTH"]["application_id"] = json!("");
    assert_eq!(
        row_err(&env, no_app),
        "email configuration error (account 31, key OAUTH.APPLICATION_ID): OFFICE365 needs the \
         OAuth2 application (client) id"
    );
    let mut bad_url = row.clone();
    bad_url["OAUTH"]["TOKEN_ENDPOINT"] = json!("login.microsoftonline.com/token");
    assert_eq!(
        row_err(&env, bad_url),
        "email configuration error (account 31, key OAUTH.TOKEN_ENDPOINT): \
         `login.microsoftonline.com/token` is not a URL (http:// or https://, or a path under \
         the authority URL)"
    );
    let mut tampered = row.clone();
    tampered["OAUTH"]["SECRET_KEY"] = json!(KeyStore::from_key([1; 32]).encrypt("x"));
    let e = row_err(&env, tampered);
    assert!(
        e.starts_with("email configuration error (account 31, key OAUTH.SECRET_KEY): the value was encrypted with another key"),
        "{e}"
    );
}

#[test]
fn gmail_service_accounts() {
    let env = env();
    let key_json = r#"{"type":"service_account","client_email":"svc@p.iam.gserviceaccount.com","private_key":"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"}"#;
    let key_path = env.dir.join("gmail-sa.json");
    std::fs::write(&key_path, key_json).unwrap();
    let row = |sa: serde_json::Value| {
        json!({"RECID": 40, "ACCOUNT_TYPE": "service_desk", "EMAIL": "sd@t.edu",
               "OUTGOING_TRANSPORT_TYPE": "GMAIL", "INCOMING_MAILBOX_TYPE": "gmail",
               "OAUTH": {"SERVICE_ACCOUNT_JSON": sa, "IMPERSONATE": "sd@t.edu"}})
    };
    // Contents, a relative path, and encrypted contents all give the same key.
    for sa in [
        json!(key_json),
        json!("gmail-sa.json"),
        json!(key_path.display().to_string()),
        json!(env.keys.encrypt(key_json)),
    ] {
        let a = account_from_row(&row(sa.clone()), &env.settings, &env.keys).unwrap();
        let o = a.oauth.unwrap();
        assert_eq!(o.service_account_json.unwrap().expose(), key_json, "{sa}");
        assert_eq!(o.impersonate.as_deref(), Some("sd@t.edu"));
        assert_eq!(o.application_id, "");
    }
    let e = row_err(&env, row(json!("missing.json")));
    assert!(
        e.starts_with("email configuration error (account 40, key OAUTH.SERVICE_ACCOUNT_JSON): cannot read the service account key file DIR/missing.json"),
        "{e}"
    );
    let e = row_err(&env, row(json!("{\"private_key\": \"SECRETKEYMATERIAL")));
    assert!(
        e.contains("the service account key is not valid JSON (line 1, column"),
        "{e}"
    );
    assert!(!e.contains("SECRETKEYMATERIAL"), "{e}");
    let mut no_imp = row(json!(key_json));
    no_imp["OAUTH"]["IMPERSONATE"] = json!(null);
    assert_eq!(
        row_err(&env, no_imp),
        "email configuration error (account 40, key OAUTH.IMPERSONATE): a Gmail service account \
         needs IMPERSONATE (the mailbox it acts as)"
    );
    let mut neither = row(json!(null));
    neither["OAUTH"]["IMPERSONATE"] = json!(null);
    assert_eq!(
        row_err(&env, neither),
        "email configuration error (account 40, key OAUTH): GMAIL needs the account's OAuth2 \
         settings (OAUTH.APPLICATION_ID, ...)"
    );
    let mut mixed = row(json!(key_json));
    mixed["INCOMING_MAILBOX_TYPE"] = json!("OFFICE365");
    assert!(row_err(&env, mixed).contains("cannot use both OFFICE365 and GMAIL"));
}

#[test]
fn one_bad_row_does_not_hide_the_others() {
    let env = env();
    let rows = json!([
        sd_row(),
        {"RECID": 13, "ACCOUNT_TYPE": "default", "EMAIL": "d@t3.edu", "OUTGOING_TRANSPORT_TYPE": "SMTP"},
        {"ACCOUNT_TYPE": "default", "EMAIL": "x@t.edu"},
        {"RECID": 14, "ACCOUNT_TYPE": "default", "EMAIL": "d@t4.edu", "OUTGOING_TRANSPORT_TYPE": "FILE"},
        {"RECID": 12, "ACCOUNT_TYPE": "default", "EMAIL": "dup@t.edu"},
        "garbage"
    ]);
    let (accounts, errors) = accounts_from_rows(&rows, &env.settings, &env.keys);
    let ids: Vec<AccountId> = accounts.iter().map(|a| a.id.clone()).collect();
    assert_eq!(ids, vec![AccountId::Tenant(12), AccountId::Tenant(14)]);
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        vec![
            "email configuration error (account 13, key OUTGOING_HOST): OUTGOING_HOST is required for SMTP",
            "email configuration error (account row 2, key RECID): the account has no RECID",
            "email configuration error (account 12, key RECID): the same RECID appears in more than one row; the first row is used",
            "email configuration error (account row 5, key RECID): a tenant email account must be an array of settings",
        ]
    );
    // PHP arrays with non-sequential keys arrive as objects.
    let rows =
        json!({"7": sd_row(), "9": {"RECID": 9, "ACCOUNT_TYPE": "default", "EMAIL": "d@t.edu"}});
    let (accounts, errors) = accounts_from_rows(&rows, &env.settings, &env.keys);
    assert_eq!(accounts.len(), 2);
    assert!(errors.is_empty());
    let (accounts, errors) = accounts_from_rows(&json!(null), &env.settings, &env.keys);
    assert!(accounts.is_empty() && errors.is_empty());
    let (accounts, errors) = accounts_from_rows(&json!(5), &env.settings, &env.keys);
    assert!(accounts.is_empty());
    assert_eq!(errors.len(), 1);
}

#[test]
fn no_secret_in_any_row_error_or_debug() {
    let env = env();
    let secret = "Pa55-Zx81-NeverShow";
    let enc = env.keys.encrypt(secret);
    let breakers = [
        ("OUTGOING_PORT", json!("bad")),
        ("OUTGOING_HOST", json!(null)),
        ("EMAIL", json!("not-an-address")),
        ("INCOMING_MAILBOX_TYPE", json!("EXCHANGE")),
        ("PASSWORD", json!(format!("{secret}\r\nQUIT"))),
        ("PASSWORD", json!(format!("{}x", &enc[..enc.len() - 4]))),
        ("TIMEOUT", json!(secret)),
    ];
    for (key, value) in breakers {
        for password in [json!(secret), json!(enc.clone())] {
            let mut row = sd_row();
            row["PASSWORD"] = password;
            row["OAUTH"] = json!({"APPLICATION_ID": "a", "SECRET_KEY": secret});
            row[key] = value.clone();
            let e = account_from_row(&row, &env.settings, &env.keys).expect_err(key);
            let shown = format!("{e} {e:?}");
            if key != "TIMEOUT" {
                assert!(!shown.contains(secret), "{key}: {shown}");
            }
        }
    }
    let mut row = sd_row();
    row["PASSWORD"] = json!(enc);
    row["OAUTH"] = json!({"APPLICATION_ID": "a", "SECRET_KEY": secret,
                          "SERVICE_ACCOUNT_JSON": format!("{{\"k\":\"{secret}\"}}")});
    let a = account_from_row(&row, &env.settings, &env.keys).unwrap();
    assert_eq!(a.password.as_ref().unwrap().expose(), secret);
    assert!(!format!("{a:?}").contains(secret));
    assert!(!a.public_view().to_string().contains(secret));
}

#[test]
fn rows_resolve_against_the_ini_directory() {
    let env = env_with("[prod]\nemail.FILE_PATH = /srv/mail-out\n");
    let a = account_from_row(
        &json!({"RECID": 1, "ACCOUNT_TYPE": "default", "EMAIL": "a@b.c",
                "OUTGOING_TRANSPORT_TYPE": "FILE"}),
        &env.settings,
        &env.keys,
    )
    .unwrap();
    assert_eq!(a.file_path, Path::new("/srv/mail-out"));
}
