//! GameDay (random chaos, the seeds' "chaos nurse"): every interval, one
//! action picked at random, on one eligible agent picked at random, created
//! as a scenario so that every admission rule applies; time-boxed, ended
//! early by its SLO stop conditions, by StopGameDay or an emergency stop,
//! with a bounded history of what it did.
//!
//! The picking is [`Picker`]: no clock and no I/O (elapsed time, the fleet
//! and the busy agents are passed in), so a property test drives it with a
//! fake clock against the real admission over thousands of ticks.
//! [`GameDays`] is the task around it.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use chaos_proto::{
    convert::{duration_from_pb, duration_to_pb, timestamp_to_pb},
    pb::{self, AgentHealth, GameDayState, SelectionMode},
    rules::Rule,
    spec::family_of,
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::{
    sync::{broadcast, oneshot},
    time::Instant,
};
use tracing::{info, warn};

use crate::{
    admission::{AgentView, is_protected, matches},
    error::CoordinatorError,
    monitor::{
        alerts::{Engine, NamedRule},
        hub::{Hub, HubEvent, decoded},
    },
    policy::Policy,
    scenarios::{Scenarios, is_final},
    store::state_name,
};

const MAX_TIME_BOX: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_HISTORY: usize = 100;
const MAX_HISTORY: usize = 10_000;

/// One action a GameDay may pick.
#[derive(Debug, Clone)]
pub struct Action {
    pub name: String,
    pub fault: pb::FaultSpec,
    pub family: &'static str,
}

/// A checked GameDay spec.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub targets: pb::AgentSelector,
    pub actions: Vec<Action>,
    pub every: Duration,
    pub action_duration: Duration,
    pub time_box: Duration,
    pub severity: u32,
    pub stop_conditions: Vec<Rule>,
    pub history_limit: usize,
    pub seed: u64,
}

fn positive(field: &str, d: Option<&prost_types::Duration>) -> Result<Option<Duration>, CoordinatorError> {
    match d {
        None => Ok(None),
        Some(p) => duration_from_pb(p)
            .filter(|d| !d.is_zero())
            .map(Some)
            .ok_or_else(|| CoordinatorError::invalid(field, format!("must be > 0, got {}s", p.seconds))),
    }
}

impl Plan {
    /// Check a spec; errors name the field. Each action's fault is checked as
    /// a scenario's would be (`check` is [`Scenarios::validate`]).
    pub fn from_pb(
        spec: &pb::GameDaySpec,
        check: impl Fn(&pb::ScenarioSpec) -> Result<(&'static str, u32, Duration), CoordinatorError>,
    ) -> Result<Plan, CoordinatorError> {
        let every = positive("spec.every", spec.every.as_ref())?.ok_or_else(|| CoordinatorError::invalid("spec.every", "is required"))?;
        if every < Duration::from_secs(1) {
            return Err(CoordinatorError::invalid("spec.every", format!("must be at least 1s, got {} ms", every.as_millis())));
        }
        let time_box =
            positive("spec.time_box", spec.time_box.as_ref())?.ok_or_else(|| CoordinatorError::invalid("spec.time_box", "is required"))?;
        if time_box > MAX_TIME_BOX {
            return Err(CoordinatorError::invalid("spec.time_box", format!("must be at most 24h, got {} s", time_box.as_secs())));
        }
        let action_duration = positive("spec.action_duration", spec.action_duration.as_ref())?
            .unwrap_or_else(|| every.saturating_sub(Duration::from_secs(1)).max(Duration::from_secs(1)));
        if spec.actions.is_empty() {
            return Err(CoordinatorError::invalid("spec.actions", "needs at least one action"));
        }
        let mut actions = Vec::with_capacity(spec.actions.len());
        for (i, a) in spec.actions.iter().enumerate() {
            let fault = a.fault.clone().ok_or_else(|| CoordinatorError::invalid(&format!("spec.actions[{i}].fault"), "is required"))?;
            let probe = pb::ScenarioSpec {
                fault: Some(fault.clone()),
                duration: Some(duration_to_pb(action_duration)),
                severity: spec.severity,
                ..Default::default()
            };
            let (family, _, _) = check(&probe).map_err(|e| match e {
                CoordinatorError::Invalid { field, message } => {
                    CoordinatorError::invalid(&field.replacen("spec.", &format!("spec.actions[{i}]."), 1), message)
                }
                e => e,
            })?;
            let fam = fault.fault.as_ref().map(family_of).unwrap_or(family);
            actions.push(Action { name: if a.name.is_empty() { fam.to_string() } else { a.name.clone() }, fault, family: fam });
        }
        let stop_conditions = spec
            .stop_conditions
            .iter()
            .enumerate()
            .map(|(i, e)| Rule::parse(e).map_err(|m| CoordinatorError::invalid(&format!("spec.stop_conditions[{i}]"), m)))
            .collect::<Result<Vec<_>, _>>()?;
        let history_limit = match spec.history_limit as usize {
            0 => DEFAULT_HISTORY,
            n if n > MAX_HISTORY => {
                return Err(CoordinatorError::invalid("spec.history_limit", format!("must be at most {MAX_HISTORY}, got {n}")));
            }
            n => n,
        };
        Ok(Plan {
            name: if spec.name.is_empty() { "gameday".into() } else { spec.name.clone() },
            targets: spec.targets.clone().unwrap_or_default(),
            actions,
            every,
            action_duration,
            time_box,
            severity: spec.severity,
            stop_conditions,
            history_limit,
            seed: if spec.seed == 0 { rand::rng().random() } else { spec.seed },
        })
    }

    /// The scenario of one pick: `action` on `agent_id` alone.
    pub fn scenario(&self, action: usize, agent_id: &str) -> pb::ScenarioSpec {
        let a = &self.actions[action];
        pb::ScenarioSpec {
            name: format!("{}: {}", self.name, a.name),
            fault: Some(a.fault.clone()),
            selector: Some(pb::AgentSelector { labels: self.targets.labels.clone(), agent_ids: vec![agent_id.to_string()] }),
            mode: SelectionMode::One as i32,
            duration: Some(duration_to_pb(self.action_duration)),
            severity: self.severity,
            stop_conditions: self.stop_conditions.iter().map(|r| r.expr.clone()).collect(),
            ..Default::default()
        }
    }
}

/// What the picker says at a moment.
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    /// Nothing due before this much time passes.
    Wait(Duration),
    /// The time box ran out.
    Over,
    /// Pick `n`: this action on this agent.
    Target { n: u64, action: usize, agent_id: String },
    /// Pick `n` found nothing eligible.
    Skip { n: u64, why: String },
}

/// The random picks of a plan, on a clock given from outside.
pub struct Picker {
    rng: StdRng,
    next_n: u64,
    next_at: Duration,
}

impl Picker {
    /// The first pick is due at once.
    pub fn new(seed: u64) -> Picker {
        Picker { rng: StdRng::seed_from_u64(seed), next_n: 1, next_at: Duration::ZERO }
    }

    /// At `elapsed` since the start: the pick due, if any. Eligible agents
    /// match the targets, are healthy and unprotected, support the action's
    /// family and are not under a fault already (`busy`); actions are tried
    /// in a random order until one has an eligible agent.
    pub fn poll(&mut self, plan: &Plan, policy: &Policy, elapsed: Duration, fleet: &[AgentView], busy: &BTreeSet<String>) -> Pick {
        if elapsed >= plan.time_box {
            return Pick::Over;
        }
        if elapsed < self.next_at {
            return Pick::Wait(self.next_at - elapsed);
        }
        let n = self.next_n;
        self.next_n += 1;
        // The next pick is one interval after this one was due (no burst after a stall).
        self.next_at = (self.next_at + plan.every).max(elapsed + plan.every / 2);
        let mut order: Vec<usize> = (0..plan.actions.len()).collect();
        order.shuffle(&mut self.rng);
        let candidates = |fam: &str| -> Vec<&AgentView> {
            fleet
                .iter()
                .filter(|a| {
                    matches(a, &plan.targets)
                        && a.health == AgentHealth::Healthy
                        && !is_protected(policy, a)
                        && !busy.contains(&a.agent_id)
                        && a.families.as_ref().is_none_or(|f| f.contains(fam))
                })
                .collect()
        };
        for i in order {
            let c = candidates(plan.actions[i].family);
            if !c.is_empty() {
                let agent = c[self.rng.random_range(0..c.len())];
                return Pick::Target { n, action: i, agent_id: agent.agent_id.clone() };
            }
        }
        let matching = fleet.iter().filter(|a| matches(a, &plan.targets)).count();
        Pick::Skip {
            n,
            why: format!(
                "no eligible target: {matching} agent(s) match the targets, none healthy, unprotected, idle and supporting one of the actions"
            ),
        }
    }
}

/// The state of the current (or last) GameDay.
struct Live {
    id: String,
    plan: Plan,
    spec: pb::GameDaySpec,
    state: GameDayState,
    reason: String,
    started_at: SystemTime,
    ended_at: Option<SystemTime>,
    counts: [u64; 4],
    history: VecDeque<pb::GameDayTick>,
    max_affected: (u32, u32),
    stop: Option<oneshot::Sender<(GameDayState, String)>>,
}

impl Live {
    fn to_pb(&self, history: usize) -> pb::GameDay {
        let skip = if history == 0 { 0 } else { self.history.len().saturating_sub(history) };
        pb::GameDay {
            id: self.id.clone(),
            spec: Some(self.spec.clone()),
            state: self.state as i32,
            reason: self.reason.clone(),
            started_at: Some(timestamp_to_pb(self.started_at)),
            ends_at: Some(timestamp_to_pb(self.started_at + self.plan.time_box)),
            ended_at: self.ended_at.map(timestamp_to_pb),
            ticks: self.counts[0],
            injected: self.counts[1],
            refused: self.counts[2],
            skipped: self.counts[3],
            history: self.history.iter().skip(skip).cloned().collect(),
            max_agents_affected: self.max_affected.0,
            fleet_agents: self.max_affected.1,
        }
    }

    fn push(&mut self, tick: pb::GameDayTick) {
        if self.history.len() >= self.plan.history_limit {
            self.history.pop_front();
        }
        self.history.push_back(tick);
    }
}

/// The GameDay service: one at a time. Each GameDay's record (with its
/// kept history) is written to the store at its start, at each pick and at
/// its end; one found RUNNING at start-up ended with the coordinator.
pub struct GameDays {
    scenarios: Arc<Scenarios>,
    hub: Option<Arc<Hub>>,
    current: Mutex<Option<Live>>,
    /// The last GameDay of a previous coordinator run, until a new one starts.
    previous: Mutex<Option<pb::GameDay>>,
}

fn state_text(s: GameDayState) -> &'static str {
    match s {
        GameDayState::Running => "RUNNING",
        GameDayState::Completed => "COMPLETED",
        GameDayState::Stopped => "STOPPED",
        GameDayState::Aborted => "ABORTED",
        GameDayState::Unspecified => "UNSPECIFIED",
    }
}

/// A history entry whose action was injected and has no outcome yet.
fn is_pending(t: &pb::GameDayTick) -> bool {
    !t.scenario_id.is_empty() && t.outcome.is_empty()
}

/// How a running GameDay is told to end: the state it ends in and why.
type StopRx = oneshot::Receiver<(GameDayState, String)>;

impl GameDays {
    /// `hub`: the monitoring hub (None when monitoring is off: SLOs are refused then).
    pub fn new(scenarios: Arc<Scenarios>, hub: Option<Arc<Hub>>) -> Arc<Self> {
        let previous = match scenarios.store().last_gameday() {
            Ok(Some(mut g)) if g.state == GameDayState::Running as i32 => {
                // Its scenarios are recovered (and reverted) with the others; the GameDay itself ended with the coordinator.
                g.state = GameDayState::Aborted as i32;
                g.reason = "the coordinator stopped while it ran".into();
                g.ended_at = Some(timestamp_to_pb(SystemTime::now()));
                if let Err(e) = scenarios.store().save_gameday(&g) {
                    tracing::error!(error = %e, "cannot record the end of the previous GameDay");
                }
                if let Err(e) =
                    scenarios.store().audit("coordinator", "EndGameDay", &g.id, "ABORTED: the coordinator stopped while it ran", "ok")
                {
                    tracing::error!(error = %e, "audit write failed");
                }
                warn!(gameday = %g.id, "a GameDay was running when the coordinator stopped: recorded as aborted");
                Some(g)
            }
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the last GameDay");
                None
            }
        };
        let running: Vec<String> = previous
            .iter()
            .filter(|g| g.reason == "the coordinator stopped while it ran")
            .flat_map(|g| g.history.iter().filter(|t| is_pending(t)).map(|t| t.scenario_id.clone()))
            .collect();
        let me = Arc::new(GameDays { scenarios, hub, current: Mutex::new(None), previous: Mutex::new(previous) });
        if !running.is_empty() {
            // Its actions that the restart recovered end now, as they would have with the GameDay.
            tokio::spawn(Arc::clone(&me).end_orphans(running));
        }
        me
    }

    async fn end_orphans(self: Arc<Self>, ids: Vec<String>) {
        let stops = ids.iter().map(|id| self.scenarios.stop(id, "its GameDay ended when the coordinator stopped"));
        let ended = futures::future::join_all(stops).await;
        let mut prev = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = prev.as_mut() {
            for sc in ended.into_iter().flatten() {
                if let Some(t) = g.history.iter_mut().find(|t| t.scenario_id == sc.id) {
                    t.outcome = state_name(sc.state);
                }
            }
            let g = g.clone();
            drop(prev);
            self.persist(&g);
        }
    }

    fn persist(&self, g: &pb::GameDay) {
        if let Err(e) = self.scenarios.store().save_gameday(g) {
            tracing::error!(gameday = %g.id, error = %e, "cannot record the GameDay");
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Live>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn start(self: &Arc<Self>, spec: pb::GameDaySpec, actor: &crate::store::Actor) -> Result<pb::GameDay, CoordinatorError> {
        let (snapshot, plan, rx) = self.begin(spec, actor)?;
        let id = snapshot.id.clone();
        tokio::spawn(Arc::clone(self).run_guarded(id.clone(), Arc::clone(self).run(id, plan, rx)));
        Ok(snapshot)
    }

    /// Record a new running GameDay (checked, persisted, audited); its runner is the caller's to start.
    fn begin(
        self: &Arc<Self>,
        spec: pb::GameDaySpec,
        actor: &crate::store::Actor,
    ) -> Result<(pb::GameDay, Plan, StopRx), CoordinatorError> {
        let plan = Plan::from_pb(&spec, |s| self.scenarios.validate(s))?;
        if !plan.stop_conditions.is_empty() && self.hub.is_none() {
            return Err(CoordinatorError::Refused(
                "spec.stop_conditions: monitoring is disabled on this coordinator (monitoring.enabled: false), so SLOs cannot be watched"
                    .into(),
            ));
        }
        let mut g = self.lock();
        if let Some(l) = g.as_ref().filter(|l| l.state == GameDayState::Running) {
            return Err(CoordinatorError::Refused(format!("GameDay {} ({}) is running: stop it first", l.id, l.plan.name)));
        }
        let id = format!("gd-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let (tx, rx) = oneshot::channel();
        let live = Live {
            id: id.clone(),
            plan: plan.clone(),
            spec: pb::GameDaySpec { seed: plan.seed, ..spec },
            state: GameDayState::Running,
            reason: "running".into(),
            started_at: SystemTime::now(),
            ended_at: None,
            counts: [0; 4],
            history: VecDeque::new(),
            max_affected: (0, 0),
            stop: Some(tx),
        };
        let snapshot = live.to_pb(0);
        *g = Some(live);
        drop(g);
        self.previous.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.persist(&snapshot);
        let detail = format!(
            "{}: every {} s for {} s, {} action(s), seed {}",
            plan.name,
            plan.every.as_secs_f64(),
            plan.time_box.as_secs(),
            plan.actions.len(),
            plan.seed
        );
        if let Err(e) = self.scenarios.store().audit_by(actor, "StartGameDay", &id, &detail, "ok") {
            tracing::error!(error = %e, "audit write failed");
        }
        info!(gameday = %id, "{detail}");
        Ok((snapshot, plan, rx))
    }

    fn audit(&self, actor: &str, action: &str, target: &str, detail: &str) {
        if let Err(e) = self.scenarios.store().audit(actor, action, target, detail, "ok") {
            tracing::error!(error = %e, "audit write failed");
        }
    }

    /// Tell the running GameDay to end (without waiting); false when none runs.
    pub fn signal(&self, state: GameDayState, reason: &str) -> bool {
        let tx = self.lock().as_mut().and_then(|l| l.stop.take());
        tx.is_some_and(|tx| tx.send((state, reason.to_string())).is_ok())
    }

    /// End the running GameDay (its running actions are reverted); answers once it has ended.
    pub async fn stop(&self, state: GameDayState, reason: &str) -> Result<pb::GameDay, CoordinatorError> {
        if self.signal(state, reason) {
            // The task reverts the running actions, then marks the end.
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until && self.lock().as_ref().is_some_and(|l| l.state == GameDayState::Running) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.get(0)
    }

    pub fn get(&self, history: usize) -> Result<pb::GameDay, CoordinatorError> {
        if let Some(l) = self.lock().as_ref() {
            return Ok(l.to_pb(history));
        }
        let mut g = self
            .previous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| CoordinatorError::NotFound("GameDay (none has run)".into()))?;
        let skip = if history == 0 { 0 } else { g.history.len().saturating_sub(history) };
        g.history.drain(..skip);
        Ok(g)
    }

    fn with(&self, f: impl FnOnce(&mut Live)) {
        if let Some(l) = self.lock().as_mut() {
            f(l);
        }
    }

    /// Runs a GameDay's runner (`run`, [`Self::run`]); if it panics (a bug), the GameDay still ends
    /// ABORTED saying so, and the actions it injected that still run are stopped (reverted).
    async fn run_guarded(self: Arc<Self>, id: String, run: impl Future<Output = ()>) {
        let Err(why) = chaos_proto::serve::catch_panic(run).await else { return };
        tracing::error!(gameday = %id, panic = %why, "GameDay runner panicked");
        let reason = format!("the GameDay's runner failed (a bug, logged by the coordinator): {why}");
        let mut running = vec![];
        self.with(|l| running = l.history.iter().filter(|t| is_pending(t)).map(|t| t.scenario_id.clone()).collect());
        self.finish(&id, &running, GameDayState::Aborted, reason).await;
    }

    async fn run(self: Arc<Self>, id: String, plan: Plan, mut stop: StopRx) {
        let t0 = Instant::now();
        let started = SystemTime::now();
        let policy = self.scenarios.policy().clone();
        let mut picker = Picker::new(plan.seed);
        let mut created: Vec<String> = vec![];
        let mut slo = self.hub.as_ref().filter(|_| !plan.stop_conditions.is_empty()).map(|h| h.subscribe());
        let rules: Vec<NamedRule> = plan
            .stop_conditions
            .iter()
            .enumerate()
            .map(|(i, r)| NamedRule { name: format!("{id} slo[{i}]"), rule: r.clone(), scenario: Some((id.clone(), started)) })
            .collect();
        let mut engine = Engine::default();
        let (end_state, end_reason) = 'run: loop {
            let fleet = self.scenarios.fleet();
            let busy = self.scenarios.busy_agents();
            let live = fleet.iter().filter(|a| a.health != AgentHealth::Lost).count() as u32;
            let affected = busy.len() as u32;
            self.with(|l| {
                if affected > l.max_affected.0 {
                    l.max_affected = (affected, live);
                }
            });
            self.settle(true);
            let wait = match picker.poll(&plan, &policy, t0.elapsed(), &fleet, &busy) {
                Pick::Over => break (GameDayState::Completed, format!("time box of {} s ran out", plan.time_box.as_secs())),
                Pick::Wait(w) => w.min(Duration::from_secs(1)),
                Pick::Skip { n, why } => {
                    self.record(n, "", "", "", format!("skipped: {why}"), 3);
                    continue;
                }
                Pick::Target { n, action, agent_id } => {
                    let spec = plan.scenario(action, &agent_id);
                    let name = plan.actions[action].name.clone();
                    match self.scenarios.create(spec, false, &format!("gameday {id}")) {
                        Ok(r) => {
                            let sid = r.scenario.map(|s| s.id).unwrap_or_default();
                            info!(gameday = %id, n, action = %name, agent = %agent_id, scenario = %sid, "GameDay pick injected");
                            created.push(sid.clone());
                            self.record(n, &name, &agent_id, &sid, "injected".into(), 1);
                        }
                        Err(e) => {
                            info!(gameday = %id, n, action = %name, agent = %agent_id, reason = %e, "GameDay pick refused");
                            self.record(n, &name, &agent_id, "", format!("refused: {e}"), 2);
                        }
                    }
                    continue;
                }
            };
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => continue 'run,
                    s = &mut stop => break 'run s.unwrap_or((GameDayState::Stopped, "the coordinator is shutting down".into())),
                    ev = async { match slo.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                        match ev {
                            Ok(HubEvent::Batch(shared)) => {
                                let Some(b) = decoded(&shared) else { continue };
                                let out = engine.observe(&rules, &b, Instant::now());
                                if let Some((_, why)) = out.aborts.into_iter().next() {
                                    break 'run (GameDayState::Aborted, format!("SLO breached: {why}"));
                                }
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(n)) => warn!(gameday = %id, skipped = n, "SLO evaluation fell behind the hub"),
                            Err(broadcast::error::RecvError::Closed) => slo = None,
                        }
                    }
                }
            }
        };
        // Its running actions end with it (reverted), all at once.
        self.finish(&id, &created, end_state, end_reason).await;
    }

    /// End the GameDay: stop (revert) `actions`, settle the outcome of each action still pending in
    /// its history, and record the end (persisted, logged, audited).
    async fn finish(&self, id: &str, actions: &[String], end_state: GameDayState, end_reason: String) {
        let reason = format!("GameDay {id} ended: {end_reason}");
        let stops = actions.iter().map(|sid| self.scenarios.stop(sid, &reason));
        for r in futures::future::join_all(stops).await {
            if let Err(e) = r {
                warn!(gameday = %id, error = %e, "stopping a GameDay action");
            }
        }
        self.settle(false);
        let mut summary = String::new();
        self.with(|l| {
            l.state = end_state;
            l.reason = end_reason.clone();
            l.ended_at = Some(SystemTime::now());
            l.stop = None;
            summary = format!(
                "{}: {} picks, {} injected, {} refused, {} skipped",
                end_reason, l.counts[0], l.counts[1], l.counts[2], l.counts[3]
            );
        });
        if let Ok(g) = self.get(0) {
            self.persist(&g);
        }
        info!(gameday = %id, state = state_text(end_state), "GameDay ended: {summary}");
        self.audit("coordinator", "EndGameDay", id, &format!("{}: {summary}", state_text(end_state)));
    }

    /// Record the scenario state of each action still pending in the history
    /// (`only_final`: only of those that ended). The scenarios are read with
    /// the GameDay's lock let go: one that ended is read from the store.
    fn settle(&self, only_final: bool) {
        let mut pending: Vec<String> = vec![];
        self.with(|l| pending = l.history.iter().filter(|t| is_pending(t)).map(|t| t.scenario_id.clone()).collect());
        if pending.is_empty() {
            return;
        }
        let states: BTreeMap<String, i32> = pending
            .into_iter()
            .filter_map(|sid| self.scenarios.get(&sid).ok().filter(|sc| !only_final || is_final(sc.state)).map(|sc| (sid, sc.state)))
            .collect();
        self.with(|l| {
            for t in l.history.iter_mut().filter(|t| is_pending(t)) {
                if let Some(state) = states.get(&t.scenario_id) {
                    t.outcome = state_name(*state);
                }
            }
        });
    }

    /// One history entry; `kind` counts it (1 injected, 2 refused, 3 skipped).
    fn record(&self, n: u64, action: &str, agent_id: &str, scenario_id: &str, result: String, kind: usize) {
        let mut snapshot = None;
        self.with(|l| {
            l.counts[0] += 1;
            l.counts[kind] += 1;
            l.push(pb::GameDayTick {
                at: Some(timestamp_to_pb(SystemTime::now())),
                n,
                action: action.into(),
                agent_id: agent_id.into(),
                scenario_id: scenario_id.into(),
                result,
                outcome: String::new(),
            });
            snapshot = Some(l.to_pb(0));
        });
        if let Some(g) = snapshot {
            self.persist(&g);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chaos_proto::pb::fault_spec::Fault;

    use super::*;
    use crate::admission;

    fn agent(i: usize, role: &str) -> AgentView {
        AgentView {
            agent_id: format!("a{i:02}"),
            address: format!("http://a{i}:1"),
            labels: BTreeMap::from([("role".to_string(), role.to_string())]),
            health: AgentHealth::Healthy,
            families: None,
        }
    }

    fn pause() -> pb::FaultSpec {
        pb::FaultSpec {
            target: Some(pb::Target { kind: Some(pb::target::Kind::ProcessName("java".into())) }),
            fault: Some(Fault::ProcessPause(pb::ProcessPause {})),
            ..Default::default()
        }
    }

    fn spec(every_s: i64, box_s: i64) -> pb::GameDaySpec {
        pb::GameDaySpec {
            name: "nurse".into(),
            targets: Some(pb::AgentSelector { labels: [("role".to_string(), "app".to_string())].into(), agent_ids: vec![] }),
            actions: vec![pb::GameDayAction { name: "pause java".into(), fault: Some(pause()) }],
            every: Some(prost_types::Duration { seconds: every_s, nanos: 0 }),
            time_box: Some(prost_types::Duration { seconds: box_s, nanos: 0 }),
            ..Default::default()
        }
    }

    fn accept(s: &pb::ScenarioSpec) -> Result<(&'static str, u32, Duration), CoordinatorError> {
        Ok((s.fault.as_ref().and_then(|f| f.fault.as_ref()).map(family_of).unwrap_or("?"), 1, Duration::from_secs(1)))
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        let err = |s: pb::GameDaySpec| Plan::from_pb(&s, accept).expect_err("refused").to_string();
        assert!(err(pb::GameDaySpec { every: None, ..spec(10, 60) }).starts_with("spec.every is required"));
        assert!(err(spec(0, 60)).contains("spec.every must be > 0"));
        assert!(err(pb::GameDaySpec { time_box: None, ..spec(10, 60) }).starts_with("spec.time_box is required"));
        assert!(err(spec(10, 90_000)).contains("at most 24h"));
        assert!(err(pb::GameDaySpec { actions: vec![], ..spec(10, 60) }).contains("spec.actions needs at least one"));
        let e = err(pb::GameDaySpec { actions: vec![pb::GameDayAction { name: "x".into(), fault: None }], ..spec(10, 60) });
        assert!(e.starts_with("spec.actions[0].fault is required"), "{e}");
        let e = err(pb::GameDaySpec { stop_conditions: vec!["nonsense".into()], ..spec(10, 60) });
        assert!(e.starts_with("spec.stop_conditions[0]"), "{e}");
        let e = Plan::from_pb(&spec(10, 60), |_| Err(CoordinatorError::invalid("spec.fault.process_pause.target", "names no process")))
            .expect_err("refused")
            .to_string();
        assert!(e.starts_with("spec.actions[0].fault.process_pause.target"), "{e}");
        let p = Plan::from_pb(&spec(10, 60), accept).expect("plan");
        assert_eq!(p.action_duration, Duration::from_secs(9), "one action ends before the next starts");
        assert_eq!(p.actions[0].family, "process_pause");
    }

    #[test]
    fn picks_are_due_every_interval_and_end_with_the_time_box() {
        let plan = Plan::from_pb(&pb::GameDaySpec { seed: 7, ..spec(10, 35) }, accept).expect("plan");
        let policy = Policy::default();
        let fleet = vec![agent(1, "app"), agent(2, "db")];
        let mut p = Picker::new(plan.seed);
        let none = BTreeSet::new();
        assert!(
            matches!(p.poll(&plan, &policy, Duration::ZERO, &fleet, &none), Pick::Target { n: 1, ref agent_id, .. } if agent_id == "a01")
        );
        assert_eq!(p.poll(&plan, &policy, Duration::from_secs(4), &fleet, &none), Pick::Wait(Duration::from_secs(6)));
        assert!(matches!(p.poll(&plan, &policy, Duration::from_secs(10), &fleet, &none), Pick::Target { n: 2, .. }));
        let busy = BTreeSet::from(["a01".to_string()]);
        assert!(
            matches!(p.poll(&plan, &policy, Duration::from_secs(20), &fleet, &busy), Pick::Skip { n: 3, .. }),
            "a01 is busy, a02 is not a target"
        );
        assert_eq!(p.poll(&plan, &policy, Duration::from_secs(35), &fleet, &none), Pick::Over);
    }

    /// The property: over many GameDays (random fleets, protected agents,
    /// lost agents, limits, intervals and action durations, scenarios of
    /// other users) driven by a fake clock, the picks that admission lets
    /// through never hold more of the fleet (or of the target group) under a
    /// fault than the blast-radius limits allow, never touch a protected or
    /// unhealthy agent, and nothing is picked after the time box.
    #[test]
    fn a_gameday_never_exceeds_the_blast_radius_over_many_ticks() {
        let mut world = StdRng::seed_from_u64(0xc4a05);
        let mut injected_total = 0u64;
        let mut refused_total = 0u64;
        for round in 0..200 {
            let n_agents = world.random_range(1..=12);
            let mut fleet: Vec<AgentView> = (0..n_agents).map(|i| agent(i, if world.random_bool(0.7) { "app" } else { "db" })).collect();
            for a in fleet.iter_mut() {
                if world.random_bool(0.15) {
                    a.labels.insert("chaos.protected".into(), "true".into());
                }
                if world.random_bool(0.1) {
                    a.health = if world.random_bool(0.5) { AgentHealth::Late } else { AgentHealth::Lost };
                }
            }
            let policy = Policy {
                blast_radius_limit: [0.1, 0.25, 0.3, 0.5, 1.0][world.random_range(0..5)],
                group_blast_radius_limit: [0.2, 0.5, 1.0][world.random_range(0..3)],
                ..Policy::default()
            };
            let every = world.random_range(1..=20);
            let box_s = world.random_range(every..=every * 60);
            let mut s = spec(every as i64, box_s as i64);
            s.action_duration = Some(prost_types::Duration { seconds: world.random_range(1..=every * 3) as i64, nanos: 0 });
            s.seed = world.random();
            let plan = Plan::from_pb(&s, accept).expect("plan");
            let mut picker = Picker::new(plan.seed);
            // Running scenarios: (agent ids, ends at, made by the GameDay).
            let mut running: Vec<(Vec<String>, Duration, bool)> = vec![];
            let mut now = Duration::ZERO;
            let step = Duration::from_millis(250);
            let live: Vec<&AgentView> = fleet.iter().filter(|a| a.health != AgentHealth::Lost).collect();
            let group: Vec<&&AgentView> = live.iter().filter(|a| a.labels.get("role").map(String::as_str) == Some("app")).collect();
            loop {
                running.retain(|(_, ends, _)| *ends > now);
                // Someone else's scenario now and then (admitted by the same rules).
                if world.random_bool(0.01) && !live.is_empty() {
                    let other = pb::ScenarioSpec {
                        fault: Some(pause()),
                        selector: Some(plan.targets.clone()),
                        mode: SelectionMode::One as i32,
                        ..Default::default()
                    };
                    let busy: BTreeSet<String> = running.iter().flat_map(|r| r.0.clone()).collect();
                    let d = admission::decide(&policy, &fleet, &busy, &other, "process_pause", &mut world);
                    if d.refusals.is_empty() {
                        running.push((d.selected.iter().map(|a| a.agent_id.clone()).collect(), now + Duration::from_secs(15), false));
                    }
                }
                let busy: BTreeSet<String> = running.iter().flat_map(|r| r.0.clone()).collect();
                match picker.poll(&plan, &policy, now, &fleet, &busy) {
                    Pick::Over => {
                        assert!(now >= plan.time_box, "round {round}: over before the time box");
                        break;
                    }
                    Pick::Wait(w) => assert!(!w.is_zero() && w <= plan.every, "round {round}: wait {w:?}"),
                    Pick::Skip { .. } => {}
                    Pick::Target { action, agent_id, .. } => {
                        assert!(now < plan.time_box, "round {round}: a pick after the time box");
                        let a = fleet.iter().find(|a| a.agent_id == agent_id).expect("a fleet agent");
                        assert!(a.health == AgentHealth::Healthy && !is_protected(&policy, a), "round {round}: picked {a:?}");
                        assert!(!busy.contains(&agent_id), "round {round}: picked a busy agent");
                        let sc = plan.scenario(action, &agent_id);
                        let d = admission::decide(&policy, &fleet, &busy, &sc, plan.actions[action].family, &mut world);
                        if d.refusals.is_empty() {
                            injected_total += 1;
                            running.push((d.selected.iter().map(|a| a.agent_id.clone()).collect(), now + plan.action_duration, true));
                        } else {
                            refused_total += 1;
                        }
                    }
                }
                // The invariant, after every tick.
                let affected: BTreeSet<&str> = running.iter().flat_map(|r| r.0.iter().map(String::as_str)).collect();
                if !live.is_empty() && running.iter().any(|r| r.2) {
                    let frac = affected.len() as f64 / live.len() as f64;
                    assert!(
                        frac <= policy.blast_radius_limit + 1e-9,
                        "round {round}: {} of {} agents under faults > {}",
                        affected.len(),
                        live.len(),
                        policy.blast_radius_limit
                    );
                    let in_group = group.iter().filter(|a| affected.contains(a.agent_id.as_str())).count();
                    if group.len() < live.len() && !group.is_empty() {
                        let gfrac = in_group as f64 / group.len() as f64;
                        assert!(
                            gfrac <= policy.group_blast_radius_limit + 1e-9,
                            "round {round}: group {in_group}/{} > {}",
                            group.len(),
                            policy.group_blast_radius_limit
                        );
                    }
                }
                now += step;
            }
        }
        // The property is not vacuous: both outcomes happened many times.
        assert!(injected_total > 500 && refused_total > 50, "injected {injected_total}, refused {refused_total}");
    }

    #[test]
    fn history_is_bounded_to_the_newest_entries() {
        let plan = Plan::from_pb(&pb::GameDaySpec { history_limit: 3, ..spec(10, 60) }, accept).expect("plan");
        let mut l = Live {
            id: "gd".into(),
            plan,
            spec: spec(10, 60),
            state: GameDayState::Running,
            reason: String::new(),
            started_at: SystemTime::now(),
            ended_at: None,
            counts: [0; 4],
            history: VecDeque::new(),
            max_affected: (0, 0),
            stop: None,
        };
        for n in 1..=10 {
            l.push(pb::GameDayTick { n, ..Default::default() });
        }
        let ns: Vec<u64> = l.to_pb(0).history.iter().map(|t| t.n).collect();
        assert_eq!(ns, vec![8, 9, 10]);
        assert_eq!(l.to_pb(2).history.iter().map(|t| t.n).collect::<Vec<_>>(), vec![9, 10]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_runner_ends_the_gameday_aborted_and_stops_its_actions() {
        use chaos_proto::pb::ScenarioState;

        use crate::scenarios::tests::{open_policy, rig, spec as scenario, wait_state};
        let r = rig(1, open_policy(3)).await;
        let gd = GameDays::new(Arc::clone(&r.scenarios), None);
        let (snapshot, _plan, _stop) = gd.begin(spec(10, 60), &crate::store::Actor::default()).expect("begin");
        let id = snapshot.id;
        // The runner injects one action, then panics (standing in for any bug in its loop).
        let sid = r.scenarios.create(scenario("a0", 60_000), false, "t").expect("create").scenario.expect("scenario").id;
        wait_state(&r.scenarios, &sid, ScenarioState::Running).await;
        let runner = {
            let (gd, sid) = (Arc::clone(&gd), sid.clone());
            async move {
                gd.record(1, "pause java", "a0", &sid, "injected".into(), 1);
                panic!("index out of bounds in the picker");
            }
        };
        Arc::clone(&gd).run_guarded(id.clone(), runner).await;
        let g = gd.get(0).expect("gameday");
        assert_eq!(g.state, GameDayState::Aborted as i32, "{g:?}");
        assert!(g.reason.contains("runner failed") && g.reason.contains("index out of bounds in the picker"), "{}", g.reason);
        assert!(g.ended_at.is_some());
        let sc = r.scenarios.get(&sid).expect("scenario");
        assert!(is_final(sc.state), "its action is stopped: {sc:?}");
        assert!(r.agents[0].applied().is_empty(), "and reverted on the agent");
        assert_eq!(g.history[0].outcome, state_name(sc.state));
        let stored = r.scenarios.store().last_gameday().expect("store").expect("persisted");
        assert_eq!((stored.state, stored.reason), (g.state, g.reason));
        let audit = r.scenarios.store().list_audit(None, 10).expect("audit");
        assert!(audit.iter().any(|a| a.action == "EndGameDay" && a.target == id && a.detail.starts_with("ABORTED: ")), "{audit:?}");
        // A new GameDay can start: the panicked one is not left running.
        assert!(gd.begin(spec(10, 60), &crate::store::Actor::default()).is_ok());
    }
}
