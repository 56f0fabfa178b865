//! Prometheus exposition shared by both servers: a registry, the gRPC
//! latency layer (a histogram per chaos.v1 method), the encoding of
//! `chaos.v1` metric batches as gauges, and the `/metrics` HTTP endpoint on
//! its own port. Encoding is prometheus-client's (OpenMetrics text), never
//! hand-written.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tracing::{info, warn};

use crate::pb;

/// Label set of a dynamic series: sorted (name, value) pairs.
pub type Labels = Vec<(String, String)>;

fn rpc_histogram() -> Histogram {
    // 0.1 ms .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// gRPC handling time per method (time to the response headers; for a
/// server stream, until the stream is set up).
#[derive(Clone)]
pub struct RpcMetrics {
    seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

impl RpcMetrics {
    /// Register `chaos_rpc_duration_seconds` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let seconds = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(rpc_histogram as fn() -> Histogram);
        registry.register("chaos_rpc_duration_seconds", "gRPC handling time by method (to the response headers)", seconds.clone());
        Self { seconds }
    }

    /// A tower layer for `tonic::transport::Server::builder().layer(..)`.
    pub fn layer(&self) -> RpcLayer {
        RpcLayer { metrics: self.clone() }
    }
}

#[derive(Clone)]
pub struct RpcLayer {
    metrics: RpcMetrics,
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcTimer<S>;
    fn layer(&self, inner: S) -> RpcTimer<S> {
        RpcTimer { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct RpcTimer<S> {
    inner: S,
    metrics: RpcMetrics,
}

impl<S, B, ResBody> tower::Service<tonic::codegen::http::Request<B>> for RpcTimer<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>, Response = tonic::codegen::http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        // Only our own methods by name: a client must not grow the label set.
        let method = if path.starts_with("/chaos.v1.") || path.starts_with("/grpc.health.v1.") { path.to_string() } else { "other".into() };
        let start = Instant::now();
        let fut = self.inner.call(req);
        let seconds = self.metrics.seconds.clone();
        Box::pin(async move {
            // A handler that panics answers INTERNAL (the hook has logged
            // where); the server and its other calls go on.
            let out = match crate::serve::catch_panic(fut).await {
                Ok(out) => out,
                Err(why) => {
                    tracing::error!(method = %method, panic = %why, "handler panicked: answered INTERNAL");
                    Ok(tonic::Status::internal(format!("the server failed handling {method} (a bug, logged on the server): {why}"))
                        .into_http())
                }
            };
            seconds.get_or_create(&vec![("method".to_string(), method)]).observe(start.elapsed().as_secs_f64());
            out
        })
    }
}

/// Prometheus name of a dotted chaos metric: `host.cpu.used_pct` →
/// `chaos_host_cpu_used_pct`.
pub fn prom_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 6);
    out.push_str("chaos_");
    for c in name.chars() {
        out.push(if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' });
    }
    out
}

/// Encode batches as gauges: one family per metric name, labelled by the
/// series' labels plus `source`; stale batches are left out. Collectors
/// call it at scrape time on the batches their owner already keeps.
pub fn encode_batches<'a>(
    encoder: &mut DescriptorEncoder<'_>,
    batches: impl IntoIterator<Item = &'a pb::MetricBatch>,
) -> Result<(), std::fmt::Error> {
    // name -> [(labels, value)]
    let mut families: BTreeMap<String, Vec<(Labels, f64)>> = BTreeMap::new();
    for b in batches.into_iter().filter(|b| !b.stale) {
        for m in &b.metrics {
            let mut labels: Labels = m.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            labels.push(("source".into(), b.source.clone()));
            labels.sort();
            families.entry(prom_name(&m.name)).or_default().push((labels, m.value));
        }
    }
    for (name, series) in &families {
        let gauge = ConstGauge::new(0.0f64);
        let mut family =
            encoder.encode_descriptor(name, "chaos.v1 metric (see metrics.proto for names and units)", None, gauge.metric_type())?;
        for (labels, value) in series {
            ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}

/// Serve `GET /metrics` from `registry` on `addr` until `shutdown`.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = Arc::clone(&registry);
            async move {
                let mut body = String::new();
                match encode(&mut body, &registry) {
                    Ok(()) => (
                        axum::http::StatusCode::OK,
                        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        body,
                    ),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("encoding metrics failed: {e}\n"),
                    ),
                }
            }
        }),
    );
    info!(listen = %local, "Prometheus metrics on http://{local}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}
