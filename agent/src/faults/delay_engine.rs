//! The userspace delay engine: holds each packet the kernel hands it
//! through an NFQUEUE for its delay (± jitter), then accepts it. Verdicts
//! may be given out of order, so jitter also reorders, as real jitter does.
//!
//! It runs on a dedicated thread that enters the target network namespace
//! (`setns` affects only that thread, never the agent) before opening its
//! queue socket: NFQUEUE is per namespace. It **fails open**: the iptables
//! rules that feed it use `--queue-bypass` (no listener -> packets pass) and
//! the queue itself is fail-open when full, so an agent crash degrades to
//! "no delay", never to "no network".

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fs::File,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use rand::Rng;
use tracing::{debug, warn};

/// How long packets are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayProfile {
    pub delay: Duration,
    /// Each packet's delay is drawn uniformly from delay ± jitter.
    pub jitter: Duration,
    /// Reorder: this share (in 1/10000) passes at once; the rest is held.
    pub pass_permyriad: u32,
}

impl DelayProfile {
    fn draw(&self, rng: &mut impl Rng) -> Duration {
        if self.pass_permyriad > 0 && rng.random_range(0..10_000) < self.pass_permyriad {
            return Duration::ZERO;
        }
        if self.jitter.is_zero() {
            return self.delay;
        }
        let j = self.jitter.as_nanos() as f64;
        let offset = rng.random_range(-j..=j);
        let d = self.delay.as_nanos() as f64 + offset;
        Duration::from_nanos(d.max(0.0) as u64)
    }
}

/// Counters the engine keeps while it runs.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub held: AtomicU64,
    pub released: AtomicU64,
}

/// A running engine; stopping it releases every held packet.
pub struct Engine {
    pub queue_num: u16,
    stop: Arc<AtomicBool>,
    pub stats: Arc<EngineStats>,
    thread: Option<JoinHandle<()>>,
}

/// Kernel queue length: deep enough for ~50k packets/s held 200 ms.
const QUEUE_MAX_LEN: u32 = 16_384;

impl Engine {
    /// Start an engine bound to `queue_num` inside the namespace at `ns`
    /// (`None`: the agent's own). Returns once the queue is bound, or the
    /// reason it could not be.
    pub fn start(ns: Option<PathBuf>, queue_num: u16, profile: DelayProfile) -> Result<Engine, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(EngineStats::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (stop2, stats2) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name(format!("delay-q{queue_num}"))
            .spawn(move || {
                let queue = match open_queue(ns.as_ref(), queue_num) {
                    Ok(q) => {
                        let _ = ready_tx.send(Ok(()));
                        q
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(queue, queue_num, profile, &stop2, &stats2);
            })
            .map_err(|e| format!("spawning the delay engine thread: {e}"))?;
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Engine { queue_num, stop, stats, thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err("the delay engine did not bind its queue within 5 s".into()),
        }
    }

    /// Stop: every held packet is accepted, then the queue is unbound (what dropping it does).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_queue(ns: Option<&PathBuf>, queue_num: u16) -> Result<nfq::Queue, String> {
    if let Some(path) = ns {
        let f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        // Only this thread moves; the agent's other threads stay where they are.
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns into {}: {e}", path.display()))?;
    }
    let mut q = nfq::Queue::open().map_err(|e| format!("opening an NFQUEUE socket: {e}"))?;
    q.bind(queue_num).map_err(|e| format!("binding NFQUEUE {queue_num}: {e} (in use by another program?)"))?;
    q.set_fail_open(queue_num, true).map_err(|e| format!("NFQUEUE {queue_num} fail-open: {e}"))?;
    q.set_queue_max_len(queue_num, QUEUE_MAX_LEN).map_err(|e| format!("NFQUEUE {queue_num} length: {e}"))?;
    // Headers only: the engine never looks at payloads, and verdicts keep them intact.
    q.set_copy_range(queue_num, 0).map_err(|e| format!("NFQUEUE {queue_num} copy range: {e}"))?;
    q.set_nonblocking(true);
    Ok(q)
}

/// A held packet, ordered by release time, then arrival.
struct Held {
    release: Instant,
    seq: u64,
    msg: nfq::Message,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.release, self.seq) == (o.release, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.release, self.seq).cmp(&(o.release, o.seq))
    }
}

fn run(mut q: nfq::Queue, queue_num: u16, profile: DelayProfile, stop: &AtomicBool, stats: &EngineStats) {
    let mut rng = rand::rng();
    let mut held: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        // Take in everything the kernel has for us.
        loop {
            match q.recv() {
                Ok(msg) => {
                    seq += 1;
                    stats.held.fetch_add(1, Ordering::Relaxed);
                    held.push(Reverse(Held { release: Instant::now() + profile.draw(&mut rng), seq, msg }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(queue_num, error = %e, "NFQUEUE recv");
                    break;
                }
            }
        }
        let now = Instant::now();
        while held.peek().is_some_and(|h| stopping || h.0.release <= now) {
            let Some(Reverse(h)) = held.pop() else { break };
            let mut msg = h.msg;
            msg.set_verdict(nfq::Verdict::Accept);
            if let Err(e) = q.verdict(msg) {
                warn!(queue_num, error = %e, "NFQUEUE verdict failed (the kernel drops that packet)");
            }
            stats.released.fetch_add(1, Ordering::Relaxed);
        }
        if stopping {
            let _ = q.unbind(queue_num);
            return;
        }
        // Sleep until the next release, at most 200 µs so new arrivals are stamped promptly.
        let nap = held.peek().map(|h| h.0.release.saturating_duration_since(Instant::now())).unwrap_or(Duration::MAX);
        std::thread::sleep(nap.min(Duration::from_micros(200)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_draws_stay_in_range_and_average_to_the_delay() {
        let p = DelayProfile { delay: Duration::from_millis(50), jitter: Duration::from_millis(10), pass_permyriad: 0 };
        let mut rng = rand::rng();
        let draws: Vec<Duration> = (0..10_000).map(|_| p.draw(&mut rng)).collect();
        assert!(draws.iter().all(|d| *d >= Duration::from_millis(40) && *d <= Duration::from_millis(60)));
        let mean = draws.iter().map(Duration::as_secs_f64).sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.050).abs() < 0.0005, "mean {mean}");
        let fixed = DelayProfile { delay: Duration::from_millis(5), jitter: Duration::ZERO, pass_permyriad: 0 };
        assert_eq!(fixed.draw(&mut rng), Duration::from_millis(5));
    }

    #[test]
    fn reorder_lets_its_share_pass_at_once() {
        let p = DelayProfile { delay: Duration::from_millis(20), jitter: Duration::ZERO, pass_permyriad: 2500 };
        let mut rng = rand::rng();
        let n = 20_000;
        let passed = (0..n).filter(|_| p.draw(&mut rng).is_zero()).count();
        // Binomial(20000, 0.25): sd 61; 5 sd either side.
        assert!((4_700..=5_300).contains(&passed), "{passed}");
    }
}
