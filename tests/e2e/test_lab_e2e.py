"""End to end: `lab up -c labs/ci.yaml` with the real libvirtd + qemu (TCG) inside the network namespace
`labns` (scripts/libvirtd-netns.sh), the offline image, SSH with pinned keys, tuning read back, the runtime
phase, idempotent rerun, `lab ssh`, `lab logs`, `lab status`, and `lab down` leaving nothing behind.

The CLI runs inside `labns` (where the lab's bridge and VM addresses live); nothing leaves that namespace.
The booted lab is shared by every e2e module (tests/e2e/conftest.py); test_down_leaves_nothing runs last.
"""
from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.pipeline import UP
from lab.spec import PRODUCTION_SYSCTLS

from labrun import ROOT, SPEC, NetnsSsh, in_netns, lab_cli, phases_of, virsh

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def test_up_boots_every_node_and_reports_phase_times(up, lab, state_dir):
    phases = phases_of(state_dir, lab)
    for name in ("preflight", "image", "network", "storage", "nodes", "wait", "tune", "runtime"):
        assert phases[name]["status"] == "done", phases
    for name in ("kubeadm", "cilium", "join", "metallb", "ready", "kubeconfig"):
        assert phases[name]["status"] == "skipped", phases
    print("e2e phase seconds:", {k: v["seconds"] for k, v in phases.items()})
    record = ROOT / "results" / "e2e-phases.json"
    record.parent.mkdir(exist_ok=True)
    state = json.loads((state_dir / lab.name / "state.json").read_text())
    record.write_text(json.dumps({"spec": str(SPEC.relative_to(ROOT)), "virt_type": state.get("virt_type"),
                                  "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "phases": phases}, indent=2))
    running = virsh("list", "--name").split()
    assert sorted(d for d in running if d.startswith(f"{lab.name}-")) == sorted(lab.domain_name(n) for n in lab.nodes)
    virt_type = json.loads((state_dir / lab.name / "state.json").read_text())["virt_type"]
    cpu_has_vt = any(flag in Path("/proc/cpuinfo").read_text().split() for flag in ("vmx", "svm"))
    if not cpu_has_vt:  # this CI machine: no vmx/svm, so TCG, said out loud
        assert virt_type == "qemu" and "TCG" in up.stderr, up.stderr[:2000]


def test_secrets_are_private(up, lab, state_dir):
    base = state_dir / lab.name
    for name in ("id_ed25519", "known_hosts", "state.json"):
        mode = stat.S_IMODE((base / name).stat().st_mode)
        assert mode & 0o077 == 0, f"{name} has mode {oct(mode)}"


def test_lab_ssh_with_pinned_key_runs_a_command(up, lab, state_dir):
    for node in lab.nodes:
        proc = lab_cli(state_dir, "ssh", "-c", str(SPEC), node.name, "--", "hostname")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == node.name


def test_mismatched_host_key_is_refused(up, lab, state_dir):
    """A node that presents another key than the seeded one is refused (paramiko and OpenSSH alike)."""
    known = state_dir / lab.name / "known_hosts"
    original = known.read_text()
    node = lab.nodes[0]
    ip = str(node.ip)
    fake = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    try:
        known.write_text("".join(f"{ip} {fake}\n" if line.startswith(f"{ip} ") else line
                                 for line in original.splitlines(keepends=True)))
        proc = lab_cli(state_dir, "ssh", "-c", str(SPEC), node.name, "--", "true")
        assert proc.returncode != 0
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stderr or "Host key verification failed" in \
            proc.stderr
    finally:
        known.write_text(original)
    code = (f"from lab.remote.host import ParamikoHost; from lab.errors import RemoteError\n"
            f"h = ParamikoHost('{node.name}', '{ip}', '{lab.ssh.user}', '{state_dir / lab.name / 'id_ed25519'}', "
            f"'{fake}')\n"
            "try:\n    h.connect(timeout=20)\nexcept RemoteError as e:\n    print('REFUSED', e.message)\n")
    proc = subprocess.run(in_netns([sys.executable, "-c", code]), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "REFUSED" in proc.stdout and "not the pinned one" in proc.stdout, proc.stdout + proc.stderr


def test_tuning_reads_back_on_every_node(up, lab, state_dir):
    names = list(PRODUCTION_SYSCTLS)
    for node in lab.nodes:
        proc = lab_cli(state_dir, "ssh", "-c", str(SPEC), node.name, "--", "sudo", "-n", "sysctl", *names)
        assert proc.returncode == 0, proc.stderr
        values = dict(line.split(" = ", 1) for line in proc.stdout.strip().splitlines())
        assert values == PRODUCTION_SYSCTLS, f"{node.name}: {values}"


def test_runtime_phase_left_a_working_containerd(up, lab, state_dir):
    from lab.phases.runtime import verify_runtime

    for node in lab.nodes:
        problems = verify_runtime(NetnsSsh(node.name, state_dir), lab)
        assert problems == [], f"{node.name}: {problems}"


def test_second_up_is_a_noop(up, lab, state_dir):
    domains_before = {d: virsh("domuuid", d).strip() for d in (lab.domain_name(n) for n in lab.nodes)}
    proc = lab_cli(state_dir, "up", "-c", str(SPEC))
    assert proc.returncode == 0, proc.stderr
    phases = phases_of(state_dir, lab)
    changed = {k: v["status"] for k, v in phases.items() if k != "_total" and v["status"] not in
               ("unchanged", "skipped")}
    # preflight and image only check (they have nothing to create); nothing else may run again
    assert set(changed) <= {p.name for p in UP if p.every_up}, changed
    assert domains_before == {d: virsh("domuuid", d).strip() for d in domains_before}
    print("no-op rerun seconds:", phases["_total"]["seconds"])


def test_status_json(up, lab, state_dir):
    proc = lab_cli(state_dir, "status", "-c", str(SPEC), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["network"]["state"] == "active"
    assert [(n["name"], n["domain"], n["ssh"]) for n in status["nodes"]] == [
        (n.name, "running", "ok") for n in lab.nodes]


def test_logs_are_collected(up, lab, state_dir, tmp_path):
    out = tmp_path / "logs"
    proc = lab_cli(state_dir, "logs", "-c", str(SPEC), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    for node in lab.nodes:
        assert (out / node.name / "serial-console.log").stat().st_size > 0
        assert "Cloud-init v." in (out / node.name / "cloud-init.log").read_text()  # cloud-init's own log lines
        assert (out / node.name / "journal.txt").stat().st_size > 0


def test_down_leaves_nothing(up, lab, state_dir):
    proc = lab_cli(state_dir, "down", "-c", str(SPEC))
    assert proc.returncode == 0, proc.stderr
    assert not [d for d in virsh("list", "--all", "--name").split() if d.startswith(f"{lab.name}-")]
    assert lab.network_name not in virsh("net-list", "--all", "--name").split()
    assert lab.pool_name not in virsh("pool-list", "--all", "--name").split()
    assert not Path(lab.pool_path).exists()
    assert not (state_dir / lab.name).exists()
    again = lab_cli(state_dir, "down", "-c", str(SPEC))
    assert again.returncode == 0, "a second down must be a no-op"
