//! [`Signals`] on the real kernel, through a pidfd so that a pid reused
//! between the check and the signal can never receive it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::{errno::Errno, sys::signal::Signal};

use super::{Delivery, ProcessTable, Signals, procfs::ProcFs};

/// Real signals, checked against `/proc/PID/stat` start times.
#[derive(Debug, Clone, Default)]
pub struct PidfdSignals {
    procfs: ProcFs,
}

impl PidfdSignals {
    pub fn new(procfs: ProcFs) -> Self {
        Self { procfs }
    }
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, Errno> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| Errno::EINVAL)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    let fd = i32::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_send_signal(fd: &OwnedFd, sig: Signal) -> Result<(), Errno> {
    // SAFETY: a valid pidfd, a valid signal number, a null siginfo (the kernel
    // fills it as for kill(2)) and flags 0.
    let rc =
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig as libc::c_int, std::ptr::null::<libc::siginfo_t>(), 0) };
    if rc < 0 { Err(Errno::last()) } else { Ok(()) }
}

impl Signals for PidfdSignals {
    fn signal_if_same(&self, pid: u32, start_time_ticks: u64, sig: Signal) -> Result<Delivery, Errno> {
        // Hold the process first, then check who it is: the pidfd keeps
        // referring to this process even if the pid is reused afterwards.
        let fd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(Errno::ESRCH) => return Ok(Delivery::Gone),
            Err(e) => return Err(e),
        };
        match self.procfs.stat(pid) {
            Ok(Some(s)) if s.start_time_ticks == start_time_ticks && s.state != 'Z' => {}
            Ok(_) => return Ok(Delivery::Gone),
            Err(e) => return Err(e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)),
        }
        match pidfd_send_signal(&fd, sig) {
            Ok(()) => Ok(Delivery::Sent),
            Err(Errno::ESRCH) => Ok(Delivery::Gone),
            Err(e) => Err(e),
        }
    }
}
