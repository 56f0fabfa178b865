//! cgroups, v1 and v2, behind one small reader with an injectable root
//! (`/sys/fs/cgroup`) so it is unit-tested against a tempdir fake.
//!
//! v1 (this CI VM): one hierarchy per controller, possibly co-mounted
//! (`cpu,cpuacct`). v2 (most production hosts): one unified tree.
//! Paths are cgroup paths as in `/proc/PID/cgroup` ("/system.slice/x").
//!
//! The knobs the resource faults turn ([`CgroupFs::cpu_quota`],
//! [`CgroupFs::memory_limit_text`], [`CgroupFs::io_limits`],
//! [`CgroupFs::set_frozen`]) read the value they replace in the form the
//! kernel takes back, so revert restores it exactly.

use std::{
    fs,
    io::{self, ErrorKind},
    path::{Path, PathBuf},
};

/// Which hierarchy the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// Reads cgroup counters under a root.
#[derive(Debug, Clone)]
pub struct CgroupFs {
    root: PathBuf,
    version: Version,
}

fn read_u64(p: &Path) -> io::Result<Option<u64>> {
    match fs::read_to_string(p) {
        Ok(s) => {
            let t = s.trim();
            // v2 limits read "max" when unlimited.
            if t == "max" {
                return Ok(None);
            }
            t.parse::<u64>().map(Some).map_err(|_| io::Error::new(ErrorKind::InvalidData, format!("{}: not a number: {t:?}", p.display())))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The cgroup path relative to a controller directory ("/a/b" -> "a/b").
fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

impl CgroupFs {
    /// Detect the hierarchy under `root`: v2 when `cgroup.controllers`
    /// exists at its top, v1 otherwise.
    pub fn detect(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(io::Error::new(ErrorKind::NotFound, format!("no cgroup filesystem at {}", root.display())));
        }
        let version = if root.join("cgroup.controllers").exists() { Version::V2 } else { Version::V1 };
        Ok(Self { root, version })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// v1: the directory of `controller`'s hierarchy (`cpuacct`, or a
    /// co-mount such as `cpu,cpuacct`).
    pub fn controller_dir(&self, controller: &str) -> Option<PathBuf> {
        let direct = self.root.join(controller);
        if direct.is_dir() {
            return Some(direct);
        }
        fs::read_dir(&self.root)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_str().is_some_and(|n| n.split(',').any(|c| c == controller)))
            .map(|e| e.path())
    }

    /// The directory of cgroup `path` for `controller` (v2: the unified tree).
    pub fn dir(&self, controller: &str, path: &str) -> Option<PathBuf> {
        match self.version {
            Version::V2 => Some(self.root.join(rel(path))),
            Version::V1 => self.controller_dir(controller).map(|d| d.join(rel(path))),
        }
    }

    /// Whether the cgroup exists (for the CPU accounting controller).
    pub fn exists(&self, path: &str) -> bool {
        self.dir("cpuacct", path).is_some_and(|d| d.is_dir())
    }

    /// Total CPU time used by the cgroup, in nanoseconds.
    pub fn cpu_usage_ns(&self, path: &str) -> io::Result<Option<u64>> {
        match self.version {
            Version::V1 => match self.dir("cpuacct", path) {
                Some(d) => read_u64(&d.join("cpuacct.usage")),
                None => Ok(None),
            },
            Version::V2 => {
                let p = self.root.join(rel(path)).join("cpu.stat");
                match fs::read_to_string(&p) {
                    Ok(s) => Ok(s
                        .lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|us| us * 1000)),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Memory charged to the cgroup, in bytes.
    pub fn memory_bytes(&self, path: &str) -> io::Result<Option<u64>> {
        let file = match self.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        match self.dir("memory", path) {
            Some(d) => read_u64(&d.join(file)),
            None => Ok(None),
        }
    }

    /// The cgroup's memory limit in bytes; None when unlimited or absent.
    pub fn memory_limit(&self, path: &str) -> io::Result<Option<u64>> {
        let file = match self.version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        };
        match self.dir("memory", path) {
            // v1 reports "unlimited" as a huge page-aligned number.
            Some(d) => Ok(read_u64(&d.join(file))?.filter(|v| *v < (1u64 << 62))),
            None => Ok(None),
        }
    }
}

/// A controller the faults act through, by its v1 and v2 names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Controller {
    Cpu,
    CpuAcct,
    Memory,
    Io,
    Freezer,
}

impl Controller {
    /// The v1 hierarchy's name.
    pub fn v1(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::CpuAcct => "cpuacct",
            Controller::Memory => "memory",
            Controller::Io => "blkio",
            Controller::Freezer => "freezer",
        }
    }

    /// The v2 name to enable in `cgroup.subtree_control`; None when v2
    /// builds it in (freezer) or folds it into another (cpuacct).
    pub fn v2(self) -> Option<&'static str> {
        match self {
            Controller::Cpu => Some("cpu"),
            Controller::Memory => Some("memory"),
            Controller::Io => Some("io"),
            Controller::CpuAcct | Controller::Freezer => None,
        }
    }
}

/// A CPU bandwidth limit as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuQuota {
    /// None: unlimited (v1 `-1`, v2 `max`).
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

/// Read and write block IO limits of one device; None is "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoLimits {
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// Write `value` to `file`, naming the file and value in the error.
fn write_file(file: &Path, value: &str) -> io::Result<()> {
    fs::write(file, value).map_err(|e| io::Error::new(e.kind(), format!("writing {value:?} to {}: {e}", file.display())))
}

fn read_file(file: &Path) -> io::Result<String> {
    fs::read_to_string(file).map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", file.display())))
}

impl CgroupFs {
    /// Whether the host offers the controller.
    pub fn has(&self, ctrl: Controller) -> bool {
        match (self.version, ctrl.v2()) {
            (Version::V1, _) => self.controller_dir(ctrl.v1()).is_some(),
            (Version::V2, None) => true,
            (Version::V2, Some(name)) => {
                fs::read_to_string(self.root.join("cgroup.controllers")).unwrap_or_default().split_whitespace().any(|c| c == name)
            }
        }
    }

    /// The directory of cgroup `path` for `ctrl`, which must exist.
    pub fn existing_dir(&self, ctrl: Controller, path: &str) -> io::Result<PathBuf> {
        let d = self.dir_for(ctrl, path)?;
        if d.is_dir() { Ok(d) } else { Err(io::Error::new(ErrorKind::NotFound, format!("no cgroup {}", d.display()))) }
    }

    /// [`CgroupFs::dir`], with an error naming a missing v1 controller.
    fn dir_for(&self, ctrl: Controller, path: &str) -> io::Result<PathBuf> {
        self.dir(ctrl.v1(), path)
            .ok_or_else(|| io::Error::new(ErrorKind::Unsupported, format!("no {} controller under {}", ctrl.v1(), self.root.display())))
    }

    /// Create cgroup `path` for `ctrl` (v2: enabling the controller in the
    /// parent's `cgroup.subtree_control` if needed). True when it was created,
    /// false when it existed.
    pub fn create(&self, ctrl: Controller, path: &str) -> io::Result<bool> {
        let d = self.dir_for(ctrl, path)?;
        if self.version == Version::V2
            && let (Some(name), Some(parent)) = (ctrl.v2(), d.parent())
        {
            let sc = parent.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&sc).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == name) {
                write_file(&sc, &format!("+{name}"))?;
            }
        }
        match fs::create_dir(&d) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io::Error::new(e.kind(), format!("creating cgroup {}: {e}", d.display()))),
        }
    }

    /// Remove an empty cgroup; false when it was already gone.
    pub fn remove(&self, ctrl: Controller, path: &str) -> io::Result<bool> {
        let Ok(d) = self.existing_dir(ctrl, path) else { return Ok(false) };
        match fs::remove_dir(&d) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io::Error::new(e.kind(), format!("removing cgroup {}: {e}", d.display()))),
        }
    }

    /// A knob file of the cgroup as it reads now (trimmed), with the cgroup's
    /// directory; `NotFound` when the cgroup is gone.
    pub fn read_knob(&self, ctrl: Controller, path: &str, file: &str) -> io::Result<(PathBuf, String)> {
        let d = self.existing_dir(ctrl, path)?;
        let text = read_file(&d.join(file))?;
        Ok((d, text.trim().to_string()))
    }

    /// Move process `pid` into the cgroup.
    pub fn add_process(&self, ctrl: Controller, path: &str, pid: u32) -> io::Result<()> {
        write_file(&self.existing_dir(ctrl, path)?.join("cgroup.procs"), &pid.to_string())
    }

    /// The processes in the cgroup (not its children).
    pub fn processes(&self, ctrl: Controller, path: &str) -> io::Result<Vec<u32>> {
        let text = read_file(&self.existing_dir(ctrl, path)?.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// The CPU bandwidth limit of the cgroup.
    pub fn cpu_quota(&self, path: &str) -> io::Result<CpuQuota> {
        let d = self.existing_dir(Controller::Cpu, path)?;
        match self.version {
            Version::V1 => {
                let q = read_file(&d.join("cpu.cfs_quota_us"))?;
                let p = read_file(&d.join("cpu.cfs_period_us"))?;
                let bad = |f: &str, t: &str| other(format!("{}/{f}: not a number: {:?}", d.display(), t.trim()));
                let quota: i64 = q.trim().parse().map_err(|_| bad("cpu.cfs_quota_us", &q))?;
                let period_us = p.trim().parse().map_err(|_| bad("cpu.cfs_period_us", &p))?;
                Ok(CpuQuota { quota_us: u64::try_from(quota).ok(), period_us })
            }
            Version::V2 => {
                let t = read_file(&d.join("cpu.max"))?;
                let mut it = t.split_whitespace();
                let bad = || other(format!("{}/cpu.max: expected \"QUOTA PERIOD\", got {:?}", d.display(), t.trim()));
                let quota_us = match it.next().ok_or_else(bad)? {
                    "max" => None,
                    q => Some(q.parse().map_err(|_| bad())?),
                };
                let period_us = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
                Ok(CpuQuota { quota_us, period_us })
            }
        }
    }

    /// Set the CPU bandwidth limit of the cgroup.
    pub fn set_cpu_quota(&self, path: &str, q: CpuQuota) -> io::Result<()> {
        let d = self.existing_dir(Controller::Cpu, path)?;
        match self.version {
            Version::V1 => {
                // Unlimited first, so a period change never trips the
                // kernel's check of quota against period.
                write_file(&d.join("cpu.cfs_quota_us"), "-1")?;
                write_file(&d.join("cpu.cfs_period_us"), &q.period_us.to_string())?;
                match q.quota_us {
                    Some(v) => write_file(&d.join("cpu.cfs_quota_us"), &v.to_string()),
                    None => Ok(()),
                }
            }
            Version::V2 => {
                let quota = q.quota_us.map_or_else(|| "max".to_string(), |v| v.to_string());
                write_file(&d.join("cpu.max"), &format!("{quota} {}", q.period_us))
            }
        }
    }

    fn memory_limit_file(&self) -> &'static str {
        match self.version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    /// The memory limit as text the kernel takes back (`-1`/`max` when unlimited).
    pub fn memory_limit_text(&self, path: &str) -> io::Result<String> {
        let d = self.existing_dir(Controller::Memory, path)?;
        let t = read_file(&d.join(self.memory_limit_file()))?.trim().to_string();
        // v1 shows "unlimited" as a huge page-aligned number; -1 sets it.
        Ok(match (self.version, t.parse::<u64>()) {
            (Version::V1, Ok(v)) if v >= (1u64 << 62) => "-1".into(),
            _ => t,
        })
    }

    /// Set the memory limit: a byte count, or `-1` (v1) / `max` (v2).
    pub fn set_memory_limit_text(&self, path: &str, value: &str) -> io::Result<()> {
        write_file(&self.existing_dir(Controller::Memory, path)?.join(self.memory_limit_file()), value)
    }

    /// How many times the kernel's OOM killer acted in the cgroup, if it says.
    pub fn oom_kills(&self, path: &str) -> Option<u64> {
        let d = self.existing_dir(Controller::Memory, path).ok()?;
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        fs::read_to_string(d.join(file)).ok()?.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
    }

    /// The IO limits of one device.
    pub fn io_limits(&self, path: &str, dev: &str) -> io::Result<IoLimits> {
        let d = self.existing_dir(Controller::Io, path)?;
        match self.version {
            Version::V1 => {
                let find = |f: &str| -> io::Result<Option<u64>> {
                    let t = read_file(&d.join(f))?;
                    Ok(t.lines().find_map(|l| l.strip_prefix(dev)?.strip_prefix(' ')?.trim().parse().ok()))
                };
                Ok(IoLimits { read_bps: find("blkio.throttle.read_bps_device")?, write_bps: find("blkio.throttle.write_bps_device")? })
            }
            Version::V2 => {
                let t = read_file(&d.join("io.max"))?;
                let line = t.lines().find(|l| l.split_whitespace().next() == Some(dev)).unwrap_or_default();
                let key = |k: &str| line.split_whitespace().find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok());
                Ok(IoLimits { read_bps: key("rbps"), write_bps: key("wbps") })
            }
        }
    }

    /// Set the IO limits of one device (None removes that limit).
    pub fn set_io_limits(&self, path: &str, dev: &str, l: IoLimits) -> io::Result<()> {
        let d = self.existing_dir(Controller::Io, path)?;
        match self.version {
            Version::V1 => {
                // 0 removes a v1 throttle rule.
                write_file(&d.join("blkio.throttle.read_bps_device"), &format!("{dev} {}", l.read_bps.unwrap_or(0)))?;
                write_file(&d.join("blkio.throttle.write_bps_device"), &format!("{dev} {}", l.write_bps.unwrap_or(0)))
            }
            Version::V2 => {
                let v = |x: Option<u64>| x.map_or_else(|| "max".to_string(), |v| v.to_string());
                write_file(&d.join("io.max"), &format!("{dev} rbps={} wbps={}", v(l.read_bps), v(l.write_bps)))
            }
        }
    }

    /// Freeze (true) or thaw (false) every process in the cgroup.
    pub fn set_frozen(&self, path: &str, frozen: bool) -> io::Result<()> {
        let d = self.existing_dir(Controller::Freezer, path)?;
        match self.version {
            Version::V1 => write_file(&d.join("freezer.state"), if frozen { "FROZEN" } else { "THAWED" }),
            Version::V2 => write_file(&d.join("cgroup.freeze"), if frozen { "1" } else { "0" }),
        }
    }

    /// Whether the kernel reports the cgroup fully frozen (v1 FREEZING is not yet).
    pub fn is_frozen(&self, path: &str) -> io::Result<bool> {
        let d = self.existing_dir(Controller::Freezer, path)?;
        match self.version {
            Version::V1 => Ok(read_file(&d.join("freezer.state"))?.trim() == "FROZEN"),
            Version::V2 => Ok(read_file(&d.join("cgroup.events"))?.lines().any(|l| l.trim() == "frozen 1")),
        }
    }
}

/// Every process in a cgroup directory and below it.
pub fn members(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> =
        fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(members(&e.path()));
            }
        }
    }
    out
}

impl CgroupFs {
    /// The processes of cgroup `path` and its children, from the first
    /// hierarchy that has the path (v1 trees may differ per controller).
    pub fn members_of(&self, path: &str) -> Option<Vec<u32>> {
        [Controller::Freezer, Controller::Cpu, Controller::Memory, Controller::CpuAcct, Controller::Io]
            .into_iter()
            .find_map(|c| self.existing_dir(c, path).ok())
            .map(|d| members(&d))
    }
}

/// The whole disk holding a block device: a partition maps to its parent
/// (`/sys/dev/block/M:m/partition` exists), since IO throttling needs a disk.
pub fn whole_disk(sys_dev_block: &Path, dev: &str) -> String {
    let link = sys_dev_block.join(dev);
    if !link.join("partition").exists() {
        return dev.to_string();
    }
    fs::canonicalize(&link)
        .ok()
        .and_then(|p| fs::read_to_string(p.parent()?.join("dev")).ok())
        .map(|t| t.trim().to_string())
        .unwrap_or_else(|| dev.to_string())
}

/// The cgroup path of a process for `controller` (v1) or the unified tree
/// (v2), from the text of `/proc/PID/cgroup`.
pub fn path_of(proc_cgroup: &str, version: Version, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match version {
            Version::V2 => ctrls.is_empty(),
            Version::V1 => ctrls.split(',').any(|c| c == controller),
        };
        hit.then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, text: &str) {
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, text).expect("write");
    }

    #[test]
    fn v1_with_a_comounted_controller() {
        let d = tempfile::tempdir().expect("tempdir");
        write(&d.path().join("cpu,cpuacct/app/cpuacct.usage"), "1500000000\n");
        write(&d.path().join("memory/app/memory.usage_in_bytes"), "4096\n");
        write(&d.path().join("memory/app/memory.limit_in_bytes"), "9223372036854771712\n");
        let cg = CgroupFs::detect(d.path()).expect("detect");
        assert_eq!(cg.version(), Version::V1);
        assert!(cg.exists("/app") && !cg.exists("/nope"));
        assert_eq!(cg.cpu_usage_ns("/app").expect("read"), Some(1_500_000_000));
        assert_eq!(cg.memory_bytes("/app").expect("read"), Some(4096));
        assert_eq!(cg.memory_limit("/app").expect("read"), None, "v1's unlimited");
        assert_eq!(cg.cpu_usage_ns("/nope").expect("read"), None);
    }

    #[test]
    fn v2_unified() {
        let d = tempfile::tempdir().expect("tempdir");
        write(&d.path().join("cgroup.controllers"), "cpu memory io\n");
        write(&d.path().join("svc/cpu.stat"), "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n");
        write(&d.path().join("svc/memory.current"), "8192\n");
        write(&d.path().join("svc/memory.max"), "max\n");
        let cg = CgroupFs::detect(d.path()).expect("detect");
        assert_eq!(cg.version(), Version::V2);
        assert_eq!(cg.cpu_usage_ns("/svc").expect("read"), Some(2_500_000));
        assert_eq!(cg.memory_bytes("/svc").expect("read"), Some(8192));
        assert_eq!(cg.memory_limit("/svc").expect("read"), None);
        write(&d.path().join("svc/memory.max"), "1048576\n");
        assert_eq!(cg.memory_limit("/svc").expect("read"), Some(1_048_576));
        write(&d.path().join("svc/memory.current"), "lots\n");
        assert!(cg.memory_bytes("/svc").expect_err("garbage").to_string().contains("lots"));
    }

    #[test]
    fn v1_knobs_read_what_they_replace_and_restore_it() {
        let d = tempfile::tempdir().expect("tempdir");
        for (f, v) in [
            ("cpu/app/cpu.cfs_quota_us", "-1\n"),
            ("cpu/app/cpu.cfs_period_us", "100000\n"),
            ("memory/app/memory.limit_in_bytes", "9223372036854771712\n"),
            ("memory/app/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),
            ("blkio/app/blkio.throttle.read_bps_device", "8:0 100\n"),
            ("blkio/app/blkio.throttle.write_bps_device", ""),
            ("freezer/app/freezer.state", "THAWED\n"),
            ("freezer/app/cgroup.procs", "10\n11\n"),
        ] {
            write(&d.path().join(f), v);
        }
        let cg = CgroupFs::detect(d.path()).expect("detect");
        let q = cg.cpu_quota("/app").expect("quota");
        assert_eq!(q, CpuQuota { quota_us: None, period_us: 100_000 });
        cg.set_cpu_quota("/app", CpuQuota { quota_us: Some(50_000), period_us: 100_000 }).expect("set");
        assert_eq!(fs::read_to_string(d.path().join("cpu/app/cpu.cfs_quota_us")).expect("read"), "50000");
        assert_eq!(cg.memory_limit_text("/app").expect("mem"), "-1");
        assert_eq!(cg.oom_kills("/app"), Some(3));
        assert_eq!(cg.io_limits("/app", "8:0").expect("io"), IoLimits { read_bps: Some(100), write_bps: None });
        assert_eq!(cg.io_limits("/app", "8:1").expect("io"), IoLimits::default());
        cg.set_io_limits("/app", "8:0", IoLimits { read_bps: None, write_bps: Some(7) }).expect("set io");
        assert_eq!(fs::read_to_string(d.path().join("blkio/app/blkio.throttle.write_bps_device")).expect("read"), "8:0 7");
        cg.set_frozen("/app", true).expect("freeze");
        assert!(cg.is_frozen("/app").expect("state"));
        assert_eq!(cg.processes(Controller::Freezer, "/app").expect("procs"), vec![10, 11]);
        assert!(cg.create(Controller::Cpu, "/chaos-x").expect("create"));
        assert!(!cg.create(Controller::Cpu, "/chaos-x").expect("exists"));
        assert!(cg.remove(Controller::Cpu, "/chaos-x").expect("remove"));
        assert!(!cg.remove(Controller::Cpu, "/chaos-x").expect("gone"));
        let e = cg.cpu_quota("/nope").expect_err("missing");
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn v2_knobs() {
        let d = tempfile::tempdir().expect("tempdir");
        write(&d.path().join("cgroup.controllers"), "cpu memory io\n");
        write(&d.path().join("cgroup.subtree_control"), "memory\n");
        write(&d.path().join("svc/cpu.max"), "max 100000\n");
        write(&d.path().join("svc/memory.max"), "max\n");
        write(&d.path().join("svc/memory.events"), "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n");
        write(&d.path().join("svc/io.max"), "8:0 rbps=1000 wbps=max riops=max wiops=max\n");
        write(&d.path().join("svc/cgroup.events"), "populated 1\nfrozen 0\n");
        let cg = CgroupFs::detect(d.path()).expect("detect");
        assert_eq!(cg.cpu_quota("/svc").expect("q"), CpuQuota { quota_us: None, period_us: 100_000 });
        cg.set_cpu_quota("/svc", CpuQuota { quota_us: Some(25_000), period_us: 100_000 }).expect("set");
        assert_eq!(fs::read_to_string(d.path().join("svc/cpu.max")).expect("read"), "25000 100000");
        assert_eq!(cg.cpu_quota("/svc").expect("q").quota_us, Some(25_000));
        assert_eq!(cg.memory_limit_text("/svc").expect("mem"), "max");
        assert_eq!(cg.oom_kills("/svc"), Some(1));
        assert_eq!(cg.io_limits("/svc", "8:0").expect("io"), IoLimits { read_bps: Some(1000), write_bps: None });
        cg.set_io_limits("/svc", "8:0", IoLimits { read_bps: None, write_bps: Some(5) }).expect("set io");
        assert_eq!(fs::read_to_string(d.path().join("svc/io.max")).expect("read"), "8:0 rbps=max wbps=5");
        assert!(!cg.is_frozen("/svc").expect("state"));
        cg.set_frozen("/svc", true).expect("freeze");
        assert_eq!(fs::read_to_string(d.path().join("svc/cgroup.freeze")).expect("read"), "1");
        // Creating a cgroup enables the controller in its parent.
        assert!(cg.create(Controller::Cpu, "/chaos-y").expect("create"));
        assert_eq!(fs::read_to_string(d.path().join("cgroup.subtree_control")).expect("read"), "+cpu");
    }

    #[test]
    fn a_partition_maps_to_its_disk() {
        let d = tempfile::tempdir().expect("tempdir");
        let disk = d.path().join("devices/vda");
        write(&disk.join("dev"), "254:0\n");
        write(&disk.join("vda1/partition"), "1\n");
        let blk = d.path().join("block");
        fs::create_dir_all(&blk).expect("mkdir");
        std::os::unix::fs::symlink(&disk, blk.join("254:0")).expect("link");
        std::os::unix::fs::symlink(disk.join("vda1"), blk.join("254:1")).expect("link");
        assert_eq!(whole_disk(&blk, "254:1"), "254:0");
        assert_eq!(whole_disk(&blk, "254:0"), "254:0");
    }

    #[test]
    fn path_of_a_process() {
        let v1 = "4:memory:/process_api/x\n2:cpu,cpuacct:/app\n0::/\n";
        assert_eq!(path_of(v1, Version::V1, "cpuacct").as_deref(), Some("/app"));
        assert_eq!(path_of(v1, Version::V1, "memory").as_deref(), Some("/process_api/x"));
        assert_eq!(path_of("0::/system.slice/kafka.service\n", Version::V2, "cpu").as_deref(), Some("/system.slice/kafka.service"));
    }
}
