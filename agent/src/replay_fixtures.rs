//! Every format-1 journal fixture (`tests/fixtures/journal-v1`) is reverted
//! by the journal replay at start, as after an upgrade, against recording
//! fakes only: the process table, the network tools (`FakeExec`), a cgroup v1
//! tree in a tempdir, and a Docker Engine API on a Unix socket in the tempdir
//! that knows the stopped container. The test checks what each revert did.
//!
//! One revert does touch the real filesystem. The disk fill's plan names its
//! fill file by absolute path (`/tmp/chaos-fixture-disk-fill/...`) and there is
//! no root to inject, so the revert tries to remove that path. The test requires
//! the path to be absent first, so the revert only finds the file gone.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use chaos_proto::pb::{FaultState, RevertReason};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    faults::{
        Drivers, Plan,
        container::ContainerDriver,
        network::{Exemptions, NetnsRef, NetworkDriver},
        process::ProcessDriver,
        resource::ResourceDriver,
    },
    journal::{DirJournal, JournalRecord, decode},
    lifecycle::{Lifecycle, LifecycleConfig, ReplayReport},
    protect::Protection,
    sys::{
        Signals,
        cgroup::CgroupFs,
        fake::FakeProcs,
        netexec::{CmdOutput, FakeExec},
    },
};

fn fixtures_dir() -> PathBuf {
    fixtures_of(1)
}

fn fixtures_of(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/journal-v{version}"))
}

/// The fixture record of fault `id`.
fn fixture(id: &str) -> JournalRecord {
    fixture_of(1, id)
}

fn fixture_of(version: u32, id: &str) -> JournalRecord {
    let path = fixtures_of(version).join(format!("{id}.json"));
    decode(&fs::read(&path).expect("fixture")).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
}

/// The namespace a network fixture's plan names.
fn ns_of(id: &str) -> NetnsRef {
    match fixture(id).plan {
        Plan::Network(p) => p.ns,
        Plan::Latency(p) => p.ns,
        Plan::Bandwidth(p) => p.ns,
        other => panic!("{id} is not a network plan: {other:?}"),
    }
}

fn write(p: &Path, text: &str) {
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, text).expect("write");
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ok(stdout: &str) -> CmdOutput {
    CmdOutput { success: true, stdout: stdout.into(), stderr: String::new() }
}

/// A cgroup v1 tree as the crashed agent left it: each knob still holds what its fault set,
/// the stress fault's own cgroups are still there, the freeze cgroup is still FROZEN.
fn leftover_cgroups(root: &Path) {
    write(&root.join("cpu/chaos-fixture-cpu-throttle/cpu.cfs_quota_us"), "20000\n");
    write(&root.join("cpu/chaos-fixture-cpu-throttle/cpu.cfs_period_us"), "100000\n");
    fs::create_dir_all(root.join("cpu/chaos-fixture-cpu-stress")).expect("mkdir");
    fs::create_dir_all(root.join("cpuacct/chaos-fixture-cpu-stress")).expect("mkdir");
    write(&root.join("memory/chaos-fixture-memory-limit/memory.limit_in_bytes"), "268435456\n");
    write(&root.join("freezer/chaos-fixture-freeze/freezer.state"), "FROZEN\n");
    write(&root.join("blkio/chaos-fixture-io-throttle/blkio.throttle.read_bps_device"), "254:0 1048576\n");
    write(&root.join("blkio/chaos-fixture-io-throttle/blkio.throttle.write_bps_device"), "254:0 1048576\n");
}

/// A Docker Engine API on `socket` that knows one exited container and
/// records every request as "METHOD PATH" (API version prefix and query dropped).
fn fake_docker(socket: &Path, id: String, name: String) -> Arc<Mutex<Vec<String>>> {
    let listener = tokio::net::UnixListener::bind(socket).expect("bind the fake Docker socket");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            // One request per connection: each answer says `Connection: close`.
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let mut words = head.split_whitespace();
            let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
            let target = target.split('?').next().unwrap_or_default();
            let path = match target.strip_prefix("/v").and_then(|r| r.split_once('/')) {
                Some((v, rest)) if v.contains('.') => format!("/{rest}"),
                _ => target.to_string(),
            };
            log.lock().expect("log").push(format!("{method} {path}"));
            let inspect = format!("/containers/{id}/json");
            let start = format!("/containers/{id}/start");
            let (status, body) = match (method, path.as_str()) {
                ("GET", "/version") => ("200 OK", r#"{"Version":"20.10.24","ApiVersion":"1.41"}"#.to_string()),
                ("GET", p) if p == inspect => (
                    "200 OK",
                    format!(r#"{{"Id":"{id}","Name":"/{name}","State":{{"Running":false,"Paused":false,"Pid":0,"Status":"exited"}}}}"#),
                ),
                ("POST", p) if p == start => ("204 No Content", String::new()),
                (_, p) => ("404 Not Found", format!(r#"{{"message":"no such object: {p}"}}"#)),
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    });
    seen
}

/// The commands run in one namespace (`None`: the agent's own), each joined by spaces.
fn commands_in(exec: &FakeExec, ns: Option<&Path>) -> Vec<String> {
    let line = |c: &crate::sys::netexec::Call| match &c.stdin {
        Some(script) => format!("{} <<< {}", c.argv.join(" "), script.trim().replace('\n', "; ")),
        None => c.argv.join(" "),
    };
    exec.calls().iter().filter(|c| c.ns.as_deref() == ns).map(line).collect()
}

#[tokio::test]
async fn every_format_1_fixture_is_reverted_by_journal_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal_dir = dir.path().join("journal");
    fs::create_dir(&journal_dir).expect("mkdir");
    let mut copied = 0;
    for e in fs::read_dir(fixtures_dir()).expect("fixtures") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "json") {
            fs::copy(&p, journal_dir.join(p.file_name().expect("name"))).expect("copy");
            copied += 1;
        }
    }
    assert_eq!(copied, 11, "one record of each kind of plan (see journal::tests::format_1_fixtures_decode)");

    // Processes: the paused `sleep` of fixture-pause is still stopped.
    let procs = FakeProcs::default();
    procs.spawn(10, "sleep", 100);
    procs.signal_if_same(10, 100, Signal::SIGSTOP).expect("stop");

    // Network: both namespaces still exist, with the identity their plans recorded.
    let exec = FakeExec::default();
    let (lat_ns, bw_ns) = (ns_of("fixture-latency"), ns_of("fixture-bandwidth"));
    for ns in [&lat_ns, &bw_ns] {
        exec.add_namespace(ns.path.clone().expect("a named netns"), ns.id.expect("its identity"));
    }
    // The fault was ingress only: its OUTPUT chain was never created.
    exec.answer(
        "CHAOS-fixturelatency-O",
        CmdOutput { success: false, stdout: String::new(), stderr: "iptables: No chain/target/match by that name.".into() },
    );
    exec.answer("iptables -w -t raw -S", ok("-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n"));
    exec.answer(
        "tc filter show dev chfx0 ingress",
        ok("filter parent ffff: protocol all pref 1 u32 chain 0 \n\taction order 1: mirred (Egress Redirect to device chxa3bai0) stolen\n"),
    );
    let htb = "qdisc htb a3ba: root refcnt 3 r2q 10 default 0 direct_packets_stat 1 direct_qlen 1000\n";
    exec.answer_in_turn(
        "tc qdisc show dev chfx0",
        vec![ok(&format!("{htb}qdisc ingress ffff: parent ffff:fff1 ---------------- \n")), ok(htb)],
    );

    // Resources: a cgroup v1 tree in the tempdir, an empty /proc (no stress worker left).
    let cg = dir.path().join("cgroup");
    leftover_cgroups(&cg);
    let fill = match &fixture("fixture-disk-fill").plan {
        Plan::Resource(r) => match &**r {
            crate::faults::resource::ResourcePlan::DiskFill { file, .. } => file.clone(),
            other => panic!("not a disk fill: {other:?}"),
        },
        other => panic!("not a resource plan: {other:?}"),
    };
    assert!(!fill.exists(), "{} exists on this host: the replay below would remove it", fill.display());

    // Containers: the stopped container, as its daemon reports it.
    let stop = fixture("fixture-container-stop");
    let Plan::Container(cp) = &stop.plan else { panic!("not a container plan: {:?}", stop.plan) };
    let web = cp.containers[0].clone();
    let socket = dir.path().join("docker.sock");
    let docker = fake_docker(&socket, web.id.clone(), web.name.clone());

    let prot = Arc::new(Protection::new(4242, vec![], vec![]));
    let drivers = Arc::new(Drivers {
        process: ProcessDriver::new(Arc::new(procs.clone()), Arc::new(procs.clone()), prot.clone()),
        network: NetworkDriver::new(Arc::new(exec.clone()), Arc::new(procs.clone()), Exemptions::default()),
        resource: ResourceDriver::new(
            CgroupFs::detect(&cg).map_err(|e| e.to_string()),
            Arc::new(procs.clone()),
            prot.clone(),
            "/nonexistent".into(),
            Default::default(),
        )
        .with_roots(dir.path().join("proc"), dir.path().join("blk")),
        container: ContainerDriver::new(socket, prot),
    });
    let journal = DirJournal::open(&journal_dir).expect("open the journal");
    let (lc, _task, report) =
        tokio::time::timeout(Duration::from_secs(30), Lifecycle::start(LifecycleConfig::default(), drivers, Arc::new(journal)))
            .await
            .expect("replay finished")
            .expect("start");

    assert_eq!(report, ReplayReport { reverted: 11, failed: 0, corrupt: 0 });
    let left: Vec<String> =
        fs::read_dir(&journal_dir).expect("read").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec![".lock".to_string()], "every record removed once reverted");
    let hist = lc.list(true).await.expect("list");
    let summaries: BTreeMap<&str, &str> = hist.iter().map(|f| (f.id.as_str(), f.revert_summary.as_str())).collect();
    assert_eq!(summaries.len(), 11, "{summaries:#?}");
    for f in &hist {
        assert_eq!(FaultState::try_from(f.state), Ok(FaultState::Reverted), "{}", f.id);
        assert_eq!(f.revert_reason, RevertReason::JournalReplay as i32, "{}", f.id);
        // Format 1 kept no reading of the state before: nothing to compare with, and it says so.
        assert_eq!(f.revert_check, chaos_proto::pb::RevertCheck::NotCompared as i32, "{}", f.id);
        assert!(f.revert_check_detail.contains("older agent"), "{}: {}", f.id, f.revert_check_detail);
    }

    // Process pause: SIGCONT to the same process (pid and start time); nothing else signalled.
    assert_eq!(procs.sent(), vec![(10, Signal::SIGSTOP), (10, Signal::SIGCONT)]);
    assert_eq!(procs.state(10), Some('S'));

    // Partition (host namespace): both of its nft tables deleted by name.
    assert_eq!(
        commands_in(&exec, None),
        vec!["nft -f - <<< delete table inet chaos_fixture_partition; delete table netdev chaos_fixture_partition_eg"]
    );
    // Latency: the PREROUTING jump, then its chain flushed and removed; the OUTPUT leg tried
    // (it never existed); `table ip raw` deleted because the fault had created it.
    assert_eq!(
        commands_in(&exec, lat_ns.path.as_deref()),
        vec![
            "iptables -w -t raw -D PREROUTING ! -i lo -j CHAOS-fixturelatency-I",
            "iptables -w -t raw -F CHAOS-fixturelatency-I",
            "iptables -w -t raw -X CHAOS-fixturelatency-I",
            "iptables -w -t raw -D OUTPUT ! -o lo -j CHAOS-fixturelatency-O",
            "iptables -w -t raw -F CHAOS-fixturelatency-O",
            "iptables -w -t raw -X CHAOS-fixturelatency-O",
            "iptables -w -t raw -S",
            "nft -f - <<< delete table ip raw",
        ]
    );
    // Bandwidth: the ingress redirect and the ifb go first, then the htb root that carries the fault's handle.
    assert_eq!(
        commands_in(&exec, bw_ns.path.as_deref()),
        vec![
            "tc filter show dev chfx0 ingress",
            "tc qdisc show dev chfx0",
            "tc qdisc del dev chfx0 ingress",
            "ip link del chxa3bai0",
            "tc qdisc show dev chfx0",
            "tc qdisc del dev chfx0 root handle a3ba:",
        ]
    );
    assert!(summaries["fixture-bandwidth"].contains("chfx0 ingress restored, chxa3bai0 removed, chfx0 restored"), "{summaries:#?}");

    // Resources: every knob holds what was there before the fault.
    assert_eq!(read(&cg.join("cpu/chaos-fixture-cpu-throttle/cpu.cfs_quota_us")), "-1", "unlimited again");
    assert_eq!(read(&cg.join("cpu/chaos-fixture-cpu-throttle/cpu.cfs_period_us")), "100000");
    assert_eq!(read(&cg.join("memory/chaos-fixture-memory-limit/memory.limit_in_bytes")), "-1", "unlimited again");
    assert_eq!(read(&cg.join("freezer/chaos-fixture-freeze/freezer.state")), "THAWED");
    assert_eq!(read(&cg.join("blkio/chaos-fixture-io-throttle/blkio.throttle.read_bps_device")), "254:0 0", "0 removes a v1 rule");
    assert_eq!(read(&cg.join("blkio/chaos-fixture-io-throttle/blkio.throttle.write_bps_device")), "254:0 0");
    for c in ["cpu", "cpuacct"] {
        assert!(!cg.join(c).join("chaos-fixture-cpu-stress").exists(), "the stress fault's own {c} cgroup removed");
    }
    assert_eq!(
        summaries["fixture-cpu-stress"],
        "no worker left running; removed cgroup cpu:/chaos-fixture-cpu-stress; removed cgroup cpuacct:/chaos-fixture-cpu-stress"
    );
    assert_eq!(summaries["fixture-disk-fill"], format!("{} already gone", fill.display()), "its target is gone: still reverted");

    // Container stop: started again through the Docker API, nothing else changed.
    let requests = docker.lock().expect("log").clone();
    let changes: Vec<&String> = requests.iter().filter(|r| !r.starts_with("GET ")).collect();
    assert_eq!(changes, vec![&format!("POST /containers/{}/start", web.id)], "{requests:#?}");
    assert_eq!(summaries["fixture-container-stop"], "start chaos-fixture-web");
}

/// The current format (2, with the state read before apply), as this agent
/// wrote it for a pause and a partition in a named namespace: replayed, each
/// revert is read again and compared with what the record holds.
#[tokio::test]
async fn current_format_fixtures_are_reverted_and_verified_by_journal_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal_dir = dir.path().join("journal");
    fs::create_dir(&journal_dir).expect("mkdir");
    for id in ["fixture-pause", "fixture-partition"] {
        let rec = fixture_of(crate::journal::JOURNAL_VERSION, id);
        assert_eq!(rec.version, crate::journal::JOURNAL_VERSION);
        assert!(matches!(rec.before, Some(crate::faults::Before::Read(_))), "{id} carries its reading: {:?}", rec.before);
        fs::copy(fixtures_of(crate::journal::JOURNAL_VERSION).join(format!("{id}.json")), journal_dir.join(format!("{id}.json")))
            .expect("copy");
    }
    let pause = fixture_of(crate::journal::JOURNAL_VERSION, "fixture-pause");
    let Plan::Process(pp) = &pause.plan else { panic!("not a pause: {:?}", pause.plan) };
    let p = pp.processes[0].clone();
    let procs = FakeProcs::default();
    procs.spawn(p.pid, &p.name, p.start_time_ticks);
    procs.signal_if_same(p.pid, p.start_time_ticks, Signal::SIGSTOP).expect("stop");
    let exec = FakeExec::default();
    let partition = fixture_of(crate::journal::JOURNAL_VERSION, "fixture-partition");
    let Plan::Network(np) = &partition.plan else { panic!("not a partition: {:?}", partition.plan) };
    let ns_path = np.ns.path.clone().expect("a named netns");
    exec.add_namespace(ns_path.clone(), np.ns.id.expect("its identity"));
    // Read after the revert: none of the fault's tables, as the record's reading before apply.
    exec.answer("nft list tables", ok("table ip nat\n"));
    let prot = Arc::new(Protection::new(4242, vec![], vec![]));
    let drivers = Arc::new(Drivers {
        process: ProcessDriver::new(Arc::new(procs.clone()), Arc::new(procs.clone()), prot.clone()),
        network: NetworkDriver::new(Arc::new(exec.clone()), Arc::new(procs.clone()), Exemptions::default()),
        resource: ResourceDriver::new(
            Err("no cgroups here".into()),
            Arc::new(procs.clone()),
            prot.clone(),
            "/nonexistent".into(),
            Default::default(),
        ),
        container: ContainerDriver::new(dir.path().join("no-docker.sock"), prot),
    });
    let journal = DirJournal::open(&journal_dir).expect("open the journal");
    let (lc, _task, report) = Lifecycle::start(LifecycleConfig::default(), drivers, Arc::new(journal)).await.expect("start");
    assert_eq!(report, ReplayReport { reverted: 2, failed: 0, corrupt: 0 });
    assert_eq!(procs.state(p.pid), Some('S'), "resumed");
    assert_eq!(
        commands_in(&exec, Some(&ns_path)).into_iter().filter(|c| c.contains("delete")).collect::<Vec<_>>(),
        vec!["nft -f - <<< delete table inet chaos_fixture_partition_v2; delete table netdev chaos_fixture_partition_v2_eg"]
    );
    let hist = lc.list(true).await.expect("list");
    let checks: BTreeMap<&str, (i32, &str)> =
        hist.iter().map(|f| (f.id.as_str(), (f.revert_check, f.revert_check_detail.as_str()))).collect();
    let verified = chaos_proto::pb::RevertCheck::Verified as i32;
    assert_eq!(
        checks,
        [
            ("fixture-pause-v2", (verified, "host state as before (1 item read)")),
            ("fixture-partition-v2", (verified, "host state as before (2 items read)")),
        ]
        .into()
    );
}
