//! The node's HTTP endpoints: `/healthz` (the process and its Raft core run), `/readyz` (the
//! node can take and run work: a leader is known, it has applied everything the leader had
//! committed when the node started, its lease is valid, it applies the log within a small lag,
//! and it is neither draining nor removed), `/metrics`
//! (Prometheus text), and the dashboard (`/`, `/api/status`: `dashboard.rs`).

use openraft::async_runtime::WatchReceiver;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::auth::{Denied, Need, TokenSet};
use crate::node::Node;

/// The process-wide Prometheus recorder (several in-process test nodes share it; every series
/// carries a `node` label).
fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref()
}

/// Installs the metrics recorder (idempotent). Call before recording anything.
pub fn init_metrics() {
    let _ = recorder();
}

async fn healthz(State(node): State<Node>) -> (StatusCode, String) {
    match &node.raft.metrics().borrow_watched().running_state {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(fatal) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("raft stopped: {fatal}\n"),
        ),
    }
}

async fn readyz(State(node): State<Node>) -> (StatusCode, String) {
    match node.not_ready() {
        None => {
            let open = node.config.exposure();
            if open.is_empty() {
                (StatusCode::OK, "ready\n".into())
            } else {
                (
                    StatusCode::OK,
                    format!(
                        "ready\nINSECURE (--insecure): serving {}\n",
                        open.join(", ")
                    ),
                )
            }
        }
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics_text(State(node): State<Node>) -> (StatusCode, String) {
    let Some(handle) = recorder() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process\n".into(),
        );
    };
    record_gauges(&node);
    (StatusCode::OK, handle.render())
}

/// Samples the node's state into gauges (at scrape time: nothing on the hot path).
fn record_gauges(node: &Node) {
    let id = node.id.to_string();
    let m = node.raft.metrics().borrow_watched().clone();
    // The job counts are the cluster's, the same on every replica: only the leader reports them
    // (the others report 0), so that summing a metric over nodes, as dashboards do, counts
    // each job once.
    let leads = m.current_leader == Some(node.id);
    let counts = if leads {
        node.read(|t| t.counts().clone())
    } else {
        Default::default()
    };
    for (state, n) in [
        ("pending", counts.pending),
        ("running", counts.running),
        ("succeeded", counts.succeeded),
        ("dead", counts.dead),
        ("cancelled", counts.cancelled),
    ] {
        metrics::gauge!("exactly_jobs", "node" => id.clone(), "state" => state).set(n as f64);
    }
    metrics::gauge!("exactly_stale_completions", "node" => id.clone())
        .set(counts.stale_completions as f64);
    metrics::gauge!("exactly_raft_term", "node" => id.clone()).set(m.current_term as f64);
    metrics::gauge!("exactly_raft_last_log_index", "node" => id.clone())
        .set(m.last_log_index.unwrap_or(0) as f64);
    metrics::gauge!("exactly_raft_applied_index", "node" => id.clone())
        .set(m.last_applied.map_or(0, |l| l.index) as f64);
    metrics::gauge!("exactly_is_leader", "node" => id.clone())
        .set(f64::from(u8::from(m.current_leader == Some(node.id))));
    metrics::gauge!("exactly_lease_valid", "node" => id.clone())
        .set(f64::from(u8::from(node.lease_valid())));
    metrics::gauge!("exactly_incarnation", "node" => id.clone()).set(node.incarnation() as f64);
    if let Ok(bytes) = node.store.size_on_disk() {
        metrics::gauge!("exactly_store_bytes", "node" => id).set(bytes as f64);
    }
}

/// With `[[tokens]]`, everything but `/healthz` and `/readyz` (probes) needs a token with the
/// `read` scope: `Authorization: Bearer <token>` (Prometheus' `authorization` setting), or HTTP
/// Basic with the token as password, which a browser asks for when it opens the dashboard.
async fn require_read(
    State(tokens): State<Arc<TokenSet>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match tokens.admit(header, None, Need::Read) {
        Ok(_) => next.run(request).await,
        Err(denied @ Denied::Scope { .. }) => {
            (StatusCode::FORBIDDEN, format!("{denied}\n")).into_response()
        }
        Err(denied) => (
            StatusCode::UNAUTHORIZED,
            [(
                axum::http::header::WWW_AUTHENTICATE,
                "Basic realm=\"exactly\", charset=\"UTF-8\"",
            )],
            format!("{denied} (a browser: any user name, the token as password)\n"),
        )
            .into_response(),
    }
}

/// Serves the HTTP endpoints on `listener` until the node shuts down; over TLS with `tls`
/// (`[http-tls]`: the same acceptor as the gRPC ports, with its reloads and handshake bounds).
pub async fn serve(
    node: Node,
    listener: tokio::net::TcpListener,
    tokens: Arc<TokenSet>,
    tls: Option<Arc<crate::tls::ApiTls>>,
) {
    let shutdown = node.shutdown.clone();
    let guarded = crate::dashboard::routes()
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(tokens, require_read));
    let app = guarded
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(node);
    let stop = shutdown.clone().cancelled_owned();
    let result = match tls {
        Some(tls) => {
            let addr = listener.local_addr();
            let incoming = crate::tls::incoming(tls, listener, shutdown);
            match addr {
                Ok(addr) => {
                    axum::serve(TlsListener { incoming, addr }, app)
                        .with_graceful_shutdown(stop)
                        .await
                }
                Err(e) => Err(e),
            }
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

/// The HTTP port's connections after their TLS handshakes, as axum takes them.
struct TlsListener {
    incoming:
        tokio_stream::wrappers::ReceiverStream<Result<crate::tls::PeerStream, std::io::Error>>,
    /// The listener's own address.
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = crate::tls::PeerStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.peer_addr().unwrap_or(self.addr);
                    return (stream, peer);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "HTTP TLS connection"),
                // The acceptor stopped: the node is shutting down, and axum's graceful
                // shutdown ends the server.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Binds the HTTP listener (so a port conflict fails start-up).
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}
