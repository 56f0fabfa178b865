//! `chaos run` end to end: a real coordinator and agent, a busy process the
//! agent watches, an experiment file that pauses it. The report's numbers
//! are checked against what the pause must do to the process's CPU; a stop
//! condition and Ctrl-C each abort the run with the fault reverted (the
//! abort runs the rollbacks); a parallel group starts its members at their
//! offsets and reports what each achieved; `chaos report` lists the
//! coordinator's index and renders a run again.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use chaos_e2e::{bin, chaos_ok, proc_state, start_coordinator_with, wait_until};

/// A busy loop under a unique name (CPU time capped by ulimit), killed on drop.
struct Burner {
    child: Child,
    name: String,
}

impl Burner {
    fn start(dir: &Path, tag: &str) -> Burner {
        let name = format!("{tag}{}", std::process::id() % 100_000);
        let exe = dir.join(&name);
        std::fs::copy("/bin/sh", &exe).expect("copy sh");
        let child = Command::new(&exe).args(["-c", "ulimit -t 90; while :; do :; done"]).stdin(Stdio::null()).spawn().expect("burner");
        Burner { child, name }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn experiment(dir: &Path, name: &str, burner: &str, extra: &str) -> PathBuf {
    let text = format!(
        "version: 1
name: {name}
description: Pause a busy process for 4 s; it must still be there afterwards.
steady_state:
  - process.count{{name={burner}}} >= 1
recovery_timeout: 20s
method:
  - wait: 3s
  - name: pause the burner
    fault: --pause-name {burner}
    agent_ids: [exp]
    duration: 4s
    severity: 2
  - wait: 3s
report:
  metrics: [process.cpu_pct]
{extra}"
    );
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, text).expect("write experiment");
    p
}

/// A parallel group: the pause at once, a CPU stress 1 s later.
fn parallel_experiment(dir: &Path, burner: &str) -> PathBuf {
    let text = format!(
        "version: 1
name: parallel-burner
method:
  - parallel:
      - name: pause
        fault: --pause-name {burner}
        agent_ids: [exp]
        duration: 4s
      - name: stress
        fault: --cpu 30% --workers 1
        agent_ids: [exp]
        after: 1s
        duration: 3s
"
    );
    let p = dir.join("parallel.yaml");
    std::fs::write(&p, text).expect("write experiment");
    p
}

/// The one report directory under `dir`.
fn report(dir: &Path) -> (PathBuf, serde_json::Value) {
    let d = std::fs::read_dir(dir).expect("report dir").flatten().next().expect("a report").path();
    let v = serde_json::from_str(&std::fs::read_to_string(d.join("report.json")).expect("report.json")).expect("json");
    (d, v)
}

/// `chaos ARGS` whose stdout must be exactly one JSON document (progress goes to stderr).
fn stdout_json(args: &[&str], want_code: i32) -> serde_json::Value {
    let out = chaos_e2e::chaos(args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(want_code), "chaos {args:?}\nstdout: {stdout}\nstderr: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {stdout}"))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[test]
fn an_experiment_runs_reports_and_aborts_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One agent is the whole fleet here: allow a blast radius of 100 %.
    let cfg = dir.path().join("coordinator.yaml");
    std::fs::write(&cfg, "chaos_testing: {blast_radius_limit: 1.0}\nmonitoring:\n  metrics_interval: 500ms\n").expect("config");
    let (_coord, curl) = start_coordinator_with(dir.path(), chaos_e2e::free_port(), Some(&cfg));
    let burner = Burner::start(dir.path(), "exb");
    let (_agent, _aurl) = {
        let port = chaos_e2e::free_port();
        chaos_e2e::start_agent_at(
            dir.path(),
            "exp",
            port,
            &dir.path().join("journal-exp"),
            Some(&curl),
            "10s",
            &["--watch-process", &burner.name, "--metrics-interval", "500ms"],
        )
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            let o = chaos_e2e::chaos(&["--coordinator", &curl, "-o", "json", "metrics", "exp", "--metric", "process.count"]);
            String::from_utf8_lossy(&o.stdout).contains("process.count")
        }),
        "the hub has the agent's process metrics"
    );

    // The plan, without running anything.
    let file = experiment(dir.path(), "pause-burner", &burner.name, "");
    let f = file.display().to_string();
    let plan = chaos_ok(&["--coordinator", &curl, "run", &f, "--dry-run"], 0);
    assert!(plan.contains("process_pause") && plan.contains("[exp]") && plan.contains("dry run: nothing run"), "{plan}");
    // The same plan for scripts: stdout is one JSON document.
    let plan = stdout_json(&["--coordinator", &curl, "-o", "json", "run", &f, "--dry-run"], 0);
    let pause = &plan["plan"][1];
    assert_eq!(
        (plan["dry_run"].as_bool(), plan["refused"].as_bool(), pause["kind"].as_str()),
        (Some(true), Some(false), Some("fault")),
        "{plan:#}"
    );
    assert_eq!(pause["admission"]["agents"], serde_json::json!(["exp"]), "{plan:#}");
    assert_eq!((pause["admission"]["blast_radius"].as_f64(), pause["admission"]["blast_radius_limit"].as_f64()), (Some(1.0), Some(1.0)));
    assert_ne!(proc_state(burner.pid()), Some('T'));

    // The run: the hypothesis holds, and the report shows the pause on the CPU.
    let reports = dir.path().join("reports");
    let r = reports.display().to_string();
    let out = chaos_ok(&["--coordinator", &curl, "run", &f, "--report-dir", &r], 0);
    assert!(out.contains("verdict: HELD") && out.contains("step 2/3 pause the burner"), "{out}");
    let (rdir, rep) = report(&reports);
    assert_eq!(rep["verdict"], "HELD");
    let step = &rep["steps"][1];
    assert_eq!(step["state"], "completed", "{step}");
    let (from, to) = (step["start_s"].as_f64().expect("start"), step["end_s"].as_f64().expect("end"));
    let series = rep["metrics"].as_array().expect("metrics");
    let pts: Vec<[f64; 2]> = series
        .iter()
        .find(|s| s["series"].as_str().is_some_and(|n| n.contains(&burner.name)))
        .and_then(|s| serde_json::from_value(s["points"].clone()).ok())
        .expect("the burner's CPU series");
    let during: Vec<f64> = pts.iter().filter(|p| p[0] > from + 2.0 && p[0] < to - 0.5).map(|p| p[1]).collect();
    let before: Vec<f64> = pts.iter().filter(|p| p[0] > 1.0 && p[0] < from).map(|p| p[1]).collect();
    assert!(!during.is_empty() && !before.is_empty(), "{pts:?}");
    assert!(mean(&during) < 10.0, "a paused process uses no CPU: {during:?}");
    assert!(mean(&before) > 40.0, "the burner before the pause: {before:?}");
    let svg = std::fs::read_to_string(rdir.join("metrics.svg")).expect("svg");
    let doc = roxmltree::Document::parse(&svg).expect("metrics.svg is well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let shaded = doc.descendants().filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some("#FFC8C8")).count();
    assert_eq!(shaded, 1, "the pause's window shaded");
    assert!(doc.descendants().any(|n| n.has_tag_name("polyline") && n.attribute("stroke-width") == Some("2")), "a series drawn");
    let md = std::fs::read_to_string(rdir.join("report.md")).expect("md");
    assert!(md.contains("HELD") && md.contains("pause the burner") && md.contains("metrics.svg"), "{md}");
    assert_ne!(proc_state(burner.pid()), Some('T'), "reverted");

    // The coordinator's index has the run; `chaos report ID` renders it again.
    let id = rep["id"].as_str().expect("run id").to_string();
    let listed = chaos_ok(&["--coordinator", &curl, "report"], 0);
    assert!(listed.contains(&id) && listed.contains("HELD"), "{listed}");
    std::fs::remove_file(rdir.join("metrics.svg")).expect("rm svg");
    let again = chaos_ok(&["--coordinator", &curl, "report", &id], 0);
    assert!(again.contains("# Experiment pause-burner: HELD") && rdir.join("metrics.svg").is_file(), "{again}");
    chaos_ok(&["--coordinator", &curl, "report", "no-such-run"], 4);

    // A parallel group: both members run, the second from its offset, and the stress reports what it achieved.
    let reports4 = dir.path().join("reports4");
    let par = parallel_experiment(dir.path(), &burner.name);
    let printed = stdout_json(
        &["--coordinator", &curl, "-o", "json", "run", &par.display().to_string(), "--report-dir", &reports4.display().to_string()],
        0,
    );
    assert_eq!((printed["verdict"].as_str(), printed["exit_code"].as_u64()), (Some("HELD"), Some(0)), "{printed:#}");
    let (dir4, rep4) = report(&reports4);
    assert_eq!(printed["report_dir"].as_str().map(PathBuf::from), Some(std::path::absolute(&dir4).expect("absolute")));
    assert_eq!(printed["steps"], rep4["steps"], "stdout carries the report");
    let steps = rep4["steps"].as_array().expect("steps");
    let by = |n: &str| steps.iter().find(|s| s["name"] == n).unwrap_or_else(|| panic!("{n} in {steps:?}"));
    let (pause, stress) = (by("pause"), by("stress"));
    assert_eq!((pause["state"].as_str(), stress["state"].as_str()), (Some("completed"), Some("completed")), "{steps:?}");
    let offset = stress["start_s"].as_f64().unwrap_or(0.0) - pause["start_s"].as_f64().unwrap_or(0.0);
    assert!((0.8..2.5).contains(&offset), "the stress started about 1 s after the pause: {offset}");
    assert!(stress["start_s"].as_f64() < pause["end_s"].as_f64(), "they overlapped: {steps:?}");
    let cpu = stress["agents"][0]["achieved"]["cpu_load_percent"].as_f64().expect("achieved cpu_load_percent");
    assert!((15.0..=45.0).contains(&cpu), "30 % asked: {cpu}");
    assert_eq!(stress["fault"], "--cpu 30% --workers 1");

    // A stop condition that fires at once aborts the step; the fault is reverted.
    let aborting = experiment(
        dir.path(),
        "abort-burner",
        &burner.name,
        &format!(
            "stop_conditions:\n  - process.count{{name={}}} < 5\nrollbacks:\n  - name: rollback pause\n    fault: --pause-name {}\n    agent_ids: [exp]\n    duration: 1s\n",
            burner.name, burner.name
        ),
    );
    let reports2 = dir.path().join("reports2");
    let out =
        chaos_ok(&["--coordinator", &curl, "run", &aborting.display().to_string(), "--report-dir", &reports2.display().to_string()], 9);
    assert!(out.contains("verdict: ABORTED"), "{out}");
    let rep2 = report(&reports2).1;
    assert_eq!(rep2["verdict"], "ABORTED");
    assert!(out.contains("rollbacks: 1 step(s)"), "{out}");
    assert_eq!(rep2["rollbacks"][0]["state"], "completed", "the rollback ran without the stop conditions: {}", rep2["rollbacks"]);
    assert!(wait_until(Duration::from_secs(5), || proc_state(burner.pid()) != Some('T')), "reverted after the abort");

    // Ctrl-C while the fault holds: the scenario is stopped and the run says so.
    let reports3 = dir.path().join("reports3");
    let run = Command::new(bin("chaos"))
        .env("CHAOS_TLS_DIR", chaos_e2e::pki().admin())
        .args(["--coordinator", &curl, "run", &f, "--report-dir", &reports3.display().to_string()])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("chaos run");
    assert!(wait_until(Duration::from_secs(15), || proc_state(burner.pid()) == Some('T')), "paused by the run");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.id() as i32), nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let out = run.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(9), "{text}");
    assert!(text.contains("Ctrl-C") && text.contains("verdict: ABORTED"), "{text}");
    assert!(wait_until(Duration::from_secs(5), || proc_state(burner.pid()) != Some('T')), "resumed after Ctrl-C");
}
