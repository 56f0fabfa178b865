//! Which kernel mechanisms network faults can use here, probed once at
//! start. Each probe runs in a throwaway network namespace (`unshare
//! --net`), so it never touches the host's interfaces or rules, and tries
//! the real thing (add a netem qdisc, an NFQUEUE rule, ...) rather than
//! guessing from module lists: a module that exists but will not load
//! counts as missing.

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// One mechanism, and what the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBackend {
    pub name: &'static str,
    pub available: bool,
    pub detail: String,
}

/// What each probe runs (a `sh` script inside a fresh network namespace).
pub const PROBES: &[(&str, &str, &str)] = &[
    (
        "sch_netem",
        "tc qdisc add dev lo root netem delay 1ms",
        "latency, corruption, duplication and reorder (else the NFQUEUE engine does them), and loss correlation (nothing else can; latency correlation is the engine's on every kernel)",
    ),
    (
        "htb",
        "tc qdisc add dev lo root handle 1: htb && tc class add dev lo parent 1: classid 1:10 htb rate 1mbit",
        "bandwidth, scoping of netem",
    ),
    (
        "tbf",
        "tc qdisc add dev lo root tbf rate 1mbit burst 32kb latency 50ms",
        "nothing yet: reported for operators (this agent shapes with htb)",
    ),
    (
        "ifb+mirred",
        "ip link add chxprobe type ifb && tc qdisc add dev lo handle ffff: ingress && tc filter add dev lo parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev chxprobe",
        "ingress shaping and netem",
    ),
    (
        "nftables",
        "printf 'table inet p {\\n chain c {\\n  type filter hook input priority 0;\\n  numgen random mod 100 < 5 drop\\n }\\n}\\ntable netdev q {\\n chain e {\\n  type filter hook egress device \"lo\" priority 0;\\n }\\n}\\n' | nft -f -",
        "partition and loss (inet input, netdev egress, numgen)",
    ),
    (
        "nfqueue",
        "iptables -w -t raw -A PREROUTING -j NFQUEUE --queue-num 1 --queue-bypass",
        "the userspace packet engine (latency, reorder, corruption, duplication without netem)",
    ),
];

/// Run one probe script in a throwaway network namespace: `Ok(())` or the error it printed.
pub fn run_probe(script: &str) -> Result<(), String> {
    run_script(&["unshare", "--net", "sh", "-s"], script)
}

/// Run `script` on the stdin of `argv`.
fn run_script(argv: &[&str], script: &str) -> Result<(), String> {
    let child = Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn();
    let mut child = child.map_err(|e| format!("`{}` not runnable: {e}", argv[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("waiting for the probe: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.lines().find(|l| !l.trim().is_empty()).unwrap_or("failed without a message").trim().to_string())
    }
}

/// Probe every mechanism. `iptables_version` is `iptables -V` (or why it failed).
pub fn probe_all(iptables_version: &Result<String, String>) -> Vec<KernelBackend> {
    let mut v: Vec<KernelBackend> = PROBES
        .iter()
        .map(|(name, script, used_for)| match run_probe(script) {
            Ok(()) => KernelBackend { name, available: true, detail: format!("works here; used for {used_for}") },
            Err(why) => KernelBackend { name, available: false, detail: format!("unusable here ({why}); it would serve {used_for}") },
        })
        .collect();
    v.push(iptables_backend(iptables_version));
    v
}

/// The live iptables backend, and whether the other one also holds rules on
/// this host (both are evaluated by the kernel: a rule of the other backend
/// can undo what a fault does, chaos-mesh #4152).
fn iptables_backend(version: &Result<String, String>) -> KernelBackend {
    let v = match version {
        Ok(v) => v,
        Err(why) => return KernelBackend { name: "iptables", available: false, detail: why.clone() },
    };
    let other = if v.contains("nf_tables") { "iptables-legacy-save" } else { "iptables-nft-save" };
    let rules = Command::new(other)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("-A")).count())
        .unwrap_or(0);
    let detail = if rules > 0 {
        format!("{v}; warning: {other} shows {rules} rules of the other backend on this host, which the kernel evaluates too")
    } else {
        format!("{v}; the other backend holds no rules")
    };
    KernelBackend { name: "iptables", available: true, detail }
}

/// Whether `name` was found usable.
pub fn has(backends: &[KernelBackend], name: &str) -> bool {
    backends.iter().any(|b| b.name == name && b.available)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_reports_the_first_error_line() {
        assert_eq!(run_script(&["sh", "-s"], "true"), Ok(()));
        assert_eq!(run_script(&["sh", "-s"], "echo 'no such qdisc' >&2; echo more >&2; exit 2"), Err("no such qdisc".into()));
        assert!(run_script(&["/nonexistent/unshare"], "").expect_err("missing").contains("/nonexistent/unshare"));
    }

    #[test]
    fn lookups_need_the_backend_available() {
        let b = vec![
            KernelBackend { name: "sch_netem", available: false, detail: String::new() },
            KernelBackend { name: "htb", available: true, detail: String::new() },
        ];
        assert!(has(&b, "htb") && !has(&b, "sch_netem") && !has(&b, "tbf"));
    }
}
