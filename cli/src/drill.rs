//! `chaos lab drill NAME`: the seeds' failure drills against the lab's real
//! pipeline. Each drill puts the pipeline under load, injects its faults
//! through coordinator scenarios (so every safety rule applies), samples
//! `producer_count` / `kafka_count` / `cassandra_count` every second,
//! asserts the behaviour the drill expects while the fault holds, then
//! validates recovery (`ValidateRecovery`: availability, lag drain,
//! consistency, performance against the baseline) and, once the load has
//! stopped, checks the whole run's data once more.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use chaos_lab::{EVENTS_TABLE, GROUP, LabConfig, TOPIC};
use chaos_probes::{cassandra, kafka, latency};
use chaos_proto::{
    convert::{duration_to_pb, timestamp_from_pb},
    pb::{self, fault_spec::Fault as F, target::Kind},
};
use scylla::client::session::Session;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    conn::request,
    fleet::client,
    output::{CliError, Format, emit, emit_json, exit, table},
    scenario::state_name,
    validate::{report_json, validate, verdict_name},
};

/// The pipeline's counts; -1 when the source is unavailable.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Counts {
    /// Events the collector produced (sent or buffered).
    pub producer_count: i64,
    /// Events Kafka acknowledged to the collector.
    pub acked_count: i64,
    /// Messages in the topic.
    pub kafka_count: i64,
    /// Rows in chaos_lab.events.
    pub cassandra_count: i64,
}

/// Reads the counts, each bounded so a dead service reads -1 at once. Keeps
/// its Kafka client and CQL session between reads (a sampler reads every
/// second); a session that failed is dropped and made again next time.
pub struct Counter {
    status_file: PathBuf,
    kafka: Option<kafka::Probe>,
    cassandra: Option<Session>,
}

const COUNT_WITHIN: Duration = Duration::from_secs(1);

impl Counter {
    pub fn new(cfg: &LabConfig) -> Counter {
        let kafka = kafka::Probe::new(&chaos_lab::kafka_bootstrap(), None, COUNT_WITHIN)
            .inspect_err(|e| tracing::debug!(error = %format!("{e:#}"), "no Kafka client"))
            .ok();
        Counter { status_file: cfg.collector_status(), kafka, cassandra: None }
    }

    pub async fn read(&mut self) -> Counts {
        let status: Option<Value> = std::fs::read_to_string(&self.status_file).ok().and_then(|s| serde_json::from_str(&s).ok());
        let field = |k: &str| status.as_ref().and_then(|v| v[k].as_i64()).unwrap_or(-1);
        let kafka = self.kafka.clone();
        let session = self.cassandra.take();
        let (k, c) = tokio::join!(
            async {
                match kafka {
                    Some(p) => chaos_probes::bounded("Kafka offsets", COUNT_WITHIN * 2, p.lag(TOPIC)).await.map(|l| l.messages),
                    None => Err(anyhow::anyhow!("no Kafka client")),
                }
            },
            chaos_probes::bounded("CQL count", COUNT_WITHIN, async {
                let s = match session {
                    Some(s) => s,
                    None => cassandra::connect(&chaos_lab::cassandra_contact()).await?,
                };
                let n = cassandra::count(&s, EVENTS_TABLE).await?;
                Ok((s, n))
            })
        );
        if let Err(e) = &k {
            tracing::debug!(error = %format!("{e:#}"), "kafka_count unavailable");
        }
        let cassandra_count = match c {
            Ok((s, n)) => {
                self.cassandra = Some(s);
                n
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "cassandra_count unavailable");
                -1
            }
        };
        Counts {
            producer_count: field("produced"),
            acked_count: field("acked"),
            kafka_count: k.ok().and_then(|n| i64::try_from(n).ok()).unwrap_or(-1),
            cassandra_count,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DrillName {
    /// Partition the processor from Cassandra: writes stall, events wait in Kafka.
    Partition,
    /// Pause Kafka: the collector buffers, kafka_count stalls, then catches up.
    KafkaDown,
    /// Pause the processor: Kafka grows, Cassandra stays still, the lag drains after.
    ProcessorDown,
    /// Pause Cassandra: data waits in Kafka.
    CassandraDown,
    /// Pause Kafka, Cassandra and the processor together, then resume them.
    FullStop,
    /// Cassandra fails, then Kafka fails while Cassandra is still down.
    Cascading,
    /// 200 ms latency on traffic reaching Kafka (port 9092): slower, but nothing stops.
    KafkaLatency,
    /// Every drill above, one after the other.
    All,
}

const ALL: [DrillName; 7] = [
    DrillName::Partition,
    DrillName::KafkaDown,
    DrillName::ProcessorDown,
    DrillName::CassandraDown,
    DrillName::FullStop,
    DrillName::Cascading,
    DrillName::KafkaLatency,
];

impl DrillName {
    fn slug(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    #[arg(value_enum)]
    drill: DrillName,
    /// Load: events per second from the collector host.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=5000))]
    rate: u32,
    /// How long each fault holds (at least 6 s).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    fault_duration: Duration,
    /// Baseline and after-recovery window of the performance check.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// The lab's directory.
    #[arg(long, env = "CHAOS_LAB_HOME", default_value = "/var/lib/chaos-lab")]
    home: PathBuf,
    /// Where chaos-collector is [default: next to this chaos binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

impl DrillArgs {
    pub fn home(&self) -> &std::path::Path {
        &self.home
    }
}

/// What a drill expects of one series while a fault holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Rises by at least a quarter of the load.
    Grows(Series),
    /// Flat within about one second of load, or unavailable (-1).
    Stalls(Series),
    /// Produced minus acknowledged rises: the collector buffers.
    Buffers,
    /// Produced → stored latency (p50) at least this much above the baseline.
    SlowerBy(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Series {
    Acked,
    Kafka,
    Cassandra,
}

impl Series {
    fn name(self) -> &'static str {
        match self {
            Series::Acked => "acked_count",
            Series::Kafka => "kafka_count",
            Series::Cassandra => "cassandra_count",
        }
    }
    fn of(self, c: &Counts) -> i64 {
        match self {
            Series::Acked => c.acked_count,
            Series::Kafka => c.kafka_count,
            Series::Cassandra => c.cassandra_count,
        }
    }
}

/// One fault of a drill: on which lab host, what, when (after the first), for how long.
struct Injection {
    what: String,
    agent: &'static str,
    fault: F,
    target: Kind,
    offset: Duration,
    duration: Duration,
    /// Expectations while this fault holds (from its start + settle to its end).
    expect: Vec<Expect>,
}

/// Time the faults need to bite (in-flight requests finish, buffers fill);
/// at most a third of the fault's duration.
const SETTLE: Duration = Duration::from_secs(3);

fn pid(cfg: &LabConfig, name: &str) -> Result<u32, CliError> {
    chaos_lab::pid_of(cfg, name).ok_or_else(|| CliError::new(exit::FAILURE, format!("the lab's {name} is not running: chaos lab status")))
}

fn pause(cfg: &LabConfig, service: &'static str, offset: Duration, duration: Duration, expect: Vec<Expect>) -> Result<Injection, CliError> {
    let p = pid(cfg, service)?;
    Ok(Injection {
        what: format!("pause {service} (SIGSTOP pid {p}, SIGCONT at revert)"),
        agent: service,
        fault: F::ProcessPause(pb::ProcessPause {}),
        target: Kind::Pid(p),
        offset,
        duration,
        expect,
    })
}

fn plan(cfg: &LabConfig, d: DrillName, f: Duration) -> Result<(String, Vec<Injection>), CliError> {
    use Expect::*;
    use Series::*;
    let z = Duration::ZERO;
    Ok(match d {
        DrillName::Partition => (
            "the processor's writes stall and events wait in Kafka; the lag drains after the revert".into(),
            vec![Injection {
                what: format!(
                    "partition processor <-> cassandra ({}/32)",
                    chaos_lab::host("cassandra").map(|h| h.ip()).unwrap_or_default()
                ),
                agent: "processor",
                fault: F::NetworkPartition(pb::NetworkPartition {
                    scope: Some(pb::NetworkScope {
                        peer_cidrs: vec![format!("{}/32", chaos_lab::host("cassandra").map(|h| h.ip()).unwrap_or_default())],
                        ..Default::default()
                    }),
                }),
                target: Kind::Netns("lab-processor".into()),
                offset: z,
                duration: f,
                expect: vec![Grows(Kafka), Stalls(Cassandra)],
            }],
        ),
        DrillName::KafkaDown => (
            "the collector buffers, kafka_count stalls, then everything catches up".into(),
            vec![pause(cfg, "kafka", z, f, vec![Stalls(Acked), Buffers, Stalls(Kafka)])?],
        ),
        DrillName::ProcessorDown => (
            "Kafka grows while Cassandra stays still; the lag drains after".into(),
            vec![pause(cfg, "processor", z, f, vec![Grows(Kafka), Stalls(Cassandra)])?],
        ),
        DrillName::CassandraDown => (
            "data waits in Kafka while Cassandra is down".into(),
            vec![pause(cfg, "cassandra", z, f, vec![Grows(Kafka), Stalls(Cassandra)])?],
        ),
        DrillName::FullStop => (
            "everything stops (the collector buffers), then resumes without losing an event".into(),
            vec![
                pause(cfg, "kafka", z, f, vec![Stalls(Acked), Buffers, Stalls(Kafka), Stalls(Cassandra)])?,
                pause(cfg, "cassandra", z, f, vec![])?,
                pause(cfg, "processor", z, f, vec![])?,
            ],
        ),
        DrillName::Cascading => {
            let half = f / 2;
            (
                "Cassandra fails (data waits in Kafka), then Kafka fails too (the collector buffers); both recover".into(),
                vec![
                    pause(cfg, "cassandra", z, f, vec![Stalls(Cassandra)])?,
                    pause(cfg, "kafka", half, f - half, vec![Stalls(Acked), Buffers, Stalls(Kafka)])?,
                ],
            )
        }
        DrillName::KafkaLatency => (
            "events keep flowing, each at least 150 ms later; latency returns to the baseline after".into(),
            vec![Injection {
                what: "200 ms latency on traffic reaching Kafka (port 9092, ingress)".into(),
                agent: "kafka",
                fault: F::NetworkLatency(pb::NetworkLatency {
                    scope: Some(pb::NetworkScope { ports: vec![9092], direction: pb::Direction::Ingress as i32, ..Default::default() }),
                    delay: Some(duration_to_pb(Duration::from_millis(200))),
                    ..Default::default()
                }),
                target: Kind::Netns("lab-kafka".into()),
                offset: z,
                duration: f,
                expect: vec![Grows(Kafka), Grows(Cassandra), SlowerBy(Duration::from_millis(150))],
            }],
        ),
        DrillName::All => return Err(CliError::new(exit::USAGE, "`all` is not one drill")),
    })
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Seconds since the drill started.
    t_s: f64,
    at_ms: i64,
    #[serde(flatten)]
    counts: Counts,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Did `e` hold over the samples in `[from_ms, to_ms]`? With the numbers.
fn evaluate(e: Expect, samples: &[Sample], from_ms: i64, to_ms: i64, rate: u32) -> (bool, String) {
    let s: Vec<&Sample> = samples.iter().filter(|x| x.at_ms >= from_ms && x.at_ms <= to_ms).collect();
    let secs = (to_ms - from_ms).max(0) as f64 / 1000.0;
    if s.len() < 2 {
        return (false, format!("{} sample(s) while the fault held: too few to judge", s.len()));
    }
    let show = |v: i64| if v < 0 { "unavailable".to_string() } else { v.to_string() };
    match e {
        Expect::Grows(series) => {
            let v: Vec<i64> = s.iter().map(|x| series.of(&x.counts)).collect();
            let need = (f64::from(rate) * secs * 0.25) as i64;
            let (first, last) = (v[0], v[v.len() - 1]);
            let held = v.iter().all(|x| *x >= 0) && last - first >= need;
            (held, format!("{} grew {} -> {} (+{}, expected at least +{need})", series.name(), show(first), show(last), last - first))
        }
        Expect::Stalls(series) => {
            let v: Vec<i64> = s.iter().map(|x| series.of(&x.counts)).filter(|x| *x >= 0).collect();
            let unavailable = s.len() - v.len();
            let tolerance = i64::from(rate).max(10);
            let spread = match (v.iter().min(), v.iter().max()) {
                (Some(a), Some(b)) => b - a,
                _ => 0,
            };
            let text = if v.is_empty() {
                format!("{} unavailable in all {} samples", series.name(), s.len())
            } else {
                format!(
                    "{} moved by {spread} (tolerance {tolerance}) over {} readable samples, unavailable in {unavailable}",
                    series.name(),
                    v.len()
                )
            };
            (spread <= tolerance, text)
        }
        Expect::Buffers => {
            let gap = |x: &Sample| x.counts.producer_count - x.counts.acked_count;
            let (first, last) = (gap(s[0]), gap(s[s.len() - 1]));
            let need = (f64::from(rate) * secs * 0.25) as i64;
            let held = s.iter().all(|x| x.counts.producer_count >= 0 && x.counts.acked_count >= 0) && last - first >= need;
            (held, format!("events waiting in the collector {first} -> {last} (expected at least +{need})"))
        }
        // Judged from the stored rows, not from counts (see `latency_shift`).
        Expect::SlowerBy(_) => (false, "not judged from counts".into()),
    }
}

/// p50 produced → stored latency during the fault against the baseline window.
async fn latency_shift(window: Duration, fault_start_ms: i64, from_ms: i64, to_ms: i64, by: Duration) -> (bool, String) {
    let times = chaos_probes::bounded("reading event times", Duration::from_secs(30), async {
        let s = cassandra::connect(&chaos_lab::cassandra_contact()).await?;
        cassandra::event_times(&s, EVENTS_TABLE).await
    })
    .await;
    match times {
        Err(e) => (false, format!("cannot read event times: {e:#}")),
        Ok(t) => {
            let base = latency::window(&t, fault_start_ms - window.as_millis() as i64, fault_start_ms);
            let during = latency::window(&t, from_ms, to_ms);
            let need = base.p50_ms + by.as_millis() as f64;
            (
                during.events > 0 && during.p50_ms >= need,
                format!(
                    "p50 latency {:.0} ms during the fault ({} events) vs {:.0} ms before (expected at least {need:.0} ms)",
                    during.p50_ms, during.events, base.p50_ms
                ),
            )
        }
    }
}

/// The collector in the lab's collector host; SIGTERMed and waited for on drop.
struct Collector {
    child: Option<Child>,
    out: PathBuf,
}

impl Collector {
    fn start(cfg: &LabConfig, bin_dir: &Path, dir: &Path, run_id: &str, rate: u32) -> Result<Collector, CliError> {
        let _ = std::fs::remove_file(cfg.collector_status());
        let out = dir.join("collector.json");
        let file =
            |p: PathBuf| std::fs::File::create(&p).map_err(|e| CliError::new(exit::FAILURE, format!("creating {}: {e}", p.display())));
        // Bounded: at most an hour of load; the drill stops it long before.
        let count = (u64::from(rate) * 3600).min(10_000_000);
        let child = Command::new("ip")
            .args(["netns", "exec", "lab-collector"])
            .arg(bin_dir.join("chaos-collector"))
            .args(["--rate", &rate.to_string(), "--count", &count.to_string(), "--size-bytes", "512", "--run-id", run_id])
            .arg("--bootstrap")
            .arg(chaos_lab::kafka_bootstrap())
            .arg("--acks-file")
            .arg(dir.join("acks"))
            .arg("--status-file")
            .arg(cfg.collector_status())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file(out.clone())?)
            .stderr(file(dir.join("collector.log"))?)
            .spawn()
            .map_err(|e| CliError::new(exit::FAILURE, format!("starting chaos-collector: {e}")))?;
        Ok(Collector { child: Some(child), out })
    }

    /// Stop producing, wait for the outstanding acknowledgements; the summary.
    fn finish(&mut self) -> Value {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
        std::fs::read_to_string(&self.out).ok().and_then(|s| serde_json::from_str(s.trim()).ok()).unwrap_or(Value::Null)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.finish();
    }
}

fn progress(line: &str) {
    eprintln!("drill: {line}");
}

struct Started {
    id: String,
    what: String,
    agent: &'static str,
    start_ms: i64,
    end_ms: i64,
    state: String,
    expect: Vec<Expect>,
}

async fn run_one(cfg: &LabConfig, bin_dir: &Path, d: DrillName, a: &DrillArgs) -> Result<Value, CliError> {
    let coordinator = chaos_lab::coordinator_url();
    let down: Vec<String> = chaos_lab::status(cfg).into_iter().filter(|c| !c.up).map(|c| format!("{} ({})", c.name, c.detail)).collect();
    if !down.is_empty() {
        return Err(CliError::new(exit::FAILURE, format!("the lab is not up: {}; run `chaos lab up`", down.join(", "))));
    }
    let (expected, injections) = plan(cfg, d, a.fault_duration)?;
    let slug = d.slug();
    let run_id = format!("{slug}-{}", now_ms());
    let dir = cfg.run().join("drills").join(&run_id);
    std::fs::create_dir_all(&dir).map_err(|e| CliError::new(exit::FAILURE, format!("creating {}: {e}", dir.display())))?;
    progress(&format!("{slug}: expecting that {expected}"));
    let started = Instant::now();
    let mut collector = Collector::start(cfg, bin_dir, &dir, &run_id, a.rate)?;
    let mut samples: Vec<Sample> = Vec::new();
    let mut counter = Counter::new(cfg);
    let mut sample = async |samples: &mut Vec<Sample>| {
        let c = counter.read().await;
        let s = Sample { t_s: started.elapsed().as_secs_f64(), at_ms: now_ms(), counts: c };
        progress(&format!(
            "t={:>4.0}s produced {} acked {} kafka {} cassandra {}",
            s.t_s, c.producer_count, c.acked_count, c.kafka_count, c.cassandra_count
        ));
        samples.push(s);
    };
    // The baseline: one performance window of steady flow before the first
    // fault (Cassandra within half a second of load behind Kafka), so a
    // pipeline still catching up does not pass for the baseline.
    let steady_for = a.window + Duration::from_secs(2);
    let give_up = steady_for + Duration::from_secs(60);
    let behind_ok = i64::from(a.rate / 2).max(20);
    progress(&format!(
        "load: {} events/s from lab-collector; waiting for {} of steady flow before the fault",
        a.rate,
        humantime::format_duration(steady_for)
    ));
    // One sample a second; a slow one (a service not answering) delays the next, never piles up.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut steady_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        sample(&mut samples).await;
        let last = samples.last().map(|s| s.counts);
        let steady = last.is_some_and(|c| c.kafka_count >= 0 && c.cassandra_count >= 0 && c.kafka_count - c.cassandra_count <= behind_ok);
        steady_since = if steady { steady_since.or(Some(Instant::now())) } else { None };
        if steady_since.is_some_and(|t| t.elapsed() >= steady_for) {
            break;
        }
        if started.elapsed() >= give_up {
            progress(&format!(
                "the flow did not settle within {}: injecting anyway (the baseline is weak)",
                humantime::format_duration(give_up)
            ));
            break;
        }
    }
    let mut c = client(&coordinator, Duration::from_secs(15))?;
    let server = format!("coordinator {coordinator}");
    let t0 = Instant::now();
    let mut created: Vec<Started> = Vec::new();
    let mut pending: Vec<Injection> = injections;
    pending.sort_by_key(|i| i.offset);
    let mut pending = pending.into_iter().peekable();
    loop {
        while let Some(inj) = pending.next_if(|i| t0.elapsed() >= i.offset) {
            let spec = pb::ScenarioSpec {
                name: format!("drill {slug}: {}", inj.what),
                fault: Some(pb::FaultSpec {
                    target: Some(pb::Target { kind: Some(inj.target.clone()) }),
                    fault: Some(inj.fault.clone()),
                    ..Default::default()
                }),
                selector: Some(pb::AgentSelector { agent_ids: vec![inj.agent.to_string()], ..Default::default() }),
                mode: pb::SelectionMode::All as i32,
                duration: Some(duration_to_pb(inj.duration)),
                severity: 3,
                ..Default::default()
            };
            let r = c
                .create_scenario(request(pb::CreateScenarioRequest { spec: Some(spec), dry_run: false }))
                .await
                .map_err(|s| crate::output::from_status(&server, s))?
                .into_inner();
            let id = r.scenario.map(|s| s.id).unwrap_or_default();
            progress(&format!("inject: {} on {} for {} (scenario {id})", inj.what, inj.agent, humantime::format_duration(inj.duration)));
            created.push(Started {
                id,
                what: inj.what,
                agent: inj.agent,
                start_ms: 0,
                end_ms: 0,
                state: String::new(),
                expect: inj.expect,
            });
        }
        sample(&mut samples).await;
        let mut all_final = pending.peek().is_none();
        for s in created.iter_mut() {
            let sc = c
                .get_scenario(pb::GetScenarioRequest { id: s.id.clone() })
                .await
                .map_err(|e| crate::output::from_status(&server, e))?
                .into_inner();
            s.start_ms = sc.started_at.as_ref().map(|t| to_ms(timestamp_from_pb(t))).unwrap_or(0);
            s.end_ms = sc.ended_at.as_ref().map(|t| to_ms(timestamp_from_pb(t))).unwrap_or(0);
            s.state = state_name(sc.state);
            all_final &= chaos_proto::spec::scenario_is_final(sc.state);
        }
        if all_final {
            break;
        }
        tick.tick().await;
    }
    progress("reverted: every fault ended; validating recovery while the load runs");
    let mut expectations = Vec::new();
    let fault_start_ms = created.iter().map(|s| s.start_ms).filter(|t| *t > 0).min().unwrap_or(0);
    for s in &created {
        if s.state != "completed" {
            expectations
                .push(json!({"expect": format!("scenario {} completes", s.id), "held": false, "observed": format!("ended {}", s.state)}));
        }
        // A short fault gets a shorter settle, so that it keeps samples to judge.
        let settle = (SETTLE.as_millis() as i64).min((s.end_ms - s.start_ms) / 3);
        let (from, to) = (s.start_ms + settle, s.end_ms);
        for e in &s.expect {
            let (held, observed) = match e {
                Expect::SlowerBy(by) => latency_shift(a.window, fault_start_ms, from, to, *by).await,
                _ => evaluate(*e, &samples, from, to, a.rate),
            };
            progress(&format!("{} while \"{}\": {observed}", if held { "HELD" } else { "NOT HELD" }, s.what));
            expectations.push(json!({"expect": format!("{e:?}"), "during": s.what, "held": held, "observed": observed}));
        }
    }

    let ids: Vec<String> = created.iter().map(|s| s.id.clone()).collect();
    let services = vec![
        pb::ServiceCheck { name: "kafka".into(), kind: pb::ServiceKind::Kafka as i32, address: chaos_lab::kafka_bootstrap() },
        pb::ServiceCheck { name: "cassandra".into(), kind: pb::ServiceKind::Cassandra as i32, address: chaos_lab::cassandra_contact() },
    ];
    let lag = |max_lag: u64| pb::LagCheck {
        bootstrap: chaos_lab::kafka_bootstrap(),
        group: GROUP.into(),
        topic: TOPIC.into(),
        max_lag,
        timeout: None,
    };
    let consistency = pb::ConsistencyCheck {
        acks_file: dir.join("acks").display().to_string(),
        cassandra: chaos_lab::cassandra_contact(),
        table: EVENTS_TABLE.into(),
        event_id_prefix: format!("{run_id}-"),
    };
    let show = |e: &pb::validation_event::Event| match e {
        pb::validation_event::Event::Progress(p) => progress(&format!("validate: {p}")),
        pb::validation_event::Event::Check(c) => progress(&format!("validate: {} {}: {}", verdict_name(c.verdict), c.name, c.summary)),
        pb::validation_event::Event::Report(_) => {}
    };
    let recovery = validate(
        &coordinator,
        pb::ValidateRecoveryRequest {
            services: services.clone(),
            lag: Some(lag(u64::from(a.rate / 2).max(20))),
            consistency: Some(consistency.clone()),
            performance: Some(pb::PerformanceCheck {
                cassandra: chaos_lab::cassandra_contact(),
                table: EVENTS_TABLE.into(),
                window: Some(duration_to_pb(a.window)),
                ..Default::default()
            }),
            scenario_ids: ids.clone(),
            ..Default::default()
        },
        show,
    )
    .await?;
    progress("stopping the load; checking the whole run's data");
    let load = collector.finish();
    let final_check = validate(
        &coordinator,
        pb::ValidateRecoveryRequest { lag: Some(lag(0)), consistency: Some(consistency), ..Default::default() },
        show,
    )
    .await?;

    let mut reasons: Vec<String> = expectations
        .iter()
        .filter(|e| e["held"] == false)
        .map(|e| {
            format!(
                "expected {} during {}: {}",
                e["expect"].as_str().unwrap_or("?"),
                e["during"].as_str().unwrap_or("the drill"),
                e["observed"].as_str().unwrap_or("?")
            )
        })
        .collect();
    reasons.extend(recovery.reasons.iter().map(|r| format!("recovery: {r}")));
    reasons.extend(final_check.reasons.iter().map(|r| format!("final data check: {r}")));
    if load["failed"].as_u64().unwrap_or(0) > 0 {
        reasons.push(format!("the collector gave up on {} event(s) (never acknowledged)", load["failed"]));
    }
    if load.is_null() {
        reasons.push(format!("no summary from the collector: see {}", dir.join("collector.log").display()));
    }
    let consistency_of = |r: &pb::ValidationReport| {
        r.checks.iter().find_map(|c| match &c.evidence {
            Some(pb::check_result::Evidence::Consistency(s)) => Some(s.clone()),
            _ => None,
        })
    };
    let data = consistency_of(&final_check);
    Ok(json!({
        "drill": slug,
        "expected": expected,
        "run_id": run_id,
        "injected": created.iter().map(|s| json!({"scenario_id": s.id, "what": s.what, "agent": s.agent, "state": s.state,
            "started_at_ms": s.start_ms, "ended_at_ms": s.end_ms})).collect::<Vec<_>>(),
        "expectations": expectations,
        "recovery": report_json(&recovery),
        "final_check": report_json(&final_check),
        "load": load,
        "data": data.map(|s| json!({"acknowledged": s.acknowledged, "ok": s.ok, "lost": s.lost_count, "duplicated": s.duplicated_count,
            "unexpected": s.unexpected_count, "first_lost": s.lost, "first_duplicated": s.duplicated})),
        "samples": samples,
        "verdict": if reasons.is_empty() { "PASS" } else { "FAIL" },
        "reasons": reasons,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

fn print_report(r: &Value) {
    let mut out = vec![format!("================ DRILL REPORT: {} ================", r["drill"].as_str().unwrap_or("?"))];
    for i in r["injected"].as_array().into_iter().flatten() {
        out.push(format!(
            "injected     {} on agent {} for {:.1} s (scenario {}, {})",
            i["what"].as_str().unwrap_or("?"),
            i["agent"].as_str().unwrap_or("?"),
            (i["ended_at_ms"].as_i64().unwrap_or(0) - i["started_at_ms"].as_i64().unwrap_or(0)) as f64 / 1000.0,
            i["scenario_id"].as_str().unwrap_or("?"),
            i["state"].as_str().unwrap_or("?")
        ));
    }
    out.push(format!("expected     {}", r["expected"].as_str().unwrap_or("?")));
    for e in r["expectations"].as_array().into_iter().flatten() {
        out.push(format!(
            "observed     {} {}",
            if e["held"] == true { "[held]" } else { "[NOT HELD]" },
            e["observed"].as_str().unwrap_or("?")
        ));
    }
    let rec = &r["recovery"];
    let rows: Vec<Vec<String>> = rec["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                c["name"].as_str().unwrap_or("?").to_string(),
                c["verdict"].as_str().unwrap_or("?").to_string(),
                c["summary"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    out.push(match rec["recovery_time_s"].as_f64() {
        Some(s) => format!("recovery     every check passed {s:.1} s after the revert ({} round(s))", rec["attempts"]),
        None => format!("recovery     NOT complete after {} round(s)", rec["attempts"]),
    });
    out.push(table(
        &["  CHECK", "VERDICT", "EVIDENCE"],
        &rows
            .into_iter()
            .map(|mut r| {
                r[0] = format!("  {}", r[0]);
                r
            })
            .collect::<Vec<_>>(),
    ));
    let load = &r["load"];
    out.push(format!("load         {} produced, {} acknowledged, {} failed", load["produced"], load["acked"], load["failed"]));
    let data = &r["data"];
    if data.is_null() {
        out.push("data         not checked (see reasons)".into());
    } else {
        out.push(format!(
            "data         {} acknowledged: {} stored exactly once, {} lost, {} duplicated, {} unexpected",
            data["acknowledged"], data["ok"], data["lost"], data["duplicated"], data["unexpected"]
        ));
    }
    for reason in r["reasons"].as_array().into_iter().flatten() {
        out.push(format!("reason       {}", reason.as_str().unwrap_or("?")));
    }
    out.push(format!("VERDICT      {}", r["verdict"].as_str().unwrap_or("?")));
    emit(&out.join("\n"));
}

pub async fn run(a: DrillArgs, fmt: Format) -> Result<u8, CliError> {
    if a.fault_duration < Duration::from_secs(6) {
        return Err(CliError::new(
            exit::USAGE,
            format!("--fault-duration: at least 6s, got {}", humantime::format_duration(a.fault_duration)),
        ));
    }
    let bin_dir = crate::lab::bin_dir(&a.bin_dir)?;
    let cfg = LabConfig::new(a.home.clone(), bin_dir.clone());
    let drills: Vec<DrillName> = if a.drill == DrillName::All { ALL.to_vec() } else { vec![a.drill] };
    let mut reports = Vec::new();
    for d in drills {
        let r = tokio::select! {
            r = run_one(&cfg, &bin_dir, d, &a) => r?,
            _ = tokio::signal::ctrl_c() => {
                // The collector stops with its guard; the scenarios revert by their TTL, at once here.
                let stopped = stop_drill_scenarios().await;
                return Err(CliError::new(exit::FAILURE, format!("interrupted: {stopped}")));
            }
        };
        if fmt == Format::Table {
            print_report(&r);
        }
        reports.push(r);
    }
    let passed = reports.iter().all(|r| r["verdict"] == "PASS");
    if fmt == Format::Json {
        emit_json(&if reports.len() == 1 {
            reports.remove(0)
        } else {
            json!({"verdict": if passed { "PASS" } else { "FAIL" }, "drills": reports})
        });
    } else if reports.len() > 1 {
        let rows: Vec<Vec<String>> = reports
            .iter()
            .map(|r| {
                vec![
                    r["drill"].as_str().unwrap_or("?").into(),
                    r["verdict"].as_str().unwrap_or("?").into(),
                    r["recovery"]["recovery_time_s"].as_f64().map(|s| format!("{s:.1} s")).unwrap_or("-".into()),
                ]
            })
            .collect();
        emit(&table(&["DRILL", "VERDICT", "RECOVERY"], &rows));
    }
    Ok(if passed { exit::OK } else { exit::FAILURE })
}

/// Stop every running scenario whose name marks it as a drill's.
async fn stop_drill_scenarios() -> String {
    let coordinator = chaos_lab::coordinator_url();
    let Ok(mut c) = client(&coordinator, Duration::from_secs(15)) else {
        return "cannot reach the coordinator; the faults revert by their TTL".into();
    };
    let running = [pb::ScenarioState::Pending, pb::ScenarioState::Queued, pb::ScenarioState::Running].map(|s| s as i32).to_vec();
    let list = match c.list_scenarios(pb::ListScenariosRequest { states: running, limit: 0 }).await {
        Ok(l) => l.into_inner().scenarios,
        Err(e) => return format!("cannot list scenarios ({}); the faults revert by their TTL", e.message()),
    };
    let mut stopped = Vec::new();
    for s in list.into_iter().filter(|s| s.spec.as_ref().is_some_and(|p| p.name.starts_with("drill "))) {
        if c.stop_scenario(request(pb::StopScenarioRequest { id: s.id.clone(), reason: "drill interrupted".into() })).await.is_ok() {
            stopped.push(s.id);
        }
    }
    format!("stopped scenario(s) {stopped:?} (their faults reverted); the load was stopped")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(v: &[(i64, i64, i64, i64)]) -> Vec<Sample> {
        v.iter()
            .enumerate()
            .map(|(i, (p, a, k, c))| Sample {
                t_s: i as f64,
                at_ms: 1000 * i as i64,
                counts: Counts { producer_count: *p, acked_count: *a, kafka_count: *k, cassandra_count: *c },
            })
            .collect()
    }

    #[test]
    fn stalls_and_growth_are_judged_with_their_numbers() {
        // 100 events/s for 4 s: Kafka grows by 400, Cassandra holds, then is unavailable.
        let s = samples(&[(0, 0, 0, 0), (100, 100, 100, 0), (200, 200, 200, 5), (300, 300, 300, -1), (400, 400, 400, -1)]);
        let (held, text) = evaluate(Expect::Grows(Series::Kafka), &s, 0, 4000, 100);
        assert!(held, "{text}");
        assert_eq!(text, "kafka_count grew 0 -> 400 (+400, expected at least +100)");
        let (held, text) = evaluate(Expect::Stalls(Series::Cassandra), &s, 0, 4000, 100);
        assert!(held, "{text}");
        assert!(text.contains("moved by 5") && text.contains("unavailable in 2"), "{text}");
        let (held, _) = evaluate(Expect::Stalls(Series::Kafka), &s, 0, 4000, 100);
        assert!(!held, "a growing series does not stall");
        let (held, text) = evaluate(Expect::Grows(Series::Cassandra), &s, 0, 4000, 100);
        assert!(!held, "unavailable is not growth: {text}");
        let (held, text) = evaluate(Expect::Grows(Series::Kafka), &s, 0, 500, 100);
        assert!(!held && text.contains("too few"), "{text}");
    }

    #[test]
    fn buffering_is_the_gap_between_produced_and_acknowledged() {
        let s = samples(&[(100, 100, 100, 100), (200, 100, -1, 100), (300, 100, -1, 100)]);
        let (held, text) = evaluate(Expect::Buffers, &s, 0, 2000, 100);
        assert!(held, "{text}");
        assert_eq!(text, "events waiting in the collector 0 -> 200 (expected at least +50)");
    }
}
