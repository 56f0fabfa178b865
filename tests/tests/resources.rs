//! Resource faults end to end, through the real agent and CLI, measured on
//! the kernel's own counters: CPU stress (host and inside a quota), CPU
//! throttle, memory stress with an OOM kill reported, memory limit, disk
//! fill on a tmpfs made for the test, IO throttle, cgroup freeze, a kill
//! watched for its supervisor's restart, and revert after `kill -9` of the
//! agent. Every cgroup, mount and process is removed by a guard.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use chaos_e2e::{TestCgroup, chaos_ok, free_port, json, start_agent, start_agent_at, stress_workers, wait_until};

/// The fault as `chaos agent faults -o json` lists it.
fn listed(url: &str, id: &str) -> serde_json::Value {
    let all = json(&chaos_ok(&["-o", "json", "agent", "faults", "--agent", url, "--all"], 0));
    all["faults"].as_array().into_iter().flatten().rev().find(|f| f["id"] == id).cloned().unwrap_or_default()
}

fn achieved(f: &serde_json::Value, key: &str) -> Option<f64> {
    f["achieved"][key].as_f64()
}

/// A cgroup of the fault's own, for v1 controller `ctrl`.
fn own_cgroup(ctrl: &str, id: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() { root.join(format!("chaos-{id}")) } else { root.join(ctrl).join(format!("chaos-{id}")) }
}

fn uniq(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

#[test]
fn cpu_stress_reaches_its_load_on_the_host_and_stays_inside_a_target_quota() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "cpu", None, "10s");
    let id = uniq("cpu50");
    let out = json(&chaos_ok(&["-o", "json", "agent", "apply", "--agent", &url, "--cpu", "50%", "--duration", "60s", "--id", &id], 0));
    assert_eq!(out["state"], "APPLIED", "{out}");
    // Ground truth: the fault's own cgroup's usage counter.
    let acct = own_cgroup("cpuacct", &id);
    let usage = || {
        let f = if acct.join("cpuacct.usage").exists() { "cpuacct.usage" } else { "cpu.stat" };
        let t = std::fs::read_to_string(acct.join(f)).unwrap_or_default();
        t.trim()
            .parse::<u64>()
            .ok()
            .or_else(|| t.lines().find_map(|l| l.strip_prefix("usage_usec ")?.parse::<u64>().ok().map(|u| u * 1000)))
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_millis(500));
    let load = chaos_e2e::cpu_percent_of(usage, Duration::from_secs(2));
    assert!((42.0..=58.0).contains(&load), "cgroup measured {load:.1} % for a 50 % stress");
    let f = listed(&url, &id);
    let reported = achieved(&f, "cpu_load_percent").expect("achieved cpu_load_percent");
    assert!((42.0..=58.0).contains(&reported), "agent reports {reported:.1} %: {f}");
    assert_eq!(stress_workers(&id).len(), 1);
    let r = chaos_e2e::revert_verified(&url, &id);
    assert!(r["revert_summary"].as_str().is_some_and(|s| s.contains("removed cgroup")), "{r}");
    assert!(stress_workers(&id).is_empty(), "worker left running");
    assert!(!acct.exists(), "the fault's cgroup is left behind");

    // Inside a cgroup capped at 20 % of a core, an 80 % stress gets 20 %.
    let cg = TestCgroup::new("cpuq", &["cpu", "cpuacct"]);
    if cg.is_v2() {
        cg.write("cpu", "cpu.max", "20000 100000");
    } else {
        cg.write("cpu", "cpu.cfs_quota_us", "20000");
    }
    let id = uniq("cpuin");
    chaos_ok(&["agent", "apply", "--agent", &url, "--cpu", "80%", "--cgroup", &cg.path, "--duration", "60s", "--id", &id], 0);
    std::thread::sleep(Duration::from_millis(500));
    let load = cg.cpu_percent(Duration::from_secs(2));
    assert!((15.0..=23.0).contains(&load), "the target cgroup measured {load:.1} % under its 20 % quota");
    chaos_ok(&["agent", "revert", "--agent", &url, &id], 0);
    assert!(stress_workers(&id).is_empty());
}

#[test]
fn cpu_throttle_and_memory_limit_bite_and_restore_the_exact_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "knobs", None, "10s");
    let cg = TestCgroup::new("knobs", &["cpu", "cpuacct", "memory"]);
    let (quota_file, mem_file) = if cg.is_v2() { ("cpu.max", "memory.max") } else { ("cpu.cfs_quota_us", "memory.limit_in_bytes") };
    let (quota_before, mem_before) = (cg.read("cpu", quota_file), cg.read("memory", mem_file));
    let mut burner = cg.spawn_sh("ulimit -t 60 && while :; do :; done");
    std::thread::sleep(Duration::from_millis(300));
    let free = cg.cpu_percent(Duration::from_secs(1));
    assert!(free > 60.0, "the burner should use most of a core before the throttle: {free:.1} %");

    let id = uniq("thr");
    let out = json(&chaos_ok(
        &["-o", "json", "agent", "apply", "--agent", &url, "--cpu-quota", "20%", "--cgroup", &cg.path, "--duration", "60s", "--id", &id],
        0,
    ));
    let want = if cg.is_v2() { "20000 100000" } else { "20000" };
    assert_eq!(cg.read("cpu", quota_file), want, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let throttled = cg.cpu_percent(Duration::from_secs(2));
    assert!((15.0..=23.0).contains(&throttled), "burner under a 20 % quota measured {throttled:.1} %");
    chaos_e2e::revert_verified(&url, &id);
    assert_eq!(cg.read("cpu", quota_file), quota_before, "CPU quota restored exactly");
    let id = uniq("thr2");
    chaos_ok(&["agent", "apply", "--agent", &url, "--cpu-quota", "20%", "--cgroup", &cg.path, "--duration", "60s", "--id", &id], 0);

    let mid = uniq("lim");
    chaos_ok(&["agent", "apply", "--agent", &url, "--memory-limit", "64MiB", "--cgroup", &cg.path, "--duration", "60s", "--id", &mid], 0);
    assert_eq!(cg.read("memory", mem_file), "67108864");

    chaos_ok(&["agent", "revert-all", "--agent", &url], 0);
    assert_eq!(cg.read("cpu", quota_file), quota_before, "CPU quota restored exactly");
    assert_eq!(cg.read("memory", mem_file), mem_before, "memory limit restored exactly");
    let _ = burner.kill();
    let _ = burner.wait();

    // The root cgroup is never changed.
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--cpu-quota", "20%", "--cgroup", "/", "--duration", "10s"], 3);
    assert!(e.contains("root"), "{e}");
}

#[test]
fn memory_stress_holds_its_bytes_and_an_oom_kill_of_the_worker_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "mem", None, "10s");
    let id = uniq("mem256");
    let out =
        json(&chaos_ok(&["-o", "json", "agent", "apply", "--agent", &url, "--memory", "256MiB", "--duration", "60s", "--id", &id], 0));
    let rss = achieved(&out, "resident_bytes").expect("resident_bytes");
    assert!(rss >= 256.0 * 1048576.0, "resident {rss} after apply: {out}");
    let charged: f64 =
        std::fs::read_to_string(own_cgroup("memory", &id).join(if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        }))
        .expect("the fault's memory cgroup")
        .trim()
        .parse()
        .expect("number");
    assert!(charged >= 256.0 * 1048576.0, "charged to the fault's cgroup: {charged}");
    chaos_ok(&["agent", "revert", "--agent", &url, &id], 0);
    assert!(!own_cgroup("memory", &id).exists());

    // A worker in a 100 MiB cgroup holds 60 MiB; the service under test then
    // needs 60 MiB too: the kernel kills the worker (oom_score_adj 1000),
    // not the service, and the fault says so.
    let cg = TestCgroup::new("oom", &["memory"]);
    cg.write("memory", if cg.is_v2() { "memory.max" } else { "memory.limit_in_bytes" }, "104857600");
    let id = uniq("oom");
    chaos_ok(&["agent", "apply", "--agent", &url, "--memory", "60MiB", "--cgroup", &cg.path, "--duration", "60s", "--id", &id], 0);
    let mut service = cg.spawn_sh("head -c 62914560 /dev/zero | tail -c 62914560 > /dev/null; sleep 30");
    assert!(
        wait_until(Duration::from_secs(15), || listed(&url, &id)["outcome"].as_str().is_some_and(|o| o.contains("OOM-killed"))),
        "no OOM outcome: {}",
        listed(&url, &id)
    );
    assert!(service.try_wait().expect("wait").is_none(), "the service under test must survive");
    let r = chaos_ok(&["agent", "revert", "--agent", &url, &id], 0);
    assert!(r.contains("OOM-killed"), "{r}");
    let _ = service.kill();
    let _ = service.wait();
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let d = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(d.path()).status().expect("mount");
        assert!(ok.success(), "mount tmpfs");
        Tmpfs(d)
    }
    fn used_percent(&self) -> f64 {
        let s = nix::sys::statvfs::statvfs(self.0.path()).expect("statvfs");
        let used = (s.blocks() - s.blocks_free()) as f64;
        used * 100.0 / (used + s.blocks_available() as f64)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn disk_fill_reaches_its_percent_within_the_cap_and_removes_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "disk", None, "10s");
    let fs = Tmpfs::new("64m");
    let path = fs.0.path().display().to_string();
    let id = uniq("fill");
    let out = json(&chaos_ok(
        &["-o", "json", "agent", "apply", "--agent", &url, "--fill-disk", &path, "--to", "50%", "--duration", "60s", "--id", &id],
        0,
    ));
    let df = fs.used_percent();
    assert!((49.0..=51.0).contains(&df), "df says {df:.1} % after a fill to 50 %: {out}");
    assert!((achieved(&out, "filled_percent").expect("filled_percent") - df).abs() < 1.0, "{out}");
    let file = fs.0.path().join(format!(".chaos-fill-{id}"));
    assert!(file.exists());
    // Beyond the agent's cap (95 %), and a fill that would pass it, are refused.
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--fill-disk", &path, "--to", "99%", "--duration", "10s"], 2);
    assert!(e.contains("spec.disk_fill.fill_to_percent"), "{e}");
    let e = chaos_ok(&["agent", "apply", "--agent", &url, "--fill-disk", &path, "--fill-bytes", "40MiB", "--duration", "10s"], 3);
    assert!(e.contains("disk_fill_max_percent"), "{e}");
    chaos_ok(&["agent", "revert", "--agent", &url, &id], 0);
    assert!(!file.exists(), "fill file left behind");
    assert!(fs.used_percent() < 1.0);
}

/// `dd` of `mib` MiB with direct IO inside the cgroup; returns MB/s.
fn dd_rate(cg: &TestCgroup, file: &Path, mib: u32) -> f64 {
    let mut c = cg.spawn_sh(&format!("dd if=/dev/zero of={} bs=1M count={mib} oflag=direct 2>/dev/null", file.display()));
    let t = std::time::Instant::now();
    let ok = c.wait().expect("dd").success();
    assert!(ok, "dd failed");
    f64::from(mib) * 1.048576 / t.elapsed().as_secs_f64()
}

#[test]
fn io_throttle_caps_writes_and_restores() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir on the root disk");
    let (_agent, url) = start_agent(dir.path(), "io", None, "10s");
    let cg = TestCgroup::new("io", &["blkio"]);
    let id = uniq("io");
    let out = json(&chaos_ok(
        &[
            "-o",
            "json",
            "agent",
            "apply",
            "--agent",
            &url,
            "--io-limit",
            "5MB/s",
            "--io-direction",
            "write",
            "--cgroup",
            &cg.path,
            "--duration",
            "60s",
            "--id",
            &id,
        ],
        0,
    ));
    let rule = if cg.is_v2() { cg.read("blkio", "io.max") } else { cg.read("blkio", "blkio.throttle.write_bps_device") };
    assert!(rule.contains("5000000"), "{rule}: {out}");
    let rate = dd_rate(&cg, &dir.path().join("io-probe"), 15);
    assert!(rate < 6.5, "direct writes at {rate:.1} MB/s under a 5 MB/s limit");
    chaos_ok(&["agent", "revert", "--agent", &url, &id], 0);
    let rule = if cg.is_v2() { cg.read("blkio", "io.max") } else { cg.read("blkio", "blkio.throttle.write_bps_device") };
    assert!(!rule.contains("5000000"), "limit left behind: {rule}");
}

#[test]
fn freeze_hangs_a_cgroup_and_revert_thaws_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "freeze", None, "10s");
    let cg = TestCgroup::new("frz", &["freezer"]);
    let counter = dir.path().join("ticks");
    let mut ticker = cg.spawn_sh(&format!("i=0; while [ $i -lt 600 ]; do i=$((i+1)); echo $i > {}; sleep 0.05; done", counter.display()));
    let read = || std::fs::read_to_string(&counter).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(5), || !read().is_empty()));
    let id = uniq("frz");
    let out = chaos_ok(&["agent", "apply", "--agent", &url, "--freeze-cgroup", &cg.path, "--duration", "60s", "--id", &id], 0);
    assert!(out.contains("frozen (verified)"), "{out}");
    let at = read();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(read(), at, "a frozen process kept running");
    chaos_ok(&["agent", "revert", "--agent", &url, &id], 0);
    assert!(wait_until(Duration::from_secs(3), || read() != at), "not thawed");
    let _ = ticker.kill();
    let _ = ticker.wait();
}

#[test]
fn pause_by_cgroup_stops_every_process_in_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "pcg", None, "10s");
    let cg = TestCgroup::new("pcg", &["freezer"]);
    let mut a = cg.spawn_sh("exec sleep 60");
    let mut b = cg.spawn_sh("exec sleep 60");
    let pids = || chaos_e2e::proc_pids_in(&cg.dir("freezer"));
    assert!(wait_until(Duration::from_secs(5), || pids().len() == 2));
    let out = json(&chaos_ok(
        &["-o", "json", "agent", "apply", "--agent", &url, "--pause-cgroup", &cg.path, "--duration", "60s", "--id", "pcg"],
        0,
    ));
    assert_eq!(out["processes"].as_array().map(Vec::len), Some(2), "{out}");
    assert!(pids().iter().all(|p| chaos_e2e::proc_state(*p) == Some('T')));
    chaos_ok(&["agent", "revert", "--agent", &url, "pcg"], 0);
    assert!(pids().iter().all(|p| chaos_e2e::proc_state(*p) != Some('T')));
    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn a_kill_is_watched_for_its_supervisor_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, url) = start_agent(dir.path(), "kw", None, "10s");
    let name = format!("kw{}", std::process::id() % 1_000_000);
    let exe = dir.path().join(&name);
    std::fs::copy("/bin/sleep", &exe).expect("copy sleep");
    // A supervisor that restarts the service 300 ms after it dies (bounded: 20 restarts).
    let cg = TestCgroup::new("kw", &["freezer"]);
    let mut sup = cg.spawn_sh(&format!("n=0; while [ $n -lt 20 ]; do n=$((n+1)); {} 60; sleep 0.3; done", exe.display()));
    assert!(wait_until(Duration::from_secs(5), || chaos_e2e::proc_pids_named(&name).len() == 1));
    let id = uniq("kw");
    chaos_ok(&["agent", "apply", "--agent", &url, "--kill-name", &name, "--duration", "30s", "--id", &id], 0);
    assert!(
        wait_until(Duration::from_secs(5), || listed(&url, &id)["outcome"].as_str().is_some_and(|o| o.contains("restarted as pid"))),
        "{}",
        listed(&url, &id)
    );
    let after = achieved(&listed(&url, &id), "restarted_after_ms").expect("restarted_after_ms");
    assert!((200.0..=2000.0).contains(&after), "restart seen {after} ms after the kill (supervisor waits 300 ms)");
    let _ = sup.kill();
    let _ = sup.wait();
}

#[test]
fn kill_9_of_the_agent_stops_workers_and_restart_restores_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let journal = dir.path().join("journal-k9");
    let (mut agent, url) = start_agent_at(dir.path(), "k9", port, &journal, None, "10s", &[]);
    let cg = TestCgroup::new("k9", &["cpu", "cpuacct", "memory"]);
    let quota_file = if cg.is_v2() { "cpu.max" } else { "cpu.cfs_quota_us" };
    let quota_before = cg.read("cpu", quota_file);
    let fs = Tmpfs::new("16m");
    let (cpu, thr, fill) = (uniq("k9cpu"), uniq("k9thr"), uniq("k9fill"));
    chaos_ok(&["agent", "apply", "--agent", &url, "--cpu", "30%", "--duration", "300s", "--id", &cpu], 0);
    chaos_ok(&["agent", "apply", "--agent", &url, "--cpu-quota", "10%", "--cgroup", &cg.path, "--duration", "300s", "--id", &thr], 0);
    chaos_ok(
        &[
            "agent",
            "apply",
            "--agent",
            &url,
            "--fill-disk",
            &fs.0.path().display().to_string(),
            "--to",
            "50%",
            "--duration",
            "300s",
            "--id",
            &fill,
        ],
        0,
    );
    assert_eq!(stress_workers(&cpu).len(), 1);
    agent.kill9();
    // The worker notices its agent is gone by itself.
    assert!(wait_until(Duration::from_secs(3), || stress_workers(&cpu).is_empty()), "worker outlived its agent");
    assert_ne!(cg.read("cpu", quota_file), quota_before, "the throttle stays until a revert");
    let (_agent, _url) = start_agent_at(dir.path(), "k9", port, &journal, None, "10s", &[]);
    assert_eq!(cg.read("cpu", quota_file), quota_before, "journal replay restores the quota");
    assert!(!own_cgroup("cpu", &cpu).exists(), "journal replay removes the stress cgroup");
    assert!(!fs.0.path().join(format!(".chaos-fill-{fill}")).exists(), "journal replay removes the fill file");
}
