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
//! (a) and (b) run twice, side by side: `--insecure` (plaintext, nobody
//! authenticated) and mTLS everywhere, with a CA made for the run in its
//! temporary directory: a coordinator certificate, one agent certificate
//! per agent (named as its agent id), and an admin certificate for the
//! bench's client (ApplyFault, RevertFault, EmergencyStop, Arm). Every
//! client channel is opened (and its handshake done) before anything is
//! timed; the coordinator's channels to the agents are its own, opened by
//! the first emergency stop (reported apart in the notes). The (b)
//! coordinator follows every agent's metric stream, as in production.
//!
//! Everything runs in this process on loopback (agents and coordinator are
//! the real libraries behind real gRPC servers); journals and certificates
//! live in a temporary directory; victims are `sleep` children killed at
//! the end.
//!
//! (c..f) network faults between two network namespaces on a veth pair
//!     (198.18.0.0/15; needs root): ApplyFault/RevertFault latency of a
//!     partition, packets crossing a partition, loss achieved vs requested,
//!     latency accuracy and throughput of the NFQUEUE engine, bandwidth
//!     achieved vs requested, and the baseline after revert.
//!
//! (j..m) the coordinator at fleet scale, against light in-process stand-in
//!     agents that speak the real `chaos.v1.Agent` service over loopback:
//!     CreateScenario → every selected agent holds the fault (100 agents),
//!     EmergencyStop with 100 and 1,000 agents each holding a scenario
//!     fault, and the CPU of a real coordinator process while 1,000 agents
//!     heartbeat at 1 Hz, each on its own connection.
//!
//! (n) the metrics hub: 1,000 stand-in agents streaming 40 values each at
//!     1 Hz into a real coordinator process, 10 watchers reading every
//!     batch: the coordinator's CPU and RSS, and the delay from a sample's
//!     timestamp on the agent to its arrival at a watcher.
//!
//! (o..q) resource faults against the kernel's counters: CPU stress at 25,
//!     50 and 90 % of one core (its cgroup's usage in 500 ms windows: mean
//!     error after 2 s, and when it settled within 3 points for good), side
//!     by side with `stress-ng --cpu 1 --cpu-load L` in a cgroup of the same
//!     kind; memory stress of 256 MiB (resident vs asked, time to hold it);
//!     disk fill to 50 % of a 256 MiB tmpfs made for the run (df after).
//!
//! (r) emergency stop of 100 in-process agents, each holding a pause fault
//!     on a real process, while 10 of them wait out a 20 s container stop
//!     (a private dockerd as the container tests run it; containers whose
//!     process outlives SIGTERM): EmergencyStop sent -> answered, within the
//!     coordinator's 2 s deadline, every pause reverted (in /proc), the stops
//!     counted in progress; then every stopped container started again by
//!     its revert. The runs share one round of stops (more rounds when they
//!     do not fit in its grace). "skipped: why" when no dockerd can start.
//!
//! (t) netem's fidelity on a stock distribution kernel: the VM suite's
//!     netem checks (latency with jitter, loss, corruption, duplication) in
//!     Debian's cloud kernel under QEMU TCG, as the VM test runs them,
//!     printed after the engine's figures of the network suite. Emulated:
//!     timings are looser than on a host.
//!
//! (u) an idle agent: the real `chaos-agent` process with no faults, no
//!     coordinator and no client, settled, over 30 s: RSS (VmRSS, max and
//!     at the end), CPU (utime + stime of all threads, % of one core; and
//!     the threads' schedstat, in ns, since 30 s of ticks resolve only
//!     0.033 %), threads, context switches per second; then the same over
//!     10 s while one client follows its StreamMetrics.
//!
//! Run: `cargo build --release --workspace --bins && ./target/release/chaos-bench [--suite lifecycle|network|coordinator|hub|resource|slow-stop|vm|idle|all] [--faults N] [--agents M] [--runs R] [--slow-stop-runs S]`
//! (the network suite drives `chaos-netprobe`, built next to it).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chaos_agent::config::AgentConfig;
use chaos_coordinator::{config::CoordinatorConfig, monitor::MonitoringConfig, policy::Policy, standin::Standin};
use chaos_e2e::{Dockerd, NetPair, UdpCount, Victim, proc_state};
use chaos_proto::{
    convert::{duration_to_pb, timestamp_from_pb},
    pb::{self, agent_client::AgentClient, coordinator_client::CoordinatorClient},
    trust::{
        ClientTls, Dial, Expect, Identity, Role, Tls, TlsFiles,
        certs::{Request, init_ca_dir, issue_to_dir},
    },
};
use clap::Parser;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// A count of at least 1 (percentiles of nothing do not exist).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got {s:?}")),
    }
}

#[derive(Debug, Parser)]
#[command(name = "chaos-bench", about = "Latency of fault apply and of emergency stop, as a table")]
struct Args {
    /// Faults for (a), in each mode (insecure, TLS).
    #[arg(long, default_value_t = 1000, value_parser = at_least_one)]
    faults: usize,
    /// Agents for (b), in each mode (insecure, TLS).
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    agents: usize,
    /// Emergency-stop runs for (b), in each mode (insecure, TLS).
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    runs: usize,
    /// Which measurements: lifecycle (a, b), network (c..f; needs root), or all.
    #[arg(long, value_enum, default_value = "all")]
    suite: Suite,
    /// Packets for the loss measurement (d).
    #[arg(long, default_value_t = 10_000)]
    loss_packets: u32,
    /// Emergency stops for (r), all while the same 20 s container stops run
    /// (a new round of stops when they do not fit in one).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    slow_stop_runs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    Lifecycle,
    Network,
    Coordinator,
    Hub,
    Resource,
    /// (r): emergency stop while agents wait out a container stop's grace (a private dockerd).
    SlowStop,
    /// (t): netem's fidelity on Debian's stock kernel in a QEMU VM (emulated).
    Vm,
    /// (u): an idle `chaos-agent` process: RSS, CPU, threads, wake-ups.
    Idle,
    All,
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

/// An in-process agent `id` (journal in `journal/id`), serving mTLS with
/// `tls` (its certificate's name must be `id`), plaintext without.
async fn start_agent(journal: &Path, id: &str, coordinator: Option<&str>, tls: Option<&TlsFiles>) -> anyhow::Result<Server> {
    start_agent_on(journal, id, coordinator, tls, Path::new("/var/run/docker.sock")).await
}

/// [`start_agent`] talking to the Docker daemon on `docker_socket`.
async fn start_agent_on(
    journal: &Path,
    id: &str,
    coordinator: Option<&str>,
    tls: Option<&TlsFiles>,
    docker_socket: &Path,
) -> anyhow::Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
    let cfg = AgentConfig {
        listen: addr,
        coordinator: coordinator.map(str::to_string),
        journal_dir: journal.join(id),
        agent_id: Some(id.to_string()),
        advertise: url.clone(),
        labels: BTreeMap::new(),
        lease: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(10),
        max_fault_duration: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_secs(10),
        protected_pids: vec![],
        protected_names: vec![],
        protected_cidrs: vec![],
        metrics: Default::default(),
        metrics_listen: None,
        guards: Default::default(),
        docker_socket: docker_socket.to_path_buf(),
        firewall: Default::default(),
        tls: tls.cloned(),
        local_socket: None,
    };
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(chaos_agent::run::run(cfg, listener, async {
        let _ = rx.await;
    }));
    Ok(Server { url, stop: Some(tx), task })
}

/// An in-process coordinator (state in `state_dir/coordinator`), serving
/// mTLS with `tls` and dialing agents with it, plaintext without; it
/// follows every agent's StreamMetrics.
async fn start_coordinator(state_dir: &Path, tls: Option<&TlsFiles>) -> anyhow::Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
    let cfg = CoordinatorConfig {
        listen: addr,
        emergency_stop_deadline: Duration::from_secs(2),
        heartbeat_interval: Duration::from_secs(10),
        state_dir: state_dir.join("coordinator"),
        // The benchmark's scenarios select the whole fleet on purpose.
        policy: Policy { blast_radius_limit: 1.0, group_blast_radius_limit: 1.0, ..Policy::default() },
        monitoring: MonitoringConfig::default(),
        recovery: Default::default(),
        tls: tls.cloned(),
    };
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(chaos_coordinator::run::run(cfg, listener, async {
        let _ = rx.await;
    }));
    Ok(Server { url, stop: Some(tx), task })
}

/// The CA of one bench run, in the run's temporary directory (removed with
/// it), and the certificates it issued, one directory each.
struct BenchCa {
    root: PathBuf,
}

impl BenchCa {
    fn new(root: PathBuf) -> anyhow::Result<BenchCa> {
        init_ca_dir(&root.join("ca"), "chaos-bench", Duration::from_secs(24 * 3600)).context("bench CA")?;
        Ok(BenchCa { root })
    }

    /// A certificate for `role`/`name` (valid a day); agent and coordinator
    /// certificates name 127.0.0.1, ::1 and localhost by themselves.
    fn issue(&self, role: Role, name: &str) -> anyhow::Result<TlsFiles> {
        let out = self.root.join(format!("{role}-{name}"));
        let req = Request::new(Identity::new(role, name)?, vec![], Duration::from_secs(24 * 3600));
        issue_to_dir(&self.root.join("ca"), &req, &out, false).with_context(|| format!("issuing {role} {name}"))?;
        Ok(TlsFiles::in_dir(&out))
    }
}

/// How the lifecycle suite's parties talk: plaintext (`--insecure`), or
/// mTLS with certificates of the run's CA.
struct Mode {
    /// As the table names it: `insecure` or `TLS`.
    label: &'static str,
    /// This mode's journals and coordinator state.
    dir: PathBuf,
    /// None: insecure.
    ca: Option<BenchCa>,
    /// The bench's own client: anonymous, or holding an admin certificate.
    client: ClientTls,
}

impl Mode {
    fn insecure(dir: &Path) -> Mode {
        Mode { label: "insecure", dir: dir.join("insecure"), ca: None, client: ClientTls::Insecure }
    }

    /// A CA for this run, and an admin certificate for the bench's client.
    fn tls(dir: &Path) -> anyhow::Result<Mode> {
        let ca = BenchCa::new(dir.join("pki"))?;
        let admin = Tls::load(ca.issue(Role::Admin, "bench-admin")?).context("loading the bench's admin certificate")?;
        Ok(Mode { label: "TLS", dir: dir.join("tls"), ca: Some(ca), client: ClientTls::Tls(admin) })
    }

    /// The certificate of `role`/`name` in this mode (None: insecure).
    fn files(&self, role: Role, name: &str) -> anyhow::Result<Option<TlsFiles>> {
        self.ca.as_ref().map(|ca| ca.issue(role, name)).transpose()
    }

    /// A lazily connecting channel to `url` as the bench's client.
    fn channel(&self, url: &str, expect: Expect) -> anyhow::Result<Channel> {
        let dial = Dial { connect_timeout: Duration::from_secs(2), timeout: Some(Duration::from_secs(30)) };
        Ok(chaos_proto::trust::channel(url, &self.client, expect, dial)?)
    }
}

/// Call `call` until it answers (bounded at 200 tries, 10 ms apart; only
/// UNAVAILABLE is retried), so a lazy channel's connection and handshake
/// are done before anything is timed.
async fn warm<T, F: Future<Output = Result<T, tonic::Status>>>(what: &str, mut call: impl FnMut() -> F) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..200 {
        match call().await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                last = Some(s);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => bail!("{what}: {s}"),
        }
    }
    bail!("{what}: never answered: {}", last.map(|s| s.to_string()).unwrap_or_default())
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

/// (s) What the agent's re-read after each revert took, and those that did not verify.
#[derive(Default)]
struct Checks {
    took: Vec<Duration>,
    not_verified: Vec<String>,
}

impl Checks {
    /// Take in the fault a RevertFault answered with.
    fn take(&mut self, f: Option<&pb::Fault>) {
        let Some(f) = f else { return self.not_verified.push("an answer without its fault".into()) };
        if f.revert_check != pb::RevertCheck::Verified as i32 {
            self.not_verified.push(format!("{}: {:?} {}", f.id, pb::RevertCheck::try_from(f.revert_check), f.revert_check_detail));
        }
        if let Some(d) = f.revert_check_took.as_ref().and_then(chaos_proto::convert::duration_from_pb) {
            self.took.push(d);
        }
    }
}

/// (a) in one mode.
struct ApplyFigures {
    observed: Stats,
    inside: Stats,
    /// ListFaults as the first call on a new channel (TCP connect, the
    /// handshake under TLS, the call), once the agent serves.
    first_call: Stats,
    /// ListFaults as the second call on the same channel.
    next_call: Stats,
    /// (s) the revert checks of the pauses.
    checks: Checks,
}

/// New channels opened for [`ApplyFigures::first_call`].
const FRESH_CHANNELS: usize = 20;

async fn bench_apply(n: usize, mode: &Mode) -> anyhow::Result<ApplyFigures> {
    let id = "apply-bench";
    let agent = start_agent(&mode.dir, id, None, mode.files(Role::Agent, id)?.as_ref()).await?;
    let mut client = AgentClient::new(mode.channel(&agent.url, Expect::agent(Some(id)))?);
    warm(&format!("ListFaults on {}", agent.url), || {
        let mut c = client.clone();
        async move { c.list_faults(pb::ListFaultsRequest::default()).await }
    })
    .await?;
    // What a connection costs, apart from the figures (every channel below
    // is open before timing).
    let (mut first_call, mut next_call) = (Vec::with_capacity(FRESH_CHANNELS), Vec::with_capacity(FRESH_CHANNELS));
    for _ in 0..FRESH_CHANNELS {
        let mut fresh = AgentClient::new(mode.channel(&agent.url, Expect::agent(Some(id)))?);
        for took in [&mut first_call, &mut next_call] {
            let t0 = Instant::now();
            fresh.list_faults(pb::ListFaultsRequest::default()).await?;
            took.push(t0.elapsed());
        }
    }
    let victim = Victim::spawn();
    let pid = victim.pid();
    let (mut observed, mut inside) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut checks = Checks::default();
    for i in 0..n {
        let t0 = Instant::now();
        let r = client.apply_fault(pb::ApplyFaultRequest { spec: Some(pause_spec(pid, format!("b{i}"))) }).await?.into_inner();
        spin_until(pid, |s| s == 'T')?;
        observed.push(t0.elapsed());
        let f = r.fault.context("no fault in answer")?;
        if let (Some(c), Some(a)) = (f.created_at.as_ref(), f.applied_at.as_ref()) {
            inside.push(timestamp_from_pb(a).duration_since(timestamp_from_pb(c)).unwrap_or_default());
        }
        let r = client.revert_fault(pb::RevertFaultRequest { fault_id: f.id }).await?.into_inner();
        checks.take(r.fault.as_ref());
        spin_until(pid, |s| s != 'T')?;
    }
    agent.shutdown().await?;
    Ok(ApplyFigures {
        observed: stats(observed),
        inside: stats(inside),
        first_call: stats(first_call),
        next_call: stats(next_call),
        checks,
    })
}

/// (b) in one mode.
struct EstopFigures {
    /// Every run.
    all: Stats,
    /// Faults the stop reported reverted.
    reverted: usize,
    /// Faults an agent reverted on its own (its heartbeat answered
    /// "disarmed" first), so not in `reverted`; their processes resumed too.
    self_reverted: usize,
    /// Run 0: the coordinator opens its channel to each agent inside it.
    first: Duration,
    /// Runs 1..R (None with one run).
    warm: Option<Stats>,
    /// The slowest run: its index, time, and faults reverted in it by
    /// their agent on its own.
    slowest: (usize, Duration, usize),
}

async fn bench_estop(agents: usize, runs: usize, mode: &Mode) -> anyhow::Result<EstopFigures> {
    // With monitoring, as in production: the coordinator follows every
    // agent's metric stream while it stops them.
    let coord = start_coordinator(&mode.dir, mode.files(Role::Coordinator, "bench-coordinator")?.as_ref()).await?;
    let mut cclient = CoordinatorClient::new(mode.channel(&coord.url, Expect::coordinator())?);
    warm(&format!("ListAgents on {}", coord.url), || {
        let mut c = cclient.clone();
        async move { c.list_agents(pb::ListAgentsRequest {}).await }
    })
    .await?;
    let mut servers = Vec::with_capacity(agents);
    let mut clients = Vec::with_capacity(agents);
    for i in 0..agents {
        let id = format!("estop-{i}");
        let s = start_agent(&mode.dir, &id, Some(&coord.url), mode.files(Role::Agent, &id)?.as_ref()).await?;
        clients.push(AgentClient::new(mode.channel(&s.url, Expect::agent(Some(&id)))?));
        servers.push(s);
    }
    let victims: Vec<Victim> = (0..agents).map(|_| Victim::spawn()).collect();
    let opened = clients.iter().enumerate().map(|(i, c)| {
        let c = c.clone();
        async move {
            warm(&format!("ListFaults on agent {i}"), || {
                let mut c = c.clone();
                async move { c.list_faults(pb::ListFaultsRequest::default()).await }
            })
            .await
        }
    });
    for r in futures::future::join_all(opened).await {
        r?;
    }
    until_registered(&mut cclient, agents).await?;
    let mut took = Vec::with_capacity(runs);
    let (mut reverted_total, mut self_reverted) = (0, Vec::with_capacity(runs));
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
        // An agent whose heartbeat is answered "disarmed" while the stop
        // runs reverts on its own before the RevertAll reaches it, which
        // then counts nothing there: every process resumed (in /proc) is
        // what counts here, the stop's own count is reported.
        if r.agents_reached as usize != agents || r.faults_failed != 0 || r.faults_reverted as usize > agents {
            bail!(
                "run {run}: reached {} agents, reverted {} faults, {} failed (want {agents}, {agents}, 0)",
                r.agents_reached,
                r.faults_reverted,
                r.faults_failed
            );
        }
        for v in &victims {
            if v.state() == 'T' {
                bail!("run {run}: pid {} still stopped after emergency stop answered", v.pid());
            }
        }
        reverted_total += r.faults_reverted as usize;
        self_reverted.push(agents - r.faults_reverted as usize);
        cclient.arm(pb::ArmRequest { reason: "bench".into() }).await?;
    }
    // Side by side: each waits out its server's drain (the coordinator's
    // metric stream from it stays open until the coordinator stops).
    for r in futures::future::join_all(servers.into_iter().map(Server::shutdown)).await {
        r?;
    }
    coord.shutdown().await?;
    let first = took[0];
    let warm = (took.len() > 1).then(|| stats(took[1..].to_vec()));
    let slowest = (0..took.len()).max_by_key(|&i| took[i]).unwrap_or(0);
    let slowest = (slowest, took[slowest], self_reverted[slowest]);
    let self_reverted = self_reverted.iter().sum();
    Ok(EstopFigures { all: stats(took), reverted: reverted_total, self_reverted, first, warm, slowest })
}

/// Until the coordinator lists `agents` registered agents (at most 30 s).
async fn until_registered(cclient: &mut CoordinatorClient<Channel>, agents: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = cclient.list_agents(pb::ListAgentsRequest {}).await?.into_inner().agents.len();
        if n == agents {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {n} of {agents} agents registered");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (r): what became of the emergency stops.
enum SlowStop {
    /// No Docker daemon could be started here: why.
    Skipped(String),
    Done(SlowStopFigures),
}

struct SlowStopFigures {
    /// EmergencyStop sent -> answered, every run.
    took: Stats,
    /// Rounds of container stops the runs took place in.
    rounds: usize,
    /// Faults the stops reported reverted, and those reverted by their
    /// agent on its own (a heartbeat answered "disarmed" first).
    reverted: usize,
    self_reverted: usize,
    /// faults_in_progress of each run (the busy agents' container stops).
    in_progress: Vec<u32>,
    /// From the SIGTERM of each round's stops to the last container started
    /// again by its revert.
    round_trip: Vec<Duration>,
}

/// Seconds Docker waits for (r)'s containers after SIGTERM.
const SLOW_STOP_GRACE: Duration = Duration::from_secs(20);
/// An emergency stop of (r) starts only while this much of the grace is left,
/// so it answers (2 s deadline) while the stops are still running.
const SLOW_STOP_SLACK: Duration = Duration::from_secs(5);

/// Blocking work (the docker CLI) off the runtime's workers, which serve the agents.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("blocking task")
}

/// Whether each container in `names` runs, in order (one `docker inspect`).
fn running(d: &Dockerd, names: &[String]) -> Vec<bool> {
    let mut args = vec!["inspect", "-f", "{{.State.Running}}"];
    args.extend(names.iter().map(String::as_str));
    let out = d.docker(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v: Vec<bool> = text.lines().map(|l| l.trim() == "true").collect();
    v.resize(names.len(), false);
    v
}

/// (r) Emergency stop of `agents` in-process agents (insecure), each holding
/// a pause fault on a real process, while `busy` of them also wait out a
/// 20 s container stop (a private dockerd, containers that outlive SIGTERM):
/// every run answers within the coordinator's 2 s deadline, every pause is
/// reverted (in /proc), the stops are counted in progress; each round ends
/// when the stops have finished and their reverts started the containers again.
async fn bench_slow_stop(agents: usize, busy: usize, runs: usize, dir: &Path) -> anyhow::Result<SlowStop> {
    let d = match blocking(Dockerd::try_start).await? {
        Ok(d) => Arc::new(d),
        Err(why) => return Ok(SlowStop::Skipped(why.lines().next().unwrap_or("no Docker daemon").to_string())),
    };
    let outcome = slow_stop_rounds(&d, agents, busy, runs, dir).await;
    // The daemon's drop removes every container and waits for it to stop.
    blocking(move || drop(d)).await?;
    outcome.map(SlowStop::Done)
}

async fn slow_stop_rounds(d: &Arc<Dockerd>, agents: usize, busy: usize, runs: usize, dir: &Path) -> anyhow::Result<SlowStopFigures> {
    let dd = Arc::clone(d);
    let image = blocking(move || dd.try_busybox_image()).await?.map_err(|e| anyhow::anyhow!("busybox image: {e}"))?;
    let names: Vec<String> = (0..busy).map(|i| format!("chaos-bench-slow-{}-{i}", std::process::id())).collect();
    for chunk in names.chunks(4) {
        let made = chunk.iter().map(|n| {
            let (dd, n, image) = (Arc::clone(d), n.clone(), image.clone());
            blocking(move || dd.run_term_ignorer(&image, &n, 600, &[]))
        });
        for r in futures::future::join_all(made).await {
            r?;
        }
    }
    let mode = Mode::insecure(&dir.join("slow-stop"));
    let coord = start_coordinator(&mode.dir, None).await?;
    let mut cclient = CoordinatorClient::new(mode.channel(&coord.url, Expect::coordinator())?);
    warm(&format!("ListAgents on {}", coord.url), || {
        let mut c = cclient.clone();
        async move { c.list_agents(pb::ListAgentsRequest {}).await }
    })
    .await?;
    let (mut servers, mut clients) = (Vec::with_capacity(agents), Vec::with_capacity(agents));
    for i in 0..agents {
        let id = format!("slow-{i}");
        servers.push(start_agent_on(&mode.dir, &id, Some(&coord.url), None, &d.socket).await?);
        clients.push(AgentClient::new(mode.channel(&servers[i].url, Expect::agent(Some(&id)))?));
    }
    let victims: Vec<Victim> = (0..agents).map(|_| Victim::spawn()).collect();
    until_registered(&mut cclient, agents).await?;
    let mut took = Vec::with_capacity(runs);
    let (mut reverted, mut self_reverted, mut in_progress, mut round_trip) = (0, 0, vec![], vec![]);
    let mut rounds = 0;
    while took.len() < runs {
        // Busy agent i stops container i; the apply answers when Docker has waited out the grace.
        let stops: Vec<JoinHandle<anyhow::Result<()>>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut c = clients[i].clone();
                let spec = pb::FaultSpec {
                    id: format!("stop{rounds}-{i}"),
                    target: Some(pb::Target { kind: Some(pb::target::Kind::Container(name.clone())) }),
                    duration: Some(duration_to_pb(Duration::from_secs(600))),
                    labels: Default::default(),
                    fault: Some(pb::fault_spec::Fault::ContainerAction(pb::ContainerAction {
                        verb: pb::ContainerVerb::Stop as i32,
                        signal: String::new(),
                        stop_grace: Some(duration_to_pb(SLOW_STOP_GRACE)),
                    })),
                };
                tokio::spawn(async move { apply_retrying(&mut c, spec, i).await })
            })
            .collect();
        // In flight once every container's process has been sent SIGTERM.
        let (dd, nn) = (Arc::clone(d), names.clone());
        let all_termed = blocking(move || {
            let nn: Vec<&str> = nn.iter().map(String::as_str).collect();
            chaos_e2e::wait_until(Duration::from_secs(30), || dd.got_term_all(&nn))
        })
        .await?;
        if !all_termed {
            bail!("round {rounds}: the container stops never sent SIGTERM to every container");
        }
        let termed_at = Instant::now();
        let mut first = true;
        while took.len() < runs && (first || termed_at.elapsed() + SLOW_STOP_SLACK < SLOW_STOP_GRACE) {
            first = false;
            let run = took.len();
            let applies = clients.iter().zip(&victims).enumerate().map(|(i, (c, v))| {
                let mut c = c.clone();
                let spec = pause_spec(v.pid(), format!("slow{run}-a{i}"));
                async move { apply_retrying(&mut c, spec, i).await }
            });
            for r in futures::future::join_all(applies).await {
                r?;
            }
            for v in &victims {
                spin_until(v.pid(), |s| s == 'T')?;
            }
            let t0 = Instant::now();
            let r = cclient
                .emergency_stop(pb::EmergencyStopRequest { reason: format!("bench slow stop {run}"), deadline: None })
                .await?
                .into_inner();
            took.push(t0.elapsed());
            if r.agents_reached as usize != agents || r.faults_failed != 0 || (r.faults_in_progress as usize) < busy || r.complete {
                bail!(
                    "run {run}: reached {} agents, {} failed, {} in progress, complete={} (want {agents}, 0, >= {busy}, false)",
                    r.agents_reached,
                    r.faults_failed,
                    r.faults_in_progress,
                    r.complete
                );
            }
            for v in &victims {
                if v.state() == 'T' {
                    bail!("run {run}: pid {} still stopped after emergency stop answered", v.pid());
                }
            }
            let (dd, nn) = (Arc::clone(d), names.clone());
            if !blocking(move || running(&dd, &nn)).await?.iter().all(|r| *r) {
                bail!("run {run}: a container stop ended before the emergency stop answered: the run measured nothing slow");
            }
            reverted += r.faults_reverted as usize;
            self_reverted += agents.saturating_sub(r.faults_reverted as usize);
            in_progress.push(r.faults_in_progress);
            cclient.arm(pb::ArmRequest { reason: "bench".into() }).await?;
        }
        for (i, s) in stops.into_iter().enumerate() {
            tokio::time::timeout(SLOW_STOP_GRACE + Duration::from_secs(20), s)
                .await
                .with_context(|| format!("round {rounds}: the stop on agent {i} never returned"))???;
        }
        // Each stop was asked to revert while it ran: its container starts again.
        let (dd, nn) = (Arc::clone(d), names.clone());
        if !blocking(move || chaos_e2e::wait_until(Duration::from_secs(15), || running(&dd, &nn).iter().all(|r| *r))).await? {
            bail!("round {rounds}: a container was not started again by its revert");
        }
        round_trip.push(termed_at.elapsed());
        for (i, c) in clients.iter().take(busy).enumerate() {
            let id = format!("stop{rounds}-{i}");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let faults = c.clone().list_faults(pb::ListFaultsRequest { include_finished: true }).await?.into_inner().faults;
                if faults.iter().any(|f| f.id == id && f.state == pb::FaultState::Reverted as i32) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("round {rounds}: fault {id} never listed REVERTED");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        rounds += 1;
    }
    for r in futures::future::join_all(servers.into_iter().map(Server::shutdown)).await {
        r?;
    }
    coord.shutdown().await?;
    Ok(SlowStopFigures { took: stats(took), rounds, reverted, self_reverted, in_progress, round_trip })
}

/// ApplyFault, retried while the agent refuses with FAILED_PRECONDITION (not
/// registered yet, or not yet told it is armed again).
async fn apply_retrying(c: &mut AgentClient<Channel>, spec: pb::FaultSpec, agent: usize) -> anyhow::Result<()> {
    for _ in 0..100 {
        match c.apply_fault(pb::ApplyFaultRequest { spec: Some(spec.clone()) }).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) => bail!("apply {} on agent {agent}: {s}", spec.id),
        }
    }
    bail!("agent {agent} kept refusing {}", spec.id)
}

/// Start `n` stand-in agents and register them with the coordinator at `curl`.
async fn standins(n: usize, cclient: &mut CoordinatorClient<Channel>) -> anyhow::Result<(Vec<Standin>, Vec<JoinHandle<()>>)> {
    standins_with_metrics(n, 0, cclient).await
}

/// Stand-ins whose StreamMetrics sends `metrics` values every second (0: none).
async fn standins_with_metrics(
    n: usize,
    metrics: usize,
    cclient: &mut CoordinatorClient<Channel>,
) -> anyhow::Result<(Vec<Standin>, Vec<JoinHandle<()>>)> {
    let (mut agents, mut tasks) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let s = Standin::new().with_metrics(metrics);
        let srv = s.clone();
        tasks.push(tokio::spawn(async move {
            let _ = srv.serve(l).await;
        }));
        cclient
            .register_agent(pb::RegisterAgentRequest {
                agent_id: format!("standin-{i:04}"),
                hostname: "bench".into(),
                address: format!("http://{addr}"),
                lease_duration: Some(duration_to_pb(Duration::from_secs(3600))),
                ..Default::default()
            })
            .await?;
        agents.push(s);
    }
    Ok((agents, tasks))
}

async fn until_all(agents: &[Standin], held: bool, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while agents.iter().any(|a| a.applied().is_empty() == held) {
        if Instant::now() > deadline {
            let n = agents.iter().filter(|a| !a.applied().is_empty()).count();
            bail!("{n} of {} agents hold a fault; wanted {}", agents.len(), if held { "all" } else { "none" });
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

/// (j) create -> all applied, and (k/l) emergency stop, with `n` stand-ins.
async fn bench_scenarios(n: usize, runs: usize, dir: &Path) -> anyhow::Result<(Stats, Stats)> {
    let coord = start_coordinator(&dir.join(format!("scenarios-{n}")), None).await?;
    let mut c = CoordinatorClient::new(connect(&coord.url).await?);
    let (agents, tasks) = standins(n, &mut c).await?;
    let spec = |d: Duration| pb::ScenarioSpec {
        name: "bench".into(),
        fault: Some(pb::FaultSpec {
            target: Some(pb::Target { kind: Some(pb::target::Kind::ProcessName("bench-victim".into())) }),
            fault: Some(pb::fault_spec::Fault::ProcessPause(pb::ProcessPause {})),
            ..Default::default()
        }),
        duration: Some(duration_to_pb(d)),
        severity: 2,
        ..Default::default()
    };
    let (mut create, mut estop) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let t0 = Instant::now();
        let sc =
            c.create_scenario(pb::CreateScenarioRequest { spec: Some(spec(Duration::from_secs(300))), dry_run: false }).await?.into_inner();
        until_all(&agents, true, Duration::from_secs(60)).await?;
        create.push(t0.elapsed());
        let id = sc.scenario.context("no scenario")?.id;
        let t1 = Instant::now();
        let r = c.emergency_stop(pb::EmergencyStopRequest { reason: format!("bench run {run}"), deadline: None }).await?.into_inner();
        estop.push(t1.elapsed());
        if r.agents_reached as usize != n || r.faults_reverted as usize != n {
            let missed: Vec<String> =
                r.results.iter().filter(|x| !x.reached).take(3).map(|x| format!("{}: {}", x.agent_id, x.error)).collect();
            bail!(
                "run {run}: reached {} agents, reverted {} faults (want {n}) in {:?}; e.g. {missed:?}",
                r.agents_reached,
                r.faults_reverted,
                t1.elapsed()
            );
        }
        until_all(&agents, false, Duration::from_secs(1)).await.context("faults left after the emergency stop answered")?;
        // The scenario ends aborted once its runner has confirmed the reverts.
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.get_scenario(pb::GetScenarioRequest { id: id.clone() }).await?.into_inner().state != pb::ScenarioState::Aborted as i32 {
            if Instant::now() > deadline {
                bail!("scenario {id} never ended after the emergency stop");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.arm(pb::ArmRequest { reason: "bench".into() }).await?;
    }
    for t in tasks {
        t.abort();
    }
    coord.shutdown().await?;
    Ok((stats(create), stats(estop)))
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let f: Vec<&str> = s[s.rfind(')').context("stat")? + 2..].split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Built binary `bin` on a free port (`--listen`, `--insecure`, then `args`), quiet, killed
/// with its handle; its pid and URL.
fn daemon_process(bin: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<(tokio::process::Child, u32, String)> {
    let port = chaos_e2e::free_port();
    let child = tokio::process::Command::new(chaos_e2e::bin(bin))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--insecure"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let pid = child.id().with_context(|| format!("{bin} pid"))?;
    Ok((child, pid, format!("http://127.0.0.1:{port}")))
}

/// A coordinator process on a free port with its state under `dir`.
fn coordinator_process(dir: &Path, name: &str) -> anyhow::Result<(tokio::process::Child, u32, String)> {
    daemon_process("chaos-coordinator", &["--state-dir".as_ref(), dir.join(name).as_os_str()])
}

/// Figures of the hub benchmark.
struct HubFigures {
    cpu_pct: f64,
    rss_mib: f64,
    delay: Stats,
    batches: usize,
    skipped: u64,
}

/// (n) the hub: `agents` stand-ins streaming `metrics` values at 1 Hz into a
/// real coordinator process, `watchers` clients each reading every batch;
/// coordinator CPU and RSS over `window`, and sampled → delivered delay.
async fn bench_hub(agents: usize, metrics: usize, watchers: usize, window: Duration, dir: &Path) -> anyhow::Result<HubFigures> {
    let (mut child, pid, url) = coordinator_process(dir, "hub-coordinator")?;
    let mut c = CoordinatorClient::new(connect(&url).await?);
    let (_agents, tasks) = standins_with_metrics(agents, metrics, &mut c).await?;
    // Until the hub has a current batch from every agent.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c.get_metrics(pb::GetMetricsRequest::default()).await?.into_inner();
        let current = r.sources.iter().filter(|s| !s.stale && s.batches_received > 0).count();
        if current >= agents {
            break;
        }
        if Instant::now() > deadline {
            bail!("the hub follows {current} of {agents} agents after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..watchers {
        let mut w = CoordinatorClient::new(connect(&url).await?);
        let mut stream = w.stream_metrics(pb::StreamMetricsRequest::default()).await?.into_inner();
        let on = Arc::clone(&measuring);
        readers.push(tokio::spawn(async move {
            let (mut delays, mut skipped) = (Vec::new(), 0u64);
            while let Ok(Some(ev)) = stream.message().await {
                if !on.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                match ev.event {
                    Some(pb::metric_event::Event::Batch(b)) => {
                        if let Some(at) = b.sampled_at.as_ref() {
                            let sampled = chaos_proto::convert::timestamp_from_pb(at);
                            delays.push(std::time::SystemTime::now().duration_since(sampled).unwrap_or_default());
                        }
                    }
                    Some(pb::metric_event::Event::Skipped(n)) => skipped += n,
                    _ => {}
                }
            }
            (delays, skipped)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    let (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
    tokio::time::sleep(window).await;
    let (elapsed, used) = (t0.elapsed(), cpu_ticks(pid)? - c0);
    measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    let rss_kib = look(pid)?.rss_kib as f64;
    let _ = child.kill().await;
    let (mut delays, mut skipped) = (Vec::new(), 0);
    for r in readers {
        let (d, s) = r.await?;
        delays.extend(d);
        skipped += s;
    }
    for t in tasks {
        t.abort();
    }
    let batches = delays.len();
    Ok(HubFigures {
        cpu_pct: 100.0 * (used as f64 / 100.0) / elapsed.as_secs_f64(),
        rss_mib: rss_kib / 1024.0,
        delay: stats(delays),
        batches,
        skipped,
    })
}

/// (m) CPU of a coordinator process (utime + stime from /proc) while `n`
/// agents heartbeat at 1 Hz, spread evenly, each on its own connection:
/// as unary `Heartbeat` calls, or (`streamed`) each on its `HeartbeatStream`.
async fn bench_heartbeat_cpu(n: usize, window: Duration, dir: &Path, streamed: bool) -> anyhow::Result<f64> {
    let (mut child, pid, url) = coordinator_process(dir, "cpu-coordinator")?;
    let mut clients = Vec::with_capacity(n);
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = CoordinatorClient::new(connect(&url).await?);
        c.register_agent(pb::RegisterAgentRequest {
            agent_id: format!("hb-{i:04}"),
            hostname: "bench".into(),
            // Never called: heartbeats only (the orphan check finds nothing there).
            address: "http://127.0.0.1:9".into(),
            lease_duration: Some(duration_to_pb(Duration::from_secs(10))),
            ..Default::default()
        })
        .await?;
        if streamed {
            let (send, queue) = tokio::sync::mpsc::channel(4);
            let mut answers = c.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(queue)).await?.into_inner();
            tokio::spawn(async move { while let Ok(Some(_)) = answers.message().await {} });
            streams.push(send);
        }
        clients.push(c);
    }
    // Warm up one full round, then measure.
    let tick = Duration::from_secs(1) / n as u32;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0usize;
    let (mut t0, mut c0) = (Instant::now(), 0u64);
    let total = n + (window.as_secs_f64() * n as f64) as usize;
    while sent < total {
        interval.tick().await;
        if sent == n {
            (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
        }
        let beat = pb::HeartbeatRequest { agent_id: format!("hb-{:04}", sent % n), ..Default::default() };
        if streamed {
            streams[sent % n].send(beat).await.context("a heartbeat stream closed")?;
        } else {
            let mut c = clients[sent % n].clone();
            tokio::spawn(async move {
                let _ = c.heartbeat(beat).await;
            });
        }
        sent += 1;
    }
    let (elapsed, used) = (t0.elapsed(), cpu_ticks(pid)? - c0);
    // /proc counts in USER_HZ, which the Linux ABI fixes at 100 (x86, arm, riscv).
    let clk = 100.0;
    let _ = child.kill().await;
    Ok(100.0 * (used as f64 / clk) / elapsed.as_secs_f64())
}

fn net_spec(ns: &str, fault: pb::fault_spec::Fault, id: String) -> pb::FaultSpec {
    pb::FaultSpec {
        id,
        target: Some(pb::Target { kind: Some(pb::target::Kind::Netns(ns.to_string())) }),
        duration: Some(duration_to_pb(Duration::from_secs(600))),
        labels: Default::default(),
        fault: Some(fault),
    }
}

fn scope(peer: &str, direction: pb::Direction) -> Option<pb::NetworkScope> {
    Some(pb::NetworkScope { peer_cidrs: vec![format!("{peer}/32")], direction: direction as i32, ..Default::default() })
}

/// Network figures between two namespaces on a veth pair (198.18.0.0/15).
struct NetFigures {
    apply: Stats,
    revert: Stats,
    partition_crossed: (u32, u32),
    loss: (u32, u32),
    baseline_after: (u32, u32),
    ruleset_restored: bool,
    /// Per-packet added delay minus 50 ms (absolute), and the jitter run's spread.
    latency_err: Vec<f64>,
    latency_mean: f64,
    jitter_sd: f64,
    latency_apply: Stats,
    /// Achieved bit/s under an 8 Mbit/s cap, and TCP bit/s through the delay engine (1 ms, ingress).
    bandwidth_bps: f64,
    engine_bps: f64,
    /// Under 10 % corruption (ingress), 10 % duplication (egress), an 8 Mbit/s ingress cap (ifb),
    /// and flat-out UDP through a 1 ms engine hold.
    corrupt: UdpCount,
    duplicate: UdpCount,
    ingress_bps: f64,
    engine_udp: UdpCount,
    /// (i') the same flat-out UDP over the plain path (no fault), and its sink's RcvbufErrors.
    plain_udp: (UdpCount, u64),
    /// Where (i')'s datagrams went: what the engine handled and let pass, what the sink's socket dropped.
    engine_udp_split: UdpSplit,
    /// (i'') one TCP bulk flow through 50 ms of ingress latency.
    tcp50: TcpRun,
    /// (s) revert checks by family.
    checks: Vec<(&'static str, Checks)>,
}

/// Counters around (i'): the engine's (ListFaults `achieved`) and the receiver's `Udp RcvbufErrors`.
#[derive(Debug, Default, Clone, Copy)]
struct UdpSplit {
    handled: f64,
    passed_undelayed: f64,
    rcvbuf_errors: u64,
}

/// One TCP bulk flow: rate, the sender's counters over it, and the window limit of its buffers.
#[derive(Debug, Default, Clone, Copy)]
struct TcpRun {
    bps: f64,
    segs: u64,
    retrans: u64,
    dsack: u64,
    reorder: u64,
    /// min(receiver's tcp_rmem max, sender's tcp_wmem max) / 2 (the kernel keeps about half
    /// of a buffer for overhead), over the RTT: what these socket buffers allow at best.
    bdp_bps: f64,
    rtt_ms: f64,
}

/// The sender-side TCP counters (nstat's names): reorderings seen, segments resent,
/// DSACKs received (a resend that was not needed), segments sent.
fn tcp_counters(ns: &str) -> [u64; 4] {
    let reorder = ["TCPSACKReorder", "TCPTSReorder", "TCPRenoReorder"].iter().map(|f| NetPair::netstat(ns, "TcpExt", f)).sum();
    [reorder, NetPair::snmp(ns, "Tcp", "RetransSegs"), NetPair::netstat(ns, "TcpExt", "TCPDSACKRecv"), NetPair::snmp(ns, "Tcp", "OutSegs")]
}

/// The max (third) field of a `net.ipv4.tcp_[rw]mem` sysctl inside `ns`.
fn tcp_mem_max(ns: &str, which: &str) -> u64 {
    let out = NetPair::exec(ns, &["cat", &format!("/proc/sys/net/ipv4/{which}")]);
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The `achieved` counter `key` of fault `id`, as the agent lists it.
async fn achieved(client: &mut AgentClient<Channel>, id: &str, key: &str) -> anyhow::Result<f64> {
    let faults = client.list_faults(pb::ListFaultsRequest::default()).await?.into_inner().faults;
    let f = faults.iter().find(|f| f.spec.as_ref().is_some_and(|s| s.id == id)).with_context(|| format!("fault {id} listed"))?;
    Ok(f.applied.as_ref().and_then(|a| a.achieved.get(key)).copied().unwrap_or(f64::NAN))
}

/// A fault towards a peer address.
type FaultOf = fn(&str) -> pb::fault_spec::Fault;

/// The goal of the revert check: a fifth of (b)'s, so an emergency stop stays within its own.
const CHECK_GOAL: &str = "<= 20 ms p99";

/// (s) One family's revert checks: a row of what they added, a note of any that did not verify.
fn check_rows(out: &mut String, notes: &mut Vec<String>, family: &str, c: &Checks) {
    use std::fmt::Write;
    let name = format!("(s) RevertFault: what its re-read + compare added ({family})");
    if c.took.is_empty() {
        let _ = writeln!(out, "{name:<70} {:>6}  no check reported  {CHECK_GOAL}", 0);
    } else {
        let s = stats(c.took.clone());
        let _ = writeln!(out, "{:<70} {:>6} {:>9} {:>9} {:>9}  {CHECK_GOAL}", name, s.n, ms(s.p50), ms(s.p99), ms(s.max));
    }
    if c.not_verified.is_empty() {
        notes.push(format!("(s) {family}: all {} reverts verified (host state as before)", c.took.len()));
    } else {
        notes.push(format!("(s) {family}: {} reverts NOT verified: {}", c.not_verified.len(), c.not_verified.join("; ")));
    }
}

fn median_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).saturating_sub(1).min(v.len() - 1)];
    (at(0.5), at(0.99))
}

async fn bench_network(dir: &Path, loss_packets: u32) -> anyhow::Result<NetFigures> {
    let pair = NetPair::new();
    let agent = start_agent(dir, "net-bench", None, None).await?;
    let mut client = AgentClient::new(connect(&agent.url).await?);
    let before = NetPair::ruleset(&pair.a);
    // (c) apply -> effect: the answer comes after the nft transaction and its verification.
    let (mut apply, mut revert) = (Vec::new(), Vec::new());
    let mut partition_checks = Checks::default();
    for i in 0..50 {
        let partition = pb::fault_spec::Fault::NetworkPartition(pb::NetworkPartition { scope: scope(&pair.b_ip, pb::Direction::Both) });
        let t0 = Instant::now();
        client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, partition, format!("nb{i}"))) }).await?;
        apply.push(t0.elapsed());
        let t1 = Instant::now();
        let r = client.revert_fault(pb::RevertFaultRequest { fault_id: format!("nb{i}") }).await?.into_inner();
        revert.push(t1.elapsed());
        partition_checks.take(r.fault.as_ref());
    }
    // (s) the revert check of the other families: 20 apply/revert cycles each, no traffic.
    let mut checks = vec![("network_partition", partition_checks)];
    let others: [(&'static str, FaultOf); 3] = [
        ("network_loss", |peer| {
            pb::fault_spec::Fault::NetworkLoss(pb::NetworkLoss {
                scope: scope(peer, pb::Direction::Both),
                percent: 10.0,
                correlation_percent: 0.0,
            })
        }),
        ("network_latency", |peer| {
            pb::fault_spec::Fault::NetworkLatency(pb::NetworkLatency {
                scope: scope(peer, pb::Direction::Ingress),
                delay: Some(duration_to_pb(Duration::from_millis(5))),
                jitter: None,
                correlation_percent: 0.0,
            })
        }),
        ("network_bandwidth", |peer| {
            pb::fault_spec::Fault::NetworkBandwidth(pb::NetworkBandwidth {
                scope: scope(peer, pb::Direction::Egress),
                rate_bits_per_second: 8_000_000,
                burst_bytes: 0,
            })
        }),
    ];
    for (family, fault) in others {
        let mut c = Checks::default();
        for i in 0..20 {
            let id = format!("chk-{family}-{i}").replace('_', "-");
            client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, fault(&pair.b_ip), id.clone())) }).await?;
            c.take(client.revert_fault(pb::RevertFaultRequest { fault_id: id }).await?.into_inner().fault.as_ref());
        }
        checks.push((family, c));
    }
    let partition = pb::fault_spec::Fault::NetworkPartition(pb::NetworkPartition { scope: scope(&pair.b_ip, pb::Direction::Both) });
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, partition, "np".into())) }).await?;
    let crossed = NetPair::ping_every(&pair.a, &pair.b_ip, 200, "0.005");
    client.revert_fault(pb::RevertFaultRequest { fault_id: "np".into() }).await?;
    // (d) loss: ingress only, so each echo reply crosses the fault once.
    let loss = pb::fault_spec::Fault::NetworkLoss(pb::NetworkLoss {
        scope: scope(&pair.b_ip, pb::Direction::Ingress),
        percent: 10.0,
        correlation_percent: 0.0,
    });
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, loss, "nl".into())) }).await?;
    let received = NetPair::ping_every(&pair.a, &pair.b_ip, loss_packets, "0.001");
    client.revert_fault(pb::RevertFaultRequest { fault_id: "nl".into() }).await?;
    // (g) latency 50 ms at ingress, then 50 ms ± 10 ms; RTT measured user to user.
    let base: Vec<f64> = NetPair::rtts_ms(&pair.a, &pair.b_ip, 50, "0.01");
    let base_mean = base.iter().sum::<f64>() / base.len().max(1) as f64;
    let mut latency_apply = Vec::new();
    let run_latency = |jitter_ms: i32, id: &'static str| {
        let lat = pb::fault_spec::Fault::NetworkLatency(pb::NetworkLatency {
            scope: scope(&pair.b_ip, pb::Direction::Ingress),
            delay: Some(duration_to_pb(Duration::from_millis(50))),
            jitter: (jitter_ms > 0).then(|| prost_types::Duration { seconds: 0, nanos: jitter_ms * 1_000_000 }),
            correlation_percent: 0.0,
        });
        (net_spec(&pair.a, lat, id.into()), id)
    };
    let (spec, id) = run_latency(0, "nlat");
    let t0 = Instant::now();
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(spec) }).await?;
    latency_apply.push(t0.elapsed());
    let fixed = NetPair::rtts_ms(&pair.a, &pair.b_ip, 500, "0.01");
    client.revert_fault(pb::RevertFaultRequest { fault_id: id.into() }).await?;
    let (spec, id) = run_latency(10, "njit");
    let t0 = Instant::now();
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(spec) }).await?;
    latency_apply.push(t0.elapsed());
    let jittered = NetPair::rtts_ms(&pair.a, &pair.b_ip, 500, "0.01");
    client.revert_fault(pb::RevertFaultRequest { fault_id: id.into() }).await?;
    let latency_err: Vec<f64> = fixed.iter().map(|r| (r - base_mean - 50.0).abs()).collect();
    let latency_mean = fixed.iter().sum::<f64>() / fixed.len().max(1) as f64 - base_mean;
    let jm = jittered.iter().sum::<f64>() / jittered.len().max(1) as f64;
    let jitter_sd = (jittered.iter().map(|x| (x - jm).powi(2)).sum::<f64>() / jittered.len().max(1) as f64).sqrt();
    // (h) bandwidth 8 Mbit/s towards b.
    let bw = pb::fault_spec::Fault::NetworkBandwidth(pb::NetworkBandwidth {
        scope: scope(&pair.b_ip, pb::Direction::Egress),
        rate_bits_per_second: 8_000_000,
        burst_bytes: 0,
    });
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, bw, "nbw".into())) }).await?;
    let bandwidth_bps = NetPair::throughput_bps(&pair.a, &pair.b, &pair.b_ip, 9100, 4_000_000);
    client.revert_fault(pb::RevertFaultRequest { fault_id: "nbw".into() }).await?;
    // (i) what the delay engine sustains: bulk TCP into a with 1 ms held at a's ingress.
    let lat = pb::fault_spec::Fault::NetworkLatency(pb::NetworkLatency {
        scope: scope(&pair.b_ip, pb::Direction::Ingress),
        delay: Some(duration_to_pb(Duration::from_millis(1))),
        jitter: None,
        correlation_percent: 0.0,
    });
    let rcvbuf0 = NetPair::snmp(&pair.a, "Udp", "RcvbufErrors");
    let plain = NetPair::udp(&pair.b, &pair.a, &pair.a_ip, 9107, 200_000, 0);
    let plain_udp = (plain, NetPair::snmp(&pair.a, "Udp", "RcvbufErrors") - rcvbuf0);
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, lat, "neng".into())) }).await?;
    let engine_bps = NetPair::throughput_bps(&pair.b, &pair.a, &pair.a_ip, 9101, 50_000_000);
    let handled0 = achieved(&mut client, "neng", "packets_handled").await?;
    let passed0 = achieved(&mut client, "neng", "packets_passed_undelayed").await?;
    let rcvbuf0 = NetPair::snmp(&pair.a, "Udp", "RcvbufErrors");
    let engine_udp = NetPair::udp(&pair.b, &pair.a, &pair.a_ip, 9102, 200_000, 0);
    let engine_udp_split = UdpSplit {
        handled: achieved(&mut client, "neng", "packets_handled").await? - handled0,
        passed_undelayed: achieved(&mut client, "neng", "packets_passed_undelayed").await? - passed0,
        rcvbuf_errors: NetPair::snmp(&pair.a, "Udp", "RcvbufErrors") - rcvbuf0,
    };
    client.revert_fault(pb::RevertFaultRequest { fault_id: "neng".into() }).await?;
    // (i'') one TCP bulk flow b -> a through 50 ms at a's ingress, no jitter.
    let lat = pb::fault_spec::Fault::NetworkLatency(pb::NetworkLatency {
        scope: scope(&pair.b_ip, pb::Direction::Ingress),
        delay: Some(duration_to_pb(Duration::from_millis(50))),
        jitter: None,
        correlation_percent: 0.0,
    });
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, lat, "nt50".into())) }).await?;
    let c0 = tcp_counters(&pair.b);
    let bps = NetPair::throughput_bps(&pair.b, &pair.a, &pair.a_ip, 9106, 60_000_000);
    let c1 = tcp_counters(&pair.b);
    client.revert_fault(pb::RevertFaultRequest { fault_id: "nt50".into() }).await?;
    let [reorder, retrans, dsack, segs] = [0, 1, 2, 3].map(|i| c1[i].saturating_sub(c0[i]));
    let window = tcp_mem_max(&pair.a, "tcp_rmem").min(tcp_mem_max(&pair.b, "tcp_wmem")) / 2;
    let rtt_ms = 50.0 + base_mean;
    let tcp50 = TcpRun { bps, segs, retrans, dsack, reorder, bdp_bps: window as f64 * 8.0 / (rtt_ms / 1e3), rtt_ms };
    // (j) corruption 10 % at a's ingress and (k) duplication 10 % at a's egress, 10,000 UDP datagrams each.
    let corrupt =
        pb::fault_spec::Fault::NetworkCorrupt(pb::NetworkCorrupt { scope: scope(&pair.b_ip, pb::Direction::Ingress), percent: 10.0 });
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, corrupt, "ncor".into())) }).await?;
    let corrupt = NetPair::udp(&pair.b, &pair.a, &pair.a_ip, 9103, 10_000, 10_000);
    client.revert_fault(pb::RevertFaultRequest { fault_id: "ncor".into() }).await?;
    let dup =
        pb::fault_spec::Fault::NetworkDuplicate(pb::NetworkDuplicate { scope: scope(&pair.b_ip, pb::Direction::Egress), percent: 10.0 });
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, dup, "ndup".into())) }).await?;
    let duplicate = NetPair::udp(&pair.a, &pair.b, &pair.b_ip, 9104, 10_000, 10_000);
    client.revert_fault(pb::RevertFaultRequest { fault_id: "ndup".into() }).await?;
    // (l) 8 Mbit/s on a's ingress, through the fault's ifb.
    let bw = pb::fault_spec::Fault::NetworkBandwidth(pb::NetworkBandwidth {
        scope: scope(&pair.b_ip, pb::Direction::Ingress),
        rate_bits_per_second: 8_000_000,
        burst_bytes: 0,
    });
    client.apply_fault(pb::ApplyFaultRequest { spec: Some(net_spec(&pair.a, bw, "nbwi".into())) }).await?;
    let ingress_bps = NetPair::throughput_bps(&pair.b, &pair.a, &pair.a_ip, 9105, 4_000_000);
    client.revert_fault(pb::RevertFaultRequest { fault_id: "nbwi".into() }).await?;
    let after = NetPair::ping_every(&pair.a, &pair.b_ip, 200, "0.005");
    let restored = NetPair::ruleset(&pair.a) == before;
    agent.shutdown().await?;
    Ok(NetFigures {
        apply: stats(apply),
        revert: stats(revert),
        partition_crossed: (crossed, 200),
        loss: (loss_packets - received, loss_packets),
        baseline_after: (after, 200),
        ruleset_restored: restored,
        latency_err,
        latency_mean,
        jitter_sd,
        latency_apply: stats(latency_apply),
        bandwidth_bps,
        engine_bps,
        corrupt,
        duplicate,
        ingress_bps,
        engine_udp,
        engine_udp_split,
        plain_udp,
        tcp50,
        checks,
    })
}

/// One CPU load trace: 500 ms windows of a cgroup's usage.
struct CpuTrace {
    target: f64,
    /// (window end in s since start, load in % of one core).
    windows: Vec<(f64, f64)>,
}

impl CpuTrace {
    /// Record `secs` of 500 ms windows from a cumulative ns counter.
    fn record(target: f64, secs: u32, read: impl Fn() -> u64) -> CpuTrace {
        let t0 = Instant::now();
        let mut prev = (t0, read());
        let mut windows = vec![];
        for _ in 0..secs * 2 {
            std::thread::sleep(Duration::from_millis(500));
            let now = (Instant::now(), read());
            let pct = now.1.saturating_sub(prev.1) as f64 * 100.0 / (now.0 - prev.0).as_nanos() as f64;
            windows.push(((now.0 - t0).as_secs_f64(), pct));
            prev = now;
        }
        CpuTrace { target, windows }
    }

    /// Mean load after 2 s.
    fn mean(&self) -> f64 {
        let w: Vec<f64> = self.windows.iter().filter(|(t, _)| *t > 2.0).map(|(_, p)| *p).collect();
        w.iter().sum::<f64>() / w.len().max(1) as f64
    }

    /// When every later window stayed within 3 points of the target.
    fn settled_s(&self) -> Option<f64> {
        let last_bad = self.windows.iter().rposition(|(_, p)| (p - self.target).abs() > 3.0);
        match last_bad {
            None => self.windows.first().map(|w| w.0),
            Some(i) => self.windows.get(i + 1).map(|w| w.0),
        }
    }

    fn line(&self, who: &str) -> String {
        let settled = self.settled_s().map_or_else(|| "never (in 8 s)".to_string(), |s| format!("{s:.1} s"));
        let worst = self.windows.iter().filter(|(t, _)| *t > 2.0).map(|(_, p)| (p - self.target).abs()).fold(0.0, f64::max);
        format!(
            "{who:<10} mean {:>5.1} % (error {:>+5.1} pp), worst 500 ms window after 2 s off by {worst:.1} pp, within 3 pp for good from {settled}",
            self.mean(),
            self.mean() - self.target
        )
    }
}

async fn bench_resource(dir: &Path) -> anyhow::Result<(Vec<String>, Vec<(&'static str, Checks)>)> {
    let agent = start_agent(dir, "resource-bench", None, None).await?;
    let mut client = AgentClient::new(connect(&agent.url).await?);
    let host = || Some(pb::Target { kind: Some(pb::target::Kind::Host(pb::HostTarget {})) });
    let spec = |id: &str, fault: pb::fault_spec::Fault| pb::FaultSpec {
        id: id.to_string(),
        target: host(),
        duration: Some(duration_to_pb(Duration::from_secs(60))),
        fault: Some(fault),
        ..Default::default()
    };
    let mut lines = vec![];
    let cg_root = Path::new("/sys/fs/cgroup");
    let v2 = cg_root.join("cgroup.controllers").exists();
    let usage_of = move |dir: std::path::PathBuf| {
        move || -> u64 {
            if v2 {
                let t = std::fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
                t.lines().find_map(|l| l.strip_prefix("usage_usec ")?.parse::<u64>().ok()).unwrap_or(0) * 1000
            } else {
                std::fs::read_to_string(dir.join("cpuacct.usage")).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
            }
        }
    };
    let acct = |name: &str| if v2 { cg_root.join(name) } else { cg_root.join("cpuacct").join(name) };
    let stress_ng = std::process::Command::new("stress-ng").arg("--version").output().is_ok_and(|o| o.status.success());
    let (mut stress_checks, mut other_checks) = (Checks::default(), Checks::default());
    for load in [25.0, 50.0, 90.0] {
        let id = format!("bench-cpu-{load}");
        client
            .apply_fault(pb::ApplyFaultRequest {
                spec: Some(spec(&id, pb::fault_spec::Fault::CpuStress(pb::CpuStress { workers: 1, load_percent: load }))),
            })
            .await?;
        let read = usage_of(acct(&format!("chaos-{id}")));
        let ours = tokio::task::spawn_blocking(move || CpuTrace::record(load, 8, read)).await?;
        stress_checks.take(client.revert_fault(pb::RevertFaultRequest { fault_id: id }).await?.into_inner().fault.as_ref());
        lines.push(format!("(o) CPU stress {load:.0} % of one core, 1 worker, 8 s:"));
        lines.push(format!("      {}", ours.line("chaos")));
        if stress_ng {
            let cg = chaos_e2e::TestCgroup::new(&format!("bench-sng{load}"), &["cpu", "cpuacct"]);
            let mut c = cg.spawn_sh(&format!("exec stress-ng --cpu 1 --cpu-load {load} --timeout 9s --quiet"));
            let read = usage_of(if v2 { cg.dir("cpu") } else { cg.dir("cpuacct") });
            let theirs = tokio::task::spawn_blocking(move || CpuTrace::record(load, 8, read)).await;
            let _ = c.kill();
            let _ = c.wait();
            lines.push(format!("      {}", theirs?.line("stress-ng")));
        } else {
            lines.push("      stress-ng  not installed (apt-get install stress-ng) - no comparison".into());
        }
    }
    let t0 = Instant::now();
    let r = client
        .apply_fault(pb::ApplyFaultRequest {
            spec: Some(spec(
                "bench-mem",
                pb::fault_spec::Fault::MemoryStress(pb::MemoryStress { bytes: 256 << 20, percent_of_total: 0.0 }),
            )),
        })
        .await?
        .into_inner();
    let took = t0.elapsed();
    let rss = r.fault.and_then(|f| f.applied).and_then(|a| a.achieved.get("resident_bytes").copied()).unwrap_or(0.0);
    other_checks.take(client.revert_fault(pb::RevertFaultRequest { fault_id: "bench-mem".into() }).await?.into_inner().fault.as_ref());
    lines.push(format!(
        "(p) memory stress 256 MiB: {:.1} MiB resident when ApplyFault answered ({:+.1} %), in {:.0} ms",
        rss / 1048576.0,
        (rss / (256.0 * 1048576.0) - 1.0) * 100.0,
        took.as_secs_f64() * 1000.0
    ));
    let mnt = dir.join("fill-tmpfs");
    std::fs::create_dir_all(&mnt)?;
    if std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"]).arg(&mnt).status()?.success() {
        let fill = pb::DiskFill { path: mnt.display().to_string(), bytes: 0, fill_to_percent: 50.0 };
        let t0 = Instant::now();
        let r = client.apply_fault(pb::ApplyFaultRequest { spec: Some(spec("bench-fill", pb::fault_spec::Fault::DiskFill(fill))) }).await;
        let took = t0.elapsed();
        let st = nix::sys::statvfs::statvfs(&mnt)?;
        let used = (st.blocks() - st.blocks_free()) as f64;
        let df = used * 100.0 / (used + st.blocks_available() as f64);
        let _ = client.revert_fault(pb::RevertFaultRequest { fault_id: "bench-fill".into() }).await;
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        r?;
        lines.push(format!("(q) disk fill to 50 % of a 256 MiB tmpfs: df says {df:.2} % after, in {:.1} ms", took.as_secs_f64() * 1000.0));
    } else {
        lines.push("(q) disk fill: could not mount a tmpfs (needs root)".into());
    }
    // (s) the revert check of a cgroup knob: 20 CPU throttles of a cgroup of the bench's own.
    let cg = chaos_e2e::TestCgroup::new("bench-thr", &["cpu", "cpuacct"]);
    let mut throttle_checks = Checks::default();
    for i in 0..20 {
        let id = format!("bench-thr-{i}");
        let mut s = spec(&id, pb::fault_spec::Fault::CpuThrottle(pb::CpuThrottle { quota_percent: 20.0 }));
        s.target = Some(pb::Target { kind: Some(pb::target::Kind::CgroupPath(cg.path.clone())) });
        client.apply_fault(pb::ApplyFaultRequest { spec: Some(s) }).await?;
        throttle_checks.take(client.revert_fault(pb::RevertFaultRequest { fault_id: id }).await?.into_inner().fault.as_ref());
    }
    agent.shutdown().await?;
    Ok((lines, vec![("cpu_stress", stress_checks), ("cpu_throttle", throttle_checks), ("memory_stress", other_checks)]))
}

/// What one look at a process in /proc found (all its threads).
#[derive(Debug, Clone, Copy, Default)]
struct ProcLook {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    /// utime + stime from /proc/PID/stat, in USER_HZ ticks (10 ms).
    ticks: u64,
    /// Time on a CPU of the live threads (/proc/PID/task/*/schedstat), ns.
    run_ns: u64,
    /// Context switches of the live threads (each one a wake-up or a preemption).
    switches: u64,
    threads: usize,
}

fn status_kib(status: &str, key: &str) -> u64 {
    status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

fn look(pid: u32) -> anyhow::Result<ProcLook> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("/proc/{pid}/status"))?;
    let mut l = ProcLook {
        rss_kib: status_kib(&status, "VmRSS:"),
        anon_kib: status_kib(&status, "RssAnon:"),
        file_kib: status_kib(&status, "RssFile:"),
        ticks: cpu_ticks(pid)?,
        ..Default::default()
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        // A thread may end between the listing and the read: it is left out.
        if let Ok(s) = std::fs::read_to_string(task.join("schedstat")) {
            l.run_ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
        if let Ok(s) = std::fs::read_to_string(task.join("status")) {
            l.switches += status_kib(&s, "voluntary_ctxt_switches:") + status_kib(&s, "nonvoluntary_ctxt_switches:");
        }
        l.threads += 1;
    }
    Ok(l)
}

/// An idle agent over one window.
#[derive(Debug, Default)]
struct IdleWindow {
    rss_max_kib: u64,
    end: ProcLook,
    /// % of one core, from utime + stime (10 ms resolution).
    cpu_pct: f64,
    /// % of one core, from the threads' schedstat (ns; threads that ended are missed).
    run_pct: f64,
    switches_per_s: f64,
    seconds: f64,
}

/// Look at `pid` every second for `window`.
async fn idle_window(pid: u32, window: Duration) -> anyhow::Result<IdleWindow> {
    let (t0, first) = (Instant::now(), look(pid)?);
    let mut rss_max_kib = first.rss_kib;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let end = loop {
        tick.tick().await;
        let l = look(pid)?;
        rss_max_kib = rss_max_kib.max(l.rss_kib);
        if t0.elapsed() + Duration::from_millis(500) >= window {
            break l;
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    Ok(IdleWindow {
        rss_max_kib,
        end,
        // USER_HZ is 100 by the Linux ABI.
        cpu_pct: 100.0 * (end.ticks.saturating_sub(first.ticks) as f64 / 100.0) / secs,
        run_pct: 100.0 * (end.run_ns.saturating_sub(first.run_ns) as f64 / 1e9) / secs,
        switches_per_s: end.switches.saturating_sub(first.switches) as f64 / secs,
        seconds: secs,
    })
}

/// Figures of the idle suite.
struct IdleFigures {
    alone: IdleWindow,
    subscribed: Option<IdleWindow>,
}

/// (u) The real `chaos-agent` process with no faults: alone (no
/// coordinator, no client) for `window` after it settled, then while one
/// client follows its metric stream.
async fn bench_idle(dir: &Path, window: Duration) -> anyhow::Result<IdleFigures> {
    let (journal, socket) = (dir.join("idle-journal"), dir.join("idle-agent.sock"));
    let args = [
        "--agent-id".as_ref(),
        "bench-idle".as_ref(),
        "--journal-dir".as_ref(),
        journal.as_os_str(),
        "--local-socket".as_ref(),
        socket.as_os_str(),
    ];
    let (mut child, pid, url) = daemon_process("chaos-agent", &args)?;
    {
        // Answering, then no client: the channel is closed before the window.
        let mut c = AgentClient::new(connect(&url).await?);
        c.list_faults(pb::ListFaultsRequest::default()).await?;
    }
    // Settle: start-up probes done, the blocking pool's threads gone (tokio keeps them 10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let alone = idle_window(pid, window).await?;
    let subscribed = async {
        let mut c = AgentClient::new(connect(&url).await?);
        let mut stream = c.stream_metrics(pb::StreamMetricsRequest::default()).await?.into_inner();
        let reader = tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let w = idle_window(pid, Duration::from_secs(10)).await;
        reader.abort();
        w
    }
    .await;
    let _ = child.kill().await;
    Ok(IdleFigures { alone, subscribed: subscribed.map_err(|e| eprintln!("(u') the subscribed window failed: {e:#}")).ok() })
}

/// (t) The VM suite's netem checks, as lines for the notes; a VM that does
/// not boot or a check that fails is named, never left out.
fn bench_vm_netem() -> Vec<String> {
    let checks = [
        "netem_latency_with_jitter",
        "latency_correlation_by_the_engine",
        "netem_loss_with_correlation",
        "netem_corruption",
        "netem_duplication",
    ];
    let binaries = ["chaos-agent", "chaos", "chaos-netprobe", "chaos-vm-suite"].map(|b| chaos_e2e::bin_dir().join(b));
    if let Some(missing) = binaries.iter().find(|b| !b.exists()) {
        return vec![format!("(t) netem in a VM: skipped: {} not built (cargo build --workspace --bins)", missing.display())];
    }
    let spec = chaos_e2e::vm::VmSpec {
        binaries: binaries.to_vec(),
        program: "/chaos/bin/chaos-vm-suite".into(),
        args: checks.iter().map(ToString::to_string).collect(),
        memory_mib: 1536,
        cpus: 2,
        disk_mib: None,
        timeout: Duration::from_secs(300),
    };
    match chaos_e2e::vm::boot(&spec) {
        Err(e) => vec![format!("(t) netem in a VM: FAILED to run: {e:#}")],
        Ok(run) => {
            let mut lines = vec![format!(
                "(t) netem in a VM, kernel {} under QEMU TCG (EMULATED: timings looser than a host's), boot {:.1} s; goals as the engine's (g, e, j, k):",
                run.kernel.version,
                run.boot.map_or(f64::NAN, |b| b.as_secs_f64())
            )];
            let found: Vec<&str> = run.console.lines().filter(|l| l.starts_with("VM-CHECK ")).collect();
            lines.extend(found.iter().map(|l| format!("      {}", l.trim_start_matches("VM-CHECK "))));
            if found.len() != checks.len() || run.exit != Some(0) {
                lines.push(format!("      the VM suite exited {:?} with {} of {} checks reported", run.exit, found.len(), checks.len()));
            }
            lines
        }
    }
}

fn main() -> anyhow::Result<()> {
    // The in-process agent runs its stress workers as this binary.
    chaos_agent::stressor::run_if_stressor();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let args = Args::parse();
    chaos_proto::serve::init_tracing(chaos_proto::serve::LogFormat::Text);
    let dir = tempfile::tempdir().context("tempdir")?;
    let out = &mut String::new();
    use std::fmt::Write;
    writeln!(out, "{:<70} {:>6} {:>9} {:>9} {:>9}  goal", "measure", "n", "p50 ms", "p99 ms", "max ms")?;
    let row = |out: &mut String, name: &str, s: &Stats, goal: &str| {
        let _ = writeln!(out, "{:<70} {:>6} {:>9} {:>9} {:>9}  {goal}", name, s.n, ms(s.p50), ms(s.p99), ms(s.max));
    };
    // A figure that is not a latency: its value in the n..max columns.
    let figure = |out: &mut String, name: &str, value: &str, goal: &str| {
        let _ = writeln!(out, "{name:<70} {value:>36}  {goal}");
    };
    let mut notes = Vec::new();
    if matches!(args.suite, Suite::Idle | Suite::All) {
        eprintln!("(u) an idle chaos-agent process: settle 12 s, then 30 s alone and 10 s with one metric stream ...");
        let f = bench_idle(dir.path(), Duration::from_secs(30)).await?;
        let a = &f.alone;
        let mib = |kib: u64| kib as f64 / 1024.0;
        figure(out, "(u) idle agent RSS, max over 30 s (VmRSS)", &format!("{:.1} MiB", mib(a.rss_max_kib)), "<= 8 MiB");
        figure(
            out,
            "(u) idle agent RSS at the end (anon + file)",
            &format!("{:.1} MiB = {:.1} + {:.1}", mib(a.end.rss_kib), mib(a.end.anon_kib), mib(a.end.file_kib)),
            "<= 8 MiB",
        );
        figure(out, "(u) idle agent CPU over 30 s, utime + stime", &format!("{:.3} %", a.cpu_pct), "<= 0.02 % of a core");
        figure(out, "(u) idle agent CPU over 30 s, threads' schedstat (ns)", &format!("{:.4} %", a.run_pct), "<= 0.02 % of a core");
        figure(
            out,
            "(u) idle agent threads; context switches (all threads)",
            &format!("{} threads; {:.2}/s", a.end.threads, a.switches_per_s),
            "-",
        );
        if let Some(s) = &f.subscribed {
            figure(
                out,
                "(u') agent CPU, one client following StreamMetrics (1 Hz), 10 s",
                &format!("{:.3} % / {:.4} %", s.cpu_pct, s.run_pct),
                "-",
            );
            figure(
                out,
                "(u') ... its threads; context switches; RSS max",
                &format!("{} threads; {:.1}/s; {:.1} MiB", s.end.threads, s.switches_per_s, mib(s.rss_max_kib)),
                "-",
            );
        }
        notes.push(format!(
            "(u) idle agent: --insecure, no coordinator, no client, no faults; measured {:.1} s after 12 s of settling; CPU from /proc/PID/stat (10 ms ticks: 0.033 % resolution over 30 s) and from the live threads' schedstat (ns){}",
            a.seconds,
            f.subscribed.as_ref().map_or_else(String::new, |s| format!("; (u') {:.1} s, as stat % / schedstat %", s.seconds))
        ));
    }
    if matches!(args.suite, Suite::Lifecycle | Suite::All) {
        // Insecure first, then mTLS with a CA made for this run (under
        // `dir`, so removed with it).
        let modes = [Mode::insecure(dir.path()), Mode::tls(dir.path())?];
        let mut applies = Vec::new();
        for m in &modes {
            eprintln!("(a, {}) {} x ApplyFault(process_pause) -> SIGSTOP visible in /proc ...", m.label, args.faults);
            applies.push(bench_apply(args.faults, m).await?);
        }
        let mut estops = Vec::new();
        for m in &modes {
            eprintln!("(b, {}) EmergencyStop with {} agents x {} runs ...", m.label, args.agents, args.runs);
            estops.push(bench_estop(args.agents, args.runs, m).await?);
        }
        for (m, a) in modes.iter().zip(&applies) {
            row(out, &format!("(a) ApplyFault sent -> process stopped, client view ({})", m.label), &a.observed, "<= 10 ms p99");
        }
        for (m, a) in modes.iter().zip(&applies) {
            row(out, &format!("(a') in the agent: accepted -> applied, fsync + signal ({})", m.label), &a.inside, "-");
        }
        for (m, a) in modes.iter().zip(&applies) {
            row(out, &format!("(a'') first ListFaults on a new channel, with its handshake ({})", m.label), &a.first_call, "-");
        }
        for (m, b) in modes.iter().zip(&estops) {
            row(out, &format!("(b) EmergencyStop {} agents, every fault reverted ({})", args.agents, m.label), &b.all, "<= 100 ms p99");
        }
        if let Some(a) = applies.first() {
            check_rows(out, &mut notes, "process_pause", &a.checks);
        }
        notes.push(format!(
            "(a'') {FRESH_CHANNELS} new channels to the agent, not in (a): the call after the first on the same channel p50 {}; (a) opens its channel before timing",
            modes.iter().zip(&applies).map(|(m, a)| format!("{} ms {}", ms(a.next_call.p50), m.label)).collect::<Vec<_>>().join(", ")
        ));
        for (m, b) in modes.iter().zip(&estops) {
            let warm = b
                .warm
                .as_ref()
                .map_or_else(String::new, |w| format!("; runs 2..{}: p50 {} ms, p99 {} ms", args.runs, ms(w.p50), ms(w.p99)));
            let own = if b.self_reverted == 0 {
                String::new()
            } else {
                format!(" (+{} reverted by their agent on a heartbeat answered \"disarmed\" before the RevertAll came)", b.self_reverted)
            };
            let (i, t, k) = b.slowest;
            notes.push(format!(
                "(b, {}) {} agents, {} faults reverted{own} over {} runs, each checked in /proc; run 1 (the coordinator opens its {} agent connections in it{}): {} ms{warm}; slowest run {}: {} ms, {k} of its faults reverted by their agent on its own",
                m.label,
                args.agents,
                b.reverted,
                args.runs,
                args.agents,
                if m.ca.is_some() { ", mTLS handshakes included" } else { "" },
                ms(b.first),
                i + 1,
                ms(t)
            ));
        }
        notes.push(
            "(a, b) TLS: a CA made for this run; coordinator certificate, one agent certificate per agent (named as its agent id), \
             the bench's client an admin certificate; insecure: the same servers with no TLS (--insecure)"
                .into(),
        );
    }
    if matches!(args.suite, Suite::Vm | Suite::All) {
        eprintln!("(t) netem in a QEMU VM with Debian's stock kernel (emulated) ...");
        notes.extend(bench_vm_netem());
    }
    if matches!(args.suite, Suite::SlowStop | Suite::All) {
        eprintln!("(r) EmergencyStop with 100 agents while 10 wait out a 20 s container stop, {} runs ...", args.slow_stop_runs);
        let name = "(r) EmergencyStop 100 agents, 10 inside a 20 s container stop (insecure)";
        match bench_slow_stop(100, 10, args.slow_stop_runs, dir.path()).await? {
            SlowStop::Skipped(why) => {
                writeln!(out, "{name:<70} skipped: {why}")?;
            }
            SlowStop::Done(r) => {
                row(out, name, &r.took, "<= 2 s (its deadline)");
                let in_progress: Vec<String> = r.in_progress.iter().map(u32::to_string).collect();
                let trip: Vec<String> = r.round_trip.iter().map(|t| format!("{:.1} s", t.as_secs_f64())).collect();
                let own = if r.self_reverted == 0 {
                    String::new()
                } else {
                    format!(" (+{} by their agent on a heartbeat answered \"disarmed\" first)", r.self_reverted)
                };
                notes.push(format!(
                    "(r) {} runs in {} round(s) of 10 container stops with a 20 s grace (the containers outlive SIGTERM): every run answered, \
                     {} pause faults reverted{own}, each checked in /proc, the containers still running out their grace; \
                     faults_in_progress per run {}, complete=false each time; SIGTERM -> every container started again by its revert: {}",
                    r.took.n,
                    r.rounds,
                    r.reverted,
                    in_progress.join(", "),
                    trip.join(", ")
                ));
            }
        }
    }
    if matches!(args.suite, Suite::Coordinator | Suite::All) {
        eprintln!("(j) CreateScenario -> every agent holds the fault, 100 stand-in agents x {} runs ...", args.runs);
        let (j, k) = bench_scenarios(100, args.runs, dir.path()).await?;
        row(out, "(j) CreateScenario -> all 100 agents hold the fault", &j, "-");
        row(out, "(k) EmergencyStop, 100 stand-in agents each holding a scenario fault", &k, "<= 100 ms p99");
        eprintln!("(l) the same with 1,000 stand-in agents x 5 runs ...");
        let (j2, l) = bench_scenarios(1000, 5, dir.path()).await?;
        row(out, "(j') CreateScenario -> all 1,000 agents hold the fault", &j2, "-");
        row(out, "(l) EmergencyStop, 1,000 stand-in agents", &l, "<= 1 s p99");
        eprintln!("(m) coordinator CPU, 1,000 agents heartbeating at 1 Hz for 20 s, on streams then as single calls ...");
        let streamed = bench_heartbeat_cpu(1000, Duration::from_secs(20), dir.path(), true).await?;
        let unary = bench_heartbeat_cpu(1000, Duration::from_secs(20), dir.path(), false).await?;
        notes.push(format!(
            "(m) coordinator process CPU with 1,000 agents heartbeating at 1 Hz (own connection each): {streamed:.1} % of one core over 20 s on HeartbeatStream, as agents send them (goal <= 3 %); {unary:.1} % as unary Heartbeat calls (an older agent's way)"
        ));
    }
    if matches!(args.suite, Suite::Hub | Suite::All) {
        eprintln!("(n) metrics hub: 1,000 stand-in agents x 40 values at 1 Hz, 10 watchers, 20 s ...");
        let h = bench_hub(1000, 40, 10, Duration::from_secs(20), dir.path()).await?;
        row(out, "(n) sample taken on an agent -> delivered to a watcher (10 watchers)", &h.delay, "<= 50 ms p99");
        notes.push(format!(
            "(n) coordinator process with 1,000 agent streams at 1 Hz and 10 watchers: {:.1} % of one core over 20 s (goal <= 10 %), RSS {:.0} MiB; {} batches delivered, {} skipped by slow watchers",
            h.cpu_pct, h.rss_mib, h.batches, h.skipped
        ));
    }
    if matches!(args.suite, Suite::Resource | Suite::All) {
        eprintln!("(o..q) resource faults (CPU 25/50/90 %, with stress-ng for comparison; memory; disk fill) ...");
        let (lines, checks) = bench_resource(dir.path()).await?;
        notes.extend(lines);
        for (family, c) in &checks {
            check_rows(out, &mut notes, family, c);
        }
    }
    if matches!(args.suite, Suite::Network | Suite::All) {
        eprintln!("(c..f) network faults between two namespaces ...");
        let n = bench_network(dir.path(), args.loss_packets).await?;
        row(out, "(c) ApplyFault(partition) answered = rules verified in place", &n.apply, "<= 5 ms p99");
        row(out, "(c') RevertFault(partition) answered = tables deleted, revert checked", &n.revert, "<= 5 ms p99");
        row(out, "(c'') ApplyFault(latency) answered = engine bound + rules verified", &n.latency_apply, "<= 10 ms p99");
        for (family, c) in &n.checks {
            check_rows(out, &mut notes, family, c);
        }
        notes.push(format!("(d) partition: {}/{} pings crossed (goal 0)", n.partition_crossed.0, n.partition_crossed.1));
        let achieved = 100.0 * f64::from(n.loss.0) / f64::from(n.loss.1);
        notes.push(format!(
            "(e) loss 10 % requested (nftables numgen, ingress): {achieved:.2} % achieved over {} packets (goal +/- 1 pp)",
            n.loss.1
        ));
        notes.push(format!("(h) bandwidth 8 Mbit/s requested (htb): {:.2} Mbit/s achieved over TCP", n.bandwidth_bps / 1e6));
        notes.push(format!("(i) delay engine throughput (TCP through 1 ms ingress hold): {:.0} Mbit/s", n.engine_bps / 1e6));
        let (u, sp) = (n.engine_udp, n.engine_udp_split);
        notes.push(format!(
            "(i') delay engine, 200,000 64-byte UDP datagrams sent flat out through a 1 ms ingress hold: {} received in {:.2} s = {:.0} packets/s, {:.2} % lost (goal: >= 200k packets/s, < 1 % lost in the engine)",
            u.distinct,
            u.seconds,
            u.distinct as f64 / u.seconds.max(1e-9),
            100.0 * (u.sent - u.distinct) as f64 / u.sent as f64
        ));
        let queued = sp.handled + sp.passed_undelayed;
        notes.push(format!(
            "(i') where they went: sent {} / reached the queue {queued:.0} / held and released by the engine {:.0} / passed undelayed (socket full, fail-open) {:.0} / delivered {} / dropped at the sink's socket (Udp RcvbufErrors) {} / lost elsewhere {:.0}; in the engine: {:.2} %",
            u.sent,
            sp.handled,
            sp.passed_undelayed,
            u.distinct,
            sp.rcvbuf_errors,
            (u.sent as f64 - u.distinct as f64 - sp.rcvbuf_errors as f64).max(0.0),
            100.0 * sp.passed_undelayed / queued.max(1.0)
        ));
        let (p, p_rcvbuf) = n.plain_udp;
        notes.push(format!(
            "(i') reference, the same 200,000 datagrams over the plain path (no fault): {} delivered in {:.2} s = {:.0} packets/s, {p_rcvbuf} dropped at the sink's socket (what one flat-out sender and sink on this host allow)",
            p.distinct,
            p.seconds,
            p.distinct as f64 / p.seconds.max(1e-9)
        ));
        let t = n.tcp50;
        notes.push(format!(
            "(i'') one TCP flow through 50 ms ingress latency (no jitter), 60 MB: {:.0} Mbit/s; {} segments sent, {} retransmitted, {} DSACKs (spurious resends), {} reorderings seen by the sender; socket-buffer limit min(rmem, wmem)/2 over {:.1} ms RTT: {:.0} Mbit/s, achieved {:.0} % of it (goal >= 80 %)",
            t.bps / 1e6,
            t.segs,
            t.retrans,
            t.dsack,
            t.reorder,
            t.rtt_ms,
            t.bdp_bps / 1e6,
            100.0 * t.bps / t.bdp_bps.max(1.0)
        ));
        let c = n.corrupt;
        notes.push(format!(
            "(j) corrupt 10 % requested (engine, ingress, 10,000 UDP): {:.2} % discarded by the receiver's checksums, {} corrupted datagrams reached the application",
            100.0 * (c.sent - c.distinct) as f64 / c.sent as f64,
            c.bad
        ));
        let d = n.duplicate;
        notes.push(format!(
            "(k) duplicate 10 % requested (engine, egress, 10,000 UDP): {:.2} % delivered twice, {} lost",
            100.0 * d.duplicates as f64 / d.sent as f64,
            d.sent - d.distinct
        ));
        notes.push(format!("(l) ingress bandwidth 8 Mbit/s requested (ifb + htb): {:.2} Mbit/s achieved over TCP", n.ingress_bps / 1e6));
        notes.push(format!(
            "(f) after revert: {}/{} pings answered, ruleset {}",
            n.baseline_after.0,
            n.baseline_after.1,
            if n.ruleset_restored { "identical to before" } else { "DIFFERS from before" }
        ));
        let (med, p99) = median_p99(n.latency_err.clone());
        notes.push(format!(
            "(g) latency 50 ms (NFQUEUE engine, ingress, {} pings -U): mean added {:.2} ms, |error| median {med:.2} ms, p99 {p99:.2} ms (goal <= 1 / <= 3); jitter +/-10 ms: sd {:.2} ms (uniform: 5.77)",
            n.latency_err.len(),
            n.latency_mean,
            n.jitter_sd
        ));
    }
    for n in notes {
        writeln!(out, "{n}")?;
    }
    use std::io::Write as _;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
