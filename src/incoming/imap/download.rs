//! Downloading messages: batches bounded by size and count, sent as pipelined
//! `UID FETCH <set> (UID BODY.PEEK[])` commands and read one message at a time by [`super::fetch`].
//! See "Downloading" in the module docs.

use std::collections::{HashSet, VecDeque};

use super::fetch::{self, ReadError, Response, Status};
use super::marks::uid_set;
use super::ImapMailbox;
use crate::error::Result;
use crate::incoming::{Fetched, Flow};
use crate::net;

/// FETCH commands kept queued at the server: the one being read and the next.
const PIPELINE_DEPTH: usize = 2;

/// Splits ascending UIDs into download batches: at most `max_bytes` (by the known size; an
/// unknown size counts as a full batch) or a single larger message, and at most `max_uids`.
pub fn plan_batches(
    uids: &[u32],
    size_of: impl Fn(u32) -> Option<u64>,
    max_bytes: u64,
    max_uids: usize,
) -> Vec<Vec<u32>> {
    let mut batches: Vec<Vec<u32>> = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    let mut bytes = 0u64;
    for &uid in uids {
        let size = size_of(uid).unwrap_or(max_bytes);
        if !current.is_empty()
            && (bytes.saturating_add(size) > max_bytes || current.len() >= max_uids)
        {
            batches.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(uid);
        bytes = bytes.saturating_add(size);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

impl ImapMailbox {
    /// Downloads `batches` with up to [`PIPELINE_DEPTH`] FETCH commands queued.
    pub(super) fn pipelined_fetch(
        &mut self,
        batches: &[Vec<u32>],
        sink: &mut dyn FnMut(Fetched) -> Flow,
    ) -> Result<()> {
        if self.session.is_none() {
            return Err(self.session_gone());
        }
        let requested: HashSet<u32> = batches.iter().flatten().copied().collect();
        let largest_listed = requested
            .iter()
            .filter_map(|uid| self.listed.get(uid))
            .copied()
            .max()
            .unwrap_or(0);
        let limit = usize::try_from(
            self.max_message_bytes
                .max(largest_listed)
                .saturating_add(65536),
        )
        .unwrap_or(usize::MAX);
        let wire = self.wire.clone();
        let mut in_flight: VecDeque<String> = VecDeque::new();
        let mut delivered: HashSet<u32> = HashSet::new();
        let mut next = 0usize;
        let mut stopped = false;
        let mut refused: Option<String> = None;
        loop {
            while !stopped && in_flight.len() < PIPELINE_DEPTH && next < batches.len() {
                let tag = self.next_tag();
                let command = format!(
                    "{tag} UID FETCH {} (UID BODY.PEEK[])\r\n",
                    uid_set(&batches[next])
                );
                if in_flight.is_empty() {
                    self.stats.fetch_round_trips += 1;
                }
                if let Err(e) = wire.send(command.as_bytes()) {
                    let err = self.mailbox_error(format!(
                        "downloading messages: {}",
                        net::describe_io_error(&e)
                    ));
                    self.poison(&err);
                    return Err(err);
                }
                self.stats.body_fetches += 1;
                in_flight.push_back(tag);
                next += 1;
            }
            let Some(expected) = in_flight.front().cloned() else {
                break;
            };
            let response = match fetch::read_response(&wire, limit) {
                Ok(r) => r,
                Err(e) => {
                    let detail = match e {
                        ReadError::Io(io) => net::describe_io_error(&io),
                        ReadError::Protocol(p) => p,
                    };
                    let err = self.mailbox_error(format!("downloading messages: {detail}"));
                    self.poison(&err);
                    return Err(err);
                }
            };
            match response {
                Response::Fetch {
                    uid: Some(uid),
                    body: Some(raw),
                    ..
                } => {
                    // An empty body for a message listed with content: it vanished meanwhile.
                    let vanished = raw.is_empty() && self.listed.get(&uid).is_some_and(|&n| n > 0);
                    if !stopped && !vanished && requested.contains(&uid) && delivered.insert(uid) {
                        self.stats.messages_fetched += 1;
                        let id = uid.to_string();
                        if sink(Fetched { id, raw }) == Flow::Stop {
                            stopped = true;
                        }
                    }
                }
                Response::Fetch { .. } | Response::Untagged => {}
                Response::Tagged { tag, status, text } => {
                    if tag != expected {
                        let err = self.mailbox_error(format!(
                            "downloading messages: the server answered {tag} while {expected} \
                             was expected"
                        ));
                        self.poison(&err);
                        return Err(err);
                    }
                    in_flight.pop_front();
                    // NO: some messages were expunged meanwhile; the others arrived.
                    if status == Status::Bad && refused.is_none() {
                        refused = Some(text);
                    }
                }
                Response::Bye(text) => {
                    let err = self.mailbox_error(format!(
                        "downloading messages: the server closed the connection: {}",
                        self.redact(&text)
                    ));
                    self.poison(&err);
                    return Err(err);
                }
                Response::Continuation(_) => {
                    let err = self.mailbox_error(
                        "downloading messages: unexpected continuation request from the server"
                            .to_string(),
                    );
                    self.poison(&err);
                    return Err(err);
                }
            }
        }
        match refused {
            Some(text) => Err(self.mailbox_error(format!(
                "downloading messages: the server said BAD: {}",
                self.redact(&text)
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incoming::imap::{BATCH_BYTES, BATCH_MAX_UIDS};

    #[test]
    fn batches_are_bounded_by_bytes_and_count() {
        let sizes = |uid: u32| Some(if uid == 5 { 30 } else { 4 });
        let uids: Vec<u32> = (1..=8).collect();
        assert_eq!(
            plan_batches(&uids, sizes, 10, 100),
            vec![vec![1, 2], vec![3, 4], vec![5], vec![6, 7], vec![8]]
        );
        assert_eq!(
            plan_batches(&uids, |_| Some(1), 1000, 3),
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8]]
        );
        // Unknown sizes travel alone.
        assert_eq!(
            plan_batches(&[1, 2], |_| None, 10, 100),
            vec![vec![1], vec![2]]
        );
        let many: Vec<u32> = (1..=300).collect();
        assert_eq!(
            plan_batches(&many, |_| Some(2000), BATCH_BYTES, BATCH_MAX_UIDS).len(),
            1
        );
    }
}
