//! Container faults against a real Docker daemon (a private `dockerd` per
//! test, see `chaos_e2e::Dockerd`): every verb and its revert, selection by
//! label, a resource fault landing in a container's cgroup, the capability
//! report, revert by journal replay after `kill -9` of the agent, a clear
//! refusal when no daemon answers, and a stop that waits out a 20 s grace
//! holding up neither RevertAll nor an emergency stop.

use std::time::{Duration, Instant};

use chaos_e2e::{Background, Dockerd, Victim, chaos, chaos_ok, free_port, json, start_agent_at, start_coordinator, wait_until};

fn agent_for(dir: &std::path::Path, id: &str, d: &Dockerd) -> (chaos_e2e::Daemon, String, u16, std::path::PathBuf) {
    let port = free_port();
    let journal = dir.join(format!("journal-{id}"));
    let sock = d.socket.display().to_string();
    let (a, url) = start_agent_at(dir, id, port, &journal, None, "10s", &["--docker-socket", &sock]);
    (a, url, port, journal)
}

/// The agent's `container_action` capability entry.
fn container_capability(url: &str) -> serde_json::Value {
    let caps = json(&chaos_ok(&["-o", "json", "agent", "capabilities", "--agent", url], 0));
    caps["families"].as_array().into_iter().flatten().find(|f| f["family"] == "container_action").cloned().unwrap_or_default()
}

/// A busybox container running `sleep 600`.
fn run_sleeper(d: &Dockerd, name: &str) {
    let image = d.busybox_image();
    d.docker_ok(&["run", "-d", "--name", name, "--network", "none", &image, "sleep", "600"]);
}

#[test]
fn every_verb_acts_on_a_real_container_and_reverts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Dockerd::start();
    let image = d.busybox_image();
    let name = format!("chaos-e2e-c{}", std::process::id());
    d.docker_ok(&["run", "-d", "--name", &name, "--network", "none", &image, "sleep", "600"]);
    let (_agent, url, ..) = agent_for(dir.path(), "ctr", &d);

    let fam = container_capability(&url);
    assert_eq!(fam["supported"], true, "{fam}");

    let apply = |action: &str, id: &str| {
        chaos_ok(&["agent", "apply", "--agent", &url, "--container", &name, "--action", action, "--duration", "60s", "--id", id], 0)
    };
    let revert = |id: &str| chaos_ok(&["agent", "revert", "--agent", &url, id], 0);

    let out = apply("pause", "p");
    assert!(out.contains("state verified"), "{out}");
    assert_eq!(d.state(&name), (true, true), "paused");
    assert!(revert("p").contains("unpause"));
    assert_eq!(d.state(&name), (true, false));

    apply("stop", "s");
    assert!(!d.state(&name).0, "stopped");
    // Start applies only to a stopped container: it is refused while running.
    revert("s");
    assert_eq!(d.state(&name), (true, false), "started again at revert");
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--container", &name, "--action", "start", "--duration", "60s"], 3);
    assert!(e.contains("already running"), "{e}");

    apply("kill", "k");
    assert!(!d.state(&name).0, "killed");
    revert("k");
    assert!(d.state(&name).0, "started again after the kill");

    let before = d.docker_ok(&["inspect", "-f", "{{.State.StartedAt}}", &name]);
    apply("restart", "r");
    assert_ne!(d.docker_ok(&["inspect", "-f", "{{.State.StartedAt}}", &name]), before, "restarted");
    assert!(revert("r").contains("nothing to undo"));

    // By label: both labelled containers, not the other one.
    let (l1, l2) = (format!("{name}-l1"), format!("{name}-l2"));
    for n in [&l1, &l2] {
        d.docker_ok(&["run", "-d", "--name", n, "--label", "role=chaos-e2e", "--network", "none", &image, "sleep", "600"]);
    }
    chaos_ok(
        &["agent", "apply", "--agent", &url, "--container", "label:role=chaos-e2e", "--action", "stop", "--duration", "60s", "--id", "lab"],
        0,
    );
    assert_eq!((d.state(&l1).0, d.state(&l2).0, d.state(&name).0), (false, false, true));
    revert("lab");
    assert_eq!((d.state(&l1).0, d.state(&l2).0), (true, true));

    // A resource fault with a container target lands in the container's cgroup.
    let pid = d.docker_ok(&["inspect", "-f", "{{.State.Pid}}", &name]);
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let cpu_path = cg
        .lines()
        .find_map(|l| l.split_once(":cpu:").map(|(_, p)| p.to_string()).or_else(|| l.strip_prefix("0::").map(str::to_string)))
        .expect("cpu cgroup");
    let root = std::path::Path::new("/sys/fs/cgroup");
    let quota = if root.join("cgroup.controllers").exists() {
        root.join(cpu_path.trim_start_matches('/')).join("cpu.max")
    } else {
        root.join("cpu").join(cpu_path.trim_start_matches('/')).join("cpu.cfs_quota_us")
    };
    let before = std::fs::read_to_string(&quota).expect("quota");
    chaos_ok(&["agent", "apply", "--agent", &url, "--container", &name, "--cpu-quota", "20%", "--duration", "60s", "--id", "q"], 0);
    assert!(std::fs::read_to_string(&quota).expect("quota").starts_with("20000"), "container quota");
    revert("q");
    assert_eq!(std::fs::read_to_string(&quota).expect("quota"), before, "quota restored");
}

#[test]
fn a_paused_container_is_unpaused_by_journal_replay_after_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Dockerd::start();
    let name = format!("chaos-e2e-k{}", std::process::id());
    run_sleeper(&d, &name);
    let (mut agent, url, port, journal) = agent_for(dir.path(), "ck9", &d);
    chaos_ok(&["agent", "apply", "--agent", &url, "--container", &name, "--action", "pause", "--duration", "300s", "--id", "kp"], 0);
    assert_eq!(d.state(&name), (true, true));
    agent.kill9();
    assert_eq!(d.state(&name), (true, true), "still paused while no agent runs");
    let sock = d.socket.display().to_string();
    let (_agent, _url) = start_agent_at(dir.path(), "ck9", port, &journal, None, "10s", &["--docker-socket", &sock]);
    assert!(wait_until(Duration::from_secs(10), || d.state(&name) == (true, false)), "not unpaused by replay");
}

#[test]
fn without_a_daemon_container_faults_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let sock = dir.path().join("no-docker.sock").display().to_string();
    let (_agent, url) = start_agent_at(dir.path(), "nod", port, &dir.path().join("j"), None, "10s", &["--docker-socket", &sock]);
    let fam = container_capability(&url);
    assert_eq!(fam["supported"], false, "{fam}");
    assert!(fam["detail"].as_str().is_some_and(|t| t.contains("no-docker.sock")), "{fam}");
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--container", "kafka", "--action", "pause", "--duration", "10s"], 3);
    assert!(e.contains("Docker daemon") && e.contains("no-docker.sock"), "{e}");
}

/// Apply a pause of `pid` with id `id` through `agent`, retrying while a
/// registered agent still refuses (it accepts once its coordinator answered).
fn pause_as(agent: &str, pid: u32, id: &str) -> bool {
    let pid = pid.to_string();
    wait_until(Duration::from_secs(10), || {
        chaos(&["agent", "apply", "--agent", agent, "--pause-pid", &pid, "--duration", "5m", "--id", id]).status.success()
    })
}

/// The ids of the faults in a JSON list of them.
fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|f| f["id"].as_str().map(str::to_string)).collect()
}

/// How much later than its own deadline an answer may come: the CLI's
/// start, its TLS handshake, the call. Far below the 20 s the stop takes.
const MARGIN: Duration = Duration::from_millis(1500);

#[test]
fn a_container_stop_waiting_out_its_grace_holds_up_neither_revert_all_nor_emergency_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Dockerd::start();
    let image = d.busybox_image();
    let name = format!("chaos-e2e-slow{}", std::process::id());
    // Its process outlives SIGTERM (it runs 120 s at most): only SIGKILL stops it, after the grace.
    d.run_term_ignorer(&image, &name, 120, &[]);
    let (_coord, curl) = start_coordinator(dir.path());
    let sock = d.socket.display().to_string();
    let journal = dir.path().join("journal-slow");
    let (_agent, url) = start_agent_at(dir.path(), "slow", free_port(), &journal, Some(&curl), "10s", &["--docker-socket", &sock]);
    let victim = Victim::spawn();
    // The other fault, on another target of the same agent.
    assert!(pause_as(&url, victim.pid(), "other-1"), "agent never accepted a fault");
    assert_eq!(victim.state(), 'T');

    let started = Instant::now();
    let apply = Background::chaos(&[
        "-o",
        "json",
        "agent",
        "apply",
        "--agent",
        &url,
        "--container",
        &name,
        "--action",
        "stop",
        "--stop-grace",
        "20s",
        "--duration",
        "5m",
        "--id",
        "slow-stop",
    ]);
    assert!(wait_until(Duration::from_secs(10), || d.got_term(&name)), "the stop never sent SIGTERM");
    assert!(d.state(&name).0, "running out its grace");

    // (a) RevertAll with a 2 s wait answers on time: the pause reverted, the stop listed in progress.
    let t0 = Instant::now();
    let out = chaos_ok(&["-o", "json", "agent", "revert-all", "--agent", &url, "--wait", "2s", "--reason", "e2e slow stop"], 1);
    let took = t0.elapsed();
    let r = json(&out);
    assert!(took <= Duration::from_secs(2) + MARGIN, "RevertAll answered after {took:?}, not within its 2 s wait: {r}");
    assert_eq!(ids(&r["reverted"]), vec!["other-1".to_string()], "{r}");
    assert_eq!(ids(&r["in_progress"]), vec!["slow-stop".to_string()], "{r}");
    assert_ne!(victim.state(), 'T', "the paused process runs again");
    assert!(!apply_done_early(&d, &name), "the answer came before the stop finished");

    // (b) An emergency stop through the coordinator answers within its deadline, the same way.
    assert!(pause_as(&url, victim.pid(), "other-2"), "agent refused the second pause");
    assert_eq!(victim.state(), 'T');
    let t0 = Instant::now();
    let out = chaos_ok(&["--coordinator", &curl, "-o", "json", "emergency-stop", "--deadline", "2s", "--reason", "e2e slow stop"], 7);
    let took = t0.elapsed();
    let r = json(&out);
    assert!(took <= Duration::from_secs(2) + MARGIN, "EmergencyStop answered after {took:?}, not within its 2 s deadline: {r}");
    assert_eq!((r["agents_reached"].as_u64(), r["complete"].as_bool()), (Some(1), Some(false)), "{r}");
    assert!(r["faults_in_progress"].as_u64().is_some_and(|n| n >= 1), "{r}");
    assert_eq!(r["results"][0]["in_progress_count"], 1, "{r}");
    assert_eq!(r["faults_failed"], 0, "{r}");
    assert_ne!(victim.state(), 'T', "the paused process runs again");
    let other = finished(&url, "other-2");
    assert_eq!(other["state"], "REVERTED", "{other}");
    // Counted by the stop, unless the agent's heartbeat heard "disarmed" first and reverted it itself.
    assert!(r["faults_reverted"] == 1 || other["revert_reason"] != "EMERGENCY_STOP", "{r} {other}");
    assert!(!apply_done_early(&d, &name), "the answer came before the stop finished");
    let answered = started.elapsed();

    // (c) Once Docker has waited out the 20 s grace (SIGKILL), the apply returns and the revert starts the container again.
    let out = apply.finish(Duration::from_secs(40), 0);
    let stop_took = started.elapsed();
    assert!(answered < Duration::from_secs(15), "both answers came while the stop ran ({answered:?} after it began)");
    assert!(stop_took >= Duration::from_secs(19), "Docker waited the 20 s grace, not the default 5 s: {stop_took:?}\n{out}");
    assert!(json(&out)["summary"].as_str().is_some_and(|s| s.contains("stop (grace 20 s)")), "{out}");
    assert!(wait_until(Duration::from_secs(15), || d.state(&name) == (true, false)), "not started again at revert");
    assert!(wait_until(Duration::from_secs(10), || finished(&url, "slow-stop")["state"] == "REVERTED"), "{}", finished(&url, "slow-stop"));
    // Both reverts were read back: the container running again, the process no longer stopped.
    for id in ["slow-stop", "other-2"] {
        let f = finished(&url, id);
        assert_eq!(f["revert_check"], "verified", "{f}");
    }
    let active = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", &url], 0));
    assert!(ids(&active["faults"]).is_empty(), "nothing left active: {active}");
}

/// Whether the stop already ended (the container exited): the answer that
/// should have come while it ran would then prove nothing.
fn apply_done_early(d: &Dockerd, name: &str) -> bool {
    !d.state(name).0
}

/// Fault `id` as ListFaults(include_finished) shows it (Null if absent).
fn finished(agent: &str, id: &str) -> serde_json::Value {
    let all = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", agent, "--all"], 0));
    all["faults"].as_array().into_iter().flatten().rev().find(|f| f["id"] == id).cloned().unwrap_or_default()
}
