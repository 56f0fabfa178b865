//! The userspace packet engine: holds each packet the kernel hands it
//! through an NFQUEUE for its delay (± jitter), then accepts it. With one
//! delay for all (no jitter, no reorder) packets wait in a FIFO and leave in
//! the order they came; with jitter verdicts are given by release time, so
//! jitter also reorders, as real jitter does.
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
//! "no delay", never to "no network". Fail-open also means that a packet
//! the kernel cannot hand over (the queue socket's buffer full) passes at
//! once, ahead of those held: the socket gets a large buffer, the engine
//! wakes as soon as a packet arrives, and it counts those that passed
//! (`passed_undelayed`, from the gaps in the kernel's packet ids).

mod nfqueue;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    fs::File,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nfqueue::NfQueue;
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
    /// How much each packet's jitter follows the previous packet's: the lag-1
    /// correlation of successive delays, in 1/10000 (see [`DelayDraw`]).
    #[serde(default)]
    pub correlation_permyriad: u32,
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
            let corr = if self.correlation_permyriad > 0 && !self.jitter.is_zero() {
                format!(", correlation {}", pct(self.correlation_permyriad))
            } else {
                String::new()
            };
            parts.push(format!("latency {} ms ± {} ms{corr}", self.delay.as_millis(), self.jitter.as_millis()));
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
}

/// Draws each packet's delay. With a correlation `c` the jitter is a
/// Gaussian AR(1) chain `z' = ρz + √(1-ρ²)·e` seen through the normal CDF Φ:
/// every delay stays uniform on delay ± jitter (as without correlation), and
/// successive delays have lag-1 correlation `(6/π)·asin(ρ/2)`, which is `c`
/// for `ρ = 2·sin(πc/6)`. (netem's correlated draw, taken modulo twice the
/// jitter, keeps almost none of it: lag-1 about 0.1 for 75 % on Linux 6.1.)
#[derive(Debug)]
struct DelayDraw {
    profile: Profile,
    /// The chain's ρ and √(1-ρ²), from the profile's correlation (none without one).
    chain: Option<(f64, f64)>,
    /// The chain's last value (none before the first packet).
    z: Option<f64>,
}

impl DelayDraw {
    fn new(profile: &Profile) -> Self {
        let chain = (profile.correlation_permyriad > 0).then(|| {
            let c = f64::from(profile.correlation_permyriad.min(10_000)) / 10_000.0;
            // (100 % exactly 1: sin(π/6) in floating point falls just short.)
            let rho = if c >= 1.0 { 1.0 } else { 2.0 * (std::f64::consts::PI * c / 6.0).sin() };
            (rho, (1.0 - rho * rho).max(0.0).sqrt())
        });
        DelayDraw { profile: *profile, chain, z: None }
    }

    fn next(&mut self, rng: &mut impl Rng) -> Duration {
        let p = &self.profile;
        if p.delay.is_zero() {
            return Duration::ZERO;
        }
        if p.pass_permyriad > 0 && rng.random_range(0..10_000) < p.pass_permyriad {
            return Duration::ZERO;
        }
        if p.jitter.is_zero() {
            return p.delay;
        }
        let j = p.jitter.as_nanos() as f64;
        let offset = match self.chain {
            None => rng.random_range(-j..=j),
            Some((rho, rest)) => {
                let e: f64 = rng.sample(rand_distr::StandardNormal);
                let z = self.z.map_or(e, |prev| rho * prev + rest * e);
                self.z = Some(z);
                let u = 0.5 * libm::erfc(-z / std::f64::consts::SQRT_2);
                j * (2.0 * u - 1.0)
            }
        };
        let d = p.delay.as_nanos() as f64 + offset;
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
    /// Packets the kernel let through undelayed because the queue socket was full (fail-open).
    pub passed_undelayed: AtomicU64,
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
    /// An eventfd the engine's thread polls beside its queue, so a stop wakes it at once.
    waker: Arc<OwnedFd>,
    pub stats: Arc<EngineStats>,
    thread: Option<JoinHandle<()>>,
}

/// Kernel queue length: deep enough for ~50k packets/s held 200 ms. Past
/// it the kernel accepts new packets at once (fail-open).
const QUEUE_MAX_LEN: u32 = 16_384;

/// Receive buffer asked for the queue socket (the kernel grants twice this):
/// room for a full queue's messages, so a burst is held, not passed undelayed.
const QUEUE_RCVBUF: usize = 16 << 20;

fn eventfd() -> Result<OwnedFd, String> {
    // SAFETY: eventfd(2) with flags only; the result is checked before it is owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Engine {
    /// Start an engine bound to `queue_num` inside the namespace at `ns`
    /// (`None`: the agent's own). Returns once the queue is bound, or the
    /// reason it could not be.
    pub fn start(ns: Option<PathBuf>, queue_num: u16, profile: Profile) -> Result<Engine, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(EngineStats::default());
        let waker = Arc::new(eventfd()?);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (stop2, stats2, waker2) = (stop.clone(), stats.clone(), waker.clone());
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
                run(queue, raw, &waker2, queue_num, profile, &stop2, &stats2);
            })
            .map_err(|e| format!("spawning the delay engine thread: {e}"))?;
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Engine { queue_num, stop, waker, stats, thread: Some(thread) }),
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
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write of an initialised buffer to our eventfd.
        let _ = unsafe { libc::write(self.waker.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The queue socket (and, to duplicate, a raw socket), both opened inside the namespace.
fn open_queue(ns: Option<&PathBuf>, queue_num: u16, profile: &Profile) -> Result<(NfQueue, Option<Socket>), String> {
    if let Some(path) = ns {
        let f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        // Only this thread moves; the agent's other threads stay where they are.
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns into {}: {e}", path.display()))?;
    }
    // Metadata only unless packets are rewritten or copied: verdicts keep payloads intact.
    let q = NfQueue::open(queue_num, profile.needs_payload(), QUEUE_MAX_LEN, QUEUE_RCVBUF)?;
    debug!(queue_num, rcvbuf = q.rcvbuf(), "NFQUEUE bound");
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
    /// The kernel's packet id, for the verdict.
    id: u32,
    /// The packet's bytes (only when the profile copies them).
    payload: Option<Vec<u8>>,
    /// Whether `payload` was changed (corrupted): then it goes back with the verdict.
    modified: bool,
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

/// The held packets in release order. With one delay for every packet (no
/// jitter, no reorder) a FIFO: packets leave in the order they came, by
/// construction, and a batch verdict can accept a whole run at once. With
/// delays that differ, a heap by release time: jitter reorders, as netem's does.
enum Holding {
    Fifo(VecDeque<Held>),
    Timed(BinaryHeap<Reverse<Held>>),
}

impl Holding {
    fn for_profile(p: &Profile) -> Holding {
        if p.jitter.is_zero() && p.pass_permyriad == 0 { Holding::Fifo(VecDeque::new()) } else { Holding::Timed(BinaryHeap::new()) }
    }

    fn push(&mut self, h: Held) {
        match self {
            Holding::Fifo(q) => q.push_back(h),
            Holding::Timed(q) => q.push(Reverse(h)),
        }
    }

    fn next_release(&self) -> Option<Instant> {
        match self {
            Holding::Fifo(q) => q.front().map(|h| h.release),
            Holding::Timed(q) => q.peek().map(|h| h.0.release),
        }
    }

    /// The next packet due at `now` (any packet when `all`).
    fn pop_due(&mut self, now: Instant, all: bool) -> Option<Held> {
        if !self.next_release().is_some_and(|r| all || r <= now) {
            return None;
        }
        match self {
            Holding::Fifo(q) => q.pop_front(),
            Holding::Timed(q) => q.pop().map(|h| h.0),
        }
    }

    fn is_fifo(&self) -> bool {
        matches!(self, Holding::Fifo(_))
    }
}

fn chance(rng: &mut impl Rng, permyriad: u32) -> bool {
    permyriad > 0 && rng.random_range(0..10_000) < permyriad
}

/// Packets taken from the socket before the engine looks at what is due.
const RECV_BATCH: usize = 256;

/// The longest the engine sleeps when nothing is due (a stop wakes it sooner).
const IDLE_NAP: Duration = Duration::from_millis(500);

/// How many packets the kernel let pass between ids `last` and `id`: it numbers
/// each packet it tries to hand over, and when the socket is full it accepts
/// that one at once (fail-open), undelayed.
fn skipped(last: Option<u32>, id: u32) -> u64 {
    match last {
        Some(l) => {
            let gap = id.wrapping_sub(l).wrapping_sub(1);
            // A gap this large is not a skip but a rebind; count nothing.
            if gap < 1 << 24 { u64::from(gap) } else { 0 }
        }
        None => 0,
    }
}

fn run(mut q: NfQueue, raw: Option<Socket>, waker: &OwnedFd, queue_num: u16, profile: Profile, stop: &AtomicBool, stats: &EngineStats) {
    let mut rng = rand::rng();
    let mut held = Holding::for_profile(&profile);
    let mut delays = DelayDraw::new(&profile);
    let (mut seq, mut last_id) = (0u64, None);
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        // Take in what the kernel has for us (a batch at a time, so releases stay on time).
        for _ in 0..RECV_BATCH {
            match q.recv() {
                Ok(Some(p)) => {
                    seq += 1;
                    stats.held.fetch_add(1, Ordering::Relaxed);
                    stats.passed_undelayed.fetch_add(skipped(last_id, p.id), Ordering::Relaxed);
                    last_id = Some(p.id);
                    let mut payload = p.payload;
                    let modified =
                        chance(&mut rng, profile.corrupt_permyriad) && payload.as_mut().is_some_and(|b| corrupt_packet(b, &mut rng));
                    if modified {
                        stats.corrupted.fetch_add(1, Ordering::Relaxed);
                    }
                    let duplicate = raw.is_some() && chance(&mut rng, profile.duplicate_permyriad);
                    held.push(Held { release: Instant::now() + delays.next(&mut rng), seq, id: p.id, payload, modified, duplicate });
                }
                Ok(None) => break,
                Err(e) => {
                    // ENOBUFS: the socket overflowed; those packets passed (fail-open) and show as id gaps.
                    debug!(queue_num, error = %e, "NFQUEUE recv");
                    break;
                }
            }
        }
        release(&mut q, &mut held, stopping, raw.as_ref(), queue_num, stats);
        if stopping {
            let _ = q.unbind();
            return;
        }
        let nap = held.next_release().map_or(IDLE_NAP, |r| r.saturating_duration_since(Instant::now()));
        if !nap.is_zero()
            && let Err(e) = q.wait(nap.min(IDLE_NAP), Some(waker.as_fd()))
        {
            debug!(queue_num, error = %e, "waiting on the NFQUEUE socket");
        }
    }
}

/// Accept every packet that is due (all of them when `stopping`). In FIFO
/// order a run of untouched packets is accepted with one batch verdict;
/// copies to duplicate go out after their originals.
fn release(q: &mut NfQueue, held: &mut Holding, stopping: bool, raw: Option<&Socket>, queue_num: u16, stats: &EngineStats) {
    let now = Instant::now();
    let fifo = held.is_fifo();
    let mut run_to: Option<u32> = None;
    let mut copies = Vec::new();
    let flush = |q: &mut NfQueue, run_to: &mut Option<u32>| {
        if let Some(id) = run_to.take()
            && let Err(e) = q.accept_up_to(id)
        {
            warn!(queue_num, error = %e, "NFQUEUE batch verdict failed (the kernel drops those packets)");
        }
    };
    while let Some(h) = held.pop_due(now, stopping) {
        stats.released.fetch_add(1, Ordering::Relaxed);
        if fifo && !h.modified {
            run_to = Some(h.id);
        } else {
            flush(q, &mut run_to);
            let payload = if h.modified { h.payload.as_deref() } else { None };
            if let Err(e) = q.accept(h.id, payload) {
                warn!(queue_num, error = %e, "NFQUEUE verdict failed (the kernel drops that packet)");
            }
        }
        if h.duplicate
            && let Some(p) = h.payload
        {
            copies.push(p);
        }
    }
    flush(q, &mut run_to);
    let Some(sock) = raw else { return };
    for pkt in copies {
        let Some(to) = destination(&pkt) else { continue };
        match sock.send_to(&pkt, &to) {
            Ok(_) => {
                stats.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => debug!(queue_num, error = %e, "sending a duplicate"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_draws_stay_in_range_and_average_to_the_delay() {
        let p = Profile { delay: Duration::from_millis(50), jitter: Duration::from_millis(10), ..Default::default() };
        let mut rng = rand::rng();
        let draws: Vec<Duration> = (0..10_000).map(|_| DelayDraw::new(&p).next(&mut rng)).collect();
        assert!(draws.iter().all(|d| *d >= Duration::from_millis(40) && *d <= Duration::from_millis(60)));
        let mean = draws.iter().map(Duration::as_secs_f64).sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.050).abs() < 0.0005, "mean {mean}");
        let fixed = Profile { delay: Duration::from_millis(5), ..Default::default() };
        assert_eq!(DelayDraw::new(&fixed).next(&mut rng), Duration::from_millis(5));
    }

    /// Mean, sd and lag-1 autocorrelation of a series.
    fn moments(v: &[f64]) -> (f64, f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let lag1 = v.windows(2).map(|w| (w[0] - mean) * (w[1] - mean)).sum::<f64>() / (n - 1.0) / var;
        (mean, var.sqrt(), lag1)
    }

    #[test]
    fn correlated_jitter_keeps_the_uniform_spread_and_the_asked_lag1_correlation() {
        let mut rng = rand::rng();
        for (permyriad, want) in [(0, 0.0), (2_500, 0.25), (7_500, 0.75), (9_500, 0.95)] {
            let p = Profile {
                delay: Duration::from_millis(40),
                jitter: Duration::from_millis(20),
                correlation_permyriad: permyriad,
                ..Default::default()
            };
            let mut d = DelayDraw::new(&p);
            let ms: Vec<f64> = (0..200_000).map(|_| d.next(&mut rng).as_secs_f64() * 1e3).collect();
            assert!(ms.iter().all(|m| (20.0..=60.0).contains(m)), "{permyriad}: outside 40 ± 20 ms");
            let (mean, sd, lag1) = moments(&ms);
            // Uniform on 40 ± 20: sd 20/√3 = 11.55. A correlated chain of 200,000 is worth about
            // 200,000·(1-c)/(1+c) independent draws (5,000 at 95 %): sampling errors (sd) at 95 % about
            // 0.16 ms on the mean, 0.07 ms on the sd, 0.006 on the share below 30 ms; the bounds are 4+ of them.
            assert!((mean - 40.0).abs() < 1.5, "{permyriad}: mean {mean:.2}");
            assert!((sd - 11.55).abs() < 0.6, "{permyriad}: sd {sd:.2}");
            assert!((lag1 - want).abs() < 0.03, "{permyriad}: lag-1 {lag1:.3}, {want} asked");
            // Each quarter of the range holds a quarter of the draws: the spread stays uniform.
            let q = ms.iter().filter(|m| **m < 30.0).count() as f64 / ms.len() as f64;
            assert!((q - 0.25).abs() < 0.03, "{permyriad}: {q:.3} below 30 ms");
        }
        let all = Profile {
            delay: Duration::from_millis(40),
            jitter: Duration::from_millis(20),
            correlation_permyriad: 10_000,
            ..Default::default()
        };
        let mut d = DelayDraw::new(&all);
        let first = d.next(&mut rng);
        assert!((0..100).all(|_| d.next(&mut rng) == first), "100 % correlation: every packet the first one's delay");
    }

    fn held(release: Instant, seq: u64) -> Held {
        Held { release, seq, id: seq as u32, payload: None, modified: false, duplicate: false }
    }

    /// Push `n` packets arriving 10 µs apart with the profile's draws; the ids in release order.
    fn release_order(p: &Profile, n: u64) -> Vec<u32> {
        let (t0, mut rng) = (Instant::now(), rand::rng());
        let mut h = Holding::for_profile(p);
        for seq in 1..=n {
            h.push(held(t0 + Duration::from_micros(10 * seq) + DelayDraw::new(p).next(&mut rng), seq));
        }
        std::iter::from_fn(|| h.pop_due(t0 + Duration::from_secs(10), false)).map(|h| h.id).collect()
    }

    #[test]
    fn one_delay_for_all_releases_in_arrival_order_and_jitter_reorders() {
        let fixed = Profile { delay: Duration::from_millis(20), ..Default::default() };
        assert!(Holding::for_profile(&fixed).is_fifo());
        let ids = release_order(&fixed, 5_000);
        assert_eq!(ids, (1..=5_000).collect::<Vec<u32>>(), "a FIFO: every packet leaves in the order it came");
        // Nothing is released before it is due, and a stop releases the rest, still in order.
        let t0 = Instant::now();
        let mut h = Holding::for_profile(&fixed);
        (1..=3).for_each(|s| h.push(held(t0 + Duration::from_millis(20 + s), s)));
        assert!(h.pop_due(t0 + Duration::from_millis(20), false).is_none());
        assert_eq!(h.pop_due(t0, true).map(|h| h.id), Some(1));
        assert_eq!(std::iter::from_fn(|| h.pop_due(t0, true)).map(|h| h.id).collect::<Vec<_>>(), vec![2, 3]);
        let jitter = Profile { delay: Duration::from_millis(20), jitter: Duration::from_millis(5), ..Default::default() };
        assert!(!Holding::for_profile(&jitter).is_fifo());
        let ids = release_order(&jitter, 5_000);
        assert_eq!(ids.len(), 5_000);
        assert!(ids.windows(2).filter(|w| w[1] < w[0]).count() > 500, "jitter reorders, as netem's does");
        let reorder = Profile { delay: Duration::from_millis(20), pass_permyriad: 2_500, ..Default::default() };
        assert!(!Holding::for_profile(&reorder).is_fifo());
    }

    #[test]
    fn gaps_in_the_kernels_packet_ids_count_packets_passed_undelayed() {
        assert_eq!(skipped(None, 7), 0, "the first packet");
        assert_eq!(skipped(Some(7), 8), 0);
        assert_eq!(skipped(Some(7), 12), 4);
        assert_eq!(skipped(Some(u32::MAX), 1), 1, "ids wrap");
        assert_eq!(skipped(Some(9), 3), 0, "not a skip: a rebind");
    }

    #[test]
    fn reorder_lets_its_share_pass_at_once() {
        let p = Profile { delay: Duration::from_millis(20), pass_permyriad: 2500, ..Default::default() };
        let mut rng = rand::rng();
        let n = 20_000;
        let passed = (0..n).filter(|_| DelayDraw::new(&p).next(&mut rng).is_zero()).count();
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
        assert_eq!(DelayDraw::new(&corrupt).next(&mut rand::rng()), Duration::ZERO, "no delay asked, none added");
        let lat = Profile { delay: Duration::from_millis(50), jitter: Duration::from_millis(10), ..Default::default() };
        assert_eq!(lat.describe(), "latency 50 ms ± 10 ms");
        assert!(!lat.needs_payload());
        assert!(Profile { duplicate_permyriad: 1, ..Default::default() }.needs_payload());
    }
}
