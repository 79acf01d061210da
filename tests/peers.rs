//! Untrusted peers: what a process that reaches a node's internal service may send, and what the
//! node does with it (in-process 3-node cluster over loopback gRPC, node-to-node traffic on its
//! own peer listener). Every probe is refused before anything changes: the node keeps its data,
//! its term and its jobs; and the public port does not serve the node-to-node service.

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use exactly_core::{Command, Expiry, NodeLease, Retention};
use exactly_proto::internal::{Blob, SnapshotChunk};
use exactly_store::raft_types::{log_id, SnapshotMeta, StoredMembership, Vote};
use exactly_store::TypeConfig;
use exactly_tests::{ledger_job, wait_for, TestCluster};
use futures::StreamExt;
use tonic::Code;

/// Submits one ledger job through node 0 and waits until every node sees it succeeded.
async fn one_job_done(cluster: &TestCluster) -> anyhow::Result<u64> {
    let mut client = cluster.jobs_client(0).await?;
    let reply = client
        .submit(exactly_proto::v1::SubmitRequest {
            jobs: vec![ledger_job(b"x")],
        })
        .await?
        .into_inner();
    let id = reply.job_ids[0];
    cluster.wait_succeeded(id, Duration::from_secs(20)).await?;
    Ok(id)
}

/// One InstallSnapshot stream with a higher vote and a last log id far ahead (index 10^9), and
/// a body that is not a snapshot: before this was checked, openraft purged the log up to the
/// forged id, then the state machine failed to decode the body, the Raft core stopped, and the
/// data directory could never start again (issue 12). Now it is refused with INVALID_ARGUMENT
/// before openraft sees it: the node's term, log and jobs are untouched and it keeps working. A
/// snapshot under a stale vote is answered from its first chunk, without reading the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_snapshot_is_refused_and_the_node_keeps_its_data() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, |_| {}).await?;
    let before = one_job_done(&cluster).await?;
    let leader = cluster.nodes[0].node.leader().map(|(l, _)| l).unwrap_or(1);
    let target = cluster
        .nodes
        .iter()
        .find(|n| n.node.id != leader)
        .expect("a follower");
    let metrics = target.node.raft.metrics().borrow_watched().clone();
    let term = metrics.current_term;
    let mut peer =
        exactly_node::network::internal_client(exactly_node::network::channel(&target.peer_addr)?);
    for body in [b"garbage".to_vec(), Vec::new(), vec![1u8; 100_000]] {
        let meta: SnapshotMeta = SnapshotMeta {
            last_log_id: Some(log_id(term + 5, leader, 1_000_000_000)),
            last_membership: StoredMembership::default(),
        };
        let header = exactly_node::codec::encode(&(Vote::new_committed(term + 5, leader), meta));
        let chunk = SnapshotChunk {
            header,
            data: body.clone(),
            target: target.node.id,
        };
        let refused = peer
            .install_snapshot(futures::stream::iter(vec![chunk]))
            .await
            .expect_err("a corrupt snapshot must be refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    // A snapshot under a vote older than the node's is answered with the node's vote as soon as
    // its first chunk arrives: the rest of the stream (here one that never ends) is not read.
    let stale = SnapshotChunk {
        header: exactly_node::codec::encode(&(
            Vote::new_committed(term.saturating_sub(1), leader),
            SnapshotMeta::default(),
        )),
        data: vec![7; 1000],
        target: target.node.id,
    };
    let endless = futures::stream::iter(vec![stale]).chain(futures::stream::pending());
    let answer = tokio::time::timeout(Duration::from_secs(5), peer.install_snapshot(endless))
        .await
        .expect("answered before the stream ended")?;
    let decoded: Result<
        openraft::raft::SnapshotResponse<TypeConfig>,
        openraft::error::Fatal<TypeConfig>,
    > = exactly_node::codec::decode(&answer.into_inner().data)?;
    let mine = target.node.raft.metrics().borrow_watched().vote;
    assert_eq!(decoded.expect("not fatal").vote, mine);

    let after = target.node.raft.metrics().borrow_watched().clone();
    assert_eq!(after.current_term, term, "the forged vote reached Raft");
    assert!(
        after.last_log_index >= metrics.last_log_index,
        "the log was purged: {:?} -> {:?}",
        metrics.last_log_index,
        after.last_log_index
    );
    assert!(after.running_state.is_ok(), "{:?}", after.running_state);
    assert!(target.node.read_view(|t| t.job(before).is_some()));
    // And it keeps working: a new job commits and applies on every node, the target included.
    one_job_done(&cluster).await?;
    cluster.shutdown().await;
    Ok(())
}

/// What only a leader decides (expiring a lease, retention, assignments, batches) is refused
/// from a peer with PERMISSION_DENIED, on the leader and on followers alike, and nothing is
/// committed: the lease stays valid and the finished job stays. A client write whose payload
/// is over the leader's limit is refused with RESOURCE_EXHAUSTED. Before, a forged `Expire` ran
/// one job on two nodes at once and a forged `Retain` deleted every finished job (issue 12).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_cannot_forward_what_only_the_leader_decides() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, |_| {}).await?;
    let done = one_job_done(&cluster).await?;
    let (victim, incarnation, renewed_index) = cluster.nodes[0].node.read(|t| {
        let (id, entry) = t.nodes().iter().next().expect("a registered node");
        (*id, entry.incarnation, entry.renewed_index)
    });
    let forged = [
        Command::Expire(Expiry {
            lease: NodeLease {
                node: victim,
                incarnation,
            },
            renewed_index,
        }),
        Command::Retain(Retention {
            finished_before_ms: u64::MAX,
            dead_before_ms: u64::MAX,
            keys_before_ms: u64::MAX,
            max: 1000,
        }),
        Command::Assign(Vec::new()),
        Command::NodeLeft(victim),
        Command::Batch(vec![Command::Retain(Retention::default())]),
    ];
    for node in &cluster.nodes {
        let mut peer = exactly_node::network::internal_client(exactly_node::network::channel(
            &node.peer_addr,
        )?);
        for command in &forged {
            let refused = peer
                .forward(Blob {
                    data: exactly_node::codec::encode(command),
                    target: 0,
                })
                .await
                .expect_err("a leader-only command must be refused");
            assert_eq!(
                refused.code(),
                Code::PermissionDenied,
                "{command:?}: {refused:?}"
            );
        }
        let oversized = Command::Submit(vec![exactly_core::NewJob {
            kind: exactly_tests::LEDGER_KIND.into(),
            payload: vec![0; node.node.config.limits.payload_bytes_max + 1],
            ..Default::default()
        }]);
        let refused = peer
            .forward(Blob {
                data: exactly_node::codec::encode(&oversized),
                target: 0,
            })
            .await
            .expect_err("an oversized payload must be refused");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    for node in &cluster.nodes {
        let (expired, kept) = node.node.read_view(|t| {
            (
                t.nodes().get(&victim).is_none_or(|e| e.expired),
                t.job(done).is_some(),
            )
        });
        assert!(
            !expired,
            "node {victim}'s lease was expired by a forged command"
        );
        assert!(kept, "job {done} was deleted by a forged command");
    }
    // A join or a registration with an address no node has (a forged 1 MiB one used to cost
    // every replica memory) is refused, and no such address is kept.
    let huge = "a".repeat(1 << 20);
    let leader = cluster
        .nodes
        .iter()
        .find(|n| n.node.is_leader())
        .unwrap_or(&cluster.nodes[0]);
    let mut peer =
        exactly_node::network::internal_client(exactly_node::network::channel(&leader.peer_addr)?);
    let refused = peer
        .join(exactly_proto::internal::JoinRequest {
            node_id: 9,
            addr: huge.clone(),
            by: String::new(),
        })
        .await
        .expect_err("a 1 MiB join address must be refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let forged = Command::RegisterNode(exactly_core::NodeRegistration {
        node: 9,
        incarnation: 1,
        slots: 1,
        addr: huge,
        applied: u64::MAX,
    });
    let reply = peer
        .forward(Blob {
            data: exactly_node::codec::encode(&forged),
            target: 0,
        })
        .await?;
    let reply: exactly_node::node::ForwardReply =
        exactly_node::codec::decode(&reply.into_inner().data)?;
    assert!(
        matches!(
            reply,
            exactly_node::node::ForwardReply::Committed(
                exactly_core::Response::NodeRegistered(Err(exactly_core::Rejection::Invalid(_))),
                _
            )
        ),
        "{reply:?}"
    );
    for node in &cluster.nodes {
        assert!(node
            .node
            .read(|t| t.nodes().values().all(|n| n.addr.len() < 256)));
    }
    // With a peer listener, the public port does not serve the node-to-node service at all.
    for node in &cluster.nodes {
        let mut public =
            exactly_node::network::internal_client(exactly_node::network::channel(&node.addr)?);
        let refused = public
            .forward(Blob {
                data: exactly_node::codec::encode(&Command::Cancel(vec![done])),
                target: 0,
            })
            .await
            .expect_err("the public port must not serve Forward");
        assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    }
    // And the cluster still runs jobs.
    one_job_done(&cluster).await?;
    cluster.shutdown().await;
    Ok(())
}

/// Certificates for a TLS test cluster: a CA and nodes 1..=9 in `dir`, and a second CA with a
/// node 2 certificate of its own in `dir/other`.
fn issue_certs(dir: &std::path::Path) -> anyhow::Result<()> {
    use exactly_client::certs::{issue_node, new_ca};
    let write = |dir: &std::path::Path, name: &str, pair: &exactly_client::certs::CertifiedKey| {
        std::fs::write(dir.join(format!("{name}.pem")), &pair.cert)?;
        std::fs::write(dir.join(format!("{name}.key")), &pair.key)
    };
    let ca = new_ca(1)?;
    write(dir, "ca", &ca)?;
    for id in 1..=9 {
        write(dir, &format!("node-{id}"), &issue_node(&ca, id, 1)?)?;
    }
    let other = dir.join("other");
    std::fs::create_dir_all(&other)?;
    let foreign = new_ca(1)?;
    write(&other, "node-2", &issue_node(&foreign, 2, 1)?)?;
    Ok(())
}

fn tls_files(dir: &std::path::Path, ca: &str, node: &str) -> exactly_node::config::PeerTlsConfig {
    exactly_node::config::PeerTlsConfig {
        ca: dir.join(ca),
        cert: dir.join(format!("{node}.pem")),
        key: dir.join(format!("{node}.key")),
        crl: None,
    }
}

/// A client of `addr`'s peer service presenting `node`'s certificate (trusting `dir/ca.pem`).
fn tls_peer(
    dir: &std::path::Path,
    node: &str,
    id: u64,
    addr: &str,
    target: u64,
) -> anyhow::Result<
    exactly_proto::internal::internal_client::InternalClient<tonic::transport::Channel>,
> {
    let tls = exactly_node::tls::PeerTls::load(&tls_files(dir, "ca.pem", node), id)
        .map_err(anyhow::Error::msg)?;
    Ok(exactly_node::network::internal_client(
        exactly_node::network::peer_channel(addr, Some(&tls), Some(target))?,
    ))
}

fn vote_request(term: u64, candidate: u64, target: u64) -> Blob {
    let request = openraft::raft::VoteRequest::<TypeConfig>::new(Vote::new(term, candidate), None);
    Blob {
        data: exactly_node::codec::encode(&request),
        target,
    }
}

/// A 3-node cluster whose peer ports run mutual TLS with certificates from `issue_certs` (in the
/// returned directory, which must outlive the cluster).
async fn start_with_peer_tls() -> anyhow::Result<(tempfile::TempDir, TestCluster)> {
    let certs = tempfile::tempdir()?;
    issue_certs(certs.path())?;
    let dir = certs.path().to_path_buf();
    let cluster = TestCluster::start(3, |c| {
        let id = c.node_id.expect("test configs name their node");
        c.peer_tls = Some(tls_files(&dir, "ca.pem", &format!("node-{id}")));
    })
    .await?;
    Ok((certs, cluster))
}

/// Mutual TLS on the peer port (`[peer-tls]`): a cluster whose nodes hold certificates from
/// one CA runs jobs, and refuses every probe from outside before anything changes: a plaintext
/// connection, a certificate from another CA, a certificate of a node that is not a member
/// (its vote, its join as another id, its forwarded writes), and a member's certificate used to
/// speak as another member (a vote, an AppendEntries, a renewal in another node's name, the
/// outcome of an attempt that ran elsewhere). The
/// term and the leader stay as they were, and the cluster still runs jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_tls_admits_only_the_members_it_names() -> anyhow::Result<()> {
    let (certs, cluster) = start_with_peer_tls().await?;
    let dir = certs.path().to_path_buf();
    let done = one_job_done(&cluster).await?;
    let metrics = cluster.nodes[0]
        .node
        .raft
        .metrics()
        .borrow_watched()
        .clone();
    let (term, leader) = (metrics.current_term, metrics.current_leader);
    let target = &cluster.nodes[1];
    let (addr, to) = (target.peer_addr.as_str(), target.node.id);

    // Plaintext, and a certificate from another CA: no request gets through the handshake.
    let mut plain = exactly_node::network::internal_client(exactly_node::network::channel(addr)?);
    let refused = plain
        .vote(vote_request(term + 5, 1, to))
        .await
        .expect_err("a plaintext connection must be refused");
    assert_ne!(refused.code(), Code::Ok);
    let foreign = exactly_node::tls::PeerTls::load(
        &exactly_node::config::PeerTlsConfig {
            ca: dir.join("ca.pem"),
            cert: dir.join("other/node-2.pem"),
            key: dir.join("other/node-2.key"),
            crl: None,
        },
        2,
    )
    .map_err(anyhow::Error::msg)?;
    let mut foreign = exactly_node::network::internal_client(exactly_node::network::peer_channel(
        addr,
        Some(&foreign),
        Some(to),
    )?);
    let refused = foreign
        .vote(vote_request(term + 5, 2, to))
        .await
        .expect_err("a certificate from another CA must be refused");
    assert_ne!(refused.code(), Code::Ok);

    // Node 9 holds a certificate from the cluster's CA but is not a member.
    let mut stranger = tls_peer(&dir, "node-9", 9, addr, to)?;
    let denied = |result: Result<tonic::Response<Blob>, tonic::Status>, what: &str| {
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    };
    denied(
        stranger.vote(vote_request(term + 5, 9, to)).await,
        "a vote from a non-member",
    );
    denied(
        stranger.vote(vote_request(term + 5, 2, to)).await,
        "a vote in another node's name",
    );
    let renewal = Command::Renew(exactly_core::Renewal {
        lease: NodeLease {
            node: 1,
            incarnation: 1,
        },
        applied: u64::MAX,
    });
    for (command, what) in [
        (renewal.clone(), "a renewal in node 1's name"),
        (Command::Cancel(vec![1]), "a write from a non-member"),
    ] {
        let forwarded = Blob {
            data: exactly_node::codec::encode(&command),
            target: 0,
        };
        denied(stranger.forward(forwarded).await, what);
    }
    // Leader traffic from a non-member: an AppendEntries as leader of a higher term (the
    // members asked do not vouch for node 9), asked again once the refusal is no longer
    // remembered, and its membership question.
    let as_leader = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term + 5, 9),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    for _ in 0..2 {
        denied(
            stranger
                .append_entries(Blob {
                    data: exactly_node::codec::encode(&as_leader),
                    target: to,
                })
                .await,
            "an AppendEntries from a non-member",
        );
        tokio::time::sleep(exactly_node::internal::UNVOUCHED_FOR).await;
    }
    // The pipelined path makes the same checks: its answers end with the refusal.
    denied(
        first_answer(
            &mut stranger,
            Blob {
                data: exactly_node::codec::encode(&as_leader),
                target: to,
            },
        )
        .await,
        "a pipelined AppendEntries from a non-member",
    );
    denied(
        stranger
            .members(Blob {
                data: Vec::new(),
                target: to,
            })
            .await,
        "a membership question from a non-member",
    );
    let header = exactly_node::codec::encode(&(
        Vote::new_committed(term + 5, 9),
        SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
        },
    ));
    let chunk = SnapshotChunk {
        header,
        data: Vec::new(),
        target: to,
    };
    let status = stranger
        .install_snapshot(futures::stream::iter([chunk]))
        .await
        .expect_err("a snapshot from a non-member");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // A member asks a member: the answer is its membership.
    let mut member_asks = tls_peer(&dir, "node-3", 3, addr, to)?;
    let reply = member_asks
        .members(Blob {
            data: Vec::new(),
            target: to,
        })
        .await?
        .into_inner();
    let ids: Vec<u64> = exactly_node::codec::decode(&reply.data)?;
    assert_eq!(ids, vec![1, 2, 3]);
    let status = stranger
        .join(exactly_proto::internal::JoinRequest {
            node_id: 4,
            addr: "127.0.0.1:1".into(),
            by: String::new(),
        })
        .await
        .expect_err("a join as another id");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Node 3 is a member, but may speak only as itself.
    let mut member = tls_peer(&dir, "node-3", 3, addr, to)?;
    denied(
        member.vote(vote_request(term + 5, 1, to)).await,
        "a member's vote in another member's name",
    );
    let append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term + 5, 1),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    denied(
        member
            .append_entries(Blob {
                data: exactly_node::codec::encode(&append),
                target: to,
            })
            .await,
        "an AppendEntries in the leader's name",
    );
    denied(
        first_answer(
            &mut member,
            Blob {
                data: exactly_node::codec::encode(&append),
                target: to,
            },
        )
        .await,
        "a pipelined AppendEntries in the leader's name",
    );
    let forwarded = Blob {
        data: exactly_node::codec::encode(&renewal),
        target: 0,
    };
    denied(
        member.forward(forwarded).await,
        "a member's renewal in another's name",
    );
    // Nor report the outcome of an attempt that ran on another node.
    let (token, ran_on) = cluster.nodes[0].node.read_view(|t| {
        let job = t.job(done).expect("the job");
        (job.attempts[0].token, job.attempts[0].node)
    });
    let other = (1..=3).find(|&n| n != ran_on).expect("another member");
    let mut other = tls_peer(&dir, &format!("node-{other}"), other, addr, to)?;
    let outcome = Command::Complete(vec![exactly_core::Completion {
        job: done,
        token,
        outcome: exactly_core::Outcome::Failed {
            error: "forged".into(),
            retryable: false,
        },
    }]);
    denied(
        other
            .forward(Blob {
                data: exactly_node::codec::encode(&outcome),
                target: 0,
            })
            .await,
        "an outcome of another node's attempt",
    );

    for node in &cluster.nodes {
        let now = node.node.raft.metrics().borrow_watched().clone();
        assert_eq!(
            now.current_term, term,
            "node {}: a probe moved the term",
            node.node.id
        );
        assert_eq!(now.current_leader, leader, "node {}", node.node.id);
    }
    one_job_done(&cluster).await?;
    cluster.shutdown().await;
    Ok(())
}

/// The certificate node `target`'s peer port presents to a new connection (made with node 1's).
async fn presented(dir: &std::path::Path, addr: &str, target: u64) -> anyhow::Result<Vec<u8>> {
    use tower::Service;
    let tls = exactly_node::tls::PeerTls::load(&tls_files(dir, "ca.pem", "node-1"), 1)
        .map_err(anyhow::Error::msg)?;
    let uri: http::Uri = format!("http://{addr}").parse()?;
    let io = tls.connector(Some(target)).call(uri).await?;
    let certs = io
        .inner()
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default();
    Ok(certs.first().map(|c| c.to_vec()).unwrap_or_default())
}

/// Certificate rotation without a restart: a member's certificate and key are replaced on disk
/// (a new key, the same CA); within a few seconds its peer port presents the new certificate
/// to new connections, and the cluster keeps running jobs. Files that would not do (another
/// node's certificate) are refused: the node keeps presenting the last good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_peer_certificate_is_used_without_a_restart() -> anyhow::Result<()> {
    use exactly_client::certs::{issue_node, CertifiedKey};
    let (certs, cluster) = start_with_peer_tls().await?;
    let dir = certs.path().to_path_buf();
    one_job_done(&cluster).await?;
    let target = &cluster.nodes[1];
    let id = target.node.id;
    let old = presented(&dir, &target.peer_addr, id).await?;
    assert!(!old.is_empty());

    let ca = CertifiedKey {
        cert: std::fs::read_to_string(dir.join("ca.pem"))?,
        key: std::fs::read_to_string(dir.join("ca.key"))?,
    };
    let replace = |pair: &CertifiedKey, bump: u64| -> anyhow::Result<()> {
        let (cert, key) = (
            dir.join(format!("node-{id}.pem")),
            dir.join(format!("node-{id}.key")),
        );
        std::fs::write(&key, &pair.key)?;
        std::fs::write(&cert, &pair.cert)?;
        let at = std::time::SystemTime::now() + Duration::from_secs(bump);
        std::fs::File::options()
            .write(true)
            .open(&cert)?
            .set_modified(at)?;
        Ok(())
    };
    let fresh = issue_node(&ca, id, 1)?;
    replace(&fresh, 10)?;
    let fresh_der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(fresh.cert.as_bytes())?.to_vec()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = presented(&dir, &target.peer_addr, id).await?;
        if now == fresh_der {
            break;
        }
        assert_eq!(now, old, "neither the old nor the new certificate");
        assert!(
            std::time::Instant::now() < deadline,
            "not reloaded within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    one_job_done(&cluster).await?;

    // Another node's certificate in its place is refused; the last good one stays in use.
    replace(&issue_node(&ca, 9, 1)?, 20)?;
    tokio::time::sleep(exactly_node::tls::RELOAD_CHECK + Duration::from_secs(1)).await;
    assert_eq!(presented(&dir, &target.peer_addr, id).await?, fresh_der);
    one_job_done(&cluster).await?;
    cluster.shutdown().await;
    Ok(())
}

/// The first answer of a pipelined `AppendStream` that sends `request` alone.
async fn first_answer(
    client: &mut exactly_proto::internal::internal_client::InternalClient<
        tonic::transport::Channel,
    >,
    request: Blob,
) -> Result<tonic::Response<Blob>, tonic::Status> {
    let mut answers = client
        .append_stream(futures::stream::iter([request]))
        .await?
        .into_inner();
    match answers.message().await? {
        Some(answer) => Ok(tonic::Response::new(answer)),
        None => Err(tonic::Status::internal(
            "the stream ended without an answer",
        )),
    }
}

/// `[peer-tls] crl`: revoking a follower's node certificate (`exactly cert crl --revoke`) cuts
/// it off once the nodes read the new list: its messages are refused on the connection it
/// already has (a pipelined stream opened before at its next request), a new connection with
/// its certificate fails the handshake, the leader's next messages to it go over a new
/// connection its certificate fails (its pipelined stream ends when the list is reloaded), so
/// it gets no more of the log; its elections cannot depose the leader, and the other two keep
/// running jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_node_certificate_is_cut_off() -> anyhow::Result<()> {
    use exactly_client::certs::{revocation_list, CertifiedKey};
    let certs = tempfile::tempdir()?;
    issue_certs(certs.path())?;
    let dir = certs.path().to_path_buf();
    let ca = CertifiedKey {
        cert: std::fs::read_to_string(dir.join("ca.pem"))?,
        key: std::fs::read_to_string(dir.join("ca.key"))?,
    };
    let (empty, _) = revocation_list(&ca, None, &[], 1)?;
    std::fs::write(dir.join("crl.pem"), &empty)?;
    let cluster = TestCluster::start(3, |c| {
        let id = c.node_id.expect("test configs name their node");
        c.peer_tls = Some(exactly_node::config::PeerTlsConfig {
            crl: Some(dir.join("crl.pem")),
            ..tls_files(&dir, "ca.pem", &format!("node-{id}"))
        });
    })
    .await?;
    one_job_done(&cluster).await?;
    let metrics = cluster.nodes[0]
        .node
        .raft
        .metrics()
        .borrow_watched()
        .clone();
    let (term, leader) = (
        metrics.current_term,
        metrics.current_leader.expect("a leader"),
    );
    let leader_node = cluster
        .nodes
        .iter()
        .find(|n| n.node.id == leader)
        .expect("the leader is a test node");
    let revoked = cluster
        .nodes
        .iter()
        .find(|n| n.node.id != leader)
        .expect("a follower");
    let id = revoked.node.id;
    // A connection with the follower's certificate, open before the revocation.
    let mut open = tls_peer(
        &dir,
        &format!("node-{id}"),
        id,
        &leader_node.peer_addr,
        leader,
    )?;
    open.vote(vote_request(term, id, leader)).await?;
    // And a pipelined AppendEntries stream, open before the revocation, that sends nothing yet.
    let (mut requests, pending) = futures::channel::mpsc::channel(1);
    let mut streamed = open.append_stream(pending).await?.into_inner();

    let (listed, _) = revocation_list(
        &ca,
        Some(&empty),
        &[std::fs::read_to_string(dir.join(format!("node-{id}.pem")))?],
        1,
    )?;
    std::fs::write(dir.join("crl.pem"), &listed)?;
    std::fs::File::options()
        .write(true)
        .open(dir.join("crl.pem"))?
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))?;
    let deadline = std::time::Instant::now() + exactly_node::tls::RELOAD_CHECK * 3;
    loop {
        match open.vote(vote_request(term, id, leader)).await {
            Err(status) if status.code() == Code::Unauthenticated => {
                assert!(status.message().contains("revoked"), "{status:?}");
                break;
            }
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "still heard on its open connection: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The open stream's next request is refused, whatever it says.
    let as_leader = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term + 5, id),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    futures::SinkExt::send(
        &mut requests,
        Blob {
            data: exactly_node::codec::encode(&as_leader),
            target: leader,
        },
    )
    .await?;
    let status = streamed
        .message()
        .await
        .expect_err("a request on a revoked certificate's open stream");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    let mut fresh = tls_peer(
        &dir,
        &format!("node-{id}"),
        id,
        &leader_node.peer_addr,
        leader,
    )?;
    let refused = fresh
        .vote(vote_request(term, id, leader))
        .await
        .expect_err("a revoked certificate's handshake");
    assert_ne!(refused.code(), Code::Ok);
    // Every node has read the list by now (they check as often); the cut-off node's applied
    // index stops where it is while the other two run jobs.
    tokio::time::sleep(exactly_node::tls::RELOAD_CHECK).await;
    let applied = |n: &exactly_node::Node| {
        n.raft
            .metrics()
            .borrow_watched()
            .last_applied
            .map_or(0, |l| l.index)
    };
    let before = applied(&revoked.node);
    let index = cluster
        .nodes
        .iter()
        .position(|n| n.node.id == leader)
        .expect("the leader's index");
    let mut client = cluster.jobs_client(index).await?;
    for _ in 0..3 {
        let reply = client
            .submit(exactly_proto::v1::SubmitRequest {
                jobs: vec![ledger_job(b"y")],
            })
            .await?
            .into_inner();
        let id = reply.job_ids[0];
        wait_for(Duration::from_secs(20), || {
            cluster
                .nodes
                .iter()
                .filter(|n| n.node.id != revoked.node.id)
                .all(|n| {
                    n.node.read_view(|t| {
                        t.job(id)
                            .is_some_and(|j| j.status == exactly_core::JobStatus::Succeeded)
                    })
                })
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        applied(&revoked.node),
        before,
        "node {id} still gets the log"
    );
    assert!(applied(&leader_node.node) > before + 3);
    let now = leader_node.node.raft.metrics().borrow_watched().clone();
    assert_eq!(now.current_leader, Some(leader), "the leader stayed");
    cluster.shutdown().await;
    Ok(())
}

/// Cuts chosen nodes off from every other node's Raft traffic, both ways.
#[derive(Default)]
struct Isolation(std::sync::Mutex<std::collections::BTreeSet<u64>>);

impl exactly_node::faults::Faults for Isolation {
    fn fate(&self, from: u64, to: u64) -> exactly_node::faults::Fate {
        let cut = self.0.lock().unwrap();
        if cut.contains(&from) || cut.contains(&to) {
            exactly_node::faults::Fate::Drop
        } else {
            exactly_node::faults::Fate::Deliver
        }
    }
}

/// A follower that missed a membership change takes the new leader it does not know once a
/// voter it knows vouches for it: under peer TLS, node 3 is cut off (and kept from campaigning)
/// while nodes 4 and 5 join as voters; then the leader (node 1) is cut off and only one of the
/// new nodes may campaign, so it is elected. Back, node 3 does not have the entries that
/// admitted them, asks nodes 1 and 2 (`Members`), follows the new leader and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_follower_takes_a_leader_that_members_vouch_for() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    issue_certs(certs.path())?;
    let dir = certs.path().to_path_buf();
    let data = tempfile::tempdir()?;
    let isolation = Arc::new(Isolation::default());
    let start = |id: u64, join: Option<String>| {
        let mut c = exactly_tests::test_config(data.path(), id);
        c.init = join.is_none();
        c.join = join.into_iter().collect();
        c.peer_listen = Some("127.0.0.1:0".parse().unwrap());
        c.peer_tls = Some(tls_files(&dir, "ca.pem", &format!("node-{id}")));
        c.voters_target = 5;
        let options = exactly_node::StartOptions {
            faults: Some(isolation.clone()),
            ..Default::default()
        };
        exactly_node::start_with(c, exactly_handlers::Registry::with_builtins(), options)
    };
    let metrics = |n: &exactly_node::RunningNode| n.node.raft.metrics().borrow_watched().clone();
    // A node's configuration as its voter sets: one set once a change is done, two while it is
    // joint (a joint configuration's voters are the union of both, so comparing voter ids alone
    // takes a half-done change for a done one).
    let config = |n: &exactly_node::RunningNode| -> Vec<Vec<u64>> {
        metrics(n)
            .membership_config
            .membership()
            .get_joint_config()
            .iter()
            .map(|set| set.iter().copied().collect())
            .collect()
    };
    let applied = |n: &exactly_node::RunningNode| metrics(n).last_applied.map_or(0, |l| l.index);
    // The node has applied (so committed) the configuration it holds.
    let settled = |n: &exactly_node::RunningNode| {
        let m = metrics(n);
        let at = m.membership_config.log_id().as_ref().map_or(0, |l| l.index);
        m.last_applied.is_some_and(|l| l.index >= at)
    };
    let three_voters = vec![vec![1, 2, 3]];
    let five_voters = vec![vec![1, 2, 3, 4, 5]];
    let one = start(1, None).await?;
    let seed = one.peer_addr.clone();
    let two = start(2, Some(seed.clone())).await?;
    let three = start(3, Some(seed.clone())).await?;
    wait_for(Duration::from_secs(30), || {
        config(&three) == three_voters && settled(&three)
    })
    .await?;

    three.node.raft.runtime_config().elect(false);
    isolation.0.lock().unwrap().insert(3);
    let four = start(4, Some(seed.clone())).await?;
    let five = start(5, Some(seed)).await?;
    wait_for(Duration::from_secs(30), || {
        config(&one) == five_voters && settled(&one)
    })
    .await
    .map_err(|e| anyhow::anyhow!("nodes 4 and 5 not voters: {e}: {:?}", config(&one)))?;
    assert_eq!(
        config(&three),
        three_voters,
        "node 3 missed their admission"
    );
    // Every node but 3 has the final configuration committed and applied, and (at that moment)
    // the leader's whole log: a node can only be elected by voters whose logs are not ahead of
    // its own, and the leader writes on its own (lease renewals), so the cut comes in a quiet
    // moment.
    wait_for(Duration::from_secs(15), || {
        let last = metrics(&one).last_log_index;
        [&two, &four, &five]
            .iter()
            .all(|n| config(n) == five_voters && settled(n) && metrics(n).last_log_index == last)
    })
    .await
    .map_err(|e| anyhow::anyhow!("the others did not apply the new configuration: {e}"))?;

    // Only one new node campaigns (two candidates splitting the votes could take many terms):
    // whichever of 4 and 5 has the longer log, in case an entry reached one of them as the
    // leader was cut off.
    two.node.raft.runtime_config().elect(false);
    four.node.raft.runtime_config().elect(false);
    five.node.raft.runtime_config().elect(false);
    isolation.0.lock().unwrap().insert(1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Every entry is node 1's (term 1), so the longer log is the more up-to-date one.
    let last_log = |n: &exactly_node::RunningNode| metrics(n).last_log_index;
    let (candidate, campaigner) = if last_log(&five) > last_log(&four) {
        (5, &five)
    } else {
        (4, &four)
    };
    assert!(
        last_log(campaigner) >= last_log(&two),
        "node 2 holds an entry neither new node has: {:?} {:?} {:?}",
        last_log(&two),
        last_log(&four),
        last_log(&five)
    );
    campaigner.node.raft.runtime_config().elect(true);
    wait_for(Duration::from_secs(30), || {
        [&two, &four, &five]
            .iter()
            .all(|n| metrics(n).current_leader == Some(candidate))
    })
    .await
    .map_err(|e| {
        let m = |n: &exactly_node::RunningNode| {
            let m = metrics(n);
            (m.current_term, m.current_leader, m.state, m.last_log_index)
        };
        anyhow::anyhow!(
            "node {candidate} not elected: {e}: 2 {:?} 4 {:?} 5 {:?}",
            m(&two),
            m(&four),
            m(&five)
        )
    })?;

    isolation.0.lock().unwrap().remove(&3);
    wait_for(Duration::from_secs(10), || {
        metrics(&three).current_leader == Some(candidate) && config(&three) == five_voters
    })
    .await
    .map_err(|e| anyhow::anyhow!("node 3 did not take {candidate} as its leader: {e}"))?;
    let target = applied(&two);
    wait_for(Duration::from_secs(10), || applied(&three) >= target)
        .await
        .map_err(|e| anyhow::anyhow!("node 3 did not catch up: {e}"))?;
    for n in [five, four, three, two, one] {
        n.shutdown().await;
    }
    Ok(())
}
