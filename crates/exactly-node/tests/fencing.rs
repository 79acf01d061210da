//! Real-process fencing tests: `exactlyd` binaries on loopback whose `exec` jobs report their
//! external effect to an `exactly-sink`, the reference downstream: it applies the first effect
//! per job, acknowledges later ones with a token at least the largest seen as repeats (not
//! applied again), and refuses older tokens as stale. The sink sees, from outside the cluster,
//! whether a job's effect was ever applied twice or an abandoned attempt's effect slipped
//! through.
//!
//! A pause here is a pause of the whole "machine": SIGSTOP goes to `exactlyd` and then to every
//! process below it (its exec guards and everything their commands started), SIGCONT to all of
//! them on waking. SIGKILL goes to `exactlyd` alone, as a crash of the daemon would: its exec
//! guards see their control pipes close and kill their commands' trees. Two tests check that for
//! every shape a command's processes can take (a shell wrapper, a grandchild, a `setsid` child, a
//! daemon): after SIGKILL of `exactlyd`, and after SIGSTOP of `exactlyd` alone (its guards and
//! commands keep running, but the guards enforce the lease deadline themselves).
//!
//! The sink binary lives in another package, so it is found next to `exactlyd` in the same
//! target directory. `cargo test --workspace` builds it (the sink package has an integration
//! test, which makes cargo build its binary); when only this package is tested and the binary
//! is missing, the test builds it with `cargo build -p exactly-sink`. The exec guard is found
//! (or built) the same way (`common::exec_guard_binary`).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exactly_proto::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};

type Jobs = pb::jobs_client::JobsClient<tonic::transport::Channel>;

/// How long one RPC to a node may take before we treat the node as unreachable (a paused node
/// accepts TCP connections but never answers).
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Exit code of the effect script when the sink refuses its token (configured as permanent, so a
/// refused attempt can never be retried into success).
const EXIT_STALE: i32 = 3;

/// Every process's parent, from /proc (pid -> ppid).
fn parents() -> HashMap<i32, i32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state, ppid, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            out.insert(pid, ppid);
        }
    }
    out
}

/// Every process below `pid`: its exec guards first, then what their commands started.
fn descendants_of(pid: i32) -> Vec<i32> {
    let parents = parents();
    let mut out = Vec::new();
    let mut level = vec![pid];
    while !level.is_empty() {
        let next: Vec<i32> = parents
            .iter()
            .filter(|(_, ppid)| level.contains(ppid))
            .map(|(&child, _)| child)
            .filter(|child| !out.contains(child) && *child != pid)
            .collect();
        out.extend(&next);
        level = next;
    }
    out
}

/// Signals each process.
fn signal_pids(pids: &[i32], signal: Signal) {
    for &p in pids {
        let _ = kill(Pid::from_raw(p), signal);
    }
}

/// One `exactlyd` process that this test started.
struct Proc {
    id: u64,
    port: u16,
    config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// While the node is stopped: the processes below it stopped with it (none when only
    /// `exactlyd` was stopped).
    paused: Option<Vec<i32>>,
}

impl Proc {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn start(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_exactlyd"))
            .arg("--config")
            .arg(&self.config)
            .args(extra)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn exactlyd");
        self.child = Some(child);
    }

    /// SIGSTOP to the node, then to every process below it: the machine stops, its clocks do
    /// not.
    fn pause(&mut self) {
        let Some(pid) = self.pid() else { return };
        if self.paused.is_some() {
            return;
        }
        // The node first, so that it starts no guard after we list them; then the tree, again
        // and again until a pass finds no process it has not stopped (a command may fork until
        // it is stopped itself).
        let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
        let mut stopped: Vec<i32> = Vec::new();
        loop {
            let new: Vec<i32> = descendants_of(pid)
                .into_iter()
                .filter(|p| !stopped.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            signal_pids(&new, Signal::SIGSTOP);
            stopped.extend(new);
        }
        self.paused = Some(stopped);
    }

    /// SIGSTOP to `exactlyd` alone (`kill -STOP <pid>`): its exec guards and their commands run
    /// on, as they did in the report that started the guard.
    fn stop_alone(&mut self) {
        if let (Some(pid), None) = (self.pid(), &self.paused) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            self.paused = Some(Vec::new());
        }
    }

    /// SIGCONT to the node and the processes stopped with it.
    fn resume(&mut self) {
        let Some(stopped) = self.paused.take() else {
            return;
        };
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
        signal_pids(&stopped, Signal::SIGCONT);
    }

    /// SIGKILL to the node alone (a daemon crash): its exec guards see their pipes close and
    /// kill their trees. If the node was paused, the processes stopped with it are resumed so
    /// they do not stay stopped forever.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
        if let Some(stopped) = self.paused.take() {
            signal_pids(&stopped, Signal::SIGCONT);
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Proc {
    /// Kills the node and every process below it, so nothing outlives the test, even on panic.
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let mut below = descendants_of(pid);
            below.extend(self.paused.take().unwrap_or_default());
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            signal_pids(&below, Signal::SIGKILL);
        }
        self.kill9();
    }
}

/// One call the sink recorded.
#[derive(Clone, Debug)]
struct SinkCall {
    job: u64,
    token: u64,
    node: u64,
    verdict: String,
    at_ms: u64,
}

/// The `exactly-sink` process this test started.
struct Sink {
    child: Child,
    addr: String,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sink binary, next to `exactlyd`; built here if this package was tested alone.
fn sink_binary() -> PathBuf {
    let exactlyd = Path::new(env!("CARGO_BIN_EXE_exactlyd"));
    let bin = exactlyd.parent().unwrap().join("exactly-sink");
    if !bin.exists() {
        eprintln!("{} missing: cargo build -p exactly-sink", bin.display());
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "exactly-sink"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p exactly-sink");
        assert!(status.success(), "cargo build -p exactly-sink: {status}");
    }
    assert!(bin.exists(), "no sink binary at {}", bin.display());
    bin
}

impl Sink {
    fn start() -> Self {
        let mut child = Command::new(sink_binary())
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn exactly-sink");
        let stdout = child.stdout.take().unwrap();
        let mut addr = String::new();
        BufReader::new(stdout).read_line(&mut addr).unwrap();
        let addr = addr.trim().to_string();
        assert!(!addr.is_empty(), "the sink printed no address");
        Self { child, addr }
    }

    fn port(&self) -> u16 {
        self.addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// Every call so far, in arrival order.
    fn calls(&self) -> Vec<SinkCall> {
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /calls.txt HTTP/1.1\r\nHost: sink\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1;
        body.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some(SinkCall {
                    job: f.first()?.parse().ok()?,
                    token: f.get(1)?.parse().ok()?,
                    node: f.get(2)?.parse().ok()?,
                    verdict: f.get(3)?.to_string(),
                    at_ms: f.get(4)?.parse().ok()?,
                })
            })
            .collect()
    }
}

/// The effect script: sleeps for the payload's seconds, then reports (job, token, node) to the
/// sink over bash's /dev/tcp (curl may not be installed), and fails for good on 409.
fn write_script(dir: &Path, sink_port: u16) -> PathBuf {
    let path = dir.join("effect.sh");
    let text = format!(
        r#"#!/bin/bash
read -r secs || true
sleep "${{secs:-1}}"
exec 3<>/dev/tcp/127.0.0.1/{sink_port} || exit 1
printf 'POST /effect?job=%s&token=%s&node=%s HTTP/1.1\r\nHost: sink\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' \
  "$EXACTLY_JOB_ID" "$EXACTLY_FENCING_TOKEN" "$EXACTLY_NODE_ID" >&3
read -r _ code _ <&3
case "$code" in
  200) exit 0 ;;
  409) echo "stale token $EXACTLY_FENCING_TOKEN" >&2; exit {EXIT_STALE} ;;
  *) echo "sink answered '$code'" >&2; exit 1 ;;
esac
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The `shaped` kind's script, run as `sh -c '/bin/bash shaped.sh; exit $?'` (a shell wrapper,
/// as in the report that started the exec guard). Its payload is `SHAPE SECS`; a worker process
/// of that shape ignores SIGTERM, sleeps SECS and then reports (job, token, node) to the sink:
/// `wrapper` is the script itself, `grandchild` a subshell of a subshell, `setsid` a child in a
/// new session the script waits for, `daemon` a double-forked child in a new session, orphaned
/// at once, whose exit file the script polls. Every process writes its pid to
/// `PIDS/<job>-<token>/<role>` (roles `script`, `child`, `worker`).
fn write_shaped_script(dir: &Path, sink_port: u16, pids: &Path) -> PathBuf {
    let path = dir.join("shaped.sh");
    let text = format!(
        r#"#!/bin/bash
read -r shape secs || true
export secs
export dir="{pids}/$EXACTLY_JOB_ID-$EXACTLY_FENCING_TOKEN"
mkdir -p "$dir"
rec() {{ echo "$2" > "$dir/$1.tmp" && mv "$dir/$1.tmp" "$dir/$1"; }}
work() {{
  trap '' TERM
  rec worker "$BASHPID"
  sleep "$secs"
  exec 3<>/dev/tcp/127.0.0.1/{sink_port} || {{ rec exit 1; exit 1; }}
  printf 'POST /effect?job=%s&token=%s&node=%s HTTP/1.1
Host: sink
Content-Length: 0
Connection: close

'     "$EXACTLY_JOB_ID" "$EXACTLY_FENCING_TOKEN" "$EXACTLY_NODE_ID" >&3
  read -r _ code _ <&3
  case "$code" in 200) c=0 ;; 409) c={EXIT_STALE} ;; *) c=1 ;; esac
  rec exit "$c"
  exit "$c"
}}
export -f rec work
rec script "$$"
case "$shape" in
  wrapper) work ;;
  grandchild) ( rec child "$BASHPID"; ( work ); exit $? ); exit $? ;;
  setsid) setsid bash -c work & wait $!; exit $? ;;
  daemon)
    ( setsid bash -c work & )
    until [ -e "$dir/exit" ]; do sleep 0.1; done
    exit "$(cat "$dir/exit")" ;;
  *) echo "unknown shape $shape" >&2; exit 2 ;;
esac
"#,
        pids = pids.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The shapes of the `shaped` kind, and the roles whose pids each records.
const SHAPES: [(&str, &[&str]); 4] = [
    ("wrapper", &["script", "worker"]),
    ("grandchild", &["script", "child", "worker"]),
    ("setsid", &["script", "worker"]),
    ("daemon", &["script", "worker"]),
];

fn write_config(dir: &Path, id: u64, port: u16, script: &Path, shaped: &Path) -> PathBuf {
    let path = dir.join(format!("node-{id}.toml"));
    let text = format!(
        r#"
node-id = {id}
data-dir = "{data}"
listen = "127.0.0.1:{port}"
slots = 64

[limits]
propose-timeout = "3s"

[exec.effect]
command = "/bin/bash"
args = ["{script}"]
permanent-exit-codes = [{EXIT_STALE}]

[exec.shaped]
command = "/bin/sh"
args = ["-c", "/bin/bash {shaped}; exit $?"]
permanent-exit-codes = [{EXIT_STALE}]
"#,
        data = dir.join(format!("data-{id}")).display(),
        script = script.display(),
        shaped = shaped.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A job whose attempt sleeps `secs` and then reports its effect to the sink.
fn effect_job(secs: f64) -> pb::JobSpec {
    pb::JobSpec {
        kind: "effect".into(),
        payload: format!("{secs:.2}").into_bytes(),
        max_attempts: 100,
        timeout_ms: 60_000,
        ..Default::default()
    }
}

struct Cluster {
    procs: Vec<Proc>,
    sink: Sink,
    /// Where the `shaped` kind's processes write their pids.
    pids: PathBuf,
    // Dropped last: the processes above still write into it.
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(n: u64) -> Self {
        common::exec_guard_binary();
        let sink = Sink::start();
        let dir = tempfile::tempdir().unwrap();
        let script = write_script(dir.path(), sink.port());
        let pids = dir.path().join("pids");
        let shaped = write_shaped_script(dir.path(), sink.port(), &pids);
        let mut procs: Vec<Proc> = (1..=n)
            .map(|id| {
                let port = common::free_port();
                Proc {
                    id,
                    port,
                    config: write_config(dir.path(), id, port, &script, &shaped),
                    child: None,
                    log: dir.path().join(format!("node-{id}.log")),
                    paused: None,
                }
            })
            .collect();
        let seed = procs[0].addr();
        procs[0].start(&["--init"]);
        for p in procs.iter_mut().skip(1) {
            p.start(&["--join", &seed]);
        }
        Self {
            procs,
            sink,
            pids,
            _dir: dir,
        }
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.procs[i].addr())
    }

    async fn status(&self, i: usize) -> Option<pb::StatusResponse> {
        let call = async {
            let mut c = pb::cluster_client::ClusterClient::connect(self.endpoint(i))
                .await
                .ok()?;
            c.status(pb::StatusRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        };
        tokio::time::timeout(RPC_TIMEOUT, call).await.ok().flatten()
    }

    /// Statuses of the nodes that answer.
    async fn statuses(&self) -> Vec<pb::StatusResponse> {
        let mut out = Vec::new();
        for i in 0..self.procs.len() {
            if self.procs[i].running() && self.procs[i].paused.is_none() {
                out.extend(self.status(i).await);
            }
        }
        out
    }

    /// Waits until some node reports a leader and `n` registered members.
    async fn wait_ready(&self, n: usize, limit: Duration) -> pb::StatusResponse {
        let deadline = Instant::now() + limit;
        loop {
            for s in self.statuses().await {
                let registered = s.members.iter().filter(|m| m.incarnation > 0).count();
                if s.leader_id != 0 && s.members.len() == n && registered == n {
                    return s;
                }
            }
            if Instant::now() > deadline {
                panic!("cluster not ready within {limit:?}; {}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        let logs: Vec<String> = self
            .procs
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("node {} (last 40 lines):\n{}", p.id, tail.join("\n"))
            })
            .collect();
        format!("logs:\n{}", logs.join("\n----\n"))
    }

    fn index_of(&self, node_id: u64) -> usize {
        self.procs.iter().position(|p| p.id == node_id).unwrap()
    }

    /// The job as some answering node sees it.
    async fn get(&self, id: u64) -> Option<pb::Job> {
        for i in 0..self.procs.len() {
            if !self.procs[i].running() || self.procs[i].paused.is_some() {
                continue;
            }
            let call = async {
                let mut c = Jobs::connect(self.endpoint(i)).await.ok()?;
                c.get(pb::GetRequest {
                    job_id: id,
                    ..Default::default()
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().job)
            };
            if let Ok(Some(job)) = tokio::time::timeout(RPC_TIMEOUT, call).await {
                return Some(job);
            }
        }
        None
    }

    /// Submits through any answering node; the ids, or `None` if no node acknowledged.
    async fn submit(&self, jobs: Vec<pb::JobSpec>) -> Option<Vec<u64>> {
        for i in 0..self.procs.len() {
            let call = async {
                let mut c = Jobs::connect(self.endpoint(i)).await.ok()?;
                c.submit(pb::SubmitRequest { jobs: jobs.clone() })
                    .await
                    .ok()
                    .map(|r| r.into_inner().job_ids)
            };
            if let Ok(Some(ids)) = tokio::time::timeout(RPC_TIMEOUT, call).await {
                return Some(ids);
            }
        }
        None
    }

    /// Waits until every job in `ids` succeeded or failed for good; panics after `limit`.
    async fn wait_finished(&self, ids: &[u64], limit: Duration) -> BTreeMap<u64, pb::Job> {
        let deadline = Instant::now() + limit;
        let mut done = BTreeMap::new();
        loop {
            for &id in ids {
                if done.contains_key(&id) {
                    continue;
                }
                if let Some(job) = self.get(id).await {
                    let state = job.state;
                    if state == pb::JobState::Succeeded as i32 || state == pb::JobState::Dead as i32
                    {
                        done.insert(id, job);
                    }
                }
            }
            if done.len() == ids.len() {
                return done;
            }
            if Instant::now() > deadline {
                let missing: Vec<u64> = ids
                    .iter()
                    .filter(|id| !done.contains_key(id))
                    .copied()
                    .collect();
                panic!(
                    "{} of {} jobs not finished within {limit:?}: {:?}; {}",
                    missing.len(),
                    ids.len(),
                    &missing[..missing.len().min(20)],
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The largest stale-completion count any answering node reports.
    async fn stale_completions(&self) -> u64 {
        self.statuses()
            .await
            .iter()
            .filter_map(|s| s.counts.map(|c| c.stale_completions))
            .max()
            .unwrap_or(0)
    }
}

/// What the check found: Jepsen's queue checker's vocabulary plus the downstream's view (the
/// sink applies the first effect per job, acknowledges later ones as repeats and refuses
/// stale tokens).
#[derive(Debug, Default)]
struct Verdicts {
    acknowledged: usize,
    completed: usize,
    /// Acknowledged but not succeeded.
    lost: usize,
    /// Jobs whose effect was applied more than once at the sink, or with more than one succeeded
    /// attempt, or whose final succeeded attempt's token is older than the sink's applied token.
    duplicated: usize,
    /// Acknowledged jobs whose effect the sink did not apply exactly once.
    not_applied_once: usize,
    /// Succeeded attempts that are not their job's last attempt (a stale completion accepted).
    succeeded_not_last: usize,
    /// Informational: effects the sink acknowledged as already applied.
    repeats: usize,
    /// Informational: effects the sink refused as stale.
    stale_refused: usize,
    /// Informational: attempts that called the sink after a newer attempt of their job had
    /// started (the overlap the lease narrows but, with process pauses, cannot remove), by the
    /// fault on their node that began while they ran ("none" if no fault did).
    superseded_callers: BTreeMap<&'static str, usize>,
    /// Informational: the verdicts of the superseded attempts' calls.
    superseded_verdicts: BTreeMap<String, usize>,
    /// Calls by a command of an `exactlyd` incarnation that had been SIGKILLed more than 200 ms
    /// before, while its node was down.
    orphan_calls_while_down: usize,
    /// The same, after its node had restarted: a command outlived its incarnation.
    orphan_calls_after_restart: usize,
    /// Completions the state machine rejected as stale.
    stale_completions: u64,
    /// Effects for jobs whose submission was never acknowledged (allowed: outcome unknown).
    unacknowledged_effects: usize,
    /// One line of evidence per anomaly.
    evidence: Vec<String>,
    /// One line per superseded caller or orphan call (informational).
    notes: Vec<String>,
}

impl Verdicts {
    fn print(&self, label: &str) {
        eprintln!(
            "{label}: acknowledged {} completed {} lost {} duplicated {} not-applied-once {} \
             succeeded-not-last {}",
            self.acknowledged,
            self.completed,
            self.lost,
            self.duplicated,
            self.not_applied_once,
            self.succeeded_not_last,
        );
        eprintln!(
            "{label} (informational): repeats-absorbed {} stale-refused-at-sink {} \
             superseded-attempts-that-called-the-sink {} by fault {:?}, their calls {:?}; \
             stale-completions-rejected {} effects-of-unacknowledged-jobs {} \
             orphan-calls-while-node-down {} orphan-calls-after-restart {}",
            self.repeats,
            self.stale_refused,
            self.superseded_callers.values().sum::<usize>(),
            self.superseded_callers,
            self.superseded_verdicts,
            self.stale_completions,
            self.unacknowledged_effects,
            self.orphan_calls_while_down,
            self.orphan_calls_after_restart,
        );
        for e in self.evidence.iter().take(60) {
            eprintln!("  anomaly: {e}");
        }
        for n in self.notes.iter().take(30) {
            eprintln!("  note: {n}");
        }
        if self.notes.len() > 30 {
            eprintln!("  note: ... {} more", self.notes.len() - 30);
        }
    }
}

/// Checks the finished jobs against the sink's calls.
///
/// `faults` attributes each superseded caller to the fault on its node that began while its
/// attempt ran, and finds calls made by commands of a SIGKILLed incarnation.
fn check(
    jobs: &BTreeMap<u64, pb::Job>,
    calls: &[SinkCall],
    stale_completions: u64,
    faults: &[FaultEvent],
) -> Verdicts {
    let mut v = Verdicts {
        acknowledged: jobs.len(),
        stale_completions,
        ..Verdicts::default()
    };
    let mut applied: BTreeMap<u64, Vec<&SinkCall>> = BTreeMap::new();
    // Calls per (job, token): one attempt's calls.
    let mut by_attempt: BTreeMap<(u64, u64), Vec<&SinkCall>> = BTreeMap::new();
    for c in calls {
        match c.verdict.as_str() {
            "applied" => applied.entry(c.job).or_default().push(c),
            "stale" => v.stale_refused += 1,
            "repeat" => v.repeats += 1,
            other => panic!("unknown verdict {other}"),
        }
        if jobs.contains_key(&c.job) {
            by_attempt.entry((c.job, c.token)).or_default().push(c);
        } else {
            v.unacknowledged_effects += 1;
        }
    }

    // Attempts that called the sink: superseded ones, and commands of a killed incarnation.
    for (&(id, token), attempt_calls) in &by_attempt {
        let job = &jobs[&id];
        let Some(attempt) = job.attempts.iter().find(|a| a.token == token) else {
            v.evidence.push(format!(
                "job {id}: sink calls with token {token}, which no attempt holds: \
                 {attempt_calls:?}"
            ));
            continue;
        };
        let last_call = attempt_calls.iter().map(|c| c.at_ms).max().unwrap_or(0);
        let newer_start = job
            .attempts
            .iter()
            .filter(|a| a.token > token)
            .map(|a| a.started_at_ms)
            .min();
        if let Some(newer_start) = newer_start.filter(|&s| last_call >= s) {
            let fault = faults.iter().find(|f| {
                f.node == attempt.node_id
                    && f.from_ms >= attempt.started_at_ms
                    && f.from_ms <= last_call
            });
            *v.superseded_callers
                .entry(fault.map_or("none", |f| f.kind))
                .or_default() += 1;
            for c in attempt_calls.iter().filter(|c| c.at_ms >= newer_start) {
                *v.superseded_verdicts.entry(c.verdict.clone()).or_default() += 1;
            }
            v.notes.push(format!(
                "job {id}: superseded attempt token {token} (node {}, started {}, outcome {:?}) \
                 called the sink after a newer attempt started at {newer_start}: {:?}, \
                 during {fault:?}",
                attempt.node_id,
                attempt.started_at_ms,
                attempt.outcome,
                attempt_calls
                    .iter()
                    .map(|c| (c.at_ms, c.verdict.as_str()))
                    .collect::<Vec<_>>(),
            ));
        }
        for c in attempt_calls {
            let kill = faults.iter().find(|f| {
                f.kind == "sigkill"
                    && f.node == c.node
                    && attempt.started_at_ms <= f.from_ms
                    && c.at_ms > f.from_ms + 200
            });
            if let Some(kill) = kill {
                let after_restart = c.at_ms >= kill.to_ms;
                if after_restart {
                    v.orphan_calls_after_restart += 1;
                } else {
                    v.orphan_calls_while_down += 1;
                }
                v.notes.push(format!(
                    "job {id}: call {c:?} by a command of node {}'s incarnation SIGKILLed at {} \
                     (restarted {}){}",
                    c.node,
                    kill.from_ms,
                    kill.to_ms,
                    if after_restart {
                        ": AFTER THE NODE RESTARTED"
                    } else {
                        ""
                    }
                ));
            }
        }
    }

    for (id, job) in jobs {
        let succeeded: Vec<&pb::Attempt> = job
            .attempts
            .iter()
            .filter(|a| a.outcome == "succeeded")
            .collect();
        let last_token = job.attempts.iter().map(|a| a.token).max();
        for a in succeeded.iter().filter(|a| Some(a.token) != last_token) {
            v.succeeded_not_last += 1;
            v.evidence.push(format!(
                "job {id}: attempt token {} succeeded but is not the last attempt: {job:?}",
                a.token
            ));
        }
        let effects = applied.get(id).cloned().unwrap_or_default();
        if effects.len() != 1 {
            v.not_applied_once += 1;
            v.evidence.push(format!(
                "job {id}: effect applied {} times at the sink: {effects:?}",
                effects.len()
            ));
        }
        if job.state != pb::JobState::Succeeded as i32 || succeeded.is_empty() {
            v.lost += 1;
            v.evidence.push(format!("lost: job {id}: {job:?}"));
            continue;
        }
        v.completed += 1;
        let mut why = Vec::new();
        if effects.len() > 1 {
            let attributed: Vec<String> = effects
                .iter()
                .map(|e| {
                    let start = job
                        .attempts
                        .iter()
                        .find(|a| a.token == e.token)
                        .map_or(0, |a| a.started_at_ms);
                    let fault = faults
                        .iter()
                        .find(|f| f.node == e.node && f.from_ms >= start && f.from_ms <= e.at_ms);
                    format!(
                        "token {} (node {}, started {start}, applied at {}, during {fault:?})",
                        e.token, e.node, e.at_ms
                    )
                })
                .collect();
            why.push(format!(
                "effect applied {} times: {}",
                effects.len(),
                attributed.join(", ")
            ));
        }
        if succeeded.len() > 1 {
            why.push(format!("{} succeeded attempts", succeeded.len()));
        }
        let final_token = succeeded.iter().map(|a| a.token).max().unwrap_or(0);
        if let Some(e) = effects.iter().find(|e| e.token > final_token) {
            why.push(format!(
                "final succeeded attempt's token {final_token} is older than the sink's applied \
                 token {} (node {})",
                e.token, e.node
            ));
        }
        if !why.is_empty() {
            v.duplicated += 1;
            v.evidence
                .push(format!("duplicated: job {id}: {}", why.join("; ")));
        }
    }
    v
}

/// The node holding a running attempt of each of `ids`: job id -> (node id, token).
async fn running_attempts(cluster: &Cluster, ids: &[u64]) -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    for &id in ids {
        if let Some(job) = cluster.get(id).await {
            if let Some(a) = job
                .attempts
                .iter()
                .find(|a| a.outcome.is_empty() && a.ended_at_ms == 0)
            {
                out.insert(id, (a.node_id, a.token));
            }
        }
    }
    out
}

/// A node running long jobs is paused (SIGSTOP, with its commands) for longer than the lease:
/// its jobs run again elsewhere with higher tokens and complete; when it wakes, its stale effect
/// is refused by the sink or never sent, its completion is not accepted, and every job's
/// effect is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_paused_longer_than_the_lease_has_its_stale_effect_fenced() {
    let started = Instant::now();
    let mut cluster = Cluster::start(3);
    let status = cluster.wait_ready(3, Duration::from_secs(30)).await;
    let ids = cluster
        .submit((0..6).map(|_| effect_job(4.0)).collect())
        .await
        .expect("submit");

    // Wait until every job runs somewhere, then pick a node running some: a follower if any.
    let deadline = Instant::now() + Duration::from_secs(10);
    let running = loop {
        let running = running_attempts(&cluster, &ids).await;
        if running.len() == ids.len() {
            break running;
        }
        assert!(Instant::now() < deadline, "jobs not started: {running:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let nodes: BTreeSet<u64> = running.values().map(|&(n, _)| n).collect();
    let victim = nodes
        .iter()
        .copied()
        .find(|&n| n != status.leader_id)
        .unwrap_or(status.leader_id);
    let stranded: BTreeMap<u64, u64> = running
        .iter()
        .filter(|(_, &(n, _))| n == victim)
        .map(|(&job, &(_, token))| (job, token))
        .collect();
    let i = cluster.index_of(victim);
    let paused_ms = wall_ms();
    cluster.procs[i].pause();
    let paused_at = Instant::now();
    eprintln!(
        "SIGSTOP node {victim} (leader {}), running jobs {stranded:?} (job -> token)",
        status.leader_id
    );

    // Keep it stopped for at least 10 s and until every stranded job's new attempt reported its
    // effect (applied, or a repeat if the paused attempt's got in before the pause), so that the
    // paused node's effect, if it is sent on waking, comes second and is stale.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let calls = cluster.sink.calls();
        let rerun = stranded.iter().all(|(&job, &token)| {
            calls
                .iter()
                .any(|c| c.job == job && c.token > token && c.verdict != "stale")
        });
        if rerun && paused_at.elapsed() >= Duration::from_secs(10) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stranded jobs did not run elsewhere: {calls:?}; {}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("SIGCONT node {victim} after {:?}", paused_at.elapsed());
    cluster.procs[i].resume();
    let pause = FaultEvent {
        node: victim,
        kind: "sigstop",
        from_ms: paused_ms,
        to_ms: wall_ms(),
    };

    let jobs = cluster.wait_finished(&ids, Duration::from_secs(30)).await;
    // Let a late effect or completion of the woken node arrive before looking.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = cluster.sink.calls();
    let stale_completions = cluster.stale_completions().await;
    let v = check(&jobs, &calls, stale_completions, &[pause]);
    v.print("sigstop");

    for (&job, &token) in &stranded {
        // Calls before the pause are the attempt's while it was current; calls after are stale.
        let (before, from_paused): (Vec<&SinkCall>, Vec<&SinkCall>) = calls
            .iter()
            .filter(|c| c.job == job && c.token == token)
            .partition(|c| c.at_ms < paused_ms);
        let what = match from_paused.as_slice() {
            [] => "never sent: the node self-fenced on waking and killed the command".to_string(),
            calls => format!("sent on waking: {calls:?}"),
        };
        eprintln!(
            "job {job}: stale effect of token {token} from node {victim}: {what} \
             (calls before the pause: {before:?})"
        );
        assert!(
            from_paused.iter().all(|c| c.verdict == "stale"),
            "job {job}: the paused node's effect was not refused: {from_paused:?}"
        );
        let attempt = jobs[&job].attempts.iter().find(|a| a.token == token);
        eprintln!("job {job}: the paused node's attempt in the state machine: {attempt:?}");
        assert!(
            attempt.is_some_and(|a| a.outcome != "succeeded" && !a.outcome.is_empty()),
            "job {job}: the paused attempt was not ended without success: {:?}",
            jobs[&job]
        );
        let rerun = jobs[&job]
            .attempts
            .iter()
            .find(|a| a.outcome == "succeeded")
            .unwrap();
        assert!(
            rerun.token > token && rerun.node_id != victim,
            "{:?}",
            jobs[&job]
        );
    }
    assert!(!stranded.is_empty());
    assert_eq!(v.lost, 0, "lost jobs");
    assert_eq!(v.duplicated, 0, "duplicated jobs");
    assert_eq!(v.not_applied_once, 0, "jobs not applied exactly once");
    assert_eq!(v.succeeded_not_last, 0, "stale completions accepted");
    eprintln!("sigstop test took {:?}", started.elapsed());
}

/// A fault as it happened: node, what, and its wall-clock window (ms since the Unix epoch).
#[derive(Clone, Debug)]
struct FaultEvent {
    node: u64,
    kind: &'static str,
    from_ms: u64,
    to_ms: u64,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One fault the chaos run injects into one node.
#[derive(Debug)]
enum Fault {
    /// SIGKILL, then restart after the given time.
    Kill(Duration),
    /// SIGSTOP (with its commands) for the given time, then SIGCONT.
    Pause(Duration),
}

/// Three nodes take a stream of effect jobs while random nodes, the leader included, are
/// SIGKILLed and restarted or paused for less and more than the lease, from a printed seed
/// (`EXACTLY_CHAOS_SEED`, `EXACTLY_CHAOS_SECS`, default 60 s); after healing, no acknowledged
/// job is lost or duplicated, every one's effect was applied exactly once at the sink, and the
/// state machine accepted no stale completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_of_kills_and_pauses_loses_nothing_and_fences_every_stale_effect() {
    let started = Instant::now();
    let seed: u64 = std::env::var("EXACTLY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let secs: u64 = std::env::var("EXACTLY_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    eprintln!("chaos: seed {seed}, {secs} s (EXACTLY_CHAOS_SEED={seed} EXACTLY_CHAOS_SECS={secs})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let cluster = std::sync::Arc::new(tokio::sync::Mutex::new(Cluster::start(3)));
    cluster
        .lock()
        .await
        .wait_ready(3, Duration::from_secs(30))
        .await;

    // The stream: a batch of jobs sleeping 0.2-2.5 s every 250 ms, each batch sent to one node
    // (round-robin), with its own timeout so a paused node only costs that batch.
    let stop = tokio_util::sync::CancellationToken::new();
    let endpoints: Vec<String> = {
        let c = cluster.lock().await;
        (0..3).map(|i| c.endpoint(i)).collect()
    };
    let mut stream_rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let stream = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut submitted, mut acked) = (0usize, Vec::new());
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let ep = endpoints[i % endpoints.len()].clone();
                i += 1;
                let jobs: Vec<pb::JobSpec> = (0..4)
                    .map(|_| effect_job(stream_rng.random_range(0.2..2.5)))
                    .collect();
                submitted += jobs.len();
                let call = async {
                    let mut c = Jobs::connect(ep).await.ok()?;
                    c.submit(pb::SubmitRequest { jobs }).await.ok()
                };
                if let Ok(Some(r)) = tokio::time::timeout(RPC_TIMEOUT, call).await {
                    acked.extend(r.into_inner().job_ids);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (submitted, acked)
        }
    });

    // Faults, one at a time, each on a random node or on the current leader.
    let chaos_end = Instant::now() + Duration::from_secs(secs);
    let (mut kills, mut pauses) = (0, 0);
    let mut faults = Vec::new();
    while Instant::now() < chaos_end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
        let mut c = cluster.lock().await;
        let target = if rng.random_bool(0.4) {
            match c.statuses().await.iter().find(|s| s.leader_id != 0) {
                Some(s) => c.index_of(s.leader_id),
                None => rng.random_range(0..3),
            }
        } else {
            rng.random_range(0..3)
        };
        let fault = match rng.random_range(0..4) {
            0 => Fault::Kill(Duration::from_millis(rng.random_range(200..4000))),
            // Shorter than the self-fence deadline (2.5 s).
            1 => Fault::Pause(Duration::from_millis(rng.random_range(200..2000))),
            // Past the self-fence deadline, shorter than the leader's lease expiry (6 s).
            2 => Fault::Pause(Duration::from_millis(rng.random_range(3000..5500))),
            // Longer than the lease expiry: the node's jobs move elsewhere.
            _ => Fault::Pause(Duration::from_millis(rng.random_range(7000..12000))),
        };
        let id = c.procs[target].id;
        eprintln!(
            "chaos {:>5.1}s: node {id}: {fault:?}",
            started.elapsed().as_secs_f64()
        );
        match fault {
            Fault::Kill(down) => {
                kills += 1;
                let from_ms = wall_ms();
                c.procs[target].kill9();
                drop(c);
                tokio::time::sleep(down).await;
                cluster.lock().await.procs[target].start(&[]);
                faults.push(FaultEvent {
                    node: id,
                    kind: "sigkill",
                    from_ms,
                    to_ms: wall_ms(),
                });
            }
            Fault::Pause(down) => {
                pauses += 1;
                let from_ms = wall_ms();
                c.procs[target].pause();
                drop(c);
                tokio::time::sleep(down).await;
                cluster.lock().await.procs[target].resume();
                faults.push(FaultEvent {
                    node: id,
                    kind: "sigstop",
                    from_ms,
                    to_ms: wall_ms(),
                });
            }
        }
    }

    // Heal: every node running; stop the stream and wait for every acknowledged job.
    let c = cluster.lock().await;
    stop.cancel();
    let (submitted, acked) = stream.await.unwrap();
    eprintln!(
        "chaos: healed after {:?} ({kills} kills, {pauses} pauses); submitted {submitted}, \
         acknowledged {}",
        started.elapsed(),
        acked.len()
    );
    c.wait_ready(3, Duration::from_secs(30)).await;
    let jobs = c.wait_finished(&acked, Duration::from_secs(120)).await;
    // Orphaned commands of killed nodes sleep at most 2.5 s before reporting to the sink.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = c.sink.calls();
    let v = check(&jobs, &calls, c.stale_completions().await, &faults);
    eprintln!("chaos: seed {seed}, submitted {submitted}; faults (wall-clock ms):");
    for f in &faults {
        eprintln!("  node {} {} {}..{}", f.node, f.kind, f.from_ms, f.to_ms);
    }
    v.print("chaos");
    eprintln!("chaos test took {:?}", started.elapsed());
    assert!(
        acked.len() > 50,
        "too few jobs acknowledged: {}",
        acked.len()
    );
    assert_eq!(v.lost, 0, "lost jobs (seed {seed})");
    assert_eq!(v.duplicated, 0, "duplicated jobs (seed {seed})");
    assert_eq!(
        v.not_applied_once, 0,
        "jobs not applied exactly once (seed {seed})"
    );
    assert_eq!(
        v.succeeded_not_last, 0,
        "stale completions accepted (seed {seed})"
    );
}

/// The kill grace of the `shaped` kind and of the nodes' leases (the defaults).
const KILL_GRACE: Duration = Duration::from_secs(1);

/// `lease.self-fence-after` of the nodes (the default): the lease deadline a guard enforces is
/// at most this long after the node stopped renewing.
const SELF_FENCE_AFTER: Duration = Duration::from_millis(2500);

/// Scheduling slack on a busy machine, for "dead by".
const SLACK: Duration = Duration::from_millis(1500);

fn shaped_job(shape: &str, secs: u32) -> pb::JobSpec {
    pb::JobSpec {
        kind: "shaped".into(),
        payload: format!("{shape} {secs}\n").into_bytes(),
        max_attempts: 100,
        timeout_ms: 120_000,
        ..Default::default()
    }
}

/// One attempt of a `shaped` job on the node a test kills or stops, and its processes.
#[derive(Debug)]
struct Stranded {
    job: u64,
    token: u64,
    shape: &'static str,
    pids: Vec<(String, Pid)>,
}

/// Whether `pid` still runs. A zombie counts as dead: it runs nothing (and in some containers
/// nobody reaps the orphans of a dead guard).
fn running(pid: Pid) -> bool {
    match kill(pid, None) {
        Err(nix::errno::Errno::ESRCH) => false,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        }),
    }
}

/// Waits (up to 20 s) for the pids a `shaped` attempt's processes write.
async fn read_shaped_pids(pids: &Path, job: u64, token: u64, roles: &[&str]) -> Vec<(String, Pid)> {
    let dir = pids.join(format!("{job}-{token}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    for role in roles {
        loop {
            let pid = std::fs::read_to_string(dir.join(role))
                .ok()
                .and_then(|t| t.trim().parse().ok());
            if let Some(pid) = pid {
                out.push((role.to_string(), Pid::from_raw(pid)));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} token {token}: no pid for {role} in {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    out
}

/// Submits six `shaped` jobs of every shape, each working `secs` before its effect, waits until
/// all run, and picks a follower running every shape. Returns every job id, the follower's id,
/// and its attempts with their processes' pids (all running).
async fn strand_every_shape(
    cluster: &Cluster,
    leader: u64,
    secs: u32,
) -> (Vec<u64>, u64, Vec<Stranded>) {
    let shapes: Vec<usize> = (0..6).flat_map(|_| 0..SHAPES.len()).collect();
    let specs = shapes
        .iter()
        .map(|&s| shaped_job(SHAPES[s].0, secs))
        .collect();
    let ids = cluster.submit(specs).await.expect("submit");
    let shape_of: BTreeMap<u64, usize> = ids.iter().copied().zip(shapes).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let attempts = loop {
        let attempts = running_attempts(cluster, &ids).await;
        if attempts.len() == ids.len() {
            break attempts;
        }
        assert!(Instant::now() < deadline, "jobs not started: {attempts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The planner fills the emptiest node first, so the jobs go round the nodes and each one
    // gets every shape; take a follower, so the kill costs no election.
    let mut shapes_on: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    for (job, (node, _)) in &attempts {
        shapes_on.entry(*node).or_default().insert(shape_of[job]);
    }
    let victim = shapes_on
        .iter()
        .find(|(&node, shapes)| node != leader && shapes.len() == SHAPES.len())
        .map(|(&node, _)| node)
        .unwrap_or_else(|| panic!("no follower runs every shape: {shapes_on:?}"));
    let mut stranded = Vec::new();
    for (&job, &(node, token)) in &attempts {
        if node == victim {
            let (shape, roles) = SHAPES[shape_of[&job]];
            let pids = read_shaped_pids(&cluster.pids, job, token, roles).await;
            for (role, pid) in &pids {
                assert!(
                    running(*pid),
                    "job {job} ({shape}): {role} {pid} is not running"
                );
            }
            stranded.push(Stranded {
                job,
                token,
                shape,
                pids,
            });
        }
    }
    (ids, victim, stranded)
}

/// Waits until none of the stranded processes runs; panics at `deadline`.
async fn wait_dead(stranded: &[Stranded], deadline: Instant, what: &str) {
    loop {
        let alive: Vec<String> = stranded
            .iter()
            .flat_map(|s| {
                s.pids
                    .iter()
                    .filter(|(_, p)| running(*p))
                    .map(move |(role, pid)| format!("job {} ({}) {role} {pid}", s.job, s.shape))
            })
            .collect();
        if alive.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still running: {alive:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// For every stranded attempt: no call to the sink at or after `fault_ms` (the old attempt's
/// processes were dead before they could make one) and, the property a downstream needs, none
/// after the job's next attempt started.
fn assert_no_stale_effect(
    stranded: &[Stranded],
    jobs: &BTreeMap<u64, pb::Job>,
    calls: &[SinkCall],
    fault_ms: u64,
) {
    for s in stranded {
        let job = &jobs[&s.job];
        let new_start = job
            .attempts
            .iter()
            .filter(|a| a.token > s.token)
            .map(|a| a.started_at_ms)
            .min()
            .unwrap_or_else(|| panic!("job {} ({}): no newer attempt: {job:?}", s.job, s.shape));
        let old: Vec<&SinkCall> = calls
            .iter()
            .filter(|c| c.job == s.job && c.token == s.token)
            .collect();
        eprintln!(
            "job {} ({}): next attempt started {} ms after the fault; calls of the old attempt: \
             {old:?}",
            s.job,
            s.shape,
            new_start.saturating_sub(fault_ms)
        );
        assert!(
            old.iter().all(|c| c.at_ms < new_start),
            "job {} ({}): the old attempt's effect arrived after the new attempt started at \
             {new_start}: {old:?}",
            s.job,
            s.shape
        );
        assert!(
            old.iter().all(|c| c.at_ms < fault_ms),
            "job {} ({}): the old attempt called the sink after the fault at {fault_ms}: {old:?}",
            s.job,
            s.shape
        );
    }
}

/// SIGKILL of `exactlyd` (the daemon alone, as a crash) while it runs `exec` commands of every
/// shape their processes can take: a shell wrapper whose child does the work (`sh -c 'bash …'`,
/// as in the original report), a grandchild, a `setsid` child and a double-forked daemon, each
/// worker ignoring SIGTERM and reporting its effect to the sink 10 s in. The exec guards see
/// their control pipes close and every process of every tree is dead within the kill grace (plus
/// slack); so no effect of an old attempt reaches the sink after the kill, let alone after the
/// job's new attempt started elsewhere; and every job's effect is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_node_kills_every_shape_of_its_commands() {
    let started = Instant::now();
    let mut cluster = Cluster::start(3);
    let status = cluster.wait_ready(3, Duration::from_secs(30)).await;
    let (ids, victim, stranded) = strand_every_shape(&cluster, status.leader_id, 10).await;
    let i = cluster.index_of(victim);
    let killed_ms = wall_ms();
    let killed_at = Instant::now();
    cluster.procs[i].kill9();
    eprintln!(
        "SIGKILL node {victim} (leader {}), running {} attempts: {:?}",
        status.leader_id,
        stranded.len(),
        stranded
            .iter()
            .map(|s| (s.job, s.token, s.shape))
            .collect::<Vec<_>>()
    );
    wait_dead(&stranded, killed_at + KILL_GRACE + SLACK, "after SIGKILL").await;
    eprintln!(
        "every process of node {victim}'s attempts was dead {:?} after the SIGKILL",
        killed_at.elapsed()
    );
    let kill = FaultEvent {
        node: victim,
        kind: "sigkill",
        from_ms: killed_ms,
        to_ms: wall_ms(),
    };

    let jobs = cluster.wait_finished(&ids, Duration::from_secs(90)).await;
    let calls = cluster.sink.calls();
    assert_no_stale_effect(&stranded, &jobs, &calls, killed_ms);
    let v = check(&jobs, &calls, cluster.stale_completions().await, &[kill]);
    v.print("sigkill, every shape");
    assert_eq!(v.lost, 0, "lost jobs");
    assert_eq!(v.duplicated, 0, "duplicated jobs");
    assert_eq!(v.not_applied_once, 0, "jobs not applied exactly once");
    assert_eq!(v.succeeded_not_last, 0, "stale completions accepted");
    eprintln!("sigkill shapes test took {:?}", started.elapsed());
}

/// Polls `pids` (every 5 ms, up to `limit`) and returns when each was first seen dead, in
/// wall-clock ms (the clock the leader stamps attempts with); `u64::MAX` for one still running.
fn death_times(pids: &[Pid], limit: Duration) -> HashMap<Pid, u64> {
    let until = Instant::now() + limit;
    let mut dead: HashMap<Pid, u64> = HashMap::new();
    let mut left: HashSet<Pid> = pids.iter().copied().collect();
    while !left.is_empty() && Instant::now() < until {
        left.retain(|&pid| {
            let alive = running(pid);
            if !alive {
                dead.insert(pid, wall_ms());
            }
            alive
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    dead.extend(left.into_iter().map(|pid| (pid, u64::MAX)));
    dead
}

/// SIGSTOP of `exactlyd` alone (`kill -STOP <pid>`: its exec guards and commands are not
/// stopped) for longer than its lease, while it runs commands of every shape whose workers
/// ignore SIGTERM and would report their effect 12 s in. No extension reaches the guards, which
/// kill every tree by the lease deadline + the kill grace: every process is seen dead before the
/// leader reassigns its job (it waits `lease.expire-after`, 6 s), no effect of an old attempt
/// reaches the sink after the stop, and once the node is woken every job's effect is applied
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_exactlyd_alone_kills_its_commands_before_the_leader_reassigns() {
    let started = Instant::now();
    let mut cluster = Cluster::start(3);
    let status = cluster.wait_ready(3, Duration::from_secs(30)).await;
    let (ids, victim, stranded) = strand_every_shape(&cluster, status.leader_id, 12).await;
    let i = cluster.index_of(victim);
    let stopped_ms = wall_ms();
    cluster.procs[i].stop_alone();
    eprintln!(
        "SIGSTOP node {victim} alone (leader {}), running {} attempts",
        status.leader_id,
        stranded.len()
    );
    let tracked: Vec<Pid> = stranded
        .iter()
        .flat_map(|s| s.pids.iter().map(|(_, p)| *p))
        .collect();
    let deaths =
        tokio::task::spawn_blocking(move || death_times(&tracked, Duration::from_secs(30)));

    // The moment the leader reassigned each stranded job (its next attempt's start).
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut reassigned: BTreeMap<u64, u64> = BTreeMap::new();
    while reassigned.len() < stranded.len() {
        for s in &stranded {
            if let Some(job) = cluster.get(s.job).await {
                if let Some(a) = job.attempts.iter().find(|a| a.token > s.token) {
                    reassigned.insert(s.job, a.started_at_ms);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "stranded jobs not reassigned: {reassigned:?}; {}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deaths = deaths.await.unwrap();
    let dead_by_ms = stopped_ms + (SELF_FENCE_AFTER + KILL_GRACE + SLACK).as_millis() as u64;
    for s in &stranded {
        let reassigned_ms = reassigned[&s.job];
        for (role, pid) in &s.pids {
            let dead_ms = deaths[pid];
            assert!(
                dead_ms < reassigned_ms,
                "job {} ({}): {role} {pid} still ran when the leader reassigned the job at \
                 {reassigned_ms} (seen dead at {dead_ms})",
                s.job,
                s.shape
            );
            assert!(
                dead_ms <= dead_by_ms,
                "job {} ({}): {role} {pid} seen dead {} ms after the stop",
                s.job,
                s.shape,
                dead_ms.saturating_sub(stopped_ms)
            );
        }
        let last_death = s.pids.iter().map(|(_, p)| deaths[p]).max().unwrap_or(0);
        eprintln!(
            "job {} ({}): processes dead {} ms after the stop, {} ms before the reassignment",
            s.job,
            s.shape,
            last_death - stopped_ms,
            reassigned_ms - last_death
        );
    }
    cluster.procs[i].resume();
    let stop = FaultEvent {
        node: victim,
        kind: "sigstop",
        from_ms: stopped_ms,
        to_ms: wall_ms(),
    };

    let jobs = cluster.wait_finished(&ids, Duration::from_secs(90)).await;
    // Let a late completion of the woken node arrive before looking.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = cluster.sink.calls();
    assert_no_stale_effect(&stranded, &jobs, &calls, stopped_ms);
    let v = check(&jobs, &calls, cluster.stale_completions().await, &[stop]);
    v.print("sigstop alone, every shape");
    assert_eq!(v.lost, 0, "lost jobs");
    assert_eq!(v.duplicated, 0, "duplicated jobs");
    assert_eq!(v.not_applied_once, 0, "jobs not applied exactly once");
    assert_eq!(v.succeeded_not_last, 0, "stale completions accepted");
    eprintln!("sigstop alone test took {:?}", started.elapsed());
}
