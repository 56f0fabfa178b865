//! Direct agent verbs: `chaos agent faults|apply|revert|revert-all|capabilities`.

use std::time::Duration;

use chaos_proto::{
    convert::duration_to_pb,
    pb::{self, FaultState, RevertReason, agent_client::AgentClient, fault_spec::Fault as F, target::Kind},
    spec::ContainerVerb,
};
use clap::{ArgGroup, Subcommand};
use serde_json::json;

use crate::{
    conn::{agent_channel, local_channel, url},
    output::{CliError, Format, emit, emit_json, exit, from_status, relative, rfc3339, table},
};

const APPLY_EXAMPLES: &str = "\
Examples:
  chaos agent apply --pause-pid 4242 --duration 30s          # SIGSTOP now, SIGCONT in 30 s
  chaos agent apply --pause-name java --duration 2m --id kafka-hang
  chaos agent apply --kill-name processor --signal TERM --duration 1m
  chaos agent apply --agent 198.18.0.2:50052 --kill-pid 812 --duration 10s
  chaos agent apply --partition 198.18.0.3/32 --direction both --duration 1m     # on the agent's host
  chaos agent apply --partition all --netns lab-kafka --duration 30s             # isolate a namespace
  chaos agent apply --partition 198.18.0.0/24 --port 9042 --protocol tcp --target-pid 4242 --duration 1m
  chaos agent apply --loss 10% --peer 198.18.0.3/32 --direction ingress --netns lab-kafka --duration 2m
  chaos agent apply --latency 50ms --jitter 10ms --peer 198.18.0.3/32 --direction ingress --duration 2m
  chaos agent apply --reorder 25% --latency 20ms --peer 198.18.0.3/32 --direction ingress --duration 2m
  chaos agent apply --corrupt 5% --peer 198.18.0.3/32 --direction ingress --netns lab-kafka --duration 1m
  chaos agent apply --duplicate 5% --peer 198.18.0.3/32 --netns lab-kafka --duration 1m
  chaos agent apply --rate 1mbit --peer 198.18.0.3/32 --direction egress --netns lab-kafka --duration 5m
  chaos agent apply --rate 1mbit --direction ingress --netns lab-kafka --duration 5m   # through an ifb
  chaos agent apply --cpu 50% --workers 2 --duration 2m                    # on the host, in a cgroup of its own
  chaos agent apply --cpu-quota 20% --target-name java --duration 1m       # the old quota comes back
  chaos agent apply --memory 512MiB --duration 5m                          # refused below guards.memory_floor_bytes
  chaos agent apply --memory-limit 256MiB --cgroup /system.slice/kafka.service --duration 1m
  chaos agent apply --fill-disk /var/lib/cassandra --to 90% --duration 5m
  chaos agent apply --io-limit 1MB/s --io-direction write --target-pid 4242 --duration 2m
  chaos agent apply --freeze-cgroup /system.slice/processor.service --duration 30s
  chaos agent apply --container kafka --action pause --duration 30s        # unpaused at revert
  chaos agent apply --container label:role=processor --action stop --duration 1m
  chaos agent apply --container kafka --action stop --stop-grace 20s --duration 1m   # SIGKILL after 20 s
  chaos agent apply --partition all --container cassandra --duration 30s   # in the container's netns

Every fault reverts by itself at the end of --duration, even if the agent
crashes (it replays its journal at start) or loses its coordinator (lease).
Network faults never touch the agent's own port or its coordinator link.";

#[derive(Debug, clap::Args)]
pub struct Target {
    /// Agent address (HOST:PORT or URL; https:// unless --insecure).
    #[arg(long, global = true, env = "CHAOS_AGENT", default_value = "127.0.0.1:50052")]
    agent: String,
    /// Break-glass: talk to the agent on this host through its root-only Unix
    /// socket (no certificate, no network, no coordinator needed).
    #[arg(long, global = true, conflicts_with = "agent")]
    local: bool,
    /// The agent's Unix socket, for --local.
    #[arg(long, global = true, value_name = "PATH", default_value = "/run/chaos-agent/agent.sock")]
    socket: std::path::PathBuf,
}

impl Target {
    /// What the messages call this agent.
    fn name(&self) -> String {
        if self.local { format!("unix:{}", self.socket.display()) } else { url(&self.agent) }
    }
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List the agent's active faults (--all: also recently finished ones).
    Faults {
        #[command(flatten)]
        target: Target,
        /// Include reverted and failed faults.
        #[arg(long)]
        all: bool,
    },
    /// Apply one fault on the agent's host.
    #[command(after_help = APPLY_EXAMPLES)]
    Apply(Box<ApplyArgs>),
    /// Revert one fault now (harmless if already reverted).
    Revert {
        #[command(flatten)]
        target: Target,
        /// The fault id (from `apply` or `faults`).
        fault_id: String,
    },
    /// Revert every fault on the agent now.
    RevertAll {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value = "revert-all from the chaos CLI")]
        reason: String,
        /// Leave the agent disarmed (refusing faults) afterwards.
        #[arg(long)]
        disarm: bool,
        /// How long the agent waits for reverts whose driver is busy (a
        /// container stop waits out its grace) before answering; those not
        /// done by then are listed as still reverting (exit 1). At most 60s.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// What the agent and its host can do, and its state (armed, lease).
    Capabilities {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    fault: FaultArgs,
    /// Time to live: the fault reverts itself after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Fault id (default: a UUID chosen by the agent).
    #[arg(long)]
    id: Option<String>,
    /// Label KEY=VALUE carried with the fault (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

/// The fault and its target inside the host; shared by `agent apply` and `scenario create`.
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("fault").required(true).args([
    "pause_pid", "pause_name", "pause_cgroup", "kill_pid", "kill_name", "kill_cgroup", "partition", "loss", "latency", "rate", "corrupt", "duplicate",
    "cpu", "cpu_quota", "memory", "memory_limit", "fill_disk", "io_limit", "freeze_cgroup", "action",
])))]
#[command(group(ArgGroup::new("netns_target").args(["netns", "target_pid", "container"])))]
#[command(group(ArgGroup::new("resource_target").args(["target_pid", "target_name", "cgroup", "container"])))]
pub struct FaultArgs {
    /// Pause (SIGSTOP) the process with this pid.
    #[arg(long, value_name = "PID")]
    pause_pid: Option<u32>,
    /// Pause every process with exactly this name.
    #[arg(long, value_name = "NAME")]
    pause_name: Option<String>,
    /// Pause every process in this cgroup and below it, e.g. `/system.slice/kafka.service`.
    #[arg(long, value_name = "PATH")]
    pause_cgroup: Option<String>,
    /// Send --signal to every process in this cgroup and below it.
    #[arg(long, value_name = "PATH")]
    kill_cgroup: Option<String>,
    /// Send --signal to the process with this pid.
    #[arg(long, value_name = "PID")]
    kill_pid: Option<u32>,
    /// Send --signal to every process with exactly this name.
    #[arg(long, value_name = "NAME")]
    kill_name: Option<String>,
    /// Signal for --kill-* (name or number).
    #[arg(long, default_value = "KILL")]
    signal: String,
    /// Partition: drop traffic with this peer CIDR (repeatable), or `all` for every peer.
    #[arg(long, value_name = "CIDR|all")]
    partition: Vec<String>,
    /// Loss: drop this share of packets, e.g. `10%` or `0.5` (percent), with --peer to scope it.
    #[arg(long, value_name = "PERCENT")]
    loss: Option<String>,
    /// Latency: hold packets this long, e.g. `50ms` (with --jitter, --peer, --direction; prefer ingress).
    #[arg(long, value_parser = humantime::parse_duration)]
    latency: Option<Duration>,
    /// Bandwidth: cap traffic in scope at this rate, e.g. `1mbit`, `500kbit`, `2gbit` (bits per
    /// second), each way --direction says (ingress through an ifb).
    #[arg(long, value_name = "RATE")]
    rate: Option<String>,
    /// Corrupt: flip one bit in this share of packets, e.g. `5%` (the receiver's stack discards
    /// them on their checksums, as with a bad link).
    #[arg(long, value_name = "PERCENT")]
    corrupt: Option<String>,
    /// Duplicate: deliver this share of packets twice, e.g. `5%`.
    #[arg(long, value_name = "PERCENT")]
    duplicate: Option<String>,
    /// Loss/latency: how much each draw follows the previous one, e.g. `25%`: the lag-1 correlation of
    /// successive delays (with --jitter; by the NFQUEUE engine) or losses (needs sch_netem on the host).
    #[arg(long, value_name = "PERCENT")]
    correlation: Option<String>,
    /// Reorder: this share of packets passes at once while the rest is held for --latency, e.g. `25%`.
    #[arg(long, value_name = "PERCENT", requires = "latency")]
    reorder: Option<String>,
    /// Latency: each packet's delay is drawn uniformly from latency ± jitter.
    #[arg(long, value_parser = humantime::parse_duration)]
    jitter: Option<Duration>,
    /// Loss, latency, reorder, corruption, duplication, bandwidth: only traffic with this peer CIDR
    /// (repeatable) [default: every peer]. A partition takes its peers as --partition CIDR.
    #[arg(long = "peer", value_name = "CIDR")]
    peers: Vec<String>,
    /// Network faults: which way packets are dropped.
    #[arg(long, value_enum, default_value = "both")]
    direction: DirectionArg,
    /// Network faults: only this interface.
    #[arg(long)]
    interface: Option<String>,
    /// Network faults: only these ports, local or peer (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u32>,
    /// Network faults: only this protocol (tcp, udp, icmp).
    #[arg(long)]
    protocol: Option<String>,
    /// Network faults: in the named network namespace (/run/netns/NAME) [default: the agent's host].
    #[arg(long, value_name = "NAME")]
    netns: Option<String>,
    /// Network faults: in the network namespace of this process. Resource faults: in its cgroup.
    #[arg(long, value_name = "PID")]
    target_pid: Option<u32>,
    /// CPU stress: each of --workers burns this share of one core, e.g. `50%`.
    /// On the host (a cgroup of the fault's own) unless --target-pid, --target-name or --cgroup.
    #[arg(long, value_name = "PERCENT", help_heading = "Resource faults")]
    cpu: Option<String>,
    /// CPU stress: how many worker threads.
    #[arg(long, default_value_t = 1, help_heading = "Resource faults")]
    workers: u32,
    /// CPU throttle: lower the target cgroup's quota to this share of one core, e.g. `20%` or `150%`.
    #[arg(long, value_name = "PERCENT", help_heading = "Resource faults")]
    cpu_quota: Option<String>,
    /// Memory stress: allocate, touch and hold this much, e.g. `512MiB`, `2GiB`, or `10%` of total.
    #[arg(long, value_name = "SIZE|PERCENT", help_heading = "Resource faults")]
    memory: Option<String>,
    /// Memory limit: lower the target cgroup's limit to this size, e.g. `256MiB`.
    #[arg(long, value_name = "SIZE", help_heading = "Resource faults")]
    memory_limit: Option<String>,
    /// Disk fill: fill the filesystem holding this directory (with --to or --fill-bytes).
    #[arg(long, value_name = "DIR", help_heading = "Resource faults")]
    fill_disk: Option<String>,
    /// Disk fill: the used share to reach, e.g. `90%`.
    #[arg(long, value_name = "PERCENT", requires = "fill_disk", conflicts_with = "fill_bytes", help_heading = "Resource faults")]
    to: Option<String>,
    /// Disk fill: how much to add, e.g. `1GiB`.
    #[arg(long, value_name = "SIZE", requires = "fill_disk", help_heading = "Resource faults")]
    fill_bytes: Option<String>,
    /// IO throttle: limit the target cgroup's block IO to this rate, e.g. `1MB/s`, `512KiB/s`.
    #[arg(long, value_name = "RATE", help_heading = "Resource faults")]
    io_limit: Option<String>,
    /// IO throttle: which way.
    #[arg(long, value_enum, default_value = "both", help_heading = "Resource faults")]
    io_direction: IoDirectionArg,
    /// IO throttle: the block device MAJOR:MINOR [default: the disk holding /].
    #[arg(long, value_name = "MAJ:MIN", help_heading = "Resource faults")]
    device: Option<String>,
    /// Freeze every process of this cgroup (a hang), e.g. `/system.slice/kafka.service`.
    #[arg(long, value_name = "PATH", help_heading = "Resource faults")]
    freeze_cgroup: Option<String>,
    /// Resource faults: the first process with exactly this name (its cgroup).
    #[arg(long, value_name = "NAME", help_heading = "Resource faults")]
    target_name: Option<String>,
    /// Resource faults: this cgroup path, e.g. `/system.slice/kafka.service`.
    #[arg(long, value_name = "PATH", help_heading = "Resource faults")]
    cgroup: Option<String>,
    /// A Docker container by name, id or `label:KEY=VALUE`: the target of --action, or
    /// of a network or resource fault (its network namespace and cgroup).
    #[arg(long, value_name = "NAME|ID|label:K=V", help_heading = "Containers")]
    container: Option<String>,
    /// What to do to --container: stop, start, restart, pause, unpause or kill (with --signal);
    /// reverted at the end: stop/kill by start, pause by unpause, start by stop, unpause by pause.
    #[arg(long, value_name = "VERB", value_parser = str::parse::<ContainerVerb>, requires = "container", help_heading = "Containers")]
    action: Option<ContainerVerb>,
    /// With --action stop or restart: how long Docker waits after SIGTERM for the container to
    /// exit before SIGKILL, e.g. `20s` (whole seconds, 0s..=300s; 0s kills at once) [default: 5s].
    /// The apply lasts until the container has exited; a revert asked meanwhile follows it.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "action", help_heading = "Containers")]
    stop_grace: Option<Duration>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum IoDirectionArg {
    Both,
    Read,
    Write,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    Both,
    Ingress,
    Egress,
}

impl FaultArgs {
    fn network_target(&self) -> Kind {
        match (&self.netns, self.target_pid, &self.container) {
            (Some(n), ..) => Kind::Netns(n.clone()),
            (None, Some(p), _) => Kind::Pid(p),
            (None, None, Some(c)) => Kind::Container(c.clone()),
            (None, None, None) => Kind::Host(pb::HostTarget {}),
        }
    }

    fn resource_target(&self) -> Kind {
        match (&self.cgroup, self.target_pid, &self.target_name, &self.container) {
            (Some(c), ..) => Kind::CgroupPath(c.clone()),
            (None, Some(p), ..) => Kind::Pid(p),
            (None, None, Some(n), _) => Kind::ProcessName(n.clone()),
            (None, None, None, Some(c)) => Kind::Container(c.clone()),
            (None, None, None, None) => Kind::Host(pb::HostTarget {}),
        }
    }

    /// The resource fault asked for, if any.
    fn resource_fault(&self) -> Result<Option<(Kind, F)>, CliError> {
        let t = self.resource_target();
        if let (Some(verb), Some(c)) = (self.action, &self.container) {
            let signal = if verb == ContainerVerb::Kill { self.signal.clone() } else { String::new() };
            let stop_grace = self.stop_grace.map(duration_to_pb);
            // The agent's own rule, checked here so the refusal names the flag.
            chaos_proto::spec::stop_grace_from_pb(verb, stop_grace.as_ref())
                .map_err(|e| CliError::new(exit::USAGE, format!("--stop-grace {e}")))?;
            let action = pb::ContainerAction { verb: verb.to_pb() as i32, signal, stop_grace };
            return Ok(Some((Kind::Container(c.clone()), F::ContainerAction(action))));
        }
        let needs_target = |flag: &str| {
            if matches!(t, Kind::Host(_)) {
                Err(CliError::new(
                    exit::USAGE,
                    format!("{flag} needs --cgroup, --target-pid, --target-name or --container (a cgroup to change)"),
                ))
            } else {
                Ok(t.clone())
            }
        };
        Ok(Some(if let Some(c) = &self.cpu {
            (t.clone(), F::CpuStress(pb::CpuStress { workers: self.workers, load_percent: parse_percent("--cpu", c)? }))
        } else if let Some(q) = &self.cpu_quota {
            (needs_target("--cpu-quota")?, F::CpuThrottle(pb::CpuThrottle { quota_percent: parse_percent("--cpu-quota", q)? }))
        } else if let Some(m) = &self.memory {
            let ms = if m.trim().ends_with('%') {
                pb::MemoryStress { bytes: 0, percent_of_total: parse_percent("--memory", m)? }
            } else {
                pb::MemoryStress { bytes: parse_bytes("--memory", m)?, percent_of_total: 0.0 }
            };
            (t.clone(), F::MemoryStress(ms))
        } else if let Some(m) = &self.memory_limit {
            (needs_target("--memory-limit")?, F::MemoryLimit(pb::MemoryLimit { limit_bytes: parse_bytes("--memory-limit", m)? }))
        } else if let Some(path) = &self.fill_disk {
            let (bytes, fill_to_percent) = match (&self.to, &self.fill_bytes) {
                (Some(p), _) => (0, parse_percent("--to", p)?),
                (None, Some(b)) => (parse_bytes("--fill-bytes", b)?, 0.0),
                (None, None) => return Err(CliError::new(exit::USAGE, "--fill-disk needs --to PERCENT or --fill-bytes SIZE")),
            };
            (Kind::Host(pb::HostTarget {}), F::DiskFill(pb::DiskFill { path: path.clone(), bytes, fill_to_percent }))
        } else if let Some(r) = &self.io_limit {
            let rate = parse_bytes("--io-limit", r.trim().trim_end_matches("/s"))?;
            let (read, write) = match self.io_direction {
                IoDirectionArg::Both => (rate, rate),
                IoDirectionArg::Read => (rate, 0),
                IoDirectionArg::Write => (0, rate),
            };
            let io = pb::IoThrottle {
                read_bytes_per_second: read,
                write_bytes_per_second: write,
                device: self.device.clone().unwrap_or_default(),
            };
            (needs_target("--io-limit")?, F::IoThrottle(io))
        } else if let Some(c) = &self.freeze_cgroup {
            (Kind::CgroupPath(c.clone()), F::CgroupFreeze(pb::CgroupFreeze {}))
        } else {
            return Ok(None);
        }))
    }

    fn correlation(&self) -> Result<f64, CliError> {
        self.correlation.as_deref().map_or(Ok(0.0), |c| parse_percent("--correlation", c))
    }

    fn scope(&self, peers: Vec<String>) -> pb::NetworkScope {
        pb::NetworkScope {
            interface: self.interface.clone().unwrap_or_default(),
            peer_cidrs: peers,
            ports: self.ports.clone(),
            protocol: self.protocol.clone().unwrap_or_default(),
            direction: match self.direction {
                DirectionArg::Both => pb::Direction::Both,
                DirectionArg::Ingress => pb::Direction::Ingress,
                DirectionArg::Egress => pb::Direction::Egress,
            } as i32,
        }
    }

    /// The fault with its target, without id, duration or labels.
    pub fn spec(&self) -> Result<pb::FaultSpec, CliError> {
        let (kind, fault) = self.kind_and_fault()?;
        Ok(pb::FaultSpec { target: Some(pb::Target { kind: Some(kind) }), fault: Some(fault), ..Default::default() })
    }

    fn kind_and_fault(&self) -> Result<(Kind, F), CliError> {
        if let Some(r) = self.resource_fault()? {
            return Ok(r);
        }
        if !self.partition.is_empty() {
            // --peer would narrow nothing here: a partition takes its peers
            // itself, and a silently wider cut is the worst surprise.
            if let Some(p) = self.peers.first() {
                let ps = self.partition.join(" --partition ");
                return Err(CliError::new(
                    exit::USAGE,
                    format!(
                        "--peer {p}: a partition takes its peers as --partition CIDR (repeatable), e.g. --partition {p}; --peer does not narrow --partition {ps}"
                    ),
                ));
            }
            let all = self.partition.iter().any(|p| p == "all");
            if all && self.partition.len() > 1 {
                return Err(CliError::new(
                    exit::USAGE,
                    format!(
                        "--partition all means every peer; it cannot go with --partition {}",
                        self.partition.iter().filter(|p| *p != "all").cloned().collect::<Vec<_>>().join(" --partition ")
                    ),
                ));
            }
            let scope = self.scope(if all { vec![] } else { self.partition.clone() });
            return Ok((self.network_target(), F::NetworkPartition(pb::NetworkPartition { scope: Some(scope) })));
        }
        if let Some(r) = &self.rate {
            let scope = self.scope(self.peers.clone());
            let bw = pb::NetworkBandwidth { scope: Some(scope), rate_bits_per_second: parse_rate(r)?, burst_bytes: 0 };
            return Ok((self.network_target(), F::NetworkBandwidth(bw)));
        }
        if let (Some(r), Some(delay)) = (&self.reorder, self.latency) {
            let reorder = pb::NetworkReorder {
                scope: Some(self.scope(self.peers.clone())),
                percent: parse_percent("--reorder", r)?,
                delay: Some(duration_to_pb(delay)),
            };
            return Ok((self.network_target(), F::NetworkReorder(reorder)));
        }
        if let Some(delay) = self.latency {
            let lat = pb::NetworkLatency {
                scope: Some(self.scope(self.peers.clone())),
                delay: Some(duration_to_pb(delay)),
                jitter: self.jitter.map(duration_to_pb),
                correlation_percent: self.correlation()?,
            };
            return Ok((self.network_target(), F::NetworkLatency(lat)));
        }
        if let Some(l) = &self.loss {
            let loss = pb::NetworkLoss {
                scope: Some(self.scope(self.peers.clone())),
                percent: parse_percent("--loss", l)?,
                correlation_percent: self.correlation()?,
            };
            return Ok((self.network_target(), F::NetworkLoss(loss)));
        }
        if let Some(c) = &self.corrupt {
            let corrupt = pb::NetworkCorrupt { scope: Some(self.scope(self.peers.clone())), percent: parse_percent("--corrupt", c)? };
            return Ok((self.network_target(), F::NetworkCorrupt(corrupt)));
        }
        if let Some(d) = &self.duplicate {
            let dup = pb::NetworkDuplicate { scope: Some(self.scope(self.peers.clone())), percent: parse_percent("--duplicate", d)? };
            return Ok((self.network_target(), F::NetworkDuplicate(dup)));
        }
        let kill = || F::ProcessKill(pb::ProcessKill { signal: self.signal.clone() });
        match (&self.pause_cgroup, &self.kill_cgroup) {
            (Some(c), _) => return Ok((Kind::CgroupPath(c.clone()), F::ProcessPause(pb::ProcessPause {}))),
            (None, Some(c)) => return Ok((Kind::CgroupPath(c.clone()), kill())),
            (None, None) => {}
        }
        let (kind, fault) = match (self.pause_pid, &self.pause_name, self.kill_pid, &self.kill_name) {
            (Some(p), ..) => (Kind::Pid(p), F::ProcessPause(pb::ProcessPause {})),
            (_, Some(n), ..) => (Kind::ProcessName(n.clone()), F::ProcessPause(pb::ProcessPause {})),
            (_, _, Some(p), _) => (Kind::Pid(p), kill()),
            (_, _, _, Some(n)) => (Kind::ProcessName(n.clone()), kill()),
            _ => {
                return Err(CliError::new(
                    exit::USAGE,
                    "choose a fault: --pause-pid, --pause-name, --kill-pid, --kill-name or --partition",
                ));
            }
        };
        Ok((kind, fault))
    }
}

impl ApplyArgs {
    fn spec(&self) -> Result<pb::FaultSpec, CliError> {
        let labels = crate::output::key_values("--label", &self.labels)?;
        Ok(pb::FaultSpec {
            id: self.id.clone().unwrap_or_default(),
            duration: Some(duration_to_pb(self.duration)),
            labels,
            ..self.fault.spec()?
        })
    }
}

/// `1mbit`, `500kbit`, `2gbit`, `8000bit` or a plain number of bits per second.
fn parse_rate(v: &str) -> Result<u64, CliError> {
    let t = v.trim().to_ascii_lowercase();
    let (num, mult) = [("gbit", 1_000_000_000u64), ("mbit", 1_000_000), ("kbit", 1_000), ("bit", 1)]
        .iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.to_string(), *m)))
        .unwrap_or((t.clone(), 1));
    let n: f64 =
        num.trim().parse().map_err(|_| CliError::new(exit::USAGE, format!("--rate: expected e.g. 1mbit or 500kbit, got {v:?}")))?;
    Ok((n * mult as f64) as u64)
}

/// `512MiB`, `2GiB`, `64M`, `100KB`, `1MB` or a plain number of bytes
/// (K/M/G and KiB/MiB/GiB are powers of 1024; KB/MB/GB of 1000).
fn parse_bytes(flag: &str, v: &str) -> Result<u64, CliError> {
    let t = v.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(CliError::new(exit::USAGE, format!("{flag}: unknown unit in {v:?} (use e.g. 512MiB, 2GiB, 1MB)"))),
    };
    let n: f64 = num.parse().map_err(|_| CliError::new(exit::USAGE, format!("{flag}: expected a size like 512MiB, got {v:?}")))?;
    Ok((n * mult as f64) as u64)
}

/// `10%` or `10` -> 10.0.
fn parse_percent(flag: &str, v: &str) -> Result<f64, CliError> {
    v.trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| CliError::new(exit::USAGE, format!("{flag}: expected a percentage like 10% or 0.5, got {v:?}")))
}

fn client(target: &Target, timeout: Duration) -> Result<AgentClient<tonic::transport::Channel>, CliError> {
    if target.local {
        if !target.socket.exists() {
            return Err(CliError::new(
                exit::UNREACHABLE,
                format!(
                    "--local: no agent socket at {} (is chaos-agent running on this host? --socket PATH names another)",
                    target.socket.display()
                ),
            ));
        }
        return Ok(AgentClient::new(local_channel(&target.socket, timeout)));
    }
    Ok(AgentClient::new(agent_channel(&target.agent, timeout)?))
}

fn state_name(s: i32) -> String {
    FaultState::try_from(s).map(|s| s.as_str_name().trim_start_matches("FAULT_STATE_").to_string()).unwrap_or_else(|_| "?".into())
}

fn reason_name(r: i32) -> String {
    match RevertReason::try_from(r) {
        Ok(RevertReason::Unspecified) | Err(_) => String::new(),
        Ok(r) => r.as_str_name().trim_start_matches("REVERT_REASON_").to_string(),
    }
}

/// The re-read after the revert: "verified", "DIFFERENT", "not compared", "" before any revert.
pub fn check_name(v: i32) -> &'static str {
    match pb::RevertCheck::try_from(v) {
        Ok(pb::RevertCheck::Verified) => "verified",
        Ok(pb::RevertCheck::Different) => "DIFFERENT",
        Ok(pb::RevertCheck::NotCompared) => "not compared",
        Ok(pb::RevertCheck::Unspecified) | Err(_) => "",
    }
}

/// The same for JSON: "verified", "different", "not_compared", "".
pub fn check_key(v: i32) -> String {
    check_name(v).to_lowercase().replace(' ', "_")
}

/// "verified: host state as before (2 items read)", or "" when there was no check.
fn check_text(f: &pb::Fault) -> String {
    match check_name(f.revert_check) {
        "" => String::new(),
        name => format!("{name}: {}", f.revert_check_detail),
    }
}

fn family(f: &pb::Fault) -> &'static str {
    f.spec.as_ref().and_then(|s| s.fault.as_ref()).map(chaos_proto::spec::family_of).unwrap_or("?")
}

fn target_text(f: &pb::Fault) -> String {
    chaos_proto::spec::target_text(f.spec.as_ref().and_then(|s| s.target.as_ref()))
}

pub fn fault_json(f: &pb::Fault) -> serde_json::Value {
    json!({
        "id": f.id, "family": family(f), "target": target_text(f), "state": state_name(f.state),
        "backend": f.applied.as_ref().map(|a| a.backend.clone()),
        "summary": f.applied.as_ref().map(|a| a.summary.clone()),
        "achieved": f.applied.as_ref().map(|a| a.achieved.clone()).unwrap_or_default(),
        "outcome": f.applied.as_ref().map(|a| a.outcome.clone()).unwrap_or_default(),
        "processes": f.applied.as_ref().map(|a| a.processes.iter().map(|p| json!({"pid": p.pid, "name": p.name, "start_time_ticks": p.start_time_ticks})).collect::<Vec<_>>()),
        "created_at": rfc3339(f.created_at.as_ref()), "applied_at": rfc3339(f.applied_at.as_ref()),
        "expires_at": rfc3339(f.expires_at.as_ref()), "reverted_at": rfc3339(f.reverted_at.as_ref()),
        "revert_reason": reason_name(f.revert_reason), "revert_summary": f.revert_summary, "error": f.error,
        "revert_check": check_key(f.revert_check), "revert_check_detail": f.revert_check_detail,
        "revert_check_took_s": crate::output::dur_secs(f.revert_check_took.as_ref()),
        "labels": f.spec.as_ref().map(|s| s.labels.clone()).unwrap_or_default(),
    })
}

fn fault_rows(faults: &[pb::Fault]) -> String {
    let rows: Vec<Vec<String>> = faults
        .iter()
        .map(|f| {
            let when = match FaultState::try_from(f.state) {
                Ok(FaultState::Applied) => format!("reverts {}", relative(f.expires_at.as_ref())),
                Ok(FaultState::Reverted) => format!("{} {}", reason_name(f.revert_reason), relative(f.reverted_at.as_ref())),
                _ if !f.error.is_empty() => f.error.clone(),
                _ => "-".into(),
            };
            let check = match check_name(f.revert_check) {
                "" => "-",
                c => c,
            };
            vec![f.id.clone(), family(f).into(), target_text(f), state_name(f.state), when, check.into(), achieved_text(f)]
        })
        .collect();
    let mut out = table(&["ID", "FAMILY", "TARGET", "STATE", "WHEN", "CHECK", "ACHIEVED"], &rows);
    // What a check that did not verify found, or why there was none.
    for f in faults.iter().filter(|f| f.revert_check != pb::RevertCheck::Verified as i32 && !f.revert_check_detail.is_empty()) {
        out.push_str(&format!("\n{}: {}", f.id, check_text(f)));
    }
    out
}

/// `cpu_load_percent=49.8` pairs and the outcome, `-` when none.
fn achieved_text(f: &pb::Fault) -> String {
    let Some(a) = f.applied.as_ref() else { return "-".into() };
    let mut pairs: Vec<(&String, &f64)> = a.achieved.iter().collect();
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let mut parts: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={}", (v * 10.0).round() / 10.0)).collect();
    if !a.outcome.is_empty() {
        parts.push(a.outcome.clone());
    }
    if parts.is_empty() { "-".into() } else { parts.join(" ") }
}

pub async fn run(cmd: AgentCommand, timeout: Duration, fmt: Format) -> Result<u8, CliError> {
    match cmd {
        AgentCommand::Faults { target, all } => {
            let server = format!("agent {}", target.name());
            let r = client(&target, timeout)?
                .list_faults(pb::ListFaultsRequest { include_finished: all })
                .await
                .map_err(|s| from_status(&server, s))?
                .into_inner();
            match fmt {
                Format::Json => emit_json(&json!({"faults": r.faults.iter().map(fault_json).collect::<Vec<_>>()})),
                Format::Table if r.faults.is_empty() => {
                    emit(if all { "no faults" } else { "no active faults (--all shows finished ones)" })
                }
                Format::Table => emit(&fault_rows(&r.faults)),
            }
        }
        AgentCommand::Apply(a) => {
            let server = format!("agent {}", a.target.name());
            let spec = a.spec()?;
            // A container stop is answered once the container has exited, up to its grace.
            let r = client(&a.target, timeout + chaos_proto::spec::apply_allowance(&spec))?
                .apply_fault(pb::ApplyFaultRequest { spec: Some(spec) })
                .await
                .map_err(|s| from_status(&server, s))?
                .into_inner();
            let f = r.fault.ok_or_else(|| CliError::new(exit::FAILURE, "agent answered without a fault"))?;
            match fmt {
                Format::Json => emit_json(&fault_json(&f)),
                Format::Table => emit(&format!(
                    "fault {} applied: {}\nreverts by itself {} (at {}); revert now with: chaos agent revert {}",
                    f.id,
                    f.applied.as_ref().map(|a| a.summary.as_str()).unwrap_or(""),
                    relative(f.expires_at.as_ref()),
                    rfc3339(f.expires_at.as_ref()).unwrap_or_default(),
                    f.id
                )),
            }
        }
        AgentCommand::Revert { target, fault_id } => {
            let server = format!("agent {}", target.name());
            let r = client(&target, timeout)?
                .revert_fault(pb::RevertFaultRequest { fault_id })
                .await
                .map_err(|s| from_status(&server, s))?
                .into_inner();
            let f = r.fault.unwrap_or_default();
            match fmt {
                Format::Json => emit_json(&json!({"already_reverted": r.already_reverted, "fault": fault_json(&f)})),
                Format::Table if r.already_reverted => emit(&format!(
                    "fault {} was already reverted ({} {})",
                    f.id,
                    reason_name(f.revert_reason),
                    relative(f.reverted_at.as_ref())
                )),
                Format::Table => match check_text(&f) {
                    c if c.is_empty() => emit(&format!("fault {} reverted: {}", f.id, f.revert_summary)),
                    c => emit(&format!("fault {} reverted: {}; {c}", f.id, f.revert_summary)),
                },
            }
        }
        AgentCommand::RevertAll { target, reason, disarm, wait } => {
            let server = format!("agent {}", target.name());
            let r = client(&target, timeout + wait)?
                .revert_all(pb::RevertAllRequest { reason, disarm, emergency: false, wait: Some(duration_to_pb(wait)) })
                .await
                .map_err(|s| from_status(&server, s))?
                .into_inner();
            match fmt {
                Format::Json => emit_json(&json!({
                    "reverted_count": r.reverted_count, "armed": r.armed,
                    "reverted": r.reverted.iter().map(fault_json).collect::<Vec<_>>(),
                    "failed": r.failed.iter().map(fault_json).collect::<Vec<_>>(),
                    "in_progress": r.in_progress.iter().map(fault_json).collect::<Vec<_>>(),
                })),
                Format::Table => {
                    emit(&format!("{} fault(s) reverted{}", r.reverted_count, if r.armed { "" } else { "; agent DISARMED" }));
                    if !r.failed.is_empty() {
                        emit(&format!("{} fault(s) FAILED to revert (journal kept, retried):\n{}", r.failed.len(), fault_rows(&r.failed)));
                    }
                    if !r.in_progress.is_empty() {
                        emit(&format!(
                            "{} fault(s) STILL REVERTING after {}: their driver is busy; the agent reverts them when it returns (`chaos agent faults`):\n{}",
                            r.in_progress.len(),
                            humantime::format_duration(wait),
                            fault_rows(&r.in_progress)
                        ));
                    }
                }
            }
            if !r.failed.is_empty() || !r.in_progress.is_empty() {
                return Ok(exit::FAILURE);
            }
        }
        AgentCommand::Capabilities { target } => {
            let server = format!("agent {}", target.name());
            let c = client(&target, timeout)?
                .get_capabilities(pb::GetCapabilitiesRequest {})
                .await
                .map_err(|s| from_status(&server, s))?
                .into_inner();
            match fmt {
                Format::Json => emit_json(&json!({
                    "agent_id": c.agent_id, "hostname": c.hostname, "version": c.version, "standalone": c.standalone,
                    "coordinator_url": c.coordinator_url, "lease_s": crate::output::dur_secs(c.lease_duration.as_ref()),
                    "armed": c.armed, "lease_lost": c.lease_lost, "kernel_release": c.kernel_release, "boot_id": c.boot_id,
                    "agent_pid": c.agent_pid, "journal_dir": c.journal_dir, "labels": c.labels,
                    "tls_identity": c.tls_identity, "tls_not_after": crate::output::rfc3339(c.tls_not_after.as_ref()),
                    "instance_id": c.instance_id, "registered": c.registered, "registration_error": c.registration_error,
                    "families": c.families.iter().map(|f| json!({"family": f.family, "supported": f.supported, "detail": f.detail})).collect::<Vec<_>>(),
                    "backends": c.backends.iter().map(|b| json!({"name": b.name, "available": b.available, "detail": b.detail})).collect::<Vec<_>>(),
                })),
                Format::Table => {
                    let mode = if c.standalone {
                        "standalone (no coordinator, no lease)".to_string()
                    } else {
                        let reg = if c.registered {
                            "registered".to_string()
                        } else if c.registration_error.is_empty() {
                            "NOT registered yet".to_string()
                        } else {
                            format!("NOT registered: {} (faults refused)", c.registration_error)
                        };
                        format!("coordinator {} (lease {}), {reg}", c.coordinator_url, crate::output::dur(c.lease_duration.as_ref()))
                    };
                    let tls = if c.tls_identity.is_empty() {
                        "OFF (--insecure)".to_string()
                    } else {
                        format!("{} until {}", c.tls_identity, crate::output::rfc3339(c.tls_not_after.as_ref()).unwrap_or_default())
                    };
                    emit(&format!(
                        "agent     {} on {} (v{}, pid {}, kernel {}, instance {})\ntls       {}\nmode      {}\narmed     {}{}\njournal   {}",
                        c.agent_id,
                        c.hostname,
                        c.version,
                        c.agent_pid,
                        c.kernel_release,
                        c.instance_id,
                        tls,
                        mode,
                        c.armed,
                        if c.lease_lost { " (LEASE LOST: faults refused)" } else { "" },
                        c.journal_dir
                    ));
                    let rows: Vec<Vec<String>> = c
                        .families
                        .iter()
                        .map(|f| vec![f.family.clone(), if f.supported { "yes".into() } else { "no".into() }, f.detail.clone()])
                        .collect();
                    emit(&table(&["FAMILY", "SUPPORTED", "DETAIL"], &rows));
                    let yes_no = |b: bool| if b { "yes".to_string() } else { "no".to_string() };
                    let rows: Vec<Vec<String>> =
                        c.backends.iter().map(|b| vec![b.name.clone(), yes_no(b.available), b.detail.clone()]).collect();
                    emit(&table(&["KERNEL BACKEND", "AVAILABLE", "DETAIL"], &rows));
                }
            }
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    #[command(no_binary_name = true)]
    struct Line {
        #[command(flatten)]
        fault: FaultArgs,
    }

    fn spec(args: &str) -> Result<pb::FaultSpec, CliError> {
        Line::try_parse_from(args.split_whitespace()).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?.fault.spec()
    }

    #[test]
    fn a_partition_is_scoped_by_its_own_peers_and_refuses_a_peer_flag() {
        let s = spec("--partition 198.18.200.3/32").expect("one peer");
        let Some(F::NetworkPartition(p)) = s.fault else { panic!("a partition: {s:?}") };
        assert_eq!(p.scope.map(|sc| sc.peer_cidrs), Some(vec!["198.18.200.3/32".to_string()]));
        let s = spec("--partition all").expect("every peer");
        let Some(F::NetworkPartition(p)) = s.fault else { panic!("a partition: {s:?}") };
        assert!(p.scope.is_some_and(|sc| sc.peer_cidrs.is_empty()));
        let e = spec("--partition all --peer 198.18.200.3/32").expect_err("would cut every peer");
        assert!(e.message.starts_with("--peer 198.18.200.3/32: a partition takes its peers as --partition CIDR"), "{}", e.message);
        let e = spec("--partition all --partition 198.18.200.3/32").expect_err("contradictory");
        assert!(e.message.contains("--partition all means every peer"), "{}", e.message);
        // --peer keeps scoping the other network faults.
        let s = spec("--loss 10% --peer 198.18.200.3/32").expect("loss");
        let Some(F::NetworkLoss(l)) = s.fault else { panic!("loss: {s:?}") };
        assert_eq!(l.scope.map(|sc| sc.peer_cidrs), Some(vec!["198.18.200.3/32".to_string()]));
    }

    #[test]
    fn a_stop_grace_goes_with_stop_and_restart_only_and_is_refused_by_flag() {
        let grace = |args: &str| match spec(args).map(|s| s.fault) {
            Ok(Some(F::ContainerAction(a))) => Ok(a.stop_grace),
            Ok(other) => panic!("a container action: {other:?}"),
            Err(e) => Err(e.message),
        };
        assert_eq!(grace("--container web --action stop --stop-grace 20s"), Ok(Some(prost_types::Duration { seconds: 20, nanos: 0 })));
        assert_eq!(grace("--container web --action restart --stop-grace 0s"), Ok(Some(prost_types::Duration::default())));
        assert_eq!(grace("--container web --action stop"), Ok(None), "unset: the agent's 5 s");
        for (args, text) in [
            ("--container web --action pause --stop-grace 20s", "--stop-grace only applies to stop and restart, got 20s for pause"),
            ("--container web --action kill --stop-grace 1s", "got 1s for kill"),
            ("--container web --action stop --stop-grace 301s", "--stop-grace must be whole seconds in 0..=300s, got 301s"),
            ("--container web --action stop --stop-grace 1500ms", "got 1.5s"),
        ] {
            let e = grace(args).expect_err(args);
            assert!(e.contains(text), "{args}: {e}");
        }
        let e = grace("--pause-pid 42 --stop-grace 20s").expect_err("no --action");
        assert!(e.contains("--action"), "{e}");
    }
}
