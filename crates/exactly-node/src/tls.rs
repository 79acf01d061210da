//! Mutual TLS on the peer port (`[peer-tls]`): who may speak to a node as a node.
//!
//! Every node holds a certificate from the cluster's CA that names its node id
//! (`exactly_client::certs`). The peer listener takes only connections that present one, and
//! dials its peers presenting its own and accepting only theirs: a Raft RPC goes to
//! `node-<target>.exactly`, so a connection to a reused address reaches the node it meant or
//! none. Inside the service ([`crate::internal`]) the certificate's node id is the sender: a
//! Raft message must come from the leader or candidate it names, a vote from a voter, a
//! forwarded write from a member (and a renewal or registration from the node it is about), a
//! join from the id it asks for.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use exactly_client::certs::{node_id_of_name, node_name, PEER_NAME};
use futures::future::BoxFuture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use x509_parser::extensions::GeneralName;

use crate::config::PeerTlsConfig;

/// How often a node looks at its certificate files for a new version.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes a listener runs at once.
pub const HANDSHAKES_MAX: usize = 256;
/// TLS handshakes a listener runs at once for one source (an IPv4 address, an IPv6 /64):
/// connections that open and never finish a handshake hold at most this many places.
pub const HANDSHAKES_PER_SOURCE_MAX: usize = 16;
/// Accepted connections of one source waiting for a handshake place, at most; more from that
/// source are closed at once.
pub const HANDSHAKES_WAITING_PER_SOURCE_MAX: usize = 240;
/// Accepted connections waiting for or in a handshake, at most, all sources together; beyond
/// it new connections from sources not proven are closed at once.
pub const HANDSHAKES_PENDING_MAX: usize = 1024;
/// TLS handshakes a listener runs at once for proven sources (those that completed one
/// before), apart from the [`HANDSHAKES_MAX`] of everyone else: a stranger with many addresses
/// can fill the others' places for a handshake timeout, never these, so peers and clients
/// that were connected before reconnect at once.
pub const HANDSHAKES_PROVEN_MAX: usize = 64;
/// Connections of proven sources waiting for or in a handshake, at most.
pub const HANDSHAKES_PROVEN_PENDING_MAX: usize = 256;
/// Proven sources a listener remembers, at most; past it, the one proven longest ago is
/// forgotten.
pub const PROVEN_SOURCES_MAX: usize = 4096;

/// A node's peer TLS material, reloaded when its files change (certificate rotation without a
/// restart): every new connection, accepted or dialled, uses what was loaded last; connections
/// already open keep theirs until they close.
pub struct PeerTls {
    files: PeerTlsConfig,
    node_id: u64,
    current: RwLock<Arc<Material>>,
    /// Counts the reloads: a channel made before the last one reconnects.
    generation: std::sync::atomic::AtomicU64,
}

/// One loaded version of the files.
struct Material {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// The serial numbers the CRL lists (none without one).
    revoked: Arc<Serials>,
    stamp: Stamp,
}

/// What the files looked like when they were read: (modified, length) of ca, cert, key and
/// CRL.
type Stamp = [Option<(SystemTime, u64)>; 4];

/// Certificate serial numbers, big-endian without leading zeros.
pub type Serials = std::collections::HashSet<Vec<u8>>;

/// A certificate's serial number as [`Serials`] holds them; `None` if it is not a certificate.
pub fn serial_of_der(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.tbs_certificate.serial.to_bytes_be())
}

/// Certificate revocation lists in PEM (`exactly cert crl`): the DER blocks rustls checks
/// handshakes against, and the serial numbers they list, which a node checks every call of a
/// connection already open against. A file without one is refused, naming `key`.
pub fn read_crls(
    key: &str,
    path: &Path,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
        Serials,
    ),
    String,
> {
    let pem =
        std::fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    let blocks: Vec<Vec<u8>> = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .filter_map(Result::ok)
        .filter(|p| p.label == "X509 CRL")
        .map(|p| p.contents)
        .collect();
    if blocks.is_empty() {
        return Err(format!(
            "{key}: no PEM \"X509 CRL\" in {} (make one with `exactly cert crl`)",
            path.display()
        ));
    }
    let mut serials = Serials::new();
    for der in &blocks {
        let listed = exactly_client::certs::revoked_serials(der)
            .map_err(|e| format!("{key}: {}: {e}", path.display()))?;
        serials.extend(listed);
    }
    let ders = blocks.into_iter().map(Into::into).collect();
    Ok((ders, serials))
}

/// The serial numbers a CRL listed when it was loaded last, shared by the TLS material that
/// loads it and whoever checks calls on connections already open.
#[derive(Debug, Default)]
pub struct Revoked(RwLock<Arc<Serials>>);

impl Revoked {
    pub fn set(&self, serials: Arc<Serials>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = serials;
    }

    /// Whether the certificate with this serial number is revoked.
    pub fn contains(&self, serial: &[u8]) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("peer-tls.{what}: cannot read {}: {e}", path.display()))
}

/// What a file looks like now: (modified, length), or `None` if it cannot be read. A reload
/// reads the files again only when this changed.
pub(crate) fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

fn stamp(files: &PeerTlsConfig) -> Stamp {
    [
        file_stamp(&files.ca),
        file_stamp(&files.cert),
        file_stamp(&files.key),
        files.crl.as_deref().and_then(file_stamp),
    ]
}

/// The certificates of a PEM bundle, DER-encoded.
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

impl PeerTls {
    /// Reads the files and checks that the certificate is node `node_id`'s: a node started with
    /// another node's certificate would be refused by every peer, or worse, speak as it.
    pub fn load(config: &PeerTlsConfig, node_id: u64) -> Result<Arc<Self>, String> {
        let material = Self::read_material(config, node_id)?;
        Ok(Arc::new(Self {
            files: config.clone(),
            node_id,
            current: RwLock::new(Arc::new(material)),
            generation: Default::default(),
        }))
    }

    fn read_material(config: &PeerTlsConfig, node_id: u64) -> Result<Material, String> {
        let stamp = stamp(config);
        let ca = read("ca", &config.ca)?;
        let cert = read("cert", &config.cert)?;
        let key = read("key", &config.key)?;
        let roots = pem_certificates(&ca);
        if roots.is_empty() {
            return Err(format!(
                "peer-tls.ca: no PEM certificate in {}",
                config.ca.display()
            ));
        }
        let chain = pem_certificates(&cert);
        let Some(leaf) = chain.first() else {
            return Err(format!(
                "peer-tls.cert: no PEM certificate in {}",
                config.cert.display()
            ));
        };
        match node_id_of_der(leaf) {
            Some(id) if id == node_id => {}
            Some(id) => {
                return Err(format!(
                    "peer-tls.cert: {} is node {id}'s certificate, this is node {node_id}",
                    config.cert.display()
                ))
            }
            None => {
                return Err(format!(
                    "peer-tls.cert: {} names no node (expected {}; see `exactly cert node`)",
                    config.cert.display(),
                    node_name(node_id)
                ))
            }
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (from, until) = validity_secs(leaf)
            .ok_or_else(|| format!("peer-tls.cert: cannot read {}", config.cert.display()))?;
        match expiry_check(from, until, now) {
            Err(why) => return Err(format!("peer-tls.cert: {}: {why}", config.cert.display())),
            Ok(Some(warning)) => {
                tracing::warn!(cert = %config.cert.display(), "{warning}");
            }
            Ok(None) => {}
        }
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|_| {
            format!(
                "peer-tls.key: no PEM private key in {}",
                config.key.display()
            )
        })?;
        let (crls, revoked) = match &config.crl {
            Some(path) => read_crls("peer-tls.crl", path)?,
            None => Default::default(),
        };
        if serial_of_der(leaf).is_some_and(|serial| revoked.contains(&serial)) {
            return Err(format!(
                "peer-tls.cert: {} is revoked by {}",
                config.cert.display(),
                config.crl.as_deref().unwrap_or(Path::new("")).display()
            ));
        }
        let (server, client) = configs(&roots, &chain, key, crls)?;
        Ok(Material {
            server,
            client,
            revoked: Arc::new(revoked),
            stamp,
        })
    }

    /// Whether the certificate `der` is revoked by the CRL loaded last: a peer connection opened
    /// before its certificate was revoked is refused from its next message.
    pub fn is_revoked(&self, der: &[u8]) -> bool {
        let revoked = self.current().revoked.clone();
        !revoked.is_empty() && serial_of_der(der).is_some_and(|s| revoked.contains(&s))
    }

    /// Reads the files again if they changed since they were last read, and uses them from now
    /// on if they are valid (this node's certificate, valid now, a key that matches it);
    /// otherwise keeps what it has and says why. Returns whether it took new material.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let last = self.current().stamp;
        if stamp(&self.files) == last {
            return Ok(false);
        }
        let material = Self::read_material(&self.files, self.node_id)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(true)
    }

    /// How many times new material was taken up since the start.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn current(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A connector that dials node `target` (its certificate must name it), or any node of the
    /// cluster when the id at that address is not known (joining, forwarding to a leader known
    /// by address), presenting this node's current certificate.
    pub fn connector(self: &Arc<Self>, target: Option<u64>) -> PeerConnector {
        let name = target.map_or_else(|| PEER_NAME.to_string(), node_name);
        PeerConnector {
            tls: self.clone(),
            name: ServerName::try_from(name).expect("node names are valid DNS names"),
        }
    }

    /// Serves TLS on the peer listener (see [`incoming`]): a client certificate from the
    /// cluster CA is required of every connection.
    pub fn incoming(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<PeerStream, std::io::Error>> {
        incoming(self.clone(), listener, shutdown)
    }
}

/// What a TLS listener needs: the server configuration to use for the next handshake.
pub trait ServerMaterial: Send + Sync + 'static {
    fn server_config(&self) -> Arc<rustls::ServerConfig>;
}

impl ServerMaterial for PeerTls {
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current().server.clone()
    }
}

/// Where a connection comes from, for fairness between clients: an IPv4 address, or the /64
/// prefix of an IPv6 address (one host often holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    V4(std::net::Ipv4Addr),
    V6Prefix(u64),
}

impl Source {
    pub fn of(ip: std::net::IpAddr) -> Self {
        match ip {
            std::net::IpAddr::V4(v4) => Source::V4(v4),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Per-source admission of accepted connections to the handshake stage: each source has at
/// most [`HANDSHAKES_PER_SOURCE_MAX`] handshakes running and [`HANDSHAKES_WAITING_PER_SOURCE_MAX`]
/// connections waiting; past that its new connections are closed. So a client that opens
/// connections and never speaks (a slowloris) delays its own connections, not other clients'.
#[derive(Debug, Default)]
pub struct HandshakeSources {
    sources: std::sync::Mutex<std::collections::HashMap<Source, SourceState>>,
    /// Sources that completed a handshake, with when they last did (a counter, not a clock).
    proven: std::sync::Mutex<Proven>,
}

#[derive(Debug, Default)]
struct Proven {
    last: std::collections::HashMap<Source, u64>,
    counter: u64,
}

#[derive(Debug)]
struct SourceState {
    /// Connections of this source that were admitted and have not finished (running or
    /// waiting for a place).
    admitted: usize,
    places: Arc<tokio::sync::Semaphore>,
}

/// One admitted connection's claim on its source; dropping it gives the claim back.
#[derive(Debug)]
pub struct SourceClaim {
    sources: Arc<HandshakeSources>,
    source: Source,
    places: Arc<tokio::sync::Semaphore>,
}

impl HandshakeSources {
    /// Admits one more connection from `source`, or `None` if that source already has
    /// [`HANDSHAKES_PER_SOURCE_MAX`] + [`HANDSHAKES_WAITING_PER_SOURCE_MAX`] admitted.
    pub fn admit(self: &Arc<Self>, source: Source) -> Option<SourceClaim> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let state = sources.entry(source).or_insert_with(|| SourceState {
            admitted: 0,
            places: Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_PER_SOURCE_MAX)),
        });
        if state.admitted >= HANDSHAKES_PER_SOURCE_MAX + HANDSHAKES_WAITING_PER_SOURCE_MAX {
            return None;
        }
        state.admitted += 1;
        Some(SourceClaim {
            sources: self.clone(),
            source,
            places: state.places.clone(),
        })
    }

    /// Whether `source` completed a handshake before (and is still remembered).
    pub fn is_proven(&self, source: Source) -> bool {
        self.proven
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last
            .contains_key(&source)
    }

    /// Remembers that `source` completed a handshake; past [`PROVEN_SOURCES_MAX`] sources,
    /// forgets the one that proved itself longest ago.
    pub fn prove(&self, source: Source) {
        let mut proven = self.proven.lock().unwrap_or_else(|p| p.into_inner());
        proven.counter += 1;
        let now = proven.counter;
        if proven.last.insert(source, now).is_none() && proven.last.len() > PROVEN_SOURCES_MAX {
            let oldest = proven
                .last
                .iter()
                .min_by_key(|(_, &at)| at)
                .map(|(&s, _)| s);
            if let Some(oldest) = oldest {
                proven.last.remove(&oldest);
            }
        }
    }

    /// Sources with admitted connections (a source is forgotten once it has none).
    pub fn tracked(&self) -> usize {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl SourceClaim {
    /// Waits for one of the source's handshake places.
    pub async fn place(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.places.clone().acquire_owned().await.ok()
    }
}

impl Drop for SourceClaim {
    fn drop(&mut self) {
        let mut sources = self
            .sources
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(state) = sources.get_mut(&self.source) {
            state.admitted -= 1;
            if state.admitted == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

/// Places for handshakes: connections waiting for or in one, and handshakes running.
struct Pool {
    pending: Arc<tokio::sync::Semaphore>,
    running: Arc<tokio::sync::Semaphore>,
}

impl Pool {
    fn new(pending: usize, running: usize) -> Self {
        Self {
            pending: Arc::new(tokio::sync::Semaphore::new(pending)),
            running: Arc::new(tokio::sync::Semaphore::new(running)),
        }
    }
}

/// Accepts connections on `listener`, runs each TLS handshake with the configuration loaded
/// last, and yields the connections that completed one. Handshakes run apart, each bounded to
/// [`HANDSHAKE_TIMEOUT`]; at most [`HANDSHAKES_MAX`] run at once, each source gets a bounded
/// share ([`HandshakeSources`]), so a slow or silent client holds up no other, and sources
/// that completed a handshake before have places of their own ([`HANDSHAKES_PROVEN_MAX`]), so
/// many silent sources together hold up no peer or client that was connected before.
pub fn incoming<M: ServerMaterial>(
    tls: Arc<M>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<PeerStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(HANDSHAKES_MAX);
    let general = Pool::new(HANDSHAKES_PENDING_MAX, HANDSHAKES_MAX);
    let proven = Pool::new(HANDSHAKES_PROVEN_PENDING_MAX, HANDSHAKES_PROVEN_MAX);
    let sources = Arc::new(HandshakeSources::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = shutdown.cancelled() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: give the open ones time to close
                    // instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let source = Source::of(peer.ip());
            let pool = if sources.is_proven(source) {
                &proven
            } else {
                &general
            };
            let Ok(pending) = pool.pending.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many connections waiting for a TLS handshake; connection closed");
                continue;
            };
            let Some(claim) = sources.admit(source) else {
                tracing::debug!(%peer, "too many TLS handshakes from this source; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tls, tx, running) = (tls.clone(), tx.clone(), pool.running.clone());
            let sources = sources.clone();
            tokio::spawn(async move {
                let _pending = pending;
                let handshake = async {
                    let _place = claim.place().await?;
                    let _running = running.acquire_owned().await.ok()?;
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                    Some(acceptor.accept(tcp).await)
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Some(Ok(stream))) => {
                        drop(claim);
                        sources.prove(source);
                        let _ = tx.send(Ok(PeerStream(stream))).await;
                    }
                    Ok(Some(Err(e))) => tracing::debug!(error = %e, "TLS handshake refused"),
                    Ok(None) => {}
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A server certificate without client certificates, reloaded when its files change like
/// [`PeerTls`]: the public gRPC port's (`[api-tls]`, HTTP/2 only) or the HTTP port's
/// (`[http-tls]`, HTTP/1.1).
pub struct ApiTls {
    files: crate::config::ApiTlsConfig,
    /// The ALPN protocols offered.
    alpn: &'static [&'static [u8]],
    current: RwLock<(Arc<rustls::ServerConfig>, ApiStamp)>,
    /// Where the serial numbers of the client CRL go when it is loaded.
    revoked: Arc<Revoked>,
}

/// ALPN of the public gRPC port.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of the HTTP port (browsers, Prometheus, probes).
pub const ALPN_HTTP: &[&[u8]] = &[b"http/1.1"];

/// (modified, length) of the API certificate, key, client CA and CRL when they were read.
type ApiStamp = [Option<(SystemTime, u64)>; 4];

impl ApiTls {
    /// Reads the certificate and key; a missing file, one without PEM, or a key that does not
    /// match the certificate stops the start with the path named.
    /// With `client-ca`, clients may present a certificate from that CA (checked against the
    /// CRL, whose serial numbers go to `revoked`); a client without one is still served (it
    /// may carry a token).
    pub fn load(
        files: &crate::config::ApiTlsConfig,
        alpn: &'static [&'static [u8]],
        revoked: Arc<Revoked>,
    ) -> Result<Arc<Self>, String> {
        let (config, stamp, serials) = Self::read(files, alpn)?;
        revoked.set(serials);
        Ok(Arc::new(Self {
            files: files.clone(),
            alpn,
            current: RwLock::new((config, stamp)),
            revoked,
        }))
    }

    fn stamp(files: &crate::config::ApiTlsConfig) -> ApiStamp {
        [
            file_stamp(&files.cert),
            file_stamp(&files.key),
            files.client_ca.as_deref().and_then(file_stamp),
            files.crl.as_deref().and_then(file_stamp),
        ]
    }

    #[allow(clippy::type_complexity)]
    fn read(
        files: &crate::config::ApiTlsConfig,
        alpn: &[&[u8]],
    ) -> Result<(Arc<rustls::ServerConfig>, ApiStamp, Arc<Serials>), String> {
        let stamp = Self::stamp(files);
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let (cert, key) = (read(&files.cert)?, read(&files.key)?);
        let chain: Vec<CertificateDer<'static>> = pem_certificates(&cert)
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        if chain.is_empty() {
            return Err(format!("{}: not a PEM certificate", files.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&key)
            .map_err(|_| format!("{}: not a PEM private key", files.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let (builder, serials) = match &files.client_ca {
            None => (builder.with_no_client_auth(), Serials::new()),
            Some(ca) => {
                let roots = pem_certificates(&read(ca)?);
                if roots.is_empty() {
                    return Err(format!("{}: not a PEM certificate", ca.display()));
                }
                let mut store = rustls::RootCertStore::empty();
                for root in roots {
                    store
                        .add(CertificateDer::from(root))
                        .map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                let (crls, serials) = match &files.crl {
                    Some(path) => read_crls("api-tls.crl", path)?,
                    None => Default::default(),
                };
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(store),
                    provider,
                )
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
                (builder.with_client_cert_verifier(verifier), serials)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("{}: {e}", files.key.display()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok((Arc::new(config), stamp, Arc::new(serials)))
    }
}

impl ServerMaterial for ApiTls {
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }
}

/// TLS material that a node reloads when its files change.
pub trait Reload: Send + Sync + 'static {
    /// Reads the files again if they changed; `Ok(true)` when new material is in use.
    fn reload_if_changed(&self) -> Result<bool, String>;
    /// What it is, for the log.
    fn what(&self) -> String;
}

impl Reload for PeerTls {
    fn reload_if_changed(&self) -> Result<bool, String> {
        PeerTls::reload_if_changed(self)
    }

    fn what(&self) -> String {
        format!("peer TLS ({})", self.files.cert.display())
    }
}

impl Reload for ApiTls {
    fn reload_if_changed(&self) -> Result<bool, String> {
        let last = self.current.read().unwrap_or_else(|p| p.into_inner()).1;
        if Self::stamp(&self.files) == last {
            return Ok(false);
        }
        let (config, stamp, serials) = Self::read(&self.files, self.alpn)?;
        self.revoked.set(serials);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (config, stamp);
        Ok(true)
    }

    fn what(&self) -> String {
        let port = if self.alpn == ALPN_GRPC {
            "API"
        } else {
            "HTTP"
        };
        format!("{port} TLS ({})", self.files.cert.display())
    }
}

/// Builds the server config (this node's certificate; a client certificate from the CA
/// required) and the client config (trusting only the CA; presenting this node's certificate).
fn configs(
    roots: &[Vec<u8>],
    chain: &[Vec<u8>],
    key: PrivateKeyDer<'static>,
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store
            .add(CertificateDer::from(root.clone()))
            .map_err(|e| format!("peer-tls.ca: {e}"))?;
    }
    let store = Arc::new(store);
    let chain: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        store.clone(),
        provider.clone(),
    )
    .with_crls(crls.clone())
    .only_check_end_entity_revocation()
    .build()
    .map_err(|e| format!("peer-tls.ca: {e}"))?;
    let server_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(store, provider.clone())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| format!("peer-tls.ca: {e}"))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| format!("peer-tls.key: does not match the certificate: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("peer-tls.key: {e}"))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}

/// Dials a peer over TLS with the node's current certificate (see [`PeerTls::connector`]).
#[derive(Clone)]
pub struct PeerConnector {
    tls: Arc<PeerTls>,
    name: ServerName<'static>,
}

impl tower::Service<http::Uri> for PeerConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.tls.current().client.clone());
        let name = self.name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A peer connection after its TLS handshake; its certificates reach every request on it.
pub struct PeerStream(tokio_rustls::server::TlsStream<TcpStream>);

impl PeerStream {
    /// The address of the other end.
    pub fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

/// The certificates the other end of a peer connection presented (verified against the CA).
#[derive(Clone, Debug)]
pub struct PeerCerts(pub Option<Arc<Vec<Vec<u8>>>>);

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerCerts;

    fn connect_info(&self) -> PeerCerts {
        let certs = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| Arc::new(c.iter().map(|d| d.to_vec()).collect()));
        PeerCerts(certs)
    }
}

impl tokio::io::AsyncRead for PeerStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Reloads TLS material (or tokens) when its files change, until the node stops.
pub async fn reload_on_change<R: Reload>(
    tls: Arc<R>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(RELOAD_CHECK) => {}
            () = shutdown.cancelled() => return,
        }
        match tls.reload_if_changed() {
            Ok(true) => {
                failing = false;
                tracing::info!(what = %tls.what(), "reloaded: new connections and calls use it");
            }
            Ok(false) => {}
            Err(why) => {
                if !failing {
                    tracing::error!(what = %tls.what(), %why, "files changed but cannot be used; keeping what was loaded before");
                }
                failing = true;
            }
        }
    }
}

/// Days before its expiry from which a node warns at start that its certificate needs renewing.
pub const CERT_EXPIRY_WARN_DAYS: i64 = 30;

/// A DER certificate's validity, in Unix seconds.
fn validity_secs(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// What to do with a certificate valid from `from` to `until` at `now` (Unix seconds): refuse
/// it if it is not valid now (every peer would refuse the handshake), warn when fewer than
/// [`CERT_EXPIRY_WARN_DAYS`] days are left.
pub fn expiry_check(from: i64, until: i64, now: i64) -> Result<Option<String>, String> {
    if now < from {
        return Err(format!(
            "not valid yet (from {from}, now {now}, Unix seconds; is this machine's clock right?)"
        ));
    }
    if now > until {
        return Err(format!(
            "expired {} days ago; issue a new one with `exactly cert node`",
            (now - until) / 86_400
        ));
    }
    let left = (until - now) / 86_400;
    Ok((left < CERT_EXPIRY_WARN_DAYS).then(|| {
        format!(
            "the node certificate expires in {left} days: issue a new one with `exactly cert \
             node`; the node takes it up once its file changes"
        )
    }))
}

/// The node id a DER certificate names: exactly one `node-<id>.exactly` among its subject
/// alternative names (several different ids name none).
pub fn node_id_of_der(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => node_id_of_name(dns),
            _ => None,
        });
    let first = ids.next()?;
    ids.all(|id| id == first).then_some(first)
}

/// The client a DER certificate names, and its serial number: the name of its one URI
/// `urn:exactly:client:<name>` (`exactly cert client`), else its subject's common name (a
/// certificate from another PKI). `None` if it names none or several.
pub fn client_of_der(der: &[u8]) -> Option<(String, Vec<u8>)> {
    use exactly_client::certs::CLIENT_URI_PREFIX;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let serial = cert.tbs_certificate.serial.to_bytes_be();
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => uri.strip_prefix(CLIENT_URI_PREFIX),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return None,
    };
    let name = match uris.as_slice() {
        [one] => (*one).to_string(),
        [] => {
            let mut names = cert.subject().iter_common_name();
            let first = names.next()?.as_str().ok()?.to_string();
            if names.next().is_some() {
                return None;
            }
            first
        }
        _ => return None,
    };
    Some((name, serial))
}

/// The node id of the certificate the sender of `request` presented (TLS verified it against
/// the cluster CA before the request got here); `None` on a plaintext connection.
pub fn sender<T>(request: &tonic::Request<T>) -> Option<u64> {
    node_id_of_der(sender_cert(request)?)
}

/// The certificate (DER) the sender of `request` presented; `None` on a plaintext connection.
pub fn sender_cert<T>(request: &tonic::Request<T>) -> Option<&[u8]> {
    let PeerCerts(certs) = request.extensions().get::<PeerCerts>()?;
    certs.as_ref()?.first().map(Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_client::certs::{issue_node, new_ca};

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_prefixes() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(
            Source::of(ip("10.0.0.7")),
            Source::V4("10.0.0.7".parse().unwrap())
        );
        assert_eq!(
            Source::of(ip("::ffff:10.0.0.7")),
            Source::of(ip("10.0.0.7"))
        );
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
        assert_ne!(Source::of(ip("10.0.0.7")), Source::of(ip("10.0.0.8")));
    }

    /// One source gets at most its share of admitted connections; others are unaffected, and
    /// a claim given back makes room again (a source with none is forgotten).
    #[tokio::test]
    async fn each_source_gets_a_bounded_share_of_handshakes() {
        let sources = Arc::new(HandshakeSources::default());
        let a = Source::of("10.0.0.1".parse().unwrap());
        let b = Source::of("10.0.0.2".parse().unwrap());
        let share = HANDSHAKES_PER_SOURCE_MAX + HANDSHAKES_WAITING_PER_SOURCE_MAX;
        let mut claims: Vec<SourceClaim> = (0..share).map(|_| sources.admit(a).unwrap()).collect();
        assert!(sources.admit(a).is_none(), "one over the share is refused");
        let other = sources.admit(b).expect("another source is unaffected");
        // Only HANDSHAKES_PER_SOURCE_MAX of a source's connections hold a place at once.
        let mut places = Vec::new();
        for claim in &claims[..HANDSHAKES_PER_SOURCE_MAX] {
            places.push(claim.place().await.unwrap());
        }
        let waiting = claims[HANDSHAKES_PER_SOURCE_MAX].place();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), waiting)
                .await
                .is_err(),
            "the next one waits for a place"
        );
        assert!(
            other.place().await.is_some(),
            "the other source has its own places"
        );
        claims.pop();
        assert!(sources.admit(a).is_some(), "a claim given back makes room");
        drop(claims);
        drop(other);
        assert_eq!(sources.tracked(), 0);
    }

    /// A source that completed a handshake is remembered as proven; past the bound, the one
    /// proven longest ago is forgotten, not the one just proven again.
    #[test]
    fn proven_sources_are_remembered_within_a_bound() {
        let sources = HandshakeSources::default();
        let v4 = |i: u32| Source::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        assert!(!sources.is_proven(v4(0)));
        for i in 0..PROVEN_SOURCES_MAX as u32 {
            sources.prove(v4(i));
        }
        assert!(sources.is_proven(v4(0)));
        sources.prove(v4(0));
        sources.prove(v4(PROVEN_SOURCES_MAX as u32));
        assert!(sources.is_proven(v4(0)), "proven again: the newest");
        assert!(
            !sources.is_proven(v4(1)),
            "the one proven longest ago is forgotten"
        );
        assert!(sources.is_proven(v4(PROVEN_SOURCES_MAX as u32)));
        assert_eq!(
            sources.proven.lock().unwrap().last.len(),
            PROVEN_SOURCES_MAX
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A node loads its own certificate, and refuses another node's, a CA in its place, and
    /// missing or empty files, each with a message that names the file.
    #[test]
    fn a_node_loads_only_its_own_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(1).unwrap();
        let two = issue_node(&ca, 2, 1).unwrap();
        let config = PeerTlsConfig {
            ca: write(dir.path(), "ca.pem", &ca.cert),
            cert: write(dir.path(), "node-2.pem", &two.cert),
            key: write(dir.path(), "node-2.key", &two.key),
            crl: None,
        };
        PeerTls::load(&config, 2).unwrap();
        let err = PeerTls::load(&config, 3).unwrap_err();
        assert!(
            err.contains("node 2's certificate, this is node 3"),
            "{err}"
        );

        let ca_as_cert = PeerTlsConfig {
            cert: config.ca.clone(),
            ..config.clone()
        };
        let err = PeerTls::load(&ca_as_cert, 2).unwrap_err();
        assert!(err.contains("names no node"), "{err}");

        let empty = PeerTlsConfig {
            key: write(dir.path(), "empty", ""),
            ..config.clone()
        };
        let err = PeerTls::load(&empty, 2).unwrap_err();
        assert!(err.contains("peer-tls.key: no PEM private key"), "{err}");

        let missing = PeerTlsConfig {
            ca: dir.path().join("nope.pem"),
            ..config
        };
        let err = PeerTls::load(&missing, 2).unwrap_err();
        assert!(err.contains("peer-tls.ca: cannot read"), "{err}");
    }

    /// Rotation without a restart: new files (a new key and certificate for the same node from
    /// the same CA) are taken up; files that would not do (another node's certificate, a key
    /// that does not match) are refused and the material loaded before stays; unchanged files
    /// are not read again.
    #[test]
    fn changed_files_are_reloaded_only_when_they_are_valid() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(1).unwrap();
        let first = issue_node(&ca, 2, 1).unwrap();
        let config = PeerTlsConfig {
            ca: write(dir.path(), "ca.pem", &ca.cert),
            cert: write(dir.path(), "node.pem", &first.cert),
            key: write(dir.path(), "node.key", &first.key),
            crl: None,
        };
        let tls = PeerTls::load(&config, 2).unwrap();
        assert_eq!(tls.reload_if_changed(), Ok(false));
        let touch = |path: &Path, secs: u64| {
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(SystemTime::now() + Duration::from_secs(secs))
                .unwrap();
        };
        let before = Arc::as_ptr(&tls.current());

        let second = issue_node(&ca, 2, 1).unwrap();
        write(dir.path(), "node.pem", &second.cert);
        write(dir.path(), "node.key", &second.key);
        touch(&config.cert, 10);
        assert_eq!(tls.reload_if_changed(), Ok(true));
        let after = tls.current();
        assert_ne!(Arc::as_ptr(&after), before);
        assert_eq!(tls.reload_if_changed(), Ok(false));

        let other = issue_node(&ca, 3, 1).unwrap();
        write(dir.path(), "node.pem", &other.cert);
        write(dir.path(), "node.key", &other.key);
        touch(&config.cert, 20);
        let err = tls.reload_if_changed().unwrap_err();
        assert!(err.contains("node 3's certificate"), "{err}");
        assert_eq!(Arc::as_ptr(&tls.current()), Arc::as_ptr(&after), "kept");

        write(dir.path(), "node.pem", &second.cert);
        write(dir.path(), "node.key", &first.key);
        touch(&config.cert, 30);
        let err = tls.reload_if_changed().unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        assert_eq!(Arc::as_ptr(&tls.current()), Arc::as_ptr(&after), "kept");
    }

    /// The public port's certificate reloads the same way: a new pair is taken up, a key that
    /// does not match the certificate is refused and the pair loaded before stays.
    #[test]
    fn the_api_certificate_reloads_when_valid() {
        use exactly_client::certs::issue_server;
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(1).unwrap();
        let names = ["127.0.0.1".to_string()];
        let first = issue_server(&ca, &names, 1).unwrap();
        let files = crate::config::ApiTlsConfig {
            cert: write(dir.path(), "api.pem", &first.cert),
            key: write(dir.path(), "api.key", &first.key),
            client_ca: None,
            crl: None,
        };
        let tls = ApiTls::load(&files, ALPN_GRPC, Default::default()).unwrap();
        assert_eq!(Reload::reload_if_changed(&*tls), Ok(false));
        let touch = |path: &Path, secs: u64| {
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(SystemTime::now() + Duration::from_secs(secs))
                .unwrap();
        };
        let before = Arc::as_ptr(&tls.server_config());
        let second = issue_server(&ca, &names, 1).unwrap();
        write(dir.path(), "api.pem", &second.cert);
        write(dir.path(), "api.key", &second.key);
        touch(&files.cert, 10);
        assert_eq!(Reload::reload_if_changed(&*tls), Ok(true));
        let after = tls.server_config();
        assert_ne!(Arc::as_ptr(&after), before);
        write(dir.path(), "api.key", &first.key);
        touch(&files.key, 20);
        assert!(Reload::reload_if_changed(&*tls).is_err());
        assert_eq!(
            Arc::as_ptr(&tls.server_config()),
            Arc::as_ptr(&after),
            "kept"
        );
        let err = ApiTls::load(
            &crate::config::ApiTlsConfig {
                cert: files.key.clone(),
                key: files.key.clone(),
                client_ca: None,
                crl: None,
            },
            ALPN_HTTP,
            Default::default(),
        )
        .err()
        .unwrap();
        assert!(err.contains("not a PEM certificate"), "{err}");
    }

    /// A certificate not valid now is refused with what to do; one close to its end is taken
    /// with a warning; one with time left is just taken.
    #[test]
    fn expiry_is_refused_or_warned_about() {
        let day = 86_400;
        let now = 1_000 * day;
        assert_eq!(expiry_check(now - day, now + 365 * day, now), Ok(None));
        let warning = expiry_check(now - day, now + 29 * day, now)
            .unwrap()
            .unwrap();
        assert!(warning.contains("expires in 29 days"), "{warning}");
        assert!(expiry_check(now - day, now + 30 * day, now)
            .unwrap()
            .is_none());
        let expired = expiry_check(now - 10 * day, now - 2 * day, now).unwrap_err();
        assert!(expired.contains("expired 2 days ago"), "{expired}");
        let early = expiry_check(now + day, now + 2 * day, now).unwrap_err();
        assert!(early.contains("not valid yet"), "{early}");
    }

    #[test]
    fn a_node_certificate_names_its_id() {
        let ca = new_ca(1).unwrap();
        let der = |pem: &str| pem_certificates(pem.as_bytes()).remove(0);
        assert_eq!(
            node_id_of_der(&der(&issue_node(&ca, 7, 1).unwrap().cert)),
            Some(7)
        );
        assert_eq!(node_id_of_der(&der(&ca.cert)), None);
        assert_eq!(node_id_of_der(b"garbage"), None);
    }

    /// `[peer-tls] crl`: a node whose own certificate is listed does not start; a listed peer
    /// certificate is revoked for messages on open connections once the new list is loaded; a
    /// file without a CRL is refused, naming the key.
    #[test]
    fn a_revocation_list_refuses_listed_node_certificates() {
        use exactly_client::certs::revocation_list;
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(1).unwrap();
        let (two, three) = (
            issue_node(&ca, 2, 1).unwrap(),
            issue_node(&ca, 3, 1).unwrap(),
        );
        let (empty, _) = revocation_list(&ca, None, &[], 1).unwrap();
        let config = PeerTlsConfig {
            ca: write(dir.path(), "ca.pem", &ca.cert),
            cert: write(dir.path(), "node-2.pem", &two.cert),
            key: write(dir.path(), "node-2.key", &two.key),
            crl: Some(write(dir.path(), "crl.pem", &empty)),
        };
        let tls = PeerTls::load(&config, 2).unwrap();
        let der = |pem: &str| pem_certificates(pem.as_bytes()).remove(0);
        assert!(!tls.is_revoked(&der(&three.cert)));
        let (listed, _) =
            revocation_list(&ca, Some(&empty), std::slice::from_ref(&three.cert), 1).unwrap();
        write(dir.path(), "crl.pem", &listed);
        let file = std::fs::File::options()
            .write(true)
            .open(config.crl.as_ref().unwrap())
            .unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(10))
            .unwrap();
        assert_eq!(tls.reload_if_changed(), Ok(true));
        assert!(tls.is_revoked(&der(&three.cert)));
        assert!(!tls.is_revoked(&der(&two.cert)));
        let (own, _) =
            revocation_list(&ca, Some(&listed), std::slice::from_ref(&two.cert), 1).unwrap();
        write(dir.path(), "crl.pem", &own);
        let err = PeerTls::load(&config, 2).unwrap_err();
        assert!(err.contains("is revoked by"), "{err}");
        let not_a_crl = PeerTlsConfig {
            crl: Some(config.ca.clone()),
            ..config
        };
        let err = PeerTls::load(&not_a_crl, 2).unwrap_err();
        assert!(err.contains("peer-tls.crl: no PEM"), "{err}");
    }

    /// A client certificate names its client by its URI; a certificate with two such URIs or
    /// none and no common name names nobody.
    #[test]
    fn a_client_certificate_names_its_client() {
        use exactly_client::certs::{issue_client, serial_of_pem};
        let ca = new_ca(1).unwrap();
        let web = issue_client(&ca, "web", 1).unwrap().cert;
        let der = |pem: &str| pem_certificates(pem.as_bytes()).remove(0);
        let (name, serial) = client_of_der(&der(&web)).unwrap();
        assert_eq!(name, "web");
        assert_eq!(serial, serial_of_pem(&web).unwrap());
        assert_eq!(
            client_of_der(&der(&ca.cert)).map(|c| c.0),
            Some("exactly cluster CA".into())
        );
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![
            rcgen::SanType::URI("urn:exactly:client:a".try_into().unwrap()),
            rcgen::SanType::URI("urn:exactly:client:b".try_into().unwrap()),
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let two = params.self_signed(&key).unwrap();
        assert_eq!(client_of_der(two.der()), None);
        assert_eq!(client_of_der(b"garbage"), None);
    }
}
