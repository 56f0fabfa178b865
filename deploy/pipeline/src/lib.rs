//! The lab's reference log pipeline and its data check.
//!
//! - `chaos-collector` produces log events (unique ids, timestamps, a body
//!   of a chosen size) to Kafka at a bounded rate and count, and appends
//!   each id the broker **acknowledged** to a file.
//! - `chaos-processor` (a consumer group) writes each event to Cassandra by
//!   id (an upsert, so a redelivery is harmless) and commits its offset only
//!   after the write. Each write appends its time to the row's `writes_ms`,
//!   so end-to-end latency is measured to the first write and a redelivery
//!   (after a rebalance, say) shows as a second entry. `--defect` seeds a bug on purpose so the check can be
//!   proven: drop 1 in N, or write 1 in N twice under another row id.
//! - `chaos-check` is Jepsen's set check: every acknowledged event must be
//!   in Cassandra exactly once; it reports the **lost**, **duplicated** and
//!   **unexpected** ones with their first ids.

use serde::{Deserialize, Serialize};

pub const TOPIC: &str = "chaos-logs";
pub const KEYSPACE: &str = "chaos_lab";
pub const TABLE: &str = "events";

/// A table name for `--table`: it goes into CQL text, so letters, digits and '_' only.
pub fn parse_table(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(s.to_string())
    } else {
        Err(format!("letters, digits and '_' only, got {s:?}"))
    }
}

/// One log event as it travels through Kafka (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: String,
    /// Producer's wall clock, ms since the epoch.
    pub ts_ms: i64,
    pub body: String,
}

pub mod cassandra {
    //! Cassandra access of the processor and the check.
    use anyhow::Context;
    pub use chaos_probes::cassandra::connect;
    use scylla::client::session::Session;

    use super::KEYSPACE;

    pub async fn ensure_schema(s: &Session, table: &str) -> anyhow::Result<()> {
        s.query_unpaged(
            format!("CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"),
            &[],
        )
        .await
        .context("creating the keyspace")?;
        s.query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {KEYSPACE}.{table} (id text PRIMARY KEY, event_id text, ts_ms bigint, written_at_ms bigint, body text, {} list<bigint>)",
                chaos_probes::cassandra::WRITES_COLUMN
            ),
            &[],
        )
        .await
        .context("creating the events table")?;
        Ok(())
    }
}
