#!/usr/bin/env bash
# mmdebstrap customize hook for the kvmlab offline image. $1 is the image root.
set -euo pipefail
ROOT=$1

# Serial console login on ttyS0 (keys only: root is locked, sshd refuses passwords).
systemctl --root="$ROOT" enable serial-getty@ttyS0.service
chroot "$ROOT" passwd --lock root >/dev/null

# cloud-init renders network-config for systemd-networkd; resolved serves DNS.
systemctl --root="$ROOT" enable systemd-networkd.service systemd-resolved.service
systemctl --root="$ROOT" enable cloud-init-local.service cloud-init.service cloud-config.service cloud-final.service
systemctl --root="$ROOT" enable qemu-guest-agent.service 2>/dev/null || true

# Lean boot under TCG: nothing periodic, nothing that waits for absent hardware.
systemctl --root="$ROOT" mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer systemd-pstore.service

# The initramfs (built by the kernel's postinst with our conf.d/hooks) must hold the
# virtio, ext4 and iso9660 drivers unless the kernel has them built in.
kver=$(ls "$ROOT/lib/modules" | head -n1)
content=$(chroot "$ROOT" lsinitramfs "/boot/initrd.img-$kver")
for m in virtio_pci virtio_blk virtio_net ext4 isofs; do
    if grep -qE "/${m}\.ko" <<<"$content"; then continue; fi
    if grep -qE "/${m}\.ko$" "$ROOT/lib/modules/$kver/modules.builtin"; then continue; fi
    echo "customize.sh: $m is neither in the initramfs nor built into kernel $kver" >&2
    exit 1
done
echo "initramfs for $kver: $(du -h "$ROOT/boot/initrd.img-$kver" | cut -f1), virtio/ext4/iso9660 present"
