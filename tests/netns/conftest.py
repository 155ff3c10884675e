"""Fixtures for real-kernel netns topologies. These tests need root and FAIL without it."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import topo  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session")
def root():
    if os.geteuid() != 0:
        pytest.fail("tests/netns build network namespaces and need root (run as root, e.g. in CI)")
    for tool in ("ip", "nft", "unshare", "sysctl"):
        if not shutil.which(tool):
            pytest.fail("tests/netns need %r on PATH (apt-get install iproute2 nftables util-linux procps)" % tool)


@pytest.fixture
def lab(root):
    the_lab = topo.Lab()
    yield the_lab
    the_lab.close()


@pytest.fixture(scope="session")
def geneve_kind(root):
    """Kernel geneve when the kernel has it, else the user-space RFC 8926 endpoint (geneve_tap.py)."""
    return "geneve" if topo.kernel_has_geneve() else "geneve-user"


@pytest.fixture(params=["vxlan", "geneve"])
def overlay_kind(request, geneve_kind):
    return geneve_kind if request.param == "geneve" else "vxlan"
