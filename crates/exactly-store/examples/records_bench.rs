//! What the job table's apply costs with its records in memory and on sled: 100,000 jobs
//! (500 per Submit, each with a random-looking idempotency key and a 64-byte payload) submitted, assigned
//! and completed, the sled table committing every `--every` rounds of those three entries.
//! Prints the time per job of each, the share of the sled run spent in commits, and sled's
//! size on disk. `--fill` only submits (a backlog); `--jobs N` changes the 100,000.
//! Run: `cargo run --release -p exactly-store --example records_bench -- [--every N] [--fill]
//! [--jobs N]`

use std::time::{Duration, Instant};

use exactly_core::records::Records;
use exactly_core::{
    plan_assignments, Command, Completion, JobTable, NewJob, NodeRegistration, Outcome, Request,
};
use exactly_store::SledRecords;

const JOBS_PER_ROUND: u64 = 500;

/// A bijective scramble of `n` (splitmix64's finalizer), twice for 128 bits.
fn scatter(n: u64) -> u128 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (u128::from(mix(n)) << 64) | u128::from(mix(!n))
}

struct Settings {
    every: u64,
    fill: bool,
    rounds: u64,
}

fn run<R: Records>(
    table: &mut JobTable<R>,
    settings: &Settings,
    mut commit: impl FnMut(&mut JobTable<R>),
) -> Duration {
    let every = settings.every;
    let start = Instant::now();
    let mut now_ms = 1_000_000;
    let mut index = 1;
    let request = |command, now_ms| Request {
        now_ms,
        entropy: 7,
        command,
    };
    let register = Command::RegisterNode(NodeRegistration {
        node: 1,
        incarnation: 1,
        slots: 1_000,
        addr: "127.0.0.1:7000".into(),
        applied: u64::MAX,
    });
    table.apply(index, request(register, now_ms));
    for round in 0..settings.rounds {
        now_ms += 10;
        index += 1;
        let jobs = (0..JOBS_PER_ROUND)
            .map(|i| NewJob {
                queue: "q".into(),
                kind: "noop".into(),
                payload: vec![1; 64],
                max_attempts: 3,
                // Scattered like the random UUIDs the clients make.
                idempotency_key: Some(format!("{:032x}", scatter(round * JOBS_PER_ROUND + i))),
                ..NewJob::default()
            })
            .collect();
        table.apply(index, request(Command::Submit(jobs), now_ms));
        if settings.fill {
            if (round + 1) % every == 0 {
                commit(table);
            }
            continue;
        }
        index += 1;
        let plan = plan_assignments(table, now_ms, JOBS_PER_ROUND as usize, &Default::default());
        table.apply(index, request(Command::Assign(plan), now_ms));
        index += 1;
        let done = table
            .jobs_running_on(1)
            .map(|job| Completion {
                job: job.id,
                token: job.attempts.last().map_or(0, |a| a.token),
                outcome: Outcome::Succeeded { result: vec![] },
            })
            .collect();
        table.apply(index, request(Command::Complete(done), now_ms));
        if (round + 1) % every == 0 {
            commit(table);
        }
    }
    commit(table);
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let number = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    let settings = Settings {
        every: number("--every", 1).max(1),
        fill: args.iter().any(|a| a == "--fill"),
        rounds: (number("--jobs", 100_000) / JOBS_PER_ROUND).max(1),
    };
    let every = settings.every;
    let jobs = settings.rounds * JOBS_PER_ROUND;
    let per_job = |d: Duration| d.as_secs_f64() * 1e6 / jobs as f64;

    let mut in_memory = JobTable::new();
    let memory = run(&mut in_memory, &settings, |_| {});
    println!(
        "in memory: {jobs} jobs in {memory:.2?} ({:.1} µs per job)",
        per_job(memory)
    );

    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(exactly_store::SLED_CACHE_BYTES)
        .open()
        .expect("sled opens");
    let tree = db.open_tree("state").expect("a tree");
    let mut on_sled = JobTable::with_records(SledRecords::new(tree));
    let mut committing = Duration::ZERO;
    let sled = run(&mut on_sled, &settings, |t| {
        let start = Instant::now();
        t.records_mut()
            .commit(sled::Batch::default())
            .expect("commit");
        committing += start.elapsed();
    });
    println!(
        "on sled, a commit every {every} rounds: {jobs} jobs in {sled:.2?} ({:.1} µs per job, \
         {:.1} of them in commits)",
        per_job(sled),
        per_job(committing)
    );
    db.flush().expect("flush");
    let bytes = db.size_on_disk().expect("size");
    println!(
        "sled on disk: {:.1} MiB ({:.0} bytes per job)",
        bytes as f64 / 1048576.0,
        bytes as f64 / jobs as f64
    );
}
