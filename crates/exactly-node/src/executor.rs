//! The executor: one actor per node that owns this node's running attempts.
//!
//! It receives `Start` effects from the applied log (through [`crate::hooks::Hooks`]), runs each
//! attempt's handler in its own task with a cancellation token and the job's timeout, and
//! proposes outcomes in batches: while one Complete command is in flight, finished attempts
//! accumulate, and the next command carries them all (group commit).
//!
//! **Invariant:** an attempt starts here only if the applied Assign named this node *and this
//! incarnation*. Apply re-runs after a restart, but a restarted node has a new incarnation, so a
//! replayed Start of its previous life is ignored; the state machine requeues those jobs when the
//! new incarnation registers.

use std::collections::HashMap;
use std::time::Duration;

use exactly_core::limits::COMPLETE_BATCH_MAX;
use exactly_core::{Command, Completion, JobId, Outcome, Response, StartAttempt};
use exactly_handlers::{HandlerOutcome, JobContext, CANCELLED};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::CancellationToken;

use crate::node::Node;

/// How often the executor compares its running set with the state machine's.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);
/// Delay before proposing completions again after a failed proposal.
const FLUSH_RETRY_DELAY: Duration = Duration::from_millis(200);

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

pub struct Executor;

pub struct ExecutorState {
    node: Node,
    running: HashMap<JobId, (u64, CancellationToken)>,
    outbox: Vec<Completion>,
    /// The largest fencing token this incarnation has started per job. An attempt starts at
    /// most once however it is announced (an applied Assign, or reconciliation from a snapshot,
    /// in either order). The second field counts consecutive reconciliation rounds in which the
    /// local replica no longer showed that attempt as current; see [`ExecutorMsg::Reconcile`].
    started: HashMap<JobId, (u64, u8)>,
    /// The lease lapsed: nothing starts, and everything running was cancelled.
    fenced: bool,
    flushing: bool,
    /// Why this actor stopped an attempt it runs. Unless the handler still succeeded, a stop
    /// the job did not cause is reported as given back (`Outcome::Abandoned`): the job runs
    /// again elsewhere without losing an attempt and never becomes a dead letter for it.
    stops: HashMap<(JobId, u64), Stop>,
    /// This node's drain deadline has passed, as of the last reconciliation (read once per
    /// [`RECONCILE_INTERVAL`] with the rest of the state, not on every start).
    drain_passed: bool,
    /// Attempts assigned while the lease was out, with when they arrived: started once it is
    /// valid again, given back if it stays out (see [`ExecutorState::release_held`]). At most
    /// `slots`.
    held: Vec<(StartAttempt, tokio::time::Instant)>,
}

impl Actor for Executor {
    type Msg = ExecutorMsg;
    type State = ExecutorState;
    type Arguments = Node;

    async fn pre_start(
        &self,
        _myself: ActorRef<ExecutorMsg>,
        node: Node,
    ) -> Result<ExecutorState, ActorProcessingErr> {
        _myself.send_interval(RECONCILE_INTERVAL, || ExecutorMsg::Reconcile);
        _myself.send_interval(crate::lease::CHECK_INTERVAL, || ExecutorMsg::CheckLease);
        Ok(ExecutorState {
            node,
            running: HashMap::new(),
            outbox: Vec::new(),
            started: HashMap::new(),
            fenced: true,
            flushing: false,
            stops: HashMap::new(),
            drain_passed: false,
            held: Vec::new(),
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
        state.stop_all(Stop::ShuttingDown);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ExecutorMsg>,
        msg: ExecutorMsg,
        state: &mut ExecutorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ExecutorMsg::Start(start) => state.start(&myself, start),
            ExecutorMsg::Finished { job, token, end } => {
                if state.running.get(&job).is_some_and(|(t, _)| *t == token) {
                    state.running.remove(&job);
                }
                let stop = state.stops.remove(&(job, token));
                let outcome = outcome_of(end, stop, state.node.id);
                state.outbox.push(Completion {
                    job,
                    token,
                    outcome,
                });
                state.flush(&myself);
            }
            ExecutorMsg::Flushed { batch, committed } => {
                state.flushing = false;
                if committed {
                    state.flush(&myself);
                } else {
                    // Re-proposing is safe: the state machine accepts a completion only for the
                    // current attempt, so one that did commit is refused as stale the second time.
                    let mut retry = batch;
                    retry.append(&mut state.outbox);
                    state.outbox = retry;
                    myself.send_after(FLUSH_RETRY_DELAY, || ExecutorMsg::Flush);
                }
            }
            ExecutorMsg::Flush => state.flush(&myself),
            ExecutorMsg::CheckLease => {
                let valid = state.node.lease_valid();
                if !valid && !state.fenced {
                    state.fenced = true;
                    if !state.running.is_empty() {
                        tracing::warn!(
                            node = state.node.id,
                            running = state.running.len(),
                            self_fence_after = ?state.node.config.lease.self_fence_after,
                            "lease lapsed (no committed renewal): fencing, stopping every running attempt"
                        );
                    }
                    let after = state.node.config.lease.self_fence_after;
                    state.stop_all(Stop::Fenced { after });
                } else if valid && state.fenced {
                    state.fenced = false;
                    tracing::info!(node = state.node.id, "lease valid: running attempts");
                }
                state.release_held(&myself);
            }
            ExecutorMsg::Reconcile => {
                let (id, incarnation) = (state.node.id, state.node.incarnation());
                state.drain_passed = state.node.read(|t| t.drain_deadline_passed(id));
                state.release_if_drained();
                // Forget a started attempt only after two rounds in which the local replica did
                // not show it as current. The Start message of an attempt is enqueued when its
                // Assign applies, before the replica can show the attempt ended; a round enqueued
                // after an earlier round saw it ended therefore runs after that Start message.
                let started = std::mem::take(&mut state.started);
                state.started = state.node.read(|t| {
                    started
                        .into_iter()
                        .filter_map(|(job, (token, stale_rounds))| {
                            let current = t
                                .job(job)
                                .and_then(|j| j.current_attempt())
                                .is_some_and(|a| a.token == token);
                            let stale_rounds = if current { 0 } else { stale_rounds + 1 };
                            (stale_rounds < 2).then_some((job, (token, stale_rounds)))
                        })
                        .collect()
                });
                let mine: Vec<StartAttempt> = state.node.read(|t| {
                    t.jobs_running_on(id)
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
                        .collect()
                });
                for start in mine {
                    state.start(&myself, start);
                }
                // An attempt this replica has shown as ended for two rounds is over (a cancel or
                // a reassignment whose message this node missed, e.g. across a snapshot): stop it.
                let gone: Vec<(JobId, u64)> = state
                    .running
                    .iter()
                    .filter(|(job, (token, _))| {
                        state.started.get(job).is_none_or(|(t, _)| t != token)
                    })
                    .map(|(&job, &(token, _))| (job, token))
                    .collect();
                for (job, token) in gone {
                    if state.stop(job, token, Stop::NoLongerCurrent) {
                        tracing::info!(job, token, "attempt no longer current: stopping it");
                    }
                }
            }
            ExecutorMsg::Cancel { job, token } => {
                if state.stop(job, token, Stop::ClientCancelled) {
                    tracing::info!(job, token, "attempt cancelled by a client");
                }
            }
            ExecutorMsg::CancelAll => state.stop_all(Stop::ShuttingDown),
        }
        // What a stopping node waits for before it goes (see `Node::drain_and_leave`).
        let unreported = state.held.len() + state.outbox.len() + usize::from(state.flushing);
        state
            .node
            .work_in_hand
            .store(state.running.len(), unreported);
        Ok(())
    }
}

impl ExecutorState {
    /// Once this node's drain deadline has passed (by the replicated leader time), cancels every
    /// running attempt; each is reported as given back when its handler has stopped (or was
    /// killed after the kill grace), never before, so the job cannot run twice at once.
    fn release_if_drained(&mut self) {
        if !self.drain_passed {
            return;
        }
        let running: Vec<(JobId, u64)> = self.running.iter().map(|(&j, &(t, _))| (j, t)).collect();
        for (job, token) in running {
            if self.stop(job, token, Stop::Drained) {
                tracing::info!(
                    node = self.node.id,
                    job,
                    token,
                    "drain deadline passed: stopping"
                );
            }
        }
    }

    /// Stops the running attempt `(job, token)` for `why`, unless it is not running or already
    /// stopping (the first reason stands). Returns whether it was stopped now.
    fn stop(&mut self, job: JobId, token: u64, why: Stop) -> bool {
        let Some((running, cancel)) = self.running.get(&job) else {
            return false;
        };
        if *running != token || self.stops.contains_key(&(job, token)) {
            return false;
        }
        cancel.cancel();
        self.stops.insert((job, token), why);
        true
    }

    /// Stops every running attempt for `why`.
    fn stop_all(&mut self, why: Stop) {
        let running: Vec<(JobId, u64)> = self.running.iter().map(|(&j, &(t, _))| (j, t)).collect();
        for (job, token) in running {
            self.stop(job, token, why.clone());
        }
    }

    /// Reports an attempt this node will not run as given back at once (it never started).
    fn give_back(
        &mut self,
        myself: &ActorRef<ExecutorMsg>,
        job: JobId,
        token: u64,
        reason: String,
    ) {
        self.outbox.push(Completion {
            job,
            token,
            outcome: Outcome::Abandoned { reason },
        });
        self.flush(myself);
    }

    fn start(&mut self, myself: &ActorRef<ExecutorMsg>, start: StartAttempt) {
        let node = self.node.clone();
        if start.node != node.id || start.incarnation != node.incarnation() {
            return;
        }
        if self
            .started
            .get(&start.job)
            .is_some_and(|(token, _)| *token >= start.token)
        {
            return;
        }
        self.started.insert(start.job, (start.token, 0));
        if self.drain_passed {
            // Assigned just before the drain (or its deadline) applied: give it straight back.
            let reason = format!("node {} is drained past its deadline: not started", node.id);
            self.give_back(myself, start.job, start.token, reason);
            return;
        }
        if !node.lease_valid() {
            // Invariant 4: no lease, no execution. A node whose renewals are only slow gets its
            // lease back within moments: hold the start until then (giving it straight back
            // would have the leader assign it again and again while the lease is out, and that
            // churn makes a busy cluster busier). CheckLease gives it back if the lease stays out.
            if self.held.len() < node.config.slots as usize {
                self.held.push((start, tokio::time::Instant::now()));
            } else {
                let reason = format!(
                    "node {} had no valid lease (no committed renewal for {:?}): not started",
                    node.id, node.config.lease.self_fence_after
                );
                self.give_back(myself, start.job, start.token, reason);
            }
            return;
        }
        self.run(myself, start);
    }

    /// Starts held attempts once the lease is valid again; gives back those held for longer
    /// than `lease.self-fence-after` (the lease is not coming back soon: let another node run
    /// them) and drops those no longer current.
    fn release_held(&mut self, myself: &ActorRef<ExecutorMsg>) {
        if self.held.is_empty() {
            return;
        }
        let node = self.node.clone();
        let valid = node.lease_valid();
        let hold_max = node.config.lease.self_fence_after;
        let held = std::mem::take(&mut self.held);
        for (start, since) in held {
            let current = start.incarnation == node.incarnation()
                && node.read(|t| {
                    t.job(start.job)
                        .and_then(|j| j.current_attempt())
                        .is_some_and(|a| a.token == start.token)
                });
            if !current {
                continue;
            }
            if valid && !self.drain_passed {
                self.run(myself, start);
            } else if since.elapsed() >= hold_max || self.drain_passed {
                let reason = format!(
                    "node {} had no valid lease (no committed renewal for {:?}): not started",
                    node.id, hold_max
                );
                self.give_back(myself, start.job, start.token, reason);
            } else {
                self.held.push((start, since));
            }
        }
    }

    /// Runs an attempt under a valid lease.
    fn run(&mut self, myself: &ActorRef<ExecutorMsg>, start: StartAttempt) {
        let node = self.node.clone();
        // Something runs only under a valid lease, and from here CheckLease watches it lapse.
        self.fenced = false;
        if let Some(&(previous, _)) = self.running.get(&start.job) {
            // A newer attempt of a job still running here: the old one is fenced off.
            self.stop(start.job, previous, Stop::NoLongerCurrent);
        }
        let cancel = CancellationToken::new();
        self.running
            .insert(start.job, (start.token, cancel.clone()));
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

    fn flush(&mut self, myself: &ActorRef<ExecutorMsg>) {
        if self.flushing || self.outbox.is_empty() {
            return;
        }
        let take = self.outbox.len().min(COMPLETE_BATCH_MAX);
        let batch: Vec<Completion> = self.outbox.drain(..take).collect();
        self.flushing = true;
        let node = self.node.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let result = node.propose(Command::Complete(batch.clone())).await;
            let committed = match result {
                Ok(Response::Completed { rejected, .. }) => {
                    for (job, why) in rejected {
                        if matches!(why, exactly_core::Rejection::Finished(_)) {
                            tracing::debug!(job, %why, "late report of a cancelled attempt");
                        } else {
                            tracing::warn!(job, %why, "completion refused by the state machine");
                        }
                    }
                    true
                }
                Ok(other) => {
                    tracing::error!(?other, "unexpected response to Complete");
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
