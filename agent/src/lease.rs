//! The agent's side of the coordinator link: register, then heartbeat.
//! Every successful answer renews the dead-man lease in the lifecycle and
//! carries the fleet's armed flag; the lifecycle itself decides when the
//! lease is lost (so the decision is unit-tested with paused time).

use std::{sync::Arc, time::Duration};

use chaos_proto::{convert::duration_to_pb, pb};
use tonic::{Code, transport::Endpoint};
use tracing::{debug, info, warn};

use crate::{lifecycle::Lifecycle, protect::Protection, service::AgentIdentity};

/// How the agent reaches its coordinator.
#[derive(Debug, Clone)]
pub struct LeaseLink {
    pub coordinator_url: String,
    pub advertise: String,
    pub heartbeat_interval: Duration,
}

/// Run forever (abort the task to stop): register, heartbeat, re-register
/// when the coordinator forgot us.
pub async fn run(link: LeaseLink, identity: Arc<AgentIdentity>, lifecycle: Lifecycle, protection: Arc<Protection>) {
    let endpoint = match Endpoint::from_shared(link.coordinator_url.clone()) {
        Ok(e) => e.connect_timeout(Duration::from_secs(1)).timeout(link.heartbeat_interval.min(Duration::from_secs(3))),
        Err(e) => {
            warn!(url = %link.coordinator_url, error = %e, "invalid coordinator URL; the lease can never be established");
            return;
        }
    };
    let mut client = pb::coordinator_client::CoordinatorClient::new(endpoint.connect_lazy());
    let mut registered = false;
    let mut failures: u32 = 0;
    let mut ticker = tokio::time::interval(link.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Ok(status) = lifecycle.status().await else { return };
        let result = if registered {
            client
                .heartbeat(pb::HeartbeatRequest {
                    agent_id: identity.agent_id.clone(),
                    active_faults: u32::try_from(status.active_faults).unwrap_or(u32::MAX),
                    lease_lost: status.lease_lost,
                })
                .await
                .map(|r| r.into_inner().armed)
        } else {
            client
                .register_agent(pb::RegisterAgentRequest {
                    agent_id: identity.agent_id.clone(),
                    hostname: identity.hostname.clone(),
                    address: link.advertise.clone(),
                    labels: identity.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    capabilities: Some(identity.capabilities(
                        status.armed,
                        status.lease_lost,
                        &crate::faults::container::probe(&identity.docker_socket).await,
                    )),
                    lease_duration: Some(duration_to_pb(identity.lease)),
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    let same_host = !r.coordinator_boot_id.is_empty() && r.coordinator_boot_id == identity.boot_id;
                    protection.set_coordinator_pid(same_host.then_some(r.coordinator_pid));
                    info!(coordinator = %link.coordinator_url, armed = r.armed, same_host, "registered with the coordinator");
                    r.armed
                })
        };
        match result {
            Ok(armed) => {
                registered = true;
                if failures > 0 {
                    info!(after_failures = failures, "coordinator reachable again");
                }
                failures = 0;
                if lifecycle.contact(armed).await.is_err() {
                    return;
                }
            }
            Err(s) if s.code() == Code::NotFound => {
                info!("coordinator does not know this agent (restarted?); registering again");
                registered = false;
            }
            Err(s) => {
                failures += 1;
                // Log the first failure and then every tenth, not every beat.
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(coordinator = %link.coordinator_url, failures, error = %s.message(), "heartbeat failed");
                } else {
                    debug!(error = %s.message(), "heartbeat failed");
                }
            }
        }
    }
}
