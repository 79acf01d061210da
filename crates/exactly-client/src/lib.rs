//! A Rust client for an exactly cluster's public gRPC API.
//!
//! ```no_run
//! # async fn example() -> Result<(), exactly_client::Error> {
//! use exactly_client::{Client, JobSpec, JobState, WatchScope};
//!
//! let client = Client::connect(vec!["http://127.0.0.1:7101".into()])?;
//! let submitted = client
//!     .submit_detailed(vec![JobSpec {
//!         kind: "noop".into(),
//!         idempotency_key: "order-17-confirmation".into(),
//!         ..JobSpec::default()
//!     }])
//!     .await?;
//! let job = &submitted.jobs[0];
//! println!("job {} (existed before: {})", job.id, job.existing);
//!
//! let mut watch = client.watch(WatchScope::Job(job.id), None).await?;
//! loop {
//!     let event = watch.next().await?;
//!     println!("job {} is {:?}", event.job_id, event.state());
//!     if matches!(event.state(), JobState::Succeeded | JobState::Dead | JobState::Cancelled) {
//!         break;
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Any node accepts any call, so the client holds a lazy channel to every endpoint and moves to
//! the next one when a try fails with `UNAVAILABLE` or a transport error, within a bounded retry
//! budget ([`ClientOptions`]). Reads retry freely. Every submitted job carries an idempotency key
//! (the client picks a UUID when the caller did not), so Submit retries even after failures that
//! leave its outcome unknown, without creating a job twice; see [`Client::submit_detailed`].
//! Other writes retry only when the failed try provably was not applied and otherwise report
//! [`Error::UnknownOutcome`]. A [`Watch`] reconnects to any endpoint and resumes where it
//! stopped.
//!
//! The request and response types are the generated protobuf messages, re-exported here so users
//! need no direct dependency on `exactly-proto`.

pub mod certs;
mod client;
mod error;
mod options;
mod retry;
pub mod token;
mod watch;

pub use client::{
    assign_idempotency_keys, CancelResultExt, Client, Submission, Submitted, CANCEL_JOBS_MAX,
    DEAD_LETTERS_PER_CALL_MAX, ENDPOINTS_MAX, LIST_LIMIT_MAX, SUBMIT_JOBS_MAX,
};
pub use error::{code_name, Error};
pub use options::{ClientIdentity, ClientOptions, Token};
pub use watch::{Watch, WatchScope};

pub use exactly_proto::v1::{
    AddScheduleRequest, Attempt, AuditRecord, CancelResult, ConfigureQueueRequest,
    DeadLetterFilter, DrainResponse, EventPosition, Job, JobCounts, JobEventMessage, JobSpec,
    JobState, JoinResponse, ListRequest, ListResponse, Member, MissedTickPolicy, OverlapPolicy,
    QueueInfo, RateLimitSpec, ScheduleInfo, StatusResponse, TokenInfo,
};
/// The gRPC status code type used by [`Error::code`].
pub use tonic::Code;
