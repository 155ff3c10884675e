#!/usr/bin/env bash
# Give /dev/kvm the owner and mode Debian's udev rules give it (root:kvm 0660) where no udev ran.
#
# Why: libvirt probes qemu with KVM when root can open /dev/kvm, then judges KVM "not available now" when
# the qemu user (libvirt-qemu, group kvm) cannot. It then throws its capability cache away on EVERY API
# call and re-probes qemu: each define/start/getCapabilities takes seconds to minutes. This only changes who
# may open the device; whether `lab` uses KVM is decided separately (CPU flags, /dev/kvm, libvirt).
set -euo pipefail
dev=/dev/kvm
[ -e "$dev" ] || exit 0
getent group kvm >/dev/null || exit 0
if [ "$(stat -c '%G %a' "$dev")" != "kvm 660" ]; then
  chown root:kvm "$dev"
  chmod 0660 "$dev"
  echo "kvm-device: $dev set to root:kvm 0660 (as udev would), so libvirt keeps its qemu capability cache"
fi
