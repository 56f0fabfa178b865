//! Recovery validation (`ValidateRecovery`): after chaos, did the pipeline
//! come back, and did it keep every event?
//!
//! [`Plan::from_request`] checks the request (errors name the field); [`run`]
//! waits for the validated scenarios to end, then runs the checks in
//! rounds: availability, lag drain, data consistency (Jepsen's set check),
//! performance against the baseline before the fault. A passed check stays
//! passed; the failing ones are tried again after `retry_interval`, up to
//! `max_attempts` rounds, then the verdict is FAILED with every reason.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chaos_probes::{cassandra, kafka, latency, setcheck};
use chaos_proto::{
    convert::{duration_from_pb, duration_to_pb, timestamp_from_pb, timestamp_to_pb},
    pb::{self, Verdict, check_result::Evidence, validation_event::Event},
};
use tokio::{sync::mpsc, time::Instant};
use tonic::Status;
use tracing::info;

use crate::scenarios::{Scenarios, is_final};

/// Defaults from the config's `recovery:` section.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryDefaults {
    pub max_attempts: u32,
    pub retry_interval: Duration,
    pub recovery_timeout: Duration,
}

impl Default for RecoveryDefaults {
    fn default() -> Self {
        RecoveryDefaults { max_attempts: 3, retry_interval: Duration::from_secs(5), recovery_timeout: Duration::from_secs(120) }
    }
}

/// How long one probe of a service may take before it reads as unavailable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the set check waits for acknowledged events still on their way.
const SETTLE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
struct Lag {
    bootstrap: String,
    group: String,
    topic: String,
    max_lag: u64,
    timeout: Duration,
}

#[derive(Debug, Clone)]
struct Consistency {
    acks_file: PathBuf,
    cassandra: String,
    table: String,
    prefix: String,
}

#[derive(Debug, Clone)]
struct Performance {
    cassandra: String,
    table: String,
    window: Duration,
    max_degradation_pct: f64,
    latency_slack: Duration,
    min_events: u64,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// In the order they run: services, lag, consistency, performance.
    checks: Vec<Check>,
    scenario_ids: Vec<String>,
    max_attempts: u32,
    retry_interval: Duration,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

fn need(field: &str, v: &str) -> Result<String, Status> {
    if v.trim().is_empty() { Err(invalid(field, "required")) } else { Ok(v.trim().to_string()) }
}

fn host_port(field: &str, v: &str) -> Result<String, Status> {
    let v = need(field, v)?;
    match v.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(v),
        _ => Err(invalid(field, format!("expected HOST:PORT, got {v:?}"))),
    }
}

fn table(field: &str, v: &str) -> Result<String, Status> {
    cassandra::parse_table_name(&need(field, v)?).map_err(|e| invalid(field, e))
}

/// Longest wait a validation may be asked for (one check's timeout, a retry interval, a window).
pub const MAX_VALIDATION_WAIT: Duration = Duration::from_secs(3600);

fn duration_or(field: &str, d: Option<&prost_types::Duration>, default: Duration) -> Result<Duration, Status> {
    match d {
        None => Ok(default),
        Some(d) => duration_from_pb(d).filter(|d| !d.is_zero() && *d <= MAX_VALIDATION_WAIT).ok_or_else(|| {
            invalid(
                field,
                format!("must be a positive duration of at most {}, got {}s", humantime::format_duration(MAX_VALIDATION_WAIT), d.seconds),
            )
        }),
    }
}

/// A Kafka topic name: 1..=249 of `[a-zA-Z0-9._-]` (Kafka's own rule), not `.` or `..`.
fn topic(field: &str, v: &str) -> Result<String, Status> {
    let v = need(field, v)?;
    if v.len() > 249 || v == "." || v == ".." || !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(invalid(
            field,
            format!("must be a Kafka topic name (1..=249 of letters, digits, '.', '_', '-'), got {}", chaos_proto::edge::quote(&v)),
        ));
    }
    Ok(v)
}

impl Plan {
    pub fn from_request(r: &pb::ValidateRecoveryRequest, defaults: RecoveryDefaults) -> Result<Plan, Status> {
        let mut checks = Vec::new();
        for (i, s) in r.services.iter().enumerate() {
            let f = |k: &str| format!("services[{i}].{k}");
            let kind = pb::ServiceKind::try_from(s.kind)
                .ok()
                .filter(|k| *k != pb::ServiceKind::Unspecified)
                .ok_or_else(|| invalid(&f("kind"), format!("KAFKA, CASSANDRA or TCP, got {}", s.kind)))?;
            let address = host_port(&f("address"), &s.address)?;
            let name = if s.name.trim().is_empty() { address.clone() } else { s.name.trim().to_string() };
            checks.push(Check::Service(name, kind, address));
        }
        let lag = match &r.lag {
            None => None,
            Some(l) => Some(Lag {
                bootstrap: host_port("lag.bootstrap", &l.bootstrap)?,
                group: need("lag.group", &l.group)?,
                topic: topic("lag.topic", &l.topic)?,
                max_lag: l.max_lag,
                timeout: duration_or("lag.timeout", l.timeout.as_ref(), defaults.recovery_timeout)?,
            }),
        };
        let consistency = match &r.consistency {
            None => None,
            Some(c) => Some(Consistency {
                acks_file: PathBuf::from(need("consistency.acks_file", &c.acks_file)?),
                cassandra: host_port("consistency.cassandra", &c.cassandra)?,
                table: table("consistency.table", &c.table)?,
                prefix: c.event_id_prefix.clone(),
            }),
        };
        let performance = match &r.performance {
            None => None,
            Some(p) => {
                if r.scenario_ids.is_empty() {
                    return Err(invalid("performance", "needs scenario_ids: the baseline is the window before the first scenario started"));
                }
                let pct = if p.max_degradation_pct == 0.0 { 50.0 } else { p.max_degradation_pct };
                if !(pct > 0.0 && pct.is_finite()) {
                    return Err(invalid("performance.max_degradation_pct", format!("must be above 0, got {pct}")));
                }
                Some(Performance {
                    cassandra: host_port("performance.cassandra", &p.cassandra)?,
                    table: table("performance.table", &p.table)?,
                    window: duration_or("performance.window", p.window.as_ref(), Duration::from_secs(10))?,
                    max_degradation_pct: pct,
                    latency_slack: match &p.latency_slack {
                        None => Duration::from_millis(100),
                        Some(d) => duration_from_pb(d)
                            .filter(|d| *d <= MAX_VALIDATION_WAIT)
                            .ok_or_else(|| invalid("performance.latency_slack", format!("must be in 0s..=1h, got {}s", d.seconds)))?,
                    },
                    min_events: if p.min_events == 0 { 50 } else { u64::from(p.min_events) },
                })
            }
        };
        checks.extend(lag.map(Check::Lag));
        checks.extend(consistency.map(Check::Consistency));
        checks.extend(performance.map(Check::Performance));
        if checks.is_empty() {
            return Err(invalid("services", "nothing to validate: give services, lag, consistency or performance"));
        }
        for (i, id) in r.scenario_ids.iter().enumerate() {
            need(&format!("scenario_ids[{i}]"), id)?;
        }
        Ok(Plan {
            checks,
            scenario_ids: r.scenario_ids.clone(),
            max_attempts: match r.max_attempts {
                0 => defaults.max_attempts.max(1),
                n if n > 1000 => return Err(invalid("max_attempts", format!("must be at most 1000, got {n}"))),
                n => n,
            },
            retry_interval: duration_or("retry_interval", r.retry_interval.as_ref(), defaults.retry_interval)?,
        })
    }
}

/// The verdict of one round of one check.
struct Outcome {
    passed: bool,
    summary: String,
    reasons: Vec<String>,
    evidence: Option<Evidence>,
    /// When the thing checked was seen recovered (lag drained, window start).
    recovered_at: Option<SystemTime>,
}

impl Outcome {
    fn pass(summary: String, evidence: Option<Evidence>, recovered_at: SystemTime) -> Outcome {
        Outcome { passed: true, summary, reasons: vec![], evidence, recovered_at: Some(recovered_at) }
    }
    fn fail(summary: String, reasons: Vec<String>, evidence: Option<Evidence>) -> Outcome {
        Outcome { passed: false, summary, reasons, evidence, recovered_at: None }
    }
    fn error(what: &str, e: anyhow::Error) -> Outcome {
        let line = format!("{what}: {e:#}");
        Outcome::fail(line.clone(), vec![line], None)
    }
}

#[derive(Debug, Clone)]
enum Check {
    Service(String, pb::ServiceKind, String),
    Lag(Lag),
    Consistency(Consistency),
    Performance(Performance),
}

impl Check {
    fn name(&self) -> String {
        match self {
            Check::Service(n, ..) => format!("availability:{n}"),
            Check::Lag(_) => "lag".into(),
            Check::Consistency(_) => "consistency".into(),
            Check::Performance(_) => "performance".into(),
        }
    }
}

/// Where the chaos happened in time.
struct Window {
    /// When the first validated scenario started (None without scenarios).
    fault_start: Option<SystemTime>,
    reverted_at: SystemTime,
    /// What `reverted_at` is, in words.
    origin: &'static str,
}

type Tx = mpsc::Sender<Result<pb::ValidationEvent, Status>>;

/// Send, and say whether the watcher is still there.
async fn send(tx: &Tx, e: Event) -> bool {
    tx.send(Ok(pb::ValidationEvent { event: Some(e) })).await.is_ok()
}

async fn progress(tx: &Tx, text: String) -> bool {
    info!(target: "chaos_coordinator::validate", "{text}");
    send(tx, Event::Progress(text)).await
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn from_ms(v: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

/// Wait for the scenarios to end; their first start and last end.
async fn fault_window(scenarios: &Scenarios, ids: &[String], tx: &Tx) -> Result<Window, Status> {
    if ids.is_empty() {
        return Ok(Window { fault_start: None, reverted_at: SystemTime::now(), origin: "the start of the validation" });
    }
    let mut said = false;
    loop {
        let all: Vec<pb::Scenario> = ids.iter().map(|id| scenarios.get(id)).collect::<Result<_, _>>()?;
        let running: Vec<&pb::Scenario> = all.iter().filter(|s| !is_final(s.state)).collect();
        if running.is_empty() {
            let starts: Vec<SystemTime> = all.iter().filter_map(|s| s.started_at.as_ref()).map(timestamp_from_pb).collect();
            if starts.is_empty() {
                return Err(Status::failed_precondition(format!("none of the scenarios {ids:?} ever ran: nothing to validate")));
            }
            let ends = all.iter().filter_map(|s| s.ended_at.as_ref()).map(timestamp_from_pb);
            return Ok(Window {
                fault_start: starts.iter().min().copied(),
                reverted_at: ends.max().unwrap_or_else(SystemTime::now),
                origin: "the revert",
            });
        }
        if !said {
            let names: Vec<String> = running.iter().map(|s| s.id.clone()).collect();
            if !progress(tx, format!("waiting for scenario(s) {} to end", names.join(", "))).await {
                return Err(Status::cancelled("the client went away"));
            }
            said = true;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn check_service(kind: pb::ServiceKind, address: &str) -> Outcome {
    let started = Instant::now();
    let r = match kind {
        pb::ServiceKind::Kafka => async { kafka::Probe::new(address, None, PROBE_TIMEOUT)?.brokers().await }
            .await
            .map(|b| format!("Kafka metadata: broker(s) {b:?}")),
        pb::ServiceKind::Cassandra => chaos_probes::bounded(&format!("CQL query to {address}"), PROBE_TIMEOUT, async {
            let s = cassandra::connect(address).await?;
            cassandra::release_version(&s).await
        })
        .await
        .map(|v| format!("CQL query answered (Cassandra {v})")),
        pb::ServiceKind::Tcp | pb::ServiceKind::Unspecified => {
            chaos_probes::tcp::connect(address, PROBE_TIMEOUT).await.map(|_| "TCP connect accepted".to_string())
        }
    };
    match r {
        Ok(what) => Outcome::pass(format!("{address}: {what} in {} ms", started.elapsed().as_millis()), None, SystemTime::now()),
        Err(e) => Outcome::error(&format!("{address} unavailable"), e),
    }
}

async fn check_lag(l: &Lag, reverted_at: SystemTime, origin: &str) -> Outcome {
    let deadline = Instant::now() + l.timeout;
    let mut initial = None;
    let probe = match kafka::Probe::new(&l.bootstrap, Some(&l.group), PROBE_TIMEOUT) {
        Ok(p) => p,
        Err(e) => return Outcome::error("Kafka client", e),
    };
    loop {
        match probe.lag(&l.topic).await {
            Ok(t) => {
                let first = *initial.get_or_insert(t.total_lag);
                let drained = t.total_lag <= l.max_lag;
                let now = SystemTime::now();
                let recovery = now.duration_since(reverted_at).ok();
                let ev = pb::LagEvidence {
                    initial_lag: first,
                    final_lag: t.total_lag,
                    topic_messages: t.messages,
                    drained_at: drained.then(|| timestamp_to_pb(now)),
                    recovery_time: if drained { recovery.map(duration_to_pb) } else { None },
                    partitions: t
                        .partitions
                        .iter()
                        .map(|p| pb::PartitionLag {
                            partition: p.partition,
                            low_offset: p.low,
                            high_offset: p.high,
                            committed_offset: p.committed.unwrap_or(-1),
                            lag: p.lag,
                        })
                        .collect(),
                };
                if drained {
                    // Drained at the first look: the recovery took at most this long.
                    let by = if first <= l.max_lag { "already drained at the first look, " } else { "drained " };
                    let rt = recovery.map(|d| format!("{by}{:.1} s after {origin}", d.as_secs_f64())).unwrap_or_default();
                    return Outcome::pass(
                        format!(
                            "group {} lag {} -> {} (<= {}) on {} ({} messages): {rt}",
                            l.group, first, t.total_lag, l.max_lag, l.topic, t.messages
                        ),
                        Some(Evidence::Lag(ev)),
                        now,
                    );
                }
                if Instant::now() >= deadline {
                    let line = format!(
                        "group {} lag still {} > {} after {} (was {first})",
                        l.group,
                        t.total_lag,
                        l.max_lag,
                        humantime::format_duration(l.timeout)
                    );
                    return Outcome::fail(line.clone(), vec![line], Some(Evidence::Lag(ev)));
                }
            }
            // Kafka may still be coming back: keep trying until the deadline.
            Err(e) if Instant::now() >= deadline => return Outcome::error(&format!("lag of group {} unreadable", l.group), e),
            Err(_) => {}
        }
        tokio::time::sleep(POLL).await;
    }
}

fn consistency_evidence(c: &setcheck::SetCheck) -> Evidence {
    Evidence::Consistency(pb::ConsistencyEvidence {
        acknowledged: c.acknowledged as u64,
        stored_rows: c.stored_rows as u64,
        ok: c.ok as u64,
        lost_count: c.lost_count as u64,
        duplicated_count: c.duplicated_count as u64,
        unexpected_count: c.unexpected_count as u64,
        lost: c.lost.clone(),
        duplicated: c.duplicated.clone(),
        unexpected: c.unexpected.clone(),
    })
}

async fn check_consistency(c: &Consistency) -> Outcome {
    let session = match chaos_probes::bounded("CQL connect", PROBE_TIMEOUT, cassandra::connect(&c.cassandra)).await {
        Ok(s) => s,
        Err(e) => return Outcome::error(&format!("Cassandra at {}", c.cassandra), e),
    };
    // One clean reading within the settle time passes (see `setcheck::settle`).
    let sc = match setcheck::settle(&session, &c.table, &c.acks_file, &c.prefix, SETTLE, setcheck::SetCheck::passed).await {
        Ok(sc) => sc,
        Err(e) => return Outcome::error(&format!("set check of {}", c.table), e),
    };
    if sc.passed() {
        return Outcome::pass(sc.verdict.clone(), Some(consistency_evidence(&sc)), SystemTime::now());
    }
    let mut reasons = Vec::new();
    if sc.lost_count > 0 {
        reasons.push(format!("{} acknowledged event(s) lost, first: {}", sc.lost_count, sc.lost.join(", ")));
    }
    if sc.duplicated_count > 0 {
        reasons.push(format!("{} event(s) stored more than once, first: {}", sc.duplicated_count, sc.duplicated.join(", ")));
    }
    if sc.unexpected_count > 0 {
        reasons.push(format!("{} stored event(s) nobody acknowledged, first: {}", sc.unexpected_count, sc.unexpected.join(", ")));
    }
    Outcome::fail(sc.verdict.clone(), reasons, Some(consistency_evidence(&sc)))
}

fn window_pb(w: &latency::WindowStats) -> pb::WindowStats {
    pb::WindowStats {
        from: Some(timestamp_to_pb(from_ms(w.from_ms))),
        to: Some(timestamp_to_pb(from_ms(w.to_ms))),
        events: w.events,
        throughput_per_s: w.throughput_per_s,
        latency_p50_ms: w.p50_ms,
        latency_p95_ms: w.p95_ms,
        latency_p99_ms: w.p99_ms,
    }
}

/// The limits `after` must meet, from the baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub min_throughput_per_s: f64,
    pub max_p95_ms: f64,
    pub max_p99_ms: f64,
}

pub fn limits(baseline: &latency::WindowStats, pct: f64, slack: Duration) -> Limits {
    let slack = slack.as_secs_f64() * 1000.0;
    let up = |v: f64| (v * (1.0 + pct / 100.0)).max(v + slack);
    Limits {
        min_throughput_per_s: baseline.throughput_per_s * (1.0 - pct / 100.0).max(0.0),
        max_p95_ms: up(baseline.p95_ms),
        max_p99_ms: up(baseline.p99_ms),
    }
}

/// Why `after` is not back to the baseline (empty: it is).
pub fn degradations(base: &latency::WindowStats, after: &latency::WindowStats, lim: &Limits, min_events: u64) -> Vec<String> {
    let mut r = Vec::new();
    if base.events < min_events {
        r.push(format!(
            "the baseline window holds {} event(s), fewer than {min_events}: start the load at least one window before the fault",
            base.events
        ));
        return r;
    }
    if after.events < min_events {
        r.push(format!(
            "the window after recovery holds {} event(s), fewer than {min_events}: keep the load running one window past recovery",
            after.events
        ));
        return r;
    }
    if after.throughput_per_s < lim.min_throughput_per_s {
        r.push(format!(
            "throughput {:.1}/s < {:.1}/s (baseline {:.1}/s)",
            after.throughput_per_s, lim.min_throughput_per_s, base.throughput_per_s
        ));
    }
    if after.p95_ms > lim.max_p95_ms {
        r.push(format!("p95 latency {:.0} ms > {:.0} ms (baseline {:.0} ms)", after.p95_ms, lim.max_p95_ms, base.p95_ms));
    }
    if after.p99_ms > lim.max_p99_ms {
        r.push(format!("p99 latency {:.0} ms > {:.0} ms (baseline {:.0} ms)", after.p99_ms, lim.max_p99_ms, base.p99_ms));
    }
    r
}

async fn check_performance(p: &Performance, fault_start: SystemTime, after_start: SystemTime, tx: &Tx) -> Outcome {
    let after_end = after_start + p.window;
    // Rows written in the window are stored by its end; a moment more for the clock.
    if let Ok(wait) = (after_end + Duration::from_millis(500)).duration_since(SystemTime::now()) {
        progress(tx, format!("performance: measuring the {} after recovery", humantime::format_duration(p.window))).await;
        tokio::time::sleep(wait).await;
    }
    let times = match chaos_probes::bounded("reading event times", Duration::from_secs(30), async {
        let s = cassandra::connect(&p.cassandra).await?;
        cassandra::event_times(&s, &p.table).await
    })
    .await
    {
        Ok(t) => t,
        Err(e) => return Outcome::error(&format!("Cassandra at {}", p.cassandra), e),
    };
    let base = latency::window(&times, ms(fault_start - p.window), ms(fault_start));
    let after = latency::window(&times, ms(after_start), ms(after_end));
    let lim = limits(&base, p.max_degradation_pct, p.latency_slack);
    let reasons = degradations(&base, &after, &lim, p.min_events);
    let ev = Evidence::Performance(pb::PerformanceEvidence {
        baseline: Some(window_pb(&base)),
        after: Some(window_pb(&after)),
        min_throughput_per_s: lim.min_throughput_per_s,
        max_latency_p95_ms: lim.max_p95_ms,
        max_latency_p99_ms: lim.max_p99_ms,
    });
    let summary = format!(
        "baseline {:.1}/s p95 {:.0} ms p99 {:.0} ms; after recovery {:.1}/s p95 {:.0} ms p99 {:.0} ms (margin {}%)",
        base.throughput_per_s, base.p95_ms, base.p99_ms, after.throughput_per_s, after.p95_ms, after.p99_ms, p.max_degradation_pct
    );
    if reasons.is_empty() { Outcome::pass(summary, Some(ev), after_start) } else { Outcome::fail(summary, reasons, Some(ev)) }
}

struct Tracked {
    check: Check,
    result: Option<pb::CheckResult>,
    recovered_at: Option<SystemTime>,
    elapsed: Duration,
    attempts: u32,
    last: Option<Outcome>,
}

fn result_of(t: &Tracked, o: &Outcome) -> pb::CheckResult {
    pb::CheckResult {
        name: t.check.name(),
        verdict: if o.passed { Verdict::Passed } else { Verdict::Failed } as i32,
        summary: o.summary.clone(),
        reasons: o.reasons.clone(),
        elapsed: Some(duration_to_pb(t.elapsed)),
        attempts: t.attempts,
        evidence: o.evidence.clone(),
    }
}

/// Run the plan, streaming progress and results into `tx`; the report last.
pub async fn run(plan: Plan, scenarios: std::sync::Arc<Scenarios>, tx: Tx) {
    let window = match fault_window(&scenarios, &plan.scenario_ids, &tx).await {
        Ok(w) => w,
        Err(s) => {
            let _ = tx.send(Err(s)).await;
            return;
        }
    };
    let mut tracked: Vec<Tracked> = plan
        .checks
        .into_iter()
        .map(|check| Tracked { check, result: None, recovered_at: None, elapsed: Duration::ZERO, attempts: 0, last: None })
        .collect();

    let mut round = 0;
    while round < plan.max_attempts && tracked.iter().any(|t| t.result.is_none()) {
        round += 1;
        if round > 1 {
            let failing: Vec<String> = tracked.iter().filter(|t| t.result.is_none()).map(|t| t.check.name()).collect();
            if !progress(
                &tx,
                format!(
                    "round {round} of {} in {}: {}",
                    plan.max_attempts,
                    humantime::format_duration(plan.retry_interval),
                    failing.join(", ")
                ),
            )
            .await
            {
                return;
            }
            tokio::time::sleep(plan.retry_interval).await;
        }
        for i in 0..tracked.len() {
            if tracked[i].result.is_some() {
                continue;
            }
            let name = tracked[i].check.name();
            if !progress(&tx, format!("checking {name} (round {round})")).await {
                return;
            }
            let started = Instant::now();
            let outcome = match tracked[i].check.clone() {
                Check::Service(_, kind, address) => check_service(kind, &address).await,
                Check::Lag(l) => check_lag(&l, window.reverted_at, window.origin).await,
                Check::Consistency(c) => check_consistency(&c).await,
                Check::Performance(p) => {
                    // The window after recovery starts when the lag drained (or at the revert), and later on a retry.
                    let drained = tracked.iter().find(|t| matches!(t.check, Check::Lag(_))).and_then(|t| t.recovered_at);
                    let after_start = if round == 1 { drained.unwrap_or(window.reverted_at) } else { SystemTime::now() };
                    let fault_start = window.fault_start.unwrap_or(window.reverted_at);
                    check_performance(&p, fault_start, after_start, &tx).await
                }
            };
            let t = &mut tracked[i];
            t.elapsed += started.elapsed();
            t.attempts += 1;
            if outcome.passed {
                let r = result_of(t, &outcome);
                t.recovered_at = outcome.recovered_at;
                t.result = Some(r.clone());
                if !send(&tx, Event::Check(r)).await {
                    return;
                }
            }
            t.last = Some(outcome);
        }
    }
    // What is still failing ends FAILED with its last round's outcome.
    for t in tracked.iter_mut().filter(|t| t.result.is_none()) {
        let o = t.last.take().unwrap_or_else(|| Outcome::fail("not run".into(), vec!["not run".into()], None));
        let r = result_of(t, &o);
        t.result = Some(r.clone());
        if !send(&tx, Event::Check(r)).await {
            return;
        }
    }
    let results: Vec<pb::CheckResult> = tracked.iter().filter_map(|t| t.result.clone()).collect();
    let passed = results.iter().all(|r| r.verdict == Verdict::Passed as i32);
    let reasons: Vec<String> = results.iter().flat_map(|r| r.reasons.iter().map(move |x| format!("{}: {x}", r.name))).collect();
    let recovered = tracked.iter().filter_map(|t| t.recovered_at).max();
    let report = pb::ValidationReport {
        verdict: if passed { Verdict::Passed } else { Verdict::Failed } as i32,
        checks: results,
        reverted_at: Some(timestamp_to_pb(window.reverted_at)),
        recovery_time: if passed {
            recovered.map(|t| duration_to_pb(t.duration_since(window.reverted_at).unwrap_or(Duration::ZERO)))
        } else {
            None
        },
        attempts: round,
        max_attempts: plan.max_attempts,
        reasons,
    };
    info!(passed, rounds = round, "recovery validation done");
    let _ = send(&tx, Event::Report(report)).await;
}

/// The last event of a validation whose task failed (a panic, logged):
/// FAILED, saying why, never a stream that ends with no verdict.
pub fn internal_failure(why: &str) -> pb::ValidationEvent {
    pb::ValidationEvent {
        event: Some(Event::Report(pb::ValidationReport {
            verdict: Verdict::Failed as i32,
            reasons: vec![format!("the validation failed inside the coordinator (a bug, logged there): {why}")],
            ..Default::default()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(events: u64, tput: f64, p95: f64, p99: f64) -> latency::WindowStats {
        latency::WindowStats { from_ms: 0, to_ms: 10_000, events, throughput_per_s: tput, p50_ms: 1.0, p95_ms: p95, p99_ms: p99 }
    }

    #[test]
    fn limits_allow_the_margin_or_the_slack_whichever_is_larger() {
        let l = limits(&w(1000, 100.0, 4.0, 400.0), 50.0, Duration::from_millis(100));
        assert_eq!(l.min_throughput_per_s, 50.0);
        assert_eq!(l.max_p95_ms, 104.0, "slack wins on a small baseline");
        assert_eq!(l.max_p99_ms, 600.0, "margin wins on a large one");
    }

    #[test]
    fn degradations_name_the_numbers() {
        let base = w(1000, 100.0, 4.0, 8.0);
        let lim = limits(&base, 50.0, Duration::from_millis(100));
        assert!(degradations(&base, &w(1000, 99.0, 20.0, 90.0), &lim, 50).is_empty());
        let r = degradations(&base, &w(1000, 40.0, 300.0, 90.0), &lim, 50);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].starts_with("throughput 40.0/s < 50.0/s (baseline 100.0/s)"), "{r:?}");
        assert!(r[1].starts_with("p95 latency 300 ms > 104 ms"), "{r:?}");
        let r = degradations(&base, &w(10, 100.0, 1.0, 1.0), &lim, 50);
        assert!(r[0].contains("after recovery holds 10 event(s)"), "{r:?}");
        let r = degradations(&w(3, 1.0, 1.0, 1.0), &base, &lim, 50);
        assert!(r[0].contains("baseline window holds 3"), "{r:?}");
    }

    fn req() -> pb::ValidateRecoveryRequest {
        pb::ValidateRecoveryRequest {
            services: vec![pb::ServiceCheck {
                name: "kafka".into(),
                kind: pb::ServiceKind::Kafka as i32,
                address: "198.18.200.2:9092".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn plan_errors_name_the_field_and_value() {
        let d = RecoveryDefaults::default();
        let p = Plan::from_request(&req(), d).expect("valid");
        assert_eq!((p.max_attempts, p.retry_interval), (3, Duration::from_secs(5)), "config defaults apply");

        let mut r = req();
        r.services[0].address = "198.18.200.2".into();
        let e = Plan::from_request(&r, d).expect_err("no port");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("services[0].address") && e.message().contains("198.18.200.2"), "{}", e.message());

        let mut r = req();
        r.consistency = Some(pb::ConsistencyCheck {
            acks_file: "/tmp/a".into(),
            cassandra: "h:9042".into(),
            table: "x; DROP".into(),
            ..Default::default()
        });
        let e = Plan::from_request(&r, d).expect_err("bad table");
        assert!(e.message().starts_with("consistency.table"), "{}", e.message());

        let mut r = req();
        r.performance = Some(pb::PerformanceCheck { cassandra: "h:9042".into(), table: "ks.t".into(), ..Default::default() });
        let e = Plan::from_request(&r, d).expect_err("no baseline");
        assert!(e.message().contains("needs scenario_ids"), "{}", e.message());

        let e = Plan::from_request(&pb::ValidateRecoveryRequest::default(), d).expect_err("empty");
        assert!(e.message().contains("nothing to validate"), "{}", e.message());

        let mut r = req();
        r.lag = Some(pb::LagCheck { bootstrap: "h:9092".into(), group: "".into(), topic: "t".into(), ..Default::default() });
        let e = Plan::from_request(&r, d).expect_err("no group");
        assert_eq!(e.message(), "lag.group: required");
    }

    #[tokio::test]
    async fn an_unavailable_service_fails_after_every_round_with_its_reason() {
        // A closed loopback port: refused at once.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        let r = pb::ValidateRecoveryRequest {
            services: vec![pb::ServiceCheck { name: "svc".into(), kind: pb::ServiceKind::Tcp as i32, address: addr.clone() }],
            max_attempts: 2,
            retry_interval: Some(duration_to_pb(Duration::from_millis(10))),
            ..Default::default()
        };
        let plan = Plan::from_request(&r, RecoveryDefaults::default()).expect("plan");
        let registry = std::sync::Arc::new(crate::registry::Registry::new(
            Duration::from_millis(500),
            Default::default(),
            None,
            chaos_proto::trust::ClientTls::Insecure,
        ));
        let store = std::sync::Arc::new(crate::store::Store::in_memory().expect("store"));
        let scenarios = Scenarios::new(Default::default(), registry, store, Default::default());
        let (tx, mut rx) = mpsc::channel(64);
        run(plan, scenarios, tx).await;
        let mut report = None;
        while let Some(Ok(ev)) = rx.recv().await {
            if let Some(Event::Report(r)) = ev.event {
                report = Some(r);
            }
        }
        let report = report.expect("a report");
        assert_eq!(report.verdict, Verdict::Failed as i32);
        assert_eq!((report.attempts, report.max_attempts), (2, 2));
        assert_eq!(report.checks[0].attempts, 2);
        assert!(report.reasons[0].starts_with("availability:svc: ") && report.reasons[0].contains(&addr), "{:?}", report.reasons);
        assert!(report.recovery_time.is_none());
    }
}
