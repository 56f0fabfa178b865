//! Bandwidth limits with htb + u32 (egress), in the target namespace.
//!
//! Each interface gets an `htb` root qdisc with a handle of the fault's own
//! (so revert can tell it is ours) and one rate-limited class. Filters send
//! the control channel (agent port, coordinator flows, protected CIDRs) to
//! the qdisc itself, which htb treats as "direct": never shaped. Traffic in
//! scope goes to the limited class; anything else is unclassified and also
//! passes direct. The agent **never replaces a root qdisc it did not
//! create**: an interface whose root qdisc was configured by someone (a
//! handle other than the kernel's `0:`) is refused at plan time, and revert
//! deletes a root qdisc only while it still carries the fault's handle.

use std::net::IpAddr;

use chaos_proto::spec::{NetScope, Protocol};
use serde::{Deserialize, Serialize};

use super::{
    Applied,
    network::{Exemptions, NetnsRef, NetworkDriver},
};
use crate::error::AgentError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthPlan {
    pub ns: NetnsRef,
    pub scope: NetScope,
    pub rate_bits_per_second: u64,
    pub burst_bytes: u64,
    /// htb handle major (hex) owned by this fault.
    pub handle: u16,
    /// Interfaces shaped (found at plan time, each with a kernel-default root qdisc).
    pub devices: Vec<String>,
    /// tc filter matches (u32) that go direct: the control channel.
    pub exempt: Vec<String>,
}

/// A handle major from the fault id, in 0x8000..0xffff (kernel defaults and most tools use low numbers).
pub fn handle_for(id: &str) -> u16 {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    0x8000 | (h as u16 & 0x7fff)
}

/// The root qdisc line of `tc qdisc show dev X`: (kind, handle), e.g. ("noqueue", "0:").
pub fn root_qdisc(tc_show: &str) -> Option<(String, String)> {
    tc_show.lines().find(|l| l.split_whitespace().any(|w| w == "root")).and_then(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        Some((w.get(1)?.to_string(), w.get(2)?.to_string()))
    })
}

/// u32 matches for the control channel (egress side).
pub fn exempt_matches(e: &Exemptions) -> Vec<String> {
    let mut v = Vec::new();
    if e.agent_port != 0 {
        v.push(format!("match ip sport {} 0xffff", e.agent_port));
    }
    if let Some((IpAddr::V4(ip), port)) = e.coordinator {
        v.push(format!("match ip dst {ip}/32 match ip dport {port} 0xffff"));
    }
    for c in e.cidrs.iter().filter(|c| c.is_v4()) {
        v.push(format!("match ip dst {c}"));
    }
    v
}

fn scope_matches(scope: &NetScope) -> Vec<String> {
    let peers: Vec<String> =
        if scope.peers.is_empty() { vec![String::new()] } else { scope.peers.iter().map(|c| format!("match ip dst {c} ")).collect() };
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

/// The `tc -batch` script that adds the fault on every device.
pub fn render(plan: &BandwidthPlan) -> String {
    let h = format!("{:x}", plan.handle);
    let burst = if plan.burst_bytes > 0 { plan.burst_bytes } else { (plan.rate_bits_per_second / 8 / 100).max(3200) };
    let mut s = String::new();
    for dev in &plan.devices {
        s.push_str(&format!("qdisc add dev {dev} root handle {h}: htb\n"));
        s.push_str(&format!(
            "class add dev {dev} parent {h}: classid {h}:10 htb rate {r}bit ceil {r}bit burst {burst} cburst {burst}\n",
            r = plan.rate_bits_per_second
        ));
        for m in &plan.exempt {
            s.push_str(&format!("filter add dev {dev} parent {h}: protocol ip prio 1 u32 {m} flowid {h}:0\n"));
        }
        for m in scope_matches(&plan.scope) {
            if m.is_empty() {
                s.push_str(&format!("filter add dev {dev} parent {h}: protocol all prio 2 u32 match u32 0 0 flowid {h}:10\n"));
            } else {
                s.push_str(&format!("filter add dev {dev} parent {h}: protocol ip prio 2 u32 {m} flowid {h}:10\n"));
            }
        }
    }
    s
}

impl NetworkDriver {
    pub(crate) async fn plan_bandwidth(
        &self,
        id: &str,
        target: &chaos_proto::spec::TargetSpec,
        scope: &NetScope,
        rate_bits_per_second: u64,
        burst_bytes: u64,
    ) -> Result<BandwidthPlan, AgentError> {
        if let Some(c) = scope.peers.iter().find(|c| !c.is_v4()) {
            return Err(AgentError::MissingFeature(format!("IPv6 bandwidth scoping (peer {c}): u32 filters here match IPv4 only")));
        }
        let ns = self.resolve_ns(target)?;
        let devices = self.interfaces_of(&ns, scope.interface.as_deref()).await?;
        if devices.is_empty() {
            return Err(AgentError::TargetNotFound(format!("{} has no interface besides lo to shape", ns.label)));
        }
        for dev in &devices {
            let out = self.run_tool(&ns, &["tc", "qdisc", "show", "dev", dev], None).await?;
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
        Ok(BandwidthPlan {
            ns,
            scope: scope.clone(),
            rate_bits_per_second,
            burst_bytes,
            handle: handle_for(id),
            devices,
            exempt: exempt_matches(&self.exempt),
        })
    }

    pub(crate) async fn apply_bandwidth(&self, plan: &BandwidthPlan) -> Result<Applied, AgentError> {
        let out = self.run_tool(&plan.ns, &["tc", "-batch", "-"], Some(&render(plan))).await?;
        if !out.success {
            return Err(AgentError::Command { cmd: format!("tc -batch (in {})", plan.ns.label), detail: out.stderr });
        }
        let h = format!("{:x}:", plan.handle);
        for dev in &plan.devices {
            let v = self.run_tool(&plan.ns, &["tc", "qdisc", "show", "dev", dev], None).await?;
            if root_qdisc(&v.stdout) != Some(("htb".into(), h.clone())) {
                return Err(AgentError::Command {
                    cmd: format!("tc qdisc show dev {dev}"),
                    detail: format!("htb {h} not in place after apply"),
                });
            }
        }
        Ok(Applied {
            backend: "tc-htb",
            processes: Vec::new(),
            summary: format!(
                "bandwidth {} bit/s egress on {} in {} (htb {h}, u32 filters; control channel direct) (verified)",
                plan.rate_bits_per_second,
                plan.devices.join(", "),
                plan.ns.label
            ),
            ..Default::default()
        })
    }

    pub(crate) async fn revert_bandwidth(&self, plan: &BandwidthPlan) -> Result<String, AgentError> {
        if !self.still_there(&plan.ns)? {
            return Ok(format!("{} is gone (or replaced): nothing left to remove", plan.ns.label));
        }
        let h = format!("{:x}:", plan.handle);
        let mut done = Vec::new();
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
        Ok(format!("htb {h} in {}: {}", plan.ns.label, done.join(", ")))
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
            exempt: exempt_matches(&Exemptions {
                agent_port: 50052,
                coordinator: Some(("198.18.0.1".parse().expect("ip"), 50051)),
                cidrs: vec![],
            }),
        };
        let s = render(&plan);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "qdisc add dev veth0 root handle c4a5: htb");
        assert!(lines[1].contains("classid c4a5:10 htb rate 8000000bit ceil 8000000bit burst 10000"), "{}", lines[1]);
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
        assert_eq!(root_qdisc("qdisc htb 1: root refcnt 2 r2q 10\nqdisc fq_codel 8001: parent 1:1"), Some(("htb".into(), "1:".into())));
        for id in ["a", "b", "fault-42"] {
            assert!(handle_for(id) >= 0x8000);
        }
    }
}
