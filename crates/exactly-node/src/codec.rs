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

impl From<CodecError> for tonic::Status {
    fn from(e: CodecError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}
