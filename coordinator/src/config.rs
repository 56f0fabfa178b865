//! Coordinator configuration: flags, environment variables and a YAML
//! file, in that order of precedence; errors name the key.

use chaos_proto::edge::quote;
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use chaos_proto::serve::LogFormat;
use clap::Parser;
use serde::Deserialize;

use crate::{
    monitor::{MonitoringConfig, MonitoringFile},
    policy::{ChaosTestingFile, DurationValue, LevelFile, Policy, PolicyFile, TypeFile},
    validate::RecoveryDefaults,
};

const EXAMPLES: &str = "\
Examples:
  # Certificates first (README, \"Certificates\"): the CA, then this coordinator's pair
  chaos certs issue --ca /etc/chaos/ca --role coordinator --name coord-1 --san 10.0.0.1 --out /etc/chaos-coordinator/tls
  chaos-coordinator --listen 10.0.0.1:50051         # mTLS with /etc/chaos-coordinator/tls/{ca,cert,key}.pem
  chaos-coordinator --insecure                        # a laptop try-out: plaintext on 127.0.0.1:50051
  chaos-coordinator --listen 127.0.0.1:6051 --emergency-stop-deadline 1s
  kill -HUP $(pidof chaos-coordinator)                # reload the certificates (open connections keep theirs)
  chaos-coordinator --config /etc/chaos/coordinator.yaml
  chaos-coordinator --metrics-listen 127.0.0.1:9101  # Prometheus /metrics

Config file (YAML; deploy/config/coordinator.yaml documents every key):
  listen, emergency_stop_deadline, heartbeat_interval, state_dir,
  chaos_testing.* (default_duration, safety_timeout, blast_radius_limit,
  max_concurrent_scenarios, default_severity, ...), severity_levels.N.*,
  scenarios.TYPE.* (enabled, severity_levels, memory_pressure, cpu_throttle,
  target_services, failure_types), monitoring.* (metrics_interval, alerts,
  alert_thresholds, probes, listen, window), recovery.*,
  tls.* (dir, ca, cert, key, insecure; default dir /etc/chaos-coordinator/tls)";

#[derive(Debug, Parser, Default)]
#[command(
    name = "chaos-coordinator",
    version,
    about = "Chaos coordinator: agent registry and leases, scenarios under safety rules, emergency stop, audit",
    after_help = EXAMPLES
)]
pub struct CoordinatorArgs {
    /// YAML config file.
    #[arg(long, env = "CHAOS_COORDINATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "CHAOS_COORDINATOR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Per-agent deadline of emergency stop [default: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub emergency_stop_deadline: Option<Duration>,
    /// Directory of persistent state (the fleet's armed flag) [default: /var/lib/chaos-coordinator].
    #[arg(long, env = "CHAOS_COORDINATOR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Heartbeat interval suggested to agents [default: 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Serve Prometheus text on http://ADDR/metrics [default: off; config monitoring.listen].
    #[arg(long, env = "CHAOS_COORDINATOR_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: chaos_proto::trust::args::TlsArgs,
    /// Log format on stderr.
    #[arg(long, env = "CHAOS_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// Default directory of the coordinator's certificates.
pub const DEFAULT_TLS_DIR: &str = "/etc/chaos-coordinator/tls";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    pub listen: Option<String>,
    pub emergency_stop_deadline: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub chaos_testing: Option<ChaosTestingFile>,
    pub severity_levels: Option<BTreeMap<u32, LevelFile>>,
    pub scenarios: Option<BTreeMap<String, TypeFile>>,
    pub monitoring: Option<MonitoringFile>,
    pub recovery: Option<RecoveryFile>,
    #[serde(default)]
    pub tls: chaos_proto::trust::args::TlsFile,
}

/// The seed's `recovery:` section: the defaults of `ValidateRecovery`
/// (`max_recovery_attempts` rounds, `health_check_interval` between them,
/// `recovery_timeout` for the lag to drain). `auto_recovery` is accepted;
/// reverts are always automatic here (TTL, lease, journal).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryFile {
    pub auto_recovery: Option<bool>,
    pub max_recovery_attempts: Option<u32>,
    pub recovery_timeout: Option<DurationValue>,
    pub health_check_interval: Option<DurationValue>,
}

/// " (line N)" for the first line of `text` that sets `key`, to point at a
/// value that parsed but is out of range.
fn line_of(text: &str, key: &str) -> String {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    text.lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches('-').trim_start();
            t.starts_with(&format!("{leaf}:")) || t.contains(&format!(" {leaf}:")) || t.contains(&format!("{{{leaf}:"))
        })
        .map(|n| format!(" (line {})", n + 1))
        .unwrap_or_default()
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub emergency_stop_deadline: Duration,
    pub heartbeat_interval: Duration,
    pub state_dir: PathBuf,
    pub policy: Policy,
    pub monitoring: MonitoringConfig,
    /// Defaults of recovery validation, from `recovery:`.
    pub recovery: RecoveryDefaults,
    /// The certificates; None: --insecure (plaintext, loopback only).
    pub tls: Option<chaos_proto::trust::TlsFiles>,
}

impl CoordinatorConfig {
    pub fn resolve(args: &CoordinatorArgs) -> anyhow::Result<Self> {
        let (file, origin, text) = match &args.config {
            Some(p) => {
                let text = chaos_proto::files::read_text(p).map_err(|e| anyhow::anyhow!("config file {e}"))?;
                let f: CoordinatorFile =
                    chaos_proto::files::from_yaml(&p.display().to_string(), &text).map_err(|e| anyhow::anyhow!("config file {e}"))?;
                (f, format!("config file {}: ", p.display()), text)
            }
            None => (CoordinatorFile::default(), String::new(), String::new()),
        };
        let policy = PolicyFile {
            chaos_testing: file.chaos_testing.as_ref(),
            severity_levels: file.severity_levels.as_ref(),
            scenarios: file.scenarios.as_ref(),
        }
        .resolve()
        .map_err(|e| {
            let key = e.split(':').next().unwrap_or_default();
            anyhow::anyhow!("{origin}{e}{}", line_of(&text, key))
        })?;
        let mut monitoring = file.monitoring.clone().unwrap_or_default().resolve().map_err(|e| {
            let key = e.split(':').next().unwrap_or_default().split('[').next().unwrap_or_default();
            anyhow::anyhow!("{origin}{e}{}", line_of(&text, key))
        })?;
        if let Some(l) = args.metrics_listen {
            monitoring.listen = Some(l);
        }
        let rf = file.recovery.clone().unwrap_or_default();
        let mut recovery = RecoveryDefaults::default();
        for (key, v, out) in [
            ("recovery.recovery_timeout", &rf.recovery_timeout, &mut recovery.recovery_timeout),
            ("recovery.health_check_interval", &rf.health_check_interval, &mut recovery.retry_interval),
        ] {
            if let Some(d) = v {
                *out = d
                    .resolve(key)
                    .and_then(|d| if d.is_zero() { Err(format!("{key}: must be above 0")) } else { Ok(d) })
                    .map_err(|e| anyhow::anyhow!("{origin}{e}{}", line_of(&text, key)))?;
            }
        }
        match rf.max_recovery_attempts {
            Some(0) => {
                bail!("{origin}recovery.max_recovery_attempts: must be at least 1, got 0{}", line_of(&text, "max_recovery_attempts"))
            }
            Some(n) => recovery.max_attempts = n,
            None => {}
        }
        let listen = match (args.listen, &file.listen) {
            (Some(a), _) => a,
            (None, Some(s)) => s.parse().with_context(|| format!("{origin}listen: invalid address {} (want IP:PORT)", quote(s)))?,
            (None, None) => chaos_proto::DEFAULT_COORDINATOR_ADDR.parse().context("default address")?,
        };
        let dur = |flag: Option<Duration>, v: &Option<String>, key: &str, default: Duration| -> anyhow::Result<Duration> {
            match (flag, v) {
                (Some(d), _) => Ok(d),
                (None, Some(s)) => chaos_proto::convert::parse_duration(s)
                    .map_err(|e| anyhow::anyhow!("{origin}{key}: invalid duration {} ({e})", quote(s))),
                (None, None) => Ok(default),
            }
        };
        let emergency_stop_deadline =
            dur(args.emergency_stop_deadline, &file.emergency_stop_deadline, "emergency_stop_deadline", Duration::from_secs(2))?;
        if emergency_stop_deadline.is_zero() || emergency_stop_deadline > Duration::from_secs(60) {
            bail!("emergency_stop_deadline: must be in (0s, 60s], got {}", humantime::format_duration(emergency_stop_deadline));
        }
        let heartbeat_interval = dur(args.heartbeat_interval, &file.heartbeat_interval, "heartbeat_interval", Duration::from_secs(3))?;
        let state_dir = args.state_dir.clone().or(file.state_dir.clone()).unwrap_or_else(|| PathBuf::from("/var/lib/chaos-coordinator"));
        let tls = args.tls.resolve(&file.tls, std::path::Path::new(DEFAULT_TLS_DIR));
        if tls.is_none() {
            chaos_proto::serve::check_plaintext_bind("chaos-coordinator", listen).map_err(|e| anyhow::anyhow!("{origin}listen: {e}"))?;
        }
        Ok(Self { listen, emergency_stop_deadline, heartbeat_interval, state_dir, policy, monitoring, recovery, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_file_is_valid() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/coordinator.yaml");
        let c = CoordinatorConfig::resolve(&CoordinatorArgs { config: Some(p), ..Default::default() }).expect("example config");
        assert_eq!(c.emergency_stop_deadline, Duration::from_secs(2));
        // The example documents the defaults: the policy it gives equals the built-in one
        // apart from its examples (per-type rules).
        let mut p = c.policy.clone();
        p.types.clear();
        assert_eq!(p, crate::policy::Policy::default());
        assert_eq!(c.policy.types.len(), 4);
        assert_eq!(c.recovery.max_attempts, 3);
        assert_eq!(c.recovery.recovery_timeout, Duration::from_secs(120));
        assert_eq!(c.recovery.retry_interval, Duration::from_secs(5));
        assert_eq!(c.monitoring.rules.len(), 3, "the seed threshold and two alert examples");
    }

    #[test]
    fn defaults_and_key_named_errors() {
        let c = CoordinatorConfig::resolve(&CoordinatorArgs::default()).expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.tls, Some(chaos_proto::trust::TlsFiles::in_dir(std::path::Path::new(DEFAULT_TLS_DIR))), "TLS by default");
        let mut args = CoordinatorArgs { listen: Some("0.0.0.0:50051".parse().expect("addr")), ..Default::default() };
        args.tls.insecure = true;
        let e = format!("{:#}", CoordinatorConfig::resolve(&args).expect_err("plaintext beyond loopback"));
        assert!(e.contains("--insecure") && e.contains("0.0.0.0:50051"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, "emergency_stop_deadline: soon\n").expect("write");
        let e = format!(
            "{:#}",
            CoordinatorConfig::resolve(&CoordinatorArgs { config: Some(p.clone()), ..Default::default() }).expect_err("bad")
        );
        assert!(e.contains("emergency_stop_deadline") && e.contains("soon"), "{e}");
        std::fs::write(&p, "listn: 1\n").expect("write");
        let e = format!("{:#}", CoordinatorConfig::resolve(&CoordinatorArgs { config: Some(p), ..Default::default() }).expect_err("bad"));
        assert!(e.contains("listn"), "{e}");
    }

    #[test]
    fn policy_errors_name_file_key_value_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, "listen: 127.0.0.1:1\nchaos_testing:\n  default_duration: 300\n  blast_radius_limit: 2\n").expect("write");
        let e = format!(
            "{:#}",
            CoordinatorConfig::resolve(&CoordinatorArgs { config: Some(p.clone()), ..Default::default() }).expect_err("bad")
        );
        assert!(e.contains("chaos_testing.blast_radius_limit: must be a fraction in (0, 1], got 2 (line 4)"), "{e}");
        std::fs::write(&p, "chaos_testing:\n  max_concurent_scenarios: 3\n").expect("write");
        let e = format!(
            "{:#}",
            CoordinatorConfig::resolve(&CoordinatorArgs { config: Some(p.clone()), ..Default::default() }).expect_err("bad")
        );
        assert!(e.contains("max_concurent_scenarios") && e.contains("c.yaml:2:"), "the key and its line: {e}");
        std::fs::write(&p, "recovery:\n  max_recovery_attempts: 3\n  recovery_timeout: later\n").expect("write");
        let e = format!("{:#}", CoordinatorConfig::resolve(&CoordinatorArgs { config: Some(p), ..Default::default() }).expect_err("bad"));
        assert!(e.contains("recovery.recovery_timeout: invalid duration \"later\"") && e.contains("line 3"), "{e}");
    }
}
