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
//! moment this process applied the incarnation's last renewal or registration (even as a
//! follower), or from its election if it never applied one, and expires nothing before it has
//! applied an entry of its own term (see [`LeaseWatch::review`]). Every replica applies a
//! renewal after the node sent it, so this never counts from earlier than the node does.
//! Config validation checks the relation between these numbers (`LeaseConfig::validate`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use exactly_core::{Expiry, NodeLease, NodeRegistration, Proposal, Rejection, Renewal};

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
            let answer = self.ask(Proposal::register(registration)).await;
            match after_registration(answer) {
                AfterRegistration::Registered(requeued) => {
                    self.lease_acked(sent);
                    tracing::info!(
                        node = self.id,
                        incarnation = self.incarnation(),
                        requeued,
                        "registered"
                    );
                    return true;
                }
                AfterRegistration::Removed => {
                    self.departure.mark_removed();
                    return false;
                }
                AfterRegistration::Behind(why) => {
                    tracing::info!(%why, "registration refused until this node catches up");
                }
                AfterRegistration::Reincarnate(why) => {
                    tracing::error!(%why, "registration refused; taking a new incarnation");
                    if !self.reincarnate() {
                        return false;
                    }
                }
                AfterRegistration::Retry(e) => {
                    tracing::debug!(error = %e, "registration not yet possible")
                }
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
                self.fail(format!("cannot persist a new incarnation: {e}"));
                false
            }
        }
    }

    /// Renews this node's lease every `lease.renew-interval` for as long as the node runs. If the
    /// leader expired this incarnation, takes a new one and registers it.
    ///
    /// Renewals do not wait for each other: one is sent every interval (at most
    /// [`RENEWALS_IN_FLIGHT_MAX`] unanswered), each counting from its own send time. So a renewal
    /// stuck on a leader that died or froze does not hold up the next one, which goes to the new
    /// leader as soon as one is elected: a leader failover shorter than the self-fence time never
    /// fences a healthy node.
    pub async fn keep_lease(self, addr: String) {
        if !self.register(&addr).await {
            return;
        }
        let every = self.config.lease.renew_interval;
        // A renewal acknowledged after its own send time + self-fence-after extends nothing.
        let budget = self.config.lease.self_fence_after;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if self.departure.has_departed() {
                        return;
                    }
                    if in_flight.len() >= RENEWALS_IN_FLIGHT_MAX {
                        continue;
                    }
                    let renewal = Renewal {
                        lease: NodeLease {
                            node: self.id,
                            incarnation: self.incarnation(),
                        },
                        applied: self.state.last_applied().map_or(0, |l| l.index),
                    };
                    let node = self.clone();
                    in_flight.spawn(async move {
                        let sent = node.mono_ms();
                        let reply =
                            tokio::time::timeout(budget, node.ask(Proposal::renew(renewal))).await;
                        (sent, renewal.lease.incarnation, reply)
                    });
                }
                Some(done) = in_flight.join_next() => {
                    let Ok((sent, incarnation, reply)) = done else { continue };
                    match self.renewed(sent, incarnation, reply) {
                        Renewed::Go => {}
                        Renewed::Reincarnate => {
                            in_flight.abort_all();
                            if !self.reincarnate() || !self.register(&addr).await {
                                return;
                            }
                        }
                        Renewed::Stop => return,
                    }
                }
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Acts on the answer to one renewal of `incarnation` sent at `sent` (lease clock): what
    /// [`after_renewal`] decides, carried out.
    fn renewed(
        &self,
        sent: u64,
        incarnation: u64,
        reply: Result<
            Result<Result<(), Rejection>, crate::node::ProposeError>,
            tokio::time::error::Elapsed,
        >,
    ) -> Renewed {
        let answer = match reply {
            Ok(Ok(answer)) => RenewalAnswer::Committed(answer),
            Ok(Err(e)) => RenewalAnswer::Failed(e.to_string()),
            Err(_) => RenewalAnswer::TimedOut,
        };
        match after_renewal(self.incarnation(), incarnation, answer) {
            AfterRenewal::Extend => self.lease_acked(sent),
            AfterRenewal::Behind(why) => {
                tracing::warn!(%why, "renewal refused: this node is behind the log")
            }
            AfterRenewal::Refused(why) => tracing::warn!(%why, "renewal refused"),
            AfterRenewal::Unanswered(why) => tracing::debug!(%why, "renewal not acknowledged"),
            AfterRenewal::Ignore => {}
            AfterRenewal::Reincarnate(why) => {
                tracing::warn!(%why, "lease lost; registering a new incarnation");
                return Renewed::Reincarnate;
            }
            AfterRenewal::Removed => {
                self.departure.mark_removed();
                return Renewed::Stop;
            }
            AfterRenewal::Left => {
                self.departure.mark_left();
                return Renewed::Stop;
            }
        }
        Renewed::Go
    }
}

/// What the renewal loop does after one answer.
enum Renewed {
    Go,
    /// This incarnation's lease was expired: take a new incarnation and register it.
    Reincarnate,
    /// This node is out of the cluster.
    Stop,
}

/// What one registration's answer means for this node (pure; table-tested).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterRegistration {
    /// Registered: the lease runs from the send time (`requeued`: attempts of earlier
    /// incarnations given back).
    Registered(u32),
    /// This node id was removed from the cluster: it never registers again.
    Removed,
    /// Behind the log (catching up after a restart, or the cluster dials an old address of
    /// this node): try again once more of the log has arrived.
    Behind(Rejection),
    /// Refused for another reason (an expired or stale incarnation): take a new incarnation.
    Reincarnate(Rejection),
    /// Not committed: try again.
    Retry(String),
}

/// Decides what the answer to a registration means.
pub fn after_registration(
    answer: Result<Result<u32, Rejection>, crate::node::ProposeError>,
) -> AfterRegistration {
    match answer {
        Ok(Ok(requeued)) => AfterRegistration::Registered(requeued),
        Ok(Err(Rejection::Removed(_))) => AfterRegistration::Removed,
        Ok(Err(why @ Rejection::Lagging { .. })) => AfterRegistration::Behind(why),
        Ok(Err(why)) => AfterRegistration::Reincarnate(why),
        Err(e) => AfterRegistration::Retry(e.to_string()),
    }
}

/// How one renewal was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenewalAnswer {
    /// It committed, and apply accepted or refused it.
    Committed(Result<(), Rejection>),
    /// It could not be proposed (no leader, no quorum, shutting down).
    Failed(String),
    /// No answer within the self-fence time (an answer later than that extends nothing).
    TimedOut,
}

/// What one renewal's answer means for this node (pure; table-tested).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterRenewal {
    /// The lease runs `self-fence-after` from the renewal's send time.
    Extend,
    /// Refused because this node has not applied enough of the log (an old address in the
    /// membership, a one-way partition): the lease runs out and the work moves on; catching up
    /// restores it.
    Behind(Rejection),
    /// Refused for another reason: nothing changes.
    Refused(Rejection),
    /// Not committed: nothing changes; the next renewal tries again.
    Unanswered(String),
    /// The answer is for an incarnation this process has since replaced: it says nothing now.
    Ignore,
    /// This incarnation's lease was expired (or is stale): take a new incarnation, register it.
    Reincarnate(Rejection),
    /// This node was removed from the cluster: it stands down for good.
    Removed,
    /// This node's entry is gone (it left the cluster): it stops.
    Left,
}

/// Decides what the answer to a renewal sent by incarnation `sent_by` means, when this node's
/// incarnation is `current`.
pub fn after_renewal(current: u64, sent_by: u64, answer: RenewalAnswer) -> AfterRenewal {
    if sent_by != current {
        return AfterRenewal::Ignore;
    }
    match answer {
        RenewalAnswer::Committed(Ok(())) => AfterRenewal::Extend,
        RenewalAnswer::Committed(Err(why @ Rejection::Lagging { .. })) => AfterRenewal::Behind(why),
        RenewalAnswer::Committed(Err(
            why @ (Rejection::Expired { .. } | Rejection::StaleIncarnation { .. }),
        )) => AfterRenewal::Reincarnate(why),
        RenewalAnswer::Committed(Err(Rejection::Removed(_))) => AfterRenewal::Removed,
        // The entry of a registered node goes only when it has left the cluster.
        RenewalAnswer::Committed(Err(Rejection::UnknownNode(_))) => AfterRenewal::Left,
        RenewalAnswer::Committed(Err(why)) => AfterRenewal::Refused(why),
        RenewalAnswer::Failed(e) => AfterRenewal::Unanswered(e),
        RenewalAnswer::TimedOut => {
            AfterRenewal::Unanswered("not acknowledged within the self-fence time".into())
        }
    }
}

/// Renewals sent and not yet answered, at most (one per renew interval within the self-fence
/// time, rounded up; a renewal answered later than that extends nothing).
pub const RENEWALS_IN_FLIGHT_MAX: usize = 8;

/// When this replica applied each incarnation's newest renewal or registration: (its log index,
/// this process's monotonic clock). Filled by the apply hook (`Hooks::on_renewed`).
pub type Renewals = std::collections::HashMap<NodeLease, (u64, Instant)>;

/// The leader's view of its members' leases.
pub struct LeaseWatch {
    /// When this node became leader (the scheduler actor started): the expiry clock of a lease
    /// this process never saw renewed or registered starts here.
    leader_since: Instant,
    /// The log index this replica had applied then: a renewal at or below it was applied
    /// before `leader_since` (or came in a snapshot, which a leader never installs).
    applied_at_start: u64,
}

impl LeaseWatch {
    pub fn new(applied_at_start: u64) -> Self {
        Self {
            leader_since: Instant::now(),
            applied_at_start,
        }
    }

    /// Reads the table, then the renewals this replica applied (in that order, see
    /// [`review`]), and decides.
    pub fn review(
        &self,
        node: &Node,
        renewals: &std::sync::Mutex<Renewals>,
    ) -> (Vec<Expiry>, std::collections::BTreeSet<u64>) {
        let current: Vec<(NodeLease, u64)> = node.read(|t| {
            t.nodes()
                .iter()
                .filter(|(_, n)| !n.expired)
                .map(|(&id, n)| {
                    let lease = NodeLease {
                        node: id,
                        incarnation: n.incarnation,
                    };
                    (lease, n.renewed_index)
                })
                .collect()
        });
        let settled = node.applied_own_term();
        let renewed = renewals.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let inputs = ReviewInputs {
            now: Instant::now(),
            leader_since: self.leader_since,
            applied_at_start: self.applied_at_start,
            settled,
            expire_after: node.config.lease.expire_after,
            quiet_after: node.config.lease.renew_interval * QUIET_AFTER_RENEWALS,
        };
        review(&inputs, &current, &renewed)
    }
}

/// Everything [`review`] decides from besides the leases.
#[derive(Clone, Copy, Debug)]
pub struct ReviewInputs {
    pub now: Instant,
    pub leader_since: Instant,
    pub applied_at_start: u64,
    /// This leader has applied an entry of its own term.
    pub settled: bool,
    pub expire_after: Duration,
    pub quiet_after: Duration,
}

/// Incarnations whose lease lapsed on this leader's clock, each with the renewal its silence
/// was measured from, and nodes that should get no new work because no renewal of theirs
/// applied here for `quiet_after`. `current` holds each unexpired incarnation with the index of
/// its newest renewal as the table had it; `renewed` was read after the table.
///
/// Expiry counts from the moment *this process* applied the incarnation's newest renewal or
/// registration, even as a follower, and from its election for one it never saw applied.
/// That is safe (invariant 6) because the node counted that renewal from its *send* time,
/// which came before any replica applied it; and complete because nothing is expired before
/// this leader has applied an entry of its own term, by which point it has applied every
/// renewal any earlier leader committed (they precede that entry in its log). So a dead
/// leader's jobs move as soon as a dead follower's would, not a full lease period after the
/// election.
///
/// The [`Expiry`] names the renewal counted from, and the state machine refuses it if a later
/// one was accepted before the expiry's entry: a renewal committed while this leader had not
/// yet applied it (chaos seed 35 ran a job twice that way). A renewal the table shows but whose
/// apply time this process has not recorded yet (the hook runs just after the apply) counts as
/// just made.
pub fn review(
    inputs: &ReviewInputs,
    current: &[(NodeLease, u64)],
    renewed: &Renewals,
) -> (Vec<Expiry>, std::collections::BTreeSet<u64>) {
    let mut expire = Vec::new();
    let mut quiet = std::collections::BTreeSet::new();
    for &(lease, table_index) in current {
        let (counted_from, last) = match renewed.get(&lease) {
            Some(&(index, at)) if index >= table_index => (index, at),
            None if table_index <= inputs.applied_at_start => (table_index, inputs.leader_since),
            // Applied after the table was read is covered above; here the table has a renewal
            // this process applied but whose time the hook has not recorded yet.
            _ => continue,
        };
        let silent = inputs.now.saturating_duration_since(last);
        if inputs.settled && silent > inputs.expire_after {
            expire.push(Expiry {
                lease,
                renewed_index: counted_from,
            });
        }
        if silent > inputs.quiet_after {
            quiet.insert(lease.node);
        }
    }
    (expire, quiet)
}

/// How often the executor checks its lease (re-exported for the executor).
pub const CHECK_INTERVAL: Duration = LEASE_CHECK_INTERVAL;

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRE: Duration = Duration::from_millis(3_000);
    const QUIET: Duration = Duration::from_millis(1_500);

    fn lease(node: u64, incarnation: u64) -> NodeLease {
        NodeLease { node, incarnation }
    }

    fn inputs(start: Instant, elapsed_ms: u64, applied_at_start: u64) -> ReviewInputs {
        ReviewInputs {
            now: start + Duration::from_millis(elapsed_ms),
            leader_since: start,
            applied_at_start,
            settled: true,
            expire_after: EXPIRE,
            quiet_after: QUIET,
        }
    }

    /// The silence is measured from the renewal this process applied, and the expiry names it.
    fn expired() -> Rejection {
        Rejection::Expired {
            node: 2,
            incarnation: 5,
        }
    }

    fn lagging() -> Rejection {
        Rejection::Lagging {
            node: 2,
            applied: 10,
            needed: 20,
        }
    }

    /// Every answer to a renewal maps to what the node does: only a committed, accepted
    /// renewal of the current incarnation extends the lease; a lost lease takes a new
    /// incarnation; removal and departure stop the node; everything else changes nothing.
    #[test]
    fn each_renewal_answer_takes_its_step() {
        let (expired, lagging) = (expired(), lagging());
        let stale = Rejection::StaleIncarnation {
            node: 2,
            got: 4,
            current: 5,
        };
        let cases = [
            (5, RenewalAnswer::Committed(Ok(())), AfterRenewal::Extend),
            (4, RenewalAnswer::Committed(Ok(())), AfterRenewal::Ignore),
            (
                4,
                RenewalAnswer::Committed(Err(expired.clone())),
                AfterRenewal::Ignore,
            ),
            (
                5,
                RenewalAnswer::Committed(Err(lagging.clone())),
                AfterRenewal::Behind(lagging),
            ),
            (
                5,
                RenewalAnswer::Committed(Err(expired.clone())),
                AfterRenewal::Reincarnate(expired),
            ),
            (
                5,
                RenewalAnswer::Committed(Err(stale.clone())),
                AfterRenewal::Reincarnate(stale),
            ),
            (
                5,
                RenewalAnswer::Committed(Err(Rejection::Removed(2))),
                AfterRenewal::Removed,
            ),
            (
                5,
                RenewalAnswer::Committed(Err(Rejection::UnknownNode(2))),
                AfterRenewal::Left,
            ),
            (
                5,
                RenewalAnswer::Committed(Err(Rejection::Draining(2))),
                AfterRenewal::Refused(Rejection::Draining(2)),
            ),
            (
                5,
                RenewalAnswer::Failed("no leader".into()),
                AfterRenewal::Unanswered("no leader".into()),
            ),
        ];
        for (sent_by, answer, expected) in cases {
            assert_eq!(
                after_renewal(5, sent_by, answer.clone()),
                expected,
                "{answer:?} sent by incarnation {sent_by}"
            );
        }
        assert!(matches!(
            after_renewal(5, 5, RenewalAnswer::TimedOut),
            AfterRenewal::Unanswered(_)
        ));
    }

    /// Every answer to a registration maps to what the node does.
    #[test]
    fn each_registration_answer_takes_its_step() {
        let (expired, lagging) = (expired(), lagging());
        let timeout = crate::node::ProposeError::Timeout(Duration::from_secs(5));
        let cases = [
            (Ok(Ok(3)), AfterRegistration::Registered(3)),
            (Ok(Err(Rejection::Removed(2))), AfterRegistration::Removed),
            (Ok(Err(lagging.clone())), AfterRegistration::Behind(lagging)),
            (
                Ok(Err(expired.clone())),
                AfterRegistration::Reincarnate(expired),
            ),
            (
                Err(timeout.clone()),
                AfterRegistration::Retry(timeout.to_string()),
            ),
        ];
        for (answer, expected) in cases {
            assert_eq!(after_registration(answer.clone()), expected, "{answer:?}");
        }
    }

    #[test]
    fn silence_counts_from_the_applied_renewal_and_the_expiry_names_it() {
        let start = Instant::now();
        let renewed: Renewals = [(lease(1, 1), (40, start + Duration::from_millis(500)))].into();
        let current = [(lease(1, 1), 40)];
        let (expire, quiet) = review(&inputs(start, 2_000, 10), &current, &renewed);
        assert!(expire.is_empty());
        assert!(
            quiet.is_empty(),
            "silent 1.5 s is not more than quiet-after"
        );
        let (expire, quiet) = review(&inputs(start, 2_100, 10), &current, &renewed);
        assert!(expire.is_empty());
        assert_eq!(quiet, [1].into());
        let (expire, _) = review(&inputs(start, 3_501, 10), &current, &renewed);
        assert_eq!(
            expire,
            vec![Expiry {
                lease: lease(1, 1),
                renewed_index: 40
            }]
        );
    }

    /// Nothing expires before the leader applied an entry of its own term.
    #[test]
    fn an_unsettled_leader_expires_nothing() {
        let start = Instant::now();
        let renewed: Renewals = [(lease(1, 1), (40, start))].into();
        let mut at = inputs(start, 10_000, 10);
        at.settled = false;
        let (expire, quiet) = review(&at, &[(lease(1, 1), 40)], &renewed);
        assert!(expire.is_empty());
        assert_eq!(quiet, [1].into(), "quiet is only a hint: it does not wait");
    }

    /// An incarnation renewed before this leader's time (applied before it led, or loaded from a
    /// snapshot) is counted from the election.
    #[test]
    fn a_renewal_from_before_the_election_counts_from_the_election() {
        let start = Instant::now();
        let current = [(lease(2, 5), 9)];
        let none = Renewals::new();
        assert!(review(&inputs(start, 3_000, 10), &current, &none)
            .0
            .is_empty());
        assert_eq!(
            review(&inputs(start, 3_001, 10), &current, &none).0,
            vec![Expiry {
                lease: lease(2, 5),
                renewed_index: 9
            }]
        );
    }

    /// A renewal the table holds but whose apply this process has not yet recorded (the hook
    /// runs just after the apply) is not silence: counting it from the election or from an older
    /// renewal would expire a lease its node just renewed.
    #[test]
    fn a_renewal_not_yet_recorded_is_not_silence() {
        let start = Instant::now();
        let current = [(lease(1, 1), 50)];
        let older: Renewals = [(lease(1, 1), (40, start))].into();
        let at = inputs(start, 60_000, 10);
        assert_eq!(review(&at, &current, &older), (vec![], [].into()));
        let none = Renewals::new();
        assert_eq!(review(&at, &current, &none), (vec![], [].into()));
    }

    /// The renewals map may be newer than the table read before it: the newer renewal counts.
    #[test]
    fn a_renewal_recorded_after_the_table_read_counts() {
        let start = Instant::now();
        let renewed: Renewals = [(lease(1, 1), (60, start + Duration::from_millis(4_000)))].into();
        let at = inputs(start, 7_001, 10);
        assert_eq!(
            review(&at, &[(lease(1, 1), 50)], &renewed).0,
            vec![Expiry {
                lease: lease(1, 1),
                renewed_index: 60
            }]
        );
        assert!(
            review(&inputs(start, 6_000, 10), &[(lease(1, 1), 50)], &renewed)
                .0
                .is_empty()
        );
    }

    /// A recorded renewal of another incarnation says nothing about this one.
    #[test]
    fn another_incarnations_renewal_does_not_count() {
        let start = Instant::now();
        let renewed: Renewals = [(lease(1, 1), (40, start + Duration::from_secs(60)))].into();
        let (expire, _) = review(&inputs(start, 3_001, 45), &[(lease(1, 2), 45)], &renewed);
        assert_eq!(
            expire,
            vec![Expiry {
                lease: lease(1, 2),
                renewed_index: 45
            }]
        );
    }
}
