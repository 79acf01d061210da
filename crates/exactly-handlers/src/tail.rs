//! A bounded tail buffer: keeps the last `bytes_max` bytes written to it and counts the rest.
//!
//! The `exec` handler captures a child's stdout and stderr through these, so a child that prints
//! gigabytes costs us `bytes_max` bytes each, and the part worth reading (how it ended) is kept.

use std::collections::VecDeque;

#[derive(Debug)]
pub(crate) struct TailBuffer {
    bytes: VecDeque<u8>,
    bytes_max: usize,
    bytes_dropped: u64,
}

impl TailBuffer {
    pub(crate) fn new(bytes_max: usize) -> Self {
        Self {
            // Grows on demand: most commands print far less than the limit.
            bytes: VecDeque::new(),
            bytes_max,
            bytes_dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        // Only the chunk's last `bytes_max` bytes can survive.
        let keep = &chunk[chunk.len().saturating_sub(self.bytes_max)..];
        let mut dropped = chunk.len() - keep.len();
        let overflow = (self.bytes.len() + keep.len()).saturating_sub(self.bytes_max);
        self.bytes.drain(..overflow);
        dropped += overflow;
        self.bytes.extend(keep);
        self.bytes_dropped += dropped as u64;
        debug_assert!(self.bytes.len() <= self.bytes_max);
    }

    /// Whether earlier bytes were discarded.
    pub(crate) fn truncated(&self) -> bool {
        self.bytes_dropped > 0
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.bytes.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(bytes_max: usize, chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut tail = TailBuffer::new(bytes_max);
        for chunk in chunks {
            tail.push(chunk);
        }
        let truncated = tail.truncated();
        (tail.into_vec(), truncated)
    }

    /// Writes that fit are kept whole; past the limit only the newest bytes are kept.
    #[test]
    fn keeps_the_last_bytes() {
        assert_eq!(tail_of(8, &[b"abc", b"def"]), (b"abcdef".to_vec(), false));
        assert_eq!(
            tail_of(8, &[b"abcdef", b"ghijk"]),
            (b"defghijk".to_vec(), true)
        );
        assert_eq!(
            tail_of(4, &[b"ab", b"0123456789"]),
            (b"6789".to_vec(), true)
        );
        assert_eq!(tail_of(4, &[b"0123", b""]), (b"0123".to_vec(), false));
        assert_eq!(tail_of(0, &[b"abc"]), (Vec::new(), true));
    }
}
