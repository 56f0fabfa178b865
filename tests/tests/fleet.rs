//! A coordinator with three agents on loopback: registration, emergency
//! stop (all reverted, fleet disarmed, faults refused), arm; and an agent
//! that cannot answer the emergency stop reverts as soon as it hears the
//! fleet is disarmed.

use std::time::Duration;

use chaos_e2e::{Victim, chaos, chaos_ok, json, pause_when_ready, start_agent, start_coordinator, wait_until};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

#[test]
fn three_agents_register_emergency_stop_disarm_and_arm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (coord, curl) = start_coordinator(dir.path());
    let agents: Vec<_> = ["a1", "a2", "a3"].iter().map(|id| start_agent(dir.path(), id, Some(&curl), "10s")).collect();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let out = chaos(&["--coordinator", &curl, "-o", "json", "agents"]);
            let v = json(&String::from_utf8_lossy(&out.stdout));
            v["agents"].as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|x| x["health"] == "healthy" && x["heartbeat"] == "stream"))
        }),
        "three healthy agents, heartbeating on their streams"
    );
    // The coordinator shares this host (same boot id): its pid is protected.
    let e = chaos_ok(&["agent", "apply", "--agent", &agents[0].1, "--pause-pid", &coord.pid().to_string(), "--duration", "5s"], 3);
    assert!(e.contains("is the coordinator"), "protected by pid, learned at registration: {e}");
    let victims: Vec<Victim> = (0..3).map(|_| Victim::spawn()).collect();
    for ((_, url), v) in agents.iter().zip(&victims) {
        assert!(pause_when_ready(url, v.pid(), Duration::from_secs(10)), "agent never accepted a fault");
    }
    assert!(victims.iter().all(|v| v.state() == 'T'));

    let out = chaos_ok(&["--coordinator", &curl, "-o", "json", "emergency-stop", "--reason", "e2e drill"], 0);
    let r = json(&out);
    assert_eq!(r["agents_reached"], 3, "{r}");
    assert_eq!(r["faults_reverted"], 3, "{r}");
    assert_eq!(r["armed"], false);
    assert!(victims.iter().all(|v| v.state() != 'T'), "every process resumed");

    let e = chaos_ok(&["agent", "apply", "--agent", &agents[0].1, "--pause-pid", &victims[0].pid().to_string(), "--duration", "1m"], 3);
    assert!(e.contains("disarmed") && e.contains("e2e drill"), "{e}");
    let st = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "status"], 0));
    assert_eq!(st["armed"], false);
    assert_eq!(st["disarmed_reason"], "e2e drill");
    assert_eq!(st["active_faults"], 0, "{st}");

    let armed = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "arm"], 0));
    assert_eq!(armed["armed"], true);
    assert_eq!(armed["agents_not_reached"].as_array().map(Vec::len), Some(0));
    chaos_ok(&["agent", "apply", "--agent", &agents[0].1, "--pause-pid", &victims[0].pid().to_string(), "--duration", "1m"], 0);
    assert_eq!(victims[0].state(), 'T');
}

#[test]
fn unreachable_agent_is_reported_and_reverts_when_it_hears_of_the_disarm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_c, curl) = start_coordinator(dir.path());
    let (ok_agent, ok_url) = start_agent(dir.path(), "ok", Some(&curl), "10s");
    let (hung_agent, hung_url) = start_agent(dir.path(), "hung", Some(&curl), "10s");
    let (v1, v2) = (Victim::spawn(), Victim::spawn());
    assert!(pause_when_ready(&ok_url, v1.pid(), Duration::from_secs(10)), "agent never accepted a fault");
    assert!(pause_when_ready(&hung_url, v2.pid(), Duration::from_secs(10)), "agent never accepted a fault");
    // Freeze the second agent itself: it cannot answer the emergency stop.
    kill(Pid::from_raw(hung_agent.pid() as i32), Signal::SIGSTOP).expect("stop agent");
    let out = chaos_ok(&["--coordinator", &curl, "-o", "json", "emergency-stop", "--deadline", "500ms"], 7);
    let r = json(&out);
    assert_eq!(r["agents_reached"], 1, "{r}");
    assert_eq!(r["agents_unreached"], 1, "{r}");
    let hung = r["results"].as_array().and_then(|a| a.iter().find(|x| x["agent_id"] == "hung").cloned()).expect("hung result");
    assert_eq!(hung["reached"], false);
    assert!(hung["lease_revert_by"].is_string(), "says when its lease reverts: {hung}");
    assert_ne!(v1.state(), 'T');
    assert_eq!(v2.state(), 'T');
    // It wakes up; its next heartbeat learns the fleet is disarmed and it reverts.
    kill(Pid::from_raw(hung_agent.pid() as i32), Signal::SIGCONT).expect("cont agent");
    assert!(wait_until(Duration::from_secs(8), || v2.state() != 'T'), "woken agent did not revert");
    drop(ok_agent);
}

#[test]
fn disarm_survives_a_coordinator_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut coord, curl) = start_coordinator(dir.path());
    let port: u16 = curl.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let (_agent, url) = start_agent(dir.path(), "persist", Some(&curl), "10s");
    let v = Victim::spawn();
    assert!(pause_when_ready(&url, v.pid(), Duration::from_secs(10)), "agent never accepted a fault");
    chaos_ok(&["--coordinator", &curl, "emergency-stop", "--reason", "before restart"], 0);
    coord.kill9();
    let (_coord2, curl2) = chaos_e2e::start_coordinator_at(dir.path(), port);
    let st = json(&chaos_ok(&["--coordinator", &curl2, "-o", "json", "status"], 0));
    assert_eq!(st["armed"], false, "a restarted coordinator must stay disarmed: {st}");
    assert_eq!(st["disarmed_reason"], "before restart");
    // The agent re-registers with the new coordinator and stays disarmed.
    assert!(wait_until(Duration::from_secs(10), || {
        json(&String::from_utf8_lossy(&chaos(&["--coordinator", &curl2, "-o", "json", "agents"]).stdout))["agents"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    }));
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", &v.pid().to_string(), "--duration", "1m"], 3);
    assert!(e.contains("disarmed"), "{e}");
    chaos_ok(&["--coordinator", &curl2, "arm"], 0);
    chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", &v.pid().to_string(), "--duration", "1m"], 0);
}
