//! The `chaos.v1` contract: generated gRPC code, the descriptor set that
//! server reflection serves, and the domain types + validation that the
//! agent, the coordinator and the CLI share.
//!
//! A reader starts at `proto/chaos/v1/*.proto`; this crate only adds what
//! the wire types cannot say by themselves (validation with field names,
//! conversions to typed domain values).

pub mod convert;
pub mod edge;
pub mod files;
pub mod metrics;
pub mod rules;
pub mod serve;
pub mod spec;
pub mod telemetry;
pub mod trust;

/// Generated code for package `chaos.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("chaos.v1");
}

/// Serialized `FileDescriptorSet` of chaos.v1 (with its imports), for
/// `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("chaos_v1_descriptor");

/// Default coordinator listen address.
pub const DEFAULT_COORDINATOR_ADDR: &str = "127.0.0.1:50051";
/// Default agent listen address.
pub const DEFAULT_AGENT_ADDR: &str = "127.0.0.1:50052";

/// Product version, reported by both servers.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
