//! The scheduler: an actor that exists only while this node is the Raft leader.
//!
//! It holds no truth of its own. On each wake-up it asks the pure policy
//! ([`exactly_core::plan_assignments`]) for a batch from the current state and proposes it as one
//! Assign command; while that proposal is in flight it plans nothing else, so it never proposes
//! the same job twice from a stale view (and apply would refuse it anyway). A new leader starts a
//! fresh scheduler that rebuilds everything from the state machine.
//!
//! Besides assignments it does the leader's housekeeping, one proposal at a time: firing due
//! cron ticks (each tick at most once: apply fires only the schedule's current next tick, and
//! with it every tick that came due since, within the late grace, each its own job) and the
//! retention pass that deletes what is past its configured age.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use exactly_core::limits::{ASSIGN_BATCH_MAX, FIRE_BATCH_MAX, RETAIN_BATCH_MAX};
use exactly_core::schedule::Fire;
use exactly_core::{plan_assignments, Command, NodeLease, Retention};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::hooks::Hooks;
use crate::lease::LeaseWatch;
use crate::node::{wall_ms, ForwardReply, Node};

/// How often the scheduler looks even without a wake-up (delayed jobs become due by time alone).
pub const SCHEDULER_TICK: Duration = Duration::from_millis(100);
/// A member that has not answered the leader's heartbeats for this many heartbeat intervals
/// gets no new work (see `network::Answers`).
pub const SILENT_AFTER_HEARTBEATS: u32 = 4;
/// Scheduler ticks between two membership rounds (drained nodes leaving, voters topped up).
pub const MEMBERSHIP_EVERY_TICKS: u32 = 3;

/// Which members the scheduler gives no new work, as it last planned (`None`: no scheduler
/// runs on this node). Published for the leader's group commit (`Node::write_local`), which
/// folds the same policy into each submit's entry (`Command::SubmitAssign`).
#[derive(Debug, Default)]
pub struct AssignView(std::sync::Mutex<Option<BTreeSet<u64>>>);

impl AssignView {
    pub fn get(&self) -> Option<BTreeSet<u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, view: Option<BTreeSet<u64>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }
}

pub enum SchedulerMsg {
    Wake,
    Tick,
    /// A membership round (see `membership::reconcile`) finished.
    MembershipDone,
    /// An Expire proposal for this lease returned.
    Expired(NodeLease),
    Proposed {
        planned: usize,
        ok: bool,
    },
    /// A housekeeping proposal (cron fires, retention) returned; `more` asks for another round,
    /// `retain_again` for another retention pass at once (the last one filled its batch).
    Housekept {
        more: bool,
        retain_again: bool,
    },
}

pub struct Scheduler;

pub struct SchedulerState {
    node: Node,
    hooks: Arc<Hooks>,
    in_flight: bool,
    again: bool,
    leases: LeaseWatch,
    /// Nodes that have not renewed for `lease.self-fence-after`: no new work for them.
    quiet: BTreeSet<u64>,
    /// Expiries proposed and not yet answered.
    expiring: BTreeSet<NodeLease>,
    /// Lapsed leases already logged (an expiry that cannot commit, without a quorum, is retried
    /// every tick but logged once).
    expiry_logged: BTreeSet<NodeLease>,
    /// A cron-fire or retention proposal is in flight.
    housekeeping: bool,
    /// When the last retention pass found nothing (or ran), on the monotonic clock.
    retained_at: Option<std::time::Instant>,
    /// A membership round is running (one at a time).
    membership_busy: bool,
    /// Ticks since the last membership round started.
    ticks_since_membership: u32,
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = (Node, Arc<Hooks>);

    async fn pre_start(
        &self,
        myself: ActorRef<SchedulerMsg>,
        (node, hooks): (Node, Arc<Hooks>),
    ) -> Result<SchedulerState, ActorProcessingErr> {
        myself.send_interval(SCHEDULER_TICK, || SchedulerMsg::Tick);
        let _ = myself.send_message(SchedulerMsg::Wake);
        let leases = LeaseWatch::new(node.state.last_applied().map_or(0, |l| l.index));
        Ok(SchedulerState {
            node,
            hooks,
            in_flight: false,
            again: false,
            leases,
            quiet: BTreeSet::new(),
            expiring: BTreeSet::new(),
            expiry_logged: BTreeSet::new(),
            housekeeping: false,
            retained_at: None,
            membership_busy: false,
            ticks_since_membership: 0,
        })
    }

    /// A stopped scheduler (this node no longer leads, or shuts down) withdraws its view: no
    /// entry this node proposes from now on starts attempts by it.
    async fn post_stop(
        &self,
        _myself: ActorRef<SchedulerMsg>,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        state.node.assign_view.set(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SchedulerMsg>,
        msg: SchedulerMsg,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Wake => {
                state.hooks.wake_pending.store(false, Ordering::Release);
                state.plan(&myself);
            }
            SchedulerMsg::Tick => {
                state.plan(&myself);
                state.housekeep(&myself);
                state.maybe_reconcile_membership(&myself);
            }
            SchedulerMsg::Housekept { more, retain_again } => {
                state.housekeeping = false;
                if retain_again {
                    state.retained_at = None;
                }
                if more {
                    state.housekeep(&myself);
                }
            }
            SchedulerMsg::MembershipDone => state.membership_busy = false,
            SchedulerMsg::Expired(lease) => {
                state.expiring.remove(&lease);
            }
            SchedulerMsg::Proposed { planned, ok } => {
                state.in_flight = false;
                if !ok {
                    // Lost leadership or no quorum: the tick retries; the leadership watcher
                    // stops this actor if another node leads now.
                    return Ok(());
                }
                if state.again || planned == ASSIGN_BATCH_MAX {
                    state.again = false;
                    state.plan(&myself);
                }
            }
        }
        Ok(())
    }
}

impl SchedulerState {
    /// Starts a membership round every [`MEMBERSHIP_EVERY_TICKS`] ticks unless one runs: drained
    /// nodes leave, voters are topped up from learners.
    fn maybe_reconcile_membership(&mut self, myself: &ActorRef<SchedulerMsg>) {
        self.ticks_since_membership += 1;
        if self.membership_busy || self.ticks_since_membership < MEMBERSHIP_EVERY_TICKS {
            return;
        }
        self.ticks_since_membership = 0;
        self.membership_busy = true;
        let node = self.node.clone();
        let policy = crate::membership::Reconcile {
            voters_target: node.config.voters_target,
            quiet: self.quiet.clone(),
        };
        let me = myself.clone();
        tokio::spawn(async move {
            crate::membership::reconcile(&node, &policy).await;
            let _ = me.send_message(SchedulerMsg::MembershipDone);
        });
    }

    /// Expires leases that lapsed on this leader's clock (one proposal per lease at a time).
    fn review_leases(&mut self, myself: &ActorRef<SchedulerMsg>) {
        let (expire, quiet) = self.leases.review(&self.node, &self.hooks.renewals);
        self.quiet = quiet;
        self.expiry_logged
            .retain(|l| expire.iter().any(|e| e.lease == *l));
        for expiry in expire {
            let lease = expiry.lease;
            if !self.expiring.insert(lease) {
                continue;
            }
            if self.expiry_logged.insert(lease) {
                tracing::warn!(
                    node = lease.node,
                    incarnation = lease.incarnation,
                    "lease expired"
                );
            }
            let node = self.node.clone();
            let me = myself.clone();
            tokio::spawn(async move {
                let budget = node.config.limits.propose_timeout;
                let reply =
                    tokio::time::timeout(budget, node.write_local(Command::Expire(expiry))).await;
                if let Ok(ForwardReply::Committed(r, _)) = reply {
                    // Refused (RenewedSince) if the node renewed after the renewal this expiry
                    // counted from: the next review counts from the newer one.
                    tracing::info!(?r, node = lease.node, "expiry committed");
                }
                let _ = me.send_message(SchedulerMsg::Expired(lease));
            });
        }
    }

    /// Proposes the next piece of housekeeping, if any: due cron ticks first (they are
    /// time-critical), then a retention pass every `retention.interval`.
    fn housekeep(&mut self, myself: &ActorRef<SchedulerMsg>) {
        if self.housekeeping {
            return;
        }
        let now = wall_ms();
        let fires: Vec<Fire> = self.node.read(|t| {
            t.schedules()
                .values()
                .filter(|s| !s.paused)
                .filter_map(|s| {
                    let tick = s.next_tick_ms.filter(|&tick| tick <= now)?;
                    Some(Fire {
                        name: s.name.clone(),
                        tick_ms: tick,
                    })
                })
                .take(FIRE_BATCH_MAX)
                .collect()
        });
        let command = if !fires.is_empty() {
            Command::FireSchedules(fires)
        } else {
            let keep = &self.node.config.retention;
            if self
                .retained_at
                .is_some_and(|at| at.elapsed() < keep.interval)
            {
                return;
            }
            self.retained_at = Some(std::time::Instant::now());
            let cut = |age: Duration| now.saturating_sub(age.as_millis() as u64);
            let retention = Retention {
                finished_before_ms: cut(keep.finished),
                dead_before_ms: cut(keep.dead_letters),
                keys_before_ms: cut(keep.idempotency_keys),
                max: RETAIN_BATCH_MAX as u32,
            };
            let due = self.node.read(|t| {
                t.oldest_finished_ms()
                    .is_some_and(|at| at < retention.finished_before_ms)
                    || t.oldest_dead_ms()
                        .is_some_and(|at| at < retention.dead_before_ms)
                    || t.oldest_key_ms()
                        .is_some_and(|at| at < retention.keys_before_ms)
            });
            if !due {
                return;
            }
            Command::Retain(retention)
        };
        self.housekeeping = true;
        let node = self.node.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let budget = node.config.limits.propose_timeout;
            let reply = tokio::time::timeout(budget, node.write_local(command)).await;
            let mut retain_again = false;
            let more = match reply {
                Ok(ForwardReply::Committed(exactly_core::Response::Fired(results), _)) => {
                    for r in results {
                        match r {
                            Ok(fired) => match &fired.refused {
                                Some(why) => tracing::warn!(%why, ?fired, "cron tick refused"),
                                None => tracing::debug!(?fired, "cron ticks fired"),
                            },
                            Err(why) => tracing::warn!(%why, "cron fire refused"),
                        }
                    }
                    // A catch-up longer than CRON_CATCH_UP_FIRES_MAX leaves the next tick due:
                    // the next round proposes it at once.
                    true
                }
                Ok(ForwardReply::Committed(exactly_core::Response::Retained { jobs, keys }, _)) => {
                    tracing::debug!(jobs, keys, "retention pass");
                    // A full batch means more may be past retention: go on at once.
                    retain_again =
                        jobs as usize == RETAIN_BATCH_MAX || keys as usize == RETAIN_BATCH_MAX;
                    retain_again
                }
                _ => false,
            };
            let _ = me.send_message(SchedulerMsg::Housekept { more, retain_again });
        });
    }

    fn plan(&mut self, myself: &ActorRef<SchedulerMsg>) {
        // Fresh lease view first: a new leader's very first plan must already skip a dead
        // predecessor (and expiries are proposed from here too).
        self.review_leases(myself);
        if self.in_flight {
            self.again = true;
            return;
        }
        let members: BTreeSet<u64> = self
            .node
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        let now = wall_ms();
        // Members that stopped answering heartbeats (a dead or frozen node, before its lease
        // runs out; a new leader's dead predecessor) get nothing new either.
        let silent = self.node.answers.silent(
            self.node.id,
            &members,
            std::time::Instant::now(),
            self.node.config.raft.heartbeat_interval * SILENT_AFTER_HEARTBEATS,
        );
        let (plan, excluded) = self.node.read(|table| {
            // Registered nodes that left the membership get nothing (leaving and expired ones
            // are skipped by the policy itself).
            let excluded: BTreeSet<u64> = table
                .nodes()
                .keys()
                .filter(|id| {
                    !members.contains(id) || self.quiet.contains(id) || silent.contains(id)
                })
                .copied()
                .collect();
            let plan = plan_assignments(table, now, ASSIGN_BATCH_MAX, &excluded);
            (plan, excluded)
        });
        self.node.assign_view.set(Some(excluded));
        if plan.is_empty() {
            return;
        }
        self.in_flight = true;
        let planned = plan.len();
        let node = self.node.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let budget = node.config.limits.propose_timeout;
            let reply = tokio::time::timeout(budget, node.write_local(Command::Assign(plan))).await;
            let ok = matches!(reply, Ok(ForwardReply::Committed(..)));
            let _ = me.send_message(SchedulerMsg::Proposed { planned, ok });
        });
    }
}
