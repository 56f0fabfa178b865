#!/usr/bin/env bash
# The test command (README "Run the tests"): installs what the tests need on
# a fresh machine, then runs formatting and lint checks and the whole suite.
# Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
command -v go >/dev/null || { echo "go not found: needed to install grpcurl" >&2; exit 1; }

# Kernel tools the agent drives and the network tests use (iptables: the NFQUEUE latency engine);
# a Docker daemon and busybox for the container tests (each test runs a private dockerd
# without iptables or a bridge, and imports a busybox image: there is no registry).
. deploy/packages.sh
ensure_tools nft:nftables iptables:iptables ip:iproute2 ping:iputils-ping nsenter:util-linux dockerd:docker.io
# The image needs a statically linked busybox (Debian's plain `busybox` is dynamic).
dpkg -s busybox-static >/dev/null 2>&1 || ensure_packages busybox-static
# The VM suite (tests/tests/vm.rs): netem and cgroup v2 on Debian's stock cloud kernel under
# QEMU (TCG); the kernel package is downloaded into the harness's cache, not installed.
ensure_tools qemu-system-x86_64:qemu-system-x86 strip:binutils
ensure_vm_kernel "${CHAOS_VM_CACHE:-/var/cache/chaos-vm}/debs" "${CHAOS_VM_KERNEL_PACKAGE:-}"
[ "$(id -u)" = 0 ] || echo "warning: not root: the network-namespace tests will fail (they create namespaces)" >&2

GOBIN_DIR="$(go env GOPATH)/bin"
export PATH="$GOBIN_DIR:$PATH"
if ! command -v grpcurl >/dev/null; then
  step "installing grpcurl (go install)"
  go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3
fi
command -v sleep >/dev/null || { echo "sleep (coreutils) not found" >&2; exit 1; }

# The lab test runs real Apache Kafka and Cassandra from Maven Central jars.
export CHAOS_LAB_HOME="${CHAOS_LAB_HOME:-/var/lib/chaos-lab}"
step "fetching Kafka and Cassandra jars into $CHAOS_LAB_HOME/jars (Maven Central; kept between runs)"
bash deploy/lab/fetch.sh

# A test build is about 3 GiB (measured: 2.2 GiB build + 0.5 GiB clippy, from empty, with the
# dev profile in Cargo.toml); incremental caches would add more on every run, so they are off.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
free_kib="$(df -Pk "$target_dir" | awk 'NR==2 {print $4}')"
if [ -n "$free_kib" ] && [ "$free_kib" -lt $((6 * 1024 * 1024)) ]; then
  echo "warning: $((free_kib / 1024)) MiB free under $target_dir; the build needs about 3 GiB and the lab test about 2 GiB more (Kafka and Cassandra data)" >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
# --all-targets builds the dependency set cargo test uses, so nothing is compiled twice.
step "building binaries and tests (the end-to-end tests drive the binaries)"
cargo build --workspace --all-targets --locked
step "cargo test"
cargo test --workspace --locked
# What the VM suite tested (cargo hides a passing test's output).
cat "$target_dir/debug/chaos-vm-last-run.txt" 2>/dev/null || true
