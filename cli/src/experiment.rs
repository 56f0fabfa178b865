//! Experiments as code: a YAML file (`version: 1`) with a steady-state
//! hypothesis, a method (fault steps run as coordinator scenarios, and
//! waits), stop conditions and the metrics to report; `chaos run FILE`
//! checks it, shows the plan (admission dry runs), runs it with live
//! progress, and writes a report directory (JSON, Markdown, an SVG plot of
//! the metrics with the fault windows shaded).
//!
//! Every error in the file names the file, the line and column, and the key:
//! values are checked while they are read (durations, rules, fault flags),
//! so the YAML parser's position is the value's own.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use chaos_proto::{
    convert::duration_to_pb,
    pb::{self, ScenarioState, SelectionMode},
    rules::Rule,
    spec::scenario_is_final,
};
use clap::Parser;
use serde::{Deserialize, Deserializer, de};
use serde_json::json;

use crate::{
    agent::FaultArgs,
    fleet::client,
    output::{CliError, emit, exit, from_status},
    scenario::{request, state_name},
    url,
};

/// A duration written as text (`30s`, `2m`) or whole seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration like 30s, 2m or 500ms")
            }
            fn visit_u64<E: de::Error>(self, s: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(s)))
            }
            fn visit_i64<E: de::Error>(self, s: i64) -> Result<HumanDuration, E> {
                u64::try_from(s)
                    .map(|s| HumanDuration(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("must not be negative, got {s}")))
            }
            fn visit_str<E: de::Error>(self, t: &str) -> Result<HumanDuration, E> {
                if t.trim_start().starts_with('-') {
                    return Err(E::custom(format!("must not be negative, got {t:?}")));
                }
                humantime::parse_duration(t.trim())
                    .map(HumanDuration)
                    .map_err(|e| E::custom(format!("invalid duration {t:?} ({e}); use e.g. 30s, 2m, 500ms")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parse a string value inside the YAML parser's visit of it, so an error
/// carries the value's own line and column.
fn parse_str<'de, D: Deserializer<'de>, T>(d: D, what: &'static str, f: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error> {
    struct V<F>(&'static str, F);
    impl<T, F: FnOnce(&str) -> Result<T, String>> de::Visitor<'_> for V<F> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            (self.1)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V(what, f))
}

/// A monitoring rule, parsed as it is read.
#[derive(Debug, Clone)]
pub struct RuleText(pub Rule);

impl<'de> Deserialize<'de> for RuleText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a rule like `probe.up{probe=kafka} >= 1`", |s| Rule::parse(s).map(RuleText))
    }
}

/// A fault written as the flags of `chaos agent apply` (without --duration).
#[derive(Debug, Clone)]
pub struct FaultText {
    pub text: String,
    pub spec: Box<pb::FaultSpec>,
}

#[derive(Debug, Parser)]
#[command(name = "fault", no_binary_name = true, disable_help_flag = true)]
struct FaultLine {
    #[command(flatten)]
    fault: FaultArgs,
}

/// A fault from the flags of `chaos agent apply` (without --duration), e.g.
/// `--pause-name java`; the error quotes the text and the first clap line.
pub fn fault_from_flags(text: &str) -> Result<pb::FaultSpec, String> {
    let line = FaultLine::try_parse_from(text.split_whitespace()).map_err(|e| {
        let first = e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
        format!("fault {text:?}: {first} (the flags of `chaos agent apply`, e.g. \"--pause-name java\")")
    })?;
    line.fault.spec().map_err(|e| format!("fault {text:?}: {}", e.message))
}

impl<'de> Deserialize<'de> for FaultText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "the flags of `chaos agent apply`, e.g. \"--pause-name java\"", |text| {
            Ok(FaultText { text: text.to_string(), spec: Box::new(fault_from_flags(text)?) })
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    All,
    One,
}

/// One step of the method: a fault (run as a scenario) or a wait.
#[derive(Debug, Clone)]
pub enum Step {
    Fault {
        name: String,
        fault: FaultText,
        selector: BTreeMap<String, String>,
        agent_ids: Vec<String>,
        mode: Mode,
        duration: Duration,
        severity: u32,
        stop_conditions: Vec<RuleText>,
    },
    Wait {
        name: String,
        wait: Duration,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default)]
    name: String,
    fault: Option<FaultText>,
    wait: Option<HumanDuration>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    agent_ids: Vec<String>,
    #[serde(default)]
    mode: Mode,
    duration: Option<HumanDuration>,
    #[serde(default)]
    severity: u32,
    #[serde(default)]
    stop_conditions: Vec<RuleText>,
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = RawStep::deserialize(d)?;
        if r.severity > 5 {
            return Err(de::Error::custom(format!("severity: must be 1..5 (0: the coordinator's default), got {}", r.severity)));
        }
        match (r.fault, r.wait) {
            (Some(fault), None) => {
                let duration = r.duration.ok_or_else(|| de::Error::custom("a fault step needs `duration` (how long the fault holds)"))?.0;
                if duration.is_zero() {
                    return Err(de::Error::custom("duration: must be > 0"));
                }
                let name = if r.name.is_empty() { fault.text.clone() } else { r.name };
                Ok(Step::Fault {
                    name,
                    fault,
                    selector: r.selector,
                    agent_ids: r.agent_ids,
                    mode: r.mode,
                    duration,
                    severity: r.severity,
                    stop_conditions: r.stop_conditions,
                })
            }
            (None, Some(w)) => Ok(Step::Wait {
                name: if r.name.is_empty() { format!("wait {}", humantime::format_duration(w.0)) } else { r.name },
                wait: w.0,
            }),
            (Some(_), Some(_)) => Err(de::Error::custom("a step is either a `fault` or a `wait`, not both")),
            (None, None) => Err(de::Error::custom("a step needs `fault` (with `duration`) or `wait`")),
        }
    }
}

/// What the report plots.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    /// Metric names to record and plot (every series of each).
    #[serde(default)]
    pub metrics: Vec<String>,
}

/// A parsed, checked experiment file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub version: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Rules that must hold before the method, and again within `recovery_timeout` after it.
    #[serde(default)]
    pub steady_state: Vec<RuleText>,
    #[serde(default = "default_recovery")]
    pub recovery_timeout: HumanDuration,
    pub method: Vec<Step>,
    /// Rules that abort the running step (its scenario) when they fire.
    #[serde(default)]
    pub stop_conditions: Vec<RuleText>,
    #[serde(default)]
    pub report: ReportSpec,
}

fn default_recovery() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// Parse an experiment from its text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Experiment, String> {
    let e: Experiment = serde_yaml_ng::from_str(text).map_err(|e| {
        let msg = e.to_string();
        // The position goes in front, file:line:column, as compilers write it.
        let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m).to_string();
        match e.location() {
            Some(l) => format!("{file}:{}:{}: {msg}", l.line(), l.column()),
            None => format!("{file}: {msg}"),
        }
    })?;
    if e.version != 1 {
        return Err(format!("{file}: version: this chaos understands version 1, got {}", e.version));
    }
    if e.name.trim().is_empty() {
        return Err(format!("{file}: name: must not be empty"));
    }
    if e.method.is_empty() {
        return Err(format!("{file}: method: needs at least one step"));
    }
    Ok(e)
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The hypothesis held before and after.
    Held,
    /// It did not hold (before: the method never ran; after: not within recovery_timeout).
    Deviated,
    /// A stop condition, a safety rule or Ctrl-C ended the method early (faults reverted).
    Aborted,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Held => "HELD",
            Verdict::Deviated => "DEVIATED",
            Verdict::Aborted => "ABORTED",
        }
    }
    fn code(self) -> u8 {
        match self {
            Verdict::Held => exit::OK,
            Verdict::Deviated => exit::DEVIATED,
            Verdict::Aborted => exit::ABORTED,
        }
    }
}

pub const RUN_HELP: &str = "\
An experiment file (YAML):

  version: 1
  name: kafka-broker-pause
  description: The pipeline keeps every event while the broker hangs for 20 s.
  steady_state:                     # must hold before, and again after (within recovery_timeout)
    - probe.up{probe=kafka} >= 1
    - kafka.lag.total < 1000
  recovery_timeout: 60s
  method:
    - name: pause the broker
      fault: --pause-name java        # the flags of `chaos agent apply`, without --duration
      selector: {role: kafka}         # agents by label (or agent_ids: [..]); mode: all | one
      duration: 20s
      severity: 2
    - wait: 10s
  stop_conditions:                  # abort the running step (faults reverted) when one fires
    - probe.up{probe=cassandra} < 1 for 10s
  report:
    metrics: [kafka.lag.total, probe.up]   # recorded every second and plotted

Every fault step runs as a coordinator scenario, so every safety rule applies.
The run prints the plan (each step's admission), then live progress; Ctrl-C
stops the running scenario (its faults are reverted) and says so. The report
directory (--report-dir/NAME-TIME) holds report.json, report.md and metrics.svg.
Exit: 0 the hypothesis held, 8 it deviated, 9 aborted, 3 a step would be refused,
2 the file is invalid (file:line:column and the key are named).

Examples:
  chaos run deploy/experiments/pause-victim.yaml --dry-run
  chaos run deploy/experiments/lab-kafka-pause.yaml --report-dir /tmp/reports";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The experiment file (YAML, `version: 1`; see deploy/experiments/).
    pub file: PathBuf,
    /// Check the file and show the plan (agents, blast radius, refusals); run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Where the run's report directory goes.
    #[arg(long, default_value = "chaos-reports")]
    pub report_dir: PathBuf,
}

/// One value of one series at one time.
#[derive(Debug, Clone)]
struct Sample {
    t_s: f64,
    series: String,
    /// The metric's name alone.
    name: String,
    value: f64,
}

/// The series name of a metric: `source name{k=v,...}`.
fn series_name(source: &str, m: &pb::Metric) -> String {
    let mut l: Vec<_> = m.labels.iter().collect();
    l.sort();
    let labels: Vec<String> = l.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if labels.is_empty() { format!("{source} {}", m.name) } else { format!("{source} {}{{{}}}", m.name, labels.join(",")) }
}

/// Whether a steady-state rule holds on a snapshot: true for every series it
/// selects, and it selects at least one. Returns the reason otherwise.
fn rule_holds(rule: &Rule, batches: &[pb::MetricBatch]) -> Result<String, String> {
    let mut seen = vec![];
    for b in batches.iter().filter(|b| !b.stale) {
        for m in b.metrics.iter().filter(|m| rule.selects(&b.source, &m.name, &m.labels)) {
            if !rule.breached_by(m.value) {
                return Err(format!("{} = {} (want {})", series_name(&b.source, m), m.value, rule.expr));
            }
            seen.push(format!("{} = {}", series_name(&b.source, m), m.value));
        }
    }
    if seen.is_empty() { Err(format!("no current series matches {}", rule.expr)) } else { Ok(seen.join(", ")) }
}

/// The steady-state check: (all held, per-rule lines).
fn hypothesis(rules: &[RuleText], batches: &[pb::MetricBatch]) -> (bool, Vec<serde_json::Value>) {
    let mut ok = true;
    let lines = rules
        .iter()
        .map(|r| match rule_holds(&r.0, batches) {
            Ok(v) => json!({"rule": r.0.expr, "held": true, "observed": v}),
            Err(why) => {
                ok = false;
                json!({"rule": r.0.expr, "held": false, "observed": why})
            }
        })
        .collect();
    (ok, lines)
}

/// What happened to one step.
#[derive(Debug, Clone)]
struct StepRecord {
    name: String,
    kind: &'static str,
    scenario_id: String,
    state: String,
    reason: String,
    start_s: f64,
    end_s: f64,
    agents: Vec<serde_json::Value>,
}

fn scenario_spec(e: &Experiment, step: &Step) -> Option<pb::ScenarioSpec> {
    let Step::Fault { name, fault, selector, agent_ids, mode, duration, severity, stop_conditions } = step else { return None };
    Some(pb::ScenarioSpec {
        name: format!("{}: {name}", e.name),
        fault: Some((*fault.spec).clone()),
        selector: Some(pb::AgentSelector { labels: selector.clone().into_iter().collect(), agent_ids: agent_ids.clone() }),
        mode: match mode {
            Mode::All => SelectionMode::All,
            Mode::One => SelectionMode::One,
        } as i32,
        duration: Some(duration_to_pb(*duration)),
        severity: *severity,
        stop_conditions: e.stop_conditions.iter().chain(stop_conditions).map(|r| r.0.expr.clone()).collect(),
        ..Default::default()
    })
}

/// The metric names the run samples: the report's and the rules'.
fn watched(e: &Experiment) -> Vec<String> {
    let mut v: Vec<String> = e.report.metrics.clone();
    v.extend(e.steady_state.iter().map(|r| r.0.metric.clone()));
    v.sort();
    v.dedup();
    v
}

struct Runner<'a> {
    e: &'a Experiment,
    /// The metric names each snapshot asks for ([`watched`]).
    prefixes: Vec<String>,
    coordinator: String,
    timeout: Duration,
    t0: Instant,
    samples: Vec<Sample>,
    events: Vec<(f64, String)>,
}

impl Runner<'_> {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn event(&mut self, text: String) {
        emit(&format!("[{:>6.1}s] {text}", self.now()));
        self.events.push((self.now(), text));
    }

    async fn snapshot(&mut self) -> Result<Vec<pb::MetricBatch>, CliError> {
        let server = format!("coordinator {}", url(&self.coordinator));
        let req = pb::GetMetricsRequest { metric_prefixes: self.prefixes.clone(), ..Default::default() };
        let r = client(&self.coordinator, self.timeout)?.get_metrics(req).await.map_err(|s| from_status(&server, s))?.into_inner();
        let t = self.now();
        for b in r.batches.iter().filter(|b| !b.stale) {
            for m in b.metrics.iter().filter(|m| self.e.report.metrics.contains(&m.name)) {
                self.samples.push(Sample { t_s: t, series: series_name(&b.source, m), name: m.name.clone(), value: m.value });
            }
        }
        Ok(r.batches)
    }

    /// A one-line view of the reported metrics: the latest value of each
    /// series, by metric name alone when that is unambiguous (at most 4).
    fn key_metrics(&self) -> String {
        let mut latest: BTreeMap<&str, (&str, f64)> = BTreeMap::new();
        for s in &self.samples {
            latest.insert(&s.series, (&s.name, s.value));
        }
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, _) in latest.values() {
            *names.entry(name).or_default() += 1;
        }
        latest
            .iter()
            .take(4)
            .map(|(series, (name, v))| {
                let label = if names.get(name) == Some(&1) { name } else { series };
                format!("{label}={}", (v * 100.0).round() / 100.0)
            })
            .collect::<Vec<_>>()
            .join("  ")
    }
}

/// `chaos run FILE`.
pub async fn run(coordinator: &str, timeout: Duration, a: RunArgs) -> Result<u8, CliError> {
    let file = a.file.display().to_string();
    let text = std::fs::read_to_string(&a.file).map_err(|e| CliError::new(exit::USAGE, format!("{file}: {e}")))?;
    let e = parse(&file, &text).map_err(|m| CliError::new(exit::USAGE, m))?;
    let server = format!("coordinator {}", url(coordinator));
    let faults = e.method.iter().filter(|s| matches!(s, Step::Fault { .. })).count();
    emit(&format!("experiment {} ({} step(s), {faults} fault(s)) against {}", e.name, e.method.len(), url(coordinator)));
    if !e.description.is_empty() {
        emit(&format!("  {}", e.description.trim()));
    }
    // The plan: each fault step's admission as a dry run.
    let mut refused = false;
    for (i, step) in e.method.iter().enumerate() {
        match (step, scenario_spec(&e, step)) {
            (Step::Wait { name, wait }, _) => emit(&format!("  {}. {name}: wait {}", i + 1, humantime::format_duration(*wait))),
            (Step::Fault { name, duration, .. }, Some(spec)) => {
                let r = client(coordinator, timeout)?
                    .create_scenario(request(pb::CreateScenarioRequest { spec: Some(spec), dry_run: true }))
                    .await
                    .map_err(|s| from_status(&server, s))?
                    .into_inner();
                let adm = r.admission.unwrap_or_default();
                let radius = adm
                    .blast_radius
                    .as_ref()
                    .map(|b| format!("{:.0} % of the fleet (limit {:.0} %)", b.fraction * 100.0, b.limit * 100.0))
                    .unwrap_or_default();
                emit(&format!(
                    "  {}. {name}: {} for {} on {} agent(s) [{}], severity {}, blast radius {radius}{}",
                    i + 1,
                    adm.scenario_type,
                    humantime::format_duration(*duration),
                    adm.selected_agent_ids.len(),
                    adm.selected_agent_ids.join(", "),
                    adm.severity,
                    if adm.queued { " (would queue)" } else { "" }
                ));
                for r in &adm.refusals {
                    emit(&format!("     REFUSED: {r}"));
                    refused = true;
                }
            }
            (Step::Fault { .. }, None) => {}
        }
    }
    for r in &e.steady_state {
        emit(&format!("  steady state: {}", r.0.expr));
    }
    for r in &e.stop_conditions {
        emit(&format!("  stop if: {}", r.0.expr));
    }
    if refused {
        emit("the coordinator would refuse a step: nothing run");
        return Ok(exit::REFUSED);
    }
    if a.dry_run {
        emit("dry run: nothing run");
        return Ok(exit::OK);
    }

    let mut r = Runner {
        e: &e,
        prefixes: watched(&e),
        coordinator: coordinator.to_string(),
        timeout,
        t0: Instant::now(),
        samples: vec![],
        events: vec![],
    };
    let started_at = SystemTime::now();
    let before = r.snapshot().await?;
    let (held_before, before_lines) = hypothesis(&e.steady_state, &before);
    r.event(format!("steady state before: {}", if held_before { "holds" } else { "DOES NOT HOLD" }));
    let mut steps: Vec<StepRecord> = vec![];
    let mut verdict = if held_before { Verdict::Held } else { Verdict::Deviated };
    let mut abort_reason = String::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut interrupted = false;
    if held_before {
        'steps: for (i, step) in e.method.iter().enumerate() {
            let label = format!("step {}/{}", i + 1, e.method.len());
            match step {
                Step::Wait { name, wait } => {
                    let start = r.now();
                    r.event(format!("{label} {name}"));
                    let until = Instant::now() + *wait;
                    while Instant::now() < until {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1).min(until - Instant::now())) => {}
                            _ = &mut ctrl_c => { interrupted = true; }
                        }
                        if interrupted {
                            abort_reason = "Ctrl-C".into();
                            verdict = Verdict::Aborted;
                            break 'steps;
                        }
                        r.snapshot().await?;
                        emit(&format!("  {label} {name}: {:.0}s left  {}", (until - Instant::now()).as_secs_f64(), r.key_metrics()));
                    }
                    steps.push(StepRecord {
                        name: name.clone(),
                        kind: "wait",
                        scenario_id: String::new(),
                        state: "done".into(),
                        reason: String::new(),
                        start_s: start,
                        end_s: r.now(),
                        agents: vec![],
                    });
                }
                Step::Fault { name, duration, .. } => {
                    let Some(spec) = scenario_spec(&e, step) else { continue };
                    let start = r.now();
                    let created = client(coordinator, timeout)?
                        .create_scenario(request(pb::CreateScenarioRequest { spec: Some(spec), dry_run: false }))
                        .await
                        .map_err(|s| from_status(&server, s))?
                        .into_inner();
                    let Some(sc) = created.scenario else {
                        let adm = created.admission.unwrap_or_default();
                        abort_reason = format!("{name}: refused: {}", adm.refusals.join("; "));
                        r.event(abort_reason.clone());
                        verdict = Verdict::Aborted;
                        break 'steps;
                    };
                    r.event(format!("{label} {name}: scenario {} for {}", sc.id, humantime::format_duration(*duration)));
                    let mut last = sc;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = &mut ctrl_c, if !interrupted => {
                                interrupted = true;
                                r.event("Ctrl-C: stopping the running scenario (its faults are reverted)".into());
                                let _ = client(coordinator, timeout)?
                                    .stop_scenario(request(pb::StopScenarioRequest { id: last.id.clone(), reason: "Ctrl-C in chaos run".into() }))
                                    .await;
                            }
                        }
                        last = client(coordinator, timeout)?
                            .get_scenario(pb::GetScenarioRequest { id: last.id.clone() })
                            .await
                            .map_err(|s| from_status(&server, s))?
                            .into_inner();
                        r.snapshot().await?;
                        let left = last
                            .ends_at
                            .as_ref()
                            .map(chaos_proto::convert::timestamp_from_pb)
                            .and_then(|t| t.duration_since(SystemTime::now()).ok())
                            .map_or_else(String::new, |d| format!("{:.0}s left", d.as_secs_f64()));
                        emit(&format!("  {label} {name}: {} {left}  {}", state_name(last.state), r.key_metrics()));
                        if scenario_is_final(last.state) {
                            break;
                        }
                    }
                    let agents = last
                        .agents
                        .iter()
                        .map(|a| json!({"agent_id": a.agent_id, "summary": a.summary, "backend": a.backend, "error": a.error}))
                        .collect();
                    r.event(format!("{label} {name}: {} ({})", state_name(last.state), last.reason));
                    let ok = matches!(ScenarioState::try_from(last.state), Ok(ScenarioState::Completed));
                    steps.push(StepRecord {
                        name: name.clone(),
                        kind: "fault",
                        scenario_id: last.id.clone(),
                        state: state_name(last.state),
                        reason: last.reason.clone(),
                        start_s: start,
                        end_s: r.now(),
                        agents,
                    });
                    if !ok {
                        abort_reason = if interrupted {
                            "Ctrl-C".into()
                        } else {
                            format!("{name}: scenario {} {}: {}", last.id, state_name(last.state), last.reason)
                        };
                        verdict = Verdict::Aborted;
                        break 'steps;
                    }
                }
            }
        }
    }
    // Steady state after, within recovery_timeout.
    let method_end = r.now();
    let (mut held_after, mut after_lines, mut recovery_s) = (false, vec![], None);
    if held_before {
        let deadline = Instant::now() + e.recovery_timeout.0;
        loop {
            let snap = r.snapshot().await?;
            let (ok, lines) = hypothesis(&e.steady_state, &snap);
            after_lines = lines;
            if ok {
                held_after = true;
                recovery_s = Some(r.now() - method_end);
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        r.event(format!(
            "steady state after: {}",
            match recovery_s {
                Some(s) => format!("holds ({s:.1} s after the method)"),
                None => format!("DOES NOT HOLD within {}", humantime::format_duration(e.recovery_timeout.0)),
            }
        ));
        if !held_after && verdict == Verdict::Held {
            verdict = Verdict::Deviated;
        }
    }
    let dir =
        a.report_dir.join(format!("{}-{}", slug(&e.name), humantime::format_rfc3339_seconds(started_at).to_string().replace(':', "")));
    let report = json!({
        "experiment": e.name, "description": e.description, "file": file, "coordinator": url(coordinator),
        "started_at": humantime::format_rfc3339_seconds(started_at).to_string(),
        "duration_s": r.now(),
        "verdict": verdict.as_str(), "abort_reason": abort_reason,
        "steady_state": {"before": {"held": held_before, "rules": before_lines}, "after": {"held": held_after, "rules": after_lines, "recovery_s": recovery_s}},
        "stop_conditions": e.stop_conditions.iter().map(|r| r.0.expr.clone()).collect::<Vec<_>>(),
        "steps": steps.iter().map(|s| json!({"name": s.name, "kind": s.kind, "scenario_id": s.scenario_id, "state": s.state, "reason": s.reason,
            "start_s": s.start_s, "end_s": s.end_s, "agents": s.agents})).collect::<Vec<_>>(),
        "timeline": r.events.iter().map(|(t, m)| json!({"t_s": t, "event": m})).collect::<Vec<_>>(),
        "metrics": series_json(&r.samples),
    });
    write_report(&dir, &report, &steps, &r.samples)
        .map_err(|err| CliError::new(exit::FAILURE, format!("writing the report to {}: {err}", dir.display())))?;
    emit(&format!("verdict: {}{}", verdict.as_str(), if abort_reason.is_empty() { String::new() } else { format!(" ({abort_reason})") }));
    emit(&format!("report: {}", dir.display()));
    Ok(verdict.code())
}

fn slug(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' }).collect()
}

fn series_json(samples: &[Sample]) -> serde_json::Value {
    let mut by: BTreeMap<&str, Vec<[f64; 2]>> = BTreeMap::new();
    for s in samples {
        by.entry(&s.series).or_default().push([s.t_s, s.value]);
    }
    json!(by.into_iter().map(|(k, v)| json!({"series": k, "points": v})).collect::<Vec<_>>())
}

fn write_report(dir: &Path, report: &serde_json::Value, steps: &[StepRecord], samples: &[Sample]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report).unwrap_or_default())?;
    let plotted = plot(&dir.join("metrics.svg"), steps, samples).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("report.md"), markdown(report, plotted))?;
    Ok(())
}

fn markdown(r: &serde_json::Value, plotted: bool) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let mut md = String::new();
    let _ = writeln!(md, "# Experiment {}: {}\n", s(&r["experiment"]), s(&r["verdict"]));
    if !s(&r["description"]).is_empty() {
        let _ = writeln!(md, "{}\n", s(&r["description"]).trim());
    }
    let _ = writeln!(
        md,
        "- file: `{}`\n- coordinator: {}\n- started: {}\n- ran for: {:.1} s",
        s(&r["file"]),
        s(&r["coordinator"]),
        s(&r["started_at"]),
        r["duration_s"].as_f64().unwrap_or(0.0)
    );
    if !s(&r["abort_reason"]).is_empty() {
        let _ = writeln!(md, "- aborted: {}", s(&r["abort_reason"]));
    }
    for when in ["before", "after"] {
        let _ = writeln!(
            md,
            "\n## Steady state {when}: {}\n",
            if r["steady_state"][when]["held"].as_bool() == Some(true) { "held" } else { "did NOT hold" }
        );
        for rule in r["steady_state"][when]["rules"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "- `{}`: {} — {}",
                s(&rule["rule"]),
                if rule["held"].as_bool() == Some(true) { "held" } else { "FAILED" },
                s(&rule["observed"])
            );
        }
    }
    if let Some(rec) = r["steady_state"]["after"]["recovery_s"].as_f64() {
        let _ = writeln!(md, "\nRecovery: the hypothesis held again {rec:.1} s after the method ended.");
    }
    let _ = writeln!(
        md,
        "\n## Method\n\n| step | kind | scenario | state | from s | to s | what the agents did |\n|---|---|---|---|---|---|---|"
    );
    for st in r["steps"].as_array().into_iter().flatten() {
        let did: Vec<String> =
            st["agents"].as_array().into_iter().flatten().map(|a| format!("{}: {}", s(&a["agent_id"]), s(&a["summary"]))).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} |",
            s(&st["name"]),
            s(&st["kind"]),
            s(&st["scenario_id"]),
            s(&st["state"]),
            st["start_s"].as_f64().unwrap_or(0.0),
            st["end_s"].as_f64().unwrap_or(0.0),
            did.join("; ").replace('|', "/")
        );
    }
    let stops: Vec<String> = r["stop_conditions"].as_array().into_iter().flatten().map(|v| format!("`{}`", s(v))).collect();
    if !stops.is_empty() {
        let _ = writeln!(md, "\nStop conditions: {}", stops.join(", "));
    }
    let _ = writeln!(md, "\n## Timeline\n");
    for ev in r["timeline"].as_array().into_iter().flatten() {
        let _ = writeln!(md, "- {:.1} s: {}", ev["t_s"].as_f64().unwrap_or(0.0), s(&ev["event"]));
    }
    if plotted {
        let _ = writeln!(md, "\n## Metrics\n\n![metrics over time, fault windows shaded](metrics.svg)");
    }
    md
}

/// The reported series over time, fault windows shaded. False when there was nothing to plot.
fn plot(path: &Path, steps: &[StepRecord], samples: &[Sample]) -> Result<bool, String> {
    use plotters::prelude::*;
    if samples.is_empty() {
        return Ok(false);
    }
    let t_max = samples.iter().map(|s| s.t_s).fold(1.0, f64::max);
    let (lo, hi) = samples.iter().fold((f64::MAX, f64::MIN), |(a, b), s| (a.min(s.value), b.max(s.value)));
    let (lo, hi) = if (hi - lo).abs() < f64::EPSILON { (lo - 1.0, hi + 1.0) } else { (lo.min(0.0), hi + (hi - lo) * 0.1) };
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("metrics over time (shaded: faults in effect)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, lo..hi)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("seconds since start").draw().map_err(|e| e.to_string())?;
    for s in steps.iter().filter(|s| s.kind == "fault") {
        chart
            .draw_series(std::iter::once(Rectangle::new([(s.start_s, lo), (s.end_s, hi)], RGBColor(255, 200, 200).mix(0.5).filled())))
            .map_err(|e| e.to_string())?;
    }
    let mut by: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples {
        by.entry(&s.series).or_default().push((s.t_s, s.value));
    }
    for (i, (name, pts)) in by.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse("exp.yaml", text).expect_err("must be refused")
    }

    const GOOD: &str = "version: 1
name: pause-kafka
steady_state:
  - probe.up{probe=kafka} >= 1
method:
  - name: pause
    fault: --pause-name java
    selector: {role: kafka}
    duration: 20s
  - wait: 5s
stop_conditions:
  - kafka.lag.total > 1000 for 10s
report:
  metrics: [kafka.lag.total]
";

    #[test]
    fn a_good_file_parses_into_steps_with_their_specs() {
        let e = parse("exp.yaml", GOOD).expect("parse");
        assert_eq!(e.method.len(), 2);
        let Step::Fault { fault, duration, selector, .. } = &e.method[0] else { panic!("fault step") };
        assert!(matches!(fault.spec.fault, Some(pb::fault_spec::Fault::ProcessPause(_))));
        assert_eq!(*duration, Duration::from_secs(20));
        assert_eq!(selector.get("role").map(String::as_str), Some("kafka"));
        assert!(matches!(e.method[1], Step::Wait { wait, .. } if wait == Duration::from_secs(5)));
        let spec = scenario_spec(&e, &e.method[0]).expect("spec");
        assert_eq!(spec.stop_conditions, vec!["kafka.lag.total > 1000 for 10s".to_string()]);
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let e = err(&GOOD.replace("    selector: {role: kafka}", "    selektor: {role: kafka}"));
        assert!(e.starts_with("exp.yaml:8:") && e.contains("unknown field `selektor`"), "{e}");
        let e = err(&GOOD.replace("duration: 20s", "duration: -5s"));
        assert!(e.starts_with("exp.yaml:9:") && e.contains("must not be negative"), "{e}");
        let e = err(&GOOD.replace("duration: 20s", "duration: [1]"));
        assert!(e.starts_with("exp.yaml:9:") && e.contains("expected a duration"), "{e}");
        let e = err(&GOOD.replace("--pause-name java", "--explode java"));
        assert!(e.starts_with("exp.yaml:7:") && e.contains("--explode"), "{e}");
        let e = err(&GOOD.replace("probe.up{probe=kafka} >= 1", "probe.up{probe=kafka} about 1"));
        assert!(e.starts_with("exp.yaml:4:") && e.contains("no comparison"), "{e}");
        let e = err(&GOOD.replace("version: 1", "version: 2"));
        assert!(e.contains("version") && e.contains("got 2"), "{e}");
        let e = err(&GOOD.replace("  - wait: 5s\n", "  - name: nothing\n"));
        assert!(e.starts_with("exp.yaml:") && e.contains("needs `fault`"), "{e}");
        let e = err(&GOOD.replace("name: pause-kafka", "name: [x]"));
        assert!(e.starts_with("exp.yaml:2:"), "{e}");
    }

    #[test]
    fn the_shipped_experiment_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/experiments");
        let mut n = 0;
        for f in std::fs::read_dir(&dir).expect("deploy/experiments").flatten() {
            let text = std::fs::read_to_string(f.path()).expect("read");
            parse(&f.path().display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
        assert!(n >= 3, "experiment files shipped: {n}");
    }

    #[test]
    fn the_hypothesis_needs_a_matching_series_that_satisfies_the_rule() {
        let batch = |v: f64| pb::MetricBatch {
            source: "probe:kafka".into(),
            metrics: vec![pb::Metric { name: "probe.up".into(), labels: [("probe".to_string(), "kafka".to_string())].into(), value: v }],
            ..Default::default()
        };
        let rule = RuleText(Rule::parse("probe.up{probe=kafka} >= 1").expect("rule"));
        assert!(hypothesis(std::slice::from_ref(&rule), &[batch(1.0)]).0);
        let (ok, lines) = hypothesis(std::slice::from_ref(&rule), &[batch(0.0)]);
        assert!(!ok && lines[0]["observed"].as_str().is_some_and(|o| o.contains("= 0")), "{lines:?}");
        assert!(!hypothesis(&[rule], &[]).0, "no data is not a steady state");
    }

    #[test]
    fn the_plot_is_an_svg_with_the_fault_window_shaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let steps = vec![StepRecord {
            name: "pause".into(),
            kind: "fault",
            scenario_id: "s1".into(),
            state: "completed".into(),
            reason: String::new(),
            start_s: 2.0,
            end_s: 5.0,
            agents: vec![],
        }];
        let samples: Vec<Sample> =
            (0..10).map(|i| Sample { t_s: f64::from(i), series: "a x".into(), name: "x".into(), value: f64::from(i % 3) }).collect();
        assert!(plot(&dir.path().join("m.svg"), &steps, &samples).expect("plot"));
        let svg = std::fs::read_to_string(dir.path().join("m.svg")).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("<rect") && svg.contains("<polyline"), "{}", &svg[..200.min(svg.len())]);
        assert!(!plot(&dir.path().join("n.svg"), &steps, &[]).expect("nothing"));
    }
}
