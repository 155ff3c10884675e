"""The real-cluster tier: Kubernetes, Cilium and MetalLB from the offline bundle in TCG VMs (labs/ci-cluster.yaml).

Needs root, libvirtd inside netns `labns` (scripts/libvirtd-netns.sh) and the bundle (`make bundle`); without any of
them every test here FAILS with the command that fixes it, never skips. One `lab up` serves the whole tier;
`lab logs` and `lab down` always run at the end (KVMLAB_KEEP_CLUSTER=1 keeps the lab for debugging).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clusterlab import RESULTS, ROOT, SPEC  # noqa: E402
from labrun import lab_cli, require_root_and_libvirtd, virsh  # noqa: E402

from lab.spec import load_lab  # noqa: E402


@pytest.fixture(scope="session")
def bundle():
    from lab.bundle.build import current_bundle
    from lab.errors import LabError

    try:
        return current_bundle()
    except LabError as exc:
        pytest.fail(f"the real-cluster tier needs the offline bundle: {exc}")


@pytest.fixture(scope="session")
def cluster_lab():
    return load_lab(SPEC)


@pytest.fixture(scope="session")
def cluster_state():
    require_root_and_libvirtd("the real-cluster tests")
    path = Path(os.environ.get("KVMLAB_CLUSTER_STATE", ROOT / ".lab-cluster-tier"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def cluster(bundle, cluster_lab, cluster_state):
    """`lab up` of the CI cluster (resuming a kept one), then always logs and `lab down` at the end."""
    proc = lab_cli(cluster_state, "up", "-c", str(SPEC), timeout=3 * 3600)
    try:
        assert proc.returncode == 0, f"lab up of the CI cluster failed:\n{proc.stderr[-6000:]}"
        yield proc
    finally:
        logs = lab_cli(cluster_state, "logs", "-c", str(SPEC), "-o", str(RESULTS / "cluster-logs"), timeout=1800)
        print(f"lab logs: rc {logs.returncode}")
        if os.environ.get("KVMLAB_KEEP_CLUSTER") != "1":
            down = lab_cli(cluster_state, "down", "-c", str(SPEC), timeout=1800)
            assert down.returncode == 0, down.stderr
            left = [d for d in virsh("list", "--all", "--name").split() if d.startswith(f"{cluster_lab.name}-")]
            assert not left, f"lab down left domains: {left}"
