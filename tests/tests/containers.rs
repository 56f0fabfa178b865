//! Container faults against a real Docker daemon (a private `dockerd` per
//! test, see `chaos_e2e::Dockerd`): every verb and its revert, selection by
//! label, a resource fault landing in a container's cgroup, the capability
//! report, revert by journal replay after `kill -9` of the agent, and a
//! clear refusal when no daemon answers.

use std::time::Duration;

use chaos_e2e::{Dockerd, chaos_ok, free_port, json, start_agent_at, wait_until};

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
