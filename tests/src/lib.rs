//! Harness for end-to-end tests and benchmarks: start the real binaries
//! (or in-process servers) on loopback, spawn victim processes, and tear
//! everything down on drop — even when a test panics.
//!
//! Guards:
//! - [`Daemon`]: a spawned `chaos-agent` / `chaos-coordinator`; dropped with
//!   SIGTERM (so an agent reverts its faults), SIGKILL after 5 s.
//! - [`Victim`]: a `sleep` process to fault; dropped with SIGKILL (which
//!   also ends a stopped process).
//!
//! Trust: every daemon and every `chaos` call runs over mTLS with
//! certificates of one test CA made per test process ([`pki`]); `chaos()`
//! calls as an admin (`e2e-admin`) unless the test names another identity
//! ([`chaos_as`]).

pub mod fuzz;
pub mod vm;

use std::{
    collections::HashMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use chaos_proto::trust::{
    Identity, Role,
    certs::{Request, init_ca_dir, issue_to_dir},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Directory holding the workspace binaries (next to this test executable).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary> -> target/<profile>
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not found: build the workspace binaries first (cargo build --workspace --bins)", p.display());
    p
}

/// A free loopback port (bound then released; a tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("addr").port()
}

/// A spawned daemon, stopped on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Daemon {
    /// Spawn `bin(name)` with `args`, logging to `log`.
    pub fn spawn(name: &str, args: &[String], log: PathBuf) -> Daemon {
        Self::spawn_program(bin(name), args, log)
    }

    /// Spawn workspace binary `name` inside network namespace `ns` (`ip
    /// netns exec` execs, so the pid stays the daemon's).
    pub fn spawn_in_netns(ns: &str, name: &str, args: &[String], log: PathBuf) -> Daemon {
        let mut argv = vec!["netns".to_string(), "exec".into(), ns.to_string(), bin(name).display().to_string()];
        argv.extend_from_slice(args);
        Self::spawn_program("ip", &argv, log)
    }

    /// Spawn any program (e.g. `ip netns exec NS BIN ...`, which execs, so the pid stays the daemon's).
    pub fn spawn_program(program: impl AsRef<std::ffi::OsStr>, args: &[String], log: PathBuf) -> Daemon {
        let name = program.as_ref().to_string_lossy().into_owned();
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("clone log");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Daemon { child: Some(child), name: name.to_string(), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// SIGKILL now (a crash), and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to `timeout` for exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    /// Stop it, then fail the test if the daemon ever panicked (a handler
    /// answering INTERNAL after a panic would otherwise pass unseen).
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
        if std::thread::panicking() {
            return;
        }
        assert_no_panic(&self.name, &self.log);
    }
}

/// Fail the test if the daemon log at `log` shows a panic (quoting its line).
pub fn assert_no_panic(name: &str, log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if let Some(at) = text.find("panicked at") {
        let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let line = text[from..].lines().next().unwrap_or_default();
        panic!("{name} panicked during the test ({}):\n{line}", log.display());
    }
}

/// A process to fault (`sleep 600`), killed on drop.
pub struct Victim {
    child: Child,
}

impl Victim {
    pub fn spawn() -> Victim {
        Self::spawn_program(std::path::Path::new("sleep"), "sleep")
    }

    /// Run `program 600` (a copy of `sleep` under another name) and wait
    /// until it has exec'd, so that name matching sees `comm`.
    pub fn spawn_program(program: &std::path::Path, comm: &str) -> Victim {
        let child = Command::new(program).arg("600").stdin(Stdio::null()).spawn().expect("spawn victim");
        let v = Victim { child };
        assert!(wait_until(Duration::from_secs(5), || proc_comm(v.pid()).as_deref() == Some(comm)), "victim never became {comm}");
        v
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One-letter state from /proc/PID/stat (T = stopped).
    pub fn state(&self) -> char {
        proc_state(self.pid()).unwrap_or('?')
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// State letter of a process, or `None` when it is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_string())
}

/// Mean, standard deviation and lag-1 autocorrelation of a series (the last about 0 for
/// independent draws, `c` for a chain whose draws follow each other with correlation `c`).
pub fn moments(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let lag1 = v.windows(2).map(|w| (w[0] - mean) * (w[1] - mean)).sum::<f64>() / (n - 1.0) / var;
    (mean, var.sqrt(), lag1)
}

/// Lag-1 autocorrelation of the series' ranks (Spearman's). The delay engine's chain draws
/// uniform delays whose ranks follow each other with correlation `c` by construction, so this is
/// `c` for its series; unlike [`moments`]' figure, one reply late by a stall of the machine moves
/// one rank, not the whole figure (a 100 ms stall among 300 draws of sd 11.5 cuts Pearson's 0.75
/// to about 0.6).
pub fn rank_lag1(v: &[f64]) -> f64 {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        // Ties share their mean rank.
        let j = (i..order.len()).take_while(|&k| v[order[k]] == v[order[i]]).last().unwrap_or(i);
        for &at in &order[i..=j] {
            ranks[at] = (i + j) as f64 / 2.0;
        }
        i = j + 1;
    }
    moments(&ranks).2
}

/// Pin the calling thread to CPU 0, so that the processes it starts from now on (agents, traffic)
/// run there too: they inherit its affinity. Other test threads are left alone.
pub fn pin_to_one_cpu() {
    let mut one = nix::sched::CpuSet::new();
    one.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("sched_setaffinity to cpu 0");
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The test process's CA and the certificates issued with it, each in a
/// directory of its own (ca.pem, cert.pem, key.pem: a `--tls-dir`). Lives
/// under the system temp dir; an `atexit` hook removes it when the test
/// process exits (a static is never dropped).
pub struct Pki {
    root: PathBuf,
    issued: Mutex<HashMap<String, PathBuf>>,
}

/// The process-wide test PKI.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("chaos-e2e-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        init_ca_dir(&root.join("ca"), "e2e", Duration::from_secs(7 * 24 * 3600)).expect("test CA");
        extern "C" fn remove_pki() {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("chaos-e2e-pki-{}", std::process::id())));
        }
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { nix::libc::atexit(remove_pki) };
        Pki { root, issued: Mutex::new(HashMap::new()) }
    })
}

/// The admin identity `chaos()` calls as.
pub const ADMIN: &str = "e2e-admin";
/// The coordinator identity of `start_coordinator*`.
pub const COORDINATOR: &str = "e2e-coordinator";

impl Pki {
    /// The CA's directory (ca.pem, ca.key).
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// A `--tls-dir` for `role`/`name` (issued on first use, valid a day),
    /// with extra SANs for service roles.
    pub fn dir_with(&self, role: Role, name: &str, sans: &[&str]) -> PathBuf {
        let key = format!("{role}-{name}-{}", sans.join("_"));
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = issued.get(&key) {
            return d.clone();
        }
        let dir = self.root.join(&key);
        let req = Request::new(
            Identity::new(role, name).expect("test identity"),
            sans.iter().map(|s| s.to_string()).collect(),
            Duration::from_secs(24 * 3600),
        );
        issue_to_dir(&self.ca_dir(), &req, &dir, false).expect("issue test certificate");
        issued.insert(key, dir.clone());
        dir
    }

    /// A `--tls-dir` for `role`/`name`.
    pub fn dir(&self, role: Role, name: &str) -> PathBuf {
        self.dir_with(role, name, &[])
    }

    /// The admin's directory (what `chaos()` uses).
    pub fn admin(&self) -> PathBuf {
        self.dir(Role::Admin, ADMIN)
    }

    /// Issue `req` with the CA in `ca_dir` into `out` (replacing what is
    /// there): for certificates a test shapes itself (expired, another CA,
    /// renewed in place); never cached.
    pub fn issue_into(ca_dir: &Path, req: &Request, out: &Path) -> PathBuf {
        issue_to_dir(ca_dir, req, out, true).expect("issue certificate");
        out.to_path_buf()
    }
}

/// The grpcurl binary: on PATH, in ~/go/bin or $GOPATH/bin (`deploy/test.sh` installs it).
pub fn grpcurl_bin() -> PathBuf {
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("grpcurl")).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join("go/bin/grpcurl"));
    }
    if let Some(gp) = std::env::var_os("GOPATH") {
        candidates.push(PathBuf::from(gp).join("bin/grpcurl"));
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .expect("grpcurl not found: install it with `go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3` (.ci/run does)")
}

/// Run the `chaos` CLI with args as the test admin; returns its output.
pub fn chaos(args: &[&str]) -> Output {
    chaos_as(&pki().admin(), args)
}

/// Run the `chaos` CLI with the certificate in `tls_dir`.
pub fn chaos_as(tls_dir: &Path, args: &[&str]) -> Output {
    chaos_command(tls_dir, args).output().expect("run chaos")
}

/// The `chaos` CLI with `args`, as the holder of the certificate in `tls_dir`.
fn chaos_command(tls_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("chaos"));
    c.args(args)
        .env("RUST_LOG", "warn")
        .env("CHAOS_TLS_DIR", tls_dir)
        .env_remove("CHAOS_INSECURE")
        .env_remove("CHAOS_TLS_CA")
        .env_remove("CHAOS_TLS_CERT")
        .env_remove("CHAOS_TLS_KEY")
        .stdin(Stdio::null());
    c
}

/// A `chaos` call left running in the background as the test admin (e.g.
/// an apply that waits out a container's stop grace); killed on drop.
pub struct Background {
    child: Option<Child>,
    args: Vec<String>,
}

impl Background {
    pub fn chaos(args: &[&str]) -> Background {
        let child = chaos_command(&pki().admin(), args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn chaos");
        Background { child: Some(child), args: args.iter().map(|a| a.to_string()).collect() }
    }

    /// Whether it has ended.
    pub fn done(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Wait up to `timeout` for it to end with `want_code`; its stdout + stderr.
    pub fn finish(mut self, timeout: Duration, want_code: i32) -> String {
        assert!(wait_until(timeout, || self.done()), "chaos {:?} still running after {timeout:?}", self.args);
        let out = self.child.take().expect("child").wait_with_output().expect("chaos output");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        assert_eq!(out.status.code(), Some(want_code), "chaos {:?}\nstdout: {stdout}\nstderr: {stderr}", self.args);
        stdout + &stderr
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A gRPC channel to a coordinator, as the test admin (for tests that call
/// the contract directly).
pub fn coordinator_channel(url: &str) -> tonic::transport::Channel {
    channel_as(url, &pki().admin(), chaos_proto::trust::Expect::coordinator())
}

/// A gRPC channel to an agent, as the test admin.
pub fn agent_channel(url: &str) -> tonic::transport::Channel {
    channel_as(url, &pki().admin(), chaos_proto::trust::Expect::agent(None))
}

/// A gRPC channel with the certificate in `tls_dir`, requiring `expect` of the server.
pub fn channel_as(url: &str, tls_dir: &Path, expect: chaos_proto::trust::Expect) -> tonic::transport::Channel {
    let tls = chaos_proto::trust::Tls::load(chaos_proto::trust::TlsFiles::in_dir(tls_dir)).expect("test credentials");
    let dial = chaos_proto::trust::Dial { connect_timeout: Duration::from_secs(2), timeout: None };
    chaos_proto::trust::channel(url, &chaos_proto::trust::ClientTls::Tls(tls), expect, dial).expect("channel")
}

/// The CLI's stdout as text, asserting the expected exit code (with context on failure).
pub fn chaos_ok(args: &[&str], want_code: i32) -> String {
    chaos_ok_as(&pki().admin(), args, want_code)
}

/// [`chaos_ok`] with the certificate in `tls_dir`.
pub fn chaos_ok_as(tls_dir: &Path, args: &[&str], want_code: i32) -> String {
    let out = chaos_as(tls_dir, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(want_code), "chaos {args:?}\nstdout: {stdout}\nstderr: {stderr}");
    stdout + &stderr
}

/// A coordinator binary on a free port, its state under `dir`.
pub fn start_coordinator(dir: &std::path::Path) -> (Daemon, String) {
    start_coordinator_at(dir, free_port())
}

/// A coordinator on a given port (to restart one); its state in `dir/coordinator-state`.
pub fn start_coordinator_at(dir: &std::path::Path, port: u16) -> (Daemon, String) {
    start_coordinator_with(dir, port, None)
}

/// A coordinator on `port` with an optional YAML config file.
pub fn start_coordinator_with(dir: &std::path::Path, port: u16, config: Option<&std::path::Path>) -> (Daemon, String) {
    static STARTS: AtomicU32 = AtomicU32::new(0);
    let state = dir.join("coordinator-state");
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--state-dir".into(),
        state.display().to_string(),
        "--tls-dir".into(),
        pki().dir(Role::Coordinator, COORDINATOR).display().to_string(),
    ];
    if let Some(c) = config {
        args.extend(["--config".into(), c.display().to_string()]);
    }
    let log = dir.join(format!("coordinator-{port}-{}.log", STARTS.fetch_add(1, Ordering::Relaxed)));
    let d = Daemon::spawn("chaos-coordinator", &args, log);
    let url = format!("https://127.0.0.1:{port}");
    assert!(
        wait_until(Duration::from_secs(10), || chaos(&["--coordinator", &url, "status"]).status.success()),
        "coordinator did not start:\n{}",
        d.log_text()
    );
    (d, url)
}

/// An agent binary on a free port with its own journal under `dir`.
pub fn start_agent(dir: &std::path::Path, id: &str, coordinator: Option<&str>, lease: &str) -> (Daemon, String) {
    let port = free_port();
    let journal = dir.join(format!("journal-{id}"));
    start_agent_at(dir, id, port, &journal, coordinator, lease, &[])
}

/// An agent on a given port and journal (to restart one after a crash),
/// with extra flags (e.g. `--label role=kafka`).
pub fn start_agent_at(
    dir: &std::path::Path,
    id: &str,
    port: u16,
    journal: &std::path::Path,
    coordinator: Option<&str>,
    lease: &str,
    extra: &[&str],
) -> (Daemon, String) {
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--journal-dir".into(),
        journal.display().to_string(),
        "--agent-id".into(),
        id.into(),
        "--lease".into(),
        lease.into(),
        "--tls-dir".into(),
        pki().dir(Role::Agent, id).display().to_string(),
        "--local-socket".into(),
        agent_socket(dir, id).display().to_string(),
    ];
    if let Some(c) = coordinator {
        args.extend(["--coordinator".into(), c.to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    static STARTS: AtomicU32 = AtomicU32::new(0);
    let log = dir.join(format!("agent-{id}-{}.log", STARTS.fetch_add(1, Ordering::Relaxed)));
    let d = Daemon::spawn("chaos-agent", &args, log);
    let url = format!("https://127.0.0.1:{port}");
    assert!(
        wait_until(Duration::from_secs(10), || chaos(&["agent", "capabilities", "--agent", &url]).status.success()),
        "agent {id} did not start:\n{}",
        d.log_text()
    );
    (d, url)
}

/// The break-glass socket of agent `id` started by [`start_agent_at`] in `dir`.
pub fn agent_socket(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("agent-{id}.sock"))
}

/// Parse the CLI's JSON output (stdout; `chaos_ok` appends stderr after it).
pub fn json(s: &str) -> serde_json::Value {
    let end = s.rfind('}').map(|i| i + 1).unwrap_or(s.len());
    serde_json::from_str(&s[..end]).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Revert fault `id` through `agent` and require the agent's re-read after
/// the revert to have found the host as before; returns the fault's record.
pub fn revert_verified(agent: &str, id: &str) -> serde_json::Value {
    let out = json(&chaos_ok(&["-o", "json", "agent", "revert", "--agent", agent, id], 0));
    let f = &out["fault"];
    assert_eq!(f["revert_check"], "verified", "the revert of {id} was not verified: {out}");
    eprintln!("{id}: {}", f["revert_check_detail"]);
    f.clone()
}

/// Pause `pid` through `agent` for 5 minutes, retrying while the agent
/// still refuses (a registered agent accepts faults once its coordinator
/// has answered).
pub fn pause_when_ready(agent: &str, pid: u32, timeout: Duration) -> bool {
    let pid = pid.to_string();
    wait_until(timeout, || chaos(&["agent", "apply", "--agent", agent, "--pause-pid", &pid, "--duration", "5m"]).status.success())
}

/// Two network namespaces joined by a veth pair, with addresses in
/// 198.18.0.0/15 only; both namespaces (and so the veth) are deleted on drop.
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub a_ip: String,
    pub b_ip: String,
    /// The veth ends, in `a` and in `b`.
    pub a_if: String,
    pub b_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl NetPair {
    pub fn new() -> NetPair {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // A distinct /24 per pair within this test process (156 of them in 198.18.100-255.0/24,
        // wrapping, so the octet stays valid whatever the pid); the pid keeps names unique
        // across processes. Each pair's addresses live only inside its own two namespaces.
        let subnet = 100 + ((std::process::id() % 50) * 3 + n) % 156;
        let tag = format!("{}-{n}", std::process::id());
        let p = NetPair {
            a: format!("chaos-e2e-{tag}-a"),
            b: format!("chaos-e2e-{tag}-b"),
            a_ip: format!("198.18.{subnet}.1"),
            b_ip: format!("198.18.{subnet}.2"),
            a_if: format!("ce{tag}a"),
            b_if: format!("ce{tag}b"),
        };
        let (va, vb) = (&p.a_if, &p.b_if);
        ip(&["netns", "add", &p.a]);
        ip(&["netns", "add", &p.b]);
        ip(&["link", "add", va, "type", "veth", "peer", "name", vb]);
        ip(&["link", "set", va, "netns", &p.a]);
        ip(&["link", "set", vb, "netns", &p.b]);
        ip(&["-n", &p.a, "addr", "add", &format!("{}/24", p.a_ip), "dev", va]);
        ip(&["-n", &p.b, "addr", "add", &format!("{}/24", p.b_ip), "dev", vb]);
        for (ns, dev) in [(&p.a, va), (&p.b, vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        p
    }

    /// Run a command inside namespace `ns`.
    pub fn exec(ns: &str, argv: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", ns]).args(argv).stdin(Stdio::null()).output().expect("ip netns exec")
    }

    /// Pings `count` times, 0.2 s apart (1 s timeout each), from `ns` to `to`; returns replies received.
    pub fn ping(ns: &str, to: &str, count: u32) -> u32 {
        Self::ping_every(ns, to, count, "0.2")
    }

    /// Sends exactly `count` pings `interval` seconds apart (each waits 1 s at most for its
    /// reply); returns replies received. No `-w`: with it ping sends until `count` replies arrive.
    pub fn ping_every(ns: &str, to: &str, count: u32, interval: &str) -> u32 {
        let out = Self::exec(ns, &["ping", "-n", "-q", "-c", &count.to_string(), "-W", "1", "-i", interval, to]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find_map(|l| l.split(',').nth(1).and_then(|r| r.trim().split(' ').next()).and_then(|n| n.parse().ok())).unwrap_or(0)
    }

    /// (min, avg, max) user-to-user RTT in ms of `count` pings 50 ms apart (see [`Self::arrivals`]).
    pub fn rtt_ms(ns: &str, to: &str, count: u32) -> Option<(f64, f64, f64)> {
        let rtts = Self::rtts_ms(ns, to, count, "0.05");
        let min = rtts.iter().copied().reduce(f64::min)?;
        let max = rtts.iter().copied().reduce(f64::max)?;
        Some((min, rtts.iter().sum::<f64>() / rtts.len() as f64, max))
    }

    /// Per-packet user-to-user RTTs in ms, in arrival order (see [`Self::arrivals`]).
    pub fn rtts_ms(ns: &str, to: &str, count: u32, interval: &str) -> Vec<f64> {
        Self::arrivals(ns, to, count, interval).into_iter().map(|(_, rtt)| rtt).collect()
    }

    /// RTT ms of each reply in the order the echoes were sent (for a fault that draws one delay
    /// per packet: the order of its draws), whatever order they arrived in.
    pub fn rtts_in_sent_order(ns: &str, to: &str, count: u32, interval: &str) -> Vec<f64> {
        let mut got = Self::arrivals(ns, to, count, interval);
        got.sort_by_key(|(seq, _)| *seq);
        got.into_iter().map(|(_, rtt)| rtt).collect()
    }

    /// How many of `arrivals` (from [`NetPair::arrivals`]) came after a later-numbered one.
    pub fn overtaken(arrivals: &[(u32, f64)]) -> usize {
        let mut max_seen = 0;
        arrivals
            .iter()
            .filter(|(seq, _)| {
                let late = *seq < max_seen;
                max_seen = max_seen.max(*seq);
                late
            })
            .count()
    }

    /// (icmp_seq, RTT ms) of each reply, in arrival order, from `ping -U`: user-to-user
    /// time, since the kernel's receive timestamp predates a hold at PREROUTING.
    pub fn arrivals(ns: &str, to: &str, count: u32, interval: &str) -> Vec<(u32, f64)> {
        let out = Self::exec(ns, &["ping", "-U", "-n", "-c", &count.to_string(), "-W", "2", "-i", interval, to]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?.parse().ok()?;
                let rtt = l.split("time=").nth(1)?.split_whitespace().next()?.parse().ok()?;
                Some((seq, rtt))
            })
            .collect()
    }

    /// Send `bytes` over TCP from namespace `from` to `to_ip:port` in `to_ns`;
    /// returns the receiver's throughput in bit/s (bounded: 20 s per step).
    pub fn throughput_bps(from: &str, to_ns: &str, to_ip: &str, port: u16, bytes: u64) -> f64 {
        Self::probe(("sink", to_ns, format!("{to_ip}:{port}")), ("send", from), bytes)
    }

    /// Like [`Self::throughput_bps`], but the sender listens on `from_ip:port` and sends from that port.
    pub fn throughput_from_port_bps(from: &str, from_ip: &str, port: u16, to_ns: &str, bytes: u64) -> f64 {
        let addr = format!("{from_ip}:{port}");
        let probe = bin("chaos-netprobe");
        let source = Command::new("ip")
            .args(["netns", "exec", from])
            .arg(&probe)
            .args(["source", &addr, &bytes.to_string()])
            .spawn()
            .expect("spawn source");
        let out = Self::exec(to_ns, &[probe.to_str().expect("path"), "drain", &addr]);
        let _ = source.wait_with_output();
        parse_rate(&String::from_utf8_lossy(&out.stdout))
    }

    fn probe(recv: (&str, &str, String), send: (&str, &str), bytes: u64) -> f64 {
        let probe = bin("chaos-netprobe");
        let (mode, ns, addr) = recv;
        let receiver = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&probe)
            .args([mode, &addr])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn receiver");
        let sent = Self::exec(send.1, &[probe.to_str().expect("path"), send.0, &addr, &bytes.to_string()]);
        assert!(sent.status.success(), "send: {}", String::from_utf8_lossy(&sent.stderr));
        let out = receiver.wait_with_output().expect("receiver");
        parse_rate(&String::from_utf8_lossy(&out.stdout))
    }

    /// Send `count` numbered UDP datagrams from `from` to `to_ip:port` in `to_ns`
    /// at `pps` per second (0: flat out); what the receiver counted (bounded: 20 s per step).
    pub fn udp(from: &str, to_ns: &str, to_ip: &str, port: u16, count: u64, pps: u64) -> UdpCount {
        use std::io::BufRead;
        let probe = bin("chaos-netprobe");
        let addr = format!("{to_ip}:{port}");
        let mut sink = Command::new("ip")
            .args(["netns", "exec", to_ns])
            .arg(&probe)
            .args(["udp-sink", &addr])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn udp-sink");
        let mut out = std::io::BufReader::new(sink.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("udp-sink ready");
        assert_eq!(line.trim(), "ready", "udp-sink: {line}");
        let sent = Self::exec(from, &[probe.to_str().expect("path"), "udp-send", &addr, &count.to_string(), &pps.to_string()]);
        assert!(sent.status.success(), "udp-send: {}", String::from_utf8_lossy(&sent.stderr));
        line.clear();
        out.read_line(&mut line).expect("udp-sink result");
        let _ = sink.wait();
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |k: &str| w.iter().position(|x| *x == k).and_then(|i| w.get(i + 1)).and_then(|v| v.parse::<f64>().ok());
        UdpCount {
            sent: count,
            received: num("received").unwrap_or(0.0) as u64,
            distinct: num("distinct").unwrap_or(0.0) as u64,
            duplicates: num("duplicates").unwrap_or(0.0) as u64,
            bad: num("bad").unwrap_or(0.0) as u64,
            reordered: num("reordered").unwrap_or(0.0) as u64,
            seconds: num("seconds").unwrap_or(0.0),
        }
    }

    /// A counter of `/proc/net/snmp` inside `ns`, e.g. `snmp(ns, "Udp", "InCsumErrors")`.
    pub fn snmp(ns: &str, group: &str, field: &str) -> u64 {
        Self::proc_counter(ns, "/proc/net/snmp", group, field)
    }

    /// A counter of `/proc/net/netstat` inside `ns` (what `nstat` shows as TcpExt…),
    /// e.g. `netstat(ns, "TcpExt", "TCPSACKReorder")`.
    pub fn netstat(ns: &str, group: &str, field: &str) -> u64 {
        Self::proc_counter(ns, "/proc/net/netstat", group, field)
    }

    /// One counter of a `/proc/net` file made of name-line / value-line pairs per group.
    fn proc_counter(ns: &str, file: &str, group: &str, field: &str) -> u64 {
        let text = String::from_utf8_lossy(&Self::exec(ns, &["cat", file]).stdout).into_owned();
        let prefix = format!("{group}:");
        let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (rows.next(), rows.next()) else { return 0 };
        let i = names.split_whitespace().position(|n| n == field);
        i.and_then(|i| values.split_whitespace().nth(i)).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// `iptables -t raw -S` inside `ns`.
    pub fn raw_rules(ns: &str) -> String {
        String::from_utf8_lossy(&Self::exec(ns, &["iptables", "-w", "-t", "raw", "-S"]).stdout).into_owned()
    }

    /// `nft list ruleset` inside `ns`.
    pub fn ruleset(ns: &str) -> String {
        String::from_utf8_lossy(&Self::exec(ns, &["nft", "list", "ruleset"]).stdout).into_owned()
    }
}

/// What `chaos-netprobe udp-sink` counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpCount {
    pub sent: u64,
    pub received: u64,
    /// Datagrams received at least once, intact.
    pub distinct: u64,
    /// Intact datagrams received more than once (extra copies).
    pub duplicates: u64,
    /// Datagrams whose bytes were not what was sent.
    pub bad: u64,
    /// Intact datagrams that arrived after a higher-numbered one.
    pub reordered: u64,
    pub seconds: f64,
}

impl Default for NetPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Run the `chaos` CLI inside a network namespace.
pub fn chaos_in(ns: &str, args: &[&str]) -> Output {
    let bin = bin("chaos");
    let admin = pki().admin();
    let mut argv = vec!["env", "-u", "CHAOS_INSECURE"];
    let dir_env = format!("CHAOS_TLS_DIR={}", admin.display());
    argv.push(&dir_env);
    argv.push(bin.to_str().expect("utf-8 path"));
    argv.extend_from_slice(args);
    NetPair::exec(ns, &argv)
}

/// "BYTES SECONDS" -> bit/s (0 when nothing arrived).
fn parse_rate(text: &str) -> f64 {
    let mut it = text.split_whitespace();
    let n: f64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let secs: f64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
    if secs > 0.0 { n * 8.0 / secs } else { 0.0 }
}

/// A cgroup made for one test, in each asked v1 hierarchy (or the one v2
/// tree). On drop: every process in it is killed (thawed first), then the
/// directories are removed, even when the test panicked.
pub struct TestCgroup {
    /// The cgroup path, e.g. `/chaos-e2e-cpu-4242`.
    pub path: String,
    v2: bool,
    dirs: Vec<(String, PathBuf)>,
}

impl TestCgroup {
    /// `controllers` by their v1 names (cpu, cpuacct, memory, blkio, freezer).
    pub fn new(tag: &str, controllers: &[&str]) -> TestCgroup {
        let path = format!("/chaos-e2e-{tag}-{}", std::process::id());
        let root = PathBuf::from("/sys/fs/cgroup");
        let v2 = root.join("cgroup.controllers").exists();
        let dirs: Vec<(String, PathBuf)> = if v2 {
            vec![("unified".into(), root.join(&path[1..]))]
        } else {
            controllers.iter().map(|c| (c.to_string(), root.join(c).join(&path[1..]))).collect()
        };
        for (_, d) in &dirs {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        TestCgroup { path, v2, dirs }
    }

    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// The directory for a v1 controller (the one tree on v2).
    pub fn dir(&self, controller: &str) -> PathBuf {
        self.dirs.iter().find(|(c, _)| self.v2 || c == controller).map(|(_, d)| d.clone()).expect("controller of this cgroup")
    }

    pub fn read(&self, controller: &str, file: &str) -> String {
        std::fs::read_to_string(self.dir(controller).join(file)).map(|s| s.trim().to_string()).unwrap_or_default()
    }

    pub fn write(&self, controller: &str, file: &str, value: &str) {
        std::fs::write(self.dir(controller).join(file), value).unwrap_or_else(|e| panic!("{file} <- {value}: {e}"));
    }

    /// `sh -c SCRIPT` run inside every directory of the cgroup (joined
    /// before the script starts), in its own process group.
    pub fn spawn_sh(&self, script: &str) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let join: Vec<String> = self.dirs.iter().map(|(_, d)| format!("echo $$ > {}/cgroup.procs", d.display())).collect();
        Command::new("sh")
            .args(["-c", &format!("{} && {script}", join.join(" && "))])
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn sh in the test cgroup")
    }

    /// CPU time used by the cgroup so far, in ns.
    pub fn cpu_usage_ns(&self) -> u64 {
        if self.v2 {
            self.read("cpu", "cpu.stat").lines().find_map(|l| l.strip_prefix("usage_usec ")?.parse::<u64>().ok()).unwrap_or(0) * 1000
        } else {
            self.read("cpuacct", "cpuacct.usage").parse().unwrap_or(0)
        }
    }

    /// The cgroup's CPU load over `window`, in percent of one core.
    pub fn cpu_percent(&self, window: Duration) -> f64 {
        cpu_percent_of(|| self.cpu_usage_ns(), window)
    }
}

/// Load in percent of one core from a cumulative ns counter, over `window`.
pub fn cpu_percent_of(read: impl Fn() -> u64, window: Duration) -> f64 {
    let (t0, u0) = (std::time::Instant::now(), read());
    std::thread::sleep(window);
    let (t1, u1) = (std::time::Instant::now(), read());
    u1.saturating_sub(u0) as f64 * 100.0 / (t1 - t0).as_nanos() as f64
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if self.v2 {
            let _ = std::fs::write(self.dir("freezer").join("cgroup.freeze"), "0");
        } else if let Some((_, d)) = self.dirs.iter().find(|(c, _)| c == "freezer") {
            let _ = std::fs::write(d.join("freezer.state"), "THAWED");
        }
        for (_, d) in &self.dirs {
            for pid in std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines() {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
        for (_, d) in &self.dirs {
            // The kernel needs a moment to let go of the dead tasks.
            wait_until(Duration::from_secs(5), || std::fs::remove_dir(d).is_ok() || !d.exists());
        }
    }
}

/// Stress workers of a fault still running (`chaos-agent __stressor --fault-id ID`).
pub fn stress_workers(fault_id: &str) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let raw = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        if args.get(1) == Some(&b"__stressor".as_slice()) && args.get(3) == Some(&fault_id.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Live processes whose comm is exactly `name`.
pub fn proc_pids_named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_comm(*pid).as_deref() == Some(name) && !matches!(proc_state(*pid), Some('Z' | 'X') | None))
        .collect()
}

/// A private Docker daemon for one test: its own socket, data and exec
/// roots under a temporary directory, no iptables, no bridge (containers
/// run with `--network none`; the address pool stays inside 198.19.0.0/16),
/// vfs storage (no mounts left behind), cgroups under a parent of its own.
/// On drop: every container removed, the daemon stopped, its cgroups and
/// files removed.
pub struct Dockerd {
    dir: tempfile::TempDir,
    child: Child,
    pub socket: PathBuf,
    cgroup_parent: String,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Dockerd::start`], or why the daemon is not there (not installed,
    /// not answering within 30 s), for callers that skip rather than fail.
    pub fn try_start() -> Result<Dockerd, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let socket = dir.path().join("docker.sock");
        let cgroup_parent = format!("chaos-e2e-docker-{}", std::process::id());
        let log = std::fs::File::create(dir.path().join("dockerd.log")).map_err(|e| format!("dockerd log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("dockerd log: {e}"))?;
        let child = Command::new("dockerd")
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("docker.pid"))
            .args(["--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"])
            .args(["--storage-driver", "vfs", "--cgroup-parent", &cgroup_parent])
            .args(["--default-address-pool", "base=198.19.0.0/16,size=24"])
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("dockerd (Debian package docker.io) must be installed: deploy/test.sh installs it ({e})"))?;
        let d = Dockerd { dir, child, socket, cgroup_parent };
        if !wait_until(Duration::from_secs(30), || d.docker_cli(&["version"]).is_ok_and(|o| o.status.success())) {
            // Dropping `d` stops the daemon and removes what it left.
            return Err(format!(
                "dockerd did not answer within 30 s:\n{}",
                std::fs::read_to_string(d.dir.path().join("dockerd.log")).unwrap_or_default()
            ));
        }
        Ok(d)
    }

    /// `docker -H unix://SOCKET ARGS`, or why the CLI could not run.
    fn docker_cli(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("docker").arg("-H").arg(format!("unix://{}", self.socket.display())).args(args).stdin(Stdio::null()).output()
    }

    /// `docker -H unix://SOCKET ARGS`.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_cli(args).expect("docker CLI")
    }

    /// Stdout of a docker command that must succeed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A tiny image made with `docker import` from busybox (no registry here).
    pub fn busybox_image(&self) -> String {
        self.try_busybox_image().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Dockerd::busybox_image`], or why it could not be made.
    pub fn try_busybox_image(&self) -> Result<String, String> {
        let root = self.dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .map_err(|e| format!("/bin/busybox (Debian package busybox-static): {e}"))?;
        for applet in ["sh", "sleep"] {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
        let tar = Command::new("tar").arg("-C").arg(&root).args(["-c", "."]).output().map_err(|e| format!("tar: {e}"))?;
        let mut import = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["import", "-", "chaos-e2e-busybox:1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("docker import: {e}"))?;
        use std::io::Write;
        let fed = import.stdin.take().map(|mut i| i.write_all(&tar.stdout));
        let ok = import.wait().map_err(|e| format!("docker import: {e}"))?.success();
        if !ok || !matches!(fed, Some(Ok(()))) {
            return Err(format!("docker import failed (fed the tar: {fed:?})"));
        }
        Ok("chaos-e2e-busybox:1".into())
    }

    /// Start container `name` (with `extra` `docker run` flags, e.g. a
    /// label) whose process outlives SIGTERM: a shell that notes the signal
    /// in its `/term` and keeps going, a bounded loop of 1 s sleeps (`secs`
    /// in all), so only SIGKILL ends it sooner. Each start writes `start`
    /// there first, so [`Dockerd::got_term`] tells about the latest stop.
    pub fn run_term_ignorer(&self, image: &str, name: &str, secs: u32, extra: &[&str]) {
        let script =
            format!("echo start > /term; trap 'echo term > /term' TERM; i=0; while [ $i -lt {secs} ]; do sleep 1; i=$((i+1)); done");
        let mut args = vec!["run", "-d", "--name", name, "--network", "none"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[image, "sh", "-c", &script]);
        self.docker_ok(&args);
        // The trap is set before the first sleep: wait for it.
        assert!(wait_until(Duration::from_secs(10), || self.term_note(name).as_deref() == Some("start")), "{name} never started its loop");
    }

    /// Whether the process of a container made by [`Dockerd::run_term_ignorer`]
    /// has been sent SIGTERM since it started (read through `/proc/PID/root`).
    pub fn got_term(&self, name: &str) -> bool {
        self.got_term_all(&[name])
    }

    /// [`Dockerd::got_term`] of every one of `names` (one `docker inspect`).
    pub fn got_term_all(&self, names: &[&str]) -> bool {
        let notes = self.term_notes(names);
        notes.len() == names.len() && notes.iter().all(|n| n.as_deref() == Some("term"))
    }

    fn term_note(&self, name: &str) -> Option<String> {
        self.term_notes(&[name]).pop().flatten()
    }

    fn term_notes(&self, names: &[&str]) -> Vec<Option<String>> {
        let mut args = vec!["inspect", "-f", "{{.State.Pid}}"];
        args.extend_from_slice(names);
        let out = self.docker(&args);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|pid| {
                let pid = pid.trim().parse::<u32>().ok().filter(|p| *p > 0)?;
                std::fs::read_to_string(format!("/proc/{pid}/root/term")).ok().map(|s| s.trim().to_string())
            })
            .collect()
    }

    /// Whether a container is running and whether it is paused.
    pub fn state(&self, name: &str) -> (bool, bool) {
        let s = self.docker_ok(&["inspect", "-f", "{{.State.Running}} {{.State.Paused}}", name]);
        (s.starts_with("true"), s.ends_with("true"))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = String::from_utf8_lossy(&self.docker(&["ps", "-aq"]).stdout).split_whitespace().map(str::to_string).collect::<Vec<_>>();
        for id in &ids {
            let _ = self.docker(&["unpause", id]);
            let _ = self.docker(&["rm", "-f", id]);
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        if !wait_until(Duration::from_secs(15), || matches!(self.child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for c in [
            "cpu",
            "cpuacct",
            "cpuset",
            "memory",
            "devices",
            "freezer",
            "blkio",
            "pids",
            "net_cls",
            "perf_event",
            "hugetlb",
            "systemd",
            "unified",
            "",
        ] {
            let d = PathBuf::from("/sys/fs/cgroup").join(c).join(&self.cgroup_parent);
            if d.is_dir() {
                wait_until(Duration::from_secs(5), || std::fs::remove_dir(&d).is_ok() || !d.exists());
            }
        }
    }
}

/// The processes of one cgroup directory (`cgroup.procs`).
pub fn proc_pids_in(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::{moments, rank_lag1};

    #[test]
    fn rank_lag1_follows_the_order_and_shrugs_off_one_stall() {
        // A slow wave of sd 11.3 (a uniform ± 20 has 11.5): each value close to the one before.
        let wave: Vec<f64> = (0..300).map(|i| 40.0 + 16.0 * (i as f64 / 15.0).sin()).collect();
        let (_, _, pearson) = moments(&wave);
        let ranks = rank_lag1(&wave);
        assert!(ranks > 0.95 && pearson > 0.95, "ranks {ranks}, Pearson {pearson}");
        // One reply late by 150 ms: Pearson's figure drops, the ranks' hardly moves.
        let mut stalled = wave.clone();
        stalled[100] += 150.0;
        let (_, _, pearson) = moments(&stalled);
        let ranks = rank_lag1(&stalled);
        assert!(pearson < 0.7, "Pearson {pearson}");
        assert!(ranks > 0.93, "ranks {ranks}");
        // Alternating values: each far from the one before; ties share their rank.
        let alternating: Vec<f64> = (0..300).map(|i| (i % 2) as f64).collect();
        assert!(rank_lag1(&alternating) < -0.99, "{}", rank_lag1(&alternating));
    }
}
