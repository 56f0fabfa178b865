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
    io::Write as _,
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
    conn::{request, url},
    fleet::client,
    output::{CliError, emit, exit, from_status},
    scenario::state_name,
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
    let line: FaultLine = flags(text, "fault", "`chaos agent apply`, e.g. \"--pause-name java\"")?;
    line.fault.spec().map_err(|e| format!("fault {text:?}: {}", e.message))
}

/// Command-line flags written as one string in the file, parsed by clap;
/// the error quotes the text and clap's first line.
fn flags<T: Parser>(text: &str, what: &str, of: &str) -> Result<T, String> {
    T::try_parse_from(text.split_whitespace()).map_err(|e| {
        let first = e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
        format!("{what} {text:?}: {first} (the flags of {of})")
    })
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

/// One step of the method: a fault (run as a scenario), a wait, or a group
/// of those run in parallel (each from its `after` offset).
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
        /// Start offset: from the start of its parallel group, or a delay before a sequential step.
        after: Duration,
    },
    Wait {
        name: String,
        wait: Duration,
        after: Duration,
    },
    /// Wait until the experiment's load begins producing its phase `phase`:
    /// the method keeps time with the load's own clock, whatever the
    /// producer's start-up took.
    LoadPhase {
        name: String,
        phase: String,
    },
    Parallel {
        name: String,
        steps: Vec<Step>,
    },
}

impl Step {
    fn name(&self) -> &str {
        match self {
            Step::Fault { name, .. } | Step::Wait { name, .. } | Step::LoadPhase { name, .. } | Step::Parallel { name, .. } => name,
        }
    }
    fn after(&self) -> Duration {
        match self {
            Step::Fault { after, .. } | Step::Wait { after, .. } => *after,
            Step::LoadPhase { .. } | Step::Parallel { .. } => Duration::ZERO,
        }
    }
    /// The fault steps in it (itself, or a group's).
    fn faults(&self) -> Vec<&Step> {
        match self {
            Step::Fault { .. } => vec![self],
            Step::Wait { .. } | Step::LoadPhase { .. } => vec![],
            Step::Parallel { steps, .. } => steps.iter().filter(|s| matches!(s, Step::Fault { .. })).collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default)]
    name: String,
    fault: Option<FaultText>,
    wait: Option<HumanDuration>,
    wait_for_load_phase: Option<String>,
    parallel: Option<Vec<Step>>,
    after: Option<HumanDuration>,
    selector: Option<BTreeMap<String, String>>,
    agent_ids: Option<Vec<String>>,
    mode: Option<Mode>,
    duration: Option<HumanDuration>,
    severity: Option<u32>,
    stop_conditions: Option<Vec<RuleText>>,
}

impl RawStep {
    /// The keys given that only a fault step takes.
    fn fault_keys(&self) -> Vec<&'static str> {
        [
            ("selector", self.selector.is_some()),
            ("agent_ids", self.agent_ids.is_some()),
            ("mode", self.mode.is_some()),
            ("duration", self.duration.is_some()),
            ("severity", self.severity.is_some()),
            ("stop_conditions", self.stop_conditions.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, given)| given.then_some(k))
        .collect()
    }
}

/// Refuse keys a step of this kind does not take (they would do nothing).
fn only<E: de::Error>(kind: &str, takes: &str, given: &[&str]) -> Result<(), E> {
    match given {
        [] => Ok(()),
        keys => Err(E::custom(format!("a `{kind}` step takes only {takes}, not `{}`", keys.join("`, `")))),
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Checked inside the visit of the step's mapping, so an error carries
        // the step's own line (not the line of the list it is in).
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Step;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a step: a mapping with `fault`, `wait`, `wait_for_load_phase` or `parallel`")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Step, A::Error> {
                Step::from_raw(RawStep::deserialize(de::value::MapAccessDeserializer::new(map))?)
            }
        }
        d.deserialize_map(V)
    }
}

impl Step {
    fn from_raw<E: de::Error>(r: RawStep) -> Result<Step, E> {
        let given = r.fault_keys();
        let after = r.after.map(|a| a.0).unwrap_or_default();
        match (r.fault, r.wait, r.parallel, r.wait_for_load_phase) {
            (None, None, None, Some(phase)) => {
                let mut given = given;
                if r.after.is_some() {
                    given.insert(0, "after");
                }
                only("wait_for_load_phase", "`name` (it ends when the load's phase begins: put any offset on the next step)", &given)?;
                let name = if r.name.is_empty() { format!("wait for the load's phase {phase}") } else { r.name };
                Ok(Step::LoadPhase { name, phase })
            }
            (Some(fault), None, None, None) => {
                let severity = r.severity.unwrap_or(0);
                if severity > 5 {
                    return Err(E::custom(format!("severity: must be 1..5 (0: the coordinator's default), got {severity}")));
                }
                let duration = r.duration.ok_or_else(|| E::custom("a fault step needs `duration` (how long the fault holds)"))?.0;
                if duration.is_zero() {
                    return Err(E::custom("duration: must be > 0"));
                }
                let name = if r.name.is_empty() { fault.text.clone() } else { r.name };
                Ok(Step::Fault {
                    name,
                    fault,
                    selector: r.selector.unwrap_or_default(),
                    agent_ids: r.agent_ids.unwrap_or_default(),
                    mode: r.mode.unwrap_or_default(),
                    duration,
                    severity,
                    stop_conditions: r.stop_conditions.unwrap_or_default(),
                    after,
                })
            }
            (None, Some(w), None, None) => {
                only("wait", "`name`, `wait` and `after`", &given)?;
                Ok(Step::Wait {
                    name: if r.name.is_empty() { format!("wait {}", humantime::format_duration(w.0)) } else { r.name },
                    wait: w.0,
                    after,
                })
            }
            (None, None, Some(steps), None) => {
                let mut given = given;
                if r.after.is_some() {
                    given.insert(0, "after");
                }
                only("parallel", "`name` and its steps (put `after`, `duration` and targets on each member)", &given)?;
                if steps.is_empty() {
                    return Err(E::custom("parallel: needs at least one step"));
                }
                if steps.iter().any(|s| matches!(s, Step::Parallel { .. })) {
                    return Err(E::custom("parallel: groups do not nest"));
                }
                if steps.iter().any(|s| matches!(s, Step::LoadPhase { .. })) {
                    return Err(E::custom(
                        "parallel: `wait_for_load_phase` is a step of its own, before the group (members start at their `after` offsets)",
                    ));
                }
                let name = if r.name.is_empty() {
                    format!("parallel: {}", steps.iter().map(Step::name).collect::<Vec<_>>().join(" + "))
                } else {
                    r.name
                };
                Ok(Step::Parallel { name, steps })
            }
            (None, None, None, None) => {
                Err(E::custom("a step needs `fault` (with `duration`), `wait`, `wait_for_load_phase` or `parallel`"))
            }
            _ => Err(E::custom("a step is one of `fault`, `wait`, `wait_for_load_phase` or `parallel`, not several")),
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

/// Load during the run: a profile, towards the lab unless `target` says otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    pub profile: Vec<crate::load::Phase>,
    #[serde(default)]
    pub target: crate::load::Target,
    /// How long to wait for the last events to be stored after the run.
    #[serde(default = "default_settle")]
    pub settle: HumanDuration,
}

fn default_settle() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// The recovery checks after the method, as the flags of `chaos validate`.
#[derive(Debug, Clone)]
pub struct ValidationText {
    pub text: String,
    pub request: pb::ValidateRecoveryRequest,
}

#[derive(Debug, Parser)]
#[command(name = "validation", no_binary_name = true, disable_help_flag = true)]
struct ValidationLine {
    #[command(flatten)]
    args: crate::validate::ValidateArgs,
}

impl<'de> Deserialize<'de> for ValidationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "the flags of `chaos validate`, e.g. \"--lab --max-lag 100\"", |text| {
            let line: ValidationLine = flags(text, "validation", "`chaos validate`, e.g. \"--lab --max-lag 100\"")?;
            let request = line.args.to_request().map_err(|e| format!("validation {text:?}: {}", e.message))?;
            Ok(ValidationText { text: text.to_string(), request })
        })
    }
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
    /// Load produced from before the steady-state check until the profile ends.
    pub load: Option<LoadSpec>,
    pub method: Vec<Step>,
    /// Rules that abort the running step (its scenario) when they fire.
    #[serde(default)]
    pub stop_conditions: Vec<RuleText>,
    /// Steps run only when the method was aborted (after its faults were reverted).
    #[serde(default)]
    pub rollbacks: Vec<Step>,
    /// Recovery checks after the method (ValidateRecovery); a failed one makes the verdict DEVIATED.
    pub validation: Option<ValidationText>,
    #[serde(default)]
    pub report: ReportSpec,
}

fn default_recovery() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// Parse an experiment from its text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Experiment, String> {
    let e: Experiment = chaos_proto::files::from_yaml(file, text)?;
    if e.version != 1 {
        return Err(format!("{file}: version: this chaos understands version 1, got {}", e.version));
    }
    if e.name.trim().is_empty() {
        return Err(format!("{file}: name: must not be empty"));
    }
    if e.method.is_empty() {
        return Err(format!("{file}: method: needs at least one step"));
    }
    if let Some(l) = &e.load {
        crate::load::check_profile(&l.profile).map_err(|m| format!("{file}: load.{m}"))?;
        l.target.check().map_err(|m| format!("{file}: {m}"))?;
    }
    for (i, step) in e.method.iter().enumerate() {
        if let Step::LoadPhase { phase, .. } = step {
            let Some(l) = &e.load else {
                return Err(format!("{file}: method[{i}].wait_for_load_phase: {phase:?}: the experiment has no `load:` to wait for"));
            };
            let names: Vec<&str> = l.profile.iter().map(|p| p.phase.as_str()).collect();
            match names.iter().filter(|n| **n == phase).count() {
                1 => {}
                0 => {
                    return Err(format!(
                        "{file}: method[{i}].wait_for_load_phase: no phase {phase:?} in load.profile (its phases: {})",
                        names.join(", ")
                    ));
                }
                n => {
                    return Err(format!(
                        "{file}: method[{i}].wait_for_load_phase: load.profile has {n} phases named {phase:?}; give the one to wait for a name of its own"
                    ));
                }
            }
        }
    }
    if let Some(i) = e.rollbacks.iter().position(|s| matches!(s, Step::LoadPhase { .. })) {
        return Err(format!("{file}: rollbacks[{i}]: `wait_for_load_phase` belongs in the method (rollbacks run after an abort)"));
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
  load:                             # optional: produced from before the steady-state check
    profile:                        #   (towards the lab; `target:` for other lab addresses)
      - {phase: warmup, rate: 50, for: 10s}
      - {phase: baseline, rate: 200, for: 30s}
      - {phase: fault, rate: 200, for: 30s}
  method:
    - wait_for_load_phase: fault      # by the load's own clock: the baseline is measured whole
    - name: pause the broker
      fault: --pause-name java        # the flags of `chaos agent apply`, without --duration
      selector: {role: kafka}         # agents by label (or agent_ids: [..]); mode: all | one
      duration: 20s
      severity: 2
    - parallel:                       # members start together, each at its `after` offset
        - fault: --loss 10%
          selector: {role: processor}
          duration: 10s
        - fault: --cpu 50%
          selector: {role: cassandra}
          after: 5s
          duration: 10s
    - wait: 10s
  stop_conditions:                  # abort the running step (faults reverted) when one fires
    - probe.up{probe=cassandra} < 1 for 10s
  rollbacks:                        # run only after an abort (not after Ctrl-C)
    - fault: --container kafka --action start
      selector: {role: kafka}
      duration: 1s
  validation: --lab --attempts 3    # the flags of `chaos validate`; with load, every acknowledged
                                    # event of the run is checked too (stored exactly once)
  report:
    metrics: [kafka.lag.total, probe.up]   # recorded every second and plotted

Every fault step runs as a coordinator scenario, so every safety rule applies.
The run prints the plan (each step's admission), then live progress; Ctrl-C
stops the running scenarios (their faults are reverted) and says so. The report
directory (--report-dir/NAME-TIME) holds report.json, report.md and metrics.svg:
what was requested and what each agent achieved, the load's throughput and
p50/p95/p99 per phase, the validation's verdicts, the timeline. The run is
indexed in the coordinator (`chaos report` lists runs and renders one again).
With `chaos -o json run`, the plan and the progress go to stderr and stdout
holds one JSON document at the end: the report (as in report.json) with
report_dir and exit_code, or with --dry-run the plan (each step's admission:
agents, severity, blast radius and limit, refusals).
Exit: 0 the hypothesis held, 8 it deviated (steady state or validation), 9
aborted, 3 a step would be refused, 2 the file is invalid (file:line:column and
the key are named).

Examples:
  chaos run deploy/experiments/lab-drill-partition.yaml --dry-run
  chaos run deploy/experiments/lab-drill-kafka-down.yaml --report-dir /tmp/reports";

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

/// A line of the plan or of the progress: stdout for people; stderr with
/// `-o json`, whose stdout carries only the JSON at the end.
fn say(json: bool, text: &str) {
    if json {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{text}");
    } else {
        emit(text);
    }
}

/// Where the phase `phase` is in the load profile, and how far into the profile it is due.
fn load_phase_due(e: &Experiment, phase: &str) -> (usize, Duration) {
    let profile = e.load.as_ref().map(|l| l.profile.as_slice()).unwrap_or_default();
    let index = profile.iter().position(|p| p.phase == phase).unwrap_or(profile.len());
    (index, profile[..index].iter().map(|p| p.duration.0).sum())
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

/// What happened to one step (or one member of a parallel group).
#[derive(Debug, Clone)]
struct StepRecord {
    name: String,
    kind: &'static str,
    /// The fault as requested (the flags), empty for a wait.
    fault: String,
    scenario_id: String,
    state: String,
    reason: String,
    start_s: f64,
    end_s: f64,
    agents: Vec<serde_json::Value>,
}

impl StepRecord {
    fn json(&self) -> serde_json::Value {
        json!({"name": self.name, "kind": self.kind, "fault": self.fault, "scenario_id": self.scenario_id, "state": self.state,
            "reason": self.reason, "start_s": self.start_s, "end_s": self.end_s, "agents": self.agents})
    }
}

/// The scenario of a fault step; `stops`: with the experiment's stop
/// conditions (the method's steps; not the rollbacks, which run after one fired).
fn scenario_spec(e: &Experiment, step: &Step, stops: bool) -> Option<pb::ScenarioSpec> {
    let Step::Fault { name, fault, selector, agent_ids, mode, duration, severity, stop_conditions, .. } = step else { return None };
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
        stop_conditions: e.stop_conditions.iter().filter(|_| stops).chain(stop_conditions).map(|r| r.0.expr.clone()).collect(),
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

fn agents_json(sc: &pb::Scenario) -> Vec<serde_json::Value> {
    sc.agents
        .iter()
        .map(|a| {
            json!({"agent_id": a.agent_id, "summary": a.summary, "backend": a.backend, "error": a.error,
                "achieved": a.achieved.iter().collect::<BTreeMap<_, _>>(), "outcome": a.outcome})
        })
        .collect()
}

/// One member of a group while it runs.
struct Slot<'s> {
    step: &'s Step,
    start_at: Instant,
    started: bool,
    done: bool,
    scenario: Option<pb::Scenario>,
    start_s: f64,
}

type CtrlC = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>>>>;

struct Runner<'a> {
    e: &'a Experiment,
    /// The metric names each snapshot asks for ([`watched`]).
    prefixes: Vec<String>,
    coordinator: String,
    server: String,
    timeout: Duration,
    t0: Instant,
    samples: Vec<Sample>,
    events: Vec<(f64, String)>,
    ctrl_c: CtrlC,
    interrupted: bool,
    /// Running the rollbacks: their scenarios carry no experiment stop conditions.
    rolling_back: bool,
    /// The experiment's load, while it runs.
    load: Option<crate::load::LoadRun>,
    /// The load phase last put on the timeline.
    load_phase: Option<usize>,
    /// `-o json`: progress goes to stderr.
    json: bool,
}

impl Runner<'_> {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn event(&mut self, text: String) {
        say(self.json, &format!("[{:>6.1}s] {text}", self.now()));
        self.events.push((self.now(), text));
    }

    /// Put a load phase that began since the last look on the timeline.
    fn note_load_phase(&mut self) -> Option<crate::load::LoadStatus> {
        let st = self.load.as_ref()?.status()?;
        if st.phase_index.is_some() && st.phase_index != self.load_phase {
            self.load_phase = st.phase_index;
            let p = st.phase_index.and_then(|i| self.e.load.as_ref()?.profile.get(i));
            let what = p.map(|p| format!(" ({}/s for {})", p.rate, humantime::format_duration(p.duration.0))).unwrap_or_default();
            self.event(format!("load: phase {} began{what}", st.phase.clone().unwrap_or_default()));
        }
        Some(st)
    }

    async fn snapshot(&mut self) -> Result<Vec<pb::MetricBatch>, CliError> {
        self.note_load_phase();
        let req = pb::GetMetricsRequest { metric_prefixes: self.prefixes.clone(), ..Default::default() };
        let r = client(&self.coordinator, self.timeout)?.get_metrics(req).await.map_err(|s| from_status(&self.server, s))?.into_inner();
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

    /// Sleep up to `d`; true when Ctrl-C came (once per run).
    async fn sleep_or_interrupt(&mut self, d: Duration) -> bool {
        if self.interrupted {
            tokio::time::sleep(d).await;
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = &mut self.ctrl_c => { self.interrupted = true; true }
        }
    }

    /// Follow the load until it produces its phase number `index` or a later
    /// one: the phase reached (its number and name), or why not (the producer
    /// ended, `within` passed, Ctrl-C). With `progress` (a label), a line each
    /// second with the key metrics.
    async fn until_load_phase(&mut self, index: usize, within: Duration, progress: Option<&str>) -> Result<(usize, String), String> {
        let deadline = Instant::now() + within;
        let mut shown = Instant::now();
        loop {
            let st = self.note_load_phase();
            if let Some(at) = st.as_ref().and_then(|s| s.phase_index).filter(|at| *at >= index) {
                return Ok((at, st.and_then(|s| s.phase).unwrap_or_default()));
            }
            if st.as_ref().is_some_and(|s| s.done) || !self.load.as_mut().is_some_and(|l| l.running()) {
                return Err("the producer ended first".into());
            }
            if Instant::now() >= deadline {
                return Err(format!("not begun within {:.0} s", within.as_secs_f64()));
            }
            if let Some(label) = progress.filter(|_| shown.elapsed() >= Duration::from_secs(1)) {
                shown = Instant::now();
                let at = st.and_then(|s| s.phase).unwrap_or_else(|| "starting".into());
                let metrics = match self.snapshot().await {
                    Ok(_) => self.key_metrics(),
                    Err(e) => format!("(metrics: {})", e.message),
                };
                say(self.json, &format!("  {label}: the load is in {at}  {metrics}"));
            }
            if self.sleep_or_interrupt(Duration::from_millis(20)).await {
                self.event("Ctrl-C while waiting for the load".into());
                return Err("Ctrl-C".into());
            }
        }
    }

    /// Wait until the load produces its phase `phase`; why the run cannot
    /// go on otherwise (the load ended or fell behind, or Ctrl-C).
    async fn wait_load_phase(&mut self, label: &str, name: &str, phase: &str, records: &mut Vec<StepRecord>) -> Option<String> {
        // The phase is due this far into the profile; the producer's start-up
        // and a producer behind its rate get a minute on top.
        let (index, due) = load_phase_due(self.e, phase);
        let start_s = self.now();
        self.event(format!("{label} {name} (due {:.0} s into the load)", due.as_secs_f64()));
        let outcome = match self.until_load_phase(index, due + Duration::from_secs(60), Some(&format!("{label} {name}"))).await {
            Ok((at, _)) if at == index => None,
            Ok((_, now)) => Some(format!("{name}: the load's phase {phase} had already ended (it is in {now})")),
            Err(_) if self.interrupted => Some("Ctrl-C".into()),
            Err(why) => Some(format!("{name}: the load's phase {phase}: {why}")),
        };
        let state = if outcome.is_none() { "done" } else { "cut short" };
        if let Some(why) = &outcome {
            self.event(why.clone());
        }
        records.push(StepRecord {
            name: name.to_string(),
            kind: "wait",
            fault: String::new(),
            scenario_id: String::new(),
            state: state.into(),
            reason: outcome.clone().unwrap_or_default(),
            start_s,
            end_s: self.now(),
            agents: vec![],
        });
        outcome
    }

    fn record(slot: &Slot<'_>, end_s: f64, state: String, reason: String) -> StepRecord {
        let (kind, fault) = match slot.step {
            Step::Fault { fault, .. } => ("fault", fault.text.clone()),
            _ => ("wait", String::new()),
        };
        let sc = slot.scenario.clone().unwrap_or_default();
        StepRecord {
            name: slot.step.name().to_string(),
            kind,
            fault,
            scenario_id: sc.id.clone(),
            state,
            reason,
            start_s: slot.start_s,
            end_s,
            agents: agents_json(&sc),
        }
    }

    /// Run `items` together, each from its `after` offset, until all have
    /// ended. A refusal, a scenario that does not complete, or Ctrl-C ends
    /// the others (their faults are reverted); returns why, if so.
    async fn run_group(&mut self, label: &str, items: &[&Step], records: &mut Vec<StepRecord>) -> Result<Option<String>, CliError> {
        let t = Instant::now();
        let mut slots: Vec<Slot> = items
            .iter()
            .map(|s| Slot { step: s, start_at: t + s.after(), started: false, done: false, scenario: None, start_s: 0.0 })
            .collect();
        let mut abort: Option<String> = None;
        loop {
            // Start what is due.
            for slot in slots.iter_mut() {
                if slot.started || abort.is_some() || Instant::now() < slot.start_at {
                    continue;
                }
                slot.started = true;
                slot.start_s = self.now();
                let step = slot.step;
                match step {
                    Step::Wait { name, wait, .. } => self.event(format!("{label} {name}: wait {}", humantime::format_duration(*wait))),
                    Step::Fault { name, duration, .. } => {
                        let spec = scenario_spec(self.e, step, !self.rolling_back).unwrap_or_default();
                        let created = client(&self.coordinator, self.timeout)?
                            .create_scenario(request(pb::CreateScenarioRequest { spec: Some(spec), dry_run: false }))
                            .await;
                        match created {
                            Ok(r) => {
                                let sc = r.into_inner().scenario.unwrap_or_default();
                                self.event(format!("{label} {name}: scenario {} for {}", sc.id, humantime::format_duration(*duration)));
                                slot.scenario = Some(sc);
                            }
                            // A safety rule refused it at its turn: the run aborts, nothing forced.
                            Err(st) if matches!(st.code(), tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted) => {
                                let why = format!("{name}: refused: {}", st.message());
                                self.event(why.clone());
                                slot.done = true;
                                records.push(Self::record(slot, self.now(), "refused".into(), st.message().to_string()));
                                abort = Some(why);
                            }
                            Err(st) => return Err(from_status(&self.server, st)),
                        }
                    }
                    Step::LoadPhase { .. } | Step::Parallel { .. } => {}
                }
            }
            // Follow what runs.
            for slot in slots.iter_mut() {
                if !slot.started || slot.done {
                    continue;
                }
                match (slot.step, slot.scenario.clone()) {
                    (Step::Wait { wait, .. }, _) => {
                        if Instant::now() >= slot.start_at + *wait || abort.is_some() {
                            slot.done = true;
                            let state = if abort.is_some() { "cut short" } else { "done" };
                            records.push(Self::record(slot, self.now(), state.into(), String::new()));
                        }
                    }
                    (Step::Fault { name, .. }, Some(sc)) => {
                        let mut c = client(&self.coordinator, self.timeout)?;
                        let last = if abort.is_some() && !scenario_is_final(sc.state) {
                            let reason = format!("{} in chaos run", abort.clone().unwrap_or_default());
                            c.stop_scenario(request(pb::StopScenarioRequest { id: sc.id.clone(), reason })).await
                        } else {
                            c.get_scenario(pb::GetScenarioRequest { id: sc.id.clone() }).await
                        }
                        .map_err(|s| from_status(&self.server, s))?
                        .into_inner();
                        slot.scenario = Some(last.clone());
                        if scenario_is_final(last.state) {
                            slot.done = true;
                            self.event(format!("{label} {name}: {} ({})", state_name(last.state), last.reason));
                            records.push(Self::record(slot, self.now(), state_name(last.state), last.reason.clone()));
                            let completed = matches!(ScenarioState::try_from(last.state), Ok(ScenarioState::Completed));
                            if !completed && abort.is_none() {
                                abort = Some(format!("{name}: scenario {} {}: {}", last.id, state_name(last.state), last.reason));
                            }
                        }
                    }
                    _ => slot.done = true,
                }
            }
            let pending_start = slots.iter().any(|s| !s.started);
            let running = slots.iter().any(|s| s.started && !s.done);
            if !running && (abort.is_some() || !pending_start) {
                break;
            }
            if abort.is_some() {
                continue;
            }
            self.snapshot().await?;
            let progress: Vec<String> = slots
                .iter()
                .filter(|s| s.started && !s.done)
                .map(|s| {
                    let left = match (s.step, &s.scenario) {
                        (Step::Wait { wait, .. }, _) => (s.start_at + *wait).saturating_duration_since(Instant::now()),
                        (_, Some(sc)) => sc
                            .ends_at
                            .as_ref()
                            .map(chaos_proto::convert::timestamp_from_pb)
                            .and_then(|t| t.duration_since(SystemTime::now()).ok())
                            .unwrap_or_default(),
                        _ => Duration::ZERO,
                    };
                    let state = s.scenario.as_ref().map(|sc| format!("{} ", state_name(sc.state))).unwrap_or_default();
                    format!("{}: {state}{:.0}s left", s.step.name(), left.as_secs_f64())
                })
                .collect();
            let waiting = slots.iter().filter(|s| !s.started).count();
            say(
                self.json,
                &format!(
                    "  {label} {}{}  {}",
                    progress.join("; "),
                    if waiting > 0 { format!(" (+{waiting} to start)") } else { String::new() },
                    self.key_metrics()
                ),
            );
            if self.sleep_or_interrupt(Duration::from_secs(1)).await {
                self.event("Ctrl-C: stopping the running scenarios (their faults are reverted)".into());
                abort = Some("Ctrl-C".into());
            }
        }
        Ok(abort)
    }
}

/// Show each step, with each fault step's admission as a dry run; whether
/// one would be refused, and the plan as JSON (one entry per step or member).
async fn show_plan(
    e: &Experiment,
    coordinator: &str,
    timeout: Duration,
    steps: &[Step],
    prefix: &str,
    json: bool,
) -> Result<(bool, Vec<serde_json::Value>), CliError> {
    let stops = prefix.is_empty();
    let server = format!("coordinator {}", url(coordinator));
    let mut refused = false;
    let mut plan = vec![];
    for (i, step) in steps.iter().enumerate() {
        let members: Vec<&Step> = match step {
            Step::Parallel { name, steps } => {
                say(json, &format!("  {prefix}{}. {name}: in parallel", i + 1));
                steps.iter().collect()
            }
            s => vec![s],
        };
        for m in members {
            let indent = if matches!(step, Step::Parallel { .. }) {
                format!("     - {}", m.name())
            } else {
                format!("  {prefix}{}. {}", i + 1, m.name())
            };
            let after = if m.after().is_zero() { String::new() } else { format!(" after {}", humantime::format_duration(m.after())) };
            let mut entry = json!({"step": i + 1, "group": step.name(), "name": m.name(), "after_s": m.after().as_secs_f64()});
            match (m, scenario_spec(e, m, stops)) {
                (Step::Wait { wait, .. }, _) => {
                    say(json, &format!("{indent}: wait {}{after}", humantime::format_duration(*wait)));
                    entry["kind"] = json!("wait");
                    entry["wait_s"] = json!(wait.as_secs_f64());
                }
                (Step::LoadPhase { phase, .. }, _) => {
                    let due = load_phase_due(e, phase).1;
                    say(json, &format!("{indent}: until the load begins its phase {phase} (about {:.0} s into it)", due.as_secs_f64()));
                    entry["kind"] = json!("wait_for_load_phase");
                    entry["phase"] = json!(phase);
                    entry["due_s"] = json!(due.as_secs_f64());
                }
                (Step::Fault { duration, fault, .. }, Some(spec)) => {
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
                    say(
                        json,
                        &format!(
                            "{indent}: {} for {}{after} on {} agent(s) [{}], severity {}, blast radius {radius}{}",
                            adm.scenario_type,
                            humantime::format_duration(*duration),
                            adm.selected_agent_ids.len(),
                            adm.selected_agent_ids.join(", "),
                            adm.severity,
                            if adm.queued { " (would queue)" } else { "" }
                        ),
                    );
                    for r in &adm.refusals {
                        say(json, &format!("     REFUSED: {r}"));
                        refused = true;
                    }
                    entry["kind"] = json!("fault");
                    entry["fault"] = json!(fault.text);
                    entry["duration_s"] = json!(duration.as_secs_f64());
                    entry["admission"] = json!({
                        "scenario_type": adm.scenario_type, "agents": adm.selected_agent_ids, "severity": adm.severity,
                        "blast_radius": adm.blast_radius.as_ref().map(|b| b.fraction),
                        "blast_radius_limit": adm.blast_radius.as_ref().map(|b| b.limit),
                        "queued": adm.queued, "refusals": adm.refusals,
                    });
                }
                _ => {}
            }
            plan.push(entry);
        }
    }
    Ok((refused, plan))
}

/// `chaos run FILE`.
pub async fn run(coordinator: &str, timeout: Duration, fmt: crate::output::Format, a: RunArgs) -> Result<u8, CliError> {
    let json = fmt == crate::output::Format::Json;
    let file = a.file.display().to_string();
    let text = chaos_proto::files::read_text(&a.file).map_err(|m| CliError::new(exit::USAGE, m))?;
    let e = parse(&file, &text).map_err(|m| CliError::new(exit::USAGE, m))?;
    let server = format!("coordinator {}", url(coordinator));
    let faults: usize = e.method.iter().map(|s| s.faults().len()).sum();
    say(json, &format!("experiment {} ({} step(s), {faults} fault(s)) against {}", e.name, e.method.len(), url(coordinator)));
    if !e.description.is_empty() {
        say(json, &format!("  {}", e.description.trim()));
    }
    if let Some(l) = &e.load {
        say(
            json,
            &format!(
                "  load: {} towards {} (stored in {} at {})",
                crate::load::profile_text(&l.profile),
                l.target.bootstrap,
                l.target.table,
                l.target.cassandra
            ),
        );
    }
    let (refused, plan) = show_plan(&e, coordinator, timeout, &e.method, "", json).await?;
    for r in &e.steady_state {
        say(json, &format!("  steady state: {}", r.0.expr));
    }
    for r in &e.stop_conditions {
        say(json, &format!("  stop if: {}", r.0.expr));
    }
    let mut rollback_plan = vec![];
    if !e.rollbacks.is_empty() {
        say(json, "  on abort, rollbacks:");
        rollback_plan = show_plan(&e, coordinator, timeout, &e.rollbacks, "r", json).await?.1;
    }
    if let Some(v) = &e.validation {
        say(json, &format!("  validation: chaos validate {}", v.text));
    }
    if refused || a.dry_run {
        say(json, if refused { "the coordinator would refuse a step: nothing run" } else { "dry run: nothing run" });
        if json {
            crate::output::emit_json(&json!({"experiment": e.name, "file": file, "dry_run": a.dry_run, "refused": refused,
                "plan": plan, "rollbacks": rollback_plan}));
        }
        return Ok(if refused { exit::REFUSED } else { exit::OK });
    }

    let started_at = SystemTime::now();
    let id = format!("{}-{}", slug(&e.name), humantime::format_rfc3339_seconds(started_at).to_string().replace(':', ""));
    let dir = a.report_dir.join(&id);
    let mut r = Runner {
        e: &e,
        prefixes: watched(&e),
        coordinator: coordinator.to_string(),
        server: server.clone(),
        timeout,
        t0: Instant::now(),
        samples: vec![],
        events: vec![],
        ctrl_c: Box::pin(tokio::signal::ctrl_c()),
        interrupted: false,
        rolling_back: false,
        load: None,
        load_phase: None,
        json,
    };
    // Load first, so the steady state is judged under it.
    if let Some(l) = &e.load {
        let bin_dir = crate::lab::bin_dir(&None)?;
        let run = crate::load::LoadRun::start(&bin_dir, &dir, &l.target, &l.profile, "load")?;
        r.event(format!("load started: {} (run id {})", crate::load::profile_text(&l.profile), run.run_id));
        r.load = Some(run);
        // The steady state is judged once the producer produces.
        if let Err(why) = r.until_load_phase(0, Duration::from_secs(60), None).await {
            let log = dir.join("load-collector.log");
            return Err(CliError::new(
                exit::FAILURE,
                format!("the load's first phase: {why}; nothing was injected; see {}", log.display()),
            ));
        }
    }
    let before = r.snapshot().await?;
    let (held_before, before_lines) = hypothesis(&e.steady_state, &before);
    r.event(format!("steady state before: {}", if held_before { "holds" } else { "DOES NOT HOLD" }));
    let mut steps: Vec<StepRecord> = vec![];
    let mut verdict = if held_before { Verdict::Held } else { Verdict::Deviated };
    let mut abort_reason = String::new();
    if held_before {
        for (i, step) in e.method.iter().enumerate() {
            let label = format!("step {}/{}", i + 1, e.method.len());
            if let Step::LoadPhase { name, phase } = step {
                if let Some(why) = r.wait_load_phase(&label, name, phase, &mut steps).await {
                    abort_reason = why;
                    verdict = Verdict::Aborted;
                    break;
                }
                continue;
            }
            let members: Vec<&Step> = match step {
                Step::Parallel { name, steps } => {
                    r.event(format!("{label} {name}"));
                    steps.iter().collect()
                }
                s => vec![s],
            };
            if let Some(why) = r.run_group(&label, &members, &mut steps).await? {
                abort_reason = why;
                verdict = Verdict::Aborted;
                break;
            }
        }
    }
    let method_end = r.now();
    // Rollbacks: only after an abort, and not after Ctrl-C (the user wants out).
    let mut rollbacks: Vec<StepRecord> = vec![];
    if verdict == Verdict::Aborted && !e.rollbacks.is_empty() {
        if r.interrupted {
            r.event("rollbacks skipped: the run was interrupted (Ctrl-C)".into());
        } else {
            r.event(format!("rollbacks: {} step(s)", e.rollbacks.len()));
            r.rolling_back = true;
            for (i, step) in e.rollbacks.iter().enumerate() {
                let label = format!("rollback {}/{}", i + 1, e.rollbacks.len());
                let members: Vec<&Step> = match step {
                    Step::Parallel { steps, .. } => steps.iter().collect(),
                    s => vec![s],
                };
                if let Some(why) = r.run_group(&label, &members, &mut rollbacks).await? {
                    r.event(format!("{label} did not complete: {why}; the remaining rollbacks still run"));
                }
            }
        }
    }
    // Steady state after, within recovery_timeout.
    let (mut held_after, mut after_lines, mut recovery_s) = (false, vec![], None);
    if held_before && !r.interrupted {
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
            if Instant::now() >= deadline || r.sleep_or_interrupt(Duration::from_secs(1)).await {
                break;
            }
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
    // The load runs its whole profile (the phases after the method measure
    // the recovery), unless Ctrl-C came; then its figures.
    let mut load_json = serde_json::Value::Null;
    let mut acks: Option<(PathBuf, String)> = None;
    if r.load.as_mut().is_some_and(|run| run.running()) && !r.interrupted {
        let left = r.load.as_ref().map(|run| run.total.saturating_sub(run.started.elapsed())).unwrap_or_default();
        r.event(format!("waiting for the load profile to end (about {:.0} s)", left.as_secs_f64()));
        while r.load.as_mut().is_some_and(|run| run.running()) && !r.interrupted {
            r.note_load_phase();
            if r.sleep_or_interrupt(Duration::from_secs(1)).await {
                r.event("Ctrl-C: stopping the load".into());
            }
        }
    }
    if let (Some(mut run), Some(l)) = (r.load.take(), &e.load) {
        let summary = run.finish();
        r.event(format!("load ended: produced {}, acknowledged {}, failed {}", summary["produced"], summary["acked"], summary["failed"]));
        let stats = if r.interrupted { Err("interrupted".to_string()) } else { run.stats(&l.target, &summary, l.settle.0).await };
        match &stats {
            Ok(st) => {
                for s in st {
                    r.event(format!(
                        "load phase {}: {:.1} acked/s, stored {}/{} ({} written again), errors {:.2} %, p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms",
                        s.phase, s.acked_per_s, s.stored, s.acked, s.redelivered, s.error_pct, s.p50_ms, s.p95_ms, s.p99_ms
                    ));
                }
            }
            Err(why) => r.event(format!("load figures unavailable: {why}")),
        }
        load_json = json!({"profile": crate::load::profile_text(&l.profile), "run_id": run.run_id, "collector": summary,
            "phases": stats.as_ref().ok(), "error": stats.as_ref().err()});
        acks = Some((run.acks.clone(), format!("{}-", run.run_id)));
    }
    // Validation: the recovery checks, with the load's acknowledged ids when there was load.
    let mut validation_json = serde_json::Value::Null;
    if let (Some(v), true) = (&e.validation, held_before && !r.interrupted) {
        let mut req = v.request.clone();
        if let (None, Some((path, prefix)), Some(l)) = (&req.consistency, &acks, &e.load) {
            req.consistency = Some(pb::ConsistencyCheck {
                acks_file: std::path::absolute(path).unwrap_or(path.clone()).display().to_string(),
                cassandra: l.target.cassandra.clone(),
                table: l.target.table.clone(),
                event_id_prefix: prefix.clone(),
            });
        }
        req.scenario_ids = steps.iter().filter(|s| !s.scenario_id.is_empty()).map(|s| s.scenario_id.clone()).collect();
        r.event(format!(
            "validation: {} check(s)",
            req.services.len() + [req.lag.is_some(), req.consistency.is_some(), req.performance.is_some()].iter().filter(|b| **b).count()
        ));
        let report = crate::validate::validate(coordinator, req, |ev| {
            if let pb::validation_event::Event::Check(c) = ev {
                say(json, &format!("  validation: {} {}: {}", crate::validate::verdict_name(c.verdict), c.name, c.summary));
            }
        })
        .await?;
        let passed = report.verdict == pb::Verdict::Passed as i32;
        r.event(format!("validation: {}", crate::validate::verdict_name(report.verdict)));
        if !passed && verdict == Verdict::Held {
            verdict = Verdict::Deviated;
        }
        validation_json = crate::validate::report_json(&report);
    }
    if verdict == Verdict::Aborted && abort_reason.is_empty() {
        abort_reason = "aborted".into();
    }
    let report = json!({
        "id": id, "experiment": e.name, "description": e.description, "file": file, "coordinator": url(coordinator),
        "started_at": humantime::format_rfc3339_seconds(started_at).to_string(),
        "duration_s": r.now(),
        "verdict": verdict.as_str(), "abort_reason": abort_reason,
        "steady_state": {"before": {"held": held_before, "rules": before_lines}, "after": {"held": held_after, "rules": after_lines, "recovery_s": recovery_s}},
        "stop_conditions": e.stop_conditions.iter().map(|r| r.0.expr.clone()).collect::<Vec<_>>(),
        "steps": steps.iter().map(StepRecord::json).collect::<Vec<_>>(),
        "rollbacks": rollbacks.iter().map(StepRecord::json).collect::<Vec<_>>(),
        "load": load_json,
        "validation": validation_json,
        "timeline": r.events.iter().map(|(t, m)| json!({"t_s": t, "event": m})).collect::<Vec<_>>(),
        "metrics": series_json(&r.samples),
    });
    write_report(&dir, &report).map_err(|err| CliError::new(exit::FAILURE, format!("writing the report to {}: {err}", dir.display())))?;
    // The coordinator's index of runs; the report stands without it.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let entry = pb::ExperimentRun {
        id: id.clone(),
        experiment: e.name.clone(),
        file: std::path::absolute(&a.file).unwrap_or(a.file.clone()).display().to_string(),
        verdict: verdict.as_str().into(),
        // The index keeps one line; report.md keeps the whole reason.
        abort_reason: chaos_proto::edge::one_line(&abort_reason, chaos_proto::edge::TEXT.string_bytes),
        started_at: Some(chaos_proto::convert::timestamp_to_pb(started_at)),
        duration: Some(duration_to_pb(Duration::from_secs_f64(r.now()))),
        report_dir: std::path::absolute(&dir).unwrap_or(dir.clone()).display().to_string(),
        host,
        scenario_ids: steps.iter().chain(&rollbacks).filter(|s| !s.scenario_id.is_empty()).map(|s| s.scenario_id.clone()).collect(),
    };
    if let Err(st) = client(coordinator, timeout)?.record_experiment_run(request(entry)).await {
        tracing::warn!(error = %st.message(), "the run is not in the coordinator's index");
        say(json, &format!("note: the coordinator did not index this run ({}); the report is complete", st.message()));
    }
    say(
        json,
        &format!("verdict: {}{}", verdict.as_str(), if abort_reason.is_empty() { String::new() } else { format!(" ({abort_reason})") }),
    );
    say(json, &format!("report: {}", dir.display()));
    if json {
        let mut out = report;
        out["report_dir"] = json!(std::path::absolute(&dir).unwrap_or(dir.clone()).display().to_string());
        out["exit_code"] = json!(verdict.code());
        crate::output::emit_json(&out);
    }
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

/// Write report.json, metrics.svg and report.md from the report's JSON alone
/// (so `chaos report` renders them again from report.json).
fn write_report(dir: &Path, report: &serde_json::Value) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report).unwrap_or_default())?;
    render(dir, report)
}

fn render(dir: &Path, report: &serde_json::Value) -> std::io::Result<()> {
    let windows: Vec<(f64, f64)> = report["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["kind"] == "fault")
        .map(|s| (s["start_s"].as_f64().unwrap_or(0.0), s["end_s"].as_f64().unwrap_or(0.0)))
        .collect();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for s in report["metrics"].as_array().into_iter().flatten() {
        let pts = s["points"].as_array().into_iter().flatten().filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?))).collect();
        series.insert(s["series"].as_str().unwrap_or_default().to_string(), pts);
    }
    let plotted = plot(&dir.join("metrics.svg"), &windows, &series).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("report.md"), markdown(report, plotted))
}

fn steps_md(md: &mut String, title: &str, steps: &[serde_json::Value], s: &dyn Fn(&serde_json::Value) -> String) {
    let _ = writeln!(
        md,
        "\n## {title}\n\n| step | kind | requested | scenario | state | from s | to s | what the agents did | achieved |\n|---|---|---|---|---|---|---|---|---|"
    );
    for st in steps {
        let agents = st["agents"].as_array().cloned().unwrap_or_default();
        let did: Vec<String> = agents.iter().map(|a| format!("{}: {}", s(&a["agent_id"]), s(&a["summary"]))).collect();
        let achieved: Vec<String> = agents
            .iter()
            .filter_map(|a| {
                let m = a["achieved"].as_object()?;
                let mut parts: Vec<String> =
                    m.iter().map(|(k, v)| format!("{k}={}", v.as_f64().map_or(v.to_string(), |x| format!("{x:.2}")))).collect();
                if !s(&a["outcome"]).is_empty() {
                    parts.push(s(&a["outcome"]));
                }
                (!parts.is_empty()).then(|| format!("{}: {}", s(&a["agent_id"]), parts.join(", ")))
            })
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} |",
            s(&st["name"]),
            s(&st["kind"]),
            if s(&st["fault"]).is_empty() { "-".into() } else { format!("`{}`", s(&st["fault"])) },
            s(&st["scenario_id"]),
            s(&st["state"]),
            st["start_s"].as_f64().unwrap_or(0.0),
            st["end_s"].as_f64().unwrap_or(0.0),
            did.join("; ").replace('|', "/"),
            if achieved.is_empty() { "-".into() } else { achieved.join("; ").replace('|', "/") }
        );
    }
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
        "- run: `{}`\n- file: `{}`\n- coordinator: {}\n- started: {}\n- ran for: {:.1} s",
        s(&r["id"]),
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
    steps_md(&mut md, "Method", r["steps"].as_array().map(Vec::as_slice).unwrap_or_default(), &s);
    if let Some(rb) = r["rollbacks"].as_array().filter(|v| !v.is_empty()) {
        steps_md(&mut md, "Rollbacks", rb, &s);
    }
    let stops: Vec<String> = r["stop_conditions"].as_array().into_iter().flatten().map(|v| format!("`{}`", s(v))).collect();
    if !stops.is_empty() {
        let _ = writeln!(md, "\nStop conditions: {}", stops.join(", "));
    }
    if !r["load"].is_null() {
        let l = &r["load"];
        let _ = writeln!(
            md,
            "\n## Load\n\nProfile `{}` (run id `{}`): produced {}, acknowledged {}, failed {}.\n",
            s(&l["profile"]),
            s(&l["run_id"]),
            l["collector"]["produced"],
            l["collector"]["acked"],
            l["collector"]["failed"]
        );
        if let Some(phases) = l["phases"].as_array() {
            let _ = writeln!(
                md,
                "| phase | rate/s | seconds | produced | acked/s | stored/acked | redelivered | error % | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for p in phases {
                let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} | {} | {:.1} | {}/{} | {} | {:.2} | {:.0} | {:.0} | {:.0} |",
                    s(&p["phase"]),
                    p["rate_per_s"],
                    f("seconds"),
                    p["produced"],
                    f("acked_per_s"),
                    p["stored"],
                    p["acked"],
                    // Reports from before the count have none.
                    p["redelivered"].as_u64().map_or("-".to_string(), |n| n.to_string()),
                    f("error_pct"),
                    f("p50_ms"),
                    f("p95_ms"),
                    f("p99_ms")
                );
            }
        } else {
            let _ = writeln!(md, "Figures unavailable: {}", s(&l["error"]));
        }
    }
    if !r["validation"].is_null() {
        let v = &r["validation"];
        let _ = writeln!(md, "\n## Validation: {}\n\n| check | verdict | summary |\n|---|---|---|", s(&v["verdict"]));
        for c in v["checks"].as_array().into_iter().flatten() {
            let _ = writeln!(md, "| {} | {} | {} |", s(&c["name"]), s(&c["verdict"]), s(&c["summary"]).replace('|', "/"));
        }
        for reason in v["reasons"].as_array().into_iter().flatten() {
            let _ = writeln!(md, "- {}", s(reason));
        }
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

/// The series over time, fault windows shaded. False when there was nothing to plot.
fn plot(path: &Path, windows: &[(f64, f64)], series: &BTreeMap<String, Vec<(f64, f64)>>) -> Result<bool, String> {
    use plotters::prelude::*;
    let all = || series.values().flatten();
    if all().next().is_none() {
        return Ok(false);
    }
    let t_max = all().map(|p| p.0).chain(windows.iter().map(|w| w.1)).fold(1.0, f64::max);
    let (lo, hi) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
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
    for (from, to) in windows {
        chart
            .draw_series(std::iter::once(Rectangle::new([(*from, lo), (*to, hi)], RGBColor(255, 200, 200).mix(0.5).filled())))
            .map_err(|e| e.to_string())?;
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(true)
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A run: its report directory, or its id in the coordinator's index. Omit to list the index.
    pub run: Option<String>,
    /// Only runs of this experiment (with the listing).
    #[arg(long)]
    pub experiment: Option<String>,
    /// How many of the newest runs to list.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

pub const REPORT_HELP: &str = "\
With RUN, renders report.md and metrics.svg again from the run's report.json
(a directory, or an id from the index whose directory is on this machine) and
prints the Markdown. Without RUN, lists the coordinator's index of runs.

Examples:
  chaos report                                   # the newest 20 runs
  chaos report --experiment lab-processor-partition
  chaos report lab-processor-partition-2026-11-24T101500Z
  chaos report chaos-reports/lab-processor-partition-2026-11-24T101500Z";

/// `chaos report [RUN]`.
pub async fn report(coordinator: &str, timeout: Duration, fmt: crate::output::Format, a: ReportArgs) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let list = |limit: u32, experiment: String| async move {
        client(coordinator, timeout)?
            .list_experiment_runs(pb::ListExperimentRunsRequest { limit, experiment })
            .await
            .map(|r| r.into_inner().runs)
            .map_err(|s| from_status(&server, s))
    };
    let Some(run) = a.run else {
        let runs = list(a.limit, a.experiment.unwrap_or_default()).await?;
        let rows: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                json!({"id": r.id, "experiment": r.experiment, "verdict": r.verdict, "abort_reason": r.abort_reason,
                    "started_at": crate::output::rfc3339(r.started_at.as_ref()), "duration_s": crate::output::dur_secs(r.duration.as_ref()),
                    "host": r.host, "report_dir": r.report_dir, "file": r.file, "scenario_ids": r.scenario_ids})
            })
            .collect();
        match fmt {
            crate::output::Format::Json => crate::output::emit_json(&json!({"runs": rows})),
            crate::output::Format::Table => emit(&crate::output::table(
                &["ID", "VERDICT", "STARTED", "TOOK", "HOST", "REPORT"],
                &runs
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.verdict.clone(),
                            crate::output::rfc3339(r.started_at.as_ref()).unwrap_or_default(),
                            crate::output::dur(r.duration.as_ref()),
                            r.host.clone(),
                            r.report_dir.clone(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            )),
        }
        return Ok(exit::OK);
    };
    let dir = if Path::new(&run).join("report.json").is_file() {
        PathBuf::from(&run)
    } else {
        let runs = list(10_000, String::new()).await?;
        let found = runs.into_iter().find(|r| r.id == run).ok_or_else(|| {
            CliError::new(
                exit::NOT_FOUND,
                format!("{run:?} is neither a report directory (with report.json) nor a run in the coordinator's index"),
            )
        })?;
        let d = PathBuf::from(&found.report_dir);
        if !d.join("report.json").is_file() {
            return Err(CliError::new(
                exit::NOT_FOUND,
                format!("run {run}: its report is {} on host {:?}, not on this machine", found.report_dir, found.host),
            ));
        }
        d
    };
    let text =
        std::fs::read_to_string(dir.join("report.json")).map_err(|e| CliError::new(exit::FAILURE, format!("{}: {e}", dir.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CliError::new(exit::FAILURE, format!("{}: not a report ({e})", dir.join("report.json").display())))?;
    render(&dir, &v).map_err(|e| CliError::new(exit::FAILURE, format!("rendering {}: {e}", dir.display())))?;
    match fmt {
        crate::output::Format::Json => crate::output::emit_json(&json!({"report_dir": dir.display().to_string(), "verdict": v["verdict"]})),
        crate::output::Format::Table => {
            emit(std::fs::read_to_string(dir.join("report.md")).unwrap_or_default().trim_end());
            emit(&format!("\n(rendered again in {})", dir.display()));
        }
    }
    Ok(exit::OK)
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
        let spec = scenario_spec(&e, &e.method[0], true).expect("spec");
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
    fn hostile_files_are_refused_with_bounded_messages() {
        // One big value aliased many times: refused before serde expands it.
        let mut bomb = format!("{GOOD}x-big: &big \"{}\"\nx-copies:\n", "b".repeat(200_000));
        for _ in 0..50 {
            bomb.push_str("  - *big\n");
        }
        let e = err(&bomb);
        assert!(e.starts_with("exp.yaml:") && e.contains("alias bomb"), "{e}");
        // A 1 MB bad value is quoted in part, once.
        let e = err(&GOOD.replace("name: pause-kafka", &format!("name: [{}]", "v".repeat(1 << 20))));
        assert!(e.len() < 800, "{} bytes: {}", e.len(), &e[..200]);
        // Not UTF-8: the byte offset and the line.
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("latin1.yaml");
        std::fs::write(&p, b"version: 1\nname: caf\xe9\n").expect("write");
        let e = chaos_proto::files::read_text(&p).expect_err("latin-1");
        assert!(e.ends_with("latin1.yaml:2:10: not UTF-8 text (invalid byte 0xe9 at byte offset 20)"), "{e}");
    }

    /// Fuzz target: experiment files. Parsing never panics, refusals stay
    /// short and start with the file's name, and a file that parses plans
    /// into scenario specs without panicking either.
    #[test]
    fn fuzz_experiment_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/experiments");
        let mut shipped: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .expect("deploy/experiments")
            .flatten()
            .filter(|f| f.path().extension().is_some_and(|x| x == "yaml"))
            .map(|f| std::fs::read(f.path()).expect("read"))
            .collect();
        shipped.push(GOOD.as_bytes().to_vec());
        let tokens: &[&[u8]] = &[
            b"\n",
            b": ",
            b"- ",
            b"&a ",
            b"*a",
            b"<<: *a\n",
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b"--",
            b"--pause-name ",
            b"--partition all",
            b"duration: ",
            b"99999999999h",
            b"-1s",
            b"1e999",
            b"18446744073709551616",
            b"wait: ",
            b"parallel:",
            b"\xff",
            b"\t",
        ];
        chaos_e2e::fuzz::fuzz("experiment", shipped, tokens, |bytes| {
            let Ok(text) = std::str::from_utf8(bytes) else { return Ok(()) };
            match parse("f.yaml", text) {
                Err(e) if e.len() > 2000 => Err(format!("a refusal of {} bytes", e.len())),
                Err(e) if !e.starts_with("f.yaml") => Err(format!("a refusal that does not say where: {e}")),
                Err(_) => Ok(()),
                Ok(e) => {
                    for step in &e.method {
                        let _ = scenario_spec(&e, step, true);
                    }
                    Ok(())
                }
            }
        });
    }

    #[test]
    fn the_shipped_experiment_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/experiments");
        let mut n = 0;
        for f in
            std::fs::read_dir(&dir).expect("deploy/experiments").flatten().filter(|f| f.path().extension().is_some_and(|x| x == "yaml"))
        {
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

    /// The SVG is a well-formed image of 960x480 with one line per series
    /// (each with its points) and one shaded band per fault window, where
    /// the window is on the time axis (0..t_max seconds).
    fn assert_plot(svg: &str, series: usize, points: usize, windows: &[(f64, f64)], t_max: f64) {
        let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not well-formed XML: {e}"));
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!((root.attribute("width"), root.attribute("height")), (Some("960"), Some("480")));
        // Series are drawn 2 px wide; the axes, ticks and legend marks are 1 px.
        let lines: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("polyline") && n.attribute("stroke-width") == Some("2")).collect();
        assert_eq!(lines.len(), series, "one line per series");
        for l in &lines {
            assert_eq!(l.attribute("points").unwrap_or_default().split_whitespace().count(), points, "every sample drawn");
        }
        let num =
            |n: &roxmltree::Node, a: &str| n.attribute(a).and_then(|v| v.parse::<f64>().ok()).unwrap_or_else(|| panic!("{a} of {n:?}"));
        // The plotting area: the x extent of the lines' points.
        let xs: Vec<f64> = lines
            .iter()
            .flat_map(|l| l.attribute("points").unwrap_or_default().split_whitespace().filter_map(|p| p.split(',').next()?.parse().ok()))
            .collect();
        let bands: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some("#FFC8C8")).collect();
        assert_eq!(bands.len(), windows.len(), "one shaded band per fault window");
        // The test's series runs from t=0 to t_max: its first and last points are the time axis' ends.
        let (x0, x_end) = (xs.iter().copied().fold(f64::MAX, f64::min), xs.iter().copied().fold(f64::MIN, f64::max));
        let px_per_s = (x_end - x0) / t_max;
        for (band, (from, to)) in bands.iter().zip(windows) {
            let (x, w) = (num(band, "x"), num(band, "width"));
            assert!(
                (x - (x0 + from * px_per_s)).abs() <= 2.0 && (w - (to - from) * px_per_s).abs() <= 2.0,
                "band {x}+{w} for {from}..{to} s"
            );
        }
    }

    #[test]
    fn the_report_renders_from_its_json_with_a_shaded_plot_and_achieved_figures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let points: Vec<[f64; 2]> = (0..10).map(|i| [f64::from(i), f64::from(i % 3)]).collect();
        let report = json!({
            "id": "x-1", "experiment": "x", "verdict": "HELD", "file": "x.yaml",
            "steps": [{"name": "burn", "kind": "fault", "fault": "--cpu 50%", "scenario_id": "sc-1", "state": "completed",
                "start_s": 2.0, "end_s": 5.0, "agents": [{"agent_id": "a", "summary": "2 workers", "achieved": {"cpu_pct": 49.7}, "outcome": ""}]}],
            "load": {"profile": "baseline:10:1000ms", "run_id": "load-1", "collector": {"produced": 10, "acked": 10, "failed": 0},
                "phases": [{"phase": "baseline", "rate_per_s": 10, "seconds": 1.0, "produced": 10, "acked": 10, "stored": 10,
                    "redelivered": 1, "error_pct": 0.0, "acked_per_s": 10.0, "p50_ms": 12.0, "p95_ms": 30.0, "p99_ms": 31.0}]},
            "validation": {"verdict": "PASSED", "checks": [{"name": "lag", "verdict": "PASSED", "summary": "lag 0"}]},
            "metrics": [{"series": "a x", "points": points}],
        });
        write_report(dir.path(), &report).expect("write");
        let svg = std::fs::read_to_string(dir.path().join("metrics.svg")).expect("svg");
        assert_plot(&svg, 1, 10, &[(2.0, 5.0)], 9.0);
        let md = std::fs::read_to_string(dir.path().join("report.md")).expect("md");
        assert!(md.contains("`--cpu 50%`") && md.contains("a: cpu_pct=49.70"), "requested and achieved: {md}");
        assert!(md.contains("| baseline | 10 | 1.0 | 10 | 10.0 | 10/10 | 1 | 0.00 | 12 | 30 | 31 |"), "{md}");
        assert!(md.contains("## Validation: PASSED") && md.contains("metrics.svg"), "{md}");
        // Rendering again from report.json gives the same files.
        std::fs::remove_file(dir.path().join("metrics.svg")).expect("rm");
        let again: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).expect("json")).expect("parse");
        render(dir.path(), &again).expect("render");
        assert_eq!(std::fs::read_to_string(dir.path().join("metrics.svg")).expect("svg again"), svg);
        assert_eq!(std::fs::read_to_string(dir.path().join("report.md")).expect("md again"), md);
        // Nothing to plot: no SVG, and the Markdown does not point at one.
        let empty = tempfile::tempdir().expect("tempdir");
        write_report(empty.path(), &json!({"experiment": "y", "verdict": "HELD"})).expect("write");
        assert!(!empty.path().join("metrics.svg").exists());
    }

    #[test]
    fn parallel_groups_offsets_load_validation_and_rollbacks_parse() {
        let text = "version: 1
name: many
load:
  profile:
    - {phase: warmup, rate: 50, for: 5s}
    - {phase: baseline, rate: 200, for: 20s}
method:
  - parallel:
      - fault: --pause-name java
        agent_ids: [k]
        duration: 10s
      - fault: --loss 10%
        agent_ids: [p]
        after: 3s
        duration: 5s
  - wait: 2s
rollbacks:
  - fault: --container kafka --action start
    agent_ids: [k]
    duration: 1s
validation: --lab --max-lag 100
";
        let e = parse("m.yaml", text).expect("parse");
        let Step::Parallel { steps, .. } = &e.method[0] else { panic!("a group") };
        assert_eq!(steps.len(), 2);
        assert_eq!((steps[0].after(), steps[1].after()), (Duration::ZERO, Duration::from_secs(3)));
        assert_eq!(e.method[0].faults().len(), 2);
        assert_eq!(e.load.as_ref().map(|l| l.profile.len()), Some(2));
        assert_eq!(e.rollbacks.len(), 1);
        let v = e.validation.expect("validation");
        assert_eq!(v.request.lag.as_ref().map(|l| l.max_lag), Some(100));
        let bad = |from: &str, to: &str| parse("m.yaml", &text.replace(from, to)).expect_err("refused");
        let e = bad("    - {phase: warmup, rate: 50, for: 5s}", "    - {phase: warmup, rate: 0, for: 5s}");
        assert!(e.starts_with("m.yaml:5:") && e.contains("rate must be 1..=20000 events/s, got 0"), "{e}");
        let e = bad("    - {phase: baseline, rate: 200, for: 20s}", "    - {phase: baseline, rate: 200, for: 500ms}");
        assert!(e.starts_with("m.yaml:6:") && e.contains("`for` must be 1s..=1h, got 500ms"), "{e}");
        let e = bad("{phase: baseline,", "{phase: base line,");
        assert!(e.starts_with("m.yaml:6:") && e.contains("phase name must be letters"), "{e}");
        let e = bad("  profile:\n", "  target: {bootstrap: \"10.1.2.3:9092\"}\n  profile:\n");
        assert!(e.contains("load.bootstrap") && e.contains("not a lab address"), "{e}");
        let e = bad("validation: --lab --max-lag 100", "validation: --lab --max-lagg 100");
        assert!(e.starts_with("m.yaml:21:") && e.contains("--max-lagg"), "{e}");
        let e = bad("  - wait: 2s\n", "  - parallel:\n      - parallel: []\n");
        assert!(e.contains("do not nest") || e.contains("at least one"), "{e}");
        let e = bad("  - wait: 2s\n", "  - wait: 2s\n    fault: --loss 1%\n");
        assert!(e.contains("not several"), "{e}");
        let e = bad("  - wait: 2s\n", "  - wait: 2s\n    duration: 5s\n    severity: 2\n");
        assert!(
            e.starts_with("m.yaml:16:") && e.ends_with("a `wait` step takes only `name`, `wait` and `after`, not `duration`, `severity`"),
            "{e}"
        );
        let e = bad("  - parallel:\n", "  - after: 1s\n    parallel:\n");
        assert!(e.contains("a `parallel` step takes only `name` and its steps") && e.contains("not `after`"), "{e}");
        let e = bad("        after: 3s", "        after: -3s");
        assert!(e.starts_with("m.yaml:14:") && e.contains("must not be negative"), "{e}");
    }

    #[test]
    fn a_container_stop_step_takes_its_grace_and_refuses_it_on_another_verb_by_line() {
        let text = GOOD.replace("--pause-name java", "--container kafka --action stop --stop-grace 20s");
        let e = parse("exp.yaml", &text).expect("parse");
        let Step::Fault { fault, .. } = &e.method[0] else { panic!("fault step") };
        let Some(pb::fault_spec::Fault::ContainerAction(a)) = &fault.spec.fault else { panic!("container action: {:?}", fault.spec) };
        assert_eq!(a.stop_grace, Some(prost_types::Duration { seconds: 20, nanos: 0 }));
        let e = err(&GOOD.replace("--pause-name java", "--container kafka --action pause --stop-grace 20s"));
        assert!(e.starts_with("exp.yaml:7:") && e.contains("--stop-grace only applies to stop and restart, got 20s for pause"), "{e}");
    }

    #[test]
    fn a_step_waits_for_a_load_phase_that_the_profile_has() {
        let text = "version: 1
name: aligned
load:
  profile:
    - {phase: warmup, rate: 50, for: 5s}
    - {phase: fault, rate: 200, for: 20s}
method:
  - wait_for_load_phase: fault
  - fault: --pause-name java
    agent_ids: [k]
    duration: 10s
";
        let e = parse("a.yaml", text).expect("parse");
        assert!(matches!(&e.method[0], Step::LoadPhase { phase, name } if phase == "fault" && name == "wait for the load's phase fault"));
        assert!(e.method[0].faults().is_empty());
        let bad = |t: String| parse("a.yaml", &t).expect_err("refused");
        let e = bad(text.replace("wait_for_load_phase: fault", "wait_for_load_phase: spike"));
        assert_eq!(e, "a.yaml: method[0].wait_for_load_phase: no phase \"spike\" in load.profile (its phases: warmup, fault)");
        let e = bad(text.replace("phase: warmup", "phase: fault"));
        assert!(e.contains("has 2 phases named \"fault\""), "{e}");
        let no_load = text.split_once("method:").map(|(_, m)| format!("version: 1\nname: aligned\nmethod:{m}")).expect("method");
        assert!(bad(no_load).contains("method[0].wait_for_load_phase: \"fault\": the experiment has no `load:`"));
        let e = bad(text.replace("  - wait_for_load_phase: fault\n", "  - wait_for_load_phase: fault\n    after: 2s\n"));
        assert!(e.starts_with("a.yaml:8:") && e.contains("takes only `name`"), "{e}");
        let e = bad(text.replace("  - wait_for_load_phase: fault\n", "  - parallel:\n      - wait_for_load_phase: fault\n"));
        assert!(e.contains("a step of its own"), "{e}");
        let e = bad(format!("{text}rollbacks:\n  - wait_for_load_phase: fault\n"));
        assert!(e.contains("rollbacks[0]: `wait_for_load_phase` belongs in the method"), "{e}");
        let e = bad(text.replace("  - wait_for_load_phase: fault\n", "  - wait_for_load_phase: fault\n    wait: 1s\n"));
        assert!(e.contains("not several"), "{e}");
    }

    /// The experiment in `chaos run --help`.
    fn help_example() -> String {
        let yaml =
            RUN_HELP.split_once("(YAML):\n").and_then(|(_, rest)| rest.split_once("\nEvery fault step")).map(|(y, _)| y).expect("example");
        yaml.lines().map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l))).collect()
    }

    #[test]
    fn the_example_in_the_help_parses() {
        let text = help_example();
        let e = parse("help", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!((e.method.len(), e.rollbacks.len(), e.load.map(|l| l.profile.len())), (4, 1, Some(3)));
    }

    /// deploy/experiments/experiment.schema.json and the parser: the same
    /// files pass both, and the same mistakes are refused by both.
    #[test]
    fn the_schema_and_the_parser_agree() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/experiments");
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("experiment.schema.json")).expect("schema file")).expect("schema JSON");
        let v = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
        let as_json = |text: &str| -> serde_json::Value { serde_yaml_ng::from_str(text).expect("YAML") };
        let errors = |doc: &serde_json::Value| v.iter_errors(doc).map(|e| format!("{} at {}", e, e.instance_path())).collect::<Vec<_>>();
        let mut good: Vec<(String, String)> = vec![("help".into(), help_example()), ("GOOD".into(), GOOD.into())];
        for f in std::fs::read_dir(&dir).expect("dir").flatten().filter(|f| f.path().extension().is_some_and(|x| x == "yaml")) {
            good.push((f.path().display().to_string(), std::fs::read_to_string(f.path()).expect("read")));
        }
        for (name, text) in &good {
            parse(name, text).unwrap_or_else(|e| panic!("{e}"));
            assert!(v.is_valid(&as_json(text)), "{name}: {:?}", errors(&as_json(text)));
        }
        let load = "load:\n  profile:\n    - {phase: warmup, rate: 50, for: 5s}\nmethod:\n";
        let bad = [
            GOOD.replace("    selector:", "    selektor:"),
            GOOD.replace("duration: 20s", "duration: -5s"),
            GOOD.replace("duration: 20s", "duration: soon"),
            GOOD.replace("version: 1", "version: 2"),
            GOOD.replace("    duration: 20s\n", ""),
            GOOD.replace("    duration: 20s\n", "    duration: 20s\n    severity: 7\n"),
            GOOD.replace("    duration: 20s\n", "    duration: 20s\n    mode: some\n"),
            GOOD.replace("  - wait: 5s\n", "  - wait: 5s\n    duration: 5s\n"),
            GOOD.replace("  - wait: 5s\n", "  - wait: 5s\n    fault: --loss 1%\n"),
            GOOD.replace("  - wait: 5s\n", "  - parallel: []\n"),
            GOOD.replace("method:\n", &load.replace("rate: 50", "rate: 0")),
            GOOD.replace("method:\n", &load.replace("for: 5s", "for: 5s, burst: 2")),
            GOOD.replace("method:\n", &format!("{load}  - parallel:\n      - wait_for_load_phase: warmup\n")),
            GOOD.replace("method:\n", &format!("{load}  - wait_for_load_phase: warmup\n    after: 1s\n")),
            format!("{GOOD}rollbacks:\n  - wait_for_load_phase: warmup\n"),
            GOOD.replace("report:\n  metrics: [kafka.lag.total]\n", "report:\n  plot: true\n"),
        ];
        for text in &bad {
            assert!(parse("bad.yaml", text).is_err(), "the parser takes:\n{text}");
            assert!(!v.is_valid(&as_json(text)), "the schema takes:\n{text}");
        }
    }
}
