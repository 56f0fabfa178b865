//! `chaos`: the command line of the chaos platform. One module per verb
//! group; this file parses, dispatches, and turns errors into exit codes.

mod agent;
mod certs;
mod conn;
mod drill;
mod experiment;
mod fleet;
mod gameday;
mod lab;
mod load;
mod output;
mod scenario;
mod validate;
mod watch;

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use output::Format;

const EXAMPLES: &str = "\
Examples:
  chaos agents                                  # agents registered with the coordinator
  chaos status                                  # armed?, agent health, active faults
  chaos agent apply --pause-name sleep --duration 30s
  chaos agent faults --all                      # active and recently finished faults
  chaos emergency-stop --reason 'SLO breach'    # revert everything everywhere, disarm
  chaos arm --reason 'incident closed'
  chaos scenario create --loss 10% --selector role=kafka --one --duration 2m --severity 2
  chaos scenario list                           # scenarios and their states
  chaos queue                                   # running scenarios and the queue behind them
  chaos audit --since 1h                        # who did what
  chaos validate --lab --scenario ID            # recovered? lag drained, no event lost
  chaos watch                                   # live: agents' CPU/memory/network, probes, scenarios, alerts
  chaos metrics lab-kafka --metric net.         # one agent's latest metrics
  chaos scenario create --latency 200ms --selector role=kafka --stop-if 'kafka.lag.total > 5000 for 10s'
  chaos gameday start --every 10s --for 30m --targets role=app --action '--pause-name java'
  chaos --output json agents | jq '.agents[].health'

Certificates (mTLS is on by default; every call needs one):
  chaos certs init ./ca                                            # a CA for the fleet
  chaos certs issue --ca ./ca --role operator --name alice --out ~/.config/chaos/tls
  chaos certs show ~/.config/chaos/tls/cert.pem                    # identity, role, expiry
  chaos agent revert-all --local                                   # break-glass on the host, no certificate

Environment: CHAOS_COORDINATOR (coordinator URL), CHAOS_AGENT (agent URL), CHAOS_TLS_DIR
(your ca.pem, cert.pem, key.pem; default ~/.config/chaos/tls), CHAOS_INSECURE=1 (plaintext).";

#[derive(Debug, Parser)]
#[command(name = "chaos", version, about = "Drive the chaos platform: agents, faults, scenarios, emergency stop",
    after_help = format!("{EXAMPLES}\n\n{}", output::EXIT_CODES_HELP))]
struct Cli {
    /// Coordinator address (HOST:PORT or URL; https:// unless --insecure).
    #[arg(long, global = true, env = "CHAOS_COORDINATOR", default_value = "127.0.0.1:50051")]
    coordinator: String,
    #[command(flatten)]
    tls: conn::TlsFlags,
    /// Output format: a table for people, JSON for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    output: Format,
    /// Deadline of each call (`agent apply` of a container stop or restart: plus its grace;
    /// `agent revert-all`: plus its --wait).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the agents registered with the coordinator, with health and lease age.
    Agents,
    /// The coordinator's state: armed or not (and why), agent health, active faults.
    Status,
    /// Revert every fault on every agent now and disarm the fleet.
    #[command(
        after_help = "Agents that cannot be reached revert by their own dead-man lease; the output says by when.\nExit code 7 when some agents were not reached."
    )]
    EmergencyStop(fleet::EmergencyStopArgs),
    /// Re-arm the fleet after an emergency stop.
    Arm(fleet::ArmArgs),
    /// Scenarios: a fault on the agents a selector picks, admitted by the safety rules.
    #[command(subcommand)]
    Scenario(scenario::ScenarioCommand),
    /// Running scenarios and the queue behind the concurrency limit.
    Queue,
    /// The coordinator's audit log: every mutation with who, when and outcome.
    Audit(scenario::AuditArgs),
    /// Did the pipeline recover? Availability, lag drain, data consistency, performance baseline.
    Validate(Box<validate::ValidateArgs>),
    /// Live view of every agent's host metrics, the probes, running scenarios and alerts.
    Watch(watch::WatchArgs),
    /// The latest metrics of agents and probes (a snapshot).
    Metrics(watch::MetricsArgs),
    /// The local lab: hosts in network namespaces, real Kafka and Cassandra (root).
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Talk to one agent directly.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// GameDay: random chaos inside the safety rules, time-boxed, watched by SLOs.
    #[command(subcommand)]
    Gameday(gameday::GameDayCommand),
    /// Load the pipeline with a profile (warmup, baseline, spike, soak): throughput, p50/p95/p99, error rate.
    Load(Box<load::LoadArgs>),
    /// Experiment runs: the coordinator's index, or one run's report rendered again.
    #[command(after_help = experiment::REPORT_HELP)]
    Report(experiment::ReportArgs),
    /// Run an experiment file: steady state, method, stop conditions; live progress and a report.
    #[command(after_help = experiment::RUN_HELP)]
    Run(experiment::RunArgs),
    /// Certificates: make a CA, issue a certificate per person, agent and coordinator, show one.
    #[command(subcommand, after_help = certs::HELP)]
    Certs(certs::CertsCommand),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,scylla=error")),
        )
        .init();
    let fmt = cli.output;
    conn::init(cli.tls.clone());
    let result = match cli.command {
        Command::Agents => fleet::agents(&cli.coordinator, cli.timeout, fmt).await,
        Command::Status => fleet::status(&cli.coordinator, cli.timeout, fmt).await,
        Command::EmergencyStop(a) => fleet::emergency_stop(&cli.coordinator, cli.timeout, fmt, a).await,
        Command::Arm(a) => fleet::arm(&cli.coordinator, cli.timeout, fmt, a).await,
        Command::Agent(c) => agent::run(c, cli.timeout, fmt).await,
        Command::Gameday(c) => gameday::run(c, &cli.coordinator, cli.timeout, fmt).await,
        Command::Load(a) => load::run(*a, fmt).await,
        Command::Report(a) => experiment::report(&cli.coordinator, cli.timeout, fmt, a).await,
        Command::Run(a) => experiment::run(&cli.coordinator, cli.timeout, fmt, a).await,
        Command::Scenario(c) => scenario::run(c, &cli.coordinator, cli.timeout, fmt).await,
        Command::Queue => scenario::queue(&cli.coordinator, cli.timeout, fmt).await,
        Command::Audit(a) => scenario::audit(&cli.coordinator, cli.timeout, fmt, a).await,
        Command::Validate(a) => validate::run(&cli.coordinator, fmt, *a).await,
        Command::Watch(a) => watch::watch(&cli.coordinator, cli.timeout, fmt, a).await,
        Command::Metrics(a) => watch::metrics(&cli.coordinator, cli.timeout, fmt, a).await,
        // The lab verbs block (process starts, health polling); nothing else runs meanwhile.
        Command::Lab(c) => lab::run(c, fmt).await,
        Command::Certs(c) => certs::run(c, fmt).await,
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            output::print_error(fmt, &e);
            ExitCode::from(e.code)
        }
    }
}
