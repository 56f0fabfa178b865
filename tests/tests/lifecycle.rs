//! The fault lifecycle end to end, through the real binaries and the CLI:
//! TTL revert, crash (kill -9) + restart replay, SIGTERM drain, and the
//! dead-man lease when the coordinator dies.

use std::time::{Duration, Instant};

use chaos_e2e::{Victim, chaos_ok, json, pause_when_ready, start_agent, start_agent_at, start_coordinator, wait_until};

#[test]
fn pause_reverts_at_its_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "ttl", None, "10s");
    let v = Victim::spawn();
    let pid = v.pid().to_string();
    let out = chaos_ok(&["-o", "json", "agent", "apply", "--agent", &url, "--pause-pid", &pid, "--duration", "2s", "--id", "ttl-1"], 0);
    assert_eq!(json(&out)["state"], "APPLIED", "{out}");
    assert_eq!(v.state(), 'T', "paused after apply");
    let listed = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", &url], 0));
    assert_eq!(listed["faults"][0]["id"], "ttl-1");
    assert!(wait_until(Duration::from_secs(6), || v.state() != 'T'), "not resumed after its TTL");
    let all = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", &url, "--all"], 0));
    assert_eq!(all["faults"][0]["state"], "REVERTED");
    assert_eq!(all["faults"][0]["revert_reason"], "TTL");
}

#[test]
fn pause_by_exact_name_stops_every_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "byname", None, "10s");
    // A uniquely named copy of `sleep`, so no other process on the machine matches.
    let name = format!("cv{}", std::process::id() % 1_000_000);
    let exe = dir.path().join(&name);
    std::fs::copy("/bin/sleep", &exe).expect("copy sleep");
    let spawn = || chaos_e2e::Victim::spawn_program(&exe, &name);
    let (a, b) = (spawn(), spawn());
    let out =
        json(&chaos_ok(&["-o", "json", "agent", "apply", "--agent", &url, "--pause-name", &name, "--duration", "60s", "--id", "n1"], 0));
    assert_eq!(out["processes"].as_array().map(Vec::len), Some(2), "{out}");
    assert_eq!((a.state(), b.state()), ('T', 'T'));
    chaos_ok(&["agent", "revert", "--agent", &url, "n1"], 0);
    assert_ne!(a.state(), 'T');
    assert_ne!(b.state(), 'T');
}

#[test]
fn explicit_revert_twice_is_harmless() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "twice", None, "10s");
    let v = Victim::spawn();
    let out = chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", &v.pid().to_string(), "--duration", "60s", "--id", "r2"], 0);
    assert!(out.contains("SIGSTOP"), "{out}");
    assert_eq!(v.state(), 'T');
    let first = chaos_ok(&["agent", "revert", "--agent", &url, "r2"], 0);
    assert!(first.contains("SIGCONT"), "{first}");
    assert_ne!(v.state(), 'T');
    let second = chaos_ok(&["agent", "revert", "--agent", &url, "r2"], 0);
    assert!(second.contains("already reverted"), "{second}");
    let missing = chaos_ok(&["agent", "revert", "--agent", &url, "no-such-fault"], 4);
    assert!(missing.contains("no-such-fault"), "{missing}");
}

#[test]
fn bad_input_is_refused_with_the_field_and_a_documented_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, url) = start_agent(dir.path(), "bad", None, "10s");
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", "4242", "--duration", "0s"], 2);
    assert!(e.contains("spec.duration"), "{e}");
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", "1", "--duration", "5s"], 3);
    assert!(e.contains("protected") && e.contains("init"), "{e}");
    let me = agent.pid().to_string();
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", &me, "--duration", "5s"], 3);
    assert!(e.contains("this agent"), "{e}");
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--kill-name", "no-such-process-xyz", "--duration", "5s"], 4);
    assert!(e.contains("no-such-process-xyz"), "{e}");
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--kill-pid", "4242", "--signal", "BOGUS", "--duration", "5s"], 2);
    assert!(e.contains("spec.process_kill.signal") && e.contains("BOGUS"), "{e}");
    let e = chaos_ok(&["agent", "faults", "--agent", "127.0.0.1:1"], 5);
    assert!(e.contains("cannot reach"), "{e}");
}

#[test]
fn kill9_mid_fault_then_restart_resumes_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("journal-crash");
    let port = chaos_e2e::free_port();
    let (mut agent, url) = start_agent_at(dir.path(), "crash", port, &journal, None, "10s", &[]);
    let v = Victim::spawn();
    chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", &v.pid().to_string(), "--duration", "5m", "--id", "crash-1"], 0);
    assert_eq!(v.state(), 'T');
    assert!(journal.join("crash-1.json").exists(), "journal record written");
    agent.kill9();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(v.state(), 'T', "a crashed agent cannot revert; the process stays stopped until restart");
    let t0 = Instant::now();
    let (_agent2, url2) = start_agent_at(dir.path(), "crash", port, &journal, None, "10s", &[]);
    assert!(wait_until(Duration::from_secs(5), || v.state() != 'T'), "restart did not resume the process");
    let took = t0.elapsed();
    assert!(!journal.join("crash-1.json").exists(), "journal record removed after replay");
    let all = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", &url2, "--all"], 0));
    assert_eq!(all["faults"][0]["revert_reason"], "JOURNAL_REPLAY", "{all}");
    eprintln!("host clean {took:?} after restart began (includes process start and readiness polling)");
}

#[test]
fn sigterm_reverts_every_fault_before_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("journal-term");
    let (mut agent, url) = start_agent_at(dir.path(), "term", chaos_e2e::free_port(), &journal, None, "10s", &[]);
    let (a, b) = (Victim::spawn(), Victim::spawn());
    for v in [&a, &b] {
        chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", &v.pid().to_string(), "--duration", "5m"], 0);
    }
    assert_eq!((a.state(), b.state()), ('T', 'T'));
    let status = agent.terminate(Duration::from_secs(10)).expect("agent exits on SIGTERM");
    assert!(status.success(), "exit status {status:?}:\n{}", agent.log_text());
    assert_ne!(a.state(), 'T');
    assert_ne!(b.state(), 'T');
    let left: Vec<_> =
        std::fs::read_dir(&journal).expect("journal").flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".json")).collect();
    assert!(left.is_empty(), "journal empty after a clean stop");
}

/// A live coordinator follows every agent's metric stream, which never ends
/// by itself: SIGTERM must still revert and exit (the stream is cut after
/// the server's drain), not wait for the coordinator.
#[test]
fn sigterm_reverts_and_exits_while_the_coordinator_follows_the_agents_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_coord, curl) = chaos_e2e::start_coordinator(dir.path());
    let journal = dir.path().join("journal-followed");
    let (mut agent, url) = start_agent_at(dir.path(), "followed", chaos_e2e::free_port(), &journal, Some(&curl), "10s", &[]);
    let v = Victim::spawn();
    assert!(chaos_e2e::pause_when_ready(&url, v.pid(), Duration::from_secs(10)), "{}", agent.log_text());
    // The coordinator is following: it has this agent's samples.
    assert!(
        chaos_e2e::wait_until(Duration::from_secs(10), || {
            let out = chaos_e2e::chaos(&["--coordinator", &curl, "-o", "json", "metrics", "followed", "--metric", "host.memory"]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("host.memory")
        }),
        "the coordinator never streamed the agent's metrics"
    );
    let status = agent.terminate(Duration::from_secs(15)).expect("agent exits on SIGTERM with its coordinator up");
    assert!(status.success(), "exit status {status:?}:\n{}", agent.log_text());
    assert_ne!(v.state(), 'T', "reverted before exit");
}

#[test]
fn lease_lost_when_the_coordinator_dies_reverts_and_refuses_until_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut coord, curl) = start_coordinator(dir.path());
    let port: u16 = curl.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let (_agent, url) = start_agent(dir.path(), "lease", Some(&curl), "1500ms");
    let v = Victim::spawn();
    let pid = v.pid().to_string();
    // The agent accepts faults once its first registration succeeded.
    assert!(pause_when_ready(&url, v.pid(), Duration::from_secs(5)));
    assert_eq!(v.state(), 'T');
    coord.kill9();
    assert!(wait_until(Duration::from_secs(5), || v.state() != 'T'), "lease did not revert the fault");
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--pause-pid", &pid, "--duration", "5m"], 3);
    assert!(e.contains("lease"), "{e}");
    let caps = json(&chaos_ok(&["-o", "json", "agent", "capabilities", "--agent", &url], 0));
    assert_eq!(caps["lease_lost"], true);
    let all = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", &url, "--all"], 0));
    assert_eq!(all["faults"][0]["revert_reason"], "LEASE_LOST");
    // The coordinator comes back (a restart: it forgot the agent, which registers again).
    let _coord2 = chaos_e2e::start_coordinator_at(dir.path(), port);
    assert!(pause_when_ready(&url, v.pid(), Duration::from_secs(10)), "faults still refused after the coordinator came back");
    assert_eq!(v.state(), 'T');
}
