//! [`LogStore`]: openraft's log and vote storage on the `log` and `meta` trees.
//!
//! Every operation that changes the log ends with a durability point (see `store.rs`) before it
//! returns, and `append` calls its flushed-callback only after that point. openraft 0.9.25's
//! core waits for the callback before it goes on (`RaftCore::append_to_log`), so a background
//! flusher that returned early would buy nothing; one flush and fsync per `append` call, however
//! many entries it carries, is the group commit. Writes and fsyncs run on tokio's blocking pool.
//! Reads run inline: they are served from sled's cache unless the entries are old.
//!
//! The test seams of `durability.rs` act here: `append_sync_delay` holds an append between
//! its write and its durability point, `acknowledge_before_sync` (wrong on purpose) calls the
//! callback without one, and the hook hears of every write, every callback and every
//! `save_vote` return.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, Vote,
};

use crate::codec::{decode, encode, key_u64, u64_key};
use crate::error::{Error, Result};
use crate::store::{Store, META_COMMITTED, META_VOTE};
use crate::TypeConfig;

/// Entries one `limited_get_log_entries` call returns, at most (one replication message).
pub const LOG_READ_ENTRIES_MAX: usize = 4096;
/// Encoded bytes one `limited_get_log_entries` call returns, at most, unless its first entry
/// alone is larger (it is returned anyway: openraft needs progress). The node's gRPC message
/// limit must be above this.
pub const LOG_READ_BYTES_MAX: usize = 8 * 1024 * 1024;

type StorageResult<T> = std::result::Result<T, StorageError<u64>>;

/// The Raft log and vote of one node. Cheap to clone; every clone is the same log.
#[derive(Clone, Debug)]
pub struct LogStore {
    store: Store,
}

impl LogStore {
    pub(crate) fn new(store: Store) -> Self {
        Self { store }
    }

    /// Reads entries in `range`, stopping early at `entries_max` entries or once `bytes_max`
    /// encoded bytes were read (always returning at least one entry if there is one).
    pub(crate) fn read_entries(
        &self,
        range: &impl RangeBounds<u64>,
        entries_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(&x) => x,
            Bound::Excluded(&x) => match x.checked_add(1) {
                Some(x) => x,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        // Purged entries the background purger has not removed yet are not there.
        let start = start.max(self.store.purged_below());
        // `None` means unbounded.
        let end_excluded = match range.end_bound() {
            Bound::Included(&x) => x.checked_add(1),
            Bound::Excluded(&x) => Some(x),
            Bound::Unbounded => None,
        };
        let iter = match end_excluded {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => self.store.inner.log.range(u64_key(start)..u64_key(end)),
            None => self.store.inner.log.range(u64_key(start)..),
        };
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for kv in iter {
            if entries.len() >= entries_max || (!entries.is_empty() && bytes >= bytes_max) {
                break;
            }
            let (key, value) = kv.map_err(|e| Error::sled("reading log entries", e))?;
            let index = key_u64("log key", &key)?;
            let entry: Entry<TypeConfig> = decode("log entry", &value)?;
            if entry.log_id.index != index {
                return Err(Error::corrupt(
                    "log entry",
                    format!("entry {} stored under index {index}", entry.log_id),
                ));
            }
            bytes = bytes.saturating_add(value.len());
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Tells openraft (and the test hook, first) that the entries up to `last` are on disk.
    fn acknowledge(&self, last: Option<LogId<u64>>, callback: LogFlushed<TypeConfig>) {
        if let (Some(hook), Some(last)) = (self.store.hook(), last) {
            hook.append_acknowledged(last);
        }
        callback.log_io_completed(Ok(()));
    }

    /// Runs blocking storage work on tokio's blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store))
            .await
            .map_err(Error::task)?
    }
}

/// Writes `entries` in index order, one sled insert each (durable at the next durability point).
///
/// Not a `sled::Batch`: sled 0.34 rolls its IO buffer before and after every batch, so each
/// batch costs two more buffer writes (each a `pwrite` and a `sync_file_range` on sled's IO
/// thread pool, whose every task wakes all of its idle threads), measured as ~4 writes and
/// ~75 context switches per job on one node. Atomicity buys nothing here: nothing is
/// acknowledged before the durability point that follows, and a crash before it leaves a prefix
/// of sled's log, hence a prefix of these entries (a contiguous Raft log).
fn write_entries(store: &Store, entries: &[Entry<TypeConfig>]) -> Result<()> {
    for entry in entries {
        store
            .inner
            .log
            .insert(u64_key(entry.log_id.index), encode("log entry", entry)?)
            .map_err(|e| Error::sled("appending log entries", e))?;
    }
    if let (Some(hook), Some(last)) = (store.hook(), entries.last()) {
        hook.append_written(last.log_id);
    }
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_entries(&range, usize::MAX, usize::MAX)
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_entries(&(start..end), LOG_READ_ENTRIES_MAX, LOG_READ_BYTES_MAX)
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let read = || -> Result<LogState<TypeConfig>> {
            Ok(LogState {
                last_purged_log_id: self.store.last_purged()?,
                last_log_id: self.store.log_last()?,
            })
        };
        read().map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Returns only once the vote is durable (invariant: a node never votes twice in a term,
    /// even across a power loss).
    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        let vote = *vote;
        self.blocking(move |store| {
            store.meta_put(META_VOTE, "vote", &vote)?;
            store.make_durable()
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write))?;
        if let Some(hook) = self.store.hook() {
            hook.vote_saved(vote);
        }
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        self.store
            .meta_get(META_VOTE, "vote")
            .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Read))
    }

    /// Not a durability point of its own: losing the latest committed log id in a crash only
    /// makes openraft re-apply less at start-up (it learns the rest from the leader). It becomes
    /// durable with the next append, vote or purge.
    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        self.store
            .meta_put(META_COMMITTED, "committed log id", &committed)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        self.store
            .meta_get::<Option<LogId<u64>>>(META_COMMITTED, "committed log id")
            .map(Option::flatten)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))
    }

    /// Writes all entries in one sled batch and makes them durable with one flush and fsync,
    /// then calls `callback`. Returns after the callback (openraft 0.9.25 waits for it anyway).
    /// With the test seams: waits `append_sync_delay` between the write and the durability
    /// point, or (`acknowledge_before_sync`, wrong on purpose) calls the callback right after
    /// the write and skips the durability point.
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let last = entries.last().map(|e| e.log_id);
        let delay = self.store.inner.options.append_sync_delay;
        let early = self.store.inner.options.acknowledge_before_sync;
        // One trip to the blocking pool: the write, then (unless the store is the deliberately
        // wrong one) the slow disk's delay and the durability point. The delay sleeps a
        // blocking-pool thread, not the node's runtime: a paused node's disk goes on, as the
        // kernel's would.
        let result = self
            .blocking(move |store| {
                write_entries(&store, &entries)?;
                if early {
                    return Ok(());
                }
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                store.make_durable()
            })
            .await;
        match result {
            Ok(()) => {
                self.acknowledge(last, callback);
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e.into_raft(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    /// Removes entries `>= log_id.index`, newest first, and makes the removal durable.
    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.blocking(move |store| {
            store.remove_log_from(log_id.index)?;
            store.make_durable()
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    /// Records `log_id` as the last purged log id, then removes entries `<= log_id.index` in
    /// batches of at most [`crate::PURGE_BATCH_KEYS_MAX`] keys, and makes it all durable. A crash
    /// half-way is finished by the next [`Store::open`].
    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.blocking(move |store| {
            let previous = store.last_purged()?;
            if previous.is_some_and(|p| p.index >= log_id.index) {
                // openraft purges forward only; an older request has nothing left to do.
                tracing::debug!(%log_id, ?previous, "purge request at or below the last purge");
                return Ok(());
            }
            store.purge_log_upto(log_id)
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}
