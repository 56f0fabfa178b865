//! What the agent must never fault: pid 1, kernel threads, itself, the
//! coordinator when it shares the host, and whatever the config protects.

use std::sync::RwLock;

use crate::sys::ProcStat;

/// The protection policy; the coordinator's pid is learned at registration.
#[derive(Debug)]
pub struct Protection {
    self_pid: u32,
    pids: Vec<u32>,
    names: Vec<String>,
    coordinator_pid: RwLock<Option<u32>>,
}

impl Protection {
    pub fn new(self_pid: u32, pids: Vec<u32>, names: Vec<String>) -> Self {
        Self { self_pid, pids, names, coordinator_pid: RwLock::new(None) }
    }

    /// Record the coordinator's pid (it runs on this host).
    pub fn set_coordinator_pid(&self, pid: Option<u32>) {
        *self.coordinator_pid.write().unwrap_or_else(|p| p.into_inner()) = pid;
    }

    pub fn coordinator_pid(&self) -> Option<u32> {
        *self.coordinator_pid.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Is this name protected (matches comm or argv[0]'s basename)?
    pub fn name_is_protected(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// Why this process must not be faulted, or `None` when it may be.
    pub fn why_protected(&self, stat: &ProcStat, argv0: Option<&str>) -> Option<String> {
        let who = format!("pid {} ({})", stat.pid, stat.comm);
        if stat.pid == 1 {
            return Some(format!("{who} is init"));
        }
        if stat.is_kernel_thread() {
            return Some(format!("{who} is a kernel thread"));
        }
        if stat.pid == self.self_pid {
            return Some(format!("{who} is this agent"));
        }
        if self.coordinator_pid() == Some(stat.pid) {
            return Some(format!("{who} is the coordinator"));
        }
        if self.pids.contains(&stat.pid) {
            return Some(format!("{who} is listed in protected.pids"));
        }
        if self.name_is_protected(&stat.comm) || argv0.is_some_and(|a| self.name_is_protected(a)) {
            return Some(format!("{who} has a name listed in protected.names"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(pid: u32, comm: &str) -> ProcStat {
        ProcStat { pid, comm: comm.into(), state: 'S', ppid: 1, flags: 0, start_time_ticks: 9, cpu_ticks: 0, rss_pages: 0 }
    }

    #[test]
    fn refuses_init_self_coordinator_config_and_kthreads() {
        let p = Protection::new(100, vec![7], vec!["sshd".into()]);
        assert!(p.why_protected(&stat(1, "systemd"), None).expect("init").contains("init"));
        assert!(p.why_protected(&stat(100, "chaos-agent"), None).expect("self").contains("this agent"));
        assert!(p.why_protected(&stat(7, "x"), None).expect("cfg").contains("protected.pids"));
        assert!(p.why_protected(&stat(8, "sshd"), None).expect("name").contains("protected.names"));
        assert!(p.why_protected(&stat(9, "truncated-name"), Some("sshd")).is_some());
        assert_eq!(p.why_protected(&stat(50, "sleep"), None), None);
        p.set_coordinator_pid(Some(50));
        assert!(p.why_protected(&stat(50, "sleep"), None).expect("coord").contains("coordinator"));
        let mut k = stat(3, "kworker/0:1");
        k.ppid = 2;
        k.flags = crate::sys::PF_KTHREAD;
        assert!(p.why_protected(&k, None).expect("kthread").contains("kernel thread"));
        // Inside a pid namespace pid 2 (and its children) are user processes.
        let mut in_ns = stat(2, "java");
        assert_eq!(p.why_protected(&in_ns, None), None);
        in_ns.pid = 12;
        in_ns.ppid = 2;
        assert_eq!(p.why_protected(&in_ns, None), None);
    }
}
