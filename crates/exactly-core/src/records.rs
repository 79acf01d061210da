//! The storage boundary between the state machine and the engine that keeps its records.
//!
//! The job table moves the records that grow with the number of jobs out of its own fields and
//! into a [`Records`] store, one family at a time: a store is a set of ordered maps
//! ([`Space`]s) of byte keys to byte values, and `layout` (this module's typed half) decides
//! how each record and index entry is encoded, with keys whose byte order is the order the
//! table needs (big-endian integers, strings ended by a 0 byte, which no queue name, ordering
//! key or idempotency key may hold). The layout is the same whatever keeps the bytes: the
//! in-memory model here ([`MemRecords`], what the table uses today and what tests check a
//! layout against) and an on-disk engine (sled, one tree whose keys start with the space's
//! byte, so that one atomic batch can carry every change of an entry).
//!
//! A store never decides anything: apply reads and writes it, and every index in it stays
//! derivable from the records (`JobTable::check_invariants` checks them through this trait).
//!
//! **Boundary:** no I/O here. An engine that cannot read or write must stop its process: a
//! replica that cannot apply an entry as the others did must not answer for it.

use std::ops::Bound;

use imbl::OrdMap;
use serde::{de::DeserializeOwned, Serialize};

/// One ordered map of a [`Records`] store. The discriminant is the key prefix an engine with a
/// single keyspace puts before the space's keys; it is part of the layout and never changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Space {
    /// Job id → [`crate::Job`]: the records of pending, running and dead jobs.
    Jobs = 0,
    /// Idempotency key → [`crate::KeyRecord`].
    Keys = 1,
    /// (first use, idempotency key) → nothing: the keys by age, for retention.
    KeysByAge = 2,
    /// (finish time, job id) → nothing: succeeded and cancelled jobs by finish time, for
    /// retention.
    Finished = 3,
    /// (time of death, job id) → nothing: the dead letters, oldest first.
    Dead = 4,
    /// Job id → [`crate::FinishedJob`]: what apply keeps of a succeeded or cancelled job whose
    /// record went to the shell's archive.
    Archived = 5,
    /// (queue, negated priority, job id) → nothing: each queue's pending jobs that are due and
    /// eligible (first of their ordering line), in start order: highest priority first, then
    /// FIFO.
    Ready = 6,
    /// (run at, job id) → nothing: eligible pending jobs not due yet.
    Delayed = 7,
    /// (queue, ordering key) → the live jobs of that ordering line, in the order they run
    /// (only the first is eligible). A line is one record, rewritten whole when it changes:
    /// lines are meant to be short (one customer's, one entity's jobs).
    Lines = 8,
}

impl Space {
    pub const ALL: [Space; 9] = [
        Space::Jobs,
        Space::Keys,
        Space::KeysByAge,
        Space::Finished,
        Space::Dead,
        Space::Archived,
        Space::Ready,
        Space::Delayed,
        Space::Lines,
    ];
}

/// An ordered store of byte records in [`Space`]s, which the job table reads and writes while
/// it applies an entry.
pub trait Records {
    /// The value under `key` in `space`.
    fn get(&self, space: Space, key: &[u8]) -> Option<Vec<u8>>;
    /// Sets `key` in `space` to `value`, replacing what was there.
    fn put(&mut self, space: Space, key: &[u8], value: &[u8]);
    /// Removes `key` from `space` (nothing if absent).
    fn delete(&mut self, space: Space, key: &[u8]);
    /// The entries of `space` whose keys are at or after `from`, in key order.
    fn scan_from<'a>(
        &'a self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a>;
    /// The entries of `space`, last key first.
    fn scan_back<'a>(&'a self, space: Space) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a>;
    /// How many entries `space` holds (a scan: for checks and tests, not for apply).
    fn count(&self, space: Space) -> usize {
        self.scan_from(space, &[]).count()
    }
}

/// The in-memory [`Records`] store: one persistent ordered map whose keys start with their
/// space's byte (the layout an engine with one keyspace uses). Cloning it is O(1) and shares
/// the entries, so the snapshot builder's copy of the table stays cheap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemRecords(OrdMap<Box<[u8]>, Box<[u8]>>);

fn prefixed(space: Space, key: &[u8]) -> Box<[u8]> {
    layout::full_key(space, key).into_boxed_slice()
}

impl Records for MemRecords {
    fn get(&self, space: Space, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(&prefixed(space, key)).map(|v| v.to_vec())
    }

    fn put(&mut self, space: Space, key: &[u8], value: &[u8]) {
        self.0.insert(prefixed(space, key), value.into());
    }

    fn delete(&mut self, space: Space, key: &[u8]) {
        self.0.remove(&prefixed(space, key));
    }

    fn scan_from<'a>(
        &'a self,
        space: Space,
        from: &[u8],
    ) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        let start = prefixed(space, from);
        let tag = space as u8;
        Box::new(
            self.0
                .range((Bound::Included(start), Bound::Unbounded))
                .take_while(move |(k, _)| k[0] == tag)
                .map(|(k, v)| (k[1..].to_vec(), v.to_vec())),
        )
    }

    fn scan_back<'a>(&'a self, space: Space) -> Box<dyn Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a> {
        let tag = space as u8;
        let end: Box<[u8]> = Box::new([tag + 1]);
        Box::new(
            self.0
                .range((Bound::Unbounded, Bound::Excluded(end)))
                .rev()
                .take_while(move |(k, _)| k[0] == tag)
                .map(|(k, v)| (k[1..].to_vec(), v.to_vec())),
        )
    }
}

/// Key and value encodings: the layout of every space.
pub mod layout {
    use super::*;

    /// A value as stored: postcard, the encoding of the log and snapshots.
    pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        postcard::to_stdvec(value).expect("encoding a record into memory cannot fail")
    }

    /// A stored value, decoded. A value that does not decode was written by a bug or a broken
    /// engine, never by a client: the replica must stop rather than apply on a guess.
    pub fn decode<T: DeserializeOwned>(space: Space, bytes: &[u8]) -> T {
        match postcard::from_bytes(bytes) {
            Ok(value) => value,
            Err(e) => panic!("a record in {space:?} does not decode: {e}"),
        }
    }

    /// A key as an engine with one keyspace stores it: its space's byte, then the key.
    pub fn full_key(space: Space, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(1 + key.len());
        full.push(space as u8);
        full.extend_from_slice(key);
        full
    }

    /// A `u64` whose byte order is its numeric order.
    pub fn u64_key(n: u64) -> [u8; 8] {
        n.to_be_bytes()
    }

    /// The `u64` at the start of `key`.
    pub fn read_u64(key: &[u8]) -> u64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&key[..8]);
        u64::from_be_bytes(bytes)
    }

    /// `Finished` and `Dead`: (time, job id).
    pub fn time_id(at_ms: u64, id: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&u64_key(at_ms));
        k[8..].copy_from_slice(&u64_key(id));
        k
    }

    /// The (time, job id) of a `Finished` or `Dead` key.
    pub fn read_time_id(key: &[u8]) -> (u64, u64) {
        (read_u64(key), read_u64(&key[8..]))
    }

    /// The start of a queue's keys in `Ready`: its name and a 0 byte (which no queue name holds).
    pub fn ready_prefix(queue: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(queue.len() + 17);
        k.extend_from_slice(queue.as_bytes());
        k.push(0);
        k
    }

    /// `Ready`: (queue, negated priority, job id). The `i64` with its sign bit flipped sorts as
    /// a number.
    pub fn ready_key(queue: &str, negated_priority: i64, id: u64) -> Vec<u8> {
        let mut k = ready_prefix(queue);
        k.extend_from_slice(&u64_key((negated_priority as u64) ^ (1 << 63)));
        k.extend_from_slice(&u64_key(id));
        k
    }

    /// The (negated priority, job id) of a `Ready` key after its queue's prefix.
    pub fn read_ready(rest: &[u8]) -> (i64, u64) {
        ((read_u64(rest) ^ (1 << 63)) as i64, read_u64(&rest[8..]))
    }

    /// `Lines`: (queue, ordering key): the queue's name, a 0 byte, the key.
    pub fn line_key(queue: &str, ordering_key: &str) -> Vec<u8> {
        let mut k = ready_prefix(queue);
        k.extend_from_slice(ordering_key.as_bytes());
        k
    }

    /// The (queue, ordering key) of a `Lines` key.
    pub fn read_line_key(key: &[u8]) -> (String, String) {
        let end = key.iter().position(|&b| b == 0).unwrap_or(key.len());
        let rest = key.get(end + 1..).unwrap_or_default();
        (
            String::from_utf8_lossy(&key[..end]).into_owned(),
            String::from_utf8_lossy(rest).into_owned(),
        )
    }

    /// `KeysByAge`: (first use, idempotency key).
    pub fn key_age(at_ms: u64, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(8 + key.len());
        k.extend_from_slice(&u64_key(at_ms));
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The (first use, idempotency key) of a `KeysByAge` key.
    pub fn read_key_age(bytes: &[u8]) -> (u64, String) {
        (
            read_u64(bytes),
            String::from_utf8_lossy(&bytes[8..]).into_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::layout::*;
    use super::*;

    #[test]
    fn spaces_are_separate_and_ordered_by_key_bytes() {
        let mut r = MemRecords::default();
        r.put(Space::KeysByAge, &key_age(5, "b"), &[]);
        r.put(Space::KeysByAge, &key_age(5, "a"), &[]);
        r.put(Space::KeysByAge, &key_age(300, "a"), &[]);
        r.put(Space::Keys, b"a", b"1");
        r.put(Space::Keys, b"b", b"2");
        let ages: Vec<_> = r
            .scan_from(Space::KeysByAge, &[])
            .map(|(k, _)| read_key_age(&k))
            .collect();
        assert_eq!(
            ages,
            vec![
                (5, "a".to_string()),
                (5, "b".to_string()),
                (300, "a".to_string())
            ]
        );
        let back: Vec<_> = r.scan_back(Space::Keys).map(|(k, _)| k).collect();
        assert_eq!(back, vec![b"b".to_vec(), b"a".to_vec()]);
        let from: Vec<_> = r.scan_from(Space::Keys, b"b").map(|(_, v)| v).collect();
        assert_eq!(from, vec![b"2".to_vec()]);
        assert_eq!(r.count(Space::Keys), 2);
        r.delete(Space::Keys, b"a");
        assert_eq!(r.get(Space::Keys, b"a"), None);
        assert_eq!(r.get(Space::Keys, b"b"), Some(b"2".to_vec()));
        assert_eq!(r.count(Space::KeysByAge), 3);
    }

    #[test]
    fn ready_keys_sort_by_queue_then_priority_then_id() {
        let entries = [
            ("a", -5i64, 9u64),
            ("a", -5, 10),
            ("a", 3, 1),
            ("a", i64::MIN, 7),
            ("a", i64::MAX, 2),
            ("ab", -1000, 1),
            ("b", 0, 4),
        ];
        let mut keys: Vec<Vec<u8>> = entries
            .iter()
            .rev()
            .map(|&(q, p, id)| ready_key(q, p, id))
            .collect();
        keys.sort();
        let back: Vec<(String, i64, u64)> = keys
            .iter()
            .map(|k| {
                let end = k.iter().position(|&b| b == 0).unwrap();
                let (p, id) = read_ready(&k[end + 1..]);
                (String::from_utf8(k[..end].to_vec()).unwrap(), p, id)
            })
            .collect();
        let mut expected: Vec<(String, i64, u64)> = entries
            .iter()
            .map(|&(q, p, id)| (q.to_string(), p, id))
            .collect();
        expected.sort();
        assert_eq!(back, expected);
    }

    #[test]
    fn integer_keys_sort_as_numbers() {
        let mut keys: Vec<[u8; 8]> = [0u64, 1, 255, 256, u64::MAX, 1 << 40]
            .into_iter()
            .map(u64_key)
            .collect();
        keys.sort();
        let back: Vec<u64> = keys.iter().map(|k| read_u64(k)).collect();
        assert_eq!(back, vec![0, 1, 255, 256, 1 << 40, u64::MAX]);
    }
}
