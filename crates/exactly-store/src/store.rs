//! [`Store`]: one node's data directory, the sled database inside it, and the durability point
//! every write that must survive a power loss goes through.
//!
//! Layout of a data directory:
//! ```text
//! <dir>/sled/              sled's files: `db` (its log-structured store), `conf`, `snap.*`,
//!                          and `blobs/` (values above ~128 KiB, one file each)
//! <dir>/snapshot/         the current state machine snapshot: `pointer` and the data file
//!                          it names (see `snapshot.rs`)
//! ```
//! sled trees, each value starting with a format version byte (see `codec.rs`):
//! - `log`: big-endian log index -> `Entry`
//! - `meta`: `vote`, `committed`, `last_purged` (log ids), `node_id`, `incarnation` (u64), and
//!   `payloads_rebuild` (present only while a snapshot install replaces the payloads tree)
//! - `payload_chunks`: big-endian job id -> payload bytes, and `archive_chunks`: big-endian
//!   job id -> the record of a succeeded or cancelled job; both packed into chunks of a few KiB
//!   (`chunked.rs`: a sled key per chunk, not per job; the per-key `payloads` and `archive`
//!   trees of earlier builds are moved into them at open)
//! - `state_chunks` (table on disk, `state_machine.rs`), `state_capture`, `state_build` and
//!   `state_build_payloads` (snapshot builds from disk)
//!
//! # Durability: what survives what
//!
//! sled's `flush()` writes its buffers with `pwrite` and `sync_file_range`, which neither flushes
//! the disk's write cache nor the file's metadata (sled #1452), and sled never fsyncs the blob
//! files it writes for large values. A *durability point* (`Store::make_durable`) therefore
//! is, in order: sled `flush()`; `fsync` of every blob file not yet synced (or grown since) and
//! of the `blobs` directory; `fdatasync` of sled's `db` file through a handle this store keeps
//! open. sled's log is ordered, so a durability point makes every write issued before it
//! durable, whichever tree it went to. sled's periodic flusher is turned off: all flushing
//! happens here. Directories are fsynced once at open; a snapshot's data file is written and
//! fsynced, then its pointer is written to a temporary name, fsynced, renamed, and its directory
//! fsynced.
//!
//! - Power loss or kernel crash: everything written before the last completed durability point
//!   survives. These operations pass a durability point before they return: `save_vote`,
//!   `append` (before its flushed-callback is called), `truncate`, `node_id_or_init`,
//!   `next_incarnation`, `build_snapshot` and `install_snapshot` (sled, then the snapshot file).
//!   `purge` does not: it records the purge and leaves the removals to a background thread
//!   (see [`Store::purge_log_upto`]); a lost record only means the entries are still there.
//! - Process crash (SIGKILL): the same, plus whatever sled had already written out of its
//!   buffers; writes still in sled's user-space buffers are lost.
//! - Not made durable by their own operation, and why that is safe: `save_committed` (a lost
//!   update only makes openraft re-apply less at start-up) and apply's payload writes (the log
//!   they came from is durable and apply runs again after a restart; a snapshot is only written
//!   after a durability point, so the payloads tree is never older than the persisted snapshot).
//! - After a failed flush or fsync the store refuses every later durability point
//!   ([`crate::Error::DurabilityLost`]): the kernel may have dropped the dirty pages, so the
//!   node must restart and recover from what is really on disk.
//! - Tests simulate a power loss through the seam in `durability.rs`: a hook learns what each
//!   durability point made durable and can cut the power, and
//!   [`crate::lose_unsynced_writes`] then leaves the directory as the power loss would.
//!
//! Start-up recovery ([`Store::open`]): finishes a purge a crash interrupted (entries at or
//! below `last_purged`), cuts the log after its first hole (a write that never reached a
//! durability point, so nothing after it was acknowledged), and rebuilds the payloads tree from
//! the snapshot file if a snapshot install was interrupted.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::raft_types::{Entry, LogId};
use exactly_core::JobId;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::chunked::ChunkedTree;
use crate::codec::{decode, encode, key_u64, u64_key, versioned_body};
use crate::durability::{DurabilityHook, DurableImage, StoreOptions};
use crate::error::{Error, Result};
use crate::snapshot::{self, Meta};
use crate::Observer;

/// Log keys removed per sled batch when purging or truncating. sled 0.34 leaked space (about
/// 210 MB of file and 900 MB of RSS per million entries, never reclaimed) when a sliding window
/// was purged with ~1,000-key batches, and stayed bounded with batches of at most 300–500.
pub const PURGE_BATCH_KEYS_MAX: usize = 256;
/// The background purger's pause between two batches of [`PURGE_BATCH_KEYS_MAX`] removals, so
/// that each Raft append's durability point carries only a little of the purge's writes.
pub const PURGE_PAUSE: Duration = Duration::from_millis(2);
/// Payload keys written or removed per sled batch when the payloads tree is rebuilt from a
/// snapshot (same reason as [`PURGE_BATCH_KEYS_MAX`]).
pub const PAYLOAD_BATCH_KEYS_MAX: usize = 256;
/// Bytes of sled's page cache. sled's default is 1 GiB; the log, payloads and archived records
/// are read rarely after they are written (the hot pages are the newest), so a small cache
/// keeps a node's memory bounded: with 1,000,000 archived jobs, 256 MiB held ~200 MiB more RSS
/// per node than 64 MiB (README, "Finished jobs live on disk").
pub const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// How long [`Store::open`] waits for sled's lock on the data directory. A store dropped a
/// moment ago may still be closed by sled's background threads; a live process keeps it forever.
pub const OPEN_LOCK_WAIT_MS_MAX: u64 = 5_000;
/// The pause between two attempts to take the lock.
pub const OPEN_LOCK_RETRY_MS: u64 = 20;

const SLED_DIR: &str = "sled";
const TREE_LOG: &str = "log";
const TREE_META: &str = "meta";
const TREE_PAYLOADS: &str = "payload_chunks";
/// The payloads tree of earlier builds (a sled key per payload): moved into the chunks at open.
const TREE_PAYLOADS_UNCHUNKED: &str = "payloads";
const TREE_ARCHIVE: &str = "archive_chunks";
/// The archive tree of earlier builds (a sled key per record): moved into the chunks at open.
const TREE_ARCHIVE_UNCHUNKED: &str = "archive";
/// The state tree, its records packed in chunks (`chunks.rs`).
const TREE_STATE: &str = "state_chunks";
/// The state tree of the earlier layout (a sled key per record): dropped at open, so that its
/// state is rebuilt from the snapshot and the log, as in a fresh directory.
const TREE_STATE_UNCHUNKED: &str = "state";
const TREE_STATE_CAPTURE: &str = "state_capture";
const TREE_STATE_BUILD: &str = "state_build";
const TREE_STATE_BUILD_PAYLOADS: &str = "state_build_payloads";

pub(crate) const META_VOTE: &[u8] = b"vote";
pub(crate) const META_COMMITTED: &[u8] = b"committed";
pub(crate) const META_LAST_PURGED: &[u8] = b"last_purged";
const META_NODE_ID: &[u8] = b"node_id";
const META_INCARNATION: &[u8] = b"incarnation";
const META_PAYLOADS_REBUILD: &[u8] = b"payloads_rebuild";

/// One node's storage, opened once per process on its data directory. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    dir: PathBuf,
    pub(crate) db: sled::Db,
    pub(crate) log: sled::Tree,
    pub(crate) meta: sled::Tree,
    pub(crate) payloads: ChunkedTree,
    /// The records of succeeded and cancelled jobs (see `Effect::Archive`).
    pub(crate) archive: ChunkedTree,
    /// The state machine's job table records and its head (see `state_machine.rs`).
    pub(crate) state: sled::Tree,
    /// The values a snapshot build's consistent view of `state` saves (see
    /// [`crate::SledRecords::capture`]).
    pub(crate) state_capture: sled::Tree,
    /// A snapshot build's copy of its view of `state` and the payloads of its live jobs (so
    /// that a build from disk never holds the records in memory), with the lock that keeps
    /// builds one at a time. Emptied after each build.
    pub(crate) state_build: Mutex<(sled::Tree, sled::Tree)>,
    durability: Durability,
    /// Test seams at the durability points (see `durability.rs`); default in production.
    pub(crate) options: StoreOptions,
    /// The `seq` of the last captured [`DurableImage`]. The lock makes capture order and `seq`
    /// order the same.
    image_seq: Mutex<u64>,
    snapshot_dir: PathBuf,
    /// The log below this index is purged (`last_purged + 1`; 0: nothing purged): reads skip
    /// it while the purger removes it in the background.
    purged_below: std::sync::atomic::AtomicU64,
    /// The index up to which the background purger is asked to remove log entries, and whether
    /// a purger thread runs (see [`Store::purge_log_upto`]).
    purge_target: std::sync::atomic::AtomicU64,
    purger_running: std::sync::atomic::AtomicBool,
    /// Metadata and data file of the current snapshot. The lock also serializes writes of the
    /// pointer, so a slow build cannot replace a newer snapshot installed meanwhile.
    current_snapshot: Mutex<Option<(Meta, PathBuf)>>,
}

/// The pieces of a durability point.
struct Durability {
    /// sled's `db` file, opened again by us because sled only `sync_file_range`s it.
    db_file: File,
    blobs_dir: PathBuf,
    /// Blob files already fsynced, with their length when they were. sled writes a blob file
    /// once, sequentially, and never changes it, but a scan may meet one while it is being
    /// written (by any thread: readers split and merge tree nodes too), so a file whose
    /// length changed since is synced again.
    synced_blobs: Mutex<HashMap<OsString, u64>>,
    /// Set by the first failed durability point.
    lost: OnceLock<String>,
}

/// How many keys `tree` holds (a scan).
/// Moves the records of an earlier build's per-key tree `old_name` (payloads or archived
/// jobs) into `chunks` (emptied first: a move a crash interrupted starts again) and drops
/// that tree. sled recovers a prefix of its log, so after a crash either the old tree is still
/// there or every record was moved.
/// Writes `values` (each as the tree keeps it) by job id into `tree`'s chunks.
fn put_by_id(tree: &ChunkedTree, values: &[(JobId, Vec<u8>)], what: &'static str) -> Result<()> {
    let changes: std::collections::BTreeMap<_, _> = values
        .iter()
        .map(|(id, value)| (u64_key(*id).to_vec(), Some(value.clone())))
        .collect();
    tree.write_unbatched(changes, what)
}

fn move_unchunked(db: &sled::Db, old_name: &str, chunks: &ChunkedTree) -> Result<()> {
    let old_name = old_name.as_bytes();
    if !db.tree_names().iter().any(|n| n.as_ref() == old_name) {
        return Ok(());
    }
    let old = db
        .open_tree(old_name)
        .map_err(|e| Error::sled("opening a tree of the earlier layout", e))?;
    chunks
        .clear()
        .map_err(|e| Error::sled("clearing a chunked tree", e))?;
    let records = old.iter().map(|entry| {
        entry
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .map_err(|e| Error::sled("reading a record of the earlier layout", e))
    });
    chunks.fill_with(records, PAYLOAD_BATCH_KEYS_MAX, |writes| {
        let mut batch = sled::Batch::default();
        for (key, value) in writes {
            if let Some(value) = value {
                batch.insert(key, value);
            }
        }
        chunks
            .tree()
            .apply_batch(batch)
            .map_err(|e| Error::sled("moving records into chunks", e))
    })?;
    drop(old);
    db.drop_tree(old_name)
        .map_err(|e| Error::sled("dropping a tree of the earlier layout", e))?;
    Ok(())
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the data directory `dir`, with sled in `dir/sled`, and
    /// recovers from an interrupted purge, a torn log tail or an interrupted snapshot install.
    /// Blocking; fails with [`Error::Locked`] if another process uses the directory.
    pub fn open(dir: &Path) -> Result<Store> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// [`Store::open`] with test seams at the durability points (see [`StoreOptions`]).
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Store> {
        fs::create_dir_all(dir).map_err(|e| Error::io("creating the data directory", e))?;
        let sled_dir = dir.join(SLED_DIR);
        let snapshot_dir = snapshot::dir_of(dir);
        fs::create_dir_all(&snapshot_dir)
            .map_err(|e| Error::io("creating the snapshot directory", e))?;
        let db = open_sled(&sled_dir)?;
        let tree = |name: &'static str| {
            db.open_tree(name)
                .map_err(|e| Error::sled("opening a sled tree", e))
        };
        let (log, meta) = (tree(TREE_LOG)?, tree(TREE_META)?);
        let payloads = ChunkedTree::new(tree(TREE_PAYLOADS)?);
        move_unchunked(&db, TREE_PAYLOADS_UNCHUNKED, &payloads)?;
        let archive = ChunkedTree::new(tree(TREE_ARCHIVE)?);
        move_unchunked(&db, TREE_ARCHIVE_UNCHUNKED, &archive)?;
        if db
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == TREE_STATE_UNCHUNKED.as_bytes())
        {
            db.drop_tree(TREE_STATE_UNCHUNKED)
                .map_err(|e| Error::sled("dropping the state tree of the earlier layout", e))?;
        }
        let (state, state_capture) = (tree(TREE_STATE)?, tree(TREE_STATE_CAPTURE)?);
        let state_build = Mutex::new((tree(TREE_STATE_BUILD)?, tree(TREE_STATE_BUILD_PAYLOADS)?));
        let db_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(sled_dir.join("db"))
            .map_err(|e| Error::io("opening sled's db file for fsync", e))?;
        let blobs_dir = sled_dir.join("blobs");
        // The files sled and we just created must not vanish with their directory entries.
        if let Ok(conf) = File::open(sled_dir.join("conf")) {
            conf.sync_all()
                .map_err(|e| Error::io("fsyncing sled's conf file", e))?;
        }
        for d in [&blobs_dir, &sled_dir, &snapshot_dir, &dir.to_path_buf()] {
            snapshot::sync_dir(d, "fsyncing the data directory")?;
        }
        snapshot::recover(&snapshot_dir)?;
        let current_snapshot = snapshot::current(&snapshot_dir)?;
        let store = Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                db,
                log,
                meta,
                payloads,
                archive,
                state,
                state_capture,
                state_build,
                durability: Durability {
                    db_file,
                    blobs_dir,
                    synced_blobs: Mutex::new(HashMap::new()),
                    lost: OnceLock::new(),
                },
                options,
                image_seq: Mutex::new(0),
                snapshot_dir,
                purged_below: std::sync::atomic::AtomicU64::new(0),
                purge_target: std::sync::atomic::AtomicU64::new(0),
                purger_running: std::sync::atomic::AtomicBool::new(false),
                current_snapshot: Mutex::new(current_snapshot),
            }),
        };
        store.recover()?;
        let below = store.last_purged()?.map_or(0, |p| p.index + 1);
        store
            .inner
            .purged_below
            .store(below, std::sync::atomic::Ordering::SeqCst);
        Ok(store)
    }

    /// The Raft log and vote storage of this node.
    pub fn log_store(&self) -> crate::LogStore {
        crate::LogStore::new(self.clone())
    }

    /// The state machine of this node, loaded from the persisted snapshot (if any); openraft
    /// then re-applies the log after it. Call once per process: each call loads its own copy.
    pub fn state_machine(&self, observer: Observer) -> Result<crate::StateMachine> {
        crate::StateMachine::load(self.clone(), observer)
    }

    /// The payload of `job`, kept from its submission until it finishes. `None` for an unknown
    /// or finished job; also for a job that a snapshot shows as live but that finished after the
    /// snapshot's point (its payload was dropped before the snapshot was built), until the
    /// entries after the snapshot are applied. Blocking (a sled read).
    pub fn payload(&self, job: JobId) -> Result<Option<Vec<u8>>> {
        let value = self.inner.payloads.get(&u64_key(job));
        value
            .map(|v| versioned_body("payload", &v).map(<[u8]>::to_vec))
            .transpose()
    }

    /// The archived record of a succeeded or cancelled job, from its finishing until retention
    /// deletes it. Read it only for a job the table lists as finished
    /// ([`exactly_core::JobTable::finished_job`]): after a restart the tree may hold the
    /// records of jobs that finished after the snapshot's point until the log after it is
    /// applied again. `None` also for a finished job whose record was deleted after the point
    /// of the snapshot this node installed, until the log after it is applied. Blocking.
    pub fn archived(&self, job: JobId) -> Result<Option<exactly_core::Job>> {
        let value = self.inner.archive.get(&u64_key(job));
        value
            .map(|v| decode::<exactly_core::Job>("archived job", &v))
            .transpose()
    }

    /// The encoded archived record of `job` (as the tree holds it), for snapshots.
    pub(crate) fn archived_raw(&self, job: JobId) -> Result<Option<sled::IVec>> {
        Ok(self.inner.archive.get(&u64_key(job)).map(sled::IVec::from))
    }

    /// How many records the archive tree holds.
    pub(crate) fn archived_count(&self) -> Result<u64> {
        Ok(self.inner.archive.count() as u64)
    }

    /// This node's identity: the persisted node id, or, the first time, `generate()`'s value,
    /// persisted durably before it is returned. Blocking.
    pub fn node_id_or_init(&self, generate: impl FnOnce() -> u64) -> Result<u64> {
        if let Some(id) = self.meta_get::<u64>(META_NODE_ID, "node id")? {
            return Ok(id);
        }
        let id = generate();
        let swapped = self
            .inner
            .meta
            .compare_and_swap(META_NODE_ID, None::<&[u8]>, Some(encode("node id", &id)?))
            .map_err(|e| Error::sled("persisting the node id", e))?;
        self.make_durable()?;
        match swapped {
            Ok(()) => Ok(id),
            // Another caller persisted one first: theirs is the identity.
            Err(_) => self
                .meta_get::<u64>(META_NODE_ID, "node id")?
                .ok_or_else(|| Error::corrupt("node id", "vanished after it was written")),
        }
    }

    /// Increments the incarnation counter, makes it durable and returns the new value (1 on the
    /// first boot). A node calls this once per start, so a restarted process is distinguishable
    /// from the one before it. Blocking.
    pub fn next_incarnation(&self) -> Result<u64> {
        let next = loop {
            let old = self
                .inner
                .meta
                .get(META_INCARNATION)
                .map_err(|e| Error::sled("reading the incarnation", e))?;
            let current: u64 = match &old {
                Some(v) => decode("incarnation", v)?,
                None => 0,
            };
            let next = current
                .checked_add(1)
                .ok_or_else(|| Error::corrupt("incarnation", "counter at u64::MAX"))?;
            let swapped = self
                .inner
                .meta
                .compare_and_swap(META_INCARNATION, old, Some(encode("incarnation", &next)?))
                .map_err(|e| Error::sled("persisting the incarnation", e))?;
            if swapped.is_ok() {
                break next;
            }
        };
        self.make_durable()?;
        Ok(next)
    }

    /// The data directory this store was opened on.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Bytes this store occupies on disk: sled's files (including blobs) and the snapshot file.
    pub fn size_on_disk(&self) -> Result<u64> {
        let sled = self
            .inner
            .db
            .size_on_disk()
            .map_err(|e| Error::sled("measuring the database", e))?;
        Ok(sled + snapshot::size(&self.inner.snapshot_dir)?)
    }

    // ----- crate-internal building blocks -----

    /// A durability point: see the module documentation. Blocking (call it off the async
    /// workers).
    pub(crate) fn make_durable(&self) -> Result<()> {
        let d = &self.inner.durability;
        if let Some(why) = d.lost.get() {
            return Err(Error::DurabilityLost(why.clone()));
        }
        let hook = self.hook();
        let image = match hook {
            Some(h) if !h.powered() => return Err(self.power_lost()),
            Some(_) => Some(self.capture_image()?),
            None => None,
        };
        let result = self
            .inner
            .db
            .flush()
            .map_err(|e| Error::sled("flushing sled", e))
            .and_then(|_| d.sync_new_blobs())
            .and_then(|()| {
                d.db_file
                    .sync_data()
                    .map_err(|e| Error::io("fsyncing sled's db file", e))
            });
        if let Err(e) = &result {
            tracing::error!(error = %e, "durability point failed; the store refuses further writes");
            let _ = d.lost.set(e.to_string());
            return result;
        }
        if let (Some(h), Some(image)) = (hook, image) {
            if !h.completed(image) {
                return Err(self.power_lost());
            }
        }
        Ok(())
    }

    /// The test hook at the durability points, if any.
    pub(crate) fn hook(&self) -> Option<&dyn DurabilityHook> {
        self.inner.options.durability_hook.as_deref()
    }

    /// The error of a durability point on a disk without power (fault injection). Like any
    /// failed fsync, it makes the store refuse every later durability point.
    fn power_lost(&self) -> Error {
        let why = "the disk lost power (fault injection)";
        let _ = self.inner.durability.lost.set(why.to_string());
        tracing::warn!("durability point refused: {why}");
        Error::DurabilityLost(why.to_string())
    }

    /// What a durability point starting now will make durable, at least. Reads the committed
    /// log id before the log, so the log read is never older than the committed id.
    fn capture_image(&self) -> Result<DurableImage> {
        let mut seq = self
            .inner
            .image_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *seq += 1;
        let committed = self
            .meta_get::<Option<LogId>>(META_COMMITTED, "committed log id")?
            .flatten();
        let vote = self.meta_get(META_VOTE, "vote")?;
        let log_last = self.log_last()?;
        Ok(DurableImage {
            seq: *seq,
            log_last,
            vote,
            committed,
        })
    }

    /// The id of the last log entry, if any.
    pub(crate) fn last_entry_log_id(&self) -> Result<Option<LogId>> {
        let last = self
            .inner
            .log
            .last()
            .map_err(|e| Error::sled("reading the last log entry", e))?;
        last.map(|(_, value)| decode::<Entry>("log entry", &value).map(|e| e.log_id))
            .transpose()
    }

    /// The last log id: of the last entry, or the last purged one if that is later (entries at
    /// or below it are gone, or about to be after a crash during a purge).
    pub(crate) fn log_last(&self) -> Result<Option<LogId>> {
        let entry = self.last_entry_log_id()?;
        let purged = self.last_purged()?;
        Ok(match (entry, purged) {
            (Some(entry), Some(purged)) if purged.index >= entry.index => Some(purged),
            (entry, purged) => entry.or(purged),
        })
    }

    /// The log id of the entry at `index`, if there is one.
    pub(crate) fn log_entry_id(&self, index: u64) -> Result<Option<LogId>> {
        let value = self
            .inner
            .log
            .get(u64_key(index))
            .map_err(|e| Error::sled("reading a log entry", e))?;
        value
            .map(|v| decode::<Entry>("log entry", &v).map(|e| e.log_id))
            .transpose()
    }

    /// How many payloads the payloads tree holds.
    pub(crate) fn payload_count(&self) -> Result<u64> {
        Ok(self.inner.payloads.count() as u64)
    }

    /// Makes the payloads and archive trees hold exactly what the snapshot `data` holds (none
    /// without a snapshot), the archived records written a batch at a time as they are decoded.
    /// Returns the decoded snapshot (its table, and its payloads) and how many records were
    /// archived. Callers guard it with the `payloads_rebuild` marker (see
    /// [`Store::begin_payloads_rebuild`]): an error leaves the trees half-written.
    pub(crate) fn rebuild_trees_from(
        &self,
        data: Option<impl std::io::Read>,
    ) -> Result<(Option<snapshot::SnapshotBody>, u64)> {
        self.clear_tree(self.inner.payloads.tree(), "clearing payloads")?;
        self.clear_tree(self.inner.archive.tree(), "clearing archived jobs")?;
        let Some(data) = data else {
            return Ok((None, 0));
        };
        let mut batch: Vec<(JobId, Vec<u8>)> = Vec::with_capacity(PAYLOAD_BATCH_KEYS_MAX);
        let mut archived = 0u64;
        let mut sink = |job: JobId, value: Vec<u8>| -> Result<()> {
            batch.push((job, value));
            archived += 1;
            if batch.len() == PAYLOAD_BATCH_KEYS_MAX {
                self.archive_records(&std::mem::take(&mut batch))?;
            }
            Ok(())
        };
        let body = snapshot::decode_body_from(data, snapshot::Records::Into(&mut sink))?;
        self.archive_records(&batch)?;
        let mut payloads: Vec<(JobId, Vec<u8>)> = body
            .payloads
            .iter()
            .map(|(id, p)| (*id, crate::codec::encode_raw(p)))
            .collect();
        payloads.sort_by_key(|(id, _)| *id);
        payloads.dedup_by_key(|(id, _)| *id);
        self.put_payloads(&payloads)?;
        Ok((Some(body), archived))
    }

    pub(crate) fn meta_get<T: DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>> {
        let value = self
            .inner
            .meta
            .get(key)
            .map_err(|e| Error::sled("reading metadata", e))?;
        value.map(|v| decode(what, &v)).transpose()
    }

    /// Writes a metadata value (durable at the next durability point).
    pub(crate) fn meta_put<T: Serialize>(
        &self,
        key: &[u8],
        what: &'static str,
        value: &T,
    ) -> Result<()> {
        let bytes = encode(what, value)?;
        self.inner
            .meta
            .insert(key, bytes)
            .map_err(|e| Error::sled("writing metadata", e))?;
        Ok(())
    }

    /// Removes a metadata value (durable at the next durability point).
    pub(crate) fn meta_remove(&self, key: &[u8]) -> Result<()> {
        self.inner
            .meta
            .remove(key)
            .map_err(|e| Error::sled("removing metadata", e))?;
        Ok(())
    }

    pub(crate) fn last_purged(&self) -> Result<Option<LogId>> {
        self.meta_get(META_LAST_PURGED, "last purged log id")
    }

    /// Removes every log entry with an index `>= from`, newest first, in small batches, so that
    /// a crash half-way leaves a log without holes.
    pub(crate) fn remove_log_from(&self, from: u64) -> Result<usize> {
        let mut removed = 0;
        loop {
            let keys = self
                .inner
                .log
                .range(u64_key(from)..)
                .keys()
                .rev()
                .take(PURGE_BATCH_KEYS_MAX)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::sled("listing log entries to truncate", e))?;
            if keys.is_empty() {
                return Ok(removed);
            }
            removed += keys.len();
            self.remove_keys(&self.inner.log, keys, "truncating the log")?;
        }
    }

    /// The first log index that is not purged (reads skip the entries below it, which the
    /// background purger may not have removed yet).
    pub(crate) fn purged_below(&self) -> u64 {
        self.inner
            .purged_below
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Purges the log up to `log_id` (inclusive): records it as the last purged id (no
    /// durability point: sled's log is ordered, so a crash that keeps any of the removals keeps
    /// this record, and one that loses it still has every entry), makes reads skip the purged
    /// entries, and leaves their removal to a background thread that removes
    /// [`PURGE_BATCH_KEYS_MAX`] keys at a time with [`PURGE_PAUSE`] between batches. Removing
    /// 15,000–35,000 entries inline held up the Raft log's appends for 106–178 ms at every
    /// snapshot. A removal a crash interrupts is finished by [`Store::open`].
    pub(crate) fn purge_log_upto(&self, log_id: LogId) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.meta_put(META_LAST_PURGED, "last purged log id", &log_id)?;
        self.inner.purged_below.fetch_max(log_id.index + 1, SeqCst);
        self.inner.purge_target.fetch_max(log_id.index, SeqCst);
        if self.inner.purger_running.swap(true, SeqCst) {
            return Ok(()); // the running purger sees the new target
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("exactly-purge".into())
            .spawn(move || store.run_purger());
        if let Err(e) = spawned {
            self.inner.purger_running.store(false, SeqCst);
            return Err(Error::io("starting the log purger", e));
        }
        Ok(())
    }

    /// The background purger: removes log entries up to the target, paced, until it has caught
    /// up with the latest target.
    fn run_purger(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            let target = self.inner.purge_target.load(SeqCst);
            if let Err(e) = self.remove_log_upto(target, Some(PURGE_PAUSE)) {
                // Harmless for correctness (reads skip purged entries; open finishes the
                // removal), so it is only reported.
                tracing::warn!(error = %e, upto = target, "purging the log in the background");
            }
            self.inner.purger_running.store(false, SeqCst);
            // A target raised after the load above, whose caller saw this purger still running.
            if self.inner.purge_target.load(SeqCst) == target
                || self.inner.purger_running.swap(true, SeqCst)
            {
                return;
            }
        }
    }

    /// Removes every log entry with an index `<= upto`, oldest first, in small batches, with
    /// `pause` between batches if given (the background purger's pacing).
    pub(crate) fn remove_log_upto(&self, upto: u64, pause: Option<Duration>) -> Result<usize> {
        let mut removed = 0;
        loop {
            let keys = self
                .inner
                .log
                .range(..=u64_key(upto))
                .keys()
                .take(PURGE_BATCH_KEYS_MAX)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::sled("listing log entries to purge", e))?;
            if keys.is_empty() {
                return Ok(removed);
            }
            removed += keys.len();
            self.remove_keys(&self.inner.log, keys, "purging the log")?;
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            }
        }
    }

    fn remove_keys(
        &self,
        tree: &sled::Tree,
        keys: Vec<sled::IVec>,
        context: &'static str,
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        tree.apply_batch(batch).map_err(|e| Error::sled(context, e))
    }

    /// Removes every key of a tree keyed by job id, in small batches.
    fn clear_tree(&self, tree: &sled::Tree, what: &'static str) -> Result<()> {
        loop {
            let keys = tree
                .iter()
                .keys()
                .take(PAYLOAD_BATCH_KEYS_MAX)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::sled(what, e))?;
            if keys.is_empty() {
                return Ok(());
            }
            self.remove_keys(tree, keys, what)?;
        }
    }

    /// Writes encoded payloads (by job id) into the payloads' chunks.
    pub(crate) fn put_payloads(&self, payloads: &[(JobId, Vec<u8>)]) -> Result<()> {
        put_by_id(&self.inner.payloads, payloads, "writing payloads")
    }

    /// Makes the state machine's next load rebuild its state from the current snapshot (the
    /// state tree's head is its commit mark: see `state_machine.rs`). Durable at the next
    /// durability point.
    pub(crate) fn forget_state(&self) -> Result<()> {
        self.inner
            .state
            .remove(crate::state_machine::STATE_HEAD)
            .map_err(|e| Error::sled("forgetting the state", e))?;
        Ok(())
    }

    /// The current snapshot's metadata, if there is one (without opening its data).
    pub(crate) fn current_snapshot_meta(&self) -> Option<Meta> {
        let current = self
            .inner
            .current_snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current.as_ref().map(|(meta, _)| meta.clone())
    }

    /// Writes records into the archive tree (the finished records of a snapshot of the earlier
    /// format, which kept them in the table).
    pub(crate) fn archive_records(&self, records: &[(JobId, Vec<u8>)]) -> Result<()> {
        put_by_id(&self.inner.archive, records, "archiving jobs")
    }

    /// Makes `payloads` the payloads tree, crash-safely with respect to the snapshot file: the
    /// marker is durable before the tree is touched and is removed only once the tree is
    /// durable, so a crash in between makes [`Store::open`] rebuild the tree from whichever
    /// snapshot file survived.
    pub(crate) fn begin_payloads_rebuild(&self) -> Result<()> {
        self.meta_put(META_PAYLOADS_REBUILD, "payloads rebuild marker", &true)?;
        self.make_durable()
    }

    pub(crate) fn finish_payloads_rebuild(&self) -> Result<()> {
        self.make_durable()?;
        self.inner
            .meta
            .remove(META_PAYLOADS_REBUILD)
            .map_err(|e| Error::sled("removing the payloads rebuild marker", e))?;
        // If this removal is lost in a crash, the next open rebuilds once more: harmless.
        self.make_durable()
    }

    /// Persists a snapshot as the current one. With `only_if_newer`, a snapshot older than the
    /// current one is not written (a build that raced with an install). Returns whether it
    /// was written. Makes sled durable first, so the payloads tree on disk is never older
    /// than the snapshot file.
    pub(crate) fn persist_snapshot(
        &self,
        meta: &Meta,
        data: &Path,
        only_if_newer: bool,
    ) -> Result<bool> {
        self.make_durable()?;
        let mut current = self
            .inner
            .current_snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if only_if_newer {
            if let Some((cur, _)) = current.as_ref() {
                if cur.last_log_id > meta.last_log_id {
                    tracing::debug!(
                        current = %cur, built = %meta,
                        "not persisting a snapshot older than the current one"
                    );
                    return Ok(false);
                }
            }
        }
        snapshot::point_to(&self.inner.snapshot_dir, meta, data)?;
        let old = current.replace((meta.clone(), data.to_path_buf()));
        if let Some((_, old_data)) = old.filter(|(_, old)| old != data) {
            // Open handles (a peer being sent the old snapshot) keep reading it.
            snapshot::remove_data(&old_data)?;
        }
        Ok(true)
    }

    /// Writes a new snapshot data file with `write` (durable when this returns); it becomes the
    /// current snapshot only through [`Store::persist_snapshot`].
    pub(crate) fn write_snapshot_data(
        &self,
        label: u64,
        write: impl FnOnce(&mut dyn std::io::Write) -> Result<()>,
    ) -> Result<PathBuf> {
        snapshot::write_data(&self.inner.snapshot_dir, label, write)
    }

    /// Removes a snapshot data file that did not become current (open handles keep it).
    pub(crate) fn discard_snapshot_data(&self, data: &Path) -> Result<()> {
        snapshot::remove_data(data)
    }

    /// A new anonymous file for snapshot data received from a peer (gone with its handle).
    pub fn incoming_snapshot_file(&self) -> Result<File> {
        snapshot::incoming_file(&self.inner.snapshot_dir)
    }

    /// The current snapshot's metadata and its data file, opened at its start.
    pub(crate) fn read_snapshot(&self) -> Result<Option<(Meta, File)>> {
        let current = self
            .inner
            .current_snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match current.as_ref() {
            Some((meta, data)) => {
                let f =
                    File::open(data).map_err(|e| Error::io("opening the snapshot data file", e))?;
                Ok(Some((meta.clone(), f)))
            }
            None => Ok(None),
        }
    }

    /// Test helper: persists snapshot data held in memory.
    #[cfg(test)]
    pub(crate) fn persist_snapshot_bytes(
        &self,
        meta: &Meta,
        data: &[u8],
        only_if_newer: bool,
    ) -> Result<bool> {
        let label = meta.last_log_id.map_or(0, |l| l.index);
        let path = self.write_snapshot_data(label, |f| {
            f.write_all(data)
                .map_err(|e| Error::io("writing test snapshot data", e))
        })?;
        let written = self.persist_snapshot(meta, &path, only_if_newer)?;
        if !written {
            self.discard_snapshot_data(&path)?;
        }
        Ok(written)
    }

    /// Start-up recovery. See [`Store::open`].
    fn recover(&self) -> Result<()> {
        // A purge persists `last_purged` before deleting; finish one a crash interrupted.
        let last_purged = self.last_purged()?;
        if let Some(purged) = &last_purged {
            let n = self.remove_log_upto(purged.index, None)?;
            if n > 0 {
                tracing::info!(
                    count = n,
                    upto = purged.index,
                    "finished an interrupted log purge"
                );
            }
        }
        self.trim_torn_log_tail(last_purged.map(|p| p.index + 1))?;
        if self
            .meta_get::<bool>(META_PAYLOADS_REBUILD, "payloads rebuild marker")?
            .is_some()
        {
            tracing::warn!(
                "a snapshot install was interrupted; rebuilding payloads from the snapshot"
            );
            let data = self.read_snapshot()?.map(|(_, data)| data);
            self.rebuild_trees_from(data)?;
            // The state may be the old snapshot's, or half of the new one's: it is rebuilt
            // from the snapshot file when the state machine loads.
            self.forget_state()?;
            self.finish_payloads_rebuild()?;
        }
        self.make_durable()
    }

    /// Removes everything after the first hole in the log. A hole can only come from a write
    /// that never reached a durability point (sled skips a record whose blob file is missing
    /// after a crash, but may keep later records), so nothing after it was ever acknowledged.
    fn trim_torn_log_tail(&self, first_expected: Option<u64>) -> Result<()> {
        let mut expected = first_expected;
        let mut hole_at = None;
        for key in self.inner.log.iter().keys() {
            let key = key.map_err(|e| Error::sled("scanning the log", e))?;
            let index = key_u64("log key", &key)?;
            match expected {
                Some(e) if e != index => {
                    hole_at = Some((e, index));
                    break;
                }
                _ => expected = Some(index + 1),
            }
        }
        if let Some((missing, next)) = hole_at {
            let removed = self.remove_log_from(next)?;
            tracing::warn!(
                missing,
                removed,
                "the log had a hole after a crash; removed the unacknowledged entries after it"
            );
        }
        Ok(())
    }
}

impl Durability {
    /// fsyncs blob files sled wrote (or finished writing) since the last scan, then the blobs
    /// directory. Costs a directory listing and a `stat` per blob file; blob files exist only
    /// for values above ~128 KiB.
    fn sync_new_blobs(&self) -> Result<()> {
        let mut synced = self
            .synced_blobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut present = HashMap::with_capacity(synced.len());
        let mut added = false;
        let entries =
            fs::read_dir(&self.blobs_dir).map_err(|e| Error::io("listing sled's blob files", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing sled's blob files", e))?;
            let name = entry.file_name();
            // sled removes blobs it no longer needs, possibly right now.
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("reading a sled blob file's size", e)),
            };
            if synced.get(&name) != Some(&len) {
                // Sync first, then record the length seen before the sync: if the file grew
                // meanwhile, the next scan sees a different length and syncs it again.
                match File::open(entry.path()).and_then(|f| f.sync_all()) {
                    Ok(()) => added = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io("fsyncing a sled blob file", e)),
                }
            }
            present.insert(name, len);
        }
        *synced = present;
        if added {
            snapshot::sync_dir(&self.blobs_dir, "fsyncing sled's blob directory")?;
        }
        Ok(())
    }
}

/// Opens sled, waiting up to [`OPEN_LOCK_WAIT_MS_MAX`] for a lock a just-dropped store of this
/// process may still hold.
fn open_sled(path: &Path) -> Result<sled::Db> {
    let deadline = Instant::now() + Duration::from_millis(OPEN_LOCK_WAIT_MS_MAX);
    loop {
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(SLED_CACHE_BYTES)
            .flush_every_ms(None)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if Instant::now() >= deadline {
                    return Err(Error::Locked {
                        path: path.to_path_buf(),
                    });
                }
                std::thread::sleep(Duration::from_millis(OPEN_LOCK_RETRY_MS));
            }
            Err(e) => return Err(Error::sled("opening the sled database", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use crate::raft_types::{blank_entry as blank_ent, log_id};
    use exactly_core::JobTable;

    use super::*;

    fn put_entries(store: &Store, indexes: impl IntoIterator<Item = u64>) {
        for index in indexes {
            let entry = blank_ent(1, 1, index);
            let bytes = encode("log entry", &entry).unwrap();
            store.inner.log.insert(u64_key(index), bytes).unwrap();
        }
        store.make_durable().unwrap();
    }

    fn log_indexes(store: &Store) -> Vec<u64> {
        store
            .inner
            .log
            .iter()
            .keys()
            .map(|k| key_u64("log key", &k.unwrap()).unwrap())
            .collect()
    }

    /// A purge is seen by reads at once (they skip the purged entries), its removal happens in
    /// the background until none is left, and a store reopened afterwards starts after it.
    #[test]
    fn a_purge_is_read_at_once_and_removed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put_entries(&store, 1..=3000);
        store.purge_log_upto(log_id(1, 1, 2500)).unwrap();
        assert_eq!(store.purged_below(), 2501);
        let log = crate::LogStore::new(store.clone());
        let read = log.read_entries(&(0..), 10, usize::MAX).unwrap();
        assert_eq!(read.first().map(|e| e.log_id.index), Some(2501));
        let started = Instant::now();
        while log_indexes(&store).first() != Some(&2501) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the purger did not remove the entries"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // A later purge while none runs starts the purger again.
        store.purge_log_upto(log_id(1, 1, 2800)).unwrap();
        drop((log, store));
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.purged_below(), 2801);
        assert_eq!(log_indexes(&store), (2801..=3000).collect::<Vec<_>>());
        assert_eq!(store.last_purged().unwrap(), Some(log_id(1, 1, 2800)));
    }

    /// A purge that recorded `last_purged` but crashed before deleting is finished on reopen.
    #[test]
    fn interrupted_purge_is_finished_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            put_entries(&store, 1..=10);
            store
                .meta_put(META_LAST_PURGED, "last purged log id", &log_id(1, 1, 4))
                .unwrap();
            store.make_durable().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(log_indexes(&store), (5..=10).collect::<Vec<_>>());
    }

    /// A hole in the log (a write lost in a crash while later ones survived) is cut off with
    /// everything after it on reopen.
    #[test]
    fn log_after_a_hole_is_trimmed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            put_entries(&store, (1..=10).filter(|&i| i != 6));
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(log_indexes(&store), vec![1, 2, 3, 4, 5]);
    }

    /// A hole right after the last purged index removes every remaining entry on reopen.
    #[test]
    fn hole_after_the_purge_point_is_trimmed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .meta_put(META_LAST_PURGED, "last purged log id", &log_id(1, 1, 3))
                .unwrap();
            put_entries(&store, 5..=8);
        }
        let store = Store::open(dir.path()).unwrap();
        assert!(log_indexes(&store).is_empty());
    }

    /// A data directory of an earlier build keeps its payloads and archived jobs in trees
    /// with a sled key per job: opening it moves them into the chunks (a few hundred, several
    /// chunks) and drops those trees; a payload written afterwards lands beside them.
    #[test]
    fn payloads_and_archived_jobs_of_the_earlier_layout_move_into_chunks_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let payload = |id: u64| format!("payload of job {id}").into_bytes();
        let (_, _, archive) = snapshot::tests::fixture_state();
        {
            let db = open_sled(&dir.path().join(SLED_DIR)).unwrap();
            let old = db.open_tree(TREE_PAYLOADS_UNCHUNKED).unwrap();
            for id in 1..=600u64 {
                old.insert(u64_key(id), crate::codec::encode_raw(&payload(id)))
                    .unwrap();
            }
            let old = db.open_tree(TREE_ARCHIVE_UNCHUNKED).unwrap();
            for (id, job) in &archive {
                old.insert(u64_key(*id), encode("archived job", job).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert!(store.inner.payloads.tree().len() > 2, "several chunks");
        for id in 1..=600u64 {
            assert_eq!(store.payload(id).unwrap(), Some(payload(id)), "job {id}");
        }
        assert_eq!(store.payload(601).unwrap(), None);
        assert_eq!(store.payload_count().unwrap(), 600);
        store
            .put_payloads(&[(601, crate::codec::encode_raw(b"new"))])
            .unwrap();
        assert_eq!(store.payload(601).unwrap(), Some(b"new".to_vec()));
        assert!(!archive.is_empty());
        for (id, job) in &archive {
            assert_eq!(store.archived(*id).unwrap().as_ref(), Some(job));
        }
        assert_eq!(store.archived_count().unwrap(), archive.len() as u64);
        for old in [TREE_PAYLOADS_UNCHUNKED, TREE_ARCHIVE_UNCHUNKED] {
            assert!(!store
                .inner
                .db
                .tree_names()
                .iter()
                .any(|n| n.as_ref() == old.as_bytes()));
        }
    }

    /// A snapshot install interrupted while replacing payloads and archived records (marker
    /// still present) makes reopening rebuild both trees from the snapshot file.
    #[test]
    fn interrupted_install_rebuilds_payloads_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (table, payloads, archive) = snapshot::tests::fixture_state();
        {
            let store = Store::open(dir.path()).unwrap();
            let data = snapshot::encode_body(&table, &payloads, &archive).unwrap();
            let meta = Meta {
                last_log_id: Some(log_id(1, 1, 9)),
                last_membership: Default::default(),
            };
            store.begin_payloads_rebuild().unwrap();
            store.persist_snapshot_bytes(&meta, &data, false).unwrap();
            store
                .put_payloads(&[(9, crate::codec::encode_raw(b"stale"))])
                .unwrap();
            let stale = encode("archived job", &archive[&1]).unwrap();
            store.archive_records(&[(9, stale)]).unwrap();
            store.make_durable().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        for (id, payload) in &payloads {
            assert_eq!(store.payload(*id).unwrap().as_ref(), Some(payload));
        }
        assert_eq!(store.payload(9).unwrap(), None);
        for (id, job) in &archive {
            assert_eq!(store.archived(*id).unwrap().as_ref(), Some(job));
        }
        assert_eq!(store.archived(9).unwrap(), None);
        assert_eq!(store.archived_count().unwrap(), archive.len() as u64);
        assert!(store
            .meta_get::<bool>(META_PAYLOADS_REBUILD, "marker")
            .unwrap()
            .is_none());
    }

    /// Rebuilding the trees from a snapshot of more finished jobs than one write batch holds
    /// writes every record (a batch at a time) and returns the snapshot's table.
    #[test]
    fn trees_are_rebuilt_a_batch_at_a_time() {
        use exactly_core::{Command, Effect, NewJob, Request};
        let n = 3 * PAYLOAD_BATCH_KEYS_MAX + 7;
        let mut table = JobTable::new();
        let mut archive = std::collections::BTreeMap::new();
        let job = NewJob {
            queue: "q".to_string(),
            kind: "noop".to_string(),
            max_attempts: 1,
            ..NewJob::default()
        };
        table.apply(1, Request::at(10, Command::Submit(vec![job; n])));
        let ids: Vec<JobId> = (1..=n as JobId).collect();
        for (i, chunk) in ids.chunks(100).enumerate() {
            let (_, effects) = table.apply(
                2 + i as u64,
                Request::at(11, Command::Cancel(chunk.to_vec())),
            );
            for e in effects {
                if let Effect::Archive(job) = e {
                    archive.insert(job.id, *job);
                }
            }
        }
        assert_eq!(archive.len(), n);
        let data = snapshot::encode_body(&table, &[], &archive).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (body, archived) = store.rebuild_trees_from(Some(data.as_slice())).unwrap();
        assert_eq!(archived, n as u64);
        assert!(body.unwrap().table == table);
        assert_eq!(store.archived_count().unwrap(), n as u64);
        assert_eq!(
            store.archived(n as JobId).unwrap().as_ref(),
            archive.get(&(n as JobId))
        );
    }

    /// A value large enough for sled to write as a separate blob file gets that file fsynced
    /// by the next durability point (sled itself never fsyncs blobs).
    #[test]
    fn durability_point_fsyncs_new_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .put_payloads(&[(1, crate::codec::encode_raw(&vec![5u8; 1024 * 1024]))])
            .unwrap();
        store.make_durable().unwrap();
        let blobs = fs::read_dir(dir.path().join(SLED_DIR).join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<HashSet<_>>();
        assert!(
            !blobs.is_empty(),
            "sled wrote no blob file for a 1 MiB value"
        );
        let synced = store.inner.durability.synced_blobs.lock().unwrap().clone();
        assert!(
            blobs.iter().all(|b| synced.contains_key(b)),
            "{blobs:?} not all in {synced:?}"
        );
    }

    /// A snapshot built before a newer one was installed does not replace it.
    #[test]
    fn an_older_snapshot_does_not_replace_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = snapshot::encode_body(&JobTable::new(), &[], &Default::default()).unwrap();
        let meta_at = |index| Meta {
            last_log_id: Some(log_id(1, 1, index)),
            last_membership: Default::default(),
        };
        assert!(store
            .persist_snapshot_bytes(&meta_at(10), &data, false)
            .unwrap());
        assert!(!store
            .persist_snapshot_bytes(&meta_at(5), &data, true)
            .unwrap());
        let (meta, _) = store.read_snapshot().unwrap().unwrap();
        assert_eq!(meta, meta_at(10));
    }
}
