//! SENDMAIL transport: runs `SENDMAIL_PATH -i -f <from> -- <recipients...>` with the message
//! on stdin (LF line endings, as local mailers expect), under the account's timeout.
//!
//! A child that does not finish in time is killed. A non-zero exit is a transport error with
//! the exit status and the end of its stderr; exit 75 (EX_TEMPFAIL) and timeouts are
//! transient, as is any 4xx SMTP code the mailer reports (msmtp: "server message: 451 ...").

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{BuiltMessage, CheckReport, Delivery, DeliveryStatus, Transport};
use crate::config::{Account, TransportType};
use crate::error::{Error, Result};

/// How much of the mailer's stderr an error message keeps (its end).
const MAX_STDERR_IN_ERROR: usize = 600;
/// How much stderr/stdout is collected at most.
const MAX_CAPTURE: usize = 64 * 1024;
const EX_TEMPFAIL: i32 = 75;

/// Hands messages to a local sendmail-compatible binary.
#[derive(Debug, Clone)]
pub struct SendmailTransport {
    account: String,
    path: PathBuf,
    timeout: Duration,
}

impl SendmailTransport {
    pub fn new(account: &Account) -> SendmailTransport {
        SendmailTransport {
            account: account.id.to_string(),
            path: account.sendmail_path.clone(),
            timeout: account.timeout,
        }
    }

    /// A transport running `path`, killing it after `timeout`, reporting for `account`.
    pub fn with_path(account: &str, path: impl Into<PathBuf>, timeout: Duration) -> Self {
        SendmailTransport {
            account: account.to_string(),
            path: path.into(),
            timeout,
        }
    }

    fn fail(&self, code: Option<u16>, transient: bool, message: impl Into<String>) -> Error {
        Error::transport(
            &self.account,
            &self.path.display().to_string(),
            code,
            transient,
            message,
        )
    }

    fn timeout(&self) -> Duration {
        if self.timeout.is_zero() {
            crate::net::FALLBACK_TIMEOUT
        } else {
            self.timeout
        }
    }
}

impl Transport for SendmailTransport {
    fn send(&self, msg: &BuiltMessage) -> Result<Delivery> {
        for rcpt in msg
            .recipients
            .iter()
            .chain(std::iter::once(&msg.envelope_from))
        {
            if rcpt.starts_with('-') || rcpt.chars().any(|c| c.is_control()) {
                return Err(Error::message(format!(
                    "{rcpt:?} cannot be passed to sendmail"
                )));
            }
        }
        let mut child = Command::new(&self.path)
            .arg("-i")
            .arg("-f")
            .arg(&msg.envelope_from)
            .arg("--")
            .args(&msg.recipients)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => "not found".to_string(),
                    std::io::ErrorKind::PermissionDenied => "not executable".to_string(),
                    _ => e.to_string(),
                };
                self.fail(
                    None,
                    false,
                    format!(
                        "cannot run the sendmail binary {} (SENDMAIL_PATH): {why}",
                        self.path.display()
                    ),
                )
            })?;

        let stdin = child.stdin.take().expect("stdin is piped");
        let data = to_lf(&msg.raw);
        let writer = thread::spawn(move || {
            block_sigpipe_in_this_thread();
            let mut stdin = stdin;
            let result = stdin.write_all(&data);
            drop(stdin);
            result
        });
        let stderr = capture(child.stderr.take().expect("stderr is piped"));
        let stdout = capture(child.stdout.take().expect("stdout is piped"));

        let status = match wait_with_timeout(&mut child, self.timeout()) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.fail(
                    None,
                    true,
                    format!(
                        "sendmail did not finish within {} s and was stopped; the message may \
                         not have been sent",
                        self.timeout().as_secs_f32()
                    ),
                ));
            }
        };
        let write_result = writer.join().unwrap_or(Ok(()));
        let grace = Duration::from_millis(500);
        let stderr = stderr.recv_timeout(grace).unwrap_or_default();
        let stdout = stdout.recv_timeout(grace).unwrap_or_default();

        if status.success() {
            if let Err(e) = write_result {
                return Err(self.fail(
                    None,
                    true,
                    format!("sendmail exited before reading the whole message: {e}"),
                ));
            }
            return Ok(Delivery {
                status: DeliveryStatus::Sent,
                path: None,
                server: self.path.display().to_string(),
                from: None,
            });
        }
        let output = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        let smtp_code = reported_smtp_code(&output);
        let exit = describe_status(&status);
        let transient = match smtp_code {
            Some(code) => (400..500).contains(&code),
            None => status.code() == Some(EX_TEMPFAIL) || status.code().is_none(),
        };
        let detail = tail(&output);
        let message = if detail.is_empty() {
            format!("sendmail {exit}")
        } else {
            format!("sendmail {exit}: {detail}")
        };
        Err(self.fail(smtp_code, transient, message))
    }

    fn check(&self) -> Result<CheckReport> {
        let server = self.path.display().to_string();
        let fail = |why: String| {
            Error::transport(
                &self.account,
                &server,
                None,
                false,
                format!("SENDMAIL_PATH {server}: {why}"),
            )
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| {
            fail(match e.kind() {
                std::io::ErrorKind::NotFound => "no such file".to_string(),
                _ => e.to_string(),
            })
        })?;
        if !meta.is_file() {
            return Err(fail("not a regular file".to_string()));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(fail("not executable".to_string()));
        }
        Ok(CheckReport {
            transport: "SENDMAIL",
            server: server.clone(),
            steps: vec![format!("{server} exists and is executable")],
        })
    }

    fn describe(&self) -> String {
        format!("SENDMAIL {}", self.path.display())
    }

    fn kind(&self) -> TransportType {
        TransportType::Sendmail
    }
}

/// Writing to a pipe whose reader exited raises SIGPIPE, which would kill the whole PHP
/// process if the host has not ignored it. Blocking it in the writing thread turns it into an
/// `EPIPE` error (the pending signal dies with the thread).
fn block_sigpipe_in_this_thread() {
    // SAFETY: plain libc calls on a local, zero-initialised signal set; only this thread's mask
    // changes.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Reads a pipe to its end (bounded) on a thread; the text arrives on the channel.
fn capture(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_CAPTURE.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
    });
    rx
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "failed".to_string(),
    }
}

/// An SMTP reply code the mailer quotes from the server, e.g. msmtp's
/// `smtp server message: 550 5.1.1 ...`.
fn reported_smtp_code(output: &str) -> Option<u16> {
    let re = regex::Regex::new(r"(?i)server message:\s*([45]\d\d)[\s-]").ok()?;
    re.captures(output)?.get(1)?.as_str().parse().ok()
}

/// The end of the mailer's output on one line, bounded, without control characters.
fn tail(output: &str) -> String {
    let one_line: String = output
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if one_line.len() <= MAX_STDERR_IN_ERROR {
        return one_line;
    }
    let mut start = one_line.len() - MAX_STDERR_IN_ERROR;
    while !one_line.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &one_line[start..])
}

/// CRLF to LF: local mailers take Unix line endings and add CRs themselves.
fn to_lf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\r' && raw.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn msg() -> BuiltMessage {
        BuiltMessage {
            raw: b"Subject: t\r\n\r\nline one\r\n.dot line\r\n".to_vec(),
            envelope_from: "from@x.example".into(),
            recipients: vec!["a@x.example".into(), "b@x.example".into()],
            message_id: "<1@x.example>".into(),
            from: "from@x.example".into(),
            subject: "t".into(),
        }
    }

    fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn passes_arguments_and_lf_message() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let bin = script(
            tmp.path(),
            "sm",
            &format!(
                "printf '%s\\n' \"$@\" > {0}.args; cat > {0}.msg",
                out.display()
            ),
        );
        let t = SendmailTransport::with_path("master", &bin, Duration::from_secs(10));
        let d = t.send(&msg()).unwrap();
        assert_eq!(d.status, DeliveryStatus::Sent);
        let args = fs::read_to_string(tmp.path().join("out.args")).unwrap();
        assert_eq!(
            args,
            "-i\n-f\nfrom@x.example\n--\na@x.example\nb@x.example\n"
        );
        let body = fs::read(tmp.path().join("out.msg")).unwrap();
        assert_eq!(body, b"Subject: t\n\nline one\n.dot line\n");
    }

    #[test]
    fn failure_carries_exit_status_and_stderr() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = script(
            tmp.path(),
            "sm",
            "cat >/dev/null; echo 'msmtp: recipient address a@x.example not accepted by the server' >&2; \
             echo 'msmtp: server message: 550 5.1.1 <a@x.example>: Recipient address rejected' >&2; exit 65",
        );
        let t = SendmailTransport::with_path("9", &bin, Duration::from_secs(10));
        let err = t.send(&msg()).unwrap_err();
        let Error::Transport(f) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(f.account, "9");
        assert_eq!(f.code, Some(550));
        assert!(!f.transient);
        assert!(f.message.contains("exited with status 65"), "{}", f.message);
        assert!(
            f.message.contains("Recipient address rejected"),
            "{}",
            f.message
        );

        let bin = script(
            tmp.path(),
            "tf",
            "cat >/dev/null; echo 'try later' >&2; exit 75",
        );
        let t = SendmailTransport::with_path("9", &bin, Duration::from_secs(10));
        let Error::Transport(f) = t.send(&msg()).unwrap_err() else {
            panic!()
        };
        assert!(f.transient && f.code.is_none(), "{f:?}");
    }

    #[test]
    fn a_hanging_mailer_is_killed_at_the_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = script(tmp.path(), "sm", "exec sleep 30");
        let t = SendmailTransport::with_path("master", &bin, Duration::from_millis(500));
        let started = Instant::now();
        let err = t.send(&msg()).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let Error::Transport(f) = &err else {
            panic!("{err:?}")
        };
        assert!(f.transient);
        assert!(f.message.contains("did not finish within"), "{}", f.message);
    }

    #[test]
    fn missing_or_unexecutable_binary_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("no-sendmail");
        let t = SendmailTransport::with_path("master", &missing, Duration::from_secs(5));
        let err = t.send(&msg()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no-sendmail") && text.contains("not found"),
            "{text}"
        );
        assert!(text.contains("SENDMAIL_PATH"), "{text}");
        assert!(t.check().is_err());

        let plain = tmp.path().join("plain");
        fs::write(&plain, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
        let t = SendmailTransport::with_path("master", &plain, Duration::from_secs(5));
        assert!(t
            .check()
            .unwrap_err()
            .to_string()
            .contains("not executable"));
        assert!(t
            .send(&msg())
            .unwrap_err()
            .to_string()
            .contains("not executable"));

        let ok = script(tmp.path(), "ok", "cat >/dev/null");
        let t = SendmailTransport::with_path("master", &ok, Duration::from_secs(5));
        assert_eq!(t.check().unwrap().transport, "SENDMAIL");
    }

    #[test]
    fn long_stderr_is_bounded() {
        let long = "x".repeat(5000);
        let t = tail(&format!("first\n{long}\nlast line"));
        assert!(t.len() <= MAX_STDERR_IN_ERROR + 3);
        assert!(t.ends_with("last line"));
    }
}
