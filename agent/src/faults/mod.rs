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
