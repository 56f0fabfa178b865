//! Scenario verbs: `chaos scenario create|list|show|stop|watch`, `chaos queue`, `chaos audit`.

use std::time::Duration;

use chaos_proto::{
    convert::duration_to_pb,
    pb::{self, FaultState, ScenarioState, SelectionMode, coordinator_client::CoordinatorClient},
    spec::describe,
};
use clap::{ArgGroup, Subcommand};
use serde_json::json;

use crate::{
    agent::FaultArgs,
    conn::{coordinator_channel as channel, request, url},
    fleet::client,
    output::{CliError, Format, dur, emit, emit_json, exit, from_status, relative, rfc3339, table},
};

const CREATE_EXAMPLES: &str = "\
Examples:
  chaos scenario create --loss 10% --peer 198.18.0.0/24 --selector role=kafka --one --duration 2m --severity 2
  chaos scenario create --partition all --netns lab-kafka --agent-id kafka --duration 30s --severity 3 --watch
  chaos scenario create --pause-name java --selector role=cassandra --count 1 --duration 1m --severity 2
  chaos scenario create --latency 200ms --selector tier=web --percent 20 --duration 5m --dry-run

Every scenario passes admission first: the fleet must be armed, the scenario
type enabled, the fault within its severity level's caps, and the blast
radius (agents affected by running scenarios plus this one) within the limit.
Beyond max_concurrent_scenarios running, it waits in the queue (chaos queue).
--dry-run shows the agents it would select, the blast radius, and every rule
that would refuse it, without creating anything.";

#[derive(Debug, Subcommand)]
pub enum ScenarioCommand {
    /// Create a scenario: a fault on the agents a selector picks, for a duration.
    #[command(after_help = CREATE_EXAMPLES)]
    Create(Box<CreateArgs>),
    /// Scenarios, oldest first (the newest --limit).
    List {
        /// Only these states (repeatable): pending, queued, running, reverting, completed, stopped, aborted, failed.
        #[arg(long = "state", value_name = "STATE")]
        states: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One scenario with its transitions and per-agent results.
    Show { id: String },
    /// Cancel a queued scenario, or revert a running one now.
    Stop {
        id: String,
        #[arg(long, default_value = "stopped from the chaos CLI")]
        reason: String,
    },
    /// Follow a scenario until it ends. Exit 0 when it completed or was stopped, 1 failed, 3 aborted.
    Watch { id: String },
}

#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("mode").args(["all", "one", "count", "percent"])))]
pub struct CreateArgs {
    #[command(flatten)]
    fault: FaultArgs,
    /// Agents carrying this label KEY=VALUE (repeatable; all must match).
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    selector: Vec<String>,
    /// Only this agent id (repeatable).
    #[arg(long = "agent-id", value_name = "ID")]
    agent_ids: Vec<String>,
    /// Every eligible agent (the default).
    #[arg(long)]
    all: bool,
    /// One eligible agent at random.
    #[arg(long)]
    one: bool,
    /// N eligible agents at random.
    #[arg(long, value_name = "N")]
    count: Option<u32>,
    /// This percentage of the eligible agents at random (rounded down, at least one).
    #[arg(long, value_name = "P")]
    percent: Option<f64>,
    /// How long the fault holds [default: the coordinator's default_duration].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Severity 1 (gentlest) to 5 [default: the coordinator's default_severity].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5))]
    severity: Option<u32>,
    /// Abort the scenario (and revert its faults) when this rule fires while it
    /// runs (repeatable): METRIC[{LABEL=VALUE,...}] OP NUMBER [for DURATION],
    /// e.g. --stop-if 'kafka.lag.total > 100000 for 30s' --stop-if 'probe.up{probe=cassandra} < 1'.
    #[arg(long = "stop-if", value_name = "RULE")]
    stop_if: Vec<String>,
    /// A name shown in lists.
    #[arg(long)]
    name: Option<String>,
    /// Only evaluate admission; create nothing.
    #[arg(long)]
    dry_run: bool,
    /// After creating, follow it until it ends (like `chaos scenario watch`).
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Only entries this recent (`1h`, `30m`) or since this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

pub fn state_name(s: i32) -> String {
    ScenarioState::try_from(s).unwrap_or(ScenarioState::Unspecified).as_str_name().trim_start_matches("SCENARIO_STATE_").to_lowercase()
}

fn parse_state(s: &str) -> Result<i32, CliError> {
    ScenarioState::from_str_name(&format!("SCENARIO_STATE_{}", s.to_uppercase())).map(|s| s as i32).ok_or_else(|| {
        CliError::new(
            exit::USAGE,
            format!("--state: unknown state {s:?} (pending, queued, running, reverting, completed, stopped, aborted, failed)"),
        )
    })
}

fn fault_state(s: i32) -> String {
    FaultState::try_from(s).unwrap_or(FaultState::Unspecified).as_str_name().trim_start_matches("FAULT_STATE_").to_lowercase()
}

fn fault_text(sc: &pb::Scenario) -> String {
    sc.spec.as_ref().and_then(|s| s.fault.as_ref()).map(describe).unwrap_or_default()
}

fn blast_json(b: Option<&pb::BlastRadius>) -> serde_json::Value {
    b.map(|b| {
        json!({"affected_agents": b.affected_agents, "fleet_agents": b.fleet_agents, "fraction": b.fraction, "limit": b.limit,
            "group_affected_agents": b.group_affected_agents, "group_agents": b.group_agents, "group_fraction": b.group_fraction,
            "group_limit": b.group_limit})
    })
    .unwrap_or(serde_json::Value::Null)
}

fn blast_text(b: Option<&pb::BlastRadius>) -> String {
    b.map(|b| format!("{} of {} agents ({:.0} %, limit {:.0} %)", b.affected_agents, b.fleet_agents, b.fraction * 100.0, b.limit * 100.0))
        .unwrap_or_default()
}

fn agent_json(a: &pb::ScenarioAgent) -> serde_json::Value {
    json!({"agent_id": a.agent_id, "address": a.address, "fault_id": a.fault_id,
        "fault_state": fault_state(a.fault_state), "summary": a.summary, "backend": a.backend, "error": a.error,
        "revert_check": crate::agent::check_key(a.revert_check), "revert_check_detail": a.revert_check_detail,
        "applied_at": rfc3339(a.applied_at.as_ref()), "reverted_at": rfc3339(a.reverted_at.as_ref())})
}

pub fn scenario_json(sc: &pb::Scenario) -> serde_json::Value {
    json!({
        "id": sc.id, "name": sc.spec.as_ref().map(|s| s.name.clone()), "type": sc.scenario_type, "fault": fault_text(sc),
        "state": state_name(sc.state), "reason": sc.reason, "severity": sc.severity,
        "duration_s": crate::output::dur_secs(sc.duration.as_ref()), "queue_position": sc.queue_position,
        "created_by": sc.created_by, "created_at": rfc3339(sc.created_at.as_ref()), "started_at": rfc3339(sc.started_at.as_ref()),
        "ends_at": rfc3339(sc.ends_at.as_ref()), "ended_at": rfc3339(sc.ended_at.as_ref()),
        "blast_radius": blast_json(sc.blast_radius.as_ref()),
        "stop_conditions": sc.spec.as_ref().map(|s| s.stop_conditions.clone()).unwrap_or_default(),
        "agents": sc.agents.iter().map(agent_json).collect::<Vec<_>>(),
        "transitions": sc.transitions.iter().map(|t| json!({"at": rfc3339(t.at.as_ref()), "state": state_name(t.state), "reason": t.reason})).collect::<Vec<_>>(),
    })
}

fn scenario_rows(list: &[pb::Scenario]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let when = match ScenarioState::try_from(s.state) {
                Ok(ScenarioState::Queued) => format!("queue #{}", s.queue_position),
                Ok(ScenarioState::Running) if s.ends_at.is_some() => format!("ends {}", relative(s.ends_at.as_ref())),
                _ if s.ended_at.is_some() => format!("ended {}", relative(s.ended_at.as_ref())),
                _ => "-".into(),
            };
            vec![s.id.clone(), state_name(s.state), s.severity.to_string(), fault_text(s), s.agents.len().to_string(), when]
        })
        .collect();
    table(&["ID", "STATE", "SEV", "FAULT", "AGENTS", "WHEN"], &rows)
}

fn show_text(sc: &pb::Scenario) -> String {
    let mut out = format!(
        "scenario  {} ({})\nfault     {}\nstate     {}: {}\nseverity  {}   duration {}   blast radius {}\ncreated   {} by {}\n",
        sc.id,
        sc.spec.as_ref().map(|s| s.name.as_str()).unwrap_or(""),
        fault_text(sc),
        state_name(sc.state),
        sc.reason,
        sc.severity,
        dur(sc.duration.as_ref()),
        blast_text(sc.blast_radius.as_ref()),
        rfc3339(sc.created_at.as_ref()).unwrap_or_default(),
        sc.created_by,
    );
    for rule in sc.spec.iter().flat_map(|s| &s.stop_conditions) {
        out.push_str(&format!("stop if   {rule}\n"));
    }
    if sc.queue_position > 0 {
        out.push_str(&format!("queue     position {}\n", sc.queue_position));
    }
    if sc.ends_at.is_some() && sc.ended_at.is_none() {
        out.push_str(&format!("ends      {}\n", relative(sc.ends_at.as_ref())));
    }
    if !sc.agents.is_empty() {
        let rows: Vec<Vec<String>> = sc
            .agents
            .iter()
            .map(|a| {
                let check = match crate::agent::check_name(a.revert_check) {
                    "" => "-".to_string(),
                    "verified" => "verified".to_string(),
                    c => format!("{c}: {}", a.revert_check_detail),
                };
                vec![
                    a.agent_id.clone(),
                    fault_state(a.fault_state),
                    a.backend.clone(),
                    check,
                    if a.error.is_empty() { a.summary.clone() } else { a.error.clone() },
                ]
            })
            .collect();
        out.push_str(&table(&["AGENT", "FAULT", "BACKEND", "CHECK", "DETAIL"], &rows));
        out.push('\n');
    }
    let rows: Vec<Vec<String>> =
        sc.transitions.iter().map(|t| vec![rfc3339(t.at.as_ref()).unwrap_or_default(), state_name(t.state), t.reason.clone()]).collect();
    out.push_str(&table(&["AT", "STATE", "REASON"], &rows));
    out
}

fn outcome_code(state: i32) -> u8 {
    match ScenarioState::try_from(state) {
        Ok(ScenarioState::Completed | ScenarioState::Stopped) => exit::OK,
        Ok(ScenarioState::Aborted) => exit::REFUSED,
        _ => exit::FAILURE,
    }
}

impl CreateArgs {
    fn spec(&self) -> Result<pb::ScenarioSpec, CliError> {
        let labels = crate::output::key_values("--selector", &self.selector)?;
        let mode = match (self.one, self.count, self.percent) {
            (true, ..) => SelectionMode::One,
            (_, Some(_), _) => SelectionMode::Count,
            (_, _, Some(_)) => SelectionMode::Percent,
            _ => SelectionMode::All,
        };
        Ok(pb::ScenarioSpec {
            name: self.name.clone().unwrap_or_default(),
            fault: Some(self.fault.spec()?),
            selector: Some(pb::AgentSelector { labels, agent_ids: self.agent_ids.clone() }),
            mode: mode as i32,
            count: self.count.unwrap_or(0),
            percent: self.percent.unwrap_or(0.0),
            duration: self.duration.map(duration_to_pb),
            severity: self.severity.unwrap_or(0),
            stop_conditions: {
                chaos_proto::rules::parse_all("--stop-if", &self.stop_if).map_err(|e| CliError::new(exit::USAGE, e))?;
                self.stop_if.clone()
            },
        })
    }
}

fn admission_text(a: &pb::Admission) -> String {
    let mut out = format!(
        "type {}  severity {}  duration {}\nselected {} agent(s): {}\nblast radius {}",
        a.scenario_type,
        a.severity,
        dur(a.duration.as_ref()),
        a.selected_agent_ids.len(),
        a.selected_agent_ids.join(", "),
        blast_text(a.blast_radius.as_ref())
    );
    if let Some(b) = a.blast_radius.as_ref().filter(|b| b.group_agents > 0 && b.group_agents < b.fleet_agents) {
        out.push_str(&format!(
            "; in its group {} of {} ({:.0} %, group limit {:.0} %)",
            b.group_affected_agents,
            b.group_agents,
            b.group_fraction * 100.0,
            b.group_limit * 100.0
        ));
    }
    for n in &a.notes {
        out.push_str(&format!("\nnote: {n}"));
    }
    out
}

async fn watch(coordinator: &str, fmt: Format, id: String) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    // The stream lives as long as the scenario: no per-call deadline.
    let mut c = CoordinatorClient::new(channel(coordinator, Duration::from_secs(365 * 24 * 3600))?);
    let mut stream = c.watch_scenario(pb::WatchScenarioRequest { id }).await.map_err(|s| from_status(&server, s))?.into_inner();
    let mut last = 0;
    while let Some(ev) = stream.message().await.map_err(|s| from_status(&server, s))? {
        last = ev.state;
        match fmt {
            Format::Json => emit_json(&json!({"at": rfc3339(ev.at.as_ref()), "state": state_name(ev.state), "agent_id": ev.agent_id,
                "message": ev.message, "scenario": ev.scenario.as_ref().map(scenario_json), "agent": ev.agent.as_ref().map(agent_json)})),
            Format::Table => {
                let at = rfc3339(ev.at.as_ref()).unwrap_or_default();
                let who = if ev.agent_id.is_empty() { String::new() } else { format!(" [{}]", ev.agent_id) };
                emit(&format!("{at}  {:<9}{who} {}", state_name(ev.state), ev.message));
            }
        }
    }
    Ok(outcome_code(last))
}

pub async fn run(cmd: ScenarioCommand, coordinator: &str, timeout: Duration, fmt: Format) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let st = |s| from_status(&server, s);
    match cmd {
        ScenarioCommand::Create(a) => {
            let r = client(coordinator, timeout)?
                .create_scenario(request(pb::CreateScenarioRequest { spec: Some(a.spec()?), dry_run: a.dry_run }))
                .await
                .map_err(st)?
                .into_inner();
            let adm = r.admission.unwrap_or_default();
            match (&r.scenario, fmt) {
                (_, Format::Json) => emit_json(&json!({
                    "admission": {"admitted": adm.admitted, "queued": adm.queued, "queue_position": adm.queue_position,
                        "selected_agent_ids": adm.selected_agent_ids, "blast_radius": blast_json(adm.blast_radius.as_ref()),
                        "refusals": adm.refusals, "notes": adm.notes, "scenario_type": adm.scenario_type, "severity": adm.severity,
                        "duration_s": crate::output::dur_secs(adm.duration.as_ref())},
                    "scenario": r.scenario.as_ref().map(scenario_json),
                })),
                (None, Format::Table) => {
                    let verdict = if adm.admitted && adm.queued {
                        format!("dry run: would be QUEUED at position {}", adm.queue_position)
                    } else if adm.admitted {
                        "dry run: would be ADMITTED and start now".to_string()
                    } else {
                        "dry run: would be REFUSED".to_string()
                    };
                    emit(&format!("{verdict}\n{}", admission_text(&adm)));
                    for r in &adm.refusals {
                        emit(&format!("refused: {r}"));
                    }
                }
                (Some(sc), Format::Table) => {
                    let what = if adm.queued { format!("QUEUED at position {}", adm.queue_position) } else { "RUNNING".into() };
                    emit(&format!(
                        "scenario {} {what}\n{}\nfollow: chaos scenario watch {}   stop: chaos scenario stop {}",
                        sc.id,
                        admission_text(&adm),
                        sc.id,
                        sc.id
                    ));
                }
            }
            if a.dry_run {
                return Ok(if adm.admitted { exit::OK } else { exit::REFUSED });
            }
            if let (true, Some(sc)) = (a.watch, r.scenario) {
                return watch(coordinator, fmt, sc.id).await;
            }
        }
        ScenarioCommand::List { states, limit } => {
            let states = states.iter().map(|s| parse_state(s)).collect::<Result<Vec<_>, _>>()?;
            let r =
                client(coordinator, timeout)?.list_scenarios(pb::ListScenariosRequest { states, limit }).await.map_err(st)?.into_inner();
            match fmt {
                Format::Json => emit_json(&json!({"scenarios": r.scenarios.iter().map(scenario_json).collect::<Vec<_>>()})),
                Format::Table if r.scenarios.is_empty() => emit("no scenarios"),
                Format::Table => emit(&scenario_rows(&r.scenarios)),
            }
        }
        ScenarioCommand::Show { id } => {
            let sc = client(coordinator, timeout)?.get_scenario(pb::GetScenarioRequest { id }).await.map_err(st)?.into_inner();
            match fmt {
                Format::Json => emit_json(&scenario_json(&sc)),
                Format::Table => emit(&show_text(&sc)),
            }
        }
        ScenarioCommand::Stop { id, reason } => {
            let sc = client(coordinator, timeout)?
                .stop_scenario(request(pb::StopScenarioRequest { id, reason }))
                .await
                .map_err(st)?
                .into_inner();
            match fmt {
                Format::Json => emit_json(&scenario_json(&sc)),
                Format::Table => emit(&format!("scenario {}: {} ({})", sc.id, state_name(sc.state), sc.reason)),
            }
        }
        ScenarioCommand::Watch { id } => return watch(coordinator, fmt, id).await,
    }
    Ok(exit::OK)
}

/// `chaos queue`: running scenarios and the queue behind them.
pub async fn queue(coordinator: &str, timeout: Duration, fmt: Format) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let states =
        [ScenarioState::Pending, ScenarioState::Queued, ScenarioState::Running, ScenarioState::Reverting].map(|s| s as i32).to_vec();
    let mut c = client(coordinator, timeout)?;
    let r = c.list_scenarios(pb::ListScenariosRequest { states, limit: 1000 }).await.map_err(|s| from_status(&server, s))?.into_inner();
    let status = c.get_status(pb::GetStatusRequest {}).await.map_err(|s| from_status(&server, s))?.into_inner();
    let (mut queued, running): (Vec<_>, Vec<_>) = r.scenarios.into_iter().partition(|s| s.state == ScenarioState::Queued as i32);
    queued.sort_by_key(|s| s.queue_position);
    match fmt {
        Format::Json => emit_json(&json!({
            "max_concurrent_scenarios": status.max_concurrent_scenarios, "armed": status.armed,
            "running": running.iter().map(scenario_json).collect::<Vec<_>>(),
            "queued": queued.iter().map(scenario_json).collect::<Vec<_>>(),
        })),
        Format::Table => {
            emit(&format!(
                "{} of {} slots in use, {} queued{}",
                running.len(),
                status.max_concurrent_scenarios,
                queued.len(),
                if status.armed { "" } else { "; fleet DISARMED (nothing starts until chaos arm)" }
            ));
            if !running.is_empty() {
                emit(&scenario_rows(&running));
            }
            if !queued.is_empty() {
                emit(&scenario_rows(&queued));
            }
        }
    }
    Ok(exit::OK)
}

/// `chaos audit`: who did what, when, with what outcome.
pub async fn audit(coordinator: &str, timeout: Duration, fmt: Format, a: AuditArgs) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let since = match &a.since {
        None => None,
        Some(s) => Some(match humantime::parse_duration(s) {
            Ok(d) => std::time::SystemTime::now() - d,
            Err(_) => humantime::parse_rfc3339_weak(s)
                .map_err(|_| CliError::new(exit::USAGE, format!("--since: expected a duration like 1h or an RFC 3339 time, got {s:?}")))?,
        }),
    };
    let r = client(coordinator, timeout)?
        .list_audit(pb::ListAuditRequest { since: since.map(chaos_proto::convert::timestamp_to_pb), limit: a.limit })
        .await
        .map_err(|s| from_status(&server, s))?
        .into_inner();
    match fmt {
        Format::Json => emit_json(&json!({"entries": r.entries.iter().map(|e| json!({"id": e.id, "at": rfc3339(e.at.as_ref()),
            "actor": e.actor, "actor_name": e.actor_name, "actor_role": e.actor_role, "peer_address": e.peer_address,
            "client_note": e.client_note, "action": e.action, "target": e.target, "detail": e.detail, "outcome": e.outcome})).collect::<Vec<_>>()})),
        Format::Table if r.entries.is_empty() => emit("no audit entries"),
        Format::Table => {
            let rows: Vec<Vec<String>> = r
                .entries
                .iter()
                .map(|e| {
                    vec![
                        rfc3339(e.at.as_ref()).unwrap_or_default(),
                        if e.client_note.is_empty() { e.actor.clone() } else { format!("{} [{}]", e.actor, e.client_note) },
                        e.action.clone(),
                        e.target.clone(),
                        e.outcome.clone(),
                        e.detail.clone(),
                    ]
                })
                .collect();
            emit(&table(&["AT", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAIL"], &rows));
        }
    }
    Ok(exit::OK)
}
