//! One TLS trust policy for the two TLS stacks: a mailbox or SMTP socket (OpenSSL, through
//! `net::tls_connector`) and a cloud request (ureq, through `HttpClient`) of an account with
//! the same `VERIFY_CERT` / `CA_FILE` reach the same verdict on the same server, and refuse the
//! same broken `CA_FILE` with the same configuration error.
//!
//! Self-contained: a CA and a server certificate (for `localhost` and 127.0.0.1) are made
//! here, and one loopback TLS server answers both (a handshake, then an HTTP reply).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslMethod};
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Name, X509};

use pcr_email::config::TlsSettings;
use pcr_email::http::{HttpClient, Method, Request};
use pcr_email::net::{self, MaybeTls};

fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(cn: &str) -> X509Name {
    let mut name = X509Name::builder().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    name.build()
}

/// A certificate for `cn`, signed by `issuer` (self-signed when `None`).
fn certificate(
    cn: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    ca: bool,
) -> X509 {
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    cert.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    cert.set_subject_name(&name(cn)).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    cert.set_pubkey(key).unwrap();
    match issuer {
        Some((issuer_cert, _)) => cert.set_issuer_name(issuer_cert.subject_name()).unwrap(),
        None => cert.set_issuer_name(&name(cn)).unwrap(),
    }
    if ca {
        cert.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        cert.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
    } else {
        let san = SubjectAlternativeName::new()
            .dns("localhost")
            .ip("127.0.0.1")
            .build(&cert.x509v3_context(issuer.map(|(c, _)| &**c), None))
            .unwrap();
        cert.append_extension(san).unwrap();
    }
    let signer = issuer.map_or(key, |(_, k)| k);
    cert.sign(signer, MessageDigest::sha256()).unwrap();
    cert.build()
}

struct Pki {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    /// A PEM block whose body is not base64 of a certificate.
    corrupt_file: PathBuf,
    /// A file with no PEM certificate at all.
    empty_file: PathBuf,
    server_cert: X509,
    server_key: PKey<Private>,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = key();
    let ca = certificate("pcr_email tls_policy test CA", &ca_key, None, true);
    let server_key = key();
    let server_cert = certificate("localhost", &server_key, Some((&ca, &ca_key)), false);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.to_pem().unwrap()).unwrap();
    let corrupt_file = dir.path().join("corrupt.pem");
    std::fs::write(
        &corrupt_file,
        "-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGUgYXQgYWxs\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let empty_file = dir.path().join("notes.txt");
    std::fs::write(&empty_file, "this is not a certificate\n").unwrap();
    Pki {
        _dir: dir,
        ca_file,
        corrupt_file,
        empty_file,
        server_cert,
        server_key,
    }
}

/// A TLS server on loopback: every connection gets a handshake and, when a request follows,
/// an HTTP 200 reply. Returns its port.
fn serve(pki: &Pki) -> u16 {
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
    acceptor.set_private_key(&pki.server_key).unwrap();
    acceptor.set_certificate(&pki.server_cert).unwrap();
    let acceptor = Arc::new(acceptor.build());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let acceptor = acceptor.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(mut tls) = acceptor.accept(conn) else {
                    return;
                };
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      Content-Length: 2\r\nConnection: close\r\n\r\n{}",
                );
                let _ = tls.shutdown();
            });
        }
    });
    port
}

/// What the socket path (IMAP, POP3, SMTP) makes of `tls` against the server at `host`.
fn socket_verdict(tls: &TlsSettings, host: &str, port: u16) -> Result<(), String> {
    let connector = net::tls_connector(tls).map_err(|e| e.to_string())?;
    let tcp = net::connect_tcp("127.0.0.1", port, Duration::from_secs(5))
        .map_err(|e| net::describe_io_error(&e))?;
    MaybeTls::start_tls(&connector, host, tcp)
        .map(|_| ())
        .map_err(|e| net::describe_io_error(&e))
}

/// What the HTTP path (Graph, Gmail, the token endpoints) makes of `tls` against the server
/// at `host`.
fn http_verdict(tls: &TlsSettings, host: &str, port: u16) -> Result<(), String> {
    let client = HttpClient::new(tls, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    client
        .execute(&Request::new(
            Method::Get,
            &format!("https://{host}:{port}/v1.0/me"),
        ))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn settings(verify_cert: bool, ca_file: Option<&Path>) -> TlsSettings {
    TlsSettings {
        verify_cert,
        ca_file: ca_file.map(Path::to_path_buf),
    }
}

#[test]
fn sockets_and_http_trust_the_same_servers() {
    let pki = pki();
    let port = serve(&pki);
    for host in ["localhost", "127.0.0.1"] {
        // CA_FILE names the issuer: both trust the server.
        let with_ca = settings(true, Some(&pki.ca_file));
        socket_verdict(&with_ca, host, port).expect("the socket trusts CA_FILE's CA");
        http_verdict(&with_ca, host, port).expect("the HTTP client trusts CA_FILE's CA");

        // No CA_FILE: the issuer is no system root; both refuse, and both say what to do.
        let system_only = settings(true, None);
        let socket = socket_verdict(&system_only, host, port).unwrap_err();
        let http = http_verdict(&system_only, host, port).unwrap_err();
        for text in [&socket, &http] {
            assert!(
                text.contains("TLS certificate verification failed"),
                "{text}"
            );
            assert!(text.contains("CA_FILE"), "{text}");
        }

        // VERIFY_CERT = false: both accept the unknown issuer.
        let no_checks = settings(false, None);
        socket_verdict(&no_checks, host, port).expect("VERIFY_CERT = false: the socket accepts");
        http_verdict(&no_checks, host, port).expect("VERIFY_CERT = false: HTTP accepts");
    }
}

#[test]
fn a_broken_ca_file_is_the_same_configuration_error_for_sockets_and_http() {
    let pki = pki();
    let missing = pki.ca_file.with_file_name("missing.pem");
    let cases = [
        (missing.as_path(), "cannot read the CA file"),
        (
            pki.corrupt_file.as_path(),
            "the CA file is not a valid PEM certificate file",
        ),
        (
            pki.empty_file.as_path(),
            "the CA file holds no PEM certificate",
        ),
    ];
    for (file, problem) in cases {
        // Whatever VERIFY_CERT says: a broken CA_FILE is a configuration error to fix.
        for verify_cert in [true, false] {
            let tls = settings(verify_cert, Some(file));
            let socket = net::tls_connector(&tls).map(|_| ()).unwrap_err();
            let http = HttpClient::new(&tls, Duration::from_secs(5))
                .map(|_| ())
                .unwrap_err();
            assert_eq!(
                socket.to_string(),
                http.to_string(),
                "VERIFY_CERT = {verify_cert}, CA_FILE = {}",
                file.display()
            );
            let text = socket.to_string();
            assert!(text.contains(problem), "{text}");
            assert!(text.contains("CA_FILE"), "{text}");
            assert!(text.contains(&file.display().to_string()), "{text}");
        }
    }
}
