//! Shared helpers for the integration tests: where the local test servers are
//! (`scripts/test-servers.sh start`), what the SMTP servers received, and how to put mail
//! into a Dovecot mailbox.
//!
//! Use from a test file with `mod common;`. Every value comes from the process environment
//! first, then from `.testenv/env` at the crate root. A missing value PANICS: a test whose
//! server is absent must fail, never skip.
//!
//! Injecting mail into a Dovecot user's mailbox (what [`deliver_to_inbox`] runs):
//! `$PCR_DOVECOT_LDA -c $PCR_DOVECOT_CONF -e -d <user> [-m <folder>] < message.eml`
//! ([`maildir_drop`] writes into `Maildir/new` directly instead, faster for bulk).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const NOT_RUNNING: &str = "test servers not running: run scripts/test-servers.sh start";

/// The crate root (where `.testenv/` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_file() -> &'static HashMap<String, String> {
    static FILE: OnceLock<HashMap<String, String>> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = repo_root().join(".testenv/env");
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_env_file(&text),
            Err(_) => HashMap::new(),
        }
    })
}

/// Parses the `export NAME='value'` lines written by `scripts/test-servers.sh`.
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((name, raw)) = line.split_once('=') {
            vars.insert(name.trim().to_string(), shell_unquote(raw));
        }
    }
    vars
}

/// Undoes POSIX shell quoting of one word: '...', "..." and backslash escapes.
fn shell_unquote(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => out.extend(chars.by_ref().take_while(|&c| c != '\'')),
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => out.extend(chars.next()),
                        c => out.push(c),
                    }
                }
            }
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// A value of the test environment, if set.
pub fn env_opt(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| env_file().get(name).cloned())
}

/// A value of the test environment; panics with a clear message when it is missing.
pub fn env(name: &str) -> String {
    env_opt(name).unwrap_or_else(|| {
        panic!(
            "{NOT_RUNNING} (missing {name}; looked in the environment and {})",
            repo_root().join(".testenv/env").display()
        )
    })
}

/// A port of the test environment, e.g. `port("PCR_IMAPS_PORT")`.
pub fn port(name: &str) -> u16 {
    let value = env(name);
    value
        .parse()
        .unwrap_or_else(|_| panic!("{name}={value:?} is not a port number"))
}

/// The address every test server listens on (127.0.0.1).
pub fn host() -> String {
    env("PCR_TEST_HOST")
}

/// The host name in the test certificate (`localhost`); connect to this name to verify TLS.
pub fn tls_host() -> String {
    env("PCR_TEST_TLS_HOST")
}

/// The test CA that signed every server certificate.
pub fn ca_file() -> PathBuf {
    PathBuf::from(env("PCR_TEST_CA"))
}

/// The sendmail-compatible wrapper around msmtp (relays to the STARTTLS SMTP server).
pub fn sendmail_path() -> PathBuf {
    PathBuf::from(env("PCR_SENDMAIL"))
}

/// The `n`-th port of the spare block tests may use for their own servers.
pub fn spare_port(n: u16) -> u16 {
    let first = port("PCR_TEST_SPARE_PORT_FIRST");
    let last = port("PCR_TEST_SPARE_PORT_LAST");
    assert!(
        first + n <= last,
        "spare port #{n} is outside {first}..={last}"
    );
    first + n
}

/// The cloud emulator's base URL (Microsoft identity + Graph, Google OAuth + Gmail, admin API).
pub fn cloud_emulator_url() -> String {
    env("PCR_CLOUD_URL")
}

/// The cloud emulator's RFC 7662 token introspection endpoint, through which Dovecot and the
/// XOAUTH2 SMTP ports check OAuth bearer tokens (`POST ?user=&service=`, form `token=`; Dovecot's
/// oauth2 passdb names the service in an `X-Dovecot-Auth-Service` header).
pub fn introspect_url() -> String {
    env("PCR_INTROSPECT_URL")
}

/// The mailboxes for OAuth tests (`oauth1@test.local`..`oauth4@`, `shared@`): Dovecot users
/// (with a password too) registered in the cloud emulator for both providers.
pub fn oauth_users() -> Vec<String> {
    env("PCR_OAUTH_USERS")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The OAuth test mailbox that stands for an Exchange shared mailbox (`shared@test.local`).
pub fn oauth_shared_mailbox() -> String {
    env("PCR_OAUTH_SHARED_MAILBOX")
}

/// A string unique to this call (across processes and runs), to find "my" message.
pub fn unique_token(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{nanos:x}-{n}", std::process::id())
}

// ---- mail users ------------------------------------------------------------------------

/// A mailbox user of the test environment: valid for IMAP, POP3 and the AUTH SMTP ports.
#[derive(Clone, Debug)]
pub struct MailUser {
    pub email: String,
    pub password: String,
}

/// The user `<local>@test.local`, e.g. `mail_user("mbox1")` (see `PCR_MAIL_USERS`).
pub fn mail_user(local: &str) -> MailUser {
    let local = local.split('@').next().unwrap_or(local);
    MailUser {
        email: format!("{local}@{}", env("PCR_MAIL_DOMAIN")),
        password: env(&format!("PCR_PASS_{}", local.to_ascii_uppercase())),
    }
}

// ---- what the SMTP servers received ----------------------------------------------------

/// One message an SMTP test server accepted (`.testenv/smtp/<port>/<n>.eml` + `.json`).
#[derive(Clone, Debug)]
pub struct ReceivedMail {
    pub n: u64,
    pub port: u16,
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    /// The AUTH login used, if any.
    pub auth_user: Option<String>,
    /// Whether the session was encrypted (STARTTLS or implicit TLS).
    pub tls: bool,
    /// MAIL FROM parameters, e.g. `SIZE=123`, `BODY=8BITMIME`.
    pub mail_options: Vec<String>,
    /// The DATA exactly as received (dot-unstuffed, CRLF line ends).
    pub raw: Vec<u8>,
    pub eml_path: PathBuf,
}

impl ReceivedMail {
    /// The raw message as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    /// The first header `name` (case-insensitive), unfolded; None when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }

    /// Every header `name` (case-insensitive), unfolded, in order.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let text = self.text();
        let head = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or("")
            .split("\n\n")
            .next()
            .unwrap_or("");
        let mut fields: Vec<String> = Vec::new();
        for line in head.lines() {
            let line = line.trim_end_matches('\r');
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    last.push(' ');
                    last.push_str(line.trim());
                }
            } else {
                fields.push(line.to_string());
            }
        }
        fields
            .iter()
            .filter_map(|f| f.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }
}

/// The drop directory of one SMTP listener.
pub fn smtp_dir(port: u16) -> PathBuf {
    PathBuf::from(env("PCR_SMTP_DROP_DIR")).join(port.to_string())
}

/// Every message the SMTP server on `port` has accepted so far, oldest first. A message
/// counts once its `.json` exists (it is written after the `.eml`).
pub fn smtp_received(port: u16) -> Vec<ReceivedMail> {
    let dir = smtp_dir(port);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot read {}: {e}", dir.display()),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let Ok(n) = stem.parse::<u64>() else { continue };
        // A concurrent smtp_clear may remove the pair between listing and reading.
        let (Ok(meta), Ok(raw)) = (
            std::fs::read(entry.path()),
            std::fs::read(dir.join(format!("{n}.eml"))),
        ) else {
            continue;
        };
        let meta: serde_json::Value = serde_json::from_slice(&meta)
            .unwrap_or_else(|e| panic!("bad {}: {e}", entry.path().display()));
        let strings = |key: &str| -> Vec<String> {
            meta[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        out.push(ReceivedMail {
            n,
            port,
            mail_from: meta["mail_from"].as_str().unwrap_or("").to_string(),
            rcpt_tos: strings("rcpt_tos"),
            auth_user: meta["auth_user"].as_str().map(str::to_string),
            tls: meta["tls"].as_bool().unwrap_or(false),
            mail_options: strings("mail_options"),
            raw,
            eml_path: dir.join(format!("{n}.eml")),
        });
    }
    out.sort_by_key(|m| m.n);
    out
}

/// The messages on `port` whose raw text contains `needle` (e.g. a [`unique_token`]).
pub fn smtp_containing(port: u16, needle: &str) -> Vec<ReceivedMail> {
    smtp_received(port)
        .into_iter()
        .filter(|m| m.text().contains(needle))
        .collect()
}

/// Waits until a message matching `pred` arrived on `port`; panics after `timeout` with a
/// summary of what did arrive.
pub fn smtp_wait_for(
    port: u16,
    timeout: Duration,
    pred: impl Fn(&ReceivedMail) -> bool,
) -> ReceivedMail {
    let deadline = Instant::now() + timeout;
    loop {
        let all = smtp_received(port);
        if let Some(m) = all.iter().find(|m| pred(m)) {
            return m.clone();
        }
        if Instant::now() >= deadline {
            let seen: Vec<String> = all
                .iter()
                .map(|m| format!("#{} from {} to {:?}", m.n, m.mail_from, m.rcpt_tos))
                .collect();
            panic!(
                "no matching message on SMTP port {port} within {timeout:?}; received: {seen:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits for the message containing `needle` on `port` (panics after `timeout`).
pub fn smtp_wait_containing(port: u16, needle: &str, timeout: Duration) -> ReceivedMail {
    smtp_wait_for(port, timeout, |m| m.text().contains(needle))
}

/// Removes every saved message of `port`. Other tests may use the same port in parallel:
/// prefer finding your own messages by a [`unique_token`] over clearing.
pub fn smtp_clear(port: u16) {
    let dir = smtp_dir(port);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

// ---- Dovecot mailboxes -----------------------------------------------------------------

/// The Maildir of a Dovecot user (`<PCR_MAIL_ROOT>/<user>/Maildir`).
pub fn maildir(user: &str) -> PathBuf {
    PathBuf::from(env("PCR_MAIL_ROOT"))
        .join(user)
        .join("Maildir")
}

fn run_checked(cmd: &mut Command, input: Option<&[u8]>, what: &str) -> String {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if let Some(data) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(data)
            .unwrap_or_else(|e| panic!("{what}: writing stdin: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Delivers a raw RFC 5322 message into `user`'s INBOX through dovecot-lda (UIDs assigned
/// at once, as for mail from outside).
pub fn deliver_to_inbox(user: &str, raw: &[u8]) {
    deliver_to_folder(user, "INBOX", raw);
}

/// Delivers a raw message into `folder` of `user` (created when missing).
pub fn deliver_to_folder(user: &str, folder: &str, raw: &[u8]) {
    let mut cmd = Command::new(env("PCR_DOVECOT_LDA"));
    cmd.args(["-c", &env("PCR_DOVECOT_CONF"), "-e", "-d", user]);
    if folder != "INBOX" {
        cmd.args(["-m", folder]);
    }
    run_checked(
        &mut cmd,
        Some(raw),
        &format!("dovecot-lda delivery to {user}/{folder}"),
    );
}

/// Writes a raw message straight into `user`'s `Maildir/new` (no UID until Dovecot next
/// looks at the folder); returns the file's path. Fast for bulk fixtures.
pub fn maildir_drop(user: &str, raw: &[u8]) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = maildir(user);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!(
        "{}.M{}P{}Q{}.pcr-test",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = dir.join("tmp").join(&name);
    let new = dir.join("new").join(&name);
    std::fs::write(&tmp, raw).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    // Keep the owner Dovecot uses for this mailbox (we may be root, Dovecot is not).
    if let Ok(meta) = std::fs::metadata(&dir) {
        use std::os::unix::fs::MetadataExt;
        let _ = std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()));
    }
    std::fs::rename(&tmp, &new).unwrap_or_else(|e| panic!("moving to {}: {e}", new.display()));
    new
}

/// Runs `doveadm` against our Dovecot instance and returns its stdout; panics on failure.
/// E.g. `doveadm(&["fetch", "-u", user, "uid flags", "mailbox", "INBOX", "all"])`.
pub fn doveadm(args: &[&str]) -> String {
    let mut cmd = Command::new(env("PCR_DOVEADM"));
    cmd.args(["-c", &env("PCR_DOVECOT_CONF")]).args(args);
    run_checked(&mut cmd, None, &format!("doveadm {}", args.join(" ")))
}

/// A message in a Dovecot folder, as `doveadm fetch` reports it.
#[derive(Clone, Debug)]
pub struct StoredMail {
    pub uid: u32,
    /// Flags, e.g. `["\\Seen"]` (`\Recent` is left out).
    pub flags: Vec<String>,
    pub message_id: Option<String>,
}

/// The messages in `folder` of `user`, by UID. Panics when the folder does not exist.
pub fn mailbox_messages(user: &str, folder: &str) -> Vec<StoredMail> {
    let out = doveadm(&[
        "-f",
        "tab",
        "fetch",
        "-u",
        user,
        "uid flags hdr.message-id",
        "mailbox",
        folder,
        "all",
    ]);
    let mut mails: Vec<StoredMail> = out
        .lines()
        .skip(1) // the header row
        .filter_map(|line| {
            let mut cols = line.split('\t');
            let uid = cols.next()?.trim().parse().ok()?;
            let flags = cols
                .next()
                .unwrap_or("")
                .split_whitespace()
                .filter(|f| *f != "\\Recent")
                .map(str::to_string)
                .collect();
            let message_id = cols
                .next()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string);
            Some(StoredMail {
                uid,
                flags,
                message_id,
            })
        })
        .collect();
    mails.sort_by_key(|m| m.uid);
    mails
}

/// The folders of `user` (INBOX first as Dovecot lists them).
pub fn mailbox_folders(user: &str) -> Vec<String> {
    doveadm(&["mailbox", "list", "-u", user])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Empties `user`'s mailbox: every message expunged, every folder but INBOX deleted.
pub fn mailbox_reset(user: &str) {
    doveadm(&["expunge", "-u", user, "mailbox", "*", "all"]);
    for _ in 0..3 {
        let extra: Vec<String> = mailbox_folders(user)
            .into_iter()
            .filter(|f| f != "INBOX")
            .collect();
        if extra.is_empty() {
            return;
        }
        // Deleting a parent with -r also removes its children, which then "do not exist":
        // that error is expected, the re-listing decides.
        let _ = Command::new(env("PCR_DOVEADM"))
            .args([
                "-c",
                &env("PCR_DOVECOT_CONF"),
                "mailbox",
                "delete",
                "-u",
                user,
                "-r",
                "-s",
            ])
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let left: Vec<String> = mailbox_folders(user)
        .into_iter()
        .filter(|f| f != "INBOX")
        .collect();
    assert!(
        left.is_empty(),
        "could not delete folders of {user}: {left:?}"
    );
}

// ---- raw line protocol client (for smoke tests and protocol probes) --------------------

/// A plain-text line client (SMTP/IMAP/POP3 before TLS) with a read timeout.
pub struct LineConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineConn {
    /// Connects to `127.0.0.1:<port>` with a 5 s connect and read timeout.
    pub fn connect(port: u16) -> LineConn {
        let addr = (host().as_str(), port)
            .to_socket_addrs()
            .expect("resolve test host")
            .next()
            .expect("test host address");
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e} ({NOT_RUNNING}?)"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set timeout");
        LineConn {
            reader: BufReader::new(stream.try_clone().expect("clone stream")),
            writer: stream,
        }
    }

    /// Reads one line (without CRLF); panics on EOF or timeout.
    pub fn line(&mut self) -> String {
        let mut buf = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut buf)
            .unwrap_or_else(|e| panic!("reading a line: {e}"));
        assert!(n > 0, "connection closed by the server");
        String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string()
    }

    /// Sends `line` + CRLF.
    pub fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("sending {line:?}: {e}"));
    }

    /// Reads lines until one satisfies `last` and returns them all (that one included).
    pub fn until(&mut self, last: impl Fn(&str) -> bool) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line();
            let done = last(&l);
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    /// A multi-line SMTP reply (`250-...` ... `250 ...`).
    pub fn smtp_reply(&mut self) -> Vec<String> {
        self.until(|l| l.len() < 4 || l.as_bytes()[3] == b' ')
    }

    /// Sends an SMTP command and returns its (possibly multi-line) reply.
    pub fn smtp(&mut self, cmd: &str) -> Vec<String> {
        self.send(cmd);
        self.smtp_reply()
    }

    /// Waits up to `wait` for any byte; returns what arrived (empty: nothing was sent).
    pub fn bytes_within(&mut self, wait: Duration) -> Vec<u8> {
        self.writer.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 1024];
        let got = match self.reader.read(&mut buf) {
            Ok(n) => buf[..n].to_vec(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Vec::new()
            }
            Err(e) => panic!("reading: {e}"),
        };
        self.writer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        got
    }
}

// ---- extra delay proxies ---------------------------------------------------------------

/// A delay proxy started by a test; stopped (by its pid) when dropped.
pub struct DelayProxy {
    child: Child,
    pub port: u16,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tests/servers/delay_proxy.py` on `listen_port` (use a [`spare_port`]) forwarding
/// to `127.0.0.1:<target_port>` with `delay_ms` each way; returns once it accepts.
pub fn spawn_delay_proxy(listen_port: u16, target_port: u16, delay_ms: u32) -> DelayProxy {
    let script = Path::new(&env("PCR_TEST_SERVERS_DIR")).join("delay_proxy.py");
    let child = Command::new(env("PCR_TEST_PYTHON"))
        .arg(&script)
        .args(["--host", &host(), "--delay-ms", &delay_ms.to_string()])
        .arg(format!("{listen_port}:{}:{target_port}", host()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", script.display()));
    let mut proxy = DelayProxy {
        child,
        port: listen_port,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((host().as_str(), listen_port)).is_err() {
        if let Ok(Some(status)) = proxy.child.try_wait() {
            panic!("delay proxy on port {listen_port} exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "delay proxy on port {listen_port} not listening after 10s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy
}
