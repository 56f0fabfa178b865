//! The metrics hub: the latest batch and a short window of each source
//! (agents and probes), fanned out to any number of watchers through one
//! bounded broadcast channel. Ingest never waits: a watcher that falls
//! behind loses the oldest events (and is told how many), it never slows
//! the agents or the other watchers.
//!
//! Each batch is encoded once, at ingest, as the `MetricEvent` a watcher
//! receives ([`SharedBatch`]); the window, the channel and every watcher
//! share those bytes, so ten watchers cost about what one does and a kept
//! batch costs its encoded size (a decoded one, with a map per metric, is
//! about ten times larger). Code that reads the values decodes them.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use chaos_proto::{convert::duration_to_pb, metrics::Filter, pb};
use prost::{Message, bytes::Bytes};
use tokio::{sync::broadcast, time::Instant};
use tracing::error;

/// One batch as the hub keeps and sends it: the encoding of
/// `MetricEvent { batch }`, made once, plus what a watcher's source filter
/// looks at, so most watchers never decode it.
#[derive(Debug, Clone)]
pub struct SharedBatch {
    pub source: String,
    pub source_labels: HashMap<String, String>,
    pub seq: u64,
    /// The encoded `MetricEvent` (field 1, the batch) as sent to a watcher.
    event: Bytes,
    /// Where the encoded `MetricBatch` starts inside `event` (after its tag and length).
    batch_at: usize,
}

impl SharedBatch {
    /// Encode `batch` once; its source labels move into the result.
    pub fn new(mut batch: pb::MetricBatch) -> Self {
        let len = batch.encoded_len();
        let mut event = Vec::with_capacity(len + 1 + prost::length_delimiter_len(len));
        // `MetricEvent { event: Some(Batch(batch)) }` is exactly field 1 holding the batch.
        prost::encoding::message::encode(1, &batch, &mut event);
        let batch_at = event.len() - len;
        Self {
            source: std::mem::take(&mut batch.source),
            source_labels: std::mem::take(&mut batch.source_labels),
            seq: batch.seq,
            event: event.into(),
            batch_at,
        }
    }

    /// The encoded `MetricEvent` carrying this batch, as a watcher receives it.
    pub fn event_bytes(&self) -> &Bytes {
        &self.event
    }

    /// Bytes this batch holds.
    pub fn size(&self) -> usize {
        self.event.len()
    }

    /// The batch's values. The bytes are the hub's own encoding, so this
    /// fails only on a bug; the caller logs it and skips the batch.
    pub fn decode(&self) -> Result<pb::MetricBatch, prost::DecodeError> {
        pb::MetricBatch::decode(self.event.slice(self.batch_at..))
    }
}

struct Source {
    latest: Arc<SharedBatch>,
    window: VecDeque<Arc<SharedBatch>>,
    /// Bytes held by `window`, kept at most the hub's `window_bytes`.
    window_bytes: usize,
    received_at: Option<Instant>,
    received: u64,
    stale: bool,
    error: String,
    /// How often the source is expected to report.
    interval: Duration,
}

impl Source {
    fn new(latest: Arc<SharedBatch>, interval: Duration) -> Self {
        Source {
            latest,
            window: VecDeque::new(),
            window_bytes: 0,
            received_at: None,
            received: 0,
            stale: false,
            error: String::new(),
            interval,
        }
    }
}

/// What the hub fans out: shared, so a batch is never copied to be sent.
#[derive(Debug, Clone)]
pub enum HubEvent {
    Batch(Arc<SharedBatch>),
    Alert(Arc<pb::AlertEvent>),
}

/// The hub. Cheap to share (`Arc`).
pub struct Hub {
    sources: Mutex<HashMap<String, Source>>,
    events: broadcast::Sender<HubEvent>,
    window: usize,
    window_bytes: usize,
}

/// Bytes of encoded batches a source's window keeps by default (the
/// latest batch is always kept, whatever its size).
pub const WINDOW_BYTES: usize = 256 * 1024;

impl Hub {
    /// `window`: batches kept per source; `capacity`: events buffered for
    /// the slowest watcher before it starts skipping.
    pub fn new(window: usize, capacity: usize) -> Arc<Self> {
        Self::with_limits(window, WINDOW_BYTES, capacity)
    }

    /// As [`Hub::new`], with at most `window_bytes` of encoded batches per source window.
    pub fn with_limits(window: usize, window_bytes: usize, capacity: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(capacity.max(16));
        Arc::new(Self { sources: Mutex::default(), events, window: window.max(1), window_bytes })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Source>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch arrived from `batch.source`, expected every `interval`.
    pub fn ingest(&self, batch: pb::MetricBatch, interval: Duration) {
        let error = batch.error.clone();
        let batch = Arc::new(SharedBatch::new(batch));
        {
            let mut g = self.lock();
            let s = g.entry(batch.source.clone()).or_insert_with(|| Source::new(Arc::clone(&batch), interval));
            s.latest = Arc::clone(&batch);
            s.window.push_back(Arc::clone(&batch));
            s.window_bytes += batch.size();
            while s.window.len() > self.window || (s.window_bytes > self.window_bytes && s.window.len() > 1) {
                if let Some(old) = s.window.pop_front() {
                    s.window_bytes -= old.size();
                }
            }
            s.received_at = Some(Instant::now());
            s.received += 1;
            s.stale = false;
            s.error = error;
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
                let mut s = Source::new(Arc::new(SharedBatch::new(empty)), Duration::from_secs(1));
                (s.stale, s.error) = (true, error.to_string());
                g.insert(source.to_string(), s);
                return;
            };
            s.error = error.to_string();
            if s.stale {
                return;
            }
            s.stale = true;
            // The last values, now marked stale with why.
            let Some(b) = latest(s) else { return };
            SharedBatch::new(b)
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
    pub fn current_probes(&self) -> Vec<pb::MetricBatch> {
        self.lock().iter().filter(|(k, s)| k.starts_with("probe:") && !s.stale).filter_map(|(_, s)| decoded(&s.latest)).collect()
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
                batches.extend(decoded(b).and_then(|b| filter.apply(&b)));
            }
            if let Some(latest) = latest(s) {
                batches.extend(filter.apply(&latest));
            }
        }
        (batches, statuses)
    }

    /// Sources known, for the Prometheus gauge.
    pub fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.len(), g.values().filter(|s| s.stale).count())
    }
}

/// The source's latest batch as GetMetrics shows it: with its staleness and error now.
fn latest(s: &Source) -> Option<pb::MetricBatch> {
    decoded(&s.latest).map(|b| pb::MetricBatch { stale: s.stale, error: s.error.clone(), ..b })
}

/// `b` decoded, or None (logged): the hub's own bytes always decode.
pub fn decoded(b: &SharedBatch) -> Option<pb::MetricBatch> {
    match b.decode() {
        Ok(batch) => Some(batch),
        Err(e) => {
            error!(source = %b.source, seq = b.seq, error = %e, "a batch the hub encoded does not decode; skipped");
            None
        }
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
        let b = b.decode().expect("decodes");
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

    #[test]
    fn the_shared_bytes_are_the_metric_event_a_watcher_was_sent() {
        let b = pb::MetricBatch {
            source: "a".into(),
            sampled_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5 }),
            metrics: vec![
                metric("host.cpu.used_pct", &[("core", "0")], 12.5),
                metric("net.rx_bytes_total", &[("iface", "eth0"), ("netns", "x")], 9.0),
            ],
            seq: 7,
            stale: true,
            error: "why".into(),
            source_labels: [("role".to_string(), "kafka".to_string()), ("zone".to_string(), "b".to_string())].into(),
        };
        let shared = SharedBatch::new(b.clone());
        let sent = pb::MetricEvent { event: Some(pb::metric_event::Event::Batch(b.clone())) };
        assert_eq!(pb::MetricEvent::decode(shared.event_bytes().clone()).expect("decodes"), sent);
        assert_eq!(shared.event_bytes().len(), sent.encoded_len());
        assert_eq!(shared.decode().expect("decodes"), b);
        assert_eq!((shared.source.as_str(), shared.seq, shared.source_labels.get("role").map(String::as_str)), ("a", 7, Some("kafka")));
    }

    #[test]
    fn a_source_window_is_bounded_in_batches_and_in_bytes() {
        let big = |seq| pb::MetricBatch {
            source: "a".into(),
            seq,
            metrics: (0..100).map(|i| metric("standin.value", &[("i", &i.to_string())], 1.0)).collect(),
            ..Default::default()
        };
        let one = SharedBatch::new(big(1)).size();
        // Room for three big batches, though the window counts ten.
        let hub = Hub::with_limits(10, 3 * one + one / 2, 16);
        for seq in 1..=20 {
            hub.ingest(big(seq), Duration::from_secs(1));
        }
        let (batches, _) = hub.snapshot(&Filter::default(), 100);
        assert_eq!(batches.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![18, 19, 20]);
        let held: usize = hub.lock()["a"].window.iter().map(|b| b.size()).sum();
        assert!(held <= 3 * one + one / 2 && held == hub.lock()["a"].window_bytes, "{held}");
        // A batch larger than the bound still is the latest.
        let tiny = Hub::with_limits(10, 10, 16);
        tiny.ingest(big(1), Duration::from_secs(1));
        tiny.ingest(big(2), Duration::from_secs(1));
        let (batches, _) = tiny.snapshot(&Filter::default(), 100);
        assert_eq!(batches.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![2]);
        // Small batches: the count bounds it.
        let hub = Hub::with_limits(3, WINDOW_BYTES, 16);
        for seq in 1..=9 {
            hub.ingest(batch("a", seq, 1.0), Duration::from_secs(1));
        }
        assert_eq!(hub.lock()["a"].window.len(), 3);
    }
}
