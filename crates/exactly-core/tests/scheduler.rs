//! Table-driven tests of the scheduling policy `plan_assignments`: order, spreading, limits, and
//! that apply accepts what it plans.

mod common;

use std::collections::BTreeSet;

use common::{completion, job_with, new_job, succeeded, Harness, NOW};
use exactly_core::limits::{ASSIGN_BATCH_MAX, NODE_SLOTS_MAX, SUBMIT_BATCH_JOBS_MAX};
use exactly_core::{
    plan_assignments, Assignment, Command, Effect, JobId, NodeId, QueuePatch, RateLimit, Response,
    StartAttempt,
};

fn none() -> BTreeSet<NodeId> {
    BTreeSet::new()
}

fn jobs_of(plan: &[Assignment]) -> Vec<JobId> {
    plan.iter().map(|a| a.job).collect()
}

fn nodes_of(plan: &[Assignment]) -> Vec<NodeId> {
    plan.iter().map(|a| a.node).collect()
}

/// Applies a queue setting, which must be accepted.
fn configure(h: &mut Harness, now_ms: u64, queue: &str, patch: QueuePatch) {
    let (response, _) = h.apply(
        now_ms,
        Command::ConfigureQueue {
            queue: queue.to_string(),
            patch,
        },
    );
    assert!(
        matches!(response, Response::QueueConfigured(Ok(_))),
        "{response:?}"
    );
}

fn limit(concurrency_max: u32) -> QueuePatch {
    QueuePatch {
        concurrency_max: Some(concurrency_max),
        ..QueuePatch::default()
    }
}

/// Completes every job in `ids` (running with the attempt started at `token`) successfully.
fn succeed_all(h: &mut Harness, now_ms: u64, ids: &[JobId]) {
    let completions = ids
        .iter()
        .map(|&id| {
            let token = h.job(id).attempts.last().expect("started").token;
            completion(id, token, succeeded(b""))
        })
        .collect::<Vec<_>>();
    let n = completions.len() as u32;
    let (response, _) = h.apply(now_ms, Command::Complete(completions));
    assert_eq!(
        response,
        Response::Completed {
            accepted: n,
            rejected: vec![]
        }
    );
}

/// Applies `plan` stamped `now_ms` and asserts that every assignment started, with Start effects
/// in plan order carrying the entry's log index.
fn apply_plan(h: &mut Harness, now_ms: u64, plan: &[Assignment]) {
    let (response, effects) = h.apply(now_ms, Command::Assign(plan.to_vec()));
    assert_eq!(
        response,
        Response::Assigned {
            started: plan.len() as u32,
            rejected: vec![]
        }
    );
    let started: Vec<_> = effects
        .iter()
        .map(|e| match e {
            Effect::Start(StartAttempt {
                job,
                token,
                node,
                incarnation,
                ..
            }) => (*job, *token, *node, *incarnation),
            other => panic!("unexpected effect {other:?}"),
        })
        .collect();
    let expected: Vec<_> = plan
        .iter()
        .map(|a| (a.job, h.index, a.node, a.incarnation))
        .collect();
    assert_eq!(started, expected);
}

/// Jobs are planned highest priority first, then in submission order.
#[test]
fn plans_by_priority_then_fifo() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    let priorities = [0, 5, -1, 5, 0, 9, -1];
    h.submit(
        NOW,
        priorities
            .iter()
            .map(|&p| job_with(|j| j.priority = p))
            .collect(),
    );
    let plan = plan_assignments(&h.table, NOW, 100, &none());
    assert_eq!(jobs_of(&plan), vec![6, 2, 4, 1, 5, 3, 7]);
    apply_plan(&mut h, NOW, &plan);
}

/// With a small batch the highest-priority jobs are planned, not the oldest.
#[test]
fn small_batch_takes_the_highest_priorities() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    h.submit(
        NOW,
        [1, 1, 3, 2, 3]
            .iter()
            .map(|&p| job_with(|j| j.priority = p))
            .collect(),
    );
    let plan = plan_assignments(&h.table, NOW, 3, &none());
    assert_eq!(jobs_of(&plan), vec![3, 5, 4]);
}

/// Each job goes to the node with the most free slots (ties to the lower id).
#[test]
fn spreads_jobs_across_nodes_by_free_slots() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 3);
    h.register(NOW, 2, 1, 2);
    h.register(NOW, 3, 1, 3);
    h.submit(NOW, vec![new_job("q", "noop", b""); 10]);
    h.assign(NOW, 1, 3, 1); // node 3: one of three slots used
                            // Free: node 1 = 3, node 2 = 2, node 3 = 2; 7 slots for 9 pending jobs.
    let plan = plan_assignments(&h.table, NOW, 100, &none());
    assert_eq!(jobs_of(&plan), (2..=8).collect::<Vec<_>>());
    assert_eq!(nodes_of(&plan), vec![1, 1, 2, 3, 1, 2, 3]);
    assert!(plan.iter().all(|a| a.incarnation == 1));
    apply_plan(&mut h, NOW, &plan);
    assert_eq!(
        (1..=3).map(|n| h.table.running_on(n)).collect::<Vec<_>>(),
        vec![3, 2, 3]
    );
    // Every slot is taken: nothing more to plan.
    assert_eq!(plan_assignments(&h.table, NOW, 100, &none()), vec![]);
}

/// Equal free slots alternate between nodes, lowest id first, rather than filling one node.
#[test]
fn equal_nodes_take_turns() {
    let mut h = Harness::new();
    for node in [4, 2, 9] {
        h.register(NOW, node, 7, 2);
    }
    h.submit(NOW, vec![new_job("q", "noop", b""); 6]);
    let plan = plan_assignments(&h.table, NOW, 100, &none());
    assert_eq!(nodes_of(&plan), vec![2, 4, 9, 2, 4, 9]);
    assert!(plan.iter().all(|a| a.incarnation == 7));
    apply_plan(&mut h, NOW, &plan);
}

/// Excluded nodes get nothing, even with the most free slots; all excluded plans nothing.
#[test]
fn excluded_nodes_receive_nothing() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.register(NOW, 2, 1, 2);
    h.register(NOW, 3, 1, 1);
    h.submit(NOW, vec![new_job("q", "noop", b""); 6]);
    let plan = plan_assignments(&h.table, NOW, 100, &BTreeSet::from([1]));
    assert_eq!(nodes_of(&plan), vec![2, 2, 3]);
    assert_eq!(jobs_of(&plan), vec![1, 2, 3]);
    assert_eq!(
        plan_assignments(&h.table, NOW, 100, &BTreeSet::from([1, 2, 3])),
        vec![]
    );
    apply_plan(&mut h, NOW, &plan);
}

/// Nodes that are full, or have zero slots, or no nodes at all: nothing is planned.
#[test]
fn no_free_slot_plans_nothing() {
    let mut h = Harness::new();
    h.submit(NOW, vec![new_job("q", "noop", b""); 3]);
    assert_eq!(plan_assignments(&h.table, NOW, 100, &none()), vec![]);
    h.register(NOW, 1, 1, 0);
    assert_eq!(plan_assignments(&h.table, NOW, 100, &none()), vec![]);
    h.register(NOW, 2, 1, 1);
    h.assign(NOW, 1, 2, 1);
    assert_eq!(plan_assignments(&h.table, NOW, 100, &none()), vec![]);
}

/// A node re-registered with fewer slots than it runs gets nothing.
#[test]
fn node_over_its_new_slot_limit_gets_nothing() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 3);
    h.submit(NOW, vec![new_job("q", "noop", b""); 5]);
    let plan = plan_assignments(&h.table, NOW, 100, &none());
    apply_plan(&mut h, NOW, &plan);
    h.register(NOW, 1, 1, 1);
    assert_eq!(h.table.running_on(1), 3);
    assert_eq!(plan_assignments(&h.table, NOW, 100, &none()), vec![]);
}

/// No more than batch_max assignments are planned; batch_max 0 plans nothing.
#[test]
fn batch_max_is_honoured() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    h.submit(NOW, vec![new_job("q", "noop", b""); 10]);
    for batch_max in [0, 1, 4, 10, 11] {
        let plan = plan_assignments(&h.table, NOW, batch_max, &none());
        assert_eq!(
            jobs_of(&plan),
            (1..=batch_max.min(10) as u64).collect::<Vec<_>>(),
            "batch_max = {batch_max}"
        );
    }
}

/// A batch_max above ASSIGN_BATCH_MAX still yields a plan that apply accepts.
#[test]
fn plan_never_exceeds_the_assign_batch_limit() {
    // Apply refuses an Assign batch over the limit whole, so a larger plan could never start.
    let mut h = Harness::new();
    h.register(NOW, 1, 1, NODE_SLOTS_MAX);
    for _ in 0..2 {
        h.submit(NOW, vec![new_job("q", "noop", b""); SUBMIT_BATCH_JOBS_MAX]);
    }
    let plan = plan_assignments(&h.table, NOW, usize::MAX, &none());
    assert_eq!(plan.len(), ASSIGN_BATCH_MAX);
    apply_plan(&mut h, NOW, &plan);
}

/// Delayed jobs are planned once due (exactly at run_at), never before.
#[test]
fn delayed_jobs_are_planned_only_when_due() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    h.submit(
        NOW,
        vec![
            job_with(|j| j.run_at_ms = NOW + 1_000),
            new_job("q", "noop", b""),
            job_with(|j| j.run_at_ms = NOW + 2_000),
        ],
    );
    assert_eq!(
        jobs_of(&plan_assignments(&h.table, NOW, 100, &none())),
        vec![2]
    );
    assert_eq!(
        jobs_of(&plan_assignments(&h.table, NOW + 999, 100, &none())),
        vec![2]
    );
    let plan = plan_assignments(&h.table, NOW + 1_000, 100, &none());
    assert_eq!(jobs_of(&plan), vec![1, 2]);
    // The plan, stamped with the time it was made for, is accepted.
    apply_plan(&mut h, NOW + 1_000, &plan);
    assert_eq!(
        plan_assignments(&h.table, NOW + 1_999, 100, &none()),
        vec![]
    );
    let plan = plan_assignments(&h.table, NOW + 2_000, 100, &none());
    assert_eq!(jobs_of(&plan), vec![3]);
    apply_plan(&mut h, NOW + 2_000, &plan);
}

/// Due delayed and ready jobs merge in priority then FIFO order, whatever the batch size.
#[test]
fn due_delayed_jobs_are_ordered_by_priority_with_ready_jobs() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    // (priority, run_at): job 1 is due first but has the lowest priority.
    let specs = [
        (0, NOW + 10),
        (5, NOW + 20),
        (3, 0),
        (5, NOW + 30),
        (5, 0),
        (1, NOW + 5_000),
    ];
    h.submit(
        NOW,
        specs
            .iter()
            .map(|&(p, at)| {
                job_with(|j| {
                    j.priority = p;
                    j.run_at_ms = at;
                })
            })
            .collect(),
    );
    let at = NOW + 100;
    let cases: [(usize, Vec<JobId>); 5] = [
        (1, vec![2]),
        (2, vec![2, 4]),
        (3, vec![2, 4, 5]),
        (4, vec![2, 4, 5, 3]),
        (10, vec![2, 4, 5, 3, 1]),
    ];
    for (batch_max, expected) in cases {
        let plan = plan_assignments(&h.table, at, batch_max, &none());
        assert_eq!(jobs_of(&plan), expected, "batch_max = {batch_max}");
        let mut applied = h.clone();
        apply_plan(&mut applied, at, &plan);
    }
}

/// A job requeued by a retryable failure is planned again only after its backoff.
#[test]
fn retried_jobs_are_planned_after_their_backoff() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 1);
    h.submit(NOW, vec![job_with(|j| j.priority = 10)]);
    let token = h.assign(NOW, 1, 1, 1);
    h.complete(NOW, 1, token, common::failed("flaky", true));
    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    let due = h.job(1).run_at_ms;
    assert_eq!(
        jobs_of(&plan_assignments(&h.table, due - 1, 10, &none())),
        vec![2]
    );
    assert_eq!(
        jobs_of(&plan_assignments(&h.table, due, 10, &none())),
        vec![1]
    );
}

/// After a node restarts, plans name its new incarnation and are accepted.
#[test]
fn plans_use_the_current_incarnation() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 2);
    h.submit(NOW, vec![new_job("q", "noop", b""); 3]);
    let plan = plan_assignments(&h.table, NOW, 10, &none());
    apply_plan(&mut h, NOW, &plan);
    h.register(NOW, 1, 2, 2);
    let plan = plan_assignments(&h.table, NOW, 10, &none());
    assert_eq!(jobs_of(&plan), vec![1, 2]);
    assert!(plan.iter().all(|a| a.incarnation == 2));
    apply_plan(&mut h, NOW, &plan);
}

/// A queue's concurrency limit caps what the planner takes from it, counting what already runs
/// on every node, while other queues fill the remaining slots in priority order.
#[test]
fn concurrency_limits_cap_each_queue_across_nodes() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 4);
    h.register(NOW, 2, 1, 4);
    configure(&mut h, NOW, "q", limit(3));
    let mut jobs: Vec<_> = (0..5)
        .map(|_| {
            let mut j = new_job("q", "noop", b"");
            j.priority = 5;
            j
        })
        .collect();
    jobs.extend(vec![new_job("r", "noop", b""); 5]);
    h.submit(NOW, jobs);
    let plan = plan_assignments(&h.table, NOW, 100, &none());
    assert_eq!(jobs_of(&plan), vec![1, 2, 3, 6, 7, 8, 9, 10]);
    assert_eq!(nodes_of(&plan), vec![1, 2, 1, 2, 1, 2, 1, 2]);
    apply_plan(&mut h, NOW, &plan);
    assert_eq!(h.table.queue("q").unwrap().running(), 3);
    // One q job ends and one slot frees: q may start one more, and does.
    succeed_all(&mut h, NOW, &[1]);
    let plan = plan_assignments(&h.table, NOW, 100, &none());
    assert_eq!(jobs_of(&plan), vec![4]);
    apply_plan(&mut h, NOW, &plan);
    // An r job ends: the free slot may not go to q, which is at its limit.
    succeed_all(&mut h, NOW, &[6]);
    assert_eq!(plan_assignments(&h.table, NOW, 100, &none()), vec![]);
}

/// A paused queue contributes nothing to a plan; resumed, its jobs come first again by priority.
#[test]
fn paused_queues_are_not_planned() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(
        NOW,
        vec![
            job_with(|j| j.priority = 9),
            new_job("r", "noop", b""),
            job_with(|j| j.priority = 9),
        ],
    );
    let pause = |paused| QueuePatch {
        paused: Some(paused),
        ..QueuePatch::default()
    };
    configure(&mut h, NOW, "q", pause(true));
    assert_eq!(
        jobs_of(&plan_assignments(&h.table, NOW, 10, &none())),
        vec![2]
    );
    configure(&mut h, NOW, "q", pause(false));
    let plan = plan_assignments(&h.table, NOW, 10, &none());
    assert_eq!(jobs_of(&plan), vec![1, 3, 2]);
    apply_plan(&mut h, NOW, &plan);
}

/// The planner follows the GCRA allowance over time: with a steady backlog it starts the burst
/// (`jobs`) at once and then one start each time another period/jobs has passed, and apply
/// accepts every plan; an unlimited queue alongside is not held back. So in one period the
/// queue can start up to 2 × jobs − 1 (the burst plus the sustained rate), and over a long
/// run no more than jobs + elapsed × jobs / period. After idling, the burst is back, never more.
#[test]
fn a_rate_limited_queue_is_planned_at_its_gcra_allowance_over_time() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, NODE_SLOTS_MAX);
    configure(
        &mut h,
        NOW,
        "q",
        QueuePatch {
            rate: Some(Some(RateLimit {
                jobs: 3,
                period_ms: 1_000,
            })),
            ..QueuePatch::default()
        },
    );
    h.submit(NOW, vec![new_job("q", "noop", b""); 100]);
    let tick_ms = 50;
    let mut starts: Vec<(u64, usize)> = Vec::new();
    for step in 0..=200u64 {
        let elapsed = step * tick_ms;
        let at = NOW + elapsed;
        h.submit(at, vec![new_job("r", "noop", b""); 2]);
        let plan = plan_assignments(&h.table, at, 1_000, &none());
        apply_plan(&mut h, at, &plan);
        let ids = jobs_of(&plan);
        let from_q = ids.iter().filter(|&&id| h.job(id).queue == "q").count();
        assert_eq!(ids.len() - from_q, 2, "r is not limited");
        succeed_all(&mut h, at, &ids);
        if from_q > 0 {
            starts.push((elapsed, from_q));
        }
        // The k-th start after the burst is allowed once k intervals have passed: 1 s / 3,
        // rounded up to the microsecond so that the rate is never exceeded.
        let total: usize = starts.iter().map(|&(_, n)| n).sum();
        assert_eq!(
            total as u64,
            3 + elapsed * 1_000 / 333_334,
            "at +{elapsed} ms"
        );
    }
    assert_eq!(starts[..4], [(0, 3), (350, 1), (700, 1), (1_050, 1)]);
    let most_in_a_period = starts
        .iter()
        .map(|&(from, _)| {
            starts
                .iter()
                .filter(|&&(t, _)| t >= from && t < from + 1_000)
                .map(|&(_, n)| n)
                .sum::<usize>()
        })
        .max();
    assert_eq!(most_in_a_period, Some(5));

    // Idle for five seconds: the allowance is the burst again, not the time that passed.
    let later = NOW + 15_000;
    let plan = plan_assignments(&h.table, later, 1_000, &none());
    assert_eq!(plan.len(), 3);
    apply_plan(&mut h, later, &plan);
    assert_eq!(
        plan_assignments(&h.table, later + 49, 1_000, &none()),
        vec![]
    );
}

/// Only the first job of each ordering key's line is a candidate, so no plan holds two jobs
/// of one line, whatever the batch size; the next is planned once the first ends.
#[test]
fn ordering_keys_plan_one_job_per_line() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    let keys = ["a", "b", "a", "a", "b", "c"];
    h.submit(
        NOW,
        keys.iter()
            .map(|k| job_with(|j| j.ordering_key = Some(k.to_string())))
            .collect(),
    );
    let mut rounds = Vec::new();
    loop {
        let plan = plan_assignments(&h.table, NOW, 100, &none());
        if plan.is_empty() {
            break;
        }
        apply_plan(&mut h, NOW, &plan);
        let ids = jobs_of(&plan);
        succeed_all(&mut h, NOW, &ids);
        rounds.push(ids);
    }
    assert_eq!(rounds, vec![vec![1, 2, 6], vec![3, 5], vec![4]]);
}

/// A queue's allowance covers its delayed jobs that fell due since the last entry as well as
/// its ready ones: the merge takes the highest priorities of both within the allowance and
/// skips the rest of a used-up queue, while other queues' due jobs are still taken.
#[test]
fn a_queue_allowance_covers_its_due_delayed_jobs() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    configure(&mut h, NOW, "q", limit(2));
    let due = NOW + 100;
    // (queue, priority, run_at)
    let specs = [
        ("q", 0, 0),
        ("q", 5, due),
        ("q", 1, 0),
        ("q", 9, due),
        ("r", 3, due),
        ("q", 4, due),
        ("r", 2, due),
    ];
    h.submit(
        NOW,
        specs
            .iter()
            .map(|&(q, p, at)| {
                let mut j = new_job(q, "noop", b"");
                j.priority = p;
                j.run_at_ms = at;
                j
            })
            .collect(),
    );
    let plan = plan_assignments(&h.table, due, 100, &none());
    assert_eq!(jobs_of(&plan), vec![4, 2, 5, 7]);
    apply_plan(&mut h, due, &plan);
    assert_eq!(plan_assignments(&h.table, due, 100, &none()), vec![]);
}
