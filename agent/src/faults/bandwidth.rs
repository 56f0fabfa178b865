//! The tc backend, in the target namespace: bandwidth limits (htb) and,
//! where the kernel has `sch_netem`, netem (delay, jitter, loss and delay
//! correlation, corruption, duplication, reorder), on egress and, through
//! an ifb device of the fault's own, on ingress.
//!
//! Each shaped device (the interface for egress, the fault's ifb for
//! ingress) gets an `htb` root qdisc with a handle of the fault's own (so
//! revert can tell it is ours) and one class, rate-limited or carrying a
//! netem leaf. Filters send the control channel (agent port, coordinator
//! flows, protected CIDRs) to the qdisc itself, which htb treats as
//! "direct": never shaped nor delayed. Traffic in scope goes to the class;
//! anything else is unclassified and also passes direct. Ingress adds an
//! `ingress` qdisc on the interface whose one filter redirects (mirred)
//! every packet to the ifb, where the same tree applies with source and
//! destination swapped.
//!
//! The agent **never replaces a qdisc it did not create**: an interface
//! whose root qdisc was configured by someone (a handle other than the
//! kernel's `0:`), or that already has an ingress/clsact qdisc, is refused
//! at plan time. Revert deletes a root qdisc only while it still carries
//! the fault's handle, an ingress qdisc only while its filter still
//! redirects to the fault's ifb, and then the ifb itself.

use std::{net::IpAddr, time::Duration};

use chaos_proto::spec::{NetScope, Protocol};
use serde::{Deserialize, Serialize};

use super::{
    Applied, Snapshot,
    network::{Exemptions, NetnsRef, NetworkDriver},
};
use crate::error::AgentError;

/// What netem does to the packets in scope (shares in 1/10000).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netem {
    pub delay: Duration,
    pub jitter: Duration,
    /// Always 0 in new plans (a latency correlation is the NFQUEUE engine's);
    /// kept so journal records stay readable by agents of the same journal version.
    pub delay_correlation_permyriad: u32,
    pub loss_permyriad: u32,
    pub loss_correlation_permyriad: u32,
    pub corrupt_permyriad: u32,
    pub duplicate_permyriad: u32,
    /// netem `reorder`: this share is sent at once, the rest is delayed.
    pub reorder_permyriad: u32,
}

fn pct(permyriad: u32) -> String {
    format!("{}%", super::permyriad_text(permyriad))
}

fn micros(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

impl Netem {
    /// The arguments after `netem`, e.g. `limit 10000 delay 50000us 10000us 25.00%`.
    pub fn args(&self) -> String {
        let mut a = vec![format!("limit {}", self.limit())];
        if !self.delay.is_zero() {
            let mut d = format!("delay {}", micros(self.delay));
            if !self.jitter.is_zero() {
                d.push_str(&format!(" {}", micros(self.jitter)));
                if self.delay_correlation_permyriad > 0 {
                    d.push_str(&format!(" {}", pct(self.delay_correlation_permyriad)));
                }
            }
            a.push(d);
        }
        if self.loss_permyriad > 0 && self.loss_correlation_permyriad > 0 {
            // Not `loss random P C`: netem mixes each uniform draw with the last one, which
            // narrows the distribution, so fewer draws fall under P (measured on 6.1: 20 %
            // with 25 % correlation lost 9.9 %). A two-state Markov chain keeps both exactly:
            // lose after a kept packet with p13 = P(1-C), keep after a lost one with
            // p31 = (1-P)(1-C); mean loss p13/(p13+p31) = P, lag-1 correlation 1-p13-p31 = C.
            let (p, c) = (u64::from(self.loss_permyriad.min(10_000)), u64::from(self.loss_correlation_permyriad.min(10_000)));
            let p13 = (p * (10_000 - c) + 5_000) / 10_000;
            let p31 = ((10_000 - p) * (10_000 - c) + 5_000) / 10_000;
            a.push(format!("loss state {} {}", pct(p13 as u32), pct(p31 as u32)));
        } else if self.loss_permyriad > 0 {
            a.push(format!("loss random {}", pct(self.loss_permyriad)));
        }
        if self.corrupt_permyriad > 0 {
            a.push(format!("corrupt {}", pct(self.corrupt_permyriad)));
        }
        if self.duplicate_permyriad > 0 {
            a.push(format!("duplicate {}", pct(self.duplicate_permyriad)));
        }
        if self.reorder_permyriad > 0 {
            a.push(format!("reorder {}", pct(self.reorder_permyriad)));
        }
        a.join(" ")
    }

    /// Queue length: 50,000 packets/s held for the longest delay, at least netem's default 1000.
    fn limit(&self) -> u64 {
        let held = (self.delay + self.jitter).as_millis() as u64 * 50;
        held.clamp(1_000, 1_000_000)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthPlan {
    pub ns: NetnsRef,
    pub scope: NetScope,
    /// 0 with netem: the class is not rate-limited.
    pub rate_bits_per_second: u64,
    pub burst_bytes: u64,
    /// htb handle major (hex) owned by this fault.
    pub handle: u16,
    /// Interfaces (found at plan time, each with a kernel-default root qdisc and no ingress qdisc).
    pub devices: Vec<String>,
    /// tc filter matches (u32) that go direct on egress: the control channel.
    pub exempt: Vec<String>,
    /// The netem leaf, when the fault is not a bandwidth limit.
    #[serde(default)]
    pub netem: Option<Netem>,
    /// Ingress: the fault's ifb for each device, in the same order (empty: egress only).
    #[serde(default)]
    pub ifbs: Vec<String>,
    /// Matches that go direct on ingress (the ifb): the control channel, source and destination swapped.
    #[serde(default)]
    pub exempt_in: Vec<String>,
}

impl BandwidthPlan {
    fn egress(&self) -> bool {
        self.scope.direction.egress()
    }

    /// Every device that carries the fault's htb root: interfaces (egress) and ifbs (ingress).
    fn shaped(&self) -> Vec<&str> {
        let mut v: Vec<&str> = if self.egress() { self.devices.iter().map(String::as_str).collect() } else { Vec::new() };
        v.extend(self.ifbs.iter().map(String::as_str));
        v
    }

    fn backend(&self) -> &'static str {
        if self.netem.is_some() { "tc-netem" } else { "tc-htb" }
    }
}

/// A handle major from the fault id, in 0x8000..0xffff (kernel defaults and most tools use low numbers).
pub fn handle_for(id: &str) -> u16 {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    0x8000 | (h as u16 & 0x7fff)
}

/// The ifb carrying ingress of the `i`th device (at most 15 characters).
pub fn ifb_name(handle: u16, i: usize) -> String {
    format!("chx{handle:04x}i{i}")
}

/// The root qdisc line of `tc qdisc show dev X`: (kind, handle), e.g. ("noqueue", "0:").
pub fn root_qdisc(tc_show: &str) -> Option<(String, String)> {
    tc_show.lines().find(|l| l.split_whitespace().any(|w| w == "root")).and_then(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        Some((w.get(1)?.to_string(), w.get(2)?.to_string()))
    })
}

/// The ingress-side qdisc (ingress or clsact) of `tc qdisc show dev X`, if any.
pub fn ingress_qdisc(tc_show: &str) -> Option<String> {
    tc_show.lines().find(|l| l.contains("parent ffff:fff1")).and_then(|l| l.split_whitespace().nth(1)).map(str::to_string)
}

/// u32 matches for the control channel: `ingress` swaps source and destination.
pub fn exempt_matches(e: &Exemptions, ingress: bool) -> Vec<String> {
    let (own_port, peer, peer_port) = if ingress { ("dport", "src", "sport") } else { ("sport", "dst", "dport") };
    let mut v = Vec::new();
    if e.agent_port != 0 {
        v.push(format!("match ip {own_port} {} 0xffff", e.agent_port));
    }
    if let Some((IpAddr::V4(ip), port)) = e.coordinator {
        v.push(format!("match ip {peer} {ip}/32 match ip {peer_port} {port} 0xffff"));
    }
    for c in e.cidrs.iter().filter(|c| c.is_v4()) {
        v.push(format!("match ip {peer} {c}"));
    }
    v
}

/// u32 matches for the scope; `peer` is "dst" (egress) or "src" (ingress).
fn scope_matches(scope: &NetScope, peer: &str) -> Vec<String> {
    let peers: Vec<String> =
        if scope.peers.is_empty() { vec![String::new()] } else { scope.peers.iter().map(|c| format!("match ip {peer} {c} ")).collect() };
    let proto = match scope.protocol {
        None => String::new(),
        Some(Protocol::Tcp) => "match ip protocol 6 0xff ".into(),
        Some(Protocol::Udp) => "match ip protocol 17 0xff ".into(),
        Some(Protocol::Icmp) => "match ip protocol 1 0xff ".into(),
    };
    let ports: Vec<String> = if scope.ports.is_empty() {
        vec![String::new()]
    } else {
        scope.ports.iter().flat_map(|p| [format!("match ip dport {p} 0xffff"), format!("match ip sport {p} 0xffff")]).collect()
    };
    let mut v = Vec::new();
    for p in &peers {
        for port in &ports {
            v.push(format!("{p}{proto}{port}").trim().to_string());
        }
    }
    v
}

/// The `tc -batch` script that adds the fault: the trees on every shaped
/// device, then (ingress) the redirects that start feeding the ifbs.
pub fn render(plan: &BandwidthPlan) -> String {
    let h = format!("{:x}", plan.handle);
    let class = match plan.rate_bits_per_second {
        0 => "htb rate 100gbit ceil 100gbit".to_string(),
        r => {
            let burst = if plan.burst_bytes > 0 { plan.burst_bytes } else { (r / 8 / 100).max(3200) };
            format!("htb rate {r}bit ceil {r}bit burst {burst} cburst {burst}")
        }
    };
    let mut s = String::new();
    for dev in plan.shaped() {
        let ingress = plan.ifbs.iter().any(|i| i == dev);
        let (exempt, peer) = if ingress { (&plan.exempt_in, "src") } else { (&plan.exempt, "dst") };
        s.push_str(&format!("qdisc add dev {dev} root handle {h}: htb\n"));
        s.push_str(&format!("class add dev {dev} parent {h}: classid {h}:10 {class}\n"));
        if let Some(n) = &plan.netem {
            s.push_str(&format!("qdisc add dev {dev} parent {h}:10 handle {:x}: netem {}\n", plan.handle ^ 0x4000, n.args()));
        }
        for m in exempt {
            s.push_str(&format!("filter add dev {dev} parent {h}: protocol ip prio 1 u32 {m} flowid {h}:0\n"));
        }
        for m in scope_matches(&plan.scope, peer) {
            if m.is_empty() {
                s.push_str(&format!("filter add dev {dev} parent {h}: protocol all prio 2 u32 match u32 0 0 flowid {h}:10\n"));
            } else {
                s.push_str(&format!("filter add dev {dev} parent {h}: protocol ip prio 2 u32 {m} flowid {h}:10\n"));
            }
        }
    }
    for (dev, ifb) in plan.devices.iter().zip(&plan.ifbs) {
        s.push_str(&format!("qdisc add dev {dev} handle ffff: ingress\n"));
        s.push_str(&format!(
            "filter add dev {dev} parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev {ifb}\n"
        ));
    }
    s
}

/// `tc qdisc show` / `tc filter show` output without what changes on its
/// own: reference counts (`refcnt N`, an action's `index N ref N bind N`)
/// and htb's `direct_packets_stat N`; blank lines dropped, lines joined by "; ".
pub fn tc_normalised(text: &str) -> String {
    const VOLATILE: [&str; 5] = ["refcnt", "direct_packets_stat", "index", "ref", "bind"];
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let mut kept = Vec::new();
            let mut words = l.split_whitespace();
            while let Some(w) = words.next() {
                if VOLATILE.contains(&w) {
                    words.next();
                } else {
                    kept.push(w);
                }
            }
            (!kept.is_empty()).then(|| kept.join(" "))
        })
        .collect();
    if lines.is_empty() { "(none)".into() } else { lines.join("; ") }
}

fn describe(plan: &BandwidthPlan) -> String {
    let what = match &plan.netem {
        Some(n) => format!("netem {}", n.args()),
        None => format!("bandwidth {} bit/s", plan.rate_bits_per_second),
    };
    let mut on = Vec::new();
    if plan.egress() {
        on.push(format!("egress on {}", plan.devices.join(", ")));
    }
    if !plan.ifbs.is_empty() {
        on.push(format!("ingress of {} via {}", plan.devices.join(", "), plan.ifbs.join(", ")));
    }
    format!("{what}, {}", on.join(" and "))
}

impl NetworkDriver {
    /// Plan a tc fault: a rate (`netem: None`) or a netem leaf.
    pub(crate) async fn plan_tc(
        &self,
        id: &str,
        target: &chaos_proto::spec::TargetSpec,
        scope: &NetScope,
        rate_bits_per_second: u64,
        burst_bytes: u64,
        netem: Option<Netem>,
    ) -> Result<BandwidthPlan, AgentError> {
        if let Some(c) = scope.peers.iter().find(|c| !c.is_v4()) {
            return Err(AgentError::MissingFeature(format!("IPv6 scoping with tc (peer {c}): u32 filters here match IPv4 only")));
        }
        let ns = self.resolve_ns(target)?;
        let devices = self.interfaces_of(&ns, scope.interface.as_deref()).await?;
        if devices.is_empty() {
            return Err(AgentError::TargetNotFound(format!("{} has no interface besides lo to shape", ns.label)));
        }
        let ingress = scope.direction.ingress();
        for dev in &devices {
            let out = self.run_tool(&ns, &["tc", "qdisc", "show", "dev", dev], None).await?;
            if scope.direction.egress() {
                match root_qdisc(&out.stdout) {
                    Some((_, handle)) if handle == "0:" => {}
                    Some((kind, handle)) => {
                        return Err(AgentError::MissingFeature(format!(
                            "a free root qdisc on {dev} in {}: it has `{kind} {handle}`, which the agent did not create; refusing to replace it",
                            ns.label
                        )));
                    }
                    None => return Err(AgentError::Command { cmd: format!("tc qdisc show dev {dev}"), detail: out.stderr }),
                }
            }
            if ingress && let Some(kind) = ingress_qdisc(&out.stdout) {
                return Err(AgentError::MissingFeature(format!(
                    "a free ingress hook on {dev} in {}: it has an `{kind}` qdisc, which the agent did not create; refusing to replace it",
                    ns.label
                )));
            }
        }
        let handle = handle_for(id);
        let ifbs = if ingress { (0..devices.len()).map(|i| ifb_name(handle, i)).collect() } else { Vec::new() };
        Ok(BandwidthPlan {
            ns,
            scope: scope.clone(),
            rate_bits_per_second,
            burst_bytes,
            handle,
            devices,
            exempt: exempt_matches(&self.exempt, false),
            netem,
            ifbs,
            exempt_in: exempt_matches(&self.exempt, true),
        })
    }

    pub(crate) async fn apply_bandwidth(&self, plan: &BandwidthPlan) -> Result<Applied, AgentError> {
        for ifb in &plan.ifbs {
            for argv in [vec!["ip", "link", "add", ifb, "type", "ifb"], vec!["ip", "link", "set", ifb, "up"]] {
                let out = self.run_tool(&plan.ns, &argv, None).await?;
                if !out.success {
                    let _ = self.revert_bandwidth(plan).await;
                    return Err(AgentError::MissingFeature(format!(
                        "an ifb device for ingress in {} (`{}`: {}; is the ifb module available?)",
                        plan.ns.label,
                        argv.join(" "),
                        out.stderr.trim()
                    )));
                }
            }
        }
        let out = self.run_tool(&plan.ns, &["tc", "-batch", "-"], Some(&render(plan))).await?;
        if !out.success {
            let _ = self.revert_bandwidth(plan).await;
            if plan.netem.is_some() && out.stderr.contains("qdisc kind is unknown") {
                return Err(AgentError::MissingFeature(format!("sch_netem in the kernel: {}", out.stderr.trim())));
            }
            return Err(AgentError::Command { cmd: format!("tc -batch (in {})", plan.ns.label), detail: out.stderr });
        }
        let h = format!("{:x}:", plan.handle);
        for dev in plan.shaped() {
            let v = self.run_tool(&plan.ns, &["tc", "qdisc", "show", "dev", dev], None).await?;
            let leaf_ok = plan.netem.is_none() || v.stdout.contains("netem");
            if root_qdisc(&v.stdout) != Some(("htb".into(), h.clone())) || !leaf_ok {
                let _ = self.revert_bandwidth(plan).await;
                return Err(AgentError::Command {
                    cmd: format!("tc qdisc show dev {dev}"),
                    detail: format!("htb {h}{} not in place after apply", if plan.netem.is_some() { " + netem" } else { "" }),
                });
            }
        }
        for (dev, ifb) in plan.devices.iter().zip(&plan.ifbs) {
            let v = self.run_tool(&plan.ns, &["tc", "filter", "show", "dev", dev, "ingress"], None).await?;
            if !v.stdout.contains(ifb.as_str()) {
                let _ = self.revert_bandwidth(plan).await;
                return Err(AgentError::Command {
                    cmd: format!("tc filter show dev {dev} ingress"),
                    detail: format!("the redirect to {ifb} is not in place after apply (is act_mirred available?)"),
                });
            }
        }
        Ok(Applied {
            backend: plan.backend(),
            processes: Vec::new(),
            summary: format!("{} in {} (htb {h}, u32 filters; control channel direct) (verified)", describe(plan), plan.ns.label),
            ..Default::default()
        })
    }

    /// What a tc plan touches: per device its qdisc tree, the root filters
    /// (egress) and the ingress filters (ingress), normalised
    /// ([`tc_normalised`]), and whether each of the fault's ifbs exists.
    pub(crate) async fn snapshot_bandwidth(&self, plan: &BandwidthPlan) -> Result<Snapshot, AgentError> {
        self.ensure_there(&plan.ns)?;
        let at = Self::ns_where(&plan.ns);
        let mut snap = Snapshot::default();
        let names = self.link_names(&plan.ns).await?;
        for dev in &plan.devices {
            if !names.contains(dev) {
                snap.insert(format!("tc qdiscs of dev {dev} in {at}"), "(no such device)");
                continue;
            }
            let mut reads = vec![("qdiscs", vec!["tc", "qdisc", "show", "dev", dev])];
            if plan.egress() {
                reads.push(("root filters", vec!["tc", "filter", "show", "dev", dev]));
            }
            if !plan.ifbs.is_empty() {
                reads.push(("ingress filters", vec!["tc", "filter", "show", "dev", dev, "ingress"]));
            }
            for (what, argv) in reads {
                let out = self.read_tool(&plan.ns, &argv).await?;
                snap.insert(format!("tc {what} of dev {dev} in {at}"), tc_normalised(&out));
            }
        }
        for ifb in &plan.ifbs {
            snap.insert(format!("ifb device {ifb} in {at}"), if names.contains(ifb) { "present" } else { "absent" });
        }
        Ok(snap)
    }

    pub(crate) async fn revert_bandwidth(&self, plan: &BandwidthPlan) -> Result<String, AgentError> {
        if !self.still_there(&plan.ns)? {
            return Ok(format!("{} is gone (or replaced): nothing left to remove", plan.ns.label));
        }
        let h = format!("{:x}:", plan.handle);
        let mut done = Vec::new();
        // Ingress first: stop the redirects, then remove the ifbs (and the trees on them).
        for (dev, ifb) in plan.devices.iter().zip(&plan.ifbs) {
            // Ours: its filter redirects to our ifb, or it has none left (the agent
            // found no ingress qdisc at plan time, and a device holds only one).
            let filters = self.run_tool(&plan.ns, &["tc", "filter", "show", "dev", dev, "ingress"], None).await?;
            let qdiscs = self.run_tool(&plan.ns, &["tc", "qdisc", "show", "dev", dev], None).await?;
            let has_ingress = ingress_qdisc(&qdiscs.stdout).is_some();
            let ours = filters.stdout.contains(ifb.as_str()) || !filters.stdout.lines().any(|l| l.starts_with("filter"));
            if filters.success && has_ingress && ours {
                let del = self.run_tool(&plan.ns, &["tc", "qdisc", "del", "dev", dev, "ingress"], None).await?;
                if !del.success {
                    return Err(AgentError::Command {
                        cmd: format!("tc qdisc del dev {dev} ingress (in {})", plan.ns.label),
                        detail: del.stderr,
                    });
                }
                done.push(format!("{dev} ingress restored"));
            }
            let link = self.run_tool(&plan.ns, &["ip", "link", "del", ifb], None).await?;
            if link.success {
                done.push(format!("{ifb} removed"));
            } else if !link.stderr.contains("Cannot find device") {
                return Err(AgentError::Command { cmd: format!("ip link del {ifb} (in {})", plan.ns.label), detail: link.stderr });
            }
        }
        if plan.egress() {
            for dev in &plan.devices {
                let show = self.run_tool(&plan.ns, &["tc", "qdisc", "show", "dev", dev], None).await?;
                if !show.success {
                    done.push(format!("{dev} gone"));
                    continue;
                }
                match root_qdisc(&show.stdout) {
                    Some((_, handle)) if handle == h => {
                        let del = self.run_tool(&plan.ns, &["tc", "qdisc", "del", "dev", dev, "root", "handle", &h], None).await?;
                        if !del.success {
                            return Err(AgentError::Command {
                                cmd: format!("tc qdisc del dev {dev} root (in {})", plan.ns.label),
                                detail: del.stderr,
                            });
                        }
                        done.push(format!("{dev} restored"));
                    }
                    Some((kind, handle)) => done.push(format!("{dev} left alone (root is now {kind} {handle}, not ours)")),
                    None => done.push(format!("{dev}: no root qdisc")),
                }
            }
        }
        if done.is_empty() {
            done.push("nothing of ours left".into());
        }
        Ok(format!("{} {h} in {}: {}", plan.backend(), plan.ns.label, done.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use chaos_proto::spec::Direction;

    use super::*;

    #[test]
    fn script_exempts_the_control_channel_then_shapes_the_scope() {
        let plan = BandwidthPlan {
            ns: NetnsRef { path: None, id: None, label: "host".into() },
            scope: NetScope {
                interface: None,
                peers: vec!["198.18.0.3".parse().expect("cidr")],
                ports: vec![9092],
                protocol: Some(Protocol::Tcp),
                direction: Direction::Egress,
            },
            rate_bits_per_second: 8_000_000,
            burst_bytes: 0,
            handle: 0xc4a5,
            devices: vec!["veth0".into()],
            exempt: exempt_matches(
                &Exemptions { agent_port: 50052, coordinator: Some(("198.18.0.1".parse().expect("ip"), 50051)), cidrs: vec![] },
                false,
            ),
            netem: None,
            ifbs: vec![],
            exempt_in: vec![],
        };
        let s = render(&plan);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "qdisc add dev veth0 root handle c4a5: htb");
        assert!(lines[1].contains("classid c4a5:10 htb rate 8000000bit ceil 8000000bit burst 10000"), "{}", lines[1]);
        assert!(!s.contains("ingress") && !s.contains("netem"), "egress bandwidth only: {s}");
        assert!(
            lines.contains(&"filter add dev veth0 parent c4a5: protocol ip prio 1 u32 match ip sport 50052 0xffff flowid c4a5:0"),
            "{s}"
        );
        assert!(
            lines.contains(&"filter add dev veth0 parent c4a5: protocol ip prio 2 u32 match ip dst 198.18.0.3/32 match ip protocol 6 0xff match ip dport 9092 0xffff flowid c4a5:10"),
            "{s}"
        );
    }

    #[test]
    fn only_kernel_default_roots_are_replaceable_and_handles_are_ours() {
        assert_eq!(root_qdisc("qdisc noqueue 0: root refcnt 2 \n"), Some(("noqueue".into(), "0:".into())));
        assert_eq!(ingress_qdisc("qdisc noqueue 0: root refcnt 2\nqdisc clsact ffff: parent ffff:fff1\n"), Some("clsact".into()));
        assert_eq!(ingress_qdisc("qdisc noqueue 0: root refcnt 2\n"), None);
        assert!(ifb_name(0xffff, 9).len() <= 15, "interface names have at most 15 characters");
        assert_eq!(root_qdisc("qdisc htb 1: root refcnt 2 r2q 10\nqdisc fq_codel 8001: parent 1:1"), Some(("htb".into(), "1:".into())));
        for id in ["a", "b", "fault-42"] {
            assert!(handle_for(id) >= 0x8000);
        }
    }
}
