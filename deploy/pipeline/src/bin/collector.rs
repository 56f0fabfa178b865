//! `chaos-collector`: produce log events to Kafka at a bounded rate and
//! count, and append every id the broker acknowledged to `--acks-file`.
//! While Kafka is unreachable, events wait in the producer's buffer (up to
//! `--delivery-timeout`); the final line is a JSON summary on stdout.
//! SIGTERM or Ctrl-C stops producing, waits for the acknowledgements of what
//! was sent, and ends the same way. `--status-file` keeps the counts
//! (produced, acknowledged, failed) and the current phase current for
//! `chaos lab status` and for an experiment's `wait_for_load_phase` step.
//!
//! `--profile` replaces `--rate`/`--count` with phases, e.g.
//! `warmup:50:10s,baseline:200:30s,spike:800:10s,soak:200:60s` (name, events
//! per second, duration): the summary then has each phase's window and its
//! produced / acknowledged / failed counts, which `chaos load` joins with
//! the stored rows for end-to-end latency per phase.

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use chaos_pipeline::{Event, TOPIC};
use clap::Parser;
use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, FutureRecord, Producer},
};
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "chaos-collector",
    about = "Produce log events to Kafka (bounded) and record which ones were acknowledged",
    after_help = "Example: chaos-collector --bootstrap 198.18.200.2:9092 --rate 200 --count 4000 --acks-file /tmp/acks"
)]
struct Args {
    #[arg(long, default_value = "198.18.200.2:9092")]
    bootstrap: String,
    #[arg(long, default_value = TOPIC)]
    topic: String,
    /// Events per second (1..=20000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    rate: u32,
    /// Body size of each event in bytes (the seed's size_kb × 1024).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    size_bytes: u32,
    /// Total events to produce (1..=10,000,000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000), required_unless_present = "profile")]
    count: Option<u64>,
    /// Phases NAME:RATE:DURATION,... instead of --rate/--count (at most 10,000,000 events in all).
    #[arg(long, value_parser = parse_profile, conflicts_with_all = ["count"])]
    profile: Option<Profile>,
    /// Append acknowledged ids here, one per line.
    #[arg(long)]
    acks_file: PathBuf,
    /// Prefix of event ids (default: a time-based run id).
    #[arg(long)]
    run_id: Option<String>,
    /// Keep {"produced","acked","failed","at_ms","phase","phase_index","done"} here,
    /// rewritten every 500 ms and at once when a phase begins and when producing ends.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// How long an event may wait for the broker before it counts as failed.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    delivery_timeout: Duration,
}

/// One phase of a load profile.
#[derive(Debug, Clone)]
struct Phase {
    name: String,
    rate: u32,
    duration: Duration,
}

/// The phases of `--profile`.
#[derive(Debug, Clone)]
struct Profile(Vec<Phase>);

fn parse_profile(s: &str) -> Result<Profile, String> {
    let phases = s
        .split(',')
        .map(|p| {
            let f: Vec<&str> = p.trim().split(':').collect();
            let [name, rate, dur] = f[..] else { return Err(format!("phase {p:?}: expected NAME:RATE:DURATION, e.g. baseline:200:30s")) };
            let rate: u32 = rate
                .parse()
                .ok()
                .filter(|r| (1..=20_000).contains(r))
                .ok_or_else(|| format!("phase {p:?}: rate must be 1..=20000 events/s"))?;
            let duration = humantime::parse_duration(dur).map_err(|e| format!("phase {p:?}: duration {dur:?}: {e}"))?;
            if duration < Duration::from_secs(1) {
                return Err(format!("phase {p:?}: duration must be at least 1s"));
            }
            Ok(Phase { name: name.to_string(), rate, duration })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let total: f64 = phases.iter().map(|p| f64::from(p.rate) * p.duration.as_secs_f64()).sum();
    if total > 10_000_000.0 {
        return Err(format!("the profile produces {total:.0} events; at most 10,000,000"));
    }
    Ok(Profile(phases))
}

/// Counts of one phase.
#[derive(Default)]
struct PhaseCounts {
    produced: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chaos_proto::serve::init_tracing(chaos_proto::serve::LogFormat::Text);
    let a = Args::parse();
    let run =
        a.run_id.clone().unwrap_or_else(|| format!("r{}", SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &a.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", a.delivery_timeout.as_millis().to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("linger.ms", "5")
        .create()
        .context("creating the Kafka producer")?;
    let acks = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.acks_file)
        .with_context(|| format!("opening {}", a.acks_file.display()))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut w = std::io::BufWriter::new(acks);
        let mut n = 0;
        // Flush whenever no ack is waiting: the file trails the broker's
        // acknowledgements by milliseconds (a live set check reads it).
        while let Some(id) = rx.blocking_recv() {
            writeln!(w, "{id}")?;
            n += 1;
            while let Ok(id) = rx.try_recv() {
                writeln!(w, "{id}")?;
                n += 1;
            }
            w.flush()?;
        }
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(n)
    });
    let (acked, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let body = "x".repeat(a.size_bytes as usize);
    let phases = match (&a.profile, a.count) {
        (Some(p), _) => p.0.clone(),
        // One phase as long as the count takes at the rate.
        (None, count) => {
            let count = count.unwrap_or(1);
            vec![Phase { name: "constant".into(), rate: a.rate, duration: Duration::from_secs_f64(count as f64 / f64::from(a.rate)) }]
        }
    };
    let limit = a.count.unwrap_or(u64::MAX);
    let counts: Vec<Arc<PhaseCounts>> = phases.iter().map(|_| Arc::new(PhaseCounts::default())).collect();
    // Per phase: (from ms, to ms, first event number, end event number exclusive).
    let mut windows: Vec<(i64, i64, u64, u64)> = vec![];
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut last_status = Instant::now();
    let mut pending = tokio::task::JoinSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
    let mut produced: u64 = 0;
    let now_ms = || SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    info!(phases = phases.len(), bootstrap = %a.bootstrap, topic = %a.topic, "producing");
    'phases: for (pi, phase) in phases.iter().enumerate() {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / phase.rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let (phase_start, phase_ms) = (Instant::now(), now_ms());
        windows.push((phase_ms, phase_ms, produced, produced));
        info!(phase = %phase.name, rate = phase.rate, seconds = phase.duration.as_secs_f64(), "phase");
        let now_phase = Some((pi, phase.name.as_str()));
        if let Some(f) = &a.status_file {
            write_status(f, produced, &acked, &failed, now_phase, false);
            last_status = Instant::now();
        }
        // With --count the one phase is the count, however long it takes.
        let phase_count = a.count.unwrap_or_else(|| (f64::from(phase.rate) * phase.duration.as_secs_f64()).round() as u64);
        for _ in 0..phase_count {
            if produced >= limit {
                break 'phases;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = term.recv() => { info!(produced, "SIGTERM: no more events; waiting for acknowledgements"); break 'phases; }
                _ = tokio::signal::ctrl_c() => { info!(produced, "interrupted: no more events; waiting for acknowledgements"); break 'phases; }
            }
            if a.profile.is_some() && phase_start.elapsed() >= phase.duration + Duration::from_secs(1) {
                warn!(phase = %phase.name, "the phase ran over its duration (the producer fell behind the rate)");
                break;
            }
            let id = format!("{run}-{produced:08}");
            let payload = serde_json::to_string(&Event { id: id.clone(), ts_ms: now_ms(), body: body.clone() })?;
            // Enqueue without waiting for the broker (a full queue waits up to 1 s, then retries).
            let fut = loop {
                match producer.send_result(FutureRecord::to(&a.topic).key(&id).payload(&payload)) {
                    Ok(f) => break f,
                    Err((e, _)) => {
                        warn!(error = %e, "producer queue full; waiting");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            let (ack_tx, n_acked, n_failed, pc) = (tx.clone(), Arc::clone(&acked), Arc::clone(&failed), Arc::clone(&counts[pi]));
            produced += 1;
            pc.produced.fetch_add(1, Ordering::Relaxed);
            pending.spawn(async move {
                match fut.await {
                    Ok(Ok(_)) => {
                        n_acked.fetch_add(1, Ordering::Relaxed);
                        pc.acked.fetch_add(1, Ordering::Relaxed);
                        let _ = ack_tx.send(id);
                    }
                    _ => {
                        n_failed.fetch_add(1, Ordering::Relaxed);
                        pc.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            // Finished deliveries leave the set as we go (memory stays bounded by what is in flight).
            while pending.try_join_next().is_some() {}
            if let Some(f) = &a.status_file
                && last_status.elapsed() >= Duration::from_millis(500)
            {
                write_status(f, produced, &acked, &failed, now_phase, false);
                last_status = Instant::now();
            }
            if last_report.elapsed() >= Duration::from_secs(2) {
                info!(produced, acked = acked.load(Ordering::Relaxed), failed = failed.load(Ordering::Relaxed), "progress");
                last_report = Instant::now();
            }
            if let Some(w) = windows.last_mut() {
                (w.1, w.3) = (now_ms(), produced);
            }
        }
    }
    info!("all produced; waiting for acknowledgements");
    if let Some(f) = &a.status_file {
        write_status(f, produced, &acked, &failed, None, true);
    }
    let _ = producer.flush(a.delivery_timeout + Duration::from_secs(5));
    while pending.join_next().await.is_some() {}
    drop(tx);
    let written = writer.await.context("acks writer")?.context("writing acks")?;
    if let Some(f) = &a.status_file {
        write_status(f, produced, &acked, &failed, None, true);
    }
    let phases: Vec<serde_json::Value> = phases
        .iter()
        .zip(&windows)
        .zip(&counts)
        .map(|((p, (from, to, first, end)), c)| {
            serde_json::json!({"phase": p.name, "rate_per_s": p.rate, "from_ms": from, "to_ms": to, "first_seq": first, "end_seq": end,
                "produced": c.produced.load(Ordering::Relaxed), "acked": c.acked.load(Ordering::Relaxed), "failed": c.failed.load(Ordering::Relaxed)})
        })
        .collect();
    let summary = serde_json::json!({
        "run_id": run, "produced": produced, "acked": acked.load(Ordering::Relaxed), "failed": failed.load(Ordering::Relaxed),
        "acks_written": written, "seconds": started.elapsed().as_secs_f64(), "phases": phases,
    });
    writeln!(std::io::stdout(), "{summary}")?;
    Ok(())
}

/// The counts and the phase being produced (its place in the profile and
/// its name; none once producing ended: `done`), replaced atomically (a
/// reader never sees half a file).
fn write_status(path: &std::path::Path, produced: u64, acked: &AtomicU64, failed: &AtomicU64, phase: Option<(usize, &str)>, done: bool) {
    let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let v = serde_json::json!({"produced": produced, "acked": acked.load(Ordering::Relaxed), "failed": failed.load(Ordering::Relaxed), "at_ms": at_ms,
        "phase": phase.map(|p| p.1), "phase_index": phase.map(|p| p.0), "done": done});
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, v.to_string()).and_then(|_| std::fs::rename(&tmp, path)) {
        warn!(error = %e, path = %path.display(), "cannot write the status file");
    }
}
