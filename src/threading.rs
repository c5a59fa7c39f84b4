//! Message-IDs that carry a keyed hash, so a reply's `In-Reply-To`/`References` can be
//! trusted to name a Service Desk item only when this installation wrote the id.
//!
//! Format (the local part is dot-separated and never contains another dot):
//! - `<pcr.SO201700043.thread.TAG@domain>`: the item's thread root, the same for every
//!   message about the item (clients thread on it);
//! - `<pcr.SO201700043.NONCE.TAG@domain>`: one message about the item;
//! - `<pcr.NONCE@domain>`: a message about no item (not verifiable, by design).
//!
//! `TAG` is HMAC-SHA256(key, "pcr_email message-id v1" 0x00 SD 0x00 NONCE) truncated to 96
//! bits, in hex, computed over SD in upper case and NONCE in lower case (so a relay that changes
//! an id's case does not break threading). The domain is not covered, so ids stay valid when an account's address
//! changes. SD numbers are limited to `[A-Za-z0-9-]` so the id cannot be used for injection.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::error::{Error, Result};

const PREFIX: &str = "pcr";
const ROOT_NONCE: &str = "thread";
const DOMAIN_SEPARATOR: &[u8] = b"pcr_email message-id v1";
/// Tag length in bytes (96 bits).
const TAG_BYTES: usize = 12;
const NONCE_BYTES: usize = 10;
/// Longest SD number accepted in an id.
pub const MAX_SD_NUMBER_LEN: usize = 64;
/// Domain used when the From domain cannot appear in a Message-ID (non-ASCII, empty, ...).
pub const FALLBACK_DOMAIN: &str = "localhost";

/// True when `sd` may appear in a Message-ID: 1 to 64 characters of `[A-Za-z0-9-]`.
pub fn valid_sd_number(sd: &str) -> bool {
    !sd.is_empty()
        && sd.len() <= MAX_SD_NUMBER_LEN
        && sd.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn check_sd(sd: &str) -> Result<()> {
    if valid_sd_number(sd) {
        Ok(())
    } else {
        Err(Error::message(format!(
            "sd_number {sd:?} is not usable in a Message-ID: it must be 1 to \
             {MAX_SD_NUMBER_LEN} letters, digits or '-'"
        )))
    }
}

/// The right-hand side of our Message-IDs for a From address: its domain when that is a
/// plain ASCII domain, else [`FALLBACK_DOMAIN`].
pub fn id_domain(from_email: &str) -> String {
    let domain = from_email.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..");
    if ok {
        domain.to_ascii_lowercase()
    } else {
        FALLBACK_DOMAIN.to_string()
    }
}

/// The MAC over the canonical form (SD number upper-case, nonce lower-case), so an id whose
/// case was changed in transit still verifies, to the same item.
fn mac(key: &[u8; 32], sd: &str, nonce: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(DOMAIN_SEPARATOR);
    mac.update(&[0]);
    mac.update(sd.to_ascii_uppercase().as_bytes());
    mac.update(&[0]);
    mac.update(nonce.to_ascii_lowercase().as_bytes());
    mac
}

fn tag_hex(key: &[u8; 32], sd: &str, nonce: &str) -> String {
    let full = mac(key, sd, nonce).finalize().into_bytes();
    hex(&full[..TAG_BYTES])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_nonce() -> String {
    let mut bytes = [0u8; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

/// The stable thread-root Message-ID of one Service Desk item, with angle brackets.
pub fn thread_root_id(sd: &str, key: &[u8; 32], domain: &str) -> Result<String> {
    check_sd(sd)?;
    let tag = tag_hex(key, sd, ROOT_NONCE);
    Ok(format!("<{PREFIX}.{sd}.{ROOT_NONCE}.{tag}@{domain}>"))
}

/// A new, unique Message-ID (with angle brackets). With an SD number it carries the number and
/// a tag that [`verify`] accepts; without one it is a plain random id.
pub fn message_id(sd: Option<&str>, key: &[u8; 32], domain: &str) -> Result<String> {
    let nonce = random_nonce();
    match sd {
        Some(sd) => {
            check_sd(sd)?;
            let tag = tag_hex(key, sd, &nonce);
            Ok(format!("<{PREFIX}.{sd}.{nonce}.{tag}@{domain}>"))
        }
        None => Ok(format!("<{PREFIX}.{nonce}@{domain}>")),
    }
}

/// The SD number named by `message_id` when it is one of ours with a valid tag (surrounding
/// whitespace and angle brackets are optional; letter case is not significant, and the SD
/// number comes back as the id spells it). Anything forged, altered, truncated or foreign gives
/// `None`. The comparison is constant-time.
pub fn verify(message_id: &str, key: &[u8; 32]) -> Option<String> {
    let id = message_id.trim();
    let id = match (id.strip_prefix('<'), id.strip_suffix('>')) {
        (Some(_), Some(_)) if id.len() >= 2 => id[1..id.len() - 1].trim(),
        (None, None) => id,
        _ => return None,
    };
    let (local, domain) = id.rsplit_once('@')?;
    if domain.is_empty() || domain.bytes().any(|b| b.is_ascii_whitespace() || b == b'>') {
        return None;
    }
    let mut parts = local.split('.');
    let (prefix, sd, nonce, tag) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !prefix.eq_ignore_ascii_case(PREFIX) || !valid_sd_number(sd) {
        return None;
    }
    if nonce.is_empty() || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let tag = decode_hex(tag)?;
    if tag.len() != TAG_BYTES {
        return None;
    }
    mac(key, sd, nonce).verify_truncated_left(&tag).ok()?;
    Some(sd.to_string())
}

/// The first SD number that any of `ids` verifies to (see [`verify`]).
pub fn verify_any<'a>(ids: impl IntoIterator<Item = &'a str>, key: &[u8; 32]) -> Option<String> {
    ids.into_iter().find_map(|id| verify(id, key))
}

/// The `<...>` message ids in an `In-Reply-To` or `References` header value, in order.
pub fn ids_in_header(value: &str) -> Vec<&str> {
    let mut ids = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('<') {
        let after = &rest[start..];
        match after.find('>') {
            Some(end) => {
                ids.push(&after[..=end]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    ids
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];
    const OTHER_KEY: [u8; 32] = [8u8; 32];

    #[test]
    fn message_ids_verify_to_their_sd_number() {
        let id = message_id(Some("SO201700043"), &KEY, "pcr.example.edu").unwrap();
        assert!(id.starts_with("<pcr.SO201700043."), "{id}");
        assert!(id.ends_with("@pcr.example.edu>"), "{id}");
        assert_eq!(verify(&id, &KEY).as_deref(), Some("SO201700043"));
        let root = thread_root_id("SO201700043", &KEY, "pcr.example.edu").unwrap();
        assert_eq!(verify(&root, &KEY).as_deref(), Some("SO201700043"));
    }

    #[test]
    fn thread_root_is_stable_and_message_ids_are_unique() {
        let a = thread_root_id("IQ00012", &KEY, "d.example").unwrap();
        let b = thread_root_id("IQ00012", &KEY, "d.example").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, thread_root_id("IQ00013", &KEY, "d.example").unwrap());
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| message_id(Some("IQ00012"), &KEY, "d.example").unwrap())
            .collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn plain_message_ids_name_no_item() {
        let id = message_id(None, &KEY, "d.example").unwrap();
        assert!(
            id.starts_with("<pcr.") && id.ends_with("@d.example>"),
            "{id}"
        );
        assert_eq!(verify(&id, &KEY), None);
    }

    #[test]
    fn wrong_key_and_forged_ids_are_rejected() {
        let id = message_id(Some("SO201700043"), &KEY, "d.example").unwrap();
        assert_eq!(verify(&id, &OTHER_KEY), None);
        // A forger who knows the format but not the key.
        assert_eq!(
            verify(
                "<pcr.SO201700043.0123456789abcdef0123.000000000000000000000000@d.example>",
                &KEY
            ),
            None
        );
        assert_eq!(verify("<pcr.SO201700043.thread.@d.example>", &KEY), None);
        assert_eq!(verify("", &KEY), None);
        assert_eq!(verify("<>", &KEY), None);
        assert_eq!(verify("<random@example.com>", &KEY), None);
    }

    #[test]
    fn tampering_with_any_part_is_rejected() {
        let id = message_id(Some("SO201700043"), &KEY, "d.example").unwrap();
        let inner = &id[1..id.len() - 1];
        let (local, _) = inner.rsplit_once('@').unwrap();
        let parts: Vec<&str> = local.split('.').collect();
        let (nonce, tag) = (parts[2], parts[3]);
        // Another item's number with the same nonce and tag.
        let moved = format!("<pcr.SO201700044.{nonce}.{tag}@d.example>");
        assert_eq!(verify(&moved, &KEY), None);
        // An altered nonce.
        let mut n = nonce.to_string();
        let flipped = if n.ends_with('0') { '1' } else { '0' };
        n.pop();
        n.push(flipped);
        assert_eq!(
            verify(&format!("<pcr.SO201700043.{n}.{tag}@d.example>"), &KEY),
            None
        );
        // A truncated or extended tag.
        assert_eq!(
            verify(
                &format!("<pcr.SO201700043.{nonce}.{}@d.example>", &tag[..22]),
                &KEY
            ),
            None
        );
        assert_eq!(
            verify(
                &format!("<pcr.SO201700043.{nonce}.{tag}00@d.example>",),
                &KEY
            ),
            None
        );
        // An extra dotted part.
        assert_eq!(
            verify(
                &format!("<pcr.SO201700043.x.{nonce}.{tag}@d.example>"),
                &KEY
            ),
            None
        );
        // The domain is not covered: another domain still verifies.
        assert_eq!(
            verify(
                &format!("<pcr.SO201700043.{nonce}.{tag}@other.example>"),
                &KEY
            )
            .as_deref(),
            Some("SO201700043")
        );
    }

    #[test]
    fn letter_case_is_not_significant() {
        let id = message_id(Some("SO201700043"), &KEY, "d.example").unwrap();
        assert_eq!(
            verify(&id.to_ascii_uppercase(), &KEY).as_deref(),
            Some("SO201700043")
        );
        assert_eq!(
            verify(&id.to_ascii_lowercase(), &KEY).as_deref(),
            Some("so201700043")
        );
        // Case-folding does not let a forger reach another item.
        let other = id.replace("SO201700043", "SO201700044");
        assert_eq!(verify(&other.to_ascii_lowercase(), &KEY), None);
    }

    #[test]
    fn brackets_and_whitespace_are_optional() {
        let id = message_id(Some("WO2024-00001"), &KEY, "d.example").unwrap();
        let bare = &id[1..id.len() - 1];
        assert_eq!(verify(bare, &KEY).as_deref(), Some("WO2024-00001"));
        assert_eq!(
            verify(&format!("  {id}\r\n"), &KEY).as_deref(),
            Some("WO2024-00001")
        );
        assert_eq!(
            verify(&format!("< {bare} >"), &KEY).as_deref(),
            Some("WO2024-00001")
        );
        // Unbalanced brackets or inner whitespace are not ours.
        assert_eq!(verify(&format!("<{bare}"), &KEY), None);
        assert_eq!(verify(&id.replacen('.', ". ", 1), &KEY), None);
    }

    #[test]
    fn sd_numbers_outside_the_safe_alphabet_are_refused() {
        for bad in [
            "",
            "SO 1",
            "SO.1",
            "SO>1",
            "SO\r\n1",
            "SÖ1",
            &"A".repeat(65),
        ] {
            assert!(message_id(Some(bad), &KEY, "d.example").is_err(), "{bad:?}");
            assert!(thread_root_id(bad, &KEY, "d.example").is_err(), "{bad:?}");
        }
        let err = message_id(Some("SO 1"), &KEY, "d").unwrap_err();
        assert!(matches!(err, Error::Message(_)));
        assert!(err.to_string().contains("sd_number"), "{err}");
    }

    #[test]
    fn header_values_are_scanned_for_ids() {
        let root = thread_root_id("SO201700043", &KEY, "d.example").unwrap();
        let refs = format!("<a@x.example>\r\n {root} <b@y.example>");
        let ids = ids_in_header(&refs);
        assert_eq!(ids, vec!["<a@x.example>", root.as_str(), "<b@y.example>"]);
        assert_eq!(verify_any(ids, &KEY).as_deref(), Some("SO201700043"));
        assert_eq!(verify_any(ids_in_header("<a@x> <b@y>"), &KEY), None);
    }

    #[test]
    fn id_domain_falls_back_for_unusable_domains() {
        assert_eq!(id_domain("help@PCR.Example.edu"), "pcr.example.edu");
        assert_eq!(id_domain("help@exämple.com"), FALLBACK_DOMAIN);
        assert_eq!(id_domain("nobody"), FALLBACK_DOMAIN);
        assert_eq!(id_domain("x@[127.0.0.1]"), FALLBACK_DOMAIN);
    }
}
