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
//!
//! Every decision (when to plan, whom to exclude, which leases to expire, which ticks to fire,
//! when retention is due, when a membership round starts) is made by the pure
//! [`engine::Engine`]; this actor reads the world and carries out the engine's actions.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use exactly_core::{Command, NodeLease, Response};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::hooks::Hooks;
use crate::lease::LeaseWatch;
use crate::node::{wall_ms, ForwardReply, Node};

pub mod engine;

use engine::{Action, Engine, Event, Housekept, RetentionSettings, World};

/// How often the scheduler looks even without a wake-up (delayed jobs become due by time alone).
pub const SCHEDULER_TICK: Duration = Duration::from_millis(100);
/// A member that has not answered the leader's heartbeats for this many heartbeat intervals
/// gets no new work (see `network::Answers`).
pub const SILENT_AFTER_HEARTBEATS: u32 = 4;
pub use engine::MEMBERSHIP_EVERY_TICKS;

pub enum SchedulerMsg {
    Wake,
    Tick,
    /// A membership round (see `membership::reconcile`) finished.
    MembershipDone,
    /// An Expire proposal for this lease returned.
    Expired(NodeLease),
    /// The Assign proposal returned.
    Proposed {
        planned: usize,
        ok: bool,
    },
    /// A housekeeping proposal (cron fires, retention) returned.
    Housekept(Housekept),
}

/// The actor: a thin loop that reads the world (the applied table, the clocks, the Raft
/// members, heartbeat answers, the lease review), feeds [`Engine::handle`] and carries out its
/// [`Action`]s. Every decision is in the engine.
pub struct Scheduler;

pub struct SchedulerState {
    node: Node,
    hooks: Arc<Hooks>,
    engine: Engine,
    leases: LeaseWatch,
    /// The origin of the engine's monotonic milliseconds.
    origin: std::time::Instant,
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
        let keep = &node.config.retention;
        let engine = Engine::new(RetentionSettings {
            finished: keep.finished,
            dead_letters: keep.dead_letters,
            idempotency_keys: keep.idempotency_keys,
            interval: keep.interval,
        });
        Ok(SchedulerState {
            node,
            hooks,
            engine,
            leases,
            origin: std::time::Instant::now(),
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
        let event = match msg {
            SchedulerMsg::Wake => {
                state.hooks.wake_pending.store(false, Ordering::Release);
                Event::Wake
            }
            SchedulerMsg::Tick => Event::Tick,
            SchedulerMsg::Proposed { planned, ok } => Event::Proposed { planned, ok },
            SchedulerMsg::Housekept(how) => Event::Housekept(how),
            SchedulerMsg::MembershipDone => Event::MembershipDone,
            SchedulerMsg::Expired(lease) => Event::Expired(lease),
        };
        let node = &state.node;
        // The lease view first (a new leader's very first plan must already skip a dead
        // predecessor), read before the table (see `lease::review`).
        let (expire, quiet) = state.leases.review(node, &state.hooks.renewals);
        let members: BTreeSet<u64> = node
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        // Members that stopped answering heartbeats (a dead or frozen node, before its lease
        // runs out; a new leader's dead predecessor).
        let silent = node.answers.silent(
            node.id,
            &members,
            std::time::Instant::now(),
            node.config.raft.heartbeat_interval * SILENT_AFTER_HEARTBEATS,
        );
        let now_wall_ms = wall_ms();
        let now_mono_ms = state.origin.elapsed().as_millis() as u64;
        let engine = &mut state.engine;
        let actions = node.read(|table| {
            engine.handle(
                event,
                &World {
                    table,
                    now_wall_ms,
                    now_mono_ms,
                    members: &members,
                    silent: &silent,
                    expire: &expire,
                    quiet: &quiet,
                },
            )
        });
        for action in actions {
            state.carry_out(&myself, action);
        }
        Ok(())
    }
}

impl SchedulerState {
    fn carry_out(&self, myself: &ActorRef<SchedulerMsg>, action: Action) {
        let node = self.node.clone();
        let me = myself.clone();
        let budget = node.config.limits.propose_timeout;
        match action {
            Action::View(excluded) => self.node.assign_view.set(Some(excluded)),
            Action::Assign(plan) => {
                let planned = plan.len();
                tokio::spawn(async move {
                    let reply =
                        tokio::time::timeout(budget, node.write_local(Command::Assign(plan))).await;
                    let ok = matches!(reply, Ok(ForwardReply::Committed(..)));
                    let _ = me.send_message(SchedulerMsg::Proposed { planned, ok });
                });
            }
            Action::Expire { expiry, log } => {
                let lease = expiry.lease;
                if log {
                    tracing::warn!(
                        node = lease.node,
                        incarnation = lease.incarnation,
                        "lease expired"
                    );
                }
                tokio::spawn(async move {
                    let reply =
                        tokio::time::timeout(budget, node.write_local(Command::Expire(expiry)))
                            .await;
                    if let Ok(ForwardReply::Committed(r, _)) = reply {
                        // Refused (RenewedSince) if the node renewed after the renewal this
                        // expiry counted from: the next review counts from the newer one.
                        tracing::info!(?r, node = lease.node, "expiry committed");
                    }
                    let _ = me.send_message(SchedulerMsg::Expired(lease));
                });
            }
            Action::Housekeep(command) => {
                tokio::spawn(async move {
                    let reply = tokio::time::timeout(budget, node.write_local(*command)).await;
                    let how = match reply {
                        Ok(ForwardReply::Committed(Response::Fired(results), _)) => {
                            for r in results {
                                match r {
                                    Ok(fired) => match &fired.refused {
                                        Some(why) => {
                                            tracing::warn!(%why, ?fired, "cron tick refused")
                                        }
                                        None => tracing::debug!(?fired, "cron ticks fired"),
                                    },
                                    Err(why) => tracing::warn!(%why, "cron fire refused"),
                                }
                            }
                            Housekept::Fired
                        }
                        Ok(ForwardReply::Committed(Response::Retained { jobs, keys }, _)) => {
                            tracing::debug!(jobs, keys, "retention pass");
                            Housekept::Retained { jobs, keys }
                        }
                        _ => Housekept::NotCommitted,
                    };
                    let _ = me.send_message(SchedulerMsg::Housekept(how));
                });
            }
            Action::Membership { quiet } => {
                let policy = crate::membership::Reconcile {
                    voters_target: node.config.voters_target,
                    quiet,
                };
                tokio::spawn(async move {
                    crate::membership::reconcile(&node, &policy).await;
                    let _ = me.send_message(SchedulerMsg::MembershipDone);
                });
            }
        }
    }
}
