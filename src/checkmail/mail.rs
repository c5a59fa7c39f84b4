//! `$mail` (SPEC §5) and its attachment files: one private directory per message under the
//! run's directory, removed once the host has returned; the directories of runs that died
//! during a host call are removed by the next run.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::php_thread::Run;
use crate::config::{Account, AccountId};
use crate::error::{Error, Result};
use crate::mime::ParsedMail;
use crate::state::Owner;

impl Run<'_> {
    /// `$mail` (SPEC §5): the parsed message plus the account, the host and the attachment
    /// files.
    pub(super) fn mail_array(
        &mut self,
        account: &Account,
        parsed: &mut ParsedMail,
        item: Option<&str>,
        attempt: u32,
    ) -> Result<Value> {
        // The bodies are most of the bytes: moved into `$mail`, not serialised as copies.
        let text = std::mem::take(&mut parsed.text);
        let html = parsed.html.take();
        let mut mail = serde_json::to_value(&*parsed)
            .map_err(|e| Error::message(format!("cannot represent the message: {e}")))?;
        mail["text"] = Value::String(text);
        mail["html"] = html.map_or(Value::Null, Value::String);
        mail["account"] = json!({
            "RECID": match account.id {
                AccountId::Master => Value::from("master"),
                AccountId::Tenant(id) => Value::from(id),
            },
            "EMAIL": account.email,
            "TENANTS_RECID": account.tenants_recid,
        });
        mail["host"] = Value::from(self.vhost.clone());
        mail["sd_number"] = item.map(Value::from).unwrap_or(Value::Null);
        mail["attempt"] = Value::from(attempt);
        if !parsed.attachments.is_empty() {
            if self.attachment_messages == 0 {
                write_run_owner(&self.attachments_dir, &self.owner)?;
            }
            self.attachment_messages += 1;
            let dir = self
                .attachments_dir
                .join(self.attachment_messages.to_string());
            let list = mail["attachments"]
                .as_array_mut()
                .expect("attachments is a list");
            let mut written: Vec<PathBuf> = Vec::new();
            if let Err(e) = write_attachments(&dir, list, &parsed.attachments, &mut written) {
                for done in &written {
                    let _ = std::fs::remove_file(done);
                }
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        }
        Ok(mail)
    }

    /// Removes a message's attachment files and their directory once the host has returned.
    pub(super) fn remove_attachments(&self, mail: &Value) {
        let mut dir = None;
        if let Some(list) = mail["attachments"].as_array() {
            for entry in list {
                if let Some(path) = entry["path"].as_str() {
                    let _ = std::fs::remove_file(path);
                    dir = Path::new(path).parent().map(Path::to_path_buf);
                }
            }
        }
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Writes a message's attachments into `dir` (created here; the names are unique within a
/// message) and sets each one's `path`; `written` lists the files written so far (the caller
/// removes them when this fails halfway).
pub(super) fn write_attachments(
    dir: &Path,
    list: &mut [Value],
    attachments: &[crate::mime::Attachment],
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    create_private_dir(dir)?;
    for (entry, attachment) in list.iter_mut().zip(attachments) {
        let path = dir.join(&attachment.filename);
        crate::perms::write_file(&path, &attachment.data, crate::perms::FILE_MODE).map_err(
            |e| {
                Error::message(format!(
                    "cannot write attachment {} to {}: {e}",
                    attachment.filename,
                    dir.display()
                ))
            },
        )?;
        entry["path"] = Value::from(path.display().to_string());
        written.push(path);
    }
    Ok(())
}

/// The file in a run's attachment directory naming its owner (see [`remove_dead_runs_attachments`]).
pub(super) const RUN_OWNER_FILE: &str = "owner";

/// Creates the run's attachment directory with the file naming its owner.
pub(super) fn write_run_owner(dir: &Path, owner: &Owner) -> Result<()> {
    create_private_dir(dir)?;
    let text = [
        owner.run_id().to_string(),
        owner.host().to_string(),
        owner.machine_id().to_string(),
        owner.boot_id().to_string(),
        owner.pid_ns().to_string(),
        owner.pid().to_string(),
        owner.start_ticks().to_string(),
    ]
    .join("\n");
    crate::perms::write_file(
        &dir.join(RUN_OWNER_FILE),
        text.as_bytes(),
        crate::perms::FILE_MODE,
    )
    .map_err(|e| Error::message(format!("cannot write into {}: {e}", dir.display())))
}

/// Removes the attachment files of runs that died during a host call (kill -9): nobody else
/// would. Runs still alive, of another machine, or of unknown owner are left alone.
pub(super) fn remove_dead_runs_attachments(root: &Path, me: &Owner) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(text) = std::fs::read_to_string(dir.join(RUN_OWNER_FILE)) else {
            continue;
        };
        let f: Vec<&str> = text.lines().collect();
        let (Some(pid), Some(ticks)) = (
            f.get(5).and_then(|v| v.parse().ok()),
            f.get(6).and_then(|v| v.parse().ok()),
        ) else {
            continue;
        };
        let other = Owner::from_parts(f[0], f[1], f[2], f[3], f[4], pid, ticks);
        if me.sees_dead(&other) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Creates an attachment directory: its parent's group, group read/write and setgid (so a run
/// as the web server's user can remove what a dead run as root left, and the other way round),
/// nothing for others.
pub(super) fn create_private_dir(dir: &Path) -> Result<()> {
    crate::perms::create_dir_all(dir, crate::perms::DIR_MODE)
        .map_err(|e| Error::message(format!("cannot create {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_attachment_directories_of_dead_runs_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let me = Owner::new_run();
        let pid = std::process::id();
        let live = me.sibling(
            "live-run",
            pid,
            crate::state::process_start_ticks(pid).unwrap(),
        );
        // A pid that no longer exists (or was recycled: another start time).
        let gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        let mut gone = gone;
        gone.wait().unwrap();
        let dead = me.sibling("dead-run", gone_pid, 1);
        let remote = Owner::from_parts("far-run", "elsewhere", "m2", "b2", "ns2", gone_pid, 1);
        for (name, owner) in [("live", &live), ("dead", &dead), ("remote", &remote)] {
            let dir = root.path().join(name);
            write_run_owner(&dir, owner).unwrap();
            std::fs::write(dir.join("report.pdf"), b"customer data").unwrap();
        }
        std::fs::create_dir_all(root.path().join("unknown")).unwrap();
        remove_dead_runs_attachments(root.path(), &me);
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["live", "remote", "unknown"]);
    }
}
