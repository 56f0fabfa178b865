//! `chaos watch` (live view of agents, probes, running scenarios and
//! alerts, from the coordinator's StreamMetrics) and `chaos metrics` (a
//! snapshot from GetMetrics).

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use chaos_proto::pb::{self, coordinator_client::CoordinatorClient, metric_event::Event};
use serde_json::json;

use crate::{
    conn::{coordinator_channel as channel, url},
    fleet::client,
    output::{CliError, Format, emit, emit_json, exit, from_status, key_values, labels_text, rfc3339, table},
    scenario::state_name,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  chaos watch                                   # refreshing view; Ctrl-C to leave
  chaos watch --selector role=kafka --metric host.cpu
  chaos -o json watch --for 30s | jq -c 'select(.type == \"alert\")'
  chaos -o json watch --source probe:kafka --count 5

Columns: CPU and MEM are percentages of the host; NET is bytes/s summed over
the interfaces the agent sees (loopback excluded). A source that stopped
reporting shows STALE with why; a probe of a dead service shows DOWN.")]
pub struct WatchArgs {
    /// Only this source: an agent id or probe:NAME (repeatable).
    #[arg(long = "source", value_name = "SOURCE")]
    sources: Vec<String>,
    /// Only agents with this label (repeatable; probes have none).
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    selector: Vec<String>,
    /// Only metrics whose name starts with this (repeatable; JSON output).
    #[arg(long = "metric", value_name = "PREFIX")]
    metric_prefixes: Vec<String>,
    /// Redraw every this long (table output).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    refresh: Duration,
    /// Stop after this many events (JSON) or redraws (table).
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long.
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    for_: Option<Duration>,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  chaos metrics                                 # the latest value of every metric of every source
  chaos metrics lab-kafka --metric net.         # one agent's network counters
  chaos metrics probe:kafka --history 5         # and the 5 batches before
  chaos -o json metrics | jq '.sources[] | select(.stale)'")]
pub struct MetricsArgs {
    /// Sources: agent ids or probe:NAME. None: all.
    sources: Vec<String>,
    /// Only metrics whose name starts with this (repeatable).
    #[arg(long = "metric", value_name = "PREFIX")]
    metric_prefixes: Vec<String>,
    /// Only agents with this label (repeatable).
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    selector: Vec<String>,
    /// Also this many earlier batches of each source.
    #[arg(long, default_value_t = 0)]
    history: u32,
}

pub fn batch_json(b: &pb::MetricBatch) -> serde_json::Value {
    json!({
        "type": "batch", "source": b.source, "sampled_at": rfc3339(b.sampled_at.as_ref()), "seq": b.seq,
        "stale": b.stale, "error": b.error, "source_labels": b.source_labels,
        "metrics": b.metrics.iter().map(|m| json!({"name": m.name, "labels": m.labels, "value": m.value})).collect::<Vec<_>>(),
    })
}

fn alert_state(s: i32) -> &'static str {
    match pb::AlertState::try_from(s).unwrap_or(pb::AlertState::Unspecified) {
        pb::AlertState::Firing => "firing",
        pb::AlertState::Resolved => "resolved",
        pb::AlertState::Unspecified => "unknown",
    }
}

pub fn alert_json(a: &pb::AlertEvent) -> serde_json::Value {
    json!({
        "type": "alert", "rule": a.rule, "expr": a.expr, "state": alert_state(a.state), "value": a.value, "metric": a.metric,
        "source": a.source, "labels": a.labels, "at": rfc3339(a.at.as_ref()), "scenario_id": a.scenario_id, "message": a.message,
    })
}

/// Compact number: 1234567 -> "1.2M".
fn human(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn value(b: &pb::MetricBatch, name: &str) -> Option<f64> {
    b.metrics.iter().find(|m| m.name == name).map(|m| m.value)
}

fn sum(b: &pb::MetricBatch, name: &str) -> Option<f64> {
    let v: Vec<f64> =
        b.metrics.iter().filter(|m| m.name == name && m.labels.get("iface").map(String::as_str) != Some("lo")).map(|m| m.value).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// The view's state: the latest batch per source and the recent alerts.
#[derive(Default)]
struct View {
    batches: BTreeMap<String, pb::MetricBatch>,
    alerts: Vec<pb::AlertEvent>,
    skipped: u64,
}

impl View {
    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Batch(b) => {
                self.batches.insert(b.source.clone(), b);
            }
            Event::Alert(a) => {
                self.alerts.push(a);
                let n = self.alerts.len();
                if n > 8 {
                    self.alerts.drain(..n - 8);
                }
            }
            Event::Skipped(n) => self.skipped += n,
        }
    }

    fn render(&self, coordinator: &str, running: &[pb::Scenario]) -> String {
        let mut out = format!("chaos watch — {}   {}\n\n", url(coordinator), chrono_now());
        let status = |b: &pb::MetricBatch| {
            if b.stale {
                format!("STALE: {}", b.error)
            } else if !b.error.is_empty() {
                format!("DOWN: {}", b.error)
            } else {
                "ok".into()
            }
        };
        let agents: Vec<Vec<String>> = self
            .batches
            .values()
            .filter(|b| !b.source.starts_with("probe:"))
            .map(|b| {
                let f = |v: Option<f64>, unit: &str| v.map(|v| format!("{}{unit}", human(v))).unwrap_or_else(|| "-".into());
                vec![
                    b.source.clone(),
                    labels_text(&b.source_labels),
                    f(value(b, "host.cpu.used_pct"), "%"),
                    f(value(b, "host.memory.used_pct"), "%"),
                    f(value(b, "host.load1"), ""),
                    f(sum(b, "net.rx_bytes_per_s"), "B/s"),
                    f(sum(b, "net.tx_bytes_per_s"), "B/s"),
                    f(value(b, "agent.faults.active"), ""),
                    status(b),
                ]
            })
            .collect();
        out.push_str(&table(&["AGENT", "LABELS", "CPU", "MEM", "LOAD1", "NET RX", "NET TX", "FAULTS", "STATUS"], &agents));
        let probes: Vec<Vec<String>> = self
            .batches
            .values()
            .filter(|b| b.source.starts_with("probe:"))
            .map(|b| {
                let up = value(b, "probe.up") == Some(1.0) && !b.stale;
                let values: Vec<String> = b
                    .metrics
                    .iter()
                    .filter(|m| !m.name.starts_with("probe.") && m.name != "kafka.lag.partition")
                    .map(|m| format!("{}={}", m.name, human(m.value)))
                    .collect();
                let vals = if up { values.join(" ") } else { "unavailable (-1)".into() };
                vec![
                    b.source.trim_start_matches("probe:").to_string(),
                    if up { "up".into() } else { "DOWN".into() },
                    vals,
                    if up { String::new() } else { status(b) },
                ]
            })
            .collect();
        if !probes.is_empty() {
            out.push_str("\n\n");
            out.push_str(&table(&["PROBE", "STATE", "VALUES", "WHY"], &probes));
        }
        out.push_str("\n\n");
        if running.is_empty() {
            out.push_str("no scenario running");
        } else {
            let rows: Vec<Vec<String>> = running
                .iter()
                .map(|s| {
                    let stop = s.spec.as_ref().map(|x| x.stop_conditions.join("; ")).unwrap_or_default();
                    vec![s.id.clone(), state_name(s.state), s.scenario_type.clone(), s.agents.len().to_string(), stop]
                })
                .collect();
            out.push_str(&table(&["SCENARIO", "STATE", "TYPE", "AGENTS", "STOP IF"], &rows));
        }
        if !self.alerts.is_empty() {
            out.push_str("\n\nrecent alerts:\n");
            for a in &self.alerts {
                out.push_str(&format!("  {}  {:<8} {}\n", rfc3339(a.at.as_ref()).unwrap_or_default(), alert_state(a.state), a.message));
            }
        }
        if self.skipped > 0 {
            out.push_str(&format!("\n({} updates skipped: this terminal read too slowly)", self.skipped));
        }
        out
    }
}

fn chrono_now() -> String {
    rfc3339(Some(&chaos_proto::convert::timestamp_to_pb(std::time::SystemTime::now()))).unwrap_or_default()
}

pub async fn watch(coordinator: &str, timeout: Duration, fmt: Format, a: WatchArgs) -> Result<u8, CliError> {
    if a.refresh < Duration::from_millis(100) {
        return Err(CliError::new(exit::USAGE, format!("--refresh: at least 100ms, got {}", humantime::format_duration(a.refresh))));
    }
    let server = format!("coordinator {}", url(coordinator));
    let req = pb::StreamMetricsRequest {
        sources: a.sources.clone(),
        source_labels: key_values("--selector", &a.selector)?,
        metric_prefixes: a.metric_prefixes.clone(),
        ..Default::default()
    };
    // The stream lives until stopped: no per-call deadline on it.
    let mut c = CoordinatorClient::new(channel(coordinator, Duration::from_secs(365 * 24 * 3600))?);
    let mut stream = c.stream_metrics(req).await.map_err(|s| from_status(&server, s))?.into_inner();
    let until = a.for_.map(|d| Instant::now() + d);
    let mut view = View::default();
    let mut running = Vec::new();
    let mut n = 0u64;
    let tty = std::io::stdout().is_terminal();
    let mut redraw = tokio::time::interval(a.refresh);
    let mut scenarios_at = Instant::now() - Duration::from_secs(10);
    loop {
        let deadline = until.map(tokio::time::Instant::from_std);
        let ended = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ended => return Ok(exit::OK),
            _ = tokio::signal::ctrl_c() => return Ok(exit::OK),
            msg = stream.message() => {
                let Some(ev) = msg.map_err(|s| from_status(&server, s))?.and_then(|e| e.event) else {
                    return Err(CliError::new(exit::UNREACHABLE, format!("{server} ended the metric stream")));
                };
                if fmt == Format::Json {
                    let v = match &ev {
                        Event::Batch(b) => batch_json(b),
                        Event::Alert(al) => alert_json(al),
                        Event::Skipped(k) => json!({"type": "skipped", "batches": k}),
                    };
                    emit(&v.to_string());
                    n += 1;
                    if a.count.is_some_and(|c| n >= c) {
                        return Ok(exit::OK);
                    }
                }
                view.apply(ev);
            }
            _ = redraw.tick(), if fmt == Format::Table => {
                if scenarios_at.elapsed() >= Duration::from_secs(2) {
                    let req = pb::ListScenariosRequest { states: vec![pb::ScenarioState::Running as i32, pb::ScenarioState::Reverting as i32], limit: 50 };
                    // A slow coordinator leaves the last list on screen.
                    if let Ok(r) = client(coordinator, timeout)?.list_scenarios(req).await {
                        running = r.into_inner().scenarios;
                    }
                    scenarios_at = Instant::now();
                }
                let frame = view.render(coordinator, &running);
                let mut out = std::io::stdout().lock();
                // Clear and home on a terminal; frames one after another otherwise.
                let _ = if tty { writeln!(out, "\x1b[2J\x1b[H{frame}") } else { writeln!(out, "{frame}\n") };
                let _ = out.flush();
                n += 1;
                if a.count.is_some_and(|c| n >= c) {
                    return Ok(exit::OK);
                }
            }
        }
    }
}

pub async fn metrics(coordinator: &str, timeout: Duration, fmt: Format, a: MetricsArgs) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let req = pb::GetMetricsRequest {
        sources: a.sources.clone(),
        source_labels: key_values("--selector", &a.selector)?,
        metric_prefixes: a.metric_prefixes.clone(),
        history: a.history,
    };
    let r = client(coordinator, timeout)?.get_metrics(req).await.map_err(|s| from_status(&server, s))?.into_inner();
    if r.sources.is_empty() && !a.sources.is_empty() {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("no metrics from {}: see `chaos metrics` for the sources", a.sources.join(", ")),
        ));
    }
    match fmt {
        Format::Json => emit_json(&json!({
            "batches": r.batches.iter().map(batch_json).collect::<Vec<_>>(),
            "firing": r.firing.iter().map(alert_json).collect::<Vec<_>>(),
            "sources": r.sources.iter().map(|s| json!({"source": s.source, "stale": s.stale, "age_s": crate::output::dur_secs(s.age.as_ref()),
                "error": s.error, "batches_received": s.batches_received})).collect::<Vec<_>>(),
        })),
        Format::Table => {
            let rows: Vec<Vec<String>> = r
                .sources
                .iter()
                .map(|s| {
                    let age = crate::output::dur_secs(s.age.as_ref()).map(|a| format!("{a:.1}s")).unwrap_or_else(|| "never".into());
                    vec![
                        s.source.clone(),
                        if s.stale { "STALE".into() } else { "current".into() },
                        age,
                        s.batches_received.to_string(),
                        s.error.clone(),
                    ]
                })
                .collect();
            emit(&table(&["SOURCE", "FRESHNESS", "AGE", "BATCHES", "ERROR"], &rows));
            let rows: Vec<Vec<String>> = r
                .batches
                .iter()
                .flat_map(|b| {
                    let at = rfc3339(b.sampled_at.as_ref()).unwrap_or_default();
                    b.metrics
                        .iter()
                        .map(move |m| vec![b.source.clone(), at.clone(), m.name.clone(), labels_text(&m.labels), format!("{}", m.value)])
                })
                .collect();
            emit("");
            emit(&table(&["SOURCE", "SAMPLED", "METRIC", "LABELS", "VALUE"], &rows));
            for f in &r.firing {
                emit(&format!("\nFIRING {}", f.message));
            }
        }
    }
    Ok(exit::OK)
}
