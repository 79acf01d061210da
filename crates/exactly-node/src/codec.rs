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

/// Decodes a vote request, also in the layout of the release before openraft 0.10, which had
/// no `leadership_transfer` (a rolling upgrade meets it): read as `false`, which is what that
/// release meant. This release writes the field last, where a reader of the earlier layout
/// (postcard ignores trailing bytes) does not see it.
pub fn decode_vote_request(
    bytes: &[u8],
) -> Result<openraft::raft::VoteRequest<exactly_store::TypeConfig>, CodecError> {
    /// `VoteRequest` as the earlier release encoded it.
    #[derive(serde::Deserialize)]
    struct Earlier {
        vote: exactly_store::raft_types::Vote,
        last_log_id: Option<exactly_store::raft_types::LogId>,
    }
    decode(bytes).or_else(|e| match e {
        CodecError::Decode(postcard::Error::DeserializeUnexpectedEnd) => {
            let Earlier { vote, last_log_id } = decode(bytes)?;
            Ok(openraft::raft::VoteRequest::new(vote, last_log_id))
        }
        e => Err(e),
    })
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
    use exactly_store::raft_types::{
        Entry, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote,
    };
    use exactly_store::TypeConfig;
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
    use openraft::BasicNode;

    use super::{decode, encode, Refusal};
    use crate::internal::{JoinReply, ReadIndexAsk};
    use crate::node::{ForwardReply, ProposeError};

    fn log_id(term: u64, index: u64) -> LogId {
        exactly_store::raft_types::log_id(term, 1, index)
    }

    fn membership() -> Membership {
        let nodes: BTreeMap<u64, BasicNode> = (1..=4)
            .map(|id| (id, BasicNode::new(format!("10.0.0.{id}:7001"))))
            .collect();
        Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes).expect("a valid membership")
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
    type Golden = (&'static str, Vec<u8>, fn(&[u8]) -> Result<Vec<u8>, String>);

    fn messages() -> Vec<Golden> {
        fn again<T: serde::Serialize + serde::de::DeserializeOwned>(
            bytes: &[u8],
        ) -> Result<Vec<u8>, String> {
            decode::<T>(bytes)
                .map(|m| encode(&m))
                .map_err(|e| e.to_string())
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
        type Reply<T> = Result<T, openraft::error::RaftError<TypeConfig>>;
        let snapshot_header = (
            Vote::new_committed(3, 1),
            SnapshotMeta {
                last_log_id: Some(log_id(3, 13)),
                last_membership: StoredMembership::new(Some(log_id(3, 13)), membership()),
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
                encode(&Reply::Ok(AppendEntriesResponse::<TypeConfig>::Success)),
                again::<Reply<AppendEntriesResponse<TypeConfig>>>,
            ),
            (
                "append entries: higher vote",
                encode(&Reply::Ok(AppendEntriesResponse::<TypeConfig>::HigherVote(
                    Vote::new(4, 2),
                ))),
                again::<Reply<AppendEntriesResponse<TypeConfig>>>,
            ),
            (
                "vote",
                encode(&VoteRequest::<exactly_store::TypeConfig>::new(
                    Vote::new(4, 2),
                    Some(log_id(3, 13)),
                )),
                |bytes| {
                    super::decode_vote_request(bytes)
                        .map(|m| encode(&m))
                        .map_err(|e| e.to_string())
                },
            ),
            (
                "vote reply",
                encode(&Reply::Ok(VoteResponse::<TypeConfig>::new(
                    Vote::new(4, 2),
                    Some(log_id(3, 13)),
                    true,
                ))),
                again::<Reply<VoteResponse<TypeConfig>>>,
            ),
            (
                "snapshot header",
                encode(&snapshot_header),
                again::<(Vote, SnapshotMeta)>,
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

    /// A vote request as the release before openraft 0.10 wrote it (no `leadership_transfer`)
    /// reads as one without a transfer; the earlier release reads this one's (its trailing
    /// field unread).
    #[test]
    fn a_vote_request_of_the_earlier_layout_is_read() {
        let earlier = [1, 4, 2, 0, 1, 3, 1, 13];
        let read = super::decode_vote_request(&earlier).expect("the earlier layout decodes");
        assert_eq!(read, VoteRequest::new(Vote::new(4, 2), Some(log_id(3, 13))));
        assert!(!read.leadership_transfer);
        let mut transfer = read.clone();
        transfer.leadership_transfer = true;
        let now = encode(&transfer);
        assert_eq!(
            now[..earlier.len()],
            earlier,
            "the earlier fields come first"
        );
        assert_eq!(super::decode_vote_request(&now).unwrap(), transfer);
        assert!(
            super::decode_vote_request(&earlier[..5]).is_err(),
            "a cut message is refused"
        );
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
            let read =
                again(old).unwrap_or_else(|e| panic!("{name}: the golden message decodes: {e}"));
            // The one field added since version 1 (`VoteRequest::leadership_transfer`, openraft
            // 0.10) is written last, `false` unless a leader hands over: a version-1 reader
            // ignores it (postcard leaves trailing bytes unread).
            // And the snapshot id is gone (openraft 0.10 writes an empty one and reads any): the
            // earlier header must read; it is written again without its id.
            let old = &match *name {
                "vote" => [old.as_slice(), &[0]].concat(),
                "snapshot header" => {
                    assert_eq!(bytes[bytes.len() - 1], 0, "an empty snapshot id, last");
                    read.clone()
                }
                _ => old.clone(),
            };
            assert_eq!(
                &read, old,
                "{name}: the golden message reads and writes the same"
            );
            if *name != "snapshot header" {
                assert_eq!(
                    bytes,
                    old,
                    "{name}: encoded differently from version {}: bump it",
                    super::VERSION
                );
            }
        }
    }
}
