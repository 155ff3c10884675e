"""The VM tests' networks never overlap a lab that may be kept running on the same runner.

The real-cluster tier can leave labs/ci-cluster.yaml up (KVMLAB_KEEP_CLUSTER=1, or a failed night kept for its
logs); `lab up`'s preflight then refuses any other lab on an overlapping network.cidr, and a VM test on that CIDR
fails for a reason that has nothing to do with its subject (seen in CI: the nightly test on 10.232.0.0/24).
"""
import ipaddress
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KEPT_LABS = ["labs/ci-cluster.yaml", "labs/default.yaml"]
CIDR = re.compile(r"""["'](\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}/\d{1,2})["']""")


def kept_networks() -> dict[str, ipaddress.IPv4Network]:
    return {spec: ipaddress.ip_network(yaml.safe_load((ROOT / spec).read_text())["network"]["cidr"])
            for spec in KEPT_LABS}


def vm_test_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    found = []
    for folder in ("tests/e2e", "tests/libvirt"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for literal in CIDR.findall(path.read_text()):
                found.append((f"{path.relative_to(ROOT)}: {literal}", ipaddress.ip_network(literal, strict=False)))
    return found


def test_the_scan_finds_the_vm_tests_networks():
    names = [where for where, _ in vm_test_networks()]
    assert any(where.startswith("tests/e2e/test_nightly.py") for where in names), names
    assert any(where.startswith("tests/libvirt/test_lab_cycle.py") for where in names), names


def test_no_vm_test_network_overlaps_a_kept_lab():
    kept = kept_networks()
    clashes = [f"{where} overlaps {spec} ({net})" for where, used in vm_test_networks()
               for spec, net in kept.items() if used.overlaps(net)]
    assert clashes == []
