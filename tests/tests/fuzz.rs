//! Fuzz targets (see `chaos_e2e::fuzz`): the wire spec and its validation,
//! the stop-condition rule grammar, and the agent's and coordinator's
//! config files. The experiment-file target lives with its parser in the
//! CLI (`cli/src/experiment.rs`). Corpora under `tests/fuzz/corpus/`.

use std::time::Duration;

use chaos_e2e::fuzz::fuzz;
use chaos_proto::{edge, pb, rules::Rule, spec::FaultRequest};
use clap::Parser;
use prost::Message;

const MAX: Duration = Duration::from_secs(3600);

/// Protobuf-ish tokens: varints at their edges, length prefixes, field tags.
const WIRE: &[&[u8]] = &[
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    &[0x80, 0x80, 0x80, 0x80, 0x08],
    &[0x0a, 0x00],
    &[0x12, 0x7f],
    &[0x1a, 0x02, 0x08, 0x01],
    &[0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0x7f],
    &[0x11, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x00],
];

/// A spec from the wire: validation never panics, what the edge lets
/// through it either refuses by field or accepts, and what it accepts
/// goes back to the wire and validates to the same request.
#[test]
fn fuzz_fault_specs() {
    fuzz("spec", Vec::new(), WIRE, |bytes| {
        let Ok(req) = pb::ApplyFaultRequest::decode(bytes) else { return Ok(()) };
        if edge::check_encoded("chaos.v1.ApplyFaultRequest", bytes).is_err() {
            return Ok(());
        }
        let Some(spec) = req.spec else { return Ok(()) };
        match FaultRequest::from_pb(&spec, MAX) {
            Err(e) => {
                let text = e.to_string();
                if !text.starts_with("spec.") {
                    return Err(format!("a refusal that names no field: {text}"));
                }
                if text.len() > 1000 {
                    return Err(format!("a refusal of {} bytes", text.len()));
                }
                Ok(())
            }
            Ok(r) => {
                let id = r.id.clone().unwrap_or_else(|| "f".into());
                let again =
                    FaultRequest::from_pb(&r.to_pb(&id), MAX).map_err(|e| format!("accepted, then refused its own wire form: {e}"))?;
                let mut want = r.clone();
                want.id = Some(id);
                if again != want {
                    return Err(format!("round trip changed the request:\n{want:?}\n{again:?}"));
                }
                Ok(())
            }
        }
    });
}

const RULE_TOKENS: &[&[u8]] = &[
    b" > ",
    b" >= ",
    b" < ",
    b" <= ",
    b" == ",
    b" != ",
    b" for ",
    b"{",
    b"}",
    b"=",
    b",",
    b"\"",
    b"NaN",
    b"inf",
    b"-1e309",
    b"1e400",
    b"18446744073709551616s",
    b"99999999999h",
    b"0.5s",
    b"\n",
    b"\0",
];

/// A stop condition or hypothesis: parsing never panics, and what parses
/// compares against a real number and parses again to itself.
#[test]
fn fuzz_rules() {
    fuzz("rules", Vec::new(), RULE_TOKENS, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        match Rule::parse(&text) {
            Err(e) if e.len() > 2000 => Err(format!("a refusal of {} bytes", e.len())),
            Err(_) => Ok(()),
            Ok(r) => {
                if !r.threshold.is_finite() {
                    return Err(format!("accepted a threshold that compares with nothing: {}", r.threshold));
                }
                match Rule::parse(&r.to_string()) {
                    Ok(again) if again == r => Ok(()),
                    other => Err(format!("{r:?} parsed again as {other:?}")),
                }
            }
        }
    });
}

const YAML_TOKENS: &[&[u8]] = &[
    b"\n",
    b": ",
    b"- ",
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"'",
    b"!!binary ",
    b"~",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"99999999999h",
    b"0s",
    b"\t",
    b"\xff",
    b"---\n",
    b"? ",
];

fn with_file<T>(bytes: &[u8], f: impl FnOnce(&std::path::Path) -> T) -> T {
    let dir = tempfile::tempdir().expect("dir");
    let p = dir.path().join("config.yaml");
    std::fs::write(&p, bytes).expect("write");
    f(&p)
}

fn bounded(what: &str, r: anyhow::Result<impl Sized>) -> Result<(), String> {
    match r {
        Err(e) if format!("{e:#}").len() > 3000 => {
            let text = format!("{e:#}");
            Err(format!("{what}: an error of {} bytes: {}", text.len(), chaos_proto::edge::one_line(&text, 400)))
        }
        _ => Ok(()),
    }
}

#[test]
fn fuzz_agent_config() {
    let shipped = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/agent.yaml")).expect("deploy/config/agent.yaml");
    fuzz("agent-config", vec![shipped], YAML_TOKENS, |bytes| {
        with_file(bytes, |p| {
            let args = chaos_agent::config::AgentArgs::try_parse_from(["chaos-agent", "--config", &p.display().to_string()])
                .map_err(|e| e.to_string())?;
            bounded("agent config", chaos_agent::config::AgentConfig::resolve(&args))
        })
    });
}

#[test]
fn fuzz_coordinator_config() {
    let shipped =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/coordinator.yaml")).expect("deploy/config/coordinator.yaml");
    fuzz("coordinator-config", vec![shipped], YAML_TOKENS, |bytes| {
        with_file(bytes, |p| {
            let args =
                chaos_coordinator::config::CoordinatorArgs::try_parse_from(["chaos-coordinator", "--config", &p.display().to_string()])
                    .map_err(|e| e.to_string())?;
            bounded("coordinator config", chaos_coordinator::config::CoordinatorConfig::resolve(&args))
        })
    });
}

/// Writes the `spec` seeds (encoded ApplyFaultRequests, one per family).
/// Run once by hand when the contract grows: `cargo test -p chaos-e2e
/// --test fuzz -- --ignored write_spec_corpus`.
#[test]
#[ignore = "writes the committed corpus"]
fn write_spec_corpus() {
    use pb::fault_spec::Fault as F;
    let d = |ms| Some(chaos_proto::convert::duration_to_pb(Duration::from_millis(ms)));
    let scope = Some(pb::NetworkScope {
        interface: "eth0".into(),
        peer_cidrs: vec!["198.18.0.0/24".into()],
        ports: vec![9092],
        protocol: "tcp".into(),
        direction: pb::Direction::Ingress as i32,
    });
    let faults: Vec<(&str, pb::target::Kind, F)> = vec![
        ("partition", pb::target::Kind::Netns("lab-kafka".into()), F::NetworkPartition(pb::NetworkPartition { scope: scope.clone() })),
        (
            "latency",
            pb::target::Kind::Host(pb::HostTarget {}),
            F::NetworkLatency(pb::NetworkLatency { scope: scope.clone(), delay: d(100), jitter: d(10), correlation_percent: 25.0 }),
        ),
        (
            "loss",
            pb::target::Kind::Pid(42),
            F::NetworkLoss(pb::NetworkLoss { scope: scope.clone(), percent: 10.5, correlation_percent: 0.0 }),
        ),
        ("corrupt", pb::target::Kind::Host(pb::HostTarget {}), F::NetworkCorrupt(pb::NetworkCorrupt { scope: None, percent: 1.0 })),
        ("duplicate", pb::target::Kind::Host(pb::HostTarget {}), F::NetworkDuplicate(pb::NetworkDuplicate { scope: None, percent: 2.0 })),
        (
            "reorder",
            pb::target::Kind::Host(pb::HostTarget {}),
            F::NetworkReorder(pb::NetworkReorder { scope: None, percent: 30.0, delay: d(20) }),
        ),
        (
            "bandwidth",
            pb::target::Kind::Host(pb::HostTarget {}),
            F::NetworkBandwidth(pb::NetworkBandwidth { scope, rate_bits_per_second: 1_000_000, burst_bytes: 32_000 }),
        ),
        ("cpu", pb::target::Kind::Host(pb::HostTarget {}), F::CpuStress(pb::CpuStress { workers: 2, load_percent: 50.0 })),
        ("throttle", pb::target::Kind::CgroupPath("/app".into()), F::CpuThrottle(pb::CpuThrottle { quota_percent: 20.0 })),
        ("memory", pb::target::Kind::Host(pb::HostTarget {}), F::MemoryStress(pb::MemoryStress { bytes: 64 << 20, percent_of_total: 0.0 })),
        ("limit", pb::target::Kind::CgroupPath("/app".into()), F::MemoryLimit(pb::MemoryLimit { limit_bytes: 64 << 20 })),
        ("freeze", pb::target::Kind::CgroupPath("/app".into()), F::CgroupFreeze(pb::CgroupFreeze {})),
        (
            "fill",
            pb::target::Kind::Host(pb::HostTarget {}),
            F::DiskFill(pb::DiskFill { path: "/tmp".into(), bytes: 0, fill_to_percent: 80.0 }),
        ),
        (
            "io",
            pb::target::Kind::CgroupPath("/app".into()),
            F::IoThrottle(pb::IoThrottle { read_bytes_per_second: 1 << 20, write_bytes_per_second: 0, device: "8:0".into() }),
        ),
        ("kill", pb::target::Kind::ProcessName("java".into()), F::ProcessKill(pb::ProcessKill { signal: "SIGTERM".into() })),
        ("pause", pb::target::Kind::Pid(4242), F::ProcessPause(pb::ProcessPause {})),
        (
            "container",
            pb::target::Kind::Container("kafka".into()),
            F::ContainerAction(pb::ContainerAction { verb: pb::ContainerVerb::Kill as i32, signal: "SIGKILL".into(), stop_grace: None }),
        ),
        (
            "container-stop",
            pb::target::Kind::Container("label:role=kafka".into()),
            F::ContainerAction(pb::ContainerAction { verb: pb::ContainerVerb::Stop as i32, signal: String::new(), stop_grace: d(20_000) }),
        ),
    ];
    let dir = chaos_e2e::fuzz::corpus_dir("spec");
    for (name, target, fault) in faults {
        let req = pb::ApplyFaultRequest {
            spec: Some(pb::FaultSpec {
                id: format!("seed-{name}"),
                target: Some(pb::Target { kind: Some(target) }),
                duration: d(30_000),
                labels: [("scenario".to_string(), "s1".to_string())].into(),
                fault: Some(fault),
            }),
        };
        std::fs::write(dir.join(format!("{name}.pb")), req.encode_to_vec()).expect("write seed");
    }
}
