//! The checks run inside the VM (see `chaos_e2e::vm` and tests/tests/vm.rs):
//! the netem backend with real packets between two namespaces on a veth
//! pair, and every resource fault on cgroup v2, through the real agent and
//! CLI. One program, so the emulated machine boots once: each check runs in
//! turn, its guards clean up even when it fails, and each prints one line
//! `VM-CHECK PASS|FAIL name: figures` that the host side reads. Exits 1 if
//! any check failed. Refuses to run outside the VM (it changes the machine).

use std::{
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use chaos_e2e::{NetPair, TestCgroup, chaos_ok, free_port, json, revert_verified, start_agent, start_agent_at, wait_until};

/// What a check reports on success (its measured figures).
type Figures = String;

/// A named check.
type Check = (&'static str, fn(&str) -> Figures);

/// One line to the console (stdout is the serial port the host reads).
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    if std::env::var_os("CHAOS_VM").is_none() {
        eprintln!("chaos-vm-suite changes the machine it runs on: it runs only inside the VM (cargo test -p chaos-e2e --test vm)");
        std::process::exit(2);
    }
    let filter: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, bytes, marker] = filter.as_slice()
        && mode == "hold-memory"
    {
        hold_memory(bytes.parse().expect("hold-memory BYTES MARKER"), marker);
    }
    let checks: &[Check] = &[
        ("capabilities_choose_netem", capabilities_choose_netem),
        ("netem_latency_with_jitter", netem_latency_with_jitter),
        ("latency_correlation_by_the_engine", latency_correlation_by_the_engine),
        ("netem_loss_with_correlation", netem_loss_with_correlation),
        ("netem_corruption", netem_corruption),
        ("netem_duplication", netem_duplication),
        ("netem_reorder", netem_reorder),
        ("netem_spares_the_control_port", netem_spares_the_control_port),
        ("v2_cpu_throttle", v2_cpu_throttle),
        ("v2_memory_limit", v2_memory_limit),
        ("v2_freeze", v2_freeze),
        ("v2_cpu_stress", v2_cpu_stress),
        ("v2_memory_stress_oom", v2_memory_stress_oom),
        ("v2_io_throttle", v2_io_throttle),
        ("v2_pause_by_cgroup", v2_pause_by_cgroup),
        ("journal_replay_after_kill9", journal_replay_after_kill9),
    ];
    // Panics are reported by the runner below, once, with the check's name.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = 0;
    let suite = Instant::now();
    // One agent serves every check (as on a host), except the crash check, which kills its own.
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, url) = start_agent(dir.path(), "vm", None, "30s");
    say(&format!("VM-SUITE agent up in {:.1} s", suite.elapsed().as_secs_f64()));
    for (name, check) in checks {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let t = Instant::now();
        match std::panic::catch_unwind(AssertUnwindSafe(|| check(&url))) {
            Ok(figures) => say(&format!("VM-CHECK PASS {name} ({:.1} s): {figures}", t.elapsed().as_secs_f64())),
            Err(e) => {
                failed += 1;
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                let msg = msg.unwrap_or_else(|| "panicked".into()).replace('\n', "\n    ");
                say(&format!("VM-CHECK FAIL {name} ({:.1} s): {msg}", t.elapsed().as_secs_f64()));
                // Whatever the failed check left applied must not disturb the next one.
                let _ = chaos_e2e::chaos(&["agent", "revert-all", "--agent", &url]);
            }
        }
    }
    drop(agent);
    say(&format!("VM-SUITE {failed} failed in {:.1} s", suite.elapsed().as_secs_f64()));
    std::process::exit(i32::from(failed > 0));
}

/// `chaos -o json agent apply --agent URL ARGS...`, expecting success.
fn apply(url: &str, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["-o", "json", "agent", "apply", "--agent", url];
    argv.extend_from_slice(args);
    json(&chaos_ok(&argv, 0))
}

/// A network fault (`fault`'s flags) in `pair.a` towards `pair.b` in `direction`, for 2 minutes, as `id`.
fn netem_fault(url: &str, pair: &NetPair, id: &str, direction: &str, fault: &[&str]) -> serde_json::Value {
    let peer = format!("{}/32", pair.b_ip);
    let mut args = vec!["--netns", &pair.a];
    args.extend_from_slice(fault);
    args.extend_from_slice(&["--peer", &peer, "--direction", direction, "--duration", "2m", "--id", id]);
    apply(url, &args)
}

/// `tc qdisc show` and `ip -o link show` inside `ns`: what a netem fault must leave as it found.
/// htb's `direct_packets_stat` counter is left out: a packet the kernel sends on its own (an
/// IPv6 router solicitation) moves it between two reads (seen once in CI: 0 -> 1).
fn tree(ns: &str) -> (String, String) {
    let show = |argv: &[&str]| String::from_utf8_lossy(&NetPair::exec(ns, argv).stdout).into_owned();
    let qdiscs = show(&["tc", "qdisc", "show"])
        .lines()
        .map(|l| {
            let mut w: Vec<&str> = l.split(' ').collect();
            if let Some(i) = w.iter().position(|x| *x == "direct_packets_stat") {
                w.drain(i..(i + 2).min(w.len()));
            }
            w.join(" ") + "\n"
        })
        .collect();
    (qdiscs, show(&["ip", "-o", "link", "show"]))
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let (mean, sd, _) = chaos_e2e::moments(v);
    (mean, sd)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn capabilities_choose_netem(agent_url: &str) -> Figures {
    let out = chaos_ok(&["agent", "capabilities", "--agent", agent_url], 0);
    let netem = out.lines().find(|l| l.trim_start().starts_with("sch_netem")).unwrap_or_default().to_string();
    assert!(netem.split_whitespace().nth(1) == Some("yes"), "sch_netem not available to the agent:\n{out}");
    let caps = json(&chaos_ok(&["-o", "json", "agent", "capabilities", "--agent", agent_url], 0));
    let cg = caps.to_string();
    assert!(cg.contains("v2") || cg.contains("unified") || cg.contains('2'), "cgroup version: {caps}");
    netem.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Base RTT between the pair, in ms (median of 20).
fn base_rtt(pair: &NetPair) -> f64 {
    let r = NetPair::rtts_ms(&pair.a, &pair.b_ip, 20, "0.02");
    assert!(r.len() >= 18, "baseline pings: {r:?}");
    percentile(&r, 0.5)
}

fn netem_latency_with_jitter(agent_url: &str) -> Figures {
    let pair = NetPair::new();
    let before = tree(&pair.a);
    let base = base_rtt(&pair);
    let out = netem_fault(agent_url, &pair, "lat1", "egress", &["--latency", "50ms", "--jitter", "10ms"]);
    assert_eq!(out["backend"], "tc-netem", "{out}");
    let qd = tree(&pair.a).0;
    assert!(qd.contains("netem") && qd.contains("htb"), "netem under an htb class: {qd}");
    let rtts = NetPair::rtts_ms(&pair.a, &pair.b_ip, 300, "0.02");
    assert!(rtts.len() >= 295, "latency must not lose packets: {} of 300", rtts.len());
    let added: Vec<f64> = rtts.iter().map(|r| r - base).collect();
    let (mean, sd) = mean_sd(&added);
    let (min, max, p50) = (percentile(&added, 0.0), percentile(&added, 1.0), percentile(&added, 0.5));
    let iqr = percentile(&added, 0.75) - percentile(&added, 0.25);
    // Uniform 50 ± 10 ms: median 50, interquartile range 10, none below 40. The emulated
    // machine adds a tail (late timer interrupts), so the checks use the quartiles.
    assert!((47.0..=54.0).contains(&p50), "50 ms ± 10 asked, median added {p50:.2} ms");
    assert!((7.0..=13.5).contains(&iqr), "± 10 ms uniform asked (interquartile range 10), {iqr:.2} ms");
    assert!(min >= 38.5, "none earlier than 40 ms: min {min:.2} ms");
    let r = revert_verified(agent_url, "lat1");
    assert_eq!(tree(&pair.a), before, "qdisc tree and links exactly as before: {r}");
    let after = base_rtt(&pair);
    assert!(after < base + 5.0, "delay gone after revert: {after:.2} ms");
    format!(
        "50 ms ± 10 egress: added median {p50:.2} ms (error {:.2}), mean {mean:.2}, IQR {iqr:.2} (uniform 10), sd {sd:.2} (uniform 5.77), min {min:.2}, p99 {:.2}, max {max:.2} (n {}, base rtt {base:.2} ms)",
        (p50 - 50.0).abs(),
        percentile(&added, 0.99),
        added.len()
    )
}

fn latency_correlation_by_the_engine(agent_url: &str) -> Figures {
    let pair = NetPair::new();
    let before = tree(&pair.a);
    let raw_before = NetPair::raw_rules(&pair.a);
    let base = base_rtt(&pair);
    // Delays in the order they were drawn (one echo every 20 ms, each delayed once on egress).
    let delays =
        |pair: &NetPair, n: u32| NetPair::rtts_in_sent_order(&pair.a, &pair.b_ip, n, "0.02").iter().map(|r| r - base).collect::<Vec<f64>>();
    // 1000 draws at ± 80 ms, not the host test's 300 at ± 20: over ten runs at the host test's
    // figures the lag-1 figure read 0.55 to 0.77 here (0.67 to 0.81 on the host); the emulated
    // machine releases late by 0 to 10 ms, which weighs a sixteenth as much at sd 46, and 1000
    // draws halve the sampling error (about 0.02; measured 0.71, 0.76, 0.77).
    // What netem itself keeps of a delay correlation on this kernel: why the agent does not use it.
    let netem = ["tc", "qdisc", "add", "dev", &pair.a_if, "root", "netem", "delay", "100ms", "80ms", "75%"];
    assert!(NetPair::exec(&pair.a, &netem).status.success(), "tc {netem:?}");
    let netem_lag1 = chaos_e2e::rank_lag1(&delays(&pair, 300));
    assert!(NetPair::exec(&pair.a, &["tc", "qdisc", "del", "dev", &pair.a_if, "root"]).status.success(), "tc qdisc del");
    let out = netem_fault(agent_url, &pair, "latc1", "egress", &["--latency", "100ms", "--jitter", "80ms", "--correlation", "75%"]);
    assert_eq!(out["backend"], "nfqueue", "latency with a correlation is the engine's, also where netem is: {out}");
    let added = delays(&pair, 1000);
    revert_verified(agent_url, "latc1");
    assert_eq!((tree(&pair.a), NetPair::raw_rules(&pair.a)), (before, raw_before), "qdiscs and rules exactly as before");
    let (mean, sd, lag1) = chaos_e2e::moments(&added);
    // The chain's correlation is that of ranks, and a stall of the machine moves one rank.
    let rank_lag1 = chaos_e2e::rank_lag1(&added);
    let min = added.iter().copied().fold(f64::INFINITY, f64::min);
    let figures = format!(
        "100 ms ± 80, correlation 75 %: engine mean {mean:.1} ms, sd {sd:.1} (uniform 46.2), min {min:.1}, lag-1 autocorrelation of ranks {rank_lag1:.2} (Pearson's {lag1:.2}); netem's own on this kernel {netem_lag1:.2} (n {})",
        added.len()
    );
    // The host test's bounds scaled to ± 80 (1000 draws correlated 0.75 are worth about 140
    // independent ones: a sampling sd of 4 ms on the mean), but the mean only from below: the
    // emulated CPU adds its own wake-up latency to the engine's releases.
    assert!(added.len() >= 990, "nothing lost: {figures}");
    assert!(mean >= 70.0, "100 ms asked: {figures}");
    assert!(min >= 19.0, "no delay below 100 - 80 ms: {figures}");
    assert!((30.0..=62.0).contains(&sd), "sd 46.2 for a uniform ± 80: {figures}");
    assert!((0.55..=0.92).contains(&rank_lag1), "0.75 asked: {figures}");
    figures
}

fn netem_loss_with_correlation(agent_url: &str) -> Figures {
    let pair = NetPair::new();
    let before = tree(&pair.a);
    let out = netem_fault(agent_url, &pair, "lc1", "egress", &["--loss", "20%", "--correlation", "25%"]);
    assert_eq!(out["backend"], "tc-netem", "{out}");
    let n = 2_000;
    let got = NetPair::udp(&pair.a, &pair.b, &pair.b_ip, 7101, n, 2_000);
    let lost = 100.0 * (n - got.distinct) as f64 / n as f64;
    let qd = tree(&pair.a).0;
    assert!(qd.contains("loss state"), "a two-state loss model, which keeps the asked mean: {qd}");
    // Mean 400 of 2000; correlation 0.25 widens the sd to about 17.9 * sqrt(1.25/0.75) = 23; 4 sd.
    assert!((15.4..=24.6).contains(&lost), "20 % loss (correlation 25 %) asked, {lost:.1} % lost: {got:?}");
    revert_verified(agent_url, "lc1");
    assert_eq!(tree(&pair.a), before, "qdisc tree exactly as before");
    let after = NetPair::udp(&pair.a, &pair.b, &pair.b_ip, 7102, 500, 2_000);
    assert_eq!(after.distinct, 500, "nothing lost after revert: {after:?}");
    format!("20 % loss, correlation 25 %: {lost:.1} % of {n} UDP datagrams lost")
}

fn netem_corruption(agent_url: &str) -> Figures {
    let pair = NetPair::new();
    let before = tree(&pair.a);
    let out = netem_fault(agent_url, &pair, "c1", "ingress", &["--corrupt", "10%", "--protocol", "udp"]);
    assert_eq!(out["backend"], "tc-netem", "{out}");
    let links = tree(&pair.a).1;
    assert!(links.contains(": chx"), "ingress netem goes through an ifb of the fault's own: {links}");
    let n = 3_000;
    let got = NetPair::udp(&pair.b, &pair.a, &pair.a_ip, 7001, n, 3_000);
    let missing = n - got.distinct;
    assert_eq!(got.bad, 0, "a flipped bit never reaches the application: {got:?}");
    // netem flips one bit among the frame's 106 bytes (14 Ethernet + 20 IP + 8 UDP + 64). On ingress
    // the ifb hands the frame back after its Ethernet header was parsed, so a flip there changes
    // nothing; any other is caught by a checksum. Binomial(3000, 0.1 * 92/106 = 0.0868): mean 260,
    // sd 15.4; 5 sd either side.
    assert!((183..=338).contains(&missing), "10 % corrupted asked, 8.68 % expected discarded, {missing} of {n} missing: {got:?}");
    revert_verified(agent_url, "c1");
    assert_eq!(tree(&pair.a), before, "qdisc tree and links exactly as before (ifb gone)");
    let after = NetPair::udp(&pair.b, &pair.a, &pair.a_ip, 7002, 500, 3_000);
    assert_eq!(after.distinct, 500, "nothing corrupted after revert: {after:?}");
    format!(
        "10 % ingress: {missing} of {n} UDP datagrams discarded ({:.2} %; 8.68 % expected: flips in the parsed Ethernet header change nothing), 0 changed bytes delivered",
        100.0 * missing as f64 / n as f64
    )
}

fn netem_duplication(agent_url: &str) -> Figures {
    let pair = NetPair::new();
    let before = tree(&pair.a);
    let out = netem_fault(agent_url, &pair, "d1", "egress", &["--duplicate", "20%", "--protocol", "udp"]);
    assert_eq!(out["backend"], "tc-netem", "{out}");
    let n = 2_000;
    let got = NetPair::udp(&pair.a, &pair.b, &pair.b_ip, 7003, n, 2_000);
    assert_eq!((got.distinct, got.bad), (n, 0), "duplication loses and changes nothing: {got:?}");
    // Binomial(2000, 0.2): mean 400, sd 17.9; 5 sd either side.
    assert!((310..=490).contains(&got.duplicates), "20 % duplicated asked: {got:?}");
    revert_verified(agent_url, "d1");
    assert_eq!(tree(&pair.a), before, "qdisc tree exactly as before");
    let after = NetPair::udp(&pair.a, &pair.b, &pair.b_ip, 7004, 500, 2_000);
    assert_eq!((after.distinct, after.duplicates), (500, 0), "no copies after revert: {after:?}");
    format!("20 % egress: {} extra copies of {n} ({:.2} %), none lost", got.duplicates, 100.0 * got.duplicates as f64 / n as f64)
}

fn netem_reorder(agent_url: &str) -> Figures {
    let pair = NetPair::new();
    let before = tree(&pair.a);
    let out = netem_fault(agent_url, &pair, "r1", "egress", &["--reorder", "50%", "--latency", "20ms"]);
    assert_eq!(out["backend"], "tc-netem", "{out}");
    let got = NetPair::arrivals(&pair.a, &pair.b_ip, 200, "0.005");
    assert!(got.len() >= 195, "reorder must not lose packets: {} of 200", got.len());
    let overtaken = NetPair::overtaken(&got);
    let fast = got.iter().filter(|(_, rtt)| *rtt < 10.0).count();
    let held = got.iter().filter(|(_, rtt)| *rtt >= 19.5).count();
    assert!(overtaken >= 20, "packets arrive out of order: {overtaken}");
    assert!((50..=150).contains(&fast) && (50..=150).contains(&held), "50 % reorder asked: fast {fast}, held {held}");
    revert_verified(agent_url, "r1");
    assert_eq!(tree(&pair.a), before, "qdisc tree exactly as before");
    format!("50 % with 20 ms: {overtaken} of {} arrivals after a later one, {fast} fast, {held} held", got.len())
}

fn netem_spares_the_control_port(agent_url: &str) -> Figures {
    let pair = NetPair::new();
    let peer = format!("{}/32", pair.b_ip);
    apply(
        agent_url,
        &["--netns", &pair.a, "--latency", "200ms", "--peer", &peer, "--direction", "egress", "--duration", "2m", "--id", "x1"],
    );
    // Data leaving from the agent's own port (its control channel) goes htb-direct, never delayed;
    // a probe in `a` on the same port number stands in for the agent (which listens on loopback).
    let port: u16 = agent_url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("agent port");
    let other = free_port();
    let t = Instant::now();
    NetPair::throughput_from_port_bps(&pair.a, &pair.a_ip, port, &pair.b, 100_000);
    let exempt = t.elapsed();
    let t = Instant::now();
    NetPair::throughput_from_port_bps(&pair.a, &pair.a_ip, other, &pair.b, 100_000);
    let delayed = t.elapsed();
    assert!(delayed >= Duration::from_millis(400), "from another port the data is held 200 ms per round: {delayed:?}");
    assert!(exempt * 2 < delayed, "from the agent's port: {exempt:?}, from port {other}: {delayed:?}");
    revert_verified(agent_url, "x1");
    format!("100 kB from the agent's port {port}: {exempt:.2?}; from port {other}: {delayed:.2?} (200 ms egress)")
}

fn uniq(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

fn v2_cpu_throttle(agent_url: &str) -> Figures {
    let cg = TestCgroup::new("thr", &["cpu"]);
    assert!(cg.is_v2(), "the VM mounts cgroup2 only");
    let before = cg.read("cpu", "cpu.max");
    let mut burner = cg.spawn_sh("ulimit -t 120 && while :; do :; done");
    std::thread::sleep(Duration::from_millis(500));
    let free = cg.cpu_percent(Duration::from_secs(1));
    let id = uniq("thr");
    apply(agent_url, &["--cpu-quota", "20%", "--cgroup", &cg.path, "--duration", "2m", "--id", &id]);
    assert_eq!(cg.read("cpu", "cpu.max"), "20000 100000");
    std::thread::sleep(Duration::from_millis(500));
    let throttled = cg.cpu_percent(Duration::from_secs(2));
    let stat = cg.read("cpu", "cpu.stat");
    let nr_throttled = stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")).unwrap_or("0").to_string();
    revert_verified(agent_url, &id);
    let after = cg.read("cpu", "cpu.max");
    let _ = burner.kill();
    let _ = burner.wait();
    assert!((15.0..=25.0).contains(&throttled), "20 % quota, burner measured {throttled:.1} % (free: {free:.1} %)");
    assert_eq!(after, before, "cpu.max restored byte for byte");
    format!(
        "cpu.max {before:?} -> \"20000 100000\" -> {after:?}: burner {free:.1} % free, {throttled:.1} % throttled (nr_throttled {nr_throttled})"
    )
}

fn v2_memory_limit(agent_url: &str) -> Figures {
    let cg = TestCgroup::new("lim", &["memory"]);
    let before = cg.read("memory", "memory.max");
    let id = uniq("lim");
    apply(agent_url, &["--memory-limit", "64MiB", "--cgroup", &cg.path, "--duration", "2m", "--id", &id]);
    assert_eq!(cg.read("memory", "memory.max"), "67108864");
    // The limit bites: 100 MiB written through a pipe inside the cgroup is OOM-killed.
    let events = || cg.read("memory", "memory.events");
    let oom = |e: &str| e.lines().find_map(|l| l.strip_prefix("oom_kill ")?.parse::<u64>().ok()).unwrap_or(0);
    let before_kills = oom(&events());
    let mut hog = cg.spawn_sh("head -c 104857600 /dev/zero | tail -c 104857600 > /dev/null");
    let _ = hog.wait();
    let kills = oom(&events()) - before_kills;
    revert_verified(agent_url, &id);
    let after = cg.read("memory", "memory.max");
    assert!(kills >= 1, "a 100 MiB allocation under 64 MiB is OOM-killed: {}", events());
    assert_eq!(after, before, "memory.max restored byte for byte");
    format!("memory.max {before:?} -> \"67108864\" -> {after:?}; memory.events oom_kill +{kills}")
}

fn v2_freeze(agent_url: &str) -> Figures {
    let cg = TestCgroup::new("frz", &["freezer"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = dir.path().join("ticks");
    let mut ticker = cg.spawn_sh(&format!("i=0; while [ $i -lt 1200 ]; do i=$((i+1)); echo $i > {}; sleep 0.05; done", counter.display()));
    let read = || std::fs::read_to_string(&counter).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(5), || !read().is_empty()));
    let before = cg.read("freezer", "cgroup.freeze");
    let id = uniq("frz");
    let out = chaos_ok(&["agent", "apply", "--agent", agent_url, "--freeze-cgroup", &cg.path, "--duration", "2m", "--id", &id], 0);
    assert!(out.contains("frozen (verified)"), "{out}");
    let events = cg.read("freezer", "cgroup.events");
    assert!(events.contains("frozen 1"), "cgroup.events: {events}");
    let at = read();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(read(), at, "a frozen process kept running");
    revert_verified(agent_url, &id);
    let thawed = wait_until(Duration::from_secs(3), || read() != at);
    let (after, events_after) = (cg.read("freezer", "cgroup.freeze"), cg.read("freezer", "cgroup.events"));
    let _ = ticker.kill();
    let _ = ticker.wait();
    assert!(thawed, "not thawed");
    assert_eq!(after, before, "cgroup.freeze restored byte for byte");
    assert!(events_after.contains("frozen 0"), "{events_after}");
    format!("cgroup.freeze {before:?} -> \"1\" (cgroup.events frozen 1) -> {after:?}; ticker stopped and resumed")
}

fn v2_cpu_stress(agent_url: &str) -> Figures {
    let id = uniq("cpu50");
    let out = apply(agent_url, &["--cpu", "50%", "--duration", "2m", "--id", &id]);
    assert_eq!(out["state"], "APPLIED", "{out}");
    let own = std::path::PathBuf::from(format!("/sys/fs/cgroup/chaos-{id}"));
    let usage = || {
        std::fs::read_to_string(own.join("cpu.stat"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec ")?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1000
    };
    std::thread::sleep(Duration::from_millis(700));
    let load = chaos_e2e::cpu_percent_of(usage, Duration::from_secs(2));
    let r = revert_verified(agent_url, &id);
    assert!((42.0..=58.0).contains(&load), "the fault's cgroup measured {load:.1} % for a 50 % stress");
    assert!(!own.exists(), "the fault's cgroup is removed: {r}");
    format!("50 % asked: {load:.1} % of a core in {}'s cpu.stat", own.display())
}

fn v2_memory_stress_oom(agent_url: &str) -> Figures {
    let id = uniq("mem128");
    let out = apply(agent_url, &["--memory", "128MiB", "--duration", "2m", "--id", &id]);
    let own = std::path::PathBuf::from(format!("/sys/fs/cgroup/chaos-{id}"));
    let charged: f64 = std::fs::read_to_string(own.join("memory.current")).expect("memory.current").trim().parse().expect("number");
    assert!(charged >= 128.0 * 1048576.0, "charged to the fault's cgroup: {charged}: {out}");
    chaos_ok(&["agent", "revert", "--agent", agent_url, &id], 0);
    assert!(!own.exists());

    // A worker in a 100 MiB cgroup holds 60 MiB; the service (one process) then needs 60 MiB: the
    // kernel kills the worker (oom_score_adj 1000), the fault says so, memory.events counts one
    // kill, and the service gets its memory. (A shell pipeline as the service was not one
    // process: busybox `tail -c` grows its buffer past the limit and was killed too.)
    let cg = TestCgroup::new("oom", &["memory"]);
    cg.write("memory", "memory.max", "104857600");
    let id = uniq("oom");
    apply(agent_url, &["--memory", "60MiB", "--cgroup", &cg.path, "--duration", "2m", "--id", &id]);
    let marker = std::env::temp_dir().join(format!("{id}.held"));
    let me = std::env::current_exe().expect("own path");
    // The service is exempt from the OOM killer (-1000, as an operator protects the process under
    // test): while the killed worker is still exiting, a slow (emulated) CPU can otherwise see the
    // kernel pick a second victim before the first one's memory is back (the likely cause of one
    // run, host loaded, where the service was gone before it held its memory).
    let mut service =
        cg.spawn_sh(&format!("echo -1000 > /proc/self/oom_score_adj && exec {} hold-memory 62914560 {}", me.display(), marker.display()));
    let listed = || {
        let all = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", agent_url, "--all"], 0));
        all["faults"].as_array().into_iter().flatten().rev().find(|f| f["id"] == id.as_str()).cloned().unwrap_or_default()
    };
    let seen = wait_until(Duration::from_secs(30), || listed()["outcome"].as_str().is_some_and(|o| o.contains("OOM-killed")));
    let held = wait_until(Duration::from_secs(30), || marker.exists());
    let outcome = listed()["outcome"].clone();
    let events = cg.read("memory", "memory.events");
    let status = service.try_wait().expect("wait");
    let alive = status.is_none();
    let _ = service.kill();
    let _ = service.wait();
    let _ = std::fs::remove_file(&marker);
    chaos_ok(&["agent", "revert", "--agent", agent_url, &id], 0);
    assert!(seen, "no OOM outcome: {outcome}");
    assert!(
        alive && held,
        "the service under test must survive and get its 60 MiB (alive {alive}, held {held}, exit {status:?}); fault: {outcome}; memory.events: {events}"
    );
    let kills = events.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse::<u64>().ok());
    assert_eq!(kills, Some(1), "one OOM kill, the worker's: memory.events {events}");
    format!("128 MiB held ({:.0} MiB charged); OOM: {outcome}", charged / 1048576.0)
}

/// The service of the OOM check: touch `bytes` of memory, say so in `marker`, hold it for a minute.
fn hold_memory(bytes: usize, marker: &str) -> ! {
    let held = std::hint::black_box(vec![0xA5u8; bytes]);
    std::fs::write(marker, format!("held {}", held.len())).expect("marker");
    std::thread::sleep(Duration::from_secs(60));
    drop(held);
    std::process::exit(0)
}

/// `dd` of `mib` MiB with direct IO to `/dev/vda` inside `cg`; MB/s.
fn dd_rate(cg: &TestCgroup, mib: u32) -> f64 {
    let mut c = cg.spawn_sh(&format!("dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null"));
    let t = Instant::now();
    assert!(c.wait().expect("dd").success(), "dd to /dev/vda failed");
    f64::from(mib) * 1.048576 / t.elapsed().as_secs_f64()
}

fn v2_io_throttle(agent_url: &str) -> Figures {
    let dev = std::fs::read_to_string("/sys/block/vda/dev").expect("the VM's virtio disk /dev/vda").trim().to_string();
    let cg = TestCgroup::new("io", &["blkio"]);
    let before = cg.read("blkio", "io.max");
    let free = dd_rate(&cg, 8);
    let id = uniq("io");
    apply(
        agent_url,
        &["--io-limit", "2MB/s", "--io-direction", "write", "--device", &dev, "--cgroup", &cg.path, "--duration", "2m", "--id", &id],
    );
    let rule = cg.read("blkio", "io.max");
    assert!(rule.starts_with(&dev) && rule.contains("wbps=2000000"), "io.max: {rule}");
    let rate = dd_rate(&cg, 6);
    revert_verified(agent_url, &id);
    let after = cg.read("blkio", "io.max");
    assert!(rate < 2.6, "direct writes at {rate:.2} MB/s under a 2 MB/s limit (free: {free:.1} MB/s)");
    assert_eq!(after, before, "io.max restored byte for byte");
    format!("io.max {before:?} -> {rule:?} -> {after:?}: dd {free:.1} MB/s free, {rate:.2} MB/s throttled (2 MB/s asked) on {dev}")
}

fn v2_pause_by_cgroup(agent_url: &str) -> Figures {
    let cg = TestCgroup::new("pcg", &["freezer"]);
    let mut a = cg.spawn_sh("exec sleep 120");
    let mut b = cg.spawn_sh("exec sleep 120");
    let pids = || chaos_e2e::proc_pids_in(&cg.dir("freezer"));
    assert!(wait_until(Duration::from_secs(5), || pids().len() == 2), "two sleepers in {}", cg.path);
    let id = uniq("pcg");
    let out = apply(agent_url, &["--pause-cgroup", &cg.path, "--duration", "2m", "--id", &id]);
    let paused = out["processes"].as_array().map(Vec::len);
    let stopped = pids().iter().all(|p| chaos_e2e::proc_state(*p) == Some('T'));
    chaos_ok(&["agent", "revert", "--agent", agent_url, &id], 0);
    let resumed = pids().iter().all(|p| chaos_e2e::proc_state(*p) != Some('T'));
    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(paused, Some(2), "{out}");
    assert!(stopped && resumed, "stopped {stopped}, resumed {resumed}");
    format!("the 2 processes of {} (from its cgroup.procs) stopped and resumed", cg.path)
}

fn journal_replay_after_kill9(_shared: &str) -> Figures {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let journal = dir.path().join("journal-k9");
    let (mut agent, url) = start_agent_at(dir.path(), "k9", port, &journal, None, "30s", &[]);
    let cg = TestCgroup::new("k9", &["cpu", "memory", "freezer"]);
    let pair = NetPair::new();
    let tree_before = tree(&pair.a);
    let files = ["cpu.max", "memory.max", "cgroup.freeze"];
    let before: Vec<String> = files.iter().map(|f| cg.read("cpu", f)).collect();
    let (thr, lim, frz, cpu) = (uniq("k9thr"), uniq("k9lim"), uniq("k9frz"), uniq("k9cpu"));
    apply(&url, &["--cpu-quota", "10%", "--cgroup", &cg.path, "--duration", "5m", "--id", &thr]);
    apply(&url, &["--memory-limit", "80MiB", "--cgroup", &cg.path, "--duration", "5m", "--id", &lim]);
    apply(&url, &["--freeze-cgroup", &cg.path, "--duration", "5m", "--id", &frz]);
    apply(&url, &["--cpu", "20%", "--duration", "5m", "--id", &cpu]);
    let peer = format!("{}/32", pair.b_ip);
    apply(&url, &["--netns", &pair.a, "--latency", "100ms", "--peer", &peer, "--direction", "egress", "--duration", "5m", "--id", "k9lat"]);
    apply(&url, &["--netns", &pair.a, "--corrupt", "5%", "--peer", &peer, "--direction", "ingress", "--duration", "5m", "--id", "k9cor"]);
    let during: Vec<String> = files.iter().map(|f| cg.read("cpu", f)).collect();
    let tree_during = tree(&pair.a);
    agent.kill9();
    assert_eq!(files.iter().map(|f| cg.read("cpu", f)).collect::<Vec<_>>(), during, "the knobs stay until a revert");
    assert_eq!(tree(&pair.a), tree_during, "the qdiscs stay until a revert");
    let own = std::path::PathBuf::from(format!("/sys/fs/cgroup/chaos-{cpu}"));
    let (_agent, _url) = start_agent_at(dir.path(), "k9", port, &journal, None, "30s", &[]);
    let after: Vec<String> = files.iter().map(|f| cg.read("cpu", f)).collect();
    assert_eq!(after, before, "journal replay restores every v2 file byte for byte (during: {during:?})");
    assert!(wait_until(Duration::from_secs(5), || !own.exists()), "journal replay removes the stress cgroup");
    assert!(
        wait_until(Duration::from_secs(5), || tree(&pair.a) == tree_before),
        "journal replay restores the qdisc tree: {:?}",
        tree(&pair.a)
    );
    let qdiscs = |t: &(String, String)| t.0.lines().count();
    format!(
        "{files:?}: {before:?} -> {during:?} -> kill -9, restart -> {after:?}; qdiscs in the netns {} -> {} (netem egress + ifb ingress) -> {}",
        qdiscs(&tree_before),
        qdiscs(&tree_during),
        qdiscs(&tree(&pair.a))
    )
}
