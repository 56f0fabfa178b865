//! grpcurl, with no .proto at hand, sees each server's service, reflection
//! and health, and can call the contract (reflection is part of the product).

use std::{path::PathBuf, process::Command};

use chaos_e2e::{start_agent, start_coordinator};

fn grpcurl() -> PathBuf {
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("grpcurl")).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join("go/bin/grpcurl"));
    }
    if let Some(gp) = std::env::var_os("GOPATH") {
        candidates.push(PathBuf::from(gp).join("bin/grpcurl"));
    }
    candidates
        .into_iter()
        .find(|p| p.exists())
        .expect("grpcurl not found: install it with `go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3` (.ci/run does)")
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(grpcurl()).args(args).output().expect("run grpcurl");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn reflection_and_health_on_both_servers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_c, curl) = start_coordinator(dir.path());
    let (_a, aurl) = start_agent(dir.path(), "g", None, "10s");
    let chost = curl.trim_start_matches("http://");
    let ahost = aurl.trim_start_matches("http://");

    let (ok, list) = run(&["-plaintext", chost, "list"]);
    assert!(ok, "{list}");
    for s in ["chaos.v1.Coordinator", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(list.lines().any(|l| l == s), "coordinator list lacks {s}:\n{list}");
    }
    let (ok, list) = run(&["-plaintext", ahost, "list"]);
    assert!(ok, "{list}");
    assert!(list.lines().any(|l| l == "chaos.v1.Agent"), "{list}");
    assert!(!list.lines().any(|l| l == "chaos.v1.Coordinator"), "agent must not advertise the coordinator:\n{list}");

    let (ok, d) = run(&["-plaintext", ahost, "describe", "chaos.v1.FaultSpec"]);
    assert!(ok && d.contains("process_pause") && d.contains("Time to live"), "{d}");
    let (ok, h) = run(&["-plaintext", chost, "grpc.health.v1.Health/Check"]);
    assert!(ok && h.contains("SERVING"), "{h}");

    // A bad value: INVALID_ARGUMENT naming the field and the value.
    let body = r#"{"spec":{"target":{"netns":"lab-a"},"duration":"5s","networkCorrupt":{"percent":120}}}"#;
    let (ok, out) = run(&["-plaintext", "-d", body, ahost, "chaos.v1.Agent/ApplyFault"]);
    assert!(!ok && out.contains("InvalidArgument") && out.contains("spec.network_corrupt.percent") && out.contains("120"), "{out}");
    // Scenarios through grpcurl: a dry run answers with the admission, and
    // a refusal names the rule.
    let body = r#"{"spec":{"fault":{"target":{"pid":4242},"processPause":{}},"severity":1},"dryRun":true}"#;
    let (ok, out) = run(&["-plaintext", "-d", body, chost, "chaos.v1.Coordinator/CreateScenario"]);
    assert!(ok && out.contains("allow_pause: false") && out.contains("\"scenarioType\": \"process_pause\""), "{out}");
    let (ok, out) = run(&["-plaintext", chost, "chaos.v1.Coordinator/ListScenarios"]);
    assert!(ok, "{out}");
    let (ok, d) = run(&["-plaintext", chost, "describe", "chaos.v1.BlastRadius"]);
    assert!(ok && d.contains("affected_agents"), "{d}");

    // Recovery validation streams progress, each check, then the report.
    let body = format!(r#"{{"services":[{{"name":"agent","kind":"SERVICE_KIND_TCP","address":"{ahost}"}}],"maxAttempts":1}}"#);
    let (ok, out) = run(&["-plaintext", "-d", &body, chost, "chaos.v1.Coordinator/ValidateRecovery"]);
    assert!(
        ok && out.contains("\"progress\"") && out.contains("availability:agent") && out.contains("\"verdict\": \"VERDICT_PASSED\""),
        "{out}"
    );
    // Metrics: the agent streams batches (here cut by grpcurl's deadline);
    // the coordinator answers a snapshot.
    let (_, out) =
        run(&["-plaintext", "-max-time", "2", "-d", r#"{"metricPrefixes":["host.memory"]}"#, ahost, "chaos.v1.Agent/StreamMetrics"]);
    assert!(out.contains("\"source\": \"g\"") && out.contains("host.memory.total_bytes") && !out.contains("host.cpu"), "{out}");
    let (ok, out) = run(&["-plaintext", chost, "chaos.v1.Coordinator/GetMetrics"]);
    assert!(ok, "{out}");
    let body = r#"{"services":[{"kind":"SERVICE_KIND_TCP","address":"nowhere"}]}"#;
    let (ok, out) = run(&["-plaintext", "-d", body, chost, "chaos.v1.Coordinator/ValidateRecovery"]);
    assert!(!ok && out.contains("InvalidArgument") && out.contains("services[0].address"), "{out}");
}
