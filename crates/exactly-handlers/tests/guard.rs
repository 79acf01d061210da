//! The exec guard (`exactly-exec-guard`) against real process trees: a shell wrapper around a
//! Python worker (`sh -c 'python3 …'`), a grandchild, a `setsid` child and a daemonizing
//! (double-fork) child. Every process of a tree writes its pid to a file; the tests decide
//! liveness from those pids (`kill(pid, 0)` and `/proc/<pid>/stat`), never by sleeping and
//! hoping.
//!
//! Raw-protocol tests play the node themselves (closing the control pipe is the node dying; not
//! sending extensions is the node frozen); handler tests go through `ExecHandler` as the node
//! does. Workers ignore SIGTERM, so the trees die only by the guard's SIGKILL, at the end of the
//! kill grace.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use exactly_handlers::exec::protocol::{
    self, End, FromGuard, NotStarted, Report, Start, StopReason, ToGuard,
};
use exactly_handlers::{
    monotonic_ms, ExecHandler, ExecSpec, Handler, HandlerOutcome, JobContext, LeaseDeadline,
};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

const GUARD: &str = env!("CARGO_BIN_EXE_exactly-exec-guard");

/// The kill grace of every test: SIGTERM, then SIGKILL this much later.
const GRACE: Duration = Duration::from_millis(500);

/// Scheduling slack on a busy machine, on top of the grace, for "dead by".
const SLACK: Duration = Duration::from_millis(1500);

/// The tree shapes and the roles whose pids each records.
const SHAPES: [(&str, &[&str]); 4] = [
    ("wrapper", &["command", "worker"]),
    ("grandchild", &["command", "child", "worker"]),
    ("setsid", &["command", "worker"]),
    ("daemon", &["command", "worker"]),
];

/// `tree.sh SHAPE DIR`: starts a tree of SHAPE whose processes write their pids to DIR/<role>.
/// Workers ignore SIGTERM and sleep. Shapes ending in `-exit` start their worker and exit 0 as
/// soon as it has written its pid, leaving it behind.
const TREE_SH: &str = r#"#!/bin/sh
shape=$1 dir=$2
echo $$ > "$dir/command.tmp" && mv "$dir/command.tmp" "$dir/command"
worker='trap "" TERM; echo $$ > "$0.tmp" && mv "$0.tmp" "$0"; exec sleep 60'
case $shape in
  wrapper)
    python3 -c 'import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".tmp", "w").write("%d\n" % os.getpid())
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)' "$dir/worker"
    : ;;
  grandchild)
    sh -c 'echo $$ > "$1/child.tmp" && mv "$1/child.tmp" "$1/child"; sh -c "$2" "$1/worker"; :' \
      _ "$dir" "$worker"
    : ;;
  setsid) setsid sh -c "$worker" "$dir/worker" & wait ;;
  daemon) ( setsid sh -c "$worker" "$dir/worker" & ) ; sleep 60 ;;
  setsid-exit|daemon-exit)
    if [ "$shape" = setsid-exit ]; then setsid sh -c "$worker" "$dir/worker" &
    else ( setsid sh -c "$worker" "$dir/worker" & ); fi
    while [ ! -e "$dir/worker" ]; do sleep 0.01; done
    echo left ;;
esac
"#;

/// A scratch directory holding `tree.sh`.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tree.sh"), TREE_SH).unwrap();
        Self { dir }
    }

    /// A fresh pid directory for one tree.
    fn pid_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A spec running `tree.sh shape pid_dir` with the test grace.
    fn spec(&self, shape: &str, pid_dir: &Path) -> ExecSpec {
        ExecSpec {
            args: vec![
                self.dir.path().join("tree.sh").display().to_string(),
                shape.to_string(),
                pid_dir.display().to_string(),
            ],
            kill_grace: GRACE,
            ..ExecSpec::new("/bin/sh")
        }
    }

    /// The raw protocol's Start for the same command.
    fn start(&self, shape: &str, pid_dir: &Path, deadline_ms: u64) -> Start {
        let spec = self.spec(shape, pid_dir);
        Start {
            command: spec.command,
            args: spec.args,
            env: vec![("EXACTLY_JOB_ID".to_string(), "1".to_string())],
            workdir: "/".to_string(),
            kill_grace_ms: GRACE.as_millis() as u64,
            output_bytes_max: 4096,
            deadline_ms,
            payload_bytes: 0,
        }
    }
}

/// Waits (up to 20 s) for each role's pid file in `dir`.
fn read_pids(dir: &Path, roles: &[&str]) -> Vec<(String, Pid)> {
    let until = Instant::now() + Duration::from_secs(20);
    roles
        .iter()
        .map(|role| loop {
            if let Ok(text) = std::fs::read_to_string(dir.join(role)) {
                if let Ok(pid) = text.trim().parse() {
                    return (role.to_string(), Pid::from_raw(pid));
                }
            }
            assert!(
                Instant::now() < until,
                "no pid for {role} in {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        })
        .collect()
}

/// Whether `pid` still runs. A zombie counts as dead: it runs nothing.
fn running(pid: Pid) -> bool {
    match kill(pid, None) {
        Err(Errno::ESRCH) => false,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        }),
    }
}

/// Polls until none of `pids` runs; panics past `limit`. Returns when the last was seen dead.
fn wait_dead(what: &str, pids: &[(String, Pid)], limit: Duration) -> Instant {
    let until = Instant::now() + limit;
    loop {
        let alive: Vec<&(String, Pid)> = pids.iter().filter(|(_, p)| running(*p)).collect();
        if alive.is_empty() {
            return Instant::now();
        }
        assert!(
            Instant::now() < until,
            "{what}: still running after {limit:?}: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn assert_all_running(what: &str, pids: &[(String, Pid)]) {
    for (role, pid) in pids {
        assert!(running(*pid), "{what}: {role} ({pid}) is not running");
    }
}

/// A guard started by the test, which plays the node.
struct RawGuard {
    child: Child,
    control: Option<ChildStdin>,
    reports: ChildStdout,
}

impl RawGuard {
    /// Starts a guard and sends `start` and `payload`.
    fn start(start: &Start, payload: &[u8]) -> Self {
        let mut guard = Self::spawn();
        let control = guard.control.as_mut().unwrap();
        control.write_all(&protocol::PREAMBLE).unwrap();
        control
            .write_all(&protocol::encode(&ToGuard::Start(start.clone())).unwrap())
            .unwrap();
        if !payload.is_empty() {
            let frame = protocol::encode(&ToGuard::Payload(payload.to_vec())).unwrap();
            control.write_all(&frame).unwrap();
        }
        protocol::read_preamble(&mut guard.reports).unwrap();
        guard
    }

    fn spawn() -> Self {
        let mut child = Command::new(GUARD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn the guard");
        let control = child.stdin.take();
        let reports = child.stdout.take().unwrap();
        Self {
            child,
            control,
            reports,
        }
    }

    fn send(&mut self, message: &ToGuard) {
        let frame = protocol::encode(message).unwrap();
        self.control.as_mut().unwrap().write_all(&frame).unwrap();
    }

    /// The node dies: its end of the control pipe closes.
    fn close_control(&mut self) {
        self.control = None;
    }

    fn next(&mut self) -> FromGuard {
        protocol::read_frame(&mut self.reports)
            .unwrap()
            .expect("a frame before the end of the guard's stream")
    }

    fn started(&mut self) -> i32 {
        match self.next() {
            FromGuard::Started { pid } => pid,
            other => panic!("expected Started, got {other:?}"),
        }
    }

    fn report(&mut self) -> Report {
        loop {
            if let FromGuard::Ended(report) = self.next() {
                let status = self.child.wait().unwrap();
                assert!(status.success(), "the guard exited with {status}");
                return report;
            }
        }
    }
}

impl Drop for RawGuard {
    /// On a failed test: close the control pipe, so the guard kills its tree.
    fn drop(&mut self) {
        self.control = None;
    }
}

/// (a) The node dies (its end of the control pipe closes): for every shape, every process of the
/// tree is dead within the kill grace (plus scheduling slack), though the workers ignore
/// SIGTERM, and the guard reports why it stopped the command.
#[test]
fn node_death_kills_every_shape_within_the_grace() {
    let scratch = Scratch::new();
    for (shape, roles) in SHAPES {
        let dir = scratch.pid_dir(shape);
        let mut guard = RawGuard::start(&scratch.start(shape, &dir, u64::MAX), b"");
        guard.started();
        let pids = read_pids(&dir, roles);
        assert_all_running(shape, &pids);
        let closed = Instant::now();
        guard.close_control();
        let dead = wait_dead(shape, &pids, GRACE + SLACK);
        eprintln!(
            "{shape}: tree dead {:?} after the node's pipe closed",
            dead - closed
        );
        let report = guard.report();
        assert_eq!(report.stopped, Some(StopReason::NodeGone), "{shape}");
        assert_eq!(report.survivors, 0, "{shape}");
    }
}

/// (b) The node is frozen (no extension comes): for every shape, the tree lives until the lease
/// deadline and is dead by deadline + grace (plus slack), and the guard says the lease expired.
#[test]
fn lapsed_deadline_kills_every_shape_by_deadline_plus_grace() {
    let scratch = Scratch::new();
    for (shape, roles) in SHAPES {
        let dir = scratch.pid_dir(shape);
        // Long enough for the tree (and Python) to start on a busy machine.
        let deadline_ms = monotonic_ms() + 3000;
        let mut guard = RawGuard::start(&scratch.start(shape, &dir, deadline_ms), b"");
        guard.started();
        let pids = read_pids(&dir, roles);
        assert!(
            monotonic_ms() < deadline_ms,
            "{shape}: the tree took longer to start than the test allows"
        );
        assert_all_running(shape, &pids);
        let kill_by_ms = deadline_ms + (GRACE + SLACK).as_millis() as u64;
        wait_dead(shape, &pids, Duration::from_secs(20));
        let dead_ms = monotonic_ms();
        assert!(
            dead_ms <= kill_by_ms,
            "{shape}: dead {} ms after deadline + grace + slack",
            dead_ms - kill_by_ms
        );
        eprintln!(
            "{shape}: tree dead {} ms after the deadline",
            dead_ms - deadline_ms
        );
        let report = guard.report();
        assert_eq!(report.stopped, Some(StopReason::LeaseExpired), "{shape}");
    }
}

/// (c) Extensions keep a tree alive well past its first deadline; once they stop, the tree dies
/// by the last deadline + grace.
#[test]
fn extensions_keep_the_tree_alive_until_they_stop() {
    let scratch = Scratch::new();
    let (shape, roles) = SHAPES[1];
    let dir = scratch.pid_dir(shape);
    let first_deadline_ms = monotonic_ms() + 3000;
    let mut guard = RawGuard::start(&scratch.start(shape, &dir, first_deadline_ms), b"");
    guard.started();
    let pids = read_pids(&dir, roles);
    let mut last_ms = first_deadline_ms;
    // Extend 0.8 s ahead every 0.2 s, as a node renewing its lease would, until well past the
    // first deadline.
    while monotonic_ms() < first_deadline_ms + 1500 {
        last_ms = monotonic_ms() + 800;
        guard.send(&ToGuard::Extend {
            deadline_ms: last_ms,
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_all_running("after the first deadline", &pids);
    wait_dead(shape, &pids, Duration::from_secs(20));
    let dead_ms = monotonic_ms();
    assert!(
        dead_ms <= last_ms + (GRACE + SLACK).as_millis() as u64,
        "dead {} ms after the last deadline",
        dead_ms - last_ms
    );
    assert_eq!(guard.report().stopped, Some(StopReason::LeaseExpired));
}

/// A stream that is not the protocol, or a Start that fails validation, starts nothing and is
/// reported; so is a lease that lapsed before the start.
#[test]
fn bad_streams_and_lapsed_leases_start_nothing() {
    let scratch = Scratch::new();

    let mut guard = RawGuard::spawn();
    guard
        .control
        .as_mut()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    protocol::read_preamble(&mut guard.reports).unwrap();
    let report = guard.report();
    assert!(
        matches!(&report.end, End::NotStarted(NotStarted::Protocol(why)) if why.contains("preamble")),
        "{report:?}"
    );

    let dir = scratch.pid_dir("invalid");
    let mut start = scratch.start("setsid", &dir, u64::MAX);
    start.args.push("a\0b".to_string());
    let report = RawGuard::start(&start, b"").report();
    assert!(
        matches!(report.end, End::NotStarted(NotStarted::Protocol(_))),
        "{report:?}"
    );

    let start = scratch.start("setsid", &dir, monotonic_ms().saturating_sub(1));
    let report = RawGuard::start(&start, b"").report();
    assert_eq!(report.end, End::NotStarted(NotStarted::LeaseLapsed));
    assert!(!dir.join("command").exists(), "a command ran");
}

fn context(node: u64, job: u64, token: u64, lease: LeaseDeadline) -> JobContext {
    JobContext {
        job_id: job,
        attempt: 1,
        fencing_token: token,
        idempotency_key: format!("exactly-job-{job}"),
        node_id: node,
        queue: "default".to_string(),
        kind: "tree".to_string(),
        payload: Vec::new(),
        timeout: Duration::from_secs(60),
        lease,
    }
}

fn handler(spec: ExecSpec) -> ExecHandler {
    ExecHandler::new(spec, PathBuf::from(GUARD))
}

/// Awaits `run` while waiting (in a blocking thread) for a tree's pid files.
async fn pids_while_running(
    dir: &Path,
    roles: &'static [&'static str],
    run: &mut tokio::task::JoinHandle<HandlerOutcome>,
) -> Vec<(String, Pid)> {
    let dir = dir.to_path_buf();
    let read = tokio::task::spawn_blocking(move || read_pids(&dir, roles));
    tokio::select! {
        outcome = run => panic!("the command ended early: {outcome:?}"),
        pids = read => pids.unwrap(),
    }
}

/// (d) Cancellation through the token (the executor's timeout, fencing, drain) kills every
/// shape, by SIGKILL after the grace since the workers ignore SIGTERM, and the attempt is
/// reported cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_every_shape() {
    let scratch = Scratch::new();
    for (shape, roles) in SHAPES {
        let dir = scratch.pid_dir(shape);
        let cancel = CancellationToken::new();
        let ctx = context(1, 1, 1, LeaseDeadline::unbounded());
        let mut run = tokio::spawn(handler(scratch.spec(shape, &dir)).run(ctx, cancel.clone()));
        let pids = pids_while_running(&dir, roles, &mut run).await;
        let cancelled = Instant::now();
        cancel.cancel();
        let outcome = run.await.unwrap();
        let took = cancelled.elapsed();
        assert_eq!(outcome, HandlerOutcome::cancelled(), "{shape}");
        // The handler returns once the guard reported, which it does once the tree is gone.
        for (role, pid) in &pids {
            assert!(!running(*pid), "{shape}: {role} survived the cancel");
        }
        assert!(
            took >= GRACE,
            "{shape}: killed after {took:?}, before the grace"
        );
        assert!(took <= GRACE + SLACK, "{shape}: took {took:?}");
    }
}

/// (d) A command that exits leaving a `setsid` child or a daemon behind succeeds, and those are
/// dead by the time the handler returns (a process group kill missed both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_outside_the_group_die_when_the_command_exits() {
    let scratch = Scratch::new();
    for shape in ["setsid-exit", "daemon-exit"] {
        let dir = scratch.pid_dir(shape);
        let ctx = context(1, 1, 1, LeaseDeadline::unbounded());
        let outcome = handler(scratch.spec(shape, &dir))
            .run(ctx, CancellationToken::new())
            .await;
        assert_eq!(
            outcome,
            HandlerOutcome::Succeeded(b"left\n".to_vec()),
            "{shape}"
        );
        let pids = read_pids(&dir, &["command", "worker"]);
        for (role, pid) in &pids {
            assert!(!running(*pid), "{shape}: {role} outlived the command");
        }
    }
}

/// (c, d) Through the handler: the node's lease extensions reach the guard and keep the tree
/// alive past the first deadline; when they stop (the node froze), the tree is dead by the last
/// deadline + grace and the attempt fails retryably, naming the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_forwards_lease_extensions() {
    let scratch = Scratch::new();
    let (shape, roles) = SHAPES[3];
    let dir = scratch.pid_dir(shape);
    let first_ms = monotonic_ms() + 3000;
    let (lease, deadline) = LeaseDeadline::channel(first_ms);
    let ctx = context(1, 1, 1, deadline);
    let mut run =
        tokio::spawn(handler(scratch.spec(shape, &dir)).run(ctx, CancellationToken::new()));
    let pids = pids_while_running(&dir, roles, &mut run).await;
    let mut last_ms = first_ms;
    while monotonic_ms() < first_ms + 1500 {
        last_ms = monotonic_ms() + 800;
        lease.send_modify(|d| *d = (*d).max(last_ms));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_all_running("after the first deadline", &pids);
    let last_ms = lease.borrow().to_owned().max(last_ms);
    let outcome = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the tree is stopped")
        .unwrap();
    let dead_ms = monotonic_ms();
    for (role, pid) in &pids {
        assert!(!running(*pid), "{role} survived the lapsed lease");
    }
    assert!(
        dead_ms <= last_ms + (GRACE + SLACK).as_millis() as u64,
        "ended {} ms after the last deadline",
        dead_ms - last_ms
    );
    match outcome {
        HandlerOutcome::Failed { error, retryable } => {
            assert!(retryable);
            assert!(error.contains("lease deadline"), "{error}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    drop(lease);
}

/// The parent of `pid` (from `/proc/<pid>/stat`).
fn parent_of(pid: Pid) -> Pid {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: i32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    Pid::from_raw(ppid)
}

/// A guard killed with SIGKILL (it runs no cleanup) does not leave the attempt running: the
/// kernel kills the command, the node kills its group (the grandchild) and sweeps the `setsid`
/// worker by its environment, and the attempt ends as a retryable failure naming the guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_guard_takes_its_tree_down() {
    let scratch = Scratch::new();
    for (shape, roles) in [SHAPES[1], SHAPES[2], SHAPES[3]] {
        let dir = scratch.pid_dir(shape);
        // An unusual job id and token, so the sweep cannot match another test's processes.
        let ctx = context(9, 900_001, 900_002, LeaseDeadline::unbounded());
        let mut run =
            tokio::spawn(handler(scratch.spec(shape, &dir)).run(ctx, CancellationToken::new()));
        let pids = pids_while_running(&dir, roles, &mut run).await;
        let guard = parent_of(pids[0].1);
        let cmdline = std::fs::read(format!("/proc/{guard}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("exactly-exec-guard"),
            "{shape}: the command's parent is not the guard"
        );
        kill(guard, Signal::SIGKILL).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the handler notices")
            .unwrap();
        match outcome {
            HandlerOutcome::Failed { error, retryable } => {
                assert!(retryable, "{shape}");
                assert!(error.contains("exec guard"), "{shape}: {error}");
            }
            other => panic!("{shape}: expected a failure, got {other:?}"),
        }
        wait_dead(shape, &pids, SLACK);
    }
}

/// Each guard's control pipe is the node's alone (CLOEXEC): a guard started after another does
/// not hold the first one's pipe open, so dropping the first attempt (its pipe closes) kills its
/// `setsid` worker, which is outside the process group the handler's drop kills, while the
/// second attempt runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_guard_does_not_hold_an_earlier_guards_pipe() {
    let scratch = Scratch::new();
    let (shape, roles) = SHAPES[2];
    let first_dir = scratch.pid_dir("first");
    let second_dir = scratch.pid_dir("second");
    let ctx = || context(1, 1, 1, LeaseDeadline::unbounded());
    let mut first =
        tokio::spawn(handler(scratch.spec(shape, &first_dir)).run(ctx(), CancellationToken::new()));
    let first_pids = pids_while_running(&first_dir, roles, &mut first).await;
    let cancel = CancellationToken::new();
    let mut second =
        tokio::spawn(handler(scratch.spec(shape, &second_dir)).run(ctx(), cancel.clone()));
    let second_pids = pids_while_running(&second_dir, roles, &mut second).await;

    first.abort();
    let _ = first.await;
    wait_dead("first", &first_pids, GRACE + SLACK);
    assert_all_running("second", &second_pids);
    cancel.cancel();
    assert_eq!(second.await.unwrap(), HandlerOutcome::cancelled());
}

/// The per-job cost of an exec attempt through its guard: a no-op command (`/bin/true`) run
/// sequentially. Prints the distribution (README quotes it, with the figure before the guard);
/// asserts only a loose bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_job_latency() {
    let handler = handler(ExecSpec::new("/bin/true"));
    let ctx = || context(1, 1, 1, LeaseDeadline::channel(u64::MAX).1);
    for _ in 0..20 {
        handler.run(ctx(), CancellationToken::new()).await;
    }
    let mut took = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let outcome = handler.run(ctx(), CancellationToken::new()).await;
        took.push(started.elapsed());
        assert_eq!(outcome, HandlerOutcome::Succeeded(Vec::new()));
    }
    took.sort();
    let mean = took.iter().sum::<Duration>() / took.len() as u32;
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    eprintln!(
        "exec no-op through the guard: n={} mean={mean:?} p50={:?} p90={:?} p99={:?}",
        took.len(),
        at(0.5),
        at(0.9),
        at(0.99)
    );
    assert!(at(0.5) < Duration::from_millis(200), "p50 {:?}", at(0.5));
}
