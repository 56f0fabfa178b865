//! The lab end to end (root; jars fetched by deploy/lab/fetch.sh, which the
//! test command runs): `chaos lab up` brings up four namespaced hosts with
//! their agents, a coordinator, real Kafka and Cassandra; a partition
//! scenario cuts the processor from Cassandra and is reverted; `chaos lab
//! down` leaves no namespace, bridge, process or run directory.

use std::{path::PathBuf, process::Command, time::Duration};

use chaos_e2e::{chaos, chaos_ok, json, wait_until};

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
