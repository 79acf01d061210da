//! [`LogStore`]: openraft's log and vote storage on the `log` and `meta` trees.
//!
//! `append` writes the entries into sled on the caller's task (a few microseconds: sled
//! buffers them) and returns; the durability point and the flushed-callback follow on the
//! store's flusher thread. openraft 0.10 goes on as soon as `append` returns: the leader
//! replicates the entries (reading them back from sled, where they are already) while its own
//! fsync runs, and counts itself in the quorum only once the callback came. The flusher takes
//! every append queued while the previous fsync ran into the next one (group commit), and calls
//! the callbacks in order, after the fsync that covers them.
//!
//! Every other operation that changes the log (vote, truncation, purge) ends with a durability
//! point before it returns, on tokio's blocking pool. Reads run inline: they are served from
//! sled's cache unless the entries are old.
//!
//! The test seams of `durability.rs` act here: `append_sync_delay` holds the flusher between
//! an append's write and its durability point, `acknowledge_before_sync` (wrong on purpose)
//! calls the callback without one, and the hook hears of every write, every callback and every
//! `save_vote` return.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use std::io;
use std::sync::{mpsc, Arc};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::codec::{decode, encode, key_u64, u64_key};
use crate::error::{Error, Result};
use crate::raft_types::{Entry, LogId, Vote};
use crate::store::{Store, META_COMMITTED, META_VOTE};
use crate::TypeConfig;

/// Entries one `limited_get_log_entries` call returns, at most (one replication message).
pub const LOG_READ_ENTRIES_MAX: usize = 4096;
/// Encoded bytes one `limited_get_log_entries` call returns, at most, unless its first entry
/// alone is larger (it is returned anyway: openraft needs progress). The node's gRPC message
/// limit must be above this.
pub const LOG_READ_BYTES_MAX: usize = 8 * 1024 * 1024;

/// The Raft log and vote of one node. Cheap to clone; every clone is the same log.
#[derive(Clone, Debug)]
pub struct LogStore {
    store: Store,
    flusher: Arc<Flusher>,
}

/// The target of the trace events that time one entry's way through the nodes (append,
/// durability point, replication, commit): `RUST_LOG=exactly::timeline=trace` turns them on and
/// `scripts/commit-timeline.sh` reads them. Off, they cost a disabled callsite's check.
pub const TIMELINE: &str = "exactly::timeline";

/// What the flusher thread is asked to do, in order.
enum Flush {
    /// An append whose entries are written and wait for a durability point.
    Append {
        last: Option<LogId>,
        callback: IOFlushed<TypeConfig>,
    },
    /// Signals once every append queued before it is durable and acknowledged.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The flusher thread's queue: the thread ends when the last [`LogStore`] clone is dropped.
struct Flusher {
    queue: std::sync::Mutex<mpsc::Sender<Flush>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Flusher")
    }
}

impl Flusher {
    fn start(store: Store) -> Self {
        let (tx, rx) = mpsc::channel::<Flush>();
        let spawned = std::thread::Builder::new()
            .name("exactly-log-flush".into())
            .spawn(move || flush_loop(&store, &rx));
        if let Err(e) = spawned {
            // Appends then fail (their callbacks report the closed queue): the node stops.
            tracing::error!(error = %e, "starting the log flusher thread");
        }
        Self {
            queue: std::sync::Mutex::new(tx),
        }
    }

    fn submit(&self, flush: Flush) -> std::result::Result<(), Flush> {
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        queue.send(flush).map_err(|e| e.0)
    }

    /// Waits until every append queued so far is durable and acknowledged: a truncation, a
    /// purge or a vote then never completes before an earlier append does (openraft's log IO
    /// completes in the order it was submitted).
    async fn barrier(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.submit(Flush::Barrier(tx)).is_err() {
            return Err(io::Error::other("the log flusher thread is gone"));
        }
        rx.await
            .map_err(|_| io::Error::other("the log flusher thread is gone"))
    }
}

/// The flusher thread: waits for an append, takes every append queued behind it, makes them
/// durable with one durability point (after the test seam's delay), and calls their callbacks
/// in order. Every queued append was written before it was queued, so the durability point
/// covers it. After a failed durability point the store refuses every later one, so every
/// later callback reports the failure too.
fn flush_loop(store: &Store, rx: &mpsc::Receiver<Flush>) {
    let delay = store.inner.options.append_sync_delay;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let result = store.make_durable();
        if tracing::enabled!(target: TIMELINE, tracing::Level::TRACE) {
            let last = batch.iter().rev().find_map(|f| match f {
                Flush::Append { last, .. } => last.map(|l| l.index),
                Flush::Barrier(_) => None,
            });
            if let Some(index) = last {
                tracing::trace!(target: TIMELINE, index, ok = result.is_ok(), "durable");
            }
        }
        for flush in batch {
            match (flush, &result) {
                (Flush::Append { last, callback }, Ok(())) => acknowledge(store, last, callback),
                (Flush::Append { callback, .. }, Err(e)) => {
                    callback.io_completed(Err(io::Error::other(e.to_string())))
                }
                // After a failed durability point the barrier's own work fails too.
                (Flush::Barrier(done), _) => drop(done.send(())),
            }
        }
    }
}

/// Tells openraft (and the test hook, first) that the entries up to `last` are on disk.
fn acknowledge(store: &Store, last: Option<LogId>, callback: IOFlushed<TypeConfig>) {
    if let (Some(hook), Some(last)) = (store.hook(), last) {
        hook.append_acknowledged(last);
    }
    callback.io_completed(Ok(()));
}

impl LogStore {
    pub(crate) fn new(store: Store) -> Self {
        let flusher = Arc::new(Flusher::start(store.clone()));
        Self { store, flusher }
    }

    /// Reads entries in `range`, stopping early at `entries_max` entries or once `bytes_max`
    /// encoded bytes were read (always returning at least one entry if there is one).
    pub(crate) fn read_entries(
        &self,
        range: &impl RangeBounds<u64>,
        entries_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<Entry>> {
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
            let entry: Entry = decode("log entry", &value)?;
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
fn write_entries(store: &Store, entries: &[Entry]) -> Result<()> {
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
    ) -> io::Result<Vec<Entry>> {
        self.read_entries(&range, usize::MAX, usize::MAX)
            .map_err(|e| e.into_io("reading log entries"))
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.store
            .meta_get(META_VOTE, "vote")
            .map_err(|e| e.into_io("reading the vote"))
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        self.read_entries(&(start..end), LOG_READ_ENTRIES_MAX, LOG_READ_BYTES_MAX)
            .map_err(|e| e.into_io("reading log entries"))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let read = || -> Result<LogState<TypeConfig>> {
            Ok(LogState {
                last_purged_log_id: self.store.last_purged()?,
                last_log_id: self.store.log_last()?,
            })
        };
        read().map_err(|e| e.into_io("reading the log state"))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Returns only once the vote is durable (invariant: a node never votes twice in a term,
    /// even across a power loss).
    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.flusher.barrier().await?;
        let vote = *vote;
        self.blocking(move |store| {
            store.meta_put(META_VOTE, "vote", &vote)?;
            store.make_durable()
        })
        .await
        .map_err(|e| e.into_io("saving the vote"))?;
        if let Some(hook) = self.store.hook() {
            hook.vote_saved(vote);
        }
        Ok(())
    }

    /// Not a durability point of its own: losing the latest committed log id in a crash only
    /// makes openraft re-apply less at start-up (it learns the rest from the leader). It becomes
    /// durable with the next append, vote or purge.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        self.store
            .meta_put(META_COMMITTED, "committed log id", &committed)
            .map_err(|e| e.into_io("saving the committed log id"))
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        self.store
            .meta_get::<Option<LogId>>(META_COMMITTED, "committed log id")
            .map(Option::flatten)
            .map_err(|e| e.into_io("reading the committed log id"))
    }

    /// Writes the entries (readable at once, not yet durable) and queues them for the flusher
    /// thread, which calls `callback` after the durability point that covers them. With the
    /// test seam `acknowledge_before_sync` (wrong on purpose) calls the callback right after
    /// the write instead.
    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let last = entries.last().map(|e| e.log_id);
        if let Some(last) = last {
            let n = entries.len();
            tracing::trace!(target: TIMELINE, index = last.index, entries = n, "appended");
        }
        if let Err(e) = write_entries(&self.store, &entries) {
            let e = e.into_io("appending log entries");
            callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
        if self.store.inner.options.acknowledge_before_sync {
            acknowledge(&self.store, last, callback);
            return Ok(());
        }
        self.flusher
            .submit(Flush::Append { last, callback })
            .map_err(|flush| {
                if let Flush::Append { callback, .. } = flush {
                    callback.io_completed(Err(io::Error::other("the log flusher thread is gone")));
                }
                io::Error::other("the log flusher thread is gone")
            })
    }

    /// Removes entries after `last_log_id` (all of them if `None`), newest first, and makes the
    /// removal durable.
    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        self.flusher.barrier().await?;
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.blocking(move |store| {
            store.remove_log_from(from)?;
            store.make_durable()
        })
        .await
        .map_err(|e| e.into_io("removing log entries"))
    }

    /// Records `log_id` as the last purged log id, then removes entries `<= log_id.index` in
    /// batches of at most [`crate::PURGE_BATCH_KEYS_MAX`] keys, and makes it all durable. A crash
    /// half-way is finished by the next [`Store::open`].
    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.flusher.barrier().await?;
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
        .map_err(|e| e.into_io("purging log entries"))
    }
}
