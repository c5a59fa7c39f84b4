//! The key file on disk: creation (0640, its directory's group, atomic under concurrency),
//! refusal of a key others can read,
//! bad contents, and encryption through `encrypt_for_config`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use base64::Engine as _;
use pcr_email::config::secrets::{encrypt_for_config, KeyStore};
use pcr_email::Error;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn created_on_first_use_with_mode_0640_and_the_directorys_group() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    // As root, give the top directory another group (nogroup, standing for www-data): the key
    // file and the directories created for it take it.
    // SAFETY: geteuid never fails.
    let group = if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(dir.path(), None, Some(65534)).unwrap();
        65534
    } else {
        std::fs::metadata(dir.path()).unwrap().gid()
    };
    let gid = |p: &Path| std::fs::metadata(p).unwrap().gid();
    let path = dir.path().join("new/sub/pcr360-email.key");
    let store = KeyStore::open(&path).unwrap();
    assert!(store.created());
    assert_eq!(mode(&path), 0o640);
    assert_eq!(gid(&path), group);
    let sub = dir.path().join("new/sub");
    assert_eq!(
        std::fs::metadata(&sub).unwrap().permissions().mode() & 0o7777,
        0o2750
    );
    assert_eq!(gid(&sub), group);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 45, "44 base64 characters and a newline");
    assert!(text.ends_with('\n'));
    let key = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap();
    assert_eq!(key.len(), 32);

    let again = KeyStore::open(&path).unwrap();
    assert!(!again.created());
    assert_eq!(again.key_id(), store.key_id());
    let enc = store.encrypt("pw");
    assert_eq!(again.decrypt(&enc).unwrap().expose(), "pw");
    // Nothing but the key file is left in the directory.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("new/sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("pcr360-email.key")]);
}

#[test]
fn a_key_file_others_can_use_or_its_group_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.key");
    KeyStore::open(&path).unwrap();
    for (bad, who) in [
        (0o644, "open to others"),
        (0o604, "open to others"),
        (0o602, "open to others"),
        (0o641, "open to others"),
        (0o660, "writable by its group"),
        (0o620, "writable by its group"),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).unwrap();
        let e = KeyStore::open(&path).unwrap_err();
        assert!(matches!(e, Error::Config { .. }));
        assert_eq!(
            e.to_string(),
            format!(
                "email configuration error ({p}, key KEY_FILE): the key file is {who} \
                 (mode {bad:04o}); it is refused until you run: chmod 640 {p}",
                p = path.display()
            )
        );
        assert!(KeyStore::open_existing(&path).is_err());
    }
    // Readable by its group (the web server's), as `chgrp www-data` + `chmod 640` leave it.
    for good in [0o600, 0o400, 0o640, 0o440] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(good)).unwrap();
        KeyStore::open(&path).unwrap();
    }
}

#[test]
fn bad_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.key");
    let write = |text: &str| {
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    for text in ["not base64 !!", "c2hvcnQ=\n", "\n"] {
        write(text);
        let e = KeyStore::open(&path).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "the key file does not hold a key (expected 32 bytes as base64 on one line)"
            ),
            "{text:?}: {e}"
        );
    }
    // 64 hex digits are accepted.
    write(&format!("{}\n", "ab".repeat(32)));
    let hex = KeyStore::open(&path).unwrap();
    assert_eq!(hex.key_id(), KeyStore::from_key([0xab; 32]).key_id());

    let e = KeyStore::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let missing = dir.path().join("missing.key");
    let e = KeyStore::open_existing(&missing).unwrap_err().to_string();
    assert!(e.contains("the key file does not exist"), "{e}");
    assert!(!missing.exists());
}

#[test]
fn concurrent_creation_from_threads_yields_one_key() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join(format!("race-{round}.key")));
        let threads = 16;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let path = Arc::clone(&path);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let store = KeyStore::open(&path).unwrap();
                    (
                        store.key_id().to_string(),
                        store.created(),
                        store.encrypt("x"),
                    )
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ids: std::collections::HashSet<_> = results.iter().map(|r| r.0.clone()).collect();
        assert_eq!(ids.len(), 1, "round {round}: {ids:?}");
        assert_eq!(
            results.iter().filter(|r| r.1).count(),
            1,
            "exactly one creator"
        );
        let store = KeyStore::open(&path).unwrap();
        for (_, _, enc) in &results {
            assert_eq!(store.decrypt(enc).unwrap().expose(), "x");
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
    }
}

#[test]
fn values_from_another_key_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = KeyStore::open(&dir.path().join("a.key")).unwrap();
    let b = KeyStore::open(&dir.path().join("b.key")).unwrap();
    assert_ne!(a.key_id(), b.key_id());
    let e = b.decrypt(&a.encrypt("from-a")).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "email configuration error ({bp}): the value was encrypted with another key (key id \
             {a}), not with the key file {bp} (key id {b}); encrypt it again with this \
             installation's key",
            bp = b.path().display(),
            a = a.key_id(),
            b = b.key_id()
        )
    );
}

#[test]
fn encrypt_for_config_uses_the_environments_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("pcr360.ini");
    std::fs::write(
        &ini,
        "[prod]\nemail.KEY_FILE = keys/prod.key\n[test : prod]\nemail.KEY_FILE = keys/test.key\n",
    )
    .unwrap();
    let enc = encrypt_for_config("hunter2", &ini, "prod").unwrap();
    let prod = KeyStore::open_existing(&dir.path().join("keys/prod.key")).unwrap();
    assert_eq!(prod.decrypt(&enc).unwrap().expose(), "hunter2");
    assert!(!dir.path().join("keys/test.key").exists());
    let enc_test = encrypt_for_config("hunter2", &ini, "test").unwrap();
    let test = KeyStore::open_existing(&dir.path().join("keys/test.key")).unwrap();
    assert!(prod.decrypt(&enc_test).is_err());
    assert_eq!(test.decrypt(&enc_test).unwrap().expose(), "hunter2");

    let e = encrypt_for_config("", &ini, "prod")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "nothing to encrypt: the value is empty");
    let e = encrypt_for_config(&enc, &ini, "prod")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "the value is already encrypted (it starts with ENC:)");
    let e = encrypt_for_config("hunter2", &ini, "staging")
        .unwrap_err()
        .to_string();
    assert!(e.contains("environment [staging] is not defined"), "{e}");
    assert!(!e.contains("hunter2"));
}
