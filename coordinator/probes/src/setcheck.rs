//! Jepsen's set check: every event the producer saw acknowledged must be
//! stored exactly once. An event stored under two row ids is
//! **duplicated**; an acknowledged one missing is **lost**; a stored one
//! nobody acknowledged is **unexpected** (Kafka may keep an event whose
//! acknowledgement was lost: reported, so a person can judge).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use anyhow::Context;
use scylla::client::session::Session;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::cassandra;

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
/// `(row id, event id)`.
pub fn set_check(acked: &[String], rows: &[(String, String)]) -> SetCheck {
    set_check_between(acked, acked, rows)
}

/// The set check while the load still runs: `required` (acknowledged
/// before the rows were read) must each be stored exactly once; a stored
/// event is unexpected only if absent from `known` (acknowledged by the
/// time the rows had been read), so an event stored a moment before its
/// acknowledgement reached the producer is not a false alarm.
pub fn set_check_between(required: &[String], known: &[String], rows: &[(String, String)]) -> SetCheck {
    const FIRST: usize = 10;
    let acked_set: BTreeSet<&str> = required.iter().map(String::as_str).collect();
    let known_set: BTreeSet<&str> = known.iter().chain(required).map(String::as_str).collect();
    let mut per_event: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, event) in rows {
        *per_event.entry(event.as_str()).or_default() += 1;
    }
    let lost: Vec<&str> = acked_set.iter().copied().filter(|id| !per_event.contains_key(id)).collect();
    let duplicated: Vec<&str> = per_event.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    let unexpected: Vec<&str> = per_event.keys().copied().filter(|id| !known_set.contains(id)).collect();
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
///
/// Every line must look like an event id: the coordinator reads this file
/// for any client, so a file that is not an acknowledgement file (say
/// /etc/shadow) is refused without echoing a byte of it.
pub fn read_acked(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading acknowledged ids from {}", path.display()))?;
    let ids: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    if let Some(n) = ids.iter().position(|id| !is_event_id(id)) {
        anyhow::bail!(
            "{}: entry {} is not an event id (letters, digits, '-', '_', '.', ':', '#'; at most 200 characters): not an acknowledgement file?",
            path.display(),
            n + 1
        );
    }
    Ok(ids)
}

/// The set check of `table` against the ids in `acks_file`, read again every
/// 500 ms until `done` holds or `within` has passed. Under load, an event
/// acknowledged a moment ago may not be stored yet (lost for now), and one
/// stored a moment ago may not have its acknowledgement recorded yet
/// (unexpected for now); real anomalies persist (rows are never removed,
/// acknowledgements never retracted). The required ids are read once; the
/// known ones each round. Rows whose event id lacks `prefix` are left out.
pub async fn settle(
    session: &Session,
    table: &str,
    acks_file: &Path,
    prefix: &str,
    within: Duration,
    done: impl Fn(&SetCheck) -> bool,
) -> anyhow::Result<SetCheck> {
    let required = read_acked(acks_file)?;
    let deadline = Instant::now() + within;
    let mut last_lost = None;
    loop {
        let mut rows =
            crate::bounded("reading the events", within.max(Duration::from_secs(10)), cassandra::event_ids(session, table)).await?;
        rows.retain(|(_, event)| event.starts_with(prefix));
        let known = read_acked(acks_file).unwrap_or_else(|_| required.clone());
        let c = set_check_between(&required, &known, &rows);
        if done(&c) || Instant::now() >= deadline {
            return Ok(c);
        }
        if last_lost != Some(c.lost_count) {
            tracing::info!(lost = c.lost_count, acknowledged = c.acknowledged, "waiting for events on their way");
            last_lost = Some(c.lost_count);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn is_event_id(s: &str) -> bool {
    s.len() <= 200 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:#".contains(c))
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

    #[test]
    fn a_file_that_is_not_an_acks_file_is_refused_without_echoing_it() {
        let dir = std::env::temp_dir().join(format!("acks-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ok = dir.join("acks");
        std::fs::write(&ok, "r1-00000001\n\nr1-00000002\n").expect("write");
        assert_eq!(read_acked(&ok).expect("acks"), ids(&["r1-00000001", "r1-00000002"]));
        let bad = dir.join("shadow");
        std::fs::write(&bad, "root:$y$j9T$secret:19000:0:99999:7:::\n").expect("write");
        let e = format!("{:#}", read_acked(&bad).expect_err("not ids"));
        assert!(e.contains("entry 1 is not an event id") && !e.contains("secret"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn under_load_an_event_acknowledged_after_the_snapshot_is_neither_lost_nor_unexpected() {
        // "c" was acknowledged only after `required` was read, but is stored: fine.
        // "d" is in neither list yet is stored: unexpected.
        let c = set_check_between(&ids(&["a", "b"]), &ids(&["a", "b", "c"]), &rows(&[("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]));
        assert_eq!((c.acknowledged, c.ok, c.lost_count, c.unexpected_count), (2, 2, 0, 1), "{c:?}");
        assert_eq!(c.unexpected, ids(&["d"]));
    }
}
