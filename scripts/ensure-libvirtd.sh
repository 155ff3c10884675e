#!/usr/bin/env bash
# Make sure a libvirtd answers on qemu:///system: the systemd units where systemd runs, else the daemons.
set -euo pipefail
uri=qemu:///system
answers() { timeout 10 virsh -c "$uri" version >/dev/null 2>&1; }
bash "$(dirname "$0")/kvm-device.sh"
answers && exit 0
if [ -d /run/systemd/system ]; then
  echo "starting libvirtd (systemd)"
  systemctl start virtlogd.socket libvirtd.socket libvirtd.service
else
  echo "starting virtlogd and libvirtd (no systemd on this host)"
  mkdir -p /var/log/libvirt /var/run/libvirt
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
fi
for _ in $(seq 1 30); do answers && exit 0; sleep 1; done
echo "libvirtd did not answer on $uri within 30s: see /var/log/libvirt/ or journalctl -u libvirtd" >&2
exit 1
