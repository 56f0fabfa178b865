//! `chaos lab up|status|down`: the local lab (network namespaces on a
//! bridge, an agent per host, a coordinator, real Kafka and Cassandra).

use std::{path::PathBuf, time::Duration};

use chaos_lab::LabConfig;
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
Then drive it like any fleet:
  chaos --coordinator http://198.18.200.1:50061 agents
  chaos --coordinator http://198.18.200.1:50061 scenario create --partition 198.18.200.3/32 \\
        --netns lab-processor --agent-id processor --duration 30s --severity 3";

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the hosts, start the agents, the coordinator, Kafka and Cassandra; wait until all are healthy.
    #[command(after_help = LAB_HELP)]
    Up(LabArgs),
    /// Health of every component.
    Status(LabArgs),
    /// Stop everything and remove the namespaces, the bridge and the lab's run directory.
    Down(LabArgs),
}

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

impl LabArgs {
    fn config(&self) -> Result<LabConfig, CliError> {
        let bin_dir = match &self.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(PathBuf::from))
                .ok_or_else(|| CliError::new(exit::USAGE, "cannot locate this binary's directory: pass --bin-dir"))?,
        };
        let mut cfg = LabConfig::new(self.home.clone(), bin_dir);
        cfg.timeout = self.timeout;
        Ok(cfg)
    }
}

fn progress(line: &str) {
    eprintln!("lab: {line}");
}

fn print_status(fmt: Format, comps: &[chaos_lab::Component]) {
    match fmt {
        Format::Json => emit_json(&json!({"up": comps.iter().all(|c| c.up), "components": comps})),
        Format::Table => {
            let rows: Vec<Vec<String>> = comps
                .iter()
                .map(|c| vec![c.name.clone(), c.address.clone(), if c.up { "up".into() } else { "DOWN".into() }, c.detail.clone()])
                .collect();
            emit(&table(&["COMPONENT", "ADDRESS", "STATE", "DETAIL"], &rows));
        }
    }
}

pub fn run(cmd: LabCommand, fmt: Format) -> Result<u8, CliError> {
    let fail = |e: anyhow::Error| CliError::new(exit::FAILURE, format!("{e:#}"));
    match cmd {
        LabCommand::Up(a) => {
            let comps = chaos_lab::up(&a.config()?, &mut |l| progress(l)).map_err(fail)?;
            print_status(fmt, &comps);
            if fmt == Format::Table {
                emit(&format!(
                    "coordinator: {}   (chaos --coordinator {} agents)",
                    chaos_lab::coordinator_url(),
                    chaos_lab::coordinator_url()
                ));
            }
        }
        LabCommand::Status(a) => {
            let comps = chaos_lab::status(&a.config()?);
            print_status(fmt, &comps);
            if !comps.iter().all(|c| c.up) {
                return Ok(exit::FAILURE);
            }
        }
        LabCommand::Down(a) => chaos_lab::down(&a.config()?, &mut |l| progress(l)).map_err(fail)?,
    }
    Ok(exit::OK)
}
