//! A scripted in-memory POP3 server for the unit tests.
//!
//! A script is a list of steps `(client sends, server replies)`. The client's bytes must
//! match the concatenation of every step's expected bytes exactly (any difference is recorded
//! and fails the write); the reply of step `i` is only readable once the client has sent every
//! expected byte of steps `0..=i` — reading earlier is what would deadlock on a real socket and
//! fails the read. After the last reply the server "closes" (reads return 0). In lockstep mode
//! the client must not send a step's bytes before it has read the whole previous reply (no
//! pipelining).

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

struct Shared {
    expected: Vec<u8>,
    /// End offset in `expected` of each step's client bytes.
    ends: Vec<usize>,
    replies: Vec<Vec<u8>>,
    written: Vec<u8>,
    reply_idx: usize,
    reply_pos: usize,
    read_chunk: usize,
    lockstep: bool,
    mismatch: Option<String>,
    /// `written.len()` when the fake TLS upgrade ran.
    upgraded_at: Option<usize>,
    eof_error: Option<io::ErrorKind>,
    /// The most commands ever sent but not yet fully answered.
    max_in_flight: usize,
}

/// The stream handed to the client; clones share the same script.
#[derive(Clone)]
pub struct MockStream(Rc<RefCell<Shared>>);

impl MockStream {
    /// `steps`: `(client sends, server replies)`; use `""` for "sends nothing".
    pub fn new<A: AsRef<[u8]>, B: AsRef<[u8]>>(steps: &[(A, B)]) -> MockStream {
        let mut expected = Vec::new();
        let mut ends = Vec::new();
        let mut replies = Vec::new();
        for (send, reply) in steps {
            expected.extend_from_slice(send.as_ref());
            ends.push(expected.len());
            replies.push(reply.as_ref().to_vec());
        }
        MockStream(Rc::new(RefCell::new(Shared {
            expected,
            ends,
            replies,
            written: Vec::new(),
            reply_idx: 0,
            reply_pos: 0,
            read_chunk: usize::MAX,
            lockstep: false,
            mismatch: None,
            upgraded_at: None,
            eof_error: None,
            max_in_flight: 0,
        })))
    }

    /// Each read returns at most `n` bytes.
    pub fn chunked(self, n: usize) -> Self {
        self.0.borrow_mut().read_chunk = n.max(1);
        self
    }

    /// The client must finish reading each reply before sending the next command.
    pub fn lockstep(self) -> Self {
        self.0.borrow_mut().lockstep = true;
        self
    }

    /// After the script, reads fail with `kind` instead of returning end of stream.
    pub fn then_error(self, kind: io::ErrorKind) -> Self {
        self.0.borrow_mut().eof_error = Some(kind);
        self
    }

    /// What the fake STLS upgrader calls.
    pub fn mark_upgraded(&self) {
        let mut s = self.0.borrow_mut();
        s.upgraded_at = Some(s.written.len());
    }

    pub fn upgraded_at(&self) -> Option<usize> {
        self.0.borrow().upgraded_at
    }

    /// The most commands the client ever had in flight (sent, reply not fully read).
    pub fn max_in_flight(&self) -> usize {
        self.0.borrow().max_in_flight
    }

    /// Forgets the most in flight so far (to measure from here on).
    pub fn reset_max_in_flight(&self) {
        self.0.borrow_mut().max_in_flight = 0;
    }

    /// How many reply bytes the client has read so far.
    pub fn bytes_read(&self) -> usize {
        let s = self.0.borrow();
        s.replies[..s.reply_idx.min(s.replies.len())]
            .iter()
            .map(Vec::len)
            .sum::<usize>()
            + s.reply_pos
    }

    /// Everything the client wrote, as text.
    pub fn written_str(&self) -> String {
        String::from_utf8_lossy(&self.0.borrow().written).into_owned()
    }

    /// Asserts the client sent exactly the script's bytes and read every reply.
    pub fn assert_done(&self) {
        let s = self.0.borrow();
        if let Some(m) = &s.mismatch {
            panic!("{m}");
        }
        assert_eq!(
            String::from_utf8_lossy(&s.written),
            String::from_utf8_lossy(&s.expected),
            "the client did not send everything the script expects"
        );
        let unread: usize = s.replies[s.reply_idx.min(s.replies.len())..]
            .iter()
            .map(Vec::len)
            .sum::<usize>()
            .saturating_sub(s.reply_pos);
        assert_eq!(unread, 0, "the client left {unread} reply bytes unread");
    }

    /// Asserts the client sent exactly `prefix` (it stopped early, e.g. after an error).
    pub fn assert_sent_only(&self, prefix: &str) {
        let s = self.0.borrow();
        if let Some(m) = &s.mismatch {
            panic!("{m}");
        }
        assert_eq!(String::from_utf8_lossy(&s.written), prefix);
    }
}

impl Shared {
    fn consumed(&self, step: usize) -> bool {
        self.reply_idx > step
            || (self.reply_idx == step && self.reply_pos == self.replies[step].len())
    }

    /// The step whose client bytes include offset `off`.
    fn step_of(&self, off: usize) -> usize {
        self.ends
            .iter()
            .position(|&end| off < end)
            .unwrap_or(self.ends.len())
    }
}

impl Read for MockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.0.borrow_mut();
        loop {
            if s.reply_idx >= s.replies.len() {
                return match s.eof_error {
                    Some(kind) => Err(io::Error::from(kind)),
                    None => Ok(0),
                };
            }
            let need = s.ends[s.reply_idx];
            if s.written.len() < need {
                let missing =
                    String::from_utf8_lossy(&s.expected[s.written.len()..need]).into_owned();
                let msg = format!(
                    "mock: the client waits for reply #{} but has not sent {missing:?}",
                    s.reply_idx
                );
                s.mismatch.get_or_insert(msg.clone());
                return Err(io::Error::other(msg));
            }
            let (idx, pos) = (s.reply_idx, s.reply_pos);
            let remaining = s.replies[idx].len() - pos;
            if remaining == 0 {
                s.reply_idx += 1;
                s.reply_pos = 0;
                continue;
            }
            let n = remaining.min(buf.len()).min(s.read_chunk);
            buf[..n].copy_from_slice(&s.replies[idx][pos..pos + n]);
            s.reply_pos += n;
            return Ok(n);
        }
    }
}

impl Write for MockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.0.borrow_mut();
        let start = s.written.len();
        let end = start + buf.len();
        if end > s.expected.len() || s.expected[start..end] != *buf {
            let expected_next = String::from_utf8_lossy(
                &s.expected[start.min(s.expected.len())..end.min(s.expected.len())],
            )
            .into_owned();
            let msg = format!(
                "mock: unexpected client bytes {:?} at offset {start}, the script expects \
                 {expected_next:?}",
                String::from_utf8_lossy(buf)
            );
            s.mismatch.get_or_insert(msg.clone());
            return Err(io::Error::other(msg));
        }
        if s.lockstep {
            for off in start..end {
                let step = s.step_of(off);
                if step > 0 && !s.consumed(step - 1) {
                    let msg = format!(
                        "mock: the client pipelined {:?} before reading reply #{}",
                        String::from_utf8_lossy(buf),
                        step - 1
                    );
                    s.mismatch.get_or_insert(msg.clone());
                    return Err(io::Error::other(msg));
                }
            }
        }
        s.written.extend_from_slice(buf);
        let sent_steps = s.ends.iter().filter(|&&e| e <= s.written.len()).count();
        let answered = (0..s.replies.len()).filter(|&j| s.consumed(j)).count();
        s.max_in_flight = s.max_in_flight.max(sent_steps.saturating_sub(answered));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
