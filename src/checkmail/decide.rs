//! The decision for one incoming mail (SPEC §6), a pure function of the parsed message and the
//! run's rules: no host, no ledger, no mailbox. PHP's thread carries it out (`php_thread.rs`).
//!
//! In order: our own mail (a sending address of ours) and blocked senders or subjects are
//! skipped without asking the host; an item is named by an SD number in the subject, else by a
//! reference to a Message-ID we sent for it (valid keyed hash); a named item goes to
//! `addToThread` first. When no item is named, or the host says it has no such item,
//! auto-replies and bounces are skipped and anything else becomes a new Inquiry.

use std::collections::HashSet;

use super::blocklist::Blocklist;
use regex::Regex;

use crate::mime::ParsedMail;
use crate::rules::{self, AutoKind};
use crate::threading;

/// What the decision reads besides the message.
pub(super) struct Rules<'a> {
    /// Our sending addresses, lower case (SYSADMIN is a person: not among them).
    pub own_addresses: &'a HashSet<String>,
    pub blocklist: &'a Blocklist,
    /// The key of the keyed hash in our Message-IDs; `None` when it cannot be read (replies
    /// are then matched by the subject's SD number only).
    pub thread_key: Option<&'a [u8; 32]>,
    /// The SD number pattern (`SD_NUMBER_PATTERN`).
    pub sd_pattern: &'a Regex,
}

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Skipped without asking the host (the reason is the summary's skip reason).
    Skip(&'static str),
    /// Handed to the host: to `addToThread(item)` first when an item is named; when none is,
    /// or the host has no such item, `otherwise`.
    Hand {
        item: Option<String>,
        otherwise: Otherwise,
        /// The auto-reply classification `$mail` reports (`auto`).
        auto: Option<AutoKind>,
    },
}

/// What becomes of a message handed over that no thread took.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Otherwise {
    /// `createInquiry`.
    Inquiry,
    /// An auto-reply or a bounce: skipped (the reason is the summary's skip reason).
    Skip(&'static str),
}

/// The decision for `mail` (see the module docs).
pub(super) fn decide(mail: &ParsedMail, rules: &Rules<'_>) -> Plan {
    let from = sender_address(mail);
    if !from.is_empty() && rules.own_addresses.contains(&from) {
        return Plan::Skip("own mail");
    }
    if rules.blocklist.blocks(&from, &mail.subject) {
        return Plan::Skip("blocked");
    }
    let item = rules::sd_number_in(&mail.subject, rules.sd_pattern).or_else(|| {
        let key = rules.thread_key?;
        let ids = mail
            .in_reply_to
            .iter()
            .chain(mail.references.iter())
            .map(String::as_str);
        threading::verify_any(ids, key)
    });
    let auto = rules::auto_kind(mail);
    let otherwise = match auto {
        Some(AutoKind::AutoReply) => Otherwise::Skip("auto-reply"),
        Some(AutoKind::Bounce) => Otherwise::Skip("bounce"),
        None => Otherwise::Inquiry,
    };
    Plan::Hand {
        item,
        otherwise,
        auto,
    }
}

/// The sender's address as the rules compare it: trimmed, lower case; empty when unknown.
fn sender_address(mail: &ParsedMail) -> String {
    mail.from
        .as_ref()
        .map(|f| f.email.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn parse(headers: &str) -> ParsedMail {
        crate::mime::parse(format!("{headers}\r\n\r\nHello.\r\n").as_bytes())
    }

    fn decide_with(headers: &str, blocked: &[&str], key: Option<&[u8; 32]>) -> Plan {
        let own: HashSet<String> = ["desk@example.edu".to_string()].into();
        let patterns: Vec<String> = blocked.iter().map(|p| p.to_string()).collect();
        let (blocklist, errors) = Blocklist::new(&patterns);
        assert!(errors.is_empty(), "{errors:?}");
        let rules = Rules {
            own_addresses: &own,
            blocklist: &blocklist,
            thread_key: key,
            sd_pattern: &Regex::new(crate::config::DEFAULT_SD_NUMBER_PATTERN).unwrap(),
        };
        decide(&parse(headers), &rules)
    }

    fn hand(item: Option<&str>, otherwise: Otherwise) -> Plan {
        // The classification that leads to each outcome (none for an Inquiry).
        let auto = match otherwise {
            Otherwise::Skip("auto-reply") => Some(AutoKind::AutoReply),
            Otherwise::Skip("bounce") => Some(AutoKind::Bounce),
            _ => None,
        };
        Plan::Hand {
            item: item.map(str::to_string),
            otherwise,
            auto,
        }
    }

    #[test]
    fn a_new_request_becomes_an_inquiry() {
        assert_eq!(
            decide_with("From: user@example.org\r\nSubject: Help", &[], Some(&KEY)),
            hand(None, Otherwise::Inquiry)
        );
    }

    #[test]
    fn our_own_mail_is_skipped_before_anything_else() {
        for from in ["desk@example.edu", "Desk <DESK@Example.EDU>"] {
            let headers = format!("From: {from}\r\nSubject: RE: IQ00012");
            assert_eq!(
                decide_with(&headers, &["*@example.edu"], Some(&KEY)),
                Plan::Skip("own mail"),
                "{from}"
            );
        }
    }

    #[test]
    fn a_blocked_sender_or_subject_is_skipped_even_when_it_names_an_item() {
        assert_eq!(
            decide_with(
                "From: x@spam.example\r\nSubject: RE: IQ00012",
                &["*@spam.example"],
                Some(&KEY)
            ),
            Plan::Skip("blocked")
        );
        assert_eq!(
            decide_with(
                "From: a@example.org\r\nSubject: [SPAM] buy",
                &["/^\\[spam\\]/i"],
                None
            ),
            Plan::Skip("blocked")
        );
    }

    #[test]
    fn an_sd_number_in_the_subject_names_the_item() {
        assert_eq!(
            decide_with(
                "From: a@example.org\r\nSubject: RE: [IQ00012] Phone",
                &[],
                None
            ),
            hand(Some("IQ00012"), Otherwise::Inquiry)
        );
    }

    #[test]
    fn a_reply_to_our_message_id_names_its_item_only_with_a_valid_keyed_hash() {
        let ours = threading::message_id(Some("SO201700043"), &KEY, "example.edu").unwrap();
        let headers = format!("From: a@example.org\r\nSubject: Thanks\r\nIn-Reply-To: {ours}");
        assert_eq!(
            decide_with(&headers, &[], Some(&KEY)),
            hand(Some("SO201700043"), Otherwise::Inquiry)
        );
        // In References, after a foreign id.
        let headers =
            format!("From: a@example.org\r\nSubject: Thanks\r\nReferences: <x@elsewhere> {ours}");
        assert_eq!(
            decide_with(&headers, &[], Some(&KEY)),
            hand(Some("SO201700043"), Otherwise::Inquiry)
        );
        // Another key (forged, or from another installation), or no key: a new Inquiry.
        assert_eq!(
            decide_with(&headers, &[], Some(&[8; 32])),
            hand(None, Otherwise::Inquiry)
        );
        assert_eq!(
            decide_with(&headers, &[], None),
            hand(None, Otherwise::Inquiry)
        );
        // The subject's number comes first.
        let headers = format!("From: a@example.org\r\nSubject: RE: IQ00012\r\nIn-Reply-To: {ours}");
        assert_eq!(
            decide_with(&headers, &[], Some(&KEY)),
            hand(Some("IQ00012"), Otherwise::Inquiry)
        );
    }

    #[test]
    fn auto_replies_and_bounces_reach_only_the_thread_they_name() {
        let ooo = "From: a@example.org\r\nAuto-Submitted: auto-replied\r\nSubject: Out of office";
        assert_eq!(
            decide_with(ooo, &[], Some(&KEY)),
            hand(None, Otherwise::Skip("auto-reply"))
        );
        let ooo_item = format!("{ooo} RE: IQ00012");
        assert_eq!(
            decide_with(&ooo_item, &[], Some(&KEY)),
            hand(Some("IQ00012"), Otherwise::Skip("auto-reply"))
        );
        let bounce = "From: MAILER-DAEMON@example.org\r\nSubject: Undelivered Mail Returned to \
                      Sender\r\nContent-Type: multipart/report; report-type=delivery-status; \
                      boundary=b";
        assert_eq!(
            decide_with(bounce, &[], Some(&KEY)),
            hand(None, Otherwise::Skip("bounce"))
        );
    }
}
