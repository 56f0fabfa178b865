//! Kafka through librdkafka (blocking calls, run on the blocking pool):
//! broker metadata, a topic's message count, a consumer group's lag.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail};
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use serde::Serialize;

/// A Kafka client for repeated looks (one librdkafka client, reused: a poll
/// loop does not build one per look). Every call is bounded by `within`.
#[derive(Clone)]
pub struct Probe {
    consumer: Arc<BaseConsumer>,
    bootstrap: String,
    group: String,
    within: Duration,
}

impl Probe {
    /// `group`: whose committed offsets [`Probe::lag`] reads (the probe never
    /// joins it: no subscribe).
    pub fn new(bootstrap: &str, group: Option<&str>, within: Duration) -> anyhow::Result<Probe> {
        let group = group.unwrap_or("chaos-probe").to_string();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("socket.timeout.ms", within.as_millis().max(10).to_string())
            .set("log_level", "3")
            .create()
            .with_context(|| format!("creating a Kafka client for {bootstrap}"))?;
        Ok(Probe { consumer: Arc::new(consumer), bootstrap: bootstrap.to_string(), group, within })
    }

    /// librdkafka blocks: run `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Probe) -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await.context("Kafka probe task")?
    }

    /// Broker ids of the cluster: proves a metadata round trip.
    pub async fn brokers(&self) -> anyhow::Result<Vec<i32>> {
        self.blocking(|p| {
            let md = p.consumer.fetch_metadata(None, p.within).with_context(|| format!("Kafka metadata from {}", p.bootstrap))?;
            let ids: Vec<i32> = md.brokers().iter().map(|x| x.id()).collect();
            if ids.is_empty() {
                bail!("Kafka at {} reports no broker", p.bootstrap);
            }
            Ok(ids)
        })
        .await
    }

    /// The topic's partitions, their offsets, and the group's lag in each.
    pub async fn lag(&self, topic: &str) -> anyhow::Result<TopicLag> {
        let t = topic.to_string();
        self.blocking(move |p| {
            let (c, b, g, within) = (&p.consumer, &p.bootstrap, &p.group, p.within);
            let md = c.fetch_metadata(Some(&t), within).with_context(|| format!("Kafka metadata of topic {t} from {b}"))?;
            let Some(mt) = md.topics().iter().find(|x| x.name() == t) else { bail!("topic {t} not in Kafka's metadata") };
            if let Some(e) = mt.error() {
                bail!("topic {t}: {e:?}");
            }
            let ids: Vec<i32> = mt.partitions().iter().map(|p| p.id()).collect();
            if ids.is_empty() {
                bail!("topic {t} has no partition");
            }
            let mut tpl = TopicPartitionList::new();
            for p in &ids {
                tpl.add_partition(&t, *p);
            }
            let committed = c.committed_offsets(tpl, within).with_context(|| format!("committed offsets of group {g}"))?;
            let mut partitions = Vec::new();
            for p in ids {
                let (low, high) = c.fetch_watermarks(&t, p, within).with_context(|| format!("offsets of {t}/{p}"))?;
                let committed = committed.find_partition(&t, p).and_then(|e| match e.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                });
                partitions.push(PartitionLag { partition: p, low, high, committed, lag: partition_lag(low, high, committed) });
            }
            Ok(TopicLag {
                messages: partitions.iter().map(|p| u64::try_from(p.high - p.low).unwrap_or(0)).sum(),
                total_lag: partitions.iter().map(|p| p.lag).sum(),
                partitions,
            })
        })
        .await
    }
}

/// One partition's offsets and the group's position in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionLag {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    /// The group's committed offset; None when it has committed none.
    pub committed: Option<i64>,
    pub lag: u64,
}

/// Messages in a topic and how far a consumer group is behind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopicLag {
    /// Messages held in the topic (sum of high - low over partitions).
    pub messages: u64,
    pub total_lag: u64,
    pub partitions: Vec<PartitionLag>,
}

/// A partition's lag: from the committed offset, or from the start when the group committed none.
pub fn partition_lag(low: i64, high: i64, committed: Option<i64>) -> u64 {
    let from = committed.unwrap_or(low).max(low);
    u64::try_from(high - from).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_commit_or_from_the_start() {
        assert_eq!(partition_lag(0, 100, Some(60)), 40);
        assert_eq!(partition_lag(10, 100, None), 90);
        // A commit behind the retention start counts from what is still there.
        assert_eq!(partition_lag(50, 100, Some(20)), 50);
        assert_eq!(partition_lag(0, 100, Some(100)), 0);
    }

    #[tokio::test]
    async fn an_absent_broker_is_an_error_naming_it() {
        // Loopback port 9 (discard) is closed here: refused at once.
        let e = Probe::new("127.0.0.1:9", None, Duration::from_millis(800)).expect("client").brokers().await.expect_err("no broker");
        assert!(format!("{e:#}").contains("127.0.0.1:9"), "{e:#}");
    }
}
