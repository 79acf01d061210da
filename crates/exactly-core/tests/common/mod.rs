//! Builders and a small harness shared by the core test suites.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;

use exactly_core::cron::MissedTickPolicy;
use exactly_core::schedule::{OverlapPolicy, ScheduleSpec};

use exactly_core::{
    Assignment, Command, Completion, Effect, Expiry, Job, JobEvent, JobId, JobTable, NewJob,
    NodeEntry, NodeId, NodeLease, NodeRegistration, Outcome, Renewal, Request, Response,
    StateCounts,
};

/// A leader timestamp far enough from zero that "earlier" stamps are easy to write.
pub const NOW: u64 = 1_000_000;

/// A valid job for queue `q`, kind `k`: priority 0, 3 attempts, no timeout, due now.
pub fn new_job(queue: &str, kind: &str, payload: &[u8]) -> NewJob {
    NewJob {
        queue: queue.to_string(),
        kind: kind.to_string(),
        payload: payload.to_vec(),
        priority: 0,
        max_attempts: 3,
        ..NewJob::default()
    }
}

/// An every-field-valid schedule in UTC firing a `reports` job, skipping missed ticks.
pub fn spec(name: &str, cron: &str) -> ScheduleSpec {
    ScheduleSpec {
        name: name.into(),
        cron: cron.into(),
        tz: "UTC".into(),
        job: new_job("reports", "noop", b"tick"),
        overlap: OverlapPolicy::Allow,
        missed: MissedTickPolicy::Skip,
        replace: false,
    }
}

/// A valid job changed by `edit`.
pub fn job_with(edit: impl FnOnce(&mut NewJob)) -> NewJob {
    let mut job = new_job("q", "noop", b"p");
    edit(&mut job);
    job
}

pub fn succeeded(result: &[u8]) -> Outcome {
    Outcome::Succeeded {
        result: result.to_vec(),
    }
}

pub fn failed(error: &str, retryable: bool) -> Outcome {
    Outcome::Failed {
        error: error.to_string(),
        retryable,
    }
}

pub fn registration(node: NodeId, incarnation: u64, slots: u32) -> Command {
    Command::RegisterNode(NodeRegistration {
        node,
        incarnation,
        slots,
        addr: format!("10.0.0.{node}:7000"),
        applied: u64::MAX,
    })
}

/// A renewal from a node that has applied everything (the common case).
pub fn renew(lease: NodeLease) -> Command {
    Command::Renew(Renewal {
        lease,
        applied: u64::MAX,
    })
}

pub fn assignment(job: JobId, node: NodeId, incarnation: u64) -> Assignment {
    Assignment {
        job,
        node,
        incarnation,
    }
}

pub fn completion(job: JobId, token: u64, outcome: Outcome) -> Completion {
    Completion {
        job,
        token,
        outcome,
    }
}

/// A job table fed with consecutive log indexes; checks the table's own invariants after every
/// command.
#[derive(Clone, Debug)]
pub struct Harness {
    pub table: JobTable,
    /// The log index of the last applied entry.
    pub index: u64,
    /// The entropy stamped on the next entries (the leader's random draw in production).
    pub entropy: u64,
    /// Every Watch event the entries emitted, in order. `apply` takes them out of the effects so
    /// that effect assertions stay about the shell's work.
    pub events: Vec<JobEvent>,
    /// The shell's archive: the records of succeeded and cancelled jobs, kept from the
    /// `Archive` and `Unarchive` effects (which `apply` takes out of the effects, as a node's
    /// store does), checked against the table's finished jobs after every entry.
    pub archive: BTreeMap<JobId, Job>,
}

impl Harness {
    pub fn new() -> Self {
        Self {
            table: JobTable::new(),
            index: 0,
            entropy: 0,
            events: Vec::new(),
            archive: BTreeMap::new(),
        }
    }

    /// Applies `command` stamped `now_ms` at the next log index.
    pub fn apply(&mut self, now_ms: u64, command: Command) -> (Response, Vec<Effect>) {
        self.index += 1;
        let request = Request {
            now_ms,
            entropy: self.entropy,
            command,
        };
        let (response, effects) = self.table.apply(self.index, request);
        if let Err(broken) = self.table.check_invariants() {
            panic!("invariant broken after entry {}: {broken}", self.index);
        }
        let mut kept = Vec::with_capacity(effects.len());
        for effect in effects {
            match effect {
                Effect::Event(event) => self.events.push(event),
                Effect::Archive(job) => {
                    self.archive.insert(job.id, *job);
                }
                Effect::Unarchive { job } => {
                    assert!(
                        self.archive.remove(&job).is_some(),
                        "entry {} unarchived job {job}, which was not archived",
                        self.index
                    );
                }
                other => kept.push(other),
            }
        }
        check_archive(&self.table, &self.archive)
            .unwrap_or_else(|e| panic!("archive after entry {}: {e}", self.index));
        (response, kept)
    }

    /// Submits jobs that must all be accepted; returns their ids.
    pub fn submit(&mut self, now_ms: u64, jobs: Vec<NewJob>) -> Vec<JobId> {
        let (response, _) = self.apply(now_ms, Command::Submit(jobs));
        let Response::Submitted(results) = response else {
            panic!("unexpected response {response:?}");
        };
        results
            .into_iter()
            .map(|r| r.expect("job accepted").id)
            .collect()
    }

    /// Registers a node; the registration must be accepted.
    pub fn register(&mut self, now_ms: u64, node: NodeId, incarnation: u64, slots: u32) -> u32 {
        let (response, _) = self.apply(now_ms, registration(node, incarnation, slots));
        match response {
            Response::NodeRegistered(Ok(requeued)) => requeued,
            other => panic!("registration refused: {other:?}"),
        }
    }

    /// The expiry a leader that has applied everything would propose for `lease`: counted from
    /// the incarnation's newest registration or renewal (0 for a node the table does not know).
    pub fn expiry(&self, lease: NodeLease) -> Command {
        let renewed_index = self
            .table
            .nodes()
            .get(&lease.node)
            .map_or(0, |n| n.renewed_index);
        Command::Expire(Expiry {
            lease,
            renewed_index,
        })
    }

    /// Assigns one job, which must start; returns its fencing token.
    pub fn assign(&mut self, now_ms: u64, job: JobId, node: NodeId, incarnation: u64) -> u64 {
        let (response, _) = self.apply(
            now_ms,
            Command::Assign(vec![assignment(job, node, incarnation)]),
        );
        assert_eq!(
            response,
            Response::Assigned {
                started: 1,
                rejected: vec![]
            }
        );
        self.index
    }

    /// Completes one attempt, which must be accepted; returns the effects.
    pub fn complete(
        &mut self,
        now_ms: u64,
        job: JobId,
        token: u64,
        outcome: Outcome,
    ) -> Vec<Effect> {
        let (response, effects) = self.apply(
            now_ms,
            Command::Complete(vec![completion(job, token, outcome)]),
        );
        assert_eq!(
            response,
            Response::Completed {
                accepted: 1,
                rejected: vec![]
            }
        );
        effects
    }

    /// A retained job's record: from the table, or from the archive if it finished.
    pub fn job(&self, id: JobId) -> Job {
        self.table
            .job(id)
            .or_else(|| self.archive.get(&id).cloned())
            .expect("job exists")
    }

    /// Every retained job's record, in id order.
    pub fn all_jobs(&self) -> Vec<Job> {
        let mut all: BTreeMap<JobId, Job> = self.archive.clone();
        all.extend(self.table.jobs().map(|j| (j.id, j)));
        all.into_values().collect()
    }
}

/// The archive holds exactly the records of the table's finished jobs, each as its
/// [`exactly_core::FinishedJob`] says.
pub fn check_archive(table: &JobTable, archive: &BTreeMap<JobId, Job>) -> Result<(), String> {
    let finished: Vec<_> = table.finished_jobs().collect();
    if finished.len() != archive.len() {
        return Err(format!(
            "{} finished jobs, {} archived records",
            finished.len(),
            archive.len()
        ));
    }
    for (id, f) in finished {
        let job = archive
            .get(&id)
            .ok_or(format!("finished job {id} has no archived record"))?;
        if job.status != f.status || job.updated_at_ms != f.finished_at_ms || *job.queue != *f.queue
        {
            return Err(format!("archived job {id} disagrees with {f:?}"));
        }
    }
    Ok(())
}

/// Everything a caller can observe of a table, for "nothing else changed" assertions where the
/// tables themselves differ in one known counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub now_ms: u64,
    pub jobs: Vec<Job>,
    pub counts: StateCounts,
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    pub ready: Vec<JobId>,
    pub delayed: Vec<JobId>,
    pub running: Vec<(NodeId, usize)>,
}

impl View {
    pub fn of(table: &JobTable) -> Self {
        Self {
            now_ms: table.now_ms(),
            jobs: table.jobs().collect(),
            counts: table.counts().clone(),
            nodes: table.nodes().clone(),
            ready: table.ready_jobs().collect(),
            delayed: table.due_delayed_jobs(u64::MAX).collect(),
            running: table
                .nodes()
                .keys()
                .map(|&n| (n, table.running_on(n)))
                .collect(),
        }
    }
}
