//! The real signal path on the kernel: pidfd delivery, the pid-reuse guard,
//! and the process driver pausing and resuming a real child.

use std::{process::Command, sync::Arc, time::Duration};

use chaos_agent::{
    faults::{FaultDriver, process::ProcessDriver},
    protect::Protection,
    sys::{Delivery, ProcessTable, Signals, procfs::ProcFs, signals::PidfdSignals},
};
use chaos_proto::spec::{FaultKind, FaultRequest, TargetSpec};
use nix::sys::signal::Signal;

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn state(pid: u32) -> char {
    ProcFs::default().stat(pid).ok().flatten().map(|s| s.state).unwrap_or('?')
}

#[test]
fn wrong_start_time_is_never_signalled() {
    let c = Child(Command::new("sleep").arg("60").spawn().expect("spawn"));
    let pid = c.0.id();
    let real = ProcFs::default().stat(pid).expect("stat").expect("exists").start_time_ticks;
    let sig = PidfdSignals::default();
    assert_eq!(sig.signal_if_same(pid, real + 1, Signal::SIGSTOP), Ok(Delivery::Gone));
    assert_ne!(state(pid), 'T', "an impostor start time must not be signalled");
    assert_eq!(sig.signal_if_same(pid, real, Signal::SIGSTOP), Ok(Delivery::Sent));
    assert!(wait(|| state(pid) == 'T'));
    assert_eq!(sig.signal_if_same(pid, real, Signal::SIGCONT), Ok(Delivery::Sent));
    assert!(wait(|| state(pid) != 'T'));
    assert_eq!(sig.signal_if_same(4_000_000, 1, Signal::SIGCONT), Ok(Delivery::Gone), "no such pid");
}

#[tokio::test]
async fn driver_pauses_and_resumes_a_real_process() {
    let c = Child(Command::new("sleep").arg("60").spawn().expect("spawn"));
    let pid = c.0.id();
    let procfs = ProcFs::default();
    let d = ProcessDriver::new(
        Arc::new(procfs.clone()),
        Arc::new(PidfdSignals::new(procfs)),
        Arc::new(Protection::new(std::process::id(), vec![], vec![])),
    );
    let req = FaultRequest {
        id: None,
        target: TargetSpec::Pid(pid),
        duration: Duration::from_secs(5),
        labels: Default::default(),
        kind: FaultKind::ProcessPause,
    };
    let plan = d.plan(&req).await.expect("plan");
    let applied = d.apply(&plan).await.expect("apply");
    assert_eq!(applied.processes[0].pid, pid);
    assert!(wait(|| state(pid) == 'T'), "stopped");
    let summary = d.revert(&plan).await.expect("revert");
    assert!(summary.contains("SIGCONT"), "{summary}");
    assert!(wait(|| state(pid) != 'T'), "resumed");
}

fn wait(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
