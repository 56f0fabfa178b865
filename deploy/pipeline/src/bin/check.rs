//! `chaos-check`: Jepsen's set check of the lab pipeline. Every id the
//! collector saw acknowledged must be in Cassandra exactly once. Waits up
//! to `--wait` for the processor to catch up (lost ids shrinking to none),
//! then prints the verdict as JSON; exit 0 when it holds, 1 when not.

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, Instant},
};

use chaos_pipeline::{KEYSPACE, TABLE, cassandra};
use chaos_probes::setcheck::settle;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "chaos-check", about = "Set check: every acknowledged event stored exactly once (lost / duplicated / unexpected)")]
struct Args {
    #[arg(long)]
    acks_file: PathBuf,
    #[arg(long, default_value = "198.18.200.3:9042")]
    cassandra: String,
    #[arg(long, default_value = TABLE, value_parser = chaos_pipeline::parse_table)]
    table: String,
    /// Wait this long for lost events to arrive (the consumer's lag draining).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chaos_proto::serve::init_tracing(chaos_proto::serve::LogFormat::Text);
    let a = Args::parse();
    let session = cassandra::connect(&a.cassandra).await?;
    let started = Instant::now();
    // Lost ids may still be on their way: wait while time is left.
    let check = settle(&session, &format!("{KEYSPACE}.{}", a.table), &a.acks_file, "", a.wait, |c| c.lost_count == 0).await?;
    let mut out = serde_json::to_value(&check)?;
    out["waited_s"] = serde_json::json!(started.elapsed().as_secs_f64());
    writeln!(std::io::stdout(), "{out}")?;
    std::process::exit(if check.passed() { 0 } else { 1 });
}
