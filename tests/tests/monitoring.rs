//! Monitoring end to end, with real agent and coordinator processes:
//! metric values checked against ground truth (a process burning CPU under
//! a 30 % quota shows ~30 % in its cgroup's and its own numbers; bytes sent
//! through a netns show on its interface), both `/metrics` endpoints read
//! by a real Prometheus-format parser, and a stop condition that aborts a
//! running scenario and reverts its fault on its own — with a watcher that
//! never reads left open meanwhile, which must not delay the one that does.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use chaos_e2e::{NetPair, Victim, chaos, chaos_ok, free_port, json, start_agent_at, start_coordinator_with, wait_until};
use chaos_proto::pb::{self, coordinator_client::CoordinatorClient};

/// GET http://addr/metrics, parsed by prometheus-parse.
fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("a valid Prometheus exposition")
}

fn sample<'a>(s: &'a prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a prometheus_parse::Sample> {
    s.samples.iter().find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

/// The cgroup of the burner, in every hierarchy the metrics read; removed
/// (after the burner is killed) on drop.
struct Burner {
    child: Child,
    dirs: Vec<PathBuf>,
    path: String,
}

impl Burner {
    /// A busy loop (CPU time capped at 120 s by ulimit) under a 30 % CPU
    /// quota, which joins the cgroup first and then holds 8 MB (a shell
    /// variable), so that its memory is charged there.
    fn start() -> Burner {
        let path = format!("/chaos-e2e-burn-{}", std::process::id());
        let root = PathBuf::from("/sys/fs/cgroup");
        let v2 = root.join("cgroup.controllers").exists();
        let dirs: Vec<PathBuf> = if v2 {
            vec![root.join(&path[1..])]
        } else {
            ["cpu", "cpuacct", "memory"]
                .iter()
                .map(|c| root.join(c).join(&path[1..]))
                .filter(|d| d.parent().is_some_and(|p| p.is_dir()))
                .collect()
        };
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        if v2 {
            std::fs::write(dirs[0].join("cpu.max"), "30000 100000").expect("cpu.max");
        } else {
            std::fs::write(root.join("cpu").join(&path[1..]).join("cpu.cfs_period_us"), "100000").expect("period");
            std::fs::write(root.join("cpu").join(&path[1..]).join("cpu.cfs_quota_us"), "30000").expect("quota");
        }
        let join: Vec<String> = dirs.iter().map(|d| format!("echo $$ > {}/cgroup.procs", d.display())).collect();
        let script =
            format!("{} && ulimit -t 120 && x=$(head -c 8000000 /dev/zero | tr '\\0' a) && while :; do :; done", join.join(" && "));
        let child = Command::new("sh").args(["-c", &script]).stdin(Stdio::null()).spawn().expect("burner");
        Burner { child, dirs, path }
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for d in &self.dirs {
            // The kernel needs a moment to let go of the dead task.
            wait_until(Duration::from_secs(5), || std::fs::remove_dir(d).is_ok() || !d.exists());
        }
    }
}

/// (seq, value) of `name` (with `labels`) in the agent's latest batch and the `history` before it.
fn series(curl: &str, agent: &str, name: &str, labels: &[(&str, &str)], history: u32) -> Vec<(u64, f64)> {
    let h = history.to_string();
    // Not found until the hub has the agent's first batch.
    let out = chaos(&["--coordinator", curl, "-o", "json", "metrics", agent, "--metric", name, "--history", &h]);
    if !out.status.success() {
        return Vec::new();
    }
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let mut out = Vec::new();
    for b in v["batches"].as_array().into_iter().flatten() {
        for m in b["metrics"].as_array().into_iter().flatten() {
            if m["name"] == name && labels.iter().all(|(k, x)| m["labels"][*k] == *x) {
                out.push((b["seq"].as_u64().unwrap_or(0), m["value"].as_f64().unwrap_or(f64::NAN)));
            }
        }
    }
    out
}

#[test]
fn agent_metrics_match_ground_truth_and_prometheus_parses_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coord, curl) = start_coordinator_with(dir.path(), free_port(), None);
    let net = NetPair::new();
    // No IPv6 chatter on the veth: only our pings cross it.
    for ns in [&net.a, &net.b] {
        NetPair::exec(ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    }
    let burner = Burner::start();
    let burner_pid = burner.child.id().to_string();
    let prom = format!("127.0.0.1:{}", free_port());
    let journal = dir.path().join("journal");
    let (_agent, _) = start_agent_at(
        dir.path(),
        "mon",
        free_port(),
        &journal,
        Some(&curl),
        "10s",
        &["--watch-netns", &net.a, "--watch-cgroup", &burner.path, "--watch-process", "sh", "--metrics-listen", &prom],
    );
    let cg = [("cgroup", burner.path.as_str())];
    assert!(
        wait_until(Duration::from_secs(20), || series(&curl, "mon", "cgroup.cpu_pct", &cg, 10).len() >= 4),
        "four CPU samples of the cgroup"
    );
    // Ground truth: the quota lets the loop run 30 % of one core.
    let cpu = series(&curl, "mon", "cgroup.cpu_pct", &cg, 10);
    let recent: Vec<f64> = cpu.iter().rev().take(3).map(|x| x.1).collect();
    let mean = recent.iter().sum::<f64>() / recent.len() as f64;
    assert!((22.0..=38.0).contains(&mean), "cgroup CPU {recent:?}, want ~30 % (quota 30000/100000)");
    let proc_cpu = series(&curl, "mon", "process.cpu_pct", &[("name", "sh"), ("pid", &burner_pid)], 0);
    assert!(proc_cpu.first().is_some_and(|x| (20.0..=40.0).contains(&x.1)), "the burner's own CPU: {proc_cpu:?}");
    let mem = series(&curl, "mon", "cgroup.memory_bytes", &cg, 0);
    assert!(mem.first().is_some_and(|x| x.1 >= 8e6), "the 8 MB the burner holds, charged to its cgroup: {mem:?}");

    // Ground truth: 20 pings of 1000 bytes out of namespace a, each frame
    // 1000 + 8 (ICMP) + 20 (IP) + 14 (Ethernet) = 1042 bytes.
    let iface = format!("ce{}-0a", std::process::id());
    let tx = [("iface", iface.as_str()), ("netns", net.a.as_str())];
    let before = series(&curl, "mon", "net.tx_bytes_total", &tx, 0);
    let (seq0, tx0) = *before.first().unwrap_or_else(|| panic!("no tx counter for {iface} in {}", net.a));
    let out = NetPair::exec(&net.a, &["ping", "-n", "-q", "-c", "20", "-s", "1000", "-i", "0.02", &net.b_ip]);
    assert!(out.status.success(), "ping: {}", String::from_utf8_lossy(&out.stdout));
    let t0 = Instant::now();
    let mut after = (seq0, tx0);
    // Two samples after the pings: the sampler has read the counters since.
    assert!(
        wait_until(Duration::from_secs(10), || {
            after = series(&curl, "mon", "net.tx_bytes_total", &tx, 0).first().copied().unwrap_or(after);
            after.0 >= seq0 + 2 && t0.elapsed() > Duration::from_millis(1100)
        }),
        "new samples"
    );
    let sent = after.1 - tx0;
    // ARP: one request (42 bytes) or reply at most on top.
    assert!((20_840.0..=20_840.0 + 128.0).contains(&sent), "tx bytes on {iface}: {sent}, want 20 x 1042 = 20840 (+ARP)");

    // The same counters through /metrics, read by a Prometheus parser.
    let s = scrape(&prom);
    let p = sample(&s, "chaos_net_tx_bytes_total", &[("iface", &iface), ("netns", &net.a)]).expect("tx counter in /metrics");
    assert!(value(p) >= after.1, "/metrics {} >= {}", value(p), after.1);
    assert!(sample(&s, "chaos_host_cpu_used_pct", &[("source", "mon")]).is_some_and(|x| (0.0..=100.0).contains(&value(x))));
    assert!(sample(&s, "chaos_cgroup_cpu_pct", &[("cgroup", &burner.path)]).is_some());
    assert!(s.samples.iter().any(|x| x.metric.starts_with("chaos_rpc_duration_seconds")), "RPC latency histogram");
    drop(burner);
}

fn stream_request() -> pb::StreamMetricsRequest {
    pb::StreamMetricsRequest { sources: vec!["probe:svc".into()], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_condition_aborts_a_running_scenario_and_reverts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The service the probe watches: the test holds its listener.
    let svc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let svc_addr = svc.local_addr().expect("addr").to_string();
    let prom = format!("127.0.0.1:{}", free_port());
    let cfg = dir.path().join("coordinator.yaml");
    std::fs::write(
        &cfg,
        format!(
            "chaos_testing: {{blast_radius_limit: 1.0, default_duration: 60}}\n\
             monitoring:\n  metrics_interval: 500ms\n  listen: {prom}\n  probes:\n    - {{name: svc, kind: tcp, address: '{svc_addr}', timeout: 300ms}}\n"
        ),
    )
    .expect("config");
    let (coord, curl) = start_coordinator_with(dir.path(), free_port(), Some(&cfg));
    let (_agent, _) = start_agent_at(dir.path(), "a0", free_port(), &dir.path().join("j"), Some(&curl), "10s", &[]);
    let victim = Victim::spawn();
    let pid = victim.pid().to_string();

    // A watcher that never reads, open for the whole test.
    let mut slow = CoordinatorClient::new(chaos_e2e::coordinator_channel(&curl));
    let _never_read = slow.stream_metrics(stream_request()).await.expect("slow watcher");

    let bad = chaos(&["--coordinator", &curl, "scenario", "create", "--pause-pid", &pid, "--agent-id", "a0", "--stop-if", "probe.up <"]);
    assert_eq!(bad.status.code(), Some(2), "a malformed rule is a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--stop-if[0]: rule \"probe.up <\""), "{bad:?}");
    let created = json(&chaos_ok(
        &[
            "--coordinator",
            &curl,
            "-o",
            "json",
            "scenario",
            "create",
            "--pause-pid",
            &pid,
            "--agent-id",
            "a0",
            "--severity",
            "2",
            "--duration",
            "60s",
            "--stop-if",
            "probe.up{probe=svc} < 1 for 1s",
        ],
        0,
    ));
    let id = created["scenario"]["id"].as_str().expect("id").to_string();
    assert!(wait_until(Duration::from_secs(5), || victim.state() == 'T'), "the fault holds while the service is up");

    // The fast watcher: every probe batch arrives about every 500 ms.
    let mut fast = CoordinatorClient::new(chaos_e2e::coordinator_channel(&curl));
    let mut stream = fast.stream_metrics(stream_request()).await.expect("fast watcher").into_inner();
    let mut gaps = Vec::new();
    let mut last = Instant::now();
    for _ in 0..6 {
        let ev = tokio::time::timeout(Duration::from_secs(3), stream.message())
            .await
            .expect("a batch within 3 s")
            .expect("stream")
            .expect("open");
        assert!(matches!(ev.event, Some(pb::metric_event::Event::Batch(_))), "{ev:?}");
        gaps.push(last.elapsed());
        last = Instant::now();
    }
    assert!(gaps[1..].iter().all(|g| *g < Duration::from_millis(1500)), "batches every ~500 ms despite the stuck watcher: {gaps:?}");
    assert_eq!(victim.state(), 'T', "still running: the service is up");

    // The service dies: the probe reads it unavailable within its timeout,
    // the rule holds for 1 s, the scenario is aborted and the pause reverted.
    let died = Instant::now();
    drop(svc);
    let mut v = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            v = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "scenario", "show", &id], 0));
            v["state"] == "aborted"
        }),
        "the stop condition never aborted the scenario: {v:#}\n{}",
        coord.log_text()
    );
    let took = died.elapsed();
    assert!(took >= Duration::from_secs(1), "the rule holds for 1 s first, took {took:?}");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("stop condition `probe.up{probe=svc} < 1 for 1s` fired") && reason.contains("probe.up{probe=svc} = 0"),
        "{reason}"
    );
    assert!(wait_until(Duration::from_secs(5), || victim.state() != 'T'), "the pause is reverted");
    let audit = chaos_ok(&["--coordinator", &curl, "-o", "json", "audit"], 0);
    assert!(audit.contains("StopConditionFired") && audit.contains(&id), "{audit}");

    // The probe's state and the alert counter on the coordinator's /metrics.
    let s = scrape(&prom);
    assert!(sample(&s, "chaos_probe_up", &[("probe", "svc")]).is_some_and(|x| value(x) == 0.0), "probe down in /metrics");
    let alerts: Vec<_> = s.samples.iter().filter(|x| x.metric.starts_with("chaos_alerts")).collect();
    assert!(
        s.samples
            .iter()
            .any(|x| x.metric.starts_with("chaos_alerts_fired") && x.labels.get("kind") == Some("stop_condition") && value(x) >= 1.0),
        "stop condition counted in /metrics: {alerts:?}"
    );
    assert!(sample(&s, "chaos_scenarios", &[("state", "running")]).is_some_and(|x| value(x) == 0.0));
}
