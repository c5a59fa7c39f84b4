//! Network helpers shared by the in-house protocol clients (POP3, IMAP, ...): a TCP connect
//! that always has timeouts, the TLS connector built from an account's `VERIFY_CERT` /
//! `CA_FILE` (the trust policy itself, shared with the HTTP client, is in [`tls`]), a stream
//! that is either plain or TLS (so STARTTLS-style upgrades keep one type), and messages for
//! humans out of `io::Error`s ("timed out", "connection refused", ...).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use openssl::ssl::SslStream;

pub mod tls;

pub use tls::{
    describe_tls_error, prewarm_tls_connector, tls_connector, tls_handshake, TlsConnector,
    TlsPolicy,
};

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

/// A human description of a network error: "timed out", "connection refused", TLS and
/// certificate problems, "the server closed the connection", ...
pub fn describe_io_error(err: &io::Error) -> String {
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<tls::TlsFailure>())
    {
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
    use crate::config::TlsSettings;
    use crate::error::Error;
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
