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
    spec,
    trust::{ClientTls, Dial, Expect},
};
use tokio::time::Instant;
use tonic::transport::Channel;

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
    /// The agent process holding this id (random at each agent start).
    pub instance_id: String,
    /// Who registered it (certificate identity and address).
    pub registered_by: String,
    /// Its last heartbeat came on a `HeartbeatStream`.
    pub heartbeat_streamed: bool,
    /// A lazily connecting channel to the agent's gRPC server (with TLS,
    /// it accepts only a server whose certificate is this agent's).
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

    /// Wall-clock time by which the agent's own lease reverts its faults
    /// (`None` if it cannot be told: the sum overflows a time).
    pub fn lease_revert_by(&self) -> Option<SystemTime> {
        self.last_seen_wall.checked_add(self.lease)
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
            instance_id: self.instance_id.clone(),
            registered_by: self.registered_by.clone(),
            heartbeat_streamed: self.heartbeat_streamed,
        }
    }
}

/// A process refused as a duplicate of a live agent id. It may hold
/// faults (from before it was refused) until its own lease reverts them,
/// so emergency stop asks it too while that lease could run.
#[derive(Clone)]
pub struct Contender {
    pub agent_id: String,
    pub instance_id: String,
    pub address: String,
    pub lease: Duration,
    pub seen: Instant,
    pub seen_wall: SystemTime,
    pub client: AgentClient<Channel>,
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
    contenders: Vec<Contender>,
    arm: ArmState,
}

/// Registry of agents + armed flag, behind one lock (short critical sections only).
pub struct Registry {
    inner: Mutex<Inner>,
    connect_timeout: Duration,
    /// Where the armed flag is persisted; `None` keeps it in memory only (tests).
    store: Option<ArmStore>,
    /// Held while the armed flag is written (never with `inner` held):
    /// writes run one at a time, each with the flag as it is then.
    persisting: Mutex<()>,
    /// How the coordinator dials agents.
    tls: ClientTls,
}

impl Registry {
    /// A registry starting from `arm` (loaded from `store` by the caller).
    pub fn new(connect_timeout: Duration, arm: ArmState, store: Option<ArmStore>, tls: ClientTls) -> Self {
        Self {
            inner: Mutex::new(Inner { agents: BTreeMap::new(), contenders: Vec::new(), arm }),
            connect_timeout,
            store,
            persisting: Mutex::new(()),
            tls,
        }
    }

    /// A lazily connecting client to agent `agent_id` at `address`.
    pub fn dial(&self, agent_id: &str, address: &str) -> Result<AgentClient<Channel>, CoordinatorError> {
        let dial = Dial { connect_timeout: self.connect_timeout, timeout: None };
        chaos_proto::trust::channel(address, &self.tls, Expect::agent(Some(agent_id)), dial)
            .map(AgentClient::new)
            .map_err(|e| CoordinatorError::invalid("address", e.to_string()))
    }

    /// Persist the armed state as it is now; a failure is logged loudly but
    /// never blocks a disarm (stopping faults matters more than
    /// remembering it). Called after each change, with `inner` let go: the
    /// flag is read once this call is the only writer, so when an arm and
    /// a disarm race, the last write carries the state the registry holds.
    fn persist(&self) {
        let Some(store) = &self.store else { return };
        let _writer = self.persisting.lock().unwrap_or_else(|p| p.into_inner());
        let arm = self.arm_state();
        if let Err(e) = store.save(&arm) {
            tracing::error!(error = %e, armed = arm.armed, "could not persist the armed state; a coordinator restart would forget it");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live holder of `agent_id` when it is another process than the
    /// one described (other instance or address): who a registration would
    /// displace.
    pub fn rival_holder(&self, agent_id: &str, instance_id: &str, address: &str) -> Option<AgentRecord> {
        let g = self.lock();
        let old = g.agents.get(agent_id)?;
        let other = old.instance_id != instance_id || old.address != address;
        (other && old.health(Instant::now()) != AgentHealth::Lost).then(|| old.clone())
    }

    /// Add or refresh an agent; `registered_by` is the caller as the audit
    /// shows it. While another process holds the id with a live lease the
    /// registration is refused (ALREADY_EXISTS, naming the holder) and the
    /// refused process is remembered for emergency stop, unless
    /// `replace_live` (the holder was found gone). Returns the armed flag.
    pub fn register(&self, req: pb::RegisterAgentRequest, registered_by: &str, replace_live: bool) -> Result<bool, CoordinatorError> {
        spec::validate_name("agent_id", &req.agent_id, spec::MAX_AGENT_ID_LEN).map_err(CoordinatorError::from)?;
        let lease = match req.lease_duration.as_ref() {
            None => DEFAULT_AGENT_LEASE,
            Some(d) => duration_from_pb(d).filter(|d| (spec::MIN_AGENT_LEASE..=spec::MAX_AGENT_LEASE).contains(d)).ok_or_else(|| {
                CoordinatorError::invalid(
                    "lease_duration",
                    format!(
                        "must be in {}..={} (an agent's --lease), got {}s {}ns",
                        humantime::format_duration(spec::MIN_AGENT_LEASE),
                        humantime::format_duration(spec::MAX_AGENT_LEASE),
                        d.seconds,
                        d.nanos
                    ),
                )
            })?,
        };
        let scheme = if self.tls.is_tls() { "https" } else { "http" };
        if !req.address.starts_with(&format!("{scheme}://")) {
            return Err(CoordinatorError::invalid(
                "address",
                format!(
                    "must be a URL like {scheme}://HOST:PORT (this coordinator dials agents with{} TLS), got {:?}",
                    if self.tls.is_tls() { "" } else { "out" },
                    req.address
                ),
            ));
        }
        let client = self.dial(&req.agent_id, &req.address)?;
        let mut g = self.lock();
        let now = Instant::now();
        g.contenders.retain(|c| now.saturating_duration_since(c.seen) < c.lease);
        if let Some(old) = g.agents.get(&req.agent_id)
            && (old.instance_id != req.instance_id || old.address != req.address)
            && old.health(now) != AgentHealth::Lost
            && !replace_live
        {
            let age = now.saturating_duration_since(old.last_seen);
            let err = CoordinatorError::Duplicate(format!(
                "agent id {:?} is held by a live agent at {} (instance {}, last heard {} ago, lease {}); this process ({} at {}) is refused: \
                 give each host its own agent id and certificate. If that agent is gone, this one is accepted once its lease runs out (in {})",
                req.agent_id,
                old.address,
                short(&old.instance_id),
                humantime::format_duration(Duration::from_millis(age.as_millis() as u64)),
                humantime::format_duration(old.lease),
                short(&req.instance_id),
                req.address,
                humantime::format_duration(Duration::from_millis(old.lease.saturating_sub(age).as_millis() as u64)),
            ));
            let c = Contender {
                agent_id: req.agent_id.clone(),
                instance_id: req.instance_id.clone(),
                address: req.address.clone(),
                lease,
                seen: now,
                seen_wall: SystemTime::now(),
                client,
            };
            g.contenders.retain(|x| !(x.agent_id == c.agent_id && x.instance_id == c.instance_id && x.address == c.address));
            g.contenders.push(c);
            return Err(err);
        }
        let client = match g.agents.get(&req.agent_id) {
            Some(old) if old.address == req.address => old.client.clone(),
            _ => client,
        };
        g.contenders.retain(|c| !(c.agent_id == req.agent_id && c.instance_id == req.instance_id));
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
            instance_id: req.instance_id,
            registered_by: registered_by.to_string(),
            heartbeat_streamed: false,
            client,
        };
        g.agents.insert(req.agent_id, rec);
        Ok(g.arm.armed)
    }

    /// Renew an agent's lease. Returns the fleet's armed flag. A heartbeat
    /// from another instance than the holder is refused (ALREADY_EXISTS).
    pub fn heartbeat(&self, req: &pb::HeartbeatRequest, streamed: bool) -> Result<bool, CoordinatorError> {
        let mut g = self.lock();
        let armed = g.arm.armed;
        let rec = g.agents.get_mut(&req.agent_id).ok_or_else(|| CoordinatorError::UnknownAgent(req.agent_id.clone()))?;
        if rec.instance_id != req.instance_id {
            return Err(CoordinatorError::Duplicate(format!(
                "agent id {:?} is now held by instance {} at {}; this one ({}) is not its holder: register again",
                req.agent_id,
                short(&rec.instance_id),
                rec.address,
                short(&req.instance_id)
            )));
        }
        if req.active_faults > spec::MAX_ACTIVE_FAULTS {
            return Err(CoordinatorError::invalid(
                "active_faults",
                format!("must be at most {} (an agent's limit), got {}", spec::MAX_ACTIVE_FAULTS, req.active_faults),
            ));
        }
        rec.last_seen = Instant::now();
        rec.last_seen_wall = SystemTime::now();
        rec.active_faults = req.active_faults;
        rec.heartbeat_streamed = streamed;
        Ok(armed)
    }

    /// Whether this process (id, instance, address) was already refused as
    /// a duplicate within its lease.
    pub fn is_contender(&self, agent_id: &str, instance_id: &str, address: &str) -> bool {
        let now = Instant::now();
        self.lock().contenders.iter().any(|c| {
            c.agent_id == agent_id
                && c.instance_id == instance_id
                && c.address == address
                && now.saturating_duration_since(c.seen) < c.lease
        })
    }

    /// Processes refused as duplicates whose own lease could still run.
    pub fn contenders(&self) -> Vec<Contender> {
        let now = Instant::now();
        self.lock().contenders.iter().filter(|c| now.saturating_duration_since(c.seen) < c.lease).cloned().collect()
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
        self.dial(agent_id, address).ok()
    }

    pub fn agents(&self) -> Vec<AgentRecord> {
        self.lock().agents.values().cloned().collect()
    }

    pub fn arm_state(&self) -> ArmState {
        self.lock().arm.clone()
    }

    pub fn disarm(&self, reason: &str) {
        let arm = ArmState { armed: false, disarmed_reason: reason.to_string(), disarmed_at: Some(SystemTime::now()) };
        self.lock().arm = arm;
        self.persist();
    }

    pub fn arm(&self) {
        self.lock().arm.armed = true;
        self.persist();
    }
}

#[cfg(test)]
impl Registry {
    /// Put a record in as is, past every check of [`Registry::register`]:
    /// for tests of what the rest does with a record no check foresaw.
    pub(crate) fn insert_unchecked(&self, rec: AgentRecord) {
        self.lock().agents.insert(rec.agent_id.clone(), rec);
    }
}

/// The first 8 characters of an instance id, for messages.
fn short(id: &str) -> &str {
    if id.is_empty() { "(none)" } else { &id[..id.len().min(8)] }
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
            instance_id: format!("{id}-instance-1"),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn leases_ids_and_fault_counts_at_the_edge_of_their_types_are_refused_by_name() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None, ClientTls::Insecure);
        let field = |e: CoordinatorError| match e {
            CoordinatorError::Invalid { field, .. } => field,
            other => panic!("not INVALID_ARGUMENT: {other}"),
        };
        // A lease no time can hold once made every emergency stop panic.
        for seconds in [i64::MAX / 2, 3601, 0] {
            assert_eq!(field(r.register(reg("a", seconds), "t", false).expect_err("lease")), "lease_duration", "{seconds}s");
        }
        for id in ["", "a\nforged log line", "a b", ".hidden", &"x".repeat(300)] {
            assert_eq!(field(r.register(reg(id, 10), "t", false).expect_err("id")), "agent_id", "{id:?}");
        }
        assert!(r.agents().is_empty());
        r.register(reg("a", 3600), "t", false).expect("the longest lease");
        let hb = |n| pb::HeartbeatRequest { agent_id: "a".into(), active_faults: n, lease_lost: false, instance_id: "a-instance-1".into() };
        assert_eq!(field(r.heartbeat(&hb(u32::MAX), false).expect_err("count")), "active_faults");
        r.heartbeat(&hb(spec::MAX_ACTIVE_FAULTS), false).expect("the most faults an agent holds");
        assert_eq!(r.agents()[0].active_faults, spec::MAX_ACTIVE_FAULTS);
    }

    #[tokio::test(start_paused = true)]
    async fn health_follows_the_lease() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None, ClientTls::Insecure);
        assert!(r.register(reg("a", 10), "t", false).expect("register"));
        let age = |r: &Registry| r.agents()[0].health(Instant::now());
        assert_eq!(age(&r), AgentHealth::Healthy);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(age(&r), AgentHealth::Late);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(age(&r), AgentHealth::Lost);
        r.heartbeat(
            &pb::HeartbeatRequest { agent_id: "a".into(), active_faults: 2, lease_lost: false, instance_id: "a-instance-1".into() },
            true,
        )
        .expect("hb");
        assert_eq!(age(&r), AgentHealth::Healthy);
        assert_eq!(r.agents()[0].active_faults, 2);
        assert!(r.agents()[0].to_pb(Instant::now()).heartbeat_streamed, "a heartbeat that came on the stream says so");
    }

    #[tokio::test]
    async fn unknown_heartbeat_and_bad_registration_are_refused() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None, ClientTls::Insecure);
        let e = r.heartbeat(&pb::HeartbeatRequest { agent_id: "ghost".into(), ..Default::default() }, false).expect_err("unknown");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::NotFound);
        let mut bad = reg("a", 10);
        bad.address = "127.0.0.1:5".into();
        let e = r.register(bad, "t", false).expect_err("bad address");
        assert!(e.to_string().contains("address") && e.to_string().contains("127.0.0.1:5"), "{e}");
        let e = r.register(reg("", 10), "t", false).expect_err("no id");
        assert!(e.to_string().contains("agent_id"), "{e}");
    }

    #[tokio::test]
    async fn disarm_is_reported_to_agents() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None, ClientTls::Insecure);
        r.register(reg("a", 10), "t", false).expect("register");
        r.disarm("drill");
        assert!(
            !r.heartbeat(&pb::HeartbeatRequest { agent_id: "a".into(), instance_id: "a-instance-1".into(), ..Default::default() }, false)
                .expect("hb")
        );
        assert!(!r.register(reg("b", 10), "t", false).expect("register"));
        assert_eq!(r.arm_state().disarmed_reason, "drill");
        r.arm();
        assert!(
            r.heartbeat(&pb::HeartbeatRequest { agent_id: "a".into(), instance_id: "a-instance-1".into(), ..Default::default() }, false)
                .expect("hb")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_live_owner_per_agent_id() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None, ClientTls::Insecure);
        r.register(reg("a", 10), "t", false).expect("first");
        // A twin: same id, another process at another address.
        let mut twin = reg("a", 10);
        twin.instance_id = "twin".into();
        twin.address = "http://127.0.0.1:2".into();
        let e = r.register(twin.clone(), "t", false).expect_err("live holder");
        assert_eq!(tonic::Status::from(CoordinatorError::Duplicate(String::new())).code(), tonic::Code::AlreadyExists);
        let msg = e.to_string();
        assert!(msg.contains("http://127.0.0.1:1") && msg.contains("lease 10s") && msg.contains("http://127.0.0.1:2"), "{msg}");
        assert_eq!(r.agents()[0].address, "http://127.0.0.1:1", "the holder keeps the id");
        let c = r.contenders();
        assert_eq!(c.len(), 1, "the refused twin is remembered for emergency stop");
        assert_eq!(c[0].address, "http://127.0.0.1:2");
        // The twin's heartbeats are refused too, the holder's are not.
        let hb = |i: &str| pb::HeartbeatRequest { agent_id: "a".into(), instance_id: i.into(), ..Default::default() };
        assert!(r.heartbeat(&hb("twin"), false).is_err());
        assert!(r.heartbeat(&hb("a-instance-1"), false).is_ok());
        // The same process registering again is fine.
        r.register(reg("a", 10), "t", false).expect("same instance");
        // Once the holder's lease is over, the twin takes the id; the old holder's heartbeats are then refused.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(r.contenders().is_empty(), "a contender is forgotten after its own lease");
        r.register(twin.clone(), "t", false).expect("holder lost");
        assert!(r.heartbeat(&hb("a-instance-1"), false).expect_err("displaced").to_string().contains("twin"));
        // A holder found gone (its address answers with another instance) can be replaced at once.
        r.register(reg("a", 10), "t", true).expect("replace");
        assert_eq!(r.agents()[0].instance_id, "a-instance-1");
    }

    #[tokio::test]
    async fn addresses_follow_the_tls_mode() {
        let r = Registry::new(Duration::from_millis(100), ArmState { armed: true, ..Default::default() }, None, ClientTls::Insecure);
        let mut https = reg("a", 10);
        https.address = "https://127.0.0.1:1".into();
        let e = r.register(https, "t", false).expect_err("TLS address on an insecure coordinator").to_string();
        assert!(e.contains("http://HOST:PORT"), "{e}");
    }
}
