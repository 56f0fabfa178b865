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

/// Every stored event's `(produced at, written at)` in ms since the epoch.
pub async fn event_times(s: &Session, table: &str) -> anyhow::Result<Vec<(i64, i64)>> {
    let table = parse_table_name(table).map_err(anyhow::Error::msg)?;
    let pager = s.query_iter(format!("SELECT ts_ms, written_at_ms FROM {table}"), &[]).await.with_context(|| format!("reading {table}"))?;
    let stream = pager.rows_stream::<(i64, i64)>().context("typing rows (ts_ms bigint, written_at_ms bigint)")?;
    let v: Vec<(i64, i64)> = stream.try_collect().await.with_context(|| format!("reading {table}"))?;
    if v.iter().any(|(ts, w)| *ts <= 0 || *w <= 0) {
        bail!("{table} has rows without ts_ms or written_at_ms");
    }
    Ok(v)
}

/// `(sequence number, produced at, written at)` (ms) of the stored events
/// whose event id is `PREFIX` followed by a number (one load run's events,
/// `RUN-00000042`).
pub async fn event_times_of(s: &Session, table: &str, prefix: &str) -> anyhow::Result<Vec<(u64, i64, i64)>> {
    let table = parse_table_name(table).map_err(anyhow::Error::msg)?;
    let pager = s
        .query_iter(format!("SELECT event_id, ts_ms, written_at_ms FROM {table}"), &[])
        .await
        .with_context(|| format!("reading {table}"))?;
    let stream = pager.rows_stream::<(String, i64, i64)>().context("typing rows (event_id text, ts_ms bigint, written_at_ms bigint)")?;
    let v: Vec<(String, i64, i64)> = stream.try_collect().await.with_context(|| format!("reading {table}"))?;
    Ok(v.into_iter().filter_map(|(id, p, w)| Some((id.strip_prefix(prefix)?.parse().ok()?, p, w))).collect())
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
}
