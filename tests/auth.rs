//! Client credentials on the public port (issue 12): an in-process 3-node cluster with TLS on
//! its public gRPC port (`[api-tls]`), bearer tokens with scopes (`[[tokens]]`) and the HTTP
//! endpoints behind the same tokens. Each call is made with no token, a wrong one, one too
//! narrow and one wide enough, through the Rust client as users call it; a refused call changes
//! nothing.

use openraft::async_runtime::WatchReceiver;
use std::time::Duration;

use exactly_client::{Client, ClientOptions, Code, DeadLetterFilter, Token};
use exactly_node::config::{ApiTlsConfig, TokenConfig};
use exactly_tests::{http_get, ledger_job, wait_for, TestCluster};

const WEB: &str = "exa_web_token_for_tests";
const OPS: &str = "exa_ops_token_for_tests";
const ROOT: &str = "exa_root_token_for_tests";
const FEED: &str = "exa_feed_token_for_tests";
const FEED2: &str = "exa_feed2_token_for_tests";

/// Writes `dir/tokens.toml` with these (name, secret) tokens, each with `submit:feed`, and
/// moves its modification time `bump` seconds ahead (so that a rewrite within the same
/// instant is seen as a change).
fn write_tokens_file(
    dir: &std::path::Path,
    tokens: &[(&str, &str)],
    bump: u64,
) -> anyhow::Result<()> {
    let mut text = String::new();
    for (name, secret) in tokens {
        text.push_str(&format!(
            "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [\"submit:feed\"]\n",
            exactly_client::token::digest_hex(secret)
        ));
    }
    let path = dir.join("tokens.toml");
    std::fs::write(&path, text)?;
    let at = std::time::SystemTime::now() + Duration::from_secs(bump);
    std::fs::File::options()
        .write(true)
        .open(&path)?
        .set_modified(at)?;
    Ok(())
}

fn token(name: &str, secret: &str, scopes: &[&str]) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        sha256: exactly_client::token::digest_hex(secret),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

/// A CA and a server certificate for 127.0.0.1 in `dir`.
fn issue(dir: &std::path::Path) -> anyhow::Result<String> {
    use exactly_client::certs::{issue_server, new_ca};
    let ca = new_ca(30)?;
    let server = issue_server(&ca, &["127.0.0.1".into(), "localhost".into()], 30)?;
    std::fs::write(dir.join("api.pem"), &server.cert)?;
    std::fs::write(dir.join("api.key"), &server.key)?;
    Ok(ca.cert)
}

fn client(cluster: &TestCluster, ca: Option<&str>, secret: Option<&str>) -> anyhow::Result<Client> {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let endpoints = cluster
        .nodes
        .iter()
        .map(|n| format!("{scheme}://{}", n.addr))
        .collect();
    let options = ClientOptions {
        token: secret.map(|s| Token(s.into())),
        ca_pem: ca.map(str::to_string),
        retry_total_ms_max: 2_000,
        ..ClientOptions::default()
    };
    Ok(Client::connect_with(endpoints, options)?)
}

fn code_of<T: std::fmt::Debug>(result: Result<T, exactly_client::Error>) -> Code {
    match result {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e.code(),
    }
}

/// Tokens and scopes over TLS: no token and an unknown token are UNAUTHENTICATED, a token
/// without the scope a call needs is PERMISSION_DENIED (a `submit:emails` token cannot submit
/// to another queue, in a batch either), and the refused calls changed nothing; a plaintext
/// client does not get through the TLS port; health checks need no token; `/metrics` and the
/// dashboard want a `read` token (Bearer, or Basic as a browser sends it), probes do not; the
/// audit trail names who did each operator's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_and_scopes_guard_the_public_api() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    let ca = issue(certs.path())?;
    let dir = certs.path().to_path_buf();
    write_tokens_file(&dir, &[("feed", FEED)], 0)?;
    let cluster = TestCluster::start(3, |c| {
        c.api_tls = Some(ApiTlsConfig {
            cert: dir.join("api.pem"),
            key: dir.join("api.key"),
            client_ca: None,
            crl: None,
        });
        c.tokens = vec![
            token("web", WEB, &["submit:emails", "read"]),
            token("ops", OPS, &["operate"]),
            token("root", ROOT, &["admin"]),
        ];
        c.http_listen = Some("127.0.0.1:0".parse().unwrap());
        c.limits.watch_streams_per_token_max = 2;
        c.tokens_file = Some(dir.join("tokens.toml"));
    })
    .await?;

    let anonymous = client(&cluster, Some(&ca), None)?;
    assert_eq!(code_of(anonymous.status().await), Code::Unauthenticated);
    let wrong = client(&cluster, Some(&ca), Some("exa_not_a_token"))?;
    assert_eq!(code_of(wrong.status().await), Code::Unauthenticated);
    let plaintext = client(&cluster, None, None)?;
    let err = plaintext
        .status()
        .await
        .expect_err("plaintext to a TLS port");
    assert_ne!(err.code(), Code::Ok);

    let web = client(&cluster, Some(&ca), Some(WEB))?;
    let ops = client(&cluster, Some(&ca), Some(OPS))?;
    let root = client(&cluster, Some(&ca), Some(ROOT))?;
    let in_queue = |queue: &str| exactly_client::JobSpec {
        queue: queue.into(),
        ..ledger_job(b"a")
    };
    let id = web.submit_one(in_queue("emails")).await?;
    cluster.wait_succeeded(id, Duration::from_secs(20)).await?;
    assert_eq!(web.get(id).await?.id, id);
    assert_eq!(
        code_of(web.submit_one(in_queue("billing")).await),
        Code::PermissionDenied
    );
    let batch = web
        .submit(vec![in_queue("emails"), in_queue("billing")])
        .await;
    assert_eq!(code_of(batch), Code::PermissionDenied);
    assert_eq!(
        code_of(web.cancel(vec![id]).await),
        Code::PermissionDenied,
        "cancel needs operate"
    );
    let everything = DeadLetterFilter {
        all: true,
        ..DeadLetterFilter::default()
    };
    assert_eq!(
        code_of(web.purge(everything.clone()).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code_of(ops.submit_one(in_queue("emails")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code_of(ops.purge(everything.clone()).await),
        Code::PermissionDenied
    );
    assert_eq!(code_of(ops.remove(3).await), Code::PermissionDenied);
    // operate covers cancel (of a finished job: refused per item, not by scope) and reads.
    ops.cancel(vec![id]).await?;
    assert_eq!(ops.status().await?.members.len(), 3);
    root.purge(everything).await?;
    let billing = root.submit_one(in_queue("billing")).await?;
    cluster
        .wait_succeeded(billing, Duration::from_secs(20))
        .await?;
    // Nothing the refused calls asked for happened: two jobs exist, both succeeded.
    for n in &cluster.nodes {
        assert_eq!(
            n.node.read(|t| t.counts().succeeded),
            2,
            "node {}",
            n.node.id
        );
        assert_eq!(n.node.read(|t| t.counts().live()), 0);
    }
    assert_eq!(cluster.ledger.executions().len(), 2);

    // The audit trail: the operator's cancel and the admin's purge, by name, in log order, the
    // same on every replica; the refused calls are not in it; reading it needs admin.
    assert_eq!(code_of(ops.audit(0, 100).await), Code::PermissionDenied);
    let all = root.audit(0, 100).await?;
    // Nodes 2 and 3 joined first, each admitted once, each in its own name (in either order:
    // both ask to join as soon as they start).
    let mut admissions: Vec<(&str, bool)> = all
        .iter()
        .filter(|r| r.by.starts_with("node-"))
        .map(|r| {
            let id = &r.by["node-".len()..];
            let prefix = format!("admit node {id} (127.0.0.1:");
            let says = r.action.starts_with(&prefix) && r.action.ends_with(") as a voter");
            (r.by.as_str(), says && r.outcome == "done")
        })
        .collect();
    admissions.sort();
    assert_eq!(admissions, [("node-2", true), ("node-3", true)], "{all:?}");
    let trail: Vec<_> = all.iter().filter(|r| !r.by.starts_with("node-")).collect();
    let seen: Vec<(&str, &str)> = trail
        .iter()
        .map(|r| (r.by.as_str(), r.action.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("ops", format!("cancel jobs {id}").as_str()),
            ("root", "purge dead letters (all)"),
        ],
        "{trail:?}"
    );
    assert_eq!(trail[0].outcome, "0 of 1 cancelled", "{trail:?}");
    assert!(trail[0].index < trail[1].index && trail[0].at_ms > 0);
    let replicas: Vec<_> = cluster
        .nodes
        .iter()
        .map(|n| n.node.read(|t| t.audit().clone()))
        .collect();
    assert!(replicas.windows(2).all(|w| w[0] == w[1]), "{replicas:?}");

    // One token holds at most `watch-streams-per-token-max` watch streams on a node; another
    // token still gets its own.
    let on_first = |secret: &str| -> anyhow::Result<Client> {
        let options = ClientOptions {
            token: Some(Token(secret.into())),
            ca_pem: Some(ca.clone()),
            retry_total_ms_max: 2_000,
            ..ClientOptions::default()
        };
        Ok(Client::connect_with(
            vec![format!("https://{}", cluster.nodes[0].addr)],
            options,
        )?)
    };
    let (web_0, ops_0) = (on_first(WEB)?, on_first(OPS)?);
    let all = exactly_client::WatchScope::All;
    let w1 = web_0.watch(all.clone(), None).await?;
    let w2 = web_0.watch(all.clone(), None).await?;
    let third = web_0.watch(all.clone(), None).await;
    assert_eq!(code_of(third.map(|_| ())), Code::ResourceExhausted);
    let w3 = ops_0.watch(all.clone(), None).await?;
    drop((w1, w2, w3));

    // gRPC health needs no token (load balancers and orchestrators probe it).
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca));
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://{}", cluster.nodes[0].addr))?
            .tls_config(tls)?
            .connect()
            .await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;
    assert_eq!(health.into_inner().status, 1, "SERVING");

    // The tokens file is read again when it changes: a token added there works, one taken out
    // is refused, on every node, without a restart; a file that would not do (no token in it)
    // is refused and the tokens in use stay.
    let feed = client(&cluster, Some(&ca), Some(FEED))?;
    feed.submit_one(in_queue("feed")).await?;
    write_tokens_file(&dir, &[("feed2", FEED2)], 10)?;
    let feed2 = client(&cluster, Some(&ca), Some(FEED2))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let new_works = feed2.submit_one(in_queue("feed")).await.is_ok();
        let old_refused = feed
            .submit_one(in_queue("feed"))
            .await
            .err()
            .map(|e| e.code())
            == Some(Code::Unauthenticated);
        if new_works && old_refused {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tokens file not reloaded in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    write_tokens_file(&dir, &[], 20)?;
    tokio::time::sleep(exactly_node::tls::RELOAD_CHECK + Duration::from_secs(1)).await;
    feed2.submit_one(in_queue("feed")).await?;

    let http = cluster.nodes[0].http_addr.expect("http enabled");
    let (code, text) = http_get(http, "/metrics", None).await?;
    assert_eq!(code, 401, "{text}");
    assert!(
        text.contains("WWW-Authenticate: Basic") || text.contains("www-authenticate: Basic"),
        "{text}"
    );
    let (code, _) = http_get(http, "/metrics", Some("Bearer exa_nope")).await?;
    assert_eq!(code, 401);
    let (code, text) = http_get(http, "/metrics", Some(&format!("Bearer {WEB}"))).await?;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("exactly_raft_term"), "{text}");
    // A browser's login: any user name, the token as password.
    let basic = {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("me:{OPS}"));
        format!("Basic {encoded}")
    };
    let (code, text) = http_get(http, "/api/status", Some(&basic)).await?;
    assert_eq!(code, 200, "{text}");
    let (code, _) = http_get(http, "/", None).await?;
    assert_eq!(code, 401);
    for probe in ["/healthz", "/readyz"] {
        let (code, text) = http_get(http, probe, None).await?;
        assert_eq!(code, 200, "{probe}: {text}");
    }
    cluster.shutdown().await;
    Ok(())
}

/// A stranger that opens many connections to the TLS port and never starts a handshake (a
/// slowloris, here from 127.0.0.2) holds only its own source's share of the handshake places:
/// a client from another address (127.0.0.1) connects and is answered at once, and the
/// stranger's connections past its share are closed by the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_source_holds_up_no_other_clients_handshakes() -> anyhow::Result<()> {
    use exactly_node::tls::{HANDSHAKES_PER_SOURCE_MAX, HANDSHAKES_WAITING_PER_SOURCE_MAX};
    use tokio::io::AsyncReadExt;
    let certs = tempfile::tempdir()?;
    let ca = issue(certs.path())?;
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start(1, |c| {
        c.api_tls = Some(ApiTlsConfig {
            cert: dir.join("api.pem"),
            key: dir.join("api.key"),
            client_ca: None,
            crl: None,
        });
        c.tokens = vec![token("root", ROOT, &["admin"])];
    })
    .await?;
    let addr: std::net::SocketAddr = cluster.nodes[0].addr.parse()?;
    let share = HANDSHAKES_PER_SOURCE_MAX + HANDSHAKES_WAITING_PER_SOURCE_MAX;
    let mut silent = Vec::new();
    for _ in 0..share + 40 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.2:0".parse()?)?;
        silent.push(socket.connect(addr).await?);
    }
    let started = std::time::Instant::now();
    let root = client(&cluster, Some(&ca), Some(ROOT))?;
    root.status().await?;
    let took = started.elapsed();
    eprintln!("answered after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "a client from another address waited {took:?} behind a silent one (handshake timeout \
         {:?})",
        exactly_node::tls::HANDSHAKE_TIMEOUT
    );
    // The node closed the connections past the silent source's share (EOF at once), and kept
    // the others waiting (no EOF yet).
    let mut closed = 0;
    for stream in &mut silent {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(20), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 40, "connections closed past the share of {share}");
    cluster.shutdown().await;
    Ok(())
}

/// Client certificates as credentials (`[api-tls] client-ca`, `[[client-certs]]`), from a CA
/// of their own: a listed client's certificate is admitted with its scopes (and named in the
/// audit trail), an unlisted one and no credential at all are UNAUTHENTICATED, a token on a
/// connection with a certificate decides alone. Revoking the certificate (`exactly cert crl`,
/// the file changed) refuses it on the connection it already has, within a reload, and a new
/// connection fails its handshake; other clients are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificates_are_credentials_until_revoked() -> anyhow::Result<()> {
    use exactly_client::certs::{issue_client, new_ca, revocation_list};
    use exactly_client::ClientIdentity;
    let certs = tempfile::tempdir()?;
    let server_ca = issue(certs.path())?;
    let dir = certs.path().to_path_buf();
    let clients_ca = new_ca(30)?;
    std::fs::write(dir.join("clients-ca.pem"), &clients_ca.cert)?;
    let (empty, _) = revocation_list(&clients_ca, None, &[], 30)?;
    std::fs::write(dir.join("crl.pem"), &empty)?;
    let web = issue_client(&clients_ca, "web", 30)?;
    let ops = issue_client(&clients_ca, "ops", 30)?;
    let stranger = issue_client(&clients_ca, "stranger", 30)?;
    let cluster = TestCluster::start(1, |c| {
        c.api_tls = Some(ApiTlsConfig {
            cert: dir.join("api.pem"),
            key: dir.join("api.key"),
            client_ca: Some(dir.join("clients-ca.pem")),
            crl: Some(dir.join("crl.pem")),
        });
        c.tokens = vec![token("root", ROOT, &["admin"])];
        c.client_certs = vec![
            exactly_node::config::ClientCertConfig {
                name: "web".into(),
                scopes: vec!["submit:emails".into(), "read".into()],
            },
            exactly_node::config::ClientCertConfig {
                name: "ops".into(),
                scopes: vec!["operate".into()],
            },
        ];
    })
    .await?;
    let with_cert = |pair: &exactly_client::certs::CertifiedKey, secret: Option<&str>| {
        let options = ClientOptions {
            ca_pem: Some(server_ca.clone()),
            identity: Some(ClientIdentity {
                cert_pem: pair.cert.clone(),
                key_pem: pair.key.clone(),
            }),
            token: secret.map(|s| Token(s.into())),
            retry_total_ms_max: 1_000,
            ..ClientOptions::default()
        };
        Client::connect_with(vec![format!("https://{}", cluster.nodes[0].addr)], options)
    };
    let in_queue = |queue: &str| exactly_client::JobSpec {
        queue: queue.into(),
        ..ledger_job(b"c")
    };
    let web_client = with_cert(&web, None)?;
    let id = web_client.submit_one(in_queue("emails")).await?;
    cluster.wait_succeeded(id, Duration::from_secs(20)).await?;
    assert_eq!(web_client.get(id).await?.id, id);
    assert_eq!(
        code_of(web_client.submit_one(in_queue("billing")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code_of(web_client.cancel(vec![id]).await),
        Code::PermissionDenied
    );
    let ops_client = with_cert(&ops, None)?;
    ops_client.cancel(vec![id]).await?;
    let stranger_client = with_cert(&stranger, None)?;
    assert_eq!(
        code_of(stranger_client.status().await),
        Code::Unauthenticated
    );
    let nobody = client(&cluster, Some(&server_ca), None)?;
    assert_eq!(code_of(nobody.status().await), Code::Unauthenticated);
    let stranger_root = with_cert(&stranger, Some(ROOT))?;
    let root = client(&cluster, Some(&server_ca), Some(ROOT))?;
    let trail = stranger_root.audit(0, 100).await?;
    let by: Vec<&str> = trail
        .iter()
        .filter(|r| r.action.starts_with("cancel"))
        .map(|r| r.by.as_str())
        .collect();
    assert_eq!(by, ["ops"], "{trail:?}");

    // Revoke web's certificate; the node reads the changed list within a reload.
    let (listed, _) = revocation_list(
        &clients_ca,
        Some(&empty),
        std::slice::from_ref(&web.cert),
        30,
    )?;
    std::fs::write(dir.join("crl.pem"), &listed)?;
    std::fs::File::options()
        .write(true)
        .open(dir.join("crl.pem"))?
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))?;
    let deadline = std::time::Instant::now() + exactly_node::tls::RELOAD_CHECK * 3;
    loop {
        match web_client.status().await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "still admitted on its open connection: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let fresh = with_cert(&web, None)?;
    let err = fresh
        .status()
        .await
        .expect_err("a revoked certificate's handshake");
    assert_ne!(err.code(), Code::Ok);
    ops_client.status().await?;
    root.status().await?;
    cluster.shutdown().await;
    Ok(())
}

/// Many silent sources together (20 addresses, 64 connections each: more than the port's 256
/// handshake places and 1,024 waiting connections) hold up no client that completed a
/// handshake before: its new connection has places of its own and is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_silent_sources_hold_up_no_client_seen_before() -> anyhow::Result<()> {
    use exactly_node::tls::{HANDSHAKES_MAX, HANDSHAKES_PENDING_MAX, HANDSHAKES_PER_SOURCE_MAX};
    let certs = tempfile::tempdir()?;
    let ca = issue(certs.path())?;
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start(1, |c| {
        c.api_tls = Some(ApiTlsConfig {
            cert: dir.join("api.pem"),
            key: dir.join("api.key"),
            client_ca: None,
            crl: None,
        });
        c.tokens = vec![token("root", ROOT, &["admin"])];
    })
    .await?;
    // Seen before: one completed handshake from 127.0.0.1.
    client(&cluster, Some(&ca), Some(ROOT))?.status().await?;
    let addr: std::net::SocketAddr = cluster.nodes[0].addr.parse()?;
    let (sources, per_source) = (20u8, 64usize);
    assert!(usize::from(sources) * HANDSHAKES_PER_SOURCE_MAX > HANDSHAKES_MAX);
    assert!(usize::from(sources) * per_source > HANDSHAKES_PENDING_MAX);
    let mut silent = Vec::new();
    for s in 0..sources {
        let ip: std::net::IpAddr = format!("127.0.1.{}", s + 1).parse()?;
        for _ in 0..per_source {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
            silent.push(socket.connect(addr).await?);
        }
    }
    // Let the listener take them all in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let again = client(&cluster, Some(&ca), Some(ROOT))?;
    again.status().await?;
    let took = started.elapsed();
    eprintln!("a client seen before was answered after {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "a client seen before waited {took:?} behind {} silent connections",
        silent.len()
    );
    drop(silent);
    cluster.shutdown().await;
    Ok(())
}

/// `[http-tls]`: the HTTP port serves the probes, `/metrics` and the dashboard over TLS (so a
/// token sent to it does not cross the network in the clear), with the same token checks, and
/// a plaintext request gets no answer from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_port_serves_over_tls() -> anyhow::Result<()> {
    use exactly_tests::https_get;
    let certs = tempfile::tempdir()?;
    let ca = issue(certs.path())?;
    let dir = certs.path().to_path_buf();
    let files = ApiTlsConfig {
        cert: dir.join("api.pem"),
        key: dir.join("api.key"),
        client_ca: None,
        crl: None,
    };
    let cluster = TestCluster::start(1, |c| {
        c.api_tls = Some(files.clone());
        c.http_tls = Some(files.clone());
        c.http_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tokens = vec![token("root", ROOT, &["admin"])];
    })
    .await?;
    let http = cluster.nodes[0].http_addr.expect("http enabled");
    let (code, text) = https_get(http, &ca, "/healthz", None).await?;
    assert_eq!(code, 200, "{text}");
    let (code, text) = https_get(http, &ca, "/metrics", None).await?;
    assert_eq!(code, 401, "{text}");
    let (code, text) = https_get(http, &ca, "/metrics", Some(&format!("Bearer {ROOT}"))).await?;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("exactly_raft_term"), "{text}");
    let (code, text) = https_get(http, &ca, "/api/status", Some(&format!("Bearer {ROOT}"))).await?;
    assert_eq!(code, 200, "{text}");
    // Plain HTTP to the TLS port: no HTTP answer.
    if let Ok((code, text)) = http_get(http, "/healthz", None).await {
        assert_ne!(code, 200, "plaintext answered: {text}");
    }
    cluster.shutdown().await;
    Ok(())
}

/// A client pinned to one node (no failover to another endpoint), without TLS.
fn pinned(addr: &str, secret: &str) -> anyhow::Result<Client> {
    let options = ClientOptions {
        token: Some(Token(secret.into())),
        retry_total_ms_max: 1_000,
        ..ClientOptions::default()
    };
    Ok(Client::connect_with(
        vec![format!("http://{addr}")],
        options,
    )?)
}

/// Waits until every listed node answers `secret`'s Status call as `want` says (`Ok` or the
/// code of its refusal).
async fn until_every_node(
    addrs: &[String],
    secret: &str,
    want: Result<(), Code>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for addr in addrs {
        let client = pinned(addr, secret)?;
        loop {
            let got = client.status().await.map(|_| ()).map_err(|e| e.code());
            if got == want {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "node {addr}: {secret} still gets {got:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Tokens issued through the API: an admin issues one (only its digest reaches the cluster) and
/// every node admits it with its own scopes, no configuration change and no restart; a second
/// one with the same name or secret, one named like a configured token, or one issued by a
/// token without `admin`, is refused; an expiring one is refused once it expired; a node
/// restarted from a snapshot, and a node that joins after the log was compacted (so it gets the
/// tokens in a snapshot), admit it too; a revocation reaches every node and ends a Watch stream
/// opened with the token; issue, revocation and
/// the new node's admission are in the audit trail with who did them. A node without
/// configured tokens refuses to issue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_issued_through_the_api_work_on_every_node_until_revoked() -> anyhow::Result<()> {
    use exactly_tests::faults::FaultController;
    use exactly_tests::harness::FaultyCluster;
    const CI: &str = "exa_ci_token_issued_in_a_test";
    const TEMP: &str = "exa_temp_token_issued_in_a_test";
    let mut cluster = FaultyCluster::start(
        3,
        FaultController::new(1),
        exactly_handlers::Registry::with_builtins(),
        |c| {
            c.tokens = vec![token("root", ROOT, &["admin"])];
            c.raft.snapshot_after_entries = 40;
            c.raft.keep_entries_after_snapshot = 10;
        },
    )
    .await?;
    let addrs =
        |c: &FaultyCluster| -> Vec<String> { c.endpoints().into_iter().map(|(_, a)| a).collect() };
    let all = addrs(&cluster);
    let root = pinned(&all[0], ROOT)?;
    let scopes = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let info = root
        .issue_token(
            "ci",
            exactly_client::token::digest(CI),
            &scopes(&["submit:emails", "read"]),
            None,
        )
        .await?;
    assert_eq!(
        (
            info.name.as_str(),
            info.source.as_str(),
            info.issued_by.as_str()
        ),
        ("ci", "api", "root")
    );
    assert_eq!(info.scopes, scopes(&["submit:emails", "read"]));
    until_every_node(&all, CI, Ok(())).await?;
    let ci = pinned(&all[1], CI)?;
    let job = |queue: &str| exactly_client::JobSpec {
        queue: queue.into(),
        kind: "noop".into(),
        ..Default::default()
    };
    ci.submit_one(job("emails")).await?;
    assert_eq!(
        code_of(ci.submit_one(job("billing")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code_of(
            ci.issue_token(
                "mine",
                exactly_client::token::digest("x"),
                &scopes(&["admin"]),
                None
            )
            .await
        ),
        Code::PermissionDenied
    );
    for (name, secret) in [("ci", "exa_other"), ("other", CI), ("root", "exa_other2")] {
        let refused = root
            .issue_token(
                name,
                exactly_client::token::digest(secret),
                &scopes(&["read"]),
                None,
            )
            .await;
        assert_eq!(code_of(refused), Code::AlreadyExists, "{name}");
    }
    assert_eq!(
        code_of(root.revoke_token("root").await),
        Code::FailedPrecondition
    );
    assert_eq!(code_of(root.revoke_token("nobody").await), Code::NotFound);

    // An expiring token works until it expires, then every node refuses it.
    let now_ms = exactly_node::node::wall_ms();
    root.issue_token(
        "temp",
        exactly_client::token::digest(TEMP),
        &scopes(&["read"]),
        Some(now_ms + 2_000),
    )
    .await?;
    until_every_node(&all, TEMP, Ok(())).await?;
    tokio::time::sleep(Duration::from_millis(
        (now_ms + 2_100).saturating_sub(exactly_node::node::wall_ms()),
    ))
    .await;
    let expired = pinned(&all[2], TEMP)?.status().await.expect_err("expired");
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(expired.to_string().contains("expired"), "{expired}");

    let listed = root.list_tokens().await?;
    let names: Vec<(&str, &str)> = listed
        .iter()
        .map(|t| (t.name.as_str(), t.source.as_str()))
        .collect();
    assert_eq!(names, [("root", "config"), ("ci", "api"), ("temp", "api")]);

    // Node 3 restarts from a snapshot that holds the tokens.
    cluster.restart_from_snapshot(3).await?;
    until_every_node(&all[2..], CI, Ok(())).await?;

    // Node 4 joins once the log that issued the token is purged: it gets it in a snapshot.
    let leader = cluster.leader().expect("a leader");
    let node = cluster.node(leader).expect("the leader runs").clone();
    let issued_by = node
        .raft
        .metrics()
        .borrow_watched()
        .last_log_index
        .unwrap_or(0);
    wait_for(Duration::from_secs(60), || {
        node.raft
            .metrics()
            .borrow_watched()
            .purged
            .is_some_and(|p| p.index > issued_by)
    })
    .await?;
    drop(node);
    cluster.add(4, |_| {}).await?;
    let all = addrs(&cluster);
    until_every_node(&all, CI, Ok(())).await?;

    // A Watch stream opened with the token ends once the token is revoked.
    let mut watching = pinned(&all[1], CI)?
        .watch(exactly_client::WatchScope::All, None)
        .await?;
    root.revoke_token("ci").await?;
    until_every_node(&all, CI, Err(Code::Unauthenticated)).await?;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = watching.next().await {
                return e;
            }
        }
    })
    .await
    .expect("the revoked token's Watch stream ends within 10 s");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended}");

    let trail = root.audit(0, 1000).await?;
    let find = |action: &str| {
        trail
            .iter()
            .find(|r| r.action.starts_with(action))
            .map(|r| (r.by.as_str(), r.outcome.as_str()))
    };
    assert_eq!(
        find("issue token \"ci\" (submit:emails, read)"),
        Some(("root", "done"))
    );
    assert_eq!(find("revoke token \"ci\""), Some(("root", "done")));
    assert_eq!(
        find("revoke token \"nobody\""),
        Some((
            "root",
            "refused: no token named \"nobody\" was issued through the API"
        ))
    );
    assert_eq!(find("admit node 4 "), Some(("node-4", "done")), "{trail:?}");
    cluster.shutdown().await;

    // Without configured tokens, a node admits everyone and refuses to issue.
    let open = TestCluster::start(1, |_| {}).await?;
    let anyone = Client::connect(open.endpoints())?;
    let refused = anyone
        .issue_token(
            "x",
            exactly_client::token::digest("y"),
            &scopes(&["read"]),
            None,
        )
        .await;
    assert_eq!(code_of(refused), Code::FailedPrecondition);
    open.shutdown().await;
    Ok(())
}
