//! `chaos-coordinator`: parse config, set up tracing, bind, run.

use anyhow::Context;
use chaos_coordinator::config::{CoordinatorArgs, CoordinatorConfig};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = CoordinatorArgs::parse();
    chaos_proto::serve::init_tracing(args.log_format);
    let cfg = CoordinatorConfig::resolve(&args)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding listen address {}", cfg.listen))?;
    chaos_coordinator::run::run(cfg, listener, chaos_proto::serve::shutdown_signal()).await
}
