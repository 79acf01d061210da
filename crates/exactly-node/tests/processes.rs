//! Real-process tests: `exactlyd` binaries on loopback, killed with SIGKILL mid-stream, and
//! stopped with SIGTERM (drain and leave) and restarted.
//!
//! Each node runs an `exec` kind that appends "job token node" to a shared ledger file, so the
//! test sees every execution that real processes made, and checks it against the state machine.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use exactly_proto::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

type Jobs = pb::jobs_client::JobsClient<tonic::transport::Channel>;

struct Proc {
    id: u64,
    port: u16,
    /// The peer port, when the cluster runs with peer TLS.
    peer_port: Option<u16>,
    config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What other nodes dial: the peer port if there is one.
    fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port.unwrap_or(self.port))
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

    /// SIGKILL: no shutdown path runs, unsynced data is at the mercy of what was fsync'd.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Proc {
    /// Sends SIGTERM (what a container stop or `systemctl stop` sends).
    fn term(&self) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
    }

    /// Waits up to `limit` for the process to exit; returns how long it took and its status.
    async fn wait_exit(&mut self, limit: Duration) -> Option<(Duration, std::process::ExitStatus)> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some((started.elapsed(), status));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    /// Holds the nodes' directories (removed when the cluster is dropped).
    _dir: tempfile::TempDir,
    procs: Vec<Proc>,
    ledger: PathBuf,
}

/// A failing test shows the end of every node's log (its directory is removed with it).
impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for p in &self.procs {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "---- node {} (port {}), last {} lines of its log:\n{}",
                p.id,
                p.port,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A node's config file; with `peer` (a peer port and the directory of `exactly_client::certs`
/// files), node-to-node traffic on that port under mutual TLS.
fn write_config(
    dir: &Path,
    id: u64,
    port: u16,
    ledger: &Path,
    peer: Option<(u16, &Path)>,
) -> PathBuf {
    let path = dir.join(format!("node-{id}.toml"));
    let peer_section = peer.map_or_else(String::new, |(_, certs)| {
        format!(
            "\n[peer-tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            ca = certs.join("ca.pem").display(),
            cert = certs.join(format!("node-{id}.pem")).display(),
            key = certs.join(format!("node-{id}.key")).display(),
        )
    });
    let peer_listen = peer.map_or_else(String::new, |(peer_port, _)| {
        format!("peer-listen = \"127.0.0.1:{peer_port}\"\n")
    });
    let text = format!(
        r#"
{peer_listen}node-id = {id}
data-dir = "{data}"
listen = "127.0.0.1:{port}"
slots = 64

[limits]
propose-timeout = "3s"

[exec.record]
command = "/bin/sh"
args = ["-c", "echo \"$EXACTLY_JOB_ID $EXACTLY_FENCING_TOKEN $EXACTLY_NODE_ID\" >> {ledger}"]
"#,
        data = dir.join(format!("data-{id}")).display(),
        ledger = ledger.display(),
    ) + &peer_section;
    std::fs::write(&path, text).unwrap();
    path
}

impl Cluster {
    fn start(n: u64) -> Self {
        Self::start_with(n, false)
    }

    /// With `peer_tls`, each node serves node-to-node traffic on a peer port under mutual TLS,
    /// with a certificate from one CA (`exactly_client::certs`).
    fn start_with(n: u64, peer_tls: bool) -> Self {
        // Each node runs the `record` exec kind, so it needs its exec guard.
        common::exec_guard_binary();
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger.txt");
        let certs = dir.path().join("certs");
        if peer_tls {
            use exactly_client::certs::{issue_node, new_ca};
            std::fs::create_dir_all(&certs).unwrap();
            let ca = new_ca(1).unwrap();
            std::fs::write(certs.join("ca.pem"), &ca.cert).unwrap();
            for id in 1..=n {
                let node = issue_node(&ca, id, 1).unwrap();
                std::fs::write(certs.join(format!("node-{id}.pem")), node.cert).unwrap();
                std::fs::write(certs.join(format!("node-{id}.key")), node.key).unwrap();
            }
        }
        let mut procs: Vec<Proc> = (1..=n)
            .map(|id| {
                let port = common::free_port();
                let peer_port = peer_tls.then(common::free_port);
                let peer = peer_port.map(|p| (p, certs.as_path()));
                Proc {
                    id,
                    port,
                    peer_port,
                    config: write_config(dir.path(), id, port, &ledger, peer),
                    child: None,
                    log: dir.path().join(format!("node-{id}.log")),
                }
            })
            .collect();
        let seed = procs[0].peer_addr();
        procs[0].start(&["--init"]);
        for p in procs.iter_mut().skip(1) {
            p.start(&["--join", &seed]);
        }
        Self {
            _dir: dir,
            procs,
            ledger,
        }
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.procs[i].addr())
    }

    async fn status(&self, i: usize) -> Option<pb::StatusResponse> {
        let mut c = pb::cluster_client::ClusterClient::connect(self.endpoint(i))
            .await
            .ok()?;
        c.status(pb::StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits until some node reports a leader and `n` registered members.
    async fn wait_ready(&self, n: usize, limit: Duration) -> pb::StatusResponse {
        let deadline = Instant::now() + limit;
        loop {
            for i in 0..self.procs.len() {
                if let Some(s) = self.status(i).await {
                    let registered = s.members.iter().filter(|m| m.incarnation > 0).count();
                    if s.leader_id != 0 && s.members.len() == n && registered == n {
                        return s;
                    }
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .procs
                    .iter()
                    .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
                    .collect();
                panic!(
                    "cluster not ready within {limit:?}; logs:\n{}",
                    logs.join("\n----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn index_of(&self, node_id: u64) -> usize {
        self.procs.iter().position(|p| p.id == node_id).unwrap()
    }

    /// Connected clients to every node (for many reads).
    async fn clients(&self) -> Vec<Jobs> {
        let mut clients = Vec::new();
        for i in 0..self.procs.len() {
            if let Ok(c) = Jobs::connect(self.endpoint(i)).await {
                clients.push(c);
            }
        }
        clients
    }

    async fn get(clients: &mut [Jobs], id: u64) -> Option<pb::Job> {
        for c in clients.iter_mut() {
            if let Ok(r) = c
                .get(pb::GetRequest {
                    job_id: id,
                    ..Default::default()
                })
                .await
            {
                return r.into_inner().job;
            }
        }
        None
    }

    fn ledger(&self) -> Vec<(u64, u64, u64)> {
        std::fs::read_to_string(&self.ledger)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace().map(|x| x.parse::<u64>());
                Some((it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?))
            })
            .collect()
    }
}

fn record_job(i: usize) -> pb::JobSpec {
    pb::JobSpec {
        kind: "record".into(),
        payload: format!("job-{i}").into_bytes(),
        max_attempts: 5,
        ..Default::default()
    }
}

/// Submits batches round-robin through all nodes until `stop` fires; returns acknowledged ids.
async fn submit_stream(
    endpoints: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<u64> {
    let mut acked = Vec::new();
    let mut i = 0usize;
    while !stop.is_cancelled() {
        let ep = &endpoints[i % endpoints.len()];
        i += 1;
        let Ok(mut c) = Jobs::connect(ep.clone()).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let jobs = (0..20).map(|k| record_job(i * 100 + k)).collect();
        match c.submit(pb::SubmitRequest { jobs }).await {
            Ok(r) => acked.extend(r.into_inner().job_ids),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acked
}

/// Checks that every acknowledged job succeeded exactly once and that every execution the
/// ledger saw belongs to one of the job's attempts, with no token executed twice.
async fn check_exactly_once(cluster: &Cluster, acked: &[u64]) {
    let runs = cluster.ledger();
    let mut by_job: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut tokens = BTreeSet::new();
    for (job, token, _node) in &runs {
        by_job.entry(*job).or_default().push(*token);
        assert!(
            tokens.insert((*job, *token)),
            "job {job} token {token} executed twice"
        );
    }
    let mut reruns = 0;
    let mut clients = cluster.clients().await;
    for &id in acked {
        let job = Cluster::get(&mut clients, id)
            .await
            .unwrap_or_else(|| panic!("acknowledged job {id} lost"));
        assert_eq!(
            job.state,
            pb::JobState::Succeeded as i32,
            "job {id}: {job:?}"
        );
        let succeeded: Vec<_> = job
            .attempts
            .iter()
            .filter(|a| a.outcome == "succeeded")
            .collect();
        assert_eq!(succeeded.len(), 1, "job {id} completed once: {job:?}");
        let executed = by_job.get(&id).cloned().unwrap_or_default();
        assert!(
            executed.contains(&succeeded[0].token),
            "job {id}: the succeeded attempt's token {} was executed ({executed:?})",
            succeeded[0].token
        );
        let attempt_tokens: BTreeSet<u64> = job.attempts.iter().map(|a| a.token).collect();
        for t in &executed {
            assert!(
                attempt_tokens.contains(t),
                "job {id}: execution with unknown token {t}"
            );
        }
        reruns += executed.len() - 1;
    }
    eprintln!(
        "checked {} acknowledged jobs, {} executions, {reruns} re-runs after a crash",
        acked.len(),
        runs.len()
    );
}

/// Three exactlyd processes take a stream of jobs while the leader is SIGKILLed and restarted:
/// every acknowledged job completes exactly once, and the restarted node rejoins and catches up.
/// The nodes speak to each other on peer ports under mutual TLS (`[peer-tls]`), so this is also
/// where real processes with certificates elect, replicate, forward and rejoin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_and_restart_loses_nothing_and_runs_once() {
    let mut cluster = Cluster::start_with(3, true);
    cluster.wait_ready(3, Duration::from_secs(60)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let endpoints: Vec<String> = (0..3).map(|i| cluster.endpoint(i)).collect();
    let stream = tokio::spawn(submit_stream(endpoints, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    for round in 0..2 {
        let status = cluster.wait_ready(3, Duration::from_secs(60)).await;
        let leader = cluster.index_of(status.leader_id);
        eprintln!("round {round}: SIGKILL leader node {}", status.leader_id);
        cluster.procs[leader].kill9();
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.procs[leader].start(&[]);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.cancel();
    let acked = stream.await.unwrap();
    assert!(
        acked.len() > 100,
        "too few jobs acknowledged: {}",
        acked.len()
    );

    // Every acknowledged job completes, and every node catches up to the same applied index.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut statuses = Vec::new();
        for i in 0..3 {
            statuses.push(cluster.status(i).await);
        }
        let done = statuses.iter().all(|s| {
            s.as_ref().is_some_and(|s| {
                let c = s.counts.unwrap_or_default();
                c.pending == 0 && c.running == 0 && c.succeeded >= acked.len() as u64
            })
        });
        let applied: BTreeSet<u64> = statuses.iter().flatten().map(|s| s.applied_index).collect();
        if done && applied.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all jobs completed: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check_exactly_once(&cluster, &acked).await;
    drop(cluster);
}

/// All three nodes are SIGKILLed together while jobs are being acknowledged; after a restart
/// every acknowledged job is still there (acknowledgement implies fsync on a quorum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_every_node_during_writes_loses_no_acknowledged_job() {
    let mut cluster = Cluster::start(3);
    cluster.wait_ready(3, Duration::from_secs(60)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let endpoints: Vec<String> = (0..3).map(|i| cluster.endpoint(i)).collect();
    let stream = tokio::spawn(submit_stream(endpoints, stop.clone()));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for p in cluster.procs.iter_mut() {
        p.kill9();
    }
    stop.cancel();
    let acked = stream.await.unwrap();
    assert!(!acked.is_empty());
    for p in cluster.procs.iter_mut() {
        p.start(&[]);
    }
    cluster.wait_ready(3, Duration::from_secs(60)).await;
    let mut missing = BTreeMap::new();
    let mut clients = cluster.clients().await;
    for &id in &acked {
        if Cluster::get(&mut clients, id).await.is_none() {
            missing.insert(id, ());
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged jobs lost after SIGKILL: {:?}",
        missing.keys()
    );
    // And they all still complete exactly once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cluster.status(0).await;
        if let Some(c) = s.as_ref().and_then(|s| s.counts) {
            if c.pending == 0 && c.running == 0 && c.succeeded >= acked.len() as u64 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not complete after restart: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check_exactly_once(&cluster, &acked).await;
}

/// SIGTERM on the leader of three exactlyd processes under a stream of jobs: it drains and exits
/// well within its drain deadline, staying a voter (no learner could take its place); the other
/// two elect a new leader and the membership keeps all three voters. Started again with its data
/// it carries on as the same voter. A node stopped with two SIGTERMs while a long job runs exits
/// at once instead of draining. Then SIGTERM to all three at once (the whole cluster stopped):
/// each exits within its drain deadline plus a few seconds, and started again they are the same
/// three voters. Every acknowledged job completes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_a_stopped_cluster_comes_back_whole() {
    let mut cluster = Cluster::start(3);
    cluster.wait_ready(3, Duration::from_secs(60)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let endpoints: Vec<String> = (0..3).map(|i| cluster.endpoint(i)).collect();
    let stream = tokio::spawn(submit_stream(endpoints, stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let status = cluster.wait_ready(3, Duration::from_secs(60)).await;
    let voters: Vec<u64> = status.members.iter().map(|m| m.node_id).collect();
    let leader = cluster.index_of(status.leader_id);
    eprintln!("SIGTERM leader node {}", status.leader_id);
    cluster.procs[leader].term();
    let (took, exit) = cluster.procs[leader]
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the leader exits after draining (drain-deadline is 20 s)");
    assert!(exit.success(), "{exit:?}");
    eprintln!("the leader drained and exited in {took:?}");
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster.status(others[0]).await;
        let ok = s.as_ref().is_some_and(|s| {
            s.leader_id != 0
                && s.leader_id != cluster.procs[leader].id
                && s.members.len() == 3
                && s.members.iter().all(|m| m.role == "voter")
        });
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a new leader, and the stopped node still a voter: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.procs[leader].start(&[]);
    let status = cluster.wait_ready(3, Duration::from_secs(60)).await;
    assert!(
        status.members.iter().all(|m| m.role == "voter"),
        "the restarted node is a voter again: {status:?}"
    );

    // Two SIGTERMs: the second stops the node at once, without waiting for its long job.
    let victim = *others
        .iter()
        .find(|&&i| cluster.procs[i].id != status.leader_id)
        .unwrap();
    let mut c = Jobs::connect(cluster.endpoint(victim)).await.unwrap();
    let long = pb::JobSpec {
        kind: "sleep".into(),
        payload: b"60s".to_vec(),
        max_attempts: 5,
        ..Default::default()
    };
    let long_ids = c
        .submit(pb::SubmitRequest {
            jobs: vec![long; 6],
        })
        .await
        .unwrap()
        .into_inner()
        .job_ids;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.procs[victim].term();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.procs[victim].term();
    let (took, _) = cluster.procs[victim]
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("a second SIGTERM stops the node at once");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    cluster.procs[victim].start(&[]);
    cluster.wait_ready(3, Duration::from_secs(60)).await;

    // The whole cluster stopped at once, while short jobs flow (the minute-long ones are
    // cancelled: draining them would only wait out the drain deadline): once every process
    // answers itself (a process signalled before its main installed its handlers would just die).
    // (`wait_ready` may answer from the registrations of the earlier incarnations before a
    // restarted process listens: CI saw the connection below refused.)
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.status(i).await.is_none() {
            assert!(Instant::now() < deadline, "node {i} does not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut c = Jobs::connect(cluster.endpoint(0)).await.unwrap();
    c.cancel(pb::CancelRequest { job_ids: long_ids })
        .await
        .unwrap();
    let signalled = Instant::now();
    for proc in &cluster.procs {
        proc.term();
    }
    for proc in &mut cluster.procs {
        // drain-deadline (20 s) + kill grace (1 s) + STOP_MARGIN (3 s), and no job is that long.
        let (_, exit) = proc
            .wait_exit(Duration::from_secs(24).saturating_sub(signalled.elapsed()))
            .await
            .expect("every node exits within its drain deadline plus a few seconds");
        assert!(exit.success(), "{exit:?}");
        eprintln!(
            "whole cluster SIGTERM: node {} exited {:?} after the signal",
            proc.id,
            signalled.elapsed()
        );
    }
    stop.cancel();
    let acked = stream.await.unwrap();
    let restarted = Instant::now();
    for proc in &mut cluster.procs {
        proc.start(&[]);
    }
    let status = cluster.wait_ready(3, Duration::from_secs(60)).await;
    eprintln!(
        "whole cluster ready again {:?} after its restart",
        restarted.elapsed()
    );
    let mut now_voters: Vec<u64> = status
        .members
        .iter()
        .filter(|m| m.role == "voter")
        .map(|m| m.node_id)
        .collect();
    now_voters.sort_unstable();
    let mut voters = voters;
    voters.sort_unstable();
    assert_eq!(now_voters, voters, "the same three voters: {status:?}");
    assert!(
        acked.len() > 50,
        "too few jobs acknowledged: {}",
        acked.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut clients = cluster.clients().await;
    for &id in &acked {
        loop {
            let job = Cluster::get(&mut clients, id).await;
            if job
                .as_ref()
                .is_some_and(|j| j.state == pb::JobState::Succeeded as i32)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not complete: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    check_exactly_once(&cluster, &acked).await;
}
