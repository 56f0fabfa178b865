//! `chaos-agent`: parse config, set up tracing, bind, run.

use anyhow::Context;
use chaos_agent::config::{AgentArgs, AgentConfig};
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = AgentArgs::parse();
    chaos_proto::serve::init_tracing(args.log_format);
    let cfg = AgentConfig::resolve(&args)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding listen address {}", cfg.listen))?;
    chaos_agent::run::run(cfg, listener, chaos_proto::serve::shutdown_signal()).await
}
