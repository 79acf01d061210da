//! [`StateMachine`]: the job table on disk, fed by committed entries, with snapshots.
//!
//! The table's records (every family that grows with the jobs) live in the `state_chunks` sled tree
//! through [`SledRecords`]; its head (the bounded fields, [`TableHead`]) is in memory and is
//! written with every apply call, under [`STATE_HEAD`] in the same tree, with the last
//! applied log id and the membership: one atomic sled batch per apply call, so the tree is
//! always the state after some whole call, and the head key is its commit mark. A restart
//! reads the head and goes on from its last applied entry: nothing the disk holds is replayed
//! or loaded. Apply needs no durability point of its own: the log it applies is durable,
//! sled's log is ordered (a durability point makes every earlier write durable), and a
//! snapshot is persisted only after one, so the state on disk is never older than the
//! snapshot. A state whose head is missing (a fresh directory, an interrupted install, a
//! simulated power loss) or older than the snapshot is rebuilt from the snapshot.
//!
//! Payloads and the archived records of finished jobs live next to it in their own trees;
//! every effect on those is idempotent (insert the same bytes again, remove again) and is
//! written before the apply call's state batch, so a state on disk never names a payload
//! that is not there.
//!
//! Snapshots are built from a consistent view of the state tree ([`SledRecords::capture`])
//! while apply goes on.
//!
//! **Invariant:** a reader never sees a job whose payload is not yet readable: apply writes the
//! payloads while it still holds the table's write lock, and calls the observer after both.

use std::collections::BTreeMap;
use std::io::{self, Seek, SeekFrom, Write};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use exactly_core::records::{MemRecords, Records, Space};
use exactly_core::{Effect, JobEvent, JobTable, NodeLease, Response, StartAttempt, TableHead};
use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode, encode_raw, u64_key};
use crate::error::{Error, Result};
use crate::raft_types::{Entry, EntryPayload, LogId, Snapshot, StoredMembership};
use crate::records::{CapturedView, NodeRecords, SledRecords, TableStorage};
use crate::snapshot::{self, Meta};
use crate::store::Store;
use crate::{IssuedTokens, Observer, TypeConfig};

/// How long apply calls' writes may wait in memory before they go to the state tree. Within
/// this window a record written and removed again (a job submitted, started and finished; its
/// entry in the ready index) never reaches sled, which writes each key as a log record of its
/// own: a restart re-applies the window's entries from the log, which openraft keeps until a
/// snapshot (whose build flushes first) covers them.
pub const STATE_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Writes waiting in memory after which apply flushes at once, whatever the window's age.
pub const STATE_FLUSH_KEYS_MAX: usize = 50_000;

/// The job table as a node keeps it: its records in memory or in the `state_chunks` sled tree
/// ([`TableStorage`]).
pub type Table = JobTable<NodeRecords>;

/// The key of the state's head in the state tree: outside every [`Space`] (whose keys start
/// with their space's byte, all below `0xFF`), and after all of them.
pub(crate) const STATE_HEAD: &[u8] = b"\xFFhead";

/// What the state tree keeps besides the records, written with every apply call.
#[derive(Serialize, Deserialize)]
struct StateHead {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    table: TableHead,
}

/// What has been applied: the job table, and the Raft bookkeeping that goes with it.
struct Applied {
    table: Table,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// When the oldest apply call whose writes are not in the state tree yet ended (`None`:
    /// everything is flushed).
    unflushed_since: Option<Instant>,
}

/// The replicated state machine of one node. Cheap to clone; clones share the same state.
#[derive(Clone)]
pub struct StateMachine {
    store: Store,
    shared: Arc<RwLock<Applied>>,
    observer: Observer,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("store", &self.store)
            .field("last_applied", &self.last_applied())
            .finish()
    }
}

impl StateMachine {
    /// Loads the state from the state tree, or rebuilds it from the persisted snapshot when the
    /// tree has none as new as the snapshot (see the module documentation).
    pub(crate) fn load(store: Store, observer: Observer) -> Result<Self> {
        let tree = store.inner.state.clone();
        let head = if store.inner.options.table == TableStorage::Disk {
            tree.get(STATE_HEAD)
                .map_err(|e| Error::sled("reading the state's head", e))?
                .map(|bytes| decode::<StateHead>("state head", &bytes))
                .transpose()?
        } else {
            // A state left by an earlier run on disk goes stale from here on.
            store.forget_state()?;
            None
        };
        let snapshot_last = store.current_snapshot_meta().and_then(|m| m.last_log_id);
        let applied = match head {
            Some(head) if head.last_applied >= snapshot_last => {
                tracing::info!(last_applied = ?head.last_applied, "state machine loaded from disk");
                Applied {
                    table: JobTable::from_parts(
                        head.table,
                        NodeRecords::Disk(SledRecords::new(tree)),
                    ),
                    last_applied: head.last_applied,
                    membership: head.membership,
                    unflushed_since: None,
                }
            }
            _ => match store.read_snapshot()? {
                Some((meta, data)) => {
                    // The archive tree holds this snapshot's finished records (it is never
                    // older than the persisted snapshot), unless the snapshot is of the earlier
                    // format.
                    let body = snapshot::decode_body_from(data, snapshot::Records::Skip)?;
                    if body.legacy {
                        store.archive_records(&body.archived)?;
                    }
                    let table =
                        place(&store, &body.table, meta.last_log_id, &meta.last_membership)?;
                    tracing::info!(snapshot = %meta, "state machine rebuilt from the snapshot");
                    Applied {
                        table,
                        last_applied: meta.last_log_id,
                        membership: meta.last_membership,
                        unflushed_since: None,
                    }
                }
                None => {
                    let none = StoredMembership::default();
                    Applied {
                        table: place(&store, &JobTable::new(), None, &none)?,
                        last_applied: None,
                        membership: StoredMembership::default(),
                        unflushed_since: None,
                    }
                }
            },
        };
        Ok(Self {
            store,
            shared: Arc::new(RwLock::new(applied)),
            observer,
        })
    }

    /// Read access to the job table for the API and the scheduler (a read lock, held for the
    /// duration of `f`: keep `f` short).
    pub fn read<T>(&self, f: impl FnOnce(&Table) -> T) -> T {
        // Only a panic inside apply poisons the lock, and apply then fails every later call,
        // which stops the Raft node; readers may still look at the table meanwhile.
        let applied = self.shared.read().unwrap_or_else(PoisonError::into_inner);
        f(&applied.table)
    }

    /// Read access to the job table and the archived records of its finished jobs, consistent
    /// with each other (apply writes the archive under the same lock): for reads that may meet
    /// a succeeded or cancelled job. Keep `f` short, as for [`StateMachine::read`].
    pub fn read_jobs<T>(&self, f: impl FnOnce(&Table, &Archive<'_>) -> T) -> T {
        let applied = self.shared.read().unwrap_or_else(PoisonError::into_inner);
        f(&applied.table, &Archive { store: &self.store })
    }

    /// [`StateMachine::read_jobs`] through a [`JobView`], whose `job` finds any retained job.
    pub fn read_view<T>(&self, f: impl FnOnce(&JobView<'_>) -> T) -> T {
        self.read_jobs(|table, archive| {
            f(&JobView {
                table,
                archive: Archive {
                    store: archive.store,
                },
            })
        })
    }

    /// One retained job's record, from the table or the archive (a copy).
    pub fn job(&self, id: exactly_core::JobId) -> Result<Option<exactly_core::Job>> {
        self.read_jobs(|t, archive| match t.job(id) {
            Some(job) => Ok(Some(job)),
            None => archive.finished(t, id),
        })
    }

    /// Applies `entries` (see the `RaftStateMachine::apply` of this type) and returns their
    /// responses in order, without answering anyone: openraft's `apply` sends them to the
    /// proposers; tests read them here.
    pub async fn apply_entries(
        &mut self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> io::Result<Vec<Response>> {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let store = self.store.clone();
        let shared = self.shared.clone();
        let Applies {
            responses,
            starts,
            renewals,
            cancels,
            events,
            tokens,
        } = tokio::task::spawn_blocking(move || apply_blocking(&store, &shared, entries))
            .await
            .map_err(Error::task)
            .and_then(|r| r)
            .map_err(|e| e.into_io("applying entries"))?;
        for start in starts {
            self.observer.on_start(start);
        }
        for (lease, index) in renewals {
            self.observer.on_renewed(lease, index);
        }
        for (job, token, node) in cancels {
            self.observer.on_cancel(job, token, node);
        }
        if !events.is_empty() {
            self.observer.on_events(events);
        }
        if let Some(tokens) = tokens {
            self.observer.on_tokens(&tokens);
        }
        self.observer.on_applied(last.index);
        Ok(responses)
    }

    /// An anonymous file in the snapshot directory to receive a snapshot from the leader into
    /// (see `Store::incoming_snapshot_file`), then handed to `install_snapshot`.
    pub async fn begin_receiving_snapshot(&self) -> Result<tokio::fs::File> {
        let store = self.store.clone();
        let file = tokio::task::spawn_blocking(move || store.incoming_snapshot_file())
            .await
            .map_err(Error::task)??;
        Ok(tokio::fs::File::from_std(file))
    }

    /// Writes what apply calls left in memory (see [`STATE_FLUSH_INTERVAL`]) to the state tree,
    /// so that a restart resumes from here (a graceful stop calls it; nothing else needs to:
    /// openraft re-applies what a crash lost). Nothing to do with the table in memory.
    pub async fn flush(&self) -> Result<()> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut applied = shared.write().map_err(|_| Error::Poisoned)?;
            commit_state(&mut applied)
        })
        .await
        .map_err(Error::task)?
    }

    /// The log id of the last applied entry (or of the loaded or installed snapshot).
    pub fn last_applied(&self) -> Option<LogId> {
        self.shared
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .last_applied
    }
}

/// Applies `entries` to the table and their payload effects to sled, under the write lock.
/// Returns the responses and the attempt starts that are still current after the whole batch.
fn apply_blocking(store: &Store, shared: &RwLock<Applied>, entries: Vec<Entry>) -> Result<Applies> {
    let mut applied = shared.write().map_err(|_| Error::Poisoned)?;
    // By key: a later drop of the same job wins.
    let mut payload_ops: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    let mut archive_ops: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    let mut out = Applies::default();
    let mut tokens_changed = false;
    for entry in entries {
        let log_id = entry.log_id;
        let response = match entry.payload {
            EntryPayload::Blank => Response::Empty,
            EntryPayload::Normal(request) => {
                let (response, effects) = applied.table.apply(log_id.index, request);
                for effect in effects {
                    match effect {
                        Effect::StorePayload { job, payload } => {
                            payload_ops.insert(u64_key(job).to_vec(), Some(encode_raw(&payload)));
                        }
                        Effect::DropPayload { job } => {
                            payload_ops.insert(u64_key(job).to_vec(), None);
                        }
                        Effect::Archive(job) => {
                            let record = encode("archived job", &job)?;
                            archive_ops.insert(u64_key(job.id).to_vec(), Some(record));
                        }
                        Effect::Unarchive { job } => {
                            archive_ops.insert(u64_key(job).to_vec(), None);
                        }
                        Effect::Start(start) => out.starts.push(start),
                        Effect::Renewed(lease) => out.renewals.push((lease, log_id.index)),
                        Effect::Cancel { job, token, node } => out.cancels.push((job, token, node)),
                        Effect::Event(event) => out.events.push((log_id.index, event)),
                        Effect::TokensChanged => tokens_changed = true,
                    }
                }
                response
            }
            EntryPayload::Membership(membership) => {
                applied.membership = StoredMembership::new(Some(log_id), membership);
                Response::Empty
            }
        };
        applied.last_applied = Some(log_id);
        out.responses.push(response);
    }
    // One operation each, not a `sled::Batch` (which rolls sled's IO buffer twice, see
    // `log_store::write_entries`): nothing needs them atomic, as a restart re-applies the log
    // from a snapshot (which carries the payloads and archived records of its point) and
    // rewrites them. The payloads' chunks keep every payload readable between two writes.
    store
        .inner
        .payloads
        .write_unbatched(payload_ops, "writing payloads")?;
    store
        .inner
        .archive
        .write_unbatched(archive_ops, "writing archived jobs")?;
    // After the payloads: the state on disk never names a payload that is not there.
    let since = *applied.unflushed_since.get_or_insert_with(Instant::now);
    let uncommitted = match applied.table.records() {
        NodeRecords::Disk(records) => records.uncommitted(),
        NodeRecords::Memory(_) => 0,
    };
    if since.elapsed() >= STATE_FLUSH_INTERVAL || uncommitted >= STATE_FLUSH_KEYS_MAX {
        commit_state(&mut applied)?;
    }
    // A start that a later entry of the same batch already ended or replaced must not reach an
    // executor (this happens when a lagging node or a restarted one applies many entries).
    out.starts.retain(|s| {
        applied
            .table
            .job(s.job)
            .is_some_and(|job| job.current_attempt().is_some_and(|a| a.token == s.token))
    });
    if tokens_changed {
        out.tokens = Some(applied.table.issued_tokens().clone());
    }
    Ok(out)
}

/// Writes what the apply calls since the last flush changed in the table's records, and its
/// head, last applied log id and membership, as one atomic batch of the state tree.
fn commit_state(applied: &mut Applied) -> Result<()> {
    applied.unflushed_since = None;
    if !matches!(applied.table.records(), NodeRecords::Disk(_)) {
        return Ok(());
    }
    let head = StateHead {
        last_applied: applied.last_applied,
        membership: applied.membership.clone(),
        table: applied.table.head(),
    };
    let head = encode("state head", &head)?;
    match applied.table.records_mut() {
        NodeRecords::Disk(records) => records.commit_marked(STATE_HEAD, head),
        NodeRecords::Memory(_) => Ok(()),
    }
}

/// The node's table holding `table` (an in-memory table: a snapshot's, or a new one), with the
/// given last applied log id and membership: as it is, or written into the state tree.
fn place(
    store: &Store,
    table: &JobTable,
    last_applied: Option<LogId>,
    membership: &StoredMembership,
) -> Result<Table> {
    match store.inner.options.table {
        TableStorage::Memory => Ok(JobTable::from_parts(
            table.head(),
            NodeRecords::Memory(table.records().clone()),
        )),
        TableStorage::Disk => write_state(store, table, last_applied, membership),
    }
}

/// Makes the state tree hold `table` (an in-memory table: a snapshot's) with the given last
/// applied log id and membership, and returns the table on it. The head is removed first and
/// written last, the records in full chunks between ([`SledRecords::fill`]), so a crash
/// half-way leaves a state without a head, which the next load rebuilds from the snapshot
/// again.
fn write_state(
    store: &Store,
    table: &JobTable,
    last_applied: Option<LogId>,
    membership: &StoredMembership,
) -> Result<Table> {
    let tree = &store.inner.state;
    store.forget_state()?;
    tree.clear()
        .map_err(|e| Error::sled("clearing the state", e))?;
    let mut records = SledRecords::new(tree.clone());
    records.fill(Space::ALL.into_iter().flat_map(|space| {
        table
            .records()
            .scan_from(space, &[])
            .map(move |(key, value)| {
                Ok((exactly_core::records::layout::full_key(space, &key), value))
            })
    }))?;
    let head = StateHead {
        last_applied,
        membership: membership.clone(),
        table: table.head(),
    };
    tree.insert(STATE_HEAD, encode("state head", &head)?)
        .map_err(|e| Error::sled("writing the state", e))?;
    Ok(JobTable::from_parts(head.table, NodeRecords::Disk(records)))
}

/// A copy of `table` in memory (for tests and snapshot builds of small states).
pub fn in_memory<R: Records>(table: &JobTable<R>) -> JobTable {
    let mut records = MemRecords::default();
    for space in Space::ALL {
        for (key, value) in table.records().scan_from(space, &[]) {
            records.put(space, &key, &value);
        }
    }
    JobTable::from_parts(table.head(), records)
}

/// The archived records of finished jobs, as seen under [`StateMachine::read_jobs`].
pub struct Archive<'a> {
    store: &'a Store,
}

impl Archive<'_> {
    /// The record of a job that `table` lists as finished (`None` for any other, and for a
    /// finished job whose record a snapshot did not carry: see [`Store::archived`]).
    pub fn finished<R: Records>(
        &self,
        table: &JobTable<R>,
        id: exactly_core::JobId,
    ) -> Result<Option<exactly_core::Job>> {
        if table.finished_job(id).is_none() {
            return Ok(None);
        }
        self.store.archived(id)
    }
}

/// The job table with the archived records of its finished jobs (see
/// [`StateMachine::read_view`]): the table's own methods, and a `job` that finds any retained
/// job. For tests and inspection: an archived record that cannot be read is logged and
/// treated as absent (the API reports such errors instead).
pub struct JobView<'a> {
    table: &'a Table,
    archive: Archive<'a>,
}

impl std::ops::Deref for JobView<'_> {
    type Target = Table;

    fn deref(&self) -> &Table {
        self.table
    }
}

impl JobView<'_> {
    /// A retained job's record (a copy), from the table or, if it finished, the archive.
    pub fn job(&self, id: exactly_core::JobId) -> Option<exactly_core::Job> {
        if let Some(job) = self.table.job(id) {
            return Some(job);
        }
        self.archive.finished(self.table, id).unwrap_or_else(|e| {
            tracing::error!(job = id, error = %e, "reading an archived job");
            None
        })
    }

    /// A copy of the table with its finished jobs' records.
    pub fn copy(&self) -> JobCopy {
        let finished = self
            .table
            .finished_jobs()
            .filter_map(|(id, _)| self.job(id).map(|job| (id, job)))
            .collect();
        JobCopy {
            table: in_memory(self.table),
            finished,
        }
    }

    /// Every retained job's record (copies), in id order.
    pub fn all_jobs(&self) -> Vec<exactly_core::Job> {
        self.table
            .all_jobs_after(0)
            .filter_map(|listed| match listed {
                exactly_core::Listed::Record(job) => Some(*job),
                exactly_core::Listed::Archived(id, _) => self.job(id),
            })
            .collect()
    }
}

/// A copy of the job table and its finished jobs' records ([`JobView::copy`]), for tests.
pub struct JobCopy {
    pub table: JobTable,
    pub finished: std::collections::BTreeMap<exactly_core::JobId, exactly_core::Job>,
}

impl std::ops::Deref for JobCopy {
    type Target = JobTable;

    fn deref(&self) -> &JobTable {
        &self.table
    }
}

impl JobCopy {
    /// A retained job's record, from the table or, if it finished, the archived copy.
    pub fn job(&self, id: exactly_core::JobId) -> Option<exactly_core::Job> {
        self.table
            .job(id)
            .or_else(|| self.finished.get(&id).cloned())
    }
}

/// What one apply call hands back to the observer.
#[derive(Default)]
struct Applies {
    responses: Vec<Response>,
    /// Attempt starts still current at the end of the batch.
    starts: Vec<StartAttempt>,
    /// Committed lease renewals and registrations, with their log indexes.
    renewals: Vec<(NodeLease, u64)>,
    /// Running attempts a client cancelled: (job, token, node).
    cancels: Vec<(u64, u64, u64)>,
    /// Job events with the log index of the entry that caused them.
    events: Vec<(u64, JobEvent)>,
    /// The issued tokens after the batch, if an entry changed them.
    tokens: Option<IssuedTokens>,
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = tokio::fs::File;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let applied = self.shared.read().unwrap_or_else(PoisonError::into_inner);
        Ok((applied.last_applied, applied.membership.clone()))
    }

    /// Applies entries in log order: `Normal` through [`JobTable::apply`] with the entry's
    /// index (the fencing token of the attempts it starts), `Blank` and `Membership` as
    /// [`Response::Empty`]. Then tells the observer about the attempts started (only those
    /// still current at the end of the batch) and the last applied index, and only then
    /// answers the entries' proposers.
    async fn apply<Strm>(&mut self, entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let (entries, responders): (Vec<Entry>, Vec<_>) =
            entries.try_collect::<Vec<_>>().await?.into_iter().unzip();
        let responses = self.apply_entries(entries).await?;
        for (responder, response) in responders.into_iter().zip(responses) {
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    /// Starts a consistent view of the state tree (with the head, last applied and membership
    /// of its point) under the write lock, between two apply calls, so that applies go on while
    /// the snapshot is built.
    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        let mut applied = self.shared.write().unwrap_or_else(PoisonError::into_inner);
        let saved = self.store.inner.state_capture.clone();
        let head = applied.table.head();
        let view = match commit_state(&mut applied) {
            Err(e) => Err(e),
            Ok(()) => match applied.table.records_mut() {
                NodeRecords::Memory(records) => Ok(Some(View::Copied(JobTable::from_parts(
                    head,
                    records.clone(),
                )))),
                NodeRecords::Disk(records) => records
                    .capture(saved)
                    .map(|records| Some(View::Captured { records, head })),
            },
        };
        SnapshotBuilder {
            store: self.store.clone(),
            view,
            last_applied: applied.last_applied,
            membership: applied.membership.clone(),
        }
    }

    /// Validates the snapshot (decoded from its file, from the start), copies it into a data
    /// file of its own and makes that the current snapshot, replaces the payloads tree with its
    /// payloads and the in-memory state with its table. Crash-safe: see
    /// `Store::begin_payloads_rebuild`. Readers wait while the payloads are replaced, so they
    /// never see the new table with the old payloads.
    async fn install_snapshot(&mut self, meta: &Meta, snapshot: tokio::fs::File) -> io::Result<()> {
        let mut data = snapshot.into_std().await;
        let store = self.store.clone();
        let shared = self.shared.clone();
        let meta = meta.clone();
        let last_index = meta.last_log_id.map(|l| l.index);
        let tokens = tokio::task::spawn_blocking(move || -> Result<IssuedTokens> {
            let rewind = |f: &mut std::fs::File| {
                f.seek(SeekFrom::Start(0))
                    .map(|_| ())
                    .map_err(|e| Error::io("rewinding snapshot data", e))
            };
            // Checked whole before anything changes; its table is decoded again below, while
            // the trees are rebuilt (so that only one copy is in memory at a time).
            rewind(&mut data)?;
            drop(snapshot::decode_body_from(
                &mut data,
                snapshot::Records::Skip,
            )?);
            rewind(&mut data)?;
            let path = store.write_snapshot_data(last_index.unwrap_or(0), |out| {
                let mut out = std::io::BufWriter::new(out);
                std::io::copy(&mut data, &mut out)
                    .and_then(|_| out.flush())
                    .map_err(|e| Error::io("copying snapshot data", e))
            })?;
            store.begin_payloads_rebuild()?;
            store.persist_snapshot(&meta, &path, false)?;
            let mut applied = shared.write().map_err(|_| Error::Poisoned)?;
            // A build under way reads the tree being replaced: its view ends here.
            if let NodeRecords::Disk(records) = applied.table.records_mut() {
                records.end_capture();
            }
            rewind(&mut data)?;
            let (body, _) = store.rebuild_trees_from(Some(&mut data))?;
            let body = body.expect("a snapshot was given").table;
            let table = place(&store, &body, meta.last_log_id, &meta.last_membership)?;
            drop(body);
            store.finish_payloads_rebuild()?;
            let tokens = table.issued_tokens().clone();
            *applied = Applied {
                table,
                last_applied: meta.last_log_id,
                membership: meta.last_membership,
                unflushed_since: None,
            };
            Ok(tokens)
        })
        .await
        .map_err(Error::task)
        .and_then(|r| r)
        .map_err(|e| e.into_io("installing a snapshot"))?;
        tracing::info!(?last_index, "installed a snapshot");
        self.observer.on_tokens(&tokens);
        if let Some(index) = last_index {
            self.observer.on_snapshot_installed(index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let store = self.store.clone();
        let current = tokio::task::spawn_blocking(move || store.read_snapshot())
            .await
            .map_err(Error::task)
            .and_then(|r| r)
            .map_err(|e| e.into_io("reading the current snapshot"))?;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: tokio::fs::File::from_std(data),
        }))
    }
}

/// A consistent view of the state machine, taken by
/// [`RaftStateMachine::get_snapshot_builder`], that becomes a snapshot.
pub struct SnapshotBuilder {
    store: Store,
    /// The view (`None` once read), or why it could not be captured.
    view: Result<Option<View>>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// What a snapshot is built from: a copy of an in-memory table (O(1): its records are a
/// persistent map), or the records of a captured view of the state tree and the table's head at
/// its point.
enum View {
    Copied(JobTable),
    Captured {
        records: CapturedView,
        head: TableHead,
    },
}

/// Writes the snapshot data of a captured view of the state tree, without holding its records
/// in memory: the view is copied into the build tree (in key order, in full chunks), the
/// payloads of its live jobs into the build payloads tree, and the data is encoded from those
/// (format 4 reads each family in its own order, which one pass over the view cannot give).
/// Fails if an install ended the view meanwhile. The build trees are emptied again after.
fn build_from_disk(
    store: &Store,
    mut view: CapturedView,
    head: TableHead,
    label: u64,
) -> Result<std::path::PathBuf> {
    let build = store
        .inner
        .state_build
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (records_tree, payloads_tree) = &*build;
    let clear = || -> Result<()> {
        records_tree
            .clear()
            .and_then(|()| payloads_tree.clear())
            .map_err(|e| Error::sled("clearing a snapshot build's trees", e))
    };
    clear()?;
    let built = (|| {
        let mut records = SledRecords::new(records_tree.clone());
        records.fill(view.records())?;
        drop(view);
        let table = JobTable::from_parts(head, records);
        for job in table.jobs().filter(|j| !j.status.is_terminal()) {
            if let Some(payload) = store.payload(job.id)? {
                payloads_tree
                    .insert(job.id.to_be_bytes(), payload)
                    .map_err(|e| Error::sled("copying a payload for a snapshot build", e))?;
            }
        }
        store.write_snapshot_data(label, |f| {
            let payloads = snapshot::Payloads::Tree(payloads_tree);
            snapshot::encode_body_to(&table, payloads, |id| store.archived_raw(id), f)
        })
    })();
    clear()?;
    built
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = tokio::fs::File;

    /// Serializes the view and the payloads of its pending and running jobs (a payload already
    /// dropped because the job finished after the view's point is skipped: the log after the
    /// snapshot finishes that job again), persists it unless a newer snapshot was installed
    /// meanwhile, and returns it.
    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let store = self.store.clone();
        let view = std::mem::replace(&mut self.view, Ok(None));
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
        };
        tokio::task::spawn_blocking(move || -> Result<Snapshot> {
            let view = view?.ok_or_else(|| {
                Error::Invalid("a snapshot builder builds one snapshot".to_string())
            })?;
            let label = meta.last_log_id.map_or(0, |l| l.index);
            let built = match view {
                View::Copied(table) => {
                    let mut payloads = Vec::new();
                    for job in table.jobs().filter(|j| !j.status.is_terminal()) {
                        if let Some(payload) = store.payload(job.id)? {
                            payloads.push((job.id, payload));
                        }
                    }
                    store.write_snapshot_data(label, |f| {
                        let payloads = snapshot::Payloads::Collected(&payloads);
                        snapshot::encode_body_to(&table, payloads, |id| store.archived_raw(id), f)
                    })
                }
                View::Captured { records, head } => build_from_disk(&store, records, head, label),
            };
            let path = match built {
                Ok(path) => path,
                Err(e) => {
                    // An install replaced the state while this view was read: the installed
                    // snapshot is newer than this one would have been, so it is the answer.
                    if let Some((current, data)) = store.read_snapshot()? {
                        if current.last_log_id >= meta.last_log_id {
                            tracing::info!(error = %e, snapshot = %current,
                                "a snapshot build gave way to an installed snapshot");
                            return Ok(Snapshot {
                                meta: current,
                                snapshot: tokio::fs::File::from_std(data),
                            });
                        }
                    }
                    return Err(e);
                }
            };
            let data = std::fs::File::open(&path)
                .map_err(|e| Error::io("opening a built snapshot's data", e))?;
            if !store.persist_snapshot(&meta, &path, true)? {
                // A newer snapshot was installed meanwhile; the handle still reads this one.
                store.discard_snapshot_data(&path)?;
            }
            Ok(Snapshot {
                meta,
                snapshot: tokio::fs::File::from_std(data),
            })
        })
        .await
        .map_err(Error::task)
        .and_then(|r| r)
        .map_err(|e| e.into_io("building a snapshot"))
    }
}
