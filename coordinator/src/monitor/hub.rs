//! The metrics hub: the latest batch and a short window of each source
//! (agents and probes), fanned out to any number of watchers through one
//! bounded broadcast channel. Ingest never waits: a watcher that falls
//! behind loses the oldest events (and is told how many), it never slows
//! the agents or the other watchers.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use chaos_proto::{convert::duration_to_pb, metrics::Filter, pb};
use tokio::{sync::broadcast, time::Instant};

struct Source {
    latest: Arc<pb::MetricBatch>,
    window: VecDeque<Arc<pb::MetricBatch>>,
    received_at: Option<Instant>,
    received: u64,
    stale: bool,
    error: String,
    /// How often the source is expected to report.
    interval: Duration,
}

impl Source {
    fn new(latest: Arc<pb::MetricBatch>, interval: Duration) -> Self {
        Source { latest, window: VecDeque::new(), received_at: None, received: 0, stale: false, error: String::new(), interval }
    }
}

/// What the hub fans out: shared, so a batch is never copied to be sent.
#[derive(Debug, Clone)]
pub enum HubEvent {
    Batch(Arc<pb::MetricBatch>),
    Alert(Arc<pb::AlertEvent>),
}

/// The hub. Cheap to share (`Arc`).
pub struct Hub {
    sources: Mutex<HashMap<String, Source>>,
    events: broadcast::Sender<HubEvent>,
    window: usize,
}

impl Hub {
    /// `window`: batches kept per source; `capacity`: events buffered for
    /// the slowest watcher before it starts skipping.
    pub fn new(window: usize, capacity: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(capacity.max(16));
        Arc::new(Self { sources: Mutex::default(), events, window: window.max(1) })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Source>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch arrived from `batch.source`, expected every `interval`.
    pub fn ingest(&self, batch: pb::MetricBatch, interval: Duration) {
        let batch = Arc::new(batch);
        {
            let mut g = self.lock();
            let s = g.entry(batch.source.clone()).or_insert_with(|| Source::new(Arc::clone(&batch), interval));
            s.latest = Arc::clone(&batch);
            if s.window.len() == self.window {
                s.window.pop_front();
            }
            s.window.push_back(Arc::clone(&batch));
            s.received_at = Some(Instant::now());
            s.received += 1;
            s.stale = false;
            s.error = batch.error.clone();
            s.interval = interval;
        }
        // No receiver is fine: nobody watches.
        let _ = self.events.send(HubEvent::Batch(batch));
    }

    /// The source stopped reporting (its stream broke, or it is silent):
    /// say so once, with the last values and why.
    pub fn mark_stale(&self, source: &str, error: &str) {
        let out = {
            let mut g = self.lock();
            let Some(s) = g.get_mut(source) else {
                // Never reported: remember the error for GetMetrics.
                let empty = pb::MetricBatch { source: source.to_string(), stale: true, error: error.to_string(), ..Default::default() };
                let mut s = Source::new(Arc::new(empty), Duration::from_secs(1));
                (s.stale, s.error) = (true, error.to_string());
                g.insert(source.to_string(), s);
                return;
            };
            s.error = error.to_string();
            if s.stale {
                return;
            }
            s.stale = true;
            pb::MetricBatch { stale: true, error: error.to_string(), ..(*s.latest).clone() }
        };
        let _ = self.events.send(HubEvent::Batch(Arc::new(out)));
    }

    /// Mark every source silent for three of its intervals as stale.
    pub fn sweep(&self) {
        let now = Instant::now();
        let silent: Vec<(String, Duration)> = self
            .lock()
            .iter()
            .filter(|(_, s)| !s.stale && s.received_at.is_some_and(|t| now - t > s.interval * 3))
            .map(|(k, s)| (k.clone(), s.received_at.map(|t| now - t).unwrap_or_default()))
            .collect();
        for (source, age) in silent {
            self.mark_stale(&source, &format!("no metrics for {} ms", age.as_millis()));
        }
    }

    /// Forget a source (an agent that left the registry).
    pub fn remove(&self, source: &str) {
        self.lock().remove(source);
    }

    pub fn alert(&self, ev: pb::AlertEvent) {
        let _ = self.events.send(HubEvent::Alert(Arc::new(ev)));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.events.subscribe()
    }

    /// The latest batch of every probe that is not stale (for `/metrics`:
    /// agents export their own host metrics).
    pub fn current_probes(&self) -> Vec<Arc<pb::MetricBatch>> {
        self.lock().iter().filter(|(k, s)| k.starts_with("probe:") && !s.stale).map(|(_, s)| Arc::clone(&s.latest)).collect()
    }

    /// The latest batch of each matching source (plus up to `history`
    /// earlier ones, oldest first), and every source's freshness.
    pub fn snapshot(&self, filter: &Filter, history: usize) -> (Vec<pb::MetricBatch>, Vec<pb::SourceStatus>) {
        let now = Instant::now();
        let g = self.lock();
        let mut names: Vec<&String> = g.keys().collect();
        names.sort();
        let (mut batches, mut statuses) = (Vec::new(), Vec::new());
        for name in names {
            let s = &g[name];
            if !filter.wants_source(name, &s.latest.source_labels) {
                continue;
            }
            statuses.push(pb::SourceStatus {
                source: name.clone(),
                stale: s.stale,
                age: s.received_at.map(|t| duration_to_pb(now - t)),
                error: s.error.clone(),
                batches_received: s.received,
            });
            let earlier = s.window.len().saturating_sub(1);
            for b in s.window.iter().skip(earlier.saturating_sub(history)).take(earlier.min(history)) {
                batches.extend(filter.apply(b));
            }
            let latest = pb::MetricBatch { stale: s.stale, error: s.error.clone(), ..(*s.latest).clone() };
            batches.extend(filter.apply(&latest));
        }
        (batches, statuses)
    }

    /// Sources known, for the Prometheus gauge.
    pub fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.len(), g.values().filter(|s| s.stale).count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chaos_proto::metrics::metric;

    fn batch(source: &str, seq: u64, v: f64) -> pb::MetricBatch {
        pb::MetricBatch { source: source.into(), seq, metrics: vec![metric("host.cpu.used_pct", &[], v)], ..Default::default() }
    }

    #[tokio::test]
    async fn a_slow_watcher_skips_and_never_delays_a_fast_one() {
        let hub = Hub::new(4, 16);
        let mut slow = hub.subscribe();
        let mut fast = hub.subscribe();
        // The slow watcher reads nothing while 1,000 batches go by; ingest
        // never blocks and the fast one sees every batch in order.
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 1000 {
                match fast.recv().await {
                    Ok(HubEvent::Batch(b)) => seen.push(b.seq),
                    Ok(HubEvent::Alert(_)) => {}
                    Err(e) => panic!("fast watcher lagged: {e}"),
                }
            }
            seen
        });
        for i in 1..=1000 {
            hub.ingest(batch("a", i, 1.0), Duration::from_secs(1));
            if i % 8 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let seen = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("fast watcher done").expect("join");
        assert_eq!(seen, (1..=1000).collect::<Vec<_>>());
        match slow.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert!(n >= 900, "skipped {n}"),
            other => panic!("the slow watcher should have skipped: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_sources_go_stale_once_and_recover() {
        let hub = Hub::new(3, 64);
        let mut rx = hub.subscribe();
        for i in 1..=5 {
            hub.ingest(batch("a", i, i as f64), Duration::from_secs(1));
        }
        while rx.try_recv().is_ok() {}
        tokio::time::advance(Duration::from_millis(3500)).await;
        hub.sweep();
        hub.sweep();
        let ev = rx.try_recv().expect("stale event");
        let HubEvent::Batch(b) = &ev else { panic!("{ev:?}") };
        assert!(b.stale && b.error.contains("no metrics for 3500 ms"), "{b:?}");
        assert_eq!(b.seq, 5, "the last values, marked stale");
        assert!(rx.try_recv().is_err(), "stale is said once");
        let (batches, st) = hub.snapshot(&Filter::default(), 10);
        assert!(st[0].stale);
        assert_eq!(batches.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![3, 4, 5], "window of 3");
        hub.ingest(batch("a", 6, 6.0), Duration::from_secs(1));
        let (_, st) = hub.snapshot(&Filter::default(), 0);
        assert!(!st[0].stale);
    }
}
