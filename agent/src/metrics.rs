//! The metrics sampler: one background thread samples the host on an
//! interval and publishes each batch on a `watch` channel. Readers
//! (StreamMetrics, the Prometheus collector) only ever see the latest batch,
//! so a slow reader skips samples and can never hold the sampler back.
//! While no reader subscribes, the thread sleeps on a condition variable
//! (no timer, no reads of the host); a reader arriving after that gets its
//! first batch about [`WAKE_SPAN`] later (see [`Metrics::subscribe`]).
//!
//! Sources: `sysinfo` for CPU (total and per core), load, memory, swap, disk
//! usage and IO per mount; `/proc/net/dev` for interface counters (read
//! inside each configured network namespace from a short-lived thread that
//! `setns`es, so the agent itself never moves); `/proc/PID/stat` for
//! watched processes; cgroup counters (v1 or v2) for watched
//! cgroups.
//!
//! Metric names (units in the name; `_total` counters, `_per_s` rates):
//! - `host.cpu.used_pct`, `host.cpu.core_used_pct{core}`, `host.cpu.cores`
//! - `host.load1`, `host.load5`, `host.load15`
//! - `host.memory.{total,used,available}_bytes`, `host.memory.used_pct`,
//!   `host.swap.{total,used}_bytes`
//! - `host.disk.{total,used}_bytes{mount,device}`, `host.disk.used_pct`,
//!   `host.disk.{read,write}_bytes_per_s`
//! - `net.{rx,tx}_{bytes,packets,errors,dropped}_total{iface,netns}`,
//!   `net.{rx,tx}_bytes_per_s{iface,netns}` (`netns` = "host" for the
//!   agent's own namespace)
//! - `process.count{name}`, `process.cpu_pct{name,pid}`,
//!   `process.memory_rss_bytes{name,pid}`
//! - `cgroup.cpu_pct{cgroup}`, `cgroup.memory_bytes{cgroup}`,
//!   `cgroup.memory_limit_bytes{cgroup}`
//! - `agent.sample_ms` (how long this sample took), `agent.faults.active`

use std::{
    collections::HashMap,
    fs, io,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use chaos_proto::{
    convert::timestamp_to_pb,
    metrics::metric,
    pb,
    telemetry::{Labels, encode_batches},
};
use prometheus_client::{
    collector::Collector,
    encoding::DescriptorEncoder,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::sys::{
    cgroup::{CgroupFs, Version},
    processes_named,
    procfs::ProcFs,
};

/// What the sampler watches besides the host.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub interval: Duration,
    /// Named network namespaces (`/run/netns/NAME`) whose interfaces to count.
    pub netns: Vec<String>,
    /// Process names (comm, or argv[0]'s basename) to follow.
    pub processes: Vec<String>,
    /// cgroup paths ("/system.slice/kafka.service") to follow.
    pub cgroups: Vec<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(1), netns: Vec::new(), processes: Vec::new(), cgroups: Vec::new() }
    }
}

/// One interface's counters from `/proc/net/dev`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetDev {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// Parse `/proc/net/dev`: two header lines, then `iface: 16 numbers`.
pub fn parse_net_dev(text: &str) -> Vec<(String, NetDev)> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            (v.len() >= 16).then(|| {
                (
                    name.trim().to_string(),
                    NetDev {
                        rx_bytes: v[0],
                        rx_packets: v[1],
                        rx_errors: v[2],
                        rx_dropped: v[3],
                        tx_bytes: v[8],
                        tx_packets: v[9],
                        tx_errors: v[10],
                        tx_dropped: v[11],
                    },
                )
            })
        })
        .collect()
}

/// `/proc/net/dev` as seen from inside the namespace at `ns`: read from a
/// short-lived thread that enters it; the agent's other threads stay put.
pub fn net_dev_in(ns: PathBuf) -> io::Result<String> {
    // thread-self: this thread's namespace, not the process's.
    crate::sys::netns::in_netns(Some(&ns), || fs::read_to_string("/proc/thread-self/net/dev"))
}

/// Per-second rate of a counter between two samples (0 when it went back).
fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 { 0.0 } else { now.saturating_sub(before) as f64 / secs }
}

/// USER_HZ: fixed at 100 by the Linux ABI on x86, arm and riscv.
const CLK_TCK: f64 = 100.0;

/// The sampler's state between two samples.
pub struct Sampler {
    source: String,
    cfg: MetricsConfig,
    sys: Option<sysinfo::System>,
    disks: Option<sysinfo::Disks>,
    cgroups: Option<CgroupFs>,
    procs: ProcFs,
    page_size: u64,
    last: Option<Instant>,
    net: HashMap<(String, String), NetDev>,
    proc_ticks: HashMap<u32, u64>,
    cg_usage: HashMap<String, u64>,
    seq: u64,
    warned: std::collections::HashSet<String>,
}

impl Sampler {
    pub fn new(source: String, cfg: MetricsConfig) -> Self {
        let sys = sysinfo::System::new().map_err(|e| warn!(error = %e, "sysinfo unavailable: no host CPU/memory metrics")).ok();
        let disks = sysinfo::Disks::new_with_refreshed_list().map_err(|e| warn!(error = %e, "sysinfo disks unavailable")).ok();
        let cgroups = CgroupFs::detect("/sys/fs/cgroup").map_err(|e| warn!(error = %e, "no cgroup filesystem: no cgroup metrics")).ok();
        // SAFETY: sysconf has no preconditions.
        let page_size = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        Self {
            source,
            cfg,
            sys,
            disks,
            cgroups,
            procs: ProcFs::default(),
            page_size,
            last: None,
            net: HashMap::new(),
            proc_ticks: HashMap::new(),
            cg_usage: HashMap::new(),
            seq: 0,
            warned: Default::default(),
        }
    }

    pub fn cgroup_version(&self) -> Option<Version> {
        self.cgroups.as_ref().map(CgroupFs::version)
    }

    /// Log a failing source once, not every second.
    fn warn_once(&mut self, key: &str, error: &dyn std::fmt::Display) {
        if self.warned.insert(key.to_string()) {
            warn!(source = key, error = %error, "metric source unreadable; its metrics are left out");
        }
    }

    /// Take one sample.
    pub fn sample(&mut self, active_faults: u32) -> pb::MetricBatch {
        let metrics = self.measure(active_faults);
        self.seq += 1;
        pb::MetricBatch {
            source: self.source.clone(),
            sampled_at: Some(timestamp_to_pb(SystemTime::now())),
            metrics,
            seq: self.seq,
            ..Default::default()
        }
    }

    /// Read the host; the rates cover the span since the last reading.
    fn measure(&mut self, active_faults: u32) -> Vec<pb::Metric> {
        let t0 = Instant::now();
        let secs = self.last.map(|l| l.elapsed().as_secs_f64()).unwrap_or(0.0);
        let first = self.last.is_none();
        self.last = Some(t0);
        let mut out = Vec::with_capacity(64);
        if let Some(sys) = self.sys.as_mut() {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            // The first CPU reading has no interval behind it.
            if !first {
                out.push(metric("host.cpu.used_pct", &[], f64::from(sys.global_cpu_usage())));
                for (i, c) in sys.cpus().iter().enumerate() {
                    out.push(metric("host.cpu.core_used_pct", &[("core", &i.to_string())], f64::from(c.usage())));
                }
            }
            out.push(metric("host.cpu.cores", &[], sys.cpus().len() as f64));
            let (total, avail) = (sys.total_memory(), sys.available_memory());
            out.push(metric("host.memory.total_bytes", &[], total as f64));
            out.push(metric("host.memory.available_bytes", &[], avail as f64));
            out.push(metric("host.memory.used_bytes", &[], total.saturating_sub(avail) as f64));
            if total > 0 {
                out.push(metric("host.memory.used_pct", &[], 100.0 * total.saturating_sub(avail) as f64 / total as f64));
            }
            out.push(metric("host.swap.total_bytes", &[], sys.total_swap() as f64));
            out.push(metric("host.swap.used_bytes", &[], sys.used_swap() as f64));
        }
        match sysinfo::System::load_average() {
            Ok(l) => {
                out.push(metric("host.load1", &[], l.one));
                out.push(metric("host.load5", &[], l.five));
                out.push(metric("host.load15", &[], l.fifteen));
            }
            Err(e) => self.warn_once("loadavg", &e),
        }
        if let Some(disks) = self.disks.as_mut() {
            disks.refresh(true);
            for d in disks.iter() {
                let mount = d.mount_point().display().to_string();
                let device = d.name().to_string_lossy().to_string();
                let l = [("mount", mount.as_str()), ("device", device.as_str())];
                let (total, free) = (d.total_space(), d.available_space());
                out.push(metric("host.disk.total_bytes", &l, total as f64));
                out.push(metric("host.disk.used_bytes", &l, total.saturating_sub(free) as f64));
                if total > 0 {
                    out.push(metric("host.disk.used_pct", &l, 100.0 * total.saturating_sub(free) as f64 / total as f64));
                }
                if !first && secs > 0.0 {
                    let u = d.usage();
                    out.push(metric("host.disk.read_bytes_per_s", &l, u.read_bytes as f64 / secs));
                    out.push(metric("host.disk.write_bytes_per_s", &l, u.written_bytes as f64 / secs));
                }
            }
        }
        self.sample_net(&mut out, secs);
        self.sample_processes(&mut out, secs);
        self.sample_cgroups(&mut out, secs);
        out.push(metric("agent.faults.active", &[], f64::from(active_faults)));
        out.push(metric("agent.sample_ms", &[], t0.elapsed().as_secs_f64() * 1000.0));
        out
    }

    fn sample_net(&mut self, out: &mut Vec<pb::Metric>, secs: f64) {
        let mut spaces: Vec<(String, io::Result<String>)> = vec![("host".into(), fs::read_to_string("/proc/net/dev"))];
        for ns in &self.cfg.netns {
            spaces.push((ns.clone(), net_dev_in(PathBuf::from("/run/netns").join(ns))));
        }
        for (ns, text) in spaces {
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    self.warn_once(&format!("netns {ns}"), &e);
                    continue;
                }
            };
            for (iface, c) in parse_net_dev(&text) {
                let l = [("iface", iface.as_str()), ("netns", ns.as_str())];
                for (name, v) in [
                    ("net.rx_bytes_total", c.rx_bytes),
                    ("net.tx_bytes_total", c.tx_bytes),
                    ("net.rx_packets_total", c.rx_packets),
                    ("net.tx_packets_total", c.tx_packets),
                    ("net.rx_errors_total", c.rx_errors),
                    ("net.tx_errors_total", c.tx_errors),
                    ("net.rx_dropped_total", c.rx_dropped),
                    ("net.tx_dropped_total", c.tx_dropped),
                ] {
                    out.push(metric(name, &l, v as f64));
                }
                if let Some(before) = self.net.insert((ns.clone(), iface.clone()), c) {
                    out.push(metric("net.rx_bytes_per_s", &l, rate(c.rx_bytes, before.rx_bytes, secs)));
                    out.push(metric("net.tx_bytes_per_s", &l, rate(c.tx_bytes, before.tx_bytes, secs)));
                }
            }
        }
    }

    fn sample_processes(&mut self, out: &mut Vec<pb::Metric>, secs: f64) {
        let (mut seen, mut unreadable) = (HashMap::new(), None);
        for name in &self.cfg.processes {
            let found = match processes_named(&self.procs, name) {
                Ok(f) => f,
                Err(e) => {
                    unreadable = Some(e);
                    break;
                }
            };
            out.push(metric("process.count", &[("name", name)], found.len() as f64));
            for (stat, _) in found {
                let p = stat.pid.to_string();
                let l = [("name", name.as_str()), ("pid", p.as_str())];
                if let Some(before) = self.proc_ticks.get(&stat.pid) {
                    out.push(metric("process.cpu_pct", &l, 100.0 * rate(stat.cpu_ticks, *before, secs) / CLK_TCK));
                }
                out.push(metric("process.memory_rss_bytes", &l, (stat.rss_pages * self.page_size) as f64));
                seen.insert(stat.pid, stat.cpu_ticks);
            }
        }
        self.proc_ticks = seen;
        if let Some(e) = unreadable {
            self.warn_once("process table", &e);
        }
    }

    fn sample_cgroups(&mut self, out: &mut Vec<pb::Metric>, secs: f64) {
        let Some(cg) = self.cgroups.clone() else { return };
        for path in self.cfg.cgroups.clone() {
            let l = [("cgroup", path.as_str())];
            match cg.cpu_usage_ns(&path) {
                Ok(Some(ns)) => {
                    if let Some(before) = self.cg_usage.insert(path.clone(), ns) {
                        out.push(metric("cgroup.cpu_pct", &l, 100.0 * rate(ns, before, secs) / 1e9));
                    }
                }
                Ok(None) => self.warn_once(&format!("cgroup {path}"), &"no CPU accounting for this cgroup (does it exist?)"),
                Err(e) => self.warn_once(&format!("cgroup {path}"), &e),
            }
            match cg.memory_bytes(&path) {
                Ok(Some(b)) => out.push(metric("cgroup.memory_bytes", &l, b as f64)),
                Ok(None) => {}
                Err(e) => self.warn_once(&format!("cgroup memory {path}"), &e),
            }
            if let Ok(Some(limit)) = cg.memory_limit(&path) {
                out.push(metric("cgroup.memory_limit_bytes", &l, limit as f64));
            }
        }
    }
}

/// Counters of the fault lifecycle, exported on `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct FaultCounters {
    applied: Family<Labels, Counter>,
    apply_failed: Family<Labels, Counter>,
    reverted: Family<Labels, Counter>,
    revert_failed: Family<Labels, Counter>,
    revert_checks: Family<Labels, Counter>,
}

impl FaultCounters {
    pub fn register(registry: &mut Registry) -> Self {
        let c = Self::default();
        registry.register("chaos_agent_faults_applied", "Faults applied, by family and backend", c.applied.clone());
        registry.register(
            "chaos_agent_faults_apply_failed",
            "Faults whose apply failed (and was undone), by family",
            c.apply_failed.clone(),
        );
        registry.register("chaos_agent_faults_reverted", "Faults reverted, by family, backend and reason", c.reverted.clone());
        registry.register("chaos_agent_faults_revert_failed", "Revert attempts that failed (retried), by family", c.revert_failed.clone());
        registry.register(
            "chaos_agent_revert_checks",
            "Re-reads of the host after a revert, by family and verdict (verified, different, not_compared)",
            c.revert_checks.clone(),
        );
        c
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub fn applied(&self, family: &str, backend: &str) {
        self.applied.get_or_create(&Self::labels(&[("family", family), ("backend", backend)])).inc();
    }

    pub fn apply_failed(&self, family: &str) {
        self.apply_failed.get_or_create(&Self::labels(&[("family", family)])).inc();
    }

    pub fn reverted(&self, family: &str, backend: &str, reason: &str) {
        self.reverted.get_or_create(&Self::labels(&[("family", family), ("backend", backend), ("reason", reason)])).inc();
    }

    pub fn revert_failed(&self, family: &str) {
        self.revert_failed.get_or_create(&Self::labels(&[("family", family)])).inc();
    }

    pub fn revert_checked(&self, family: &str, verdict: &str) {
        self.revert_checks.get_or_create(&Self::labels(&[("family", family), ("verdict", verdict)])).inc();
    }

    /// How many re-reads of `family` ended with `verdict` (for tests and the bench).
    pub fn revert_checks(&self, family: &str, verdict: &str) -> u64 {
        self.revert_checks.get_or_create(&Self::labels(&[("family", family), ("verdict", verdict)])).get()
    }
}

/// The latest batch, shared by the sampler and its readers.
type Latest = watch::Receiver<Arc<pb::MetricBatch>>;

/// How long the sampler reads the host after an idle spell before it
/// publishes: the first batch's rates (CPU, disk, network) cover this
/// span rather than the whole idle spell (capped at the interval).
pub const WAKE_SPAN: Duration = Duration::from_millis(250);

/// Who wants samples. While nobody does, the sampler thread waits on
/// `wake` with no timer: no reads of the host, no wake-ups.
#[derive(Debug, Default)]
struct Demand {
    state: Mutex<DemandState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct DemandState {
    /// Live [`Subscription`]s.
    readers: usize,
    /// The sampler is on its interval: the latest batch is at most one
    /// interval old (false while it sleeps, and until the first batch after
    /// waking is published).
    sampling: bool,
    /// The sampler waits for a reader (for tests: "it sleeps now").
    idle: bool,
    /// Every [`Metrics`] handle is gone: the sampler thread ends.
    closed: bool,
}

impl Demand {
    fn lock(&self) -> MutexGuard<'_, DemandState> {
        // The state is counters and flags, valid whatever panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The sampler, before each sample: block while nobody reads. `None`
    /// once closed; `Some(true)` after an idle spell.
    fn until_read(&self) -> Option<bool> {
        let mut st = self.lock();
        let mut slept = false;
        while st.readers == 0 && !st.closed {
            if !st.idle {
                debug!("no metric readers: the sampler sleeps until one subscribes");
            }
            (st.sampling, st.idle, slept) = (false, true, true);
            st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.idle = false;
        (!st.closed).then_some(slept)
    }

    /// The sampler, between samples: sleep until `deadline`; false once closed.
    fn sleep_until(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            if st.closed || now >= deadline {
                return !st.closed;
            }
            st = self.wake.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// The readers' side of the sampler: subscribe to receive batches. The
/// sampler thread ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<Handle>);

#[derive(Debug)]
struct Handle {
    latest: Latest,
    demand: Arc<Demand>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.demand.lock().closed = true;
        self.demand.wake.notify_all();
    }
}

impl Metrics {
    /// Start receiving batches; the sampler runs while any subscription
    /// lives. The first [`Subscription::changed`] yields a fresh batch: the
    /// current one when the sampler is on its interval (at most one
    /// interval old), else the first one the woken sampler takes, after
    /// [`WAKE_SPAN`] (capped at the interval) plus two samples' time.
    pub fn subscribe(&self) -> Subscription {
        let mut rx = self.0.latest.clone();
        // Seen: from here on only a newly published batch counts.
        rx.borrow_and_update();
        let sampling = {
            let mut st = self.0.demand.lock();
            st.readers += 1;
            st.sampling
        };
        self.0.demand.wake.notify_all();
        if sampling {
            rx.mark_changed();
        }
        Subscription { rx, demand: Arc::clone(&self.0.demand) }
    }

    /// Whether the sampler thread is asleep waiting for a reader.
    pub fn is_idle(&self) -> bool {
        self.0.demand.lock().idle
    }
}

/// One reader of the sampler's batches; the sampler runs while one lives.
#[derive(Debug)]
pub struct Subscription {
    rx: Latest,
    demand: Arc<Demand>,
}

impl Subscription {
    /// Wait for a batch this subscription has not seen; an error once the
    /// sampler has stopped.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.rx.changed().await
    }

    /// The latest batch, marked seen.
    pub fn latest(&mut self) -> Arc<pb::MetricBatch> {
        Arc::clone(&self.rx.borrow_and_update())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.demand.lock();
        st.readers = st.readers.saturating_sub(1);
    }
}

/// `/metrics` export of the latest sample, read at scrape time. It holds a
/// subscription, so the sampler stays on its interval while the endpoint
/// is served: a scrape, whenever it comes, reads a batch at most one
/// interval old.
#[derive(Debug)]
pub struct SampleCollector(pub Subscription);

impl Collector for SampleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        // Hold the watch's lock for a pointer copy, not for the encoding.
        let latest = Arc::clone(&self.0.rx.borrow());
        encode_batches(&mut encoder, [&*latest])
    }
}

/// What the sampler thread drives: the host's [`Sampler`], or a test's fake.
pub trait Sample {
    /// Read every counter so the next sample's rates cover the span from
    /// now (after an idle spell, whose rates nobody asked for).
    fn prime(&mut self);
    fn sample(&mut self, active_faults: u32) -> pb::MetricBatch;
}

impl Sample for Sampler {
    fn prime(&mut self) {
        self.measure(0);
    }

    fn sample(&mut self, active_faults: u32) -> pb::MetricBatch {
        Sampler::sample(self, active_faults)
    }
}

/// Start the host sampler on its own thread (see [`sample_on_thread`]).
/// `active_faults` is read at each sample.
pub fn start(source: String, cfg: MetricsConfig, active_faults: Arc<dyn Fn() -> u32 + Send + Sync>) -> io::Result<Metrics> {
    let interval = cfg.interval;
    sample_on_thread(
        source.clone(),
        interval,
        move || {
            let sampler = Sampler::new(source, cfg);
            if let Some(v) = sampler.cgroup_version() {
                debug!(cgroup = v.as_str(), "cgroup hierarchy detected");
            }
            sampler
        },
        active_faults,
    )
}

/// Run a sampler on its own thread: built by `make` when the first reader
/// subscribes, it samples every `interval` while any [`Subscription`]
/// lives and sleeps (no timer) while none does. After each sleep it primes,
/// waits [`WAKE_SPAN`] and publishes at once, then keeps its interval. The
/// batch published before any sample is empty (`seq` 0). The thread ends
/// when every [`Metrics`] clone is dropped.
pub fn sample_on_thread<S: Sample + 'static>(
    source: String,
    interval: Duration,
    make: impl FnOnce() -> S + Send + 'static,
    active_faults: Arc<dyn Fn() -> u32 + Send + Sync>,
) -> io::Result<Metrics> {
    let empty = pb::MetricBatch { source, ..Default::default() };
    let (tx, latest) = watch::channel(Arc::new(empty));
    let demand = Arc::new(Demand::default());
    let theirs = Arc::clone(&demand);
    std::thread::Builder::new().name("metrics-sampler".into()).spawn(move || {
        let demand = theirs;
        let (mut make, mut sampler) = (Some(make), None::<S>);
        let mut next = Instant::now();
        loop {
            let Some(slept) = demand.until_read() else {
                debug!("metrics handle dropped; sampler stops");
                return;
            };
            // Its first batch after a sleep, or ever: the one a new reader waits for.
            let woke = slept || sampler.is_none();
            let s = match (sampler.as_mut(), make.take()) {
                (Some(s), _) => s,
                (None, Some(make)) => sampler.insert(make()),
                (None, None) => return,
            };
            if woke {
                s.prime();
                next = Instant::now() + WAKE_SPAN.min(interval);
            }
            if !demand.sleep_until(next) {
                return;
            }
            next += interval;
            // Fell far behind (a suspended VM): do not burst.
            if next < Instant::now() {
                next = Instant::now() + interval;
            }
            let batch = s.sample(active_faults());
            // Published and flagged as one step under the lock `subscribe` reads the flag
            // under: a reader coming just after sees the batch as new either way.
            let mut st = demand.lock();
            if tx.send(Arc::new(batch)).is_err() {
                debug!("no metric readers left; sampler stops");
                return;
            }
            st.sampling |= woke;
            drop(st);
        }
    })?;
    Ok(Metrics(Arc::new(Handle { latest, demand })))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo:  123456     100    0    0    0     0          0         0   123456     100    0    0    0     0       0          0\n  \
 eth0: 9000 30 1 2 0 0 0 0 7000 20 3 4 0 0 0 0\n";
        let v = parse_net_dev(text);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0, "lo");
        assert_eq!(
            v[1].1,
            NetDev {
                rx_bytes: 9000,
                rx_packets: 30,
                rx_errors: 1,
                rx_dropped: 2,
                tx_bytes: 7000,
                tx_packets: 20,
                tx_errors: 3,
                tx_dropped: 4
            }
        );
        assert_eq!(rate(150, 100, 0.5), 100.0);
        assert_eq!(rate(50, 100, 1.0), 0.0, "a counter reset is not a negative rate");
    }

    #[test]
    fn samples_this_host() {
        let mut s = Sampler::new("t".into(), MetricsConfig { processes: vec!["no-such-process-xyz".into()], ..Default::default() });
        let _ = s.sample(0);
        std::thread::sleep(Duration::from_millis(200));
        let b = s.sample(2);
        let get = |name: &str| b.metrics.iter().find(|m| m.name == name).map(|m| m.value);
        assert!(get("host.cpu.used_pct").is_some_and(|v| (0.0..=100.0).contains(&v)), "{b:?}");
        assert!(get("host.memory.total_bytes").is_some_and(|v| v > 0.0));
        assert!(b.metrics.iter().any(|m| m.name == "net.rx_bytes_total" && m.labels.get("iface").map(String::as_str) == Some("lo")));
        assert_eq!(get("process.count"), Some(0.0));
        assert_eq!(get("agent.faults.active"), Some(2.0));
        assert_eq!(b.seq, 2);
    }

    /// A sampler that counts what it was asked for.
    struct Counting {
        primed: Arc<AtomicU64>,
        taken: Arc<AtomicU64>,
        /// Dropped with the sampler, when its thread ends.
        _alive: Arc<()>,
    }

    impl Sample for Counting {
        fn prime(&mut self) {
            self.primed.fetch_add(1, Ordering::SeqCst);
        }

        fn sample(&mut self, active_faults: u32) -> pb::MetricBatch {
            let seq = self.taken.fetch_add(1, Ordering::SeqCst) + 1;
            pb::MetricBatch { seq, metrics: vec![metric("agent.faults.active", &[], f64::from(active_faults))], ..Default::default() }
        }
    }

    /// Liveness bound only: every wait here ends on an event, not a clock.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "not within 10 s: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    async fn next(sub: &mut Subscription) -> Arc<pb::MetricBatch> {
        tokio::time::timeout(Duration::from_secs(10), sub.changed()).await.expect("a batch within 10 s").expect("sampler running");
        sub.latest()
    }

    #[tokio::test]
    async fn the_sampler_sleeps_while_nobody_reads_and_samples_fresh_for_a_new_reader() {
        let (primed, taken, alive) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(()));
        let (p, t, a) = (Arc::clone(&primed), Arc::clone(&taken), Arc::clone(&alive));
        let gone = Arc::downgrade(&alive);
        drop(alive);
        let m =
            sample_on_thread("t".into(), Duration::from_millis(100), move || Counting { primed: p, taken: t, _alive: a }, Arc::new(|| 3))
                .expect("thread");
        until("the sampler waits for a reader", || m.is_idle());
        assert_eq!((primed.load(Ordering::SeqCst), taken.load(Ordering::SeqCst)), (0, 0), "nobody subscribed: the host is not read");

        let mut first = m.subscribe();
        let b = next(&mut first).await;
        assert_eq!(b.seq, 1, "the first batch is one taken for this reader, not the empty one from the start");
        assert_eq!(primed.load(Ordering::SeqCst), 1, "its rates cover a span after the reader came");
        assert_eq!(b.metrics[0].value, 3.0);

        // A second reader while sampling gets the current batch at once.
        let mut second = m.subscribe();
        let now = tokio::time::timeout(Duration::ZERO, second.changed()).await;
        assert!(matches!(now, Ok(Ok(()))), "the current batch is ready for a reader who comes while sampling");
        assert!(second.latest().seq >= 1);

        drop((first, second));
        until("the sampler sleeps again once every reader left", || m.is_idle());
        let before = taken.load(Ordering::SeqCst);
        let mut late = m.subscribe();
        let b = next(&mut late).await;
        assert_eq!(b.seq, before + 1, "a reader after an idle spell waits for a new sample, never gets the stale one");
        assert_eq!(primed.load(Ordering::SeqCst), 2, "primed again after the idle spell");

        drop(late);
        drop(m);
        until("the sampler thread ends with its last handle", || gone.strong_count() == 0);
    }
}
