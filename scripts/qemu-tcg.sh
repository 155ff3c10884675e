#!/usr/bin/env bash
# On a host without hardware virtualization, guests run under QEMU's TCG. Before QEMU 8.1 multi-threaded TCG can
# run a stale translation of kernel code a multi-vCPU guest has just patched, and the guest hangs (QEMU commit
# deba78709ae8; seen on the CI cluster under Debian 12's QEMU 7.2: the control plane livelocked in exc_int3 while
# Cilium loaded its datapath). There, on Debian 12, install QEMU and libvirt from bookworm-backports (QEMU 10.0,
# libvirt 11.3 when written). A host with vmx/svm runs KVM and keeps the distribution's QEMU. `lab up` refuses
# multi-vCPU TCG guests on an older QEMU either way (preflight check_tcg_smp).
set -euo pipefail
grep -qwE 'vmx|svm' /proc/cpuinfo && exit 0
need=8001000   # 8.1.0, as libvirt numbers versions
have=0
if out=$(qemu-system-x86_64 --version 2>/dev/null); then
  v=$(sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\)\.\([0-9]*\).*/\1 \2 \3/p' <<<"$out")
  read -r major minor micro <<<"$v"
  have=$(( major * 1000000 + minor * 1000 + micro ))
fi
[ "$have" -ge "$need" ] && exit 0
# shellcheck source=/dev/null
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
  echo "qemu-tcg: no KVM here and QEMU is older than 8.1 (${out%%$'\n'*}); install QEMU 8.1 or newer," \
       "or give every node cpus: 1" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "qemu-tcg: no KVM here: as root, enable bookworm-backports and run" \
       "apt-get install -t bookworm-backports qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev" >&2
  exit 1
fi
src=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -e "$src" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" "Components: main" \
    "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" > "$src"
  echo "qemu-tcg: enabled bookworm-backports ($src)"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends -t bookworm-backports \
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
qemu-system-x86_64 --version | head -1
