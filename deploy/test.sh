#!/usr/bin/env bash
# The test command (README "Run the tests"): installs what the tests need on
# a fresh machine, then runs formatting and lint checks and the whole suite.
# Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
command -v go >/dev/null || { echo "go not found: needed to install grpcurl" >&2; exit 1; }

# Kernel tools the agent drives and the network tests use (iptables: the NFQUEUE latency engine).
need_pkgs=()
command -v nft >/dev/null || need_pkgs+=(nftables)
command -v iptables >/dev/null || need_pkgs+=(iptables)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v ping >/dev/null || need_pkgs+=(iputils-ping)
command -v nsenter >/dev/null || need_pkgs+=(util-linux)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "installing ${need_pkgs[*]} (apt-get)"
  [ "$(id -u)" = 0 ] || { echo "need root to install ${need_pkgs[*]}; install them and run again" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
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

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "building binaries (the end-to-end tests drive them)"
cargo build --workspace --bins --locked
step "cargo test"
cargo test --workspace --locked
