//! Proves the local test environment (`scripts/test-servers.sh start`) works: each server
//! answers as the other integration tests expect, and the helpers in `common` do what they
//! say. Plain-text protocol steps over std::net; TLS is checked with the `openssl` CLI, and
//! with native-tls for the OAuth logins (SASL XOAUTH2/OAUTHBEARER with the cloud emulator's
//! tokens on Dovecot and the XOAUTH2 SMTP ports).

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn code(reply: &[String]) -> &str {
    reply.last().map(|l| &l[..3.min(l.len())]).unwrap_or("")
}

#[test]
fn env_file_values_survive_shell_quoting() {
    let vars = parse_env_file(
        "# c\nexport A='plain'\nexport B='it'\\''s'\nexport C='Q\"uo\\ted pw*'\nD=bare\n",
    );
    assert_eq!(vars["A"], "plain");
    assert_eq!(vars["B"], "it's");
    assert_eq!(vars["C"], "Q\"uo\\ted pw*");
    assert_eq!(vars["D"], "bare");
    // The real file: the password meant to exercise quoting comes back byte for byte.
    assert_eq!(mail_user("quoted").password, "Q\"uo\\ted pw*");
    assert_eq!(mail_user("imapuser").email, env("PCR_IMAP_USER"));
}

#[test]
fn smtp_starttls_port_requires_tls_before_anything() {
    let mut c = LineConn::connect(port("PCR_SMTP_STARTTLS_PORT"));
    let banner = c.smtp_reply();
    assert_eq!(code(&banner), "220", "{banner:?}");
    let ehlo = c.smtp("EHLO client.test");
    assert_eq!(code(&ehlo), "250", "{ehlo:?}");
    assert!(ehlo.iter().any(|l| l.ends_with("STARTTLS")), "{ehlo:?}");
    assert!(ehlo.iter().any(|l| l.ends_with("PIPELINING")), "{ehlo:?}");
    assert!(
        !ehlo.iter().any(|l| l.contains("AUTH")),
        "AUTH must not be offered in clear: {ehlo:?}"
    );
    assert_eq!(code(&c.smtp("MAIL FROM:<a@test.local>")), "530");
    assert_eq!(code(&c.smtp("STARTTLS")), "220");
}

#[test]
fn smtp_plain_port_saves_exactly_what_was_accepted() {
    let p = port("PCR_SMTP_PLAIN_PORT");
    let token = unique_token("plain");
    let mut c = LineConn::connect(p);
    assert_eq!(code(&c.smtp_reply()), "220");
    assert_eq!(code(&c.smtp("EHLO client.test")), "250");
    // Pipelined envelope: the server answers each command in order.
    c.send("MAIL FROM:<sender@test.local>");
    c.send("RCPT TO:<ok@test.local>");
    c.send("RCPT TO:<reject-x@test.local>");
    c.send("RCPT TO:<tempfail-x@test.local>");
    c.send("DATA");
    assert_eq!(code(&c.smtp_reply()), "250");
    assert_eq!(code(&c.smtp_reply()), "250");
    assert_eq!(code(&c.smtp_reply()), "550");
    assert_eq!(code(&c.smtp_reply()), "451");
    assert_eq!(code(&c.smtp_reply()), "354");
    c.send(&format!("Subject: {token}"));
    c.send("");
    c.send("..a dot-stuffed line");
    c.send(".");
    assert_eq!(code(&c.smtp_reply()), "250");
    assert_eq!(code(&c.smtp("QUIT")), "221");

    let m = smtp_wait_containing(p, &token, WAIT);
    assert_eq!(m.mail_from, "sender@test.local");
    assert_eq!(m.rcpt_tos, vec!["ok@test.local".to_string()]);
    assert_eq!(m.auth_user, None);
    assert!(!m.tls);
    assert_eq!(m.header("subject").as_deref(), Some(token.as_str()));
    assert!(
        m.text().contains("\r\n.a dot-stuffed line\r\n"),
        "{:?}",
        m.text()
    );
    assert_eq!(smtp_containing(p, &token).len(), 1, "saved exactly once");
}

#[test]
fn smtp_data_rules_refuse_without_saving() {
    let p = port("PCR_SMTP_PLAIN_PORT");
    for (rcpt, want) in [
        ("datafail-1@test.local", "554"),
        ("datatempfail-1@test.local", "451"),
    ] {
        let token = unique_token("datarule");
        let mut c = LineConn::connect(p);
        c.smtp_reply();
        c.smtp("EHLO client.test");
        assert_eq!(code(&c.smtp("MAIL FROM:<s@test.local>")), "250");
        assert_eq!(code(&c.smtp(&format!("RCPT TO:<{rcpt}>"))), "250");
        assert_eq!(code(&c.smtp("DATA")), "354");
        c.send(&format!("Subject: {token}"));
        c.send("");
        c.send("x");
        assert_eq!(code(&c.smtp(".")), want, "{rcpt}");
        assert!(
            smtp_containing(p, &token).is_empty(),
            "{rcpt}: must not be saved"
        );
    }
}

/// `openssl s_client` against a TLS port, verifying against the test CA and `name`; returns
/// (verified, what the server said).
fn tls_probe(port: u16, name: &str, say: &str) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("{}:{port}", host())])
        .args([
            "-servername",
            name,
            "-verify_hostname",
            name,
            "-verify_return_error",
        ])
        .args(["-quiet", "-CAfile"])
        .arg(ca_file())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl s_client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{say}\r\n").as_bytes())
        .expect("write");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("openssl s_client to port {port} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn tls_ports_present_certificates_from_the_test_ca() {
    let (ok, said) = tls_probe(port("PCR_SMTP_TLS_PORT"), &tls_host(), "QUIT");
    assert!(ok && said.starts_with("220 "), "SMTPS: {said:?}");
    let (ok, said) = tls_probe(port("PCR_IMAPS_PORT"), &tls_host(), "a LOGOUT");
    assert!(ok && said.starts_with("* OK"), "IMAPS: {said:?}");
    let (ok, said) = tls_probe(port("PCR_POP3S_PORT"), &tls_host(), "QUIT");
    assert!(ok && said.starts_with("+OK"), "POP3S: {said:?}");

    // Same CA, but the certificate names another host: verification must fail...
    let (ok, _) = tls_probe(port("PCR_SMTP_WRONGHOST_PORT"), &tls_host(), "QUIT");
    assert!(!ok, "the wrong-host certificate verified for localhost");
    // ...and succeed for the name it was issued to.
    let (ok, said) = tls_probe(
        port("PCR_SMTP_WRONGHOST_PORT"),
        &env("PCR_TEST_WRONG_HOST"),
        "QUIT",
    );
    assert!(ok && said.starts_with("220 "), "{said:?}");
}

#[test]
fn dovecot_imap_greets_logs_in_and_sees_delivered_mail() {
    let user = mail_user("smoke");
    let token = unique_token("imap");
    deliver_to_inbox(
        &user.email,
        format!("From: a@test.local\r\nTo: {}\r\nSubject: s\r\nMessage-ID: <{token}@test>\r\n\r\nhello\r\n", user.email)
            .as_bytes(),
    );
    let mut c = LineConn::connect(port("PCR_IMAP_PORT"));
    let greeting = c.line();
    assert!(greeting.starts_with("* OK"), "{greeting:?}");
    assert!(greeting.contains("STARTTLS"), "{greeting:?}");
    c.send(&format!("a1 LOGIN {} {}", user.email, user.password));
    let login = c.until(|l| l.starts_with("a1 "));
    assert!(login.last().unwrap().starts_with("a1 OK"), "{login:?}");
    c.send("a2 SELECT INBOX");
    let sel = c.until(|l| l.starts_with("a2 "));
    assert!(sel.last().unwrap().starts_with("a2 OK"), "{sel:?}");
    c.send(&format!("a3 UID SEARCH HEADER Message-ID \"{token}\""));
    let search = c.until(|l| l.starts_with("a3 "));
    let hits = search
        .iter()
        .find(|l| l.starts_with("* SEARCH"))
        .map(|l| l.split_whitespace().count() - 2)
        .unwrap_or(0);
    assert_eq!(hits, 1, "{search:?}");
    c.send("a4 LOGOUT");
    c.until(|l| l.starts_with("a4 "));

    // A password with a quote, a backslash and a space logs in as an IMAP quoted string.
    let q = mail_user("quoted");
    let mut c = LineConn::connect(port("PCR_IMAP_PORT"));
    c.line();
    let quoted = q.password.replace('\\', "\\\\").replace('"', "\\\"");
    c.send(&format!("b1 LOGIN \"{}\" \"{quoted}\"", q.email));
    let login = c.until(|l| l.starts_with("b1 "));
    assert!(login.last().unwrap().starts_with("b1 OK"), "{login:?}");
}

#[test]
fn dovecot_pop3_greets_pipelines_and_checks_passwords() {
    let user = mail_user("pop3user");
    let mut c = LineConn::connect(port("PCR_POP3_PORT"));
    let greeting = c.line();
    assert!(greeting.starts_with("+OK"), "{greeting:?}");
    c.send("CAPA");
    let capa = c.until(|l| l == ".");
    for cap in ["PIPELINING", "STLS", "UIDL", "TOP"] {
        assert!(capa.iter().any(|l| l == cap), "{cap} missing: {capa:?}");
    }
    c.send(&format!("USER {}", user.email));
    c.send("PASS wrong-password");
    assert!(c.line().starts_with("+OK"));
    assert!(c.line().starts_with("-ERR"), "a wrong password must fail");

    let mut c = LineConn::connect(port("PCR_POP3_PORT"));
    c.line();
    c.send(&format!("USER {}", user.email));
    c.send(&format!("PASS {}", user.password));
    c.send("STAT");
    assert!(c.line().starts_with("+OK"));
    let pass = c.line();
    assert!(pass.starts_with("+OK"), "{pass:?}");
    assert!(c.line().starts_with("+OK "));
    c.send("QUIT");
    assert!(c.line().starts_with("+OK"));
}

#[test]
fn silent_port_accepts_and_never_speaks() {
    let mut c = LineConn::connect(port("PCR_SILENT_PORT"));
    c.send("EHLO anyone");
    let got = c.bytes_within(Duration::from_secs(1));
    assert!(got.is_empty(), "silent port sent {got:?}");
}

#[test]
fn sendmail_wrapper_relays_through_msmtp_with_tls_and_auth() {
    let p = port("PCR_SMTP_STARTTLS_PORT");
    let send = |args: &[&str], msg: String| {
        let mut child = Command::new(sendmail_path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the sendmail wrapper");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(msg.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "sendmail {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let token = unique_token("sendmail");
    send(
        &[
            "-i",
            "-f",
            "from@test.local",
            "--",
            "to1@test.local",
            "to2@test.local",
        ],
        format!("Subject: {token}\nFrom: from@test.local\n\n.single dot line\n"),
    );
    let m = smtp_wait_containing(p, &token, WAIT);
    assert_eq!(m.mail_from, "from@test.local");
    assert_eq!(m.rcpt_tos, ["to1@test.local", "to2@test.local"]);
    assert_eq!(m.auth_user.as_deref(), Some(env("PCR_SMTP_USER").as_str()));
    assert!(m.tls, "msmtp must have used STARTTLS");
    assert!(m.text().contains("\r\n.single dot line\r\n"));

    let token = unique_token("sendmail-t");
    send(
        &["-t", "-f", "from@test.local"],
        format!("Subject: {token}\nTo: t1@test.local\nCc: c1@test.local\n\nbody\n"),
    );
    let m = smtp_wait_containing(p, &token, WAIT);
    assert_eq!(m.rcpt_tos, ["t1@test.local", "c1@test.local"]);
}

#[test]
fn delay_proxy_adds_latency_and_keeps_the_stream() {
    let delay = Duration::from_millis(env("PCR_DELAY_MS").parse().expect("PCR_DELAY_MS"));
    let start = Instant::now();
    let mut c = LineConn::connect(port("PCR_DELAY_SMTP_PLAIN_PORT"));
    assert_eq!(code(&c.smtp_reply()), "220");
    assert!(
        start.elapsed() >= delay * 2,
        "greeting after {:?}",
        start.elapsed()
    );
    let t = Instant::now();
    let ehlo = c.smtp("EHLO client.test");
    assert!(t.elapsed() >= delay * 2, "round trip {:?}", t.elapsed());
    assert!(ehlo.iter().any(|l| l.ends_with("PIPELINING")), "{ehlo:?}");
    // Pipelined commands come back complete and in order through the proxy.
    c.send("NOOP");
    c.send("RSET");
    c.send("QUIT");
    assert_eq!(code(&c.smtp_reply()), "250");
    assert_eq!(code(&c.smtp_reply()), "250");
    assert_eq!(code(&c.smtp_reply()), "221");
}

#[test]
fn mailbox_helpers_deliver_list_and_reset() {
    let user = mail_user("smoke2").email;
    mailbox_reset(&user);
    let token = unique_token("helpers");
    deliver_to_inbox(
        &user,
        format!("Subject: a\r\nMessage-ID: <{token}-1@test>\r\n\r\na\r\n").as_bytes(),
    );
    deliver_to_folder(
        &user,
        "PCR-Failed",
        format!("Subject: b\r\nMessage-ID: <{token}-2@test>\r\n\r\nb\r\n").as_bytes(),
    );
    maildir_drop(
        &user,
        format!("Subject: c\r\nMessage-ID: <{token}-3@test>\r\n\r\nc\r\n").as_bytes(),
    );
    let inbox = mailbox_messages(&user, "INBOX");
    let ids: Vec<_> = inbox.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(
        ids,
        [format!("<{token}-1@test>"), format!("<{token}-3@test>")]
    );
    assert!(inbox[0].uid < inbox[1].uid);
    assert!(inbox.iter().all(|m| m.flags.is_empty()), "{inbox:?}");
    assert!(mailbox_folders(&user).contains(&"PCR-Failed".to_string()));
    assert_eq!(mailbox_messages(&user, "PCR-Failed").len(), 1);

    mailbox_reset(&user);
    assert_eq!(mailbox_folders(&user), ["INBOX"]);
    assert!(mailbox_messages(&user, "INBOX").is_empty());
}

// ---- OAuth 2.0 (SASL XOAUTH2 / OAUTHBEARER) against the cloud emulator's tokens -------

/// A line client over plain TCP or TLS (verified against the test CA), able to STARTTLS.
struct Wire {
    r: BufReader<Box<dyn Io>>,
}

trait Io: Read + Write + std::fmt::Debug {}
impl<T: Read + Write + std::fmt::Debug> Io for T {}

fn tls_over(stream: Box<dyn Io>) -> Box<dyn Io> {
    let ca = native_tls::Certificate::from_pem(&std::fs::read(ca_file()).expect("read the CA"))
        .expect("CA certificate");
    let connector = native_tls::TlsConnector::builder()
        .add_root_certificate(ca)
        .build()
        .expect("TLS connector");
    Box::new(
        connector
            .connect(&tls_host(), stream)
            .unwrap_or_else(|e| panic!("TLS handshake: {e}")),
    )
}

impl Wire {
    fn connect(port: u16, implicit_tls: bool) -> Wire {
        let tcp = TcpStream::connect((host().as_str(), port))
            .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
        tcp.set_read_timeout(Some(WAIT)).expect("timeout");
        let stream: Box<dyn Io> = Box::new(tcp);
        let stream = if implicit_tls {
            tls_over(stream)
        } else {
            stream
        };
        Wire {
            r: BufReader::new(stream),
        }
    }

    fn starttls(self) -> Wire {
        assert!(self.r.buffer().is_empty(), "bytes after the STARTTLS reply");
        Wire {
            r: BufReader::new(tls_over(self.r.into_inner())),
        }
    }

    fn line(&mut self) -> String {
        let mut buf = Vec::new();
        let n = self.r.read_until(b'\n', &mut buf).expect("read a line");
        assert!(n > 0, "connection closed by the server");
        String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string()
    }

    fn send(&mut self, line: &str) {
        let w = self.r.get_mut();
        w.write_all(format!("{line}\r\n").as_bytes())
            .and_then(|_| w.flush())
            .expect("send");
    }

    fn smtp(&mut self, cmd: &str) -> Vec<String> {
        self.send(cmd);
        self.smtp_reply()
    }

    fn smtp_reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line();
            let last = l.len() < 4 || l.as_bytes()[3] == b' ';
            lines.push(l);
            if last {
                return lines;
            }
        }
    }
}

fn xoauth2(user: &str, token: &str) -> String {
    B64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

fn oauthbearer(user: &str, token: &str) -> String {
    B64.encode(format!("n,a={user},\x01auth=Bearer {token}\x01\x01"))
}

/// The JSON of a SASL failure challenge line (`+ <base64>` or `334 <base64>`).
fn challenge_json(line: &str, prefix: &str) -> serde_json::Value {
    let b64 = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected a {prefix:?} challenge, got {line:?}"));
    serde_json::from_slice(&B64.decode(b64.trim()).expect("base64 challenge"))
        .expect("JSON challenge")
}

fn http() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_global(Some(WAIT))
            .build(),
    )
}

fn reply_json(resp: ureq::http::Response<ureq::Body>) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string().expect("body");
    (status, serde_json::from_str(&text).unwrap_or_default())
}

fn cloud_admin(path: &str, body: serde_json::Value) -> serde_json::Value {
    let (status, v) = reply_json(
        http()
            .post(&format!("{}{path}", cloud_emulator_url()))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .expect("cloud emulator"),
    );
    assert_eq!(status, 200, "{path}: {v}");
    v
}

/// Registers a Microsoft app with these application permissions and mailbox grant.
fn register_app(tag: &str, roles: &[&str], mailboxes: serde_json::Value) -> (String, String) {
    let id = unique_token(tag);
    let secret = unique_token("secret");
    cloud_admin(
        "/_admin/clients",
        serde_json::json!({"provider": "microsoft", "client_id": id, "client_secret": secret,
                           "app_roles": roles, "mailboxes": mailboxes}),
    );
    (id, secret)
}

/// The client credentials grant (status, reply).
fn app_token_reply(id: &str, secret: &str, scope: &str) -> (u16, serde_json::Value) {
    reply_json(
        http()
            .post(&format!(
                "{}/contoso.example/oauth2/v2.0/token",
                cloud_emulator_url()
            ))
            .send_form([
                ("grant_type", "client_credentials"),
                ("client_id", id),
                ("client_secret", secret),
                ("scope", scope),
            ])
            .expect("token endpoint"),
    )
}

fn app_token(id: &str, secret: &str) -> String {
    let (status, reply) = app_token_reply(id, secret, "https://outlook.office365.com/.default");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["token_type"], "Bearer", "{reply}");
    assert!(reply["expires_in"].as_u64().unwrap_or(0) > 0, "{reply}");
    assert!(reply.get("refresh_token").is_none(), "{reply}");
    reply["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// IMAP AUTHENTICATE with an initial response; Ok(()) when logged in (and INBOX selectable),
/// Err(challenge JSON) when refused the way Dovecot does it (challenge, then NO).
fn imap_oauth(port: u16, tls: bool, mech: &str, ir: &str) -> Result<(), serde_json::Value> {
    let mut c = Wire::connect(port, tls);
    let greeting = c.line();
    assert!(
        greeting.contains(&format!("AUTH={mech}")),
        "{mech} not offered: {greeting}"
    );
    c.send(&format!("a1 AUTHENTICATE {mech} {ir}"));
    let first = c.line();
    if first.starts_with("a1 OK") {
        c.send("a2 SELECT INBOX");
        let mut l = c.line();
        while !l.starts_with("a2 ") {
            l = c.line();
        }
        assert!(l.starts_with("a2 OK"), "{l}");
        return Ok(());
    }
    let status = challenge_json(&first, "+ ");
    // XOAUTH2 wants an empty response, OAUTHBEARER the dummy %x01 (RFC 7628 3.2.3).
    c.send(if mech == "XOAUTH2" { "" } else { "AQ==" });
    let end = c.line();
    assert!(
        end.starts_with("a1 NO [AUTHENTICATIONFAILED]"),
        "after the challenge: {end}"
    );
    Err(status)
}

/// POP3 AUTH with an initial response, like [`imap_oauth`] (`+ <challenge>`, then -ERR).
fn pop3_oauth(port: u16, tls: bool, mech: &str, ir: &str) -> Result<(), serde_json::Value> {
    let mut c = Wire::connect(port, tls);
    assert!(c.line().starts_with("+OK"));
    c.send(&format!("AUTH {mech} {ir}"));
    let first = c.line();
    if first.starts_with("+OK") {
        c.send("STAT");
        let stat = c.line();
        assert!(stat.starts_with("+OK "), "{stat}");
        return Ok(());
    }
    let status = challenge_json(&first, "+ ");
    c.send(if mech == "XOAUTH2" { "" } else { "AQ==" });
    let end = c.line();
    assert!(end.starts_with("-ERR"), "after the challenge: {end}");
    Err(status)
}

#[test]
fn oauth_app_only_token_opens_the_granted_shared_mailbox_over_imap_and_pop3() {
    let shared = oauth_shared_mailbox();
    let other = oauth_users()
        .into_iter()
        .find(|u| u != &shared)
        .expect("an OAuth user besides the shared mailbox");
    let (id, secret) = register_app(
        "imapapp",
        &["IMAP.AccessAsApp", "POP.AccessAsApp"],
        serde_json::json!([shared]),
    );
    let token = app_token(&id, &secret);
    // A message only the shared mailbox has: the login opened that mailbox.
    let mark = unique_token("oauth-shared");
    deliver_to_inbox(
        &shared,
        format!("Subject: s\r\nMessage-ID: <{mark}@test>\r\n\r\nhello\r\n").as_bytes(),
    );
    let mut c = Wire::connect(port("PCR_OAUTH_IMAP_PORT"), false);
    c.line();
    c.send(&format!(
        "a1 AUTHENTICATE XOAUTH2 {}",
        xoauth2(&shared, &token)
    ));
    let login = c.line();
    assert!(login.starts_with("a1 OK"), "{login}");
    c.send("a2 SELECT INBOX");
    while !c.line().starts_with("a2 OK") {}
    c.send(&format!("a3 UID SEARCH HEADER Message-ID \"{mark}\""));
    let hits = c.line();
    assert!(
        hits.starts_with("* SEARCH ") && hits.split_whitespace().count() == 3,
        "{hits}"
    );

    let imaps = port("PCR_OAUTH_IMAPS_PORT");
    assert_eq!(
        imap_oauth(imaps, true, "OAUTHBEARER", &oauthbearer(&shared, &token)),
        Ok(())
    );
    let pop3 = port("PCR_OAUTH_POP3_PORT");
    assert_eq!(
        pop3_oauth(pop3, false, "OAUTHBEARER", &oauthbearer(&shared, &token)),
        Ok(())
    );
    let pop3s = port("PCR_OAUTH_POP3S_PORT");
    assert_eq!(
        pop3_oauth(pop3s, true, "XOAUTH2", &xoauth2(&shared, &token)),
        Ok(())
    );

    // The same token for a mailbox outside the app's grant: the failure challenge, then NO.
    let refused = imap_oauth(imaps, true, "XOAUTH2", &xoauth2(&other, &token)).unwrap_err();
    assert_eq!(refused["status"], "401", "{refused}");
    let refused = pop3_oauth(pop3, false, "OAUTHBEARER", &oauthbearer(&other, &token)).unwrap_err();
    assert_eq!(refused["status"], "invalid_token", "{refused}");
}

#[test]
fn oauth_expired_or_ungranted_tokens_get_the_json_status_challenge() {
    let shared = oauth_shared_mailbox();
    // The app may open the mailbox over IMAP only: POP3 with its token is refused.
    let (id, secret) = register_app("expiring", &["IMAP.AccessAsApp"], serde_json::json!("*"));
    let token = app_token(&id, &secret);
    let imap = port("PCR_OAUTH_IMAP_PORT");
    assert_eq!(
        imap_oauth(imap, false, "XOAUTH2", &xoauth2(&shared, &token)),
        Ok(())
    );
    let no_role = pop3_oauth(
        port("PCR_OAUTH_POP3S_PORT"),
        true,
        "XOAUTH2",
        &xoauth2(&shared, &token),
    )
    .unwrap_err();
    assert_eq!(no_role["status"], "401", "{no_role}");

    let expired = cloud_admin(
        "/_admin/expire_access_tokens",
        serde_json::json!({ "client_id": id }),
    );
    assert_eq!(expired["expired"], 1, "{expired}");
    let status = imap_oauth(imap, false, "XOAUTH2", &xoauth2(&shared, &token)).unwrap_err();
    assert_eq!(
        status,
        serde_json::json!({"status": "401", "schemes": "bearer", "scope": "mail"})
    );
    let status = imap_oauth(imap, false, "OAUTHBEARER", &oauthbearer(&shared, &token)).unwrap_err();
    assert_eq!(status, serde_json::json!({"status": "invalid_token"}));
}

#[test]
fn oauth_delegated_tokens_open_their_own_mailbox_with_the_protocol_scope() {
    let users = oauth_users();
    let (ms_user, g_user) = (&users[0], &users[1]);
    let redirect = "http://localhost/cb";
    let sign_in = |provider: &str, scope: &str, user: &str| -> String {
        let id = unique_token("delegated");
        cloud_admin(
            "/_admin/clients",
            serde_json::json!({"provider": provider, "client_id": id, "client_secret": "pw",
                               "redirect_uris": [redirect]}),
        );
        let (authorize, token_path) = if provider == "microsoft" {
            ("/common/oauth2/v2.0/authorize", "/common/oauth2/v2.0/token")
        } else {
            ("/o/oauth2/v2/auth", "/token")
        };
        let resp = http()
            .get(&format!("{}{authorize}", cloud_emulator_url()))
            .query_pairs([
                ("client_id", id.as_str()),
                ("redirect_uri", redirect),
                ("response_type", "code"),
                ("scope", scope),
                ("_user", user),
            ])
            .call()
            .expect("authorize");
        assert_eq!(resp.status().as_u16(), 302);
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let code = location
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("code="))
            .unwrap_or_else(|| panic!("no code in {location}"))
            .replace("%2F", "/");
        let (status, reply) = reply_json(
            http()
                .post(&format!("{}{token_path}", cloud_emulator_url()))
                .send_form([
                    ("grant_type", "authorization_code"),
                    ("client_id", id.as_str()),
                    ("client_secret", "pw"),
                    ("code", code.as_str()),
                    ("redirect_uri", redirect),
                ])
                .expect("token"),
        );
        assert_eq!(status, 200, "{reply}");
        reply["access_token"].as_str().unwrap().to_string()
    };

    let ms = sign_in(
        "microsoft",
        "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
        ms_user,
    );
    let imaps = port("PCR_OAUTH_IMAPS_PORT");
    assert_eq!(
        imap_oauth(imaps, true, "XOAUTH2", &xoauth2(ms_user, &ms)),
        Ok(())
    );
    // Not for another mailbox, and not for POP3 (no POP.AccessAsUser.All in its scope).
    assert!(imap_oauth(imaps, true, "XOAUTH2", &xoauth2(g_user, &ms)).is_err());
    let pop3 = port("PCR_OAUTH_POP3_PORT");
    assert!(pop3_oauth(pop3, false, "XOAUTH2", &xoauth2(ms_user, &ms)).is_err());

    let google = sign_in("google", "https://mail.google.com/", g_user);
    assert_eq!(
        pop3_oauth(pop3, false, "OAUTHBEARER", &oauthbearer(g_user, &google)),
        Ok(())
    );
}

#[test]
fn oauth_dovecot_checks_every_login_and_reports_endpoint_failures_as_temporary() {
    // An app granted every mailbox (Exchange's "*"): any Dovecot mail user opens, also one
    // that is not an OAuth test mailbox, but a login that is no mailbox at all is refused
    // with the challenge (not a temporary failure: every login has a passdb that checks it).
    let (id, secret) = register_app(
        "everywhere",
        &["IMAP.AccessAsApp", "POP.AccessAsApp"],
        serde_json::json!("*"),
    );
    let token = app_token(&id, &secret);
    let imap = port("PCR_OAUTH_IMAP_PORT");
    let plain_user = mail_user("smoke").email;
    assert_eq!(
        imap_oauth(imap, false, "XOAUTH2", &xoauth2(&plain_user, &token)),
        Ok(())
    );
    let nobody = format!("nobody-{}@test.local", unique_token("x"));
    let refused = imap_oauth(imap, false, "XOAUTH2", &xoauth2(&nobody, &token)).unwrap_err();
    assert_eq!(refused["status"], "401", "{refused}");
    let refused = imap_oauth(imap, false, "OAUTHBEARER", &oauthbearer(&nobody, &token));
    assert_eq!(refused, Err(serde_json::json!({"status": "invalid_token"})));

    // The introspection endpoint failing (for this login's checks only): a temporary
    // failure without a challenge, on IMAP and POP3; the next login is fine again.
    let user = oauth_users()
        .into_iter()
        .find(|u| u.starts_with("oauth4@"))
        .expect("oauth4 in PCR_OAUTH_USERS");
    cloud_admin(
        "/_admin/fault",
        serde_json::json!({"path": "^/_introspect$", "user": user, "status": 503, "count": 2}),
    );
    let mut c = Wire::connect(imap, false);
    c.line();
    c.send(&format!(
        "a1 AUTHENTICATE XOAUTH2 {}",
        xoauth2(&user, &token)
    ));
    let answer = c.line();
    assert!(
        answer.starts_with("a1 NO [UNAVAILABLE] Temporary authentication failure."),
        "{answer}"
    );
    let mut c = Wire::connect(port("PCR_OAUTH_POP3_PORT"), false);
    c.line();
    c.send(&format!("AUTH OAUTHBEARER {}", oauthbearer(&user, &token)));
    let answer = c.line();
    assert!(answer.starts_with("-ERR [SYS/TEMP] "), "{answer}");
    assert_eq!(
        imap_oauth(imap, false, "OAUTHBEARER", &oauthbearer(&user, &token)),
        Ok(())
    );
}

#[test]
fn oauth_client_credentials_errors_are_microsofts() {
    let (id, secret) = register_app("errors", &[], serde_json::json!([]));
    let error = |reply: (u16, serde_json::Value)| {
        let desc = reply.1["error_description"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (
            reply.0,
            reply.1["error"].as_str().unwrap_or("").to_string(),
            desc[..desc.find(':').unwrap_or(0)].to_string(),
        )
    };
    let outlook = "https://outlook.office365.com/.default";
    assert_eq!(
        error(app_token_reply(&id, "wrong", outlook)),
        (401, "invalid_client".into(), "AADSTS7000215".into())
    );
    assert_eq!(
        error(app_token_reply("no-such-app", &secret, outlook)),
        (400, "unauthorized_client".into(), "AADSTS700016".into())
    );
    assert_eq!(
        error(app_token_reply(
            &id,
            &secret,
            "https://outlook.office365.com/IMAP.AccessAsApp"
        )),
        (400, "invalid_scope".into(), "AADSTS1002012".into())
    );
    // Graph works too; then the secret is revoked.
    assert_eq!(
        app_token_reply(&id, &secret, "https://graph.microsoft.com/.default").0,
        200
    );
    cloud_admin(
        "/_admin/revoke_secret",
        serde_json::json!({ "client_id": id }),
    );
    assert_eq!(
        error(app_token_reply(&id, &secret, outlook)),
        (401, "invalid_client".into(), "AADSTS7000215".into())
    );
}

/// SMTP AUTH on an XOAUTH2 port after EHLO (and STARTTLS on the STARTTLS port): the reply.
fn smtp_oauth_session(port: u16, implicit_tls: bool) -> Wire {
    let mut c = Wire::connect(port, implicit_tls);
    assert_eq!(code(&c.smtp_reply()), "220");
    let ehlo = c.smtp("EHLO client.test");
    if !implicit_tls {
        assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
        assert_eq!(code(&c.smtp("STARTTLS")), "220");
        c = c.starttls();
    }
    let ehlo = if implicit_tls {
        ehlo
    } else {
        c.smtp("EHLO client.test")
    };
    let auth = ehlo
        .iter()
        .find(|l| l[4..].starts_with("AUTH "))
        .unwrap_or_else(|| panic!("no AUTH: {ehlo:?}"));
    for mech in ["XOAUTH2", "OAUTHBEARER", "PLAIN", "LOGIN"] {
        assert!(auth.split_whitespace().any(|m| m == mech), "{auth}");
    }
    c
}

#[test]
fn smtp_xoauth2_ports_accept_a_valid_token_and_refuse_a_bad_one_with_535() {
    let shared = oauth_shared_mailbox();
    let (id, secret) = register_app("smtpapp", &["SMTP.SendAsApp"], serde_json::json!([shared]));
    let token = app_token(&id, &secret);
    for (var, implicit_tls) in [
        ("PCR_SMTP_XOAUTH2_STARTTLS_PORT", false),
        ("PCR_SMTP_XOAUTH2_TLS_PORT", true),
    ] {
        let p = port(var);
        let mut c = smtp_oauth_session(p, implicit_tls);
        let bad = c.smtp(&format!("AUTH XOAUTH2 {}", xoauth2(&shared, "not-a-token")));
        let status = challenge_json(&bad[0], "334 ");
        assert_eq!(status["status"], "401", "{status}");
        assert_eq!(c.smtp(""), ["535 5.7.3 Authentication unsuccessful"]);
        let bad = c.smtp(&format!(
            "AUTH OAUTHBEARER {}",
            oauthbearer(&shared, "nope")
        ));
        assert_eq!(challenge_json(&bad[0], "334 ")["status"], "invalid_token");
        assert_eq!(code(&c.smtp("AQ==")), "535");

        let mark = unique_token("smtp-oauth");
        assert_eq!(
            c.smtp(&format!("AUTH XOAUTH2 {}", xoauth2(&shared, &token))),
            ["235 2.7.0 Authentication successful"]
        );
        assert_eq!(code(&c.smtp(&format!("MAIL FROM:<{shared}>"))), "250");
        assert_eq!(code(&c.smtp("RCPT TO:<rcpt@test.local>")), "250");
        assert_eq!(code(&c.smtp("DATA")), "354");
        assert_eq!(
            code(&c.smtp(&format!("Subject: {mark}\r\n\r\nbody\r\n."))),
            "250"
        );
        let m = smtp_wait_containing(p, &mark, WAIT);
        assert_eq!(m.auth_user.as_deref(), Some(shared.as_str()), "{var}");
        assert!(m.tls, "{var}");
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(m.eml_path.with_extension("json")).expect("the .json"),
        )
        .expect("JSON");
        assert_eq!(meta["auth_mechanism"], "XOAUTH2", "{var}");
    }
}
