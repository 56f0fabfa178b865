//! Network faults with nftables, in the target's network namespace.
//!
//! A partition is one nftables table per fault (plus one `netdev` table for
//! egress), added in one atomic `nft -f` transaction and removed by name,
//! so `nft list ruleset` shows exactly what the fault added and revert
//! leaves the namespace as it was. Ingress drops sit in an `inet` input
//! chain (silent, like real loss); egress drops in `netdev` egress chains,
//! one per interface (a drop in OUTPUT would hand EPERM to the sender,
//! which real loss never does; raw ICMP sockets still see ENOBUFS).
//!
//! The control channel is exempt by construction: every chain first
//! accepts the agent's own gRPC port, the agent <-> coordinator flows and
//! the protected CIDRs, before any drop rule.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use chaos_proto::spec::{Cidr, FaultKind, FaultRequest, NetScope, Protocol, TargetSpec};
use serde::{Deserialize, Serialize};

use super::{
    Applied, FaultDriver, Observation, Plan, Snapshot,
    bandwidth::Netem,
    delay_engine::{Engine, Profile},
};
use crate::{
    config::Firewall,
    error::AgentError,
    sys::{
        ProcessTable,
        netexec::{CmdOutput, NetExec, NsId},
    },
};

/// Traffic that no network fault may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exemptions {
    /// The agent's gRPC port (anyone may reach the agent, so it can always be told to revert).
    pub agent_port: u16,
    /// The coordinator's address and port.
    pub coordinator: Option<(IpAddr, u16)>,
    /// Configured `protected.cidrs`.
    pub cidrs: Vec<Cidr>,
}

/// A network namespace, named by path and identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRef {
    /// `None`: the agent's own namespace.
    pub path: Option<PathBuf>,
    /// (dev, ino) of the namespace at plan time: revert only acts on the same namespace.
    pub id: Option<NsId>,
    /// For people: "host", "netns lab-a", "pid 812".
    pub label: String,
}

/// What a partition fault will add, and what revert removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPlan {
    pub ns: NetnsRef,
    pub scope: NetScope,
    /// Name of the `inet` table (ingress) and of the `netdev` table (egress).
    pub table: String,
    pub egress_table: String,
    /// Rendered exemption rules, fixed at plan time.
    pub exempt_in: Vec<String>,
    pub exempt_out: Vec<String>,
    /// `None`: drop everything in scope (partition); `Some(n)`: drop n/10000 of it (loss).
    #[serde(default)]
    pub loss_permyriad: Option<u32>,
}

/// Driver for `network_partition` (nftables backend).
pub struct NetworkDriver {
    pub(crate) exec: Arc<dyn NetExec>,
    table: Arc<dyn ProcessTable>,
    pub(crate) exempt: Exemptions,
    netns_dir: PathBuf,
    proc_root: PathBuf,
    /// Running delay engines, by the fault's ingress chain name.
    pub(crate) engines: Mutex<HashMap<String, Engine>>,
    /// "iptables-nft" or "iptables-legacy", learned once at start (reported with each latency fault).
    pub(crate) iptables_backend: &'static str,
    /// Whether the kernel has sch_netem (probed once at start): netem backs latency,
    /// correlation, corruption, duplication and reorder; else the NFQUEUE engine does.
    pub(crate) netem: bool,
    /// What partitions and loss drop with (resolved at start: never `Auto`).
    pub(crate) firewall: Firewall,
}

impl NetworkDriver {
    pub fn new(exec: Arc<dyn NetExec>, table: Arc<dyn ProcessTable>, exempt: Exemptions) -> Self {
        Self {
            exec,
            table,
            exempt,
            netns_dir: PathBuf::from("/run/netns"),
            proc_root: PathBuf::from("/proc"),
            engines: Mutex::new(HashMap::new()),
            iptables_backend: "iptables",
            netem: false,
            firewall: Firewall::Nftables,
        }
    }

    /// Drop with this packet filter (`Auto` means nftables).
    pub fn with_firewall(mut self, firewall: Firewall) -> Self {
        self.firewall = if firewall == Firewall::Auto { Firewall::Nftables } else { firewall };
        self
    }

    /// Drive sch_netem (the kernel has it).
    pub fn with_netem(mut self, netem: bool) -> Self {
        self.netem = netem;
        self
    }

    /// Name the iptables backend from `iptables -V` output (learned once at start).
    pub fn with_iptables_version(mut self, version: Option<&str>) -> Self {
        self.iptables_backend = match version {
            Some(v) if v.contains("nf_tables") => "iptables-nft",
            Some(v) if v.contains("legacy") => "iptables-legacy",
            _ => "iptables",
        };
        self
    }

    /// Use other roots (tests).
    pub fn with_roots(mut self, netns_dir: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        self.netns_dir = netns_dir.into();
        self.proc_root = proc_root.into();
        self
    }

    /// Is the namespace the plan named still there, and the same one? A
    /// namespace deleted (or a name reused) since the plan is never touched.
    pub(crate) fn still_there(&self, ns: &NetnsRef) -> Result<bool, AgentError> {
        match (&ns.path, ns.id) {
            (Some(path), Some(id)) => Ok(self.ns_identity(path)? == Some(id)),
            _ => Ok(true),
        }
    }

    /// Identity of the namespace file at `path`, `None` when it does not exist.
    fn ns_identity(&self, path: &Path) -> Result<Option<NsId>, AgentError> {
        self.exec.ns_id(path).map_err(|e| AgentError::io(format!("stat {}", path.display()), e))
    }

    pub(crate) fn resolve_ns(&self, target: &TargetSpec) -> Result<NetnsRef, AgentError> {
        let (path, label) = match target {
            TargetSpec::Host => return Ok(NetnsRef { path: None, id: None, label: "host".into() }),
            TargetSpec::Netns(n) => (self.netns_dir.join(n), format!("netns {n}")),
            TargetSpec::Pid(p) => {
                if self.table.stat(*p).map_err(AgentError::ProcessTable)?.is_none() {
                    return Err(AgentError::TargetNotFound(format!("no process with pid {p}")));
                }
                (self.proc_root.join(p.to_string()).join("ns/net"), format!("pid {p}"))
            }
            other => return Err(AgentError::TargetNotFound(format!("network faults need host, netns or pid, got {other}"))),
        };
        let id =
            self.ns_identity(&path)?.ok_or_else(|| AgentError::TargetNotFound(format!("no network namespace at {}", path.display())))?;
        Ok(NetnsRef { path: Some(path), id: Some(id), label })
    }

    fn exemption_rules(&self) -> (Vec<String>, Vec<String>) {
        let (mut inp, mut out) = (Vec::new(), Vec::new());
        let p = self.exempt.agent_port;
        if p != 0 {
            inp.push(format!("tcp dport {p} accept"));
            out.push(format!("tcp sport {p} accept"));
        }
        if let Some((ip, port)) = self.exempt.coordinator {
            let fam = if ip.is_ipv4() { "ip" } else { "ip6" };
            inp.push(format!("{fam} saddr {ip} tcp sport {port} accept"));
            out.push(format!("{fam} daddr {ip} tcp dport {port} accept"));
        }
        for c in &self.exempt.cidrs {
            let fam = if c.is_v4() { "ip" } else { "ip6" };
            inp.push(format!("{fam} saddr {c} accept"));
            out.push(format!("{fam} daddr {c} accept"));
        }
        (inp, out)
    }

    /// Run a network tool (`nft`, `iptables*`, `tc`, `ip`) inside the namespace.
    /// `Err` only when it cannot be started; a failing tool is `Ok` with `success: false`.
    pub(crate) async fn run_tool(&self, ns: &NetnsRef, argv: &[&str], stdin: Option<&str>) -> Result<CmdOutput, AgentError> {
        self.exec.run(ns.path.as_deref(), argv, stdin).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                let package = match argv[0] {
                    "nft" => "nftables",
                    p if p.starts_with("iptables") => "iptables",
                    _ => "iproute2",
                };
                AgentError::MissingFeature(format!("`{}` (package {package}): not installed", argv[0]))
            } else {
                AgentError::Command { cmd: argv.join(" "), detail: e.to_string() }
            }
        })
    }

    /// Where a snapshot read was made, for its keys: "netns /run/netns/x" or "host netns".
    pub(crate) fn ns_where(ns: &NetnsRef) -> String {
        match &ns.path {
            Some(p) => format!("netns {}", p.display()),
            None => "host netns".into(),
        }
    }

    /// `Err(TargetNotFound)` unless the plan's namespace is still there (and the same one).
    pub(crate) fn ensure_there(&self, ns: &NetnsRef) -> Result<(), AgentError> {
        if self.still_there(ns)? { Ok(()) } else { Err(AgentError::TargetNotFound(format!("{} is gone (or replaced)", ns.label))) }
    }

    /// Run a read-only tool for a snapshot: its stdout, `Err(TargetNotFound)`
    /// when the namespace vanished meanwhile, a named error when the tool fails.
    pub(crate) async fn read_tool(&self, ns: &NetnsRef, argv: &[&str]) -> Result<String, AgentError> {
        let out = self.run_tool(ns, argv, None).await?;
        if out.success {
            return Ok(out.stdout);
        }
        self.ensure_there(ns)?;
        Err(AgentError::Command { cmd: format!("{} (in {})", argv.join(" "), ns.label), detail: out.stderr })
    }

    /// The nft tables a partition or loss plan touches: per family, the
    /// sorted names of that family's tables (the fault's own must be absent
    /// before apply and after revert).
    async fn snapshot_tables(&self, plan: &NetworkPlan) -> Result<Snapshot, AgentError> {
        self.ensure_there(&plan.ns)?;
        let listed = match self.exec.nft_tables(plan.ns.path.as_deref()).await {
            Ok(listed) => listed,
            Err(e) => {
                self.ensure_there(&plan.ns)?;
                return Err(AgentError::Command { cmd: format!("listing nftables tables (in {})", plan.ns.label), detail: e.to_string() });
            }
        };
        let mut families = Vec::new();
        if plan.scope.direction.ingress() {
            families.push("inet");
        }
        if plan.scope.direction.egress() {
            families.push("netdev");
        }
        let mut snap = Snapshot::default();
        for fam in families {
            let own = [plan.table.as_str(), plan.egress_table.as_str()];
            snap.insert(format!("nft tables {fam} in {}", Self::ns_where(&plan.ns)), nft_table_names(&listed, fam, &own));
        }
        Ok(snap)
    }

    /// Interfaces of the namespace other than loopback (or the one asked for).
    pub(crate) async fn interfaces_of(&self, ns: &NetnsRef, wanted: Option<&str>) -> Result<Vec<String>, AgentError> {
        let all = self.link_names(ns).await?;
        match wanted {
            Some(i) if all.iter().any(|n| n == i) => Ok(vec![i.to_string()]),
            Some(i) => Err(AgentError::TargetNotFound(format!("no interface {i:?} in {} (has: {})", ns.label, all.join(", ")))),
            None => Ok(all.into_iter().filter(|n| n != "lo").collect()),
        }
    }

    /// The namespace's interface names, `lo` included (rtnetlink, in-process);
    /// `Err(TargetNotFound)` when the namespace is gone.
    pub(crate) async fn link_names(&self, ns: &NetnsRef) -> Result<Vec<String>, AgentError> {
        match self.exec.link_names(ns.path.as_deref()).await {
            Ok(names) => Ok(names),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || !self.still_there(ns).unwrap_or(true) => {
                Err(AgentError::TargetNotFound(format!("{} is gone (or replaced): {e}", ns.label)))
            }
            Err(e) => Err(AgentError::Command { cmd: format!("rtnetlink link dump (in {})", ns.label), detail: e.to_string() }),
        }
    }
}

/// The sorted names of `family`'s tables in `nft list tables` output ("table inet x"), "(none)" if none.
///
/// Tables of other chaos faults (`chaos_*` not in `own`) are left out: they
/// come and go with their own faults, which are checked apart.
pub fn nft_table_names(listed: &str, family: &str, own: &[&str]) -> String {
    let mut names: Vec<&str> = listed
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("table") && w.next() == Some(family)).then(|| w.next()).flatten()
        })
        .filter(|n| !n.starts_with("chaos_") || own.contains(n))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() { "(none)".into() } else { names.join(", ") }
}

/// nft table names allow letters, digits and '_'.
fn table_name(id: &str) -> String {
    let clean: String = id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("chaos_{clean}")
}

/// Match expressions for the scope, one list per drop rule. `dir` is
/// "saddr" for ingress, "daddr" for egress.
fn drop_matches(scope: &NetScope, dir: &str) -> Vec<String> {
    let mut addr: Vec<String> = Vec::new();
    let v4: Vec<String> = scope.peers.iter().filter(|c| c.is_v4()).map(ToString::to_string).collect();
    let v6: Vec<String> = scope.peers.iter().filter(|c| !c.is_v4()).map(ToString::to_string).collect();
    if !v4.is_empty() {
        addr.push(format!("ip {dir} {{ {} }}", v4.join(", ")));
    }
    if !v6.is_empty() {
        addr.push(format!("ip6 {dir} {{ {} }}", v6.join(", ")));
    }
    if addr.is_empty() {
        addr.push(String::new());
    }
    let proto = match scope.protocol {
        None if scope.ports.is_empty() => vec![String::new()],
        None => vec!["meta l4proto { tcp, udp }".to_string()],
        Some(Protocol::Tcp) => vec!["meta l4proto tcp".to_string()],
        Some(Protocol::Udp) => vec!["meta l4proto udp".to_string()],
        Some(Protocol::Icmp) => vec!["meta l4proto { icmp, ipv6-icmp }".to_string()],
    };
    let ports: Vec<String> = if scope.ports.is_empty() {
        vec![String::new()]
    } else {
        let set = scope.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        vec![format!("th sport {{ {set} }}"), format!("th dport {{ {set} }}")]
    };
    let mut rules = Vec::new();
    for a in &addr {
        for p in &proto {
            for port in &ports {
                let m: Vec<&str> = [a.as_str(), p.as_str(), port.as_str()].into_iter().filter(|s| !s.is_empty()).collect();
                rules.push(m.join(" "));
            }
        }
    }
    rules
}

/// The nft script that adds the fault's tables. Closing braces stand on
/// their own lines (nft 1.0.6 rejects `drop } }`).
pub fn render(plan: &NetworkPlan, egress_devices: &[String]) -> String {
    let mut s = String::new();
    if plan.scope.direction.ingress() {
        let _ = writeln!(s, "table inet {} {{", plan.table);
        let _ = writeln!(s, "\tchain input {{\n\t\ttype filter hook input priority -300; policy accept;");
        let iface = plan.scope.interface.as_ref().map(|i| format!("iifname \"{i}\" ")).unwrap_or_default();
        let _ = writeln!(s, "\t\tiifname \"lo\" accept");
        for r in &plan.exempt_in {
            let _ = writeln!(s, "\t\t{r}");
        }
        for m in drop_matches(&plan.scope, "saddr") {
            let _ = writeln!(s, "\t\t{}", format!("{iface}{m} {}drop", sample(plan)).trim());
        }
        let _ = writeln!(s, "\t}}\n}}");
    }
    if plan.scope.direction.egress() && !egress_devices.is_empty() {
        let _ = writeln!(s, "table netdev {} {{", plan.egress_table);
        for dev in egress_devices {
            let _ = writeln!(s, "\tchain egress_{} {{", dev.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
            let _ = writeln!(s, "\t\ttype filter hook egress device \"{dev}\" priority -300; policy accept;");
            for r in &plan.exempt_out {
                let _ = writeln!(s, "\t\t{r}");
            }
            for m in drop_matches(&plan.scope, "daddr") {
                // netdev sees every frame: restrict an address-less drop to IP so ARP/ND still flow.
                let m = if m.is_empty() || !m.contains("ip") { format!("meta protocol {{ ip, ip6 }} {m}") } else { m };
                let _ = writeln!(s, "\t\t{} {}drop", m.trim(), sample(plan));
            }
            let _ = writeln!(s, "\t}}");
        }
        let _ = writeln!(s, "}}");
    }
    s
}

/// (family, table, rule count) of each table a script from [`render`] adds: its
/// rules are the lines two tabs in, but for the chains' `type` lines.
fn rendered_rules(script: &str) -> Vec<(String, String, usize)> {
    let mut tables: Vec<(String, String, usize)> = Vec::new();
    for line in script.lines() {
        let mut w = line.split_whitespace();
        if line.starts_with("table ") {
            let (_, fam, t) = (w.next(), w.next().unwrap_or_default(), w.next().unwrap_or_default());
            tables.push((fam.to_string(), t.to_string(), 0));
        } else if let (Some(t), Some(rule)) = (tables.last_mut(), line.strip_prefix("\t\t")) {
            t.2 += usize::from(!rule.starts_with("type "));
        }
    }
    tables
}

/// How many rules `nft --echo` says the kernel committed to `family` `table`:
/// `None` when it did not echo the table itself.
fn echoed_rules(echo: &str, family: &str, table: &str) -> Option<usize> {
    let made = echo.lines().any(|l| l.trim_end() == format!("add table {family} {table}"));
    let rule = format!("add rule {family} {table} ");
    made.then(|| echo.lines().filter(|l| l.starts_with(&rule)).count())
}

/// The random draw that turns a drop into a loss: `numgen random mod 10000 < N`.
fn sample(plan: &NetworkPlan) -> String {
    match plan.loss_permyriad {
        None => String::new(),
        Some(n) => format!("numgen random mod 10000 < {n} "),
    }
}

fn plan_of(plan: &Plan) -> Result<&NetworkPlan, AgentError> {
    match plan {
        Plan::Network(p) => Ok(p),
        other => Err(AgentError::Command { cmd: "network driver".into(), detail: format!("given a foreign plan {other:?}") }),
    }
}

#[async_trait]
impl FaultDriver for NetworkDriver {
    async fn plan(&self, req: &FaultRequest) -> Result<Plan, AgentError> {
        let id = req.id.as_deref().unwrap_or("unnamed");
        let (scope, loss_permyriad) = match &req.kind {
            FaultKind::NetworkPartition { scope } => (scope, None),
            FaultKind::NetworkLoss { scope, permyriad, correlation_permyriad } if *correlation_permyriad > 0 => {
                let netem = Netem { loss_permyriad: *permyriad, loss_correlation_permyriad: *correlation_permyriad, ..Default::default() };
                return self
                    .plan_netem(id, req, scope, netem, None, "loss correlation (nftables numgen draws each packet independently)")
                    .await;
            }
            FaultKind::NetworkLoss { scope, permyriad, .. } => (scope, Some(*permyriad)),
            FaultKind::NetworkLatency { scope, delay, jitter, correlation_permyriad } => {
                let engine =
                    Profile { delay: *delay, jitter: *jitter, correlation_permyriad: *correlation_permyriad, ..Default::default() };
                if *correlation_permyriad > 0 {
                    // The engine on every kernel: netem's correlated delay keeps almost none of the
                    // correlation (lag-1 about 0.1 for 75 % on Debian's 6.1, in the VM suite).
                    return Ok(Plan::Latency(Box::new(self.plan_latency(id, &req.target, scope, engine).await?)));
                }
                let netem = Netem { delay: *delay, jitter: *jitter, ..Default::default() };
                return self.plan_netem(id, req, scope, netem, Some(engine), "latency").await;
            }
            FaultKind::NetworkCorrupt { scope, permyriad } => {
                let netem = Netem { corrupt_permyriad: *permyriad, ..Default::default() };
                let engine = Profile { corrupt_permyriad: *permyriad, ..Default::default() };
                return self.plan_netem(id, req, scope, netem, Some(engine), "corruption").await;
            }
            FaultKind::NetworkDuplicate { scope, permyriad } => {
                let netem = Netem { duplicate_permyriad: *permyriad, ..Default::default() };
                let engine = Profile { duplicate_permyriad: *permyriad, ..Default::default() };
                return self.plan_netem(id, req, scope, netem, Some(engine), "duplication").await;
            }
            FaultKind::NetworkReorder { scope, permyriad, delay } => {
                let netem = Netem { delay: *delay, reorder_permyriad: *permyriad, ..Default::default() };
                let engine = Profile { delay: *delay, pass_permyriad: *permyriad, ..Default::default() };
                return self.plan_netem(id, req, scope, netem, Some(engine), "reorder").await;
            }
            FaultKind::NetworkBandwidth { scope, rate_bits_per_second, burst_bytes } => {
                return Ok(Plan::Bandwidth(Box::new(
                    self.plan_tc(id, &req.target, scope, *rate_bits_per_second, *burst_bytes, None).await?,
                )));
            }
            other => return Err(AgentError::Command { cmd: "network driver".into(), detail: format!("cannot plan {}", other.family()) }),
        };
        if self.firewall == Firewall::Iptables {
            let mut plan = self.plan_latency(id, &req.target, scope, Profile::default()).await?;
            plan.drop_permyriad = Some(loss_permyriad.unwrap_or(10_000));
            return Ok(Plan::Latency(Box::new(plan)));
        }
        let ns = self.resolve_ns(&req.target)?;
        let (exempt_in, exempt_out) = self.exemption_rules();
        let table = table_name(id);
        Ok(Plan::Network(Box::new(NetworkPlan {
            ns,
            scope: scope.clone(),
            egress_table: format!("{table}_eg"),
            table,
            exempt_in,
            exempt_out,
            loss_permyriad,
        })))
    }

    async fn apply(&self, plan: &Plan) -> Result<Applied, AgentError> {
        match plan {
            Plan::Latency(l) => return self.apply_latency(l).await,
            Plan::Bandwidth(b) => return self.apply_bandwidth(b).await,
            _ => {}
        }
        let plan = plan_of(plan)?;
        let devices = if plan.scope.direction.egress() {
            self.interfaces_of(&plan.ns, plan.scope.interface.as_deref()).await?
        } else {
            // Ingress only: `iifname "nosuch"` is valid nft and matches nothing, so the name is checked here.
            if let Some(i) = plan.scope.interface.as_deref() {
                self.interfaces_of(&plan.ns, Some(i)).await?;
            }
            Vec::new()
        };
        if !plan.scope.direction.ingress() && devices.is_empty() {
            return Err(AgentError::TargetNotFound(format!("{} has no interface besides lo to drop egress on", plan.ns.label)));
        }
        let script = render(plan, &devices);
        // One transaction, and --echo: the kernel sends back each object it committed, which is
        // the read-back (a `list` in the same run would read nft's cache, not the kernel).
        let out = self.run_tool(&plan.ns, &["nft", "--echo", "-f", "-"], Some(&script)).await?;
        if !out.success {
            return Err(AgentError::Command { cmd: format!("nft -f - (in {})", plan.ns.label), detail: out.stderr });
        }
        let tables = rendered_rules(&script);
        for (fam, t, want) in &tables {
            let got = echoed_rules(&out.stdout, fam, t);
            if got != Some(*want) {
                return Err(AgentError::Command {
                    cmd: format!("nft --echo -f - (in {})", plan.ns.label),
                    detail: format!(
                        "rules not in place after apply: the kernel echoed {} of the {want} rules of table {fam} {t}",
                        got.map_or("no table and none".to_string(), |n| n.to_string())
                    ),
                });
            }
        }
        let peers = if plan.scope.peers.is_empty() {
            "every peer".to_string()
        } else {
            plan.scope.peers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        };
        let what = super::drop_text(plan.loss_permyriad.unwrap_or(10_000));
        let summary = format!(
            "{what} in {}: dropping {:?} traffic with {peers}{}; tables {} (verified); control channel exempt",
            plan.ns.label,
            plan.scope.direction,
            if devices.is_empty() { String::new() } else { format!(" (egress on {})", devices.join(", ")) },
            tables.iter().map(|(f, t, _)| format!("{f} {t}")).collect::<Vec<_>>().join(", "),
        );
        Ok(Applied { backend: "nftables", processes: Vec::new(), summary, ..Default::default() })
    }

    async fn revert(&self, plan: &Plan) -> Result<String, AgentError> {
        let (ns, result) = match plan {
            Plan::Latency(l) => (&l.ns, self.revert_latency(l).await),
            Plan::Bandwidth(b) => (&b.ns, self.revert_bandwidth(b).await),
            other => {
                let p = plan_of(other)?;
                (&p.ns, self.revert_tables(p).await)
            }
        };
        match result {
            // A namespace deleted while its fault was being reverted leaves nothing behind.
            Err(e) if !self.still_there(ns).unwrap_or(true) => {
                Ok(format!("{} disappeared during the revert ({e}): nothing left to remove", ns.label))
            }
            other => other,
        }
    }

    async fn snapshot(&self, plan: &Plan) -> Result<Option<Snapshot>, AgentError> {
        match plan {
            Plan::Latency(l) => self.snapshot_latency(l).await.map(Some),
            Plan::Bandwidth(b) => self.snapshot_bandwidth(b).await.map(Some),
            other => self.snapshot_tables(plan_of(other)?).await.map(Some),
        }
    }

    /// The packet engine's counters: what it has done so far, not what was asked.
    fn observe(&self, plan: &Plan) -> Option<Observation> {
        let Plan::Latency(l) = plan else { return None };
        let engines = self.engines.lock().unwrap_or_else(|p| p.into_inner());
        let s = &engines.get(&l.chain_in)?.stats;
        let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
        let mut achieved = vec![("packets_handled".to_string(), n(&s.held))];
        // Fail-open: packets the kernel let pass undelayed because the engine's socket was full.
        achieved.push(("packets_passed_undelayed".to_string(), n(&s.passed_undelayed)));
        if l.profile.corrupt_permyriad > 0 {
            achieved.push(("packets_corrupted".to_string(), n(&s.corrupted)));
        }
        if l.profile.duplicate_permyriad > 0 {
            achieved.push(("packets_duplicated".to_string(), n(&s.duplicated)));
        }
        Some(Observation { achieved, outcome: None })
    }
}

impl NetworkDriver {
    /// sch_netem where the kernel has it; else the NFQUEUE engine's `fallback`,
    /// or, when there is none for this fault (`what` names it), a refusal naming sch_netem.
    async fn plan_netem(
        &self,
        id: &str,
        req: &FaultRequest,
        scope: &NetScope,
        netem: Netem,
        fallback: Option<Profile>,
        what: &str,
    ) -> Result<Plan, AgentError> {
        if self.netem {
            return Ok(Plan::Bandwidth(Box::new(self.plan_tc(id, &req.target, scope, 0, 0, Some(netem)).await?)));
        }
        match fallback {
            Some(profile) => Ok(Plan::Latency(Box::new(self.plan_latency(id, &req.target, scope, profile).await?))),
            None => Err(AgentError::MissingFeature(format!(
                "{what}: it needs sch_netem, which this kernel does not have (probed at agent start), and the fallback engine cannot do it"
            ))),
        }
    }

    async fn revert_tables(&self, plan: &NetworkPlan) -> Result<String, AgentError> {
        if !self.still_there(&plan.ns)? {
            return Ok(format!("{} is gone (or replaced): nothing left to remove", plan.ns.label));
        }
        // The tables its apply makes, in one transaction; if one is missing (an apply that never
        // ran, a table removed by hand) the transaction changes nothing and each goes alone.
        let mut tables = Vec::new();
        if plan.scope.direction.ingress() {
            tables.push(("inet", plan.table.as_str()));
        }
        if plan.scope.direction.egress() {
            tables.push(("netdev", plan.egress_table.as_str()));
        }
        let ns = plan.ns.path.as_deref();
        let removed = match self.exec.nft_delete_tables(ns, &tables).await {
            Ok(()) => tables.iter().map(|(fam, t)| format!("{fam} {t}")).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // (Also what a namespace deleted meanwhile gives.)
                self.ensure_there(&plan.ns)?;
                let mut removed = Vec::new();
                for (fam, t) in &tables {
                    match self.exec.nft_delete_tables(ns, &[(fam, t)]).await {
                        Ok(()) => removed.push(format!("{fam} {t}")),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(AgentError::Command {
                                cmd: format!("delete table {fam} {t} (in {})", plan.ns.label),
                                detail: e.to_string(),
                            });
                        }
                    }
                }
                removed
            }
            Err(e) => {
                let what = tables.iter().map(|(fam, t)| format!("{fam} {t}")).collect::<Vec<_>>().join(", ");
                return Err(AgentError::Command { cmd: format!("delete tables {what} (in {})", plan.ns.label), detail: e.to_string() });
            }
        };
        Ok(if removed.is_empty() {
            format!("no tables left in {}", plan.ns.label)
        } else {
            format!("removed {} from {}", removed.join(", "), plan.ns.label)
        })
    }
}

/// The version line of a tool, or why it is unusable (for capabilities;
/// a fault re-checks by running it). E.g. `tool_version("nft", "--version", "nftables")`.
pub fn tool_version(cmd: &str, flag: &str, package: &str) -> Result<String, String> {
    match std::process::Command::new(cmd).arg(flag).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("`{cmd}` not found ({e}): install {package}")),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use chaos_proto::spec::Direction;

    use std::path::Path;

    use super::*;
    use crate::sys::{fake::FakeProcs, netexec::FakeExec};

    fn driver(exec: &FakeExec) -> NetworkDriver {
        let exempt = Exemptions {
            agent_port: 50052,
            coordinator: Some(("198.18.0.1".parse().expect("ip"), 50051)),
            cidrs: vec!["198.18.9.0/24".parse().expect("cidr")],
        };
        NetworkDriver::new(Arc::new(exec.clone()), Arc::new(FakeProcs::default()), exempt).with_roots("/run/netns", "/proc")
    }

    fn req(target: TargetSpec, scope: NetScope) -> FaultRequest {
        FaultRequest {
            id: Some("f-1".into()),
            target,
            duration: Duration::from_secs(5),
            labels: BTreeMap::new(),
            kind: FaultKind::NetworkPartition { scope },
        }
    }

    fn scope(peers: &[&str], direction: Direction) -> NetScope {
        NetScope {
            interface: None,
            peers: peers.iter().map(|p| p.parse().expect("cidr")).collect(),
            ports: vec![],
            protocol: None,
            direction,
        }
    }

    #[tokio::test]
    async fn apply_renders_one_transaction_with_exemptions_first_and_verifies() {
        let exec = FakeExec::default();
        exec.add_namespace("/run/netns/lab-a", (1, 42));
        exec.answer(
            "link names",
            CmdOutput { success: true, stdout: "1: lo: <LOOPBACK>\n2: veth0@if3: <UP>\n".into(), stderr: String::new() },
        );
        let d = driver(&exec);
        let plan = d.plan(&req(TargetSpec::Netns("lab-a".into()), scope(&["198.18.0.3"], Direction::Both))).await.expect("plan");
        assert!(exec.calls().is_empty(), "plan has no side effects");
        let a = d.apply(&plan).await.expect("apply");
        assert_eq!(a.backend, "nftables");
        let calls = exec.calls();
        let script = calls.iter().find_map(|c| c.stdin.clone()).expect("nft -f - script");
        assert!(calls.iter().all(|c| c.ns.as_deref() == Some(Path::new("/run/netns/lab-a"))), "every command in the target netns");
        assert!(script.contains("table inet chaos_f_1 {"), "{script}");
        assert!(script.contains("hook egress device \"veth0\""), "{script}");
        assert!(!script.contains("device \"lo\""), "{script}");
        let exempt_at = script.find("ip saddr 198.18.0.1 tcp sport 50051 accept").expect("coordinator exempt");
        let drop_at = script.find("ip saddr { 198.18.0.3/32 } drop").expect("ingress drop");
        assert!(exempt_at < drop_at, "exemptions come before drops:\n{script}");
        assert!(script.contains("tcp dport 50052 accept") && script.contains("ip daddr 198.18.9.0/24 accept"), "{script}");
        assert!(script.contains("ip daddr { 198.18.0.3/32 } drop"), "{script}");
        for line in script.lines() {
            assert!(!line.contains("drop }"), "closing braces on their own lines: {line}");
        }
    }

    #[tokio::test]
    async fn loss_draws_each_packet_and_correlation_is_refused_by_name() {
        let exec = FakeExec::default();
        let d = driver(&exec);
        let mut r = req(TargetSpec::Host, scope(&["198.18.0.3"], Direction::Ingress));
        r.kind = FaultKind::NetworkLoss { scope: scope(&["198.18.0.3"], Direction::Ingress), permyriad: 1050, correlation_permyriad: 0 };
        let plan = d.plan(&r).await.expect("plan");
        let a = d.apply(&plan).await.expect("apply");
        assert!(a.summary.starts_with("loss 10.50 %"), "{}", a.summary);
        let script = exec.calls().iter().find_map(|c| c.stdin.clone()).expect("script");
        assert!(script.contains("ip saddr { 198.18.0.3/32 } numgen random mod 10000 < 1050 drop"), "{script}");
        assert!(script.contains("tcp dport 50052 accept\n"), "exemptions are never sampled:\n{script}");
        r.kind = FaultKind::NetworkLoss { scope: scope(&[], Direction::Ingress), permyriad: 1000, correlation_permyriad: 2500 };
        let e = d.plan(&r).await.expect_err("correlation");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("sch_netem"), "{e}");
    }

    #[tokio::test]
    async fn revert_deletes_its_tables_and_tolerates_missing_ones_and_gone_namespaces() {
        let exec = FakeExec::default();
        exec.add_namespace("/run/netns/lab-a", (1, 42));
        let d = driver(&exec);
        let plan = d.plan(&req(TargetSpec::Netns("lab-a".into()), scope(&[], Direction::Both))).await.expect("plan");
        // Both tables in one transaction.
        let s = d.revert(&plan).await.expect("revert");
        assert_eq!(s, "removed inet chaos_f_1, netdev chaos_f_1_eg from netns lab-a");
        let c = exec.calls().pop().expect("the delete");
        assert_eq!(
            (c.argv.join(" "), c.stdin.as_deref()),
            ("nft -f -".into(), Some("delete table inet chaos_f_1\ndelete table netdev chaos_f_1_eg\n"))
        );
        // One of them missing: the transaction changes nothing, so each goes alone.
        let missing = CmdOutput { success: false, stdout: String::new(), stderr: "Error: No such file or directory".into() };
        let done = CmdOutput { success: true, ..Default::default() };
        exec.answer_in_turn("nft -f -", vec![missing.clone(), done.clone(), missing, done]);
        let s = d.revert(&plan).await.expect("revert");
        assert_eq!(s, "removed inet chaos_f_1 from netns lab-a");
        let calls: Vec<String> = exec.calls().iter().rev().take(2).filter_map(|c| c.stdin.clone()).collect();
        assert_eq!(calls, ["delete table netdev chaos_f_1_eg\n", "delete table inet chaos_f_1\n"]);
        exec.remove_namespace(Path::new("/run/netns/lab-a"));
        exec.add_namespace("/run/netns/lab-a", (1, 99)); // same name, another namespace
        let before = exec.calls().len();
        let s = d.revert(&plan).await.expect("revert");
        assert!(s.contains("gone"), "{s}");
        assert_eq!(exec.calls().len(), before, "a replaced namespace is never touched");
    }

    #[tokio::test]
    async fn apply_is_verified_by_the_kernels_echo_of_every_rule() {
        let exec = FakeExec::default();
        let d = driver(&exec);
        let plan = d.plan(&req(TargetSpec::Host, scope(&["198.18.0.3"], Direction::Ingress))).await.expect("plan");
        // The fake echoes each table and rule of the script, as the kernel does.
        let a = d.apply(&plan).await.expect("apply");
        assert!(a.summary.contains("tables inet chaos_f_1 (verified)"), "{}", a.summary);
        let script = exec.calls().iter().find_map(|c| c.stdin.clone()).expect("script");
        assert_eq!(
            rendered_rules(&script),
            vec![("inet".to_string(), "chaos_f_1".to_string(), 5)],
            "lo, 3 exemptions, the drop:\n{script}"
        );
        // A kernel that echoes fewer rules than were sent: refused, naming the table and counts.
        let short = "add table inet chaos_f_1\nadd chain inet chaos_f_1 input { type filter hook input priority raw; policy accept; }\nadd rule inet chaos_f_1 input iifname \"lo\" accept\n";
        let echo = |text: &str| CmdOutput { success: true, stdout: text.into(), stderr: String::new() };
        exec.answer_in_turn("nft --echo", vec![echo(short), echo("")]);
        let e = d.apply(&plan).await.expect_err("not all in place");
        assert!(e.to_string().contains("the kernel echoed 1 of the 5 rules of table inet chaos_f_1"), "{e}");
        let e = d.apply(&plan).await.expect_err("no echo");
        assert!(e.to_string().contains("echoed no table and none of the 5 rules"), "{e}");
    }

    #[tokio::test]
    async fn a_namespace_vanishing_mid_revert_counts_as_reverted() {
        let exec = FakeExec::default();
        exec.add_namespace("/run/netns/lab-a", (1, 42));
        let d = driver(&exec);
        let plan = d.plan(&req(TargetSpec::Netns("lab-a".into()), scope(&[], Direction::Ingress))).await.expect("plan");
        exec.vanish_on("nft -f", "/run/netns/lab-a");
        let s = d.revert(&plan).await.expect("a vanished namespace is not a failed revert");
        assert!(s.contains("disappeared during the revert"), "{s}");
    }

    #[tokio::test]
    async fn missing_nft_is_a_named_precondition_and_missing_netns_not_found() {
        let exec = FakeExec::default();
        let d = driver(&exec);
        let e = d.plan(&req(TargetSpec::Netns("nope".into()), scope(&[], Direction::Ingress))).await.expect_err("no ns");
        assert!(matches!(e, AgentError::TargetNotFound(_)) && e.to_string().contains("/run/netns/nope"), "{e}");
        exec.set_missing_program(true);
        let plan = d.plan(&req(TargetSpec::Host, scope(&[], Direction::Ingress))).await.expect("plan");
        let e = d.apply(&plan).await.expect_err("no nft");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("nftables"), "{e}");
    }

    #[test]
    fn scope_with_ports_and_protocol_matches_both_port_directions() {
        let mut sc = scope(&["198.18.0.3", "2001:db8::/64"], Direction::Ingress);
        sc.ports = vec![9092];
        sc.protocol = Some(Protocol::Tcp);
        let m = drop_matches(&sc, "saddr");
        assert_eq!(m.len(), 4);
        assert!(m.contains(&"ip saddr { 198.18.0.3/32 } meta l4proto tcp th sport { 9092 }".to_string()), "{m:?}");
        assert!(m.contains(&"ip6 saddr { 2001:db8::/64 } meta l4proto tcp th dport { 9092 }".to_string()), "{m:?}");
        assert_eq!(crate::sys::netexec::parse_link_names("1: lo: <LOOPBACK>\n5: eth0@if6: <UP>\n"), vec!["lo", "eth0"]);
    }

    fn ok(stdout: &str) -> CmdOutput {
        CmdOutput { success: true, stdout: stdout.into(), stderr: String::new() }
    }

    #[tokio::test]
    async fn with_netem_latency_is_a_netem_leaf_under_htb_both_ways_and_revert_undoes_it_all() {
        let exec = FakeExec::default();
        exec.add_namespace("/run/netns/lab-a", (1, 42));
        let h = format!("{:x}:", super::super::bandwidth::handle_for("f-1"));
        let ifb = super::super::bandwidth::ifb_name(super::super::bandwidth::handle_for("f-1"), 0);
        exec.answer("link names", ok("1: lo: <LOOPBACK>\n2: veth0@if3: <UP>\n"));
        let ours = format!("qdisc htb {h} root refcnt 2\nqdisc netem 1: parent {h}10 limit 3000\n");
        let with_ingress = format!("{ours}qdisc ingress ffff: parent ffff:fff1 ----------------\n");
        exec.answer_in_turn("qdisc show dev veth0", vec![ok("qdisc noqueue 0: root refcnt 2\n"), ok(&with_ingress)]);
        exec.answer(&format!("qdisc show dev {ifb}"), ok(&ours));
        exec.answer(
            "filter show dev veth0 ingress",
            ok(&format!(
                "filter parent ffff: protocol all pref 1 u32 ... action order 1: mirred (Egress Redirect to device {ifb}) stolen\n"
            )),
        );
        let d = driver(&exec).with_netem(true);
        let mut r = req(TargetSpec::Netns("lab-a".into()), scope(&["198.18.0.3"], Direction::Both));
        r.kind = FaultKind::NetworkLatency {
            scope: scope(&["198.18.0.3"], Direction::Both),
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(10),
            correlation_permyriad: 0,
        };
        let plan = d.plan(&r).await.expect("plan");
        assert!(matches!(plan, Plan::Bandwidth(_)), "netem, not the engine: {plan:?}");
        let a = d.apply(&plan).await.expect("apply");
        assert_eq!(a.backend, "tc-netem");
        let calls = exec.calls();
        let argv: Vec<String> = calls.iter().map(|c| c.argv.join(" ")).collect();
        let add_ifb = argv.iter().position(|c| c == &format!("ip link add {ifb} type ifb")).expect("ifb created");
        let batch_at = argv.iter().position(|c| c == "tc -batch -").expect("one tc batch");
        assert!(add_ifb < batch_at, "the ifb exists before the batch uses it: {argv:#?}");
        let script = calls[batch_at].stdin.clone().expect("batch");
        let lines: Vec<&str> = script.lines().collect();
        assert!(
            lines.contains(&format!("class add dev veth0 parent {h} classid {h}10 htb rate 100gbit ceil 100gbit").as_str()),
            "{script}"
        );
        assert!(script.contains("netem limit 3000 delay 50000us 10000us"), "{script}");
        assert!(
            lines.contains(
                &format!("filter add dev veth0 parent {h} protocol ip prio 1 u32 match ip sport 50052 0xffff flowid {h}0").as_str()
            ),
            "{script}"
        );
        assert!(
            lines.contains(
                &format!("filter add dev {ifb} parent {h} protocol ip prio 1 u32 match ip dport 50052 0xffff flowid {h}0").as_str()
            ),
            "{script}"
        );
        assert!(lines.contains(&format!("filter add dev {ifb} parent {h} protocol ip prio 1 u32 match ip src 198.18.0.1/32 match ip sport 50051 0xffff flowid {h}0").as_str()), "{script}");
        assert!(
            lines.contains(
                &format!("filter add dev veth0 parent {h} protocol ip prio 2 u32 match ip dst 198.18.0.3/32 flowid {h}10").as_str()
            ),
            "{script}"
        );
        assert!(
            lines.contains(
                &format!("filter add dev {ifb} parent {h} protocol ip prio 2 u32 match ip src 198.18.0.3/32 flowid {h}10").as_str()
            ),
            "{script}"
        );
        assert_eq!(
            lines.last().copied(),
            Some(
                format!("filter add dev veth0 parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev {ifb}")
                    .as_str()
            ),
            "the redirect comes last, once the ifb's tree is ready"
        );
        let before = exec.calls().len();
        let s = d.revert(&plan).await.expect("revert");
        let undo: Vec<String> = exec.calls()[before..].iter().map(|c| c.argv.join(" ")).collect();
        for want in
            ["tc qdisc del dev veth0 ingress".to_string(), format!("ip link del {ifb}"), format!("tc qdisc del dev veth0 root handle {h}")]
        {
            assert!(undo.contains(&want), "revert runs `{want}`: {undo:#?}");
        }
        assert!(s.contains("veth0 restored") && s.contains(&format!("{ifb} removed")), "{s}");
    }

    #[tokio::test]
    async fn nft_snapshot_reads_the_plans_families_and_names_a_table_left_behind() {
        let exec = FakeExec::default();
        exec.add_namespace("/run/netns/lab-a", (1, 42));
        exec.answer_in_turn(
            "nft list tables",
            vec![
                ok("table ip nat\ntable inet fw\n"),
                ok("table ip nat\ntable inet fw\ntable inet chaos_f_1\ntable netdev chaos_f_1_eg\n"),
                // Another family changed meanwhile (Docker's nat): not what the fault touches;
                // another fault's table is checked with that fault.
                ok("table ip filter\ntable inet fw\ntable ip nat\ntable inet chaos_other\n"),
            ],
        );
        let d = driver(&exec);
        let plan = d.plan(&req(TargetSpec::Netns("lab-a".into()), scope(&["198.18.0.3"], Direction::Both))).await.expect("plan");
        let before = d.snapshot(&plan).await.expect("snapshot").expect("nft plans are compared");
        let want: BTreeMap<String, String> = [
            ("nft tables inet in netns /run/netns/lab-a".to_string(), "fw".to_string()),
            ("nft tables netdev in netns /run/netns/lab-a".to_string(), "(none)".to_string()),
        ]
        .into();
        assert_eq!(before.items, want);
        let calls = exec.calls();
        assert_eq!(calls.len(), 1, "one read: {calls:?}");
        assert_eq!((calls[0].ns.as_deref(), calls[0].argv.join(" ")), (Some(Path::new("/run/netns/lab-a")), "nft list tables".into()));
        let left = d.snapshot(&plan).await.expect("snapshot").expect("some");
        assert_eq!(
            left.differences(&before),
            vec![
                r#"nft tables inet in netns /run/netns/lab-a: was "fw", now "chaos_f_1, fw""#.to_string(),
                r#"nft tables netdev in netns /run/netns/lab-a: was "(none)", now "chaos_f_1_eg""#.to_string(),
            ]
        );
        let after = d.snapshot(&plan).await.expect("snapshot").expect("some");
        assert!(after.differences(&before).is_empty(), "{:?}", after.differences(&before));
        exec.remove_namespace(Path::new("/run/netns/lab-a"));
        let e = d.snapshot(&plan).await.expect_err("gone");
        assert!(matches!(e, AgentError::TargetNotFound(_)), "{e}");
    }

    #[tokio::test]
    async fn latency_snapshot_reads_the_raw_chains_without_counters_and_names_a_jump_left_behind() {
        let exec = FakeExec::default();
        exec.add_namespace("/run/netns/lab-a", (1, 42));
        let saved = |when: &str, counters: &str, rules: &str| {
            ok(&format!(
                "# Generated by iptables-save v1.8.9 (nf_tables) on {when}\n*raw\n:PREROUTING ACCEPT [{counters}]\n:OUTPUT ACCEPT [0:0]\n{rules}COMMIT\n# Completed on {when}\n"
            ))
        };
        exec.answer_in_turn(
            "iptables-save -t raw",
            vec![
                saved("Thu Dec  3 09:46:39 2026", "0:0", ""),
                saved("Thu Dec  3 09:47:01 2026", "12:3400", "-A PREROUTING ! -i lo -j CHAOS-f1-I\n"),
                saved("Thu Dec  3 09:47:02 2026", "15:4000", ""),
                // Another fault's chain and jump (this agent's or another's).
                saved("Thu Dec  3 09:47:03 2026", "16:4100", ":CHAOS-other-I - [0:0]\n-A PREROUTING ! -i lo -j CHAOS-other-I\n"),
            ],
        );
        // The plan's read (no raw table: the fault's apply would make it), then the snapshots'.
        exec.answer_in_turn("nft list tables", vec![ok(""), ok(""), ok("table ip raw\n"), ok(""), ok("table ip raw\n")]);
        let d = driver(&exec);
        let mut r = req(TargetSpec::Netns("lab-a".into()), scope(&["198.18.0.3"], Direction::Ingress));
        r.kind = FaultKind::NetworkLatency {
            scope: scope(&["198.18.0.3"], Direction::Ingress),
            delay: Duration::from_millis(50),
            jitter: Duration::ZERO,
            correlation_permyriad: 0,
        };
        let plan = d.plan(&r).await.expect("plan");
        assert!(matches!(plan, Plan::Latency(_)), "{plan:?}");
        let before = d.snapshot(&plan).await.expect("snapshot").expect("compared");
        let at = "in netns /run/netns/lab-a";
        assert_eq!(before.items.get(&format!("iptables raw chain PREROUTING {at}")).map(String::as_str), Some("policy ACCEPT; no rules"));
        assert_eq!(before.items.get(&format!("iptables raw chain CHAOS-f1-I {at}")).map(String::as_str), Some("absent"));
        assert_eq!(before.items.get(&format!("nft table ip raw {at}")).map(String::as_str), Some("absent"));
        let left = d.snapshot(&plan).await.expect("snapshot").expect("some");
        assert_eq!(
            left.differences(&before),
            vec![
                format!(
                    r#"iptables raw chain PREROUTING {at}: was "policy ACCEPT; no rules", now "policy ACCEPT; rules: ! -i lo -j CHAOS-f1-I""#
                ),
                format!(r#"nft table ip raw {at}: was "absent", now "present""#),
            ]
        );
        let after = d.snapshot(&plan).await.expect("snapshot").expect("some");
        assert!(after.differences(&before).is_empty(), "new counters and times are no difference: {:?}", after.differences(&before));
        let beside = d.snapshot(&plan).await.expect("snapshot").expect("some");
        assert_eq!(beside.items.get(&format!("iptables raw chain PREROUTING {at}")).map(String::as_str), Some("policy ACCEPT; no rules"));
        assert_eq!(beside.items.get(&format!("nft table ip raw {at}")).map(String::as_str), Some(crate::faults::SHARED_WITH_OTHERS));
        let saved_with_c = "*raw\n:PREROUTING ACCEPT [3:180]\n:CHAOS-x-I - [0:0]\n[3:180] -A PREROUTING ! -i lo -j CHAOS-x-I\nCOMMIT\n";
        let chains = super::super::latency::saved_chains(saved_with_c);
        assert_eq!(chains.get("PREROUTING"), Some(&("ACCEPT".to_string(), vec!["! -i lo -j CHAOS-x-I".to_string()])));
        assert_eq!(chains.get("CHAOS-x-I"), Some(&("-".to_string(), vec![])));
    }

    #[tokio::test]
    async fn tc_snapshot_reads_qdiscs_filters_and_ifbs_and_names_an_ingress_left_behind() {
        let exec = FakeExec::default();
        exec.add_namespace("/run/netns/lab-a", (1, 42));
        let ifb = super::super::bandwidth::ifb_name(super::super::bandwidth::handle_for("f-1"), 0);
        let links = "1: lo: <LOOPBACK>\n2: veth0@if3: <UP>\n";
        exec.answer_in_turn("link names", vec![ok(links), ok(links), ok(&format!("{links}4: {ifb}: <UP>\n")), ok(links)]);
        let plain = "qdisc noqueue 0: root refcnt 2 \n";
        let with_ingress = format!("{plain}qdisc ingress ffff: parent ffff:fff1 ---------------- \n");
        exec.answer_in_turn("qdisc show dev veth0", vec![ok(plain), ok(plain), ok(&with_ingress), ok("qdisc noqueue 0: root refcnt 3 \n")]);
        let redirect = format!(
            "filter parent ffff: protocol all pref 1 u32 chain 0 \n  match 00000000/00000000 at 0\n\taction order 1: mirred (Egress Redirect to device {ifb}) stolen\n\tindex 1 ref 1 bind 1\n\n"
        );
        exec.answer_in_turn("filter show dev veth0 ingress", vec![ok(""), ok(&redirect), ok("")]);
        exec.answer("filter show dev veth0", ok(""));
        let d = driver(&exec);
        let mut r = req(TargetSpec::Netns("lab-a".into()), scope(&[], Direction::Both));
        r.kind = FaultKind::NetworkBandwidth { scope: scope(&[], Direction::Both), rate_bits_per_second: 8_000_000, burst_bytes: 0 };
        let plan = d.plan(&r).await.expect("plan");
        let before = d.snapshot(&plan).await.expect("snapshot").expect("compared");
        let at = "in netns /run/netns/lab-a";
        let want: BTreeMap<String, String> = [
            (format!("ifb device {ifb} {at}"), "absent".to_string()),
            (format!("tc ingress filters of dev veth0 {at}"), "(none)".to_string()),
            (format!("tc qdiscs of dev veth0 {at}"), "qdisc noqueue 0: root".to_string()),
            (format!("tc root filters of dev veth0 {at}"), "(none)".to_string()),
        ]
        .into();
        assert_eq!(before.items, want);
        let argv: Vec<String> = exec.calls().iter().map(|c| c.argv.join(" ")).collect();
        assert!(
            argv.contains(&"tc filter show dev veth0 ingress".to_string()) && argv.contains(&"tc filter show dev veth0".to_string()),
            "{argv:#?}"
        );
        let left = d.snapshot(&plan).await.expect("snapshot").expect("some");
        let diff = left.differences(&before);
        assert_eq!(diff.len(), 3, "{diff:#?}");
        assert_eq!(diff[0], format!(r#"ifb device {ifb} {at}: was "absent", now "present""#));
        assert!(
            diff[1].starts_with(&format!("tc ingress filters of dev veth0 {at}: was \"(none)\"")) && diff[1].contains(&ifb),
            "{}",
            diff[1]
        );
        assert!(!diff[1].contains("index 1"), "action reference counts are no state: {}", diff[1]);
        assert!(diff[2].contains("qdisc ingress ffff:"), "{}", diff[2]);
        let after = d.snapshot(&plan).await.expect("snapshot").expect("some");
        assert!(after.differences(&before).is_empty(), "a new refcnt is no difference: {:?}", after.differences(&before));
        let htb = |n: u32| format!("qdisc htb c4a5: root refcnt 3 r2q 10 default 0 direct_packets_stat {n} direct_qlen 1000\n");
        assert_eq!(super::super::bandwidth::tc_normalised(&htb(7)), super::super::bandwidth::tc_normalised(&htb(9)));
        assert_eq!(super::super::bandwidth::tc_normalised(&htb(7)), "qdisc htb c4a5: root r2q 10 default 0 direct_qlen 1000");
    }

    #[tokio::test]
    async fn netem_decides_the_backend_and_what_only_netem_can_do_is_refused_without_it() {
        let exec = FakeExec::default();
        exec.answer("link names", ok("2: veth0@if3: <UP>\n"));
        exec.answer("qdisc show", ok("qdisc noqueue 0: root refcnt 2\n"));
        let eg = || scope(&["198.18.0.3"], Direction::Egress);
        let mut r = req(TargetSpec::Host, eg());
        let without = driver(&exec);
        let with = driver(&exec).with_netem(true);
        r.kind = FaultKind::NetworkCorrupt { scope: eg(), permyriad: 500 };
        assert!(matches!(without.plan(&r).await.expect("engine"), Plan::Latency(_)));
        let Plan::Bandwidth(p) = with.plan(&r).await.expect("netem") else { panic!("netem plan") };
        assert_eq!(p.netem.map(|n| n.args()), Some("limit 1000 corrupt 5.00%".to_string()));
        r.kind = FaultKind::NetworkDuplicate { scope: eg(), permyriad: 150 };
        let Plan::Bandwidth(p) = with.plan(&r).await.expect("netem") else { panic!("netem plan") };
        assert_eq!(p.netem.map(|n| n.args()), Some("limit 1000 duplicate 1.50%".to_string()));
        r.kind = FaultKind::NetworkReorder { scope: eg(), permyriad: 2500, delay: Duration::from_millis(20) };
        let Plan::Bandwidth(p) = with.plan(&r).await.expect("netem") else { panic!("netem plan") };
        assert_eq!(p.netem.map(|n| n.args()), Some("limit 1000 delay 20000us reorder 25.00%".to_string()));
        r.kind = FaultKind::NetworkLoss { scope: eg(), permyriad: 1000, correlation_permyriad: 2500 };
        let Plan::Bandwidth(p) = with.plan(&r).await.expect("netem") else { panic!("netem plan") };
        assert_eq!(p.netem.map(|n| n.args()), Some("limit 1000 loss state 7.50% 67.50%".to_string()));
        r.kind = FaultKind::NetworkLoss { scope: eg(), permyriad: 1000, correlation_permyriad: 0 };
        assert!(matches!(with.plan(&r).await.expect("nft"), Plan::Network(_)), "plain loss stays an exact nftables draw");
        r.kind = FaultKind::NetworkLatency {
            scope: eg(),
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(5),
            correlation_permyriad: 1000,
        };
        // Latency with a correlation: the engine, netem or not (netem keeps little of it).
        for d in [&without, &with] {
            let Plan::Latency(p) = d.plan(&r).await.expect("engine") else { panic!("engine plan") };
            assert_eq!(p.profile.correlation_permyriad, 1000);
        }
    }

    #[tokio::test]
    async fn a_kernel_without_netem_at_apply_is_a_named_precondition_and_nothing_is_left() {
        let exec = FakeExec::default();
        exec.answer("link names", ok("2: veth0@if3: <UP>\n"));
        exec.answer_in_turn(
            "qdisc show dev veth0",
            vec![
                ok("qdisc noqueue 0: root refcnt 2\n"),
                ok(&format!("qdisc htb {:x}: root\n", super::super::bandwidth::handle_for("f-1"))),
            ],
        );
        exec.answer(
            "tc -batch",
            CmdOutput { success: false, stdout: String::new(), stderr: "Error: Specified qdisc kind is unknown.\n".into() },
        );
        let d = driver(&exec).with_netem(true);
        let mut r = req(TargetSpec::Host, scope(&[], Direction::Egress));
        r.kind = FaultKind::NetworkCorrupt { scope: scope(&[], Direction::Egress), permyriad: 100 };
        let plan = d.plan(&r).await.expect("plan");
        let e = d.apply(&plan).await.expect_err("no netem");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("sch_netem"), "{e}");
        let argv: Vec<String> = exec.calls().iter().map(|c| c.argv.join(" ")).collect();
        assert!(argv.iter().any(|c| c.starts_with("tc qdisc del dev veth0 root handle")), "the half-built tree is removed: {argv:#?}");
    }
}
