"""End to end: scripts/nightly.sh with copies of the offline CI lab (labs/ci.yaml under other names and CIDRs, so
the shared `ci` lab is never touched), real libvirtd + qemu (TCG) inside netns `labns` (LAB_NETNS=labns).

- one full night: provisioning succeeds, the conformance suite cannot run (no Kubernetes in the offline lab), and
  a Ctrl-C (SIGINT) arrives while logs are being collected: the cleanup goes on, logs are collected, the lab is
  removed, and the exit status and verdict say "FAILED at conformance" (exit 4);
- SIGTERM while the VMs boot and SIGINT right after the network exists: logs collected, lab removed, 143 / 130;
- a provisioning failure (preflight refuses: not enough memory): exit 3 and a verdict naming the phase.
Nothing of any of these labs may remain: no domain, network, pool, bridge, qemu process or state directory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from labrun import NETNS, ROOT, SPEC, require_root_and_libvirtd, virsh

pytestmark = [pytest.mark.e2e, pytest.mark.root]

SCRIPT = ROOT / "scripts" / "nightly.sh"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Root and libvirtd inside labns, or a loud failure; a scratch state root for these labs."""
    require_root_and_libvirtd("the nightly end-to-end tests")
    return tmp_path_factory.mktemp("nightly")


def spec_copy(base: Path, name: str, cidr: str, **changes) -> Path:
    doc = yaml.safe_load(SPEC.read_text())
    doc["name"] = name
    doc["network"]["cidr"] = cidr
    doc.update(changes)
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Night:
    """One scripts/nightly.sh run in the background; its stdout/stderr in files."""

    def __init__(self, base: Path, spec: Path, tag: str, **env_extra: str):
        self.spec, self.state = spec, base / f"state-{tag}"
        self.artifacts = base / f"artifacts-{tag}"
        self.out, self.err = base / f"{tag}.out", base / f"{tag}.err"
        env = {**os.environ, "LAB_NETNS": NETNS, "LAB_STATE_DIR": str(self.state), "ARTIFACTS": str(self.artifacts),
               "NIGHTLY_PRECLEAN": "1", **env_extra}
        self.started = time.monotonic()
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(["bash", str(SCRIPT), str(spec)], cwd=ROOT, env=env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        self.name = yaml.safe_load(spec.read_text())["name"]

    def wait_for(self, path: Path, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"nightly ended (rc {self.proc.returncode}) before {path.name} showed {text!r}:\n"
                            f"{self.err.read_text()[-3000:]}")
            time.sleep(1)
        self.proc.send_signal(signal.SIGTERM)
        pytest.fail(f"{path} did not show {text!r} within {timeout}s")

    def finish(self, timeout: float = 900) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"nightly did not end within {timeout}s:\n{self.err.read_text()[-3000:]}")
        self.seconds = time.monotonic() - self.started
        print(f"nightly {self.name}: rc {rc} in {self.seconds:.0f}s\n{self.out.read_text()}")
        return rc

    @property
    def verdict(self) -> str:
        lines = self.out.read_text().strip().splitlines()
        return lines[-1] if lines else ""


def leftovers(name: str) -> list[str]:
    found = [f"domain {d}" for d in virsh("list", "--all", "--name").split() if d.startswith(f"{name}-")]
    found += [f"network {n}" for n in virsh("net-list", "--all", "--name").split() if n == f"lab-{name}"]
    found += [f"pool {p}" for p in virsh("pool-list", "--all", "--name").split() if p == f"lab-{name}"]
    link = subprocess.run(["ip", "-n", NETNS, "link", "show", f"lab-{name}"], capture_output=True, text=True)
    if link.returncode == 0:
        found.append(f"bridge lab-{name}")
    qemu = subprocess.run(["pgrep", "-f", f"guest={name}-"], capture_output=True, text=True)
    found += [f"qemu pid {p}" for p in qemu.stdout.split()]
    return found


def assert_nothing_left(night: Night) -> None:
    assert leftovers(night.name) == []
    assert not (night.state / night.name).exists(), "the lab's state directory is still there"


def remove_lab(base: Path, spec: Path) -> None:
    """Best effort before a test: a lab left by an earlier aborted run must not fail this one."""
    env = {**os.environ, "LAB_STATE_DIR": str(base / "pre")}
    subprocess.run(["ip", "netns", "exec", NETNS, str(ROOT / ".venv/bin/lab"), "down", "-c", str(spec)], cwd=ROOT,
                   env=env, capture_output=True, timeout=300)


# ---------------------------------------------------------------------------------------------- one full night


@pytest.fixture(scope="module")
def full_night(host):
    # Not labs/ci-cluster.yaml's 10.232.0.0/24: a real-cluster lab kept up on the same runner must not fail this test
    spec = spec_copy(host, "nightly", "10.237.0.0/24")
    remove_lab(host, spec)
    night = Night(host, spec, "full")
    try:
        # Ctrl-C while `lab logs` collects: the cleanup must go on to the end
        night.wait_for(night.artifacts / "console" / "logs.log", "$ ", timeout=1200)
        night.proc.send_signal(signal.SIGINT)
        night.rc = night.finish()
        yield night
    finally:
        if night.proc.poll() is None:
            night.proc.send_signal(signal.SIGTERM)
            night.proc.wait(timeout=900)
        remove_lab(host, spec)


def test_full_night_fails_at_conformance_with_a_clear_verdict(full_night):
    assert full_night.rc == 4, full_night.err.read_text()[-3000:]
    assert full_night.verdict.startswith("nightly: FAILED at conformance (could not run, pytest exit 3): kubeconfig ")
    assert "does not exist" in full_night.verdict and str(full_night.artifacts) in full_night.verdict
    summary = json.loads((full_night.artifacts / "nightly.json").read_text())
    assert summary["exit"] == 4 and summary["verdict"] == "FAILED" and summary["lab"] == "nightly"
    assert summary["stages"]["up"]["exit"] == 0 and summary["stages"]["down"]["exit"] == 0
    assert (full_night.artifacts / "verdict.txt").read_text().splitlines() == [full_night.verdict, "exit 4"]


def test_full_night_kept_cleaning_up_after_ctrl_c(full_night):
    err = full_night.err.read_text()
    assert "got SIGINT during cleanup: lab logs/down continue" in err
    assert "lab nightly removed" in (full_night.artifacts / "console" / "down.log").read_text()


def test_full_night_collected_logs_of_every_node(full_night):
    logs = full_night.artifacts / "logs"
    for node in ("cp1", "w1"):
        console = logs / node / "serial-console.log"
        assert console.is_file() and console.stat().st_size > 0, f"no serial console of {node}"
        assert (logs / node / "cloud-init-output.log").stat().st_size > 0
        assert (logs / node / "journal.txt").stat().st_size > 0


def test_full_night_artifacts(full_night):
    a = full_night.artifacts
    assert (a / "rendered" / "network.xml").is_file()
    assert sorted(p.name for p in (a / "rendered" / "nodes").iterdir()) == ["cp1", "w1"]
    phases = json.loads((a / "phases.json").read_text())["phases"]
    for name in ("preflight", "image", "network", "storage", "nodes", "wait", "tune", "runtime"):
        assert phases[name]["status"] == "done", phases
    assert phases["wait"]["seconds"] > 0
    assert "wait" in (a / "phases.txt").read_text()
    assert json.loads((a / "state.json").read_text())["lab"] == "nightly"
    status = json.loads((a / "status.json").read_text())
    assert {n["name"] for n in status["nodes"]} == {"cp1", "w1"}
    up = (a / "console" / "up.log").read_text()
    assert "lab nightly is up" in up and "✓ runtime" in up
    junit = ET.parse(a / "junit.xml").getroot()
    errors = junit.findall(".//testcase/error")
    assert errors and "pytest exit 3" in errors[0].get("message")
    assert "kubeconfig" in errors[0].text
    assert "conformance preflight failed" in (a / "console" / "conformance.log").read_text()
    assert not (a / "conformance.json").exists()  # the suite ran no check: no report, and the verdict says why


def test_full_night_left_nothing_behind(full_night):
    assert_nothing_left(full_night)


# ---------------------------------------------------------------------------------------------- interrupted nights


def interrupt_night(host, spec: Path, label: str, up_line: str, sig: int, **env) -> tuple["Night", int]:
    """Start a night, send ``sig`` once `lab up` has printed ``up_line``, wait for the script to end; the lab
    is removed afterwards whatever happened (the assertions then judge what the script itself did)."""
    night = Night(host, spec, label, **env)
    try:
        night.wait_for(night.artifacts / "console" / "up.log", up_line, timeout=600)
        night.proc.send_signal(sig)
        return night, night.finish()
    finally:
        if night.proc.poll() is None:
            night.proc.kill()
        remove_lab(host, spec)


def test_sigterm_while_vms_boot_collects_logs_and_removes_the_lab(host):
    spec = spec_copy(host, "nightlyt", "10.234.0.0/24")
    remove_lab(host, spec)
    # `lab up` may not stop on the forwarded SIGINT while its wait threads run: the script then escalates to
    # SIGTERM after NIGHTLY_GRACE seconds (shortened here); either way the lab must be gone
    night, rc = interrupt_night(host, spec, "term", "✓ nodes", signal.SIGTERM, NIGHTLY_GRACE="20")
    assert rc == 143, night.err.read_text()[-3000:]
    assert night.verdict.startswith("nightly: INTERRUPTED by SIGTERM during provisioning; logs collected and the lab "
                                    "removed")
    a = night.artifacts
    phases = json.loads((a / "phases.json").read_text())["phases"]
    assert phases["nodes"]["status"] == "done", phases
    assert phases.get("wait", {}).get("status") in (None, "interrupted"), phases  # never "done"
    assert night.seconds < 20 + 15 + 180, "the interrupted night took too long to clean up"
    for node in ("cp1", "w1"):
        assert (a / "logs" / node / "serial-console.log").is_file()
    assert "lab nightlyt removed" in (a / "console" / "down.log").read_text()
    assert_nothing_left(night)


def test_sigint_after_the_network_exists_removes_the_lab(host):
    spec = spec_copy(host, "nightlyi", "10.235.0.0/24")
    remove_lab(host, spec)
    night, rc = interrupt_night(host, spec, "int", "✓ network", signal.SIGINT)
    assert rc == 130, night.err.read_text()[-3000:]
    assert night.verdict.startswith("nightly: INTERRUPTED by SIGINT during provisioning")
    assert "interrupted" in (night.artifacts / "console" / "up.log").read_text()
    assert json.loads((night.artifacts / "nightly.json").read_text())["exit"] == 130
    assert_nothing_left(night)


def test_provisioning_failure_exit_3_names_the_phase(host):
    spec = spec_copy(host, "nightlyp", "10.236.0.0/24")
    doc = yaml.safe_load(spec.read_text())
    for node in doc["nodes"]:
        node["memory"] = 4_000_000  # MiB: more than any CI host has, so preflight refuses before creating anything
    spec.write_text(yaml.safe_dump(doc))
    night = Night(host, spec, "prov")
    rc = night.finish(timeout=300)
    assert rc == 3, night.err.read_text()[-3000:]
    assert night.verdict.startswith("nightly: FAILED at provisioning (lab up exit 1): phase preflight: this host is "
                                    "not ready for lab nightlyp")
    assert "memory:" in night.verdict and "fix: lower nodes[].memory" in night.verdict
    assert (night.artifacts / "console" / "up.log").is_file()
    assert (night.artifacts / "state-logs").is_dir()  # `lab up` collected its own failure logs
    assert "lab nightlyp removed" in (night.artifacts / "console" / "down.log").read_text()
    assert_nothing_left(night)


def test_invalid_spec_exit_2_creates_nothing(host):
    spec = host / "bad.yaml"
    spec.write_text("name: Not_A_Label\nnodes: []\n")
    night = Night(host, spec, "bad")
    rc = night.finish(timeout=120)
    assert rc == 2
    assert night.verdict.startswith("nightly: FAILED at input (lab render exit 2)")
    assert "is not a DNS label" in night.verdict
    assert not (night.artifacts / "console" / "up.log").exists()
