#!/usr/bin/env bash
# Quickstart demo (README's first command): builds the binaries, makes a CA
# and certificates (every channel is mTLS), starts a coordinator and an
# agent on loopback, shows calls refused without a certificate or with too
# low a role, pauses a real process with the CLI,
# watches it revert at its TTL, runs an emergency stop, shows the refusal
# while disarmed, re-arms, and cleans up everything it started — also on
# failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
WORK="$(mktemp -d /tmp/chaos-demo.XXXXXX)"
PIDS=()
VICTIM=""
cleanup() {
  [ -n "$VICTIM" ] && kill -KILL "$VICTIM" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

step "building (cargo build --release)"
cargo build --release --workspace --bins --locked
BIN="$PWD/target/release"
CHAOS="$BIN/chaos"
export CHAOS_COORDINATOR=https://127.0.0.1:50051 CHAOS_AGENT=https://127.0.0.1:50052

step "certificates: a CA, the coordinator, the agent, an admin and a viewer (in $WORK)"
"$CHAOS" certs init "$WORK/ca"
"$CHAOS" certs issue --ca "$WORK/ca" --role coordinator --name demo-coordinator --out "$WORK/coordinator" >/dev/null
"$CHAOS" certs issue --ca "$WORK/ca" --role agent --name demo-agent --out "$WORK/agent" >/dev/null
"$CHAOS" certs issue --ca "$WORK/ca" --role viewer --name demo-viewer --out "$WORK/viewer" >/dev/null
"$CHAOS" certs issue --ca "$WORK/ca" --role admin --name demo-admin --expires-in 1d --out "$WORK/admin"
export CHAOS_TLS_DIR="$WORK/admin"
"$CHAOS" certs show "$WORK/agent/cert.pem"

step "starting chaos-coordinator on 127.0.0.1:50051 and chaos-agent on 127.0.0.1:50052 (logs in $WORK)"
# One agent is the whole fleet here: allow a 100 % blast radius (the default is 30 %).
printf 'chaos_testing:\n  blast_radius_limit: 1.0\n  max_concurrent_scenarios: 1\n' >"$WORK/coordinator.yaml"
"$BIN/chaos-coordinator" --state-dir "$WORK/state" --config "$WORK/coordinator.yaml" --tls-dir "$WORK/coordinator" \
  >"$WORK/coordinator.log" 2>&1 & PIDS+=($!)
"$BIN/chaos-agent" --coordinator "$CHAOS_COORDINATOR" --journal-dir "$WORK/journal" --label role=demo \
  --tls-dir "$WORK/agent" --local-socket "$WORK/agent.sock" >"$WORK/agent.log" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do "$CHAOS" agents 2>/dev/null | grep -q healthy && break; sleep 0.2; done
"$CHAOS" agents

step "no certificate: refused before dialing (exit code 2, says how to make one); too low a role: PERMISSION_DENIED (exit code 3)"
set +e
"$CHAOS" --tls-dir "$WORK/nothing" agents; echo "exit code: $?"
CHAOS_TLS_DIR="$WORK/viewer" "$CHAOS" scenario create --pause-name sleep --selector role=demo --duration 3s --severity 2; echo "exit code: $?"
set -e

step "a victim process: sleep 300"
sleep 300 & VICTIM=$!; PIDS+=($VICTIM)
state() { awk '{print $3}' "/proc/$VICTIM/stat"; }

step "chaos agent apply --pause-pid $VICTIM --duration 5s"
for _ in $(seq 20); do "$CHAOS" agent apply --pause-pid "$VICTIM" --duration 5s && break; sleep 0.3; done
echo "victim state: $(state)   (T = stopped)"
"$CHAOS" agent faults

step "waiting for the TTL ..."
for _ in $(seq 80); do [ "$(state)" != T ] && break; sleep 0.1; done
echo "victim state: $(state)   (resumed by its TTL)"
"$CHAOS" agent faults --all

step "pause again for 10 minutes, then: chaos emergency-stop"
"$CHAOS" agent apply --pause-pid "$VICTIM" --duration 10m
echo "victim state: $(state)"
"$CHAOS" emergency-stop --reason "demo"
echo "victim state: $(state)   (resumed by the emergency stop)"

step "while disarmed, new faults are refused (exit code 3)"
set +e; "$CHAOS" agent apply --pause-pid "$VICTIM" --duration 5s; echo "exit code: $?"; set -e
"$CHAOS" status

step "chaos arm"
"$CHAOS" arm
"$CHAOS" agent apply --pause-pid "$VICTIM" --duration 2s
echo "victim state: $(state)"

sleep 2.5

step "a scenario at severity 1 is refused: level 1 allows no pause (exit code 3)"
set +e; "$CHAOS" scenario create --pause-pid "$VICTIM" --selector role=demo --duration 3s --severity 1; echo "exit code: $?"; set -e

step "the same at severity 2, with a second one queued behind it (max_concurrent_scenarios: 1)"
"$CHAOS" scenario create --pause-pid "$VICTIM" --selector role=demo --duration 3s --severity 2 --name first >/dev/null
"$CHAOS" scenario create --pause-pid "$VICTIM" --selector role=demo --duration 2s --severity 2 --name second >/dev/null
"$CHAOS" queue
SECOND="$("$CHAOS" -o json scenario list --state queued | sed -n 's/.*"id": *"\(sc-[0-9a-f]*\)".*/\1/p' | head -1)"
step "chaos scenario watch $SECOND (it starts when the first ends)"
"$CHAOS" scenario watch "$SECOND"
echo "victim state: $(state)"
"$CHAOS" scenario list
step "chaos audit"
"$CHAOS" audit

step "reflection over mTLS: grpcurl -cacert -cert -key 127.0.0.1:50051 list"
GRPCURL="$(command -v grpcurl || echo "$(go env GOPATH 2>/dev/null)/bin/grpcurl")"
if [ -x "$GRPCURL" ]; then
  "$GRPCURL" -cacert "$WORK/admin/ca.pem" -cert "$WORK/admin/cert.pem" -key "$WORK/admin/key.pem" 127.0.0.1:50051 list
else echo "(grpcurl not installed: go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3)"; fi

step "stopping (the agent reverts its remaining fault on SIGTERM)"
