//! Coordinator verbs: `agents`, `status`, `emergency-stop`, `arm`.

use std::time::Duration;

use chaos_proto::pb::{self, AgentHealth, coordinator_client::CoordinatorClient};
use serde_json::json;

use crate::{
    conn::{coordinator_channel as channel, url},
    output::{CliError, Format, dur, dur_secs, emit, emit_json, exit, from_status, labels_text, relative, rfc3339, table},
};

#[derive(Debug, clap::Args)]
pub struct EmergencyStopArgs {
    /// Why; recorded by the coordinator and every agent.
    #[arg(long, default_value = "emergency stop from the chaos CLI")]
    reason: String,
    /// Per-agent deadline [default: the coordinator's, 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
}

#[derive(Debug, clap::Args)]
pub struct ArmArgs {
    /// Why; recorded in the logs.
    #[arg(long, default_value = "armed from the chaos CLI")]
    reason: String,
}

pub fn client(coordinator: &str, timeout: Duration) -> Result<CoordinatorClient<tonic::transport::Channel>, CliError> {
    Ok(CoordinatorClient::new(channel(coordinator, timeout)?))
}

fn health_name(h: i32) -> &'static str {
    match AgentHealth::try_from(h).unwrap_or(AgentHealth::Unspecified) {
        AgentHealth::Healthy => "healthy",
        AgentHealth::Late => "late",
        AgentHealth::Lost => "lost",
        AgentHealth::Unspecified => "unknown",
    }
}

pub async fn agents(coordinator: &str, timeout: Duration, fmt: Format) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let r = client(coordinator, timeout)?.list_agents(pb::ListAgentsRequest {}).await.map_err(|s| from_status(&server, s))?.into_inner();
    match fmt {
        Format::Json => emit_json(&json!({"agents": r.agents.iter().map(|a| json!({
            "agent_id": a.agent_id, "hostname": a.hostname, "address": a.address,
            "instance_id": a.instance_id, "registered_by": a.registered_by,
            "health": health_name(a.health), "lease_age_s": dur_secs(a.lease_age.as_ref()),
            "lease_s": dur_secs(a.lease_duration.as_ref()), "active_faults": a.active_faults,
            "heartbeat": if a.heartbeat_streamed { "stream" } else { "unary" },
            "labels": a.labels, "last_seen_at": rfc3339(a.last_seen_at.as_ref()),
            "armed": a.capabilities.as_ref().map(|c| c.armed),
        })).collect::<Vec<_>>()})),
        Format::Table if r.agents.is_empty() => emit("no agents registered (start one with: chaos-agent --coordinator URL)"),
        Format::Table => {
            let rows: Vec<Vec<String>> = r
                .agents
                .iter()
                .map(|a| {
                    vec![
                        a.agent_id.clone(),
                        a.address.clone(),
                        health_name(a.health).into(),
                        format!("{} / {}", dur(a.lease_age.as_ref()), dur(a.lease_duration.as_ref())),
                        a.active_faults.to_string(),
                        labels_text(&a.labels),
                    ]
                })
                .collect();
            emit(&table(&["AGENT", "ADDRESS", "HEALTH", "LEASE AGE / LEASE", "FAULTS", "LABELS"], &rows));
        }
    }
    Ok(exit::OK)
}

pub async fn status(coordinator: &str, timeout: Duration, fmt: Format) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let s = client(coordinator, timeout)?.get_status(pb::GetStatusRequest {}).await.map_err(|s| from_status(&server, s))?.into_inner();
    match fmt {
        Format::Json => emit_json(&json!({
            "version": s.version, "armed": s.armed, "disarmed_reason": s.disarmed_reason,
            "disarmed_at": rfc3339(s.disarmed_at.as_ref()), "agents_total": s.agents_total,
            "agents_healthy": s.agents_healthy, "agents_late": s.agents_late, "agents_lost": s.agents_lost,
            "active_faults": s.active_faults, "uptime_s": dur_secs(s.uptime.as_ref()), "listen_address": s.listen_address,
            "scenarios_running": s.scenarios_running, "scenarios_queued": s.scenarios_queued,
            "max_concurrent_scenarios": s.max_concurrent_scenarios, "blast_radius_limit": s.blast_radius_limit,
            "tls_identity": s.tls_identity, "tls_not_after": rfc3339(s.tls_not_after.as_ref()),
        })),
        Format::Table => {
            let armed = if s.armed {
                "yes".to_string()
            } else {
                format!(
                    "NO — disarmed {} ({}); run `chaos arm` to accept faults again",
                    relative(s.disarmed_at.as_ref()),
                    s.disarmed_reason
                )
            };
            let tls = if s.tls_identity.is_empty() {
                "OFF (--insecure)".to_string()
            } else {
                format!("{} until {}", s.tls_identity, rfc3339(s.tls_not_after.as_ref()).unwrap_or_default())
            };
            emit(&format!(
                "coordinator  {} (v{}, up {})\ntls          {}\narmed        {}\nagents       {} total: {} healthy, {} late, {} lost\nfaults       {} active\nscenarios    {} running (limit {}), {} queued; blast radius limit {:.0} %",
                s.listen_address,
                s.version,
                dur(s.uptime.as_ref()),
                tls,
                armed,
                s.agents_total,
                s.agents_healthy,
                s.agents_late,
                s.agents_lost,
                s.active_faults,
                s.scenarios_running,
                s.max_concurrent_scenarios,
                s.scenarios_queued,
                s.blast_radius_limit * 100.0
            ));
        }
    }
    Ok(exit::OK)
}

pub async fn emergency_stop(coordinator: &str, timeout: Duration, fmt: Format, a: EmergencyStopArgs) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let req =
        crate::conn::request(pb::EmergencyStopRequest { reason: a.reason, deadline: a.deadline.map(chaos_proto::convert::duration_to_pb) });
    let r = client(coordinator, timeout)?.emergency_stop(req).await.map_err(|s| from_status(&server, s))?.into_inner();
    match fmt {
        Format::Json => emit_json(&json!({
            "armed": r.armed, "agents_reached": r.agents_reached, "agents_unreached": r.agents_unreached,
            "faults_reverted": r.faults_reverted, "faults_failed": r.faults_failed, "faults_in_progress": r.faults_in_progress,
            "complete": r.complete,
            "took_s": dur_secs(r.took.as_ref()),
            "results": r.results.iter().map(|x| json!({
                "agent_id": x.agent_id, "address": x.address, "reached": x.reached,
                "duplicate": x.duplicate, "instance_id": x.instance_id,
                "reverted_count": x.reverted_count, "failed_count": x.failed_count, "in_progress_count": x.in_progress_count,
                "error": x.error,
                "lease_revert_by": rfc3339(x.lease_revert_by.as_ref()), "took_s": dur_secs(x.took.as_ref()),
            })).collect::<Vec<_>>(),
        })),
        Format::Table => {
            let rows: Vec<Vec<String>> = r
                .results
                .iter()
                .map(|x| {
                    let outcome = if x.reached {
                        if x.failed_count > 0 || x.in_progress_count > 0 {
                            format!("{} failed, {} still reverting: {}", x.failed_count, x.in_progress_count, x.error)
                        } else {
                            "ok".into()
                        }
                    } else {
                        format!("NOT REACHED ({}); its lease reverts its faults {}", x.error, relative(x.lease_revert_by.as_ref()))
                    };
                    let agent = if x.duplicate {
                        format!("{} (DUPLICATE process {} at {})", x.agent_id, x.instance_id, x.address)
                    } else {
                        x.agent_id.clone()
                    };
                    vec![agent, x.reverted_count.to_string(), dur(x.took.as_ref()), outcome]
                })
                .collect();
            if !rows.is_empty() {
                emit(&table(&["AGENT", "REVERTED", "TOOK", "OUTCOME"], &rows));
            }
            let verdict = if r.complete {
                "every agent confirmed".to_string()
            } else {
                format!(
                    "INCOMPLETE: {} not reached, {} revert(s) failed, {} still reverting; faults may still be applied there",
                    r.agents_unreached, r.faults_failed, r.faults_in_progress
                )
            };
            emit(&format!(
                "emergency stop: {} fault(s) reverted on {} agent(s), {verdict}, in {}. Fleet DISARMED: run `chaos arm` to accept faults again.",
                r.faults_reverted,
                r.agents_reached,
                dur(r.took.as_ref())
            ));
        }
    }
    Ok(if !r.complete || r.agents_unreached > 0 || r.faults_failed > 0 { exit::PARTIAL } else { exit::OK })
}

pub async fn arm(coordinator: &str, timeout: Duration, fmt: Format, a: ArmArgs) -> Result<u8, CliError> {
    let server = format!("coordinator {}", url(coordinator));
    let r = client(coordinator, timeout)?
        .arm(crate::conn::request(pb::ArmRequest { reason: a.reason }))
        .await
        .map_err(|s| from_status(&server, s))?
        .into_inner();
    match fmt {
        Format::Json => emit_json(&json!({"armed": r.armed, "agents_not_reached": r.agents_not_reached})),
        Format::Table if r.agents_not_reached.is_empty() => emit("fleet armed: faults are accepted again"),
        Format::Table => {
            emit(&format!("fleet armed; not told directly (they follow on their next heartbeat): {}", r.agents_not_reached.join(", ")))
        }
    }
    Ok(exit::OK)
}
