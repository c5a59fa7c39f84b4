//! Incremental listing of the cloud mailboxes (issue 13, SPEC §8): after its first run, an
//! OFFICE365 mailbox asks only its saved Graph delta link and a GMAIL one only the history
//! since its saved historyId, so a run costs what is new, not what the folder holds; a refused
//! delta link or a too-old historyId costs one full listing, and no message is lost or handed
//! over twice. Request counts come from the cloud emulator's log (never timings). Needs
//! `scripts/test-servers.sh start`.

mod cloud_support;
mod common;

use std::collections::BTreeSet;

use serde_json::{json, Value};

use cloud_support::*;
use pcr_email::config::{Account, ProcessedAction};
use pcr_email::incoming::{Flow, Mailbox};
use pcr_email::oauth::Provider;

fn setup(provider: Provider, tag: &str, recid: i64) -> (Tenant, Env, Account) {
    let t = tenant(provider, tag, None);
    let env = Env::new();
    let mut a = account(recid, provider, &t.mailbox, oauth_settings(&t));
    a.incoming.as_mut().unwrap().max_messages = 1000;
    sign_in(&a, &env);
    (t, env, a)
}

fn open(a: &Account, env: &Env) -> Box<dyn Mailbox> {
    pcr_email::incoming::open(a, &env.env, env.store()).unwrap()
}

/// The mail API requests the emulator has seen for this client and mailbox so far.
fn api_requests(t: &Tenant) -> Vec<Value> {
    stats(&t.client_id, &t.mailbox)["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            let p = r["path"].as_str().unwrap();
            p.starts_with("/v1.0/") || p.starts_with("/gmail/")
        })
        .cloned()
        .collect()
}

fn subject(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// What one run handed over (subjects, in order) and the API requests it made.
struct Run {
    subjects: Vec<String>,
    requests: Vec<Value>,
}

impl Run {
    fn paths(&self) -> Vec<String> {
        self.requests
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}",
                    r["method"].as_str().unwrap(),
                    r["path"].as_str().unwrap(),
                    r["status"]
                )
            })
            .collect()
    }

    /// Requests whose path contains `part`.
    fn count(&self, part: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r["path"].as_str().unwrap().contains(part))
            .count()
    }
}

/// One run as `eventCheckMail` makes it: list, download what MAX_MESSAGES allows, then mark
/// processed what the host took (every message, except those whose subject `refused` names:
/// the host threw, so they stay in the mailbox for the next run).
fn run(t: &Tenant, a: &Account, env: &Env, refused: &dyn Fn(&str) -> bool) -> Run {
    let before = api_requests(t).len();
    let mut mb = open(a, env);
    let listed = mb.list().unwrap();
    let max = a.incoming.as_ref().unwrap().max_messages;
    let ids: Vec<String> = listed.into_iter().take(max).map(|l| l.id).collect();
    let mut subjects = Vec::new();
    let mut done = Vec::new();
    mb.fetch_each(&ids, &mut |f| {
        let s = subject(&f.raw);
        if !refused(&s) {
            done.push(f.id);
        }
        subjects.push(s);
        Flow::Continue
    })
    .unwrap();
    mb.mark_processed(&done).unwrap();
    mb.finish().unwrap();
    let requests = api_requests(t)[before..].to_vec();
    Run { subjects, requests }
}

fn take_all(_: &str) -> bool {
    false
}

fn seed_many(provider: Provider, t: &Tenant, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let s = format!("{prefix} {i}");
            // One in three was read in Outlook / Gmail before the check: still new to us.
            seed(
                provider,
                &t.mailbox,
                &incoming_mime(&s, &unique("m")),
                None,
                i % 3 == 0,
            );
            s
        })
        .collect()
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn assert_once(all: &[String]) {
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a message was handed over twice");
}

#[test]
fn graph_later_runs_ask_only_the_delta_link() {
    let (t, env, a) = setup(Provider::Microsoft, "gdelta", 75);
    let old = seed_many(Provider::Microsoft, &t, "Old", 150);
    let first = run(&t, &a, &env, &take_all);
    assert_eq!(
        first.subjects, old,
        "the first run sees every message, read or unread"
    );
    assert_eq!(first.count("/messages/delta"), 2, "{:?}", first.paths());

    // The next delta reports the 150 messages the first run marked read (changed): passed
    // over without a download.
    let quiet = run(&t, &a, &env, &take_all);
    assert!(quiet.subjects.is_empty(), "{:?}", quiet.subjects);
    assert_eq!(quiet.count("/$value"), 0, "{:?}", quiet.paths());
    assert_eq!(quiet.requests.len(), 2, "{:?}", quiet.paths());

    let new = seed_many(Provider::Microsoft, &t, "New", 5);
    let second = run(&t, &a, &env, &take_all);
    assert_eq!(second.subjects, new);
    // One delta request, then one download and one PATCH per new message: nothing grows with
    // the 150 messages the folder holds.
    assert_eq!(second.count("/messages/delta"), 1, "{:?}", second.paths());
    assert_eq!(second.requests.len(), 1 + 5 + 5, "{:?}", second.paths());

    // The delta now reports the five we marked read, in its one request.
    let third = run(&t, &a, &env, &take_all);
    assert!(third.subjects.is_empty(), "{:?}", third.subjects);
    assert_eq!(third.requests.len(), 1, "{:?}", third.paths());
    let mut all = first.subjects;
    all.extend(second.subjects);
    assert_once(&all);
}

#[test]
fn graph_a_refused_delta_link_costs_one_full_listing_and_nothing_is_lost_or_doubled() {
    let (t, env, a) = setup(Provider::Microsoft, "gresync", 76);
    let old = seed_many(Provider::Microsoft, &t, "Old", 30);
    // The host throws on two of them: they stay, and wait for the next run although the delta
    // will not report them again.
    let refuse = |s: &str| s == "Old 4" || s == "Old 7";
    let first = run(&t, &a, &env, &refuse);
    assert_eq!(first.subjects, old);
    // Someone deletes one of the two before the next run.
    let dump = mailbox(Provider::Microsoft, &t.mailbox);
    let old7 = dump["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["subject"] == "Old 7")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut other = account(77, Provider::Microsoft, &t.mailbox, oauth_settings(&t));
    other.incoming.as_mut().unwrap().processed_action = ProcessedAction::Delete;
    sign_in(&other, &env);
    open(&other, &env).mark_processed(&[old7]).unwrap();

    let new = seed_many(Provider::Microsoft, &t, "New", 3);
    let second = run(&t, &a, &env, &take_all);
    let mut expected = vec!["Old 4".to_string()];
    expected.extend(new.clone());
    assert_eq!(second.subjects, expected, "{:?}", second.paths());
    assert_eq!(second.count("/messages/delta"), 1, "{:?}", second.paths());

    // The delta link expires (410 Gone, SyncStateNotFound): one full listing of the folder.
    admin(
        "POST",
        "/_admin/sync_state",
        json!({"provider": "microsoft", "user": t.mailbox}),
    );
    let newer = seed_many(Provider::Microsoft, &t, "Newer", 2);
    let third = run(&t, &a, &env, &take_all);
    assert_eq!(third.subjects, newer, "{:?}", third.paths());
    let delta: Vec<u64> = third
        .requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap().contains("/messages/delta"))
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(delta, vec![410, 200], "{:?}", third.paths());

    // Refused as invalid (400 syncStateInvalid): the same.
    admin(
        "POST",
        "/_admin/sync_state",
        json!({"provider": "microsoft", "user": t.mailbox, "status": 400,
               "code": "syncStateInvalid"}),
    );
    let last = seed_many(Provider::Microsoft, &t, "Last", 1);
    let fourth = run(&t, &a, &env, &take_all);
    assert_eq!(fourth.subjects, last, "{:?}", fourth.paths());

    // Back to one request per run.
    let fifth = run(&t, &a, &env, &take_all);
    assert!(fifth.subjects.is_empty());
    assert_eq!(fifth.requests.len(), 1, "{:?}", fifth.paths());

    let mut all: Vec<String> = first.subjects.into_iter().filter(|s| !refuse(s)).collect();
    for r in [&second, &third, &fourth] {
        all.extend(r.subjects.clone());
    }
    assert_once(&all);
    let mut everything = old;
    everything.retain(|s| s != "Old 7");
    everything.extend(new);
    everything.extend(newer);
    everything.extend(last);
    assert_eq!(sorted(&all), sorted(&everything), "a message was lost");
}

#[test]
fn graph_a_round_left_at_max_messages_goes_on_where_it_stopped() {
    let (t, env, mut a) = setup(Provider::Microsoft, "gresume", 78);
    a.incoming.as_mut().unwrap().max_messages = 120;
    let old = seed_many(Provider::Microsoft, &t, "Q", 250);
    let mut all = Vec::new();
    let mut runs = 0;
    loop {
        let r = run(&t, &a, &env, &take_all);
        runs += 1;
        if r.subjects.is_empty() {
            break;
        }
        assert!(r.subjects.len() <= 120);
        all.extend(r.subjects);
        assert!(runs < 10, "the mailbox is never drained");
    }
    assert_once(&all);
    assert_eq!(sorted(&all), sorted(&old));
    assert_eq!(runs, 4, "120 + 120 + 10, then nothing");
}

#[test]
fn gmail_later_runs_ask_only_the_history() {
    let (t, env, a) = setup(Provider::Google, "ghist", 85);
    let old = seed_many(Provider::Google, &t, "Old", 150);
    let first = run(&t, &a, &env, &take_all);
    assert_eq!(
        first.subjects, old,
        "the first run sees every message, read or unread"
    );
    assert_eq!(first.count("/profile"), 1, "{:?}", first.paths());
    assert_eq!(first.count("/history"), 0, "{:?}", first.paths());

    let new = seed_many(Provider::Google, &t, "New", 5);
    // A message that arrived under another label and is labelled into the folder later is new
    // to it too: another account moves it from STARRED into INBOX.
    let later = seed(
        Provider::Google,
        &t.mailbox,
        &incoming_mime("Labelled later", &unique("m")),
        Some("STARRED"),
        false,
    );
    let mut mover = account(86, Provider::Google, &t.mailbox, oauth_settings(&t));
    {
        let incoming = mover.incoming.as_mut().unwrap();
        incoming.folder = "STARRED".into();
        incoming.processed_action = ProcessedAction::Move("INBOX".into());
    }
    sign_in(&mover, &env);
    open(&mover, &env).mark_processed(&[later]).unwrap();

    let second = run(&t, &a, &env, &take_all);
    let mut expected = new.clone();
    expected.push("Labelled later".into());
    assert_eq!(second.subjects, expected, "{:?}", second.paths());
    // One history request, then metadata, download and marking per new message.
    assert_eq!(second.count("/history"), 1, "{:?}", second.paths());
    assert_eq!(second.requests.len(), 1 + 6 * 3, "{:?}", second.paths());
    assert!(
        !second
            .requests
            .iter()
            .any(|r| r["path"].as_str().unwrap().ends_with("/messages")),
        "the label was listed again: {:?}",
        second.paths()
    );

    let third = run(&t, &a, &env, &take_all);
    assert!(third.subjects.is_empty(), "{:?}", third.subjects);
    assert_eq!(third.requests.len(), 1, "{:?}", third.paths());
    let mut all = first.subjects;
    all.extend(second.subjects);
    assert_once(&all);
}

#[test]
fn gmail_a_too_old_history_id_costs_one_full_listing_and_nothing_is_lost_or_doubled() {
    let (t, env, a) = setup(Provider::Google, "g404", 87);
    let old = seed_many(Provider::Google, &t, "Old", 20);
    let refuse = |s: &str| s == "Old 3";
    let first = run(&t, &a, &env, &refuse);
    assert_eq!(first.subjects, old);

    let new = seed_many(Provider::Google, &t, "New", 3);
    admin(
        "POST",
        "/_admin/sync_state",
        json!({"provider": "google", "user": t.mailbox}),
    );
    let second = run(&t, &a, &env, &take_all);
    let mut expected = vec!["Old 3".to_string()];
    expected.extend(new.clone());
    assert_eq!(second.subjects, expected, "{:?}", second.paths());
    let history: Vec<u64> = second
        .requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("/history"))
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(history, vec![404], "{:?}", second.paths());
    assert_eq!(second.count("/profile"), 1, "{:?}", second.paths());

    let third = run(&t, &a, &env, &take_all);
    assert!(third.subjects.is_empty());
    assert_eq!(third.requests.len(), 1, "{:?}", third.paths());

    let mut all: Vec<String> = first.subjects.into_iter().filter(|s| !refuse(s)).collect();
    all.extend(second.subjects);
    assert_once(&all);
    let mut everything = old;
    everything.extend(new);
    assert_eq!(sorted(&all), sorted(&everything), "a message was lost");
}
