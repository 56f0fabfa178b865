//! The local lab: four test hosts as network namespaces on a bridge, one
//! agent per host, a coordinator on the host side, and real Apache Kafka
//! (KRaft) and Apache Cassandra run from their Maven Central jars.
//!
//! ```text
//! host: bridge chaoslab0 198.18.200.1/24, chaos-coordinator on :50061
//!  ├─ lab-kafka      198.18.200.2  agent :50062, Kafka :9092 (controller :9093)
//!  ├─ lab-cassandra  198.18.200.3  agent :50062, Cassandra CQL :9042 (storage :7000)
//!  ├─ lab-processor  198.18.200.4  agent :50062, chaos-processor (Kafka -> Cassandra)
//!  └─ lab-collector  198.18.200.5  agent :50062
//! ```
//!
//! Every channel runs over mTLS: `up` makes a CA and the certificates under
//! `HOME/run/tls` (`ca/`, `coordinator/`, `agent-NAME/`, and `admin/` for
//! the `chaos` CLI's lab verbs; `chaos lab env` prints the exports for the
//! rest). Each agent also serves its break-glass socket at
//! `HOME/run/agent-NAME.sock`.
//!
//! Everything the lab creates lives under `HOME/run` (logs, data, journals,
//! state, certificates) and in the namespaces and bridge above; [`down`] removes all of
//! it (processes found by namespace, not only from the state file) and
//! leaves the jars (`HOME/jars`, fetched by `deploy/lab/fetch.sh`).

use std::{
    fs,
    io::Write,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub const BRIDGE: &str = "chaoslab0";
pub const NET: &str = "198.18.200";
pub const COORDINATOR_PORT: u16 = 50061;
pub const AGENT_PORT: u16 = 50062;
pub const KAFKA_PORT: u16 = 9092;
pub const CQL_PORT: u16 = 9042;

/// One test host.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub name: &'static str,
    pub octet: u8,
}

impl Host {
    pub fn netns(&self) -> String {
        format!("lab-{}", self.name)
    }
    pub fn ip(&self) -> String {
        format!("{NET}.{}", self.octet)
    }
    /// Host-side veth name (at most 15 characters).
    fn veth(&self) -> String {
        format!("clab-{}", &self.name[..self.name.len().min(9)])
    }
    pub fn agent_url(&self) -> String {
        format!("https://{}:{AGENT_PORT}", self.ip())
    }
}

pub const HOSTS: [Host; 4] = [
    Host { name: "kafka", octet: 2 },
    Host { name: "cassandra", octet: 3 },
    Host { name: "processor", octet: 4 },
    Host { name: "collector", octet: 5 },
];

pub fn host(name: &str) -> Option<Host> {
    HOSTS.iter().copied().find(|h| h.name == name)
}

/// The reference pipeline as the lab runs it (the processor's defaults).
pub const TOPIC: &str = "chaos-logs";
pub const GROUP: &str = "chaos-processor";
pub const EVENTS_TABLE: &str = "chaos_lab.events";

pub fn coordinator_url() -> String {
    format!("https://{NET}.1:{COORDINATOR_PORT}")
}

/// The lab admin's certificate name (the CLI's lab verbs use it).
pub const ADMIN_NAME: &str = "lab-admin";

pub fn kafka_bootstrap() -> String {
    format!("{NET}.2:{KAFKA_PORT}")
}

pub fn cassandra_contact() -> String {
    format!("{NET}.3:{CQL_PORT}")
}

/// Where the lab lives and what it runs.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Jars in `home/jars`, everything of a running lab in `home/run`.
    pub home: PathBuf,
    /// Directory of `chaos-agent` and `chaos-coordinator`.
    pub bin_dir: PathBuf,
    pub java: PathBuf,
    pub kafka_heap_mb: u32,
    pub cassandra_heap_mb: u32,
    /// How long `up` waits for every service.
    pub timeout: Duration,
}

impl LabConfig {
    pub fn new(home: PathBuf, bin_dir: PathBuf) -> Self {
        LabConfig {
            home,
            bin_dir,
            java: PathBuf::from("java"),
            kafka_heap_mb: 512,
            cassandra_heap_mb: 1024,
            timeout: Duration::from_secs(240),
        }
    }
    /// Everything of a running lab (removed by [`down`]).
    pub fn run(&self) -> PathBuf {
        self.home.join("run")
    }
    /// Where a collector run by the lab's drills keeps its counts (read by status).
    pub fn collector_status(&self) -> PathBuf {
        self.run().join("collector.json")
    }
    fn jars(&self, server: &str) -> PathBuf {
        self.home.join("jars").join(server)
    }
    fn state_file(&self) -> PathBuf {
        self.run().join("state.json")
    }
    /// The lab's certificates: `ca`, `coordinator`, `agent-NAME`, `admin`
    /// (each a `--tls-dir`: ca.pem, cert.pem, key.pem).
    pub fn tls_dir(&self, who: &str) -> PathBuf {
        self.run().join("tls").join(who)
    }
    /// The directory of the lab admin's certificate (for `chaos --tls-dir`).
    pub fn admin_tls_dir(&self) -> PathBuf {
        self.tls_dir("admin")
    }
    /// A host's break-glass socket (`chaos agent --local --socket PATH`).
    pub fn agent_socket(&self, host: &Host) -> PathBuf {
        self.run().join(format!("agent-{}.sock", host.name))
    }
}

/// A CA and every certificate the lab runs with, valid for 30 days.
fn make_certs(cfg: &LabConfig) -> anyhow::Result<()> {
    use chaos_proto::trust::{
        Identity, Role,
        certs::{Request, init_ca_dir, issue_to_dir},
    };
    let valid = Duration::from_secs(30 * 24 * 3600);
    let ca = cfg.tls_dir("ca");
    init_ca_dir(&ca, "lab", valid)?;
    let issue = |role: Role, name: &str, san: Option<String>, dir: PathBuf| -> anyhow::Result<()> {
        let req = Request::new(Identity::new(role, name)?, san.into_iter().collect(), valid);
        issue_to_dir(&ca, &req, &dir, false).with_context(|| format!("issuing the lab's {role} certificate {name}"))?;
        Ok(())
    };
    issue(Role::Coordinator, "lab-coordinator", Some(format!("{NET}.1")), cfg.tls_dir("coordinator"))?;
    for h in HOSTS {
        issue(Role::Agent, h.name, Some(h.ip()), cfg.tls_dir(&format!("agent-{}", h.name)))?;
    }
    issue(Role::Admin, ADMIN_NAME, None, cfg.admin_tls_dir())?;
    Ok(())
}

/// A process the lab started (pid + start time, so a reused pid is never killed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub start_ticks: u64,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    processes: Vec<Proc>,
}

/// One line of `chaos lab status`.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    pub name: String,
    pub address: String,
    pub up: bool,
    pub detail: String,
}

fn sh(argv: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::null()).output().with_context(|| format!("running {}", argv[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn start_ticks(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].split_whitespace().nth(19)?.parse().ok()
}

fn alive(p: &Proc) -> bool {
    start_ticks(p.pid) == Some(p.start_ticks) && fs::read_to_string(format!("/proc/{}/stat", p.pid)).is_ok_and(|s| !s.contains(") Z "))
}

fn tcp_open(addr: &str) -> bool {
    addr.parse::<SocketAddr>().is_ok_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

fn log_has(p: &Path, needle: &str) -> bool {
    fs::read_to_string(p).is_ok_and(|s| s.contains(needle))
}

fn tail(p: &Path, n: usize) -> String {
    let s = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The pid of a process the lab started (`kafka`, `cassandra`, `processor`,
/// `coordinator`, `agent-HOST`) while it runs.
pub fn pid_of(cfg: &LabConfig, name: &str) -> Option<u32> {
    load_state(cfg).processes.into_iter().find(|p| p.name == name && alive(p)).map(|p| p.pid)
}

/// Check what `up` needs, naming what is missing and how to get it.
pub fn preflight(cfg: &LabConfig) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (it creates network namespaces and a bridge): run it with sudo");
    }
    for tool in ["ip", "nsenter"] {
        if sh(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
            bail!("`{tool}` not found: apt-get install iproute2 util-linux");
        }
    }
    if Command::new(&cfg.java).arg("-version").stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
        bail!("`{}` not found or not working: install a JDK 17 (apt-get install openjdk-17-jdk-headless)", cfg.java.display());
    }
    for server in ["kafka", "cassandra"] {
        let dir = cfg.jars(server);
        let n = fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "jar")).count())
            .unwrap_or(0);
        if n == 0 {
            bail!(
                "no {server} jars in {}: run `CHAOS_LAB_HOME={} bash deploy/lab/fetch.sh` (Maven Central)",
                dir.display(),
                cfg.home.display()
            );
        }
    }
    for bin in ["chaos-agent", "chaos-coordinator", "chaos-processor"] {
        if !cfg.bin_dir.join(bin).exists() {
            bail!("{bin} not found in {} (build with cargo build --release --workspace --bins, or pass --bin-dir)", cfg.bin_dir.display());
        }
    }
    Ok(())
}

fn save_state(cfg: &LabConfig, st: &State) -> anyhow::Result<()> {
    let tmp = cfg.run().join("state.json.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(st)?.as_bytes())?;
    f.sync_all()?;
    fs::rename(tmp, cfg.state_file())?;
    Ok(())
}

fn load_state(cfg: &LabConfig) -> State {
    fs::read_to_string(cfg.state_file()).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

/// Start `argv` (in `netns` unless None) detached, its output in `log`.
/// Our daemons log at info whatever the caller's RUST_LOG (the CLI's own
/// level must not leak into them: status reads their readiness lines).
fn spawn(name: &str, netns: Option<&str>, argv: &[String], log: &Path) -> anyhow::Result<Proc> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = match netns {
        // nsenter, not `ip netns exec`: the latter remounts /sys for the
        // namespace, which hides /sys/fs/cgroup from the agent (no resource
        // faults) and from everything else started there.
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").args(argv);
            c
        }
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    cmd.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let pid = child.id();
    // nsenter execs the program: same pid. Wait for the exec to show.
    let mut ticks = start_ticks(pid);
    for _ in 0..50 {
        if ticks.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        ticks = start_ticks(pid);
    }
    Ok(Proc { name: name.into(), pid, start_ticks: ticks.unwrap_or(0), log: log.to_path_buf() })
}

fn network_up(progress: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    progress(&format!("network: bridge {BRIDGE} {NET}.1/24 and {} namespaces", HOSTS.len()));
    if !link_exists(BRIDGE) {
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    }
    sh(&["ip", "addr", "replace", &format!("{NET}.1/24"), "dev", BRIDGE])?;
    sh(&["ip", "link", "set", BRIDGE, "up"])?;
    for h in HOSTS {
        let ns = h.netns();
        if !netns_exists(&ns) {
            sh(&["ip", "netns", "add", &ns])?;
        }
        if !link_exists(&h.veth()) {
            sh(&["ip", "link", "add", &h.veth(), "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        }
        sh(&["ip", "link", "set", &h.veth(), "master", BRIDGE, "up"])?;
        sh(&["ip", "-n", &ns, "addr", "replace", &format!("{}/24", h.ip()), "dev", "eth0"])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Kafka's KRaft cluster id: 16 random bytes, base64url without padding.
fn cluster_id() -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

const CASSANDRA_JVM17: &[&str] = &[
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.math=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
];

fn start_kafka(cfg: &LabConfig) -> anyhow::Result<Proc> {
    let dir = cfg.run().join("kafka");
    fs::create_dir_all(dir.join("data"))?;
    let ip = HOSTS[0].ip();
    let props = dir.join("server.properties");
    fs::write(
        &props,
        format!(
            "process.roles=broker,controller\nnode.id=1\ncontroller.quorum.bootstrap.servers={ip}:9093\n\
             listeners=PLAINTEXT://{ip}:{KAFKA_PORT},CONTROLLER://{ip}:9093\nadvertised.listeners=PLAINTEXT://{ip}:{KAFKA_PORT}\n\
             controller.listener.names=CONTROLLER\nlistener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={}\nnum.partitions=3\noffsets.topic.replication.factor=1\ntransaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\ngroup.initial.rebalance.delay.ms=0\nauto.create.topics.enable=true\n",
            dir.join("data").display()
        ),
    )?;
    let log4j = dir.join("log4j.properties");
    fs::write(
        &log4j,
        "log4j.rootLogger=INFO, stdout\nlog4j.appender.stdout=org.apache.log4j.ConsoleAppender\n\
         log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\nlog4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n",
    )?;
    let cp = format!("{}/*", cfg.jars("kafka").display());
    let java = cfg.java.display().to_string();
    let fmt = Command::new(&java)
        .args(["-cp", &cp, "kafka.tools.StorageTool", "format", "-t", &cluster_id(), "-c"])
        .arg(&props)
        .arg("--standalone")
        .output()
        .context("formatting Kafka's storage")?;
    if !fmt.status.success() {
        bail!("Kafka storage format failed: {}", String::from_utf8_lossy(&fmt.stdout) + String::from_utf8_lossy(&fmt.stderr));
    }
    let heap = cfg.kafka_heap_mb;
    let argv: Vec<String> = [
        java,
        format!("-Xms{heap}m"),
        format!("-Xmx{heap}m"),
        "-XX:+UseG1GC".into(),
        format!("-Dlog4j.configuration=file:{}", log4j.display()),
        "-cp".into(),
        cp,
        "kafka.Kafka".into(),
        props.display().to_string(),
    ]
    .into();
    spawn("kafka", Some(&HOSTS[0].netns()), &argv, &cfg.run().join("logs/kafka.log"))
}

fn start_cassandra(cfg: &LabConfig) -> anyhow::Result<Proc> {
    let dir = cfg.run().join("cassandra");
    fs::create_dir_all(&dir)?;
    let ip = HOSTS[1].ip();
    let d = |s: &str| dir.join(s).display().to_string();
    let yaml = dir.join("cassandra.yaml");
    fs::write(
        &yaml,
        format!(
            "cluster_name: chaos-lab\nnum_tokens: 16\npartitioner: org.apache.cassandra.dht.Murmur3Partitioner\n\
             data_file_directories: [{}]\ncommitlog_directory: {}\nsaved_caches_directory: {}\nhints_directory: {}\n\
             cdc_raw_directory: {}\ncommitlog_sync: periodic\ncommitlog_sync_period: 10000ms\n\
             seed_provider:\n  - class_name: org.apache.cassandra.locator.SimpleSeedProvider\n    parameters:\n      - seeds: \"{ip}:7000\"\n\
             listen_address: {ip}\nstorage_port: 7000\nrpc_address: {ip}\nnative_transport_port: {CQL_PORT}\n\
             endpoint_snitch: SimpleSnitch\nstart_native_transport: true\n",
            d("data"),
            d("commitlog"),
            d("saved_caches"),
            d("hints"),
            d("cdc_raw")
        ),
    )?;
    let logback = dir.join("logback.xml");
    fs::write(
        &logback,
        "<configuration><appender name=\"OUT\" class=\"ch.qos.logback.core.ConsoleAppender\"><encoder>\
         <pattern>%date %level [%thread] %logger{20} %msg%n</pattern></encoder></appender>\
         <root level=\"INFO\"><appender-ref ref=\"OUT\"/></root></configuration>\n",
    )?;
    let jars = cfg.jars("cassandra");
    let jamm = fs::read_dir(&jars)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("jamm-")))
        .context("no jamm jar among Cassandra's jars (needed as -javaagent)")?;
    let heap = cfg.cassandra_heap_mb;
    let mut argv: Vec<String> =
        vec![cfg.java.display().to_string(), format!("-Xms{heap}m"), format!("-Xmx{heap}m"), "-XX:+UseG1GC".into(), "-Xss256k".into()];
    argv.extend(CASSANDRA_JVM17.iter().map(|s| s.to_string()));
    argv.extend([
        format!("-javaagent:{}", jamm.display()),
        format!("-Dcassandra.config=file://{}", yaml.display()),
        "-Dcassandra-foreground=yes".into(),
        format!("-Dcassandra.storagedir={}", dir.display()),
        format!("-Dlogback.configurationFile=file://{}", logback.display()),
        "-cp".into(),
        format!("{}/*", jars.display()),
        "org.apache.cassandra.service.CassandraDaemon".into(),
    ]);
    spawn("cassandra", Some(&HOSTS[1].netns()), &argv, &cfg.run().join("logs/cassandra.log"))
}

/// Bring the lab up (idempotent: a lab already up is left as it is).
pub fn up(cfg: &LabConfig, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Vec<Component>> {
    preflight(cfg)?;
    let st = load_state(cfg);
    if !st.processes.is_empty() && st.processes.iter().all(alive) {
        let comps = status(cfg);
        if comps.iter().all(|c| c.up) {
            progress("the lab is already up");
            return Ok(comps);
        }
    }
    if cfg.run().exists() || HOSTS.iter().any(|h| netns_exists(&h.netns())) || link_exists(BRIDGE) {
        progress("a partial lab is in place: taking it down first");
        down(cfg, progress)?;
    }
    match up_inner(cfg, progress) {
        Ok(c) => Ok(c),
        Err(e) => {
            progress(&format!("lab up failed ({e:#}); removing what was created"));
            if let Err(d) = down(cfg, progress) {
                progress(&format!("cleanup after the failure also failed: {d:#}"));
            }
            Err(e)
        }
    }
}

fn up_inner(cfg: &LabConfig, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Vec<Component>> {
    let run = cfg.run();
    fs::create_dir_all(run.join("logs"))?;
    let mut st = State::default();
    save_state(cfg, &st)?;
    progress(&format!("CA and certificates in {}", run.join("tls").display()));
    make_certs(cfg)?;
    network_up(progress)?;

    progress(&format!("coordinator on {}", coordinator_url()));
    let ccfg = run.join("coordinator.yaml");
    // One host is a quarter of the lab: drills may stop every host but the
    // collector at once (the full stop), and the whole group a role selects
    // (each role is one host here).
    // Probes: the pipeline's three counts (produced by the collector, in
    // Kafka, in Cassandra) and the consumer lag flow in the metric stream.
    fs::write(
        &ccfg,
        format!(
            "chaos_testing:\n  default_duration: 60\n  safety_timeout: 600\n  blast_radius_limit: 0.75\n  group_blast_radius_limit: 1.0\n\
             monitoring:\n  metrics_interval: 1s\n  probes:\n\
             \x20   - {{name: kafka, kind: kafka, bootstrap: '{}', topic: {TOPIC}, group: {GROUP}, timeout: 1s}}\n\
             \x20   - {{name: cassandra, kind: cassandra, contact: '{}', count_table: {EVENTS_TABLE}, probe_table: chaos_lab.chaos_probe, interval: 2s, timeout: 2s}}\n\
             \x20   - {{name: collector, kind: file, path: '{}'}}\n",
            kafka_bootstrap(),
            cassandra_contact(),
            cfg.collector_status().display()
        ),
    )?;
    let coord = [
        cfg.bin_dir.join("chaos-coordinator").display().to_string(),
        "--listen".into(),
        format!("{NET}.1:{COORDINATOR_PORT}"),
        "--state-dir".into(),
        run.join("coordinator-state").display().to_string(),
        "--config".into(),
        ccfg.display().to_string(),
        "--heartbeat-interval".into(),
        "1s".into(),
        "--tls-dir".into(),
        cfg.tls_dir("coordinator").display().to_string(),
    ];
    st.processes.push(spawn("coordinator", None, &coord, &run.join("logs/coordinator.log"))?);
    save_state(cfg, &st)?;
    for h in HOSTS {
        let agent = [
            cfg.bin_dir.join("chaos-agent").display().to_string(),
            "--listen".into(),
            format!("{}:{AGENT_PORT}", h.ip()),
            "--coordinator".into(),
            coordinator_url(),
            "--agent-id".into(),
            h.name.into(),
            "--label".into(),
            format!("role={}", h.name),
            "--label".into(),
            "lab=true".into(),
            "--journal-dir".into(),
            run.join(format!("journal-{}", h.name)).display().to_string(),
            "--lease".into(),
            "10s".into(),
            "--tls-dir".into(),
            cfg.tls_dir(&format!("agent-{}", h.name)).display().to_string(),
            "--local-socket".into(),
            cfg.agent_socket(&h).display().to_string(),
        ];
        st.processes.push(spawn(&format!("agent-{}", h.name), Some(&h.netns()), &agent, &run.join(format!("logs/agent-{}.log", h.name)))?);
        save_state(cfg, &st)?;
    }
    progress(&format!("Kafka 4 (KRaft) in {} at {}", HOSTS[0].netns(), kafka_bootstrap()));
    st.processes.push(start_kafka(cfg)?);
    save_state(cfg, &st)?;
    progress(&format!("Cassandra 5 in {} at {}", HOSTS[1].netns(), cassandra_contact()));
    st.processes.push(start_cassandra(cfg)?);
    save_state(cfg, &st)?;
    // The reference processor (Kafka -> Cassandra) waits for both by itself.
    progress(&format!("processor (consumer group chaos-processor) in {}", HOSTS[2].netns()));
    let processor = [
        cfg.bin_dir.join("chaos-processor").display().to_string(),
        "--bootstrap".into(),
        kafka_bootstrap(),
        "--cassandra".into(),
        cassandra_contact(),
    ];
    st.processes.push(spawn("processor", Some(&HOSTS[2].netns()), &processor, &run.join("logs/processor.log"))?);
    save_state(cfg, &st)?;

    let started = Instant::now();
    let mut last = Instant::now() - Duration::from_secs(10);
    loop {
        let comps = status(cfg);
        if comps.iter().all(|c| c.up) {
            progress(&format!("lab up in {:.0} s", started.elapsed().as_secs_f64()));
            return Ok(comps);
        }
        for p in &st.processes {
            if !alive(p) {
                bail!("{} exited during start; last lines of {}:\n{}", p.name, p.log.display(), tail(&p.log, 15));
            }
        }
        if started.elapsed() > cfg.timeout {
            let waiting: Vec<String> = comps.iter().filter(|c| !c.up).map(|c| format!("{} ({})", c.name, c.detail)).collect();
            let logs: Vec<String> = st
                .processes
                .iter()
                .filter(|p| comps.iter().any(|c| !c.up && c.name == p.name))
                .map(|p| format!("last lines of {}:\n{}", p.log.display(), tail(&p.log, 10)))
                .collect();
            bail!("not up after {}: {}\n{}", humantime::format_duration(cfg.timeout), waiting.join(", "), logs.join("\n"));
        }
        if last.elapsed() >= Duration::from_secs(5) {
            let waiting: Vec<String> = comps.iter().filter(|c| !c.up).map(|c| c.name.clone()).collect();
            progress(&format!("waiting for {} ({:.0} s)", waiting.join(", "), started.elapsed().as_secs_f64()));
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Health of every component, checked from the host side.
pub fn status(cfg: &LabConfig) -> Vec<Component> {
    let st = load_state(cfg);
    let proc_up = |name: &str| st.processes.iter().find(|p| p.name == name).is_some_and(alive);
    // A service is up when its process runs and `ready` (log line, port) holds.
    let service = |name: &str, address: String, ready: &dyn Fn() -> bool, up_text: &str, starting_text: &str| {
        let running = proc_up(name);
        let up = running && ready();
        let detail = if up {
            up_text
        } else if running {
            starting_text
        } else {
            "down"
        };
        Component { name: name.into(), address, up, detail: detail.into() }
    };
    let log = |n: &str| cfg.run().join(format!("logs/{n}.log"));
    let caddr = format!("{NET}.1:{COORDINATOR_PORT}");
    let mut out = vec![service("coordinator", caddr.clone(), &|| tcp_open(&caddr), "serving", "down")];
    for h in HOSTS {
        let addr = format!("{}:{AGENT_PORT}", h.ip());
        let ns = netns_exists(&h.netns());
        let up = ns && proc_up(&format!("agent-{}", h.name)) && tcp_open(&addr);
        let detail = if !ns {
            format!("no namespace {}", h.netns())
        } else if up {
            format!("agent serving in {}", h.netns())
        } else {
            "agent down".into()
        };
        out.push(Component { name: format!("agent-{}", h.name), address: addr, up, detail });
    }
    out.push(service(
        "kafka",
        kafka_bootstrap(),
        &|| log_has(&log("kafka"), "Kafka Server started") && tcp_open(&kafka_bootstrap()),
        "broker + controller (KRaft) serving",
        "starting",
    ));
    out.push(service(
        "cassandra",
        cassandra_contact(),
        &|| log_has(&log("cassandra"), "Startup complete") && tcp_open(&cassandra_contact()),
        "CQL serving",
        "starting",
    ));
    out.push(service(
        "processor",
        HOSTS[2].ip(),
        &|| log_has(&log("processor"), "processing"),
        "consuming chaos-logs into Cassandra",
        "waiting for Kafka and Cassandra",
    ));
    out
}

fn kill_and_wait(pids: &[u32], sig: nix::sys::signal::Signal, within: Duration) -> Vec<u32> {
    for p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), sig);
    }
    let deadline = Instant::now() + within;
    loop {
        // A zombie is gone for our purpose (our own children stay zombies
        // until this process exits or reaps them: reap what we can).
        let left: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*p as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
                fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| !s.contains(") Z "))
            })
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Take everything down: processes (SIGTERM, then SIGKILL), namespaces,
/// bridge, `HOME/run`. Works from a missing or stale state file too.
pub fn down(cfg: &LabConfig, progress: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root to remove its namespaces and bridge: run it with sudo");
    }
    let st = load_state(cfg);
    // Every process inside a lab namespace, plus ours on the host side.
    let mut pids: Vec<u32> = st.processes.iter().filter(|p| alive(p)).map(|p| p.pid).collect();
    for h in HOSTS {
        if netns_exists(&h.netns())
            && let Ok(out) = sh(&["ip", "netns", "pids", &h.netns()])
        {
            pids.extend(out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    if !pids.is_empty() {
        progress(&format!("stopping {} process(es) (agents revert their faults on SIGTERM)", pids.len()));
        let left = kill_and_wait(&pids, nix::sys::signal::Signal::SIGTERM, Duration::from_secs(20));
        if !left.is_empty() {
            let names: Vec<String> = left
                .iter()
                .map(|pid| {
                    st.processes.iter().find(|p| p.pid == *pid).map(|p| format!("{} ({pid})", p.name)).unwrap_or_else(|| pid.to_string())
                })
                .collect();
            progress(&format!("still running after 20 s, SIGKILL (the lab's data is removed anyway): {}", names.join(", ")));
            let left = kill_and_wait(&left, nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5));
            if !left.is_empty() {
                bail!("processes {left:?} survived SIGKILL");
            }
        }
    }
    for h in HOSTS {
        if link_exists(&h.veth()) {
            sh(&["ip", "link", "del", &h.veth()])?;
        }
        if netns_exists(&h.netns()) {
            sh(&["ip", "netns", "del", &h.netns()])?;
        }
    }
    if link_exists(BRIDGE) {
        sh(&["ip", "link", "del", BRIDGE])?;
    }
    if cfg.run().exists() {
        fs::remove_dir_all(cfg.run()).with_context(|| format!("removing {}", cfg.run().display()))?;
    }
    progress("lab down: no namespace, bridge, process or run directory left");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_addresses_stay_in_the_benchmark_range() {
        for h in HOSTS {
            assert!(h.veth().len() <= 15, "{}", h.veth());
            assert!(h.ip().starts_with("198.18."), "{}", h.ip());
        }
        assert_eq!(host("kafka").map(|h| h.ip()), Some("198.18.200.2".to_string()));
    }

    #[test]
    fn cluster_id_is_22_base64url_chars() {
        let id = cluster_id();
        assert_eq!(id.len(), 22, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{id}");
    }
}
