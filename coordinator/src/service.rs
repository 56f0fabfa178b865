//! The gRPC surface of the coordinator (`chaos.v1.Coordinator`).

use std::{pin::Pin, sync::Arc, time::Duration};

use chaos_proto::{
    convert::{duration_from_pb, duration_to_pb, timestamp_to_pb},
    pb::{self, AgentHealth, coordinator_server::Coordinator},
};
use futures::Stream;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::{error::CoordinatorError, fleet, registry::Registry};

/// Settings the service needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Per-agent deadline of emergency stop when the request sets none.
    pub emergency_stop_deadline: Duration,
    /// Heartbeat interval suggested to agents.
    pub heartbeat_interval: Duration,
    pub listen_address: String,
}

/// `chaos.v1.Coordinator` implementation.
pub struct CoordinatorService {
    registry: Arc<Registry>,
    cfg: ServiceConfig,
    started: Instant,
    boot_id: String,
}

impl CoordinatorService {
    pub fn new(registry: Arc<Registry>, cfg: ServiceConfig) -> Self {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default();
        Self { registry, cfg, started: Instant::now(), boot_id }
    }
}

fn scenarios_pending() -> Status {
    CoordinatorError::Unimplemented("scenarios are not implemented by this coordinator version (coordinator-safety work pending)".into())
        .into()
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ScenarioEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[instrument(skip_all, fields(agent_id = %req.get_ref().agent_id, address = %req.get_ref().address))]
    async fn register_agent(&self, req: Request<pb::RegisterAgentRequest>) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let armed = self.registry.register(req.into_inner())?;
        info!(armed, "agent registered");
        Ok(Response::new(pb::RegisterAgentResponse {
            armed,
            heartbeat_interval: Some(duration_to_pb(self.cfg.heartbeat_interval)),
            coordinator_pid: std::process::id(),
            coordinator_boot_id: self.boot_id.clone(),
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let armed = self.registry.heartbeat(req.get_ref())?;
        Ok(Response::new(pb::HeartbeatResponse { armed }))
    }

    async fn list_agents(&self, _req: Request<pb::ListAgentsRequest>) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let now = Instant::now();
        let agents = self.registry.agents().iter().map(|a| a.to_pb(now)).collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    #[instrument(skip_all, fields(reason = %req.get_ref().reason))]
    async fn emergency_stop(&self, req: Request<pb::EmergencyStopRequest>) -> Result<Response<pb::EmergencyStopResponse>, Status> {
        let r = req.into_inner();
        let deadline = match r.deadline.as_ref() {
            None => self.cfg.emergency_stop_deadline,
            Some(d) => duration_from_pb(d)
                .filter(|d| !d.is_zero() && *d <= Duration::from_secs(60))
                .ok_or_else(|| CoordinatorError::invalid("deadline", format!("must be in (0s, 60s], got {}s", d.seconds)))?,
        };
        let reason = if r.reason.is_empty() { "emergency stop (no reason given)".to_string() } else { r.reason };
        Ok(Response::new(fleet::emergency_stop(&self.registry, &reason, deadline).await))
    }

    #[instrument(skip_all, fields(reason = %req.get_ref().reason))]
    async fn arm(&self, req: Request<pb::ArmRequest>) -> Result<Response<pb::ArmResponse>, Status> {
        let reason = req.into_inner().reason;
        Ok(Response::new(fleet::arm(&self.registry, &reason, self.cfg.emergency_stop_deadline).await))
    }

    async fn get_status(&self, _req: Request<pb::GetStatusRequest>) -> Result<Response<pb::CoordinatorStatus>, Status> {
        let now = Instant::now();
        let agents = self.registry.agents();
        let count = |h: AgentHealth| u32::try_from(agents.iter().filter(|a| a.health(now) == h).count()).unwrap_or(u32::MAX);
        let arm = self.registry.arm_state();
        Ok(Response::new(pb::CoordinatorStatus {
            version: chaos_proto::VERSION.to_string(),
            armed: arm.armed,
            disarmed_reason: arm.disarmed_reason,
            disarmed_at: arm.disarmed_at.map(timestamp_to_pb),
            agents_total: u32::try_from(agents.len()).unwrap_or(u32::MAX),
            agents_healthy: count(AgentHealth::Healthy),
            agents_late: count(AgentHealth::Late),
            agents_lost: count(AgentHealth::Lost),
            active_faults: agents.iter().filter(|a| a.health(now) != AgentHealth::Lost).map(|a| a.active_faults).sum(),
            uptime: Some(duration_to_pb(self.started.elapsed())),
            listen_address: self.cfg.listen_address.clone(),
        }))
    }

    async fn create_scenario(&self, _req: Request<pb::CreateScenarioRequest>) -> Result<Response<pb::Scenario>, Status> {
        Err(scenarios_pending())
    }

    async fn list_scenarios(&self, _req: Request<pb::ListScenariosRequest>) -> Result<Response<pb::ListScenariosResponse>, Status> {
        Err(scenarios_pending())
    }

    async fn get_scenario(&self, _req: Request<pb::GetScenarioRequest>) -> Result<Response<pb::Scenario>, Status> {
        Err(scenarios_pending())
    }

    async fn stop_scenario(&self, _req: Request<pb::StopScenarioRequest>) -> Result<Response<pb::Scenario>, Status> {
        Err(scenarios_pending())
    }

    type WatchScenarioStream = EventStream;

    async fn watch_scenario(&self, _req: Request<pb::WatchScenarioRequest>) -> Result<Response<EventStream>, Status> {
        Err(scenarios_pending())
    }
}
