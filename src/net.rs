//! Network helpers shared by the in-house protocol clients (POP3, IMAP, ...): a TCP connect
//! that always has timeouts, the TLS connector built from an account's `VERIFY_CERT` /
//! `CA_FILE`, a stream that is either plain or TLS (so STARTTLS-style upgrades keep one type),
//! and messages for humans out of `io::Error`s ("timed out", "connection refused", ...).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode,
    SslOptions, SslStream, SslVerifyMode,
};
use openssl::x509::store::{X509Lookup, X509StoreBuilder};
use openssl::x509::verify::X509CheckFlags;
use openssl::x509::{X509VerifyResult, X509};

use crate::config::TlsSettings;
use crate::error::{ConfigLocation, Error};

/// The timeout used when a caller passes `Duration::ZERO` (std refuses a zero timeout, and
/// "no timeout" would allow a hang).
pub const FALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// `host:port` as it appears in error messages (IPv6 literals in brackets).
pub fn server_label(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Connects to `host:port`, trying each resolved address in turn with `timeout`, and leaves
/// the stream with read and write timeouts of `timeout` and `TCP_NODELAY` set, so no later
/// read or write can hang forever. A zero `timeout` means [`FALLBACK_TIMEOUT`].
pub fn connect_tcp(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let timeout = effective_timeout(timeout);
    let lookup_host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (lookup_host, port)
        .to_socket_addrs()
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("cannot resolve host name '{host}': {e}"),
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("host name '{host}' has no address"),
        ));
    }
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.expect("at least one address was tried"))
}

fn effective_timeout(timeout: Duration) -> Duration {
    if timeout.is_zero() {
        FALLBACK_TIMEOUT
    } else {
        timeout
    }
}

/// The TLS client configuration for one account: the system roots, plus every certificate of
/// the PEM file `CA_FILE` when set; `verify_cert = false` accepts any certificate and host name.
/// A `CA_FILE` that cannot be read or holds no certificate is a configuration error naming the
/// file and the key.
pub fn tls_connector(tls: &TlsSettings) -> crate::Result<TlsConnector> {
    // Building a connector reads CA_FILE and probes the system roots (the whole CA bundle,
    // ~20 ms of CPU, where no hashed directory exists): one per set of settings for the life
    // of the process, shared by every connection (a changed CA_FILE,
    // by size or modification time, gets a new one). Holding the lock while building makes
    // the mailbox threads of one run wait for one build instead of doing four.
    type Key = (
        Option<std::path::PathBuf>,
        Option<(u64, std::time::SystemTime)>,
        bool,
    );
    static CACHE: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<Key, TlsConnector>>,
    > = std::sync::OnceLock::new();
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
    let connector = build_tls_connector(tls)?;
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

/// The system's trusted roots, as OpenSSL finds them (`SSL_CERT_FILE`/`SSL_CERT_DIR`, else the
/// usual places): a directory of hashed names (`c_rehash`, Debian's /etc/ssl/certs) is
/// searched when a chain needs an issuer; without one, the bundle file is read. A bundle named
/// by `SSL_CERT_FILE` is always read: whoever set it wants those roots.
fn add_system_roots(store: &mut X509StoreBuilder) -> Result<(), openssl::error::ErrorStack> {
    if let Some(file) = std::env::var_os("SSL_CERT_FILE")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_file())
    {
        let lookup = store.add_lookup(X509Lookup::file())?;
        let _ = lookup.load_cert_file(&file, SslFiletype::PEM);
    }
    let probe = openssl_probe::probe();
    let hashed: Vec<&std::path::PathBuf> = probe
        .cert_dir
        .iter()
        .filter(|dir| holds_hashed_certificates(dir))
        .collect();
    if !hashed.is_empty() {
        let lookup = store.add_lookup(X509Lookup::hash_dir())?;
        for dir in hashed {
            if let Some(dir) = dir.to_str() {
                lookup.add_dir(dir, SslFiletype::PEM)?;
            }
        }
    } else if let Some(file) = &probe.cert_file {
        let lookup = store.add_lookup(X509Lookup::file())?;
        // A bundle OpenSSL cannot read leaves only CA_FILE's roots, as it would for OpenSSL.
        let _ = lookup.load_cert_file(file, SslFiletype::PEM);
    }
    Ok(())
}

/// Whether `dir` holds certificates under OpenSSL's hashed names (`5ad8a5d6.0`).
fn holds_hashed_certificates(dir: &std::path::Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match name.split_once('.') {
            Some((hash, n)) => {
                hash.len() == 8
                    && hash.bytes().all(|b| b.is_ascii_hexdigit())
                    && !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
            }
            None => false,
        }
    })
}

fn build_tls_connector(tls: &TlsSettings) -> crate::Result<TlsConnector> {
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
    if let Some(path) = &tls.ca_file {
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
        for cert in certs {
            // The same certificate twice (also among the system roots) is no error.
            let _ = roots.add_cert(cert);
        }
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
        SslMode::AUTO_RETRY | SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::ENABLE_PARTIAL_WRITE,
    );
    builder
        .set_cipher_list("DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK")
        .map_err(setup_error)?;
    if tls.verify_cert {
        add_system_roots(&mut roots).map_err(setup_error)?;
        builder.set_verify(SslVerifyMode::PEER);
    } else {
        builder.set_verify(SslVerifyMode::NONE);
    }
    builder.set_cert_store(roots.build());
    Ok(TlsConnector {
        context: builder.build(),
        verify: tls.verify_cert,
    })
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
struct TlsFailure(String);

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

/// A human description of a network error: "timed out", "connection refused", TLS and
/// certificate problems, "the server closed the connection", ...
pub fn describe_io_error(err: &io::Error) -> String {
    if let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<TlsFailure>()) {
        return tls.0.clone();
    }
    use io::ErrorKind as K;
    match err.kind() {
        // A blocking socket reports an expired SO_RCVTIMEO/SO_SNDTIMEO as WouldBlock on Unix.
        K::TimedOut | K::WouldBlock => {
            let text = err.to_string();
            if text.contains("timed out") && !text.starts_with("Resource") {
                text
            } else {
                "timed out".to_string()
            }
        }
        K::ConnectionRefused => "connection refused".to_string(),
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
            "connection closed by the server".to_string()
        }
        K::UnexpectedEof => "the server closed the connection unexpectedly".to_string(),
        K::HostUnreachable => "host unreachable".to_string(),
        K::NetworkUnreachable => "network unreachable".to_string(),
        K::AddrNotAvailable => "address not available".to_string(),
        _ => err.to_string(),
    }
}

/// A connection that is plain TCP or TLS over TCP; an in-band upgrade (STLS, STARTTLS) turns
/// `Plain` into `Tls` without changing the type the protocol client is generic over.
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(SslStream<ReadAhead<TcpStream>>),
}

impl MaybeTls {
    /// TLS over `tcp` (implicit TLS, or after the server agreed to STARTTLS/STLS), checking
    /// the server's certificate for `host` as `connector` says.
    pub fn start_tls(connector: &TlsConnector, host: &str, tcp: TcpStream) -> io::Result<MaybeTls> {
        Ok(MaybeTls::Tls(tls_handshake(
            connector,
            host,
            ReadAhead::new(tcp),
        )?))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// The TCP stream underneath (for timeouts and addresses).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_ref().get_ref(),
        }
    }

    /// Sets the read and write timeouts (zero means [`FALLBACK_TIMEOUT`]).
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        let timeout = effective_timeout(timeout);
        self.tcp().set_read_timeout(Some(timeout))?;
        self.tcp().set_write_timeout(Some(timeout))
    }

    /// Upgrades a plain stream to TLS (after the server agreed to STLS/STARTTLS). Upgrading a
    /// stream that is already TLS is an error.
    pub fn upgrade(self, connector: &TlsConnector, host: &str) -> io::Result<MaybeTls> {
        match self {
            MaybeTls::Plain(tcp) => MaybeTls::start_tls(connector, host, tcp),
            MaybeTls::Tls(_) => Err(io::Error::other("the connection already uses TLS")),
        }
    }
}

/// The size of [`ReadAhead`]'s buffer.
pub const READ_AHEAD_BYTES: usize = 64 * 1024;

/// What TLS reads from: one `recv` takes whatever the socket holds (up to
/// [`READ_AHEAD_BYTES`]) instead of OpenSSL's two per record (its 5-byte header, then the
/// rest), which was most of a mailbox thread's system calls while a download streams in.
/// Writes go straight through. Only ever under TLS: TLS reads nothing past what the server
/// sent for it, so no plain-text byte can be left behind in the buffer.
pub struct ReadAhead<S> {
    inner: S,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> ReadAhead<S> {
        ReadAhead {
            inner,
            buf: vec![0; READ_AHEAD_BYTES].into_boxed_slice(),
            pos: 0,
            len: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Read> Read for ReadAhead<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.len {
            if out.len() >= self.buf.len() {
                return self.inner.read(out);
            }
            self.len = self.inner.read(&mut self.buf)?;
            self.pos = 0;
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl<S: Write> Write for ReadAhead<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.inner.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl fmt::Debug for MaybeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_tls() { "Tls" } else { "Plain" };
        match self.tcp().peer_addr() {
            Ok(addr) => write!(f, "MaybeTls::{kind}({addr})"),
            Err(_) => write!(f, "MaybeTls::{kind}"),
        }
    }
}

impl Read for MaybeTls {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            MaybeTls::Plain(s) => s.read(buf),
            MaybeTls::Tls(s) => s.read(buf),
        }
    }
}

impl Write for MaybeTls {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MaybeTls::Plain(s) => s.write(buf),
            MaybeTls::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            MaybeTls::Plain(s) => s.flush(),
            MaybeTls::Tls(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::path::PathBuf;

    /// A source that hands out at most `chunk` bytes per read and counts the reads.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        reads: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let n = out.len().min(self.chunk).min(self.data.len() - self.at);
            out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn read_ahead_hands_over_every_byte_in_order_with_few_reads_underneath() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let source = Trickle {
            data: data.clone(),
            at: 0,
            chunk: 100_000,
            reads: 0,
        };
        let mut ahead = ReadAhead::new(source);
        let mut got = Vec::new();
        // TLS-like reads: a 5-byte header, then a record body; now and then one larger
        // than the buffer, which goes straight through.
        let mut sizes = [5usize, 16_384, 5, 1, 70_000, 5, 3_000].iter().cycle();
        loop {
            let mut buf = vec![0; *sizes.next().unwrap()];
            let n = ahead.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, data);
        // 300,000 bytes in reads of at most 64 KiB (or 70,000 straight through): a handful,
        // against hundreds of small reads without the buffer.
        assert!(ahead.get_ref().reads <= 12, "{}", ahead.get_ref().reads);
    }

    #[test]
    fn label_brackets_ipv6() {
        assert_eq!(
            server_label("mail.example.edu", 995),
            "mail.example.edu:995"
        );
        assert_eq!(server_label("::1", 110), "[::1]:110");
        assert_eq!(server_label("[::1]", 110), "[::1]:110");
    }

    #[test]
    fn connect_sets_timeouts_and_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connect_tcp("127.0.0.1", port, Duration::from_millis(1500)).unwrap();
        assert_eq!(
            stream.read_timeout().unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            stream.write_timeout().unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert!(stream.nodelay().unwrap());
        let zero = connect_tcp("localhost", port, Duration::ZERO).unwrap();
        assert_eq!(zero.read_timeout().unwrap(), Some(FALLBACK_TIMEOUT));
    }

    #[test]
    fn refused_connection_is_described() {
        // Bind then drop, so the port is (very likely) closed.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = connect_tcp("127.0.0.1", port, Duration::from_secs(2)).unwrap_err();
        assert_eq!(describe_io_error(&err), "connection refused");
    }

    #[test]
    fn unknown_host_is_described() {
        let err = connect_tcp("no-such-host.invalid", 110, Duration::from_secs(5)).unwrap_err();
        let text = describe_io_error(&err);
        assert!(
            text.contains("cannot resolve host name 'no-such-host.invalid'"),
            "{text}"
        );
    }

    #[test]
    fn read_timeout_is_described_as_timed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut stream = connect_tcp("127.0.0.1", port, Duration::from_millis(200)).unwrap();
        let _server_side = listener.accept().unwrap();
        let mut buf = [0u8; 8];
        let err = stream.read(&mut buf).unwrap_err();
        assert_eq!(describe_io_error(&err), "timed out");
    }

    #[test]
    fn tls_handshake_with_a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connect_tcp("127.0.0.1", port, Duration::from_millis(300)).unwrap();
        let _server_side = listener.accept().unwrap();
        let connector = tls_connector(&TlsSettings::default()).unwrap();
        let err = tls_handshake(&connector, "127.0.0.1", stream).unwrap_err();
        assert_eq!(describe_io_error(&err), "TLS handshake timed out");
    }

    #[test]
    fn tls_handshake_against_plain_text_server_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(b"+OK POP3 ready, no TLS here at all\r\n");
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
        });
        let stream = connect_tcp("127.0.0.1", port, Duration::from_secs(5)).unwrap();
        let connector = tls_connector(&TlsSettings::default()).unwrap();
        let err = tls_handshake(&connector, "127.0.0.1", stream).unwrap_err();
        let text = describe_io_error(&err);
        assert!(text.starts_with("TLS handshake failed"), "{text}");
        server.join().unwrap();
    }

    #[test]
    fn unreadable_ca_file_is_a_config_error_naming_file_and_key() {
        let tls = TlsSettings {
            verify_cert: true,
            ca_file: Some(PathBuf::from("/nonexistent/dir/ca.pem")),
        };
        let err = tls_connector(&tls).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(text.contains("/nonexistent/dir/ca.pem"), "{text}");
        assert!(text.contains("CA_FILE"), "{text}");
    }

    #[test]
    fn garbage_ca_file_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "this is not a certificate\n").unwrap();
        let tls = TlsSettings {
            verify_cert: true,
            ca_file: Some(path.clone()),
        };
        let err = tls_connector(&tls).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("CA_FILE"), "{text}");
    }

    #[test]
    fn tls_error_texts_are_explained() {
        let untrusted = describe_tls_error(
            "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate \
             verify failed:../ssl/statem/statem_clnt.c:1889: (self-signed certificate)",
        );
        assert!(
            untrusted.contains("(self-signed certificate)"),
            "{untrusted}"
        );
        assert!(untrusted.contains("CA_FILE"), "{untrusted}");
        let mismatch = describe_tls_error(
            "error:0A000086:SSL routines::certificate verify failed: (Hostname mismatch)",
        );
        assert!(
            mismatch.contains("does not match the server name"),
            "{mismatch}"
        );
        let plain = describe_tls_error("error:0A00010B:SSL routines::wrong version number");
        assert!(plain.contains("did not answer with TLS"), "{plain}");
    }
}
