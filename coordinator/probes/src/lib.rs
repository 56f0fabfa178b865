//! Probes of the services chaos runs against, each bounded by a timeout so
//! that a dead service reads as unavailable at once instead of hanging:
//!
//! - [`kafka`]: broker metadata, a topic's message count (end offsets), a
//!   consumer group's lag per partition;
//! - [`cassandra`]: connect, row counts, the stored events of the pipeline;
//! - [`tcp`]: a connect check; [`http`]: a status check;
//! - [`setcheck`]: Jepsen's set check (every acknowledged event stored
//!   exactly once: lost / duplicated / unexpected);
//! - [`latency`]: throughput and end-to-end latency percentiles of a window.
//!
//! Used by the coordinator's recovery validation, the lab's status and the
//! pipeline's own check.

pub mod cassandra;
pub mod http;
pub mod kafka;
pub mod latency;
pub mod setcheck;
pub mod tcp;

/// A value that could not be read: the unit of "unavailable".
pub type ProbeResult<T> = anyhow::Result<T>;

/// Run `f` within `within`, turning a timeout into an error that says so.
pub async fn bounded<T>(what: &str, within: std::time::Duration, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(within, f).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("{what}: no answer within {} ms", within.as_millis()),
    }
}
