//! `chaos-agent`: parse config, set up tracing, bind, run.
//! (`chaos-agent __stressor ...` is the worker of the stress faults; it
//! runs before any runtime starts.)

use anyhow::Context;
use chaos_agent::config::{AgentArgs, AgentConfig};
use clap::Parser;

fn main() -> anyhow::Result<()> {
    chaos_agent::stressor::run_if_stressor();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?.block_on(agent())
}

async fn agent() -> anyhow::Result<()> {
    let args = AgentArgs::parse();
    chaos_proto::serve::init_tracing(args.log_format);
    let cfg = AgentConfig::resolve(&args)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding listen address {}", cfg.listen))?;
    chaos_agent::run::run(cfg, listener, chaos_proto::serve::shutdown_signal()).await
}
