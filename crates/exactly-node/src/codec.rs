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
