//! The coordinator's Prometheus metrics: RPC latency, emergency stops,
//! alerts fired, the probes' values, and gauges read at scrape time
//! (scenarios running and queued, agents by health, metric sources).

use std::sync::Arc;

use chaos_proto::{
    pb::AgentHealth,
    telemetry::{RpcMetrics, encode_batches},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::Counter, gauge::ConstGauge},
    registry::Registry as PromRegistry,
};

use crate::{
    monitor::{alerts::AlertCounters, hub::Hub},
    registry::Registry,
    scenarios::Scenarios,
};

/// Handles the service and the monitor update.
#[derive(Clone, Default)]
pub struct Telemetry {
    pub emergency_stops: Counter,
    pub alerts: AlertCounters,
}

/// Gauges computed at scrape time, and the probes' latest values.
struct StateCollector {
    registry: Arc<Registry>,
    scenarios: Arc<Scenarios>,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn gauge_family(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, series: &[(&str, &str, f64)]) -> Result<(), std::fmt::Error> {
    let mut fam = enc.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (k, v, value) in series {
        ConstGauge::new(*value).encode(fam.encode_family(&vec![(k.to_string(), v.to_string())])?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_batches(&mut enc, self.hub.current_probes().iter())?;
        let (running, queued) = self.scenarios.counts();
        gauge_family(
            &mut enc,
            "chaos_scenarios",
            "Scenarios by state",
            &[("state", "running", running as f64), ("state", "queued", queued as f64)],
        )?;
        let now = tokio::time::Instant::now();
        let agents = self.registry.agents();
        let count = |h: AgentHealth| agents.iter().filter(|a| a.health(now) == h).count() as f64;
        gauge_family(
            &mut enc,
            "chaos_agents",
            "Registered agents by health",
            &[
                ("health", "healthy", count(AgentHealth::Healthy)),
                ("health", "late", count(AgentHealth::Late)),
                ("health", "lost", count(AgentHealth::Lost)),
            ],
        )?;
        let (sources, stale) = self.hub.counts();
        gauge_family(
            &mut enc,
            "chaos_metric_sources",
            "Metric sources (agents and probes) followed by the hub",
            &[("freshness", "current", (sources - stale) as f64), ("freshness", "stale", stale as f64)],
        )?;
        Ok(())
    }
}

impl Telemetry {
    /// Register everything in a fresh Prometheus registry; the RPC layer's
    /// histograms come back for the gRPC server.
    pub fn registry(&self, registry: Arc<Registry>, scenarios: Arc<Scenarios>, hub: Arc<Hub>) -> (PromRegistry, RpcMetrics) {
        let mut r = PromRegistry::default();
        let rpc = RpcMetrics::register(&mut r);
        r.register("chaos_emergency_stops", "Emergency stops served", self.emergency_stops.clone());
        r.register("chaos_alerts_fired", "Alerts and stop conditions fired, by rule and kind", self.alerts.fired.clone());
        r.register_collector(Box::new(StateCollector { registry, scenarios, hub }));
        (r, rpc)
    }
}
