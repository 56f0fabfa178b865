//! `chaos-bench`: measures the foundation's two latency goals on this
//! machine and prints one table.
//!
//! (a) ApplyFault sent → SIGSTOP observable in /proc (client-observed, so it
//!     includes the gRPC round trip, the fsync'd journal write and the
//!     signal), over N faults on a real process;
//! (b) EmergencyStop with M agents each holding a pause fault on a real
//!     process → RPC answered with every fault reverted (checked in /proc),
//!     over R runs.
//!
//! Everything runs in this process on loopback (agents and coordinator are
//! the real libraries behind real gRPC servers); journals live in a
//! temporary directory; victims are `sleep` children killed at the end.
//!
//! Run: `cargo run --release -p chaos-e2e --bin chaos-bench -- [--faults N] [--agents M] [--runs R]`

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chaos_agent::config::AgentConfig;
use chaos_coordinator::config::CoordinatorConfig;
use chaos_e2e::{Victim, proc_state};
use chaos_proto::{
    convert::{duration_to_pb, timestamp_from_pb},
    pb::{self, agent_client::AgentClient, coordinator_client::CoordinatorClient},
};
use clap::Parser;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "chaos-bench", about = "Latency of fault apply and of emergency stop, as a table")]
struct Args {
    /// Faults for (a).
    #[arg(long, default_value_t = 1000)]
    faults: usize,
    /// Agents for (b).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Emergency-stop runs for (b).
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.context("server task")?
    }
}

async fn start_agent(journal: &Path, id: &str, coordinator: Option<&str>) -> anyhow::Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cfg = AgentConfig {
        listen: addr,
        coordinator: coordinator.map(str::to_string),
        journal_dir: journal.join(id),
        agent_id: id.to_string(),
        advertise: format!("http://{addr}"),
        labels: BTreeMap::new(),
        lease: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(10),
        max_fault_duration: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_secs(10),
        protected_pids: vec![],
        protected_names: vec![],
        protected_cidrs: vec![],
    };
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(chaos_agent::run::run(cfg, listener, async {
        let _ = rx.await;
    }));
    Ok(Server { url: format!("http://{addr}"), stop: Some(tx), task })
}

async fn start_coordinator(state_dir: &Path) -> anyhow::Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cfg = CoordinatorConfig {
        listen: addr,
        emergency_stop_deadline: Duration::from_secs(2),
        heartbeat_interval: Duration::from_secs(10),
        state_dir: state_dir.join("coordinator"),
    };
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(chaos_coordinator::run::run(cfg, listener, async {
        let _ = rx.await;
    }));
    Ok(Server { url: format!("http://{addr}"), stop: Some(tx), task })
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    for _ in 0..200 {
        if let Ok(c) = Channel::from_shared(url.to_string())?.connect().await {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("cannot connect to {url}")
}

fn pause_spec(pid: u32, id: String) -> pb::FaultSpec {
    pb::FaultSpec {
        id,
        target: Some(pb::Target { kind: Some(pb::target::Kind::Pid(pid)) }),
        duration: Some(duration_to_pb(Duration::from_secs(600))),
        labels: Default::default(),
        fault: Some(pb::fault_spec::Fault::ProcessPause(pb::ProcessPause {})),
    }
}

/// Spin until the process's state satisfies `want` (bounded at 5 s).
fn spin_until(pid: u32, want: impl Fn(char) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if proc_state(pid).is_some_and(&want) {
            return Ok(());
        }
        std::hint::spin_loop();
    }
    bail!("pid {pid} never reached the expected state")
}

struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
    n: usize,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let pick = |p: f64| v[((p * v.len() as f64).ceil() as usize).saturating_sub(1).min(v.len() - 1)];
    Stats { p50: pick(0.50), p99: pick(0.99), max: v[v.len() - 1], n: v.len() }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn bench_apply(n: usize, dir: &Path) -> anyhow::Result<(Stats, Stats)> {
    let agent = start_agent(dir, "apply-bench", None).await?;
    let mut client = AgentClient::new(connect(&agent.url).await?);
    let victim = Victim::spawn();
    let pid = victim.pid();
    let (mut observed, mut inside) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let t0 = Instant::now();
        let r = client.apply_fault(pb::ApplyFaultRequest { spec: Some(pause_spec(pid, format!("b{i}"))) }).await?.into_inner();
        spin_until(pid, |s| s == 'T')?;
        observed.push(t0.elapsed());
        let f = r.fault.context("no fault in answer")?;
        if let (Some(c), Some(a)) = (f.created_at.as_ref(), f.applied_at.as_ref()) {
            inside.push(timestamp_from_pb(a).duration_since(timestamp_from_pb(c)).unwrap_or_default());
        }
        client.revert_fault(pb::RevertFaultRequest { fault_id: f.id }).await?;
        spin_until(pid, |s| s != 'T')?;
    }
    agent.shutdown().await?;
    Ok((stats(observed), stats(inside)))
}

async fn bench_estop(agents: usize, runs: usize, dir: &Path) -> anyhow::Result<(Stats, usize)> {
    let coord = start_coordinator(dir).await?;
    let mut cclient = CoordinatorClient::new(connect(&coord.url).await?);
    let mut servers = Vec::with_capacity(agents);
    for i in 0..agents {
        servers.push(start_agent(dir, &format!("estop-{i}"), Some(&coord.url)).await?);
    }
    let victims: Vec<Victim> = (0..agents).map(|_| Victim::spawn()).collect();
    let mut clients = Vec::with_capacity(agents);
    for s in &servers {
        clients.push(AgentClient::new(connect(&s.url).await?));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = cclient.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents.len();
        if n == agents {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} of {agents} agents registered");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut took = Vec::with_capacity(runs);
    let mut reverted_total = 0;
    for run in 0..runs {
        // Each agent holds a pause fault on its own process (applied concurrently).
        let applies = clients.iter().zip(&victims).enumerate().map(|(i, (c, v))| {
            let mut c = c.clone();
            let spec = pause_spec(v.pid(), format!("r{run}-a{i}"));
            async move {
                // An agent accepts faults once its registration answered; retry briefly.
                for _ in 0..100 {
                    match c.apply_fault(pb::ApplyFaultRequest { spec: Some(spec.clone()) }).await {
                        Ok(_) => return Ok(()),
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => tokio::time::sleep(Duration::from_millis(50)).await,
                        Err(s) => return Err(anyhow::anyhow!("apply on agent {i}: {s}")),
                    }
                }
                bail!("agent {i} kept refusing faults")
            }
        });
        for r in futures::future::join_all(applies).await {
            r?;
        }
        for v in &victims {
            spin_until(v.pid(), |s| s == 'T')?;
        }
        let t0 = Instant::now();
        let r = cclient.emergency_stop(pb::EmergencyStopRequest { reason: format!("bench run {run}"), deadline: None }).await?.into_inner();
        took.push(t0.elapsed());
        if r.agents_reached as usize != agents || r.faults_reverted as usize != agents {
            bail!("run {run}: reached {} agents, reverted {} faults (want {agents})", r.agents_reached, r.faults_reverted);
        }
        for v in &victims {
            if v.state() == 'T' {
                bail!("run {run}: pid {} still stopped after emergency stop answered", v.pid());
            }
        }
        reverted_total += r.faults_reverted as usize;
        cclient.arm(pb::ArmRequest { reason: "bench".into() }).await?;
    }
    for s in servers {
        s.shutdown().await?;
    }
    coord.shutdown().await?;
    Ok((stats(took), reverted_total))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    chaos_proto::serve::init_tracing(chaos_proto::serve::LogFormat::Text);
    let dir = tempfile::tempdir().context("tempdir")?;
    eprintln!("(a) {} x ApplyFault(process_pause) -> SIGSTOP visible in /proc ...", args.faults);
    let (a_obs, a_in) = bench_apply(args.faults, dir.path()).await?;
    eprintln!("(b) EmergencyStop with {} agents x {} runs ...", args.agents, args.runs);
    let (b, reverted) = bench_estop(args.agents, args.runs, dir.path()).await?;
    let rows = [
        ("(a) ApplyFault sent -> process stopped (client view)", &a_obs, "<= 10 ms p99"),
        ("(a') inside the agent: accepted -> applied (journal fsync + signal)", &a_in, "-"),
        ("(b) EmergencyStop, every agent's fault reverted", &b, "<= 100 ms p99"),
    ];
    let out = &mut String::new();
    use std::fmt::Write;
    writeln!(out, "{:<70} {:>6} {:>9} {:>9} {:>9}  goal", "measure", "n", "p50 ms", "p99 ms", "max ms")?;
    for (name, s, goal) in rows {
        writeln!(out, "{:<70} {:>6} {:>9} {:>9} {:>9}  {goal}", name, s.n, ms(s.p50), ms(s.p99), ms(s.max))?;
    }
    writeln!(out, "(b) {} agents, {} faults reverted over {} runs, each checked in /proc", args.agents, reverted, args.runs)?;
    use std::io::Write as _;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
