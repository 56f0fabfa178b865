//! A recording fake of the process table and signals: processes are rows
//! in a map, signals change their state the way the kernel would, and every
//! signal sent is recorded for assertions.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use nix::{errno::Errno, sys::signal::Signal};

use super::{Delivery, ProcStat, ProcessTable, Signals};

#[derive(Debug, Default)]
struct Inner {
    procs: BTreeMap<u32, (ProcStat, Option<String>)>,
    sent: Vec<(u32, Signal)>,
    /// Signals that fail with an errno (to test failure paths): by pid,
    /// for one signal or (None) for every signal.
    fail: Vec<(u32, Option<Signal>, Errno)>,
    /// Pids whose state signals do not change.
    stuck: std::collections::BTreeSet<u32>,
    now_ticks: u64,
}

/// Fake process table + signals, cheap to clone (shared state).
#[derive(Debug, Clone, Default)]
pub struct FakeProcs {
    inner: Arc<Mutex<Inner>>,
}

impl FakeProcs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a running process.
    pub fn spawn(&self, pid: u32, comm: &str, start_time_ticks: u64) {
        let stat = ProcStat { pid, comm: comm.to_string(), state: 'S', ppid: 1, flags: 0, start_time_ticks, cpu_ticks: 0, rss_pages: 0 };
        self.lock().procs.insert(pid, (stat, None));
    }

    /// Set the clock (ticks since boot) that `now_ticks` reads.
    pub fn set_now_ticks(&self, t: u64) {
        self.lock().now_ticks = t;
    }

    /// Add a kernel thread.
    pub fn spawn_kthread(&self, pid: u32, comm: &str) {
        let stat = ProcStat {
            pid,
            comm: comm.to_string(),
            state: 'I',
            ppid: 2,
            flags: super::PF_KTHREAD,
            start_time_ticks: 1,
            cpu_ticks: 0,
            rss_pages: 0,
        };
        self.lock().procs.insert(pid, (stat, None));
    }

    /// Keep a process in `state` whatever it is sent (e.g. 'D': uninterruptible).
    pub fn stick_in_state(&self, pid: u32, state: char) {
        let mut g = self.lock();
        g.stuck.insert(pid);
        if let Some((s, _)) = g.procs.get_mut(&pid) {
            s.state = state;
        }
    }

    /// Remove a process (it exited).
    pub fn exit(&self, pid: u32) {
        self.lock().procs.remove(&pid);
    }

    /// Make every signal to `pid` fail with `errno`.
    pub fn fail_signals(&self, pid: u32, errno: Errno) {
        self.lock().fail.push((pid, None, errno));
    }

    /// Make one signal to `pid` fail with `errno`.
    pub fn fail_signal(&self, pid: u32, sig: Signal, errno: Errno) {
        self.lock().fail.push((pid, Some(sig), errno));
    }

    /// Signals to `pid` work again.
    pub fn clear_failures(&self, pid: u32) {
        self.lock().fail.retain(|(p, _, _)| *p != pid);
    }

    pub fn state(&self, pid: u32) -> Option<char> {
        self.lock().procs.get(&pid).map(|(s, _)| s.state)
    }

    /// Every signal delivered so far, in order.
    pub fn sent(&self) -> Vec<(u32, Signal)> {
        self.lock().sent.clone()
    }
}

impl ProcessTable for FakeProcs {
    fn stat(&self, pid: u32) -> std::io::Result<Option<ProcStat>> {
        Ok(self.lock().procs.get(&pid).map(|(s, _)| s.clone()))
    }

    fn pids(&self) -> std::io::Result<Vec<u32>> {
        Ok(self.lock().procs.keys().copied().collect())
    }

    fn argv0_basename(&self, pid: u32) -> Option<String> {
        self.lock().procs.get(&pid).and_then(|(s, a)| a.clone().or_else(|| Some(s.comm.clone())))
    }

    fn now_ticks(&self) -> Option<u64> {
        Some(self.lock().now_ticks)
    }
}

impl Signals for FakeProcs {
    fn signal_if_same(&self, pid: u32, start_time_ticks: u64, sig: Signal) -> Result<Delivery, Errno> {
        let mut g = self.lock();
        if let Some((_, _, e)) = g.fail.iter().find(|(p, s, _)| *p == pid && s.is_none_or(|s| s == sig)) {
            return Err(*e);
        }
        let stuck = g.stuck.contains(&pid);
        let Some((stat, _)) = g.procs.get_mut(&pid) else { return Ok(Delivery::Gone) };
        if stat.start_time_ticks != start_time_ticks {
            return Ok(Delivery::Gone);
        }
        let mut exited = false;
        match sig {
            _ if stuck => {}
            Signal::SIGSTOP => stat.state = 'T',
            Signal::SIGCONT => stat.state = 'S',
            Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT => exited = true,
            _ => {}
        }
        if exited {
            g.procs.remove(&pid);
        }
        g.sent.push((pid, sig));
        Ok(Delivery::Sent)
    }
}
