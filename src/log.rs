//! The error log: every failure goes once to the host's `logError()` (PCR-360's Error Log) and,
//! when `email.LOG_FILE` is set, as one line to that file. Callers pass only secret-free text:
//! messages are built from account ids, addresses, servers and codes, never from credentials.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

use crate::host::Host;

#[derive(Debug, Default)]
pub struct Logger {
    file: Option<PathBuf>,
    /// Keys of notices already written by this process (e.g. "stored in clear").
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
        host.log_error(message, context);
        self.to_file("error", message, context);
    }

    /// Logs a notice once per process and key (to the host and the file).
    pub fn once(&mut self, host: &mut dyn Host, key: &str, message: &str, context: &Value) {
        if self.once.insert(key.to_string()) {
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
            "{} [{level}] pcr_email: {}{}\n",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"),
            one_line(message),
            match context {
                Value::Null => String::new(),
                Value::Object(m) if m.is_empty() => String::new(),
                other => format!(" {other}"),
            }
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
        assert!(text.contains("refused  FAKE ENTRY"));
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
}
