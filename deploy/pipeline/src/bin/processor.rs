//! `chaos-processor`: a Kafka consumer group that writes each log event to
//! Cassandra by id (an upsert: a redelivery is harmless) and stores the
//! offset for commit only after the write succeeded. While Cassandra is unreachable
//! the write is retried and the data waits in Kafka. Runs until SIGTERM.
//!
//! `--defect drop-every=N` skips the write of every N-th event (but commits
//! it); `--defect duplicate-every=N` also writes every N-th event under a
//! second row id. Both exist to prove that the set check catches them.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chaos_pipeline::{Event, KEYSPACE, TABLE, TOPIC, cassandra};
use clap::Parser;
use rdkafka::{
    ClientConfig, Message,
    consumer::{CommitMode, Consumer, StreamConsumer},
};
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Defect {
    None,
    DropEvery(u64),
    DuplicateEvery(u64),
}

fn parse_defect(s: &str) -> Result<Defect, String> {
    let (kind, n) = s.split_once('=').ok_or_else(|| format!("expected drop-every=N or duplicate-every=N, got {s:?}"))?;
    let n: u64 = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| format!("N must be a positive integer, got {n:?}"))?;
    match kind {
        "drop-every" => Ok(Defect::DropEvery(n)),
        "duplicate-every" => Ok(Defect::DuplicateEvery(n)),
        other => Err(format!("unknown defect {other:?}: drop-every or duplicate-every")),
    }
}

#[derive(Debug, Parser)]
#[command(name = "chaos-processor", about = "Kafka -> Cassandra, idempotent by event id, offsets committed after the write")]
struct Args {
    #[arg(long, default_value = "198.18.200.2:9092")]
    bootstrap: String,
    #[arg(long, default_value = TOPIC)]
    topic: String,
    #[arg(long, default_value = "chaos-processor")]
    group: String,
    #[arg(long, default_value = "198.18.200.3:9042")]
    cassandra: String,
    /// Table in keyspace chaos_lab.
    #[arg(long, default_value = TABLE, value_parser = chaos_pipeline::parse_table)]
    table: String,
    /// Seed a bug on purpose: drop-every=N or duplicate-every=N.
    #[arg(long, value_parser = parse_defect)]
    defect: Option<Defect>,
}

async fn connect_retrying(contact: &str, table: &str) -> scylla::client::session::Session {
    let mut backoff = Duration::from_millis(500);
    loop {
        match cassandra::connect(contact).await {
            Ok(s) => match cassandra::ensure_schema(&s, table).await {
                Ok(()) => return s,
                Err(e) => warn!(error = %format!("{e:#}"), "schema not ready; retrying"),
            },
            Err(e) => warn!(error = %format!("{e:#}"), "Cassandra unreachable; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Create the topic (3 partitions) so the group has something to join;
/// retried while Kafka is not up yet; an existing topic is fine.
async fn ensure_topic(bootstrap: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let mut backoff = Duration::from_millis(500);
    loop {
        let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> =
            ClientConfig::new().set("bootstrap.servers", bootstrap).create();
        if let Ok(admin) = admin {
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5))).request_timeout(Some(Duration::from_secs(5)));
            match admin.create_topics(&[NewTopic::new(topic, 3, TopicReplication::Fixed(1))], &opts).await {
                Ok(results) => {
                    let ok = results.iter().all(|r| match r {
                        Ok(_) => true,
                        Err((_, code)) => *code == rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                    });
                    if ok {
                        return;
                    }
                    warn!(?results, "creating the topic failed; retrying");
                }
                Err(e) => warn!(error = %e, "Kafka not reachable to create the topic; retrying"),
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chaos_proto::serve::init_tracing(chaos_proto::serve::LogFormat::Text);
    let a = Args::parse();
    let defect = a.defect.unwrap_or(Defect::None);
    let session = connect_retrying(&a.cassandra, &a.table).await;
    info!(cassandra = %a.cassandra, "Cassandra ready; schema in place");
    let insert = session
        // An upsert by row id that also appends the write's time to the row's
        // list of writes (a blind append: no read before the write).
        .prepare(format!(
            "UPDATE {KEYSPACE}.{} SET event_id = ?, ts_ms = ?, written_at_ms = ?, body = ?, {w} = {w} + ? WHERE id = ?",
            a.table,
            w = chaos_probes::cassandra::WRITES_COLUMN
        ))
        .await
        .context("preparing the write")?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &a.bootstrap)
        .set("group.id", &a.group)
        // At least once: an offset is stored only after its event's write,
        // and librdkafka commits the stored offsets every 500 ms. (A commit
        // request per event queued thousands of them behind a paused
        // consumer and starved its heartbeats: a drill found it.)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "500")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        // A topic created a moment ago may not be in the broker's metadata yet: look again soon.
        .set("topic.metadata.refresh.interval.ms", "2000")
        .create()
        .context("creating the Kafka consumer")?;
    ensure_topic(&a.bootstrap, &a.topic).await;
    info!(bootstrap = %a.bootstrap, topic = %a.topic, "topic in place");
    consumer.subscribe(&[&a.topic]).context("subscribing")?;
    info!(topic = %a.topic, group = %a.group, table = %a.table, ?defect, "processing");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
    let (mut consumed, mut written) = (0u64, 0u64);
    let mut idle = false;
    let mut last = Instant::now();
    loop {
        let msg = tokio::select! {
            _ = term.recv() => break,
            m = tokio::time::timeout(Duration::from_secs(3), consumer.recv()) => match m {
                Ok(m) => m,
                Err(_) => {
                    // Nothing for 3 s: say so once (drills and tests wait for it).
                    if !idle && consumed > 0 {
                        info!(consumed, written, "idle: caught up with the topic");
                        idle = true;
                    }
                    continue;
                }
            },
        };
        idle = false;
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "Kafka receive error; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        consumed += 1;
        let ev: Event = match msg.payload().map(serde_json::from_slice) {
            Some(Ok(ev)) => ev,
            other => {
                warn!(offset = msg.offset(), partition = msg.partition(), ok = other.is_some(), "unparseable event skipped");
                store_offset(&consumer, &msg);
                continue;
            }
        };
        let mut rows = vec![ev.id.clone()];
        match defect {
            Defect::DropEvery(n) if consumed % n == 0 => rows.clear(),
            Defect::DuplicateEvery(n) if consumed % n == 0 => rows.push(format!("{}#dup", ev.id)),
            _ => {}
        }
        for row in rows {
            let mut backoff = Duration::from_millis(100);
            loop {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
                match session.execute_unpaged(&insert, (&ev.id, ev.ts_ms, now, &ev.body, vec![now], &row)).await {
                    Ok(_) => break,
                    Err(e) => {
                        // Not committed: the event waits in Kafka until Cassandra answers.
                        warn!(error = %e, id = %ev.id, "Cassandra write failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
            written += 1;
        }
        store_offset(&consumer, &msg);
        if last.elapsed() >= Duration::from_secs(5) {
            info!(consumed, written, "progress");
            last = Instant::now();
        }
    }
    // Stored offsets are committed every 500 ms; a final synchronous commit
    // of the last ones is best effort and bounded, since Kafka may be
    // stopping at the same time (lab down) and would make it wait.
    let consumer = std::sync::Arc::new(consumer);
    let c = std::sync::Arc::clone(&consumer);
    let committed =
        tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync))).await;
    info!(consumed, written, final_commit = ?committed.map(|r| r.map(|r| r.is_ok())), "stopped");
    // Leaving the group can also wait on a stopping broker: exit now.
    std::process::exit(0);
}

/// Mark `msg` done (its write succeeded): the next auto-commit includes it.
/// Fails only when the partition was revoked meanwhile; the event is then
/// delivered again to whoever owns it, and the upsert makes that harmless.
fn store_offset(consumer: &StreamConsumer, msg: &rdkafka::message::BorrowedMessage<'_>) {
    if let Err(e) = consumer.store_offset_from_message(msg) {
        warn!(error = %e, partition = msg.partition(), offset = msg.offset(), "offset not stored (partition revoked?); it will be redelivered");
    }
}
