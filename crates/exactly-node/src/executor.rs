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

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use exactly_core::limits::COMPLETE_BATCH_MAX;
use exactly_core::{Command, Completion, JobId, Outcome, Response, StartAttempt};
use exactly_handlers::{HandlerOutcome, JobContext};
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
    /// A handler task finished.
    Finished {
        job: JobId,
        token: u64,
        outcome: HandlerOutcome,
    },
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
    /// Attempts cancelled because this node's drain deadline passed: unless the handler still
    /// succeeded, their outcome is reported as given back (`Outcome::Abandoned`), not as a
    /// failure, so the job runs again at once elsewhere without losing an attempt.
    released: HashSet<(JobId, u64)>,
    /// This node's drain deadline has passed, as of the last reconciliation (read once per
    /// [`RECONCILE_INTERVAL`] with the rest of the state, not on every start).
    drain_passed: bool,
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
            released: HashSet::new(),
            drain_passed: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ExecutorMsg>,
        msg: ExecutorMsg,
        state: &mut ExecutorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ExecutorMsg::Start(start) => state.start(&myself, start),
            ExecutorMsg::Finished {
                job,
                token,
                outcome,
            } => {
                if state.running.get(&job).is_some_and(|(t, _)| *t == token) {
                    state.running.remove(&job);
                }
                let released = state.released.remove(&(job, token));
                let outcome = match outcome {
                    HandlerOutcome::Succeeded(result) => Outcome::Succeeded { result },
                    HandlerOutcome::Failed { error, .. } if released => Outcome::Abandoned {
                        reason: format!(
                            "node {} was drained past its deadline: {error}",
                            state.node.id
                        ),
                    },
                    HandlerOutcome::Failed { error, retryable } => {
                        Outcome::Failed { error, retryable }
                    }
                };
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
                    tracing::warn!(
                        node = state.node.id,
                        running = state.running.len(),
                        "lease lapsed: fencing (cancelling every running attempt)"
                    );
                    for (_, cancel) in state.running.values() {
                        cancel.cancel();
                    }
                } else if valid && state.fenced {
                    state.fenced = false;
                    tracing::info!(node = state.node.id, "lease valid: running attempts");
                }
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
                for (job, (token, cancel)) in &state.running {
                    let known = state.started.get(job).is_some_and(|(t, _)| t == token);
                    if !known && !cancel.is_cancelled() {
                        tracing::info!(job, token, "attempt no longer current: stopping it");
                        cancel.cancel();
                    }
                }
            }
            ExecutorMsg::Cancel { job, token } => {
                if let Some((running, cancel)) = state.running.get(&job) {
                    if *running == token {
                        tracing::info!(job, token, "attempt cancelled by a client");
                        cancel.cancel();
                    }
                }
            }
            ExecutorMsg::CancelAll => {
                for (_, (_, cancel)) in state.running.iter() {
                    cancel.cancel();
                }
            }
        }
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
        let id = self.node.id;
        for (&job, (token, cancel)) in &self.running {
            if self.released.insert((job, *token)) {
                tracing::info!(node = id, job, token, "drain deadline passed: cancelling");
                cancel.cancel();
            }
        }
    }

    fn start(&mut self, myself: &ActorRef<ExecutorMsg>, start: StartAttempt) {
        let node = &self.node;
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
            self.released.insert((start.job, start.token));
            let _ = myself.send_message(ExecutorMsg::Finished {
                job: start.job,
                token: start.token,
                outcome: HandlerOutcome::Failed {
                    error: "not started".into(),
                    retryable: true,
                },
            });
            return;
        }
        if !node.lease_valid() {
            // Invariant 4: no lease, no execution. Report it so the job moves on sooner than
            // the expiry would move it (the report is refused if the expiry came first).
            let _ = myself.send_message(ExecutorMsg::Finished {
                job: start.job,
                token: start.token,
                outcome: HandlerOutcome::Failed {
                    error: format!("node {} has no valid lease (fenced); not started", node.id),
                    retryable: true,
                },
            });
            return;
        }
        // Something runs only under a valid lease, and from here CheckLease watches it lapse.
        self.fenced = false;
        if let Some((_, previous)) = self.running.get(&start.job) {
            // A newer attempt of a job still running here: the old one is fenced off.
            previous.cancel();
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
            let outcome = match (handler, payload) {
                (None, _) => HandlerOutcome::Failed {
                    error: format!("no handler for kind {:?} on node {node_id}", start.kind),
                    retryable: false,
                },
                (_, Err(e)) => HandlerOutcome::Failed {
                    error: format!("cannot read payload on node {node_id}: {e}"),
                    retryable: true,
                },
                // The job finished after the snapshot this attempt came from; its outcome is
                // refused as stale, and it never runs without its payload.
                (_, Ok(None)) => HandlerOutcome::Failed {
                    error: format!("payload of job {job} is gone on node {node_id}"),
                    retryable: true,
                },
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
            let _ = me.send_message(ExecutorMsg::Finished {
                job,
                token,
                outcome,
            });
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

/// Runs a handler until it finishes, times out, or is cancelled (fencing, shutdown); then
/// cancels it and waits at most `grace` before dropping it (the `exec` handler's drop guard
/// kills its process group).
async fn run_attempt(
    run: futures::future::BoxFuture<'static, HandlerOutcome>,
    cancel: CancellationToken,
    timeout: Duration,
    grace: Duration,
) -> HandlerOutcome {
    let mut run = run;
    let reason = tokio::select! {
        outcome = &mut run => return outcome,
        _ = tokio::time::sleep(timeout) => format!("timed out after {timeout:?}"),
        _ = cancel.cancelled() => "cancelled".to_string(),
    };
    cancel.cancel();
    match tokio::time::timeout(grace, &mut run).await {
        Ok(HandlerOutcome::Succeeded(result)) => HandlerOutcome::Succeeded(result),
        Ok(HandlerOutcome::Failed { error, .. }) => HandlerOutcome::Failed {
            error: format!("{reason}: {error}"),
            retryable: true,
        },
        Err(_) => {
            drop(run);
            HandlerOutcome::Failed {
                error: format!("{reason}; killed after a grace of {grace:?}"),
                retryable: true,
            }
        }
    }
}
