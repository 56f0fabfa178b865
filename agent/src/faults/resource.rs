//! Resource faults: CPU stress and throttle, memory stress and limit, IO
//! throttle, cgroup freeze, disk fill, on cgroup v1 and v2.
//!
//! Knob faults (throttle, limit, IO, freeze) read the value they replace at
//! plan time; the journaled plan holds it, so revert writes back exactly
//! what was there, even from a new agent process after a crash. They refuse
//! the root cgroup and any cgroup holding a protected process.
//!
//! Stress faults run a worker process (the agent binary as
//! `chaos-agent __stressor`, see [`crate::stressor`]), placed in the
//! target's cgroup or in one of the fault's own (`/chaos-ID`) before it
//! starts. A worker ends by itself when the agent is gone or the fault's
//! deadline passes; revert kills it (found by its command line after a
//! crash) and removes the fault's cgroups. The worker's measured load or
//! resident bytes are reported by [`FaultDriver::observe`], and a worker the
//! kernel killed (OOM) is reported as the fault's outcome.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use chaos_proto::spec::{FaultKind, FaultRequest, FillAmount, MemorySize, TargetSpec};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::{Applied, FaultDriver, Observation, Plan, ProcRef, Snapshot, process::resolve_processes};
use crate::{
    error::AgentError,
    protect::Protection,
    stressor::{StressorArgs, Work},
    sys::{
        ProcessTable,
        cgroup::{self, CgroupFs, Controller, CpuQuota, IoLimits},
    },
};

/// Limits that keep a resource fault from taking the host down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guards {
    /// A memory stress is refused when it would leave less available.
    pub memory_floor_bytes: u64,
    /// A disk fill never takes a filesystem past this used share (permyriad).
    pub disk_fill_max_permyriad: u32,
}

impl Default for Guards {
    fn default() -> Self {
        Self { memory_floor_bytes: 512 << 20, disk_fill_max_permyriad: 9500 }
    }
}

/// A cgroup directory for one controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupRef {
    pub controller: Controller,
    pub path: String,
}

/// The work of a stress fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StressWork {
    Cpu { workers: u32, load_permyriad: u32 },
    Memory { bytes: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ResourcePlan {
    Stress {
        fault_id: String,
        work: StressWork,
        deadline_unix_ms: u64,
        /// Where the worker goes; `own` cgroups are created and removed by the fault.
        cgroups: Vec<CgroupRef>,
        own: bool,
    },
    CpuThrottle {
        cgroup: String,
        previous: CpuQuota,
        set: CpuQuota,
    },
    MemoryLimit {
        cgroup: String,
        previous: String,
        limit_bytes: u64,
    },
    IoThrottle {
        cgroup: String,
        device: String,
        previous: IoLimits,
        set: IoLimits,
    },
    Freeze {
        cgroup: String,
        processes: Vec<ProcRef>,
    },
    DiskFill {
        file: PathBuf,
        bytes: u64,
    },
}

/// A running worker.
struct Live {
    child: tokio::process::Child,
    pid: u32,
    started: Instant,
    /// (when, on-CPU ns of all its threads), for the recent load.
    samples: VecDeque<(Instant, u64)>,
    memory_cgroup: Option<String>,
    oom_before: Option<u64>,
    /// Set once the worker is seen gone without revert asking.
    outcome: Option<String>,
}

pub struct ResourceDriver {
    cgroups: Result<CgroupFs, String>,
    table: Arc<dyn ProcessTable>,
    protection: Arc<Protection>,
    stressor_exe: PathBuf,
    guards: Guards,
    proc_root: PathBuf,
    sys_dev_block: PathBuf,
    live: Mutex<HashMap<String, Live>>,
}

/// Extra time a worker outlives its fault's TTL before ending by itself
/// (the lifecycle reverts first; this is the backstop).
const DEADLINE_GRACE: Duration = Duration::from_secs(5);

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> AgentError {
    move |e| AgentError::io(what, e)
}

fn plan_of(plan: &Plan) -> Result<&ResourcePlan, AgentError> {
    match plan {
        Plan::Resource(p) => Ok(p),
        other => Err(AgentError::Command { cmd: "resource driver".into(), detail: format!("given a foreign plan {other:?}") }),
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Percent with one decimal, for summaries.
fn pct(x: f64) -> String {
    format!("{:.1}%", x)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

impl ResourceDriver {
    pub fn new(
        cgroups: Result<CgroupFs, String>,
        table: Arc<dyn ProcessTable>,
        protection: Arc<Protection>,
        stressor_exe: PathBuf,
        guards: Guards,
    ) -> Self {
        Self {
            cgroups,
            table,
            protection,
            stressor_exe,
            guards,
            proc_root: PathBuf::from("/proc"),
            sys_dev_block: PathBuf::from("/sys/dev/block"),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Read `/proc` and `/sys/dev/block` under other roots (tests).
    pub fn with_roots(mut self, proc_root: impl Into<PathBuf>, sys_dev_block: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self.sys_dev_block = sys_dev_block.into();
        self
    }

    fn cg(&self) -> Result<&CgroupFs, AgentError> {
        self.cgroups.as_ref().map_err(|e| AgentError::MissingFeature(format!("a usable cgroup filesystem ({e})")))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cgroup path of the target for `ctrl` ("/" for the root).
    fn target_cgroup(&self, target: &TargetSpec, ctrl: Controller) -> Result<String, AgentError> {
        let cg = self.cg()?;
        let path = match target {
            TargetSpec::CgroupPath(p) => format!("/{p}"),
            TargetSpec::Pid(_) | TargetSpec::ProcessName(_) => {
                let procs = resolve_processes(self.table.as_ref(), &self.protection, target, None)?;
                let p = &procs[0];
                let file = self.proc_root.join(p.pid.to_string()).join("cgroup");
                let text = fs::read_to_string(&file)
                    .map_err(|e| AgentError::TargetNotFound(format!("pid {} ({}): reading {}: {e}", p.pid, p.name, file.display())))?;
                cgroup::path_of(&text, cg.version(), ctrl.v1()).ok_or_else(|| {
                    AgentError::MissingFeature(format!("the {} controller for pid {} (not in {})", ctrl.v1(), p.pid, file.display()))
                })?
            }
            other => {
                return Err(AgentError::TargetNotFound(format!("resource faults need a pid, process name or cgroup target, got {other}")));
            }
        };
        cg.existing_dir(ctrl, &path).map_err(|e| AgentError::TargetNotFound(format!("{target}: {e}")))?;
        Ok(path)
    }

    /// A cgroup a knob fault may change: not the root, no protected process
    /// in it or below it. Returns the processes it holds.
    fn changeable_cgroup(&self, target: &TargetSpec, ctrl: Controller) -> Result<(String, Vec<ProcRef>), AgentError> {
        let path = self.target_cgroup(target, ctrl)?;
        if path.trim_matches('/').is_empty() {
            return Err(AgentError::Protected(format!(
                "{target} is in the root {} cgroup: changing it would act on the whole host (target a cgroup of its own)",
                ctrl.v1()
            )));
        }
        let dir = self.cg()?.existing_dir(ctrl, &path).map_err(io_err("cgroup"))?;
        let mut procs = Vec::new();
        for pid in cgroup::members(&dir) {
            let Ok(Some(stat)) = self.table.stat(pid) else { continue };
            let argv0 = self.table.argv0_basename(pid);
            if let Some(why) = self.protection.why_protected(&stat, argv0.as_deref()) {
                return Err(AgentError::Protected(format!("cgroup {path} holds {why}")));
            }
            procs.push(ProcRef { pid, start_time_ticks: stat.start_time_ticks, name: stat.comm });
        }
        Ok((path, procs))
    }

    fn meminfo(&self, key: &str) -> Option<u64> {
        let text = fs::read_to_string(self.proc_root.join("meminfo")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    fn plan_stress(&self, req: &FaultRequest, id: &str, work: StressWork) -> Result<ResourcePlan, AgentError> {
        let cg = self.cg()?;
        let ctrls: &[Controller] = match work {
            StressWork::Cpu { .. } => &[Controller::Cpu, Controller::CpuAcct],
            StressWork::Memory { .. } => &[Controller::Memory],
        };
        // v2 has one tree: one directory serves every controller.
        let ctrls = if cg.version() == cgroup::Version::V2 { &ctrls[..1] } else { ctrls };
        let (own, cgroups) = match &req.target {
            TargetSpec::Host => (true, ctrls.iter().map(|c| CgroupRef { controller: *c, path: format!("/chaos-{id}") }).collect()),
            t => (
                false,
                ctrls
                    .iter()
                    .map(|c| Ok(CgroupRef { controller: *c, path: self.target_cgroup(t, *c)? }))
                    .collect::<Result<_, AgentError>>()?,
            ),
        };
        Ok(ResourcePlan::Stress {
            fault_id: id.to_string(),
            work,
            deadline_unix_ms: now_unix_ms() + u64::try_from((req.duration + DEADLINE_GRACE).as_millis()).unwrap_or(u64::MAX),
            cgroups,
            own,
        })
    }

    fn memory_bytes(&self, size: MemorySize) -> Result<u64, AgentError> {
        let total = self.meminfo("MemTotal").ok_or_else(|| AgentError::MissingFeature("MemTotal in /proc/meminfo".into()))?;
        let bytes = match size {
            MemorySize::Bytes(b) => b,
            MemorySize::PermyriadOfTotal(p) => total / 10_000 * u64::from(p),
        };
        let available = self.meminfo("MemAvailable").unwrap_or(0);
        let floor = self.guards.memory_floor_bytes;
        if available.saturating_sub(bytes) < floor {
            return Err(AgentError::Guard(format!(
                "spec.memory_stress: holding {} would leave {} available, below the agent's guards.memory_floor of {} ({} available now)",
                mib(bytes),
                mib(available.saturating_sub(bytes)),
                mib(floor),
                mib(available)
            )));
        }
        Ok(bytes)
    }

    fn plan_disk_fill(&self, id: &str, path: &str, amount: FillAmount) -> Result<ResourcePlan, AgentError> {
        let dir = Path::new(path);
        if !dir.is_dir() {
            return Err(AgentError::TargetNotFound(format!("spec.disk_fill.path {path:?} is not an existing directory")));
        }
        let (used, size) = fs_usage(dir).map_err(io_err(format!("statvfs {path}")))?;
        let cap = self.guards.disk_fill_max_permyriad;
        let cap_pct = f64::from(cap) / 100.0;
        let now_pct = used as f64 * 100.0 / size.max(1) as f64;
        let bytes = match amount {
            FillAmount::ToPermyriad(p) => {
                if p > cap {
                    return Err(chaos_proto::spec::SpecError::invalid(
                        "spec.disk_fill.fill_to_percent",
                        format!("must be at most {cap_pct} (the agent's guards.disk_fill_max_percent), got {}", f64::from(p) / 100.0),
                    )
                    .into());
                }
                let want = u64::try_from(u128::from(size) * u128::from(p) / 10_000).unwrap_or(u64::MAX);
                if want <= used {
                    return Err(AgentError::Guard(format!(
                        "spec.disk_fill.fill_to_percent: {path} is already {} full, at or above the {} asked",
                        pct(now_pct),
                        pct(f64::from(p) / 100.0)
                    )));
                }
                want - used
            }
            FillAmount::Bytes(b) => {
                let after = (used + b) as f64 * 100.0 / size.max(1) as f64;
                if after > cap_pct {
                    return Err(AgentError::Guard(format!(
                        "spec.disk_fill.bytes: {b} bytes would fill {path} to {}, above the agent's guards.disk_fill_max_percent of {cap_pct}",
                        pct(after)
                    )));
                }
                b
            }
        };
        Ok(ResourcePlan::DiskFill { file: dir.join(format!(".chaos-fill-{id}")), bytes })
    }

    fn io_device(&self, device: Option<chaos_proto::spec::DeviceNumber>) -> Result<String, AgentError> {
        let dev = match device {
            Some(d) => d.to_string(),
            None => {
                let st = nix::sys::stat::stat("/").map_err(|e| AgentError::Command { cmd: "stat /".into(), detail: e.to_string() })?;
                format!("{}:{}", nix::sys::stat::major(st.st_dev), nix::sys::stat::minor(st.st_dev))
            }
        };
        if !self.sys_dev_block.join(&dev).exists() {
            return Err(AgentError::TargetNotFound(format!("spec.io_throttle.device: no block device {dev} on this host")));
        }
        Ok(cgroup::whole_disk(&self.sys_dev_block, &dev))
    }

    /// On-CPU time of every thread of `pid`, in ns (`/proc/PID/task/*/schedstat`).
    fn cpu_ns(&self, pid: u32) -> Option<u64> {
        let tasks = fs::read_dir(self.proc_root.join(pid.to_string()).join("task")).ok()?;
        Some(
            tasks
                .flatten()
                .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok()?.split_whitespace().next()?.parse::<u64>().ok())
                .sum(),
        )
    }

    fn rss_bytes(&self, pid: u32) -> Option<u64> {
        let text = fs::read_to_string(self.proc_root.join(pid.to_string()).join("status")).ok()?;
        text.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()).map(|kb| kb * 1024)
    }

    /// Workers of `fault_id` found by their command line (after an agent restart).
    fn orphan_workers(&self, fault_id: &str) -> Vec<u32> {
        let Ok(pids) = self.table.pids() else { return vec![] };
        pids.into_iter()
            .filter(|pid| {
                let Ok(raw) = fs::read(self.proc_root.join(pid.to_string()).join("cmdline")) else { return false };
                let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
                args.get(1) == Some(&crate::stressor::ARG.as_bytes())
                    && args.windows(2).any(|w| w[0] == b"--fault-id" && w[1] == fault_id.as_bytes())
            })
            .collect()
    }

    async fn apply_stress(
        &self,
        fault_id: &str,
        work: StressWork,
        deadline_unix_ms: u64,
        cgroups: &[CgroupRef],
        own: bool,
    ) -> Result<Applied, AgentError> {
        let cg = self.cg()?;
        if own {
            for c in cgroups {
                cg.create(c.controller, &c.path).map_err(io_err("creating the fault's cgroup"))?;
            }
        }
        let args = StressorArgs {
            fault_id: fault_id.to_string(),
            deadline_unix_ms,
            work: match work {
                StressWork::Cpu { workers, load_permyriad } => Work::Cpu { workers, load_permyriad },
                StressWork::Memory { bytes } => Work::Memory { bytes },
            },
        };
        let mut child = tokio::process::Command::new(&self.stressor_exe)
            .args(args.to_args())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io_err(format!("starting the stress worker {}", self.stressor_exe.display())))?;
        let pid = child.id().unwrap_or(0);
        // Into its cgroups before it does anything.
        for c in cgroups {
            if let Err(e) = cg.add_process(c.controller, &c.path, pid) {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(AgentError::Command { cmd: format!("placing the worker in cgroup {}", c.path), detail: e.to_string() });
            }
        }
        let memory_cgroup = cgroups.iter().find(|c| c.controller == Controller::Memory).map(|c| c.path.clone());
        let oom_before = memory_cgroup.as_deref().and_then(|p| cg.oom_kills(p));
        let ready = async {
            let mut stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin"))?;
            stdin.write_all(b"go\n").await?;
            drop(stdin);
            let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
            let mut line = String::new();
            tokio::io::BufReader::new(stdout).read_line(&mut line).await?;
            Ok::<bool, std::io::Error>(line.trim() == "ready")
        };
        // Touching memory takes about a second per few GiB.
        let limit = match work {
            StressWork::Cpu { .. } => Duration::from_secs(5),
            StressWork::Memory { bytes } => Duration::from_secs(10 + bytes / (256 << 20)),
        };
        let ok = matches!(tokio::time::timeout(limit, ready).await, Ok(Ok(true)));
        if !ok {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            let oom = memory_cgroup.as_deref().and_then(|p| cg.oom_kills(p));
            let why = match (status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)), oom_before, oom) {
                (Some(9), Some(a), Some(b)) if b > a => {
                    format!("the kernel OOM-killed it while allocating (memory cgroup oom_kill {a} -> {b})")
                }
                (_, _, _) => format!("it did not report ready within {limit:?} (exit: {status:?})"),
            };
            return Err(AgentError::Command { cmd: "stress worker".into(), detail: why });
        }
        let now = Instant::now();
        let start_ticks = self.table.stat(pid).ok().flatten().map_or(0, |s| s.start_time_ticks);
        let mut live = Live { child, pid, started: now, samples: VecDeque::new(), memory_cgroup, oom_before, outcome: None };
        live.samples.push_back((now, self.cpu_ns(pid).unwrap_or(0)));
        let (summary, achieved) = match work {
            StressWork::Cpu { workers, load_permyriad } => {
                (format!("{workers} worker thread(s) at {} of a core each in pid {pid}", pct(f64::from(load_permyriad) / 100.0)), vec![])
            }
            StressWork::Memory { bytes } => {
                let rss = self.rss_bytes(pid).unwrap_or(0);
                (
                    format!("worker pid {pid} holds {} resident of {} asked", mib(rss), mib(bytes)),
                    vec![("resident_bytes".to_string(), rss as f64)],
                )
            }
        };
        let place = cgroups.iter().map(|c| format!("{}:{}", c.controller.v1(), c.path)).collect::<Vec<_>>().join(", ");
        self.live().insert(fault_id.to_string(), live);
        Ok(Applied {
            backend: if cg.version() == cgroup::Version::V2 { "stressor+cgroup-v2" } else { "stressor+cgroup-v1" },
            processes: vec![ProcRef { pid, start_time_ticks: start_ticks, name: "chaos-agent".into() }],
            summary: format!("{summary}; in cgroup {place}{}", if own { " (the fault's own)" } else { "" }),
            achieved,
            outcome: String::new(),
        })
    }

    async fn revert_stress(&self, fault_id: &str, cgroups: &[CgroupRef], own: bool) -> Result<String, AgentError> {
        let live = self.live().remove(fault_id);
        let mut parts = vec![];
        match live {
            Some(mut l) => {
                let outcome = l.outcome.take().or_else(|| self.exit_outcome(&mut l));
                let _ = l.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), l.child.wait()).await;
                parts.push(match outcome {
                    Some(o) => o,
                    None => format!("worker pid {} stopped after {:.1} s", l.pid, l.started.elapsed().as_secs_f64()),
                });
            }
            None => {
                let orphans = self.orphan_workers(fault_id);
                for pid in &orphans {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(i32::try_from(*pid).unwrap_or(0)),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while !self.orphan_workers(fault_id).is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                parts.push(if orphans.is_empty() {
                    "no worker left running".to_string()
                } else {
                    format!("killed leftover worker(s) {orphans:?}")
                });
            }
        }
        if own && let Ok(cg) = self.cg() {
            for c in cgroups {
                // The kernel frees a cgroup a moment after its last process exits.
                let mut tries = 0;
                loop {
                    match cg.remove(c.controller, &c.path) {
                        Ok(true) => {
                            parts.push(format!("removed cgroup {}:{}", c.controller.v1(), c.path));
                            break;
                        }
                        Ok(false) => break,
                        Err(e) if tries >= 50 => return Err(io_err("removing the fault's cgroup")(e)),
                        Err(_) => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        }
        Ok(parts.join("; "))
    }

    /// The knob files a plan writes, by controller (they differ between v1 and v2).
    fn knob_files(&self, plan: &ResourcePlan) -> Result<(Controller, &'static [&'static str]), AgentError> {
        let v2 = self.cg()?.version() == cgroup::Version::V2;
        Ok(match plan {
            ResourcePlan::CpuThrottle { .. } if v2 => (Controller::Cpu, &["cpu.max"]),
            ResourcePlan::CpuThrottle { .. } => (Controller::Cpu, &["cpu.cfs_quota_us", "cpu.cfs_period_us"]),
            ResourcePlan::MemoryLimit { .. } if v2 => (Controller::Memory, &["memory.max"]),
            ResourcePlan::MemoryLimit { .. } => (Controller::Memory, &["memory.limit_in_bytes"]),
            ResourcePlan::Freeze { .. } if v2 => (Controller::Freezer, &["cgroup.freeze"]),
            ResourcePlan::Freeze { .. } => (Controller::Freezer, &["freezer.state"]),
            _ => (Controller::Cpu, &[]),
        })
    }

    /// What a resource plan touches, read now (see [`FaultDriver::snapshot`]).
    fn read_snapshot(&self, plan: &ResourcePlan) -> Result<Snapshot, AgentError> {
        let mut snap = Snapshot::default();
        match plan {
            ResourcePlan::CpuThrottle { cgroup, .. } | ResourcePlan::MemoryLimit { cgroup, .. } | ResourcePlan::Freeze { cgroup, .. } => {
                let cg = self.cg()?;
                let (ctrl, files) = self.knob_files(plan)?;
                for file in files {
                    let (dir, value) = cg.read_knob(ctrl, cgroup, file).map_err(io_err(format!("reading {file} of cgroup {cgroup}")))?;
                    snap.insert(format!("{file} of {}", dir.display()), value);
                }
            }
            ResourcePlan::IoThrottle { cgroup, device, .. } => {
                let cg = self.cg()?;
                let l = cg.io_limits(cgroup, device).map_err(io_err(format!("reading IO limits of cgroup {cgroup}")))?;
                let n = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |v| format!("{v} B/s"));
                let file = if cg.version() == cgroup::Version::V2 { "io.max" } else { "blkio.throttle.*_bps_device" };
                snap.insert(
                    format!("{file} of cgroup {cgroup}, device {device}"),
                    format!("read {}, write {}", n(l.read_bps), n(l.write_bps)),
                );
            }
            ResourcePlan::Stress { fault_id, cgroups, own, .. } => {
                let workers = self.orphan_workers(fault_id);
                let value = if workers.is_empty() { "none running".to_string() } else { format!("running: pids {workers:?}") };
                snap.insert(format!("stress workers of fault {fault_id}"), value);
                if *own {
                    let cg = self.cg()?;
                    for c in cgroups {
                        let there = cg.existing_dir(c.controller, &c.path).is_ok();
                        snap.insert(format!("cgroup {}:{}", c.controller.v1(), c.path), if there { "present" } else { "absent" });
                    }
                }
            }
            ResourcePlan::DiskFill { file, .. } => {
                let dir = file.parent().unwrap_or(Path::new("/"));
                if !dir.is_dir() {
                    return Err(AgentError::TargetNotFound(format!("the directory of the fill file {} is gone", file.display())));
                }
                let value = match fs::symlink_metadata(file) {
                    Ok(_) => "present",
                    Err(e) if e.kind() == ErrorKind::NotFound => "absent",
                    Err(e) => return Err(io_err(format!("stat {}", file.display()))(e)),
                };
                snap.insert(format!("fill file {}", file.display()), value);
            }
        }
        Ok(snap)
    }

    /// If the worker has exited on its own, what became of it.
    fn exit_outcome(&self, l: &mut Live) -> Option<String> {
        let status = l.child.try_wait().ok()??;
        let after = l.started.elapsed().as_secs_f64();
        let oom = match (l.oom_before, l.memory_cgroup.as_deref().and_then(|p| self.cg().ok()?.oom_kills(p))) {
            (Some(a), Some(b)) if b > a => Some(format!(" (memory cgroup oom_kill {a} -> {b})")),
            _ => None,
        };
        Some(match (std::os::unix::process::ExitStatusExt::signal(&status), oom) {
            (Some(9), Some(o)) => format!("worker pid {} OOM-killed by the kernel after {after:.1} s{o}", l.pid),
            (Some(s), _) => format!("worker pid {} killed by signal {s} after {after:.1} s", l.pid),
            (None, _) => format!("worker pid {} exited on its own ({status}) after {after:.1} s", l.pid),
        })
    }
}

/// (used bytes, used + available bytes) of the filesystem holding `dir`, as df counts them.
pub fn fs_usage(dir: &Path) -> std::io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let frsize = s.fragment_size();
    let used = (s.blocks() - s.blocks_free()) * frsize;
    let avail = s.blocks_available() * frsize;
    Ok((used, used + avail))
}

/// Reserve `bytes` in a new file: fallocate, or writes where the
/// filesystem cannot (the file is removed on failure).
fn fill_file(file: &Path, bytes: u64) -> std::io::Result<&'static str> {
    use std::io::Write;
    let f = fs::OpenOptions::new().write(true).create_new(true).open(file)?;
    let len = i64::try_from(bytes).map_err(|_| std::io::Error::other("size too large"))?;
    let result = match nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok("fallocate"),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
            let chunk = vec![0xA5u8; 1 << 20];
            let mut left = bytes;
            let r = (|| {
                while left > 0 {
                    let n = usize::try_from(left.min(1 << 20)).unwrap_or(1 << 20);
                    w.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
                w.flush()?;
                f.sync_all()
            })();
            r.map(|()| "writes")
        }
        Err(e) => Err(std::io::Error::from(e)),
    };
    if result.is_err() {
        let _ = fs::remove_file(file);
    }
    result
}

#[async_trait]
impl FaultDriver for ResourceDriver {
    async fn plan(&self, req: &FaultRequest) -> Result<Plan, AgentError> {
        let id = req.id.clone().unwrap_or_default();
        let cg = || self.cg();
        let p = match &req.kind {
            FaultKind::CpuStress { workers, load_permyriad } => {
                self.plan_stress(req, &id, StressWork::Cpu { workers: *workers, load_permyriad: *load_permyriad })?
            }
            FaultKind::MemoryStress { size } => {
                let bytes = self.memory_bytes(*size)?;
                self.plan_stress(req, &id, StressWork::Memory { bytes })?
            }
            FaultKind::CpuThrottle { quota_permyriad } => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
                if *quota_permyriad > cores * 10_000 {
                    return Err(chaos_proto::spec::SpecError::invalid(
                        "spec.cpu_throttle.quota_percent",
                        format!("must be at most {} (this host's {cores} cores), got {}", cores * 100, *quota_permyriad as f64 / 100.0),
                    )
                    .into());
                }
                let (cgroup, _) = self.changeable_cgroup(&req.target, Controller::Cpu)?;
                let previous = cg()?.cpu_quota(&cgroup).map_err(io_err("reading the CPU quota"))?;
                // The kernel's smallest quota is 1 ms.
                let quota = (previous.period_us * quota_permyriad / 10_000).max(1000);
                ResourcePlan::CpuThrottle { cgroup, previous, set: CpuQuota { quota_us: Some(quota), period_us: previous.period_us } }
            }
            FaultKind::MemoryLimit { limit_bytes } => {
                let (cgroup, _) = self.changeable_cgroup(&req.target, Controller::Memory)?;
                let previous = cg()?.memory_limit_text(&cgroup).map_err(io_err("reading the memory limit"))?;
                // A limit at or above what the cgroup may already use limits nothing: refused, not applied as a no-op.
                let field = "spec.memory_limit.limit_bytes";
                if let Some(total) = self.meminfo("MemTotal")
                    && *limit_bytes >= total
                {
                    let why = format!("would limit nothing: {} is at or above this host's memory ({})", mib(*limit_bytes), mib(total));
                    return Err(chaos_proto::spec::SpecError::invalid(field, why).into());
                }
                if let Ok(current) = previous.trim().parse::<u64>()
                    && *limit_bytes >= current
                {
                    let why = format!("would limit nothing: cgroup {cgroup} is already limited to {}", mib(current));
                    return Err(chaos_proto::spec::SpecError::invalid(field, why).into());
                }
                ResourcePlan::MemoryLimit { cgroup, previous, limit_bytes: *limit_bytes }
            }
            FaultKind::IoThrottle { read_bytes_per_second, write_bytes_per_second, device } => {
                let (cgroup, _) = self.changeable_cgroup(&req.target, Controller::Io)?;
                let device = self.io_device(*device)?;
                let previous = cg()?.io_limits(&cgroup, &device).map_err(io_err("reading the IO limits"))?;
                let or_prev = |v: u64, p: Option<u64>| if v > 0 { Some(v) } else { p };
                let set = IoLimits {
                    read_bps: or_prev(*read_bytes_per_second, previous.read_bps),
                    write_bps: or_prev(*write_bytes_per_second, previous.write_bps),
                };
                ResourcePlan::IoThrottle { cgroup, device, previous, set }
            }
            FaultKind::CgroupFreeze => {
                let (cgroup, processes) = self.changeable_cgroup(&req.target, Controller::Freezer)?;
                ResourcePlan::Freeze { cgroup, processes }
            }
            FaultKind::DiskFill { path, amount } => self.plan_disk_fill(&id, path, *amount)?,
            other => return Err(AgentError::Command { cmd: "resource driver".into(), detail: format!("cannot plan {}", other.family()) }),
        };
        Ok(Plan::Resource(Box::new(p)))
    }

    async fn apply(&self, plan: &Plan) -> Result<Applied, AgentError> {
        let backend = |cg: &CgroupFs| if cg.version() == cgroup::Version::V2 { "cgroup-v2" } else { "cgroup-v1" };
        let done = |backend: &'static str, summary: String, achieved: Vec<(String, f64)>| {
            Ok(Applied { backend, processes: vec![], summary, achieved, outcome: String::new() })
        };
        match plan_of(plan)? {
            ResourcePlan::Stress { fault_id, work, deadline_unix_ms, cgroups, own } => {
                self.apply_stress(fault_id, *work, *deadline_unix_ms, cgroups, *own).await
            }
            ResourcePlan::CpuThrottle { cgroup, previous, set } => {
                let cg = self.cg()?;
                cg.set_cpu_quota(cgroup, *set).map_err(io_err("setting the CPU quota"))?;
                let now = cg.cpu_quota(cgroup).map_err(io_err("reading the CPU quota back"))?;
                if now != *set {
                    return Err(AgentError::Command {
                        cmd: "cpu throttle".into(),
                        detail: format!("wrote {set:?} but the kernel holds {now:?}"),
                    });
                }
                let share = set.quota_us.unwrap_or(0) as f64 * 100.0 / set.period_us as f64;
                done(
                    backend(cg),
                    format!(
                        "cgroup {cgroup} CPU quota {} us per {} us ({} of a core; was {:?})",
                        set.quota_us.unwrap_or(0),
                        set.period_us,
                        pct(share),
                        previous.quota_us
                    ),
                    vec![("cpu_quota_percent".into(), share)],
                )
            }
            ResourcePlan::MemoryLimit { cgroup, previous, limit_bytes } => {
                let cg = self.cg()?;
                cg.set_memory_limit_text(cgroup, &limit_bytes.to_string())
                    .map_err(io_err(format!("setting memory limit of {cgroup} to {limit_bytes}")))?;
                let usage = cg.memory_bytes(cgroup).ok().flatten().unwrap_or(0);
                done(
                    backend(cg),
                    format!("cgroup {cgroup} memory limit {} (was {previous}); it holds {}", mib(*limit_bytes), mib(usage)),
                    vec![("memory_limit_bytes".into(), *limit_bytes as f64), ("cgroup_memory_bytes".into(), usage as f64)],
                )
            }
            ResourcePlan::IoThrottle { cgroup, device, previous, set } => {
                let cg = self.cg()?;
                cg.set_io_limits(cgroup, device, *set).map_err(io_err("setting IO limits"))?;
                let now = cg.io_limits(cgroup, device).map_err(io_err("reading IO limits back"))?;
                if now != *set {
                    return Err(AgentError::Command {
                        cmd: "io throttle".into(),
                        detail: format!("wrote {set:?} but the kernel holds {now:?}"),
                    });
                }
                let n = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |v| format!("{v} B/s"));
                done(
                    backend(cg),
                    format!(
                        "cgroup {cgroup} device {device}: read {} write {} (was read {} write {})",
                        n(set.read_bps),
                        n(set.write_bps),
                        n(previous.read_bps),
                        n(previous.write_bps)
                    ),
                    vec![],
                )
            }
            ResourcePlan::Freeze { cgroup, processes } => {
                let cg = self.cg()?;
                cg.set_frozen(cgroup, true).map_err(io_err(format!("freezing cgroup {cgroup}")))?;
                let deadline = Instant::now() + Duration::from_secs(2);
                while !cg.is_frozen(cgroup).unwrap_or(false) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let frozen = cg.is_frozen(cgroup).unwrap_or(false);
                Ok(Applied {
                    backend: backend(cg),
                    processes: processes.clone(),
                    summary: format!(
                        "cgroup {cgroup} with {} process(es) {}",
                        processes.len(),
                        if frozen { "frozen (verified)" } else { "FREEZING: not all tasks stopped within 2 s (uninterruptible IO?)" }
                    ),
                    achieved: vec![("frozen".into(), if frozen { 1.0 } else { 0.0 })],
                    outcome: String::new(),
                })
            }
            ResourcePlan::DiskFill { file, bytes } => {
                let (f, b) = (file.clone(), *bytes);
                let how = tokio::task::spawn_blocking(move || fill_file(&f, b))
                    .await
                    .map_err(|e| AgentError::Command { cmd: "disk fill".into(), detail: e.to_string() })?
                    .map_err(io_err(format!("filling {}", file.display())))?;
                let dir = file.parent().unwrap_or(Path::new("/"));
                let (used, size) = fs_usage(dir).map_err(io_err("statvfs"))?;
                let filled = used as f64 * 100.0 / size.max(1) as f64;
                done(
                    if how == "fallocate" { "fallocate" } else { "file-writes" },
                    format!("{} holds {} ({how}); the filesystem is {} full", file.display(), mib(*bytes), pct(filled)),
                    vec![("filled_percent".into(), filled), ("file_bytes".into(), *bytes as f64)],
                )
            }
        }
    }

    async fn revert(&self, plan: &Plan) -> Result<String, AgentError> {
        let gone = |e: &std::io::Error| e.kind() == ErrorKind::NotFound;
        match plan_of(plan)? {
            ResourcePlan::Stress { fault_id, cgroups, own, .. } => self.revert_stress(fault_id, cgroups, *own).await,
            ResourcePlan::CpuThrottle { cgroup, previous, .. } => match self.cg()?.set_cpu_quota(cgroup, *previous) {
                Ok(()) => Ok(format!("cgroup {cgroup} CPU quota restored to {:?} per {} us", previous.quota_us, previous.period_us)),
                Err(e) if gone(&e) => Ok(format!("cgroup {cgroup} is gone; nothing to restore")),
                Err(e) => Err(io_err("restoring the CPU quota")(e)),
            },
            ResourcePlan::MemoryLimit { cgroup, previous, .. } => match self.cg()?.set_memory_limit_text(cgroup, previous) {
                Ok(()) => Ok(format!("cgroup {cgroup} memory limit restored to {previous}")),
                Err(e) if gone(&e) => Ok(format!("cgroup {cgroup} is gone; nothing to restore")),
                Err(e) => Err(io_err("restoring the memory limit")(e)),
            },
            ResourcePlan::IoThrottle { cgroup, device, previous, .. } => match self.cg()?.set_io_limits(cgroup, device, *previous) {
                Ok(()) => Ok(format!("cgroup {cgroup} IO limits of {device} restored")),
                Err(e) if gone(&e) => Ok(format!("cgroup {cgroup} is gone; nothing to restore")),
                Err(e) => Err(io_err("restoring IO limits")(e)),
            },
            ResourcePlan::Freeze { cgroup, .. } => match self.cg()?.set_frozen(cgroup, false) {
                Ok(()) => Ok(format!("cgroup {cgroup} thawed")),
                Err(e) if gone(&e) => Ok(format!("cgroup {cgroup} is gone; nothing to thaw")),
                Err(e) => Err(io_err("thawing")(e)),
            },
            ResourcePlan::DiskFill { file, .. } => match fs::remove_file(file) {
                Ok(()) => Ok(format!("removed {}", file.display())),
                Err(e) if gone(&e) => Ok(format!("{} already gone", file.display())),
                Err(e) => Err(io_err(format!("removing {}", file.display()))(e)),
            },
        }
    }

    /// The knob files it writes (read back), the freezer state, whether its
    /// stress workers run and its own cgroups exist, whether its fill file exists.
    async fn snapshot(&self, plan: &Plan) -> Result<Option<Snapshot>, AgentError> {
        self.read_snapshot(plan_of(plan)?).map(Some)
    }

    fn observe(&self, plan: &Plan) -> Option<Observation> {
        let ResourcePlan::Stress { fault_id, work, .. } = plan_of(plan).ok()? else { return None };
        let mut live = self.live();
        let l = live.get_mut(fault_id)?;
        if l.outcome.is_none() {
            l.outcome = self.exit_outcome(l);
        }
        let mut achieved = vec![];
        if l.outcome.is_none() {
            match work {
                StressWork::Cpu { workers, .. } => {
                    let now = Instant::now();
                    let ns = self.cpu_ns(l.pid)?;
                    // The newest sample at least a second old (else the first).
                    let base = l
                        .samples
                        .iter()
                        .rev()
                        .find(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
                        .or(l.samples.front())
                        .copied();
                    if let Some((t, n0)) = base {
                        let wall = now.duration_since(t).as_nanos() as f64;
                        if wall > 0.0 {
                            let total = ns.saturating_sub(n0) as f64 * 100.0 / wall;
                            achieved.push(("cpu_load_percent".to_string(), total / f64::from(*workers)));
                            achieved.push(("cpu_load_total_percent".to_string(), total));
                        }
                    }
                    l.samples.push_back((now, ns));
                    while l.samples.len() > 2 && l.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5)) {
                        l.samples.pop_front();
                    }
                }
                StressWork::Memory { .. } => achieved.push(("resident_bytes".to_string(), self.rss_bytes(l.pid)? as f64)),
            }
        }
        Some(Observation { achieved, outcome: l.outcome.clone() })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::sys::fake::FakeProcs;

    fn write(p: &Path, text: &str) {
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, text).expect("write");
    }

    struct Rig {
        dir: tempfile::TempDir,
        procs: FakeProcs,
        driver: ResourceDriver,
    }

    /// A v2 host in a tempdir: cgroup root, /proc (meminfo, PID/cgroup), /sys/dev/block.
    fn rig(guards: Guards) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(&d.join("cg/cgroup.controllers"), "cpu memory io\n");
        write(&d.join("cg/cgroup.subtree_control"), "cpu memory io\n");
        write(&d.join("cg/app/cgroup.procs"), "10\n");
        write(&d.join("cg/app/cpu.max"), "max 100000\n");
        write(&d.join("cg/app/memory.max"), "max\n");
        write(&d.join("cg/app/io.max"), "");
        write(&d.join("cg/app/cgroup.events"), "populated 1\nfrozen 0\n");
        write(&d.join("cg/app/cgroup.freeze"), "0\n");
        write(&d.join("cg/app/sub/cgroup.procs"), "11\n");
        write(&d.join("cg/guarded/cgroup.procs"), "20\n");
        write(&d.join("proc/meminfo"), "MemTotal:  4000000 kB\nMemAvailable: 1000000 kB\n");
        write(&d.join("proc/10/cgroup"), "0::/app\n");
        write(&d.join("proc/30/cgroup"), "0::/\n");
        write(&d.join("blk/254:0/dev"), "254:0\n");
        let procs = FakeProcs::default();
        procs.spawn(10, "app", 100);
        procs.spawn(11, "helper", 101);
        procs.spawn(20, "sshd", 102);
        procs.spawn(30, "loose", 103);
        let cg = CgroupFs::detect(d.join("cg")).map_err(|e| e.to_string());
        let prot = Arc::new(Protection::new(999, vec![], vec!["sshd".into()]));
        let driver = ResourceDriver::new(cg, Arc::new(procs.clone()), prot, PathBuf::from("/nonexistent"), guards)
            .with_roots(d.join("proc"), d.join("blk"));
        Rig { dir, procs, driver }
    }

    fn req(target: TargetSpec, kind: FaultKind) -> FaultRequest {
        FaultRequest { id: Some("f1".into()), target, duration: Duration::from_secs(5), labels: BTreeMap::new(), kind }
    }

    fn read(r: &Rig, f: &str) -> String {
        fs::read_to_string(r.dir.path().join(f)).expect("read")
    }

    #[tokio::test]
    async fn v2_knobs_apply_and_restore_exactly() {
        let r = rig(Guards::default());
        let cases: Vec<(FaultKind, &str, &str)> = vec![
            (FaultKind::CpuThrottle { quota_permyriad: 2500 }, "cg/app/cpu.max", "25000 100000"),
            (FaultKind::MemoryLimit { limit_bytes: 64 << 20 }, "cg/app/memory.max", "67108864"),
            (
                FaultKind::IoThrottle {
                    read_bytes_per_second: 0,
                    write_bytes_per_second: 1 << 20,
                    device: Some("254:0".parse().expect("dev")),
                },
                "cg/app/io.max",
                "254:0 rbps=max wbps=1048576",
            ),
            (FaultKind::CgroupFreeze, "cg/app/cgroup.freeze", "1"),
        ];
        for (kind, file, want) in cases {
            let before = fs::read_to_string(r.dir.path().join(file)).unwrap_or_default();
            let plan = r.driver.plan(&req(TargetSpec::Pid(10), kind.clone())).await.expect("plan");
            assert_eq!(read(&r, file), before, "plan has no side effects");
            if kind == FaultKind::CgroupFreeze {
                // The fake kernel freezes at once.
                write(&r.dir.path().join("cg/app/cgroup.events"), "populated 1\nfrozen 1\n");
            }
            let a = r.driver.apply(&plan).await.expect("apply");
            assert_eq!(read(&r, file), want, "{}", a.summary);
            assert_eq!(a.backend, "cgroup-v2");
            r.driver.revert(&plan).await.expect("revert");
            let restored = read(&r, file);
            match kind {
                FaultKind::CpuThrottle { .. } => assert_eq!(restored, "max 100000"),
                FaultKind::MemoryLimit { .. } => assert_eq!(restored, "max"),
                FaultKind::IoThrottle { .. } => assert_eq!(restored, "254:0 rbps=max wbps=max"),
                _ => assert_eq!(restored, "0"),
            }
        }
    }

    #[tokio::test]
    async fn knob_snapshots_read_back_what_the_fault_writes_and_name_a_value_not_restored() {
        let r = rig(Guards::default());
        let app = r.dir.path().join("cg/app");
        let io = FaultKind::IoThrottle {
            read_bytes_per_second: 0,
            write_bytes_per_second: 1 << 20,
            device: Some("254:0".parse().expect("dev")),
        };
        let cases: Vec<(FaultKind, String, &str, &str)> = vec![
            (FaultKind::CpuThrottle { quota_permyriad: 2500 }, format!("cpu.max of {}", app.display()), "max 100000", "25000 100000"),
            (FaultKind::MemoryLimit { limit_bytes: 64 << 20 }, format!("memory.max of {}", app.display()), "max", "67108864"),
            (io, "io.max of cgroup /app, device 254:0".to_string(), "read unlimited, write unlimited", "read unlimited, write 1048576 B/s"),
            (FaultKind::CgroupFreeze, format!("cgroup.freeze of {}", app.display()), "0", "1"),
        ];
        for (kind, key, was, during) in cases {
            let plan = r.driver.plan(&req(TargetSpec::Pid(10), kind.clone())).await.expect("plan");
            let before = r.driver.snapshot(&plan).await.expect("snapshot").expect("knobs are compared");
            assert_eq!(before.items.keys().collect::<Vec<_>>(), vec![&key], "{kind:?}");
            assert_eq!(before.items[&key], was, "{kind:?}");
            if kind == FaultKind::CgroupFreeze {
                write(&app.join("cgroup.events"), "populated 1\nfrozen 1\n");
            }
            r.driver.apply(&plan).await.expect("apply");
            let left = r.driver.snapshot(&plan).await.expect("snapshot").expect("some");
            // As if the revert had not taken: the line names the knob and both values.
            assert_eq!(left.differences(&before), vec![format!("{key}: was {was:?}, now {during:?}")], "{kind:?}");
            r.driver.revert(&plan).await.expect("revert");
            let after = r.driver.snapshot(&plan).await.expect("snapshot").expect("some");
            assert!(after.differences(&before).is_empty(), "{kind:?}: {:?}", after.differences(&before));
        }
        let plan = r.driver.plan(&req(TargetSpec::Pid(10), FaultKind::CgroupFreeze)).await.expect("plan");
        fs::remove_dir_all(&app).expect("rm cgroup");
        let e = r.driver.snapshot(&plan).await.expect_err("cgroup gone");
        assert!(matches!(e, AgentError::TargetNotFound(_)), "{e}");
    }

    #[tokio::test]
    async fn stress_and_fill_snapshots_see_workers_own_cgroups_and_the_fill_file() {
        let r = rig(Guards { memory_floor_bytes: 0, disk_fill_max_permyriad: 10_000 });
        let plan = r.driver.plan(&req(TargetSpec::Host, FaultKind::CpuStress { workers: 1, load_permyriad: 5000 })).await.expect("plan");
        let before = r.driver.snapshot(&plan).await.expect("snapshot").expect("compared");
        let want: BTreeMap<String, String> = [
            ("cgroup cpu:/chaos-f1".to_string(), "absent".to_string()),
            ("stress workers of fault f1".to_string(), "none running".to_string()),
        ]
        .into();
        assert_eq!(before.items, want);
        // A worker of this fault left running, and its cgroup left behind.
        write(
            &r.dir.path().join("proc/77/cmdline"),
            &["chaos-agent", "__stressor", "--fault-id", "f1", "--deadline-unix-ms", "1", "cpu", "1", "5000", ""].join("\0"),
        );
        r.procs.spawn(77, "chaos-agent", 700);
        fs::create_dir_all(r.dir.path().join("cg/chaos-f1")).expect("mkdir");
        let left = r.driver.snapshot(&plan).await.expect("snapshot").expect("some");
        assert_eq!(
            left.differences(&before),
            vec![
                r#"cgroup cpu:/chaos-f1: was "absent", now "present""#.to_string(),
                r#"stress workers of fault f1: was "none running", now "running: pids [77]""#.to_string(),
            ]
        );
        let dir = r.dir.path().display().to_string();
        let fill =
            r.driver.plan(&req(TargetSpec::Host, FaultKind::DiskFill { path: dir, amount: FillAmount::Bytes(4096) })).await.expect("plan");
        let key = format!("fill file {}", r.dir.path().join(".chaos-fill-f1").display());
        let before = r.driver.snapshot(&fill).await.expect("snapshot").expect("compared");
        assert_eq!(before.items.get(&key).map(String::as_str), Some("absent"), "{before:?}");
        r.driver.apply(&fill).await.expect("apply");
        let left = r.driver.snapshot(&fill).await.expect("snapshot").expect("some");
        assert_eq!(left.differences(&before), vec![format!(r#"{key}: was "absent", now "present""#)]);
        r.driver.revert(&fill).await.expect("revert");
        assert!(r.driver.snapshot(&fill).await.expect("snapshot").expect("some").differences(&before).is_empty());
    }

    #[tokio::test]
    async fn root_and_protected_cgroups_are_refused() {
        let r = rig(Guards::default());
        let e = r.driver.plan(&req(TargetSpec::Pid(30), FaultKind::CgroupFreeze)).await.expect_err("root");
        assert!(matches!(e, AgentError::Protected(_)) && e.to_string().contains("root"), "{e}");
        let e = r.driver.plan(&req(TargetSpec::CgroupPath("guarded".into()), FaultKind::CgroupFreeze)).await.expect_err("sshd");
        assert!(e.to_string().contains("protected.names"), "{e}");
        // A protected process in a child cgroup counts too.
        r.procs.spawn(11, "sshd", 101);
        let e = r
            .driver
            .plan(&req(TargetSpec::CgroupPath("app".into()), FaultKind::CpuThrottle { quota_permyriad: 5000 }))
            .await
            .expect_err("child");
        assert!(e.to_string().contains("pid 11"), "{e}");
        let e = r.driver.plan(&req(TargetSpec::CgroupPath("nope".into()), FaultKind::CgroupFreeze)).await.expect_err("missing");
        assert!(matches!(e, AgentError::TargetNotFound(_)), "{e}");
        let e = r.driver.plan(&req(TargetSpec::Pid(10), FaultKind::CpuThrottle { quota_permyriad: 100_000_000 })).await.expect_err("cores");
        assert!(e.to_string().contains("spec.cpu_throttle.quota_percent"), "{e}");
    }

    #[tokio::test]
    async fn memory_floor_and_disk_cap_refuse_with_the_field() {
        let r = rig(Guards { memory_floor_bytes: 512 << 20, disk_fill_max_permyriad: 9000 });
        // 1000000 kB available, floor 512 MiB: 600 MiB is too much, 100 MiB is fine.
        let e =
            r.driver.plan(&req(TargetSpec::Host, FaultKind::MemoryStress { size: MemorySize::Bytes(600 << 20) })).await.expect_err("floor");
        assert!(matches!(e, AgentError::Guard(_)) && e.to_string().contains("guards.memory_floor"), "{e}");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let p = r.driver.plan(&req(TargetSpec::Host, FaultKind::MemoryStress { size: MemorySize::Bytes(100 << 20) })).await.expect("fits");
        let Plan::Resource(p) = p else { panic!("plan") };
        assert!(matches!(&*p, ResourcePlan::Stress { own: true, cgroups, .. } if cgroups[0].path == "/chaos-f1"), "{p:?}");
        let dir = r.dir.path().display().to_string();
        let e = r
            .driver
            .plan(&req(TargetSpec::Host, FaultKind::DiskFill { path: dir.clone(), amount: FillAmount::ToPermyriad(9500) }))
            .await
            .expect_err("cap");
        assert!(e.to_string().contains("spec.disk_fill.fill_to_percent must be at most 90"), "{e}");
        let e = r
            .driver
            .plan(&req(TargetSpec::Host, FaultKind::DiskFill { path: format!("{dir}/nope"), amount: FillAmount::Bytes(1) }))
            .await
            .expect_err("path");
        assert!(e.to_string().contains("spec.disk_fill.path"), "{e}");
    }

    #[tokio::test]
    async fn disk_fill_creates_and_removes_its_file() {
        let r = rig(Guards { memory_floor_bytes: 0, disk_fill_max_permyriad: 10_000 });
        let dir = r.dir.path().display().to_string();
        let plan = r
            .driver
            .plan(&req(TargetSpec::Host, FaultKind::DiskFill { path: dir.clone(), amount: FillAmount::Bytes(1 << 20) }))
            .await
            .expect("plan");
        let a = r.driver.apply(&plan).await.expect("apply");
        let file = r.dir.path().join(".chaos-fill-f1");
        assert_eq!(fs::metadata(&file).expect("file").len(), 1 << 20, "{}", a.summary);
        assert!(a.achieved.iter().any(|(k, v)| k == "filled_percent" && *v > 0.0));
        assert!(r.driver.revert(&plan).await.expect("revert").contains("removed"));
        assert!(!file.exists());
        assert!(r.driver.revert(&plan).await.expect("again").contains("already gone"));
    }
}
