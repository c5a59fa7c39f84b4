//! Files the configuration names that are no regular files or never end — `/dev/zero`, a FIFO
//! nobody writes to, `/proc/self/pagemap` (which reports size 0 and is terabytes long) — as the
//! INI file, KEY_FILE, CA_FILE and a SERVICE_ACCOUNT_JSON path: each is refused with a
//! configuration error naming the file (and the key), without hanging or reading it whole.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use pcr_email::config::ini::IniFile;
use pcr_email::config::secrets::KeyStore;
use pcr_email::config::*;
use pcr_email::Error;
use serde_json::json;

const PAGEMAP: &str = "/proc/self/pagemap";

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Runs `op`; should it block opening `fifo` (the bug this file guards against), a helper opens
/// the FIFO's other end after a while so `op` returns and the test fails instead of hanging.
fn unblocking<T>(fifo: &Path, op: impl FnOnce() -> T) -> T {
    let (done, wait) = mpsc::channel::<()>();
    let fifo = fifo.to_path_buf();
    let guard = std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(60)).is_err() {
            // O_NONBLOCK: succeeds only if a reader is stuck in open(); never blocks itself.
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo);
        }
    });
    let result = op();
    let _ = done.send(());
    guard.join().unwrap();
    result
}

struct Specials {
    _dir: tempfile::TempDir,
    fifo: PathBuf,
    fifo_link: PathBuf,
}

fn specials() -> Specials {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let fifo_link = dir.path().join("link-to-fifo");
    std::os::unix::fs::symlink(&fifo, &fifo_link).unwrap();
    Specials {
        _dir: dir,
        fifo,
        fifo_link,
    }
}

/// Each special path with the words its error must contain.
fn cases(s: &Specials, limit: &str) -> Vec<(PathBuf, String)> {
    let mut cases = vec![
        (
            PathBuf::from("/dev/zero"),
            "it is not a regular file (it is a character device)".to_string(),
        ),
        (
            s.fifo.clone(),
            "it is not a regular file (it is a FIFO)".to_string(),
        ),
        (
            s.fifo_link.clone(),
            "it is not a regular file (it is a FIFO)".to_string(),
        ),
    ];
    if Path::new(PAGEMAP).exists() {
        cases.push((
            PathBuf::from(PAGEMAP),
            format!("it is larger than {limit} (refused)"),
        ));
    }
    cases
}

fn config_message(e: &Error) -> String {
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    e.to_string()
}

#[test]
fn the_ini_file() {
    let s = specials();
    for (path, why) in cases(&s, "16 MiB") {
        let e = unblocking(&s.fifo, || IniFile::load(&path)).unwrap_err();
        let text = config_message(&e);
        assert_eq!(
            text,
            format!(
                "email configuration error ({}): cannot read the configuration file: {why}",
                path.display()
            )
        );
        let e = unblocking(&s.fifo, || Settings::load(&path, "prod")).unwrap_err();
        assert_eq!(config_message(&e), text);
    }
}

#[test]
fn the_key_file() {
    let s = specials();
    for (path, why) in cases(&s, "4 KiB") {
        let expected = format!(
            "email configuration error ({}, key KEY_FILE): cannot read the key file: {why}",
            path.display()
        );
        let e = unblocking(&s.fifo, || KeyStore::open(&path)).unwrap_err();
        assert_eq!(config_message(&e), expected);
        let e = unblocking(&s.fifo, || KeyStore::open_existing(&path)).unwrap_err();
        assert_eq!(config_message(&e), expected);

        // Through the INI: an encrypted master password names the key file it needs.
        let root = tempfile::tempdir().unwrap();
        let ini = root.path().join("pcr360.ini");
        let enc = KeyStore::from_key([3; 32]).encrypt("pw");
        std::fs::write(
            &ini,
            format!(
                "[prod]\nemail.EMAIL = a@pcr.com\nemail.OUTGOING_TRANSPORT_TYPE = FILE\n\
                 email.PASSWORD = \"{enc}\"\nemail.KEY_FILE = \"{}\"\n",
                path.display()
            ),
        )
        .unwrap();
        // The master account fails on its own (the settings load).
        let e = unblocking(&s.fifo, || {
            Settings::load(&ini, "prod").and_then(|s| s.master_account().map(|m| m.cloned()))
        })
        .unwrap_err();
        let text = config_message(&e);
        assert!(text.contains("key email.PASSWORD"), "{text}");
        assert!(text.contains(&why), "{text}");
    }
}

#[test]
fn the_ca_file() {
    let s = specials();
    for (path, why) in cases(&s, "4 MiB") {
        let root = tempfile::tempdir().unwrap();
        let ini = root.path().join("pcr360.ini");
        std::fs::write(
            &ini,
            format!(
                "[prod]\nemail.EMAIL = a@pcr.com\nemail.OUTGOING_TRANSPORT_TYPE = SMTP\n\
                 email.OUTGOING_HOST = mail.pcr.com\nemail.CA_FILE = \"{}\"\n",
                path.display()
            ),
        )
        .unwrap();
        let e = unblocking(&s.fifo, || Settings::load(&ini, "prod")).unwrap_err();
        assert_eq!(
            config_message(&e),
            format!(
                "email configuration error ({}:5, account master, key email.CA_FILE): the CA \
                 file {} cannot be used: {why}",
                ini.display(),
                path.display()
            )
        );

        // A tenant row's CA_FILE alike.
        let settings = Settings::without_file(&ini, "prod");
        let keys = KeyStore::from_key([4; 32]);
        let row = json!({"RECID": 8, "TENANTS_RECID": 1, "ACCOUNT_TYPE": "default",
            "EMAIL": "d@t.edu", "OUTGOING_TRANSPORT_TYPE": "FILE",
            "CA_FILE": path.display().to_string()});
        let e = unblocking(&s.fifo, || account_from_row(&row, &settings, &keys)).unwrap_err();
        assert_eq!(
            config_message(&e),
            format!(
                "email configuration error (account 8, key CA_FILE): the CA file {} cannot be \
                 used: {why}",
                path.display()
            )
        );
    }
}

#[test]
fn a_service_account_json_path() {
    let s = specials();
    for (path, why) in cases(&s, "1 MiB") {
        let root = tempfile::tempdir().unwrap();
        let settings = Settings::without_file(&root.path().join("pcr360.ini"), "prod");
        let keys = KeyStore::from_key([5; 32]);
        let row = json!({"RECID": 40, "ACCOUNT_TYPE": "service_desk", "EMAIL": "sd@t.edu",
            "OUTGOING_TRANSPORT_TYPE": "GMAIL", "INCOMING_MAILBOX_TYPE": "gmail",
            "OAUTH": {"SERVICE_ACCOUNT_JSON": path.display().to_string(),
                      "IMPERSONATE": "sd@t.edu"}});
        let e = unblocking(&s.fifo, || account_from_row(&row, &settings, &keys)).unwrap_err();
        assert_eq!(
            config_message(&e),
            format!(
                "email configuration error (account 40, key OAUTH.SERVICE_ACCOUNT_JSON): cannot \
                 read the service account key file {}: {why}",
                path.display()
            )
        );
    }
}

#[test]
fn regular_files_at_their_limit_are_read_and_one_byte_more_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    let stored = KeyStore::open(&key).unwrap();
    // A key file padded with blanks up to the limit still works ...
    let text = std::fs::read_to_string(&key).unwrap();
    let padded = format!("{text}{}", " ".repeat(4096 - text.len()));
    std::fs::write(&key, &padded).unwrap();
    assert_eq!(
        KeyStore::open(&key).unwrap().key_id(),
        stored.key_id(),
        "4 KiB exactly"
    );
    // ... and one byte more is refused.
    std::fs::write(&key, format!("{padded} ")).unwrap();
    let e = KeyStore::open(&key).unwrap_err();
    assert!(e.to_string().contains("larger than 4 KiB"), "{e}");
}
