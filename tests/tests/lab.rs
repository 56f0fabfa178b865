//! The lab end to end (root; jars fetched by deploy/lab/fetch.sh, which the
//! test command runs): `chaos lab up` brings up four namespaced hosts with
//! their agents, a coordinator, real Kafka and Cassandra; a partition
//! scenario cuts the processor from Cassandra and is reverted; `chaos lab
//! down` leaves no namespace, bridge, process or run directory.

use std::{path::PathBuf, process::Command, time::Duration};

use chaos_e2e::{Daemon, bin, chaos, chaos_ok, json, wait_until};

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
    assert!(tcp_from("lab-processor", "198.18.200.3:9042"), "CQL reachable from the processor host");
    assert!(tcp_from("lab-collector", "198.18.200.2:9092"), "Kafka reachable from the collector host");

    // Load: 3,000 events at 300/s from the collector host while the partition below holds.
    let work = tempfile::tempdir().expect("tempdir");
    let acks = work.path().join("acks");
    let acks_arg = acks.display().to_string();
    let collector = {
        let acks_arg = acks_arg.clone();
        std::thread::spawn(move || {
            let b = bin("chaos-collector").display().to_string();
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    "lab-collector",
                    &b,
                    "--count",
                    "3000",
                    "--rate",
                    "300",
                    "--size-bytes",
                    "512",
                    "--acks-file",
                    &acks_arg,
                ])
                .output()
                .expect("collector")
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    // A partition between processor and Cassandra, through the coordinator.
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

    // Every acknowledged event reached Cassandra exactly once despite the partition.
    let out = collector.join().expect("collector thread");
    let summary = json(&String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "collector: {summary}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary["acked"], 3000, "{summary}");
    let check = |table: &str, wait: &str| {
        let b = bin("chaos-check").display().to_string();
        let out = Command::new(&b).args(["--acks-file", &acks_arg, "--table", table, "--wait", wait]).output().expect("chaos-check");
        (out.status.code(), json(&String::from_utf8_lossy(&out.stdout)))
    };
    let (code, v) = check("events", "60s");
    assert_eq!(code, Some(0), "clean run: {v:#}");
    assert_eq!((v["lost_count"].as_u64(), v["duplicated_count"].as_u64(), v["ok"].as_u64()), (Some(0), Some(0), Some(3000)), "{v:#}");

    // Seeded defects are caught: a processor that drops 1 in 100, one that writes 1 in 100 twice.
    let seeded = |group: &str, table: &str, defect: &str| {
        let b = bin("chaos-processor").display().to_string();
        let args: Vec<String> = ["netns", "exec", "lab-processor", &b, "--group", group, "--table", table, "--defect", defect]
            .iter()
            .map(|s| s.to_string())
            .collect();
        Daemon::spawn_program("ip", &args, work.path().join(format!("{group}.log")))
    };
    // Each reads the whole topic (3,000 events) in its own group; the check
    // runs once it says it caught up, so slowness cannot pass for a defect.
    let caught_up = |d: &Daemon| wait_until(Duration::from_secs(180), || d.log_text().contains("idle: caught up"));
    let dropping = seeded("defect-drop", "events_drop", "drop-every=100");
    assert!(caught_up(&dropping), "dropping processor never caught up:\n{}", dropping.log_text());
    let (code, v) = check("events_drop", "0s");
    std::mem::drop(dropping);
    assert_eq!(code, Some(1), "dropping processor must fail the check: {v:#}");
    assert_eq!(v["lost_count"], 30, "1 in 100 of 3,000 lost: {v:#}");
    assert_eq!((v["duplicated_count"].as_u64(), v["unexpected_count"].as_u64()), (Some(0), Some(0)), "{v:#}");
    assert!(v["lost"].as_array().is_some_and(|l| l.len() == 10), "the first lost ids are named: {v:#}");
    assert!(v["verdict"].as_str().is_some_and(|s| s.starts_with("FAIL: 30 lost")), "{v:#}");
    let duplicating = seeded("defect-dup", "events_dup", "duplicate-every=100");
    assert!(caught_up(&duplicating), "duplicating processor never caught up:\n{}", duplicating.log_text());
    let (code, v) = check("events_dup", "0s");
    std::mem::drop(duplicating);
    assert_eq!(code, Some(1), "duplicating processor must fail the check: {v:#}");
    assert_eq!((v["duplicated_count"].as_u64(), v["lost_count"].as_u64()), (Some(30), Some(0)), "{v:#}");

    chaos_ok(&["lab", "down", "--home", &home], 0);
    assert!(leftovers().is_empty(), "lab down left {:?}", leftovers());
    let java = String::from_utf8_lossy(&Command::new("pgrep").args(["-f", "kafka.Kafka|CassandraDaemon"]).output().expect("pgrep").stdout)
        .into_owned();
    assert!(java.trim().is_empty(), "servers still running: {java}");
    assert!(lab_home().join("jars/kafka").exists(), "the jars are kept");
}

fn chaos_lab_coordinator() -> String {
    "http://198.18.200.1:50061".to_string()
}
