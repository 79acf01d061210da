//! The binary encoding of node-to-node messages (openraft and exactly-core types inside the
//! internal gRPC service's opaque blobs). One version byte leads every blob so that a node can
//! refuse a message from an incompatible build instead of misreading it.

use serde::de::DeserializeOwned;
use serde::Serialize;

const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty message")]
    Empty,
    #[error("message version {0} is not supported (this node speaks {VERSION})")]
    Version(u8),
    #[error("cannot decode message: {0}")]
    Decode(#[from] postcard::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Serializing our own in-memory values into a Vec cannot fail for the types we send.
    postcard::to_io(value, &mut out).expect("postcard encoding into a Vec");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&VERSION, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((&v, _)) => Err(CodecError::Version(v)),
    }
}

/// Why a node refused a node-to-node call, carried typed in the refusing status's details (its
/// message is for people, and no node reads it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Refusal {
    /// The sender (as candidate or leader) was removed from the cluster for good.
    Removed { node: u64 },
    /// This node does not lead; the leader's peer address, if this node knows it.
    NotLeader { leader: Option<String> },
}

impl Refusal {
    /// A status with this refusal in its details.
    pub fn status(&self, code: tonic::Code, message: impl Into<String>) -> tonic::Status {
        tonic::Status::with_details(code, message, encode(self).into())
    }

    /// The refusal a status carries, if any (details that do not decode as one are none: a
    /// peer's bytes are never trusted).
    pub fn of(status: &tonic::Status) -> Option<Self> {
        decode(status.details()).ok()
    }
}

impl From<CodecError> for tonic::Status {
    fn from(e: CodecError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::Refusal;
    use tonic::Code;

    /// A refusal travels in the details, whatever the message says; a status without one, or
    /// with details that are not one, carries none.
    #[test]
    fn refusals_travel_typed_in_status_details() {
        let cases = [
            Refusal::Removed { node: 3 },
            Refusal::NotLeader {
                leader: Some("10.0.0.2:7001".into()),
            },
            Refusal::NotLeader { leader: None },
        ];
        for refusal in cases {
            let status = refusal.status(Code::FailedPrecondition, "any words");
            assert_eq!(Refusal::of(&status), Some(refusal));
        }
        let plain = tonic::Status::failed_precondition("removed from the cluster: node 3");
        assert_eq!(Refusal::of(&plain), None);
        let junk = tonic::Status::with_details(Code::FailedPrecondition, "x", vec![1, 9, 9].into());
        assert_eq!(Refusal::of(&junk), None);
    }
}

/// Golden file of every node-to-node message as this release encodes it (kept under
/// `tests/fixtures/`, read by every later build): a rolling upgrade mixes builds, and postcard is
/// not self-describing, so a change to any of these types must bump [`VERSION`].
/// `EXACTLY_WRITE_GOLDEN=1 cargo test -p exactly-node golden` writes it again.
#[cfg(test)]
mod golden {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use exactly_core::{Command, Completion, Outcome, Request, Response};
    use exactly_store::TypeConfig;
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
    use openraft::{
        BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
        StoredMembership, Vote,
    };

    use super::{decode, encode, Refusal};
    use crate::internal::{JoinReply, ReadIndexAsk};
    use crate::node::{ForwardReply, ProposeError};

    fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn membership() -> Membership<u64, BasicNode> {
        let nodes: BTreeMap<u64, BasicNode> = (1..=4)
            .map(|id| (id, BasicNode::new(format!("10.0.0.{id}:7001"))))
            .collect();
        Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes)
    }

    fn request() -> Request {
        Request {
            now_ms: 1_767_225_600_000,
            entropy: 42,
            command: Command::Complete(vec![Completion {
                job: 7,
                token: 11,
                outcome: Outcome::Failed {
                    error: "smtp 451".into(),
                    retryable: true,
                },
            }]),
        }
    }

    /// A message's name, its encoding, and a function that decodes and encodes it again.
    type Golden = (&'static str, Vec<u8>, fn(&[u8]) -> Vec<u8>);

    fn messages() -> Vec<Golden> {
        fn again<T: serde::Serialize + serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<u8> {
            encode(&decode::<T>(bytes).expect("the golden message decodes"))
        }
        let append = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(3, 10)),
            entries: vec![
                Entry {
                    log_id: log_id(3, 11),
                    payload: EntryPayload::Normal(request()),
                },
                Entry {
                    log_id: log_id(3, 12),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: log_id(3, 13),
                    payload: EntryPayload::Membership(membership()),
                },
            ],
            leader_commit: Some(log_id(3, 10)),
        };
        type Reply<T> = Result<T, openraft::error::RaftError<u64>>;
        let snapshot_header = (
            Vote::new_committed(3, 1),
            SnapshotMeta::<u64, BasicNode> {
                last_log_id: Some(log_id(3, 13)),
                last_membership: StoredMembership::new(Some(log_id(3, 13)), membership()),
                snapshot_id: "3-1-13-2".into(),
            },
        );
        vec![
            (
                "append entries",
                encode(&append),
                again::<AppendEntriesRequest<TypeConfig>>,
            ),
            (
                "append entries: success",
                encode(&Reply::Ok(AppendEntriesResponse::<u64>::Success)),
                again::<Reply<AppendEntriesResponse<u64>>>,
            ),
            (
                "append entries: higher vote",
                encode(&Reply::Ok(AppendEntriesResponse::<u64>::HigherVote(
                    Vote::new(4, 2),
                ))),
                again::<Reply<AppendEntriesResponse<u64>>>,
            ),
            (
                "vote",
                encode(&VoteRequest::new(Vote::new(4, 2), Some(log_id(3, 13)))),
                again::<VoteRequest<u64>>,
            ),
            (
                "vote reply",
                encode(&Reply::Ok(VoteResponse::new(
                    Vote::new(4, 2),
                    Some(log_id(3, 13)),
                    true,
                ))),
                again::<Reply<VoteResponse<u64>>>,
            ),
            (
                "snapshot header",
                encode(&snapshot_header),
                again::<(Vote<u64>, SnapshotMeta<u64, BasicNode>)>,
            ),
            (
                "read index",
                encode(&ReadIndexAsk { node: 2 }),
                again::<ReadIndexAsk>,
            ),
            ("forward", encode(&request().command), again::<Command>),
            (
                "forward: committed",
                encode(&ForwardReply::Committed(
                    Response::Completed {
                        accepted: 1,
                        rejected: vec![],
                    },
                    12,
                )),
                again::<ForwardReply>,
            ),
            (
                "forward: failed",
                encode(&ForwardReply::Failed(ProposeError::Timeout(
                    Duration::from_millis(5000),
                ))),
                again::<ForwardReply>,
            ),
            (
                "forward: not the leader",
                encode(&ForwardReply::NotLeader),
                again::<ForwardReply>,
            ),
            (
                "join",
                encode(&JoinReply::Joined { voter: true }),
                again::<JoinReply>,
            ),
            (
                "refusal",
                encode(&Refusal::NotLeader {
                    leader: Some("10.0.0.2:7001".into()),
                }),
                again::<Refusal>,
            ),
        ]
    }

    #[test]
    fn golden_node_to_node_messages_read_and_write_as_this_version() {
        let messages = messages();
        let encoded: Vec<Vec<u8>> = messages.iter().map(|(_, bytes, _)| bytes.clone()).collect();
        let bytes = postcard::to_allocvec(&encoded).unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/messages-version1.bin");
        if std::env::var_os("EXACTLY_WRITE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let golden = std::fs::read(&path).unwrap();
        let golden: Vec<Vec<u8>> = postcard::from_bytes(&golden).unwrap();
        assert_eq!(golden.len(), messages.len(), "one golden message per kind");
        for ((name, bytes, again), old) in messages.iter().zip(&golden) {
            assert_eq!(
                &again(old),
                old,
                "{name}: the golden message reads and writes the same"
            );
            assert_eq!(
                bytes,
                old,
                "{name}: encoded differently from version {}: bump it",
                super::VERSION
            );
        }
    }
}
