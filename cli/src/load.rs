//! Load generation: a profile of phases (warmup, baseline, spike, soak, ...)
//! produced to Kafka by `chaos-collector`, joined with the rows the
//! pipeline stored in Cassandra for end-to-end latency (produced → stored)
//! per phase: throughput, p50/p95/p99, error rate. `chaos load` runs one
//! against the lab (or any Kafka/Cassandra on loopback or in 198.18.0.0/15:
//! never elsewhere); an experiment's `load:` runs one alongside its method.
//! `--scale-out` is the seeds' check: the same load with one processor,
//! then with two, and the throughput ratio.

use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use chaos_probes::{
    cassandra::{self, Stored},
    latency,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    experiment::HumanDuration,
    output::{CliError, Format, emit, emit_json, exit, table},
};

/// One phase of a profile, as written in an experiment file:
/// `{phase: baseline, rate: 200, for: 30s}`. Each field is checked as it is
/// read, so a file's error names the value's line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    #[serde(deserialize_with = "checked_name")]
    pub phase: String,
    /// Events per second, 1..=20000.
    #[serde(deserialize_with = "checked_rate")]
    pub rate: u32,
    #[serde(rename = "for", deserialize_with = "checked_for")]
    pub duration: HumanDuration,
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("phase name must be letters, digits, '-' or '_', got {name:?}"));
    }
    Ok(())
}

fn check_rate(rate: u32) -> Result<(), String> {
    if !(1..=20_000).contains(&rate) {
        return Err(format!("rate must be 1..=20000 events/s, got {rate}"));
    }
    Ok(())
}

fn check_for(d: Duration) -> Result<(), String> {
    if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
        return Err(format!("`for` must be 1s..=1h, got {}", humantime::format_duration(d)));
    }
    Ok(())
}

/// Read a `T` and check it within the same visit, so an error in a file
/// carries the value's own line.
fn checked<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D, check: impl Fn(&T) -> Result<(), String>) -> Result<T, D::Error> {
    let v = T::deserialize(d)?;
    check(&v).map_err(serde::de::Error::custom)?;
    Ok(v)
}

fn checked_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked(d, |n: &String| check_name(n))
}

fn checked_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    checked(d, |r: &u32| check_rate(*r))
}

fn checked_for<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    checked(d, |h: &HumanDuration| check_for(h.0))
}

/// Parse `NAME:RATE:DURATION,...` (the command line's form).
pub fn parse_profile(s: &str) -> Result<Vec<Phase>, String> {
    let phases = s
        .split(',')
        .map(|p| {
            let f: Vec<&str> = p.trim().split(':').collect();
            let [name, rate, dur] = f[..] else { return Err(format!("phase {p:?}: expected NAME:RATE:DURATION, e.g. baseline:200:30s")) };
            let rate = rate.parse().map_err(|_| format!("phase {p:?}: rate {rate:?} is not a number of events per second"))?;
            let duration = humantime::parse_duration(dur).map_err(|e| format!("phase {p:?}: duration {dur:?}: {e}"))?;
            Ok(Phase { phase: name.to_string(), rate, duration: HumanDuration(duration) })
        })
        .collect::<Result<Vec<_>, String>>()?;
    check_profile(&phases)?;
    Ok(phases)
}

/// The bounds every profile keeps: 1..=20000 events/s, phases of 1 s to 1 h, 10 M events in all.
pub fn check_profile(phases: &[Phase]) -> Result<(), String> {
    if phases.is_empty() {
        return Err("profile: needs at least one phase".into());
    }
    for (i, p) in phases.iter().enumerate() {
        check_name(&p.phase).map_err(|m| format!("profile[{i}]: {m}"))?;
        check_rate(p.rate).and_then(|_| check_for(p.duration.0)).map_err(|m| format!("profile[{i}] ({}): {m}", p.phase))?;
    }
    let total: f64 = phases.iter().map(|p| f64::from(p.rate) * p.duration.0.as_secs_f64()).sum();
    if total > 10_000_000.0 {
        return Err(format!("profile: {total:.0} events in all; at most 10,000,000"));
    }
    Ok(())
}

pub fn profile_text(phases: &[Phase]) -> String {
    phases.iter().map(|p| format!("{}:{}:{}ms", p.phase, p.rate, p.duration.0.as_millis())).collect::<Vec<_>>().join(",")
}

/// Load may only go to the lab's addresses (198.18.0.0/15) or loopback.
pub fn check_target(field: &str, addr: &str) -> Result<(), String> {
    let resolved: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|e| format!("{field}: cannot resolve {addr:?} ({e}); give HOST:PORT"))?.collect();
    let allowed = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.is_loopback() || (v4.octets()[0] == 198 && (v4.octets()[1] & 0xfe) == 18),
        IpAddr::V6(v6) => v6.is_loopback(),
    };
    if resolved.is_empty() || !resolved.iter().all(|a| allowed(a.ip())) {
        return Err(format!("{field}: {addr:?} is not a lab address: load goes only to loopback or 198.18.0.0/15"));
    }
    Ok(())
}

/// Where the load goes and where the pipeline stores it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Kafka bootstrap (HOST:PORT).
    #[serde(default = "lab_kafka")]
    pub bootstrap: String,
    /// Cassandra contact point (HOST:PORT).
    #[serde(default = "lab_cassandra")]
    pub cassandra: String,
    /// The pipeline's table (KEYSPACE.TABLE).
    #[serde(default = "lab_table")]
    pub table: String,
    /// Run the producer in this network namespace (the lab's collector host by default; "" for none).
    #[serde(default = "lab_netns")]
    pub netns: String,
    /// Body size of each event in bytes.
    #[serde(default = "default_size")]
    pub size_bytes: u32,
}

fn lab_kafka() -> String {
    chaos_lab::kafka_bootstrap()
}
fn lab_cassandra() -> String {
    chaos_lab::cassandra_contact()
}
fn lab_table() -> String {
    chaos_lab::EVENTS_TABLE.to_string()
}
fn lab_netns() -> String {
    "lab-collector".to_string()
}
fn default_size() -> u32 {
    256
}

impl Default for Target {
    fn default() -> Self {
        Target { bootstrap: lab_kafka(), cassandra: lab_cassandra(), table: lab_table(), netns: lab_netns(), size_bytes: default_size() }
    }
}

impl Target {
    pub fn check(&self) -> Result<(), String> {
        check_target("load.bootstrap", &self.bootstrap)?;
        check_target("load.cassandra", &self.cassandra)?;
        cassandra::parse_table_name(&self.table).map_err(|e| format!("load.table: {e}"))?;
        if self.size_bytes > 1_048_576 {
            return Err(format!("load.size_bytes: at most 1048576, got {}", self.size_bytes));
        }
        Ok(())
    }
}

/// Where the producer is in its profile (the part of its status file a run follows).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LoadStatus {
    /// The phase being produced (none before the first and after the last).
    pub phase: Option<String>,
    pub phase_index: Option<usize>,
    /// Producing has ended (the profile ran out, or it was stopped).
    #[serde(default)]
    pub done: bool,
}

/// A running producer; stopped (and waited for) on drop.
pub struct LoadRun {
    child: Option<Child>,
    out: PathBuf,
    status: PathBuf,
    pub run_id: String,
    pub acks: PathBuf,
    pub started: Instant,
    pub total: Duration,
}

impl LoadRun {
    pub fn start(bin_dir: &Path, dir: &Path, target: &Target, phases: &[Phase], tag: &str) -> Result<LoadRun, CliError> {
        let fail = |m: String| CliError::new(exit::FAILURE, m);
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let run_id = format!("{tag}-{now_ms}");
        let (out, acks) = (dir.join(format!("{tag}-collector.json")), dir.join(format!("{tag}-acks")));
        let status = dir.join(format!("{tag}-status.json"));
        // A file from an earlier run in the same directory must not be read as this one's.
        let _ = std::fs::remove_file(&status);
        let file = |p: PathBuf| std::fs::File::create(&p).map_err(|e| fail(format!("creating {}: {e}", p.display())));
        let collector = bin_dir.join("chaos-collector");
        let mut cmd = if target.netns.is_empty() {
            Command::new(&collector)
        } else {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", target.netns)).arg("--").arg(&collector);
            c
        };
        cmd.args(["--bootstrap", &target.bootstrap, "--profile", &profile_text(phases), "--run-id", &run_id])
            .args(["--size-bytes", &target.size_bytes.to_string(), "--delivery-timeout", "60s"])
            .arg("--acks-file")
            .arg(&acks)
            .arg("--status-file")
            .arg(&status)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file(out.clone())?)
            .stderr(file(dir.join(format!("{tag}-collector.log")))?);
        let child = cmd.spawn().map_err(|e| fail(format!("starting {}: {e}", collector.display())))?;
        let total = phases.iter().map(|p| p.duration.0).sum();
        Ok(LoadRun { child: Some(child), out, status, run_id, acks, started: Instant::now(), total })
    }

    /// The producer's status, once it has written one.
    pub fn status(&self) -> Option<LoadStatus> {
        std::fs::read_to_string(&self.status).ok().and_then(|s| serde_json::from_str(&s).ok())
    }

    /// Whether the producer is still producing.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stop producing (if it still is), wait for the acknowledgements; the collector's summary.
    pub fn finish(&mut self) -> Value {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            }
            let _ = c.wait();
        }
        std::fs::read_to_string(&self.out)
            .ok()
            .and_then(|s| s.lines().last().and_then(|l| serde_json::from_str(l).ok()))
            .unwrap_or(Value::Null)
    }

    /// Wait (up to `settle`) for the stored rows of this run to reach the
    /// acknowledged count or stop growing, then compute each phase's figures.
    pub async fn stats(&self, target: &Target, summary: &Value, settle: Duration) -> Result<Vec<PhaseStats>, String> {
        // Ids are RUN-00000042.
        let session = cassandra::connect(&target.cassandra).await.map_err(|e| format!("Cassandra {}: {e:#}", target.cassandra))?;
        let acked = summary["acked"].as_u64().unwrap_or(0) as usize;
        let until = Instant::now() + settle;
        let mut stored;
        let mut last = usize::MAX;
        loop {
            stored =
                cassandra::event_times_of(&session, &target.table, &format!("{}-", self.run_id)).await.map_err(|e| format!("{e:#}"))?;
            if stored.len() >= acked || Instant::now() >= until || (stored.len() == last && !stored.is_empty()) {
                break;
            }
            last = stored.len();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(phase_stats(summary, &stored))
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The figures of one phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PhaseStats {
    pub phase: String,
    pub rate_per_s: u64,
    pub seconds: f64,
    pub produced: u64,
    pub acked: u64,
    pub failed: u64,
    /// Events produced in the phase and stored (by the producer's timestamp).
    pub stored: u64,
    /// Of those, events written more than once (delivered again, e.g. after
    /// a consumer-group rebalance): at-least-once at work. Their latency is
    /// to the first write.
    pub redelivered: u64,
    /// Failed deliveries over produced, in percent.
    pub error_pct: f64,
    /// Acknowledged events per second.
    pub acked_per_s: f64,
    /// Produced → stored, ms.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// Join the collector's phases with the stored events `(event number, times)`:
/// a phase owns the events it numbered (`first_seq..end_seq`); latency is
/// produced → first stored.
pub fn phase_stats(summary: &Value, stored: &[(u64, Stored)]) -> Vec<PhaseStats> {
    let phases = summary["phases"].as_array().cloned().unwrap_or_default();
    phases
        .iter()
        .map(|p| {
            let from = p["from_ms"].as_i64().unwrap_or(0);
            let seqs = p["first_seq"].as_u64().unwrap_or(0)..p["end_seq"].as_u64().unwrap_or(0);
            let mine: Vec<&Stored> = stored.iter().filter(|(n, _)| seqs.contains(n)).map(|(_, s)| s).collect();
            let mut lat: Vec<i64> = mine.iter().map(|s| (s.first_written_ms - s.produced_ms).max(0)).collect();
            lat.sort_unstable();
            let (produced, acked, failed) =
                (p["produced"].as_u64().unwrap_or(0), p["acked"].as_u64().unwrap_or(0), p["failed"].as_u64().unwrap_or(0));
            let seconds = ((p["to_ms"].as_i64().unwrap_or(from) - from).max(1)) as f64 / 1000.0;
            PhaseStats {
                phase: p["phase"].as_str().unwrap_or_default().to_string(),
                rate_per_s: p["rate_per_s"].as_u64().unwrap_or(0),
                seconds,
                produced,
                acked,
                failed,
                stored: lat.len() as u64,
                redelivered: mine.iter().filter(|s| s.writes > 1).count() as u64,
                error_pct: if produced == 0 { 0.0 } else { failed as f64 * 100.0 / produced as f64 },
                acked_per_s: acked as f64 / seconds,
                p50_ms: latency::percentile(&lat, 0.50),
                p95_ms: latency::percentile(&lat, 0.95),
                p99_ms: latency::percentile(&lat, 0.99),
            }
        })
        .collect()
}

pub fn stats_rows(stats: &[PhaseStats]) -> Vec<Vec<String>> {
    stats
        .iter()
        .map(|s| {
            vec![
                s.phase.clone(),
                s.rate_per_s.to_string(),
                format!("{:.1}", s.seconds),
                s.produced.to_string(),
                format!("{:.1}", s.acked_per_s),
                format!("{}/{}", s.stored, s.acked),
                s.redelivered.to_string(),
                format!("{:.2}", s.error_pct),
                format!("{:.0}", s.p50_ms),
                format!("{:.0}", s.p95_ms),
                format!("{:.0}", s.p99_ms),
            ]
        })
        .collect()
}

pub const STATS_HEADERS: [&str; 11] =
    ["PHASE", "RATE/S", "SECONDS", "PRODUCED", "ACKED/S", "STORED/ACKED", "REDELIVERED", "ERROR %", "P50 MS", "P95 MS", "P99 MS"];

const LOAD_HELP: &str = "\
The profile is NAME:RATE:DURATION phases, run in order, e.g.
  warmup:50:10s,baseline:200:30s,spike:1000:10s,soak:200:2m
Each event carries a unique id and its production time; the processor writes
its storage time. For each phase: produced, acknowledged per second, stored of
acknowledged, error rate (failed deliveries), end-to-end latency (produced → first stored in
Cassandra) at p50/p95/p99, and how many events were written again
(redelivered: at-least-once after a rebalance or a restart).

Load goes only to loopback or 198.18.0.0/15 (the lab); anything else is refused.

--scale-out runs the profile twice: with the lab's one processor, then with a
second one in the same consumer group (started for the run, stopped after),
and reports stored events per second of each and the ratio (the seeds' check:
2 workers >= 1.6x one). Use a rate above what one processor sustains, or the
ratio only measures the producer.

Examples:
  chaos load --profile warmup:50:5s,baseline:200:20s,spike:1000:5s
  chaos -o json load --profile baseline:500:30s
  chaos load --scale-out --profile saturate:5000:20s";

#[derive(Debug, clap::Args)]
#[command(after_help = LOAD_HELP)]
pub struct LoadArgs {
    /// Phases NAME:RATE:DURATION,...
    #[arg(long, value_parser = profile_arg)]
    profile: Profile,
    /// Kafka bootstrap (default: the lab's).
    #[arg(long)]
    bootstrap: Option<String>,
    /// Cassandra contact point (default: the lab's).
    #[arg(long)]
    cassandra: Option<String>,
    /// The pipeline's table (default: the lab's chaos_lab.events).
    #[arg(long)]
    table: Option<String>,
    /// Produce from this network namespace ("" for the current one; default: the lab's collector host).
    #[arg(long)]
    netns: Option<String>,
    #[arg(long, default_value_t = 256)]
    size_bytes: u32,
    /// How long to wait for the last events to be stored after the load ends.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Run it with one processor, then two, and report the ratio (the lab only).
    #[arg(long)]
    scale_out: bool,
    /// Where the collector's files go.
    #[arg(long, default_value = "chaos-load")]
    dir: PathBuf,
    /// Directory of the chaos-collector and chaos-processor binaries (default: this binary's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// A whole profile as one command-line value.
#[derive(Debug, Clone)]
pub struct Profile(pub Vec<Phase>);

fn profile_arg(s: &str) -> Result<Profile, String> {
    parse_profile(s).map(Profile)
}

/// A second processor in the lab's consumer group; killed on drop.
struct ExtraProcessor(Child);

impl ExtraProcessor {
    fn start(bin_dir: &Path, target: &Target, log: &Path) -> Result<ExtraProcessor, CliError> {
        let out = std::fs::File::create(log).map_err(|e| CliError::new(exit::FAILURE, format!("creating {}: {e}", log.display())))?;
        let err = out.try_clone().map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
        let host = chaos_lab::host("processor").map(|h| h.netns()).unwrap_or_else(|| "lab-processor".into());
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{host}"))
            .arg("--")
            .arg(bin_dir.join("chaos-processor"))
            .args(["--bootstrap", &target.bootstrap, "--cassandra", &target.cassandra])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| CliError::new(exit::FAILURE, format!("starting a second chaos-processor: {e}")))?;
        Ok(ExtraProcessor(child))
    }
}

impl Drop for ExtraProcessor {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stored events per second over the whole run (first to last storage time).
fn stored_rate(stats: &[PhaseStats], stored_span_s: f64) -> f64 {
    stats.iter().map(|s| s.stored).sum::<u64>() as f64 / stored_span_s.max(0.001)
}

async fn one_run(bin_dir: &Path, a: &LoadArgs, target: &Target, tag: &str) -> Result<(Vec<PhaseStats>, f64, Value), CliError> {
    let mut run = LoadRun::start(bin_dir, &a.dir, target, &a.profile.0, tag)?;
    let mut last = Instant::now();
    while run.running() {
        if last.elapsed() >= Duration::from_secs(5) {
            eprintln!("load: {tag}: {:.0} of {:.0} s", run.started.elapsed().as_secs_f64(), run.total.as_secs_f64());
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let summary = run.finish();
    if summary.is_null() {
        return Err(CliError::new(
            exit::FAILURE,
            format!("{tag}: the collector wrote no summary; see {}/{tag}-collector.log", a.dir.display()),
        ));
    }
    eprintln!("load: {tag}: produced {}, acknowledged {}; waiting for the pipeline to store them", summary["produced"], summary["acked"]);
    let stats = run.stats(target, &summary, a.settle).await.map_err(|e| CliError::new(exit::FAILURE, e))?;
    let session = cassandra::connect(&target.cassandra).await.map_err(|e| CliError::new(exit::FAILURE, format!("{e:#}")))?;
    let times = cassandra::event_times_of(&session, &target.table, &format!("{}-", run.run_id))
        .await
        .map_err(|e| CliError::new(exit::FAILURE, format!("{e:#}")))?;
    let (lo, hi) = times.iter().fold((i64::MAX, i64::MIN), |(l, h), (_, s)| (l.min(s.first_written_ms), h.max(s.first_written_ms)));
    let span = if times.is_empty() { 0.0 } else { (hi - lo) as f64 / 1000.0 };
    Ok((stats.clone(), stored_rate(&stats, span), summary))
}

/// `chaos load`.
pub async fn run(a: LoadArgs, fmt: Format) -> Result<u8, CliError> {
    let usage = |m: String| CliError::new(exit::USAGE, m);
    let d = Target::default();
    let target = Target {
        bootstrap: a.bootstrap.clone().unwrap_or(d.bootstrap),
        cassandra: a.cassandra.clone().unwrap_or(d.cassandra),
        table: a.table.clone().unwrap_or(d.table),
        netns: a.netns.clone().unwrap_or(d.netns),
        size_bytes: a.size_bytes,
    };
    target.check().map_err(|m| usage(m.replace("load.", "--")))?;
    let bin_dir = crate::lab::bin_dir(&a.bin_dir)?;
    let (stats, rate, summary) = one_run(&bin_dir, &a, &target, "load").await?;
    let mut out = json!({"profile": profile_text(&a.profile.0), "phases": stats, "stored_per_s": rate, "collector": summary});
    let mut scale = None;
    if a.scale_out {
        let log = a.dir.join("processor-2.log");
        let extra = ExtraProcessor::start(&bin_dir, &target, &log)?;
        // The group rebalances onto both before the second run.
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until && !std::fs::read_to_string(&log).unwrap_or_default().contains("processing") {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (stats2, rate2, _) = one_run(&bin_dir, &a, &target, "load-2p").await?;
        drop(extra);
        let ratio = if rate > 0.0 { rate2 / rate } else { 0.0 };
        out["scale_out"] = json!({"one_processor_per_s": rate, "two_processors_per_s": rate2, "ratio": ratio, "goal": 1.6,
            "passed": ratio >= 1.6, "phases_two": stats2});
        scale = Some((rate, rate2, ratio, stats2));
    }
    match fmt {
        Format::Json => emit_json(&out),
        Format::Table => {
            emit(&table(&STATS_HEADERS, &stats_rows(&stats)));
            emit(&format!("stored {rate:.1} events/s over the run"));
            if let Some((r1, r2, ratio, stats2)) = scale {
                emit("with two processors:");
                emit(&table(&STATS_HEADERS, &stats_rows(&stats2)));
                emit(&format!(
                    "scale-out: 1 processor {r1:.1}/s, 2 processors {r2:.1}/s, ratio {ratio:.2} (goal >= 1.6: {})",
                    if ratio >= 1.6 { "met" } else { "NOT met" }
                ));
            }
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_keep_their_bounds() {
        let p = parse_profile("warmup:50:10s,baseline:200:30s,spike:1000:5s").expect("profile");
        assert_eq!(p.len(), 3);
        assert_eq!((p[2].phase.as_str(), p[2].rate, p[2].duration.0), ("spike", 1000, Duration::from_secs(5)));
        assert_eq!(profile_text(&p), "warmup:50:10000ms,baseline:200:30000ms,spike:1000:5000ms");
        assert!(parse_profile("a:0:1s").expect_err("rate").contains("rate must be 1..=20000"));
        assert!(parse_profile("a:10:500ms").expect_err("short").contains("1s..=1h"));
        assert!(parse_profile("a:20000:1h").expect_err("too many").contains("at most 10,000,000"));
        assert!(parse_profile("a:10").expect_err("shape").contains("NAME:RATE:DURATION"));
    }

    #[test]
    fn load_goes_only_to_the_lab_or_loopback() {
        assert!(check_target("x", "198.18.200.2:9092").is_ok());
        assert!(check_target("x", "198.19.0.5:1").is_ok());
        assert!(check_target("x", "127.0.0.1:9092").is_ok());
        assert!(
            check_target("load.bootstrap", "10.0.0.1:9092")
                .expect_err("private")
                .starts_with("load.bootstrap: \"10.0.0.1:9092\" is not a lab address")
        );
        assert!(check_target("x", "198.20.0.1:1").is_err());
        assert!(check_target("x", "8.8.8.8:53").is_err());
    }

    #[test]
    fn phases_join_the_stored_rows_by_production_time() {
        let summary = json!({"phases": [
            {"phase": "baseline", "rate_per_s": 10, "from_ms": 1000, "to_ms": 2000, "first_seq": 0, "end_seq": 10, "produced": 10, "acked": 10, "failed": 0},
            {"phase": "spike", "rate_per_s": 100, "from_ms": 2000, "to_ms": 3000, "first_seq": 10, "end_seq": 110, "produced": 100, "acked": 90, "failed": 10},
        ]});
        // The last baseline event carries the spike's first millisecond: its number decides.
        let at = |p: i64, w: i64| Stored::new(p, w, vec![w]);
        let mut stored: Vec<(u64, Stored)> = (0..10).map(|i| (i, at(1000 + i as i64 * 100, 1000 + i as i64 * 100 + 5))).collect();
        stored[9].1 = at(2000, 2005);
        // One baseline event written again 20 s later (a redelivery): its latency is to the first write.
        stored[3].1 = Stored::new(1300, 21_000, vec![1305, 21_000]);
        stored.extend((0..90).map(|i| (10 + i, at(2000 + i as i64 * 10, 2000 + i as i64 * 10 + 50 + i as i64))));
        let s = phase_stats(&summary, &stored);
        assert_eq!((s[0].stored, s[0].redelivered, s[0].p50_ms, s[0].p99_ms, s[0].error_pct), (10, 1, 5.0, 5.0, 0.0));
        assert_eq!(s[1].redelivered, 0);
        assert_eq!((s[1].stored, s[1].acked_per_s, s[1].error_pct), (90, 90.0, 10.0));
        // 50 + i for i in 0..90: p50 = 50 + 44, p95 = 50 + 85, p99 = 50 + 89.
        assert_eq!((s[1].p50_ms, s[1].p95_ms, s[1].p99_ms), (94.0, 135.0, 139.0));
    }
}
