//! Sending through Microsoft Graph (OFFICE365) and the Gmail API (GMAIL) against the local
//! cloud emulator: the MIME survives byte for byte, the From becomes the signed-in mailbox
//! (Graph), Bcc recipients are kept, throttling and expired tokens are handled.
//! Needs `scripts/test-servers.sh start` (PCR_CLOUD_URL).

mod cloud_support;
mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use cloud_support::*;
use pcr_email::error::Error;
use pcr_email::oauth::{tokens, Provider};
use pcr_email::outgoing::gmail::GmailTransport;
use pcr_email::outgoing::graph::GraphTransport;
use pcr_email::outgoing::{BuiltMessage, DeliveryStatus, Transport};

fn built(raw: Vec<u8>, from: &str, recipients: &[&str]) -> BuiltMessage {
    BuiltMessage {
        raw,
        envelope_from: from.to_string(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        message_id: "<x@pcr360.example.edu>".into(),
        from: from.to_string(),
        subject: "[SO201700043] test".into(),
    }
}

fn graph_setup(tag: &str, recid: i64) -> (Tenant, Env, pcr_email::config::Account) {
    let t = tenant(Provider::Microsoft, tag, None);
    let env = Env::new();
    let a = account(recid, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    (t, env, a)
}

fn requests(client_id: &str, user: &str, path_end: &str) -> Vec<u64> {
    stats(client_id, user)["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with(path_end))
        .map(|r| r["status"].as_u64().unwrap())
        .collect()
}

#[test]
fn graph_sends_the_mime_byte_for_byte_as_the_signed_in_mailbox() {
    let (t, env, a) = graph_setup("gsend", 51);
    let transport = GraphTransport::new(&a, &env.env).unwrap();
    assert_eq!(transport.mailbox().unwrap(), t.mailbox);
    let token = unique("tok");
    // The message claims another From (e.g. the INI's address): Graph sends as the mailbox.
    let raw = sample_mime(
        "desk@pcr360.example.edu",
        "cust@outside.example",
        &token,
        200_000,
    );
    let msg = built(
        raw.clone(),
        "desk@pcr360.example.edu",
        &["cust@outside.example", "hidden@outside.example"],
    );
    let delivery = transport.send(&msg).unwrap();
    assert_eq!(delivery.status, DeliveryStatus::Sent);
    assert_eq!(delivery.server, format!("{}/v1.0", emu()));
    let sent = sent(&t.mailbox);
    assert_eq!(sent.len(), 1);
    let (meta, got) = &sent[0];
    assert_eq!(meta["format"], "mime");
    let expected = String::from_utf8(raw)
        .unwrap()
        .replace(
            "From: Service Desk <desk@pcr360.example.edu>\r\n",
            &format!("From: Service Desk <{}>\r\n", t.mailbox),
        )
        .replace(
            "\r\n\r\n--outer-",
            "\r\nBcc: hidden@outside.example\r\n\r\n--outer-",
        );
    assert_eq!(
        String::from_utf8_lossy(got),
        expected,
        "the MIME changed in transit"
    );
    assert_eq!(
        meta["headers"]["Message-ID"],
        format!("<{token}.1@pcr360.example.edu>")
    );
}

#[test]
fn graph_leaves_a_matching_from_alone_and_refuses_messages_over_4_mb() {
    let (t, env, a) = graph_setup("gsize", 52);
    let transport = GraphTransport::new(&a, &env.env).unwrap();
    let token = unique("tok");
    let raw = sample_mime(&t.mailbox, "cust@outside.example", &token, 10);
    transport
        .send(&built(raw.clone(), &t.mailbox, &["cust@outside.example"]))
        .unwrap();
    assert_eq!(
        sent(&t.mailbox)[0].1,
        raw,
        "an unchanged message must be sent as is"
    );

    let big = sample_mime(&t.mailbox, "cust@outside.example", &token, 3_500_000);
    let err = transport
        .send(&built(big, &t.mailbox, &["cust@outside.example"]))
        .unwrap_err();
    match &err {
        Error::Transport(f) => {
            assert_eq!(f.code, Some(413));
            assert!(!f.transient);
            assert!(f.message.contains("4 MB"), "{err}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(sent(&t.mailbox).len(), 1, "nothing more may have been sent");
}

#[test]
fn graph_waits_out_429_with_retry_after() {
    let (t, env, a) = graph_setup("g429", 53);
    let transport = GraphTransport::new(&a, &env.env).unwrap();
    fault(
        "/me/sendMail$",
        &t.mailbox,
        429,
        2,
        json!({"retry_after": 1}),
    );
    let started = Instant::now();
    let raw = sample_mime(&t.mailbox, "cust@outside.example", &unique("tok"), 10);
    transport
        .send(&built(raw, &t.mailbox, &["cust@outside.example"]))
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "Retry-After not honoured"
    );
    assert_eq!(
        requests(&t.client_id, &t.mailbox, "/me/sendMail"),
        [429, 429, 202]
    );
    assert_eq!(sent(&t.mailbox).len(), 1, "sent exactly once");
}

#[test]
fn graph_gives_up_on_throttling_beyond_the_budget_with_a_transient_error() {
    let (t, env, a) = graph_setup("g503", 54);
    let transport = GraphTransport::new(&a, &env.env).unwrap();
    fault(
        "/me/sendMail$",
        &t.mailbox,
        503,
        1,
        json!({"retry_after": 3600}),
    );
    let started = Instant::now();
    let raw = sample_mime(&t.mailbox, "cust@outside.example", &unique("tok"), 10);
    let err = transport
        .send(&built(raw, &t.mailbox, &["cust@outside.example"]))
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    match err {
        Error::Transport(f) => {
            assert_eq!(f.code, Some(503));
            assert!(f.transient);
            assert_eq!(f.account, "54");
            assert!(f.message.contains("retry budget"), "{}", f.message);
        }
        other => panic!("{other}"),
    }
    assert!(sent(&t.mailbox).is_empty());
}

#[test]
fn an_expired_access_token_gets_one_refresh_and_one_retry() {
    let (t, env, a) = graph_setup("g401", 55);
    let transport = GraphTransport::new(&a, &env.env).unwrap();
    // The provider invalidated the token before our cached expiry (e.g. a password change).
    admin(
        "POST",
        "/_admin/expire_access_tokens",
        json!({"user": t.mailbox}),
    );
    let raw = sample_mime(&t.mailbox, "cust@outside.example", &unique("tok"), 10);
    transport
        .send(&built(raw.clone(), &t.mailbox, &["cust@outside.example"]))
        .unwrap();
    assert_eq!(
        requests(&t.client_id, &t.mailbox, "/me/sendMail"),
        [401, 202]
    );
    assert_eq!(grants(&t.client_id, "refresh_token"), 1);

    // A token the API keeps rejecting: one refresh, one retry, then an Auth error.
    fault(
        "/me/sendMail$",
        &t.mailbox,
        401,
        2,
        json!({"body": {"error": {"code": "InvalidAuthenticationToken",
                                   "message": "Access token validation failure."}}}),
    );
    let err = transport
        .send(&built(raw, &t.mailbox, &["cust@outside.example"]))
        .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(err.to_string().contains("RE Authenticate"), "{err}");
    assert_eq!(grants(&t.client_id, "refresh_token"), 2);
    assert_eq!(sent(&t.mailbox).len(), 1);
}

#[test]
fn a_revoked_sign_in_fails_sending_with_an_auth_error() {
    let (t, env, a) = graph_setup("grevoke", 56);
    admin("POST", "/_admin/revoke", json!({"user": t.mailbox}));
    env.store().delete_token("56", tokens::ACCESS).unwrap();
    let transport = GraphTransport::new(&a, &env.env).unwrap();
    let raw = sample_mime(&t.mailbox, "cust@outside.example", &unique("tok"), 10);
    let err = transport
        .send(&built(raw, &t.mailbox, &["cust@outside.example"]))
        .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(
        err.to_string().contains("Click to RE Authenticate"),
        "{err}"
    );
    let check = transport.check().unwrap_err();
    assert!(matches!(check, Error::Auth { .. }), "{check}");
}

#[test]
fn graph_check_reports_the_mailbox_without_sending() {
    let (t, env, a) = graph_setup("gcheck", 57);
    let transport = GraphTransport::new(&a, &env.env).unwrap();
    let report = transport.check().unwrap();
    assert_eq!(report.transport, "OFFICE365");
    assert!(
        report.steps.iter().any(|s| s.contains(&t.mailbox)),
        "{report:?}"
    );
    assert!(sent(&t.mailbox).is_empty());
    assert_eq!(
        transport.kind(),
        pcr_email::config::TransportType::Office365
    );
    assert!(!transport.describe().contains(&t.client_secret));
    let token = pcr_email::oauth::TokenManager::new(&a, &env.env, pcr_email::http::Role::Send)
        .unwrap()
        .access_token()
        .unwrap()
        .expose()
        .to_string();
    let debug = format!("{transport:?}");
    assert_no_secret(&debug, &[&t.client_secret, &token]);
}

#[test]
fn gmail_waits_out_a_403_user_rate_limit() {
    let t = tenant(Provider::Google, "gm403", None);
    let env = Env::new();
    let a = account(65, Provider::Google, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    fault(
        "/messages/send$",
        &t.mailbox,
        403,
        1,
        json!({"retry_after": 1, "body": {"error": {"code": 403,
            "message": "User-rate limit exceeded.", "status": "PERMISSION_DENIED",
            "errors": [{"message": "User-rate limit exceeded.", "domain": "usageLimits",
                        "reason": "userRateLimitExceeded"}]}}}),
    );
    let transport = GmailTransport::new(&a, &env.env).unwrap();
    let raw = sample_mime(&t.mailbox, "cust@outside.example", &unique("tok"), 10);
    transport
        .send(&built(raw, &t.mailbox, &["cust@outside.example"]))
        .unwrap();
    assert_eq!(sent(&t.mailbox).len(), 1);
}

#[test]
fn gmail_sends_raw_and_large_messages_unchanged() {
    let t = tenant(Provider::Google, "gmsend", None);
    let env = Env::new();
    let a = account(61, Provider::Google, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    let transport = GmailTransport::new(&a, &env.env).unwrap();
    let token = unique("tok");
    let small = sample_mime(&t.mailbox, "cust@outside.example", &token, 50_000);
    transport
        .send(&built(small.clone(), &t.mailbox, &["cust@outside.example"]))
        .unwrap();
    // Over 4 MB: the media upload, still byte for byte, with the Bcc header added.
    let large = sample_mime(&t.mailbox, "cust@outside.example", &token, 6_000_000);
    transport
        .send(&built(
            large.clone(),
            &t.mailbox,
            &["cust@outside.example", "bcc@outside.example"],
        ))
        .unwrap();
    let sent = sent(&t.mailbox);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].0["format"], "raw");
    assert_eq!(sent[0].1, small);
    assert_eq!(sent[1].0["format"], "upload");
    let expected = String::from_utf8(large).unwrap().replacen(
        "\r\n\r\n",
        "\r\nBcc: bcc@outside.example\r\n\r\n",
        1,
    );
    assert!(
        sent[1].1 == expected.as_bytes(),
        "the large MIME changed in transit"
    );
    let report = transport.check().unwrap();
    assert!(report.steps.iter().any(|s| s.contains(&t.mailbox)));
}

#[test]
fn gmail_honours_an_http_date_retry_after() {
    let t = tenant(Provider::Google, "gm429", None);
    let env = Env::new();
    let a = account(62, Provider::Google, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    fault(
        "/messages/send$",
        &t.mailbox,
        429,
        1,
        json!({"retry_after": 2, "retry_after_date": true}),
    );
    let transport = GmailTransport::new(&a, &env.env).unwrap();
    let started = Instant::now();
    let raw = sample_mime(&t.mailbox, "cust@outside.example", &unique("tok"), 10);
    transport
        .send(&built(raw, &t.mailbox, &["cust@outside.example"]))
        .unwrap();
    // An HTTP date has one-second resolution: at least one second was waited.
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(sent(&t.mailbox).len(), 1);
}

#[test]
fn a_gmail_service_account_sends_as_the_impersonated_mailbox() {
    let mailbox = format!("{}@corp.example", unique("sasend"));
    add_user(Provider::Google, &mailbox, None);
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let sa = format!("{}@project.iam.gserviceaccount.com", unique("sa"));
    admin(
        "POST",
        "/_admin/service_accounts",
        json!({"client_email": sa, "delegated": [mailbox],
               "public_key_pem": String::from_utf8(key.public_key_to_pem().unwrap()).unwrap()}),
    );
    let json_key = json!({
        "type": "service_account",
        "private_key": String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap(),
        "client_email": sa,
        "token_uri": format!("{}/token", emu()),
    })
    .to_string();
    let env = Env::new();
    let settings = pcr_email::config::OAuthSettings {
        service_account_json: Some(pcr_email::config::Secret::new(json_key)),
        impersonate: Some(mailbox.clone()),
        api_base_url: Some(emu()),
        ..Default::default()
    };
    let a = account(63, Provider::Google, &mailbox, settings);
    let transport = GmailTransport::new(&a, &env.env).unwrap();
    let raw = sample_mime(&mailbox, "cust@outside.example", &unique("tok"), 10);
    transport
        .send(&built(raw.clone(), &mailbox, &["cust@outside.example"]))
        .unwrap();
    let sent = sent(&mailbox);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, raw);
    let log = stats(&sa, &mailbox)["requests"].clone();
    assert!(
        log.as_array().unwrap().iter().any(|r| r["path"]
            == format!(
                "/gmail/v1/users/{}/messages/send",
                mailbox.replace('@', "%40")
            )),
        "{log}"
    );
    assert_eq!(transport.mailbox().unwrap(), mailbox);
}

#[test]
fn cloud_transports_are_made_from_the_account() {
    let (_, env, a) = graph_setup("gdispatch", 64);
    let t = pcr_email::outgoing::transport_for(&a, &env.env).unwrap();
    assert_eq!(t.kind(), pcr_email::config::TransportType::Office365);
    let mut smtp = a.clone();
    smtp.outgoing.as_mut().unwrap().transport = pcr_email::config::TransportType::Smtp;
    assert!(pcr_email::outgoing::transport_for(&smtp, &env.env).is_err());
}

/// The Graph requests the emulator saw from an app-only client: `(method, path, status)`.
fn app_requests(client_id: &str) -> Vec<(String, String, u64)> {
    stats(client_id, "")["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/v1.0/"))
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn graph_app_only_sends_as_the_shared_mailbox_and_keeps_the_copy_in_its_sent_items() {
    let shared = shared_mailbox("gappsend");
    let app = app_only(
        "gappsend",
        &["Mail.ReadWrite", "Mail.Send"],
        json!([shared]),
    );
    let env = Env::new();
    let a = account(91, Provider::Microsoft, &shared, app_only_settings(&app));

    // Nothing to sign in: the authorization URL is refused, and no refresh token is needed.
    let err = pcr_email::oauth::authorization_url(&a, REDIRECT_URI, &env.store(), &env.keys())
        .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(err.to_string().contains("nothing to sign in"), "{err}");
    assert!(err.to_string().contains("client_credentials"), "{err}");

    let transport = GraphTransport::new(&a, &env.env).unwrap();
    assert_eq!(transport.mailbox().unwrap(), shared);
    let token = unique("tok");
    let raw = sample_mime(
        "desk@pcr360.example.edu",
        "cust@outside.example",
        &token,
        1000,
    );
    let delivery = transport
        .send(&built(
            raw,
            "Service Desk <desk@pcr360.example.edu>",
            &["cust@outside.example"],
        ))
        .unwrap();
    assert_eq!(delivery.status, DeliveryStatus::Sent);
    assert_eq!(
        delivery.from.as_deref(),
        Some(format!("Service Desk <{shared}>").as_str())
    );
    let sent = sent(&shared);
    assert_eq!(sent.len(), 1, "sent from the shared mailbox");
    assert_eq!(
        sent[0].0["headers"]["From"],
        format!("Service Desk <{shared}>")
    );
    // The copy is in the shared mailbox's Sent Items.
    let dump = mailbox(Provider::Microsoft, &shared);
    let copies: Vec<&serde_json::Value> = dump["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["folder"] == "Sent Items")
        .collect();
    assert_eq!(copies.len(), 1, "{dump}");
    assert_eq!(
        copies[0]["message_id"],
        format!("<{token}.1@pcr360.example.edu>")
    );
    // Through /users/{EMAIL}, never /me; one client_credentials grant, no refresh token.
    let encoded = shared.replace('@', "%40");
    assert_eq!(
        app_requests(&app.client_id),
        [(
            "POST".to_string(),
            format!("/v1.0/users/{encoded}/sendMail"),
            202
        )]
    );
    assert_eq!(grants(&app.client_id, "client_credentials"), 1);
    assert!(env
        .store()
        .load_token("91", tokens::REFRESH)
        .unwrap()
        .is_none());

    // The check opens the mailbox's Sent Items folder and sends nothing.
    let report = transport.check().unwrap();
    assert!(
        report
            .steps
            .iter()
            .any(|s| s.contains(&shared) && s.contains("app-only")),
        "{report:?}"
    );
    assert_eq!(sent_count(&shared), 1);
    assert!(app_requests(&app.client_id)
        .iter()
        .all(|(_, path, _)| path.starts_with(&format!("/v1.0/users/{encoded}/"))));
}

fn sent_count(user: &str) -> usize {
    sent(user).len()
}

#[test]
fn graph_app_only_refused_the_mailbox_is_an_auth_error_naming_the_grant() {
    let granted = shared_mailbox("gappok");
    let outside = shared_mailbox("gappno");
    let app = app_only("gappno", &["Mail.ReadWrite", "Mail.Send"], json!([granted]));
    let env = Env::new();
    let a = account(92, Provider::Microsoft, &outside, app_only_settings(&app));
    let transport = GraphTransport::new(&a, &env.env).unwrap();
    let raw = sample_mime(&outside, "cust@outside.example", &unique("tok"), 10);
    let err = transport
        .send(&built(raw, &outside, &["cust@outside.example"]))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, Error::Auth { account, .. } if account == "92"),
        "{text}"
    );
    for part in [
        outside.as_str(),
        "must be granted",
        "New-ApplicationAccessPolicy",
        "RBAC for Applications",
        "access policy of the tenant excludes it",
    ] {
        assert!(text.contains(part), "{part} missing: {text}");
    }
    assert_no_secret(&text, &[&app.client_secret]);
    assert!(sent(&outside).is_empty());
    let check = transport.check().unwrap_err();
    assert!(matches!(check, Error::Auth { .. }), "{check}");
    assert!(check.to_string().contains("must be granted"), "{check}");

    // Granted now (the policy changed): the same account sends.
    admin(
        "POST",
        "/_admin/app_access",
        json!({"client_id": app.client_id, "mailboxes": [granted, outside]}),
    );
    let raw = sample_mime(&outside, "cust@outside.example", &unique("tok"), 10);
    transport
        .send(&built(raw, &outside, &["cust@outside.example"]))
        .unwrap();
    assert_eq!(sent(&outside).len(), 1);
}
