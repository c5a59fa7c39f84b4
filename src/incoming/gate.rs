//! The large-message gate of a check-mail run: at most one message of [`LARGE`] bytes or more
//! is in memory at a time, from its download until PHP's thread is done with it.
//!
//! Mailboxes are read concurrently, so without it each mailbox thread could hold a large
//! message (downloaded, parsed, waiting at the hand-off) at the same moment. `checkmail`
//! installs the run's [`Gate`] on each mailbox thread ([`install`]); the readers allocate a
//! message's buffer with [`buffer`], which, for a large message, first waits for the gate; the
//! mailbox thread then takes the [`Pass`] ([`take_pass`]) and hands it over with the message,
//! and PHP's thread drops it when the host has returned. A thread that already holds the pass
//! (a large message it read and did not hand over) keeps it; a thread without an installed
//! gate (tests, `checkAccount`) never waits.
//!
//! IMAP (the announced literal size), POP3 (the LIST size) and Maildir (the file size) take
//! their buffers here; OFFICE365 and GMAIL, whose bodies the HTTP client reads, are admitted
//! by their listed size ([`admit`]; Graph lists no size when a server leaves it out).
//!
//! Waiting here is like waiting at the hand-off channel: the server's data stays in the
//! socket, and whoever holds the pass needs nothing from the waiting thread to finish.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex};

/// A message this large (bytes, as listed or announced) goes through the gate.
pub const LARGE: usize = 64 * 1024;

/// One per run.
#[derive(Debug, Default)]
pub struct Gate {
    held: Mutex<bool>,
    released: Condvar,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    fn enter(self: &Arc<Self>) -> Pass {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        *held = true;
        Pass(Arc::clone(self))
    }
}

/// The right to hold one large message; dropping it lets the next one in.
#[derive(Debug)]
pub struct Pass(Arc<Gate>);

impl Drop for Pass {
    fn drop(&mut self) {
        *self.0.held.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.released.notify_one();
    }
}

struct Installed {
    gate: Arc<Gate>,
    pass: Option<Pass>,
}

thread_local! {
    static INSTALLED: RefCell<Option<Installed>> = const { RefCell::new(None) };
}

/// Until the returned guard is dropped, large buffers on this thread go through `gate`.
pub fn install(gate: &Arc<Gate>) -> Installation {
    INSTALLED.with(|i| {
        *i.borrow_mut() = Some(Installed {
            gate: Arc::clone(gate),
            pass: None,
        })
    });
    Installation(())
}

/// Uninstalls the gate (and releases a pass still held) when dropped.
#[must_use]
pub struct Installation(());

impl Drop for Installation {
    fn drop(&mut self) {
        let installed = INSTALLED.with(|i| i.borrow_mut().take());
        drop(installed);
    }
}

/// An empty buffer for a message of `size` bytes, once the message may be downloaded
/// ([`admit`]).
pub fn buffer(size: usize) -> Vec<u8> {
    admit(size);
    Vec::with_capacity(size)
}

/// Returns once a message of `size` bytes may be downloaded: at once for a small message or
/// on a thread without a gate, else once this thread holds the pass.
pub fn admit(size: usize) {
    if size < LARGE {
        return;
    }
    INSTALLED.with(|i| {
        if let Some(installed) = i.borrow_mut().as_mut() {
            if installed.pass.is_none() {
                installed.pass = Some(installed.gate.enter());
            }
        }
    });
}

/// The pass this thread holds, to go with the message it is handing over.
pub fn take_pass() -> Option<Pass> {
    INSTALLED.with(|i| i.borrow_mut().as_mut().and_then(|i| i.pass.take()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn one_large_message_at_a_time_and_small_ones_never_wait() {
        let gate = Gate::new();
        let (tx, rx) = channel();
        let _installed = install(&gate);
        let _ = buffer(LARGE);
        let pass = take_pass().expect("a large buffer takes the pass");
        assert!(take_pass().is_none());
        let other = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                let _installed = install(&gate);
                let _ = buffer(100);
                assert!(take_pass().is_none(), "a small message needs no pass");
                tx.send("small").unwrap();
                let _ = buffer(LARGE * 2);
                tx.send("large").unwrap();
                take_pass().is_some()
            })
        };
        assert_eq!(rx.recv().unwrap(), "small");
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the second large message waited for the pass"
        );
        drop(pass);
        assert_eq!(rx.recv().unwrap(), "large");
        assert!(other.join().unwrap());
    }

    #[test]
    fn a_pass_not_handed_over_serves_the_next_message_and_goes_with_the_thread() {
        let gate = Gate::new();
        {
            let _installed = install(&gate);
            let _ = buffer(LARGE);
            // The message was dropped (e.g. it vanished meanwhile): the next one reuses the pass.
            let _ = buffer(LARGE);
            assert!(take_pass().is_some());
            let _ = buffer(LARGE);
        }
        // The uninstalled thread released it: another thread gets in at once.
        let _installed = install(&gate);
        let _ = buffer(LARGE);
        assert!(take_pass().is_some());
    }

    #[test]
    fn without_a_gate_nothing_waits() {
        let _ = buffer(LARGE * 4);
        assert!(take_pass().is_none());
    }
}
