//! How fresh a read is: read-your-writes by log position, and linearizable reads.
//!
//! Every reply carries the log position it reflects in the `exactly-index` response header: for
//! a write, the index of its entry (the answering node has applied it too, or waited
//! [`WRITE_APPLY_WAIT_MAX`](crate::node::WRITE_APPLY_WAIT_MAX) for it); for a read, the index
//! this node had applied when it read. A client that sends the largest index it has seen as
//! `exactly-min-index` on a read gets an answer that includes everything it saw, from any node:
//! the node waits (at most [`READ_WAIT_MAX`]) until it has applied that far, else answers
//! `UNAVAILABLE` so that the client asks another node. `exactly-read: linearizable` asks for more:
//! the node first learns the leader's read index (the leader confirms its leadership with a
//! quorum), so the read sees every write acknowledged to anyone before it began. Without either
//! header a read is served from this node's replica as it is (possibly a few milliseconds behind
//! the leader).

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::node::Node;

/// Response header: the log index the reply reflects.
pub const INDEX_HEADER: &str = "exactly-index";
/// Request header: the smallest log index the read must reflect (read-your-writes).
pub const MIN_INDEX_HEADER: &str = "exactly-min-index";
/// Request header: `linearizable` for a linearizable read (`replica`, the default, reads the
/// local replica as it is).
pub const READ_HEADER: &str = "exactly-read";
/// How long a read waits for this node to apply what it needs before it answers `UNAVAILABLE`.
pub const READ_WAIT_MAX: Duration = Duration::from_secs(1);

/// What a read asks for, from its headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadNeeds {
    pub min_index: u64,
    pub linearizable: bool,
}

impl ReadNeeds {
    /// Parses the request's consistency headers; bad values are `INVALID_ARGUMENT`.
    pub fn of(metadata: &tonic::metadata::MetadataMap) -> Result<Self, Status> {
        let mut needs = Self::default();
        if let Some(v) = metadata.get(MIN_INDEX_HEADER) {
            needs.min_index = v
                .to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "{MIN_INDEX_HEADER} must be a log index (a decimal number), got {v:?}"
                    ))
                })?;
        }
        if let Some(v) = metadata.get(READ_HEADER) {
            needs.linearizable = match v.to_str() {
                Ok("linearizable") => true,
                Ok("replica") => false,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "{READ_HEADER} must be \"linearizable\" or \"replica\", got {v:?}"
                    )))
                }
            };
        }
        Ok(needs)
    }
}

/// Before a read: waits until this node has applied what the request's headers ask for, and
/// returns the applied index the read will reflect.
pub async fn before_read<T>(node: &Node, request: &Request<T>) -> Result<u64, Status> {
    let needs = ReadNeeds::of(request.metadata())?;
    let mut needed = needs.min_index;
    if needs.linearizable {
        let index = node.read_index().await.map_err(|why| {
            Status::unavailable(format!(
                "a linearizable read needs the leader's read index: {why}; nothing was read"
            ))
        })?;
        needed = needed.max(index);
    }
    if !node.await_applied(needed, READ_WAIT_MAX).await {
        let applied = applied(node);
        return Err(Status::unavailable(format!(
            "node {} has applied the log up to index {applied}, behind the index {needed} this \
             read needs (waited {READ_WAIT_MAX:?}); ask another node",
            node.id
        )));
    }
    Ok(applied(node))
}

/// This node's applied log index.
pub fn applied(node: &Node) -> u64 {
    node.state.last_applied().map_or(0, |l| l.index)
}

/// `response` with the log index it reflects in its headers.
pub fn stamped<T>(mut response: Response<T>, index: u64) -> Response<T> {
    response
        .metadata_mut()
        .insert(INDEX_HEADER, MetadataValue::from(index));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers parse into what a read needs; a bad value is INVALID_ARGUMENT naming it.
    #[test]
    fn headers_parse_or_are_refused() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(ReadNeeds::of(&m).unwrap(), ReadNeeds::default());
        m.insert(MIN_INDEX_HEADER, "42".parse().unwrap());
        m.insert(READ_HEADER, "linearizable".parse().unwrap());
        assert_eq!(
            ReadNeeds::of(&m).unwrap(),
            ReadNeeds {
                min_index: 42,
                linearizable: true
            }
        );
        m.insert(MIN_INDEX_HEADER, "-1".parse().unwrap());
        let err = ReadNeeds::of(&m).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(MIN_INDEX_HEADER), "{err}");
        m.insert(MIN_INDEX_HEADER, "7".parse().unwrap());
        m.insert(READ_HEADER, "strong".parse().unwrap());
        let err = ReadNeeds::of(&m).unwrap_err();
        assert!(err.message().contains(READ_HEADER), "{err}");
    }
}
