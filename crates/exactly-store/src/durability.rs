//! The fault-injection seam at the durability points: what a test needs to simulate a power
//! loss faithfully without reaching into sled's files.
//!
//! Production stores pass [`StoreOptions::default`]: no hook, no delay, every durability point
//! a real fsync and nothing else. A test installs a [`DurabilityHook`] and may turn on two
//! faults:
//! - **What was durable when.** Each durability point captures a [`DurableImage`] (last log id,
//!   vote, committed log id) *before* its flush starts, so everything the image names was
//!   written before the flush, and hands it to the hook once its fsync returned.
//! - **Cutting the power.** The hook says whether the disk has power. A durability point on a
//!   disk without power fails like an fsync on a dead device (and, as after any failed fsync,
//!   the store refuses every later one), and a point whose fsync returned only after the power
//!   went off did not complete either: the hook decides both under one lock, so the instant
//!   the power goes off splits the points cleanly into durable and not.
//! - **Writes and acknowledgements.** The hook hears when `append` has written entries (so a
//!   test can cut the power while some are unsynced), and of every append callback and every
//!   `save_vote` return, so it can check them against the images (openraft's contract: an
//!   acknowledged entry or vote is on disk).
//! - `append_sync_delay` (a slow disk) holds each append's fsync and callback for a while, so a
//!   crash really finds unsynced entries; `acknowledge_before_sync` is a deliberately *wrong*
//!   store for negative controls (callback at once, no fsync of its own).
//!
//! After the node is gone, [`lose_unsynced_writes`] turns its data directory into what the
//! power loss left: see there for what it drops and why that models a power loss.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::raft_types::{LogId, Vote};

use crate::error::{Error, Result};
use crate::store::{Store, META_COMMITTED, META_VOTE};

/// What one completed durability point made durable (at least), captured just before its flush
/// started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurableImage {
    /// Capture order within one store: an image with a larger `seq` was captured later, so its
    /// point covers everything an earlier one covered. Concurrent points may complete out of
    /// order; the newest completed image is the one that counts.
    pub seq: u64,
    /// The last log id: of the last entry, or the last purged one if that is later.
    pub log_last: Option<LogId>,
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
}

impl fmt::Display for DurableImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |l: &Option<LogId>| l.map_or("none".to_string(), |l| l.to_string());
        write!(
            f,
            "log up to {}, vote {}, committed {}",
            show(&self.log_last),
            self.vote.map_or("none".to_string(), |v| v.to_string()),
            show(&self.committed)
        )
    }
}

/// Watches (and may fail) the durability points of one store. Test-only: production stores
/// have none. Called from blocking threads; implementations must be quick.
pub trait DurabilityHook: Send + Sync + 'static {
    /// Whether the disk has power. Asked before a durability point starts: without power it
    /// fails at once and touches nothing.
    fn powered(&self) -> bool;
    /// A durability point's fsync returned; `image` is what it made durable. Returns `false`
    /// if the power went off first: then the point did not complete and the store fails it.
    /// Must be atomic with cutting the power.
    fn completed(&self, image: DurableImage) -> bool;
    /// `append` wrote the entries up to `last`; they are not durable before the next
    /// durability point completes.
    fn append_written(&self, _last: LogId) {}
    /// openraft's append callback is about to report the entries up to `last` as on disk.
    fn append_acknowledged(&self, last: LogId);
    /// `save_vote` is about to return for `vote`.
    fn vote_saved(&self, vote: Vote);
}

/// Shared handle to a hook.
pub type DurabilityHookHandle = Arc<dyn DurabilityHook>;

/// How a [`Store`] is opened besides its directory. The default is what production runs: real
/// fsyncs, no hook, no delay.
#[derive(Clone, Default)]
pub struct StoreOptions {
    /// Test-only: watches every durability point and can cut the power.
    pub durability_hook: Option<DurabilityHookHandle>,
    /// Test-only fault, a slow disk: every `append` holds its fsync and its flushed-callback
    /// this long after writing the entries (the log flusher waits; the Raft core goes on, and
    /// the entries count for this node's quorum only once the callback came).
    pub append_sync_delay: Duration,
    /// **Wrong on purpose**, for negative controls only: `append` calls the flushed-callback as
    /// soon as the entries are written and passes no durability point, the mistake of
    /// openraft 0.9's rocksdb example; its entries become durable only with the next durability
    /// point of another operation (a vote, a snapshot, a purge). Breaks invariant 1.
    pub acknowledge_before_sync: bool,
    /// Where the job table's records live (the node's `table-storage`; not a test seam).
    pub table: crate::TableStorage,
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreOptions")
            .field("durability_hook", &self.durability_hook.is_some())
            .field("append_sync_delay", &self.append_sync_delay)
            .field("acknowledge_before_sync", &self.acknowledge_before_sync)
            .field("table", &self.table)
            .finish()
    }
}

/// What [`lose_unsynced_writes`] dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LostWrites {
    /// The last log id found in the directory before the roll-back.
    pub log_last_found: Option<LogId>,
    /// Log entries removed: written, but after the last durable image.
    pub log_entries: u64,
    /// The vote found, if it differed from the durable one (which replaced it).
    pub vote_found: Option<Option<Vote>>,
    /// The committed log id found, if it differed from the durable one (which replaced it).
    pub committed_found: Option<Option<LogId>>,
    /// Payloads before and after the payloads tree was reset to the snapshot's.
    pub payloads_found: u64,
    pub payloads_kept: u64,
    /// Archived records before and after the archive tree was reset to the snapshot's.
    pub archived_found: u64,
    pub archived_kept: u64,
}

impl fmt::Display for LostWrites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} log entries", self.log_entries)?;
        if let Some(vote) = &self.vote_found {
            let vote = vote.map_or("none".to_string(), |v| v.to_string());
            write!(f, ", the vote {vote}")?;
        }
        if let Some(c) = &self.committed_found {
            let c = c.map_or("none".to_string(), |c| c.to_string());
            write!(f, ", committed {c}")?;
        }
        write!(
            f,
            ", payloads {} -> {}, archived jobs {} -> {}",
            self.payloads_found, self.payloads_kept, self.archived_found, self.archived_kept
        )
    }
}

/// Turns the data directory `dir` of a node that is gone (its power cut while `image` was the
/// last completed durability point) into what a power loss leaves. Blocking.
///
/// - The log loses every entry after `image.log_last`. Entries at or below it are unchanged: a
///   later truncate or purge had to pass a durability point before anything was appended over
///   it, so the only change below can be a removal whose own point never completed, and removed
///   entries cannot be brought back (a power loss that kept such a removal also kept every
///   write before it: sled's log is ordered).
/// - The vote and the committed log id go back to the image's.
/// - The state machine's on-disk part, its state tree and the payloads tree, goes back to the
///   persisted snapshot's (the state is rebuilt from the snapshot when the node loads it),
///   like an interrupted snapshot install. That is more than a power loss
///   drops (it keeps payload writes before the last durability point), and exactly what
///   openraft allows a state machine to lose: everything applied after its snapshot, which it
///   applies again from the log. The snapshot is its own durability point (its data file
///   fsynced, then its pointer written to a temporary name, fsynced, renamed, directory
///   fsynced) and is kept as found.
/// - The node id and the incarnation counter are kept: each is durable before it is used.
pub fn lose_unsynced_writes(dir: &Path, image: &DurableImage) -> Result<LostWrites> {
    let store = Store::open(dir)?;
    let mut lost = LostWrites {
        log_last_found: store.log_last()?,
        ..LostWrites::default()
    };
    if let Some(last) = image.log_last {
        if let Some(entry) = store.log_entry_id(last.index)? {
            if entry != last {
                return Err(Error::corrupt(
                    "log below the last durable point",
                    format!("entry {entry} where the durable image has {last}"),
                ));
            }
        }
    }
    let keep_upto = image.log_last.map_or(0, |l| l.index);
    lost.log_entries = store.remove_log_from(keep_upto + 1)? as u64;

    let vote = store.meta_get(META_VOTE, "vote")?;
    if vote != image.vote {
        lost.vote_found = Some(vote);
        match &image.vote {
            Some(v) => store.meta_put(META_VOTE, "vote", v)?,
            None => store.meta_remove(META_VOTE)?,
        }
    }
    let committed = store
        .meta_get::<Option<LogId>>(META_COMMITTED, "committed log id")?
        .flatten();
    if committed != image.committed {
        lost.committed_found = Some(committed);
        store.meta_put(META_COMMITTED, "committed log id", &image.committed)?;
    }

    lost.payloads_found = store.payload_count()?;
    lost.archived_found = store.archived_count()?;
    store.begin_payloads_rebuild()?;
    let data = store.read_snapshot()?.map(|(_, data)| data);
    let (body, archived) = store.rebuild_trees_from(data)?;
    lost.payloads_kept = body.map_or(0, |b| b.payloads.len() as u64);
    lost.archived_kept = archived;
    store.forget_state()?;
    store.finish_payloads_rebuild()?;
    Ok(lost)
}
