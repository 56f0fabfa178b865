//! Latency, reorder, corruption and duplication without sch_netem: iptables
//! `NFQUEUE --queue-bypass` rules in the target namespace's `raw` table feed
//! the userspace [`delay_engine`](super::delay_engine), which holds each
//! packet for its delay, flips a bit in it or sends it twice. One atomic `iptables-restore --noflush` adds the fault's chains;
//! revert removes exactly them (and the `raw` table itself when the fault
//! was the one that created it, as iptables-nft leaves it behind).
//!
//! The same chains serve partitions and loss where nftables is unusable
//! (`firewall: iptables`): their rules DROP (all, or a `statistic` share)
//! instead of queueing. iptables has no egress hook, so an egress drop sits
//! in OUTPUT and local senders see EPERM, which the fault's summary says.
//!
//! Ingress delay (PREROUTING) is the faithful choice: delaying at the
//! sender holds packets against its socket and throttles it (measured
//! here: TCP 16.5 Mbit/s at the sender vs 364 Mbit/s at the receiver).
//! IPv4 only for now; the control channel is exempt as for every network fault.

use std::net::IpAddr;

use chaos_proto::spec::{Cidr, NetScope, Protocol};
use serde::{Deserialize, Serialize};

use super::{
    Applied, Snapshot,
    delay_engine::{DUPLICATE_MARK, Engine, Profile},
    network::{Exemptions, NetnsRef, NetworkDriver},
};
use crate::error::AgentError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyPlan {
    pub ns: NetnsRef,
    pub scope: NetScope,
    /// What the engine does to each packet (delay, reorder, corrupt, duplicate).
    #[serde(flatten)]
    pub profile: Profile,
    pub queue_num: u16,
    /// Chain names in the `raw` table: ingress (PREROUTING) and egress (OUTPUT).
    pub chain_in: String,
    pub chain_out: String,
    /// Whether `table ip raw` existed before the fault (iptables-nft creates it).
    pub raw_table_existed: bool,
    pub exemptions: Vec<String>,
    /// `Some(n)`: no engine; drop n/10000 of the packets in scope (10000: a partition).
    #[serde(default)]
    pub drop_permyriad: Option<u32>,
}

impl LatencyPlan {
    /// The jump target of the rules in scope.
    fn target(&self) -> String {
        match self.drop_permyriad {
            None => format!("-j NFQUEUE --queue-num {} --queue-bypass", self.queue_num),
            Some(n) if n >= 10_000 => "-j DROP".into(),
            Some(n) => format!("-m statistic --mode random --probability {:.4} -j DROP", f64::from(n) / 10_000.0),
        }
    }

    fn what(&self) -> String {
        match self.drop_permyriad {
            None => self.profile.describe(),
            Some(n) => super::drop_text(n),
        }
    }
}

/// One direction of a latency fault: its chain and where it hooks in.
struct Leg<'a> {
    /// Whether the fault's direction includes this leg.
    on: bool,
    chain: &'a str,
    hook: &'static str,
    /// `-i` or `-o`: the interface flag valid in this hook.
    iface_flag: &'static str,
    /// `-s` or `-d`: the peer's side of the packet.
    peer_flag: &'static str,
}

impl LatencyPlan {
    /// Ingress (PREROUTING) and egress (OUTPUT), whether on or not (revert cleans both).
    fn legs(&self) -> [Leg<'_>; 2] {
        [
            Leg { on: self.scope.direction.ingress(), chain: &self.chain_in, hook: "PREROUTING", iface_flag: "-i", peer_flag: "-s" },
            Leg { on: self.scope.direction.egress(), chain: &self.chain_out, hook: "OUTPUT", iface_flag: "-o", peer_flag: "-d" },
        ]
    }
}

/// A queue number from the fault id, in 10000..60000 (other software tends to use low numbers).
pub fn queue_num_for(id: &str) -> u16 {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    10_000 + (h % 50_000) as u16
}

/// iptables match fragments for exemptions (RETURN rules), from the shared exemptions.
pub fn exemption_matches(e: &Exemptions) -> Vec<String> {
    let mut v = Vec::new();
    if e.agent_port != 0 {
        v.push(format!("-p tcp --dport {}", e.agent_port));
        v.push(format!("-p tcp --sport {}", e.agent_port));
    }
    if let Some((IpAddr::V4(ip), port)) = e.coordinator {
        v.push(format!("-s {ip}/32 -p tcp --sport {port}"));
        v.push(format!("-d {ip}/32 -p tcp --dport {port}"));
    }
    for c in e.cidrs.iter().filter(|c| c.is_v4()) {
        v.push(format!("-s {c}"));
        v.push(format!("-d {c}"));
    }
    v
}

fn proto_port_matches(scope: &NetScope) -> Vec<String> {
    let ports = scope.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    match (scope.protocol, scope.ports.is_empty()) {
        (None, true) => vec![String::new()],
        (None, false) => vec![format!("-p tcp -m multiport --ports {ports}"), format!("-p udp -m multiport --ports {ports}")],
        (Some(Protocol::Tcp), true) => vec!["-p tcp".into()],
        (Some(Protocol::Udp), true) => vec!["-p udp".into()],
        (Some(Protocol::Tcp), false) => vec![format!("-p tcp -m multiport --ports {ports}")],
        (Some(Protocol::Udp), false) => vec![format!("-p udp -m multiport --ports {ports}")],
        (Some(Protocol::Icmp), _) => vec!["-p icmp".into()],
    }
}

/// The `iptables-restore --noflush` script that adds the fault.
pub fn render(plan: &LatencyPlan) -> String {
    let mut s = String::from("*raw\n");
    let legs: Vec<Leg<'_>> = plan.legs().into_iter().filter(|l| l.on).collect();
    for leg in &legs {
        s.push_str(&format!(":{} - [0:0]\n", leg.chain));
    }
    for Leg { chain, hook, iface_flag, peer_flag, .. } in &legs {
        if plan.profile.duplicate_permyriad > 0 {
            // The engine's own copies pass, or they would be queued (and copied) again.
            s.push_str(&format!("-A {chain} -m mark --mark {DUPLICATE_MARK:#x} -j RETURN\n"));
        }
        for m in &plan.exemptions {
            s.push_str(&format!("-A {chain} {m} -j RETURN\n"));
        }
        let iface = plan.scope.interface.as_ref().map(|i| format!("{iface_flag} {i} ")).unwrap_or_default();
        let peers: Vec<String> = if plan.scope.peers.is_empty() {
            vec![String::new()]
        } else {
            plan.scope.peers.iter().map(|c| format!("{peer_flag} {c} ")).collect()
        };
        for p in &peers {
            for pp in proto_port_matches(&plan.scope) {
                let m = format!("{iface}{p}{pp}");
                s.push_str(&format!("-A {chain} {} {}\n", m.trim(), plan.target()).replace("  ", " "));
            }
        }
        s.push_str(&format!("-I {hook} 1 ! {iface_flag} lo -j {chain}\n"));
    }
    s.push_str("COMMIT\n");
    s
}

/// The chains of `iptables-save -t raw` output, by name: policy ("-" for a
/// user chain) and rule lines without the `-A CHAIN` prefix, in order.
/// Comments (which carry the time), counters and `COMMIT` are dropped.
pub fn saved_chains(saved: &str) -> std::collections::BTreeMap<String, (String, Vec<String>)> {
    let mut chains = std::collections::BTreeMap::new();
    for line in saved.lines().map(str::trim) {
        // `iptables-save -c` puts "[packets:bytes] " before each rule.
        let line = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
            Some((_, rest)) => rest,
            None => line,
        };
        if let Some(decl) = line.strip_prefix(':') {
            let mut w = decl.split_whitespace();
            if let Some(name) = w.next() {
                let policy = w.next().unwrap_or("-").to_string();
                chains.insert(name.to_string(), (policy, Vec::new()));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            chains.entry(chain.to_string()).or_insert_with(|| ("-".to_string(), Vec::new())).1.push(rest.to_string());
        }
    }
    chains
}

/// One chain as a snapshot value: "policy ACCEPT; rules: R1 | R2" or "policy ACCEPT; no rules".
fn chain_text(policy: &str, rules: &[String]) -> String {
    if rules.is_empty() { format!("policy {policy}; no rules") } else { format!("policy {policy}; rules: {}", rules.join(" | ")) }
}

impl NetworkDriver {
    /// What a latency (or iptables-firewall) plan touches in its namespace:
    /// the raw table's hook chains (PREROUTING, OUTPUT) and the fault's own
    /// chains from `iptables-save -t raw` (no counters, no comments), and
    /// whether nftables holds `table ip raw` (revert removes it when the fault created it).
    pub(crate) async fn snapshot_latency(&self, plan: &LatencyPlan) -> Result<Snapshot, AgentError> {
        self.ensure_there(&plan.ns)?;
        let at = Self::ns_where(&plan.ns);
        let saved = self.read_tool(&plan.ns, &["iptables-save", "-t", "raw"]).await?;
        let chains = saved_chains(&saved);
        let mut snap = Snapshot::default();
        let ours: Vec<String> = plan.legs().map(|l| l.chain.to_string()).into_iter().collect();
        // Other chaos faults' chains and jumps (this agent's or another's) come and go with them.
        let theirs = |w: &str| w.starts_with("CHAOS-") && !ours.iter().any(|o| o == w);
        let others = chains.keys().any(|c| theirs(c));
        for name in ["PREROUTING", "OUTPUT"].into_iter().map(str::to_string).chain(ours.iter().cloned()) {
            let value = chains.get(&name).map_or_else(
                || "absent".to_string(),
                |(policy, rules)| {
                    let rules: Vec<String> = rules.iter().filter(|r| !r.split_whitespace().any(theirs)).cloned().collect();
                    chain_text(policy, &rules)
                },
            );
            snap.insert(format!("iptables raw chain {name} in {at}"), value);
        }
        // nf_tables unusable (iptables-legacy hosts): no such key, the same before and after.
        match self.exec.nft_tables(plan.ns.path.as_deref()).await {
            Ok(listed) => {
                let value = match (others, has_ip_raw(&listed)) {
                    (true, _) => super::SHARED_WITH_OTHERS,
                    (false, true) => "present",
                    (false, false) => "absent",
                };
                snap.insert(format!("nft table ip raw in {at}"), value);
            }
            Err(e) => {
                self.ensure_there(&plan.ns)?;
                tracing::debug!(ns = %plan.ns.label, error = %e, "nftables tables not listed; raw table presence not compared");
            }
        }
        Ok(snap)
    }

    pub(crate) async fn plan_latency(
        &self,
        id: &str,
        target: &chaos_proto::spec::TargetSpec,
        scope: &NetScope,
        profile: Profile,
    ) -> Result<LatencyPlan, AgentError> {
        if let Some(c) = scope.peers.iter().find(|c: &&Cidr| !c.is_v4()) {
            return Err(AgentError::MissingFeature(format!(
                "IPv6 peers (peer {c}) without sch_netem: the NFQUEUE engine handles IPv4 only for now"
            )));
        }
        let ns = self.resolve_ns(target)?;
        // Unknown (nf_tables unusable) counts as there: the revert never deletes what it cannot tell it made.
        let raw_table_existed = self.exec.nft_tables(ns.path.as_deref()).await.map_or(true, |listed| has_ip_raw(&listed));
        let short: String = id.chars().filter(|c| c.is_ascii_alphanumeric()).take(16).collect();
        Ok(LatencyPlan {
            ns,
            scope: scope.clone(),
            profile,
            queue_num: queue_num_for(id),
            chain_in: format!("CHAOS-{short}-I"),
            chain_out: format!("CHAOS-{short}-O"),
            raw_table_existed,
            exemptions: exemption_matches(&self.exempt),
            drop_permyriad: None,
        })
    }

    pub(crate) async fn apply_latency(&self, plan: &LatencyPlan) -> Result<Applied, AgentError> {
        let backend = self.iptables_backend;
        // A named interface must exist: iptables would take `-i nosuch` and match nothing.
        if let Some(i) = plan.scope.interface.as_deref() {
            self.interfaces_of(&plan.ns, Some(i)).await?;
        }
        // The engine first: with --queue-bypass, rules without a listener would pass traffic undelayed.
        let engine = match plan.drop_permyriad {
            Some(_) => None,
            None => Some(
                Engine::start(plan.ns.path.clone(), plan.queue_num, plan.profile)
                    .map_err(|e| AgentError::Command { cmd: format!("packet engine (NFQUEUE {})", plan.queue_num), detail: e })?,
            ),
        };
        let script = render(plan);
        let out = self.run_tool(&plan.ns, &["iptables-restore", "-w", "--noflush"], Some(&script)).await?;
        if !out.success {
            drop(engine);
            return Err(AgentError::Command { cmd: format!("iptables-restore (in {})", plan.ns.label), detail: out.stderr });
        }
        let chains: Vec<&str> = plan.legs().into_iter().filter(|l| l.on).map(|l| l.chain).collect();
        let verdict = if plan.drop_permyriad.is_some() { "DROP" } else { "NFQUEUE" };
        for c in &chains {
            let v = self.run_tool(&plan.ns, &["iptables", "-w", "-t", "raw", "-S", c], None).await?;
            if !v.success || !v.stdout.contains(verdict) {
                drop(engine);
                let _ = self.revert_latency(plan).await;
                return Err(AgentError::Command {
                    cmd: format!("iptables -t raw -S {c}"),
                    detail: format!("rules not in place after apply: {}", v.stderr),
                });
            }
        }
        let Some(engine) = engine else {
            let eperm = if plan.scope.direction.egress() { "; egress drops sit in OUTPUT: local senders see EPERM" } else { "" };
            return Ok(Applied {
                backend: "iptables",
                processes: Vec::new(),
                summary: format!(
                    "{} in {} ({:?}, IPv4) via {backend} raw chains {} (verified; nftables not used){eperm}; control channel exempt",
                    plan.what(),
                    plan.ns.label,
                    plan.scope.direction,
                    chains.join(", "),
                ),
                ..Default::default()
            });
        };
        self.engines.lock().unwrap_or_else(|p| p.into_inner()).insert(plan.chain_in.clone(), engine);
        Ok(Applied {
            backend: "nfqueue",
            processes: Vec::new(),
            summary: format!(
                "{} in {} ({:?}, IPv4) via {backend} NFQUEUE {} + userspace engine (fail-open); chains {} (verified); control channel exempt",
                plan.what(),
                plan.ns.label,
                plan.scope.direction,
                plan.queue_num,
                chains.join(", "),
            ),
            ..Default::default()
        })
    }

    pub(crate) async fn revert_latency(&self, plan: &LatencyPlan) -> Result<String, AgentError> {
        let engine = self.engines.lock().unwrap_or_else(|p| p.into_inner()).remove(&plan.chain_in);
        if !self.still_there(&plan.ns)? {
            if let Some(e) = engine {
                e.stop();
            }
            return Ok(format!("{} is gone (or replaced): nothing left to remove", plan.ns.label));
        }
        // Rules first (nothing new is queued), then the engine (it releases what it holds).
        let mut removed = Vec::new();
        for Leg { chain, hook, iface_flag, .. } in plan.legs() {
            let del =
                self.run_tool(&plan.ns, &["iptables", "-w", "-t", "raw", "-D", hook, "!", iface_flag, "lo", "-j", chain], None).await?;
            let flush = self.run_tool(&plan.ns, &["iptables", "-w", "-t", "raw", "-F", chain], None).await?;
            let drop = self.run_tool(&plan.ns, &["iptables", "-w", "-t", "raw", "-X", chain], None).await?;
            if drop.success {
                removed.push(chain.to_string());
            } else if flush.success || del.success {
                return Err(AgentError::Command { cmd: format!("iptables -t raw -X {chain} (in {})", plan.ns.label), detail: drop.stderr });
            }
        }
        let held = engine.map(|e| {
            let n = e.stats.held.load(std::sync::atomic::Ordering::Relaxed);
            e.stop();
            n
        });
        if !plan.raw_table_existed {
            let rest = self.run_tool(&plan.ns, &["iptables", "-w", "-t", "raw", "-S"], None).await?;
            if rest.success && rest.stdout.lines().all(|l| l.starts_with("-P ")) {
                let _ = self.exec.nft_delete_tables(plan.ns.path.as_deref(), &[("ip", "raw")]).await;
            }
        }
        let mut s = if removed.is_empty() {
            format!("no chains left in {}", plan.ns.label)
        } else {
            format!("removed {} from {}", removed.join(", "), plan.ns.label)
        };
        match (held, plan.drop_permyriad) {
            (_, Some(_)) => {}
            (Some(n), None) => s.push_str(&format!("; engine stopped after handling {n} packets")),
            (None, None) => s.push_str("; no engine was running (agent restarted: the rules were passing traffic untouched)"),
        }
        Ok(s)
    }
}

/// Whether an `nft list tables` listing holds `table ip raw` (iptables-nft's raw table).
fn has_ip_raw(listed: &str) -> bool {
    listed.lines().any(|l| l.split_whitespace().eq(["table", "ip", "raw"]))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chaos_proto::spec::Direction;

    use super::*;

    fn plan(direction: Direction) -> LatencyPlan {
        LatencyPlan {
            ns: NetnsRef { path: None, id: None, label: "host".into() },
            scope: NetScope {
                interface: None,
                peers: vec!["198.18.0.3".parse().expect("cidr")],
                ports: vec![9092],
                protocol: None,
                direction,
            },
            profile: Profile { delay: Duration::from_millis(50), ..Default::default() },
            queue_num: 12345,
            chain_in: "CHAOS-x-I".into(),
            chain_out: "CHAOS-x-O".into(),
            raw_table_existed: false,
            drop_permyriad: None,
            exemptions: exemption_matches(&Exemptions {
                agent_port: 50052,
                coordinator: Some(("198.18.0.1".parse().expect("ip"), 50051)),
                cidrs: vec![],
            }),
        }
    }

    #[test]
    fn ingress_script_exempts_first_then_queues_with_bypass() {
        let s = render(&plan(Direction::Ingress));
        assert!(s.starts_with("*raw\n:CHAOS-x-I - [0:0]\n"), "{s}");
        let exempt = s.find("-A CHAOS-x-I -s 198.18.0.1/32 -p tcp --sport 50051 -j RETURN").expect("coordinator exempt");
        let queue = s
            .find("-A CHAOS-x-I -s 198.18.0.3/32 -p tcp -m multiport --ports 9092 -j NFQUEUE --queue-num 12345 --queue-bypass")
            .expect("queue rule");
        assert!(exempt < queue, "{s}");
        assert!(s.contains("-I PREROUTING 1 ! -i lo -j CHAOS-x-I"), "{s}");
        assert!(!s.contains("OUTPUT"), "ingress only: {s}");
        assert!(s.ends_with("COMMIT\n"));
        let both = render(&plan(Direction::Both));
        assert!(both.contains("-A CHAOS-x-O -d 198.18.0.3/32 -p udp -m multiport --ports 9092 -j NFQUEUE"), "{both}");
        assert!(both.contains("-I OUTPUT 1 ! -o lo -j CHAOS-x-O"), "{both}");
    }

    #[test]
    fn the_iptables_firewall_drops_instead_of_queueing_and_duplicates_pass_their_copies() {
        let mut p = plan(Direction::Ingress);
        p.drop_permyriad = Some(10_000);
        let s = render(&p);
        assert!(s.contains("-A CHAOS-x-I -s 198.18.0.3/32 -p tcp -m multiport --ports 9092 -j DROP"), "{s}");
        assert!(!s.contains("NFQUEUE"), "{s}");
        p.drop_permyriad = Some(1_050);
        assert!(render(&p).contains("-m statistic --mode random --probability 0.1050 -j DROP"), "{}", render(&p));
        assert_eq!(p.what(), "loss 10.50 %");
        let mut d = plan(Direction::Egress);
        d.profile = Profile { duplicate_permyriad: 500, ..Default::default() };
        let s = render(&d);
        let mark = s.find("-A CHAOS-x-O -m mark --mark 0xc4a0d0b1 -j RETURN").expect("copies pass");
        assert!(mark < s.find("NFQUEUE").expect("queue rule"), "{s}");
    }

    #[test]
    fn queue_numbers_are_stable_and_in_range() {
        assert_eq!(queue_num_for("abc"), queue_num_for("abc"));
        for id in ["a", "b", "fault-1", "0e6b7d2e-9b44-4a65-8d22-1d2a1b3c4d5e"] {
            let q = queue_num_for(id);
            assert!((10_000..60_000).contains(&q), "{q}");
        }
    }
}
