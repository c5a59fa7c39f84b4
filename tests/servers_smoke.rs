//! Proves the local test environment (`scripts/test-servers.sh start`) works: each server
//! answers as the other integration tests expect, and the helpers in `common` do what they
//! say. Plain-text protocol steps over std::net; TLS is checked with the `openssl` CLI.

mod common;

use common::*;
use std::io::Write;
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
