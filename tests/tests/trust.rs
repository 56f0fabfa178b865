//! Trust, end to end with real processes and real certificates: every RPC
//! refused without a certificate, with another CA's or an expired one;
//! roles enforced and named; one live owner per agent id; the break-glass
//! socket and `revert-journal`; certificates reloaded on SIGHUP; the
//! identity in the audit; `--insecure` only on loopback.

use std::{
    path::Path,
    process::Command,
    time::{Duration, SystemTime},
};

use chaos_e2e::{
    Daemon, NetPair, Pki, Victim, agent_socket, chaos, chaos_as, chaos_ok, chaos_ok_as, free_port, grpcurl_bin, json, pki, proc_state,
    start_agent, start_agent_at, start_coordinator, wait_until,
};
use chaos_proto::trust::{
    Identity, Role, TlsFiles,
    certs::{Request, init_ca_dir},
};

/// grpcurl trusting our CA, with the client certificate in `client` (None: none).
fn grpcurl(client: Option<&Path>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(grpcurl_bin());
    cmd.arg("-cacert").arg(pki().ca_dir().join("ca.pem")).args(["-max-time", "5"]);
    if let Some(dir) = client {
        let f = TlsFiles::in_dir(dir);
        cmd.arg("-cert").arg(f.cert).arg("-key").arg(f.key);
    }
    let out = cmd.args(args).output().expect("run grpcurl");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Every method of `service`, through reflection (as the test admin).
fn methods(host: &str, service: &str) -> Vec<String> {
    let (ok, out) = grpcurl(Some(&pki().admin()), &[host, "list", service]);
    assert!(ok, "{out}");
    out.lines().filter(|l| l.starts_with(service)).map(|l| l.replace(&format!("{service}."), &format!("{service}/"))).collect()
}

fn host(url: &str) -> &str {
    url.trim_start_matches("https://")
}

#[test]
fn every_rpc_refuses_a_missing_a_foreign_and_an_expired_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_c, curl) = start_coordinator(dir.path());
    let (_a, aurl) = start_agent(dir.path(), "t0", Some(&curl), "10s");

    // Another CA's admin, and our CA's admin whose certificate expired yesterday.
    let other_ca = dir.path().join("other-ca");
    init_ca_dir(&other_ca, "other", Duration::from_secs(3600)).expect("other CA");
    let foreign = Pki::issue_into(
        &other_ca,
        &Request::new(Identity::new(Role::Admin, "intruder").expect("id"), vec![], Duration::from_secs(3600)),
        &dir.path().join("foreign"),
    );
    let day = Duration::from_secs(24 * 3600);
    let mut req = Request::new(Identity::new(Role::Admin, "old-admin").expect("id"), vec![], day);
    req.not_before = SystemTime::now() - 2 * day;
    req.not_after = SystemTime::now() - day;
    let expired = Pki::issue_into(&pki().ca_dir(), &req, &dir.path().join("expired"));

    let mut checked = 0;
    for (url, service) in [(&curl, "chaos.v1.Coordinator"), (&aurl, "chaos.v1.Agent")] {
        let h = host(url);
        let all = methods(h, service);
        assert!(all.len() >= 7, "{service}: {all:?}");
        // Side by side, a few methods per thread (each call is a process).
        std::thread::scope(|scope| {
            for chunk in all.chunks(4) {
                let (foreign, expired) = (&foreign, &expired);
                scope.spawn(move || {
                    for m in chunk {
                        let (ok, out) = grpcurl(None, &["-d", "{}", h, m]);
                        assert!(!ok && out.contains("Unauthenticated"), "{m} without a certificate: {out}");
                        for (what, d) in [("another CA's", foreign), ("an expired", expired)] {
                            let (ok, out) = grpcurl(Some(d), &["-d", "{}", h, m]);
                            // The handshake fails: no gRPC status of the method comes back.
                            assert!(!ok && !out.contains("Code: ") && !out.contains('{'), "{m} with {what} certificate: {out}");
                        }
                    }
                });
            }
        });
        checked += all.len();
        // Reflection and health ask for a certificate too.
        let (ok, out) = grpcurl(None, &[h, "list"]);
        assert!(!ok && out.contains("Unauthenticated"), "{out}");
    }
    assert!(checked > 25, "{checked} methods");

    // The CLI: no certificate is a usage error that says how to make one;
    // plaintext to a TLS server fails, naming --insecure where it matters.
    let e = chaos_ok_as(&dir.path().join("none"), &["--coordinator", &curl, "agents"], 2);
    assert!(e.contains("chaos certs issue"), "{e}");
    let e = chaos_ok_as(&foreign, &["--coordinator", &curl, "agents"], 5);
    assert!(e.contains("coordinator"), "{e}");
    let e = chaos_ok(&["--coordinator", &curl.replace("https://", "http://"), "agents"], 2);
    assert!(e.contains("--insecure"), "{e}");
}

#[test]
fn roles_are_enforced_and_refusals_name_the_role_and_the_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "chaos_testing: {blast_radius_limit: 1.0}\n").expect("config");
    let (_c, curl) = chaos_e2e::start_coordinator_with(dir.path(), free_port(), Some(&cfg));
    let (_a0, a0) = start_agent(dir.path(), "r0", Some(&curl), "10s");
    let (_a1, _) = start_agent(dir.path(), "r1", Some(&curl), "10s");
    assert!(wait_until(Duration::from_secs(10), || json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "agents"], 0))["agents"]
        .as_array()
        .is_some_and(|a| a.len() == 2)));
    let viewer = pki().dir(Role::Viewer, "vera");
    let operator = pki().dir(Role::Operator, "otto");
    let agent = pki().dir(Role::Agent, "r0");
    let v = Victim::spawn();
    let pid = v.pid().to_string();

    // A viewer reads, and cannot create a scenario.
    let list = chaos_ok_as(&viewer, &["--coordinator", &curl, "-o", "json", "agents"], 0);
    assert_eq!(json(&list)["agents"].as_array().map(Vec::len), Some(2));
    let e = chaos_ok_as(
        &viewer,
        &["--coordinator", &curl, "scenario", "create", "--pause-pid", &pid, "--agent-id", "r0", "--duration", "5s", "--severity", "2"],
        3,
    );
    assert!(e.contains("CreateScenario needs role operator or admin") && e.contains("vera (viewer) from 127.0.0.1:"), "{e}");
    assert_eq!(v.state(), 'S', "nothing paused");
    // A viewer cannot revert everything on an agent; an operator can, but cannot apply there.
    let e = chaos_ok_as(&viewer, &["agent", "revert-all", "--agent", &a0], 3);
    assert!(e.contains("RevertAll needs role operator, admin or coordinator"), "{e}");
    chaos_ok_as(&operator, &["agent", "revert-all", "--agent", &a0], 0);
    let e = chaos_ok_as(&operator, &["agent", "apply", "--agent", &a0, "--pause-pid", &pid, "--duration", "5s"], 3);
    assert!(e.contains("ApplyFault needs role admin or coordinator") && e.contains("otto (operator)"), "{e}");

    // An operator runs scenarios and stops the fleet, but cannot arm it.
    let out = chaos_ok_as(
        &operator,
        &["--coordinator", &curl, "scenario", "create", "--pause-pid", &pid, "--agent-id", "r0", "--duration", "1m", "--severity", "2"],
        0,
    );
    assert!(wait_until(Duration::from_secs(5), || v.state() == 'T'), "{out}");
    chaos_ok_as(&operator, &["--coordinator", &curl, "emergency-stop", "--reason", "roles test"], 0);
    assert!(wait_until(Duration::from_secs(5), || v.state() != 'T'));
    let e = chaos_ok_as(&operator, &["--coordinator", &curl, "arm"], 3);
    assert!(e.contains("Arm needs role admin") && e.contains("otto (operator)"), "{e}");
    chaos_ok(&["--coordinator", &curl, "arm"], 0);

    // An agent's certificate cannot stop the fleet, nor register as another agent.
    let e = chaos_ok_as(&agent, &["--coordinator", &curl, "emergency-stop"], 3);
    assert!(e.contains("EmergencyStop needs role operator or admin") && e.contains("r0 (agent)"), "{e}");
    let body = r#"{"agentId":"r1","address":"https://127.0.0.1:1","leaseDuration":"10s","instanceId":"forged"}"#;
    let (ok, out) = grpcurl(Some(&agent), &["-d", body, host(&curl), "chaos.v1.Coordinator/RegisterAgent"]);
    assert!(!ok && out.contains("PermissionDenied") && out.contains("r1") && out.contains("r0"), "{out}");
    // A person's certificate cannot register at all.
    let (ok, out) = grpcurl(Some(&pki().admin()), &["-d", body, host(&curl), "chaos.v1.Coordinator/RegisterAgent"]);
    assert!(!ok && out.contains("PermissionDenied") && out.contains("needs role agent"), "{out}");

    // The audit names each caller by certificate: the operator's scenario and stop, the refusals.
    let audit = json(&chaos_ok_as(&viewer, &["--coordinator", &curl, "-o", "json", "audit"], 0));
    let entries = audit["entries"].as_array().expect("entries");
    let by = |action: &str, name: &str, role: &str| {
        entries.iter().any(|e| e["action"] == action && e["actor_name"] == name && e["actor_role"] == role)
    };
    assert!(by("CreateScenario", "otto", "operator") && by("EmergencyStop", "otto", "operator"), "{audit:#}");
    assert!(by("Arm", chaos_e2e::ADMIN, "admin") && by("RegisterAgent", "r1", "agent"), "{audit:#}");
}

#[test]
fn a_twin_agent_id_is_refused_and_emergency_stop_never_claims_success_over_a_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_c, curl) = start_coordinator(dir.path());
    // Two processes with one id and one certificate (a cloned VM).
    let (mut first, first_url) = start_agent_at(dir.path(), "twin", free_port(), &dir.path().join("j1"), Some(&curl), "4s", &[]);
    let v1 = Victim::spawn();
    assert!(chaos_e2e::pause_when_ready(&first_url, v1.pid(), Duration::from_secs(10)), "{}", first.log_text());
    let other_host = dir.path().join("clone");
    std::fs::create_dir(&other_host).expect("dir");
    let (second, second_url) = start_agent_at(&other_host, "twin", free_port(), &dir.path().join("j2"), Some(&curl), "4s", &[]);

    let caps = || json(&chaos_ok(&["-o", "json", "agent", "capabilities", "--agent", &second_url], 0));
    assert!(wait_until(Duration::from_secs(10), || caps()["registration_error"].as_str().is_some_and(|e| !e.is_empty())));
    let c = caps();
    assert_eq!(c["registered"], false, "{c:#}");
    let why = c["registration_error"].as_str().unwrap_or_default();
    assert!(why.contains(first_url.trim_start_matches("https://")) && why.contains("lease"), "names the holder: {c:#}");
    assert!(second.log_text().contains("REFUSED"), "says so loudly: {}", second.log_text());
    // The refused twin refuses faults.
    let v2 = Victim::spawn();
    let e = chaos_ok(&["agent", "apply", "--agent", &second_url, "--pause-pid", &v2.pid().to_string(), "--duration", "1m"], 3);
    assert!(e.contains("twin") || e.contains("registered") || e.contains("refus"), "{e}");
    assert_eq!(v2.state(), 'S');
    let agents = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "agents"], 0));
    assert_eq!(agents["agents"].as_array().map(Vec::len), Some(1), "one owner: {agents:#}");
    assert_eq!(agents["agents"][0]["address"], first_url.as_str(), "{agents:#}");

    // The holder stops answering while it holds a fault: emergency stop
    // reaches the twin (listed as a duplicate) but not the holder, and says
    // INCOMPLETE with exit code 7.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.pid() as i32), nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP agent");
    let out = chaos_ok(&["--coordinator", &curl, "emergency-stop", "--deadline", "1s"], 7);
    assert!(out.contains("INCOMPLETE") && out.contains("DUPLICATE"), "{out}");
    let r = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "emergency-stop", "--deadline", "1s"], 7));
    assert_eq!(r["complete"], false, "{r:#}");
    let results = r["results"].as_array().expect("results");
    assert!(results.iter().any(|x| x["duplicate"] == true && x["reached"] == true), "{r:#}");
    assert!(results.iter().any(|x| x["duplicate"] == false && x["reached"] == false), "{r:#}");
    assert_eq!(v1.state(), 'T', "the holder still holds its fault: the answer must not be success");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.pid() as i32), nix::sys::signal::Signal::SIGCONT).expect("SIGCONT agent");
    // Resumed, the holder learns of the disarm (or loses its lease) and reverts.
    assert!(wait_until(Duration::from_secs(15), || v1.state() != 'T'), "{}", first.log_text());

    // The holder dies: once its lease runs out, the twin takes the id over.
    first.kill9();
    assert!(wait_until(Duration::from_secs(20), || caps()["registered"] == true), "{:#}", caps());
    let agents = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "agents"], 0));
    assert_eq!(agents["agents"][0]["address"], second_url.as_str(), "{agents:#}");
    // The twin retried on every heartbeat while refused; the audit kept its
    // first refusal, not one row per retry.
    let audit = json(&chaos_ok(&["--coordinator", &curl, "-o", "json", "audit"], 0));
    let refusals = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "RegisterAgent" && e["outcome"].as_str().is_some_and(|o| o.starts_with("error: AlreadyExists")))
        .count();
    assert_eq!(refusals, 1, "{audit:#}");
}

#[test]
fn break_glass_reverts_with_the_coordinator_down_and_the_network_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = NetPair::new();
    let (cport, aport) = (50051, 50052);
    let curl = format!("https://{}:{cport}", pair.b_ip);
    let aurl = format!("https://{}:{aport}", pair.a_ip);
    let ctls = pki().dir_with(Role::Coordinator, "bg-coordinator", &[&pair.b_ip]);
    let atls = pki().dir_with(Role::Agent, "bg", &[&pair.a_ip]);
    let sock = dir.path().join("bg.sock");
    let journal = dir.path().join("journal");
    let in_ns = |ns: &str, name: &str, args: &[String], log: &str| Daemon::spawn_in_netns(ns, name, args, dir.path().join(log));
    let mut coord = in_ns(
        &pair.b,
        "chaos-coordinator",
        &[
            "--listen".into(),
            format!("{}:{cport}", pair.b_ip),
            "--state-dir".into(),
            dir.path().join("cstate").display().to_string(),
            "--tls-dir".into(),
            ctls.display().to_string(),
        ],
        "coord.log",
    );
    // A long lease: the fault outlives the coordinator, as when a lease is set for a long drill.
    let mut agent = in_ns(
        &pair.a,
        "chaos-agent",
        &[
            "--listen".into(),
            format!("{}:{aport}", pair.a_ip),
            "--coordinator".into(),
            curl.clone(),
            "--lease".into(),
            "5m".into(),
            "--journal-dir".into(),
            journal.display().to_string(),
            "--tls-dir".into(),
            atls.display().to_string(),
            "--local-socket".into(),
            sock.display().to_string(),
        ],
        "agent.log",
    );
    let v = Victim::spawn();
    let pid = v.pid().to_string();
    let apply = |id: &str| {
        chaos_e2e::chaos_in(&pair.b, &["agent", "apply", "--agent", &aurl, "--pause-pid", &pid, "--duration", "10m", "--id", id])
    };
    assert!(wait_until(Duration::from_secs(15), || apply("held").status.success()), "agent never accepted:\n{}", agent.log_text());
    assert_eq!(v.state(), 'T');

    // The coordinator dies and the agent's host drops off the network.
    coord.kill9();
    let dev = format!("ce{}-{}a", std::process::id(), pair.a.rsplit('-').nth(1).unwrap_or("0"));
    let cut = NetPair::exec(&pair.a, &["ip", "link", "set", &dev, "down"]);
    assert!(cut.status.success(), "ip link set {dev} down: {}", String::from_utf8_lossy(&cut.stderr));
    let over_network = chaos_e2e::chaos_in(&pair.b, &["--timeout", "2s", "agent", "faults", "--agent", &aurl]);
    assert_eq!(over_network.status.code(), Some(5), "the network path is gone: {}", String::from_utf8_lossy(&over_network.stderr));

    // Break-glass: no certificate, no network, no coordinator.
    let nobody = dir.path().join("no-certificate");
    let s = sock.display().to_string();
    let faults = json(&chaos_ok_as(&nobody, &["-o", "json", "agent", "faults", "--local", "--socket", &s], 0));
    assert_eq!(faults["faults"][0]["id"], "held", "{faults:#}");
    let out = chaos_ok_as(&nobody, &["agent", "revert-all", "--local", "--socket", &s, "--reason", "coordinator down"], 0);
    assert!(out.contains("1 fault(s) reverted"), "{out}");
    assert!(wait_until(Duration::from_secs(2), || v.state() != 'T'), "resumed by the break-glass revert");
    assert!(agent.log_text().contains("local-root (admin)"), "the agent logs who reverted: {}", agent.log_text());

    // An agent that no longer starts: revert-journal reverts what its journal holds.
    let v2 = Victim::spawn();
    let out = chaos_ok_as(
        &nobody,
        &["-o", "json", "agent", "apply", "--local", "--socket", &s, "--pause-pid", &v2.pid().to_string(), "--duration", "10m"],
        0,
    );
    assert!(out.contains("APPLIED"), "{out}");
    assert_eq!(v2.state(), 'T');
    agent.kill9();
    assert_eq!(v2.state(), 'T', "a crash leaves the fault (the journal holds it)");
    let r = Command::new(chaos_e2e::bin("chaos-agent"))
        .args(["revert-journal", "--journal-dir", &journal.display().to_string()])
        .output()
        .expect("revert-journal");
    let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success(), "{text}");
    assert_ne!(proc_state(v2.pid()), Some('T'), "revert-journal resumed it: {text}");
}

#[test]
fn sighup_swaps_certificates_for_new_connections_and_keeps_faults_and_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory of its own, renewed in place.
    let tls = dir.path().join("tls");
    let req = || Request::new(Identity::new(Role::Agent, "hup").expect("id"), vec![], Duration::from_secs(3600));
    Pki::issue_into(&pki().ca_dir(), &req(), &tls);
    let port = free_port();
    let aurl = format!("https://127.0.0.1:{port}");
    let agent = Daemon::spawn(
        "chaos-agent",
        &[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--journal-dir".into(),
            dir.path().join("j").display().to_string(),
            "--tls-dir".into(),
            tls.display().to_string(),
            "--local-socket".into(),
            agent_socket(dir.path(), "hup").display().to_string(),
        ],
        dir.path().join("agent.log"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || chaos(&["agent", "capabilities", "--agent", &aurl]).status.success()),
        "{}",
        agent.log_text()
    );
    let shown =
        || json(&chaos_ok(&["-o", "json", "certs", "show", &aurl], 0))["certificates"][0]["sha256"].as_str().unwrap_or("").to_string();
    let before = shown();
    assert!(!before.is_empty());
    let v = Victim::spawn();
    chaos_ok(&["agent", "apply", "--agent", &aurl, "--pause-pid", &v.pid().to_string(), "--duration", "10m", "--id", "kept"], 0);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        // A stream open before the reload.
        let mut c = chaos_proto::pb::agent_client::AgentClient::new(chaos_e2e::agent_channel(&aurl));
        let mut stream = c
            .stream_metrics(chaos_proto::pb::StreamMetricsRequest { metric_prefixes: vec!["host.memory".into()], ..Default::default() })
            .await
            .expect("stream")
            .into_inner();
        tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("a batch").expect("stream ok");

        // A broken renewal (a key that does not match) is refused and the old pair stays.
        std::fs::copy(pki().admin().join("key.pem"), tls.join("key.pem")).expect("wrong key");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid() as i32), nix::sys::signal::Signal::SIGHUP).expect("HUP");
        assert!(wait_until(Duration::from_secs(5), || agent.log_text().contains("reload on SIGHUP failed")), "{}", agent.log_text());
        assert_eq!(shown(), before, "the previous certificate stays in force");

        // A good renewal: new connections see the new certificate.
        Pki::issue_into(&pki().ca_dir(), &req(), &tls);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid() as i32), nix::sys::signal::Signal::SIGHUP).expect("HUP");
        assert!(wait_until(Duration::from_secs(5), || shown() != before), "{}", agent.log_text());
        // The old stream still delivers, the fault is still applied.
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("a batch after the reload").expect("stream ok");
        }
    });
    assert_eq!(v.state(), 'T', "the fault stays through the reload");
    let faults = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", &aurl], 0));
    assert_eq!(faults["faults"][0]["id"], "kept", "{faults:#}");
    assert_eq!(faults["faults"][0]["state"], "APPLIED", "{faults:#}");
}

#[test]
fn insecure_is_explicit_and_loopback_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Without certificates a daemon refuses to start, naming the way out.
    let out = Command::new(chaos_e2e::bin("chaos-coordinator"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--state-dir", &dir.path().join("s0").display().to_string()])
        .env_remove("CHAOS_TLS_DIR")
        .env("HOME", dir.path())
        .output()
        .expect("coordinator");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("--tls-dir") && text.contains("--insecure"), "{text}");
    // Plaintext on a non-loopback address: refused at start.
    let out = Command::new(chaos_e2e::bin("chaos-agent"))
        .args(["--insecure", "--listen", "0.0.0.0:0", "--advertise", "http://198.18.0.1:1", "--journal-dir"])
        .arg(dir.path().join("j"))
        .output()
        .expect("agent");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("refusing to serve plaintext"), "{text}");

    // On loopback, --insecure on both sides works; mixing modes does not.
    let port = free_port();
    let _c = Daemon::spawn(
        "chaos-coordinator",
        &[
            "--insecure".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--state-dir".into(),
            dir.path().join("s").display().to_string(),
        ],
        dir.path().join("c.log"),
    );
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_until(Duration::from_secs(10), || chaos(&["--insecure", "--coordinator", &addr, "status"]).status.success()));
    let status = chaos_ok(&["--insecure", "--coordinator", &addr, "status"], 0);
    assert!(status.contains("OFF (--insecure)"), "{status}");
    let tls_to_plain = chaos_as(&pki().admin(), &["--timeout", "3s", "--coordinator", &addr, "status"]);
    assert_eq!(tls_to_plain.status.code(), Some(5), "{}", String::from_utf8_lossy(&tls_to_plain.stderr));
}
