"""The lab spec: a catalogue of bad specs, each with the path and the message it must produce."""
from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest
import yaml

from lab.errors import SpecError
from lab.spec import PRODUCTION_SYSCTLS, load_lab, parse_lab

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "name": "t",
    "network": {"cidr": "192.168.150.0/24", "mtu": 1500},
    "nodes": [
        {"name": "cp1", "role": "control-plane", "cpus": 2, "memory": 2048},
        {"name": "w1", "role": "worker", "cpus": 1, "memory": 1024},
    ],
    "metallb": {"addresses": ["192.168.150.200-192.168.150.210"]},
}


def spec(**changes):
    """BASE with dotted-path changes, e.g. spec(**{"network.mtu": 100})."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        target = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
        last = parts[-1]
        if last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return data


# (id, spec, path expected in a problem, words expected in that problem's message)
BAD_SPECS = [
    ("unknown-top-key", {**BASE, "nodez": []}, "nodez", "unknown key; accepted keys here: cilium, image"),
    ("unknown-nested-key", spec(**{"network.mtuu": 1500}), "network.mtuu", "accepted keys here: bridge, cidr"),
    ("unknown-node-key", spec(**{"nodes.0.ram": 4}), "nodes[0].ram", "accepted keys here: cpus, disk, ip"),
    ("missing-name", {k: v for k, v in BASE.items() if k != "name"}, "name", "required field is missing"),
    ("missing-nodes", {k: v for k, v in BASE.items() if k != "nodes"}, "nodes", "required field is missing"),
    ("bad-mode", spec(**{"network.mode": "routed"}), "network.mode", "'nat', 'isolated' or 'bridge'"),
    ("bad-cidr", spec(**{"network.cidr": "10.0.0.300/24"}), "network.cidr", "IPv4"),
    ("small-cidr", spec(**{"network.cidr": "192.168.150.0/30", "metallb.addresses": []}), "network.cidr",
     "too small"),
    ("mtu-low", spec(**{"network.mtu": 576}), "network.mtu", "use 1280..9216"),
    ("mtu-high", spec(**{"network.mtu": 9600}), "network.mtu", "use 1280..9216"),
    ("bridge-without-name", spec(**{"network.mode": "bridge"}), "network.bridge", "existing host bridge"),
    ("bridge-name-too-long", spec(**{"network.bridge": "a-very-long-bridge-name"}), "network.bridge",
     "longer than 15"),
    ("bad-lab-name", spec(name="Lab_1"), "name", "DNS label"),
    ("bad-node-name", spec(**{"nodes.1.name": "W_1"}), "nodes[1].name", "DNS label"),
    ("dup-node-name", spec(**{"nodes.1.name": "cp1"}), "nodes[1].name", "already used by nodes[0]"),
    ("no-control-plane", spec(**{"nodes.0.role": "worker"}), "nodes", "no node has role: control-plane"),
    ("bad-role", spec(**{"nodes.1.role": "master"}), "nodes[1].role", "'control-plane' or 'worker'"),
    ("ip-outside-cidr", spec(**{"nodes.0.ip": "10.9.9.9"}), "nodes[0].ip", "not a host address of network.cidr"),
    ("ip-is-gateway", spec(**{"nodes.0.ip": "192.168.150.1"}), "nodes[0].ip", "is the gateway"),
    ("ip-in-dhcp", spec(**{"nodes.0.ip": "192.168.150.150"}), "nodes[0].ip", "inside the DHCP range"),
    ("ip-duplicate", spec(**{"nodes.0.ip": "192.168.150.20", "nodes.1.ip": "192.168.150.20"}), "nodes[1].ip",
     "already used by nodes[0]"),
    ("ip-broadcast", spec(**{"nodes.0.ip": "192.168.150.255"}), "nodes[0].ip", "not a host address"),
    ("cp-too-few-cpus", spec(**{"nodes.0.cpus": 1}), "nodes[0].cpus", "use at least 2"),
    ("cp-too-little-memory", spec(**{"nodes.0.memory": 1024}), "nodes[0].memory", "use at least 2048"),
    ("worker-too-little-memory", spec(**{"nodes.1.memory": 512}), "nodes[1].memory", "use at least 1024"),
    ("disk-too-small", spec(**{"nodes.1.disk": 2}), "nodes[1].disk", "at least 4"),
    ("cpus-not-int", spec(**{"nodes.1.cpus": "two"}), "nodes[1].cpus", "valid integer"),
    ("dhcp-range-bad", spec(**{"network.dhcpRange": "192.168.150.100"}), "network.dhcpRange", "FIRST-LAST"),
    ("dhcp-range-outside", spec(**{"network.dhcpRange": "10.0.0.1-10.0.0.9"}), "network.dhcpRange",
     "not inside network.cidr"),
    ("bad-sysctl-name", spec(**{"tuning.sysctls": {"somaxconn": 1}}), "tuning.sysctls.somaxconn", "dotted form"),
    ("bad-module", spec(**{"tuning.modules": ["br netfilter"]}), "tuning.modules[0]", "kernel module name"),
    ("root-user", spec(**{"ssh.user": "root"}), "ssh.user", "not root"),
    ("zero-timeout", spec(**{"timeouts.boot": 0}), "timeouts.boot", "positive number of seconds"),
    ("bad-accel", spec(**{"libvirt.accel": "hvf"}), "libvirt.accel", "'auto', 'kvm' or 'tcg'"),
    # cluster rules (issue "Cluster bootstrap")
    ("pod-subnet-overlaps-lab", spec(**{"kubernetes.podSubnet": "192.168.0.0/16"}), "kubernetes.podSubnet",
     "overlaps the lab network"),
    ("service-overlaps-pod", spec(**{"kubernetes.serviceSubnet": "10.244.128.0/20"}), "kubernetes.serviceSubnet",
     "overlaps kubernetes.podSubnet"),
    ("k8s-version", spec(**{"kubernetes.version": "latest"}), "kubernetes.version", "use an exact release such as"),
    ("k8s-bare-minor", spec(**{"kubernetes.version": "1.37"}), "kubernetes.version", "asks dl.k8s.io for stable-1"),
    ("k8s-source", spec(**{"kubernetes.source": "tarball"}), "kubernetes.source", "'packages' or 'bundle'"),
    ("bundle-cilium-version", spec(**{"kubernetes.source": "bundle", "cilium.version": "1.19.7",
                                      "cilium.hubble": {"relay": True, "ui": False}}),
     "cilium.version", "the offline bundle (bundle/recipe.yaml) carries 1.20.2"),
    ("bundle-k8s-version", spec(**{"kubernetes.source": "bundle", "kubernetes.version": "1.36.3",
                                   "cilium.hubble": {"relay": True, "ui": False}}),
     "kubernetes.version", "carries 1.37.2"),
    ("bundle-hubble-ui", spec(**{"kubernetes.source": "bundle"}), "cilium.hubble.ui", "no Hubble UI images"),
    ("cilium-version", spec(**{"cilium.version": "1.19"}), "cilium.version", "exact chart version"),
    ("tunnel-protocol", spec(**{"cilium.tunnelProtocol": "ipip"}), "cilium.tunnelProtocol", "'vxlan' or 'geneve'"),
    ("geneve-1460", spec(**{"cilium.tunnelProtocol": "geneve", "cilium.mtu": 1460}), "cilium.mtu",
     "1500 - 50 bytes of GENEVE overhead"),
    ("vxlan-1500", spec(**{"cilium.mtu": 1500}), "cilium.mtu", "= 1450"),
    ("cilium-mtu-tiny", spec(**{"cilium.mtu": 1000}), "cilium.mtu", "below the IPv6 minimum"),
    ("pool-outside", spec(**{"metallb.addresses": ["10.1.0.0/28"]}), "metallb.addresses[0]",
     "not inside network.cidr"),
    ("pool-in-dhcp", spec(**{"metallb.addresses": ["192.168.150.180-192.168.150.199"]}), "metallb.addresses[0]",
     "overlaps the DHCP range"),
    ("pool-has-gateway", spec(**{"metallb.addresses": ["192.168.150.0/28"]}), "metallb.addresses[0]",
     "contains the gateway"),
    ("pool-has-node", spec(**{"nodes.0.ip": "192.168.150.201"}), "metallb.addresses[0]", "contains node IP(s)"),
    ("pool-malformed", spec(**{"metallb.addresses": ["192.168.150.200"]}), "metallb.addresses[0]", "FIRST-LAST"),
    ("pool-not-network-aligned", spec(**{"metallb.addresses": ["192.168.150.201/28"]}), "metallb.addresses[0]",
     "host bits set"),
    ("pools-overlap", spec(**{"metallb.addresses": ["192.168.150.200-192.168.150.205",
                                                     "192.168.150.204-192.168.150.206"]}),
     "metallb.addresses[1]", "overlaps metallb.addresses[0]"),
    ("pool-empty", spec(**{"metallb.addresses": [], "network.cidr": "192.168.150.0/28"}), "metallb.addresses",
     "no address pool"),
]


@pytest.mark.parametrize("data,path,words", [pytest.param(d, p, w, id=i) for i, d, p, w in BAD_SPECS])
def test_bad_spec_names_field_and_fix(data, path, words):
    with pytest.raises(SpecError) as info:
        parse_lab(data)
    problems = info.value.problems
    matching = [msg for p, msg in problems if p == path]
    assert matching, f"no problem for {path!r}; got {problems}"
    assert any(words in msg for msg in matching), f"{words!r} not in {matching}"
    assert info.value.exit_code == 2


def test_catalogue_is_large_enough():
    assert len(BAD_SPECS) >= 25


def test_every_problem_reported_at_once():
    data = spec(**{"network.mtu": 100, "nodes.0.cpus": 1, "nodes.1.name": "cp1", "cilium.mtu": 1500})
    with pytest.raises(SpecError) as info:
        parse_lab(data)
    paths = {p for p, _ in info.value.problems}
    assert {"network.mtu", "nodes[0].cpus", "nodes[1].name", "cilium.mtu"} <= paths
    text = str(info.value)
    assert "4 problem(s)" in text or f"{len(info.value.problems)} problem(s)" in text


def test_shape_errors_reported_together():
    data = spec(**{"nodes.0.cpus": "x", "nodes.1.bogus": 1, "network.mode": "x"})
    with pytest.raises(SpecError) as info:
        parse_lab(data)
    paths = {p for p, _ in info.value.problems}
    assert {"nodes[0].cpus", "nodes[1].bogus", "network.mode"} <= paths


def test_defaults_filled():
    lab = parse_lab(BASE)
    assert [str(n.ip) for n in lab.nodes] == ["192.168.150.10", "192.168.150.11"]
    assert lab.tuning.sysctls == PRODUCTION_SYSCTLS
    assert lab.tuning.modules == ["br_netfilter", "overlay", "nf_conntrack"]
    assert lab.dhcp_range == (ipaddress.IPv4Address("192.168.150.128"), ipaddress.IPv4Address("192.168.150.191"))
    assert lab.pod_mtu == 1450 and lab.overlay_overhead == 50


def test_assigned_ips_skip_taken_and_explicit():
    data = spec(**{"nodes.0.ip": "192.168.150.10"})
    lab = parse_lab(data)
    assert str(lab.nodes[1].ip) == "192.168.150.11"
    data = spec(**{"nodes.1.ip": "192.168.150.10"})
    lab = parse_lab(data)
    assert str(lab.nodes[0].ip) == "192.168.150.11"


def test_geneve_auto_mtu_is_1450_not_1460():
    lab = parse_lab(spec(**{"cilium.tunnelProtocol": "geneve"}))
    assert lab.pod_mtu == 1450
    lab = parse_lab(spec(**{"cilium.tunnelProtocol": "geneve", "cilium.mtu": 1450}))
    assert lab.pod_mtu == 1450


def test_geneve_1460_explains_arithmetic():
    with pytest.raises(SpecError) as info:
        parse_lab(spec(**{"cilium.tunnelProtocol": "geneve", "cilium.mtu": 1460}))
    msg = dict(info.value.problems)["cilium.mtu"]
    assert "1510-byte outer packets" in msg and "TCP MSS" in msg and "Use 1450" in msg


def test_sysctl_values_become_strings():
    lab = parse_lab(spec(**{"tuning.sysctls": {"net.core.somaxconn": 4096, "net.ipv4.ip_forward": True}}))
    assert lab.tuning.sysctls == {"net.core.somaxconn": "4096", "net.ipv4.ip_forward": "1"}


def test_mac_is_deterministic_and_distinct():
    lab = parse_lab(BASE)
    other = parse_lab({**BASE, "name": "u"})
    assert lab.mac("cp1") == parse_lab(BASE).mac("cp1")
    assert lab.mac("cp1") != lab.mac("w1") != other.mac("w1")
    assert lab.mac("cp1").startswith("52:54:00:")


def test_without_kubernetes_small_nodes_allowed_and_no_pool_needed():
    data = spec(**{"kubernetes.enabled": False, "nodes.0.cpus": 1, "nodes.0.memory": 1024,
                   "metallb.addresses": []})
    lab = parse_lab(data)
    assert lab.kubernetes.enabled is False


def test_shipped_labs_load():
    default = load_lab(ROOT / "labs/default.yaml")
    assert len(default.control_planes) == 1 and len(default.workers) == 2
    ci = load_lab(ROOT / "labs/ci.yaml")
    assert ci.image == "debian-12-offline" and ci.kubernetes.enabled is False and len(ci.nodes) == 2


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(SpecError) as info:
        load_lab(tmp_path / "missing.yaml")
    assert "cannot read" in str(info.value) and "-c labs/default.yaml" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_lab(bad)
    assert "not valid YAML" in str(info.value)
    bad.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(SpecError) as info:
        load_lab(bad)
    assert "mapping at the top level" in str(info.value)
