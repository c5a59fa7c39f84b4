//! What a run reports beyond the summary: mailboxes that cannot be read and messages too
//! large to download, in the Error Log and, once per problem across runs and processes, to
//! SYSADMIN by email.

use serde_json::{json, Value};

use super::php_thread::Run;
use super::summary::MailboxSummary;
use crate::config::Account;
use crate::error::Error;
use crate::incoming::Listed;

impl Run<'_> {
    /// A message over MAX_MESSAGE_BYTES: not downloaded, and not recorded as done either, so it
    /// is counted in every run's summary while it waits and becomes an ordinary message once the
    /// limit allows it. Logged and alerted once (per mailbox and message).
    pub(super) fn oversized(&mut self, account: &Account, scope: &str, listed: &Listed) {
        let id = account.id.to_string();
        let once = format!("oversized:{scope}:{}", listed.id);
        match self.state.alert_once(&format!("log:{once}")) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.log(&format!("pcr_email: {e}"), json!({"account": id}));
                return;
            }
        }
        let limit = account
            .incoming
            .as_ref()
            .map(|i| i.max_message_bytes)
            .unwrap_or(0);
        let text = format!(
            "pcr_email: a message of {} bytes in the mailbox of account {id} ({}) is larger than \
             MAX_MESSAGE_BYTES ({limit}); it is not downloaded and stays in the mailbox, counted \
             as skipped (oversized) in every run until MAX_MESSAGE_BYTES allows it",
            listed.size, account.email
        );
        self.log(
            &text,
            json!({"account": id, "message": listed.id, "size": listed.size}),
        );
        self.alert(
            account,
            &once,
            "An incoming email is too large to process",
            &text,
        );
    }

    pub(super) fn mailbox_failed(
        &mut self,
        account: &Account,
        summary: &mut MailboxSummary,
        error: Error,
    ) {
        let id = account.id.to_string();
        let text = format!(
            "pcr_email: mailbox of account {id} ({}): {error}",
            account.email
        );
        summary.errors.push(error.to_string());
        self.log(&text, json!({"account": id}));
        if matches!(error, Error::Auth { .. }) {
            self.alert(
                account,
                &auth_alert_key(account),
                "An email account cannot sign in",
                &text,
            );
        }
    }

    /// Emails SYSADMIN (the account's, else the INI's) once per `key` across runs and
    /// processes, through the ordinary routing of that account's tenant.
    pub(super) fn alert(&mut self, account: &Account, key: &str, subject: &str, text: &str) {
        let Some(to) = account
            .sysadmin
            .clone()
            .or_else(|| self.settings.sysadmin.clone())
            .filter(|s| !s.trim().is_empty())
        else {
            return;
        };
        match self.state.alert_once(key) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                self.log(&format!("pcr_email: {e}"), Value::Null);
                return;
            }
        }
        let message = json!({
            "to": to,
            "subject": format!("[PCR-360] {subject}"),
            "text": format!(
                "{text}\n\nHost: {}\nEnvironment: {}\n\nThis alert is sent once per problem.",
                self.vhost, self.settings.environment
            ),
            "tenant": account.tenants_recid,
            "headers": {"Auto-Submitted": "auto-generated"},
        });
        if let Err(e) = self.services.send(self.host, &message) {
            // Not marked as told: the next run tries again.
            let _ = self.state.clear_alert(key);
            let line = format!("pcr_email: the SYSADMIN alert to {to} could not be sent: {e}");
            self.services.logger().to_file("error", &line, &Value::Null);
        }
    }
}

/// The alert-once key of an account's login failure; cleared by its next successful read.
pub(super) fn auth_alert_key(account: &Account) -> String {
    format!("auth:{}", account.id)
}
