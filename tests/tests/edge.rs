//! A hostile client against both servers: every RPC of chaos.v1.Agent and
//! chaos.v1.Coordinator, enumerated from the contract's descriptors, is
//! sent messages whose fields hold the edges of their types (extremes,
//! oversized and control-character strings, Durations and Timestamps out
//! of range or not normalized, unknown enum values, long lists). Neither
//! server may panic, answer INTERNAL or UNKNOWN, or refuse without naming
//! a field; nothing may be left applied in the agent's namespace. Then the
//! cases found by hand, one regression each.
//!
//! The agent runs inside a test namespace (a `host` fault lands there, never
//! on this machine) and is reached through its break-glass Unix socket.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use chaos_e2e::{Daemon, NetPair, free_port, pki, start_coordinator, wait_until};
use chaos_proto::trust::Role;
use chaos_proto::{pb, trust::Expect};
use prost::{
    Message,
    bytes::{Buf, BufMut},
};
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, MethodDescriptor, ReflectMessage, Value};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};

/// Bytes in, bytes out: the test builds and reads messages itself.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// One call; a server stream is read for its first message only.
async fn call(channel: &Channel, method: &MethodDescriptor, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::from_str(&format!("/{}/{}", method.parent_service().full_name(), method.name())).expect("path");
    let mut req = tonic::Request::new(body);
    req.set_timeout(Duration::from_secs(5));
    if method.is_server_streaming() {
        let mut stream = grpc.server_streaming(req, path, Raw).await?.into_inner();
        match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Ok(()),
        }
    } else {
        grpc.unary(req, path, Raw).await.map(|_| ())
    }
}

fn duration(seconds: i64, nanos: i32) -> Value {
    Value::Message(ReflectMessage::transcode_to_dynamic(&prost_types::Duration { seconds, nanos }))
}

fn timestamp(seconds: i64, nanos: i32) -> Value {
    Value::Message(ReflectMessage::transcode_to_dynamic(&prost_types::Timestamp { seconds, nanos }))
}

/// The edges of a field's type (one value each; lists and maps are made from them).
fn edge_values(field: &FieldDescriptor, base: Option<&DynamicMessage>, depth: usize) -> Vec<Value> {
    let strings = ["", "1", "ü-名", "a\0b", "line\nforged: entry", "\u{1b}[2J", "../../etc/passwd", &"x".repeat(10_000)]
        .map(|s| Value::String(s.into()));
    match field.kind() {
        Kind::Double => {
            [0.0, -0.0, -1.0, 5e-324, 0.004, 100.0001, 1e308, f64::NAN, f64::INFINITY, f64::NEG_INFINITY].map(Value::F64).into()
        }
        Kind::Float => [-1.0, 5e-45, f32::MAX, f32::NAN, f32::INFINITY].map(Value::F32).into(),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => [i32::MIN, -1, 1, i32::MAX].map(Value::I32).into(),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => [i64::MIN, -1, 1, i64::MAX].map(Value::I64).into(),
        Kind::Uint32 | Kind::Fixed32 => [1, 2, u32::MAX / 2 + 1, u32::MAX].map(Value::U32).into(),
        Kind::Uint64 | Kind::Fixed64 => [1, u64::MAX / 2 + 1, u64::MAX].map(Value::U64).into(),
        Kind::Bool => vec![Value::Bool(true)],
        Kind::String => strings.into(),
        Kind::Bytes => vec![Value::Bytes(vec![0xff; 10_000].into())],
        Kind::Enum(e) => {
            let max = e.values().map(|v| v.number()).max().unwrap_or(0);
            [max, max + 1, 999, -1].map(Value::EnumNumber).into()
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Duration" => vec![
                duration(0, 0),
                duration(-1, 0),
                duration(i64::MAX, 0),
                duration(i64::MAX / 1_000_000_000, 0),
                duration(315_576_000_001, 0),
                duration(1, 1_000_000_000),
                duration(0, -1),
                duration(0, 1),
                duration(1, 0),
            ],
            "google.protobuf.Timestamp" => vec![
                timestamp(0, 0),
                timestamp(-62_135_596_801, 0),
                timestamp(253_402_300_800, 0),
                timestamp(i64::MAX, 0),
                timestamp(1_700_000_000, 1_000_000_000),
            ],
            _ if depth >= 4 => vec![Value::Message(DynamicMessage::new(m.clone()))],
            _ => {
                let nested = base.cloned().unwrap_or_else(|| DynamicMessage::new(m.clone()));
                let mut out = vec![Value::Message(DynamicMessage::new(m.clone()))];
                out.extend(variants(&nested, depth + 1).into_iter().map(Value::Message));
                out
            }
        },
    }
}

/// `base` with one field (at any depth) set to each of its edges.
fn variants(base: &DynamicMessage, depth: usize) -> Vec<DynamicMessage> {
    let desc = base.descriptor();
    let mut out = Vec::new();
    for field in desc.fields() {
        let current = base.has_field(&field).then(|| base.get_field(&field).into_owned());
        let nested_base = match &current {
            Some(Value::Message(m)) => Some(m.clone()),
            _ => None,
        };
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else { continue };
            let key_field = entry.map_entry_key_field();
            let value_field = entry.map_entry_value_field();
            let keys = edge_values(&key_field, None, depth);
            let value = edge_values(&value_field, None, depth).into_iter().next().unwrap_or(Value::Bool(false));
            for k in keys {
                let Value::String(k) = k else { continue };
                let mut m = base.clone();
                m.set_field(&field, Value::Map([(MapKey::String(k), value.clone())].into()));
                out.push(m);
            }
            let many = (0..1000).map(|i| (MapKey::String(format!("k{i}")), value.clone())).collect();
            let mut m = base.clone();
            m.set_field(&field, Value::Map(many));
            out.push(m);
            continue;
        }
        let values = edge_values(&field, nested_base.as_ref(), depth);
        if field.is_list() {
            for v in values.iter().take(12) {
                let mut m = base.clone();
                m.set_field(&field, Value::List(vec![v.clone()]));
                out.push(m);
            }
            if let Some(v) = values.first() {
                let mut m = base.clone();
                m.set_field(&field, Value::List(vec![v.clone(); 1000]));
                out.push(m);
            }
        } else {
            for v in values {
                let mut m = base.clone();
                m.set_field(&field, v);
                out.push(m);
            }
        }
    }
    out
}

/// An INVALID_ARGUMENT names its field: the message starts with a path
/// whose first part is a field of the request (or "request" itself).
fn names_a_field(desc: &MessageDescriptor, message: &str) -> bool {
    let head = message.split([' ', ':']).next().unwrap_or("");
    let first = head.split(['.', '[']).next().unwrap_or("");
    first == "request" || desc.get_field_by_name(first).is_some()
}

/// The set fields of a message, short: `spec{target{pid=1},duration{seconds=-1}}`.
fn describe(m: &DynamicMessage) -> String {
    let parts: Vec<String> = m
        .fields()
        .map(|(f, v)| match v {
            Value::Message(n) => format!("{}{{{}}}", f.name(), describe(n)),
            other => format!("{}={}", f.name(), chaos_proto::edge::one_line(&format!("{other:?}"), 60)),
        })
        .collect();
    parts.join(",")
}

#[derive(Default)]
struct Tally {
    calls: usize,
    by_code: BTreeMap<String, usize>,
    bad: Vec<String>,
}

impl Tally {
    fn record(&mut self, method: &MethodDescriptor, msg: &DynamicMessage, r: &Result<(), Status>) {
        self.calls += 1;
        let code = r.as_ref().err().map_or(Code::Ok, Status::code);
        *self.by_code.entry(format!("{code:?}")).or_default() += 1;
        let Err(s) = r else { return };
        let what = || format!("{}: {:?} {} (request {})", method.full_name(), s.code(), s.message(), describe(msg));
        match s.code() {
            Code::Internal | Code::Unknown | Code::Cancelled => self.bad.push(what()),
            Code::InvalidArgument if !names_a_field(&method.input(), s.message()) => self.bad.push(what()),
            Code::InvalidArgument | Code::FailedPrecondition if s.message().len() > 2000 => self.bad.push(what()),
            _ => {}
        }
    }
}

/// Base messages that pass the caller checks, so edges reach the handlers' own code.
fn base_of(method: &MethodDescriptor) -> DynamicMessage {
    let d = |s: u64| Some(chaos_proto::convert::duration_to_pb(Duration::from_secs(s)));
    let partition = pb::FaultSpec {
        target: Some(pb::Target { kind: Some(pb::target::Kind::Host(pb::HostTarget {})) }),
        duration: d(1),
        fault: Some(pb::fault_spec::Fault::NetworkPartition(pb::NetworkPartition::default())),
        ..Default::default()
    };
    let encoded: Option<Vec<u8>> = match method.input().full_name() {
        "chaos.v1.ApplyFaultRequest" => Some(pb::ApplyFaultRequest { spec: Some(partition.clone()) }.encode_to_vec()),
        "chaos.v1.RegisterAgentRequest" => Some(
            pb::RegisterAgentRequest {
                agent_id: "edge-agent".into(),
                address: "https://127.0.0.1:1".into(),
                lease_duration: d(10),
                instance_id: "edge-1".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        "chaos.v1.HeartbeatRequest" => {
            Some(pb::HeartbeatRequest { agent_id: "edge-agent".into(), instance_id: "edge-1".into(), ..Default::default() }.encode_to_vec())
        }
        "chaos.v1.CreateScenarioRequest" => Some(
            pb::CreateScenarioRequest {
                spec: Some(pb::ScenarioSpec {
                    fault: Some(partition),
                    selector: Some(pb::AgentSelector { agent_ids: vec!["edge-agent".into()], ..Default::default() }),
                    ..Default::default()
                }),
                dry_run: true,
            }
            .encode_to_vec(),
        ),
        "chaos.v1.ValidateRecoveryRequest" => Some(
            pb::ValidateRecoveryRequest {
                services: vec![pb::ServiceCheck { kind: pb::ServiceKind::Tcp as i32, address: "127.0.0.1:1".into(), ..Default::default() }],
                lag: Some(pb::LagCheck {
                    bootstrap: "127.0.0.1:1".into(),
                    group: "g".into(),
                    topic: "t".into(),
                    timeout: d(1),
                    ..Default::default()
                }),
                max_attempts: 1,
                retry_interval: d(1),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        "chaos.v1.ExperimentRun" => Some(
            pb::ExperimentRun { id: "edge-run".into(), experiment: "e".into(), verdict: "HELD".into(), ..Default::default() }
                .encode_to_vec(),
        ),
        _ => None,
    };
    match encoded {
        Some(b) => DynamicMessage::decode(method.input(), b.as_slice()).expect("base decodes"),
        None => DynamicMessage::new(method.input()),
    }
    .transcode_to_dynamic()
}

/// Drive every method of `service` with the edges; `channels` are tried in
/// order until one is not refused for its identity.
async fn drive(service: &str, channels: &[&Channel], tally: &mut Tally) {
    let svc = chaos_proto::edge::pool().get_service_by_name(service).expect("service in the contract");
    assert!(svc.methods().len() >= 7, "{service} has its methods");
    for method in svc.methods() {
        let base = base_of(&method);
        let mut messages = vec![DynamicMessage::new(method.input()), base.clone()];
        messages.extend(variants(&base, 0));
        // Garbage bytes too: not a message at all.
        let mut bodies: Vec<(DynamicMessage, Vec<u8>)> = messages.into_iter().map(|m| (m.clone(), m.encode_to_vec())).collect();
        bodies.push((DynamicMessage::new(method.input()), vec![0xff, 0xff, 0xff, 0x0f]));
        for (msg, body) in bodies {
            let mut r = Err(Status::permission_denied("no channel"));
            for ch in channels {
                r = call(ch, &method, body.clone()).await;
                if !matches!(&r, Err(s) if s.code() == Code::PermissionDenied && s.message().contains("role")) {
                    break;
                }
            }
            tally.record(&method, &msg, &r);
        }
    }
}

fn agent_in(pair: &NetPair, dir: &Path) -> (Daemon, PathBuf) {
    let sock = dir.join("edge-agent.sock");
    let args: Vec<String> = [
        "--listen",
        &format!("{}:{}", pair.a_ip, free_port()),
        "--journal-dir",
        &dir.join("journal").display().to_string(),
        "--agent-id",
        "edge-ns-agent",
        "--tls-dir",
        &pki().dir(Role::Agent, "edge-ns-agent").display().to_string(),
        "--local-socket",
        &sock.display().to_string(),
        "--max-fault-duration",
        "3s",
        "--docker-socket",
        &dir.join("no-docker.sock").display().to_string(),
    ]
    .map(String::from)
    .into();
    let d = Daemon::spawn_in_netns(&pair.a, "chaos-agent", &args, dir.join("agent.log"));
    assert!(wait_until(Duration::from_secs(10), || sock.exists()), "agent did not start:\n{}", d.log_text());
    (d, sock)
}

fn no_panic(what: &str, log: &str) {
    assert!(!log.contains("panicked at"), "{what} panicked:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_of_both_servers_survives_edge_values_and_names_what_it_refuses() {
    let dir = tempfile::tempdir().expect("dir");
    let pair = NetPair::new();
    let (agent, sock) = agent_in(&pair, dir.path());
    let local = chaos_proto::trust::local_channel(sock.clone(), Some(Duration::from_secs(10)));
    let (coordinator, curl) = start_coordinator(dir.path());
    let admin = chaos_e2e::coordinator_channel(&curl);
    let as_agent = chaos_e2e::channel_as(&curl, &pki().dir(Role::Agent, "edge-agent"), Expect::coordinator());

    let mut agent_tally = Tally::default();
    drive("chaos.v1.Agent", &[&local], &mut agent_tally).await;
    let mut coord_tally = Tally::default();
    drive("chaos.v1.Coordinator", &[&admin, &as_agent], &mut coord_tally).await;
    eprintln!(
        "agent: {} calls {:?}; coordinator: {} calls {:?}",
        agent_tally.calls, agent_tally.by_code, coord_tally.calls, coord_tally.by_code
    );

    // Both alive and answering after all of it.
    let mut client = pb::agent_client::AgentClient::new(local.clone());
    let reverted =
        client.revert_all(pb::RevertAllRequest { reason: "edge test done".into(), ..Default::default() }).await.expect("RevertAll");
    assert!(reverted.get_ref().failed.is_empty(), "{reverted:?}");
    let left = client.list_faults(pb::ListFaultsRequest { include_finished: false }).await.expect("ListFaults").into_inner().faults;
    assert!(left.is_empty(), "faults left: {left:?}");
    let mut coord = pb::coordinator_client::CoordinatorClient::new(admin.clone());
    coord.get_status(pb::GetStatusRequest {}).await.expect("coordinator still answers");

    // Nothing of ours left in the namespace.
    let rules = NetPair::ruleset(&pair.a);
    assert!(!rules.contains("chaos"), "nft tables left:\n{rules}");
    let raw = NetPair::raw_rules(&pair.a);
    assert!(!raw.contains("chaos") && !raw.contains("NFQUEUE"), "iptables rules left:\n{raw}");
    let qdiscs = String::from_utf8_lossy(&NetPair::exec(&pair.a, &["tc", "qdisc", "show"]).stdout).into_owned();
    assert!(!qdiscs.contains("htb") && !qdiscs.contains("ingress"), "qdiscs left:\n{qdiscs}");

    no_panic("the agent", &agent.log_text());
    no_panic("the coordinator", &coordinator.log_text());
    let bad: Vec<String> = agent_tally.bad.iter().chain(&coord_tally.bad).cloned().collect();
    assert!(
        bad.is_empty(),
        "{} answers broke the rules, first ones:\n{}",
        bad.len(),
        bad.iter().take(15).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        agent_tally.calls > 300 && coord_tally.calls > 1000,
        "too few calls to mean much: {} / {}",
        agent_tally.calls,
        coord_tally.calls
    );
}

fn refused(r: Result<impl std::fmt::Debug, Status>, code: Code, field: &str) -> String {
    let s = r.expect_err("must be refused");
    assert_eq!(s.code(), code, "{field}: {s:?}");
    assert!(s.message().starts_with(field), "the refusal names {field}: {}", s.message());
    assert!(s.message().len() < 600, "short: {} bytes", s.message().len());
    s.message().to_string()
}

fn far_future() -> Option<prost_types::Timestamp> {
    // Year 10000.
    Some(prost_types::Timestamp { seconds: 253_402_300_800, nanos: 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cases_found_by_hand_are_refused_or_answered() {
    let dir = tempfile::tempdir().expect("dir");
    let pair = NetPair::new();
    let (agent, sock) = agent_in(&pair, dir.path());
    let mut a = pb::agent_client::AgentClient::new(chaos_proto::trust::local_channel(sock, Some(Duration::from_secs(10))));
    let (coordinator, curl) = start_coordinator(dir.path());
    let mut admin = pb::coordinator_client::CoordinatorClient::new(chaos_e2e::coordinator_channel(&curl));
    let mut as_agent = pb::coordinator_client::CoordinatorClient::new(chaos_e2e::channel_as(
        &curl,
        &pki().dir(Role::Agent, "edge-agent"),
        Expect::coordinator(),
    ));
    let reg = |lease: prost_types::Duration| pb::RegisterAgentRequest {
        agent_id: "edge-agent".into(),
        address: "https://127.0.0.1:1".into(),
        lease_duration: Some(lease),
        instance_id: "edge-1".into(),
        ..Default::default()
    };

    // A lease beyond what a time can hold made every later EmergencyStop panic.
    refused(
        as_agent.register_agent(reg(prost_types::Duration { seconds: i64::MAX, nanos: 0 })).await,
        Code::InvalidArgument,
        "lease_duration",
    );
    refused(
        as_agent.register_agent(reg(prost_types::Duration { seconds: 1_000_000_000, nanos: 0 })).await,
        Code::InvalidArgument,
        "lease_duration",
    );
    as_agent.register_agent(reg(prost_types::Duration { seconds: 10, nanos: 0 })).await.expect("a sane lease");
    let stop =
        admin.emergency_stop(pb::EmergencyStopRequest { reason: "edge".into(), deadline: None }).await.expect("emergency stop answers");
    assert_eq!(stop.get_ref().agents_unreached, 1, "{stop:?}");
    admin.arm(pb::ArmRequest { reason: "edge".into() }).await.expect("arm");
    // A heartbeat's fault count is checked.
    let hb =
        pb::HeartbeatRequest { agent_id: "edge-agent".into(), active_faults: u32::MAX, instance_id: "edge-1".into(), ..Default::default() };
    refused(as_agent.heartbeat(hb).await, Code::InvalidArgument, "active_faults");
    // Ids and reasons with newlines never reach a log line.
    let mut forged = reg(prost_types::Duration { seconds: 10, nanos: 0 });
    forged.agent_id = "edge-agent\nINFO forged".into();
    refused(as_agent.register_agent(forged).await, Code::InvalidArgument, "agent_id");
    refused(
        admin.emergency_stop(pb::EmergencyStopRequest { reason: "x\r\nERROR forged".into(), deadline: None }).await,
        Code::InvalidArgument,
        "reason",
    );

    // Far-future timestamps panicked their handlers.
    refused(admin.list_audit(pb::ListAuditRequest { since: far_future(), limit: 0 }).await, Code::InvalidArgument, "since");
    let run = pb::ExperimentRun { id: "r".into(), verdict: "HELD".into(), started_at: far_future(), ..Default::default() };
    refused(admin.record_experiment_run(run).await, Code::InvalidArgument, "started_at");

    // ValidateRecovery: an enormous timeout, a topic Kafka would refuse.
    let lag = |timeout: i64, topic: &str| pb::ValidateRecoveryRequest {
        lag: Some(pb::LagCheck {
            bootstrap: "127.0.0.1:1".into(),
            group: "g".into(),
            topic: topic.into(),
            timeout: Some(prost_types::Duration { seconds: timeout, nanos: 0 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    refused(admin.validate_recovery(lag(i64::MAX, "t")).await, Code::InvalidArgument, "lag.timeout");
    refused(admin.validate_recovery(lag(30 * 24 * 3600, "t")).await, Code::InvalidArgument, "lag.timeout");
    refused(admin.validate_recovery(lag(1, &"t".repeat(250))).await, Code::InvalidArgument, "lag.topic");
    refused(admin.validate_recovery(lag(1, "a/b")).await, Code::InvalidArgument, "lag.topic");

    // Faults at the agent.
    let fault = |target: pb::target::Kind, f: pb::fault_spec::Fault, duration: prost_types::Duration| pb::ApplyFaultRequest {
        spec: Some(pb::FaultSpec {
            target: Some(pb::Target { kind: Some(target) }),
            duration: Some(duration),
            fault: Some(f),
            ..Default::default()
        }),
    };
    let host = || pb::target::Kind::Host(pb::HostTarget {});
    let secs = |s| prost_types::Duration { seconds: s, nanos: 0 };
    let partition = |scope: Option<pb::NetworkScope>| pb::fault_spec::Fault::NetworkPartition(pb::NetworkPartition { scope });
    refused(
        a.apply_fault(fault(pb::target::Kind::Netns("a\0b".into()), partition(None), secs(1))).await,
        Code::InvalidArgument,
        "spec.target.netns",
    );
    let bw = pb::fault_spec::Fault::NetworkBandwidth(pb::NetworkBandwidth { rate_bits_per_second: u64::MAX, ..Default::default() });
    refused(a.apply_fault(fault(host(), bw, secs(1))).await, Code::InvalidArgument, "spec.network_bandwidth.rate_bits_per_second");
    let io = pb::fault_spec::Fault::IoThrottle(pb::IoThrottle { read_bytes_per_second: u64::MAX, ..Default::default() });
    refused(
        a.apply_fault(fault(pb::target::Kind::CgroupPath("x".into()), io, secs(1))).await,
        Code::InvalidArgument,
        "spec.io_throttle.read_bytes_per_second",
    );
    let loss = pb::fault_spec::Fault::NetworkLoss(pb::NetworkLoss { percent: 5e-324, ..Default::default() });
    refused(a.apply_fault(fault(host(), loss, secs(1))).await, Code::InvalidArgument, "spec.network_loss.percent");
    refused(
        a.apply_fault(fault(host(), partition(None), prost_types::Duration { seconds: 1, nanos: 1_000_000_000 })).await,
        Code::InvalidArgument,
        "spec.duration",
    );
    // A 10 kB value: the refusal, not a header too big for the client.
    let m = refused(
        a.apply_fault(fault(pb::target::Kind::ProcessName("p".repeat(10_000)), partition(None), secs(1))).await,
        Code::InvalidArgument,
        "spec.target.process_name",
    );
    assert!(m.contains("10000 bytes"), "{m}");
    // An ingress fault on an interface that does not exist did nothing, silently.
    let ingress = pb::NetworkScope { interface: "nosuch0".into(), direction: pb::Direction::Ingress as i32, ..Default::default() };
    let m = refused(a.apply_fault(fault(host(), partition(Some(ingress)), secs(2))).await, Code::NotFound, "target not found");
    assert!(m.contains("nosuch0"), "{m}");
    assert!(a.list_faults(pb::ListFaultsRequest { include_finished: false }).await.expect("list").into_inner().faults.is_empty());

    // Files: an alias bomb and a file that is not UTF-8, refused fast with where.
    let bomb = dir.path().join("bomb.yaml");
    let mut text = format!("version: 1\nname: bomb\nx: &big \"{}\"\nmethod:\n", "b".repeat(500_000));
    for _ in 0..200 {
        text.push_str("  - *big\n");
    }
    std::fs::write(&bomb, text).expect("write");
    let out = chaos_e2e::chaos(&["--coordinator", &curl, "run", "--dry-run", &bomb.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bomb.yaml:") && err.contains("alias bomb") && err.len() < 1000, "{err}");
    let latin = dir.path().join("latin1.yaml");
    std::fs::write(&latin, b"version: 1\nname: caf\xe9\n").expect("write");
    let out = chaos_e2e::chaos(&["--coordinator", &curl, "run", "--dry-run", &latin.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && err.contains("latin1.yaml:2:10: not UTF-8 text (invalid byte 0xe9 at byte offset 20)"),
        "{err}"
    );

    no_panic("the agent", &agent.log_text());
    no_panic("the coordinator", &coordinator.log_text());
}
