//! The userspace packet engine: holds each packet the kernel hands it
//! through an NFQUEUE for its delay (± jitter), then accepts it. Verdicts
//! may be given out of order, so jitter also reorders, as real jitter does.
//! It also stands in for netem's corruption (one bit flipped past the IP
//! header, the packet handed back with its checksums stale, so the
//! receiving stack discards it) and duplication (a copy re-sent through a
//! raw socket in the namespace, marked so the fault's rules let it pass).
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
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tracing::{debug, warn};

/// The mark the engine puts on the copies it sends, so the fault's own
/// rules let them pass instead of queueing them again.
pub const DUPLICATE_MARK: u32 = 0xc4a0_d0b1;

/// What the engine does to each packet. Shares are in 1/10000.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub delay: Duration,
    /// Each packet's delay is drawn uniformly from delay ± jitter.
    pub jitter: Duration,
    /// Reorder: this share passes at once; the rest is held.
    #[serde(default)]
    pub pass_permyriad: u32,
    /// This share gets one bit flipped past its IP header.
    #[serde(default)]
    pub corrupt_permyriad: u32,
    /// This share is delivered twice.
    #[serde(default)]
    pub duplicate_permyriad: u32,
}

fn pct(permyriad: u32) -> String {
    format!("{} %", super::permyriad_text(permyriad))
}

impl Profile {
    /// For summaries: "latency 50 ms ± 10 ms", "corrupt 5.00 % …".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.pass_permyriad > 0 {
            parts.push(format!("reorder {} pass at once, the rest held {} ms", pct(self.pass_permyriad), self.delay.as_millis()));
        } else if !self.delay.is_zero() {
            parts.push(format!("latency {} ms ± {} ms", self.delay.as_millis(), self.jitter.as_millis()));
        }
        if self.corrupt_permyriad > 0 {
            parts.push(format!("corrupt {} (one bit past the IP header, checksums left stale)", pct(self.corrupt_permyriad)));
        }
        if self.duplicate_permyriad > 0 {
            parts.push(format!("duplicate {} (copies re-sent through a raw socket)", pct(self.duplicate_permyriad)));
        }
        parts.join(", ")
    }

    /// Whether the engine needs packets' bytes, not only their metadata.
    fn needs_payload(&self) -> bool {
        self.corrupt_permyriad > 0 || self.duplicate_permyriad > 0
    }

    fn draw(&self, rng: &mut impl Rng) -> Duration {
        if self.delay.is_zero() {
            return Duration::ZERO;
        }
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
    pub corrupted: AtomicU64,
    pub duplicated: AtomicU64,
}

/// Flip one random bit past the IPv4 header, leaving every checksum as it
/// was. `false` (untouched) for anything but IPv4 with bytes past its header.
pub fn corrupt_packet(pkt: &mut [u8], rng: &mut impl Rng) -> bool {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return false;
    }
    let header = usize::from(pkt[0] & 0x0f) * 4;
    if pkt.len() <= header {
        return false;
    }
    let at = rng.random_range(header..pkt.len());
    pkt[at] ^= 1 << rng.random_range(0..8u32);
    true
}

/// Where a copy of this IPv4 packet is sent: its own destination.
fn destination(pkt: &[u8]) -> Option<SockAddr> {
    let d: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
    (pkt.first()? >> 4 == 4).then(|| SockAddr::from(std::net::SocketAddrV4::new(d.into(), 0)))
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
    pub fn start(ns: Option<PathBuf>, queue_num: u16, profile: Profile) -> Result<Engine, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(EngineStats::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (stop2, stats2) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name(format!("delay-q{queue_num}"))
            .spawn(move || {
                let (queue, raw) = match open_queue(ns.as_ref(), queue_num, &profile) {
                    Ok(q) => {
                        let _ = ready_tx.send(Ok(()));
                        q
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(queue, raw, queue_num, profile, &stop2, &stats2);
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

/// The queue socket (and, to duplicate, a raw socket), both opened inside the namespace.
fn open_queue(ns: Option<&PathBuf>, queue_num: u16, profile: &Profile) -> Result<(nfq::Queue, Option<Socket>), String> {
    if let Some(path) = ns {
        let f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        // Only this thread moves; the agent's other threads stay where they are.
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns into {}: {e}", path.display()))?;
    }
    let mut q = nfq::Queue::open().map_err(|e| format!("opening an NFQUEUE socket: {e}"))?;
    q.bind(queue_num).map_err(|e| format!("binding NFQUEUE {queue_num}: {e} (in use by another program?)"))?;
    q.set_fail_open(queue_num, true).map_err(|e| format!("NFQUEUE {queue_num} fail-open: {e}"))?;
    q.set_queue_max_len(queue_num, QUEUE_MAX_LEN).map_err(|e| format!("NFQUEUE {queue_num} length: {e}"))?;
    // Metadata only unless packets are rewritten or copied: verdicts keep payloads intact.
    let range = if profile.needs_payload() { u16::MAX } else { 0 };
    q.set_copy_range(queue_num, range).map_err(|e| format!("NFQUEUE {queue_num} copy range: {e}"))?;
    q.set_nonblocking(true);
    let raw = if profile.duplicate_permyriad > 0 {
        // IPPROTO_RAW implies IP_HDRINCL: the copy goes out with the original's header.
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(libc::IPPROTO_RAW.into()))
            .map_err(|e| format!("opening a raw IPv4 socket to send duplicates: {e}"))?;
        s.set_mark(DUPLICATE_MARK).map_err(|e| format!("marking the duplicates' raw socket: {e}"))?;
        Some(s)
    } else {
        None
    };
    Ok((q, raw))
}

/// A held packet, ordered by release time, then arrival.
struct Held {
    release: Instant,
    seq: u64,
    msg: nfq::Message,
    duplicate: bool,
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

fn chance(rng: &mut impl Rng, permyriad: u32) -> bool {
    permyriad > 0 && rng.random_range(0..10_000) < permyriad
}

fn run(mut q: nfq::Queue, raw: Option<Socket>, queue_num: u16, profile: Profile, stop: &AtomicBool, stats: &EngineStats) {
    let mut rng = rand::rng();
    let mut held: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        // Take in everything the kernel has for us.
        loop {
            match q.recv() {
                Ok(mut msg) => {
                    seq += 1;
                    stats.held.fetch_add(1, Ordering::Relaxed);
                    if chance(&mut rng, profile.corrupt_permyriad) && corrupt_packet(msg.get_payload_mut(), &mut rng) {
                        stats.corrupted.fetch_add(1, Ordering::Relaxed);
                    }
                    let duplicate = raw.is_some() && chance(&mut rng, profile.duplicate_permyriad);
                    held.push(Reverse(Held { release: Instant::now() + profile.draw(&mut rng), seq, msg, duplicate }));
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
            let copy = h.duplicate.then(|| msg.get_payload().to_vec());
            msg.set_verdict(nfq::Verdict::Accept);
            if let Err(e) = q.verdict(msg) {
                warn!(queue_num, error = %e, "NFQUEUE verdict failed (the kernel drops that packet)");
            }
            stats.released.fetch_add(1, Ordering::Relaxed);
            if let (Some(pkt), Some(sock)) = (copy, raw.as_ref())
                && let Some(to) = destination(&pkt)
            {
                match sock.send_to(&pkt, &to) {
                    Ok(_) => {
                        stats.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => debug!(queue_num, error = %e, "sending a duplicate"),
                }
            }
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
        let p = Profile { delay: Duration::from_millis(50), jitter: Duration::from_millis(10), ..Default::default() };
        let mut rng = rand::rng();
        let draws: Vec<Duration> = (0..10_000).map(|_| p.draw(&mut rng)).collect();
        assert!(draws.iter().all(|d| *d >= Duration::from_millis(40) && *d <= Duration::from_millis(60)));
        let mean = draws.iter().map(Duration::as_secs_f64).sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.050).abs() < 0.0005, "mean {mean}");
        let fixed = Profile { delay: Duration::from_millis(5), ..Default::default() };
        assert_eq!(fixed.draw(&mut rng), Duration::from_millis(5));
    }

    #[test]
    fn reorder_lets_its_share_pass_at_once() {
        let p = Profile { delay: Duration::from_millis(20), pass_permyriad: 2500, ..Default::default() };
        let mut rng = rand::rng();
        let n = 20_000;
        let passed = (0..n).filter(|_| p.draw(&mut rng).is_zero()).count();
        // Binomial(20000, 0.25): sd 61; 5 sd either side.
        assert!((4_700..=5_300).contains(&passed), "{passed}");
    }

    #[test]
    fn corruption_flips_exactly_one_bit_past_the_ip_header() {
        let mut rng = rand::rng();
        // IPv4, IHL 6 (24-byte header with options), then 40 bytes of UDP header and payload.
        let mut pkt = vec![0u8; 64];
        pkt[0] = 0x46;
        pkt[16..20].copy_from_slice(&[198, 18, 0, 2]);
        for _ in 0..2_000 {
            let mut p = pkt.clone();
            assert!(corrupt_packet(&mut p, &mut rng));
            let flipped: Vec<usize> = (0..p.len()).filter(|&i| p[i] != pkt[i]).collect();
            assert_eq!(flipped.len(), 1);
            assert!(flipped[0] >= 24, "the IP header is left alone: byte {}", flipped[0]);
            assert_eq!((p[flipped[0]] ^ pkt[flipped[0]]).count_ones(), 1);
        }
        let mut header_only = pkt[..24].to_vec();
        assert!(!corrupt_packet(&mut header_only, &mut rng));
        let mut v6 = pkt.clone();
        v6[0] = 0x60;
        assert!(!corrupt_packet(&mut v6, &mut rng), "not IPv4: untouched");
        assert_eq!(destination(&pkt).and_then(|a| a.as_socket_ipv4()).map(|a| *a.ip()), Some([198, 18, 0, 2].into()));
    }

    #[test]
    fn profiles_describe_themselves_and_only_rewriting_needs_payloads() {
        let corrupt = Profile { corrupt_permyriad: 500, ..Default::default() };
        assert_eq!(corrupt.describe(), "corrupt 5.00 % (one bit past the IP header, checksums left stale)");
        assert!(corrupt.needs_payload());
        assert_eq!(corrupt.draw(&mut rand::rng()), Duration::ZERO, "no delay asked, none added");
        let lat = Profile { delay: Duration::from_millis(50), jitter: Duration::from_millis(10), ..Default::default() };
        assert_eq!(lat.describe(), "latency 50 ms ± 10 ms");
        assert!(!lat.needs_payload());
        assert!(Profile { duplicate_permyriad: 1, ..Default::default() }.needs_payload());
    }
}
