//! Cloud mailbox benchmark (issue 13 item 2, OFFICE365 and GMAIL): what one run costs against
//! the size of the mailbox, in requests to the mail API (counted by the cloud emulator) and in
//! time, for a Service Desk mailbox that keeps its mail (`PROCESSED_ACTION = seen`).
//!
//! For each type and each size N, a fresh mailbox of the local cloud emulator gets N messages
//! already processed by earlier runs (read, and recorded as finished in the state store, as
//! those runs leave them). Then, as `eventCheckMail` reads a mailbox (list, download, mark):
//!
//! 1. the first run: a full listing (Graph: the initial round of the delta query; Gmail: the
//!    profile's historyId and `messages.list`), which is also what a run costs after an
//!    expired delta link or historyId, and what every run cost before incremental listing;
//! 2. a run with 5 new messages;
//! 3. the measured run: 5 more new messages, after a run that processed 5 (Graph's delta
//!    reports those marks too): the steady state of a mailbox checked every few minutes.
//!
//! Run: `scripts/test-servers.sh start`, then `cargo bench --bench cloud` (options after
//! `--`: `--sizes 1000,10000,20000`, `--new 5`). Prints a Markdown table. Not a test: nothing
//! is asserted.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/cloud_support/mod.rs"]
mod cloud_support;

use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::json;

use cloud_support::*;
use pcr_email::config::Account;
use pcr_email::incoming::{Flow, Mailbox};
use pcr_email::oauth::Provider;

struct Options {
    sizes: Vec<usize>,
    new: usize,
}

fn options() -> Options {
    let mut o = Options {
        sizes: vec![1000, 10_000, 20_000],
        new: 5,
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
            // cargo bench passes --bench.
            _ => i += 1,
        }
    }
    o
}

/// The mail API requests the emulator has seen for the client and mailbox.
fn api_requests(t: &Tenant) -> usize {
    stats(&t.client_id, &t.mailbox)["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            let p = r["path"].as_str().unwrap();
            p.starts_with("/v1.0/") || p.starts_with("/gmail/")
        })
        .count()
}

/// What one run cost: requests, of which listing requests, seconds, messages handed over.
struct Cost {
    requests: usize,
    seconds: f64,
    handed: usize,
}

/// One run as `eventCheckMail` reads a mailbox: list, download, mark processed.
fn run(t: &Tenant, a: &Account, env: &Env) -> Cost {
    let before = api_requests(t);
    let start = Instant::now();
    let mut mb: Box<dyn Mailbox> = pcr_email::incoming::open(a, &env.env, env.store()).unwrap();
    let listed = mb.list().unwrap();
    let max = a.incoming.as_ref().unwrap().max_messages;
    let ids: Vec<String> = listed.into_iter().take(max).map(|l| l.id).collect();
    let mut done = Vec::new();
    mb.fetch_each(&ids, &mut |f| {
        done.push(f.id);
        Flow::Continue
    })
    .unwrap();
    mb.mark_processed(&done).unwrap();
    mb.finish().unwrap();
    let seconds = start.elapsed().as_secs_f64();
    Cost {
        requests: api_requests(t) - before,
        seconds,
        handed: done.len(),
    }
}

/// Seeds `n` messages into the mailbox; returns their ids.
fn seed_bulk(provider: Provider, t: &Tenant, tag: &str, n: usize, read: bool) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let chunk: Vec<String> = (i..n.min(i + 2000))
            .map(|k| STANDARD.encode(incoming_mime(&format!("{tag} {k}"), &unique("b"))))
            .collect();
        i += chunk.len();
        let reply = admin(
            "POST",
            "/_admin/seed",
            json!({"provider": provider_name(provider), "user": t.mailbox,
                   "raws_b64": chunk, "is_read": read}),
        );
        ids.extend(
            reply["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
    }
    ids
}

fn measure(provider: Provider, n: usize, new: usize, recid: i64) -> (Cost, Cost) {
    let t = tenant(provider, "bench", None);
    let env = Env::new();
    let a = account(recid, provider, &t.mailbox, oauth_settings(&t));
    sign_in(&a, &env);
    // N messages processed by earlier runs: read, and recorded as finished.
    let ids = seed_bulk(provider, &t, "Processed", n, true);
    let namespace = match provider {
        Provider::Microsoft => pcr_email::incoming::graph::done_namespace(&a.id.to_string()),
        Provider::Google => pcr_email::incoming::gmail::done_namespace(&a.id.to_string()),
    };
    let store = env.store();
    for id in &ids {
        store.set_kv(&namespace, id, "processed").unwrap();
    }
    let full = run(&t, &a, &env);
    assert_eq!(full.handed, 0);
    seed_bulk(provider, &t, "New", new, false);
    let warm = run(&t, &a, &env);
    assert_eq!(warm.handed, new);
    seed_bulk(provider, &t, "Newer", new, false);
    let steady = run(&t, &a, &env);
    assert_eq!(steady.handed, new);
    (full, steady)
}

fn main() {
    let o = options();
    println!(
        "| type | processed messages in the folder | full listing (first run; after an expired mark; every run before): requests / s | run with {} new: requests / s |",
        o.new
    );
    println!("|---|---|---|---|");
    let mut recid = 9000;
    for (provider, name) in [
        (Provider::Microsoft, "OFFICE365"),
        (Provider::Google, "GMAIL"),
    ] {
        for &n in &o.sizes {
            recid += 1;
            let (full, steady) = measure(provider, n, o.new, recid);
            println!(
                "| {name} | {n} | {} / {:.2} | {} / {:.3} |",
                full.requests, full.seconds, steady.requests, steady.seconds
            );
        }
    }
}
