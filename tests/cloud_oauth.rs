//! OAuth against the local cloud emulator: sign-in (Microsoft, Google), the state parameter,
//! token refresh and rotation, concurrent refreshers, revoked tokens, Gmail service accounts.
//! Needs `scripts/test-servers.sh start` (PCR_CLOUD_URL).

mod cloud_support;
mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::json;

use cloud_support::*;
use pcr_email::error::Error;
use pcr_email::http::Role;
use pcr_email::oauth::{self, tokens, OAuthEnv, Provider, TokenManager};
use pcr_email::state::StateStore;

#[test]
fn microsoft_sign_in_stores_an_encrypted_refresh_token_and_returns_the_mailbox() {
    let t = tenant(Provider::Microsoft, "mssignin", None);
    let env = Env::new();
    let a = account(11, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    let store = env.store();
    let keys = env.keys();
    let url = oauth::authorization_url(&a, REDIRECT_URI, &store, &keys).unwrap();
    assert!(
        url.starts_with(&format!("{}/common/oauth2/v2.0/authorize?", emu())),
        "{url}"
    );
    for part in [
        "code_challenge_method=S256",
        "response_mode=query",
        "offline_access",
    ] {
        assert!(url.contains(part), "{part} missing: {url}");
    }
    let params = browser_sign_in(&url, None);
    let done = oauth::complete_authorization(
        param(&params, "state"),
        param(&params, "code"),
        std::slice::from_ref(&a),
        &store,
        &keys,
    )
    .unwrap();
    assert_eq!(done.recid, 11);
    assert_eq!(done.provider, Provider::Microsoft);
    assert_eq!(done.mailbox, t.mailbox);
    assert!(!done.differs_from_email);
    let stored = store.load_token("11", tokens::REFRESH).unwrap().unwrap();
    assert!(
        stored.value.expose().starts_with("ENC:v1:"),
        "refresh token stored in clear"
    );
    let status = oauth::status(&a, &store).unwrap();
    assert!(status.authorized);
    assert_eq!(status.mailbox.as_deref(), Some(t.mailbox.as_str()));
    assert_eq!(status.last_error, None);
    assert_eq!(status.to_json()["access_token_valid"], true);
    // The same reply used again (a reloaded callback page) is refused, distinctly.
    let err = oauth::complete_authorization(
        param(&params, "state"),
        param(&params, "code"),
        std::slice::from_ref(&a),
        &store,
        &keys,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(err.to_string().contains("already used"), "{err}");
    assert_eq!(grants(&t.client_id, "authorization_code"), 1);
}

#[test]
fn google_sign_in_asks_for_offline_access_and_consent() {
    let t = tenant(Provider::Google, "gsignin", None);
    let env = Env::new();
    let a = account(12, Provider::Google, &t.mailbox, oauth_settings(&t));
    let url = oauth::authorization_url(&a, REDIRECT_URI, &env.store(), &env.keys()).unwrap();
    assert!(
        url.contains("access_type=offline") && url.contains("prompt=consent"),
        "{url}"
    );
    let done = {
        let params = browser_sign_in(&url, None);
        oauth::complete_authorization(
            param(&params, "state"),
            param(&params, "code"),
            std::slice::from_ref(&a),
            &env.store(),
            &env.keys(),
        )
        .unwrap()
    };
    assert_eq!(done.mailbox, t.mailbox);
    assert_eq!(done.provider, Provider::Google);
    assert!(env
        .store()
        .load_token("12", tokens::REFRESH)
        .unwrap()
        .is_some());
}

#[test]
fn the_signed_in_mailbox_may_differ_from_the_accounts_email() {
    let t = tenant(Provider::Microsoft, "msother", None);
    let other = format!("{}@tenant.example", unique("upn"));
    // A mailbox without a `mail` attribute: userPrincipalName is used.
    add_user(Provider::Microsoft, &other, None);
    let env = Env::new();
    let a = account(13, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    let url = oauth::authorization_url(&a, REDIRECT_URI, &env.store(), &env.keys()).unwrap();
    let params = browser_sign_in(&url, Some(&other));
    let done = oauth::complete_authorization(
        param(&params, "state"),
        param(&params, "code"),
        std::slice::from_ref(&a),
        &env.store(),
        &env.keys(),
    )
    .unwrap();
    assert_eq!(done.mailbox, other);
    assert!(done.differs_from_email);
}

#[test]
fn unknown_and_expired_states_and_a_wrong_secret_are_auth_errors() {
    let t = tenant(Provider::Microsoft, "msstate", None);
    let env = Env::new();
    let store = env.store();
    let keys = env.keys();
    let a = account(14, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    let err =
        oauth::complete_authorization("forged", "code", std::slice::from_ref(&a), &store, &keys)
            .unwrap_err();
    assert!(err.to_string().contains("unknown"), "{err}");

    // Expired: the pending sign-in is older than its 10 minutes.
    let url = oauth::authorization_url(&a, REDIRECT_URI, &store, &keys).unwrap();
    let params = browser_sign_in(&url, None);
    let state = param(&params, "state").to_string();
    let pending = store.take_pending_auth(&state).unwrap();
    let pcr_email::state::PendingAuth::Valid(data) = pending else {
        panic!("not pending")
    };
    store
        .put_pending_auth(&state, data.expose(), chrono::Utc::now().timestamp() - 1)
        .unwrap();
    let err = oauth::complete_authorization(
        &state,
        param(&params, "code"),
        std::slice::from_ref(&a),
        &store,
        &keys,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }));
    assert!(err.to_string().contains("expired"), "{err}");

    // A wrong client secret: the Secret KEY is named, the secret never shown.
    let mut wrong = oauth_settings(&t);
    wrong.secret_key = Some(pcr_email::config::Secret::new("not-the-secret-value-123"));
    let b = account(14, Provider::Microsoft, &t.mailbox, wrong);
    let url = oauth::authorization_url(&b, REDIRECT_URI, &store, &keys).unwrap();
    let params = browser_sign_in(&url, None);
    let err = oauth::complete_authorization(
        param(&params, "state"),
        param(&params, "code"),
        &[b],
        &store,
        &keys,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Auth { .. }), "{text}");
    assert!(text.contains("Secret KEY"), "{text}");
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert_no_secret(&text, &["not-the-secret-value-123", param(&params, "code")]);
}

#[test]
fn the_emulator_checks_the_pkce_verifier() {
    // Our successful sign-ins prove we send the right verifier only if a wrong one fails.
    let t = tenant(Provider::Microsoft, "mspkce", None);
    let env = Env::new();
    let a = account(15, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    let url = oauth::authorization_url(&a, REDIRECT_URI, &env.store(), &env.keys()).unwrap();
    let params = browser_sign_in(&url, None);
    let http =
        pcr_email::http::HttpClient::new(&Default::default(), Duration::from_secs(10)).unwrap();
    let token_url = format!("{}/common/oauth2/v2.0/token", emu());
    let wrong = "x".repeat(64);
    let err = http
        .execute(
            &pcr_email::http::Request::new(pcr_email::http::Method::Post, &token_url).with_body(
                pcr_email::http::Body::Form(&[
                    ("grant_type", "authorization_code"),
                    ("code", param(&params, "code")),
                    ("redirect_uri", REDIRECT_URI),
                    ("client_id", &t.client_id),
                    ("client_secret", &t.client_secret),
                    ("code_verifier", &wrong),
                ]),
            ),
        )
        .unwrap_err();
    assert!(err.has_code("invalid_grant"), "{err}");
    assert!(err.detail.contains("AADSTS501481"), "{err}");
}

fn manager(a: &pcr_email::config::Account, env: &OAuthEnv) -> TokenManager {
    TokenManager::new(a, env, Role::Receive).unwrap()
}

#[test]
fn access_tokens_are_refreshed_before_they_expire_and_rotation_is_saved() {
    // Tokens live 4 s, so they are renewed 1 s early.
    let t = tenant(Provider::Microsoft, "msrefresh", Some(4));
    let env = Env::new();
    let a = account(21, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    let tm = manager(&a, &env.env);
    let first = tm.access_token().unwrap();
    assert_eq!(tm.access_token().unwrap(), first, "a fresh token is reused");
    let refresh_before = env
        .store()
        .load_token("21", tokens::REFRESH)
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(3300));
    let second = tm.access_token().unwrap();
    assert_ne!(second, first, "the token was not renewed");
    // Renewed BEFORE expiry: the old token still works at this moment.
    assert_eq!(
        get_status_with_token(&format!("{}/v1.0/me", emu()), first.expose()),
        200
    );
    assert_eq!(grants(&t.client_id, "refresh_token"), 1);
    // The rotated refresh token was saved: the old one is dead at the emulator, ours works.
    let refresh_after = env
        .store()
        .load_token("21", tokens::REFRESH)
        .unwrap()
        .unwrap();
    assert!(refresh_after.version > refresh_before.version);
    assert_ne!(refresh_after.value, refresh_before.value);
    assert_eq!(stats(&t.client_id, &t.mailbox)["valid_refresh_tokens"], 1);
    admin(
        "POST",
        "/_admin/expire_access_tokens",
        json!({"user": t.mailbox}),
    );
    let third = tm.refresh_after_rejection(&second).unwrap();
    assert_ne!(third, second);
    assert_eq!(grants(&t.client_id, "refresh_token"), 2);
}

#[test]
fn concurrent_refreshers_refresh_once_and_keep_the_newest_token() {
    let t = tenant(Provider::Microsoft, "msconc", None);
    let env = Env::new();
    let a = account(22, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    // The cached access token is gone (as after its expiry): everyone needs a new one at once.
    env.store().delete_token("22", tokens::ACCESS).unwrap();
    let threads = 6;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            let a = a.clone();
            let e = env.env.clone();
            std::thread::spawn(move || {
                // Each thread has its own StateStore connection, like separate processes.
                let tm = TokenManager::new(&a, &e, Role::Send).unwrap();
                barrier.wait();
                tm.access_token().map(|t| t.expose().to_string())
            })
        })
        .collect();
    let tokens: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(
        tokens.iter().all(|t| t == &tokens[0]),
        "threads got different tokens"
    );
    assert_eq!(
        grants(&t.client_id, "refresh_token"),
        1,
        "refreshed more than once"
    );
    // The stored refresh token is the newest one: the next refresh works.
    assert_eq!(stats(&t.client_id, &t.mailbox)["valid_refresh_tokens"], 1);
    env.store().delete_token("22", tokens::ACCESS).unwrap();
    manager(&a, &env.env).access_token().unwrap();
    assert_eq!(grants(&t.client_id, "refresh_token"), 2);
}

#[test]
fn a_revoked_refresh_token_asks_the_administrator_to_re_authenticate() {
    let t = tenant(Provider::Google, "grevoked", None);
    let env = Env::new();
    let a = account(23, Provider::Google, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    admin("POST", "/_admin/revoke", json!({"user": t.mailbox}));
    env.store().delete_token("23", tokens::ACCESS).unwrap();
    let err = manager(&a, &env.env).access_token().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Auth { .. }), "{text}");
    assert!(text.contains("Click to RE Authenticate"), "{text}");
    assert!(text.contains("account 23"), "{text}");
    assert_no_secret(&text, &[&t.client_secret]);
    let status = oauth::status(&a, &env.store()).unwrap();
    assert!(status.last_error.unwrap().contains("RE Authenticate"));
    // Signing in again clears the error and works.
    sign_in(&a, &env);
    assert_eq!(oauth::status(&a, &env.store()).unwrap().last_error, None);
    env.store().delete_token("23", tokens::ACCESS).unwrap();
    manager(&a, &env.env).access_token().unwrap();
}

#[test]
fn an_account_never_signed_in_says_click_to_authenticate() {
    let t = tenant(Provider::Microsoft, "msnever", None);
    let env = Env::new();
    let a = account(24, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    let err = manager(&a, &env.env).access_token().unwrap_err();
    assert!(err.to_string().contains("Click to Authenticate"), "{err}");
    assert!(!oauth::status(&a, &env.store()).unwrap().authorized);
}

#[test]
fn a_malformed_token_reply_names_the_endpoint() {
    let t = tenant(Provider::Microsoft, "msbadjson", None);
    let env = Env::new();
    let a = account(25, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    env.store().delete_token("25", tokens::ACCESS).unwrap();
    admin(
        "POST",
        "/_admin/fault",
        json!({"path": "/oauth2/v2.0/token$", "client_id": t.client_id, "status": 200,
               "body": "{\"access_token\": \"at-123\", \"expires_in\": ", "count": 1}),
    );
    let err = manager(&a, &env.env).access_token().unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("POST {}/common/oauth2/v2.0/token", emu())),
        "{text}"
    );
    assert!(text.contains("not valid JSON"), "{text}");
    assert!(matches!(err, Error::Mailbox(_)), "{text}");
    // The refresh token is intact: the next attempt works.
    manager(&a, &env.env).access_token().unwrap();
}

#[test]
fn throttled_token_requests_are_retried() {
    let t = tenant(Provider::Microsoft, "ms429tok", None);
    let env = Env::new();
    let a = account(26, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    env.store().delete_token("26", tokens::ACCESS).unwrap();
    admin(
        "POST",
        "/_admin/fault",
        json!({"path": "/oauth2/v2.0/token$", "client_id": t.client_id, "status": 503,
               "retry_after": 2, "retry_after_date": true, "count": 1}),
    );
    let started = std::time::Instant::now();
    manager(&a, &env.env).access_token().unwrap();
    // An HTTP date has whole seconds: "now + 2 s" may be read as little as just over 1 s away.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After ignored: {:?}",
        started.elapsed()
    );
}

// ---- Gmail service accounts ---------------------------------------------------------------

pub fn service_account(
    tag: &str,
    delegated: &[&str],
) -> (String, String, openssl::pkey::PKey<openssl::pkey::Private>) {
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let email = format!("{}@project.iam.gserviceaccount.com", unique(tag));
    admin(
        "POST",
        "/_admin/service_accounts",
        json!({
            "client_email": email,
            "public_key_pem": String::from_utf8(key.public_key_to_pem().unwrap()).unwrap(),
            "delegated": delegated,
        }),
    );
    let json = json!({
        "type": "service_account",
        "project_id": "project",
        "private_key_id": "0123abcd",
        "private_key": String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap(),
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": format!("{}/token", emu()),
    })
    .to_string();
    (email, json, key)
}

fn service_account_account(
    recid: i64,
    json: &str,
    impersonate: &str,
) -> pcr_email::config::Account {
    let settings = pcr_email::config::OAuthSettings {
        service_account_json: Some(pcr_email::config::Secret::new(json)),
        impersonate: Some(impersonate.to_string()),
        scopes: vec!["https://mail.google.com/".into()],
        api_base_url: Some(emu()),
        ..Default::default()
    };
    account(recid, Provider::Google, impersonate, settings)
}

#[test]
fn a_service_account_signs_a_jwt_and_impersonates_the_mailbox() {
    let mailbox = format!("{}@corp.example", unique("sabox"));
    add_user(Provider::Google, &mailbox, None);
    let (sa, json, _) = service_account("sa", &[&mailbox]);
    let env = Env::new();
    let a = service_account_account(31, &json, &mailbox);
    let tm = manager(&a, &env.env);
    assert!(tm.is_service_account());
    let token = tm.access_token().unwrap();
    assert_eq!(
        get_status_with_token(
            &format!("{}/gmail/v1/users/{}/profile", emu(), mailbox),
            token.expose()
        ),
        200
    );
    assert_eq!(grants(&sa, "jwt"), 1);
    assert_eq!(tm.access_token().unwrap(), token, "the token is cached");
    let status = oauth::status(&a, &env.store()).unwrap();
    assert!(status.service_account && status.authorized);
    assert_eq!(status.mailbox.as_deref(), Some(mailbox.as_str()));
}

#[test]
fn service_account_failures_are_explained() {
    let mailbox = format!("{}@corp.example", unique("sabad"));
    add_user(Provider::Google, &mailbox, None);
    let env = Env::new();

    // Not allowed to act for this mailbox (no domain-wide delegation for it).
    let (_, json, _) = service_account("sanodeleg", &["someone-else@corp.example"]);
    let err = manager(&service_account_account(32, &json, &mailbox), &env.env)
        .access_token()
        .unwrap_err();
    assert!(err.to_string().contains("domain-wide delegation"), "{err}");

    // The key file's private key does not match the registered public key.
    let (sa, _, _) = service_account("sawrongkey", &[&mailbox]);
    let other = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let forged = json!({
        "type": "service_account",
        "private_key": String::from_utf8(other.private_key_to_pem_pkcs8().unwrap()).unwrap(),
        "client_email": sa,
        "token_uri": format!("{}/token", emu()),
    })
    .to_string();
    let err = manager(&service_account_account(33, &forged, &mailbox), &env.env)
        .access_token()
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Auth { .. }), "{text}");
    assert!(text.contains("Invalid JWT Signature"), "{text}");
    assert_no_secret(&text, &["PRIVATE KEY"]);

    // A damaged key file is a configuration error naming the account and the key.
    let broken = json!({"type": "service_account", "client_email": sa,
                        "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"})
    .to_string();
    let err = TokenManager::new(
        &service_account_account(34, &broken, &mailbox),
        &env.env,
        Role::Send,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Config { .. }), "{text}");
    assert!(
        text.contains("account 34") && text.contains("OAUTH.SERVICE_ACCOUNT_JSON"),
        "{text}"
    );
}

#[test]
fn tokens_survive_a_new_store_connection_and_are_not_readable_without_the_key() {
    let t = tenant(Provider::Microsoft, "mskey", None);
    let env = Env::new();
    let a = account(41, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    let db = std::fs::read(env.env.state_dir.join(pcr_email::state::DB_FILE)).unwrap();
    let token = manager(&a, &env.env).access_token().unwrap();
    let db_text = String::from_utf8_lossy(&db);
    assert!(
        !db_text.contains(token.expose()),
        "access token stored in clear"
    );
    // Another key file cannot use the stored tokens: a clear configuration error.
    let other = OAuthEnv {
        state_dir: env.env.state_dir.clone(),
        state_dsn: None,
        key_file: env.dir.path().join("other.key"),
    };
    let _ = StateStore::open(&other.state_dir, None).unwrap();
    let err = manager(&a, &other).access_token().unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
}
