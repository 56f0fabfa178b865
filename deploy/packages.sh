# Sourced by deploy/test.sh and deploy/drill.sh (needs their `step`):
#   ensure_tools COMMAND:DEBIAN_PACKAGE ...
# installs, with apt-get, the package of every command not on PATH;
#   ensure_packages DEBIAN_PACKAGE ... installs packages by name.
ensure_tools() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  ensure_packages "${need[@]}"
}

# ensure_packages DEBIAN_PACKAGE ...: install them with apt-get.
ensure_packages() {
  local need=("$@")
  step "installing ${need[*]} (apt-get)"
  [ "$(id -u)" = 0 ] || { echo "need root to install ${need[*]}; install them and run again" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # Packages must not start services: a distro dockerd would set iptables'
  # FORWARD policy to DROP and cut the lab's bridge. The tests start their
  # own daemons.
  local guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  [ -z "$guard" ] || rm -f /usr/sbin/policy-rc.d
}
