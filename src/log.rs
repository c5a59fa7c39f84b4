//! The error log: every failure goes once to the host's `logError()` (PCR-360's Error Log; with
//! no host, PHP's own error log) and, when `email.LOG_FILE` is set, as one line to that file.
//! Every entry starts with one `pcr_email: `, whether or not the caller wrote it. Callers pass
//! only secret-free text: messages are built from account ids, addresses, servers and codes,
//! never from credentials.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

use crate::host::Host;

/// Keys of the notices this process has logged (see [`Logger::once_per_process`]).
static PROCESS_ONCE: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

#[derive(Debug, Default)]
pub struct Logger {
    file: Option<PathBuf>,
    /// Keys of the notices this logger has written (see [`Logger::once`]).
    once: HashSet<String>,
}

impl Logger {
    pub fn new(file: Option<PathBuf>) -> Self {
        Logger {
            file,
            once: HashSet::new(),
        }
    }

    /// Logs an error to the host and the log file.
    pub fn error(&mut self, host: &mut dyn Host, message: &str, context: &Value) {
        let text = without_prefix(message);
        host.log_error(&format!("{PREFIX}{text}"), context);
        self.to_file("error", text, context);
    }

    /// Logs a notice once per key for this logger (one manager object), to the host and the
    /// file.
    pub fn once(&mut self, host: &mut dyn Host, key: &str, message: &str, context: &Value) {
        if self.once.insert(key.to_string()) {
            self.error(host, message, context);
        }
    }

    /// Logs a notice once per process and key, whichever manager object logs it (e.g. a
    /// broken INI master account, found again by every `new PCR_Utility_EmailManager()` of a
    /// long-lived PHP worker).
    pub fn once_per_process(
        &mut self,
        host: &mut dyn Host,
        key: &str,
        message: &str,
        context: &Value,
    ) {
        let first = PROCESS_ONCE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        if first {
            self.error(host, message, context);
        }
    }

    /// Writes one line to LOG_FILE (when set). A log file that cannot be written never makes
    /// the operation fail: the host's Error Log still has the entry.
    pub fn to_file(&self, level: &str, message: &str, context: &Value) {
        let Some(path) = &self.file else {
            return;
        };
        let line = format!(
            "{} [{level}] {PREFIX}{}\n",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"),
            entry(without_prefix(message), context),
        );
        // Created like the state files (crate::perms): the directory's group, 0660, so that
        // cron's user and the web server's user both append to it.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = crate::perms::create_dir_all(dir, crate::perms::DIR_MODE);
        }
        if let Ok((mut f, _)) = crate::perms::open_or_create(path, crate::perms::FILE_MODE, true) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

const PREFIX: &str = "pcr_email: ";

/// The message without the `pcr_email: ` its caller may have put in front: the logger adds it.
fn without_prefix(message: &str) -> &str {
    message.strip_prefix(PREFIX).unwrap_or(message)
}

/// One log entry as one line: the message, then its context as JSON when there is any.
pub(crate) fn entry(message: &str, context: &Value) -> String {
    match context {
        Value::Null => one_line(message),
        Value::Object(m) if m.is_empty() => one_line(message),
        other => format!("{} {other}", one_line(message)),
    }
}

/// Log lines stay single lines: a hostile header value cannot forge a second entry.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::NoHost;

    #[test]
    fn writes_single_lines_with_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/email.log");
        let mut log = Logger::new(Some(path.clone()));
        log.error(
            &mut NoHost,
            "refused\r\nFAKE ENTRY",
            &serde_json::json!({"account": "master"}),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("] pcr_email: refused  FAKE ENTRY"));
        assert!(text.contains(r#"{"account":"master"}"#));
        // Shared by cron's user and the web server's user (crate::perms).
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&path) & 0o7777, 0o660);
        assert_eq!(mode(&dir.path().join("logs")) & 0o7777, 0o2770);
        log.error(&mut NoHost, "second", &Value::Null);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "appended: {text}");
    }

    /// Records what reaches the host's Error Log.
    #[derive(Default)]
    struct Recorder(Vec<String>);
    impl Host for Recorder {
        fn email_accounts(&mut self) -> crate::Result<Value> {
            Ok(Value::Array(Vec::new()))
        }
        fn blocked_emails(&mut self) -> crate::Result<Vec<String>> {
            Ok(Vec::new())
        }
        fn create_inquiry(&mut self, _mail: &crate::host::Mail<'_>) -> crate::Result<String> {
            Ok(String::new())
        }
        fn add_to_thread(
            &mut self,
            _sd: &str,
            _mail: &crate::host::Mail<'_>,
        ) -> crate::Result<bool> {
            Ok(false)
        }
        fn deliver_message(&mut self, _message: &Value) -> crate::Result<()> {
            Ok(())
        }
        fn log_error(&mut self, message: &str, _context: &Value) {
            self.0.push(message.to_string());
        }
    }

    #[test]
    fn every_entry_has_one_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("email.log");
        let mut log = Logger::new(Some(path.clone()));
        let mut host = Recorder::default();
        log.error(&mut host, "pcr_email: with the prefix", &Value::Null);
        log.error(&mut host, "without it", &Value::Null);
        assert_eq!(
            host.0,
            ["pcr_email: with the prefix", "pcr_email: without it"]
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("pcr_email:").count(), 2, "{text}");
    }

    #[test]
    fn once_logs_a_key_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("email.log");
        let mut log = Logger::new(Some(path.clone()));
        for _ in 0..3 {
            log.once(
                &mut NoHost,
                "clear:master:PASSWORD",
                "stored in clear",
                &Value::Null,
            );
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn once_per_process_spans_logger_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("email.log");
        let key = format!("test-once-per-process:{}", path.display());
        for _ in 0..3 {
            let mut log = Logger::new(Some(path.clone()));
            log.once_per_process(&mut NoHost, &key, "broken master", &Value::Null);
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }
}
