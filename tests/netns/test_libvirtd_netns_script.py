"""scripts/libvirtd-netns.sh refuses a libvirt daemon that runs outside its namespace.

A copy of `sleep` named `virtlogd` stands in for a daemon on the host's network: the script must
exit 1 naming it, and create no namespace. (The full start/stop cycle runs in the e2e suite,
which needs the real daemons.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.root
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "libvirtd-netns.sh"


def test_refuses_daemon_outside_namespace(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces): run the suite as root")
    fake = tmp_path / "virtlogd"
    shutil.copy("/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "60"])
    ns = f"kvmlab-t{os.getpid()}"
    try:
        time.sleep(0.2)
        r = subprocess.run(["bash", str(SCRIPT), "start"], env={**os.environ, "LABNS": ns},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "runs outside network namespace " + ns in r.stderr
        assert not Path(f"/run/netns/{ns}").exists()
        s = subprocess.run(["bash", str(SCRIPT), "status"], env={**os.environ, "LABNS": ns},
                           capture_output=True, text=True, timeout=60)
        assert s.returncode == 1 and f"virtlogd: pid {proc.pid}, outside {ns}" in s.stdout, s.stdout
    finally:
        proc.kill()
        proc.wait()
        if Path(f"/run/netns/{ns}").exists():
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_usage_error():
    r = subprocess.run(["bash", str(SCRIPT), "bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage:" in r.stderr
