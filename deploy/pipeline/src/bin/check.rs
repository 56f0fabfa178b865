//! `chaos-check`: Jepsen's set check of the lab pipeline. Every id the
//! collector saw acknowledged must be in Cassandra exactly once. Waits up
//! to `--wait` for the processor to catch up (lost ids shrinking to none),
//! then prints the verdict as JSON; exit 0 when it holds, 1 when not.

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, Instant},
};

use chaos_pipeline::{TABLE, cassandra, read_acked, set_check};
use clap::Parser;
use tracing::info;

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
    let acked = read_acked(&a.acks_file)?;
    let session = cassandra::connect(&a.cassandra).await?;
    let started = Instant::now();
    let mut last_lost = usize::MAX;
    let check = loop {
        let rows = cassandra::rows(&session, &a.table).await?;
        let c = set_check(&acked, &rows);
        // Lost ids may still be on their way: wait while the count shrinks or time is left.
        if c.lost_count == 0 || started.elapsed() >= a.wait {
            break c;
        }
        if c.lost_count != last_lost {
            info!(lost = c.lost_count, acknowledged = c.acknowledged, "waiting for the processor to catch up");
            last_lost = c.lost_count;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut out = serde_json::to_value(&check)?;
    out["waited_s"] = serde_json::json!(started.elapsed().as_secs_f64());
    writeln!(std::io::stdout(), "{out}")?;
    std::process::exit(if check.passed() { 0 } else { 1 });
}
