//! Running network tools inside a network namespace without moving the
//! agent: the child enters the namespace (`setns`) between fork and exec, so
//! only the child is in it, and there is no `nsenter` exec on the way (about
//! 2 ms each here). A recording fake stands in for tests.

use std::{
    collections::BTreeMap,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

/// A command's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Identity of a namespace: device and inode of its nsfs file.
pub type NsId = (u64, u64);

#[async_trait]
pub trait NetExec: Send + Sync {
    /// Run `argv` in the namespace at `ns` (`None`: the agent's own), with `stdin`.
    /// `Err` only when the program could not be started (e.g. not installed).
    async fn run(&self, ns: Option<&Path>, argv: &[&str], stdin: Option<&str>) -> io::Result<CmdOutput>;
    /// Identity of the namespace file, `None` when it does not exist.
    fn ns_id(&self, path: &Path) -> io::Result<Option<NsId>>;
    /// Names of the namespace's interfaces, `lo` included (`Err` of kind
    /// `NotFound` when the namespace is gone).
    async fn link_names(&self, ns: Option<&Path>) -> io::Result<Vec<String>>;
    /// The namespace's nftables tables as `nft list tables` prints them
    /// ("table inet x" a line).
    async fn nft_tables(&self, ns: Option<&Path>) -> io::Result<String>;
    /// Delete nftables tables ((family, name)) in one transaction, all or
    /// none: `Err` of kind `NotFound` when one of them (or the namespace) is missing.
    async fn nft_delete_tables(&self, ns: Option<&Path>, tables: &[(&str, &str)]) -> io::Result<()>;
}

/// The real thing: the tool, started inside the namespace.
#[derive(Debug, Default, Clone)]
pub struct SetnsExec;

#[async_trait]
impl NetExec for SetnsExec {
    async fn run(&self, ns: Option<&Path>, argv: &[&str], stdin: Option<&str>) -> io::Result<CmdOutput> {
        let mut cmd = tokio::process::Command::new(argv[0]);
        cmd.args(&argv[1..]);
        // Opened close-on-exec: the child holds it only until its exec.
        let ns_file = match ns.map(std::fs::File::open).transpose() {
            Ok(f) => f,
            Err(e) => {
                let path = ns.map(|p| p.display().to_string()).unwrap_or_default();
                return Ok(CmdOutput { success: false, stdout: String::new(), stderr: format!("cannot enter netns {path}: {e}") });
            }
        };
        if let Some(f) = &ns_file {
            let fd = f.as_raw_fd();
            // SAFETY: between fork and exec the closure makes one async-signal-safe
            // system call on a descriptor the parent keeps open until the spawn returns.
            unsafe {
                cmd.pre_exec(move || if libc::setns(fd, libc::CLONE_NEWNET) == 0 { Ok(()) } else { Err(io::Error::last_os_error()) });
            }
        }
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        drop(ns_file);
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await?;
            drop(pipe);
        }
        let out = child.wait_with_output().await?;
        Ok(CmdOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    async fn link_names(&self, ns: Option<&Path>) -> io::Result<Vec<String>> {
        // An rtnetlink dump from a thread in the namespace: tens of microseconds, not an exec.
        in_netns_blocking(ns, super::netns::link_names).await
    }

    async fn nft_tables(&self, ns: Option<&Path>) -> io::Result<String> {
        let tables = in_netns_blocking(ns, super::nftnl::tables).await?;
        Ok(tables.iter().map(|(fam, name)| format!("table {fam} {name}\n")).collect())
    }

    async fn nft_delete_tables(&self, ns: Option<&Path>, tables: &[(&str, &str)]) -> io::Result<()> {
        let owned: Vec<(String, String)> = tables.iter().map(|(f, t)| (f.to_string(), t.to_string())).collect();
        in_netns_blocking(ns, move || super::nftnl::delete_tables(&owned.iter().map(|(f, t)| (f.as_str(), t.as_str())).collect::<Vec<_>>()))
            .await
    }

    fn ns_id(&self, path: &Path) -> io::Result<Option<NsId>> {
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some((m.dev(), m.ino()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// `work` on a blocking thread, inside the namespace at `ns` ([`super::netns::in_netns`]).
async fn in_netns_blocking<T: Send + 'static>(ns: Option<&Path>, work: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    let ns = ns.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || super::netns::in_netns(ns.as_deref(), work)).await.map_err(io::Error::other)?
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub ns: Option<PathBuf>,
    pub argv: Vec<String>,
    pub stdin: Option<String>,
}

#[derive(Debug, Default)]
struct FakeInner {
    calls: Vec<Call>,
    /// Canned answers: the first whose key is a substring of the joined argv wins.
    answers: Vec<(String, Vec<CmdOutput>)>,
    namespaces: BTreeMap<PathBuf, NsId>,
    missing_program: bool,
    /// A namespace deleted when a command containing the key runs (races at teardown).
    vanish: Option<(String, PathBuf)>,
    /// Commands containing the key wait for the gate to open (a slow tool).
    gates: Vec<(String, Arc<tokio::sync::Semaphore>)>,
}

/// Holds every command of a [`FakeExec`] that matches its key until opened.
#[derive(Debug, Clone)]
pub struct Gate(Arc<tokio::sync::Semaphore>);

impl Gate {
    /// Let every held command (and every later one) go on.
    pub fn open(&self) {
        self.0.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }
}

/// Records every command; answers success unless told otherwise.
#[derive(Debug, Clone, Default)]
pub struct FakeExec {
    inner: Arc<Mutex<FakeInner>>,
}

impl FakeExec {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }
    /// Answer commands containing `key` with `out`.
    pub fn answer(&self, key: &str, out: CmdOutput) {
        self.lock().answers.push((key.to_string(), vec![out]));
    }
    /// Answer commands containing `key` with each of `outs` in turn, then the last one for good.
    pub fn answer_in_turn(&self, key: &str, outs: Vec<CmdOutput>) {
        self.lock().answers.push((key.to_string(), outs));
    }
    pub fn add_namespace(&self, path: impl Into<PathBuf>, id: NsId) {
        self.lock().namespaces.insert(path.into(), id);
    }
    pub fn remove_namespace(&self, path: &Path) {
        self.lock().namespaces.remove(path);
    }
    /// Delete namespace `path` as soon as a command containing `key` runs (and fail that command).
    pub fn vanish_on(&self, key: &str, path: impl Into<PathBuf>) {
        self.lock().vanish = Some((key.to_string(), path.into()));
    }

    /// Hold commands containing `key` until the returned gate is opened.
    pub fn hold(&self, key: &str) -> Gate {
        let sem = Arc::new(tokio::sync::Semaphore::new(0));
        self.lock().gates.push((key.to_string(), Arc::clone(&sem)));
        Gate(sem)
    }

    /// Behave as if the program were not installed.
    pub fn set_missing_program(&self, missing: bool) {
        self.lock().missing_program = missing;
    }
}

/// Interface names from `ip -o link show` ("2: veth0@if3: <...>").
pub fn parse_link_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// What `nft --echo -f -` prints for a script in `nft -f` syntax (tables,
/// chains, rules two tabs in): each table and rule as the kernel echoes it.
/// Empty for any other command.
fn echo_of(argv: &[&str], stdin: Option<&str>) -> String {
    let (["nft", "--echo", ..], Some(script)) = (argv, stdin) else { return String::new() };
    let (mut out, mut table, mut chain) = (String::new(), String::new(), String::new());
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match (line.starts_with("table "), line.strip_prefix("\t\t"), words.as_slice()) {
            (true, _, [_, fam, name, ..]) => {
                table = format!("{fam} {name}");
                out.push_str(&format!("add table {table}\n"));
            }
            (_, None, ["chain", name, ..]) => chain = name.to_string(),
            (_, Some(rule), _) if !rule.starts_with("type ") => out.push_str(&format!("add rule {table} {chain} {rule}\n")),
            _ => {}
        }
    }
    out
}

#[async_trait]
impl NetExec for FakeExec {
    async fn run(&self, ns: Option<&Path>, argv: &[&str], stdin: Option<&str>) -> io::Result<CmdOutput> {
        let joined = argv.join(" ");
        let gate = self.lock().gates.iter().find(|(k, _)| joined.contains(k.as_str())).map(|(_, g)| Arc::clone(g));
        if let Some(gate) = gate {
            // The permit goes back when dropped: an opened gate stays open.
            drop(gate.acquire().await);
        }
        let mut g = self.lock();
        if g.missing_program {
            return Err(io::Error::new(io::ErrorKind::NotFound, "No such file or directory"));
        }
        g.calls.push(Call {
            ns: ns.map(Path::to_path_buf),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: stdin.map(str::to_string),
        });
        if let Some((key, path)) = g.vanish.clone()
            && joined.contains(key.as_str())
        {
            g.namespaces.remove(&path);
            return Ok(CmdOutput {
                success: false,
                stdout: String::new(),
                stderr: format!("cannot enter netns {}: No such file or directory", path.display()),
            });
        }
        let out = g
            .answers
            .iter_mut()
            .find(|(k, outs)| joined.contains(k.as_str()) && !outs.is_empty())
            .map(|(_, outs)| if outs.len() > 1 { outs.remove(0) } else { outs[0].clone() });
        Ok(out.unwrap_or_else(|| CmdOutput { success: true, stdout: echo_of(argv, stdin), stderr: String::new() }))
    }

    /// Recorded as the command `rtnetlink link names`; answered from a canned
    /// `ip -o link show` text ("2: veth0@if3: <UP>"), `lo` alone by default.
    async fn link_names(&self, ns: Option<&Path>) -> io::Result<Vec<String>> {
        let out = self.run(ns, &["rtnetlink", "link", "names"], None).await?;
        if !out.success {
            return Err(io::Error::new(io::ErrorKind::NotFound, out.stderr));
        }
        let text = if out.stdout.is_empty() { "1: lo: <LOOPBACK,UP>" } else { out.stdout.as_str() };
        Ok(parse_link_names(text))
    }

    /// Recorded as `nft list tables`; a failing canned answer is an error.
    async fn nft_tables(&self, ns: Option<&Path>) -> io::Result<String> {
        let out = self.run(ns, &["nft", "list", "tables"], None).await?;
        if out.success { Ok(out.stdout) } else { Err(io::Error::other(out.stderr)) }
    }

    /// Recorded as `nft -f -` with a `delete table F T` line per table; a canned
    /// failure saying "No such file or directory" is `NotFound`.
    async fn nft_delete_tables(&self, ns: Option<&Path>, tables: &[(&str, &str)]) -> io::Result<()> {
        let script: String = tables.iter().map(|(fam, t)| format!("delete table {fam} {t}\n")).collect();
        let out = self.run(ns, &["nft", "-f", "-"], Some(&script)).await?;
        match out {
            o if o.success => Ok(()),
            o if o.stderr.contains("No such file or directory") => Err(io::Error::new(io::ErrorKind::NotFound, o.stderr)),
            o => Err(io::Error::other(o.stderr)),
        }
    }

    fn ns_id(&self, path: &Path) -> io::Result<Option<NsId>> {
        Ok(self.lock().namespaces.get(path).copied())
    }
}
