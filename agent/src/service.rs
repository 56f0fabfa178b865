//! The gRPC surface of the agent (`chaos.v1.Agent`): one method per RPC,
//! each a thin call into the [`Lifecycle`].

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use chaos_proto::{
    convert::{duration_from_pb, duration_to_pb, timestamp_to_pb},
    metrics::Filter,
    pb::{self, RevertReason, agent_server::Agent},
    spec::ALL_FAMILIES,
    trust::Caller,
};
use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::{
    lifecycle::{Lifecycle, LifecycleStatus},
    metrics::Metrics,
};

/// Facts about this agent that do not change while it runs.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub hostname: String,
    pub coordinator_url: Option<String>,
    pub lease: Duration,
    pub max_fault_duration: Duration,
    pub kernel_release: String,
    pub boot_id: String,
    pub journal_dir: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// `nft --version`, or why nftables is unusable.
    pub nftables: Result<String, String>,
    /// `iptables -V`, or why iptables is unusable (the NFQUEUE latency engine needs it).
    pub iptables: Result<String, String>,
    /// `tc -V`, or why tc is unusable (bandwidth).
    pub tc: Result<String, String>,
    /// Kernel mechanisms for network faults, probed at start.
    pub backends: Vec<crate::sys::probe::KernelBackend>,
    /// The cgroup hierarchy (resource faults), or why there is none.
    pub cgroups: Result<crate::sys::cgroup::CgroupFs, String>,
    /// The Docker Engine socket (container faults).
    pub docker_socket: std::path::PathBuf,
    /// Random at each start (sent at registration and on every heartbeat).
    pub instance_id: String,
    /// The credentials in force; None when --insecure.
    pub tls: Option<Arc<chaos_proto::trust::Tls>>,
}

/// Read a one-line kernel fact from procfs, or "unknown".
pub fn proc_line(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

impl AgentIdentity {
    /// Capabilities with the lifecycle's current state.
    /// `docker`: whether the daemon answered just now (its version), or why not.
    pub fn capabilities(&self, st: &LifecycleStatus, docker: &Result<String, String>) -> pb::Capabilities {
        let (armed, lease_lost) = (st.armed, st.lease_lost);
        let netem = crate::sys::probe::has(&self.backends, "sch_netem");
        let netem_detail = "sch_netem under an htb class of the fault's own, u32 filters for the scope, ifb for ingress";
        let families = ALL_FAMILIES
            .iter()
            .map(|f| {
                // Network families: the tool they drive, and how they use it.
                let network = match *f {
                    "network_partition" => Some((&self.nftables, "nftables", "inet input + netdev egress, control channel exempt")),
                    "network_loss" if netem => {
                        Some((&self.nftables, "nftables", "numgen: each packet drawn independently; with correlation: sch_netem"))
                    }
                    "network_loss" => Some((
                        &self.nftables,
                        "nftables",
                        "numgen: each packet drawn independently; correlation needs sch_netem, absent here (refused)",
                    )),
                    "network_latency" | "network_corrupt" | "network_duplicate" | "network_reorder" if netem => {
                        Some((&self.tc, "tc", netem_detail))
                    }
                    "network_latency" => Some((
                        &self.iptables,
                        "iptables",
                        "NFQUEUE (--queue-bypass) + userspace delay engine, fail-open; IPv4; correlation needs sch_netem (refused)",
                    )),
                    "network_corrupt" => Some((
                        &self.iptables,
                        "iptables",
                        "NFQUEUE + userspace engine: one bit flipped past the IP header, checksums left stale (the receiver discards it); IPv4",
                    )),
                    "network_duplicate" => Some((
                        &self.iptables,
                        "iptables",
                        "NFQUEUE + userspace engine: a copy re-sent through a raw socket in the namespace, marked so it is not queued again; IPv4",
                    )),
                    "network_reorder" => {
                        Some((&self.iptables, "iptables", "NFQUEUE + userspace engine: a share passes at once, the rest is held"))
                    }
                    "network_bandwidth" => Some((
                        &self.tc,
                        "tc",
                        "htb + u32 filters, egress and (ifb) ingress, IPv4 scoping; never replaces a qdisc it did not create",
                    )),
                    _ => None,
                };
                use crate::sys::cgroup::Controller as C;
                let resource = match *f {
                    "cpu_stress" => Some((C::Cpu, "worker process in the target's cgroup or its own, duty-cycled on its CPU clock")),
                    "cpu_throttle" => Some((C::Cpu, "CFS quota of the target's cgroup, previous value restored")),
                    "memory_stress" => Some((C::Memory, "worker process touching every page, oom_score_adj 1000, host floor guard")),
                    "memory_limit" => Some((C::Memory, "memory limit of the target's cgroup, previous value restored")),
                    "io_throttle" => Some((C::Io, "bytes/s limits of the target's cgroup on one disk, previous values restored")),
                    "cgroup_freeze" => Some((C::Freezer, "cgroup freezer of the target's cgroup, verified frozen")),
                    _ => None,
                };
                let (supported, detail) = match (*f, network, resource, &self.cgroups) {
                    ("process_pause", ..) => (true, "SIGSTOP/SIGCONT through a pidfd, guarded against pid reuse".to_string()),
                    ("process_kill", ..) => {
                        (true, "a signal of choice through a pidfd, guarded against pid reuse; watches for a restart".to_string())
                    }
                    ("container_action", ..) => match docker {
                        Ok(v) => (
                            true,
                            format!(
                                "{v} on {}: stop, start, restart, pause, unpause, kill; by name, id or label",
                                self.docker_socket.display()
                            ),
                        ),
                        Err(why) => (false, format!("no Docker daemon answering on {}: {why}", self.docker_socket.display())),
                    },
                    ("disk_fill", ..) => {
                        (true, "one file of the fault's own (fallocate, else writes), capped by guards.disk_fill_max_percent".into())
                    }
                    (_, _, Some((ctrl, how)), Ok(cg)) if cg.has(ctrl) => {
                        (true, format!("cgroup {} {}: {how}", cg.version().as_str(), ctrl.v1()))
                    }
                    (_, _, Some((ctrl, _)), Ok(cg)) => {
                        (false, format!("cgroup {} has no {} controller here", cg.version().as_str(), ctrl.v1()))
                    }
                    (_, _, Some(_), Err(why)) => (false, format!("no usable cgroup filesystem: {why}")),
                    (_, Some((Ok(version), _, how)), ..) => (true, format!("{version}: {how}")),
                    (_, Some((Err(why), tool, _)), ..) => (false, format!("{tool} unusable: {why}")),
                    _ => (false, "no backend for this family in this agent version".to_string()),
                };
                pb::FamilySupport { family: f.to_string(), supported, detail }
            })
            .collect();
        pb::Capabilities {
            agent_id: self.agent_id.clone(),
            hostname: self.hostname.clone(),
            version: chaos_proto::VERSION.to_string(),
            standalone: self.coordinator_url.is_none(),
            coordinator_url: self.coordinator_url.clone().unwrap_or_default(),
            lease_duration: self.coordinator_url.as_ref().map(|_| duration_to_pb(self.lease)),
            armed,
            lease_lost,
            families,
            kernel_release: self.kernel_release.clone(),
            boot_id: self.boot_id.clone(),
            max_fault_duration: Some(duration_to_pb(self.max_fault_duration)),
            agent_pid: std::process::id(),
            journal_dir: self.journal_dir.clone(),
            labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            backends: self
                .backends
                .iter()
                .map(|b| pb::KernelBackend { name: b.name.to_string(), available: b.available, detail: b.detail.clone() })
                .collect(),
            tls_identity: self.tls.as_ref().map(|t| t.identity().uri()).unwrap_or_default(),
            tls_not_after: self.tls.as_ref().map(|t| timestamp_to_pb(t.current().not_after)),
            instance_id: self.instance_id.clone(),
            registered: self.coordinator_url.is_some() && !lease_lost && st.refused.is_none(),
            registration_error: st.refused.clone().unwrap_or_default(),
        }
    }
}

/// `chaos.v1.Agent` implementation.
#[derive(Clone)]
pub struct AgentService {
    lifecycle: Lifecycle,
    identity: Arc<AgentIdentity>,
    metrics: Metrics,
}

impl AgentService {
    pub fn new(lifecycle: Lifecycle, identity: Arc<AgentIdentity>, metrics: Metrics) -> Self {
        Self { lifecycle, identity, metrics }
    }
}

type MetricStream = Pin<Box<dyn Stream<Item = Result<pb::MetricBatch, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    #[instrument(skip_all, fields(fault_id = %req.get_ref().spec.as_ref().map(|s| s.id.as_str()).unwrap_or(""), caller = %Caller::of(&req)))]
    async fn apply_fault(&self, req: Request<pb::ApplyFaultRequest>) -> Result<Response<pb::ApplyFaultResponse>, Status> {
        let caller = Caller::of(&req);
        let spec = req.into_inner().spec.ok_or_else(|| Status::invalid_argument("spec is required"))?;
        info!(%caller, fault = %chaos_proto::spec::describe(&spec), "ApplyFault");
        let fault = self.lifecycle.apply(&spec).await?;
        Ok(Response::new(pb::ApplyFaultResponse { fault: Some(fault) }))
    }

    #[instrument(skip_all, fields(fault_id = %req.get_ref().fault_id, caller = %Caller::of(&req)))]
    async fn revert_fault(&self, req: Request<pb::RevertFaultRequest>) -> Result<Response<pb::RevertFaultResponse>, Status> {
        let caller = Caller::of(&req);
        let id = req.into_inner().fault_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("fault_id is required"));
        }
        info!(%caller, fault_id = %id, "RevertFault");
        let (fault, already_reverted) = self.lifecycle.revert(&id).await?;
        Ok(Response::new(pb::RevertFaultResponse { fault: Some(fault), already_reverted }))
    }

    #[instrument(skip_all, fields(reason = %req.get_ref().reason, disarm = req.get_ref().disarm, caller = %Caller::of(&req)))]
    async fn revert_all(&self, req: Request<pb::RevertAllRequest>) -> Result<Response<pb::RevertAllResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        info!(%caller, reason = %r.reason, emergency = r.emergency, disarm = r.disarm, "RevertAll");
        let reason = if r.emergency { RevertReason::EmergencyStop } else { RevertReason::RevertAll };
        let disarm = r.disarm.then(|| if r.reason.is_empty() { "revert-all with disarm".to_string() } else { r.reason.clone() });
        let wait = match r.wait.as_ref() {
            None => crate::lifecycle::DEFAULT_REVERT_ALL_WAIT,
            Some(d) => chaos_proto::convert::duration_from_pb(d)
                .filter(|w| *w <= Duration::from_secs(60))
                .ok_or_else(|| Status::invalid_argument(format!("wait: must be in [0s, 60s], got {}s {}ns", d.seconds, d.nanos)))?,
        };
        let out = self.lifecycle.revert_all(reason, disarm, wait).await?;
        Ok(Response::new(pb::RevertAllResponse {
            reverted_count: u32::try_from(out.reverted.len()).unwrap_or(u32::MAX),
            failed: out.failed,
            reverted: out.reverted,
            armed: out.armed,
            in_progress: out.in_progress,
        }))
    }

    async fn list_faults(&self, req: Request<pb::ListFaultsRequest>) -> Result<Response<pb::ListFaultsResponse>, Status> {
        let faults = self.lifecycle.list(req.into_inner().include_finished).await?;
        Ok(Response::new(pb::ListFaultsResponse { faults }))
    }

    async fn get_capabilities(&self, _req: Request<pb::GetCapabilitiesRequest>) -> Result<Response<pb::Capabilities>, Status> {
        let st = self.lifecycle.status().await?;
        let docker = crate::faults::container::probe(&self.identity.docker_socket).await;
        Ok(Response::new(self.identity.capabilities(&st, &docker)))
    }

    #[instrument(skip_all, fields(armed = req.get_ref().armed, caller = %Caller::of(&req)))]
    async fn set_armed(&self, req: Request<pb::SetArmedRequest>) -> Result<Response<pb::SetArmedResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        info!(%caller, armed = r.armed, reason = %r.reason, "SetArmed");
        let armed = self.lifecycle.set_armed(r.armed, r.reason).await?;
        Ok(Response::new(pb::SetArmedResponse { armed }))
    }

    type StreamMetricsStream = MetricStream;

    async fn stream_metrics(&self, req: Request<pb::StreamMetricsRequest>) -> Result<Response<MetricStream>, Status> {
        let r = req.into_inner();
        let every = match r.interval.as_ref() {
            None => Duration::ZERO,
            Some(d) => duration_from_pb(d)
                .filter(|d| *d <= Duration::from_secs(3600))
                .ok_or_else(|| Status::invalid_argument(format!("interval: must be in [0s, 1h], got {}s", d.seconds)))?,
        };
        let filter = Filter::from_stream(&r);
        // A fresh sample first (the current one, or the woken sampler's
        // next), then each new one; a slow reader only ever sees the latest
        // (watch), never holding the sampler. The sampler runs while `rx`
        // lives: until the client goes.
        let mut rx = self.metrics.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last_sent: Option<Instant> = None;
            loop {
                // A client that went stops the sampler now, not at the next send.
                tokio::select! {
                    () = tx.closed() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                if last_sent.is_some_and(|t| t.elapsed() + Duration::from_millis(50) < every) {
                    continue;
                }
                let batch = rx.latest();
                let Some(wanted) = filter.apply(&batch) else { continue };
                last_sent = Some(Instant::now());
                if tx.send(Ok(wanted)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }
}
