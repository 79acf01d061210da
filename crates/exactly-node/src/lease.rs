//! Node leases: the node side (renewing, and knowing when to stop) and the leader side
//! (expiring a node whose renewals stopped).
//!
//! **Invariant 4:** a node runs attempts only while `now < lease_until`, where `lease_until` is
//! the *send* time of its last acknowledged renewal (or registration) plus
//! `lease.self-fence-after`. The executor checks it every [`LEASE_CHECK_INTERVAL`] and, once it
//! lapses, cancels every attempt and kills what has not stopped after `lease.kill-grace`.
//!
//! **Invariant 5:** a renewal counts only once committed through the log (a deposed leader
//! cannot commit), and the node counts it only when the commit is acknowledged to it. It is
//! refused (on every replica alike) unless the node has applied the log up to what was committed
//! `RENEW_APPLY_LAG_MAX_MS` before: a node that reaches the leader but gets no log from it must
//! not hold work it never learns about (`exactly_core::Renewal`).
//!
//! **Invariant 6:** the leader measures `lease.expire-after` on its own monotonic clock from the
//! later of (a) the moment it applied the node's last renewal and (b) the moment it became
//! leader (or first saw that incarnation), so a new leader always waits a full lease period.
//! Config validation checks the relation between these numbers (`LeaseConfig::validate`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use exactly_core::{Command, NodeLease, NodeRegistration, Rejection, Renewal, Response};

use crate::config::LEASE_CHECK_INTERVAL;
use crate::node::Node;

/// Renew intervals without an applied renewal after which the scheduler stops assigning to a
/// node (a liveness hint; the lease decides safety).
pub const QUIET_AFTER_RENEWALS: u32 = 3;
/// Pause between attempts to register after a failure.
const REGISTER_RETRY: Duration = Duration::from_millis(300);

impl Node {
    /// Whether this node may run attempts now.
    pub fn lease_valid(&self) -> bool {
        self.mono_ms() < self.lease_until_ms.load(Ordering::Acquire)
    }

    /// Records that a renewal (or registration) sent at `sent_ms` (the lease clock,
    /// [`Node::mono_ms`]) was acknowledged as committed.
    fn lease_acked(&self, sent_ms: u64) {
        let until = sent_ms + self.config.lease.self_fence_after.as_millis() as u64;
        self.lease_until_ms.fetch_max(until, Ordering::AcqRel);
        self.lease_deadline.send_if_modified(|d| {
            let moved = until > *d;
            *d = (*d).max(until);
            moved
        });
    }

    /// Registers the current incarnation until the registration commits (or shutdown), and
    /// takes the first lease from it.
    pub async fn register(&self, addr: &str) -> bool {
        loop {
            if self.shutdown.is_cancelled() || self.departure.has_departed() {
                return false;
            }
            let registration = NodeRegistration {
                node: self.id,
                incarnation: self.incarnation(),
                slots: self.config.slots,
                addr: addr.to_string(),
                applied: self.state.last_applied().map_or(0, |l| l.index),
            };
            let sent = self.mono_ms();
            match self.propose(Command::RegisterNode(registration)).await {
                Ok(Response::NodeRegistered(Ok(requeued))) => {
                    self.lease_acked(sent);
                    tracing::info!(
                        node = self.id,
                        incarnation = self.incarnation(),
                        requeued,
                        "registered"
                    );
                    return true;
                }
                Ok(Response::NodeRegistered(Err(Rejection::Removed(_)))) => {
                    self.departure.mark_removed();
                    return false;
                }
                // Behind the log (catching up after a restart, or the cluster dials an old
                // address of this node): try again once more of the log has arrived.
                Ok(Response::NodeRegistered(Err(why @ Rejection::Lagging { .. }))) => {
                    tracing::info!(%why, "registration refused until this node catches up");
                }
                Ok(Response::NodeRegistered(Err(why))) => {
                    tracing::error!(%why, "registration refused; taking a new incarnation");
                    if !self.reincarnate() {
                        return false;
                    }
                }
                Ok(other) => tracing::error!(?other, "unexpected response to registration"),
                Err(e) => tracing::debug!(error = %e, "registration not yet possible"),
            }
            tokio::time::sleep(REGISTER_RETRY).await;
        }
    }

    /// Takes a new, durable incarnation (the previous one was expired by the leader).
    fn reincarnate(&self) -> bool {
        match self.store.next_incarnation() {
            Ok(next) => {
                self.incarnation.store(next, Ordering::Release);
                tracing::warn!(node = self.id, incarnation = next, "new incarnation");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot persist a new incarnation; stopping");
                self.shutdown.cancel();
                false
            }
        }
    }

    /// Renews this node's lease every `lease.renew-interval` for as long as the node runs. If the
    /// leader expired this incarnation, takes a new one and registers it.
    pub async fn keep_lease(self, addr: String) {
        if !self.register(&addr).await {
            return;
        }
        let every = self.config.lease.renew_interval;
        let budget = self.config.lease.self_fence_after;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.shutdown.cancelled() => return,
            }
            if self.departure.has_departed() {
                return;
            }
            let renewal = Renewal {
                lease: NodeLease {
                    node: self.id,
                    incarnation: self.incarnation(),
                },
                applied: self.state.last_applied().map_or(0, |l| l.index),
            };
            let sent = self.mono_ms();
            match tokio::time::timeout(budget, self.propose(Command::Renew(renewal))).await {
                Ok(Ok(Response::Renewed(Ok(())))) => self.lease_acked(sent),
                // Not receiving the log (an old address in the membership, a one-way partition):
                // the lease runs out and the work moves on; catching up restores it.
                Ok(Ok(Response::Renewed(Err(why @ Rejection::Lagging { .. })))) => {
                    tracing::warn!(%why, "renewal refused: this node is behind the log");
                }
                Ok(Ok(Response::Renewed(Err(
                    why @ (Rejection::Expired { .. } | Rejection::StaleIncarnation { .. }),
                )))) => {
                    tracing::warn!(%why, "lease lost; registering a new incarnation");
                    if !self.reincarnate() || !self.register(&addr).await {
                        return;
                    }
                }
                Ok(Ok(Response::Renewed(Err(Rejection::Removed(_))))) => {
                    self.departure.mark_removed();
                    return;
                }
                // The entry of a registered node goes only when it has left the cluster.
                Ok(Ok(Response::Renewed(Err(Rejection::UnknownNode(_))))) => {
                    self.departure.mark_left();
                    return;
                }
                Ok(Ok(other)) => tracing::error!(?other, "unexpected response to a renewal"),
                Ok(Err(e)) => tracing::debug!(error = %e, "renewal failed"),
                Err(_) => tracing::debug!("renewal timed out"),
            }
        }
    }
}

/// The leader's view of its members' leases.
pub struct LeaseWatch {
    /// When this node became leader (the scheduler actor started).
    leader_since: Instant,
    /// When this leader first saw each incarnation registered.
    first_seen: std::collections::HashMap<NodeLease, Instant>,
}

impl LeaseWatch {
    pub fn new() -> Self {
        Self {
            leader_since: Instant::now(),
            first_seen: Default::default(),
        }
    }

    /// Incarnations whose lease lapsed on this leader's clock, and nodes that should get no new
    /// work because no renewal of theirs applied here for [`QUIET_AFTER_RENEWALS`] renew
    /// intervals. Expiry (safety) counts from no earlier than this leader's election; the quiet
    /// set (only a scheduling hint) uses the renewals this node applied even as a follower, so
    /// a new leader stops assigning to a dead predecessor at once.
    pub fn review(
        &mut self,
        node: &Node,
        renewed: &std::collections::HashMap<NodeLease, Instant>,
    ) -> (Vec<NodeLease>, std::collections::BTreeSet<u64>) {
        let now = Instant::now();
        let lease = &node.config.lease;
        let current: Vec<NodeLease> = node.read(|t| {
            t.nodes()
                .iter()
                .filter(|(_, n)| !n.expired)
                .map(|(&id, n)| NodeLease {
                    node: id,
                    incarnation: n.incarnation,
                })
                .collect()
        });
        self.first_seen.retain(|l, _| current.contains(l));
        let mut expire = Vec::new();
        let mut quiet = std::collections::BTreeSet::new();
        for l in current {
            let seen = *self.first_seen.entry(l).or_insert(now);
            let mut last = self.leader_since.max(seen);
            if let Some(&at) = renewed.get(&l) {
                last = last.max(at);
            }
            let silent = now.saturating_duration_since(last);
            if silent > lease.expire_after {
                expire.push(l);
            }
            let heard = renewed.get(&l).copied().unwrap_or(seen);
            if now.saturating_duration_since(heard) > lease.renew_interval * QUIET_AFTER_RENEWALS {
                quiet.insert(l.node);
            }
        }
        (expire, quiet)
    }
}

impl Default for LeaseWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// How often the executor checks its lease (re-exported for the executor).
pub const CHECK_INTERVAL: Duration = LEASE_CHECK_INTERVAL;
