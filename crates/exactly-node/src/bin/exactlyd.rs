//! `exactlyd`: one node of an exactly cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use exactly_handlers::Registry;
use exactly_node::NodeConfig;

/// One node of an exactly job cluster. Flags override the config file.
#[derive(Parser, Debug)]
#[command(
    name = "exactlyd",
    version,
    about = "One node of an exactly job cluster: start the first with --init, every other with \
             --join <a member's address>. Flags override the config file (see cluster-config/)."
)]
struct Args {
    /// TOML configuration file (see cluster-config/).
    #[arg(short, long, env = "EXACTLY_CONFIG")]
    config: Option<PathBuf>,
    /// Bootstrap a new one-node cluster if the data directory is new.
    #[arg(long)]
    init: bool,
    /// Join the cluster through this member's address (repeatable).
    #[arg(long, value_name = "ADDR")]
    join: Vec<String>,
    /// Node id (default: generated once and kept in the data directory).
    #[arg(long, env = "EXACTLY_NODE_ID")]
    node_id: Option<u64>,
    /// gRPC listen address.
    #[arg(long, env = "EXACTLY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address other nodes and clients use to reach this node.
    #[arg(long, env = "EXACTLY_ADVERTISE")]
    advertise: Option<String>,
    /// A separate listen address for node-to-node traffic (Raft, forwarded writes, joins).
    #[arg(long, env = "EXACTLY_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// Address other nodes use to reach this node's peer listener.
    #[arg(long, env = "EXACTLY_PEER_ADVERTISE")]
    peer_advertise: Option<String>,
    /// Peer-port mutual TLS: the cluster CA's certificate (PEM). With --peer-tls-cert and
    /// --peer-tls-key; needs --peer-listen.
    #[arg(long, env = "EXACTLY_PEER_TLS_CA", value_name = "PATH", requires_all = ["peer_tls_cert", "peer_tls_key"])]
    peer_tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM, from `exactly cert node`).
    #[arg(long, env = "EXACTLY_PEER_TLS_CERT", value_name = "PATH", requires_all = ["peer_tls_ca", "peer_tls_key"])]
    peer_tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "EXACTLY_PEER_TLS_KEY", value_name = "PATH", requires_all = ["peer_tls_ca", "peer_tls_cert"])]
    peer_tls_key: Option<PathBuf>,
    /// The cluster CA's certificate revocation list (PEM, from `exactly cert crl`): node
    /// certificates it lists are refused. Needs peer TLS. Read again when it changes.
    #[arg(long, env = "EXACTLY_PEER_TLS_CRL", value_name = "PATH")]
    peer_tls_crl: Option<PathBuf>,
    /// TLS on the public gRPC port: this node's certificate for clients (PEM, from `exactly
    /// cert server`). With --api-tls-key.
    #[arg(
        long,
        env = "EXACTLY_API_TLS_CERT",
        value_name = "PATH",
        requires = "api_tls_key"
    )]
    api_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(
        long,
        env = "EXACTLY_API_TLS_KEY",
        value_name = "PATH",
        requires = "api_tls_cert"
    )]
    api_tls_key: Option<PathBuf>,
    /// The CA of client certificates that are credentials on the public port (their names'
    /// scopes come from the config file's `[[client-certs]]`). Needs API TLS.
    #[arg(long, env = "EXACTLY_API_TLS_CLIENT_CA", value_name = "PATH")]
    api_tls_client_ca: Option<PathBuf>,
    /// That CA's certificate revocation list (PEM, from `exactly cert crl`): client
    /// certificates it lists are refused. Read again when it changes.
    #[arg(long, env = "EXACTLY_API_TLS_CRL", value_name = "PATH")]
    api_tls_crl: Option<PathBuf>,
    /// TLS on the HTTP port (dashboard, /metrics, probes): its certificate (PEM; the API's may
    /// serve). With --http-tls-key.
    #[arg(
        long,
        env = "EXACTLY_HTTP_TLS_CERT",
        value_name = "PATH",
        requires = "http_tls_key"
    )]
    http_tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(
        long,
        env = "EXACTLY_HTTP_TLS_KEY",
        value_name = "PATH",
        requires = "http_tls_cert"
    )]
    http_tls_key: Option<PathBuf>,
    /// A TOML file of `[[tokens]]` (name, sha256, scopes), added to the config file's: the
    /// bearer tokens that may call the public API (`exactly token new` makes them). Read again
    /// when it changes.
    #[arg(long, env = "EXACTLY_TOKENS_FILE", value_name = "PATH")]
    tokens_file: Option<PathBuf>,
    /// Serve ports beyond this machine without TLS or tokens anyway (see README, "Security").
    #[arg(long, env = "EXACTLY_INSECURE")]
    insecure: bool,
    /// HTTP address for /healthz, /readyz and /metrics.
    #[arg(long, env = "EXACTLY_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long, env = "EXACTLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Attempts this node runs at once.
    #[arg(long)]
    slots: Option<u32>,
    /// Where the job table's records live: memory (fastest) or disk (memory stays flat
    /// whatever the backlog).
    #[arg(long, env = "EXACTLY_TABLE_STORAGE", value_parser = ["memory", "disk"])]
    table_storage: Option<String>,
    /// On SIGTERM, how long running jobs may finish before they are cancelled and run elsewhere
    /// (for example 30s).
    #[arg(long, env = "EXACTLY_DRAIN_DEADLINE", value_parser = humantime::parse_duration)]
    drain_deadline: Option<std::time::Duration>,
    /// The exactly-exec-guard binary that runs `exec` commands (default: next to exactlyd, then
    /// on PATH).
    #[arg(long, env = "EXACTLY_EXEC_GUARD", value_name = "PATH")]
    exec_guard: Option<PathBuf>,
}

fn load(args: &Args) -> anyhow::Result<NodeConfig> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    config.init |= args.init;
    if !args.join.is_empty() {
        config.join = args.join.clone();
    }
    if args.node_id.is_some() {
        config.node_id = args.node_id;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if args.advertise.is_some() {
        config.advertise = args.advertise.clone();
    }
    if args.peer_listen.is_some() {
        config.peer_listen = args.peer_listen;
    }
    if args.peer_advertise.is_some() {
        config.peer_advertise = args.peer_advertise.clone();
    }
    if let (Some(ca), Some(cert), Some(key)) =
        (&args.peer_tls_ca, &args.peer_tls_cert, &args.peer_tls_key)
    {
        let file = config.peer_tls.take();
        config.peer_tls = Some(exactly_node::config::PeerTlsConfig {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            crl: file.and_then(|f| f.crl),
        });
    }
    if let Some(crl) = &args.peer_tls_crl {
        let tls = config.peer_tls.as_mut().ok_or_else(|| {
            anyhow::anyhow!("--peer-tls-crl needs peer TLS (--peer-tls-ca/cert/key or [peer-tls])")
        })?;
        tls.crl = Some(crl.clone());
    }
    if let (Some(cert), Some(key)) = (&args.api_tls_cert, &args.api_tls_key) {
        let file = config.api_tls.take();
        config.api_tls = Some(exactly_node::config::ApiTlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: file.as_ref().and_then(|f| f.client_ca.clone()),
            crl: file.and_then(|f| f.crl),
        });
    }
    for (flag, value) in [
        ("--api-tls-client-ca", &args.api_tls_client_ca),
        ("--api-tls-crl", &args.api_tls_crl),
    ] {
        let Some(path) = value else { continue };
        let tls = config.api_tls.as_mut().ok_or_else(|| {
            anyhow::anyhow!("{flag} needs API TLS (--api-tls-cert/key or [api-tls])")
        })?;
        if flag == "--api-tls-crl" {
            tls.crl = Some(path.clone());
        } else {
            tls.client_ca = Some(path.clone());
        }
    }
    if let (Some(cert), Some(key)) = (&args.http_tls_cert, &args.http_tls_key) {
        config.http_tls = Some(exactly_node::config::ApiTlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
            crl: None,
        });
    }
    if args.tokens_file.is_some() {
        config.tokens_file = args.tokens_file.clone();
    }
    if args.http_listen.is_some() {
        config.http_listen = args.http_listen;
    }
    config.insecure |= args.insecure;
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    match args.table_storage.as_deref() {
        Some("disk") => config.table_storage = exactly_store::TableStorage::Disk,
        Some(_) => config.table_storage = exactly_store::TableStorage::Memory,
        None => {}
    }
    if let Some(slots) = args.slots {
        config.slots = slots;
    }
    if let Some(deadline) = args.drain_deadline {
        config.drain_deadline = deadline;
    }
    if args.exec_guard.is_some() {
        config.exec_guard = args.exec_guard.clone();
    }
    Ok(config.validate()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Colour only on a terminal (a log file or a container log gets plain text); openraft's
    // repeated warnings and errors at most once a minute each.
    exactly_node::logging::init(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,openraft=warn,sled=warn".into()),
    );
    // Signals are caught from the first moment: a SIGTERM that arrives while the node starts
    // (a restart followed at once by a stop) must not kill the process by its default action.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let args = Args::parse();
    let config = load(&args)?;
    let mut registry = Registry::with_builtins();
    config.register_kinds(&mut registry)?;
    let node = exactly_node::start(config, registry)
        .await
        .context("starting the node")?;
    if node.peer_addr != node.addr {
        println!(
            "exactlyd node {} serves node-to-node traffic on {} (peer port)",
            node.id(),
            node.peer_addr
        );
    }
    match node.http_addr {
        Some(http) => println!(
            "exactlyd node {} listening on {} (gRPC API) and http://{http} (/healthz, /readyz, /metrics)",
            node.id(),
            node.addr
        ),
        None => println!(
            "exactlyd node {} listening on {} (gRPC API)",
            node.id(),
            node.addr
        ),
    }
    tokio::select! {
        _ = interrupt.recv() => {},
        _ = term.recv() => {},
        // The node stopped itself (a part it cannot run without failed; it said why at ERROR):
        // exit non-zero so that systemd or Kubernetes starts it again.
        () = node.node.shutdown.cancelled() => {
            let why = node.node.failure().unwrap_or("the node stopped").to_string();
            node.shutdown().await;
            anyhow::bail!("node stopped: {why}");
        }
    }
    // A graceful stop (container stop, pod deletion, systemctl stop): drain and leave, so that
    // running jobs finish or move with new fencing tokens. A second signal stops at once.
    let deadline = node.node.config.drain_deadline;
    tracing::info!(
        ?deadline,
        "signal received: draining (signal again to stop now)"
    );
    tokio::select! {
        left = node.drain_and_leave(deadline) => match left {
            Ok(exactly_node::membership::Stopped::Left) => tracing::info!("left the cluster; stopping"),
            Ok(exactly_node::membership::Stopped::Stayed(why)) => {
                tracing::info!(%why, "drained; stopping as a member of the cluster")
            }
            Err(e) => tracing::warn!(error = %e, "stopping without draining"),
        },
        _ = interrupt.recv() => tracing::warn!("second signal: stopping at once"),
        _ = term.recv() => tracing::warn!("second signal: stopping at once"),
    }
    node.shutdown().await;
    Ok(())
}
