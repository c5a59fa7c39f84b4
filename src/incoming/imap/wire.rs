//! The connection under the `imap` crate, shared with our own pipelined FETCH reader.
//!
//! The crate owns a buffered reader over the stream it is given. To let a second reader (the
//! streaming `UID FETCH ... BODY.PEEK[]` of [`super::fetch`]) take turns with it without losing
//! bytes, the crate is handed a [`Wire`] whose `read` never returns more than one line (up to
//! and including LF). The crate reads with `read_until(LF)`, so once it has consumed a tagged
//! reply its own buffer is empty and every byte after it is still here, in the wire's buffer.
//!
//! The wire also enforces the account's timeout: every read and write has `timeout`, and while
//! a deadline is set (connecting and logging in) each read waits at most until the deadline,
//! so a server that accepts and never answers costs at most the account timeout in total.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::net::MaybeTls;

/// What the wire needs from the connection besides bytes: a way to bound waiting.
pub trait Transport: Read + Write + Send + 'static {
    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl Transport for MaybeTls {
    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.tcp().set_read_timeout(Some(timeout))
    }
}

const BUFFER: usize = 64 * 1024;

struct Inner<S> {
    /// `None` only while being replaced (STARTTLS) or after a failed replacement.
    stream: Option<S>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    timeout: Duration,
    deadline: Option<Instant>,
    applied: Option<Duration>,
    bytes_in: u64,
    /// While set, a copy of what the crate reads (see [`Wire::start_capture`]).
    capture: Option<Vec<u8>>,
}

/// At most this much of the crate's reading is captured.
const MAX_CAPTURE: usize = 16 * 1024;

/// A shared handle on one connection (cheap to clone; all clones are the same connection).
pub struct Wire<S> {
    inner: Arc<Mutex<Inner<S>>>,
}

impl<S> Clone for Wire<S> {
    fn clone(&self) -> Self {
        Wire {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> std::fmt::Debug for Wire<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wire")
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection is closed after an earlier failure",
    )
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

impl<S: Transport> Inner<S> {
    fn stream(&mut self) -> io::Result<&mut S> {
        self.stream.as_mut().ok_or_else(closed)
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The read timeout the next read may wait: the account timeout, or less when the
    /// deadline is closer. Past the deadline: an immediate "timed out".
    fn apply_timeout(&mut self) -> io::Result<()> {
        let wait = match self.deadline {
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(timed_out());
                }
                (deadline - now).min(self.timeout)
            }
            None => self.timeout,
        }
        .max(Duration::from_millis(1));
        if self.applied != Some(wait) {
            self.stream()?.set_read_timeout(wait)?;
            self.applied = Some(wait);
        }
        Ok(())
    }

    /// Reads more bytes when the buffer is empty; `Ok(false)` at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start < self.end {
            return Ok(true);
        }
        self.apply_timeout()?;
        let Inner {
            stream, buf, end, ..
        } = self;
        let stream = stream.as_mut().ok_or_else(closed)?;
        let n = loop {
            match stream.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        self.start = 0;
        *end = n;
        self.bytes_in += n as u64;
        Ok(n > 0)
    }
}

impl<S: Transport> Wire<S> {
    /// Wraps a connected stream; every wait is bounded by `timeout` (zero: 30 s).
    pub fn new(stream: S, timeout: Duration) -> Wire<S> {
        let timeout = if timeout.is_zero() {
            crate::net::FALLBACK_TIMEOUT
        } else {
            timeout
        };
        Wire {
            inner: Arc::new(Mutex::new(Inner {
                stream: Some(stream),
                buf: vec![0u8; BUFFER].into_boxed_slice(),
                start: 0,
                end: 0,
                timeout,
                deadline: None,
                applied: None,
                bytes_in: 0,
                capture: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        // A panic while holding the lock leaves plain bytes behind; nothing to repair.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bounds every read until `deadline` (or lifts the bound with `None`).
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        self.lock().deadline = deadline;
    }

    /// Bytes received and not yet consumed by anyone.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        let inner = self.lock();
        inner.end - inner.start
    }

    /// From now on keeps a copy (up to 16 KB) of the lines the crate reads, e.g. the reply
    /// to its LOGIN, whose `[CAPABILITY ...]` code saves asking for the capabilities again.
    pub fn start_capture(&self) {
        self.lock().capture = Some(Vec::new());
    }

    /// What was captured since [`Wire::start_capture`]; stops capturing.
    pub fn take_capture(&self) -> Vec<u8> {
        self.lock().capture.take().unwrap_or_default()
    }

    /// Bytes received so far.
    pub fn bytes_in(&self) -> u64 {
        self.lock().bytes_in
    }

    /// Replaces the stream (STARTTLS). Refused while unread bytes are buffered: they were
    /// sent in clear after the server's go-ahead, i.e. a command-injection attempt.
    pub fn replace(&self, upgrade: impl FnOnce(S) -> io::Result<S>) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.start < inner.end {
            inner.stream = None;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the server sent data in clear after agreeing to STARTTLS; refusing to continue",
            ));
        }
        inner.apply_timeout()?;
        let stream = inner.stream.take().ok_or_else(closed)?;
        let upgraded = upgrade(stream)?;
        inner.stream = Some(upgraded);
        inner.applied = None;
        Ok(())
    }

    /// Sends `bytes` at once (one write, flushed).
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut inner = self.lock();
        let stream = inner.stream()?;
        stream.write_all(bytes)?;
        stream.flush()
    }

    /// Appends one line (up to and including LF) to `out`. More than `max` bytes before the
    /// LF is an error, as is the end of the stream.
    pub fn read_line(&self, out: &mut Vec<u8>, max: usize) -> io::Result<()> {
        let mut inner = self.lock();
        let mut taken = 0usize;
        loop {
            if !inner.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            let avail = inner.available();
            let (n, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(at) => (at + 1, true),
                None => (avail.len(), false),
            };
            if taken + n > max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the server sent a line longer than {max} bytes"),
                ));
            }
            out.extend_from_slice(&avail[..n]);
            inner.consume(n);
            taken += n;
            if done {
                return Ok(());
            }
        }
    }

    /// Appends exactly `n` bytes to `out` (a literal's content).
    pub fn read_exact_into(&self, out: &mut Vec<u8>, n: usize) -> io::Result<()> {
        let mut inner = self.lock();
        let mut left = n;
        while left > 0 {
            if !inner.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection in the middle of a message",
                ));
            }
            let avail = inner.available();
            let take = avail.len().min(left);
            out.extend_from_slice(&avail[..take]);
            inner.consume(take);
            left -= take;
        }
        Ok(())
    }
}

/// For the `imap` crate: at most one line per call, so the crate never buffers past a reply.
impl<S: Transport> Read for Wire<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut inner = self.lock();
        if !inner.fill()? {
            return Ok(0);
        }
        let avail = inner.available();
        let line_end = avail
            .iter()
            .position(|&b| b == b'\n')
            .map_or(avail.len(), |at| at + 1);
        let n = line_end.min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        inner.consume(n);
        if let Some(copy) = inner.capture.as_mut() {
            let room = MAX_CAPTURE.saturating_sub(copy.len());
            copy.extend_from_slice(&out[..n.min(room)]);
        }
        Ok(n)
    }
}

impl<S: Transport> Write for Wire<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.lock().stream()?.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lock().stream()?.flush()
    }
}

#[cfg(test)]
pub(crate) mod mock {
    //! An in-memory server: replies are served in chunks of a chosen size, and everything the
    //! client wrote is kept for assertions.
    use super::*;

    #[derive(Clone)]
    pub struct MockStream {
        pub input: Arc<Mutex<(Vec<u8>, usize)>>,
        pub written: Arc<Mutex<Vec<u8>>>,
        pub chunk: usize,
    }

    impl MockStream {
        pub fn new(input: &[u8], chunk: usize) -> MockStream {
            MockStream {
                input: Arc::new(Mutex::new((input.to_vec(), 0))),
                written: Arc::new(Mutex::new(Vec::new())),
                chunk,
            }
        }

        pub fn written(&self) -> String {
            String::from_utf8_lossy(&self.written.lock().unwrap()).into_owned()
        }
    }

    impl Read for MockStream {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let mut input = self.input.lock().unwrap();
            let (data, pos) = &mut *input;
            let n = (data.len() - *pos).min(self.chunk).min(out.len());
            out[..n].copy_from_slice(&data[*pos..*pos + n]);
            *pos += n;
            Ok(n)
        }
    }

    impl Write for MockStream {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.written.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for MockStream {
        fn set_read_timeout(&self, _timeout: Duration) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mock::MockStream;
    use super::*;

    #[test]
    fn reads_for_the_crate_stop_at_each_line_end() {
        let mock = MockStream::new(b"* OK hello\r\na1 OK done\r\nrest", 4096);
        let mut wire = Wire::new(mock.clone(), Duration::from_secs(1));
        wire.send(b"a1 NOOP\r\n").unwrap();
        assert_eq!(mock.written(), "a1 NOOP\r\n");
        let mut buf = [0u8; 100];
        let n = wire.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"* OK hello\r\n");
        let n = wire.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"a1 OK done\r\n");
        // What follows stays in the wire for the other reader.
        assert_eq!(wire.buffered(), 4);
        let mut out = Vec::new();
        wire.read_exact_into(&mut out, 4).unwrap();
        assert_eq!(out, b"rest");
        assert_eq!(wire.read(&mut buf).unwrap(), 0);
    }

    /// The shared-socket scheme in one test, with the real `imap` crate: after the crate has
    /// read the replies to its commands, every byte the server sent after them (here in the
    /// same segment) is still in the wire for our FETCH reader. Fails if a new version of the
    /// crate reads ahead of the line it needs (the scheme would then lose bytes).
    #[test]
    fn the_imap_crate_leaves_what_follows_its_replies_in_the_wire() {
        let following = b"* 1 FETCH (UID 5 BODY[] {5}\r\nab\ncd)\r\n";
        let mut input = b"* OK ready\r\na1 OK Logged in\r\n* 3 EXISTS\r\n\
                          * OK [UIDVALIDITY 7] ok\r\na2 OK [READ-ONLY] done\r\n"
            .to_vec();
        input.extend_from_slice(following);
        // The whole script in one read: the server's replies and what follows them together.
        let mock = MockStream::new(&input, input.len());
        let wire = Wire::new(mock.clone(), Duration::from_secs(1));
        let mut greeting = Vec::new();
        wire.read_line(&mut greeting, 1000).unwrap();
        let client = imap::Client::new(wire.clone());
        let mut session = client.login("u", "p").map_err(|(e, _)| e).unwrap();
        let mailbox = session.examine("INBOX").unwrap();
        assert_eq!(mailbox.exists, 3);
        assert_eq!(wire.buffered(), following.len(), "the crate read ahead");
        let mut rest = Vec::new();
        wire.read_exact_into(&mut rest, following.len()).unwrap();
        assert_eq!(rest, following);
    }

    #[test]
    fn lines_and_literals_across_tiny_reads() {
        let mock = MockStream::new(b"* 1 FETCH {5}\r\nab\ncd)\r\n", 1);
        let wire = Wire::new(mock, Duration::from_secs(1));
        let mut line = Vec::new();
        wire.read_line(&mut line, 100).unwrap();
        assert_eq!(line, b"* 1 FETCH {5}\r\n");
        let mut lit = Vec::new();
        wire.read_exact_into(&mut lit, 5).unwrap();
        assert_eq!(lit, b"ab\ncd");
        line.clear();
        wire.read_line(&mut line, 100).unwrap();
        assert_eq!(line, b")\r\n");
        let err = wire.read_line(&mut line, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn overlong_lines_are_refused() {
        let mock = MockStream::new(&[b'x'; 500], 64);
        let wire = Wire::new(mock, Duration::from_secs(1));
        let err = wire.read_line(&mut Vec::new(), 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_past_deadline_times_out_without_reading() {
        let mock = MockStream::new(b"* OK\r\n", 64);
        let wire = Wire::new(mock, Duration::from_secs(1));
        wire.set_deadline(Some(Instant::now() - Duration::from_millis(1)));
        let err = wire.read_line(&mut Vec::new(), 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        wire.set_deadline(None);
        let mut line = Vec::new();
        wire.read_line(&mut line, 100).unwrap();
        assert_eq!(line, b"* OK\r\n");
    }

    #[test]
    fn starttls_replacement_is_refused_with_injected_bytes() {
        let mock = MockStream::new(b"a1 OK go ahead\r\n* OK injected\r\n", 4096);
        let mut wire = Wire::new(mock, Duration::from_secs(1));
        let mut buf = [0u8; 64];
        let _ = wire.read(&mut buf).unwrap();
        let err = wire.replace(Ok).unwrap_err();
        assert!(err.to_string().contains("STARTTLS"), "{err}");
        // The connection is unusable afterwards.
        assert!(wire.send(b"x").is_err());
    }
}
