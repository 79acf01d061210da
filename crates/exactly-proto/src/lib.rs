//! Generated code for exactly's gRPC APIs. Nothing but generated code lives here (and the
//! servers' codec, wire-level plumbing the generated code names): domain types never derive
//! prost, and conversions live with the services that use them.

#![allow(clippy::all, rust_2018_idioms)]

pub mod codec;

/// The public API (`exactly.v1`).
pub mod v1 {
    tonic::include_proto!("exactly.v1");
}

/// Node-to-node traffic (`exactly.internal.v1`).
pub mod internal {
    tonic::include_proto!("exactly.internal.v1");
}

/// The encoded file descriptor set of every proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/exactly_descriptor.bin"));
