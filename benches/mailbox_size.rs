//! Mailbox size benchmark (issue 13 item 2, IMAP, POP3 and MAILDIR; `benches/cloud.rs` does
//! OFFICE365 and GMAIL): what one run costs against the number of messages the mailbox already
//! holds, in round trips and bytes received (counted at a relay in front of the local Dovecot)
//! and in time, for a Service Desk mailbox that keeps its mail (`PROCESSED_ACTION = seen`).
//!
//! For each type and each size N (ascending, the same mailbox grown from one size to the
//! next), the mailbox gets N messages that earlier runs finished, the way those runs leave
//! them:
//! - IMAP (`bench1@test.local`, INBOX, over IMAPS): the files are written into the user's
//!   Maildir `cur/` with the `S` flag and Dovecot is told (`doveadm force-resync`); one run
//!   lists them and settles them all, which moves the UID mark past them;
//! - POP3 (`bench2@test.local`, over POP3S): the same files; `seen` is `DELE` for POP3, so what
//!   stays on a POP3 server is what the runs recorded in the UIDL ledger and left there
//!   (skipped, quarantined): one run lists them and records them all;
//! - MAILDIR (a directory of its own): the files in `cur/` with the `S` flag, recorded as done
//!   by one run, exactly as `seen` leaves them.
//!
//! Then, as `eventCheckMail` reads a mailbox (list, download, mark processed, finish): a run
//! with 5 new messages (delivered by dovecot-lda, or written to `new/`), and the measured run
//! with 5 more, three times (the fastest is shown: the shared machine adds noise, never
//! speed; the round trips and bytes are the same each time). For IMAP also the full listing:
//! a first run (no mark yet, or a changed UIDVALIDITY) lists every UID; POP3 and MAILDIR list
//! everything on every run.
//!
//! Run: `scripts/test-servers.sh start`, then `cargo bench --bench mailbox_size` (options after
//! `--`: `--sizes 1000,10000,20000`, `--new 5`, `--repeat 3`). About a minute. Prints a
//! Markdown table. Not a test: nothing is asserted but the number of messages each run hands
//! over.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pcr_email::config::{
    Account, AccountId, AccountType, Incoming, MailboxType, ProcessedAction, Secret, SslMode,
    TlsSettings,
};
use pcr_email::incoming::{Flow, Mailbox};
use pcr_email::oauth::OAuthEnv;
use pcr_email::state::StateStore;

struct Options {
    sizes: Vec<usize>,
    new: usize,
    repeat: usize,
}

fn options() -> Options {
    let mut o = Options {
        sizes: vec![1000, 10_000, 20_000],
        new: 5,
        repeat: 3,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--sizes" => {
                o.sizes = args[i + 1]
                    .split(',')
                    .map(|s| s.trim().parse().expect("--sizes 1000,10000"))
                    .collect();
                i += 2;
            }
            "--new" => {
                o.new = args[i + 1].parse().expect("--new N");
                i += 2;
            }
            "--repeat" => {
                o.repeat = args[i + 1].parse::<usize>().expect("--repeat N").max(1);
                i += 2;
            }
            // cargo bench passes --bench.
            _ => i += 1,
        }
    }
    o.sizes.sort_unstable();
    o
}

// ---- the relay that counts round trips -------------------------------------------------

/// `tests/servers/delay_proxy.py` with no added delay in front of Dovecot's IMAPS and POP3S
/// ports, writing one line of statistics per closed connection; stopped (by its pid) on drop.
struct Relay {
    child: Child,
    stats: PathBuf,
    imaps: u16,
    pop3s: u16,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    fn start(dir: &Path) -> Relay {
        let (imaps, pop3s) = (common::spare_port(30), common::spare_port(31));
        let stats = dir.join("relay-stats.jsonl");
        let host = common::host();
        let script = Path::new(&common::env("PCR_TEST_SERVERS_DIR")).join("delay_proxy.py");
        let child = Command::new(common::env("PCR_TEST_PYTHON"))
            .arg(&script)
            .args(["--host", &host, "--delay-ms", "0", "--stats"])
            .arg(&stats)
            .arg(format!("{imaps}:{host}:{}", common::port("PCR_IMAPS_PORT")))
            .arg(format!("{pop3s}:{host}:{}", common::port("PCR_POP3S_PORT")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", script.display()));
        let mut relay = Relay {
            child,
            stats,
            imaps,
            pop3s,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [imaps, pop3s] {
            while std::net::TcpStream::connect((host.as_str(), port)).is_err() {
                if let Ok(Some(status)) = relay.child.try_wait() {
                    panic!("relay on port {port} exited: {status}");
                }
                assert!(Instant::now() < deadline, "relay not listening on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The probes above are connections too: wait until they are recorded.
        relay.wait_for(2);
        relay
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.stats)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until `count` connections have been recorded; returns them all.
    fn wait_for(&self, count: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.lines();
            if lines.len() >= count {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "the relay recorded {} connections, expected {count}",
                lines.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// ---- accounts and messages -------------------------------------------------------------

fn account(
    recid: i64,
    mailbox: MailboxType,
    user: &str,
    port: u16,
    path: Option<&Path>,
) -> Account {
    let password = match mailbox {
        MailboxType::Maildir => None,
        _ => Some(Secret::new(common::mail_user(user).password)),
    };
    Account {
        id: AccountId::Tenant(recid),
        tenants_recid: 3,
        account_type: AccountType::ServiceDesk,
        email: format!("{user}@{}", common::env("PCR_MAIL_DOMAIN")),
        display_name: None,
        login: None,
        password,
        outgoing: None,
        incoming: Some(Incoming {
            mailbox,
            host: path.is_none().then(common::tls_host),
            port,
            ssl: if path.is_none() {
                SslMode::Ssl
            } else {
                SslMode::None
            },
            folder: "INBOX".into(),
            path: path.map(Path::to_path_buf),
            processed_action: ProcessedAction::Seen,
            max_messages: 500,
            max_message_bytes: 50 * 1024 * 1024,
        }),
        sysadmin: None,
        tls: TlsSettings {
            verify_cert: true,
            ca_file: Some(common::ca_file()),
        },
        file_path: PathBuf::from("/nonexistent"),
        sendmail_path: PathBuf::from("/usr/sbin/sendmail"),
        timeout: Duration::from_secs(60),
        auth_type: Default::default(),
        oauth: None,
    }
}

/// A plain message of about 1 KB, as a customer writes one.
fn message(subject: &str) -> Vec<u8> {
    let token = common::unique_token("size");
    let body = "Hello,\r\n\r\nthe printer on the third floor does not print since this morning. \
                Could somebody have a look?\r\n\r\nThanks,\r\nA customer\r\n"
        .repeat(4);
    format!(
        "From: Customer <customer@example.com>\r\nTo: Service Desk <desk@test.local>\r\n\
         Subject: {subject}\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <{token}@example.com>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    )
    .into_bytes()
}

/// Writes `count` messages into `maildir/cur`, flagged seen, owned like the directory.
fn fill_cur(maildir: &Path, from: usize, count: usize) {
    let cur = maildir.join("cur");
    let owner = fs::metadata(maildir).expect("the Maildir exists");
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    for k in from..from + count {
        let raw = message(&format!("Processed {k}"));
        let name = format!(
            "{secs}.M{k}P{}.pcr-bench,S={}:2,S",
            std::process::id(),
            raw.len()
        );
        let path = cur.join(name);
        fs::write(&path, raw).expect("write a message");
        let _ = std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()));
    }
}

/// Writes one message into `maildir/new` (through `tmp/`, as a delivery does).
fn drop_new(maildir: &Path, subject: &str) {
    let name = common::unique_token("new");
    let tmp = maildir.join("tmp").join(&name);
    fs::write(&tmp, message(subject)).expect("write a message");
    fs::rename(&tmp, maildir.join("new").join(&name)).expect("deliver");
}

/// Files in `cur/` and `new/`: the directory entries a MAILDIR run lists.
fn entries(maildir: &Path) -> usize {
    ["cur", "new"]
        .iter()
        .map(|sub| fs::read_dir(maildir.join(sub)).unwrap().count())
        .sum()
}

// ---- runs ------------------------------------------------------------------------------

/// What one run cost.
struct Cost {
    seconds: f64,
    handed: usize,
    listed: usize,
    /// At the relay (IMAP, POP3): direction changes server-after-client, TLS included.
    round_trips: Option<u64>,
    received: Option<u64>,
    /// MAILDIR: the files in `cur/` and `new/` when it ran.
    entries: Option<usize>,
}

/// The faster of two runs (the shared machine adds noise, never speed).
fn faster(best: Option<Cost>, cost: Cost) -> Cost {
    match best {
        Some(best) if best.seconds <= cost.seconds => best,
        _ => cost,
    }
}

/// The state store a mailbox's runs share (STATE_DIR).
struct State {
    dir: tempfile::TempDir,
}

impl State {
    fn new() -> State {
        State {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn store(&self) -> StateStore {
        StateStore::open(self.dir.path(), None).unwrap()
    }
}

/// One run as `eventCheckMail` reads a mailbox: list, download, mark processed, finish.
/// `settle_all`: instead, records everything listed as finished without downloading it (what
/// earlier runs left); `list_only`: lists and finishes.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    Normal,
    SettleAll,
    ListOnly,
}

fn run(a: &Account, state: &State, relay: Option<&Relay>, how: Run) -> Cost {
    let before = relay.map(|r| r.lines().len());
    let env = OAuthEnv {
        state_dir: state.dir.path().to_path_buf(),
        state_dsn: None,
        key_file: state.dir.path().join("key"),
    };
    let start = Instant::now();
    let mut mb: Box<dyn Mailbox> = pcr_email::incoming::open(a, &env, state.store()).unwrap();
    let listed = mb.list().unwrap();
    let count = listed.len();
    let mut done = Vec::new();
    match how {
        Run::Normal => {
            let max = a.incoming.as_ref().unwrap().max_messages;
            let ids: Vec<String> = listed.into_iter().take(max).map(|l| l.id).collect();
            mb.fetch_each(&ids, &mut |f| {
                done.push(f.id);
                Flow::Continue
            })
            .unwrap();
            mb.mark_processed(&done).unwrap();
        }
        Run::SettleAll => {
            let ids: Vec<String> = listed.into_iter().map(|l| l.id).collect();
            mb.mark_skipped(&ids).unwrap();
        }
        Run::ListOnly => {}
    }
    mb.finish().unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let (round_trips, received) = match (relay, before) {
        (Some(r), Some(before)) => {
            let lines = r.wait_for(before + 1);
            let line = &lines[before];
            (line["round_trips"].as_u64(), line["s2c_bytes"].as_u64())
        }
        _ => (None, None),
    };
    Cost {
        seconds,
        handed: done.len(),
        listed: count,
        round_trips,
        received,
        entries: None,
    }
}

struct Row {
    kind: &'static str,
    n: usize,
    full: Option<Cost>,
    steady: Cost,
}

/// IMAP or POP3 on the user's Dovecot INBOX, through the relay.
fn server_rows(kind: MailboxType, user: &str, relay: &Relay, o: &Options, recid: i64) -> Vec<Row> {
    let email = format!("{user}@{}", common::env("PCR_MAIL_DOMAIN"));
    common::mailbox_reset(&email);
    let maildir = common::maildir(&email);
    let port = if kind == MailboxType::Imap {
        relay.imaps
    } else {
        relay.pop3s
    };
    let a = account(recid, kind, user, port, None);
    let state = State::new();
    let mut have = 0;
    let mut rows = Vec::new();
    for &n in &o.sizes {
        if n > have {
            fill_cur(&maildir, have, n - have);
            common::doveadm(&["force-resync", "-u", &email, "INBOX"]);
            have = n;
        }
        let primed = run(&a, &state, None, Run::SettleAll);
        assert_eq!(primed.handed, 0);
        let full = (kind == MailboxType::Imap).then(|| {
            let fresh = State::new();
            let full = run(&a, &fresh, Some(relay), Run::ListOnly);
            assert_eq!(full.listed, have);
            full
        });
        for k in 0..o.new {
            common::deliver_to_inbox(&email, &message(&format!("New {n} {k}")));
        }
        let warm = run(&a, &state, Some(relay), Run::Normal);
        assert_eq!(warm.handed, o.new);
        let mut steady: Option<Cost> = None;
        for r in 0..o.repeat {
            for k in 0..o.new {
                common::deliver_to_inbox(&email, &message(&format!("Newer {n} {r} {k}")));
            }
            let cost = run(&a, &state, Some(relay), Run::Normal);
            assert_eq!(cost.handed, o.new);
            steady = Some(faster(steady, cost));
        }
        if kind == MailboxType::Imap {
            // `seen` keeps them; POP3 deleted them (DELE).
            have += (1 + o.repeat) * o.new;
        }
        rows.push(Row {
            kind: if kind == MailboxType::Imap {
                "IMAP"
            } else {
                "POP3"
            },
            n,
            full,
            steady: steady.unwrap(),
        });
    }
    common::mailbox_reset(&email);
    rows
}

/// MAILDIR: a directory of its own on this machine.
fn maildir_rows(o: &Options, recid: i64) -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        fs::create_dir_all(root.join(sub)).unwrap();
    }
    let a = account(recid, MailboxType::Maildir, "bench3", 0, Some(&root));
    let state = State::new();
    let mut have = 0;
    let mut rows = Vec::new();
    for &n in &o.sizes {
        if n > have {
            fill_cur(&root, have, n - have);
            have = n;
        }
        // Records them as done, as the `seen` runs that read them did (they are in cur/ with
        // the S flag already, so nothing is renamed).
        let primed = run(&a, &state, None, Run::SettleAll);
        assert_eq!(primed.handed, 0);
        for k in 0..o.new {
            drop_new(&root, &format!("New {n} {k}"));
        }
        let warm = run(&a, &state, None, Run::Normal);
        assert_eq!(warm.handed, o.new);
        let mut steady: Option<Cost> = None;
        for r in 0..o.repeat {
            for k in 0..o.new {
                drop_new(&root, &format!("Newer {n} {r} {k}"));
            }
            let mut cost = run(&a, &state, None, Run::Normal);
            cost.entries = Some(entries(&root));
            assert_eq!(cost.handed, o.new);
            steady = Some(faster(steady, cost));
        }
        have += (1 + o.repeat) * o.new;
        rows.push(Row {
            kind: "MAILDIR",
            n,
            full: None,
            steady: steady.unwrap(),
        });
    }
    rows
}

fn kb(bytes: Option<u64>) -> String {
    bytes.map_or("—".into(), |b| format!("{:.1} KB", b as f64 / 1000.0))
}

fn main() {
    let o = options();
    let scratch = tempfile::tempdir().unwrap();
    let relay = Relay::start(scratch.path());
    let mut rows = server_rows(MailboxType::Imap, "bench1", &relay, &o, 9101);
    rows.extend(server_rows(MailboxType::Pop3, "bench2", &relay, &o, 9102));
    rows.extend(maildir_rows(&o, 9103));
    println!(
        "| type | processed messages in the folder | full listing (first run; after an expired mark): cost / s | run with {} new: cost / s | received in that run |",
        o.new
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        let full = match (&r.full, r.kind) {
            (Some(c), _) => format!(
                "{} round trips, {} / {:.3}",
                c.round_trips.unwrap_or(0),
                kb(c.received),
                c.seconds
            ),
            (None, _) => "every run".into(),
        };
        let steady = match r.steady.entries {
            Some(entries) => format!("no round trip, {entries} files / {:.3}", r.steady.seconds),
            None => format!(
                "{} round trips / {:.3}",
                r.steady.round_trips.unwrap_or(0),
                r.steady.seconds
            ),
        };
        println!(
            "| {} | {} | {full} | {steady} | {} |",
            r.kind,
            r.n,
            kb(r.steady.received)
        );
    }
}
