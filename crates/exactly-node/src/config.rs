//! A node's configuration: one TOML file per node, overridden by flags, validated at start-up
//! with errors that name the offending key and value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use exactly_handlers::{ExecSpec, HttpSpec, Registry, SpecError};
use serde::Deserialize;

/// Everything an `exactlyd` process needs. Keys are kebab-case; durations are humane ("100ms").
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id. Unset: generated once and kept in the data directory.
    pub node_id: Option<u64>,
    /// Where the node keeps its Raft log, state machine and identity.
    pub data_dir: PathBuf,
    /// The gRPC address to listen on: the public API, and node-to-node traffic too unless
    /// `peer-listen` is set.
    pub listen: SocketAddr,
    /// The gRPC address clients (and, without `peer-listen`, other nodes) use to reach this
    /// node. Unset: `listen`.
    pub advertise: Option<String>,
    /// A separate gRPC address for node-to-node traffic (Raft, forwarded writes, joins), served
    /// on the node's Raft runtime, apart from client requests: client load cannot delay Raft's
    /// messages, and the peer port can be firewalled from clients. Unset: node-to-node traffic
    /// shares `listen`. Every member of a cluster must agree (a member's Raft address is its peer
    /// address when it has one); `join` then names peer addresses.
    pub peer_listen: Option<SocketAddr>,
    /// The peer address other nodes use to reach this one. Unset: `peer-listen`.
    pub peer_advertise: Option<String>,
    /// Mutual TLS on the peer port (needs `peer-listen`): only holders of a certificate from the
    /// cluster's CA reach it, and each Raft message, forwarded write and join must come from the
    /// node its certificate names (`exactly cert` makes them). Unset: plaintext.
    pub peer_tls: Option<PeerTlsConfig>,
    /// TLS on the public gRPC port (`[api-tls] cert = "…" key = "…"`): clients then dial
    /// `https://` and check the node's certificate against the CA they are given
    /// (`exactly --ca`). Unset: plaintext.
    pub api_tls: Option<ApiTlsConfig>,
    /// Bearer tokens that may call the public API, each with its scopes (`[[tokens]] name =
    /// "web" sha256 = "…" scopes = ["submit:emails", "read"]`; `exactly token new` makes one).
    /// Only their SHA-256 digests are kept here. Unset: the public API is open to anyone who
    /// reaches it.
    pub tokens: Vec<TokenConfig>,
    /// A file of `[[tokens]]` and nothing else, used besides `tokens` (a Kubernetes Secret,
    /// say). The node reads it again when it changes: tokens are added and revoked without a
    /// restart.
    pub tokens_file: Option<PathBuf>,
    /// Client certificates that may call the public API, by the name they carry, each with its
    /// scopes (`[[client-certs]] name = "billing" scopes = ["submit:mail"]`); needs
    /// `[api-tls] client-ca`. A client presenting no certificate may still use a token.
    pub client_certs: Vec<ClientCertConfig>,
    /// Serve ports beyond this machine without TLS or tokens anyway. Without it, a node whose
    /// public port listens on a non-loopback address refuses to start unless that port has TLS
    /// (`[api-tls]`) and tokens (`[[tokens]]`), its node-to-node traffic has a peer port with
    /// mutual TLS (`peer-listen`, `[peer-tls]`), and its HTTP port has tokens. With it, what is
    /// open is logged at every start and shown by /readyz and the dashboard.
    pub insecure: bool,
    /// The HTTP address for /healthz, /readyz and /metrics. Unset: no HTTP server.
    pub http_listen: Option<SocketAddr>,
    /// TLS on the HTTP port (`[http-tls] cert = "…" key = "…"`, may be the API's files): the
    /// dashboard and /metrics are then served over https, so their tokens do not cross the
    /// network in the clear. Unset: plain HTTP.
    pub http_tls: Option<ApiTlsConfig>,
    /// Bootstrap a new one-node cluster if this data directory has never been initialized.
    pub init: bool,
    /// Addresses of existing members to ask for admission (any member will do).
    pub join: Vec<String>,
    /// Voters the cluster grows to as nodes join (3 or 5); later nodes stay learners.
    pub voters_target: usize,
    /// Where the job table's records live: `"memory"` (the default: the fastest apply; memory
    /// grows with the retained jobs) or `"disk"` (the `state` sled tree: memory stays flat
    /// whatever the backlog, apply costs more; a restart resumes from disk without replaying).
    /// Nodes of one cluster may differ; a node may change it across a restart.
    pub table_storage: exactly_store::TableStorage,
    /// Attempts this node runs at once.
    pub slots: u32,
    /// On SIGTERM the node drains and leaves the cluster: running attempts may finish for this
    /// long, then they are cancelled and run again elsewhere. A second SIGTERM stops at once.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// Limits enforced at this node's API edge.
    pub limits: LimitsConfig,
    /// Defaults for jobs that do not set these options.
    pub defaults: JobDefaults,
    /// Raft timing and log policy.
    pub raft: RaftConfig,
    /// Node leases: how a node keeps its right to run attempts, and when it loses it.
    pub lease: LeaseConfig,
    /// How long finished jobs, dead letters and idempotency keys are kept (applied by whichever
    /// node leads, from its own configuration).
    pub retention: RetentionConfig,
    /// Commands run by job kind: `[exec.resize-image] command = "/usr/bin/convert"`.
    pub exec: BTreeMap<String, ExecSpec>,
    /// The `exactly-exec-guard` binary that runs each `exec` command (it kills the command's
    /// whole process tree when the node dies, freezes or cancels). Unset: `exactly-exec-guard`
    /// next to the running executable, then in its parent directory, then on `PATH`. A node with
    /// `[exec.*]` kinds refuses to start without one.
    pub exec_guard: Option<PathBuf>,
    /// URLs that jobs are POSTed to, by job kind: `[http.charge] url = "http://billing/charge"`.
    pub http: BTreeMap<String, HttpSpec>,
}

/// The PEM files of a node's peer-port mutual TLS (`[peer-tls]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// The cluster CA's certificate: the only issuer this node trusts, as server and client.
    pub ca: PathBuf,
    /// This node's certificate, naming its node id (`exactly cert node`).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// The cluster CA's certificate revocation list (`exactly cert crl`): a node certificate it
    /// lists is refused, as server and as client, from the next handshake and on every
    /// message of a connection already open. Read again when it changes.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// The PEM files of the public port's TLS (`[api-tls]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ApiTlsConfig {
    /// The node's certificate for clients (`exactly cert server`), with the names and addresses
    /// clients dial it by.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA whose client certificates (`exactly cert client`) are credentials on the public
    /// port, with the scopes `[[client-certs]]` gives their names. A client may still present
    /// a bearer token instead. Unset: clients present no certificate.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// That CA's certificate revocation list (`exactly cert crl --revoke`): a client
    /// certificate it lists is refused, from the next handshake and on every call of a
    /// connection already open. Read again when it changes.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// A client certificate's name and what it may do (`[[client-certs]]`): a client presenting a
/// certificate from `[api-tls] client-ca` that names it (`exactly cert client --name`) is
/// admitted with these scopes.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientCertConfig {
    /// The name the certificate carries (`urn:exactly:client:<name>`, else its common name).
    pub name: String,
    /// What it may do: `submit`, `submit:<queue>`, `read`, `operate`, `admin`.
    pub scopes: Vec<String>,
}

/// One bearer token of the public API (`[[tokens]]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it: shown in logs and refusals, never the token itself.
    pub name: String,
    /// The SHA-256 digest of the token, 64 hex digits (`exactly token new` prints it).
    pub sha256: String,
    /// What it may do: `submit`, `submit:<queue>`, `read`, `operate`, `admin`.
    pub scopes: Vec<String>,
}

/// Longest token name.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;

/// Checks a list of tokens: names bounded, printable and unique, at least one scope each, every
/// scope known, every digest 64 hex digits and listed once.
pub fn validate_tokens(tokens: &[TokenConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::BTreeSet::new();
    for t in tokens {
        let printable = t.name.bytes().all(|b| b.is_ascii_graphic());
        if t.name.is_empty() || t.name.len() > TOKEN_NAME_BYTES_MAX || !printable {
            return Err(invalid(
                "tokens.name",
                &t.name,
                format!(
                    "must be 1..={TOKEN_NAME_BYTES_MAX} printable ASCII characters without spaces"
                ),
            ));
        }
        if !names.insert(t.name.as_str()) {
            return Err(invalid("tokens.name", &t.name, "listed twice"));
        }
        if t.scopes.is_empty() {
            return Err(invalid(
                "tokens.scopes",
                &t.name,
                "give at least one of submit, submit:<queue>, read, operate, admin",
            ));
        }
    }
    crate::auth::Tokens::from_config(tokens).map_err(|why| invalid("tokens", "", why))?;
    Ok(())
}

/// Checks `[[client-certs]]`: names plain, bounded and unique, scopes known, and
/// `[api-tls] client-ca` set exactly when some are listed.
pub fn validate_client_certs(
    certs: &[ClientCertConfig],
    api_tls: Option<&ApiTlsConfig>,
) -> Result<(), ConfigError> {
    let client_ca = api_tls.and_then(|t| t.client_ca.as_ref());
    match (certs.is_empty(), client_ca) {
        (false, None) => {
            return Err(invalid(
                "client-certs",
                certs.len(),
                "need [api-tls] client-ca: the CA their certificates come from",
            ))
        }
        (true, Some(ca)) => {
            return Err(invalid(
                "api-tls.client-ca",
                ca,
                "no [[client-certs]] names a client: every certificate would be refused",
            ))
        }
        _ => {}
    }
    let mut names = std::collections::BTreeSet::new();
    for c in certs {
        if !exactly_client::certs::valid_client_name(&c.name) {
            return Err(invalid(
                "client-certs.name",
                &c.name,
                format!(
                    "must be 1..={} letters, digits, '-', '_' and '.', not starting with '.'",
                    exactly_client::certs::CLIENT_NAME_BYTES_MAX
                ),
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err(invalid("client-certs.name", &c.name, "listed twice"));
        }
        if c.scopes.is_empty() {
            return Err(invalid(
                "client-certs.scopes",
                &c.name,
                "give at least one of submit, submit:<queue>, read, operate, admin",
            ));
        }
        for scope in &c.scopes {
            scope
                .parse::<exactly_core::access::Scope>()
                .map_err(|why| {
                    invalid("client-certs.scopes", &c.name, format!("{scope}: {why}"))
                })?;
        }
    }
    Ok(())
}

/// A tokens file (`exactlyd --tokens-file`): `[[tokens]]` tables and nothing else, so that
/// tokens can be deployed apart from the rest of the configuration (a Kubernetes Secret).
pub fn read_tokens_file(path: &Path) -> Result<Vec<TokenConfig>, ConfigError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TokensFile {
        #[serde(default)]
        tokens: Vec<TokenConfig>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: TokensFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    Ok(file.tokens)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of one job's payload, at most.
    pub payload_bytes_max: usize,
    /// Pending plus running jobs cluster-wide, at most; past it submits get RESOURCE_EXHAUSTED.
    pub jobs_live_max: u64,
    /// How long a write may wait for a leader and a quorum before the caller gets UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub propose_timeout: Duration,
    /// Bytes of a snapshot this node accepts from a leader.
    pub snapshot_bytes_max: u64,
    /// Requests one client connection may have open at once on the public port (HTTP/2
    /// `MAX_CONCURRENT_STREAMS`): a compliant client holds the next one until one ends; one
    /// sent anyway is refused with `REFUSED_STREAM`, which proves that nothing was processed.
    pub streams_per_connection_max: u32,
    /// Watch streams one token may have open on one node at once (with `[[tokens]]`; the
    /// node's own limit of 1,024 applies to everyone): one client cannot take every slot.
    pub watch_streams_per_token_max: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct JobDefaults {
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub queue: String,
}

/// Retention: the leader deletes what is past these ages, a bounded batch at a time, so the state
/// machine stays bounded. Every node should carry the same values (the leader's apply).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Succeeded and cancelled jobs are deleted this long after they finished.
    #[serde(with = "humantime_serde")]
    pub finished: Duration,
    /// Dead letters are deleted this long after they died (unless redriven first).
    #[serde(with = "humantime_serde")]
    pub dead_letters: Duration,
    /// A repeat of an idempotency key within this window returns the original job.
    #[serde(with = "humantime_serde")]
    pub idempotency_keys: Duration,
    /// How often the leader looks for something to delete.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            finished: Duration::from_secs(24 * 60 * 60),
            dead_letters: Duration::from_secs(7 * 24 * 60 * 60),
            idempotency_keys: Duration::from_secs(24 * 60 * 60),
            interval: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RaftConfig {
    /// How often the leader sends heartbeats (and confirms its quorum).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Shortest random election timeout: a follower that has heard nothing from a leader for
    /// the leader lease (`election-timeout-max`) plus its timeout campaigns.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    /// Longest random election timeout, and the leader lease during which followers refuse to
    /// vote for anyone else after the last word from their leader.
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Take a snapshot (and allow purging the log behind it) after this many applied entries.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind the last snapshot, for lagging followers.
    pub keep_entries_after_snapshot: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            data_dir: PathBuf::from("./data"),
            listen: "127.0.0.1:7101".parse().expect("constant address"),
            advertise: None,
            peer_listen: None,
            peer_advertise: None,
            peer_tls: None,
            api_tls: None,
            tokens: Vec::new(),
            tokens_file: None,
            client_certs: Vec::new(),
            insecure: false,
            http_listen: None,
            http_tls: None,
            init: false,
            join: Vec::new(),
            voters_target: 3,
            table_storage: exactly_store::TableStorage::default(),
            slots: 256,
            drain_deadline: Duration::from_secs(20),
            limits: LimitsConfig::default(),
            defaults: JobDefaults::default(),
            raft: RaftConfig::default(),
            lease: LeaseConfig::default(),
            retention: RetentionConfig::default(),
            exec: BTreeMap::new(),
            exec_guard: None,
            http: BTreeMap::new(),
        }
    }
}

/// Lease timing. Invariant 4 of the design: a node stops running attempts (cancels, then kills
/// after `kill-grace`) before the leader may consider its lease expired, assuming only that the
/// nodes' monotonic clocks run at rates within `clock-rate-ratio-max` of each other:
///
/// ```text
/// (self-fence-after + LEASE_CHECK_INTERVAL + kill-grace) × ratio² < expire-after
/// ```
///
/// The node measures `self-fence-after` from the *send* time of its last acknowledged renewal;
/// the leader measures `expire-after` from when it *applied* the last renewal (later than the
/// send), or from when it became leader, whichever is later (invariant 6). One ratio factor
/// covers a node clock running slow, the other the leader's running fast.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How often a node renews its lease (a committed log entry).
    #[serde(with = "humantime_serde")]
    pub renew_interval: Duration,
    /// A node that has had no renewal acknowledged for this long since the renewal's send time
    /// stops starting attempts and cancels the running ones.
    #[serde(with = "humantime_serde")]
    pub self_fence_after: Duration,
    /// How long a cancelled attempt may take to stop before it is killed.
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
    /// The leader expires a node's lease (and reassigns its attempts) after this long without a
    /// committed renewal.
    #[serde(with = "humantime_serde")]
    pub expire_after: Duration,
    /// The largest ratio between two nodes' monotonic clock rates that the timing tolerates.
    pub clock_rate_ratio_max: f64,
}

/// The longest drain deadline a node accepts (one day, the longest job timeout).
pub const DRAIN_DEADLINE_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// How often the executor compares the time with its lease deadline.
pub const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            renew_interval: Duration::from_millis(500),
            self_fence_after: Duration::from_millis(2500),
            kill_grace: Duration::from_secs(1),
            expire_after: Duration::from_secs(6),
            clock_rate_ratio_max: 1.1,
        }
    }
}

impl LeaseConfig {
    /// Checks invariant 4's timing relation and the basic bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.renew_interval < Duration::from_millis(10) {
            return Err(invalid(
                "lease.renew-interval",
                self.renew_interval,
                "must be at least 10ms",
            ));
        }
        if self.self_fence_after < self.renew_interval * 2 {
            return Err(invalid(
                "lease.self-fence-after",
                self.self_fence_after,
                "must be at least 2 × lease.renew-interval (one lost renewal must not fence a node)",
            ));
        }
        if !(1.0..=2.0).contains(&self.clock_rate_ratio_max) {
            return Err(invalid(
                "lease.clock-rate-ratio-max",
                self.clock_rate_ratio_max,
                "must be within 1.0..=2.0",
            ));
        }
        let node_side =
            (self.self_fence_after + LEASE_CHECK_INTERVAL + self.kill_grace).as_secs_f64();
        let ratio = self.clock_rate_ratio_max;
        if node_side * ratio * ratio >= self.expire_after.as_secs_f64() {
            return Err(invalid(
                "lease.expire-after",
                self.expire_after,
                format!(
                    "must exceed (lease.self-fence-after + {LEASE_CHECK_INTERVAL:?} + lease.kill-grace) × \
                     lease.clock-rate-ratio-max² = {:.3}s, or a node could still be running an \
                     attempt when the leader reassigns it",
                    node_side * ratio * ratio
                ),
            ));
        }
        Ok(())
    }
}

/// Default of `limits.streams-per-connection-max`.
pub const STREAMS_PER_CONNECTION_MAX_DEFAULT: u32 = 1024;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            payload_bytes_max: 1024 * 1024,
            jobs_live_max: 1_000_000,
            propose_timeout: Duration::from_secs(5),
            snapshot_bytes_max: 4 * 1024 * 1024 * 1024,
            streams_per_connection_max: STREAMS_PER_CONNECTION_MAX_DEFAULT,
            watch_streams_per_token_max: 64,
        }
    }
}

impl Default for JobDefaults {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            timeout: Duration::from_secs(300),
            queue: "default".to_string(),
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(200),
            election_timeout_max: Duration::from_millis(400),
            snapshot_after_entries: 20_000,
            keep_entries_after_snapshot: 5_000,
        }
    }
}

/// A configuration problem, naming the key and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid value for `{key}`: {value} ({why})")]
    Invalid {
        key: &'static str,
        value: String,
        why: String,
    },
    /// A problem in one job kind's table (`[exec.KIND]`, `[http.KIND]`); `key` is the full
    /// path, e.g. `http.charge.url`.
    #[error("invalid value for `{key}`: {value} ({why})")]
    InvalidKind {
        key: String,
        value: String,
        why: String,
    },
}

/// `err`, found in `[table.kind]`, with the key made absolute.
fn kind_error(table: &str, kind: &str, err: SpecError) -> ConfigError {
    ConfigError::InvalidKind {
        key: format!("{table}.{kind}.{}", err.key),
        value: err.value,
        why: err.why,
    }
}

fn invalid(key: &'static str, value: impl std::fmt::Debug, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: format!("{value:?}"),
        why: why.into(),
    }
}

impl NodeConfig {
    /// Reads and parses a TOML file (not yet validated: flags may still override it).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Where `exec` commands' process groups are recorded while they run (see
    /// `exactly_handlers::exec::kill_leftover_groups`).
    pub fn exec_group_dir(&self) -> PathBuf {
        self.data_dir.join("exec-groups")
    }

    /// The exec guard binary (`exec-guard`, or where its default is found), or an error naming
    /// the key and every place looked at.
    pub fn locate_exec_guard(&self) -> Result<PathBuf, ConfigError> {
        exactly_handlers::locate_guard(self.exec_guard.as_deref()).map_err(|err| {
            let value = match &self.exec_guard {
                Some(path) => path.display().to_string(),
                None => "unset".to_string(),
            };
            ConfigError::Invalid {
                key: "exec-guard",
                value,
                why: format!("{err}; `[exec.*]` kinds need it"),
            }
        })
    }

    /// The address other nodes use for this one.
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The tokens of the configuration and of `tokens-file`, as they are now.
    pub fn all_tokens(&self) -> Result<Vec<TokenConfig>, ConfigError> {
        let mut all = self.tokens.clone();
        if let Some(path) = &self.tokens_file {
            all.extend(read_tokens_file(path)?);
        }
        Ok(all)
    }

    /// Whether the public API asks for credentials: tokens (a tokens file always holds some:
    /// validation and reloads refuse an empty one) or client certificates.
    fn has_tokens(&self) -> bool {
        !self.tokens.is_empty() || self.tokens_file.is_some() || !self.client_certs.is_empty()
    }

    /// What this node would serve beyond this machine without protection: empty on a loopback
    /// node, or one with TLS, tokens and peer mutual TLS where they are needed.
    pub fn exposure(&self) -> Vec<&'static str> {
        let beyond = |addr: SocketAddr| !addr.ip().is_loopback();
        let mut open = Vec::new();
        if beyond(self.listen) {
            if self.api_tls.is_none() {
                open.push("the public gRPC API without TLS ([api-tls])");
            }
            if !self.has_tokens() {
                open.push("the public gRPC API without tokens ([[tokens]])");
            }
        }
        let peer = self.peer_listen.unwrap_or(self.listen);
        if beyond(peer) && (self.peer_listen.is_none() || self.peer_tls.is_none()) {
            open.push("node-to-node traffic without mutual TLS (peer-listen and [peer-tls])");
        }
        if self.http_listen.is_some_and(beyond) && !self.has_tokens() {
            open.push("/metrics and the dashboard without tokens ([[tokens]])");
        }
        open
    }

    /// What a node would send in the clear beyond this machine although it is protected: the
    /// HTTP port's tokens without `[http-tls]`. Warned about at every start, not refused (the
    /// probes `/healthz` and `/readyz` need no token, and a scraper inside the host's network may
    /// be accepted risk).
    pub fn cleartext_secrets(&self) -> Option<&'static str> {
        let beyond = self.http_listen.is_some_and(|a| !a.ip().is_loopback());
        (beyond && self.has_tokens() && self.http_tls.is_none()).then_some(
            "the HTTP port takes tokens without TLS: a scraper's or browser's token crosses the \
             network in the clear; set [http-tls] (it may use the API's certificate)",
        )
    }

    /// Checks every value and the relations between them.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let open = self.exposure();
        if !self.insecure && !open.is_empty() {
            return Err(invalid(
                "insecure",
                false,
                format!(
                    "this node would serve {} beyond this machine; set them up (README, \
                     \"Security\"), listen on a loopback address, or start with --insecure \
                     to serve them open anyway",
                    open.join(", ")
                ),
            ));
        }
        use exactly_core::limits::{MAX_ATTEMPTS_MAX, NODE_SLOTS_MAX, PAYLOAD_BYTES_CEILING};
        if self.peer_advertise.is_some() && self.peer_listen.is_none() {
            return Err(invalid(
                "peer-advertise",
                self.peer_advertise.clone().unwrap_or_default(),
                "set peer-listen too: without it, peers use the public address",
            ));
        }
        if self.peer_tls.is_some() && self.peer_listen.is_none() {
            return Err(invalid(
                "peer-tls",
                "set",
                "needs peer-listen: TLS covers the peer port, not the public API",
            ));
        }
        if self.http_tls.is_some() && self.http_listen.is_none() {
            return Err(invalid(
                "http-tls",
                "set",
                "needs http-listen: it is the HTTP port's TLS",
            ));
        }
        if let Some(peer) = self.peer_listen {
            if peer == self.listen && peer.port() != 0 {
                return Err(invalid(
                    "peer-listen",
                    peer,
                    "must differ from listen (unset it to share the public port)",
                ));
            }
        }
        let tokens = self.all_tokens()?;
        if self.tokens_file.is_some() && tokens.len() == self.tokens.len() {
            return Err(invalid(
                "tokens-file",
                self.tokens_file.clone().unwrap_or_default(),
                "holds no [[tokens]]",
            ));
        }
        validate_tokens(&tokens)?;
        validate_client_certs(&self.client_certs, self.api_tls.as_ref())?;
        if let Some(http) = &self.http_tls {
            if http.client_ca.is_some() || http.crl.is_some() {
                return Err(invalid(
                    "http-tls.client-ca",
                    "set",
                    "client certificates are credentials on the public gRPC port ([api-tls]) \
                     only; the HTTP port takes tokens",
                ));
            }
        }
        if let Some(api) = &self.api_tls {
            if api.crl.is_some() && api.client_ca.is_none() {
                return Err(invalid(
                    "api-tls.crl",
                    "set",
                    "lists revoked client certificates: set api-tls.client-ca too",
                ));
            }
        }
        if self.node_id == Some(0) {
            return Err(invalid("node-id", 0, "node ids start at 1"));
        }
        if !(1..=NODE_SLOTS_MAX).contains(&self.slots) {
            return Err(invalid(
                "slots",
                self.slots,
                format!("must be 1..={NODE_SLOTS_MAX}"),
            ));
        }
        if !(1..=7).contains(&self.voters_target) {
            return Err(invalid(
                "voters-target",
                self.voters_target,
                "must be 1..=7 (use 3 or 5)",
            ));
        }
        if self.drain_deadline > DRAIN_DEADLINE_MAX {
            return Err(invalid(
                "drain-deadline",
                self.drain_deadline,
                format!("must be at most {DRAIN_DEADLINE_MAX:?}"),
            ));
        }
        let l = &self.limits;
        if l.payload_bytes_max == 0 || l.payload_bytes_max > PAYLOAD_BYTES_CEILING {
            return Err(invalid(
                "limits.payload-bytes-max",
                l.payload_bytes_max,
                format!("must be 1..={PAYLOAD_BYTES_CEILING}"),
            ));
        }
        if l.jobs_live_max == 0 {
            return Err(invalid("limits.jobs-live-max", 0, "must be at least 1"));
        }
        let per_token = self.limits.watch_streams_per_token_max;
        if !(1..=crate::events::WATCHERS_MAX as u32).contains(&per_token) {
            return Err(invalid(
                "limits.watch-streams-per-token-max",
                per_token,
                format!("must be 1..={}", crate::events::WATCHERS_MAX),
            ));
        }
        if self.limits.streams_per_connection_max == 0 {
            return Err(invalid(
                "limits.streams-per-connection-max",
                0,
                "must be at least 1",
            ));
        }
        if l.propose_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "limits.propose-timeout",
                l.propose_timeout,
                "must be at least 100ms",
            ));
        }
        let d = &self.defaults;
        if !(1..=MAX_ATTEMPTS_MAX).contains(&d.max_attempts) {
            return Err(invalid(
                "defaults.max-attempts",
                d.max_attempts,
                format!("must be 1..={MAX_ATTEMPTS_MAX}"),
            ));
        }
        if d.timeout.is_zero() {
            return Err(invalid("defaults.timeout", d.timeout, "must be positive"));
        }
        if d.queue.is_empty() {
            return Err(invalid("defaults.queue", &d.queue, "must not be empty"));
        }
        let keep = &self.retention;
        for (key, value) in [
            ("retention.finished", keep.finished),
            ("retention.dead-letters", keep.dead_letters),
            ("retention.idempotency-keys", keep.idempotency_keys),
        ] {
            if value < Duration::from_secs(1) {
                return Err(invalid(key, value, "must be at least 1s"));
            }
        }
        if keep.interval < Duration::from_millis(100) {
            return Err(invalid(
                "retention.interval",
                keep.interval,
                "must be at least 100ms",
            ));
        }
        let r = &self.raft;
        if r.heartbeat_interval.is_zero() {
            return Err(invalid(
                "raft.heartbeat-interval",
                r.heartbeat_interval,
                "must be positive",
            ));
        }
        // A follower must hear several heartbeats before it may start an election, or a single
        // delayed heartbeat deposes a healthy leader.
        if r.election_timeout_min < r.heartbeat_interval * 3 {
            return Err(invalid(
                "raft.election-timeout-min",
                r.election_timeout_min,
                "must be at least 3 × raft.heartbeat-interval",
            ));
        }
        if r.election_timeout_max <= r.election_timeout_min {
            return Err(invalid(
                "raft.election-timeout-max",
                r.election_timeout_max,
                "must exceed raft.election-timeout-min",
            ));
        }
        // openraft's followers refuse votes for `election-timeout-max` after the last word from
        // their leader (its lease), then each waits its own random timeout in [min, max]: a dead
        // leader is replaced after at most 2 × max (one round). Renewals resume with the new
        // leader within a renew interval, so a failover leaves every healthy node's lease valid
        // when this holds (DESIGN: a failover never fences a healthy node).
        let failover = r.election_timeout_max * 2 + self.lease.renew_interval;
        if failover >= self.lease.self_fence_after {
            return Err(invalid(
                "raft.election-timeout-max",
                r.election_timeout_max,
                format!(
                    "2 × raft.election-timeout-max + lease.renew-interval = {failover:?} must be \
                     below lease.self-fence-after ({:?}), or a leader failover would fence \
                     healthy nodes",
                    self.lease.self_fence_after
                ),
            ));
        }
        if r.snapshot_after_entries == 0 {
            return Err(invalid(
                "raft.snapshot-after-entries",
                0,
                "must be at least 1",
            ));
        }
        self.lease.validate()?;
        let builtins = Registry::with_builtins();
        for (kind, spec) in &self.exec {
            if builtins.contains(kind) {
                return Err(invalid("exec", kind, "built-in kinds cannot be redefined"));
            }
            spec.validate()
                .map_err(|err| kind_error("exec", kind, err))?;
            if spec.kill_grace > self.lease.kill_grace {
                return Err(ConfigError::InvalidKind {
                    key: format!("exec.{kind}.kill-grace"),
                    value: format!("{:?}", spec.kill_grace),
                    why: "must not exceed lease.kill-grace (the executor kills at that point)"
                        .to_string(),
                });
            }
            // A command that writes relative paths must not write into the Raft log's store.
            let data = std::path::absolute(&self.data_dir).unwrap_or(self.data_dir.clone());
            if spec.workdir.starts_with(&data) {
                return Err(ConfigError::InvalidKind {
                    key: format!("exec.{kind}.workdir"),
                    value: spec.workdir.display().to_string(),
                    why: format!(
                        "must not be the data directory or inside it ({})",
                        data.display()
                    ),
                });
            }
        }
        for (kind, spec) in &self.http {
            if builtins.contains(kind) {
                return Err(invalid("http", kind, "built-in kinds cannot be redefined"));
            }
            if self.exec.contains_key(kind) {
                return Err(invalid(
                    "http",
                    kind,
                    "also defined as [exec.KIND]: a kind has one handler",
                ));
            }
            spec.validate()
                .map_err(|err| kind_error("http", kind, err))?;
        }
        Ok(self)
    }

    /// Adds the job kinds this configuration defines (`[exec.*]`, `[http.*]`) to `registry`,
    /// which usually holds the built-ins ([`Registry::with_builtins`]) and an embedder's own
    /// handlers. Call it with a validated configuration.
    pub fn register_kinds(&self, registry: &mut Registry) -> Result<(), ConfigError> {
        if !self.exec.is_empty() {
            let guard = self.locate_exec_guard()?;
            for (kind, spec) in &self.exec {
                registry
                    .register_exec_in(
                        kind.clone(),
                        spec.clone(),
                        guard.clone(),
                        self.exec_group_dir(),
                    )
                    .map_err(|err| kind_error("exec", kind, err))?;
            }
        }
        for (kind, spec) in &self.http {
            registry
                .register_http(kind.clone(), spec.clone())
                .map_err(|err| kind_error("http", kind, err))?;
        }
        Ok(())
    }

    /// openraft's configuration derived from ours.
    pub fn openraft_config(&self) -> openraft::Config {
        let r = &self.raft;
        openraft::Config {
            cluster_name: "exactly".to_string(),
            heartbeat_interval: r.heartbeat_interval.as_millis() as u64,
            election_timeout_min: r.election_timeout_min.as_millis() as u64,
            election_timeout_max: r.election_timeout_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
            max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
            purge_batch_size: 256,
            // openraft gives an AppendEntries RPC one heartbeat interval to complete. Its
            // default of 300 entries per RPC, each entry a batch of up to 1,000 jobs, could not be
            // shipped in time on a busy machine: the RPC timed out again and again and the leader
            // never committed (found by the 10k-job test under load). Fewer entries per RPC keep
            // each one small; openraft sends the next right after.
            max_payload_entries: RAFT_PAYLOAD_ENTRIES_MAX,
            // openraft 0.10 lets a leader that restarts come back as leader in the same term
            // without an election. Its log store acknowledges an append only after the fsync, but
            // the leader replicates entries while its own fsync runs, so a crash can take from
            // its disk entries that followers already hold; restored in the same term it would
            // append different entries under the same log ids, and two replicas would commit
            // different logs. Found by the chaos suite (seeds 1, 13 and 14 with kills: replicas
            // disagreed). A restarted node must win a new term: its new entries never share a
            // log id with the lost ones.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
    }
}

/// Log entries per AppendEntries RPC (see [`NodeConfig::openraft_config`]).
pub const RAFT_PAYLOAD_ENTRIES_MAX: u64 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// A restarted leader never resumes its term (see `openraft_config`): the chaos suite
    /// found replicas committing different logs when it did.
    #[test]
    fn a_restarted_leader_must_win_a_new_term() {
        let config = NodeConfig::default().openraft_config();
        assert_eq!(config.enable_leader_restore, Some(false));
    }

    /// Every example in cluster-config/ parses and validates.
    /// Tokens on a non-loopback HTTP port without `[http-tls]` are warned about; with it, on a
    /// loopback port or without tokens, not. `[http-tls]` without an HTTP port is refused.
    #[test]
    fn tokens_on_plain_http_beyond_loopback_are_warned_about() {
        let files = ApiTlsConfig {
            cert: "a.pem".into(),
            key: "a.key".into(),
            client_ca: None,
            crl: None,
        };
        let mut c = NodeConfig {
            http_listen: Some("0.0.0.0:8101".parse().unwrap()),
            tokens: vec![TokenConfig {
                name: "prom".into(),
                sha256: "0".repeat(64),
                scopes: vec!["read".into()],
            }],
            ..NodeConfig::default()
        };
        assert!(c.cleartext_secrets().is_some());
        c.http_tls = Some(files.clone());
        assert!(c.cleartext_secrets().is_none());
        c.http_tls = None;
        c.http_listen = Some("127.0.0.1:8101".parse().unwrap());
        assert!(c.cleartext_secrets().is_none());
        let err = NodeConfig {
            http_tls: Some(files),
            ..NodeConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("http-tls"), "{err}");
    }

    #[test]
    fn every_cluster_config_example_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster-config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let config = NodeConfig::from_file(&path)
                    .and_then(NodeConfig::validate)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(config.node_id.is_some());
                seen += 1;
            }
        }
        assert!(
            seen >= 3,
            "expected the local 3-node examples, found {seen}"
        );
    }

    /// A bad value is refused with the key and the value in the message.
    #[test]
    fn validation_names_key_and_value() {
        let cases = [
            ("slots = 0", "`slots`", "0"),
            (
                "[limits]\npayload-bytes-max = 999999999",
                "`limits.payload-bytes-max`",
                "999999999",
            ),
            (
                "[raft]\nelection-timeout-min = \"100ms\"",
                "`raft.election-timeout-min`",
                "100ms",
            ),
            (
                "[defaults]\nmax-attempts = 1000",
                "`defaults.max-attempts`",
                "1000",
            ),
            (
                "listen = \"127.0.0.1:7101\"\npeer-listen = \"127.0.0.1:7101\"",
                "`peer-listen`",
                "127.0.0.1:7101",
            ),
            (
                "peer-advertise = \"n1:7201\"",
                "`peer-advertise`",
                "n1:7201",
            ),
        ];
        for (text, key, value) in cases {
            let err = NodeConfig::from_toml(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(value), "{text}: {err}");
        }
    }

    /// `table-storage` takes "memory" (the default) or "disk"; anything else is refused at
    /// parse time with the key and the accepted values.
    #[test]
    fn table_storage_is_memory_or_disk() {
        let parse = |text: &str| NodeConfig::from_toml(text).map(|c| c.table_storage);
        assert_eq!(parse("").unwrap(), exactly_store::TableStorage::Memory);
        let disk = parse("table-storage = \"disk\"").unwrap();
        assert_eq!(disk, exactly_store::TableStorage::Disk);
        let err = parse("table-storage = \"tape\"").unwrap_err().to_string();
        assert!(
            err.contains("table-storage") && err.contains("memory") && err.contains("disk"),
            "{err}"
        );
    }

    /// Secure by default: a port beyond loopback needs its protection (TLS and tokens on the
    /// public port, a peer port with mutual TLS, tokens on the HTTP port) unless `insecure`;
    /// loopback needs none.
    #[test]
    fn ports_beyond_loopback_need_protection_unless_insecure() {
        let loopback = NodeConfig::default();
        assert!(loopback.exposure().is_empty());
        loopback.validate().unwrap();
        let tls = |c: &mut NodeConfig| {
            c.api_tls = Some(ApiTlsConfig {
                cert: "a.pem".into(),
                key: "a.key".into(),
                client_ca: None,
                crl: None,
            });
            c.tokens = vec![TokenConfig {
                name: "web".into(),
                sha256: "a".repeat(64),
                scopes: vec!["read".into()],
            }];
            c.peer_listen = Some("0.0.0.0:7201".parse().unwrap());
            c.peer_tls = Some(PeerTlsConfig {
                ca: "ca.pem".into(),
                cert: "n.pem".into(),
                key: "n.key".into(),
                crl: None,
            });
        };
        let mut open = NodeConfig {
            listen: "0.0.0.0:7101".parse().unwrap(),
            http_listen: Some("0.0.0.0:8101".parse().unwrap()),
            ..NodeConfig::default()
        };
        assert_eq!(open.exposure().len(), 4, "{:?}", open.exposure());
        let err = open.clone().validate().unwrap_err().to_string();
        assert!(
            err.contains("--insecure") && err.contains("without TLS"),
            "{err}"
        );
        open.insecure = true;
        open.clone().validate().unwrap();
        let mut closed = NodeConfig {
            insecure: false,
            ..open.clone()
        };
        tls(&mut closed);
        assert!(closed.exposure().is_empty(), "{:?}", closed.exposure());
        closed.clone().validate().unwrap();
        // Each missing piece alone is named.
        let mut no_peer_tls = closed.clone();
        no_peer_tls.peer_tls = None;
        assert_eq!(no_peer_tls.exposure().len(), 1);
        assert!(no_peer_tls.exposure()[0].contains("node-to-node"));
        let mut no_tokens = closed.clone();
        no_tokens.tokens.clear();
        assert_eq!(no_tokens.exposure().len(), 2, "{:?}", no_tokens.exposure());
        // A public port on loopback with its peer port beyond it still needs peer TLS.
        let peer_only = NodeConfig {
            peer_listen: Some("10.0.0.5:7201".parse().unwrap()),
            ..NodeConfig::default()
        };
        assert_eq!(peer_only.exposure().len(), 1);
    }

    /// Tokens: names bounded, printable and unique, at least one known scope, a digest of 64
    /// hex digits listed once; a tokens file holds `[[tokens]]` and nothing else.
    #[test]
    fn tokens_are_validated() {
        let digest = "a".repeat(64);
        let entry = |name: &str, sha: &str, scopes: &str| {
            format!("[[tokens]]\nname = \"{name}\"\nsha256 = \"{sha}\"\nscopes = {scopes}\n")
        };
        let ok = entry("web", &digest, "[\"submit:mail\", \"read\"]");
        let config = NodeConfig::from_toml(&ok).unwrap().validate().unwrap();
        assert_eq!(config.tokens.len(), 1);
        let other = "b".repeat(64);
        for (text, says) in [
            (entry("web app", &digest, "[\"read\"]"), "tokens.name"),
            (entry("", &digest, "[\"read\"]"), "tokens.name"),
            (entry("web", &digest, "[]"), "tokens.scopes"),
            (entry("web", &digest, "[\"write\"]"), "scopes are submit"),
            (entry("web", "abc", "[\"read\"]"), "64 hex"),
            (
                format!(
                    "{}{}",
                    entry("a", &digest, "[\"read\"]"),
                    entry("a", &other, "[\"read\"]")
                ),
                "listed twice",
            ),
            (
                format!(
                    "{}{}",
                    entry("a", &digest, "[\"read\"]"),
                    entry("b", &digest, "[\"read\"]")
                ),
                "twice",
            ),
        ] {
            let err = NodeConfig::from_toml(&text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.toml");
        std::fs::write(&file, &ok).unwrap();
        assert_eq!(read_tokens_file(&file).unwrap().len(), 1);
        let with_file = NodeConfig {
            tokens_file: Some(file.clone()),
            ..NodeConfig::default()
        };
        assert_eq!(
            with_file
                .clone()
                .validate()
                .unwrap()
                .all_tokens()
                .unwrap()
                .len(),
            1
        );
        std::fs::write(&file, "").unwrap();
        let err = with_file.validate().unwrap_err().to_string();
        assert!(err.contains("holds no [[tokens]]"), "{err}");
        std::fs::write(&file, format!("slots = 3\n{ok}")).unwrap();
        assert!(
            read_tokens_file(&file).is_err(),
            "only [[tokens]] in a tokens file"
        );
    }

    /// The default lease timing satisfies invariant 4 with room to spare, and the relation is
    /// checked exactly at its boundary.
    #[test]
    fn lease_timing_relation_is_checked() {
        LeaseConfig::default().validate().unwrap();
        let mut l = LeaseConfig {
            clock_rate_ratio_max: 1.0,
            ..LeaseConfig::default()
        };
        // 2.5 s + 0.1 s + 1 s = 3.6 s: expiry at 3.6 s is refused, just above it accepted.
        l.expire_after = Duration::from_millis(3600);
        assert!(l.validate().is_err());
        l.expire_after = Duration::from_millis(3601);
        l.validate().unwrap();
    }

    /// Raft timing that would let a leader failover outlast a healthy node's lease is refused,
    /// naming the key; the defaults leave room.
    #[test]
    fn failover_must_fit_inside_the_self_fence_time() {
        let config = NodeConfig::from_toml("").unwrap().validate().unwrap();
        let r = &config.raft;
        assert!(
            r.election_timeout_max * 2 + config.lease.renew_interval
                < config.lease.self_fence_after
        );
        let err = NodeConfig::from_toml(
            "[raft]\nheartbeat-interval = \"100ms\"\nelection-timeout-min = \"1s\"\nelection-timeout-max = \"2s\"",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`raft.election-timeout-max`") && err.contains("self-fence-after"),
            "{err}"
        );
    }

    /// `[http.KIND]` tables are checked with the full key and the value: a bad URL, a zero
    /// timeout, a kind that is also an exec kind or a built-in.
    #[test]
    fn http_kinds_are_validated() {
        let ok = "[http.charge]\nurl = \"http://127.0.0.1:9090/charge\"\n";
        let config = NodeConfig::from_toml(ok).unwrap().validate().unwrap();
        assert_eq!(config.http["charge"].url, "http://127.0.0.1:9090/charge");
        let cases = [
            (
                "[http.charge]\nurl = \"ftp://billing/charge\"",
                "`http.charge.url`",
                "ftp://billing/charge",
            ),
            (
                "[http.charge]\nurl = \"http://h/\"\nconnect-timeout = \"0s\"",
                "`http.charge.connect-timeout`",
                "0s",
            ),
            (
                "[http.charge]\nurl = \"http://h/\"\nrequest-timeout = \"0s\"",
                "`http.charge.request-timeout`",
                "0s",
            ),
            (
                "[http.charge]\nurl = \"http://h/\"\nheaders = { Idempotency-Key = \"k\" }",
                "`http.charge.headers.Idempotency-Key`",
                "Idempotency-Key",
            ),
            ("[http.noop]\nurl = \"http://h/\"", "`http`", "noop"),
            (
                "[exec.charge]\ncommand = \"/bin/true\"\n[http.charge]\nurl = \"http://h/\"",
                "`http`",
                "charge",
            ),
            (
                "[exec.resize]\ncommand = \"\"",
                "`exec.resize.command`",
                "\"\"",
            ),
            (
                "data-dir = \"/var/lib/exactly\"\n[exec.resize]\ncommand = \"/bin/true\"\n\
                 workdir = \"/var/lib/exactly/tmp\"",
                "`exec.resize.workdir`",
                "/var/lib/exactly/tmp",
            ),
            (
                "[exec.resize]\ncommand = \"/bin/true\"\ninherit-env = [\"A=B\"]",
                "`exec.resize.inherit-env`",
                "A=B",
            ),
        ];
        for (text, key, value) in cases {
            let err = NodeConfig::from_toml(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(value), "{text}: {err}");
        }
        // An unknown key in the table is refused when parsing.
        let err = NodeConfig::from_toml("[http.charge]\nurl = \"http://h/\"\nmethod = \"PUT\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("method"), "{err}");
    }

    /// `register_kinds` adds every configured exec and http kind to the registry.
    #[test]
    fn configured_kinds_are_registered() {
        // Any executable file will do as the guard for registering; this test's own binary is
        // one that surely exists.
        let guard = std::env::current_exe().unwrap();
        let config = NodeConfig::from_toml(&format!(
            "exec-guard = {:?}\n[exec.echo]\ncommand = \"cat\"\n[http.charge]\nurl = \"http://127.0.0.1:9090/\"",
            guard.display().to_string()
        ))
        .unwrap()
        .validate()
        .unwrap();
        let mut registry = Registry::with_builtins();
        config.register_kinds(&mut registry).unwrap();
        assert_eq!(
            registry.kinds().collect::<Vec<_>>(),
            ["charge", "echo", "fail", "noop", "sleep"]
        );
    }

    /// A node with exec kinds and no guard where `exec-guard` points refuses to register them,
    /// naming the key and the path; a node without exec kinds needs no guard.
    #[test]
    fn exec_kinds_need_the_guard() {
        let text =
            "exec-guard = \"/nonexistent/exactly-exec-guard\"\n[exec.echo]\ncommand = \"cat\"";
        let config = NodeConfig::from_toml(text).unwrap().validate().unwrap();
        let err = config
            .register_kinds(&mut Registry::with_builtins())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`exec-guard`") && err.contains("/nonexistent/exactly-exec-guard"),
            "{err}"
        );
        let config = NodeConfig::from_toml("exec-guard = \"/nonexistent/exactly-exec-guard\"")
            .unwrap()
            .validate()
            .unwrap();
        config
            .register_kinds(&mut Registry::with_builtins())
            .expect("no exec kinds, no guard needed");
    }

    /// An unknown key is an error naming it, not silently ignored.
    #[test]
    fn unknown_keys_are_refused() {
        let err = NodeConfig::from_toml("slotz = 4").unwrap_err().to_string();
        assert!(err.contains("slotz"), "{err}");
    }

    /// `[[client-certs]]` need `[api-tls] client-ca` and the other way round; names are plain
    /// and unique, scopes known; the HTTP port takes no client certificates; a CRL needs the
    /// client CA it belongs to. A valid set parses from TOML and counts as credentials.
    #[test]
    fn client_certificates_are_checked() {
        let text = r#"
            [api-tls]
            cert = "api.pem"
            key = "api.key"
            client-ca = "clients.pem"
            crl = "crl.pem"

            [[client-certs]]
            name = "billing"
            scopes = ["submit:mail", "read"]
        "#;
        let good = NodeConfig::from_toml(text).unwrap();
        assert_eq!(good.client_certs.len(), 1);
        assert!(good.has_tokens());
        good.clone().validate().unwrap();
        let err = |c: NodeConfig| c.validate().unwrap_err().to_string();
        let mut no_ca = good.clone();
        no_ca.api_tls.as_mut().unwrap().client_ca = None;
        no_ca.api_tls.as_mut().unwrap().crl = None;
        assert!(err(no_ca).contains("client-ca"));
        let mut no_clients = good.clone();
        no_clients.client_certs.clear();
        assert!(err(no_clients).contains("no [[client-certs]]"));
        let mut crl_alone = good.clone();
        crl_alone.client_certs.clear();
        crl_alone.api_tls.as_mut().unwrap().client_ca = None;
        assert!(err(crl_alone).contains("api-tls.crl"));
        for (name, scopes, says) in [
            ("../x", vec!["read"], "client-certs.name"),
            ("", vec!["read"], "client-certs.name"),
            ("ok", vec![], "at least one"),
            ("ok", vec!["fly"], "client-certs.scopes"),
        ] {
            let mut bad = good.clone();
            bad.client_certs[0] = ClientCertConfig {
                name: name.into(),
                scopes: scopes.into_iter().map(String::from).collect(),
            };
            let e = err(bad);
            assert!(e.contains(says), "{name:?}: {e}");
        }
        let mut twice = good.clone();
        twice.client_certs.push(twice.client_certs[0].clone());
        assert!(err(twice).contains("listed twice"));
        let mut http = good.clone();
        http.http_listen = Some("127.0.0.1:0".parse().unwrap());
        http.http_tls = http.api_tls.clone();
        assert!(err(http).contains("http-tls.client-ca"));
    }
}
