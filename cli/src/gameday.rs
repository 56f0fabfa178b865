//! `chaos gameday start|status|history|stop`: random chaos inside the
//! safety rules (the coordinator's GameDay).

use std::time::Duration;

use chaos_proto::{
    convert::duration_to_pb,
    pb::{self, GameDayState},
};
use clap::Subcommand;
use serde_json::json;

use crate::{
    conn::{request, url},
    experiment::fault_from_flags,
    fleet::client,
    output::{CliError, Format, dur, emit, emit_json, exit, from_status, key_values, relative, rfc3339, table},
};

const START_HELP: &str = "\
Every --every, the coordinator picks one --action at random and one eligible
agent at random among --targets (healthy, unprotected, supporting the
action's family, not already under a fault), and creates a scenario for it:
every admission rule applies (armed, severity caps, blast radius, concurrency),
and a refusal is recorded in the history, never forced. The GameDay ends on its
own after --for, early when a --stop-if SLO fires (ABORTED), on `chaos gameday
stop`, and on emergency stop. Its running actions are reverted when it ends.

An action is the flags of `chaos agent apply` (without --duration), optionally
named: 'NAME=FLAGS'.

Examples:
  chaos gameday start --every 10s --for 30m --targets role=app \\
      --action 'pause java=--pause-name java' --action 'cpu=--cpu 80% --workers 2' \\
      --stop-if 'kafka.lag.total > 50000 for 30s' --severity 2
  chaos gameday start --every 5s --for 2m --targets role=processor --action '--loss 20%' --follow
  chaos gameday status
  chaos gameday history --last 20
  chaos gameday stop --reason 'enough for today'

Exit codes with --follow: 0 it completed or was stopped, 9 an SLO or an
emergency stop aborted it.";

#[derive(Debug, Subcommand)]
pub enum GameDayCommand {
    /// Start a GameDay (one at a time).
    #[command(after_help = START_HELP)]
    Start(Box<StartArgs>),
    /// The current (or last) GameDay: state, counts, time left, the newest picks.
    Status,
    /// What the GameDay did: time, target, action, result, and the scenario's outcome.
    History {
        /// Only the newest N entries (0: every kept entry).
        #[arg(long, default_value_t = 0)]
        last: u32,
    },
    /// End the running GameDay now; its running actions are reverted.
    Stop {
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The interval between picks (at least 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Duration,
    /// The time box: the GameDay ends on its own after this long (at most 24h).
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    time_box: Duration,
    /// The hosts it may pick from, by agent label (repeatable; all must match).
    #[arg(long = "targets", value_name = "KEY=VALUE")]
    targets: Vec<String>,
    /// Only these agent ids (repeatable).
    #[arg(long = "agent-id", value_name = "ID")]
    agent_ids: Vec<String>,
    /// An action: the flags of `chaos agent apply`, optionally 'NAME=FLAGS' (repeatable, at least one).
    #[arg(long = "action", value_name = "[NAME=]FLAGS", required = true)]
    actions: Vec<String>,
    /// How long each action holds (default: --every minus 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    action_duration: Option<Duration>,
    /// Severity of every action (1..5; default: the coordinator's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5))]
    severity: Option<u32>,
    /// An SLO: a rule that ends the GameDay (ABORTED) when it fires (repeatable).
    #[arg(long = "stop-if", value_name = "RULE")]
    stop_if: Vec<String>,
    /// History entries kept (default 100).
    #[arg(long, value_name = "N")]
    history: Option<u32>,
    /// Seed of the random picks, to replay a GameDay (default: random).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value = "gameday")]
    name: String,
    /// Stay and print each pick until the GameDay ends; Ctrl-C stops it.
    #[arg(long)]
    follow: bool,
}

/// `NAME=FLAGS` or `FLAGS`: a name is text before '=' that does not start a flag.
fn action(text: &str) -> Result<pb::GameDayAction, CliError> {
    let (name, flags) = match text.split_once('=') {
        Some((n, f)) if !n.trim_start().starts_with('-') => (n.trim().to_string(), f),
        _ => (String::new(), text),
    };
    let fault = fault_from_flags(flags).map_err(|m| CliError::new(exit::USAGE, format!("--action: {m}")))?;
    Ok(pb::GameDayAction { name, fault: Some(fault) })
}

fn spec(a: &StartArgs) -> Result<pb::GameDaySpec, CliError> {
    Ok(pb::GameDaySpec {
        name: a.name.clone(),
        targets: Some(pb::AgentSelector { labels: key_values("--targets", &a.targets)?, agent_ids: a.agent_ids.clone() }),
        actions: a.actions.iter().map(|t| action(t)).collect::<Result<_, _>>()?,
        every: Some(duration_to_pb(a.every)),
        action_duration: a.action_duration.map(duration_to_pb),
        time_box: Some(duration_to_pb(a.time_box)),
        severity: a.severity.unwrap_or(0),
        stop_conditions: a.stop_if.clone(),
        history_limit: a.history.unwrap_or(0),
        seed: a.seed.unwrap_or(0),
    })
}

fn state_text(s: i32) -> String {
    GameDayState::try_from(s).unwrap_or(GameDayState::Unspecified).as_str_name().trim_start_matches("GAME_DAY_STATE_").to_lowercase()
}

fn tick_json(t: &pb::GameDayTick) -> serde_json::Value {
    json!({"n": t.n, "at": rfc3339(t.at.as_ref()), "action": t.action, "agent_id": t.agent_id, "scenario_id": t.scenario_id,
        "result": t.result, "outcome": t.outcome})
}

fn gameday_json(g: &pb::GameDay) -> serde_json::Value {
    let s = g.spec.clone().unwrap_or_default();
    json!({
        "id": g.id, "name": s.name, "state": state_text(g.state), "reason": g.reason,
        "started_at": rfc3339(g.started_at.as_ref()), "ends_at": rfc3339(g.ends_at.as_ref()), "ended_at": rfc3339(g.ended_at.as_ref()),
        "every": dur(s.every.as_ref()), "action_duration": dur(s.action_duration.as_ref()), "time_box": dur(s.time_box.as_ref()),
        "seed": s.seed, "stop_conditions": s.stop_conditions,
        "actions": s.actions.iter().map(|a| json!({"name": a.name, "fault": a.fault.as_ref().map(chaos_proto::spec::describe)})).collect::<Vec<_>>(),
        "ticks": g.ticks, "injected": g.injected, "refused": g.refused, "skipped": g.skipped,
        "max_agents_affected": g.max_agents_affected, "fleet_agents": g.fleet_agents,
        "history": g.history.iter().map(tick_json).collect::<Vec<_>>(),
    })
}

fn tick_row(t: &pb::GameDayTick) -> Vec<String> {
    vec![
        t.n.to_string(),
        rfc3339(t.at.as_ref()).unwrap_or_default(),
        if t.agent_id.is_empty() { "-".into() } else { t.agent_id.clone() },
        if t.action.is_empty() { "-".into() } else { t.action.clone() },
        if t.scenario_id.is_empty() { "-".into() } else { t.scenario_id.clone() },
        t.result.clone(),
        if t.outcome.is_empty() && !t.scenario_id.is_empty() { "running".into() } else { t.outcome.to_lowercase() },
    ]
}

const TICK_HEADERS: [&str; 7] = ["#", "AT", "TARGET", "ACTION", "SCENARIO", "RESULT", "OUTCOME"];

fn print(g: &pb::GameDay, history: bool) {
    let s = g.spec.clone().unwrap_or_default();
    let running = g.state == GameDayState::Running as i32;
    emit(&format!(
        "GameDay {} ({}): {}{}",
        g.id,
        s.name,
        state_text(g.state).to_uppercase(),
        if running { format!(", ends {}", relative(g.ends_at.as_ref())) } else { format!(" — {}", g.reason) }
    ));
    emit(&format!(
        "  every {}, each action {}, time box {}, seed {}{}",
        dur(s.every.as_ref()),
        dur(s.action_duration.as_ref()),
        dur(s.time_box.as_ref()),
        s.seed,
        if s.stop_conditions.is_empty() { String::new() } else { format!(", SLOs: {}", s.stop_conditions.join("; ")) }
    ));
    emit(&format!(
        "  picks {}: {} injected, {} refused by admission, {} skipped; at most {} of {} agents under faults at once",
        g.ticks, g.injected, g.refused, g.skipped, g.max_agents_affected, g.fleet_agents
    ));
    if history && !g.history.is_empty() {
        emit(&table(&TICK_HEADERS, &g.history.iter().map(tick_row).collect::<Vec<_>>()));
    }
}

pub async fn run(c: GameDayCommand, coordinator: &str, timeout: Duration, fmt: Format) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let mut cl = client(coordinator, timeout)?;
    let show = |g: &pb::GameDay, history: bool| match fmt {
        Format::Json => emit_json(&gameday_json(g)),
        Format::Table => print(g, history),
    };
    match c {
        GameDayCommand::Start(a) => {
            let spec = spec(&a)?;
            let g = cl
                .start_game_day(request(pb::StartGameDayRequest { spec: Some(spec) }))
                .await
                .map_err(|s| from_status(&server, s))?
                .into_inner();
            show(&g, false);
            if a.follow { follow(coordinator, timeout, fmt, g).await } else { Ok(exit::OK) }
        }
        GameDayCommand::Status => {
            let g = cl.get_game_day(pb::GetGameDayRequest { history: 10 }).await.map_err(|s| from_status(&server, s))?.into_inner();
            show(&g, true);
            Ok(exit::OK)
        }
        GameDayCommand::History { last } => {
            let g = cl.get_game_day(pb::GetGameDayRequest { history: last }).await.map_err(|s| from_status(&server, s))?.into_inner();
            match fmt {
                Format::Json => emit_json(&json!({"id": g.id, "history": g.history.iter().map(tick_json).collect::<Vec<_>>()})),
                Format::Table => emit(&table(&TICK_HEADERS, &g.history.iter().map(tick_row).collect::<Vec<_>>())),
            }
            Ok(exit::OK)
        }
        GameDayCommand::Stop { reason } => {
            let g = cl.stop_game_day(request(pb::StopGameDayRequest { reason })).await.map_err(|s| from_status(&server, s))?.into_inner();
            show(&g, false);
            Ok(exit::OK)
        }
    }
}

/// Print each new pick (and outcome) until the GameDay ends; Ctrl-C stops it.
async fn follow(coordinator: &str, timeout: Duration, fmt: Format, mut g: pb::GameDay) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let mut cl = client(coordinator, timeout)?;
    let mut shown = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let from = shown;
        for t in g.history.iter().filter(|t| t.n > from) {
            match fmt {
                Format::Json => emit_json(&tick_json(t)),
                Format::Table => emit(&format!(
                    "  #{} {} {} on {}: {}",
                    t.n,
                    rfc3339(t.at.as_ref()).unwrap_or_default(),
                    if t.action.is_empty() { "-" } else { &t.action },
                    if t.agent_id.is_empty() { "-" } else { &t.agent_id },
                    if t.scenario_id.is_empty() { t.result.clone() } else { format!("{} ({})", t.result, t.scenario_id) }
                )),
            }
            shown = t.n;
        }
        if g.state != GameDayState::Running as i32 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut ctrl_c => {
                emit("Ctrl-C: stopping the GameDay (its running actions are reverted)");
                g = cl.stop_game_day(request(pb::StopGameDayRequest { reason: "Ctrl-C in chaos gameday --follow".into() }))
                    .await
                    .map_err(|s| from_status(&server, s))?
                    .into_inner();
                continue;
            }
        }
        g = cl.get_game_day(pb::GetGameDayRequest { history: 0 }).await.map_err(|s| from_status(&server, s))?.into_inner();
    }
    match fmt {
        Format::Json => emit_json(&gameday_json(&pb::GameDay { history: vec![], ..g.clone() })),
        Format::Table => print(&g, true),
    }
    Ok(if g.state == GameDayState::Aborted as i32 { exit::ABORTED } else { exit::OK })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_take_an_optional_name_before_the_flags() {
        let a = action("pause java=--pause-name java").expect("named");
        assert_eq!(a.name, "pause java");
        assert!(matches!(a.fault.and_then(|f| f.fault), Some(pb::fault_spec::Fault::ProcessPause(_))));
        let a = action("--cpu 50% --workers 2").expect("unnamed");
        assert!(a.name.is_empty());
        // '=' inside the flags is not a name.
        let a = action("--loss 10%").expect("loss");
        assert!(a.name.is_empty() && a.fault.is_some());
        let e = action("x=--explode 1").expect_err("bad flag");
        assert!(e.message.starts_with("--action: fault \"--explode 1\""), "{}", e.message);
    }
}
