//! Cassandra through the scylla driver: connect, count, read the stored
//! events. Every call is bounded by the caller's timeout ([`crate::bounded`]).

use std::time::Duration;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use scylla::client::{session::Session, session_builder::SessionBuilder};

/// Connect to one contact point (host:port); the driver discovers the rest.
pub async fn connect(contact: &str) -> anyhow::Result<Session> {
    SessionBuilder::new()
        .known_node(contact)
        .connection_timeout(Duration::from_secs(3))
        .build()
        .await
        .with_context(|| format!("connecting to Cassandra at {contact}"))
}

/// A `keyspace.table` (or bare table) name checked before it goes into CQL
/// text: letters, digits and '_' in each part.
pub fn parse_table_name(s: &str) -> Result<String, String> {
    let ok_part = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| ok_part(p)) {
        Ok(s.to_string())
    } else {
        Err(format!("expected TABLE or KEYSPACE.TABLE (letters, digits, '_'), got {s:?}"))
    }
}

/// The server's release version: proves a CQL query round trip.
pub async fn release_version(s: &Session) -> anyhow::Result<String> {
    let rows = s.query_unpaged("SELECT release_version FROM system.local", &[]).await.context("querying system.local")?;
    let (v,) = rows.into_rows_result().context("system.local rows")?.single_row::<(String,)>().context("system.local release_version")?;
    Ok(v)
}

/// Rows in `table` (a `keyspace.table` checked by [`parse_table_name`]).
pub async fn count(s: &Session, table: &str) -> anyhow::Result<i64> {
    let table = parse_table_name(table).map_err(anyhow::Error::msg)?;
    let rows = s.query_unpaged(format!("SELECT COUNT(*) FROM {table}"), &[]).await.with_context(|| format!("counting {table}"))?;
    let (n,) = rows.into_rows_result().context("count rows")?.single_row::<(i64,)>().context("count value")?;
    Ok(n)
}

/// Create the probe table if missing (`id text PRIMARY KEY, written_at
/// timestamp`, in an existing keyspace).
pub async fn ensure_probe_table(s: &Session, table: &str) -> anyhow::Result<()> {
    let table = parse_table_name(table).map_err(anyhow::Error::msg)?;
    s.query_unpaged(format!("CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, written_at timestamp)"), &[])
        .await
        .with_context(|| format!("creating the probe table {table}"))?;
    Ok(())
}

/// Write one row of the probe `table` and read it back; the two round
/// trips, timed.
pub async fn write_read(s: &Session, table: &str, id: &str) -> anyhow::Result<(Duration, Duration)> {
    let table = parse_table_name(table).map_err(anyhow::Error::msg)?;
    let now = scylla::value::CqlTimestamp(
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(0),
    );
    let t0 = std::time::Instant::now();
    s.query_unpaged(format!("INSERT INTO {table} (id, written_at) VALUES (?, ?)"), (id, now))
        .await
        .with_context(|| format!("writing the probe row to {table}"))?;
    let write = t0.elapsed();
    let t1 = std::time::Instant::now();
    let rows =
        s.query_unpaged(format!("SELECT written_at FROM {table} WHERE id = ?"), (id,)).await.with_context(|| format!("reading {table}"))?;
    let (_,) = rows.into_rows_result().context("probe rows")?.single_row::<(scylla::value::CqlTimestamp,)>().context("the probe row")?;
    Ok((write, t1.elapsed()))
}

/// Every stored `(row id, event id)` of the pipeline's events table.
pub async fn event_ids(s: &Session, table: &str) -> anyhow::Result<Vec<(String, String)>> {
    let table = parse_table_name(table).map_err(anyhow::Error::msg)?;
    let pager = s.query_iter(format!("SELECT id, event_id FROM {table}"), &[]).await.with_context(|| format!("reading {table}"))?;
    let stream = pager.rows_stream::<(String, String)>().context("typing rows (id text, event_id text)")?;
    stream.try_collect().await.with_context(|| format!("reading {table}"))
}

/// The column where the reference pipeline appends the time of every write
/// of a row (`list<bigint>`, ms): a row written again after a redelivery
/// keeps its first write time there, while `written_at_ms` holds the last.
pub const WRITES_COLUMN: &str = "writes_ms";

/// Whether `table` (KEYSPACE.TABLE) has the [`WRITES_COLUMN`]: tables of an
/// older pipeline, or of another one, have only `written_at_ms`.
async fn has_writes_column(s: &Session, table: &str) -> anyhow::Result<bool> {
    let Some((ks, t)) = table.split_once('.') else { return Ok(false) };
    let rows = s
        .query_unpaged("SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?", (ks, t))
        .await
        .with_context(|| format!("reading the columns of {table}"))?;
    let cols: Vec<(String,)> =
        rows.into_rows_result().context("column rows")?.rows::<(String,)>().context("typing column rows")?.collect::<Result<_, _>>()?;
    Ok(cols.iter().any(|(c,)| c == WRITES_COLUMN))
}

/// One stored event, by its times (ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// When the producer made it.
    pub produced_ms: i64,
    /// When it was first stored (a redelivery writes the row again later).
    pub first_written_ms: i64,
    /// How many times it was written (1 unless redelivered; 1 where the table does not record it).
    pub writes: u32,
}

impl Stored {
    /// From a row: the last write time, and every write time when recorded.
    pub fn new(produced_ms: i64, last_written_ms: i64, writes: Vec<i64>) -> Stored {
        Stored {
            produced_ms,
            first_written_ms: writes.iter().copied().min().unwrap_or(last_written_ms),
            writes: u32::try_from(writes.len()).unwrap_or(u32::MAX).max(1),
        }
    }
}

/// Every stored row: `(event id, or "" without with_id; times)`. Latency is
/// measured to the first write where the table records every write.
async fn stored_rows(s: &Session, table: &str, with_id: bool) -> anyhow::Result<Vec<(String, Stored)>> {
    use scylla::value::{CqlValue, Row};
    let table = parse_table_name(table).map_err(anyhow::Error::msg)?;
    let mut cols = vec!["ts_ms", "written_at_ms"];
    if has_writes_column(s, &table).await? {
        cols.push(WRITES_COLUMN);
    }
    if with_id {
        cols.push("event_id");
    }
    let cql = format!("SELECT {} FROM {table}", cols.join(", "));
    let pager = s.query_iter(cql.as_str(), &[]).await.with_context(|| format!("reading {table}"))?;
    let rows: Vec<Row> = pager.rows_stream::<Row>().context("rows")?.try_collect().await.with_context(|| format!("reading {table}"))?;
    rows.into_iter()
        .map(|r| {
            let col = |name: &str| cols.iter().position(|c| *c == name).and_then(|i| r.columns.get(i)).and_then(Option::as_ref);
            let (Some(produced), Some(last)) =
                (col("ts_ms").and_then(CqlValue::as_bigint), col("written_at_ms").and_then(CqlValue::as_bigint))
            else {
                bail!("{table} has rows without ts_ms or written_at_ms");
            };
            let writes = col(WRITES_COLUMN).and_then(CqlValue::as_list).map(|l| l.iter().filter_map(CqlValue::as_bigint).collect());
            let id = col("event_id").and_then(CqlValue::as_text).cloned().unwrap_or_default();
            Ok((id, Stored::new(produced, last, writes.unwrap_or_default())))
        })
        .collect()
}

/// Every stored event's `(produced at, first written at)` in ms since the epoch.
pub async fn event_times(s: &Session, table: &str) -> anyhow::Result<Vec<(i64, i64)>> {
    let v = stored_rows(s, table, false).await?;
    if v.iter().any(|(_, r)| r.produced_ms <= 0 || r.first_written_ms <= 0) {
        bail!("{table} has rows without ts_ms or written_at_ms");
    }
    Ok(v.into_iter().map(|(_, r)| (r.produced_ms, r.first_written_ms)).collect())
}

/// `(sequence number, times)` of the stored events whose event id is
/// `PREFIX` followed by a number (one load run's events, `RUN-00000042`).
pub async fn event_times_of(s: &Session, table: &str, prefix: &str) -> anyhow::Result<Vec<(u64, Stored)>> {
    let v = stored_rows(s, table, true).await?;
    Ok(v.into_iter().filter_map(|(id, r)| Some((id.strip_prefix(prefix)?.parse().ok()?, r))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_that_could_inject_cql_are_refused() {
        assert!(parse_table_name("chaos_lab.events").is_ok());
        assert!(parse_table_name("events").is_ok());
        for bad in ["", "a.b.c", "events; DROP TABLE x", "ks.", "ks.ta-ble"] {
            assert!(parse_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_event_written_again_keeps_its_first_write_time() {
        assert_eq!(Stored::new(100, 900, vec![130, 900]), Stored { produced_ms: 100, first_written_ms: 130, writes: 2 });
        assert_eq!(Stored::new(100, 130, vec![130]), Stored { produced_ms: 100, first_written_ms: 130, writes: 1 });
        // A table that records only the last write.
        assert_eq!(Stored::new(100, 130, vec![]), Stored { produced_ms: 100, first_written_ms: 130, writes: 1 });
    }
}
