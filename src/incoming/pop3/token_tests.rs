//! Signing in with an access token (`login_token`) against the scripted server of `mock.rs`.

use base64::Engine as _;

use super::mock::MockStream;
use super::*;
use crate::config::Secret;
use crate::sasl::testing::Counting;
use crate::sasl::{Mechanism, TokenSignIn};
use crate::Error;

const USER: &str = "alice@test.local";
const GREETING: &str = "+OK Dovecot ready.\r\n";
const CAPS_TOKEN: &str = "+OK\r\nUIDL\r\nUSER\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n.\r\n";

fn step(send: &str, reply: impl AsRef<[u8]>) -> (Vec<u8>, Vec<u8>) {
    (send.as_bytes().to_vec(), reply.as_ref().to_vec())
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// XOAUTH2's initial response for `token`.
fn xoauth2(token: &str) -> String {
    Mechanism::XOAuth2.initial_response(USER, &Secret::new(token), "pop.test", 110)
}

/// The failure challenge of RFC 7628 / Google's XOAUTH2 with `status`.
fn failure(status: &str) -> String {
    format!(
        "+ {}\r\n",
        b64(&format!(r#"{{"status":"{status}","scope":"mail"}}"#))
    )
}

fn started(mock: &MockStream) -> Pop3Session<MockStream> {
    let mut session = Pop3Session::start(mock.clone(), "7", "pop.test:110").unwrap();
    session.capa().unwrap();
    session
}

fn login(mock: &MockStream, signin: &mut TokenSignIn) -> crate::Result<TokenLogin<MockStream>> {
    started(mock).login_token(USER, signin, "pop.test", 110)
}

fn signed_in(
    outcome: crate::Result<TokenLogin<MockStream>>,
) -> Pop3Session<MockStream, Transaction> {
    match outcome.unwrap() {
        TokenLogin::LoggedIn(session) => session,
        other => panic!("expected a session, got {other:?}"),
    }
}

#[test]
fn xoauth2_with_the_initial_response_on_the_command_line() {
    let source = Counting::new(false);
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step(
            &format!("AUTH XOAUTH2 {}\r\n", xoauth2("t1")),
            "+OK Logged in.\r\n",
        ),
        step("CAPA\r\n", CAPS_TOKEN),
    ])
    .lockstep();
    let mut signin = TokenSignIn::new(source.clone());
    signed_in(login(&mock, &mut signin));
    mock.assert_done();
    assert_eq!((source.fetches(), source.refreshes()), (1, 0));
}

#[test]
fn oauthbearer_when_it_is_the_only_token_mechanism() {
    let response =
        Mechanism::OAuthBearer.initial_response(USER, &Secret::new("t1"), "pop.test", 110);
    let caps = "+OK\r\nUIDL\r\nSASL PLAIN OAUTHBEARER\r\n.\r\n";
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", caps),
        step(
            &format!("AUTH OAUTHBEARER {response}\r\n"),
            "+OK Logged in.\r\n",
        ),
        step("CAPA\r\n", caps),
    ]);
    let mut signin = TokenSignIn::new(Counting::new(false));
    signed_in(login(&mock, &mut signin));
    mock.assert_done();
}

#[test]
fn a_long_initial_response_waits_for_the_continuation() {
    // Real tokens are long: `AUTH XOAUTH2 <response>` would pass the 255 octets of RFC 5034.
    let prefix = "x".repeat(300);
    let token = format!("{prefix}1");
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step("AUTH XOAUTH2\r\n", "+ \r\n"),
        step(
            &format!(
                "{}\r\n",
                Mechanism::XOAuth2.initial_response(USER, &Secret::new(&token), "pop.test", 110)
            ),
            "+OK Logged in.\r\n",
        ),
        step("CAPA\r\n", CAPS_TOKEN),
    ])
    .lockstep();
    let mut signin = TokenSignIn::new(Counting::with_prefix(&prefix, false));
    signed_in(login(&mock, &mut signin));
    mock.assert_done();
}

#[test]
fn an_expired_token_gets_one_fresh_token_on_the_same_connection() {
    let source = Counting::new(false);
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step(
            &format!("AUTH XOAUTH2 {}\r\n", xoauth2("t1")),
            failure("401"),
        ),
        // XOAUTH2's acknowledgement of the failure is an empty line.
        step("\r\n", "-ERR [AUTH] Authentication failed.\r\n"),
        step(
            &format!("AUTH XOAUTH2 {}\r\n", xoauth2("t2")),
            "+OK Logged in.\r\n",
        ),
        step("CAPA\r\n", CAPS_TOKEN),
    ])
    .lockstep();
    let mut signin = TokenSignIn::new(source.clone());
    signed_in(login(&mock, &mut signin));
    mock.assert_done();
    assert_eq!((source.fetches(), source.refreshes()), (1, 1));
}

#[test]
fn oauthbearer_acknowledges_a_failure_with_its_control_a() {
    let caps = "+OK\r\nSASL OAUTHBEARER\r\n.\r\n";
    let first = Mechanism::OAuthBearer.initial_response(USER, &Secret::new("t1"), "pop.test", 110);
    let second = Mechanism::OAuthBearer.initial_response(USER, &Secret::new("t2"), "pop.test", 110);
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", caps),
        step(
            &format!("AUTH OAUTHBEARER {first}\r\n"),
            failure("invalid_token"),
        ),
        step("AQ==\r\n", "-ERR [AUTH] Authentication failed.\r\n"),
        step(
            &format!("AUTH OAUTHBEARER {second}\r\n"),
            "+OK Logged in.\r\n",
        ),
        step("CAPA\r\n", caps),
    ]);
    let mut signin = TokenSignIn::new(Counting::new(false));
    signed_in(login(&mock, &mut signin));
    mock.assert_done();
}

#[test]
fn a_fresh_token_refused_too_is_an_auth_error_without_the_token() {
    let source = Counting::new(false);
    let (first, second) = (xoauth2("t1"), xoauth2("t2"));
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step(&format!("AUTH XOAUTH2 {first}\r\n"), failure("401")),
        step(
            "\r\n",
            format!("-ERR [AUTH] Authentication failed for {first}\r\n"),
        ),
        step(&format!("AUTH XOAUTH2 {second}\r\n"), failure("401")),
        step("\r\n", "-ERR [AUTH] token t2 expired\r\n"),
    ]);
    let mut signin = TokenSignIn::new(source.clone());
    let err = login(&mock, &mut signin).unwrap_err();
    mock.assert_done();
    assert_eq!(source.refreshes(), 1);
    let text = format!("{err} {err:?}");
    match &err {
        Error::Auth { account, message } => {
            assert_eq!(account, "7");
            assert!(
                message.contains(
                    "the POP3 server pop.test:110 refused the access token for \
                     'alice@test.local' (XOAUTH2, status 401, scope mail) even after a fresh \
                     token was fetched: [AUTH] token <redacted> expired"
                ),
                "{message}"
            );
        }
        other => panic!("expected an auth error, got {other:?}"),
    }
    for secret in ["t1", "t2", &first, &second] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[test]
fn a_refusal_for_another_reason_is_final_at_once() {
    let source = Counting::new(false);
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step(
            &format!("AUTH XOAUTH2 {}\r\n", xoauth2("t1")),
            failure("403"),
        ),
        step("\r\n", "-ERR [AUTH] Authentication failed.\r\n"),
    ]);
    let mut signin = TokenSignIn::new(source.clone());
    let err = login(&mock, &mut signin).unwrap_err();
    mock.assert_done();
    assert_eq!(source.refreshes(), 0);
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("status 403"), "{err}");
}

#[test]
fn a_revoked_grant_is_the_token_sources_error() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step(
            &format!("AUTH XOAUTH2 {}\r\n", xoauth2("t1")),
            failure("401"),
        ),
        step("\r\n", "-ERR [AUTH] Authentication failed.\r\n"),
    ]);
    let mut signin = TokenSignIn::new(Counting::new(true));
    let err = login(&mock, &mut signin).unwrap_err();
    mock.assert_done();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("invalid_client"), "{err}");
}

#[test]
fn a_server_without_token_mechanisms_is_named_clearly() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", "+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"),
    ]);
    let mut signin = TokenSignIn::new(Counting::new(false));
    let err = login(&mock, &mut signin).unwrap_err();
    mock.assert_done();
    match &err {
        Error::Mailbox(f) => assert!(
            f.message.contains(
                "the POP3 server does not offer OAuth sign-in (SASL XOAUTH2 or OAUTHBEARER; it \
                 offers PLAIN LOGIN)"
            ),
            "{}",
            f.message
        ),
        other => panic!("expected a mailbox error, got {other:?}"),
    }
}

#[test]
fn a_server_that_hangs_up_after_the_refusal_gets_the_fresh_token_on_a_new_connection() {
    let source = Counting::new(false);
    // The failure challenge, then the connection ends before the -ERR.
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step(
            &format!("AUTH XOAUTH2 {}\r\n", xoauth2("t1")),
            failure("401"),
        ),
        step("\r\n", ""),
    ]);
    let mut signin = TokenSignIn::new(source.clone());
    match login(&mock, &mut signin).unwrap() {
        TokenLogin::Reconnect(err) => {
            assert!(!format!("{err:?}").contains("t1"), "{err:?}");
        }
        other => panic!("expected a reconnect, got {other:?}"),
    }
    mock.assert_done();
    let again = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step(
            &format!("AUTH XOAUTH2 {}\r\n", xoauth2("t2")),
            "+OK Logged in.\r\n",
        ),
        step("CAPA\r\n", CAPS_TOKEN),
    ]);
    signed_in(login(&again, &mut signin));
    again.assert_done();
    assert_eq!((source.fetches(), source.refreshes()), (1, 1));
}

#[test]
fn endless_challenges_are_cancelled() {
    let mock = MockStream::new(&[
        step("", GREETING),
        step("CAPA\r\n", CAPS_TOKEN),
        step(&format!("AUTH XOAUTH2 {}\r\n", xoauth2("t1")), "+ \r\n"),
        step("\r\n", "+ \r\n"),
        step("\r\n", "+ \r\n"),
        step("*\r\n", ""),
    ]);
    let mut signin = TokenSignIn::new(Counting::new(false));
    let err = login(&mock, &mut signin).unwrap_err();
    mock.assert_done();
    assert!(
        err.to_string().contains("kept sending XOAUTH2 challenges"),
        "{err}"
    );
}
