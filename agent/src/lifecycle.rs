//! The fault lifecycle: one owner task holds every fault's state and
//! decides every transition. Requests reach it as messages; TTLs, revert
//! retries and the dead-man lease are deadlines in its own loop (tokio
//! time, so tests drive them with `tokio::time::pause`).
//!
//! ```text
//!  ApplyFault ─ validate ─ plan ─ journal.put (fsync) ─ driver.apply ─► APPLIED ─┐
//!                                      │ apply failed: driver.revert, journal.remove, FAILED
//!  TTL | RevertFault | RevertAll | lease lost | SIGTERM | disarmed by coordinator
//!                                                                                ▼
//!                       driver.revert ─ ok ─ journal.remove ─► REVERTED (history)
//!                                     └ err ─► FAILED (journal kept, retried)
//!  start: every journal record ─► driver.revert (REVERT_REASON_JOURNAL_REPLAY)
//! ```

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chaos_proto::{
    convert::{human_duration, timestamp_to_pb},
    pb::{self, FaultState, RevertReason},
    spec::FaultRequest,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tracing::{error, info, warn};

use crate::{
    error::AgentError,
    faults::{Applied, Drivers, Plan},
    journal::{JournalRecord, JournalStore, quarantine},
};

/// Lifecycle settings.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    pub max_fault_duration: Duration,
    /// `Some` when registered with a coordinator: the dead-man lease.
    pub lease: Option<LeaseConfig>,
    /// How many finished faults ListFaults can still show.
    pub history_len: usize,
    /// Wait between retries of a failed revert.
    pub revert_retry_interval: Duration,
    /// Prometheus counters of applies and reverts.
    pub counters: crate::metrics::FaultCounters,
}

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub duration: Duration,
    pub coordinator_url: String,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            max_fault_duration: Duration::from_secs(3600),
            lease: None,
            history_len: 256,
            revert_retry_interval: Duration::from_secs(5),
            counters: Default::default(),
        }
    }
}

/// What start-up found in the journal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub reverted: usize,
    pub failed: usize,
    pub corrupt: usize,
}

/// The outcome of RevertAll.
#[derive(Debug, Default, Clone)]
pub struct RevertAllOutcome {
    pub reverted: Vec<pb::Fault>,
    pub failed: Vec<pb::Fault>,
    pub armed: bool,
}

/// The agent's state as the lease client and capabilities see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleStatus {
    pub armed: bool,
    pub lease_lost: bool,
    pub active_faults: usize,
    /// Why the coordinator refused this agent (e.g. its id is held by
    /// another live process); None unless refused since the last contact.
    pub refused: Option<String>,
}

enum Cmd {
    Apply(Box<FaultRequest>, oneshot::Sender<Result<pb::Fault, AgentError>>),
    Revert(String, oneshot::Sender<Result<(pb::Fault, bool), AgentError>>),
    RevertAll { reason: RevertReason, disarm: Option<String>, reply: oneshot::Sender<RevertAllOutcome> },
    List(bool, oneshot::Sender<Vec<pb::Fault>>),
    SetArmed { armed: bool, reason: String, reply: oneshot::Sender<bool> },
    Contact { coordinator_armed: bool, reply: oneshot::Sender<()> },
    Refused { reason: String, reply: oneshot::Sender<()> },
    Status(oneshot::Sender<LifecycleStatus>),
    Shutdown(oneshot::Sender<RevertAllOutcome>),
}

/// Handle to the lifecycle task; cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    tx: mpsc::Sender<Cmd>,
    max_fault_duration: Duration,
}

struct Entry {
    id: String,
    req: FaultRequest,
    plan: Plan,
    state: FaultState,
    applied: Option<Applied>,
    created_at: SystemTime,
    applied_at: Option<SystemTime>,
    expires_at: Instant,
    expires_wall: SystemTime,
    error: String,
    /// Why it is being reverted, once it is (kept across retries).
    revert_reason: RevertReason,
    /// When to try a failed revert again.
    retry_at: Option<Instant>,
    revert_summary: String,
    reverted_at: Option<SystemTime>,
}

impl Entry {
    fn to_pb(&self) -> pb::Fault {
        pb::Fault {
            id: self.id.clone(),
            spec: Some(self.req.to_pb(&self.id)),
            state: self.state as i32,
            applied: self.applied.as_ref().map(Into::into),
            created_at: Some(timestamp_to_pb(self.created_at)),
            applied_at: self.applied_at.map(timestamp_to_pb),
            expires_at: Some(timestamp_to_pb(self.expires_wall)),
            reverted_at: self.reverted_at.map(timestamp_to_pb),
            revert_reason: self.revert_reason as i32,
            error: self.error.clone(),
            revert_summary: self.revert_summary.clone(),
        }
    }
}

/// Refresh an active fault's measured figures from its driver.
fn observe(drivers: &Drivers, entry: &mut Entry) {
    if entry.state != FaultState::Applied {
        return;
    }
    if let (Some(applied), Some(o)) = (entry.applied.as_mut(), drivers.for_plan(&entry.plan).observe(&entry.plan)) {
        if let Some(out) = o.outcome.as_deref().filter(|o| *o != applied.outcome) {
            warn!(fault_id = %entry.id, outcome = %out, "fault changed on its own");
        }
        applied.update(o);
    }
}

struct Actor {
    cfg: LifecycleConfig,
    drivers: Arc<Drivers>,
    journal: Arc<dyn JournalStore>,
    active: BTreeMap<String, Entry>,
    history: VecDeque<pb::Fault>,
    arming: Arming,
    last_contact: Option<Instant>,
    started: Instant,
    lease_lost: bool,
    /// Set when the coordinator refuses this agent; cleared by its next answer.
    refused: Option<String>,
    shutting_down: bool,
}

/// Whether the agent accepts new faults.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arming {
    Armed,
    Disarmed {
        reason: String,
        /// A coordinator's disarm is lifted by the coordinator's next "armed";
        /// a local one only by SetArmed.
        by_coordinator: bool,
    },
}

impl Arming {
    fn is_armed(&self) -> bool {
        matches!(self, Arming::Armed)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

impl Lifecycle {
    /// Replay the journal (reverting whatever a previous run left applied),
    /// then start the owner task.
    pub async fn start(
        cfg: LifecycleConfig,
        drivers: Arc<Drivers>,
        journal: Arc<dyn JournalStore>,
    ) -> Result<(Lifecycle, JoinHandle<()>, ReplayReport), AgentError> {
        let now = Instant::now();
        let mut actor = Actor {
            lease_lost: cfg.lease.is_some(),
            refused: None,
            cfg,
            drivers,
            journal,
            active: BTreeMap::new(),
            history: VecDeque::new(),
            arming: Arming::Armed,
            last_contact: None,
            started: now,
            shutting_down: false,
        };
        let report = actor.replay().await?;
        let (tx, rx) = mpsc::channel(1024);
        let max_fault_duration = actor.cfg.max_fault_duration;
        let task = tokio::spawn(actor.run(rx));
        Ok((Lifecycle { tx, max_fault_duration }, task, report))
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| AgentError::ShuttingDown)?;
        rx.await.map_err(|_| AgentError::ShuttingDown)
    }

    /// Validate and apply a fault.
    pub async fn apply(&self, spec: &pb::FaultSpec) -> Result<pb::Fault, AgentError> {
        let req = FaultRequest::from_pb(spec, self.max_fault_duration)?;
        self.call(|r| Cmd::Apply(Box::new(req), r)).await?
    }

    /// Revert one fault; `.1` is true when it was already reverted.
    pub async fn revert(&self, id: &str) -> Result<(pb::Fault, bool), AgentError> {
        let id = id.to_string();
        self.call(|r| Cmd::Revert(id, r)).await?
    }

    /// Revert every fault; `disarm` leaves the agent disarmed with that reason.
    pub async fn revert_all(&self, reason: RevertReason, disarm: Option<String>) -> Result<RevertAllOutcome, AgentError> {
        self.call(|reply| Cmd::RevertAll { reason, disarm, reply }).await
    }

    pub async fn list(&self, include_finished: bool) -> Result<Vec<pb::Fault>, AgentError> {
        self.call(|r| Cmd::List(include_finished, r)).await
    }

    /// Arm or disarm; returns the armed state after.
    pub async fn set_armed(&self, armed: bool, reason: String) -> Result<bool, AgentError> {
        self.call(|reply| Cmd::SetArmed { armed, reason, reply }).await
    }

    /// The coordinator answered: the lease is renewed and its armed flag followed.
    pub async fn contact(&self, coordinator_armed: bool) -> Result<(), AgentError> {
        self.call(|reply| Cmd::Contact { coordinator_armed, reply }).await
    }

    /// The coordinator refused this agent (ALREADY_EXISTS: another process
    /// holds its id): the lease counts as lost now, every fault is reverted
    /// and new ones are refused with `reason`, until the coordinator accepts it.
    pub async fn refused(&self, reason: String) -> Result<(), AgentError> {
        self.call(|reply| Cmd::Refused { reason, reply }).await
    }

    pub async fn status(&self) -> Result<LifecycleStatus, AgentError> {
        self.call(Cmd::Status).await
    }

    /// Revert everything for shutdown and refuse new faults from now on.
    pub async fn shutdown(&self) -> Result<RevertAllOutcome, AgentError> {
        self.call(Cmd::Shutdown).await
    }
}

impl Actor {
    async fn replay(&mut self) -> Result<ReplayReport, AgentError> {
        let mut report = ReplayReport::default();
        let (records, corrupt) = self.journal.load()?;
        for bad in &corrupt {
            report.corrupt += 1;
            match quarantine(bad) {
                Ok(to) => error!(path = %bad.path.display(), error = %bad.error, moved_to = %to.display(),
                    "unreadable journal record set aside; inspect it by hand: the fault it held may still be applied"),
                Err(e) => error!(path = %bad.path.display(), error = %bad.error, rename_error = %e, "unreadable journal record"),
            }
        }
        for rec in records {
            info!(fault_id = %rec.id, written_by_pid = rec.agent_pid, family = rec.request.kind.family(),
                "reverting a fault a previous agent run left applied");
            let now = Instant::now();
            let mut entry = Entry {
                id: rec.id.clone(),
                req: rec.request,
                plan: rec.plan,
                state: FaultState::Applied,
                applied: None,
                created_at: UNIX_EPOCH + Duration::from_millis(rec.created_at_unix_ms),
                applied_at: None,
                expires_at: now,
                expires_wall: UNIX_EPOCH + Duration::from_millis(rec.expires_at_unix_ms),
                error: String::new(),
                revert_reason: RevertReason::JournalReplay,
                retry_at: None,
                revert_summary: String::new(),
                reverted_at: None,
            };
            if self.revert_entry(&mut entry, RevertReason::JournalReplay).await {
                report.reverted += 1;
                self.push_history(entry.to_pb());
            } else {
                report.failed += 1;
                self.active.insert(entry.id.clone(), entry);
            }
        }
        Ok(report)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            let deadline = self.next_deadline();
            let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)));
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = sleep, if deadline.is_some() => self.tick().await,
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let faults = self.active.values().filter_map(|e| match e.state {
            FaultState::Applied => Some(e.expires_at),
            FaultState::Failed => e.retry_at,
            _ => None,
        });
        let lease = match (&self.cfg.lease, self.lease_lost) {
            (Some(l), false) => Some(self.last_contact.unwrap_or(self.started) + l.duration),
            _ => None,
        };
        faults.chain(lease).min()
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        if let (Some(l), false) = (&self.cfg.lease, self.lease_lost) {
            let since = self.last_contact.unwrap_or(self.started);
            if now >= since + l.duration {
                self.lease_lost = true;
                warn!(coordinator = %l.coordinator_url, silent_for = %human_duration(now - since), active_faults = self.active.len(),
                    "dead-man lease expired: reverting every fault and refusing new ones until the coordinator answers");
                self.revert_all(RevertReason::LeaseLost).await;
            }
        }
        let due: Vec<(String, RevertReason)> = self
            .active
            .values()
            .filter_map(|e| match e.state {
                FaultState::Applied if e.expires_at <= now => Some((e.id.clone(), RevertReason::Ttl)),
                FaultState::Failed if e.retry_at.is_some_and(|t| t <= now) => Some((e.id.clone(), e.revert_reason)),
                _ => None,
            })
            .collect();
        for (id, reason) in due {
            if reason == RevertReason::Ttl {
                info!(fault_id = %id, "fault reached its TTL");
            }
            self.revert_by_id(&id, reason).await;
        }
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Apply(req, reply) => {
                let r = self.apply(*req).await;
                let _ = reply.send(r);
            }
            Cmd::Revert(id, reply) => {
                let r = self.revert_requested(&id).await;
                let _ = reply.send(r);
            }
            Cmd::RevertAll { reason, disarm, reply } => {
                let mut out = self.revert_all(reason).await;
                if let Some(why) = disarm {
                    self.disarm(why, reason == RevertReason::EmergencyStop);
                }
                out.armed = self.arming.is_armed();
                let _ = reply.send(out);
            }
            Cmd::List(include_finished, reply) => {
                let mut v: Vec<pb::Fault> = Vec::new();
                if include_finished {
                    v.extend(self.history.iter().cloned());
                }
                for e in self.active.values_mut() {
                    observe(&self.drivers, e);
                }
                let mut active: Vec<&Entry> = self.active.values().collect();
                active.sort_by_key(|e| e.created_at);
                v.extend(active.into_iter().map(Entry::to_pb));
                let _ = reply.send(v);
            }
            Cmd::SetArmed { armed, reason, reply } => {
                if armed {
                    self.arm(&reason);
                } else {
                    self.disarm(reason, false);
                }
                let _ = reply.send(self.arming.is_armed());
            }
            Cmd::Contact { coordinator_armed, reply } => {
                self.contact(coordinator_armed).await;
                let _ = reply.send(());
            }
            Cmd::Refused { reason, reply } => {
                if self.refused.as_deref() != Some(reason.as_str()) {
                    error!(refusal = %reason, active_faults = self.active.len(),
                        "the coordinator REFUSED this agent: reverting every fault and refusing new ones until it is accepted");
                }
                self.refused = Some(reason);
                self.lease_lost = true;
                if !self.active.is_empty() {
                    self.revert_all(RevertReason::LeaseLost).await;
                }
                let _ = reply.send(());
            }
            Cmd::Status(reply) => {
                let _ = reply.send(LifecycleStatus {
                    armed: self.arming.is_armed(),
                    lease_lost: self.lease_lost,
                    active_faults: self.active.len(),
                    refused: self.refused.clone(),
                });
            }
            Cmd::Shutdown(reply) => {
                self.shutting_down = true;
                let out = self.revert_all(RevertReason::Shutdown).await;
                let _ = reply.send(out);
            }
        }
    }

    fn arm(&mut self, reason: &str) {
        if !self.arming.is_armed() {
            info!(reason, "agent armed: faults accepted again");
        }
        self.arming = Arming::Armed;
    }

    fn disarm(&mut self, reason: String, by_coordinator: bool) {
        if self.arming.is_armed() {
            warn!(reason = %reason, "agent disarmed: new faults are refused until it is armed again");
        }
        let reason = if reason.is_empty() { "no reason given".into() } else { reason };
        self.arming = Arming::Disarmed { reason, by_coordinator };
    }

    async fn contact(&mut self, coordinator_armed: bool) {
        self.last_contact = Some(Instant::now());
        if self.refused.take().is_some() {
            info!("the coordinator accepted this agent");
        }
        if self.lease_lost {
            self.lease_lost = false;
            info!("coordinator answered: lease established, faults accepted");
        }
        let by_coordinator = matches!(self.arming, Arming::Disarmed { by_coordinator: true, .. });
        if coordinator_armed {
            if by_coordinator {
                self.arm("the coordinator re-armed the fleet");
            }
        } else {
            if !by_coordinator {
                self.disarm("the coordinator has disarmed the fleet (emergency stop)".into(), true);
            }
            if !self.active.is_empty() {
                warn!(active_faults = self.active.len(), "fleet is disarmed but faults are active here: reverting them");
                self.revert_all(RevertReason::EmergencyStop).await;
            }
        }
    }

    fn refuse_new(&self) -> Result<(), AgentError> {
        if self.shutting_down {
            return Err(AgentError::ShuttingDown);
        }
        if let Arming::Disarmed { reason, .. } = &self.arming {
            return Err(AgentError::Disarmed { reason: reason.clone() });
        }
        if let Some(why) = &self.refused {
            return Err(AgentError::LeaseLost(format!("the coordinator refused this agent: {why}")));
        }
        if let (Some(l), true) = (&self.cfg.lease, self.lease_lost) {
            let detail = match self.last_contact {
                None => format!(
                    "coordinator {} has not answered since the agent started {} ago",
                    l.coordinator_url,
                    human_duration(self.started.elapsed())
                ),
                Some(t) => format!(
                    "coordinator {} silent for {} (lease {})",
                    l.coordinator_url,
                    human_duration(t.elapsed()),
                    human_duration(l.duration)
                ),
            };
            return Err(AgentError::LeaseLost(detail));
        }
        Ok(())
    }

    async fn apply(&mut self, mut req: FaultRequest) -> Result<pb::Fault, AgentError> {
        self.refuse_new()?;
        let id = req.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if self.active.contains_key(&id) {
            return Err(AgentError::AlreadyExists(id));
        }
        if self.active.len() >= chaos_proto::spec::MAX_ACTIVE_FAULTS as usize {
            return Err(AgentError::Guard(format!(
                "this agent holds {} faults, the most it holds at once; revert some first",
                self.active.len()
            )));
        }
        // Drivers name what they create after the fault (e.g. nft tables).
        req.id = Some(id.clone());
        let planned = self.drivers.resolve_container(&req).await?;
        let plan = self.drivers.for_request(&planned).plan(&planned).await?;
        let created_at = SystemTime::now();
        let rec = JournalRecord {
            version: 1,
            id: id.clone(),
            request: req.clone(),
            plan: plan.clone(),
            created_at_unix_ms: unix_ms(created_at),
            expires_at_unix_ms: unix_ms(created_at + req.duration),
            agent_pid: std::process::id(),
        };
        // Journal first: if the agent dies right after the host is touched,
        // the next run finds this record and reverts it.
        self.journal.put(&rec)?;
        let driver = self.drivers.for_plan(&plan);
        match driver.apply(&plan).await {
            Ok(applied) => {
                let applied_at = SystemTime::now();
                info!(fault_id = %id, family = req.kind.family(), target = %req.target, ttl = %human_duration(req.duration),
                    summary = %applied.summary, "fault applied");
                self.cfg.counters.applied(req.kind.family(), applied.backend);
                let entry = Entry {
                    id: id.clone(),
                    expires_at: Instant::now() + req.duration,
                    expires_wall: applied_at + req.duration,
                    req,
                    plan,
                    state: FaultState::Applied,
                    applied: Some(applied),
                    created_at,
                    applied_at: Some(applied_at),
                    error: String::new(),
                    revert_reason: RevertReason::Unspecified,
                    retry_at: None,
                    revert_summary: String::new(),
                    reverted_at: None,
                };
                let pb = entry.to_pb();
                self.active.insert(id, entry);
                Ok(pb)
            }
            Err(e) => {
                warn!(fault_id = %id, error = %e, "apply failed; undoing whatever part of it took effect");
                self.cfg.counters.apply_failed(req.kind.family());
                let summary = match driver.revert(&plan).await {
                    Ok(s) => s,
                    Err(re) => {
                        // Keep the record: the next start retries the revert.
                        error!(fault_id = %id, error = %re, "undoing a failed apply failed too; journal record kept");
                        return Err(e);
                    }
                };
                if let Err(je) = self.journal.remove(&id) {
                    error!(fault_id = %id, error = %je, "could not remove journal record of a failed apply");
                }
                let now = SystemTime::now();
                self.push_history(pb::Fault {
                    id: id.clone(),
                    spec: Some(req.to_pb(&id)),
                    state: FaultState::Failed as i32,
                    created_at: Some(timestamp_to_pb(created_at)),
                    reverted_at: Some(timestamp_to_pb(now)),
                    revert_reason: RevertReason::ApplyFailed as i32,
                    error: e.to_string(),
                    revert_summary: summary,
                    ..Default::default()
                });
                Err(e)
            }
        }
    }

    /// Revert one entry in place. True when it is now reverted.
    async fn revert_entry(&mut self, entry: &mut Entry, reason: RevertReason) -> bool {
        // The last measurement is what history keeps.
        observe(&self.drivers, entry);
        entry.state = FaultState::Reverting;
        entry.revert_reason = reason;
        let driver = self.drivers.for_plan(&entry.plan);
        match driver.revert(&entry.plan).await {
            Ok(summary) => {
                if let Err(e) = self.journal.remove(&entry.id) {
                    // The revert is done; a stale record only causes one more
                    // (idempotent, pid-guarded) revert at the next start.
                    error!(fault_id = %entry.id, error = %e, "fault reverted but its journal record could not be removed");
                }
                info!(fault_id = %entry.id, reason = reason.as_str_name(), summary = %summary, "fault reverted");
                let backend = entry.applied.as_ref().map(|a| a.backend).unwrap_or("journal");
                self.cfg.counters.reverted(entry.req.kind.family(), backend, reason.as_str_name());
                entry.state = FaultState::Reverted;
                entry.reverted_at = Some(SystemTime::now());
                entry.revert_summary = summary;
                entry.error.clear();
                entry.retry_at = None;
                true
            }
            Err(e) => {
                error!(fault_id = %entry.id, reason = reason.as_str_name(), error = %e,
                    retry_in = %human_duration(self.cfg.revert_retry_interval), "revert failed; journal record kept, will retry");
                self.cfg.counters.revert_failed(entry.req.kind.family());
                entry.state = FaultState::Failed;
                entry.error = e.to_string();
                entry.retry_at = Some(Instant::now() + self.cfg.revert_retry_interval);
                false
            }
        }
    }

    /// Revert an active fault by id; moves it to history when done.
    async fn revert_by_id(&mut self, id: &str, reason: RevertReason) -> Option<Result<pb::Fault, pb::Fault>> {
        let mut entry = self.active.remove(id)?;
        let ok = self.revert_entry(&mut entry, reason).await;
        let pb = entry.to_pb();
        if ok {
            self.push_history(pb.clone());
            Some(Ok(pb))
        } else {
            self.active.insert(entry.id.clone(), entry);
            Some(Err(pb))
        }
    }

    async fn revert_requested(&mut self, id: &str) -> Result<(pb::Fault, bool), AgentError> {
        match self.revert_by_id(id, RevertReason::Requested).await {
            Some(Ok(f)) => Ok((f, false)),
            Some(Err(f)) => Err(AgentError::RevertFailed { id: id.to_string(), error: f.error }),
            None => self
                .history
                .iter()
                .rev()
                .find(|f| f.id == id)
                .map(|f| (f.clone(), true))
                .ok_or_else(|| AgentError::UnknownFault(id.to_string())),
        }
    }

    async fn revert_all(&mut self, reason: RevertReason) -> RevertAllOutcome {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        let mut out = RevertAllOutcome { armed: self.arming.is_armed(), ..Default::default() };
        for id in ids {
            match self.revert_by_id(&id, reason).await {
                Some(Ok(f)) => out.reverted.push(f),
                Some(Err(f)) => out.failed.push(f),
                None => {}
            }
        }
        if !out.reverted.is_empty() || !out.failed.is_empty() {
            info!(reason = reason.as_str_name(), reverted = out.reverted.len(), failed = out.failed.len(), "revert all done");
        }
        out
    }

    fn push_history(&mut self, f: pb::Fault) {
        self.history.push_back(f);
        while self.history.len() > self.cfg.history_len {
            self.history.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use chaos_proto::pb::{FaultSpec, ProcessPause, Target, fault_spec::Fault as F, target::Kind};
    use nix::{errno::Errno, sys::signal::Signal};
    use tonic::Code;

    use super::*;
    use crate::{
        faults::{
            ProcRef,
            network::{Exemptions, NetworkDriver},
            process::{ProcessAction, ProcessDriver, ProcessPlan},
        },
        journal::MemJournal,
        protect::Protection,
        sys::{Signals, fake::FakeProcs, netexec::FakeExec},
    };

    struct Rig {
        lc: Lifecycle,
        procs: FakeProcs,
        journal: MemJournal,
        report: ReplayReport,
    }

    async fn rig_with(cfg: LifecycleConfig, procs: FakeProcs, journal: MemJournal) -> Rig {
        let prot = Arc::new(Protection::new(4242, vec![], vec![]));
        let network = NetworkDriver::new(Arc::new(FakeExec::default()), Arc::new(procs.clone()), Exemptions::default());
        let resource = crate::faults::resource::ResourceDriver::new(
            Err("no cgroups in this test".into()),
            Arc::new(procs.clone()),
            prot.clone(),
            "/nonexistent".into(),
            Default::default(),
        );
        let container = crate::faults::container::ContainerDriver::new("/nonexistent/docker.sock".into(), prot.clone());
        let drivers = Arc::new(Drivers {
            process: ProcessDriver::new(Arc::new(procs.clone()), Arc::new(procs.clone()), prot),
            network,
            resource,
            container,
        });
        let (lc, _task, report) = Lifecycle::start(cfg, drivers, Arc::new(journal.clone())).await.expect("start");
        Rig { lc, procs, journal, report }
    }

    async fn rig() -> Rig {
        let procs = FakeProcs::default();
        procs.spawn(10, "sleep", 100);
        procs.spawn(11, "sleep", 101);
        rig_with(LifecycleConfig::default(), procs, MemJournal::default()).await
    }

    fn pause(pid: u32, secs: i64) -> FaultSpec {
        FaultSpec {
            target: Some(Target { kind: Some(Kind::Pid(pid)) }),
            duration: Some(prost_types::Duration { seconds: secs, nanos: 0 }),
            fault: Some(F::ProcessPause(ProcessPause {})),
            ..Default::default()
        }
    }

    fn state(f: &pb::Fault) -> FaultState {
        FaultState::try_from(f.state).expect("state")
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_reverts_exactly_at_its_time() {
        let r = rig().await;
        let f = r.lc.apply(&pause(10, 30)).await.expect("apply");
        assert_eq!(state(&f), FaultState::Applied);
        assert_eq!(r.procs.state(10), Some('T'));
        assert_eq!(r.journal.ids(), vec![f.id.clone()]);
        tokio::time::sleep(Duration::from_millis(29_900)).await;
        assert_eq!(r.procs.state(10), Some('T'), "not before its TTL");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.procs.state(10), Some('S'), "reverted at its TTL");
        assert!(r.journal.ids().is_empty());
        let all = r.lc.list(true).await.expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(state(&all[0]), FaultState::Reverted);
        assert_eq!(all[0].revert_reason, RevertReason::Ttl as i32);
        assert!(r.lc.list(false).await.expect("list").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn journal_is_written_before_the_host_is_touched() {
        let r = rig().await;
        r.journal.set_fail_puts(true);
        let e = r.lc.apply(&pause(10, 30)).await.expect_err("journal failure refuses the fault");
        assert_eq!(e.code(), Code::Internal);
        assert!(r.procs.sent().is_empty(), "no signal without a journal record");
        r.journal.set_fail_puts(false);
        let f = r.lc.apply(&pause(10, 30)).await.expect("apply");
        assert_eq!(r.journal.ops(), vec![format!("put {}", f.id)]);
    }

    #[tokio::test(start_paused = true)]
    async fn replay_reverts_what_a_previous_run_left() {
        let procs = FakeProcs::default();
        procs.spawn(10, "sleep", 100);
        procs.signal_if_same(10, 100, Signal::SIGSTOP).expect("stop");
        procs.spawn(11, "sleep", 555); // pid reused since the crash: must not be touched
        let journal = MemJournal::default();
        for (id, pid, start) in [("left-1", 10, 100), ("left-2", 11, 101)] {
            journal.seed(JournalRecord {
                version: 1,
                id: id.into(),
                request: FaultRequest::from_pb(&pause(pid, 60), Duration::from_secs(3600)).expect("req"),
                plan: Plan::Process(ProcessPlan {
                    action: ProcessAction::Pause,
                    processes: vec![ProcRef { pid, start_time_ticks: start, name: "sleep".into() }],
                    fault_id: String::new(),
                }),
                created_at_unix_ms: 1,
                expires_at_unix_ms: 60_001,
                agent_pid: 1234,
            });
        }
        let r = rig_with(LifecycleConfig::default(), procs, journal).await;
        assert_eq!(r.report, ReplayReport { reverted: 2, failed: 0, corrupt: 0 });
        assert_eq!(r.procs.state(10), Some('S'));
        assert_eq!(r.procs.sent(), vec![(10, Signal::SIGSTOP), (10, Signal::SIGCONT)], "reused pid 11 untouched");
        assert!(r.journal.ids().is_empty());
        let hist = r.lc.list(true).await.expect("list");
        assert!(hist.iter().all(|f| f.revert_reason == RevertReason::JournalReplay as i32));
        assert!(hist.iter().any(|f| f.revert_summary.contains("already gone")));
    }

    #[tokio::test(start_paused = true)]
    async fn revert_twice_is_harmless() {
        let r = rig().await;
        let f = r.lc.apply(&pause(10, 30)).await.expect("apply");
        let (f1, already) = r.lc.revert(&f.id).await.expect("revert");
        assert!(!already);
        assert_eq!(state(&f1), FaultState::Reverted);
        assert_eq!(f1.revert_reason, RevertReason::Requested as i32);
        let (_, already) = r.lc.revert(&f.id).await.expect("revert again");
        assert!(already);
        assert_eq!(r.procs.sent().iter().filter(|(_, s)| *s == Signal::SIGCONT).count(), 1);
        // The TTL passing later does nothing more.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(r.procs.sent().len(), 2);
        assert_eq!(r.lc.revert("nope").await.expect_err("unknown").code(), Code::NotFound);
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_specs_name_the_field_and_touch_nothing() {
        let r = rig().await;
        let e = r.lc.apply(&pause(10, 0)).await.expect_err("zero ttl");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("spec.duration"), "{e}");
        let e = r.lc.apply(&pause(10, 10_000)).await.expect_err("too long");
        assert!(e.to_string().contains("max_fault_duration"), "{e}");
        let mut s = pause(10, 5);
        s.fault = Some(F::NetworkDuplicate(Default::default()));
        let e = r.lc.apply(&s).await.expect_err("zero percent");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("spec.network_duplicate.percent"), "{e}");
        assert_eq!(r.lc.apply(&pause(777, 5)).await.expect_err("missing").code(), Code::NotFound);
        r.procs.spawn(4242, "chaos-agent", 1);
        assert_eq!(r.lc.apply(&pause(4242, 5)).await.expect_err("self").code(), Code::PermissionDenied);
        let mut s = pause(10, 5);
        s.id = "dup".into();
        r.lc.apply(&s).await.expect("first");
        assert_eq!(r.lc.apply(&s).await.expect_err("dup").code(), Code::AlreadyExists);
        assert_eq!(r.journal.ops(), vec!["put dup".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_reverts_all_and_refuses_until_contact() {
        let cfg = LifecycleConfig {
            lease: Some(LeaseConfig { duration: Duration::from_secs(10), coordinator_url: "http://c".into() }),
            ..Default::default()
        };
        let procs = FakeProcs::default();
        procs.spawn(10, "sleep", 100);
        let r = rig_with(cfg, procs, MemJournal::default()).await;
        let e = r.lc.apply(&pause(10, 300)).await.expect_err("no contact yet");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.to_string().contains("has not answered"), "{e}");
        r.lc.contact(true).await.expect("contact");
        let f = r.lc.apply(&pause(10, 300)).await.expect("apply");
        // Contact at 6 s keeps the lease; silence from then on loses it at 16 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        r.lc.contact(true).await.expect("contact");
        tokio::time::sleep(Duration::from_millis(9_900)).await;
        assert_eq!(r.procs.state(10), Some('T'), "lease still valid");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.procs.state(10), Some('S'), "lease lost: reverted");
        let st = r.lc.status().await.expect("status");
        assert!(st.lease_lost);
        let hist = r.lc.list(true).await.expect("list");
        assert_eq!(hist.iter().find(|x| x.id == f.id).map(|x| x.revert_reason), Some(RevertReason::LeaseLost as i32));
        let e = r.lc.apply(&pause(10, 300)).await.expect_err("refused while lost");
        assert!(e.to_string().contains("silent for"), "{e}");
        r.lc.contact(true).await.expect("contact");
        r.lc.apply(&pause(10, 300)).await.expect("accepted once contact is back");
    }

    #[tokio::test(start_paused = true)]
    async fn emergency_disarm_refuses_until_armed_and_coordinator_disarm_reverts() {
        let r = rig().await;
        r.lc.apply(&pause(10, 300)).await.expect("apply");
        let out = r.lc.revert_all(RevertReason::EmergencyStop, Some("drill".into())).await.expect("revert all");
        assert_eq!(out.reverted.len(), 1);
        assert!(!out.armed);
        let e = r.lc.apply(&pause(10, 300)).await.expect_err("disarmed");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.to_string().contains("drill"), "{e}");
        // The coordinator says armed again: an emergency disarm is lifted.
        r.lc.contact(true).await.expect("contact");
        r.lc.apply(&pause(10, 300)).await.expect("re-armed");
        // A heartbeat that says the fleet is disarmed reverts what is active.
        r.lc.contact(false).await.expect("contact");
        assert_eq!(r.procs.state(10), Some('S'));
        assert!(!r.lc.status().await.expect("status").armed);
        // A local disarm is not lifted by the coordinator's heartbeat.
        r.lc.set_armed(true, "test".into()).await.expect("arm");
        r.lc.set_armed(false, "maintenance".into()).await.expect("disarm");
        r.lc.contact(true).await.expect("contact");
        assert!(!r.lc.status().await.expect("status").armed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_revert_keeps_the_journal_and_retries() {
        let r = rig().await;
        let f = r.lc.apply(&pause(10, 30)).await.expect("apply");
        r.procs.fail_signals(10, Errno::EPERM);
        let e = r.lc.revert(&f.id).await.expect_err("revert fails");
        assert!(e.to_string().contains("retried"), "{e}");
        assert_eq!(r.journal.ids(), vec![f.id.clone()], "record kept");
        let active = r.lc.list(false).await.expect("list");
        assert_eq!(state(&active[0]), FaultState::Failed);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(r.lc.list(false).await.expect("list").len(), 1, "still failing after a retry");
        // The cause clears; the retry loop reverts it without being asked.
        r.procs.clear_failures(10);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(r.procs.state(10), Some('S'));
        assert!(r.lc.list(false).await.expect("list").is_empty());
        assert!(r.journal.ids().is_empty());
        let hist = r.lc.list(true).await.expect("list");
        assert_eq!(hist[0].revert_reason, RevertReason::Requested as i32, "the original reason is kept");
    }

    #[tokio::test(start_paused = true)]
    async fn apply_failure_undoes_and_clears_the_journal() {
        let r = rig().await;
        r.procs.fail_signals(11, Errno::EPERM);
        let mut s = pause(11, 30);
        s.id = "f1".into();
        let e = r.lc.apply(&s).await.expect_err("eperm");
        assert_eq!(e.code(), Code::PermissionDenied);
        // The undo could not run either (same EPERM): the record stays for a retry at next start.
        assert_eq!(r.journal.ids(), vec!["f1".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn apply_failure_is_undone_recorded_and_journal_cleared() {
        let r = rig().await;
        r.procs.fail_signal(11, Signal::SIGSTOP, Errno::EPERM);
        let mut s = pause(11, 30);
        s.id = "f2".into();
        assert_eq!(r.lc.apply(&s).await.expect_err("eperm").code(), Code::PermissionDenied);
        assert!(r.journal.ids().is_empty());
        assert_eq!(r.journal.ops(), vec!["put f2".to_string(), "remove f2".to_string()]);
        let hist = r.lc.list(true).await.expect("list");
        assert_eq!(hist.len(), 1);
        assert_eq!(state(&hist[0]), FaultState::Failed);
        assert_eq!(hist[0].revert_reason, RevertReason::ApplyFailed as i32);
        assert!(hist[0].error.contains("pid 11"), "{}", hist[0].error);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_reverts_everything_and_refuses_new_faults() {
        let r = rig().await;
        r.lc.apply(&pause(10, 300)).await.expect("apply");
        r.lc.apply(&pause(11, 300)).await.expect("apply");
        let out = r.lc.shutdown().await.expect("shutdown");
        assert_eq!(out.reverted.len(), 2);
        assert!(out.reverted.iter().all(|f| f.revert_reason == RevertReason::Shutdown as i32));
        assert_eq!((r.procs.state(10), r.procs.state(11)), (Some('S'), Some('S')));
        assert_eq!(r.lc.apply(&pause(10, 5)).await.expect_err("closed").code(), Code::Unavailable);
    }
}
