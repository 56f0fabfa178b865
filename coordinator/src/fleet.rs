//! Fan-out to every agent at once: emergency stop (RevertAll + disarm) and
//! arm (SetArmed). Each call has its own deadline so one dead agent never
//! delays the answer about the others; an agent not reached reverts by its
//! own dead-man lease, and the answer says by when.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chaos_proto::{
    convert::{duration_to_pb, timestamp_to_pb},
    pb,
};
use futures::{FutureExt, StreamExt, stream};
use tracing::{info, warn};

use crate::{registry::Registry, scenarios::Scenarios};

/// One process emergency stop must hear from.
struct StopTarget {
    agent_id: String,
    address: String,
    instance_id: String,
    client: pb::agent_client::AgentClient<tonic::transport::Channel>,
    /// When the agent's own lease reverts its faults (`None`: cannot be told).
    lease_revert_by: Option<std::time::SystemTime>,
    duplicate: bool,
}

/// Disarm the fleet, then revert every fault on every agent concurrently.
pub async fn emergency_stop(
    registry: &Registry,
    scenarios: &Arc<Scenarios>,
    reason: &str,
    deadline: Duration,
) -> pb::EmergencyStopResponse {
    let started = Instant::now();
    // Disarm first: any heartbeat answered from now on tells the agent to
    // revert, even if the direct call below cannot reach it. A disarmed
    // fleet starts no queued scenario.
    registry.disarm(reason);
    // Every agent known (lost ones too: an agent silent for its lease may
    // have died holding faults), and every process refused as a duplicate
    // of an agent id while its own lease could still run.
    let mut targets: Vec<StopTarget> = registry
        .agents()
        .into_iter()
        .map(|a| StopTarget {
            lease_revert_by: a.lease_revert_by(),
            agent_id: a.agent_id,
            address: a.address,
            instance_id: a.instance_id,
            client: a.client,
            duplicate: false,
        })
        .collect();
    targets.extend(registry.contenders().into_iter().map(|c| StopTarget {
        lease_revert_by: c.seen_wall.checked_add(c.lease),
        agent_id: c.agent_id,
        address: c.address,
        instance_id: c.instance_id,
        client: c.client,
        duplicate: true,
    }));
    warn!(reason, agents = targets.len(), deadline = ?deadline, "EMERGENCY STOP: reverting every fault on every agent");
    let calls = targets.into_iter().map(|t| guarded_stop(t, reason.to_string(), deadline));
    let results: Vec<pb::AgentStopResult> =
        stream::iter(calls).buffer_unordered(scenarios.policy().fanout_parallelism.max(1)).collect().await;
    // Only now end the scenarios (queue cancelled, runners confirm the
    // reverts): their runners' RevertFault calls would otherwise race the
    // RevertAll above for the same faults.
    scenarios.abort_all(reason);
    for r in results.iter().filter(|r| r.reached && !r.duplicate) {
        // What is left on a reached agent is what it failed, or has not yet finished, to revert.
        registry.set_active_faults(&r.agent_id, r.failed_count.saturating_add(r.in_progress_count));
    }
    let reached = results.iter().filter(|r| r.reached).count();
    // Counts come from agents: saturate rather than overflow.
    let faults_reverted = results.iter().fold(0u32, |n, r| n.saturating_add(r.reverted_count));
    let faults_failed = results.iter().fold(0u32, |n, r| n.saturating_add(r.failed_count));
    let faults_in_progress = results.iter().fold(0u32, |n, r| n.saturating_add(r.in_progress_count));
    let resp = pb::EmergencyStopResponse {
        agents_reached: u32::try_from(reached).unwrap_or(u32::MAX),
        agents_unreached: u32::try_from(results.len().saturating_sub(reached)).unwrap_or(u32::MAX),
        faults_reverted,
        armed: false,
        took: Some(duration_to_pb(started.elapsed())),
        faults_failed,
        faults_in_progress,
        complete: reached == results.len() && faults_failed == 0 && faults_in_progress == 0,
        results,
    };
    if resp.complete {
        info!(reached = resp.agents_reached, faults_reverted, took = ?started.elapsed(), "emergency stop done; fleet disarmed until Arm");
    } else {
        warn!(reached = resp.agents_reached, unreached = resp.agents_unreached, faults_reverted, faults_failed, faults_in_progress, took = ?started.elapsed(),
            "emergency stop INCOMPLETE: some agents did not confirm every revert; fleet disarmed until Arm");
    }
    resp
}

/// [`stop_one`], where a panic (a bug, a record no check foresaw) ends
/// this agent's result, never the stop of the others.
async fn guarded_stop(agent: StopTarget, reason: String, deadline: Duration) -> pb::AgentStopResult {
    let (agent_id, address, instance_id, duplicate) =
        (agent.agent_id.clone(), agent.address.clone(), agent.instance_id.clone(), agent.duplicate);
    match std::panic::AssertUnwindSafe(stop_one(agent, reason, deadline)).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let why = chaos_proto::serve::panic_text(&*panic);
            tracing::error!(agent_id = %agent_id, panic = %why, "emergency stop of this agent panicked; the others go on");
            pb::AgentStopResult {
                agent_id,
                address,
                instance_id,
                duplicate,
                error: format!("internal error while stopping this agent: {why}"),
                ..Default::default()
            }
        }
    }
}

async fn stop_one(agent: StopTarget, reason: String, deadline: Duration) -> pb::AgentStopResult {
    let started = Instant::now();
    let mut client = agent.client.clone();
    // The agent answers within 3/4 of the deadline with what is done, so a
    // busy driver (a container stop) is reported as still reverting, not
    // as an agent not reached.
    let wait = deadline.mul_f64(0.75);
    let mut req = tonic::Request::new(pb::RevertAllRequest { reason, disarm: true, emergency: true, wait: Some(duration_to_pb(wait)) });
    req.set_timeout(deadline);
    let call = tokio::time::timeout(deadline, client.revert_all(req)).await;
    let mut res = pb::AgentStopResult {
        agent_id: agent.agent_id.clone(),
        address: agent.address.clone(),
        duplicate: agent.duplicate,
        instance_id: agent.instance_id.clone(),
        ..Default::default()
    };
    match call {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            res.reached = true;
            res.reverted_count = r.reverted_count;
            res.failed_count = u32::try_from(r.failed.len()).unwrap_or(u32::MAX);
            res.in_progress_count = u32::try_from(r.in_progress.len()).unwrap_or(u32::MAX);
            let failed = r.failed.iter().map(|f| format!("{}: {}", f.id, f.error));
            let busy = r.in_progress.iter().map(|f| format!("{}: still reverting (its driver is busy)", f.id));
            res.error = failed.chain(busy).collect::<Vec<_>>().join("; ");
        }
        Ok(Err(status)) => {
            res.error = format!("{}: {}", status.code(), status.message());
            res.lease_revert_by = agent.lease_revert_by.map(timestamp_to_pb);
        }
        Err(_) => {
            res.error = format!("no answer within {deadline:?}");
            res.lease_revert_by = agent.lease_revert_by.map(timestamp_to_pb);
        }
    }
    if !res.reached {
        warn!(agent_id = %agent.agent_id, address = %agent.address, error = %res.error,
            "agent not reached by emergency stop; it reverts by its own lease");
    }
    res.took = Some(duration_to_pb(started.elapsed()));
    res
}

/// Re-arm the fleet and tell every agent now (those missed follow on their next heartbeat).
pub async fn arm(registry: &Registry, reason: &str, deadline: Duration, parallelism: usize) -> pb::ArmResponse {
    registry.arm();
    info!(reason, "fleet armed");
    let calls = registry.agents().into_iter().map(|a| {
        let reason = reason.to_string();
        async move {
            let mut client = a.client.clone();
            let mut req = tonic::Request::new(pb::SetArmedRequest { armed: true, reason });
            req.set_timeout(deadline);
            match tokio::time::timeout(deadline, client.set_armed(req)).await {
                Ok(Ok(_)) => None,
                _ => Some(a.agent_id),
            }
        }
    });
    let agents_not_reached = stream::iter(calls).buffer_unordered(parallelism.max(1)).filter_map(|r| async move { r }).collect().await;
    pb::ArmResponse { armed: true, agents_not_reached }
}
