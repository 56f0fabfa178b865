//! The safety policy: limits, severity caps and per-type rules, read from
//! the config file (the seed's `chaos_config.yaml` keys) and applied to a
//! scenario's fault. Pure: no I/O, no clock, unit-tested.

use chaos_proto::edge::quote;
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use chaos_proto::{
    convert::duration_from_pb,
    pb::{self, ContainerVerb, fault_spec::Fault as F, target::Kind},
};
use serde::Deserialize;

pub use chaos_proto::spec::ALL_FAMILIES as FAMILIES;

/// Scenario-type groups accepted under `scenarios:` besides the families.
pub const GROUPS: [&str; 3] = ["network", "resource_exhaustion", "service_failure"];

fn group_of(family: &str) -> Option<&'static str> {
    match family {
        f if f.starts_with("network_") => Some("network"),
        "cpu_stress" | "memory_stress" | "disk_fill" | "io_throttle" | "cpu_throttle" | "memory_limit" => Some("resource_exhaustion"),
        "process_kill" | "process_pause" | "container_action" | "cgroup_freeze" => Some("service_failure"),
        _ => None,
    }
}

/// What one severity level allows. A fault above any cap is refused, naming it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeverityCaps {
    /// Share of packets a loss, corruption, duplication or reorder fault may touch.
    pub max_packet_percent: f64,
    /// Longest added delay (delay + jitter; a reorder's delay).
    pub max_latency: Duration,
    /// Lowest bandwidth cap (bits per second).
    pub min_bandwidth_bits_per_second: u64,
    /// Highest per-worker CPU load.
    pub max_cpu_percent: f64,
    /// Highest memory share of the host's total.
    pub max_memory_percent: f64,
    /// Highest disk fill level.
    pub max_disk_fill_percent: f64,
    /// Lowest IO throttle (bytes per second, read or write).
    pub min_io_bytes_per_second: u64,
    pub allow_partition: bool,
    /// Process kill, container stop/kill/restart.
    pub allow_kill: bool,
    /// Process pause, container pause.
    pub allow_pause: bool,
    /// Longest scenario at this level; None: only the safety timeout.
    pub max_duration: Option<Duration>,
}

/// The built-in caps of levels 1..=5 (index 0 is level 1).
pub fn default_levels() -> [SeverityCaps; 5] {
    let l = |packet: f64,
             lat_ms: u64,
             bw: u64,
             cpu: f64,
             mem: f64,
             disk: f64,
             io: u64,
             part: bool,
             kill: bool,
             pause: bool,
             max_min: Option<u64>| {
        SeverityCaps {
            max_packet_percent: packet,
            max_latency: Duration::from_millis(lat_ms),
            min_bandwidth_bits_per_second: bw,
            max_cpu_percent: cpu,
            max_memory_percent: mem,
            max_disk_fill_percent: disk,
            min_io_bytes_per_second: io,
            allow_partition: part,
            allow_kill: kill,
            allow_pause: pause,
            max_duration: max_min.map(|m| Duration::from_secs(m * 60)),
        }
    };
    [
        l(5.0, 100, 10_000_000, 25.0, 10.0, 50.0, 10_000_000, false, false, false, Some(5)),
        l(10.0, 250, 1_000_000, 50.0, 25.0, 70.0, 1_000_000, false, false, true, Some(10)),
        l(25.0, 1_000, 256_000, 75.0, 50.0, 80.0, 256_000, true, false, true, None),
        l(50.0, 5_000, 64_000, 90.0, 75.0, 90.0, 64_000, true, true, true, None),
        l(100.0, 10_000, 8_000, 100.0, 90.0, 95.0, 4_096, true, true, true, None),
    ]
}

/// Kinds of service failure the seed names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureType {
    /// Process kill, container stop/kill/restart.
    Crash,
    /// Process pause, container pause.
    Hang,
}

/// Rules of one scenario type (a family or a group); unset fields fall
/// back to the group's rule, then to the global policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeRule {
    pub enabled: Option<bool>,
    pub severity_levels: Option<BTreeSet<u32>>,
    pub blast_radius_limit: Option<f64>,
    /// Cap on memory stress as a fraction of total memory (seed: `memory_pressure`).
    pub memory_pressure: Option<f64>,
    /// Cap on CPU stress load as a fraction of a core (seed: `cpu_throttle`).
    pub cpu_throttle: Option<f64>,
    /// Service failures may only target these process or container names.
    pub target_services: Option<Vec<String>>,
    pub failure_types: Option<BTreeSet<FailureType>>,
}

/// Every safety limit the coordinator enforces.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `chaos_testing.enabled`: false refuses every scenario.
    pub enabled: bool,
    pub default_duration: Duration,
    pub safety_timeout: Duration,
    /// Share of the fleet running scenarios may affect together, 0..1.
    pub blast_radius_limit: f64,
    /// The same within a selector's group.
    pub group_blast_radius_limit: f64,
    pub max_concurrent: usize,
    pub max_queued: usize,
    pub default_severity: u32,
    /// Scenarios above this level are refused.
    pub max_severity: u32,
    /// Agents with this label set to "true" are never selected.
    pub protected_label: String,
    /// How many agent calls a fan-out runs at once.
    pub fanout_parallelism: usize,
    pub levels: [SeverityCaps; 5],
    pub types: BTreeMap<String, TypeRule>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            default_duration: Duration::from_secs(300),
            safety_timeout: Duration::from_secs(600),
            blast_radius_limit: 0.3,
            group_blast_radius_limit: 0.3,
            max_concurrent: 3,
            max_queued: 100,
            default_severity: 2,
            max_severity: 5,
            protected_label: "chaos.protected".into(),
            fanout_parallelism: 128,
            levels: default_levels(),
            types: BTreeMap::new(),
        }
    }
}

/// The effective rule of a family: its own entry over its group's.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveRule {
    pub enabled: bool,
    pub severity_levels: Option<BTreeSet<u32>>,
    pub blast_radius_limit: f64,
    pub memory_pressure: Option<f64>,
    pub cpu_throttle: Option<f64>,
    pub target_services: Option<Vec<String>>,
    pub failure_types: Option<BTreeSet<FailureType>>,
    /// The config key the rule came from, for messages.
    pub source: String,
}

impl Policy {
    pub fn rule(&self, family: &str) -> EffectiveRule {
        let own = self.types.get(family);
        let group_name = group_of(family);
        let group = group_name.and_then(|g| self.types.get(g));
        macro_rules! pick {
            ($f:ident) => {
                own.and_then(|r| r.$f.clone()).or_else(|| group.and_then(|r| r.$f.clone()))
            };
        }
        let source = match (own, group_name) {
            (Some(_), _) => format!("scenarios.{family}"),
            (None, Some(g)) if group.is_some() => format!("scenarios.{g}"),
            _ => "chaos_testing".into(),
        };
        EffectiveRule {
            enabled: pick!(enabled).unwrap_or(true),
            severity_levels: pick!(severity_levels),
            blast_radius_limit: pick!(blast_radius_limit).unwrap_or(self.blast_radius_limit),
            memory_pressure: pick!(memory_pressure),
            cpu_throttle: pick!(cpu_throttle),
            target_services: pick!(target_services),
            failure_types: pick!(failure_types),
            source,
        }
    }

    /// Every rule the fault breaks at `severity` for `duration`, each
    /// naming the cap and both numbers. Empty: allowed.
    pub fn check_fault(&self, spec: &pb::FaultSpec, severity: u32, duration: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let Some(fault) = spec.fault.as_ref() else {
            return vec!["fault: no fault family set".into()];
        };
        let family = chaos_proto::spec::family_of(fault);
        let rule = self.rule(family);
        if !self.enabled {
            out.push("chaos_testing.enabled is false: every scenario is refused".into());
        }
        if !rule.enabled {
            out.push(format!("scenario type {family} is disabled ({}.enabled: false)", rule.source));
        }
        if !(1..=5).contains(&severity) {
            return vec![format!("severity must be 1..5, got {severity}")];
        }
        if severity > self.max_severity {
            out.push(format!("severity {severity} is above chaos_testing.max_severity {}", self.max_severity));
        }
        if let Some(levels) = &rule.severity_levels
            && !levels.contains(&severity)
        {
            out.push(format!("severity {severity} is not allowed for {family} ({}.severity_levels: {levels:?})", rule.source));
        }
        if duration > self.safety_timeout {
            out.push(format!(
                "duration {} exceeds chaos_testing.safety_timeout {}",
                humantime::format_duration(duration),
                humantime::format_duration(self.safety_timeout)
            ));
        }
        let Some(caps) = severity.checked_sub(1).and_then(|i| self.levels.get(i as usize)) else {
            out.push(format!("severity must be 1..5, got {severity}"));
            return out;
        };
        let lvl = format!("severity_levels.{severity}");
        if let Some(max) = caps.max_duration
            && duration > max
        {
            out.push(format!(
                "duration {} exceeds {lvl}.max_duration {}",
                humantime::format_duration(duration),
                humantime::format_duration(max)
            ));
        }
        let pct = |out: &mut Vec<String>, what: &str, v: f64| {
            if v > caps.max_packet_percent {
                out.push(format!("{what} {v} % exceeds {lvl}.max_packet_percent {} %", caps.max_packet_percent));
            }
        };
        let lat = |out: &mut Vec<String>, what: &str, d: Duration| {
            if d > caps.max_latency {
                out.push(format!("{what} {} exceeds {lvl}.max_latency {}", fmt_d(d), fmt_d(caps.max_latency)));
            }
        };
        let d = |x: &Option<prost_types::Duration>| x.as_ref().and_then(duration_from_pb).unwrap_or_default();
        let mut crash_or_hang = None;
        match fault {
            F::NetworkPartition(_) if !caps.allow_partition => {
                out.push(format!("network partition is not allowed at {lvl} (allow_partition: false)"))
            }
            F::NetworkPartition(_) => {}
            F::NetworkLatency(l) => lat(&mut out, "latency + jitter", d(&l.delay) + d(&l.jitter)),
            F::NetworkLoss(l) => pct(&mut out, "loss", l.percent),
            F::NetworkCorrupt(c) => pct(&mut out, "corruption", c.percent),
            F::NetworkDuplicate(c) => pct(&mut out, "duplication", c.percent),
            F::NetworkReorder(r) => {
                pct(&mut out, "reorder", r.percent);
                lat(&mut out, "reorder delay", d(&r.delay));
            }
            F::NetworkBandwidth(b) if b.rate_bits_per_second < caps.min_bandwidth_bits_per_second => out.push(format!(
                "bandwidth {} bit/s is below {lvl}.min_bandwidth_bits_per_second {}",
                b.rate_bits_per_second, caps.min_bandwidth_bits_per_second
            )),
            F::NetworkBandwidth(_) => {}
            F::CpuStress(c) => {
                if c.load_percent > caps.max_cpu_percent {
                    out.push(format!("CPU load {} % exceeds {lvl}.max_cpu_percent {} %", c.load_percent, caps.max_cpu_percent));
                }
                if let Some(t) = rule.cpu_throttle
                    && c.load_percent > t * 100.0
                {
                    out.push(format!("CPU load {} % exceeds {}.cpu_throttle {} ({} %)", c.load_percent, rule.source, t, t * 100.0));
                }
            }
            F::MemoryStress(m) => {
                if m.percent_of_total > caps.max_memory_percent {
                    out.push(format!(
                        "memory {} % of total exceeds {lvl}.max_memory_percent {} %",
                        m.percent_of_total, caps.max_memory_percent
                    ));
                }
                if let Some(p) = rule.memory_pressure
                    && m.percent_of_total > p * 100.0
                {
                    out.push(format!(
                        "memory {} % of total exceeds {}.memory_pressure {} ({} %)",
                        m.percent_of_total,
                        rule.source,
                        p,
                        p * 100.0
                    ));
                }
            }
            F::DiskFill(f) if f.fill_to_percent > caps.max_disk_fill_percent => out
                .push(format!("disk fill to {} % exceeds {lvl}.max_disk_fill_percent {} %", f.fill_to_percent, caps.max_disk_fill_percent)),
            F::DiskFill(_) => {}
            F::IoThrottle(io) => {
                for (what, v) in [("read", io.read_bytes_per_second), ("write", io.write_bytes_per_second)] {
                    if v != 0 && v < caps.min_io_bytes_per_second {
                        out.push(format!("{what} limit {v} B/s is below {lvl}.min_io_bytes_per_second {}", caps.min_io_bytes_per_second));
                    }
                }
            }
            F::ProcessKill(_) => crash_or_hang = Some(FailureType::Crash),
            F::ProcessPause(_) | F::CgroupFreeze(_) => crash_or_hang = Some(FailureType::Hang),
            // Lowering a limit is bounded by the agent (1 % of a core, 4 MiB);
            // the level's duration and blast radius still apply.
            F::CpuThrottle(_) | F::MemoryLimit(_) => {}
            F::ContainerAction(c) => {
                crash_or_hang = Some(if c.verb == ContainerVerb::Pause as i32 { FailureType::Hang } else { FailureType::Crash })
            }
        }
        if let Some(ft) = crash_or_hang {
            let (allowed, key, what) = match ft {
                FailureType::Crash => (caps.allow_kill, "allow_kill", "killing/stopping"),
                FailureType::Hang => (caps.allow_pause, "allow_pause", "pausing"),
            };
            if !allowed {
                out.push(format!("{what} a service is not allowed at {lvl} ({key}: false)"));
            }
            if let Some(types) = &rule.failure_types
                && !types.contains(&ft)
            {
                out.push(format!("failure type {ft:?} is not in {}.failure_types {types:?}", rule.source));
            }
            if let Some(services) = &rule.target_services {
                let name = match spec.target.as_ref().and_then(|t| t.kind.as_ref()) {
                    Some(Kind::ProcessName(n) | Kind::Container(n)) => Some(n.as_str()),
                    _ => None,
                };
                match name {
                    Some(n) if services.iter().any(|s| s == n) => {}
                    Some(n) => out.push(format!("target {n:?} is not in {}.target_services {services:?}", rule.source)),
                    None => out.push(format!(
                        "{}.target_services restricts {family} to named services {services:?}: target a process name or a container",
                        rule.source
                    )),
                }
            }
        }
        out
    }
}

fn fmt_d(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

// ---- the config file's form -------------------------------------------------

/// A duration written as seconds (`300`, as in the seed) or as text (`5m`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(u64),
    Text(String),
}

impl DurationValue {
    pub fn resolve(&self, key: &str) -> Result<Duration, String> {
        match self {
            DurationValue::Seconds(s) => Ok(Duration::from_secs(*s)),
            DurationValue::Text(t) => {
                chaos_proto::convert::parse_duration(t).map_err(|e| format!("{key}: invalid duration {}: {e}", quote(t)))
            }
        }
    }
}

/// A severity level: 1..5, or `low` (1-2), `medium` (3), `high` (4-5).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LevelValue {
    Number(u32),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosTestingFile {
    pub enabled: Option<bool>,
    pub default_duration: Option<DurationValue>,
    pub safety_timeout: Option<DurationValue>,
    pub blast_radius_limit: Option<f64>,
    pub group_blast_radius_limit: Option<f64>,
    #[serde(alias = "max_concurrent")]
    pub max_concurrent_scenarios: Option<usize>,
    pub max_queued_scenarios: Option<usize>,
    pub default_severity: Option<u32>,
    pub max_severity: Option<u32>,
    pub protected_label: Option<String>,
    pub fanout_parallelism: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelFile {
    pub max_packet_percent: Option<f64>,
    pub max_latency: Option<DurationValue>,
    pub min_bandwidth_bits_per_second: Option<u64>,
    pub max_cpu_percent: Option<f64>,
    pub max_memory_percent: Option<f64>,
    pub max_disk_fill_percent: Option<f64>,
    pub min_io_bytes_per_second: Option<u64>,
    pub allow_partition: Option<bool>,
    pub allow_kill: Option<bool>,
    pub allow_pause: Option<bool>,
    pub max_duration: Option<DurationValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeFile {
    pub enabled: Option<bool>,
    pub severity_levels: Option<Vec<LevelValue>>,
    pub blast_radius_limit: Option<f64>,
    pub memory_pressure: Option<f64>,
    pub cpu_throttle: Option<f64>,
    pub target_services: Option<Vec<String>>,
    pub failure_types: Option<Vec<String>>,
}

/// The safety part of the config file.
#[derive(Debug, Default)]
pub struct PolicyFile<'a> {
    pub chaos_testing: Option<&'a ChaosTestingFile>,
    pub severity_levels: Option<&'a BTreeMap<u32, LevelFile>>,
    pub scenarios: Option<&'a BTreeMap<String, TypeFile>>,
}

fn fraction(key: &str, v: f64) -> Result<f64, String> {
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(format!("{key}: must be a fraction in (0, 1], got {v}")) }
}

fn percent(key: &str, v: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&v) { Ok(v) } else { Err(format!("{key}: must be a percentage in [0, 100], got {v}")) }
}

fn level(key: &str, v: u32) -> Result<u32, String> {
    if (1..=5).contains(&v) { Ok(v) } else { Err(format!("{key}: severity levels are 1..5, got {v}")) }
}

impl PolicyFile<'_> {
    /// Build the policy; errors name the key path and the value.
    pub fn resolve(&self) -> Result<Policy, String> {
        let mut p = Policy::default();
        if let Some(ct) = self.chaos_testing {
            let k = |s: &str| format!("chaos_testing.{s}");
            p.enabled = ct.enabled.unwrap_or(true);
            if let Some(d) = &ct.default_duration {
                p.default_duration = d.resolve(&k("default_duration"))?;
            }
            if let Some(d) = &ct.safety_timeout {
                p.safety_timeout = d.resolve(&k("safety_timeout"))?;
            }
            if let Some(v) = ct.blast_radius_limit {
                p.blast_radius_limit = fraction(&k("blast_radius_limit"), v)?;
                p.group_blast_radius_limit = p.blast_radius_limit;
            }
            if let Some(v) = ct.group_blast_radius_limit {
                p.group_blast_radius_limit = fraction(&k("group_blast_radius_limit"), v)?;
            }
            if let Some(v) = ct.max_concurrent_scenarios {
                if v == 0 {
                    return Err(format!("{}: must be at least 1, got 0", k("max_concurrent_scenarios")));
                }
                p.max_concurrent = v;
            }
            if let Some(v) = ct.max_queued_scenarios {
                p.max_queued = v;
            }
            if let Some(v) = ct.default_severity {
                p.default_severity = level(&k("default_severity"), v)?;
            }
            if let Some(v) = ct.max_severity {
                p.max_severity = level(&k("max_severity"), v)?;
            }
            if let Some(v) = &ct.protected_label {
                if v.is_empty() {
                    return Err(format!("{}: must not be empty", k("protected_label")));
                }
                p.protected_label = v.clone();
            }
            if let Some(v) = ct.fanout_parallelism {
                if v == 0 {
                    return Err(format!("{}: must be at least 1, got 0", k("fanout_parallelism")));
                }
                p.fanout_parallelism = v;
            }
        }
        if p.default_duration.is_zero() {
            return Err("chaos_testing.default_duration: must be > 0".into());
        }
        if p.default_duration > p.safety_timeout {
            return Err(format!(
                "chaos_testing.default_duration ({}) exceeds chaos_testing.safety_timeout ({})",
                fmt_d(p.default_duration),
                fmt_d(p.safety_timeout)
            ));
        }
        if p.default_severity > p.max_severity {
            return Err(format!("chaos_testing.default_severity {} is above max_severity {}", p.default_severity, p.max_severity));
        }
        for (n, l) in self.severity_levels.into_iter().flatten() {
            let k = |s: &str| format!("severity_levels.{n}.{s}");
            let idx = level(&format!("severity_levels.{n}"), *n)? as usize - 1;
            let c = &mut p.levels[idx];
            // Each key is its field's name, so the message names exactly what the file set.
            macro_rules! set {
                ($($f:ident),*) => { $( c.$f = l.$f.unwrap_or(c.$f); )* };
            }
            macro_rules! set_percent {
                ($($f:ident),*) => { $( if let Some(v) = l.$f { c.$f = percent(&k(stringify!($f)), v)?; } )* };
            }
            set_percent!(max_packet_percent, max_cpu_percent, max_memory_percent, max_disk_fill_percent);
            set!(min_bandwidth_bits_per_second, min_io_bytes_per_second, allow_partition, allow_kill, allow_pause);
            if let Some(v) = &l.max_latency {
                c.max_latency = v.resolve(&k("max_latency"))?;
            }
            if let Some(v) = &l.max_duration {
                c.max_duration = Some(v.resolve(&k("max_duration"))?);
            }
        }
        for (name, t) in self.scenarios.into_iter().flatten() {
            let k = |s: &str| format!("scenarios.{name}.{s}");
            if !FAMILIES.contains(&name.as_str()) && !GROUPS.contains(&name.as_str()) {
                return Err(format!(
                    "scenarios.{name}: unknown scenario type; use a fault family ({}) or a group ({})",
                    FAMILIES.join(", "),
                    GROUPS.join(", ")
                ));
            }
            let mut rule = TypeRule { enabled: t.enabled, ..Default::default() };
            if let Some(levels) = &t.severity_levels {
                let mut set = BTreeSet::new();
                for l in levels {
                    match l {
                        LevelValue::Number(n) => {
                            set.insert(level(&k("severity_levels"), *n)?);
                        }
                        LevelValue::Name(s) => set.extend(match s.as_str() {
                            "low" => &[1u32, 2][..],
                            "medium" => &[3][..],
                            "high" => &[4, 5][..],
                            other => {
                                return Err(format!(
                                    "{}: unknown level {}; use 1..5, low, medium or high",
                                    k("severity_levels"),
                                    quote(other)
                                ));
                            }
                        }),
                    }
                }
                rule.severity_levels = Some(set);
            }
            if let Some(v) = t.blast_radius_limit {
                rule.blast_radius_limit = Some(fraction(&k("blast_radius_limit"), v)?);
            }
            if let Some(v) = t.memory_pressure {
                rule.memory_pressure = Some(fraction(&k("memory_pressure"), v)?);
            }
            if let Some(v) = t.cpu_throttle {
                rule.cpu_throttle = Some(fraction(&k("cpu_throttle"), v)?);
            }
            rule.target_services = t.target_services.clone();
            if let Some(fts) = &t.failure_types {
                let mut set = BTreeSet::new();
                for f in fts {
                    set.insert(match f.as_str() {
                        "crash" => FailureType::Crash,
                        "hang" => FailureType::Hang,
                        other => {
                            return Err(format!(
                                "{}: unknown failure type {}; use crash or hang (slow responses are the network_latency type)",
                                k("failure_types"),
                                quote(other)
                            ));
                        }
                    });
                }
                rule.failure_types = Some(set);
            }
            p.types.insert(name.clone(), rule);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use chaos_proto::convert::duration_to_pb;

    use super::*;

    fn spec(fault: F, target: Kind) -> pb::FaultSpec {
        pb::FaultSpec { target: Some(pb::Target { kind: Some(target) }), fault: Some(fault), ..Default::default() }
    }

    fn host() -> Kind {
        Kind::Host(pb::HostTarget {})
    }

    fn loss(p: f64) -> pb::FaultSpec {
        spec(F::NetworkLoss(pb::NetworkLoss { percent: p, ..Default::default() }), host())
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn severity_caps_name_the_cap_and_both_numbers() {
        let p = Policy::default();
        assert!(p.check_fault(&loss(5.0), 1, MIN).is_empty());
        let r = p.check_fault(&loss(20.0), 1, MIN);
        assert_eq!(r, vec!["loss 20 % exceeds severity_levels.1.max_packet_percent 5 %".to_string()]);
        assert!(p.check_fault(&loss(20.0), 3, MIN).is_empty());
        let part = spec(F::NetworkPartition(pb::NetworkPartition::default()), host());
        assert!(p.check_fault(&part, 2, MIN)[0].contains("allow_partition: false"), "{:?}", p.check_fault(&part, 2, MIN));
        assert!(p.check_fault(&part, 3, MIN).is_empty());
        let lat = spec(
            F::NetworkLatency(pb::NetworkLatency {
                delay: Some(duration_to_pb(Duration::from_millis(200))),
                jitter: Some(duration_to_pb(Duration::from_millis(100))),
                ..Default::default()
            }),
            host(),
        );
        assert_eq!(p.check_fault(&lat, 2, MIN), vec!["latency + jitter 300ms exceeds severity_levels.2.max_latency 250ms".to_string()]);
        let kill = spec(F::ProcessKill(pb::ProcessKill::default()), Kind::ProcessName("java".into()));
        assert!(p.check_fault(&kill, 3, MIN)[0].contains("allow_kill: false"));
        assert!(p.check_fault(&kill, 4, MIN).is_empty());
        let cpause = spec(
            F::ContainerAction(pb::ContainerAction { verb: ContainerVerb::Pause as i32, ..Default::default() }),
            Kind::Container("kafka".into()),
        );
        assert!(p.check_fault(&cpause, 2, MIN).is_empty(), "pausing is allowed at 2");
        let bw = spec(F::NetworkBandwidth(pb::NetworkBandwidth { rate_bits_per_second: 100_000, ..Default::default() }), host());
        assert!(p.check_fault(&bw, 3, MIN)[0].contains("min_bandwidth_bits_per_second 256000"));
        let cpu = spec(F::CpuStress(pb::CpuStress { workers: 1, load_percent: 80.0 }), host());
        assert!(p.check_fault(&cpu, 3, MIN)[0].contains("max_cpu_percent 75"));
    }

    #[test]
    fn every_family_belongs_to_a_group() {
        for f in FAMILIES {
            assert!(group_of(f).is_some_and(|g| GROUPS.contains(&g)), "{f}");
        }
    }

    #[test]
    fn duration_limits_and_bad_level() {
        let p = Policy::default();
        let r = p.check_fault(&loss(1.0), 1, Duration::from_secs(700));
        assert!(r.iter().any(|m| m == "duration 11m 40s exceeds chaos_testing.safety_timeout 10m"), "{r:?}");
        assert!(r.iter().any(|m| m.contains("severity_levels.1.max_duration 5m")), "{r:?}");
        assert_eq!(p.check_fault(&loss(1.0), 6, MIN), vec!["severity must be 1..5, got 6".to_string()]);
        let strict = Policy { max_severity: 3, ..Policy::default() };
        assert!(strict.check_fault(&loss(1.0), 4, MIN)[0].contains("above chaos_testing.max_severity 3"));
    }

    fn parse(yaml: &str) -> Result<Policy, String> {
        #[derive(Deserialize)]
        struct F {
            chaos_testing: Option<ChaosTestingFile>,
            severity_levels: Option<BTreeMap<u32, LevelFile>>,
            scenarios: Option<BTreeMap<String, TypeFile>>,
        }
        let f: F = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        PolicyFile { chaos_testing: f.chaos_testing.as_ref(), severity_levels: f.severity_levels.as_ref(), scenarios: f.scenarios.as_ref() }
            .resolve()
    }

    #[test]
    fn seed_keys_map_to_rules_with_family_over_group() {
        let p = parse(
            "chaos_testing: {default_duration: 300, safety_timeout: 600, blast_radius_limit: 0.5, max_concurrent_scenarios: 2}\n\
             scenarios:\n  network: {severity_levels: [low]}\n  network_partition: {enabled: false}\n  \
             resource_exhaustion: {memory_pressure: 0.8, cpu_throttle: 0.5}\n  \
             service_failure: {target_services: [kafka], failure_types: [hang]}\n\
             severity_levels:\n  3: {allow_kill: true, max_latency: 2s}\n",
        )
        .expect("valid");
        assert_eq!((p.blast_radius_limit, p.max_concurrent, p.default_duration), (0.5, 2, Duration::from_secs(300)));
        assert!(p.levels[2].allow_kill && p.levels[2].max_latency == Duration::from_secs(2));
        let part = spec(F::NetworkPartition(pb::NetworkPartition::default()), host());
        assert!(
            p.check_fault(&part, 3, MIN)
                .iter()
                .any(|m| m == "scenario type network_partition is disabled (scenarios.network_partition.enabled: false)")
        );
        let r = p.check_fault(&loss(1.0), 3, MIN);
        assert_eq!(r, vec!["severity 3 is not allowed for network_loss (scenarios.network.severity_levels: {1, 2})".to_string()]);
        let cpu = spec(F::CpuStress(pb::CpuStress { workers: 1, load_percent: 60.0 }), host());
        assert!(p.check_fault(&cpu, 4, MIN)[0].contains("scenarios.resource_exhaustion.cpu_throttle 0.5 (50 %)"));
        let kill = spec(F::ProcessKill(pb::ProcessKill::default()), Kind::ProcessName("cassandra".into()));
        let r = p.check_fault(&kill, 4, MIN);
        assert!(r.iter().any(|m| m.contains("Crash is not in scenarios.service_failure.failure_types")), "{r:?}");
        assert!(r.iter().any(|m| m.contains("\"cassandra\" is not in scenarios.service_failure.target_services")), "{r:?}");
        let pause = spec(F::ProcessPause(pb::ProcessPause {}), Kind::ProcessName("kafka".into()));
        assert!(p.check_fault(&pause, 2, MIN).is_empty());
    }

    #[test]
    fn config_errors_name_the_key_and_value() {
        let e = parse("chaos_testing: {blast_radius_limit: 1.5}").expect_err("bad");
        assert_eq!(e, "chaos_testing.blast_radius_limit: must be a fraction in (0, 1], got 1.5");
        let e = parse("chaos_testing: {default_duration: 900}").expect_err("bad");
        assert!(e.contains("default_duration (15m) exceeds chaos_testing.safety_timeout (10m)"), "{e}");
        let e = parse("scenarios: {netwrk_loss: {enabled: true}}").expect_err("bad");
        assert!(e.starts_with("scenarios.netwrk_loss: unknown scenario type"), "{e}");
        let e = parse("scenarios: {network: {severity_levels: [extreme]}}").expect_err("bad");
        assert!(e.contains("scenarios.network.severity_levels: unknown level \"extreme\""), "{e}");
        let e = parse("severity_levels: {7: {allow_kill: true}}").expect_err("bad");
        assert!(e.contains("severity_levels.7"), "{e}");
        let e = parse("chaos_testing: {blast_radius: 0.2}").expect_err("bad");
        assert!(e.contains("blast_radius") && e.contains("line 1"), "{e}");
        let e = parse("chaos_testing: {safety_timeout: soon}").expect_err("bad");
        assert!(e.contains("chaos_testing.safety_timeout: invalid duration \"soon\""), "{e}");
    }
}
