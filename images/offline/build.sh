#!/usr/bin/env bash
# Build the kvmlab offline test image (Debian 12, direct kernel boot) with mmdebstrap.
#
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/kvmlab/images/debian-12-offline/
#   vmlinuz, initrd.img, rootfs.qcow2 (ext4, no partition table, root=/dev/vda), manifest.json
# A rerun with an unchanged recipe (this directory) is a no-op; a changed recipe rebuilds.
# Usage: bash images/offline/build.sh [--force]
set -euo pipefail

NAME=debian-12-offline
SUITE=bookworm
MIRROR=${KVMLAB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${KVMLAB_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
ROOTFS_SIZE=${KVMLAB_ROOTFS_SIZE:-2G}
CMDLINE="root=/dev/vda rw console=ttyS0,115200n8 quiet mitigations=off"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/kvmlab
OUT=$CACHE/images/$NAME
DEBS=$CACHE/debs/$SUITE
FORCE=${1:-}
START=$(date +%s)

die() { echo "build.sh: error: $*" >&2; exit 1; }

# The recipe is every file in this directory: path, executable bit and contents.
recipe_sha256() {
    (cd "$HERE" && find . -type f -print0 | LC_ALL=C sort -z |
        while IFS= read -r -d '' f; do
            if [[ -x "$f" ]]; then echo "$f x"; else echo "$f -"; fi
            sha256sum <"$f"
        done) | sha256sum | cut -d' ' -f1
}
RECIPE=$(recipe_sha256)

if [[ "$FORCE" != "--force" && -f "$OUT/manifest.json" ]] &&
    grep -q "\"recipe_sha256\": \"$RECIPE\"" "$OUT/manifest.json" &&
    [[ -f "$OUT/vmlinuz" && -f "$OUT/initrd.img" && -f "$OUT/rootfs.qcow2" ]]; then
    echo "image $NAME is up to date ($OUT, recipe $RECIPE); nothing to do"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "run as root (mmdebstrap --mode=root and mkfs.ext4 -d keep file ownership)"
for tool in mmdebstrap mkfs.ext4 qemu-img sha256sum python3 findmnt; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install mmdebstrap e2fsprogs qemu-utils python3"
done

# Remove a work dir, but never follow into something still mounted in it (a killed
# mmdebstrap can leave /proc, /sys or /dev mounts behind).
remove_workdir() {
    if findmnt -rn -o TARGET | grep -q "^$1/"; then
        echo "build.sh: warning: $1 still has mounts; leaving it (umount -R $1/root; rm -rf $1)" >&2
        return 0
    fi
    rm -rf --one-file-system "$1"
}

mkdir -p "$CACHE/images" "$DEBS"
for stale in "$CACHE/images/.$NAME.tmp."*; do
    [[ -e "$stale" ]] && remove_workdir "$stale"
done
TMP=$(mktemp -d "$CACHE/images/.$NAME.tmp.XXXXXX")
cleanup() { remove_workdir "$TMP"; }
trap cleanup EXIT

PACKAGES=$(grep -v '^\s*#' "$HERE/packages.txt" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
echo "building $NAME into $OUT (recipe $RECIPE)"

mmdebstrap --mode=root --variant=apt --format=directory \
    --skip=essential/unlink \
    --include="$PACKAGES" \
    --aptopt='Acquire::Languages "none"' \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in '$DEBS' /var/cache/apt/archives/" \
    --setup-hook="sync-in '$HERE/rootfs' /" \
    --customize-hook="sync-out /var/cache/apt/archives '$DEBS'" \
    --customize-hook="'$HERE/customize.sh' \"\$1\"" \
    "$SUITE" "$TMP/root" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main"

ROOT=$TMP/root
# File-level settings, made after mmdebstrap has restored its own /etc/resolv.conf and /etc/hostname.
rm -f "$ROOT"/etc/hostname "$ROOT"/etc/ssh/ssh_host_*
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$ROOT/etc/fstab"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb
rm -rf "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/tmp/* "$ROOT"/var/tmp/*

cp -L "$ROOT/vmlinuz" "$TMP/vmlinuz"
cp -L "$ROOT/initrd.img" "$TMP/initrd.img"
# The guest boots its kernel from the host: keep /boot small.
rm -f "$ROOT"/boot/initrd.img-*
chmod 0644 "$TMP/vmlinuz" "$TMP/initrd.img"

truncate -s "$ROOTFS_SIZE" "$TMP/rootfs.raw"
mkfs.ext4 -q -F -L kvmlab-root -d "$ROOT" "$TMP/rootfs.raw"
# zstd-compressed clusters: about a third of the size (faster upload into a libvirt pool);
# the guest's writes go to its overlay, reads decompress on the host at negligible cost.
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$TMP/rootfs.raw" "$TMP/rootfs.qcow2"
rm -rf "$TMP/rootfs.raw" "$ROOT"

python3 - "$TMP" "$NAME" "$CMDLINE" "$RECIPE" <<'PY'
import datetime, hashlib, json, pathlib, sys
tmp, name, cmdline, recipe = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
files = {"kernel": "vmlinuz", "initrd": "initrd.img", "rootfs": "rootfs.qcow2"}
manifest = {
    "name": name,
    "format": "kernel",
    **files,
    "cmdline": cmdline,
    "sha256": {f: sha256(tmp / f) for f in files.values()},
    "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "recipe_sha256": recipe,
}
(tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
PY

# Atomic replace: the new image appears whole or not at all.
if [[ -d "$OUT" ]]; then
    mv "$OUT" "$TMP.old"
    mv "$TMP" "$OUT"
    rm -rf --one-file-system "$TMP.old"
else
    mv "$TMP" "$OUT"
fi
trap - EXIT
chmod 0755 "$OUT"
echo "built $NAME in $(( $(date +%s) - START )) s:"
ls -lh "$OUT"
qemu-img info "$OUT/rootfs.qcow2" | grep -E 'virtual size|disk size'
