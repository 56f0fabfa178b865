//! Monitoring: the hub that follows every agent's metric stream, the
//! probes of the services, and the alert rules and stop conditions
//! evaluated on both. Configured by the config file's `monitoring:`.

pub mod alerts;
pub mod hub;
pub mod probes;
pub mod watch;

use std::{collections::BTreeMap, collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use chaos_proto::{convert::duration_to_pb, pb, rules::Rule};
use serde::Deserialize;
use tokio::{task::JoinHandle, time::Instant};
use tracing::{debug, info};

use self::{
    alerts::{AlertCounters, Alerts, NamedRule},
    hub::Hub,
    probes::{ProbeFile, ProbeSpec},
};
use crate::{policy::DurationValue, registry::Registry, scenarios::Scenarios};

/// The config file's `monitoring:` section (the seed's keys plus ours).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringFile {
    /// false: no agent streams, no probes, no alerts (StreamMetrics refuses).
    pub enabled: Option<bool>,
    /// How often agents are expected to report and probes look (default 1s).
    pub metrics_interval: Option<DurationValue>,
    /// The seed's form: `METRIC: THRESHOLD`, an alert when above.
    pub alert_thresholds: Option<BTreeMap<String, f64>>,
    pub alerts: Option<Vec<AlertFile>>,
    pub probes: Option<Vec<ProbeFile>>,
    /// Prometheus `/metrics` address; off unless set.
    pub listen: Option<String>,
    /// Batches kept per source for GetMetrics' history (default 10).
    pub window: Option<usize>,
    /// Bytes of encoded batches kept per source window (default 256 KiB;
    /// the latest batch is kept whatever its size).
    pub window_bytes: Option<usize>,
    /// Events buffered for a slow watcher before it skips (default 4096).
    pub watcher_buffer: Option<usize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertFile {
    /// Defaults to the expression.
    pub name: Option<String>,
    pub expr: String,
}

/// Resolved monitoring settings.
#[derive(Debug, Clone)]
pub struct MonitoringConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub rules: Vec<NamedRule>,
    pub probes: Vec<ProbeSpec>,
    pub listen: Option<SocketAddr>,
    pub window: usize,
    pub window_bytes: usize,
    pub watcher_buffer: usize,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(1),
            rules: Vec::new(),
            probes: Vec::new(),
            listen: None,
            window: 10,
            window_bytes: hub::WINDOW_BYTES,
            watcher_buffer: 4096,
        }
    }
}

impl MonitoringFile {
    /// Validate; errors name `monitoring.KEY` and the bad value.
    pub fn resolve(&self) -> Result<MonitoringConfig, String> {
        let mut c = MonitoringConfig { enabled: self.enabled.unwrap_or(true), ..Default::default() };
        if let Some(d) = &self.metrics_interval {
            c.interval = d.resolve("monitoring.metrics_interval")?;
            if c.interval < Duration::from_millis(100) || c.interval > Duration::from_secs(3600) {
                return Err(format!("monitoring.metrics_interval: must be in [100ms, 1h], got {}", humantime::format_duration(c.interval)));
            }
        }
        for (metric, threshold) in self.alert_thresholds.iter().flatten() {
            let expr = format!("{metric} > {threshold}");
            let rule = Rule::parse(&expr).map_err(|e| format!("monitoring.alert_thresholds.{metric}: {e}"))?;
            c.rules.push(NamedRule { name: metric.clone(), rule, scenario: None });
        }
        for (i, a) in self.alerts.iter().flatten().enumerate() {
            let rule = Rule::parse(&a.expr).map_err(|e| format!("monitoring.alerts[{i}].expr: {e}"))?;
            c.rules.push(NamedRule { name: a.name.clone().unwrap_or_else(|| rule.expr.clone()), rule, scenario: None });
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.probes.iter().flatten().enumerate() {
            let spec = p.resolve(i, c.interval)?;
            if !names.insert(spec.name.clone()) {
                return Err(format!("monitoring.probes[{i}].name: {:?} is used by an earlier probe", spec.name));
            }
            c.probes.push(spec);
        }
        if let Some(l) = self.listen.as_ref().filter(|l| !l.is_empty()) {
            c.listen = Some(l.parse().map_err(|_| format!("monitoring.listen: invalid address {l:?} (want IP:PORT)"))?);
        }
        if let Some(w) = self.window {
            if !(1..=3600).contains(&w) {
                return Err(format!("monitoring.window: must be in [1, 3600] batches, got {w}"));
            }
            c.window = w;
        }
        if let Some(b) = self.window_bytes {
            if !(4096..=64 << 20).contains(&b) {
                return Err(format!("monitoring.window_bytes: must be in [4096, 67108864] bytes, got {b}"));
            }
            c.window_bytes = b;
        }
        if let Some(b) = self.watcher_buffer {
            if !(16..=1_000_000).contains(&b) {
                return Err(format!("monitoring.watcher_buffer: must be in [16, 1000000] events, got {b}"));
            }
            c.watcher_buffer = b;
        }
        Ok(c)
    }
}

/// The running monitoring parts.
pub struct Monitor {
    pub hub: Arc<Hub>,
    pub alerts: Arc<Alerts>,
    pub enabled: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Follow one agent's StreamMetrics, reconnecting with backoff; the hub
/// marks it stale (with why) whenever the stream is down.
async fn follow(hub: Arc<Hub>, registry: Arc<Registry>, id: String, address: String, labels: HashMap<String, String>, interval: Duration) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let error = match registry.client(&id, &address) {
            None => format!("invalid agent address {address:?}"),
            Some(mut client) => {
                let req = pb::StreamMetricsRequest { interval: Some(duration_to_pb(interval)), ..Default::default() };
                match client.stream_metrics(req).await {
                    Err(s) => format!("StreamMetrics: {:?}: {}", s.code(), s.message()),
                    Ok(resp) => {
                        let mut stream = resp.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(mut b)) => {
                                    backoff = Duration::from_millis(250);
                                    b.source = id.clone();
                                    b.source_labels = labels.clone();
                                    hub.ingest(b, interval);
                                }
                                Ok(None) => break "the agent ended its metric stream".to_string(),
                                Err(s) => break format!("metric stream broke: {:?}: {}", s.code(), s.message()),
                            }
                        }
                    }
                }
            }
        };
        debug!(agent = %id, %error, retry_in_ms = backoff.as_millis() as u64, "agent metrics unavailable");
        hub.mark_stale(&id, &error);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Keep one follower per live agent; mark lost agents stale; sweep.
async fn follow_agents(hub: Arc<Hub>, registry: Arc<Registry>, interval: Duration) {
    let mut followed: HashMap<String, (String, JoinHandle<()>)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let agents = registry.agents();
        for a in &agents {
            let lost = a.health(now) == pb::AgentHealth::Lost;
            let current = followed.get(&a.agent_id).is_some_and(|(addr, _)| *addr == a.address);
            if lost {
                if let Some((_, t)) = followed.remove(&a.agent_id) {
                    t.abort();
                    hub.mark_stale(&a.agent_id, "agent lost: no heartbeat within its lease");
                }
            } else if !current {
                if let Some((_, t)) = followed.remove(&a.agent_id) {
                    t.abort();
                }
                let labels = a.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let task =
                    tokio::spawn(follow(Arc::clone(&hub), Arc::clone(&registry), a.agent_id.clone(), a.address.clone(), labels, interval));
                followed.insert(a.agent_id.clone(), (a.address.clone(), task));
            }
        }
        followed.retain(|id, (_, t)| {
            let keep = agents.iter().any(|a| &a.agent_id == id);
            if !keep {
                t.abort();
                hub.remove(id);
            }
            keep
        });
        hub.sweep();
    }
}

/// Start the hub, the agent followers, the probes and the alert evaluator.
pub fn start(cfg: &MonitoringConfig, registry: Arc<Registry>, scenarios: Arc<Scenarios>, counters: AlertCounters) -> Monitor {
    let hub = Hub::with_limits(cfg.window, cfg.window_bytes, cfg.watcher_buffer);
    let alerts = Alerts::new(cfg.rules.clone(), counters);
    let mut tasks = Vec::new();
    if cfg.enabled {
        tasks.push(tokio::spawn(follow_agents(Arc::clone(&hub), registry, cfg.interval)));
        for p in &cfg.probes {
            tasks.push(tokio::spawn(probes::run(p.clone(), Arc::clone(&hub))));
        }
        tasks.push(tokio::spawn(Arc::clone(&alerts).run(Arc::clone(&hub), scenarios)));
        info!(probes = cfg.probes.len(), rules = cfg.rules.len(), interval = %humantime::format_duration(cfg.interval), "monitoring on");
    } else {
        info!("monitoring disabled (monitoring.enabled: false)");
    }
    Monitor { hub, alerts, enabled: cfg.enabled, tasks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<MonitoringConfig, String> {
        serde_yaml_ng::from_str::<MonitoringFile>(yaml).map_err(|e| e.to_string())?.resolve()
    }

    #[test]
    fn seed_thresholds_alerts_and_probes() {
        let c = parse(
            "enabled: true\nmetrics_interval: 2s\nalert_thresholds: {host.memory.used_pct: 95}\n\
             alerts: [{name: lag, expr: kafka.lag.total > 100000 for 30s}]\n\
             probes: [{name: k, kind: tcp, address: 127.0.0.1:9092}]\nlisten: 127.0.0.1:9101\n",
        )
        .expect("valid");
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.rules[0].rule.expr, "host.memory.used_pct > 95");
        assert_eq!((c.rules[1].name.as_str(), c.rules[1].rule.hold), ("lag", Duration::from_secs(30)));
        assert_eq!(c.probes[0].interval, Duration::from_secs(2));
        assert_eq!(c.listen, Some("127.0.0.1:9101".parse().expect("addr")));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(parse("alerts: [{expr: kafka.lag.total >> 5}]\n").expect_err("bad").starts_with("monitoring.alerts[0].expr: rule"));
        assert!(parse("metrics_interval: 10ms\n").expect_err("bad").contains("monitoring.metrics_interval"));
        assert!(parse("window_bytes: 100\n").expect_err("bad").contains("monitoring.window_bytes: must be in [4096"));
        assert_eq!(parse("window_bytes: 65536\n").expect("valid").window_bytes, 65536);
        assert!(parse("listen: nowhere\n").expect_err("bad").contains("monitoring.listen: invalid address \"nowhere\""));
        let e = parse("probes: [{name: a, kind: tcp, address: 'h:1'}, {name: a, kind: tcp, address: 'h:2'}]\n").expect_err("dup");
        assert!(e.contains("monitoring.probes[1].name") && e.contains("earlier"), "{e}");
    }
}
