//! [`SledRecords`]: the job table's records ([`exactly_core::records`]) in a sled tree.
//!
//! One tree holds every [`Space`], each key prefixed with its space's byte (the layout
//! [`exactly_core::records::MemRecords`] models), so that everything one apply call changed can
//! be written as one `sled::Batch`, which sled applies atomically: a crash leaves the tree as it
//! was after some whole apply call, never half of one. Writes wait in memory until
//! [`SledRecords::commit`]; reads see them (an overlay merged over the tree), so apply reads
//! its own writes.
//!
//! **Invariant:** a read either answers from the tree and the overlay or stops the process: a
//! replica that cannot read its state must not apply an entry on a guess (the `Records` trait
//! is infallible because apply is).

use std::collections::BTreeMap;
use std::iter::Peekable;

use exactly_core::records::{Records, Space};

use crate::error::{Error, Result};

/// The job table's records in a sled tree, with the writes of the apply call under way.
pub struct SledRecords {
    tree: sled::Tree,
    /// Writes not yet in the tree, by full key (space byte first); `None` removes.
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl std::fmt::Debug for SledRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledRecords")
            .field("pending", &self.pending.len())
            .finish()
    }
}

fn prefixed(space: Space, key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(1 + key.len());
    full.push(space as u8);
    full.extend_from_slice(key);
    full
}

fn read_failed(space: Space, e: sled::Error) -> ! {
    panic!("reading the state's {space:?} records from sled failed: {e}")
}

impl SledRecords {
    /// The records in `tree` (which holds nothing else).
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            pending: BTreeMap::new(),
        }
    }

    /// How many writes wait for [`SledRecords::commit`].
    pub fn uncommitted(&self) -> usize {
        self.pending.len()
    }

    /// Writes what waits, and `extra` (keys outside every space: a first byte no [`Space`]
    /// has), as one atomic sled batch. Blocking; not a durability point.
    pub fn commit(&mut self, extra: sled::Batch) -> Result<()> {
        let mut batch = extra;
        for (key, value) in std::mem::take(&mut self.pending) {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| Error::sled("writing the state's records", e))
    }

    /// Forgets what waits (the tree keeps what was committed).
    pub fn discard(&mut self) {
        self.pending.clear();
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

impl Records for SledRecords {
    fn get(&self, space: Space, key: &[u8]) -> Option<Vec<u8>> {
        let full = prefixed(space, key);
        if let Some(value) = self.pending.get(&full) {
            return value.clone();
        }
        match self.tree.get(&full) {
            Ok(value) => value.map(|v| v.to_vec()),
            Err(e) => read_failed(space, e),
        }
    }

    fn put(&mut self, space: Space, key: &[u8], value: &[u8]) {
        self.pending
            .insert(prefixed(space, key), Some(value.to_vec()));
    }

    fn delete(&mut self, space: Space, key: &[u8]) {
        self.pending.insert(prefixed(space, key), None);
    }

    fn scan_from<'a>(
        &'a self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        let start = prefixed(space, from);
        let tag = space as u8;
        let disk = self
            .tree
            .range(start.clone()..)
            .map(move |r| r.unwrap_or_else(|e| read_failed(space, e)))
            .take_while(move |(k, _)| k[0] == tag)
            .map(|(k, v)| (k.to_vec(), v.to_vec()));
        let mem = self
            .pending
            .range(start..)
            .take_while(move |(k, _)| k[0] == tag)
            .map(|(k, v)| (k.clone(), v.clone()));
        Box::new(
            Overlay {
                disk: disk.peekable(),
                mem: mem.peekable(),
                reverse: false,
            }
            .map(|(k, v)| (k[1..].to_vec(), v)),
        )
    }

    fn scan_back<'a>(&'a self, space: Space) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        let tag = space as u8;
        let end = vec![tag + 1];
        let disk = self
            .tree
            .range(..end.clone())
            .rev()
            .map(move |r| r.unwrap_or_else(|e| read_failed(space, e)))
            .take_while(move |(k, _)| k[0] == tag)
            .map(|(k, v)| (k.to_vec(), v.to_vec()));
        let mem = self
            .pending
            .range(..end)
            .rev()
            .take_while(move |(k, _)| k[0] == tag)
            .map(|(k, v)| (k.clone(), v.clone()));
        Box::new(
            Overlay {
                disk: disk.peekable(),
                mem: mem.peekable(),
                reverse: true,
            }
            .map(|(k, v)| (k[1..].to_vec(), v)),
        )
    }
}
