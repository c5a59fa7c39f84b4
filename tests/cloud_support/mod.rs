//! Helpers of the cloud tests (`tests/cloud_*.rs`): the local cloud emulator
//! (`tests/servers/cloud_emulator.py`, started by `scripts/test-servers.sh`, base URL in
//! `PCR_CLOUD_URL`), accounts pointing at it, and a sign-in as a browser would do it.
//!
//! Every test registers its own OAuth client and mailbox users (unique names), so tests run in
//! parallel against the one emulator without seeing each other.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};

use pcr_email::config::secrets::KeyStore;
use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, OAuthSettings, Outgoing,
    ProcessedAction, Secret, SslMode, TlsSettings, TransportType,
};
use pcr_email::oauth::{self, Authorized, OAuthEnv, Provider};
use pcr_email::state::StateStore;

use crate::common;

pub const REDIRECT_URI: &str = "https://pcr360.example.edu/core/oauth2/validated";

/// The emulator's base URL (panics when the test servers are not running).
pub fn emu() -> String {
    common::env("PCR_CLOUD_URL")
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}

/// An admin call; panics unless the emulator answers 2xx.
pub fn admin(method: &str, path: &str, body: Value) -> Value {
    let url = format!("{}{path}", emu());
    let resp = match method {
        "GET" => agent().get(&url).call(),
        _ => agent()
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body.to_string()),
    }
    .unwrap_or_else(|e| {
        panic!("cloud emulator at {url} unreachable ({e}): run scripts/test-servers.sh start")
    });
    let status = resp.status().as_u16();
    let text = resp
        .into_body()
        .with_config()
        .limit(512 * 1024 * 1024)
        .read_to_string()
        .unwrap();
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {text}"
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A raw GET with a bearer token, for checking what a token can do: the status.
pub fn get_status_with_token(url: &str, token: &str) -> u16 {
    agent()
        .get(url)
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap()
        .status()
        .as_u16()
}

/// A unique name for this test's users and clients.
pub fn unique(tag: &str) -> String {
    common::unique_token(tag)
        .replace(['-', '_'], "")
        .to_lowercase()
}

/// A registered OAuth client and one mailbox user.
pub struct Tenant {
    pub provider: Provider,
    pub client_id: String,
    pub client_secret: String,
    pub mailbox: String,
}

/// Registers a client (optionally with its own access token lifetime) and a user.
pub fn tenant(provider: Provider, tag: &str, token_lifetime: Option<u64>) -> Tenant {
    let name = unique(tag);
    let p = provider_name(provider);
    let client = admin(
        "POST",
        "/_admin/clients",
        json!({
            "provider": p,
            "client_id": format!("app-{name}"),
            "client_secret": format!("secret-{name}-Zq9"),
            "redirect_uris": [REDIRECT_URI],
            "access_token_lifetime": token_lifetime,
        }),
    );
    let mailbox = format!("{name}@tenant.example");
    admin(
        "POST",
        "/_admin/users",
        json!({"provider": p, "email": mailbox, "display_name": format!("Box {name}")}),
    );
    Tenant {
        provider,
        client_id: client["client_id"].as_str().unwrap().to_string(),
        client_secret: client["client_secret"].as_str().unwrap().to_string(),
        mailbox,
    }
}

pub fn provider_name(provider: Provider) -> &'static str {
    match provider {
        Provider::Microsoft => "microsoft",
        Provider::Google => "google",
    }
}

/// Adds another user (mailbox) of `provider`.
pub fn add_user(provider: Provider, email: &str, mail: Option<&str>) {
    admin(
        "POST",
        "/_admin/users",
        json!({"provider": provider_name(provider), "email": email, "mail": mail}),
    );
}

/// The OAuth2 tab of an account pointing at the emulator, the way an administrator fills it.
pub fn oauth_settings(t: &Tenant) -> OAuthSettings {
    let base = emu();
    match t.provider {
        Provider::Microsoft => OAuthSettings {
            application_id: t.client_id.clone(),
            secret_key: Some(Secret::new(&t.client_secret)),
            authority_url: format!("{base}/common"),
            authorization_endpoint: "/oauth2/v2.0/authorize".into(),
            token_endpoint: "/oauth2/v2.0/token".into(),
            scopes: "openid profile offline_access user.read mail.readwrite mail.send"
                .split(' ')
                .map(String::from)
                .collect(),
            api_base_url: Some(format!("{base}/v1.0")),
            ..Default::default()
        },
        Provider::Google => OAuthSettings {
            application_id: t.client_id.clone(),
            secret_key: Some(Secret::new(&t.client_secret)),
            authorization_endpoint: format!("{base}/o/oauth2/v2/auth"),
            token_endpoint: format!("{base}/token"),
            scopes: vec!["https://mail.google.com/".into()],
            api_base_url: Some(base),
            ..Default::default()
        },
    }
}

/// An Entra ID app registration for Microsoft app-only access (client credentials).
pub struct App {
    pub client_id: String,
    pub client_secret: String,
}

/// Registers an app with the Microsoft Graph application permissions `roles` (e.g.
/// `Mail.ReadWrite`, `Mail.Send`), granted the mailboxes `mailboxes` (a list, or `"*"`) by
/// the Exchange application access policy.
pub fn app_only(tag: &str, roles: &[&str], mailboxes: Value) -> App {
    let name = unique(tag);
    let client = admin(
        "POST",
        "/_admin/clients",
        json!({
            "provider": "microsoft",
            "client_id": format!("app-{name}"),
            "client_secret": format!("secret-{name}-Zq9"),
            "app_roles": roles,
            "mailboxes": mailboxes,
        }),
    );
    App {
        client_id: client["client_id"].as_str().unwrap().to_string(),
        client_secret: client["client_secret"].as_str().unwrap().to_string(),
    }
}

/// The OAuth2 settings of an app-only OFFICE365 account: GRANT client_credentials, the
/// Application ID and Secret KEY, the authority and the Graph base at the emulator, no scopes
/// (the default, `https://graph.microsoft.com/.default`).
pub fn app_only_settings(app: &App) -> OAuthSettings {
    let base = emu();
    OAuthSettings {
        grant: pcr_email::config::OAuthGrant::ClientCredentials,
        application_id: app.client_id.clone(),
        secret_key: Some(Secret::new(&app.client_secret)),
        authority_url: format!("{base}/common"),
        api_base_url: Some(format!("{base}/v1.0")),
        ..Default::default()
    }
}

/// A new Microsoft mailbox (e.g. a shared mailbox) with a unique address.
pub fn shared_mailbox(tag: &str) -> String {
    let mailbox = format!("{}@tenant.example", unique(tag));
    admin(
        "POST",
        "/_admin/users",
        json!({"provider": "microsoft", "email": mailbox, "display_name": format!("Shared {tag}")}),
    );
    mailbox
}

/// A tenant Service Desk account sending and receiving through `provider`.
pub fn account(recid: i64, provider: Provider, email: &str, oauth: OAuthSettings) -> Account {
    let (transport, mailbox) = match provider {
        Provider::Microsoft => (TransportType::Office365, MailboxType::Office365),
        Provider::Google => (TransportType::Gmail, MailboxType::Gmail),
    };
    Account {
        id: AccountId::Tenant(recid),
        tenants_recid: 1,
        account_type: AccountType::ServiceDesk,
        email: email.to_string(),
        display_name: Some("Service Desk".into()),
        login: None,
        password: None,
        outgoing: Some(Outgoing {
            transport,
            host: None,
            port: 443,
            ssl: SslMode::Ssl,
        }),
        incoming: Some(Incoming {
            mailbox,
            host: None,
            port: 443,
            ssl: SslMode::Ssl,
            folder: "INBOX".into(),
            path: None,
            processed_action: ProcessedAction::Seen,
            max_messages: 500,
            max_message_bytes: 50 * 1024 * 1024,
        }),
        sysadmin: None,
        tls: TlsSettings::default(),
        file_path: "/nonexistent".into(),
        sendmail_path: "/usr/sbin/sendmail".into(),
        timeout: Duration::from_secs(10),
        auth_type: Default::default(),
        oauth: Some(oauth),
    }
}

/// A private state directory and key file.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub env: OAuthEnv,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let env = OAuthEnv {
            state_dir: dir.path().join("state"),
            state_dsn: None,
            key_file: dir.path().join("pcr360-email.key"),
        };
        Env { dir, env }
    }
    pub fn store(&self) -> StateStore {
        self.env.open_store().unwrap()
    }
    pub fn keys(&self) -> KeyStore {
        self.env.open_keys().unwrap()
    }
}

/// The browser part of a sign-in: follows the authorization URL (the emulator signs in the
/// `login_hint` user, or `as_user`) and returns the redirect's query parameters.
pub fn browser_sign_in(url: &str, as_user: Option<&str>) -> Vec<(String, String)> {
    let url = match as_user {
        Some(u) => format!("{url}&_user={}", pcr_email::http::percent_encode(u)),
        None => url.to_string(),
    };
    let resp = agent().get(&url).call().unwrap();
    assert_eq!(
        resp.status().as_u16(),
        302,
        "authorize did not redirect: {url}"
    );
    let location = resp
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(location.starts_with(REDIRECT_URI), "{location}");
    let query = location.split_once('?').unwrap().1;
    query
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

pub fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {params:?}"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.replace('+', " ").into_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The full sign-in: authorization URL, browser, completion.
pub fn sign_in(account: &Account, env: &Env) -> Authorized {
    let store = env.store();
    let keys = env.keys();
    let url = oauth::authorization_url(account, REDIRECT_URI, &store, &keys).unwrap();
    let params = browser_sign_in(&url, None);
    oauth::complete_authorization(
        param(&params, "state"),
        param(&params, "code"),
        std::slice::from_ref(account),
        &store,
        &keys,
    )
    .unwrap()
}

/// Puts a message into a mailbox (Graph folder or Gmail labels); returns its id.
pub fn seed(
    provider: Provider,
    user: &str,
    raw: &[u8],
    folder: Option<&str>,
    read: bool,
) -> String {
    let mut body = json!({
        "provider": provider_name(provider),
        "user": user,
        "raw_b64": STANDARD.encode(raw),
        "is_read": read,
    });
    if let Some(f) = folder {
        match provider {
            Provider::Microsoft => body["folder"] = json!(f),
            Provider::Google => body["labels"] = json!([f]),
        }
    }
    admin("POST", "/_admin/seed", body)["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What the emulator says is in a mailbox.
pub fn mailbox(provider: Provider, user: &str) -> Value {
    admin(
        "GET",
        &format!(
            "/_admin/mailbox?provider={}&user={}",
            provider_name(provider),
            pcr_email::http::percent_encode(user)
        ),
        Value::Null,
    )
}

/// The messages sent from `user`, oldest first, as raw bytes.
pub fn sent(user: &str) -> Vec<(Value, Vec<u8>)> {
    admin(
        "GET",
        &format!(
            "/_admin/sent?user={}",
            pcr_email::http::percent_encode(user)
        ),
        Value::Null,
    )["sent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let raw = STANDARD
                .decode(s["raw_b64"].as_str().unwrap_or(""))
                .unwrap();
            (s.clone(), raw)
        })
        .collect()
}

/// Grants and requests the emulator saw for a client (and user).
pub fn stats(client_id: &str, user: &str) -> Value {
    admin(
        "GET",
        &format!(
            "/_admin/stats?client_id={}&user={}",
            pcr_email::http::percent_encode(client_id),
            pcr_email::http::percent_encode(user)
        ),
        Value::Null,
    )
}

pub fn grants(client_id: &str, kind: &str) -> u64 {
    stats(client_id, "")["grants"][kind].as_u64().unwrap_or(0)
}

/// Injects a failure: `count` requests matching `path` (a regex) for `user` get `status`.
pub fn fault(path: &str, user: &str, status: u16, count: u32, extra: Value) {
    let mut body = json!({"path": path, "user": user, "status": status, "count": count});
    if let Value::Object(map) = extra {
        for (k, v) in map {
            body[k] = v;
        }
    }
    admin("POST", "/_admin/fault", body);
}

/// A test message as the builder makes them (CRLF, no Bcc): text, an HTML part with an inline
/// image, a binary attachment, threading headers and an SD number in the subject.
pub fn sample_mime(from: &str, to: &str, token: &str, attachment_bytes: usize) -> Vec<u8> {
    let attachment: Vec<u8> = (0..attachment_bytes)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let b64 = STANDARD.encode(&attachment);
    let wrapped: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let png = STANDARD.encode(b"\x89PNG\r\n\x1a\nfake-image-bytes");
    format!(
        "Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n\
         From: Service Desk <{from}>\r\n\
         To: {to}\r\n\
         Subject: [SO201700043] =?UTF-8?B?{subject}?=\r\n\
         Message-ID: <{token}.1@pcr360.example.edu>\r\n\
         In-Reply-To: <parent.{token}@pcr360.example.edu>\r\n\
         References: <root.{token}@pcr360.example.edu> <parent.{token}@pcr360.example.edu>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"outer-{token}\"\r\n\
         \r\n\
         --outer-{token}\r\n\
         Content-Type: multipart/related; boundary=\"rel-{token}\"\r\n\
         \r\n\
         --rel-{token}\r\n\
         Content-Type: text/html; charset=utf-8\r\n\
         Content-Transfer-Encoding: quoted-printable\r\n\
         \r\n\
         <p>Token {token} =E2=9C=93 <img src=3D\"cid:logo@pcr\"></p>\r\n\
         --rel-{token}\r\n\
         Content-Type: image/png\r\n\
         Content-ID: <logo@pcr>\r\n\
         Content-Disposition: inline; filename=\"logo.png\"\r\n\
         Content-Transfer-Encoding: base64\r\n\
         \r\n\
         {png}\r\n\
         --rel-{token}--\r\n\
         --outer-{token}\r\n\
         Content-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"data.bin\"\r\n\
         Content-Transfer-Encoding: base64\r\n\
         \r\n\
         {att}\r\n\
         --outer-{token}--\r\n",
        subject = STANDARD.encode("Grüße from the desk"),
        att = wrapped.join("\r\n"),
    )
    .into_bytes()
}

/// A simple incoming message.
pub fn incoming_mime(subject: &str, token: &str) -> Vec<u8> {
    format!(
        "From: Customer <customer@outside.example>\r\n\
         To: desk@tenant.example\r\n\
         Subject: {subject}\r\n\
         Message-ID: <{token}@outside.example>\r\n\
         Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n\
         \r\n\
         Body {token}\r\n"
    )
    .into_bytes()
}

/// True when `text` contains none of `secrets`.
pub fn assert_no_secret(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "a secret leaked into: {text}");
    }
}

/// The state directory of an environment (for lock files etc.).
pub fn state_dir(env: &Env) -> &Path {
    &env.env.state_dir
}
