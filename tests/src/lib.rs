//! Fixtures for cluster-level tests: an in-process cluster of real nodes on loopback, and a
//! ledger handler that counts executions per job so tests can prove each ran exactly once.
//!
//! For tests under faults: [`faults`] (a seeded fault controller for node-to-node traffic),
//! [`disk`] (a simulated disk per node: what was durable when, and a power switch),
//! [`harness`] (a cluster whose nodes each run on their own runtime thread, so they can be
//! crashed, with or without losing unsynced writes, restarted and paused, and seeded fault
//! schedules), [`history`] (a recorder and a Jepsen-style checker) and [`workload`] (the
//! clients, and one chaos run end to end).

pub mod disk;
pub mod faults;
pub mod harness;
pub mod history;
pub mod workload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exactly_handlers::{Handler, HandlerOutcome, JobContext, Registry};
use exactly_node::{NodeConfig, RunningNode};
use exactly_proto::v1 as pb;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// One execution as the ledger saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Execution {
    pub job: u64,
    pub token: u64,
    pub node: u64,
}

/// Counts executions per job across every node of an in-process cluster.
#[derive(Default)]
pub struct Ledger {
    executions: Mutex<Vec<Execution>>,
}

impl Ledger {
    pub fn executions(&self) -> Vec<Execution> {
        self.executions.lock().unwrap().clone()
    }

    /// Executions per job id.
    pub fn counts(&self) -> HashMap<u64, usize> {
        let mut counts = HashMap::new();
        for e in self.executions.lock().unwrap().iter() {
            *counts.entry(e.job).or_insert(0) += 1;
        }
        counts
    }
}

/// A handler that records each execution in a [`Ledger`] and succeeds.
pub struct LedgerHandler(pub Arc<Ledger>);

impl Handler for LedgerHandler {
    fn run(
        &self,
        ctx: JobContext,
        _cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        self.0.executions.lock().unwrap().push(Execution {
            job: ctx.job_id,
            token: ctx.fencing_token,
            node: ctx.node_id,
        });
        Box::pin(async { HandlerOutcome::Succeeded(Vec::new()) })
    }
}

/// The kind under which [`LedgerHandler`] is registered.
pub const LEDGER_KIND: &str = "ledger";

/// A free loopback port for a test node to listen on, from 10000–19999: below the kernel's
/// ephemeral range (32768–60999 by default), where no outgoing connection ever gets a port, and
/// below the container test's host ports (20000–31999). A node the fault harness restarts comes
/// back on its old port; with port 0 the kernel could hand that port to another test's
/// connection while the node was down (CI saw `cannot listen on 127.0.0.1:46469: Address
/// already in use` for a chaos seed's restart). Each call takes the next candidate that binds,
/// from a start that differs per process.
pub fn free_port() -> u16 {
    free_port_in(10_000, 10_000)
}

/// A free loopback port in `first..first + span` that binds now; each call (in any range)
/// takes the next candidate of one per-process sequence, so a process never picks a port twice
/// while its range lasts.
pub fn free_port_in(first: u16, span: u16) -> u16 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU16> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        std::sync::atomic::AtomicU16::new(seed as u16)
    });
    for _ in 0..span {
        let port = first + next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {first}..{}", first + span)
}

/// A configuration for an in-process test node: loopback, a port from [`free_port`], fast
/// elections.
pub fn test_config(dir: &std::path::Path, node_id: u64) -> NodeConfig {
    let mut c = NodeConfig {
        node_id: Some(node_id),
        data_dir: dir.join(format!("node-{node_id}")),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        ..NodeConfig::default()
    };
    c.raft.heartbeat_interval = Duration::from_millis(50);
    c.raft.election_timeout_min = Duration::from_millis(300);
    c.raft.election_timeout_max = Duration::from_millis(600);
    c.limits.propose_timeout = Duration::from_secs(3);
    c
}

/// An in-process cluster of real nodes talking gRPC over loopback.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<RunningNode>,
    pub ledger: Arc<Ledger>,
}

impl TestCluster {
    /// The built-ins, the kinds `config` defines (`[exec.*]`, `[http.*]`, as `exactlyd`
    /// registers them) and the ledger.
    fn registry(ledger: &Arc<Ledger>, config: &NodeConfig) -> anyhow::Result<Registry> {
        let mut r = Registry::with_builtins();
        config.register_kinds(&mut r)?;
        r.register(LEDGER_KIND, Arc::new(LedgerHandler(ledger.clone())));
        Ok(r)
    }

    /// Starts `n` nodes: node 1 bootstraps, the others join through it. Node-to-node traffic
    /// has its own listener (`peer-listen`), as in production; the fault harness
    /// (`harness.rs`) covers nodes that share one port.
    pub async fn start(n: u64, tweak: impl Fn(&mut NodeConfig)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ledger = Arc::new(Ledger::default());
        let mut nodes = Vec::new();
        let mut first = test_config(dir.path(), 1);
        first.init = true;
        first.peer_listen = Some("127.0.0.1:0".parse()?);
        tweak(&mut first);
        let registry = Self::registry(&ledger, &first)?;
        let n1 = exactly_node::start(first, registry).await?;
        let seed = n1.peer_addr.clone();
        nodes.push(n1);
        for id in 2..=n {
            let mut c = test_config(dir.path(), id);
            c.peer_listen = Some("127.0.0.1:0".parse()?);
            c.join = vec![seed.clone()];
            tweak(&mut c);
            let registry = Self::registry(&ledger, &c)?;
            nodes.push(exactly_node::start(c, registry).await?);
        }
        let cluster = Self { dir, nodes, ledger };
        cluster.wait_members(n as usize).await?;
        Ok(cluster)
    }

    /// Waits until every node sees `n` registered nodes in its state machine.
    pub async fn wait_members(&self, n: usize) -> anyhow::Result<()> {
        wait_for(Duration::from_secs(30), || {
            self.nodes
                .iter()
                .all(|node| node.node.read(|t| t.nodes().len()) == n)
        })
        .await
    }

    /// Waits until every node has applied job `id` as succeeded, or fails after `limit`.
    pub async fn wait_succeeded(&self, id: u64, limit: Duration) -> anyhow::Result<()> {
        wait_for(limit, || {
            self.nodes.iter().all(|n| {
                n.node.read_view(|t| {
                    t.job(id)
                        .is_some_and(|j| j.status == exactly_core::JobStatus::Succeeded)
                })
            })
        })
        .await
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://{}", n.addr))
            .collect()
    }

    pub async fn jobs_client(
        &self,
        i: usize,
    ) -> anyhow::Result<pb::jobs_client::JobsClient<tonic::transport::Channel>> {
        Ok(pb::jobs_client::JobsClient::connect(format!("http://{}", self.nodes[i].addr)).await?)
    }

    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// Polls `f` every 20 ms until it holds, or fails after `limit`.
pub async fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("condition not met within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A job spec for the ledger handler.
pub fn ledger_job(payload: &[u8]) -> pb::JobSpec {
    pb::JobSpec {
        kind: LEDGER_KIND.to_string(),
        payload: payload.to_vec(),
        ..Default::default()
    }
}

/// One HTTP/1.0 GET of `path` from `addr` (with an `Authorization` header if given): the status
/// code and the whole response, headers included.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    get_over(stream, path, authorization).await
}

/// [`http_get`] over TLS, trusting the CA `ca_pem` and expecting the name `127.0.0.1`.
pub async fn https_get(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    path: &str,
    authorization: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let stream = connector.connect(name, tcp).await?;
    get_over(stream, path, authorization).await
}

async fn get_over(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    path: &str,
    authorization: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await?;
    let mut bytes = Vec::new();
    // A TLS peer may close without close_notify after an HTTP/1.0 answer: keep what came.
    if let Err(e) = stream.read_to_end(&mut bytes).await {
        if bytes.is_empty() {
            return Err(e.into());
        }
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, text))
}
