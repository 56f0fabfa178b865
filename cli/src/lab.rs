//! `chaos lab up|status|down`: the local lab (network namespaces on a
//! bridge, an agent per host, a coordinator, real Kafka and Cassandra).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use chaos_lab::LabConfig;
use chaos_proto::pb;
use clap::Subcommand;
use serde_json::json;

use crate::output::{CliError, Format, emit, emit_json, exit, table};

const LAB_HELP: &str = "\
The lab (as root):
  host: bridge chaoslab0 198.18.200.1/24, chaos-coordinator on :50061
   ├─ lab-kafka      198.18.200.2  agent :50062, Kafka 4 (KRaft) :9092
   ├─ lab-cassandra  198.18.200.3  agent :50062, Cassandra 5 CQL :9042
   ├─ lab-processor  198.18.200.4  agent :50062
   └─ lab-collector  198.18.200.5  agent :50062

Kafka and Cassandra run from their Maven Central jars, fetched once with
  CHAOS_LAB_HOME=/var/lib/chaos-lab bash deploy/lab/fetch.sh
Every channel is mTLS: `up` makes a CA and certificates in HOME/run/tls (the lab verbs use its
admin certificate by themselves). Then drive it like any fleet:
  eval \"$(chaos lab env)\"      # CHAOS_COORDINATOR and CHAOS_TLS_DIR (the lab's admin certificate)
  chaos agents
  chaos scenario create --partition 198.18.200.3/32 --netns lab-processor --agent-id processor \\
        --duration 30s --severity 3
  chaos agent faults --local --socket /var/lib/chaos-lab/run/agent-kafka.sock   # break-glass";

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the hosts, start the agents, the coordinator, Kafka and Cassandra; wait until all are healthy
    /// and the coordinator sees the four agents and its Kafka and Cassandra probes up.
    #[command(after_help = LAB_HELP)]
    Up(LabArgs),
    /// Health of every component.
    Status(LabArgs),
    /// Stop everything and remove the namespaces, the bridge and the lab's run directory.
    Down(LabArgs),
    /// Run a failure drill under load: inject, assert the expected behaviour, validate recovery and data.
    #[command(after_help = DRILL_HELP)]
    Drill(crate::drill::DrillArgs),
    /// Print the shell exports that point `chaos` at the lab: eval "$(chaos lab env)".
    Env(LabArgs),
}

const DRILL_HELP: &str = "\
Each drill starts the collector (load at --rate), measures a baseline, injects its faults through
coordinator scenarios, samples producer_count / kafka_count / cassandra_count every second and checks
what the drill expects while the faults hold, then validates recovery (availability, lag drained,
every acknowledged event stored exactly once, throughput and latency back to the baseline).
Drills always talk to the lab's coordinator (198.18.200.1:50061), whatever --coordinator says.
Exit code 0 when the drill passed, 1 when not.

Example:  chaos lab drill kafka-down --rate 200 --fault-duration 15s
          chaos -o json lab drill all > drills.json";

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// The lab's directory: jars/ (kept) and run/ (removed by down).
    #[arg(long, env = "CHAOS_LAB_HOME", default_value = "/var/lib/chaos-lab")]
    home: PathBuf,
    /// Where chaos-agent and chaos-coordinator are [default: next to this chaos binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// How long `up` waits for every service to be healthy.
    #[arg(long, default_value = "4m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// `--bin-dir`, or the directory of this chaos binary.
pub fn bin_dir(given: &Option<PathBuf>) -> Result<PathBuf, CliError> {
    match given {
        Some(d) => Ok(d.clone()),
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
            .ok_or_else(|| CliError::new(exit::USAGE, "cannot locate this binary's directory: pass --bin-dir")),
    }
}

impl LabArgs {
    fn config(&self) -> Result<LabConfig, CliError> {
        let mut cfg = LabConfig::new(self.home.clone(), bin_dir(&self.bin_dir)?);
        cfg.timeout = self.timeout;
        Ok(cfg)
    }
}

fn progress(line: &str) {
    eprintln!("lab: {line}");
}

/// What the lab's coordinator does not see yet that an experiment needs:
/// each host's agent healthy, its Kafka and Cassandra probes up.
async fn not_ready(url: &str) -> Vec<String> {
    let Ok(ch) = crate::conn::coordinator_channel(url, Duration::from_secs(2)) else { return vec!["the coordinator".into()] };
    let mut c = pb::coordinator_client::CoordinatorClient::new(ch);
    let mut missing = vec![];
    match c.list_agents(pb::ListAgentsRequest {}).await {
        Ok(r) => {
            let agents = r.into_inner().agents;
            for h in chaos_lab::HOSTS {
                let healthy = agents.iter().any(|a| a.agent_id == h.name && a.health == pb::AgentHealth::Healthy as i32);
                if !healthy {
                    missing.push(format!("agent {}", h.name));
                }
            }
        }
        Err(_) => return vec!["the coordinator".into()],
    }
    let req = pb::GetMetricsRequest { metric_prefixes: vec!["probe.up".into()], ..Default::default() };
    let batches = c.get_metrics(req).await.map(|r| r.into_inner().batches).unwrap_or_default();
    for probe in ["kafka", "cassandra"] {
        let up = batches
            .iter()
            .filter(|b| !b.stale && b.source == format!("probe:{probe}"))
            .flat_map(|b| &b.metrics)
            .any(|m| m.name == "probe.up" && m.value >= 1.0);
        if !up {
            missing.push(format!("its {probe} probe"));
        }
    }
    missing
}

/// Wait until [`not_ready`] is empty, up to `within`.
async fn wait_ready(within: Duration) -> Result<(), CliError> {
    let url = chaos_lab::coordinator_url();
    let (started, mut shown) = (Instant::now(), Instant::now());
    loop {
        let missing = not_ready(&url).await;
        if missing.is_empty() {
            progress(&format!("the coordinator sees the agents and its probes up ({:.0} s)", started.elapsed().as_secs_f64()));
            return Ok(());
        }
        if started.elapsed() >= within {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "the lab's services are up, but after {} its coordinator ({url}) still misses {}: see `chaos lab status` and run/logs/coordinator.log",
                    humantime::format_duration(within),
                    missing.join(", ")
                ),
            ));
        }
        if shown.elapsed() >= Duration::from_secs(5) {
            progress(&format!("waiting for the coordinator to see {}", missing.join(", ")));
            shown = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_status(fmt: Format, comps: &[chaos_lab::Component], counts: Option<&crate::drill::Counts>) {
    match fmt {
        Format::Json => emit_json(&json!({"up": comps.iter().all(|c| c.up), "components": comps, "pipeline": counts})),
        Format::Table => {
            let rows: Vec<Vec<String>> = comps
                .iter()
                .map(|c| vec![c.name.clone(), c.address.clone(), if c.up { "up".into() } else { "DOWN".into() }, c.detail.clone()])
                .collect();
            emit(&table(&["COMPONENT", "ADDRESS", "STATE", "DETAIL"], &rows));
            if let Some(c) = counts {
                emit(&format!(
                    "pipeline: producer_count {} (acked {})  kafka_count {}  cassandra_count {}   (-1: unavailable)",
                    c.producer_count, c.acked_count, c.kafka_count, c.cassandra_count
                ));
            }
        }
    }
}

/// The lab's home, wherever the verb keeps it.
fn home_of(cmd: &LabCommand) -> PathBuf {
    match cmd {
        LabCommand::Up(a) | LabCommand::Status(a) | LabCommand::Down(a) | LabCommand::Env(a) => a.home.clone(),
        LabCommand::Drill(d) => d.home().to_path_buf(),
    }
}

pub async fn run(cmd: LabCommand, fmt: Format) -> Result<u8, CliError> {
    let fail = |e: anyhow::Error| CliError::new(exit::FAILURE, format!("{e:#}"));
    // The lab verbs dial only the lab, as its admin.
    crate::conn::use_lab_certificates(LabConfig::new(home_of(&cmd), PathBuf::new()).admin_tls_dir());
    match cmd {
        LabCommand::Up(a) => {
            let comps = chaos_lab::up(&a.config()?, &mut |l| progress(l)).map_err(fail)?;
            // Up means ready for an experiment: its steady state reads these.
            wait_ready(Duration::from_secs(60)).await?;
            print_status(fmt, &comps, None);
            if fmt == Format::Table {
                emit(&format!(
                    "coordinator: {}   certificates: {}\ndrive it: eval \"$(chaos lab env)\"; chaos agents",
                    chaos_lab::coordinator_url(),
                    a.config()?.tls_dir("").display()
                ));
            }
        }
        LabCommand::Status(a) => {
            let cfg = a.config()?;
            let comps = chaos_lab::status(&cfg);
            let counts = if comps.iter().any(|c| c.up) { Some(crate::drill::Counter::new(&cfg).read().await) } else { None };
            print_status(fmt, &comps, counts.as_ref());
            if !comps.iter().all(|c| c.up) {
                return Ok(exit::FAILURE);
            }
        }
        LabCommand::Down(a) => chaos_lab::down(&a.config()?, &mut |l| progress(l)).map_err(fail)?,
        LabCommand::Drill(a) => return crate::drill::run(a, fmt).await,
        LabCommand::Env(a) => {
            let cfg = a.config()?;
            let dir = cfg.admin_tls_dir();
            match fmt {
                Format::Json => emit_json(&json!({"CHAOS_COORDINATOR": chaos_lab::coordinator_url(), "CHAOS_TLS_DIR": dir})),
                Format::Table => emit(&format!(
                    "export CHAOS_COORDINATOR={} CHAOS_TLS_DIR={}\nunset CHAOS_INSECURE CHAOS_TLS_CA CHAOS_TLS_CERT CHAOS_TLS_KEY",
                    chaos_lab::coordinator_url(),
                    dir.display()
                )),
            }
        }
    }
    Ok(exit::OK)
}
