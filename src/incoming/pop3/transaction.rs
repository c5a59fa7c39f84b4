//! The TRANSACTION state (RFC 1939 §5): STAT, LIST, UIDL, RETR and TOP (pipelined when the
//! server offers PIPELINING), DELE and RSET.

use std::io::{Read, Write};

use super::wire::{listing_lines, sanitize, Fail, LISTING_LIMIT};
use super::{Fetched, ListEntry, Pop3Session, Stat, Transaction, UidlEntry, PIPELINE_WINDOW};
use crate::incoming::Flow;

impl<S: Read + Write> Pop3Session<S, Transaction> {
    /// `STAT`: message count and total size.
    pub fn stat(&mut self) -> crate::Result<Stat> {
        self.run(|s| {
            let status = s.simple("STAT")?;
            let mut words = status.text.split(|&b| b == b' ').filter(|w| !w.is_empty());
            let count = words.next().and_then(parse_num::<u32>);
            let size = words.next().and_then(parse_num::<u64>);
            match (count, size) {
                (Some(count), Some(size)) => Ok(Stat { count, size }),
                _ => Err(Fail::Protocol(format!(
                    "unreadable STAT reply: \"{}\"",
                    status.text()
                ))),
            }
        })
    }

    /// `LIST`: every message's number and size.
    pub fn list(&mut self) -> crate::Result<Vec<ListEntry>> {
        self.run(|s| {
            let body = s.multi("LIST", LISTING_LIMIT)?;
            list_lines(&body)
        })
    }

    /// `UIDL`: every message's unique id. A server without UIDL gives a `Mailbox` error (the
    /// session stays usable).
    pub fn uidl(&mut self) -> crate::Result<Vec<UidlEntry>> {
        self.run(|s| {
            let body = s.multi("UIDL", LISTING_LIMIT)?;
            uidl_lines(&body)
        })
    }

    /// `UIDL` and `LIST` (in one write when the server pipelines): every message's unique id
    /// and size. A server without UIDL gives a `Mailbox` error (the session stays usable).
    pub fn uidl_and_list(&mut self) -> crate::Result<(Vec<UidlEntry>, Vec<ListEntry>)> {
        if !self.caps.pipelining() {
            let uidls = self.uidl()?;
            return Ok((uidls, self.list()?));
        }
        let mut refused = None;
        let (uidl_body, list_body) = self.run(|s| {
            s.conn.send(b"UIDL\r\nLIST\r\n", "UIDL")?;
            let mut bodies = [Vec::new(), Vec::new()];
            for (command, body) in ["UIDL", "LIST"].into_iter().zip(bodies.iter_mut()) {
                let status = s
                    .conn
                    .read_status(&format!("waiting for the reply to {command}"))?;
                if status.ok {
                    s.conn.read_multiline(
                        body,
                        LISTING_LIMIT,
                        &format!("reading the reply to {command}"),
                    )?;
                } else if refused.is_none() {
                    refused = Some(Fail::Refused {
                        command: command.to_string(),
                        text: status.text(),
                    });
                }
            }
            match refused.take() {
                Some(fail) => Err(fail),
                None => Ok((
                    std::mem::take(&mut bodies[0]),
                    std::mem::take(&mut bodies[1]),
                )),
            }
        })?;
        let uidls = uidl_lines(&uidl_body).map_err(|f| self.error(f))?;
        let sizes = list_lines(&list_body).map_err(|f| self.error(f))?;
        Ok((uidls, sizes))
    }

    /// `RETR n`: the whole message, byte-exact (dot-stuffing removed). More than `max_bytes`
    /// is an error that poisons the session; a `-ERR` (no such message) does not.
    pub fn retr(&mut self, number: u32, max_bytes: u64) -> crate::Result<Vec<u8>> {
        self.run(|s| s.multi(&format!("RETR {number}"), max_bytes))
    }

    /// `TOP n lines`: the headers and the first `lines` body lines (`TOP n 0` = headers only,
    /// for messages too big to download).
    pub fn top(&mut self, number: u32, lines: u32, max_bytes: u64) -> crate::Result<Vec<u8>> {
        self.run(|s| s.multi(&format!("TOP {number} {lines}"), max_bytes))
    }

    /// `RETR` of many messages, pipelined when the server offers PIPELINING (in windows of
    /// [`PIPELINE_WINDOW`] commands), one by one otherwise. `on_message` is called in the
    /// order of `numbers` with each message or the server's `-ERR` text, as soon as it is
    /// read, so only one message is held in memory at a time. A message over `max_bytes`
    /// stops the batch and poisons the session.
    pub fn retr_each<F>(
        &mut self,
        numbers: &[u32],
        max_bytes: u64,
        on_message: F,
    ) -> crate::Result<()>
    where
        F: FnMut(u32, Fetched),
    {
        self.run(|s| s.batch_all(numbers, "RETR", "", Some(max_bytes), on_message))
    }

    /// `RETR` of many messages as one continuous pipeline when the server offers PIPELINING:
    /// at most `byte_window` bytes of messages (by `size_of`, from LIST) are asked for and not
    /// yet read, and more are asked for whenever half of that has arrived, so the round trips
    /// do not grow with the mailbox. When `on_message` says [`Flow::Stop`], nothing more is
    /// asked for and what is already on its way (at most the window) is read and dropped.
    pub fn retr_stream<F>(
        &mut self,
        numbers: &[u32],
        max_bytes: u64,
        size_of: &dyn Fn(u32) -> u64,
        byte_window: u64,
        on_message: F,
    ) -> crate::Result<()>
    where
        F: FnMut(u32, Fetched) -> Flow,
    {
        self.run(|s| {
            s.batch(
                numbers,
                "RETR",
                "",
                Some(max_bytes),
                size_of,
                byte_window,
                on_message,
            )
        })
    }

    /// [`retr_each`](Self::retr_each), collected: `(number, message or -ERR text)` in order.
    pub fn retr_many(
        &mut self,
        numbers: &[u32],
        max_bytes: u64,
    ) -> crate::Result<Vec<(u32, Fetched)>> {
        let mut out = Vec::with_capacity(numbers.len());
        self.retr_each(numbers, max_bytes, |n, r| out.push((n, r)))?;
        Ok(out)
    }

    /// `TOP n 0` of many messages (pipelined like [`retr_each`](Self::retr_each)).
    pub fn top_many(
        &mut self,
        numbers: &[u32],
        max_bytes: u64,
    ) -> crate::Result<Vec<(u32, Fetched)>> {
        let mut out = Vec::with_capacity(numbers.len());
        self.run(|s| {
            s.batch_all(numbers, "TOP", " 0", Some(max_bytes), |n, r| {
                out.push((n, r))
            })
        })?;
        Ok(out)
    }

    /// `DELE n`: marks a message; it is removed only by [`quit`](Pop3Session::quit).
    pub fn dele(&mut self, number: u32) -> crate::Result<()> {
        self.run(|s| s.simple(&format!("DELE {number}")).map(drop))
    }

    /// `DELE` of many messages, pipelined when possible: `(number, Ok or -ERR text)` in order.
    pub fn dele_many(&mut self, numbers: &[u32]) -> crate::Result<Vec<(u32, Result<(), String>)>> {
        let mut out = Vec::with_capacity(numbers.len());
        self.run(|s| s.batch_all(numbers, "DELE", "", None, |n, r| out.push((n, r.map(drop)))))?;
        Ok(out)
    }

    /// `RSET`: unmarks every message marked with `DELE` in this session.
    pub fn rset(&mut self) -> crate::Result<()> {
        self.run(|s| s.simple("RSET").map(drop))
    }

    /// [`batch`](Self::batch) of every number, bounded by the command window only.
    fn batch_all<F>(
        &mut self,
        numbers: &[u32],
        verb: &str,
        suffix: &str,
        max_bytes: Option<u64>,
        mut each: F,
    ) -> Result<(), Fail>
    where
        F: FnMut(u32, Fetched),
    {
        self.batch(
            numbers,
            verb,
            suffix,
            max_bytes,
            &|_| 0,
            u64::MAX,
            |n, r| {
                each(n, r);
                Flow::Continue
            },
        )
    }

    /// Runs `VERB n SUFFIX` for each number, reading a multi-line body (capped at
    /// `max_bytes`) when given. If the server pipelines, up to PIPELINE_WINDOW commands and
    /// `byte_window` bytes (by `size_of`) are in flight, refilled when half has been answered;
    /// else strictly one at a time. After `each` says Stop, nothing more is sent and the
    /// replies still due are read and dropped, so the session stays in step.
    #[allow(clippy::too_many_arguments)]
    fn batch<F>(
        &mut self,
        numbers: &[u32],
        verb: &str,
        suffix: &str,
        max_bytes: Option<u64>,
        size_of: &dyn Fn(u32) -> u64,
        byte_window: u64,
        mut each: F,
    ) -> Result<(), Fail>
    where
        F: FnMut(u32, Fetched) -> Flow,
    {
        let window = if self.caps.pipelining() {
            PIPELINE_WINDOW
        } else {
            1
        };
        let total = numbers.len();
        let (mut sent, mut received) = (0usize, 0usize);
        let mut in_flight_bytes = 0u64;
        let mut stopped = false;
        loop {
            let refill = !stopped
                && sent < total
                && sent - received <= window / 2
                && in_flight_bytes <= byte_window / 2;
            if refill {
                let mut commands = Vec::new();
                while sent < total && sent - received < window {
                    let size = size_of(numbers[sent]);
                    // Always at least one command when nothing is in flight.
                    if sent > received && in_flight_bytes.saturating_add(size) > byte_window {
                        break;
                    }
                    commands.extend_from_slice(
                        format!("{verb} {}{suffix}\r\n", numbers[sent]).as_bytes(),
                    );
                    in_flight_bytes = in_flight_bytes.saturating_add(size);
                    sent += 1;
                }
                self.conn.send(&commands, verb)?;
            }
            if received == sent {
                return Ok(());
            }
            let number = numbers[received];
            let command = format!("{verb} {number}{suffix}");
            let status = self
                .conn
                .read_status(&format!("waiting for the reply to {command}"))?;
            let result = if !status.ok {
                Err(status.text())
            } else if let Some(max) = max_bytes {
                // Sized by LIST (the body is at most that once unstuffed, give or take a
                // server's rounding); a large message waits for the run's gate.
                let listed = size_of(number).min(max);
                let mut body = crate::incoming::gate::buffer(listed as usize);
                self.conn.read_multiline(
                    &mut body,
                    max,
                    &format!("reading the reply to {command}"),
                )?;
                Ok(body)
            } else {
                Ok(Vec::new())
            };
            received += 1;
            in_flight_bytes = in_flight_bytes.saturating_sub(size_of(number));
            if !stopped && each(number, result) == Flow::Stop {
                stopped = true;
            }
        }
    }
}

fn list_lines(body: &[u8]) -> Result<Vec<ListEntry>, Fail> {
    listing_lines(body)
        .map(|line| {
            let (number, size) = two_fields(line, "LIST")?;
            let size = parse_num::<u64>(size).ok_or_else(|| bad_line("LIST", line))?;
            Ok(ListEntry { number, size })
        })
        .collect()
}

fn uidl_lines(body: &[u8]) -> Result<Vec<UidlEntry>, Fail> {
    listing_lines(body)
        .map(|line| {
            let (number, uid) = two_fields(line, "UIDL")?;
            if uid.len() > 512 || !uid.iter().all(|b| (0x21..=0x7e).contains(b)) {
                return Err(bad_line("UIDL", line));
            }
            let uid = String::from_utf8_lossy(uid).into_owned();
            Ok(UidlEntry { number, uid })
        })
        .collect()
}

fn parse_num<T: std::str::FromStr>(bytes: &[u8]) -> Option<T> {
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn bad_line(command: &str, line: &[u8]) -> Fail {
    Fail::Protocol(format!(
        "unreadable line in the {command} listing: \"{}\"",
        sanitize(line)
    ))
}

/// `number rest` of a LIST/UIDL line (extra fields after the second are ignored).
fn two_fields<'a>(line: &'a [u8], command: &str) -> Result<(u32, &'a [u8]), Fail> {
    let mut words = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty());
    let number = words.next().and_then(parse_num::<u32>);
    let second = words.next();
    match (number, second) {
        (Some(number), Some(second)) => Ok((number, second)),
        _ => Err(bad_line(command, line)),
    }
}
