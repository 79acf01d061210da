//! Container tests: the deployment files parse, and a 3-node cluster of the real image survives
//! container faults with every job's effect applied exactly once.
//!
//! The fault test runs when `docker info` succeeds and skips, saying why, otherwise. It builds
//! the image with `scripts/docker-image.sh` (or uses `EXACTLY_DOCKER_IMAGE` as given), creates
//! a private network, a fencing sink container and three node containers (node 1 `--init`, the
//! others `--join`, named volumes, `cluster-config/containers/node.toml`), all named after this
//! run, and removes all of it at the end, on failure too (and leftovers of runs that were
//! killed, by label, at the start). While a client on the host streams jobs of the `effect`
//! kind (each calls the sink with its job id and fencing token), it:
//!
//! 1. kills the leader's container (SIGKILL) and starts it again;
//! 2. cuts one follower off the network (`docker network disconnect`) for longer than the lease
//!    expiry and connects it again;
//! 3. scales the cluster from 3 to 5 nodes (two more containers `--join`; they become learners
//!    that run jobs);
//! 4. drains and removes two nodes, back to 3: `exactly cluster drain` (run in the leader's
//!    container) on a voter, whose running jobs finish before it leaves and a learner is
//!    promoted in its place; then kills a learner's container and `exactly cluster remove`s it
//!    (its jobs move once its lease expired);
//! 5. kills a follower's container and recreates it under a new host name on its volume (what
//!    `docker compose up --force-recreate` does): the same node id comes back at a new address;
//! 6. restarts every remaining node, one at a time (`docker restart`: SIGTERM, then a new start).
//!
//! Then it checks, from the jobs' records and the sink's call log: zero lost, zero duplicated,
//! zero stale accepted, every acknowledged job completed, and every node kept its id.
//!
//! The cluster runs as a production one should (README, "Security"): node-to-node traffic on
//! its own port with mutual TLS (a certificate per node id, made by this test with
//! `exactly_client::certs`), TLS and bearer tokens on the public port, the client and the CLI
//! with the cluster's CA and an admin token; no node runs `--insecure`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use exactly_client::{Client, ClientOptions, Job, JobSpec, JobState};
use exactly_node::NodeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Nodes the cluster starts with (all voters: `voters-target` is 3).
const NODES: usize = 3;
/// Nodes after the scale-up step (the two added ones join as learners).
const NODES_SCALED: usize = 5;
/// Container slots: the scaled cluster plus one for a node recreated under a new host name.
const NODE_SLOTS: usize = NODES_SCALED + 1;
/// The gRPC and HTTP ports inside every node container (the image's defaults), and the peer
/// port (node-to-node traffic, mutual TLS).
const GRPC_PORT: u16 = 7101;
const HTTP_PORT: u16 = 8101;
const PEER_PORT: u16 = 7201;
/// Where the certificates and the tokens file are mounted in every node container.
const CERTS: &str = "/certs";
/// The sink's port inside its container, and its network alias (the config's default address).
const SINK_PORT: u16 = 9090;
const SINK_ALIAS: &str = "sink";
/// Label on everything a run creates; the value is the test process's pid.
const LABEL: &str = "exactly.docker-test";

/// Jobs per submitted batch, and the pause between batches (about 20 jobs/s).
const BATCH_JOBS: usize = 5;
const SUBMIT_PAUSE: Duration = Duration::from_millis(250);
/// Attempts per job: enough that the faults (each can end one attempt) never exhaust them.
const JOB_ATTEMPTS_MAX: u32 = 20;
/// How long a node stays cut off: longer than `lease.expire-after` (6 s) in
/// cluster-config/containers/node.toml, so the leader expires its lease and reassigns its jobs.
const CUT_OFF: Duration = Duration::from_secs(9);
/// How long a killed leader stays down.
const KILLED_DOWN: Duration = Duration::from_secs(2);
/// Longest wait for the cluster to be ready after a fault.
const READY_WAIT: Duration = Duration::from_secs(60);
/// Longest wait for every acknowledged job to finish once submitting stops.
const SETTLE_WAIT: Duration = Duration::from_secs(120);
/// The least number of acknowledged jobs for the run to count.
const ACKNOWLEDGED_MIN: usize = 200;
/// How long `docker restart` waits after SIGTERM before it kills.
const STOP_TIMEOUT_S: u32 = 30;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// The deployment files.

/// The container config (`cluster-config/containers/node.toml`) parses and validates, leaves
/// the node id to the data directory and defines the `effect` kind the compose file and the
/// fault test use; the compose file, the Kubernetes manifests (PyYAML) and the systemd unit
/// say what an operator relies on: bootstrap/join, probes, volumes, stop signal and timeouts.
#[test]
fn deployment_files_parse() {
    let config = NodeConfig::from_file(&repo().join("cluster-config/containers/node.toml"))
        .and_then(NodeConfig::validate)
        .expect("cluster-config/containers/node.toml");
    assert_eq!(config.node_id, None, "containers generate their node id");
    assert!(
        config.exec.contains_key("effect"),
        "{:?}",
        config.exec.keys()
    );

    let unit = std::fs::read_to_string(repo().join("cluster-config/systemd/exactlyd.service"))
        .expect("read the systemd unit");
    let keys = unit_keys(&unit);
    for (key, value) in [
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("KillMode", "mixed"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "exactly"),
    ] {
        assert_eq!(keys.get(key).map(String::as_str), Some(value), "{key}");
    }
    let stop = humantime::parse_duration(&keys["TimeoutStopSec"]).expect("TimeoutStopSec");
    assert!(stop >= Duration::from_secs(75), "TimeoutStopSec {stop:?}");

    let Some(docs) = yaml_documents() else {
        return;
    };
    let compose = &docs["compose"][0];
    let services = &compose["services"];
    let command = |s: &str| services[s]["command"].to_string();
    assert!(
        command("node-1").contains("--init"),
        "{}",
        command("node-1")
    );
    for s in ["node-2", "node-3", "worker"] {
        assert!(command(s).contains("--join"), "{s}: {}", command(s));
        assert!(!command(s).contains("--init"), "{s}: {}", command(s));
    }
    assert!(command("sink").contains("exactly-sink"));
    for s in ["node-1", "node-2", "node-3"] {
        let volumes = services[s]["volumes"].to_string();
        assert!(
            volumes.contains(&format!("{s}:/var/lib/exactly")),
            "{s}: {volumes}"
        );
    }
    assert_eq!(services["worker"]["scale"], 0);
    // Secure by default: every node has mutual TLS on its peer port (joins go there), TLS and
    // tokens on its API, certificates from the one-shot `certs` service; none is --insecure.
    assert!(
        command("certs").contains("exactly-certs"),
        "{}",
        command("certs")
    );
    for s in ["node-1", "node-2", "node-3", "worker"] {
        let env = &services[s]["environment"];
        for key in [
            "EXACTLY_PEER_LISTEN",
            "EXACTLY_PEER_TLS_CA",
            "EXACTLY_API_TLS_CERT",
            "EXACTLY_API_TLS_KEY",
            "EXACTLY_TOKENS_FILE",
            "EXACTLY_HTTP_TLS_CERT",
            "EXACTLY_HTTP_TLS_KEY",
        ] {
            assert!(env[key].is_string(), "{s}: no {key} in {env}");
        }
        assert!(env.get("EXACTLY_INSECURE").is_none(), "{s} is insecure");
        assert_eq!(
            services[s]["depends_on"]["certs"]["condition"],
            "service_completed_successfully"
        );
        if s != "worker" {
            let n = &s["node-".len()..];
            assert_eq!(env["EXACTLY_NODE_ID"], n, "{s}");
            assert_eq!(env["EXACTLY_PEER_TLS_CERT"], format!("/certs/node-{n}.pem"));
        }
    }
    for s in ["node-2", "node-3", "worker"] {
        assert!(
            command(s).contains(":7201"),
            "{s} joins a peer port: {}",
            command(s)
        );
    }

    let k8s: Vec<&serde_json::Value> = docs["k8s"].as_array().expect("k8s docs").iter().collect();
    let kinds: BTreeSet<&str> = k8s.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "ConfigMap",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "Kustomization",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
    }
    let by_kind = |kind: &'static str| k8s.iter().copied().filter(move |d| d["kind"] == kind);
    let set = by_kind("StatefulSet").next().expect("a StatefulSet");
    let headless = by_kind("Service")
        .find(|s| s["spec"]["clusterIP"] == "None")
        .expect("a headless Service");
    assert_eq!(set["spec"]["serviceName"], headless["metadata"]["name"]);
    assert_eq!(set["spec"]["podManagementPolicy"], "Parallel");
    assert!(!set["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("volumeClaimTemplates")
        .is_empty());
    let pod = &set["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    assert!(container["lifecycle"]["preStop"].is_object());
    let env: BTreeMap<&str, &serde_json::Value> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, &e["value"])))
        .collect();
    for key in [
        "EXACTLY_PEER_LISTEN",
        "EXACTLY_PEER_TLS_CA",
        "EXACTLY_API_TLS_CERT",
        "EXACTLY_TOKENS_FILE",
        "EXACTLY_HTTP_TLS_CERT",
    ] {
        assert!(env.contains_key(key), "no {key} in the StatefulSet's env");
    }
    assert!(!env.contains_key("EXACTLY_INSECURE"));
    let args = container["args"].to_string();
    assert!(
        args.contains("EXACTLY_PEER_TLS_CERT") && args.contains(":7201"),
        "{args}"
    );
    let init = &pod["initContainers"][0];
    assert!(
        init["args"].to_string().contains("exactly cert node"),
        "{init}"
    );
    let secrets: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(secrets, BTreeSet::from(["exactly-ca", "exactly-tokens"]));
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(grace >= 60, "terminationGracePeriodSeconds {grace}");
    let toml = by_kind("ConfigMap").next().expect("a ConfigMap")["data"]["node.toml"]
        .as_str()
        .expect("node.toml in the ConfigMap");
    NodeConfig::from_toml(toml)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(c.validate()?))
        .expect("the ConfigMap's node.toml");

    // The tools' own checks, where they are installed: kustomize renders the manifests, compose
    // validates its file against its schema.
    for (tool, args) in [
        ("kubectl", vec!["kustomize", "cluster-config/k8s"]),
        (
            "docker-compose",
            vec!["-f", "cluster-config/compose.yaml", "config", "-q"],
        ),
    ] {
        match Command::new(tool).args(&args).current_dir(repo()).output() {
            Ok(out) => assert!(
                out.status.success(),
                "{tool} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("not checked with {tool}: {e}"),
        }
    }
}

/// `Key=Value` lines of a systemd unit (the last one wins, as in systemd for these keys).
fn unit_keys(unit: &str) -> BTreeMap<String, String> {
    unit.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The compose file and every Kubernetes manifest, parsed by PyYAML and handed over as JSON:
/// `{"compose": [doc], "k8s": [doc, ...]}`. None (and a printed reason) without PyYAML.
fn yaml_documents() -> Option<serde_json::Value> {
    const SCRIPT: &str = r#"
import glob, json, os, sys
import yaml
root = sys.argv[1]
def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]
out = {"compose": load(os.path.join(root, "cluster-config/compose.yaml")), "k8s": []}
for path in sorted(glob.glob(os.path.join(root, "cluster-config/k8s/*.yaml"))):
    out["k8s"].extend(load(path))
json.dump(out, sys.stdout)
"#;
    let probe = Command::new("python3")
        .args(["-c", "import yaml"])
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIPPED the YAML checks: python3 with PyYAML is not available \
             (pip install pyyaml)"
        );
        return None;
    }
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(repo())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the YAML does not parse:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("python's JSON"))
}

// ---------------------------------------------------------------------------------------------
// Docker plumbing.

/// Runs `docker ARGS` and returns its trimmed stdout; a failure carries its stderr.
async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("run docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The same, blocking, for teardown in `Drop`; errors are printed, not returned.
fn docker_blocking(args: &[&str]) -> Option<String> {
    match Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into()),
        Ok(out) => {
            eprintln!(
                "docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("docker {}: {e}", args.join(" "));
            None
        }
    }
}

/// Why the container engine cannot be used, if it cannot.
fn docker_unavailable() -> Option<String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`docker info` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("no docker command: {e}")),
    }
}

/// Removes containers, volumes and networks of earlier runs whose test process is gone (a run
/// killed before its teardown).
fn reap_leftovers() {
    let alive = |pid: &str| Path::new("/proc").join(pid.trim()).exists();
    let filter = format!("label={LABEL}");
    let format = format!("{{{{.ID}}}} {{{{.Label \"{LABEL}\"}}}}");
    for (list, remove) in [
        (
            vec!["ps", "-a", "--filter", &filter, "--format", &format],
            vec!["rm", "-f", "-v"],
        ),
        (
            vec!["volume", "ls", "--filter", &filter, "--format", &format],
            vec!["volume", "rm", "-f"],
        ),
        (
            vec!["network", "ls", "--filter", &filter, "--format", &format],
            vec!["network", "rm"],
        ),
    ] {
        let Some(out) = docker_blocking(&list) else {
            continue;
        };
        for line in out.lines() {
            let Some((id, pid)) = line.split_once(' ') else {
                continue;
            };
            if !alive(pid) {
                eprintln!("removing a leftover of test process {pid}: {id}");
                let mut args = remove.clone();
                args.push(id);
                docker_blocking(&args);
            }
        }
    }
}

/// A free TCP port on loopback to publish a container port on, below the kernel's ephemeral
/// range (32768–60999 on Linux by default). The ports are chosen when the deployment is made
/// and bound by docker up to half a minute later (a node added by scaling up): an ephemeral
/// port free at the start could meanwhile be handed to another test's connection or listener
/// (CI saw `bind: address already in use` for a scaled-up node), but the kernel hands out no
/// port below its ephemeral range, and every other test binds port 0. Each call takes the next
/// candidate (from a start that differs per process), so one deployment never picks a port
/// twice.
fn free_port() -> u16 {
    exactly_tests::free_port_in(20_000, 12_000)
}

/// `GET path` on 127.0.0.1:port over HTTP/1.0: the status code and the body.
async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("HTTP timeout")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP answer {head:?}"))?;
    Ok((code, body.to_string()))
}

/// One node's container.
struct NodeBox {
    /// Network alias and advertised host: `node-N`.
    alias: String,
    /// The node id it starts with (a recreated node keeps the id of the one it replaces).
    id: u64,
    container: String,
    volume: String,
    /// Host ports (127.0.0.1) published for the container's gRPC and HTTP ports.
    grpc_port: u16,
    http_port: u16,
}

impl NodeBox {
    fn addr(&self) -> String {
        format!("{}:{GRPC_PORT}", self.alias)
    }

    fn peer_addr(&self) -> String {
        format!("{}:{PEER_PORT}", self.alias)
    }
}

/// The cluster's CA, a peer certificate per node id, one public-port certificate for every
/// node's names, and a tokens file with one admin token, in a directory the containers' user can
/// read; returns the CA certificate and the token.
fn issue_certs(dir: &Path, aliases: &[String], ids: &[u64]) -> anyhow::Result<(String, String)> {
    use exactly_client::certs::{issue_node, issue_server, new_ca};
    use std::os::unix::fs::PermissionsExt;
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        // The containers run as uid 10001: a test's throwaway keys are world-readable.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let ca = new_ca(60)?;
    write("ca.pem", &ca.cert)?;
    for &id in ids {
        let node = issue_node(&ca, id, 60)?;
        write(&format!("node-{id}.pem"), &node.cert)?;
        write(&format!("node-{id}.key"), &node.key)?;
    }
    let mut names: Vec<String> = aliases.to_vec();
    names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
    let api = issue_server(&ca, &names, 60)?;
    write("api.pem", &api.cert)?;
    write("api.key", &api.key)?;
    let token = exactly_client::token::generate();
    write(
        "tokens.toml",
        &format!(
            "[[tokens]]\nname = \"admin\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
            exactly_client::token::digest_hex(&token)
        ),
    )?;
    Ok((ca.cert, token))
}

/// Everything one run creates; dropping it removes all of it.
struct Deployment {
    image: String,
    /// Certificates and tokens (see [`issue_certs`]), mounted read-only at [`CERTS`].
    certs: tempfile::TempDir,
    ca_pem: String,
    token: String,
    network: String,
    nodes: Vec<NodeBox>,
    sink_container: String,
    sink_port: u16,
    /// How many of `nodes` have been started (the first ones).
    started: AtomicUsize,
    /// Aliases of nodes drained or removed from the cluster (their containers are stopped).
    departed: Mutex<BTreeSet<String>>,
    /// The containers and volumes created so far (what teardown removes).
    created: Mutex<(Vec<String>, Vec<String>)>,
    network_created: AtomicBool,
}

impl Deployment {
    fn new(image: String) -> anyhow::Result<Self> {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 1_000_000)
            .unwrap_or(0);
        let run = format!("exactly-dt-{}-{millis}", std::process::id());
        let nodes: Vec<NodeBox> = (1..=NODE_SLOTS)
            .map(|i| NodeBox {
                alias: format!("node-{i}"),
                id: i as u64,
                container: format!("{run}-node-{i}"),
                volume: format!("{run}-data-{i}"),
                grpc_port: free_port(),
                http_port: free_port(),
            })
            .collect();
        let certs = tempfile::tempdir()?;
        let aliases: Vec<String> = nodes.iter().map(|n| n.alias.clone()).collect();
        let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
        let (ca_pem, token) = issue_certs(certs.path(), &aliases, &ids)?;
        Ok(Self {
            image,
            certs,
            ca_pem,
            token,
            network: format!("{run}-net"),
            nodes,
            sink_container: format!("{run}-sink"),
            sink_port: free_port(),
            started: AtomicUsize::new(0),
            departed: Mutex::default(),
            created: Mutex::default(),
            network_created: AtomicBool::new(false),
        })
    }

    /// Client options for this cluster: its CA and the admin token.
    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            token: Some(exactly_client::Token(self.token.clone())),
            ca_pem: Some(self.ca_pem.clone()),
            ..ClientOptions::default()
        }
    }

    fn label(&self) -> String {
        format!("{LABEL}={}", std::process::id())
    }

    /// The nodes started so far and still in the cluster.
    fn live(&self) -> Vec<&NodeBox> {
        let departed = self.departed.lock().unwrap();
        self.nodes[..self.started.load(Ordering::SeqCst)]
            .iter()
            .filter(|n| !departed.contains(&n.alias))
            .collect()
    }

    fn node_by_id<'a>(
        &'a self,
        status: &exactly_client::StatusResponse,
        id: u64,
    ) -> anyhow::Result<&'a NodeBox> {
        let member = status
            .members
            .iter()
            .find(|m| m.node_id == id)
            .with_context(|| format!("node {id} is no member"))?;
        self.node_by_addr(&member.addr)
            .with_context(|| format!("node {id}'s address {} is no container", member.addr))
    }

    /// Client endpoints: the initial nodes (a client keeps its endpoint list).
    fn endpoints(&self) -> Vec<String> {
        self.nodes[..NODES]
            .iter()
            .map(|n| format!("https://127.0.0.1:{}", n.grpc_port))
            .collect()
    }

    fn node_by_addr(&self, addr: &str) -> Option<&NodeBox> {
        // A member's address is its Raft address: the peer port.
        self.nodes.iter().find(|n| n.peer_addr() == addr)
    }

    async fn create_network(&self) -> anyhow::Result<()> {
        docker(&[
            "network",
            "create",
            "--driver",
            "bridge",
            "--label",
            &self.label(),
            &self.network,
        ])
        .await?;
        self.network_created.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn start_sink(&self) -> anyhow::Result<()> {
        self.created
            .lock()
            .unwrap()
            .0
            .push(self.sink_container.clone());
        let publish = format!("127.0.0.1:{}:{SINK_PORT}", self.sink_port);
        let listen = format!("0.0.0.0:{SINK_PORT}");
        docker(&[
            "run",
            "-d",
            "--name",
            &self.sink_container,
            "--label",
            &self.label(),
            "--network",
            &self.network,
            "--network-alias",
            SINK_ALIAS,
            "--no-healthcheck",
            "-p",
            &publish,
            &self.image,
            "exactly-sink",
            "--listen",
            &listen,
        ])
        .await?;
        Ok(())
    }

    /// Creates the next node's volume and container: node 1 bootstraps, the others join
    /// through the initial nodes.
    async fn start_next_node(&self) -> anyhow::Result<&NodeBox> {
        let i = self.started.load(Ordering::SeqCst);
        let node = self.nodes.get(i).context("no more nodes")?;
        self.created.lock().unwrap().1.push(node.volume.clone());
        docker(&["volume", "create", "--label", &self.label(), &node.volume]).await?;
        self.run_node(node, node.id, &node.volume, i == 0).await?;
        self.started.store(i + 1, Ordering::SeqCst);
        Ok(node)
    }

    /// Replaces `old`'s container by a new one under the next free name and host name, on
    /// `old`'s volume (what `docker compose up --force-recreate` does to a scaled service): the
    /// same node id and data at a new address. `old` is killed first, so it does not drain.
    async fn recreate(&self, old: &NodeBox) -> anyhow::Result<&NodeBox> {
        let i = self.started.load(Ordering::SeqCst);
        let new = self.nodes.get(i).context("no spare container slot")?;
        docker(&["kill", &old.container]).await?;
        docker(&["rm", "-f", &old.container]).await?;
        self.departed.lock().unwrap().insert(old.alias.clone());
        self.run_node(new, old.id, &old.volume, false).await?;
        self.started.store(i + 1, Ordering::SeqCst);
        Ok(new)
    }

    /// Starts `node`'s container as node `id` on `volume`: bootstrapping (`init`) or joining
    /// the initial nodes (through their peer ports).
    async fn run_node(
        &self,
        node: &NodeBox,
        id: u64,
        volume: &str,
        init: bool,
    ) -> anyhow::Result<()> {
        self.created.lock().unwrap().0.push(node.container.clone());
        let config = repo().join("cluster-config/containers/node.toml");
        let mount_config = format!("{}:/etc/exactly/node.toml:ro", config.display());
        let mount_data = format!("{volume}:/var/lib/exactly");
        let label = self.label();
        let advertise = format!("EXACTLY_ADVERTISE={}", node.addr());
        let sink = format!("EXACTLY_SINK_ADDR={SINK_ALIAS}:{SINK_PORT}");
        let grpc = format!("127.0.0.1:{}:{GRPC_PORT}", node.grpc_port);
        let http = format!("127.0.0.1:{}:{HTTP_PORT}", node.http_port);
        let mount_certs = format!("{}:{CERTS}:ro", self.certs.path().display());
        let env = [
            format!("EXACTLY_NODE_ID={id}"),
            format!("EXACTLY_PEER_LISTEN=0.0.0.0:{PEER_PORT}"),
            format!("EXACTLY_PEER_ADVERTISE={}", node.peer_addr()),
            format!("EXACTLY_PEER_TLS_CA={CERTS}/ca.pem"),
            format!("EXACTLY_PEER_TLS_CERT={CERTS}/node-{id}.pem"),
            format!("EXACTLY_PEER_TLS_KEY={CERTS}/node-{id}.key"),
            format!("EXACTLY_API_TLS_CERT={CERTS}/api.pem"),
            format!("EXACTLY_API_TLS_KEY={CERTS}/api.key"),
            format!("EXACTLY_TOKENS_FILE={CERTS}/tokens.toml"),
        ];
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &node.container,
            "--label",
            &label,
            "--network",
            &self.network,
            "--network-alias",
            &node.alias,
            "-e",
            &advertise,
            "-e",
            "EXACTLY_CONFIG=/etc/exactly/node.toml",
            "-e",
            &sink,
            "-e",
            "RUST_LOG=info,openraft=warn,sled=warn",
            "-v",
            &mount_config,
            "-v",
            &mount_data,
            "-v",
            &mount_certs,
            "-p",
            &grpc,
            "-p",
            &http,
        ];
        for e in &env {
            args.push("-e");
            args.push(e);
        }
        args.push(&self.image);
        let peers: Vec<String> = self.nodes[..NODES]
            .iter()
            .filter(|n| n.alias != node.alias)
            .map(NodeBox::peer_addr)
            .collect();
        if init {
            args.push("--init");
        } else {
            for peer in &peers {
                args.push("--join");
                args.push(peer);
            }
        }
        docker(&args).await?;
        Ok(())
    }

    /// Prints the last lines of every container's log (on failure).
    fn print_logs(&self) {
        let (containers, _) = &*self.created.lock().unwrap_or_else(|p| p.into_inner());
        for c in containers {
            let out = Command::new("docker")
                .args(["logs", "--tail", "40", c])
                .output();
            if let Ok(out) = out {
                eprintln!("----- docker logs --tail 40 {c}");
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
                eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        let (containers, volumes) =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        for c in &containers {
            docker_blocking(&["rm", "-f", "-v", c]);
        }
        for v in &volumes {
            docker_blocking(&["volume", "rm", "-f", v]);
        }
        if self.network_created.load(Ordering::SeqCst) {
            docker_blocking(&["network", "rm", &self.network]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting for the cluster.

/// Waits until every started node answers /readyz with 200 and a node sees a leader, `NODES`
/// voters and every started node as a member.
async fn wait_ready(d: &Deployment, client: &Client, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let mut ready = 0;
        for n in d.live() {
            if matches!(http_get(n.http_port, "/readyz").await, Ok((200, _))) {
                ready += 1;
            }
        }
        if ready == d.live().len() {
            if let Ok(status) = client.status().await {
                let voters = status.members.iter().filter(|m| m.role == "voter").count();
                let members = status.members.len();
                if status.leader_id != 0 && voters == NODES && members == d.live().len() {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster was not ready within {limit:?} ({ready} nodes ready)");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The node that leads, as a client sees it.
async fn leader<'a>(d: &'a Deployment, client: &Client) -> anyhow::Result<&'a NodeBox> {
    let status = client.status().await?;
    let member = status
        .members
        .iter()
        .find(|m| m.node_id == status.leader_id)
        .context("no leader among the members")?;
    d.node_by_addr(&member.addr)
        .with_context(|| format!("leader address {} is no container", member.addr))
}

// ---------------------------------------------------------------------------------------------
// The workload.

/// What the submitting client saw.
#[derive(Default)]
struct Submitted {
    /// Ids of jobs whose submission was acknowledged.
    acknowledged: BTreeSet<u64>,
    /// Batches whose outcome is unknown (they may exist; their effects are allowed).
    unknown_batches: usize,
    /// Batches refused (nothing was created).
    refused_batches: usize,
    errors: Vec<String>,
}

/// Submits `effect` jobs in small batches until `stop` is set.
async fn submit_stream(client: Client, stop: Arc<AtomicBool>, out: Arc<Mutex<Submitted>>) {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let batch = (0..BATCH_JOBS)
            .map(|_| {
                n += 1;
                // 0.2–1.5 s of "work" before the effect, so faults catch attempts mid-run.
                let secs = 0.2 + (n % 14) as f64 * 0.1;
                JobSpec {
                    kind: "effect".into(),
                    payload: format!("{secs:.1}").into_bytes(),
                    max_attempts: JOB_ATTEMPTS_MAX,
                    timeout_ms: 60_000,
                    ..JobSpec::default()
                }
            })
            .collect();
        let result = client.submit(batch).await;
        {
            let mut out = out.lock().unwrap();
            match result {
                Ok(ids) => out.acknowledged.extend(ids),
                Err(e) if e.is_unknown_outcome() => {
                    out.unknown_batches += 1;
                    out.errors.push(e.to_string());
                }
                Err(e) => {
                    out.refused_batches += 1;
                    out.errors.push(e.to_string());
                }
            }
        }
        tokio::time::sleep(SUBMIT_PAUSE).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The check.

/// One call the sink recorded (`GET /calls.txt`: `job token node verdict at-ms`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct SinkCall {
    job: u64,
    token: u64,
    node: u64,
    verdict: String,
}

fn parse_calls(text: &str) -> anyhow::Result<Vec<SinkCall>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            anyhow::ensure!(f.len() == 5, "bad sink line {l:?}");
            Ok(SinkCall {
                job: f[0].parse()?,
                token: f[1].parse()?,
                node: f[2].parse()?,
                verdict: f[3].to_string(),
            })
        })
        .collect()
}

/// The anomalies, in Jepsen's queue-checker vocabulary plus the downstream's view.
#[derive(Debug, Default)]
struct Verdicts {
    acknowledged: usize,
    succeeded: usize,
    /// Acknowledged jobs that failed for good or that the cluster does not know.
    lost: usize,
    /// Acknowledged jobs still pending or running after the settle wait.
    unfinished: usize,
    /// Jobs whose effect the sink applied more than once, or with more than one succeeded
    /// attempt.
    duplicated: usize,
    /// Succeeded jobs whose effect the sink never applied.
    not_applied: usize,
    /// A completion accepted from an attempt that was not the job's current (last) one; a sink
    /// call accepted with a token older than one the sink had already seen for the job; or a
    /// call with a token no attempt of the job holds.
    stale_accepted: usize,
    /// Informational: calls the sink refused as stale (an old attempt, fenced at the sink).
    stale_refused: usize,
    /// Informational: repeated effects the sink absorbed (a retry after the effect was applied).
    repeats: usize,
    /// Informational: attempts ended as abandoned (lease expired, node restarted).
    abandoned_attempts: usize,
    /// Informational: effects of jobs whose submission was not acknowledged.
    unacknowledged_effects: usize,
    evidence: Vec<String>,
}

fn check(jobs: &BTreeMap<u64, Option<Job>>, calls: &[SinkCall]) -> Verdicts {
    let mut v = Verdicts {
        acknowledged: jobs.len(),
        ..Verdicts::default()
    };
    let mut applied: BTreeMap<u64, usize> = BTreeMap::new();
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    for c in calls {
        let seen = newest.entry(c.job).or_insert(0);
        match c.verdict.as_str() {
            "applied" | "repeat" => {
                if c.token < *seen {
                    v.stale_accepted += 1;
                    v.evidence.push(format!(
                        "job {}: sink accepted token {} after token {}",
                        c.job, c.token, seen
                    ));
                }
                if c.verdict == "applied" {
                    *applied.entry(c.job).or_insert(0) += 1;
                } else {
                    v.repeats += 1;
                }
            }
            "stale" => v.stale_refused += 1,
            other => {
                v.evidence
                    .push(format!("job {}: unknown verdict {other}", c.job));
                v.stale_accepted += 1;
            }
        }
        *seen = (*seen).max(c.token);
        match jobs.get(&c.job) {
            None => v.unacknowledged_effects += 1,
            Some(Some(job)) if !job.attempts.iter().any(|a| a.token == c.token) => {
                v.stale_accepted += 1;
                v.evidence.push(format!(
                    "job {}: sink call with token {}, which no attempt holds",
                    c.job, c.token
                ));
            }
            Some(_) => {}
        }
    }
    for (&id, job) in jobs {
        let Some(job) = job else {
            v.lost += 1;
            v.evidence.push(format!("job {id}: unknown to the cluster"));
            continue;
        };
        v.abandoned_attempts += job
            .attempts
            .iter()
            .filter(|a| a.outcome == "abandoned")
            .count();
        let succeeded: Vec<_> = job
            .attempts
            .iter()
            .filter(|a| a.outcome == "succeeded")
            .collect();
        if succeeded.len() > 1 {
            v.duplicated += 1;
            v.evidence
                .push(format!("job {id}: {} succeeded attempts", succeeded.len()));
        }
        let last = job.attempts.iter().map(|a| a.token).max();
        if let Some(s) = succeeded.iter().find(|a| Some(a.token) != last) {
            v.stale_accepted += 1;
            v.evidence.push(format!(
                "job {id}: completion accepted from token {}, not the last attempt",
                s.token
            ));
        }
        let effects = applied.get(&id).copied().unwrap_or(0);
        if effects > 1 {
            v.duplicated += 1;
            v.evidence
                .push(format!("job {id}: effect applied {effects} times"));
        }
        match job.state() {
            JobState::Succeeded => {
                v.succeeded += 1;
                if effects == 0 {
                    v.not_applied += 1;
                    v.evidence
                        .push(format!("job {id}: succeeded, effect never applied"));
                }
            }
            JobState::Dead => {
                v.lost += 1;
                v.evidence
                    .push(format!("job {id}: dead letter: {}", job.last_error));
            }
            other => {
                v.unfinished += 1;
                v.evidence.push(format!("job {id}: still {other:?}"));
            }
        }
    }
    v
}

/// The checker itself: a clean history passes, and a duplicated effect, a stale acceptance and
/// a lost job are each reported.
#[test]
fn checker_finds_each_anomaly() {
    use exactly_client::Attempt;
    let attempt = |token, outcome: &str| Attempt {
        token,
        outcome: outcome.into(),
        ..Attempt::default()
    };
    let job = |id, state: JobState, attempts| {
        let mut j = Job {
            id,
            attempts,
            ..Job::default()
        };
        j.set_state(state);
        Some(j)
    };
    let call = |job, token, verdict: &str| SinkCall {
        job,
        token,
        node: 1,
        verdict: verdict.into(),
    };
    // Job 1 was fenced once (token 5 abandoned, its late call refused) and then succeeded.
    let mut jobs = BTreeMap::from([(
        1,
        job(
            1,
            JobState::Succeeded,
            vec![attempt(5, "abandoned"), attempt(9, "succeeded")],
        ),
    )]);
    let mut calls = vec![call(1, 9, "applied"), call(1, 5, "stale")];
    let clean = check(&jobs, &calls);
    assert_eq!(
        (
            clean.lost,
            clean.duplicated,
            clean.stale_accepted,
            clean.succeeded
        ),
        (0, 0, 0, 1)
    );
    assert_eq!(clean.stale_refused, 1);

    // Job 2's effect applied twice; job 3 accepted from an old token; job 4 failed.
    jobs.insert(
        2,
        job(2, JobState::Succeeded, vec![attempt(3, "succeeded")]),
    );
    jobs.insert(
        3,
        job(
            3,
            JobState::Succeeded,
            vec![attempt(4, "succeeded"), attempt(8, "abandoned")],
        ),
    );
    jobs.insert(4, job(4, JobState::Dead, vec![attempt(6, "failed")]));
    calls.extend([
        call(2, 3, "applied"),
        call(2, 3, "applied"),
        call(3, 8, "applied"),
        call(3, 4, "repeat"),
    ]);
    let bad = check(&jobs, &calls);
    assert_eq!(bad.duplicated, 1, "{:?}", bad.evidence);
    assert_eq!(bad.stale_accepted, 2, "{:?}", bad.evidence);
    assert_eq!(bad.lost, 1, "{:?}", bad.evidence);
}

// ---------------------------------------------------------------------------------------------
// The fault test.

/// A fault or change the test applies while jobs stream.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// SIGKILL the leader's container, leave it down briefly, start it again.
    KillLeader,
    /// Disconnect a follower from the network for longer than the lease expiry, then
    /// reconnect it.
    CutOffFollower,
    /// Start two more nodes (`--join`): they join as learners, catch up and take work.
    ScaleUp,
    /// Back to 3 nodes: `exactly cluster drain` a voter (a learner replaces it), then kill a
    /// learner's container and `exactly cluster remove` it.
    DrainAndRemove,
    /// Kill a follower's container and recreate it under a new host name on its volume: the
    /// same node comes back at a new address, which the leader puts in the membership.
    RecreateFollower,
    /// `docker restart` every node in turn (SIGTERM, new start), waiting for readiness between.
    RestartEach,
}

const STEPS: [Step; 6] = [
    Step::KillLeader,
    Step::CutOffFollower,
    Step::ScaleUp,
    Step::DrainAndRemove,
    Step::RecreateFollower,
    Step::RestartEach,
];

/// How long the drained voter's running jobs may finish (the drain deadline).
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);

/// Runs the CLI in `via`'s container against that node, over TLS with the admin token:
/// `exactly ARGS`; returns its output.
async fn cli_in(d: &Deployment, via: &NodeBox, args: &[&str]) -> anyhow::Result<String> {
    let endpoint = format!("https://127.0.0.1:{GRPC_PORT}");
    let token = format!("EXACTLY_TOKEN={}", d.token);
    let ca = format!("EXACTLY_CA={CERTS}/ca.pem");
    let mut full = vec![
        "exec",
        "-e",
        &token,
        "-e",
        &ca,
        &via.container,
        "exactly",
        "--endpoints",
        &endpoint,
    ];
    full.extend_from_slice(args);
    docker(&full).await
}

/// Waits until `node` answers /readyz with 200; returns how long that took.
async fn node_ready(node: &NodeBox, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if matches!(http_get(node.http_port, "/readyz").await, Ok((200, _))) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{} not ready within {limit:?}", node.alias);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The follower (a voter if `voter`) running the most attempts, so a fault hits real work.
fn busiest_follower(
    status: &exactly_client::StatusResponse,
    voter: bool,
) -> anyhow::Result<&exactly_client::Member> {
    status
        .members
        .iter()
        .filter(|m| m.node_id != status.leader_id && (!voter || m.role == "voter"))
        .max_by_key(|m| m.running)
        .context("no such follower")
}

async fn run_step(d: &Deployment, client: &Client, step: Step) -> anyhow::Result<()> {
    match step {
        Step::KillLeader => {
            let node = leader(d, client).await?;
            eprintln!("  kill {} (the leader)", node.alias);
            docker(&["kill", &node.container]).await?;
            tokio::time::sleep(KILLED_DOWN).await;
            docker(&["start", &node.container]).await?;
            let took = node_ready(node, READY_WAIT).await?;
            eprintln!(
                "  {} restarted after SIGKILL: ready in {took:.1?}",
                node.alias
            );
        }
        Step::CutOffFollower => {
            let status = client.status().await?;
            // The follower running the most attempts, so the cut fences real work.
            let member = busiest_follower(&status, false)?;
            let node = d.node_by_addr(&member.addr).context("follower container")?;
            eprintln!(
                "  cut {} off the network for {CUT_OFF:?} ({} attempts running on it)",
                node.alias, member.running
            );
            docker(&["network", "disconnect", &d.network, &node.container]).await?;
            tokio::time::sleep(CUT_OFF).await;
            docker(&[
                "network",
                "connect",
                "--alias",
                &node.alias,
                &d.network,
                &node.container,
            ])
            .await?;
            let took = node_ready(node, READY_WAIT).await?;
            eprintln!("  {} reconnected: ready in {took:.1?}", node.alias);
        }
        Step::ScaleUp => {
            while d.started.load(Ordering::SeqCst) < NODES_SCALED {
                let start = Instant::now();
                let node = d.start_next_node().await?;
                node_ready(node, READY_WAIT).await?;
                let ready = start.elapsed();
                let id = member_id(client, node, READY_WAIT).await?;
                let took_work = first_effect(d, id, READY_WAIT).await? + ready;
                eprintln!(
                    "  {} (node {id}) joined: ready {ready:.1?} and its first effect at the \
                     sink {took_work:.1?} after `docker run`",
                    node.alias
                );
            }
        }
        Step::DrainAndRemove => {
            let status = client.status().await?;
            let leader_id = status.leader_id;
            let via = d.node_by_id(&status, leader_id)?;
            let voter = busiest_follower(&status, true)?;
            let drained = d.node_by_id(&status, voter.node_id)?;
            eprintln!(
                "  exactly cluster drain {} ({}, a voter running {} attempts)",
                voter.node_id, drained.alias, voter.running
            );
            let start = Instant::now();
            let deadline = format!("{}s", DRAIN_DEADLINE.as_secs());
            let id = voter.node_id.to_string();
            let out = cli_in(d, via, &["cluster", "drain", &id, "--deadline", &deadline]).await?;
            eprintln!(
                "  {} drained and left in {:.1?}: {}",
                drained.alias,
                start.elapsed(),
                out.lines().last().unwrap_or_default()
            );
            d.departed.lock().unwrap().insert(drained.alias.clone());
            docker(&["stop", "-t", "30", &drained.container]).await?;
            let status = client.status().await?;
            let voters: Vec<u64> = status
                .members
                .iter()
                .filter(|m| m.role == "voter")
                .map(|m| m.node_id)
                .collect();
            anyhow::ensure!(
                voters.len() == NODES && !voters.contains(&voter.node_id),
                "after the drain the voters are {voters:?}"
            );
            let learner = status
                .members
                .iter()
                .find(|m| m.role == "learner")
                .context("no learner left to remove")?;
            let dead = d.node_by_id(&status, learner.node_id)?;
            eprintln!(
                "  kill {} (node {}, a learner running {} attempts), then exactly cluster \
                 remove {}",
                dead.alias, learner.node_id, learner.running, learner.node_id
            );
            docker(&["kill", &dead.container]).await?;
            d.departed.lock().unwrap().insert(dead.alias.clone());
            let start = Instant::now();
            let status = client.status().await?;
            let via = d.node_by_id(&status, status.leader_id)?;
            let id = learner.node_id.to_string();
            let out = cli_in(d, via, &["cluster", "remove", &id]).await?;
            eprintln!(
                "  {} removed in {:.1?}: {}",
                dead.alias,
                start.elapsed(),
                out.lines().last().unwrap_or_default()
            );
        }
        Step::RecreateFollower => {
            let status = client.status().await?;
            let member = busiest_follower(&status, false)?;
            let old = d.node_by_id(&status, member.node_id)?;
            let start = Instant::now();
            let new = d.recreate(old).await?;
            eprintln!(
                "  killed {} (node {}, {} attempts running) and recreated it as {}",
                old.alias, member.node_id, member.running, new.alias
            );
            // The same node, at its new address (wait_ready below also needs it ready: that
            // takes the log, which it gets only at the new address).
            let id = member_id(client, new, READY_WAIT).await?;
            anyhow::ensure!(
                id == member.node_id,
                "{} came back as node {id}, not {}",
                new.alias,
                member.node_id
            );
            let took = node_ready(new, READY_WAIT).await?;
            eprintln!(
                "  node {id} back at {}: listed there {:.1?} after the kill, ready {took:.1?} later",
                new.peer_addr(),
                start.elapsed() - took
            );
        }
        Step::RestartEach => {
            for node in d.live() {
                let stop = STOP_TIMEOUT_S.to_string();
                let start = Instant::now();
                docker(&["restart", "-t", &stop, &node.container]).await?;
                let stopped = start.elapsed();
                let took = node_ready(node, READY_WAIT).await?;
                eprintln!(
                    "  restart {}: stop + start {stopped:.1?}, then ready in {took:.1?}",
                    node.alias
                );
                wait_ready(d, client, READY_WAIT).await?;
            }
        }
    }
    wait_ready(d, client, READY_WAIT).await
}

/// Records each member's node id by address, and fails if a node (an address) has a different
/// id than before: an id is kept in the data volume through restarts.
async fn track_ids(client: &Client, ids: &mut BTreeMap<String, u64>) -> anyhow::Result<()> {
    for m in client.status().await?.members {
        let id = *ids.entry(m.addr.clone()).or_insert(m.node_id);
        anyhow::ensure!(
            id == m.node_id,
            "{} was node {id} and is now node {}",
            m.addr,
            m.node_id
        );
    }
    Ok(())
}

/// The node id `node` runs as (its `EXACTLY_NODE_ID`), once the cluster lists it.
async fn member_id(client: &Client, node: &NodeBox, limit: Duration) -> anyhow::Result<u64> {
    let start = Instant::now();
    loop {
        if let Ok(status) = client.status().await {
            if let Some(m) = status.members.iter().find(|m| m.addr == node.peer_addr()) {
                return Ok(m.node_id);
            }
        }
        if start.elapsed() > limit {
            bail!("{} is no member after {limit:?}", node.alias);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the sink has seen an effect from node `id`; returns how long that took.
async fn first_effect(d: &Deployment, id: u64, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if let Ok((200, text)) = http_get(d.sink_port, "/calls.txt").await {
            if parse_calls(&text)?.iter().any(|c| c.node == id) {
                return Ok(start.elapsed());
            }
        }
        if start.elapsed() > limit {
            bail!("no effect from node {id} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Builds the image with scripts/docker-image.sh unless EXACTLY_DOCKER_IMAGE names one.
fn image() -> anyhow::Result<String> {
    if let Ok(image) = std::env::var("EXACTLY_DOCKER_IMAGE") {
        return Ok(image);
    }
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(repo().join("scripts/docker-image.sh"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("run scripts/docker-image.sh")?;
    anyhow::ensure!(out.status.success(), "scripts/docker-image.sh failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let image = stdout.lines().last().context("no image name")?.trim();
    eprintln!("image {image} ready in {:.1?}", start.elapsed());
    Ok(image.to_string())
}

/// A 3-node cluster in containers takes a steady stream of jobs that call the fencing sink
/// while the leader's container is killed, a follower is cut off the network past its lease,
/// two nodes join, a voter is drained and a dead learner removed, and every node is restarted
/// in turn; afterwards no acknowledged job is lost,
/// none ran its effect twice, no stale attempt's effect or completion was accepted, every job
/// completed, and the nodes kept their ids through every restart (a recreated node too, at its
/// new address).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn container_faults_keep_jobs_exactly_once() -> anyhow::Result<()> {
    if let Some(why) = docker_unavailable() {
        eprintln!("SKIPPED container_faults_keep_jobs_exactly_once: {why}");
        return Ok(());
    }
    let started = Instant::now();
    reap_leftovers();
    let image = tokio::task::spawn_blocking(image).await??;
    let d = Deployment::new(image)?;
    let outcome = scenario(&d, started).await;
    if outcome.is_err() {
        d.print_logs();
    }
    outcome
}

/// The body of [`container_faults_keep_jobs_exactly_once`]; `d` is torn down by its caller.
async fn scenario(d: &Deployment, started: Instant) -> anyhow::Result<()> {
    d.create_network().await?;
    d.start_sink().await?;
    for _ in 0..NODES {
        d.start_next_node().await?;
    }
    let client = Client::connect_with(d.endpoints(), d.client_options())?;
    wait_ready(d, &client, READY_WAIT).await?;
    let mut ids = BTreeMap::new();
    track_ids(&client, &mut ids).await?;
    eprintln!(
        "cluster ready at {:.1?}: node ids {ids:?}",
        started.elapsed()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(Mutex::new(Submitted::default()));
    let stream = tokio::spawn(submit_stream(
        client.clone(),
        stop.clone(),
        submitted.clone(),
    ));
    // Let work pile up before the first fault.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut failure = None;
    for step in STEPS {
        let acked = submitted.lock().unwrap().acknowledged.len();
        eprintln!(
            "{:.1?}: {step:?} ({acked} jobs acknowledged so far)",
            started.elapsed()
        );
        let outcome = match run_step(d, &client, step).await {
            Ok(()) => track_ids(&client, &mut ids).await,
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            failure = Some(e.context(format!("step {step:?}")));
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    stream.await?;
    if let Some(e) = failure {
        return Err(e);
    }

    let submitted = std::mem::take(&mut *submitted.lock().unwrap());
    eprintln!(
        "{:.1?}: submitting stopped: {} acknowledged, {} batches unknown, {} refused",
        started.elapsed(),
        submitted.acknowledged.len(),
        submitted.unknown_batches,
        submitted.refused_batches
    );
    for e in submitted.errors.iter().take(10) {
        eprintln!("  submit error: {e}");
    }

    // Wait for every acknowledged job to finish (reads may be served by a lagging follower,
    // so a job is read again until it is terminal or the wait is over).
    let mut jobs: BTreeMap<u64, Option<Job>> = BTreeMap::new();
    let mut open: Vec<u64> = submitted.acknowledged.iter().copied().collect();
    let deadline = Instant::now() + SETTLE_WAIT;
    while !open.is_empty() {
        let mut still = Vec::new();
        for id in open {
            let job = match client.get(id).await {
                Ok(job) => Some(job),
                Err(e) if e.code() == exactly_client::Code::NotFound => None,
                Err(e) => return Err(e).context(format!("get job {id}")),
            };
            let terminal = job
                .as_ref()
                .is_some_and(|j| matches!(j.state(), JobState::Succeeded | JobState::Dead));
            if !terminal {
                still.push(id);
            }
            jobs.insert(id, job);
        }
        open = still;
        if open.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (code, text) = http_get(d.sink_port, "/calls.txt").await?;
    anyhow::ensure!(code == 200, "sink /calls.txt answered {code}");
    let calls = parse_calls(&text)?;
    let status = client.status().await?;
    let stale_completions = status.counts.map(|c| c.stale_completions).unwrap_or(0);

    let v = check(&jobs, &calls);
    eprintln!(
        "{:.1?}: acknowledged {} succeeded {} lost {} unfinished {} duplicated {} \
         not-applied {} stale-accepted {}",
        started.elapsed(),
        v.acknowledged,
        v.succeeded,
        v.lost,
        v.unfinished,
        v.duplicated,
        v.not_applied,
        v.stale_accepted
    );
    eprintln!(
        "  (informational) sink calls {} repeats-absorbed {} stale-refused-at-sink {} \
         abandoned-attempts {} stale-completions-rejected {} effects-of-unacknowledged-jobs {}",
        calls.len(),
        v.repeats,
        v.stale_refused,
        v.abandoned_attempts,
        stale_completions,
        v.unacknowledged_effects
    );
    for e in v.evidence.iter().take(40) {
        eprintln!("  anomaly: {e}");
    }
    assert!(
        v.acknowledged >= ACKNOWLEDGED_MIN,
        "only {} jobs acknowledged",
        v.acknowledged
    );
    assert_eq!(v.lost, 0, "lost jobs");
    assert_eq!(v.unfinished, 0, "unfinished jobs");
    assert_eq!(v.duplicated, 0, "duplicated jobs");
    assert_eq!(v.not_applied, 0, "succeeded jobs without an applied effect");
    assert_eq!(v.stale_accepted, 0, "stale attempts accepted");
    assert_eq!(v.succeeded, v.acknowledged);
    // Every address ever used, one id each: 5 nodes, one of them also at its second address.
    assert_eq!(ids.len(), NODE_SLOTS, "members by address: {ids:?}");
    let distinct: BTreeSet<u64> = ids.values().copied().collect();
    assert_eq!(distinct.len(), NODES_SCALED, "node ids: {ids:?}");
    eprintln!("container fault test passed in {:.1?}", started.elapsed());
    Ok(())
}
