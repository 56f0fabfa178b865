//! Process faults: pause (SIGSTOP, reverted by SIGCONT) and kill (a signal
//! of choice, nothing to undo), by pid or by exact process name.
//!
//! Every process is named by pid *and* start time; the signal goes through
//! [`Signals::signal_if_same`], so a pid reused by another process after
//! the plan (or after an agent crash) is never touched.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use chaos_proto::spec::{FaultKind, FaultRequest, SignalName, TargetSpec};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::{Applied, FaultDriver, Observation, Plan, ProcRef, Snapshot};
use crate::{
    error::AgentError,
    protect::Protection,
    sys::{Delivery, ProcessTable, Signals, cgroup::CgroupFs, processes_named},
};

/// What a process fault does to its processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessAction {
    Pause,
    Kill { signal: SignalName },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPlan {
    pub action: ProcessAction,
    pub processes: Vec<ProcRef>,
    /// The fault's id (journals written before it existed read as empty).
    #[serde(default)]
    pub fault_id: String,
}

/// After a kill: who would count as a restart, and what was seen.
#[derive(Debug, Clone)]
struct RestartWatch {
    names: Vec<String>,
    /// Processes with those names that existed at the kill.
    known: HashSet<(u32, u64)>,
    kill_ticks: u64,
    /// The first newcomer and its delay after the kill.
    seen: Option<(ProcRef, Duration)>,
}

/// Driver for `process_pause` and `process_kill`.
pub struct ProcessDriver {
    table: Arc<dyn ProcessTable>,
    signals: Arc<dyn Signals>,
    protection: Arc<Protection>,
    watches: Mutex<HashMap<String, RestartWatch>>,
    cgroups: Option<CgroupFs>,
}

impl ProcessDriver {
    pub fn new(table: Arc<dyn ProcessTable>, signals: Arc<dyn Signals>, protection: Arc<Protection>) -> Self {
        Self { table, signals, protection, watches: Mutex::new(HashMap::new()), cgroups: None }
    }

    /// Let targets name a cgroup (every process in it and below it).
    pub fn with_cgroups(mut self, cgroups: Option<CgroupFs>) -> Self {
        self.cgroups = cgroups;
        self
    }

    fn resolve(&self, target: &TargetSpec) -> Result<Vec<ProcRef>, AgentError> {
        resolve_processes(self.table.as_ref(), &self.protection, target, self.cgroups.as_ref())
    }

    /// Send `sig` to each process; returns those reached and those gone.
    fn send_all(&self, procs: &[ProcRef], sig: Signal) -> Result<(Vec<ProcRef>, Vec<ProcRef>), AgentError> {
        let (mut sent, mut gone) = (Vec::new(), Vec::new());
        for p in procs {
            match self.signals.signal_if_same(p.pid, p.start_time_ticks, sig) {
                Ok(Delivery::Sent) => sent.push(p.clone()),
                Ok(Delivery::Gone) => gone.push(p.clone()),
                Err(errno) => return Err(AgentError::Os { op: format!("sending {}", sig.as_str()), pid: p.pid, errno }),
            }
        }
        Ok((sent, gone))
    }
}

/// The live processes a pid, process-name or (with `cgroups`) cgroup target
/// names, refused when any of them is protected.
pub fn resolve_processes(
    table: &dyn ProcessTable,
    protection: &Protection,
    target: &TargetSpec,
    cgroups: Option<&CgroupFs>,
) -> Result<Vec<ProcRef>, AgentError> {
    let candidates = match target {
        TargetSpec::CgroupPath(path) if cgroups.is_some() => {
            let pids = cgroups
                .and_then(|cg| cg.members_of(path))
                .ok_or_else(|| AgentError::TargetNotFound(format!("no cgroup /{path} on this host")))?;
            let found: Vec<_> = pids.into_iter().filter_map(|pid| table.stat(pid).ok().flatten().map(|s| (s, None))).collect();
            if found.is_empty() {
                return Err(AgentError::TargetNotFound(format!("cgroup /{path} holds no process")));
            }
            found
        }
        TargetSpec::Pid(pid) => {
            let stat = table
                .stat(*pid)
                .map_err(AgentError::ProcessTable)?
                .ok_or_else(|| AgentError::TargetNotFound(format!("no process with pid {pid}")))?;
            vec![(stat, None)]
        }
        TargetSpec::ProcessName(name) => {
            if protection.name_is_protected(name) {
                return Err(AgentError::Protected(format!("process name {name:?} is listed in protected.names")));
            }
            // argv[0] kept when read: the protection check below needs it too.
            let found = processes_named(table, name).map_err(AgentError::ProcessTable)?;
            if found.is_empty() {
                return Err(AgentError::TargetNotFound(format!("no process named {name:?}")));
            }
            found
        }
        other => return Err(AgentError::TargetNotFound(format!("process faults need a pid, process name or cgroup, got {other}"))),
    };
    let mut refs = Vec::with_capacity(candidates.len());
    for (stat, argv0) in candidates {
        if stat.state == 'Z' || stat.state == 'X' {
            if matches!(target, TargetSpec::Pid(_)) {
                return Err(AgentError::TargetNotFound(format!("pid {} ({}) has exited (zombie)", stat.pid, stat.comm)));
            }
            continue;
        }
        let argv0 = argv0.or_else(|| table.argv0_basename(stat.pid));
        if let Some(why) = protection.why_protected(&stat, argv0.as_deref()) {
            return Err(AgentError::Protected(why));
        }
        refs.push(ProcRef { pid: stat.pid, start_time_ticks: stat.start_time_ticks, name: stat.comm });
    }
    if refs.is_empty() {
        return Err(AgentError::TargetNotFound(format!("no live process for {target}")));
    }
    Ok(refs)
}

/// How long apply waits to see a paused process stopped in /proc. A
/// process in uninterruptible sleep (D) stops only when its IO completes.
const STOP_VERIFY_TIMEOUT: Duration = Duration::from_millis(500);

impl ProcessDriver {
    /// Wait until every process is seen stopped (`T`/`t`) or gone; returns
    /// those still not stopped when the time is up.
    async fn await_stopped(&self, procs: &[ProcRef]) -> Vec<ProcRef> {
        let deadline = tokio::time::Instant::now() + STOP_VERIFY_TIMEOUT;
        loop {
            let pending: Vec<ProcRef> = procs
                .iter()
                .filter(|p| match self.table.stat(p.pid) {
                    Ok(Some(s)) => s.start_time_ticks == p.start_time_ticks && !matches!(s.state, 'T' | 't' | 'Z' | 'X'),
                    _ => false,
                })
                .cloned()
                .collect();
            if pending.is_empty() || tokio::time::Instant::now() >= deadline {
                return pending;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl ProcessDriver {
    /// What counts as a restart of `killed`: a process of the same name
    /// that did not exist at the kill.
    fn restart_watch(&self, killed: &[ProcRef]) -> RestartWatch {
        let mut names: Vec<String> = killed.iter().map(|p| p.name.clone()).collect();
        names.dedup();
        let known = names
            .iter()
            .flat_map(|n| processes_named(self.table.as_ref(), n).unwrap_or_default())
            .map(|(s, _)| (s.pid, s.start_time_ticks))
            .collect();
        RestartWatch { names, known, kill_ticks: self.table.now_ticks().unwrap_or(0), seen: None }
    }

    /// Record the first newcomer, if one has started.
    fn look_for_restart(&self, w: &mut RestartWatch) {
        if w.seen.is_some() {
            return;
        }
        let newcomer = w
            .names
            .iter()
            .flat_map(|n| processes_named(self.table.as_ref(), n).unwrap_or_default())
            .map(|(s, _)| s)
            .filter(|s| !w.known.contains(&(s.pid, s.start_time_ticks)) && !matches!(s.state, 'Z' | 'X'))
            .min_by_key(|s| s.start_time_ticks);
        if let Some(s) = newcomer {
            let ticks = s.start_time_ticks.saturating_sub(w.kill_ticks);
            let after = Duration::from_millis(ticks * 1000 / crate::sys::ticks_per_second());
            w.seen = Some((ProcRef { pid: s.pid, start_time_ticks: s.start_time_ticks, name: s.comm }, after));
        }
    }
}

/// A process as a pause snapshot sees it: "stopped" (state T or t),
/// "not stopped", or "gone" (no such pid, or the pid now names another
/// process: its start time differs).
pub fn pause_state(table: &dyn ProcessTable, p: &ProcRef) -> Result<&'static str, AgentError> {
    Ok(match table.stat(p.pid).map_err(AgentError::ProcessTable)? {
        Some(s) if s.start_time_ticks != p.start_time_ticks => "gone",
        Some(s) if matches!(s.state, 'Z' | 'X') => "gone",
        Some(s) if matches!(s.state, 'T' | 't') => "stopped",
        Some(_) => "not stopped",
        None => "gone",
    })
}

fn list(procs: &[ProcRef]) -> String {
    procs.iter().map(|p| format!("{} {}", p.pid, p.name)).collect::<Vec<_>>().join(", ")
}

fn plan_of(plan: &Plan) -> Result<&ProcessPlan, AgentError> {
    match plan {
        Plan::Process(p) => Ok(p),
        other => Err(AgentError::Command { cmd: "process driver".into(), detail: format!("given a foreign plan {other:?}") }),
    }
}

#[async_trait]
impl FaultDriver for ProcessDriver {
    async fn plan(&self, req: &FaultRequest) -> Result<Plan, AgentError> {
        let action = match &req.kind {
            FaultKind::ProcessPause => ProcessAction::Pause,
            FaultKind::ProcessKill { signal } => ProcessAction::Kill { signal: *signal },
            other => return Err(AgentError::Command { cmd: "process driver".into(), detail: format!("cannot plan {}", other.family()) }),
        };
        Ok(Plan::Process(ProcessPlan { action, processes: self.resolve(&req.target)?, fault_id: req.id.clone().unwrap_or_default() }))
    }

    async fn apply(&self, plan: &Plan) -> Result<Applied, AgentError> {
        let plan = plan_of(plan)?;
        let sig = match plan.action {
            ProcessAction::Pause => Signal::SIGSTOP,
            ProcessAction::Kill { signal } => signal.0,
        };
        let watch = matches!(plan.action, ProcessAction::Kill { .. }).then(|| self.restart_watch(&plan.processes));
        let (sent, gone) = self.send_all(&plan.processes, sig)?;
        if let Some(w) = watch.filter(|_| !sent.is_empty()) {
            self.watches.lock().unwrap_or_else(|p| p.into_inner()).insert(plan.fault_id.clone(), w);
        }
        if sent.is_empty() {
            return Err(AgentError::TargetNotFound(format!("every target process exited before {}: {}", sig.as_str(), list(&gone))));
        }
        let mut summary = format!("{} sent to {} process(es): {}", sig.as_str(), sent.len(), list(&sent));
        if !gone.is_empty() {
            summary.push_str(&format!("; already gone: {}", list(&gone)));
        }
        if plan.action == ProcessAction::Pause {
            let not_stopped = self.await_stopped(&sent).await;
            if not_stopped.is_empty() {
                summary.push_str("; verified stopped in /proc");
            } else {
                tracing::warn!(pids = %list(&not_stopped), "SIGSTOP sent but not yet seen stopped (uninterruptible IO?)");
                summary.push_str(&format!(
                    "; NOT yet seen stopped after {} ms (uninterruptible IO?): {}",
                    STOP_VERIFY_TIMEOUT.as_millis(),
                    list(&not_stopped)
                ));
            }
        }
        Ok(Applied { backend: "signal", processes: sent, summary, ..Default::default() })
    }

    fn observe(&self, plan: &Plan) -> Option<Observation> {
        let plan = plan_of(plan).ok()?;
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let w = watches.get_mut(&plan.fault_id)?;
        self.look_for_restart(w);
        Some(match &w.seen {
            Some((p, after)) => Observation {
                achieved: vec![("restarted".into(), 1.0), ("restarted_after_ms".into(), after.as_millis() as f64)],
                outcome: Some(format!("restarted as pid {} ({}) {} ms after the kill", p.pid, p.name, after.as_millis())),
            },
            None => Observation { achieved: vec![("restarted".into(), 0.0)], outcome: None },
        })
    }

    /// Pause: whether each process is stopped. Kill: nothing to compare (not undone).
    /// A process already stopped before the pause (by someone else, or
    /// another agent's pause) is resumed by the revert's SIGCONT all the same:
    /// "stopped" is not what the revert restores, so it is not judged.
    fn as_before(&self, _plan: &Plan, mut before: Snapshot) -> Snapshot {
        for v in before.items.values_mut().filter(|v| *v == "stopped") {
            *v = super::ALREADY_FAULTED.to_string();
        }
        before
    }

    async fn snapshot(&self, plan: &Plan) -> Result<Option<Snapshot>, AgentError> {
        let plan = plan_of(plan)?;
        if plan.action != ProcessAction::Pause {
            return Ok(None);
        }
        let mut snap = Snapshot::default();
        for p in &plan.processes {
            let state = pause_state(self.table.as_ref(), p)?;
            snap.insert(format!("process {} ({}, start time {})", p.pid, p.name, p.start_time_ticks), state);
        }
        if !plan.processes.is_empty() && snap.items.values().all(|v| v == "gone") {
            return Err(AgentError::TargetNotFound(format!("every process of the pause is gone: {}", list(&plan.processes))));
        }
        Ok(Some(snap))
    }

    async fn revert(&self, plan: &Plan) -> Result<String, AgentError> {
        let plan = plan_of(plan)?;
        match plan.action {
            ProcessAction::Kill { signal } => {
                let watch = self.watches.lock().unwrap_or_else(|p| p.into_inner()).remove(&plan.fault_id);
                let seen = match watch.map(|mut w| (self.look_for_restart(&mut w), w.seen)) {
                    Some((_, Some((p, after)))) => {
                        format!("; restarted as pid {} ({}) {} ms after the kill", p.pid, p.name, after.as_millis())
                    }
                    Some((_, None)) => "; no restart seen while the fault was active".to_string(),
                    None => String::new(),
                };
                Ok(format!("nothing to undo for {}{seen}", signal.0.as_str()))
            }
            ProcessAction::Pause => {
                let (sent, gone) = self.send_all(&plan.processes, Signal::SIGCONT)?;
                let mut s = String::new();
                if !sent.is_empty() {
                    s.push_str(&format!("SIGCONT sent to {}", list(&sent)));
                }
                if !gone.is_empty() {
                    if !s.is_empty() {
                        s.push_str("; ");
                    }
                    s.push_str(&format!("already gone: {}", list(&gone)));
                }
                Ok(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::sys::fake::FakeProcs;

    fn driver(fake: &FakeProcs) -> ProcessDriver {
        let prot = Arc::new(Protection::new(999, vec![], vec!["sshd".into()]));
        ProcessDriver::new(Arc::new(fake.clone()), Arc::new(fake.clone()), prot)
    }

    fn req(target: TargetSpec, kind: FaultKind) -> FaultRequest {
        FaultRequest { id: None, target, duration: Duration::from_secs(5), labels: BTreeMap::new(), kind }
    }

    #[tokio::test(start_paused = true)]
    async fn pause_reports_processes_that_do_not_stop() {
        let fake = FakeProcs::default();
        fake.spawn(10, "sleep", 100);
        fake.stick_in_state(10, 'D');
        let d = driver(&fake);
        let plan = d.plan(&req(TargetSpec::Pid(10), FaultKind::ProcessPause)).await.expect("plan");
        let a = d.apply(&plan).await.expect("apply");
        assert!(a.summary.contains("NOT yet seen stopped") && a.summary.contains("10 sleep"), "{}", a.summary);
    }

    #[tokio::test]
    async fn pause_by_name_stops_all_matches_and_revert_continues_them() {
        let fake = FakeProcs::default();
        fake.spawn(10, "sleep", 100);
        fake.spawn(11, "sleep", 101);
        fake.spawn(12, "other", 102);
        let d = driver(&fake);
        let plan = d.plan(&req(TargetSpec::ProcessName("sleep".into()), FaultKind::ProcessPause)).await.expect("plan");
        assert!(fake.sent().is_empty(), "plan must have no side effects");
        let applied = d.apply(&plan).await.expect("apply");
        assert_eq!(applied.processes.len(), 2);
        assert!(applied.summary.contains("verified stopped"), "{}", applied.summary);
        assert_eq!((fake.state(10), fake.state(11), fake.state(12)), (Some('T'), Some('T'), Some('S')));
        d.revert(&plan).await.expect("revert");
        assert_eq!((fake.state(10), fake.state(11)), (Some('S'), Some('S')));
        // Twice is harmless.
        d.revert(&plan).await.expect("revert again");
    }

    #[tokio::test]
    async fn reused_pid_is_never_signalled_at_revert() {
        let fake = FakeProcs::default();
        fake.spawn(10, "sleep", 100);
        let d = driver(&fake);
        let plan = d.plan(&req(TargetSpec::Pid(10), FaultKind::ProcessPause)).await.expect("plan");
        d.apply(&plan).await.expect("apply");
        fake.exit(10);
        fake.spawn(10, "postgres", 555);
        let s = d.revert(&plan).await.expect("revert");
        assert!(s.contains("already gone"), "{s}");
        assert_eq!(fake.sent(), vec![(10, Signal::SIGSTOP)]);
    }

    #[tokio::test]
    async fn protected_and_missing_targets_are_refused() {
        let fake = FakeProcs::default();
        fake.spawn(1, "init", 1);
        fake.spawn(999, "chaos-agent", 5);
        fake.spawn(20, "sshd", 7);
        fake.spawn_kthread(30, "kworker");
        let d = driver(&fake);
        for (t, want) in [
            (TargetSpec::Pid(1), "init"),
            (TargetSpec::Pid(999), "this agent"),
            (TargetSpec::Pid(20), "protected.names"),
            (TargetSpec::ProcessName("sshd".into()), "protected.names"),
            (TargetSpec::Pid(30), "kernel thread"),
        ] {
            let e = d.plan(&req(t.clone(), FaultKind::ProcessPause)).await.expect_err("protected");
            assert!(matches!(e, AgentError::Protected(_)), "{t}: {e}");
            assert!(e.to_string().contains(want), "{t}: {e}");
        }
        let e = d.plan(&req(TargetSpec::Pid(4242), FaultKind::ProcessPause)).await.expect_err("missing");
        assert!(matches!(e, AgentError::TargetNotFound(_)), "{e}");
        let e = d.plan(&req(TargetSpec::ProcessName("nope".into()), FaultKind::ProcessPause)).await.expect_err("missing");
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(fake.sent().is_empty());
    }

    #[tokio::test]
    async fn kill_sends_the_chosen_signal_and_revert_does_nothing() {
        let fake = FakeProcs::default();
        fake.spawn(10, "worker", 100);
        let d = driver(&fake);
        let kind = FaultKind::ProcessKill { signal: SignalName(Signal::SIGTERM) };
        let plan = d.plan(&req(TargetSpec::Pid(10), kind)).await.expect("plan");
        let a = d.apply(&plan).await.expect("apply");
        assert!(a.summary.contains("SIGTERM"), "{}", a.summary);
        assert_eq!(fake.state(10), None);
        assert!(d.revert(&plan).await.expect("revert").contains("nothing to undo"));
        assert_eq!(fake.sent(), vec![(10, Signal::SIGTERM)]);
    }

    #[tokio::test]
    async fn a_cgroup_target_pauses_every_process_in_it_and_below() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = |p: &str, t: &str| {
            let p = dir.path().join(p);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, t).expect("write");
        };
        w("cgroup.controllers", "cpu memory\n");
        w("app/cgroup.procs", "10\n");
        w("app/worker/cgroup.procs", "11\n");
        w("guarded/cgroup.procs", "20\n");
        let fake = FakeProcs::default();
        fake.spawn(10, "app", 100);
        fake.spawn(11, "worker", 101);
        fake.spawn(12, "other", 102);
        fake.spawn(20, "sshd", 103);
        let cg = CgroupFs::detect(dir.path()).expect("detect");
        let d = driver(&fake).with_cgroups(Some(cg));
        let plan = d.plan(&req(TargetSpec::CgroupPath("app".into()), FaultKind::ProcessPause)).await.expect("plan");
        d.apply(&plan).await.expect("apply");
        assert_eq!((fake.state(10), fake.state(11), fake.state(12)), (Some('T'), Some('T'), Some('S')));
        d.revert(&plan).await.expect("revert");
        let e = d.plan(&req(TargetSpec::CgroupPath("guarded".into()), FaultKind::ProcessPause)).await.expect_err("protected");
        assert!(matches!(e, AgentError::Protected(_)), "{e}");
        let e = d.plan(&req(TargetSpec::CgroupPath("nope".into()), FaultKind::ProcessPause)).await.expect_err("missing");
        assert!(e.to_string().contains("/nope"), "{e}");
    }

    #[tokio::test]
    async fn kill_watches_for_a_supervisor_restart() {
        let fake = FakeProcs::default();
        fake.spawn(10, "worker", 100);
        fake.spawn(11, "worker", 90);
        fake.set_now_ticks(500);
        let d = driver(&fake);
        let mut r = req(TargetSpec::Pid(10), FaultKind::ProcessKill { signal: SignalName(Signal::SIGKILL) });
        r.id = Some("k1".into());
        let plan = d.plan(&r).await.expect("plan");
        d.apply(&plan).await.expect("apply");
        // The other instance (11) is not a restart.
        let o = d.observe(&plan).expect("watched");
        assert_eq!(o.achieved, vec![("restarted".to_string(), 0.0)]);
        assert_eq!(o.outcome, None);
        fake.spawn(12, "worker", 620);
        let o = d.observe(&plan).expect("watched");
        assert!(o.achieved.contains(&("restarted_after_ms".to_string(), 1200.0)), "{o:?}");
        assert!(o.outcome.expect("outcome").contains("pid 12"));
        let s = d.revert(&plan).await.expect("revert");
        assert!(s.contains("restarted as pid 12 (worker) 1200 ms after the kill"), "{s}");
    }

    #[tokio::test]
    async fn pause_snapshot_reads_each_process_and_names_one_left_stopped() {
        let fake = FakeProcs::default();
        fake.spawn(10, "sleep", 100);
        fake.spawn(11, "sleep", 101);
        let d = driver(&fake);
        let plan = d.plan(&req(TargetSpec::ProcessName("sleep".into()), FaultKind::ProcessPause)).await.expect("plan");
        let before = d.snapshot(&plan).await.expect("snapshot").expect("a pause is compared");
        assert_eq!(before.items.get("process 10 (sleep, start time 100)").map(String::as_str), Some("not stopped"), "{before:?}");
        d.apply(&plan).await.expect("apply");
        let during = d.snapshot(&plan).await.expect("snapshot").expect("some");
        assert_eq!(during.differences(&before).len(), 2, "{during:?}");
        d.revert(&plan).await.expect("revert");
        assert!(d.snapshot(&plan).await.expect("snapshot").expect("some").differences(&before).is_empty());
        // A revert that did not reach pid 11: the difference names it.
        fake.fail_signal(11, Signal::SIGCONT, nix::errno::Errno::EPERM);
        d.apply(&plan).await.expect("apply");
        let _ = d.revert(&plan).await;
        let diff = d.snapshot(&plan).await.expect("snapshot").expect("some").differences(&before);
        assert_eq!(diff, vec![r#"process 11 (sleep, start time 101): was "not stopped", now "stopped""#.to_string()]);
    }

    #[tokio::test]
    async fn pause_snapshot_sees_a_reused_pid_as_gone_and_all_gone_as_not_found_and_kill_has_none() {
        let fake = FakeProcs::default();
        fake.spawn(10, "sleep", 100);
        fake.spawn(11, "sleep", 101);
        let d = driver(&fake);
        let plan = d.plan(&req(TargetSpec::ProcessName("sleep".into()), FaultKind::ProcessPause)).await.expect("plan");
        fake.exit(10);
        fake.spawn(10, "sleep", 555);
        let s = d.snapshot(&plan).await.expect("snapshot").expect("some");
        assert_eq!(s.items.get("process 10 (sleep, start time 100)").map(String::as_str), Some("gone"), "{s:?}");
        fake.exit(11);
        let e = d.snapshot(&plan).await.expect_err("all gone");
        assert!(matches!(e, AgentError::TargetNotFound(_)), "{e}");
        fake.spawn(12, "worker", 7);
        let kill = d.plan(&req(TargetSpec::Pid(12), FaultKind::ProcessKill { signal: SignalName(Signal::SIGKILL) })).await.expect("plan");
        assert_eq!(d.snapshot(&kill).await.expect("snapshot"), None, "a kill is not undone");
    }

    #[tokio::test]
    async fn signal_errors_name_the_pid() {
        let fake = FakeProcs::default();
        fake.spawn(10, "worker", 100);
        fake.fail_signals(10, nix::errno::Errno::EPERM);
        let d = driver(&fake);
        let plan = d.plan(&req(TargetSpec::Pid(10), FaultKind::ProcessPause)).await.expect("plan");
        let e = d.apply(&plan).await.expect_err("eperm");
        assert!(e.to_string().contains("pid 10"), "{e}");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
