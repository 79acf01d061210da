//! Untrusted peers: what a process that reaches a node's internal service may send, and what the
//! node does with it (in-process 3-node cluster over loopback gRPC, node-to-node traffic on its
//! own peer listener). Every probe is refused before anything changes: the node keeps its data,
//! its term and its jobs; and the public port does not serve the node-to-node service.

use std::time::Duration;

use exactly_core::{Command, Expiry, NodeLease, Retention};
use exactly_proto::internal::{Blob, SnapshotChunk};
use exactly_tests::{ledger_job, TestCluster};
use openraft::{CommittedLeaderId, LogId, SnapshotMeta, StoredMembership, Vote};
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
/// before openraft sees it: the node's term, log and jobs are untouched and it keeps working.
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
    let metrics = target.node.raft.metrics().borrow().clone();
    let term = metrics.current_term;
    let mut peer =
        exactly_node::network::internal_client(exactly_node::network::channel(&target.peer_addr)?);
    for body in [b"garbage".to_vec(), Vec::new(), vec![1u8; 100_000]] {
        let meta: SnapshotMeta<u64, openraft::BasicNode> = SnapshotMeta {
            last_log_id: Some(LogId::new(
                CommittedLeaderId::new(term + 5, leader),
                1_000_000_000,
            )),
            last_membership: StoredMembership::default(),
            snapshot_id: "forged".into(),
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
    let after = target.node.raft.metrics().borrow().clone();
    assert_eq!(after.current_term, term, "the forged vote reached Raft");
    assert!(
        after.last_log_index >= metrics.last_log_index,
        "the log was purged: {:?} -> {:?}",
        metrics.last_log_index,
        after.last_log_index
    );
    assert!(after.running_state.is_ok(), "{:?}", after.running_state);
    assert!(target.node.read(|t| t.job(before).is_some()));
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
        let (expired, kept) = node.node.read(|t| {
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
