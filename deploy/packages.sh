# Sourced by deploy/test.sh and deploy/drill.sh (needs their `step`):
#   ensure_tools COMMAND:DEBIAN_PACKAGE ...
# installs, with apt-get, the package of every command not on PATH.
ensure_tools() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  step "installing ${need[*]} (apt-get)"
  [ "$(id -u)" = 0 ] || { echo "need root to install ${need[*]}; install them and run again" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}
