//! Agent configuration: flags, environment variables and a YAML file, in
//! that order of precedence, validated at start with errors naming the key.

use chaos_proto::edge::quote;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use chaos_proto::{serve::LogFormat, spec::Cidr};
use clap::Parser;
use serde::Deserialize;

use crate::metrics::MetricsConfig;

const EXAMPLES: &str = "\
Examples:
  # Certificates first (README, \"Certificates\"): a CA, then this agent's pair,
  # whose name is its agent id and whose addresses are where it listens:
  chaos certs issue --ca /etc/chaos/ca --role agent --name kafka-1 --san 10.0.0.5 --out /etc/chaos-agent/tls

  # Registered with a coordinator over mTLS; reverts everything if it is silent for 10 s:
  chaos-agent --listen 10.0.0.5:50052 --coordinator https://10.0.0.1:50051 --label role=kafka

  # Standalone on loopback without certificates (a laptop try-out):
  chaos-agent --insecure --journal-dir /tmp/chaos-journal

  # Break-glass on the host itself, coordinator and network down:
  chaos agent revert-all --local            # through /run/chaos-agent/agent.sock (root only)
  chaos-agent revert-journal --journal-dir /var/lib/chaos-agent/journal   # no server at all

  # From a config file (flags and CHAOS_AGENT_* variables override it):
  chaos-agent --config /etc/chaos/agent.yaml

  # Prometheus /metrics on its own port (off unless set); follow a netns,
  # a process by name and a cgroup in the metric stream:
  chaos-agent --metrics-listen 127.0.0.1:9102 --watch-netns lab-kafka \\
      --watch-process java --watch-cgroup /system.slice/kafka.service

Config file keys (YAML): listen, coordinator, journal_dir, agent_id, advertise,
labels, lease, heartbeat_interval, max_fault_duration, shutdown_timeout,
protected: { pids: [..], names: [..], cidrs: [..] },
metrics: { interval, listen, netns: [..], processes: [..], cgroups: [..] },
guards: { memory_floor_bytes (default 536870912: a memory stress never leaves
less available), disk_fill_max_percent (default 95: a disk fill never goes past) },
docker_socket (default /var/run/docker.sock),
tls: { dir (default /etc/chaos-agent/tls: ca.pem, cert.pem, key.pem), ca, cert, key, insecure },
local_socket (default /run/chaos-agent/agent.sock; \"\" for none),
firewall (auto | nftables | iptables: what partitions and loss use; auto picks
nftables when the start-up probe finds it usable, else iptables).
Durations as \"10s\", \"500ms\", \"1h\".
";

/// Command line of `chaos-agent`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "chaos-agent",
    version,
    about = "Per-host chaos agent: applies real faults and reverts them for sure",
    long_about = "Per-host chaos agent. Applies faults it is asked for over gRPC (chaos.v1.Agent), \
                  journals each one to disk before touching the host, and reverts it at its TTL, on \
                  request, on emergency stop, when the coordinator is silent for longer than the lease, \
                  on SIGTERM/SIGINT, and at the next start after a crash.",
    after_help = EXAMPLES
)]
pub struct AgentArgs {
    /// YAML config file.
    #[arg(long, env = "CHAOS_AGENT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50052].
    #[arg(long, env = "CHAOS_AGENT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Coordinator URL, e.g. http://127.0.0.1:50051. Without it the agent runs standalone (no lease).
    #[arg(long, env = "CHAOS_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Directory of the fault journal [default: /var/lib/chaos-agent/journal].
    #[arg(long, env = "CHAOS_AGENT_JOURNAL_DIR", global = true)]
    pub journal_dir: Option<PathBuf>,
    /// Agent id reported to the coordinator [default: the certificate's name; with --insecure, the hostname].
    #[arg(long, env = "CHAOS_AGENT_ID")]
    pub agent_id: Option<String>,
    /// URL the coordinator uses to reach this agent [default: http://LISTEN].
    #[arg(long, env = "CHAOS_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    /// A label KEY=VALUE (repeatable), used by coordinator selectors.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Dead-man lease: revert everything when the coordinator is silent this long [default: 10s].
    #[arg(long, env = "CHAOS_AGENT_LEASE", value_parser = humantime::parse_duration)]
    pub lease: Option<Duration>,
    /// Heartbeat interval [default: a third of the lease].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Longest fault duration accepted [default: 1h].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_fault_duration: Option<Duration>,
    /// Bound on reverting everything at SIGTERM before exiting [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// A pid never to fault (repeatable; pid 1, the agent and the coordinator always are).
    #[arg(long = "protect-pid", value_name = "PID")]
    pub protect_pids: Vec<u32>,
    /// A process name never to fault (repeatable; added to the defaults).
    #[arg(long = "protect-name", value_name = "NAME")]
    pub protect_names: Vec<String>,
    /// A network (CIDR) that network faults never touch (repeatable).
    #[arg(long = "protect-cidr", value_name = "CIDR")]
    pub protect_cidrs: Vec<String>,
    /// Metrics sampling interval [default: 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub metrics_interval: Option<Duration>,
    /// Serve Prometheus text on http://ADDR/metrics [default: off].
    #[arg(long, env = "CHAOS_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// A named network namespace whose interfaces to count (repeatable).
    #[arg(long = "watch-netns", value_name = "NAME")]
    pub watch_netns: Vec<String>,
    /// A process name whose CPU and memory to report (repeatable).
    #[arg(long = "watch-process", value_name = "NAME")]
    pub watch_processes: Vec<String>,
    /// A cgroup path whose CPU and memory to report, e.g. /system.slice/kafka.service (repeatable).
    #[arg(long = "watch-cgroup", value_name = "PATH")]
    pub watch_cgroups: Vec<String>,
    /// Docker Engine socket for container faults [default: /var/run/docker.sock].
    #[arg(long, env = "CHAOS_AGENT_DOCKER_SOCKET", value_name = "PATH", global = true)]
    pub docker_socket: Option<PathBuf>,
    /// What partitions and loss drop packets with [default: auto: nftables when usable, else iptables].
    #[arg(long, env = "CHAOS_AGENT_FIREWALL", value_enum, global = true)]
    pub firewall: Option<Firewall>,
    /// The break-glass Unix socket (root only): the Agent service without the network or the
    /// coordinator [default: /run/chaos-agent/agent.sock; "" for none].
    #[arg(long, env = "CHAOS_AGENT_LOCAL_SOCKET", value_name = "PATH",
        value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from))]
    pub local_socket: Option<PathBuf>,
    #[command(flatten)]
    pub tls: chaos_proto::trust::args::TlsArgs,
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
    /// Log format on stderr.
    #[arg(long, env = "CHAOS_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// What `chaos-agent` does besides serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AgentCommand {
    /// Revert every fault the journal holds, without starting a server (for a binary that no longer
    /// starts, or a host cut off from everything). Refused while an agent holds the journal: then use
    /// `chaos agent revert-all --local`. Exit code 0 when everything was reverted, 1 when not.
    RevertJournal,
}

/// Default directory of the agent's certificates.
pub const DEFAULT_TLS_DIR: &str = "/etc/chaos-agent/tls";
/// Default break-glass socket.
pub const DEFAULT_LOCAL_SOCKET: &str = "/run/chaos-agent/agent.sock";

/// The packet filter partitions and loss use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firewall {
    /// nftables when the start-up probe finds it usable, else iptables.
    #[default]
    Auto,
    /// One nftables table per fault (inet input, netdev egress).
    Nftables,
    /// Chains of the fault's own in iptables' raw table (for hosts where nftables is unusable).
    Iptables,
}

/// The YAML config file; every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub listen: Option<String>,
    pub coordinator: Option<String>,
    pub journal_dir: Option<PathBuf>,
    pub agent_id: Option<String>,
    pub advertise: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub lease: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub max_fault_duration: Option<String>,
    pub shutdown_timeout: Option<String>,
    #[serde(default)]
    pub protected: ProtectedFile,
    #[serde(default)]
    pub metrics: MetricsFile,
    #[serde(default)]
    pub guards: GuardsFile,
    pub docker_socket: Option<PathBuf>,
    pub firewall: Option<Firewall>,
    #[serde(default)]
    pub tls: chaos_proto::trust::args::TlsFile,
    pub local_socket: Option<PathBuf>,
}

/// The `guards:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardsFile {
    pub memory_floor_bytes: Option<u64>,
    pub disk_fill_max_percent: Option<f64>,
}

/// The `metrics:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    pub interval: Option<String>,
    pub listen: Option<String>,
    #[serde(default)]
    pub netns: Vec<String>,
    #[serde(default)]
    pub processes: Vec<String>,
    #[serde(default)]
    pub cgroups: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectedFile {
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub cidrs: Vec<String>,
}

/// Names protected on every host unless the operator knows better.
pub const DEFAULT_PROTECTED_NAMES: &[&str] = &["chaos-agent", "chaos-coordinator", "sshd", "systemd-journald"];

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub coordinator: Option<String>,
    pub journal_dir: PathBuf,
    /// None: the certificate's name under TLS, else the hostname (`run::agent_id`).
    pub agent_id: Option<String>,
    pub advertise: String,
    pub labels: BTreeMap<String, String>,
    pub lease: Duration,
    pub heartbeat_interval: Duration,
    pub max_fault_duration: Duration,
    pub shutdown_timeout: Duration,
    pub protected_pids: Vec<u32>,
    pub protected_names: Vec<String>,
    pub protected_cidrs: Vec<Cidr>,
    pub metrics: MetricsConfig,
    /// Prometheus endpoint; None: off.
    pub metrics_listen: Option<SocketAddr>,
    pub guards: crate::faults::resource::Guards,
    /// The Docker Engine socket container faults talk to.
    pub docker_socket: PathBuf,
    pub firewall: Firewall,
    /// The certificates; None: --insecure (plaintext, loopback only).
    pub tls: Option<chaos_proto::trust::TlsFiles>,
    /// The break-glass Unix socket; None: none.
    pub local_socket: Option<PathBuf>,
}

fn dur(key: &str, v: &str) -> anyhow::Result<Duration> {
    chaos_proto::convert::parse_duration(v)
        .map_err(|e| anyhow::anyhow!("{key}: invalid duration {} ({e}; use e.g. \"10s\", \"500ms\")", quote(v)))
}

fn parse_label(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("--label: expected KEY=VALUE, got {s:?}"),
    }
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown-host".into())
}

impl AgentFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = chaos_proto::files::read_text(path).map_err(|e| anyhow::anyhow!("config file {e}"))?;
        chaos_proto::files::from_yaml(&path.display().to_string(), &text).map_err(|e| anyhow::anyhow!("config file {e}"))
    }
}

impl AgentConfig {
    /// Merge flags/env over the file over the defaults, and validate.
    pub fn resolve(args: &AgentArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => AgentFile::load(p)?,
            None => AgentFile::default(),
        };
        let in_file = |key: &str| match &args.config {
            Some(p) => format!("config file {}: {key}", p.display()),
            None => key.to_string(),
        };
        let listen = match (args.listen, &file.listen) {
            (Some(a), _) => a,
            (None, Some(s)) => s.parse().with_context(|| format!("{}: invalid address {} (want IP:PORT)", in_file("listen"), quote(s)))?,
            (None, None) => chaos_proto::DEFAULT_AGENT_ADDR.parse().context("default agent address")?,
        };
        let tls = args.tls.resolve(&file.tls, Path::new(DEFAULT_TLS_DIR));
        if tls.is_none() {
            chaos_proto::serve::check_plaintext_bind("chaos-agent", listen).map_err(|e| anyhow::anyhow!("{}: {e}", in_file("listen")))?;
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let coordinator = match args.coordinator.clone().or(file.coordinator.clone()).filter(|s| !s.is_empty()) {
            Some(c) if !c.contains("://") => bail!("coordinator: expected a URL like {scheme}://127.0.0.1:50051, got {c:?}"),
            Some(c) => Some(chaos_proto::trust::normalize_url(&c, tls.is_some()).map_err(|e| anyhow::anyhow!("coordinator: {e}"))?),
            None => None,
        };
        let opt_dur = |flag: Option<Duration>, file_v: &Option<String>, key: &str| -> anyhow::Result<Option<Duration>> {
            match (flag, file_v) {
                (Some(d), _) => Ok(Some(d)),
                (None, Some(s)) => dur(&in_file(key), s).map(Some),
                (None, None) => Ok(None),
            }
        };
        let lease = opt_dur(args.lease, &file.lease, "lease")?.unwrap_or(Duration::from_secs(10));
        if !(chaos_proto::spec::MIN_AGENT_LEASE..=chaos_proto::spec::MAX_AGENT_LEASE).contains(&lease) {
            bail!(
                "lease: must be in {}..={}, got {}",
                humantime::format_duration(chaos_proto::spec::MIN_AGENT_LEASE),
                humantime::format_duration(chaos_proto::spec::MAX_AGENT_LEASE),
                humantime::format_duration(lease)
            );
        }
        let heartbeat_interval = opt_dur(args.heartbeat_interval, &file.heartbeat_interval, "heartbeat_interval")?.unwrap_or(lease / 3);
        if heartbeat_interval.is_zero() || heartbeat_interval >= lease {
            bail!(
                "heartbeat_interval: must be > 0 and shorter than the lease ({}), got {}",
                humantime::format_duration(lease),
                humantime::format_duration(heartbeat_interval)
            );
        }
        let max_fault_duration =
            opt_dur(args.max_fault_duration, &file.max_fault_duration, "max_fault_duration")?.unwrap_or(Duration::from_secs(3600));
        if max_fault_duration.is_zero() {
            bail!("max_fault_duration: must be > 0");
        }
        let shutdown_timeout =
            opt_dur(args.shutdown_timeout, &file.shutdown_timeout, "shutdown_timeout")?.unwrap_or(Duration::from_secs(10));
        let mut labels = file.labels.clone();
        for l in &args.labels {
            let (k, v) = parse_label(l)?;
            labels.insert(k, v);
        }
        let advertise = match args.advertise.clone().or(file.advertise.clone()) {
            Some(a) => chaos_proto::trust::normalize_url(&a, tls.is_some()).map_err(|e| anyhow::anyhow!("advertise: {e}"))?,
            None if listen.ip().is_unspecified() && coordinator.is_some() => {
                bail!("advertise: listening on {listen} (all addresses); set --advertise to the URL the coordinator should use")
            }
            None => format!("{scheme}://{listen}"),
        };
        let mut protected_names: Vec<String> = DEFAULT_PROTECTED_NAMES.iter().map(|s| s.to_string()).collect();
        protected_names.extend(file.protected.names.iter().cloned());
        protected_names.extend(args.protect_names.iter().cloned());
        let mut protected_cidrs = Vec::new();
        for (c, key) in file
            .protected
            .cidrs
            .iter()
            .map(|c| (c, in_file("protected.cidrs")))
            .chain(args.protect_cidrs.iter().map(|c| (c, "--protect-cidr".to_string())))
        {
            protected_cidrs.push(c.parse::<Cidr>().map_err(|e| anyhow::anyhow!("{key}: {e}"))?);
        }
        let metrics_interval =
            opt_dur(args.metrics_interval, &file.metrics.interval, "metrics.interval")?.unwrap_or(Duration::from_secs(1));
        if metrics_interval < Duration::from_millis(100) || metrics_interval > Duration::from_secs(3600) {
            bail!("metrics.interval: must be in [100ms, 1h], got {}", humantime::format_duration(metrics_interval));
        }
        let metrics_listen = match (args.metrics_listen, &file.metrics.listen) {
            (Some(a), _) => Some(a),
            (None, Some(s)) if !s.is_empty() => {
                Some(s.parse().with_context(|| format!("{}: invalid address {} (want IP:PORT)", in_file("metrics.listen"), quote(s)))?)
            }
            _ => None,
        };
        let mut metrics = MetricsConfig { interval: metrics_interval, ..Default::default() };
        metrics.netns = file.metrics.netns.iter().chain(&args.watch_netns).cloned().collect();
        metrics.processes = file.metrics.processes.iter().chain(&args.watch_processes).cloned().collect();
        metrics.cgroups = file.metrics.cgroups.iter().chain(&args.watch_cgroups).cloned().collect();
        for ns in &metrics.netns {
            if !chaos_proto::spec::is_netns_name(ns) {
                bail!("metrics.netns: {} is not a namespace name (a file name under /run/netns)", quote(ns));
            }
        }
        for cg in &metrics.cgroups {
            if !cg.starts_with('/') || cg.split('/').any(|c| c == "..") {
                bail!("metrics.cgroups: {} is not an absolute cgroup path like /system.slice/kafka.service", quote(cg));
            }
        }
        let mut protected_pids = file.protected.pids.clone();
        protected_pids.extend(&args.protect_pids);
        let mut guards = crate::faults::resource::Guards::default();
        if let Some(b) = file.guards.memory_floor_bytes {
            guards.memory_floor_bytes = b;
        }
        if let Some(p) = file.guards.disk_fill_max_percent {
            if !(p > 0.0 && p <= 100.0) {
                bail!("guards.disk_fill_max_percent: must be in (0, 100], got {p}");
            }
            guards.disk_fill_max_permyriad = (p * 100.0).round() as u32;
        }
        Ok(AgentConfig {
            listen,
            coordinator,
            journal_dir: args
                .journal_dir
                .clone()
                .or(file.journal_dir.clone())
                .unwrap_or_else(|| PathBuf::from("/var/lib/chaos-agent/journal")),
            agent_id: args.agent_id.clone().or(file.agent_id.clone()).filter(|s| !s.is_empty()),
            advertise,
            labels,
            lease,
            heartbeat_interval,
            max_fault_duration,
            shutdown_timeout,
            protected_pids,
            protected_names,
            protected_cidrs,
            metrics,
            metrics_listen,
            guards,
            docker_socket: args
                .docker_socket
                .clone()
                .or(file.docker_socket.clone())
                .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock")),
            firewall: args.firewall.or(file.firewall).unwrap_or_default(),
            tls,
            local_socket: match args.local_socket.clone().or(file.local_socket.clone()) {
                Some(p) if p.as_os_str().is_empty() => None,
                Some(p) => Some(p),
                None => Some(PathBuf::from(DEFAULT_LOCAL_SOCKET)),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(yaml: &str) -> (tempfile::TempDir, AgentArgs) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("agent.yaml");
        std::fs::write(&p, yaml).expect("write");
        (dir, AgentArgs { config: Some(p), ..Default::default() })
    }

    #[test]
    fn shipped_example_file_is_valid() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/agent.yaml");
        let c = AgentConfig::resolve(&AgentArgs { config: Some(p), ..Default::default() }).expect("example config");
        assert_eq!(c.coordinator.as_deref(), Some("https://127.0.0.1:50051"));
        assert_eq!(c.tls, Some(chaos_proto::trust::TlsFiles::in_dir(Path::new("/etc/chaos-agent/tls"))));
        assert_eq!(c.local_socket.as_deref(), Some(Path::new("/run/chaos-agent/agent.sock")));
        assert_eq!(c.labels.get("role").map(String::as_str), Some("kafka"));
    }

    #[test]
    fn an_empty_local_socket_on_the_command_line_turns_it_off() {
        use clap::Parser;
        let args = AgentArgs::try_parse_from(["chaos-agent", "--local-socket", ""]).expect("empty value parses");
        let c = AgentConfig::resolve(&args).expect("resolve");
        assert_eq!(c.local_socket, None);
        let args = AgentArgs::try_parse_from(["chaos-agent", "--local-socket", "/tmp/a.sock"]).expect("parses");
        assert_eq!(AgentConfig::resolve(&args).expect("resolve").local_socket.as_deref(), Some(Path::new("/tmp/a.sock")));
    }

    #[test]
    fn defaults() {
        let c = AgentConfig::resolve(&AgentArgs::default()).expect("resolve");
        assert_eq!(c.listen.to_string(), "127.0.0.1:50052");
        assert_eq!(c.lease, Duration::from_secs(10));
        assert_eq!(c.advertise, "https://127.0.0.1:50052");
        assert!(c.coordinator.is_none());
        assert!(c.protected_names.iter().any(|n| n == "sshd"));
        assert!(c.tls.is_some(), "TLS is on by default");
    }

    #[test]
    fn insecure_is_loopback_only_and_schemes_follow_the_mode() {
        let mut args = AgentArgs::default();
        args.tls.insecure = true;
        let c = AgentConfig::resolve(&args).expect("loopback");
        assert!(c.tls.is_none());
        assert_eq!(c.advertise, "http://127.0.0.1:50052");
        args.listen = Some("198.18.0.2:50052".parse().expect("addr"));
        let e = format!("{:#}", AgentConfig::resolve(&args).expect_err("non-loopback plaintext"));
        assert!(e.contains("--insecure") && e.contains("198.18.0.2:50052"), "{e}");
        let args = AgentArgs { coordinator: Some("http://127.0.0.1:50051".into()), ..Default::default() };
        let e = format!("{:#}", AgentConfig::resolve(&args).expect_err("plaintext URL with TLS on"));
        assert!(e.contains("coordinator") && e.contains("https://127.0.0.1:50051"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let (_d, mut args) = with_file("listen: 127.0.0.1:6000\nlease: 4s\nlabels: {role: kafka}\nprotected: {names: [java]}\n");
        let c = AgentConfig::resolve(&args).expect("resolve");
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.lease, Duration::from_secs(4));
        assert_eq!(c.labels.get("role").map(String::as_str), Some("kafka"));
        assert!(c.protected_names.iter().any(|n| n == "java"));
        args.listen = Some("127.0.0.1:7000".parse().expect("addr"));
        args.labels = vec!["role=cassandra".into()];
        let c = AgentConfig::resolve(&args).expect("resolve");
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.labels.get("role").map(String::as_str), Some("cassandra"));
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let (_d, args) = with_file("lease: 10q\n");
        let e = format!("{:#}", AgentConfig::resolve(&args).expect_err("bad duration"));
        assert!(e.contains("lease") && e.contains("10q"), "{e}");
        let (_d, args) = with_file("leese: 10s\n");
        let e = format!("{:#}", AgentConfig::resolve(&args).expect_err("unknown key"));
        assert!(e.contains("leese"), "{e}");
        let (_d, args) = with_file("coordinator: 127.0.0.1:50051\n");
        let e = format!("{:#}", AgentConfig::resolve(&args).expect_err("not a url"));
        assert!(e.contains("coordinator") && e.contains("127.0.0.1:50051"), "{e}");
        let (_d, args) = with_file("lease: 3s\nheartbeat_interval: 5s\n");
        assert!(format!("{:#}", AgentConfig::resolve(&args).expect_err("hb")).contains("heartbeat_interval"));
        let (_d, args) = with_file("metrics: {netns: [../etc]}\n");
        assert!(format!("{:#}", AgentConfig::resolve(&args).expect_err("netns")).contains("\"../etc\""));
        let (_d, args) = with_file("metrics: {interval: 10ms}\n");
        assert!(format!("{:#}", AgentConfig::resolve(&args).expect_err("interval")).contains("metrics.interval"));
        let (_d, args) = with_file("metrics: {cgroups: [relative/path]}\n");
        assert!(format!("{:#}", AgentConfig::resolve(&args).expect_err("cgroup")).contains("relative/path"));
        let args = AgentArgs { labels: vec!["novalue".into()], ..Default::default() };
        assert!(format!("{:#}", AgentConfig::resolve(&args).expect_err("label")).contains("novalue"));
    }
}
