//! The worker process of the CPU and memory stress faults: the agent's own
//! binary run as `chaos-agent __stressor ...`, so it can be placed in any
//! cgroup (a whole process, as cgroup v2 requires) and killed as one.
//!
//! Protocol with the agent: the worker waits for `go` on stdin (the agent
//! first moves it into its cgroup, so every page and every cycle is charged
//! there), works, prints `ready` on stdout, and holds the load until it is
//! killed. It also ends by itself when the agent that started it is gone
//! (its parent pid changes) or the fault's deadline passes, so neither a
//! crashed agent nor a lost journal can leave it running.

use std::{
    io::{BufRead, Write},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::time::{ClockId, clock_gettime};

/// argv[1] that turns the agent binary into a worker.
pub const ARG: &str = "__stressor";

/// What a worker does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// `workers` threads at `load_permyriad`/100 % of a core each.
    Cpu { workers: u32, load_permyriad: u32 },
    /// Allocate and touch this many bytes, then hold them.
    Memory { bytes: u64 },
}

/// A worker's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StressorArgs {
    pub fault_id: String,
    pub deadline_unix_ms: u64,
    pub work: Work,
}

/// The duty cycle of a CPU worker thread.
const PERIOD: Duration = Duration::from_millis(50);
/// How often the holder checks its parent and deadline.
const CHECK: Duration = Duration::from_millis(100);

impl StressorArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            ARG.to_string(),
            "--fault-id".into(),
            self.fault_id.clone(),
            "--deadline-unix-ms".into(),
            self.deadline_unix_ms.to_string(),
        ];
        match self.work {
            Work::Cpu { workers, load_permyriad } => {
                a.extend(["cpu".into(), workers.to_string(), load_permyriad.to_string()]);
            }
            Work::Memory { bytes } => a.extend(["memory".into(), bytes.to_string()]),
        }
        a
    }

    pub fn parse(args: &[String]) -> Result<Self, String> {
        let s: Vec<&str> = args.iter().map(String::as_str).collect();
        let num = |v: Option<&&str>, what: &str| -> Result<u64, String> {
            v.and_then(|v| v.parse().ok()).ok_or_else(|| format!("{what}: expected a number in {s:?}"))
        };
        match s.as_slice() {
            [ARG, "--fault-id", id, "--deadline-unix-ms", dl, rest @ ..] => {
                let work = match rest {
                    ["cpu", w, l] => Work::Cpu {
                        workers: u32::try_from(num(Some(w), "workers")?).map_err(|e| e.to_string())?,
                        load_permyriad: u32::try_from(num(Some(l), "load")?).map_err(|e| e.to_string())?,
                    },
                    ["memory", b] => Work::Memory { bytes: num(Some(b), "bytes")? },
                    _ => return Err(format!("unknown work {rest:?}")),
                };
                Ok(StressorArgs { fault_id: (*id).to_string(), deadline_unix_ms: num(Some(dl), "deadline")?, work })
            }
            _ => Err(format!("usage: {ARG} --fault-id ID --deadline-unix-ms MS (cpu WORKERS PERMYRIAD | memory BYTES), got {s:?}")),
        }
    }
}

/// Run as a worker when argv[1] says so; returns (to go on as the agent) otherwise.
pub fn run_if_stressor() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some(ARG) {
        return;
    }
    let code = match StressorArgs::parse(&args) {
        Ok(a) => run(&a),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "chaos-agent {ARG}: {e}");
            2
        }
    };
    std::process::exit(code);
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn run(a: &StressorArgs) -> i32 {
    // Be the OOM killer's first choice, never the process under test.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let parent = nix::unistd::getppid();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() || line.trim() != "go" {
        return 0;
    }
    let deadline = a.deadline_unix_ms;
    let alive = move || nix::unistd::getppid() == parent && now_unix_ms() < deadline;
    // Held until the process ends.
    let mut held: Vec<u8> = Vec::new();
    match a.work {
        Work::Cpu { workers, load_permyriad } => {
            for _ in 0..workers {
                thread::spawn(move || burn(load_permyriad, alive));
            }
        }
        Work::Memory { bytes } => {
            let Ok(n) = usize::try_from(bytes) else { return 3 };
            if held.try_reserve_exact(n).is_err() {
                let _ = writeln!(std::io::stderr(), "cannot reserve {bytes} bytes");
                return 3;
            }
            // Touch every page with a non-zero byte so each is really backed.
            held.resize(n, 0);
            for i in (0..n).step_by(4096) {
                held[i] = 1;
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
        return 0;
    }
    drop(out);
    while alive() {
        thread::sleep(CHECK);
    }
    std::hint::black_box(&held);
    0
}

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Burn `load_permyriad`/10000 of each PERIOD against this thread's own
/// CPU clock; a period that fell short (preempted, throttled) carries its
/// debt, up to one period's worth, into the next.
fn burn(load_permyriad: u32, alive: impl Fn() -> bool) {
    let target = PERIOD * load_permyriad / 10_000;
    let mut debt = Duration::ZERO;
    let mut checked = Instant::now();
    loop {
        let start = Instant::now();
        let cpu0 = thread_cpu();
        let goal = target + debt;
        let mut x: u64 = 1;
        while thread_cpu().saturating_sub(cpu0) < goal && start.elapsed() < PERIOD {
            for _ in 0..2_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        debt = goal.saturating_sub(thread_cpu().saturating_sub(cpu0)).min(target);
        if let Some(rest) = PERIOD.checked_sub(start.elapsed()) {
            thread::sleep(rest);
        }
        if checked.elapsed() >= CHECK {
            if !alive() {
                std::process::exit(0);
            }
            checked = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip_and_errors_name_the_problem() {
        for work in [Work::Cpu { workers: 2, load_permyriad: 5000 }, Work::Memory { bytes: 1 << 20 }] {
            let a = StressorArgs { fault_id: "f-1".into(), deadline_unix_ms: 42, work };
            assert_eq!(StressorArgs::parse(&a.to_args()).expect("parse"), a);
        }
        let bad: Vec<String> = [ARG, "--fault-id", "x", "--deadline-unix-ms", "1", "disk", "3"].iter().map(|s| s.to_string()).collect();
        assert!(StressorArgs::parse(&bad).expect_err("bad").contains("disk"));
    }
}
