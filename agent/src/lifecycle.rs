//! The fault lifecycle: one owner task holds every fault's state and
//! decides every transition; it never waits on a driver. Requests reach it
//! as messages; TTLs, revert retries, RevertAll's wait and the dead-man
//! lease are deadlines in its own loop (tokio time, so tests drive them
//! with `tokio::time::pause`).
//!
//! Driver work (resolve, plan, journal write, apply, revert) runs in jobs:
//! spawned tasks whose results come back to the owner as messages. Jobs run
//! in lanes, one lane per target (the request's target as given: a netns, a
//! pid, a cgroup, a container): work on one target applies and reverts in
//! order, work on different targets runs side by side. So a 20 s container
//! stop delays nothing but later work on that container.
//!
//! ```text
//!  ApplyFault ─ checks ─ PENDING ─ [job: resolve ─ plan ─ read state ─ journal.put (fsync) ─ driver.apply] ─► APPLIED ─┐
//!                  │ asked to revert while still queued: cancelled, nothing was done
//!                  │ asked to revert while running: reverted as soon as the apply returns
//!                  │ apply failed: [driver.revert, journal.remove] ─► FAILED (history)
//!  TTL | RevertFault | RevertAll | lease lost | SIGTERM | disarmed by coordinator                           ▼
//!                       REVERTING ─ [job: driver.revert ─ re-read + compare ─ journal.remove] ─ ok ─► REVERTED (history)
//!                                                           └ err, or a leftover after a second revert ─► FAILED (journal kept, retried)
//!  start: every journal record ─► driver.revert (REVERT_REASON_JOURNAL_REPLAY)
//! ```
//!
//! A journal record exists from before the host is touched until after the
//! revert succeeded; a fault is never applied without one. The record holds
//! the state read before apply, so every revert (a replay's too) is proved
//! against it: see [`crate::faults::revert_verified`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
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
    faults::{Applied, Before, Check, Drivers, Plan, read_before, revert_verified},
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
    /// Faults whose driver was still working when the wait ended; the agent
    /// goes on reverting them (nothing new starts: it refuses new faults
    /// while disarmed, lease-less or shutting down).
    pub in_progress: Vec<pb::Fault>,
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

/// RevertAll's wait when the caller names none.
pub const DEFAULT_REVERT_ALL_WAIT: Duration = Duration::from_secs(10);

type ApplyReply = oneshot::Sender<Result<pb::Fault, AgentError>>;
type RevertReply = oneshot::Sender<Result<(pb::Fault, bool), AgentError>>;

enum Cmd {
    Apply(Box<FaultRequest>, ApplyReply),
    Revert(String, RevertReply),
    /// `wait: None` waits until every revert has finished (shutdown).
    RevertAll {
        reason: RevertReason,
        disarm: Option<String>,
        wait: Option<Duration>,
        reply: oneshot::Sender<RevertAllOutcome>,
    },
    List(bool, oneshot::Sender<Vec<pb::Fault>>),
    SetArmed {
        armed: bool,
        reason: String,
        reply: oneshot::Sender<bool>,
    },
    Contact {
        coordinator_armed: bool,
        reply: oneshot::Sender<()>,
    },
    Refused {
        reason: String,
        reply: oneshot::Sender<()>,
    },
    Status(oneshot::Sender<LifecycleStatus>),
    Shutdown(oneshot::Sender<RevertAllOutcome>),
}

/// Handle to the lifecycle task; cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    tx: mpsc::Sender<Cmd>,
    max_fault_duration: Duration,
}

/// Whether a job of this fault is waiting in its lane or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Idle,
    QueuedApply,
    Applying,
    QueuedRevert,
    Reverting,
}

struct Entry {
    id: String,
    req: FaultRequest,
    /// The lane its jobs run in.
    lane: String,
    /// Known once the apply job has journaled it.
    plan: Option<Plan>,
    /// The state it touches, read before apply (with the plan).
    before: Option<Before>,
    /// Keys of `before` that another fault active meanwhile read too, with
    /// that fault's id: a difference there is not judged as ours.
    shared: BTreeMap<String, String>,
    /// The re-read after the last revert.
    check: Check,
    state: FaultState,
    op: Op,
    applied: Option<Applied>,
    created_at: SystemTime,
    applied_at: Option<SystemTime>,
    expires_at: Instant,
    expires_wall: SystemTime,
    error: String,
    /// Why it is being reverted, once it is (kept across retries).
    revert_reason: RevertReason,
    /// A revert asked for while the apply runs: done when the apply returns.
    revert_wanted: Option<RevertReason>,
    /// When to try a failed revert again.
    retry_at: Option<Instant>,
    revert_summary: String,
    reverted_at: Option<SystemTime>,
    apply_reply: Option<ApplyReply>,
    revert_replies: Vec<RevertReply>,
}

impl Entry {
    fn new(id: String, req: FaultRequest, created_at: SystemTime) -> Self {
        let now = Instant::now();
        Entry {
            lane: lane_of(&req),
            expires_at: now + req.duration,
            expires_wall: created_at + req.duration,
            id,
            req,
            plan: None,
            before: None,
            shared: BTreeMap::new(),
            check: Check::default(),
            state: FaultState::Pending,
            op: Op::Idle,
            applied: None,
            created_at,
            applied_at: None,
            error: String::new(),
            revert_reason: RevertReason::Unspecified,
            revert_wanted: None,
            retry_at: None,
            revert_summary: String::new(),
            reverted_at: None,
            apply_reply: None,
            revert_replies: Vec::new(),
        }
    }

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
            revert_check: self.check.verdict as i32,
            revert_check_detail: self.check.detail.clone(),
            revert_check_took: self.check.took(),
        }
    }

    /// Note that `other` reads some of the same things (both are active now).
    fn share_with(&mut self, other: &mut Entry) {
        let (Some(Before::Read(mine)), Some(Before::Read(theirs))) = (&self.before, &other.before) else { return };
        for k in mine.items.keys().filter(|k| theirs.items.contains_key(*k)) {
            self.shared.insert(k.clone(), other.id.clone());
            other.shared.insert(k.clone(), self.id.clone());
        }
    }
}

/// The lane of a request: its target as given (two requests naming the
/// same pid, netns, cgroup or container share one).
fn lane_of(req: &FaultRequest) -> String {
    req.target.to_string()
}

/// Refresh an active fault's measured figures from its driver.
fn observe(drivers: &Drivers, entry: &mut Entry) {
    if entry.state != FaultState::Applied {
        return;
    }
    let Some(plan) = entry.plan.as_ref() else { return };
    if let (Some(applied), Some(o)) = (entry.applied.as_mut(), drivers.for_plan(plan).observe(plan)) {
        if let Some(out) = o.outcome.as_deref().filter(|o| *o != applied.outcome) {
            warn!(fault_id = %entry.id, outcome = %out, "fault changed on its own");
        }
        applied.update(o);
    }
}

/// A job's report to the owner.
enum Done {
    /// The apply job wrote the journal record: the plan is known and the host is about to be touched.
    Journaled {
        id: String,
        plan: Plan,
        before: Before,
    },
    Applied {
        id: String,
        outcome: ApplyOutcome,
    },
    Reverted {
        id: String,
        result: Result<String, AgentError>,
        check: Check,
    },
}

enum ApplyOutcome {
    Ok(Applied),
    /// Refused before the journal was written: nothing was done.
    Refused(AgentError),
    /// The apply failed (or its job panicked) after the journal was written;
    /// `undo` is the revert of whatever part of it took effect.
    Failed {
        error: AgentError,
        undo: Result<String, AgentError>,
        check: Check,
    },
}

/// One RevertAll waiting for its reverts.
struct AllWait {
    pending: BTreeSet<String>,
    out: RevertAllOutcome,
    /// `None`: until every revert has finished.
    deadline: Option<Instant>,
    reply: oneshot::Sender<RevertAllOutcome>,
}

#[derive(Default)]
struct Lane {
    running: bool,
    queue: VecDeque<String>,
}

struct Actor {
    cfg: LifecycleConfig,
    drivers: Arc<Drivers>,
    journal: Arc<dyn JournalStore>,
    active: BTreeMap<String, Entry>,
    history: VecDeque<pb::Fault>,
    lanes: HashMap<String, Lane>,
    waits: Vec<AllWait>,
    done_tx: mpsc::UnboundedSender<Done>,
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

/// A journal write or removal on the blocking pool (each one fsyncs).
async fn journal_io<T: Send + 'static>(
    journal: &Arc<dyn JournalStore>,
    f: impl FnOnce(&dyn JournalStore) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    let j = Arc::clone(journal);
    tokio::task::spawn_blocking(move || f(&*j))
        .await
        .unwrap_or_else(|e| Err(AgentError::Command { cmd: "journal write".into(), detail: format!("its task failed: {e}") }))
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
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut actor = Actor {
            lease_lost: cfg.lease.is_some(),
            refused: None,
            cfg,
            drivers,
            journal,
            active: BTreeMap::new(),
            history: VecDeque::new(),
            lanes: HashMap::new(),
            waits: Vec::new(),
            done_tx,
            arming: Arming::Armed,
            last_contact: None,
            started: now,
            shutting_down: false,
        };
        let report = actor.replay().await?;
        let (tx, rx) = mpsc::channel(1024);
        let max_fault_duration = actor.cfg.max_fault_duration;
        let task = tokio::spawn(actor.run(rx, done_rx));
        Ok((Lifecycle { tx, max_fault_duration }, task, report))
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| AgentError::ShuttingDown)?;
        rx.await.map_err(|_| AgentError::ShuttingDown)
    }

    /// Validate and apply a fault; answers when the driver has applied it
    /// (or refused, or failed and undone it).
    pub async fn apply(&self, spec: &pb::FaultSpec) -> Result<pb::Fault, AgentError> {
        let req = FaultRequest::from_pb(spec, self.max_fault_duration)?;
        self.call(|r| Cmd::Apply(Box::new(req), r)).await?
    }

    /// Revert one fault; `.1` is true when it was already reverted (or
    /// never took effect). Waits for a running apply of it to return first.
    pub async fn revert(&self, id: &str) -> Result<(pb::Fault, bool), AgentError> {
        let id = id.to_string();
        self.call(|r| Cmd::Revert(id, r)).await?
    }

    /// Revert every fault; `disarm` leaves the agent disarmed with that
    /// reason (from before the first revert starts). Answers when every
    /// revert has finished or `wait` has passed, whichever is first: faults
    /// whose driver is still busy then are in `in_progress`.
    pub async fn revert_all(&self, reason: RevertReason, disarm: Option<String>, wait: Duration) -> Result<RevertAllOutcome, AgentError> {
        self.call(|reply| Cmd::RevertAll { reason, disarm, wait: Some(wait), reply }).await
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

    /// Revert everything for shutdown and refuse new faults from now on;
    /// answers when every revert has finished.
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
                Ok(to) => {
                    error!(path = %bad.path.display(), error = %bad.error, moved_to = %to.display(), future_version = ?bad.future_version,
                    "unreadable journal record set aside; inspect it by hand: the fault it held may still be applied")
                }
                Err(e) => error!(path = %bad.path.display(), error = %bad.error, rename_error = %e, "unreadable journal record"),
            }
        }
        // Records replayed together were active together: what they share is not judged as one's own.
        let mut entries: Vec<Entry> = Vec::with_capacity(records.len());
        for rec in records {
            info!(fault_id = %rec.id, written_by_pid = rec.agent_pid, family = rec.request.kind.family(),
                "reverting a fault a previous agent run left applied");
            let created_at = UNIX_EPOCH + Duration::from_millis(rec.created_at_unix_ms);
            let mut entry = Entry::new(rec.id.clone(), rec.request, created_at);
            entry.plan = Some(rec.plan);
            entry.before = rec.before;
            entry.state = FaultState::Reverting;
            entry.expires_wall = UNIX_EPOCH + Duration::from_millis(rec.expires_at_unix_ms);
            entry.revert_reason = RevertReason::JournalReplay;
            for other in &mut entries {
                entry.share_with(other);
            }
            entries.push(entry);
        }
        for mut entry in entries {
            let job = RevertJob::of(&entry);
            let (result, check) = job.run(Arc::clone(&self.drivers), Arc::clone(&self.journal)).await;
            if self.settle_revert(&mut entry, result, check) {
                report.reverted += 1;
                self.push_history(entry.to_pb());
            } else {
                report.failed += 1;
                self.active.insert(entry.id.clone(), entry);
            }
        }
        Ok(report)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, mut done_rx: mpsc::UnboundedReceiver<Done>) {
        loop {
            let deadline = self.next_deadline();
            let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)));
            tokio::select! {
                // Results first: they free lanes and answer waiting callers.
                biased;
                Some(done) = done_rx.recv() => self.on_done(done),
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                _ = sleep, if deadline.is_some() => self.tick(),
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let faults = self.active.values().filter(|e| e.op == Op::Idle).filter_map(|e| match e.state {
            FaultState::Applied => Some(e.expires_at),
            FaultState::Failed => e.retry_at,
            _ => None,
        });
        let lease = match (&self.cfg.lease, self.lease_lost) {
            (Some(l), false) => Some(self.last_contact.unwrap_or(self.started) + l.duration),
            _ => None,
        };
        let waits = self.waits.iter().filter_map(|w| w.deadline);
        faults.chain(lease).chain(waits).min()
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if let (Some(l), false) = (&self.cfg.lease, self.lease_lost) {
            let since = self.last_contact.unwrap_or(self.started);
            if now >= since + l.duration {
                self.lease_lost = true;
                warn!(coordinator = %l.coordinator_url, silent_for = %human_duration(now - since), active_faults = self.active.len(),
                    "dead-man lease expired: reverting every fault and refusing new ones until the coordinator answers");
                self.revert_all(RevertReason::LeaseLost);
            }
        }
        let due: Vec<(String, RevertReason)> = self
            .active
            .values()
            .filter(|e| e.op == Op::Idle)
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
            self.start_revert(&id, reason);
        }
        // RevertAll callers whose wait is over get what is done so far.
        let (over, keep): (Vec<AllWait>, Vec<AllWait>) = self.waits.drain(..).partition(|w| w.deadline.is_some_and(|d| d <= now));
        self.waits = keep;
        for w in over {
            self.answer_wait(w);
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Apply(req, reply) => self.apply(*req, reply),
            Cmd::Revert(id, reply) => self.revert_requested(&id, reply),
            Cmd::RevertAll { reason, disarm, wait, reply } => {
                if let Some(why) = disarm {
                    self.disarm(why, reason == RevertReason::EmergencyStop);
                }
                self.wait_for_all(reason, wait, reply);
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
                self.contact(coordinator_armed);
                let _ = reply.send(());
            }
            Cmd::Refused { reason, reply } => {
                if self.refused.as_deref() != Some(reason.as_str()) {
                    error!(refusal = %reason, active_faults = self.active.len(),
                        "the coordinator REFUSED this agent: reverting every fault and refusing new ones until it is accepted");
                }
                self.refused = Some(reason);
                self.lease_lost = true;
                self.revert_all(RevertReason::LeaseLost);
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
                self.wait_for_all(RevertReason::Shutdown, None, reply);
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

    fn contact(&mut self, coordinator_armed: bool) {
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
            if self.active.values().any(|e| !matches!(e.op, Op::Reverting | Op::QueuedRevert)) {
                warn!(active_faults = self.active.len(), "fleet is disarmed but faults are active here: reverting them");
                self.revert_all(RevertReason::EmergencyStop);
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

    fn apply(&mut self, mut req: FaultRequest, reply: ApplyReply) {
        if let Err(e) = self.refuse_new() {
            let _ = reply.send(Err(e));
            return;
        }
        let id = req.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if self.active.contains_key(&id) {
            let _ = reply.send(Err(AgentError::AlreadyExists(id)));
            return;
        }
        if self.active.len() >= chaos_proto::spec::MAX_ACTIVE_FAULTS as usize {
            let _ = reply.send(Err(AgentError::Guard(format!(
                "this agent holds {} faults, the most it holds at once; revert some first",
                self.active.len()
            ))));
            return;
        }
        // Drivers name what they create after the fault (e.g. nft tables).
        req.id = Some(id.clone());
        let mut entry = Entry::new(id.clone(), req, SystemTime::now());
        entry.apply_reply = Some(reply);
        entry.op = Op::QueuedApply;
        let lane = entry.lane.clone();
        self.active.insert(id.clone(), entry);
        self.enqueue(&lane, id);
    }

    /// Put a job of fault `id` in `lane` and start it if the lane is free.
    fn enqueue(&mut self, lane: &str, id: String) {
        let l = self.lanes.entry(lane.to_string()).or_default();
        l.queue.push_back(id);
        if !l.running {
            self.start_next(lane);
        }
    }

    /// Start the next job waiting in `lane`; drop the lane when it is empty.
    fn start_next(&mut self, lane: &str) {
        let Some(l) = self.lanes.get_mut(lane) else { return };
        let Some(id) = l.queue.pop_front() else {
            self.lanes.remove(lane);
            return;
        };
        l.running = true;
        let Some(e) = self.active.get_mut(&id) else {
            // Cancelled while queued.
            if let Some(l) = self.lanes.get_mut(lane) {
                l.running = false;
            }
            return self.start_next(lane);
        };
        let (drivers, journal, tx) = (Arc::clone(&self.drivers), Arc::clone(&self.journal), self.done_tx.clone());
        match e.op {
            Op::QueuedApply => {
                e.op = Op::Applying;
                let (req, created_at) = (e.req.clone(), e.created_at);
                tokio::spawn(async move {
                    let outcome = match chaos_proto::serve::catch_panic(apply_job(drivers, journal, req.clone(), created_at, &tx)).await {
                        Ok(o) => o,
                        Err(panic) => ApplyOutcome::Failed {
                            error: AgentError::Command { cmd: "apply".into(), detail: format!("the driver panicked: {panic}") },
                            undo: Err(AgentError::Command { cmd: "undo".into(), detail: "not tried after a panic; retried".into() }),
                            check: Check::default(),
                        },
                    };
                    let _ = tx.send(Done::Applied { id: req.id.clone().unwrap_or_default(), outcome });
                });
            }
            Op::QueuedRevert => {
                e.op = Op::Reverting;
                let job = RevertJob::of(e);
                tokio::spawn(async move {
                    let id = job.id.clone();
                    let (result, check) = match chaos_proto::serve::catch_panic(job.run(drivers, journal)).await {
                        Ok(r) => r,
                        Err(panic) => (
                            Err(AgentError::Command { cmd: "revert".into(), detail: format!("the driver panicked: {panic}") }),
                            Check::default(),
                        ),
                    };
                    let _ = tx.send(Done::Reverted { id, result, check });
                });
            }
            op => {
                error!(fault_id = %id, ?op, "lane held a fault with no job queued; skipped");
                if let Some(l) = self.lanes.get_mut(lane) {
                    l.running = false;
                }
                self.start_next(lane);
            }
        }
    }

    /// A job finished (or a journal record was written): take its result and free its lane.
    fn on_done(&mut self, done: Done) {
        match done {
            Done::Journaled { id, plan, before } => {
                let Some(mut e) = self.active.remove(&id) else { return };
                e.plan = Some(plan);
                e.before = Some(before);
                for other in self.active.values_mut() {
                    e.share_with(other);
                }
                self.active.insert(id, e);
            }
            Done::Applied { id, outcome } => {
                let lane = self.active.get(&id).map(|e| e.lane.clone());
                self.settle_apply(&id, outcome);
                if let Some(lane) = lane {
                    self.free(&lane);
                }
            }
            Done::Reverted { id, result, check } => {
                let Some(mut entry) = self.active.remove(&id) else { return };
                let lane = entry.lane.clone();
                entry.op = Op::Idle;
                let reverted = self.settle_revert(&mut entry, result, check);
                let pb = entry.to_pb();
                let replies = std::mem::take(&mut entry.revert_replies);
                if reverted {
                    for r in replies {
                        let _ = r.send(Ok((pb.clone(), false)));
                    }
                    self.push_history(pb.clone());
                } else {
                    for r in replies {
                        let _ = r.send(Err(AgentError::RevertFailed { id: id.clone(), error: entry.error.clone() }));
                    }
                    self.active.insert(id.clone(), entry);
                }
                self.settle_waits(&id, if reverted { Settled::Reverted(pb) } else { Settled::Failed(pb) });
                self.free(&lane);
            }
        }
    }

    fn free(&mut self, lane: &str) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.running = false;
        }
        self.start_next(lane);
    }

    fn settle_apply(&mut self, id: &str, outcome: ApplyOutcome) {
        let Some(mut e) = self.active.remove(id) else { return };
        e.op = Op::Idle;
        let family = e.req.kind.family();
        let reply = e.apply_reply.take();
        match outcome {
            ApplyOutcome::Ok(applied) => {
                let applied_at = SystemTime::now();
                info!(fault_id = %id, family, target = %e.req.target, ttl = %human_duration(e.req.duration),
                    summary = %applied.summary, "fault applied");
                self.cfg.counters.applied(family, applied.backend);
                e.state = FaultState::Applied;
                e.expires_at = Instant::now() + e.req.duration;
                e.expires_wall = applied_at + e.req.duration;
                e.applied = Some(applied);
                e.applied_at = Some(applied_at);
                if let Some(r) = reply {
                    let _ = r.send(Ok(e.to_pb()));
                }
                let wanted = e.revert_wanted.take();
                self.active.insert(id.to_string(), e);
                if let Some(reason) = wanted {
                    info!(fault_id = %id, reason = reason.as_str_name(), "reverting a fault asked to revert while it was being applied");
                    self.start_revert(id, reason);
                }
            }
            ApplyOutcome::Refused(err) => {
                // Nothing was journaled or done: the request is refused as a whole.
                let ended = self.ended_before_effect(&e, FaultState::Failed, RevertReason::ApplyFailed, err.to_string(), String::new());
                if let Some(r) = reply {
                    let _ = r.send(Err(err));
                }
                for r in e.revert_replies.drain(..) {
                    let _ = r.send(Ok((ended.clone(), true)));
                }
                self.settle_waits(id, Settled::Gone);
            }
            ApplyOutcome::Failed { error, undo, check } => {
                warn!(fault_id = %id, error = %error, "apply failed; undoing whatever part of it took effect");
                self.cfg.counters.apply_failed(family);
                self.count_check(family, &check);
                e.check = check;
                match undo {
                    Ok(summary) => {
                        let ended = self.ended_before_effect(&e, FaultState::Failed, RevertReason::ApplyFailed, error.to_string(), summary);
                        self.push_history(ended.clone());
                        for r in e.revert_replies.drain(..) {
                            let _ = r.send(Ok((ended.clone(), true)));
                        }
                        self.settle_waits(id, Settled::Gone);
                    }
                    Err(undo_err) => {
                        // Part of it may be in effect: it stays active, FAILED, its record kept, and
                        // the revert is retried like any failed revert.
                        error!(fault_id = %id, error = %undo_err, "undoing a failed apply failed too; journal record kept, will retry");
                        e.state = FaultState::Failed;
                        e.revert_reason = RevertReason::ApplyFailed;
                        e.error = format!("{error}; undoing it failed: {undo_err}");
                        e.retry_at = Some(Instant::now() + self.cfg.revert_retry_interval);
                        let pb = e.to_pb();
                        for r in e.revert_replies.drain(..) {
                            let _ = r.send(Err(AgentError::RevertFailed { id: id.to_string(), error: e.error.clone() }));
                        }
                        self.active.insert(id.to_string(), e);
                        self.settle_waits(id, Settled::Failed(pb));
                    }
                }
                if let Some(r) = reply {
                    let _ = r.send(Err(error));
                }
            }
        }
    }

    /// The final record of a fault that ended without being in effect.
    fn ended_before_effect(&self, e: &Entry, state: FaultState, reason: RevertReason, error: String, summary: String) -> pb::Fault {
        pb::Fault {
            id: e.id.clone(),
            spec: Some(e.req.to_pb(&e.id)),
            state: state as i32,
            created_at: Some(timestamp_to_pb(e.created_at)),
            reverted_at: Some(timestamp_to_pb(SystemTime::now())),
            revert_reason: reason as i32,
            error,
            revert_summary: summary,
            revert_check: e.check.verdict as i32,
            revert_check_detail: e.check.detail.clone(),
            revert_check_took: e.check.took(),
            ..Default::default()
        }
    }

    /// Count a revert check's verdict (none when there was no check).
    fn count_check(&self, family: &str, check: &Check) {
        if check.verdict != pb::RevertCheck::Unspecified {
            self.cfg.counters.revert_checked(family, check.name());
        }
    }

    /// Record the result of a revert job in `entry`. True when it is now reverted.
    fn settle_revert(&mut self, entry: &mut Entry, result: Result<String, AgentError>, check: Check) -> bool {
        let reason = entry.revert_reason;
        let family = entry.req.kind.family();
        self.count_check(family, &check);
        match check.verdict {
            pb::RevertCheck::Different => {
                error!(fault_id = %entry.id, differences = %check.detail, "the host is NOT as before the fault after its revert")
            }
            pb::RevertCheck::NotCompared => info!(fault_id = %entry.id, why = %check.detail, "revert not compared with the state before"),
            _ => {}
        }
        entry.check = check;
        match result {
            Ok(summary) => {
                info!(fault_id = %entry.id, reason = reason.as_str_name(), summary = %summary, check = %entry.check.detail, "fault reverted");
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

    /// Have fault `id` reverted for `reason`: cancelled if its apply is
    /// still queued, reverted after its apply if that is running, queued in
    /// its lane otherwise. Does nothing when a revert of it is already under way.
    fn start_revert(&mut self, id: &str, reason: RevertReason) {
        let Some(e) = self.active.get_mut(id) else { return };
        match e.op {
            Op::QueuedRevert | Op::Reverting => {}
            Op::Applying => {
                e.revert_wanted.get_or_insert(reason);
            }
            Op::QueuedApply => {
                // Never started: nothing was journaled or done.
                let Some(mut e) = self.active.remove(id) else { return };
                info!(fault_id = %id, reason = reason.as_str_name(), "fault cancelled before its apply started");
                if let Some(l) = self.lanes.get_mut(&e.lane) {
                    l.queue.retain(|q| q != id);
                }
                let ended = self.ended_before_effect(
                    &e,
                    FaultState::Reverted,
                    reason,
                    String::new(),
                    "cancelled before it was applied: nothing was done".into(),
                );
                if let Some(r) = e.apply_reply.take() {
                    let _ = r.send(Err(AgentError::Cancelled(format!(
                        "fault {id:?} was reverted ({}) before its apply started; nothing was done",
                        reason.as_str_name()
                    ))));
                }
                for r in e.revert_replies.drain(..) {
                    let _ = r.send(Ok((ended.clone(), false)));
                }
                self.push_history(ended.clone());
                self.settle_waits(id, Settled::Reverted(ended));
            }
            Op::Idle => {
                observe(&self.drivers, e);
                e.state = FaultState::Reverting;
                e.revert_reason = reason;
                e.op = Op::QueuedRevert;
                e.retry_at = None;
                let lane = e.lane.clone();
                self.enqueue(&lane, id.to_string());
            }
        }
    }

    fn revert_requested(&mut self, id: &str, reply: RevertReply) {
        if let Some(e) = self.active.get_mut(id) {
            e.revert_replies.push(reply);
            self.start_revert(id, RevertReason::Requested);
            return;
        }
        let r = self
            .history
            .iter()
            .rev()
            .find(|f| f.id == id)
            .map(|f| (f.clone(), true))
            .ok_or_else(|| AgentError::UnknownFault(id.to_string()));
        let _ = reply.send(r);
    }

    /// Start reverting every active fault.
    fn revert_all(&mut self, reason: RevertReason) {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            self.start_revert(&id, reason);
        }
    }

    /// Start reverting every active fault and answer `reply` when they are
    /// done or `wait` has passed.
    fn wait_for_all(&mut self, reason: RevertReason, wait: Option<Duration>, reply: oneshot::Sender<RevertAllOutcome>) {
        let pending: BTreeSet<String> = self.active.keys().cloned().collect();
        self.waits.push(AllWait { pending, out: RevertAllOutcome::default(), deadline: wait.map(|w| Instant::now() + w), reply });
        self.revert_all(reason);
        // Whatever finished at once (cancelled applies) may complete a wait.
        let (done, keep): (Vec<AllWait>, Vec<AllWait>) = self.waits.drain(..).partition(|w| w.pending.is_empty());
        self.waits = keep;
        for w in done {
            self.answer_wait(w);
        }
    }

    /// Tell every waiting RevertAll how fault `id` ended; answer those with nothing left to wait for.
    fn settle_waits(&mut self, id: &str, how: Settled) {
        let mut finished = Vec::new();
        for (i, w) in self.waits.iter_mut().enumerate() {
            if !w.pending.remove(id) {
                continue;
            }
            match &how {
                Settled::Reverted(f) => w.out.reverted.push(f.clone()),
                Settled::Failed(f) => w.out.failed.push(f.clone()),
                Settled::Gone => {}
            }
            if w.pending.is_empty() {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let w = self.waits.remove(i);
            self.answer_wait(w);
        }
    }

    fn answer_wait(&mut self, mut w: AllWait) {
        w.out.in_progress = w.pending.iter().filter_map(|id| self.active.get(id)).map(Entry::to_pb).collect();
        w.out.armed = self.arming.is_armed();
        let o = &w.out;
        if !o.reverted.is_empty() || !o.failed.is_empty() || !o.in_progress.is_empty() {
            info!(reverted = o.reverted.len(), failed = o.failed.len(), in_progress = o.in_progress.len(), "revert all answered");
        }
        if !o.in_progress.is_empty() {
            warn!(faults = ?w.pending, "revert all answered while these faults' drivers were still busy; they are reverted when their driver returns");
        }
        let _ = w.reply.send(w.out);
    }

    fn push_history(&mut self, f: pb::Fault) {
        self.history.push_back(f);
        while self.history.len() > self.cfg.history_len {
            self.history.pop_front();
        }
    }
}

/// How a fault a RevertAll waits for ended.
enum Settled {
    Reverted(pb::Fault),
    Failed(pb::Fault),
    /// It never took effect (its apply failed and was undone).
    Gone,
}

/// Resolve, plan, journal and apply one fault (a job: runs outside the owner task).
async fn apply_job(
    drivers: Arc<Drivers>,
    journal: Arc<dyn JournalStore>,
    req: FaultRequest,
    created_at: SystemTime,
    tx: &mpsc::UnboundedSender<Done>,
) -> ApplyOutcome {
    let id = req.id.clone().unwrap_or_default();
    let planned = match drivers.resolve_container(&req).await {
        Ok(p) => p,
        Err(e) => return ApplyOutcome::Refused(e),
    };
    let plan = match drivers.for_request(&planned).plan(&planned).await {
        Ok(p) => p,
        Err(e) => return ApplyOutcome::Refused(e),
    };
    let driver = drivers.for_plan(&plan);
    // What the fault is about to touch, compared after its revert.
    let before = match read_before(driver, &plan).await {
        Ok(b) => b,
        Err(e) => return ApplyOutcome::Refused(e),
    };
    let rec = JournalRecord {
        version: crate::journal::JOURNAL_VERSION,
        id: id.clone(),
        request: req.clone(),
        plan: plan.clone(),
        created_at_unix_ms: unix_ms(created_at),
        expires_at_unix_ms: unix_ms(created_at + req.duration),
        agent_pid: std::process::id(),
        before: Some(before.clone()),
    };
    // Journal first: if the agent dies right after the host is touched,
    // the next run finds this record and reverts it.
    if let Err(e) = journal_io(&journal, move |j| j.put(&rec)).await {
        return ApplyOutcome::Refused(e);
    }
    let _ = tx.send(Done::Journaled { id: id.clone(), plan: plan.clone(), before: before.clone() });
    match driver.apply(&plan).await {
        Ok(applied) => ApplyOutcome::Ok(applied),
        Err(error) => {
            // Nothing else was applied on this target meanwhile (its lane is held): nothing is shared.
            let (undo, check) = revert_verified(driver, &plan, Some(&before), &BTreeMap::new()).await;
            if undo.is_ok() {
                let id = id.clone();
                if let Err(je) = journal_io(&journal, move |j| j.remove(&id)).await {
                    error!(fault_id = %req.id.as_deref().unwrap_or_default(), error = %je, "could not remove journal record of a failed apply");
                }
            }
            ApplyOutcome::Failed { error, undo, check }
        }
    }
}

/// Revert one fault, prove it, and remove its journal record (a job).
struct RevertJob {
    id: String,
    plan: Option<Plan>,
    before: Option<Before>,
    shared: BTreeMap<String, String>,
}

impl RevertJob {
    fn of(e: &Entry) -> Self {
        RevertJob { id: e.id.clone(), plan: e.plan.clone(), before: e.before.clone(), shared: e.shared.clone() }
    }

    async fn run(self, drivers: Arc<Drivers>, journal: Arc<dyn JournalStore>) -> (Result<String, AgentError>, Check) {
        let Some(plan) = self.plan else {
            // Its apply job ended (a panic) before journaling: nothing was done.
            return (Ok("never applied: nothing to undo".into()), Check::default());
        };
        let (result, check) = revert_verified(drivers.for_plan(&plan), &plan, self.before.as_ref(), &self.shared).await;
        if result.is_ok() {
            let id = self.id.clone();
            if let Err(e) = journal_io(&journal, move |j| j.remove(&id)).await {
                // The revert is done; a stale record only causes one more
                // (idempotent, pid-guarded) revert at the next start.
                error!(fault_id = %self.id, error = %e, "fault reverted but its journal record could not be removed");
            }
        }
        (result, check)
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
        exec: FakeExec,
        journal: MemJournal,
        report: ReplayReport,
    }

    async fn rig_with(cfg: LifecycleConfig, procs: FakeProcs, journal: MemJournal) -> Rig {
        let prot = Arc::new(Protection::new(4242, vec![], vec![]));
        let exec = FakeExec::default();
        let network = NetworkDriver::new(Arc::new(exec.clone()), Arc::new(procs.clone()), Exemptions::default());
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
        Rig { lc, procs, exec, journal, report }
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
        // left-1 as this agent writes it (with the state before), left-2 as format 1 did.
        for (id, pid, start, version) in [("left-1", 10, 100, 2), ("left-2", 11, 101, 1)] {
            let before = (version == 2).then(|| {
                let mut s = crate::faults::Snapshot::default();
                s.insert("process 10 (sleep, start time 100)", "not stopped");
                Before::Read(s)
            });
            journal.seed(JournalRecord {
                version,
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
                before,
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
        let check =
            |id: &str| hist.iter().find(|f| f.id == id).map(|f| (f.revert_check, f.revert_check_detail.clone())).expect("in history");
        assert_eq!(check("left-1"), (pb::RevertCheck::Verified as i32, "host state as before (1 item read)".into()));
        let (v, why) = check("left-2");
        assert_eq!(v, pb::RevertCheck::NotCompared as i32);
        assert!(why.contains("older agent"), "{why}");
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
        let out = r.lc.revert_all(RevertReason::EmergencyStop, Some("drill".into()), Duration::from_secs(5)).await.expect("revert all");
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
        for f in &out.reverted {
            assert_eq!(f.revert_check, pb::RevertCheck::Verified as i32, "{}", f.revert_check_detail);
            assert_eq!(f.revert_check_detail, "host state as before (1 item read)");
        }
        assert_eq!((r.procs.state(10), r.procs.state(11)), (Some('S'), Some('S')));
        assert_eq!(r.lc.apply(&pause(10, 5)).await.expect_err("closed").code(), Code::Unavailable);
    }

    /// A host partition whose `nft -f` (the apply) waits for a gate: a slow driver.
    fn slow_partition(r: &Rig, id: &str) -> (FaultSpec, crate::sys::netexec::Gate) {
        use chaos_proto::pb::{NetworkPartition, NetworkScope};
        let gate = r.exec.hold("nft --echo -f");
        let spec = FaultSpec {
            id: id.into(),
            target: Some(Target { kind: Some(Kind::Host(chaos_proto::pb::HostTarget {})) }),
            duration: Some(prost_types::Duration { seconds: 300, nanos: 0 }),
            fault: Some(F::NetworkPartition(NetworkPartition {
                scope: Some(NetworkScope { peer_cidrs: vec!["198.18.0.3".into()], ..Default::default() }),
            })),
            ..Default::default()
        };
        (spec, gate)
    }

    /// Start applying a [`slow_partition`] in the background; its driver is held until the gate opens.
    async fn start_slow_partition(
        r: &Rig,
        id: &str,
    ) -> (tokio::task::JoinHandle<Result<pb::Fault, AgentError>>, crate::sys::netexec::Gate) {
        let (spec, gate) = slow_partition(r, id);
        let lc = r.lc.clone();
        let slow = tokio::spawn(async move { lc.apply(&spec).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        (slow, gate)
    }

    /// Reverts of a partition run so far (each deletes its inet table once, in an `nft -f` script).
    fn nft_deletes(r: &Rig) -> usize {
        r.exec
            .calls()
            .iter()
            .filter(|c| c.argv.first().is_some_and(|a| a == "nft") && c.stdin.as_deref().is_some_and(|s| s.contains("delete table inet")))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_apply_holds_up_nothing_on_other_targets_and_is_reverted_when_it_returns() {
        let r = rig().await;
        let (slow, gate) = start_slow_partition(&r, "slow").await;
        // Another target's fault applies, lists and reverts while the partition's driver is busy.
        let f = r.lc.apply(&pause(10, 300)).await.expect("apply beside a slow driver");
        let listed = r.lc.list(false).await.expect("list");
        assert_eq!(
            listed.iter().map(|f| (f.id.as_str(), state(f))).collect::<Vec<_>>(),
            vec![("slow", FaultState::Pending), (f.id.as_str(), FaultState::Applied)]
        );
        assert_eq!(r.journal.ids().len(), 2, "the slow fault is journaled before its driver runs");
        let started = Instant::now();
        let out = r.lc.revert_all(RevertReason::EmergencyStop, Some("drill".into()), Duration::from_secs(1)).await.expect("revert all");
        assert_eq!(started.elapsed(), Duration::from_secs(1), "answered when its wait ended");
        assert_eq!(out.reverted.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), vec![f.id.as_str()]);
        assert_eq!(r.procs.state(10), Some('S'), "the other fault is reverted");
        assert_eq!(out.in_progress.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), vec!["slow"]);
        assert!(out.failed.is_empty() && !out.armed);
        assert!(r.lc.status().await.expect("status").active_faults == 1);
        // The driver returns: the apply is answered, then reverted without being asked again.
        gate.open();
        let applied = slow.await.expect("join").expect("the slow apply itself succeeded");
        assert_eq!(state(&applied), FaultState::Applied);
        for _ in 0..100 {
            if r.lc.list(false).await.expect("list").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(r.lc.list(false).await.expect("list").is_empty(), "reverted once its apply returned");
        assert!(r.journal.ids().is_empty());
        assert_eq!(nft_deletes(&r), 1, "its table deleted once");
        let hist = r.lc.list(true).await.expect("list");
        let slow = hist.iter().find(|h| h.id == "slow").expect("in history");
        assert_eq!((state(slow), slow.revert_reason), (FaultState::Reverted, RevertReason::EmergencyStop as i32));
    }

    #[tokio::test(start_paused = true)]
    async fn work_on_one_target_runs_in_order_and_a_queued_apply_is_cancelled_by_a_revert() {
        let r = rig().await;
        let (spec, gate) = slow_partition(&r, "first");
        let mut second = spec.clone();
        second.id = "second".into();
        let (lc1, lc2) = (r.lc.clone(), r.lc.clone());
        let first = tokio::spawn(async move { lc1.apply(&spec).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let queued = tokio::spawn(async move { lc2.apply(&second).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let changes = |r: &Rig| r.exec.calls().iter().filter(|c| c.argv.first().is_some_and(|a| a == "nft") && c.argv[1] != "list").count();
        assert_eq!(changes(&r), 0, "still held (only the state before was read)");
        assert_eq!(r.journal.ids(), vec!["first".to_string()], "the second waits its turn, not yet journaled");
        // Reverting the queued one cancels it: nothing was done for it.
        let (f, already) = r.lc.revert("second").await.expect("revert queued");
        assert!(!already);
        assert_eq!(state(&f), FaultState::Reverted);
        assert!(f.revert_summary.contains("nothing was done"), "{}", f.revert_summary);
        let e = queued.await.expect("join").expect_err("its apply is cancelled");
        assert_eq!(e.code(), Code::Aborted);
        // Reverting the running one waits for its apply, then reverts it.
        let lc = r.lc.clone();
        let rev = tokio::spawn(async move { lc.revert("first").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!rev.is_finished(), "waits for the apply");
        gate.open();
        first.await.expect("join").expect("applied");
        let (f, _) = rev.await.expect("join").expect("reverted after its apply");
        assert_eq!(state(&f), FaultState::Reverted);
        assert!(r.journal.ids().is_empty());
        assert_eq!(r.journal.ops(), vec!["put first".to_string(), "remove first".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_a_slow_driver_and_reverts_what_it_applied() {
        let r = rig().await;
        let (slow, gate) = start_slow_partition(&r, "slow").await;
        let lc = r.lc.clone();
        let down = tokio::spawn(async move { lc.shutdown().await });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!down.is_finished(), "shutdown waits for the driver");
        gate.open();
        let out = down.await.expect("join").expect("shutdown");
        assert_eq!(out.reverted.len(), 1);
        assert!(out.in_progress.is_empty());
        slow.await.expect("join").expect("applied");
        assert!(r.journal.ids().is_empty());
    }

    fn out(stdout: &str) -> crate::sys::netexec::CmdOutput {
        crate::sys::netexec::CmdOutput { success: true, stdout: stdout.into(), stderr: String::new() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leftover_found_after_a_revert_is_reverted_again_then_reported_failed_by_name() {
        let counters = crate::metrics::FaultCounters::default();
        let cfg = LifecycleConfig { counters: counters.clone(), ..Default::default() };
        let r = rig_with(cfg.clone(), FakeProcs::default(), MemJournal::default()).await;
        // Reads of the host's tables: before apply; after the revert and after the second
        // revert the fault's table is still there (a delete that did nothing); the retry finds it gone.
        let (before, left) = (out("table inet fw\n"), out("table inet fw\ntable inet chaos_left\ntable inet chaos_other\n"));
        r.exec.answer_in_turn("list tables", vec![before.clone(), left.clone(), left, before]);
        let (spec, gate) = slow_partition(&r, "left");
        gate.open();
        r.lc.apply(&spec).await.expect("apply");
        let e = r.lc.revert("left").await.expect_err("a leftover is not a revert");
        let want = r#"nft tables inet in host netns: was "fw", now "chaos_left, fw""#;
        assert!(e.to_string().contains(want), "{e}");
        assert_eq!(nft_deletes(&r), 2, "reverted once more before it is reported");
        let f = r.lc.list(false).await.expect("list").pop().expect("still active");
        assert_eq!((state(&f), f.revert_check), (FaultState::Failed, pb::RevertCheck::Different as i32));
        assert_eq!(f.revert_check_detail, want, "the difference is named, another fault's table is not");
        assert!(f.error.contains(want), "{}", f.error);
        assert_eq!(r.journal.ids(), vec!["left".to_string()], "its record is kept");
        assert_eq!(counters.revert_checks("network_partition", "different"), 1);
        // Retried like any failed revert: this time the host is as before.
        tokio::time::sleep(cfg.revert_retry_interval + Duration::from_millis(100)).await;
        let hist = r.lc.list(true).await.expect("list");
        assert!(r.lc.list(false).await.expect("list").is_empty(), "{hist:?}");
        let f = hist.iter().find(|f| f.id == "left").expect("history");
        assert_eq!((state(f), f.revert_check), (FaultState::Reverted, pb::RevertCheck::Verified as i32));
        assert_eq!(f.revert_check_detail, "host state as before (2 items read)");
        assert!(r.journal.ids().is_empty());
        assert_eq!(counters.revert_checks("network_partition", "verified"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn faults_on_the_same_thing_do_not_count_each_other_as_leftovers() {
        let r = rig().await;
        let a = r.lc.apply(&pause(10, 300)).await.expect("first pause");
        let b = r.lc.apply(&pause(10, 300)).await.expect("second pause of the same process");
        // The first revert resumes the process: as before the first pause.
        let (fa, _) = r.lc.revert(&a.id).await.expect("revert first");
        assert_eq!(fa.revert_check, pb::RevertCheck::Verified as i32, "{}", fa.revert_check_detail);
        // The second found it stopped (by the first): not a leftover of either.
        let (fb, _) = r.lc.revert(&b.id).await.expect("revert second");
        assert_eq!((state(&fb), fb.revert_check), (FaultState::Reverted, pb::RevertCheck::NotCompared as i32));
        assert!(fb.revert_check_detail.contains("nothing to compare"), "{}", fb.revert_check_detail);
        assert_eq!(r.procs.state(10), Some('S'));
    }

    /// Two agents on one host pause the same process (a GameDay's picks do):
    /// neither knows the other's fault, and neither revert is a leftover.
    #[tokio::test(start_paused = true)]
    async fn pauses_of_one_process_by_two_agents_both_end_reverted() {
        let procs = FakeProcs::default();
        procs.spawn(10, "sleep", 100);
        let one = rig_with(LifecycleConfig::default(), procs.clone(), MemJournal::default()).await;
        let two = rig_with(LifecycleConfig::default(), procs.clone(), MemJournal::default()).await;
        let a = one.lc.apply(&pause(10, 300)).await.expect("first agent's pause");
        let b = two.lc.apply(&pause(10, 300)).await.expect("second agent's pause");
        for (r, f) in [(&one, &a), (&two, &b)] {
            let (done, _) = r.lc.revert(&f.id).await.expect("revert");
            assert_eq!(state(&done), FaultState::Reverted, "{}: {}", done.id, done.error);
            assert!(r.lc.list(false).await.expect("list").is_empty(), "nothing left to retry");
        }
        assert_eq!(procs.state(10), Some('S'));
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_gone_by_its_revert_is_verified_as_nothing_left() {
        let r = rig().await;
        let f = r.lc.apply(&pause(11, 300)).await.expect("apply");
        r.procs.exit(11);
        let (f, _) = r.lc.revert(&f.id).await.expect("revert");
        assert_eq!(f.revert_check, pb::RevertCheck::Verified as i32);
        assert!(f.revert_check_detail.contains("gone"), "{}", f.revert_check_detail);
        assert!(r.journal.ids().is_empty());
    }
}
