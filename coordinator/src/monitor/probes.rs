//! Probes: the services' own numbers, measured by the coordinator on an
//! interval, each look bounded by a timeout so that a dead service reads as
//! unavailable at once (`probe.up` 0, the error in the batch) instead of
//! hanging. Their batches (source `probe:NAME`) flow through the hub like
//! the agents'.
//!
//! Metrics by kind (every one labelled `probe=NAME`):
//! - all: `probe.up` (1/0), `probe.duration_ms`
//! - kafka: `kafka.messages{topic}` (end minus start offsets),
//!   `kafka.produce_rate_per_s{topic}`, `kafka.lag.total{topic,group}`,
//!   `kafka.lag.partition{topic,group,partition}`
//! - cassandra: `cassandra.rows{table}`, `cassandra.rows_per_s{table}`,
//!   `cassandra.write_ms` / `cassandra.read_ms` (a probe row),
//!   `cassandra.query_ms` (system.local, when nothing else is configured)
//! - tcp: `tcp.connect_ms{address}`
//! - http: `http.status{url}`, `http.latency_ms{url}`
//! - file: `file.FIELD{path}` for each top-level number of a JSON file

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use chaos_probes::{bounded, cassandra, http, kafka, tcp};
use chaos_proto::{convert::timestamp_to_pb, metrics::metric, pb};
use serde::Deserialize;
use tracing::{debug, info};

use super::hub::Hub;
use crate::policy::DurationValue;

/// One `monitoring.probes` entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeFile {
    pub name: String,
    /// kafka | cassandra | tcp | http | file
    pub kind: String,
    pub interval: Option<DurationValue>,
    pub timeout: Option<DurationValue>,
    // kafka
    pub bootstrap: Option<String>,
    pub topic: Option<String>,
    pub group: Option<String>,
    // cassandra
    pub contact: Option<String>,
    pub count_table: Option<String>,
    pub probe_table: Option<String>,
    // tcp
    pub address: Option<String>,
    // http
    pub url: Option<String>,
    pub expect_status: Option<u16>,
    // file
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProbeKind {
    Kafka { bootstrap: String, topic: String, group: Option<String> },
    Cassandra { contact: String, count_table: Option<String>, probe_table: Option<String> },
    Tcp { address: String },
    Http { url: String, expect_status: Option<u16> },
    File { path: String },
}

/// A validated probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSpec {
    pub name: String,
    pub kind: ProbeKind,
    pub interval: Duration,
    pub timeout: Duration,
}

impl ProbeFile {
    /// Validate; errors name `monitoring.probes[i].KEY` and the value.
    pub fn resolve(&self, i: usize, default_interval: Duration) -> Result<ProbeSpec, String> {
        let key = |k: &str| format!("monitoring.probes[{i}].{k}");
        let name_ok = !self.name.is_empty() && self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            return Err(format!("{}: expected letters, digits, '_', '-', '.', got {:?}", key("name"), self.name));
        }
        let need = |v: &Option<String>, k: &str| -> Result<String, String> {
            v.clone().filter(|s| !s.is_empty()).ok_or_else(|| format!("{}: required for kind {}", key(k), self.kind))
        };
        let table = |v: &Option<String>, k: &str| -> Result<Option<String>, String> {
            v.as_ref().map(|t| cassandra::parse_table_name(t).map_err(|e| format!("{}: {e}", key(k)))).transpose()
        };
        let kind = match self.kind.as_str() {
            "kafka" => ProbeKind::Kafka {
                bootstrap: need(&self.bootstrap, "bootstrap")?,
                topic: need(&self.topic, "topic")?,
                group: self.group.clone(),
            },
            "cassandra" => ProbeKind::Cassandra {
                contact: need(&self.contact, "contact")?,
                count_table: table(&self.count_table, "count_table")?,
                probe_table: table(&self.probe_table, "probe_table")?,
            },
            "tcp" => ProbeKind::Tcp { address: need(&self.address, "address")? },
            "http" => {
                let url = need(&self.url, "url")?;
                http::parse_url(&url).map_err(|e| format!("{}: {e}", key("url")))?;
                ProbeKind::Http { url, expect_status: self.expect_status }
            }
            "file" => ProbeKind::File { path: need(&self.path, "path")? },
            other => return Err(format!("{}: expected kafka, cassandra, tcp, http or file, got {other:?}", key("kind"))),
        };
        let dur = |v: &Option<DurationValue>, k: &str, default: Duration| -> Result<Duration, String> {
            let d = v.as_ref().map(|d| d.resolve(&key(k))).transpose()?.unwrap_or(default);
            if d < Duration::from_millis(100) {
                return Err(format!("{}: must be at least 100ms, got {}", key(k), humantime::format_duration(d)));
            }
            Ok(d)
        };
        let interval = dur(&self.interval, "interval", default_interval)?;
        let timeout = dur(&self.timeout, "timeout", interval.min(Duration::from_secs(2)))?;
        if timeout > interval {
            return Err(format!(
                "{}: {} is longer than the interval ({}); a probe must answer before the next look",
                key("timeout"),
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ));
        }
        Ok(ProbeSpec { name: self.name.clone(), kind, interval, timeout })
    }
}

/// A probe's state between looks (clients kept, previous counters).
#[derive(Default)]
struct State {
    kafka: Option<kafka::Probe>,
    cassandra: Option<Arc<scylla::client::session::Session>>,
    /// The probe table exists (created once per session).
    probe_table_ready: bool,
    previous: HashMap<String, (f64, Instant)>,
}

impl State {
    /// Per-second rate of a growing count since the previous look.
    fn rate(&mut self, key: &str, now_value: f64) -> Option<f64> {
        let now = Instant::now();
        let prev = self.previous.insert(key.to_string(), (now_value, now));
        prev.map(|(v, t)| (now_value - v).max(0.0) / (now - t).as_secs_f64().max(1e-3))
    }
}

/// One look: the probe's metrics, or why the service is unavailable.
async fn look(spec: &ProbeSpec, st: &mut State) -> anyhow::Result<Vec<pb::Metric>> {
    let p = spec.name.as_str();
    let mut out = Vec::new();
    match &spec.kind {
        ProbeKind::Kafka { bootstrap, topic, group } => {
            if st.kafka.is_none() {
                st.kafka = Some(kafka::Probe::new(bootstrap, group.as_deref(), spec.timeout)?);
            }
            let client = st.kafka.as_ref().ok_or_else(|| anyhow::anyhow!("no Kafka client"))?;
            let lag = client.lag(topic).await?;
            out.push(metric("kafka.messages", &[("probe", p), ("topic", topic)], lag.messages as f64));
            let end: i64 = lag.partitions.iter().map(|x| x.high).sum();
            if let Some(r) = st.rate(&format!("end:{topic}"), end as f64) {
                out.push(metric("kafka.produce_rate_per_s", &[("probe", p), ("topic", topic)], r));
            }
            if let Some(g) = group {
                out.push(metric("kafka.lag.total", &[("probe", p), ("topic", topic), ("group", g)], lag.total_lag as f64));
                for part in &lag.partitions {
                    let n = part.partition.to_string();
                    out.push(metric(
                        "kafka.lag.partition",
                        &[("probe", p), ("topic", topic), ("group", g), ("partition", &n)],
                        part.lag as f64,
                    ));
                }
            }
        }
        ProbeKind::Cassandra { contact, count_table, probe_table } => {
            if st.cassandra.is_none() {
                st.cassandra = Some(Arc::new(cassandra::connect(contact).await?));
                st.probe_table_ready = false;
            }
            let s = st.cassandra.clone().ok_or_else(|| anyhow::anyhow!("no Cassandra session"))?;
            if let Some(t) = count_table {
                let n = cassandra::count(&s, t).await?;
                out.push(metric("cassandra.rows", &[("probe", p), ("table", t)], n as f64));
                if let Some(r) = st.rate(&format!("rows:{t}"), n as f64) {
                    out.push(metric("cassandra.rows_per_s", &[("probe", p), ("table", t)], r));
                }
            }
            if let Some(t) = probe_table {
                if !st.probe_table_ready {
                    cassandra::ensure_probe_table(&s, t).await?;
                    st.probe_table_ready = true;
                }
                let (w, r) = cassandra::write_read(&s, t, &format!("probe:{p}")).await?;
                out.push(metric("cassandra.write_ms", &[("probe", p)], w.as_secs_f64() * 1000.0));
                out.push(metric("cassandra.read_ms", &[("probe", p)], r.as_secs_f64() * 1000.0));
            }
            if count_table.is_none() && probe_table.is_none() {
                let t0 = Instant::now();
                cassandra::release_version(&s).await?;
                out.push(metric("cassandra.query_ms", &[("probe", p)], t0.elapsed().as_secs_f64() * 1000.0));
            }
        }
        ProbeKind::Tcp { address } => {
            let took = tcp::connect(address, spec.timeout).await?;
            out.push(metric("tcp.connect_ms", &[("probe", p), ("address", address)], took.as_secs_f64() * 1000.0));
        }
        ProbeKind::Http { url, expect_status } => {
            let (code, took) = http::status(url, spec.timeout).await?;
            out.push(metric("http.status", &[("probe", p), ("url", url)], f64::from(code)));
            out.push(metric("http.latency_ms", &[("probe", p), ("url", url)], took.as_secs_f64() * 1000.0));
            let ok = match expect_status {
                Some(want) => code == *want,
                None => (200..400).contains(&code),
            };
            if !ok {
                let want = expect_status.map(|w| w.to_string()).unwrap_or_else(|| "2xx or 3xx".into());
                anyhow::bail!("GET {url} answered {code}, expected {want}");
            }
        }
        ProbeKind::File { path } => {
            let text = tokio::fs::read_to_string(path).await.map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{path}: not JSON: {e}"))?;
            let obj = v.as_object().ok_or_else(|| anyhow::anyhow!("{path}: expected a JSON object"))?;
            for (k, v) in obj {
                if let Some(n) = v.as_f64() {
                    out.push(metric(&format!("file.{k}"), &[("probe", p), ("path", path)], n));
                }
            }
        }
    }
    Ok(out)
}

/// Run one probe until the task is aborted.
pub async fn run(spec: ProbeSpec, hub: Arc<Hub>) {
    let source = format!("probe:{}", spec.name);
    let mut st = State::default();
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut was_up = None;
    info!(probe = %spec.name, kind = ?spec.kind, interval = %humantime::format_duration(spec.interval), "probe started");
    loop {
        tick.tick().await;
        let t0 = Instant::now();
        let got = bounded(&format!("probe {}", spec.name), spec.timeout, look(&spec, &mut st)).await;
        let took = t0.elapsed().as_secs_f64() * 1000.0;
        let p = spec.name.as_str();
        let (mut metrics, error) = match got {
            Ok(m) => (m, String::new()),
            Err(e) => {
                // A fresh client at the next look: a half-dead one may be why.
                st.kafka = None;
                st.cassandra = None;
                (Vec::new(), format!("{e:#}"))
            }
        };
        let up = error.is_empty();
        if was_up != Some(up) {
            if up {
                info!(probe = %spec.name, "probe: service available");
            } else {
                info!(probe = %spec.name, error = %error, "probe: service UNAVAILABLE");
            }
            was_up = Some(up);
        }
        debug!(probe = %spec.name, up, took_ms = took, "probe look");
        metrics.push(metric("probe.up", &[("probe", p)], if up { 1.0 } else { 0.0 }));
        metrics.push(metric("probe.duration_ms", &[("probe", p)], took));
        seq += 1;
        hub.ingest(
            pb::MetricBatch {
                source: source.clone(),
                sampled_at: Some(timestamp_to_pb(SystemTime::now())),
                metrics,
                seq,
                error,
                ..Default::default()
            },
            spec.interval,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(kind: &str) -> ProbeFile {
        ProbeFile { name: "p1".into(), kind: kind.into(), ..Default::default() }
    }

    #[test]
    fn validation_names_the_key_and_value() {
        let d = Duration::from_secs(1);
        assert!(file("redis").resolve(0, d).expect_err("kind").contains("monitoring.probes[0].kind"));
        assert!(file("kafka").resolve(2, d).expect_err("bootstrap").contains("monitoring.probes[2].bootstrap: required for kind kafka"));
        let e = ProbeFile { url: Some("https://x/".into()), ..file("http") }.resolve(0, d).expect_err("tls");
        assert!(e.contains("monitoring.probes[0].url") && e.contains("no TLS"), "{e}");
        let e = ProbeFile { contact: Some("h:9042".into()), count_table: Some("a;b".into()), ..file("cassandra") }
            .resolve(0, d)
            .expect_err("t");
        assert!(e.contains("count_table") && e.contains("a;b"), "{e}");
        let e = ProbeFile { address: Some("h:1".into()), timeout: Some(DurationValue::Text("5s".into())), ..file("tcp") }
            .resolve(0, d)
            .expect_err("t");
        assert!(e.contains("timeout") && e.contains("longer than the interval"), "{e}");
        let e = ProbeFile { name: "a b".into(), ..file("tcp") }.resolve(0, d).expect_err("name");
        assert!(e.contains("\"a b\""), "{e}");
        let ok = ProbeFile { address: Some("h:1".into()), ..file("tcp") }.resolve(0, d).expect("ok");
        assert_eq!((ok.interval, ok.timeout), (d, d));
    }

    #[tokio::test]
    async fn a_stopped_service_reads_unavailable_within_the_timeout() {
        // A listener that accepts and never answers: an HTTP probe must
        // give up at its timeout, not hang.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let hub = Hub::new(4, 64);
        let mut rx = hub.subscribe();
        let spec = ProbeSpec {
            name: "web".into(),
            kind: ProbeKind::Http { url: format!("http://{addr}/health"), expect_status: None },
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
        };
        let task = tokio::spawn(run(spec, Arc::clone(&hub)));
        let t0 = Instant::now();
        let ev = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.expect("a batch").expect("recv");
        let super::super::hub::HubEvent::Batch(b) = &ev else { panic!("{ev:?}") };
        let b = b.decode().expect("decodes");
        assert!(t0.elapsed() < Duration::from_millis(1500), "took {:?}", t0.elapsed());
        assert_eq!(b.source, "probe:web");
        assert!(b.error.contains("no answer within 300 ms"), "{}", b.error);
        let up = b.metrics.iter().find(|m| m.name == "probe.up").expect("probe.up");
        assert_eq!(up.value, 0.0);
        assert!(!b.metrics.iter().any(|m| m.name == "http.status"), "no value for an unavailable service");
        task.abort();
    }

    #[tokio::test]
    async fn file_probe_reads_numbers() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("status.json");
        std::fs::write(&path, r#"{"produced": 120, "acked": 118, "note": "x"}"#).expect("write");
        let spec = ProbeSpec {
            name: "collector".into(),
            kind: ProbeKind::File { path: path.display().to_string() },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        let m = look(&spec, &mut State::default()).await.expect("look");
        let get = |n: &str| m.iter().find(|x| x.name == n).map(|x| x.value);
        assert_eq!((get("file.produced"), get("file.acked"), get("file.note")), (Some(120.0), Some(118.0), None));
        std::fs::remove_file(&path).expect("rm");
        assert!(look(&spec, &mut State::default()).await.expect_err("gone").to_string().contains("status.json"));
    }
}
