//! grpcurl, with no .proto at hand, sees each server's service, reflection
//! and health, and can call the contract (reflection is part of the product),
//! over mTLS with `-cacert -cert -key` as README shows.

use std::process::Command;

use chaos_e2e::{grpcurl_bin, pki, start_agent, start_coordinator};

/// grpcurl as the test admin: README's `-cacert -cert -key`.
fn run(args: &[&str]) -> (bool, String) {
    let dir = pki().admin();
    let files = chaos_proto::trust::TlsFiles::in_dir(&dir);
    let out = Command::new(grpcurl_bin())
        .arg("-cacert")
        .arg(&files.ca)
        .arg("-cert")
        .arg(&files.cert)
        .arg("-key")
        .arg(&files.key)
        .args(args)
        .output()
        .expect("run grpcurl");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn reflection_and_health_on_both_servers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_c, curl) = start_coordinator(dir.path());
    let (_a, aurl) = start_agent(dir.path(), "g", None, "10s");
    let chost = curl.trim_start_matches("https://");
    let ahost = aurl.trim_start_matches("https://");

    let (ok, list) = run(&[chost, "list"]);
    assert!(ok, "{list}");
    for s in ["chaos.v1.Coordinator", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(list.lines().any(|l| l == s), "coordinator list lacks {s}:\n{list}");
    }
    let (ok, list) = run(&[ahost, "list"]);
    assert!(ok, "{list}");
    assert!(list.lines().any(|l| l == "chaos.v1.Agent"), "{list}");
    assert!(!list.lines().any(|l| l == "chaos.v1.Coordinator"), "agent must not advertise the coordinator:\n{list}");

    let (ok, d) = run(&[ahost, "describe", "chaos.v1.FaultSpec"]);
    assert!(ok && d.contains("process_pause") && d.contains("Time to live"), "{d}");
    let (ok, h) = run(&[chost, "grpc.health.v1.Health/Check"]);
    assert!(ok && h.contains("SERVING"), "{h}");

    // A bad value: INVALID_ARGUMENT naming the field and the value.
    let body = r#"{"spec":{"target":{"netns":"lab-a"},"duration":"5s","networkCorrupt":{"percent":120}}}"#;
    let (ok, out) = run(&["-d", body, ahost, "chaos.v1.Agent/ApplyFault"]);
    assert!(!ok && out.contains("InvalidArgument") && out.contains("spec.network_corrupt.percent") && out.contains("120"), "{out}");
    // Scenarios through grpcurl: a dry run answers with the admission, and
    // a refusal names the rule.
    let body = r#"{"spec":{"fault":{"target":{"pid":4242},"processPause":{}},"severity":1},"dryRun":true}"#;
    let (ok, out) = run(&["-d", body, chost, "chaos.v1.Coordinator/CreateScenario"]);
    assert!(ok && out.contains("allow_pause: false") && out.contains("\"scenarioType\": \"process_pause\""), "{out}");
    let (ok, out) = run(&[chost, "chaos.v1.Coordinator/ListScenarios"]);
    assert!(ok, "{out}");
    let (ok, d) = run(&[chost, "describe", "chaos.v1.BlastRadius"]);
    assert!(ok && d.contains("affected_agents"), "{d}");

    // Recovery validation streams progress, each check, then the report.
    let body = format!(r#"{{"services":[{{"name":"agent","kind":"SERVICE_KIND_TCP","address":"{ahost}"}}],"maxAttempts":1}}"#);
    let (ok, out) = run(&["-d", &body, chost, "chaos.v1.Coordinator/ValidateRecovery"]);
    assert!(
        ok && out.contains("\"progress\"") && out.contains("availability:agent") && out.contains("\"verdict\": \"VERDICT_PASSED\""),
        "{out}"
    );
    // Metrics: the agent streams batches (here cut by grpcurl's deadline);
    // the coordinator answers a snapshot.
    let (_, out) = run(&["-max-time", "2", "-d", r#"{"metricPrefixes":["host.memory"]}"#, ahost, "chaos.v1.Agent/StreamMetrics"]);
    assert!(out.contains("\"source\": \"g\"") && out.contains("host.memory.total_bytes") && !out.contains("host.cpu"), "{out}");
    let (ok, out) = run(&[chost, "chaos.v1.Coordinator/GetMetrics"]);
    assert!(ok, "{out}");
    let body = r#"{"services":[{"kind":"SERVICE_KIND_TCP","address":"nowhere"}]}"#;
    let (ok, out) = run(&["-d", body, chost, "chaos.v1.Coordinator/ValidateRecovery"]);
    assert!(!ok && out.contains("InvalidArgument") && out.contains("services[0].address"), "{out}");
}
