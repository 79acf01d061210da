//! The executor: one actor per node that owns this node's running attempts.
//!
//! It receives `Start` effects from the applied log (through [`crate::hooks::Hooks`]), runs each
//! attempt's handler in its own task with a cancellation token and the job's timeout, and
//! proposes outcomes in batches: while [`COMPLETE_PROPOSALS_IN_FLIGHT_MAX`] Complete commands
//! are in flight, finished attempts accumulate, and the next command carries them all (group
//! commit).
//!
//! Every decision (which attempts start, which are held while the lease is out, which are
//! stopped and why, what is given back, how completions batch) is made by the pure
//! [`engine::Engine`]; this actor reads the world (the lease, the incarnation, the local
//! replica, a monotonic clock), feeds the engine and carries out its actions.
//!
//! **Invariant:** an attempt starts here only if the applied Assign named this node *and this
//! incarnation*. Apply re-runs after a restart, but a restarted node has a new incarnation, so a
//! replayed Start of its previous life is ignored; the state machine requeues those jobs when the
//! new incarnation registers.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use exactly_core::limits::COMPLETE_BATCH_MAX;
use exactly_core::{Accepted, Completion, JobId, Outcome, Proposal, StartAttempt};
use exactly_handlers::{HandlerOutcome, JobContext, CANCELLED};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::CancellationToken;

use crate::node::Node;

pub mod engine;

use engine::{Action, Engine, Event, ReplicaView, Settings, World};

/// Completion proposals one executor has in flight at once: a finished attempt's outcome is
/// proposed at once unless this many are (see [`engine::Settings::proposals_max`]).
pub const COMPLETE_PROPOSALS_IN_FLIGHT_MAX: usize = 4;

/// How often the executor compares its running set with the state machine's.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

pub enum ExecutorMsg {
    /// An applied Assign started an attempt (possibly on another node: filtered here).
    Start(StartAttempt),
    /// A handler task finished (by itself, or stopped by this actor or its timeout).
    Finished { job: JobId, token: u64, end: RunEnd },
    /// A Complete proposal returned.
    Flushed {
        batch: Vec<Completion>,
        committed: bool,
    },
    /// Try to propose pending completions again.
    Flush,
    /// Cancel every running attempt (shutdown).
    CancelAll,
    /// A client cancelled this attempt: stop its handler (its report will be refused).
    Cancel { job: JobId, token: u64 },
    /// Compare the time with the lease deadline; fence or unfence.
    CheckLease,
    /// Start attempts the state machine gives this incarnation that this actor never saw (they
    /// arrived inside a snapshot rather than through an applied Assign).
    Reconcile,
}

/// The actor: a thin loop that reads the world, feeds [`Engine::handle`] and carries out its
/// [`Action`]s (spawning handlers, cancelling them, proposing completions). Every decision is in
/// the engine.
pub struct Executor;

pub struct ExecutorState {
    node: Node,
    engine: Engine,
    /// The cancellation token of every handler task alive, by (job, token).
    cancels: HashMap<(JobId, u64), CancellationToken>,
    /// The origin of the engine's monotonic milliseconds.
    origin: tokio::time::Instant,
}

impl Actor for Executor {
    type Msg = ExecutorMsg;
    type State = ExecutorState;
    type Arguments = Node;

    async fn pre_start(
        &self,
        myself: ActorRef<ExecutorMsg>,
        node: Node,
    ) -> Result<ExecutorState, ActorProcessingErr> {
        myself.send_interval(RECONCILE_INTERVAL, || ExecutorMsg::Reconcile);
        myself.send_interval(crate::lease::CHECK_INTERVAL, || ExecutorMsg::CheckLease);
        let engine = Engine::new(Settings {
            node: node.id,
            slots: node.config.slots,
            self_fence_after: node.config.lease.self_fence_after,
            batch_max: COMPLETE_BATCH_MAX,
            proposals_max: COMPLETE_PROPOSALS_IN_FLIGHT_MAX,
        });
        Ok(ExecutorState {
            node,
            engine,
            cancels: HashMap::new(),
            origin: tokio::time::Instant::now(),
        })
    }

    /// No handler outlives its executor: a stop signal overtakes messages still queued (a
    /// `CancelAll` sent just before it may never be handled), so whatever still runs is
    /// stopped here. Found by `leases::leader_failover_cancels_nothing_on_healthy_nodes` under
    /// CI load: a node shut down right after it was cut off left a handler running 9 s, 3.3 s
    /// into its job's next attempt elsewhere.
    async fn post_stop(
        &self,
        _myself: ActorRef<ExecutorMsg>,
        state: &mut ExecutorState,
    ) -> Result<(), ActorProcessingErr> {
        for cancel in state.cancels.values() {
            cancel.cancel();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ExecutorMsg>,
        msg: ExecutorMsg,
        state: &mut ExecutorState,
    ) -> Result<(), ActorProcessingErr> {
        let event = match msg {
            ExecutorMsg::Start(start) => Event::Start(start),
            ExecutorMsg::Finished { job, token, end } => {
                tracing::trace!(target: exactly_store::TIMELINE, job, "ran");
                state.cancels.remove(&(job, token));
                Event::Finished { job, token, end }
            }
            ExecutorMsg::Flushed { batch, committed } => {
                if let Some(first) = batch.first() {
                    tracing::trace!(target: exactly_store::TIMELINE, job = first.job, count = batch.len(), committed, "completed");
                }
                Event::Flushed { batch, committed }
            }
            ExecutorMsg::Flush => Event::FlushTimer,
            ExecutorMsg::CheckLease => {
                let held: Vec<(JobId, u64)> = state.engine.held().collect();
                let current = if held.is_empty() {
                    BTreeSet::new()
                } else {
                    state.node.read(|t| current_of(t, held))
                };
                Event::CheckLease { current }
            }
            ExecutorMsg::Reconcile => {
                let (id, incarnation) = (state.node.id, state.node.incarnation());
                let watched: Vec<(JobId, u64)> = state.engine.watched().collect();
                let view = state.node.read(|t| ReplicaView {
                    drain_passed: t.drain_deadline_passed(id),
                    current: current_of(t, watched),
                    mine: t
                        .jobs_running_on(id)
                        .filter_map(|job| {
                            let a = job.current_attempt()?;
                            (a.incarnation == incarnation).then(|| StartAttempt {
                                job: job.id,
                                token: a.token,
                                attempt: a.number,
                                node: id,
                                incarnation,
                                queue: job.queue.clone(),
                                kind: job.kind.clone(),
                                timeout_ms: job.timeout_ms,
                                idempotency_key: job.effective_idempotency_key(),
                            })
                        })
                        .collect(),
                });
                Event::Reconcile(view)
            }
            ExecutorMsg::Cancel { job, token } => Event::Cancel { job, token },
            ExecutorMsg::CancelAll => Event::CancelAll,
        };
        let world = World {
            lease_valid: state.node.lease_valid(),
            incarnation: state.node.incarnation(),
            now_ms: state.origin.elapsed().as_millis() as u64,
        };
        for action in state.engine.handle(event, world) {
            state.carry_out(&myself, action);
        }
        // What a stopping node waits for before it goes (see `Node::drain_and_leave`).
        state
            .node
            .work_in_hand
            .store(state.engine.running(), state.engine.unreported());
        Ok(())
    }
}

/// Which of `attempts` the replica `t` shows as their job's current attempt.
fn current_of(t: &exactly_store::Table, attempts: Vec<(JobId, u64)>) -> BTreeSet<(JobId, u64)> {
    attempts
        .into_iter()
        .filter(|&(job, token)| {
            t.job(job)
                .is_some_and(|j| j.current_attempt().is_some_and(|a| a.token == token))
        })
        .collect()
}

impl ExecutorState {
    fn carry_out(&mut self, myself: &ActorRef<ExecutorMsg>, action: Action) {
        match action {
            Action::Run(start) => self.run(myself, start),
            Action::Stop { job, token, why } => {
                if let Some(cancel) = self.cancels.get(&(job, token)) {
                    cancel.cancel();
                }
                match why {
                    Stop::ClientCancelled => {
                        tracing::info!(job, token, "attempt cancelled by a client")
                    }
                    Stop::NoLongerCurrent => {
                        tracing::info!(job, token, "attempt no longer current: stopping it")
                    }
                    Stop::Drained => tracing::info!(
                        node = self.node.id,
                        job,
                        token,
                        "drain deadline passed: stopping"
                    ),
                    Stop::Fenced { .. } | Stop::ShuttingDown => {}
                }
            }
            Action::Propose(batch) => self.propose(myself, batch),
            Action::FlushAfter(delay) => {
                myself.send_after(delay, || ExecutorMsg::Flush);
            }
            Action::Fenced { running } => {
                if running > 0 {
                    tracing::warn!(
                        node = self.node.id,
                        running,
                        self_fence_after = ?self.node.config.lease.self_fence_after,
                        "lease lapsed (no committed renewal): fencing, stopping every running attempt"
                    );
                }
            }
            Action::Unfenced => {
                tracing::info!(node = self.node.id, "lease valid: running attempts");
            }
        }
    }

    /// Runs an attempt's handler in a task of its own.
    fn run(&mut self, myself: &ActorRef<ExecutorMsg>, start: StartAttempt) {
        tracing::trace!(target: exactly_store::TIMELINE, job = start.job, "run");
        let node = self.node.clone();
        let cancel = CancellationToken::new();
        self.cancels
            .insert((start.job, start.token), cancel.clone());
        let job = start.job;
        let token = start.token;
        let timeout = if start.timeout_ms == 0 {
            node.config.defaults.timeout
        } else {
            Duration::from_millis(start.timeout_ms)
        };
        let handler = node.registry.get(&start.kind);
        let payload = node.store.payload(job);
        let node_id = node.id;
        // The client's key, or one derived from the job id: the same for every attempt of the
        // job on every node (the state machine decides it, see `Job::effective_idempotency_key`).
        let idempotency_key = start.idempotency_key.clone();
        let grace = node.config.lease.kill_grace;
        let lease = node.lease_deadline();
        let me = myself.clone();
        tokio::spawn(async move {
            let end = match (handler, payload) {
                (None, _) => RunEnd::Reported(HandlerOutcome::Failed {
                    error: format!("no handler for kind {:?} on node {node_id}", start.kind),
                    retryable: false,
                }),
                (_, Err(e)) => RunEnd::Reported(HandlerOutcome::Failed {
                    error: format!("cannot read payload on node {node_id}: {e}"),
                    retryable: true,
                }),
                // The job finished after the snapshot this attempt came from; its outcome is
                // refused as stale, and it never runs without its payload.
                (_, Ok(None)) => RunEnd::Reported(HandlerOutcome::Failed {
                    error: format!("payload of job {job} is gone on node {node_id}"),
                    retryable: true,
                }),
                (Some(handler), Ok(Some(payload))) => {
                    let ctx = JobContext {
                        job_id: job,
                        attempt: start.attempt,
                        fencing_token: token,
                        idempotency_key,
                        node_id,
                        queue: start.queue,
                        kind: start.kind,
                        payload,
                        timeout,
                        lease,
                    };
                    run_attempt(handler.run(ctx, cancel.clone()), cancel, timeout, grace).await
                }
            };
            let _ = me.send_message(ExecutorMsg::Finished { job, token, end });
        });
    }

    /// Proposes one batch of completions and answers `Flushed`.
    fn propose(&mut self, myself: &ActorRef<ExecutorMsg>, batch: Vec<Completion>) {
        if let Some(first) = batch.first() {
            tracing::trace!(target: exactly_store::TIMELINE, job = first.job, count = batch.len(), "complete");
        }
        let node = self.node.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let result = node.ask(Proposal::complete(batch.clone())).await;
            let committed = match result {
                Ok(Accepted { rejected, .. }) => {
                    for (job, why) in rejected {
                        if matches!(why, exactly_core::Rejection::Finished(_)) {
                            tracing::debug!(job, %why, "late report of a cancelled attempt");
                        } else {
                            tracing::warn!(job, %why, "completion refused by the state machine");
                        }
                    }
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "proposing completions failed; will retry");
                    false
                }
            };
            let _ = me.send_message(ExecutorMsg::Flushed { batch, committed });
        });
    }
}

/// Why this executor stopped an attempt while its handler ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The node's lease lapsed: no renewal was acknowledged for `after`.
    Fenced { after: Duration },
    /// The node's drain deadline passed.
    Drained,
    /// The node is stopping (or standing down after it left the cluster).
    ShuttingDown,
    /// A client cancelled the job (the state machine has already ended the attempt).
    ClientCancelled,
    /// The attempt is no longer the job's current one (a newer attempt, or an end this node
    /// learned of late); its report will be refused as stale.
    NoLongerCurrent,
}

/// How a handler task ended.
#[derive(Debug)]
pub enum RunEnd {
    /// The handler reported by itself.
    Reported(HandlerOutcome),
    /// The attempt's own timeout passed; `handler` is what it said within the kill grace after
    /// being cancelled (`None`: it was dropped, i.e. killed, after the grace).
    TimedOut {
        after: Duration,
        handler: Option<HandlerOutcome>,
    },
    /// This executor stopped it (see [`Stop`]); `handler` as for `TimedOut`.
    Stopped { handler: Option<HandlerOutcome> },
}

/// The outcome to report for an attempt that ended as `end`, stopped (if it was) for `stop`.
///
/// A success is always reported as one: the work was done. A timeout is the job's own failure
/// (retryable). An attempt stopped for a reason the job did not cause is given back
/// (`Abandoned`, which costs no attempt), with a reason saying what happened.
pub fn outcome_of(end: RunEnd, stop: Option<Stop>, node: u64) -> Outcome {
    let handler = match end {
        RunEnd::Reported(HandlerOutcome::Succeeded(result))
        | RunEnd::TimedOut {
            handler: Some(HandlerOutcome::Succeeded(result)),
            ..
        }
        | RunEnd::Stopped {
            handler: Some(HandlerOutcome::Succeeded(result)),
        } => return Outcome::Succeeded { result },
        // A failure reported after this executor asked the attempt to stop is the stop's doing
        // (the handler saw the same cancellation): attribute it to the stop.
        RunEnd::Reported(failed @ HandlerOutcome::Failed { .. }) if stop.is_some() => Some(failed),
        RunEnd::Reported(HandlerOutcome::Failed { error, retryable }) => {
            return Outcome::Failed { error, retryable };
        }
        RunEnd::TimedOut { after, handler } => {
            let mut error = format!("timed out after {after:?}");
            match handler {
                Some(HandlerOutcome::Failed { error: said, .. }) if said != CANCELLED => {
                    error = format!("{error}; then: {said}");
                }
                Some(_) => {}
                None => error.push_str("; killed after the kill grace"),
            }
            return Outcome::Failed {
                error,
                retryable: true,
            };
        }
        RunEnd::Stopped { handler } => handler,
    };
    let what = match stop {
        Some(Stop::Fenced { after }) => format!(
            "lease lapsed: node {node} fenced itself after {after:?} without a committed renewal"
        ),
        Some(Stop::Drained) => format!("node {node} was drained past its deadline"),
        Some(Stop::ShuttingDown) => format!("node {node} is stopping"),
        Some(Stop::ClientCancelled) => "cancelled by a client".to_string(),
        Some(Stop::NoLongerCurrent) => "no longer the job's current attempt".to_string(),
        None => format!("stopped by node {node}"),
    };
    let reason = match handler {
        None => format!("{what}; the attempt was killed after the kill grace"),
        Some(HandlerOutcome::Failed { error, .. }) if error != CANCELLED => {
            format!("{what}; the attempt was stopped ({error})")
        }
        Some(_) => format!("{what}; the attempt was stopped"),
    };
    Outcome::Abandoned { reason }
}

/// Runs a handler until it finishes, times out, or is cancelled (fencing, shutdown, a drain, a
/// client); then cancels it and waits at most `grace` before dropping it (the `exec` handler's
/// guard then kills the command's whole process tree).
async fn run_attempt(
    run: futures::future::BoxFuture<'static, HandlerOutcome>,
    cancel: CancellationToken,
    timeout: Duration,
    grace: Duration,
) -> RunEnd {
    let mut run = run;
    let timed_out = tokio::select! {
        outcome = &mut run => return RunEnd::Reported(outcome),
        _ = tokio::time::sleep(timeout) => true,
        _ = cancel.cancelled() => false,
    };
    cancel.cancel();
    let handler = tokio::time::timeout(grace, &mut run).await.ok();
    if handler.is_none() {
        drop(run);
    }
    if timed_out {
        RunEnd::TimedOut {
            after: timeout,
            handler,
        }
    } else {
        RunEnd::Stopped { handler }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(error: &str) -> HandlerOutcome {
        HandlerOutcome::Failed {
            error: error.into(),
            retryable: true,
        }
    }

    fn abandoned(reason: &str) -> Outcome {
        Outcome::Abandoned {
            reason: reason.into(),
        }
    }

    /// Every way an attempt ends maps to the outcome the state machine should record: successes
    /// stand, timeouts are the job's retryable failure, and every stop the job did not cause is
    /// given back (abandoned, costing no attempt) with a message that says what happened (never
    /// "cancelled: cancelled").
    #[test]
    fn each_end_maps_to_its_outcome() {
        let fenced = Some(Stop::Fenced {
            after: Duration::from_millis(2500),
        });
        let cases: Vec<(&str, RunEnd, Option<Stop>, Outcome)> = vec![
            (
                "reported success",
                RunEnd::Reported(HandlerOutcome::Succeeded(b"ok".to_vec())),
                None,
                Outcome::Succeeded {
                    result: b"ok".to_vec(),
                },
            ),
            (
                "reported failure",
                RunEnd::Reported(HandlerOutcome::permanent("bad input")),
                None,
                Outcome::Failed {
                    error: "bad input".into(),
                    retryable: false,
                },
            ),
            (
                "success within the grace after a fence",
                RunEnd::Stopped {
                    handler: Some(HandlerOutcome::Succeeded(vec![])),
                },
                fenced.clone(),
                Outcome::Succeeded { result: vec![] },
            ),
            (
                "fenced, handler stopped",
                RunEnd::Stopped {
                    handler: Some(HandlerOutcome::cancelled()),
                },
                fenced.clone(),
                abandoned(
                    "lease lapsed: node 2 fenced itself after 2.5s without a committed renewal; \
                     the attempt was stopped",
                ),
            ),
            (
                "fenced, handler killed",
                RunEnd::Stopped { handler: None },
                fenced,
                abandoned(
                    "lease lapsed: node 2 fenced itself after 2.5s without a committed renewal; \
                     the attempt was killed after the kill grace",
                ),
            ),
            (
                "drained, handler said why it stopped",
                RunEnd::Stopped {
                    handler: Some(failed("SIGTERM received")),
                },
                Some(Stop::Drained),
                abandoned(
                    "node 2 was drained past its deadline; the attempt was stopped \
                     (SIGTERM received)",
                ),
            ),
            (
                "shutdown",
                RunEnd::Stopped {
                    handler: Some(HandlerOutcome::cancelled()),
                },
                Some(Stop::ShuttingDown),
                abandoned("node 2 is stopping; the attempt was stopped"),
            ),
            (
                "fenced, the handler reported its cancellation before the stop was seen",
                RunEnd::Reported(failed("cancelled by the node")),
                Some(Stop::Fenced {
                    after: Duration::from_secs(2),
                }),
                abandoned(
                    "lease lapsed: node 2 fenced itself after 2s without a committed renewal; \
                     the attempt was stopped (cancelled by the node)",
                ),
            ),
            (
                "timed out, stopped in the grace",
                RunEnd::TimedOut {
                    after: Duration::from_secs(5),
                    handler: Some(HandlerOutcome::cancelled()),
                },
                None,
                Outcome::Failed {
                    error: "timed out after 5s".into(),
                    retryable: true,
                },
            ),
            (
                "timed out, killed",
                RunEnd::TimedOut {
                    after: Duration::from_secs(5),
                    handler: None,
                },
                None,
                Outcome::Failed {
                    error: "timed out after 5s; killed after the kill grace".into(),
                    retryable: true,
                },
            ),
            (
                "timed out, handler said something",
                RunEnd::TimedOut {
                    after: Duration::from_secs(5),
                    handler: Some(failed("exit code 3")),
                },
                None,
                Outcome::Failed {
                    error: "timed out after 5s; then: exit code 3".into(),
                    retryable: true,
                },
            ),
        ];
        for (name, end, stop, expected) in cases {
            assert_eq!(outcome_of(end, stop, 2), expected, "{name}");
        }
    }
}
