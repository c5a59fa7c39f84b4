//! The MIME corpus: every `tests/fixtures/mail/*.eml` is parsed and compared with the
//! `<name>.json` beside it (the serialized `ParsedMail`, plus a `sha256` of each attachment's
//! bytes). All mismatches are reported together, by file and field.
//!
//! `UPDATE_FIXTURES=1 cargo test --test mime_fixtures` rewrites the JSON files from the
//! current parser; read the diff before keeping it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pcr_email::config::DEFAULT_SD_NUMBER_PATTERN;
use pcr_email::mime::{self, ParsedMail};
use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Fewer fixtures than this means the corpus went missing: the test must not pass vacuously.
const MIN_FIXTURES: usize = 40;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mail")
}

fn to_json(mail: &ParsedMail) -> Value {
    let mut value = serde_json::to_value(mail).expect("ParsedMail serializes");
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
        let actual = to_json(&mime::parse(&raw, &pattern));
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
