//! `pcr-email-encrypt`, the replacement of `zfcli.php -a cron.db.encrypt-password`, run as a
//! real process.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use pcr_email::config::secrets::KeyStore;

const BIN: &str = env!("CARGO_BIN_EXE_pcr-email-encrypt");

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("pcr360.ini");
    std::fs::write(&ini, "[prod]\nemail.EMAIL = a@pcr.com\n[test : prod]\n").unwrap();
    (dir, ini)
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("APPLICATION_ENV")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn decrypt(key_file: &Path, value: &str) -> String {
    KeyStore::open_existing(key_file)
        .unwrap()
        .decrypt(value)
        .unwrap()
        .expose()
        .to_string()
}

#[test]
fn prints_only_the_encrypted_value() {
    let (dir, ini) = setup();
    let ini_s = ini.to_str().unwrap();
    let key_file = dir.path().join("pcr360-email.key");
    let out = run(
        &[
            "-e",
            "prod",
            "-i",
            ini_s,
            "--js",
            r#"{"encrypt":"Pa55 w0rd!"}"#,
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("ENC:v1:") && stdout.ends_with('\n'),
        "{stdout:?}"
    );
    assert_eq!(stdout.lines().count(), 1);
    assert_eq!(decrypt(&key_file, stdout.trim_end()), "Pa55 w0rd!");
    // The first run created the key file and said so on stderr.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("created the key file") && stderr.contains("0640"),
        "{stderr}"
    );
    assert!(!stderr.contains("Pa55"));
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o640
    );

    // Later runs reuse it, silently.
    let out = run(
        &["-e", "prod", "-i", ini_s, "--js", r#"{"encrypt":"second"}"#],
        None,
    );
    assert!(out.status.success());
    assert_eq!(text(&out.stderr), "");
    assert_eq!(decrypt(&key_file, text(&out.stdout).trim_end()), "second");
}

#[test]
fn the_documented_command_line_works() {
    // configuring-email.txt: -a cron.db.encrypt-password -e prod -i ... --js '{\"encrypt\":\"...\"}'
    let (dir, ini) = setup();
    let out = run(
        &[
            "-a",
            "cron.db.encrypt-password",
            "-e",
            "prod",
            "-i",
            ini.to_str().unwrap(),
            "--js",
            r#"{\"encrypt\":\"SET_PASSWORD_HERE\"}"#,
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        decrypt(
            &dir.path().join("pcr360-email.key"),
            text(&out.stdout).trim_end()
        ),
        "SET_PASSWORD_HERE"
    );
}

#[test]
fn reads_the_value_from_stdin() {
    let (dir, ini) = setup();
    let out = run(
        &["--ini", ini.to_str().unwrap(), "--env=test", "--stdin"],
        Some("from stdin\r\nignored second line\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        decrypt(
            &dir.path().join("pcr360-email.key"),
            text(&out.stdout).trim_end()
        ),
        "from stdin"
    );
}

#[test]
fn help_exits_zero() {
    let out = run(&["--help"], None);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("Usage: pcr-email-encrypt"));
}

#[test]
fn errors_exit_2_and_never_echo_the_value() {
    let (dir, ini) = setup();
    let ini_s = ini.to_str().unwrap();
    let secret = "Sekr1t-Do-Not-Print";
    let js = format!(r#"{{"encrypt":"{secret}"}}"#);
    let missing = dir.path().join("missing.ini");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "-i".into(),
                missing.display().to_string(),
                "--js".into(),
                js.clone(),
            ],
            "cannot read the configuration file",
        ),
        (
            vec![
                "-e".into(),
                "staging".into(),
                "-i".into(),
                ini_s.into(),
                "--js".into(),
                js.clone(),
            ],
            "environment [staging] is not defined",
        ),
        (
            vec![
                "-i".into(),
                ini_s.into(),
                "--js".into(),
                format!(r#"{{"encrypt":"{secret}"#),
            ],
            "--js is not valid JSON",
        ),
        (
            vec![
                "-i".into(),
                ini_s.into(),
                "--js".into(),
                format!(r#"{{"password":"{secret}"}}"#),
            ],
            "--js has no \"encrypt\" key",
        ),
        (
            vec![
                "-i".into(),
                ini_s.into(),
                "--js".into(),
                r#"{"encrypt":""}"#.into(),
            ],
            "nothing to encrypt",
        ),
        (
            vec![
                "-i".into(),
                ini_s.into(),
                "--js".into(),
                js.clone(),
                secret.into(),
            ],
            "unexpected argument",
        ),
        (
            vec!["-i".into(), ini_s.into(), format!("--password={secret}")],
            "unknown option",
        ),
        (
            vec![
                "-a".into(),
                "cron.db.other".into(),
                "-i".into(),
                ini_s.into(),
                "--js".into(),
                js.clone(),
            ],
            "unknown action",
        ),
        (
            vec!["-i".into(), ini_s.into()],
            "nothing to encrypt: give --js",
        ),
    ];
    for (args, expected) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&refs, None);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(text(&out.stdout), "", "{args:?}");
        assert!(stderr.starts_with("pcr-email-encrypt: "), "{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains(secret), "{args:?}: {stderr}");
    }

    // A key file others can read is refused, not used.
    let key_file = dir.path().join("pcr360-email.key");
    KeyStore::open(&key_file).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["-i", ini_s, "--js", &js], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the key file is open to others (mode 0644)"),
        "{stderr}"
    );
    assert!(!stderr.contains(secret));
}

#[test]
fn concurrent_processes_share_one_new_key() {
    let (dir, ini) = setup();
    let ini_s = ini.to_str().unwrap();
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(BIN)
                .args([
                    "-i",
                    ini_s,
                    "--js",
                    &format!(r#"{{"encrypt":"value-{i}"}}"#),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let key_file = dir.path().join("pcr360-email.key");
    let mut creators = 0;
    for (i, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            decrypt(&key_file, text(&out.stdout).trim_end()),
            format!("value-{i}")
        );
        creators += usize::from(text(&out.stderr).contains("created the key file"));
    }
    assert_eq!(creators, 1);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
