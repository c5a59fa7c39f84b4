//! The system's trusted roots, as the in-house clients (IMAP, POP3, SMTP) use them: found in
//! a hashed certificate directory (OpenSSL's `SSL_CERT_DIR`, Debian's /etc/ssl/certs) only
//! when a chain needs them. The test CA is put into such a directory of its own, named by its
//! subject hash as `c_rehash` names it; with that directory as a system directory, Dovecot's
//! certificate is trusted without CA_FILE; a bundle named by `SSL_CERT_FILE` is read too. One
//! test in its own process: it sets the environment before any TLS is set up.

mod common;

use std::time::Duration;

use pcr_email::config::TlsSettings;
use pcr_email::net::{self, MaybeTls};

fn handshake(settings: &TlsSettings) -> Result<(), String> {
    let connector = net::tls_connector(settings).map_err(|e| e.to_string())?;
    let tcp = net::connect_tcp(
        &common::host(),
        common::port("PCR_IMAPS_PORT"),
        Duration::from_secs(10),
    )
    .map_err(|e| net::describe_io_error(&e))?;
    MaybeTls::start_tls(&connector, &common::tls_host(), tcp)
        .map(|_| ())
        .map_err(|e| net::describe_io_error(&e))
}

#[test]
fn a_ca_in_a_hashed_system_directory_is_trusted_without_ca_file() {
    let pem = std::fs::read(common::ca_file()).unwrap();
    let ca = openssl::x509::X509::from_pem(&pem).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hashed = dir.path().join(format!("{:08x}.0", ca.subject_name_hash()));
    std::fs::write(&hashed, &pem).unwrap();
    // The environment OpenSSL (and openssl-probe) read; set before any connector is built.
    std::env::set_var("SSL_CERT_DIR", dir.path());

    let system_only = TlsSettings {
        verify_cert: true,
        ca_file: None,
    };
    handshake(&system_only).expect("the test CA, found in the hashed directory, is trusted");

    // The same directory without the hashed name: the CA is not found, the server is not
    // trusted, and the error says what to do.
    std::fs::rename(&hashed, dir.path().join("test-ca.pem")).unwrap();
    // A new connector (the cache is keyed by settings: a CA_FILE that adds nothing useful).
    let unrelated = dir.path().join("unrelated.pem");
    let other =
        openssl::x509::X509::from_pem(&std::fs::read(common::env("PCR_TEST_OTHER_CERT")).unwrap())
            .unwrap();
    std::fs::write(&unrelated, other.to_pem().unwrap()).unwrap();
    let err = handshake(&TlsSettings {
        verify_cert: true,
        ca_file: Some(unrelated),
    })
    .expect_err("without the hashed name the test CA is unknown");
    assert!(err.contains("certificate verification failed"), "{err}");
    assert!(err.contains("CA_FILE"), "{err}");

    // A bundle named by SSL_CERT_FILE is read even though hashed directories exist.
    std::env::set_var("SSL_CERT_FILE", dir.path().join("test-ca.pem"));
    let unrelated_again = dir.path().join("unrelated-again.pem");
    std::fs::write(&unrelated_again, other.to_pem().unwrap()).unwrap();
    handshake(&TlsSettings {
        verify_cert: true,
        ca_file: Some(unrelated_again),
    })
    .expect("the test CA, named by SSL_CERT_FILE, is trusted");
}
