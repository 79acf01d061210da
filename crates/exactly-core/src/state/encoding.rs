//! How a [`JobTable`] is encoded in a snapshot: its fields in their order, with the families
//! that moved into the records store ([`crate::records`]) written where their fields were, so
//! the bytes are those of the format before the move (`tests/fixtures/snapshot-format4*.bin`
//! pin them).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use imbl::{OrdMap, OrdSet};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{JobTable, KeyRecord, Leave, NodeEntry, QueueState};
use crate::job::{Job, StateCounts};
use crate::queue::QueueConfig;
use crate::records::{layout, MemRecords, Records, Space};
use crate::schedule::Schedule;
use crate::state::AuditRecord;
use crate::{JobId, NodeId};

/// Refuses a name that apply would have refused (a control character; above all a 0 byte,
/// which ends a name inside the records' keys: a queue named `a\0b` would read as part of
/// queue `a`'s ready jobs). Apply checks names before they reach the records; a snapshot's
/// are checked here, before anything is written.
fn named<E: serde::de::Error>(what: &str, name: &str) -> Result<(), E> {
    super::check_no_control(what, name).map_err(E::custom)
}

/// The job records as the map they were: id → record, in id order.
struct JobsOut<'a, R>(&'a R);

impl<R: Records> Serialize for JobsOut<'_, R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.count(Space::Jobs)))?;
        for (key, value) in self.0.scan_from(Space::Jobs, &[]) {
            let job: Job = layout::decode(Space::Jobs, &value);
            map.serialize_entry(&layout::read_u64(&key), &job)?;
        }
        map.end()
    }
}

/// The job records, decoded one at a time straight into a records store (no second copy of
/// the table while a snapshot is decoded).
struct JobsIn(MemRecords);

impl<'de> Deserialize<'de> for JobsIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = JobsIn;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of job records")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<JobsIn, A::Error> {
                let mut records = MemRecords::default();
                while let Some((id, job)) = map.next_entry::<JobId, Job>()? {
                    if id != job.id {
                        return Err(serde::de::Error::custom(format!(
                            "job record {} is filed under id {id}",
                            job.id
                        )));
                    }
                    named("queue name", &job.queue)?;
                    if let Some(key) = &job.ordering_key {
                        named("ordering key", key)?;
                    }
                    records.put(Space::Jobs, &layout::u64_key(id), &layout::encode(&job));
                }
                Ok(JobsIn(records))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// The queues as the map they were, each with its ready set where its field was.
struct QueuesOut<'a, R>(&'a JobTable<R>);

/// One queue as the struct it was.
#[derive(Serialize)]
#[serde(rename = "QueueState", bound = "")]
struct QueueOut<'a, R: Records> {
    config: &'a QueueConfig,
    ready: ReadyOut<'a, R>,
    running: u32,
    live: u64,
    rate_tat_us: u64,
}

/// A queue's ready index as the set of (negated priority, id) it was.
struct ReadyOut<'a, R>(&'a JobTable<R>, &'a str);

impl<R: Records> Serialize for ReadyOut<'_, R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.ready_entries(self.1).count()))?;
        for entry in self.0.ready_entries(self.1) {
            seq.serialize_element(&entry)?;
        }
        seq.end()
    }
}

impl<R: Records> Serialize for QueuesOut<'_, R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.queues.len()))?;
        for (name, q) in &self.0.queues {
            let out = QueueOut {
                config: &q.config,
                ready: ReadyOut(self.0, name),
                running: q.running,
                live: q.live,
                rate_tat_us: q.rate_tat_us,
            };
            map.serialize_entry(name, &out)?;
        }
        map.end()
    }
}

/// One queue as it is decoded.
#[derive(Deserialize)]
#[serde(rename = "QueueState")]
struct QueueIn {
    config: QueueConfig,
    ready: BTreeSet<(i64, JobId)>,
    running: u32,
    live: u64,
    rate_tat_us: u64,
}

/// The ordering lines as the map they were: (queue, ordering key) → jobs in order.
struct LinesOut<'a, R>(&'a R);

impl<R: Records> Serialize for LinesOut<'_, R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.count(Space::Lines)))?;
        for (key, value) in self.0.scan_from(Space::Lines, &[]) {
            let line: VecDeque<JobId> = layout::decode(Space::Lines, &value);
            map.serialize_entry(&layout::read_line_key(&key), &line)?;
        }
        map.end()
    }
}

/// A (time, job id) index as the set it was.
struct TimeIndexOut<'a, R>(&'a R, Space);

impl<R: Records> Serialize for TimeIndexOut<'_, R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.count(self.1)))?;
        for (key, _) in self.0.scan_from(self.1, &[]) {
            seq.serialize_element(&layout::read_time_id(&key))?;
        }
        seq.end()
    }
}

/// The idempotency keys as the map they were: key → record, in key order.
struct KeysOut<'a, R>(&'a R);

impl<R: Records> Serialize for KeysOut<'_, R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.count(Space::Keys)))?;
        for (key, value) in self.0.scan_from(Space::Keys, &[]) {
            let record: KeyRecord = layout::decode(Space::Keys, &value);
            map.serialize_entry(&*String::from_utf8_lossy(&key), &record)?;
        }
        map.end()
    }
}

/// The keys' age index as the set it was: (first use, key), in that order.
struct AgesOut<'a, R>(&'a R);

impl<R: Records> Serialize for AgesOut<'_, R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.count(Space::KeysByAge)))?;
        for (key, _) in self.0.scan_from(Space::KeysByAge, &[]) {
            seq.serialize_element(&layout::read_key_age(&key))?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
#[serde(rename = "JobTable", bound = "")]
struct Encoded<'a, R: Records> {
    next_job_id: JobId,
    now_ms: u64,
    jobs: JobsOut<'a, R>,
    queues: QueuesOut<'a, R>,
    delayed: TimeIndexOut<'a, R>,
    running: &'a BTreeMap<NodeId, BTreeSet<JobId>>,
    nodes: &'a BTreeMap<NodeId, NodeEntry>,
    ordering: LinesOut<'a, R>,
    keys: KeysOut<'a, R>,
    keys_by_age: AgesOut<'a, R>,
    finished: TimeIndexOut<'a, R>,
    dead: TimeIndexOut<'a, R>,
    schedules: &'a BTreeMap<String, Schedule>,
    counts: &'a StateCounts,
    leaving: &'a BTreeMap<NodeId, Leave>,
    removed: &'a BTreeMap<NodeId, u64>,
    audit: &'a VecDeque<AuditRecord>,
    tokens: &'a BTreeMap<String, crate::access::IssuedToken>,
}

impl<R: Records> Serialize for JobTable<R> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Encoded {
            next_job_id: self.next_job_id,
            now_ms: self.now_ms,
            jobs: JobsOut(&self.records),
            queues: QueuesOut(self),
            delayed: TimeIndexOut(&self.records, Space::Delayed),
            running: &self.running,
            nodes: &self.nodes,
            ordering: LinesOut(&self.records),
            keys: KeysOut(&self.records),
            keys_by_age: AgesOut(&self.records),
            finished: TimeIndexOut(&self.records, Space::Finished),
            dead: TimeIndexOut(&self.records, Space::Dead),
            schedules: &self.schedules,
            counts: &self.counts,
            leaving: &self.leaving,
            removed: &self.removed,
            audit: &self.audit,
            tokens: &self.tokens,
        }
        .serialize(serializer)
    }
}

#[derive(Deserialize)]
#[serde(rename = "JobTable")]
struct Decoded {
    next_job_id: JobId,
    now_ms: u64,
    jobs: JobsIn,
    queues: BTreeMap<String, QueueIn>,
    delayed: BTreeSet<(u64, JobId)>,
    running: BTreeMap<NodeId, BTreeSet<JobId>>,
    nodes: BTreeMap<NodeId, NodeEntry>,
    ordering: BTreeMap<(String, String), VecDeque<JobId>>,
    #[serde(deserialize_with = "persistent::ord_map")]
    keys: OrdMap<String, KeyRecord>,
    #[serde(deserialize_with = "persistent::ord_set")]
    keys_by_age: OrdSet<(u64, String)>,
    #[serde(deserialize_with = "persistent::ord_set")]
    finished: OrdSet<(u64, JobId)>,
    #[serde(deserialize_with = "persistent::ord_set")]
    dead: OrdSet<(u64, JobId)>,
    schedules: BTreeMap<String, Schedule>,
    counts: StateCounts,
    #[serde(default)]
    leaving: BTreeMap<NodeId, Leave>,
    #[serde(default)]
    removed: BTreeMap<NodeId, u64>,
    #[serde(default)]
    audit: VecDeque<AuditRecord>,
    tokens: BTreeMap<String, crate::access::IssuedToken>,
}

impl<'de> Deserialize<'de> for JobTable {
    /// The records families go into the records store as they are read from their maps. A
    /// key's age entry is written from its record, so the two agree by construction; an age
    /// index that names anything else is refused, as `check_invariants` would.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let d = Decoded::deserialize(deserializer)?;
        let mut records = d.jobs.0;
        for (key, record) in &d.keys {
            JobTable::write_key(&mut records, key, record);
        }
        let ages_agree = d.keys_by_age.len() == d.keys.len()
            && d.keys_by_age.iter().all(|(at, key)| {
                d.keys
                    .get(key)
                    .is_some_and(|record| record.created_at_ms == *at)
            });
        if !ages_agree {
            return Err(serde::de::Error::custom(
                "the idempotency keys' age index disagrees with the keys",
            ));
        }
        let mut queues = BTreeMap::new();
        for (name, q) in d.queues {
            named("queue name", &name)?;
            for (priority, id) in q.ready {
                records.put(Space::Ready, &layout::ready_key(&name, priority, id), &[]);
            }
            let state = QueueState {
                config: q.config,
                running: q.running,
                live: q.live,
                rate_tat_us: q.rate_tat_us,
            };
            queues.insert(name, state);
        }
        for ((queue, key), line) in &d.ordering {
            named("queue name", queue)?;
            named("ordering key", key)?;
            if line.is_empty() {
                return Err(serde::de::Error::custom(format!(
                    "the ordering line {queue}/{key} is empty"
                )));
            }
            let k = layout::line_key(queue, key);
            records.put(Space::Lines, &k, &layout::encode(line));
        }
        for &(at, id) in &d.delayed {
            records.put(Space::Delayed, &layout::time_id(at, id), &[]);
        }
        for (space, index) in [(Space::Finished, &d.finished), (Space::Dead, &d.dead)] {
            for &(at, id) in index {
                records.put(space, &layout::time_id(at, id), &[]);
            }
        }
        Ok(JobTable {
            next_job_id: d.next_job_id,
            now_ms: d.now_ms,
            queues,
            running: d.running,
            nodes: d.nodes,
            records,
            schedules: d.schedules,
            counts: d.counts,
            leaving: d.leaving,
            removed: d.removed,
            audit: d.audit,
            tokens: d.tokens,
            retained: BTreeMap::new(),
        })
    }
}

/// Decoding the persistent maps and sets one element at a time. `imbl`'s own `Deserialize`
/// reserves room for as many elements as the input claims: found by the snapshot fuzz target, a
/// snapshot claiming 2^50 idempotency keys aborted the process (allocation failure) instead of
/// being refused. These never reserve; a false claim ends in "unexpected end of input".
mod persistent {
    use std::marker::PhantomData;

    use imbl::{OrdMap, OrdSet};
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    pub(super) fn ord_map<'de, D, K, V>(deserializer: D) -> Result<OrdMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord + Clone,
        V: Deserialize<'de> + Clone,
    {
        struct Entries<K, V>(PhantomData<(K, V)>);
        impl<'de, K, V> Visitor<'de> for Entries<K, V>
        where
            K: Deserialize<'de> + Ord + Clone,
            V: Deserialize<'de> + Clone,
        {
            type Value = OrdMap<K, V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut map = OrdMap::new();
                while let Some((k, v)) = access.next_entry()? {
                    map.insert(k, v);
                }
                Ok(map)
            }
        }
        deserializer.deserialize_map(Entries(PhantomData))
    }

    pub(super) fn ord_set<'de, D, T>(deserializer: D) -> Result<OrdSet<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Ord + Clone,
    {
        struct Elements<T>(PhantomData<T>);
        impl<'de, T> Visitor<'de> for Elements<T>
        where
            T: Deserialize<'de> + Ord + Clone,
        {
            type Value = OrdSet<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut set = OrdSet::new();
                while let Some(element) = access.next_element()? {
                    set.insert(element);
                }
                Ok(set)
            }
        }
        deserializer.deserialize_seq(Elements(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, NewJob, Request};

    /// A table with one pending job in `queue`, encoded.
    fn encoded_with_queue(queue: &str) -> Vec<u8> {
        let mut table = JobTable::new();
        let job = NewJob {
            queue: "q".into(),
            kind: "noop".into(),
            max_attempts: 1,
            ordering_key: Some("line".into()),
            ..NewJob::default()
        };
        let request = Request {
            now_ms: 1_000,
            entropy: 0,
            command: Command::Submit(vec![job]),
        };
        table.apply(1, request);
        let bytes = postcard::to_stdvec(&table).expect("encodes");
        // Same length, so the name can be swapped in place in the encoding.
        assert_eq!(queue.len(), 1);
        bytes
            .iter()
            .map(|&b| if b == b'q' { queue.as_bytes()[0] } else { b })
            .collect()
    }

    #[test]
    fn a_snapshot_with_a_name_apply_would_refuse_does_not_decode() {
        let good = encoded_with_queue("r");
        let table: JobTable = postcard::from_bytes(&good).expect("a plain name decodes");
        assert_eq!(table.ready_entries("r").count(), 1);
        // The same bytes but for the name (postcard keeps no custom message to check).
        let bad = encoded_with_queue("\0");
        assert!(
            postcard::from_bytes::<JobTable>(&bad).is_err(),
            "a 0 byte is refused"
        );
    }
}
