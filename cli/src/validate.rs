//! `chaos validate`: did the pipeline recover? Asks the coordinator's
//! `ValidateRecovery` and shows its progress and verdict.

use std::time::Duration;

use chaos_proto::{
    convert::duration_to_pb,
    pb::{self, Verdict, check_result::Evidence, coordinator_client::CoordinatorClient, validation_event::Event},
};
use serde_json::{Value, json};

use crate::{
    conn::{coordinator_channel as channel, request, url},
    output::{CliError, Format, dur, dur_secs, emit, emit_json, exit, from_status, rfc3339, table},
};

const HELP: &str = "\
Checks, in order (each retried up to --attempts rounds, then FAILED with its reasons):
  availability  every --kafka (broker metadata), --cassandra (a CQL query), --tcp (connect) answers
  lag           the consumer group's lag drains to --max-lag; recovery time measured from the revert
  consistency   every id in --acks-file is stored exactly once (lost / duplicated / unexpected)
  performance   throughput and p95/p99 latency after recovery within --max-degradation-pct of the
                window before the fault (needs --scenario, and load running before and after)

Examples (the lab):
  chaos --coordinator http://198.18.200.1:50061 validate --lab --scenario SCENARIO_ID
  chaos --coordinator http://198.18.200.1:50061 validate --lab --acks-file /tmp/acks --performance --scenario ID

Exit code 0 when every check passed, 1 when one failed.";

#[derive(Debug, clap::Args)]
#[command(after_help = HELP)]
pub struct ValidateArgs {
    /// The lab's services: Kafka 198.18.200.2:9092, Cassandra 198.18.200.3:9042, group
    /// chaos-processor on chaos-logs, table chaos_lab.events (flags given too take precedence).
    #[arg(long)]
    lab: bool,
    /// A Kafka broker that must answer (host:port); the first is also the lag check's bootstrap.
    #[arg(long)]
    kafka: Vec<String>,
    /// A Cassandra node that must answer a CQL query (host:port); the first serves the data checks.
    #[arg(long)]
    cassandra: Vec<String>,
    /// A TCP service that must accept: NAME=HOST:PORT.
    #[arg(long, value_parser = parse_tcp)]
    tcp: Vec<(String, String)>,
    /// Consumer group whose lag must drain (enables the lag check).
    #[arg(long)]
    group: Option<String>,
    /// Topic of the lag check.
    #[arg(long)]
    topic: Option<String>,
    /// Drained at or below this many messages.
    #[arg(long, default_value_t = 50)]
    max_lag: u64,
    /// How long a round waits for the drain [default: the coordinator's recovery.recovery_timeout].
    #[arg(long, value_parser = humantime::parse_duration)]
    lag_timeout: Option<Duration>,
    /// File (on the coordinator's host) of acknowledged event ids, one per line (enables the
    /// consistency check).
    #[arg(long)]
    acks_file: Option<String>,
    /// Only stored events whose id starts with this (one run's events; the collector's --run-id).
    #[arg(long, default_value = "")]
    event_id_prefix: String,
    /// KEYSPACE.TABLE of the stored events.
    #[arg(long)]
    table: Option<String>,
    /// Compare throughput and latency after recovery with the baseline before the fault.
    #[arg(long)]
    performance: bool,
    /// Length of the baseline window and of the window after recovery.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Allowed throughput drop and latency rise, percent of the baseline.
    #[arg(long, default_value_t = 50.0)]
    max_degradation_pct: f64,
    /// Latency rise always tolerated.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    latency_slack: Duration,
    /// Scenario whose fault is validated (repeatable): recovery time counts from its revert.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Rounds before FAILED [default: the coordinator's recovery.max_recovery_attempts].
    #[arg(long)]
    attempts: Option<u32>,
    /// Pause between rounds [default: the coordinator's recovery.health_check_interval].
    #[arg(long, value_parser = humantime::parse_duration)]
    retry_interval: Option<Duration>,
}

fn parse_tcp(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(n, a)| (n.to_string(), a.to_string())).ok_or_else(|| format!("expected NAME=HOST:PORT, got {s:?}"))
}

impl ValidateArgs {
    pub fn to_request(&self) -> Result<pb::ValidateRecoveryRequest, CliError> {
        let or_lab = |v: &Option<String>, lab: &str| v.clone().or_else(|| self.lab.then(|| lab.to_string()));
        let mut kafka = self.kafka.clone();
        let mut cassandra = self.cassandra.clone();
        if self.lab {
            if kafka.is_empty() {
                kafka.push(chaos_lab::kafka_bootstrap());
            }
            if cassandra.is_empty() {
                cassandra.push(chaos_lab::cassandra_contact());
            }
        }
        let mut services: Vec<pb::ServiceCheck> = Vec::new();
        let svc = |name: &str, kind: pb::ServiceKind, address: &str| pb::ServiceCheck {
            name: name.to_string(),
            kind: kind as i32,
            address: address.to_string(),
        };
        services.extend(kafka.iter().map(|a| svc("kafka", pb::ServiceKind::Kafka, a)));
        services.extend(cassandra.iter().map(|a| svc("cassandra", pb::ServiceKind::Cassandra, a)));
        services.extend(self.tcp.iter().map(|(n, a)| svc(n, pb::ServiceKind::Tcp, a)));
        let need = |what: &str, v: Option<&String>| {
            v.cloned().ok_or_else(|| CliError::new(exit::USAGE, format!("{what} is needed (or --lab for the lab's)")))
        };
        let group = or_lab(&self.group, chaos_lab::GROUP);
        let lag = match group {
            None => None,
            Some(group) => Some(pb::LagCheck {
                bootstrap: need("--kafka", kafka.first())?,
                group,
                topic: need("--topic", or_lab(&self.topic, chaos_lab::TOPIC).as_ref())?,
                max_lag: self.max_lag,
                timeout: self.lag_timeout.map(duration_to_pb),
            }),
        };
        let table = or_lab(&self.table, chaos_lab::EVENTS_TABLE);
        let consistency = match &self.acks_file {
            None => None,
            Some(f) => {
                // The coordinator reads the file: give it an absolute path.
                let path = std::path::absolute(f).map_err(|e| CliError::new(exit::USAGE, format!("--acks-file {f:?}: {e}")))?;
                Some(pb::ConsistencyCheck {
                    acks_file: path.display().to_string(),
                    cassandra: need("--cassandra", cassandra.first())?,
                    table: need("--table", table.as_ref())?,
                    event_id_prefix: self.event_id_prefix.clone(),
                })
            }
        };
        let performance = if self.performance {
            Some(pb::PerformanceCheck {
                cassandra: need("--cassandra", cassandra.first())?,
                table: need("--table", table.as_ref())?,
                window: Some(duration_to_pb(self.window)),
                max_degradation_pct: self.max_degradation_pct,
                latency_slack: Some(duration_to_pb(self.latency_slack)),
                min_events: 0,
            })
        } else {
            None
        };
        Ok(pb::ValidateRecoveryRequest {
            services,
            lag,
            consistency,
            performance,
            scenario_ids: self.scenarios.clone(),
            max_attempts: self.attempts.unwrap_or(0),
            retry_interval: self.retry_interval.map(duration_to_pb),
        })
    }
}

pub fn verdict_name(v: i32) -> &'static str {
    match Verdict::try_from(v) {
        Ok(Verdict::Passed) => "PASSED",
        Ok(Verdict::Failed) => "FAILED",
        _ => "-",
    }
}

fn window_json(w: Option<&pb::WindowStats>) -> Value {
    w.map(|w| {
        json!({"from": rfc3339(w.from.as_ref()), "to": rfc3339(w.to.as_ref()), "events": w.events, "throughput_per_s": w.throughput_per_s,
            "latency_p50_ms": w.latency_p50_ms, "latency_p95_ms": w.latency_p95_ms, "latency_p99_ms": w.latency_p99_ms})
    })
    .unwrap_or(Value::Null)
}

pub fn check_json(c: &pb::CheckResult) -> Value {
    let evidence = match &c.evidence {
        Some(Evidence::Lag(l)) => {
            json!({"lag": {"initial_lag": l.initial_lag, "final_lag": l.final_lag, "topic_messages": l.topic_messages,
            "drained_at": rfc3339(l.drained_at.as_ref()), "recovery_time_s": dur_secs(l.recovery_time.as_ref()),
            "partitions": l.partitions.iter().map(|p| json!({"partition": p.partition, "low_offset": p.low_offset,
                "high_offset": p.high_offset, "committed_offset": p.committed_offset, "lag": p.lag})).collect::<Vec<_>>()}})
        }
        Some(Evidence::Consistency(s)) => json!({"consistency": {"acknowledged": s.acknowledged, "stored_rows": s.stored_rows, "ok": s.ok,
            "lost_count": s.lost_count, "duplicated_count": s.duplicated_count, "unexpected_count": s.unexpected_count,
            "lost": s.lost, "duplicated": s.duplicated, "unexpected": s.unexpected}}),
        Some(Evidence::Performance(p)) => json!({"performance": {"baseline": window_json(p.baseline.as_ref()),
            "after": window_json(p.after.as_ref()), "min_throughput_per_s": p.min_throughput_per_s,
            "max_latency_p95_ms": p.max_latency_p95_ms, "max_latency_p99_ms": p.max_latency_p99_ms}}),
        None => Value::Null,
    };
    json!({"name": c.name, "verdict": verdict_name(c.verdict), "summary": c.summary, "reasons": c.reasons,
        "elapsed_s": dur_secs(c.elapsed.as_ref()), "attempts": c.attempts, "evidence": evidence})
}

pub fn report_json(r: &pb::ValidationReport) -> Value {
    json!({"verdict": verdict_name(r.verdict), "reverted_at": rfc3339(r.reverted_at.as_ref()),
        "recovery_time_s": dur_secs(r.recovery_time.as_ref()), "attempts": r.attempts, "max_attempts": r.max_attempts,
        "reasons": r.reasons, "checks": r.checks.iter().map(check_json).collect::<Vec<_>>()})
}

/// Run the validation, calling `on_event` for progress and check results; the report.
pub async fn validate(
    coordinator: &str,
    req: pb::ValidateRecoveryRequest,
    mut on_event: impl FnMut(&Event),
) -> Result<pb::ValidationReport, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    // Lag rounds can take minutes: the stream has no per-call deadline.
    let mut c = CoordinatorClient::new(channel(coordinator, Duration::from_secs(365 * 24 * 3600))?);
    let mut stream = c.validate_recovery(request(req)).await.map_err(|s| from_status(&server, s))?.into_inner();
    while let Some(ev) = stream.message().await.map_err(|s| from_status(&server, s))? {
        match ev.event {
            Some(Event::Report(r)) => return Ok(r),
            Some(e) => on_event(&e),
            None => {}
        }
    }
    Err(CliError::new(exit::FAILURE, format!("{server} closed the validation without a report")))
}

pub async fn run(coordinator: &str, fmt: Format, a: ValidateArgs) -> Result<u8, CliError> {
    let req = a.to_request()?;
    let report = validate(coordinator, req, |e| {
        if fmt == Format::Table {
            match e {
                Event::Progress(p) => eprintln!("validate: {p}"),
                Event::Check(c) => eprintln!("validate: {} {}: {}", verdict_name(c.verdict), c.name, c.summary),
                Event::Report(_) => {}
            }
        }
    })
    .await?;
    match fmt {
        Format::Json => emit_json(&report_json(&report)),
        Format::Table => {
            let rows: Vec<Vec<String>> = report
                .checks
                .iter()
                .map(|c| {
                    vec![c.name.clone(), verdict_name(c.verdict).into(), c.attempts.to_string(), dur(c.elapsed.as_ref()), c.summary.clone()]
                })
                .collect();
            emit(&table(&["CHECK", "VERDICT", "ROUNDS", "TIME", "SUMMARY"], &rows));
            for r in &report.reasons {
                emit(&format!("reason: {r}"));
            }
            let rt = report.recovery_time.as_ref().map(|d| format!(", recovered {} after the revert", dur(Some(d)))).unwrap_or_default();
            emit(&format!("VERDICT: {} ({} of {} round(s){rt})", verdict_name(report.verdict), report.attempts, report.max_attempts));
        }
    }
    Ok(if report.verdict == Verdict::Passed as i32 { exit::OK } else { exit::FAILURE })
}
