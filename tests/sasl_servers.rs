//! The IMAP, POP3 and SMTP clients signing in with real access tokens (SPEC §3a) against the
//! test servers (`scripts/test-servers.sh start`): Dovecot and the XOAUTH2 SMTP ports check
//! tokens of the cloud emulator through its introspection endpoint. The token source here
//! takes Microsoft app-only tokens (client credentials) from the emulator's token endpoint and
//! counts what it asks for: a valid token signs in; a token expired on the server
//! (`/_admin/expire_access_tokens`) gets exactly one fresh token and signs in; a revoked secret
//! is the account's `Error::Auth`; a token the server keeps refusing is an `Error::Auth` after
//! one refresh.
//!
//! Each test registers its own app (so expiring "its" tokens touches no other test) and uses
//! its own mailbox: IMAP `oauth1`, POP3 `oauth2` (POP3 locks the maildrop), SMTP `oauth3`.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, Outgoing, ProcessedAction, Secret,
    SslMode, TlsSettings, TransportType,
};
use pcr_email::incoming::imap::ImapMailbox;
use pcr_email::incoming::pop3::Pop3Mailbox;
use pcr_email::incoming::Mailbox;
use pcr_email::outgoing::smtp::SmtpTransport;
use pcr_email::outgoing::{BuiltMessage, Transport};
use pcr_email::sasl::{Credentials, TokenSource};
use pcr_email::state::StateStore;
use pcr_email::Error;

const WAIT: Duration = Duration::from_secs(15);

fn http() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(WAIT))
            .build(),
    )
}

fn post_json(path: &str, body: serde_json::Value) -> serde_json::Value {
    let resp = http()
        .post(&format!("{}{path}", common::cloud_emulator_url()))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .expect("cloud emulator");
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().expect("body");
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap_or_default()
}

/// A Microsoft app registered in the emulator.
struct App {
    id: String,
    secret: String,
}

impl App {
    /// An app with these application permissions on every mailbox.
    fn register(tag: &str, roles: &[&str]) -> App {
        let app = App {
            id: common::unique_token(tag),
            secret: common::unique_token("secret"),
        };
        post_json(
            "/_admin/clients",
            serde_json::json!({"provider": "microsoft", "client_id": app.id,
                               "client_secret": app.secret, "app_roles": roles,
                               "mailboxes": "*"}),
        );
        app
    }

    /// Every access token issued to the app becomes inactive (as if it had expired early).
    fn expire_tokens(&self) {
        post_json(
            "/_admin/expire_access_tokens",
            serde_json::json!({"client_id": self.id}),
        );
    }

    /// The app's secret is refused from now on.
    fn revoke_secret(&self) {
        post_json(
            "/_admin/revoke_secret",
            serde_json::json!({"client_id": self.id}),
        );
    }

    fn tokens(&self) -> Arc<AppTokens> {
        Arc::new(AppTokens {
            id: self.id.clone(),
            secret: self.secret.clone(),
            cached: Mutex::new(None),
            grants: Mutex::new(0),
            refreshes: Mutex::new(0),
            handed_out: Mutex::new(Vec::new()),
        })
    }
}

/// Client-credentials tokens from the emulator, cached like the real source: `access_token`
/// asks the token endpoint only when nothing is cached.
struct AppTokens {
    id: String,
    secret: String,
    cached: Mutex<Option<String>>,
    grants: Mutex<u32>,
    refreshes: Mutex<u32>,
    handed_out: Mutex<Vec<String>>,
}

impl AppTokens {
    fn grant(&self) -> pcr_email::Result<Secret> {
        *self.grants.lock().unwrap() += 1;
        let resp = http()
            .post(&format!(
                "{}/contoso.example/oauth2/v2.0/token",
                common::cloud_emulator_url()
            ))
            .send_form([
                ("grant_type", "client_credentials"),
                ("client_id", self.id.as_str()),
                ("client_secret", self.secret.as_str()),
                ("scope", "https://outlook.office365.com/.default"),
            ])
            .map_err(|e| Error::message(format!("token endpoint: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let Some(token) = reply["access_token"].as_str().filter(|_| status == 200) else {
            return Err(Error::auth(
                "42",
                format!(
                    "the token endpoint refused the grant: {}",
                    reply["error"].as_str().unwrap_or("?")
                ),
            ));
        };
        self.handed_out.lock().unwrap().push(token.to_string());
        *self.cached.lock().unwrap() = Some(token.to_string());
        Ok(Secret::new(token))
    }

    /// (token endpoint requests, refreshes after a refusal)
    fn counts(&self) -> (u32, u32) {
        (
            *self.grants.lock().unwrap(),
            *self.refreshes.lock().unwrap(),
        )
    }

    /// Fails when any token handed out appears in `text`.
    fn assert_absent_from(&self, text: &str) {
        for token in self.handed_out.lock().unwrap().iter() {
            assert!(!text.contains(token.as_str()), "a token in {text}");
        }
    }
}

impl TokenSource for AppTokens {
    fn access_token(&self) -> pcr_email::Result<Secret> {
        if let Some(token) = self.cached.lock().unwrap().clone() {
            return Ok(Secret::new(token));
        }
        self.grant()
    }
    fn refresh_after_rejection(&self, _rejected: &Secret) -> pcr_email::Result<Secret> {
        *self.refreshes.lock().unwrap() += 1;
        *self.cached.lock().unwrap() = None;
        self.grant()
    }
    fn grant(&self) -> &'static str {
        "client_credentials"
    }
}

fn bearer(user: &str, tokens: &Arc<AppTokens>) -> Credentials {
    Credentials::Bearer {
        user: user.to_string(),
        tokens: tokens.clone() as Arc<dyn TokenSource>,
    }
}

fn oauth_user(n: usize) -> String {
    let users = common::oauth_users();
    let wanted = format!("oauth{n}@");
    users
        .into_iter()
        .find(|u| u.starts_with(&wanted))
        .unwrap_or_else(|| panic!("no {wanted} in PCR_OAUTH_USERS"))
}

fn account(user: &str, incoming: Option<Incoming>, outgoing: Option<Outgoing>) -> Account {
    Account {
        id: AccountId::Tenant(42),
        tenants_recid: 3,
        account_type: AccountType::ServiceDesk,
        email: user.to_string(),
        display_name: None,
        login: None,
        // A token account has no password.
        password: None,
        outgoing,
        incoming,
        sysadmin: None,
        tls: TlsSettings {
            verify_cert: true,
            ca_file: Some(common::ca_file()),
        },
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/nonexistent"),
        timeout: Duration::from_secs(10),
        auth_type: Default::default(),
        oauth: None,
    }
}

fn incoming(mailbox: MailboxType, port: &str, ssl: SslMode) -> Incoming {
    Incoming {
        mailbox,
        host: Some(common::tls_host()),
        port: common::port(port),
        ssl,
        folder: "INBOX".to_string(),
        path: None,
        processed_action: ProcessedAction::Seen,
        max_messages: 500,
        max_message_bytes: 10 * 1024 * 1024,
    }
}

fn auth_message(err: &Error) -> &str {
    match err {
        Error::Auth { account, message } => {
            assert_eq!(account, "42");
            message
        }
        other => panic!("expected an authorization error, got {other:?}"),
    }
}

/// Runs the four cases against one incoming port; `open` connects and does one operation.
fn four_cases(
    protocol: &str,
    role: &str,
    open: &dyn Fn(&Arc<AppTokens>) -> pcr_email::Result<usize>,
) {
    // A valid token signs in: one grant, no refresh.
    let app = App::register(protocol, &[role]);
    let tokens = app.tokens();
    open(&tokens).expect("signed in with a valid token");
    assert_eq!(tokens.counts(), (1, 0));

    // Expired on the server while cached: refused, exactly one fresh token, signed in.
    app.expire_tokens();
    open(&tokens).expect("signed in after one refresh");
    assert_eq!(tokens.counts(), (2, 1));

    // The secret revoked and the token expired: the refresh fails, an Error::Auth.
    app.expire_tokens();
    app.revoke_secret();
    let err = open(&tokens).unwrap_err();
    assert!(auth_message(&err).contains("invalid_client"), "{err}");
    assert_eq!(tokens.counts(), (3, 2));
    tokens.assert_absent_from(&format!("{err} {err:?}"));

    // An app without the protocol's permission: every token refused, one refresh, then the
    // account's Error::Auth naming the protocol and never the token.
    let app = App::register(protocol, &[]);
    let tokens = app.tokens();
    let err = open(&tokens).unwrap_err();
    let message = auth_message(&err);
    assert!(
        message.contains(&format!("the {protocol} server"))
            && message.contains("refused the access token")
            && message.contains("even after a fresh token was fetched"),
        "{message}"
    );
    assert_eq!(tokens.counts(), (2, 1));
    tokens.assert_absent_from(&format!("{err} {err:?}"));
}

#[test]
fn imap_signs_in_with_tokens_over_starttls_and_imaps() {
    let user = oauth_user(1);
    let mark = common::unique_token("sasl-imap");
    common::deliver_to_inbox(
        &user,
        format!("Subject: {mark}\r\nMessage-ID: <{mark}@test>\r\n\r\nhello\r\n").as_bytes(),
    );
    for (port, ssl) in [
        ("PCR_OAUTH_IMAP_PORT", SslMode::StartTls),
        ("PCR_OAUTH_IMAPS_PORT", SslMode::Ssl),
    ] {
        let acc = account(&user, Some(incoming(MailboxType::Imap, port, ssl)), None);
        four_cases("IMAP", "IMAP.AccessAsApp", &|tokens| {
            let dir = tempfile::tempdir().unwrap();
            let state = StateStore::open(dir.path(), None).unwrap();
            let mut mailbox = ImapMailbox::connect_with(&acc, state, bearer(&user, tokens))?;
            let count = mailbox.count()?;
            assert!(count >= 1, "{count}");
            Box::new(mailbox).finish()?;
            Ok(count)
        });
    }
}

#[test]
fn pop3_signs_in_with_tokens_over_stls_and_pop3s() {
    let user = oauth_user(2);
    for (port, ssl) in [
        ("PCR_OAUTH_POP3_PORT", SslMode::StartTls),
        ("PCR_OAUTH_POP3S_PORT", SslMode::Ssl),
    ] {
        let acc = account(&user, Some(incoming(MailboxType::Pop3, port, ssl)), None);
        four_cases("POP3", "POP.AccessAsApp", &|tokens| {
            let dir = tempfile::tempdir().unwrap();
            let state = StateStore::open(dir.path(), None).unwrap();
            let mut mailbox = Pop3Mailbox::connect_with(&acc, state, bearer(&user, tokens))?;
            let count = mailbox.count()?;
            Box::new(mailbox).finish()?;
            Ok(count)
        });
    }
}

#[test]
fn smtp_sends_with_tokens_over_starttls_and_implicit_tls() {
    let user = oauth_user(3);
    for (port_var, ssl) in [
        ("PCR_SMTP_XOAUTH2_STARTTLS_PORT", SslMode::StartTls),
        ("PCR_SMTP_XOAUTH2_TLS_PORT", SslMode::Ssl),
    ] {
        let port = common::port(port_var);
        let outgoing = Outgoing {
            transport: TransportType::Smtp,
            host: Some(common::tls_host()),
            port,
            ssl,
        };
        let acc = account(&user, None, Some(outgoing));
        four_cases("SMTP", "SMTP.SendAsApp", &|tokens| {
            let transport = SmtpTransport::with_credentials(&acc, bearer(&user, tokens))?;
            let mark = common::unique_token("sasl-smtp");
            transport.send(&BuiltMessage {
                raw: format!("Subject: {mark}\r\nFrom: {user}\r\n\r\nbody\r\n").into_bytes(),
                envelope_from: user.clone(),
                recipients: vec!["to@test.local".into()],
                message_id: format!("<{mark}@test>"),
                from: user.clone(),
                subject: mark.clone(),
            })?;
            let got = common::smtp_wait_containing(port, &mark, WAIT);
            assert_eq!(got.auth_user.as_deref(), Some(user.as_str()));
            assert!(got.tls);
            let meta = std::fs::read_to_string(got.eml_path.with_extension("json")).unwrap();
            let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
            assert_eq!(meta["auth_mechanism"], "XOAUTH2", "{meta}");
            Ok(1)
        });
    }
}
