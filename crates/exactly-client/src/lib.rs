//! A Rust client for an exactly cluster's public gRPC API.
//!
//! ```no_run
//! # async fn example() -> Result<(), exactly_client::Error> {
//! use exactly_client::{Client, JobSpec};
//!
//! let client = Client::connect(vec!["http://127.0.0.1:7101".into()])?;
//! let id = client
//!     .submit_one(JobSpec { kind: "noop".into(), ..JobSpec::default() })
//!     .await?;
//! let job = client.get(id).await?;
//! println!("job {id} is {:?}", job.state());
//! # Ok(())
//! # }
//! ```
//!
//! Any node accepts any call, so the client holds a lazy channel to every endpoint and moves to
//! the next one when a try fails with `UNAVAILABLE` or a transport error, within a bounded retry
//! budget ([`ClientOptions`]). Reads retry freely. Submits retry only when the failed try
//! provably was not applied, and otherwise report [`Error::UnknownOutcome`]; see
//! [`Client::submit`].
//!
//! The request and response types are the generated protobuf messages, re-exported here so users
//! need no direct dependency on `exactly-proto`.

mod client;
mod error;
mod options;
mod retry;

pub use client::{Client, ENDPOINTS_MAX, SUBMIT_JOBS_MAX};
pub use error::{code_name, Error};
pub use options::ClientOptions;

pub use exactly_proto::v1::{
    Attempt, DrainResponse, Job, JobCounts, JobSpec, JobState, JoinResponse, Member, StatusResponse,
};
/// The gRPC status code type used by [`Error::code`].
pub use tonic::Code;
