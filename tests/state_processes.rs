//! The state store under real concurrency: separate processes racing for the same messages,
//! a process killed with SIGKILL while it owns claims or while it writes.
//!
//! Each test re-executes this test binary running only itself, with `PCR_STATE_CHILD` telling
//! the copy which child role to play; without the variable the test is the parent.

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pcr_email::state::{Claim, LedgerState, Owner, StateStore};

const ROLE: &str = "PCR_STATE_CHILD";
const DIR: &str = "PCR_STATE_CHILD_DIR";
const WORKER: &str = "PCR_STATE_CHILD_WORKER";
const PARENT: &str = "PCR_STATE_CHILD_PARENT";

const WORKERS: usize = 8;
const KEYS: usize = 500;
const ACCOUNT: &str = "7";

fn role() -> Option<String> {
    env::var(ROLE).ok()
}

fn child_dir() -> PathBuf {
    PathBuf::from(env::var(DIR).expect("child needs its directory"))
}

/// A child ends itself as soon as the test that started it is gone (the parent failed or
/// was killed), so no child outlives its test.
fn exit_if_orphaned() {
    let parent: u32 = env::var(PARENT).unwrap().parse().unwrap();
    if std::os::unix::process::parent_id() != parent {
        std::process::exit(3);
    }
}

/// Child processes, killed and reaped when the parent test ends, passing or failing.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Starts a copy of this test binary running only `test` in role `role`.
fn spawn(test: &str, role: &str, dir: &Path, worker: usize) -> Child {
    Command::new(env::current_exe().expect("test binary path"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(WORKER, worker.to_string())
        .env(PARENT, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn child test process")
}

fn wait_for(path: &Path, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited ({status}) before {what}");
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn key(i: usize) -> String {
    format!("<msg-{i}@example.edu>")
}

/// Child: waits for the start signal, then claims every key (in its own order) and completes
/// the ones it won with its worker number as the outcome; writes what it saw.
fn race_child() {
    let dir = child_dir();
    let worker: usize = env::var(WORKER).unwrap().parse().unwrap();
    let store = StateStore::open(&dir, None).unwrap();
    let run = Owner::new_run();
    fs::write(dir.join(format!("ready-{worker}")), "").unwrap();
    while !dir.join("go").exists() {
        exit_if_orphaned();
        std::thread::sleep(Duration::from_millis(1));
    }
    // Everyone walks the same keys (half of them backwards), holding a few claims at a time
    // before completing them, so most keys are fought over while another run holds them.
    let mut order: Vec<usize> = (0..KEYS).collect();
    if worker % 2 == 1 {
        order.reverse();
    }
    let mut report = String::new();
    for batch in order.chunks(5) {
        let mut won = Vec::new();
        for &i in batch {
            let k = key(i);
            let line = match store
                .claim(ACCOUNT, &k, Some(&i.to_string()), &run)
                .unwrap()
            {
                Claim::New => {
                    won.push(k);
                    "new"
                }
                Claim::Busy => "busy",
                Claim::Done { .. } => "done",
                other => panic!("unexpected claim {other:?} for {k}"),
            };
            report.push_str(&format!("{i} {line}\n"));
        }
        if !won.is_empty() {
            std::thread::sleep(Duration::from_millis(3)); // the host at work
        }
        for k in won {
            store
                .complete(ACCOUNT, &k, format!("worker-{worker}").as_str(), None)
                .unwrap();
        }
        // Let the others at the lock (SQLite's busy wait favours whoever holds it).
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(store.release_owned(&run).unwrap(), 0);
    fs::write(dir.join(format!("report-{worker}.tmp")), report).unwrap();
    fs::rename(
        dir.join(format!("report-{worker}.tmp")),
        dir.join(format!("report-{worker}")),
    )
    .unwrap();
}

#[test]
fn each_message_is_claimed_by_exactly_one_of_eight_racing_processes() {
    if let Some(r) = role() {
        assert_eq!(r, "race");
        return race_child();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    // Created by the children themselves, all at once: concurrent first opens must agree.
    let mut children = Children(
        (0..WORKERS)
            .map(|w| {
                spawn(
                    "each_message_is_claimed_by_exactly_one_of_eight_racing_processes",
                    "race",
                    &dir,
                    w,
                )
            })
            .collect(),
    );
    fs::create_dir_all(&dir).unwrap();
    for (w, child) in children.0.iter_mut().enumerate() {
        wait_for(
            &dir.join(format!("ready-{w}")),
            "the child opened the store",
            child,
        );
    }
    fs::write(dir.join("go"), "").unwrap();
    for (w, child) in children.0.iter_mut().enumerate() {
        let status = child.wait().unwrap();
        assert!(status.success(), "worker {w} failed: {status}");
    }

    let mut winner: BTreeMap<usize, usize> = BTreeMap::new();
    let mut busy = 0;
    for w in 0..WORKERS {
        let report = fs::read_to_string(dir.join(format!("report-{w}"))).unwrap();
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.len(), KEYS, "worker {w} saw every key once");
        for line in lines {
            let (i, what) = line.split_once(' ').unwrap();
            let i: usize = i.parse().unwrap();
            match what {
                "new" => {
                    if let Some(other) = winner.insert(i, w) {
                        panic!("key {i} claimed by both worker {other} and worker {w}");
                    }
                }
                "busy" => busy += 1,
                _ => {}
            }
        }
    }
    assert_eq!(
        winner.keys().copied().collect::<BTreeSet<_>>(),
        (0..KEYS).collect::<BTreeSet<_>>(),
        "every key was claimed"
    );
    let store = StateStore::open(&dir, None).unwrap();
    for (i, w) in &winner {
        let e = store.entry(ACCOUNT, &key(*i)).unwrap().unwrap();
        assert_eq!(e.state, LedgerState::Done);
        assert_eq!(e.outcome, Some(format!("worker-{w}")), "key {i}");
        assert_eq!(e.attempts, 0);
    }
    let counts = store.counts(ACCOUNT).unwrap();
    assert_eq!(counts.done, KEYS as u64);
    assert_eq!(counts.in_progress + counts.failed + counts.quarantined, 0);
    let per_worker: BTreeMap<usize, usize> = winner.values().fold(BTreeMap::new(), |mut m, w| {
        *m.entry(*w).or_default() += 1;
        m
    });
    eprintln!("claims per worker: {per_worker:?}; busy answers: {busy}");
}

/// Child: claims ten keys, says so, then waits to be killed while owning them.
fn holder_child() {
    let dir = child_dir();
    let store = StateStore::open(&dir, None).unwrap();
    let run = Owner::new_run();
    for i in 0..10 {
        assert_eq!(
            store.claim(ACCOUNT, &key(i), None, &run).unwrap(),
            Claim::New
        );
    }
    fs::write(dir.join("holding"), run.run_id()).unwrap();
    loop {
        exit_if_orphaned();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn claims_of_a_process_killed_with_sigkill_are_taken_over_at_once() {
    if let Some(r) = role() {
        assert_eq!(r, "holder");
        return holder_child();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let store = StateStore::open(&dir, None).unwrap();
    assert_eq!(store.lease(), Duration::from_secs(15 * 60));
    let mut children = Children(vec![spawn(
        "claims_of_a_process_killed_with_sigkill_are_taken_over_at_once",
        "holder",
        &dir,
        0,
    )]);
    let child = &mut children.0[0];
    wait_for(&dir.join("holding"), "the child held its claims", child);
    let holder_run = fs::read_to_string(dir.join("holding")).unwrap();

    let me = Owner::new_run();
    for i in 0..10 {
        assert_eq!(
            store.claim(ACCOUNT, &key(i), None, &me).unwrap(),
            Claim::Busy,
            "a live owner keeps its claim"
        );
        assert_eq!(
            store.entry(ACCOUNT, &key(i)).unwrap().unwrap().owner,
            Some(holder_run.clone())
        );
    }

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Well within the 15-minute lease, the dead owner's claims are ours.
    for i in 0..10 {
        assert_eq!(
            store.claim(ACCOUNT, &key(i), None, &me).unwrap(),
            Claim::Retry { attempts: 1 },
            "key {i}"
        );
        let e = store.entry(ACCOUNT, &key(i)).unwrap().unwrap();
        assert_eq!(e.owner.as_deref(), Some(me.run_id()));
        assert!(
            e.last_error
                .as_deref()
                .unwrap_or("")
                .contains("stopped before it finished"),
            "{e:?}"
        );
        store
            .complete(ACCOUNT, &key(i), "inquiry", Some("IQ00001"))
            .unwrap();
    }
    let counts = store.counts(ACCOUNT).unwrap();
    assert_eq!((counts.done, counts.in_progress), (10, 0));
}

/// Child: processes key after key, noting each in `progress` once its completion committed,
/// until it is killed.
fn writer_child() {
    let dir = child_dir();
    let store = StateStore::open(&dir, None).unwrap();
    let run = Owner::new_run();
    let mut progress = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("progress"))
        .unwrap();
    for i in 0..100_000 {
        exit_if_orphaned();
        assert_eq!(
            store.claim(ACCOUNT, &key(i), None, &run).unwrap(),
            Claim::New
        );
        store
            .complete(ACCOUNT, &key(i), "inquiry", Some(&format!("IQ{i:05}")))
            .unwrap();
        use std::io::Write;
        writeln!(progress, "{i}").unwrap();
    }
    panic!("the writer was never killed");
}

#[test]
fn a_kill_in_the_middle_of_writing_loses_no_committed_message() {
    if let Some(r) = role() {
        assert_eq!(r, "writer");
        return writer_child();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    drop(StateStore::open(&dir, None).unwrap());
    let mut children = Children(vec![spawn(
        "a_kill_in_the_middle_of_writing_loses_no_committed_message",
        "writer",
        &dir,
        0,
    )]);
    let child = &mut children.0[0];
    let progress = dir.join("progress");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = fs::read_to_string(&progress).map_or(0, |t| t.lines().count());
        if n >= 40 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "writer exited early");
        assert!(Instant::now() < deadline, "writer made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let reported: Vec<usize> = fs::read_to_string(&progress)
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let conn = rusqlite::Connection::open(dir.join("pcr_email.sqlite")).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);

    let store = StateStore::open(&dir, None).unwrap();
    for i in &reported {
        let e = store.entry(ACCOUNT, &key(*i)).unwrap().unwrap();
        assert_eq!(e.state, LedgerState::Done, "committed key {i} survived");
        assert_eq!(e.sd_number, Some(format!("IQ{i:05}")));
    }
    let counts = store.counts(ACCOUNT).unwrap();
    // At most the message being processed when the kill came is beyond the progress file.
    assert!(counts.done as usize >= reported.len());
    assert!(counts.done as usize <= reported.len() + 1);
    assert!(counts.in_progress <= 1);
    // Whatever the writer held is taken over at once; nothing is stuck as Busy.
    let me = Owner::new_run();
    for i in 0..reported.len() + 2 {
        let claim = store.claim(ACCOUNT, &key(i), None, &me).unwrap();
        assert!(
            matches!(
                claim,
                Claim::Done { .. } | Claim::New | Claim::Retry { attempts: 1 }
            ),
            "key {i}: {claim:?}"
        );
    }
}
