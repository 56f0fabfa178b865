//! `chaos-agent`: parse config, set up tracing, bind, run.
//! (`chaos-agent __stressor ...` is the worker of the stress faults; it
//! runs before any runtime starts.)

use std::io::Write;

use anyhow::Context;
use chaos_agent::config::{AgentArgs, AgentCommand, AgentConfig};
use clap::Parser;

fn main() -> anyhow::Result<()> {
    chaos_agent::stressor::run_if_stressor();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?.block_on(agent())
}

async fn agent() -> anyhow::Result<()> {
    let args = AgentArgs::parse();
    chaos_proto::serve::init_tracing(args.log_format);
    let cfg = AgentConfig::resolve(&args)?;
    if let Some(AgentCommand::RevertJournal) = args.command {
        let dir = cfg.journal_dir.display().to_string();
        let r = chaos_agent::run::revert_journal(cfg).await?;
        let mut out = std::io::stdout();
        writeln!(out, "journal {dir}: {} fault(s) reverted, {} failed, {} unreadable", r.reverted, r.failed, r.corrupt)?;
        if r.failed + r.corrupt > 0 {
            writeln!(
                out,
                "NOT everything was reverted: the failed records stay in the journal (see the log above); unreadable ones were set aside as *.corrupt"
            )?;
            std::process::exit(1);
        }
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding listen address {}", cfg.listen))?;
    chaos_agent::run::run(cfg, listener, chaos_proto::serve::shutdown_signal()).await
}
