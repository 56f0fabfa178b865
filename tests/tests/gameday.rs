//! GameDay end to end: a real coordinator and four real agents on loopback,
//! random pauses of a victim process every second under a 50 % blast radius.
//! The GameDay stays inside the limit (the coordinator refuses the picks
//! that would exceed it), keeps a bounded history, ends on its own at its
//! time box with every action reverted; a second one is refused while one
//! runs; `stop` ends one early; an SLO that fires aborts one (exit 9); a
//! coordinator that stops while one runs shows it ABORTED after its restart
//! and stops the action it recovered.

use std::{path::Path, time::Duration};

use chaos_e2e::{Daemon, Victim, chaos_ok, free_port, json, start_agent_at, start_coordinator_with, wait_until};

fn victim(dir: &Path) -> (Victim, String) {
    let name = format!("gdv{}", std::process::id() % 100_000);
    let exe = dir.join(&name);
    std::fs::copy("/bin/sleep", &exe).expect("copy sleep");
    (Victim::spawn_program(&exe, &name), name)
}

#[test]
fn a_gameday_stays_inside_its_limits_and_ends_on_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("coordinator.yaml");
    std::fs::write(
        &cfg,
        "chaos_testing: {blast_radius_limit: 0.5, group_blast_radius_limit: 1.0}\nmonitoring:\n  metrics_interval: 500ms\n",
    )
    .expect("config");
    let port = free_port();
    let (mut coord, curl) = start_coordinator_with(dir.path(), port, Some(&cfg));
    let (v, name) = victim(dir.path());
    let _agents: Vec<(Daemon, String)> = (0..4)
        .map(|i| {
            let id = format!("g{i}");
            let journal = dir.path().join(format!("journal-{id}"));
            start_agent_at(
                dir.path(),
                &id,
                free_port(),
                &journal,
                Some(&curl),
                "10s",
                &["--label", "role=app", "--watch-process", &name, "--metrics-interval", "500ms"],
            )
        })
        .collect();
    let c = |args: &[&str], code: i32| {
        let mut a = vec!["--coordinator", curl.as_str()];
        a.extend_from_slice(args);
        chaos_ok(&a, code)
    };
    assert!(
        wait_until(Duration::from_secs(20), || json(&c(&["-o", "json", "agents"], 0))["agents"]
            .as_array()
            .is_some_and(|a| a.len() == 4 && a.iter().all(|x| x["health"] == "healthy"))),
        "four healthy agents"
    );
    let none = c(&["gameday", "status"], 4);
    assert!(none.contains("none has run"), "{none}");
    let action = format!("pause=--pause-name {name}");

    // Every second a pause of 3 s: the third agent at once would be 75 % > 50 %.
    let started = c(
        &[
            "-o",
            "json",
            "gameday",
            "start",
            "--every",
            "1s",
            "--for",
            "12s",
            "--targets",
            "role=app",
            "--action",
            &action,
            "--action-duration",
            "3s",
            "--severity",
            "2",
            "--history",
            "6",
            "--seed",
            "42",
        ],
        0,
    );
    let g = json(&started);
    assert_eq!(g["state"], "running", "{g}");
    assert_eq!(g["seed"], 42);
    // One at a time.
    let second = c(&["gameday", "start", "--every", "1s", "--for", "5s", "--action", &action], 3);
    assert!(second.contains("is running: stop it first"), "{second}");

    let mut paused_seen = false;
    let ended = wait_until(Duration::from_secs(30), || {
        paused_seen |= v.state() == 'T';
        json(&c(&["-o", "json", "gameday", "status"], 0))["state"] != "running"
    });
    assert!(ended, "the GameDay ends on its own");
    let g = json(&c(&["-o", "json", "gameday", "history"], 0));
    let status = json(&c(&["-o", "json", "gameday", "status"], 0));
    assert_eq!(status["state"], "completed", "{status}");
    assert!(status["reason"].as_str().is_some_and(|r| r.contains("time box")), "{status}");
    let (ticks, injected, refused) =
        (status["ticks"].as_u64().unwrap_or(0), status["injected"].as_u64().unwrap_or(0), status["refused"].as_u64().unwrap_or(0));
    assert!((8..=14).contains(&ticks), "about one pick a second for 12 s: {status}");
    assert!(injected >= 3, "{status}");
    assert!(refused + status["skipped"].as_u64().unwrap_or(0) >= 1, "some picks were over the limit: {status}");
    assert!(paused_seen, "the victim was paused by a pick");
    // The blast radius it reached, as the coordinator measured it.
    let (max, fleet) = (status["max_agents_affected"].as_u64().unwrap_or(99), status["fleet_agents"].as_u64().unwrap_or(0));
    assert!(max >= 1 && fleet == 4 && max * 2 <= fleet, "at most 50 % of the fleet: {max} of {fleet}");
    // The history is bounded to the newest 6, and every refusal names the rule.
    let h = g["history"].as_array().expect("history");
    assert_eq!(h.len(), 6, "{g}");
    assert_eq!(h.last().and_then(|t| t["n"].as_u64()), Some(ticks), "the newest entries are kept");
    for t in h {
        let r = t["result"].as_str().unwrap_or_default();
        assert!(r == "injected" || r.contains("blast radius") || r.starts_with("skipped: no eligible target"), "{t}");
        if r == "injected" {
            assert!(["COMPLETED", "STOPPED"].contains(&t["outcome"].as_str().unwrap_or_default()), "{t}");
        }
    }
    // Nothing is left paused, nothing runs.
    assert!(wait_until(Duration::from_secs(5), || v.state() != 'T'), "the victim runs again");
    let running = json(&c(&["-o", "json", "scenario", "list", "--state", "running"], 0));
    assert_eq!(running["scenarios"].as_array().map(Vec::len), Some(0), "{running}");
    let audit = c(&["audit"], 0);
    assert!(audit.contains("StartGameDay") && audit.contains("EndGameDay"), "{audit}");

    // `stop` ends a long one early and reverts its running action.
    c(&["gameday", "start", "--every", "2s", "--for", "10m", "--action", &action, "--action-duration", "1m"], 0);
    assert!(wait_until(Duration::from_secs(10), || v.state() == 'T'), "the first pick pauses the victim");
    let stopped = json(&c(&["-o", "json", "gameday", "stop", "--reason", "test over"], 0));
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(stopped["reason"].as_str().is_some_and(|r| r.contains("test over")), "{stopped}");
    assert!(wait_until(Duration::from_secs(5), || v.state() != 'T'), "its running action was reverted");

    // An SLO that fires at once aborts it (exit 9 with --follow) and reverts.
    let slo = format!("process.count{{name={name}}} < 5");
    let out = c(
        &[
            "gameday",
            "start",
            "--every",
            "1s",
            "--for",
            "1m",
            "--action",
            &action,
            "--action-duration",
            "30s",
            "--stop-if",
            &slo,
            "--follow",
        ],
        9,
    );
    assert!(out.contains("ABORTED") && out.contains("SLO breached"), "{out}");
    assert!(wait_until(Duration::from_secs(5), || v.state() != 'T'), "reverted after the SLO fired");
    // The coordinator stops while a GameDay holds a 1-minute pause.
    c(&["gameday", "start", "--every", "2s", "--for", "10m", "--action", &action, "--action-duration", "1m"], 0);
    assert!(wait_until(Duration::from_secs(10), || v.state() == 'T'), "the first pick pauses the victim");
    coord.terminate(Duration::from_secs(10));
    let (_coord, _) = start_coordinator_with(dir.path(), port, Some(&cfg));
    assert!(wait_until(Duration::from_secs(30), || v.state() != 'T'), "the recovered action ends with its GameDay");
    let after = json(&c(&["-o", "json", "gameday", "status"], 0));
    assert_eq!(after["state"], "aborted", "{after}");
    assert!(after["reason"].as_str().is_some_and(|r| r.contains("coordinator stopped")), "{after}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let h = json(&c(&["-o", "json", "gameday", "history"], 0));
            h["history"].as_array().is_some_and(|h| h.iter().all(|t| t["scenario_id"] == "" || t["outcome"] != ""))
        }),
        "every action has its outcome after the restart"
    );
    // A malformed spec names the field.
    let bad = c(&["gameday", "start", "--every", "500ms", "--for", "1m", "--action", &action], 2);
    assert!(bad.contains("spec.every"), "{bad}");
}
