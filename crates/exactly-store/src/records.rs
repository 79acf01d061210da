//! [`SledRecords`]: the job table's records ([`exactly_core::records`]) in a sled tree.
//!
//! One tree holds every [`Space`], each key prefixed with its space's byte (the layout
//! [`exactly_core::records::MemRecords`] models), packed into chunks of a few KiB by key order
//! ([`crate::chunks`]: one sled key per chunk, not per record), so that everything one apply
//! call changed can be written as one `sled::Batch`, which sled applies atomically: a crash
//! leaves the tree as it was after some whole apply call, never half of one. Writes wait in
//! memory until [`SledRecords::commit`]; reads see them (an overlay merged over the tree), so
//! apply reads its own writes.
//!
//! **Invariant:** a read either answers from the tree and the overlay or stops the process: a
//! replica that cannot read its state must not apply an entry on a guess (the `Records` trait
//! is infallible because apply is).

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError};

use exactly_core::records::layout::full_key;
use exactly_core::records::{MemRecords, Records, Space};

use crate::chunked::{is_chunk_key, read_failed, records_of, ChunkedTree};
use crate::chunks::{self, Entries};
use crate::error::{Error, Result};

/// Sled writes per batch when [`SledRecords::commit_marked`] or [`SledRecords::fill`] write
/// many (sled leaks space and memory with larger batches: see [`crate::PURGE_BATCH_KEYS_MAX`]).
pub const COMMIT_BATCH_KEYS_MAX: usize = 256;

/// The job table's records in a sled tree, with the writes of the apply calls under way.
pub struct SledRecords {
    /// The committed records, in chunks.
    chunks: ChunkedTree,
    /// Writes not yet in the tree, by full key (space byte first); `None` removes.
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The capture of a consistent view, while one is read ([`SledRecords::capture`]).
    capture: Arc<Mutex<Option<Capture>>>,
}

/// A consistent view being read while apply goes on: the reader walks the chunks in key order,
/// and a commit first saves the value of every chunk it changes that the reader has not passed
/// yet (once: the value at the capture's point), so the reader reads each chunk as it was at
/// that point: from the saved value if there is one, else from the tree (unchanged since). The
/// saved values live in a sled tree of their own, so a long read under heavy writes costs disk,
/// not memory.
struct Capture {
    /// Which capture this is (a view of an earlier one reads nothing more).
    id: u64,
    /// The sled key of the last chunk the reader read or skipped (`None`: before the first).
    cursor: Option<Vec<u8>>,
    /// Chunk key → the chunk at the capture's point: `[1, value…]`, or `[0]` if absent then.
    saved: sled::Tree,
}

impl std::fmt::Debug for SledRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledRecords")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl SledRecords {
    /// The records in `tree` (which holds nothing else but keys from byte 0xFF on).
    pub fn new(tree: sled::Tree) -> Self {
        Self::over(ChunkedTree::new(tree))
    }

    /// The same with chunks cut at `chunk_bytes` (any size reads any other's chunks: tests
    /// use small ones to split and merge often).
    pub fn with_chunk_bytes(tree: sled::Tree, chunk_bytes: usize) -> Self {
        Self::over(ChunkedTree::with_chunk_bytes(tree, chunk_bytes))
    }

    fn over(chunks: ChunkedTree) -> Self {
        Self {
            chunks,
            pending: BTreeMap::new(),
            capture: Arc::new(Mutex::new(None)),
        }
    }

    /// The tree the records are in.
    pub fn tree(&self) -> &sled::Tree {
        self.chunks.tree()
    }

    /// Starts reading a consistent view of the committed records as they are now, while
    /// commits go on: `saved` (an empty tree of its own, cleared first) keeps the chunks later
    /// commits replace before the reader reaches them. Call it with nothing uncommitted, at the
    /// point the view is of. One view at a time; a second call ends the first.
    pub fn capture(&mut self, saved: sled::Tree) -> Result<CapturedView> {
        assert!(
            self.pending.is_empty(),
            "a view is captured between apply calls, with nothing uncommitted"
        );
        saved
            .clear()
            .map_err(|e| Error::sled("clearing a capture's saved values", e))?;
        let mut capture = self.capture.lock().unwrap_or_else(PoisonError::into_inner);
        // Unique in the process, so that no ended view can read a later capture.
        static CAPTURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = CAPTURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        *capture = Some(Capture {
            id,
            cursor: None,
            saved,
        });
        Ok(CapturedView {
            id,
            tree: self.tree().clone(),
            capture: self.capture.clone(),
            chunk: Vec::new().into_iter(),
        })
    }

    /// Ends the capture under way, if any: its view reads nothing more. Call it before the
    /// tree is replaced wholesale (a snapshot install).
    pub fn end_capture(&mut self) {
        let ended = self
            .capture
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(capture) = ended {
            if let Err(e) = capture.saved.clear() {
                tracing::warn!(error = %e, "clearing a capture's saved values failed");
            }
        }
    }

    /// How many writes wait for [`SledRecords::commit`].
    pub fn uncommitted(&self) -> usize {
        self.pending.len()
    }

    /// The sled writes (chunk key → new chunk, or `None`: remove) that carry what waits, which
    /// is taken.
    fn plan(&mut self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let pending = std::mem::take(&mut self.pending);
        self.chunks.plan(pending)
    }

    /// Writes `writes` and `extra` as one atomic batch, first saving for the capture under way
    /// the chunks its reader has not passed.
    fn write(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>, extra: sled::Batch) -> Result<()> {
        let capture = self.capture.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(capture) = capture.as_ref() {
            for (key, _) in &writes {
                let passed = capture.cursor.as_ref().is_some_and(|c| key <= c);
                let known = capture
                    .saved
                    .contains_key(key)
                    .map_err(|e| Error::sled("reading a capture's saved values", e))?;
                if passed || known {
                    continue;
                }
                let now = self
                    .tree()
                    .get(key)
                    .map_err(|e| Error::sled("reading a chunk to save for a capture", e))?;
                let saved = match now {
                    Some(value) => [&[1u8][..], &value].concat(),
                    None => vec![0],
                };
                capture
                    .saved
                    .insert(key.as_slice(), saved)
                    .map_err(|e| Error::sled("saving a chunk for a capture", e))?;
            }
        }
        drop(capture);
        let mut batch = extra;
        for (key, value) in writes {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.tree()
            .apply_batch(batch)
            .map_err(|e| Error::sled("writing the state's records", e))
    }

    /// Writes what waits, and `extra` (keys from byte 0xFF on, outside every chunk), as one
    /// atomic sled batch. Blocking; not a durability point.
    pub fn commit(&mut self, extra: sled::Batch) -> Result<()> {
        let writes = self.plan();
        self.write(writes, extra)
    }

    /// Writes what waits and then sets `mark` (a key from byte 0xFF on) to `value`: the mark
    /// says the tree holds a whole commit. Up to [`COMMIT_BATCH_KEYS_MAX`] chunk writes go as
    /// one atomic batch with the mark; more go in batches of that size after the mark was
    /// removed, and the mark is set again last, so a crash half-way leaves a tree without its
    /// mark (which the owner must treat as unusable: the state machine rebuilds it from its
    /// snapshot). Blocking; not a durability point.
    pub fn commit_marked(&mut self, mark: &[u8], value: Vec<u8>) -> Result<()> {
        assert!(!is_chunk_key(mark), "a mark is outside the chunks");
        let mut writes = self.plan();
        if writes.len() < COMMIT_BATCH_KEYS_MAX {
            let mut batch = sled::Batch::default();
            batch.insert(mark, value);
            return self.write(writes, batch);
        }
        self.tree()
            .remove(mark)
            .map_err(|e| Error::sled("removing the state's commit mark", e))?;
        while !writes.is_empty() {
            let tail = writes.split_off(writes.len().saturating_sub(COMMIT_BATCH_KEYS_MAX));
            self.write(tail, sled::Batch::default())?;
        }
        self.tree()
            .insert(mark, value)
            .map_err(|e| Error::sled("writing the state's commit mark", e))?;
        Ok(())
    }

    /// Fills the tree, which must hold no records, with `records` (full keys in strictly
    /// increasing order, and values), in full chunks (each of one space), [`COMMIT_BATCH_KEYS_MAX`] chunks per
    /// batch, without holding more than one batch in memory. Blocking; not a durability point.
    pub fn fill(
        &mut self,
        records: impl IntoIterator<Item = Result<(Vec<u8>, Vec<u8>)>>,
    ) -> Result<()> {
        assert!(
            self.pending.is_empty(),
            "a tree is filled with nothing uncommitted"
        );
        self.chunks
            .fill_with(records, COMMIT_BATCH_KEYS_MAX, |writes| {
                self.write(writes, sled::Batch::default())
            })
    }

    /// Forgets what waits (the tree keeps what was committed).
    pub fn discard(&mut self) {
        self.pending.clear();
    }
}

/// A consistent view of the records at the point [`SledRecords::capture`] was called, read in
/// key order while apply goes on. Dropping it ends the capture.
pub struct CapturedView {
    id: u64,
    tree: sled::Tree,
    capture: Arc<Mutex<Option<Capture>>>,
    /// The rest of the chunk read last.
    chunk: std::vec::IntoIter<(Vec<u8>, Vec<u8>)>,
}

impl CapturedView {
    /// The records of the view, in key order, as an iterator (stops at the first error,
    /// which it yields).
    pub fn records(&mut self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + '_ {
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let next = self.next_record().transpose();
            failed = matches!(next, Some(Err(_)));
            next
        })
    }

    /// The next record of the view: (full key, with its space's byte first; value), or `None`
    /// at the end. Each chunk is read under the capture's lock (a commit waits for at most one
    /// chunk's read).
    pub fn next_record(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        loop {
            if let Some(record) = self.chunk.next() {
                return Ok(Some(record));
            }
            match self.next_chunk()? {
                Some(entries) => self.chunk = entries.into_iter(),
                None => return Ok(None),
            }
        }
    }

    fn next_chunk(&mut self) -> Result<Option<Entries>> {
        let mut guard = self.capture.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(capture) = guard.as_mut().filter(|c| c.id == self.id) else {
            return Err(Error::Invalid(
                "this captured view was ended by a newer capture".to_string(),
            ));
        };
        loop {
            let after = match &capture.cursor {
                Some(c) => Bound::Excluded(c.clone()),
                None => Bound::Unbounded,
            };
            let read = |tree: &sled::Tree, what: &'static str| {
                tree.range::<Vec<u8>, _>((after.clone(), Bound::Unbounded))
                    .next()
                    .transpose()
                    .map(|found| found.filter(|(k, _)| is_chunk_key(k)))
                    .map_err(|e| Error::sled(what, e))
            };
            let in_tree = read(&self.tree, "reading a captured view")?;
            let in_saved = read(&capture.saved, "reading a capture's saved values")?;
            let key = match (&in_tree, &in_saved) {
                (None, None) => return Ok(None),
                (Some((t, _)), None) => t.to_vec(),
                (None, Some((s, _))) => s.to_vec(),
                (Some((t, _)), Some((s, _))) => t.min(s).to_vec(),
            };
            capture.cursor = Some(key.clone());
            let saved = in_saved.filter(|(s, _)| **s == *key);
            let value = match saved {
                Some((_, v)) if v.first() == Some(&1) => Some(v[1..].to_vec()),
                Some(_) => None,
                None => in_tree.map(|(_, v)| v.to_vec()),
            };
            if let Some(value) = value {
                let entries = chunks::decode(&value)
                    .map_err(|e| Error::Invalid(format!("a captured chunk: {e}")))?;
                return Ok(Some(entries));
            }
        }
    }
}

impl Drop for CapturedView {
    fn drop(&mut self) {
        let mut guard = self.capture.lock().unwrap_or_else(PoisonError::into_inner);
        let ended = match guard.as_ref() {
            Some(c) if c.id == self.id => guard.take(),
            _ => None,
        };
        drop(guard);
        if let Some(capture) = ended {
            if let Err(e) = capture.saved.clear() {
                tracing::warn!(error = %e, "clearing a capture's saved values failed");
            }
        }
    }
}

/// Merges the tree's entries with the overlay's, in key order (or reverse order); the overlay
/// wins on equal keys, and its removals hide the tree's entries.
struct Overlay<D, M>
where
    D: Iterator<Item = (Vec<u8>, Vec<u8>)>,
    M: Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
{
    disk: Peekable<D>,
    mem: Peekable<M>,
    reverse: bool,
}

impl<D, M> Iterator for Overlay<D, M>
where
    D: Iterator<Item = (Vec<u8>, Vec<u8>)>,
    M: Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
{
    type Item = (Vec<u8>, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let take_mem = match (self.disk.peek(), self.mem.peek()) {
                (None, None) => return None,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((d, _)), Some((m, _))) => {
                    if d == m {
                        self.disk.next();
                        true
                    } else {
                        (m < d) != self.reverse
                    }
                }
            };
            if !take_mem {
                return self.disk.next();
            }
            match self.mem.next() {
                Some((key, Some(value))) => return Some((key, value)),
                Some((_, None)) => continue,
                None => return None,
            }
        }
    }
}

impl SledRecords {
    /// The entries of `space` among the tree's records `disk` (full keys, in the scan's
    /// direction, starting where the scan starts) and the overlay's `mem`, merged, without the
    /// space's byte.
    fn merged<'a>(
        &'a self,
        space: Space,
        disk: impl Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a,
        mem: impl Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)> + 'a,
        reverse: bool,
    ) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        let tag = space as u8;
        let disk = disk.take_while(move |(k, _)| k[0] == tag);
        let mem = mem
            .take_while(move |(k, _)| k[0] == tag)
            .map(|(k, v)| (k.clone(), v.clone()));
        Box::new(
            Overlay {
                disk: disk.peekable(),
                mem: mem.peekable(),
                reverse,
            }
            .map(|(k, v)| (k[1..].to_vec(), v)),
        )
    }
}

impl Records for SledRecords {
    fn get(&self, space: Space, key: &[u8]) -> Option<Vec<u8>> {
        let full = full_key(space, key);
        if let Some(pending) = self.pending.get(&full) {
            return pending.clone();
        }
        self.chunks.get(&full)
    }

    fn put(&mut self, space: Space, key: &[u8], value: &[u8]) {
        self.pending
            .insert(full_key(space, key), Some(value.to_vec()));
    }

    fn delete(&mut self, space: Space, key: &[u8]) {
        self.pending.insert(full_key(space, key), None);
    }

    fn scan_from<'a>(
        &'a self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        let start = full_key(space, from);
        let disk = self.chunks.scan_from(&start);
        let mem = self.pending.range(start..);
        self.merged(space, disk, mem, false)
    }

    fn scan_back<'a>(&'a self, space: Space) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        let end = vec![space as u8 + 1];
        let skip_from = end.clone();
        let disk = self
            .tree()
            .range(..end.clone())
            .rev()
            .map(move |r| r.unwrap_or_else(|e| read_failed(space, e)))
            .flat_map(|(k, v)| records_of(self.chunks.entries(&k, &v)).rev())
            .skip_while(move |(k, _)| *k >= skip_from);
        let mem = self.pending.range(..end).rev();
        self.merged(space, disk, mem, true)
    }
}

/// Where a node keeps its job table's records (`table-storage` in the node's configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableStorage {
    /// In memory ([`MemRecords`]): the fastest apply; memory grows with the retained jobs; a
    /// restart loads the snapshot and re-applies the log after it.
    #[default]
    Memory,
    /// On disk ([`SledRecords`], the `state_chunks` tree): memory stays flat whatever the backlog; a
    /// restart resumes from the state on disk.
    Disk,
}

/// The records of a node's job table, in memory or on disk ([`TableStorage`]).
pub enum NodeRecords {
    Memory(MemRecords),
    Disk(SledRecords),
}

impl std::fmt::Debug for NodeRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeRecords::Memory(_) => f.write_str("NodeRecords::Memory"),
            NodeRecords::Disk(d) => d.fmt(f),
        }
    }
}

impl Records for NodeRecords {
    fn get(&self, space: Space, key: &[u8]) -> Option<Vec<u8>> {
        match self {
            NodeRecords::Memory(m) => m.get(space, key),
            NodeRecords::Disk(d) => d.get(space, key),
        }
    }

    fn put(&mut self, space: Space, key: &[u8], value: &[u8]) {
        match self {
            NodeRecords::Memory(m) => m.put(space, key, value),
            NodeRecords::Disk(d) => d.put(space, key, value),
        }
    }

    fn delete(&mut self, space: Space, key: &[u8]) {
        match self {
            NodeRecords::Memory(m) => m.delete(space, key),
            NodeRecords::Disk(d) => d.delete(space, key),
        }
    }

    fn scan_from<'a>(
        &'a self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        match self {
            NodeRecords::Memory(m) => m.scan_from(space, from),
            NodeRecords::Disk(d) => d.scan_from(space, from),
        }
    }

    fn scan_back<'a>(&'a self, space: Space) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        match self {
            NodeRecords::Memory(m) => m.scan_back(space),
            NodeRecords::Disk(d) => d.scan_back(space),
        }
    }
}
