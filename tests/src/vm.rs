//! A throwaway VM with a stock distribution kernel, for the kernel paths this
//! machine's kernel lacks (sch_netem, cgroup v2): the harness takes Debian's
//! `linux-image-*` package (downloaded with `apt-get download`, extracted
//! with `dpkg-deb -x`: the host's own kernel and boot configuration are never
//! touched), builds an initramfs of busybox-static, iproute2, nftables,
//! iptables, iputils-ping and util-linux (with the libraries `ldd` names),
//! the kernel modules the faults need (with their dependencies, read from
//! each module's `.modinfo`), and the workspace binaries, boots it under
//! `qemu-system-x86_64 -accel tcg`, runs one program inside, streams the
//! serial console back, and powers off.
//!
//! - **Bounded**: QEMU is killed at the deadline and on drop ([`Qemu`]); a
//!   boot that never reaches the program, a kernel panic or a timeout is an
//!   error carrying the whole console log.
//! - **Cached** under [`cache_dir`] (`/var/cache/chaos-vm`, or
//!   `CHAOS_VM_CACHE`): the downloaded package, the extracted kernel, the
//!   base archive (busybox, tools, modules, `/init`; rebuilt when any input
//!   changes) and stripped copies of the binaries. Only the small archive of
//!   workspace binaries is written per run, into a temporary directory, and
//!   concatenated to the base (the kernel unpacks concatenated archives).
//! - **Busybox never shadows the real tools**: applet links are made only
//!   for names the image does not ship a real binary for (`ip`, `tc`,
//!   `ping`, `nsenter`, `unshare`, `dd`, `iptables*`, `nft`), and `sh` is
//!   dash: busybox's own shell would run its applets before anything on PATH.
//!
//! Another kernel: `CHAOS_VM_KERNEL_DEB=/path/linux-image-….deb` (any Debian
//! kernel package with uncompressed modules) or
//! `CHAOS_VM_KERNEL_PACKAGE=linux-image-…` (fetched with `apt-get download`).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    hash::{Hash, Hasher},
    io::{BufRead, BufReader, Write},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// The Debian metapackage followed when no kernel is named.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// Printed by `/init` once the kernel is up and the modules are in.
pub const BOOTED: &str = "CHAOS-VM-BOOTED";
/// Printed by `/init` with the program's exit status after it returns.
pub const EXIT: &str = "CHAOS-VM-EXIT";

/// Kernel modules loaded at boot (their dependencies are added and ordered).
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_rng",
    "veth",
    "ifb",
    "sch_netem",
    "sch_htb",
    "sch_tbf",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    "nf_tables",
    "nft_numgen",
    "nft_limit",
    "nft_reject_inet",
    "nft_ct",
    "nft_compat",
    "nft_queue",
    "nfnetlink_queue",
    "xt_NFQUEUE",
    "xt_statistic",
    "xt_mark",
    "xt_tcpudp",
    "xt_comment",
];

/// Host programs copied in (with their `ldd` libraries), by the path they are found at.
const TOOLS: &[&str] = &[
    "/usr/bin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/nft",
    "/usr/sbin/xtables-nft-multi",
    "/usr/bin/ping",
    "/usr/bin/nsenter",
    "/usr/bin/unshare",
    "/usr/bin/dd",
    // `sh`: busybox's ash runs its own applets before PATH (so `sh -c 'tc …'` would get
    // busybox's tc); dash has no applets.
    "/usr/bin/dash",
];

/// iptables names, all links to xtables-nft-multi (the host's iptables is iptables-nft).
const XTABLES_LINKS: &[&str] =
    &["iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore", "iptables-nft"];

/// Directories copied whole (plugins loaded with dlopen, which `ldd` cannot see).
const TOOL_DIRS: &[&str] = &["/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/x86_64-linux-gnu/tc"];

/// Where the harness keeps what it downloads and builds.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CHAOS_VM_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/chaos-vm"))
}

/// A kernel extracted from its package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-57-cloud-amd64`.
    pub version: String,
    /// The package file it came from.
    pub package: PathBuf,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the extracted package.
    pub modules: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package named by `CHAOS_VM_KERNEL_DEB` / `CHAOS_VM_KERNEL_PACKAGE`,
/// else the one [`DEFAULT_KERNEL_PACKAGE`] depends on, downloaded into the cache once.
pub fn kernel_package(cache: &Path) -> Result<PathBuf> {
    if let Some(deb) = std::env::var_os("CHAOS_VM_KERNEL_DEB") {
        let deb = PathBuf::from(deb);
        if !deb.is_file() {
            bail!("CHAOS_VM_KERNEL_DEB={}: no such file", deb.display());
        }
        return Ok(deb);
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("mkdir {}", debs.display()))?;
    let name = match std::env::var("CHAOS_VM_KERNEL_PACKAGE") {
        Ok(n) => n,
        Err(_) => {
            // The metapackage only depends on the versioned image package.
            let deps = run(Command::new("apt-cache").args(["depends", "--important", DEFAULT_KERNEL_PACKAGE]))?;
            deps.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends:"))
                .map(|d| d.trim().to_string())
                .find(|d| d.starts_with("linux-image-"))
                .ok_or_else(|| anyhow!("apt-cache depends {DEFAULT_KERNEL_PACKAGE}: no linux-image dependency in:\n{deps}"))?
        }
    };
    let find = || -> Option<PathBuf> {
        let prefix = format!("{name}_");
        let mut found: Vec<PathBuf> = fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with(&prefix) && f.ends_with(".deb")))
            .collect();
        found.sort();
        found.pop()
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    run(Command::new("apt-get").args(["download", "-q", &name]).current_dir(&debs))
        .with_context(|| format!("downloading {name} (apt-get download)"))?;
    find().ok_or_else(|| anyhow!("apt-get download {name} left no {name}_*.deb in {}", debs.display()))
}

/// Extract `deb` under the cache (once per package file) and find its kernel and modules.
pub fn extract_kernel(cache: &Path, deb: &Path) -> Result<Kernel> {
    let stem = deb.file_stem().and_then(|s| s.to_str()).ok_or_else(|| anyhow!("odd package name {}", deb.display()))?;
    let dir = cache.join("kernels").join(stem);
    if !dir.join(".done").exists() {
        let tmp = cache.join("kernels").join(format!(".{stem}.{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("mkdir {}", tmp.display()))?;
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
        fs::write(tmp.join(".done"), "")?;
        if dir.join(".done").exists() {
            // Another run (another worktree) extracted it meanwhile: keep theirs, it may be in use.
            let _ = fs::remove_dir_all(&tmp);
        } else {
            let _ = fs::remove_dir_all(&dir);
            fs::rename(&tmp, &dir).with_context(|| format!("rename to {}", dir.display()))?;
        }
    }
    let boot = dir.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{}: no boot/ in the package", deb.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("vmlinuz-")))
        .ok_or_else(|| anyhow!("{}: no boot/vmlinuz-*", deb.display()))?;
    let version = vmlinuz
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix("vmlinuz-"))
        .ok_or_else(|| anyhow!("odd kernel name {}", vmlinuz.display()))?
        .to_string();
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| dir.join(m).join(&version))
        .find(|m| m.is_dir())
        .ok_or_else(|| anyhow!("{}: no lib/modules/{version}", deb.display()))?;
    Ok(Kernel { version, package: deb.to_path_buf(), vmlinuz, modules })
}

/// Index of `modules` (`kernel/…/name.ko` by module name, `-` and `_` alike).
fn module_index(modules: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_suffix(".ko")) {
                index.insert(name.replace('-', "_"), p);
            }
        }
    }
    Ok(index)
}

/// `depends=` of a module, read from its `.modinfo` strings.
fn module_depends(ko: &Path) -> Result<Vec<String>> {
    let bytes = fs::read(ko).with_context(|| format!("reading {}", ko.display()))?;
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else { return Ok(vec![]) };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end]).split(',').filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect())
}

/// `wanted` and everything they depend on, each after its dependencies.
pub fn module_load_order(modules: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let index = module_index(modules)?;
    if index.is_empty() {
        bail!("{}: no uncompressed .ko modules (compressed modules are not supported yet)", modules.display());
    }
    let mut order = vec![];
    let mut done = HashSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        done: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if depth > 64 {
            bail!("module dependency loop at {name}");
        }
        // Built into this kernel (no .ko): nothing to load.
        let Some(ko) = index.get(name) else { return Ok(()) };
        for dep in module_depends(ko)? {
            visit(&dep, index, done, order, depth + 1)?;
        }
        done.insert(name.to_string());
        order.push(ko.clone());
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &mut done, &mut order, 0)?;
    }
    Ok(order)
}

/// A `newc` cpio archive (written by the `cpio` crate) as files are added,
/// each parent directory once, before what it holds.
pub struct Cpio<W: Write> {
    /// `None` only while an entry is being written.
    out: Option<W>,
    ino: u32,
    seen: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio { out: Some(out), ino: 1, seen: BTreeSet::new() }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let out = self.out.take().context("a failed entry left the archive unusable")?;
        let size = u32::try_from(data.len()).with_context(|| format!("{name}: too big for a newc archive"))?;
        let mut w = cpio::newc::Builder::new(name.trim_start_matches('/')).ino(self.ino).mode(mode).nlink(1).write(out, size);
        self.ino += 1;
        w.write_all(data)?;
        self.out = Some(w.finish()?);
        Ok(())
    }

    /// A directory and its parents (each once).
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let path = path.trim_matches('/');
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if self.seen.insert(at.clone()) {
                self.entry(&at.clone(), 0o040755, &[])?;
            }
        }
        Ok(())
    }

    fn parent(&mut self, path: &str) -> Result<()> {
        match path.trim_start_matches('/').rsplit_once('/') {
            Some((p, _)) => self.dir(p),
            None => Ok(()),
        }
    }

    /// A regular file with these bytes.
    pub fn bytes(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.parent(path)?;
        self.seen.insert(path.trim_start_matches('/').to_string());
        self.entry(path, 0o100000 | mode, data)
    }

    /// A copy of host file `src` (symlinks followed) at `path`.
    pub fn file(&mut self, path: &str, src: &Path) -> Result<()> {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let mode = fs::metadata(src)?.permissions().mode() & 0o7777;
        self.bytes(path, mode, &data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parent(path)?;
        self.seen.insert(path.trim_start_matches('/').to_string());
        self.entry(path, 0o120777, target.as_bytes())
    }

    pub fn contains(&self, path: &str) -> bool {
        self.seen.contains(path.trim_start_matches('/'))
    }

    /// The trailer; returns the writer.
    pub fn finish(mut self) -> Result<W> {
        let out = self.out.take().context("a failed entry left the archive unusable")?;
        let mut out = cpio::newc::trailer(out)?;
        out.flush()?;
        Ok(out)
    }
}

/// The libraries `ldd` lists for `bin` (none for a static binary).
pub fn ldd(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().with_context(|| format!("ldd {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/'))).map(PathBuf::from).filter(|p| p.exists()).collect())
}

/// Add `bin` at `path` and its libraries at their own paths (once each).
fn add_with_libs<W: Write>(cpio: &mut Cpio<W>, path: &str, bin: &Path) -> Result<()> {
    cpio.file(path, bin)?;
    for lib in ldd(bin)? {
        let at = lib.display().to_string();
        if !cpio.contains(&at) {
            cpio.file(&at, &lib)?;
        }
    }
    Ok(())
}

/// The `/init` of the image: mounts, cgroup v2 with its controllers, modules,
/// loopback, then the program named on the kernel command line (`chaos.run=`),
/// its exit status, and power off.
fn init_script(modules_dir: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /var/tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo /sbin/modprobe > /proc/sys/kernel/modprobe
while read -r m; do insmod {modules_dir}/$m 2>/tmp/insmod.err || echo "CHAOS-VM insmod $m: $(cat /tmp/insmod.err)"; done < /etc/chaos-vm/modules
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control; done
ip link set lo up
hostname chaos-vm
dmesg -n 1
echo "{BOOTED} $(uname -r) uptime $(cut -d' ' -f1 /proc/uptime) s; cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
prog=$(sed -n 's/.*chaos\.run=\([^ ]*\).*/\1/p' /proc/cmdline)
args=$(sed -n 's/.*chaos\.args=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
cd /tmp
CHAOS_VM=1 RUST_BACKTRACE=1 $prog $args
echo "{EXIT} $?"
sync
poweroff -f
"#
    )
}

/// A stable fingerprint of files by path, size and mtime.
fn fingerprint(h: &mut impl Hasher, paths: &[PathBuf]) {
    for p in paths {
        p.hash(h);
        if let Ok(m) = fs::metadata(p) {
            (m.len(), m.mtime(), m.mtime_nsec()).hash(h);
        }
    }
}

/// The cached base archive for `kernel`: busybox, the tools, the modules and `/init`.
pub fn base_archive(cache: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox not found: install busybox-static");
    }
    for t in TOOLS {
        if !Path::new(t).exists() {
            bail!("{t} not found: install iproute2, nftables, iptables, iputils-ping and util-linux");
        }
    }
    let order = module_load_order(&kernel.modules, MODULES)?;
    let mut inputs: Vec<PathBuf> = vec![busybox.clone(), kernel.package.clone()];
    inputs.extend(TOOLS.iter().map(PathBuf::from));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fingerprint(&mut h, &inputs);
    (MODULES, TOOLS, XTABLES_LINKS, TOOL_DIRS, init_script("")).hash(&mut h);
    let path = cache.join(format!("base-{}-{:016x}.cpio", kernel.version, h.finish()));
    if path.exists() {
        return Ok(path);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    for d in ["proc", "sys", "dev", "tmp", "run", "var/tmp", "root", "etc", "usr/bin", "usr/sbin", "bin", "sbin"] {
        cpio.dir(d)?;
    }
    for t in TOOLS {
        add_with_libs(&mut cpio, t, Path::new(t))?;
    }
    cpio.symlink("bin/sh", "/usr/bin/dash")?;
    for l in XTABLES_LINKS {
        cpio.symlink(&format!("usr/sbin/{l}"), "xtables-nft-multi")?;
    }
    for d in TOOL_DIRS {
        for e in fs::read_dir(d).with_context(|| format!("reading {d}"))?.flatten() {
            let p = e.path();
            if p.is_file() {
                add_with_libs(&mut cpio, &p.display().to_string(), &p)?;
            }
        }
    }
    // Busybox applets, except where a real tool of that name is in the image.
    let shipped: HashSet<String> = TOOLS
        .iter()
        .filter_map(|t| Path::new(t).file_name()?.to_str().map(String::from))
        .chain(XTABLES_LINKS.iter().map(|s| s.to_string()))
        .chain(["sh".to_string()])
        .collect();
    cpio.file("bin/busybox", &busybox)?;
    let applets = run(Command::new(&busybox).arg("--list-full"))?;
    for a in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let name = a.rsplit('/').next().unwrap_or(a);
        if shipped.contains(name) || cpio.contains(a) || a == "bin/busybox" {
            continue;
        }
        cpio.symlink(a, "/bin/busybox")?;
    }
    let mdir = format!("lib/modules/{}", kernel.version);
    let mut list = String::new();
    let mut dep = String::new();
    for ko in &order {
        let rel = ko.strip_prefix(&kernel.modules).map_err(|_| anyhow!("module outside its tree: {}", ko.display()))?;
        let rel = rel.display().to_string();
        cpio.file(&format!("{mdir}/{rel}"), ko)?;
        list.push_str(&rel);
        list.push('\n');
        let deps: Vec<String> = module_depends(ko)?
            .iter()
            .filter_map(|d| order.iter().find(|o| o.file_stem().and_then(|f| f.to_str()).is_some_and(|f| f.replace('-', "_") == *d)))
            .filter_map(|o| o.strip_prefix(&kernel.modules).ok().map(|r| r.display().to_string()))
            .collect();
        dep.push_str(&format!("{rel}: {}\n", deps.join(" ")));
    }
    cpio.bytes(&format!("{mdir}/modules.dep"), 0o644, dep.as_bytes())?;
    cpio.bytes("etc/chaos-vm/modules", 0o644, list.as_bytes())?;
    cpio.bytes("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")?;
    cpio.bytes("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    cpio.bytes("etc/hosts", 0o644, b"127.0.0.1 localhost chaos-vm\n")?;
    cpio.bytes("etc/nsswitch.conf", 0o644, b"hosts: files\n")?;
    cpio.bytes("init", 0o755, init_script(&format!("/{mdir}")).as_bytes())?;
    cpio.finish()?;
    fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(path)
}

/// A copy of `bin` without debug info, cached by its size and mtime (the
/// debug builds are 50–110 MB each; stripped they unpack in a fraction of the time).
/// Copies not made for a day are removed (not sooner: another worktree may be booting one).
pub fn stripped(cache: &Path, bin: &Path) -> Result<PathBuf> {
    let name = bin.file_name().and_then(|f| f.to_str()).ok_or_else(|| anyhow!("odd binary name {}", bin.display()))?;
    let m = fs::metadata(bin).with_context(|| format!("{} not found: build the workspace binaries first", bin.display()))?;
    let dir = cache.join("stripped");
    fs::create_dir_all(&dir)?;
    let out = dir.join(format!("{name}-{}-{}", m.len(), m.mtime()));
    if out.exists() {
        return Ok(out);
    }
    for e in fs::read_dir(&dir)?.flatten() {
        let made = e.metadata().and_then(|m| m.modified()).ok();
        if made.and_then(|t| t.elapsed().ok()).is_some_and(|age| age > Duration::from_secs(24 * 3600)) {
            let _ = fs::remove_file(e.path());
        }
    }
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    if run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&tmp).arg(bin)).is_err() {
        fs::copy(bin, &tmp)?;
    }
    fs::rename(&tmp, &out)?;
    Ok(out)
}

/// What to boot and run.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Binaries put in `/chaos/bin` (stripped), by their host paths.
    pub binaries: Vec<PathBuf>,
    /// The program to run, e.g. `/chaos/bin/chaos-vm-suite`.
    pub program: String,
    /// Its arguments (no spaces or commas).
    pub args: Vec<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// A sparse raw disk of this size as `/dev/vda` (virtio-blk), or none.
    pub disk_mib: Option<u32>,
    /// From QEMU's start to the program's exit status.
    pub timeout: Duration,
}

/// What one boot gave.
#[derive(Debug, Clone)]
pub struct VmRun {
    pub kernel: Kernel,
    /// The whole serial console.
    pub console: String,
    /// The program's exit status (None if it never returned).
    pub exit: Option<i32>,
    /// From QEMU's start to the boot line.
    pub boot: Option<Duration>,
    pub total: Duration,
}

/// QEMU, killed (and reaped) on drop.
pub struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prepare the kernel and base image (cached), then boot `spec` and return the console.
/// A run that never reaches the program's exit status is an `Err` holding the console log.
pub fn boot(spec: &VmSpec) -> Result<VmRun> {
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("mkdir {}", cache.display()))?;
    let deb = kernel_package(&cache)?;
    let kernel = extract_kernel(&cache, &deb)?;
    let base = base_archive(&cache, &kernel)?;
    let work = tempfile::tempdir().context("tempdir")?;
    let initrd = work.path().join("initrd.cpio");
    fs::copy(&base, &initrd).with_context(|| format!("copying {}", base.display()))?;
    {
        let file = fs::OpenOptions::new().append(true).open(&initrd)?;
        let mut cpio = Cpio::new(std::io::BufWriter::new(file));
        for b in &spec.binaries {
            let name = b.file_name().and_then(|f| f.to_str()).ok_or_else(|| anyhow!("odd binary {}", b.display()))?;
            add_with_libs(&mut cpio, &format!("chaos/bin/{name}"), &stripped(&cache, b)?)?;
        }
        cpio.finish()?;
    }
    let qemu_bin = "qemu-system-x86_64";
    let mut cmd = Command::new(qemu_bin);
    let append = format!("console=ttyS0 rdinit=/init panic=-1 quiet chaos.run={} chaos.args={}", spec.program, spec.args.join(","));
    cmd.args(["-accel", "tcg", "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-m", &spec.memory_mib.to_string(), "-smp", &spec.cpus.to_string()])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .args(["-device", "virtio-rng-pci"]);
    if let Some(mib) = spec.disk_mib {
        let disk = work.path().join("disk.img");
        fs::File::create(&disk)?.set_len(u64::from(mib) << 20)?;
        cmd.arg("-drive").arg(format!("file={},if=virtio,format=raw,cache=unsafe", disk.display()));
    }
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {qemu_bin} (Debian package qemu-system-x86)"))?;
    let mut qemu = Qemu(child);
    let console = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel::<String>();
    for stream in
        [qemu.0.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), qemu.0.stderr.take().map(|s| Box::new(s) as _)]
            .into_iter()
            .flatten()
    {
        let (console, tx) = (console.clone(), tx.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                eprintln!("vm| {line}");
                if let Ok(mut c) = console.lock() {
                    c.push_str(&line);
                    c.push('\n');
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let deadline = started + spec.timeout;
    let (mut boot_at, mut exit) = (None, None);
    let mut why = None;
    while exit.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            why = Some(format!("timed out after {:?}", spec.timeout));
            break;
        }
        match rx.recv_timeout(left) {
            Ok(line) => {
                if boot_at.is_none() && line.contains(BOOTED) {
                    boot_at = Some(started.elapsed());
                }
                if let Some(code) = line.strip_prefix(EXIT).and_then(|c| c.trim().parse::<i32>().ok()) {
                    exit = Some(code);
                }
                if line.contains("Kernel panic") {
                    why = Some("the kernel panicked".into());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                why = Some(format!("QEMU exited ({:?}) before the program's exit status", qemu.0.try_wait().ok().flatten()));
                break;
            }
        }
    }
    // After the exit status, give it a moment to power off by itself; on a failure, kill it now.
    let off = Instant::now() + if exit.is_some() { Duration::from_secs(10) } else { Duration::ZERO };
    while Instant::now() < off && matches!(qemu.0.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(qemu);
    let total = started.elapsed();
    let console = console.lock().map(|c| c.clone()).unwrap_or_default();
    if let (None, Some(why)) = (exit, why) {
        bail!("VM run failed: {why} (kernel {}, {:?} since QEMU started)\n---- console ----\n{console}", kernel.version, total);
    }
    Ok(VmRun { kernel, console, exit, boot: boot_at, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back a newc archive: (name, mode, data) of each entry before the trailer.
    fn entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let (mut at, mut out) = (0, vec![]);
        loop {
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).expect("hex"), 16).expect("hex")
            };
            assert_eq!(&bytes[at..at + 6], b"070701", "entry at {at}");
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = String::from_utf8(bytes[at + 110..at + 110 + namesize - 1].to_vec()).expect("name");
            let data_at = (at + 110 + namesize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!((data_at + size) % 4, 0);
                return out;
            }
            out.push((name, mode, bytes[data_at..data_at + size].to_vec()));
            at = (data_at + size).next_multiple_of(4);
        }
    }

    #[test]
    fn the_archive_is_newc_with_parents_first_and_four_byte_alignment() {
        let mut c = Cpio::new(Vec::new());
        c.bytes("etc/chaos-vm/modules", 0o644, b"abc").expect("file");
        c.symlink("bin/sh", "/usr/bin/dash").expect("link");
        c.bytes("/init", 0o755, b"#!/bin/busybox sh\n").expect("init");
        let bytes = c.finish().expect("finish");
        assert_eq!(bytes.len() % 4, 0);
        let got: Vec<(String, u32, Vec<u8>)> = entries(&bytes);
        let names: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["etc", "etc/chaos-vm", "etc/chaos-vm/modules", "bin", "bin/sh", "init"]);
        assert_eq!(got[2], ("etc/chaos-vm/modules".into(), 0o100644, b"abc".to_vec()));
        assert_eq!(got[4], ("bin/sh".into(), 0o120777, b"/usr/bin/dash".to_vec()));
        assert_eq!(got[0].1, 0o040755);
    }

    #[test]
    fn module_dependencies_come_from_modinfo_and_load_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = dir.path().join("kernel/net/sched");
        fs::create_dir_all(&k).expect("mkdir");
        // .modinfo strings as the kernel build leaves them, NUL-separated inside the ELF.
        fs::write(k.join("sch_netem.ko"), b"\x7fELF...\0license=GPL\0depends=\0name=sch_netem\0").expect("ko");
        fs::write(k.join("act_mirred.ko"), b"\x7fELF\0depends=nf-tables,sch_netem\0name=act_mirred\0").expect("ko");
        fs::write(k.join("nf_tables.ko"), b"\x7fELF\0depends=\0").expect("ko");
        let order = module_load_order(dir.path(), &["act_mirred", "built_in_thing"]).expect("order");
        let names: Vec<&str> = order.iter().filter_map(|p| p.file_name()?.to_str()).collect();
        assert_eq!(names, ["nf_tables.ko", "sch_netem.ko", "act_mirred.ko"], "dependencies first; a module built in is skipped");
    }
}
