//! The registry: which agents exist, how to reach them, how fresh their
//! lease is, and the fleet's armed state. Time is tokio time, so lease
//! ageing is unit-tested with `tokio::time::pause`.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use chaos_proto::{
    convert::{duration_from_pb, duration_to_pb, timestamp_to_pb},
    pb::{self, AgentHealth, agent_client::AgentClient},
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::{armstore::ArmStore, error::CoordinatorError};

/// Lease assumed for an agent that did not say (the agent's own default).
pub const DEFAULT_AGENT_LEASE: Duration = Duration::from_secs(10);

/// One registered agent.
#[derive(Clone)]
pub struct AgentRecord {
    pub agent_id: String,
    pub hostname: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub capabilities: Option<pb::Capabilities>,
    pub lease: Duration,
    pub registered_at: SystemTime,
    pub last_seen: Instant,
    pub last_seen_wall: SystemTime,
    pub active_faults: u32,
    /// A lazily connecting channel to the agent's gRPC server.
    pub client: AgentClient<Channel>,
}

impl AgentRecord {
    pub fn health(&self, now: Instant) -> AgentHealth {
        let age = now.saturating_duration_since(self.last_seen);
        if age >= self.lease {
            AgentHealth::Lost
        } else if age >= self.lease / 2 {
            AgentHealth::Late
        } else {
            AgentHealth::Healthy
        }
    }

    /// Wall-clock time by which the agent's own lease reverts its faults.
    pub fn lease_revert_by(&self) -> SystemTime {
        self.last_seen_wall + self.lease
    }

    pub fn to_pb(&self, now: Instant) -> pb::AgentInfo {
        pb::AgentInfo {
            agent_id: self.agent_id.clone(),
            hostname: self.hostname.clone(),
            address: self.address.clone(),
            labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            capabilities: self.capabilities.clone(),
            health: self.health(now) as i32,
            lease_age: Some(duration_to_pb(now.saturating_duration_since(self.last_seen))),
            lease_duration: Some(duration_to_pb(self.lease)),
            registered_at: Some(timestamp_to_pb(self.registered_at)),
            last_seen_at: Some(timestamp_to_pb(self.last_seen_wall)),
            active_faults: self.active_faults,
        }
    }
}

/// The fleet's armed state.
#[derive(Debug, Clone, Default)]
pub struct ArmState {
    pub armed: bool,
    pub disarmed_reason: String,
    pub disarmed_at: Option<SystemTime>,
}

#[derive(Default)]
struct Inner {
    agents: BTreeMap<String, AgentRecord>,
    arm: ArmState,
}

/// Registry of agents + armed flag, behind one lock (short critical sections only).
pub struct Registry {
    inner: Mutex<Inner>,
    connect_timeout: Duration,
    /// Where the armed flag is persisted; `None` keeps it in memory only (tests).
    store: Option<ArmStore>,
}

impl Registry {
    /// A registry starting from `arm` (loaded from `store` by the caller).
    pub fn new(connect_timeout: Duration, arm: ArmState, store: Option<ArmStore>) -> Self {
        Self { inner: Mutex::new(Inner { agents: BTreeMap::new(), arm }), connect_timeout, store }
    }

    /// Persist the armed state; a failure is logged loudly but never blocks
    /// a disarm (stopping faults matters more than remembering it).
    fn persist(&self, arm: &ArmState) {
        if let Some(store) = &self.store
            && let Err(e) = store.save(arm)
        {
            tracing::error!(error = %e, armed = arm.armed, "could not persist the armed state; a coordinator restart would forget it");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add or refresh an agent. Returns the fleet's armed flag.
    pub fn register(&self, req: pb::RegisterAgentRequest) -> Result<bool, CoordinatorError> {
        if req.agent_id.is_empty() {
            return Err(CoordinatorError::invalid("agent_id", "must not be empty"));
        }
        if !(req.address.starts_with("http://") || req.address.starts_with("https://")) {
            return Err(CoordinatorError::invalid("address", format!("must be a URL like http://HOST:PORT, got {:?}", req.address)));
        }
        let endpoint = Endpoint::from_shared(req.address.clone())
            .map_err(|e| CoordinatorError::invalid("address", format!("{:?}: {e}", req.address)))?
            .connect_timeout(self.connect_timeout);
        let lease = req.lease_duration.as_ref().and_then(duration_from_pb).filter(|d| !d.is_zero()).unwrap_or(DEFAULT_AGENT_LEASE);
        let mut g = self.lock();
        let now = Instant::now();
        let client = match g.agents.get(&req.agent_id) {
            Some(old) if old.address == req.address => old.client.clone(),
            _ => AgentClient::new(endpoint.connect_lazy()),
        };
        let rec = AgentRecord {
            agent_id: req.agent_id.clone(),
            hostname: req.hostname,
            address: req.address,
            labels: req.labels.into_iter().collect(),
            capabilities: req.capabilities,
            lease,
            registered_at: SystemTime::now(),
            last_seen: now,
            last_seen_wall: SystemTime::now(),
            active_faults: 0,
            client,
        };
        g.agents.insert(req.agent_id, rec);
        Ok(g.arm.armed)
    }

    /// Renew an agent's lease. Returns the fleet's armed flag.
    pub fn heartbeat(&self, req: &pb::HeartbeatRequest) -> Result<bool, CoordinatorError> {
        let mut g = self.lock();
        let armed = g.arm.armed;
        let rec = g.agents.get_mut(&req.agent_id).ok_or_else(|| CoordinatorError::UnknownAgent(req.agent_id.clone()))?;
        rec.last_seen = Instant::now();
        rec.last_seen_wall = SystemTime::now();
        rec.active_faults = req.active_faults;
        Ok(armed)
    }

    /// Record an agent's fault count learned outside a heartbeat (e.g. from emergency stop).
    pub fn set_active_faults(&self, agent_id: &str, active: u32) {
        if let Some(rec) = self.lock().agents.get_mut(agent_id) {
            rec.active_faults = active;
        }
    }

    /// A client for `agent_id`: the registered one when the address still
    /// matches, else a lazily connecting one to `address` (an agent known
    /// from the store that has not re-registered yet).
    pub fn client(&self, agent_id: &str, address: &str) -> Option<AgentClient<Channel>> {
        if let Some(rec) = self.lock().agents.get(agent_id)
            && rec.address == address
        {
            return Some(rec.client.clone());
        }
        let ep = Endpoint::from_shared(address.to_string()).ok()?.connect_timeout(self.connect_timeout);
        Some(AgentClient::new(ep.connect_lazy()))
    }

    pub fn agents(&self) -> Vec<AgentRecord> {
        self.lock().agents.values().cloned().collect()
    }

    pub fn arm_state(&self) -> ArmState {
        self.lock().arm.clone()
    }

    pub fn disarm(&self, reason: &str) {
        let arm = ArmState { armed: false, disarmed_reason: reason.to_string(), disarmed_at: Some(SystemTime::now()) };
        self.lock().arm = arm.clone();
        self.persist(&arm);
    }

    pub fn arm(&self) {
        let arm = {
            let mut g = self.lock();
            g.arm.armed = true;
            g.arm.clone()
        };
        self.persist(&arm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str, lease_s: i64) -> pb::RegisterAgentRequest {
        pb::RegisterAgentRequest {
            agent_id: id.into(),
            hostname: "h".into(),
            address: "http://127.0.0.1:1".into(),
            lease_duration: Some(prost_types::Duration { seconds: lease_s, nanos: 0 }),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn health_follows_the_lease() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None);
        assert!(r.register(reg("a", 10)).expect("register"));
        let age = |r: &Registry| r.agents()[0].health(Instant::now());
        assert_eq!(age(&r), AgentHealth::Healthy);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(age(&r), AgentHealth::Late);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(age(&r), AgentHealth::Lost);
        r.heartbeat(&pb::HeartbeatRequest { agent_id: "a".into(), active_faults: 2, lease_lost: false }).expect("hb");
        assert_eq!(age(&r), AgentHealth::Healthy);
        assert_eq!(r.agents()[0].active_faults, 2);
    }

    #[tokio::test]
    async fn unknown_heartbeat_and_bad_registration_are_refused() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None);
        let e = r.heartbeat(&pb::HeartbeatRequest { agent_id: "ghost".into(), ..Default::default() }).expect_err("unknown");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::NotFound);
        let mut bad = reg("a", 10);
        bad.address = "127.0.0.1:5".into();
        let e = r.register(bad).expect_err("bad address");
        assert!(e.to_string().contains("address") && e.to_string().contains("127.0.0.1:5"), "{e}");
        let e = r.register(reg("", 10)).expect_err("no id");
        assert!(e.to_string().contains("agent_id"), "{e}");
    }

    #[tokio::test]
    async fn disarm_is_reported_to_agents() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None);
        r.register(reg("a", 10)).expect("register");
        r.disarm("drill");
        assert!(!r.heartbeat(&pb::HeartbeatRequest { agent_id: "a".into(), ..Default::default() }).expect("hb"));
        assert!(!r.register(reg("b", 10)).expect("register"));
        assert_eq!(r.arm_state().disarmed_reason, "drill");
        r.arm();
        assert!(r.heartbeat(&pb::HeartbeatRequest { agent_id: "a".into(), ..Default::default() }).expect("hb"));
    }
}
