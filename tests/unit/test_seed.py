"""lab.virt.seed: cloud-init documents checked by cloud-init 22.4 itself, the host key, the cidata ISO."""
from __future__ import annotations

import io
import subprocess

import paramiko
import pycdlib
import pytest
import yaml

from lab.spec import parse_lab
from lab.virt.seed import (build_seed_iso, fingerprint, generate_host_key, meta_data, network_config,
                           user_data)

CLIENT_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv0eTKn2eWe3Gq9V4o0n1b8QmQ7tA3b8eYw2bq6xkqh lab@ci"


def make_lab(mode: str = "nat", mtu: int = 1500, dns: list[str] | None = None):
    network = {"mode": mode, "cidr": "10.77.0.0/24", "mtu": mtu, "dns": dns or []}
    if mode == "bridge":
        network["bridge"] = "br0"
    return parse_lab({"name": "t1", "network": network, "kubernetes": {"enabled": False}, "ssh": {"user": "ops"},
                      "nodes": [{"name": "cp1", "role": "control-plane", "cpus": 1, "memory": 1024}]})


@pytest.fixture(scope="module")
def host_key():
    return generate_host_key()


def cloud_init_schema(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "user-data"
    path.write_text(text)
    return subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------- user-data


@pytest.mark.parametrize("mode", ["nat", "isolated", "bridge"])
@pytest.mark.parametrize("packages", [(), ("qemu-guest-agent",)])
def test_user_data_passes_cloud_init_schema(tmp_path, host_key, mode, packages):
    lab = make_lab(mode)
    text = user_data(lab, lab.nodes[0], CLIENT_KEY, host_key[0], host_key[1], packages=packages)
    result = cloud_init_schema(tmp_path, text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_cloud_init_schema_check_can_fail(tmp_path, host_key):
    """An empty ssh_genkeytypes (the obvious way to say 'generate none') is refused by 22.4's schema."""
    lab = make_lab()
    text = user_data(lab, lab.nodes[0], CLIENT_KEY, *host_key[:2]).replace(
        "ssh_genkeytypes:\n- ed25519", "ssh_genkeytypes: []")
    result = cloud_init_schema(tmp_path, text)
    assert result.returncode != 0 and "ssh_genkeytypes" in result.stdout + result.stderr


def test_user_data_content(host_key):
    lab = make_lab()
    private, public, _ = host_key
    text = user_data(lab, lab.nodes[0], CLIENT_KEY + "\n", private, public)
    assert text.startswith("#cloud-config\n")
    cfg = yaml.safe_load(text)
    (user,) = cfg["users"]
    assert user["name"] == "ops" and user["ssh_authorized_keys"] == [CLIENT_KEY]
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL" and user["lock_passwd"] is True
    assert cfg["ssh_pwauth"] is False and cfg["disable_root"] is True
    assert cfg["ssh_deletekeys"] is True and cfg["ssh_genkeytypes"] == ["ed25519"]
    assert cfg["ssh_keys"] == {"ed25519_private": private.strip() + "\n", "ed25519_public": public}
    assert (cfg["hostname"], cfg["fqdn"]) == ("cp1", "cp1.t1.internal")
    assert cfg["package_upgrade"] is False and cfg["package_update"] is False and "packages" not in cfg
    assert cfg["resize_rootfs"] is True and cfg["growpart"]["devices"] == ["/"]
    assert any("qemu-guest-agent" in " ".join(cmd) for cmd in cfg["runcmd"])


def test_user_data_packages_refresh_the_index_but_never_upgrade(host_key):
    lab = make_lab()
    cfg = yaml.safe_load(user_data(lab, lab.nodes[0], CLIENT_KEY, *host_key[:2], packages=["qemu-guest-agent"]))
    assert cfg["packages"] == ["qemu-guest-agent"]
    assert cfg["package_update"] is True and cfg["package_upgrade"] is False


def test_user_data_refuses_a_non_ed25519_host_key(host_key):
    lab = make_lab()
    with pytest.raises(ValueError, match="ssh-ed25519"):
        user_data(lab, lab.nodes[0], CLIENT_KEY, host_key[0], "ssh-rsa AAAAB3Nza")


def test_meta_data():
    lab = make_lab()
    assert yaml.safe_load(meta_data(lab, lab.nodes[0])) == {"instance-id": "t1-cp1", "local-hostname": "cp1"}
    assert yaml.safe_load(meta_data(lab, lab.nodes[0], instance_id="t1-cp1-2"))["instance-id"] == "t1-cp1-2"


# ---------------------------------------------------------------------------------------------- network-config


def net_convert(tmp_path, text: str, kind: str) -> str:
    """Render with cloud-init's own converter (22.4 has no network-config schema command; this parses it)."""
    src, out = tmp_path / "network-config", tmp_path / kind
    src.write_text(text)
    result = subprocess.run(["cloud-init", "devel", "net-convert", "-p", str(src), "-k", "yaml", "-d", str(out),
                             "-D", "debian", "-O", kind], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return "\n".join(p.read_text() for p in sorted(out.rglob("*")) if p.is_file())


@pytest.mark.parametrize("mode", ["nat", "isolated"])
def test_network_config_dhcp_matched_by_mac(tmp_path, mode):
    lab = make_lab(mode, mtu=1450)
    cfg = yaml.safe_load(network_config(lab, lab.nodes[0]))
    assert cfg["version"] == 2
    (eth,) = cfg["ethernets"].values()
    assert eth["match"] == {"macaddress": lab.mac(lab.nodes[0])}  # by MAC only: never an interface name
    assert "set-name" not in eth
    assert eth["dhcp4"] is True and "addresses" not in eth and eth["mtu"] == 1450
    networkd = net_convert(tmp_path, network_config(lab, lab.nodes[0]), "networkd")
    assert f"MACAddress={lab.mac(lab.nodes[0])}" in networkd and "DHCP=ipv4" in networkd
    assert "MTUBytes=1450" in networkd
    eni = net_convert(tmp_path, network_config(lab, lab.nodes[0]), "eni")
    assert "inet dhcp" in eni and "mtu 1450" in eni


def test_network_config_static_in_bridge_mode(tmp_path):
    lab = make_lab("bridge", mtu=9000, dns=["10.77.0.53"])
    node = lab.nodes[0]
    (eth,) = yaml.safe_load(network_config(lab, node))["ethernets"].values()
    assert eth["match"] == {"macaddress": lab.mac(node)}
    assert eth["dhcp4"] is False and eth["addresses"] == [f"{node.ip}/24"]
    assert eth["routes"] == [{"to": "0.0.0.0/0", "via": "10.77.0.1"}]
    assert eth["nameservers"] == {"addresses": ["10.77.0.53"]} and eth["mtu"] == 9000
    networkd = net_convert(tmp_path, network_config(lab, node), "networkd")
    for line in (f"Address={node.ip}/24", "Gateway=10.77.0.1", "DNS=10.77.0.53", "MTUBytes=9000",
                 f"MACAddress={lab.mac(node)}"):
        assert line in networkd
    netplan = yaml.safe_load(net_convert(tmp_path, network_config(lab, node), "netplan"))
    (rendered,) = netplan["network"]["ethernets"].values()
    assert rendered["match"]["macaddress"] == lab.mac(node)


def test_network_config_bridge_mode_uses_the_gateway_for_dns_when_none_given():
    lab = make_lab("bridge")
    (eth,) = yaml.safe_load(network_config(lab, lab.nodes[0]))["ethernets"].values()
    assert eth["nameservers"] == {"addresses": ["10.77.0.1"]}


# ---------------------------------------------------------------------------------------------- host key


def test_host_key_fingerprint_matches_openssh_and_paramiko(tmp_path, host_key):
    private, public, fp = host_key
    assert public.startswith("ssh-ed25519 ") and private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    (tmp_path / "key.pub").write_text(public + "\n")
    keygen = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "key.pub")], capture_output=True, text=True)
    assert keygen.returncode == 0 and keygen.stdout.split()[1] == fp
    loaded = paramiko.Ed25519Key.from_private_key(io.StringIO(private))
    assert f"{loaded.get_name()} {loaded.get_base64()}" == public
    assert loaded.fingerprint == fp
    assert fingerprint(public + " comment") == fp


def test_host_keys_are_fresh_each_time(host_key):
    assert generate_host_key()[2] != host_key[2]


# ---------------------------------------------------------------------------------------------- ISO


def test_seed_iso_reads_back_with_exact_names_content_and_label(host_key):
    lab = make_lab()
    node = lab.nodes[0]
    docs = {"user-data": user_data(lab, node, CLIENT_KEY, *host_key[:2]), "meta-data": meta_data(lab, node),
            "network-config": network_config(lab, node)}
    data = build_seed_iso(docs["user-data"], docs["meta-data"], docs["network-config"])
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        names = {child.rock_ridge.name().decode() for child in iso.list_children(rr_path="/")
                 if child.is_file()}
        assert names == set(docs)
        for name, text in docs.items():
            for where in ({"rr_path": f"/{name}"}, {"joliet_path": f"/{name}"}):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **where)
                assert out.getvalue().decode() == text, (name, where)
    finally:
        iso.close()


def test_seed_iso_label_seen_by_blkid(tmp_path):
    lab = make_lab()
    path = tmp_path / "seed.iso"
    path.write_bytes(build_seed_iso("#cloud-config\n{}\n", meta_data(lab, lab.nodes[0]), "version: 2\n"))
    result = subprocess.run(["blkid", "-o", "export", str(path)], capture_output=True, text=True)
    assert "LABEL=cidata" in result.stdout and "TYPE=iso9660" in result.stdout
