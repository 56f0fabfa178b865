//! The gRPC surface of the coordinator (`chaos.v1.Coordinator`).

use std::{pin::Pin, sync::Arc, time::Duration};

use chaos_proto::{
    convert::{duration_from_pb, duration_to_pb, timestamp_to_pb},
    metrics::Filter,
    pb::{self, AgentHealth, coordinator_server::Coordinator},
    trust::{Caller, Role, Tls},
};
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::{
    error::CoordinatorError,
    fleet,
    gameday::GameDays,
    monitor::{Monitor, watch},
    registry::{AgentRecord, Registry},
    scenarios::{Scenarios, snapshot_event},
    store::Actor,
    validate::{Plan, RecoveryDefaults},
};

/// Metadata key a client may use to add a note to its audit rows (the CLI
/// sends its login, USER@HOST). It is recorded beside the authenticated
/// identity, never as it.
pub const NOTE_HEADER: &str = "x-chaos-note";

/// Who made a request: the identity the auth layer authenticated (the
/// certificate's name and role) and the peer address, plus the client's note.
fn actor<T>(req: &Request<T>) -> Actor {
    let caller = Caller::of(req);
    let note = req.metadata().get(NOTE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").chars().take(128).collect::<String>();
    Actor {
        text: caller.to_string(),
        name: caller.identity.as_ref().map(|i| i.name.clone()).unwrap_or_default(),
        role: caller.role().map(|r| r.to_string()).unwrap_or_default(),
        address: caller.address.clone(),
        note,
    }
}

/// An agent certificate acts for its own agent id only.
fn own_id(caller: &Caller, agent_id: &str, what: &str) -> Result<(), CoordinatorError> {
    match &caller.identity {
        Some(id) if id.role == Role::Agent && id.name != agent_id => Err(CoordinatorError::Denied(format!(
            "{what}: agent_id {agent_id:?}, but the caller is {caller}: an agent acts under its certificate's name only"
        ))),
        _ => Ok(()),
    }
}

/// Whether the live holder of an agent id is in fact gone: its address
/// answers with another instance (a restart in place). Unreachable or
/// answering as itself: still there.
async fn holder_gone(holder: &AgentRecord) -> bool {
    let mut client = holder.client.clone();
    let mut req = Request::new(pb::GetCapabilitiesRequest {});
    req.set_timeout(Duration::from_secs(1));
    match tokio::time::timeout(Duration::from_secs(1), client.get_capabilities(req)).await {
        Ok(Ok(caps)) => !holder.instance_id.is_empty() && caps.into_inner().instance_id != holder.instance_id,
        _ => false,
    }
}

/// Settings the service needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Per-agent deadline of emergency stop when the request sets none.
    pub emergency_stop_deadline: Duration,
    /// Heartbeat interval suggested to agents.
    pub heartbeat_interval: Duration,
    pub listen_address: String,
    /// Defaults of `ValidateRecovery` (the config's `recovery:`).
    pub recovery: RecoveryDefaults,
    /// Counted on `/metrics`.
    pub emergency_stops: prometheus_client::metrics::counter::Counter,
    /// The coordinator's credentials (for GetStatus); None when --insecure.
    pub tls: Option<Arc<Tls>>,
}

/// `chaos.v1.Coordinator` implementation.
pub struct CoordinatorService {
    registry: Arc<Registry>,
    scenarios: Arc<Scenarios>,
    monitor: Arc<Monitor>,
    gamedays: Arc<GameDays>,
    cfg: ServiceConfig,
    started: Instant,
    boot_id: String,
}

impl CoordinatorService {
    pub fn new(registry: Arc<Registry>, scenarios: Arc<Scenarios>, monitor: Arc<Monitor>, cfg: ServiceConfig) -> Self {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default();
        let gamedays = GameDays::new(Arc::clone(&scenarios), monitor.enabled.then(|| Arc::clone(&monitor.hub)));
        Self { registry, scenarios, monitor, gamedays, cfg, started: Instant::now(), boot_id }
    }

    fn monitoring_on(&self) -> Result<(), Status> {
        watch::refuse_when_off(&self.monitor)
    }

    /// Record a mutation in the audit log; a failed write is logged, never fatal.
    fn audit<T>(&self, actor: &Actor, action: &str, target: &str, detail: &str, result: &Result<T, Status>) {
        let outcome = match result {
            Ok(_) => "ok".to_string(),
            Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted) => {
                format!("refused: {}", s.message())
            }
            Err(s) => format!("error: {:?}: {}", s.code(), s.message()),
        };
        if let Err(e) = self.scenarios.store().audit_by(actor, action, target, detail, &outcome) {
            tracing::error!(error = %e, action, "audit write failed");
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ScenarioEvent, Status>> + Send>>;
type ValidationStream = Pin<Box<dyn Stream<Item = Result<pb::ValidationEvent, Status>> + Send>>;
type MetricEventStream = Pin<Box<dyn Stream<Item = Result<pb::MetricEvent, Status>> + Send>>;
type HeartbeatAnswers = Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[instrument(skip_all, fields(agent_id = %req.get_ref().agent_id, address = %req.get_ref().address))]
    async fn register_agent(&self, req: Request<pb::RegisterAgentRequest>) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let who = actor(&req);
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let (agent_id, address) = (r.agent_id.clone(), r.address.clone());
        // A refused twin retries on every heartbeat: its first refusal is
        // audited and logged, the repeats within its lease are not.
        let repeat = self.registry.is_contender(&r.agent_id, &r.instance_id, &r.address);
        let result = match own_id(&caller, &agent_id, "RegisterAgent") {
            Err(e) => Err(Status::from(e)),
            Ok(()) => {
                let replace = match self.registry.rival_holder(&r.agent_id, &r.instance_id, &r.address) {
                    Some(holder) => holder_gone(&holder).await,
                    None => false,
                };
                if replace {
                    info!(agent_id = %agent_id, "the previous holder of this agent id answers as another instance: replaced");
                }
                self.registry.register(r, &who.text, replace).map_err(Status::from)
            }
        };
        let repeated_refusal = matches!(&result, Err(e) if e.code() == tonic::Code::AlreadyExists) && repeat;
        if let Err(e) = &result
            && e.code() == tonic::Code::AlreadyExists
        {
            if repeat {
                tracing::debug!(agent_id = %agent_id, address = %address, "duplicate agent id refused again");
            } else {
                tracing::warn!(agent_id = %agent_id, address = %address, refusal = %e.message(), "duplicate agent id refused");
            }
        }
        if !repeated_refusal {
            self.audit(&who, "RegisterAgent", &agent_id, &address, &result);
        }
        let armed = result?;
        info!(armed, "agent registered");
        // Faults of scenarios that are not running any more (a coordinator
        // crash between apply and revert) are reverted now.
        tokio::spawn(Arc::clone(&self.scenarios).revert_orphans(agent_id, address));
        Ok(Response::new(pb::RegisterAgentResponse {
            armed,
            heartbeat_interval: Some(duration_to_pb(self.cfg.heartbeat_interval)),
            coordinator_pid: std::process::id(),
            coordinator_boot_id: self.boot_id.clone(),
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        own_id(&Caller::of(&req), &req.get_ref().agent_id, "Heartbeat")?;
        let armed = self.registry.heartbeat(req.get_ref(), false)?;
        Ok(Response::new(pb::HeartbeatResponse { armed }))
    }

    type HeartbeatStreamStream = HeartbeatAnswers;

    async fn heartbeat_stream(&self, req: Request<tonic::Streaming<pb::HeartbeatRequest>>) -> Result<Response<HeartbeatAnswers>, Status> {
        let caller = Caller::of(&req);
        let state = (req.into_inner(), caller, Arc::clone(&self.registry));
        // Answered in line, one per beat: a beat costs a frame each way, no task or channel.
        let answers = futures::stream::unfold(Some(state), |state| async move {
            let (mut beats, caller, registry) = state?;
            let beat = match beats.message().await {
                Ok(Some(beat)) => beat,
                // The agent closed its side.
                Ok(None) => return None,
                // A beat the edge refused (naming the field), or the connection gone: the last item.
                Err(status) => return Some((Err(status), None)),
            };
            let answer = own_id(&caller, &beat.agent_id, "HeartbeatStream")
                .and_then(|()| registry.heartbeat(&beat, true))
                .map(|armed| pb::HeartbeatResponse { armed })
                .map_err(Status::from);
            // A refusal is the stream's last message: its status.
            let next = answer.is_ok().then_some((beats, caller, registry));
            Some((answer, next))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn list_agents(&self, _req: Request<pb::ListAgentsRequest>) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let now = Instant::now();
        let agents = self.registry.agents().iter().map(|a| a.to_pb(now)).collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    #[instrument(skip_all, fields(reason = %req.get_ref().reason))]
    async fn emergency_stop(&self, req: Request<pb::EmergencyStopRequest>) -> Result<Response<pb::EmergencyStopResponse>, Status> {
        let who = actor(&req);
        let r = req.into_inner();
        let deadline = match r.deadline.as_ref() {
            None => self.cfg.emergency_stop_deadline,
            Some(d) => duration_from_pb(d)
                .filter(|d| !d.is_zero() && *d <= Duration::from_secs(60))
                .ok_or_else(|| CoordinatorError::invalid("deadline", format!("must be in (0s, 60s], got {}s", d.seconds)))?,
        };
        let reason = if r.reason.is_empty() { "emergency stop (no reason given)".to_string() } else { r.reason };
        self.cfg.emergency_stops.inc();
        // A GameDay ends first, so it picks nothing while the fleet is stopped.
        self.gamedays.signal(pb::GameDayState::Aborted, &format!("emergency stop: {reason}"));
        let resp = fleet::emergency_stop(&self.registry, &self.scenarios, &reason, deadline).await;
        let detail = format!(
            "{reason}: {} agent(s) reached, {} not, {} fault(s) reverted, {} failed, {} still reverting{}",
            resp.agents_reached,
            resp.agents_unreached,
            resp.faults_reverted,
            resp.faults_failed,
            resp.faults_in_progress,
            if resp.complete { "" } else { " (INCOMPLETE)" }
        );
        self.audit(&who, "EmergencyStop", "fleet", &detail, &Ok::<(), Status>(()));
        Ok(Response::new(resp))
    }

    #[instrument(skip_all, fields(reason = %req.get_ref().reason))]
    async fn arm(&self, req: Request<pb::ArmRequest>) -> Result<Response<pb::ArmResponse>, Status> {
        let who = actor(&req);
        let reason = req.into_inner().reason;
        let resp = fleet::arm(&self.registry, &reason, self.cfg.emergency_stop_deadline, self.scenarios.policy().fanout_parallelism).await;
        self.audit(&who, "Arm", "fleet", &reason, &Ok::<(), Status>(()));
        Ok(Response::new(resp))
    }

    async fn get_status(&self, _req: Request<pb::GetStatusRequest>) -> Result<Response<pb::CoordinatorStatus>, Status> {
        let now = Instant::now();
        let agents = self.registry.agents();
        let count = |h: AgentHealth| u32::try_from(agents.iter().filter(|a| a.health(now) == h).count()).unwrap_or(u32::MAX);
        let arm = self.registry.arm_state();
        let (running, queued) = self.scenarios.counts();
        Ok(Response::new(pb::CoordinatorStatus {
            scenarios_running: running as u32,
            scenarios_queued: queued as u32,
            max_concurrent_scenarios: self.scenarios.policy().max_concurrent as u32,
            blast_radius_limit: self.scenarios.policy().blast_radius_limit,
            version: chaos_proto::VERSION.to_string(),
            armed: arm.armed,
            disarmed_reason: arm.disarmed_reason,
            disarmed_at: arm.disarmed_at.map(timestamp_to_pb),
            agents_total: u32::try_from(agents.len()).unwrap_or(u32::MAX),
            agents_healthy: count(AgentHealth::Healthy),
            agents_late: count(AgentHealth::Late),
            agents_lost: count(AgentHealth::Lost),
            active_faults: agents
                .iter()
                .filter(|a| a.health(now) != AgentHealth::Lost)
                .fold(0u32, |n, a| n.saturating_add(a.active_faults)),
            uptime: Some(duration_to_pb(self.started.elapsed())),
            listen_address: self.cfg.listen_address.clone(),
            tls_identity: self.cfg.tls.as_ref().map(|t| t.identity().uri()).unwrap_or_default(),
            tls_not_after: self.cfg.tls.as_ref().map(|t| timestamp_to_pb(t.current().not_after)),
        }))
    }

    #[instrument(skip_all, fields(dry_run = req.get_ref().dry_run))]
    async fn create_scenario(&self, req: Request<pb::CreateScenarioRequest>) -> Result<Response<pb::CreateScenarioResponse>, Status> {
        let who = actor(&req);
        let r = req.into_inner();
        let spec = r.spec.ok_or_else(|| Status::from(CoordinatorError::invalid("spec", "is required")))?;
        let detail = spec.fault.as_ref().map(chaos_proto::spec::describe).unwrap_or_default();
        let result = self.scenarios.create(spec, r.dry_run, &who.text).map_err(Status::from);
        if !r.dry_run {
            let target = result.as_ref().ok().and_then(|c| c.scenario.as_ref()).map(|s| s.id.clone()).unwrap_or_else(|| "-".into());
            self.audit(&who, "CreateScenario", &target, &detail, &result);
        }
        Ok(Response::new(result?))
    }

    async fn list_scenarios(&self, req: Request<pb::ListScenariosRequest>) -> Result<Response<pb::ListScenariosResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(pb::ListScenariosResponse { scenarios: self.scenarios.list(&r.states, r.limit)? }))
    }

    async fn get_scenario(&self, req: Request<pb::GetScenarioRequest>) -> Result<Response<pb::Scenario>, Status> {
        Ok(Response::new(self.scenarios.get(&req.into_inner().id)?))
    }

    #[instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn stop_scenario(&self, req: Request<pb::StopScenarioRequest>) -> Result<Response<pb::Scenario>, Status> {
        let who = actor(&req);
        let r = req.into_inner();
        let result = self.scenarios.stop(&r.id, &r.reason).await.map_err(Status::from);
        self.audit(&who, "StopScenario", &r.id, &r.reason, &result);
        Ok(Response::new(result?))
    }

    type WatchScenarioStream = EventStream;

    type ValidateRecoveryStream = ValidationStream;

    #[instrument(skip_all)]
    async fn validate_recovery(&self, req: Request<pb::ValidateRecoveryRequest>) -> Result<Response<ValidationStream>, Status> {
        let who = actor(&req);
        let r = req.get_ref();
        // Unknown scenarios are refused before the stream starts.
        let checked = Plan::from_request(r, self.cfg.recovery).and_then(|plan| {
            r.scenario_ids.iter().try_for_each(|id| self.scenarios.get(id).map(|_| ()).map_err(Status::from)).map(|_| plan)
        });
        // It reads a file on this host for the client: who asked for which is on record.
        let acks = r.consistency.as_ref().map(|c| format!("acks_file {}", c.acks_file)).unwrap_or_default();
        self.audit(&who, "ValidateRecovery", &r.scenario_ids.join(","), &acks, &checked);
        let plan = checked?;
        let (tx, out) = tokio::sync::mpsc::channel(64);
        let scenarios = Arc::clone(&self.scenarios);
        tokio::spawn(async move {
            // A panic (a bug) still ends the stream with a verdict that says so.
            if let Err(why) = chaos_proto::serve::catch_panic(crate::validate::run(plan, scenarios, tx.clone())).await {
                let _ = tx.send(Ok(crate::validate::internal_failure(&why))).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    async fn watch_scenario(&self, req: Request<pb::WatchScenarioRequest>) -> Result<Response<EventStream>, Status> {
        let id = req.into_inner().id;
        let (now, rx) = self.scenarios.watch(&id)?;
        let (tx, out) = tokio::sync::mpsc::channel(64);
        let scenarios = Arc::clone(&self.scenarios);
        tokio::spawn(async move {
            let message = format!("current state: {}", now.reason);
            let first = snapshot_event(now, message);
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let Some(mut rx) = rx else { return };
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    // A slow watcher skipped events: give it the state of now.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => match scenarios.get(&id) {
                        Ok(sc) => snapshot_event(sc, format!("{n} event(s) skipped (slow watcher); current state")),
                        Err(_) => return,
                    },
                };
                let done = crate::scenarios::is_final(ev.state);
                if tx.send(Ok(ev)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    type StreamMetricsStream = MetricEventStream;

    /// Served from shared bytes by [`watch::SharedStreamMetrics`] in front
    /// of this server; here the same frames are decoded, for a caller of
    /// the generated server alone.
    async fn stream_metrics(&self, req: Request<pb::StreamMetricsRequest>) -> Result<Response<MetricEventStream>, Status> {
        self.monitoring_on()?;
        let frames = watch::watch(&self.monitor, req.get_ref());
        let events = frames.map(|f| f.and_then(|b| pb::MetricEvent::decode(b).map_err(|e| Status::internal(format!("metric event: {e}")))));
        Ok(Response::new(Box::pin(events)))
    }

    async fn get_metrics(&self, req: Request<pb::GetMetricsRequest>) -> Result<Response<pb::GetMetricsResponse>, Status> {
        self.monitoring_on()?;
        let r = req.into_inner();
        if r.history > 3600 {
            return Err(CoordinatorError::invalid("history", format!("must be at most 3600, got {}", r.history)).into());
        }
        let (batches, sources) = self.monitor.hub.snapshot(&Filter::from_get(&r), r.history as usize);
        Ok(Response::new(pb::GetMetricsResponse { batches, firing: self.monitor.alerts.firing(), sources }))
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Result<Response<pb::ListAuditResponse>, Status> {
        let r = req.into_inner();
        let since = r.since.as_ref().map(chaos_proto::convert::timestamp_from_pb);
        let entries =
            self.scenarios.store().list_audit(since, if r.limit == 0 { 100 } else { r.limit }).map_err(CoordinatorError::store)?;
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }

    async fn start_game_day(&self, req: Request<pb::StartGameDayRequest>) -> Result<Response<pb::GameDay>, Status> {
        let who = actor(&req);
        let spec = req.into_inner().spec.ok_or_else(|| CoordinatorError::invalid("spec", "is required"))?;
        let result = self.gamedays.start(spec, &who).map_err(Status::from);
        if let Err(e) = &result {
            self.audit(&who, "StartGameDay", "gameday", "", &Err::<(), _>(e.clone()));
        }
        Ok(Response::new(result?))
    }

    async fn stop_game_day(&self, req: Request<pb::StopGameDayRequest>) -> Result<Response<pb::GameDay>, Status> {
        let who = actor(&req);
        let reason = req.into_inner().reason;
        let reason = if reason.is_empty() { format!("stopped by {}", who.text) } else { format!("stopped by {}: {reason}", who.text) };
        Ok(Response::new(self.gamedays.stop(pb::GameDayState::Stopped, &reason).await?))
    }

    async fn get_game_day(&self, req: Request<pb::GetGameDayRequest>) -> Result<Response<pb::GameDay>, Status> {
        Ok(Response::new(self.gamedays.get(req.into_inner().history as usize)?))
    }

    async fn record_experiment_run(&self, req: Request<pb::ExperimentRun>) -> Result<Response<pb::ExperimentRun>, Status> {
        let who = actor(&req);
        let run = req.into_inner();
        let result = if run.id.is_empty() || run.id.len() > 200 {
            Err(CoordinatorError::invalid("id", format!("must be 1..200 characters, got {}", run.id.len())).into())
        } else if !["HELD", "DEVIATED", "ABORTED"].contains(&run.verdict.as_str()) {
            Err(CoordinatorError::invalid("verdict", format!("must be HELD, DEVIATED or ABORTED, got {:?}", run.verdict)).into())
        } else {
            self.scenarios.store().record_run(&run).map_err(|e| CoordinatorError::store(e).into())
        };
        self.audit(&who, "RecordExperimentRun", &run.id, &format!("{}: {} ({})", run.experiment, run.verdict, run.report_dir), &result);
        result?;
        Ok(Response::new(run))
    }

    async fn list_experiment_runs(
        &self,
        req: Request<pb::ListExperimentRunsRequest>,
    ) -> Result<Response<pb::ListExperimentRunsResponse>, Status> {
        let r = req.into_inner();
        let runs =
            self.scenarios.store().list_runs(if r.limit == 0 { 50 } else { r.limit }, &r.experiment).map_err(CoordinatorError::store)?;
        Ok(Response::new(pb::ListExperimentRunsResponse { runs }))
    }
}
