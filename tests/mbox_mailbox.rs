//! The MBOX mailbox on temporary mbox files, with Debian's procmail delivering into them:
//! splitting and unescaping, `seen` (the file untouched, only new mail read again), `delete`
//! (rewritten under the locks without losing what is delivered meanwhile), `move:` and
//! quarantine into sibling mbox files, the delivery agents' locks, and the errors.

use std::fs;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, ProcessedAction, SslMode, TlsSettings,
};
use pcr_email::incoming::mbox::MboxMailbox;
use pcr_email::incoming::{self, Fetched, Flow, Listed, Mailbox};
use pcr_email::state::StateStore;

struct Fixture {
    dir: tempfile::TempDir,
    mbox: PathBuf,
    state_dir: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mbox = dir.path().join("servicedesk");
        let state_dir = dir.path().join("state");
        Fixture {
            dir,
            mbox,
            state_dir,
        }
    }

    fn account(&self, action: ProcessedAction, timeout: Duration) -> Account {
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
                mailbox: MailboxType::Mbox,
                host: None,
                port: 0,
                ssl: SslMode::None,
                folder: "INBOX".into(),
                path: Some(self.mbox.clone()),
                processed_action: action,
                max_messages: 500,
                max_message_bytes: 50 * 1024 * 1024,
            }),
            sysadmin: None,
            tls: TlsSettings::default(),
            file_path: PathBuf::from("/nonexistent"),
            sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
            timeout,
            auth_type: Default::default(),
            oauth: None,
        }
    }

    fn open(&self, action: ProcessedAction) -> MboxMailbox {
        MboxMailbox::open(
            &self.account(action, Duration::from_secs(10)),
            StateStore::open(&self.state_dir, None).unwrap(),
        )
        .unwrap()
    }

    fn write(&self, entries: &[String]) {
        fs::write(&self.mbox, entries.concat()).unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8(fs::read(&self.mbox).unwrap_or_default()).unwrap()
    }

    fn sibling(&self, name: &str) -> String {
        String::from_utf8(fs::read(self.dir.path().join(name)).unwrap_or_default()).unwrap()
    }

    /// Delivers `raw` with Debian's procmail (which takes the dot-lock and an fcntl lock).
    fn procmail(&self, raw: &str) {
        let rc = self.dir.path().join("procmailrc");
        if !rc.exists() {
            fs::write(
                &rc,
                format!(
                    "DEFAULT={}\nLOCKSLEEP=1\nLOGFILE={}\n",
                    self.mbox.display(),
                    self.dir.path().join("procmail.log").display()
                ),
            )
            .unwrap();
        }
        let mut child = Command::new("procmail")
            .args(["-f", "customer@example.org", "-m"])
            .arg(&rc)
            .stdin(Stdio::piped())
            .spawn()
            .expect("procmail is not installed (scripts/install-deps.sh installs it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(raw.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "procmail failed");
    }
}

/// A message (LF line ends, as delivery agents store them).
fn message(n: u32, extra_headers: &str, body: &str) -> String {
    format!(
        "From: Customer <customer@example.org>\nTo: helpdesk@example.edu\nSubject: request {n}\n\
         Message-ID: <req-{n}@example.org>\n{extra_headers}\n{body}"
    )
}

fn plain(n: u32) -> String {
    message(n, "", &format!("Hello,\nrequest number {n}.\n"))
}

/// `raw` as an mboxrd writer stores it: a `From ` line, `From ` lines in the text quoted once
/// more, and a blank line after it.
fn entry(raw: &str) -> String {
    let mut out = String::from("From customer@example.org Tue Mar  5 14:22:01 2024\n");
    for line in raw.split_inclusive('\n') {
        if line.trim_start_matches('>').starts_with("From ") {
            out.push('>');
        }
        out.push_str(line);
    }
    out.push('\n');
    out
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

fn text(fetched: &Fetched) -> String {
    String::from_utf8(fetched.raw.clone()).unwrap()
}

/// The subjects of the messages in mbox text, in order.
fn subjects(mbox: &str) -> Vec<String> {
    mbox.lines()
        .filter_map(|l| l.strip_prefix("Subject: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn messages_are_split_at_from_lines_unescaped_and_never_cut_by_content_length() {
    let f = Fixture::new();
    let lying_short = message(
        1,
        "Content-Length: 12\n",
        "Hello,\nFrom the third floor: the printer is broken.\n>From a quoted reply\nbye\n",
    );
    let lying_long = message(2, "Content-Length: 99999\n", "Second request.\n");
    let third = plain(3);
    f.write(&[entry(&lying_short), entry(&lying_long), entry(&third)]);

    let mut mailbox = f.open(ProcessedAction::Seen);
    let listed = mailbox.list().unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].size, entry(&lying_short).len() as u64);
    assert_eq!(mailbox.count().unwrap(), 3);
    let got = fetch_all(&mut mailbox, &ids(&listed));
    let raws: Vec<String> = got.iter().map(text).collect();
    assert_eq!(raws, vec![lying_short, lying_long, third]);
    assert!(raws[0].contains("\nFrom the third floor"));
    assert!(raws[0].contains("\n>From a quoted reply"));
}

#[test]
fn seen_leaves_the_file_untouched_and_reads_only_new_mail_again() {
    let f = Fixture::new();
    f.write(&[entry(&plain(1)), entry(&plain(2))]);
    let before = fs::read(&f.mbox).unwrap();
    let modified = fs::metadata(&f.mbox).unwrap().modified().unwrap();

    let mut mailbox = f.open(ProcessedAction::Seen);
    let listed = ids(&mailbox.list().unwrap());
    fetch_all(&mut mailbox, &listed);
    mailbox.mark_processed(&listed[..1]).unwrap();
    mailbox.mark_skipped(&listed[1..]).unwrap();
    Box::new(mailbox).finish().unwrap();
    assert_eq!(fs::read(&f.mbox).unwrap(), before);
    assert_eq!(fs::metadata(&f.mbox).unwrap().modified().unwrap(), modified);

    let mut again = f.open(ProcessedAction::Seen);
    assert_eq!(again.list().unwrap(), vec![]);
    Box::new(again).finish().unwrap();

    // Delivered by procmail: the only message listed.
    f.procmail(&plain(3));
    let stored3 = f.text()[before.len()..].to_string();
    let mut third = f.open(ProcessedAction::Seen);
    let listed = ids(&third.list().unwrap());
    assert_eq!(listed.len(), 1);
    assert_eq!(text(&fetch_all(&mut third, &listed)[0]), plain(3));
    third.mark_processed(&listed).unwrap();
    Box::new(third).finish().unwrap();

    // A mail reader rewrites the file: the first message removed (the file shrinks), the
    // second marked read. Nothing is read again; a new message is.
    let read = message(
        2,
        "Status: RO\nX-Status: A\n",
        "Hello,\nrequest number 2.\n",
    );
    fs::write(&f.mbox, entry(&read) + &stored3).unwrap();
    let mut after = f.open(ProcessedAction::Seen);
    assert_eq!(after.list().unwrap(), vec![]);
    f.procmail(&plain(4));
    let listed = ids(&after.list().unwrap());
    assert_eq!(listed.len(), 1);
    assert_eq!(text(&fetch_all(&mut after, &listed)[0]), plain(4));
}

#[test]
fn delete_removes_what_was_processed_and_keeps_skipped_and_newly_delivered_mail() {
    let f = Fixture::new();
    f.write(&[
        entry(&plain(1)),
        entry(&plain(2)),
        entry(&plain(3)),
        entry(&plain(4)),
    ]);
    let mut mailbox = f.open(ProcessedAction::Delete);
    let listed = ids(&mailbox.list().unwrap());
    assert_eq!(listed.len(), 4);
    fetch_all(&mut mailbox, &listed);
    // Delivered while the host works on the messages: after the listed ones.
    f.procmail(&plain(5));
    mailbox.mark_skipped(&listed[1..2]).unwrap();
    mailbox
        .mark_processed(&[listed[0].clone(), listed[2].clone()])
        .unwrap();
    Box::new(mailbox).finish().unwrap();
    assert_eq!(
        subjects(&f.text()),
        vec!["request 2", "request 4", "request 5"]
    );
    assert!(f.text().starts_with(&entry(&plain(2))));
    assert!(!f.dir.path().join("servicedesk.pcr-rewrite").exists());
    assert!(!f.dir.path().join("servicedesk.lock").exists());

    // The skipped message stays but is not listed again; 4 and 5 are.
    let mut next = f.open(ProcessedAction::Delete);
    let listed = ids(&next.list().unwrap());
    let got: Vec<String> = fetch_all(&mut next, &listed).iter().map(text).collect();
    assert_eq!(got, vec![plain(4), plain(5)]);
    next.mark_processed(&listed).unwrap();
    assert_eq!(f.text(), entry(&plain(2)));
}

#[test]
fn identical_copies_are_one_message_and_leave_together() {
    let f = Fixture::new();
    let copy = entry(&plain(1));
    f.write(&[copy.clone(), entry(&plain(2)), copy.clone()]);
    let mut mailbox = f.open(ProcessedAction::Delete);
    let listed = ids(&mailbox.list().unwrap());
    assert_eq!(listed.len(), 2);
    let got = fetch_all(&mut mailbox, &listed);
    assert_eq!(text(&got[0]), plain(1));
    mailbox.mark_processed(&listed[..1]).unwrap();
    assert_eq!(f.text(), entry(&plain(2)));
}

#[test]
fn move_and_quarantine_append_to_sibling_mbox_files() {
    let f = Fixture::new();
    f.write(&[entry(&plain(1)), entry(&plain(2)), entry(&plain(3))]);
    let mut mailbox = f.open(ProcessedAction::Move("Done".into()));
    let listed = ids(&mailbox.list().unwrap());
    mailbox.mark_processed(&listed[..1]).unwrap();
    assert_eq!(f.sibling("Done"), entry(&plain(1)));
    assert!(mailbox.quarantine(&listed[1..2]).unwrap());
    assert_eq!(f.sibling("PCR-Failed"), entry(&plain(2)));
    assert_eq!(f.text(), entry(&plain(3)));
    mailbox.mark_processed(&listed[2..]).unwrap();
    assert_eq!(f.sibling("Done"), entry(&plain(1)) + &entry(&plain(3)));
    assert_eq!(f.text(), "");
    // The folder file is an mbox like any other.
    let mut done = MboxMailbox::at(
        "master",
        &f.dir.path().join("Done"),
        ProcessedAction::Seen,
        Duration::from_secs(5),
        StateStore::open(&f.state_dir, None).unwrap(),
    )
    .unwrap();
    assert_eq!(done.count().unwrap(), 2);

    // With `seen`, a quarantined message is copied and stays (and is not listed again).
    let g = Fixture::new();
    g.write(&[entry(&plain(7))]);
    let mut seen = g.open(ProcessedAction::Seen);
    let listed = ids(&seen.list().unwrap());
    seen.quarantine(&listed).unwrap();
    seen.quarantine(&listed).unwrap();
    assert_eq!(g.sibling("PCR-Failed"), entry(&plain(7)));
    assert_eq!(g.text(), entry(&plain(7)));
    assert_eq!(seen.list().unwrap(), vec![]);

    for bad in ["../elsewhere", "servicedesk", "."] {
        let e = MboxMailbox::open(
            &f.account(ProcessedAction::Move(bad.into()), Duration::from_secs(1)),
            StateStore::open(&f.state_dir, None).unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("PROCESSED_ACTION"), "{bad}: {e}");
    }
}

#[test]
fn the_delivery_agents_locks_are_honoured_and_a_stale_dot_lock_is_broken() {
    let f = Fixture::new();
    f.write(&[entry(&plain(1))]);
    let quick = |f: &Fixture| {
        MboxMailbox::open(
            &f.account(ProcessedAction::Delete, Duration::from_secs(1)),
            StateStore::open(&f.state_dir, None).unwrap(),
        )
        .unwrap()
    };
    let lock = f.dir.path().join("servicedesk.lock");

    // A delivery agent's dot-lock: waited for, then the step fails; the lock stays.
    fs::write(&lock, b"").unwrap();
    let e = quick(&f).list().unwrap_err();
    assert!(e.to_string().contains("locked by another program"), "{e}");
    assert!(e.to_string().contains("servicedesk.lock"), "{e}");
    assert!(lock.exists());

    // Left by a dead process ten minutes ago: broken, and the mbox is read.
    fs::File::options()
        .write(true)
        .open(&lock)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(600))
        .unwrap();
    let mut mailbox = quick(&f);
    let listed = ids(&mailbox.list().unwrap());
    assert_eq!(listed.len(), 1);
    assert!(!lock.exists());

    // An fcntl lock as procmail holds it while it appends: the rewrite waits, then fails and
    // leaves the file as it was.
    let held = fs::File::options().write(true).open(&f.mbox).unwrap();
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    assert_eq!(
        unsafe { libc::fcntl(held.as_raw_fd(), libc::F_SETLK, &fl as *const libc::flock) },
        0
    );
    let e = mailbox.mark_processed(&listed).unwrap_err();
    assert!(e.to_string().contains("fcntl lock"), "{e}");
    assert_eq!(f.text(), entry(&plain(1)));
    assert!(!lock.exists());
    drop(held);
    mailbox.mark_processed(&listed).unwrap();
    assert_eq!(f.text(), "");
}

#[test]
fn procmail_waits_for_our_lock_and_is_never_lost() {
    // procmail finds our locks while a run reads and rewrites; whatever the interleaving, the
    // mail it delivers is read exactly once and none is lost.
    let f = Fixture::new();
    f.write(&[]);
    let deliveries = 24;
    let mut seen: Vec<String> = Vec::new();
    std::thread::scope(|scope| {
        let deliverer = scope.spawn(|| {
            for n in 0..deliveries {
                f.procmail(&plain(100 + n));
            }
        });
        let mut last_round = false;
        loop {
            let finished = deliverer.is_finished();
            let mut mailbox = f.open(ProcessedAction::Delete);
            let listed = ids(&mailbox.list().unwrap());
            for m in fetch_all(&mut mailbox, &listed) {
                seen.push(
                    text(&m)
                        .lines()
                        .find_map(|l| l.strip_prefix("Subject: "))
                        .unwrap()
                        .to_string(),
                );
            }
            mailbox.mark_processed(&listed).unwrap();
            Box::new(mailbox).finish().unwrap();
            if last_round {
                break;
            }
            last_round = finished;
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut expected: Vec<String> = (0..deliveries)
        .map(|n| format!("request {}", 100 + n))
        .collect();
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected);
    assert_eq!(f.text(), "");
}

#[test]
fn missing_files_directories_and_files_that_are_no_mbox() {
    let f = Fixture::new();
    // Not delivered to yet: an empty mailbox.
    let mut mailbox = f.open(ProcessedAction::Delete);
    assert_eq!(mailbox.list().unwrap(), vec![]);
    assert_eq!(mailbox.count().unwrap(), 0);
    Box::new(mailbox).finish().unwrap();

    let mut gone = f.account(ProcessedAction::Seen, Duration::from_secs(1));
    gone.incoming.as_mut().unwrap().path = Some(f.dir.path().join("no-such-dir/desk"));
    let e = incoming::open(
        &gone,
        &pcr_email::oauth::OAuthEnv {
            state_dir: f.state_dir.clone(),
            state_dsn: None,
            key_file: f.dir.path().join("key"),
        },
        StateStore::open(&f.state_dir, None).unwrap(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("no-such-dir"), "{e}");

    let mut dir = f.account(ProcessedAction::Seen, Duration::from_secs(1));
    dir.incoming.as_mut().unwrap().path = Some(f.dir.path().to_path_buf());
    let e = MboxMailbox::open(&dir, StateStore::open(&f.state_dir, None).unwrap()).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");

    fs::write(&f.mbox, "Subject: not an mbox\n\ntext\n").unwrap();
    let e = f.open(ProcessedAction::Seen).list().unwrap_err();
    assert!(e.to_string().contains("not an mbox file"), "{e}");
}

#[test]
fn a_symlinked_path_locks_the_real_file() {
    let f = Fixture::new();
    f.write(&[entry(&plain(1))]);
    let link = f.dir.path().join("link");
    std::os::unix::fs::symlink(&f.mbox, &link).unwrap();
    fs::write(f.dir.path().join("servicedesk.lock"), b"").unwrap();
    let mut account = f.account(ProcessedAction::Seen, Duration::from_secs(1));
    account.incoming.as_mut().unwrap().path = Some(link.clone());
    let mut mailbox =
        MboxMailbox::open(&account, StateStore::open(&f.state_dir, None).unwrap()).unwrap();
    let e = mailbox.list().unwrap_err();
    assert!(e.to_string().contains("locked"), "{e}");
    assert!(!Path::new(&format!("{}.lock", link.display())).exists());
}
