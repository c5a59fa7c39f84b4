//! The state store in MariaDB (`email.STATE_DSN`), against the test server of
//! `scripts/test-servers.sh`: the ledger's exactly-once protocol across connections, leases a
//! dead run loses, tokens that never go back to an older version, large cursors, the tables it
//! owns, the journal that keeps what the database refused, and the DSN read from the INI file.
//! Each test works in a database of its own.

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use mysql::prelude::Queryable;
use pcr_email::state::{Claim, Dsn, LedgerState, Owner, PendingAuth, StateStore};

/// A fresh database `pcr_t_<tag>_<random>` for one test, dropped when the guard goes.
struct TestDb {
    dsn: Dsn,
    admin: mysql::Conn,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = self
            .admin
            .query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.dsn.database));
    }
}

fn base_dsn() -> Dsn {
    Dsn::parse(&common::env("PCR_MARIADB_DSN"), |_| unreachable!()).unwrap()
}

fn test_db(tag: &str) -> TestDb {
    let base = base_dsn();
    let name = format!("pcr_t_{tag}_{:08x}", rand_u32());
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some(base.host.clone()))
        .tcp_port(base.port)
        .user(Some(base.user.clone()))
        .pass(Some(base.password.expose().to_string()))
        .prefer_socket(false);
    let mut admin = mysql::Conn::new(opts).expect("connect to the test MariaDB");
    admin
        .query_drop(format!("CREATE DATABASE `{name}`"))
        .unwrap();
    let mut dsn = base;
    dsn.database = name;
    TestDb { dsn, admin }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

fn open(db: &TestDb, dir: &Path) -> StateStore {
    StateStore::open_database(&db.dsn, dir).expect("open the MariaDB store")
}

fn remote_owner(name: &str) -> Owner {
    Owner::from_parts(name, "other-host", "m2", "b2", "pid:[1]", 4242, 1)
}

#[test]
fn the_ledger_protocol_runs_in_mariadb_with_a_schema_version_row() {
    let db = test_db("ledger");
    let dir = tempfile::tempdir().unwrap();
    let s = open(&db, dir.path());
    let run = Owner::new_run();
    // A Maildir scope is a path, a key may be a long Message-ID: any length fits.
    let scope = format!("maildir:/{}", "deep/".repeat(300));
    let long_key = format!("<{}@example.edu>", "x".repeat(3000));
    assert_eq!(
        s.claim(&scope, &long_key, Some("u1"), &run).unwrap(),
        Claim::New
    );
    assert_eq!(
        s.claim(&scope, &long_key, Some("u2"), &run).unwrap(),
        Claim::Busy
    );
    s.complete(&scope, &long_key, "inquiry", Some("SO201700043"))
        .unwrap();
    let next = Owner::new_run();
    assert_eq!(
        s.claim(&scope, &long_key, Some("u2"), &next).unwrap(),
        Claim::Done {
            outcome: "inquiry".into(),
            same_copy: true
        }
    );
    // A late second completion keeps the first outcome.
    s.complete(&scope, &long_key, "threaded", None).unwrap();
    let e = s.entry(&scope, &long_key).unwrap().unwrap();
    assert_eq!(
        (e.state, e.outcome.as_deref(), e.sd_number.as_deref()),
        (LedgerState::Done, Some("inquiry"), Some("SO201700043"))
    );
    assert_eq!(s.entry_by_ref(&scope, "u2").unwrap().unwrap().key, long_key);

    // Failures count up to quarantine; release gives back what was never handed over.
    for attempt in 1..=3u32 {
        let r = Owner::new_run();
        let c = s.claim("m", "bad", None, &r).unwrap();
        if attempt > 1 {
            assert_eq!(
                c,
                Claim::Retry {
                    attempts: attempt - 1
                }
            );
        }
        assert_eq!(s.fail("m", "bad", &r, "host threw").unwrap(), attempt);
    }
    s.quarantine("m", "bad", "failed 3 times").unwrap();
    assert_eq!(s.claim("m", "bad", None, &run).unwrap(), Claim::Quarantined);
    assert_eq!(s.quarantined("m").unwrap().len(), 1);
    assert_eq!(s.claim("m", "fresh", None, &run).unwrap(), Claim::New);
    s.skip("m", "skipped", "blocked sender").unwrap();
    let c = s.counts("m").unwrap();
    assert_eq!(
        (c.in_progress, c.quarantined, c.skipped, c.done),
        (1, 1, 1, 0)
    );
    assert_eq!(s.release_owned(&run).unwrap(), 1);
    assert_eq!(s.entry("m", "fresh").unwrap(), None);
    // A scope that changed its spelling keeps its rows.
    s.move_ledger_scope(&scope, "maildir:/resolved").unwrap();
    assert!(matches!(
        s.claim("maildir:/resolved", &long_key, None, &next)
            .unwrap(),
        Claim::Done { .. }
    ));
    assert!(s.forget("m", "bad").unwrap());

    let mut admin = mysql::Conn::new(admin_opts(&db)).unwrap();
    let version: Option<i64> = admin
        .query_first("SELECT version FROM pcr_email_schema WHERE name='state'")
        .unwrap();
    assert_eq!(version, Some(2));
}

fn admin_opts(db: &TestDb) -> mysql::OptsBuilder {
    mysql::OptsBuilder::new()
        .ip_or_hostname(Some(db.dsn.host.clone()))
        .tcp_port(db.dsn.port)
        .user(Some(db.dsn.user.clone()))
        .pass(Some(db.dsn.password.expose().to_string()))
        .db_name(Some(db.dsn.database.clone()))
        .prefer_socket(false)
}

#[test]
fn only_pcr_email_tables_are_created() {
    let db = test_db("tables");
    let dir = tempfile::tempdir().unwrap();
    drop(open(&db, dir.path()));
    let mut admin = mysql::Conn::new(admin_opts(&db)).unwrap();
    let tables: Vec<String> = admin.query("SHOW TABLES").unwrap();
    assert!(tables.len() >= 8, "{tables:?}");
    assert!(
        tables.iter().all(|t| t.starts_with("pcr_email_")),
        "{tables:?}"
    );
    // Opening again (another process, a newer run) finds them and changes nothing.
    drop(open(&db, dir.path()));
    let again: Vec<String> = admin.query("SHOW TABLES").unwrap();
    assert_eq!(again, tables);
}

#[test]
fn a_database_at_this_schema_version_is_only_read_at_start() {
    let db = test_db("schemaread");
    let dir = tempfile::tempdir().unwrap();
    drop(open(&db, dir.path()));
    let mut admin = mysql::Conn::new(admin_opts(&db)).unwrap();
    admin
        .query_drop("UPDATE pcr_email_schema SET updated_at=7 WHERE name='state'")
        .unwrap();
    // Another process starting (here: the same database under another name of the host,
    // which this process has not checked yet) reads the version and writes nothing.
    let mut other = db.dsn.clone();
    other.host = "localhost".into();
    drop(StateStore::open_database(&other, dir.path()).expect("open via localhost"));
    let row: Option<(i64, i64)> = admin
        .query_first("SELECT version, updated_at FROM pcr_email_schema WHERE name='state'")
        .unwrap();
    assert_eq!(
        row,
        Some((pcr_email::state::mysql::MYSQL_SCHEMA_VERSION, 7))
    );
}

#[test]
fn tables_of_a_newer_release_are_refused_naming_both_versions() {
    let db = test_db("schemanew");
    let mut admin = mysql::Conn::new(admin_opts(&db)).unwrap();
    admin
        .query_drop(
            "CREATE TABLE pcr_email_schema (name VARCHAR(64) NOT NULL PRIMARY KEY,
                version INT NOT NULL, updated_at BIGINT NOT NULL);
             INSERT INTO pcr_email_schema VALUES ('state', 99, 0)",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = match StateStore::open_database(&db.dsn, dir.path()) {
        Ok(_) => panic!("tables of schema version 99 were accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("this server's pcr_email is older than the database's tables"),
        "{err}"
    );
    assert!(err.contains("upgrade it"), "{err}");
    let ours = format!(" {},", pcr_email::state::mysql::MYSQL_SCHEMA_VERSION);
    assert!(err.contains(&ours) && err.contains(" 99"), "{err}");
    let tables: Vec<String> = admin.query("SHOW TABLES").unwrap();
    assert_eq!(tables, vec!["pcr_email_schema".to_string()]);
}

#[test]
fn concurrent_claims_from_several_connections_give_each_message_to_one_run() {
    let db = test_db("race");
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..60).map(|i| format!("<m{i}@x>")).collect();
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (dsn, dir, keys, barrier) = (
                db.dsn.clone(),
                dir.path().to_path_buf(),
                keys.clone(),
                barrier.clone(),
            );
            thread::spawn(move || {
                let s = StateStore::open_database(&dsn, &dir).unwrap();
                let run = Owner::new_run();
                barrier.wait();
                let mut mine = Vec::new();
                for k in &keys {
                    if s.claim("acct", k, None, &run).unwrap() == Claim::New {
                        s.complete("acct", k, "inquiry", None).unwrap();
                        mine.push(k.clone());
                    }
                }
                mine
            })
        })
        .collect();
    let mut all: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(all, expected, "every message claimed exactly once");
    let s = open(&db, dir.path());
    assert_eq!(s.counts("acct").unwrap().done, 60);
}

#[test]
fn a_run_on_another_server_keeps_its_claim_until_its_lease_runs_out() {
    let db = test_db("lease");
    let dir = tempfile::tempdir().unwrap();
    let short = open(&db, dir.path()).with_lease(Duration::from_millis(800));
    let other = open(&db, dir.path());
    let remote = remote_owner("remote-run");
    let me = Owner::new_run();
    assert_eq!(short.claim("1", "k", None, &remote).unwrap(), Claim::New);
    assert_eq!(other.claim("1", "k", None, &me).unwrap(), Claim::Busy);
    assert_eq!(short.renew_lease(&remote).unwrap(), 1);
    assert_eq!(other.claim("1", "k", None, &me).unwrap(), Claim::Busy);
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        other.claim("1", "k", None, &me).unwrap(),
        Claim::Retry { attempts: 1 }
    );
    // A dead process of this machine loses its claim at once.
    let gone = me.sibling("gone-run", 0, 1);
    assert_eq!(short.claim("1", "d", None, &gone).unwrap(), Claim::New);
    assert_eq!(
        other.claim("1", "d", None, &me).unwrap(),
        Claim::Retry { attempts: 1 }
    );
}

#[test]
fn tokens_cursors_authorizations_and_alerts_round_trip() {
    let db = test_db("values");
    let dir = tempfile::tempdir().unwrap();
    let s = open(&db, dir.path());
    let t = open(&db, dir.path());
    // A cloud listing mark of about half a megabyte.
    let big = "d".repeat(600_000);
    s.set_kv("graph-delta", "7", &big).unwrap();
    assert_eq!(
        t.get_kv("graph-delta", "7").unwrap().as_deref(),
        Some(&*big)
    );
    assert!(t.delete_kv("graph-delta", "7").unwrap());
    assert_eq!(s.get_kv("graph-delta", "7").unwrap(), None);
    s.set_imap_mark("7", "INBOX", 5, 100).unwrap();
    s.set_imap_mark("7", "INBOX", 5, 120).unwrap();
    assert_eq!(t.imap_mark("7", "INBOX").unwrap(), Some((5, 120)));

    // A newer token is never replaced by an older one; compare-and-swap sees the change.
    assert!(s
        .save_token_if_newer("7", "refresh", "new", None, 200)
        .unwrap());
    assert!(!t
        .save_token_if_newer("7", "refresh", "old", None, 100)
        .unwrap());
    let stored = s.load_token("7", "refresh").unwrap().unwrap();
    assert_eq!((stored.value.expose(), stored.version), ("new", 200));
    let v = s
        .replace_token("7", "refresh", Some(200), "newer", Some(5))
        .unwrap()
        .unwrap();
    assert_eq!(
        t.replace_token("7", "refresh", Some(200), "lost", None)
            .unwrap(),
        None
    );
    assert_eq!(t.load_token("7", "refresh").unwrap().unwrap().version, v);
    assert!(s.save_token("7", "access", "a", Some(1)).unwrap() > 0);
    assert!(s.delete_token("7", "access").unwrap());

    s.put_pending_auth("st", "{\"v\":1}", now_secs() + 600)
        .unwrap();
    assert!(t.put_pending_auth("st", "{}", now_secs() + 600).is_err());
    assert!(matches!(
        t.take_pending_auth("st").unwrap(),
        PendingAuth::Valid(_)
    ));
    assert_eq!(s.take_pending_auth("st").unwrap(), PendingAuth::Unknown);

    assert!(s.alert_once("disk full").unwrap());
    assert!(!t.alert_once("disk full").unwrap());
    assert!(t.clear_alert("disk full").unwrap());
    assert!(s.once_per_day("notice").unwrap());
    assert!(!t.once_per_day("notice").unwrap());

    s.record_sent("<abc@pcr>", "SO1", "7").unwrap();
    assert_eq!(t.sent_sd_number("abc@pcr").unwrap().as_deref(), Some("SO1"));
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A TCP relay to the test MariaDB that the test can cut: every connection through it is
/// closed and new ones are refused, as when the database server goes away.
struct Relay {
    port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    streams: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(to: (String, u16)) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streams = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, st) = (cut.clone(), streams.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect((to.0.as_str(), to.1)) else {
                    continue;
                };
                let mut list = st.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                for (mut a, mut b) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, cut, streams }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn journal_of(dir: &Path) -> std::path::PathBuf {
    dir.join("pcr_email-unrecorded.jsonl")
}

#[test]
fn a_record_the_database_refused_is_kept_and_written_by_the_next_store() {
    let db = test_db("journal");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start((db.dsn.host.clone(), db.dsn.port));
    let mut via = db.dsn.clone();
    via.host = "127.0.0.1".to_string();
    via.port = relay.port;
    let s = StateStore::open_database(&via, dir.path()).unwrap();
    let run = Owner::new_run();
    assert_eq!(s.claim("a", "<taken@x>", None, &run).unwrap(), Claim::New);
    // Another process died writing its entry: a half line without its newline.
    std::fs::write(journal_of(dir.path()), b"{\"account\":\"a\",\"ke").unwrap();
    // The database goes away once the host took the message.
    relay.cut();
    let err = s
        .complete("a", "<taken@x>", "inquiry", Some("IQ1"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("kept in"), "{err}");
    assert!(!err.contains(db.dsn.password.expose()), "{err}");
    // The next run's store records it before anything else: the message is done, not retried;
    // the half line did not swallow it.
    let next = open(&db, dir.path());
    assert!(matches!(
        next.claim("a", "<taken@x>", None, &Owner::new_run())
            .unwrap(),
        Claim::Done { .. }
    ));
    assert_eq!(
        next.entry("a", "<taken@x>")
            .unwrap()
            .unwrap()
            .sd_number
            .as_deref(),
        Some("IQ1")
    );
    assert_eq!(std::fs::read(journal_of(dir.path())).unwrap(), b"");
    let rejected =
        std::fs::read_to_string(dir.path().join("pcr_email-unrecorded.jsonl.rejected")).unwrap();
    assert_eq!(rejected, "{\"account\":\"a\",\"ke\n");
}

#[test]
fn a_record_the_database_refuses_for_good_is_not_journaled_and_does_not_block_the_replay() {
    let db = test_db("refused");
    let dir = tempfile::tempdir().unwrap();
    let s = open(&db, dir.path());
    let run = Owner::new_run();
    // An SD number longer than 255 characters is recorded whole.
    let long_sd = "SD-".repeat(200);
    assert_eq!(s.claim("a", "<long@x>", None, &run).unwrap(), Claim::New);
    s.complete("a", "<long@x>", "inquiry", Some(&long_sd))
        .unwrap();
    assert_eq!(
        s.entry("a", "<long@x>").unwrap().unwrap().sd_number,
        Some(long_sd)
    );
    // A record the database refuses (here: its table is away) is an error, not a journal
    // entry that every later open would replay in vain.
    assert_eq!(s.claim("a", "<taken@x>", None, &run).unwrap(), Claim::New);
    let mut admin = mysql::Conn::new(admin_opts(&db)).unwrap();
    admin
        .query_drop("RENAME TABLE pcr_email_ledger TO pcr_email_ledger_away")
        .unwrap();
    let err = s
        .complete("a", "<taken@x>", "inquiry", Some("IQ1"))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("kept in"), "{err}");
    admin
        .query_drop("RENAME TABLE pcr_email_ledger_away TO pcr_email_ledger")
        .unwrap();
    assert!(
        !journal_of(dir.path()).exists()
            || std::fs::read(journal_of(dir.path())).unwrap().is_empty()
    );
    // A journal holding an entry the database will never take (an outcome past TEXT's 64 KiB)
    // between two good ones: the good ones are recorded, the bad one moves aside, the store
    // opens and works.
    let entry = |key: &str, outcome: &str| {
        serde_json::json!({"account": "a", "key": key, "outcome": outcome, "sd_number": "IQ9"})
            .to_string()
    };
    let bad = entry("<bad@x>", &"x".repeat(70_000));
    std::fs::write(
        journal_of(dir.path()),
        format!(
            "{}\n{bad}\n{}\n",
            entry("<one@x>", "inquiry"),
            entry("<two@x>", "inquiry")
        ),
    )
    .unwrap();
    let next = open(&db, dir.path());
    for key in ["<one@x>", "<two@x>"] {
        assert!(matches!(
            next.claim("a", key, None, &Owner::new_run()).unwrap(),
            Claim::Done { .. }
        ));
    }
    assert_eq!(next.entry("a", "<bad@x>").unwrap(), None);
    assert_eq!(std::fs::read(journal_of(dir.path())).unwrap(), b"");
    let rejected =
        std::fs::read_to_string(dir.path().join("pcr_email-unrecorded.jsonl.rejected")).unwrap();
    assert_eq!(rejected, format!("{bad}\n"));
}

#[test]
fn a_journal_that_cannot_be_read_fails_the_open() {
    let db = test_db("unreadable");
    let dir = tempfile::tempdir().unwrap();
    // A directory where the journal should be: it cannot be opened, read or locked.
    std::fs::create_dir(journal_of(dir.path())).unwrap();
    let Err(err) = StateStore::open_database(&db.dsn, dir.path()) else {
        panic!("the open must fail");
    };
    assert!(err.to_string().contains("journal"), "{err}");
}

#[test]
fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let mut dsn = base_dsn();
    dsn.port = common::spare_port(7);
    let dir = tempfile::tempdir().unwrap();
    let err = StateStore::open_database(&dsn, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("STATE_DSN"), "{err}");
    assert!(err.contains(&dsn.label()), "{err}");
    assert!(!err.contains(dsn.password.expose()), "{err}");
}

#[test]
fn the_ini_state_dsn_with_an_encrypted_password_moves_the_store_into_the_database() {
    let db = test_db("ini");
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("pcr360-email.key");
    let keys = pcr_email::config::secrets::KeyStore::open(&key_file).unwrap();
    let encrypted = keys.encrypt(db.dsn.password.expose());
    let ini = dir.path().join("pcr360.ini");
    std::fs::write(
        &ini,
        format!(
            "[production]\nemail.KEY_FILE = \"{}\"\nemail.STATE_DIR = \"{}\"\n\
             email.STATE_DSN = \"mysql://{}:{}@{}:{}/{}\"\n",
            key_file.display(),
            dir.path().join("state").display(),
            db.dsn.user,
            encrypted,
            db.dsn.host,
            db.dsn.port,
            db.dsn.database
        ),
    )
    .unwrap();
    let settings = pcr_email::config::Settings::load(&ini, "production").unwrap();
    assert!(settings.state_dsn.is_some());
    let s = StateStore::open(&settings.state_dir, settings.state_dsn.as_ref()).unwrap();
    assert!(s.location().starts_with("mysql://"), "{}", s.location());
    s.alert_once("via the ini").unwrap();
    assert!(!dir.path().join("state").join("pcr_email.sqlite").exists());
    let direct = open(&db, dir.path());
    assert!(!direct.alert_once("via the ini").unwrap());
    // Without STATE_DSN the same STATE_DIR is SQLite again.
    std::fs::write(
        &ini,
        format!(
            "[production]\nemail.STATE_DIR = \"{}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let settings = pcr_email::config::Settings::load(&ini, "production").unwrap();
    let s = StateStore::open(&settings.state_dir, settings.state_dsn.as_ref()).unwrap();
    assert!(
        s.location().ends_with("pcr_email.sqlite"),
        "{}",
        s.location()
    );
}

#[test]
fn migrate_copies_a_sqlite_store_once_and_refuses_a_filled_database() {
    let db = test_db("migrate");
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    {
        let s = StateStore::open(&state_dir, None).unwrap();
        let run = Owner::new_run();
        for i in 0..50 {
            let key = format!("<old{i}@x>");
            s.claim("7", &key, Some(&format!("uid:{i}")), &run).unwrap();
            s.complete("7", &key, "inquiry", Some(&format!("IQ{i:05}")))
                .unwrap();
        }
        s.fail("7", "<flaky@x>", &run, "host threw").unwrap();
        s.skip("7", "<blocked@x>", "blocked sender").unwrap();
        s.set_imap_mark("7", "INBOX", 9, 51).unwrap();
        s.set_kv("gmail-history", "8", "12345").unwrap();
        s.save_token("8", "oauth_refresh", "ENC:v1:k:dG9rZW4=", None)
            .unwrap();
        s.record_sent("<sent@pcr>", "SO201700043", "7").unwrap();
        s.put_pending_auth("state-1", "{}", now_secs() + 600)
            .unwrap();
        s.alert_once("told sysadmin").unwrap();
    }
    let to = format!(
        "mysql://{}:{}@{}:{}/{}",
        db.dsn.user,
        db.dsn.password.expose(),
        db.dsn.host,
        db.dsn.port,
        db.dsn.database
    );
    let migrate = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_pcr-email-state"))
            .args(["migrate", "--from"])
            .arg(&state_dir)
            .args(["--to", &to])
            .output()
            .unwrap()
    };
    let out = migrate();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ledger 52"), "{stdout}");
    assert!(!stdout.contains(db.dsn.password.expose()), "{stdout}");

    // The database store now answers as the SQLite one did: nothing is handed over again.
    let s = open(&db, dir.path());
    let next = Owner::new_run();
    for i in 0..50 {
        assert!(matches!(
            s.claim(
                "7",
                &format!("<old{i}@x>"),
                Some(&format!("uid:{i}")),
                &next
            )
            .unwrap(),
            Claim::Done {
                same_copy: true,
                ..
            }
        ));
    }
    assert_eq!(
        s.claim("7", "<flaky@x>", None, &next).unwrap(),
        Claim::Retry { attempts: 1 }
    );
    assert!(s
        .claim("7", "<blocked@x>", None, &next)
        .unwrap()
        .is_skipped());
    assert_eq!(s.imap_mark("7", "INBOX").unwrap(), Some((9, 51)));
    assert_eq!(
        s.get_kv("gmail-history", "8").unwrap().as_deref(),
        Some("12345")
    );
    assert_eq!(
        s.load_token("8", "oauth_refresh")
            .unwrap()
            .unwrap()
            .value
            .expose(),
        "ENC:v1:k:dG9rZW4="
    );
    assert_eq!(
        s.sent_sd_number("sent@pcr").unwrap().as_deref(),
        Some("SO201700043")
    );
    assert!(matches!(
        s.take_pending_auth("state-1").unwrap(),
        PendingAuth::Valid(_)
    ));
    assert!(!s.alert_once("told sysadmin").unwrap());
    assert_eq!(
        s.entry("7", "<old3@x>")
            .unwrap()
            .unwrap()
            .sd_number
            .as_deref(),
        Some("IQ00003")
    );

    // A second copy into the now filled database is refused and changes nothing.
    let out = migrate();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already holds"), "{stderr}");
    assert!(!stderr.contains(db.dsn.password.expose()), "{stderr}");
    assert_eq!(s.counts("7").unwrap().done, 50);
}

fn migrate_cmd(db: &TestDb, from: &Path) -> std::process::Output {
    let to = format!(
        "mysql://{}:{}@{}:{}/{}",
        db.dsn.user,
        db.dsn.password.expose(),
        db.dsn.host,
        db.dsn.port,
        db.dsn.database
    );
    std::process::Command::new(env!("CARGO_BIN_EXE_pcr-email-state"))
        .args(["migrate", "--from"])
        .arg(from)
        .args(["--to", &to])
        .output()
        .unwrap()
}

#[test]
fn migrate_copies_daily_alerts_and_leaves_the_sqlite_file_byte_for_byte() {
    let db = test_db("migdaily");
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    {
        let s = StateStore::open(&state_dir, None).unwrap();
        assert!(s.once_per_day("imap 7 unreachable").unwrap());
        assert!(s.alert_once("told sysadmin").unwrap());
    }
    let file = state_dir.join("pcr_email.sqlite");
    let before = std::fs::read(&file).unwrap();
    let out = migrate_cmd(&db, &state_dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the SQLite file changed"
    );
    // Today's notice was given already: the database store does not repeat it.
    let s = open(&db, dir.path());
    assert!(!s.once_per_day("imap 7 unreachable").unwrap());
    assert!(!s.alert_once("told sysadmin").unwrap());
    let mut admin = mysql::Conn::new(admin_opts(&db)).unwrap();
    let daily: Option<i64> = admin
        .query_first("SELECT COUNT(*) FROM pcr_email_alerts WHERE daily=1")
        .unwrap();
    assert_eq!(daily, Some(1));
}

#[test]
fn migrate_refuses_an_older_sqlite_store_and_leaves_it_unchanged() {
    let db = test_db("migold");
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    drop(StateStore::open(&state_dir, None).unwrap());
    let file = state_dir.join("pcr_email.sqlite");
    {
        // A store last written by an older release (schema version 1).
        let c = rusqlite::Connection::open(&file).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
    }
    let before = std::fs::read(&file).unwrap();
    let out = migrate_cmd(&db, &state_dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("schema version 1 is older"), "{stderr}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the SQLite file changed"
    );
}

#[test]
fn migrate_refuses_a_database_whose_only_rows_are_mailbox_leases() {
    let db = test_db("miglease");
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    {
        let s = StateStore::open(&state_dir, None).unwrap();
        s.set_kv("gmail-history", "8", "12345").unwrap();
    }
    // A server already running against the database holds a mailbox, nothing else.
    let live = open(&db, dir.path());
    assert_eq!(
        live.take_mailbox("imap:desk", &remote_owner("other-run"))
            .unwrap(),
        None
    );
    let out = migrate_cmd(&db, &state_dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already holds"), "{stderr}");
    assert_eq!(live.get_kv("gmail-history", "8").unwrap(), None);
}

#[test]
fn a_mailbox_is_read_by_one_run_at_a_time_and_a_dead_run_loses_it() {
    let db = test_db("mailbox");
    let dir = tempfile::tempdir().unwrap();
    let short = open(&db, dir.path()).with_lease(Duration::from_millis(800));
    let other = open(&db, dir.path());
    let remote = remote_owner("remote-run");
    let me = Owner::new_run();
    assert_eq!(short.take_mailbox("imap:desk", &remote).unwrap(), None);
    // Taken again by its own run: still its own.
    assert_eq!(short.take_mailbox("imap:desk", &remote).unwrap(), None);
    assert_eq!(
        other.take_mailbox("imap:desk", &me).unwrap().as_deref(),
        Some("remote-run")
    );
    // Another mailbox is free.
    assert_eq!(other.take_mailbox("imap:other", &me).unwrap(), None);
    // Renewed with the run's claims; once its renewals stop, the lease runs out.
    short.renew_lease(&remote).unwrap();
    assert!(other.take_mailbox("imap:desk", &me).unwrap().is_some());
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(other.take_mailbox("imap:desk", &me).unwrap(), None);
    // Given back at the end of a run; a dead process of this machine loses it at once.
    other.release_owned(&me).unwrap();
    let gone = me.sibling("gone-run", 0, 1);
    assert_eq!(short.take_mailbox("imap:desk", &gone).unwrap(), None);
    assert_eq!(other.take_mailbox("imap:desk", &me).unwrap(), None);
    // With SQLite (one server) every run may read: its messages' claims keep runs apart.
    let sqlite = StateStore::open(&dir.path().join("sqlite"), None).unwrap();
    assert_eq!(sqlite.take_mailbox("imap:desk", &remote).unwrap(), None);
    assert_eq!(sqlite.take_mailbox("imap:desk", &me).unwrap(), None);
}

#[test]
fn ssl_required_verifies_the_server_against_the_given_ca() {
    let db = test_db("tls");
    let dir = tempfile::tempdir().unwrap();
    // A user the server admits over TLS only.
    let user = format!("tls_{:08x}", rand_u32());
    let ctl = common::env("PCR_MARIADB_CTL");
    let sql = |statement: String| {
        let out = std::process::Command::new(&ctl)
            .args(["sql", &statement])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for host in ["127.0.0.1", "localhost"] {
        sql(format!(
            "CREATE USER '{user}'@'{host}' IDENTIFIED BY 'tls-pw-1' REQUIRE SSL; \
             GRANT ALL ON `{}`.* TO '{user}'@'{host}'",
            db.dsn.database
        ));
    }
    let dsn = |query: &str| {
        let text = format!(
            "mysql://{user}:tls-pw-1@localhost:{}/{}{query}",
            db.dsn.port, db.dsn.database
        );
        Dsn::parse(&text, |_| unreachable!()).unwrap()
    };
    let ca = common::env("PCR_TEST_CA");
    let s = StateStore::open_database(&dsn(&format!("?ssl=required&ca={ca}")), dir.path())
        .expect("TLS with the test CA");
    s.set_kv("tls", "k", "over TLS").unwrap();
    assert_eq!(s.get_kv("tls", "k").unwrap().as_deref(), Some("over TLS"));
    // Without TLS the server refuses this user: the store above did use TLS.
    let plain = StateStore::open_database(&dsn(""), dir.path()).unwrap_err();
    assert!(plain.to_string().contains("STATE_DSN"), "{plain}");
    // A CA that did not sign the server's certificate: refused before anything is sent.
    let other = std::path::Path::new(&ca).with_file_name("other.pem");
    let err = StateStore::open_database(
        &dsn(&format!("?ssl=required&ca={}", other.display())),
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("STATE_DSN"), "{err}");
    assert!(!err.contains("tls-pw-1"), "{err}");
    for host in ["127.0.0.1", "localhost"] {
        sql(format!("DROP USER '{user}'@'{host}'"));
    }
}

#[test]
fn migrate_takes_the_state_dir_and_an_encrypted_dsn_from_the_ini() {
    let db = test_db("migini");
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    {
        let s = StateStore::open(&state_dir, None).unwrap();
        let run = Owner::new_run();
        s.claim("9", "<a@x>", None, &run).unwrap();
        s.complete("9", "<a@x>", "threaded", Some("SO1")).unwrap();
    }
    let key_file = dir.path().join("pcr360-email.key");
    let keys = pcr_email::config::secrets::KeyStore::open(&key_file).unwrap();
    let ini = dir.path().join("pcr360.ini");
    std::fs::write(
        &ini,
        format!(
            "[prod]\nemail.KEY_FILE = \"{}\"\nemail.STATE_DIR = \"{}\"\n\
             email.STATE_DSN = \"mysql://{}:{}@{}:{}/{}\"\n",
            key_file.display(),
            state_dir.display(),
            db.dsn.user,
            keys.encrypt(db.dsn.password.expose()),
            db.dsn.host,
            db.dsn.port,
            db.dsn.database
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pcr-email-state"))
        .args(["migrate", "-e", "prod", "-i"])
        .arg(&ini)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ledger 1"), "{stdout}");
    let s = open(&db, dir.path());
    assert_eq!(
        s.claim("9", "<a@x>", None, &Owner::new_run()).unwrap(),
        Claim::Done {
            outcome: "threaded".into(),
            same_copy: true
        }
    );
    // A DSN that is not one is refused without echoing it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pcr-email-state"))
        .args(["migrate", "--from"])
        .arg(&state_dir)
        .args(["--to", "postgres://u:hunter2@h/db"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("mysql://"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn a_run_on_another_server_with_the_same_host_name_and_machine_id_keeps_its_claim() {
    // Cloned VMs keep the machine id and host name, every host's first PID namespace has the
    // same link: only the boot id tells the other server apart, and its run may be alive.
    let db = test_db("clone");
    let dir = tempfile::tempdir().unwrap();
    let s = open(&db, dir.path());
    let me = Owner::new_run();
    let twin = Owner::from_parts(
        "twin-run",
        me.host(),
        me.machine_id(),
        "another-servers-boot-id",
        me.pid_ns(),
        me.pid(),
        me.start_ticks(),
    );
    assert_eq!(s.claim("1", "k", None, &twin).unwrap(), Claim::New);
    assert_eq!(s.claim("1", "k", None, &me).unwrap(), Claim::Busy);
    assert_eq!(s.take_mailbox("imap:desk", &twin).unwrap(), None);
    assert_eq!(
        s.take_mailbox("imap:desk", &me).unwrap().as_deref(),
        Some("twin-run")
    );
}

#[test]
fn a_run_whose_claim_was_taken_over_cannot_fail_the_new_owners_message() {
    let db = test_db("stale");
    let dir = tempfile::tempdir().unwrap();
    let s = open(&db, dir.path());
    let me = Owner::new_run();
    let stale = me.sibling("stale-run", 0, 1);
    assert_eq!(s.claim("1", "k", None, &stale).unwrap(), Claim::New);
    assert_eq!(
        s.claim("1", "k", None, &me).unwrap(),
        Claim::Retry { attempts: 1 }
    );
    // The old run reports its failure late: the new owner's claim stays as it is.
    assert_eq!(s.fail("1", "k", &stale, "host threw").unwrap(), 1);
    let entry = s.entry("1", "k").unwrap().unwrap();
    assert_eq!(entry.state, LedgerState::InProgress);
    assert_eq!(entry.owner.as_deref(), Some(me.run_id()));
    assert_eq!(
        s.claim("1", "k", None, &Owner::new_run()).unwrap(),
        Claim::Busy
    );
    // Its own failure counts.
    assert_eq!(s.fail("1", "k", &me, "host threw").unwrap(), 2);
}

#[test]
fn two_first_token_writes_with_no_version_expected_do_not_both_win() {
    let db = test_db("tokenrace");
    let dir = tempfile::tempdir().unwrap();
    let rounds = 40;
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let (dsn, dir, barrier) = (db.dsn.clone(), dir.path().to_path_buf(), barrier.clone());
            thread::spawn(move || {
                let s = StateStore::open_database(&dsn, &dir).unwrap();
                (0..rounds)
                    .map(|i| {
                        barrier.wait();
                        let account = format!("a{i}");
                        let value = format!("token-of-{t}");
                        s.replace_token(&account, "refresh", None, &value, None)
                            .unwrap()
                            .is_some()
                    })
                    .collect::<Vec<bool>>()
            })
        })
        .collect();
    let won: Vec<Vec<bool>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (a, b)) in won[0].iter().zip(&won[1]).enumerate() {
        assert!(
            a != b,
            "round {i}: exactly one first write wins, got {a} and {b}"
        );
    }
}

/// A Service Desk host whose first Inquiry takes the ledger away (as a database that stops
/// refusing rows would): every later claim and record of the run fails.
struct LedgerGoesAway {
    rows: serde_json::Value,
    admin: mysql::Conn,
    inquiries: usize,
    logged: Vec<String>,
}

impl pcr_email::host::Host for LedgerGoesAway {
    fn email_accounts(&mut self) -> pcr_email::Result<serde_json::Value> {
        Ok(self.rows.clone())
    }
    fn blocked_emails(&mut self) -> pcr_email::Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn create_inquiry(&mut self, _mail: &pcr_email::host::Mail<'_>) -> pcr_email::Result<String> {
        self.inquiries += 1;
        if self.inquiries == 1 {
            self.admin
                .query_drop("RENAME TABLE pcr_email_ledger TO pcr_email_ledger_away")
                .unwrap();
        }
        Ok(format!("IQ{}", self.inquiries))
    }
    fn add_to_thread(
        &mut self,
        _sd_number: &str,
        _mail: &pcr_email::host::Mail<'_>,
    ) -> pcr_email::Result<bool> {
        Ok(false)
    }
    fn deliver_message(
        &mut self,
        _message: &pcr_email::host::InAppMessage,
    ) -> pcr_email::Result<()> {
        Ok(())
    }
    fn log_error(&mut self, message: &str, _context: &serde_json::Value) {
        self.logged.push(message.to_string());
    }
}

#[test]
fn claims_and_records_the_database_refuses_put_the_mailbox_in_errors() {
    let db = test_db("summary");
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    for sub in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    for n in 0..3 {
        std::fs::write(
            maildir
                .join("new")
                .join(format!("17000000{n:02}.M1P1.test")),
            format!(
                "From: user{n}@example.org\r\nTo: desk@example.edu\r\nSubject: Room {n}\r\n\
                 Message-ID: <sum{n}@example.org>\r\n\r\nThe projector.\r\n"
            ),
        )
        .unwrap();
    }
    let ini = dir.path().join("pcr360.ini");
    std::fs::write(
        &ini,
        format!(
            "[prod]\nemail.EMAIL = \"noreply@example.edu\"\nemail.STATE_DIR = \"{}\"\n\
             email.STATE_DSN = \"mysql://{}:{}@{}:{}/{}\"\n",
            dir.path().join("state").display(),
            db.dsn.user,
            db.dsn.password.expose(),
            db.dsn.host,
            db.dsn.port,
            db.dsn.database
        ),
    )
    .unwrap();
    let rows = serde_json::json!([{
        "RECID": 10, "TENANTS_RECID": 1, "ACCOUNT_TYPE": "service_desk",
        "EMAIL": "desk@example.edu", "INCOMING_MAILBOX_TYPE": "MAILDIR",
        "INCOMING_PATH": maildir.display().to_string(), "PROCESSED_ACTION": "seen",
    }]);
    let mut manager = pcr_email::manager::Manager::open(&ini, "prod").unwrap();
    let mut host = LedgerGoesAway {
        rows,
        admin: mysql::Conn::new(admin_opts(&db)).unwrap(),
        inquiries: 0,
        logged: Vec::new(),
    };
    let summary = manager
        .event_check_mail(
            &mut host,
            &serde_json::json!({"host": "pcr360.example.edu"}),
        )
        .map(|s| serde_json::to_value(s).unwrap())
        .unwrap();
    // Nothing else of a Maildir run touches the ledger after the first Inquiry: only the
    // failed record and claims can tell the summary.
    assert_eq!(summary["status"], "errors", "{summary}");
    let errors = summary["mailboxes"][0]["errors"].to_string();
    assert!(errors.contains("state database"), "{summary}");
    assert!(!errors.contains(db.dsn.password.expose()), "{summary}");
    assert!(!host.logged.is_empty());
}
