//! The lab end to end (root; jars fetched by deploy/lab/fetch.sh, which the
//! test command runs): `chaos lab up` brings up four namespaced hosts with
//! their agents, a coordinator, real Kafka and Cassandra; a partition
//! scenario cuts the processor from Cassandra and is reverted; two drills
//! under load pass with nothing lost or duplicated; `chaos validate` fails,
//! naming the ids, on processors seeded with defects; the coordinator's
//! probes stream the pipeline's counts, and a stop condition on the Kafka
//! probe aborts a scenario that pauses the broker; `chaos lab down`
//! leaves no namespace, bridge, process or run directory.

use std::{path::PathBuf, process::Command, time::Duration};

use chaos_e2e::{Daemon, assert_no_panic, json, wait_until};

/// `chaos` with the lab admin's certificate (`chaos lab up` makes it with
/// the lab's own CA; the lab verbs use it whatever the environment says).
fn chaos(args: &[&str]) -> std::process::Output {
    chaos_e2e::chaos_as(&lab_home().join("run/tls/admin"), args)
}

fn chaos_ok(args: &[&str], want_code: i32) -> String {
    chaos_e2e::chaos_ok_as(&lab_home().join("run/tls/admin"), args, want_code)
}

fn lab_home() -> PathBuf {
    PathBuf::from(std::env::var("CHAOS_LAB_HOME").unwrap_or_else(|_| "/var/lib/chaos-lab".into()))
}

/// Takes the lab down even when the test panics.
struct LabGuard {
    home: String,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = chaos(&["lab", "down", "--home", &self.home]);
    }
}

fn tcp_from(netns: &str, addr: &str) -> bool {
    let (host, port) = addr.split_once(':').expect("host:port");
    Command::new("ip")
        .args(["netns", "exec", netns, "timeout", "2", "bash", "-c", &format!("echo > /dev/tcp/{host}/{port}")])
        .status()
        .is_ok_and(|s| s.success())
}

fn leftovers() -> Vec<String> {
    let mut v = Vec::new();
    let ns = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().expect("ip").stdout).into_owned();
    v.extend(ns.lines().filter(|l| l.starts_with("lab-")).map(|l| format!("netns {l}")));
    if std::path::Path::new("/sys/class/net/chaoslab0").exists() {
        v.push("bridge chaoslab0".into());
    }
    if lab_home().join("run").exists() {
        v.push(format!("{}/run", lab_home().display()));
    }
    v
}

#[test]
fn lab_up_runs_real_kafka_and_cassandra_a_partition_bites_and_down_leaves_nothing() {
    let home = lab_home().display().to_string();
    assert!(
        !lab_home().join("run").exists(),
        "a lab is already running from {home} on this machine: take it down first (chaos lab down --home {home})"
    );
    // A missing prerequisite is named with the way to get it.
    let empty = tempfile::tempdir().expect("tempdir");
    let e = chaos_ok(&["lab", "up", "--home", &empty.path().display().to_string()], 1);
    assert!(e.contains("no kafka jars") && e.contains("fetch.sh"), "{e}");
    assert!(leftovers().is_empty(), "a refused up creates nothing: {:?}", leftovers());

    let _guard = LabGuard { home: home.clone() };
    let up = json(&chaos_ok(&["-o", "json", "lab", "up", "--home", &home], 0));
    assert_eq!(up["up"], true, "{up:#}");
    let names: Vec<&str> = up["components"].as_array().expect("components").iter().filter_map(|c| c["name"].as_str()).collect();
    for want in ["coordinator", "agent-kafka", "agent-cassandra", "agent-processor", "agent-collector", "kafka", "cassandra"] {
        assert!(names.contains(&want), "{want} missing: {up:#}");
    }
    // Idempotent: a second up finds it up.
    let again = chaos_ok(&["lab", "up", "--home", &home], 0);
    assert!(again.contains("already up"), "{again}");

    let curl = chaos_lab_coordinator();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let v = json(&String::from_utf8_lossy(&chaos(&["--coordinator", &curl, "-o", "json", "agents"]).stdout));
            v["agents"].as_array().is_some_and(|a| a.len() == 4 && a.iter().all(|x| x["health"] == "healthy"))
        }),
        "four lab agents registered"
    );
    // `chaos lab env` points a shell at the lab; the break-glass socket answers without a certificate.
    let env = chaos_ok(&["lab", "env", "--home", &home], 0);
    assert!(env.contains("CHAOS_COORDINATOR=https://198.18.200.1:50061") && env.contains("run/tls/admin"), "{env}");
    let sock = lab_home().join("run/agent-kafka.sock").display().to_string();
    let local = json(&chaos_e2e::chaos_ok_as(
        std::path::Path::new("/nonexistent"),
        &["-o", "json", "agent", "capabilities", "--local", "--socket", &sock],
        0,
    ));
    assert_eq!(local["agent_id"], "kafka", "{local:#}");
    assert!(local["tls_identity"].as_str().is_some_and(|t| t == "spiffe://chaos/agent/kafka"), "{local:#}");
    assert!(tcp_from("lab-processor", "198.18.200.3:9042"), "CQL reachable from the processor host");
    assert!(tcp_from("lab-collector", "198.18.200.2:9092"), "Kafka reachable from the collector host");

    // A partition between processor and Cassandra, through the coordinator: it bites, only there, and goes.
    let sc = json(&chaos_ok(
        &[
            "--coordinator",
            &curl,
            "-o",
            "json",
            "scenario",
            "create",
            "--partition",
            "198.18.200.3/32",
            "--netns",
            "lab-processor",
            "--agent-id",
            "processor",
            "--duration",
            "6s",
            "--severity",
            "3",
        ],
        0,
    ));
    let id = sc["scenario"]["id"].as_str().expect("id").to_string();
    let applied = wait_until(Duration::from_secs(5), || {
        let s = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "scenario", "show", &id], 0));
        s["agents"][0]["fault_state"] == "applied"
    });
    assert!(applied, "partition applied");
    assert!(!tcp_from("lab-processor", "198.18.200.3:9042"), "CQL cut from the processor during the partition");
    assert!(tcp_from("lab-collector", "198.18.200.3:9042"), "other hosts unaffected");
    assert!(
        wait_until(Duration::from_secs(15), || {
            json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "scenario", "show", &id], 0))["state"] == "completed"
        }),
        "scenario completed"
    );
    assert!(tcp_from("lab-processor", "198.18.200.3:9042"), "CQL back after the revert");

    // Two drills under load (debug binaries: a modest rate). Each asserts its
    // expectations while the fault holds, then validates recovery and data.
    let drill = |name: &str| {
        let out = chaos(&["-o", "json", "lab", "drill", name, "--home", &home, "--rate", "50", "--fault-duration", "8s", "--window", "6s"]);
        let v = json(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(out.status.code(), Some(0), "drill {name} failed: {v:#}\n{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(v["verdict"], "PASS", "{v:#}");
        let ex = v["expectations"].as_array().expect("expectations");
        assert!(!ex.is_empty() && ex.iter().all(|e| e["held"] == true), "{v:#}");
        assert_eq!(v["recovery"]["verdict"], "PASSED", "{v:#}");
        let names: Vec<&str> = v["recovery"]["checks"].as_array().expect("checks").iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names, ["availability:kafka", "availability:cassandra", "lag", "consistency", "performance"], "{v:#}");
        assert!(v["recovery"]["recovery_time_s"].as_f64().is_some(), "recovery time measured: {v:#}");
        assert_eq!(
            (v["data"]["lost"].as_u64(), v["data"]["duplicated"].as_u64(), v["data"]["unexpected"].as_u64()),
            (Some(0), Some(0), Some(0)),
            "{v:#}"
        );
        assert!(v["data"]["acknowledged"].as_u64().is_some_and(|n| n > 500), "{v:#}");
        assert_eq!(v["data"]["acknowledged"], v["data"]["ok"], "{v:#}");
        v
    };
    let processor_down = drill("processor-down");
    let kafka_down = drill("kafka-down");
    let buffered =
        kafka_down["expectations"].as_array().expect("expectations").iter().any(|e| e["expect"] == "Buffers" && e["held"] == true);
    assert!(buffered, "the collector buffered while Kafka was down: {kafka_down:#}");

    // lab status shows the pipeline's counts; the topic holds both drills' events.
    let st = json(&chaos_ok(&["-o", "json", "lab", "status", "--home", &home], 0));
    let total = processor_down["data"]["acknowledged"].as_u64().unwrap_or(0) + kafka_down["data"]["acknowledged"].as_u64().unwrap_or(0);
    assert_eq!(st["pipeline"]["kafka_count"].as_u64(), Some(total), "{st:#}");
    assert_eq!(st["pipeline"]["cassandra_count"].as_u64(), Some(total), "{st:#}");

    // The same three counts flow in the coordinator's metric stream, from
    // its probes of the collector's status, Kafka and Cassandra.
    let streamed = chaos_ok(
        &[
            "--coordinator",
            &curl,
            "-o",
            "json",
            "watch",
            "--source",
            "probe:kafka",
            "--source",
            "probe:cassandra",
            "--source",
            "probe:collector",
            "--count",
            "9",
            "--for",
            "30s",
        ],
        0,
    );
    let mut latest = std::collections::HashMap::new();
    for line in streamed.lines().filter(|l| l.starts_with('{')) {
        let ev = json(line);
        for m in ev["metrics"].as_array().into_iter().flatten() {
            latest.insert(m["name"].as_str().unwrap_or_default().to_string(), m["value"].as_f64().unwrap_or(-1.0));
        }
    }
    assert_eq!(latest.get("kafka.messages").copied(), Some(total as f64), "{streamed}");
    assert_eq!(latest.get("cassandra.rows").copied(), Some(total as f64), "{streamed}");
    assert_eq!(latest.get("kafka.lag.total").copied(), Some(0.0), "{streamed}");
    assert!(latest.get("cassandra.write_ms").is_some_and(|ms| *ms > 0.0), "probe row written: {streamed}");
    assert!(latest.get("cassandra.read_ms").is_some_and(|ms| *ms > 0.0), "probe row read back: {streamed}");
    assert_eq!(latest.get("file.acked").copied(), kafka_down["data"]["acknowledged"].as_f64(), "the last drill's collector: {streamed}");

    // A stop condition on the real Kafka: pausing the broker makes its probe
    // read unavailable within its 1 s timeout, which aborts the scenario and
    // resumes the broker on its own.
    let kafka_pid = String::from_utf8_lossy(&Command::new("pgrep").args(["-f", "kafka.Kafka"]).output().expect("pgrep").stdout)
        .split_whitespace()
        .next()
        .expect("the Kafka broker's pid")
        .to_string();
    let sc = json(&chaos_ok(
        &[
            "--coordinator",
            &curl,
            "-o",
            "json",
            "scenario",
            "create",
            "--pause-pid",
            &kafka_pid,
            "--agent-id",
            "kafka",
            "--severity",
            "3",
            "--duration",
            "60s",
            "--stop-if",
            "probe.up{probe=kafka} < 1",
        ],
        0,
    ));
    let id = sc["scenario"]["id"].as_str().expect("scenario id").to_string();
    let mut shown = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(20), || {
            shown = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "scenario", "show", &id], 0));
            shown["state"] == "aborted"
        }),
        "the Kafka probe's stop condition never fired: {shown:#}"
    );
    assert!(shown["reason"].as_str().is_some_and(|r| r.contains("probe.up{probe=kafka} = 0")), "{shown:#}");
    assert!(
        wait_until(Duration::from_secs(30), || {
            let v = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "metrics", "probe:kafka", "--metric", "probe.up"], 0));
            v["batches"][0]["metrics"][0]["value"] == 1.0
        }),
        "Kafka answers its probe again once the scenario reverted the pause"
    );

    // Seeded defects make validation fail naming the ids: a processor that
    // drops 1 in 100 events, one that writes 1 in 100 twice. Each reads the
    // whole topic (both drills' events) in its own group and table;
    // validation runs against both drills' acknowledged ids once it caught up.
    let work = tempfile::tempdir().expect("tempdir");
    let acks_path = work.path().join("acks");
    let mut all_acks = String::new();
    for d in [&processor_down, &kafka_down] {
        let p = lab_home().join("run/drills").join(d["run_id"].as_str().expect("run_id")).join("acks");
        all_acks.push_str(&std::fs::read_to_string(&p).expect("drill acks"));
    }
    std::fs::write(&acks_path, all_acks).expect("write acks");
    let acks = acks_path.display().to_string();
    let seeded = |group: &str, table: &str, defect: &str| {
        let args: Vec<String> = ["--group", group, "--table", table, "--defect", defect].iter().map(|s| s.to_string()).collect();
        Daemon::spawn_in_netns("lab-processor", "chaos-processor", &args, work.path().join(format!("{group}.log")))
    };
    let caught_up = |d: &Daemon| wait_until(Duration::from_secs(180), || d.log_text().contains("idle: caught up"));
    let validate = |table: &str| {
        let out =
            chaos(&["--coordinator", &curl, "-o", "json", "validate", "--lab", "--acks-file", &acks, "--table", table, "--attempts", "1"]);
        (out.status.code(), json(&String::from_utf8_lossy(&out.stdout)))
    };
    let consistency = |v: &serde_json::Value| {
        v["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "consistency")).cloned().unwrap_or_default()
    };
    // The clean table passes the same validation.
    let (code, v) = validate("chaos_lab.events");
    assert_eq!(code, Some(0), "clean table: {v:#}");
    let n = consistency(&v)["evidence"]["consistency"]["acknowledged"].as_u64().expect("acknowledged");
    assert_eq!(n, total, "{v:#}");

    let dropping = seeded("defect-drop", "events_drop", "drop-every=100");
    assert!(caught_up(&dropping), "dropping processor never caught up:\n{}", dropping.log_text());
    let (code, v) = validate("chaos_lab.events_drop");
    std::mem::drop(dropping);
    assert_eq!(code, Some(1), "dropping processor must fail validation: {v:#}");
    assert_eq!(v["verdict"], "FAILED", "{v:#}");
    let c = consistency(&v);
    let lost = c["evidence"]["consistency"]["lost_count"].as_u64().expect("lost_count");
    assert_eq!(lost, n / 100, "1 in 100 of {n} lost: {v:#}");
    let first: Vec<&str> = c["evidence"]["consistency"]["lost"].as_array().expect("lost ids").iter().filter_map(|x| x.as_str()).collect();
    assert!(!first.is_empty() && first.iter().all(|id| id.contains("-down-")), "the lost ids are named: {v:#}");
    assert!(
        v["reasons"].as_array().is_some_and(|r| r.iter().any(|r| r.as_str().is_some_and(|r| r.contains("lost") && r.contains(first[0])))),
        "{v:#}"
    );

    let duplicating = seeded("defect-dup", "events_dup", "duplicate-every=100");
    assert!(caught_up(&duplicating), "duplicating processor never caught up:\n{}", duplicating.log_text());
    let (code, v) = validate("chaos_lab.events_dup");
    std::mem::drop(duplicating);
    assert_eq!(code, Some(1), "duplicating processor must fail validation: {v:#}");
    let c = consistency(&v);
    assert_eq!(c["evidence"]["consistency"]["duplicated_count"].as_u64(), Some(n / 100), "{v:#}");
    assert_eq!(c["evidence"]["consistency"]["lost_count"].as_u64(), Some(0), "{v:#}");

    // A shipped experiment file against the lab: CPU pressure next to
    // Cassandra (its agent sees the cgroups: the lab starts it with nsenter).
    let reports = tempfile::tempdir().expect("tempdir");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/experiments/lab-cassandra-cpu-pressure.yaml");
    let out = chaos_ok(&["--coordinator", &curl, "run", file, "--report-dir", &reports.path().display().to_string()], 0);
    assert!(out.contains("verdict: HELD"), "{out}");
    let rdir = std::fs::read_dir(reports.path()).expect("reports").flatten().next().expect("a report").path();
    let rep = json(&std::fs::read_to_string(rdir.join("report.json")).expect("report.json"));
    assert_eq!(rep["steps"][0]["state"], "completed", "{rep:#}");
    assert!(rep["steps"][0]["agents"][0]["summary"].as_str().is_some_and(|s| s.contains("worker thread")), "{rep:#}");

    // A seeds' drill as a file, with load and validation: pause the
    // processor while the collector produces; the report has the load's
    // figures per phase, and the validation finds every event stored once.
    let reports = tempfile::tempdir().expect("tempdir");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/experiments/lab-drill-processor-down.yaml");
    let out = chaos_ok(&["--coordinator", &curl, "run", file, "--report-dir", &reports.path().display().to_string()], 0);
    assert!(out.contains("verdict: HELD") && out.contains("load phase fault"), "{out}");
    let rdir = std::fs::read_dir(reports.path()).expect("reports").flatten().next().expect("a report").path();
    let rep = json(&std::fs::read_to_string(rdir.join("report.json")).expect("report.json"));
    let phases = rep["load"]["phases"].as_array().expect("load phases");
    assert_eq!(phases.len(), 4, "{rep:#}");
    for p in phases {
        assert_eq!(p["stored"], p["acked"], "every acknowledged event of each phase stored: {p}");
        assert!(p["acked"].as_u64().is_some_and(|n| n > 0) && p["error_pct"] == 0.0, "{p}");
        assert!(p["p95_ms"].as_f64().is_some_and(|v| v > 0.0) && p["p99_ms"].as_f64() >= p["p95_ms"].as_f64(), "{p}");
    }
    // The pause began with the load's fault phase (the method waited for it), not inside the baseline.
    let timeline = rep["timeline"].as_array().expect("timeline");
    let began = timeline
        .iter()
        .find(|e| e["event"].as_str().is_some_and(|t| t.starts_with("load: phase fault began")))
        .and_then(|e| e["t_s"].as_f64())
        .unwrap_or_else(|| panic!("the fault phase on the timeline: {timeline:?}"));
    let pause = rep["steps"].as_array().and_then(|s| s.iter().find(|s| s["kind"] == "fault")).expect("the pause step");
    assert_eq!(rep["steps"][0]["state"], "done", "{:#}", rep["steps"]);
    assert!(pause["start_s"].as_f64().is_some_and(|t| t >= began), "pause {pause} before the fault phase at {began}");
    // Events produced while the processor was paused waited for it: that phase's p99 is seconds, the baseline's is not.
    let p99 = |name: &str| phases.iter().find(|p| p["phase"] == name).and_then(|p| p["p99_ms"].as_f64()).unwrap_or(0.0);
    // Events written again after the processor's group rejoined count as redelivered, and their latency is
    // to the first write: they do not make the baseline look like the fault.
    assert!(p99("fault") > 5000.0 && p99("baseline") < 5000.0, "{phases:?}");
    assert!(phases.iter().all(|p| p["redelivered"].as_u64().is_some_and(|n| n <= p["stored"].as_u64().unwrap_or(0))), "{phases:?}");
    assert_eq!(rep["validation"]["verdict"], "PASSED", "{:#}", rep["validation"]);
    let checks: Vec<&str> = rep["validation"]["checks"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    assert!(checks.contains(&"consistency") && checks.contains(&"lag"), "{checks:?}");
    let md = std::fs::read_to_string(rdir.join("report.md")).expect("report.md");
    assert!(md.contains("## Load") && md.contains("| fault |") && md.contains("## Validation: PASSED"), "{md}");

    // `chaos load` alone: a short profile, figures per phase.
    let load_dir = tempfile::tempdir().expect("tempdir");
    let v = json(&chaos_ok(
        &["-o", "json", "load", "--profile", "warmup:50:2s,baseline:200:4s", "--dir", &load_dir.path().display().to_string()],
        0,
    ));
    let phases = v["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 2, "{v:#}");
    assert!(phases[1]["acked"].as_u64().is_some_and(|n| (600..=900).contains(&n)), "about 200/s for 4 s: {v:#}");
    assert_eq!(phases[1]["stored"], phases[1]["acked"], "{v:#}");
    assert!(phases[1]["p95_ms"].as_f64().is_some_and(|ms| ms > 0.0 && ms < 5000.0), "{v:#}");
    let refused = chaos_ok(&["load", "--profile", "a:10:1s", "--bootstrap", "10.0.0.1:9092"], 2);
    assert!(refused.contains("not a lab address"), "{refused}");

    // None of the lab's own daemons panicked during all of it.
    for f in std::fs::read_dir(lab_home().join("run/logs")).expect("lab logs").flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if ["coordinator", "agent-", "processor"].iter().any(|p| name.starts_with(p)) {
            assert_no_panic(&name, &f.path());
        }
    }
    chaos_ok(&["lab", "down", "--home", &home], 0);
    assert!(leftovers().is_empty(), "lab down left {:?}", leftovers());
    let java = String::from_utf8_lossy(&Command::new("pgrep").args(["-f", "kafka.Kafka|CassandraDaemon"]).output().expect("pgrep").stdout)
        .into_owned();
    assert!(java.trim().is_empty(), "servers still running: {java}");
    assert!(lab_home().join("jars/kafka").exists(), "the jars are kept");
}

fn chaos_lab_coordinator() -> String {
    "https://198.18.200.1:50061".to_string()
}
