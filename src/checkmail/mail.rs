//! `$mail` (SPEC §5) and its attachment files: one private directory per message under the
//! run's directory, removed once the host has returned; the directories of runs that died
//! during a host call are removed by the next run.

use std::path::Path;

use super::php_thread::Run;
use crate::config::Account;
use crate::error::{Error, Result};
use crate::host::{Mail, MailAccount, MailAttachment};
use crate::mime::ParsedMail;
use crate::rules::AutoKind;
use crate::state::Owner;

/// `$mail` (SPEC §5) of `parsed`: the message, the account it came from, the virtual host,
/// the SD number the decision matched (or none), the attempt and the attachment files.
pub(super) fn mail<'a>(
    parsed: &'a ParsedMail,
    account: &'a Account,
    vhost: &'a str,
    sd_number: Option<&'a str>,
    auto: Option<AutoKind>,
    attempt: u32,
    attachments: Vec<MailAttachment<'a>>,
) -> Mail<'a> {
    let account = MailAccount {
        recid: &account.id,
        email: &account.email,
        tenants_recid: account.tenants_recid,
    };
    Mail {
        attachments,
        ..Mail::new(parsed, sd_number, auto, account, vhost, attempt)
    }
}

impl Run<'_> {
    /// Writes the attachments of `parsed` into a fresh directory of the run's (message `n`
    /// into the directory `n`) and lists them for `$mail`; nothing when it has none.
    pub(super) fn attachment_files<'p>(
        &mut self,
        parsed: &'p ParsedMail,
    ) -> Result<Vec<MailAttachment<'p>>> {
        if parsed.attachments.is_empty() {
            return Ok(Vec::new());
        }
        if self.attachment_messages == 0 {
            write_run_owner(&self.attachments_dir, &self.owner)?;
        }
        self.attachment_messages += 1;
        let dir = self
            .attachments_dir
            .join(self.attachment_messages.to_string());
        let mut written: Vec<MailAttachment<'p>> = Vec::new();
        if let Err(e) = write_attachments(&dir, &parsed.attachments, &mut written) {
            for done in &written {
                let _ = std::fs::remove_file(&done.path);
            }
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(written)
    }
}

/// Removes a message's attachment files and their directory once the host has returned.
pub(super) fn remove_attachments(mail: &Mail<'_>) {
    let mut dir = None;
    for entry in &mail.attachments {
        let _ = std::fs::remove_file(&entry.path);
        dir = Path::new(&entry.path).parent().map(Path::to_path_buf);
    }
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Writes a message's attachments into `dir` (created here; the names are unique within a
/// message), each listed in `written` with its `path` once written (the caller removes them
/// when this fails halfway).
pub(super) fn write_attachments<'p>(
    dir: &Path,
    attachments: &'p [crate::mime::Attachment],
    written: &mut Vec<MailAttachment<'p>>,
) -> Result<()> {
    create_private_dir(dir)?;
    for attachment in attachments {
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
        written.push(MailAttachment {
            filename: &attachment.filename,
            content_type: &attachment.content_type,
            size: attachment.size,
            content_id: attachment.content_id.as_deref(),
            inline: attachment.inline,
            path: path.display().to_string(),
        });
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
        // STATE_DIR belongs to this server: a directory of an earlier boot is a dead run.
        if me.sees_dead(&other, true) {
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
    use crate::config::AccountId;
    use serde_json::{json, Value};

    /// `$mail` as earlier versions built it: the parsed message serialised, then the bodies,
    /// the account, the host, the SD number, the attempt and the attachment paths patched in.
    fn patched_json(
        parsed: &ParsedMail,
        account: &Account,
        vhost: &str,
        item: Option<&str>,
        attempt: u32,
        paths: &[String],
    ) -> Value {
        let mut mail = serde_json::to_value(parsed).unwrap();
        mail["text"] = Value::String(parsed.text.clone());
        mail["html"] = parsed.html.clone().map_or(Value::Null, Value::String);
        mail["account"] = json!({
            "RECID": match account.id {
                AccountId::Master => Value::from("master"),
                AccountId::Tenant(id) => Value::from(id),
            },
            "EMAIL": account.email,
            "TENANTS_RECID": account.tenants_recid,
        });
        mail["host"] = Value::from(vhost);
        mail["sd_number"] = item.map(Value::from).unwrap_or(Value::Null);
        mail["auto"] =
            crate::rules::auto_kind(parsed).map_or(Value::Null, |a| Value::from(a.as_str()));
        mail["attempt"] = Value::from(attempt);
        for (entry, path) in mail["attachments"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .zip(paths)
        {
            entry["path"] = Value::from(path.clone());
        }
        mail
    }

    #[test]
    fn mail_has_the_keys_and_values_of_the_patched_parsed_message() {
        let dir = tempfile::tempdir().unwrap();
        let ini = dir.path().join("pcr360.ini");
        std::fs::write(
            &ini,
            format!(
                "[prod]\nemail.EMAIL = \"desk@example.edu\"\nemail.STATE_DIR = \"{}\"\n",
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        let settings = crate::config::Settings::load(&ini, "prod").unwrap();
        let keys = crate::config::secrets::KeyStore::from_key([7; 32]);
        let row = json!([{
            "RECID": 7, "TENANTS_RECID": 3, "ACCOUNT_TYPE": "service_desk",
            "EMAIL": "desk7@example.edu", "INCOMING_MAILBOX_TYPE": "MAILDIR",
            "INCOMING_PATH": dir.path().join("Maildir").display().to_string(),
        }]);
        let tenant = crate::config::tenant_rows(&row, &settings, Ok(&keys));
        assert!(tenant.errors.is_empty(), "{:?}", tenant.errors);
        let accounts = [settings.master.clone().unwrap(), tenant.accounts[0].clone()];

        let raw = "From: \"Ann\" <ann@example.org>\r\nTo: desk@example.edu, b@example.org\r\n\
                   Cc: c@example.org\r\nReply-To: r@example.org\r\nSubject: RE: IQ00012 \
                   printer\r\nDate: Tue, 1 Aug 2023 10:00:00 +0000\r\nMessage-ID: <m1@x>\r\n\
                   In-Reply-To: <m0@x>\r\nReferences: <a@x> <m0@x>\r\nReceived: one\r\n\
                   Received: two\r\nReturn-Path: <bounce@example.org>\r\n\
                   Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n\
                   Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\
                   Content-Type: multipart/alternative; boundary=\"c\"\r\n\r\n--c\r\n\
                   Content-Type: text/plain\r\n\r\nSee the files.\r\n--c\r\n\
                   Content-Type: text/html\r\n\r\n<p>See the files.</p>\r\n--c--\r\n--b\r\n\
                   Content-Type: application/octet-stream; name=\"f.bin\"\r\n\
                   Content-Disposition: attachment; filename=\"f.bin\"\r\n\
                   Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--b\r\n\
                   Content-Type: image/png\r\nContent-ID: <logo>\r\n\
                   Content-Transfer-Encoding: base64\r\n\r\niVBORw==\r\n--b--\r\n";
        let parsed = crate::mime::parse(raw.as_bytes());
        assert_eq!(parsed.attachments.len(), 2);
        let bare = crate::mime::parse(b"Subject: x\r\n\r\nHi\r\n");
        for (n, account) in accounts.iter().enumerate() {
            let files = dir.path().join(format!("files{n}"));
            let mut written = Vec::new();
            write_attachments(&files, &parsed.attachments, &mut written).unwrap();
            let paths: Vec<String> = written.iter().map(|a| a.path.clone()).collect();
            let typed = mail(
                &parsed,
                account,
                "pcr360.example.edu",
                Some("IQ00012"),
                crate::rules::auto_kind(&parsed),
                2,
                written,
            );
            assert_eq!(
                serde_json::to_value(&typed).unwrap(),
                patched_json(
                    &parsed,
                    account,
                    "pcr360.example.edu",
                    Some("IQ00012"),
                    2,
                    &paths
                )
            );
            let typed = mail(&bare, account, "h", None, None, 1, Vec::new());
            assert_eq!(
                serde_json::to_value(&typed).unwrap(),
                patched_json(&bare, account, "h", None, 1, &[])
            );
        }
    }

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
