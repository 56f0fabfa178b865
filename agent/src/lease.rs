//! The agent's side of the coordinator link: register, then heartbeat.
//! Every successful answer renews the dead-man lease in the lifecycle and
//! carries the fleet's armed flag; the lifecycle itself decides when the
//! lease is lost (so the decision is unit-tested with paused time).

use std::{sync::Arc, time::Duration};

use chaos_proto::{
    convert::duration_to_pb,
    pb,
    trust::{ClientTls, Dial, Expect},
};
use tonic::Code;
use tracing::{debug, error, info, warn};

use crate::{lifecycle::Lifecycle, protect::Protection, service::AgentIdentity};

/// How the agent reaches its coordinator.
#[derive(Debug, Clone)]
pub struct LeaseLink {
    pub coordinator_url: String,
    pub advertise: String,
    pub heartbeat_interval: Duration,
    /// The agent's certificate (the coordinator must present a coordinator one), or --insecure.
    pub tls: ClientTls,
}

/// Run forever (abort the task to stop): register, heartbeat, re-register
/// when the coordinator forgot us.
pub async fn run(link: LeaseLink, identity: Arc<AgentIdentity>, lifecycle: Lifecycle, protection: Arc<Protection>) {
    // The connect timeout covers the TLS handshake too, which a busy
    // coordinator (a fleet starting at once) may take a while to finish.
    let per_call = link.heartbeat_interval.min(Duration::from_secs(3));
    let dial = Dial { connect_timeout: per_call, timeout: Some(per_call) };
    let channel = match chaos_proto::trust::channel(&link.coordinator_url, &link.tls, Expect::coordinator(), dial) {
        Ok(c) => c,
        Err(e) => {
            warn!(url = %link.coordinator_url, error = %e, "invalid coordinator URL; the lease can never be established");
            return;
        }
    };
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
    let mut registered = false;
    let mut beats = Beats::Closed;
    let mut failures: u32 = 0;
    let mut ticker = tokio::time::interval(link.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Ok(status) = lifecycle.status().await else { return };
        let result = if registered {
            let beat = pb::HeartbeatRequest {
                agent_id: identity.agent_id.clone(),
                active_faults: u32::try_from(status.active_faults).unwrap_or(u32::MAX),
                lease_lost: status.lease_lost,
                instance_id: identity.instance_id.clone(),
            };
            beats.beat(&mut client, beat, per_call).await
        } else {
            // A new registration tries the stream again (the coordinator may have been upgraded).
            beats = Beats::Closed;
            client
                // Capabilities quote the host (probe details, a Docker error): fitted to the coordinator's edge.
                .register_agent(chaos_proto::edge::fit(pb::RegisterAgentRequest {
                    agent_id: identity.agent_id.clone(),
                    hostname: identity.hostname.clone(),
                    address: link.advertise.clone(),
                    labels: identity.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    capabilities: Some(identity.capabilities(&status, &crate::faults::container::probe(&identity.docker_socket).await)),
                    lease_duration: Some(duration_to_pb(identity.lease)),
                    instance_id: identity.instance_id.clone(),
                }))
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
            // Another process holds this agent id, or this certificate may
            // not register under it: never hold faults meanwhile.
            Err(s) if matches!(s.code(), Code::AlreadyExists | Code::PermissionDenied | Code::Unauthenticated) => {
                registered = false;
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    error!(coordinator = %link.coordinator_url, agent_id = %identity.agent_id, code = ?s.code(), refusal = %s.message(),
                        "the coordinator REFUSED this agent; it holds no faults and retries every heartbeat");
                }
                let why = format!("{:?}: {}", s.code(), s.message());
                if lifecycle.refused(why).await.is_err() {
                    return;
                }
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

/// How heartbeats reach the coordinator: on one stream for the agent's life
/// with it, or as single calls to a coordinator without the stream.
enum Beats {
    /// None open (the first beat, or the last stream broke): the next beat opens one.
    Closed,
    Open {
        send: tokio::sync::mpsc::Sender<pb::HeartbeatRequest>,
        answers: Box<tonic::Streaming<pb::HeartbeatResponse>>,
    },
    /// The coordinator answered UNIMPLEMENTED (an older release): `Heartbeat` calls.
    Unary,
}

impl Beats {
    /// One beat: the fleet's armed flag from the coordinator's answer within
    /// `per_call`, or why there is none (the stream is closed then, and the
    /// next beat opens another).
    async fn beat(
        &mut self,
        client: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
        beat: pb::HeartbeatRequest,
        per_call: Duration,
    ) -> Result<bool, tonic::Status> {
        if matches!(self, Beats::Closed) {
            let (send, queue) = tokio::sync::mpsc::channel(1);
            let opened = tokio::time::timeout(per_call, client.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(queue))).await;
            *self = match opened {
                Ok(Ok(answers)) => {
                    debug!("heartbeat stream open");
                    Beats::Open { send, answers: Box::new(answers.into_inner()) }
                }
                Ok(Err(s)) if s.code() == Code::Unimplemented => {
                    info!("the coordinator has no HeartbeatStream (an older release): heartbeats go as single calls");
                    Beats::Unary
                }
                Ok(Err(s)) => return Err(s),
                Err(_) => return Err(tonic::Status::deadline_exceeded(format!("opening the heartbeat stream took over {per_call:?}"))),
            };
        }
        let (send, answers) = match self {
            Beats::Open { send, answers } => (send, answers),
            _ => return client.heartbeat(beat).await.map(|r| r.into_inner().armed),
        };
        let answer = match send.send(beat).await {
            Ok(()) => tokio::time::timeout(per_call, answers.message()).await,
            Err(_) => Ok(Ok(None)),
        };
        let why = match answer {
            Ok(Ok(Some(a))) => return Ok(a.armed),
            Ok(Ok(None)) => tonic::Status::unavailable("the coordinator ended the heartbeat stream"),
            Ok(Err(s)) => s,
            Err(_) => tonic::Status::deadline_exceeded(format!("no heartbeat answer within {per_call:?}")),
        };
        *self = Beats::Closed;
        Err(why)
    }
}
