//! Alerts and stop conditions, evaluated on every batch the hub receives.
//!
//! A rule watches each series it selects separately; it fires on a series
//! once the comparison has held on every sample for the rule's `for`
//! duration, and resolves when a sample no longer breaches. Alerts (from
//! the config) are recorded in the audit log and streamed; a stop condition
//! (from a running scenario's spec) also aborts its scenario, which reverts
//! the faults, with the rule, the series and the value in the reason.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use chaos_proto::{
    convert::{timestamp_from_pb, timestamp_to_pb},
    pb,
    rules::Rule,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{sync::broadcast, time::Instant};
use tracing::warn;

use super::hub::{Hub, HubEvent, decoded};
use crate::scenarios::Scenarios;

/// A rule with its name and, for a stop condition, its scenario.
#[derive(Debug, Clone)]
pub struct NamedRule {
    pub name: String,
    pub rule: Rule,
    /// (scenario id, when it started): only later samples count.
    pub scenario: Option<(String, SystemTime)>,
}

#[derive(Debug, Default)]
struct SeriesState {
    breaching_since: Option<Instant>,
    firing: bool,
}

/// What a batch did to the rules.
#[derive(Debug, Default)]
pub struct Outcome {
    pub events: Vec<pb::AlertEvent>,
    /// Stop conditions that fired: (scenario id, reason).
    pub aborts: Vec<(String, String)>,
}

/// The rule state machine (no I/O: unit-tested with made-up batches).
#[derive(Debug, Default)]
pub struct Engine {
    /// Keyed by (rule name, scenario id or "", series key).
    series: HashMap<(String, String, String), SeriesState>,
    firing: HashMap<(String, String, String), pb::AlertEvent>,
}

/// How a series reads in messages: `name{k=v,...}` (labels sorted).
fn series_name(m: &pb::Metric) -> String {
    let mut labels: Vec<_> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    if labels.is_empty() { m.name.clone() } else { format!("{}{{{}}}", m.name, labels.join(",")) }
}

impl Engine {
    /// Feed one batch through `rules`, at `now`.
    pub fn observe(&mut self, rules: &[NamedRule], batch: &pb::MetricBatch, now: Instant) -> Outcome {
        let mut out = Outcome::default();
        if batch.stale {
            return out;
        }
        let sampled = batch.sampled_at.as_ref().map(timestamp_from_pb);
        for r in rules {
            if let (Some((_, started)), Some(at)) = (&r.scenario, sampled)
                && at < *started
            {
                continue;
            }
            let scenario_id = r.scenario.as_ref().map(|s| s.0.clone()).unwrap_or_default();
            for m in batch.metrics.iter().filter(|m| r.rule.selects(&batch.source, &m.name, &m.labels)) {
                let series = series_name(m);
                let key = (r.name.clone(), scenario_id.clone(), format!("{}/{series}", batch.source));
                let st = self.series.entry(key.clone()).or_default();
                let event = |state: pb::AlertState, message: String| pb::AlertEvent {
                    rule: r.name.clone(),
                    expr: r.rule.expr.clone(),
                    state: state as i32,
                    value: m.value,
                    metric: m.name.clone(),
                    source: batch.source.clone(),
                    labels: m.labels.clone(),
                    at: Some(timestamp_to_pb(SystemTime::now())),
                    scenario_id: scenario_id.clone(),
                    message,
                };
                if r.rule.breached_by(m.value) {
                    let since = *st.breaching_since.get_or_insert(now);
                    if !st.firing && now - since >= r.rule.hold {
                        st.firing = true;
                        let held = if r.rule.hold.is_zero() { String::new() } else { format!(" for {} ms", (now - since).as_millis()) };
                        let msg = format!("`{}` fired: {series} = {} on {}{held}", r.rule.expr, m.value, batch.source);
                        let ev = event(pb::AlertState::Firing, msg.clone());
                        if !scenario_id.is_empty() {
                            out.aborts.push((scenario_id.clone(), format!("stop condition {msg}")));
                        }
                        self.firing.insert(key.clone(), ev.clone());
                        out.events.push(ev);
                    }
                } else {
                    st.breaching_since = None;
                    if st.firing {
                        st.firing = false;
                        self.firing.remove(&key);
                        let msg = format!("`{}` resolved: {series} = {} on {}", r.rule.expr, m.value, batch.source);
                        out.events.push(event(pb::AlertState::Resolved, msg));
                    }
                }
            }
        }
        out
    }

    /// Drop the state of stop conditions whose scenario no longer runs.
    pub fn retain_scenarios(&mut self, running: &HashSet<String>) {
        self.series.retain(|k, _| k.1.is_empty() || running.contains(&k.1));
        self.firing.retain(|k, _| k.1.is_empty() || running.contains(&k.1));
    }

    pub fn firing(&self) -> Vec<pb::AlertEvent> {
        let mut v: Vec<pb::AlertEvent> = self.firing.values().cloned().collect();
        v.sort_by(|a, b| (&a.rule, &a.source, &a.metric).cmp(&(&b.rule, &b.source, &b.metric)));
        v
    }
}

/// Alerts fired, for `/metrics`: by rule name and kind ("alert"), or by
/// metric and kind ("stop_condition").
#[derive(Debug, Clone, Default)]
pub struct AlertCounters {
    pub fired: Family<Vec<(String, String)>, Counter>,
}

/// The evaluator: config rules plus the stop conditions of running
/// scenarios, fed from the hub.
pub struct Alerts {
    rules: Vec<NamedRule>,
    engine: Mutex<Engine>,
    counters: AlertCounters,
}

impl Alerts {
    pub fn new(rules: Vec<NamedRule>, counters: AlertCounters) -> Arc<Self> {
        Arc::new(Self { rules, engine: Mutex::default(), counters })
    }

    pub fn firing(&self) -> Vec<pb::AlertEvent> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner()).firing()
    }

    /// Stop conditions of the running scenarios (parsed once per scenario).
    fn scenario_rules(scenarios: &Scenarios, cache: &mut HashMap<String, Vec<NamedRule>>) -> Vec<NamedRule> {
        let running = scenarios.running_stop_conditions();
        let ids: HashSet<&String> = running.iter().map(|r| &r.0).collect();
        cache.retain(|k, _| ids.contains(k));
        for (id, started, exprs) in &running {
            cache.entry(id.clone()).or_insert_with(|| {
                exprs
                    .iter()
                    .filter_map(|e| match Rule::parse(e) {
                        Ok(rule) => Some(NamedRule { name: rule.expr.clone(), rule, scenario: Some((id.clone(), *started)) }),
                        // Validated at CreateScenario; a stored spec from an older version may not parse.
                        Err(why) => {
                            warn!(scenario = %id, %why, "stop condition ignored");
                            None
                        }
                    })
                    .collect()
            });
        }
        cache.values().flatten().cloned().collect()
    }

    /// Evaluate every batch the hub sees until the hub is gone.
    pub async fn run(self: Arc<Self>, hub: Arc<Hub>, scenarios: Arc<Scenarios>) {
        let mut rx = hub.subscribe();
        let mut cache = HashMap::new();
        let mut refreshed = Instant::now() - Duration::from_secs(1);
        let mut rules = self.rules.clone();
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "alert evaluation fell behind the hub; skipped batches");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let HubEvent::Batch(shared) = ev else { continue };
            // A scenario's stop conditions apply from its start: refresh often.
            if refreshed.elapsed() >= Duration::from_millis(200) {
                let sc = Self::scenario_rules(&scenarios, &mut cache);
                let running: HashSet<String> = cache.keys().cloned().collect();
                self.engine.lock().unwrap_or_else(|p| p.into_inner()).retain_scenarios(&running);
                rules = self.rules.iter().cloned().chain(sc).collect();
                refreshed = Instant::now();
            }
            // Decoded only when some rule reads it.
            if rules.is_empty() {
                continue;
            }
            let Some(batch) = decoded(&shared) else { continue };
            let out = self.engine.lock().unwrap_or_else(|p| p.into_inner()).observe(&rules, &batch, Instant::now());
            for ev in out.events {
                let firing = ev.state == pb::AlertState::Firing as i32;
                let kind = if ev.scenario_id.is_empty() { "alert" } else { "stop_condition" };
                if firing {
                    // Config alerts by name; stop conditions by metric (scenario ids would grow without bound).
                    let rule = if ev.scenario_id.is_empty() { ev.rule.clone() } else { ev.metric.clone() };
                    self.counters.fired.get_or_create(&vec![("rule".into(), rule), ("kind".into(), kind.into())]).inc();
                    warn!(rule = %ev.rule, source = %ev.source, value = ev.value, scenario = %ev.scenario_id, "{}", ev.message);
                }
                let action = match (firing, kind) {
                    (true, "alert") => "AlertFiring",
                    (true, _) => "StopConditionFired",
                    (false, "alert") => "AlertResolved",
                    (false, _) => "StopConditionResolved",
                };
                let target = if ev.scenario_id.is_empty() { ev.source.clone() } else { ev.scenario_id.clone() };
                if let Err(e) = scenarios.store().audit("coordinator (monitoring)", action, &target, &ev.message, "ok") {
                    tracing::error!(error = %e, "audit write failed");
                }
                hub.alert(ev);
            }
            for (id, reason) in out.aborts {
                scenarios.abort(&id, &reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chaos_proto::metrics::metric;

    fn rule(name: &str, expr: &str, scenario: Option<(&str, SystemTime)>) -> NamedRule {
        NamedRule { name: name.into(), rule: Rule::parse(expr).expect("rule"), scenario: scenario.map(|(s, t)| (s.into(), t)) }
    }

    fn batch(source: &str, v: f64, at: SystemTime) -> pb::MetricBatch {
        pb::MetricBatch {
            source: source.into(),
            sampled_at: Some(timestamp_to_pb(at)),
            metrics: vec![metric("kafka.lag.total", &[("probe", "k")], v), metric("other", &[], 1e9)],
            ..Default::default()
        }
    }

    #[test]
    fn fires_after_its_hold_and_resolves_once() {
        let mut e = Engine::default();
        let rules = [rule("lag", "kafka.lag.total > 100 for 2s", None)];
        let t0 = Instant::now();
        let now = SystemTime::now();
        assert!(e.observe(&rules, &batch("probe:k", 500.0, now), t0).events.is_empty(), "breach starts the clock");
        assert!(e.observe(&rules, &batch("probe:k", 500.0, now), t0 + Duration::from_secs(1)).events.is_empty());
        let out = e.observe(&rules, &batch("probe:k", 600.0, now), t0 + Duration::from_secs(2));
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0].state, pb::AlertState::Firing as i32);
        assert_eq!(out.events[0].value, 600.0);
        assert!(out.events[0].message.contains("kafka.lag.total{probe=k} = 600") && out.events[0].message.contains("for 2000 ms"));
        assert!(out.aborts.is_empty(), "an alert aborts nothing");
        assert_eq!(e.firing().len(), 1);
        assert!(e.observe(&rules, &batch("probe:k", 700.0, now), t0 + Duration::from_secs(3)).events.is_empty(), "fires once");
        let out = e.observe(&rules, &batch("probe:k", 5.0, now), t0 + Duration::from_secs(4));
        assert_eq!(out.events[0].state, pb::AlertState::Resolved as i32);
        assert!(e.firing().is_empty());
        // A dip resets the clock.
        e.observe(&rules, &batch("probe:k", 500.0, now), t0 + Duration::from_secs(5));
        e.observe(&rules, &batch("probe:k", 5.0, now), t0 + Duration::from_secs(6));
        assert!(e.observe(&rules, &batch("probe:k", 500.0, now), t0 + Duration::from_secs(7)).events.is_empty());
    }

    #[test]
    fn stop_conditions_abort_their_scenario_on_samples_after_its_start() {
        let mut e = Engine::default();
        let started = SystemTime::now();
        let rules = [rule("x", "kafka.lag.total >= 10", Some(("sc-1", started)))];
        let t = Instant::now();
        let before = started - Duration::from_secs(1);
        assert!(e.observe(&rules, &batch("probe:k", 50.0, before), t).aborts.is_empty(), "a sample from before the start");
        let out = e.observe(&rules, &batch("probe:k", 50.0, started + Duration::from_millis(10)), t);
        assert_eq!(out.aborts.len(), 1);
        assert_eq!(out.aborts[0].0, "sc-1");
        assert!(
            out.aborts[0].1.contains("stop condition `kafka.lag.total >= 10` fired") && out.aborts[0].1.contains("= 50"),
            "{:?}",
            out.aborts
        );
        assert_eq!(out.events[0].scenario_id, "sc-1");
        e.retain_scenarios(&HashSet::new());
        assert!(e.firing().is_empty(), "state of ended scenarios is dropped");
        let stale = pb::MetricBatch { stale: true, ..batch("probe:k", 50.0, started) };
        assert!(e.observe(&rules, &stale, t).events.is_empty(), "stale values are not current");
    }
}
