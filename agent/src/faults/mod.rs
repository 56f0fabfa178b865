//! Fault drivers: one module per family, each with `plan`, `apply` and
//! `revert` side by side. The lifecycle never knows which family it runs.
//!
//! `plan` resolves the request on this host without side effects and
//! returns a [`Plan`] that holds everything `revert` needs. The plan is
//! journaled (fsync'd) before `apply` touches the host, so a new agent
//! process can revert it after a crash from the plan alone.

pub mod bandwidth;
pub mod container;
pub mod delay_engine;
pub mod latency;
pub mod network;
pub mod process;
pub mod resource;

use async_trait::async_trait;
use chaos_proto::{
    pb,
    spec::{FaultKind, FaultRequest},
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A share in hundredths of a percent as text: 1050 -> "10.50".
pub fn permyriad_text(n: u32) -> String {
    format!("{}.{:02}", n / 100, n % 100)
}

/// What a drop of `n`/10000 of the packets in scope is: "partition" (all) or "loss 10.50 %".
pub fn drop_text(n: u32) -> String {
    if n >= 10_000 { "partition".into() } else { format!("loss {} %", permyriad_text(n)) }
}

use crate::error::AgentError;

/// A process a fault acts on, named by pid and start time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub pid: u32,
    pub start_time_ticks: u64,
    pub name: String,
}

impl From<&ProcRef> for pb::ProcessRef {
    fn from(p: &ProcRef) -> Self {
        pb::ProcessRef { pid: p.pid, start_time_ticks: p.start_time_ticks, name: p.name.clone() }
    }
}

/// A resolved, host-specific plan: what `apply` will do and what `revert` undoes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "driver")]
pub enum Plan {
    /// Signal processes (pause: SIGSTOP, undone by SIGCONT; kill: not undone).
    Process(process::ProcessPlan),
    /// nftables tables in a network namespace.
    Network(Box<network::NetworkPlan>),
    /// iptables NFQUEUE chains + the userspace delay engine.
    Latency(Box<latency::LatencyPlan>),
    /// htb root qdiscs with u32 filters.
    Bandwidth(Box<bandwidth::BandwidthPlan>),
    /// cgroup knobs, stress workers, a fill file.
    Resource(Box<resource::ResourcePlan>),
    /// Docker container actions.
    Container(container::ContainerPlan),
}

/// What `apply` achieved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub backend: &'static str,
    pub processes: Vec<ProcRef>,
    pub summary: String,
    /// Measured figures by name with their unit (`cpu_load_percent`, ...).
    pub achieved: Vec<(String, f64)>,
    /// What happened to the fault on its own while active; empty if nothing.
    pub outcome: String,
}

impl Applied {
    /// Take in a later measurement.
    pub fn update(&mut self, o: Observation) {
        for (k, v) in o.achieved {
            match self.achieved.iter_mut().find(|(n, _)| *n == k) {
                Some(slot) => slot.1 = v,
                None => self.achieved.push((k, v)),
            }
        }
        if let Some(out) = o.outcome {
            self.outcome = out;
        }
    }
}

/// A fresh look at an active fault.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    pub achieved: Vec<(String, f64)>,
    pub outcome: Option<String>,
}

impl From<&Applied> for pb::AppliedDetail {
    fn from(a: &Applied) -> Self {
        pb::AppliedDetail {
            backend: a.backend.to_string(),
            processes: a.processes.iter().map(Into::into).collect(),
            summary: a.summary.clone(),
            achieved: a.achieved.iter().cloned().collect(),
            outcome: a.outcome.clone(),
        }
    }
}

/// What a fault touches on the host, read before apply and again after
/// revert; equal snapshots prove the revert. Keys name the thing read
/// ("nft tables in netns /proc/123/ns/net", "cpu.max of /sys/fs/cgroup/x"),
/// values are its normalised state (no counters, no statistics, nothing that changes on its own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub items: BTreeMap<String, String>,
}

/// Longest value a difference line shows, in characters.
const SHOWN_CHARS: usize = 200;
/// Characters kept before the first differing one when a long value is cut.
const SHOWN_CONTEXT: usize = 30;

impl Snapshot {
    /// Record `value` under `key`.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.items.insert(key.into(), value.into());
    }

    /// One line per difference from `before` to `self`, naming the thing and both values
    /// (values shortened to a readable length), empty when equal.
    pub fn differences(&self, before: &Snapshot) -> Vec<String> {
        self.differing(before).into_iter().map(|d| d.line).collect()
    }

    /// The differences from `before` to `self`, each with its key.
    fn differing(&self, before: &Snapshot) -> Vec<Difference> {
        let mut keys: Vec<&String> = before.items.keys().chain(self.items.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for k in keys {
            let (b, a) = (before.items.get(k), self.items.get(k));
            let line = match (b, a) {
                (Some(b), Some(a)) if a == b => continue,
                (Some(b), Some(a)) => {
                    let at = first_difference(b, a);
                    format!("{k}: was {}, now {}", shown(b, at), shown(a, at))
                }
                (Some(b), None) => format!("{k}: was {}, now not read", shown(b, 0)),
                (None, Some(a)) => format!("{k}: not read before, now {}", shown(a, 0)),
                (None, None) => continue,
            };
            let vanished = a.is_some_and(|a| VANISHED.contains(&a.as_str()));
            out.push(Difference { key: k.clone(), line, vanished });
        }
        out
    }
}

/// Values starting with this are not judged after the revert (either side).
pub const NOT_JUDGED: &str = "(not judged";
/// The value a reading before apply gives a thing that was already in the
/// fault's state (a process stopped by someone else before a pause): the
/// revert does not restore it to that.
pub const ALREADY_FAULTED: &str = "(not judged: already in the fault's state before it)";
/// The value of a thing other chaos faults (of this agent or another) use too.
pub const SHARED_WITH_OTHERS: &str = "(not judged: in use by other chaos faults too)";

/// Snapshot values that say the thing itself is gone (a process, a
/// container, an interface): nothing of a fault can remain on it, so such a
/// difference is not a leftover.
const VANISHED: &[&str] = &["gone", "(no such device)"];

struct Difference {
    key: String,
    line: String,
    vanished: bool,
}

/// What a fault's state was before apply, as its journal record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Before {
    /// Read: compared after the revert.
    Read(Snapshot),
    /// The driver reads nothing for this plan (a kill is not undone).
    NothingToCompare,
    /// Reading failed before apply (the fault was applied anyway): why.
    Unread(String),
}

/// The verdict of the re-read after a revert.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Check {
    pub verdict: pb::RevertCheck,
    pub detail: String,
    /// What the check added to the revert.
    pub took: std::time::Duration,
}

impl Check {
    fn new(verdict: pb::RevertCheck, detail: impl Into<String>) -> Self {
        Check { verdict, detail: detail.into(), took: std::time::Duration::ZERO }
    }

    /// `took` for the record; unset when there was no check.
    pub fn took(&self) -> Option<prost_types::Duration> {
        (self.verdict != pb::RevertCheck::Unspecified).then(|| chaos_proto::convert::duration_to_pb(self.took))
    }

    /// Its name for metrics and logs: "verified", "different", "not_compared", "unspecified".
    pub fn name(&self) -> &'static str {
        match self.verdict {
            pb::RevertCheck::Verified => "verified",
            pb::RevertCheck::Different => "different",
            pb::RevertCheck::NotCompared => "not_compared",
            pb::RevertCheck::Unspecified => "unspecified",
        }
    }
}

/// What a re-read found, sorted by whose it is.
#[derive(Debug, Default)]
struct Judged {
    /// Differences on things only this fault touched: leftovers.
    ours: Vec<String>,
    /// Differences on things another fault (named) touched too: not judged.
    shared: Vec<String>,
    /// Things read before as [`NOT_JUDGED`].
    unjudged: usize,
    /// Things that are gone now (a process that exited).
    vanished: usize,
}

/// Sort the differences from `before` to `after`. `shared` maps the keys
/// other faults read too (faults active on the same things while this one
/// was) to one such fault's id.
fn judge(before: &Snapshot, after: &Snapshot, shared: &BTreeMap<String, String>) -> Judged {
    let mut j = Judged { unjudged: before.items.values().filter(|v| v.starts_with(NOT_JUDGED)).count(), ..Default::default() };
    for d in after.differing(before) {
        let unjudged = |s: &Snapshot| s.items.get(&d.key).is_some_and(|v| v.starts_with(NOT_JUDGED));
        if unjudged(before) || unjudged(after) {
            continue;
        }
        if d.vanished {
            j.vanished += 1;
        } else if let Some(other) = shared.get(&d.key) {
            j.shared.push(format!("{} (fault {other} changed it too)", d.line));
        } else {
            j.ours.push(d.line);
        }
    }
    j
}

/// Revert `plan` and prove it: read the state again and compare it with
/// `before`; a leftover is reverted once more and read again. Still
/// different: `Err(NotRestored)` naming each difference, with a DIFFERENT check.
pub async fn revert_verified(
    driver: &dyn FaultDriver,
    plan: &Plan,
    before: Option<&Before>,
    shared: &BTreeMap<String, String>,
) -> (Result<String, AgentError>, Check) {
    let summary = match driver.revert(plan).await {
        Ok(s) => s,
        Err(e) => return (Err(e), Check::default()),
    };
    let t0 = std::time::Instant::now();
    let (result, mut check) = verify(driver, plan, before, shared, summary).await;
    check.took = t0.elapsed();
    (result, check)
}

/// The check of [`revert_verified`], after its first revert returned `summary`.
async fn verify(
    driver: &dyn FaultDriver,
    plan: &Plan,
    before: Option<&Before>,
    shared: &BTreeMap<String, String>,
    mut summary: String,
) -> (Result<String, AgentError>, Check) {
    use pb::RevertCheck as V;
    let snap = match before {
        Some(Before::Read(s)) => s,
        Some(Before::NothingToCompare) => return (Ok(summary), Check::new(V::NotCompared, "this fault is not undone: nothing to compare")),
        Some(Before::Unread(e)) => {
            return (Ok(summary), Check::new(V::NotCompared, format!("the state could not be read before apply: {e}")));
        }
        None => return (Ok(summary), Check::new(V::NotCompared, "no state was read before apply (journal record of an older agent)")),
    };
    let mut retried = false;
    loop {
        let after = match driver.snapshot(plan).await {
            Ok(Some(a)) => a,
            Ok(None) => return (Ok(summary), Check::new(V::NotCompared, "nothing could be read after the revert")),
            Err(AgentError::TargetNotFound(why)) => {
                return (Ok(summary), Check::new(V::Verified, format!("the target is gone ({why}): nothing of the fault can remain")));
            }
            Err(e) => return (Ok(summary), Check::new(V::NotCompared, format!("the state could not be read after the revert: {e}"))),
        };
        let j = judge(snap, &after, shared);
        if !snap.items.is_empty() && j.unjudged == snap.items.len() {
            let why = "nothing it touches could be judged (already in the fault's state before it, e.g. a process stopped by someone else, or in use by other chaos faults): nothing to compare";
            return (Ok(summary), Check::new(V::NotCompared, why));
        }
        if j.ours.is_empty() {
            let read = snap.items.len() - j.unjudged;
            let mut detail = format!("host state as before ({read} item{} read", if read == 1 { "" } else { "s" });
            if j.unjudged > 0 {
                detail.push_str(&format!(", {} not judged", j.unjudged));
            }
            if j.vanished > 0 {
                detail.push_str(&format!(", {} gone since", j.vanished));
            }
            detail.push(')');
            if retried {
                detail.push_str(", after a second revert");
            }
            if j.shared.is_empty() {
                return (Ok(summary), Check::new(V::Verified, detail));
            }
            return (Ok(summary), Check::new(V::NotCompared, format!("{detail}; not judged: {}", j.shared.join("; "))));
        }
        let found = j.ours.join("; ");
        if retried {
            return (Err(AgentError::NotRestored(found.clone())), Check::new(V::Different, found));
        }
        tracing::warn!(differences = %found, "the host is not as before the fault after its revert: reverting once more");
        retried = true;
        match driver.revert(plan).await {
            Ok(s) => summary = s,
            Err(e) => return (Err(e), Check::new(V::Different, found)),
        }
    }
}

/// Read the state `plan` is about to touch, for [`revert_verified`].
/// `Err` only when the target is gone (the fault is refused then).
pub async fn read_before(driver: &dyn FaultDriver, plan: &Plan) -> Result<Before, AgentError> {
    match driver.snapshot(plan).await {
        Ok(Some(s)) => Ok(Before::Read(driver.as_before(plan, s))),
        Ok(None) => Ok(Before::NothingToCompare),
        Err(e @ AgentError::TargetNotFound(_)) => Err(e),
        Err(e) => Ok(Before::Unread(e.to_string())),
    }
}

/// Index (in characters) of the first character where `a` and `b` differ.
fn first_difference(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

/// `v` quoted and cut to [`SHOWN_CHARS`], keeping the part around character `at`.
fn shown(v: &str, at: usize) -> String {
    let n = v.chars().count();
    if n <= SHOWN_CHARS {
        return format!("{v:?}");
    }
    let start = at.saturating_sub(SHOWN_CONTEXT).min(n - SHOWN_CHARS);
    let body: String = v.chars().skip(start).take(SHOWN_CHARS).collect();
    let (pre, post) = (if start > 0 { "…" } else { "" }, if start + SHOWN_CHARS < n { "…" } else { "" });
    format!("{pre}{body:?}{post} ({n} chars)")
}

/// One fault family on this host.
#[async_trait]
pub trait FaultDriver: Send + Sync {
    /// Resolve the request against this host; reads only, no side effects.
    async fn plan(&self, req: &FaultRequest) -> Result<Plan, AgentError>;
    /// Make the plan true on the host.
    async fn apply(&self, plan: &Plan) -> Result<Applied, AgentError>;
    /// Undo the plan; idempotent, and a no-op on targets that are gone.
    /// Returns a one-line summary of what it found and did.
    async fn revert(&self, plan: &Plan) -> Result<String, AgentError>;
    /// Measure an active fault now (cheap: it runs when faults are listed).
    fn observe(&self, _plan: &Plan) -> Option<Observation> {
        None
    }
    /// The reading before apply as it is kept: a driver marks with
    /// [`ALREADY_FAULTED`] what its revert does not restore to the value read.
    fn as_before(&self, _plan: &Plan, before: Snapshot) -> Snapshot {
        before
    }
    /// Read the state `plan` touches (reads only, cheap: it runs before every
    /// apply and after every revert). `Ok(None)`: nothing to compare (a kill is
    /// not undone). `Err(AgentError::TargetNotFound(_))` when the target is gone.
    async fn snapshot(&self, _plan: &Plan) -> Result<Option<Snapshot>, AgentError> {
        Ok(None)
    }
}

/// Every driver this build has, by family.
pub struct Drivers {
    pub process: process::ProcessDriver,
    pub network: network::NetworkDriver,
    pub resource: resource::ResourceDriver,
    pub container: container::ContainerDriver,
}

impl Drivers {
    /// The driver that plans this request.
    pub fn for_request(&self, req: &FaultRequest) -> &dyn FaultDriver {
        match req.kind {
            FaultKind::ProcessPause | FaultKind::ProcessKill { .. } => &self.process,
            FaultKind::NetworkPartition { .. }
            | FaultKind::NetworkLoss { .. }
            | FaultKind::NetworkCorrupt { .. }
            | FaultKind::NetworkDuplicate { .. }
            | FaultKind::NetworkLatency { .. }
            | FaultKind::NetworkReorder { .. }
            | FaultKind::NetworkBandwidth { .. } => &self.network,
            FaultKind::CpuStress { .. }
            | FaultKind::CpuThrottle { .. }
            | FaultKind::MemoryStress { .. }
            | FaultKind::MemoryLimit { .. }
            | FaultKind::CgroupFreeze
            | FaultKind::DiskFill { .. }
            | FaultKind::IoThrottle { .. } => &self.resource,
            FaultKind::ContainerAction { .. } => &self.container,
        }
    }

    /// The request as its driver plans it: a `container` target of a
    /// network or resource fault becomes the container's init process (its
    /// network namespace and cgroup are the container's).
    pub async fn resolve_container(&self, req: &FaultRequest) -> Result<FaultRequest, AgentError> {
        match (&req.target, &req.kind) {
            (chaos_proto::spec::TargetSpec::Container(name), k) if !matches!(k, FaultKind::ContainerAction { .. }) => {
                let pid = self.container.init_pid(name).await?;
                Ok(FaultRequest { target: chaos_proto::spec::TargetSpec::Pid(pid), ..req.clone() })
            }
            _ => Ok(req.clone()),
        }
    }

    /// The driver that applies and reverts this plan.
    pub fn for_plan(&self, plan: &Plan) -> &dyn FaultDriver {
        match plan {
            Plan::Process(_) => &self.process,
            Plan::Network(_) | Plan::Latency(_) | Plan::Bandwidth(_) => &self.network,
            Plan::Resource(_) => &self.resource,
            Plan::Container(_) => &self.container,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(items: &[(&str, &str)]) -> Snapshot {
        Snapshot { items: items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn what_another_fault_read_too_or_was_already_faulted_is_not_judged_as_ours() {
        let before = snap(&[("a", "1"), ("b", "1"), ("c", ALREADY_FAULTED), ("p", "not stopped")]);
        let after = snap(&[("a", "2"), ("b", "2"), ("c", "not stopped"), ("p", "gone")]);
        let shared: BTreeMap<String, String> = [("b".to_string(), "f2".to_string())].into();
        let j = judge(&before, &after, &shared);
        assert_eq!(j.ours, vec![r#"a: was "1", now "2""#.to_string()]);
        assert_eq!(j.shared, vec![r#"b: was "1", now "2" (fault f2 changed it too)"#.to_string()]);
        assert_eq!((j.unjudged, j.vanished), (1, 1));
    }

    #[test]
    fn equal_snapshots_have_no_differences() {
        let a = snap(&[("nft tables inet in netns /run/netns/a", "(none)"), ("cpu.max of /app", "max 100000")]);
        assert!(a.differences(&a.clone()).is_empty());
        assert!(Snapshot::default().differences(&Snapshot::default()).is_empty());
    }

    #[test]
    fn differences_name_the_thing_and_both_values_for_changed_added_and_removed_keys() {
        let before = snap(&[("cpu.max of /app", "max 100000"), ("freezer state of /app", "0"), ("same", "x")]);
        let after = snap(&[("cpu.max of /app", "25000 100000"), ("fill file /d/.chaos-fill-f1", "present"), ("same", "x")]);
        let d = after.differences(&before);
        assert_eq!(
            d,
            vec![
                r#"cpu.max of /app: was "max 100000", now "25000 100000""#.to_string(),
                r#"fill file /d/.chaos-fill-f1: not read before, now "present""#.to_string(),
                r#"freezer state of /app: was "0", now not read"#.to_string(),
            ]
        );
    }

    #[test]
    fn long_values_are_cut_around_where_they_differ() {
        let common = "rule; ".repeat(100);
        let before = snap(&[("iptables raw chain PREROUTING in host", &format!("{common}-j CHAOS-x-I; end"))]);
        let after = snap(&[("iptables raw chain PREROUTING in host", &format!("{common}end"))]);
        let d = after.differences(&before);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("CHAOS-x-I"), "the differing part is shown: {}", d[0]);
        assert!(d[0].len() < 2 * SHOWN_CHARS + 150, "shortened (both values hold over 600 chars): {} chars", d[0].len());
        assert!(d[0].contains('…') && d[0].contains("chars)"), "{}", d[0]);
        // Multi-byte characters are never split.
        let wide = snap(&[("k", &"é".repeat(500))]);
        assert_eq!(wide.differences(&Snapshot::default()).len(), 1);
    }
}
