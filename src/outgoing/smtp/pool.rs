//! The pool of authenticated SMTP connections one transport keeps between messages: taking
//! an idle one (when it is young and its socket still looks open) or opening a new one,
//! putting it back after a clean transaction, and closing them all with QUIT.

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::connection::Conn;
use super::replies::Fail;
use super::SmtpTransport;

/// Idle connections older than this are closed instead of reused (servers drop idle clients,
/// typically after 60 s to 5 min).
const IDLE_REUSE_LIMIT: Duration = Duration::from_secs(50);
/// Most idle connections kept per account.
const MAX_IDLE: usize = 16;

pub(super) struct Idle {
    conn: Conn,
    since: Instant,
}

impl SmtpTransport {
    /// Closes every idle connection (QUIT). Later sends open new ones.
    pub fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.lock_idle());
        for i in idle {
            i.conn.quit_quietly();
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn checkout(&self) -> Result<(Conn, bool), Fail> {
        loop {
            let idle = self.lock_idle().pop();
            match idle {
                Some(i) if i.since.elapsed() < IDLE_REUSE_LIMIT && i.conn.looks_alive() => {
                    return Ok((i.conn, true))
                }
                Some(i) => i.conn.quit_quietly(),
                None => return Ok((self.open(None)?, false)),
            }
        }
    }

    pub(super) fn checkin(&self, mut conn: Conn) {
        self.counters
            .round_trips
            .fetch_add(std::mem::take(&mut conn.round_trips), Ordering::Relaxed);
        let mut idle = self.lock_idle();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        } else {
            drop(idle);
            conn.quit_quietly();
        }
    }

    pub(super) fn discard(&self, mut conn: Conn) {
        self.counters
            .round_trips
            .fetch_add(std::mem::take(&mut conn.round_trips), Ordering::Relaxed);
        conn.abort();
    }
}

impl Drop for SmtpTransport {
    fn drop(&mut self) {
        self.close_idle();
    }
}

impl Conn {
    /// True when nothing is waiting on the socket and it is not closed (no round trip).
    fn looks_alive(&self) -> bool {
        if !self.stream.buffer().is_empty() {
            return false;
        }
        let tcp = self.stream.get_ref().tcp();
        if tcp.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let alive = matches!(tcp.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        tcp.set_nonblocking(false).is_ok() && alive
    }
}
