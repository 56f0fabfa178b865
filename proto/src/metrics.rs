//! Helpers for `chaos.v1` metric batches that the agent, the coordinator and
//! the CLI share: building a metric, and the watchers' filter (source,
//! source labels, metric-name prefixes).

use std::collections::HashMap;

use crate::pb;

/// One metric value with its labels.
pub fn metric(name: &str, labels: &[(&str, &str)], value: f64) -> pb::Metric {
    pb::Metric { name: name.to_string(), labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), value }
}

/// What a watcher asked to see.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sources: Vec<String>,
    pub source_labels: HashMap<String, String>,
    pub metric_prefixes: Vec<String>,
}

impl Filter {
    fn new(sources: &[String], source_labels: &HashMap<String, String>, metric_prefixes: &[String]) -> Self {
        Self { sources: sources.to_vec(), source_labels: source_labels.clone(), metric_prefixes: metric_prefixes.to_vec() }
    }

    pub fn from_stream(r: &pb::StreamMetricsRequest) -> Self {
        Self::new(&r.sources, &r.source_labels, &r.metric_prefixes)
    }

    pub fn from_get(r: &pb::GetMetricsRequest) -> Self {
        Self::new(&r.sources, &r.source_labels, &r.metric_prefixes)
    }

    /// Whether the batch's source is one the watcher wants.
    pub fn wants_source(&self, source: &str, labels: &HashMap<String, String>) -> bool {
        (self.sources.is_empty() || self.sources.iter().any(|s| s == source))
            && self.source_labels.iter().all(|(k, v)| labels.get(k).is_some_and(|x| x == v))
    }

    pub fn wants_metric(&self, name: &str) -> bool {
        self.metric_prefixes.is_empty() || self.metric_prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// The part of `batch` the watcher wants, or None.
    pub fn apply(&self, batch: &pb::MetricBatch) -> Option<pb::MetricBatch> {
        if !self.wants_source(&batch.source, &batch.source_labels) {
            return None;
        }
        if self.metric_prefixes.is_empty() {
            return Some(batch.clone());
        }
        let metrics: Vec<pb::Metric> = batch.metrics.iter().filter(|m| self.wants_metric(&m.name)).cloned().collect();
        // A stale or failed source is news even without matching metrics.
        (!metrics.is_empty() || batch.stale || !batch.error.is_empty()).then(|| pb::MetricBatch { metrics, ..batch.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_by_source_labels_and_prefix() {
        let b = pb::MetricBatch {
            source: "a1".into(),
            metrics: vec![metric("host.cpu.used_pct", &[], 5.0), metric("host.memory.used_pct", &[], 50.0)],
            source_labels: [("role".to_string(), "kafka".to_string())].into(),
            ..Default::default()
        };
        assert!(Filter::default().apply(&b).is_some());
        let f = Filter { metric_prefixes: vec!["host.cpu".into()], ..Default::default() };
        assert_eq!(f.apply(&b).expect("kept").metrics.len(), 1);
        let f = Filter { metric_prefixes: vec!["kafka.".into()], ..Default::default() };
        assert!(f.apply(&b).is_none());
        let f = Filter { source_labels: [("role".to_string(), "cassandra".to_string())].into(), ..Default::default() };
        assert!(f.apply(&b).is_none());
        let f =
            Filter { sources: vec!["a1".into()], source_labels: [("role".to_string(), "kafka".to_string())].into(), ..Default::default() };
        assert!(f.apply(&b).is_some());
    }
}
