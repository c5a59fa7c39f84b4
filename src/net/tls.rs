//! The one TLS trust policy of an account, and the two TLS stacks built from it.
//!
//! [`TlsPolicy`] is where `VERIFY_CERT`, `CA_FILE` and the system's roots (`SSL_CERT_FILE`,
//! `SSL_CERT_DIR`, the usual places) are interpreted, with their error messages: whether
//! certificates are checked, and which roots are trusted. The in-house protocol clients (IMAP,
//! POP3, SMTP) get an OpenSSL context from it ([`tls_connector`]); the HTTP client of the cloud
//! accounts (ureq over native-tls) gets its TLS configuration from it
//! ([`TlsPolicy::ureq_config`]). So a socket and an HTTP request of one account trust the same
//! roots and fail the same way on the same `CA_FILE`.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode,
    SslOptions, SslStream, SslVerifyMode,
};
use openssl::x509::store::{X509Lookup, X509StoreBuilder};
use openssl::x509::verify::X509CheckFlags;
use openssl::x509::{X509VerifyResult, X509};

use crate::config::TlsSettings;
use crate::error::{ConfigLocation, Error};

/// What one account trusts: whether certificates and host names are checked
/// (`VERIFY_CERT`), and the certificates of `CA_FILE`, trusted besides the system's roots.
///
/// `CA_FILE` is read and checked whatever `VERIFY_CERT` says (a broken file is a
/// configuration error to fix, as the configuration check says when it loads): one file that
/// cannot be read, is not PEM or holds no certificate is the same error for every protocol.
#[derive(Clone)]
pub struct TlsPolicy {
    verify: bool,
    ca_certs: Vec<X509>,
}

impl fmt::Debug for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPolicy")
            .field("verify", &self.verify)
            .field("ca_certs", &self.ca_certs.len())
            .finish()
    }
}

impl TlsPolicy {
    /// The policy of `tls`: reads `CA_FILE` when set. A `CA_FILE` that cannot be read or
    /// holds no certificate is a configuration error naming the file and the key.
    pub fn new(tls: &TlsSettings) -> crate::Result<TlsPolicy> {
        let ca_certs = match &tls.ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
        Ok(TlsPolicy {
            verify: tls.verify_cert,
            ca_certs,
        })
    }

    /// Whether certificates and host names are checked (`VERIFY_CERT`).
    pub fn verifies(&self) -> bool {
        self.verify
    }

    /// The OpenSSL client context of the in-house protocol clients: the system roots (found
    /// lazily, see [`SystemRoots`]) and `CA_FILE`'s certificates; no checking at all when
    /// `VERIFY_CERT` is false.
    fn openssl_context(&self) -> crate::Result<SslContext> {
        let setup_error = |e: openssl::error::ErrorStack| {
            Error::config(
                ConfigLocation {
                    key: Some("VERIFY_CERT".to_string()),
                    ..Default::default()
                },
                format!("cannot set up TLS: {e}"),
            )
        };
        let mut roots = X509StoreBuilder::new().map_err(setup_error)?;
        for cert in &self.ca_certs {
            // The same certificate twice (also among the system roots) is no error.
            let _ = roots.add_cert(cert.clone());
        }
        let mut builder = SslContextBuilder::new(SslMethod::tls_client()).map_err(setup_error)?;
        // What OpenSSL's client defaults lack, as the openssl crate's connector sets it, except
        // RELEASE_BUFFERS: a download would free and allocate the read buffer for every record.
        let mut options = SslOptions::ALL
            | SslOptions::NO_COMPRESSION
            | SslOptions::NO_SSLV2
            | SslOptions::NO_SSLV3
            | SslOptions::SINGLE_DH_USE
            | SslOptions::SINGLE_ECDH_USE;
        options &= !SslOptions::DONT_INSERT_EMPTY_FRAGMENTS;
        builder.set_options(options);
        builder.set_mode(
            SslMode::AUTO_RETRY
                | SslMode::ACCEPT_MOVING_WRITE_BUFFER
                | SslMode::ENABLE_PARTIAL_WRITE,
        );
        builder
            .set_cipher_list(
                "DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK",
            )
            .map_err(setup_error)?;
        if self.verify {
            SystemRoots::find()
                .add_lookups(&mut roots)
                .map_err(setup_error)?;
            builder.set_verify(SslVerifyMode::PEER);
        } else {
            builder.set_verify(SslVerifyMode::NONE);
        }
        builder.set_cert_store(roots.build());
        Ok(builder.build())
    }

    /// The TLS configuration of the HTTP client (ureq over native-tls): the same roots as
    /// the OpenSSL context (the system's, read from the same places, and `CA_FILE`'s), or no
    /// checking at all when `VERIFY_CERT` is false.
    pub fn ureq_config(&self) -> ureq::tls::TlsConfig {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let builder = TlsConfig::builder().provider(TlsProvider::NativeTls);
        if !self.verify {
            return builder
                .root_certs(RootCerts::PlatformVerifier)
                .disable_verification(true)
                .build();
        }
        // The list, not native-tls's own search (`PlatformVerifier`, which reads the bundle
        // and every directory it finds): the roots the OpenSSL context trusts, no others.
        let mut all: Vec<Certificate<'static>> = system_root_certificates().as_ref().clone();
        all.extend(
            self.ca_certs
                .iter()
                .filter_map(|cert| cert.to_der().ok())
                .map(|der| Certificate::from_der(&der).to_owned()),
        );
        builder.root_certs(RootCerts::new_with_certs(&all)).build()
    }
}

/// `CA_FILE`'s certificates, or the configuration error naming the file and the key.
fn read_ca_file(path: &Path) -> crate::Result<Vec<X509>> {
    let file = path.display().to_string();
    let ca_error = |message: String| {
        Error::config(
            ConfigLocation {
                file: Some(file.clone()),
                key: Some("CA_FILE".to_string()),
                ..Default::default()
            },
            message,
        )
    };
    let pem = crate::config::files::read_limited(path, crate::config::files::CA_FILE_LIMIT)
        .map_err(|e| ca_error(format!("cannot read the CA file: {e}")))?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| {
        ca_error(format!(
            "the CA file is not a valid PEM certificate file: {e}"
        ))
    })?;
    if certs.is_empty() {
        return Err(ca_error(
            "the CA file holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
                .to_string(),
        ));
    }
    Ok(certs)
}

/// Where the system's trusted roots are, as OpenSSL finds them (`SSL_CERT_FILE`/`SSL_CERT_DIR`,
/// else the usual places): a directory of hashed names (`c_rehash`, Debian's /etc/ssl/certs)
/// is searched when a chain needs an issuer; without one, the bundle file is read. A bundle
/// named by `SSL_CERT_FILE` is always read: whoever set it wants those roots.
struct SystemRoots {
    /// The file named by `SSL_CERT_FILE`, when it is one.
    env_file: Option<PathBuf>,
    /// The directories holding certificates under hashed names.
    hashed_dirs: Vec<PathBuf>,
    /// The bundle file, used only when no hashed directory exists.
    bundle: Option<PathBuf>,
}

impl SystemRoots {
    fn find() -> SystemRoots {
        let env_file = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .filter(|p| p.is_file());
        let probe = openssl_probe::probe();
        let hashed_dirs: Vec<PathBuf> = probe
            .cert_dir
            .into_iter()
            .filter(|dir| holds_hashed_certificates(dir))
            .collect();
        let bundle = if hashed_dirs.is_empty() {
            probe.cert_file
        } else {
            None
        };
        SystemRoots {
            env_file,
            hashed_dirs,
            bundle,
        }
    }

    /// OpenSSL lookups for these roots: the files are read now, the hashed directories only
    /// when a chain needs an issuer.
    fn add_lookups(&self, store: &mut X509StoreBuilder) -> Result<(), openssl::error::ErrorStack> {
        if let Some(file) = &self.env_file {
            let lookup = store.add_lookup(X509Lookup::file())?;
            let _ = lookup.load_cert_file(file, SslFiletype::PEM);
        }
        if !self.hashed_dirs.is_empty() {
            let lookup = store.add_lookup(X509Lookup::hash_dir())?;
            for dir in &self.hashed_dirs {
                if let Some(dir) = dir.to_str() {
                    lookup.add_dir(dir, SslFiletype::PEM)?;
                }
            }
        } else if let Some(file) = &self.bundle {
            let lookup = store.add_lookup(X509Lookup::file())?;
            // A bundle OpenSSL cannot read leaves only CA_FILE's roots, as it would for OpenSSL.
            let _ = lookup.load_cert_file(file, SslFiletype::PEM);
        }
        Ok(())
    }

    /// Every certificate of these roots, read now (for a TLS stack that takes a list): the
    /// files, and each hashed name of the hashed directories. Unreadable entries are skipped,
    /// as OpenSSL skips them.
    fn read_all(&self) -> Vec<X509> {
        let mut certs = Vec::new();
        let mut read = |path: &Path| {
            if let Ok(pem) = std::fs::read(path) {
                certs.extend(X509::stack_from_pem(&pem).unwrap_or_default());
            }
        };
        if let Some(file) = &self.env_file {
            read(file);
        }
        for dir in &self.hashed_dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<PathBuf> = entries
                .flatten()
                .filter(|entry| is_hashed_name(&entry.file_name().to_string_lossy()))
                .map(|entry| entry.path())
                .collect();
            names.sort();
            for name in names {
                read(&name);
            }
        }
        if let Some(file) = &self.bundle {
            read(file);
        }
        certs
    }
}

/// The system's roots as a list for ureq, read once per process.
fn system_root_certificates() -> Arc<Vec<ureq::tls::Certificate<'static>>> {
    static ROOTS: OnceLock<Arc<Vec<ureq::tls::Certificate<'static>>>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let certs = SystemRoots::find()
                .read_all()
                .iter()
                .filter_map(|cert| cert.to_der().ok())
                .map(|der| ureq::tls::Certificate::from_der(&der).to_owned())
                .collect();
            Arc::new(certs)
        })
        .clone()
}

/// Whether `dir` holds certificates under OpenSSL's hashed names (`5ad8a5d6.0`).
fn holds_hashed_certificates(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .any(|entry| is_hashed_name(&entry.file_name().to_string_lossy()))
}

/// OpenSSL's hashed certificate name: eight hex digits, a dot, a number (`5ad8a5d6.0`).
fn is_hashed_name(name: &str) -> bool {
    match name.split_once('.') {
        Some((hash, n)) => {
            hash.len() == 8
                && hash.bytes().all(|b| b.is_ascii_hexdigit())
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// The TLS client configuration for one account (see [`TlsPolicy`]): the system roots, plus
/// every certificate of the PEM file `CA_FILE` when set; `verify_cert = false` accepts any
/// certificate and host name. A `CA_FILE` that cannot be read or holds no certificate is a
/// configuration error naming the file and the key.
pub fn tls_connector(tls: &TlsSettings) -> crate::Result<TlsConnector> {
    // Building a connector reads CA_FILE and probes the system roots (the whole CA bundle,
    // ~20 ms of CPU, where no hashed directory exists): one per set of settings for the life
    // of the process, shared by every connection (a changed CA_FILE,
    // by size or modification time, gets a new one). Holding the lock while building makes
    // the mailbox threads of one run wait for one build instead of doing four.
    type Key = (Option<PathBuf>, Option<(u64, std::time::SystemTime)>, bool);
    static CACHE: OnceLock<std::sync::Mutex<std::collections::HashMap<Key, TlsConnector>>> =
        OnceLock::new();
    let stamp = tls.ca_file.as_ref().and_then(|p| {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.len(), meta.modified().ok()?))
    });
    let key: Key = (tls.ca_file.clone(), stamp, tls.verify_cert);
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(connector) = cache.get(&key) {
        return Ok(connector.clone());
    }
    let policy = TlsPolicy::new(tls)?;
    let connector = TlsConnector {
        context: policy.openssl_context()?,
        verify: policy.verifies(),
    };
    cache.insert(key, connector.clone());
    Ok(connector)
}

/// Starts building (in the background) the connector for `tls`, so CA_FILE and the system
/// roots (the whole bundle where no hashed directory exists) are read while the caller still
/// asks the host for its accounts: the connections that follow find
/// it ready, or wait for this one build (see [`tls_connector`]).
pub fn prewarm_tls_connector(tls: &TlsSettings) {
    let tls = tls.clone();
    let _ = std::thread::Builder::new()
        .name("pcr-email-tls".to_string())
        .spawn(move || {
            let _ = tls_connector(&tls);
        });
}

/// A TLS client configuration: the trusted roots and whether certificates and host names are
/// checked. Cheap to clone (shared).
///
/// OpenSSL directly (the TLS stack every other part uses, through native-tls): native-tls
/// builds its connector by parsing the system CA bundle, twice (OpenSSL's default paths, then
/// the bundle it finds itself): ~40 ms of CPU per process, while the hashed certificate
/// directory next to it gives OpenSSL the same roots one file at a time, only for the chains
/// it verifies.
#[derive(Clone)]
pub struct TlsConnector {
    context: SslContext,
    verify: bool,
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("verify", &self.verify)
            .finish_non_exhaustive()
    }
}

impl TlsConnector {
    fn connect<S: Read + Write>(
        &self,
        domain: &str,
        stream: S,
    ) -> Result<SslStream<S>, HandshakeError<S>> {
        let mut ssl = Ssl::new(&self.context)?;
        let ip = domain.parse::<std::net::IpAddr>().ok();
        if ip.is_none() {
            // SNI names a host, never an address (RFC 6066).
            ssl.set_hostname(domain)?;
        }
        if self.verify {
            let param = ssl.param_mut();
            param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
            match ip {
                Some(ip) => param.set_ip(ip)?,
                None => param.set_host(domain)?,
            }
        }
        ssl.connect(stream)
    }
}

/// Runs the TLS handshake over an already connected stream, verifying the certificate against
/// `host` (a name or an IP address). Failures come back as an `io::Error` whose text is meant
/// for humans (see [`describe_tls_error`]); a handshake that stalls hits the stream's timeout.
pub fn tls_handshake<S: Read + Write>(
    connector: &TlsConnector,
    host: &str,
    stream: S,
) -> io::Result<SslStream<S>> {
    let domain = host.trim_start_matches('[').trim_end_matches(']');
    match connector.connect(domain, stream) {
        Ok(stream) => Ok(stream),
        Err(HandshakeError::SetupFailure(e)) => Err(io::Error::other(TlsFailure(format!(
            "TLS handshake failed: cannot set up TLS for '{domain}': {e}"
        )))),
        Err(HandshakeError::Failure(mid)) => {
            // The certificate's verdict, when it was the problem, as "(reason)".
            let verdict = mid.ssl().verify_result();
            let raw = if verdict == X509VerifyResult::OK {
                mid.error().to_string()
            } else {
                format!("{} ({})", mid.error(), verdict.error_string())
            };
            Err(io::Error::other(TlsFailure(describe_tls_error(&raw))))
        }
        // A blocking socket only "would block" when its read/write timeout expired.
        Err(HandshakeError::WouldBlock(_)) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

/// A TLS failure carried inside an `io::Error`, already phrased for humans.
#[derive(Debug)]
pub(super) struct TlsFailure(pub(super) String);

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// Turns the TLS library's error text into a sentence saying what is wrong and what to do.
pub fn describe_tls_error(raw: &str) -> String {
    let lower = raw.to_ascii_lowercase();
    let detail = raw
        .rfind('(')
        .and_then(|start| raw[start + 1..].strip_suffix(')'))
        .unwrap_or("");
    if lower.contains("hostname mismatch") || lower.contains("ip address mismatch") {
        "TLS certificate does not match the server name (hostname mismatch); connect with the \
         name on the certificate, or set VERIFY_CERT = false"
            .to_string()
    } else if lower.contains("certificate verify failed") {
        let reason = if detail.is_empty() {
            "untrusted certificate"
        } else {
            detail
        };
        format!(
            "TLS certificate verification failed ({reason}); add the issuing CA with CA_FILE, \
             or set VERIFY_CERT = false"
        )
    } else if lower.contains("wrong version number") || lower.contains("packet length too long") {
        "TLS handshake failed: the server did not answer with TLS on this port (check the port \
         and the SSL setting)"
            .to_string()
    } else if lower.contains("unexpected eof") {
        "TLS handshake failed: the server closed the connection during the handshake".to_string()
    } else {
        format!("TLS handshake failed: {raw}")
    }
}
