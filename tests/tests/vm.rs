//! The production kernel paths on a stock distribution kernel: boots Debian's
//! `linux-image-cloud-amd64` under QEMU (TCG) with an initramfs built by
//! `chaos_e2e::vm`, runs `chaos-vm-suite` inside (the netem backend with real
//! packets between two namespaces, every resource fault on cgroup v2), and
//! fails with the console log when any check fails or the VM does not boot.
//! Figures come from an emulated machine: timings are looser than on a host.
//!
//! By hand: `bash deploy/vm/run.sh` (or `cargo test -p chaos-e2e --test vm -- --nocapture`);
//! another kernel: `CHAOS_VM_KERNEL_DEB=/path/linux-image-….deb`.

use std::time::Duration;

use chaos_e2e::{bin, vm};

#[test]
fn netem_and_cgroup_v2_faults_pass_on_a_stock_kernel_in_a_vm() {
    let timeout = std::env::var("CHAOS_VM_TIMEOUT_S").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let args: Vec<String> = std::env::var("CHAOS_VM_CHECKS").map(|s| s.split(',').map(String::from).collect()).unwrap_or_default();
    let spec = vm::VmSpec {
        binaries: ["chaos-agent", "chaos", "chaos-netprobe", "chaos-vm-suite"].iter().map(|b| bin(b)).collect(),
        program: "/chaos/bin/chaos-vm-suite".into(),
        args,
        memory_mib: 1536,
        cpus: 2,
        disk_mib: Some(64),
        timeout: Duration::from_secs(timeout),
    };
    let run = vm::boot(&spec).unwrap_or_else(|e| panic!("{e:#}"));
    let checks: Vec<&str> = run.console.lines().filter(|l| l.starts_with("VM-CHECK ")).collect();
    let mut summary = format!(
        "VM suite: kernel {} (from {}); boot {:.1} s, whole run {:.1} s under qemu-system-x86_64 -accel tcg (emulated: timings are looser than on a host)\n",
        run.kernel.version,
        run.kernel.package.display(),
        run.boot.map_or(f64::NAN, |b| b.as_secs_f64()),
        run.total.as_secs_f64()
    );
    for c in &checks {
        summary.push_str(c);
        summary.push('\n');
    }
    eprint!("\n{summary}");
    // deploy/test.sh prints this after `cargo test` (which hides a passing test's output).
    let _ = std::fs::write(chaos_e2e::bin_dir().join("chaos-vm-last-run.txt"), &summary);
    let failed: Vec<&&str> = checks.iter().filter(|c| c.starts_with("VM-CHECK FAIL")).collect();
    assert!(
        run.exit == Some(0) && failed.is_empty() && !checks.is_empty(),
        "the VM suite failed on kernel {} (exit {:?}): {failed:#?}\n---- console ----\n{}",
        run.kernel.version,
        run.exit,
        run.console
    );
}
