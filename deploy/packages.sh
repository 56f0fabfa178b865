# Sourced by deploy/test.sh and deploy/drill.sh (needs their `step`):
#   ensure_tools COMMAND:DEBIAN_PACKAGE ...
# installs, with apt-get, the package of every command not on PATH;
#   ensure_packages DEBIAN_PACKAGE ... installs packages by name;
#   ensure_vm_kernel DIR [PACKAGE] downloads (never installs) the VM suite's kernel.
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

# ensure_vm_kernel DIR [PACKAGE]: the kernel package the VM suite boots
# (default: what linux-image-cloud-amd64 depends on), downloaded into DIR with
# `apt-get download` — never installed, so the host's kernel and boot
# configuration stay as they are.
ensure_vm_kernel() {
  local dir="$1" pkg="${2:-}"
  if [ -z "$pkg" ]; then
    pkg="$(apt-cache depends --important linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: *\(linux-image-[^ ]*\).*/\1/p' | head -1)"
    if [ -z "$pkg" ]; then
      step "apt-get update (no linux-image-cloud-amd64 in the package lists)"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      pkg="$(apt-cache depends --important linux-image-cloud-amd64 | sed -n 's/^ *Depends: *\(linux-image-[^ ]*\).*/\1/p' | head -1)"
    fi
  fi
  [ -n "$pkg" ] || { echo "no kernel package found for the VM suite" >&2; exit 1; }
  mkdir -p "$dir"
  compgen -G "$dir/${pkg}_*.deb" >/dev/null && return 0
  step "downloading $pkg for the VM suite (apt-get download into $dir)"
  (cd "$dir" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' >&2 || true)
  compgen -G "$dir/${pkg}_*.deb" >/dev/null || { echo "apt-get download $pkg failed" >&2; exit 1; }
}
