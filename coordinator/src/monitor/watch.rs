//! StreamMetrics, served from the hub's shared bytes.
//!
//! Each watcher has a task that takes the hub's events, keeps what its
//! filter wants and queues bytes to send; tonic frames them as they are
//! ([`PreEncodedCodec`]), so the wire is the `MetricEvent` stream clients
//! already read. A batch is encoded once at ingest for every watcher that
//! filters by source only (or not at all); a watcher with a metric-prefix
//! filter gets its own cut of each batch, decoded and encoded for it alone.
//!
//! [`SharedStreamMetrics`] puts this in front of the generated
//! `chaos.v1.Coordinator` server for the one method; the generated
//! method ([`crate::service`]) decodes the same bytes, for callers that use
//! the generated server alone.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use chaos_proto::{edge::PreEncodedCodec, metrics::Filter, pb};
use futures::future::Either;
use prost::{Message, bytes::Bytes};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status,
    body::Body,
    codegen::{BoxFuture, Service, StdError, http},
    server::{NamedService, ServerStreamingService},
};
use tracing::debug;

use super::{
    Monitor,
    hub::{HubEvent, SharedBatch, decoded},
};

/// The gRPC path of the method served here.
pub const PATH: &str = "/chaos.v1.Coordinator/StreamMetrics";

/// Encoded `MetricEvent`s for one watcher.
pub type Frames = ReceiverStream<Result<Bytes, Status>>;

/// The StreamMetrics answer: FAILED_PRECONDITION when monitoring is off.
pub fn refuse_when_off(monitor: &Monitor) -> Result<(), Status> {
    if monitor.enabled {
        Ok(())
    } else {
        Err(Status::failed_precondition("monitoring is disabled on this coordinator (config monitoring.enabled: false)"))
    }
}

/// Start one watcher: the current batch of each matching source and the
/// firing alerts, then every event as it comes (a `skipped` count when
/// it reads too slowly, never a delay for the others).
pub fn watch(monitor: &Monitor, r: &pb::StreamMetricsRequest) -> Frames {
    let filter = Filter::from_stream(r);
    let no_alerts = r.no_alerts;
    // Subscribe before the snapshot: nothing falls between the two.
    let mut rx = monitor.hub.subscribe();
    let (now, _) = monitor.hub.snapshot(&filter, 0);
    let firing = if no_alerts { Vec::new() } else { monitor.alerts.firing() };
    // Small: a slow client fills it, then its broadcast receiver lags
    // and it skips, while every other watcher goes on.
    let (tx, out) = mpsc::channel(64);
    tokio::spawn(async move {
        use pb::metric_event::Event;
        let initial = now.into_iter().map(Event::Batch).chain(firing.into_iter().map(Event::Alert));
        for ev in initial {
            if tx.send(Ok(encode(ev))).await.is_err() {
                return;
            }
        }
        loop {
            let frame = match rx.recv().await {
                Ok(HubEvent::Batch(b)) => match batch_frame(&filter, &b) {
                    Some(f) => f,
                    None => continue,
                },
                Ok(HubEvent::Alert(_)) if no_alerts => continue,
                Ok(HubEvent::Alert(a)) => encode(Event::Alert((*a).clone())),
                Err(RecvError::Lagged(n)) => encode(Event::Skipped(n)),
                Err(RecvError::Closed) => return,
            };
            if tx.send(Ok(frame)).await.is_err() {
                debug!("metrics watcher left");
                return;
            }
        }
    });
    ReceiverStream::new(out)
}

/// What a watcher with `filter` is sent of `b`: the shared bytes when it
/// wants the whole batch, its own cut when it filters metrics, or nothing.
fn batch_frame(filter: &Filter, b: &SharedBatch) -> Option<Bytes> {
    if !filter.wants_source(&b.source, &b.source_labels) {
        return None;
    }
    if filter.metric_prefixes.is_empty() {
        return Some(b.event_bytes().clone());
    }
    let cut = filter.apply(&decoded(b)?)?;
    Some(encode(pb::metric_event::Event::Batch(cut)))
}

fn encode(ev: pb::metric_event::Event) -> Bytes {
    pb::MetricEvent { event: Some(ev) }.encode_to_vec().into()
}

/// The generated `chaos.v1.Coordinator` server `S`, with StreamMetrics
/// answered here from shared bytes ([`watch`]).
#[derive(Clone)]
pub struct SharedStreamMetrics<S> {
    inner: S,
    monitor: Arc<Monitor>,
}

impl<S> SharedStreamMetrics<S> {
    pub fn new(inner: S, monitor: Arc<Monitor>) -> Self {
        Self { inner, monitor }
    }
}

impl<S: NamedService> NamedService for SharedStreamMetrics<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for SharedStreamMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != PATH {
            return Either::Left(self.inner.call(req));
        }
        let method = Watch(Arc::clone(&self.monitor));
        Either::Right(Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(PreEncodedCodec::<pb::StreamMetricsRequest>::default());
            Ok(grpc.server_streaming(method, req).await)
        }))
    }
}

/// StreamMetrics as tonic's server calls it.
struct Watch(Arc<Monitor>);

impl ServerStreamingService<pb::StreamMetricsRequest> for Watch {
    type Response = Bytes;
    type ResponseStream = Frames;
    type Future = BoxFuture<Response<Frames>, Status>;

    fn call(&mut self, req: Request<pb::StreamMetricsRequest>) -> Self::Future {
        let monitor = Arc::clone(&self.0);
        Box::pin(async move {
            refuse_when_off(&monitor)?;
            Ok(Response::new(watch(&monitor, req.get_ref())))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use chaos_proto::metrics::metric;
    use futures::StreamExt;

    use super::*;
    use crate::monitor::{alerts::Alerts, hub::Hub};

    fn monitor(hub: Arc<Hub>) -> Monitor {
        Monitor { hub, alerts: Alerts::new(Vec::new(), Default::default()), enabled: true, tasks: Vec::new() }
    }

    fn batch(source: &str, seq: u64) -> pb::MetricBatch {
        pb::MetricBatch {
            source: source.into(),
            seq,
            metrics: vec![metric("host.cpu.used_pct", &[("core", "0")], 1.0), metric("host.memory.used_pct", &[], 2.0)],
            source_labels: [("role".to_string(), "kafka".to_string())].into(),
            ..Default::default()
        }
    }

    fn event(frame: Bytes) -> pb::metric_event::Event {
        pb::MetricEvent::decode(frame).expect("a MetricEvent").event.expect("an event")
    }

    #[test]
    fn a_watcher_without_a_metric_filter_is_sent_the_shared_bytes_themselves() {
        let shared = SharedBatch::new(batch("a1", 1));
        for filter in [Filter::default(), Filter { sources: vec!["a1".into()], ..Default::default() }] {
            let frame = batch_frame(&filter, &shared).expect("wanted");
            assert_eq!(frame.as_ptr(), shared.event_bytes().as_ptr(), "no copy, no encoding");
        }
        let other = Filter { source_labels: HashMap::from([("role".to_string(), "db".to_string())]), ..Default::default() };
        assert!(batch_frame(&other, &shared).is_none());
        let cpu = Filter { metric_prefixes: vec!["host.cpu".into()], ..Default::default() };
        let pb::metric_event::Event::Batch(b) = event(batch_frame(&cpu, &shared).expect("wanted")) else { panic!("a batch") };
        assert_eq!(b.metrics.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["host.cpu.used_pct"]);
        assert_eq!((b.source.as_str(), b.seq, b.source_labels.len()), ("a1", 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_watcher_is_told_it_skipped_while_a_fast_one_gets_every_batch() {
        let m = monitor(Hub::new(4, 16));
        let mut fast = watch(&m, &pb::StreamMetricsRequest::default());
        let mut slow = watch(&m, &pb::StreamMetricsRequest::default());
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 1000 {
                match event(fast.next().await.expect("open").expect("frame")) {
                    pb::metric_event::Event::Batch(b) => seen.push(b.seq),
                    other => panic!("the fast watcher got {other:?}"),
                }
            }
            seen
        });
        for seq in 1..=1000 {
            m.hub.ingest(batch("a1", seq), Duration::from_secs(1));
            // 8 batches at a time, half the hub's buffer.
            if seq % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let seen = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("fast watcher done").expect("join");
        assert_eq!(seen, (1..=1000).collect::<Vec<_>>());
        let mut skipped = 0;
        while skipped == 0 {
            match event(tokio::time::timeout(Duration::from_secs(5), slow.next()).await.expect("a frame").expect("open").expect("ok")) {
                pb::metric_event::Event::Skipped(n) => skipped = n,
                pb::metric_event::Event::Batch(_) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(skipped >= 900, "skipped {skipped}");
    }
}
