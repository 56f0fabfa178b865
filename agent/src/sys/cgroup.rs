//! cgroups, v1 and v2, behind one small reader with an injectable root
//! (`/sys/fs/cgroup`) so it is unit-tested against a tempdir fake.
//!
//! v1 (this CI VM): one hierarchy per controller, possibly co-mounted
//! (`cpu,cpuacct`). v2 (most production hosts): one unified tree.
//! Paths are cgroup paths as in `/proc/PID/cgroup` ("/system.slice/x").

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
    fn path_of_a_process() {
        let v1 = "4:memory:/process_api/x\n2:cpu,cpuacct:/app\n0::/\n";
        assert_eq!(path_of(v1, Version::V1, "cpuacct").as_deref(), Some("/app"));
        assert_eq!(path_of(v1, Version::V1, "memory").as_deref(), Some("/process_api/x"));
        assert_eq!(path_of("0::/system.slice/kafka.service\n", Version::V2, "cpu").as_deref(), Some("/system.slice/kafka.service"));
    }
}
