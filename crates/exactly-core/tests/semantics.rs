//! Table-driven tests of issue 4's job semantics in `JobTable::apply`: idempotent submit, retry
//! backoff and jitter, dead letters (redrive, purge), cancellation, ordering keys, queue limits
//! (concurrency, rate, pause), queue bookkeeping, retention and Watch events. Each test feeds
//! commands at known log indexes and asserts the exact state, responses and effects. (The
//! planner's side of queue limits and ordering keys is in `scheduler.rs`.)

mod common;

use std::collections::BTreeSet;

use common::{
    assignment, completion, failed, job_with, new_job, registration, succeeded, Harness, NOW,
};
use exactly_core::limits::{
    ABANDONS_RERUN_AT_ONCE, BACKOFF_MS_MAX, CANCEL_BATCH_MAX, DEAD_BATCH_MAX, QUEUES_MAX,
    QUEUE_NAME_BYTES_MAX, RATE_JOBS_MAX, RATE_PERIOD_MS_MAX, RETAIN_BATCH_MAX,
    RETRY_BACKOFF_BASE_MS, RETRY_BACKOFF_MAX_MS, SUBMIT_BATCH_JOBS_MAX,
};
use exactly_core::state::{backoff_ceiling_ms, retry_delay_ms};
use exactly_core::{
    plan_assignments, Attempt, AttemptEnd, Backoff, Command, DeadFilter, Effect, JobEvent, JobId,
    JobStatus, JobTable, KeyRecord, NewJob, NodeId, QueueConfig, QueuePatch, RateLimit, Rejection,
    Request, Response, Retention, StateCounts, Submitted,
};
use sha2::{Digest, Sha256};

// ----- helpers -----

/// A job of queue "q" with an idempotency key and a payload.
fn keyed(key: &str, payload: &[u8]) -> NewJob {
    job_with(|j| {
        j.idempotency_key = Some(key.to_string());
        j.payload = payload.to_vec();
    })
}

/// A job of `queue` with an ordering key (None: without one).
fn ordered(queue: &str, key: Option<&str>) -> NewJob {
    let mut job = new_job(queue, "noop", b"");
    job.ordering_key = key.map(str::to_string);
    job
}

/// The idempotency fingerprint as the state machine persists it: the first 16 bytes of SHA-256
/// over the length-prefixed queue, kind and payload. Spelled out here because records live in
/// snapshots: a silent change of the formula would break dedupe across an upgrade.
fn fingerprint(queue: &str, kind: &str, payload: &[u8]) -> [u8; 16] {
    let mut hasher = Sha256::new();
    for part in [queue.as_bytes(), kind.as_bytes(), payload] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let mut out = [0; 16];
    out.copy_from_slice(&hasher.finalize()[..16]);
    out
}

/// A change to a job, for tables of variants.
type Edit = fn(&mut NewJob);

fn submit_results(
    h: &mut Harness,
    now: u64,
    jobs: Vec<NewJob>,
) -> (Vec<Result<Submitted, Rejection>>, Vec<Effect>) {
    let (response, effects) = h.apply(now, Command::Submit(jobs));
    let Response::Submitted(results) = response else {
        panic!("unexpected response {response:?}");
    };
    (results, effects)
}

fn existing(id: JobId) -> Result<Submitted, Rejection> {
    Ok(Submitted { id, existing: true })
}

fn created(id: JobId) -> Result<Submitted, Rejection> {
    Ok(Submitted::new(id))
}

type Cancelled = Vec<(JobId, Result<JobStatus, Rejection>)>;

fn cancel(h: &mut Harness, now: u64, ids: &[JobId]) -> (Cancelled, Vec<Effect>) {
    let (response, effects) = h.apply(now, Command::Cancel(ids.to_vec()));
    let Response::Cancelled(results) = response else {
        panic!("unexpected response {response:?}");
    };
    (results, effects)
}

fn configure(
    h: &mut Harness,
    now: u64,
    queue: &str,
    patch: QueuePatch,
) -> Result<QueueConfig, Rejection> {
    let (response, effects) = h.apply(
        now,
        Command::ConfigureQueue {
            queue: queue.to_string(),
            patch,
        },
    );
    assert_eq!(effects, vec![], "configuring a queue has no effects");
    let Response::QueueConfigured(result) = response else {
        panic!("unexpected response {response:?}");
    };
    result
}

fn limit(concurrency_max: u32) -> QueuePatch {
    QueuePatch {
        concurrency_max: Some(concurrency_max),
        ..QueuePatch::default()
    }
}

fn rate(jobs: u32, period_ms: u64) -> QueuePatch {
    QueuePatch {
        rate: Some(Some(RateLimit { jobs, period_ms })),
        ..QueuePatch::default()
    }
}

fn pause(paused: bool) -> QueuePatch {
    QueuePatch {
        paused: Some(paused),
        ..QueuePatch::default()
    }
}

fn dead_filter(ids: &[JobId], queue: Option<&str>, kind: Option<&str>, max: u32) -> DeadFilter {
    DeadFilter {
        ids: ids.to_vec(),
        queue: queue.map(str::to_string),
        kind: kind.map(str::to_string),
        max,
        all: false,
    }
}

/// Every dead letter, at most `max`: no filter, and the explicit `all`.
fn all_dead(max: u32) -> DeadFilter {
    DeadFilter {
        max,
        all: true,
        ..DeadFilter::default()
    }
}

fn redrive(h: &mut Harness, now: u64, filter: DeadFilter) -> (Vec<JobId>, Vec<Effect>) {
    let (response, effects) = h.apply(now, Command::Redrive(filter));
    let Response::Redriven(Ok(ids)) = response else {
        panic!("unexpected response {response:?}");
    };
    (ids, effects)
}

fn purge(h: &mut Harness, now: u64, filter: DeadFilter) -> (Vec<JobId>, Vec<Effect>) {
    let (response, effects) = h.apply(now, Command::PurgeDead(filter));
    let Response::PurgedDead(Ok(ids)) = response else {
        panic!("unexpected response {response:?}");
    };
    (ids, effects)
}

fn retain(h: &mut Harness, now: u64, r: Retention) -> ((u32, u32), Vec<Effect>) {
    let (response, effects) = h.apply(now, Command::Retain(r));
    let Response::Retained { jobs, keys } = response else {
        panic!("unexpected response {response:?}");
    };
    ((jobs, keys), effects)
}

/// Applies one Assign batch; returns (started, rejected) and the started job ids.
fn assign_batch(
    h: &mut Harness,
    now: u64,
    list: &[(JobId, NodeId, u64)],
) -> (u32, Vec<(JobId, Rejection)>, Vec<JobId>) {
    let (response, effects) = h.apply(
        now,
        Command::Assign(
            list.iter()
                .map(|&(job, node, inc)| assignment(job, node, inc))
                .collect(),
        ),
    );
    let Response::Assigned { started, rejected } = response else {
        panic!("unexpected response {response:?}");
    };
    (started, rejected, started_jobs(&effects))
}

fn started_jobs(effects: &[Effect]) -> Vec<JobId> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Start(s) => Some(s.job),
            _ => None,
        })
        .collect()
}

/// Assigns `id` to node 1 (incarnation 1) and fails it permanently: a dead letter.
fn kill(h: &mut Harness, now: u64, id: JobId) -> u64 {
    let token = h.assign(now, id, 1, 1);
    h.complete(now, id, token, failed("bad input", false));
    token
}

/// Assigns `id` to node 1 (incarnation 1) and completes it successfully.
fn finish(h: &mut Harness, now: u64, id: JobId) -> u64 {
    let token = h.assign(now, id, 1, 1);
    h.complete(now, id, token, succeeded(b"ok"));
    token
}

fn ready(h: &Harness) -> Vec<JobId> {
    h.table.ready_jobs().collect()
}

fn status(h: &Harness, id: JobId) -> JobStatus {
    h.job(id).status
}

fn event(
    job: JobId,
    queue: &str,
    status: JobStatus,
    attempt: u32,
    token: u64,
    node: Option<NodeId>,
    at_ms: u64,
) -> JobEvent {
    JobEvent {
        job,
        queue: queue.to_string(),
        status,
        attempt,
        token,
        node,
        at_ms,
    }
}

fn counts(pending: u64, running: u64, succeeded: u64, dead: u64, cancelled: u64) -> StateCounts {
    StateCounts {
        pending,
        running,
        succeeded,
        dead,
        cancelled,
        stale_completions: 0,
    }
}

// ----- idempotent submit -----

/// A repeat of an idempotency key returns the original id with `existing`, creates nothing
/// (no effect, no event, no id consumed), and does not extend the key's record, even when
/// options outside the fingerprint (priority, attempts, run_at, labels, ordering key, backoff,
/// timeout) differ.
#[test]
fn a_repeated_key_returns_the_original_job_and_creates_nothing() {
    let mut h = Harness::new();
    let first = keyed("order-7", b"charge 7");
    let (results, effects) = submit_results(&mut h, NOW, vec![first.clone()]);
    assert_eq!(results, vec![created(1)]);
    assert_eq!(
        effects,
        vec![Effect::StorePayload {
            job: 1,
            payload: b"charge 7".to_vec()
        }]
    );
    let record = KeyRecord {
        job: 1,
        fingerprint: fingerprint("q", "noop", b"charge 7"),
        created_at_ms: NOW,
    };
    assert_eq!(h.table.idempotency_key("order-7"), Some(record.clone()));
    assert_eq!(h.job(1).idempotency_key.as_deref(), Some("order-7"));
    let jobs_before: Vec<_> = h.table.jobs().collect();
    let events_before = h.events.len();

    let variants: [(&str, Edit); 8] = [
        ("identical", |_| {}),
        ("priority", |j| j.priority = 9),
        ("max_attempts", |j| j.max_attempts = 7),
        ("run_at", |j| j.run_at_ms = NOW + 60_000),
        ("labels", |j| {
            j.labels.insert("tenant".into(), "a".into());
        }),
        ("ordering key", |j| j.ordering_key = Some("k".into())),
        ("backoff", |j| j.backoff.base_ms = 5),
        ("timeout", |j| j.timeout_ms = 10),
    ];
    for (i, (name, edit)) in variants.into_iter().enumerate() {
        let mut repeat = first.clone();
        edit(&mut repeat);
        let at = NOW + 1_000 * (i as u64 + 1);
        let (results, effects) = submit_results(&mut h, at, vec![repeat]);
        assert_eq!(results, vec![existing(1)], "{name}");
        assert_eq!(effects, vec![], "{name}");
        assert_eq!(h.table.jobs().collect::<Vec<_>>(), jobs_before, "{name}");
        assert_eq!(
            h.table.idempotency_key("order-7"),
            Some(record.clone()),
            "{name}"
        );
    }
    assert_eq!(h.events.len(), events_before, "a repeat emits no event");
    assert_eq!(h.table.counts(), &counts(1, 0, 0, 0, 0));
    // No id was consumed by the repeats.
    assert_eq!(
        h.submit(NOW + 10_000, vec![new_job("q", "noop", b"")]),
        vec![2]
    );
}

/// The key dedupes whatever became of the original job: running, succeeded, dead, cancelled.
#[test]
fn a_repeated_key_dedupes_whatever_the_original_job_became() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    let keys = ["pending", "running", "succeeded", "dead", "cancelled"];
    let ids = h.submit(NOW, keys.iter().map(|k| keyed(k, b"p")).collect());
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    h.assign(NOW, 2, 1, 1);
    finish(&mut h, NOW, 3);
    kill(&mut h, NOW, 4);
    cancel(&mut h, NOW, &[5]);
    let expected = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Dead,
        JobStatus::Cancelled,
    ];
    for (i, key) in keys.iter().enumerate() {
        let id = i as JobId + 1;
        assert_eq!(status(&h, id), expected[i]);
        let (results, effects) = submit_results(&mut h, NOW + 1, vec![keyed(key, b"p")]);
        assert_eq!(results, vec![existing(id)], "{key}");
        assert_eq!(effects, vec![], "{key}");
        assert_eq!(
            status(&h, id),
            expected[i],
            "{key}: the original is untouched"
        );
    }
    assert_eq!(h.all_jobs().len(), 5);
}

/// The same key with another queue, kind or payload is refused as a conflict naming the
/// original job; the batch around it creates nothing and consumes no id. The fingerprint
/// length-prefixes its parts, so queue "qn" + kind "oop" is not queue "q" + kind "noop".
#[test]
fn the_same_key_with_another_queue_kind_or_payload_is_a_conflict() {
    let mut h = Harness::new();
    h.submit(NOW, vec![keyed("k", b"p")]);
    let before = h.table.clone();
    let cases: [(&str, Edit); 6] = [
        ("queue", |j| j.queue = "r".into()),
        ("kind", |j| j.kind = "mail".into()),
        ("payload", |j| j.payload = b"P".to_vec()),
        ("empty payload", |j| j.payload.clear()),
        ("longer payload", |j| j.payload = b"pp".to_vec()),
        ("same concatenation", |j| {
            j.queue = "qn".into();
            j.kind = "oop".into();
        }),
    ];
    for (name, edit) in cases {
        let mut conflicting = keyed("k", b"p");
        edit(&mut conflicting);
        let batch = vec![
            new_job("q", "noop", b"a"),
            conflicting,
            keyed("other", b"b"),
        ];
        let (results, effects) = submit_results(&mut h, NOW, batch);
        assert_eq!(
            results,
            vec![
                Err(Rejection::BatchRejected),
                Err(Rejection::IdempotencyConflict {
                    key: "k".into(),
                    job: 1
                }),
                Err(Rejection::BatchRejected),
            ],
            "{name}"
        );
        assert_eq!(effects, vec![], "{name}");
        // Same stamp, so the whole table, `now` included, is exactly as before.
        assert!(
            h.table == before,
            "{name}: the refused batch changed the table"
        );
    }
    assert_eq!(h.table.idempotency_key("other"), None);
    assert_eq!(h.submit(NOW, vec![new_job("q", "noop", b"")]), vec![2]);
}

/// Keys repeated within one batch: the same fingerprint dedupes to the batch's first job; a
/// different one refuses the whole batch with KeyConflictInBatch; a batch that also repeats a
/// key recorded earlier is checked against that record.
#[test]
fn keys_repeated_within_one_batch() {
    type Case = (&'static str, Vec<NewJob>, Vec<Result<Submitted, Rejection>>);
    let cases: Vec<Case> = vec![
        (
            "same fingerprint twice",
            vec![keyed("k", b"p"), keyed("k", b"p")],
            vec![created(1), existing(1)],
        ),
        (
            "interleaved",
            vec![keyed("k", b"p"), keyed("j", b"p"), keyed("k", b"p")],
            vec![created(1), created(2), existing(1)],
        ),
        (
            "different payload",
            vec![keyed("k", b"p"), keyed("k", b"x")],
            vec![
                Err(Rejection::BatchRejected),
                Err(Rejection::KeyConflictInBatch("k".into())),
            ],
        ),
        (
            "conflict after a dedupe",
            vec![keyed("k", b"p"), keyed("k", b"p"), keyed("k", b"x")],
            vec![
                Err(Rejection::BatchRejected),
                Err(Rejection::BatchRejected),
                Err(Rejection::KeyConflictInBatch("k".into())),
            ],
        ),
        (
            "recorded key, then a conflict with the record",
            vec![keyed("old", b"p"), keyed("old", b"x")],
            vec![
                Err(Rejection::BatchRejected),
                Err(Rejection::IdempotencyConflict {
                    key: "old".into(),
                    job: 1,
                }),
            ],
        ),
    ];
    for (name, batch, expected) in cases {
        let mut h = Harness::new();
        // An empty batch sets the clock, so that "nothing changed" can compare whole tables.
        h.submit(NOW, vec![]);
        if name.starts_with("recorded") {
            h.submit(NOW, vec![keyed("old", b"p")]);
        }
        let before = h.table.clone();
        let (results, effects) = submit_results(&mut h, NOW, batch);
        let accepted = expected.iter().all(|r| r.is_ok());
        assert_eq!(results, expected, "{name}");
        if accepted {
            let new: BTreeSet<JobId> = results
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .filter(|s| !s.existing)
                .map(|s| s.id)
                .collect();
            let stored: Vec<JobId> = effects
                .iter()
                .map(|e| match e {
                    Effect::StorePayload { job, .. } => *job,
                    other => panic!("{name}: unexpected effect {other:?}"),
                })
                .collect();
            assert_eq!(stored, new.iter().copied().collect::<Vec<_>>(), "{name}");
            assert_eq!(h.table.jobs().count(), new.len(), "{name}");
        } else {
            assert_eq!(effects, vec![], "{name}");
            assert!(
                h.table == before,
                "{name}: the refused batch changed the table"
            );
        }
    }
}

/// A batch refused for any one job records none of its keys and consumes no id: the same keys
/// submitted next (even with other payloads) create new jobs from id 1.
#[test]
fn a_refused_batch_records_no_key_and_consumes_no_id() {
    let mut h = Harness::new();
    let mut bad = keyed("b", b"x");
    bad.max_attempts = 0;
    let (results, effects) = submit_results(&mut h, NOW, vec![keyed("a", b"x"), bad]);
    assert_eq!(
        results,
        vec![
            Err(Rejection::BatchRejected),
            Err(Rejection::Invalid(
                "max_attempts must be 1..=100, got 0".into()
            )),
        ]
    );
    assert_eq!(effects, vec![]);
    assert_eq!(h.table.idempotency_key("a"), None);
    assert_eq!(h.table.idempotency_key("b"), None);
    assert!(h.events.is_empty());
    let (results, _) = submit_results(&mut h, NOW, vec![keyed("a", b"y"), keyed("b", b"z")]);
    assert_eq!(results, vec![created(1), created(2)]);
}

/// The dedupe window lasts until a retention pass forgets the key (strictly before the
/// cut-off); after that the key is free: a repeat creates a new job, with a new record.
#[test]
fn the_dedupe_window_ends_when_retention_forgets_the_key() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 1);
    h.submit(NOW, vec![keyed("k", b"p")]);
    finish(&mut h, NOW + 5, 1);
    let keep = Retention {
        keys_before_ms: NOW,
        max: 10,
        ..Retention::default()
    };
    assert_eq!(retain(&mut h, NOW + 10, keep).0, (0, 0));
    let (results, _) = submit_results(&mut h, NOW + 20, vec![keyed("k", b"p")]);
    assert_eq!(results, vec![existing(1)]);

    let forget = Retention {
        keys_before_ms: NOW + 1,
        max: 10,
        ..Retention::default()
    };
    assert_eq!(retain(&mut h, NOW + 30, forget).0, (0, 1));
    assert_eq!(h.table.idempotency_key("k"), None);
    assert_eq!(
        status(&h, 1),
        JobStatus::Succeeded,
        "the job itself is kept"
    );
    // A different payload is no longer a conflict: the key starts a new job.
    let (results, _) = submit_results(&mut h, NOW + 40, vec![keyed("k", b"other")]);
    assert_eq!(results, vec![created(2)]);
    assert_eq!(
        h.table.idempotency_key("k"),
        Some(KeyRecord {
            job: 2,
            fingerprint: fingerprint("q", "noop", b"other"),
            created_at_ms: NOW + 40,
        })
    );
}

// ----- retry backoff and jitter -----

/// The backoff ceiling before retry n+1 is base × 2^(n−1), capped, per job; zero fields take
/// the defaults (a zero cap is at least the base); huge failure counts saturate at the cap.
#[test]
fn the_backoff_ceiling_follows_each_jobs_base_and_cap() {
    let b = |base_ms, max_ms| Backoff { base_ms, max_ms };
    let cases: Vec<(Backoff, Vec<(u32, u64)>)> = vec![
        (
            b(0, 0),
            vec![
                (1, RETRY_BACKOFF_BASE_MS),
                (2, 2 * RETRY_BACKOFF_BASE_MS),
                (9, 256 * RETRY_BACKOFF_BASE_MS),
                (10, RETRY_BACKOFF_MAX_MS),
            ],
        ),
        (
            b(200, 1_000),
            vec![
                (0, 200),
                (1, 200),
                (2, 400),
                (3, 800),
                (4, 1_000),
                (50, 1_000),
            ],
        ),
        (b(200, 0), vec![(11, 204_800), (12, RETRY_BACKOFF_MAX_MS)]),
        (b(0, 1_500), vec![(1, 1_000), (2, 1_500), (3, 1_500)]),
        (b(0, 500), vec![(1, 500), (7, 500)]),
        (
            b(BACKOFF_MS_MAX, 0),
            vec![(1, BACKOFF_MS_MAX), (5, BACKOFF_MS_MAX)],
        ),
        (
            b(1, BACKOFF_MS_MAX),
            vec![
                (1, 1),
                (27, 1 << 26),
                (41, BACKOFF_MS_MAX),
                (u32::MAX, BACKOFF_MS_MAX),
            ],
        ),
        (
            b(BACKOFF_MS_MAX, BACKOFF_MS_MAX),
            vec![(u32::MAX, BACKOFF_MS_MAX)],
        ),
    ];
    for (backoff, schedule) in cases {
        for (failures, ceiling) in schedule {
            assert_eq!(
                backoff_ceiling_ms(failures, backoff),
                ceiling,
                "{backoff:?} after {failures} failures"
            );
        }
    }
}

/// Equal jitter: every delay lies in [ceiling/2, ceiling]; over many leader draws both ends are
/// reached and the values spread evenly; one draw spreads the jobs failing in the same entry.
#[test]
fn jitter_stays_within_half_to_full_ceiling_and_spreads() {
    let draws: Vec<u64> = (0..10_000u64)
        .map(|i| i.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (i << 7))
        .collect();
    let b = |base_ms, max_ms| Backoff { base_ms, max_ms };
    let cases = [
        (1, b(0, 0)),
        (3, b(0, 0)),
        (20, b(0, 0)),
        (1, b(1, 1)),
        (1, b(3, 3)),
        (2, b(250, 0)),
    ];
    for (failures, backoff) in cases {
        let ceiling = backoff_ceiling_ms(failures, backoff);
        let floor = ceiling / 2;
        let delays: Vec<u64> = draws
            .iter()
            .map(|&e| retry_delay_ms(failures, backoff, e, 42))
            .collect();
        assert!(
            delays.iter().all(|d| (floor..=ceiling).contains(d)),
            "{backoff:?}/{failures}: a delay outside [{floor}, {ceiling}]"
        );
        // Both ends are reached (exactly, where the span is small next to the draws).
        let span = ceiling - floor + 1;
        let (min, max) = (*delays.iter().min().unwrap(), *delays.iter().max().unwrap());
        if span <= 600 {
            assert_eq!((min, max), (floor, ceiling), "{backoff:?}/{failures}");
        } else {
            assert!(
                min < floor + span / 100,
                "{backoff:?}/{failures}: min {min}"
            );
            assert!(
                max > ceiling - span / 100,
                "{backoff:?}/{failures}: max {max}"
            );
        }
        // Ten equal buckets over the span each get close to a tenth of the draws.
        if span >= 10 {
            let mut buckets = [0u32; 10];
            for d in &delays {
                buckets[((d - floor) * 10 / span) as usize] += 1;
            }
            assert!(
                buckets.iter().all(|&n| (850..=1_150).contains(&n)),
                "{backoff:?}/{failures}: uneven {buckets:?}"
            );
        } else {
            let distinct: BTreeSet<u64> = delays.iter().copied().collect();
            assert_eq!(distinct.len() as u64, span, "every value in a tiny span");
        }
        // Deterministic: the same draw gives the same delay on every replica.
        assert_eq!(retry_delay_ms(failures, backoff, draws[7], 42), delays[7]);
    }
    // One leader draw, many jobs failing in the same entry: they do not retry in lockstep.
    let same_draw: BTreeSet<u64> = (1..=1_000)
        .map(|job| retry_delay_ms(1, Backoff::default(), 0xABCD, job))
        .collect();
    assert!(same_draw.len() > 300, "only {} distinct", same_draw.len());
}

/// Apply requeues a retryable failure at (failure time + the delay drawn from the entry's
/// entropy and the job's own backoff); the job is not due a millisecond early; jobs failing in
/// one entry get their own delays; the last allowed failure makes a dead letter.
#[test]
fn apply_backs_off_by_each_jobs_own_schedule() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    let backoff = Backoff {
        base_ms: 200,
        max_ms: 1_000,
    };
    h.submit(
        NOW,
        vec![job_with(|j| {
            j.backoff = backoff;
            j.max_attempts = 6;
        })],
    );
    let ceilings = [200, 400, 800, 1_000, 1_000];
    let mut due = NOW;
    for (n, &ceiling) in ceilings.iter().enumerate() {
        let failures = n as u32 + 1;
        h.entropy = (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let token = h.assign(due, 1, 1, 1);
        let failed_at = due + 7;
        h.complete(failed_at, 1, token, failed("flaky", true));
        let delay = retry_delay_ms(failures, backoff, h.entropy, 1);
        assert!((ceiling / 2..=ceiling).contains(&delay), "{delay}");
        let job = h.job(1);
        assert_eq!(
            (job.status, job.failures, job.run_at_ms),
            (JobStatus::Pending, failures, failed_at + delay)
        );
        due = failed_at + delay;
        let none = BTreeSet::new();
        assert_eq!(plan_assignments(&h.table, due - 1, 10, &none), vec![]);
        assert_eq!(
            plan_assignments(&h.table, due, 10, &none),
            vec![assignment(1, 1, 1)]
        );
    }
    let token = h.assign(due, 1, 1, 1);
    h.complete(due, 1, token, failed("flaky", true));
    assert_eq!(status(&h, 1), JobStatus::Dead);
    assert_eq!(h.job(1).failures, 6);

    // Two jobs fail in one entry: one entropy, a delay each from its own id.
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.entropy = 77;
    h.submit(NOW, vec![new_job("q", "noop", b""); 2]);
    let (t1, t2) = (h.assign(NOW, 1, 1, 1), h.assign(NOW, 2, 1, 1));
    h.apply(
        NOW + 1,
        Command::Complete(vec![
            completion(1, t1, failed("x", true)),
            completion(2, t2, failed("x", true)),
        ]),
    );
    for id in [1, 2] {
        assert_eq!(
            h.job(id).run_at_ms,
            NOW + 1 + retry_delay_ms(1, Backoff::default(), 77, id)
        );
    }
    assert_ne!(h.job(1).run_at_ms, h.job(2).run_at_ms);
}

/// A job's backoff is validated: base and cap at most BACKOFF_MS_MAX, base not above a set
/// cap; a refused job creates nothing.
#[test]
fn backoff_settings_are_validated() {
    let over = BACKOFF_MS_MAX + 1;
    let refused = [
        (
            Backoff {
                base_ms: over,
                max_ms: 0,
            },
            format!("backoff must be at most {BACKOFF_MS_MAX} ms, got base {over} max 0"),
        ),
        (
            Backoff {
                base_ms: 0,
                max_ms: over,
            },
            format!("backoff must be at most {BACKOFF_MS_MAX} ms, got base 0 max {over}"),
        ),
        (
            Backoff {
                base_ms: 2_000,
                max_ms: 1_000,
            },
            "backoff base 2000 ms exceeds its max 1000 ms".to_string(),
        ),
    ];
    for (backoff, message) in refused {
        let mut h = Harness::new();
        let (results, effects) =
            submit_results(&mut h, NOW, vec![job_with(|j| j.backoff = backoff)]);
        assert_eq!(results, vec![Err(Rejection::Invalid(message))]);
        assert_eq!(effects, vec![]);
        assert_eq!(h.table.jobs().count(), 0);
    }
    let accepted = [
        (1_000, 1_000),
        (BACKOFF_MS_MAX, 0),
        (BACKOFF_MS_MAX, BACKOFF_MS_MAX),
        (0, 1),
        (0, BACKOFF_MS_MAX),
        (1, 0),
    ];
    let mut h = Harness::new();
    let jobs = accepted
        .iter()
        .map(|&(base_ms, max_ms)| job_with(|j| j.backoff = Backoff { base_ms, max_ms }))
        .collect();
    assert_eq!(h.submit(NOW, jobs), vec![1, 2, 3, 4, 5, 6]);
}

// ----- dead letters -----

/// The two ways into the dead letters (a permanent failure, out of attempts) each record the
/// full attempt history and the last error, keep the payload, and list the job among the dead.
/// (Abandoned attempts are no way in: `abandons_never_consume_attempts_or_kill_the_job`.)
#[test]
fn dead_letters_keep_their_history_last_error_and_payload() {
    #[derive(Clone, Copy, Debug)]
    enum Route {
        Permanent,
        OutOfAttempts,
    }
    for route in [Route::Permanent, Route::OutOfAttempts] {
        let mut h = Harness::new();
        h.register(NOW, 1, 1, 1);
        let max_attempts = match route {
            Route::Permanent => 5,
            Route::OutOfAttempts => 3,
        };
        h.submit(NOW, vec![job_with(|j| j.max_attempts = max_attempts)]);
        let mut expected: Vec<Attempt> = Vec::new();
        let mut effects = Vec::new();
        let mut at = NOW + 10;
        let incarnation = 1;
        let mut last_error: String;
        loop {
            at = at.max(h.job(1).run_at_ms);
            let token = h.assign(at, 1, 1, incarnation);
            let number = expected.len() as u32 + 1;
            let end = match route {
                Route::Permanent => {
                    last_error = format!("refused {number}");
                    effects.extend(h.complete(at + 1, 1, token, failed(&last_error, false)));
                    AttemptEnd::Failed {
                        error: last_error.clone(),
                        retryable: false,
                    }
                }
                Route::OutOfAttempts => {
                    last_error = format!("flaky {number}");
                    effects.extend(h.complete(at + 1, 1, token, failed(&last_error, true)));
                    AttemptEnd::Failed {
                        error: last_error.clone(),
                        retryable: true,
                    }
                }
            };
            expected.push(Attempt {
                number,
                token,
                node: 1,
                incarnation,
                started_at_ms: at,
                ended_at_ms: Some(at + 1),
                end: Some(end),
            });
            at += 100;
            if status(&h, 1) == JobStatus::Dead {
                break;
            }
            assert_eq!(status(&h, 1), JobStatus::Pending, "{route:?}");
        }
        let job = h.job(1);
        let attempts = match route {
            Route::Permanent => 1,
            Route::OutOfAttempts => 3,
        };
        assert_eq!(job.attempts.len(), attempts, "{route:?}");
        assert_eq!(job.attempts, expected, "{route:?}");
        assert_eq!(
            job.last_error.as_deref(),
            Some(last_error.as_str()),
            "{route:?}"
        );
        let (failures, abandoned) = match route {
            Route::Permanent => (1, 0),
            Route::OutOfAttempts => (3, 0),
        };
        assert_eq!(
            (job.failures, job.abandoned),
            (failures, abandoned),
            "{route:?}"
        );
        assert_eq!(job.updated_at_ms, at - 100 + 1, "{route:?}");
        assert_eq!(
            effects,
            vec![],
            "{route:?}: a dead letter keeps its payload"
        );
        assert_eq!(
            h.table.dead_jobs().map(|j| j.id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(h.table.counts(), &counts(0, 0, 0, 1, 0), "{route:?}");
        let last = expected.last().unwrap();
        assert_eq!(
            h.events.last(),
            Some(&event(
                1,
                "q",
                JobStatus::Dead,
                last.number,
                last.token,
                Some(1),
                at - 100 + 1
            )),
            "{route:?}"
        );
    }
}

/// A fixture of dead letters on node 1 (each killed by one permanent failure):
/// job 1 (queue a, kind x, died NOW+1, idempotency key "one"), 2 (b, x, NOW+2), 3 (a, y,
/// NOW+3), 4 (b, y, NOW+4); job 5 (a, x) is pending and 6 (a, x) succeeded.
fn dead_fixture() -> Harness {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    let spec = [
        ("a", "x"),
        ("b", "x"),
        ("a", "y"),
        ("b", "y"),
        ("a", "x"),
        ("a", "x"),
    ];
    let mut jobs: Vec<NewJob> = spec.iter().map(|(q, k)| new_job(q, k, b"data")).collect();
    jobs[0].idempotency_key = Some("one".into());
    h.submit(NOW, jobs);
    for id in 1..=4 {
        kill(&mut h, NOW + id, id);
    }
    finish(&mut h, NOW + 5, 6);
    h.events.clear();
    h
}

/// Redrive selects dead letters by ids (in the given order), by queue and/or kind, or all
/// (oldest death first), at most `max` (0 counts as 1); ids that are not dead letters, and
/// repeated ids, are skipped. A redriven job is pending now with failures and abandons reset,
/// its attempt history and last error kept, its payload reused (no effect), and one event.
#[test]
fn redrive_selects_dead_letters_and_requeues_them() {
    let cases: Vec<(&str, DeadFilter, Vec<JobId>)> = vec![
        (
            "ids in order",
            dead_filter(&[3, 1], None, None, 10),
            vec![3, 1],
        ),
        (
            "non-dead ids skipped",
            dead_filter(&[5, 6, 99, 2], None, None, 10),
            vec![2],
        ),
        (
            "repeated ids count once",
            dead_filter(&[2, 2, 4, 2], None, None, 10),
            vec![2, 4],
        ),
        (
            "ids and queue",
            dead_filter(&[1, 2, 3], Some("a"), None, 10),
            vec![1, 3],
        ),
        ("queue", dead_filter(&[], Some("a"), None, 10), vec![1, 3]),
        ("kind", dead_filter(&[], None, Some("y"), 10), vec![3, 4]),
        (
            "queue and kind",
            dead_filter(&[], Some("b"), Some("y"), 10),
            vec![4],
        ),
        ("all", all_dead(10), vec![1, 2, 3, 4]),
        ("all, max 2", all_dead(2), vec![1, 2]),
        ("all, max 0", all_dead(0), vec![1]),
        (
            "ids, max 3",
            dead_filter(&[4, 3, 2, 1], None, None, 3),
            vec![4, 3, 2],
        ),
        ("no match", dead_filter(&[], Some("zzz"), None, 10), vec![]),
    ];
    let fixture = dead_fixture();
    for (name, filter, expected) in cases {
        let mut h = fixture.clone();
        let at = NOW + 1_000;
        let (ids, effects) = redrive(&mut h, at, filter);
        assert_eq!(ids, expected, "{name}");
        assert_eq!(effects, vec![], "{name}: the kept payload is reused");
        for id in 1..=6 {
            let before = fixture.job(id);
            let job = h.job(id);
            if !expected.contains(&id) {
                assert_eq!(job, before, "{name}: job {id} untouched");
                continue;
            }
            assert_eq!(job.status, JobStatus::Pending, "{name}");
            assert_eq!((job.failures, job.abandoned), (0, 0), "{name}");
            assert_eq!((job.run_at_ms, job.updated_at_ms), (at, at), "{name}");
            assert_eq!(job.attempts, before.attempts, "{name}: history kept");
            assert_eq!(job.last_error.as_deref(), Some("bad input"), "{name}");
        }
        let mut expected_ready: Vec<JobId> = expected.clone();
        expected_ready.push(5);
        expected_ready.sort_unstable();
        assert_eq!(ready(&h), expected_ready, "{name}");
        let n = expected.len() as u64;
        assert_eq!(h.table.counts(), &counts(1 + n, 0, 1, 4 - n, 0), "{name}");
        let events: Vec<JobEvent> = expected
            .iter()
            .map(|&id| {
                let token = fixture.job(id).attempts[0].token;
                event(
                    id,
                    &fixture.job(id).queue,
                    JobStatus::Pending,
                    1,
                    token,
                    Some(1),
                    at,
                )
            })
            .collect();
        assert_eq!(h.events, events, "{name}");
    }
}

/// Purge selects like redrive and deletes the dead letters with their payloads; other jobs are
/// untouched. The key of a purged job stays recorded until retention forgets it, so a repeat
/// still answers with the (now deleted) original id.
#[test]
fn purge_deletes_dead_letters_and_their_payloads() {
    let cases: Vec<(&str, DeadFilter, Vec<JobId>)> = vec![
        (
            "ids",
            dead_filter(&[4, 1, 5, 6, 4], None, None, 10),
            vec![4, 1],
        ),
        ("queue", dead_filter(&[], Some("b"), None, 10), vec![2, 4]),
        ("kind, max 1", dead_filter(&[], None, Some("y"), 1), vec![3]),
        ("all", all_dead(10), vec![1, 2, 3, 4]),
    ];
    let fixture = dead_fixture();
    for (name, filter, expected) in cases {
        let mut h = fixture.clone();
        let (ids, effects) = purge(&mut h, NOW + 1_000, filter);
        assert_eq!(ids, expected, "{name}");
        let dropped: Vec<Effect> = expected
            .iter()
            .map(|&job| Effect::DropPayload { job })
            .collect();
        assert_eq!(effects, dropped, "{name}");
        for id in 1..=6 {
            if expected.contains(&id) {
                assert_eq!(h.table.job(id), None, "{name}");
            } else {
                assert_eq!(h.job(id), fixture.job(id), "{name}");
            }
        }
        let n = expected.len() as u64;
        assert_eq!(h.table.counts(), &counts(1, 0, 1, 4 - n, 0), "{name}");
        assert_eq!(h.table.dead_jobs().count() as u64, 4 - n, "{name}");
        assert!(
            h.events.is_empty(),
            "{name}: a deletion is not a state change"
        );
        if expected.contains(&1) {
            let (results, effects) = submit_results(
                &mut h,
                NOW + 2_000,
                vec![{
                    let mut j = new_job("a", "x", b"data");
                    j.idempotency_key = Some("one".into());
                    j
                }],
            );
            assert_eq!(results, vec![existing(1)], "{name}");
            assert_eq!(effects, vec![], "{name}");
        }
    }
}

/// A filter with nothing set and no `all` (what an empty request decodes to) is refused by
/// Redrive and PurgeDead alike, and so is `all` together with a filter; neither changes a
/// thing, whatever the table holds. Found from outside: an empty Purge deleted every dead
/// letter.
#[test]
fn an_empty_dead_letter_filter_without_all_is_refused() {
    let fixture = dead_fixture();
    let mut with_all = dead_filter(&[], Some("a"), None, 10);
    with_all.all = true;
    let mut ids_and_all = dead_filter(&[1], None, None, 10);
    ids_and_all.all = true;
    let cases = [
        ("empty", dead_filter(&[], None, None, 10), "all = true"),
        ("empty, max 0", DeadFilter::default(), "all = true"),
        ("queue and all", with_all, "takes no job_ids"),
        ("ids and all", ids_and_all, "takes no job_ids"),
    ];
    for (name, filter, why) in cases {
        for purge in [false, true] {
            let mut h = fixture.clone();
            let command = if purge {
                Command::PurgeDead(filter.clone())
            } else {
                Command::Redrive(filter.clone())
            };
            let (response, effects) = h.apply(NOW + 1_000, command);
            let refusal = match response {
                Response::Redriven(Err(r)) | Response::PurgedDead(Err(r)) => r,
                other => panic!("{name} (purge {purge}): expected a refusal, got {other:?}"),
            };
            let Rejection::Invalid(reason) = refusal else {
                panic!("{name}: expected Invalid, got {refusal:?}");
            };
            assert!(reason.contains(why), "{name}: {reason}");
            assert_eq!(effects, vec![], "{name}");
            assert!(h.events.is_empty(), "{name}");
            let jobs = |h: &Harness| h.table.jobs().collect::<Vec<_>>();
            assert_eq!(jobs(&h), jobs(&fixture), "{name}: no job changed");
            assert_eq!(h.table.counts(), fixture.table.counts(), "{name}");
            assert_eq!(h.table.dead_jobs().count(), 4, "{name}: nothing purged");
        }
    }
}

/// A redriven job's attempts continue their numbering with fresh tokens, and it gets a full
/// max_attempts again: retried with the backoff of its first failure, dead again when out.
#[test]
fn a_redriven_job_continues_its_attempt_numbers_with_fresh_attempts() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 1);
    h.submit(NOW, vec![job_with(|j| j.max_attempts = 2)]);
    let mut tokens = vec![];
    let mut at = NOW;
    for _ in 0..2 {
        at = at.max(h.job(1).run_at_ms);
        let token = h.assign(at, 1, 1, 1);
        h.complete(at, 1, token, failed("flaky", true));
        tokens.push(token);
    }
    assert_eq!(status(&h, 1), JobStatus::Dead);
    at += 10;
    assert_eq!(
        redrive(&mut h, at, dead_filter(&[1], None, None, 1)).0,
        vec![1]
    );
    let token = h.assign(at, 1, 1, 1);
    tokens.push(token);
    let start = h.job(1).attempts.last().unwrap().clone();
    assert_eq!((start.number, start.token), (3, token));
    h.complete(at, 1, token, failed("flaky", true));
    let job = h.job(1);
    assert_eq!((job.status, job.failures), (JobStatus::Pending, 1));
    assert_eq!(
        job.run_at_ms,
        at + retry_delay_ms(1, Backoff::default(), h.entropy, 1),
        "backs off like a first failure"
    );
    at = job.run_at_ms;
    let token = h.assign(at, 1, 1, 1);
    tokens.push(token);
    h.complete(at, 1, token, failed("flaky", true));
    assert_eq!((status(&h, 1), h.job(1).failures), (JobStatus::Dead, 2));

    assert_eq!(redrive(&mut h, at, all_dead(5)).0, vec![1]);
    let token = h.assign(at, 1, 1, 1);
    tokens.push(token);
    let effects = h.complete(at, 1, token, succeeded(b"done"));
    assert_eq!(effects, vec![Effect::DropPayload { job: 1 }]);
    let job = h.job(1);
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(
        job.attempts
            .iter()
            .map(|a| (a.number, a.token))
            .collect::<Vec<_>>(),
        tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (i as u32 + 1, t))
            .collect::<Vec<_>>()
    );
    assert!(tokens.windows(2).all(|w| w[0] < w[1]));
}

/// A redriven job with an ordering key joins the back of its line: it waits for every job of
/// its key that is live now; with an empty line it is ready at once.
#[test]
fn redrive_puts_an_ordering_key_job_at_the_back_of_its_line() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(NOW, vec![ordered("q", Some("k")); 4]);
    assert_eq!(ready(&h), vec![1]);
    kill(&mut h, NOW, 1);
    assert_eq!(ready(&h), vec![2], "the dead first job released the line");
    assert_eq!(
        redrive(&mut h, NOW + 1, dead_filter(&[1], None, None, 1)).0,
        vec![1]
    );
    assert_eq!(ready(&h), vec![2], "the redriven job waits at the back");
    let (_, rejected, _) = assign_batch(&mut h, NOW + 1, &[(1, 1, 1)]);
    assert_eq!(rejected, vec![(1, Rejection::OrderingBlocked("k".into()))]);
    for (next, then) in [(2, vec![3]), (3, vec![4]), (4, vec![1])] {
        finish(&mut h, NOW + 2, next);
        assert_eq!(ready(&h), then);
    }
    // Alone in its line, a redriven job is ready at once.
    kill(&mut h, NOW + 3, 1);
    assert_eq!(ready(&h), Vec::<JobId>::new());
    redrive(&mut h, NOW + 4, dead_filter(&[1], None, None, 1));
    assert_eq!(ready(&h), vec![1]);
}

/// At most DEAD_BATCH_MAX dead letters move per command, however large the max.
#[test]
fn a_dead_letter_command_moves_at_most_dead_batch_max() {
    let mut h = Harness::new();
    let n = DEAD_BATCH_MAX + 1;
    h.register(NOW, 1, 1, n as u32);
    for chunk in [SUBMIT_BATCH_JOBS_MAX, n - SUBMIT_BATCH_JOBS_MAX] {
        h.submit(NOW, vec![job_with(|j| j.max_attempts = 1); chunk]);
    }
    let ids: Vec<JobId> = (1..=n as JobId).collect();
    for chunk in ids.chunks(1000) {
        let list: Vec<_> = chunk.iter().map(|&id| (id, 1, 1)).collect();
        let (started, _, _) = assign_batch(&mut h, NOW, &list);
        assert_eq!(started as usize, chunk.len());
        let index = h.index;
        let completions = chunk
            .iter()
            .map(|&id| completion(id, index, failed("x", false)))
            .collect();
        h.apply(NOW, Command::Complete(completions));
    }
    assert_eq!(h.table.counts().dead, n as u64);
    let (ids, _) = redrive(&mut h, NOW, all_dead(u32::MAX));
    assert_eq!(ids.len(), DEAD_BATCH_MAX);
    let (ids, effects) = purge(&mut h, NOW, all_dead(u32::MAX));
    assert_eq!(ids, vec![n as JobId]);
    assert_eq!(effects, vec![Effect::DropPayload { job: n as JobId }]);
}

// ----- cancellation -----

/// Cancel ends pending jobs (due, delayed, or backing off) and running ones (whose node is told
/// to stop the attempt), refuses finished and unknown jobs each on its own, drops payloads of
/// what it ends, and refuses the cancelled attempt's late report without counting it stale.
#[test]
fn cancel_ends_pending_and_running_jobs_and_refuses_the_rest() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(
        NOW,
        vec![
            new_job("q", "noop", b"1"),
            new_job("q", "noop", b"2"),
            new_job("q", "noop", b"3"),
            job_with(|j| j.max_attempts = 1),
            new_job("q", "noop", b"5"),
            job_with(|j| j.run_at_ms = NOW + 60_000),
            new_job("q", "noop", b"7"),
        ],
    );
    let t2 = h.assign(NOW, 2, 1, 1);
    finish(&mut h, NOW, 3);
    kill(&mut h, NOW, 4);
    cancel(&mut h, NOW, &[5]);
    let t7 = h.assign(NOW, 7, 1, 1);
    h.complete(NOW, 7, t7, failed("flaky", true));
    assert!(h.job(7).run_at_ms > NOW, "job 7 backs off");
    h.events.clear();

    let at = NOW + 100;
    let (results, effects) = cancel(&mut h, at, &[1, 2, 3, 4, 5, 99, 6, 7]);
    assert_eq!(
        results,
        vec![
            (1, Ok(JobStatus::Pending)),
            (2, Ok(JobStatus::Running)),
            (3, Err(Rejection::Finished("succeeded".into()))),
            (4, Err(Rejection::Finished("dead".into()))),
            (5, Err(Rejection::Finished("cancelled".into()))),
            (99, Err(Rejection::UnknownJob(99))),
            (6, Ok(JobStatus::Pending)),
            (7, Ok(JobStatus::Pending)),
        ]
    );
    assert_eq!(
        effects,
        vec![
            Effect::DropPayload { job: 1 },
            Effect::Cancel {
                job: 2,
                token: t2,
                node: 1
            },
            Effect::DropPayload { job: 2 },
            Effect::DropPayload { job: 6 },
            Effect::DropPayload { job: 7 },
        ]
    );
    assert_eq!(
        h.events,
        vec![
            event(1, "q", JobStatus::Cancelled, 0, 0, None, at),
            event(2, "q", JobStatus::Cancelled, 1, t2, Some(1), at),
            event(6, "q", JobStatus::Cancelled, 0, 0, None, at),
            event(7, "q", JobStatus::Cancelled, 1, t7, Some(1), at),
        ]
    );
    let job = h.job(2);
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(
        job.attempts[0].end,
        Some(AttemptEnd::Cancelled {
            reason: "cancelled by a client".into()
        })
    );
    assert_eq!(job.attempts[0].ended_at_ms, Some(at));
    assert_eq!(job.last_error.as_deref(), Some("cancelled by a client"));
    assert_eq!(h.table.running_on(1), 0, "the node slot is free");
    assert_eq!(ready(&h), Vec::<JobId>::new());
    assert_eq!(h.table.due_delayed_jobs(u64::MAX).count(), 0);
    assert_eq!(h.table.counts(), &counts(0, 0, 1, 1, 5));
    assert_eq!(
        h.job(4).status,
        JobStatus::Dead,
        "a dead letter is not cancelled"
    );

    // The stopped attempt reports late: refused as finished, not a fencing event.
    let before = h.table.clone();
    for outcome in [succeeded(b"late"), failed("late", true)] {
        let (response, effects) = h.apply(at, Command::Complete(vec![completion(2, t2, outcome)]));
        assert_eq!(
            response,
            Response::Completed {
                accepted: 0,
                rejected: vec![(2, Rejection::Finished("cancelled".into()))]
            }
        );
        assert_eq!(effects, vec![]);
        assert!(h.table == before);
    }
    assert_eq!(h.table.counts().stale_completions, 0);
}

/// A Cancel batch over CANCEL_BATCH_MAX is refused whole and changes nothing.
#[test]
fn a_cancel_batch_over_the_limit_is_refused_whole() {
    let mut h = Harness::new();
    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    let before = h.table.clone();
    let ids: Vec<JobId> = vec![1; CANCEL_BATCH_MAX + 1];
    let (results, effects) = cancel(&mut h, NOW, &ids);
    let err = Rejection::BatchTooLarge {
        got: CANCEL_BATCH_MAX + 1,
        max: CANCEL_BATCH_MAX,
    };
    assert_eq!(results, vec![(1, Err(err)); CANCEL_BATCH_MAX + 1]);
    assert_eq!(effects, vec![]);
    assert!(h.table == before);
    let (results, _) = cancel(&mut h, NOW, &ids[..CANCEL_BATCH_MAX]);
    assert_eq!(results[0], (1, Ok(JobStatus::Pending)));
    assert_eq!(
        results[1],
        (1, Err(Rejection::Finished("cancelled".into())))
    );
}

// ----- ordering keys -----

/// Jobs sharing an ordering key run one at a time in submission order (a later higher-priority
/// job does not jump its line); other keys and unkeyed jobs run in parallel; apply refuses a
/// job that waits behind an earlier one.
#[test]
fn ordering_key_jobs_run_one_at_a_time_in_submission_order() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    let mut jobs = vec![
        ordered("q", Some("k")),
        ordered("q", Some("k")),
        ordered("q", Some("j")),
        ordered("q", Some("k")),
        ordered("q", None),
        ordered("q", Some("j")),
    ];
    jobs[3].priority = 9;
    h.submit(NOW, jobs);
    assert_eq!(ready(&h), vec![1, 3, 5]);
    let (started, rejected, _) = assign_batch(&mut h, NOW, &[(2, 1, 1), (4, 1, 1), (6, 1, 1)]);
    assert_eq!(started, 0);
    assert_eq!(
        rejected,
        vec![
            (2, Rejection::OrderingBlocked("k".into())),
            (4, Rejection::OrderingBlocked("k".into())),
            (6, Rejection::OrderingBlocked("j".into())),
        ]
    );

    let none = BTreeSet::new();
    let mut rounds = Vec::new();
    let mut at = NOW;
    loop {
        let plan = plan_assignments(&h.table, at, 100, &none);
        if plan.is_empty() {
            break;
        }
        let ids: Vec<JobId> = plan.iter().map(|a| a.job).collect();
        let list: Vec<_> = ids.iter().map(|&id| (id, 1, 1)).collect();
        let (started, _, _) = assign_batch(&mut h, at, &list);
        assert_eq!(started as usize, ids.len());
        let index = h.index;
        let mut keys_running = BTreeSet::new();
        for job in h.table.jobs_running_on(1) {
            if let Some(key) = &job.ordering_key {
                assert!(keys_running.insert(key.clone()), "two of line {key} run");
            }
        }
        at += 10;
        h.apply(
            at,
            Command::Complete(
                ids.iter()
                    .map(|&id| completion(id, index, succeeded(b"")))
                    .collect(),
            ),
        );
        rounds.push(ids);
    }
    assert_eq!(rounds, vec![vec![1, 3, 5], vec![2, 6], vec![4]]);
    assert_eq!(h.table.counts(), &counts(0, 0, 6, 0, 0));
}

/// The first job keeps its place through retries (even once its backoff is over) and lost
/// nodes; only when it finishes does the next job of its line become ready.
#[test]
fn an_ordering_key_job_keeps_its_place_through_retries_and_abandons() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(NOW, vec![ordered("q", Some("k")), ordered("q", Some("k"))]);
    let token = h.assign(NOW, 1, 1, 1);
    h.complete(NOW, 1, token, failed("flaky", true));
    let due = h.job(1).run_at_ms;
    let none = BTreeSet::new();
    assert_eq!(plan_assignments(&h.table, due - 1, 10, &none), vec![]);
    assert_eq!(
        plan_assignments(&h.table, due, 10, &none),
        vec![assignment(1, 1, 1)]
    );
    h.assign(due, 1, 1, 1);
    // Node 1 restarts: the attempt is abandoned and job 1 is first again, at once.
    assert_eq!(h.register(due + 1, 1, 2, 10), 1);
    assert_eq!(ready(&h), vec![1]);
    let (_, rejected, _) = assign_batch(&mut h, due + 1, &[(2, 1, 2)]);
    assert_eq!(rejected, vec![(2, Rejection::OrderingBlocked("k".into()))]);
    let token = h.assign(due + 2, 1, 1, 2);
    h.complete(due + 3, 1, token, succeeded(b""));
    assert_eq!(ready(&h), vec![2]);
}

/// A line's first job whose node is lost under it again and again (more than
/// ABANDONS_RERUN_AT_ONCE times) stays first: it never dies of it, and the next job of its
/// ordering key waits until it has run.
#[test]
fn lost_nodes_keep_the_line() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    let mut first = ordered("q", Some("k"));
    first.max_attempts = 1;
    h.submit(NOW, vec![first, ordered("q", Some("k"))]);
    let mut at = NOW;
    for incarnation in 1..=u64::from(ABANDONS_RERUN_AT_ONCE) + 3 {
        at = at.max(h.job(1).run_at_ms);
        h.assign(at, 1, 1, incarnation);
        h.register(at, 1, incarnation + 1, 10);
        assert_eq!(status(&h, 1), JobStatus::Pending);
        assert_eq!(status(&h, 2), JobStatus::Pending);
        let (_, rejected, _) = assign_batch(&mut h, at, &[(2, 1, incarnation + 1)]);
        assert_eq!(rejected, vec![(2, Rejection::OrderingBlocked("k".into()))]);
    }
    at = at.max(h.job(1).run_at_ms);
    let incarnation = u64::from(ABANDONS_RERUN_AT_ONCE) + 4;
    let token = h.assign(at, 1, 1, incarnation);
    h.complete(at, 1, token, succeeded(b""));
    assert_eq!(ready(&h), vec![2]);
}

/// However the first job of a line ends (success, a permanent failure, out of attempts,
/// cancelled while running or while pending), the next becomes ready then; lost nodes never end
/// it (`lost_nodes_keep_the_line`).
#[test]
fn any_end_of_the_first_job_releases_the_next() {
    type End = fn(&mut Harness);
    let ends: [(&str, End); 5] = [
        ("succeeded", |h| {
            finish(h, NOW, 1);
        }),
        ("permanent failure", |h| {
            kill(h, NOW, 1);
        }),
        ("out of attempts", |h| {
            let token = h.assign(NOW, 1, 1, 1);
            h.complete(NOW, 1, token, failed("flaky", true));
        }),
        ("cancelled running", |h| {
            h.assign(NOW, 1, 1, 1);
            cancel(h, NOW, &[1]);
        }),
        ("cancelled pending", |h| {
            cancel(h, NOW, &[1]);
        }),
    ];
    for (name, end) in ends {
        let mut h = Harness::new();
        h.register(NOW, 1, 1, 10);
        let mut first = ordered("q", Some("k"));
        first.max_attempts = 1;
        h.submit(
            NOW,
            vec![first, ordered("q", Some("k")), ordered("q", Some("k"))],
        );
        assert_eq!(ready(&h), vec![1], "{name}");
        end(&mut h);
        assert!(status(&h, 1).is_terminal(), "{name}");
        assert_eq!(ready(&h), vec![2], "{name}: only the next one");
    }
}

/// A first job that is not due yet blocks its whole line until it runs; other lines go on.
#[test]
fn a_delayed_first_job_blocks_its_line() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    let mut first = ordered("q", Some("k"));
    first.run_at_ms = NOW + 5_000;
    h.submit(
        NOW,
        vec![first, ordered("q", Some("k")), ordered("q", Some("j"))],
    );
    assert_eq!(ready(&h), vec![3]);
    assert_eq!(
        h.table.due_delayed_jobs(u64::MAX).collect::<Vec<_>>(),
        vec![1]
    );
    let none = BTreeSet::new();
    let planned = |at| -> Vec<JobId> {
        plan_assignments(&h.table, at, 10, &none)
            .iter()
            .map(|a| a.job)
            .collect()
    };
    assert_eq!(planned(NOW + 4_999), vec![3]);
    assert_eq!(planned(NOW + 5_000), vec![1, 3]);
    let (_, rejected, _) = assign_batch(&mut h, NOW + 4_999, &[(2, 1, 1), (1, 1, 1)]);
    assert_eq!(
        rejected,
        vec![
            (2, Rejection::OrderingBlocked("k".into())),
            (1, Rejection::NotDue(NOW + 5_000)),
        ]
    );
}

/// Cancelling a job that waits in a line removes it from the line and nothing else: the jobs
/// behind it stay blocked until the first finishes, then the one after it runs.
#[test]
fn cancelling_a_blocked_ordering_key_job_keeps_the_line() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(NOW, vec![ordered("q", Some("k")); 3]);
    h.assign(NOW, 1, 1, 1);
    let (results, effects) = cancel(&mut h, NOW + 1, &[2]);
    assert_eq!(results, vec![(2, Ok(JobStatus::Pending))]);
    assert_eq!(effects, vec![Effect::DropPayload { job: 2 }]);
    assert_eq!(ready(&h), Vec::<JobId>::new());
    let (_, rejected, _) = assign_batch(&mut h, NOW + 1, &[(3, 1, 1)]);
    assert_eq!(rejected, vec![(3, Rejection::OrderingBlocked("k".into()))]);
    let token = h.job(1).attempts[0].token;
    h.complete(NOW + 2, 1, token, succeeded(b""));
    assert_eq!(ready(&h), vec![3]);
}

/// An ordering key is scoped to its queue: the same key in two queues is two lines.
#[test]
fn the_same_ordering_key_in_two_queues_is_two_lines() {
    let mut h = Harness::new();
    h.submit(
        NOW,
        vec![
            ordered("q", Some("k")),
            ordered("r", Some("k")),
            ordered("q", Some("k")),
        ],
    );
    assert_eq!(ready(&h), vec![1, 2]);
}

// ----- queues: concurrency, rate, pause -----

/// A queue's concurrency limit counts its running jobs on every node: apply refuses a start
/// past it (QueueBusy) while other queues go on; a finish frees a place; a lower limit stops
/// new starts without touching running ones.
#[test]
fn the_concurrency_limit_is_cluster_wide_in_apply() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 5);
    h.register(NOW, 2, 1, 5);
    assert_eq!(
        configure(&mut h, NOW, "q", limit(2)),
        Ok(QueueConfig {
            concurrency_max: 2,
            rate: None,
            paused: false
        })
    );
    let mut jobs = vec![new_job("q", "noop", b""); 4];
    jobs.extend(vec![new_job("r", "noop", b""); 2]);
    h.submit(NOW, jobs);
    let busy = || Rejection::QueueBusy {
        queue: "q".into(),
        max: 2,
    };
    let (started, rejected, ids) = assign_batch(
        &mut h,
        NOW,
        &[
            (1, 1, 1),
            (2, 2, 1),
            (3, 1, 1),
            (5, 1, 1),
            (4, 2, 1),
            (6, 2, 1),
        ],
    );
    assert_eq!((started, ids), (4, vec![1, 2, 5, 6]));
    assert_eq!(rejected, vec![(3, busy()), (4, busy())]);
    assert_eq!(h.table.queue("q").unwrap().running(), 2);

    let t1 = h.job(1).attempts[0].token;
    h.complete(NOW, 1, t1, succeeded(b""));
    assert_eq!(
        assign_batch(&mut h, NOW, &[(3, 2, 1), (4, 2, 1)]).1,
        vec![(4, busy())]
    );
    assert_eq!(
        configure(&mut h, NOW, "q", limit(3))
            .unwrap()
            .concurrency_max,
        3
    );
    assert_eq!(assign_batch(&mut h, NOW, &[(4, 2, 1)]).0, 1);
    assert_eq!(h.table.queue("q").unwrap().running(), 3);

    // Lowered below what runs: nothing is stopped, and nothing starts until under the limit.
    configure(&mut h, NOW, "q", limit(1)).unwrap();
    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    let busy1 = || Rejection::QueueBusy {
        queue: "q".into(),
        max: 1,
    };
    for id in [2, 3, 4] {
        assert_eq!(
            assign_batch(&mut h, NOW, &[(7, 1, 1)]).1,
            vec![(7, busy1())]
        );
        let token = h.job(id).attempts[0].token;
        h.complete(NOW, id, token, succeeded(b""));
    }
    assert_eq!(assign_batch(&mut h, NOW, &[(7, 1, 1)]).0, 1);
    // Zero means no limit.
    configure(&mut h, NOW, "q", limit(0)).unwrap();
    h.submit(NOW, vec![new_job("q", "noop", b""); 3]);
    assert_eq!(
        assign_batch(&mut h, NOW, &[(8, 1, 1), (9, 1, 1), (10, 2, 1)]).0,
        3
    );
}

/// A paused queue starts nothing (apply refuses, the planner skips it) while its running
/// attempts finish normally; resuming starts its jobs again.
#[test]
fn a_paused_queue_starts_nothing_and_lets_running_attempts_finish() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(
        NOW,
        vec![
            new_job("q", "noop", b""),
            new_job("q", "noop", b""),
            new_job("r", "noop", b""),
        ],
    );
    let token = h.assign(NOW, 1, 1, 1);
    assert_eq!(
        configure(&mut h, NOW, "q", pause(true)),
        Ok(QueueConfig {
            paused: true,
            ..QueueConfig::default()
        })
    );
    assert_eq!(
        assign_batch(&mut h, NOW, &[(2, 1, 1)]).1,
        vec![(2, Rejection::QueuePaused("q".into()))]
    );
    let none = BTreeSet::new();
    assert_eq!(
        plan_assignments(&h.table, NOW, 10, &none),
        vec![assignment(3, 1, 1)]
    );
    h.complete(NOW, 1, token, succeeded(b""));
    assert_eq!(status(&h, 1), JobStatus::Succeeded);
    assert_eq!(ready(&h), vec![2, 3], "a paused queue's jobs stay ready");
    assert_eq!(
        configure(&mut h, NOW, "q", pause(false)),
        Ok(QueueConfig::default())
    );
    assert_eq!(
        plan_assignments(&h.table, NOW, 10, &none),
        vec![assignment(2, 1, 1), assignment(3, 1, 1)]
    );
    assert_eq!(assign_batch(&mut h, NOW, &[(2, 1, 1)]).0, 1);
}

/// Apply enforces the rate limit with GCRA: a burst of `jobs`, then one start per
/// period/jobs; after an idle period the burst is back, never more. A refusal for another
/// reason consumes nothing; a changed rate starts afresh, the same rate keeps its state.
#[test]
fn the_rate_limit_in_apply_follows_gcra() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 100);
    configure(&mut h, NOW, "q", rate(2, 1_000)).unwrap();
    h.submit(NOW, vec![new_job("q", "noop", b""); 8]);
    h.submit(NOW, vec![job_with(|j| j.run_at_ms = NOW + 1_000_000)]);
    let limited = || Rejection::RateLimited("q".into());
    let t = NOW + 10;
    // A refusal before the rate check (not due) does not use up the allowance.
    assert_eq!(
        assign_batch(&mut h, t, &[(9, 1, 1)]).1,
        vec![(9, Rejection::NotDue(NOW + 1_000_000))]
    );
    assert_eq!(h.table.queue("q").unwrap().allowance(t, 10), 2);
    let (started, rejected, _) = assign_batch(&mut h, t, &[(1, 1, 1), (2, 1, 1), (3, 1, 1)]);
    assert_eq!((started, rejected), (2, vec![(3, limited())]));
    let schedule = [
        (t + 499, false),
        (t + 500, true),
        (t + 999, false),
        (t + 1_000, true),
        (t + 1_000, false),
    ];
    let mut next = 3;
    for (at, starts) in schedule {
        let (started, _, _) = assign_batch(&mut h, at, &[(next, 1, 1)]);
        assert_eq!(started == 1, starts, "at +{}", at - t);
        next += u64::from(started);
    }
    assert_eq!(next, 5);
    // Long idle: the burst is back, and only the burst.
    let later = t + 60_000;
    assert_eq!(h.table.queue("q").unwrap().allowance(later, 10), 2);
    let (started, rejected, _) = assign_batch(&mut h, later, &[(5, 1, 1), (6, 1, 1), (7, 1, 1)]);
    assert_eq!((started, rejected), (2, vec![(7, limited())]));
    // Reconfiguring the same rate (with another setting) keeps the debt...
    configure(
        &mut h,
        later,
        "q",
        QueuePatch {
            concurrency_max: Some(50),
            rate: Some(Some(RateLimit {
                jobs: 2,
                period_ms: 1_000,
            })),
            paused: None,
        },
    )
    .unwrap();
    assert_eq!(h.table.queue("q").unwrap().allowance(later, 10), 0);
    // ...a different rate starts with a full burst; removing it lifts the limit.
    configure(&mut h, later, "q", rate(3, 1_000)).unwrap();
    assert_eq!(h.table.queue("q").unwrap().allowance(later, 10), 3);
    configure(
        &mut h,
        later,
        "q",
        QueuePatch {
            rate: Some(None),
            ..QueuePatch::default()
        },
    )
    .unwrap();
    assert_eq!(h.table.queue("q").unwrap().allowance(later, 10), 10);
}

/// ConfigureQueue merges a patch into the current settings and answers the result; invalid
/// settings or names are refused with a precise reason and change nothing.
#[test]
fn configure_queue_merges_patches_and_validates() {
    let mut h = Harness::new();
    let three = RateLimit {
        jobs: 3,
        period_ms: 1_000,
    };
    let ok_steps: Vec<(QueuePatch, QueueConfig)> = vec![
        (
            limit(5),
            QueueConfig {
                concurrency_max: 5,
                rate: None,
                paused: false,
            },
        ),
        (
            rate(3, 1_000),
            QueueConfig {
                concurrency_max: 5,
                rate: Some(three),
                paused: false,
            },
        ),
        (
            pause(true),
            QueueConfig {
                concurrency_max: 5,
                rate: Some(three),
                paused: true,
            },
        ),
        (
            QueuePatch::default(),
            QueueConfig {
                concurrency_max: 5,
                rate: Some(three),
                paused: true,
            },
        ),
        (
            QueuePatch {
                rate: Some(None),
                ..QueuePatch::default()
            },
            QueueConfig {
                concurrency_max: 5,
                rate: None,
                paused: true,
            },
        ),
    ];
    for (patch, expected) in ok_steps {
        assert_eq!(
            configure(&mut h, NOW, "q", patch.clone()),
            Ok(expected.clone())
        );
        assert_eq!(
            h.table.queue("q").map(|q| &q.config),
            Some(&expected),
            "{patch:?}"
        );
    }
    let too_long = "n".repeat(QUEUE_NAME_BYTES_MAX + 1);
    let refused: Vec<(&str, QueuePatch, String)> = vec![
        (
            "q",
            rate(0, 1_000),
            format!("rate limit jobs must be 1..={RATE_JOBS_MAX}, got 0"),
        ),
        (
            "q",
            rate(RATE_JOBS_MAX + 1, 1_000),
            format!(
                "rate limit jobs must be 1..={RATE_JOBS_MAX}, got {}",
                RATE_JOBS_MAX + 1
            ),
        ),
        (
            "q",
            rate(1, 0),
            format!("rate limit period must be 1..={RATE_PERIOD_MS_MAX} ms, got 0"),
        ),
        (
            "q",
            rate(1, RATE_PERIOD_MS_MAX + 1),
            format!(
                "rate limit period must be 1..={RATE_PERIOD_MS_MAX} ms, got {}",
                RATE_PERIOD_MS_MAX + 1
            ),
        ),
        (
            "",
            limit(1),
            format!("queue name must be 1..={QUEUE_NAME_BYTES_MAX} bytes, got 0"),
        ),
        (
            &too_long,
            limit(1),
            format!(
                "queue name must be 1..={QUEUE_NAME_BYTES_MAX} bytes, got {}",
                QUEUE_NAME_BYTES_MAX + 1
            ),
        ),
    ];
    for (queue, patch, message) in refused {
        let before = h.table.clone();
        assert_eq!(
            configure(&mut h, NOW, queue, patch),
            Err(Rejection::Invalid(message))
        );
        assert!(h.table == before);
    }
    let longest = "n".repeat(QUEUE_NAME_BYTES_MAX);
    assert!(configure(&mut h, NOW, &longest, limit(1)).is_ok());
    assert_eq!(
        configure(&mut h, NOW, "q", rate(RATE_JOBS_MAX, RATE_PERIOD_MS_MAX))
            .unwrap()
            .rate,
        Some(RateLimit {
            jobs: RATE_JOBS_MAX,
            period_ms: RATE_PERIOD_MS_MAX
        })
    );
}

/// A queue's state lives while it has live jobs or non-default settings, and is dropped as
/// soon as it has neither (a dead letter is not live; a redrive brings the queue back).
#[test]
fn idle_queues_are_forgotten() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    let names = |h: &Harness| h.table.queues().keys().cloned().collect::<Vec<_>>();

    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    assert_eq!(
        h.table
            .queue("q")
            .map(|q| (q.live(), h.table.ready_entries("q").count())),
        Some((1, 1))
    );
    finish(&mut h, NOW, 1);
    assert_eq!(names(&h), Vec::<String>::new());

    configure(&mut h, NOW, "r", pause(true)).unwrap();
    assert_eq!(names(&h), vec!["r"]);
    configure(&mut h, NOW, "r", pause(false)).unwrap();
    assert_eq!(names(&h), Vec::<String>::new());

    assert_eq!(
        configure(&mut h, NOW, "unused", QueuePatch::default()),
        Ok(QueueConfig::default())
    );
    assert_eq!(names(&h), Vec::<String>::new());

    configure(&mut h, NOW, "s", limit(2)).unwrap();
    h.submit(NOW, vec![new_job("s", "noop", b"")]);
    configure(&mut h, NOW, "s", limit(0)).unwrap();
    assert_eq!(names(&h), vec!["s"], "kept while its job is live");
    cancel(&mut h, NOW, &[2]);
    assert_eq!(names(&h), Vec::<String>::new());

    h.submit(NOW, vec![new_job("d", "noop", b"")]);
    kill(&mut h, NOW, 3);
    assert_eq!(
        names(&h),
        Vec::<String>::new(),
        "a dead letter keeps no queue"
    );
    redrive(&mut h, NOW, dead_filter(&[3], None, None, 1));
    assert_eq!(h.table.queue("d").map(|q| q.live()), Some(1));
}

/// At most QUEUES_MAX queues exist at once: a submit that needs one more is refused whole
/// (counting the batch's own new queues once each), so is configuring a new queue and a
/// redrive into a forgotten queue (skipped, the job stays dead); room made by an idle queue is
/// usable again.
#[test]
fn queues_max_bounds_the_queue_table() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(NOW, vec![new_job("old", "noop", b"")]);
    kill(&mut h, NOW, 1);
    let mut next_id = 2;
    for chunk in 0..QUEUES_MAX / SUBMIT_BATCH_JOBS_MAX {
        let jobs: Vec<NewJob> = (0..SUBMIT_BATCH_JOBS_MAX)
            .map(|i| {
                new_job(
                    &format!("q{}", chunk * SUBMIT_BATCH_JOBS_MAX + i),
                    "noop",
                    b"",
                )
            })
            .collect();
        next_id += h.submit(NOW, jobs).len() as JobId;
    }
    assert_eq!(h.table.queues().len(), QUEUES_MAX);
    let full = || Err(Rejection::TooManyQueues(QUEUES_MAX));

    let before = h.table.clone();
    let (results, _) = submit_results(
        &mut h,
        NOW,
        vec![new_job("q0", "noop", b""), new_job("new", "noop", b"")],
    );
    assert_eq!(results, vec![Err(Rejection::BatchRejected), full()]);
    assert!(h.table == before);
    assert_eq!(
        h.submit(NOW, vec![new_job("q5", "noop", b"")]),
        vec![next_id]
    );
    next_id += 1;
    assert_eq!(
        configure(&mut h, NOW, "new", limit(1)),
        Err(Rejection::TooManyQueues(QUEUES_MAX))
    );
    assert!(configure(&mut h, NOW, "q1", limit(3)).is_ok());
    assert_eq!(redrive(&mut h, NOW, all_dead(10)).0, vec![]);
    assert_eq!(status(&h, 1), JobStatus::Dead);

    // Job 2 is queue q0's only job: cancelling it frees one place.
    cancel(&mut h, NOW, &[2]);
    assert_eq!(h.table.queues().len(), QUEUES_MAX - 1);
    let (results, _) = submit_results(
        &mut h,
        NOW,
        vec![new_job("x", "noop", b""), new_job("y", "noop", b"")],
    );
    assert_eq!(results, vec![Err(Rejection::BatchRejected), full()]);
    let (results, _) = submit_results(
        &mut h,
        NOW,
        vec![new_job("x", "noop", b""), new_job("x", "noop", b"")],
    );
    assert_eq!(results, vec![created(next_id), created(next_id + 1)]);
    assert_eq!(h.table.queues().len(), QUEUES_MAX);
    // Job 4 is queue q2's only job (q1 has settings, so it stays).
    cancel(&mut h, NOW, &[4]);
    assert_eq!(redrive(&mut h, NOW, all_dead(10)).0, vec![1]);
    assert_eq!(h.table.queues().len(), QUEUES_MAX);
}

// ----- retention -----

/// A fixture for retention on node 1, all submitted at NOW: 1 (key k1) succeeds at NOW+10,
/// 2 (k2) is cancelled at NOW+20, 3 (k3) dies at NOW+30, 4 succeeds at NOW+40, 5 (k5) stays
/// pending, 6 (k6) runs, 7 dies at NOW+50.
fn retention_fixture() -> Harness {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    let keys = [
        Some("k1"),
        Some("k2"),
        Some("k3"),
        None,
        Some("k5"),
        Some("k6"),
        None,
    ];
    h.submit(
        NOW,
        keys.iter()
            .map(|k| {
                let mut j = new_job("q", "noop", b"");
                j.idempotency_key = k.map(str::to_string);
                j
            })
            .collect(),
    );
    finish(&mut h, NOW + 10, 1);
    cancel(&mut h, NOW + 20, &[2]);
    kill(&mut h, NOW + 30, 3);
    finish(&mut h, NOW + 40, 4);
    h.assign(NOW + 45, 6, 1, 1);
    kill(&mut h, NOW + 50, 7);
    h.events.clear();
    h
}

/// Each queue's retained finished jobs and dead letters are counted, so a queue whose jobs all
/// finished is still listed; redrive, purge and retention take them out of the count.
#[test]
fn retained_jobs_are_counted_per_queue() {
    let counts =
        |h: &Harness, queue: &str| h.table.retained().get(queue).map(|r| (r.finished, r.dead));
    let mut h = retention_fixture();
    assert_eq!(counts(&h, "q"), Some((3, 2)));

    // A queue whose only job finished has no scheduling state but is still counted.
    h.submit(NOW + 60, vec![new_job("done", "noop", b"")]);
    finish(&mut h, NOW + 61, 8);
    assert!(h.table.queue("done").is_none());
    assert_eq!(counts(&h, "done"), Some((1, 0)));

    assert_eq!(
        redrive(&mut h, NOW + 62, dead_filter(&[3], None, None, 10)).0,
        [3]
    );
    assert_eq!(counts(&h, "q"), Some((3, 1)));
    assert_eq!(
        purge(&mut h, NOW + 63, dead_filter(&[7], None, None, 10)).0,
        [7]
    );
    assert_eq!(counts(&h, "q"), Some((3, 0)));

    retain(
        &mut h,
        NOW + 100,
        Retention {
            finished_before_ms: u64::MAX,
            dead_before_ms: u64::MAX,
            keys_before_ms: 0,
            max: 100,
        },
    );
    assert_eq!(counts(&h, "q"), None);
    assert_eq!(counts(&h, "done"), None);
    assert!(h.table.retained().is_empty());
}

/// Retention deletes succeeded and cancelled jobs that finished strictly before their cut-off,
/// dead letters that died before theirs (dropping their kept payloads), and forgets keys
/// created before theirs unless the key's job is still live; nothing else changes.
#[test]
fn retention_deletes_what_ended_before_its_cut_offs() {
    let r = |finished, dead, keys| Retention {
        finished_before_ms: finished,
        dead_before_ms: dead,
        keys_before_ms: keys,
        max: 100,
    };
    type Case = (
        &'static str,
        Retention,
        Vec<JobId>,
        Vec<JobId>,
        Vec<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            "cut-offs are strict",
            r(NOW + 10, NOW + 30, NOW),
            vec![],
            vec![],
            vec![],
        ),
        ("first finished", r(NOW + 11, 0, 0), vec![1], vec![], vec![]),
        (
            "all finished",
            r(NOW + 41, 0, 0),
            vec![1, 2, 4],
            vec![],
            vec![],
        ),
        ("first dead", r(0, NOW + 31, 0), vec![3], vec![3], vec![]),
        (
            "all dead",
            r(0, NOW + 51, 0),
            vec![3, 7],
            vec![3, 7],
            vec![],
        ),
        (
            "keys",
            r(0, 0, NOW + 1),
            vec![],
            vec![],
            vec!["k1", "k2", "k3"],
        ),
        (
            "everything",
            r(u64::MAX, u64::MAX, u64::MAX),
            vec![1, 2, 4, 3, 7],
            vec![3, 7],
            vec!["k1", "k2", "k3"],
        ),
    ];
    let fixture = retention_fixture();
    for (name, retention, deleted, dropped, forgotten) in cases {
        let mut h = fixture.clone();
        let (response, effects) = retain(&mut h, NOW + 100, retention);
        assert_eq!(
            response,
            (deleted.len() as u32, forgotten.len() as u32),
            "{name}"
        );
        let drops: Vec<Effect> = dropped
            .iter()
            .map(|&job| Effect::DropPayload { job })
            .collect();
        assert_eq!(effects, drops, "{name}");
        for id in 1..=7 {
            if deleted.contains(&id) {
                assert_eq!(h.table.job(id), None, "{name}: job {id}");
            } else {
                assert_eq!(h.job(id), fixture.job(id), "{name}: job {id}");
            }
        }
        for key in ["k1", "k2", "k3", "k5", "k6"] {
            assert_eq!(
                h.table.idempotency_key(key).is_none(),
                forgotten.contains(&key),
                "{name}: key {key}"
            );
        }
        assert!(h.events.is_empty(), "{name}");
        let gone = |s: JobStatus| {
            deleted
                .iter()
                .filter(|&&id| fixture.job(id).status == s)
                .count() as u64
        };
        assert_eq!(
            h.table.counts(),
            &counts(
                1,
                1,
                2 - gone(JobStatus::Succeeded),
                2 - gone(JobStatus::Dead),
                1 - gone(JobStatus::Cancelled)
            ),
            "{name}"
        );
    }

    // A deleted job is unknown to every command.
    let mut h = fixture.clone();
    retain(&mut h, NOW + 100, r(u64::MAX, u64::MAX, 0));
    let (results, _) = cancel(&mut h, NOW + 100, &[1, 3]);
    assert_eq!(
        results,
        vec![
            (1, Err(Rejection::UnknownJob(1))),
            (3, Err(Rejection::UnknownJob(3)))
        ]
    );
    assert_eq!(
        redrive(&mut h, NOW + 100, dead_filter(&[3], None, None, 1)).0,
        vec![]
    );
}

/// One retention entry deletes at most `max` jobs (finished first, then dead letters, oldest
/// first) and forgets at most `max` keys; `max` is capped at RETAIN_BATCH_MAX and 0 counts
/// as 1; later passes take the rest.
#[test]
fn retention_is_bounded_per_entry() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(
        NOW,
        (1..=8)
            .map(|i| {
                let mut j = new_job("q", "noop", b"");
                j.idempotency_key = Some(format!("key-{i}"));
                j
            })
            .collect(),
    );
    for id in 1..=5 {
        finish(&mut h, NOW + id, id);
    }
    for id in 6..=8 {
        kill(&mut h, NOW + id, id);
    }
    let all = |max| Retention {
        finished_before_ms: u64::MAX,
        dead_before_ms: u64::MAX,
        keys_before_ms: u64::MAX,
        max,
    };
    let alive = |h: &Harness| h.all_jobs().iter().map(|j| j.id).collect::<Vec<_>>();
    let ((jobs, keys), effects) = retain(&mut h, NOW + 100, all(4));
    assert_eq!((jobs, keys), (4, 4));
    assert_eq!(effects, vec![]);
    assert_eq!(alive(&h), vec![5, 6, 7, 8]);
    assert_eq!(h.table.idempotency_key("key-4"), None);
    assert!(h.table.idempotency_key("key-5").is_some());
    let ((jobs, keys), effects) = retain(&mut h, NOW + 100, all(4));
    assert_eq!((jobs, keys), (4, 4));
    assert_eq!(
        effects,
        (6..=8)
            .map(|job| Effect::DropPayload { job })
            .collect::<Vec<_>>()
    );
    assert_eq!(alive(&h), Vec::<JobId>::new());
    assert_eq!(retain(&mut h, NOW + 100, all(4)).0, (0, 0));

    // The cap, and zero.
    let mut h = Harness::new();
    let n = RETAIN_BATCH_MAX + 2;
    h.submit(NOW, vec![new_job("q", "noop", b""); SUBMIT_BATCH_JOBS_MAX]);
    h.submit(
        NOW,
        vec![new_job("q", "noop", b""); n - SUBMIT_BATCH_JOBS_MAX],
    );
    let ids: Vec<JobId> = (1..=n as JobId).collect();
    for chunk in ids.chunks(CANCEL_BATCH_MAX) {
        cancel(&mut h, NOW, chunk);
    }
    assert_eq!(
        retain(&mut h, NOW, all(u32::MAX)).0,
        (RETAIN_BATCH_MAX as u32, 0)
    );
    assert_eq!(retain(&mut h, NOW, all(0)).0, (1, 0));
    assert_eq!(retain(&mut h, NOW, all(0)).0, (1, 0));
    assert_eq!(h.all_jobs().len(), 0);
    assert!(h.archive.is_empty(), "every archived record was dropped");
}

/// Keys of live jobs are kept past their cut-off (a client retrying a long-pending job's
/// submit still finds it); the pass looks at no more than `max` of them, so such keys at the
/// front can hold back older-than-cut-off keys behind them until their jobs end.
#[test]
fn keys_of_live_jobs_are_kept_and_bound_the_scan() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(NOW, vec![keyed("a", b"")]);
    h.submit(NOW + 1, vec![keyed("b", b"")]);
    h.submit(NOW + 2, vec![keyed("c", b"")]);
    h.assign(NOW + 3, 2, 1, 1);
    finish(&mut h, NOW + 3, 3);
    let keys = |max| Retention {
        keys_before_ms: u64::MAX,
        max,
        ..Retention::default()
    };
    assert_eq!(
        retain(&mut h, NOW + 10, keys(2)).0,
        (0, 0),
        "two live keys looked at"
    );
    assert!(h.table.idempotency_key("c").is_some());
    assert_eq!(retain(&mut h, NOW + 10, keys(3)).0, (0, 1));
    assert_eq!(h.table.idempotency_key("c"), None);
    let (results, _) = submit_results(&mut h, NOW + 20, vec![keyed("a", b""), keyed("b", b"")]);
    assert_eq!(results, vec![existing(1), existing(2)]);
    // Once its job ends, a live key goes on the next pass.
    cancel(&mut h, NOW + 30, &[1]);
    assert_eq!(retain(&mut h, NOW + 40, keys(3)).0, (0, 1));
    assert_eq!(h.table.idempotency_key("a"), None);
    assert!(h.table.idempotency_key("b").is_some());
}

// ----- Watch events -----

/// Every state change emits one event with the job's queue, new status, the latest attempt's
/// number, token and node, and the entry's time; repeats, refusals, configuration, purges
/// and retention emit none.
#[test]
fn every_transition_emits_one_event() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.register(NOW, 2, 1, 10);
    h.submit(NOW, vec![new_job("mail", "noop", b"")]);
    let t1 = h.assign(NOW + 1, 1, 1, 1);
    h.complete(NOW + 2, 1, t1, failed("flaky", true));
    let due = h.job(1).run_at_ms;
    let t2 = h.assign(due, 1, 2, 1);
    h.register(due + 1, 2, 2, 10);
    let t3 = h.assign(due + 2, 1, 1, 1);
    let expiry = h.expiry(exactly_core::NodeLease {
        node: 1,
        incarnation: 1,
    });
    h.apply(due + 3, expiry);
    let t4 = h.assign(due + 4, 1, 2, 2);
    h.complete(due + 5, 1, t4, succeeded(b""));
    let q = "mail";
    assert_eq!(
        h.events,
        vec![
            event(1, q, JobStatus::Pending, 0, 0, None, NOW),
            event(1, q, JobStatus::Running, 1, t1, Some(1), NOW + 1),
            event(1, q, JobStatus::Pending, 1, t1, Some(1), NOW + 2),
            event(1, q, JobStatus::Running, 2, t2, Some(2), due),
            event(1, q, JobStatus::Pending, 2, t2, Some(2), due + 1),
            event(1, q, JobStatus::Running, 3, t3, Some(1), due + 2),
            event(1, q, JobStatus::Pending, 3, t3, Some(1), due + 3),
            event(1, q, JobStatus::Running, 4, t4, Some(2), due + 4),
            event(1, q, JobStatus::Succeeded, 4, t4, Some(2), due + 5),
        ]
    );

    // Dead, redriven, cancelled while pending; and cancelled while running.
    let at = due + 10;
    h.events.clear();
    h.submit(
        at,
        vec![job_with(|j| j.max_attempts = 1), new_job("q", "noop", b"")],
    );
    let t5 = h.assign(at, 2, 2, 2);
    h.complete(at, 2, t5, failed("no", true));
    redrive(&mut h, at + 1, dead_filter(&[2], None, None, 1));
    cancel(&mut h, at + 2, &[2]);
    let t6 = h.assign(at + 3, 3, 2, 2);
    cancel(&mut h, at + 4, &[3]);
    assert_eq!(
        h.events,
        vec![
            event(2, "q", JobStatus::Pending, 0, 0, None, at),
            event(3, "q", JobStatus::Pending, 0, 0, None, at),
            event(2, "q", JobStatus::Running, 1, t5, Some(2), at),
            event(2, "q", JobStatus::Dead, 1, t5, Some(2), at),
            event(2, "q", JobStatus::Pending, 1, t5, Some(2), at + 1),
            event(2, "q", JobStatus::Cancelled, 1, t5, Some(2), at + 2),
            event(3, "q", JobStatus::Running, 1, t6, Some(2), at + 3),
            event(3, "q", JobStatus::Cancelled, 1, t6, Some(2), at + 4),
        ]
    );

    // Nothing that leaves every job's status as it was emits an event.
    h.events.clear();
    let later = at + 100;
    h.submit(later, vec![keyed("k", b"")]);
    h.events.clear();
    h.apply(later, Command::Submit(vec![keyed("k", b"")]));
    h.apply(later, Command::Submit(vec![keyed("k", b"other")]));
    h.apply(later, Command::Assign(vec![assignment(99, 1, 1)]));
    h.apply(
        later,
        Command::Complete(vec![completion(1, t1, succeeded(b""))]),
    );
    h.apply(later, Command::Cancel(vec![1, 99]));
    configure(&mut h, later, "q", limit(3)).unwrap();
    h.submit(later, vec![job_with(|j| j.max_attempts = 1)]);
    let t7 = h.assign(later, 5, 2, 2);
    h.complete(later, 5, t7, failed("no", false));
    h.events.clear();
    purge(&mut h, later, all_dead(10));
    retain(
        &mut h,
        later,
        Retention {
            finished_before_ms: u64::MAX,
            dead_before_ms: u64::MAX,
            keys_before_ms: u64::MAX,
            max: 100,
        },
    );
    assert_eq!(h.events, vec![]);
}

/// An entry's events come with its other effects, after the effect of the same change that the
/// shell must carry out first (payload stored, attempt stopped), and before a Start.
#[test]
fn events_are_ordered_with_the_effects_of_their_entry() {
    let mut table = JobTable::new();
    let apply = |table: &mut JobTable, index: u64, command: Command| {
        let (_, effects) = table.apply(index, Request::at(NOW, command));
        effects
    };
    apply(&mut table, 1, registration(1, 1, 1));
    let ev = |status, attempt, token, node| {
        Effect::Event(event(1, "q", status, attempt, token, node, NOW))
    };
    assert_eq!(
        apply(
            &mut table,
            2,
            Command::Submit(vec![new_job("q", "noop", b"p")])
        ),
        vec![
            Effect::StorePayload {
                job: 1,
                payload: b"p".to_vec()
            },
            ev(JobStatus::Pending, 0, 0, None),
        ]
    );
    let effects = apply(&mut table, 3, Command::Assign(vec![assignment(1, 1, 1)]));
    assert_eq!(effects.len(), 2);
    assert_eq!(effects[0], ev(JobStatus::Running, 1, 3, Some(1)));
    assert!(matches!(&effects[1], Effect::Start(s) if s.job == 1 && s.token == 3));
    let effects = apply(&mut table, 4, Command::Cancel(vec![1]));
    assert_eq!(
        effects[..3],
        [
            Effect::Cancel {
                job: 1,
                token: 3,
                node: 1
            },
            Effect::DropPayload { job: 1 },
            ev(JobStatus::Cancelled, 1, 3, Some(1)),
        ]
    );
    // The finished record goes to the shell's archive last, in its final state.
    assert_eq!(effects.len(), 4);
    assert!(
        matches!(&effects[3], Effect::Archive(job) if job.id == 1 && job.status == JobStatus::Cancelled)
    );
}

// ----- queue limits and ordering keys together -----

/// An ordering key and a queue's concurrency limit and pause compose: the line's next job
/// starts only when both its line and its queue allow it.
#[test]
fn ordering_keys_compose_with_queue_limits() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    configure(&mut h, NOW, "q", limit(1)).unwrap();
    h.submit(
        NOW,
        vec![
            ordered("q", None),
            ordered("q", Some("k")),
            ordered("q", Some("k")),
        ],
    );
    let t1 = h.assign(NOW, 1, 1, 1);
    assert_eq!(
        assign_batch(&mut h, NOW, &[(2, 1, 1), (3, 1, 1)]).1,
        vec![
            (
                2,
                Rejection::QueueBusy {
                    queue: "q".into(),
                    max: 1
                }
            ),
            (3, Rejection::OrderingBlocked("k".into())),
        ]
    );
    configure(&mut h, NOW, "q", pause(true)).unwrap();
    h.complete(NOW, 1, t1, succeeded(b""));
    let none = BTreeSet::new();
    assert_eq!(plan_assignments(&h.table, NOW, 10, &none), vec![]);
    configure(&mut h, NOW, "q", pause(false)).unwrap();
    assert_eq!(
        plan_assignments(&h.table, NOW, 10, &none),
        vec![assignment(2, 1, 1)]
    );
    let t2 = h.assign(NOW, 2, 1, 1);
    h.complete(NOW, 2, t2, succeeded(b""));
    assert_eq!(
        plan_assignments(&h.table, NOW, 10, &none),
        vec![assignment(3, 1, 1)]
    );
}

/// Whatever the numbers, a rate limit taken greedily at every step never starts more than its
/// burst plus `jobs` per `period` of elapsed time (to the microsecond): rounding the interval
/// between starts must err below the configured rate, never above it.
#[test]
fn a_rate_limit_never_exceeds_its_rate_over_time() {
    // (jobs, period_ms, step_ms, steps)
    let cases = [
        (3, 1_000, 1, 100_000),
        (2, 1_000, 7, 10_000),
        (5, 3, 1, 3_000),
        (3, 2, 1, 3_000),
        (7, 1, 1, 2_000),
        (600, 1, 1, 100),
        (1_500, 1_000, 1, 20_000),
        (999_999, 1_000, 1, 20),
        (1, RATE_PERIOD_MS_MAX, 3_600_000, 24 * 7),
        (RATE_JOBS_MAX, RATE_PERIOD_MS_MAX, 1_000, 200),
    ];
    for (jobs, period_ms, step_ms, steps) in cases {
        let limit = RateLimit { jobs, period_ms };
        limit.validate().expect("a valid limit");
        let mut tat = 0;
        let mut started: u64 = 0;
        for step in 0..=steps {
            let now = NOW + step * step_ms;
            let allowed = limit.allowance(tat, now);
            for _ in 0..allowed {
                tat = limit.take(tat, now).expect("the allowance can be taken");
                started += 1;
            }
            assert_eq!(limit.take(tat, now), None, "{limit:?}: past the allowance");
            let elapsed_us = u128::from(step * step_ms) * 1_000;
            let bound =
                u128::from(jobs) + elapsed_us * u128::from(jobs) / (u128::from(period_ms) * 1_000);
            assert!(
                u128::from(started) <= bound,
                "{limit:?}: {started} starts after {} ms, more than {bound}",
                step * step_ms
            );
            if step == 0 {
                assert_eq!(started, u64::from(jobs), "{limit:?}: the burst");
            }
        }
    }
}

// ----- snapshots -----

/// A table holding every kind of issue-4 state (queue settings with a used rate limit,
/// ordering lines, idempotency records, dead letters, finished, delayed and running jobs)
/// survives the postcard encoding snapshots use, and the copy goes on exactly like the original.
#[test]
fn issue_4_state_survives_a_snapshot_round_trip() {
    let mut h = retention_fixture();
    configure(&mut h, NOW + 60, "q", rate(2, 1_000)).unwrap();
    configure(&mut h, NOW + 60, "idle", pause(true)).unwrap();
    h.submit(
        NOW + 60,
        vec![
            ordered("q", Some("k")),
            ordered("q", Some("k")),
            job_with(|j| j.run_at_ms = NOW + 5_000),
        ],
    );
    h.assign(NOW + 61, 8, 1, 1);
    let bytes = postcard::to_allocvec(&h.table).expect("encode");
    let mut copy: JobTable = postcard::from_bytes(&bytes).expect("decode");
    // The finished jobs travel next to the table (a snapshot carries them with their archived
    // records), and what is derived and not encoded (per-queue retained counts) comes back by a
    // rebuild.
    assert!(
        copy.check_invariants().is_err(),
        "the fixture has finished jobs, so a copy without them must fail its invariants"
    );
    for (id, f) in h.table.finished_jobs() {
        copy.restore_finished(id, f.finished_at_ms, f.status, &f.queue, f.cancelled_token)
            .expect("restored");
    }
    assert!(
        copy.check_invariants().is_err(),
        "an unrebuilt copy must fail its invariants"
    );
    copy.rebuild_derived();
    copy.check_invariants().expect("the rebuilt copy holds");
    assert!(copy == h.table, "the decoded table differs");

    let mut twin = h.clone();
    twin.table = copy;
    let none = BTreeSet::new();
    for at in [NOW + 62, NOW + 600, NOW + 5_000] {
        for harness in [&mut h, &mut twin] {
            let plan = plan_assignments(&harness.table, at, 10, &none);
            harness.apply(at, Command::Assign(plan));
            let running: Vec<JobId> = harness.table.jobs_running_on(1).map(|j| j.id).collect();
            succeed_first(harness, at, &running);
            harness.apply(at, Command::Redrive(all_dead(1)));
        }
        assert!(h.table == twin.table, "diverged at {at}");
    }
    assert_eq!(h.events, twin.events);
}

/// Completes the first of `ids` successfully (if any).
fn succeed_first(h: &mut Harness, now: u64, ids: &[JobId]) {
    if let Some(&id) = ids.first() {
        let token = h.job(id).attempts.last().unwrap().token;
        h.complete(now, id, token, succeeded(b""));
    }
}

/// The table's persistent maps and sets (`imbl`) encode exactly as the `BTreeMap`s and
/// `BTreeSet`s they replaced, so snapshots written before decode after, and the other way.
#[test]
fn persistent_maps_encode_as_the_std_ones() {
    let std_map: std::collections::BTreeMap<u64, String> =
        (0..300).map(|i| (i * 7, format!("job {i}"))).collect();
    let im_map: imbl::OrdMap<u64, String> = std_map.clone().into_iter().collect();
    let std_set: BTreeSet<(u64, String)> = std_map.iter().map(|(k, v)| (*k, v.clone())).collect();
    let im_set: imbl::OrdSet<(u64, String)> = std_set.clone().into_iter().collect();
    let bytes = postcard::to_allocvec(&std_map).unwrap();
    assert_eq!(postcard::to_allocvec(&im_map).unwrap(), bytes);
    assert_eq!(
        postcard::from_bytes::<imbl::OrdMap<u64, String>>(&bytes).unwrap(),
        im_map
    );
    let bytes = postcard::to_allocvec(&std_set).unwrap();
    assert_eq!(postcard::to_allocvec(&im_set).unwrap(), bytes);
    // The job records (shared records in a persistent map) encode as a `BTreeMap` of records.
    let table = retention_fixture().table;
    let std_jobs: std::collections::BTreeMap<JobId, exactly_core::Job> =
        table.jobs().map(|j| (j.id, j.clone())).collect();
    let jobs_bytes = postcard::to_allocvec(&std_jobs).unwrap();
    let table_bytes = postcard::to_allocvec(&table).unwrap();
    assert!(
        table_bytes
            .windows(jobs_bytes.len())
            .any(|w| w == jobs_bytes.as_slice()),
        "the table's encoding holds its records as a BTreeMap encodes them"
    );
    assert_eq!(
        postcard::from_bytes::<imbl::OrdSet<(u64, String)>>(&bytes).unwrap(),
        im_set
    );
}

// ----- finished records leave the table -----

/// A job that succeeds or is cancelled leaves the table for the shell's archive, in its final
/// state and once; what the table keeps of it answers as the record did: a cancel is refused as
/// finished, an assign as not pending, the late report of the cancelled attempt as finished and
/// any other report as stale; retention drops the archived record; a dead letter stays in the
/// table.
#[test]
fn finished_records_leave_the_table_and_answer_as_before() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(NOW, vec![new_job("q", "noop", b"1"); 2]);
    h.submit(NOW, vec![job_with(|j| j.max_attempts = 1)]);
    let done = finish(&mut h, NOW + 1, 1);
    let cancelled_token = h.assign(NOW + 2, 2, 1, 1);
    let (results, _) = cancel(&mut h, NOW + 3, &[2]);
    assert_eq!(results, vec![(2, Ok(JobStatus::Running))]);
    kill(&mut h, NOW + 4, 3);

    // The table keeps the dead letter's record and only what it needs of the other two.
    assert!(h.table.job(1).is_none() && h.table.job(2).is_none());
    assert_eq!(h.table.job(3).map(|j| j.status), Some(JobStatus::Dead));
    let kept: Vec<(JobId, JobStatus, u64)> = h
        .table
        .finished_jobs()
        .map(|(id, f)| (id, f.status, f.cancelled_token))
        .collect();
    assert_eq!(
        kept,
        vec![
            (1, JobStatus::Succeeded, 0),
            (2, JobStatus::Cancelled, cancelled_token)
        ]
    );
    // Listing merges the table's records and the finished jobs by id, both ways.
    let ids = |it: &mut dyn Iterator<Item = exactly_core::Listed>| {
        it.map(|l| (l.id(), matches!(l, exactly_core::Listed::Archived(..))))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&mut h.table.all_jobs_after(0)),
        vec![(1, true), (2, true), (3, false)]
    );
    assert_eq!(
        ids(&mut h.table.all_jobs_after(1)),
        vec![(2, true), (3, false)]
    );
    assert_eq!(
        ids(&mut h.table.all_jobs_newest()),
        vec![(3, false), (2, true), (1, true)]
    );
    assert_eq!(h.archive[&1].result.as_deref(), Some(&b"ok"[..]));
    assert_eq!(h.archive[&2].status, JobStatus::Cancelled);
    assert_eq!(h.table.counts().succeeded, 1);
    assert_eq!(h.table.retained()["q"].finished, 2);

    let (results, _) = cancel(&mut h, NOW + 5, &[1, 2]);
    assert_eq!(
        results,
        vec![
            (1, Err(Rejection::Finished("succeeded".into()))),
            (2, Err(Rejection::Finished("cancelled".into())))
        ]
    );
    let (_, rejected, _) = assign_batch(&mut h, NOW + 5, &[(1, 1, 1)]);
    assert_eq!(
        rejected,
        vec![(1, Rejection::NotPending("succeeded".into()))]
    );
    let stale_before = h.table.counts().stale_completions;
    let (response, _) = h.apply(
        NOW + 6,
        Command::Complete(vec![
            completion(2, cancelled_token, succeeded(b"late")),
            completion(1, done, succeeded(b"again")),
        ]),
    );
    assert_eq!(
        response,
        Response::Completed {
            accepted: 0,
            rejected: vec![
                (2, Rejection::Finished("cancelled".into())),
                (
                    1,
                    Rejection::StaleAttempt {
                        got: done,
                        current: None
                    }
                )
            ]
        }
    );
    assert_eq!(h.table.counts().stale_completions, stale_before + 1);

    let everything = Retention {
        finished_before_ms: u64::MAX,
        dead_before_ms: 0,
        keys_before_ms: 0,
        max: 10,
    };
    let (response, effects) = h.table.clone().apply(
        100,
        Request::at(NOW + 7, Command::Retain(everything.clone())),
    );
    assert_eq!(response, Response::Retained { jobs: 2, keys: 0 });
    assert_eq!(
        effects,
        vec![Effect::Unarchive { job: 1 }, Effect::Unarchive { job: 2 }]
    );
    assert_eq!(retain(&mut h, NOW + 7, everything).0, (2, 0));
    assert!(h.archive.is_empty() && h.table.finished_jobs().next().is_none());
    assert_eq!(
        h.table.retained()["q"],
        exactly_core::Retained {
            finished: 0,
            dead: 1
        }
    );
}
