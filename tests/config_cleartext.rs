//! "Stored in clear" notices: one per account and key per process. Its own test binary, because
//! the notices are process-wide.

use pcr_email::config::secrets::{take_cleartext_warnings, KeyStore};
use pcr_email::config::{account_from_row, Settings};
use serde_json::json;

#[test]
fn plain_secrets_are_reported_once_and_encrypted_ones_never() {
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("pcr360.ini");
    std::fs::write(
        &ini,
        "[prod]\nemail.EMAIL = a@pcr.com\nemail.OUTGOING_TRANSPORT_TYPE = FILE\nemail.PASSWORD = plain-master\n",
    )
    .unwrap();
    assert!(take_cleartext_warnings().is_empty());

    let settings = Settings::load(&ini, "prod").unwrap();
    assert!(
        !settings.key_file.exists(),
        "a plain password does not create the key file"
    );
    let first = take_cleartext_warnings();
    assert_eq!(
        first,
        vec![
            "account master: PASSWORD is stored in clear; encrypt it with pcr-email-encrypt \
             (or PCR_Utility_EmailManager::encryptPassword)"
        ]
    );
    Settings::load(&ini, "prod").unwrap();
    assert!(
        take_cleartext_warnings().is_empty(),
        "reported once per process"
    );

    let keys = KeyStore::open(&settings.key_file).unwrap();
    let row = json!({
        "RECID": 8, "ACCOUNT_TYPE": "service_desk", "EMAIL": "sd@t.edu",
        "PASSWORD": "plain-row", "OUTGOING_TRANSPORT_TYPE": "OFFICE365",
        "OAUTH": {"APPLICATION_ID": "app", "SECRET_KEY": "plain-secret"}
    });
    account_from_row(&row, &settings, &keys).unwrap();
    account_from_row(&row, &settings, &keys).unwrap();
    let mut warnings = take_cleartext_warnings();
    warnings.sort();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with("account 8: OAUTH.SECRET_KEY is stored in clear"));
    assert!(warnings[1].starts_with("account 8: PASSWORD is stored in clear"));
    for w in &warnings {
        assert!(!w.contains("plain-"), "{w}");
    }

    // Encrypted values: no notice.
    let row = json!({
        "RECID": 9, "ACCOUNT_TYPE": "service_desk", "EMAIL": "sd@t.edu",
        "PASSWORD": keys.encrypt("pw"), "OUTGOING_TRANSPORT_TYPE": "FILE"
    });
    account_from_row(&row, &settings, &keys).unwrap();
    assert!(take_cleartext_warnings().is_empty());
}
