//! The INI reader against the seed's example configuration and against PHP's own
//! `parse_ini_file` (the `php` CLI is a requirement of this project: it hosts the extension).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use pcr_email::config::ini::IniFile;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

#[test]
fn seed_example_parses_exactly_as_written() {
    let ini = IniFile::load(&fixture("seed.ini")).unwrap();
    assert_eq!(ini.section_names(), vec!["prod", "test", "dev"]);
    let prod = ini.section("prod").unwrap();
    let expected = [
        ("email.TENANTS_RECID", "0", 21),
        ("email.ACCOUNT_TYPE", "master", 22),
        ("email.EMAIL", "testtest@pcr.com", 23),
        ("email.DISPLAY_NAME", "PCR-360 Master (team360)", 24),
        ("email.LOGIN", "testtest@pcr.com", 25),
        ("email.PASSWORD", "testPassword23455", 26),
        ("email.OUTGOING_TRANSPORT_TYPE", "SMTP", 27),
        ("email.OUTGOING_HOST", "mail.pcr.com", 28),
        ("email.OUTGOING_PORT", "465", 29),
        ("email.OUTGOING_SSL", "SSL", 30),
        ("email.INCOMING_MAILBOX_TYPE", "IMAP", 31),
        ("email.INCOMING_HOST", "mail.pcr.com", 32),
        ("email.INCOMING_PORT", "993", 33),
        ("email.INCOMING_SSL", "SSL", 34),
    ];
    let email_keys: Vec<&str> = prod.with_prefix("email.").map(|(k, _)| k).collect();
    assert_eq!(email_keys.len(), expected.len(), "{email_keys:?}");
    for (key, value, line) in expected {
        let got = prod.get(key).unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(got.text(), value, "{key}");
        assert_eq!(got.line, line, "{key}");
    }
    assert_eq!(prod.get("constants.SEND_EMAIL").unwrap().text(), "1");
    assert_eq!(prod.get("constants.DISABLE_EMAIL").unwrap().text(), "");
    assert_eq!(
        prod.get("bootstrap.path").unwrap().text(),
        "APPLICATION_PATH/Bootstrap.php"
    );

    // [test : prod] overrides three keys and inherits the rest.
    let test = ini.section("test").unwrap();
    assert_eq!(test.get("constants.SEND_EMAIL").unwrap().raw, "false");
    assert_eq!(
        test.get("email.OUTGOING_TRANSPORT_TYPE").unwrap().text(),
        "FILE"
    );
    assert_eq!(test.get("email.OUTGOING_TRANSPORT_TYPE").unwrap().line, 39);
    assert_eq!(test.get("email.FILE_PATH").unwrap().text(), "../email-test");
    assert_eq!(
        test.get("email.PASSWORD").unwrap().text(),
        "testPassword23455"
    );
    assert_eq!(test.get("email.PASSWORD").unwrap().line, 26);
    assert_eq!(test.get("phpSettings.display_errors").unwrap().text(), "1");
    // [dev : test] : prod, three levels.
    let dev = ini.section("dev").unwrap();
    assert_eq!(dev.get("constants.DISABLE_EMAIL").unwrap().raw, "on");
    assert_eq!(
        dev.get("email.OUTGOING_TRANSPORT_TYPE").unwrap().text(),
        "FILE"
    );
    assert_eq!(dev.get("email.INCOMING_PORT").unwrap().text(), "993");
}

/// PHP's view of a file: section → key → value (arrays flattened as `key.index`), via
/// `parse_ini_file($f, true, INI_SCANNER_NORMAL)`.
fn php_parse(path: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let script = r#"
        $r = parse_ini_file($argv[1], true, INI_SCANNER_NORMAL);
        if ($r === false) { fwrite(STDERR, "parse failed\n"); exit(3); }
        $out = [];
        foreach ($r as $section => $keys) {
            if (!is_array($keys)) continue;
            foreach ($keys as $k => $v) {
                if (is_array($v)) { foreach ($v as $i => $w) $out[$section]["$k.$i"] = (string)$w; }
                else $out[$section][$k] = (string)$v;
            }
        }
        echo json_encode($out);
    "#;
    let output = Command::new("php")
        .args(["-n", "-r", script])
        .arg(path)
        .output()
        .expect(
            "the php CLI is required for this test (it hosts the extension): install php8.2-cli",
        );
    assert!(
        output.status.success(),
        "php failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("php printed JSON")
}

#[test]
fn values_match_php_parse_ini_file() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = concat!(
        "; every value form PHP's INI scanner knows, in a section without inheritance\n",
        "[p]\n",
        "a = \"x \\\"y\\\" \\\\ \\$ \\n C:\\dir\"\n",
        "b = 'raw \\\" ${HOME} ; not a comment'\n",
        "c = bare value ; comment\n",
        "d = \"semi;colon\" ; comment\n",
        "e = APPLICATION_PATH \"/../library\"\n",
        "f =\n",
        "g = \"\"\n",
        "h = true\n",
        "i = \"true\"\n",
        "j = None\n",
        "k = 'multi\nline'\n",
        "l = 0\n",
        "m = \"C:\\path\\\"\n",
        "n = \"\\${PATH}\"\n",
        "o = \"x${PATH}y\"\n",
        "p = ${PATH}\n",
        "q = Yes\n",
        "r = a b   c\n",
        "s = \"a\" b \"c\"\n",
        "t = \"a\"   'b'\n",
        "u = foo#bar\n",
        "v = OFF\n",
        "w = null\n",
        "x = \"multi\n  line \\\"quoted\\\"\"\n",
        "y = 'it''s'\n",
        "z = \"tab\there\"\n",
        "arr[] = one\n",
        "arr[] = two\n",
        "map[key] = three\n",
        "email.PASSWORD = 'p@ss\"w0rd;#$'\n",
        "email.DISPLAY_NAME = \"PCR-360 Master (team360)\"\n",
        "   indented = yes   ; trailing\n",
        "crlf = \"value\"\r\n",
        "last = 1",
    );
    let path = dir.path().join("corpus.ini");
    std::fs::write(&path, corpus).unwrap();
    let php = php_parse(&path);
    let ours = IniFile::load(&path).unwrap().section("p").unwrap();
    let php_p = &php["p"];
    let our_keys: Vec<&str> = ours.keys().collect();
    let php_keys: Vec<&str> = php_p.keys().map(String::as_str).collect();
    assert_eq!(our_keys, php_keys);
    for (key, value) in php_p {
        assert_eq!(ours.get(key).unwrap().text(), value, "key {key}");
    }
}

#[test]
fn seed_matches_php_too() {
    let php = php_parse(&fixture("seed.ini"));
    let ini = IniFile::load(&fixture("seed.ini")).unwrap();
    let prod = ini.section("prod").unwrap();
    for (key, value) in &php["prod"] {
        // PHP keeps `helperPath.PCR_View_Helper[]` as an array, we as `.0`: same flattening.
        assert_eq!(prod.get(key).unwrap().text(), value, "key {key}");
    }
    assert_eq!(prod.keys().count(), php["prod"].len());
}

/// 200,000 keys (a size where a reader that is quadratic in the number of keys takes minutes):
/// every value is right, a later key overrides an earlier one, and `[test : prod]` inherits
/// and overrides.
#[test]
fn two_hundred_thousand_keys() {
    const N: usize = 200_000;
    let mut text = String::with_capacity(N * 24);
    text.push_str("[prod]\n");
    for i in 0..N {
        text.push_str(&format!("app.key{i} = \"value {i}\"\n"));
    }
    // Later lines override earlier ones (the first key, one in the middle, the last).
    text.push_str("app.key0 = overridden\napp.key100000 = \"also\"\n");
    text.push_str(&format!("app.key{} = last\n", N - 1));
    text.push_str("[test : prod]\napp.key7 = test\n");
    for i in 0..1000 {
        text.push_str(&format!("list[] = {i}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.ini");
    std::fs::write(&path, &text).unwrap();

    let ini = IniFile::load(&path).unwrap();
    let prod = ini.section("prod").unwrap();
    assert_eq!(prod.keys().count(), N);
    assert_eq!(prod.get("app.key0").unwrap().text(), "overridden");
    assert_eq!(prod.get("app.key0").unwrap().line, N + 2);
    assert_eq!(prod.get("app.key1").unwrap().text(), "value 1");
    assert_eq!(prod.get("app.key1").unwrap().line, 3);
    assert_eq!(prod.get("app.key100000").unwrap().text(), "also");
    assert_eq!(prod.get("app.key123456").unwrap().text(), "value 123456");
    assert_eq!(
        prod.get(&format!("app.key{}", N - 1)).unwrap().text(),
        "last"
    );
    assert!(prod.get("app.key7").unwrap().text() == "value 7");

    let test = ini.section("test").unwrap();
    assert_eq!(test.keys().count(), N + 1000);
    assert_eq!(test.get("app.key7").unwrap().text(), "test");
    assert_eq!(test.get("app.key8").unwrap().text(), "value 8");
    assert_eq!(test.get("app.key0").unwrap().text(), "overridden");
    assert_eq!(test.get("list.999").unwrap().text(), "999");
    assert_eq!(test.with_prefix("list.").count(), 1000);
}
