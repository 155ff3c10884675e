"""`lab up` / `lab status` / `lab down` cycles through the real CLI against libvirt's in-process
`test:///default` driver: objects created with our ownership, reruns change nothing, `down` removes exactly
this lab's objects and state, another lab is never touched, bad input creates nothing.

The test driver boots nothing (no IP, no SSH), so `up` stops after the `nodes` phase (`--until nodes`); the
real VMs are covered by tests/e2e. It also cannot upload volume contents: `lab` warns and goes on there.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import libvirt
import pytest
import yaml

from lab.cli import main as lab_main
from lab.virt.xml import parse_owner

URI = "test:///default"


@pytest.fixture
def conn():
    """Our own connection: it also keeps the test driver's shared state alive between CLI calls."""
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    return path


@pytest.fixture(autouse=True)
def state_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "state"
    monkeypatch.setenv("LAB_STATE_DIR", str(root))
    return root


def spec_file(tmp_path: Path, name: str, image: Path, cidr: str, nodes: int = 2, **extra) -> Path:
    data = {"name": name, "libvirt": {"uri": URI}, "network": {"cidr": cidr}, "image": {"path": str(image)},
            "nodes": [{"name": "cp1", "role": "control-plane", "cpus": 1, "memory": 1024, "disk": 4}] +
                     [{"name": f"w{i}", "role": "worker", "cpus": 1, "memory": 1024, "disk": 4}
                      for i in range(1, nodes)],
            "kubernetes": {"enabled": False}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def up(spec: Path) -> int:
    return lab_main(["up", "-q", "-c", str(spec), "--until", "nodes"])


def down(spec: Path) -> int:
    return lab_main(["down", "-c", str(spec)])


def owned(conn, lab: str) -> dict[str, list[str]]:
    doms = sorted(d.name() for d in conn.listAllDomains() if (parse_owner(d.XMLDesc(0)) or ("",))[0] == lab)
    nets = sorted(n.name() for n in conn.listAllNetworks() if (parse_owner(n.XMLDesc(0)) or ("",))[0] == lab)
    pools = sorted(p.name() for p in conn.listAllStoragePools() if p.name() == f"lab-{lab}")
    return {"domains": doms, "networks": nets, "pools": pools}


def phases(state_root: Path, lab: str) -> dict[str, str]:
    record = json.loads((state_root / lab / "state.json").read_text())["phases"]
    return {k: v["status"] for k, v in record.items() if k != "_total"}


def test_up_creates_owned_running_objects(conn, tmp_path, image, state_root):
    spec = spec_file(tmp_path, "cyc1", image, "10.253.1.0/24", nodes=3)
    try:
        assert up(spec) == 0
        assert owned(conn, "cyc1") == {"domains": ["cyc1-cp1", "cyc1-w1", "cyc1-w2"], "networks": ["lab-cyc1"],
                                       "pools": ["lab-cyc1"]}
        for name in ("cyc1-cp1", "cyc1-w1", "cyc1-w2"):
            assert conn.lookupByName(name).isActive()
        pool = conn.storagePoolLookupByName("lab-cyc1")
        assert sorted(pool.listVolumes()) == sorted(["base-base.qcow2", "cp1.qcow2", "cp1-cidata.img", "w1.qcow2",
                                                     "w1-cidata.img", "w2.qcow2", "w2-cidata.img"])
        net_xml = conn.networkLookupByName("lab-cyc1").XMLDesc(0)
        for ip in ("10.253.1.10", "10.253.1.11", "10.253.1.12"):
            assert f"ip='{ip}'" in net_xml or f'ip="{ip}"' in net_xml
        assert phases(state_root, "cyc1") == {"preflight": "done", "image": "done", "network": "done",
                                              "storage": "done", "nodes": "done"}
        key = state_root / "cyc1" / "id_ed25519"
        assert key.stat().st_mode & 0o777 == 0o600
    finally:
        assert down(spec) == 0


def test_rerun_changes_nothing(conn, tmp_path, image, state_root):
    spec = spec_file(tmp_path, "cyc2", image, "10.253.2.0/24")
    try:
        assert up(spec) == 0
        uuids = {d.name(): d.UUIDString() for d in conn.listAllDomains() if d.name().startswith("cyc2-")}
        assert up(spec) == 0
        assert phases(state_root, "cyc2") == {"preflight": "done", "image": "done", "network": "unchanged",
                                              "storage": "unchanged", "nodes": "unchanged"}
        assert uuids == {d.name(): d.UUIDString() for d in conn.listAllDomains() if d.name().startswith("cyc2-")}
    finally:
        assert down(spec) == 0


def test_down_removes_only_this_lab_and_is_idempotent(conn, tmp_path, image, state_root):
    a = spec_file(tmp_path, "cyca", image, "10.253.3.0/24")
    b = spec_file(tmp_path, "cycab", image, "10.253.4.0/24")  # a name that starts like the other
    try:
        assert up(a) == 0 and up(b) == 0
        before_b = owned(conn, "cycab")
        assert down(a) == 0
        assert owned(conn, "cyca") == {"domains": [], "networks": [], "pools": []}
        assert not (state_root / "cyca").exists()
        assert owned(conn, "cycab") == before_b
        assert all(conn.lookupByName(d).isActive() for d in before_b["domains"])
        assert down(a) == 0  # again: nothing to do, still success
    finally:
        assert down(b) == 0
    assert owned(conn, "cycab") == {"domains": [], "networks": [], "pools": []}


def test_resume_after_a_removed_domain(conn, tmp_path, image, state_root):
    """A rerun after something vanished (a crash, a manual virsh undefine) recreates just that."""
    spec = spec_file(tmp_path, "cyc3", image, "10.253.5.0/24")
    try:
        assert up(spec) == 0
        dom = conn.lookupByName("cyc3-w1")
        dom.destroy()
        dom.undefine()
        assert up(spec) == 0
        assert phases(state_root, "cyc3")["nodes"] == "done"
        assert conn.lookupByName("cyc3-w1").isActive()
    finally:
        assert down(spec) == 0


def test_bad_spec_exits_2_and_creates_nothing(conn, tmp_path, image, state_root, capsys):
    spec = spec_file(tmp_path, "cyc4", image, "10.253.6.0/24")
    data = yaml.safe_load(spec.read_text())
    data["nodes"][0]["ip"] = "10.9.9.9"
    data["network"]["mtu"] = 100
    spec.write_text(yaml.safe_dump(data))
    assert up(spec) == 2
    err = capsys.readouterr().err
    assert "nodes[0].ip" in err and "network.mtu" in err
    assert owned(conn, "cyc4") == {"domains": [], "networks": [], "pools": []}
    assert not (state_root / "cyc4").exists()


def test_unknown_phase_exits_2(tmp_path, image):
    spec = spec_file(tmp_path, "cyc5", image, "10.253.7.0/24")
    assert lab_main(["up", "-c", str(spec), "--until", "nope"]) == 2


def test_missing_image_fails_before_creating_anything(conn, tmp_path, image, state_root, capsys):
    spec = spec_file(tmp_path, "cyc6", image, "10.253.8.0/24")
    image.unlink()
    assert up(spec) == 1
    assert "image.path" in capsys.readouterr().err
    assert owned(conn, "cyc6") == {"domains": [], "networks": [], "pools": []}
    assert down(spec) == 0


def test_status_json_reports_each_node(conn, tmp_path, image, state_root, capsys):
    spec = spec_file(tmp_path, "cyc7", image, "10.253.9.0/24")
    try:
        assert up(spec) == 0
        capsys.readouterr()
        assert lab_main(["status", "-c", str(spec), "-o", "json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["network"]["state"] == "active" and status["pool"]["present"] is True
        assert [(n["name"], n["domain"]) for n in status["nodes"]] == [("cp1", "running"), ("w1", "running")]
        assert status["cluster"]["cluster"] == "none"
    finally:
        assert down(spec) == 0
    capsys.readouterr()
    assert lab_main(["status", "-c", str(spec), "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [n["domain"] for n in status["nodes"]] == ["absent", "absent"]
    assert status["network"]["state"] == "absent"
