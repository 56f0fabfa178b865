#!/usr/bin/env bash
# The flagship drill (README's first command), as root on a fresh machine:
# fetch Kafka and Cassandra from Maven Central, build, bring the lab up, put
# the reference pipeline under load, partition the processor from Cassandra
# through a coordinator scenario, let it revert, check that every
# acknowledged event reached Cassandra exactly once, print the verdict, and
# take the lab down — also on failure or Ctrl-C.
#
# Knobs (environment): EVENTS (default 6000), RATE (events/s, 200),
# PARTITION_S (seconds of partition, default 15), CHAOS_LAB_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS="${EVENTS:-6000}"
RATE="${RATE:-200}"
PARTITION_S="${PARTITION_S:-15}"
[ "$PARTITION_S" -ge 6 ] 2>/dev/null || { echo "PARTITION_S: at least 6 seconds, got $PARTITION_S" >&2; exit 2; }
export CHAOS_LAB_HOME="${CHAOS_LAB_HOME:-/var/lib/chaos-lab}"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "the drill needs root (the lab creates network namespaces): sudo bash deploy/drill.sh" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

need_pkgs=()
command -v nft >/dev/null || need_pkgs+=(nftables)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v nsenter >/dev/null || need_pkgs+=(util-linux)
command -v mvn >/dev/null || need_pkgs+=(maven)
command -v java >/dev/null || need_pkgs+=(openjdk-17-jdk-headless)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "installing ${need_pkgs[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

step "Kafka 4.1 and Cassandra 5.0 jars from Maven Central (kept in $CHAOS_LAB_HOME/jars)"
bash deploy/lab/fetch.sh

step "building (cargo build --release)"
cargo build --release --workspace --bins --locked
BIN="$PWD/target/release"
CHAOS="$BIN/chaos"
C=("$CHAOS" --coordinator http://198.18.200.1:50061)
WORK="$(mktemp -d /tmp/chaos-drill.XXXXXX)"
COLLECTOR=""
cleanup() {
  [ -n "$COLLECTOR" ] && kill "$COLLECTOR" 2>/dev/null || true
  step "chaos lab down"
  "$CHAOS" lab down || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

step "chaos lab up"
"$CHAOS" lab up

step "load: $EVENTS events at $RATE/s from lab-collector (records what Kafka acknowledged)"
ip netns exec lab-collector "$BIN/chaos-collector" --count "$EVENTS" --rate "$RATE" --size-bytes 512 \
  --acks-file "$WORK/acks" >"$WORK/collector.json" 2>"$WORK/collector.log" &
COLLECTOR=$!
sleep 5

step "inject: partition processor <-> Cassandra (198.18.200.3) for ${PARTITION_S}s, through a coordinator scenario"
SCENARIO="$("${C[@]}" -o json scenario create --partition 198.18.200.3/32 --netns lab-processor --agent-id processor \
  --duration "${PARTITION_S}s" --severity 3 --name "processor-cassandra partition" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["scenario"]["id"])')"
echo "scenario $SCENARIO"
# What the pipeline did during the cut: rows in Cassandra and ids Kafka acknowledged, early and late in it.
rows() { { "$BIN/chaos-check" --acks-file "$WORK/acks" --wait 0s 2>/dev/null || true; } | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_rows"])'; }
sleep 2
ROWS_A=$(rows); ACKS_A=$(wc -l <"$WORK/acks")
sleep $((PARTITION_S - 4))
ROWS_B=$(rows); ACKS_B=$(wc -l <"$WORK/acks")
echo "during the cut: Cassandra rows $ROWS_A -> $ROWS_B, Kafka acknowledged $ACKS_A -> $ACKS_B"
"${C[@]}" scenario watch "$SCENARIO"
REVERTED_AT=$(date +%s.%N)

step "waiting for the load to finish"
wait "$COLLECTOR"; COLLECTOR=""
LOAD_DONE_AT=$(date +%s.%N)
cat "$WORK/collector.json"

step "validate: every acknowledged event in Cassandra exactly once (waits for the lag to drain)"
set +e
"$BIN/chaos-check" --acks-file "$WORK/acks" --wait 180s >"$WORK/check.json" 2>"$WORK/check.log"
CHECK=$?
set -e
DRAINED_AT=$(date +%s.%N)
cat "$WORK/check.json"

python3 - "$WORK" "$REVERTED_AT" "$DRAINED_AT" "$CHECK" "$SCENARIO" "${PARTITION_S}s" "$LOAD_DONE_AT" "$ROWS_A" "$ROWS_B" "$ACKS_A" "$ACKS_B" <<'EOF'
import json, sys
work, reverted, drained, code, scenario, partition = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
load_done = float(sys.argv[7])
rows_a, rows_b, acks_a, acks_b = (int(x) for x in sys.argv[8:12])
col = json.load(open(f"{work}/collector.json"))
chk = json.load(open(f"{work}/check.json"))
print("\n================ DRILL REPORT ================")
print(f"injected   network partition processor <-> cassandra for {partition} (scenario {scenario}, severity 3), reverted by its TTL")
print(f"load       {col['produced']} events produced, {col['acked']} acknowledged by Kafka, {col['failed']} failed")
print(f"observed   during the cut Kafka acknowledged {acks_a} -> {acks_b} events (+{acks_b - acks_a}) while Cassandra held {rows_a} -> {rows_b} rows (+{rows_b - rows_a}): "
      + ("the processor stalled and the events waited in Kafka" if rows_b - rows_a < (acks_b - acks_a) / 10 else "writes went on: the cut did not stop the processor"))
print(f"recovery   every acknowledged event stored {drained - reverted:.1f} s after the revert (the load ran until {load_done - reverted:.1f} s after it)" if code == 0 else
      f"recovery   NOT complete {drained - reverted:.1f} s after the revert")
print(f"data       {chk['ok']} stored exactly once, {chk['lost_count']} lost, {chk['duplicated_count']} duplicated, {chk['unexpected_count']} unexpected")
print(f"VERDICT    {chk['verdict']}")
print("==============================================")
EOF
exit "$CHECK"
