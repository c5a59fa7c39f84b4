//! Reading OFFICE365 (Microsoft Graph) and GMAIL (Gmail API) mailboxes against the local cloud
//! emulator: paging, read-before-check messages, sizes, bytes, marking (seen, move, delete),
//! quarantine, skipped messages, bad replies. Needs `scripts/test-servers.sh start`.

mod cloud_support;
mod common;

use serde_json::{json, Value};

use cloud_support::*;
use pcr_email::config::{Account, ProcessedAction};
use pcr_email::error::Error;
use pcr_email::incoming::{Fetched, Flow, Mailbox};
use pcr_email::oauth::Provider;

fn setup(
    provider: Provider,
    tag: &str,
    recid: i64,
    action: ProcessedAction,
) -> (Tenant, Env, Account) {
    let t = tenant(provider, tag, None);
    let env = Env::new();
    let mut a = account(recid, provider, &t.mailbox, oauth_settings(&t));
    a.incoming.as_mut().unwrap().processed_action = action;
    sign_in(&a, &env);
    (t, env, a)
}

fn open(a: &Account, env: &Env) -> Box<dyn Mailbox> {
    pcr_email::incoming::open(a, &env.env, env.store()).unwrap()
}

fn fetch_all(mb: &mut dyn Mailbox, ids: &[String]) -> Vec<Fetched> {
    let mut out = Vec::new();
    mb.fetch_each(ids, &mut |f| {
        out.push(f);
        Flow::Continue
    })
    .unwrap();
    out
}

fn by_id<'a>(dump: &'a Value, id: &str) -> &'a Value {
    dump["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in the mailbox"))
}

#[test]
fn graph_lists_every_page_oldest_first_and_marks_seen() {
    let (t, env, a) = setup(Provider::Microsoft, "grecv", 71, ProcessedAction::Seen);
    let mut seeded = Vec::new();
    for i in 0..130 {
        let raw = incoming_mime(&format!("Question {i}"), &unique("m"));
        // Some were read in Outlook before the check: still new to us.
        let id = seed(Provider::Microsoft, &t.mailbox, &raw, None, i % 10 == 0);
        seeded.push((id, raw));
    }
    seed(
        Provider::Microsoft,
        &t.mailbox,
        b"From: a@b.c\r\n\r\nelsewhere\r\n",
        Some("drafts"),
        false,
    );
    let mut mb = open(&a, &env);
    assert_eq!(mb.protocol(), "OFFICE365");
    assert_eq!(mb.count().unwrap(), 130);
    let listed = mb.list().unwrap();
    let ids: Vec<String> = listed.iter().map(|l| l.id.clone()).collect();
    let expected: Vec<String> = seeded.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, expected, "not every page, or not oldest first");
    for (l, (_, raw)) in listed.iter().zip(&seeded) {
        assert_eq!(l.size, raw.len() as u64);
    }
    let fetched = fetch_all(mb.as_mut(), &ids[..40]);
    assert_eq!(fetched.len(), 40);
    for (f, (id, raw)) in fetched.iter().zip(&seeded) {
        assert_eq!(&f.id, id);
        assert_eq!(&f.raw, raw, "the MIME changed");
    }
    let log = stats(&t.client_id, &t.mailbox)["requests"].clone();
    let pages = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().ends_with("/messages/delta"))
        .count();
    assert_eq!(pages, 2, "130 messages are two delta pages of 100");

    mb.mark_processed(&ids[..40]).unwrap();
    let dump = mailbox(Provider::Microsoft, &t.mailbox);
    for id in &ids[..40] {
        assert_eq!(by_id(&dump, id)["is_read"], true);
        assert_eq!(by_id(&dump, id)["folder"], "Inbox");
    }
    assert_eq!(by_id(&dump, &ids[41])["is_read"], false);
    // Marked messages are not listed again, by this or a later run.
    mb.finish().unwrap();
    let mut again = open(&a, &env);
    let rest: Vec<String> = again.list().unwrap().into_iter().map(|l| l.id).collect();
    assert_eq!(rest, ids[40..].to_vec());
}

#[test]
fn graph_moves_into_created_folders_deletes_quarantines_and_skips() {
    let (t, env, mut a) = setup(
        Provider::Microsoft,
        "gmove",
        72,
        ProcessedAction::Move("Processed/PCR".into()),
    );
    let ids: Vec<String> = (0..5)
        .map(|i| {
            seed(
                Provider::Microsoft,
                &t.mailbox,
                &incoming_mime(&format!("m{i}"), &unique("m")),
                None,
                false,
            )
        })
        .collect();
    let mut mb = open(&a, &env);
    assert_eq!(mb.list().unwrap().len(), 5);
    mb.mark_processed(&ids[..2]).unwrap();
    assert!(mb.quarantine(&ids[2..3]).unwrap());
    mb.mark_skipped(&ids[3..4]).unwrap();
    let dump = mailbox(Provider::Microsoft, &t.mailbox);
    // Immutable ids: the moved messages keep their ids.
    assert_eq!(by_id(&dump, &ids[0])["folder"], "PCR");
    assert_eq!(by_id(&dump, &ids[1])["folder"], "PCR");
    assert_eq!(by_id(&dump, &ids[2])["folder"], "PCR-Failed");
    assert_eq!(
        by_id(&dump, &ids[3])["folder"],
        "Inbox",
        "a skipped message must stay"
    );
    let folders = dump["folders"].as_array().unwrap();
    let processed = folders
        .iter()
        .find(|f| f["displayName"] == "Processed")
        .unwrap();
    let pcr = folders.iter().find(|f| f["displayName"] == "PCR").unwrap();
    assert_eq!(
        pcr["parentFolderId"], processed["id"],
        "PCR must be inside Processed"
    );
    let listed: Vec<String> = mb.list().unwrap().into_iter().map(|l| l.id).collect();
    assert_eq!(listed, vec![ids[4].clone()]);
    // The folder exists now: a second move reuses it.
    mb.mark_processed(&ids[4..]).unwrap();
    let dump = mailbox(Provider::Microsoft, &t.mailbox);
    assert_eq!(
        dump["folders"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["displayName"] == "PCR")
            .count(),
        1
    );

    // delete: Exchange keeps it in Deleted Items.
    a.incoming.as_mut().unwrap().processed_action = ProcessedAction::Delete;
    let id = seed(
        Provider::Microsoft,
        &t.mailbox,
        &incoming_mime("del", &unique("m")),
        None,
        false,
    );
    let mut mb = open(&a, &env);
    assert_eq!(mb.list().unwrap().len(), 1);
    mb.mark_processed(std::slice::from_ref(&id)).unwrap();
    assert_eq!(
        by_id(&mailbox(Provider::Microsoft, &t.mailbox), &id)["folder"],
        "Deleted Items"
    );
    // A message already gone counts as done.
    mb.mark_processed(&["AAMk-no-such-message".to_string()])
        .unwrap();
}

#[test]
fn graph_bad_replies_and_missing_folders_are_mailbox_errors() {
    let (t, env, mut a) = setup(Provider::Microsoft, "gbad", 73, ProcessedAction::Seen);
    seed(
        Provider::Microsoft,
        &t.mailbox,
        &incoming_mime("x", &unique("m")),
        None,
        false,
    );
    let mut mb = open(&a, &env);
    fault(
        "/mailFolders/inbox/messages/delta$",
        &t.mailbox,
        200,
        1,
        json!({"body": "{\"value\": [ {\"id\": ", "content_type": "application/json"}),
    );
    let err = mb.list().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Mailbox(_)), "{text}");
    assert!(
        text.contains(&format!(
            "GET {}/v1.0/me/mailFolders/inbox/messages/delta",
            emu()
        )),
        "{text}"
    );
    assert!(text.contains("not valid JSON"), "{text}");
    // A paging link to another host is not followed (the token would go with it).
    fault(
        "/mailFolders/inbox/messages/delta$",
        &t.mailbox,
        200,
        1,
        json!({"body": {"value": [], "@odata.nextLink": "http://127.0.0.2:9/steal"}}),
    );
    let err = mb.list().unwrap_err();
    assert!(err.to_string().contains("another host"), "{err}");
    assert_eq!(mb.list().unwrap().len(), 1, "the mailbox works again");

    a.incoming.as_mut().unwrap().folder = "No Such Folder".into();
    let err = open(&a, &env).list().unwrap_err();
    assert!(err.to_string().contains("INCOMING_FOLDER"), "{err}");

    // A message deleted between listing and download is left out; the rest arrive.
    a.incoming.as_mut().unwrap().folder = "INBOX".into();
    let gone = seed(
        Provider::Microsoft,
        &t.mailbox,
        &incoming_mime("y", &unique("m")),
        None,
        false,
    );
    let mut mb = open(&a, &env);
    let ids: Vec<String> = mb.list().unwrap().into_iter().map(|l| l.id).collect();
    assert_eq!(ids.len(), 2);
    fault(
        &format!("/messages/{gone}/\\$value$"),
        &t.mailbox,
        404,
        1,
        json!({}),
    );
    let fetched = fetch_all(mb.as_mut(), &ids);
    assert_eq!(fetched.len(), 1);
    assert_ne!(fetched[0].id, gone);
    // A server error while marking is reported and the message stays listed.
    fault(
        "/me/messages/",
        &t.mailbox,
        500,
        1,
        json!({"method": "PATCH"}),
    );
    let err = mb.mark_processed(&ids[..1]).unwrap_err();
    assert!(
        err.to_string().contains("1 of 1 messages not processed"),
        "{err}"
    );
    assert_eq!(mb.list().unwrap().len(), 2);
}

#[test]
fn graph_listing_stops_at_max_messages() {
    let (t, env, mut a) = setup(Provider::Microsoft, "gmax", 74, ProcessedAction::Seen);
    for i in 0..250 {
        seed(
            Provider::Microsoft,
            &t.mailbox,
            &incoming_mime(&format!("q{i}"), &unique("m")),
            None,
            false,
        );
    }
    a.incoming.as_mut().unwrap().max_messages = 120;
    let listed = open(&a, &env).list().unwrap();
    assert!((120..=200).contains(&listed.len()), "{}", listed.len());
}

#[test]
fn gmail_lists_every_page_oldest_first_and_marks_seen() {
    let (t, env, mut a) = setup(Provider::Google, "gmrecv", 81, ProcessedAction::Seen);
    a.incoming.as_mut().unwrap().max_messages = 1000;
    let mut seeded = Vec::new();
    for i in 0..505 {
        let raw = incoming_mime(&format!("Frage {i}"), &unique("m"));
        seeded.push((
            seed(Provider::Google, &t.mailbox, &raw, None, i % 7 == 0),
            raw,
        ));
    }
    seed(
        Provider::Google,
        &t.mailbox,
        b"From: a@b.c\r\n\r\nspam\r\n",
        Some("SPAM"),
        false,
    );
    let mut mb = open(&a, &env);
    assert_eq!(mb.protocol(), "GMAIL");
    assert_eq!(mb.count().unwrap(), 505);
    let listed = mb.list().unwrap();
    let ids: Vec<String> = listed.iter().map(|l| l.id.clone()).collect();
    assert_eq!(
        ids,
        seeded.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(listed[3].size, seeded[3].1.len() as u64);
    let fetched = fetch_all(mb.as_mut(), &ids[..25]);
    for (f, (id, raw)) in fetched.iter().zip(&seeded) {
        assert_eq!(&f.id, id);
        assert_eq!(&f.raw, raw);
    }
    mb.mark_processed(&ids[..25]).unwrap();
    let dump = mailbox(Provider::Google, &t.mailbox);
    for id in &ids[..25] {
        let m = by_id(&dump, id);
        assert_eq!(m["is_read"], true);
        assert!(m["labels"].as_array().unwrap().contains(&json!("INBOX")));
    }
    assert_eq!(mb.list().unwrap().len(), 480);
}

#[test]
fn gmail_moves_to_labels_trashes_and_quarantines() {
    let (t, env, mut a) = setup(
        Provider::Google,
        "gmmove",
        82,
        ProcessedAction::Move("PCR Done".into()),
    );
    let ids: Vec<String> = (0..4)
        .map(|i| {
            seed(
                Provider::Google,
                &t.mailbox,
                &incoming_mime(&format!("m{i}"), &unique("m")),
                None,
                false,
            )
        })
        .collect();
    let mut mb = open(&a, &env);
    assert_eq!(mb.list().unwrap().len(), 4);
    mb.mark_processed(&ids[..1]).unwrap();
    assert!(mb.quarantine(&ids[1..2]).unwrap());
    mb.mark_skipped(&ids[2..3]).unwrap();
    let dump = mailbox(Provider::Google, &t.mailbox);
    assert_eq!(
        by_id(&dump, &ids[0])["label_names"],
        json!(["UNREAD", "PCR Done"])
    );
    assert_eq!(
        by_id(&dump, &ids[1])["label_names"],
        json!(["UNREAD", "PCR-Failed"])
    );
    assert!(by_id(&dump, &ids[2])["labels"]
        .as_array()
        .unwrap()
        .contains(&json!("INBOX")));
    assert_eq!(
        mb.list()
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect::<Vec<_>>(),
        vec![ids[3].clone()]
    );

    a.incoming.as_mut().unwrap().processed_action = ProcessedAction::Delete;
    let mut mb = open(&a, &env);
    mb.mark_processed(&ids[3..]).unwrap();
    let dump = mailbox(Provider::Google, &t.mailbox);
    assert!(by_id(&dump, &ids[3])["labels"]
        .as_array()
        .unwrap()
        .contains(&json!("TRASH")));
    assert!(mb.list().unwrap().is_empty());

    // INCOMING_FOLDER may name a user label.
    a.incoming.as_mut().unwrap().folder = "PCR Done".into();
    let listed: Vec<String> = open(&a, &env)
        .list()
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert!(
        listed.is_empty(),
        "finished messages must not come back: {listed:?}"
    );
}

#[test]
fn gmail_expired_tokens_are_refreshed_once_while_reading() {
    let (t, env, a) = setup(Provider::Google, "gm401", 83, ProcessedAction::Seen);
    seed(
        Provider::Google,
        &t.mailbox,
        &incoming_mime("x", &unique("m")),
        None,
        false,
    );
    admin(
        "POST",
        "/_admin/expire_access_tokens",
        json!({"user": t.mailbox}),
    );
    let mut mb = open(&a, &env);
    assert_eq!(mb.list().unwrap().len(), 1);
    assert_eq!(grants(&t.client_id, "refresh_token"), 1);
    let statuses: Vec<u64> = stats(&t.client_id, &t.mailbox)["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        1,
        "{statuses:?}"
    );
}

#[test]
fn a_large_gmail_message_waits_for_the_runs_gate_before_its_download() {
    use pcr_email::incoming::gate::{self, Gate};
    use std::sync::mpsc::channel;
    use std::time::Duration;

    let (t, env, a) = setup(Provider::Google, "gmgate", 83, ProcessedAction::Seen);
    let mut raw = incoming_mime("A photo", &unique("m"));
    raw.extend(std::iter::repeat_n(b'x', gate::LARGE));
    raw.extend_from_slice(b"\r\n");
    let id = seed(Provider::Google, &t.mailbox, &raw, None, false);
    let mut mb = open(&a, &env);
    assert!(mb.list().unwrap()[0].size >= gate::LARGE as u64);
    // Another mailbox thread of the same run holds the pass for its own large message.
    let run_gate = Gate::new();
    let (held_tx, held) = channel();
    let (release, release_rx) = channel::<()>();
    let holder = {
        let run_gate = run_gate.clone();
        std::thread::spawn(move || {
            let _installed = gate::install(&run_gate);
            let _buffer = gate::buffer(gate::LARGE);
            let pass = gate::take_pass().expect("the pass");
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
            drop(pass);
        })
    };
    held.recv().unwrap();
    let (done_tx, done) = channel();
    let reader = std::thread::spawn(move || {
        let _installed = gate::install(&run_gate);
        let fetched = fetch_all(mb.as_mut(), std::slice::from_ref(&id));
        let pass = gate::take_pass();
        done_tx.send(()).unwrap();
        (fetched, pass.is_some())
    });
    assert!(
        done.recv_timeout(Duration::from_millis(300)).is_err(),
        "the large message was downloaded while another one held the gate"
    );
    release.send(()).unwrap();
    let (fetched, had_pass) = reader.join().unwrap();
    holder.join().unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].raw, raw);
    assert!(
        had_pass,
        "the download took the pass, to go with the message"
    );
}

#[test]
fn graph_app_only_reads_a_shared_mailbox_marks_and_quarantines_there() {
    let shared = shared_mailbox("gappread");
    let app = app_only(
        "gappread",
        &["Mail.ReadWrite", "Mail.Send"],
        json!([shared]),
    );
    let env = Env::new();
    let a = account(93, Provider::Microsoft, &shared, app_only_settings(&app));
    let mut seeded = Vec::new();
    for i in 0..3 {
        let raw = incoming_mime(&format!("Shared {i}"), &unique("m"));
        // One was read in Outlook before the check: still new to us.
        seeded.push((seed(Provider::Microsoft, &shared, &raw, None, i == 1), raw));
    }
    let mut mb = open(&a, &env);
    assert_eq!(mb.count().unwrap(), 3);
    let ids: Vec<String> = mb.list().unwrap().into_iter().map(|l| l.id).collect();
    let expected: Vec<String> = seeded.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, expected);
    let fetched = fetch_all(mb.as_mut(), &ids);
    for (f, (_, raw)) in fetched.iter().zip(&seeded) {
        assert_eq!(&f.raw, raw);
    }
    mb.mark_processed(&ids[..2]).unwrap();
    assert!(mb.quarantine(&ids[2..]).unwrap());
    let dump = mailbox(Provider::Microsoft, &shared);
    assert_eq!(by_id(&dump, &ids[0])["is_read"], true);
    assert_eq!(by_id(&dump, &ids[0])["folder"], "Inbox");
    assert_eq!(by_id(&dump, &ids[2])["folder"], "PCR-Failed");
    mb.finish().unwrap();
    assert!(open(&a, &env).list().unwrap().is_empty());

    // Every request named the shared mailbox; none used /me.
    let encoded = shared.replace('@', "%40");
    let log: Vec<Value> = stats(&app.client_id, "")["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/v1.0/"))
        .cloned()
        .collect();
    let paths: Vec<&str> = log.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert!(paths.len() >= 8, "{paths:?}");
    assert!(
        paths
            .iter()
            .all(|p| p.starts_with(&format!("/v1.0/users/{encoded}/"))),
        "{paths:?}"
    );
    assert!(
        log.iter().all(|r| r["status"].as_u64() < Some(300)),
        "{log:?}"
    );
}

#[test]
fn graph_app_only_mailbox_outside_the_grant_is_an_auth_error() {
    let outside = shared_mailbox("gappout");
    let app = app_only("gappout", &["Mail.ReadWrite", "Mail.Send"], json!([]));
    let env = Env::new();
    let a = account(94, Provider::Microsoft, &outside, app_only_settings(&app));
    seed(
        Provider::Microsoft,
        &outside,
        &incoming_mime("waiting", &unique("m")),
        None,
        false,
    );
    let err = open(&a, &env).list().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Auth { .. }), "{text}");
    assert!(text.contains("must be granted"), "{text}");
    assert!(text.contains(&outside), "{text}");
    assert_no_secret(&text, &[&app.client_secret]);
    // An app without the Mail permissions is refused too, with the same advice.
    let bare = app_only("gappbare", &[], json!([outside]));
    let b = account(95, Provider::Microsoft, &outside, app_only_settings(&bare));
    let err = open(&b, &env).list().unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(err.to_string().contains("Mail.ReadWrite"), "{err}");
    let dump = mailbox(Provider::Microsoft, &outside);
    assert_eq!(dump["messages"][0]["is_read"], false, "nothing was touched");
}
