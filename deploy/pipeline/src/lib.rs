//! The lab's reference log pipeline and its data check.
//!
//! - `chaos-collector` produces log events (unique ids, timestamps, a body
//!   of a chosen size) to Kafka at a bounded rate and count, and appends
//!   each id the broker **acknowledged** to a file.
//! - `chaos-processor` (a consumer group) writes each event to Cassandra by
//!   id (an upsert, so a redelivery is harmless) and commits its offset only
//!   after the write. `--defect` seeds a bug on purpose so the check can be
//!   proven: drop 1 in N, or write 1 in N twice under another row id.
//! - `chaos-check` is Jepsen's set check: every acknowledged event must be
//!   in Cassandra exactly once; it reports the **lost**, **duplicated** and
//!   **unexpected** ones with their first ids.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Context;
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

/// The outcome of the set check.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SetCheck {
    pub acknowledged: usize,
    pub stored_rows: usize,
    /// Acknowledged events found exactly once.
    pub ok: usize,
    pub lost_count: usize,
    pub duplicated_count: usize,
    pub unexpected_count: usize,
    /// The first ids of each kind (at most 10).
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub unexpected: Vec<String>,
    pub verdict: String,
}

impl SetCheck {
    pub fn passed(&self) -> bool {
        self.lost_count == 0 && self.duplicated_count == 0 && self.unexpected_count == 0
    }
}

/// Compare what the collector saw acknowledged with the stored rows
/// `(row id, event id)`. An event stored under two row ids is duplicated;
/// a stored event nobody acknowledged is unexpected (Kafka may store an
/// event whose ack was lost: reported, so a person can judge).
pub fn set_check(acked: &[String], rows: &[(String, String)]) -> SetCheck {
    const FIRST: usize = 10;
    let acked_set: BTreeSet<&str> = acked.iter().map(String::as_str).collect();
    let mut per_event: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, event) in rows {
        *per_event.entry(event.as_str()).or_default() += 1;
    }
    let lost: Vec<&str> = acked_set.iter().copied().filter(|id| !per_event.contains_key(id)).collect();
    let duplicated: Vec<&str> = per_event.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    let unexpected: Vec<&str> = per_event.keys().copied().filter(|id| !acked_set.contains(id)).collect();
    let ok = acked_set.iter().filter(|id| per_event.get(*id) == Some(&1)).count();
    let first = |v: &[&str]| v.iter().take(FIRST).map(|s| s.to_string()).collect::<Vec<_>>();
    let mut c = SetCheck {
        acknowledged: acked_set.len(),
        stored_rows: rows.len(),
        ok,
        lost_count: lost.len(),
        duplicated_count: duplicated.len(),
        unexpected_count: unexpected.len(),
        lost: first(&lost),
        duplicated: first(&duplicated),
        unexpected: first(&unexpected),
        verdict: String::new(),
    };
    c.verdict = if c.passed() {
        format!("PASS: all {} acknowledged events stored exactly once", c.acknowledged)
    } else {
        format!(
            "FAIL: {} lost, {} duplicated, {} unexpected of {} acknowledged (first lost: {:?}; first duplicated: {:?}; first unexpected: {:?})",
            c.lost_count, c.duplicated_count, c.unexpected_count, c.acknowledged, c.lost, c.duplicated, c.unexpected
        )
    };
    c
}

/// Acknowledged ids, one per line.
pub fn read_acked(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading acknowledged ids from {}", path.display()))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
}

pub mod cassandra {
    //! Cassandra access shared by the processor and the check.
    use std::time::Duration;

    use anyhow::Context;
    use futures::TryStreamExt;
    use scylla::client::{session::Session, session_builder::SessionBuilder};

    use super::KEYSPACE;

    pub async fn connect(contact: &str) -> anyhow::Result<Session> {
        SessionBuilder::new()
            .known_node(contact)
            .connection_timeout(Duration::from_secs(3))
            .build()
            .await
            .with_context(|| format!("connecting to Cassandra at {contact}"))
    }

    pub async fn ensure_schema(s: &Session, table: &str) -> anyhow::Result<()> {
        s.query_unpaged(
            format!("CREATE KEYSPACE IF NOT EXISTS {KEYSPACE} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"),
            &[],
        )
        .await
        .context("creating the keyspace")?;
        s.query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {KEYSPACE}.{table} (id text PRIMARY KEY, event_id text, ts_ms bigint, written_at_ms bigint, body text)"
            ),
            &[],
        )
        .await
        .context("creating the events table")?;
        Ok(())
    }

    /// Every stored `(row id, event id)`.
    pub async fn rows(s: &Session, table: &str) -> anyhow::Result<Vec<(String, String)>> {
        let pager = s.query_iter(format!("SELECT id, event_id FROM {KEYSPACE}.{table}"), &[]).await.context("reading the events table")?;
        let stream = pager.rows_stream::<(String, String)>().context("typing rows")?;
        stream.try_collect().await.context("reading rows")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn rows(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn clean_run_passes() {
        let c = set_check(&ids(&["a", "b", "c"]), &rows(&[("a", "a"), ("b", "b"), ("c", "c")]));
        assert!(c.passed(), "{c:?}");
        assert_eq!(c.ok, 3);
        assert!(c.verdict.starts_with("PASS"));
    }

    #[test]
    fn lost_duplicated_and_unexpected_are_named() {
        let c = set_check(&ids(&["a", "b", "c", "d"]), &rows(&[("a", "a"), ("c", "c"), ("c#dup", "c"), ("x", "x")]));
        assert_eq!((c.lost_count, c.duplicated_count, c.unexpected_count, c.ok), (2, 1, 1, 1));
        assert_eq!(c.lost, ids(&["b", "d"]));
        assert_eq!(c.duplicated, ids(&["c"]));
        assert_eq!(c.unexpected, ids(&["x"]));
        assert!(c.verdict.starts_with("FAIL: 2 lost, 1 duplicated, 1 unexpected of 4"), "{}", c.verdict);
    }
}
