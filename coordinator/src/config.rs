//! Coordinator configuration: flags, environment variables and a YAML
//! file, in that order of precedence; errors name the key.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use chaos_proto::serve::LogFormat;
use clap::Parser;
use serde::Deserialize;

const EXAMPLES: &str = "\
Examples:
  chaos-coordinator                                   # 127.0.0.1:50051
  chaos-coordinator --listen 127.0.0.1:6051 --emergency-stop-deadline 1s
  chaos-coordinator --config /etc/chaos/coordinator.yaml

Config file keys (YAML): listen, emergency_stop_deadline, heartbeat_interval, state_dir.";

#[derive(Debug, Parser, Default)]
#[command(
    name = "chaos-coordinator",
    version,
    about = "Chaos coordinator: agent registry and leases, fleet arm/disarm, emergency stop",
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
    /// Log format on stderr.
    #[arg(long, env = "CHAOS_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    pub listen: Option<String>,
    pub emergency_stop_deadline: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub emergency_stop_deadline: Duration,
    pub heartbeat_interval: Duration,
    pub state_dir: PathBuf,
}

impl CoordinatorConfig {
    pub fn resolve(args: &CoordinatorArgs) -> anyhow::Result<Self> {
        let (file, origin) = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading config file {}", p.display()))?;
                let f: CoordinatorFile = serde_yaml_ng::from_str(&text).with_context(|| format!("config file {}", p.display()))?;
                (f, format!("config file {}: ", p.display()))
            }
            None => (CoordinatorFile::default(), String::new()),
        };
        let listen = match (args.listen, &file.listen) {
            (Some(a), _) => a,
            (None, Some(s)) => s.parse().with_context(|| format!("{origin}listen: invalid address {s:?} (want IP:PORT)"))?,
            (None, None) => chaos_proto::DEFAULT_COORDINATOR_ADDR.parse().context("default address")?,
        };
        let dur = |flag: Option<Duration>, v: &Option<String>, key: &str, default: Duration| -> anyhow::Result<Duration> {
            match (flag, v) {
                (Some(d), _) => Ok(d),
                (None, Some(s)) => humantime::parse_duration(s).with_context(|| format!("{origin}{key}: invalid duration {s:?}")),
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
        Ok(Self { listen, emergency_stop_deadline, heartbeat_interval, state_dir })
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
    }

    #[test]
    fn defaults_and_key_named_errors() {
        let c = CoordinatorConfig::resolve(&CoordinatorArgs::default()).expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
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
}
