"""cloud-init NoCloud seed: user-data, meta-data, network-config and the ``cidata`` ISO (pycdlib).

The node's SSH host key is generated here, on the machine running ``lab``, and pinned in user-data: cloud-init
deletes the image's host keys (``ssh_deletekeys``), writes ours (``ssh_keys``) and generates no others (with
``ssh_keys`` set, cloud-init skips ``ssh_genkeytypes``; we list only ed25519 anyway), so sshd presents exactly
the key whose fingerprint the lab state records.

The seed holds that private key: the volume gets libvirt's default mode 0600 in a 0711 pool (see ``xml``).
"""
from __future__ import annotations

import base64
import hashlib
import io
from typing import Sequence

import pycdlib
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab.spec import Lab, NodeSpec
from lab.virt.xml import fqdn

VOLUME_ID = "cidata"
#: Rock Ridge / Joliet name -> ISO 9660 level-3 name (only d-characters there).
ISO_NAMES = {"user-data": "USER_DATA.;1", "meta-data": "META_DATA.;1", "network-config": "NETWORK_CONFIG.;1"}
NETWORK_ID = "lab0"  # the v2 config's key; the device itself is found by MAC


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the private key) as literal blocks, so the file reads like a hand-written one."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def _yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)


# ---------------------------------------------------------------------------------------------- host key


def fingerprint(public_line: str) -> str:
    """OpenSSH's SHA256 fingerprint (``ssh-keygen -lf``) of an ``ssh-<type> <base64> [comment]`` line."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def generate_host_key() -> tuple[str, str, str]:
    """A fresh ed25519 host key: (OpenSSH private PEM, ``ssh-ed25519 AAAA...`` public line, SHA256 fingerprint)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public, fingerprint(public)


# ---------------------------------------------------------------------------------------------- documents


def user_data(lab: Lab, node: NodeSpec, ssh_public_key: str, host_key_private: str, host_key_public: str,
              *, packages: Sequence[str] = ()) -> str:
    """#cloud-config: login user with key + passwordless sudo, pinned host key, hostname, growfs, guest agent.

    No package upgrades ever; ``packages`` (e.g. qemu-guest-agent on a cloud image that lacks it) refreshes
    the package index and installs only those, so an offline image passes none.
    """
    if not host_key_public.startswith("ssh-ed25519 "):
        raise ValueError("host_key_public must be an 'ssh-ed25519 ...' line (see generate_host_key)")
    config: dict = {
        "hostname": node.name,
        "fqdn": fqdn(lab, node),
        "prefer_fqdn_over_hostname": False,
        "manage_etc_hosts": True,
        "users": [{
            "name": lab.ssh.user,
            "gecos": f"lab {lab.name}",
            "shell": "/bin/bash",
            "lock_passwd": True,
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "ssh_authorized_keys": [ssh_public_key.strip()],
        }],
        "disable_root": True,
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],  # exists by then, so none generated (the schema wants >= 1 item)
        "ssh_keys": {"ed25519_private": host_key_private.strip() + "\n",
                     "ed25519_public": host_key_public.strip()},
        "growpart": {"mode": "auto", "devices": ["/"]},
        "resize_rootfs": True,
        "package_update": bool(packages),
        "package_upgrade": False,
        "package_reboot_if_required": False,
    }
    if packages:
        config["packages"] = list(packages)
    # The agent unit is static (udev starts it when the virtio port appears); start it explicitly once, and
    # only where it is installed: a cloud image without it still boots (IPs then come from DHCP leases/ARP).
    config["runcmd"] = [["sh", "-c", "if systemctl cat qemu-guest-agent.service >/dev/null 2>&1; "
                                     "then systemctl start qemu-guest-agent.service; fi"]]
    return "#cloud-config\n" + _yaml(config)


def meta_data(lab: Lab, node: NodeSpec, *, instance_id: str | None = None) -> str:
    """NoCloud meta-data. Pass a new ``instance_id`` whenever the seed changes for an existing disk (e.g. a
    new host key): cloud-init reruns its per-instance modules only when the id changes."""
    return _yaml({"instance-id": instance_id or lab.domain_name(node), "local-hostname": node.name})


def network_config(lab: Lab, node: NodeSpec) -> str:
    """Netplan v2, matched by MAC (never by interface name). nat/isolated: DHCP, the network's reservation pins
    the address. bridge: static address, default route via the gateway, DNS from the spec (else the gateway)."""
    eth: dict = {"match": {"macaddress": lab.mac(node)}, "mtu": lab.network.mtu}
    if lab.network.mode == "bridge":
        dns = [str(ip) for ip in lab.network.dns] or [str(lab.gateway)]
        eth |= {
            "dhcp4": False,
            "dhcp6": False,
            "addresses": [f"{node.ip}/{lab.network.cidr.prefixlen}"],
            "routes": [{"to": "0.0.0.0/0", "via": str(lab.gateway)}],
            "nameservers": {"addresses": dns},
        }
    else:
        eth |= {"dhcp4": True, "dhcp6": False}
        if lab.network.dns:
            eth["nameservers"] = {"addresses": [str(ip) for ip in lab.network.dns]}
    return _yaml({"version": 2, "ethernets": {NETWORK_ID: eth}})


# ---------------------------------------------------------------------------------------------- ISO


def build_seed_iso(user_data: str, meta_data: str, network_config: str) -> bytes:
    """The NoCloud seed: ISO 9660, volume id ``cidata``, Rock Ridge + Joliet names ``user-data`` etc."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
    try:
        for name, text in (("user-data", user_data), ("meta-data", meta_data), ("network-config", network_config)):
            data = text.encode()
            iso.add_fp(io.BytesIO(data), len(data), "/" + ISO_NAMES[name], rr_name=name, joliet_path="/" + name)
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()
