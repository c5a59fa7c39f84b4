//! The state store's guarantees seen from its users: leases, token versions, pending OAuth
//! authorizations, alerts across connections, durability across reopen, file safety and clear
//! errors.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pcr_email::state::{Claim, LedgerState, Owner, PendingAuth, StateStore, DB_FILE};
use pcr_email::Error;

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A run on another machine: its liveness can only be judged by its lease.
fn remote_owner(name: &str) -> Owner {
    Owner::from_parts(
        name,
        "other-host",
        "other-machine",
        "other-boot",
        "pid:[1]",
        4242,
        1,
    )
}

#[test]
fn a_live_owner_keeps_its_claim_until_its_lease_runs_out() {
    let tmp = tempfile::tempdir().unwrap();
    let short = StateStore::open(tmp.path(), None)
        .unwrap()
        .with_lease(Duration::from_millis(600));
    let other = StateStore::open(tmp.path(), None).unwrap();
    let remote = remote_owner("remote-run");
    let me = Owner::new_run();

    assert_eq!(short.claim("1", "k", None, &remote).unwrap(), Claim::New);
    // Renewed while it works: still owned well past the first lease.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(other.claim("1", "k", None, &me).unwrap(), Claim::Busy);
        assert_eq!(short.renew_lease(&remote).unwrap(), 1);
        thread::sleep(Duration::from_millis(100));
    }
    // Stops renewing (hung, or its machine is gone): taken over once the lease ran out.
    thread::sleep(Duration::from_millis(700));
    assert_eq!(
        other.claim("1", "k", None, &me).unwrap(),
        Claim::Retry { attempts: 1 }
    );
    let e = other.entry("1", "k").unwrap().unwrap();
    assert_eq!(e.owner.as_deref(), Some(me.run_id()));
    assert!(e.last_error.unwrap().contains("lease"));
    // The old owner coming back does not take it back from its new, live owner.
    assert_eq!(short.claim("1", "k", None, &remote).unwrap(), Claim::Busy);
}

#[test]
fn a_claim_renews_all_leases_of_its_run() {
    let tmp = tempfile::tempdir().unwrap();
    let s = StateStore::open(tmp.path(), None)
        .unwrap()
        .with_lease(Duration::from_millis(500));
    let remote = remote_owner("remote-run");
    let me = Owner::new_run();
    assert_eq!(s.claim("1", "first", None, &remote).unwrap(), Claim::New);
    for i in 0..8 {
        thread::sleep(Duration::from_millis(150));
        assert_eq!(
            s.claim("1", &format!("next-{i}"), None, &remote).unwrap(),
            Claim::New
        );
    }
    assert_eq!(s.claim("1", "first", None, &me).unwrap(), Claim::Busy);
}

#[test]
fn a_run_from_a_previous_boot_of_this_machine_is_dead_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let s = StateStore::open(tmp.path(), None).unwrap();
    let me = Owner::new_run();
    let before_reboot = Owner::from_parts(
        "before-reboot",
        me.host(),
        me.machine_id(),
        "an-older-boot-id",
        me.pid_ns(),
        me.pid(),
        me.start_ticks(),
    );
    assert_eq!(s.claim("1", "k", None, &before_reboot).unwrap(), Claim::New);
    assert_eq!(
        s.claim("1", "k", None, &me).unwrap(),
        Claim::Retry { attempts: 1 }
    );
}

#[test]
fn a_recycled_pid_does_not_keep_a_dead_runs_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let s = StateStore::open(tmp.path(), None).unwrap();
    let me = Owner::new_run();
    // Our own pid, but recorded with another start time: the pid was reused by this process.
    let previous = me.sibling("old-run", me.pid(), me.start_ticks().saturating_sub(1));
    assert_eq!(s.claim("1", "k", None, &previous).unwrap(), Claim::New);
    assert_eq!(
        s.claim("1", "k", None, &me).unwrap(),
        Claim::Retry { attempts: 1 }
    );
}

#[test]
fn a_message_that_keeps_killing_its_run_reaches_the_quarantine_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let s = StateStore::open(tmp.path(), None).unwrap();
    let me = Owner::new_run();
    let mut last = None;
    for n in 0..3u64 {
        // Each run dies while holding the message (simulated by a pid that is not running).
        let dying = me.sibling(format!("run-{n}"), me.pid(), me.start_ticks() + 1 + n);
        let claim = s.claim("1", "poison", None, &dying).unwrap();
        if n == 0 {
            assert_eq!(claim, Claim::New);
        }
        last = Some(s.claim("1", "poison", None, &me).unwrap());
        s.release("1", "poison", &me).unwrap();
    }
    assert_eq!(last, Some(Claim::Retry { attempts: 3 }));
    s.quarantine("1", "poison", "the run stopped 3 times while handling it")
        .unwrap();
    assert_eq!(
        s.claim("1", "poison", None, &me).unwrap(),
        Claim::Quarantined
    );
}

#[test]
fn a_slower_token_refresh_never_overwrites_a_newer_token() {
    let tmp = tempfile::tempdir().unwrap();
    let a = StateStore::open(tmp.path(), None).unwrap();
    let b = StateStore::open(tmp.path(), None).unwrap();
    assert_eq!(a.load_token("7", "refresh").unwrap(), None);
    assert!(a
        .save_token_if_newer("7", "refresh", "ENC:newer", Some(100), 2000)
        .unwrap());
    assert!(!b
        .save_token_if_newer("7", "refresh", "ENC:older", Some(50), 1000)
        .unwrap());
    assert!(!b
        .save_token_if_newer("7", "refresh", "ENC:same", Some(50), 2000)
        .unwrap());
    let t = b.load_token("7", "refresh").unwrap().unwrap();
    assert_eq!(
        (t.value.expose(), t.expires_at, t.version),
        ("ENC:newer", Some(100), 2000)
    );
    // Tokens are per account and kind.
    assert_eq!(a.load_token("8", "refresh").unwrap(), None);
    assert_eq!(a.load_token("7", "access").unwrap(), None);

    // Many threads, each with its own connection, racing with interleaved versions.
    let dir = tmp.path().to_path_buf();
    let barrier = Arc::new(Barrier::new(6));
    let handles: Vec<_> = (0..6i64)
        .map(|t| {
            let dir = dir.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let s = StateStore::open(&dir, None).unwrap();
                barrier.wait();
                for i in 0..40i64 {
                    let version = 10_000 + i * 6 + t;
                    s.save_token_if_newer("race", "refresh", &format!("v{version}"), None, version)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let t = a.load_token("race", "refresh").unwrap().unwrap();
    let max = 10_000 + 39 * 6 + 5;
    assert_eq!(
        (t.version, t.value.expose()),
        (max, format!("v{max}").as_str())
    );
}

#[test]
fn compare_and_swap_loses_no_update_under_contention() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let threads = 4;
    let rounds = 25;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let dir = dir.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let s = StateStore::open(&dir, None).unwrap();
                barrier.wait();
                let mut lost_races = 0;
                for _ in 0..rounds {
                    loop {
                        let current = s.load_token("7", "counter").unwrap();
                        let n: u64 = current
                            .as_ref()
                            .map_or(0, |t| t.value.expose().parse().unwrap());
                        let expected = current.map(|t| t.version);
                        match s
                            .replace_token("7", "counter", expected, &(n + 1).to_string(), None)
                            .unwrap()
                        {
                            Some(v) => {
                                assert!(expected.is_none_or(|e| v > e));
                                break;
                            }
                            None => lost_races += 1,
                        }
                    }
                }
                lost_races
            })
        })
        .collect();
    let lost: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let s = StateStore::open(&dir, None).unwrap();
    let t = s.load_token("7", "counter").unwrap().unwrap();
    assert_eq!(t.value.expose(), (threads * rounds).to_string());
    eprintln!("compare-and-swap retries: {lost}");
    // A stale expectation is refused and changes nothing.
    assert_eq!(
        s.replace_token("7", "counter", Some(t.version - 1), "0", None)
            .unwrap(),
        None
    );
    assert_eq!(
        s.replace_token("7", "counter", None, "0", None).unwrap(),
        None
    );
    let saved = s.save_token("7", "counter", "reset", None).unwrap();
    assert!(saved > t.version);
    assert!(s.delete_token("7", "counter").unwrap());
    assert_eq!(s.load_token("7", "counter").unwrap(), None);
}

#[test]
fn a_pending_authorization_is_taken_once_and_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let a = StateStore::open(tmp.path(), None).unwrap();
    let b = StateStore::open(tmp.path(), None).unwrap();
    let data = r#"{"recid":7,"verifier":"pkce-verifier-value","redirect":"https://x/cb"}"#;
    a.put_pending_auth("state-1", data, now_secs() + 600)
        .unwrap();
    a.put_pending_auth("state-2", "{}", now_secs() - 1).unwrap();

    let taken = b.take_pending_auth("state-1").unwrap();
    match &taken {
        PendingAuth::Valid(d) => assert_eq!(d.expose(), data),
        other => panic!("expected the data, got {other:?}"),
    }
    assert!(!format!("{taken:?}").contains("pkce-verifier-value"));
    // A replayed callback finds nothing, from any connection.
    assert_eq!(
        a.take_pending_auth("state-1").unwrap(),
        PendingAuth::Unknown
    );
    assert_eq!(
        b.take_pending_auth("state-1").unwrap(),
        PendingAuth::Unknown
    );
    // An expired one is told apart from an unknown one, once.
    assert_eq!(
        b.take_pending_auth("state-2").unwrap(),
        PendingAuth::Expired
    );
    assert_eq!(
        b.take_pending_auth("state-2").unwrap(),
        PendingAuth::Unknown
    );
    assert_eq!(b.take_pending_auth("never").unwrap(), PendingAuth::Unknown);
}

#[test]
fn a_pending_authorization_raced_by_two_callbacks_is_given_to_one() {
    let tmp = tempfile::tempdir().unwrap();
    StateStore::open(tmp.path(), None)
        .unwrap()
        .put_pending_auth("st", "data", now_secs() + 600)
        .unwrap();
    let barrier = Arc::new(Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let dir = tmp.path().to_path_buf();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let s = StateStore::open(&dir, None).unwrap();
                barrier.wait();
                matches!(s.take_pending_auth("st").unwrap(), PendingAuth::Valid(_))
            })
        })
        .collect();
    let winners = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|won| *won)
        .count();
    assert_eq!(winners, 1);
}

#[test]
fn an_alert_is_raised_once_across_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let dir = tmp.path().to_path_buf();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let s = StateStore::open(&dir, None).unwrap();
                barrier.wait();
                s.alert_once("quarantine:7:<poison@x>").unwrap()
            })
        })
        .collect();
    let raised = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|r| *r)
        .count();
    assert_eq!(raised, 1);
    let s = StateStore::open(tmp.path(), None).unwrap();
    assert!(!s.alert_once("quarantine:7:<poison@x>").unwrap());
    assert!(s.alert_once("oversized:7:<big@x>").unwrap());
    // Once the problem is resolved, the next occurrence alerts again.
    assert!(s.clear_alert("quarantine:7:<poison@x>").unwrap());
    assert!(s.alert_once("quarantine:7:<poison@x>").unwrap());
}

#[test]
fn everything_survives_closing_and_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("email-state");
    let run = Owner::new_run();
    {
        let s = StateStore::open(&dir, None).unwrap();
        assert_eq!(
            s.claim("7", "<a@x>", Some("1/5/10"), &run).unwrap(),
            Claim::New
        );
        s.complete("7", "<a@x>", "inquiry", Some("IQ00001"))
            .unwrap();
        assert_eq!(s.claim("7", "<b@x>", None, &run).unwrap(), Claim::New);
        assert_eq!(s.fail("7", "<b@x>", &run, "host threw").unwrap(), 1);
        s.set_imap_mark("7", "INBOX", 5, 11).unwrap();
        s.set_kv("pop3", "7", "cursor").unwrap();
        s.record_sent("<sd.1@pcr>", "SO201700043", "7").unwrap();
        s.save_token("7", "refresh", "ENC:v1:k:abc", Some(99))
            .unwrap();
        s.put_pending_auth("st", "data", now_secs() + 600).unwrap();
        assert!(s.alert_once("a").unwrap());
    }
    let s = StateStore::open(&dir, None).unwrap();
    let next = Owner::new_run();
    assert_eq!(
        s.claim("7", "<a@x>", None, &next).unwrap(),
        Claim::Done {
            outcome: "inquiry".into(),
            same_copy: true
        }
    );
    assert_eq!(
        s.claim("7", "<b@x>", None, &next).unwrap(),
        Claim::Retry { attempts: 1 }
    );
    assert_eq!(s.imap_mark("7", "INBOX").unwrap(), Some((5, 11)));
    assert_eq!(s.get_kv("pop3", "7").unwrap().as_deref(), Some("cursor"));
    assert_eq!(
        s.sent_sd_number("<sd.1@pcr>").unwrap().as_deref(),
        Some("SO201700043")
    );
    assert_eq!(
        s.load_token("7", "refresh")
            .unwrap()
            .unwrap()
            .value
            .expose(),
        "ENC:v1:k:abc"
    );
    assert!(matches!(
        s.take_pending_auth("st").unwrap(),
        PendingAuth::Valid(_)
    ));
    assert!(!s.alert_once("a").unwrap());
    let e = s.entry_by_ref("7", "1/5/10").unwrap().unwrap();
    assert_eq!((e.key.as_str(), e.state), ("<a@x>", LedgerState::Done));
}

#[test]
fn the_directory_and_files_are_shared_with_their_directorys_group_only() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    // As root, give the top directory another group (nogroup): what is created below takes it,
    // as the web server's group on a real installation.
    // SAFETY: geteuid never fails.
    let root = unsafe { libc::geteuid() } == 0;
    let group = if root {
        std::os::unix::fs::chown(tmp.path(), None, Some(65534)).unwrap();
        65534
    } else {
        fs::metadata(tmp.path()).unwrap().gid()
    };
    let dir = tmp.path().join("a/b/email-state");
    let s = StateStore::open(&dir, None).unwrap();
    s.set_kv("n", "k", "v").unwrap();
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let gid = |p: &std::path::Path| fs::metadata(p).unwrap().gid();
    for d in [
        dir.as_path(),
        &tmp.path().join("a"),
        &tmp.path().join("a/b"),
    ] {
        assert_eq!(mode(d), 0o2770, "{}", d.display());
        assert_eq!(gid(d), group, "{}", d.display());
    }
    assert_eq!(s.path(), dir.join(DB_FILE));
    for name in [DB_FILE, "pcr_email.sqlite-wal", "pcr_email.sqlite-shm"] {
        assert_eq!(mode(&dir.join(name)), 0o660, "{name}");
        assert_eq!(gid(&dir.join(name)), group, "{name}");
    }
    drop(s);
    // A database someone made world-readable loses the others' access, not the group's.
    fs::set_permissions(dir.join(DB_FILE), fs::Permissions::from_mode(0o664)).unwrap();
    StateStore::open(&dir, None).unwrap();
    assert_eq!(mode(&dir.join(DB_FILE)), 0o660);
}

fn config_message(result: Result<StateStore, Error>) -> String {
    match result {
        Err(e @ Error::Config { .. }) => e.to_string(),
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("expected a configuration error, the store opened"),
    }
}

#[test]
fn unusable_locations_give_a_configuration_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    // STATE_DIR under a regular file cannot be created.
    let file = tmp.path().join("not-a-dir");
    fs::write(&file, "x").unwrap();
    let msg = config_message(StateStore::open(&file.join("state"), None));
    assert!(msg.contains("not-a-dir"), "{msg}");
    assert!(msg.contains("STATE_DIR"), "{msg}");

    // A file that is not a database.
    let dir = tmp.path().join("garbage");
    fs::create_dir(&dir).unwrap();
    fs::write(
        dir.join(DB_FILE),
        "this is not an SQLite database, not even close......",
    )
    .unwrap();
    let msg = config_message(StateStore::open(&dir, None));
    assert!(
        msg.contains(&dir.join(DB_FILE).display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("not a database"), "{msg}");

    // A database written by a newer version of the extension.
    let newer = tmp.path().join("newer");
    drop(StateStore::open(&newer, None).unwrap());
    let conn = rusqlite::Connection::open(newer.join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let msg = config_message(StateStore::open(&newer, None));
    assert!(msg.contains("schema version 99"), "{msg}");
}

#[test]
fn a_lock_held_too_long_gives_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let s = StateStore::open(tmp.path(), None)
        .unwrap()
        .with_busy_timeout(Duration::from_millis(300))
        .unwrap();
    let blocker = rusqlite::Connection::open(tmp.path().join(DB_FILE)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let err = s
        .claim("7", "<a@x>", None, &Owner::new_run())
        .expect_err("the write lock is held elsewhere");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(started.elapsed() < Duration::from_secs(10));
    match &err {
        Error::Mailbox(f) => {
            assert_eq!(f.account, "7");
            assert!(f.server.ends_with(DB_FILE), "{err}");
            assert!(f.message.contains("locked"), "{err}");
        }
        other => panic!("expected a mailbox error, got {other}"),
    }
    // Reads still work while another process writes (WAL).
    assert_eq!(s.entry("7", "<a@x>").unwrap(), None);
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(
        s.claim("7", "<a@x>", None, &Owner::new_run()).unwrap(),
        Claim::New
    );
}

#[test]
fn errors_never_carry_stored_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let s = StateStore::open(tmp.path(), None)
        .unwrap()
        .with_busy_timeout(Duration::from_millis(50))
        .unwrap();
    let blocker = rusqlite::Connection::open(tmp.path().join(DB_FILE)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let secret = "ENC:v1:k:TOPSECRETTOKEN";
    let errors = [
        s.save_token("7", "refresh", secret, None).unwrap_err(),
        s.save_token_if_newer("7", "refresh", secret, None, 5)
            .unwrap_err(),
        s.replace_token("7", "refresh", None, secret, None)
            .unwrap_err(),
        s.put_pending_auth("st", secret, now_secs() + 60)
            .unwrap_err(),
    ];
    for e in errors {
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("TOPSECRETTOKEN"), "{shown}");
    }
    blocker.execute_batch("ROLLBACK").unwrap();
    s.save_token("7", "refresh", secret, None).unwrap();
    assert!(!format!("{s:?}").contains("TOPSECRETTOKEN"));
}

#[test]
fn many_first_opens_of_a_fresh_database_at_once_all_succeed() {
    for round in 0..15 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let dir = dir.clone();
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    let s = StateStore::open(&dir, None)
                        .unwrap_or_else(|e| panic!("round {round}, opener {t}: {e}"));
                    s.claim("1", "k", None, &Owner::new_run()).unwrap()
                })
            })
            .collect();
        let claims: Vec<Claim> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(claims.iter().filter(|c| **c == Claim::New).count(), 1);
        assert_eq!(claims.iter().filter(|c| **c == Claim::Busy).count(), 7);
    }
}
