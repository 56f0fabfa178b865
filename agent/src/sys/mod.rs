//! Narrow traits over the OS calls the agent makes, each with a real
//! implementation and a recording fake, so the fault lifecycle is
//! unit-tested without root and the real path is tested as root.

pub mod cgroup;
pub mod fake;
pub mod netexec;
pub mod netns;
pub mod nftnl;
pub mod probe;
pub mod procfs;
pub mod signals;

use nix::{errno::Errno, sys::signal::Signal};

/// The parts of `/proc/PID/stat` the agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// `comm`, at most 15 characters.
    pub comm: String,
    /// One-letter state: R, S, D, T (stopped), t, Z, X, I.
    pub state: char,
    pub ppid: u32,
    /// Kernel `PF_*` flags (field 9).
    pub flags: u64,
    /// Start time in clock ticks since boot (field 22): with the pid, it
    /// names one process for the life of the host.
    pub start_time_ticks: u64,
    /// CPU time used, user + system, in clock ticks (fields 14 and 15).
    pub cpu_ticks: u64,
    /// Resident set size in pages (field 24).
    pub rss_pages: u64,
}

/// `PF_KTHREAD`: the process is a kernel thread.
pub const PF_KTHREAD: u64 = 0x0020_0000;

impl ProcStat {
    /// By the kernel's own flag only: inside a pid namespace, pid 2 and
    /// its children are ordinary processes (the host's kthreadd is not
    /// visible there).
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// Read-only view of the process table.
pub trait ProcessTable: Send + Sync {
    /// The process's stat, or `None` when no such process exists.
    fn stat(&self, pid: u32) -> std::io::Result<Option<ProcStat>>;
    /// Every pid currently in the table.
    fn pids(&self) -> std::io::Result<Vec<u32>>;
    /// Basename of argv[0], when readable (comm is cut to 15 characters).
    fn argv0_basename(&self, pid: u32) -> Option<String>;
    /// Now, in the clock ticks since boot that start times are counted in.
    fn now_ticks(&self) -> Option<u64> {
        let up: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
        Some((up * ticks_per_second() as f64) as u64)
    }
}

/// `CLK_TCK`: clock ticks per second (100 on Linux).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant; no pointers involved.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|v| *v > 0).unwrap_or(100)
}

/// Live user processes (no kernel threads) whose comm or argv[0] basename
/// is `name`; with argv[0]'s basename when that is what matched (comm is cut
/// to 15 characters), so callers need not read it again.
pub fn processes_named(table: &dyn ProcessTable, name: &str) -> std::io::Result<Vec<(ProcStat, Option<String>)>> {
    let mut found = Vec::new();
    for pid in table.pids()? {
        let Ok(Some(stat)) = table.stat(pid) else { continue };
        if stat.is_kernel_thread() {
            continue;
        }
        if stat.comm == name {
            found.push((stat, None));
        } else if let Some(argv0) = table.argv0_basename(pid).filter(|a| a == name) {
            found.push((stat, Some(argv0)));
        }
    }
    Ok(found)
}

/// What became of a signal aimed at one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The signal was delivered to the very process named.
    Sent,
    /// The process is gone, or its pid now belongs to another process.
    Gone,
}

/// Sends signals, guarded against pid reuse.
pub trait Signals: Send + Sync {
    /// Send `sig` to `pid` only if that pid still has `start_time_ticks`.
    fn signal_if_same(&self, pid: u32, start_time_ticks: u64, sig: Signal) -> Result<Delivery, Errno>;
}
