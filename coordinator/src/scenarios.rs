//! The scenario scheduler: admission, the FIFO queue behind the concurrency
//! limit, one runner task per running scenario (apply → hold → revert), and
//! recovery after a coordinator restart.
//!
//! All state of live scenarios sits behind one mutex, and every change is
//! decided and told to watchers under it; the store (SQLite) is written
//! after the mutex is let go ([`Scenarios::flush`]), so no reader of the
//! scheduler waits on a disk write. Writes go out one at a time, each with
//! the scenario as it is when the write starts, so the last write of a
//! scenario always carries its newest state; a finished scenario stays in
//! memory until its final state is written. A scenario holds
//! a *slot* from the moment it starts until its faults are reverted.
//! Faults carry the label `chaos.scenario=ID` and the scenario id as their
//! fault id, and the agents' own TTL is the scenario's duration: if the
//! coordinator dies, the agents still revert on time.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use chaos_proto::{
    convert::{duration_from_pb, duration_to_pb, timestamp_from_pb, timestamp_to_pb},
    pb::{self, FaultState, ScenarioState, agent_client::AgentClient},
    spec::{FaultRequest, SpecError, family_of},
};
use futures::{StreamExt, stream};
use rand::{SeedableRng, rngs::StdRng};
use tokio::{
    sync::{broadcast, oneshot},
    time::Instant,
};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::{
    admission::{self, AgentView},
    error::CoordinatorError,
    policy::Policy,
    registry::Registry,
    store::{Store, state_name},
};

/// Label every scenario fault carries.
pub const SCENARIO_LABEL: &str = "chaos.scenario";

/// Timing knobs (shortened in tests).
#[derive(Debug, Clone)]
pub struct Timing {
    /// Deadline of one apply/revert/list call to an agent.
    pub call_timeout: Duration,
    /// How long reverting retries agents that did not answer.
    pub revert_window: Duration,
    pub revert_retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { call_timeout: Duration::from_secs(10), revert_window: Duration::from_secs(30), revert_retry: Duration::from_secs(1) }
    }
}

/// Per-agent changes: agent id, event message, the change.
/// An agent's answer to a scenario's revert.
enum RevertAnswer {
    /// Reverted, or not held (None).
    Done(Option<pb::Fault>),
    /// The agent's revert failed (it retries); its error and its record of the fault.
    Failed(String, pb::Fault),
}

type AgentUpdates = Vec<(String, &'static str, Box<dyn FnOnce(&mut pb::ScenarioAgent) + Send>)>;

/// Why a runner stops holding its faults.
type StopSignal = (ScenarioState, String);

struct Active {
    sc: pb::Scenario,
    events: broadcast::Sender<pb::ScenarioEvent>,
    stop: Option<oneshot::Sender<StopSignal>>,
}

impl Active {
    /// Tell the runner to end the scenario in `state` (it reverts the
    /// faults first). False when it was already told, or is gone.
    fn end(&mut self, state: ScenarioState, reason: String) -> bool {
        self.stop.take().is_some_and(|tx| tx.send((state, reason)).is_ok())
    }
}

#[derive(Default)]
struct Inner {
    active: BTreeMap<String, Active>,
    queue: VecDeque<String>,
    /// Scenarios holding a run slot (running or reverting).
    slots: BTreeSet<String>,
    /// Scenarios changed since their state was last taken for the store.
    dirty: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum RunMode {
    /// Apply, hold, revert.
    Fresh,
    /// After a coordinator restart: check what agents hold, hold, revert.
    Resume,
    /// Revert only.
    Revert(ScenarioState),
}

pub struct Scenarios {
    policy: Policy,
    registry: Arc<Registry>,
    store: Arc<Store>,
    timing: Timing,
    inner: Mutex<Inner>,
    /// Held by [`Self::flush`] while it writes to the store (never while
    /// `inner` is held): one write at a time, in the order of the states.
    writer: Mutex<()>,
    rng: Mutex<StdRng>,
}

pub use chaos_proto::spec::scenario_is_final as is_final;

fn now_pb() -> Option<prost_types::Timestamp> {
    Some(timestamp_to_pb(SystemTime::now()))
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Scenarios {
    pub fn new(policy: Policy, registry: Arc<Registry>, store: Arc<Store>, timing: Timing) -> Arc<Self> {
        Arc::new(Self {
            policy,
            registry,
            store,
            timing,
            inner: Mutex::default(),
            writer: Mutex::default(),
            rng: Mutex::new(StdRng::from_os_rng()),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (running, queued) counts.
    pub fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.slots.len(), g.queue.len())
    }

    /// The fleet as admission sees it now.
    pub fn fleet(&self) -> Vec<AgentView> {
        let now = Instant::now();
        self.registry
            .agents()
            .into_iter()
            .map(|a| AgentView {
                health: a.health(now),
                families: a
                    .capabilities
                    .as_ref()
                    .filter(|c| !c.families.is_empty())
                    .map(|c| c.families.iter().filter(|f| f.supported).map(|f| f.family.clone()).collect::<BTreeSet<_>>()),
                agent_id: a.agent_id,
                address: a.address,
                labels: a.labels,
            })
            .collect()
    }

    /// The agents running scenarios affect now.
    pub fn busy_agents(&self) -> BTreeSet<String> {
        Self::busy(&self.lock())
    }

    fn busy(g: &Inner) -> BTreeSet<String> {
        g.slots.iter().filter_map(|id| g.active.get(id)).flat_map(|a| a.sc.agents.iter().map(|x| x.agent_id.clone())).collect()
    }

    /// Validate a spec's shape; returns (family, severity, duration).
    pub fn validate(&self, spec: &pb::ScenarioSpec) -> Result<(&'static str, u32, Duration), CoordinatorError> {
        let fault = spec.fault.as_ref().ok_or_else(|| CoordinatorError::invalid("spec.fault", "is required"))?;
        let family = fault.fault.as_ref().map(family_of).ok_or_else(|| CoordinatorError::invalid("spec.fault", "sets no fault family"))?;
        let duration = match spec.duration.as_ref() {
            None => self.policy.default_duration,
            Some(d) => duration_from_pb(d)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| CoordinatorError::invalid("spec.duration", format!("must be > 0, got {}s", d.seconds)))?,
        };
        let severity = if spec.severity == 0 { self.policy.default_severity } else { spec.severity };
        if !(1..=5).contains(&severity) {
            return Err(CoordinatorError::invalid("spec.severity", format!("must be 1..5 (0: default), got {severity}")));
        }
        for (i, expr) in spec.stop_conditions.iter().enumerate() {
            chaos_proto::rules::Rule::parse(expr).map_err(|e| CoordinatorError::invalid(&format!("spec.stop_conditions[{i}]"), e))?;
        }
        // The agent's own validation, so a malformed fault is refused here
        // with the same field names instead of failing on every agent.
        let mut probe = fault.clone();
        probe.id.clear();
        probe.duration = Some(duration_to_pb(duration));
        match FaultRequest::from_pb(&probe, Duration::MAX) {
            Ok(_) => {}
            Err(SpecError::Invalid { field, message }) => return Err(CoordinatorError::invalid(&format!("spec.fault.{field}"), message)),
        }
        Ok((family, severity, duration))
    }

    /// Every rule that refuses `spec` now (armed, policy caps, selection and
    /// blast radius against the running scenarios), with the selection.
    fn admit_locked(
        &self,
        g: &Inner,
        fleet: &[AgentView],
        spec: &pb::ScenarioSpec,
        family: &str,
        severity: u32,
        duration: Duration,
    ) -> (admission::Decision, Vec<String>) {
        let mut refusals = Vec::new();
        let arm = self.registry.arm_state();
        if !arm.armed {
            refusals.push(format!("the fleet is disarmed ({}): run `chaos arm` first", arm.disarmed_reason));
        }
        refusals.extend(self.policy.check_fault(spec.fault.as_ref().unwrap_or(&pb::FaultSpec::default()), severity, duration));
        let decision = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            admission::decide(&self.policy, fleet, &Self::busy(g), spec, family, &mut *rng)
        };
        refusals.extend(decision.refusals.iter().cloned());
        (decision, refusals)
    }

    /// Admission of a new scenario (or only its evaluation with `dry_run`).
    pub fn create(
        self: &Arc<Self>,
        spec: pb::ScenarioSpec,
        dry_run: bool,
        actor: &str,
    ) -> Result<pb::CreateScenarioResponse, CoordinatorError> {
        let (family, severity, duration) = self.validate(&spec)?;
        let fleet = self.fleet();
        let mut g = self.lock();
        let (decision, mut refusals) = self.admit_locked(&g, &fleet, &spec, family, severity, duration);
        let queued = g.slots.len() >= self.policy.max_concurrent;
        let queue_full = queued && g.queue.len() >= self.policy.max_queued;
        if queue_full {
            refusals.push(format!(
                "queue full: {} scenarios queued (chaos_testing.max_queued_scenarios {})",
                g.queue.len(),
                self.policy.max_queued
            ));
        }
        let mut admission = pb::Admission {
            admitted: refusals.is_empty(),
            queued,
            queue_position: if queued { g.queue.len() as u32 + 1 } else { 0 },
            selected_agent_ids: decision.selected.iter().map(|a| a.agent_id.clone()).collect(),
            blast_radius: Some(decision.blast),
            refusals: refusals.clone(),
            notes: decision.notes.clone(),
            scenario_type: family.to_string(),
            severity,
            duration: Some(duration_to_pb(duration)),
        };
        if dry_run {
            return Ok(pb::CreateScenarioResponse { scenario: None, admission: Some(admission) });
        }
        if !refusals.is_empty() {
            let msg = format!("scenario refused: {}", refusals.join("; "));
            return Err(if queue_full && refusals.len() == 1 { CoordinatorError::Exhausted(msg) } else { CoordinatorError::Refused(msg) });
        }
        let id = format!("sc-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let b = &decision.blast;
        let mut sc = pb::Scenario {
            id: id.clone(),
            spec: Some(pb::ScenarioSpec { name: if spec.name.is_empty() { family.to_string() } else { spec.name.clone() }, ..spec }),
            scenario_type: family.to_string(),
            severity,
            duration: Some(duration_to_pb(duration)),
            created_at: now_pb(),
            created_by: actor.to_string(),
            blast_radius: Some(decision.blast),
            ..Default::default()
        };
        push_transition(
            &mut sc,
            ScenarioState::Pending,
            format!(
                "admitted: {} agent(s) selected; blast radius with running scenarios {} of {} agents (limit {:.0} %)",
                decision.selected.len(),
                b.affected_agents,
                b.fleet_agents,
                b.limit * 100.0
            ),
        );
        let (events, _) = broadcast::channel(256);
        g.active.insert(id.clone(), Active { sc, events, stop: None });
        if queued {
            g.queue.push_back(id.clone());
            let reason = format!("waiting for a slot: {} of {} running", g.slots.len(), self.policy.max_concurrent);
            self.transition_locked(&mut g, &id, ScenarioState::Queued, reason);
        } else {
            self.start_locked(&mut g, &id, decision.selected);
        }
        admission.queue_position = queue_position(&g, &id);
        let snapshot = self.snapshot_locked(&g, &id).unwrap_or_default();
        drop(g);
        self.flush();
        info!(scenario = %id, family, severity, queued, agents = snapshot.agents.len(), "scenario admitted");
        Ok(pb::CreateScenarioResponse { scenario: Some(snapshot), admission: Some(admission) })
    }

    /// Take a slot and spawn the runner.
    fn start_locked(self: &Arc<Self>, g: &mut Inner, id: &str, selected: Vec<AgentView>) {
        g.slots.insert(id.to_string());
        let (tx, rx) = oneshot::channel();
        if let Some(a) = g.active.get_mut(id) {
            a.stop = Some(tx);
            a.sc.agents = selected
                .iter()
                .map(|v| pb::ScenarioAgent {
                    agent_id: v.agent_id.clone(),
                    address: v.address.clone(),
                    fault_id: id.to_string(),
                    ..Default::default()
                })
                .collect();
        }
        let n = selected.len();
        self.transition_locked(g, id, ScenarioState::Running, format!("started: applying on {n} agent(s)"));
        tokio::spawn(Arc::clone(self).run_guarded(id.to_string(), rx, RunMode::Fresh));
    }

    /// Start queued scenarios while slots are free; each is admitted again
    /// against the fleet and the running scenarios of now.
    fn start_next(self: &Arc<Self>) {
        let mut g = self.lock();
        while g.slots.len() < self.policy.max_concurrent {
            let Some(id) = g.queue.pop_front() else { break };
            // Validated at creation; its type, severity and duration are on the record.
            let Some(sc) = g.active.get(&id).map(|a| a.sc.clone()) else { continue };
            let spec = sc.spec.unwrap_or_default();
            let duration = sc.duration.as_ref().and_then(duration_from_pb).unwrap_or(self.policy.default_duration);
            let (decision, refusals) = self.admit_locked(&g, &self.fleet(), &spec, &sc.scenario_type, sc.severity, duration);
            if !refusals.is_empty() {
                self.finish_locked(&mut g, &id, ScenarioState::Aborted, format!("refused when its turn came: {}", refusals.join("; ")));
                continue;
            }
            if let Some(a) = g.active.get_mut(&id) {
                a.sc.blast_radius = Some(decision.blast);
            }
            self.start_locked(&mut g, &id, decision.selected);
        }
        // Queue positions moved: tell the queued scenarios' watchers.
        let queued: Vec<String> = g.queue.iter().cloned().collect();
        for id in queued {
            self.notify_locked(&g, &id, None, "queue position changed");
        }
        drop(g);
        self.flush();
    }

    fn snapshot_locked(&self, g: &Inner, id: &str) -> Option<pb::Scenario> {
        let a = g.active.get(id)?;
        let mut sc = a.sc.clone();
        sc.queue_position = queue_position(g, id);
        Some(sc)
    }

    fn notify_locked(&self, g: &Inner, id: &str, agent_id: Option<&str>, message: &str) {
        let Some(a) = g.active.get(id) else { return };
        if a.events.receiver_count() == 0 {
            return;
        }
        let event = match agent_id {
            None => snapshot_event(self.snapshot_locked(g, id).unwrap_or_default(), message.to_string()),
            Some(aid) => pb::ScenarioEvent {
                scenario_id: id.to_string(),
                at: now_pb(),
                state: a.sc.state,
                message: message.to_string(),
                agent_id: aid.to_string(),
                scenario: None,
                agent: a.sc.agents.iter().find(|x| x.agent_id == aid).cloned(),
            },
        };
        let _ = a.events.send(event);
    }

    /// Write the scenarios changed since their last write to the store.
    /// Called with the state lock let go, after every change: the state of
    /// each is taken when the write starts, and writes run one at a time,
    /// so a write that started later carries a state at least as new, and
    /// the change that called it is written by this call or one running
    /// already. A scenario in a final state leaves memory once written.
    fn flush(&self) {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let batch: Vec<pb::Scenario> = {
            let mut g = self.lock();
            let dirty = std::mem::take(&mut g.dirty);
            dirty.iter().filter_map(|id| g.active.get(id).map(|a| a.sc.clone())).collect()
        };
        if batch.is_empty() {
            return;
        }
        for sc in &batch {
            if let Err(e) = self.store.save(sc) {
                tracing::error!(scenario = %sc.id, error = %e, "could not persist scenario state");
            }
        }
        let mut g = self.lock();
        for sc in batch.iter().filter(|sc| is_final(sc.state)) {
            // A final state never changes again (transition_locked refuses):
            // from now on, reads fall back to the store.
            if !g.dirty.contains(&sc.id) {
                g.active.remove(&sc.id);
            }
        }
    }

    /// Record a state change: watchers now, the store at the next
    /// [`Self::flush`]. A scenario in a final state stays in it.
    fn transition_locked(&self, g: &mut Inner, id: &str, state: ScenarioState, reason: String) {
        let Some(a) = g.active.get_mut(id) else { return };
        if is_final(a.sc.state) {
            warn!(scenario = %id, state = %state_name(state as i32), %reason, "scenario already ended: transition ignored");
            return;
        }
        info!(scenario = %id, state = %state_name(state as i32), %reason, "scenario transition");
        push_transition(&mut a.sc, state, reason.clone());
        if state == ScenarioState::Running && a.sc.started_at.is_none() {
            a.sc.started_at = now_pb();
        }
        if is_final(state as i32) {
            a.sc.ended_at = now_pb();
        }
        g.dirty.insert(id.to_string());
        self.notify_locked(g, id, None, &reason);
    }

    /// Move to a final state and free the slot (the record leaves memory
    /// once [`Self::flush`] has written it).
    fn finish_locked(&self, g: &mut Inner, id: &str, state: ScenarioState, reason: String) {
        self.transition_locked(g, id, state, reason);
        g.slots.remove(id);
        g.queue.retain(|q| q != id);
    }

    fn finish(self: &Arc<Self>, id: &str, state: ScenarioState, reason: String) {
        {
            let mut g = self.lock();
            self.finish_locked(&mut g, id, state, reason);
        }
        self.flush();
        self.start_next();
    }

    /// Apply a batch of per-agent changes, persist once, then notify one
    /// event per agent (one store write per batch, not per agent: at 1,000
    /// agents a write per answer would rewrite the scenario 1,000 times).
    fn update_agents(&self, id: &str, updates: AgentUpdates) {
        if updates.is_empty() {
            return;
        }
        let mut g = self.lock();
        let Some(a) = g.active.get_mut(id).filter(|a| !is_final(a.sc.state)) else { return };
        let mut events = Vec::with_capacity(updates.len());
        for (agent_id, message, f) in updates {
            if let Some(x) = a.sc.agents.iter_mut().find(|x| x.agent_id == agent_id) {
                f(x);
            }
            events.push((agent_id, message));
        }
        g.dirty.insert(id.to_string());
        for (agent_id, message) in events {
            self.notify_locked(&g, id, Some(&agent_id), message);
        }
        drop(g);
        self.flush();
    }

    fn agents_of(&self, id: &str) -> Vec<pb::ScenarioAgent> {
        self.lock().active.get(id).map(|a| a.sc.agents.clone()).unwrap_or_default()
    }

    /// Run `f` against each agent, at most `fanout_parallelism` at once.
    async fn fanout<T, F, Fut>(&self, agents: Vec<pb::ScenarioAgent>, f: F) -> Vec<(String, Result<T, String>)>
    where
        F: Fn(AgentClient<Channel>, pb::ScenarioAgent) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        self.fanout_within(self.timing.call_timeout, agents, f).await
    }

    /// [`Self::fanout`] with each call bounded by `timeout`.
    async fn fanout_within<T, F, Fut>(&self, timeout: Duration, agents: Vec<pb::ScenarioAgent>, f: F) -> Vec<(String, Result<T, String>)>
    where
        F: Fn(AgentClient<Channel>, pb::ScenarioAgent) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let calls = agents.into_iter().map(|a| {
            let client = self.registry.client(&a.agent_id, &a.address);
            let id = a.agent_id.clone();
            let fut = client.map(|c| f(c, a));
            async move {
                let r = match fut {
                    None => Err("invalid agent address".to_string()),
                    Some(fut) => match tokio::time::timeout(timeout, fut).await {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(s)) => Err(status_text(&s)),
                        Err(_) => Err(format!("no answer within {timeout:?}")),
                    },
                };
                (id, r)
            }
        });
        stream::iter(calls).buffer_unordered(self.policy.fanout_parallelism.max(1)).collect().await
    }

    /// [`Self::run`]; if the runner panics (a bug), the scenario still
    /// ends: its faults are asked to revert and it is FAILED, saying so.
    async fn run_guarded(self: Arc<Self>, id: String, stop: oneshot::Receiver<StopSignal>, mode: RunMode) {
        let Err(why) = chaos_proto::serve::catch_panic(Arc::clone(&self).run(id.clone(), stop, mode)).await else { return };
        tracing::error!(scenario = %id, panic = %why, "scenario runner panicked; reverting its faults");
        let unconfirmed = match chaos_proto::serve::catch_panic(self.revert_all(&id)).await {
            Ok(u) if u.is_empty() => String::new(),
            Ok(u) => format!("; revert not confirmed on {} (their TTL and lease revert it)", u.join(", ")),
            Err(_) => "; the revert panicked too (the agents' TTL and lease revert the fault)".to_string(),
        };
        let live = self.lock().active.get(&id).is_some_and(|a| !is_final(a.sc.state));
        if live {
            self.finish(
                &id,
                ScenarioState::Failed,
                format!("the scenario's runner failed (a bug, logged by the coordinator): {why}{unconfirmed}"),
            );
        }
    }

    async fn run(self: Arc<Self>, id: String, mut stop: oneshot::Receiver<StopSignal>, mode: RunMode) {
        let (duration, fault) = {
            let g = self.lock();
            let Some(a) = g.active.get(&id) else { return };
            let d = a.sc.duration.as_ref().and_then(duration_from_pb).unwrap_or(self.policy.default_duration);
            (d, a.sc.spec.as_ref().and_then(|s| s.fault.clone()).unwrap_or_default())
        };
        let end = match mode {
            RunMode::Revert(state) => (state, "reverting after coordinator restart".to_string()),
            RunMode::Fresh => {
                if let Err(reason) = self.apply_all(&id, fault, duration).await {
                    self.finish(&id, ScenarioState::Failed, reason);
                    return;
                }
                self.hold(&id, &mut stop, duration).await
            }
            RunMode::Resume => {
                if let Err(reason) = self.check_held(&id).await {
                    self.finish(&id, ScenarioState::Aborted, reason);
                    return;
                }
                self.hold(&id, &mut stop, duration).await
            }
        };
        {
            let mut g = self.lock();
            self.transition_locked(&mut g, &id, ScenarioState::Reverting, end.1.clone());
        }
        self.flush();
        let unconfirmed = self.revert_all(&id).await;
        if unconfirmed.is_empty() {
            self.finish(&id, end.0, end.1);
        } else {
            self.finish(
                &id,
                ScenarioState::Failed,
                format!("{}; revert not confirmed on {}: the agents' own TTL and lease revert the fault", end.1, unconfirmed.join(", ")),
            );
        }
    }

    async fn apply_all(&self, id: &str, mut fault: pb::FaultSpec, duration: Duration) -> Result<(), String> {
        fault.id = id.to_string();
        fault.duration = Some(duration_to_pb(duration));
        fault.labels.insert(SCENARIO_LABEL.into(), id.to_string());
        let agents = self.agents_of(id);
        let total = agents.len();
        // A container stop is answered once the container has exited, up to its grace.
        let timeout = self.timing.call_timeout + chaos_proto::spec::apply_allowance(&fault);
        let results = self
            .fanout_within(timeout, agents, |mut c, _| {
                let spec = fault.clone();
                async move { c.apply_fault(pb::ApplyFaultRequest { spec: Some(spec) }).await.map(|r| r.into_inner().fault.unwrap_or_default()) }
            })
            .await;
        let mut errors = Vec::new();
        let mut updates: AgentUpdates = Vec::new();
        for (agent_id, r) in results {
            match r {
                Ok(f) => updates.push((
                    agent_id.clone(),
                    "fault applied",
                    Box::new(move |x: &mut pb::ScenarioAgent| {
                        x.fault_state = f.state;
                        x.summary = f.applied.as_ref().map(|a| a.summary.clone()).unwrap_or_default();
                        x.backend = f.applied.as_ref().map(|a| a.backend.clone()).unwrap_or_default();
                        if let Some(a) = &f.applied {
                            x.achieved = a.achieved.clone();
                            x.outcome = a.outcome.clone();
                        }
                        x.applied_at = f.applied_at;
                        x.error = f.error;
                    }),
                )),
                Err(e) => {
                    warn!(scenario = %id, agent = %agent_id, error = %e, "apply failed");
                    errors.push(format!("{agent_id}: {e}"));
                    updates.push((
                        agent_id.clone(),
                        "apply failed",
                        Box::new(move |x: &mut pb::ScenarioAgent| {
                            x.fault_state = FaultState::Failed as i32;
                            x.error = e;
                        }),
                    ));
                }
            }
        }
        self.update_agents(id, updates);
        let applied = total - errors.len();
        if applied == 0 {
            return Err(format!("the fault was applied on no agent: {}", errors.join("; ")));
        }
        let mut g = self.lock();
        if let Some(a) = g.active.get_mut(id).filter(|a| !is_final(a.sc.state)) {
            let now = SystemTime::now();
            a.sc.started_at = Some(timestamp_to_pb(now));
            a.sc.ends_at = Some(timestamp_to_pb(now + duration));
            g.dirty.insert(id.to_string());
        }
        let msg = if errors.is_empty() {
            format!("applied on {applied} of {total} agent(s)")
        } else {
            format!("applied on {applied} of {total} agent(s); failed on {}", errors.join("; "))
        };
        self.notify_locked(&g, id, None, &msg);
        drop(g);
        self.flush();
        Ok(())
    }

    /// After a restart: which of the recorded faults do the agents still hold?
    async fn check_held(&self, id: &str) -> Result<(), String> {
        let held: Vec<pb::ScenarioAgent> = self.agents_of(id).into_iter().filter(|a| a.fault_state == FaultState::Applied as i32).collect();
        let results = self
            .fanout(held, |mut c, _| async move {
                c.list_faults(pb::ListFaultsRequest { include_finished: true }).await.map(|r| r.into_inner().faults)
            })
            .await;
        let mut still = 0;
        let mut updates: AgentUpdates = Vec::new();
        for (agent_id, r) in results {
            match r {
                Ok(faults) => match faults.into_iter().find(|f| f.id == id) {
                    Some(f) if f.state == FaultState::Applied as i32 => still += 1,
                    found => {
                        let why = found.map(|f| f.revert_summary).unwrap_or_else(|| "the agent no longer knows it".into());
                        updates.push((
                            agent_id,
                            "fault ended while the coordinator was down",
                            Box::new(move |x: &mut pb::ScenarioAgent| {
                                x.fault_state = FaultState::Reverted as i32;
                                x.reverted_at = now_pb();
                                x.error = format!("ended while the coordinator was down: {why}");
                            }),
                        ));
                    }
                },
                // Not reachable yet: keep it as held; revert retries it.
                Err(_) => still += 1,
            }
        }
        self.update_agents(id, updates);
        if still == 0 { Err("every fault ended while the coordinator was down (agent TTL or lease)".into()) } else { Ok(()) }
    }

    async fn hold(&self, id: &str, stop: &mut oneshot::Receiver<StopSignal>, duration: Duration) -> StopSignal {
        let ends = self.lock().active.get(id).and_then(|a| a.sc.ends_at).map(|t| timestamp_from_pb(&t));
        let left = ends.and_then(|e| e.duration_since(SystemTime::now()).ok()).unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(left) => (ScenarioState::Completed, format!("duration {} ended", humantime::format_duration(duration))),
            r = stop => r.unwrap_or((ScenarioState::Aborted, "the coordinator dropped the scenario".into())),
        }
    }

    /// Revert every fault the scenario holds, retrying unanswered agents
    /// for `revert_window`. Returns the agents that never confirmed.
    async fn revert_all(&self, id: &str) -> Vec<String> {
        let deadline = Instant::now() + self.timing.revert_window;
        loop {
            let pending: Vec<pb::ScenarioAgent> = self
                .agents_of(id)
                .into_iter()
                .filter(|a| {
                    matches!(
                        FaultState::try_from(a.fault_state),
                        Ok(FaultState::Applied | FaultState::Reverting | FaultState::Pending | FaultState::Unspecified)
                    )
                })
                .collect();
            if pending.is_empty() {
                return vec![];
            }
            let results = self
                .fanout(pending, |mut c, a| async move {
                    match c.revert_fault(pb::RevertFaultRequest { fault_id: a.fault_id.clone() }).await {
                        Ok(r) => Ok(RevertAnswer::Done(r.into_inner().fault)),
                        Err(s) if s.code() == tonic::Code::NotFound => Ok(RevertAnswer::Done(None)),
                        // The agent's revert failed: its record says how (a leftover it names, its re-read).
                        Err(s) if s.code() == tonic::Code::Internal => {
                            let listed = c.list_faults(pb::ListFaultsRequest { include_finished: false }).await;
                            match listed.ok().and_then(|l| l.into_inner().faults.into_iter().find(|f| f.id == a.fault_id)) {
                                Some(f) => Ok(RevertAnswer::Failed(status_text(&s), f)),
                                None => Err(s),
                            }
                        }
                        Err(s) => Err(s),
                    }
                })
                .await;
            let mut failed = Vec::new();
            let mut updates: AgentUpdates = Vec::new();
            for (agent_id, r) in results {
                match r {
                    Ok(RevertAnswer::Failed(e, f)) => {
                        failed.push(agent_id.clone());
                        updates.push((
                            agent_id,
                            "revert failed on the agent",
                            Box::new(move |x: &mut pb::ScenarioAgent| {
                                x.error = format!("revert: {e}");
                                x.revert_check = f.revert_check;
                                x.revert_check_detail = f.revert_check_detail;
                            }),
                        ));
                    }
                    Ok(RevertAnswer::Done(f)) => updates.push((
                        agent_id,
                        "fault reverted",
                        Box::new(move |x: &mut pb::ScenarioAgent| match f {
                            Some(f) => {
                                x.fault_state = f.state;
                                x.revert_check = f.revert_check;
                                x.revert_check_detail = f.revert_check_detail;
                                x.reverted_at = f.reverted_at.or_else(now_pb);
                                // The last measurement before the revert.
                                if let Some(a) = f.applied.filter(|a| !a.achieved.is_empty() || !a.outcome.is_empty()) {
                                    x.achieved = a.achieved;
                                    x.outcome = a.outcome;
                                }
                                if !f.error.is_empty() {
                                    x.error = f.error;
                                }
                            }
                            None => {
                                x.fault_state = FaultState::Reverted as i32;
                                x.reverted_at = now_pb();
                                x.error =
                                    "the agent does not hold the fault (never applied, or reverted by its journal replay after a restart)"
                                        .into();
                            }
                        }),
                    )),
                    Err(e) => {
                        failed.push(agent_id.clone());
                        updates.push((
                            agent_id,
                            "revert not confirmed",
                            Box::new(move |x: &mut pb::ScenarioAgent| x.error = format!("revert: {e}")),
                        ));
                    }
                }
            }
            self.update_agents(id, updates);
            if failed.is_empty() {
                // A FAILED answer from the agent means its revert failed.
                let bad: Vec<String> = self
                    .agents_of(id)
                    .into_iter()
                    .filter(|a| a.fault_state == FaultState::Failed as i32 && a.applied_at.is_some())
                    .map(|a| a.agent_id)
                    .collect();
                self.audit_leftovers(id);
                return bad;
            }
            if Instant::now() >= deadline {
                self.audit_leftovers(id);
                return failed;
            }
            tokio::time::sleep(self.timing.revert_retry).await;
        }
    }

    /// An audit row for each agent whose re-read after the revert found the
    /// host not as before (the agent keeps retrying; this is the lasting trace).
    fn audit_leftovers(&self, id: &str) {
        for a in self.agents_of(id).into_iter().filter(|a| a.revert_check == pb::RevertCheck::Different as i32) {
            warn!(scenario = %id, agent = %a.agent_id, differences = %a.revert_check_detail, "the host is not as before the fault after its revert");
            let detail = format!("fault {id}: the host is not as before the fault after its revert: {}", a.revert_check_detail);
            if let Err(e) = self.store.audit("coordinator", "RevertNotVerified", &a.agent_id, &detail, "error") {
                tracing::error!(error = %e, "audit write failed");
            }
        }
    }

    /// Cancel a queued scenario or end a running one; answers once it has
    /// reached its final state (or after `call_timeout`, with the state then).
    pub async fn stop(self: &Arc<Self>, id: &str, reason: &str) -> Result<pb::Scenario, CoordinatorError> {
        let reason = if reason.is_empty() { "stopped by request".to_string() } else { format!("stopped: {reason}") };
        let mut events = None;
        {
            let mut g = self.lock();
            let state = g.active.get(id).map(|a| a.sc.state);
            match state.and_then(|s| ScenarioState::try_from(s).ok()) {
                Some(ScenarioState::Queued | ScenarioState::Pending) => {
                    self.finish_locked(&mut g, id, ScenarioState::Stopped, format!("cancelled while queued ({reason})"));
                }
                // Ended already; its final state is on its way to the store.
                Some(s) if is_final(s as i32) => {}
                Some(_) => {
                    if let Some(a) = g.active.get_mut(id) {
                        events = Some(a.events.subscribe());
                        a.end(ScenarioState::Stopped, reason);
                    }
                }
                None => {}
            }
        }
        self.flush();
        self.start_next();
        if let Some(mut rx) = events {
            let _ = tokio::time::timeout(self.timing.call_timeout, async {
                loop {
                    match rx.recv().await {
                        Ok(ev) if is_final(ev.state) => return,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            })
            .await;
        }
        self.get(id)
    }

    /// Abort a running scenario (its faults are reverted) for `reason`, as a
    /// fired stop condition does. A scenario that is not running is left
    /// alone. True when the abort was sent.
    pub fn abort(&self, id: &str, reason: &str) -> bool {
        let sent = self.lock().active.get_mut(id).is_some_and(|a| a.end(ScenarioState::Aborted, reason.to_string()));
        if sent {
            warn!(scenario = %id, %reason, "aborting scenario");
        }
        sent
    }

    /// Running scenarios that have stop conditions: (id, started, rules).
    pub fn running_stop_conditions(&self) -> Vec<(String, SystemTime, Vec<String>)> {
        let g = self.lock();
        g.slots
            .iter()
            .filter_map(|id| g.active.get(id))
            .filter(|a| a.sc.state == ScenarioState::Running as i32)
            .filter_map(|a| {
                let rules = &a.sc.spec.as_ref()?.stop_conditions;
                let started = a.sc.started_at.as_ref().map(chaos_proto::convert::timestamp_from_pb)?;
                (!rules.is_empty()).then(|| (a.sc.id.clone(), started, rules.clone()))
            })
            .collect()
    }

    /// Emergency stop: cancel the queue and end every running scenario.
    pub fn abort_all(self: &Arc<Self>, reason: &str) {
        let mut g = self.lock();
        let queued: Vec<String> = g.queue.iter().cloned().collect();
        for id in queued {
            self.finish_locked(&mut g, &id, ScenarioState::Aborted, format!("emergency stop: {reason}"));
        }
        for a in g.active.values_mut() {
            a.end(ScenarioState::Aborted, format!("emergency stop: {reason}"));
        }
        drop(g);
        self.flush();
    }

    /// The blast radius, enforced while running: when the live fleet
    /// shrinks (agents lost) so that the running scenarios together exceed
    /// a limit, the most recently started ones are aborted until the rest
    /// fit. Returns the ids aborted.
    pub fn enforce_blast_radius(&self) -> Vec<String> {
        // Every second: skip the fleet snapshot (a copy of every agent record) when nothing runs.
        if self.lock().slots.is_empty() {
            return Vec::new();
        }
        let fleet = self.fleet();
        let live: BTreeSet<&str> = fleet.iter().filter(|a| a.health != pb::AgentHealth::Lost).map(|a| a.agent_id.as_str()).collect();
        let mut g = self.lock();
        // Running scenarios holding faults, oldest first.
        let mut running: Vec<(String, Option<prost_types::Timestamp>, String, Vec<String>)> = g
            .slots
            .iter()
            .filter_map(|id| g.active.get(id))
            .filter(|a| a.sc.state == ScenarioState::Running as i32 && a.stop.is_some())
            .map(|a| {
                (a.sc.id.clone(), a.sc.started_at, a.sc.scenario_type.clone(), a.sc.agents.iter().map(|x| x.agent_id.clone()).collect())
            })
            .collect();
        running.sort_by_key(|r| r.1.map(|t| (t.seconds, t.nanos)));
        let mut aborted = Vec::new();
        while let Some((id, _, family, _)) = running.last().cloned() {
            let affected: BTreeSet<&str> =
                running.iter().flat_map(|r| r.3.iter().map(String::as_str)).filter(|a| live.contains(a)).collect();
            let limit = self.policy.rule(&family).blast_radius_limit;
            if live.is_empty() {
                break;
            }
            let fraction = affected.len() as f64 / live.len() as f64;
            if fraction <= limit + 1e-9 {
                break;
            }
            let reason = format!(
                "blast radius exceeded while running: the live fleet shrank to {} agents; running scenarios affect {} ({:.0} %) > limit {:.0} %",
                live.len(),
                affected.len(),
                fraction * 100.0,
                limit * 100.0
            );
            warn!(scenario = %id, %reason, "aborting scenario");
            if let Some(a) = g.active.get_mut(&id) {
                a.end(ScenarioState::Aborted, reason);
            }
            aborted.push(id);
            running.pop();
        }
        aborted
    }

    /// Check the running blast radius every `every` until the process
    /// ends, starting after `grace`: after a coordinator restart the
    /// registry fills as agents re-register, and a half-empty registry
    /// would look like a shrunken fleet.
    pub async fn watchdog(self: Arc<Self>, grace: Duration, every: Duration) {
        tokio::time::sleep(grace).await;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.enforce_blast_radius();
        }
    }

    pub fn get(&self, id: &str) -> Result<pb::Scenario, CoordinatorError> {
        if let Some(sc) = self.snapshot_locked(&self.lock(), id) {
            return Ok(sc);
        }
        self.store.load(id).map_err(CoordinatorError::store)?.ok_or_else(|| CoordinatorError::NotFound(format!("scenario {id:?}")))
    }

    pub fn list(&self, states: &[i32], limit: u32) -> Result<Vec<pb::Scenario>, CoordinatorError> {
        let mut v = self.store.list(states, if limit == 0 { 100 } else { limit }).map_err(CoordinatorError::store)?;
        let g = self.lock();
        for sc in &mut v {
            // A live scenario as it is now (the store may be a write behind).
            match self.snapshot_locked(&g, &sc.id) {
                Some(live) => *sc = live,
                None => sc.queue_position = queue_position(&g, &sc.id),
            }
        }
        Ok(v)
    }

    /// The scenario now and, while it is live, a receiver of its events.
    pub fn watch(&self, id: &str) -> Result<(pb::Scenario, Option<broadcast::Receiver<pb::ScenarioEvent>>), CoordinatorError> {
        {
            let g = self.lock();
            if let (Some(sc), Some(a)) = (self.snapshot_locked(&g, id), g.active.get(id)) {
                // Ended (and about to leave memory): nothing more to watch.
                let events = (!is_final(sc.state)).then(|| a.events.subscribe());
                return Ok((sc, events));
            }
        }
        Ok((self.get(id)?, None))
    }

    /// Pick up what a previous coordinator run left unfinished.
    pub fn recover(self: &Arc<Self>) -> Result<usize, CoordinatorError> {
        let unfinished = self.store.unfinished().map_err(CoordinatorError::store)?;
        let n = unfinished.len();
        let arm = self.registry.arm_state();
        let mut g = self.lock();
        for sc in unfinished {
            let id = sc.id.clone();
            let state = ScenarioState::try_from(sc.state).unwrap_or(ScenarioState::Unspecified);
            let ended = sc.ends_at.as_ref().is_some_and(|t| timestamp_from_pb(t) <= SystemTime::now());
            // A crash while applying leaves RUNNING without an end time.
            let sc_started_apply_unfinished = state == ScenarioState::Running && sc.ends_at.is_none();
            let (events, _) = broadcast::channel(256);
            g.active.insert(id.clone(), Active { sc, events, stop: None });
            match state {
                ScenarioState::Pending | ScenarioState::Queued if !arm.armed => {
                    self.finish_locked(&mut g, &id, ScenarioState::Aborted, "fleet disarmed (found at coordinator start)".into());
                }
                ScenarioState::Pending | ScenarioState::Queued => {
                    g.queue.push_back(id.clone());
                    self.transition_locked(&mut g, &id, ScenarioState::Queued, "requeued after coordinator restart".into());
                }
                _ => {
                    g.slots.insert(id.clone());
                    let (tx, rx) = oneshot::channel();
                    let mode = if !arm.armed || sc_started_apply_unfinished {
                        RunMode::Revert(ScenarioState::Aborted)
                    } else if state == ScenarioState::Reverting || ended {
                        RunMode::Revert(if ended { ScenarioState::Completed } else { ScenarioState::Stopped })
                    } else {
                        RunMode::Resume
                    };
                    if let Some(a) = g.active.get_mut(&id) {
                        a.stop = Some(tx);
                    }
                    let why = match mode {
                        RunMode::Resume => "resumed after coordinator restart: holding until its end".to_string(),
                        _ if !arm.armed => "coordinator restarted disarmed: reverting".to_string(),
                        _ => "coordinator restarted after the scenario's end or mid-revert: reverting".to_string(),
                    };
                    self.transition_locked(&mut g, &id, state, why);
                    info!(scenario = %id, ?mode, "recovering scenario after restart");
                    tokio::spawn(Arc::clone(self).run_guarded(id, rx, mode));
                }
            }
        }
        drop(g);
        self.flush();
        self.start_next();
        Ok(n)
    }

    /// Revert faults an agent holds for scenarios that are not running
    /// (left over from a coordinator crash or a lost revert).
    pub async fn revert_orphans(self: Arc<Self>, agent_id: String, address: String) {
        let Some(mut client) = self.registry.client(&agent_id, &address) else { return };
        let faults =
            match tokio::time::timeout(self.timing.call_timeout, client.list_faults(pb::ListFaultsRequest { include_finished: false }))
                .await
            {
                Ok(Ok(r)) => r.into_inner().faults,
                _ => return,
            };
        for f in faults {
            let Some(sid) = f.spec.as_ref().and_then(|s| s.labels.get(SCENARIO_LABEL)).cloned() else { continue };
            let owned = {
                let g = self.lock();
                g.slots.contains(&sid) && g.active.get(&sid).is_some_and(|a| a.sc.agents.iter().any(|x| x.agent_id == agent_id))
            };
            if owned {
                continue;
            }
            let outcome = match tokio::time::timeout(
                self.timing.call_timeout,
                client.revert_fault(pb::RevertFaultRequest { fault_id: f.id.clone() }),
            )
            .await
            {
                Ok(Ok(_)) => "ok".to_string(),
                Ok(Err(s)) => format!("error: {}", status_text(&s)),
                Err(_) => "error: no answer".to_string(),
            };
            warn!(agent = %agent_id, fault = %f.id, scenario = %sid, %outcome, "reverted an orphan scenario fault");
            if let Err(e) = self.store.audit(
                "coordinator",
                "RevertOrphan",
                &agent_id,
                &format!("fault {} of scenario {sid}, which is not running", f.id),
                &outcome,
            ) {
                tracing::error!(error = %e, "audit write failed");
            }
        }
    }
}

/// An event carrying the whole scenario (first event of a watch, or after skipped events).
pub fn snapshot_event(sc: pb::Scenario, message: String) -> pb::ScenarioEvent {
    pb::ScenarioEvent {
        scenario_id: sc.id.clone(),
        at: now_pb(),
        state: sc.state,
        message,
        agent_id: String::new(),
        agent: None,
        scenario: Some(sc),
    }
}

fn push_transition(sc: &mut pb::Scenario, state: ScenarioState, reason: String) {
    sc.state = state as i32;
    sc.reason = reason.clone();
    sc.transitions.push(pb::ScenarioTransition { at: now_pb(), state: state as i32, reason });
}

fn queue_position(g: &Inner, id: &str) -> u32 {
    g.queue.iter().position(|q| q == id).map(|p| p as u32 + 1).unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{registry::ArmState, standin::Standin};

    /// Scenarios over `n` stand-in agents (`a0`..), for this module's tests
    /// and the GameDay's. The stand-ins are reached in memory (no socket),
    /// so the tests run under tokio's paused time: every deadline and
    /// duration is virtual, and the clock moves only when all is idle.
    pub(crate) struct Rig {
        pub(crate) scenarios: Arc<Scenarios>,
        pub(crate) registry: Arc<Registry>,
        pub(crate) agents: Vec<Standin>,
    }

    pub(crate) async fn rig(n: usize, policy: Policy) -> Rig {
        let registry = Arc::new(Registry::new(
            Duration::from_millis(500),
            ArmState { armed: true, ..Default::default() },
            None,
            chaos_proto::trust::ClientTls::Insecure,
        ));
        let mut agents = Vec::new();
        for i in 0..n {
            let s = Standin::new();
            registry
                .register(
                    pb::RegisterAgentRequest {
                        agent_id: format!("a{i}"),
                        address: format!("http://a{i}.standin.invalid:50051"),
                        labels: [("role".to_string(), format!("r{i}"))].into(),
                        lease_duration: Some(duration_to_pb(Duration::from_secs(60))),
                        ..Default::default()
                    },
                    "test",
                    false,
                )
                .expect("register");
            let mut rec = registry.agents().into_iter().find(|x| x.agent_id == format!("a{i}")).expect("registered");
            rec.client = s.clone().in_memory();
            registry.insert_unchecked(rec);
            agents.push(s);
        }
        let timing = Timing {
            call_timeout: Duration::from_secs(2),
            revert_window: Duration::from_millis(300),
            revert_retry: Duration::from_millis(50),
        };
        let store = Arc::new(Store::in_memory().expect("store"));
        Rig { scenarios: Scenarios::new(policy, Arc::clone(&registry), store, timing), registry, agents }
    }

    pub(crate) fn open_policy(max_concurrent: usize) -> Policy {
        Policy { blast_radius_limit: 1.0, group_blast_radius_limit: 1.0, max_concurrent, ..Policy::default() }
    }

    /// Pause pid 4242 on `agent` for `ms`.
    pub(crate) fn spec(agent: &str, ms: u64) -> pb::ScenarioSpec {
        pb::ScenarioSpec {
            fault: Some(pb::FaultSpec {
                target: Some(pb::Target { kind: Some(pb::target::Kind::Pid(4242)) }),
                fault: Some(pb::fault_spec::Fault::ProcessPause(pb::ProcessPause {})),
                ..Default::default()
            }),
            selector: Some(pb::AgentSelector { agent_ids: vec![agent.into()], ..Default::default() }),
            duration: Some(duration_to_pb(Duration::from_millis(ms))),
            severity: 2,
            ..Default::default()
        }
    }

    /// Follow scenario `id`'s events until `done` holds for it (at most ten
    /// minutes of the test's clock; ending first fails at once).
    pub(crate) async fn wait_until(s: &Scenarios, id: &str, what: &str, done: impl Fn(&pb::Scenario) -> bool) -> pb::Scenario {
        let follow = async {
            loop {
                // The scenario and its events from the same moment: no change is missed.
                let (sc, events) = s.watch(id).expect("watch");
                if done(&sc) {
                    return sc;
                }
                let Some(mut events) = events else { panic!("{id} ended {} before {what}: {sc:?}", state_name(sc.state)) };
                let _ = events.recv().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(600), follow).await.unwrap_or_else(|_| panic!("{id} never {what}: {:?}", s.get(id)))
    }

    pub(crate) async fn wait_state(s: &Scenarios, id: &str, state: ScenarioState) -> pb::Scenario {
        wait_until(s, id, &format!("reached {state:?}"), |sc| sc.state == state as i32).await
    }

    /// Until the coordinator has heard `agent` confirm the fault of scenario `id`.
    async fn wait_applied(s: &Scenarios, id: &str, agent: &str) -> pb::Scenario {
        wait_until(s, id, &format!("applied on {agent}"), |sc| {
            sc.agents.iter().any(|x| x.agent_id == agent && x.fault_state == FaultState::Applied as i32)
        })
        .await
    }

    /// A client whose every connection is refused, as a dead address's is
    /// (in memory, so the paused clock never waits on a socket).
    fn refusing_client() -> AgentClient<Channel> {
        let refuse = tower::service_fn(|_: tonic::transport::Uri| async {
            Err::<hyper_util::rt::TokioIo<tokio::io::DuplexStream>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
        });
        AgentClient::new(tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_with_connector_lazy(refuse))
    }

    fn id_of(r: pb::CreateScenarioResponse) -> String {
        r.scenario.expect("scenario").id
    }

    /// Run a call that may block on its own thread, inside this runtime.
    fn on_thread<T: Send + 'static>(
        s: &Arc<Scenarios>,
        f: impl FnOnce(&Arc<Scenarios>) -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let (s, rt) = (Arc::clone(s), tokio::runtime::Handle::current());
        std::thread::spawn(move || {
            let _rt = rt.enter();
            f(&s)
        })
    }

    /// A store write in flight (a slow disk, here held by a hook) holds up
    /// no reader of the scheduler, and a change made meanwhile is the one
    /// the store keeps: its write waits for the first, then carries the
    /// newest state.
    #[tokio::test(start_paused = true)]
    async fn a_slow_store_write_blocks_no_reader_and_the_newest_state_is_stored() {
        // No slot: every scenario queues, and nothing runs.
        let r = rig(1, open_policy(0)).await;
        let s = Arc::clone(&r.scenarios);
        let (entered_tx, entered) = std::sync::mpsc::channel::<(String, String)>();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let first = std::sync::atomic::AtomicBool::new(true);
        s.store().on_save(move |sc| {
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                let _ = entered_tx.send((sc.id.clone(), state_name(sc.state)));
                // Until the test lets it go (or drops `go` by failing).
                let _ = go_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
            }
        });
        let creator = on_thread(&s, |s| s.create(spec("a0", 1000), false, "t").ok().map(id_of));
        let (id, written) = entered.recv().expect("the create writes its scenario");
        assert_eq!(written, "QUEUED");
        // The write is blocked in the store; the scheduler answers meanwhile.
        assert!(s.inner.try_lock().is_ok(), "the scheduler's lock is held across a store write");
        assert_eq!(s.counts(), (0, 1));
        assert_eq!(s.get(&id).expect("get").queue_position, 1);
        assert_eq!(s.list(&[], 0).expect("list").iter().map(|sc| sc.id.clone()).collect::<Vec<_>>(), Vec::<String>::new());
        let (_, events) = s.watch(&id).expect("watch");
        let mut events = events.expect("a queued scenario is live");
        // A newer state, decided while the first write is still in flight.
        let stopper = on_thread(&s, |s| s.abort_all("drill"));
        let ev = events.recv().await.expect("the abort is told to watchers");
        assert_eq!(ev.state, ScenarioState::Aborted as i32);
        assert_eq!(s.get(&id).expect("get").state, ScenarioState::Aborted as i32, "readers see the newest state at once");
        // Give the abort's write the chance to overtake the blocked one (it
        // must not: it waits for it). The pass never depends on this wait;
        // it lets a write that does not wait show itself.
        for _ in 0..100_000 {
            if stopper.is_finished() {
                break;
            }
            std::thread::yield_now();
        }
        go.send(()).expect("the write is waiting");
        assert_eq!(creator.join().expect("create"), Some(id.clone()));
        stopper.join().expect("abort");
        let stored = s.store().load(&id).expect("load").expect("row");
        assert_eq!(stored.state, ScenarioState::Aborted as i32, "the newest state is the one stored: {:?}", stored.transitions);
        assert_eq!(stored.reason, "emergency stop: drill");
        assert!(!s.lock().active.contains_key(&id), "written in its final state, it left memory");
        assert_eq!(s.get(&id).expect("from the store").state, ScenarioState::Aborted as i32);
        assert_eq!(s.counts(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_queue_takes_freed_slots_and_a_queued_scenario_can_be_cancelled() {
        let r = rig(2, open_policy(1)).await;
        let s = &r.scenarios;
        let a = id_of(s.create(spec("a0", 300), false, "t").expect("a"));
        let b = s.create(spec("a1", 200), false, "t").expect("b");
        assert_eq!(b.admission.as_ref().map(|a| (a.queued, a.queue_position)), Some((true, 1)));
        let b = id_of(b);
        let c = id_of(s.create(spec("a1", 200), false, "t").expect("c"));
        assert_eq!(s.get(&c).expect("c").queue_position, 2);
        let d = id_of(s.create(spec("a1", 200), false, "t").expect("d"));
        assert_eq!(s.stop(&c, "no").await.expect("stop").state, ScenarioState::Stopped as i32);
        assert_eq!(s.get(&d).expect("d").queue_position, 2, "d moved up behind b");
        wait_applied(s, &a, "a0").await;
        assert_eq!(r.agents[0].applied(), vec![a.clone()], "running: the fault is applied");
        wait_state(s, &a, ScenarioState::Completed).await;
        assert!(r.agents[0].applied().is_empty(), "reverted at its end");
        wait_state(s, &b, ScenarioState::Running).await;
        assert_eq!(s.get(&d).expect("d").queue_position, 1);
        wait_state(s, &b, ScenarioState::Completed).await;
        wait_state(s, &d, ScenarioState::Completed).await;
        assert_eq!(s.counts(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn disarm_aborts_running_and_queued_and_refuses_new_ones() {
        let r = rig(2, open_policy(1)).await;
        let s = &r.scenarios;
        let a = id_of(s.create(spec("a0", 60_000), false, "t").expect("a"));
        let b = id_of(s.create(spec("a1", 60_000), false, "t").expect("b"));
        wait_state(s, &a, ScenarioState::Running).await;
        r.registry.disarm("drill");
        s.abort_all("drill");
        let sc = wait_state(s, &a, ScenarioState::Aborted).await;
        assert_eq!(sc.reason, "emergency stop: drill");
        assert_eq!(s.get(&b).expect("b").state, ScenarioState::Aborted as i32);
        assert!(r.agents[0].applied().is_empty());
        let e = s.create(spec("a0", 1000), false, "t").expect_err("disarmed");
        assert!(matches!(&e, CoordinatorError::Refused(m) if m.contains("disarmed (drill)")), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn emergency_stop_reverts_the_others_past_a_poisoned_registry_record() {
        let r = rig(2, open_policy(3)).await;
        let s = &r.scenarios;
        let a = id_of(s.create(spec("a0", 60_000), false, "t").expect("a"));
        wait_applied(s, &a, "a0").await;
        assert_eq!(r.agents[0].applied().len(), 1);
        // A record no check of register() would let in: a lease past what a time can hold, a dead address.
        let mut poisoned = r.registry.agents().into_iter().find(|x| x.agent_id == "a1").expect("a1");
        poisoned.agent_id = "poisoned".into();
        poisoned.lease = Duration::MAX;
        poisoned.last_seen_wall = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4);
        poisoned.active_faults = u32::MAX;
        poisoned.address = "http://127.0.0.1:1".into();
        poisoned.client = refusing_client();
        r.registry.insert_unchecked(poisoned);
        let resp = crate::fleet::emergency_stop(&r.registry, s, "drill", Duration::from_millis(500)).await;
        assert!(r.agents[0].applied().is_empty(), "the healthy agent's fault is reverted");
        let bad = resp.results.iter().find(|x| x.agent_id == "poisoned").expect("the poisoned record is reported");
        assert!(!bad.reached && bad.lease_revert_by.is_none(), "{bad:?}");
        assert!(!resp.complete, "an unreached agent leaves the stop incomplete: {resp:?}");
        assert_eq!(resp.agents_reached, 2);
        wait_state(s, &a, ScenarioState::Aborted).await;
    }

    #[tokio::test(start_paused = true)]
    async fn partial_apply_keeps_running_and_total_failure_fails() {
        let r = rig(2, open_policy(3)).await;
        let s = &r.scenarios;
        r.agents[1].fail_apply(Some("target gone"));
        let mut both = spec("a0", 200);
        both.selector = Some(pb::AgentSelector::default());
        let a = id_of(s.create(both, false, "t").expect("a"));
        let sc = wait_state(s, &a, ScenarioState::Completed).await;
        let failed = sc.agents.iter().find(|x| x.agent_id == "a1").expect("a1");
        assert_eq!(failed.fault_state, FaultState::Failed as i32);
        assert!(failed.error.contains("target gone"), "{failed:?}");
        let b = id_of(s.create(spec("a1", 200), false, "t").expect("b"));
        let sc = wait_state(s, &b, ScenarioState::Failed).await;
        assert!(sc.reason.starts_with("the fault was applied on no agent: a1: "), "{}", sc.reason);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leftover_an_agent_finds_after_its_revert_is_shown_per_agent_and_audited() {
        let r = rig(2, open_policy(3)).await;
        let s = &r.scenarios;
        let diff = r#"nft tables inet in host netns: was "(none)", now "chaos_x""#;
        r.agents[1].leave_behind(Some(diff));
        let mut both = spec("a0", 200);
        both.selector = Some(pb::AgentSelector::default());
        let id = id_of(s.create(both, false, "t").expect("create"));
        let sc = wait_until(s, &id, "ended", |sc| is_final(sc.state)).await;
        let by = |a: &str| sc.agents.iter().find(|x| x.agent_id == a).cloned().expect("agent");
        assert_eq!((by("a0").fault_state, by("a0").revert_check), (FaultState::Reverted as i32, pb::RevertCheck::Unspecified as i32));
        let a1 = by("a1");
        assert_eq!(a1.revert_check, pb::RevertCheck::Different as i32, "{a1:?}");
        assert_eq!(a1.revert_check_detail, diff);
        assert!(a1.error.contains(diff), "{}", a1.error);
        assert_eq!(sc.state, ScenarioState::Failed as i32, "{}", sc.reason);
        assert!(sc.reason.contains("a1"), "{}", sc.reason);
        let audit = s.store().list_audit(None, 50).expect("audit");
        let rows: Vec<_> = audit.iter().filter(|a| a.action == "RevertNotVerified").collect();
        assert_eq!(rows.len(), 1, "{audit:?}");
        assert_eq!((rows[0].target.as_str(), rows[0].outcome.as_str()), ("a1", "error"));
        assert!(rows[0].detail.contains(diff), "{}", rows[0].detail);
        // The stored scenario says the same.
        let stored = s.store().load(&id).expect("load").expect("stored");
        assert_eq!(stored.agents.iter().find(|x| x.agent_id == "a1").map(|x| x.revert_check), Some(pb::RevertCheck::Different as i32));
    }

    #[tokio::test(start_paused = true)]
    async fn an_apply_that_waits_out_a_container_stop_grace_is_not_timed_out() {
        let r = rig(1, open_policy(3)).await;
        let s = &r.scenarios;
        // The agent answers after 5 s, as a 5 s stop would; the rig's call timeout is 2 s.
        r.agents[0].delay_apply(Some(Duration::from_secs(5)));
        let stop = |grace_s: i64| pb::FaultSpec {
            target: Some(pb::Target { kind: Some(pb::target::Kind::Container("web".into())) }),
            fault: Some(pb::fault_spec::Fault::ContainerAction(pb::ContainerAction {
                verb: pb::ContainerVerb::Stop as i32,
                stop_grace: Some(prost_types::Duration { seconds: grace_s, nanos: 0 }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let with = |fault: pb::FaultSpec| pb::ScenarioSpec { fault: Some(fault), severity: 4, ..spec("a0", 60_000) };
        let a = id_of(s.create(with(stop(20)), false, "t").expect("a"));
        let sc = wait_applied(s, &a, "a0").await;
        assert_eq!(sc.agents[0].error, "", "{sc:?}");
        s.stop(&a, "done").await.expect("stop");
        wait_until(s, &a, "ended", |sc| is_final(sc.state)).await;
        // A grace of 0 s allows nothing more: the same slow answer is timed out.
        let b = id_of(s.create(with(stop(0)), false, "t").expect("b"));
        let sc = wait_state(s, &b, ScenarioState::Failed).await;
        assert!(sc.reason.contains("no answer within 2s"), "{}", sc.reason);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shrinking_fleet_aborts_the_newest_scenario_over_the_blast_radius() {
        let policy = Policy { blast_radius_limit: 0.5, group_blast_radius_limit: 1.0, ..open_policy(3) };
        let r = rig(2, policy).await;
        // Two more agents with a short lease that will not be renewed.
        for i in 2..4 {
            r.registry
                .register(
                    pb::RegisterAgentRequest {
                        agent_id: format!("a{i}"),
                        address: "http://127.0.0.1:9".into(),
                        lease_duration: Some(duration_to_pb(Duration::from_millis(400))),
                        ..Default::default()
                    },
                    "test",
                    false,
                )
                .expect("register");
        }
        let s = &r.scenarios;
        let first = id_of(s.create(spec("a0", 60_000), false, "t").expect("1 of 4"));
        // Applied (started) before the second one starts.
        wait_applied(s, &first, "a0").await;
        let second = id_of(s.create(spec("a1", 60_000), false, "t").expect("2 of 4 = 50 %"));
        wait_state(s, &second, ScenarioState::Running).await;
        assert!(s.enforce_blast_radius().is_empty(), "within the limit while the fleet is whole");
        tokio::time::sleep(Duration::from_millis(450)).await;
        // a2 and a3 are lost: 2 of 2 live agents (100 %) > 50 %; the newest goes.
        assert_eq!(s.enforce_blast_radius(), vec![second.clone()]);
        let sc = wait_state(s, &second, ScenarioState::Aborted).await;
        assert!(sc.reason.contains("shrank to 2 agents"), "{}", sc.reason);
        assert_eq!(s.get(&first).expect("first").state, ScenarioState::Running as i32, "1 of 2 = 50 % fits");
    }

    #[tokio::test(start_paused = true)]
    async fn recovery_reverts_a_scenario_whose_end_passed_while_down() {
        let r = rig(1, open_policy(3)).await;
        let a = id_of(r.scenarios.create(spec("a0", 60_000), false, "t").expect("a"));
        wait_state(&r.scenarios, &a, ScenarioState::Running).await;
        // A second coordinator on the same store, as after a crash, with the end in the past.
        let mut sc = r.scenarios.store().load(&a).expect("load").expect("row");
        sc.ends_at = Some(timestamp_to_pb(SystemTime::now() - Duration::from_secs(1)));
        let store = Arc::new(Store::in_memory().expect("store"));
        store.save(&sc).expect("save");
        let timing = Timing {
            call_timeout: Duration::from_secs(2),
            revert_window: Duration::from_millis(300),
            revert_retry: Duration::from_millis(50),
        };
        let second = Scenarios::new(open_policy(3), Arc::clone(&r.registry), store, timing);
        assert_eq!(second.recover().expect("recover"), 1);
        let done = wait_state(&second, &a, ScenarioState::Completed).await;
        assert!(done.transitions.iter().any(|t| t.reason.contains("coordinator restarted after the scenario's end")), "{done:?}");
        assert!(r.agents[0].applied().is_empty(), "the recovered coordinator reverted it");
    }
}
