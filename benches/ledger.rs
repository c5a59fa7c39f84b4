//! Ledger benchmark: what recording one incoming message costs PHP's thread during
//! `eventCheckMail` (SPEC §6/§8: claimed before the host is called, recorded as done right
//! after it returned, each committed). A run records 2000 messages the way `checkmail` does
//! (`claim` of the first, then `settle_then_claim`: the record of one committed with the claim
//! of the next), into a state database that already holds `--existing` settled rows (the
//! ledger is kept). No server is needed.
//!
//! Run: `cargo bench --bench ledger` (options after `--`: `--messages N` (2000),
//! `--existing N` (20000), `--repeat R` (5)). Prints the best and median microseconds per
//! message, and the WAL bytes written per message.

use std::time::Instant;

use pcr_email::state::{Claim, LedgerOutcome, Owner, Settled, StateStore, DB_FILE};

struct Options {
    messages: usize,
    existing: usize,
    repeat: usize,
}

fn options() -> Options {
    let mut o = Options {
        messages: 2000,
        existing: 20_000,
        repeat: 5,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = || -> usize {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--messages" => o.messages = value(),
            "--existing" => o.existing = value(),
            "--repeat" => o.repeat = value(),
            // cargo bench passes --bench.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// A mailbox scope as `checkmail` writes it, and Message-IDs shaped like real ones.
const SCOPE: &str = "mailbox:IMAP|mail.example.edu|993|servicedesk@example.edu|INBOX|";

fn key(run: usize, i: usize) -> String {
    // Real Message-IDs land anywhere in the key order: spread them like a hash would.
    let spread = (i as u64 ^ (run as u64) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("<{spread:016x}.{i}@mail.gmail.com>")
}

fn settled(key: String, n: usize) -> Settled {
    Settled {
        account: SCOPE.to_string(),
        key,
        outcome: LedgerOutcome::Inquiry,
        sd_number: Some(format!("SD{n:07}")),
    }
}

/// Records `count` messages like one event run; returns the seconds it took.
fn run(store: &StateStore, run: usize, count: usize) -> f64 {
    let owner = Owner::new_run();
    let started = Instant::now();
    let mut pending: Option<Settled> = None;
    for i in 0..count {
        let k = key(run, i);
        let mailbox_ref = format!("INBOX/1700000000/{}", run * count + i + 1);
        let claim = match pending.take() {
            Some(done) => store.settle_then_claim(&done, SCOPE, &k, Some(&mailbox_ref), &owner),
            None => store.claim(SCOPE, &k, Some(&mailbox_ref), &owner),
        }
        .expect("claim");
        assert_eq!(claim, Claim::New, "message {i} of run {run}");
        pending = Some(settled(k, i));
    }
    if let Some(done) = pending {
        store.settle_done(&done).expect("record");
    }
    started.elapsed().as_secs_f64()
}

fn main() {
    let o = options();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = StateStore::open(dir.path(), None).expect("state store");
    // The ledger of earlier runs, in runs of 2000.
    let mut runs = 0;
    while runs * o.messages < o.existing {
        run(&store, runs, o.messages);
        runs += 1;
    }
    store.checkpoint().expect("checkpoint");
    let wal = dir.path().join(format!("{DB_FILE}-wal"));
    let mut times = Vec::new();
    let mut wal_bytes = Vec::new();
    for _ in 0..o.repeat {
        // As during a run: checkpoints are someone else's work, the WAL only grows.
        store.set_autocheckpoint(0).expect("autocheckpoint");
        rusqlite::Connection::open(dir.path().join(DB_FILE))
            .and_then(|c| c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())))
            .expect("truncate the WAL");
        let before = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        times.push(run(&store, runs, o.messages) / o.messages as f64 * 1e6);
        let after = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        wal_bytes.push(after.saturating_sub(before) as f64 / o.messages as f64);
        runs += 1;
        store.set_autocheckpoint(1000).expect("autocheckpoint");
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "ledger: {} messages per run, {} rows before: best {:.1} us per message, median {:.1} \
         us; WAL written per message: {:.0} bytes (runs: {})",
        o.messages,
        runs * o.messages - o.repeat * o.messages,
        sorted[0],
        sorted[sorted.len() / 2],
        wal_bytes.iter().sum::<f64>() / wal_bytes.len() as f64,
        times
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
