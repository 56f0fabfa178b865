#!/usr/bin/env bash
# The VM suite by hand: the netem backend and every cgroup v2 resource fault,
# checked inside a QEMU (TCG) VM booting a stock Debian kernel (tests/tests/vm.rs,
# harness in tests/src/vm.rs). Needs root (the cache), qemu-system-x86,
# busybox-static, iproute2, nftables, iptables, iputils-ping, util-linux.
#
#   sudo bash deploy/vm/run.sh                                   # Debian's linux-image-cloud-amd64
#   sudo CHAOS_VM_KERNEL_DEB=/path/linux-image-X.deb bash deploy/vm/run.sh
#   sudo CHAOS_VM_KERNEL_PACKAGE=linux-image-6.1.0-57-amd64 bash deploy/vm/run.sh
#   sudo CHAOS_VM_CHECKS=netem_loss,v2_io bash deploy/vm/run.sh   # some checks only
#
# Also: CHAOS_VM_CACHE (default /var/cache/chaos-vm), CHAOS_VM_TIMEOUT_S (default 600).
set -euo pipefail
cd "$(dirname "$0")/../.."
step() { printf '\n==> %s\n' "$*" >&2; }
. deploy/packages.sh
ensure_tools qemu-system-x86_64:qemu-system-x86 ip:iproute2 nft:nftables iptables:iptables ping:iputils-ping nsenter:util-linux strip:binutils
dpkg -s busybox-static >/dev/null 2>&1 || ensure_packages busybox-static
[ -n "${CHAOS_VM_KERNEL_DEB:-}" ] || ensure_vm_kernel "${CHAOS_VM_CACHE:-/var/cache/chaos-vm}/debs" "${CHAOS_VM_KERNEL_PACKAGE:-}"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
step "building the binaries the VM runs"
cargo build --workspace --bins --locked
step "booting the VM and running the suite inside"
cargo test -p chaos-e2e --test vm --locked -- --nocapture
