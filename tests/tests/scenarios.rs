//! Scenarios end to end, through the `chaos` CLI, against a real
//! coordinator and real agents on loopback: a scenario runs to completion
//! and its fault disappears; a fourth scenario queues behind the limit and
//! starts when a slot frees; refusals name the rule and its numbers; a
//! coordinator killed mid-scenario picks it up after restart; an orphan
//! fault is reverted; the audit log records every mutation.

use std::{path::Path, time::Duration};

use chaos_e2e::{Daemon, Victim, chaos, chaos_ok, free_port, json, start_agent_at, start_coordinator_with, wait_until};

/// A coordinator with `yaml` as its config, and `n` agents labelled
/// `role=r0..`, the first `protected` of them with chaos.protected=true.
struct Fleet {
    _dir: tempfile::TempDir,
    coord: Daemon,
    curl: String,
    port: u16,
    agents: Vec<(Daemon, String)>,
}

fn fleet(yaml: &str, n: usize, protected: usize) -> Fleet {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("coordinator.yaml");
    std::fs::write(&cfg, yaml).expect("config");
    let port = free_port();
    let (coord, curl) = start_coordinator_with(dir.path(), port, Some(&cfg));
    let agents = (0..n)
        .map(|i| {
            let id = format!("a{i}");
            let role = format!("role=r{i}");
            let mut extra = vec!["--label", role.as_str(), "--label", "tier=all"];
            if i < protected {
                extra.extend(["--label", "chaos.protected=true"]);
            }
            let journal = dir.path().join(format!("journal-{id}"));
            start_agent_at(dir.path(), &id, free_port(), &journal, Some(&curl), "10s", &extra)
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let v = json(&String::from_utf8_lossy(&chaos(&["--coordinator", &curl, "-o", "json", "agents"]).stdout));
            v["agents"].as_array().is_some_and(|a| a.len() == n && a.iter().all(|x| x["health"] == "healthy"))
        }),
        "{n} healthy agents"
    );
    Fleet { _dir: dir, coord, curl, port, agents }
}

impl Fleet {
    fn c(&self, args: &[&str], code: i32) -> String {
        let mut all = vec!["--coordinator", &self.curl];
        all.extend_from_slice(args);
        chaos_ok(&all, code)
    }

    fn scenario(&self, id: &str) -> serde_json::Value {
        json(&self.c(&["-o", "json", "scenario", "show", id], 0))
    }

    fn wait_state(&self, id: &str, state: &str, within: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let ok = wait_until(within, || {
            last = self.scenario(id);
            last["state"] == state
        });
        assert!(ok, "scenario {id} never reached {state}: {last:#}");
        last
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }
}

const OPEN: &str = "chaos_testing: {blast_radius_limit: 1.0, max_concurrent_scenarios: 1, default_duration: 60}\n";

fn create(f: &Fleet, args: &[&str]) -> String {
    let mut all = vec!["-o", "json", "scenario", "create"];
    all.extend_from_slice(args);
    let v = json(&f.c(&all, 0));
    v["scenario"]["id"].as_str().expect("scenario id").to_string()
}

#[test]
fn scenario_runs_to_completion_then_queue_and_cancel_and_emergency_stop() {
    let f = fleet(OPEN, 2, 0);
    let v = Victim::spawn();
    let pid = v.pid().to_string();
    let a = create(&f, &["--pause-pid", &pid, "--selector", "role=r0", "--duration", "3s", "--severity", "2", "--name", "first"]);
    let sc = f.wait_state(&a, "running", Duration::from_secs(5));
    assert!(wait_until(Duration::from_secs(3), || v.state() == 'T'), "paused while running");
    assert_eq!(sc["agents"][0]["agent_id"], "a0", "{sc:#}");
    // A second one queues behind max_concurrent_scenarios = 1.
    let b = create(&f, &["--pause-pid", &pid, "--agent-id", "a0", "--duration", "2s", "--severity", "2"]);
    let q = json(&f.c(&["-o", "json", "queue"], 0));
    assert_eq!(q["queued"][0]["id"], b.as_str(), "{q:#}");
    assert_eq!(q["queued"][0]["queue_position"], 1, "{q:#}");
    // A third queues at position 2 and is cancelled there.
    let c = create(&f, &["--pause-pid", &pid, "--agent-id", "a0", "--duration", "2s", "--severity", "2"]);
    assert_eq!(f.scenario(&c)["queue_position"], 2);
    let stopped = json(&f.c(&["-o", "json", "scenario", "stop", &c, "--reason", "not needed"], 0));
    assert_eq!(stopped["state"], "stopped", "{stopped:#}");
    assert!(stopped["reason"].as_str().is_some_and(|r| r.contains("cancelled while queued")), "{stopped:#}");

    let done = f.wait_state(&a, "completed", Duration::from_secs(10));
    assert_eq!(done["agents"][0]["fault_state"], "reverted", "{done:#}");
    let states: Vec<&str> = done["transitions"].as_array().expect("transitions").iter().filter_map(|t| t["state"].as_str()).collect();
    assert_eq!(states, ["pending", "running", "reverting", "completed"]);
    // The queued one took the slot, ran, and ended; the process runs again.
    f.wait_state(&b, "running", Duration::from_secs(5));
    f.wait_state(&b, "completed", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(3), || v.state() != 'T'), "resumed after the scenarios");
    let faults = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", &f.agents[0].1], 0));
    assert_eq!(faults["faults"].as_array().map(Vec::len), Some(0), "no fault left on the agent: {faults:#}");

    // Emergency stop: the running one is aborted and reverted, the queued one cancelled.
    let r = create(&f, &["--pause-pid", &pid, "--agent-id", "a0", "--duration", "1m", "--severity", "2"]);
    let q = create(&f, &["--pause-pid", &pid, "--agent-id", "a0", "--duration", "1m", "--severity", "2"]);
    f.wait_state(&r, "running", Duration::from_secs(5));
    assert!(wait_until(Duration::from_secs(3), || v.state() == 'T'));
    f.c(&["emergency-stop", "--reason", "scenario drill"], 0);
    let aborted = f.wait_state(&r, "aborted", Duration::from_secs(10));
    assert!(aborted["reason"].as_str().is_some_and(|s| s.contains("scenario drill")), "{aborted:#}");
    assert_eq!(f.scenario(&q)["state"], "aborted");
    assert!(wait_until(Duration::from_secs(3), || v.state() != 'T'));
    let e = f.c(&["scenario", "create", "--pause-pid", &pid, "--agent-id", "a0", "--duration", "5s", "--severity", "2"], 3);
    assert!(e.contains("disarmed") && e.contains("scenario drill"), "{e}");
}

#[test]
fn refusals_name_the_rule_and_the_numbers_and_the_audit_records_them() {
    // Defaults: blast radius 30 %, severity caps of the built-in levels.
    let f = fleet("chaos_testing: {default_duration: 30}\n", 3, 1);
    let v = Victim::spawn();
    let pid = v.pid().to_string();
    // 1 of 3 agents is 33 % > 30 %.
    let e = f.c(&["scenario", "create", "--pause-pid", &pid, "--agent-id", "a1", "--severity", "2"], 3);
    assert!(e.contains("blast radius: would affect 1 of 3 agents (33 %) > limit 30 %"), "{e}");
    // Severity 1 does not allow pausing.
    let e = f.c(&["scenario", "create", "--pause-pid", &pid, "--agent-id", "a1", "--severity", "1"], 3);
    assert!(e.contains("pausing a service is not allowed at severity_levels.1 (allow_pause: false)"), "{e}");
    // Loss above the level's cap names the cap.
    let e = f.c(&["scenario", "create", "--loss", "20%", "--agent-id", "a1", "--severity", "2"], 3);
    assert!(e.contains("loss 20 % exceeds severity_levels.2.max_packet_percent 10 %"), "{e}");
    // The protected agent is never selected, even asked by id.
    let e = f.c(&["scenario", "create", "--pause-pid", &pid, "--agent-id", "a0", "--severity", "2"], 3);
    assert!(e.contains("agent \"a0\" is protected (chaos.protected=true)"), "{e}");
    // A malformed fault is INVALID_ARGUMENT naming the field.
    let e = f.c(&["scenario", "create", "--loss", "150%", "--agent-id", "a1", "--severity", "2"], 2);
    assert!(e.contains("spec.fault.") && e.contains("150"), "{e}");
    // Dry run: what would be selected, the blast radius, what refuses.
    let d =
        json(&f.c(&["-o", "json", "scenario", "create", "--pause-pid", &pid, "--selector", "tier=all", "--severity", "2", "--dry-run"], 3));
    let adm = &d["admission"];
    assert_eq!(adm["admitted"], false, "{d:#}");
    assert_eq!(adm["selected_agent_ids"], serde_json::json!(["a1", "a2"]), "protected a0 skipped: {d:#}");
    assert_eq!(adm["blast_radius"]["affected_agents"], 2);
    assert!(adm["notes"].as_array().is_some_and(|n| n.iter().any(|x| x.as_str().is_some_and(|s| s.contains("a0")))), "{d:#}");
    assert!(d["scenario"].is_null(), "a dry run creates nothing");
    assert_eq!(f.c(&["scenario", "list"], 0).trim(), "no scenarios");
    assert_eq!(v.state(), 'S', "nothing was paused");

    let audit = json(&f.c(&["-o", "json", "audit"], 0));
    let entries = audit["entries"].as_array().expect("entries");
    let refused = entries
        .iter()
        .filter(|e| e["action"] == "CreateScenario" && e["outcome"].as_str().is_some_and(|o| o.starts_with("refused:")))
        .count();
    assert_eq!(refused, 4, "{audit:#}");
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "CreateScenario" && e["outcome"].as_str().is_some_and(|o| o.starts_with("error: InvalidArgument")))
    );
    assert_eq!(entries.iter().filter(|e| e["action"] == "RegisterAgent").count(), 3);
    assert!(entries.iter().all(|e| e["actor"].as_str().is_some_and(|a| a.contains("127.0.0.1:"))), "peer address recorded: {audit:#}");
    // The actor is the certificate's identity, never a header: the CLI's
    // login is only a note beside it.
    for e in entries {
        let (name, role) = (e["actor_name"].as_str().unwrap_or(""), e["actor_role"].as_str().unwrap_or(""));
        if e["action"] == "RegisterAgent" {
            assert!(role == "agent" && name.starts_with('a'), "an agent registers as itself: {e:#}");
        } else {
            assert_eq!((name, role), (chaos_e2e::ADMIN, "admin"), "{e:#}");
            assert!(e["client_note"].as_str().is_some_and(|n| n.contains('@')), "the CLI's USER@HOST note: {e:#}");
        }
    }
    assert!(json(&f.c(&["-o", "json", "audit", "--since", "1s", "--limit", "1"], 0))["entries"].as_array().is_some_and(|e| e.len() <= 1));
    // The audit lives in SQLite, inspectable as a file.
    assert!(f.dir().join("coordinator-state/coordinator.db").exists());
}

#[test]
fn coordinator_killed_mid_scenario_resumes_it_and_orphans_are_reverted() {
    let mut f = fleet(OPEN, 1, 0);
    let v = Victim::spawn();
    let pid = v.pid().to_string();
    let a = create(&f, &["--pause-pid", &pid, "--duration", "6s", "--severity", "2"]);
    f.wait_state(&a, "running", Duration::from_secs(5));
    assert!(wait_until(Duration::from_secs(3), || v.state() == 'T'));
    // An orphan: a fault labelled with a scenario the coordinator does not run.
    let orphan = Victim::spawn();
    chaos_ok(
        &[
            "agent",
            "apply",
            "--agent",
            &f.agents[0].1,
            "--pause-pid",
            &orphan.pid().to_string(),
            "--duration",
            "1m",
            "--label",
            "chaos.scenario=sc-ghost",
        ],
        0,
    );
    assert_eq!(orphan.state(), 'T');

    f.coord.kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(v.state(), 'T', "the agent keeps the fault while its lease holds");
    let cfg = f.dir().join("coordinator.yaml");
    let (coord, _) = start_coordinator_with(f.dir(), f.port, Some(&cfg));
    f.coord = coord;
    let sc = f.scenario(&a);
    assert_eq!(sc["state"], "running", "{sc:#}");
    assert!(
        sc["transitions"]
            .as_array()
            .expect("transitions")
            .iter()
            .any(|t| t["reason"].as_str().is_some_and(|r| r.contains("resumed after coordinator restart"))),
        "{sc:#}"
    );
    let done = f.wait_state(&a, "completed", Duration::from_secs(15));
    assert_eq!(done["agents"][0]["fault_state"], "reverted", "{done:#}");
    assert!(wait_until(Duration::from_secs(3), || v.state() != 'T'), "reverted at its end, after the restart");
    // The agent re-registered with the new coordinator, which reverted the orphan.
    assert!(wait_until(Duration::from_secs(15), || orphan.state() != 'T'), "orphan reverted");
    // The coordinator writes the audit row once the agent has answered, just
    // after the process was continued: poll for it.
    let mut audit = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(5), || {
            audit = json(&f.c(&["-o", "json", "audit"], 0));
            audit["entries"].as_array().expect("entries").iter().any(|e| e["action"] == "RevertOrphan" && e["outcome"] == "ok")
        }),
        "{audit:#}"
    );
}

#[test]
fn three_scenarios_run_at_once_and_a_fourth_queues_with_the_default_limit() {
    // Default max_concurrent_scenarios (3); one agent is the whole fleet here.
    let f = fleet("chaos_testing: {blast_radius_limit: 1.0}\n", 1, 0);
    let victims: Vec<Victim> = (0..4).map(|_| Victim::spawn()).collect();
    let ids: Vec<String> =
        victims.iter().map(|v| create(&f, &["--pause-pid", &v.pid().to_string(), "--duration", "3s", "--severity", "2"])).collect();
    let q = json(&f.c(&["-o", "json", "queue"], 0));
    assert_eq!(q["max_concurrent_scenarios"], 3, "{q:#}");
    assert_eq!(q["running"].as_array().map(Vec::len), Some(3), "{q:#}");
    assert_eq!(q["queued"][0]["id"], ids[3].as_str(), "{q:#}");
    assert_eq!(q["queued"][0]["queue_position"], 1, "{q:#}");
    assert!(wait_until(Duration::from_secs(3), || victims[..3].iter().all(|v| v.state() == 'T')), "three paused at once");
    assert_eq!(victims[3].state(), 'S', "the fourth waits");
    f.wait_state(&ids[3], "running", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(3), || victims[3].state() == 'T'), "the fourth runs once a slot frees");
    f.wait_state(&ids[3], "completed", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(3), || victims.iter().all(|v| v.state() != 'T')), "everything reverted");
    let st = json(&f.c(&["-o", "json", "status"], 0));
    assert_eq!((st["scenarios_running"].as_u64(), st["scenarios_queued"].as_u64()), (Some(0), Some(0)), "{st:#}");
}
