//! [`ProcessTable`] over a procfs mount (`/proc`, injectable for tests).

use std::{
    fs,
    io::{self, ErrorKind},
    path::{Path, PathBuf},
};

use super::{ProcStat, ProcessTable};

/// The real process table, read from a procfs root.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

/// Parse the text of `/proc/PID/stat`. `comm` may hold spaces and ')',
/// so fields are counted from the last ')'.
pub fn parse_stat(pid: u32, text: &str) -> io::Result<ProcStat> {
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, format!("/proc/{pid}/stat: {what}"));
    let open = text.find('(').ok_or_else(|| bad("no '('"))?;
    let close = text.rfind(')').ok_or_else(|| bad("no ')'"))?;
    if close < open {
        return Err(bad("')' before '('"));
    }
    let comm = text[open + 1..close].to_string();
    // Field 3 (state) is index 0 here.
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied().ok_or_else(|| bad(&format!("field {n} missing")));
    let num = |n: usize| field(n)?.parse::<u64>().map_err(|_| bad(&format!("field {n} not a number")));
    Ok(ProcStat {
        pid,
        comm,
        state: field(3)?.chars().next().ok_or_else(|| bad("empty state"))?,
        ppid: u32::try_from(num(4)?).map_err(|_| bad("ppid out of range"))?,
        flags: num(9)?,
        start_time_ticks: num(22)?,
        cpu_ticks: num(14)? + num(15)?,
        rss_pages: num(24)?,
    })
}

impl ProcessTable for ProcFs {
    fn stat(&self, pid: u32) -> io::Result<Option<ProcStat>> {
        match fs::read_to_string(self.root.join(pid.to_string()).join("stat")) {
            Ok(text) => parse_stat(pid, &text).map(Some),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound) || e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn pids(&self) -> io::Result<Vec<u32>> {
        let mut pids = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        Ok(pids)
    }

    fn argv0_basename(&self, pid: u32) -> Option<String> {
        let raw = fs::read(self.root.join(pid.to_string()).join("cmdline")).ok()?;
        let argv0 = raw.split(|b| *b == 0).next()?;
        let s = String::from_utf8_lossy(argv0);
        let base = s.rsplit('/').next()?.to_string();
        (!base.is_empty()).then_some(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comm_with_spaces_and_parens() {
        let text = "1234 (we ird) (x)) T 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        let s = parse_stat(1234, text).expect("parse");
        assert_eq!(s.comm, "we ird) (x)");
        assert_eq!(s.state, 'T');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.flags, 4194560);
        assert_eq!(s.start_time_ticks, 987654);
        assert_eq!((s.cpu_ticks, s.rss_pages), (3, 200));
    }

    #[test]
    fn truncated_stat_is_an_error_not_a_panic() {
        assert!(parse_stat(1, "1 (init) S 0").is_err());
        assert!(parse_stat(1, "garbage").is_err());
    }

    #[test]
    fn reads_a_fake_proc_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("77");
        fs::create_dir(&p).expect("mkdir");
        fs::write(p.join("stat"), "77 (sleep) S 1 77 77 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 5555 0 0").expect("write");
        fs::write(p.join("cmdline"), b"/usr/bin/some-long-daemon-name\0--flag\0").expect("write");
        fs::create_dir(dir.path().join("self")).expect("mkdir");
        let fs_ = ProcFs::new(dir.path());
        assert_eq!(fs_.pids().expect("pids"), vec![77]);
        assert_eq!(fs_.stat(77).expect("stat").map(|s| s.start_time_ticks), Some(5555));
        assert_eq!(fs_.stat(78).expect("stat"), None);
        assert_eq!(fs_.argv0_basename(77).as_deref(), Some("some-long-daemon-name"));
    }

    #[test]
    fn reads_the_real_proc_for_this_process() {
        let me = std::process::id();
        let s = ProcFs::default().stat(me).expect("stat").expect("exists");
        assert_eq!(s.pid, me);
        assert!(s.start_time_ticks > 0);
        assert!(!s.is_kernel_thread());
    }
}
