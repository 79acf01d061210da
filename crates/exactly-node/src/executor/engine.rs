//! The executor's decisions, as a pure state machine in the shape of `JobTable::apply`: which
//! attempts start, which are held while the lease is out, which are stopped and why, what is
//! given back, and how completions are batched into proposals.
//!
//! [`Engine::handle`] takes one [`Event`] with everything it needs to know about the world as
//! plain values (the lease's validity, this node's incarnation, what the local replica shows,
//! a monotonic `now_ms`) and returns the [`Action`]s the actor carries out: no tokio, no I/O, no
//! clock. [`Engine::check_invariants`] states what must hold after every event; the tests below
//! check it after every step of table tests and of a property test over random interleavings.
//!
//! Invariants (DESIGN's invariant 4, "no lease, no execution", and the executor's share of
//! exactly-once):
//! 1. At most one handler of a job runs here unstopped, and it is the newest attempt this
//!    incarnation started for the job: an older one is stopped the moment a newer one arrives.
//! 2. While the node is fenced (its lease lapsed) or drained past its deadline, every handler
//!    is stopped; nothing starts without a valid lease or after the drain deadline.
//! 3. An attempt (job, token) starts at most once, however often it is announced (an applied
//!    Assign, reconciliation from a snapshot, a held start released).
//! 4. Every handler that ends and every attempt given back yields exactly one completion, and
//!    every completion is proposed until a proposal carrying it commits (a failed proposal puts
//!    its batch back); at most `batch_max` per proposal and `proposals_max` proposals in
//!    flight.
//! 5. At most `slots` starts are held while the lease is out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use exactly_core::{Completion, JobId, NodeId, Outcome, StartAttempt};

use super::{outcome_of, RunEnd, Stop};

/// Delay before proposing completions again after a failed proposal.
pub const FLUSH_RETRY_DELAY: Duration = Duration::from_millis(200);

/// What the engine is configured with (fixed for a node's life).
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: NodeId,
    /// Attempts this node runs at once; also the most starts held while the lease is out.
    pub slots: u32,
    /// `lease.self-fence-after`: how long a lapsed lease is waited for before held starts are
    /// given back, and what a fence reports.
    pub self_fence_after: Duration,
    /// Completions per proposal.
    pub batch_max: usize,
    /// Proposals in flight at once. One made a finished attempt wait for the commit of the
    /// previous batch before its own was even proposed (measured at 500 jobs/s: a median of
    /// 1.0 ms, a 90th percentile of 7.5 ms between a handler's end and its proposal).
    pub proposals_max: usize,
}

/// What the local replica shows at one reconciliation (read by the actor in one pass).
#[derive(Clone, Debug, Default)]
pub struct ReplicaView {
    /// Of the attempts [`Engine::watched`] asked about, those the replica shows as their job's
    /// current attempt.
    pub current: BTreeSet<(JobId, u64)>,
    /// Attempts the replica shows running on this node's current incarnation.
    pub mine: Vec<StartAttempt>,
    /// This node's drain deadline has passed (by the replicated leader time).
    pub drain_passed: bool,
}

/// What happened, as the actor saw it.
#[derive(Debug)]
pub enum Event {
    /// An applied Assign started an attempt (possibly on another node: filtered here).
    Start(StartAttempt),
    /// A handler task ended (by itself, or stopped by this engine or its timeout).
    Finished { job: JobId, token: u64, end: RunEnd },
    /// A Complete proposal returned: committed, or failed (its batch goes back to the outbox).
    Flushed {
        batch: Vec<Completion>,
        committed: bool,
    },
    /// The retry delay after a failed proposal passed.
    FlushTimer,
    /// The periodic lease check. Held starts are released or given back here; `current` are
    /// those of [`Engine::watched`] the replica shows current.
    CheckLease { current: BTreeSet<(JobId, u64)> },
    /// The periodic comparison with the replica.
    Reconcile(ReplicaView),
    /// A client cancelled this attempt (the state machine already ended it).
    Cancel { job: JobId, token: u64 },
    /// The node is stopping: stop every handler.
    CancelAll,
}

/// The world as of one event: inputs, never read by the engine itself.
#[derive(Clone, Copy, Debug)]
pub struct World {
    /// This node's lease is valid now.
    pub lease_valid: bool,
    /// This node's current incarnation.
    pub incarnation: u64,
    /// Monotonic milliseconds (any fixed origin).
    pub now_ms: u64,
}

/// What the actor is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run this attempt's handler (under a cancellation token of its own, keyed by job and
    /// token), and answer [`Event::Finished`] when it ends.
    Run(StartAttempt),
    /// Cancel the running handler of `(job, token)`, for `why`.
    Stop { job: JobId, token: u64, why: Stop },
    /// Propose these completions as one `Complete` command, and answer [`Event::Flushed`].
    Propose(Vec<Completion>),
    /// Send [`Event::FlushTimer`] after this long.
    FlushAfter(Duration),
    /// The lease lapsed: the node fenced itself (for the log; the stops are separate actions).
    Fenced { running: usize },
    /// The lease is valid again.
    Unfenced,
}

/// The executor's state: see the module's invariants.
#[derive(Clone, Debug)]
pub struct Engine {
    settings: Settings,
    /// Every handler task alive, with why this engine stopped it (`None`: running unstopped).
    handlers: BTreeMap<(JobId, u64), Option<Stop>>,
    /// The largest token this incarnation started (or gave back) per job, with the number of
    /// consecutive reconciliations in which the replica did not show it current. The Start of
    /// an attempt is sent when its Assign applies, before the replica can show the attempt
    /// ended; a reconciliation read after one that saw it ended therefore comes after that
    /// Start, so forgetting an entry after two such rounds never lets a Start through twice.
    started: BTreeMap<JobId, (u64, u8)>,
    /// Completions not yet proposed.
    outbox: Vec<Completion>,
    /// Proposals in flight.
    in_flight: usize,
    /// A retry of a failed proposal is scheduled.
    retry_scheduled: bool,
    /// The lease lapsed: nothing runs unstopped until it is valid again.
    fenced: bool,
    /// This node's drain deadline has passed, as of the last reconciliation.
    drain_passed: bool,
    /// Starts that arrived while the lease was out, with when: started once it is valid again,
    /// given back if it stays out for `self_fence_after`.
    held: Vec<(StartAttempt, u64)>,
}

impl Engine {
    /// A new executor: fenced until its lease is seen valid.
    pub fn new(settings: Settings) -> Self {
        Engine {
            settings,
            handlers: BTreeMap::new(),
            started: BTreeMap::new(),
            outbox: Vec::new(),
            in_flight: 0,
            retry_scheduled: false,
            fenced: true,
            drain_passed: false,
            held: Vec::new(),
        }
    }

    /// Handler tasks alive (stopped ones included, until they end).
    pub fn running(&self) -> usize {
        self.handlers.len()
    }

    /// Attempts that ended (or were given back) and whose outcome has not committed yet, plus
    /// starts held: what a stopping node waits for before it goes.
    pub fn unreported(&self) -> usize {
        self.held.len() + self.outbox.len() + self.in_flight
    }

    /// The attempts whose currency the replica is asked about at the next reconciliation:
    /// every started one (held ones included: a held start is recorded as started).
    pub fn watched(&self) -> impl Iterator<Item = (JobId, u64)> + '_ {
        self.started.iter().map(|(&job, &(token, _))| (job, token))
    }

    /// The held starts, whose currency the replica is asked about at the next lease check.
    pub fn held(&self) -> impl Iterator<Item = (JobId, u64)> + '_ {
        self.held.iter().map(|(s, _)| (s.job, s.token))
    }

    /// Applies one event and returns what to do. The invariants hold after it (checked in
    /// debug builds).
    pub fn handle(&mut self, event: Event, world: World) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start(start) => self.start(start, world, &mut out),
            Event::Finished { job, token, end } => {
                let stop = self.handlers.remove(&(job, token)).flatten();
                let outcome = outcome_of(end, stop, self.settings.node);
                self.outbox.push(Completion {
                    job,
                    token,
                    outcome,
                });
            }
            Event::Flushed { batch, committed } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                if !committed {
                    // Proposing again is safe: the state machine accepts a completion only for
                    // the current attempt, so one that did commit is refused as stale.
                    let mut retry = batch;
                    retry.append(&mut self.outbox);
                    self.outbox = retry;
                    if !self.retry_scheduled {
                        self.retry_scheduled = true;
                        out.push(Action::FlushAfter(FLUSH_RETRY_DELAY));
                    }
                    // The retry timer proposes them; proposing now would hammer a failing path.
                    return self.done(out);
                }
            }
            Event::FlushTimer => self.retry_scheduled = false,
            Event::CheckLease { current } => {
                if !world.lease_valid && !self.fenced {
                    self.fenced = true;
                    out.push(Action::Fenced {
                        running: self.handlers.len(),
                    });
                    let after = self.settings.self_fence_after;
                    self.stop_all(Stop::Fenced { after }, &mut out);
                } else if world.lease_valid && self.fenced {
                    self.fenced = false;
                    out.push(Action::Unfenced);
                }
                self.release_held(&current, world, &mut out);
            }
            Event::Reconcile(view) => self.reconcile(view, world, &mut out),
            Event::Cancel { job, token } => self.stop(job, token, Stop::ClientCancelled, &mut out),
            Event::CancelAll => self.stop_all(Stop::ShuttingDown, &mut out),
        }
        self.flush(&mut out);
        self.done(out)
    }

    fn done(&self, out: Vec<Action>) -> Vec<Action> {
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check_invariants() {
            panic!("executor engine: {broken}");
        }
        out
    }

    /// The module's invariants 1, 2 and 5, and the bookkeeping of 4.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut unstopped: BTreeMap<JobId, u64> = BTreeMap::new();
        for (&(job, token), stop) in &self.handlers {
            if stop.is_some() {
                continue;
            }
            if let Some(other) = unstopped.insert(job, token) {
                return Err(format!(
                    "job {job}: attempts {other} and {token} both run unstopped"
                ));
            }
            if self.started.get(&job).map(|&(t, _)| t) != Some(token) {
                return Err(format!(
                    "job {job}: attempt {token} runs unstopped but the newest started is {:?}",
                    self.started.get(&job)
                ));
            }
            if self.fenced {
                return Err(format!("fenced, yet attempt {token} of job {job} runs"));
            }
            if self.drain_passed {
                return Err(format!("drained, yet attempt {token} of job {job} runs"));
            }
        }
        if self.held.len() > self.settings.slots as usize {
            return Err(format!(
                "{} starts held, more than {} slots",
                self.held.len(),
                self.settings.slots
            ));
        }
        if self.in_flight > self.settings.proposals_max {
            return Err(format!(
                "{} proposals in flight, more than {}",
                self.in_flight, self.settings.proposals_max
            ));
        }
        if self.in_flight < self.settings.proposals_max
            && !self.retry_scheduled
            && !self.outbox.is_empty()
        {
            return Err(format!(
                "{} completions wait with room for a proposal and no retry scheduled",
                self.outbox.len()
            ));
        }
        Ok(())
    }

    fn start(&mut self, start: StartAttempt, world: World, out: &mut Vec<Action>) {
        if start.node != self.settings.node || start.incarnation != world.incarnation {
            return;
        }
        if self
            .started
            .get(&start.job)
            .is_some_and(|&(token, _)| token >= start.token)
        {
            return;
        }
        self.started.insert(start.job, (start.token, 0));
        // A newer attempt of a job that still runs here: the old one is fenced off at once,
        // whether or not the new one can start now.
        let older: Vec<u64> = self
            .handlers
            .range((start.job, 0)..(start.job, start.token))
            .map(|(&(_, token), _)| token)
            .collect();
        for token in older {
            self.stop(start.job, token, Stop::NoLongerCurrent, out);
        }
        if self.drain_passed {
            // Assigned just before the drain (or its deadline) applied: give it straight back.
            let reason = format!(
                "node {} is drained past its deadline: not started",
                self.settings.node
            );
            self.give_back(start.job, start.token, reason);
            return;
        }
        if !world.lease_valid {
            // Invariant 2: no lease, no execution. A node whose renewals are only slow gets its
            // lease back within moments: hold the start until then (giving it straight back
            // would have the leader assign it again and again while the lease is out, and that
            // churn makes a busy cluster busier). The lease check gives it back if the lease
            // stays out.
            if self.held.len() < self.settings.slots as usize {
                self.held.push((start, world.now_ms));
            } else {
                let reason = self.no_lease_reason();
                self.give_back(start.job, start.token, reason);
            }
            return;
        }
        self.run(start, out);
    }

    fn no_lease_reason(&self) -> String {
        format!(
            "node {} had no valid lease (no committed renewal for {:?}): not started",
            self.settings.node, self.settings.self_fence_after
        )
    }

    /// Starts held attempts once the lease is valid again; gives back those held for longer
    /// than `self_fence_after` (the lease is not coming back soon: let another node run them)
    /// and drops those no longer current (superseded here, or ended on the replica).
    fn release_held(
        &mut self,
        current: &BTreeSet<(JobId, u64)>,
        world: World,
        out: &mut Vec<Action>,
    ) {
        let hold_max = self.settings.self_fence_after.as_millis() as u64;
        for (start, since) in std::mem::take(&mut self.held) {
            let newest = self.started.get(&start.job).map(|&(t, _)| t) == Some(start.token);
            if start.incarnation != world.incarnation
                || !newest
                || !current.contains(&(start.job, start.token))
            {
                continue;
            }
            if world.lease_valid && !self.drain_passed {
                self.run(start, out);
            } else if world.now_ms.saturating_sub(since) >= hold_max || self.drain_passed {
                let reason = self.no_lease_reason();
                self.give_back(start.job, start.token, reason);
            } else {
                self.held.push((start, since));
            }
        }
    }

    fn reconcile(&mut self, view: ReplicaView, world: World, out: &mut Vec<Action>) {
        self.drain_passed = view.drain_passed;
        if self.drain_passed {
            // Every handler is stopped; each is reported as given back when it has ended (or
            // was killed after the kill grace), never before, so the job cannot run twice.
            self.stop_all(Stop::Drained, out);
        }
        // Forget a started attempt after two rounds in which the replica did not show it.
        let started = std::mem::take(&mut self.started);
        self.started = started
            .into_iter()
            .filter_map(|(job, (token, stale_rounds))| {
                let stale_rounds = if view.current.contains(&(job, token)) {
                    0
                } else {
                    stale_rounds + 1
                };
                (stale_rounds < 2).then_some((job, (token, stale_rounds)))
            })
            .collect();
        // Attempts the replica gives this incarnation that no Start announced (they arrived
        // inside a snapshot).
        for start in view.mine {
            self.start(start, world, out);
        }
        // A handler the replica has shown ended for two rounds is over (a cancel or a
        // reassignment whose message this node missed, e.g. across a snapshot): stop it.
        let gone: Vec<(JobId, u64)> = self
            .handlers
            .iter()
            .filter(|(&(job, token), stop)| {
                stop.is_none() && self.started.get(&job).is_none_or(|&(t, _)| t != token)
            })
            .map(|(&key, _)| key)
            .collect();
        for (job, token) in gone {
            self.stop(job, token, Stop::NoLongerCurrent, out);
        }
    }

    /// Stops the handler of `(job, token)` for `why`, unless it is not running or is already
    /// stopping (the first reason stands).
    fn stop(&mut self, job: JobId, token: u64, why: Stop, out: &mut Vec<Action>) {
        if let Some(stop @ None) = self.handlers.get_mut(&(job, token)) {
            *stop = Some(why.clone());
            out.push(Action::Stop { job, token, why });
        }
    }

    fn stop_all(&mut self, why: Stop, out: &mut Vec<Action>) {
        let unstopped: Vec<(JobId, u64)> = self
            .handlers
            .iter()
            .filter(|(_, stop)| stop.is_none())
            .map(|(&key, _)| key)
            .collect();
        for (job, token) in unstopped {
            self.stop(job, token, why.clone(), out);
        }
    }

    /// Reports an attempt this node will not run as given back (it never started).
    fn give_back(&mut self, job: JobId, token: u64, reason: String) {
        self.outbox.push(Completion {
            job,
            token,
            outcome: Outcome::Abandoned { reason },
        });
    }

    /// Runs an attempt under a valid lease.
    fn run(&mut self, start: StartAttempt, out: &mut Vec<Action>) {
        // Something runs only under a valid lease, and from here the lease check watches it.
        self.fenced = false;
        self.handlers.insert((start.job, start.token), None);
        out.push(Action::Run(start));
    }

    /// Proposes what waits, in batches of at most `batch_max`, while fewer than
    /// `proposals_max` proposals are in flight and no retry is scheduled.
    fn flush(&mut self, out: &mut Vec<Action>) {
        while self.in_flight < self.settings.proposals_max
            && !self.retry_scheduled
            && !self.outbox.is_empty()
        {
            let take = self.outbox.len().min(self.settings.batch_max);
            let batch: Vec<Completion> = self.outbox.drain(..take).collect();
            self.in_flight += 1;
            out.push(Action::Propose(batch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_handlers::HandlerOutcome;
    use proptest::prelude::*;

    const NODE: NodeId = 2;
    const INC: u64 = 7;
    const FENCE: Duration = Duration::from_millis(2500);

    fn engine(slots: u32, batch_max: usize) -> Engine {
        engine_with(slots, batch_max, 1)
    }

    fn engine_with(slots: u32, batch_max: usize, proposals_max: usize) -> Engine {
        Engine::new(Settings {
            node: NODE,
            slots,
            self_fence_after: FENCE,
            batch_max,
            proposals_max,
        })
    }

    fn attempt(job: JobId, token: u64) -> StartAttempt {
        StartAttempt {
            job,
            token,
            attempt: 1,
            node: NODE,
            incarnation: INC,
            queue: "default".into(),
            kind: "noop".into(),
            timeout_ms: 0,
            idempotency_key: format!("job-{job}"),
        }
    }

    fn valid(now_ms: u64) -> World {
        World {
            lease_valid: true,
            incarnation: INC,
            now_ms,
        }
    }

    fn lapsed(now_ms: u64) -> World {
        World {
            lease_valid: false,
            ..valid(now_ms)
        }
    }

    fn runs(actions: &[Action]) -> Vec<(JobId, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Run(s) => Some((s.job, s.token)),
                _ => None,
            })
            .collect()
    }

    fn stops(actions: &[Action]) -> Vec<(JobId, u64, Stop)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Stop { job, token, why } => Some((*job, *token, why.clone())),
                _ => None,
            })
            .collect()
    }

    fn proposed(actions: &[Action]) -> Vec<Vec<Completion>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Propose(batch) => Some(batch.clone()),
                _ => None,
            })
            .collect()
    }

    fn succeeded() -> RunEnd {
        RunEnd::Reported(HandlerOutcome::Succeeded(vec![]))
    }

    fn current(attempts: &[(JobId, u64)]) -> BTreeSet<(JobId, u64)> {
        attempts.iter().copied().collect()
    }

    /// An attempt starts once however it is announced (an applied Assign, again, or by
    /// reconciliation), an older token never starts after a newer one, and Starts for another
    /// node or another incarnation of this one are not ours.
    #[test]
    fn an_attempt_starts_once_however_it_is_announced() {
        let mut e = engine(4, 10);
        assert_eq!(
            runs(&e.handle(Event::Start(attempt(1, 10)), valid(0))),
            vec![(1, 10)]
        );
        assert!(e.handle(Event::Start(attempt(1, 10)), valid(1)).is_empty());
        let view = ReplicaView {
            current: current(&[(1, 10)]),
            mine: vec![attempt(1, 10)],
            drain_passed: false,
        };
        assert!(runs(&e.handle(Event::Reconcile(view), valid(2))).is_empty());
        assert!(e.handle(Event::Start(attempt(1, 9)), valid(3)).is_empty());
        let other_node = StartAttempt {
            node: NODE + 1,
            ..attempt(2, 11)
        };
        assert!(e.handle(Event::Start(other_node), valid(4)).is_empty());
        let old_life = StartAttempt {
            incarnation: INC - 1,
            ..attempt(3, 12)
        };
        assert!(e.handle(Event::Start(old_life), valid(5)).is_empty());
        assert_eq!(e.running(), 1);
    }

    /// A newer attempt of a job running here stops the old one at once (even when the lease is
    /// out and the new one is only held); the old one's report is what its stop says.
    #[test]
    fn a_newer_attempt_stops_the_older_one() {
        let mut e = engine(4, 10);
        e.handle(Event::Start(attempt(1, 10)), valid(0));
        let out = e.handle(Event::Start(attempt(1, 20)), lapsed(1));
        assert_eq!(stops(&out), vec![(1, 10, Stop::NoLongerCurrent)]);
        assert!(runs(&out).is_empty(), "no lease: held, not run");
        let out = e.handle(
            Event::Finished {
                job: 1,
                token: 10,
                end: RunEnd::Stopped {
                    handler: Some(HandlerOutcome::cancelled()),
                },
            },
            lapsed(2),
        );
        let batch = &proposed(&out)[0];
        assert_eq!((batch[0].job, batch[0].token), (1, 10));
        assert!(
            matches!(&batch[0].outcome, Outcome::Abandoned { reason } if reason.starts_with("no longer the job's current attempt")),
            "{batch:?}"
        );
        let out = e.handle(
            Event::CheckLease {
                current: current(&[(1, 20)]),
            },
            valid(3),
        );
        assert_eq!(runs(&out), vec![(1, 20)]);
    }

    /// No lease, no execution: a start is held (at most `slots` of them, the rest given back at
    /// once), run when the lease comes back, given back when it stays out for
    /// `self-fence-after`, and dropped when the replica no longer shows it current.
    #[test]
    fn without_a_lease_starts_are_held_then_run_or_given_back() {
        let mut e = engine(2, 10);
        for (job, token) in [(1, 10), (2, 11), (3, 12)] {
            e.handle(Event::Start(attempt(job, token)), lapsed(0));
        }
        assert_eq!(e.held().collect::<Vec<_>>(), vec![(1, 10), (2, 11)]);
        // The third was given back at once (and proposed).
        assert_eq!(e.unreported(), 3);
        // Still out, not for long enough: kept. Job 2 ended on the replica: dropped.
        let out = e.handle(
            Event::CheckLease {
                current: current(&[(1, 10)]),
            },
            lapsed(FENCE.as_millis() as u64 - 1),
        );
        assert!(runs(&out).is_empty());
        assert_eq!(e.held().collect::<Vec<_>>(), vec![(1, 10)]);
        // Out for `self-fence-after`: given back.
        e.handle(
            Event::CheckLease {
                current: current(&[(1, 10)]),
            },
            lapsed(FENCE.as_millis() as u64),
        );
        assert_eq!(e.held().count(), 0);
        let mut e = engine(2, 10);
        e.handle(Event::Start(attempt(1, 10)), lapsed(0));
        let out = e.handle(
            Event::CheckLease {
                current: current(&[(1, 10)]),
            },
            valid(100),
        );
        assert_eq!(runs(&out), vec![(1, 10)]);
        assert!(out.contains(&Action::Unfenced));
    }

    /// A lapsed lease fences the node: every handler is stopped, each is reported as given back
    /// once it ended (never before), and nothing runs until the lease is valid again.
    #[test]
    fn a_lapsed_lease_stops_everything_and_gives_it_back_when_it_ended() {
        let mut e = engine(4, 10);
        e.handle(Event::Start(attempt(1, 10)), valid(0));
        e.handle(Event::Start(attempt(2, 11)), valid(0));
        let out = e.handle(
            Event::CheckLease {
                current: BTreeSet::new(),
            },
            lapsed(10),
        );
        assert!(out.contains(&Action::Fenced { running: 2 }));
        let fenced = Stop::Fenced { after: FENCE };
        assert_eq!(
            stops(&out),
            vec![(1, 10, fenced.clone()), (2, 11, fenced.clone())]
        );
        assert!(
            proposed(&out).is_empty(),
            "nothing reported before it ended"
        );
        let out = e.handle(
            Event::Finished {
                job: 1,
                token: 10,
                end: RunEnd::Stopped { handler: None },
            },
            lapsed(20),
        );
        let batch = &proposed(&out)[0];
        assert!(
            matches!(&batch[0].outcome, Outcome::Abandoned { reason } if reason.contains("fenced itself"))
        );
        // A success within the grace stands.
        e.handle(
            Event::Flushed {
                batch: batch.clone(),
                committed: true,
            },
            lapsed(21),
        );
        let out = e.handle(
            Event::Finished {
                job: 2,
                token: 11,
                end: RunEnd::Stopped {
                    handler: Some(HandlerOutcome::Succeeded(b"done".to_vec())),
                },
            },
            lapsed(22),
        );
        assert!(matches!(
            proposed(&out)[0][0].outcome,
            Outcome::Succeeded { .. }
        ));
        assert_eq!(e.running(), 0);
    }

    /// Past the drain deadline every handler is stopped and a start that still arrives is given
    /// back at once, lease or not.
    #[test]
    fn past_the_drain_deadline_nothing_runs() {
        let mut e = engine(4, 10);
        e.handle(Event::Start(attempt(1, 10)), valid(0));
        let view = ReplicaView {
            current: current(&[(1, 10)]),
            mine: vec![attempt(1, 10)],
            drain_passed: true,
        };
        let out = e.handle(Event::Reconcile(view), valid(1));
        assert_eq!(stops(&out), vec![(1, 10, Stop::Drained)]);
        let out = e.handle(Event::Start(attempt(2, 11)), valid(2));
        assert!(runs(&out).is_empty());
        let batch = &proposed(&out)[0];
        assert!(
            matches!(&batch[0].outcome, Outcome::Abandoned { reason } if reason.contains("drained"))
        );
    }

    /// The handler of `job`'s attempt `10 + job` (as the batching tests start them) succeeds.
    fn finish(e: &mut Engine, job: JobId) -> Vec<Action> {
        e.handle(
            Event::Finished {
                job,
                token: 10 + job,
                end: succeeded(),
            },
            valid(1),
        )
    }

    /// Completions batch: one proposal in flight; what ends meanwhile goes in the next, at
    /// most `batch_max` per proposal; a failed proposal goes back in front and is retried after
    /// the delay, not at once.
    #[test]
    fn completions_are_batched_with_one_proposal_in_flight() {
        let mut e = engine(8, 2);
        for job in 1..=4 {
            e.handle(Event::Start(attempt(job, 10 + job)), valid(0));
        }
        let first = proposed(&finish(&mut e, 1));
        assert_eq!(first.len(), 1);
        for job in 2..=4 {
            assert!(proposed(&finish(&mut e, job)).is_empty(), "one in flight");
        }
        let out = e.handle(
            Event::Flushed {
                batch: first[0].clone(),
                committed: false,
            },
            valid(2),
        );
        assert_eq!(out, vec![Action::FlushAfter(FLUSH_RETRY_DELAY)]);
        let out = e.handle(Event::FlushTimer, valid(200));
        let again = proposed(&out);
        let jobs: Vec<JobId> = again[0].iter().map(|c| c.job).collect();
        assert_eq!(
            jobs,
            vec![1, 2],
            "the failed batch first, then at most batch_max"
        );
        let out = e.handle(
            Event::Flushed {
                batch: again[0].clone(),
                committed: true,
            },
            valid(201),
        );
        let jobs: Vec<JobId> = proposed(&out)[0].iter().map(|c| c.job).collect();
        assert_eq!(jobs, vec![3, 4]);
    }

    /// With room for two proposals, a completion is proposed at once while another is in
    /// flight; a third waits for either to return, and goes then with what else waited.
    #[test]
    fn completions_are_proposed_while_others_are_in_flight_up_to_the_bound() {
        let mut e = engine_with(8, 4, 2);
        for job in 1..=4 {
            e.handle(Event::Start(attempt(job, 10 + job)), valid(0));
        }
        let first = proposed(&finish(&mut e, 1));
        let second = proposed(&finish(&mut e, 2));
        assert_eq!((first.len(), second.len()), (1, 1), "two in flight");
        assert_eq!(second[0][0].job, 2);
        assert!(proposed(&finish(&mut e, 3)).is_empty(), "the third waits");
        assert!(proposed(&finish(&mut e, 4)).is_empty(), "the fourth waits");
        assert_eq!(e.unreported(), 4, "two proposals in flight and two waiting");
        // The second returns first: the two waiting go together.
        let out = e.handle(
            Event::Flushed {
                batch: second[0].clone(),
                committed: true,
            },
            valid(2),
        );
        let jobs: Vec<JobId> = proposed(&out)[0].iter().map(|c| c.job).collect();
        assert_eq!(jobs, vec![3, 4]);
        // A failure puts its batch back and holds every proposal until the retry delay.
        let out = e.handle(
            Event::Flushed {
                batch: first[0].clone(),
                committed: false,
            },
            valid(3),
        );
        assert_eq!(out, vec![Action::FlushAfter(FLUSH_RETRY_DELAY)]);
        let out = e.handle(Event::FlushTimer, valid(203));
        let jobs: Vec<JobId> = proposed(&out)[0].iter().map(|c| c.job).collect();
        assert_eq!(jobs, vec![1]);
    }

    /// Reconciliation forgets a started attempt after two rounds in which the replica did not
    /// show it current, and stops a handler whose attempt the replica has shown ended; a start
    /// of an attempt still remembered is not run again.
    #[test]
    fn reconciliation_stops_what_ended_after_two_rounds() {
        let mut e = engine(4, 10);
        e.handle(Event::Start(attempt(1, 10)), valid(0));
        let gone = || ReplicaView::default();
        let out = e.handle(Event::Reconcile(gone()), valid(1000));
        assert!(stops(&out).is_empty(), "one round is not enough");
        let out = e.handle(Event::Reconcile(gone()), valid(2000));
        assert_eq!(stops(&out), vec![(1, 10, Stop::NoLongerCurrent)]);
        // A round that sees it current again resets the count.
        let mut e = engine(4, 10);
        e.handle(Event::Start(attempt(1, 10)), valid(0));
        e.handle(Event::Reconcile(gone()), valid(1000));
        let seen = ReplicaView {
            current: current(&[(1, 10)]),
            ..ReplicaView::default()
        };
        e.handle(Event::Reconcile(seen), valid(2000));
        let out = e.handle(Event::Reconcile(gone()), valid(3000));
        assert!(stops(&out).is_empty());
        assert_eq!(e.watched().collect::<Vec<_>>(), vec![(1, 10)]);
    }

    /// A client's cancel stops the handler once, with its own reason; a cancel of an attempt
    /// not running here does nothing.
    #[test]
    fn a_cancel_stops_the_handler_once() {
        let mut e = engine(4, 10);
        e.handle(Event::Start(attempt(1, 10)), valid(0));
        assert!(e
            .handle(Event::Cancel { job: 1, token: 9 }, valid(1))
            .is_empty());
        let out = e.handle(Event::Cancel { job: 1, token: 10 }, valid(1));
        assert_eq!(stops(&out), vec![(1, 10, Stop::ClientCancelled)]);
        assert!(
            e.handle(Event::CancelAll, valid(2)).is_empty(),
            "already stopping"
        );
    }

    /// One step of the property test's world.
    #[derive(Clone, Debug)]
    enum Step {
        /// The leader assigns a new attempt of `job` (to this node unless `elsewhere`).
        Assign {
            job: JobId,
            elsewhere: bool,
        },
        /// The replica ends `job`'s current attempt (completion committed, cancel, expiry).
        End {
            job: JobId,
            cancel: bool,
        },
        /// Re-deliver an earlier Start (duplicate Assign effect, replay).
        Replay(usize),
        /// One handler alive ends.
        Finish(usize, u8),
        /// One of the proposals in flight returns.
        Flushed(usize, bool),
        FlushTimer,
        Lease(bool),
        Reconcile {
            drain: bool,
        },
        Tick(u16),
        CancelAll,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..6, proptest::bool::weighted(0.2))
                .prop_map(|(job, elsewhere)| Step::Assign { job, elsewhere }),
            2 => (0u64..6, any::<bool>()).prop_map(|(job, cancel)| Step::End { job, cancel }),
            1 => (0usize..64).prop_map(Step::Replay),
            4 => (0usize..64, 0u8..4).prop_map(|(i, how)| Step::Finish(i, how)),
            3 => (0usize..4, any::<bool>()).prop_map(|(i, ok)| Step::Flushed(i, ok)),
            1 => Just(Step::FlushTimer),
            2 => proptest::bool::weighted(0.75).prop_map(Step::Lease),
            2 => proptest::bool::weighted(0.05).prop_map(|drain| Step::Reconcile { drain }),
            2 => (0u16..3000).prop_map(Step::Tick),
            1 => Just(Step::CancelAll),
        ]
    }

    /// The property test's stand-in for the actor: what it was told to do, and what it saw.
    #[derive(Default)]
    struct Shell {
        /// Handlers running (stopped ones included until they end).
        alive: Vec<(JobId, u64)>,
        in_flight: Vec<Vec<Completion>>,
        timer: bool,
        ran: BTreeSet<(JobId, u64)>,
        newest_run: BTreeMap<JobId, u64>,
        /// Completions in proposals that committed.
        reported: Vec<(JobId, u64)>,
        drained: bool,
    }

    impl Shell {
        fn apply(
            &mut self,
            e: &mut Engine,
            event: Event,
            world: World,
        ) -> Result<(), TestCaseError> {
            let out = e.handle(event, world);
            prop_assert_eq!(e.check_invariants(), Ok(()));
            for action in out {
                match action {
                    Action::Run(s) => {
                        prop_assert!(world.lease_valid, "ran {} without a lease", s.job);
                        prop_assert!(!self.drained, "ran {} after the drain deadline", s.job);
                        prop_assert_eq!(s.incarnation, world.incarnation);
                        prop_assert!(
                            self.ran.insert((s.job, s.token)),
                            "ran {:?} twice",
                            (s.job, s.token)
                        );
                        let newest = self.newest_run.entry(s.job).or_insert(0);
                        prop_assert!(s.token > *newest, "ran an older attempt of {}", s.job);
                        *newest = s.token;
                        self.alive.push((s.job, s.token));
                    }
                    Action::Propose(batch) => {
                        prop_assert!(self.in_flight.len() < 2, "three proposals in flight");
                        prop_assert!(!batch.is_empty() && batch.len() <= 4);
                        self.in_flight.push(batch);
                    }
                    Action::FlushAfter(_) => self.timer = true,
                    Action::Stop { .. } | Action::Fenced { .. } | Action::Unfenced => {}
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random interleavings of assignments, replica changes, handler ends, proposal
        /// results, lease changes and reconciliations, with a replica whose attempts only move
        /// forward (as a real one): the invariants hold after every event; no attempt runs
        /// twice, none runs without a lease or after the drain deadline, none runs older than
        /// one this node already started; and once everything has ended and every proposal
        /// committed, each attempt that ran or was given back is reported exactly once.
        #[test]
        fn the_executor_keeps_its_guarantees_under_any_interleaving(
            steps in proptest::collection::vec(step(), 1..160),
        ) {
            let mut e = engine_with(3, 4, 2);
            let mut world = valid(0);
            let mut next_token = 100u64;
            // The replica: each job's current attempt (token, on this node, still open).
            let mut replica: BTreeMap<JobId, (u64, bool, bool)> = BTreeMap::new();
            let mut announced: Vec<StartAttempt> = Vec::new();
            let mut shell = Shell::default();
            for s in steps {
                let event = match s {
                    Step::Assign { job, elsewhere } => {
                        next_token += 1;
                        replica.insert(job, (next_token, !elsewhere, true));
                        let start = StartAttempt {
                            node: if elsewhere { NODE + 1 } else { NODE },
                            ..attempt(job, next_token)
                        };
                        announced.push(start.clone());
                        Event::Start(start)
                    }
                    Step::End { job, cancel } => {
                        let Some(entry) = replica.get_mut(&job) else { continue };
                        entry.2 = false;
                        if cancel && entry.1 {
                            Event::Cancel { job, token: entry.0 }
                        } else {
                            continue;
                        }
                    }
                    // A Start is sent once, when its Assign applies; a second delivery can
                    // only be of an attempt still open on the replica (reconciliation's
                    // `mine` is the other way an attempt is announced again).
                    Step::Replay(i) => {
                        if announced.is_empty() { continue }
                        let start = announced[i % announced.len()].clone();
                        if replica.get(&start.job) != Some(&(start.token, start.node == NODE, true)) {
                            continue;
                        }
                        Event::Start(start)
                    }
                    Step::Finish(i, how) => {
                        if shell.alive.is_empty() { continue }
                        let (job, token) = shell.alive.remove(i % shell.alive.len());
                        let end = match how {
                            0 => succeeded(),
                            1 => RunEnd::Reported(HandlerOutcome::retryable("boom")),
                            2 => RunEnd::Stopped { handler: None },
                            _ => RunEnd::TimedOut { after: Duration::from_secs(1), handler: None },
                        };
                        Event::Finished { job, token, end }
                    }
                    Step::Flushed(i, committed) => {
                        if shell.in_flight.is_empty() { continue }
                        let batch = shell.in_flight.remove(i % shell.in_flight.len());
                        if committed {
                            shell.reported.extend(batch.iter().map(|c| (c.job, c.token)));
                        }
                        Event::Flushed { batch, committed }
                    }
                    Step::FlushTimer => {
                        if !std::mem::take(&mut shell.timer) { continue }
                        Event::FlushTimer
                    }
                    Step::Lease(v) => {
                        world.lease_valid = v;
                        Event::CheckLease {
                            current: e.held().filter(|(j, t)| replica.get(j).is_some_and(|r| r.0 == *t && r.2)).collect(),
                        }
                    }
                    Step::Reconcile { drain } => {
                        shell.drained |= drain;
                        let current = e.watched().filter(|(j, t)| replica.get(j).is_some_and(|r| r.0 == *t && r.2)).collect();
                        let mine = replica
                            .iter()
                            .filter(|(_, r)| r.1 && r.2)
                            .map(|(&job, r)| attempt(job, r.0))
                            .collect();
                        Event::Reconcile(ReplicaView { current, mine, drain_passed: shell.drained })
                    }
                    Step::Tick(ms) => {
                        world.now_ms += u64::from(ms);
                        continue;
                    }
                    Step::CancelAll => Event::CancelAll,
                };
                shell.apply(&mut e, event, world)?;
            }
            // Quiesce: every handler ends, the lease stays out so nothing new runs, held
            // starts are given back, every proposal commits.
            world.lease_valid = false;
            world.now_ms += FENCE.as_millis() as u64;
            let current = e.held().filter(|(j, t)| replica.get(j).is_some_and(|r| r.0 == *t && r.2)).collect();
            shell.apply(&mut e, Event::CheckLease { current }, world)?;
            for _ in 0..10_000 {
                let event = if let Some((job, token)) = shell.alive.pop() {
                    Event::Finished { job, token, end: succeeded() }
                } else if let Some(batch) = shell.in_flight.pop() {
                    shell.reported.extend(batch.iter().map(|c| (c.job, c.token)));
                    Event::Flushed { batch, committed: true }
                } else if std::mem::take(&mut shell.timer) {
                    Event::FlushTimer
                } else {
                    break;
                };
                shell.apply(&mut e, event, world)?;
            }
            prop_assert_eq!(e.running(), 0);
            prop_assert_eq!(e.unreported(), 0);
            let mut once = BTreeSet::new();
            for r in &shell.reported {
                prop_assert!(once.insert(*r), "{:?} reported twice", r);
            }
            for r in &shell.ran {
                prop_assert!(once.contains(r), "{:?} ran but was never reported", r);
            }
        }
    }
}
