//! Who sends and who receives (SPEC §4). Pure functions over already-loaded accounts.
//!
//! | kind           | account used, first that can send                  |
//! |----------------|----------------------------------------------------|
//! | `general`      | tenant Default → INI master                        |
//! | `service_desk` | tenant Service Desk → tenant Default → INI master  |
//! | `sd_thread`    | tenant Service Desk only                           |
//!
//! `DISABLE_EMAIL` wins over everything (nothing sent, received or redirected); then
//! `SEND_EMAIL = false` redirects every message to in-app Messages. An account only counts for
//! sending when it has outgoing settings.

use std::collections::HashMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::config::{Account, AccountType, FailedAccount, Incoming, MailboxType};
use crate::error::{Error, Result};

/// What a message is, which decides the accounts it may go out through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MailKind {
    /// Everything but Service Desk mail (the default).
    #[default]
    General,
    /// Service Desk notifications.
    ServiceDesk,
    /// Replies on a Service Desk item's thread: only the tenant's Service Desk account.
    SdThread,
}

impl MailKind {
    pub const ALL: [MailKind; 3] = [MailKind::General, MailKind::ServiceDesk, MailKind::SdThread];

    /// `general`, `service_desk` or `sd_thread` (any case); anything else is an
    /// [`Error::Message`].
    pub fn parse(value: &str) -> Result<MailKind> {
        match value.trim().to_ascii_lowercase().as_str() {
            "general" => Ok(MailKind::General),
            "service_desk" => Ok(MailKind::ServiceDesk),
            "sd_thread" => Ok(MailKind::SdThread),
            _ => Err(Error::message(format!(
                "unknown mail kind `{}` (expected general, service_desk or sd_thread)",
                value.chars().take(40).collect::<String>().escape_default()
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MailKind::General => "general",
            MailKind::ServiceDesk => "service_desk",
            MailKind::SdThread => "sd_thread",
        }
    }
}

impl fmt::Display for MailKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An account as routing sees it (a tenant's, or the INI master): usable, or failed (its row
/// or its `email.*` keys are broken; see [`FailedAccount`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantAccount<'a> {
    Usable(&'a Account),
    Failed(&'a FailedAccount),
}

/// What happens to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// Send it through this account.
    Send(&'a Account),
    /// The account that would send it is broken (a tenant's row, or the INI master's
    /// `email.*` keys): the message fails with that account's error, and is never sent
    /// through another account (SPEC §3).
    Failed(&'a FailedAccount),
    /// `SEND_EMAIL` is false: hand it to the host's in-app Messages (status `redirected`).
    Redirect,
    /// `DISABLE_EMAIL` is true: drop it (status `disabled`).
    Disabled,
    /// No account can send it (status `skipped`); the reason is for the log.
    Skipped(&'static str),
}

/// The route of one message of `kind` for a tenant whose Default and Service Desk accounts are
/// given (see [`select_tenant_accounts`]). The first candidate that can send decides: a usable
/// account with outgoing settings sends it; a failed account that would send
/// ([`FailedAccount::sends`]) fails it.
pub fn route<'a>(
    kind: MailKind,
    tenant_default: Option<TenantAccount<'a>>,
    tenant_sd: Option<TenantAccount<'a>>,
    master: Option<TenantAccount<'a>>,
    send_email: bool,
    disable_email: bool,
) -> Route<'a> {
    if disable_email {
        return Route::Disabled;
    }
    if !send_email {
        return Route::Redirect;
    }
    let candidates: &[Option<TenantAccount<'a>>] = match kind {
        MailKind::General => &[tenant_default, master],
        MailKind::ServiceDesk => &[tenant_sd, tenant_default, master],
        MailKind::SdThread => &[tenant_sd],
    };
    for candidate in candidates.iter().flatten() {
        match *candidate {
            TenantAccount::Usable(account) if account.outgoing.is_some() => {
                return Route::Send(account)
            }
            TenantAccount::Failed(failed) if failed.sends => return Route::Failed(failed),
            _ => {}
        }
    }
    Route::Skipped(match kind {
        MailKind::General => {
            "no account can send it: neither the tenant's Default account nor the INI \
             master account has outgoing settings"
        }
        MailKind::ServiceDesk => {
            "no account can send it: none of the tenant's Service Desk account, its \
             Default account and the INI master account has outgoing settings"
        }
        MailKind::SdThread => {
            "SD thread mail is only sent through the tenant's Service Desk account, and \
             the tenant has none with outgoing settings"
        }
    })
}

/// The tenant's Default and Service Desk accounts, in that order. When a tenant has several of
/// one type, the first usable one that has outgoing settings is taken, else the first failed
/// one that would send, else the first usable one, else the first failed one (a broken row
/// never takes the place of a working account of the same tenant and type, and never lets
/// its mail fall through to another account).
pub fn select_tenant_accounts<'a>(
    accounts: &'a [Account],
    failed: &'a [FailedAccount],
    tenant: i64,
) -> (Option<TenantAccount<'a>>, Option<TenantAccount<'a>>) {
    let pick = |kind: AccountType| {
        let mut usable = accounts
            .iter()
            .filter(|a| a.account_type == kind && a.tenants_recid == tenant);
        let mut broken = failed
            .iter()
            .filter(|f| f.account_type == kind && f.tenants_recid == tenant);
        let first_usable = usable.clone().next();
        let first_broken = broken.clone().next();
        usable
            .find(|a| a.outgoing.is_some())
            .map(TenantAccount::Usable)
            .or_else(|| broken.find(|f| f.sends).map(TenantAccount::Failed))
            .or(first_usable.map(TenantAccount::Usable))
            .or(first_broken.map(TenantAccount::Failed))
    };
    (pick(AccountType::Default), pick(AccountType::ServiceDesk))
}

/// The mailboxes `eventCheckMail` reads: every tenant Service Desk account with incoming
/// settings, then the INI master if it has incoming settings; none when email is disabled or
/// `SEND_EMAIL` is false. Default accounts never receive. An account whose mailbox is the same
/// as one already listed (see [`same_mailbox`]) is left out, so one mailbox is never read
/// twice into two sets of Inquiries; the tenant's account wins over the master.
pub fn incoming_accounts<'a>(
    accounts: &'a [Account],
    master: Option<&'a Account>,
    send_email: bool,
    disable_email: bool,
) -> Vec<&'a Account> {
    incoming_accounts_checked(accounts, master, send_email, disable_email).0
}

/// [`incoming_accounts`], and the accounts left out because their mailbox is one already
/// listed: `(left out, the listed account that reads it)`, for the summary.
pub fn incoming_accounts_checked<'a>(
    accounts: &'a [Account],
    master: Option<&'a Account>,
    send_email: bool,
    disable_email: bool,
) -> (Vec<&'a Account>, Vec<(&'a Account, &'a Account)>) {
    if disable_email || !send_email {
        return (Vec::new(), Vec::new());
    }
    let mut chosen: Vec<&'a Account> = Vec::new();
    let mut duplicates = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let tenants = accounts
        .iter()
        .filter(|a| a.account_type == AccountType::ServiceDesk);
    for account in tenants.chain(master) {
        let Some(identity) = mailbox_identity(account) else {
            continue;
        };
        match seen.get(&identity) {
            Some(&first) => duplicates.push((account, chosen[first])),
            None => {
                seen.insert(identity, chosen.len());
                chosen.push(account);
            }
        }
    }
    (chosen, duplicates)
}

/// One mailbox `eventCheckMail` handles (see [`incoming_readers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader<'a> {
    /// Read it with this account.
    Read(&'a Account),
    /// A Service Desk account whose row is broken: its mailbox is not read (by it or by any
    /// other account); the run reports [`FailedAccount::error`] for it.
    Failed(&'a FailedAccount),
}

/// [`incoming_accounts`] with the broken Service Desk rows in their place: every usable
/// Service Desk account with incoming settings, every failed Service Desk account that would
/// receive ([`FailedAccount::receives`]), then the INI master if it has incoming settings —
/// unless its mailbox is one already listed, a failed account's included (or may be: a failed
/// row whose mailbox settings cannot be read either names the same server and login), so mail
/// for a tenant whose account is broken is never read through the master's account. Empty when
/// email is disabled or `SEND_EMAIL` is false.
pub fn incoming_readers<'a>(
    accounts: &'a [Account],
    failed: &'a [FailedAccount],
    master: Option<&'a Account>,
    send_email: bool,
    disable_email: bool,
) -> Vec<Reader<'a>> {
    incoming_readers_checked(accounts, failed, master, send_email, disable_email).0
}

/// [`incoming_readers`], and the accounts left out because another account listed reads the
/// same mailbox: `(left out, the account that reads it)`, for the summary.
pub fn incoming_readers_checked<'a>(
    accounts: &'a [Account],
    failed: &'a [FailedAccount],
    master: Option<&'a Account>,
    send_email: bool,
    disable_email: bool,
) -> (Vec<Reader<'a>>, Vec<(&'a Account, &'a Account)>) {
    let (tenants, mut duplicates) =
        incoming_accounts_checked(accounts, None, send_email, disable_email);
    let mut readers: Vec<Reader<'a>> = tenants.into_iter().map(Reader::Read).collect();
    if disable_email || !send_email {
        return (readers, duplicates);
    }
    let broken: Vec<&'a FailedAccount> = failed
        .iter()
        .filter(|f| f.account_type == AccountType::ServiceDesk && f.receives)
        .collect();
    readers.extend(broken.iter().map(|f| Reader::Failed(f)));
    if let Some(master) = master.filter(|m| m.incoming.is_some()) {
        let reader = readers.iter().find_map(|r| match r {
            Reader::Read(a) if same_mailbox(a, master) => Some(*a),
            _ => None,
        });
        let failed_there = readers
            .iter()
            .any(|r| matches!(r, Reader::Failed(f) if failed_may_share(f, master)));
        match reader {
            Some(tenant) => duplicates.push((master, tenant)),
            None if failed_there => {}
            None => readers.push(Reader::Read(master)),
        }
    }
    (readers, duplicates)
}

/// Whether the failed account `failed` reads (or, when its mailbox settings could not be
/// read, may read) the mailbox of `other`.
fn failed_may_share(failed: &FailedAccount, other: &Account) -> bool {
    let Some(theirs) = &other.incoming else {
        return false;
    };
    match &failed.mailbox {
        Some((incoming, login)) => same_box(incoming, login, theirs, other.login_name()),
        // Only what is certain is compared: the address. Another server or login with the
        // same address is taken to be the same mailbox rather than risk reading it.
        None => failed.email.eq_ignore_ascii_case(other.email.trim()),
    }
}

/// True when both accounts read the same mailbox (see [`mailbox_identity`]).
pub fn same_mailbox(a: &Account, b: &Account) -> bool {
    match (mailbox_identity(a), mailbox_identity(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// What an account's incoming mailbox is, however it is written: the type plus, for
/// MAILDIR/MBOX, the real path of the directory or file (symlinks, `..` and relative spellings
/// resolved); for IMAP/POP3 the server (any case), port, login (any case) and folder (IMAP,
/// `INBOX` in any case); for the cloud types the mailbox (login, any case) and folder.
/// `None` for an account without incoming settings.
pub fn mailbox_identity(account: &Account) -> Option<String> {
    let incoming = account.incoming.as_ref()?;
    Some(identity_of(incoming, account.login_name()))
}

/// [`mailbox_identity`] of incoming settings read with `login`.
fn identity_of(incoming: &Incoming, login: &str) -> String {
    let folder = if incoming.folder.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_string()
    } else {
        incoming.folder.clone()
    };
    let lower = |s: &str| s.trim().to_ascii_lowercase();
    let rest = match incoming.mailbox {
        MailboxType::Maildir | MailboxType::Mbox => incoming
            .path
            .as_deref()
            .map(|p| resolved_path(p).display().to_string())
            .unwrap_or_default(),
        MailboxType::Imap => format!(
            "{}|{}|{}|{folder}",
            lower(incoming.host.as_deref().unwrap_or("")),
            incoming.port,
            lower(login)
        ),
        MailboxType::Pop3 => format!(
            "{}|{}|{}",
            lower(incoming.host.as_deref().unwrap_or("")),
            incoming.port,
            lower(login)
        ),
        MailboxType::Office365 | MailboxType::Gmail => format!("{}|{folder}", lower(login)),
    };
    format!("{}|{rest}", incoming.mailbox.as_str())
}

/// [`same_mailbox`] over the incoming settings and login names.
fn same_box(ia: &Incoming, login_a: &str, ib: &Incoming, login_b: &str) -> bool {
    ia.mailbox == ib.mailbox && identity_of(ia, login_a) == identity_of(ib, login_b)
}

/// The real path (symlinks resolved) when it exists; else the path with `.` and `..` taken
/// out lexically.
fn resolved_path(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(part);
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn account(id: AccountId, kind: AccountType, tenant: i64, outgoing: bool) -> Account {
        Account {
            id,
            tenants_recid: tenant,
            account_type: kind,
            email: "a@example.edu".into(),
            display_name: None,
            login: None,
            password: None,
            outgoing: outgoing.then_some(Outgoing {
                transport: TransportType::File,
                host: None,
                port: 0,
                ssl: SslMode::None,
            }),
            incoming: None,
            sysadmin: None,
            tls: TlsSettings::default(),
            file_path: PathBuf::from("/tmp"),
            sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
            timeout: Duration::from_secs(30),
            auth_type: Default::default(),
            oauth: None,
        }
    }

    fn with_incoming(mut a: Account, host: &str, login: &str) -> Account {
        a.login = Some(login.into());
        a.incoming = Some(Incoming {
            mailbox: MailboxType::Imap,
            host: Some(host.into()),
            port: 993,
            ssl: SslMode::Ssl,
            folder: "INBOX".into(),
            path: None,
            processed_action: ProcessedAction::Seen,
            max_messages: 500,
            max_message_bytes: 1 << 20,
        });
        a
    }

    /// The expectation table, written out by hand from SPEC §4 (not computed): for each state
    /// of (tenant Default, tenant Service Desk, master) — `-` absent, `n` present without
    /// outgoing settings, `y` present with them — the account `general`, `service_desk` and
    /// `sd_thread` mail goes out through (`x` = skipped).
    const TABLE: &str = "
        - - - | x x x
        - - n | x x x
        - - y | M M x
        - n - | x x x
        - n n | x x x
        - n y | M M x
        - y - | x S S
        - y n | x S S
        - y y | M S S
        n - - | x x x
        n - n | x x x
        n - y | M M x
        n n - | x x x
        n n n | x x x
        n n y | M M x
        n y - | x S S
        n y n | x S S
        n y y | M S S
        y - - | D D x
        y - n | D D x
        y - y | D D x
        y n - | D D x
        y n n | D D x
        y n y | D D x
        y y - | D S S
        y y n | D S S
        y y y | D S S
    ";

    fn make(state: &str, id: AccountId, kind: AccountType) -> Option<Account> {
        match state {
            "-" => None,
            "n" => Some(account(id, kind, 5, false)),
            "y" => Some(account(id, kind, 5, true)),
            other => panic!("bad table state {other}"),
        }
    }

    #[test]
    fn every_combination_matches_the_table() {
        let mut checked = 0;
        for row in TABLE.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (states, expected) = row.split_once('|').unwrap();
            let states: Vec<&str> = states.split_whitespace().collect();
            let expected: Vec<&str> = expected.split_whitespace().collect();
            let d = make(states[0], AccountId::Tenant(1), AccountType::Default);
            let s = make(states[1], AccountId::Tenant(2), AccountType::ServiceDesk);
            let m = make(states[2], AccountId::Master, AccountType::Master);
            for (kind, want) in MailKind::ALL.iter().zip(&expected) {
                for send_email in [true, false] {
                    for disable_email in [true, false] {
                        let got = route(
                            *kind,
                            d.as_ref().map(TenantAccount::Usable),
                            s.as_ref().map(TenantAccount::Usable),
                            m.as_ref().map(TenantAccount::Usable),
                            send_email,
                            disable_email,
                        );
                        let ctx =
                            format!("{row} kind={kind} send={send_email} disable={disable_email}");
                        match (disable_email, send_email, *want) {
                            (true, _, _) => assert_eq!(got, Route::Disabled, "{ctx}"),
                            (false, false, _) => assert_eq!(got, Route::Redirect, "{ctx}"),
                            (false, true, "x") => {
                                assert!(matches!(got, Route::Skipped(_)), "{ctx}: {got:?}")
                            }
                            (false, true, who) => {
                                let expected = match who {
                                    "D" => d.as_ref(),
                                    "S" => s.as_ref(),
                                    "M" => m.as_ref(),
                                    other => panic!("bad table entry {other}"),
                                }
                                .unwrap();
                                match got {
                                    Route::Send(a) => {
                                        assert!(std::ptr::eq(a, expected), "{ctx}: {:?}", a.id)
                                    }
                                    other => panic!("{ctx}: {other:?}"),
                                }
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 27 * 3 * 4);
    }

    #[test]
    fn skip_reasons_say_why() {
        let Route::Skipped(reason) = route(MailKind::SdThread, None, None, None, true, false)
        else {
            panic!()
        };
        assert!(reason.contains("Service Desk"), "{reason}");
    }

    #[test]
    fn kind_parse() {
        assert_eq!(MailKind::parse("general").unwrap(), MailKind::General);
        assert_eq!(
            MailKind::parse(" Service_Desk ").unwrap(),
            MailKind::ServiceDesk
        );
        assert_eq!(MailKind::parse("sd_thread").unwrap(), MailKind::SdThread);
        for bad in ["", "sd", "service desk", "x\r\ny"] {
            let e = MailKind::parse(bad).unwrap_err();
            assert!(matches!(e, Error::Message(_)), "{bad}");
            assert!(!e.to_string().contains('\n'));
        }
        for kind in MailKind::ALL {
            assert_eq!(MailKind::parse(kind.as_str()).unwrap(), kind);
        }
    }

    #[test]
    fn selects_the_tenants_accounts() {
        let accounts = vec![
            account(AccountId::Tenant(1), AccountType::Default, 1, true),
            account(AccountId::Tenant(2), AccountType::ServiceDesk, 1, true),
            account(AccountId::Tenant(3), AccountType::Default, 2, false),
            account(AccountId::Tenant(4), AccountType::Default, 2, true),
            account(AccountId::Tenant(5), AccountType::ServiceDesk, 3, false),
        ];
        let id = |t: Option<TenantAccount>| match t {
            Some(TenantAccount::Usable(a)) => Some(a.id.clone()),
            Some(TenantAccount::Failed(f)) => panic!("failed {:?}", f.id),
            None => None,
        };
        let ids = |(d, s)| (id(d), id(s));
        assert_eq!(
            ids(select_tenant_accounts(&accounts, &[], 1)),
            (Some(AccountId::Tenant(1)), Some(AccountId::Tenant(2)))
        );
        // Two Defaults: the one that can send.
        assert_eq!(
            ids(select_tenant_accounts(&accounts, &[], 2)),
            (Some(AccountId::Tenant(4)), None)
        );
        // Only one that cannot send: still returned (route() then skips it).
        assert_eq!(
            ids(select_tenant_accounts(&accounts, &[], 3)),
            (None, Some(AccountId::Tenant(5)))
        );
        assert_eq!(ids(select_tenant_accounts(&accounts, &[], 9)), (None, None));
    }

    #[test]
    fn incoming_reads_sd_accounts_and_master_only() {
        let master = with_incoming(
            account(AccountId::Master, AccountType::Master, 0, true),
            "mail.pcr.com",
            "master@pcr.com",
        );
        let accounts = vec![
            // A Default account never receives, even if incoming settings slipped through.
            with_incoming(
                account(AccountId::Tenant(1), AccountType::Default, 1, true),
                "imap.t1",
                "d@t1",
            ),
            with_incoming(
                account(AccountId::Tenant(2), AccountType::ServiceDesk, 1, true),
                "imap.t1",
                "sd@t1",
            ),
            account(AccountId::Tenant(3), AccountType::ServiceDesk, 2, true),
            with_incoming(
                account(AccountId::Tenant(4), AccountType::ServiceDesk, 3, false),
                "imap.t3",
                "sd@t3",
            ),
        ];
        let ids = |list: Vec<&Account>| list.into_iter().map(|a| a.id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(incoming_accounts(&accounts, Some(&master), true, false)),
            vec![
                AccountId::Tenant(2),
                AccountId::Tenant(4),
                AccountId::Master
            ]
        );
        assert!(incoming_accounts(&accounts, Some(&master), false, false).is_empty());
        assert!(incoming_accounts(&accounts, Some(&master), true, true).is_empty());
        assert!(incoming_accounts(&accounts, Some(&master), false, true).is_empty());
        let no_incoming_master = account(AccountId::Master, AccountType::Master, 0, true);
        assert_eq!(
            ids(incoming_accounts(
                &accounts,
                Some(&no_incoming_master),
                true,
                false
            )),
            vec![AccountId::Tenant(2), AccountId::Tenant(4)]
        );
    }

    #[test]
    fn one_mailbox_is_read_once() {
        let master = with_incoming(
            account(AccountId::Master, AccountType::Master, 0, true),
            "Mail.PCR.com",
            "SD@pcr.com",
        );
        let sd = with_incoming(
            account(AccountId::Tenant(7), AccountType::ServiceDesk, 0, true),
            "mail.pcr.com",
            "sd@pcr.com",
        );
        let accounts = vec![sd];
        let got = incoming_accounts(&accounts, Some(&master), true, false);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, AccountId::Tenant(7));
        assert!(same_mailbox(&accounts[0], &master));
        let mut other_folder = master.clone();
        other_folder.incoming.as_mut().unwrap().folder = "Support".into();
        assert!(!same_mailbox(&accounts[0], &other_folder));
    }

    #[test]
    fn an_mbox_is_its_real_path_whatever_the_spelling() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mail")).unwrap();
        std::fs::write(dir.path().join("mail/desk"), b"").unwrap();
        std::os::unix::fs::symlink(dir.path().join("mail/desk"), dir.path().join("link")).unwrap();
        let reading = |id: AccountId, mailbox: MailboxType, path: PathBuf| {
            let mut a = with_incoming(
                account(id, AccountType::ServiceDesk, 0, true),
                "",
                "sd@pcr.com",
            );
            let incoming = a.incoming.as_mut().unwrap();
            incoming.mailbox = mailbox;
            incoming.path = Some(path);
            a
        };
        let direct = reading(
            AccountId::Master,
            MailboxType::Mbox,
            dir.path().join("mail/desk"),
        );
        let dotted = reading(
            AccountId::Tenant(1),
            MailboxType::Mbox,
            dir.path().join("mail/../mail/./desk"),
        );
        let linked = reading(
            AccountId::Tenant(2),
            MailboxType::Mbox,
            dir.path().join("link"),
        );
        let as_maildir = reading(
            AccountId::Tenant(3),
            MailboxType::Maildir,
            dir.path().join("mail/desk"),
        );
        assert!(same_mailbox(&direct, &dotted));
        assert!(same_mailbox(&direct, &linked));
        assert!(!same_mailbox(&direct, &as_maildir));
    }

    fn failed(recid: i64, kind: AccountType, tenant: i64, sends: bool) -> FailedAccount {
        FailedAccount {
            id: AccountId::Tenant(recid),
            tenants_recid: tenant,
            account_type: kind,
            sends,
            receives: false,
            email: "broken@t.example".into(),
            mailbox: None,
            error: Error::account_key(&recid.to_string(), "PASSWORD", "cannot be decrypted"),
        }
    }

    #[test]
    fn a_broken_tenant_account_fails_its_mail_instead_of_passing_it_on() {
        let master = account(AccountId::Master, AccountType::Master, 0, true);
        let broken_default = failed(10, AccountType::Default, 5, true);
        let broken_sd = failed(11, AccountType::ServiceDesk, 5, true);
        let sd = account(AccountId::Tenant(12), AccountType::ServiceDesk, 5, true);
        let failed_route = |r: Route| match r {
            Route::Failed(f) => f.id.clone(),
            other => panic!("{other:?}"),
        };
        // general: the broken Default, never the master.
        let r = route(
            MailKind::General,
            Some(TenantAccount::Failed(&broken_default)),
            None,
            Some(TenantAccount::Usable(&master)),
            true,
            false,
        );
        assert_eq!(failed_route(r), AccountId::Tenant(10));
        // service_desk without an SD account: the broken Default fails it too.
        let r = route(
            MailKind::ServiceDesk,
            Some(TenantAccount::Failed(&broken_default)),
            None,
            Some(TenantAccount::Usable(&master)),
            true,
            false,
        );
        assert_eq!(failed_route(r), AccountId::Tenant(10));
        // A working SD account still sends service_desk mail.
        let r = route(
            MailKind::ServiceDesk,
            Some(TenantAccount::Failed(&broken_default)),
            Some(TenantAccount::Usable(&sd)),
            Some(TenantAccount::Usable(&master)),
            true,
            false,
        );
        assert!(matches!(r, Route::Send(a) if a.id == AccountId::Tenant(12)));
        // A broken SD account fails sd_thread and service_desk mail.
        for kind in [MailKind::SdThread, MailKind::ServiceDesk] {
            let r = route(
                kind,
                None,
                Some(TenantAccount::Failed(&broken_sd)),
                Some(TenantAccount::Usable(&master)),
                true,
                false,
            );
            assert_eq!(failed_route(r), AccountId::Tenant(11), "{kind}");
        }
        // A broken row that would not send anyway changes nothing.
        let quiet = failed(13, AccountType::Default, 5, false);
        let r = route(
            MailKind::General,
            Some(TenantAccount::Failed(&quiet)),
            None,
            Some(TenantAccount::Usable(&master)),
            true,
            false,
        );
        assert!(matches!(r, Route::Send(a) if a.id == AccountId::Master));
        // The switches still win.
        let r = route(
            MailKind::General,
            Some(TenantAccount::Failed(&broken_default)),
            None,
            Some(TenantAccount::Usable(&master)),
            false,
            false,
        );
        assert_eq!(r, Route::Redirect);
    }

    #[test]
    fn a_broken_master_fails_its_own_mail_only() {
        let mut master = failed(0, AccountType::Master, 0, true);
        master.id = AccountId::Master;
        let default = account(AccountId::Tenant(20), AccountType::Default, 5, true);
        let sd = account(AccountId::Tenant(21), AccountType::ServiceDesk, 5, true);
        let broken = Some(TenantAccount::Failed(&master));
        // The tenant's own accounts send as usual.
        let r = route(
            MailKind::General,
            Some(TenantAccount::Usable(&default)),
            None,
            broken,
            true,
            false,
        );
        assert!(matches!(r, Route::Send(a) if a.id == AccountId::Tenant(20)));
        let r = route(
            MailKind::SdThread,
            None,
            Some(TenantAccount::Usable(&sd)),
            broken,
            true,
            false,
        );
        assert!(matches!(r, Route::Send(a) if a.id == AccountId::Tenant(21)));
        // Mail that would go out as the master fails with its error (not skipped, not sent
        // another way).
        for kind in [MailKind::General, MailKind::ServiceDesk] {
            let r = route(kind, None, None, broken, true, false);
            assert!(
                matches!(r, Route::Failed(f) if f.id == AccountId::Master),
                "{kind}"
            );
        }
        // A broken master that would not send changes nothing.
        master.sends = false;
        let r = route(
            MailKind::General,
            None,
            None,
            Some(TenantAccount::Failed(&master)),
            true,
            false,
        );
        assert!(matches!(r, Route::Skipped(_)));
    }

    #[test]
    fn selection_prefers_a_working_account_then_a_broken_one() {
        let accounts = vec![
            account(AccountId::Tenant(1), AccountType::Default, 1, true),
            account(AccountId::Tenant(3), AccountType::Default, 2, false),
        ];
        let broken = vec![
            failed(2, AccountType::Default, 1, true),
            failed(4, AccountType::Default, 2, true),
            failed(5, AccountType::ServiceDesk, 3, false),
        ];
        let id = |t: Option<TenantAccount>| match t {
            Some(TenantAccount::Usable(a)) => format!("ok {}", a.id),
            Some(TenantAccount::Failed(f)) => format!("failed {}", f.id),
            None => "none".into(),
        };
        let (d, s) = select_tenant_accounts(&accounts, &broken, 1);
        assert_eq!((id(d), id(s)), ("ok 1".into(), "none".into()));
        // The working Default cannot send; the broken one would: it decides.
        let (d, _) = select_tenant_accounts(&accounts, &broken, 2);
        assert_eq!(id(d), "failed 4");
        let (d, s) = select_tenant_accounts(&accounts, &broken, 3);
        assert_eq!((id(d), id(s)), ("none".into(), "failed 5".into()));
    }

    #[test]
    fn a_broken_sd_account_keeps_the_master_out_of_its_mailbox() {
        let master = with_incoming(
            account(AccountId::Master, AccountType::Master, 0, true),
            "mail.pcr.com",
            "sd@pcr.com",
        );
        let shared = master.incoming.clone().unwrap();
        let mut broken = failed(7, AccountType::ServiceDesk, 3, true);
        broken.receives = true;
        broken.mailbox = Some((shared.clone(), "SD@pcr.com".into()));
        let readers = incoming_readers(
            &[],
            std::slice::from_ref(&broken),
            Some(&master),
            true,
            false,
        );
        assert_eq!(readers, vec![Reader::Failed(&broken)]);

        // Another mailbox: the master reads its own.
        let mut elsewhere = broken.clone();
        let mut other = shared.clone();
        other.host = Some("imap.tenant3".into());
        elsewhere.mailbox = Some((other, "sd@tenant3".into()));
        let readers = incoming_readers(
            &[],
            std::slice::from_ref(&elsewhere),
            Some(&master),
            true,
            false,
        );
        assert_eq!(
            readers,
            vec![Reader::Failed(&elsewhere), Reader::Read(&master)]
        );

        // Mailbox settings unreadable: the address decides.
        let mut unknown = broken.clone();
        unknown.mailbox = None;
        unknown.email = "master@pcr.com".into();
        let mut master_named = master.clone();
        master_named.email = "Master@pcr.com".into();
        let readers = incoming_readers(
            &[],
            std::slice::from_ref(&unknown),
            Some(&master_named),
            true,
            false,
        );
        assert_eq!(readers, vec![Reader::Failed(&unknown)]);

        // A broken Default row or one without incoming settings is no reader.
        let mut default_row = broken.clone();
        default_row.account_type = AccountType::Default;
        let mut no_incoming = broken.clone();
        no_incoming.receives = false;
        let both = [default_row, no_incoming];
        let readers = incoming_readers(&[], &both, Some(&master), true, false);
        assert_eq!(readers, vec![Reader::Read(&master)]);
        assert!(incoming_readers(&[], &both, Some(&master), false, false).is_empty());
    }
}
