//! Reading the mbox: splitting it into messages at `From ` lines, a message's id, the bytes
//! handed over (mboxrd unescaping), positioned reads and hashes of the file, and the mark
//! where a run starts reading (see "Reading" and "What a run costs" in the module docs).

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, BufRead, BufReader, ErrorKind, Read};
use std::os::unix::fs::{FileExt, MetadataExt};

use sha2::{Digest, Sha256};

use super::{hex, MboxMailbox, SEGMENT, TAIL_CHECK};
use crate::error::Result;

/// Header fields mail programs add or change in place; not part of a message's id.
const VOLATILE_HEADERS: [&str; 7] = [
    "status",
    "x-status",
    "x-keywords",
    "x-uid",
    "x-imapbase",
    "content-length",
    "lines",
];

/// One message as stored: from its `From ` line up to the next one (or the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Region {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) id: String,
    /// The folder-internal pseudo message (`X-IMAP`) at the start of the file.
    pub(super) internal: bool,
}

impl Region {
    pub(super) fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A message being scanned.
struct Building {
    offset: u64,
    len: u64,
    hasher: Sha256,
    in_headers: bool,
    /// The current header field is left out of the id.
    skipping: bool,
    internal: bool,
}

impl Building {
    fn new(offset: u64) -> Building {
        Building {
            offset,
            len: 0,
            hasher: Sha256::new(),
            in_headers: true,
            skipping: false,
            internal: false,
        }
    }

    /// One piece of a line: all of it, or up to [`SEGMENT`] bytes (`line_start` tells
    /// whether it begins a line).
    fn add(&mut self, segment: &[u8], line_start: bool) {
        self.len += segment.len() as u64;
        if self.len == segment.len() as u64 {
            // The `From ` line.
            self.hasher.update(segment);
            return;
        }
        if self.in_headers && line_start {
            if segment == b"\n" || segment == b"\r\n" {
                self.in_headers = false;
                self.skipping = false;
            } else if !matches!(segment[0], b' ' | b'\t') {
                let name = segment
                    .iter()
                    .position(|&b| b == b':')
                    .map(|at| &segment[..at])
                    .unwrap_or(b"");
                let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
                self.skipping = VOLATILE_HEADERS.contains(&name.as_str());
                if name == "x-imap" && self.offset == 0 {
                    self.internal = true;
                }
            }
        }
        if !(self.in_headers && self.skipping) {
            self.hasher.update(segment);
        }
    }

    fn finish(self) -> Region {
        Region {
            offset: self.offset,
            len: self.len,
            id: hex(&self.hasher.finalize()[..16]),
            internal: self.internal,
        }
    }
}

/// Reads the next piece of a line into `segment` (at most [`SEGMENT`] bytes); empty at the
/// end. Returns whether the piece ends its line.
fn next_segment(reader: &mut impl BufRead, segment: &mut Vec<u8>) -> io::Result<bool> {
    segment.clear();
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(false);
        }
        let room = SEGMENT - segment.len();
        let window = &available[..available.len().min(room)];
        if let Some(at) = memchr::memchr(b'\n', window) {
            segment.extend_from_slice(&window[..=at]);
            reader.consume(at + 1);
            return Ok(true);
        }
        let taken = window.len();
        segment.extend_from_slice(window);
        reader.consume(taken);
        if segment.len() >= SEGMENT {
            return Ok(false);
        }
    }
}

/// The messages of mbox data read from `reader`, which starts at file offset `base` (a
/// message boundary). Data that does not begin with a `From ` line is not an mbox.
pub(super) fn scan(mut reader: impl BufRead, base: u64) -> io::Result<Vec<Region>> {
    let mut regions = Vec::new();
    let mut current: Option<Building> = None;
    let mut segment = Vec::with_capacity(1024);
    let mut offset = base;
    let mut line_start = true;
    loop {
        let ends_line = next_segment(&mut reader, &mut segment)?;
        if segment.is_empty() {
            break;
        }
        if line_start && segment.starts_with(b"From ") {
            if let Some(done) = current.take() {
                regions.push(done.finish());
            }
            current = Some(Building::new(offset));
        }
        match current.as_mut() {
            Some(message) => message.add(&segment, line_start),
            None => {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    "not an mbox file: it does not begin with a 'From ' line",
                ))
            }
        }
        offset += segment.len() as u64;
        line_start = ends_line;
    }
    if let Some(done) = current.take() {
        regions.push(done.finish());
    }
    Ok(regions)
}

/// Reads a file from `pos` to `end` with positioned reads (the file offset is not used).
pub(super) struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if max == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..max], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

pub(super) fn reader_at(file: &File, from: u64, end: u64) -> BufReader<At<'_>> {
    BufReader::with_capacity(
        SEGMENT,
        At {
            file,
            pos: from,
            end,
        },
    )
}

/// `len` bytes of `file` at `offset` (fewer at its end).
pub(super) fn read_range(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut out = crate::incoming::gate::buffer(usize::try_from(len).unwrap_or(usize::MAX));
    reader_at(file, offset, offset.saturating_add(len)).read_to_end(&mut out)?;
    Ok(out)
}

/// The hash of `file`'s bytes in `[from, to)` (hex; the empty range has one too).
pub(super) fn hash_range(file: &File, from: u64, to: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut reader = reader_at(file, from, to.max(from));
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(chunk);
        let n = chunk.len();
        reader.consume(n);
    }
    Ok(hex(&hasher.finalize()))
}

/// The message as handed over: without its `From ` line and the blank separator line, with
/// `>From ` lines unescaped by one `>` (mboxrd). Works in place.
pub fn message_bytes(mut region: Vec<u8>) -> Vec<u8> {
    let n = region.len();
    let mut read = memchr::memchr(b'\n', &region).map_or(n, |at| at + 1);
    let mut write = 0;
    while read < n {
        let end = memchr::memchr(b'\n', &region[read..]).map_or(n, |at| read + at + 1);
        let line = &region[read..end];
        let quotes = line.iter().take_while(|&&b| b == b'>').count();
        let from = if quotes > 0 && line[quotes..].starts_with(b"From ") {
            read + 1
        } else {
            read
        };
        region.copy_within(from..end, write);
        write += end - from;
        read = end;
    }
    region.truncate(write);
    if region.ends_with(b"\n\n") {
        region.pop();
    }
    region
}

/// A place in one version of the file: its identity, an offset, and a hash of the bytes
/// just before it (see [`Mark::holds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mark {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) offset: u64,
    pub(super) tail: String,
}

impl Mark {
    pub(super) fn at(file: &File, meta: &Metadata, offset: u64) -> io::Result<Mark> {
        Ok(Mark {
            dev: meta.dev(),
            ino: meta.ino(),
            offset,
            tail: hash_range(file, offset.saturating_sub(TAIL_CHECK), offset)?,
        })
    }

    pub(super) fn parse(text: &str) -> Option<Mark> {
        let mut parts = text.split(' ');
        let mark = Mark {
            dev: parts.next()?.parse().ok()?,
            ino: parts.next()?.parse().ok()?,
            offset: parts.next()?.parse().ok()?,
            tail: parts.next()?.to_string(),
        };
        parts.next().is_none().then_some(mark)
    }

    pub(super) fn to_text(&self) -> String {
        format!("{} {} {} {}", self.dev, self.ino, self.offset, self.tail)
    }

    /// True when the file is still the one of the mark, at least as long, unchanged just
    /// before the offset, and a message (or the end) starts there.
    fn holds(&self, file: &File, meta: &Metadata) -> io::Result<bool> {
        if self.offset == 0 {
            return Ok(true);
        }
        if meta.dev() != self.dev || meta.ino() != self.ino || meta.len() < self.offset {
            return Ok(false);
        }
        if meta.len() > self.offset {
            let mut head = [0u8; 5];
            let n = file.read_at(&mut head, self.offset)?;
            if &head[..n] != b"From " {
                return Ok(false);
            }
        }
        Ok(hash_range(file, self.offset.saturating_sub(TAIL_CHECK), self.offset)? == self.tail)
    }
}

impl MboxMailbox {
    /// Where a scan may start: the listing's start, when it still holds, else the beginning.
    pub(super) fn valid_start(
        &self,
        file: &File,
        meta: &Metadata,
        start: Option<&Mark>,
    ) -> Result<u64> {
        match start {
            Some(mark)
                if mark
                    .holds(file, meta)
                    .map_err(|e| self.io_error("read the mbox", e))? =>
            {
                Ok(mark.offset)
            }
            _ => Ok(0),
        }
    }

    pub(super) fn scan_file(&self, file: &File, meta: &Metadata, from: u64) -> Result<Vec<Region>> {
        scan(reader_at(file, from, meta.len()), from).map_err(|e| {
            if e.kind() == ErrorKind::InvalidData {
                self.error(e.to_string())
            } else {
                self.io_error("read the mbox", e)
            }
        })
    }

    /// One listed message, read under the locks; `None` when it is no longer in the file.
    pub(super) fn read_message(&mut self, id: &str) -> Result<Option<Vec<u8>>> {
        let Some(layout) = self.layout.as_ref() else {
            return Ok(None);
        };
        let located = layout.at.get(id).copied();
        let start = layout.start.clone();
        let locked = self.lock(false)?;
        let Some(file) = locked.file.as_ref() else {
            return Ok(None);
        };
        let io = |e| self.io_error("read the mbox", e);
        let meta = file.metadata().map_err(io)?;
        // Where the listing saw it, if it is still that message there.
        if let Some((offset, len)) = located {
            if meta.dev() == start.dev && meta.ino() == start.ino && offset + len <= meta.len() {
                let region = read_range(file, offset, len).map_err(io)?;
                let mut next = [0u8; 5];
                let n = file.read_at(&mut next, offset + len).map_err(io)?;
                let boundary = n == 0 || (region.ends_with(b"\n") && &next[..n] == b"From ");
                if boundary {
                    if let Ok(found) = scan(&region[..], offset) {
                        if found.len() == 1 && found[0].id == id {
                            return Ok(Some(region));
                        }
                    }
                }
            }
        }
        // The file changed since the listing: look for the message again.
        let from = self.valid_start(file, &meta, Some(&start))?;
        let regions = self.scan_file(file, &meta, from)?;
        let mut at = HashMap::new();
        for r in regions.iter().filter(|r| !r.internal) {
            at.entry(r.id.clone()).or_insert((r.offset, r.len));
        }
        let found = at.get(id).copied();
        let bytes = match found {
            Some((offset, len)) => Some(read_range(file, offset, len).map_err(io)?),
            None => None,
        };
        let refreshed = Mark::at(file, &meta, from).map_err(io)?;
        drop(locked);
        if let Some(layout) = self.layout.as_mut() {
            layout.at = at;
            layout.start = refreshed;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions(data: &[u8]) -> Vec<Region> {
        scan(data, 0).unwrap()
    }

    #[test]
    fn messages_split_at_from_lines_whatever_content_length_says() {
        let data =
            b"From a@x Mon Jan  1 00:00:00 2024\nContent-Length: 3\nSubject: one\n\nbody\nmore\n\n\
                     From b@x Mon Jan  1 00:00:01 2024\nSubject: two\n\n>From quoted\n\n";
        let found = regions(data);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].offset, 0);
        assert_eq!(found[1].offset, found[0].len);
        assert_eq!(found[1].end(), data.len() as u64);
        let first = &data[..found[0].len as usize];
        assert_eq!(
            message_bytes(first.to_vec()),
            b"Content-Length: 3\nSubject: one\n\nbody\nmore\n".to_vec()
        );
    }

    #[test]
    fn from_lines_are_unescaped_by_one_quote() {
        let region = b"From a@x Mon Jan  1 00:00:00 2024\r\nSubject: s\r\n\r\n>From here\r\n>>From there\r\n> From not\r\nFrom\r\n\n".to_vec();
        assert_eq!(
            message_bytes(region),
            b"Subject: s\r\n\r\nFrom here\r\n>From there\r\n> From not\r\nFrom\r\n".to_vec()
        );
    }

    #[test]
    fn ids_ignore_the_headers_mail_programs_rewrite_and_tell_copies_apart_by_content() {
        let a = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\nMessage-ID: <1@x>\n\nbody\n\n";
        let a_read = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\nStatus: RO\nX-Status: A\nX-UID: 5\n  folded\nMessage-ID: <1@x>\n\nbody\n\n";
        let b = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\nMessage-ID: <1@x>\n\nbody!\n\n";
        assert_eq!(regions(a)[0].id, regions(a_read)[0].id);
        assert_ne!(regions(a)[0].id, regions(b)[0].id);
        // A header only mentioned in a body counts.
        let c = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\nMessage-ID: <1@x>\n\nStatus: RO\nbody\n\n";
        assert_ne!(regions(a)[0].id, regions(c)[0].id);
    }

    #[test]
    fn the_folder_internal_message_is_recognised_only_first() {
        let data = b"From MAILER_DAEMON Mon Jan  1 00:00:00 2024\nSubject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\nX-IMAP: 1700000000 0000000002\n\ntext\n\n\
                     From b@x Mon Jan  1 00:00:01 2024\nX-IMAP: 1 2\n\nbody\n\n";
        let found = regions(data);
        assert!(found[0].internal);
        assert!(!found[1].internal);
    }

    #[test]
    fn a_file_that_is_not_an_mbox_is_refused() {
        assert!(scan(&b"Subject: x\n\nbody\n"[..], 0).is_err());
        assert!(scan(&b""[..], 0).unwrap().is_empty());
    }

    #[test]
    fn long_lines_are_scanned_in_pieces() {
        let mut data = b"From a@x Mon Jan  1 00:00:00 2024\nSubject: s\n\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', SEGMENT * 2 + 7));
        data.extend_from_slice(b"From not a boundary\n\nFrom b@x Mon Jan  1 00:00:01 2024\n\nb\n");
        let found = regions(&data);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].end(), data.len() as u64);
    }

    #[test]
    fn marks_round_trip() {
        let mark = Mark {
            dev: 1,
            ino: 2,
            offset: 3,
            tail: "ab".into(),
        };
        assert_eq!(Mark::parse(&mark.to_text()), Some(mark));
        assert_eq!(Mark::parse("1 2 x ab"), None);
    }
}
