//! Typed, validated fault specs.
//!
//! [`FaultRequest::from_pb`] turns a wire `FaultSpec` into a value the agent
//! can act on, or a [`SpecError`] that names the bad field and its value.
//! A family the host cannot inject is refused later, by the agent, with
//! FAILED_PRECONDITION naming the missing kernel feature. The domain types are serde-serializable because they go into
//! the agent's on-disk journal.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::{
    convert::{duration_from_pb, duration_to_pb},
    edge::quote,
    pb,
};

/// Bandwidth limits accepted (bits per second): 8 kbit/s .. 100 Gbit/s.
pub const MIN_RATE_BPS: u64 = 8_000;
pub const MAX_RATE_BPS: u64 = 100_000_000_000;

/// Longest delay a latency fault may hold packets.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// Highest IO throttle rate, bytes per second (100 GB/s: above any device).
pub const MAX_IO_BYTES_PER_SECOND: u64 = 100_000_000_000;
/// Largest byte count a memory or disk fault may name (1 PiB): above it a
/// size is a mistake, and sums of it could overflow.
pub const MAX_FAULT_BYTES: u64 = 1 << 50;
/// Bounds of an agent's dead-man lease, on both sides of the contract.
pub const MIN_AGENT_LEASE: Duration = Duration::from_millis(300);
pub const MAX_AGENT_LEASE: Duration = Duration::from_secs(3600);
/// Most faults one agent holds at once; more are refused (RESOURCE_EXHAUSTED),
/// and a heartbeat counting more is refused by the coordinator.
pub const MAX_ACTIVE_FAULTS: u32 = 10_000;

/// Longest id a caller may choose.
pub const MAX_ID_LEN: usize = 64;

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A field is missing or out of range.
    #[error("{field} {message}")]
    Invalid { field: String, message: String },
}

impl SpecError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError::Invalid { field: field.into(), message: message.into() }
    }
}

/// Where a fault lands (see `chaos.v1.Target`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetSpec {
    Host,
    Netns(String),
    Pid(u32),
    ProcessName(String),
    CgroupPath(String),
    Container(String),
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::Host => write!(f, "host"),
            TargetSpec::Netns(n) => write!(f, "netns {n}"),
            TargetSpec::Pid(p) => write!(f, "pid {p}"),
            TargetSpec::ProcessName(n) => write!(f, "process name {n}"),
            TargetSpec::CgroupPath(c) => write!(f, "cgroup {c}"),
            TargetSpec::Container(c) => write!(f, "container {c}"),
        }
    }
}

/// A signal, kept by name in the journal so the file is readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SignalName(pub Signal);

impl TryFrom<String> for SignalName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_signal(&s).map(SignalName)
    }
}

impl From<SignalName> for String {
    fn from(s: SignalName) -> String {
        s.0.as_str().to_string()
    }
}

/// Parse `SIGKILL`, `KILL`, `kill` or `9`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("no signal number {n}"));
    }
    let upper = t.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<Signal>().map_err(|_| format!("unknown signal {}", quote(t)))
}

/// Which way packets travel, seen from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Ingress,
    Egress,
    Both,
}

impl Direction {
    pub fn ingress(self) -> bool {
        matches!(self, Direction::Ingress | Direction::Both)
    }
    pub fn egress(self) -> bool {
        matches!(self, Direction::Egress | Direction::Both)
    }
}

/// A peer network: address and prefix length, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{} is not an IP address or CIDR", quote(s)))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{} has a bad prefix length (0..={max})", quote(s)))?
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

/// Transport protocol filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

/// Which packets a network fault touches (see `chaos.v1.NetworkScope`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetScope {
    pub interface: Option<String>,
    /// Empty: any peer.
    pub peers: Vec<Cidr>,
    /// Empty: any port.
    pub ports: Vec<u16>,
    pub protocol: Option<Protocol>,
    pub direction: Direction,
}

/// The fault families this build can inject, with their parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "family")]
pub enum FaultKind {
    /// SIGSTOP now, SIGCONT at revert.
    ProcessPause,
    /// Send a signal once; nothing to undo.
    ProcessKill { signal: SignalName },
    /// Drop every packet in scope.
    NetworkPartition { scope: NetScope },
    /// Drop a share of the packets in scope, in hundredths of a percent
    /// (1050 = 10.5 %). Correlation as asked (it needs sch_netem).
    NetworkLoss { scope: NetScope, permyriad: u32, correlation_permyriad: u32 },
    /// Flip one bit in a share of the packets in scope (1/10000), checksums
    /// left stale, so the receiving stack discards them as real corruption does.
    NetworkCorrupt { scope: NetScope, permyriad: u32 },
    /// Deliver a share of the packets in scope (1/10000) twice.
    NetworkDuplicate { scope: NetScope, permyriad: u32 },
    /// Hold packets in scope for `delay` ± `jitter` (uniform).
    NetworkLatency { scope: NetScope, delay: Duration, jitter: Duration, correlation_permyriad: u32 },
    /// Let `permyriad`/10000 of packets in scope pass at once and hold the
    /// others for `delay`, so later packets overtake earlier ones.
    NetworkReorder { scope: NetScope, permyriad: u32, delay: Duration },
    /// Cap the rate of egress traffic in scope.
    NetworkBandwidth { scope: NetScope, rate_bits_per_second: u64, burst_bytes: u64 },
    /// `workers` threads, each loading `load_permyriad`/100 % of one core.
    CpuStress { workers: u32, load_permyriad: u32 },
    /// The target cgroup's CPU quota, in hundredths of a percent of one
    /// core (5000 = half a core, 25000 = 2.5 cores).
    CpuThrottle { quota_permyriad: u64 },
    /// Allocate, touch and hold memory.
    MemoryStress { size: MemorySize },
    /// The target cgroup's memory limit.
    MemoryLimit { limit_bytes: u64 },
    /// Freeze the target's cgroup.
    CgroupFreeze,
    /// Fill the filesystem holding `path` with a file of the fault's own.
    DiskFill { path: String, amount: FillAmount },
    /// Block IO limits of the target cgroup; 0 leaves that direction alone.
    IoThrottle { read_bytes_per_second: u64, write_bytes_per_second: u64, device: Option<DeviceNumber> },
    /// A Docker container action; `signal` for kill, `stop_grace` for stop
    /// and restart (the default on other verbs, where it does nothing).
    ContainerAction {
        verb: ContainerVerb,
        signal: SignalName,
        /// How long Docker waits after SIGTERM before SIGKILL. Records
        /// written before the field existed read as [`DEFAULT_STOP_GRACE`].
        #[serde(default = "default_stop_grace")]
        stop_grace: Duration,
    },
}

/// How long a container stop or restart waits for the container to exit
/// before SIGKILL when the spec names no `stop_grace`: shorter than
/// Docker's 10 s, so an answer comes within a client's usual deadline.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// The longest `stop_grace` accepted.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(300);

fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

/// How much longer than an ordinary call an ApplyFault of `spec` may take
/// by design: a container stop or restart is answered once the container
/// has exited, up to its grace after SIGTERM. Callers that wait for the
/// answer (the CLI, the coordinator's scenarios) add it to their deadline.
pub fn apply_allowance(spec: &pb::FaultSpec) -> Duration {
    let Some(pb::fault_spec::Fault::ContainerAction(c)) = spec.fault.as_ref() else { return Duration::ZERO };
    match pb::ContainerVerb::try_from(c.verb) {
        Ok(pb::ContainerVerb::Stop) => stop_grace_from_pb(ContainerVerb::Stop, c.stop_grace.as_ref()).unwrap_or(DEFAULT_STOP_GRACE),
        Ok(pb::ContainerVerb::Restart) => stop_grace_from_pb(ContainerVerb::Restart, c.stop_grace.as_ref()).unwrap_or(DEFAULT_STOP_GRACE),
        _ => Duration::ZERO,
    }
}

/// A wire duration as text for an error: `20s`, `1.5s`, `-3s`.
fn pb_duration_text(d: &prost_types::Duration) -> String {
    if d.nanos == 0 {
        return format!("{}s", d.seconds);
    }
    let frac = format!("{:09}", d.nanos.unsigned_abs());
    let sign = if d.seconds == 0 && d.nanos < 0 { "-" } else { "" };
    format!("{sign}{}.{}s", d.seconds, frac.trim_end_matches('0'))
}

/// Check a container action's `stop_grace`: only for stop and restart,
/// whole seconds in 0..=300 ([`MAX_STOP_GRACE`]); unset means
/// [`DEFAULT_STOP_GRACE`]. The error says what is wrong and quotes the
/// value, for the caller to put behind its own field name (the spec's
/// `spec.container_action.stop_grace`, the CLI's `--stop-grace`).
pub fn stop_grace_from_pb(verb: ContainerVerb, grace: Option<&prost_types::Duration>) -> Result<Duration, String> {
    let Some(g) = grace else { return Ok(DEFAULT_STOP_GRACE) };
    if !verb.has_stop_grace() {
        return Err(format!("only applies to stop and restart, got {} for {}", pb_duration_text(g), verb.as_str()));
    }
    let max = MAX_STOP_GRACE.as_secs();
    let whole = duration_from_pb(g).filter(|d| d.subsec_nanos() == 0 && d.as_secs() <= max);
    whole.ok_or_else(|| format!("must be whole seconds in 0..={max}s, got {}", pb_duration_text(g)))
}

/// What a container action does (see `chaos.v1.ContainerVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerVerb {
    Stop,
    Start,
    Restart,
    Pause,
    Unpause,
    Kill,
}

impl ContainerVerb {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerVerb::Stop => "stop",
            ContainerVerb::Start => "start",
            ContainerVerb::Restart => "restart",
            ContainerVerb::Pause => "pause",
            ContainerVerb::Unpause => "unpause",
            ContainerVerb::Kill => "kill",
        }
    }

    /// Every verb, in contract order.
    pub const ALL: [ContainerVerb; 6] = [
        ContainerVerb::Stop,
        ContainerVerb::Pause,
        ContainerVerb::Restart,
        ContainerVerb::Kill,
        ContainerVerb::Start,
        ContainerVerb::Unpause,
    ];

    /// Whether the verb stops a container, so Docker waits out a grace
    /// after SIGTERM (stop, restart).
    pub fn has_stop_grace(self) -> bool {
        matches!(self, ContainerVerb::Stop | ContainerVerb::Restart)
    }

    pub fn to_pb(self) -> pb::ContainerVerb {
        match self {
            ContainerVerb::Stop => pb::ContainerVerb::Stop,
            ContainerVerb::Start => pb::ContainerVerb::Start,
            ContainerVerb::Restart => pb::ContainerVerb::Restart,
            ContainerVerb::Pause => pb::ContainerVerb::Pause,
            ContainerVerb::Unpause => pb::ContainerVerb::Unpause,
            ContainerVerb::Kill => pb::ContainerVerb::Kill,
        }
    }
}

/// How much memory a memory stress holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemorySize {
    Bytes(u64),
    /// Hundredths of a percent of the host's total memory.
    PermyriadOfTotal(u32),
}

/// How full a disk fill makes its filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillAmount {
    Bytes(u64),
    /// The used share to reach, in hundredths of a percent.
    ToPermyriad(u32),
}

/// A block device number, `MAJOR:MINOR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNumber {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl std::str::FromStr for DeviceNumber {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.trim().split_once(':').ok_or_else(|| format!("must be MAJOR:MINOR, got {}", quote(s)))?;
        match (a.parse(), b.parse()) {
            (Ok(major), Ok(minor)) => Ok(DeviceNumber { major, minor }),
            _ => Err(format!("must be MAJOR:MINOR (two numbers), got {}", quote(s))),
        }
    }
}

impl std::str::FromStr for ContainerVerb {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        ContainerVerb::ALL
            .into_iter()
            .find(|v| v.as_str() == t)
            .ok_or_else(|| format!("expected one of {}, got {s:?}", ContainerVerb::ALL.map(ContainerVerb::as_str).join(", ")))
    }
}

/// Smallest memory limit accepted: below it the kernel itself struggles.
pub const MIN_MEMORY_LIMIT_BYTES: u64 = 4 << 20;
/// Most CPU stress workers one fault may start.
pub const MAX_CPU_WORKERS: u32 = 1024;

impl FaultKind {
    /// The family's name as in `FaultSpec`'s oneof.
    pub fn family(&self) -> &'static str {
        match self {
            FaultKind::ProcessPause => "process_pause",
            FaultKind::ProcessKill { .. } => "process_kill",
            FaultKind::NetworkPartition { .. } => "network_partition",
            FaultKind::NetworkLoss { .. } => "network_loss",
            FaultKind::NetworkCorrupt { .. } => "network_corrupt",
            FaultKind::NetworkDuplicate { .. } => "network_duplicate",
            FaultKind::NetworkLatency { .. } => "network_latency",
            FaultKind::NetworkReorder { .. } => "network_reorder",
            FaultKind::NetworkBandwidth { .. } => "network_bandwidth",
            FaultKind::CpuStress { .. } => "cpu_stress",
            FaultKind::CpuThrottle { .. } => "cpu_throttle",
            FaultKind::MemoryStress { .. } => "memory_stress",
            FaultKind::MemoryLimit { .. } => "memory_limit",
            FaultKind::CgroupFreeze => "cgroup_freeze",
            FaultKind::DiskFill { .. } => "disk_fill",
            FaultKind::IoThrottle { .. } => "io_throttle",
            FaultKind::ContainerAction { .. } => "container_action",
        }
    }

    /// The targets this family accepts, for the error when another is given.
    fn targets(&self) -> (&'static [&'static str], fn(&TargetSpec) -> bool) {
        use TargetSpec as T;
        match self {
            FaultKind::ProcessPause | FaultKind::ProcessKill { .. } => (&["pid", "process_name", "cgroup_path (its every process)"], |t| {
                matches!(t, T::Pid(_) | T::ProcessName(_) | T::CgroupPath(_))
            }),
            FaultKind::NetworkPartition { .. }
            | FaultKind::NetworkLoss { .. }
            | FaultKind::NetworkCorrupt { .. }
            | FaultKind::NetworkDuplicate { .. }
            | FaultKind::NetworkLatency { .. }
            | FaultKind::NetworkReorder { .. }
            | FaultKind::NetworkBandwidth { .. } => (&["host", "netns", "pid or container (its network namespace)"], |t| {
                matches!(t, T::Host | T::Netns(_) | T::Pid(_) | T::Container(_))
            }),
            FaultKind::CpuStress { .. } | FaultKind::MemoryStress { .. } => {
                (&["host", "pid", "process_name", "cgroup_path", "container"], |t| {
                    matches!(t, T::Host | T::Pid(_) | T::ProcessName(_) | T::CgroupPath(_) | T::Container(_))
                })
            }
            FaultKind::CpuThrottle { .. } | FaultKind::MemoryLimit { .. } | FaultKind::CgroupFreeze | FaultKind::IoThrottle { .. } => {
                (&["pid", "process_name", "cgroup_path or container (its cgroup)"], |t| {
                    matches!(t, T::Pid(_) | T::ProcessName(_) | T::CgroupPath(_) | T::Container(_))
                })
            }
            FaultKind::DiskFill { .. } => (&["host"], |t| matches!(t, T::Host)),
            FaultKind::ContainerAction { .. } => (&["container"], |t| matches!(t, T::Container(_))),
        }
    }
}

/// Every family in the contract, by its oneof name, in contract order.
pub const ALL_FAMILIES: &[&str] = &[
    "network_partition",
    "network_latency",
    "network_loss",
    "network_corrupt",
    "network_duplicate",
    "network_reorder",
    "network_bandwidth",
    "cpu_stress",
    "memory_stress",
    "disk_fill",
    "io_throttle",
    "process_kill",
    "process_pause",
    "container_action",
    "cpu_throttle",
    "memory_limit",
    "cgroup_freeze",
];

/// The oneof name of a wire fault.
/// A scenario in this state has ended (completed, stopped, aborted, failed).
pub fn scenario_is_final(state: i32) -> bool {
    matches!(
        pb::ScenarioState::try_from(state),
        Ok(pb::ScenarioState::Completed | pb::ScenarioState::Stopped | pb::ScenarioState::Aborted | pb::ScenarioState::Failed)
    )
}

pub fn family_of(f: &pb::fault_spec::Fault) -> &'static str {
    use pb::fault_spec::Fault as F;
    match f {
        F::NetworkPartition(_) => "network_partition",
        F::NetworkLatency(_) => "network_latency",
        F::NetworkLoss(_) => "network_loss",
        F::NetworkCorrupt(_) => "network_corrupt",
        F::NetworkDuplicate(_) => "network_duplicate",
        F::NetworkReorder(_) => "network_reorder",
        F::NetworkBandwidth(_) => "network_bandwidth",
        F::CpuStress(_) => "cpu_stress",
        F::MemoryStress(_) => "memory_stress",
        F::DiskFill(_) => "disk_fill",
        F::IoThrottle(_) => "io_throttle",
        F::ProcessKill(_) => "process_kill",
        F::ProcessPause(_) => "process_pause",
        F::ContainerAction(_) => "container_action",
        F::CpuThrottle(_) => "cpu_throttle",
        F::MemoryLimit(_) => "memory_limit",
        F::CgroupFreeze(_) => "cgroup_freeze",
    }
}

/// Where a wire fault lands, for lists: `host`, `pid 812`, `process java`, `netns lab-kafka`, ...; `-` when unset.
pub fn target_text(target: Option<&pb::Target>) -> String {
    use pb::target::Kind;
    match target.and_then(|t| t.kind.as_ref()) {
        None => "-".into(),
        Some(Kind::Host(_)) => "host".into(),
        Some(Kind::Netns(n)) => format!("netns {n}"),
        Some(Kind::Pid(p)) => format!("pid {p}"),
        Some(Kind::ProcessName(n)) => format!("process {n}"),
        Some(Kind::CgroupPath(c)) => format!("cgroup {c}"),
        Some(Kind::Container(c)) => format!("container {c}"),
    }
}

/// A one-line description of a wire fault for lists and logs, e.g.
/// `network_loss 10% [peers 198.18.0.3/32, ingress] on netns lab-kafka`.
pub fn describe(spec: &pb::FaultSpec) -> String {
    use pb::fault_spec::Fault as F;
    let d = |x: &Option<prost_types::Duration>| x.as_ref().and_then(duration_from_pb).map(|d| format!("{d:?}")).unwrap_or_default();
    let scope = |s: &Option<pb::NetworkScope>| {
        let Some(s) = s else { return String::new() };
        let mut parts = vec![];
        if !s.peer_cidrs.is_empty() {
            parts.push(format!("peers {}", s.peer_cidrs.join(",")));
        }
        if !s.ports.is_empty() {
            parts.push(format!("ports {}", s.ports.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
        }
        for (name, v) in [("proto", &s.protocol), ("dev", &s.interface)] {
            if !v.is_empty() {
                parts.push(format!("{name} {v}"));
            }
        }
        match pb::Direction::try_from(s.direction) {
            Ok(pb::Direction::Egress) => parts.push("egress".into()),
            Ok(pb::Direction::Ingress) => parts.push("ingress".into()),
            _ => {}
        }
        if parts.is_empty() { String::new() } else { format!(" [{}]", parts.join(", ")) }
    };
    let what = match spec.fault.as_ref() {
        None => "no fault".to_string(),
        Some(f) => {
            let fam = family_of(f);
            match f {
                F::NetworkPartition(p) => format!("{fam}{}", scope(&p.scope)),
                F::NetworkLatency(l) => format!("{fam} {} ±{}{}", d(&l.delay), d(&l.jitter), scope(&l.scope)),
                F::NetworkLoss(l) => format!("{fam} {}%{}", l.percent, scope(&l.scope)),
                F::NetworkCorrupt(c) => format!("{fam} {}%{}", c.percent, scope(&c.scope)),
                F::NetworkDuplicate(c) => format!("{fam} {}%{}", c.percent, scope(&c.scope)),
                F::NetworkReorder(r) => format!("{fam} {}% delay {}{}", r.percent, d(&r.delay), scope(&r.scope)),
                F::NetworkBandwidth(b) => format!("{fam} {} bit/s{}", b.rate_bits_per_second, scope(&b.scope)),
                F::CpuStress(c) => format!("{fam} {} worker(s) at {}%", c.workers, c.load_percent),
                F::MemoryStress(m) if m.bytes > 0 => format!("{fam} {} bytes", m.bytes),
                F::MemoryStress(m) => format!("{fam} {}% of total", m.percent_of_total),
                F::DiskFill(x) if x.bytes > 0 => format!("{fam} {} with {} bytes", x.path, x.bytes),
                F::DiskFill(x) => format!("{fam} {} to {}%", x.path, x.fill_to_percent),
                F::CpuThrottle(c) => format!("{fam} to {}% of a core", c.quota_percent),
                F::MemoryLimit(m) => format!("{fam} to {} bytes", m.limit_bytes),
                F::CgroupFreeze(_) => fam.to_string(),
                F::IoThrottle(io) => format!("{fam} read {} B/s write {} B/s", io.read_bytes_per_second, io.write_bytes_per_second),
                F::ProcessKill(k) => format!("{fam} {}", if k.signal.is_empty() { "SIGKILL" } else { &k.signal }),
                F::ProcessPause(_) => fam.to_string(),
                F::ContainerAction(c) => format!(
                    "{fam} {}{}",
                    pb::ContainerVerb::try_from(c.verb)
                        .map(|v| v.as_str_name().trim_start_matches("CONTAINER_VERB_").to_lowercase())
                        .unwrap_or_default(),
                    c.stop_grace.as_ref().map(|g| format!(" (grace {})", pb_duration_text(g))).unwrap_or_default()
                ),
            }
        }
    };
    format!("{what} on {}", target_text(spec.target.as_ref()))
}

/// A validated fault request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRequest {
    /// Caller-chosen id, if any.
    pub id: Option<String>,
    pub target: TargetSpec,
    /// Time to live.
    #[serde(with = "duration_ms")]
    pub duration: Duration,
    pub labels: BTreeMap<String, String>,
    pub kind: FaultKind,
}

impl FaultRequest {
    /// Validate a wire spec. `max_duration` is the agent's ceiling.
    pub fn from_pb(spec: &pb::FaultSpec, max_duration: Duration) -> Result<Self, SpecError> {
        let id = if spec.id.is_empty() {
            None
        } else {
            validate_id(&spec.id)?;
            Some(spec.id.clone())
        };
        let duration = match &spec.duration {
            None => return Err(SpecError::invalid("spec.duration", "is required (the fault's time to live)")),
            Some(d) => duration_from_pb(d)
                .ok_or_else(|| SpecError::invalid("spec.duration", format!("must not be negative, got {}s", d.seconds)))?,
        };
        if duration.is_zero() {
            return Err(SpecError::invalid("spec.duration", "must be > 0, got 0s"));
        }
        if duration > max_duration {
            return Err(SpecError::invalid(
                "spec.duration",
                format!("must be at most {}s (the agent's max_fault_duration), got {}s", max_duration.as_secs(), duration.as_secs()),
            ));
        }
        let target = target_from_pb(spec.target.as_ref())?;
        let fault = spec
            .fault
            .as_ref()
            .ok_or_else(|| SpecError::invalid("spec.fault", format!("is required: set one of {}", ALL_FAMILIES.join(", "))))?;
        let kind = kind_from_pb(fault)?;
        let (names, accepts) = kind.targets();
        if !accepts(&target) {
            let names = match names.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => names.join(""),
            };
            return Err(SpecError::invalid("spec.target", format!("{} needs a {names} target, got {target}", kind.family())));
        }
        let labels = spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok(FaultRequest { id, target, duration, labels, kind })
    }

    /// Back to the wire form (for ListFaults).
    pub fn to_pb(&self, id: &str) -> pb::FaultSpec {
        use pb::target::Kind as K;
        let kind = match &self.target {
            TargetSpec::Host => K::Host(pb::HostTarget {}),
            TargetSpec::Netns(n) => K::Netns(n.clone()),
            TargetSpec::Pid(p) => K::Pid(*p),
            TargetSpec::ProcessName(n) => K::ProcessName(n.clone()),
            TargetSpec::CgroupPath(c) => K::CgroupPath(c.clone()),
            TargetSpec::Container(c) => K::Container(c.clone()),
        };
        let fault = match &self.kind {
            FaultKind::ProcessPause => pb::fault_spec::Fault::ProcessPause(pb::ProcessPause {}),
            FaultKind::ProcessKill { signal } => {
                pb::fault_spec::Fault::ProcessKill(pb::ProcessKill { signal: signal.0.as_str().to_string() })
            }
            FaultKind::NetworkPartition { scope } => {
                pb::fault_spec::Fault::NetworkPartition(pb::NetworkPartition { scope: Some(scope_to_pb(scope)) })
            }
            FaultKind::NetworkLatency { scope, delay, jitter, correlation_permyriad } => {
                pb::fault_spec::Fault::NetworkLatency(pb::NetworkLatency {
                    scope: Some(scope_to_pb(scope)),
                    delay: Some(duration_to_pb(*delay)),
                    jitter: (!jitter.is_zero()).then(|| duration_to_pb(*jitter)),
                    correlation_percent: f64::from(*correlation_permyriad) / 100.0,
                })
            }
            FaultKind::NetworkBandwidth { scope, rate_bits_per_second, burst_bytes } => {
                pb::fault_spec::Fault::NetworkBandwidth(pb::NetworkBandwidth {
                    scope: Some(scope_to_pb(scope)),
                    rate_bits_per_second: *rate_bits_per_second,
                    burst_bytes: *burst_bytes,
                })
            }
            FaultKind::NetworkReorder { scope, permyriad, delay } => pb::fault_spec::Fault::NetworkReorder(pb::NetworkReorder {
                scope: Some(scope_to_pb(scope)),
                percent: f64::from(*permyriad) / 100.0,
                delay: Some(duration_to_pb(*delay)),
            }),
            FaultKind::NetworkCorrupt { scope, permyriad } => pb::fault_spec::Fault::NetworkCorrupt(pb::NetworkCorrupt {
                scope: Some(scope_to_pb(scope)),
                percent: f64::from(*permyriad) / 100.0,
            }),
            FaultKind::NetworkDuplicate { scope, permyriad } => pb::fault_spec::Fault::NetworkDuplicate(pb::NetworkDuplicate {
                scope: Some(scope_to_pb(scope)),
                percent: f64::from(*permyriad) / 100.0,
            }),
            FaultKind::NetworkLoss { scope, permyriad, correlation_permyriad } => pb::fault_spec::Fault::NetworkLoss(pb::NetworkLoss {
                scope: Some(scope_to_pb(scope)),
                percent: f64::from(*permyriad) / 100.0,
                correlation_percent: f64::from(*correlation_permyriad) / 100.0,
            }),
            FaultKind::CpuStress { workers, load_permyriad } => {
                pb::fault_spec::Fault::CpuStress(pb::CpuStress { workers: *workers, load_percent: f64::from(*load_permyriad) / 100.0 })
            }
            FaultKind::CpuThrottle { quota_permyriad } => {
                pb::fault_spec::Fault::CpuThrottle(pb::CpuThrottle { quota_percent: *quota_permyriad as f64 / 100.0 })
            }
            FaultKind::MemoryStress { size } => pb::fault_spec::Fault::MemoryStress(match size {
                MemorySize::Bytes(b) => pb::MemoryStress { bytes: *b, percent_of_total: 0.0 },
                MemorySize::PermyriadOfTotal(p) => pb::MemoryStress { bytes: 0, percent_of_total: f64::from(*p) / 100.0 },
            }),
            FaultKind::MemoryLimit { limit_bytes } => pb::fault_spec::Fault::MemoryLimit(pb::MemoryLimit { limit_bytes: *limit_bytes }),
            FaultKind::CgroupFreeze => pb::fault_spec::Fault::CgroupFreeze(pb::CgroupFreeze {}),
            FaultKind::DiskFill { path, amount } => pb::fault_spec::Fault::DiskFill(match amount {
                FillAmount::Bytes(b) => pb::DiskFill { path: path.clone(), bytes: *b, fill_to_percent: 0.0 },
                FillAmount::ToPermyriad(p) => pb::DiskFill { path: path.clone(), bytes: 0, fill_to_percent: f64::from(*p) / 100.0 },
            }),
            FaultKind::ContainerAction { verb, signal, stop_grace } => pb::fault_spec::Fault::ContainerAction(pb::ContainerAction {
                verb: verb.to_pb() as i32,
                signal: if *verb == ContainerVerb::Kill { signal.0.as_str().to_string() } else { String::new() },
                // Shown where it acts, so ListFaults says the grace in effect.
                stop_grace: verb.has_stop_grace().then(|| duration_to_pb(*stop_grace)),
            }),
            FaultKind::IoThrottle { read_bytes_per_second, write_bytes_per_second, device } => {
                pb::fault_spec::Fault::IoThrottle(pb::IoThrottle {
                    read_bytes_per_second: *read_bytes_per_second,
                    write_bytes_per_second: *write_bytes_per_second,
                    device: device.map(|d| d.to_string()).unwrap_or_default(),
                })
            }
        };
        pb::FaultSpec {
            id: id.to_string(),
            target: Some(pb::Target { kind: Some(kind) }),
            duration: Some(duration_to_pb(self.duration)),
            labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            fault: Some(fault),
        }
    }
}

fn validate_id(id: &str) -> Result<(), SpecError> {
    validate_name("spec.id", id, MAX_ID_LEN)
}

/// Longest agent id (a fully qualified host name may be one).
pub const MAX_AGENT_ID_LEN: usize = 253;

/// A name made of letters, digits, '-', '_' and '.', not starting with
/// '.', of 1..=`max` characters: ids of faults and agents, safe in a path,
/// a log line, an nft table name and a URL.
pub fn validate_name(field: &str, id: &str, max: usize) -> Result<(), SpecError> {
    if id.is_empty() {
        return Err(SpecError::invalid(field, "must not be empty"));
    }
    if id.len() > max {
        return Err(SpecError::invalid(field, format!("must be at most {max} characters, got {}: {}", id.len(), quote(id))));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(SpecError::invalid(
            field,
            format!("may hold only letters, digits, '-', '_' and '.', got {} (bad character {c:?})", quote(id)),
        ));
    }
    if id.starts_with('.') {
        return Err(SpecError::invalid(field, format!("must not start with '.', got {}", quote(id))));
    }
    Ok(())
}

/// A bare name of a namespace under `/run/netns` (no path).
pub fn is_netns_name(n: &str) -> bool {
    !(n.is_empty() || n.contains('/') || n == "." || n == "..")
}

fn target_from_pb(t: Option<&pb::Target>) -> Result<TargetSpec, SpecError> {
    use pb::target::Kind as K;
    let kind = t.and_then(|t| t.kind.as_ref()).ok_or_else(|| {
        SpecError::invalid("spec.target", "is required: set one of host, netns, pid, process_name, cgroup_path, container")
    })?;
    Ok(match kind {
        K::Host(_) => TargetSpec::Host,
        K::Netns(n) => {
            if !is_netns_name(n) {
                return Err(SpecError::invalid(
                    "spec.target.netns",
                    format!("must be a namespace name under /run/netns, got {}", quote(n)),
                ));
            }
            TargetSpec::Netns(n.clone())
        }
        K::Pid(0) => return Err(SpecError::invalid("spec.target.pid", "must be > 0, got 0")),
        K::Pid(p) => TargetSpec::Pid(*p),
        K::ProcessName(n) => {
            if n.is_empty() || n.contains('/') || n.contains('\0') {
                return Err(SpecError::invalid(
                    "spec.target.process_name",
                    format!("must be a bare process name (no '/'), got {}", quote(n)),
                ));
            }
            TargetSpec::ProcessName(n.clone())
        }
        K::CgroupPath(c) => {
            if c.split('/').any(|seg| seg == "..") {
                return Err(SpecError::invalid("spec.target.cgroup_path", format!("must not contain '..', got {}", quote(c))));
            }
            TargetSpec::CgroupPath(c.trim_start_matches('/').to_string())
        }
        K::Container(c) => {
            if c.is_empty() {
                return Err(SpecError::invalid("spec.target.container", "must not be empty"));
            }
            TargetSpec::Container(c.clone())
        }
    })
}

/// A mandatory delay in (0, MAX_DELAY].
fn delay_field(d: Option<&prost_types::Duration>, field: &str) -> Result<Duration, SpecError> {
    let delay = match d.map(|d| (d, duration_from_pb(d))) {
        None => return Err(SpecError::invalid(field, "is required")),
        Some((d, None)) => return Err(SpecError::invalid(field, format!("must not be negative, got {}s", d.seconds))),
        Some((_, Some(d))) => d,
    };
    if delay.is_zero() || delay > MAX_DELAY {
        return Err(SpecError::invalid(field, format!("must be in (0, {}ms], got {}ms", MAX_DELAY.as_millis(), delay.as_millis())));
    }
    Ok(delay)
}

/// A percentage as hundredths of a percent; `zero_ok` for optional ones.
fn percent_field(v: f64, field: &str, zero_ok: bool) -> Result<u32, SpecError> {
    let lo_ok = if zero_ok { v >= 0.0 } else { v > 0.0 };
    if !v.is_finite() || !lo_ok || v > 100.0 {
        let range = if zero_ok { "0..=100" } else { "(0, 100]" };
        return Err(SpecError::invalid(field, format!("must be in {range}, got {v}")));
    }
    // Bounded by the check above: 0..=10000.
    let permyriad = (v * 100.0).round() as u32;
    if permyriad == 0 && v != 0.0 {
        // 0.001 would be taken as 0: a fault that does nothing, or an option silently off.
        return Err(SpecError::invalid(field, format!("must be at least 0.01 (the resolution is a hundredth of a percent), got {v}")));
    }
    Ok(permyriad)
}

/// A byte count of at most [`MAX_FAULT_BYTES`].
fn bytes_field(v: u64, field: &str) -> Result<u64, SpecError> {
    if v > MAX_FAULT_BYTES {
        return Err(SpecError::invalid(field, format!("must be at most {MAX_FAULT_BYTES} (1 PiB), got {v}")));
    }
    Ok(v)
}

fn scope_to_pb(s: &NetScope) -> pb::NetworkScope {
    pb::NetworkScope {
        interface: s.interface.clone().unwrap_or_default(),
        peer_cidrs: s.peers.iter().map(ToString::to_string).collect(),
        ports: s.ports.iter().map(|p| u32::from(*p)).collect(),
        protocol: match s.protocol {
            None => String::new(),
            Some(Protocol::Tcp) => "tcp".into(),
            Some(Protocol::Udp) => "udp".into(),
            Some(Protocol::Icmp) => "icmp".into(),
        },
        direction: match s.direction {
            Direction::Ingress => pb::Direction::Ingress,
            Direction::Egress => pb::Direction::Egress,
            Direction::Both => pb::Direction::Both,
        } as i32,
    }
}

/// Validate a wire scope; `field` is the scope's path for error messages.
fn scope_from_pb(s: Option<&pb::NetworkScope>, field: &str) -> Result<NetScope, SpecError> {
    let default = pb::NetworkScope::default();
    let s = s.unwrap_or(&default);
    let interface = if s.interface.is_empty() {
        None
    } else if s.interface.len() > 15 || s.interface.contains(['/', ' ', '"', '\'']) {
        return Err(SpecError::invalid(
            format!("{field}.interface"),
            format!("must be an interface name (at most 15 characters), got {}", quote(&s.interface)),
        ));
    } else {
        Some(s.interface.clone())
    };
    let peers = s
        .peer_cidrs
        .iter()
        .map(|c| c.parse::<Cidr>().map_err(|e| SpecError::invalid(format!("{field}.peer_cidrs"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = s
        .ports
        .iter()
        .map(|p| {
            u16::try_from(*p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| SpecError::invalid(format!("{field}.ports"), format!("must be in 1..=65535, got {p}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match s.protocol.to_ascii_lowercase().as_str() {
        "" => None,
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "icmp" => Some(Protocol::Icmp),
        other => {
            return Err(SpecError::invalid(format!("{field}.protocol"), format!("must be tcp, udp, icmp or empty, got {}", quote(other))));
        }
    };
    if !ports.is_empty() && protocol == Some(Protocol::Icmp) {
        return Err(SpecError::invalid(format!("{field}.ports"), "cannot be combined with protocol icmp"));
    }
    let direction = match pb::Direction::try_from(s.direction) {
        Ok(pb::Direction::Unspecified | pb::Direction::Both) => Direction::Both,
        Ok(pb::Direction::Ingress) => Direction::Ingress,
        Ok(pb::Direction::Egress) => Direction::Egress,
        Err(_) => return Err(SpecError::invalid(format!("{field}.direction"), format!("unknown value {}", s.direction))),
    };
    Ok(NetScope { interface, peers, ports, protocol, direction })
}

fn kind_from_pb(f: &pb::fault_spec::Fault) -> Result<FaultKind, SpecError> {
    use pb::fault_spec::Fault as F;
    match f {
        F::ProcessPause(_) => Ok(FaultKind::ProcessPause),
        F::ProcessKill(k) => {
            let signal = if k.signal.trim().is_empty() {
                Signal::SIGKILL
            } else {
                parse_signal(&k.signal).map_err(|e| SpecError::invalid("spec.process_kill.signal", e))?
            };
            if matches!(signal, Signal::SIGSTOP | Signal::SIGCONT) {
                return Err(SpecError::invalid(
                    "spec.process_kill.signal",
                    format!("must not be {} (use process_pause, which reverts)", signal.as_str()),
                ));
            }
            Ok(FaultKind::ProcessKill { signal: SignalName(signal) })
        }
        F::NetworkBandwidth(b) => {
            let field = "spec.network_bandwidth";
            if !(MIN_RATE_BPS..=MAX_RATE_BPS).contains(&b.rate_bits_per_second) {
                return Err(SpecError::invalid(
                    format!("{field}.rate_bits_per_second"),
                    format!("must be in {MIN_RATE_BPS}..={MAX_RATE_BPS}, got {}", b.rate_bits_per_second),
                ));
            }
            if b.burst_bytes > 64 * 1024 * 1024 {
                return Err(SpecError::invalid(format!("{field}.burst_bytes"), format!("must be at most 64 MiB, got {}", b.burst_bytes)));
            }
            let mut scope = scope_from_pb(b.scope.as_ref(), &format!("{field}.scope"))?;
            // Unset means egress here (a rate cap is usually on what a host sends);
            // ingress and both shape through an ifb.
            if b.scope.as_ref().is_none_or(|s| s.direction == pb::Direction::Unspecified as i32) {
                scope.direction = Direction::Egress;
            }
            Ok(FaultKind::NetworkBandwidth { scope, rate_bits_per_second: b.rate_bits_per_second, burst_bytes: b.burst_bytes })
        }
        F::NetworkReorder(r) => Ok(FaultKind::NetworkReorder {
            scope: scope_from_pb(r.scope.as_ref(), "spec.network_reorder.scope")?,
            permyriad: percent_field(r.percent, "spec.network_reorder.percent", false)?,
            delay: delay_field(r.delay.as_ref(), "spec.network_reorder.delay")?,
        }),
        F::NetworkLatency(l) => {
            let field = "spec.network_latency";
            let delay = delay_field(l.delay.as_ref(), &format!("{field}.delay"))?;
            let jitter = match l.jitter.as_ref() {
                None => Duration::ZERO,
                Some(j) => duration_from_pb(j)
                    .ok_or_else(|| SpecError::invalid(format!("{field}.jitter"), format!("must not be negative, got {}s", j.seconds)))?,
            };
            if jitter > delay {
                return Err(SpecError::invalid(
                    format!("{field}.jitter"),
                    format!("must not exceed the delay ({}ms), got {}ms", delay.as_millis(), jitter.as_millis()),
                ));
            }
            let correlation_permyriad = percent_field(l.correlation_percent, &format!("{field}.correlation_percent"), true)?;
            if correlation_permyriad > 0 && jitter.is_zero() {
                return Err(SpecError::invalid(
                    format!("{field}.correlation_percent"),
                    format!(
                        "correlates each packet's jitter with the previous one's, so it needs a jitter; got {}% with none",
                        l.correlation_percent
                    ),
                ));
            }
            Ok(FaultKind::NetworkLatency {
                scope: scope_from_pb(l.scope.as_ref(), &format!("{field}.scope"))?,
                delay,
                jitter,
                correlation_permyriad,
            })
        }
        F::NetworkLoss(l) => Ok(FaultKind::NetworkLoss {
            scope: scope_from_pb(l.scope.as_ref(), "spec.network_loss.scope")?,
            permyriad: percent_field(l.percent, "spec.network_loss.percent", false)?,
            correlation_permyriad: percent_field(l.correlation_percent, "spec.network_loss.correlation_percent", true)?,
        }),
        F::NetworkCorrupt(c) => Ok(FaultKind::NetworkCorrupt {
            scope: scope_from_pb(c.scope.as_ref(), "spec.network_corrupt.scope")?,
            permyriad: percent_field(c.percent, "spec.network_corrupt.percent", false)?,
        }),
        F::NetworkDuplicate(c) => Ok(FaultKind::NetworkDuplicate {
            scope: scope_from_pb(c.scope.as_ref(), "spec.network_duplicate.scope")?,
            permyriad: percent_field(c.percent, "spec.network_duplicate.percent", false)?,
        }),
        F::NetworkPartition(p) => {
            Ok(FaultKind::NetworkPartition { scope: scope_from_pb(p.scope.as_ref(), "spec.network_partition.scope")? })
        }
        F::CpuStress(c) => {
            if !(1..=MAX_CPU_WORKERS).contains(&c.workers) {
                return Err(SpecError::invalid("spec.cpu_stress.workers", format!("must be in 1..={MAX_CPU_WORKERS}, got {}", c.workers)));
            }
            Ok(FaultKind::CpuStress {
                workers: c.workers,
                load_permyriad: percent_field(c.load_percent, "spec.cpu_stress.load_percent", false)?,
            })
        }
        F::CpuThrottle(c) => {
            let v = c.quota_percent;
            // The upper bound is the host's core count, checked by the agent.
            if !v.is_finite() || !(1.0..=100_000.0).contains(&v) {
                return Err(SpecError::invalid(
                    "spec.cpu_throttle.quota_percent",
                    format!("must be at least 1 (percent of one core), got {v}"),
                ));
            }
            Ok(FaultKind::CpuThrottle { quota_permyriad: (v * 100.0).round() as u64 })
        }
        F::MemoryStress(m) => {
            let field = "spec.memory_stress";
            let size = match (m.bytes, m.percent_of_total) {
                (0, 0.0) => return Err(SpecError::invalid(field, "needs bytes or percent_of_total, got neither")),
                (b, p) if b > 0 && p != 0.0 => {
                    return Err(SpecError::invalid(field, format!("takes bytes or percent_of_total, not both (got {b} and {p})")));
                }
                (b, _) if b > 0 => MemorySize::Bytes(bytes_field(b, &format!("{field}.bytes"))?),
                (_, p) => {
                    if !p.is_finite() || p <= 0.0 || p >= 100.0 {
                        return Err(SpecError::invalid(format!("{field}.percent_of_total"), format!("must be in (0, 100), got {p}")));
                    }
                    MemorySize::PermyriadOfTotal(percent_field(p, &format!("{field}.percent_of_total"), false)?)
                }
            };
            Ok(FaultKind::MemoryStress { size })
        }
        F::MemoryLimit(m) => {
            bytes_field(m.limit_bytes, "spec.memory_limit.limit_bytes")?;
            if m.limit_bytes < MIN_MEMORY_LIMIT_BYTES {
                return Err(SpecError::invalid(
                    "spec.memory_limit.limit_bytes",
                    format!("must be at least {MIN_MEMORY_LIMIT_BYTES} (4 MiB), got {}", m.limit_bytes),
                ));
            }
            Ok(FaultKind::MemoryLimit { limit_bytes: m.limit_bytes })
        }
        F::CgroupFreeze(_) => Ok(FaultKind::CgroupFreeze),
        F::DiskFill(d) => {
            let field = "spec.disk_fill";
            if !d.path.starts_with('/') || d.path.contains('\0') || d.path.split('/').any(|s| s == "..") {
                return Err(SpecError::invalid(
                    format!("{field}.path"),
                    format!("must be an absolute path without '..', got {}", quote(&d.path)),
                ));
            }
            let amount = match (d.bytes, d.fill_to_percent) {
                (0, 0.0) => return Err(SpecError::invalid(field, "needs bytes or fill_to_percent, got neither")),
                (b, p) if b > 0 && p != 0.0 => {
                    return Err(SpecError::invalid(field, format!("takes bytes or fill_to_percent, not both (got {b} and {p})")));
                }
                (b, _) if b > 0 => FillAmount::Bytes(bytes_field(b, &format!("{field}.bytes"))?),
                (_, p) => FillAmount::ToPermyriad(percent_field(p, &format!("{field}.fill_to_percent"), false)?),
            };
            Ok(FaultKind::DiskFill { path: d.path.clone(), amount })
        }
        F::IoThrottle(io) => {
            let field = "spec.io_throttle";
            if io.read_bytes_per_second == 0 && io.write_bytes_per_second == 0 {
                return Err(SpecError::invalid(field, "needs read_bytes_per_second or write_bytes_per_second (> 0)"));
            }
            for (name, v) in [("read_bytes_per_second", io.read_bytes_per_second), ("write_bytes_per_second", io.write_bytes_per_second)] {
                // The kernel reads u64::MAX as "no limit": a throttle that throttles nothing.
                if v > MAX_IO_BYTES_PER_SECOND {
                    return Err(SpecError::invalid(
                        format!("{field}.{name}"),
                        format!("must be at most {MAX_IO_BYTES_PER_SECOND} (100 GB/s), got {v}"),
                    ));
                }
            }
            let device = if io.device.trim().is_empty() {
                None
            } else {
                Some(io.device.parse::<DeviceNumber>().map_err(|e| SpecError::invalid(format!("{field}.device"), e))?)
            };
            Ok(FaultKind::IoThrottle {
                read_bytes_per_second: io.read_bytes_per_second,
                write_bytes_per_second: io.write_bytes_per_second,
                device,
            })
        }
        F::ContainerAction(c) => {
            let verb = match pb::ContainerVerb::try_from(c.verb) {
                Ok(pb::ContainerVerb::Stop) => ContainerVerb::Stop,
                Ok(pb::ContainerVerb::Start) => ContainerVerb::Start,
                Ok(pb::ContainerVerb::Restart) => ContainerVerb::Restart,
                Ok(pb::ContainerVerb::Pause) => ContainerVerb::Pause,
                Ok(pb::ContainerVerb::Unpause) => ContainerVerb::Unpause,
                Ok(pb::ContainerVerb::Kill) => ContainerVerb::Kill,
                _ => {
                    return Err(SpecError::invalid(
                        "spec.container_action.verb",
                        format!("must be one of stop, start, restart, pause, unpause, kill, got {}", c.verb),
                    ));
                }
            };
            let signal = if c.signal.trim().is_empty() {
                Signal::SIGKILL
            } else if verb != ContainerVerb::Kill {
                return Err(SpecError::invalid(
                    "spec.container_action.signal",
                    format!("only applies to kill, got {:?} for {}", c.signal, verb.as_str()),
                ));
            } else {
                parse_signal(&c.signal).map_err(|e| SpecError::invalid("spec.container_action.signal", e))?
            };
            let stop_grace =
                stop_grace_from_pb(verb, c.stop_grace.as_ref()).map_err(|e| SpecError::invalid("spec.container_action.stop_grace", e))?;
            Ok(FaultKind::ContainerAction { verb, signal: SignalName(signal), stop_grace })
        }
    }
}

/// Serialize a `Duration` as integer milliseconds.
mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(3600);

    fn pause_pid(pid: u32, secs: i64) -> pb::FaultSpec {
        pb::FaultSpec {
            id: String::new(),
            target: Some(pb::Target { kind: Some(pb::target::Kind::Pid(pid)) }),
            duration: Some(prost_types::Duration { seconds: secs, nanos: 0 }),
            labels: Default::default(),
            fault: Some(pb::fault_spec::Fault::ProcessPause(pb::ProcessPause {})),
        }
    }

    fn field_of(e: SpecError) -> String {
        match e {
            SpecError::Invalid { field, .. } => field,
        }
    }

    #[test]
    fn valid_pause_round_trips() {
        let spec = pause_pid(42, 30);
        let r = FaultRequest::from_pb(&spec, MAX).expect("valid");
        assert_eq!(r.target, TargetSpec::Pid(42));
        assert_eq!(r.duration, Duration::from_secs(30));
        assert_eq!(r.to_pb("x").target, spec.target);
    }

    #[test]
    fn duration_is_mandatory_positive_and_capped() {
        let mut s = pause_pid(42, 0);
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.duration");
        s.duration = None;
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.duration");
        s.duration = Some(prost_types::Duration { seconds: -5, nanos: 0 });
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.duration");
        let e = FaultRequest::from_pb(&pause_pid(42, 7200), MAX).expect_err("must be refused");
        assert!(e.to_string().contains("at most 3600s"), "{e}");
        assert!(e.to_string().contains("7200"), "{e}");
    }

    #[test]
    fn bad_fields_are_named_with_value() {
        let e = FaultRequest::from_pb(&pause_pid(0, 5), MAX).expect_err("must be refused");
        assert_eq!(e.to_string(), "spec.target.pid must be > 0, got 0");
        let mut s = pause_pid(1, 5);
        s.id = "../etc".into();
        let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
        assert_eq!(field_of(e.clone()), "spec.id");
        assert!(e.to_string().contains("../etc"));
        s.id = "ok-id_1.2".into();
        assert!(FaultRequest::from_pb(&s, MAX).is_ok());
        s.fault = Some(pb::fault_spec::Fault::ProcessKill(pb::ProcessKill { signal: "SIGBOGUS".into() }));
        let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
        assert_eq!(field_of(e.clone()), "spec.process_kill.signal");
        assert!(e.to_string().contains("SIGBOGUS"));
        s.fault = Some(pb::fault_spec::Fault::ProcessKill(pb::ProcessKill { signal: "STOP".into() }));
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.process_kill.signal");
        s.fault = None;
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.fault");
        s.target = None;
        s.fault = Some(pb::fault_spec::Fault::ProcessPause(pb::ProcessPause {}));
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.target");
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::ProcessName("a/b".into())) });
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.target.process_name");
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::Host(pb::HostTarget {})) });
        let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
        assert_eq!(field_of(e.clone()), "spec.target");
        assert!(e.to_string().contains("process_pause needs a pid, process_name or cgroup_path"), "{e}");
    }

    #[test]
    fn resource_faults_validate_and_round_trip() {
        use pb::fault_spec::Fault as F;
        let with = |target: pb::target::Kind, f: F| pb::FaultSpec {
            target: Some(pb::Target { kind: Some(target) }),
            fault: Some(f),
            ..pause_pid(1, 5)
        };
        let host = || pb::target::Kind::Host(pb::HostTarget {});
        let cg = || pb::target::Kind::CgroupPath("/chaos-test".into());
        let good = [
            with(host(), F::CpuStress(pb::CpuStress { workers: 2, load_percent: 50.0 })),
            with(cg(), F::CpuThrottle(pb::CpuThrottle { quota_percent: 250.0 })),
            with(host(), F::MemoryStress(pb::MemoryStress { bytes: 1 << 20, percent_of_total: 0.0 })),
            with(cg(), F::MemoryStress(pb::MemoryStress { bytes: 0, percent_of_total: 12.5 })),
            with(cg(), F::MemoryLimit(pb::MemoryLimit { limit_bytes: 64 << 20 })),
            with(cg(), F::CgroupFreeze(pb::CgroupFreeze {})),
            with(host(), F::DiskFill(pb::DiskFill { path: "/var/tmp".into(), bytes: 0, fill_to_percent: 90.0 })),
            with(cg(), F::IoThrottle(pb::IoThrottle { read_bytes_per_second: 0, write_bytes_per_second: 1 << 20, device: "254:0".into() })),
        ];
        for s in &good {
            let r = FaultRequest::from_pb(s, MAX).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert_eq!(FaultRequest::from_pb(&r.to_pb(""), MAX).expect("round trip"), r);
        }
        assert!(matches!(FaultRequest::from_pb(&good[3], MAX).expect("ok").target, TargetSpec::CgroupPath(ref c) if c == "chaos-test"));
        let bad = [
            (with(host(), F::CpuStress(pb::CpuStress { workers: 1, load_percent: 150.0 })), "spec.cpu_stress.load_percent", "150"),
            (with(host(), F::CpuStress(pb::CpuStress { workers: 0, load_percent: 50.0 })), "spec.cpu_stress.workers", "got 0"),
            (with(cg(), F::CpuThrottle(pb::CpuThrottle { quota_percent: 0.5 })), "spec.cpu_throttle.quota_percent", "0.5"),
            (
                with(host(), F::CpuThrottle(pb::CpuThrottle { quota_percent: 50.0 })),
                "spec.target",
                "cpu_throttle needs a pid, process_name or cgroup_path",
            ),
            (with(host(), F::MemoryStress(pb::MemoryStress { bytes: 5, percent_of_total: 5.0 })), "spec.memory_stress", "not both"),
            (with(host(), F::MemoryStress(pb::MemoryStress::default())), "spec.memory_stress", "neither"),
            (
                with(host(), F::MemoryStress(pb::MemoryStress { bytes: 0, percent_of_total: 100.0 })),
                "spec.memory_stress.percent_of_total",
                "100",
            ),
            (with(cg(), F::MemoryLimit(pb::MemoryLimit { limit_bytes: 1000 })), "spec.memory_limit.limit_bytes", "got 1000"),
            (
                with(host(), F::DiskFill(pb::DiskFill { path: "/x".into(), bytes: 0, fill_to_percent: 101.0 })),
                "spec.disk_fill.fill_to_percent",
                "101",
            ),
            (
                with(host(), F::DiskFill(pb::DiskFill { path: "rel".into(), bytes: 1, fill_to_percent: 0.0 })),
                "spec.disk_fill.path",
                "\"rel\"",
            ),
            (
                with(cg(), F::DiskFill(pb::DiskFill { path: "/x".into(), bytes: 1, fill_to_percent: 0.0 })),
                "spec.target",
                "disk_fill needs a host",
            ),
            (with(cg(), F::IoThrottle(pb::IoThrottle::default())), "spec.io_throttle", "read_bytes_per_second"),
            (
                with(cg(), F::IoThrottle(pb::IoThrottle { read_bytes_per_second: 1, write_bytes_per_second: 0, device: "sda".into() })),
                "spec.io_throttle.device",
                "sda",
            ),
        ];
        for (s, field, text) in bad {
            let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
            assert!(e.to_string().contains(text), "{field}: {e}");
            assert_eq!(field_of(e), field);
        }
    }

    #[test]
    fn corrupt_and_duplicate_take_a_share_of_packets() {
        let mut s = pause_pid(5, 5);
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::Netns("lab-a".into())) });
        s.fault = Some(pb::fault_spec::Fault::NetworkCorrupt(pb::NetworkCorrupt { percent: 2.5, ..Default::default() }));
        let r = FaultRequest::from_pb(&s, MAX).expect("corrupt");
        assert!(matches!(r.kind, FaultKind::NetworkCorrupt { permyriad: 250, .. }), "{:?}", r.kind);
        assert_eq!(FaultRequest::from_pb(&r.to_pb("c"), MAX).expect("round trip").kind, r.kind);
        s.fault = Some(pb::fault_spec::Fault::NetworkDuplicate(pb::NetworkDuplicate { percent: 0.0, ..Default::default() }));
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("zero")), "spec.network_duplicate.percent");
        s.fault = Some(pb::fault_spec::Fault::NetworkDuplicate(pb::NetworkDuplicate { percent: 100.0, ..Default::default() }));
        assert!(matches!(FaultRequest::from_pb(&s, MAX).expect("dup").kind, FaultKind::NetworkDuplicate { permyriad: 10_000, .. }));
    }

    #[test]
    fn partition_scope_is_validated_field_by_field() {
        let mut s = pause_pid(5, 5);
        let scope = |peers: &[&str], ports: &[u32], proto: &str| pb::NetworkScope {
            peer_cidrs: peers.iter().map(|p| p.to_string()).collect(),
            ports: ports.to_vec(),
            protocol: proto.into(),
            ..Default::default()
        };
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::Netns("lab-a".into())) });
        s.fault = Some(pb::fault_spec::Fault::NetworkPartition(pb::NetworkPartition {
            scope: Some(scope(&["198.18.0.3", "198.18.1.0/24"], &[9092], "tcp")),
        }));
        let r = FaultRequest::from_pb(&s, MAX).expect("valid");
        let FaultKind::NetworkPartition { scope: sc } = &r.kind else { panic!("kind") };
        assert_eq!(sc.peers[0].to_string(), "198.18.0.3/32");
        assert_eq!(sc.direction, Direction::Both);
        assert_eq!(FaultRequest::from_pb(&r.to_pb(""), MAX).expect("round trip"), r);
        for (bad, field, value) in [
            (scope(&["198.18.0.300"], &[], ""), "spec.network_partition.scope.peer_cidrs", "198.18.0.300"),
            (scope(&["198.18.0.0/33"], &[], ""), "spec.network_partition.scope.peer_cidrs", "198.18.0.0/33"),
            (scope(&[], &[70000], ""), "spec.network_partition.scope.ports", "70000"),
            (scope(&[], &[], "sctp"), "spec.network_partition.scope.protocol", "sctp"),
        ] {
            s.fault = Some(pb::fault_spec::Fault::NetworkPartition(pb::NetworkPartition { scope: Some(bad) }));
            let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
            assert_eq!(field_of(e.clone()), field, "{e}");
            assert!(e.to_string().contains(value), "{e}");
        }
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::ProcessName("java".into())) });
        s.fault = Some(pb::fault_spec::Fault::NetworkPartition(pb::NetworkPartition::default()));
        assert!(FaultRequest::from_pb(&s, MAX).expect_err("target").to_string().contains("network namespace"));
    }

    #[test]
    fn loss_percent_is_bounded_and_kept_to_a_hundredth() {
        let mut s = pause_pid(5, 5);
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::Host(pb::HostTarget {})) });
        s.fault = Some(pb::fault_spec::Fault::NetworkLoss(pb::NetworkLoss { percent: 10.5, ..Default::default() }));
        let r = FaultRequest::from_pb(&s, MAX).expect("valid");
        assert!(matches!(r.kind, FaultKind::NetworkLoss { permyriad: 1050, correlation_permyriad: 0, .. }), "{:?}", r.kind);
        // 5e-324 and 0.004 would round to 0: a loss fault that drops nothing.
        for bad in [0.0, -1.0, 140.0, f64::NAN, 5e-324, 0.004] {
            s.fault = Some(pb::fault_spec::Fault::NetworkLoss(pb::NetworkLoss { percent: bad, ..Default::default() }));
            let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
            assert_eq!(field_of(e.clone()), "spec.network_loss.percent", "{bad}: {e}");
        }
        s.fault =
            Some(pb::fault_spec::Fault::NetworkLoss(pb::NetworkLoss { percent: 5.0, correlation_percent: 120.0, ..Default::default() }));
        let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
        assert_eq!(field_of(e), "spec.network_loss.correlation_percent");
    }

    #[test]
    fn sizes_and_rates_at_the_edge_of_u64_are_refused_by_name() {
        let mut s = pause_pid(5, 5);
        let cases: Vec<(pb::fault_spec::Fault, &str)> = vec![
            (
                pb::fault_spec::Fault::IoThrottle(pb::IoThrottle { read_bytes_per_second: u64::MAX, ..Default::default() }),
                "spec.io_throttle.read_bytes_per_second",
            ),
            (
                pb::fault_spec::Fault::IoThrottle(pb::IoThrottle {
                    read_bytes_per_second: 1,
                    write_bytes_per_second: MAX_IO_BYTES_PER_SECOND + 1,
                    ..Default::default()
                }),
                "spec.io_throttle.write_bytes_per_second",
            ),
            (pb::fault_spec::Fault::MemoryLimit(pb::MemoryLimit { limit_bytes: u64::MAX }), "spec.memory_limit.limit_bytes"),
            (pb::fault_spec::Fault::MemoryStress(pb::MemoryStress { bytes: u64::MAX, ..Default::default() }), "spec.memory_stress.bytes"),
            (
                pb::fault_spec::Fault::MemoryStress(pb::MemoryStress { percent_of_total: 1e-9, ..Default::default() }),
                "spec.memory_stress.percent_of_total",
            ),
            (
                pb::fault_spec::Fault::DiskFill(pb::DiskFill { path: "/tmp".into(), bytes: u64::MAX, ..Default::default() }),
                "spec.disk_fill.bytes",
            ),
            (
                pb::fault_spec::Fault::NetworkBandwidth(pb::NetworkBandwidth { rate_bits_per_second: u64::MAX, ..Default::default() }),
                "spec.network_bandwidth.rate_bits_per_second",
            ),
        ];
        for (fault, field) in cases {
            s.fault = Some(fault);
            let e = FaultRequest::from_pb(&s, MAX).expect_err(field);
            assert_eq!(field_of(e), field);
        }
    }

    #[test]
    fn latency_needs_a_bounded_delay_and_jitter_within_it() {
        let mut s = pause_pid(5, 5);
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::Netns("a".into())) });
        let lat = |d: Option<i64>, j_ms: i32| {
            pb::fault_spec::Fault::NetworkLatency(pb::NetworkLatency {
                delay: d.map(|ms| prost_types::Duration { seconds: ms / 1000, nanos: ((ms % 1000) * 1_000_000) as i32 }),
                jitter: Some(prost_types::Duration { seconds: 0, nanos: j_ms * 1_000_000 }),
                ..Default::default()
            })
        };
        s.fault = Some(lat(Some(50), 10));
        let r = FaultRequest::from_pb(&s, MAX).expect("valid");
        assert!(
            matches!(r.kind, FaultKind::NetworkLatency { delay, jitter, .. } if delay == Duration::from_millis(50) && jitter == Duration::from_millis(10))
        );
        assert_eq!(FaultRequest::from_pb(&r.to_pb(""), MAX).expect("round trip"), r);
        for (f, field) in [
            (lat(None, 0), "spec.network_latency.delay"),
            (lat(Some(0), 0), "spec.network_latency.delay"),
            (lat(Some(20_000), 0), "spec.network_latency.delay"),
            (lat(Some(50), 60), "spec.network_latency.jitter"),
        ] {
            s.fault = Some(f);
            assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), field);
        }
        // A correlation correlates jitter: with none it would change nothing.
        let correlated = |j_ms| match lat(Some(50), j_ms) {
            pb::fault_spec::Fault::NetworkLatency(l) => {
                pb::fault_spec::Fault::NetworkLatency(pb::NetworkLatency { correlation_percent: 75.0, ..l })
            }
            other => other,
        };
        s.fault = Some(correlated(0));
        let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
        assert!(e.to_string().contains("needs a jitter"), "{e}");
        assert_eq!(field_of(e), "spec.network_latency.correlation_percent");
        s.fault = Some(correlated(10));
        assert!(matches!(
            FaultRequest::from_pb(&s, MAX).expect("valid").kind,
            FaultKind::NetworkLatency { correlation_permyriad: 7500, .. }
        ));
    }

    #[test]
    fn reorder_needs_a_share_and_a_delay() {
        let mut s = pause_pid(5, 5);
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::Host(pb::HostTarget {})) });
        let d = Some(prost_types::Duration { seconds: 0, nanos: 20_000_000 });
        s.fault = Some(pb::fault_spec::Fault::NetworkReorder(pb::NetworkReorder { percent: 25.0, delay: d, ..Default::default() }));
        let r = FaultRequest::from_pb(&s, MAX).expect("valid");
        assert_eq!(FaultRequest::from_pb(&r.to_pb(""), MAX).expect("round trip"), r);
        s.fault = Some(pb::fault_spec::Fault::NetworkReorder(pb::NetworkReorder { percent: 0.0, delay: d, ..Default::default() }));
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.network_reorder.percent");
        s.fault = Some(pb::fault_spec::Fault::NetworkReorder(pb::NetworkReorder { percent: 25.0, ..Default::default() }));
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.network_reorder.delay");
    }

    #[test]
    fn bandwidth_is_egress_and_bounded() {
        let mut s = pause_pid(5, 5);
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::Host(pb::HostTarget {})) });
        let bw = |rate: u64, dir: pb::Direction| {
            pb::fault_spec::Fault::NetworkBandwidth(pb::NetworkBandwidth {
                scope: Some(pb::NetworkScope { direction: dir as i32, ..Default::default() }),
                rate_bits_per_second: rate,
                burst_bytes: 0,
            })
        };
        s.fault = Some(bw(1_000_000, pb::Direction::Unspecified));
        let r = FaultRequest::from_pb(&s, MAX).expect("valid");
        assert!(matches!(&r.kind, FaultKind::NetworkBandwidth { scope, .. } if scope.direction == Direction::Egress));
        assert_eq!(FaultRequest::from_pb(&r.to_pb(""), MAX).expect("round trip"), r);
        s.fault = Some(bw(10, pb::Direction::Egress));
        assert_eq!(field_of(FaultRequest::from_pb(&s, MAX).expect_err("must be refused")), "spec.network_bandwidth.rate_bits_per_second");
        s.fault = Some(bw(1_000_000, pb::Direction::Ingress));
        let r = FaultRequest::from_pb(&s, MAX).expect("ingress shapes through an ifb");
        assert!(matches!(&r.kind, FaultKind::NetworkBandwidth { scope, .. } if scope.direction == Direction::Ingress));
    }

    #[test]
    fn container_stop_grace_is_whole_seconds_up_to_300_and_only_for_stop_and_restart() {
        let mut s = pause_pid(5, 5);
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::Container("web".into())) });
        let action = |verb: pb::ContainerVerb, grace: Option<(i64, i32)>| {
            pb::fault_spec::Fault::ContainerAction(pb::ContainerAction {
                verb: verb as i32,
                stop_grace: grace.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
                ..Default::default()
            })
        };
        let grace_of = |r: &FaultRequest| match r.kind {
            FaultKind::ContainerAction { stop_grace, .. } => stop_grace,
            ref k => panic!("not a container action: {k:?}"),
        };
        // Unset: 5 s, for every verb; set: as asked, on stop and restart, 0 (SIGKILL at once) to 300.
        for verb in [pb::ContainerVerb::Stop, pb::ContainerVerb::Pause, pb::ContainerVerb::Kill] {
            s.fault = Some(action(verb, None));
            assert_eq!(grace_of(&FaultRequest::from_pb(&s, MAX).expect("unset")), DEFAULT_STOP_GRACE, "{verb:?}");
        }
        for (verb, secs) in [(pb::ContainerVerb::Stop, 20), (pb::ContainerVerb::Restart, 0), (pb::ContainerVerb::Stop, 300)] {
            s.fault = Some(action(verb, Some((secs, 0))));
            let r = FaultRequest::from_pb(&s, MAX).unwrap_or_else(|e| panic!("{verb:?} {secs}s: {e}"));
            assert_eq!(grace_of(&r), Duration::from_secs(secs as u64));
            assert_eq!(FaultRequest::from_pb(&r.to_pb(""), MAX).expect("round trip"), r);
            assert!(describe(&r.to_pb("")).contains(&format!("(grace {secs}s)")), "{}", describe(&r.to_pb("")));
        }
        // A verb without a grace round-trips without one (ListFaults shows none).
        s.fault = Some(action(pb::ContainerVerb::Pause, None));
        let r = FaultRequest::from_pb(&s, MAX).expect("pause");
        let Some(pb::fault_spec::Fault::ContainerAction(back)) = r.to_pb("p").fault else { panic!("container action") };
        assert_eq!(back.stop_grace, None);
        for (verb, grace, text) in [
            (pb::ContainerVerb::Stop, (301, 0), "must be whole seconds in 0..=300s, got 301s"),
            (pb::ContainerVerb::Restart, (1, 500_000_000), "must be whole seconds in 0..=300s, got 1.5s"),
            (pb::ContainerVerb::Stop, (0, 1), "got 0.000000001s"),
            (pb::ContainerVerb::Stop, (-3, 0), "got -3s"),
            (pb::ContainerVerb::Stop, (0, -500_000_000), "got -0.5s"),
            (pb::ContainerVerb::Stop, (i64::MAX, 0), "got 9223372036854775807s"),
            (pb::ContainerVerb::Pause, (20, 0), "only applies to stop and restart, got 20s for pause"),
            (pb::ContainerVerb::Kill, (0, 0), "only applies to stop and restart, got 0s for kill"),
            (pb::ContainerVerb::Start, (5, 0), "got 5s for start"),
            (pb::ContainerVerb::Unpause, (5, 0), "got 5s for unpause"),
        ] {
            s.fault = Some(action(verb, Some(grace)));
            let e = FaultRequest::from_pb(&s, MAX).expect_err("must be refused");
            assert!(e.to_string().starts_with("spec.container_action.stop_grace "), "{e}");
            assert!(e.to_string().contains(text), "{verb:?} {grace:?}: {e}");
        }
    }

    #[test]
    fn an_apply_that_stops_a_container_is_allowed_its_grace() {
        let spec = |verb: pb::ContainerVerb, secs: Option<i64>| pb::FaultSpec {
            fault: Some(pb::fault_spec::Fault::ContainerAction(pb::ContainerAction {
                verb: verb as i32,
                stop_grace: secs.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(apply_allowance(&spec(pb::ContainerVerb::Stop, Some(20))), Duration::from_secs(20));
        assert_eq!(apply_allowance(&spec(pb::ContainerVerb::Restart, None)), DEFAULT_STOP_GRACE);
        assert_eq!(apply_allowance(&spec(pb::ContainerVerb::Stop, Some(100_000))), DEFAULT_STOP_GRACE, "refused later, never waited for");
        assert_eq!(apply_allowance(&spec(pb::ContainerVerb::Pause, Some(20))), Duration::ZERO);
        assert_eq!(apply_allowance(&pause_pid(1, 5)), Duration::ZERO);
    }

    #[test]
    fn a_container_action_recorded_before_stop_grace_existed_reads_as_5_s() {
        let old = r#"{"family": "container_action", "verb": "stop", "signal": "SIGKILL"}"#;
        // JSON, read as YAML (its superset) with the parser this crate already has.
        let k: FaultKind = serde_yaml_ng::from_str(old).expect("old record");
        assert_eq!(
            k,
            FaultKind::ContainerAction { verb: ContainerVerb::Stop, signal: SignalName(Signal::SIGKILL), stop_grace: DEFAULT_STOP_GRACE }
        );
    }

    #[test]
    fn signals_parse_in_every_form() {
        for s in ["SIGTERM", "TERM", "term", "15"] {
            assert_eq!(parse_signal(s), Ok(Signal::SIGTERM), "{s}");
        }
        assert!(parse_signal("999").is_err());
        assert_eq!(String::from(SignalName(Signal::SIGKILL)), "SIGKILL");
        assert_eq!(SignalName::try_from("9".to_string()), Ok(SignalName(Signal::SIGKILL)));
    }
}
