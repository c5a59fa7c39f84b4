//! Encrypted secrets (SPEC §7): the key file, `ENC:v1:` values and keyed hashes.
//!
//! - The key file holds 32 random bytes as one line of standard base64 (44 characters and a
//!   newline); 64 hex digits are accepted too. It is created on first use with mode 0640 and
//!   the group of its directory (a missing directory is created 02750 the same way; see
//!   [`crate::perms`]), so that cron's user (root) and the web server's user (a member of that
//!   group) both read it. Creation is atomic: the key is written to a temporary file that is
//!   then hard-linked into place, so two processes creating it at once both end up using the
//!   one key that won. A key file that others may read or write, or that its group may write,
//!   is refused.
//! - An encrypted value is `ENC:v1:<key id>:<base64(nonce || ciphertext || tag)>`: AES-256-GCM
//!   with a random 96-bit nonce and `ENC:v1:<key id>` as associated data. The key id is the
//!   first 8 hex digits of SHA-256(key): it tells which key file a value needs and is not secret.
//! - A plain (unencrypted) password still works; [`KeyStore::reveal`] reports it once per
//!   account and key per process through [`take_cleartext_warnings`], for the log.
//! - Nothing here puts a key, a plain value or ciphertext into an error or `Debug` output.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::account::Secret;
use super::files;
use crate::error::{ConfigLocation, Error, Result};

/// The prefix of every encrypted value (any version).
pub const ENCRYPTED_PREFIX: &str = "ENC:";
const V1_PREFIX: &str = "ENC:v1:";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// True when `value` is in the encrypted form (and so must be decrypted, never used as is).
pub fn is_encrypted(value: &str) -> bool {
    value.trim_start().starts_with(ENCRYPTED_PREFIX)
}

/// The installation's secret key (from the key file named by `Settings::key_file`).
pub struct KeyStore {
    key: [u8; 32],
    id: String,
    path: PathBuf,
    created: bool,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .field("key_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Opens the key file at `path`, creating it (mode 0640, the group of its directory, with a
    /// new random key) if missing.
    /// Anything but a regular file (a FIFO, a device) is refused before it is opened.
    pub fn open(path: &Path) -> Result<KeyStore> {
        for _ in 0..5 {
            match files::open_regular(path) {
                Ok(opened) => return read_key(opened, path, false),
                Err(e) if e.io_kind() == Some(ErrorKind::NotFound) => {
                    if let Some(store) = create_key(path)? {
                        return Ok(store);
                    }
                    // Another process created it first: read theirs.
                }
                Err(e) => return Err(unreadable(path, &e)),
            }
        }
        Err(key_error(
            path,
            "the key file keeps disappearing while it is being opened",
        ))
    }

    /// Opens an existing key file; a missing one is an error (decrypting with a brand-new key
    /// could never succeed).
    pub fn open_existing(path: &Path) -> Result<KeyStore> {
        match files::open_regular(path) {
            Ok(opened) => read_key(opened, path, false),
            Err(e) if e.io_kind() == Some(ErrorKind::NotFound) => Err(key_error(
                path,
                "the key file does not exist, so encrypted values cannot be decrypted \
                 (was the configuration copied without its key file?)",
            )),
            Err(e) => Err(unreadable(path, &e)),
        }
    }

    /// A key store over a given key, not backed by a file (tests, tools).
    pub fn from_key(key: [u8; 32]) -> KeyStore {
        KeyStore {
            id: key_id_of(&key),
            key,
            path: PathBuf::from("<in memory>"),
            created: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when this call to [`KeyStore::open`] created the key file.
    pub fn created(&self) -> bool {
        self.created
    }

    /// The key's public id: the first 8 hex digits of SHA-256(key).
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Encrypts `plain` as `ENC:v1:<key id>:<base64>`.
    pub fn encrypt(&self, plain: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let header = format!("{V1_PREFIX}{}", self.id);
        let sealed = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: header.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        format!("{header}:{}", BASE64.encode(blob))
    }

    /// Decrypts an `ENC:v1:` value. Errors name the key file, never the value.
    pub fn decrypt(&self, value: &str) -> Result<Secret> {
        self.decrypt_at(
            value,
            ConfigLocation {
                file: Some(self.path.display().to_string()),
                ..Default::default()
            },
        )
    }

    /// Decrypts an `ENC:v1:` value; an error carries `location` (the INI line or the account
    /// and key the value came from).
    pub fn decrypt_at(&self, value: &str, location: ConfigLocation) -> Result<Secret> {
        self.try_decrypt(value.trim())
            .map(Secret::new)
            .map_err(|problem| Error::config(location, problem.describe(self)))
    }

    /// The usable value of a password or secret read from `account`'s `key`: an `ENC:` value
    /// is decrypted; a plain one is returned as is and reported once (per account and key, per
    /// process) by [`take_cleartext_warnings`].
    pub fn reveal(&self, value: &str, account: &str, key: &str) -> Result<Secret> {
        if is_encrypted(value) {
            self.decrypt_at(
                value,
                ConfigLocation {
                    account: Some(account.to_string()),
                    key: Some(key.to_string()),
                    ..Default::default()
                },
            )
        } else {
            note_cleartext(account, key, value);
            Ok(Secret::new(value))
        }
    }

    /// A sub-key for one purpose: HMAC-SHA256(key, label). Used for the keyed hash in our
    /// Message-IDs and for encrypting stored tokens, so one purpose's output says nothing
    /// about another's.
    pub fn derive_key(&self, label: &str) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(&self.key).expect("a 32-byte key")
    }

    fn try_decrypt(&self, value: &str) -> std::result::Result<String, Problem> {
        let Some(rest) = value.strip_prefix(V1_PREFIX) else {
            let version = value
                .strip_prefix(ENCRYPTED_PREFIX)
                .and_then(|r| r.split(':').next())
                .filter(|v| {
                    !v.is_empty() && v.len() <= 8 && v.chars().all(|c| c.is_ascii_alphanumeric())
                });
            return Err(match version {
                Some(v) => Problem::UnknownVersion(v.to_string()),
                None => Problem::Malformed,
            });
        };
        let (id, data) = rest.split_once(':').ok_or(Problem::Malformed)?;
        if id.len() != 8 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Problem::Malformed);
        }
        if !id.eq_ignore_ascii_case(&self.id) {
            return Err(Problem::OtherKey(id.to_ascii_lowercase()));
        }
        let blob = BASE64.decode(data).map_err(|_| Problem::Malformed)?;
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(Problem::Malformed);
        }
        let header = format!("{V1_PREFIX}{}", self.id);
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let plain = self
            .cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: header.as_bytes(),
                },
            )
            .map_err(|_| Problem::Tampered)?;
        String::from_utf8(plain).map_err(|_| Problem::Tampered)
    }
}

/// Why an encrypted value could not be used (never holds any part of it but its key id).
enum Problem {
    Malformed,
    UnknownVersion(String),
    OtherKey(String),
    Tampered,
}

impl Problem {
    fn describe(&self, store: &KeyStore) -> String {
        match self {
            Problem::Malformed => "the encrypted value is malformed (expected \
                 ENC:v1:<key id>:<base64>; was it cut short when copied?)"
                .to_string(),
            Problem::UnknownVersion(v) => format!(
                "the value is encrypted in an unknown format (ENC:{v}); this version reads ENC:v1"
            ),
            Problem::OtherKey(id) => format!(
                "the value was encrypted with another key (key id {id}), not with the key file \
                 {} (key id {}); encrypt it again with this installation's key",
                store.path.display(),
                store.id
            ),
            Problem::Tampered => {
                "the encrypted value cannot be decrypted (tampered or wrong key)".to_string()
            }
        }
    }
}

fn key_id_of(key: &[u8; 32]) -> String {
    let digest = Sha256::digest(key);
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn key_error(path: &Path, message: impl Into<String>) -> Error {
    Error::config(
        ConfigLocation {
            file: Some(path.display().to_string()),
            key: Some("KEY_FILE".to_string()),
            ..Default::default()
        },
        message,
    )
}

fn unreadable(path: &Path, e: &files::FileProblem) -> Error {
    let hint = match e {
        files::FileProblem::Io(io) if crate::perms::is_access_error(io) => format!(
            "; this process runs as {}: the web server's user and cron's user must both read \
             it, so give it their shared group and mode 0640: chgrp www-data {p} && chmod 640 {p} \
             (and let that group into its directory; see the README, \"Two users, one \
             installation\")",
            crate::perms::whoami(),
            p = path.display()
        ),
        _ => String::new(),
    };
    key_error(path, format!("cannot read the key file: {e}{hint}"))
}

/// The mode bits a key file must not have: any access for others, and write for its group
/// (the group that may read it: the web server's).
const KEY_FORBIDDEN_BITS: u32 = 0o027;

/// The mode of a new key file: the owner reads and writes, its group reads.
pub const KEY_FILE_MODE: u32 = 0o640;

/// Reads and checks an opened key file (a regular file: see [`files::open_regular`]), at most
/// [`files::KEY_FILE_LIMIT`] bytes.
fn read_key(opened: (File, std::fs::Metadata), path: &Path, created: bool) -> Result<KeyStore> {
    let (mut file, meta) = opened;
    let mode = meta.mode() & 0o777;
    if mode & KEY_FORBIDDEN_BITS != 0 {
        let who = if mode & 0o007 != 0 {
            "open to others"
        } else {
            "writable by its group"
        };
        return Err(key_error(
            path,
            format!(
                "the key file is {who} (mode {mode:04o}); it is refused until you run: \
                 chmod 640 {}",
                path.display()
            ),
        ));
    }
    let mut text = String::new();
    // A key file created by the non-atomic fallback may still be empty for a moment.
    for attempt in 0..50 {
        let bytes = files::read_open_limited(&mut file, files::KEY_FILE_LIMIT)
            .map_err(|e| unreadable(path, &e))?;
        text = String::from_utf8(bytes)
            .map_err(|_| key_error(path, "the key file does not hold a key (it is not text)"))?;
        if !text.trim().is_empty() || attempt == 49 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        file = files::open_regular(path)
            .map_err(|e| unreadable(path, &e))?
            .0;
    }
    let key = decode_key(text.trim()).ok_or_else(|| {
        key_error(
            path,
            "the key file does not hold a key (expected 32 bytes as base64 on one line)",
        )
    })?;
    Ok(KeyStore {
        id: key_id_of(&key),
        key,
        path: path.to_path_buf(),
        created,
    })
}

fn decode_key(text: &str) -> Option<[u8; 32]> {
    let bytes = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else {
        BASE64.decode(text).ok()?
    };
    bytes.try_into().ok()
}

/// Removes a temporary file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Creates the key file. `Ok(None)` when another process created it first.
fn create_key(path: &Path) -> Result<Option<KeyStore>> {
    let parent = crate::perms::parent_of(path);
    crate::perms::create_dir_all(&parent, 0o2750).map_err(|e| {
        key_error(
            path,
            format!(
                "cannot create the key file's directory: {e}{}",
                hint(&e, &parent)
            ),
        )
    })?;

    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let contents = format!("{}\n", BASE64.encode(key));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".to_string());
    let tmp = TempFile(parent.join(format!(
        ".{file_name}.tmp.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )));
    write_new(&tmp.0, &contents).map_err(|e| {
        key_error(
            path,
            format!("cannot create the key file: {e}{}", hint(&e, &parent)),
        )
    })?;

    match std::fs::hard_link(&tmp.0, path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(None),
        Err(_) => {
            // A filesystem without hard links: exclusive create in place. A reader racing us
            // may see it empty for a moment; `read_key` waits for the content.
            match write_new(path, &contents) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(None),
                Err(e) => {
                    return Err(key_error(
                        path,
                        format!("cannot create the key file: {e}{}", hint(&e, &parent)),
                    ))
                }
            }
        }
    }
    drop(tmp);
    if let Ok(dir) = File::open(&parent) {
        let _ = dir.sync_all();
    }
    Ok(Some(KeyStore {
        id: key_id_of(&key),
        key,
        path: path.to_path_buf(),
        created: true,
    }))
}

/// "; this process runs as ..." when `e` is a permission problem in `dir`.
fn hint(e: &std::io::Error, dir: &Path) -> String {
    if crate::perms::is_access_error(e) {
        format!(
            "; this process runs as {} and may not create files in {}: create the key file once \
             as the directory's owner (pcr-email-encrypt does, e.g. as root), and it is made \
             readable by the directory's group (see the README, \"Two users, one installation\")",
            crate::perms::whoami(),
            dir.display()
        )
    } else {
        String::new()
    }
}

/// Writes a new key file: the group of its directory and [`KEY_FILE_MODE`] are set before the
/// key is written (whatever the umask).
fn write_new(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut file = crate::perms::create_new(path, KEY_FILE_MODE, false)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

struct Cleartext {
    seen: BTreeSet<(String, String)>,
    pending: Vec<String>,
}

static CLEARTEXT: Mutex<Cleartext> = Mutex::new(Cleartext {
    seen: BTreeSet::new(),
    pending: Vec::new(),
});

/// Records that `account`'s `key` holds a plain (unencrypted) value; reported once per process.
pub(crate) fn note_cleartext(account: &str, key: &str, value: &str) {
    if value.is_empty() {
        return;
    }
    let mut registry = CLEARTEXT.lock().unwrap_or_else(|p| p.into_inner());
    if registry.seen.insert((account.to_string(), key.to_string())) {
        registry.pending.push(format!(
            "account {account}: {key} is stored in clear; encrypt it with \
             pcr-email-encrypt (or PCR_Utility_EmailManager::encryptPassword)"
        ));
    }
}

/// The "stored in clear" notices not yet taken, each once per account and key per process;
/// the caller logs them. Never holds a secret.
pub fn take_cleartext_warnings() -> Vec<String> {
    let mut registry = CLEARTEXT.lock().unwrap_or_else(|p| p.into_inner());
    std::mem::take(&mut registry.pending)
}

/// What `encryptPassword` and `pcr-email-encrypt` do: encrypts `plain` with the key file that
/// environment `env` of the INI file `ini` names (creating the key file if missing).
pub fn encrypt_for_config(plain: &str, ini: &Path, env: &str) -> Result<String> {
    check_plain(plain)?;
    let key_file = super::Settings::key_file_for(ini, env)?;
    let store = KeyStore::open(&key_file)?;
    Ok(store.encrypt(plain))
}

/// Refuses what is pointless to encrypt (never echoing it).
pub fn check_plain(plain: &str) -> Result<()> {
    if plain.is_empty() {
        return Err(Error::message("nothing to encrypt: the value is empty"));
    }
    if is_encrypted(plain) {
        return Err(Error::message(
            "the value is already encrypted (it starts with ENC:)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> KeyStore {
        KeyStore::from_key([7u8; 32])
    }

    #[test]
    fn round_trip_and_format() {
        let s = store();
        let enc = s.encrypt("pässword with spaces ");
        let parts: Vec<&str> = enc.splitn(4, ':').collect();
        assert_eq!(parts[0], "ENC");
        assert_eq!(parts[1], "v1");
        assert_eq!(parts[2], s.key_id());
        assert_eq!(s.key_id().len(), 8);
        let blob = BASE64.decode(parts[3]).unwrap();
        assert_eq!(blob.len(), 12 + "pässword with spaces ".len() + 16);
        assert_eq!(s.decrypt(&enc).unwrap().expose(), "pässword with spaces ");
        // A fresh nonce every time.
        assert_ne!(s.encrypt("x"), s.encrypt("x"));
        // Surrounding whitespace (a copied value) is tolerated.
        assert_eq!(
            s.decrypt(&format!("  {enc}\n")).unwrap().expose(),
            "pässword with spaces "
        );
    }

    #[test]
    fn key_id_is_sha256_prefix() {
        let s = store();
        let full = Sha256::digest([7u8; 32]);
        assert_eq!(
            s.key_id(),
            format!(
                "{:02x}{:02x}{:02x}{:02x}",
                full[0], full[1], full[2], full[3]
            )
        );
    }

    #[test]
    fn tampered_values_are_refused() {
        let s = store();
        let enc = s.encrypt("secret-value");
        let (head, data) = enc.rsplit_once(':').unwrap();
        let mut blob = BASE64.decode(data).unwrap();
        for i in [0, 12, blob.len() - 1] {
            blob[i] ^= 1;
            let bad = format!("{head}:{}", BASE64.encode(&blob));
            let e = s.decrypt(&bad).unwrap_err().to_string();
            assert!(
                e.contains("cannot be decrypted (tampered or wrong key)"),
                "{e}"
            );
            blob[i] ^= 1;
        }
        let e = s
            .decrypt(&format!("{head}:{}", &data[..10]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("malformed"), "{e}");
        let e = s.decrypt("ENC:v1:zz").unwrap_err().to_string();
        assert!(e.contains("malformed"), "{e}");
        let e = s.decrypt("ENC:v9:abcd:xyz").unwrap_err().to_string();
        assert!(e.contains("unknown format (ENC:v9)"), "{e}");
    }

    #[test]
    fn a_value_from_another_key_names_both_ids() {
        let other = KeyStore::from_key([9u8; 32]);
        let enc = other.encrypt("secret-value");
        let e = store().decrypt(&enc).unwrap_err().to_string();
        assert!(e.contains("encrypted with another key"), "{e}");
        assert!(
            e.contains(other.key_id()) && e.contains(store().key_id()),
            "{e}"
        );
        assert!(!e.contains("secret-value"));
    }

    #[test]
    fn changing_the_key_id_is_detected() {
        // Re-labelling a value with this key's id does not make it decrypt.
        let other = KeyStore::from_key([9u8; 32]);
        let enc = other.encrypt("x");
        let relabelled = enc.replace(other.key_id(), store().key_id());
        let e = store().decrypt(&relabelled).unwrap_err().to_string();
        assert!(e.contains("tampered"), "{e}");
    }

    #[test]
    fn reveal_reports_cleartext_once_per_account_and_key() {
        let s = store();
        let acct = "reveal-test-acct";
        assert_eq!(
            s.reveal("plain-pw", acct, "PASSWORD").unwrap().expose(),
            "plain-pw"
        );
        assert_eq!(
            s.reveal("plain-pw", acct, "PASSWORD").unwrap().expose(),
            "plain-pw"
        );
        let enc = s.encrypt("enc-pw");
        assert_eq!(
            s.reveal(&enc, acct, "OAUTH.SECRET_KEY").unwrap().expose(),
            "enc-pw"
        );
        let warnings: Vec<String> = take_cleartext_warnings()
            .into_iter()
            .filter(|w| w.contains(acct))
            .collect();
        assert_eq!(
            warnings,
            vec![format!(
                "account {acct}: PASSWORD is stored in clear; encrypt it with pcr-email-encrypt \
                 (or PCR_Utility_EmailManager::encryptPassword)"
            )]
        );
        s.reveal("plain-pw", acct, "PASSWORD").unwrap();
        assert!(take_cleartext_warnings().iter().all(|w| !w.contains(acct)));
        // The error of a bad encrypted value names the account and key.
        let e = s
            .reveal("ENC:v1:00000000:AAAA", "77", "PASSWORD")
            .unwrap_err()
            .to_string();
        assert!(e.contains("account 77, key PASSWORD"), "{e}");
    }

    #[test]
    fn derived_keys_differ_by_label_and_key() {
        let s = store();
        assert_eq!(s.derive_key("message-id"), s.derive_key("message-id"));
        assert_ne!(s.derive_key("message-id"), s.derive_key("tokens"));
        assert_ne!(
            s.derive_key("message-id"),
            KeyStore::from_key([9; 32]).derive_key("message-id")
        );
        // HMAC-SHA256 test vector check (RFC 4231 case 2).
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let out: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(out[..4], [0x5b, 0xdc, 0xc1, 0x46]);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let s = store();
        let dbg = format!("{s:?}");
        assert!(dbg.contains(s.key_id()));
        assert!(!dbg.contains("7, 7"), "{dbg}");
        assert!(!dbg.contains(&BASE64.encode([7u8; 32])), "{dbg}");
    }

    #[test]
    fn check_plain_refuses_empty_and_encrypted() {
        assert!(check_plain("").is_err());
        assert!(check_plain("ENC:v1:abc").is_err());
        assert!(check_plain("ok").is_ok());
    }
}
