//! [`StateMachine`]: the job table in memory, fed by committed entries, with snapshots.
//!
//! The table lives in memory behind a `std::sync::RwLock`; payloads live next to it in the
//! `payloads` tree. Apply needs no durability point of its own: the log it applies is durable,
//! openraft re-applies everything after the last snapshot at start-up, and every effect on the
//! payloads tree is idempotent (insert the same bytes again, remove again).
//!
//! **Invariant:** a reader never sees a job whose payload is not yet readable: apply writes the
//! payloads while it still holds the table's write lock, and calls the observer after both.

use std::io::{self, Seek, SeekFrom, Write};
use std::sync::{Arc, PoisonError, RwLock};

use exactly_core::{Effect, JobEvent, JobTable, NodeLease, Response, StartAttempt};
use futures::TryStreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{OptionalSend, RaftSnapshotBuilder};

use crate::codec::{encode, encode_raw, u64_key};
use crate::error::{Error, Result};
use crate::raft_types::{Entry, EntryPayload, LogId, Snapshot, StoredMembership};
use crate::snapshot::{self, Meta};
use crate::store::Store;
use crate::{IssuedTokens, Observer, TypeConfig};

/// What has been applied: the job table, and the Raft bookkeeping that goes with it.
struct Applied {
    table: JobTable,
    last_applied: Option<LogId>,
    membership: StoredMembership,
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
    /// Loads the persisted snapshot, if any (see [`Store::state_machine`]).
    pub(crate) fn load(store: Store, observer: Observer) -> Result<Self> {
        let applied = match store.read_snapshot()? {
            Some((meta, data)) => {
                // The archive tree holds this snapshot's finished records (it is never older
                // than the persisted snapshot), unless the snapshot is of the earlier format.
                let body = snapshot::decode_body_from(data, snapshot::Records::Skip)?;
                if body.legacy {
                    store.archive_records(&body.archived)?;
                }
                tracing::info!(snapshot = %meta, "state machine loaded from the snapshot");
                Applied {
                    table: body.table,
                    last_applied: meta.last_log_id,
                    membership: meta.last_membership,
                }
            }
            None => Applied {
                table: JobTable::new(),
                last_applied: None,
                membership: StoredMembership::default(),
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
    pub fn read<T>(&self, f: impl FnOnce(&JobTable) -> T) -> T {
        // Only a panic inside apply poisons the lock, and apply then fails every later call,
        // which stops the Raft node; readers may still look at the table meanwhile.
        let applied = self.shared.read().unwrap_or_else(PoisonError::into_inner);
        f(&applied.table)
    }

    /// Read access to the job table and the archived records of its finished jobs, consistent
    /// with each other (apply writes the archive under the same lock): for reads that may meet
    /// a succeeded or cancelled job. Keep `f` short, as for [`StateMachine::read`].
    pub fn read_jobs<T>(&self, f: impl FnOnce(&JobTable, &Archive<'_>) -> T) -> T {
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
            Some(job) => Ok(Some(job.clone())),
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

    /// The log id of the last applied entry (or of the loaded or installed snapshot).
    pub fn last_applied(&self) -> Option<LogId> {
        self.shared
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .last_applied
    }
}

/// A write to the payloads or archive tree: (tree, key, value, or `None` to remove).
type TreeOp<'a> = (&'a sled::Tree, [u8; 8], Option<Vec<u8>>);

/// Applies `entries` to the table and their payload effects to sled, under the write lock.
/// Returns the responses and the attempt starts that are still current after the whole batch.
fn apply_blocking(store: &Store, shared: &RwLock<Applied>, entries: Vec<Entry>) -> Result<Applies> {
    let mut applied = shared.write().map_err(|_| Error::Poisoned)?;
    let mut tree_ops: Vec<TreeOp<'_>> = Vec::new();
    let (payloads, archive) = (&store.inner.payloads, &store.inner.archive);
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
                            tree_ops.push((payloads, u64_key(job), Some(encode_raw(&payload))));
                        }
                        Effect::DropPayload { job } => {
                            tree_ops.push((payloads, u64_key(job), None))
                        }
                        Effect::Archive(job) => {
                            let record = encode("archived job", &job)?;
                            tree_ops.push((archive, u64_key(job.id), Some(record)));
                        }
                        Effect::Unarchive { job } => tree_ops.push((archive, u64_key(job), None)),
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
    // In order, so that a later drop of the same job wins. One operation each, not a
    // `sled::Batch` (which rolls sled's IO buffer twice, see `log_store::write_entries`):
    // nothing needs them atomic, as a restart re-applies the log from a snapshot (which carries
    // the payloads and archived records of its point) and rewrites them.
    for (tree, key, value) in tree_ops {
        match value {
            Some(v) => tree.insert(key, v).map(drop),
            None => tree.remove(key).map(drop),
        }
        .map_err(|e| Error::sled("writing payloads and archived jobs", e))?;
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

/// The archived records of finished jobs, as seen under [`StateMachine::read_jobs`].
pub struct Archive<'a> {
    store: &'a Store,
}

impl Archive<'_> {
    /// The record of a job that `table` lists as finished (`None` for any other, and for a
    /// finished job whose record a snapshot did not carry: see [`Store::archived`]).
    pub fn finished(
        &self,
        table: &JobTable,
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
    table: &'a JobTable,
    archive: Archive<'a>,
}

impl std::ops::Deref for JobView<'_> {
    type Target = JobTable;

    fn deref(&self) -> &JobTable {
        self.table
    }
}

impl JobView<'_> {
    /// A retained job's record (a copy), from the table or, if it finished, the archive.
    pub fn job(&self, id: exactly_core::JobId) -> Option<exactly_core::Job> {
        if let Some(job) = self.table.job(id) {
            return Some(job.clone());
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
            table: self.table.clone(),
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

    /// Takes a consistent copy (table, last applied, membership) under the read lock, so that
    /// applies may go on while the snapshot is built. Costs a clone of the table.
    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        let applied = self.shared.read().unwrap_or_else(PoisonError::into_inner);
        SnapshotBuilder {
            store: self.store.clone(),
            table: Arc::new(applied.table.clone()),
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
            rewind(&mut data)?;
            let (body, _) = store.rebuild_trees_from(Some(&mut data))?;
            let table = body.expect("a snapshot was given").table;
            store.finish_payloads_rebuild()?;
            let tokens = table.issued_tokens().clone();
            *applied = Applied {
                table,
                last_applied: meta.last_log_id,
                membership: meta.last_membership,
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

/// A consistent copy of the state machine, taken by
/// [`RaftStateMachine::get_snapshot_builder`], that becomes a snapshot.
pub struct SnapshotBuilder {
    store: Store,
    table: Arc<JobTable>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = tokio::fs::File;

    /// Serializes the copy and the payloads of its pending and running jobs (a payload already
    /// dropped because the job finished after the copy was taken is skipped: the log after the
    /// snapshot finishes that job again), persists it unless a newer snapshot was installed
    /// meanwhile, and returns it.
    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let store = self.store.clone();
        let table = self.table.clone();
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
        };
        tokio::task::spawn_blocking(move || -> Result<Snapshot> {
            let mut payloads = Vec::new();
            for job in table.jobs().filter(|j| !j.status.is_terminal()) {
                if let Some(payload) = store.payload(job.id)? {
                    payloads.push((job.id, payload));
                }
            }
            let label = meta.last_log_id.map_or(0, |l| l.index);
            let path = store.write_snapshot_data(label, |f| {
                snapshot::encode_body_to(&table, &payloads, |id| store.archived_raw(id), f)
            })?;
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
