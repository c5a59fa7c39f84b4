//! The MAILDIR mailbox on temporary Maildirs: what is listed (and what never is), exact
//! reads, files vanishing or moving under us, each action with its flags, quarantine, and
//! the errors for a missing or broken Maildir.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, ProcessedAction, SslMode, TlsSettings,
};
use pcr_email::incoming::maildir::MaildirMailbox;
use pcr_email::incoming::{self, Fetched, Flow, Listed, Mailbox};
use pcr_email::state::StateStore;
use pcr_email::Error;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state_dir: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("Maildir");
        for sub in ["new", "cur", "tmp"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let state_dir = dir.path().join("state");
        Fixture {
            _dir: dir,
            root,
            state_dir,
        }
    }

    fn state(&self) -> StateStore {
        StateStore::open(&self.state_dir, None).unwrap()
    }

    fn account(&self, action: ProcessedAction) -> Account {
        Account {
            id: AccountId::Master,
            tenants_recid: 0,
            account_type: AccountType::Master,
            email: "helpdesk@example.edu".into(),
            display_name: None,
            login: None,
            password: None,
            outgoing: None,
            incoming: Some(Incoming {
                mailbox: MailboxType::Maildir,
                host: None,
                port: 0,
                ssl: SslMode::None,
                folder: "INBOX".into(),
                path: Some(self.root.clone()),
                processed_action: action,
                max_messages: 500,
                max_message_bytes: 50 * 1024 * 1024,
            }),
            sysadmin: None,
            tls: TlsSettings::default(),
            file_path: PathBuf::from("/nonexistent"),
            sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
            timeout: Duration::from_secs(5),
            auth_type: Default::default(),
            oauth: None,
        }
    }

    fn open(&self, action: ProcessedAction) -> MaildirMailbox {
        MaildirMailbox::open(&self.account(action), self.state()).unwrap()
    }

    /// Delivers `raw` as `<sub>/<name>` with the given age (older first in listings).
    fn put(&self, sub: &str, name: &str, raw: &[u8], age_secs: u64) -> PathBuf {
        let path = self.root.join(sub).join(name);
        fs::write(&path, raw).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_secs);
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
        path
    }

    fn names(&self, sub: &str) -> Vec<String> {
        names_in(&self.root.join(sub))
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn msg(n: u32) -> Vec<u8> {
    format!(
        "From: a@example.edu\r\nSubject: message {n}\r\nMessage-ID: <m{n}@example.edu>\r\n\r\n\
         Gr\u{fc}\u{df}e {n}\r\n"
    )
    .into_bytes()
}

fn ids(listed: &[Listed]) -> Vec<String> {
    listed.iter().map(|l| l.id.clone()).collect()
}

fn fetch_all(mailbox: &mut dyn Mailbox, ids: &[String]) -> Vec<Fetched> {
    let mut got = Vec::new();
    mailbox
        .fetch_each(ids, &mut |m| {
            got.push(m);
            Flow::Continue
        })
        .unwrap();
    got
}

#[test]
fn lists_new_and_cur_oldest_first_and_never_tmp_or_dotfiles() {
    let f = Fixture::new();
    f.put("new", "1700000003.M3P1.host", &msg(3), 10);
    f.put("cur", "1700000001.M1P1.host:2,S", &msg(1), 30);
    f.put("new", "1700000002.M2P1.host", &msg(2), 20);
    f.put("tmp", "1700000004.M4P1.host", b"half-writ", 5);
    f.put("new", ".hidden", b"x", 1);
    fs::create_dir(f.root.join("cur").join("subdir")).unwrap();

    let mut mailbox = f.open(ProcessedAction::Seen);
    let listed = mailbox.list().unwrap();
    assert_eq!(
        ids(&listed),
        vec![
            "1700000001.M1P1.host",
            "1700000002.M2P1.host",
            "1700000003.M3P1.host"
        ]
    );
    assert_eq!(listed[0].size, msg(1).len() as u64);
    assert_eq!(mailbox.count().unwrap(), 3);
    let got = fetch_all(&mut mailbox, &ids(&listed));
    let raws: Vec<Vec<u8>> = got.iter().map(|m| m.raw.clone()).collect();
    assert_eq!(raws, vec![msg(1), msg(2), msg(3)]);
}

#[test]
fn seen_moves_to_cur_adds_s_keeps_flags_and_is_not_listed_again() {
    let f = Fixture::new();
    f.put("new", "100.A.host", &msg(1), 30);
    f.put("cur", "200.B.host:2,RT", &msg(2), 20);
    // Read in another client before the check: still new for us.
    f.put("cur", "300.C.host:2,S", &msg(3), 10);
    let mut mailbox = f.open(ProcessedAction::Seen);
    let listed = ids(&mailbox.list().unwrap());
    assert_eq!(listed.len(), 3);
    mailbox.mark_processed(&listed).unwrap();
    Box::new(mailbox).finish().unwrap();
    assert_eq!(f.names("new"), Vec::<String>::new());
    assert_eq!(
        f.names("cur"),
        vec!["100.A.host:2,S", "200.B.host:2,RST", "300.C.host:2,S"]
    );
    assert_eq!(
        fs::read(f.root.join("cur/200.B.host:2,RST")).unwrap(),
        msg(2)
    );

    let mut again = f.open(ProcessedAction::Seen);
    assert_eq!(again.list().unwrap(), vec![]);
    f.put("new", "400.D.host", &msg(4), 0);
    assert_eq!(ids(&again.list().unwrap()), vec!["400.D.host"]);
}

#[test]
fn delete_unlinks_only_the_processed_files() {
    let f = Fixture::new();
    f.put("new", "1.A.host", &msg(1), 30);
    f.put("cur", "2.B.host:2,F", &msg(2), 20);
    f.put("new", "3.C.host", &msg(3), 10);
    let mut mailbox = f.open(ProcessedAction::Delete);
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_processed(&listed[..2]).unwrap();
    assert_eq!(f.names("new"), vec!["3.C.host"]);
    assert_eq!(f.names("cur"), Vec::<String>::new());
    // Deleting what is already gone is no error.
    mailbox.mark_processed(&listed[..1]).unwrap();
    assert_eq!(ids(&mailbox.list().unwrap()), vec!["3.C.host"]);
}

#[test]
fn move_goes_into_the_maildirplusplus_folder_and_quarantine_into_pcr_failed() {
    let f = Fixture::new();
    f.put("new", "1.A.host", &msg(1), 30);
    f.put("cur", "2.B.host:2,S", &msg(2), 20);
    f.put("new", "3.C.host", &msg(3), 10);
    let mut mailbox = f.open(ProcessedAction::Move("Done".into()));
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_processed(&listed[..2]).unwrap();
    assert!(mailbox.quarantine(&listed[2..]).unwrap());
    Box::new(mailbox).finish().unwrap();

    let done = f.root.join(".Done");
    assert!(done.join("maildirfolder").is_file());
    assert!(done.join("new").is_dir() && done.join("tmp").is_dir());
    assert_eq!(
        names_in(&done.join("cur")),
        vec!["1.A.host:2,", "2.B.host:2,S"]
    );
    assert_eq!(fs::read(done.join("cur/1.A.host:2,")).unwrap(), msg(1));
    assert_eq!(
        names_in(&f.root.join(".PCR-Failed/cur")),
        vec!["3.C.host:2,"]
    );
    assert_eq!(f.names("new"), Vec::<String>::new());
    assert_eq!(f.names("cur"), Vec::<String>::new());
    // Moved folders are not read as the inbox.
    assert_eq!(f.open(ProcessedAction::Seen).count().unwrap(), 0);
}

#[test]
fn skipped_messages_stay_untouched_and_are_not_listed_again() {
    let f = Fixture::new();
    f.put("new", "1.A.host", &msg(1), 30);
    f.put("new", "2.B.host", &msg(2), 20);
    let mut mailbox = f.open(ProcessedAction::Delete);
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_skipped(&listed[..1]).unwrap();
    Box::new(mailbox).finish().unwrap();
    assert_eq!(f.names("new"), vec!["1.A.host", "2.B.host"]);
    let mut again = f.open(ProcessedAction::Delete);
    assert_eq!(ids(&again.list().unwrap()), vec!["2.B.host"]);
    assert_eq!(again.count().unwrap(), 2);
}

#[test]
fn files_that_vanish_or_move_between_list_and_fetch_are_handled() {
    let f = Fixture::new();
    let gone = f.put("new", "1.A.host", &msg(1), 30);
    let moving = f.put("new", "2.B.host", &msg(2), 20);
    f.put("new", "3.C.host", &msg(3), 10);
    let mut mailbox = f.open(ProcessedAction::Seen);
    let listed = ids(&mailbox.list().unwrap());
    // Another process took the first; a mail client read the second (new/ → cur/ + S).
    fs::remove_file(gone).unwrap();
    fs::rename(&moving, f.root.join("cur/2.B.host:2,S")).unwrap();
    let got = fetch_all(&mut mailbox, &listed);
    let got_ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(got_ids, vec!["2.B.host", "3.C.host"]);
    assert_eq!(got[0].raw, msg(2));
    // The actions tolerate it as well.
    mailbox.mark_processed(&listed).unwrap();
    assert_eq!(f.names("cur"), vec!["2.B.host:2,S", "3.C.host:2,S"]);
}

#[test]
fn stop_ends_the_reading() {
    let f = Fixture::new();
    for n in 0..5 {
        f.put("new", &format!("{n}.X.host"), &msg(n), 50 - u64::from(n));
    }
    let mut mailbox = f.open(ProcessedAction::Seen);
    let listed = ids(&mailbox.list().unwrap());
    let mut seen = 0;
    mailbox
        .fetch_each(&listed, &mut |_| {
            seen += 1;
            if seen == 2 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap();
    assert_eq!(seen, 2);
}

#[test]
fn a_missing_or_broken_maildir_is_a_clear_error() {
    let f = Fixture::new();
    fs::remove_dir(f.root.join("cur")).unwrap();
    let err = MaildirMailbox::open(&f.account(ProcessedAction::Seen), f.state()).unwrap_err();
    match &err {
        Error::Mailbox(m) => {
            assert_eq!(m.account, "master");
            assert_eq!(m.server, f.root.display().to_string());
            assert!(m.message.contains("cur/"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    let mut account = f.account(ProcessedAction::Seen);
    account.incoming.as_mut().unwrap().path = None;
    let err = MaildirMailbox::open(&account, f.state()).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("INCOMING_PATH"), "{err}");
    let err =
        MaildirMailbox::open(&f.account(ProcessedAction::Move(".".into())), f.state()).unwrap_err();
    assert!(err.to_string().contains("PROCESSED_ACTION"), "{err}");
}

#[test]
fn open_dispatches_to_maildir() {
    let f = Fixture::new();
    f.put("new", "1.A.host", &msg(1), 1);
    let mut mailbox =
        incoming::open(&f.account(ProcessedAction::Seen), &no_oauth(), f.state()).unwrap();
    assert_eq!(mailbox.protocol(), "MAILDIR");
    assert_eq!(mailbox.list().unwrap().len(), 1);
    mailbox.finish().unwrap();
}

/// These mailboxes keep no tokens: the OAuth environment is never touched.
fn no_oauth() -> pcr_email::oauth::OAuthEnv {
    pcr_email::oauth::OAuthEnv {
        state_dir: std::env::temp_dir().join("pcr-email-unused-state"),
        state_dsn: None,
        key_file: std::env::temp_dir().join("pcr-email-unused.key"),
    }
}

/// Two file names that differ only in a byte that is not UTF-8 are two messages: each is
/// listed (with an id of its own), read and marked, and a literal `%` in a name stays distinct.
#[test]
fn names_that_differ_only_in_a_non_utf8_byte_are_two_messages() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let f = Fixture::new();
    let put_bytes = |sub: &str, name: &[u8], raw: &[u8], age: u64| {
        let path = f.root.join(sub).join(OsStr::from_bytes(name));
        fs::write(&path, raw).unwrap();
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(age))
            .unwrap();
    };
    put_bytes("new", b"1700000001.M1P1.caf\xe9", &msg(1), 30);
    put_bytes("new", b"1700000001.M1P1.caf\xe8", &msg(2), 20);
    put_bytes("cur", b"1700000001.M1P1.caf%E9:2,", &msg(3), 10);

    let mut mailbox = f.open(ProcessedAction::Seen);
    let listed = ids(&mailbox.list().unwrap());
    assert_eq!(
        listed,
        vec![
            "1700000001.M1P1.caf%E9",
            "1700000001.M1P1.caf%E8",
            "1700000001.M1P1.caf%25E9"
        ]
    );
    let got = fetch_all(&mut mailbox, &listed);
    let fetched: Vec<(String, Vec<u8>)> = got.into_iter().map(|m| (m.id, m.raw)).collect();
    assert_eq!(
        fetched,
        vec![
            (listed[0].clone(), msg(1)),
            (listed[1].clone(), msg(2)),
            (listed[2].clone(), msg(3))
        ]
    );
    mailbox.mark_processed(&listed).unwrap();
    Box::new(mailbox).finish().unwrap();

    let mut cur: Vec<Vec<u8>> = fs::read_dir(f.root.join("cur"))
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    cur.sort();
    assert_eq!(
        cur,
        vec![
            b"1700000001.M1P1.caf%E9:2,S".to_vec(),
            b"1700000001.M1P1.caf\xe8:2,S".to_vec(),
            b"1700000001.M1P1.caf\xe9:2,S".to_vec(),
        ]
    );
    assert!(f.names("new").is_empty());
    // All three are recorded as done: nothing is listed again.
    assert_eq!(f.open(ProcessedAction::Seen).list().unwrap(), vec![]);
}
