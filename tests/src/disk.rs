//! A simulated disk under each node of a [`FaultyCluster`](crate::harness::FaultyCluster): the
//! store's durability hook, which records what was durable when and holds the power switch
//! that a crash losing unsynced writes turns off.
//!
//! One [`Disk`] per node *life*: a restart gets a fresh one. It keeps the newest completed
//! [`DurableImage`] (by capture order), when it completed, and the newest acknowledgements the
//! store gave openraft (append callbacks, `save_vote` returns). [`Disk::cut_power`] is the
//! instant of the power loss: the store's durability points that had not completed by then
//! fail, so nothing acknowledged afterwards depends on them; the harness then kills the node and
//! calls [`exactly_store::lose_unsynced_writes`] on its directory with the image of the cut.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use exactly_store::raft_types::{LogId, Vote};
use exactly_store::{DurabilityHook, DurableImage, StoreOptions};

use crate::history::{now_us, Micros};

/// The disk faults of every node of a cluster.
#[derive(Clone, Debug, Default)]
pub struct DiskOptions {
    /// A slow disk: every append's fsync and callback wait this long after the write, so a
    /// crash that loses unsynced writes finds entries to drop (`StoreOptions::append_sync_delay`).
    pub append_sync_delay: Duration,
    /// The deliberately wrong store of the negative control: append callbacks without an
    /// fsync (`StoreOptions::acknowledge_before_sync`).
    pub acknowledge_before_sync: bool,
}

impl DiskOptions {
    /// The store options of one node life on `disk`.
    pub fn store_options(&self, disk: &Arc<Disk>) -> StoreOptions {
        StoreOptions {
            durability_hook: Some(disk.clone()),
            append_sync_delay: self.append_sync_delay,
            acknowledge_before_sync: self.acknowledge_before_sync,
            ..StoreOptions::default()
        }
    }
}

#[derive(Default)]
struct State {
    /// When the power went off.
    off_at: Option<Micros>,
    /// The newest completed image, and when it completed.
    durable: Option<(DurableImage, Micros)>,
    /// The last log id `append` wrote.
    written: Option<LogId>,
    /// The newest log id an append callback reported while no completed image covered it yet
    /// (a correct store never does this); cleared once an image covers it.
    acknowledged_early: Option<LogId>,
    /// Likewise for a vote `save_vote` returned.
    vote_early: Option<Vote>,
    acknowledgements: u64,
}

/// One node life's disk. See the module documentation.
#[derive(Default)]
pub struct Disk {
    state: Mutex<State>,
}

/// What a disk held when its power went off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PowerCut {
    pub at: Micros,
    /// The newest completed durability point's image, and when it completed.
    pub durable: Option<(DurableImage, Micros)>,
    /// Log entries an append callback had reported as on disk although no completed durability
    /// point covered them, and still none did when the power went off: the newest such log id.
    /// Always `None` for a correct store.
    pub acknowledged_not_durable: Option<LogId>,
    /// Likewise for the vote `save_vote` returned.
    pub vote_not_durable: Option<Vote>,
    /// Append callbacks in this life.
    pub acknowledgements: u64,
}

impl Disk {
    /// Turns the power off now and returns what was durable. Idempotent: a second cut reports
    /// the first one's instant.
    pub fn cut_power(&self) -> PowerCut {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let at = *s.off_at.get_or_insert_with(now_us);
        PowerCut {
            at,
            durable: s.durable.clone(),
            acknowledged_not_durable: s.acknowledged_early,
            vote_not_durable: s.vote_early,
            acknowledgements: s.acknowledgements,
        }
    }
}

impl Disk {
    /// Whether log entries were written that no completed durability point covers yet (while
    /// the power is on): a power cut now drops them.
    pub fn has_unsynced_entries(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.off_at.is_none() && s.written > s.image().and_then(|i| i.log_last)
    }
}

impl State {
    fn image(&self) -> Option<&DurableImage> {
        self.durable.as_ref().map(|(image, _)| image)
    }
}

impl DurabilityHook for Disk {
    fn powered(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .off_at
            .is_none()
    }

    fn completed(&self, image: DurableImage) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.off_at.is_some() {
            return false;
        }
        if s.image().is_none_or(|d| d.seq < image.seq) {
            // Log ids only grow in a log (a truncation is followed by entries of a later
            // term), so an image whose last log id is at least an acknowledged one covers it.
            if s.acknowledged_early <= image.log_last {
                s.acknowledged_early = None;
            }
            if s.vote_early <= image.vote {
                s.vote_early = None;
            }
            s.durable = Some((image, now_us()));
        }
        true
    }

    fn append_written(&self, last: LogId) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .written = Some(last);
    }

    fn append_acknowledged(&self, last: LogId) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.acknowledgements += 1;
        if s.image().and_then(|i| i.log_last) < Some(last) {
            s.acknowledged_early = s.acknowledged_early.max(Some(last));
        }
    }

    fn vote_saved(&self, vote: Vote) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.image().and_then(|i| i.vote) < Some(vote) {
            s.vote_early = Some(vote);
        }
    }
}
