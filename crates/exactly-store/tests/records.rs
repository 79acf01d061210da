//! The job table's records on sled ([`SledRecords`]) against the in-memory model
//! ([`MemRecords`]): the same operations read the same, uncommitted writes are lost with the
//! process and committed ones are not, and a whole job table applies the same way on either.

use std::collections::BTreeMap;

use exactly_core::records::{MemRecords, Records, Space};
use exactly_core::{
    plan_assignments, Command, Completion, DeadFilter, Effect, JobTable, NewJob, NodeRegistration,
    Outcome, Request, Response, Retention,
};
use exactly_store::SledRecords;
use proptest::prelude::*;

fn tree(dir: &tempfile::TempDir) -> sled::Tree {
    let db = sled::Config::new()
        .path(dir.path().join("sled"))
        .open()
        .expect("sled opens");
    db.open_tree("state").expect("tree opens")
}

#[derive(Clone, Debug)]
enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
    Commit,
    /// The process stops without committing: a new `SledRecords` over the same tree.
    Reopen,
}

fn space() -> impl Strategy<Value = Space> {
    prop_oneof![
        Just(Space::Jobs),
        Just(Space::Keys),
        Just(Space::Ready),
        Just(Space::Archived),
    ]
}

/// Short keys over a small alphabet, so that writes meet each other and scans cross them.
fn key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![Just(0u8), Just(1), Just(7), Just(255)], 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (space(), key(), proptest::collection::vec(any::<u8>(), 0..3))
            .prop_map(|(s, k, v)| Op::Put(s, k, v)),
        3 => (space(), key()).prop_map(|(s, k)| Op::Delete(s, k)),
        1 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

fn same(sled: &SledRecords, model: &MemRecords, probes: &[Vec<u8>]) -> Result<(), TestCaseError> {
    for space in Space::ALL {
        let all: Vec<_> = sled.scan_from(space, &[]).collect();
        prop_assert_eq!(
            &all,
            &model.scan_from(space, &[]).collect::<Vec<_>>(),
            "{:?}",
            space
        );
        let back: Vec<_> = sled.scan_back(space).collect();
        prop_assert_eq!(&back, &model.scan_back(space).collect::<Vec<_>>());
        prop_assert_eq!(sled.count(space), model.count(space));
        for probe in probes {
            prop_assert_eq!(sled.get(space, probe), model.get(space, probe));
            let from: Vec<_> = sled.scan_from(space, probe).collect();
            prop_assert_eq!(from, model.scan_from(space, probe).collect::<Vec<_>>());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sled_records_read_as_the_model_and_keep_what_was_committed(
        ops in proptest::collection::vec(op(), 1..80),
        probes in proptest::collection::vec(key(), 1..6),
        chunk_bytes in chunk_bytes(),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let tree = tree(&dir);
        let mut sled = SledRecords::with_chunk_bytes(tree.clone(), chunk_bytes);
        let mut model = MemRecords::default();
        let mut committed = MemRecords::default();
        for op in ops {
            match op {
                Op::Put(space, key, value) => {
                    sled.put(space, &key, &value);
                    model.put(space, &key, &value);
                }
                Op::Delete(space, key) => {
                    sled.delete(space, &key);
                    model.delete(space, &key);
                }
                Op::Commit => {
                    sled.commit(sled::Batch::default()).expect("commit");
                    prop_assert_eq!(sled.uncommitted(), 0);
                    committed = model.clone();
                }
                Op::Reopen => {
                    sled = SledRecords::with_chunk_bytes(tree.clone(), chunk_bytes);
                    model = committed.clone();
                }
            }
            same(&sled, &model, &probes)?;
        }
    }

    #[test]
    fn a_tree_filled_in_key_order_reads_as_the_model(
        ops in proptest::collection::vec(op(), 0..80),
        probes in proptest::collection::vec(key(), 1..6),
        chunk_bytes in chunk_bytes(),
    ) {
        let mut model = MemRecords::default();
        for op in ops {
            match op {
                Op::Put(space, key, value) => model.put(space, &key, &value),
                Op::Delete(space, key) => model.delete(space, &key),
                Op::Commit | Op::Reopen => {}
            }
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let tree = tree(&dir);
        let mut sled = SledRecords::with_chunk_bytes(tree.clone(), chunk_bytes);
        sled.fill(full_records(&model).into_iter().map(Ok)).expect("fill");
        same(&sled, &model, &probes)?;
        let reopened = SledRecords::new(tree);
        same(&reopened, &model, &probes)?;
    }
}

/// Chunk sizes from one record per chunk to a few to all of them in one.
fn chunk_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(12),
        Just(30),
        Just(exactly_store::CHUNK_BYTES_MAX)
    ]
}

/// A small deterministic generator (xorshift64*), so the workload below is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random but valid command for `table`'s current state: submits (with keys, ordering keys,
/// priorities, delays), assignments the policy plans, completions of running jobs (successes,
/// retryable and permanent failures), cancels, redrives and retention passes.
fn command(rng: &mut Rng, table: &JobTable, now_ms: u64) -> Command {
    match rng.below(10) {
        0..=3 => {
            let n = 1 + rng.below(5);
            Command::Submit(
                (0..n)
                    .map(|_| NewJob {
                        queue: format!("q{}", rng.below(3)),
                        kind: "noop".into(),
                        payload: vec![rng.below(256) as u8; rng.below(4) as usize],
                        priority: rng.below(3) as i32 - 1,
                        max_attempts: 1 + rng.below(3) as u32,
                        run_at_ms: if rng.below(4) == 0 {
                            now_ms + rng.below(2_000)
                        } else {
                            0
                        },
                        idempotency_key: (rng.below(3) == 0)
                            .then(|| format!("key-{}", rng.below(40))),
                        ordering_key: (rng.below(4) == 0).then(|| format!("o{}", rng.below(2))),
                        ..NewJob::default()
                    })
                    .collect(),
            )
        }
        4 | 5 => Command::Assign(plan_assignments(table, now_ms, 8, &Default::default())),
        6 | 7 => {
            let mut running: Vec<_> = table.jobs_running_on(1).collect();
            running.retain(|_| rng.below(2) == 0);
            Command::Complete(
                running
                    .iter()
                    .map(|job| Completion {
                        job: job.id,
                        token: job.attempts.last().map_or(0, |a| a.token),
                        outcome: match rng.below(4) {
                            0 => Outcome::Failed {
                                error: "no".into(),
                                retryable: true,
                            },
                            1 => Outcome::Failed {
                                error: "never".into(),
                                retryable: false,
                            },
                            _ => Outcome::Succeeded {
                                result: b"ok".to_vec(),
                            },
                        },
                    })
                    .collect(),
            )
        }
        8 => match rng.below(3) {
            0 => Command::Cancel(vec![1 + rng.below(table.jobs().count() as u64 + 5)]),
            1 => Command::Redrive(DeadFilter {
                max: 3,
                all: true,
                ..DeadFilter::default()
            }),
            _ => Command::PurgeDead(DeadFilter {
                max: 2,
                all: true,
                ..DeadFilter::default()
            }),
        },
        _ => Command::Retain(Retention {
            finished_before_ms: now_ms.saturating_sub(3_000),
            dead_before_ms: now_ms.saturating_sub(6_000),
            keys_before_ms: now_ms.saturating_sub(4_000),
            max: 5,
        }),
    }
}

/// What apply hands the shell, without the parts a shell derives from elsewhere.
fn shell_view(effects: &[Effect]) -> String {
    format!("{effects:?}")
}

#[test]
fn a_table_on_sled_applies_exactly_as_the_table_in_memory() {
    table_on_sled_against_memory(exactly_store::CHUNK_BYTES_MAX);
}

/// The same with chunks of a few records, which split and empty all the time.
#[test]
fn a_table_on_sled_in_small_chunks_applies_exactly_as_the_table_in_memory() {
    table_on_sled_against_memory(64);
}

fn table_on_sled_against_memory(chunk_bytes: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut on_sled =
        JobTable::with_records(SledRecords::with_chunk_bytes(tree(&dir), chunk_bytes));
    let mut in_memory = JobTable::new();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut now_ms = 1_000_000;
    let register = Command::RegisterNode(NodeRegistration {
        node: 1,
        incarnation: 1,
        slots: 16,
        addr: "127.0.0.1:7000".into(),
        applied: u64::MAX,
    });
    let mut finished_seen = 0;
    for index in 1..=1_500u64 {
        now_ms += rng.below(200);
        let command = if index == 1 {
            register.clone()
        } else {
            command(&mut rng, &in_memory, now_ms)
        };
        let request = Request {
            now_ms,
            entropy: rng.next(),
            command,
        };
        let (response_mem, effects_mem) = in_memory.apply(index, request.clone());
        let (response_sled, effects_sled) = on_sled.apply(index, request);
        assert_eq!(response_sled, response_mem, "entry {index}");
        assert_eq!(
            shell_view(&effects_sled),
            shell_view(&effects_mem),
            "entry {index}"
        );
        // Half the time the entries of two apply calls share one commit, as openraft's apply
        // hands over several at once.
        if rng.below(2) == 0 {
            on_sled
                .records_mut()
                .commit(sled::Batch::default())
                .expect("commit");
        }
        on_sled
            .check_invariants()
            .unwrap_or_else(|e| panic!("entry {index}: {e}"));
        for space in Space::ALL {
            assert!(
                on_sled
                    .records()
                    .scan_from(space, &[])
                    .eq(in_memory.records().scan_from(space, &[])),
                "entry {index}: {space:?} differs"
            );
        }
        assert_eq!(on_sled.counts(), in_memory.counts(), "entry {index}");
        assert_eq!(on_sled.queues(), in_memory.queues(), "entry {index}");
        if let Response::Completed { accepted, .. } = response_mem {
            finished_seen += accepted;
        }
    }
    // A restart: the head and the committed records make the same table again.
    let head = on_sled.head();
    on_sled
        .records_mut()
        .commit(sled::Batch::default())
        .expect("commit");
    drop(on_sled);
    let again = JobTable::from_parts(head, SledRecords::new(tree(&dir)));
    again.check_invariants().expect("the restarted table holds");
    assert_eq!(again.head(), in_memory.head());
    for space in Space::ALL {
        assert!(
            again
                .records()
                .scan_from(space, &[])
                .eq(in_memory.records().scan_from(space, &[])),
            "after the restart, {space:?} differs"
        );
    }
    let rebuilt = JobTable::from_parts(in_memory.head(), in_memory.records().clone());
    assert_eq!(rebuilt, in_memory);

    // The workload reached every part: jobs finished, died, were retained and forgotten.
    let counts = in_memory.counts();
    assert!(finished_seen > 100, "{finished_seen} completions accepted");
    assert!(counts.succeeded > 0 && counts.dead > 0, "{counts:?}");
    assert!(in_memory.finished_jobs().count() > 0);
    let ids: BTreeMap<_, _> = in_memory.jobs().map(|j| (j.id, j.status)).collect();
    assert!(ids.len() > 10, "{} jobs left", ids.len());
}

/// Every record of `model` as a captured view returns them: full keys (space byte first).
fn full_records(model: &MemRecords) -> Vec<(Vec<u8>, Vec<u8>)> {
    Space::ALL
        .into_iter()
        .flat_map(|space| {
            model
                .scan_from(space, &[])
                .map(move |(k, v)| ([&[space as u8][..], &k].concat(), v))
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

#[derive(Clone, Debug)]
enum Step {
    Write(Op),
    /// The reader takes this many records.
    Read(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => op().prop_filter("no restarts during a capture", |o| !matches!(o, Op::Reopen))
            .prop_map(Step::Write),
        1 => (1usize..4).prop_map(Step::Read),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_captured_view_reads_the_records_as_they_were_whatever_is_committed_meanwhile(
        before in proptest::collection::vec(op(), 0..40),
        during in proptest::collection::vec(step(), 0..80),
        chunk_bytes in chunk_bytes(),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let tree = tree(&dir);
        let db = sled::Config::new()
            .path(dir.path().join("saved"))
            .open()
            .expect("sled opens");
        let mut sled = SledRecords::with_chunk_bytes(tree.clone(), chunk_bytes);
        let mut model = MemRecords::default();
        for op in before {
            match op {
                Op::Put(space, key, value) => {
                    sled.put(space, &key, &value);
                    model.put(space, &key, &value);
                }
                Op::Delete(space, key) => {
                    sled.delete(space, &key);
                    model.delete(space, &key);
                }
                Op::Commit | Op::Reopen => {}
            }
        }
        sled.commit(sled::Batch::default()).expect("commit");
        let expected = full_records(&model);
        let mut view = sled
            .capture(db.open_tree("saved").expect("tree"))
            .expect("capture");
        let mut read = Vec::new();
        for step in during {
            match step {
                Step::Write(Op::Put(space, key, value)) => sled.put(space, &key, &value),
                Step::Write(Op::Delete(space, key)) => sled.delete(space, &key),
                Step::Write(_) => sled.commit(sled::Batch::default()).expect("commit"),
                Step::Read(n) => {
                    for _ in 0..n {
                        if let Some(record) = view.next_record().expect("read") {
                            read.push(record);
                        }
                    }
                }
            }
        }
        sled.commit(sled::Batch::default()).expect("commit");
        while let Some(record) = view.next_record().expect("read") {
            read.push(record);
        }
        prop_assert_eq!(read, expected);
    }
}

#[test]
fn a_captured_view_holds_while_another_thread_commits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = tree(&dir);
    let db = sled::Config::new()
        .path(dir.path().join("saved"))
        .open()
        .expect("sled opens");
    // About 4 records per chunk: writes split and remove chunks ahead of the reader and behind.
    let mut sled = SledRecords::with_chunk_bytes(tree, 100);
    let mut model = MemRecords::default();
    for i in 0..2_000u64 {
        let key = (i * 7 % 2_000).to_be_bytes();
        sled.put(Space::Jobs, &key, &i.to_be_bytes());
        model.put(Space::Jobs, &key, &i.to_be_bytes());
    }
    sled.commit(sled::Batch::default()).expect("commit");
    let expected = full_records(&model);
    let mut view = sled
        .capture(db.open_tree("saved").expect("tree"))
        .expect("capture");
    let writer = std::thread::spawn(move || {
        let mut rng = Rng(99);
        for round in 0..200u64 {
            for _ in 0..20 {
                let key = rng.below(2_500).to_be_bytes();
                if rng.below(3) == 0 {
                    sled.delete(Space::Jobs, &key);
                } else {
                    sled.put(Space::Jobs, &key, &round.to_be_bytes());
                }
            }
            sled.commit(sled::Batch::default()).expect("commit");
        }
        sled
    });
    let mut read = Vec::new();
    while let Some(record) = view.next_record().expect("read") {
        read.push(record);
    }
    let sled = writer.join().expect("writer");
    assert_eq!(read.len(), expected.len());
    assert_eq!(read, expected);
    // The writes went on: the tree moved past the view.
    assert_ne!(
        sled.scan_from(Space::Jobs, &[]).collect::<Vec<_>>(),
        model.scan_from(Space::Jobs, &[]).collect::<Vec<_>>()
    );
}

/// A commit larger than one sled batch writes every record in batches and sets its mark last;
/// a small one writes its records and the mark in one batch. Either way the tree then holds
/// exactly the model's records and the mark.
#[test]
fn a_marked_commit_of_many_writes_lands_whole_with_its_mark() {
    let dir = tempfile::tempdir().unwrap();
    let tree = tree(&dir);
    // One record per chunk: every record is a sled write of its own.
    let mut sled = SledRecords::with_chunk_bytes(tree.clone(), 1);
    let mut model = MemRecords::default();
    let mark: &[u8] = b"\xFFhead";
    for (round, writes) in [
        (1u8, 10usize),
        (2, 3 * exactly_store::COMMIT_BATCH_KEYS_MAX + 7),
    ] {
        for i in 0..writes {
            let key = (i as u64).to_be_bytes();
            sled.put(Space::Jobs, &key, &[round]);
            model.put(Space::Jobs, &key, &[round]);
            if i % 3 == 0 {
                sled.delete(Space::Ready, &key);
                model.delete(Space::Ready, &key);
            } else {
                sled.put(Space::Ready, &key, &[]);
                model.put(Space::Ready, &key, &[]);
            }
        }
        sled.commit_marked(mark, vec![round]).unwrap();
        assert_eq!(sled.uncommitted(), 0);
        assert_eq!(tree.get(mark).unwrap().as_deref(), Some(&[round][..]));
        let reopened = SledRecords::new(tree.clone());
        for space in [Space::Jobs, Space::Ready] {
            let on_disk: Vec<_> = reopened.scan_from(space, &[]).collect();
            let expected: Vec<_> = model.scan_from(space, &[]).collect();
            assert_eq!(on_disk, expected, "round {round}, {space:?}");
        }
    }
}
