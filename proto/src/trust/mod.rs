//! Trust on a fleet: who may call what, proven by certificates.
//!
//! - [`identity`]: the five roles and the identity a certificate carries
//!   (`spiffe://chaos/ROLE/NAME`), and the [`identity::Caller`] of a request;
//! - [`roles`]: the one table of which role may call which RPC;
//! - [`layer`]: the tower layer both servers share, which finds the caller
//!   and enforces the table;
//! - [`tls`]: rustls configs from PEM files, reloadable on SIGHUP, the
//!   server's TLS accept loop and the client's TLS connector;
//! - [`client`]: dialing a server (URL schemes per mode, identity expected
//!   of the server, the agent's Unix socket);
//! - [`certs`]: the small CA behind `chaos certs`.

pub mod args;
pub mod certs;
pub mod client;
pub mod identity;
pub mod layer;
pub mod roles;
pub mod tls;

use std::path::PathBuf;

pub use client::{ClientTls, Dial, channel, local_channel, normalize_url};
pub use identity::{Caller, Identity, Role, Via};
pub use layer::{AuthLayer, AuthMode};
pub use tls::{Expect, Tls, TlsFiles};

/// Errors of this module; each names the file or the field.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{}: {why}", path.display())]
    File { path: PathBuf, why: String },
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("TLS: {0}")]
    Tls(String),
}
