//! Table-driven tests of `JobTable::apply`: each feeds commands at known log indexes and asserts
//! the exact resulting state, response and effects.

mod common;

use common::{
    assignment, completion, failed, job_with, new_job, registration, renew, succeeded, Harness,
    View, NOW,
};
use exactly_core::limits::{
    ABANDONS_RERUN_AT_ONCE, ABANDON_DELAY_MAX_MS, ASSIGN_BATCH_MAX, COMPLETE_BATCH_MAX,
    ERROR_BYTES_MAX, KIND_NAME_BYTES_MAX, MAX_ATTEMPTS_MAX, NODE_SLOTS_MAX, PAYLOAD_BYTES_CEILING,
    QUEUE_NAME_BYTES_MAX, RESULT_BYTES_MAX, RETRY_BACKOFF_BASE_MS, RETRY_BACKOFF_MAX_MS,
    RUN_AT_AHEAD_MS_MAX, SUBMIT_BATCH_JOBS_MAX, TIMEOUT_MS_MAX,
};
use exactly_core::state::{backoff_ceiling_ms, retry_delay_ms};
use std::collections::BTreeMap;

use exactly_core::{
    Attempt, AttemptEnd, Backoff, Command, Effect, Job, JobStatus, JobTable, NewJob, NodeEntry,
    Outcome, Rejection, Request, Response, StartAttempt, StateCounts, Submitted,
};

fn counts(pending: u64, running: u64, succeeded: u64, dead: u64, stale: u64) -> StateCounts {
    StateCounts {
        pending,
        running,
        succeeded,
        dead,
        cancelled: 0,
        stale_completions: stale,
    }
}

// ----- submit -----

/// Submits get ids from 1 in order, a StorePayload effect each, exact records and counts.
#[test]
fn submit_assigns_sequential_ids_and_stores_payloads() {
    let mut h = Harness::new();
    let (response, effects) = h.apply(
        NOW,
        Command::Submit(vec![
            new_job("q", "noop", b"a"),
            new_job("q", "noop", b""),
            new_job("mail", "send", b"ccc"),
        ]),
    );
    assert_eq!(
        response,
        Response::Submitted(vec![
            Ok(Submitted::new(1)),
            Ok(Submitted::new(2)),
            Ok(Submitted::new(3))
        ])
    );
    assert_eq!(
        effects,
        vec![
            Effect::StorePayload {
                job: 1,
                payload: b"a".to_vec()
            },
            Effect::StorePayload {
                job: 2,
                payload: vec![]
            },
            Effect::StorePayload {
                job: 3,
                payload: b"ccc".to_vec()
            },
        ]
    );

    let (response, effects) = h.apply(
        NOW + 5,
        Command::Submit(vec![new_job("q", "noop", b"d"), new_job("q", "noop", b"e")]),
    );
    assert_eq!(
        response,
        Response::Submitted(vec![Ok(Submitted::new(4)), Ok(Submitted::new(5))])
    );
    assert_eq!(
        effects,
        vec![
            Effect::StorePayload {
                job: 4,
                payload: b"d".to_vec()
            },
            Effect::StorePayload {
                job: 5,
                payload: b"e".to_vec()
            },
        ]
    );

    assert_eq!(h.table.counts(), &counts(5, 0, 0, 0, 0));
    assert_eq!(
        h.table.ready_jobs().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(
        h.job(3),
        Job {
            id: 3,
            queue: "mail".into(),
            kind: "send".into(),
            priority: 0,
            payload_len: 3,
            max_attempts: 3,
            timeout_ms: 0,
            backoff: Backoff::default(),
            idempotency_key: None,
            ordering_key: None,
            labels: BTreeMap::new(),
            schedule: None,
            status: JobStatus::Pending,
            created_at_ms: NOW,
            updated_at_ms: NOW,
            run_at_ms: 0,
            failures: 0,
            abandoned: 0,
            attempts: vec![],
            result: None,
            last_error: None,
        }
    );
    assert_eq!(h.job(5).created_at_ms, NOW + 5);
}

/// A `JobTable::default()` equals `JobTable::new()` and issues job ids from 1.
#[test]
fn default_table_is_the_empty_table() {
    // An enclosing store struct that derives `Default` builds the table this way.
    assert_eq!(JobTable::default(), JobTable::new());
    let mut table = JobTable::default();
    let (response, _) = table.apply(
        1,
        Request {
            now_ms: NOW,
            entropy: 0,
            command: Command::Submit(vec![new_job("q", "noop", b"")]),
        },
    );
    assert_eq!(response, Response::Submitted(vec![Ok(Submitted::new(1))]));
}

/// A job with a future run_at is pending but not ready; one with a past run_at is ready.
#[test]
fn submit_with_run_at_in_the_future_is_delayed() {
    let mut h = Harness::new();
    let ids = h.submit(
        NOW,
        vec![
            job_with(|j| j.run_at_ms = NOW + 10_000),
            job_with(|j| j.run_at_ms = NOW - 10),
            job_with(|j| j.run_at_ms = NOW),
        ],
    );
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(h.table.ready_jobs().collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(h.table.due_delayed_jobs(NOW + 9_999).count(), 0);
    assert_eq!(
        h.table.due_delayed_jobs(NOW + 10_000).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(h.job(1).status, JobStatus::Pending);
    assert_eq!(h.job(1).run_at_ms, NOW + 10_000);
    assert_eq!(h.table.counts(), &counts(3, 0, 0, 0, 0));
}

/// Ready jobs are listed highest priority first, then in submission order.
#[test]
fn ready_jobs_are_ordered_by_priority_then_fifo() {
    let mut h = Harness::new();
    h.submit(
        NOW,
        [0, 5, -3, 5, 0, i32::MAX, i32::MIN]
            .into_iter()
            .map(|p| job_with(|j| j.priority = p))
            .collect(),
    );
    assert_eq!(
        h.table.ready_jobs().collect::<Vec<_>>(),
        vec![6, 2, 4, 1, 5, 3, 7]
    );
}

/// Each invalid job is refused with a precise reason, and its batch creates nothing (the good
/// jobs answer BatchRejected), so a client never has half a batch committed.
#[test]
fn an_invalid_job_refuses_its_whole_batch_with_a_precise_reason() {
    // The oversize payload is zero-filled: the allocator hands out untouched zero pages, so the
    // 16 MiB are reserved but never written, and the job is only measured, never copied.
    let cases: Vec<(&str, NewJob, String)> = vec![
        (
            "empty queue",
            job_with(|j| j.queue.clear()),
            format!("queue name must be 1..={QUEUE_NAME_BYTES_MAX} bytes, got 0"),
        ),
        (
            "oversize queue",
            job_with(|j| j.queue = "q".repeat(QUEUE_NAME_BYTES_MAX + 1)),
            format!(
                "queue name must be 1..={QUEUE_NAME_BYTES_MAX} bytes, got {}",
                QUEUE_NAME_BYTES_MAX + 1
            ),
        ),
        (
            "empty kind",
            job_with(|j| j.kind.clear()),
            format!("kind must be 1..={KIND_NAME_BYTES_MAX} bytes, got 0"),
        ),
        (
            "oversize kind",
            job_with(|j| j.kind = "k".repeat(KIND_NAME_BYTES_MAX + 1)),
            format!(
                "kind must be 1..={KIND_NAME_BYTES_MAX} bytes, got {}",
                KIND_NAME_BYTES_MAX + 1
            ),
        ),
        (
            "max_attempts 0",
            job_with(|j| j.max_attempts = 0),
            format!("max_attempts must be 1..={MAX_ATTEMPTS_MAX}, got 0"),
        ),
        (
            "max_attempts above the maximum",
            job_with(|j| j.max_attempts = MAX_ATTEMPTS_MAX + 1),
            format!(
                "max_attempts must be 1..={MAX_ATTEMPTS_MAX}, got {}",
                MAX_ATTEMPTS_MAX + 1
            ),
        ),
        (
            "max_attempts u32::MAX",
            job_with(|j| j.max_attempts = u32::MAX),
            format!(
                "max_attempts must be 1..={MAX_ATTEMPTS_MAX}, got {}",
                u32::MAX
            ),
        ),
        (
            "timeout above the maximum",
            job_with(|j| j.timeout_ms = TIMEOUT_MS_MAX + 1),
            format!(
                "timeout of {} ms exceeds the limit of {TIMEOUT_MS_MAX} ms",
                TIMEOUT_MS_MAX + 1
            ),
        ),
        (
            "payload over the ceiling",
            job_with(|j| j.payload = vec![0; PAYLOAD_BYTES_CEILING + 1]),
            format!(
                "payload of {} bytes exceeds the ceiling of {PAYLOAD_BYTES_CEILING}",
                PAYLOAD_BYTES_CEILING + 1
            ),
        ),
        (
            "run_at one ms past ten years after the entry's time",
            job_with(|j| j.run_at_ms = NOW + RUN_AT_AHEAD_MS_MAX + 1),
            format!(
                "run_at {} ms is more than 3650 days after now ({NOW} ms); the latest accepted \
                 is {} ms",
                NOW + RUN_AT_AHEAD_MS_MAX + 1,
                NOW + RUN_AT_AHEAD_MS_MAX
            ),
        ),
        (
            "idempotency key with a newline (it could never be an HTTP header)",
            job_with(|j| j.idempotency_key = Some("order\n17".into())),
            "idempotency key must be printable ASCII (0x20-0x7E), as it is sent as an HTTP \
             header; byte 5 is 0x0a"
                .into(),
        ),
        (
            "non-ASCII idempotency key",
            job_with(|j| j.idempotency_key = Some("zahlung-ä".into())),
            "idempotency key must be printable ASCII (0x20-0x7E), as it is sent as an HTTP \
             header; byte 8 is 0xc3"
                .into(),
        ),
        (
            "idempotency key with DEL",
            job_with(|j| j.idempotency_key = Some("k\u{7f}".into())),
            "idempotency key must be printable ASCII (0x20-0x7E), as it is sent as an HTTP \
             header; byte 1 is 0x7f"
                .into(),
        ),
        (
            "idempotency key with a leading space",
            job_with(|j| j.idempotency_key = Some(" k".into())),
            "idempotency key must not start or end with a space (an HTTP header value is trimmed)"
                .into(),
        ),
        (
            "idempotency key with a trailing space",
            job_with(|j| j.idempotency_key = Some("k ".into())),
            "idempotency key must not start or end with a space (an HTTP header value is trimmed)"
                .into(),
        ),
        (
            "queue name with an escape (it is shown in terminals and dashboards)",
            job_with(|j| j.queue = "mail\u{1b}[2J".into()),
            "queue name must not contain control characters; byte 4 is U+001B".into(),
        ),
        (
            "kind with a NUL",
            job_with(|j| j.kind = "no\0op".into()),
            "kind must not contain control characters; byte 2 is U+0000".into(),
        ),
        (
            "ordering key with a tab",
            job_with(|j| j.ordering_key = Some("line\t1".into())),
            "ordering key must not contain control characters; byte 4 is U+0009".into(),
        ),
        (
            "label name with a newline",
            job_with(|j| {
                j.labels.insert("te\nam".into(), "x".into());
            }),
            "label name must not contain control characters; byte 2 is U+000A".into(),
        ),
        (
            "label value with a C1 control character",
            job_with(|j| {
                j.labels.insert("team".into(), "bil\u{85}ling".into());
            }),
            "label \"team\" value must not contain control characters; byte 3 is U+0085".into(),
        ),
        (
            "run_at 2^64-1 (a job that would never run, yet count as live)",
            job_with(|j| j.run_at_ms = u64::MAX),
            format!(
                "run_at {} ms is more than 3650 days after now ({NOW} ms); the latest accepted \
                 is {} ms",
                u64::MAX,
                NOW + RUN_AT_AHEAD_MS_MAX
            ),
        ),
    ];
    for (name, bad, reason) in cases {
        let mut h = Harness::new();
        let (response, effects) = h.apply(
            NOW,
            Command::Submit(vec![
                new_job("q", "noop", b"first"),
                bad,
                new_job("q", "noop", b"third"),
            ]),
        );
        assert_eq!(
            response,
            Response::Submitted(vec![
                Err(Rejection::BatchRejected),
                Err(Rejection::Invalid(reason)),
                Err(Rejection::BatchRejected)
            ]),
            "{name}"
        );
        assert_eq!(effects, vec![], "{name}");
        let mut untouched = JobTable::new();
        untouched.apply(1, Request::at(NOW, Command::Submit(vec![])));
        assert_eq!(h.table, untouched, "{name}: nothing changed");
        // The next good batch gets id 1: the refused one used no ids.
        assert_eq!(h.submit(NOW, vec![new_job("q", "noop", b"")]), vec![1]);
    }
}

/// Jobs exactly at every limit are accepted.
#[test]
fn jobs_at_the_limits_are_accepted() {
    let cases: Vec<(&str, NewJob)> = vec![
        (
            "one-byte queue and kind",
            job_with(|j| {
                j.queue = "q".into();
                j.kind = "k".into();
            }),
        ),
        (
            "longest queue",
            job_with(|j| j.queue = "q".repeat(QUEUE_NAME_BYTES_MAX)),
        ),
        (
            "longest kind",
            job_with(|j| j.kind = "k".repeat(KIND_NAME_BYTES_MAX)),
        ),
        ("one attempt", job_with(|j| j.max_attempts = 1)),
        (
            "most attempts",
            job_with(|j| j.max_attempts = MAX_ATTEMPTS_MAX),
        ),
        (
            "longest timeout",
            job_with(|j| j.timeout_ms = TIMEOUT_MS_MAX),
        ),
        (
            "payload at the ceiling",
            job_with(|j| j.payload = vec![0; PAYLOAD_BYTES_CEILING]),
        ),
        (
            "run_at exactly ten years after the entry's time",
            job_with(|j| j.run_at_ms = NOW + RUN_AT_AHEAD_MS_MAX),
        ),
        (
            "idempotency key of every printable ASCII character, spaces inside",
            job_with(|j| {
                j.idempotency_key = Some((0x21u8..=0x7e).map(char::from).collect::<String>() + " x")
            }),
        ),
        (
            "longest idempotency key",
            job_with(|j| j.idempotency_key = Some("k".repeat(256))),
        ),
        (
            "a UUID as the Rust client and the CLI choose",
            job_with(|j| j.idempotency_key = Some("0b3c1a52-6f0e-4d4e-9a0c-2f1d3e4b5a69".into())),
        ),
        (
            "non-ASCII ordering key and labels without control characters",
            job_with(|j| {
                j.ordering_key = Some("kunde-ü 9".into());
                j.labels.insert("équipe".into(), "facturación ✓".into());
            }),
        ),
    ];
    for (name, job) in cases {
        let expected = job.clone();
        let mut h = Harness::new();
        let (response, effects) = h.apply(NOW, Command::Submit(vec![job]));
        assert_eq!(
            response,
            Response::Submitted(vec![Ok(Submitted::new(1))]),
            "{name}"
        );
        // Compare without printing a 16 MiB payload on failure.
        assert!(
            matches!(
                effects.as_slice(),
                [Effect::StorePayload { job: 1, payload }] if *payload == expected.payload
            ),
            "{name}"
        );
        let stored = h.job(1);
        assert_eq!(stored.queue, expected.queue, "{name}");
        assert_eq!(stored.kind, expected.kind, "{name}");
        assert_eq!(stored.max_attempts, expected.max_attempts, "{name}");
        assert_eq!(stored.timeout_ms, expected.timeout_ms, "{name}");
        assert_eq!(
            stored.payload_len as usize,
            expected.payload.len(),
            "{name}"
        );
    }
}

/// The run_at bound is relative to the leader time apply uses (the largest stamp so far): the
/// same run_at is refused in an entry stamped one ms too early and accepted one ms later, and a
/// stamp that goes backwards does not widen the bound.
#[test]
fn run_at_is_bounded_from_the_entry_s_leader_time() {
    let run_at = NOW + RUN_AT_AHEAD_MS_MAX + 1;
    let mut h = Harness::new();
    let job = job_with(|j| j.run_at_ms = run_at);
    let (response, _) = h.apply(NOW, Command::Submit(vec![job.clone()]));
    assert!(
        matches!(&response, Response::Submitted(r) if matches!(r[..], [Err(Rejection::Invalid(_))])),
        "{response:?}"
    );
    assert_eq!(h.submit(NOW + 1, vec![job.clone()]), vec![1]);
    assert_eq!(h.job(1).run_at_ms, run_at);
    // An earlier stamp after a later one: apply's time stays at NOW + 1.
    let later = job_with(|j| j.run_at_ms = NOW + 1 + RUN_AT_AHEAD_MS_MAX);
    assert_eq!(h.submit(NOW - 500, vec![later]), vec![2]);
}

/// A submit batch over SUBMIT_BATCH_JOBS_MAX is refused whole; one at the limit applies.
#[test]
fn submit_batch_too_large_is_refused_whole() {
    let mut h = Harness::new();
    let before = h.table.clone();
    let jobs = vec![new_job("q", "noop", b""); SUBMIT_BATCH_JOBS_MAX + 1];
    let (response, effects) = h.apply(NOW, Command::Submit(jobs));
    let refused = Rejection::BatchTooLarge {
        got: SUBMIT_BATCH_JOBS_MAX + 1,
        max: SUBMIT_BATCH_JOBS_MAX,
    };
    assert_eq!(
        response,
        Response::Submitted(vec![Err(refused); SUBMIT_BATCH_JOBS_MAX + 1])
    );
    assert_eq!(effects, vec![]);
    assert_eq!(h.table.jobs().count(), 0);
    assert_eq!(
        View {
            now_ms: 0,
            ..View::of(&h.table)
        },
        View::of(&before)
    );

    let ids = h.submit(NOW, vec![new_job("q", "noop", b""); SUBMIT_BATCH_JOBS_MAX]);
    assert_eq!(ids, (1..=SUBMIT_BATCH_JOBS_MAX as u64).collect::<Vec<_>>());
}

// ----- assign -----

/// An assignment starts attempt 1 with the log index as token and an exact Start effect.
#[test]
fn assign_starts_attempt_with_log_index_as_token() {
    let mut h = Harness::new();
    h.register(NOW, 7, 3, 2);
    h.submit(
        NOW,
        vec![job_with(|j| {
            j.queue = "mail".into();
            j.kind = "send".into();
            j.timeout_ms = 5_000;
            j.priority = 4;
        })],
    );
    // Log indexes need not be dense (blank and membership entries sit between commands).
    h.index = 41;
    let (response, effects) = h.apply(NOW + 10, Command::Assign(vec![assignment(1, 7, 3)]));
    assert_eq!(
        response,
        Response::Assigned {
            started: 1,
            rejected: vec![]
        }
    );
    assert_eq!(
        effects,
        vec![Effect::Start(StartAttempt {
            job: 1,
            token: 42,
            attempt: 1,
            node: 7,
            incarnation: 3,
            queue: "mail".into(),
            kind: "send".into(),
            timeout_ms: 5_000,
            idempotency_key: format!("exactly-job-{}", 1),
        })]
    );
    assert_eq!(
        h.job(1),
        Job {
            id: 1,
            queue: "mail".into(),
            kind: "send".into(),
            priority: 4,
            payload_len: 1,
            max_attempts: 3,
            timeout_ms: 5_000,
            backoff: Backoff::default(),
            idempotency_key: None,
            ordering_key: None,
            labels: BTreeMap::new(),
            schedule: None,
            status: JobStatus::Running,
            created_at_ms: NOW,
            updated_at_ms: NOW + 10,
            run_at_ms: 0,
            failures: 0,
            abandoned: 0,
            attempts: vec![Attempt {
                number: 1,
                token: 42,
                node: 7,
                incarnation: 3,
                started_at_ms: NOW + 10,
                ended_at_ms: None,
                end: None,
            }],
            result: None,
            last_error: None,
        }
    );
    assert_eq!(h.job(1).current_attempt().map(|a| a.token), Some(42));
    assert_eq!(h.table.counts(), &counts(0, 1, 0, 0, 0));
    assert_eq!(h.table.running_on(7), 1);
    assert_eq!(h.table.ready_jobs().count(), 0);
}

/// A fixture for assignment refusals: node 1 (incarnation 2) is full, node 2 (incarnation 1)
/// has room; job 1 is ready, 2 runs on node 1, 3 is due at NOW + 60 s, 4 succeeded, 5 runs on
/// node 2, 6 failed.
fn assign_fixture() -> Harness {
    let mut h = Harness::new();
    h.register(NOW, 1, 2, 1);
    h.register(NOW, 2, 1, 5);
    h.submit(
        NOW,
        vec![
            new_job("q", "noop", b""),
            new_job("q", "noop", b""),
            job_with(|j| j.run_at_ms = NOW + 60_000),
            new_job("q", "noop", b""),
            new_job("q", "noop", b""),
            new_job("q", "noop", b""),
        ],
    );
    h.assign(NOW, 2, 1, 2);
    let t4 = h.assign(NOW, 4, 2, 1);
    h.complete(NOW, 4, t4, succeeded(b""));
    h.assign(NOW, 5, 2, 1);
    let t6 = h.assign(NOW, 6, 2, 1);
    h.complete(NOW, 6, t6, failed("no", false));
    assert_eq!(h.table.counts(), &counts(2, 2, 1, 1, 0));
    h
}

/// Each refused assignment gets its precise reason and changes nothing at all.
#[test]
fn assign_refusals_change_nothing() {
    let cases = [
        (
            "unknown node",
            assignment(1, 9, 0),
            Rejection::UnknownNode(9),
        ),
        (
            "older incarnation",
            assignment(1, 2, 0),
            Rejection::StaleIncarnation {
                node: 2,
                got: 0,
                current: 1,
            },
        ),
        (
            "newer incarnation than registered",
            assignment(1, 2, 5),
            Rejection::StaleIncarnation {
                node: 2,
                got: 5,
                current: 1,
            },
        ),
        (
            "node has no free slot",
            assignment(1, 1, 2),
            Rejection::NoSlot(1),
        ),
        (
            "job running",
            assignment(5, 2, 1),
            Rejection::NotPending("running".into()),
        ),
        (
            "job running on another node",
            assignment(2, 2, 1),
            Rejection::NotPending("running".into()),
        ),
        (
            "job succeeded",
            assignment(4, 2, 1),
            Rejection::NotPending("succeeded".into()),
        ),
        (
            "job failed",
            assignment(6, 2, 1),
            Rejection::NotPending("dead".into()),
        ),
        (
            "job not due",
            assignment(3, 2, 1),
            Rejection::NotDue(NOW + 60_000),
        ),
        (
            "unknown job",
            assignment(99, 2, 1),
            Rejection::UnknownJob(99),
        ),
        ("job id 0", assignment(0, 2, 1), Rejection::UnknownJob(0)),
    ];
    let fixture = assign_fixture();
    for (name, a, why) in cases {
        let mut h = fixture.clone();
        let job = a.job;
        let (response, effects) = h.apply(NOW, Command::Assign(vec![a]));
        assert_eq!(
            response,
            Response::Assigned {
                started: 0,
                rejected: vec![(job, why)]
            },
            "{name}"
        );
        assert_eq!(effects, vec![], "{name}");
        assert_eq!(h.table, fixture.table, "{name}");
    }
}

/// A delayed job is refused one millisecond before its run_at and started exactly at it.
#[test]
fn assign_waits_for_run_at() {
    let mut h = assign_fixture();
    let (response, _) = h.apply(NOW + 59_999, Command::Assign(vec![assignment(3, 2, 1)]));
    assert_eq!(
        response,
        Response::Assigned {
            started: 0,
            rejected: vec![(3, Rejection::NotDue(NOW + 60_000))]
        }
    );
    let token = h.assign(NOW + 60_000, 3, 2, 1);
    assert_eq!(h.job(3).current_attempt().map(|a| a.token), Some(token));
}

/// An Assign batch starts the good assignments and refuses each bad one on its own.
#[test]
fn assign_batch_applies_the_good_and_refuses_the_bad() {
    let mut h = assign_fixture();
    h.submit(NOW, vec![new_job("q", "noop", b"")]); // job 7
    let (response, effects) = h.apply(
        NOW,
        Command::Assign(vec![
            assignment(1, 2, 1),
            assignment(99, 2, 1),
            assignment(1, 2, 1),
            assignment(3, 2, 1),
            assignment(7, 2, 1),
        ]),
    );
    let token = h.index;
    assert_eq!(
        response,
        Response::Assigned {
            started: 2,
            rejected: vec![
                (99, Rejection::UnknownJob(99)),
                (1, Rejection::NotPending("running".into())),
                (3, Rejection::NotDue(NOW + 60_000)),
            ]
        }
    );
    let start = |job| {
        Effect::Start(StartAttempt {
            job,
            token,
            attempt: 1,
            node: 2,
            incarnation: 1,
            queue: "q".into(),
            kind: "noop".into(),
            timeout_ms: 0,
            idempotency_key: format!("exactly-job-{}", job),
        })
    };
    assert_eq!(effects, vec![start(1), start(7)]);
    assert_eq!(h.table.running_on(2), 3);
    assert_eq!(h.table.counts(), &counts(1, 4, 1, 1, 0));
}

/// A node takes at most `slots` attempts; a finished attempt frees its slot.
#[test]
fn assign_respects_the_slot_limit_per_node() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 2);
    h.register(NOW, 2, 1, 1);
    h.submit(NOW, vec![new_job("q", "noop", b""); 4]);
    let (response, effects) = h.apply(
        NOW,
        Command::Assign(vec![
            assignment(1, 1, 1),
            assignment(2, 1, 1),
            assignment(3, 1, 1),
            assignment(4, 2, 1),
        ]),
    );
    let token = h.index;
    assert_eq!(
        response,
        Response::Assigned {
            started: 3,
            rejected: vec![(3, Rejection::NoSlot(1))]
        }
    );
    assert_eq!(effects.len(), 3);
    assert_eq!((h.table.running_on(1), h.table.running_on(2)), (2, 1));

    h.complete(NOW, 1, token, succeeded(b""));
    assert_eq!(h.table.running_on(1), 1);
    h.assign(NOW, 3, 1, 1);
    assert_eq!(h.table.running_on(1), 2);
    assert_eq!(h.table.counts(), &counts(0, 3, 1, 0, 0));
}

/// A node registered with zero slots takes nothing.
#[test]
fn assign_to_a_node_with_zero_slots_is_refused() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 0);
    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    let (response, _) = h.apply(NOW, Command::Assign(vec![assignment(1, 1, 1)]));
    assert_eq!(
        response,
        Response::Assigned {
            started: 0,
            rejected: vec![(1, Rejection::NoSlot(1))]
        }
    );
}

/// An Assign batch over ASSIGN_BATCH_MAX is refused whole and changes nothing.
#[test]
fn assign_batch_too_large_is_refused_whole() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, NODE_SLOTS_MAX);
    h.submit(NOW, vec![new_job("q", "noop", b""); SUBMIT_BATCH_JOBS_MAX]);
    h.submit(NOW, vec![new_job("q", "noop", b""); SUBMIT_BATCH_JOBS_MAX]);
    let before = h.table.clone();
    let batch: Vec<_> = (1..=ASSIGN_BATCH_MAX as u64 + 1)
        .map(|job| assignment(job, 1, 1))
        .collect();
    let (response, effects) = h.apply(NOW, Command::Assign(batch));
    let refused = Rejection::BatchTooLarge {
        got: ASSIGN_BATCH_MAX + 1,
        max: ASSIGN_BATCH_MAX,
    };
    assert_eq!(
        response,
        Response::Assigned {
            started: 0,
            rejected: (1..=ASSIGN_BATCH_MAX as u64 + 1)
                .map(|job| (job, refused.clone()))
                .collect()
        }
    );
    assert_eq!(effects, vec![]);
    assert_eq!(h.table, before);

    let batch: Vec<_> = (1..=ASSIGN_BATCH_MAX as u64)
        .map(|job| assignment(job, 1, 1))
        .collect();
    let (response, _) = h.apply(NOW, Command::Assign(batch));
    assert_eq!(
        response,
        Response::Assigned {
            started: ASSIGN_BATCH_MAX as u32,
            rejected: vec![]
        }
    );
}

/// A malformed log cannot restart a job with a token not above its last one.
#[test]
fn assign_never_reuses_or_lowers_a_token() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 4);
    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    h.index = 9;
    let token = h.assign(NOW, 1, 1, 1);
    assert_eq!(token, 10);
    h.register(NOW, 1, 2, 4); // abandons attempt 10, the job is pending again
    for index in [10, 5] {
        let before = h.table.clone();
        let response = h.table.apply(
            index,
            Request {
                now_ms: NOW,
                entropy: 0,
                command: Command::Assign(vec![assignment(1, 1, 2)]),
            },
        );
        assert_eq!(
            response,
            (
                Response::Assigned {
                    started: 0,
                    rejected: vec![(
                        1,
                        Rejection::StaleAttempt {
                            got: index,
                            current: Some(10)
                        }
                    )]
                },
                vec![]
            )
        );
        assert_eq!(h.table, before);
    }
    h.index = 11;
    assert_eq!(h.assign(NOW, 1, 1, 2), 12);
    assert_eq!(h.job(1).attempts[1].number, 2);
}

// ----- complete -----

/// Success ends the job, truncates the result to RESULT_BYTES_MAX and drops the payload.
#[test]
fn completion_success_finishes_the_job() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 1);
    h.submit(NOW, vec![new_job("q", "noop", b"x")]);
    let token = h.assign(NOW + 1, 1, 1, 1);
    let mut result = vec![7u8; RESULT_BYTES_MAX];
    result.extend_from_slice(b"cut off");
    let effects = h.complete(NOW + 2, 1, token, Outcome::Succeeded { result });
    assert_eq!(effects, vec![Effect::DropPayload { job: 1 }]);
    assert_eq!(
        h.job(1),
        Job {
            id: 1,
            queue: "q".into(),
            kind: "noop".into(),
            priority: 0,
            payload_len: 1,
            max_attempts: 3,
            timeout_ms: 0,
            backoff: Backoff::default(),
            idempotency_key: None,
            ordering_key: None,
            labels: BTreeMap::new(),
            schedule: None,
            status: JobStatus::Succeeded,
            created_at_ms: NOW,
            updated_at_ms: NOW + 2,
            run_at_ms: 0,
            failures: 0,
            abandoned: 0,
            attempts: vec![Attempt {
                number: 1,
                token,
                node: 1,
                incarnation: 1,
                started_at_ms: NOW + 1,
                ended_at_ms: Some(NOW + 2),
                end: Some(AttemptEnd::Succeeded),
            }],
            result: Some(vec![7u8; RESULT_BYTES_MAX]),
            last_error: None,
        }
    );
    assert_eq!(h.job(1).current_attempt(), None);
    assert_eq!(h.table.counts(), &counts(0, 0, 1, 0, 0));
    assert_eq!(h.table.running_on(1), 0);
}

/// Results at or under RESULT_BYTES_MAX are kept whole, including an empty one.
#[test]
fn completion_results_within_the_limit_are_kept_whole() {
    for result in [vec![], b"ok".to_vec(), vec![1u8; RESULT_BYTES_MAX]] {
        let mut h = Harness::new();
        h.register(NOW, 1, 1, 1);
        h.submit(NOW, vec![new_job("q", "noop", b"")]);
        let token = h.assign(NOW, 1, 1, 1);
        h.complete(NOW, 1, token, succeeded(&result));
        assert_eq!(h.job(1).result.as_deref(), Some(result.as_slice()));
    }
}

/// The retry delay's ceiling doubles from RETRY_BACKOFF_BASE_MS and is capped at
/// RETRY_BACKOFF_MAX_MS.
#[test]
fn retry_backoff_is_exponential_and_capped() {
    let cases = [
        (0, RETRY_BACKOFF_BASE_MS),
        (1, 1_000),
        (2, 2_000),
        (3, 4_000),
        (9, 256_000),
        (10, RETRY_BACKOFF_MAX_MS),
        (21, RETRY_BACKOFF_MAX_MS),
        (u32::MAX, RETRY_BACKOFF_MAX_MS),
    ];
    for (failures, delay) in cases {
        assert_eq!(
            backoff_ceiling_ms(failures, Backoff::default()),
            delay,
            "failures = {failures}"
        );
    }
}

/// Retryable failures requeue at now + jittered backoff until max_attempts, then the job is a
/// dead letter that keeps its payload.
#[test]
fn retryable_failure_requeues_with_backoff_until_max_attempts() {
    let mut h = Harness::new();
    h.entropy = 0xDEAD_BEEF;
    h.register(NOW, 1, 1, 1);
    h.submit(NOW, vec![job_with(|j| j.max_attempts = 3)]);

    let mut at = NOW + 100;
    let mut tokens = vec![];
    for failure in 1..=2u32 {
        let token = h.assign(at, 1, 1, 1);
        tokens.push(token);
        let effects = h.complete(at, 1, token, failed(&format!("boom {failure}"), true));
        assert_eq!(effects, vec![], "failure {failure} keeps the payload");
        let job = h.job(1);
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!(job.failures, failure);
        let delay = retry_delay_ms(failure, Backoff::default(), h.entropy, 1);
        let ceiling = backoff_ceiling_ms(failure, Backoff::default());
        assert!((ceiling / 2..=ceiling).contains(&delay), "equal jitter");
        assert_eq!(job.run_at_ms, at + delay);
        assert_eq!(
            job.last_error.as_deref(),
            Some(format!("boom {failure}").as_str())
        );
        assert_eq!(job.updated_at_ms, at);
        assert_eq!(
            job.attempts.last().unwrap().end,
            Some(AttemptEnd::Failed {
                error: format!("boom {failure}"),
                retryable: true
            })
        );
        assert_eq!(h.table.counts(), &counts(1, 0, 0, 0, 0));
        assert_eq!(h.table.running_on(1), 0, "the slot is free again");
        assert_eq!(
            h.table.ready_jobs().count(),
            0,
            "not ready before its backoff"
        );

        // Not due one millisecond early; due exactly at run_at.
        let due = at + retry_delay_ms(failure, Backoff::default(), h.entropy, 1);
        let (response, _) = h.apply(due - 1, Command::Assign(vec![assignment(1, 1, 1)]));
        assert_eq!(
            response,
            Response::Assigned {
                started: 0,
                rejected: vec![(1, Rejection::NotDue(due))]
            }
        );
        at = due;
    }
    let waited = at - (NOW + 100);
    assert!((500 + 1_000..=1_000 + 2_000).contains(&waited), "{waited}");

    let token = h.assign(at, 1, 1, 1);
    tokens.push(token);
    let effects = h.complete(at + 5, 1, token, failed("boom 3", true));
    assert_eq!(
        effects,
        vec![],
        "a dead letter keeps its payload for a redrive"
    );
    let job = h.job(1);
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.failures, 3);
    assert_eq!(job.last_error.as_deref(), Some("boom 3"));
    assert_eq!(
        job.attempts
            .iter()
            .map(|a| (a.number, a.token))
            .collect::<Vec<_>>(),
        vec![(1, tokens[0]), (2, tokens[1]), (3, tokens[2])]
    );
    assert!(tokens.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(h.table.counts(), &counts(0, 0, 0, 1, 0));
}

/// A permanent failure, or a failure of the last attempt, fails the job at once.
#[test]
fn permanent_failure_or_last_attempt_fails_at_once() {
    let cases = [
        ("permanent", 5, false),
        ("retryable but single attempt", 1, true),
    ];
    for (name, max_attempts, retryable) in cases {
        let mut h = Harness::new();
        h.register(NOW, 1, 1, 1);
        h.submit(NOW, vec![job_with(|j| j.max_attempts = max_attempts)]);
        let token = h.assign(NOW, 1, 1, 1);
        let effects = h.complete(NOW + 3, 1, token, failed("bad input", retryable));
        assert_eq!(effects, vec![], "{name}: a dead letter keeps its payload");
        let job = h.job(1);
        assert_eq!(job.status, JobStatus::Dead, "{name}");
        assert_eq!(job.failures, 1, "{name}");
        assert_eq!(job.run_at_ms, 0, "{name}");
        assert_eq!(job.last_error.as_deref(), Some("bad input"), "{name}");
        assert_eq!(
            job.attempts[0].end,
            Some(AttemptEnd::Failed {
                error: "bad input".into(),
                retryable
            }),
            "{name}"
        );
        assert_eq!(h.table.counts(), &counts(0, 0, 0, 1, 0), "{name}");
    }
}

/// A long error is truncated to ERROR_BYTES_MAX at a character boundary.
#[test]
fn failure_error_is_truncated_at_a_char_boundary() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 1);
    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    let token = h.assign(NOW, 1, 1, 1);
    // 'a' then two-byte characters: byte ERROR_BYTES_MAX (even) falls inside a character.
    let error = format!("a{}", "é".repeat(ERROR_BYTES_MAX));
    h.complete(NOW, 1, token, failed(&error, true));
    let kept = h.job(1).last_error.clone().unwrap();
    assert_eq!(kept.len(), ERROR_BYTES_MAX - 1);
    assert!(error.starts_with(&kept));
    assert_eq!(
        h.job(1).attempts[0].end,
        Some(AttemptEnd::Failed {
            error: kept,
            retryable: true
        })
    );
}

/// One stale completion: the job, the token to complete it with, and the token that is current.
#[derive(Clone, Copy)]
struct StaleCase {
    name: &'static str,
    job: u64,
    token: u64,
    current: Option<u64>,
}

/// A fixture for stale completions on node 1: the harness and one case per kind of staleness.
fn stale_fixture() -> (Harness, Vec<StaleCase>) {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 10);
    h.submit(NOW, vec![new_job("q", "noop", b""); 6]);
    // Job 1: its first attempt was abandoned by a restart and it runs again.
    let old = h.assign(NOW, 1, 1, 1);
    h.register(NOW, 1, 2, 10);
    let new = h.assign(NOW, 1, 1, 2);
    // Job 2: pending again after a retryable failure.
    let failed_token = h.assign(NOW, 2, 1, 2);
    h.complete(NOW, 2, failed_token, failed("flaky", true));
    // Job 3: succeeded.
    let done = h.assign(NOW, 3, 1, 2);
    h.complete(NOW, 3, done, succeeded(b"once"));
    // Job 4: never assigned.
    // Job 5: running.
    let running = h.assign(NOW, 5, 1, 2);
    // Job 6: failed permanently.
    let dead = h.assign(NOW, 6, 1, 2);
    h.complete(NOW, 6, dead, failed("fatal", false));
    let cases = [
        ("old token after reassignment", 1, old, Some(new)),
        (
            "job pending after a retryable failure",
            2,
            failed_token,
            None,
        ),
        ("duplicate completion of a succeeded job", 3, done, None),
        ("job never assigned", 4, 0, None),
        ("token of a future attempt", 5, running + 1, Some(running)),
        ("token below the current one", 5, running - 1, Some(running)),
        ("completion of a failed job", 6, dead, None),
    ];
    let cases = cases
        .into_iter()
        .map(|(name, job, token, current)| StaleCase {
            name,
            job,
            token,
            current,
        })
        .collect();
    (h, cases)
}

/// A stale completion is refused, counted in stale_completions, and changes nothing else.
#[test]
fn stale_completion_is_rejected_counted_and_changes_nothing_else() {
    let (fixture, cases) = stale_fixture();
    let outcomes = [
        succeeded(b"late"),
        failed("late", true),
        failed("late", false),
    ];
    for StaleCase {
        name,
        job,
        token,
        current,
    } in cases
    {
        for outcome in outcomes.clone() {
            let mut h = fixture.clone();
            let before = View::of(&h.table);
            let (response, effects) = h.apply(
                NOW,
                Command::Complete(vec![completion(job, token, outcome.clone())]),
            );
            assert_eq!(
                response,
                Response::Completed {
                    accepted: 0,
                    rejected: vec![(
                        job,
                        Rejection::StaleAttempt {
                            got: token,
                            current
                        }
                    )]
                },
                "{name}, {outcome:?}"
            );
            assert_eq!(effects, vec![], "{name}, {outcome:?}");
            let mut expected = before.clone();
            expected.counts.stale_completions += 1;
            assert_eq!(View::of(&h.table), expected, "{name}, {outcome:?}");
        }
    }
}

/// A completion for a job that does not exist is refused as UnknownJob and not counted as stale.
#[test]
fn completion_of_an_unknown_job_is_refused_without_counting() {
    let (mut h, _) = stale_fixture();
    let before = h.table.clone();
    let (response, effects) = h.apply(
        NOW,
        Command::Complete(vec![completion(99, 1, succeeded(b""))]),
    );
    assert_eq!(
        response,
        Response::Completed {
            accepted: 0,
            rejected: vec![(99, Rejection::UnknownJob(99))]
        }
    );
    assert_eq!(effects, vec![]);
    assert_eq!(h.table, before);
}

/// A Complete batch applies current completions and refuses stale ones and duplicates.
#[test]
fn completion_batch_applies_current_and_refuses_stale() {
    let (mut h, cases) = stale_fixture();
    let (old, new) = (cases[0].token, cases[0].current.unwrap());
    let running = cases[4].current.unwrap();
    let (response, effects) = h.apply(
        NOW + 1,
        Command::Complete(vec![
            completion(5, running, succeeded(b"first")),
            completion(1, old, succeeded(b"stale")),
            completion(5, running, succeeded(b"second")),
            completion(1, new, failed("permanent", false)),
        ]),
    );
    assert_eq!(
        response,
        Response::Completed {
            accepted: 2,
            rejected: vec![
                (
                    1,
                    Rejection::StaleAttempt {
                        got: old,
                        current: Some(new)
                    }
                ),
                (
                    5,
                    Rejection::StaleAttempt {
                        got: running,
                        current: None
                    }
                ),
            ]
        }
    );
    // Job 1 is a dead letter now and keeps its payload.
    assert_eq!(effects, vec![Effect::DropPayload { job: 5 }]);
    assert_eq!(h.job(5).result.as_deref(), Some(&b"first"[..]));
    assert_eq!(h.job(1).status, JobStatus::Dead);
    assert_eq!(h.table.counts().stale_completions, 2);
}

/// A Complete batch over COMPLETE_BATCH_MAX is refused whole and counts nothing as stale.
#[test]
fn completion_batch_too_large_is_refused_whole() {
    let (mut h, cases) = stale_fixture();
    let running = cases[4].current.unwrap();
    let before = h.table.clone();
    let batch = vec![completion(5, running, succeeded(b"")); COMPLETE_BATCH_MAX + 1];
    let (response, effects) = h.apply(NOW, Command::Complete(batch));
    let refused = Rejection::BatchTooLarge {
        got: COMPLETE_BATCH_MAX + 1,
        max: COMPLETE_BATCH_MAX,
    };
    assert_eq!(
        response,
        Response::Completed {
            accepted: 0,
            rejected: vec![(5, refused); COMPLETE_BATCH_MAX + 1]
        }
    );
    assert_eq!(effects, vec![]);
    assert_eq!(h.table, before);
}

// ----- register node -----

/// A registration is recorded exactly; the same incarnation again keeps its attempts.
/// A registration's address is kept by every replica and given to clients as a redirect: an
/// empty, oversized (a forged 1 MiB address used to cost every node memory) or non-printable one
/// is refused and changes nothing.
#[test]
fn a_registration_with_a_bad_address_is_refused() {
    let mut h = Harness::new();
    let with_addr = |addr: String| {
        Command::RegisterNode(exactly_core::NodeRegistration {
            node: 7,
            incarnation: 1,
            slots: 4,
            addr,
            applied: u64::MAX,
        })
    };
    let before = h.table.clone();
    for (addr, why) in [
        (
            String::new(),
            "node address must be 1..=255 bytes, got 0".to_string(),
        ),
        (
            "a".repeat(1 << 20),
            "node address must be 1..=255 bytes, got 1048576".to_string(),
        ),
        (
            "10.0.0.7:7000 x".into(),
            "node address must be printable ASCII without spaces; byte 13 is 0x20".into(),
        ),
        (
            "n\u{e9}:7000".into(),
            "node address must be printable ASCII without spaces; byte 1 is 0xc3".into(),
        ),
    ] {
        assert_eq!(
            h.apply(NOW, with_addr(addr)).0,
            Response::NodeRegistered(Err(Rejection::Invalid(why)))
        );
    }
    assert_eq!(h.table.nodes(), before.nodes());
    assert_eq!(
        h.apply(NOW, with_addr(format!("{}:7000", "h".repeat(250))))
            .0,
        Response::NodeRegistered(Ok(0))
    );
}

#[test]
fn register_node_records_it_and_same_incarnation_keeps_attempts() {
    let mut h = Harness::new();
    let lease = exactly_core::NodeLease {
        node: 7,
        incarnation: 3,
    };
    let (response, effects) = h.apply(NOW, registration(7, 3, 4));
    assert_eq!(response, Response::NodeRegistered(Ok(0)));
    assert_eq!(effects, vec![Effect::Renewed(lease)], "the first lease");
    assert_eq!(
        h.table.nodes().get(&7),
        Some(&NodeEntry {
            incarnation: 3,
            slots: 4,
            addr: "10.0.0.7:7000".into(),
            registered_at_ms: NOW,
            renewed_at_ms: 0,
            expired: false,
            renewal_marks: [(1, NOW)].into(),
            renewed_index: 1,
        })
    );

    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    let token = h.assign(NOW, 1, 7, 3);
    let (response, effects) = h.apply(
        NOW + 9,
        Command::RegisterNode(exactly_core::NodeRegistration {
            node: 7,
            incarnation: 3,
            slots: 8,
            addr: "10.0.0.77:7000".into(),
            applied: u64::MAX,
        }),
    );
    assert_eq!(response, Response::NodeRegistered(Ok(0)));
    assert_eq!(effects, vec![Effect::Renewed(lease)]);
    assert_eq!(
        h.table.nodes().get(&7),
        Some(&NodeEntry {
            incarnation: 3,
            slots: 8,
            addr: "10.0.0.77:7000".into(),
            registered_at_ms: NOW + 9,
            renewed_at_ms: 0,
            expired: false,
            // A mark less than 1/32 of the lag window after the previous one is not kept.
            renewal_marks: [(1, NOW)].into(),
            renewed_index: 4,
        })
    );
    assert_eq!(h.job(1).current_attempt().map(|a| a.token), Some(token));
    assert_eq!(h.table.running_on(7), 1);
}

/// A newer incarnation abandons and requeues the old one's attempts; old tokens go stale.
#[test]
fn newer_incarnation_abandons_and_requeues_old_attempts() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 4);
    h.register(NOW, 2, 1, 4);
    h.submit(NOW, vec![new_job("q", "noop", b""); 4]);
    let t1 = h.assign(NOW, 1, 1, 1);
    let t2 = h.assign(NOW, 2, 1, 1);
    let t3 = h.assign(NOW, 3, 2, 1);

    let at = NOW + 500;
    let (response, effects) = h.apply(at, registration(1, 2, 4));
    assert_eq!(response, Response::NodeRegistered(Ok(2)));
    assert_eq!(
        effects,
        vec![Effect::Renewed(exactly_core::NodeLease {
            node: 1,
            incarnation: 2
        })],
        "requeued jobs keep their payload"
    );
    let reason = "node 1 restarted (incarnation 2)".to_string();
    for (job, token) in [(1, t1), (2, t2)] {
        let j = h.job(job);
        assert_eq!(j.status, JobStatus::Pending);
        assert_eq!(j.run_at_ms, at);
        assert_eq!(j.abandoned, 1);
        assert_eq!(j.failures, 0);
        assert_eq!(j.updated_at_ms, at);
        assert_eq!(j.last_error.as_deref(), Some(reason.as_str()));
        assert_eq!(
            j.attempts,
            vec![Attempt {
                number: 1,
                token,
                node: 1,
                incarnation: 1,
                started_at_ms: NOW,
                ended_at_ms: Some(at),
                end: Some(AttemptEnd::Abandoned {
                    reason: reason.clone()
                }),
            }]
        );
    }
    assert_eq!(h.table.ready_jobs().collect::<Vec<_>>(), vec![1, 2, 4]);
    assert_eq!(h.job(3).current_attempt().map(|a| a.token), Some(t3));
    assert_eq!(h.table.counts(), &counts(3, 1, 0, 0, 0));
    assert_eq!((h.table.running_on(1), h.table.running_on(2)), (0, 1));

    // The old incarnation's late report is stale.
    let (response, _) = h.apply(
        at,
        Command::Complete(vec![completion(1, t1, succeeded(b""))]),
    );
    assert_eq!(
        response,
        Response::Completed {
            accepted: 0,
            rejected: vec![(
                1,
                Rejection::StaleAttempt {
                    got: t1,
                    current: None
                }
            )]
        }
    );
    // The old incarnation can no longer be assigned to; the new one can.
    let (response, _) = h.apply(at, Command::Assign(vec![assignment(1, 1, 1)]));
    assert_eq!(
        response,
        Response::Assigned {
            started: 0,
            rejected: vec![(
                1,
                Rejection::StaleIncarnation {
                    node: 1,
                    got: 1,
                    current: 2
                }
            )]
        }
    );
    let t1b = h.assign(at, 1, 1, 2);
    assert!(t1b > t1);
    assert_eq!(h.job(1).attempts[1].number, 2);
    h.complete(at, 1, t1b, succeeded(b""));
    assert_eq!(h.job(1).status, JobStatus::Succeeded);
}

/// An older incarnation or too many slots is refused and changes nothing.
#[test]
fn register_node_refusals_change_nothing() {
    let mut fixture = Harness::new();
    fixture.register(NOW, 1, 5, 2);
    fixture.submit(NOW, vec![new_job("q", "noop", b"")]);
    fixture.assign(NOW, 1, 1, 5);
    let cases = [
        (
            "older incarnation",
            registration(1, 4, 2),
            Rejection::StaleIncarnation {
                node: 1,
                got: 4,
                current: 5,
            },
        ),
        (
            "too many slots",
            registration(1, 6, NODE_SLOTS_MAX + 1),
            Rejection::Invalid(format!(
                "slots must be at most {NODE_SLOTS_MAX}, got {}",
                NODE_SLOTS_MAX + 1
            )),
        ),
        (
            "too many slots for a new node",
            registration(2, 0, u32::MAX),
            Rejection::Invalid(format!(
                "slots must be at most {NODE_SLOTS_MAX}, got {}",
                u32::MAX
            )),
        ),
    ];
    for (name, command, why) in cases {
        let mut h = fixture.clone();
        let (response, effects) = h.apply(NOW, command);
        assert_eq!(response, Response::NodeRegistered(Err(why)), "{name}");
        assert_eq!(effects, vec![], "{name}");
        assert_eq!(h.table, fixture.table, "{name}");
    }
    let mut h = fixture.clone();
    assert_eq!(h.register(NOW, 2, 0, NODE_SLOTS_MAX), 0);
}

/// A one-attempt job whose node restarts under it again and again (every attempt abandoned)
/// never consumes an attempt and never becomes a dead letter; it finally succeeds.
#[test]
fn abandons_never_consume_attempts_or_kill_the_job() {
    let mut h = Harness::new();
    h.register(NOW, 1, 0, 1);
    h.submit(NOW, vec![job_with(|j| j.max_attempts = 1)]);
    let rounds = ABANDONS_RERUN_AT_ONCE + 8;
    let mut at = NOW;
    for incarnation in 0..u64::from(rounds) {
        at = at.max(h.job(1).run_at_ms);
        h.assign(at, 1, 1, incarnation);
        assert_eq!(h.register(at, 1, incarnation + 1, 1), 1);
        assert_eq!(h.job(1).status, JobStatus::Pending);
    }
    assert_eq!((h.job(1).abandoned, h.job(1).failures), (rounds, 0));
    at = at.max(h.job(1).run_at_ms);
    let token = h.assign(at, 1, 1, u64::from(rounds));
    h.complete(at, 1, token, succeeded(b"finally"));
    assert_eq!(h.job(1).status, JobStatus::Succeeded);
    assert_eq!(h.job(1).attempts.len(), rounds as usize + 1);
    assert_eq!(h.table.counts(), &counts(0, 0, 1, 0, 0));
}

/// A job its node gives back (fenced, drained past its deadline, not started without a lease)
/// runs again at once however often that happens: only a lost node (below) backs off.
#[test]
fn given_back_attempts_requeue_at_once_every_time() {
    let mut h = Harness::new();
    h.register(NOW, 1, 0, 1);
    h.submit(NOW, vec![job_with(|j| j.max_attempts = 1)]);
    for _ in 0..ABANDONS_RERUN_AT_ONCE * 3 {
        let token = h.assign(NOW, 1, 1, 0);
        let given_back = Outcome::Abandoned {
            reason: "lease lapsed".into(),
        };
        h.complete(NOW, 1, token, given_back);
        assert_eq!(h.job(1).status, JobStatus::Pending);
        assert_eq!(h.job(1).run_at_ms, NOW, "at once");
    }
    assert_eq!(
        (h.job(1).abandoned, h.job(1).failures),
        (ABANDONS_RERUN_AT_ONCE * 3, 0)
    );
}

/// When a job's node is lost under it (restarted, or its lease expired), the first
/// ABANDONS_RERUN_AT_ONCE abandons in a row requeue the job at once; each later one
/// waits the job's retry backoff (growing, jittered), never more than ABANDON_DELAY_MAX_MS; an
/// attempt that ends otherwise (here a retryable failure) starts the count again.
#[test]
fn repeated_abandons_back_off_up_to_a_cap() {
    let mut h = Harness::new();
    h.register(NOW, 1, 0, 1);
    h.submit(NOW, vec![job_with(|j| j.max_attempts = 5)]);
    let mut at = NOW;
    let mut incarnation = 0;
    // Runs job 1 on node 1 and restarts the node under it; returns the wait before the job is due.
    fn abandon(h: &mut Harness, at: u64, incarnation: &mut u64) -> u64 {
        h.assign(at, 1, 1, *incarnation);
        *incarnation += 1;
        h.register(at, 1, *incarnation, 1);
        h.job(1).run_at_ms - at
    }
    for _ in 0..ABANDONS_RERUN_AT_ONCE {
        assert_eq!(abandon(&mut h, at, &mut incarnation), 0, "at once");
    }
    let mut last = 0;
    for n in 1..=12u32 {
        let waited = abandon(&mut h, at, &mut incarnation);
        let ceiling = backoff_ceiling_ms(n, Backoff::default()).min(ABANDON_DELAY_MAX_MS);
        assert!(waited <= ceiling, "abandon {n}: {waited} > {ceiling}");
        assert!(waited >= ceiling / 2, "abandon {n}: {waited}");
        if ceiling < ABANDON_DELAY_MAX_MS {
            assert!(waited >= last, "abandon {n}: grows ({last} then {waited})");
        }
        last = waited;
        at += waited;
    }
    assert_eq!(h.job(1).status, JobStatus::Pending);
    // A real failure ends the streak: the next abandons are free again.
    let token = h.assign(at, 1, 1, incarnation);
    h.complete(at, 1, token, failed("flaky", true));
    at = h.job(1).run_at_ms;
    assert_eq!(abandon(&mut h, at, &mut incarnation), 0);
    assert_eq!(h.job(1).failures, 1);
}

// ----- time -----

/// An earlier stamp never moves time back: creation, due checks and backoff use the max.
#[test]
fn time_never_goes_backwards() {
    let mut h = Harness::new();
    assert_eq!(h.table.now_ms(), 0);
    h.register(NOW, 1, 1, 4);
    assert_eq!(h.table.now_ms(), NOW);

    // A job due at NOW - 10, submitted by a leader whose clock reads NOW - 500, is ready.
    h.submit(NOW - 500, vec![job_with(|j| j.run_at_ms = NOW - 10)]);
    assert_eq!(h.table.now_ms(), NOW);
    assert_eq!(h.job(1).created_at_ms, NOW);
    assert_eq!(h.table.ready_jobs().collect::<Vec<_>>(), vec![1]);

    // Assigning it with the old stamp is not refused as not due.
    let token = h.assign(NOW - 500, 1, 1, 1);
    assert_eq!(h.job(1).attempts[0].started_at_ms, NOW);

    // The backoff runs from the table's time, not the early stamp.
    h.complete(0, 1, token, failed("flaky", true));
    assert_eq!(h.table.now_ms(), NOW);
    assert_eq!(
        h.job(1).run_at_ms,
        NOW + retry_delay_ms(1, Backoff::default(), h.entropy, 1)
    );
    assert_eq!(h.job(1).updated_at_ms, NOW);

    h.apply(NOW + 7, Command::Submit(vec![]));
    assert_eq!(h.table.now_ms(), NOW + 7);
    h.apply(NOW + 3, Command::Assign(vec![]));
    assert_eq!(h.table.now_ms(), NOW + 7);
}

/// Empty batches are valid no-ops that still advance time.
#[test]
fn empty_batches_change_nothing_but_time() {
    let mut h = Harness::new();
    h.register(NOW, 1, 1, 1);
    let before = View::of(&h.table);
    for command in [
        Command::Submit(vec![]),
        Command::Assign(vec![]),
        Command::Complete(vec![]),
    ] {
        h.apply(NOW + 1, command);
    }
    assert_eq!(
        View::of(&h.table),
        View {
            now_ms: NOW + 1,
            ..before
        }
    );
}

/// A node that renews but does not apply the log (the leader dials an old address; a one-way
/// partition) loses its lease: a renewal counts only if the node has applied what was committed
/// `RENEW_APPLY_LAG_MAX_MS` before it. Within that window any lag is fine; catching up restores it.
#[test]
fn renewals_count_only_from_a_node_that_applies_the_log() {
    use exactly_core::limits::RENEW_APPLY_LAG_MAX_MS as LAG;
    let mut h = Harness::new();
    h.apply(NOW, registration(7, 1, 4));
    let registered_at = h.index;
    let lease = exactly_core::NodeLease {
        node: 7,
        incarnation: 1,
    };
    let renewal = |applied| Command::Renew(exactly_core::Renewal { lease, applied });
    // Young registration: nothing is old enough to be required yet.
    assert_eq!(h.apply(NOW + 500, renewal(0)).0, Response::Renewed(Ok(())));
    let first_renewal = h.index;
    // LAG after registering, the registration must have been applied.
    let (response, effects) = h.apply(NOW + LAG, renewal(registered_at - 1));
    assert_eq!(
        response,
        Response::Renewed(Err(Rejection::Lagging {
            node: 7,
            applied: registered_at - 1,
            needed: registered_at
        }))
    );
    assert!(effects.is_empty(), "a refused renewal is not announced");
    assert_eq!(h.table.nodes()[&7].renewed_at_ms, NOW + 500);
    assert_eq!(
        h.apply(NOW + LAG, renewal(registered_at)).0,
        Response::Renewed(Ok(()))
    );
    // Later the node must have applied the newest mark older than LAG (the first renewal).
    let later = NOW + 500 + LAG;
    assert!(matches!(
        h.apply(later, renewal(first_renewal - 1)).0,
        Response::Renewed(Err(Rejection::Lagging { needed, .. })) if needed == first_renewal
    ));
    assert_eq!(
        h.apply(later, renewal(first_renewal)).0,
        Response::Renewed(Ok(()))
    );
    // A long series of renewals keeps the marks bounded and still measures LAG back.
    let mut t = later;
    for _ in 0..1_000 {
        t += 10;
        let applied = h.index;
        assert_eq!(h.apply(t, renewal(applied)).0, Response::Renewed(Ok(())));
    }
    let marks = &h.table.nodes()[&7].renewal_marks;
    assert!(
        marks.len() <= exactly_core::limits::RENEW_MARKS_MAX,
        "{}",
        marks.len()
    );
    assert!(
        marks.front().unwrap().1 + LAG <= t,
        "the oldest mark spans the window"
    );
    // A new incarnation must have caught up too (a restarted node dialed at an old address).
    let lagging = Command::RegisterNode(exactly_core::NodeRegistration {
        node: 7,
        incarnation: 2,
        slots: 4,
        addr: "10.0.0.7:7000".into(),
        applied: 0,
    });
    let before = h.table.clone();
    assert!(matches!(
        h.apply(t + 1, lagging).0,
        Response::NodeRegistered(Err(Rejection::Lagging { applied: 0, .. }))
    ));
    assert_eq!(h.table.nodes(), before.nodes());
    // Caught up, it registers and starts over from its registration.
    h.apply(t + 1, registration(7, 2, 4));
    let fresh = exactly_core::NodeLease {
        node: 7,
        incarnation: 2,
    };
    assert_eq!(
        h.apply(
            t + 2,
            Command::Renew(exactly_core::Renewal {
                lease: fresh,
                applied: 0
            })
        )
        .0,
        Response::Renewed(Ok(()))
    );
}

/// A renewal of the current incarnation is recorded and announced; an unknown node, a stale
/// incarnation and an expired one are refused without changing anything.
#[test]
fn renewals_count_only_for_the_current_unexpired_incarnation() {
    let mut h = Harness::new();
    h.apply(NOW, registration(7, 3, 4));
    let lease = exactly_core::NodeLease {
        node: 7,
        incarnation: 3,
    };
    let (response, effects) = h.apply(NOW + 5, renew(lease));
    assert_eq!(response, Response::Renewed(Ok(())));
    assert_eq!(effects, vec![exactly_core::Effect::Renewed(lease)]);
    assert_eq!(h.table.nodes()[&7].renewed_at_ms, NOW + 5);

    let before = h.table.clone();
    let stale = exactly_core::NodeLease {
        node: 7,
        incarnation: 2,
    };
    let (response, effects) = h.apply(NOW + 6, renew(stale));
    assert!(matches!(
        response,
        Response::Renewed(Err(Rejection::StaleIncarnation { .. }))
    ));
    assert!(effects.is_empty());
    let unknown = exactly_core::NodeLease {
        node: 9,
        incarnation: 1,
    };
    let (response, _) = h.apply(NOW + 6, renew(unknown));
    assert_eq!(response, Response::Renewed(Err(Rejection::UnknownNode(9))));
    assert_eq!(h.table.nodes(), before.nodes());

    h.apply(NOW + 7, h.expiry(lease));
    let (response, effects) = h.apply(NOW + 8, renew(lease));
    assert_eq!(
        response,
        Response::Renewed(Err(Rejection::Expired {
            node: 7,
            incarnation: 3
        }))
    );
    assert!(effects.is_empty());
}

/// An expiry counted from a renewal older than the incarnation's newest is refused and changes
/// nothing: the leader decided before it had applied that renewal (committed while the Expire
/// was on its way), and the node, whose lease counts from the renewal's send time, may be running
/// attempts. Found by chaos seed 35: the job ran on the renewed node and on the node its expiry
/// requeued it to, at once. A re-registration of the same incarnation counts as a renewal.
#[test]
fn an_expiry_that_missed_a_renewal_is_refused() {
    let mut h = Harness::new();
    h.register(NOW, 7, 3, 4);
    let registered = h.index;
    h.submit(NOW, vec![new_job("q", "noop", b"a")]);
    let token = h.assign(NOW, 1, 7, 3);
    let lease = exactly_core::NodeLease {
        node: 7,
        incarnation: 3,
    };
    let counted_from = |renewed_index| {
        Command::Expire(exactly_core::Expiry {
            lease,
            renewed_index,
        })
    };
    h.apply(NOW + 500, renew(lease));
    let renewed = h.index;
    assert_eq!(h.table.nodes()[&7].renewed_index, renewed);

    let before = h.table.clone();
    let (response, effects) = h.apply(NOW + 500, counted_from(registered));
    assert_eq!(
        response,
        Response::Expired(Err(Rejection::RenewedSince {
            node: 7,
            incarnation: 3,
            counted_from: registered,
            renewed,
        }))
    );
    assert!(effects.is_empty());
    assert_eq!(h.table, before, "a refused expiry changes nothing");
    assert_eq!(h.job(1).current_attempt().map(|a| a.token), Some(token));
    // An index the node never renewed at (a forged or confused expiry) is refused too.
    assert!(matches!(
        h.apply(NOW + 500, counted_from(renewed + 1)).0,
        Response::Expired(Err(Rejection::RenewedSince { .. }))
    ));

    // The same incarnation registering again restarts the count as well.
    h.apply(NOW + 700, registration(7, 3, 4));
    let reregistered = h.index;
    assert!(matches!(
        h.apply(NOW + 800, counted_from(renewed)).0,
        Response::Expired(Err(Rejection::RenewedSince { .. }))
    ));

    // Counted from the newest, it applies.
    assert_eq!(
        h.apply(NOW + 900, counted_from(reregistered)).0,
        Response::Expired(Ok(1))
    );
    assert!(h.table.nodes()[&7].expired);
    assert_eq!(h.job(1).status, JobStatus::Pending);
}

/// Expiring a lease abandons that node's attempts (jobs requeued, payloads kept), refuses new
/// assignments to it and stale completions from it, and a newer incarnation clears the expiry.
#[test]
fn expiry_abandons_attempts_and_fences_the_incarnation() {
    let mut h = Harness::new();
    h.apply(NOW, registration(7, 3, 4));
    h.apply(NOW, registration(8, 1, 4));
    h.submit(
        NOW,
        vec![new_job("q", "noop", b"a"), new_job("q", "noop", b"b")],
    );
    let t1 = h.assign(NOW, 1, 7, 3);
    let lease = exactly_core::NodeLease {
        node: 7,
        incarnation: 3,
    };
    let (response, effects) = h.apply(NOW + 10, h.expiry(lease));
    assert_eq!(response, Response::Expired(Ok(1)));
    assert!(
        effects.is_empty(),
        "the payload stays: the job will run again"
    );
    assert_eq!(h.job(1).status, JobStatus::Pending);
    assert!(h.table.nodes()[&7].expired);
    assert_eq!(h.table.running_on(7), 0);
    // Expiring twice is a no-op.
    assert_eq!(
        h.apply(NOW + 11, h.expiry(lease)).0,
        Response::Expired(Ok(0))
    );
    // No new work for the expired incarnation.
    let (response, _) = h.apply(
        NOW + 12,
        Command::Assign(vec![exactly_core::Assignment {
            job: 2,
            node: 7,
            incarnation: 3,
        }]),
    );
    assert!(matches!(response, Response::Assigned { started: 0, .. }));
    // The scheduler does not plan for it either.
    let plan = exactly_core::plan_assignments(&h.table, NOW + 12, 10, &Default::default());
    assert!(plan.iter().all(|a| a.node == 8), "{plan:?}");
    // Its late completion is stale.
    let (response, _) = h.apply(
        NOW + 13,
        Command::Complete(vec![exactly_core::Completion {
            job: 1,
            token: t1,
            outcome: exactly_core::Outcome::Succeeded { result: vec![] },
        }]),
    );
    assert!(matches!(response, Response::Completed { accepted: 0, .. }));
    assert_eq!(h.table.counts().stale_completions, 1);
    // The job runs again elsewhere with a larger token.
    let t2 = h.assign(NOW + 14, 1, 8, 1);
    assert!(t2 > t1);
    // A newer incarnation of node 7 works again.
    h.apply(NOW + 15, registration(7, 4, 4));
    assert!(!h.table.nodes()[&7].expired);
    h.table.check_invariants().unwrap();
}

// ----- drain and removal -----

fn drain(node: u64, deadline_after_ms: u64) -> Command {
    drain_for(node, deadline_after_ms, exactly_core::LeaveReason::Drained)
}

fn remove(node: u64) -> Command {
    drain_for(node, 0, exactly_core::LeaveReason::Removed)
}

fn drain_for(node: u64, deadline_after_ms: u64, reason: exactly_core::LeaveReason) -> Command {
    Command::Drain(exactly_core::DrainNode {
        node,
        deadline_after_ms,
        reason,
    })
}

/// A drain marks the node leaving with its deadline in leader time: new assignments to it are
/// refused and not planned, its running attempt may still finish, the deadline counts as passed
/// once an entry's timestamp reaches it, and a later request moves the deadline but not `since`.
#[test]
fn drain_refuses_new_work_and_lets_running_attempts_finish() {
    let mut h = Harness::new();
    h.register(NOW, 7, 1, 4);
    h.register(NOW, 8, 1, 4);
    h.submit(NOW, vec![new_job("q", "noop", b""); 3]);
    let token = h.assign(NOW, 1, 7, 1);

    let (response, effects) = h.apply(NOW + 10, drain(7, 30_000));
    assert_eq!(response, Response::Draining(Ok(1)));
    assert_eq!(effects, vec![]);
    assert_eq!(
        h.table.leaving(7),
        Some(&exactly_core::Leave {
            since_ms: NOW + 10,
            deadline_ms: NOW + 30_010,
            reason: exactly_core::LeaveReason::Drained,
        })
    );
    assert!(!h.table.drain_deadline_passed(7));

    let (response, _) = h.apply(
        NOW + 11,
        Command::Assign(vec![assignment(2, 7, 1), assignment(3, 8, 1)]),
    );
    assert_eq!(
        response,
        Response::Assigned {
            started: 1,
            rejected: vec![(2, Rejection::Draining(7))],
        }
    );
    let plan = exactly_core::plan_assignments(&h.table, NOW + 11, 10, &Default::default());
    assert_eq!(plan, vec![assignment(2, 8, 1)]);

    h.complete(NOW + 12, 1, token, succeeded(b"done"));
    assert_eq!(h.job(1).status, JobStatus::Succeeded);
    assert_eq!(h.table.running_on(7), 0);

    // Time passes with other entries; the deadline passes at exactly its timestamp.
    h.apply(NOW + 30_009, Command::Submit(vec![]));
    assert!(!h.table.drain_deadline_passed(7));
    h.apply(NOW + 30_010, Command::Submit(vec![]));
    assert!(h.table.drain_deadline_passed(7));
    assert!(!h.table.drain_deadline_passed(8));

    // A removal keeps `since`, moves the deadline and strengthens the reason; a later drain
    // moves the deadline again but never weakens the reason.
    let (response, _) = h.apply(NOW + 30_020, remove(7));
    assert_eq!(response, Response::Draining(Ok(0)));
    assert_eq!(
        h.table.leaving(7),
        Some(&exactly_core::Leave {
            since_ms: NOW + 10,
            deadline_ms: NOW + 30_020,
            reason: exactly_core::LeaveReason::Removed,
        })
    );
    h.apply(NOW + 30_030, drain(7, 5));
    assert_eq!(
        h.table.leaving(7),
        Some(&exactly_core::Leave {
            since_ms: NOW + 10,
            deadline_ms: NOW + 30_035,
            reason: exactly_core::LeaveReason::Removed,
        })
    );
}

/// An attempt the node gives back (drained past its deadline) ends as abandoned: the job is
/// pending again at once, no failure is counted, and it runs again elsewhere with a larger token.
#[test]
fn abandoned_outcome_requeues_at_once_without_consuming_attempts() {
    let mut h = Harness::new();
    h.register(NOW, 7, 1, 4);
    h.register(NOW, 8, 1, 4);
    h.submit(NOW, vec![job_with(|j| j.max_attempts = 1)]);
    let t1 = h.assign(NOW, 1, 7, 1);
    h.apply(NOW + 1, drain(7, 0));
    let effects = h.complete(
        NOW + 2,
        1,
        t1,
        Outcome::Abandoned {
            reason: "drained".into(),
        },
    );
    assert_eq!(effects, vec![], "the payload stays: the job runs again");
    let job = h.job(1);
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!((job.failures, job.abandoned), (0, 1));
    assert_eq!(job.run_at_ms, NOW + 2);
    assert_eq!(job.last_error.as_deref(), Some("drained"));
    assert_eq!(
        job.attempts[0].end,
        Some(AttemptEnd::Abandoned {
            reason: "drained".into()
        })
    );
    assert_eq!(h.table.counts(), &counts(1, 0, 0, 0, 0));
    let t2 = h.assign(NOW + 3, 1, 8, 1);
    assert!(t2 > t1);
}

/// Leaving is refused (and changes nothing) while the node runs an attempt; once it runs
/// nothing, a removed node's entry and drain are dropped and its id is remembered: every later
/// registration, renewal, expiry, assignment, drain or departure for it is refused.
#[test]
fn removal_waits_for_running_attempts_and_refuses_the_node_forever() {
    let mut h = Harness::new();
    h.register(NOW, 7, 1, 4);
    h.register(NOW, 8, 1, 4);
    h.submit(NOW, vec![new_job("q", "noop", b""); 2]);
    let token = h.assign(NOW, 1, 7, 1);
    h.apply(
        NOW + 1,
        drain_for(7, 60_000, exactly_core::LeaveReason::Removed),
    );

    let before = View::of(&h.table);
    let (response, effects) = h.apply(NOW + 2, Command::NodeLeft(7));
    assert_eq!(
        response,
        Response::NodeLeft(Err(Rejection::Busy {
            node: 7,
            running: 1
        }))
    );
    assert_eq!(effects, vec![]);
    assert_eq!(
        View::of(&h.table),
        View {
            now_ms: NOW + 2,
            ..before
        }
    );

    h.complete(NOW + 3, 1, token, succeeded(b""));
    let (response, effects) = h.apply(NOW + 4, Command::NodeLeft(7));
    assert_eq!(response, Response::NodeLeft(Ok(())));
    assert_eq!(effects, vec![]);
    assert!(!h.table.nodes().contains_key(&7));
    assert_eq!(h.table.leaving(7), None);
    assert!(h.table.is_removed(7));
    assert_eq!(
        h.table.removed_nodes(),
        &std::collections::BTreeMap::from([(7, NOW + 4)])
    );

    let before = h.table.clone();
    assert_eq!(
        h.apply(NOW + 4, registration(7, 2, 4)).0,
        Response::NodeRegistered(Err(Rejection::Removed(7)))
    );
    let lease = exactly_core::NodeLease {
        node: 7,
        incarnation: 1,
    };
    assert_eq!(
        h.apply(NOW + 4, renew(lease)).0,
        Response::Renewed(Err(Rejection::Removed(7)))
    );
    assert_eq!(
        h.apply(NOW + 4, h.expiry(lease)).0,
        Response::Expired(Err(Rejection::Removed(7)))
    );
    assert_eq!(
        h.apply(NOW + 4, Command::Assign(vec![assignment(2, 7, 1)]))
            .0,
        Response::Assigned {
            started: 0,
            rejected: vec![(2, Rejection::Removed(7))],
        }
    );
    assert_eq!(
        h.apply(NOW + 4, drain(7, 0)).0,
        Response::Draining(Err(Rejection::Removed(7)))
    );
    assert_eq!(
        h.apply(NOW + 4, Command::NodeLeft(7)).0,
        Response::NodeLeft(Err(Rejection::Removed(7)))
    );
    assert_eq!(h.table, before, "refusals change nothing");
    let plan = exactly_core::plan_assignments(&h.table, NOW + 4, 10, &Default::default());
    assert_eq!(plan, vec![assignment(2, 8, 1)]);
}

/// A dead node is removed after its lease expired (the expiry, not the removal, gives its
/// attempts back), and a node that never registered (a learner that died at once) can be
/// drained and removed too.
#[test]
fn expired_and_unregistered_nodes_can_be_removed() {
    let mut h = Harness::new();
    h.register(NOW, 7, 1, 4);
    h.submit(NOW, vec![new_job("q", "noop", b"")]);
    h.assign(NOW, 1, 7, 1);
    h.apply(NOW + 1, remove(7));
    assert!(matches!(
        h.apply(NOW + 2, Command::NodeLeft(7)).0,
        Response::NodeLeft(Err(Rejection::Busy { .. }))
    ));
    let lease = exactly_core::NodeLease {
        node: 7,
        incarnation: 1,
    };
    assert_eq!(
        h.apply(NOW + 6_000, h.expiry(lease)).0,
        Response::Expired(Ok(1))
    );
    assert_eq!(h.job(1).status, JobStatus::Pending);
    assert_eq!(
        h.apply(NOW + 6_001, Command::NodeLeft(7)).0,
        Response::NodeLeft(Ok(()))
    );

    assert_eq!(h.apply(NOW + 6_002, remove(9)).0, Response::Draining(Ok(0)));
    assert_eq!(
        h.apply(NOW + 6_003, Command::NodeLeft(9)).0,
        Response::NodeLeft(Ok(()))
    );
    assert_eq!(
        h.table.removed_nodes().keys().copied().collect::<Vec<_>>(),
        vec![7, 9]
    );
}

/// At most NODES_LEAVING_MAX nodes may be leaving at once; a node already leaving may still
/// have its drain moved, and a refused drain changes nothing.
#[test]
fn leaving_nodes_are_bounded() {
    use exactly_core::limits::NODES_LEAVING_MAX;
    let mut h = Harness::new();
    for node in 1..=NODES_LEAVING_MAX as u64 {
        assert_eq!(
            h.apply(NOW, drain(node, 1_000)).0,
            Response::Draining(Ok(0))
        );
    }
    let before = h.table.clone();
    assert_eq!(
        h.apply(NOW, drain(1_000, 0)).0,
        Response::Draining(Err(Rejection::TooManyLeaving {
            got: NODES_LEAVING_MAX,
            max: NODES_LEAVING_MAX,
        }))
    );
    assert_eq!(h.table, before);
    assert_eq!(h.apply(NOW + 1, drain(1, 0)).0, Response::Draining(Ok(0)));
    assert_eq!(h.table.leaving(1).map(|l| l.deadline_ms), Some(NOW + 1));
}

/// A node that drained itself to stop (SIGTERM) and starts again (a newer incarnation registers)
/// stays; an operator's drain survives a restart. A node that left without being removed is
/// forgotten, not banned: it registers again as new, and a departure of a node that is not
/// leaving is refused.
#[test]
fn stopping_nodes_that_restart_stay_and_drained_nodes_may_return() {
    use exactly_core::LeaveReason;
    let mut h = Harness::new();
    h.register(NOW, 7, 1, 4);
    h.register(NOW, 8, 1, 4);
    h.apply(NOW + 1, drain_for(7, 20_000, LeaveReason::Stopping));
    h.apply(NOW + 1, drain_for(8, 20_000, LeaveReason::Drained));
    // The same incarnation again (a repeated registration) does not end the drain.
    h.register(NOW + 2, 7, 1, 4);
    assert!(h.table.leaving(7).is_some());
    h.register(NOW + 3, 7, 2, 4);
    h.register(NOW + 3, 8, 2, 4);
    assert_eq!(
        h.table.leaving(7),
        None,
        "a stopping node that restarted stays"
    );
    assert!(
        h.table.leaving(8).is_some(),
        "an operator's drain survives a restart"
    );

    assert_eq!(
        h.apply(NOW + 4, Command::NodeLeft(7)).0,
        Response::NodeLeft(Err(Rejection::NotLeaving(7)))
    );
    assert_eq!(
        h.apply(NOW + 5, Command::NodeLeft(8)).0,
        Response::NodeLeft(Ok(()))
    );
    assert!(!h.table.nodes().contains_key(&8));
    assert!(!h.table.is_removed(8));
    assert_eq!(h.register(NOW + 6, 8, 3, 4), 0);
    assert!(h.table.nodes().contains_key(&8));
    assert_eq!(h.table.leaving(8), None);
}

// ----- group commit -----

/// Several clients' Submits in one entry: each group is all or nothing on its own (a bad job
/// refuses only its own group), groups apply in order (a key repeated in a later group finds the
/// earlier group's job), and a command over the limits creates nothing.
#[test]
fn submit_groups_are_independent_all_or_nothing_batches() {
    let mut h = Harness::new();
    let keyed = job_with(|j| j.idempotency_key = Some("k".into()));
    let bad = job_with(|j| j.kind = String::new());
    let (response, _) = h.apply(
        NOW,
        Command::SubmitGroups(vec![
            vec![new_job("q", "noop", b"a"), keyed.clone()],
            vec![new_job("q", "noop", b"b"), bad],
            vec![keyed],
        ]),
    );
    let Response::SubmittedGroups(groups) = response else {
        panic!("{response:?}")
    };
    assert_eq!(groups.len(), 3);
    assert_eq!(
        groups[0],
        vec![Ok(Submitted::new(1)), Ok(Submitted::new(2))],
        "the first group is created"
    );
    assert!(
        groups[1]
            .iter()
            .all(|r| matches!(r, Err(Rejection::BatchRejected | Rejection::Invalid(_)))),
        "{:?}",
        groups[1]
    );
    assert_eq!(
        groups[2],
        vec![Ok(Submitted {
            id: 2,
            existing: true
        })],
        "a key of an earlier group in the same entry is found"
    );
    assert_eq!(h.table.counts().pending, 2);

    let before = h.table.clone();
    let too_many = vec![vec![new_job("q", "noop", b""); SUBMIT_BATCH_JOBS_MAX]; 5];
    let (response, effects) = h.apply(NOW, Command::SubmitGroups(too_many));
    let Response::SubmittedGroups(groups) = response else {
        panic!("{response:?}")
    };
    assert!(groups
        .iter()
        .flatten()
        .all(|r| matches!(r, Err(Rejection::BatchTooLarge { .. }))));
    assert_eq!(effects, vec![]);
    assert_eq!(h.table, before);
}

/// The leader's group commit starts attempts in the submit's own entry: the groups apply as in
/// `SubmitGroups`, then the scheduling policy runs on the result over every pending job (older
/// ones first, whatever their entry), at this entry's index as the fencing token, skipping the
/// excluded nodes; with too many excluded ids nothing is assigned, and the submit still applies.
#[test]
fn submit_assign_starts_attempts_in_the_submits_entry() {
    let mut h = Harness::new();
    h.apply(NOW, registration(1, 1, 2));
    h.apply(NOW, registration(2, 1, 8));
    // An older pending job (submitted while nothing was assigned) goes first.
    h.apply(NOW, Command::Submit(vec![new_job("q", "noop", b"old")]));
    let excluded: std::collections::BTreeSet<u64> = [2].into();
    let (response, effects) = h.apply(
        NOW + 1,
        Command::SubmitAssign {
            groups: vec![
                vec![new_job("q", "noop", b"a")],
                vec![job_with(|j| j.kind = String::new())],
                vec![new_job("q", "noop", b"b")],
            ],
            excluded,
        },
    );
    let Response::SubmittedGroups(groups) = response else {
        panic!("{response:?}")
    };
    assert_eq!(groups[0], vec![Ok(Submitted::new(2))]);
    assert!(matches!(groups[1][..], [Err(Rejection::Invalid(_))]));
    assert_eq!(groups[2], vec![Ok(Submitted::new(3))]);
    let index = h.index;
    let starts: Vec<(u64, u64, u64)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Start(s) => Some((s.job, s.node, s.token)),
            _ => None,
        })
        .collect();
    // Node 2 is excluded and node 1 has two slots: the two oldest jobs start there.
    assert_eq!(starts, vec![(1, 1, index), (2, 1, index)]);
    assert_eq!(h.job(1).status, JobStatus::Running);
    assert_eq!(h.job(2).status, JobStatus::Running);
    assert_eq!(h.job(3).status, JobStatus::Pending);
    assert_eq!(h.table.counts(), &counts(1, 2, 0, 0, 0));

    // Too many excluded ids: the submit applies, nothing starts.
    let excluded: std::collections::BTreeSet<u64> =
        (100..100 + exactly_core::limits::ASSIGN_EXCLUDED_MAX as u64 + 1).collect();
    let (response, effects) = h.apply(
        NOW + 2,
        Command::SubmitAssign {
            groups: vec![vec![new_job("q", "noop", b"c")]],
            excluded,
        },
    );
    assert_eq!(
        response,
        Response::SubmittedGroups(vec![vec![Ok(Submitted::new(4))]])
    );
    assert!(!effects.iter().any(|e| matches!(e, Effect::Start(_))));
    assert_eq!(h.table.counts(), &counts(2, 2, 0, 0, 0));

    // With no exclusion node 2 takes the rest.
    let (_, effects) = h.apply(
        NOW + 3,
        Command::SubmitAssign {
            groups: vec![vec![new_job("q", "noop", b"d")]],
            excluded: Default::default(),
        },
    );
    let started: Vec<(u64, u64)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Start(s) => Some((s.job, s.node)),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![(3, 2), (4, 2), (5, 2)]);
    assert_eq!(h.table.counts(), &counts(0, 5, 0, 0, 0));
}

/// A `Batch` entry applies its commands in order, each as its own entry at the batch's index
/// (its attempts take that index as their token), with one response each; a second attempt of
/// one job in the same entry is refused (its token would not be larger); an oversized or nested
/// batch applies nothing.
#[test]
fn a_batch_applies_each_command_as_its_own_entry() {
    let mut h = Harness::new();
    h.apply(NOW, registration(1, 1, 4));
    let (response, effects) = h.apply(
        NOW,
        Command::Batch(vec![
            Command::Submit(vec![new_job("q", "noop", b"a")]),
            Command::Submit(vec![job_with(|j| j.kind = String::new())]),
            Command::Assign(vec![assignment(1, 1, 1)]),
        ]),
    );
    let index = h.index;
    let Response::Batch(Ok(responses)) = response else {
        panic!("{response:?}")
    };
    assert_eq!(responses.len(), 3);
    assert_eq!(
        responses[0],
        Response::Submitted(vec![Ok(Submitted::new(1))])
    );
    assert!(matches!(&responses[1], Response::Submitted(r) if r[0].is_err()));
    assert_eq!(
        responses[2],
        Response::Assigned {
            started: 1,
            rejected: vec![]
        }
    );
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::Start(s) if s.job == 1 && s.token == index)));

    // The attempt is abandoned (its node restarts) and assigned again in the same entry: the
    // second start would reuse the token, so it is refused.
    let (response, _) = h.apply(
        NOW + 1,
        Command::Batch(vec![
            registration(1, 2, 4),
            Command::Assign(vec![assignment(1, 1, 2)]),
            Command::Assign(vec![assignment(1, 1, 2)]),
        ]),
    );
    let Response::Batch(Ok(responses)) = response else {
        panic!("{response:?}")
    };
    assert_eq!(
        responses[1],
        Response::Assigned {
            started: 1,
            rejected: vec![]
        },
        "the requeued job starts again"
    );
    assert!(
        matches!(&responses[2], Response::Assigned { started: 0, rejected } if rejected.len() == 1),
        "{:?}",
        responses[2]
    );

    // A refused entry still moves the clock, as every entry does; nothing else changes.
    h.apply(NOW + 2, Command::Cancel(vec![]));
    let before = h.table.clone();
    let nested = Command::Batch(vec![Command::Batch(vec![])]);
    let (response, effects) = h.apply(NOW + 2, nested);
    assert!(matches!(
        response,
        Response::Batch(Err(Rejection::Invalid(_)))
    ));
    let too_many = Command::Batch(vec![
        Command::Cancel(vec![]);
        exactly_core::limits::BATCH_COMMANDS_MAX + 1
    ]);
    let (response2, effects2) = h.apply(NOW + 2, too_many);
    assert!(matches!(
        response2,
        Response::Batch(Err(Rejection::BatchTooLarge { .. }))
    ));
    assert!(effects.is_empty() && effects2.is_empty());
    assert_eq!(h.table, before);
}

fn audited(by: &str, command: Command) -> Command {
    Command::Audited(Box::new(exactly_core::Audited {
        by: by.into(),
        command,
    }))
}

/// An operator's write is applied exactly as its command and recorded with the credential's
/// name, what it asked and what came of it; a refused one is recorded as refused. An audited
/// wrapper around anything but an operator's command, or with a name that is empty, too long or
/// not printable, is refused whole: nothing changes, not even the trail.
#[test]
fn audited_writes_are_applied_and_recorded() {
    let mut h = Harness::new();
    let ids = h.submit(
        NOW,
        vec![new_job("q", "noop", b"a"), new_job("q", "noop", b"b")],
    );
    let (response, _) = h.apply(NOW + 10, audited("ops", Command::Cancel(ids.clone())));
    assert!(
        matches!(&response, Response::Cancelled(r) if r.len() == 2 && r.iter().all(|(_, r)| r.is_ok()))
    );
    let cancelled_at = h.index;
    let purge_nothing = exactly_core::DeadFilter {
        ids: vec![],
        queue: None,
        kind: None,
        max: 10,
        all: false,
    };
    let (response, _) = h.apply(NOW + 20, audited("root", Command::PurgeDead(purge_nothing)));
    assert!(
        matches!(response, Response::PurgedDead(Err(_))),
        "{response:?}"
    );
    let trail: Vec<_> = h.table.audit().iter().cloned().collect();
    assert_eq!(trail.len(), 2);
    assert_eq!(trail[0].index, cancelled_at);
    assert_eq!(trail[0].at_ms, NOW + 10);
    assert_eq!(trail[0].by, "ops");
    assert_eq!(trail[0].action, "cancel jobs 1, 2");
    assert_eq!(trail[0].outcome, "2 of 2 cancelled");
    assert_eq!(trail[1].by, "root");
    assert!(trail[1].outcome.starts_with("refused: "), "{:?}", trail[1]);

    let before = h.table.clone();
    let renewal = renew(exactly_core::NodeLease {
        node: 7,
        incarnation: 1,
    });
    for (bad, says) in [
        (audited("ops", renewal), "not Renew"),
        (
            audited("ops", audited("ops", Command::Cancel(vec![1]))),
            "not Audited",
        ),
        (audited("", Command::Cancel(vec![1])), "name"),
        (audited("two words", Command::Cancel(vec![1])), "name"),
        (audited("esc\u{1b}", Command::Cancel(vec![1])), "name"),
        (audited(&"x".repeat(65), Command::Cancel(vec![1])), "name"),
    ] {
        match h.apply(NOW + 20, bad).0 {
            Response::Refused(Rejection::Invalid(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(h.table, before, "a refused audited command changes nothing");
    }
}

/// The trail keeps the newest `AUDIT_RECORDS_MAX` records.
#[test]
fn the_audit_trail_is_bounded() {
    let mut h = Harness::new();
    let max = exactly_core::limits::AUDIT_RECORDS_MAX;
    for i in 0..max + 5 {
        let pause = Command::ConfigureQueue {
            queue: "q".into(),
            patch: exactly_core::QueuePatch {
                paused: Some(i % 2 == 0),
                ..Default::default()
            },
        };
        h.apply(NOW, audited("ops", pause));
    }
    let trail = h.table.audit();
    assert_eq!(trail.len(), max);
    assert_eq!(
        trail.back().map(|r| r.action.as_str()),
        Some("configure queue \"q\": pause")
    );
    assert_eq!(trail.front().map(|r| r.index), Some(6));
    assert_eq!(trail.back().map(|r| r.index), Some(h.index));
}

/// An entry that applies nothing (an empty batch, or one refused whole) still moves the clock,
/// and a delayed job it makes due is ready at once. Found by the `apply` fuzz target: the
/// scheduling indexes disagreed with the records until the next command (the harness checks
/// every invariant after each entry).
#[test]
fn an_entry_that_applies_nothing_still_makes_delayed_jobs_ready() {
    let mut h = Harness::new();
    let mut job = new_job("q", "noop", b"a");
    job.run_at_ms = NOW + 1_000;
    h.submit(NOW, vec![job]);
    assert_eq!(h.table.ready_entries("q").count(), 0);
    h.apply(NOW + 5_000, Command::Batch(vec![]));
    assert_eq!(h.table.ready_entries("q").count(), 1);
    let too_many = Command::Batch(vec![
        Command::Cancel(vec![]);
        exactly_core::limits::BATCH_COMMANDS_MAX + 1
    ]);
    let mut later = new_job("q", "noop", b"b");
    later.run_at_ms = NOW + 6_000;
    h.submit(NOW + 5_000, vec![later]);
    h.apply(NOW + 7_000, too_many);
    assert_eq!(h.table.ready_entries("q").count(), 2);
}
