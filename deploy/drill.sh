#!/usr/bin/env bash
# The flagship drill (README's first command), as root on a fresh machine:
# fetch Kafka and Cassandra from Maven Central, build, bring the lab up,
# then `chaos lab drill`: put the reference pipeline under load, partition
# the processor from Cassandra through a coordinator scenario, check that
# writes stalled while events waited in Kafka, let the fault revert, and
# validate recovery (services answer, the consumer lag drains, every
# acknowledged event is in Cassandra exactly once, throughput and latency
# back to the baseline); print the report; then run an experiment file
# (EXPERIMENT, default deploy/experiments/lab-drill-partition.yaml: the same drill as a file, with load and validation) with
# `chaos run`, whose report lands in REPORT_DIR (chaos-reports); take the
# lab down — also on failure or Ctrl-C.
#
# Knobs (environment): DRILL (partition, kafka-down, processor-down,
# cassandra-down, full-stop, cascading, kafka-latency, all; default
# partition), RATE (events/s, 200), FAULT_S (seconds each fault holds, 15),
# CHAOS_LAB_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."

DRILL="${DRILL:-partition}"
RATE="${RATE:-200}"
FAULT_S="${FAULT_S:-15}"
EXPERIMENT="${EXPERIMENT:-deploy/experiments/lab-drill-partition.yaml}"
REPORT_DIR="${REPORT_DIR:-chaos-reports}"
[ "$FAULT_S" -ge 6 ] 2>/dev/null || { echo "FAULT_S: at least 6 seconds, got $FAULT_S" >&2; exit 2; }
export CHAOS_LAB_HOME="${CHAOS_LAB_HOME:-/var/lib/chaos-lab}"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "the drill needs root (the lab creates network namespaces): sudo bash deploy/drill.sh" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

. deploy/packages.sh
ensure_tools nft:nftables iptables:iptables ip:iproute2 nsenter:util-linux mvn:maven java:openjdk-17-jdk-headless

step "Kafka 4.1 and Cassandra 5.0 jars from Maven Central (kept in $CHAOS_LAB_HOME/jars)"
bash deploy/lab/fetch.sh

step "building (cargo build --release)"
cargo build --release --workspace --bins --locked
CHAOS="$PWD/target/release/chaos"
cleanup() {
  step "chaos lab down"
  "$CHAOS" lab down || true
}
trap cleanup EXIT INT TERM

step "chaos lab up"
"$CHAOS" lab up

step "chaos lab drill $DRILL (load $RATE events/s, each fault ${FAULT_S}s)"
set +e
"$CHAOS" lab drill "$DRILL" --rate "$RATE" --fault-duration "${FAULT_S}s"
CODE=$?
set -e

step "chaos run $EXPERIMENT (report in $REPORT_DIR)"
set +e
# The lab's coordinator (its bridge address) and the lab admin's certificate,
# which `chaos lab up` made with the lab's CA: every call is mTLS.
eval "$("$CHAOS" lab env)"
"$CHAOS" run "$EXPERIMENT" --report-dir "$REPORT_DIR"
RUN_CODE=$?
set -e
[ "$CODE" -ne 0 ] && exit "$CODE"
exit "$RUN_CODE"
