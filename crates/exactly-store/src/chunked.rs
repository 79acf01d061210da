//! [`ChunkedTree`]: a sled tree whose records are packed into chunks (the layout of
//! `chunks.rs`), read through a cache of decoded chunks. The state tree ([`crate::SledRecords`]
//! adds its overlay and views on top) and the payloads tree use it.
//!
//! **Invariant:** a read either answers from the tree or stops the process (a chunk that does
//! not decode is a store that cannot be trusted, as a failed sled read is).

use std::collections::{HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError};

use crate::chunks::{self, Entries};
use crate::error::{Error, Result};

/// Decoded chunks kept for reads, at most.
const CHUNK_CACHE_MAX: usize = 1_024;
/// Bytes the cached chunks may hold (their values, counted twice: the value the cache keeps to
/// check against the tree, and the decoded records). Chunks are a few KiB, but one record may
/// be larger (a payload of up to a MiB is a chunk of its own), so the count alone is no bound.
const CHUNK_CACHE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Sled keys at or after this byte are not chunks (an owner's marks: the state's head).
pub(crate) const FIRST_MARK_BYTE: u8 = 0xFF;

pub(crate) fn read_failed(what: impl std::fmt::Debug, e: impl std::fmt::Display) -> ! {
    panic!("reading the {what:?} records from sled failed: {e}")
}

pub(crate) fn is_chunk_key(key: &[u8]) -> bool {
    key.first().is_some_and(|b| *b < FIRST_MARK_BYTE)
}

/// Records packed into chunks in a sled tree.
pub struct ChunkedTree {
    tree: sled::Tree,
    /// The size chunks are cut at, if not by their first key ([`chunks::chunk_bytes_max`]).
    chunk_bytes: Option<usize>,
    cache: Mutex<ChunkCache>,
}

/// Decoded chunks by sled key, each with the value it was decoded from: an entry is used only
/// while the tree still holds that value, so a writer never has to tell the cache (a reader
/// that decoded a chunk just before a writer replaced it cannot leave a stale entry behind).
#[derive(Default)]
struct ChunkCache {
    chunks: HashMap<Vec<u8>, (sled::IVec, Arc<Entries>)>,
    order: VecDeque<Vec<u8>>,
    /// What the cached chunks hold, as [`CHUNK_CACHE_BYTES_MAX`] counts it.
    bytes: usize,
}

impl ChunkCache {
    fn get(&mut self, key: &[u8], value: &sled::IVec) -> Arc<Entries> {
        if let Some((raw, entries)) = self.chunks.get(key) {
            if raw == value {
                return entries.clone();
            }
        }
        let entries = Arc::new(
            chunks::decode(value).unwrap_or_else(|e| read_failed(String::from_utf8_lossy(key), e)),
        );
        let cost = 2 * value.len();
        if cost > CHUNK_CACHE_BYTES_MAX {
            return entries;
        }
        match self
            .chunks
            .insert(key.to_vec(), (value.clone(), entries.clone()))
        {
            Some((replaced, _)) => self.bytes -= 2 * replaced.len(),
            None => self.order.push_back(key.to_vec()),
        }
        self.bytes += cost;
        while self.order.len() > CHUNK_CACHE_MAX || self.bytes > CHUNK_CACHE_BYTES_MAX {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some((raw, _)) = self.chunks.remove(&oldest) {
                self.bytes -= 2 * raw.len();
            }
        }
        entries
    }
}

impl std::fmt::Debug for ChunkedTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedTree")
            .field("tree", &String::from_utf8_lossy(&self.tree.name()))
            .finish()
    }
}

impl ChunkedTree {
    /// The records of `tree`, chunks cut at each space's size.
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            chunk_bytes: None,
            cache: Mutex::new(ChunkCache::default()),
        }
    }

    /// The same with chunks cut at `chunk_bytes` (any size reads any other's chunks).
    pub fn with_chunk_bytes(tree: sled::Tree, chunk_bytes: usize) -> Self {
        Self {
            chunk_bytes: Some(chunk_bytes),
            ..Self::new(tree)
        }
    }

    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The size a chunk starting with `key` is cut at.
    pub(crate) fn chunk_bytes(&self, key: &[u8]) -> usize {
        self.chunk_bytes
            .unwrap_or_else(|| chunks::chunk_bytes_max(key))
    }

    /// The records of the chunk `key` whose value is `value`, decoded once.
    pub(crate) fn entries(&self, key: &[u8], value: &sled::IVec) -> Arc<Entries> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key, value)
    }

    /// The chunk whose range holds `key`: the one with the greatest sled key at or below it.
    pub(crate) fn chunk_at(&self, key: &[u8]) -> Option<(sled::IVec, Arc<Entries>)> {
        self.tree
            .range::<&[u8], _>(..=key)
            .next_back()
            .map(|r| r.unwrap_or_else(|e| read_failed(key, e)))
            .map(|(k, v)| {
                let entries = self.entries(&k, &v);
                (k, entries)
            })
    }

    /// The sled key of the first chunk after `key` (the end of the range of the chunk holding
    /// `key`).
    pub(crate) fn chunk_after(&self, key: &[u8]) -> Option<sled::IVec> {
        self.tree
            .range::<&[u8], _>((Bound::Excluded(key), Bound::Unbounded))
            .next()
            .map(|r| r.unwrap_or_else(|e| read_failed(key, e)))
            .map(|(k, _)| k)
            .filter(|k| is_chunk_key(k))
    }

    /// The value of the record `key`.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let (_, entries) = self.chunk_at(key)?;
        let at = entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()?;
        Some(entries[at].1.clone())
    }

    /// The records from `start` on, in key order (chunks decoded as they are reached).
    pub fn scan_from<'a>(&'a self, start: &[u8]) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a {
        let first = match self.chunk_at(start) {
            Some((chunk, _)) => chunk.to_vec(),
            None => start.to_vec(),
        };
        let skip_below = start.to_vec();
        self.tree
            .range(first..)
            .map(|r| r.unwrap_or_else(|e| read_failed("scan", e)))
            .take_while(|(k, _)| is_chunk_key(k))
            .flat_map(|(k, v)| records_of(self.entries(&k, &v)))
            .filter(move |(k, _)| *k >= skip_below)
    }

    /// The sled writes (chunk key → new chunk, or `None`: remove) that carry `changes` (full
    /// keys in increasing order; `None` removes) into the chunks the tree holds now, each
    /// chunk's writes in the order [`ChunkedTree::write_unbatched`] needs.
    pub(crate) fn plan(
        &self,
        changes: impl IntoIterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
    ) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut writes = Vec::new();
        let mut changes = changes.into_iter().peekable();
        while let Some((first, _)) = changes.peek() {
            let (chunk, old) = match self.chunk_at(first) {
                Some((key, entries)) => (Some(key.to_vec()), entries.as_ref().clone()),
                None => (None, Vec::new()),
            };
            let max_bytes = self.chunk_bytes(chunk.as_deref().unwrap_or(first));
            let end = self.chunk_after(chunk.as_deref().unwrap_or(first));
            let mut group = Vec::new();
            while let Some(change) =
                changes.next_if(|(k, _)| end.as_ref().is_none_or(|e| **k < **e))
            {
                group.push(change);
            }
            // The new chunks of a split first, the chunk they split from last: a reader between
            // two of those writes finds every record in one chunk or the other.
            let mut rewritten = chunks::rewrite(chunk.as_deref(), old, group, max_bytes);
            rewritten.reverse();
            writes.extend(rewritten);
        }
        writes
    }

    /// Applies `changes` (full keys in increasing order) one sled write at a time (no batch:
    /// readers see every record at every moment, old or new, but a crash may leave some of
    /// the changes undone). Blocking; not a durability point.
    pub fn write_unbatched(
        &self,
        changes: impl IntoIterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
        what: &'static str,
    ) -> Result<()> {
        for (key, value) in self.plan(changes) {
            match value {
                Some(value) => self.tree.insert(key, value).map(drop),
                None => self.tree.remove(key).map(drop),
            }
            .map_err(|e| Error::sled(what, e))?;
        }
        Ok(())
    }

    /// The sled writes that fill a tree holding nothing in the records' range with `records`
    /// (keys strictly increasing): full chunks, each of one space (first key byte), handed to
    /// `write` a few hundred at a time.
    pub(crate) fn fill_with(
        &self,
        records: impl IntoIterator<Item = Result<(Vec<u8>, Vec<u8>)>>,
        batch_max: usize,
        mut write: impl FnMut(Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<()>,
    ) -> Result<()> {
        let mut writes = Vec::new();
        let mut chunk: Entries = Vec::new();
        let mut bytes = 0;
        let mut cut = |chunk: &mut Entries, writes: &mut Vec<_>| -> Result<()> {
            if chunk.is_empty() {
                return Ok(());
            }
            let chunk = std::mem::take(chunk);
            writes.push((chunk[0].0.clone(), Some(chunks::encode(&chunk))));
            if writes.len() >= batch_max {
                write(std::mem::take(writes))?;
            }
            Ok(())
        };
        for record in records {
            let (key, value) = record?;
            assert!(is_chunk_key(&key), "a record's key starts below byte 0xFF");
            if let Some((last, _)) = chunk.last() {
                assert!(*last < key, "records are filled in key order");
            }
            let size = key.len() + value.len() + 3;
            let other_space = chunk.first().is_some_and(|(first, _)| first[0] != key[0]);
            let full = chunk
                .first()
                .is_some_and(|(first, _)| bytes + size > self.chunk_bytes(first));
            if other_space || full {
                cut(&mut chunk, &mut writes)?;
                bytes = 0;
            }
            bytes += size;
            chunk.push((key, value));
        }
        cut(&mut chunk, &mut writes)?;
        if !writes.is_empty() {
            write(writes)?;
        }
        Ok(())
    }

    /// How many records the tree holds (reads every chunk).
    pub fn count(&self) -> usize {
        self.scan_from(&[]).count()
    }

    /// Removes every chunk (and the marks).
    pub fn clear(&self) -> std::result::Result<(), sled::Error> {
        self.tree.clear()
    }
}

/// A decoded chunk's records, copied one at a time as they are taken.
pub(crate) fn records_of(
    entries: Arc<Entries>,
) -> impl DoubleEndedIterator<Item = (Vec<u8>, Vec<u8>)> {
    (0..entries.len()).map(move |i| entries[i].clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The cache holds at most its count and its bytes, whatever the chunks' sizes, and never
    /// answers with a chunk whose value the tree no longer holds.
    #[test]
    fn the_cache_is_bounded_in_count_and_bytes_and_follows_the_tree() {
        let mut cache = ChunkCache::default();
        let chunk = |n: usize, fill: u8| {
            let entries = vec![(vec![fill], vec![fill; n])];
            sled::IVec::from(chunks::encode(&entries))
        };
        for i in 0..3 * CHUNK_CACHE_MAX {
            let key = (i as u64).to_be_bytes();
            cache.get(&key, &chunk(10, 1));
            assert!(cache.order.len() <= CHUNK_CACHE_MAX);
            assert_eq!(cache.order.len(), cache.chunks.len());
        }
        for i in 0..40u64 {
            cache.get(&i.to_be_bytes(), &chunk(512 * 1024, 2));
            assert!(
                cache.bytes <= CHUNK_CACHE_BYTES_MAX,
                "{} bytes",
                cache.bytes
            );
            assert_eq!(cache.order.len(), cache.chunks.len());
        }
        // Its value alone is over half the bound: not kept.
        let too_big = chunk(CHUNK_CACHE_BYTES_MAX / 2 + 1, 3);
        cache.get(b"big", &too_big);
        assert!(!cache.chunks.contains_key(&b"big"[..]));
        let key = 1u64.to_be_bytes();
        let old = cache.get(&key, &chunk(10, 4));
        let new = cache.get(&key, &chunk(10, 5));
        assert_ne!(old, new, "a changed value is decoded again");
        assert_eq!(new[0].1, vec![5; 10]);
    }

    /// While a writer adds records in scattered order one sled write at a time (chunks of a
    /// few records, split all the time), a reader always finds every record written before it
    /// looked: no moment between two writes of a split hides one.
    #[test]
    fn unbatched_writes_never_hide_a_record_from_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let chunks = Arc::new(ChunkedTree::with_chunk_bytes(
            db.open_tree("t").unwrap(),
            60,
        ));
        let order: Vec<u64> = (0..1_500u64).map(|i| (i * 7_919) % 1_500).collect();
        let done = Arc::new(AtomicU64::new(0));
        let reader = {
            let (chunks, done, order) = (chunks.clone(), done.clone(), order.clone());
            std::thread::spawn(move || {
                let mut checks = 0u64;
                loop {
                    let written = done.load(Ordering::Acquire) as usize;
                    for id in &order[written.saturating_sub(50)..written] {
                        let value = chunks.get(&id.to_be_bytes());
                        assert_eq!(value, Some(id.to_le_bytes().to_vec()), "record {id}");
                        checks += 1;
                    }
                    if written == order.len() {
                        return checks;
                    }
                }
            })
        };
        for (n, id) in order.iter().enumerate() {
            let change = (id.to_be_bytes().to_vec(), Some(id.to_le_bytes().to_vec()));
            chunks.write_unbatched([change], "test").unwrap();
            done.store(n as u64 + 1, Ordering::Release);
        }
        let checks = reader.join().unwrap();
        assert!(checks > 1_500, "{checks} checks");
        assert_eq!(chunks.count(), 1_500);
        assert!(chunks.tree().len() > 100, "{} chunks", chunks.tree().len());
    }
}
