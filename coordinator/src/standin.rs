//! A light in-process stand-in for an agent: it speaks the real
//! `chaos.v1.Agent` service over loopback and remembers faults, but touches
//! nothing on the host. For the coordinator's tests and its benchmark at
//! 100 to 1,000 agents, where real agent processes would measure the
//! machine rather than the coordinator.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use chaos_proto::{
    convert::timestamp_to_pb,
    pb::{self, FaultState, RevertReason, agent_server::Agent},
};
use futures::Stream;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

#[derive(Default)]
struct State {
    faults: BTreeMap<String, pb::Fault>,
    armed: bool,
    /// When set, ApplyFault fails with this status message.
    fail_apply: Option<String>,
    /// When set, RevertFault finds this left behind: the fault stays FAILED
    /// with a DIFFERENT check naming it, and the call fails as an agent's does.
    leave_behind: Option<String>,
    /// When set, ApplyFault answers this much later (as a container stop
    /// waiting out its grace does).
    apply_delay: Option<std::time::Duration>,
    /// Metrics per batch of StreamMetrics (0: UNIMPLEMENTED).
    metrics: usize,
}

/// The stand-in's state, shared with the test that drives it.
#[derive(Clone, Default)]
pub struct Standin {
    state: Arc<Mutex<State>>,
}

impl Standin {
    pub fn new() -> Self {
        let s = Self::default();
        s.lock().armed = true;
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ids of faults in the APPLIED state.
    pub fn applied(&self) -> Vec<String> {
        self.lock().faults.values().filter(|f| f.state == FaultState::Applied as i32).map(|f| f.id.clone()).collect()
    }

    /// Make StreamMetrics send a batch of `n` made-up metrics every second
    /// (for the hub's benchmark).
    pub fn with_metrics(self, n: usize) -> Self {
        self.lock().metrics = n;
        self
    }

    pub fn fail_apply(&self, why: Option<&str>) {
        self.lock().fail_apply = why.map(str::to_string);
    }

    pub fn leave_behind(&self, difference: Option<&str>) {
        self.lock().leave_behind = difference.map(str::to_string);
    }

    /// Make ApplyFault answer `delay` later (None: at once).
    pub fn delay_apply(&self, delay: Option<std::time::Duration>) {
        self.lock().apply_delay = delay;
    }

    /// Serve on `listener` until the task is dropped or aborted.
    pub async fn serve(self, listener: TcpListener) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(pb::agent_server::AgentServer::new(self))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await
    }

    fn revert(f: &mut pb::Fault, reason: RevertReason) -> bool {
        if f.state != FaultState::Applied as i32 {
            return false;
        }
        f.state = FaultState::Reverted as i32;
        f.revert_reason = reason as i32;
        f.reverted_at = Some(timestamp_to_pb(SystemTime::now()));
        true
    }
}

#[cfg(test)]
impl Standin {
    /// Serve in this process over in-memory pipes: a client whose every
    /// connection is a fresh `tokio::io::duplex` pair served by this
    /// stand-in. No socket is involved, so under tokio's paused time a
    /// call never waits on the OS (which would let the clock jump past
    /// the call's deadline).
    pub(crate) fn in_memory(self) -> pb::agent_client::AgentClient<tonic::transport::Channel> {
        use futures::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<tokio::io::DuplexStream>();
        let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
        let server = tonic::transport::Server::builder().add_service(pb::agent_server::AgentServer::new(self));
        // Ends when the last client is dropped (the stream of connections ends).
        tokio::spawn(server.serve_with_incoming(incoming));
        let connect = tower::service_fn(move |_: tonic::transport::Uri| {
            let tx = tx.clone();
            async move {
                let (client, server) = tokio::io::duplex(64 * 1024);
                tx.send(server).map_err(|_| std::io::Error::other("the stand-in stopped"))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
            }
        });
        let channel = tonic::transport::Endpoint::from_static("http://standin.invalid").connect_with_connector_lazy(connect);
        pb::agent_client::AgentClient::new(channel)
    }
}

type MetricStream = Pin<Box<dyn Stream<Item = Result<pb::MetricBatch, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Standin {
    async fn apply_fault(&self, req: Request<pb::ApplyFaultRequest>) -> Result<Response<pb::ApplyFaultResponse>, Status> {
        let spec = req.into_inner().spec.unwrap_or_default();
        let delay = self.lock().apply_delay;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut g = self.lock();
        if let Some(why) = &g.fail_apply {
            return Err(Status::failed_precondition(why.clone()));
        }
        if !g.armed {
            return Err(Status::failed_precondition("agent disarmed"));
        }
        if g.faults.get(&spec.id).is_some_and(|f| f.state == FaultState::Applied as i32) {
            return Err(Status::already_exists(format!("fault {} is active", spec.id)));
        }
        let now = Some(timestamp_to_pb(SystemTime::now()));
        let fault = pb::Fault {
            id: spec.id.clone(),
            spec: Some(spec),
            state: FaultState::Applied as i32,
            applied: Some(pb::AppliedDetail {
                backend: "standin".into(),
                processes: vec![],
                summary: "nothing touched (stand-in)".into(),
                ..Default::default()
            }),
            created_at: now,
            applied_at: now,
            ..Default::default()
        };
        g.faults.insert(fault.id.clone(), fault.clone());
        Ok(Response::new(pb::ApplyFaultResponse { fault: Some(fault) }))
    }

    async fn revert_fault(&self, req: Request<pb::RevertFaultRequest>) -> Result<Response<pb::RevertFaultResponse>, Status> {
        let id = req.into_inner().fault_id;
        let mut g = self.lock();
        let left = g.leave_behind.clone();
        let f = g.faults.get_mut(&id).ok_or_else(|| Status::not_found(format!("fault {id}")))?;
        if let Some(diff) = left {
            f.state = FaultState::Failed as i32;
            f.revert_check = pb::RevertCheck::Different as i32;
            f.revert_check_detail = diff.clone();
            f.error = format!("the host is not as it was before the fault, after its revert and one more try: {diff}");
            return Err(Status::internal(format!("revert of fault {id:?} failed: {}", f.error)));
        }
        let already_reverted = !Self::revert(f, RevertReason::Requested);
        Ok(Response::new(pb::RevertFaultResponse { fault: Some(f.clone()), already_reverted }))
    }

    async fn revert_all(&self, req: Request<pb::RevertAllRequest>) -> Result<Response<pb::RevertAllResponse>, Status> {
        let r = req.into_inner();
        let mut g = self.lock();
        let reason = if r.emergency { RevertReason::EmergencyStop } else { RevertReason::RevertAll };
        let reverted: Vec<pb::Fault> = g.faults.values_mut().filter_map(|f| Self::revert(f, reason).then(|| f.clone())).collect();
        if r.disarm {
            g.armed = false;
        }
        Ok(Response::new(pb::RevertAllResponse {
            reverted_count: reverted.len() as u32,
            failed: vec![],
            reverted,
            armed: g.armed,
            in_progress: vec![],
        }))
    }

    async fn list_faults(&self, req: Request<pb::ListFaultsRequest>) -> Result<Response<pb::ListFaultsResponse>, Status> {
        let all = req.into_inner().include_finished;
        let faults = self.lock().faults.values().filter(|f| all || f.state != FaultState::Reverted as i32).cloned().collect();
        Ok(Response::new(pb::ListFaultsResponse { faults }))
    }

    async fn get_capabilities(&self, _req: Request<pb::GetCapabilitiesRequest>) -> Result<Response<pb::Capabilities>, Status> {
        Ok(Response::new(pb::Capabilities { armed: self.lock().armed, version: chaos_proto::VERSION.into(), ..Default::default() }))
    }

    async fn set_armed(&self, req: Request<pb::SetArmedRequest>) -> Result<Response<pb::SetArmedResponse>, Status> {
        let armed = req.into_inner().armed;
        self.lock().armed = armed;
        Ok(Response::new(pb::SetArmedResponse { armed }))
    }

    type StreamMetricsStream = MetricStream;

    async fn stream_metrics(&self, _req: Request<pb::StreamMetricsRequest>) -> Result<Response<MetricStream>, Status> {
        let n = self.lock().metrics;
        if n == 0 {
            return Err(Status::unimplemented("the stand-in agent has no metrics"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            // Spread the stand-ins over the second, like real agents started at different times.
            tokio::time::sleep(std::time::Duration::from_millis(rand::random::<u64>() % 1000)).await;
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            for seq in 1.. {
                tick.tick().await;
                let metrics = (0..n).map(|i| chaos_proto::metrics::metric("standin.value", &[("i", &i.to_string())], seq as f64)).collect();
                let b = pb::MetricBatch { sampled_at: Some(timestamp_to_pb(SystemTime::now())), metrics, seq, ..Default::default() };
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
