//! An exactly node: openraft over tonic, sled storage, the scheduler and executor actors, the
//! public gRPC API, and the `exactlyd` binary's start-up.
//!
//! **Boundary:** policy lives in `exactly-core`; this crate carries it out. Nothing here decides
//! which job runs where, or whether a completion counts: it proposes, and apply decides.

pub mod api;
pub mod auth;
pub mod codec;
pub mod config;
pub mod dashboard;
pub mod events;
pub mod executor;
pub mod faults;
pub mod group;
pub mod hooks;
pub mod http;
pub mod internal;
pub mod lease;
pub mod logging;
pub mod membership;
pub mod network;
pub mod node;
pub mod proposer;
pub mod scheduler;
pub mod server;
pub mod supervise;
pub mod tls;

pub use config::NodeConfig;
pub use node::Node;
pub use server::{start, start_with, RunningNode, StartError, StartOptions};
