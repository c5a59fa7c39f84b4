//! Gmail service accounts: the key file (`SERVICE_ACCOUNT_JSON`) and the RS256-signed JWT
//! assertion of RFC 7523 (`urn:ietf:params:oauth:grant-type:jwt-bearer`), as Google documents
//! for server-to-server OAuth with domain-wide delegation.
//!
//! The signature uses OpenSSL (already linked through native-tls), not the `rsa` crate: `rsa`
//! 0.9 carries the unfixed Marvin timing advisory (RUSTSEC-2023-0071) and 0.10 needs a second
//! SHA-2 stack.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use serde_json::Value;

use crate::config::address_problem;
use crate::error::{Error, Result};

/// The account key naming the service account's key file.
pub(crate) const KEY: &str = "OAUTH.SERVICE_ACCOUNT_JSON";
/// Lifetime of an assertion: Google accepts at most one hour.
const ASSERTION_SECS: i64 = 3600;

/// A parsed service account key. Holds the private key: never printed.
pub(crate) struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: Option<String>,
    pub token_uri: Option<String>,
    private_key: PKey<Private>,
}

impl ServiceAccountKey {
    /// Parses the key file's JSON (or, when `value` is not JSON, reads the file it names).
    /// Every problem is a configuration error naming `account` and the key, never quoting it.
    pub fn parse(value: &str, account: &str) -> Result<ServiceAccountKey> {
        let bad = |message: String| Error::account_key(account, KEY, message);
        let value = value.trim();
        let text = if value.starts_with('{') {
            value.to_string()
        } else {
            std::fs::read_to_string(value).map_err(|e| {
                bad(format!(
                    "cannot read the service account key file: {}",
                    crate::net::describe_io_error(&e)
                ))
            })?
        };
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "the service account key is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let field = |name: &str| json.get(name).and_then(Value::as_str).map(str::trim);
        if let Some(kind) = field("type") {
            if kind != "service_account" {
                return Err(bad(format!(
                    "the key file is of type `{}`, not a service account key (download a JSON key \
                     of the service account from the Google Cloud console)",
                    kind.chars().take(40).collect::<String>()
                )));
            }
        }
        let client_email = field("client_email")
            .filter(|e| !e.is_empty())
            .ok_or_else(|| bad("the service account key has no `client_email`".into()))?;
        if let Some(problem) = address_problem(client_email) {
            return Err(bad(format!("the key's `client_email` {problem}")));
        }
        let pem = field("private_key")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("the service account key has no `private_key`".into()))?;
        if !pem.contains("-----BEGIN") {
            return Err(bad(
                "the key's `private_key` is not a PEM key (expected -----BEGIN PRIVATE KEY-----)"
                    .into(),
            ));
        }
        let private_key = PKey::private_key_from_pem(pem.as_bytes()).map_err(|_| {
            bad("the key's `private_key` cannot be read (a damaged or encrypted PEM key)".into())
        })?;
        if private_key.rsa().is_err() {
            return Err(bad(
                "the key's `private_key` is not an RSA key (Google signs with RS256)".into(),
            ));
        }
        let token_uri = field("token_uri")
            .filter(|u| !u.is_empty())
            .map(str::to_string);
        if let Some(uri) = &token_uri {
            if !(uri.starts_with("https://") || uri.starts_with("http://")) {
                return Err(bad("the key's `token_uri` is not a URL".into()));
            }
        }
        Ok(ServiceAccountKey {
            client_email: client_email.to_string(),
            private_key_id: field("private_key_id")
                .filter(|k| !k.is_empty())
                .map(str::to_string),
            token_uri,
            private_key,
        })
    }

    /// The signed assertion: `iss` = the service account, `sub` = the impersonated mailbox,
    /// `aud` = the token endpoint, valid from `now` for one hour.
    pub fn assertion(
        &self,
        subject: &str,
        scope: &str,
        audience: &str,
        now: i64,
        account: &str,
    ) -> Result<String> {
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.private_key_id {
            header["kid"] = Value::from(kid.as_str());
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "sub": subject,
            "scope": scope,
            "aud": audience,
            "iat": now,
            "exp": now + ASSERTION_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sign = || -> std::result::Result<Vec<u8>, openssl::error::ErrorStack> {
            let mut signer = Signer::new(MessageDigest::sha256(), &self.private_key)?;
            signer.update(signing_input.as_bytes())?;
            signer.sign_to_vec()
        };
        let signature = sign().map_err(|_| {
            Error::account_key(
                account,
                KEY,
                "the service account's private key cannot sign (RS256)",
            )
        })?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::rsa::Rsa;
    use openssl::sign::Verifier;

    fn key_json(pem: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "kid1",
            "private_key": pem,
            "client_email": "robot@p.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string()
    }

    #[test]
    fn signs_a_verifiable_rs256_assertion() {
        let rsa = Rsa::generate(2048).unwrap();
        let pkey = PKey::from_rsa(rsa).unwrap();
        let pem = String::from_utf8(pkey.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let key = ServiceAccountKey::parse(&key_json(&pem), "7").unwrap();
        let jwt = key
            .assertion(
                "box@corp.example",
                "https://mail.google.com/",
                "https://oauth2.googleapis.com/token",
                1_700_000_000,
                "7",
            )
            .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "kid1");
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "box@corp.example");
        assert_eq!(claims["iss"], "robot@p.iam.gserviceaccount.com");
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            3600
        );
        let public = PKey::public_key_from_pem(&pkey.public_key_to_pem().unwrap()).unwrap();
        let mut verifier = Verifier::new(MessageDigest::sha256(), &public).unwrap();
        verifier
            .update(format!("{}.{}", parts[0], parts[1]).as_bytes())
            .unwrap();
        assert!(verifier
            .verify(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .unwrap());
    }

    #[test]
    fn malformed_keys_are_config_errors_naming_the_key() {
        let cases = [
            ("{", "not valid JSON"),
            (r#"{"type":"authorized_user"}"#, "not a service account key"),
            (r#"{"private_key":"x"}"#, "client_email"),
            (r#"{"client_email":"a@b.c"}"#, "private_key"),
            (
                r#"{"client_email":"a@b.c","private_key":"MIIsecretbase64"}"#,
                "not a PEM key",
            ),
            (
                r#"{"client_email":"a@b.c","private_key":"-----BEGIN PRIVATE KEY-----\nMIIsecretbase64\n-----END PRIVATE KEY-----\n"}"#,
                "cannot be read",
            ),
            ("/nonexistent/key.json", "cannot read"),
        ];
        for (json, expect) in cases {
            let err = match ServiceAccountKey::parse(json, "42") {
                Ok(_) => panic!("{json} was accepted"),
                Err(e) => e,
            };
            let text = err.to_string();
            assert!(matches!(err, Error::Config { .. }), "{text}");
            assert!(text.contains("account 42"), "{text}");
            assert!(text.contains(KEY), "{text}");
            assert!(text.contains(expect), "{json}: {text}");
            assert!(!text.contains("MIIsecretbase64"), "{text}");
        }
    }

    #[test]
    fn non_rsa_keys_are_refused() {
        let ec = openssl::ec::EcKey::generate(
            &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
        )
        .unwrap();
        let pem = String::from_utf8(
            PKey::from_ec_key(ec)
                .unwrap()
                .private_key_to_pem_pkcs8()
                .unwrap(),
        )
        .unwrap();
        let err = ServiceAccountKey::parse(&key_json(&pem), "42")
            .err()
            .unwrap();
        assert!(err.to_string().contains("not an RSA key"), "{err}");
    }
}
