//! The MIME corpus: every `tests/fixtures/mail/*.eml` is parsed and compared with the
//! `<name>.json` beside it (the serialized `ParsedMail`, plus a `sha256` of each attachment's
//! bytes, plus the `sd_number` and `auto` PCR-360's rules give it, as in `$mail`). All
//! mismatches are reported together, by file and field.
//!
//! `UPDATE_FIXTURES=1 cargo test --test mime_fixtures` rewrites the JSON files from the
//! current parser; read the diff before keeping it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pcr_email::config::DEFAULT_SD_NUMBER_PATTERN;
use pcr_email::mime::{self, ParsedMail};
use pcr_email::rules;
use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Fewer fixtures than this means the corpus went missing: the test must not pass vacuously.
const MIN_FIXTURES: usize = 40;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mail")
}

fn to_json(mail: &ParsedMail, sd_pattern: &Regex) -> Value {
    let mut value = serde_json::to_value(mail).expect("ParsedMail serializes");
    value["sd_number"] = rules::sd_number_in(&mail.subject, sd_pattern).into();
    value["auto"] = rules::auto_kind(mail).map(|a| a.as_str()).into();
    if let Some(list) = value.get_mut("attachments").and_then(Value::as_array_mut) {
        for (item, attachment) in list.iter_mut().zip(&mail.attachments) {
            let digest = Sha256::digest(&attachment.data);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            item["sha256"] = Value::String(hex);
        }
    }
    value
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 160 {
        format!("{}…", s.chars().take(160).collect::<String>())
    } else {
        s
    }
}

/// Appends one line per differing leaf to `out`.
fn diff(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                let p = format!("{path}.{k}");
                match a.get(k) {
                    Some(av) => diff(&p, ev, av, out),
                    None => out.push(format!("{p}: missing (expected {})", short(ev))),
                }
            }
            for (k, av) in a {
                if !e.contains_key(k) {
                    out.push(format!("{path}.{k}: unexpected {}", short(av)));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                diff(&format!("{path}[{i}]"), ev, av, out);
            }
        }
        (e, a) if e != a => out.push(format!("{path}: expected {}, got {}", short(e), short(a))),
        _ => {}
    }
}

#[test]
fn corpus_matches_expectations() {
    let update = std::env::var("UPDATE_FIXTURES").is_ok_and(|v| v == "1");
    let pattern = Regex::new(DEFAULT_SD_NUMBER_PATTERN).expect("default pattern compiles");
    let dir = corpus_dir();
    let mut emls: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    emls.sort();

    let mut report = String::new();
    let mut failures = 0;
    let mut checked = 0;
    for eml in &emls {
        let name = eml.file_name().unwrap().to_string_lossy().into_owned();
        let raw = std::fs::read(eml).expect("fixture readable");
        let actual = to_json(&mime::parse(&raw), &pattern);
        let json_path = eml.with_extension("json");
        if update {
            let text = serde_json::to_string_pretty(&actual).unwrap() + "\n";
            std::fs::write(&json_path, text).expect("fixture JSON writable");
            checked += 1;
            continue;
        }
        let expected: Value = match std::fs::read_to_string(&json_path) {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    failures += 1;
                    let _ = writeln!(
                        report,
                        "{name}: {} is not valid JSON: {e}",
                        json_path.display()
                    );
                    continue;
                }
            },
            Err(_) => {
                failures += 1;
                let _ = writeln!(
                    report,
                    "{name}: no expectation file (run with UPDATE_FIXTURES=1, then review it)"
                );
                continue;
            }
        };
        checked += 1;
        let mut lines = Vec::new();
        diff("$", &expected, &actual, &mut lines);
        if !lines.is_empty() {
            failures += 1;
            let _ = writeln!(report, "{name}:");
            for line in lines {
                let _ = writeln!(report, "    {line}");
            }
        }
    }

    // An expectation without its message is a fixture someone lost.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") && !path.with_extension("eml").exists() {
            failures += 1;
            let _ = writeln!(report, "{}: has no .eml beside it", path.display());
        }
    }

    assert!(
        checked >= MIN_FIXTURES,
        "only {checked} fixtures were checked in {} (at least {MIN_FIXTURES} expected)",
        dir.display()
    );
    assert!(
        failures == 0,
        "{failures} of {} fixtures differ from their expectations:\n{report}",
        emls.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Generated messages: bounds and hostile input
// ---------------------------------------------------------------------------------------------

fn parse(raw: &[u8]) -> ParsedMail {
    mime::parse(raw)
}

/// A multipart/mixed message with a text part and one small attachment per name.
fn with_attachments<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut raw = String::from(
        "From: a@example.edu\r\nSubject: many\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\nthe body\r\n",
    );
    for name in names {
        raw.push_str(&format!(
            "--b\r\nContent-Type: application/octet-stream\r\n\
             Content-Disposition: attachment; filename=\"{name}\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nYQ==\r\n"
        ));
    }
    raw.push_str("--b--\r\n");
    raw.into_bytes()
}

fn assert_distinct(mail: &ParsedMail) {
    let mut seen = std::collections::HashSet::new();
    for a in &mail.attachments {
        assert!(
            a.filename.len() <= mime::MAX_FILENAME_BYTES,
            "{} bytes: {:?}",
            a.filename.len(),
            a.filename
        );
        assert!(
            seen.insert(a.filename.to_lowercase()),
            "{:?} given twice (ignoring case)",
            a.filename
        );
    }
}

#[test]
fn same_named_attachments_get_distinct_names() {
    // Real parts named like generated ones, before and after them, and case variants.
    let names = [
        "report-2.pdf",
        "report.pdf",
        "report.pdf",
        "Report.PDF",
        "report-3.pdf",
        "REPORT.pdf",
    ];
    let mail = parse(&with_attachments(names));
    let got: Vec<&str> = mail
        .attachments
        .iter()
        .map(|a| a.filename.as_str())
        .collect();
    assert_eq!(
        got,
        [
            "report-2.pdf",
            "report.pdf",
            "report-3.pdf",
            "Report-4.PDF",
            "report-3-2.pdf",
            "REPORT-5.pdf"
        ]
    );

    // Thousands of one name mixed with real `name-N` parts: still all distinct.
    let mut names = Vec::new();
    for i in 0..3000 {
        names.push("scan.jpg".to_string());
        if i % 3 == 0 {
            names.push(format!("Scan-{}.JPG", i + 2));
        }
    }
    let mail = parse(&with_attachments(names.iter().map(String::as_str)));
    assert_eq!(mail.attachments.len(), names.len());
    assert_distinct(&mail);

    // Names at the length bound: the number replaces the end of the stem, and a long
    // "extension" (not a real one) is cut like the rest of the name.
    let long = format!("{}.pdf", "x".repeat(mime::MAX_FILENAME_BYTES - 4));
    let odd = format!("a.{}", "b".repeat(mime::MAX_FILENAME_BYTES - 2));
    let long2 = format!("{}y.pdf", "x".repeat(mime::MAX_FILENAME_BYTES - 5));
    let names = [&long, &long, &long2, &long2, &odd, &odd, &odd];
    let mail = parse(&with_attachments(names.iter().map(|s| s.as_str())));
    assert_eq!(mail.attachments.len(), names.len());
    assert_distinct(&mail);
    assert_eq!(mail.attachments[0].filename, long);
    assert!(mail.attachments[1].filename.ends_with("-2.pdf"));
}

#[test]
fn a_hundred_thousand_same_named_parts_are_bounded_not_stuck() {
    // Quadratic naming made this take about a quarter of an hour; it must finish (no
    // timing is asserted), keep the body and the first parts, and say what it left out.
    let names = vec!["invoice.pdf"; 100_000];
    let mail = parse(&with_attachments(names));
    assert_eq!(mail.text, "the body");
    // The message and its text part count as parts too.
    assert_eq!(mail.attachments.len(), mime::MAX_MIME_PARTS - 2);
    assert_eq!(mail.attachments[0].filename, "invoice.pdf");
    assert_distinct(&mail);
    let bound = format!(
        "the message has more than {} MIME parts; the rest were not collected",
        mime::MAX_MIME_PARTS
    );
    assert_eq!(mail.problems, [bound]);
}

#[test]
fn line_breaks_and_nul_in_decoded_headers_become_spaces() {
    // "a\r\nBcc: x@y\0z", RFC 2047 encoded in B and in Q form.
    let b = "=?utf-8?B?YQ0KQmNjOiB4QHkAeg==?=";
    let q = "=?utf-8?Q?a=0D=0ABcc=3A_x=40y=00z?=";
    let raw = format!(
        "From: {b} <ann@example.edu>\r\nTo: {q} <to@example.edu>, \"x\ty\" <t2@example.edu>\r\n\
         Cc: {q} <cc@example.edu>\r\nReply-To: {b} <rt@example.edu>\r\nSubject: Re: {b}\r\n\
         X-Note: {q}\r\nMessage-ID: <id@example.edu>\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain\r\n\r\nhi\r\n\
         --b\r\nContent-Type: application/pdf; name=\"{b}.pdf\"\r\n\r\n%PDF\r\n--b--\r\n"
    );
    let mail = parse(raw.as_bytes());
    let clean = "a Bcc: x@y z";
    assert_eq!(mail.subject, format!("Re: {clean}"));
    let names: Vec<Option<&str>> = [&mail.to[..], &mail.cc, &mail.reply_to]
        .into_iter()
        .flatten()
        .map(|a| a.name.as_deref())
        .collect();
    assert_eq!(names, [Some(clean), Some("x y"), Some(clean), Some(clean)]);
    assert_eq!(mail.from.as_ref().unwrap().name.as_deref(), Some(clean));
    assert_eq!(mail.from.as_ref().unwrap().email, "ann@example.edu");
    assert_eq!(
        mail.header("subject"),
        Some(format!("Re: {clean}").as_str())
    );
    assert_eq!(mail.header("x-note"), Some(clean));
    assert_eq!(mail.attachments[0].filename, "a Bcc_ x@y z.pdf");
    let controls = |s: &str| s.chars().any(char::is_control);
    for value in mail.headers.values().flat_map(|f| f.all()) {
        assert!(!controls(value), "{value:?}");
    }
    assert!(mail.problems.is_empty(), "{:?}", mail.problems);
}
