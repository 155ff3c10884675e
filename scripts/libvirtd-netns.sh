#!/usr/bin/env bash
# Run virtlogd and libvirtd inside the network namespace "labns", so that the lab's libvirt
# networks (bridges, dnsmasq, firewall rules) live there and never touch the host's network.
# The unix socket is on the filesystem, so `virsh -c qemu:///system` works from the host.
#
# Usage: scripts/libvirtd-netns.sh start|stop|status
#   start   create labns (loopback up), start virtlogd and libvirtd in it, wait until
#           `virsh -c qemu:///system version` answers. Idempotent.
#   stop    end every process in labns (libvirtd, virtlogd, dnsmasq, qemu guests), remove labns.
#   status  say what runs where. Exit 0: running in labns; 3: not running; 1: running outside labns.
# A libvirtd or virtlogd that runs OUTSIDE labns is reported and refused (exit 1), never used.
# Environment: LABNS (default labns), LIBVIRTD_WAIT_S (default 60).
set -euo pipefail

NS=${LABNS:-labns}
WAIT_S=${LIBVIRTD_WAIT_S:-60}
URI=qemu:///system

say() { echo "libvirtd-netns: $*"; }
die() { echo "libvirtd-netns: error: $*" >&2; exit 1; }

ns_inode() { [[ -e /run/netns/$NS ]] && stat -L -c %i "/run/netns/$NS" || true; }

# pids of daemon $1 (exact process name) with where they run: "pid inside|outside"
daemon_pids() {
    local want pid ino
    want=$(ns_inode)
    for pid in $(pgrep -x "$1" || true); do
        ino=$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) || continue
        if [[ -n "$want" && "$ino" == "$want" ]]; then echo "$pid inside"; else echo "$pid outside"; fi
    done
}

refuse_outside() {
    local d line
    for d in virtlogd libvirtd; do
        while read -r line; do
            [[ "$line" == *outside ]] || continue
            die "$d (pid ${line%% *}) runs outside network namespace $NS; it would put lab networks on the" \
                "host. Stop it first (e.g. kill ${line%% *}), then run: $0 start"
        done < <(daemon_pids "$d")
    done
}

running_inside() { [[ $(daemon_pids "$1") == *" inside"* ]]; }

virsh_answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    for tool in ip libvirtd virtlogd virsh; do
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install iproute2 libvirt-daemon-system libvirt-clients"
    done
    refuse_outside
    if [[ ! -e /run/netns/$NS ]]; then
        ip netns add "$NS"
        say "created network namespace $NS"
    fi
    ip -n "$NS" link set lo up
    mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/images /var/lib/libvirt/qemu
    bash "$(dirname "${BASH_SOURCE[0]}")/kvm-device.sh"
    # qemu runs as libvirt-qemu: the pool folders must be searchable by it.
    chmod o+x /var/lib/libvirt /var/lib/libvirt/images

    # A daemon whose binary a package upgrade replaced (scripts/qemu-tcg.sh) would go on running the old libvirt
    # against the new qemu: virtlogd re-executes itself on SIGUSR1, libvirtd is restarted (guests keep running and
    # the new libvirtd reattaches to them).
    local pid where
    while read -r pid where; do
        [[ "$where" == inside && "$(readlink "/proc/$pid/exe")" == *" (deleted)" ]] || continue
        say "virtlogd (pid $pid) runs a replaced binary: re-executing it"
        kill -USR1 "$pid"
    done < <(daemon_pids virtlogd)
    while read -r pid where; do
        [[ "$where" == inside && "$(readlink "/proc/$pid/exe")" == *" (deleted)" ]] || continue
        say "libvirtd (pid $pid) runs a replaced binary: restarting it"
        kill "$pid"
        local gone=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null; do
            ((SECONDS < gone)) || die "libvirtd (pid $pid) did not exit within 30s of SIGTERM"
            sleep 0.2
        done
    done < <(daemon_pids libvirtd)

    if running_inside virtlogd; then
        say "virtlogd already runs in $NS"
    else
        ip netns exec "$NS" virtlogd -d
        say "started virtlogd in $NS"
    fi
    if running_inside libvirtd; then
        say "libvirtd already runs in $NS"
    else
        ip netns exec "$NS" libvirtd -d
        say "started libvirtd in $NS"
    fi

    say "waiting up to ${WAIT_S}s for libvirtd in $NS to answer \`virsh -c $URI version\`"
    local deadline=$((SECONDS + WAIT_S))
    until virsh_answers; do
        running_inside libvirtd || die "libvirtd in $NS exited; see /var/log/libvirt/ and run \`ip netns exec $NS libvirtd -v\`"
        ((SECONDS < deadline)) || die "libvirtd in $NS did not answer \`virsh -c $URI version\` within ${WAIT_S}s"
        sleep 0.5
    done
    refuse_outside
    say "ready: $(virsh -c "$URI" version 2>/dev/null | grep -i 'running hypervisor' || echo "virsh -c $URI answers")"
}

stop() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    if [[ ! -e /run/netns/$NS ]]; then
        say "network namespace $NS does not exist; nothing to stop"
        return 0
    fi
    local pids deadline
    pids=$(ip netns pids "$NS" | tr '\n' ' ')
    if [[ -n "${pids// /}" ]]; then
        say "stopping processes in $NS: $pids"
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        deadline=$((SECONDS + 20))
        while [[ -n "$(ip netns pids "$NS")" ]] && ((SECONDS < deadline)); do sleep 0.2; done
        pids=$(ip netns pids "$NS" | tr '\n' ' ')
        if [[ -n "${pids// /}" ]]; then
            say "still running after 20s, killing: $pids"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            sleep 0.5
        fi
    fi
    ip netns del "$NS"
    say "removed network namespace $NS"
}

status() {
    local rc=0 d lines
    if [[ -e /run/netns/$NS ]]; then say "network namespace $NS exists"; else say "network namespace $NS does not exist"; fi
    for d in virtlogd libvirtd; do
        lines=$(daemon_pids "$d")
        if [[ -z "$lines" ]]; then
            say "$d: not running"
            ((rc == 1)) || rc=3
        else
            while read -r pid where; do
                say "$d: pid $pid, $where $NS"
                [[ "$where" == inside ]] || rc=1
            done <<<"$lines"
        fi
    done
    if virsh_answers; then say "virsh -c $URI: answers"; else say "virsh -c $URI: no answer"; ((rc != 0)) || rc=3; fi
    return "$rc"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
