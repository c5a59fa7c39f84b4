//! What is new: UID sets, the low-water mark below which every message is settled, and the
//! UIDs remembered above it in the state store. See "What is new" in the module docs.

use std::collections::{BTreeSet, HashSet};

use super::{ImapMailbox, SETTLED_NAMESPACE};
use crate::error::Result;

/// A stored UID set expanding to more than this is ignored (it is only an optimisation).
const MAX_REMEMBERED: usize = 1_000_000;

/// A UID set with runs compressed: `1:3,7,9:10`.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// Reads back a [`uid_set`]; `None` when malformed or larger than `cap` UIDs.
pub fn parse_uid_set(text: &str, cap: usize) -> Option<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once(':') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        let (a, b) = (a.min(b), a.max(b));
        if (b - a) as usize >= cap.saturating_sub(out.len()) {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

/// The low-water mark after a run: the first listed UID not settled, else one past the last
/// listed UID; never below where the run started.
pub fn next_low_water(start: u32, listed: &[u32], settled: &HashSet<u32>) -> u32 {
    let next = match listed.iter().find(|uid| !settled.contains(uid)) {
        Some(&first_open) => first_open,
        None => listed.last().map_or(start, |&last| last.saturating_add(1)),
    };
    next.max(start)
}

impl ImapMailbox {
    pub(super) fn settle(&mut self, uids: &[u32]) {
        self.settled.extend(uids.iter().copied());
    }

    fn kv_key(&self) -> String {
        format!("{}|{}", self.account, self.mark_key)
    }

    /// A UID set remembered under `namespace` for the current UIDVALIDITY (empty otherwise).
    pub(super) fn remembered(&self, namespace: &str) -> Result<BTreeSet<u32>> {
        let Some(uidvalidity) = self.uidvalidity else {
            return Ok(BTreeSet::new());
        };
        let stored = self.state.get_kv(namespace, &self.kv_key())?;
        Ok(stored
            .as_deref()
            .and_then(|v| v.split_once(':'))
            .filter(|(v, _)| v.parse::<u32>().ok() == Some(uidvalidity))
            .and_then(|(_, set)| parse_uid_set(set, MAX_REMEMBERED))
            .unwrap_or_default())
    }

    pub(super) fn remember(&self, namespace: &str, uids: &BTreeSet<u32>) -> Result<()> {
        let Some(uidvalidity) = self.uidvalidity else {
            return Ok(());
        };
        if uids.is_empty() {
            self.state.delete_kv(namespace, &self.kv_key())?;
            return Ok(());
        }
        let set = uid_set(&uids.iter().copied().collect::<Vec<_>>());
        self.state
            .set_kv(namespace, &self.kv_key(), &format!("{uidvalidity}:{set}"))
    }

    pub(super) fn save_mark(&mut self) -> Result<()> {
        let Some((uidvalidity, start)) = self.listed_under else {
            return Ok(());
        };
        let mut settled = self.settled.clone();
        settled.extend(self.settled_before.iter().copied());
        let mut candidates: Vec<u32> = self.listed.keys().copied().collect();
        candidates.extend(self.settled_before.iter().copied());
        candidates.sort_unstable();
        candidates.dedup();
        let low = next_low_water(start, &candidates, &settled);
        if self.stored_mark != Some((uidvalidity, low)) {
            self.state
                .set_imap_mark(&self.account, &self.mark_key, uidvalidity, low)?;
            self.stored_mark = Some((uidvalidity, low));
        }
        let above: BTreeSet<u32> = settled.into_iter().filter(|&uid| uid > low).collect();
        if above != self.settled_before {
            self.remember(SETTLED_NAMESPACE, &above)?;
            self.settled_before = above;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_compress_runs() {
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(uid_set(&[5]), "5");
        assert_eq!(uid_set(&[]), "");
        assert_eq!(uid_set(&[u32::MAX - 1, u32::MAX]), "4294967294:4294967295");
    }

    #[test]
    fn uid_sets_read_back() {
        let set = parse_uid_set("1:3,7,10:9", 100).unwrap();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![1, 2, 3, 7, 9, 10]);
        assert_eq!(parse_uid_set("", 100), Some(BTreeSet::new()));
        assert_eq!(parse_uid_set("1:x", 100), None);
        assert_eq!(parse_uid_set("1:4000000000", 1000), None);
        assert_eq!(parse_uid_set("1:11", 10), None);
        assert_eq!(parse_uid_set("1:10", 10).map(|s| s.len()), Some(10));
        assert_eq!(parse_uid_set("1:5,7:12", 10), None);
    }

    #[test]
    fn low_water_stops_at_the_first_open_message() {
        let settled: HashSet<u32> = [3, 4, 9].into_iter().collect();
        assert_eq!(next_low_water(3, &[3, 4, 7, 9], &settled), 7);
        assert_eq!(next_low_water(3, &[3, 4, 9], &settled), 10);
        assert_eq!(next_low_water(3, &[], &settled), 3);
        assert_eq!(next_low_water(12, &[3], &settled), 12);
        assert_eq!(next_low_water(1, &[2, 5], &HashSet::new()), 2);
    }
}
